//! How soon a backend added through etcd is in use: `weir agent` follows a
//! key prefix of a real 3-member etcd cluster (the test bed's
//! [`EtcdCluster`]) and applies each revision to the registry; `weir run`
//! serves the service. The service is seeded with 10, 1,000 and 10,000
//! backends (`--quick`: 10 and 1,000), then one backend at a time joins by
//! one etcd write and leaves again by another. weir only: the peers have
//! no etcd source to compare.
//!
//! Per join, from the instant the write returned to the bench's client:
//! - the agent: its `source_applied` log line for the write's revision;
//! - the XDP ring: the registry's generation counter is read every 200 µs
//!   and, once it moved, the service's ring in the pinned maps is read for
//!   the joiner (the registry writes the ring before it bumps the counter);
//! - `weir run`: the start of the first connection it sent to the joiner,
//!   among new connections arriving at a steady rate. The joiner weighs as
//!   much as all the others together, so it takes about half the new
//!   connections whatever the backend count, and the figure's resolution,
//!   1/(rate × share), stays near 2.5 ms at 800 connections/s.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use etcd_client::{Client, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use weir::instance::Instance;
use weir::registry::maps::GenerationWatch;
use weir::registry::{BackendAddr, Maps, Registry, ServiceAddr, maglev};
use weir_ebpf::abi::BackendState;
use weir_testbed::agent::Agent;
use weir_testbed::etcd::EtcdCluster;

use crate::load::{self, ConnRecord, Talk};
use crate::scenario::{Outcome, Scenario};
use crate::stage::Bench;
use crate::systems::{Kind, Running, unix_us_of_rfc3339};
use crate::table::{Table, fmt_f, fmt_int, fmt_pct, measured, median_f};

/// The seeded backends: one `weir-echo` listening on consecutive ports of
/// one backend namespace's address, all named [`BASE_NAME`].
const BASE_NS: usize = 1;
const BASE_PORT: u16 = 20_000;
const BASE_NAME: &str = "seeded";
/// The joiners: one `weir-echo` each in another backend namespace, port
/// [`JOIN_PORT`] + k, named `joiner-k` so their connections are told apart.
const JOIN_NS: usize = 2;
const JOIN_PORT: u16 = 31_000;
/// A join not seen within this is a fault; so is a leave, which stops the
/// run.
const BOUND: Duration = Duration::from_secs(30);
/// How often the generation counter is read.
const POLL: Duration = Duration::from_micros(200);
/// Connections keep arriving this long once the joiner is in the ring,
/// before it leaves; and this long after it left, before the next join.
const HOLD: Duration = Duration::from_millis(500);
const SETTLE: Duration = Duration::from_millis(300);
/// Load before the first join.
const WARMUP: Duration = Duration::from_secs(1);
/// etcd's default `--max-txn-ops`: the seed goes in transactions this big.
const MAX_TXN_OPS: usize = 128;
const ARRIVALS_PER_SEC: f64 = 800.0;

/// Sizes of a full run, and of a quick one (`--quick`).
struct Sizes {
    backends: &'static [usize],
    joins: usize,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                backends: &[10, 1_000],
                joins: 5,
            }
        } else {
            Sizes {
                backends: &[10, 1_000, 10_000],
                joins: 10,
            }
        }
    }
}

pub struct Discover;

/// One backend joining through etcd. Times are ms from the instant the
/// etcd write returned.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Join {
    pub backend: String,
    /// The write's own wall time (one put, from the bench's client).
    pub write_ms: f64,
    /// The agent's `source_applied` log line for the write's revision.
    pub applied_ms: Option<f64>,
    /// The service's ring in the pinned maps first read holding the joiner.
    pub ring_ms: Option<f64>,
    /// The start of the first connection `weir run` sent to the joiner
    /// (negative: it started while the write ran).
    pub weir_run_ms: Option<f64>,
    /// Connections that reached a backend while the joiner was in the ring
    /// (from the ring read holding it to its leave's write), and how many
    /// of them it got.
    pub while_in: u64,
    pub reached: u64,
}

