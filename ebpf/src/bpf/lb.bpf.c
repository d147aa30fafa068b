// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * weir's L4 balancer, run at XDP on the LB host.
 *
 * One path per packet: parse Ethernet/IPv4/TCP, look the destination up in
 * weir_services, take the backend from weir_flows (established) or from the
 * service's Maglev ring (SYN, or a flow we have not seen), wrap the packet in
 * an outer IPv4 header (IPIP) addressed to the backend, take the next hop
 * from a per-CPU cache of bpf_fib_lookup results and send it back out.
 * A packet that no longer fits the route once encapsulated is answered
 * with ICMP "fragmentation needed", as a router would, so the client's
 * path MTU discovery works through weir. Anything weir does not balance
 * goes to the kernel untouched, and every verdict is counted.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>

#define WEIR_LB_MAPS
#include "weir_abi.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#define IP_MF 0x2000
#define IP_DF 0x4000
#define IP_OFFSET 0x1fff
#define WEIR_OUTER_TTL 64
/* transmit(): the packet does not fit the route MTU. */
#define WEIR_TOO_BIG (-1)
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

char LICENSE[] SEC("license") = "Dual BSD/GPL";

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

static __always_inline int is_new_connection(const struct tcphdr *tcp)
{
	return tcp->syn && !tcp->ack;
}

static __always_inline int is_fragment(const struct iphdr *ip)
{
	return ip->frag_off & bpf_htons(IP_MF | IP_OFFSET);
}

/* Pick the ring's backend for this flow. WEIR_NO_BACKEND when the service
 * has no table yet or its table is empty. */
static __always_inline __u32 ring_backend(const struct weir_service *svc,
					  const struct weir_flow_key *flow)
{
	__u32 slot, *id;
	void *ring;

	if (svc->ring_size == 0)
		return WEIR_NO_BACKEND;
	ring = bpf_map_lookup_elem(&weir_rings, &svc->id);
	if (!ring)
		return WEIR_NO_BACKEND;
	slot = weir_flow_hash(flow) % svc->ring_size;
	id = bpf_map_lookup_elem(ring, &slot);
	if (!id)
		return WEIR_NO_BACKEND;
	return *id;
}

/* Records flow -> backend. Returns whether this is a new flow (a SYN that
 * found no entry, or one for another backend); a repeated SYN for the same
 * backend is not. The common case, a new flow, costs one insert. */
static __always_inline int record_flow(const struct weir_flow_key *flow, __u32 backend_id,
				       struct weir_service_stats *svc_stats, int syn)
{
	__u32 *prev;

	if (!bpf_map_update_elem(&weir_flows, flow, &backend_id, BPF_NOEXIST))
		return syn;
	prev = bpf_map_lookup_elem(&weir_flows, flow);
	if (prev && *prev == backend_id) {
		if (syn && svc_stats)
			svc_stats->syn_repeats += 1;
		return 0;
	}
	if (bpf_map_update_elem(&weir_flows, flow, &backend_id, BPF_ANY))
		count(WEIR_CNT_FLOW_UPDATE_FAIL);
	return syn;
}

/* A backend slot that still carries traffic: active ones take new flows,
 * draining and removed ones keep the flows they have. */
static __always_inline int serves_flows(const struct weir_backend *be)
{
	return be->state == WEIR_BACKEND_ACTIVE ||
	       be->state == WEIR_BACKEND_DRAINING ||
	       be->state == WEIR_BACKEND_REMOVED ||
	       be->state == WEIR_BACKEND_DOWN;
}

