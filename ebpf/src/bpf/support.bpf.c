// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Two trivial XDP programs that support the balancer rather than balance.
 *
 * weir_veth_peer: attach it to the far end of a veth that the balancer's
 * XDP_TX sends into. veth queues XDP_TX frames to its peer but only wakes
 * the peer's NAPI when the peer itself runs an XDP program; with GRO alone
 * the frames sit in the ring until it overflows. The program passes every
 * packet on to the stack.
 *
 * weir_tx_floor: returns XDP_TX and does nothing else. The bench times it
 * in the same BPF_PROG_RUN loop as the balancer to report the floor.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("xdp.frags")
int weir_veth_peer(struct xdp_md *ctx)
{
	return XDP_PASS;
}

SEC("xdp")
int weir_tx_floor(struct xdp_md *ctx)
{
	return XDP_TX;
}
