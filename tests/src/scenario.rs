//! The L4 live-change scenario, shared by the namespace integration test
//! and `cargo xtask demo`: WebSocket clients talk through the XDP path
//! while the backend set changes under them.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use weir::l7::config::{ConfigBuilder, Timeout};

use crate::topology::{Topology, TopologySpec};
use crate::weir_cli::WeirCli;
use crate::workspace_bin;
use crate::ws_client::Ending;
use crate::wsload::LoadReport;

pub const PORT: u16 = 8080;

/// How to run the scenario.
#[derive(Clone, Debug)]
pub struct L4Options {
    /// weir instance name (unique per run).
    pub instance: String,
    /// Long-lived connections that talk through every change.
    pub connections: usize,
    /// New connections opened after the changes.
    pub new_connections: usize,
    /// Time between messages on each connection.
    pub interval: Duration,
    /// Pause between changes, so traffic flows across each of them.
    pub settle: Duration,
    /// XDP attach mode.
    pub xdp_mode: String,
    /// Print progress lines.
    pub verbose: bool,
}

impl Default for L4Options {
    fn default() -> Self {
        Self {
            instance: format!("l4-{}", std::process::id()),
            connections: 100,
            new_connections: 100,
            interval: Duration::from_millis(100),
            settle: Duration::from_secs(2),
            xdp_mode: "native".into(),
            verbose: false,
        }
    }
}

/// A change made during the run.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    pub at_ms: u64,
    pub command: String,
    pub output: String,
}

/// What happened.
#[derive(Debug, Serialize)]
pub struct L4Report {
    /// Backend names (`b0`...) to addresses.
    pub backends: BTreeMap<String, Ipv4Addr>,
    pub steps: Vec<Step>,
    /// The long-lived connections.
    pub long_lived: LoadReport,
    /// Connections opened after the changes.
    pub after: LoadReport,
    /// `weir --json stats` at the end.
    pub stats: serde_json::Value,
    /// `weir --json backend list` at the end.
    pub backend_list: serde_json::Value,
}

impl L4Report {
    /// XDP's new-flow counter per backend name.
    pub fn new_flows_per_backend(&self) -> BTreeMap<String, u64> {
        let by_addr: BTreeMap<String, String> = self
            .backends
            .iter()
            .map(|(name, a)| (format!("{a}:{PORT}"), name.clone()))
            .collect();
        let mut out = BTreeMap::new();
        for svc in self.stats["services"].as_array().into_iter().flatten() {
            for b in svc["backends"].as_array().into_iter().flatten() {
                if let Some(name) = b["backend"].as_str().and_then(|a| by_addr.get(a)) {
                    *out.entry(name.clone()).or_insert(0) += b["new_flows"].as_u64().unwrap_or(0);
                }
            }
        }
        out
    }

    /// Connections each backend got, as the clients saw them.
    pub fn client_connections_per_backend(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for c in self
            .long_lived
            .connections
            .iter()
            .chain(&self.after.connections)
        {
            if let (true, Some(b)) = (c.connected, &c.backend) {
                *out.entry(b.clone()).or_insert(0) += 1;
            }
        }
        out
    }
}

/// What both scenarios start from: a topology of four backends, each with
/// an echo server, and a weir instance attached to the LB with XDP; the
/// instance and the topology go when the stage ends (also on interrupt).
pub(crate) struct Stage {
    pub(crate) client: PathBuf,
    echo: PathBuf,
    // Field order: the instance (detaching XDP) goes before the topology.
    pub(crate) weir: WeirCli,
    pub(crate) topo: Topology,
    pub(crate) backends: BTreeMap<String, Ipv4Addr>,
    /// The echo server of each backend, by index.
    echo_pids: Vec<u32>,
}

impl Stage {
    pub(crate) fn new(instance: &str, opts: &L4Options) -> Result<Self> {
        let echo = workspace_bin("weir-echo");
        let client = workspace_bin("weir-wsclient");
        for bin in [&echo, &client] {
            if !bin.exists() {
                bail!(
                    "{} is not built; run `cargo build --workspace` first",
                    bin.display()
                );
            }
        }
        destroy_stale_instances(&workspace_bin("weir"));
        let topo = Topology::build(TopologySpec {
            backends: 4,
            client_addrs: 1,
        })?;
        let weir = WeirCli::new(instance)?;
        let backends = (0..4)
            .map(|i| (format!("b{i}"), topo.backend_addr(i)))
            .collect();
        let mut stage = Self {
            client,
            echo,
            weir,
            topo,
            backends,
            echo_pids: Vec::new(),
        };
        for i in 0..4 {
            let pid = stage.start_echo(i)?;
            stage.echo_pids.push(pid);
        }
        // Native XDP_TX goes into the router's end of a veth: it needs a
        // program there, attached the way an operator would.
        if opts.xdp_mode == "native" {
            stage.weir.attach_peer(&stage.topo)?;
        }
        stage.weir.attach_lb(&stage.topo, &opts.xdp_mode)?;
        Ok(stage)
    }

