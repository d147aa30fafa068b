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

/* Folds a sum of 16- and 32-bit words (at most 2^35) to the 16-bit one's
 * complement sum: 2^16 = 1 modulo 2^16 - 1, so a 32-bit word counts as
 * its two halves. */
static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* Writes a 20-byte IPv4 header (no options, id 0) and its checksum. The
 * header goes out as five 16-bit words and the two addresses, and the
 * checksum is summed from those values while they are in registers rather
 * than read back from the packet: this runs for every forwarded packet.
 * The words are in network byte order as stored; the one's complement sum
 * does not depend on the byte order as long as it is stored the same way. */
static __always_inline void ipv4_header_write(struct iphdr *ip, __u8 tos, __u16 tot_len,
					      __u16 frag_off, __u8 protocol, __be32 saddr,
					      __be32 daddr)
{
	__be16 *word = (__be16 *)ip;
	/* version 4, header length 5 words */
	__be16 version_tos = bpf_htons(0x4500 | tos);
	__be16 len = bpf_htons(tot_len);
	__be16 frag = bpf_htons(frag_off);
	__be16 ttl_protocol = bpf_htons(WEIR_TTL << 8 | protocol);

	word[0] = version_tos;
	word[1] = len;
	word[2] = 0; /* id */
	word[3] = frag;
	word[4] = ttl_protocol;
	ip->saddr = saddr;
	ip->daddr = daddr;
	ip->check = (__u16)~csum_fold((__u64)version_tos + len + frag + ttl_protocol + saddr +
				      daddr);
}

#endif /* WEIR_IPV4_HEADER_H */
