/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The IPv4 headers weir writes itself: the IPIP outer header (encap.h) and
 * the ICMP reply's header (icmp_too_big.h), and the Internet checksum both
 * need.
 */
#ifndef WEIR_IPV4_HEADER_H
#define WEIR_IPV4_HEADER_H

#include <linux/ip.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

/* TTL of every IPv4 header weir originates. */
#define WEIR_TTL 64

/* The Internet checksum (RFC 1071) of `words` 16-bit words from `start`.
 * Callers pass a constant, so the loop unrolls. */
static __always_inline __u16 inet_checksum(const void *start, const int words)
{
	const __u16 *word = start;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < words; i++)
		sum += word[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* Writes a 20-byte IPv4 header (no options, id 0) and its checksum. */
static __always_inline void ipv4_header_write(struct iphdr *ip, __u8 tos, __u16 tot_len,
					      __u16 frag_off, __u8 protocol, __be32 saddr,
					      __be32 daddr)
{
	ip->version = 4;
	ip->ihl = sizeof(*ip) / 4;
	ip->tos = tos;
	ip->tot_len = bpf_htons(tot_len);
	ip->id = 0;
	ip->frag_off = bpf_htons(frag_off);
	ip->ttl = WEIR_TTL;
	ip->protocol = protocol;
	ip->check = 0;
	ip->saddr = saddr;
	ip->daddr = daddr;
	ip->check = inet_checksum(ip, sizeof(*ip) / 2);
}

#endif /* WEIR_IPV4_HEADER_H */
