//! The scenarios. Each runs weir and every peer one after the other on the
//! same topology, backends and load, and returns one [`ScenarioResult`].

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use weir_testbed::topology::{Proc, Topology, TopologySpec};

use crate::load::{self, LoadResult, Plan, Talk};
use crate::procs;
use crate::results::*;
use crate::systems::{Kind, Method, Running, Spec};
use crate::tcpload::TcpResult;

/// Port of the echo backends (WebSocket) and of the sinks (L4).
const ECHO_PORT: u16 = 8080;
const SINK_PORT: u16 = 9000;
/// Where every L7 system listens: the VIP, on the lb's lo.
const L7_PORT: u16 = 8081;
/// HAProxy's TCP-mode listener in the l4 scenario.
const HAPROXY_TCP_PORT: u16 = 9001;
const BACKENDS: usize = 8;
const CLIENT_ADDRS: usize = 16;
/// Connections one generator or proxy process is given at most (below the
/// 20,000 open files per process, two per proxied connection for peers).
const PER_PROCESS: usize = 9000;

pub const ALL: [&str; 6] = ["steady", "idle", "connrate", "churn", "drain", "l4"];

/// Sizes of a run.
#[derive(Clone, Debug)]
pub struct Sizes {
    pub quick: bool,
    pub workers: usize,
    pub steady_connections: usize,
    pub steady_secs: u64,
    /// Open-loop offered rate per message size.
    pub steady_rates: Vec<(usize, f64)>,
    pub idle_counts: Vec<usize>,
    pub connrate_steps: Vec<f64>,
    pub connrate_step_secs: u64,
    pub churn_secs: u64,
    pub churn_period_secs: u64,
    pub churn_connections: usize,
    pub churn_arrivals: f64,
    /// How long an arriving connection lives: longer than the period, as
    /// WebSockets do, so every backend set has connections when it goes.
    pub churn_arrival_life_secs: u64,
    /// Drain window during churn (weir's window, HAProxy's wait before
    /// cutting): shorter than the period, so changes keep their pace.
    pub churn_drain_secs: u64,
    pub drain_connections: usize,
    pub drain_window: Duration,
    pub l4_secs: f64,
    pub l4_streams: usize,
}

impl Sizes {
    pub fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                quick,
                workers: 2,
                steady_connections: 50,
                steady_secs: 3,
                steady_rates: vec![(64, 10_000.0), (4096, 5_000.0), (16_384, 2_000.0)],
                idle_counts: vec![10_000],
                connrate_steps: vec![250.0, 500.0, 1000.0, 2000.0, 4000.0],
                connrate_step_secs: 2,
                churn_secs: 20,
                churn_period_secs: 5,
                churn_connections: 100,
                churn_arrivals: 20.0,
                churn_arrival_life_secs: 10,
                churn_drain_secs: 2,
                drain_connections: 200,
                drain_window: Duration::from_secs(3),
                l4_secs: 3.0,
                l4_streams: 4,
            }
        } else {
            Sizes {
                quick,
                workers: 2,
                steady_connections: 200,
                steady_secs: 15,
                steady_rates: vec![(64, 20_000.0), (4096, 10_000.0), (16_384, 5_000.0)],
                idle_counts: vec![10_000, 50_000, 100_000],
                connrate_steps: vec![
                    1000.0, 2000.0, 4000.0, 6000.0, 8000.0, 10_000.0, 12_000.0, 16_000.0,
                ],
                connrate_step_secs: 4,
                churn_secs: 60,
                churn_period_secs: 5,
                churn_connections: 500,
                churn_arrivals: 20.0,
                churn_arrival_life_secs: 30,
                churn_drain_secs: 2,
                drain_connections: 1000,
                drain_window: Duration::from_secs(10),
                l4_secs: 10.0,
                l4_streams: 8,
            }
        }
    }
}

/// The shared stage: topology, echo backends, and the run's facts.
pub struct Bench {
    pub topo: Topology,
    pub sizes: Sizes,
    pub info: RunInfo,
    echo_pids: Vec<u32>,
    started: Instant,
    scratch: PathBuf,
    load_bin: PathBuf,
    /// The current scenario, for progress lines.
    scenario: String,
}

impl Bench {
    pub fn new(sizes: Sizes, info: RunInfo) -> Result<Bench> {
        let started = Instant::now();
        let load_bin = weir_testbed::workspace_bin("weir-load");
        let echo = weir_testbed::workspace_bin("weir-echo");
        for b in [&load_bin, &echo, &weir_testbed::workspace_bin("weir")] {
            ensure!(
                b.exists(),
                "{} is not built (cargo build --release --workspace --bins)",
                b.display()
            );
        }
        let mut topo = Topology::build(TopologySpec {
            backends: BACKENDS,
            client_addrs: CLIENT_ADDRS,
        })?;
        // Room for 100k connections: wide port ranges, big accept queues,
        // and reuse of TIME_WAIT ports for the proxies' backend connections.
        let wide = [
            "net.ipv4.ip_local_port_range=1024 65535",
            "net.core.somaxconn=16384",
            "net.ipv4.tcp_max_syn_backlog=16384",
            "net.ipv4.tcp_tw_reuse=1",
        ];
        let mut all = vec![topo.client_ns.clone(), topo.lb_ns.clone()];
        all.extend(topo.backend_ns.iter().cloned());
        for ns in &all {
            for s in wide {
                topo.run_ok_in(ns, "sysctl", &["-q", "-w", s])?;
            }
        }
        // The L7 systems listen on the VIP, which the lb host owns.
        let lb_ns = topo.lb_ns.clone();
        topo.run_ok_in(
            &lb_ns,
            "ip",
            &["addr", "add", &format!("{}/32", topo.vip()), "dev", "lo"],
        )?;
        let mut echo_pids = Vec::new();
        for i in 0..BACKENDS {
            let ns = topo.backend_ns[i].clone();
            let (pid, _) = topo.spawn_ready_in(
                &ns,
                &echo,
                &[
                    "--listen",
                    &format!("0.0.0.0:{ECHO_PORT}"),
                    "--name",
                    &format!("b{i}"),
                ],
                Duration::from_secs(10),
            )?;
            echo_pids.push(pid);
        }
        let scratch = std::env::temp_dir().join(format!("weir-bench-{}", std::process::id()));
        std::fs::create_dir_all(&scratch)?;
        weir_testbed::topology::register_cleanup_command(remove_dir(&scratch));
        Ok(Bench {
            topo,
            sizes,
            info,
            echo_pids,
            started,
            scratch,
            load_bin,
            scenario: String::new(),
        })
    }

