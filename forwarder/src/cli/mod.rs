//! The `weir` command line. Every command works without a daemon: it opens
//! the instance's pinned maps, goes through the registry API and exits.

pub mod parse;

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use weir_ebpf::abi::{self, BackendState};

use crate::dataplane::{self, XdpMode};
use crate::instance::Instance;
use crate::registry::{ApplyOptions, Change, CreateOptions, Outcome, Registry, ServiceModeName};

#[derive(Parser, Debug)]
#[command(name = "weir", version, about = "Load balancer for long-lived WebSocket traffic", long_about = None)]
pub struct Cli {
    /// Instance name: its maps live under /sys/fs/bpf/weir/<instance>
    /// [default: default; for `run`, the configuration's `instance`].
    #[arg(long, global = true)]
    pub instance: Option<String>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// Flow-table capacity, used only when this command creates the instance.
    #[arg(long, global = true, default_value_t = abi::DEFAULT_FLOWS, value_parser = clap::value_parser!(u32).range(1024..=(1 << 26)))]
    pub flows: u32,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attach the XDP balancer to an interface.
    Attach {
        #[arg(long)]
        dev: String,
        /// This host's address: the outer source of encapsulated packets.
        #[arg(long)]
        lb_addr: Ipv4Addr,
        #[arg(long, value_enum, default_value = "native")]
        mode: XdpMode,
    },
    /// Detach the XDP balancer from an interface.
    Detach {
        #[arg(long)]
        dev: String,
    },
    /// Manage services (VIP:PORT listeners).
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Manage a service's backends.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// Show counters: verdicts, drop reasons, per service and per backend.
    Stats,
    /// Backend-side decapsulation (tc ingress), for hosts behind weir.
    #[command(subcommand)]
    Decap(DecapCmd),
    /// Run the L7 WebSocket proxy (io_uring workers) until SIGTERM.
    Run {
        /// Configuration file (TOML); the embedded default without one.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// Read every map back and check the rings match the backends.
    Check,
    /// The `weir run` configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Remove the instance: detach its programs and delete its maps.
    Destroy,
}

#[derive(Subcommand, Debug)]
pub enum ServiceCmd {
    /// Declare a service.
    Add {
        service: String,
        #[arg(long, value_enum, default_value = "l4")]
        mode: ModeArg,
        /// Maglev table size (a prime; more than 100 slots per backend).
        #[arg(long)]
        ring_size: Option<u32>,
        /// Refuse changes that take more than this share of the active
        /// backends out at once (without --force).
        #[arg(long)]
        max_remove_fraction: Option<f64>,
        /// Refuse changes that leave fewer active backends (without --force).
        #[arg(long)]
        min_backends: Option<u32>,
    },
    /// Remove a service.
    Remove {
        service: String,
        /// Also remove its backends, cutting their connections.
        #[arg(long)]
        force: bool,
    },
    /// List services.
    List,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ModeArg {
    L4,
    L7,
}

#[derive(Args, Debug)]
pub struct Target {
    /// The service, VIP:PORT.
    service: String,
    /// The backend, ADDR[:PORT].
    backend: String,
}

#[derive(Subcommand, Debug)]
pub enum BackendCmd {
    /// Add a backend (or reactivate a draining one).
    Add {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value = "1", value_parser = parse::weight)]
        weight: u16,
    },
    /// Stop new connections to a backend; established ones stay.
    Drain {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        force: bool,
    },
    /// Remove a backend: drained first, freed once no flow uses it.
    Remove {
        #[command(flatten)]
        target: Target,
        /// Skip the guard rails and free the backend now (cuts its flows).
        #[arg(long)]
        force: bool,
    },
    /// Change a backend's weight.
    Weight {
        #[command(flatten)]
        target: Target,
        #[arg(value_parser = parse::weight)]
        weight: u16,
        #[arg(long)]
        force: bool,
    },
    /// Replace the whole backend set (declarative); leavers are drained.
    Set {
        service: String,
        /// ADDR[:PORT][@WEIGHT] ...
        backends: Vec<String>,
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        force: bool,
    },
    /// List a service's backends.
    List { service: String },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Print the embedded default configuration.
    Default,
    /// Validate a configuration file (file, line and reason on error).
    Check { file: std::path::PathBuf },
}

