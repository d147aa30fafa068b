//! Micro-benchmarks of the L4 path, as issue 11 asks them to be measured:
//!
//! - XDP ns/packet via BPF_PROG_RUN for a SYN of a new flow and for a packet
//!   of an established flow, with 10 and 100 backends and M = 65537, beside
//!   a bare return-XDP_TX program timed in the same loop (the floor).
//!   `repeat` > 1 would rerun the program on the buffer it already rewrote
//!   (the second run sees an encapsulated packet and takes a cheap exit),
//!   so every run is a single run; the kernel's `duration` is averaged and
//!   every return code and output length is checked. The same packets are
//!   timed again once the flow table holds `table_flows` flows, with a
//!   floor run after each packet.
//! - Wall time of the `weir backend set` command with 1, 100 and 10,000
//!   backends (the real binary, as an operator runs it).
//!
//! `weir-bench-l4` runs them alone; the `micro` scenario runs them as part
//! of `cargo xtask bench`.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use aya::Ebpf;
use aya::programs::Xdp;
use serde::{Deserialize, Serialize};
use weir::instance::Instance;
use weir::registry::{
    ApplyOptions, BackendAddr, Change, CreateOptions, Registry, ServiceAddr, ServiceModeName,
};
use weir_ebpf::abi;
use weir_testbed::packet::Segment;
use weir_testbed::progrun::{ProgRunNetns, XdpRun, run_xdp};

const XDP_TX: u32 = 3;
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const PORT: u16 = 8080;

/// How much to measure: `weir-bench-l4`'s options, and the `micro`
/// scenario's sizes.
#[derive(Clone, Debug, clap::Args)]
pub struct Params {
    /// Timed runs per measurement.
    #[arg(long, default_value_t = Params::FULL.runs)]
    pub runs: u32,
    /// Rounds of the XDP measurements (the machine drifts between rounds;
    /// every round is reported).
    #[arg(long, default_value_t = Params::FULL.rounds)]
    pub rounds: u32,
    /// Flows in the table before the full-table timings.
    #[arg(long, default_value_t = Params::FULL.table_flows)]
    pub table_flows: u32,
    /// Repetitions of each `weir backend set` timing (median reported).
    #[arg(long, default_value_t = Params::FULL.set_repeats)]
    pub set_repeats: usize,
}

impl Params {
    /// A full run's sizes, and the tool's defaults.
    pub const FULL: Params = Params {
        runs: 100_000,
        rounds: 3,
        table_flows: 100_000,
        set_repeats: 5,
    };
    /// A quick run's (`--quick`).
    pub const QUICK: Params = Params {
        runs: 10_000,
        rounds: 1,
        table_flows: 20_000,
        set_repeats: 1,
    };
}

/// Nanoseconds per run, from the kernel's own measurement.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Timing {
    pub mean: f64,
    pub p50: f64,
    pub runs: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct XdpResult {
    pub round: u32,
    pub backends: u32,
    pub ring_size: u32,
    /// Starting from an empty table; the spread packets are one of each of
    /// the `flows` flows the SYNs made, in the order they were made.
    #[serde(flatten)]
    pub empty_table: Packets,
    pub flows: u32,
    /// The same packets with `table_flows` flows in the table.
    pub full_table: FullTable,
}

impl XdpResult {
    /// The packets of both table states, each with the flows the table
    /// held first (0: empty).
    pub fn tables(&self) -> [(u32, &Packets); 2] {
        [
            (0, &self.empty_table),
            (self.full_table.table_flows, &self.full_table.packets),
        ]
    }
}

/// The packets timed in one table state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Packets {
    pub syn_new_flow: Timing,
    /// One established flow's packet, over and over.
    pub established_one_flow: Timing,
    /// One packet of each of many established flows.
    pub established_spread: Timing,
    /// A bare `return XDP_TX`, in the same loop.
    pub floor: Timing,
}

impl Packets {
    pub fn summary(&self) -> String {
        let t = |t: &Timing| format!("{:.0}/{:.0}", t.mean, t.p50);
        format!(
            "SYN new flow {}, established one flow {}, spread {}, floor {}",
            t(&self.syn_new_flow),
            t(&self.established_one_flow),
            t(&self.established_spread),
            t(&self.floor)
        )
    }

