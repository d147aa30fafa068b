//! The probe program in the kernel, driven by BPF_PROG_RUN on crafted
//! packets leaving by `lo`: unmarked packets pass untouched, a marked one
//! goes to the backend its mark names inside the header clients' packets
//! get, and every reason not to send one is dropped and counted.

mod common;

use std::net::Ipv4Addr;

use aya::Ebpf;
use aya::programs::SchedClassifier;
use common::{TestInstance, apply, require_root};
use weir::dataplane::probe;
use weir::registry::{BackendAddr, Change, Registry, ServiceAddr, ServiceModeName};
use weir_ebpf::abi;
use weir_testbed::packet::{self, ETH_LEN, IP_LEN, Segment};
use weir_testbed::progrun::{ProgRunNetns, run_tc_marked};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const LB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
/// Routed through the namespace's next hop (see `ProgRunNetns`).
const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 10);
/// No route leads there.
const UNROUTED: Ipv4Addr = Ipv4Addr::new(198, 18, 30, 10);

/// The L4 service, another L4 service on the same VIP, and an L7 one.
const L4: u16 = 8080;
const OTHER_L4: u16 = 8081;
const L7: u16 = 9090;

fn service(port: u16) -> ServiceAddr {
    ServiceAddr { vip: VIP, port }
}

struct Bed {
    // Field order: the program goes before the registry, the instance and
    // the namespace.
    ebpf: Ebpf,
    reg: Registry,
    inst: TestInstance,
    _ns: ProgRunNetns,
}

impl Bed {
    /// Services on port 8080 (backends BACKEND and UNROUTED), 8081 and 9090
    /// (L7), one backend each; no LB address yet.
    fn new(tag: &str) -> Self {
        require_root();
        let inst = TestInstance::new(tag);
        let ns = ProgRunNetns::enter(tag);
        let mut reg = inst.registry();
        let services = [
            (L4, ServiceModeName::L4, vec![BACKEND, UNROUTED]),
            (OTHER_L4, ServiceModeName::L4, vec![BACKEND]),
            (L7, ServiceModeName::L7, vec![BACKEND]),
        ];
        for (port, mode, backends) in services {
            apply(
                &mut reg,
                Change::AddService {
                    addr: service(port),
                    mode,
                    ring_size: None,
                    max_remove_fraction: None,
                    min_backends: None,
                    panic_threshold: None,
                },
            );
            apply(
                &mut reg,
                Change::SetBackends {
                    service: service(port),
                    backends: backends
                        .into_iter()
                        .map(|addr| (BackendAddr { addr, port }, 1))
                        .collect(),
                },
            );
        }
        let ebpf = probe::load_program(&inst.instance).expect("load weir_probe");
        Self {
            ebpf,
            reg,
            inst,
            _ns: ns,
        }
    }

    fn configure(&mut self) {
        self.reg
            .maps_mut()
            .set_config(abi::LbConfig {
                lb_addr: LB_ADDR.octets(),
                flags: 0,
            })
            .unwrap();
    }

    /// The mark of a check of `addr` in the service on `port`.
    fn mark(&self, port: u16, addr: Ipv4Addr) -> u32 {
        let state = self.reg.state().unwrap();
        let id = state
            .backends
            .iter()
            .find(|(_, b)| b.addr == BackendAddr { addr, port })
            .map(|(id, _)| *id)
            .unwrap_or_else(|| panic!("no backend {addr}:{port}"));
        probe::mark_for(id)
    }

    fn counters(&self) -> Vec<u64> {
        probe::counters(&self.inst.instance)
            .unwrap()
            .expect("the probe's counters exist once it is loaded")
    }

    fn counter(&self, name: &str) -> u64 {
        let i = abi::PROBE_COUNTERS.iter().position(|c| *c == name).unwrap();
        self.counters()[i]
    }