#[derive(Subcommand, Debug)]
pub enum DecapCmd {
    /// Attach decapsulation at tc ingress of IFACE for packets to VIP.
    Attach {
        #[arg(long)]
        dev: String,
        #[arg(long)]
        vip: Ipv4Addr,
    },
    /// Detach decapsulation from IFACE.
    Detach {
        #[arg(long)]
        dev: String,
    },
}

/// Runs the CLI; errors go up to `main`, which prints one line.
pub fn run(cli: Cli) -> Result<()> {
    let instance = Instance::new(cli.instance.as_deref().unwrap_or("default"))?;
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");
    let create = CreateOptions { flows: cli.flows };
    let opts = |force: bool, dry_run: bool| ApplyOptions {
        force,
        dry_run,
        command: command_line.clone(),
        before_verify: None,
    };
    let json = cli.json;

    match cli.command {
        Command::Attach { dev, lb_addr, mode } => {
            dataplane::attach(&instance, &dev, lb_addr, mode, create)?;
            say(
                json,
                json!({"attached": dev, "lb_addr": lb_addr.to_string()}),
                || {
                    format!(
                        "attached weir ({}) to {dev}, encapsulating from {lb_addr}",
                        instance.name()
                    )
                },
            );
        }
        Command::Detach { dev } => {
            dataplane::detach(&instance, &dev)?;
            say(json, json!({"detached": dev}), || {
                format!("detached weir ({}) from {dev}", instance.name())
            });
        }
        Command::Service(cmd) => match cmd {
            ServiceCmd::Add {
                service,
                mode,
                ring_size,
                max_remove_fraction,
                min_backends,
            } => {
                let addr = parse::service(&service).map_err(anyhow::Error::msg)?;
                let mode = match mode {
                    ModeArg::L4 => ServiceModeName::L4,
                    ModeArg::L7 => ServiceModeName::L7,
                };
                let mut reg = Registry::open_or_create(&instance, create)?;
                let change = Change::AddService {
                    addr,
                    mode,
                    ring_size,
                    max_remove_fraction,
                    min_backends,
                };
                report(json, &reg.apply(&change, opts(false, false))?);
            }
            ServiceCmd::Remove { service, force } => {
                let addr = parse::service(&service).map_err(anyhow::Error::msg)?;
                let mut reg = Registry::open(&instance)?;
                report(
                    json,
                    &reg.apply(&Change::RemoveService { addr }, opts(force, false))?,
                );
            }
            ServiceCmd::List => {
                let reg = Registry::open(&instance)?;
                list_services(&reg, json)?;
            }
        },
        Command::Backend(cmd) => {
            let (change, force, dry_run) = match cmd {
                BackendCmd::List { service } => {
                    let addr = parse::service(&service).map_err(anyhow::Error::msg)?;
                    let reg = Registry::open(&instance)?;
                    return list_backends(&reg, &addr, json);
                }
                BackendCmd::Add { target, weight } => {
                    let (service, backend) = target.parse()?;
                    (
                        Change::AddBackend {
                            service,
                            backend,
                            weight,
                        },
                        false,
                        false,
                    )
                }
                BackendCmd::Drain { target, force } => {
                    let (service, backend) = target.parse()?;
                    (Change::DrainBackend { service, backend }, force, false)
                }
                BackendCmd::Remove { target, force } => {
                    let (service, backend) = target.parse()?;
                    (Change::RemoveBackend { service, backend }, force, false)
                }
                BackendCmd::Weight {
                    target,
                    weight,
                    force,
                } => {
                    let (service, backend) = target.parse()?;
                    (
                        Change::SetWeight {
                            service,
                            backend,
                            weight,
                        },
                        force,
                        false,
                    )
                }
                BackendCmd::Set {
                    service,
                    backends,
                    dry_run,
                    force,
                } => {
                    let service = parse::service(&service).map_err(anyhow::Error::msg)?;
                    let backends = backends
                        .iter()
                        .map(|b| parse::weighted_backend(b, &service))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(anyhow::Error::msg)?;
                    (Change::SetBackends { service, backends }, force, dry_run)
                }
            };
            let mut reg = Registry::open(&instance)?;
            let outcome = reg.apply(&change, opts(force, dry_run))?;
            report(json, &outcome);
        }
        Command::Stats => {
            let reg = Registry::open(&instance)?;
            stats(&reg, &instance, json)?;
        }
        Command::Decap(DecapCmd::Attach { dev, vip }) => {
            dataplane::decap_attach(&instance, &dev, vip)?;
            say(json, json!({"decap": dev, "vip": vip.to_string()}), || {
                format!("decapsulating IPIP to {vip} at tc ingress of {dev}")
            });
        }
        Command::Decap(DecapCmd::Detach { dev }) => {
            dataplane::decap_detach(&instance, &dev)?;
            say(json, json!({"decap_detached": dev}), || {
                format!("detached decap from {dev}")
            });
        }
        Command::Run { config } => return run_daemon(config.as_deref(), cli.instance.as_deref()),
        Command::Config(ConfigCmd::Default) => print!("{}", crate::l7::config::DEFAULT),
        Command::Config(ConfigCmd::Check { file }) => {
            let config = crate::l7::config::load(&file)?;
            say(
                json,
                json!({"ok": true, "listeners": config.listeners.len()}),
                || {
                    format!(
                        "{}: ok ({} listener(s))",
                        file.display(),
                        config.listeners.len()
                    )
                },
            );
        }
        Command::Check => {
            let reg = Registry::open(&instance)?;
            reg.check()?;
            say(json, json!({"ok": true}), || {
                "registry consistent: every ring matches its backends".into()
            });
        }
        Command::Destroy => {
            crate::instance::require_root()?;
            if !instance.pin_dir().exists() {
                bail!("instance {:?} does not exist", instance.name());
            }
            instance.destroy()?;
            if instance.pin_dir().exists() {
                bail!(
                    "instance {:?}: {} is still there after destroy; remove it by hand",
                    instance.name(),
                    instance.pin_dir().display()
                );
            }
            let audit = instance.audit_log();
            say(
                json,
                json!({"destroyed": instance.name(), "audit_log": audit.display().to_string()}),
                || {
                    format!(
                        "removed instance {} (its audit log stays at {})",
                        instance.name(),
                        audit.display()
                    )
                },
            );
        }
    }
    Ok(())
}

