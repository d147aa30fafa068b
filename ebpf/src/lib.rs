//! weir's kernel programs and the kernel/user ABI they share with the
//! registry.
//!
//! The programs are C (`src/bpf/*.bpf.c`), compiled by `build.rs` with clang
//! and embedded here. [`abi`] mirrors `src/bpf/weir_abi.h`; the test
//! `tests/btf_layout.rs` checks every mirrored struct against the BTF that
//! clang emitted for the header, so the two cannot drift apart.

pub mod abi;

/// Bytes aligned for the ELF parser.
#[repr(C, align(8))]
pub struct Aligned<T: ?Sized>(pub T);

static LB_OBJECT: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/lb.bpf.o")));
static DECAP_OBJECT: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/decap.bpf.o")));

/// The XDP balancer object (program `weir_lb`).
pub fn lb_object() -> &'static [u8] {
    &LB_OBJECT.0
}

/// The tc ingress decapsulation object (program `weir_decap`).
pub fn decap_object() -> &'static [u8] {
    &DECAP_OBJECT.0
}

static PROBE_OBJECT: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/probe.bpf.o")));

/// The tc egress probe object (program `weir_probe`).
pub fn probe_object() -> &'static [u8] {
    &PROBE_OBJECT.0
}

static SUPPORT_OBJECT: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/support.bpf.o")));

/// Helper programs: `weir_veth_peer` (XDP_PASS for the far end of a veth
/// that receives the balancer's XDP_TX) and `weir_tx_floor` (a bare
/// XDP_TX, the bench's floor).
pub fn support_object() -> &'static [u8] {
    &SUPPORT_OBJECT.0
}

/// Program names in [`support_object`].
pub const VETH_PEER_PROGRAM: &str = "weir_veth_peer";
pub const TX_FLOOR_PROGRAM: &str = "weir_tx_floor";

/// Program name of the XDP balancer in [`lb_object`].
pub const LB_PROGRAM: &str = "weir_lb";
/// Program name of the decapsulator in [`decap_object`].
pub const DECAP_PROGRAM: &str = "weir_decap";
/// Program name of the probe encapsulator in [`probe_object`].
pub const PROBE_PROGRAM: &str = "weir_probe";
