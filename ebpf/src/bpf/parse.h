/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Parsing: from the received frame to a struct weir_packet, the packet as
 * every later stage of weir_lb sees it. The address family is decided here,
 * from the Ethernet type, and travels in the packet: IPv4 is the only
 * family parsed so far; anything else passes to the kernel as
 * WEIR_CNT_PASS_NOT_IPV4.
 *
 * The header checks (within(), ipv4_*()) are shared with decap.bpf.c, which
 * reads the same Ethernet and IPv4 headers and counts with its own
 * counters; parsing itself counts nothing, it says why a packet passes.
 */
#ifndef WEIR_PARSE_H
#define WEIR_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "weir_abi.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#define IP_MF 0x2000
#define IP_DF 0x4000
#define IP_OFFSET 0x1fff

/* parse_packet(): the packet is one weir may balance. Any other result is
 * the weir_counter saying why it goes to the kernel. */
#define WEIR_PARSED WEIR_CNT_MAX

/* A packet weir may balance, as received. */
struct weir_packet {
	struct weir_flow_key flow; /* also its key in weir_flows */
	__u16 l3_len;              /* IP packet length, header included */
	__u8 family;               /* AF_INET, the only one parsed so far */
	__u8 tos;                  /* copied to the outer header */
	__u8 syn;                  /* SYN without ACK: a new connection */
};

/* The linear part of the packet holds `len` bytes from `at`. */
static __always_inline int within(const void *at, __u64 len, const void *data_end)
{
	return at + len <= data_end;
}

static __always_inline int ipv4_well_formed(const struct iphdr *ip)
{
	return ip->version == 4 && ip->ihl >= 5;
}

static __always_inline int ipv4_has_options(const struct iphdr *ip)
{
	return ip->ihl != 5;
}

/* A fragment (first or later): only a whole datagram has its ports. */
static __always_inline int ipv4_is_fragment(const struct iphdr *ip)
{
	return ip->frag_off & bpf_htons(IP_MF | IP_OFFSET);
}

/* The `len`-byte IP packet at `l3` runs past the frame. It may continue in
 * the fragments of a multi-buffer frame: only then is the (slower)
 * whole-frame length needed. */
static __always_inline int l3_truncated(struct xdp_md *ctx, void *l3, __u16 len, void *data_end)
{
	return l3 + len > data_end && len > bpf_xdp_get_buff_len(ctx) - sizeof(struct ethhdr);
}

/* The TCP header at `l4`, `l4_len` bytes of IP payload. */
static __always_inline __u32 parse_tcp(void *l4, void *data_end, __u32 l4_len,
				       struct weir_packet *pkt)
{
	struct tcphdr *tcp = l4;

	if (!within(tcp, sizeof(*tcp), data_end) || l4_len < sizeof(*tcp))
		return WEIR_CNT_PASS_TRUNCATED;
	pkt->flow.sport = tcp->source;
	pkt->flow.dport = tcp->dest;
	pkt->flow.proto = IPPROTO_TCP;
	pkt->syn = tcp->syn && !tcp->ack;
	return WEIR_PARSED;
}

/* IP options and fragments are left to the kernel: weir_lb reads only
 * plain, whole TCP datagrams. */
static __always_inline __u32 parse_ipv4(struct xdp_md *ctx, void *l3, void *data_end,
					struct weir_packet *pkt)
{
	struct iphdr *ip = l3;
	__u16 len;

	if (!within(ip, sizeof(*ip), data_end))
		return WEIR_CNT_PASS_TRUNCATED;
	if (!ipv4_well_formed(ip))
		return WEIR_CNT_PASS_BAD_IHL;
	if (ipv4_has_options(ip))
		return WEIR_CNT_PASS_IP_OPTIONS;
	len = bpf_ntohs(ip->tot_len);
	if (len < sizeof(*ip))
		return WEIR_CNT_PASS_BAD_IHL;
	if (l3_truncated(ctx, ip, len, data_end))
		return WEIR_CNT_PASS_TRUNCATED;
	if (ipv4_is_fragment(ip))
		return WEIR_CNT_PASS_FRAGMENT;
	if (ip->protocol != IPPROTO_TCP)
		return WEIR_CNT_PASS_NOT_TCP;
	pkt->flow.saddr = ip->saddr;
	pkt->flow.daddr = ip->daddr;
	pkt->l3_len = len;
	pkt->tos = ip->tos;
	return parse_tcp(ip + 1, data_end, len - sizeof(*ip), pkt);
}

/* Fills `pkt` from the frame: WEIR_PARSED, or why the packet passes. */
static __always_inline __u32 parse_packet(struct xdp_md *ctx, struct weir_packet *pkt)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if (!within(eth, sizeof(*eth), data_end))
		return WEIR_CNT_PASS_TRUNCATED;
	/* The Ethernet type decides the family. */
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		pkt->family = AF_INET;
		return parse_ipv4(ctx, eth + 1, data_end, pkt);
	}
	return WEIR_CNT_PASS_NOT_IPV4;
}

#endif /* WEIR_PARSE_H */