/// An error `weir run` has already logged when it happened; the process
/// only has to exit non-zero.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AlreadyLogged(pub String);

/// `weir run`: loads the configuration, checks that the instance exists
/// and that nobody else serves it or its listeners, runs the workers until
/// SIGTERM or SIGINT, and drains before exiting. It watches the instance's
/// pinned maps meanwhile and stops (non-zero) if they are replaced.
fn run_daemon(path: Option<&std::path::Path>, flag: Option<&str>) -> Result<()> {
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};

    let mut config = match path {
        Some(p) => crate::l7::config::load(p)?,
        None => crate::l7::config::parse(crate::l7::config::DEFAULT, "default configuration")?,
    };
    // The flag and the file must agree: serving another instance than the
    // one an operator named is a silent misroute either way.
    match (flag, &config.instance_set_at) {
        (Some(f), Some(at)) if path.is_some() && f != config.instance => bail!(
            "--instance {f} conflicts with instance = {:?} at {at}; drop one of them",
            config.instance
        ),
        (Some(f), _) => config.instance = f.to_string(),
        (None, _) => {}
    }
    let instance = Instance::new(&config.instance)?;
    crate::instance::require_root()?;
    if !instance
        .pin_dir()
        .join(weir_ebpf::abi::maps::SERVICES)
        .exists()
    {
        let services: std::collections::BTreeSet<String> = config
            .listeners
            .iter()
            .flat_map(|l| l.routes.iter().map(|r| r.service.to_string()))
            .collect();
        let first = services.iter().next().cloned().unwrap_or_default();
        bail!(
            "instance {name:?} does not exist; create it with its L7 service(s) first, e.g. \
             `weir --instance {name} service add {first} --mode l7` (routes name: {})",
            services.into_iter().collect::<Vec<_>>().join(", "),
            name = instance.name(),
        );
    }
    // One daemon per instance: a second would share the listeners
    // (SO_REUSEPORT) and reset the first one's connection counts.
    let Some(mut lock) = instance.try_daemon_lock()? else {
        bail!(
            "another `weir run` (pid {}) is serving instance {:?} ({} is locked); stop it first",
            instance.daemon_pid(),
            instance.name(),
            instance.daemon_lock_path().display()
        );
    };
    lock.write_pid()?;
    // Identities before the workers open anything: whatever they open
    // later is compared against these pins.
    let ids = crate::daemon::MapIds::read(&instance.pin_dir())
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("instance {:?}", instance.name()))?;
    for l in config.listeners.iter().filter(|l| !l.shared) {
        crate::daemon::check_listener_free(l.listen).map_err(anyhow::Error::msg)?;
    }
    let registry = Registry::open(&instance)?;
    let missing: Vec<String> = {
        let state = registry.state()?;
        let mut missing: Vec<String> = config
            .listeners
            .iter()
            .flat_map(|l| l.routes.iter().map(|r| r.service))
            .filter(|s| {
                state
                    .services
                    .get(s)
                    .is_none_or(|e| e.mode != ServiceModeName::L7)
            })
            .map(|s| s.to_string())
            .collect();
        missing.sort();
        missing.dedup();
        missing
    };
    drop(registry);
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
    }
    let fault = Arc::new(Mutex::new(None));
    let watcher = crate::daemon::watch_maps(
        instance.name().to_string(),
        ids,
        stop.clone(),
        fault.clone(),
        config.timeouts.shutdown,
    )
    .context("starting the map watcher")?;
    let listeners: Vec<String> = config
        .listeners
        .iter()
        .map(|l| l.listen.to_string())
        .collect();
    let settings = crate::l7::worker::Settings {
        config,
        instance_dir: instance.pin_dir(),
        state_dir: instance.state_dir(),
    };
    let name = instance.name().to_string();
    let served = crate::l7::worker::serve(settings, stop.clone(), || {
        eprintln!("weir: running instance {name} on {}", listeners.join(", "));
        if !missing.is_empty() {
            eprintln!(
                "weir: warning: instance {name} has no L7 service {}: its routes answer 404 \
                 until `weir --instance {name} service add SERVICE --mode l7`",
                missing.join(", ")
            );
        }
    });
    // The watcher ends with the stop flag; a failed start set it too.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = watcher.join();
    let totals = served.context("L7 workers")?;
    let upgraded = totals.handshakes.get("upgraded").copied().unwrap_or(0);
    let drained = totals
        .closes
        .get("sent_to_client 1001")
        .copied()
        .unwrap_or(0);
    eprintln!(
        "weir: stopped after {} connections ({upgraded} upgraded, {drained} closed with 1001)",
        totals.accepted
    );
    drop(lock);
    if let Some(reason) = fault.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(AlreadyLogged(reason).into());
    }
    Ok(())
}

