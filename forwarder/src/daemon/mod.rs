//! weir's two daemons and the plumbing they share (one process per
//! instance through a lock file, SIGTERM/SIGINT, logs, a watch on the
//! pinned maps, refusals logged as such):
//!
//! - `weir run` ([`run`]): everything around the L7 workers that keeps the
//!   process honest about what it serves;
//!   - [`listeners`]: nobody else listens on its addresses;
//!   - [`workers`]: starts, reloads and joins the io_uring workers and the
//!     metrics endpoint;
//!   - [`reload`]: SIGHUP and `weir reload` read the configuration again
//!     and apply it in place, over [`control`], its control socket;
//!   - [`takeover`]: `weir run --takeover` takes the listening sockets of
//!     the running one over that socket ([`fdpass`]: SCM_RIGHTS), then its
//!     connections ([`handoff`]); [`upgrade`] (`weir upgrade`) starts one
//!     and waits until it serves; [`notify`] tells systemd;
//! - [`agent`]: `weir agent`, the control-plane work that needs a process:
//!   health checks and freeing removed backends once nothing uses them;
//! - [`maps_watch`]: the pinned maps a daemon started on are still the
//!   instance's.

pub mod agent;
pub mod control;
pub mod fdpass;
pub mod handoff;
pub mod listeners;
pub mod maps_watch;
pub mod notify;
pub mod reload;
pub mod takeover;
pub mod upgrade;
pub mod workers;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};

use crate::instance::Instance;
use crate::logs;
use crate::registry::{Registry, ServiceModeName};
pub use listeners::check_listener_free;
pub use maps_watch::{MapIds, WATCH_INTERVAL, watch_maps};

/// An error `weir run` has already logged when it happened; the process
/// only has to exit non-zero.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AlreadyLogged(pub String);

/// `weir run`: sets up its logs, then serves (see [`serve`]).
pub fn run(
    path: Option<&Path>,
    flag: Option<&str>,
    takeover: bool,
    format: logs::Format,
    verbosity: logs::Verbosity,
) -> Result<()> {
    logged(format, verbosity, || serve(path, flag, takeover))
}

/// A test hook: `weir run --takeover` waits this many milliseconds after
/// its workers started and before it confirms, so that a test can kill it
/// at that point.
const PAUSE_BEFORE_CONFIRM: &str = "WEIR_TEST_TAKEOVER_PAUSE_MS";

/// Sets up a daemon's logs, then runs `serve`. Whatever stops it early is
/// logged as the refusal it is (`event = "refused"`), in the log format
/// asked for, so a log shipper sees a refused configuration as well as a
/// human does.
pub fn logged(
    format: logs::Format,
    verbosity: logs::Verbosity,
    serve: impl FnOnce() -> Result<()>,
) -> Result<()> {
    logs::init(format, verbosity).map_err(anyhow::Error::msg)?;
    match serve() {
        Err(e) if e.downcast_ref::<AlreadyLogged>().is_none() => {
            tracing::error!(event = "refused", "{e:#}");
            Err(AlreadyLogged(format!("{e:#}")).into())
        }
        other => other,
    }
}

/// The instance a daemon serves: `--instance` or the file's `instance`,
/// and whether its maps exist. The flag and a file that sets the key must
/// agree: serving another instance than the one an operator named is a
/// silent misroute either way. Daemons run as root only.
pub fn instance_for(
    flag: Option<&str>,
    from_file: bool,
    configured: &str,
    set_at: Option<&str>,
) -> Result<(Instance, bool)> {
    let name = match (flag, set_at) {
        (Some(f), Some(at)) if from_file && f != configured => bail!(
            "--instance {f} conflicts with instance = {configured:?} at {at}; drop one of them"
        ),
        (Some(f), _) => f,
        (None, _) => configured,
    };
    let instance = Instance::new(name)?;
    crate::instance::require_root()?;
    let exists = instance
        .pin_dir()
        .join(weir_ebpf::abi::maps::SERVICES)
        .exists();
    Ok((instance, exists))
}

