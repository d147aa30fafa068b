//! The `weir` command line. Every command works without a daemon: it opens
//! the instance's pinned maps, goes through the registry API and exits.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;
use weir_ebpf::abi::{self, BackendState};

use crate::dataplane::decap_sources::{self, Prefix};
use crate::dataplane::{self, XdpMode};
use crate::discovery::status as source_status;
use crate::instance::Instance;
use crate::registry::{
    ApplyOptions, BackendAddr, Change, CreateOptions, Outcome, Registry, ServiceAddr,
    ServiceModeName,
};

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
    /// Give the far end of a veth weir's pass-through XDP program, so that
    /// native XDP on the near end can send into it. Run it in the
    /// namespace of that far end.
    AttachPeer {
        #[arg(long)]
        dev: String,
    },
    /// Remove the pass-through XDP program from the far end of a veth.
    DetachPeer {
        #[arg(long)]
        dev: String,
    },
    /// List this instance's attachments (every namespace) and whether the
    /// kernel still has each one attached.
    Attachments {
        /// Remove the pins of defunct attachments (device or namespace gone).
        #[arg(long)]
        prune: bool,
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
    Run(RunArgs),
    /// Have the running `weir run` read its configuration file again and
    /// apply it without closing a connection (as SIGHUP does): prints one
    /// line per change, or the reason it was refused (exit 1).
    Reload,
    /// Replace the running `weir run` with a new process (the binary on
    /// disk, or --binary) that takes over its listeners and connections
    /// without closing one; waits until the new one serves, or says why
    /// it failed (exit 1; the old one then serves on).
    Upgrade(UpgradeArgs),
    /// Check the health of backends and write it to the registry; free
    /// removed backends once nothing uses them. Runs until SIGTERM.
    Agent(DaemonArgs),
    /// Read every map back and check the rings match the backends.
    Check,
    /// The `weir run` (or, with --agent, `weir agent`) configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Remove the instance: detach its programs and delete its maps.
    Destroy,
}

/// What `weir run` takes.
#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Take over from the `weir run` serving the instance (an upgrade):
    /// its listening sockets move here without a refused connect, then its
    /// WebSockets, without a Close; what cannot move stays there until it
    /// ends or `timeouts.takeover` passes.
    #[arg(long)]
    takeover: bool,
}

/// What `weir upgrade` takes.
#[derive(Args, Debug)]
pub struct UpgradeArgs {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// The binary to start; by default the one at this command's path.
    #[arg(long)]
    binary: Option<std::path::PathBuf>,
    /// How long to wait for the new process to serve, in seconds.
    #[arg(long, default_value_t = 120)]
    within: u64,
}