    fn run(&mut self, frame: &[u8], mark: u32) -> weir_testbed::progrun::TcRun {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(weir_ebpf::PROBE_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        run_tc_marked(prog, frame, mark).expect("BPF_PROG_RUN")
    }

    /// Runs a marked `frame` and checks it was dropped as `reason` (and
    /// counted as nothing else).
    fn assert_dropped(&mut self, frame: &[u8], mark: u32, reason: &str) {
        let before = self.counters();
        let r = self.run(frame, mark);
        assert_eq!(r.verdict, TC_ACT_SHOT, "{reason}: dropped");
        let i = abi::PROBE_COUNTERS
            .iter()
            .position(|c| *c == reason)
            .unwrap();
        let mut expect = before;
        expect[i] += 1;
        assert_eq!(self.counters(), expect, "{reason}: counted as that alone");
    }
}

/// A SYN from the LB address to the VIP on `port`.
fn syn(port: u16) -> Vec<u8> {
    Segment::syn(LB_ADDR, 40000, VIP, port).frame()
}

#[test]
fn unmarked_packets_pass_untouched_and_uncounted() {
    let mut bed = Bed::new("unmk");
    bed.configure();
    let before = bed.counters();
    for mark in [0, 0x4000, abi::PROBE_MARK_BASE ^ 0x0001_0000] {
        let frame = syn(L4);
        let r = bed.run(&frame, mark);
        assert_eq!(r.verdict, TC_ACT_OK, "mark {mark:#x}");
        assert_eq!(r.output, frame, "mark {mark:#x}: untouched");
        assert_eq!(r.mark, mark, "mark {mark:#x} kept");
    }
    assert_eq!(bed.counters(), before, "nothing counted");
}

#[test]
fn a_marked_packet_goes_to_its_backend_inside_ipip() {
    let mut bed = Bed::new("encap");
    bed.configure();
    for seg in [
        Segment::syn(LB_ADDR, 40001, VIP, L4),
        Segment::ack(LB_ADDR, 40001, VIP, L4),
    ] {
        let frame = seg.frame();
        let mark = bed.mark(L4, BACKEND);
        let before = bed.counter("probe_encapsulated");
        let r = bed.run(&frame, mark);
        assert_eq!(r.verdict, TC_ACT_REDIRECT, "sent on by bpf_redirect_neigh");
        let out = packet::parse_encapsulated(&r.output).expect("eth | IPIP | inner");
        assert_eq!((out.outer_src, out.outer_dst), (LB_ADDR, BACKEND));
        assert_eq!(out.outer_tot_len as usize, frame.len() - ETH_LEN + IP_LEN);
        assert!(out.outer_checksum_ok);
        assert_eq!(
            out.inner,
            &frame[ETH_LEN..],
            "the check's packet, unchanged"
        );
        assert_eq!(r.mark, 0, "the mark is cleared: the way on is the clients'");
        assert_eq!(bed.counter("probe_encapsulated"), before + 1);
    }
}

#[test]
fn a_probe_that_cannot_go_as_clients_go_is_dropped_and_counted() {
    let mut bed = Bed::new("drop");
    let mark = bed.mark(L4, BACKEND);
    bed.assert_dropped(&syn(L4), mark, "probe_drop_no_config");
    bed.configure();

    bed.assert_dropped(
        &syn(L4),
        probe::mark_for(60_000),
        "probe_drop_unknown_backend",
    );
    bed.assert_dropped(&syn(8082), mark, "probe_drop_no_service");
    let l7 = bed.mark(L7, BACKEND);
    bed.assert_dropped(&syn(L7), l7, "probe_drop_not_l4");
    bed.assert_dropped(&syn(OTHER_L4), mark, "probe_drop_other_service");
    let from_vip = Segment::syn(VIP, 40000, VIP, L4).frame();
    bed.assert_dropped(&from_vip, mark, "probe_drop_source");
    let unrouted = bed.mark(L4, UNROUTED);
    bed.assert_dropped(&syn(L4), unrouted, "probe_drop_no_route");
    // 1490 bytes of IP fit the 1500-byte link, but not with 20 more.
    let mut big = Segment::ack(LB_ADDR, 40000, VIP, L4);
    big.payload = vec![0; 1490 - IP_LEN - packet::TCP_LEN];
    bed.assert_dropped(&big.frame(), mark, "probe_drop_too_big");
    let mut udp = syn(L4);
    udp[ETH_LEN + 9] = 17;
    bed.assert_dropped(&udp, mark, "probe_drop_malformed");
    let mut short = syn(L4);
    short.truncate(ETH_LEN + IP_LEN + 8);
    bed.assert_dropped(&short, mark, "probe_drop_malformed");
}
