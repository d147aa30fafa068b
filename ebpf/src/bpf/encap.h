/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Encapsulation: the outer IPv4 header (IPIP) that carries the client's
 * packet, unchanged, to the backend (and, in probe.bpf.c, a health check
 * the same way). Backends are IPv4, so the outer header is too; the
 * client's family sets the outer header's protocol (IPv4 only, so far:
 * parse.h passes every other family to the kernel).
 */
#ifndef WEIR_ENCAP_H
#define WEIR_ENCAP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "ipv4_header.h"
#include "parse.h"

/* Writes the outer IPv4 header at `outer`, from `src` to `dst`, in front of
 * `inner_len` bytes of `protocol` (IPPROTO_IPIP for IPv4): what weir_lb
 * puts on a client's packet and the probe program on a health check, so a
 * check travels as clients do. Never fragmented on the way (an oversized
 * packet is answered with ICMP or dropped instead), so DF is set and the id
 * can stay 0. */
static __always_inline void outer_header_write(struct iphdr *outer, __u8 protocol, __u8 tos,
					       __u16 inner_len, __be32 src, __be32 dst)
{
	ipv4_header_write(outer, tos, inner_len + sizeof(*outer), IP_DF, protocol, src, dst);
}

/* Prepend the outer IPv4 header from `src` to `dst`. On success the packet
 * is eth | outer ip | inner ip | tcp ..., still with the received Ethernet
 * addresses; the next-hop stage puts the next hop's in. */
static __always_inline int encapsulate(struct xdp_md *ctx, const struct weir_packet *pkt,
				       __be32 src, __be32 dst)
{
	struct ethhdr *eth;
	struct iphdr *outer;
	void *data, *data_end;
	__u8 protocol;

	/* The outer header names what it carries. */
	switch (pkt->family) {
	case AF_INET:
		protocol = IPPROTO_IPIP;
		break;
	default:
		return -1;
	}
	if (bpf_xdp_adjust_head(ctx, 0 - (int)sizeof(struct iphdr)))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	outer = (void *)(eth + 1);
	if (!within(outer, sizeof(*outer), data_end))
		return -1;

	/* Keep the received addresses until the next hop is known: a packet
	 * handed to the kernel must still be addressed to this host. The old
	 * header sits right behind the new one. */
	__builtin_memcpy(eth, (void *)eth + sizeof(*outer), 2 * ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	outer_header_write(outer, protocol, pkt->tos, pkt->l3_len, src, dst);
	return 0;
}

#endif /* WEIR_ENCAP_H */