    /// A row of the printed table.
    pub fn row(&self, x: &XdpResult) -> String {
        let t = |t: &Timing| format!("{:.0} / {:.0}", t.mean, t.p50);
        format!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            x.round,
            x.backends,
            x.ring_size,
            t(&self.syn_new_flow),
            t(&self.established_one_flow),
            t(&self.established_spread),
            t(&self.floor)
        )
    }
}

/// Timings once the flow table is full of other flows: the SYNs add
/// `runs` more, so the table ends with `table_flows` + `runs` entries. The
/// spread packets visit `runs` table flows in a scattered order, and the
/// floor runs after each packet.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FullTable {
    pub table_flows: u32,
    #[serde(flatten)]
    pub packets: Packets,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SetResult {
    pub backends: usize,
    pub ring_size: u32,
    pub initial_ms: f64,
    pub change_ms: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub date: String,
    pub kernel: String,
    pub cpu: String,
    pub xdp: Vec<XdpResult>,
    pub backend_set: Vec<SetResult>,
}

/// Runs every measurement; `progress` hears a line after each.
pub fn run(args: &Params, progress: impl Fn(&str)) -> Result<Report> {
    ensure!(
        weir_testbed::is_root(),
        "run as root: the bench loads BPF programs"
    );
    let mut xdp = Vec::new();
    for (round, backends) in (1..=args.rounds).flat_map(|r| [(r, 10u32), (r, 100)]) {
        let r = bench_xdp(round, backends, args.runs, args.table_flows)?;
        progress(&format!(
            "round {round} xdp {backends:>3} backends M=65537 (mean/p50 ns): {}",
            r.empty_table.summary()
        ));
        progress(&format!(
            "round {round} xdp {backends:>3} backends, {} flows in the table: {}",
            r.full_table.table_flows,
            r.full_table.packets.summary()
        ));
        xdp.push(r);
    }
    let mut backend_set = Vec::new();
    for backends in [1usize, 100, 10_000] {
        let r = bench_backend_set(backends, args.set_repeats)?;
        progress(&format!(
            "weir backend set {backends:>5} backends (ring {}): initial {:.1} ms, change {:.1} ms",
            r.ring_size, r.initial_ms, r.change_ms
        ));
        backend_set.push(r);
    }
    Ok(Report {
        date: weir::registry::audit::rfc3339(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs(),
        ),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")?
            .trim()
            .into(),
        cpu: std::fs::read_to_string("/proc/cpuinfo")?
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("?")
            .trim()
            .into(),
        xdp,
        backend_set,
    })
}

/// Removes the instance on drop, its state directory (the audit log
/// `destroy` keeps) too: it was a throwaway.
struct Scratch(Instance);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = self.0.destroy();
        let _ = std::fs::remove_dir_all(self.0.state_dir());
    }
}

fn service() -> ServiceAddr {
    ServiceAddr {
        vip: VIP,
        port: PORT,
    }
}

fn backend(i: u32) -> BackendAddr {
    // 198.18.10.0/23 is routed through the namespace's next hop.
    BackendAddr {
        addr: Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 10, 1)) + i),
        port: PORT,
    }
}

/// Per-run kernel durations of one kind of packet.
#[derive(Default)]
struct Samples(Vec<f64>);

impl Samples {
    fn push(&mut self, run: &XdpRun) {
        self.0.push(run.duration.as_nanos() as f64);
    }

    fn stats(mut self) -> Timing {
        self.0.sort_by(f64::total_cmp);
        let n = self.0.len();
        Timing {
            mean: self.0.iter().sum::<f64>() / n as f64,
            p50: self.0[n / 2],
            runs: n,
        }
    }
}

/// Run `prog` once on `frame` and check the verdict and output length.
fn checked(
    prog: &mut Xdp,
    frame: &[u8],
    ifindex: u32,
    grows_by: usize,
    what: &str,
) -> Result<XdpRun> {
    let run = run_xdp(prog, frame, ifindex)?;
    ensure!(
        run.verdict == XDP_TX && run.output.len() == frame.len() + grows_by,
        "{what}: verdict {}, output {} bytes for {} in",
        run.verdict,
        run.output.len(),
        frame.len()
    );
    Ok(run)
}