/// weir with one seeded backend count.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DiscoverRow {
    pub system: String,
    /// Backends seeded in etcd before the joins.
    pub backends: usize,
    pub ring_size: u32,
    pub arrivals_per_sec: f64,
    /// From the agent's start until the registry held the seeded backends.
    pub seed_ms: f64,
    pub joins: Vec<Join>,
    /// Connections that reached a backend, and the ones that did not.
    pub identified: u64,
    pub failed: u64,
}

measured!(DiscoverRow);

impl DiscoverRow {
    /// Joins the ring or `weir run` did not show within [`BOUND`].
    fn unseen(&self) -> usize {
        let bound = BOUND.as_secs_f64() * 1e3;
        let late = |ms: Option<f64>| ms.is_none_or(|ms| ms > bound);
        self.joins
            .iter()
            .filter(|j| late(j.ring_ms) || late(j.weir_run_ms))
            .count()
    }
}

impl Scenario for Discover {
    const NAME: &'static str = "discover";
    const TITLE: &'static str = "Backend added through etcd";
    const SYSTEMS: &'static [&'static str] = &["weir"];

    type Row = DiscoverRow;

    fn run(b: &mut Bench) -> Result<Outcome<DiscoverRow>> {
        let s = Sizes::new(b.sizes.quick);
        let mut out = Outcome::new(&[
            (
                "backends",
                s.backends
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            ("joins_per_size", s.joins.to_string()),
            ("arrivals_per_s", ARRIVALS_PER_SEC.to_string()),
            ("per_connection", "handshake, one 64 B echo, close".into()),
            (
                "etcd",
                "3 members on loopback, one put per join and one delete per leave".into(),
            ),
        ]);
        let largest = s.backends.iter().copied().max().unwrap_or(0);
        b.progress("starting etcd (3 members) and the backends");
        let cluster = EtcdCluster::start("bench-discover")?;
        let echoes = Echoes::start(b, largest, s.joins)?;
        for &n in s.backends {
            match size_row(b, &s, &cluster, &echoes, n) {
                Ok(row) => out.rows.push(row),
                Err(e) => out.notes.push(format!("weir, {n} backends: {e:#}")),
            }
        }
        echoes.stop(b);
        Ok(out)
    }

    fn faults(rows: &[DiscoverRow]) -> Vec<String> {
        let mut bad = Vec::new();
        for x in rows {
            if x.joins.is_empty() || x.identified == 0 {
                bad.push(format!(
                    "discover: weir with {} backends made {} joins, {} connections reached a \
                     backend",
                    x.backends,
                    x.joins.len(),
                    x.identified
                ));
            }
            let unseen = x.unseen();
            if unseen > 0 {
                bad.push(format!(
                    "discover: weir with {} backends: {unseen} of {} joins not seen in the ring \
                     or by weir run within {} s",
                    x.backends,
                    x.joins.len(),
                    BOUND.as_secs()
                ));
            }
        }
        bad
    }

    fn section(out: &mut String, rows: &[DiscoverRow]) {
        let mut t = Table::new(&[
            "system",
            "backends",
            "ring slots",
            "seeded in",
            "joins",
            "etcd write (median)",
            "agent applied (median)",
            "XDP ring: median",
            "max",
            "weir run: median",
            "max",
            "joiner's share",
            "resolution",
            "not seen in 30 s",
            "connections (failed)",
        ]);
        let ms = |v: Option<f64>| v.map_or("–".into(), |m| format!("{} ms", fmt_f(m, 1)));
        for r in rows {
            let of = |f: fn(&Join) -> Option<f64>| -> Vec<f64> {
                r.joins.iter().filter_map(f).collect()
            };
            let mut write = of(|j| Some(j.write_ms));
            let mut applied = of(|j| j.applied_ms);
            let mut ring = of(|j| j.ring_ms);
            let mut weir_run = of(|j| j.weir_run_ms);
            let max = |v: &[f64]| v.iter().copied().max_by(f64::total_cmp);
            let reached: u64 = r.joins.iter().map(|j| j.reached).sum();
            let while_in: u64 = r.joins.iter().map(|j| j.while_in).sum();
            t.row(vec![
                r.system.clone(),
                fmt_int(r.backends as u64),
                fmt_int(u64::from(r.ring_size)),
                format!("{} s", fmt_f(r.seed_ms / 1e3, 2)),
                fmt_int(r.joins.len() as u64),
                ms(median_f(&mut write)),
                ms(median_f(&mut applied)),
                ms(median_f(&mut ring)),
                ms(max(&ring)),
                ms(median_f(&mut weir_run)),
                ms(max(&weir_run)),
                fmt_pct(reached as f64, while_in as f64),
                ms(resolution_ms(r.arrivals_per_sec, reached, while_in)),
                fmt_int(r.unseen() as u64),
                format!("{} ({})", fmt_int(r.identified), fmt_int(r.failed)),
            ]);
        }
        t.write(out);
        out.push_str(
            "\nweir only: the peers have no etcd source to compare. `weir agent` follows a key \
             prefix of a 3-member etcd cluster on loopback; the service is seeded with the \
             backends of the row (weight 1 each, one `weir-echo` listening on as many ports), \
             then each join is one etcd put of a new backend weighing as much as all of them \
             together, and its leave one delete, while new connections (handshake, one echo, \
             close) arrive at a steady rate through `weir run`. Times count from the instant \
             the put returned to the bench's etcd client (the write's own time is its \
             column): agent applied is its `source_applied` log line for the put's revision; \
             XDP ring is when the service's ring in the pinned maps was first read holding the \
             joiner (the registry's generation counter is read every 200 µs and the ring once \
             it moved; the registry writes the ring before it bumps the counter, so the figure \
             is late by at most the time between the two and one poll); weir run is the start of the first connection it \
             sent to the joiner (negative: it started before the put returned). weir run reads \
             the counter on every accept, so that figure is the ring's plus the wait for the \
             next connection that picks the joiner, resolution on average: 1/(rate × share), \
             the share being the joiner's part of the connections that arrived while it was \
             in the ring. Seeded in: from the agent's start (reading the whole prefix) until \
             the registry held every seeded backend, read every millisecond.\n",
        );
    }
}