    /// Starts backend `i`'s echo server (named `b{i}`) and waits until it
    /// listens.
    fn start_echo(&mut self, i: usize) -> Result<u32> {
        let ns = self.topo.backend_ns[i].clone();
        let listen = format!("0.0.0.0:{PORT}");
        let (pid, _) = self.topo.spawn_ready_in(
            &ns,
            &self.echo,
            &["--listen", &listen, "--name", &format!("b{i}")],
            Duration::from_secs(10),
        )?;
        Ok(pid)
    }

    /// Kills backend `i`'s echo server with SIGKILL, as a crash would: its
    /// port refuses from then on.
    pub(crate) fn kill_echo(&mut self, i: usize) {
        let pid = self.echo_pids[i];
        self.topo.signal_child(pid, libc::SIGKILL);
        self.topo.stop_child(pid, Duration::from_secs(5));
    }

    /// Starts backend `i`'s echo server again.
    pub(crate) fn restart_echo(&mut self, i: usize) -> Result<()> {
        self.echo_pids[i] = self.start_echo(i)?;
        Ok(())
    }

    /// Runs `weir` for this stage's instance in namespace `ns`.
    fn weir(&self, ns: &str, args: &[&str]) -> Result<String> {
        self.weir.run(&self.topo, ns, args)
    }

    /// `weir` in the LB namespace.
    pub(crate) fn lb(&self, args: &[&str]) -> Result<String> {
        self.weir(&self.topo.lb_ns, args)
    }

    /// Opens `n` new connections that talk for 2 s, and returns their report.
    pub(crate) fn new_clients(
        &self,
        url: &str,
        opts: &L4Options,
        what: &str,
    ) -> Result<LoadReport> {
        let n = opts.new_connections.to_string();
        let interval = opts.interval.as_millis().to_string();
        let run = self.topo.start_in(
            &self.topo.client_ns,
            &self.client,
            &[
                "--url",
                url,
                "--connections",
                &n,
                "--duration-secs",
                "2",
                "--interval-ms",
                &interval,
                "--quiet",
            ],
        )?;
        parse_report(run.wait_output(Duration::from_secs(60))?, what)
    }

    /// Starts `weir args` in `ns`, tracked by the topology for cleanup.
    pub(crate) fn spawn(&mut self, ns: &str, args: &[&str]) -> Result<u32> {
        let weir = self.weir.bin().to_path_buf();
        self.topo.spawn_in(ns, &weir, args)
    }

    pub(crate) fn finish(self) -> Result<()> {
        let Self { weir, topo, .. } = self;
        drop(weir);
        topo.teardown()
    }
}

pub(crate) fn log(verbose: bool, start: Instant, msg: &str) {
    if verbose {
        eprintln!("[{:>6.1}s] {msg}", start.elapsed().as_secs_f64());
    }
}

