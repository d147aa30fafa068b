// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * weir's L4 balancer, run at XDP on the LB host.
 *
 * One path per packet, a stage per header:
 *   parse.h         Ethernet, IPv4, TCP into a struct weir_packet that
 *                   carries the address family (IPv4 only, so far)
 *   pick.h          the backend: the flow's entry in weir_flows, else the
 *                   service's Maglev ring (SYN, or a flow we have not seen)
 *   encap.h         the outer IPv4 header (IPIP) addressed to the backend
 *   nexthop.h       the next hop from a per-CPU cache of bpf_fib_lookup
 *                   results, MAC rewrite, XDP_TX or redirect
 *   icmp_too_big.h  a packet that no longer fits the route once
 *                   encapsulated is answered with ICMP "fragmentation
 *                   needed", as a router would, so the client's path MTU
 *                   discovery works through weir
 * Anything weir does not balance goes to the kernel untouched, and every
 * verdict is counted (verdict.h).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define WEIR_LB_MAPS
#include "weir_abi.h"
#include "verdict.h"
#include "parse.h"
#include "pick.h"
#include "encap.h"
#include "nexthop.h"
#include "icmp_too_big.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Counts the packet against its service and backend once it is on its way
 * to the backend (sent, or handed to the kernel to forward). */
static __always_inline void count_forwarded(const struct weir_packet *pkt,
					    const struct weir_pick *pick)
{
	struct weir_backend_stats *be_stats;

	be_stats = bpf_map_lookup_elem(&weir_be_stats, &pick->backend_id);
	if (pick->new_flow) {
		count(WEIR_CNT_FLOW_NEW);
		if (pick->svc_stats)
			pick->svc_stats->new_flows += 1;
		if (be_stats)
			be_stats->new_flows += 1;
	}
	if (pick->svc_stats) {
		pick->svc_stats->packets += 1;
		pick->svc_stats->bytes += pkt->l3_len;
	}
	if (be_stats) {
		be_stats->packets += 1;
		be_stats->bytes += pkt->l3_len;
	}
}

/* Encapsulates the packet to the picked backend and sends it. */
static __always_inline int forward(struct xdp_md *ctx, const struct weir_packet *pkt,
				   const struct weir_pick *pick)
{
	struct weir_lb_config *cfg;
	__u32 cfg_key = 0;
	__be32 lb_addr, dst = pick->be->addr;
	__u32 mtu = 0;
	int verdict;

	cfg = bpf_map_lookup_elem(&weir_config, &cfg_key);
	if (!cfg || !cfg->lb_addr)
		return pass(WEIR_CNT_PASS_NO_CONFIG);
	lb_addr = cfg->lb_addr;

	if (pkt->l3_len > 0xffff - WEIR_IPIP_OVERHEAD)
		return drop(WEIR_CNT_DROP_FRAG_NEEDED);
	if (encapsulate(ctx, pkt, lb_addr, dst))
		return drop(WEIR_CNT_DROP_ADJUST_HEAD);
	verdict = transmit(ctx, pick->backend_id, lb_addr, dst, &mtu);
	if (verdict == WEIR_TOO_BIG)
		return too_big(ctx, pkt, mtu);
	/* Dropped packets count only as drops. */
	if (verdict != XDP_DROP)
		count_forwarded(pkt, pick);
	return verdict;
}

/* xdp.frags: only the linear headers are read, so multi-buffer frames are
 * safe, and the kernel then lets the program run on jumbo-MTU devices. */
SEC("xdp.frags")
int weir_lb(struct xdp_md *ctx)
{
	struct weir_packet pkt = {};
	struct weir_pick pick;
	__u32 reason;
	int verdict;

	reason = parse_packet(ctx, &pkt);
	if (reason != WEIR_PARSED)
		return pass(reason);
	verdict = pick_backend(&pkt, &pick);
	if (verdict != WEIR_PICKED)
		return verdict;
	return forward(ctx, &pkt, &pick);
}