/// Loads the configuration, checks that the instance exists and that
/// nobody else serves it or its listeners, runs the workers until SIGTERM
/// or SIGINT, and drains before exiting. It watches the instance's pinned
/// maps meanwhile and stops (non-zero) if they are replaced, and reloads
/// its configuration on SIGHUP or `weir reload`. With `takeover` it takes
/// the listening sockets and the lock of the `weir run` serving the
/// instance instead of binding and locking ([`takeover`]).
fn serve(path: Option<&Path>, flag: Option<&str>, takeover: bool) -> Result<()> {
    let mut config = match path {
        Some(p) => crate::l7::config::load(p)?,
        None => crate::l7::config::parse(crate::l7::config::DEFAULT, "default configuration")?,
    };
    let (instance, exists) = instance_for(
        flag,
        path.is_some(),
        &config.instance,
        config.instance_set_at.as_deref(),
    )?;
    config.instance = instance.name().to_string();
    if !exists {
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
    // (SO_REUSEPORT) and reset the first one's connection counts. One
    // taking over gets the lock with the listeners.
    let mut taken = if takeover {
        let taken = takeover::take(&instance.control_socket_path())
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("taking over instance {:?}", instance.name()))?;
        let sockets: usize = taken.listeners.iter().map(|l| l.sockets.len()).sum();
        tracing::info!(
            event = "takeover_started",
            from = taken.pid,
            sockets,
            "taking over from pid {}: {sockets} listening socket(s) received",
            taken.pid
        );
        Some(taken)
    } else {
        None
    };
    let mut lock = match taken.as_mut() {
        Some(t) => {
            let fd = t.lock.try_clone()?;
            crate::instance::DaemonLock::inherited(fd, instance.daemon_lock_path())
        }
        None => {
            let Some(mut lock) = instance.try_daemon_lock()? else {
                bail!(
                    "another `weir run` (pid {}) is serving instance {:?} ({} is locked); stop \
                     it first, or start this one with --takeover",
                    instance.daemon_pid(),
                    instance.name(),
                    instance.daemon_lock_path().display()
                );
            };
            lock.write_pid()?;
            lock
        }
    };
    // Identities before the workers open anything: whatever they open
    // later is compared against these pins.
    let ids = MapIds::read(&instance.pin_dir())
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("instance {:?}", instance.name()))?;
    let passed = |addr| {
        taken
            .as_ref()
            .is_some_and(|t| t.listeners.iter().any(|h| h.listen == addr))
    };
    for l in config
        .listeners
        .iter()
        .filter(|l| !l.shared && !passed(l.listen))
    {
        check_listener_free(l.listen).map_err(anyhow::Error::msg)?;
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
    // Counted from here: a SIGHUP during a takeover (a `systemctl reload`)
    // must not end the process, and is served once the control socket is.
    let hangup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hangup.clone())
        .context("installing the SIGHUP handler")?;
    let fault = Arc::new(Mutex::new(None));
    let watcher = watch_maps(
        instance.name().to_string(),
        ids,
        stop.clone(),
        fault.clone(),
        format!(
            "new clients are refused, open connections close within {:?}; start `weir run` \
             again to serve the new instance",
            config.timeouts.shutdown
        ),
    )
    .context("starting the map watcher")?;
    // Taking over, the control socket is the old process's until it
    // stopped accepting.
    let reloads_for = |config: &crate::l7::config::Config, lock: &crate::instance::DaemonLock| {
        anyhow::Ok(reload::Reloads::new(
            &instance,
            path.map(Path::to_path_buf),
            config.clone(),
            lock.share()?,
            hangup.clone(),
        ))
    };
    let reloads = match taken {
        None => {
            let mut reloads = reloads_for(&config, &lock)?;
            reloads.bind()?;
            Some(reloads)
        }
        Some(_) => None,
    };
    let running_config = config.clone();
    let settings = crate::l7::worker::Settings {
        config,
        instance_dir: instance.pin_dir(),
        state_dir: instance.state_dir(),
    };
    let name = instance.name().to_string();
    let listening = |bound: &[std::net::SocketAddr], sizing: &crate::l7::files::Sizing| {
        let bound: Vec<String> = bound.iter().map(|a| a.to_string()).collect();
        tracing::info!(
            event = "started",
            "running instance {name} on {}: {} worker(s), up to {} connections",
            bound.join(", "),
            sizing.workers,
            sizing.capacity
        );
        if !missing.is_empty() {
            tracing::warn!(
                event = "service_missing",
                "instance {name} has no L7 service {}: its routes answer 404 until \
                 `weir --instance {name} service add SERVICE --mode l7`",
                missing.join(", ")
            );
        }
    };
    let served = (|| -> Result<crate::l7::metrics::Snapshot> {
        let mut running = workers::start(settings, stop.clone(), taken.as_mut())?;
        let mut reloads = match reloads {
            Some(r) => r,
            None => {
                let t = taken
                    .take()
                    .context("no control socket, yet nothing taken over")?;
                if let Some(ms) = std::env::var(PAUSE_BEFORE_CONFIRM)
                    .ok()
                    .and_then(|v| v.parse().ok())
                {
                    tracing::info!(
                        event = "takeover_paused",
                        ms,
                        "test hook: pausing before confirm"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                }
                let from = t.pid;
                match t.confirm(handoff::batch_size()) {
                    Ok((held, mut conv)) => {
                        // Listeners passed but no longer configured closed
                        // with `t`: the old process stopped accepting too.
                        lock.write_pid()?;
                        let taken = handoff::take(&mut conv, &running.mailbox, &running.takeover);
                        drop(conv);
                        let m = running.takeover.snapshot();
                        match taken {
                            Ok(()) => tracing::info!(
                                event = "takeover_done",
                                from,
                                moved = m.moved,
                                failed = m.failed,
                                left = m.left,
                                ms = m.duration_us / 1000,
                                longest_stall_ms = m.longest_stall_us / 1000,
                                "takeover done: of {held} connection(s), {} moved, {} failed, {} \
                                 left in the old process until they end; the handoff took {} ms",
                                m.moved,
                                m.failed,
                                m.left,
                                m.duration_us / 1000
                            ),
                            Err(e) => tracing::warn!(
                                event = "takeover_cut_short",
                                from,
                                moved = m.moved,
                                "takeover cut short: {e}; {} connection(s) moved here, the rest \
                                 stay with the old process",
                                m.moved
                            ),
                        }
                        // This process serves everything now: a control
                        // socket it cannot bind does not stop it.
                        let mut reloads = reloads_for(&running_config, &lock)?;
                        if let Err(e) = reloads.bind() {
                            tracing::error!(
                                event = "control_socket_failed",
                                "{e:#}: `weir reload` and a later takeover cannot reach this \
                                 process; SIGHUP still reloads"
                            );
                        }
                        reloads
                    }
                    Err(e) => {
                        // The sockets are shared with the old process:
                        // stop accepting without shutting them.
                        running.hand_over();
                        running.release();
                        running.stop();
                        let _ = running.join();
                        bail!("takeover failed, the old weir run goes on serving: {e}");
                    }
                }
            }
        };
        listening(&running.bound, &running.sizing);
        notify::serving(takeover);
        reloads.serve(&mut running);
        drop(reloads);
        Ok(running.join()?)
    })();
    // The watcher ends with the stop flag; a failed start set it too.
    stop.store(true, Ordering::Relaxed);
    if watcher.join().is_err() {
        // Without the watcher a replaced instance would go unnoticed:
        // never end as if all had been well.
        bail!("the map watcher thread panicked; `weir run` stopped");
    }
    let totals = served.context("L7 workers")?;
    let upgraded = totals.handshakes.get("upgraded").copied().unwrap_or(0);
    let drained = totals
        .closes
        .get("sent_to_client 1001")
        .copied()
        .unwrap_or(0);
    tracing::info!(
        event = "stopped",
        "stopped after {} connections ({upgraded} upgraded, {drained} closed with 1001; Closes \
         to clients never written: {})",
        totals.accepted,
        totals.closes_undelivered_to_client
    );
    drop(lock);
    if let Some(reason) = fault.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(AlreadyLogged(reason).into());
    }
    Ok(())
}

/// Raises the soft open-files limit to the hard one and returns it: it
/// caps `weir run`'s connections (each worker's registered-file table) and
/// `weir agent`'s checks in flight.
pub fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and fill the struct we pass.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}