/// What `weir run` and `weir agent` take.
#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Configuration file (TOML); the embedded default without one (`weir
    /// config default [--agent]` prints it).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// How log lines are written to stderr: weir's text lines, or one
    /// JSON object per line for log shippers.
    #[arg(long, value_enum, default_value_t)]
    log_format: crate::logs::Format,
    /// The least severe events logged.
    #[arg(long, value_enum, default_value_t)]
    log_level: crate::logs::Verbosity,
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
        /// Below this healthy share of the active backends, health checks
        /// are not trusted: every active backend stays in the ring (panic).
        #[arg(long)]
        panic_threshold: Option<f64>,
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
        #[arg(long, default_value = "1", value_parser = crate::registry::addr::parse_weight)]
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
        #[arg(value_parser = crate::registry::addr::parse_weight)]
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
    Default {
        /// `weir agent`'s instead of `weir run`'s.
        #[arg(long)]
        agent: bool,
    },
    /// Validate a configuration file (file, line and reason on error).
    Check {
        file: std::path::PathBuf,
        /// A `weir agent` configuration instead of a `weir run` one.
        #[arg(long)]
        agent: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum DecapCmd {
    /// Attach decapsulation at tc ingress of IFACE for packets to VIP.
    Attach {
        #[arg(long)]
        dev: String,
        #[arg(long)]
        vip: Ipv4Addr,
        /// The balancers allowed to send IPIP to VIP (their --lb-addr):
        /// CIDR[,CIDR...]. IPIP to VIP from anyone else is dropped.
        #[arg(long, required = true, value_delimiter = ',', value_parser = parse_prefix)]
        from: Vec<Prefix>,
    },
    /// Allow more balancers to send IPIP to a decapsulated VIP.
    Allow {
        #[arg(long)]
        vip: Ipv4Addr,
        /// CIDR[,CIDR...]
        #[arg(long, required = true, value_delimiter = ',', value_parser = parse_prefix)]
        from: Vec<Prefix>,
    },
    /// Stop accepting IPIP to a VIP from these sources.
    Revoke {
        #[arg(long)]
        vip: Ipv4Addr,
        /// CIDR[,CIDR...], each currently allowed.
        #[arg(long, required = true, value_delimiter = ',', value_parser = parse_prefix)]
        from: Vec<Prefix>,
    },
    /// List decapsulated VIPs and the sources each accepts.
    List,
    /// Detach decapsulation from IFACE.
    Detach {
        #[arg(long)]
        dev: String,
    },
}

/// How long `weir reload` waits for the running `weir run` to answer.
const RELOAD_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);

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
            let done = dataplane::attach(&instance, &dev, lb_addr, mode, create)?;
            let a = &done.xdp.attachment;
            let probe = done.probe.as_ref().map(|p| {
                json!({"dev": p.attachment.dev, "attached_now": p.attached_now,
                       "replaced": p.replaced})
            });
            say(
                json,
                json!({"attached": dev, "lb_addr": lb_addr.to_string(), "mode": a.mode,
                       "ifindex": a.ifindex, "netns": a.netns.label(),
                       "replaced": done.xdp.replaced, "probe": probe}),
                || {
                    let probe = match &done.probe {
                        Some(p) => format!(
                            "; health checks marked {:#x}/{:#x} go through {} ({}){}",
                            abi::PROBE_MARK_BASE,
                            abi::PROBE_MARK_MASK,
                            p.attachment.dev,
                            if p.attached_now {
                                "attached now"
                            } else {
                                "already attached"
                            },
                            replaced_note(&p.replaced)
                        ),
                        None => format!(
                            "; no probe path for health checks: {lb_addr} is not an address \
                             of this host, so backends' answers would not come here"
                        ),
                    };
                    format!(
                        "attached weir ({}) to {dev} (ifindex {}, {} mode, netns {}), \
                         encapsulating from {lb_addr}{}{probe}",
                        instance.name(),
                        a.ifindex,
                        a.mode.name(),
                        a.netns.label(),
                        replaced_note(&done.xdp.replaced),
                    )
                },
            );
        }
        Command::Detach { dev } => {
            let (was, probe) = dataplane::detach(&instance, &dev)?;
            say(
                json,
                json!({"detached": dev, "was": was.state,
                       "probe_was": probe.as_ref().map(|p| p.state)}),
                || {
                    let mut line = format!(
                        "{} weir ({}) from {dev}",
                        detached_verb(&was),
                        instance.name()
                    );
                    if let Some(p) = &probe {
                        let _ = write!(
                            line,
                            "; {} its probe path ({}) with its rule and route",
                            detached_verb(p),
                            p.attachment.dev
                        );
                    }
                    line
                },
            );
        }
        Command::AttachPeer { dev } => {
            let done = dataplane::attach_peer(&instance, &dev)?;
            let a = &done.attachment;
            say(
                json,
                json!({"veth_peer": dev, "ifindex": a.ifindex, "netns": a.netns.label(),
                       "replaced": done.replaced}),
                || {
                    format!(
                        "attached weir's veth pass-through ({}) to {dev} (ifindex {}, native, \
                         netns {}): native XDP on its peer can send into it{}",
                        instance.name(),
                        a.ifindex,
                        a.netns.label(),
                        replaced_note(&done.replaced)
                    )
                },
            );
        }
        Command::DetachPeer { dev } => {
            let was = dataplane::detach_peer(&instance, &dev)?;
            say(
                json,
                json!({"veth_peer_detached": dev, "was": was.state}),
                || {
                    format!(
                        "{} weir's veth pass-through ({}) from {dev}",
                        detached_verb(&was),
                        instance.name()
                    )
                },
            );
        }
        Command::Attachments { prune } => {
            // Reading pins and link info needs root; an empty list must
            // not stand for "could not look".
            crate::instance::require_root()?;
            if prune {
                let removed = dataplane::prune(&instance)?;
                if json {
                    println!("{}", json!({ "pruned": removed }));
                } else if removed.is_empty() {
                    println!("no defunct attachments");
                } else {
                    for s in &removed {
                        println!("removed {}", attachment_line(s));
                    }
                }
            } else {
                list_attachments(&instance, json)?;
            }
        }
        Command::Service(cmd) => match cmd {
            ServiceCmd::Add {
                service,
                mode,
                ring_size,
                max_remove_fraction,
                min_backends,
                panic_threshold,
            } => {
                let addr = service.parse::<ServiceAddr>()?;
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
                    panic_threshold,
                };
                report(json, &reg.apply(&change, opts(false, false))?);
            }
            ServiceCmd::Remove { service, force } => {
                let addr = service.parse::<ServiceAddr>()?;
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
            let (service, change, force, dry_run) = match cmd {
                BackendCmd::List { service } => {
                    let addr = service.parse::<ServiceAddr>()?;
                    let reg = Registry::open(&instance)?;
                    return list_backends(&reg, &addr, json);
                }
                BackendCmd::Add { target, weight } => {
                    let (service, backend) = target.parse()?;
                    (
                        service,
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
                    (
                        service,
                        Change::DrainBackend { service, backend },
                        force,
                        false,
                    )
                }
                BackendCmd::Remove { target, force } => {
                    let (service, backend) = target.parse()?;
                    (
                        service,
                        Change::RemoveBackend { service, backend },
                        force,
                        false,
                    )
                }
                BackendCmd::Weight {
                    target,
                    weight,
                    force,
                } => {
                    let (service, backend) = target.parse()?;
                    (
                        service,
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
                    let service = service.parse::<ServiceAddr>()?;
                    let backends = backends
                        .iter()
                        .map(|b| BackendAddr::parse_weighted_for(b, &service))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(anyhow::Error::msg)?;
                    (
                        service,
                        Change::SetBackends { service, backends },
                        force,
                        dry_run,
                    )
                }
            };
            if let Some(source) = source_status::owner(&instance.state_dir(), &service) {
                eprintln!(
                    "weir: warning: {}",
                    source_status::warning(&service, &source)
                );
            }
            let mut reg = Registry::open(&instance)?;
            let outcome = reg.apply(&change, opts(force, dry_run))?;
            report(json, &outcome);
        }
        Command::Stats => {
            let reg = Registry::open(&instance)?;
            stats(&reg, &instance, json)?;
        }
        Command::Decap(DecapCmd::Attach { dev, vip, from }) => {
            let (done, sources) = dataplane::decap_attach(&instance, &dev, vip, &from)?;
            // VIPs added before allow lists existed accept no one now.
            for (other, from) in decap_sources::list(&instance)? {
                if from.is_empty() {
                    eprintln!(
                        "weir: warning: {other} accepts IPIP from no one (every packet to it is \
                         dropped); allow its balancers with `weir decap allow --vip {other} --from CIDR`"
                    );
                }
            }
            let list = joined(&sources);
            let a = &done.attachment;
            say(
                json,
                json!({"decap": dev, "vip": vip.to_string(), "from": strings(&sources),
                       "ifindex": a.ifindex, "netns": a.netns.label(),
                       "attached_now": done.attached_now, "replaced": done.replaced}),
                || {
                    let how = if done.attached_now {
                        "attached now"
                    } else {
                        "already attached"
                    };
                    format!(
                        "decapsulating IPIP to {vip} from {list} at tc ingress of {dev} \
                         (ifindex {}, netns {}, {how}){}",
                        a.ifindex,
                        a.netns.label(),
                        replaced_note(&done.replaced)
                    )
                },
            );
        }
        Command::Decap(DecapCmd::Allow { vip, from }) => {
            let added = decap_sources::allow_pinned(&instance, vip, &from)?;
            let now = decap_sources::list(&instance)?
                .remove(&vip)
                .unwrap_or_default();
            say(
                json,
                json!({"vip": vip.to_string(), "added": strings(&added), "from": strings(&now)}),
                || {
                    format!(
                        "{vip}: allowed {} ({} already); accepts IPIP from {}",
                        if added.is_empty() {
                            "nothing new".into()
                        } else {
                            joined(&added)
                        },
                        from.iter().collect::<std::collections::BTreeSet<_>>().len() - added.len(),
                        joined(&now)
                    )
                },
            );
        }
        Command::Decap(DecapCmd::Revoke { vip, from }) => {
            let removed = decap_sources::revoke_pinned(&instance, vip, &from)?;
            let now = decap_sources::list(&instance)?
                .remove(&vip)
                .unwrap_or_default();
            if now.is_empty() {
                eprintln!(
                    "weir: warning: {vip} now accepts IPIP from no one: every packet to it is dropped"
                );
            }
            say(
                json,
                json!({"vip": vip.to_string(), "revoked": strings(&removed), "from": strings(&now)}),
                || {
                    format!(
                        "{vip}: revoked {}; accepts IPIP from {}",
                        joined(&removed),
                        joined(&now)
                    )
                },
            );
        }
        Command::Decap(DecapCmd::List) => {
            let vips = decap_sources::list(&instance)?;
            if json {
                let rows: Vec<serde_json::Value> = vips
                    .iter()
                    .map(|(vip, from)| json!({"vip": vip.to_string(), "from": strings(from)}))
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!("{:<16} FROM", "VIP");
                for (vip, from) in &vips {
                    println!("{:<16} {}", vip.to_string(), joined(from));
                }
            }
        }
        Command::Decap(DecapCmd::Detach { dev }) => {
            let was = dataplane::decap_detach(&instance, &dev)?;
            say(
                json,
                json!({"decap_detached": dev, "was": was.state}),
                || format!("{} decap from {dev}", detached_verb(&was)),
            );
        }
        Command::Run(RunArgs {
            daemon: a,
            takeover,
        }) => {
            return crate::daemon::run(
                a.config.as_deref(),
                cli.instance.as_deref(),
                takeover,
                a.log_format,
                a.log_level,
            );
        }
        Command::Reload => {
            use crate::daemon::control;
            crate::instance::require_root()?;
            let path = instance.control_socket_path();
            let outcome = control::call(&path, control::Command::Reload, RELOAD_WITHIN)
                .map_err(|e| anyhow::anyhow!("instance {:?}: {e}", instance.name()))?;
            match outcome {
                control::Outcome::Reloaded { changes } => {
                    say(json, json!({"ok": true, "changes": changes}), || {
                        if changes.is_empty() {
                            "reloaded: nothing changed".into()
                        } else {
                            changes.join("\n")
                        }
                    })
                }
                control::Outcome::Refused { reason } => bail!("reload refused: {reason}"),
                other => bail!("unexpected answer to a reload: {other:?}"),
            }
        }
        Command::Upgrade(u) => {
            use crate::daemon::upgrade;
            // The instance as `weir run` settles it: the flag, or the file's
            // `instance`; the file is checked before anything starts.
            let config = match &u.daemon.config {
                Some(p) => crate::l7::config::load(p)?,
                None => {
                    crate::l7::config::parse(crate::l7::config::DEFAULT, "default configuration")?
                }
            };
            let (instance, _) = crate::daemon::instance_for(
                cli.instance.as_deref(),
                u.daemon.config.is_some(),
                &config.instance,
                config.instance_set_at.as_deref(),
            )?;
            let mut run_args = Vec::new();
            if let Some(c) = &u.daemon.config {
                run_args.push("--config".to_string());
                run_args.push(c.to_string_lossy().into_owned());
            }
            for (flag, value) in [
                ("--log-format", u.daemon.log_format.to_possible_value()),
                ("--log-level", u.daemon.log_level.to_possible_value()),
            ] {
                if let Some(v) = value {
                    run_args.extend([flag.to_string(), v.get_name().to_string()]);
                }
            }
            let plan = upgrade::Plan {
                binary: match u.binary {
                    Some(b) => b,
                    None => upgrade::default_binary()?,
                },
                run_args,
                within: std::time::Duration::from_secs(u.within),
            };
            let done = upgrade::upgrade(&instance, &plan)?;
            let t = &done.takeover;
            say(
                json,
                json!({
                    "ok": true, "from": done.from, "to": done.to, "held": done.held,
                    "moved": t.moved, "failed": t.failed, "left": t.left,
                    "handoff_ms": t.duration_us / 1000,
                    "longest_stall_ms": t.longest_stall_us / 1000,
                }),
                || {
                    format!(
                        "upgraded instance {}: pid {} -> {}; of {} connection(s) {} moved, {} \
                         refused, {} left in the old process until they end (handoff {} ms, \
                         longest stall {} ms)",
                        instance.name(),
                        done.from,
                        done.to,
                        done.held,
                        t.moved,
                        t.failed,
                        t.left,
                        t.duration_us / 1000,
                        t.longest_stall_us / 1000
                    )
                },
            );
        }
        Command::Agent(a) => {
            return crate::daemon::agent::run(
                a.config.as_deref(),
                cli.instance.as_deref(),
                a.log_format,
                a.log_level,
            );
        }
        Command::Config(ConfigCmd::Default { agent: false }) => {
            print!("{}", crate::l7::config::DEFAULT)
        }
        Command::Config(ConfigCmd::Default { agent: true }) => {
            print!("{}", crate::daemon::agent::config::DEFAULT)
        }
        Command::Config(ConfigCmd::Check { file, agent: true }) => {
            let config = crate::daemon::agent::config::load(&file)?;
            say(
                json,
                json!({"ok": true, "checks": config.checks.len()}),
                || format!("{}: ok ({} check(s))", file.display(), config.checks.len()),
            );
        }
        Command::Config(ConfigCmd::Check { file, agent: false }) => {
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
            let digests = reg.ring_digests()?;
            let services: Vec<serde_json::Value> = digests
                .iter()
                .map(|(s, size, d)| {
                    json!({"service": s.to_string(), "ring_size": size, "ring_digest": d})
                })
                .collect();
            say(json, json!({"ok": true, "services": services}), || {
                let mut out = "registry consistent: every ring matches its backends".to_string();
                for (s, size, d) in &digests {
                    out.push_str(&format!("\n  {s:<22} ring {size:>8}  digest {d}"));
                }
                out
            });
        }
        Command::Destroy => {
            crate::instance::require_root()?;
            if !instance.pin_dir().exists() {
                bail!("instance {:?} does not exist", instance.name());
            }
            let routed = dataplane::probe::routed(&instance)?;
            instance.destroy()?;
            let stuck = routed.release()?;
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
                json!({"destroyed": instance.name(), "audit_log": audit.display().to_string(),
                       "probe_routing_left_in": stuck}),
                || {
                    let mut line = format!(
                        "removed instance {} (its audit log stays at {})",
                        instance.name(),
                        audit.display()
                    );
                    if !stuck.is_empty() {
                        let _ = write!(
                            line,
                            "; the probe rule and route stay in namespaces it cannot enter ({}): \
                             run `ip rule del pref {} ; ip route flush table {}` there",
                            stuck.join(", "),
                            dataplane::probe::RULE_PRIORITY,
                            dataplane::probe::TABLE
                        );
                    }
                    line
                },
            );
        }
    }
    Ok(())
}