/// The mean wait for a connection that picks the joiner: what the weir
/// run figure cannot resolve.
fn resolution_ms(arrivals_per_sec: f64, reached: u64, while_in: u64) -> Option<f64> {
    let share = reached as f64 / while_in as f64;
    (reached > 0 && arrivals_per_sec > 0.0).then(|| 1e3 / (arrivals_per_sec * share))
}

/// The echo backends of the scenario, on the bench's topology.
struct Echoes {
    seeded: u32,
    joiners: Vec<u32>,
    seeded_addr: IpAddr,
    joiner_addr: IpAddr,
}

impl Echoes {
    /// `seeded` listeners for the largest size, and `joins` joiners.
    fn start(b: &mut Bench, seeded: usize, joins: usize) -> Result<Echoes> {
        let echo = weir_testbed::workspace_bin("weir-echo");
        let seeded_addr = IpAddr::V4(b.topo.backend_addr(BASE_NS));
        let joiner_addr = IpAddr::V4(b.topo.backend_addr(JOIN_NS));
        let mut args = vec!["--name".to_string(), BASE_NAME.into()];
        for i in 0..seeded {
            args.push("--listen".into());
            args.push(SocketAddr::new(seeded_addr, seeded_port(i)?).to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let ns = b.topo.backend_ns[BASE_NS].clone();
        let (seeded_pid, _) = b
            .topo
            .spawn_ready_in(&ns, &echo, &args, Duration::from_secs(60))?;
        let mut echoes = Echoes {
            seeded: seeded_pid,
            joiners: Vec::new(),
            seeded_addr,
            joiner_addr,
        };
        let ns = b.topo.backend_ns[JOIN_NS].clone();
        for k in 1..=joins {
            let listen = echoes.joiner(k).to_string();
            let started = b.topo.spawn_ready_in(
                &ns,
                &echo,
                &["--listen", &listen, "--name", &joiner_name(k)],
                Duration::from_secs(10),
            );
            match started {
                Ok((pid, _)) => echoes.joiners.push(pid),
                Err(e) => {
                    echoes.stop(b);
                    return Err(e);
                }
            }
        }
        Ok(echoes)
    }

    fn seeded(&self, i: usize) -> Result<SocketAddr> {
        Ok(SocketAddr::new(self.seeded_addr, seeded_port(i)?))
    }

    fn joiner(&self, k: usize) -> SocketAddr {
        SocketAddr::new(self.joiner_addr, JOIN_PORT + k as u16)
    }

    fn stop(self, b: &mut Bench) {
        for pid in std::iter::once(self.seeded).chain(self.joiners) {
            b.topo.stop_child(pid, Duration::from_secs(1));
        }
    }
}

fn seeded_port(i: usize) -> Result<u16> {
    u16::try_from(i)
        .ok()
        .and_then(|i| BASE_PORT.checked_add(i))
        .filter(|p| *p < JOIN_PORT)
        .with_context(|| format!("no port for seeded backend {i}"))
}

/// What joiner `k` (from 1) calls itself in its 101.
fn joiner_name(k: usize) -> String {
    format!("joiner-{k}")
}

/// The bench's client of the etcd cluster: the writes it times, on a
/// runtime of its own.
struct Writer {
    runtime: tokio::runtime::Runtime,
    client: Client,
}

impl Writer {
    fn connect(endpoints: &[String]) -> Result<Writer> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = runtime
            .block_on(Client::connect(endpoints, None))
            .context("connecting to etcd")?;
        Ok(Writer { runtime, client })
    }

    /// Puts every pair, in transactions of at most [`MAX_TXN_OPS`].
    fn seed(&mut self, pairs: &[(String, String)]) -> Result<()> {
        for chunk in pairs.chunks(MAX_TXN_OPS) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(k, v)| TxnOp::put(k.as_str(), v.as_str(), None))
                .collect();
            self.runtime
                .block_on(self.client.txn(Txn::new().and_then(ops)))
                .context("seeding etcd")?;
        }
        Ok(())
    }

    /// One put; the revision it made.
    fn put(&mut self, key: &str, value: &str) -> Result<i64> {
        let r = self
            .runtime
            .block_on(self.client.put(key, value, None))
            .with_context(|| format!("etcd put {key}"))?;
        r.header()
            .map(|h| h.revision())
            .context("etcd answered the put without a revision")
    }

    fn delete(&mut self, key: &str) -> Result<()> {
        self.runtime
            .block_on(self.client.delete(key, None))
            .with_context(|| format!("etcd delete {key}"))
            .map(drop)
    }
}