fn bench_xdp(round: u32, backends: u32, runs: u32, table_flows: u32) -> Result<XdpResult> {
    let inst = Scratch(Instance::new(&format!(
        "bench{}x{backends}",
        std::process::id()
    ))?);
    let mut reg = Registry::open_or_create(&inst.0, CreateOptions { flows: 1 << 21 })?;
    let force = || ApplyOptions {
        force: true,
        ..Default::default()
    };
    reg.apply(
        &Change::AddService {
            addr: service(),
            mode: ServiceModeName::L4,
            ring_size: Some(65537),
            max_remove_fraction: None,
            min_backends: None,
            panic_threshold: None,
        },
        force(),
    )?;
    let set = (0..backends).map(|i| (backend(i), 1)).collect();
    reg.apply(
        &Change::SetBackends {
            service: service(),
            backends: set,
        },
        force(),
    )?;
    reg.maps_mut().set_config(abi::LbConfig {
        lb_addr: [198, 18, 2, 2],
        flags: 0,
    })?;
    let ns = ProgRunNetns::enter(&format!("b{backends}"));

    let mut lb: Ebpf = weir::dataplane::load_lb(&inst.0)?;
    let mut floor = Ebpf::load(weir_ebpf::support_object())?;
    let floor_prog: &mut Xdp = floor
        .program_mut(weir_ebpf::TX_FLOOR_PROGRAM)
        .context("floor program")?
        .try_into()?;
    floor_prog.load()?;
    let lb_prog: &mut Xdp = lb
        .program_mut(weir_ebpf::LB_PROGRAM)
        .context("lb program")?
        .try_into()?;

    // Distinct client tuples: 2^16 ports x up to 32 client addresses.
    let tuple = |i: u32| {
        (
            Ipv4Addr::new(198, 18, 1, 2 + (i >> 16) as u8),
            (i & 0xffff) as u16,
        )
    };
    ensure!(
        runs.max(table_flows) + runs <= 32 << 16,
        "at most {} runs and table flows",
        32 << 16
    );
    let ifindex = ns.ifindex;

    // SYN of a new flow: every run a tuple never seen before. The floor runs
    // in the same loop, on the same frame.
    let (mut syn, mut floor_t) = (Samples::default(), Samples::default());
    for i in 0..runs {
        let (src, sport) = tuple(i);
        let frame = Segment::syn(src, sport, VIP, PORT).frame();
        syn.push(&checked(lb_prog, &frame, ifindex, 20, "SYN")?);
        floor_t.push(&checked(floor_prog, &frame, ifindex, 0, "floor")?);
    }
    let flows_made = reg.maps().counters()?[abi::counter_index("flow_new").unwrap() as usize];
    ensure!(
        flows_made == runs as u64,
        "expected {runs} new flows, XDP counted {flows_made}"
    );

    // Established, one flow: the same ACK again and again (hot caches).
    let (src, sport) = tuple(0);
    let hot_frame = Segment::ack(src, sport, VIP, PORT).frame();
    let mut hot = Samples::default();
    for _ in 0..runs {
        hot.push(&checked(lb_prog, &hot_frame, ifindex, 20, "ACK")?);
    }
    // Established, spread: an ACK of each of the flows the SYNs created.
    let mut spread = Samples::default();
    for i in 0..runs {
        let (src, sport) = tuple(i);
        let frame = Segment::ack(src, sport, VIP, PORT).frame();
        spread.push(&checked(lb_prog, &frame, ifindex, 20, "ACK")?);
    }
    let misses = reg.maps().counters()?[abi::counter_index("flow_miss").unwrap() as usize];
    ensure!(
        misses == 0,
        "{misses} established packets missed their flow"
    );

    // Full table: SYNs (untimed) until it holds `table_flows` flows, then
    // each timed packet followed by the floor.
    for i in runs..table_flows {
        let (src, sport) = tuple(i);
        checked(
            lb_prog,
            &Segment::syn(src, sport, VIP, PORT).frame(),
            ifindex,
            20,
            "SYN",
        )?;
    }
    let table_flows = table_flows.max(runs);
    let mut full_floor = Samples::default();
    let mut with_floor = |frame: &[u8], what: &str, into: &mut Samples| -> Result<()> {
        into.push(&checked(lb_prog, frame, ifindex, 20, what)?);
        full_floor.push(&checked(floor_prog, frame, ifindex, 0, "floor")?);
        Ok(())
    };
    let mut full_syn = Samples::default();
    for i in table_flows..table_flows + runs {
        let (src, sport) = tuple(i);
        with_floor(
            &Segment::syn(src, sport, VIP, PORT).frame(),
            "SYN",
            &mut full_syn,
        )?;
    }
    let mut full_hot = Samples::default();
    for _ in 0..runs {
        with_floor(&hot_frame, "ACK", &mut full_hot)?;
    }
    // A stride coprime with the table's size visits distinct flows in an
    // order unrelated to their insertion.
    let stride = (7919..)
        .find(|s| gcd(*s, table_flows) == 1)
        .expect("some stride is coprime");
    let mut full_spread = Samples::default();
    for i in 0..runs {
        let (src, sport) = tuple((i as u64 * stride as u64 % table_flows as u64) as u32);
        with_floor(
            &Segment::ack(src, sport, VIP, PORT).frame(),
            "ACK",
            &mut full_spread,
        )?;
    }
    let counters = reg.maps().counters()?;
    let (made, misses) = (
        counters[abi::counter_index("flow_new").unwrap() as usize],
        counters[abi::counter_index("flow_miss").unwrap() as usize],
    );
    ensure!(
        made == (table_flows + runs) as u64 && misses == 0,
        "full table: {made} new flows for {} SYNs, {misses} established packets missed their flow",
        table_flows + runs
    );
    drop(ns);
    Ok(XdpResult {
        round,
        backends,
        ring_size: 65537,
        empty_table: Packets {
            syn_new_flow: syn.stats(),
            established_one_flow: hot.stats(),
            established_spread: spread.stats(),
            floor: floor_t.stats(),
        },
        flows: runs,
        full_table: FullTable {
            table_flows,
            packets: Packets {
                syn_new_flow: full_syn.stats(),
                established_one_flow: full_hot.stats(),
                established_spread: full_spread.stats(),
                floor: full_floor.stats(),
            },
        },
    })
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn weir_cli(instance: &str, args: &[String]) -> Result<Duration> {
    let weir = weir_testbed::workspace_bin("weir");
    let start = Instant::now();
    let out = Command::new(&weir)
        .arg("--instance")
        .arg(instance)
        .args(args)
        .output()?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!(
            "weir {}: {}",
            args.first().map_or("", |s| s.as_str()),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

fn bench_backend_set(backends: usize, repeats: usize) -> Result<SetResult> {
    let ring_size = weir::registry::maglev::ring_size_for(backends);
    let svc = service().to_string();
    let set_args = |offset: u32| -> Vec<String> {
        let mut a = vec![
            "backend".into(),
            "set".into(),
            svc.clone(),
            "--force".into(),
        ];
        a.extend((0..backends as u32).map(|i| backend(i + offset).addr.to_string()));
        a
    };
    let mut initial = Vec::new();
    let mut change = Vec::new();
    for r in 0..repeats {
        let name = format!("benchset{}x{backends}x{r}", std::process::id());
        let _scratch = Scratch(Instance::new(&name)?);
        let args: Vec<String> = [
            "--flows",
            "65536",
            "service",
            "add",
            &svc,
            "--ring-size",
            &ring_size.to_string(),
        ]
        .map(String::from)
        .into();
        weir_cli(&name, &args)?;
        // From empty to N backends.
        initial.push(weir_cli(&name, &set_args(0))?);
        // One backend replaced: the steady-state change discovery makes.
        change.push(weir_cli(&name, &set_args(1))?);
    }
    Ok(SetResult {
        backends,
        ring_size,
        initial_ms: median(initial),
        change_ms: median(change),
    })
}

pub fn print_table(r: &Report) {
    println!(
        "\n## L4 micro-benchmarks ({}; kernel {}; {})\n",
        r.date, r.kernel, r.cpu
    );
    println!("ns per packet, mean / median of single BPF_PROG_RUN runs\n");
    println!(
        "| round | backends | M | SYN, new flow | established, one flow | established, {} flows | floor: bare XDP_TX |",
        r.xdp.first().map_or(0, |x| x.flows)
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for x in &r.xdp {
        println!("{}", x.empty_table.row(x));
    }
    println!(
        "\nThe same with {} flows in the table first, a floor run after each packet\n",
        r.xdp.first().map_or(0, |x| x.full_table.table_flows)
    );
    println!(
        "| round | backends | M | SYN, new flow | established, one flow | established, scattered | floor: bare XDP_TX |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for x in &r.xdp {
        println!("{}", x.full_table.packets.row(x));
    }
    println!("\n| `weir backend set` | ring | from empty (ms) | one replaced (ms) |");
    println!("|---:|---:|---:|---:|");
    for s in &r.backend_set {
        println!(
            "| {} | {} | {:.1} | {:.1} |",
            s.backends, s.ring_size, s.initial_ms, s.change_ms
        );
    }
}
