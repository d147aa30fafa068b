//! The XDP balancer in the kernel, driven by BPF_PROG_RUN on crafted
//! packets: what it sends, where, and what it leaves alone.

mod common;

use std::net::Ipv4Addr;

use aya::Ebpf;
use aya::programs::Xdp;
use common::{TestInstance, apply, require_root};
use weir::registry::{BackendAddr, Change, Registry, ServiceAddr, ServiceModeName};
use weir_ebpf::abi::{self, FlowKey};
use weir_testbed::packet::{self, ETH_LEN, IP_LEN, Segment};
use weir_testbed::progrun::{NEXT_HOP_MAC, ProgRunNetns, pin_to_cpu, run_xdp};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const LB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const PORT: u16 = 8080;

fn svc() -> ServiceAddr {
    ServiceAddr {
        vip: VIP,
        port: PORT,
    }
}

fn backend(i: u8) -> BackendAddr {
    BackendAddr {
        addr: Ipv4Addr::new(198, 18, 10, 10 + i),
        port: PORT,
    }
}

struct Bed {
    // Field order matters: the program goes before the instance and netns.
    ebpf: Ebpf,
    reg: Registry,
    ns: ProgRunNetns,
    inst: TestInstance,
}

impl Bed {
    fn new(tag: &str, backends: u8) -> Self {
        let inst = TestInstance::new(tag);
        let ns = ProgRunNetns::enter(tag);
        let mut reg = inst.registry();
        apply(
            &mut reg,
            Change::AddService {
                addr: svc(),
                mode: ServiceModeName::L4,
                ring_size: Some(65537),
                max_remove_fraction: None,
                min_backends: None,
                panic_threshold: None,
            },
        );
        let set: Vec<_> = (0..backends).map(|i| (backend(i), 1)).collect();
        apply(
            &mut reg,
            Change::SetBackends {
                service: svc(),
                backends: set,
            },
        );
        let ebpf = weir::dataplane::load_lb(&inst.instance).expect("load XDP");
        reg.maps_mut()
            .set_config(abi::LbConfig {
                lb_addr: LB_ADDR.octets(),
                flags: 0,
            })
            .unwrap();
        Self {
            ebpf,
            reg,
            ns,
            inst,
        }
    }

    /// Runs the program once on `frame`; returns the verdict and the frame
    /// as the program left it.
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(weir_ebpf::LB_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        let r = run_xdp(prog, frame, self.ns.ifindex).expect("BPF_PROG_RUN");
        (r.verdict, r.output)
    }

    fn counter(&self, name: &str) -> u64 {
        self.reg.maps().counters().unwrap()[abi::counter_index(name).unwrap() as usize]
    }

    /// The backend the installed ring names for this flow.
    fn ring_choice(&self, seg: &Segment) -> Ipv4Addr {
        let state = self.reg.state().unwrap();
        let svc = state.service(&svc()).unwrap();
        let ring = self.reg.maps().read_ring(svc.id).unwrap().unwrap();
        let key = flow_key(seg);
        let id = ring[(abi::flow_hash(&key) % svc.ring_size) as usize];
        state.backends[&id].addr.addr
    }
}

fn flow_key(s: &Segment) -> FlowKey {
    FlowKey {
        saddr: s.src.octets(),
        daddr: s.dst.octets(),
        sport: s.sport.to_be_bytes(),
        dport: s.dport.to_be_bytes(),
        proto: 6,
        pad: [0; 3],
    }
}

/// Checks an encapsulated frame completely and returns the outer target.
fn check_encapsulated(bed: &Bed, input: &[u8], output: &[u8]) -> Ipv4Addr {
    let enc = packet::parse_encapsulated(output).expect("output is eth|ipip|inner");
    assert_eq!(
        output.len(),
        input.len() + IP_LEN,
        "exactly one outer header added"
    );
    assert_eq!(enc.dst_mac, NEXT_HOP_MAC, "next hop MAC from the FIB");
    assert_eq!(enc.src_mac, bed.ns.mac, "source MAC of the egress device");
    assert_eq!(enc.outer_src, LB_ADDR);
    assert_eq!(enc.outer_ttl, 64);
    assert_eq!(enc.outer_tot_len as usize, input.len() - ETH_LEN + IP_LEN);
    assert!(enc.outer_checksum_ok, "outer IPv4 checksum");
    assert_eq!(enc.inner, &input[ETH_LEN..], "inner packet untouched");
    assert_eq!(
        packet::checksum(&enc.inner[..IP_LEN]),
        0,
        "inner checksum still valid"
    );
    enc.outer_dst
}

