// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * weir's backend-side decapsulation, run at tc ingress on a backend host.
 *
 * The balancer sends each client packet wrapped in an outer IPv4 header
 * (IPIP). This program strips that header from packets whose inner
 * destination is a VIP the backend serves, so the backend's TCP stack sees
 * the client's packet as sent and replies straight to the client (direct
 * server return). Backends need no ipip module. Only the balancers may
 * send it such packets: IPIP to a VIP from an outer source that VIP's
 * allow list lacks is dropped, since its inner source address could be
 * anything. Everything else passes untouched.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>

#define WEIR_DECAP_MAPS
#include "weir_abi.h"
#include "parse.h"

/* BPF_F_ADJ_ROOM_DECAP_L3_IPV4, newer than Debian 12's UAPI headers. */
#define WEIR_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)

char LICENSE[] SEC("license") = "Dual BSD/GPL";

static __always_inline int verdict(enum weir_decap_counter counter, int action)
{
	__u64 *value = bpf_map_lookup_elem(&weir_dcap_stats, &counter);

	if (value)
		*value += 1;
	return action;
}

SEC("classifier")
int weir_decap(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct weir_decap_key key = {};
	struct weir_decap_source source = {};
	struct ethhdr *eth = data;
	struct iphdr *outer, *inner;

	if (!within(eth, sizeof(*eth), data_end) || eth->h_proto != bpf_htons(ETH_P_IP))
		return verdict(WEIR_DCAP_PASS_NOT_IPIP, TC_ACT_OK);
	outer = (void *)(eth + 1);
	if (!within(outer, sizeof(*outer), data_end))
		return verdict(WEIR_DCAP_PASS_MALFORMED, TC_ACT_OK);
	if (outer->protocol != IPPROTO_IPIP)
		return verdict(WEIR_DCAP_PASS_NOT_IPIP, TC_ACT_OK);
	/* weir's encapsulation never uses IP options or fragments. */
	if (!ipv4_well_formed(outer) || ipv4_has_options(outer) || ipv4_is_fragment(outer))
		return verdict(WEIR_DCAP_PASS_MALFORMED, TC_ACT_OK);
	inner = (void *)(outer + 1);
	if (!within(inner, sizeof(*inner), data_end) || !ipv4_well_formed(inner))
		return verdict(WEIR_DCAP_PASS_MALFORMED, TC_ACT_OK);

	key.vip = inner->daddr;
	if (!bpf_map_lookup_elem(&weir_dcap_vips, &key))
		return verdict(WEIR_DCAP_PASS_NOT_VIP, TC_ACT_OK);
	/* Dropped rather than passed: a host with the ipip module loaded
	 * would decapsulate it itself. */
	source.prefixlen = 64;
	source.vip = inner->daddr;
	source.saddr = outer->saddr;
	if (!bpf_map_lookup_elem(&weir_dcap_sources, &source))
		return verdict(WEIR_DCAP_DROP_SOURCE, TC_ACT_SHOT);

	/* FIXED_GSO keeps gso_size of a GRO-merged packet as it was (the
	 * payload per segment does not change); DECAP_L3_IPV4 (6.3+) also
	 * clears the IPIP GSO type. Older kernels refuse that flag: retry
	 * without it. */
	if (bpf_skb_adjust_room(skb, -(int)sizeof(struct iphdr), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | WEIR_ADJ_ROOM_DECAP_L3_IPV4) &&
	    bpf_skb_adjust_room(skb, -(int)sizeof(struct iphdr), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO))
		return verdict(WEIR_DCAP_DROP_ADJUST, TC_ACT_SHOT);
	return verdict(WEIR_DCAP_OK, TC_ACT_OK);
}
