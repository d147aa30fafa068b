//! The decapsulator in the kernel, driven by BPF_PROG_RUN on crafted IPIP
//! packets: only the allowed balancers get their packets decapsulated.

mod common;

use std::net::Ipv4Addr;

use aya::Ebpf;
use aya::programs::SchedClassifier;
use common::{TestInstance, require_root};
use weir::dataplane::decap_sources::{self, Prefix};
use weir_ebpf::abi;
use weir_testbed::packet::{self, ETH_LEN, IP_LEN, Segment};
use weir_testbed::progrun::run_tc;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

const LB: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const OTHER_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);

fn prefix(s: &str) -> Prefix {
    s.parse().unwrap()
}

struct Bed {
    // Field order: the program goes before the instance.
    ebpf: Ebpf,
    inst: TestInstance,
}

impl Bed {
    fn new(tag: &str) -> Self {
        require_root();
        let inst = TestInstance::new(tag);
        let ebpf = weir::dataplane::load_decap_program(&inst.instance).expect("load decap");
        Self { ebpf, inst }
    }

    fn add_vip(&mut self, vip: Ipv4Addr, from: &[Prefix]) -> Vec<Prefix> {
        weir::dataplane::add_decap_vip(&mut self.ebpf, vip, from).expect("add VIP")
    }

    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(weir_ebpf::DECAP_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        let r = run_tc(prog, frame).expect("BPF_PROG_RUN");
        (r.verdict, r.output)
    }

    fn counter(&self, name: &str) -> u64 {
        let i = abi::DECAP_COUNTERS.iter().position(|c| *c == name).unwrap();
        weir::dataplane::decap_counters(&self.inst.instance)
            .unwrap()
            .expect("decap maps exist")[i]
    }
}

/// A client's TCP segment to `vip`, wrapped by a balancer at `from`.
fn ipip(from: Ipv4Addr, vip: Ipv4Addr, sport: u16) -> (Vec<u8>, Vec<u8>) {
    let inner_frame = Segment::ack(CLIENT, sport, vip, 8080).frame();
    let frame = packet::ipip_frame(from, BACKEND, &inner_frame[ETH_LEN..]);
    (frame, inner_frame)
}

/// Runs `frame` and checks it was decapsulated to exactly `inner`.
fn assert_decapsulated(bed: &mut Bed, frame: &[u8], inner: &[u8], what: &str) {
    let before = bed.counter("decap_ok");
    let (verdict, out) = bed.run(frame);
    assert_eq!(verdict, TC_ACT_OK, "{what}: verdict");
    assert_eq!(
        out.len(),
        frame.len() - IP_LEN,
        "{what}: outer header removed"
    );
    assert_eq!(&out[ETH_LEN..], &inner[ETH_LEN..], "{what}: inner packet");
    assert_eq!(bed.counter("decap_ok"), before + 1, "{what}: counted");
}

/// Runs `frame` and checks it was dropped as from a source not allowed.
fn assert_refused(bed: &mut Bed, frame: &[u8], what: &str) {
    let before = bed.counter("decap_drop_source");
    let ok = bed.counter("decap_ok");
    let (verdict, _) = bed.run(frame);
    assert_eq!(verdict, TC_ACT_SHOT, "{what}: dropped");
    assert_eq!(
        bed.counter("decap_drop_source"),
        before + 1,
        "{what}: counted as decap_drop_source"
    );
    assert_eq!(bed.counter("decap_ok"), ok, "{what}: not decapsulated");
}

#[test]
fn ipip_from_an_allowed_balancer_is_decapsulated_and_any_other_source_dropped() {
    let mut bed = Bed::new("dsrc");
    let now = bed.add_vip(VIP, &[prefix("198.18.2.2/32"), prefix("198.18.3.0/24")]);
    assert_eq!(now, [prefix("198.18.2.2/32"), prefix("198.18.3.0/24")]);

    let (frame, inner) = ipip(LB, VIP, 50000);
    assert_decapsulated(&mut bed, &frame, &inner, "the LB");
    let (frame, inner) = ipip(Ipv4Addr::new(198, 18, 3, 77), VIP, 50001);
    assert_decapsulated(&mut bed, &frame, &inner, "inside an allowed /24");

    for forger in [
        Ipv4Addr::new(198, 18, 1, 2),
        Ipv4Addr::new(198, 18, 2, 3),
        Ipv4Addr::new(198, 18, 4, 1),
        Ipv4Addr::new(198, 19, 0, 10),
    ] {
        let (frame, _) = ipip(forger, VIP, 50002);
        assert_refused(&mut bed, &frame, &format!("forged from {forger}"));
    }

    // Not a VIP: untouched, as before.
    let (frame, _) = ipip(Ipv4Addr::new(198, 18, 4, 1), OTHER_VIP, 50003);
    let before = bed.counter("decap_pass_not_vip");
    let (verdict, out) = bed.run(&frame);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, frame, "left alone");
    assert_eq!(bed.counter("decap_pass_not_vip"), before + 1);
}

#[test]
fn allow_lists_are_per_vip_and_revocable() {
    let mut bed = Bed::new("dvip");
    bed.add_vip(VIP, &[prefix("198.18.2.2/32")]);
    bed.add_vip(OTHER_VIP, &[prefix("198.18.2.3/32")]);

    let (frame, _) = ipip(LB, OTHER_VIP, 51000);
    assert_refused(&mut bed, &frame, "the LB of another VIP");
    let (frame, inner) = ipip(Ipv4Addr::new(198, 18, 2, 3), OTHER_VIP, 51001);
    assert_decapsulated(&mut bed, &frame, &inner, "OTHER_VIP's LB");

    // Revoking is all or nothing: an unknown source refuses the whole change.
    let map = bed
        .ebpf
        .map_mut(abi::maps::DECAP_SOURCES)
        .expect("sources map");
    let err = decap_sources::revoke(
        map,
        VIP,
        &[prefix("198.18.2.2/32"), prefix("198.18.9.0/24")],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("198.18.9.0/24"), "{err}");
    let (frame, inner) = ipip(LB, VIP, 51002);
    assert_decapsulated(&mut bed, &frame, &inner, "after a refused revoke");

    let map = bed.ebpf.map_mut(abi::maps::DECAP_SOURCES).unwrap();
    let gone = decap_sources::revoke(map, VIP, &[prefix("198.18.2.2/32")]).unwrap();
    assert_eq!(gone, [prefix("198.18.2.2/32")]);
    assert_refused(
        &mut bed,
        &frame,
        "after the revoke (the VIP accepts no one)",
    );
    let left = decap_sources::list(&bed.inst.instance).unwrap();
    assert_eq!(left[&VIP], Vec::<Prefix>::new(), "VIP still listed, empty");
    assert_eq!(left[&OTHER_VIP], [prefix("198.18.2.3/32")]);
}
