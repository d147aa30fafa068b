/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Encapsulation: the outer IPv4 header (IPIP) that carries the client's
 * packet, unchanged, to the backend. Backends are IPv4, so the outer header
 * is too; the client's family sets the outer header's protocol (IPv4 only,
 * so far: parse.h passes every other family to the kernel).
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
	/* Never fragmented on the way (an oversized packet is answered with
	 * ICMP instead), so the id can stay 0. */
	ipv4_header_write(outer, pkt->tos, pkt->l3_len + sizeof(*outer), IP_DF, protocol, src,
			  dst);
	return 0;
}

#endif /* WEIR_ENCAP_H */