/// Sends an ACK of each `(client port, backend)` flow and checks that it
/// reaches the backend its SYN reached. Returns how many of those flows the
/// installed ring would now send elsewhere (a test of stickiness needs
/// some).
fn acks_follow_their_flows(bed: &mut Bed, flows: &[(u16, Ipv4Addr)]) -> usize {
    let mut moved_in_ring = 0;
    for (sport, first) in flows {
        let ack = Segment::ack(CLIENT, *sport, VIP, PORT);
        let input = ack.frame();
        let (verdict, out) = bed.run(&input);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(
            check_encapsulated(bed, &input, &out),
            *first,
            "flow {sport} stayed on its backend"
        );
        if bed.ring_choice(&ack) != *first {
            moved_in_ring += 1;
        }
    }
    moved_in_ring
}

#[test]
fn syn_is_encapsulated_to_the_ring_backend() {
    require_root();
    let mut bed = Bed::new("syn", 3);
    let mut seen = std::collections::BTreeSet::new();
    for sport in 40000..40064 {
        let seg = Segment::syn(CLIENT, sport, VIP, PORT);
        let input = seg.frame();
        let (verdict, output) = bed.run(&input);
        assert_eq!(verdict, XDP_TX, "SYN to the VIP is transmitted");
        let target = check_encapsulated(&bed, &input, &output);
        assert_eq!(target, bed.ring_choice(&seg), "backend named by the ring");
        seen.insert(target);
    }
    assert_eq!(seen.len(), 3, "64 flows reach all 3 backends");
    assert_eq!(bed.counter("tx"), 64);
    assert_eq!(bed.counter("flow_new"), 64);
    // The flows are recorded, one per backend as chosen.
    let per_backend = bed.reg.maps().flows_per_backend().unwrap();
    assert_eq!(per_backend.values().sum::<u64>(), 64);
}

#[test]
fn established_flow_stays_when_the_ring_changes() {
    require_root();
    let mut bed = Bed::new("est", 3);
    let mut flows = Vec::new();
    for sport in 41000..41200 {
        let seg = Segment::syn(CLIENT, sport, VIP, PORT);
        let (verdict, out) = bed.run(&seg.frame());
        assert_eq!(verdict, XDP_TX);
        flows.push((sport, packet::parse_encapsulated(&out).unwrap().outer_dst));
    }
    // Replace the fleet's shape: a fourth and fifth backend, new weights.
    let set = vec![
        (backend(0), 3),
        (backend(1), 1),
        (backend(2), 1),
        (backend(3), 2),
        (backend(4), 5),
    ];
    apply(
        &mut bed.reg,
        Change::SetBackends {
            service: svc(),
            backends: set,
        },
    );

    let moved_in_ring = acks_follow_their_flows(&mut bed, &flows);
    assert!(
        moved_in_ring > 20,
        "the ring change moved {moved_in_ring} of 200 slots: the test needs some"
    );

    // A new SYN on a reused tuple follows the new ring.
    let (sport, _) = flows
        .iter()
        .find(|(s, first)| bed.ring_choice(&Segment::syn(CLIENT, *s, VIP, PORT)) != *first)
        .unwrap();
    let syn = Segment::syn(CLIENT, *sport, VIP, PORT);
    let (_, out) = bed.run(&syn.frame());
    assert_eq!(
        packet::parse_encapsulated(&out).unwrap().outer_dst,
        bed.ring_choice(&syn)
    );
}