/// The keys of the discovery source's layout (see the README's section on
/// etcd) under `prefix`.
struct Keys {
    prefix: String,
    service: SocketAddr,
}

impl Keys {
    fn service(&self) -> String {
        format!("{}services/{}", self.prefix, self.service)
    }

    fn backend(&self, backend: SocketAddr) -> String {
        format!("{}backends/{}/{backend}", self.prefix, self.service)
    }
}

/// One seeded size: weir run, the agent, the load and the joins.
fn size_row(
    b: &mut Bench,
    s: &Sizes,
    cluster: &EtcdCluster,
    echoes: &Echoes,
    n: usize,
) -> Result<DiscoverRow> {
    let ring_size = maglev::ring_size_for(n + 1);
    let mut spec = b.spec(Kind::Weir, vec![echoes.seeded(0)?], 1);
    spec.ring_size = Some(ring_size);
    let mut feed = Feed {
        echoes,
        endpoints: cluster.endpoints(),
        keys: Keys {
            prefix: format!("/weir/bench/{n}/"),
            service: spec.listen,
        },
        writer: Writer::connect(&cluster.endpoints())?,
        joins: s.joins,
    };
    let mut pairs = vec![(feed.keys.service(), "{}".to_string())];
    for i in 0..n {
        pairs.push((
            feed.keys.backend(echoes.seeded(i)?),
            r#"{"weight":1}"#.into(),
        ));
    }
    feed.writer.seed(&pairs)?;
    let setup = Setup {
        backends: n,
        ring_size,
        arrivals_per_sec: ARRIVALS_PER_SEC,
        seed_ms: 0.0,
    };
    b.with_system(spec, &format!("dc{n}"), |b, sys| {
        measure(b, sys, &mut feed, setup)
    })
}

