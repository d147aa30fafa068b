/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Picking the backend: an established packet follows its entry in
 * weir_flows, whatever the ring says now; a SYN, or a packet with no usable
 * entry, asks its service's Maglev ring and records the answer. Packets
 * for no service or for an L7 service go to the kernel. Include weir_abi.h
 * with WEIR_LB_MAPS defined first.
 */
#ifndef WEIR_PICK_H
#define WEIR_PICK_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "weir_abi.h"
#include "parse.h"
#include "verdict.h"

/* pick_backend(): `pick` names the backend to forward to. Any other
 * result is the packet's XDP verdict, already counted. */
#define WEIR_PICKED (-1)

/* The backend a packet goes to. */
struct weir_pick {
	struct weir_backend *be;
	struct weir_service_stats *svc_stats; /* NULL if the lookup failed */
	__u32 backend_id;
	int new_flow; /* counts as a new flow once forwarded */
};

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
 * draining and removed ones keep the flows they have. Health plays no part:
 * a live connection to a backend that fails its check is not weir's to cut. */
static __always_inline int serves_flows(const struct weir_backend *be)
{
	return be->state == WEIR_BACKEND_ACTIVE ||
	       be->state == WEIR_BACKEND_DRAINING ||
	       be->state == WEIR_BACKEND_REMOVED;
}

/* The backend `pkt` goes to, into `pick`: WEIR_PICKED, or the verdict for
 * a packet weir does not forward. */
static __always_inline int pick_backend(const struct weir_packet *pkt, struct weir_pick *pick)
{
	struct weir_service_key svc_key = {};
	struct weir_service *svc;
	__u32 *known;

	/* Established packets follow their flow entry, whatever the ring says
	 * now. Only L4 services create entries, and a backend slot is not reused
	 * while an entry names it, so a live entry is all this path needs. A
	 * SYN always asks the ring: a reused 5-tuple starts fresh. */
	if (!pkt->syn) {
		known = bpf_map_lookup_elem(&weir_flows, &pkt->flow);
		if (known) {
			pick->backend_id = *known;
			pick->be = bpf_map_lookup_elem(&weir_backends, &pick->backend_id);
			if (pick->be && serves_flows(pick->be)) {
				pick->svc_stats = bpf_map_lookup_elem(&weir_svc_stats,
								      &pick->be->service_id);
				pick->new_flow = 0;
				return WEIR_PICKED;
			}
			count(WEIR_CNT_FLOW_STALE);
		}
	}

	svc_key.vip = pkt->flow.daddr;
	svc_key.port = pkt->flow.dport;
	svc_key.proto = IPPROTO_TCP;
	svc = bpf_map_lookup_elem(&weir_services, &svc_key);
	if (!svc)
		return pass(WEIR_CNT_PASS_NO_SERVICE);
	pick->svc_stats = bpf_map_lookup_elem(&weir_svc_stats, &svc->id);
	if (svc->mode != WEIR_MODE_L4) {
		if (pick->svc_stats)
			pick->svc_stats->passed_l7 += 1;
		return pass(WEIR_CNT_PASS_L7);
	}

	pick->backend_id = ring_backend(svc, &pkt->flow);
	if (pick->backend_id == WEIR_NO_BACKEND) {
		if (pick->svc_stats)
			pick->svc_stats->no_backend += 1;
		return drop(WEIR_CNT_DROP_NO_BACKEND);
	}
	pick->be = bpf_map_lookup_elem(&weir_backends, &pick->backend_id);
	if (!pick->be || pick->be->state != WEIR_BACKEND_ACTIVE)
		return drop(WEIR_CNT_DROP_BAD_RING);
	if (!pkt->syn) {
		count(WEIR_CNT_FLOW_MISS);
		if (pick->svc_stats)
			pick->svc_stats->flow_misses += 1;
	}
	pick->new_flow = record_flow(&pkt->flow, pick->backend_id, pick->svc_stats, pkt->syn);
	return WEIR_PICKED;
}

#endif /* WEIR_PICK_H */
