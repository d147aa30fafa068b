/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The answer to a packet that no longer fits the route once encapsulated:
 * ICMP "fragmentation needed" to the client, as a router would send, so
 * the client's path MTU discovery works through weir. Rate-limited per CPU
 * (weir_icmp_bucket). Include weir_abi.h with WEIR_LB_MAPS defined first.
 */
#ifndef WEIR_ICMP_TOO_BIG_H
#define WEIR_ICMP_TOO_BIG_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "weir_abi.h"
#include "ipv4_header.h"
#include "parse.h"
#include "verdict.h"

#define WEIR_NS_PER_ICMP (1000000000ULL / WEIR_ICMP_RATE)
/* <linux/icmp.h> pulls in libc headers a BPF target does not have. */
#define ICMP_DEST_UNREACH 3
#define ICMP_FRAG_NEEDED 4

/* ICMP destination unreachable, "fragmentation needed" (RFC 1191). */
struct icmp_frag_needed {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be16 unused;
	__be16 mtu; /* next-hop MTU */
};

/* Takes one reply's worth of credit from this CPU's ICMP bucket; false
 * when there is not enough. */
static __always_inline int icmp_credit_taken(void)
{
	struct weir_icmp_bucket *b;
	__u32 key = 0;
	__u64 now, credit;

	b = bpf_map_lookup_elem(&weir_icmp_bucket, &key);
	if (!b)
		return 0;
	now = bpf_ktime_get_coarse_ns();
	credit = b->credit_ns + (now - b->updated_ns);
	if (credit > WEIR_ICMP_BURST * WEIR_NS_PER_ICMP)
		credit = WEIR_ICMP_BURST * WEIR_NS_PER_ICMP;
	b->updated_ns = now;
	if (credit < WEIR_NS_PER_ICMP) {
		b->credit_ns = credit;
		return 0;
	}
	b->credit_ns = credit - WEIR_NS_PER_ICMP;
	return 1;
}

/* The encapsulated packet (eth | outer | inner IPv4 | TCP ...) does not fit
 * the route MTU `mtu`. Rewrites it in place into ICMP "fragmentation
 * needed" from the VIP to the client, quoting the client's IPv4 header and
 * the first 8 bytes after it, with next-hop MTU `mtu` minus the
 * encapsulation, and sends it back out the way it came. Only for packets
 * with DF, and only within this CPU's ICMP rate; anything else drops. */
static __always_inline int frag_needed_ipv4(struct xdp_md *ctx, const struct weir_packet *pkt,
					    __u32 mtu)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	/* The reply's IPv4 header replaces the outer one; the ICMP header
	 * is extra. */
	const int extra = sizeof(struct icmp_frag_needed);
	__u8 client_mac[ETH_ALEN], own_mac[ETH_ALEN];
	struct ethhdr *eth = data;
	struct iphdr *inner = data + sizeof(*eth) + sizeof(struct iphdr);
	struct icmp_frag_needed *icmp;
	struct iphdr *ip;
	__u32 len;

	if (!within(inner, sizeof(*inner), data_end))
		return drop(WEIR_CNT_DROP_ADJUST_HEAD);
	if (!(inner->frag_off & bpf_htons(IP_DF)))
		return drop(WEIR_CNT_ICMP_NOT_DF);
	if (!icmp_credit_taken())
		return drop(WEIR_CNT_ICMP_RATE_LIMITED);
	/* The received addresses: the reply goes back to the sender's hop. */
	__builtin_memcpy(client_mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(own_mac, eth->h_dest, ETH_ALEN);

	/* The quoted bytes stay where they are; the rest is cut off. */
	if (bpf_xdp_adjust_head(ctx, -extra))
		return drop(WEIR_CNT_DROP_ADJUST_HEAD);
	len = bpf_xdp_get_buff_len(ctx);
	if (len < WEIR_ICMP_FRAME_LEN ||
	    bpf_xdp_adjust_tail(ctx, WEIR_ICMP_FRAME_LEN - (int)len))
		return drop(WEIR_CNT_DROP_ADJUST_HEAD);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (!within(data, WEIR_ICMP_FRAME_LEN, data_end))
		return drop(WEIR_CNT_DROP_ADJUST_HEAD);
	eth = data;
	ip = (void *)(eth + 1);
	icmp = (void *)(ip + 1);

	__builtin_memcpy(eth->h_dest, client_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, own_mac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	ipv4_header_write(ip, 0, WEIR_ICMP_FRAME_LEN - sizeof(*eth), 0, IPPROTO_ICMP,
			  pkt->flow.daddr, pkt->flow.saddr);
	icmp->type = ICMP_DEST_UNREACH;
	icmp->code = ICMP_FRAG_NEEDED;
	icmp->checksum = 0;
	icmp->unused = 0;
	icmp->mtu = bpf_htons(mtu > WEIR_IPIP_OVERHEAD ? mtu - WEIR_IPIP_OVERHEAD : 0);
	/* The ICMP message: its header and the quoted 28 bytes. */
	icmp->checksum = inet_checksum(icmp, (sizeof(*icmp) + sizeof(struct iphdr) + 8) / 2);
	count(WEIR_CNT_ICMP_FRAG_NEEDED);
	return XDP_TX;
}

/* The packet is too big for the route once encapsulated: counted as not
 * forwarded, and answered the way the client's family expects. */
static __always_inline int too_big(struct xdp_md *ctx, const struct weir_packet *pkt, __u32 mtu)
{
	count(WEIR_CNT_DROP_FRAG_NEEDED);
	switch (pkt->family) {
	case AF_INET:
		return frag_needed_ipv4(ctx, pkt, mtu);
	default:
		return XDP_DROP;
	}
}

#endif /* WEIR_ICMP_TOO_BIG_H */