impl Target {
    fn parse(&self) -> Result<(crate::registry::ServiceAddr, crate::registry::BackendAddr)> {
        let service = self.service.parse::<ServiceAddr>()?;
        let backend = BackendAddr::parse_for(&self.backend, &service)?;
        Ok((service, backend))
    }
}

fn parse_prefix(s: &str) -> Result<Prefix, String> {
    s.parse()
}

fn strings(prefixes: &[Prefix]) -> Vec<String> {
    prefixes.iter().map(Prefix::to_string).collect()
}

/// Prefixes as `a, b`; "no one" for none.
fn joined(prefixes: &[Prefix]) -> String {
    if prefixes.is_empty() {
        "no one".into()
    } else {
        strings(prefixes).join(", ")
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
    // One write for the whole diff, not one per line (stdout flushes at
    // every newline): a set of 10,000 backends prints 10,000 lines.
    let mut out = String::new();
    for line in &outcome.diff {
        let _ = writeln!(out, "{line}");
    }
    if outcome.diff.is_empty() {
        out.push_str("no change\n");
    } else if outcome.applied {
        let _ = writeln!(out, "applied (generation {})", outcome.generation);
    } else {
        out.push_str("dry run: nothing applied\n");
    }
    print!("{out}");
}

fn list_services(reg: &Registry, json: bool) -> Result<()> {
    let state = reg.state()?;
    let rows: Vec<serde_json::Value> = state
        .services
        .iter()
        .map(|(addr, s)| {
            let count = |st: BackendState| state.backends_of(s.id).filter(|(_, b)| b.state == st).count();
            let m = state.membership(s);
            let mut row = json!({
                "service": addr.to_string(), "id": s.id, "mode": s.mode, "ring_size": s.ring_size,
                "active": count(BackendState::Active), "draining": count(BackendState::Draining),
                "removed": count(BackendState::Removed), "healthy": m.healthy,
                "in_ring": m.members.len(),
                "min_backends": s.min_backends, "max_remove_fraction": s.max_remove_permille as f64 / 1000.0,
            });
            merge(&mut row, panic_json(s));
            row
        })
        .collect();
    if json {
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    println!(
        "{:<22} {:>4} {:<4} {:>9} {:>6} {:>7} {:>7} {:>8} {:>7} {:<5}",
        "SERVICE",
        "ID",
        "MODE",
        "RING",
        "ACTIVE",
        "HEALTHY",
        "IN RING",
        "DRAINING",
        "REMOVED",
        "PANIC"
    );
    for r in rows {
        println!(
            "{:<22} {:>4} {:<4} {:>9} {:>6} {:>7} {:>7} {:>8} {:>7} {:<5}",
            cell(&r["service"]),
            cell(&r["id"]),
            cell(&r["mode"]),
            cell(&r["ring_size"]),
            cell(&r["active"]),
            cell(&r["healthy"]),
            cell(&r["in_ring"]),
            cell(&r["draining"]),
            cell(&r["removed"]),
            panic_cell(&r)
        );
    }
    Ok(())
}

/// A service's panic fields, for `service list` and `stats`.
fn panic_json(s: &crate::registry::model::ServiceEntry) -> serde_json::Value {
    json!({
        "panic_threshold": s.panic_permille as f64 / 1000.0, "panic": s.panic,
        "panics": s.panics, "panic_since": time_json(s.panic_since_ms),
    })
}

/// A backend's observed health, for `backend list` and `stats`.
fn health_json(b: &crate::registry::model::BackendEntry) -> serde_json::Value {
    json!({
        "health": b.health.name(), "health_reason": b.health_reason.name(),
        "health_detail": b.health_detail, "health_since": time_json(b.health_since_ms),
    })
}

/// RFC 3339 for a stored time, null for "never".
fn time_json(ms: u64) -> serde_json::Value {
    match ms {
        0 => serde_json::Value::Null,
        ms => json!(crate::registry::audit::rfc3339(ms / 1000)),
    }
}

fn merge(row: &mut serde_json::Value, more: serde_json::Value) {
    if let (Some(row), serde_json::Value::Object(more)) = (row.as_object_mut(), more) {
        row.extend(more);
    }
}

/// "yes (3)" while in panic, else the count of past episodes.
fn panic_cell(r: &serde_json::Value) -> String {
    match r["panic"].as_bool() {
        Some(true) => format!("yes ({})", r["panics"]),
        _ => format!("no ({})", r["panics"]),
    }
}

/// "unhealthy (refused 111) since 2026-12-06T19:00:00Z" or "unknown".
fn health_cell(r: &serde_json::Value) -> String {
    let health = r["health"].as_str().unwrap_or("");
    let reason = r["health_reason"].as_str().unwrap_or("none");
    let mut out = health.to_string();
    if reason != "none" {
        out.push_str(&format!(" ({reason}"));
        match r["health_detail"].as_u64() {
            Some(d) if d != 0 => out.push_str(&format!(" {d})")),
            _ => out.push(')'),
        }
    }
    if let Some(since) = r["health_since"].as_str() {
        out.push_str(&format!(" since {since}"));
    }
    out
}

fn list_backends(reg: &Registry, addr: &crate::registry::ServiceAddr, json: bool) -> Result<()> {
    let state = reg.state()?;
    let svc = state.service(addr)?;
    // Slots per backend in one pass: a scan per backend would cost
    // backends × ring size (2,000 × 200,003 took seconds).
    let mut slots_of: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    for id in reg.maps().read_ring(svc.id)?.unwrap_or_default() {
        *slots_of.entry(id).or_default() += 1;
    }
    let mut rows = Vec::new();
    for (id, b) in state.backends_of(svc.id) {
        let slots = slots_of.get(&id).copied().unwrap_or(0);
        let st = reg.maps().backend_stats(id)?;
        let mut row = json!({
            "id": id, "backend": b.addr.to_string(), "weight": b.weight, "state": b.state.name(),
            "ring_slots": slots, "new_flows": st.new_flows, "packets": st.packets, "bytes": st.bytes,
        });
        merge(&mut row, health_json(b));
        rows.push(row);
    }
    if json {
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    if svc.panic {
        println!(
            "service {addr} is in panic since {}: health is not trusted, every active backend is \
             in the ring",
            time_json(svc.panic_since_ms).as_str().unwrap_or("?")
        );
    }
    println!(
        "{:>6} {:<22} {:>6} {:<9} {:>9} {:>10} {:>12}  HEALTH",
        "ID", "BACKEND", "WEIGHT", "STATE", "SLOTS", "NEW FLOWS", "PACKETS"
    );
    for r in rows {
        println!(
            "{:>6} {:<22} {:>6} {:<9} {:>9} {:>10} {:>12}  {}",
            cell(&r["id"]),
            cell(&r["backend"]),
            cell(&r["weight"]),
            cell(&r["state"]),
            cell(&r["ring_slots"]),
            cell(&r["new_flows"]),
            cell(&r["packets"]),
            health_cell(&r)
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
            let mut row = json!({
                "id": id, "backend": b.addr.to_string(), "state": b.state.name(),
                "packets": bs.packets, "bytes": bs.bytes, "new_flows": bs.new_flows,
            });
            merge(&mut row, health_json(b));
            backends.push(row);
        }
        let mut row = json!({
            "service": addr.to_string(), "mode": s.mode, "packets": st.packets, "bytes": st.bytes,
            "new_flows": st.new_flows, "syn_repeats": st.syn_repeats, "flow_misses": st.flow_misses,
            "no_backend": st.no_backend, "passed_l7": st.passed_l7, "backends": backends,
        });
        merge(&mut row, panic_json(s));
        services.push(row);
    }
    let decap = dataplane::decap_counters(instance)?;
    let probe = dataplane::probe::counters(instance)?;
    // The daemon's L7 counters, written every second while `weir run` runs.
    // No file: no `weir run` has served this instance. A file that does not
    // parse is reported, not shown as "no L7 section".
    let l7_path = instance.state_dir().join("l7-stats.json");
    let l7: Option<crate::l7::metrics::Snapshot> = match std::fs::read(&l7_path) {
        Ok(bytes) => Some(serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} does not parse (written by another weir version?); the next `weir run` \
                 rewrites it every second",
                l7_path.display()
            )
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", l7_path.display())),
    };
    let global: serde_json::Map<String, serde_json::Value> = abi::COUNTERS
        .iter()
        .zip(&counters)
        .map(|(n, v)| (n.to_string(), json!(v)))
        .collect();
    let (attachments, unknown) = dataplane::attachments(instance)?;
    // What `weir agent` last recorded of its discovery sources.
    let sources = source_status::read(&instance.state_dir())
        .with_context(|| "the agent rewrites it at its sources' next report".to_string())?;
    if json {
        let mut v = json!({
            "instance": instance.name(), "generation": generation,
            "attached": attachments, "unknown_pins": unknown,
            "xdp": global, "services": services,
        });
        if let Some(l7) = &l7 {
            v["l7"] = serde_json::to_value(l7)?;
        }
        if let Some(record) = &sources {
            v["sources"] = sources_json(record);
        }
        if let Some(d) = &decap {
            v["decap"] = named_counters(abi::DECAP_COUNTERS, d);
        }
        if let Some(p) = &probe {
            v["probe"] = named_counters(abi::PROBE_COUNTERS, p);
        }
        println!("{v}");
        return Ok(());
    }
    println!("instance {} generation {generation}", instance.name());
    print_attachments(instance, &attachments, &unknown);
    println!("xdp:");
    for (name, value) in abi::COUNTERS.iter().zip(&counters) {
        if *value > 0 || matches!(*name, "tx" | "drop_no_backend") {
            println!("  {name:<20} {value}");
        }
    }
    for s in &services {
        println!(
            "service {} ({}): packets {} bytes {} new_flows {} flow_misses {} no_backend {} passed_l7 {} panic {}",
            s["service"].as_str().unwrap_or(""),
            s["mode"].as_str().unwrap_or(""),
            s["packets"],
            s["bytes"],
            s["new_flows"],
            s["flow_misses"],
            s["no_backend"],
            s["passed_l7"],
            panic_cell(s)
        );
        for b in s["backends"].as_array().into_iter().flatten() {
            println!(
                "  backend {:<22} {:<9} packets {} bytes {} new_flows {} health {}",
                b["backend"].as_str().unwrap_or(""),
                b["state"].as_str().unwrap_or(""),
                b["packets"],
                b["bytes"],
                b["new_flows"],
                health_cell(b)
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
        println!(
            "  weir's Closes never written: to clients {} to backends {}",
            l7.closes_undelivered_to_client, l7.closes_undelivered_to_backend
        );
        println!(
            "  errors: registry refresh {} backend sockets {}",
            l7.registry_refresh_errors, l7.backend_socket_errors
        );
        let t = &l7.takeover;
        if t.moved + t.failed + t.left > 0 {
            println!(
                "  took over: moved {} refused {} left in the old process {} (handoff {} ms, longest stall {} ms)",
                t.moved,
                t.failed,
                t.left,
                t.duration_us / 1000,
                t.longest_stall_us / 1000
            );
        }
        for o in &l7.outliers {
            println!(
                "  outlier {:<22} of {}: {} ejections {} refused {}",
                o.backend,
                o.service,
                if o.ejected { "ejected" } else { "in choice" },
                o.ejections,
                o.refused
            );
        }
    }
    if let Some(d) = decap {
        print_counters("decap", abi::DECAP_COUNTERS, &d);
    }
    if let Some(p) = probe {
        print_counters("probe", abi::PROBE_COUNTERS, &p);
    }
    if let Some(record) = &sources {
        print_sources(&sources_json(record));
    }
    Ok(())
}

/// The agent's record of its sources, with whether that agent still runs
/// (when it does not, nothing follows them: the registry holds what they
/// gave last).
fn sources_json(record: &source_status::Record) -> serde_json::Value {
    let sources: Vec<serde_json::Value> = record
        .sources
        .iter()
        .map(|s| {
            let ms = |t: Option<u64>| time_json(t.unwrap_or(0));
            json!({
                "source": s.source, "stale": s.stale, "last": s.last,
                "stale_since": ms(s.stale_since_ms), "reason": s.reason,
                "applied_revision": s.applied_revision, "applied_at": ms(s.applied_at_ms),
                "services": s.services,
            })
        })
        .collect();
    json!({
        "agent_pid": record.agent_pid,
        "agent_running": source_status::agent_running(record),
        "written": time_json(record.written_ms),
        "sources": sources,
    })
}

fn print_sources(v: &serde_json::Value) {
    let running = v["agent_running"].as_bool() == Some(true);
    println!(
        "sources (weir agent pid {}{}):",
        v["agent_pid"],
        if running {
            String::new()
        } else {
            format!(
                ", not running since its record of {}: nothing follows these sources; the \
                 registry keeps what they gave last",
                v["written"].as_str().unwrap_or("?")
            )
        }
    );
    for s in v["sources"].as_array().into_iter().flatten() {
        let applied = match (s["applied_revision"].as_str(), s["applied_at"].as_str()) {
            (Some(rev), Some(at)) => format!("revision {rev} applied {at}"),
            _ => "nothing applied from it yet".to_string(),
        };
        let services: Vec<&str> = s["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str())
            .collect();
        let owns = if services.is_empty() {
            String::new()
        } else {
            format!("; owns {}", services.join(", "))
        };
        if s["stale"].as_bool() == Some(true) {
            println!(
                "  {}: STALE since {} ({}), keeping {applied}: {}{owns}",
                s["source"].as_str().unwrap_or(""),
                s["stale_since"].as_str().unwrap_or("?"),
                s["last"].as_str().unwrap_or(""),
                s["reason"].as_str().unwrap_or("")
            );
        } else {
            println!(
                "  {}: fresh, {applied}{owns}",
                s["source"].as_str().unwrap_or("")
            );
        }
    }
}

/// A program's counters by name, for `--json`.
fn named_counters(names: &[&str], values: &[u64]) -> serde_json::Value {
    names
        .iter()
        .zip(values)
        .map(|(n, v)| (n.to_string(), json!(v)))
        .collect()
}

/// A program's counters under `title`, one a line, values aligned.
fn print_counters(title: &str, names: &[&str], values: &[u64]) {
    println!("{title}:");
    let width = names.iter().map(|n| n.len()).max().unwrap_or(0);
    for (name, value) in names.iter().zip(values) {
        println!("  {name:<width$} {value}");
    }
}

/// "; replaced a defunct attachment (...)" for each pin an attach replaced.
fn replaced_note(replaced: &[dataplane::attachment::Status]) -> String {
    replaced
        .iter()
        .map(|r| {
            format!(
                "; replaced a {} attachment ({})",
                r.state,
                r.detail.as_deref().unwrap_or("not attached")
            )
        })
        .collect()
}

/// "detached" for a live link; says so when the pin was all that was left.
fn detached_verb(was: &dataplane::attachment::Status) -> String {
    if was.live {
        "detached".into()
    } else {
        format!("removed the {} attachment of", was.state)
    }
}

fn attachment_line(s: &dataplane::attachment::Status) -> String {
    let a = &s.attachment;
    let mut line = format!(
        "{:<9} {:<9} {:<16} {:>7} {:<10} {}",
        s.state,
        a.kind.name(),
        a.dev,
        a.ifindex,
        a.mode.name(),
        s.netns_label
    );
    if let Some(d) = &s.detail {
        line.push_str(&format!("  ({d})"));
    }
    line
}

fn print_attachments(
    instance: &Instance,
    attachments: &[dataplane::attachment::Status],
    unknown: &[dataplane::attachment::Unknown],
) {
    if attachments.is_empty() && unknown.is_empty() {
        println!("attachments: none");
        return;
    }
    println!("attachments:");
    println!(
        "  {:<9} {:<9} {:<16} {:>7} {:<10} NETNS",
        "STATE", "KIND", "DEV", "IFINDEX", "MODE"
    );
    for s in attachments {
        println!("  {}", attachment_line(s));
    }
    for u in unknown {
        let state = if u.live { "live" } else { "not live" };
        println!("  unrecognised pin {} ({state})", u.name);
    }
    if attachments.iter().any(|s| s.state == "defunct") {
        println!(
            "  (defunct attachments do nothing; `weir --instance {} attachments --prune` \
             removes them)",
            instance.name()
        );
    }
}

fn list_attachments(instance: &Instance, json: bool) -> Result<()> {
    let (attachments, unknown) = dataplane::attachments(instance)?;
    if json {
        println!(
            "{}",
            json!({"instance": instance.name(), "attached": attachments, "unknown_pins": unknown})
        );
    } else {
        print_attachments(instance, &attachments, &unknown);
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
            // One line, but with what a "...:" line announces (the
            // missing arguments) folded in.
            let mut lines = text.lines();
            let mut first = lines.next().unwrap_or("invalid arguments").to_string();
            if first.ends_with(':') {
                let listed: Vec<&str> = lines
                    .take_while(|l| !l.trim().is_empty())
                    .map(str::trim)
                    .collect();
                first = format!("{first} {}", listed.join(", "));
            }
            eprintln!("weir: {first} (see `weir --help`)");
            return std::process::ExitCode::from(2);
        }
    };
    match run(cli).context("weir") {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<crate::daemon::AlreadyLogged>().is_some() => {
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("{}", msg.replacen("weir: ", "weir: error: ", 1));
            std::process::ExitCode::FAILURE
        }
    }
}