/// Runs the scenario on a fresh topology of four backends (three in the
/// initial set, the fourth added live) and returns what happened. The
/// topology and the weir instance are removed before it returns.
pub fn run_l4(opts: &L4Options) -> Result<L4Report> {
    let start = Instant::now();
    let stage = Stage::new(&opts.instance, opts)?;
    let topo = &stage.topo;
    let lb_ns = topo.lb_ns.clone();
    log(
        opts.verbose,
        start,
        &format!("topology {} up: client, router, lb, 4 backends", topo.id),
    );
    let vip = topo.vip();
    let service = format!("{vip}:{PORT}");
    // Backends decapsulate IPIP to the VIP, from the LB only.
    for i in 0..4 {
        stage.weir.decap_backend(topo, i)?;
    }
    stage.lb(&["service", "add", &service])?;
    let initial: Vec<String> = (0..3).map(|i| topo.backend_addr(i).to_string()).collect();
    let mut set_args = vec!["backend", "set", service.as_str()];
    set_args.extend(initial.iter().map(String::as_str));
    stage.lb(&set_args)?;
    log(
        opts.verbose,
        start,
        &format!(
            "weir attached to {} in {lb_ns}; service {service} -> b0 b1 b2",
            topo.lb_dev()
        ),
    );

    // Long-lived clients.
    let dir = tempdir(&opts.instance)?;
    let url = format!("ws://{service}/");
    let (long_lived, hold) = start_long_lived(topo, &stage.client, &url, opts, &dir, &[])?;
    let interval = opts.interval.as_millis().to_string();
    log(
        opts.verbose,
        start,
        &format!(
            "{} WebSocket connections open through the VIP, echoing every {interval} ms",
            opts.connections
        ),
    );

    // The live changes.
    let mut steps = Vec::new();
    let b1 = topo.backend_addr(1).to_string();
    let b2 = topo.backend_addr(2).to_string();
    let b3 = topo.backend_addr(3).to_string();
    let changes: Vec<Vec<&str>> = vec![
        vec!["backend", "drain", &service, &b1],
        vec!["backend", "add", &service, &b3],
        vec!["backend", "weight", &service, &b2, "3"],
    ];
    for change in changes {
        std::thread::sleep(opts.settle);
        let output = stage.lb(&change)?;
        let command = format!("weir {}", change.join(" "));
        log(opts.verbose, start, &command);
        steps.push(Step {
            at_ms: start.elapsed().as_millis() as u64,
            command,
            output,
        });
    }
    std::thread::sleep(opts.settle);

    // New connections follow the new ring.
    let after = stage.new_clients(&url, opts, "new connections")?;
    log(
        opts.verbose,
        start,
        &format!(
            "{} new connections opened after the changes",
            opts.new_connections
        ),
    );

    std::fs::write(&hold, b"done")?;
    let long_lived = parse_report(
        long_lived.wait_output(Duration::from_secs(60))?,
        "long-lived connections",
    )?;
    log(
        opts.verbose,
        start,
        "long-lived connections closed (close handshake 1000)",
    );

    let stats = serde_json::from_str(&stage.lb(&["--json", "stats"])?)?;
    let backend_list = serde_json::from_str(&stage.lb(&["--json", "backend", "list", &service])?)?;
    let _ = std::fs::remove_dir_all(&dir);
    let backends = stage.backends.clone();
    stage.finish()?;
    Ok(L4Report {
        backends,
        steps,
        long_lived,
        after,
        stats,
        backend_list,
    })
}

/// Removes weir instances left by scenario runs whose process died without
/// cleaning up (SIGKILL): their names end in the dead process's pid.
fn destroy_stale_instances(weir: &Path) {
    let Ok(dir) = std::fs::read_dir("/sys/fs/bpf/weir") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.strip_prefix("l4-").and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::process::Command::new(weir)
                .args(["--instance", &name, "destroy"])
                .output();
        }
    }
}

/// Starts the long-lived clients in the client namespace and waits until
/// every one has connected (or failed); they talk until `hold` exists. They
/// spread over the source addresses `sources` (none: the default one).
pub(crate) fn start_long_lived(
    topo: &Topology,
    client: &Path,
    url: &str,
    opts: &L4Options,
    dir: &Path,
    sources: &[String],
) -> Result<(crate::topology::Proc, PathBuf)> {
    let hold = dir.join("hold");
    let ready = dir.join("ready");
    let conns = opts.connections.to_string();
    let interval = opts.interval.as_millis().to_string();
    let mut args = vec![
        "--url",
        url,
        "--connections",
        &conns,
        "--duration-secs",
        "120",
        "--interval-ms",
        &interval,
        "--hold-file",
        hold.to_str().unwrap(),
        "--ready-file",
        ready.to_str().unwrap(),
        "--quiet",
    ];
    for source in sources {
        args.extend(["--source", source.as_str()]);
    }
    let proc = topo.start_in(&topo.client_ns, client, &args)?;
    wait_for(&ready, Duration::from_secs(60)).context("long-lived clients never became ready")?;
    Ok((proc, hold))
}

