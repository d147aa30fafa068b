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

/// Program name of the XDP balancer in [`lb_object`].
pub const LB_PROGRAM: &str = "weir_lb";
/// Program name of the decapsulator in [`decap_object`].
pub const DECAP_PROGRAM: &str = "weir_decap";
