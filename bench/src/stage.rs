//! The stage every scenario plays on: one namespace topology with the echo
//! backends (and the same backends again on loopback, see [`Net`]), the
//! run's sizes and facts, and the ways a scenario starts a system, drives
//! load through it and measures what that cost.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use weir_testbed::topology::{Proc, Topology, TopologySpec};

use crate::load::{self, LoadResult, Plan, Ready, Talk};
use crate::procs;
use crate::results::{CpuSplit, RunInfo};
use crate::systems::{Kind, Running, Spec, remove_dir};

/// Port of the echo backends (WebSocket).
const ECHO_PORT: u16 = 8080;
/// Where every L7 system listens: the VIP, on the lb's lo.
const L7_PORT: u16 = 8081;
const BACKENDS: usize = 8;
const CLIENT_ADDRS: usize = 16;

/// Which network a scenario's traffic crosses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Net {
    /// The test bed's topology: client, router, LB and backends each in a
    /// namespace, joined by veth pairs; the router forwards.
    #[default]
    Namespaces,
    /// Client, proxy and backends all in the LB namespace on 127.0.0.0/8,
    /// over lo: no veth, no forwarding.
    Loopback,
}

impl Net {
    pub const ALL: [Net; 2] = [Net::Namespaces, Net::Loopback];

    pub fn name(self) -> &'static str {
        match self {
            Net::Namespaces => "namespaces",
            Net::Loopback => "loopback",
        }
    }

    fn listen(self, topo: &Topology) -> SocketAddr {
        match self {
            Net::Namespaces => SocketAddr::new(IpAddr::V4(topo.vip()), L7_PORT),
            Net::Loopback => SocketAddr::from((Ipv4Addr::LOCALHOST, L7_PORT)),
        }
    }

    fn backend(self, topo: &Topology, i: usize) -> SocketAddr {
        match self {
            Net::Namespaces => SocketAddr::new(IpAddr::V4(topo.backend_addr(i)), ECHO_PORT),
            Net::Loopback => SocketAddr::from((Ipv4Addr::new(127, 0, 0, 10 + i as u8), ECHO_PORT)),
        }
    }

    fn sources(self, topo: &Topology) -> Vec<IpAddr> {
        match self {
            Net::Namespaces => topo.client_addrs().into_iter().map(IpAddr::V4).collect(),
            Net::Loopback => (0..CLIENT_ADDRS)
                .map(|k| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 100 + k as u8)))
                .collect(),
        }
    }

    /// Where the load generator runs.
    fn client_ns(self, topo: &Topology) -> &str {
        match self {
            Net::Namespaces => &topo.client_ns,
            Net::Loopback => &topo.lb_ns,
        }
    }
}

/// What every scenario's sizes share; each scenario has its own besides.
#[derive(Clone, Debug)]
pub struct Sizes {
    /// Small sizes: every scenario in a few minutes.
    pub quick: bool,
    /// Threads (weir, HAProxy) or worker processes (nginx) per proxy process.
    pub workers: usize,
    /// The drain window every L7 system is started with.
    pub drain_window: Duration,
}

impl Sizes {
    pub fn new(quick: bool) -> Sizes {
        Sizes {
            quick,
            workers: 2,
            drain_window: Duration::from_secs(if quick { 3 } else { 10 }),
        }
    }
}