pub(crate) fn parse_report(out: std::process::Output, what: &str) -> Result<LoadReport> {
    let text = String::from_utf8_lossy(&out.stdout);
    LoadReport::from_json(&text).with_context(|| {
        format!(
            "{what}: no report (exit {}); stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

pub(crate) fn tempdir(tag: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("weir-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn wait_for(path: &Path, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        if Instant::now() > deadline {
            bail!("{} did not appear within {limit:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// What the L7 scenario saw.
#[derive(Debug, Serialize)]
pub struct L7Report {
    pub backends: BTreeMap<String, Ipv4Addr>,
    pub steps: Vec<Step>,
    pub long_lived: LoadReport,
    pub after: LoadReport,
    /// `weir run`'s exit status after SIGTERM.
    pub exit_ok: bool,
    /// `weir --json stats` at the end (its `l7` part is weir run's).
    pub stats: serde_json::Value,
}

impl L7Report {
    /// Handshakes that failed, over both client runs.
    pub fn failed_handshakes(&self) -> usize {
        self.long_lived.summary.failed + self.after.summary.failed
    }

    /// Connections weir closed with 1001 because their backend left.
    pub fn drained(&self) -> usize {
        self.long_lived
            .connections
            .iter()
            .filter(|c| c.close == Ending::PeerClose(1001))
            .count()
    }

    /// Connections that ended any way other than a clean close or a drain
    /// 1001: resets, timeouts, errors.
    pub fn cut(&self) -> usize {
        self.long_lived
            .connections
            .iter()
            .chain(&self.after.connections)
            .filter(|c| {
                c.connected && c.close != Ending::Clean && c.close != Ending::PeerClose(1001)
            })
            .count()
    }
}

/// The L7 path on the same kind of topology: `weir run` in the LB
/// namespace serves an L7 service on the VIP (XDP passes it to the host),
/// 100 WebSocket clients talk through it while the backend set is replaced
/// (b0 leaves, b3 joins), then new clients arrive, then weir run stops on
/// SIGTERM.
pub fn run_l7(opts: &L4Options) -> Result<L7Report> {
    let start = Instant::now();
    let instance = format!("{}-l7", opts.instance);
    let mut stage = Stage::new(&instance, opts)?;
    let lb_ns = stage.topo.lb_ns.clone();
    let vip = stage.topo.vip();
    let service = format!("{vip}:8081");
    // The L7 service lives on the VIP: the LB host owns it, XDP passes it up.
    stage.topo.run_ok_in(
        &lb_ns,
        "ip",
        &["addr", "add", &format!("{vip}/32"), "dev", "lo"],
    )?;
    stage.lb(&["service", "add", &service, "--mode", "l7"])?;
    let initial: Vec<String> = (0..3)
        .map(|i| format!("{}:{PORT}", stage.topo.backend_addr(i)))
        .collect();
    let mut set = vec!["backend", "set", service.as_str()];
    set.extend(initial.iter().map(String::as_str));
    stage.lb(&set)?;

    let dir = tempdir(&instance)?;
    let config = dir.join("weir.toml");
    let listen: std::net::SocketAddr = service.parse()?;
    let file = ConfigBuilder::new()
        .instance(&instance)
        .timeout(Timeout::Shutdown, Duration::from_secs(5))
        .drain_window(Duration::from_secs(3))
        .listener(listen)
        .route("/", &service);
    std::fs::write(&config, file.to_string())?;
    let run = stage.spawn(&lb_ns, &["run", "--config", config.to_str().unwrap()])?;
    if !stage
        .topo
        .wait_tcp(&stage.topo.client_ns, listen, Duration::from_secs(10))
    {
        bail!("weir run did not come up on {service}");
    }
    log(
        opts.verbose,
        start,
        &format!("weir run serves the L7 service {service} in {lb_ns}: b0 b1 b2"),
    );

    let url = format!("ws://{service}/");
    let (long_lived, hold) = start_long_lived(&stage.topo, &stage.client, &url, opts, &dir, &[])?;
    log(
        opts.verbose,
        start,
        &format!(
            "{} WebSocket connections through weir run",
            opts.connections
        ),
    );

    std::thread::sleep(opts.settle);
    let replacement: Vec<String> = (1..4)
        .map(|i| format!("{}:{PORT}", stage.topo.backend_addr(i)))
        .collect();
    let mut args = vec!["backend", "set", service.as_str()];
    args.extend(replacement.iter().map(String::as_str));
    let output = stage.lb(&args)?;
    let command = format!("weir {}", args.join(" "));
    log(
        opts.verbose,
        start,
        &format!("{command} (b0 leaves: its clients are drained over 3 s)"),
    );
    let steps = vec![Step {
        at_ms: start.elapsed().as_millis() as u64,
        command,
        output,
    }];
    std::thread::sleep(Duration::from_secs(4));

    let after = stage.new_clients(&url, opts, "new L7 connections")?;
    std::fs::write(&hold, b"done")?;
    let long_lived = parse_report(
        long_lived.wait_output(Duration::from_secs(60))?,
        "long-lived L7 connections",
    )?;
    // Let weir run write its last counters, then stop it gracefully.
    std::thread::sleep(Duration::from_millis(1200));
    let stats = serde_json::from_str(&stage.lb(&["--json", "stats"])?)?;
    let exit = stage.topo.stop_child(run, Duration::from_secs(10));
    log(opts.verbose, start, "weir run stopped (SIGTERM)");
    let _ = std::fs::remove_dir_all(&dir);
    let backends = stage.backends.clone();
    stage.finish()?;
    Ok(L7Report {
        backends,
        steps,
        long_lived,
        after,
        exit_ok: exit.is_some_and(|s| s.success()),
        stats,
    })
}