/// RSS may move a flow to another CPU in the middle of a connection (a
/// queue's interrupt moved, the indirection table rewritten). weir_flows is
/// one table for every CPU, so the packet finds its entry there too, also
/// after the ring has changed: the flow stays on its backend.
#[test]
fn flow_moved_to_another_cpu_stays_on_its_backend() {
    require_root();
    assert!(
        std::thread::available_parallelism().map_or(0, usize::from) >= 2,
        "this test sends a flow's packets on two CPUs"
    );
    let mut bed = Bed::new("cpu", 3);
    // SYNs on CPU 0, where Bed pinned this thread.
    let mut flows = Vec::new();
    for sport in 49000..49100 {
        let (verdict, out) = bed.run(&Segment::syn(CLIENT, sport, VIP, PORT).frame());
        assert_eq!(verdict, XDP_TX);
        flows.push((sport, packet::parse_encapsulated(&out).unwrap().outer_dst));
    }
    apply(
        &mut bed.reg,
        Change::SetBackends {
            service: svc(),
            backends: vec![(backend(0), 1), (backend(3), 4), (backend(4), 4)],
        },
    );

    pin_to_cpu(1);
    let moved_in_ring = acks_follow_their_flows(&mut bed, &flows);
    assert!(
        moved_in_ring > 20,
        "the ring change moved {moved_in_ring} of 100 flows: the test needs some"
    );
    assert_eq!(bed.counter("flow_miss"), 0, "every ACK found its flow");
    // The per-CPU counters show where the packets ran.
    let path = bed.inst.instance.pin_dir().join(abi::maps::STATS);
    let map = aya::maps::Map::from_map_data(aya::maps::MapData::from_pin(path).unwrap()).unwrap();
    let stats: aya::maps::PerCpuArray<_, u64> = aya::maps::PerCpuArray::try_from(map).unwrap();
    let tx = stats.get(&abi::counter_index("tx").unwrap(), 0).unwrap();
    assert_eq!((tx[0], tx[1]), (100, 100), "SYNs on CPU 0, ACKs on CPU 1");
}

#[test]
fn draining_backend_gets_no_new_syns_but_keeps_its_flows() {
    require_root();
    let mut bed = Bed::new("drain", 3);
    let drained = backend(1).addr;
    let mut on_drained = Vec::new();
    for sport in 42000..42100 {
        let (_, out) = bed.run(&Segment::syn(CLIENT, sport, VIP, PORT).frame());
        if packet::parse_encapsulated(&out).unwrap().outer_dst == drained {
            on_drained.push(sport);
        }
    }
    assert!(!on_drained.is_empty());
    apply(
        &mut bed.reg,
        Change::DrainBackend {
            service: svc(),
            backend: backend(1),
        },
    );

    for sport in 43000..43300 {
        let (verdict, out) = bed.run(&Segment::syn(CLIENT, sport, VIP, PORT).frame());
        assert_eq!(verdict, XDP_TX);
        assert_ne!(
            packet::parse_encapsulated(&out).unwrap().outer_dst,
            drained,
            "new SYN sent to a draining backend"
        );
    }
    for sport in &on_drained {
        let (_, out) = bed.run(&Segment::ack(CLIENT, *sport, VIP, PORT).frame());
        assert_eq!(
            packet::parse_encapsulated(&out).unwrap().outer_dst,
            drained,
            "established flow left its backend"
        );
    }
}

#[test]
fn unresolved_next_hop_passes_the_encapsulated_packet_to_the_kernel() {
    require_root();
    let mut bed = Bed::new("neigh", 0);
    let far = BackendAddr {
        addr: Ipv4Addr::new(198, 18, 20, 5),
        port: PORT,
    };
    apply(
        &mut bed.reg,
        Change::SetBackends {
            service: svc(),
            backends: vec![(far, 1)],
        },
    );
    let input = Segment::syn(CLIENT, 44000, VIP, PORT).frame();
    let (verdict, out) = bed.run(&input);
    assert_eq!(verdict, XDP_PASS);
    let enc =
        packet::parse_encapsulated(&out).expect("passed encapsulated, for the kernel to forward");
    assert_eq!(enc.outer_dst, far.addr);
    assert_eq!(enc.inner, &input[ETH_LEN..]);
    assert_eq!(
        out[..12],
        input[..12],
        "still addressed as received, so the kernel takes it"
    );
    assert!(enc.outer_checksum_ok);
    assert_eq!(bed.counter("pass_no_neigh"), 1);
}

#[test]
fn service_without_backends_drops_and_counts() {
    require_root();
    let mut bed = Bed::new("empty", 0);
    let (verdict, _) = bed.run(&Segment::syn(CLIENT, 45000, VIP, PORT).frame());
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(bed.counter("drop_no_backend"), 1);
}

