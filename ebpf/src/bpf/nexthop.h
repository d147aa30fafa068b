/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The next hop: where the encapsulated packet goes, from a per-CPU cache of
 * bpf_fib_lookup results (weir_nexthop), with the next hop's MAC addresses
 * written in and XDP_TX or a redirect as the verdict. The lookup is for the
 * outer header, so its family is the backend's (IPv4). Include weir_abi.h
 * with WEIR_LB_MAPS defined first.
 */
#ifndef WEIR_NEXTHOP_H
#define WEIR_NEXTHOP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "weir_abi.h"
#include "parse.h"
#include "verdict.h"

/* transmit(): the packet does not fit the route MTU. */
#define WEIR_TOO_BIG (-1)

/* The FIB question for an encapsulated packet: IPIP from `src` to `dst`,
 * `outer_len` bytes, arriving on `ifindex`. probe.bpf.c asks it too, so a
 * health check takes the route clients' packets take. */
static __always_inline void fib_params_outer(struct bpf_fib_lookup *fib, __be32 src, __be32 dst,
					     __u16 outer_len, __u32 ifindex)
{
	fib->family = AF_INET;
	fib->l4_protocol = IPPROTO_IPIP;
	fib->tot_len = outer_len;
	fib->ipv4_src = src;
	fib->ipv4_dst = dst;
	fib->ifindex = ifindex;
}

/* Fills the next-hop cache entry for `dst` from the FIB. Returns the FIB
 * verdict for a packet of `outer_len` bytes. */
static __always_inline int resolve(struct xdp_md *ctx, struct weir_nexthop *nh,
				   __be32 src, __be32 dst, __u16 outer_len, __u32 *mtu)
{
	struct bpf_fib_lookup fib = {};
	int rc;

	fib_params_outer(&fib, src, dst, outer_len, ctx->ingress_ifindex);
	count(WEIR_CNT_FIB_LOOKUP);
	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		*mtu = fib.mtu_result;
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return rc;

	nh->egress_ifindex = fib.ifindex;
	__builtin_memcpy(nh->dmac, fib.dmac, ETH_ALEN);
	__builtin_memcpy(nh->smac, fib.smac, ETH_ALEN);
	/* The FIB reports the route MTU only when a packet exceeds it: ask
	 * once more with the largest size to learn it for the cache. */
	fib_params_outer(&fib, src, dst, 0xffff, ctx->ingress_ifindex);
	nh->mtu = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) == BPF_FIB_LKUP_RET_FRAG_NEEDED ?
		fib.mtu_result : 0xffff;
	nh->daddr = dst;
	nh->ingress_ifindex = ctx->ingress_ifindex;
	nh->expires_jiffies = bpf_jiffies64() + weir_nexthop_ttl_jiffies;
	return BPF_FIB_LKUP_RET_SUCCESS;
}

/* The cache entry resolves `dst` for this ingress device and expires
 * within one TTL from now. A deadline further away than that is stale too:
 * an entry a different clock wrote (nanoseconds, before the cache counted
 * in jiffies) must not live on. */
static __always_inline int nexthop_fresh(const struct weir_nexthop *nh, struct xdp_md *ctx, __be32 dst)
{
	return nh->daddr == dst && nh->ingress_ifindex == ctx->ingress_ifindex &&
	       nh->expires_jiffies - bpf_jiffies64() - 1 < weir_nexthop_ttl_jiffies;
}

/* Sends the encapsulated packet to its next hop, from the cache when it is
 * fresh, else from the FIB. WEIR_TOO_BIG, with the route MTU in `mtu`,
 * when it does not fit. */
static __always_inline int transmit(struct xdp_md *ctx, __u32 backend_id, __be32 src, __be32 dst,
				    __u32 *mtu)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *outer = (void *)(eth + 1);
	__u32 slot = backend_id % WEIR_NEXTHOP_SLOTS;
	struct weir_nexthop *nh;
	__u16 outer_len;
	int rc;

	if (!within(outer, sizeof(*outer), data_end))
		return drop(WEIR_CNT_DROP_ADJUST_HEAD);
	nh = bpf_map_lookup_elem(&weir_nexthop, &slot);
	if (!nh)
		return drop(WEIR_CNT_DROP_NO_ROUTE);
	outer_len = bpf_ntohs(outer->tot_len);

	if (!nexthop_fresh(nh, ctx, dst)) {
		rc = resolve(ctx, nh, src, dst, outer_len, mtu);
		switch (rc) {
		case BPF_FIB_LKUP_RET_SUCCESS:
			break;
		case BPF_FIB_LKUP_RET_NO_NEIGH:
			/* The kernel forwards the encapsulated packet and
			 * resolves the neighbour; a later packet takes the
			 * fast path. */
			return pass(WEIR_CNT_PASS_NO_NEIGH);
		case BPF_FIB_LKUP_RET_FRAG_NEEDED:
			return WEIR_TOO_BIG;
		default:
			return drop(WEIR_CNT_DROP_NO_ROUTE);
		}
	} else if (outer_len > nh->mtu) {
		*mtu = nh->mtu;
		return WEIR_TOO_BIG;
	}

	__builtin_memcpy(eth->h_dest, nh->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, nh->smac, ETH_ALEN);
	if (nh->egress_ifindex == ctx->ingress_ifindex) {
		count(WEIR_CNT_TX);
		return XDP_TX;
	}
	count(WEIR_CNT_REDIRECT);
	return bpf_redirect(nh->egress_ifindex, 0);
}

#endif /* WEIR_NEXTHOP_H */