/// The shared stage: topology, echo backends, and the run's facts.
pub struct Bench {
    pub topo: Topology,
    pub sizes: Sizes,
    pub info: RunInfo,
    /// The network scenarios use now ([`Bench::with_net`] changes it).
    net: Net,
    /// The echo backends on the namespace topology and on loopback.
    echo_pids: Vec<u32>,
    loop_echo_pids: Vec<u32>,
    started: Instant,
    /// Hold and ready files of held connections.
    pub(crate) scratch: PathBuf,
    /// The load generator (`weir-load`).
    pub(crate) load_bin: PathBuf,
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
        let mut loop_echo_pids = Vec::new();
        for i in 0..BACKENDS {
            echo_pids.push(topo.start_echo(i, ECHO_PORT)?);
            let listen = Net::Loopback.backend(&topo, i).to_string();
            let (pid, _) = topo.spawn_ready_in(
                &lb_ns,
                &echo,
                &["--listen", &listen, "--name", &backend_name(i)],
                Duration::from_secs(10),
            )?;
            loop_echo_pids.push(pid);
        }
        let scratch = std::env::temp_dir().join(format!("weir-bench-{}", std::process::id()));
        std::fs::create_dir_all(&scratch)?;
        weir_testbed::topology::register_cleanup_command(remove_dir(&scratch));
        Ok(Bench {
            topo,
            sizes,
            info,
            net: Net::Namespaces,
            echo_pids,
            loop_echo_pids,
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

    pub(crate) fn progress(&self, what: &str) {
        eprintln!(
            "[{:>6.1}s] {}: {what}",
            self.started.elapsed().as_secs_f64(),
            self.scenario
        );
    }

    /// Runs `f` with scenarios' traffic on `net`: listen address,
    /// backends, client sources and the generator's namespace.
    pub(crate) fn with_net<T>(&mut self, net: Net, f: impl FnOnce(&mut Bench) -> T) -> T {
        let was = std::mem::replace(&mut self.net, net);
        let r = f(self);
        self.net = was;
        r
    }

    /// Kills echo backend `i` of the namespace topology with SIGKILL, as a
    /// crash does: its connections end without a Close and its port
    /// refuses connections until [`Bench::restart_backend`].
    pub(crate) fn kill_backend(&mut self, i: usize) -> Result<()> {
        let pid = self.echo_pids[i];
        ensure!(
            self.topo.signal_child(pid, libc::SIGKILL),
            "echo backend {i} (pid {pid}) is not running"
        );
        // Reaps it; the TERM this sends first finds it dead.
        self.topo.stop_child(pid, Duration::from_secs(1));
        Ok(())
    }

    /// Starts echo backend `i` of the namespace topology again, as the
    /// bench first started it.
    pub(crate) fn restart_backend(&mut self, i: usize) -> Result<()> {
        self.echo_pids[i] = self.topo.start_echo(i, ECHO_PORT)?;
        Ok(())
    }

    pub(crate) fn net(&self) -> Net {
        self.net
    }

    pub(crate) fn backend(&self, i: usize) -> SocketAddr {
        self.net.backend(&self.topo, i)
    }

    fn listen(&self) -> SocketAddr {
        self.net.listen(&self.topo)
    }

    fn echo_pids(&self) -> &[u32] {
        match self.net {
            Net::Namespaces => &self.echo_pids,
            Net::Loopback => &self.loop_echo_pids,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("ws://{}/", self.listen())
    }

    pub(crate) fn spec(&self, kind: Kind, backends: Vec<SocketAddr>, shards: usize) -> Spec {
        Spec {
            kind,
            listen: self.listen(),
            backends,
            workers: self.sizes.workers,
            shards,
            drain_window: Some(self.sizes.drain_window),
            tcp_mode: false,
            max_connections: None,
            large_messages: false,
            health_checks: false,
            ring_size: None,
        }
    }

    pub(crate) fn all_backends(&self) -> Vec<SocketAddr> {
        (0..BACKENDS).map(|i| self.backend(i)).collect()
    }

    pub(crate) fn sources(&self) -> Vec<IpAddr> {
        self.net.sources(&self.topo)
    }

    /// Starts a system, runs `f` with it, and stops it whatever `f` did.
    pub(crate) fn with_system<T>(
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

    /// Runs `rows` for `direct` (no proxy: the generator against one echo
    /// backend, what the load side can do on its own), then for each
    /// system started from `spec`, one after the other; returns the rows,
    /// and a note for each system that failed.
    pub(crate) fn direct_and_systems<R>(
        &mut self,
        tag: &str,
        spec: impl Fn(Spec) -> Spec,
        mut rows: impl FnMut(&Bench, &str, Option<&mut Running>) -> Result<Vec<R>>,
    ) -> (Vec<R>, Vec<String>) {
        let (mut all, mut notes) = (Vec::new(), Vec::new());
        let mut systems: Vec<Option<Kind>> = vec![None];
        systems.extend(Kind::ALL.map(Some));
        for kind in systems {
            let name = kind.map(Kind::name).unwrap_or("direct");
            let measured = match kind {
                Some(k) => {
                    let s = spec(self.spec(k, self.all_backends(), 1));
                    self.with_system(s, tag, |b, sys| rows(b, name, Some(sys)))
                }
                None => rows(self, name, None),
            };
            match measured {
                Ok(r) => all.extend(r),
                Err(e) => notes.push(format!("{name} on {}: {e:#}", self.net.name())),
            }
        }
        (all, notes)
    }

    /// Starts the generator processes of `plan`, split `processes` ways.
    pub(crate) fn start_load(&self, plan: &Plan, processes: usize) -> Result<Vec<Proc>> {
        let processes = processes.max(1);
        let sources = self.sources();
        let mut procs = Vec::new();
        for k in 0..processes {
            let mut p = plan.clone();
            p.fleet.connections = plan.fleet.connections / processes
                + usize::from(k < plan.fleet.connections % processes);
            p.arrivals_per_sec = plan.arrivals_per_sec / processes as f64;
            p.talk = plan
                .talk
                .share(p.fleet.connections as f64 / plan.fleet.connections.max(1) as f64);
            p.fleet.sources = sources.iter().skip(k).step_by(processes).copied().collect();
            if p.fleet.sources.is_empty() {
                p.fleet.sources = sources.clone();
            }
            p.fleet.ready_file = plan.fleet.ready_file.as_ref().map(|f| with_suffix(f, k));
            if let Some(storm) = &mut p.storm {
                storm.done_file = with_suffix(&storm.done_file, k);
            }
            if p.fleet.connections == 0 && p.arrivals_per_sec == 0.0 {
                continue;
            }
            let json = serde_json::to_string(&p)?;
            procs.push(self.topo.start_in(
                self.net.client_ns(&self.topo),
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
    pub(crate) fn start_held(
        &self,
        plan: &Plan,
        processes: usize,
        limit: Duration,
    ) -> Result<(Vec<Proc>, Vec<PathBuf>)> {
        let ready = plan
            .fleet
            .ready_file
            .as_ref()
            .context("a held plan names a ready file")?;
        let hold = plan
            .fleet
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
                    plan.fleet.connections
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok((clients, files))
    }

    /// What the processes wrote to their ready files, added up.
    pub(crate) fn read_ready(files: &[PathBuf]) -> Result<Ready> {
        let mut parts = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading ready file {}", f.display()))?;
            parts.push(
                serde_json::from_str(&text)
                    .with_context(|| format!("parsing ready file {}", f.display()))?,
            );
        }
        Ok(Ready::merge(&parts))
    }

    pub(crate) fn wait_load(procs: Vec<Proc>, limit: Duration) -> Result<LoadResult> {
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
    pub(crate) fn measure(
        &self,
        sys: Option<&Running>,
        plan: &Plan,
        processes: usize,
    ) -> Result<(LoadResult, CpuSplit)> {
        let mark = CpuMark::take(self, sys);
        let running = self.start_load(plan, processes)?;
        let r = Self::wait_load(running, plan.fleet.duration + Duration::from_secs(90))?;
        let split = mark.split(self, sys, &r);
        Ok((r, split))
    }

    /// Runs a push plan (it names ready, hold and start files) split
    /// `processes` ways: connects every connection first, then measures
    /// from the start file to the end of the load, so the handshakes are
    /// not part of the cost.
    pub(crate) fn measure_from_start(
        &self,
        sys: Option<&Running>,
        plan: &Plan,
        processes: usize,
        limit: Duration,
    ) -> Result<(LoadResult, CpuSplit)> {
        let start = plan
            .start_file
            .as_ref()
            .context("a plan measured from its start names a start file")?;
        let (clients, ready) = self.start_held(plan, processes, Duration::from_secs(120))?;
        let mark = CpuMark::take(self, sys);
        let go = std::fs::write(start, b"go").context("writing the start file");
        let measured = go.and_then(|()| Self::wait_load(clients, limit)).map(|r| {
            let split = mark.split(self, sys, &r);
            (r, split)
        });
        for f in ready.iter().chain([start]) {
            let _ = std::fs::remove_file(f);
        }
        measured
    }

    pub(crate) fn plan(&self, connections: usize, talk: Talk, bytes: usize, secs: f64) -> Plan {
        let mut plan = Plan {
            talk,
            message_bytes: bytes,
            epoch_unix_ms: load::unix_ms(),
            ..Plan::default()
        };
        plan.fleet.url = self.url();
        plan.fleet.connections = connections;
        plan.fleet.duration = Duration::from_secs_f64(secs);
        plan
    }

    /// Connection requests the lb namespace's listeners dropped so far
    /// (full accept queues): see [`procs::listen_drops`].
    pub(crate) fn lb_listen_drops(&self) -> Result<u64> {
        let out = self
            .topo
            .run_ok_in(&self.topo.lb_ns, "cat", &["/proc/net/netstat"])?;
        procs::listen_drops(&String::from_utf8_lossy(&out.stdout))
            .context("no TcpExt ListenDrops in the lb namespace's /proc/net/netstat")
    }

    /// Names the scenario that runs next, for progress lines.
    pub(crate) fn begin(&mut self, scenario: &str) {
        self.scenario = scenario.to_string();
    }
}

/// CPU counters at the start of a measurement.
struct CpuMark {
    proxy: std::collections::BTreeMap<u32, f64>,
    backends_s: f64,
    softirq_s: f64,
    at: Instant,
}

impl CpuMark {
    fn take(b: &Bench, sys: Option<&Running>) -> CpuMark {
        CpuMark {
            proxy: procs::cpu_by_pid(&sys.map(Running::pids).unwrap_or_default()),
            backends_s: procs::cpu_s(b.echo_pids()),
            softirq_s: procs::softirq_s(),
            at: Instant::now(),
        }
    }

    /// Where the CPU went since the mark; the generator's is what its
    /// processes reported.
    fn split(&self, b: &Bench, sys: Option<&Running>, r: &LoadResult) -> CpuSplit {
        let proxy_pids = sys.map(Running::pids).unwrap_or_default();
        CpuSplit {
            proxy_s: procs::cpu_delta(&self.proxy, &procs::cpu_by_pid(&proxy_pids)),
            generator_s: r.cpu_s,
            backends_s: procs::cpu_s(b.echo_pids()) - self.backends_s,
            wall_s: self.at.elapsed().as_secs_f64(),
            softirq_s: procs::softirq_s() - self.softirq_s,
        }
    }
}

/// What echo backend `i` calls itself in its 101 (`x-weir-backend`).
pub(crate) fn backend_name(i: usize) -> String {
    format!("b{i}")
}

/// The file of generator process `k` of several that share `p`.
pub(crate) fn with_suffix(p: &Path, k: usize) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(format!(".{k}"));
    PathBuf::from(s)
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