static __always_inline __u16 ipv4_checksum(const struct iphdr *ip)
{
	const __u16 *word = (const __u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
		sum += word[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* Prepend the outer IPv4 header. On success the packet is
 * eth | outer ip | inner ip | tcp ..., still with the received Ethernet
 * addresses; transmit() puts the next hop's in. */
static __always_inline int encapsulate(struct xdp_md *ctx, __be32 src, __be32 dst,
				       __u8 tos, __u16 inner_len)
{
	struct ethhdr *eth;
	struct iphdr *outer;
	void *data, *data_end;

	if (bpf_xdp_adjust_head(ctx, 0 - (int)sizeof(struct iphdr)))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	outer = (void *)(eth + 1);
	if ((void *)(outer + 1) > data_end)
		return -1;

	/* Keep the received addresses until the next hop is known: a packet
	 * handed to the kernel must still be addressed to this host. The old
	 * header sits right behind the new one. */
	__builtin_memcpy(eth, (void *)eth + sizeof(*outer), 2 * ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	outer->version = 4;
	outer->ihl = sizeof(*outer) / 4;
	outer->tos = tos;
	outer->tot_len = bpf_htons(inner_len + sizeof(*outer));
	/* Never fragmented on the way (an oversized packet is answered with
	 * ICMP instead), so the id can stay 0. */
	outer->id = 0;
	outer->frag_off = bpf_htons(IP_DF);
	outer->ttl = WEIR_OUTER_TTL;
	outer->protocol = IPPROTO_IPIP;
	outer->check = 0;
	outer->saddr = src;
	outer->daddr = dst;
	outer->check = ipv4_checksum(outer);
	return 0;
}

/* Fills the next-hop cache entry for `dst` from the FIB. Returns the FIB
 * verdict for a packet of `outer_len` bytes. */
static __always_inline int resolve(struct xdp_md *ctx, struct weir_nexthop *nh,
				   __be32 src, __be32 dst, __u16 outer_len, __u32 *mtu)
{
	struct bpf_fib_lookup fib = {};
	int rc;

	fib.family = AF_INET;
	fib.l4_protocol = IPPROTO_IPIP;
	fib.tot_len = outer_len;
	fib.ipv4_src = src;
	fib.ipv4_dst = dst;
	fib.ifindex = ctx->ingress_ifindex;
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
	fib.family = AF_INET;
	fib.tot_len = 0xffff;
	fib.ipv4_src = src;
	fib.ipv4_dst = dst;
	fib.ifindex = ctx->ingress_ifindex;
	nh->mtu = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) == BPF_FIB_LKUP_RET_FRAG_NEEDED ?
		fib.mtu_result : 0xffff;
	nh->daddr = dst;
	nh->ingress_ifindex = ctx->ingress_ifindex;
	nh->expires_ns = bpf_ktime_get_coarse_ns() + WEIR_NEXTHOP_TTL_NS;
	return BPF_FIB_LKUP_RET_SUCCESS;
}

static __always_inline int nexthop_fresh(const struct weir_nexthop *nh, struct xdp_md *ctx, __be32 dst)
{
	return nh->daddr == dst && nh->ingress_ifindex == ctx->ingress_ifindex &&
	       bpf_ktime_get_coarse_ns() < nh->expires_ns;
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

	if ((void *)(outer + 1) > data_end)
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

/* Takes one reply's worth of credit from this CPU's ICMP bucket; false
 * when there is not enough. */
static __always_inline int icmp_allowed(void)
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

/* The Internet checksum of the ICMP message of a reply: its 8-byte header
 * and the 28 quoted bytes. */
static __always_inline __u16 icmp_checksum(const __u16 *word)
{
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < (int)((sizeof(struct icmp_frag_needed) + sizeof(struct iphdr) + 8) / 2); i++)
		sum += word[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* The encapsulated packet (eth | outer | inner IPv4 | TCP ...) does not fit
 * the route MTU `mtu`. Rewrites it in place into ICMP "fragmentation
 * needed" from the VIP to the client, quoting the client's IPv4 header and
 * the first 8 bytes after it, with next-hop MTU `mtu` minus the
 * encapsulation, and sends it back out the way it came. Only for packets
 * with DF, and only within this CPU's ICMP rate; anything else drops. */
static __always_inline int too_big(struct xdp_md *ctx, __u32 mtu)
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
	__be32 client, vip;
	__u32 len;

	count(WEIR_CNT_DROP_FRAG_NEEDED);
	if ((void *)(inner + 1) > data_end)
		return drop(WEIR_CNT_DROP_ADJUST_HEAD);
	if (!(inner->frag_off & bpf_htons(IP_DF)))
		return drop(WEIR_CNT_ICMP_NOT_DF);
	if (!icmp_allowed())
		return drop(WEIR_CNT_ICMP_RATE_LIMITED);
	client = inner->saddr;
	vip = inner->daddr;
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
	if (data + WEIR_ICMP_FRAME_LEN > data_end)
		return drop(WEIR_CNT_DROP_ADJUST_HEAD);
	eth = data;
	ip = (void *)(eth + 1);
	icmp = (void *)(ip + 1);

	__builtin_memcpy(eth->h_dest, client_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, own_mac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	ip->version = 4;
	ip->ihl = sizeof(*ip) / 4;
	ip->tos = 0;
	ip->tot_len = bpf_htons(WEIR_ICMP_FRAME_LEN - sizeof(*eth));
	ip->id = 0;
	ip->frag_off = 0;
	ip->ttl = WEIR_OUTER_TTL;
	ip->protocol = IPPROTO_ICMP;
	ip->check = 0;
	ip->saddr = vip;
	ip->daddr = client;
	ip->check = ipv4_checksum(ip);
	icmp->type = ICMP_DEST_UNREACH;
	icmp->code = ICMP_FRAG_NEEDED;
	icmp->checksum = 0;
	icmp->unused = 0;
	icmp->mtu = bpf_htons(mtu > WEIR_IPIP_OVERHEAD ? mtu - WEIR_IPIP_OVERHEAD : 0);
	icmp->checksum = icmp_checksum((const __u16 *)icmp);
	count(WEIR_CNT_ICMP_FRAG_NEEDED);
	return XDP_TX;
}

/* Counts the packet, encapsulates it to `be` and sends it. */
static __always_inline int forward(struct xdp_md *ctx, __u32 backend_id, const struct weir_backend *be,
				   struct weir_service_stats *svc_stats, int new_flow, __u16 ip_len, __u8 tos)
{
	struct weir_backend_stats *be_stats;
	struct weir_lb_config *cfg;
	__u32 cfg_key = 0;
	__be32 lb_addr, dst = be->addr;
	__u32 mtu = 0;
	int verdict;

	cfg = bpf_map_lookup_elem(&weir_config, &cfg_key);
	if (!cfg || !cfg->lb_addr)
		return pass(WEIR_CNT_PASS_NO_CONFIG);
	lb_addr = cfg->lb_addr;

	if (ip_len > 0xffff - WEIR_IPIP_OVERHEAD)
		return drop(WEIR_CNT_DROP_FRAG_NEEDED);
	if (encapsulate(ctx, lb_addr, dst, tos, ip_len))
		return drop(WEIR_CNT_DROP_ADJUST_HEAD);
	verdict = transmit(ctx, backend_id, lb_addr, dst, &mtu);
	if (verdict == WEIR_TOO_BIG)
		return too_big(ctx, mtu);
	/* Sent, or handed to the kernel to forward: either way on its way to
	 * the backend, so it counts. Dropped packets count only as drops. */
	if (verdict == XDP_DROP)
		return verdict;

	be_stats = bpf_map_lookup_elem(&weir_be_stats, &backend_id);
	if (new_flow) {
		count(WEIR_CNT_FLOW_NEW);
		if (svc_stats)
			svc_stats->new_flows += 1;
		if (be_stats)
			be_stats->new_flows += 1;
	}
	if (svc_stats) {
		svc_stats->packets += 1;
		svc_stats->bytes += ip_len;
	}
	if (be_stats) {
		be_stats->packets += 1;
		be_stats->bytes += ip_len;
	}
	return verdict;
}

/* xdp.frags: only the linear headers are read, so multi-buffer frames are
 * safe, and the kernel then lets the program run on jumbo-MTU devices. */
SEC("xdp.frags")
int weir_lb(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct weir_service_stats *svc_stats;
	struct weir_service_key svc_key = {};
	struct weir_flow_key flow = {};
	struct weir_service *svc;
	struct weir_backend *be;
	struct ethhdr *eth = data;
	struct tcphdr *tcp;
	struct iphdr *ip;
	__u32 backend_id, *known;
	__u16 ip_len;
	int syn;

	if ((void *)(eth + 1) > data_end)
		return pass(WEIR_CNT_PASS_TRUNCATED);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return pass(WEIR_CNT_PASS_NOT_IPV4);

	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return pass(WEIR_CNT_PASS_TRUNCATED);
	if (ip->version != 4 || ip->ihl < 5)
		return pass(WEIR_CNT_PASS_BAD_IHL);
	if (ip->ihl != 5)
		return pass(WEIR_CNT_PASS_IP_OPTIONS);
	ip_len = bpf_ntohs(ip->tot_len);
	if (ip_len < sizeof(*ip))
		return pass(WEIR_CNT_PASS_BAD_IHL);
	/* The IP packet may continue in fragments of a multi-buffer frame:
	 * only then is the (slower) whole-frame length needed. */
	if ((void *)ip + ip_len > data_end &&
	    ip_len > bpf_xdp_get_buff_len(ctx) - sizeof(*eth))
		return pass(WEIR_CNT_PASS_TRUNCATED);
	if (is_fragment(ip))
		return pass(WEIR_CNT_PASS_FRAGMENT);
	if (ip->protocol != IPPROTO_TCP)
		return pass(WEIR_CNT_PASS_NOT_TCP);

	tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) > data_end || ip_len < sizeof(*ip) + sizeof(*tcp))
		return pass(WEIR_CNT_PASS_TRUNCATED);

	flow.saddr = ip->saddr;
	flow.daddr = ip->daddr;
	flow.sport = tcp->source;
	flow.dport = tcp->dest;
	flow.proto = IPPROTO_TCP;
	syn = is_new_connection(tcp);

	/* Established packets follow their flow entry, whatever the ring says
	 * now. Only L4 services create entries, and a backend slot is not
	 * reused while an entry names it, so a live entry is all this path
	 * needs. A SYN always asks the ring: a reused 5-tuple starts fresh. */
	if (!syn) {
		known = bpf_map_lookup_elem(&weir_flows, &flow);
		if (known) {
			backend_id = *known;
			be = bpf_map_lookup_elem(&weir_backends, &backend_id);
			if (be && serves_flows(be)) {
				svc_stats = bpf_map_lookup_elem(&weir_svc_stats, &be->service_id);
				return forward(ctx, backend_id, be, svc_stats, 0, ip_len, ip->tos);
			}
			count(WEIR_CNT_FLOW_STALE);
		}
	}

	svc_key.vip = ip->daddr;
	svc_key.port = tcp->dest;
	svc_key.proto = IPPROTO_TCP;
	svc = bpf_map_lookup_elem(&weir_services, &svc_key);
	if (!svc)
		return pass(WEIR_CNT_PASS_NO_SERVICE);
	svc_stats = bpf_map_lookup_elem(&weir_svc_stats, &svc->id);
	if (svc->mode != WEIR_MODE_L4) {
		if (svc_stats)
			svc_stats->passed_l7 += 1;
		return pass(WEIR_CNT_PASS_L7);
	}

	backend_id = ring_backend(svc, &flow);
	if (backend_id == WEIR_NO_BACKEND) {
		if (svc_stats)
			svc_stats->no_backend += 1;
		return drop(WEIR_CNT_DROP_NO_BACKEND);
	}
	be = bpf_map_lookup_elem(&weir_backends, &backend_id);
	if (!be || be->state != WEIR_BACKEND_ACTIVE)
		return drop(WEIR_CNT_DROP_BAD_RING);
	if (!syn) {
		count(WEIR_CNT_FLOW_MISS);
		if (svc_stats)
			svc_stats->flow_misses += 1;
	}
	return forward(ctx, backend_id, be, svc_stats, record_flow(&flow, backend_id, svc_stats, syn),
		       ip_len, ip->tos);
}
