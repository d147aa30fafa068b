/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * How weir_lb ends a packet: every verdict and every reason for passing or
 * dropping moves one of weir_abi.h's counters (weir_stats), so `weir stats`
 * can say why the balancer left a packet alone. (The branches kept for a
 * second address family count as the nearest IPv4 reason until that family
 * is parsed.) Include weir_abi.h with
 * WEIR_LB_MAPS defined first.
 */
#ifndef WEIR_VERDICT_H
#define WEIR_VERDICT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "weir_abi.h"

static __always_inline void count(enum weir_counter counter)
{
	__u64 *value = bpf_map_lookup_elem(&weir_stats, &counter);

	if (value)
		*value += 1;
}

static __always_inline int pass(enum weir_counter reason)
{
	count(reason);
	return XDP_PASS;
}

static __always_inline int drop(enum weir_counter reason)
{
	count(reason);
	return XDP_DROP;
}

#endif /* WEIR_VERDICT_H */