/// The facts of one size that its row keeps.
struct Setup {
    backends: usize,
    ring_size: u32,
    arrivals_per_sec: f64,
    seed_ms: f64,
}

/// One size's etcd side: the cluster's endpoints, the keys of its prefix,
/// the client that writes them, and the joiners it adds.
struct Feed<'a> {
    echoes: &'a Echoes,
    endpoints: Vec<String>,
    keys: Keys,
    writer: Writer,
    joins: usize,
}

impl Feed<'_> {
    /// The agent's configuration: this prefix of this cluster.
    fn agent_config(&self) -> String {
        let endpoints: Vec<String> = self.endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        format!(
            "[[source]]\ntype = \"etcd\"\nendpoints = [{}]\nprefix = \"{}\"\n",
            endpoints.join(", "),
            self.keys.prefix
        )
    }
}

fn measure(b: &Bench, sys: &Running, feed: &mut Feed, mut setup: Setup) -> Result<DiscoverRow> {
    let n = setup.backends;
    let instance = sys
        .instances()
        .first()
        .context("weir run has no instance")?
        .clone();
    let dir = b.scratch.join(format!("discover-{n}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ring = Ring::open(&instance, feed.keys.service)?;
    b.progress(&format!(
        "weir, {n} backends: agent seeding from etcd ({ring_size} ring slots)",
        ring_size = setup.ring_size
    ));
    let started = Instant::now();
    let agent = Agent::start(&instance, &dir, &feed.agent_config());
    while ring.active()? < n {
        if started.elapsed() > BOUND {
            bail!(
                "the registry held {} of {n} seeded backends after {} s; agent log:\n{}",
                ring.active()?,
                BOUND.as_secs(),
                tail(&agent.log())
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    setup.seed_ms = started.elapsed().as_secs_f64() * 1e3;

    let mut plan = b.plan(0, Talk::Closed, 64, joins_limit(feed.joins).as_secs_f64());
    plan.arrivals_per_sec = setup.arrivals_per_sec;
    plan.record_connections = true;
    plan.fleet.connect_timeout = Duration::from_secs(3);
    plan.fleet.echo_timeout = Duration::from_secs(3);
    let hold = dir.join("hold");
    plan.fleet.hold_file = Some(hold.clone());
    b.progress(&format!(
        "weir, {n} backends: {} joins, {} new connections/s",
        feed.joins, setup.arrivals_per_sec
    ));
    let clients = b.start_load(&plan, 2)?;
    let marks = joins(feed, &ring, n);
    std::fs::write(&hold, b"x").with_context(|| format!("writing {}", hold.display()))?;
    let r = Bench::wait_load(clients, plan.fleet.duration + Duration::from_secs(60))?;
    let log = agent.log();
    drop(agent);
    let marks = marks.with_context(|| format!("agent log:\n{}", tail(&log)))?;
    let row = row(&setup, &marks, &applied_at(&log), &r.connections);
    let mut in_ring: Vec<f64> = row.joins.iter().filter_map(|j| j.ring_ms).collect();
    let mut weir_run: Vec<f64> = row.joins.iter().filter_map(|j| j.weir_run_ms).collect();
    let med = |v: &mut [f64]| median_f(v).map_or("–".into(), |m| format!("{} ms", fmt_f(m, 1)));
    b.progress(&format!(
        "weir, {n} backends: seeded in {:.2} s; median XDP ring {}, weir run {}",
        setup.seed_ms / 1e3,
        med(&mut in_ring),
        med(&mut weir_run)
    ));
    Ok(row)
}

/// The load's duration: long enough for every join and leave to take the
/// whole bound; the hold file ends it when they are done.
fn joins_limit(joins: usize) -> Duration {
    WARMUP + (BOUND * 2 + HOLD + SETTLE) * joins as u32
}

/// One join as the harness made it, unix µs.
struct Mark {
    /// The joiner's name, as it says in its 101.
    name: String,
    write_started_us: u64,
    returned_us: u64,
    revision: i64,
    /// When the ring was first read holding it (None: not within
    /// [`BOUND`]).
    ring_us: Option<u64>,
    /// When its leave was written: the end of its time in the ring.
    left_us: u64,
}

/// Every join and leave of one size, under the load; a joiner weighs as
/// much as the `n` seeded backends together.
fn joins(feed: &mut Feed, ring: &Ring, n: usize) -> Result<Vec<Mark>> {
    std::thread::sleep(WARMUP);
    let weight = format!(r#"{{"weight":{}}}"#, u16::try_from(n)?);
    let mut marks = Vec::new();
    for k in 1..=feed.joins {
        let addr = feed.echoes.joiner(k);
        let backend = backend_addr(addr)?;
        let key = feed.keys.backend(addr);
        let before = ring.generation();
        let write_started_us = load::unix_us();
        let revision = feed.writer.put(&key, &weight)?;
        let returned_us = load::unix_us();
        let ring_us = ring.change(before, &backend, true)?;
        std::thread::sleep(HOLD);
        let before = ring.generation();
        let left_us = load::unix_us();
        feed.writer.delete(&key)?;
        ensure!(
            ring.change(before, &backend, false)?.is_some(),
            "{addr} was still in the ring {} s after its key was deleted",
            BOUND.as_secs()
        );
        marks.push(Mark {
            name: joiner_name(k),
            write_started_us,
            returned_us,
            revision,
            ring_us,
            left_us,
        });
        std::thread::sleep(SETTLE);
    }
    Ok(marks)
}

fn backend_addr(addr: SocketAddr) -> Result<BackendAddr> {
    match addr.ip() {
        IpAddr::V4(a) => Ok(BackendAddr {
            addr: a,
            port: addr.port(),
        }),
        IpAddr::V6(_) => bail!("{addr}: weir's backends are IPv4"),
    }
}

/// One service of weir's registry as the scenario watches it, through the
/// instance's pinned maps: what XDP would route by.
struct Ring {
    registry: Registry,
    watch: GenerationWatch,
    service: ServiceAddr,
}

impl Ring {
    fn open(instance: &str, service: SocketAddr) -> Result<Ring> {
        let registry = Registry::open(&Instance::new(instance)?)?;
        let watch = registry.maps().generation_watch()?;
        Ok(Ring {
            registry,
            watch,
            service: service.to_string().parse()?,
        })
    }

    fn maps(&self) -> &Maps {
        self.registry.maps()
    }

    fn generation(&self) -> u64 {
        self.watch.get()
    }

    /// Waits until the generation counter moved past `from` with `backend`
    /// in the service's ring (`held`) or out of it; the unix µs the counter
    /// was read moved, None after [`BOUND`].
    fn change(&self, from: u64, backend: &BackendAddr, held: bool) -> Result<Option<u64>> {
        let deadline = Instant::now() + BOUND;
        let mut seen = from;
        loop {
            let generation = self.generation();
            if generation != seen {
                let at = load::unix_us();
                seen = generation;
                if self.holds(backend)? == held {
                    return Ok(Some(at));
                }
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Whether a slot of the service's ring names `backend`.
    fn holds(&self, backend: &BackendAddr) -> Result<bool> {
        let state = self.maps().read_state()?;
        let svc = state
            .services
            .get(&self.service)
            .with_context(|| format!("the registry has no service {}", self.service))?;
        let ids: Vec<u32> = state
            .backends
            .iter()
            .filter(|(_, b)| b.service_id == svc.id && b.addr == *backend)
            .map(|(id, _)| *id)
            .collect();
        if ids.is_empty() {
            return Ok(false);
        }
        let ring = self.maps().read_ring(svc.id)?.unwrap_or_default();
        Ok(ring.iter().any(|id| ids.contains(id)))
    }

    /// Active backends of the service.
    fn active(&self) -> Result<usize> {
        let state = self.maps().read_state()?;
        let Some(svc) = state.services.get(&self.service) else {
            return Ok(0);
        };
        Ok(state
            .backends
            .values()
            .filter(|b| b.service_id == svc.id && b.state == BackendState::Active)
            .count())
    }
}

/// Unix µs of each `source_applied` line of the agent's JSON log, by the
/// revision it names.
fn applied_at(log: &str) -> BTreeMap<i64, u64> {
    log.lines()
        .filter_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            if v["event"].as_str() != Some("source_applied") {
                return None;
            }
            let revision = v["revision"].as_str()?.parse().ok()?;
            Some((revision, unix_us_of_rfc3339(v["timestamp"].as_str()?)?))
        })
        .collect()
}

/// The last lines of a log, for an error message.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

fn row(
    setup: &Setup,
    marks: &[Mark],
    applied: &BTreeMap<i64, u64>,
    records: &[ConnRecord],
) -> DiscoverRow {
    let rel = |at: u64, from: u64| (at as i64 - from as i64) as f64 / 1e3;
    let joins = marks
        .iter()
        .map(|m| {
            let reached_it = |r: &ConnRecord| r.backend.as_deref() == Some(m.name.as_str());
            let first = records
                .iter()
                .filter(|r| reached_it(r))
                .map(|r| r.started_unix_us)
                .min();
            let while_in: Vec<&ConnRecord> = records
                .iter()
                .filter(|r| {
                    r.backend.is_some()
                        && m.ring_us
                            .is_some_and(|t| (t..m.left_us).contains(&r.started_unix_us))
                })
                .collect();
            Join {
                backend: m.name.clone(),
                write_ms: rel(m.returned_us, m.write_started_us),
                applied_ms: applied.get(&m.revision).map(|&t| rel(t, m.returned_us)),
                ring_ms: m.ring_us.map(|t| rel(t, m.returned_us)),
                weir_run_ms: first.map(|t| rel(t, m.returned_us)),
                while_in: while_in.len() as u64,
                reached: while_in.iter().filter(|r| reached_it(r)).count() as u64,
            }
        })
        .collect();
    DiscoverRow {
        system: "weir".into(),
        backends: setup.backends,
        ring_size: setup.ring_size,
        arrivals_per_sec: setup.arrivals_per_sec,
        seed_ms: setup.seed_ms,
        joins,
        identified: records.iter().filter(|r| r.backend.is_some()).count() as u64,
        failed: records.iter().filter(|r| r.backend.is_none()).count() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(started_unix_us: u64, backend: Option<&str>) -> ConnRecord {
        ConnRecord {
            backend: backend.map(str::to_string),
            started_unix_us,
            ending: if backend.is_some() {
                "clean".into()
            } else {
                "handshake:503".into()
            },
            ..ConnRecord::default()
        }
    }

    #[test]
    fn a_join_is_timed_from_the_writes_return() {
        let setup = Setup {
            backends: 1_000,
            ring_size: 100_103,
            arrivals_per_sec: 800.0,
            seed_ms: 1_250.0,
        };
        let marks = [
            Mark {
                name: joiner_name(1),
                write_started_us: 10_000_000,
                returned_us: 10_002_000,
                revision: 7,
                ring_us: Some(10_006_500),
                left_us: 10_506_500,
            },
            // Never seen in the ring, nor by weir run.
            Mark {
                name: joiner_name(2),
                write_started_us: 12_000_000,
                returned_us: 12_001_000,
                revision: 9,
                ring_us: None,
                left_us: 12_501_000,
            },
        ];
        let applied = BTreeMap::from([(7, 10_005_000), (8, 11_000_000)]);
        let records = [
            rec(9_999_000, Some(BASE_NAME)),
            rec(10_006_000, Some(BASE_NAME)),
            // Started before the ring was read holding it: not counted in
            // its share, but the first to reach it.
            rec(10_006_400, Some("joiner-1")),
            rec(10_007_000, Some(BASE_NAME)),
            rec(10_008_000, Some("joiner-1")),
            rec(10_009_000, Some("joiner-1")),
            rec(10_010_000, None),
            // After the leave was written.
            rec(10_600_000, Some(BASE_NAME)),
            rec(12_200_000, Some(BASE_NAME)),
        ];
        let r = row(&setup, &marks, &applied, &records);
        assert_eq!(r.joins.len(), 2);
        let j = &r.joins[0];
        assert_eq!(j.backend, "joiner-1");
        assert_eq!(j.write_ms, 2.0);
        assert_eq!(j.applied_ms, Some(3.0));
        assert_eq!(j.ring_ms, Some(4.5));
        assert_eq!(j.weir_run_ms, Some(4.4));
        assert_eq!((j.while_in, j.reached), (3, 2));
        let j = &r.joins[1];
        assert_eq!((j.applied_ms, j.ring_ms, j.weir_run_ms), (None, None, None));
        assert_eq!((j.while_in, j.reached), (0, 0));
        assert_eq!((r.identified, r.failed), (8, 1));
        assert_eq!(r.unseen(), 1);
        assert_eq!(
            Discover::faults(std::slice::from_ref(&r)),
            vec![
                "discover: weir with 1000 backends: 1 of 2 joins not seen in the ring or by weir \
                 run within 30 s"
                    .to_string()
            ]
        );
        let mut out = String::new();
        Discover::section(&mut out, &[r]);
        assert!(
            out.contains(
                "| weir | 1,000 | 100,103 | 1.25 s | 2 | 2.0 ms | 3.0 ms | 4.5 ms | 4.5 ms | \
                 4.4 ms | 4.4 ms | 66.7% | 1.9 ms | 1 | 8 (1) |"
            ),
            "{out}"
        );
    }

    #[test]
    fn a_size_without_joins_or_traffic_is_a_fault() {
        let empty = DiscoverRow {
            system: "weir".into(),
            backends: 10,
            ..DiscoverRow::default()
        };
        assert_eq!(
            Discover::faults(&[empty]),
            vec![
                "discover: weir with 10 backends made 0 joins, 0 connections reached a backend"
                    .to_string()
            ]
        );
        // A join seen only after the bound is as good as unseen.
        let late = DiscoverRow {
            joins: vec![Join {
                ring_ms: Some(12.0),
                weir_run_ms: Some(31_000.0),
                ..Join::default()
            }],
            identified: 10,
            ..DiscoverRow::default()
        };
        assert_eq!(late.unseen(), 1);
    }

    #[test]
    fn applied_times_come_from_the_agents_json_log() {
        let log = concat!(
            r#"{"timestamp":"2026-12-06T22:00:00.250000Z","level":"INFO","message":"applied: 1 service(s), 1 changed","event":"source_applied","source":"etcd x /weir/bench/10/","revision":"12"}"#,
            "\n",
            r#"{"timestamp":"2026-12-06T22:00:01.000001Z","level":"INFO","message":"+ backend","event":"changed","revision":"13"}"#,
            "\nnot json\n",
            r#"{"timestamp":"2026-12-06T22:00:02.5Z","level":"INFO","message":"applied","event":"source_applied","revision":"14"}"#,
            "\n",
        );
        let at = applied_at(log);
        let base = unix_us_of_rfc3339("2026-12-06T22:00:00Z").unwrap();
        assert_eq!(
            at,
            BTreeMap::from([(12, base + 250_000), (14, base + 2_500_000)])
        );
    }
}