impl Target {
    fn parse(&self) -> Result<(crate::registry::ServiceAddr, crate::registry::BackendAddr)> {
        let service = parse::service(&self.service).map_err(anyhow::Error::msg)?;
        let backend = parse::backend(&self.backend, &service).map_err(anyhow::Error::msg)?;
        Ok((service, backend))
    }
}

/// A JSON cell as plain text, so column widths apply.
fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn say(json: bool, value: serde_json::Value, text: impl FnOnce() -> String) {
    if json {
        println!("{value}");
    } else {
        println!("{}", text());
    }
}

fn report(json: bool, outcome: &Outcome) {
    for w in &outcome.warnings {
        eprintln!("weir: warning: {w}");
    }
    if json {
        println!("{}", serde_json::to_string(outcome).expect("serializable"));
        return;
    }
    for line in &outcome.diff {
        println!("{line}");
    }
    if outcome.diff.is_empty() {
        println!("no change");
    } else if outcome.applied {
        println!("applied (generation {})", outcome.generation);
    } else {
        println!("dry run: nothing applied");
    }
}

fn list_services(reg: &Registry, json: bool) -> Result<()> {
    let state = reg.state()?;
    let rows: Vec<serde_json::Value> = state
        .services
        .iter()
        .map(|(addr, s)| {
            let count = |st: BackendState| state.backends_of(s.id).filter(|(_, b)| b.state == st).count();
            json!({
                "service": addr.to_string(), "id": s.id, "mode": s.mode, "ring_size": s.ring_size,
                "active": count(BackendState::Active), "draining": count(BackendState::Draining),
                "removed": count(BackendState::Removed),
                "min_backends": s.min_backends, "max_remove_fraction": s.max_remove_permille as f64 / 1000.0,
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    println!(
        "{:<22} {:>4} {:<4} {:>9} {:>6} {:>8} {:>7}",
        "SERVICE", "ID", "MODE", "RING", "ACTIVE", "DRAINING", "REMOVED"
    );
    for r in rows {
        println!(
            "{:<22} {:>4} {:<4} {:>9} {:>6} {:>8} {:>7}",
            cell(&r["service"]),
            cell(&r["id"]),
            cell(&r["mode"]),
            cell(&r["ring_size"]),
            cell(&r["active"]),
            cell(&r["draining"]),
            cell(&r["removed"])
        );
    }
    Ok(())
}

fn list_backends(reg: &Registry, addr: &crate::registry::ServiceAddr, json: bool) -> Result<()> {
    let state = reg.state()?;
    let svc = state.service(addr)?;
    let ring = reg.maps().read_ring(svc.id)?.unwrap_or_default();
    let mut rows = Vec::new();
    for (id, b) in state.backends_of(svc.id) {
        let slots = ring.iter().filter(|x| **x == id).count();
        let st = reg.maps().backend_stats(id)?;
        rows.push(json!({
            "id": id, "backend": b.addr.to_string(), "weight": b.weight, "state": b.state.name(),
            "ring_slots": slots, "new_flows": st.new_flows, "packets": st.packets, "bytes": st.bytes,
        }));
    }
    if json {
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    println!(
        "{:>6} {:<22} {:>6} {:<9} {:>9} {:>10} {:>12}",
        "ID", "BACKEND", "WEIGHT", "STATE", "SLOTS", "NEW FLOWS", "PACKETS"
    );
    for r in rows {
        println!(
            "{:>6} {:<22} {:>6} {:<9} {:>9} {:>10} {:>12}",
            cell(&r["id"]),
            cell(&r["backend"]),
            cell(&r["weight"]),
            cell(&r["state"]),
            cell(&r["ring_slots"]),
            cell(&r["new_flows"]),
            cell(&r["packets"])
        );
    }
    Ok(())
}

fn stats(reg: &Registry, instance: &Instance, json: bool) -> Result<()> {
    let counters = reg.maps().counters()?;
    let state = reg.state()?;
    let generation = reg.maps().generation()?;
    let mut services = Vec::new();
    for (addr, s) in &state.services {
        let st = reg.maps().service_stats(s.id)?;
        let mut backends = Vec::new();
        for (id, b) in state.backends_of(s.id) {
            let bs = reg.maps().backend_stats(id)?;
            backends.push(json!({
                "id": id, "backend": b.addr.to_string(), "state": b.state.name(),
                "packets": bs.packets, "bytes": bs.bytes, "new_flows": bs.new_flows,
            }));
        }
        services.push(json!({
            "service": addr.to_string(), "mode": s.mode, "packets": st.packets, "bytes": st.bytes,
            "new_flows": st.new_flows, "syn_repeats": st.syn_repeats, "flow_misses": st.flow_misses,
            "no_backend": st.no_backend, "passed_l7": st.passed_l7, "backends": backends,
        }));
    }
    let decap = dataplane::decap_counters(instance)?;
    // The daemon's L7 counters, written every second while `weir run` runs.
    let l7: Option<crate::l7::metrics::Snapshot> =
        std::fs::read(instance.state_dir().join("l7-stats.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
    let global: serde_json::Map<String, serde_json::Value> = abi::COUNTERS
        .iter()
        .zip(&counters)
        .map(|(n, v)| (n.to_string(), json!(v)))
        .collect();
    let attachments: Vec<String> = dataplane::attachments(instance)
        .into_iter()
        .map(|(k, d)| format!("{k}:{d}"))
        .collect();
    if json {
        let mut v = json!({
            "instance": instance.name(), "generation": generation, "attached": attachments,
            "xdp": global, "services": services,
        });
        if let Some(l7) = &l7 {
            v["l7"] = serde_json::to_value(l7)?;
        }
        if let Some(d) = &decap {
            v["decap"] = abi::DECAP_COUNTERS
                .iter()
                .zip(d)
                .map(|(n, v)| (n.to_string(), json!(v)))
                .collect();
        }
        println!("{v}");
        return Ok(());
    }
    println!(
        "instance {} generation {generation} attached [{}]",
        instance.name(),
        attachments.join(", ")
    );
    println!("xdp:");
    for (name, value) in abi::COUNTERS.iter().zip(&counters) {
        if *value > 0 || matches!(*name, "tx" | "drop_no_backend") {
            println!("  {name:<20} {value}");
        }
    }
    for s in &services {
        println!(
            "service {} ({}): packets {} bytes {} new_flows {} flow_misses {} no_backend {} passed_l7 {}",
            s["service"].as_str().unwrap_or(""),
            s["mode"].as_str().unwrap_or(""),
            s["packets"],
            s["bytes"],
            s["new_flows"],
            s["flow_misses"],
            s["no_backend"],
            s["passed_l7"]
        );
        for b in s["backends"].as_array().into_iter().flatten() {
            println!(
                "  backend {:<22} {:<9} packets {} bytes {} new_flows {}",
                b["backend"].as_str().unwrap_or(""),
                b["state"].as_str().unwrap_or(""),
                b["packets"],
                b["bytes"],
                b["new_flows"]
            );
        }
    }
    if let Some(l7) = l7 {
        println!(
            "l7 (weir run): accepted {} frames c2b {} b2c {} bytes c2b {} b2c {} drains in progress {} buffer exhausted {} pool releases {}",
            l7.accepted,
            l7.frames_client_to_backend,
            l7.frames_backend_to_client,
            l7.bytes_client_to_backend,
            l7.bytes_backend_to_client,
            l7.drains_in_progress,
            l7.buffer_exhausted,
            l7.pool_releases
        );
        for (backend, (active, total)) in &l7.backends {
            println!("  backend {backend:<22} active {active} total {total}");
        }
        let handshakes: Vec<String> = l7
            .handshakes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!("  handshakes: {}", handshakes.join(", "));
        let closes: Vec<String> = l7.closes.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        println!("  close codes: {}", closes.join(", "));
    }
    if let Some(d) = decap {
        println!("decap:");
        for (name, value) in abi::DECAP_COUNTERS.iter().zip(&d) {
            println!("  {name:<20} {value}");
        }
    }
    Ok(())
}

/// Parses and runs; prints one clear line on error.
pub fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return std::process::ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("weir: {first} (see `weir --help`)");
            return std::process::ExitCode::from(2);
        }
    };
    match run(cli).context("weir") {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<AlreadyLogged>().is_some() => std::process::ExitCode::FAILURE,
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("{}", msg.replacen("weir: ", "weir: error: ", 1));
            std::process::ExitCode::FAILURE
        }
    }
}
