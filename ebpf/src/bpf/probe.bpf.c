// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * weir's probe path, run at tc egress of `lo` on the LB host.
 *
 * With direct server return, a check of a backend's own address proves
 * little: clients need its VIP listener and its decapsulation. The agent
 * checks an L4 backend by connecting to the service's VIP:port with the
 * socket mark WEIR_PROBE_MARK_BASE + the backend's id. `weir attach` adds a
 * policy rule that routes marked packets to `lo` (a local VIP goes there
 * anyway), so this one hook sees every probe whether or not the VIP is a
 * local address. The program puts the outer header weir_lb gives a
 * client's packet (encap.h) in front of it, addressed to that backend, and
 * sends it out of the interface the FIB names, bpf_redirect_neigh
 * resolving the next hop. The backend answers from the VIP straight to the
 * LB's address, which weir_lb passes to the stack (no service listens
 * there). So a backend with no decap or no VIP listener fails its check.
 *
 * Unmarked packets pass untouched: the mark test comes first.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>

#define WEIR_PROBE_MAPS
#include "weir_abi.h"
#include "parse.h"
#include "pick.h"
#include "encap.h"
#include "nexthop.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Ethernet, a 20-byte IPv4 header and TCP: what the program reads. */
#define WEIR_PROBE_HEADERS \
	(sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct tcphdr))

static __always_inline void probe_count(enum weir_probe_counter counter)
{
	__u64 *value = bpf_map_lookup_elem(&weir_probe_stats, &counter);

	if (value)
		*value += 1;
}

static __always_inline int probe_drop(enum weir_probe_counter reason)
{
	probe_count(reason);
	return TC_ACT_SHOT;
}

/* The interface the FIB sends `dst` out of, for an encapsulated packet of
 * `outer_len` bytes (0: a GSO packet, whose segments the route MTU already
 * bounds through the MSS). A negative weir_probe_counter when it cannot go. */
static __always_inline int egress_ifindex(struct __sk_buff *skb, __be32 src, __be32 dst,
					  __u16 outer_len)
{
	struct bpf_fib_lookup fib = {};
	int rc;

	fib_params_outer(&fib, src, dst, outer_len, skb->ifindex);
	/* An input-style lookup with mark 0: the probe rule does not match,
	 * so this is the route clients' packets take to the backend.
	 * bpf_redirect_neigh resolves the neighbour itself. */
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return -WEIR_PROBE_DROP_TOO_BIG;
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return -WEIR_PROBE_DROP_NO_ROUTE;
	return fib.ifindex;
}

SEC("classifier")
int weir_probe(struct __sk_buff *skb)
{
	__u32 mark = skb->mark;
	__u32 id = mark - WEIR_PROBE_MARK_BASE;
	struct weir_service_key key = {};
	struct weir_lb_config *cfg;
	struct weir_service *svc;
	struct weir_backend *be;
	void *data, *data_end;
	struct iphdr *ip, *outer;
	struct tcphdr *tcp;
	__be32 src, dst;
	__u16 inner_len;
	__u32 cfg_key = 0;
	__u8 tos;
	int ifindex;

	if ((mark & WEIR_PROBE_MARK_MASK) != WEIR_PROBE_MARK_BASE)
		return TC_ACT_OK;

	be = bpf_map_lookup_elem(&weir_backends, &id);
	if (!be || !serves_flows(be))
		return probe_drop(WEIR_PROBE_DROP_UNKNOWN_BACKEND);

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (!within(data, WEIR_PROBE_HEADERS, data_end)) {
		if (bpf_skb_pull_data(skb, WEIR_PROBE_HEADERS))
			return probe_drop(WEIR_PROBE_DROP_MALFORMED);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	if (!within(data, WEIR_PROBE_HEADERS, data_end) ||
	    ((struct ethhdr *)data)->h_proto != bpf_htons(ETH_P_IP))
		return probe_drop(WEIR_PROBE_DROP_MALFORMED);
	ip = data + sizeof(struct ethhdr);
	tcp = (void *)(ip + 1);
	if (!ipv4_well_formed(ip) || ipv4_has_options(ip) || ipv4_is_fragment(ip) ||
	    ip->protocol != IPPROTO_TCP)
		return probe_drop(WEIR_PROBE_DROP_MALFORMED);

	/* The service the probe is addressed to, as weir_lb finds it for a
	 * client: the check is of this backend in this service. */
	key.vip = ip->daddr;
	key.port = tcp->dest;
	key.proto = IPPROTO_TCP;
	svc = bpf_map_lookup_elem(&weir_services, &key);
	if (!svc)
		return probe_drop(WEIR_PROBE_DROP_NO_SERVICE);
	if (svc->mode != WEIR_MODE_L4)
		return probe_drop(WEIR_PROBE_DROP_NOT_L4);
	if (svc->id != be->service_id)
		return probe_drop(WEIR_PROBE_DROP_OTHER_SERVICE);

	cfg = bpf_map_lookup_elem(&weir_config, &cfg_key);
	if (!cfg || !cfg->lb_addr)
		return probe_drop(WEIR_PROBE_DROP_NO_CONFIG);
	src = cfg->lb_addr;
	if (ip->saddr != src)
		return probe_drop(WEIR_PROBE_DROP_SOURCE);
	dst = be->addr;
	tos = ip->tos;
	inner_len = bpf_ntohs(ip->tot_len);
	if (inner_len > 0xffff - WEIR_IPIP_OVERHEAD)
		return probe_drop(WEIR_PROBE_DROP_TOO_BIG);

	ifindex = egress_ifindex(skb, src, dst,
				 skb->gso_size ? 0 : inner_len + WEIR_IPIP_OVERHEAD);
	if (ifindex < 0)
		return probe_drop(-ifindex);

	if (bpf_skb_adjust_room(skb, sizeof(struct iphdr), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV4))
		return probe_drop(WEIR_PROBE_DROP_NO_ROOM);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	outer = data + sizeof(struct ethhdr);
	if (!within(outer, sizeof(*outer), data_end))
		return probe_drop(WEIR_PROBE_DROP_NO_ROOM);
	outer_header_write(outer, IPPROTO_IPIP, tos, inner_len, src, dst);
	/* The route to the backend must not take the probe rule (back to lo). */
	skb->mark = 0;
	probe_count(WEIR_PROBE_ENCAPSULATED);
	return bpf_redirect_neigh(ifindex, NULL, 0, 0);
}