#[test]
fn everything_else_passes_untouched() {
    require_root();
    let mut bed = Bed::new("pass", 3);
    let l7 = ServiceAddr {
        vip: VIP,
        port: 9090,
    };
    apply(
        &mut bed.reg,
        Change::AddService {
            addr: l7,
            mode: ServiceModeName::L7,
            ring_size: None,
            max_remove_fraction: None,
            min_backends: None,
            panic_threshold: None,
        },
    );

    let syn = Segment::syn(CLIENT, 46000, VIP, PORT).frame();
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();

    let mut arp = packet::eth_header(0x0806);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[0u8; 20]);
    cases.push(("arp", arp, "pass_not_ipv4"));

    let mut v6 = packet::eth_header(0x86dd);
    v6.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
    v6.extend_from_slice(&[0u8; 52]);
    cases.push(("ipv6", v6, "pass_not_ipv4"));

    let mut more_frags = syn.clone();
    more_frags[ETH_LEN + 6] |= 0x20;
    cases.push(("first fragment", more_frags, "pass_fragment"));
    let mut later_frag = syn.clone();
    later_frag[ETH_LEN + 7] = 0x10;
    cases.push(("later fragment", later_frag, "pass_fragment"));

    cases.push(("ethernet only", syn[..ETH_LEN].to_vec(), "pass_truncated"));
    // (Frames shorter than an Ethernet header never reach XDP: the kernel
    // refuses them in BPF_PROG_RUN too.)
    cases.push((
        "cut IP header",
        syn[..ETH_LEN + 12].to_vec(),
        "pass_truncated",
    ));
    cases.push((
        "cut TCP header",
        syn[..ETH_LEN + IP_LEN + 10].to_vec(),
        "pass_truncated",
    ));
    let mut long_claim = syn.clone();
    long_claim[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&1400u16.to_be_bytes());
    cases.push((
        "total length beyond the packet",
        long_claim,
        "pass_truncated",
    ));

    let mut ihl4 = syn.clone();
    ihl4[ETH_LEN] = 0x44;
    cases.push(("IHL 4", ihl4, "pass_bad_ihl"));
    let mut v5 = syn.clone();
    v5[ETH_LEN] = 0x55;
    cases.push(("IP version 5", v5, "pass_bad_ihl"));
    let mut opts = syn.clone();
    opts[ETH_LEN] = 0x46;
    cases.push(("IP options", opts, "pass_ip_options"));

    let mut udp = syn.clone();
    udp[ETH_LEN + 9] = 17;
    cases.push(("UDP to the VIP", udp, "pass_not_tcp"));

    cases.push((
        "other address",
        Segment::syn(CLIENT, 46001, Ipv4Addr::new(198, 19, 0, 11), PORT).frame(),
        "pass_no_service",
    ));
    cases.push((
        "other port",
        Segment::syn(CLIENT, 46002, VIP, 8081).frame(),
        "pass_no_service",
    ));
    cases.push((
        "L7 service",
        Segment::syn(CLIENT, 46003, VIP, 9090).frame(),
        "pass_l7",
    ));
    cases.push((
        "L7 service, established",
        Segment::ack(CLIENT, 46003, VIP, 9090).frame(),
        "pass_l7",
    ));

    for (what, input, counter) in cases {
        let before = bed.counter(counter);
        let (verdict, out) = bed.run(&input);
        assert_eq!(verdict, XDP_PASS, "{what}: verdict");
        assert_eq!(out, input, "{what}: packet untouched");
        assert_eq!(
            bed.counter(counter),
            before + 1,
            "{what}: counted as {counter}"
        );
    }
    assert_eq!(bed.counter("tx"), 0, "nothing was balanced");
    let state = bed.reg.state().unwrap();
    assert_eq!(
        bed.reg
            .maps()
            .service_stats(state.service(&l7).unwrap().id)
            .unwrap()
            .passed_l7,
        2
    );
}