    pub fn finish(self) -> Result<()> {
        crate::systems::undo(&remove_dir(&self.scratch));
        self.topo.teardown()
    }

    fn progress(&self, what: &str) {
        eprintln!(
            "[{:>6.1}s] {}: {what}",
            self.started.elapsed().as_secs_f64(),
            self.scenario
        );
    }

    fn backend(&self, i: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.topo.backend_addr(i)), ECHO_PORT)
    }

    fn listen(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.topo.vip()), L7_PORT)
    }

    fn url(&self) -> String {
        format!("ws://{}/", self.listen())
    }

    fn spec(&self, kind: Kind, backends: Vec<SocketAddr>, shards: usize) -> Spec {
        Spec {
            kind,
            listen: self.listen(),
            backends,
            workers: self.sizes.workers,
            shards,
            drain_window: Some(self.sizes.drain_window),
            tcp_mode: false,
        }
    }

    fn all_backends(&self) -> Vec<SocketAddr> {
        (0..BACKENDS).map(|i| self.backend(i)).collect()
    }

    fn sources(&self) -> Vec<IpAddr> {
        self.topo
            .client_addrs()
            .into_iter()
            .map(IpAddr::V4)
            .collect()
    }

    /// Starts a system, runs `f` with it, and stops it whatever `f` did.
    fn with_system<T>(
        &mut self,
        spec: Spec,
        tag: &str,
        f: impl FnOnce(&Bench, &mut Running) -> Result<T>,
    ) -> Result<T> {
        let mut sys = Running::start(&mut self.topo, spec, tag)?;
        let r = f(self, &mut sys);
        sys.stop(&mut self.topo);
        r
    }

    /// Starts the generator processes of `plan`, split `processes` ways.
    fn start_load(&self, plan: &Plan, processes: usize) -> Result<Vec<Proc>> {
        let processes = processes.max(1);
        let sources = self.sources();
        let mut procs = Vec::new();
        for k in 0..processes {
            let mut p = plan.clone();
            p.connections =
                plan.connections / processes + usize::from(k < plan.connections % processes);
            p.arrivals_per_sec = plan.arrivals_per_sec / processes as f64;
            if let Talk::Open(rate) = plan.talk {
                p.talk = Talk::Open(rate * p.connections as f64 / plan.connections.max(1) as f64);
            }
            p.sources = sources.iter().skip(k).step_by(processes).copied().collect();
            if p.sources.is_empty() {
                p.sources = sources.clone();
            }
            p.ready_file = plan.ready_file.as_ref().map(|f| with_suffix(f, k));
            if p.connections == 0 && p.arrivals_per_sec == 0.0 {
                continue;
            }
            let json = serde_json::to_string(&p)?;
            procs.push(self.topo.start_in(
                &self.topo.client_ns,
                &self.load_bin,
                &["ws", "--plan", &json, "--threads", "1"],
            )?);
        }
        Ok(procs)
    }

    /// Starts `plan` (it names a hold and a ready file) split `processes`
    /// ways and waits until every process finished connecting; returns the
    /// processes and their ready files. Past `limit` the hold file ends
    /// them and this fails.
    fn start_held(
        &self,
        plan: &Plan,
        processes: usize,
        limit: Duration,
    ) -> Result<(Vec<Proc>, Vec<PathBuf>)> {
        let ready = plan
            .ready_file
            .as_ref()
            .context("a held plan names a ready file")?;
        let hold = plan
            .hold_file
            .as_ref()
            .context("a held plan names a hold file")?;
        let clients = self.start_load(plan, processes)?;
        let files: Vec<PathBuf> = (0..processes.max(1))
            .map(|k| with_suffix(ready, k))
            .collect();
        let deadline = Instant::now() + limit;
        while !files.iter().all(|f| f.exists()) {
            if Instant::now() > deadline {
                let _ = std::fs::write(hold, b"x");
                bail!(
                    "{} connections did not finish connecting in {limit:?}",
                    plan.connections
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok((clients, files))
    }

    fn wait_load(procs: Vec<Proc>, limit: Duration) -> Result<LoadResult> {
        let mut parts = Vec::new();
        for p in procs {
            let out = p.wait_output(limit)?;
            ensure!(
                out.status.success(),
                "weir-load failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            parts.push(
                serde_json::from_slice::<LoadResult>(&out.stdout)
                    .context("parsing weir-load's result")?,
            );
        }
        LoadResult::merge(&parts)
    }

    /// Runs a plan to its end, measuring the proxy's and the backends' CPU.
    fn measure(
        &self,
        sys: Option<&Running>,
        plan: &Plan,
        processes: usize,
    ) -> Result<(LoadResult, CpuSplit)> {
        let proxy_pids = sys.map(Running::pids).unwrap_or_default();
        let p0 = procs::cpu_by_pid(&proxy_pids);
        let b0 = procs::cpu_s(&self.echo_pids);
        let t0 = Instant::now();
        let running = self.start_load(plan, processes)?;
        let r = Self::wait_load(running, plan.duration + Duration::from_secs(90))?;
        let wall = t0.elapsed().as_secs_f64();
        let proxy_pids = sys.map(Running::pids).unwrap_or_default();
        let split = CpuSplit {
            proxy_s: procs::cpu_delta(&p0, &procs::cpu_by_pid(&proxy_pids)),
            generator_s: r.cpu_s,
            backends_s: procs::cpu_s(&self.echo_pids) - b0,
            wall_s: wall,
        };
        Ok((r, split))
    }

    fn plan(&self, connections: usize, talk: Talk, bytes: usize, secs: f64) -> Plan {
        Plan {
            url: self.url(),
            connections,
            talk,
            message_bytes: bytes,
            duration: Duration::from_secs_f64(secs),
            epoch_unix_ms: load::unix_ms(),
            ..Plan::default()
        }
    }

    fn result(&self, scenario: &str, params: &[(&str, String)]) -> ScenarioResult {
        ScenarioResult {
            scenario: scenario.into(),
            info: self.info.clone(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            ..ScenarioResult::default()
        }
    }

    pub fn run(&mut self, scenario: &str) -> Result<ScenarioResult> {
        self.scenario = scenario.to_string();
        match scenario {
            "steady" => self.steady(),
            "idle" => self.idle(),
            "connrate" => self.connrate(),
            "churn" => self.churn(),
            "drain" => self.drain(),
            "l4" => self.l4(),
            other => bail!("unknown scenario {other:?} (known: {})", ALL.join(", ")),
        }
    }

    // -- steady ---------------------------------------------------------

    fn steady(&mut self) -> Result<ScenarioResult> {
        let s = self.sizes.clone();
        let mut out = self.result(
            "steady",
            &[
                ("connections", s.steady_connections.to_string()),
                ("seconds_per_phase", s.steady_secs.to_string()),
                ("open_rates", format!("{:?}", s.steady_rates)),
                ("workers", s.workers.to_string()),
            ],
        );
        // `direct`: the generator against one echo backend, no proxy: what
        // the load side can do on its own.
        let mut systems: Vec<Option<Kind>> = vec![None];
        systems.extend(Kind::ALL.map(Some));
        for kind in systems {
            let name = kind.map(Kind::name).unwrap_or("direct");
            let rows = match kind {
                Some(k) => {
                    let spec = self.spec(k, self.all_backends(), 1);
                    self.with_system(spec, "st", |b, sys| b.steady_rows(name, Some(sys)))
                }
                None => self.steady_rows(name, None),
            };
            match rows {
                Ok(rows) => out.steady.extend(rows),
                Err(e) => out.notes.push(format!("{name}: {e:#}")),
            }
        }
        Ok(out)
    }

    fn steady_rows(&self, name: &str, running: Option<&mut Running>) -> Result<Vec<SteadyRow>> {
        let s = &self.sizes;
        let running = running.map(|r| &*r);
        let mut rows = Vec::new();
        for &(bytes, rate) in &s.steady_rates {
            let url = match running {
                Some(_) => self.url(),
                None => format!("ws://{}/", self.backend(0)),
            };
            self.progress(&format!(
                "{name}, {bytes} B, closed loop, {}s",
                s.steady_secs
            ));
            let mut plan = self.plan(
                s.steady_connections,
                Talk::Closed,
                bytes,
                s.steady_secs as f64,
            );
            plan.url = url.clone();
            let (closed, closed_cpu) = self.measure(running, &plan, 2)?;
            self.progress(&format!("{name}, {bytes} B, open loop at {rate} msgs/s"));
            let mut plan = self.plan(
                s.steady_connections,
                Talk::Open(rate),
                bytes,
                s.steady_secs as f64,
            );
            plan.url = url;
            let (open, open_cpu) = self.measure(running, &plan, 2)?;
            let lat = load::latency_of(&load::decode_histogram(&open.latency)?);
            let closed_rate = closed.echoed as f64 / s.steady_secs as f64;
            rows.push(SteadyRow {
                system: name.into(),
                message_bytes: bytes,
                connections: s.steady_connections,
                closed_msgs_per_sec: closed_rate,
                cpu_s_per_million: if closed.echoed > 0 {
                    closed_cpu.proxy_s / closed.echoed as f64 * 1e6
                } else {
                    0.0
                },
                closed_cpu,
                open_rate: rate,
                open_achieved: open.echoed as f64 / s.steady_secs as f64,
                open_latency: lat,
                open_cpu,
                errors: closed.lost
                    + open.lost
                    + closed.cut()
                    + open.cut()
                    + closed.handshakes_failed
                    + open.handshakes_failed,
            });
        }
        Ok(rows)
    }

    // -- idle -----------------------------------------------------------

    fn idle(&mut self) -> Result<ScenarioResult> {
        let s = self.sizes.clone();
        let mut out = self.result(
            "idle",
            &[
                ("counts", format!("{:?}", s.idle_counts)),
                ("per_process", PER_PROCESS.to_string()),
            ],
        );
        for &n in &s.idle_counts {
            let shards = n.div_ceil(PER_PROCESS);
            for kind in Kind::ALL {
                let spec = self.spec(kind, self.all_backends(), shards);
                let row = self.with_system(spec, "id", |b, sys| b.idle_row(sys, n, shards));
                match row {
                    Ok(row) => out.idle.push(row),
                    Err(e) => out.notes.push(format!("{} at {n}: {e:#}", kind.name())),
                }
                // Sockets of the last round leave TIME_WAIT behind; give the
                // kernel a moment so the next round's memory baseline is
                // not still shrinking.
                std::thread::sleep(Duration::from_secs(2));
            }
        }
        Ok(out)
    }

    fn idle_row(&self, sys: &Running, n: usize, shards: usize) -> Result<IdleRow> {
        let name = sys.spec.kind.name();
        std::thread::sleep(Duration::from_millis(500));
        let before = procs::pss_kib(&sys.pids());
        let kernel_before = procs::kernel_socket_bytes();
        self.progress(&format!(
            "{name}: opening {n} idle connections ({shards} shards)"
        ));
        let hold = self.scratch.join(format!("hold-idle-{name}-{n}"));
        let _ = std::fs::remove_file(&hold);
        // Two halves: the second half's memory is the marginal cost of a
        // connection, free of warm-up (buffer pools, first allocations).
        let mut clients = Vec::new();
        let mut ready_files = Vec::new();
        let mut mid = (0, 0);
        for half in 0..2 {
            let ready = self.scratch.join(format!("ready-idle-{name}-{n}-{half}"));
            let count = if half == 0 { n / 2 } else { n - n / 2 };
            let mut plan = self.plan(count, Talk::Idle, 64, 600.0);
            plan.hold_file = Some(hold.clone());
            plan.ready_file = Some(ready.clone());
            plan.connect_concurrency = 100;
            let gens = count.div_ceil(PER_PROCESS);
            let (started, files) = self.start_held(&plan, gens, Duration::from_secs(300))?;
            clients.extend(started);
            ready_files.extend(files);
            // Let lazily freed memory settle before reading it.
            std::thread::sleep(Duration::from_secs(2));
            if half == 0 {
                mid = (procs::pss_kib(&sys.pids()), n / 2);
            }
        }
        let pids = sys.pids();
        let after = procs::pss_kib(&pids);
        let kernel_after = procs::kernel_socket_bytes();
        self.progress(&format!(
            "{name}: {n} open; proxy {before} -> {} -> {after} KiB; checking each with an echo",
            mid.0
        ));
        std::fs::write(&hold, b"done")?;
        let r = Self::wait_load(clients, Duration::from_secs(300));
        let _ = std::fs::remove_file(&hold);
        for f in &ready_files {
            let _ = std::fs::remove_file(f);
        }
        let r = r?;
        let held = r.alive_at_end as usize;
        Ok(IdleRow {
            system: name.into(),
            connections: n,
            held,
            shards,
            rss_before_kib: before,
            rss_after_kib: after,
            rss_bytes_per_conn: per(after.saturating_sub(before) * 1024, held),
            marginal_bytes_per_conn: per(after.saturating_sub(mid.0) * 1024, n - mid.1),
            kernel_bytes_per_conn: per(kernel_after.saturating_sub(kernel_before), held),
            processes: pids.len(),
            endings: r.endings,
        })
    }

    // -- connrate -------------------------------------------------------

    fn connrate(&mut self) -> Result<ScenarioResult> {
        let s = self.sizes.clone();
        let mut out = self.result(
            "connrate",
            &[
                ("steps", format!("{:?}", s.connrate_steps)),
                ("step_seconds", s.connrate_step_secs.to_string()),
                (
                    "per_connection",
                    "handshake, one 64 B echo, close 1000".into(),
                ),
            ],
        );
        for kind in Kind::ALL {
            let spec = self.spec(kind, self.all_backends(), 1);
            match self.with_system(spec, "cr", |b, sys| b.connrate_row(sys)) {
                Ok(row) => out.connrate.push(row),
                Err(e) => out.notes.push(format!("{}: {e:#}", kind.name())),
            }
        }
        Ok(out)
    }

    fn connrate_row(&self, sys: &Running) -> Result<ConnrateRow> {
        let s = &self.sizes;
        let name = sys.spec.kind.name();
        let mut row = ConnrateRow {
            system: name.into(),
            stopped_by: "cap".into(),
            ..ConnrateRow::default()
        };
        for &target in &s.connrate_steps {
            self.progress(&format!(
                "{name}: {target} handshakes/s for {}s",
                s.connrate_step_secs
            ));
            let mut plan = self.plan(0, Talk::Closed, 64, s.connrate_step_secs as f64);
            plan.arrivals_per_sec = target;
            plan.connect_timeout = Duration::from_secs(3);
            plan.echo_timeout = Duration::from_secs(3);
            let (r, cpu) = self.measure(Some(sys), &plan, 2)?;
            let step = ConnrateStep {
                target,
                achieved: r.handshakes_ok as f64 / s.connrate_step_secs as f64,
                ok: r.handshakes_ok,
                failed: r.handshakes_failed + r.cut(),
                handshake: load::latency_of(&load::decode_histogram(&r.handshake)?),
                cpu,
                endings: r.endings.clone(),
            };
            let offered = target * s.connrate_step_secs as f64;
            let late = r.arrivals_late as f64 > 0.02 * offered;
            let failed = step.failed > 0;
            let saturated =
                step.achieved < 0.9 * target || step.handshake.p99_us > CLEAN_HANDSHAKE_P99_US;
            if !failed && !saturated && !late && step.achieved > row.max_clean_rate {
                row.max_clean_rate = step.achieved;
                row.handshakes_per_cpu_s = if step.cpu.proxy_s > 0.0 {
                    step.ok as f64 / step.cpu.proxy_s
                } else {
                    0.0
                };
            }
            row.steps.push(step);
            if failed || saturated || late {
                row.stopped_by = if failed {
                    "errors"
                } else if late {
                    "generator"
                } else {
                    "saturated"
                }
                .into();
                break;
            }
            // Let the step's TIME_WAIT and backlog drain.
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(row)
    }

    // -- churn ----------------------------------------------------------

    fn churn(&mut self) -> Result<ScenarioResult> {
        let s = self.sizes.clone();
        let mut out = self.result(
            "churn",
            &[
                ("seconds", s.churn_secs.to_string()),
                ("replace_every_s", s.churn_period_secs.to_string()),
                (
                    "long_lived",
                    format!(
                        "{} at 10 msgs/s each, reconnect after any close",
                        s.churn_connections
                    ),
                ),
                (
                    "arrivals_per_s",
                    format!(
                        "{} living {} s at 10 msgs/s",
                        s.churn_arrivals, s.churn_arrival_life_secs
                    ),
                ),
                ("sets", "b0-b3 and b4-b7, alternating".into()),
                ("drain_window_s", s.churn_drain_secs.to_string()),
            ],
        );
        let set_a: Vec<SocketAddr> = (0..4).map(|i| self.backend(i)).collect();
        let set_b: Vec<SocketAddr> = (4..8).map(|i| self.backend(i)).collect();
        let cases = [
            (Kind::Weir, Method::WeirCli),
            (Kind::Haproxy, Method::HaproxyApi),
            (Kind::Haproxy, Method::Reload),
            (Kind::Nginx, Method::Reload),
        ];
        for (kind, method) in cases {
            let label = method.label(kind);
            let mut spec = self.spec(kind, set_a.clone(), 1);
            spec.drain_window = Some(Duration::from_secs(s.churn_drain_secs));
            if method == Method::Reload {
                // Both peers' defaults: old workers live as long as their
                // connections.
                spec.drain_window = None;
            }
            let (a, b) = (set_a.clone(), set_b.clone());
            match self.with_system(spec, "ch", |bench, sys| {
                bench.churn_row(sys, method, &a, &b)
            }) {
                Ok(row) => out.churn.push(row),
                Err(e) => out.notes.push(format!("{label}: {e:#}")),
            }
        }
        Ok(out)
    }

    fn churn_row(
        &self,
        sys: &mut Running,
        method: Method,
        set_a: &[SocketAddr],
        set_b: &[SocketAddr],
    ) -> Result<ChurnRow> {
        let s = &self.sizes;
        let label = method.label(sys.spec.kind);
        std::thread::sleep(Duration::from_millis(300));
        let rss_before = procs::pss_kib(&sys.pids());
        let mut plan = self.plan(
            s.churn_connections,
            Talk::Open(10.0 * s.churn_connections as f64),
            64,
            s.churn_secs as f64,
        );
        plan.arrivals_per_sec = s.churn_arrivals;
        plan.arrival_life = Duration::from_secs(s.churn_arrival_life_secs);
        plan.arrival_interval = Duration::from_millis(100);
        plan.reconnect = true;
        self.progress(&format!(
            "{label}: load for {}s, backend set replaced every {}s",
            s.churn_secs, s.churn_period_secs
        ));
        let started = Instant::now();
        let clients = self.start_load(&plan, 1)?;
        let mut changes = Vec::new();
        let mut k = 1;
        loop {
            let at = started + Duration::from_secs(s.churn_period_secs * k);
            if at + Duration::from_secs(s.churn_period_secs)
                > started + Duration::from_secs(s.churn_secs)
            {
                break;
            }
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            let set = if k % 2 == 1 { set_b } else { set_a };
            let took = sys.set_backends(&self.topo, set, method)?;
            changes.push(took.as_millis() as u64);
            k += 1;
        }
        // The proxy's processes and memory while the last connections
        // are still open (old reload workers leave once theirs close).
        let end = started + Duration::from_secs(s.churn_secs);
        std::thread::sleep(end.saturating_duration_since(Instant::now() + Duration::from_secs(1)));
        let pids = sys.pids();
        let rss_after = procs::pss_kib(&pids);
        let r = Self::wait_load(clients, Duration::from_secs(s.churn_secs + 90))?;
        let row = ChurnRow {
            system: label.clone(),
            seconds: s.churn_secs as f64,
            changes: changes.len(),
            change_ms: changes,
            handshakes_ok: r.handshakes_ok,
            handshakes_failed: r.handshakes_failed,
            cut: r.cut(),
            closed_by_peer: r.closed_by_peer(),
            messages_echoed: r.echoed,
            endings: r.endings.clone(),
            processes_after: pids.len(),
            rss_after_kib: rss_after,
            rss_before_kib: rss_before,
            timeline: r.timeline.clone(),
        };
        self.progress(&format!(
            "{label}: {} handshakes ok, {} failed, {} cut, {} processes after",
            r.handshakes_ok,
            r.handshakes_failed,
            r.cut(),
            pids.len()
        ));
        Ok(row)
    }

    // -- drain ----------------------------------------------------------

    fn drain(&mut self) -> Result<ScenarioResult> {
        let s = self.sizes.clone();
        let mut out = self.result(
            "drain",
            &[
                ("connections", s.drain_connections.to_string()),
                ("window_s", s.drain_window.as_secs_f64().to_string()),
            ],
        );
        let cases = [
            (
                Kind::Weir,
                Method::WeirCli,
                "weir backend set (drain window)",
            ),
            (
                Kind::Haproxy,
                Method::HaproxyApi,
                "set server state drain; window; shutdown sessions; del server",
            ),
            (
                Kind::Haproxy,
                Method::Reload,
                "reload with hard-stop-after = window",
            ),
            (
                Kind::Nginx,
                Method::Reload,
                "reload with worker_shutdown_timeout = window",
            ),
        ];
        for (kind, method, how) in cases {
            let label = method.label(kind);
            let spec = self.spec(kind, vec![self.backend(0)], 1);
            match self.with_system(spec, "dr", |b, sys| b.drain_row(sys, method, how)) {
                Ok(row) => out.drain.push(row),
                Err(e) => out.notes.push(format!("{label}: {e:#}")),
            }
        }
        Ok(out)
    }

    fn drain_row(&self, sys: &mut Running, method: Method, how: &str) -> Result<DrainRow> {
        let s = &self.sizes;
        let label = method.label(sys.spec.kind);
        let hold = self.scratch.join(format!("hold-drain-{label}"));
        let ready = self.scratch.join(format!("ready-drain-{label}"));
        let _ = std::fs::remove_file(&hold);
        let n = s.drain_connections;
        let mut plan = self.plan(n, Talk::Open(n as f64), 64, 120.0);
        plan.hold_file = Some(hold.clone());
        plan.ready_file = Some(ready.clone());
        plan.record_connections = true;
        self.progress(&format!("{label}: {n} connections on b0"));
        let (clients, ready_files) = self.start_held(&plan, 1, Duration::from_secs(60))?;
        std::thread::sleep(Duration::from_secs(1));
        let removed_at = load::unix_ms();
        self.progress(&format!("{label}: b0 replaced by b1 ({how})"));
        sys.set_backends(&self.topo, &[self.backend(1)], method)?;
        // Wait for the window, and then some, before counting.
        let settle = removed_at + (s.drain_window + Duration::from_secs(5)).as_millis() as u64;
        std::thread::sleep(Duration::from_millis(
            settle.saturating_sub(load::unix_ms()),
        ));
        std::fs::write(&hold, b"done")?;
        let r = Self::wait_load(clients, Duration::from_secs(90))?;
        let _ = std::fs::remove_file(&hold);
        for f in &ready_files {
            let _ = std::fs::remove_file(f);
        }
        // Connections of b0 that ended before we stopped the run.
        let mut closes: Vec<u64> = r
            .connections
            .iter()
            .filter(|c| c.backend.as_deref() == Some("b0") && c.ending != load::ending::CLEAN)
            .map(|c| c.ended_unix_ms.saturating_sub(removed_at))
            .collect();
        closes.sort_unstable();
        let still_open = r
            .connections
            .iter()
            .filter(|c| c.backend.as_deref() == Some("b0") && c.ending == load::ending::CLEAN)
            .count() as u64;
        let mut endings = Endings::new();
        for c in r
            .connections
            .iter()
            .filter(|c| c.backend.as_deref() == Some("b0"))
        {
            let e = if c.ending == load::ending::CLEAN {
                load::ending::OPEN.to_string()
            } else {
                c.ending.clone()
            };
            *endings.entry(e).or_default() += 1;
        }
        Ok(DrainRow {
            system: label.clone(),
            method: how.into(),
            connections: r
                .connections
                .iter()
                .filter(|c| c.backend.as_deref() == Some("b0"))
                .count(),
            window_s: s.drain_window.as_secs_f64(),
            endings,
            first_close_ms: closes.first().copied(),
            median_close_ms: closes.get(closes.len() / 2).copied(),
            last_close_ms: closes.last().copied(),
            still_open,
        })
    }

    // -- l4 -------------------------------------------------------------

    fn l4(&mut self) -> Result<ScenarioResult> {
        let s = self.sizes.clone();
        let mut out = self.result(
            "l4",
            &[
                ("seconds", s.l4_secs.to_string()),
                ("streams", s.l4_streams.to_string()),
                ("conn_concurrency", "64".into()),
                ("backends", "4 weir-sink".into()),
            ],
        );
        let weir = weir_testbed::workspace_bin("weir");
        let sink = weir_testbed::workspace_bin("weir-sink");
        let vip = self.topo.vip();
        let instance = format!("wb{}l4", std::process::id());
        let destroy = crate::systems::destroy_argv(&weir, &instance);
        weir_testbed::topology::register_cleanup_command(destroy.clone());
        let result = (|| -> Result<()> {
            let mut sinks = Vec::new();
            for i in 0..4 {
                let ns = self.topo.backend_ns[i].clone();
                let (pid, _) = self.topo.spawn_ready_in(
                    &ns,
                    &sink,
                    &["--listen", &format!("0.0.0.0:{SINK_PORT}")],
                    Duration::from_secs(10),
                )?;
                sinks.push(pid);
                let dev = self.topo.backend_dev(i);
                let out = self.topo.run_ok_in(
                    &ns,
                    &weir,
                    &[
                        "--instance",
                        &instance,
                        "--flows",
                        "262144",
                        "decap",
                        "attach",
                        "--dev",
                        &dev,
                        "--vip",
                        &vip.to_string(),
                        "--from",
                        &format!("{}/32", self.topo.lb_addr()),
                    ],
                )?;
                drop(out);
            }
            self.topo.attach_veth_peer_xdp()?;
            // Frames reach an edge host's NIC at the wire's MTU. veth would
            // hand the lb the client's 64 KiB TSO segments (and the
            // router's GRO aggregates) whole, which no wire carries and
            // which weir's XDP program drops as larger than the path MTU:
            // segment at the client and do not re-aggregate at the router.
            // Both L4 systems get the same frames.
            let client_ns = self.topo.client_ns.clone();
            let router_ns = self.topo.router_ns.clone();
            self.topo.run_ok_in(
                &client_ns,
                "ethtool",
                &["-K", "cli0", "tso", "off", "gso", "off"],
            )?;
            self.topo
                .run_ok_in(&router_ns, "ethtool", &["-K", "r-cli", "gro", "off"])?;
            let lb = |args: &[&str]| -> Result<()> {
                let mut full = vec!["--instance", instance.as_str(), "--flows", "262144"];
                full.extend_from_slice(args);
                self.topo
                    .run_ok_in(&self.topo.lb_ns, &weir, &full)
                    .map(drop)
            };
            let lb_addr = self.topo.lb_addr().to_string();
            lb(&[
                "attach",
                "--dev",
                self.topo.lb_dev(),
                "--lb-addr",
                &lb_addr,
                "--mode",
                "native",
            ])?;
            let svc = format!("{vip}:{SINK_PORT}");
            lb(&["service", "add", &svc])?;
            let addrs: Vec<String> = (0..4)
                .map(|i| self.topo.backend_addr(i).to_string())
                .collect();
            let mut set = vec!["backend", "set", svc.as_str()];
            set.extend(addrs.iter().map(String::as_str));
            lb(&set)?;
            let weir_target = SocketAddr::new(IpAddr::V4(vip), SINK_PORT);
            out.l4.push(self.l4_measure("weir-xdp", weir_target, None)?);

            let backends: Vec<SocketAddr> = (0..4)
                .map(|i| SocketAddr::new(IpAddr::V4(self.topo.backend_addr(i)), SINK_PORT))
                .collect();
            let spec = Spec {
                kind: Kind::Haproxy,
                listen: SocketAddr::new(IpAddr::V4(vip), HAPROXY_TCP_PORT),
                backends,
                workers: s.workers,
                shards: 1,
                drain_window: None,
                tcp_mode: true,
            };
            let row = self.with_system(spec, "l4", |b, sys| {
                b.l4_measure("haproxy-tcp", sys.spec.listen, Some(sys))
            });
            match row {
                Ok(row) => out.l4.push(row),
                Err(e) => out.notes.push(format!("haproxy-tcp: {e:#}")),
            }
            for pid in sinks {
                self.topo.stop_child(pid, Duration::from_secs(2));
            }
            Ok(())
        })();
        crate::systems::undo(&destroy);
        result?;
        Ok(out)
    }

    fn tcp_load(&self, mode: &str, target: SocketAddr, n: usize, secs: f64) -> Result<TcpResult> {
        let mut args = vec![
            mode.to_string(),
            "--target".into(),
            target.to_string(),
            if mode == "tcp-bulk" {
                "--streams"
            } else {
                "--concurrency"
            }
            .into(),
            n.to_string(),
            "--seconds".into(),
            secs.to_string(),
        ];
        for a in self.sources().iter().take(4) {
            args.push("--source".into());
            args.push(a.to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = self
            .topo
            .start_in(&self.topo.client_ns, &self.load_bin, &args)?;
        let out = p.wait_output(Duration::from_secs_f64(secs + 60.0))?;
        ensure!(
            out.status.success(),
            "weir-load {mode} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn l4_measure(&self, name: &str, target: SocketAddr, sys: Option<&Running>) -> Result<L4Row> {
        let s = &self.sizes;
        self.progress(&format!(
            "{name}: {} bulk streams for {}s",
            s.l4_streams, s.l4_secs
        ));
        let pids = sys.map(Running::pids).unwrap_or_default();
        let p0 = procs::cpu_by_pid(&pids);
        let soft0 = procs::softirq_s();
        let t0 = Instant::now();
        let bulk = self.tcp_load("tcp-bulk", target, s.l4_streams, s.l4_secs)?;
        let bulk_cpu = CpuSplit {
            proxy_s: procs::cpu_delta(&p0, &procs::cpu_by_pid(&pids)),
            generator_s: bulk.cpu_s,
            backends_s: 0.0,
            wall_s: t0.elapsed().as_secs_f64(),
        };
        let softirq = procs::softirq_s() - soft0;
        self.progress(&format!(
            "{name}: short connections, 64 in flight, {}s",
            s.l4_secs
        ));
        let conns = self.tcp_load("tcp-conns", target, 64, s.l4_secs)?;
        Ok(L4Row {
            system: name.into(),
            streams: s.l4_streams,
            bulk_gbit_s: bulk.bytes as f64 * 8.0 / bulk.seconds.max(1e-9) / 1e9,
            conns_per_sec: conns.ok as f64 / conns.seconds.max(1e-9),
            conn_errors: conns.errors + bulk.errors,
            bulk_cpu,
            softirq_s: softirq,
        })
    }
}

/// `rm -rf DIR`, for the interrupt cleanup.
pub fn remove_dir(dir: &Path) -> Vec<String> {
    vec!["rm".into(), "-rf".into(), dir.display().to_string()]
}

fn per(total: u64, n: usize) -> f64 {
    if n == 0 { 0.0 } else { total as f64 / n as f64 }
}

fn with_suffix(p: &Path, k: usize) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(format!(".{k}"));
    PathBuf::from(s)
}

/// Checks that a scenario's result is complete and sane (every system
/// measured, traffic moved): what CI asserts of a quick run. Speed is not
/// judged here.
pub fn check(r: &ScenarioResult) -> Vec<String> {
    let mut bad = Vec::new();
    let systems = |names: Vec<&str>, want: &[&str]| {
        want.iter()
            .filter(|w| !names.contains(w))
            .map(|w| format!("{}: no result for {w}", r.scenario))
            .collect::<Vec<_>>()
    };
    match r.scenario.as_str() {
        "steady" => {
            bad.extend(systems(
                r.steady.iter().map(|x| x.system.as_str()).collect(),
                &["weir", "haproxy", "nginx"],
            ));
            for x in &r.steady {
                if x.closed_msgs_per_sec <= 0.0 || x.open_achieved <= 0.0 {
                    bad.push(format!(
                        "steady: {} moved no messages at {} B",
                        x.system, x.message_bytes
                    ));
                }
                if x.system != "direct" && x.closed_cpu.proxy_s <= 0.0 {
                    bad.push(format!("steady: {}'s CPU time was not measured", x.system));
                }
            }
        }
        "idle" => {
            bad.extend(systems(
                r.idle.iter().map(|x| x.system.as_str()).collect(),
                &["weir", "haproxy", "nginx"],
            ));
            for x in &r.idle {
                if x.held * 10 < x.connections * 9 {
                    bad.push(format!(
                        "idle: {} held {} of {}",
                        x.system, x.held, x.connections
                    ));
                }
                if x.rss_after_kib == 0 {
                    bad.push(format!("idle: {}'s memory was not measured", x.system));
                }
            }
        }
        "connrate" => {
            bad.extend(systems(
                r.connrate.iter().map(|x| x.system.as_str()).collect(),
                &["weir", "haproxy", "nginx"],
            ));
            for x in &r.connrate {
                if x.steps.iter().all(|s| s.ok == 0) {
                    bad.push(format!("connrate: {} completed no handshake", x.system));
                }
            }
        }
        "churn" => {
            bad.extend(systems(
                r.churn.iter().map(|x| x.system.as_str()).collect(),
                &["weir", "haproxy-api", "haproxy-reload", "nginx-reload"],
            ));
            for x in &r.churn {
                if x.handshakes_ok == 0 || x.messages_echoed == 0 || x.changes == 0 {
                    bad.push(format!(
                        "churn: {} moved no traffic or made no change",
                        x.system
                    ));
                }
            }
        }
        "drain" => {
            bad.extend(systems(
                r.drain.iter().map(|x| x.system.as_str()).collect(),
                &["weir", "haproxy-api", "haproxy-reload", "nginx-reload"],
            ));
            for x in &r.drain {
                if x.connections == 0 {
                    bad.push(format!(
                        "drain: {} had no connection on the removed backend",
                        x.system
                    ));
                }
            }
        }
        "l4" => {
            bad.extend(systems(
                r.l4.iter().map(|x| x.system.as_str()).collect(),
                &["weir-xdp", "haproxy-tcp"],
            ));
            for x in &r.l4 {
                if x.bulk_gbit_s <= 0.0 || x.conns_per_sec <= 0.0 {
                    bad.push(format!("l4: {} moved nothing", x.system));
                }
            }
        }
        other => bad.push(format!("unknown scenario {other}")),
    }
    bad
}

/// Facts about the machine and the peers.
pub fn run_info(quick: bool, workers: usize) -> RunInfo {
    let cmd = |prog: &str, args: &[&str]| -> String {
        std::process::Command::new(prog)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                let text = if o.stdout.is_empty() {
                    o.stderr
                } else {
                    o.stdout
                };
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .unwrap_or_else(|| "unknown".into())
    };
    RunInfo {
        date: weir::registry::audit::rfc3339(load::unix_ms() / 1000),
        quick,
        kernel: cmd("uname", &["-r"]),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        weir_commit: cmd(
            "git",
            &[
                "-C",
                env!("CARGO_MANIFEST_DIR"),
                "rev-parse",
                "--short",
                "HEAD",
            ],
        ),
        haproxy_version: cmd("haproxy", &["-v"]),
        nginx_version: cmd("nginx", &["-v"]),
        workers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steady(system: &str, rate: f64) -> SteadyRow {
        SteadyRow {
            system: system.into(),
            message_bytes: 64,
            closed_msgs_per_sec: rate,
            open_achieved: rate,
            closed_cpu: CpuSplit {
                proxy_s: 1.0,
                ..CpuSplit::default()
            },
            ..SteadyRow::default()
        }
    }

    #[test]
    fn check_wants_every_system_and_moving_traffic() {
        let mut r = ScenarioResult {
            scenario: "steady".into(),
            steady: vec![
                steady("weir", 10.0),
                steady("haproxy", 10.0),
                steady("nginx", 10.0),
            ],
            ..ScenarioResult::default()
        };
        assert!(check(&r).is_empty(), "{:?}", check(&r));
        r.steady.pop();
        assert_eq!(check(&r), vec!["steady: no result for nginx".to_string()]);
        r.steady.push(steady("nginx", 0.0));
        assert_eq!(check(&r).len(), 1, "{:?}", check(&r));
        assert!(check(&r)[0].contains("nginx moved no messages"));
    }

    #[test]
    fn check_flags_an_idle_run_that_lost_connections() {
        let row = |system: &str, held| IdleRow {
            system: system.into(),
            connections: 1000,
            held,
            rss_after_kib: 1,
            ..IdleRow::default()
        };
        let r = ScenarioResult {
            scenario: "idle".into(),
            idle: vec![row("weir", 1000), row("haproxy", 950), row("nginx", 10)],
            ..ScenarioResult::default()
        };
        assert_eq!(check(&r), vec!["idle: nginx held 10 of 1000".to_string()]);
    }

    #[test]
    fn check_refuses_unknown_scenarios() {
        let r = ScenarioResult {
            scenario: "nope".into(),
            ..ScenarioResult::default()
        };
        assert_eq!(check(&r), vec!["unknown scenario nope".to_string()]);
    }
}