#[test]
fn next_hop_is_cached_and_mtu_still_enforced() {
    require_root();
    let mut bed = Bed::new("nh", 1);
    for sport in 47000..47100 {
        let (verdict, _) = bed.run(&Segment::syn(CLIENT, sport, VIP, PORT).frame());
        assert_eq!(verdict, XDP_TX);
    }
    assert_eq!(
        bed.counter("fib_lookup"),
        1,
        "100 packets to one backend, one FIB resolution"
    );

    // pr0 has MTU 1500: an inner packet of 1490 bytes no longer fits once
    // encapsulated, on the cached path as on the FIB path.
    let big = oversized(47000);
    let packets = |bed: &Bed| bed.reg.maps().service_stats(0).unwrap().packets;
    let before = packets(&bed);
    let input = big.frame();
    let (verdict, out) = bed.run(&input);
    assert_eq!(verdict, XDP_TX, "answered with ICMP");
    check_frag_needed(&input, &out, 1480);
    assert_eq!(bed.counter("drop_frag_needed"), 1);
    assert_eq!(bed.counter("icmp_frag_needed"), 1);
    assert_eq!(
        packets(&bed),
        before,
        "a packet that did not fit is not counted as forwarded"
    );
    let mut fits = Segment::ack(CLIENT, 47000, VIP, PORT);
    fits.payload = vec![0x5a; 1480 - IP_LEN - packet::TCP_LEN];
    let input = fits.frame();
    let (verdict, out) = bed.run(&input);
    assert_eq!(verdict, XDP_TX, "1480 + 20 fits the 1500 MTU");
    check_encapsulated(&bed, &input, &out);
    assert_eq!(bed.counter("fib_lookup"), 1);
}

/// An ACK of `sport` whose IPv4 packet is 1490 bytes: 1510 once
/// encapsulated, over pr0's 1500.
fn oversized(sport: u16) -> Segment {
    let mut big = Segment::ack(CLIENT, sport, VIP, PORT);
    big.payload = vec![0x5a; 1490 - IP_LEN - packet::TCP_LEN];
    big
}

/// Checks that `output` is exactly the ICMP "fragmentation needed" a router
/// sends for `input` when the next hop takes `next_hop_mtu` bytes.
fn check_frag_needed(input: &[u8], output: &[u8], next_hop_mtu: u16) {
    let icmp = packet::parse_frag_needed(output).expect("output is IPv4/ICMP");
    assert_eq!(output.len(), 70, "eth + IPv4 + ICMP header + 28 quoted");
    assert_eq!(icmp.dst_mac, input[6..12], "back to the sender's hop");
    assert_eq!(icmp.src_mac, input[0..6], "from the MAC it was sent to");
    assert_eq!(icmp.version_ihl, 0x45);
    assert_eq!(icmp.tot_len, 56);
    assert_eq!(icmp.ttl, 64);
    assert_eq!(icmp.src, VIP, "from the address the client sent to");
    assert_eq!(icmp.dst, CLIENT);
    assert!(icmp.ip_checksum_ok, "IPv4 checksum");
    assert_eq!((icmp.icmp_type, icmp.icmp_code), (3, 4), "type 3 code 4");
    assert_eq!(icmp.unused, 0);
    assert_eq!(icmp.next_hop_mtu, next_hop_mtu, "route MTU - 20");
    assert!(icmp.icmp_checksum_ok, "ICMP checksum");
    assert_eq!(
        icmp.quoted,
        &input[ETH_LEN..ETH_LEN + IP_LEN + 8],
        "the client's IPv4 header and 8 bytes (ports, sequence) quoted"
    );

    // The same, byte by byte, from first principles.
    let mut ip = vec![0x45, 0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0];
    ip.extend_from_slice(&VIP.octets());
    ip.extend_from_slice(&CLIENT.octets());
    let c = packet::checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut msg = vec![3, 4, 0, 0, 0, 0];
    msg.extend_from_slice(&next_hop_mtu.to_be_bytes());
    msg.extend_from_slice(&input[ETH_LEN..ETH_LEN + 28]);
    let c = packet::checksum(&msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    let mut want = input[6..12].to_vec();
    want.extend_from_slice(&input[0..6]);
    want.extend_from_slice(&[0x08, 0x00]);
    want.extend_from_slice(&ip);
    want.extend_from_slice(&msg);
    assert_eq!(output, want.as_slice());
}

#[test]
fn packet_too_big_for_the_tunnel_gets_icmp_frag_needed() {
    require_root();
    let mut bed = Bed::new("icmp", 1);
    // First packet of the flow: the FIB reports the MTU.
    let input = oversized(49000).frame();
    let (verdict, out) = bed.run(&input);
    assert_eq!(verdict, XDP_TX, "FIB path: answered");
    check_frag_needed(&input, &out, 1480);
    assert_eq!(bed.counter("fib_lookup"), 1);

    // A packet that fits fills the next-hop cache; the next oversized one
    // is answered from the cached MTU.
    let (verdict, _) = bed.run(&Segment::syn(CLIENT, 49001, VIP, PORT).frame());
    assert_eq!(verdict, XDP_TX);
    let input = oversized(49001).frame();
    let (verdict, out) = bed.run(&input);
    assert_eq!(verdict, XDP_TX, "cached path: answered");
    check_frag_needed(&input, &out, 1480);
    assert_eq!(
        bed.counter("fib_lookup"),
        2,
        "the second answer came from the cache"
    );
    assert_eq!(bed.counter("icmp_frag_needed"), 2);
    assert_eq!(bed.counter("drop_frag_needed"), 2);
    assert_eq!(bed.counter("tx"), 1, "only the SYN was forwarded");

    // Without DF the sender did not ask for path MTU discovery: dropped.
    let mut no_df = oversized(49002).frame();
    no_df[ETH_LEN + 6] = 0;
    no_df[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&[0, 0]);
    let c = packet::checksum(&no_df[ETH_LEN..ETH_LEN + IP_LEN]);
    no_df[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&c.to_be_bytes());
    let (verdict, _) = bed.run(&no_df);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(bed.counter("icmp_not_df"), 1);
    assert_eq!(bed.counter("drop_frag_needed"), 3);
    assert_eq!(bed.counter("icmp_frag_needed"), 2);
}

#[test]
fn icmp_frag_needed_is_rate_limited() {
    require_root();
    let mut bed = Bed::new("icmprl", 1);
    let input = oversized(49100).frame();
    // Far more than the burst, fast: most must be refused, however slowly
    // a loaded machine runs them.
    const SENT: u64 = 2000;
    let start = std::time::Instant::now();
    let mut answered = 0u64;
    for _ in 0..SENT {
        let (verdict, _) = bed.run(&input);
        if verdict == XDP_TX {
            answered += 1;
        } else {
            assert_eq!(verdict, XDP_DROP);
        }
    }
    let elapsed_ms = start.elapsed().as_millis() as u64;
    let burst = u64::from(abi::ICMP_BURST);
    // The bucket starts full and refills at ICMP_RATE a second (+5 ms and
    // one reply for the coarse clock's granularity).
    let allowed = burst + (elapsed_ms + 5) * u64::from(abi::ICMP_RATE) / 1000 + 1;
    assert!(
        answered >= burst && answered <= allowed,
        "{answered} answers in {elapsed_ms} ms: want {burst}..={allowed}"
    );
    assert!(answered < SENT, "none over the rate in {elapsed_ms} ms");
    assert_eq!(bed.counter("icmp_frag_needed"), answered);
    assert_eq!(bed.counter("icmp_rate_limited"), SENT - answered);
    assert_eq!(bed.counter("drop_frag_needed"), SENT);
}

#[test]
fn flows_of_a_force_removed_service_stop_forwarding() {
    require_root();
    let mut bed = Bed::new("svcrm", 2);
    let (verdict, _) = bed.run(&Segment::syn(CLIENT, 48000, VIP, PORT).frame());
    assert_eq!(verdict, XDP_TX);
    let ack = Segment::ack(CLIENT, 48000, VIP, PORT).frame();
    assert_eq!(bed.run(&ack).0, XDP_TX, "established");

    apply(&mut bed.reg, Change::RemoveService { addr: svc() });
    let (verdict, out) = bed.run(&ack);
    assert_eq!(verdict, XDP_PASS, "no service any more: the host decides");
    assert_eq!(out, ack, "untouched");
    assert_eq!(
        bed.counter("flow_stale"),
        1,
        "the flow named a freed backend"
    );
    assert_eq!(bed.counter("pass_no_service"), 1);
}
