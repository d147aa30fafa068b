//! `weir agent`: the long-running control-plane process of an instance. It
//! checks the health of the backends of the services its configuration
//! names and writes each transition through [`Registry::apply`] (lock,
//! read-back, audit line, rollback, as the CLI); it frees removed backends
//! once nothing uses them. One agent per instance (its own lock file beside
//! `weir run`'s).
//!
//! Fail static: the data planes read only the registry, so an agent that
//! stops, crashes or is killed changes nothing; the next one starts each
//! backend's rise/fall count from the health the registry has.
//!
//! - [`config`]: the configuration and its embedded default;
//! - [`checks`]: targets, schedules, counters and transitions waiting;
//! - [`probing`]: one check's socket I/O;
//! - [`collector`]: frees removed backends;
//! - [`sources`]: applies what discovery sources ([`crate::discovery`])
//!   report;
//! - [`metrics`]: counters and `/metrics`.
//!
//! One thread: a tokio current-thread runtime runs up to
//! [`MAX_IN_FLIGHT`] checks at once as tasks. Registry reads and writes
//! are system calls made from the loop between checks.

pub mod checks;
pub mod collector;
pub mod config;
pub mod metrics;
pub mod probing;
pub mod sources;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use tokio::task::JoinSet;
use weir_ebpf::abi::BackendHealth;

use crate::health::probe::{Outcome, Seed};
use crate::instance::Instance;
use crate::l7::upstream::Rng;
use crate::logs;
use crate::registry::maps::GenerationWatch;
use crate::registry::{ApplyOptions, Change, DiffLine, Registry, RegistryError, ServiceModeName};
use checks::{Checks, Job};
use collector::Collector;
use config::Config;
use metrics::Metrics;
use probing::Route;
use sources::Sources;

/// Checks running at once: thousands of backends are checked in turn
/// without as many sockets open together. Fewer where the open-files limit
/// is lower (with room for the agent's own descriptors).
pub const MAX_IN_FLIGHT: usize = 1000;
/// Descriptors the agent keeps for itself (maps, metrics, logs).
const OWN_FILES: u64 = 64;
/// How often the registry is read again when its generation did not move.
const READ_INTERVAL: Duration = Duration::from_secs(1);
/// How long transitions gather before they are applied as one change.
const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// The longest the loop sleeps: how soon SIGTERM is noticed.
const TICK: Duration = Duration::from_millis(100);

/// `weir agent`: sets up its logs, then runs until SIGTERM or SIGINT.
pub fn run(
    path: Option<&Path>,
    flag: Option<&str>,
    format: logs::Format,
    verbosity: logs::Verbosity,
) -> Result<()> {
    super::logged(format, verbosity, || serve(path, flag))
}

/// Loads the configuration, takes the instance's agent lock, binds the
/// metrics address and runs the checks until stopped. Everything that can
/// be refused is refused before the first check.
fn serve(path: Option<&Path>, flag: Option<&str>) -> Result<()> {
    let config = match path {
        Some(p) => config::load(p)?,
        None => config::parse(config::DEFAULT, "default configuration")?,
    };
    let (instance, exists) = super::instance_for(
        flag,
        path.is_some(),
        &config.instance,
        config.instance_set_at.as_deref(),
    )?;
    if !exists {
        bail!(
            "instance {:?} does not exist; create it with its services first (`weir --instance \
             {} service add ...`)",
            instance.name(),
            instance.name()
        );
    }
    let Some(mut lock) = instance.try_agent_lock()? else {
        bail!(
            "another `weir agent` (pid {}) runs for instance {:?} ({} is locked); stop it first",
            instance.agent_pid(),
            instance.name(),
            instance.agent_lock_path().display()
        );
    };
    lock.write_pid()?;
    let metrics_listener = config.metrics.as_ref().map(|m| m.bind()).transpose()?;
    let ids = super::MapIds::read(&instance.pin_dir())
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("instance {:?}", instance.name()))?;
    let registry = Registry::open(&instance)?;
    let generation = registry.maps().generation_watch()?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
    }
    let fault = Arc::new(Mutex::new(None));
    let watcher = super::watch_maps(
        instance.name().to_string(),
        ids,
        stop.clone(),
        fault.clone(),
        "checks stop, the registry keeps the health it has; start `weir agent` again to check \
         the new instance"
            .to_string(),
    )
    .context("starting the map watcher")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the agent's runtime")?;
    let (reports_tx, reports) = tokio::sync::mpsc::unbounded_channel();
    let mut source_threads = Vec::new();
    for source in &config.sources {
        match source {
            config::SourceConfig::File { path } => source_threads.push(
                crate::discovery::file::spawn(path.clone(), reports_tx.clone(), stop.clone())
                    .with_context(|| format!("starting the source {}", path.display()))?,
            ),
            config::SourceConfig::Etcd(etcd) => source_threads.push(
                crate::discovery::etcd::spawn(etcd.clone(), reports_tx.clone(), stop.clone())
                    .with_context(|| {
                        format!(
                            "starting the source {}",
                            crate::discovery::etcd::source_name(etcd)
                        )
                    })?,
            ),
        }
    }
    drop(reports_tx);
    let metrics = Arc::new(Mutex::new(Metrics::default()));
    let rng = Rng::from_os().context("seeding the agent's random numbers")?;
    let agent = Agent {
        checks: Checks::new(&config.checks),
        sources: Sources::new(instance.state_dir()),
        reports,
        config,
        instance,
        registry,
        generation,
        metrics: metrics.clone(),
        collector: Collector::default(),
        rng,
        probe_path: None,
        digested: None,
        lb_addr: std::net::Ipv4Addr::UNSPECIFIED,
        failing_apply: false,
        not_started_log: logs::RateLimit::new(5, Duration::from_secs(10)),
        in_flight_cap: usize::try_from(super::raise_open_files_limit().saturating_sub(OWN_FILES))
            .unwrap_or(usize::MAX)
            .clamp(1, MAX_IN_FLIGHT),
    };
    let ran = runtime.block_on(async {
        if let Some(l) = metrics_listener {
            metrics::serve(l, metrics).context("serving /metrics")?;
        }
        agent.run(&stop).await;
        anyhow::Ok(())
    });
    stop.store(true, Ordering::Relaxed);
    if watcher.join().is_err() {
        bail!("the map watcher thread panicked; `weir agent` stopped");
    }
    for thread in source_threads {
        if thread.join().is_err() {
            bail!("a discovery source's thread panicked; `weir agent` stopped");
        }
    }
    ran?;
    drop(lock);
    if let Some(reason) = fault.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(super::AlreadyLogged(reason).into());
    }
    tracing::info!(
        event = "stopped",
        "stopped; the registry keeps the health it has"
    );
    Ok(())
}

struct Agent {
    config: Config,
    instance: Instance,
    registry: Registry,
    generation: GenerationWatch,
    checks: Checks,
    sources: Sources,
    /// What the discovery sources report, each on its own thread or task.
    reports: tokio::sync::mpsc::UnboundedReceiver<crate::discovery::Report>,
    metrics: Arc<Mutex<Metrics>>,
    collector: Collector,
    rng: Rng,
    /// Whether the L4 probe path was attached at the last look.
    probe_path: Option<bool>,
    /// The generation the ring digests in the metrics were read at, and
    /// when.
    digested: Option<(u64, Instant)>,
    /// The LB address `weir attach` set: the source of L4 checks.
    lb_addr: std::net::Ipv4Addr,
    /// The last apply failed (logged once per failing spell).
    failing_apply: bool,
    /// Checks the agent could not start come in bursts (out of
    /// descriptors): a few lines per burst, not one per backend.
    not_started_log: logs::RateLimit,
    /// At most this many checks at once: [`MAX_IN_FLIGHT`], or fewer as
    /// the open-files limit allows.
    in_flight_cap: usize,
}

impl Agent {
    async fn run(mut self, stop: &AtomicBool) {
        let services: Vec<String> = self
            .checks
            .services()
            .iter()
            .map(|s| s.to_string())
            .collect();
        let sources: Vec<String> = self
            .config
            .sources
            .iter()
            .map(|s| match s {
                config::SourceConfig::File { path } => crate::discovery::file::source_name(path),
                config::SourceConfig::Etcd(etcd) => crate::discovery::etcd::source_name(etcd),
            })
            .collect();
        tracing::info!(
            event = "started",
            "checking instance {}: {}, up to {} at once; freeing removed backends every {:?}{}",
            self.instance.name(),
            if services.is_empty() {
                "no services (no [[check]])".to_string()
            } else {
                format!("the backends of {}", services.join(", "))
            },
            self.in_flight_cap,
            self.config.collect_interval,
            if sources.is_empty() {
                String::new()
            } else {
                format!("; backend sets from {}", sources.join(", "))
            }
        );
        let mut running: JoinSet<std::io::Result<Outcome>> = JoinSet::new();
        let mut jobs: HashMap<tokio::task::Id, Job> = HashMap::new();
        let start = Instant::now();
        let (mut next_read, mut next_flush, mut next_collect) = (start, start, start);
        let mut seen_generation = None;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let generation = self.generation.get();
            if now >= next_read || seen_generation != Some(generation) {
                seen_generation = Some(generation);
                next_read = now + READ_INTERVAL;
                self.read(now);
            }
            if now >= next_flush {
                next_flush = now + FLUSH_INTERVAL;
                self.flush();
            }
            if now >= next_collect {
                next_collect = now + self.config.collect_interval;
                if self.collector.round(&mut self.registry).is_err() {
                    self.metrics().collect_errors += 1;
                }
            }
            while running.len() < self.in_flight_cap
                && let Some(job) = self.checks.pop_due(now)
            {
                let route = match self.route(&job) {
                    Some(route) => route,
                    None => {
                        *self
                            .metrics()
                            .probe_path_skipped
                            .entry(job.service)
                            .or_default() += 1;
                        self.checks.not_run(&job, self.rng.next_u32());
                        continue;
                    }
                };
                let seed = self.seed();
                let (check, timeout) = (job.check.clone(), job.timeout);
                let task =
                    running.spawn(async move { probing::run(&check, route, timeout, seed).await });
                jobs.insert(task.id(), job);
            }
            self.metrics().in_flight = running.len() as u64;
            let mut wake = next_read.min(next_flush).min(next_collect).min(now + TICK);
            if running.len() < self.in_flight_cap
                && let Some(due) = self.checks.next_due()
            {
                wake = wake.min(due);
            }
            tokio::select! {
                Some(done) = running.join_next_with_id() => {
                    let (id, outcome) = match done {
                        Ok((id, outcome)) => (id, Ok(outcome)),
                        Err(e) => (e.id(), Err(e)),
                    };
                    if let Some(job) = jobs.remove(&id) {
                        self.done(job, outcome);
                    }
                }
                Some(report) = self.reports.recv() => {
                    let mut metrics = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
                    self.sources.report(report, &mut self.registry, &mut metrics);
                }
                () = tokio::time::sleep_until(wake.into()) => {}
            }
        }
        // Checks in flight are dropped; transitions decided are applied.
        running.abort_all();
        self.flush();
    }

    fn metrics(&self) -> std::sync::MutexGuard<'_, Metrics> {
        self.metrics.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn seed(&mut self) -> Seed {
        let mut seed = [0; 32];
        for chunk in seed.chunks_mut(4) {
            chunk.copy_from_slice(&self.rng.next_u32().to_ne_bytes());
        }
        seed
    }

    /// Reads the registry and follows it; a failed read is logged and the
    /// agent goes on with what it had.
    fn read(&mut self, now: Instant) {
        let state = match self.registry.state() {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!(event = "registry_read_failed", "reading the registry: {e}");
                return;
            }
        };
        let rng = &mut self.rng;
        let synced = self.checks.sync(&state, now, || rng.next_u32());
        for s in synced.missing {
            tracing::warn!(
                event = "service_missing",
                "instance {} has no service {s}: its [[check]] waits until `weir --instance {} \
                 service add {s} ...`",
                self.instance.name(),
                self.instance.name()
            );
        }
        for s in synced.found {
            tracing::info!(
                event = "service_found",
                "checking the backends of service {s}"
            );
        }
        let services = self.checks.services();
        self.metrics().read(&state, &services);
        self.digest_rings(now);
        if self.checks.any_l4() {
            self.look_at_probe_path();
            match self.registry.maps().config() {
                Ok(config) => self.lb_addr = config.lb_addr.into(),
                Err(e) => tracing::warn!(
                    event = "registry_read_failed",
                    "reading the LB address for L4 checks: {e}"
                ),
            }
        }
    }

    /// Recomputes the ring digests when the generation moved, at most once
    /// per [`READ_INTERVAL`]: a ring is up to millions of slots, and while
    /// health changes flow the generation moves every flush. The periodic
    /// read catches up with the last change.
    fn digest_rings(&mut self, now: Instant) {
        // Read first: a change racing the digests moves it again.
        let generation = self.generation.get();
        match self.digested {
            Some((seen, _)) if seen == generation => return,
            Some((_, at)) if now < at + READ_INTERVAL => return,
            _ => {}
        }
        match self.registry.ring_digests() {
            Ok(digests) => {
                self.metrics().digests = digests;
                self.digested = Some((generation, now));
            }
            Err(e) => tracing::warn!(
                event = "registry_read_failed",
                "reading the rings for their digests: {e}"
            ),
        }
    }

    /// Whether the L4 probe path is attached; logged when that changes.
    fn look_at_probe_path(&mut self) {
        let attached = match crate::dataplane::probe::attached(&self.instance) {
            Ok(attached) => attached,
            Err(e) => {
                tracing::warn!(
                    event = "probe_path_unreadable",
                    "cannot tell whether the L4 probe path is attached ({e}); L4 checks wait"
                );
                false
            }
        };
        if self.probe_path.replace(attached) == Some(attached) {
            return;
        }
        if attached {
            tracing::info!(
                event = "probe_path_attached",
                "the L4 probe path is attached: L4 checks run"
            );
        } else {
            tracing::warn!(
                event = "probe_path_missing",
                "the L4 probe path is not attached: checks of L4 backends do not run and their \
                 health stays as it is (counted in weir_agent_probe_path_skipped_total)"
            );
        }
    }

    /// Where a job connects; `None` when it cannot run now (an L4 check
    /// without the probe path).
    fn route(&self, job: &Job) -> Option<Route> {
        match job.mode {
            ServiceModeName::L7 => Some(Route::Direct(std::net::SocketAddr::from((
                job.backend.addr,
                job.backend.port,
            )))),
            ServiceModeName::L4 if self.probe_path == Some(true) => Some(Route::Marked {
                vip: std::net::SocketAddr::from((job.service.vip, job.service.port)),
                mark: crate::dataplane::probe::mark_for(job.id),
                source: self.lb_addr,
            }),
            ServiceModeName::L4 => None,
        }
    }

    /// A check task ended: its result counts, or, if the agent could not
    /// run it (no socket; a panicked task), it is due again and nothing
    /// counts against the backend.
    fn done(&mut self, job: Job, result: Result<std::io::Result<Outcome>, tokio::task::JoinError>) {
        let outcome = match result {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => {
                self.metrics().check_errors += 1;
                if let Some(suppressed) = self.not_started_log.admit(Instant::now()) {
                    tracing::warn!(
                        event = "check_not_started",
                        suppressed,
                        "could not check {} of {}: {e}",
                        job.backend,
                        job.service
                    );
                }
                self.checks.not_run(&job, self.rng.next_u32());
                return;
            }
            Err(e) => {
                self.metrics().check_errors += 1;
                tracing::error!(
                    event = "check_failed",
                    "the check of {} of {} failed in the agent: {e}",
                    job.backend,
                    job.service
                );
                self.checks.not_run(&job, self.rng.next_u32());
                return;
            }
        };
        *self
            .metrics()
            .checks
            .entry((job.service, job.check.name(), outcome.reason.name()))
            .or_default() += 1;
        let random = self.rng.next_u32();
        self.checks.finished(&job, outcome, random, now_ms());
    }

    /// Applies the transitions waiting, as one change. A refused change is
    /// logged (once per failing spell), counted, and tried again next round
    /// on a fresh read.
    fn flush(&mut self) {
        let updates = self.checks.pending();
        if updates.is_empty() {
            return;
        }
        let change = Change::SetHealth {
            updates: updates.clone(),
        };
        let opts = ApplyOptions {
            command: "weir agent".into(),
            ..Default::default()
        };
        match self.registry.apply(&change, opts) {
            Ok(outcome) => {
                if std::mem::take(&mut self.failing_apply) {
                    tracing::info!(event = "apply_recovered", "health changes apply again");
                }
                self.checks.applied(&updates);
                for w in &outcome.warnings {
                    tracing::warn!(event = "apply_warning", "{w}");
                }
                for line in &outcome.diff {
                    self.log_diff(line);
                }
            }
            Err(e) => {
                self.metrics().apply_errors += 1;
                if !std::mem::replace(&mut self.failing_apply, true) {
                    tracing::warn!(
                        event = "apply_failed",
                        "the registry refused {} health change(s); trying again next round \
                         (counted in weir_agent_apply_errors_total): {e}",
                        updates.len()
                    );
                }
                if matches!(e, RegistryError::UnknownBackend(..)) {
                    // A backend left meanwhile: the next read drops it.
                    self.read(Instant::now());
                }
            }
        }
    }

    fn log_diff(&self, line: &DiffLine) {
        match line {
            DiffLine::BackendHealth {
                service,
                backend,
                from,
                to,
                reason,
                ..
            } => {
                *self
                    .metrics()
                    .transitions
                    .entry((*service, to.clone()))
                    .or_default() += 1;
                let (service, backend) = (service.to_string(), backend.to_string());
                let (from, to, reason) = (from.as_str(), to.as_str(), reason.as_str());
                macro_rules! health {
                    ($level:expr) => {
                        tracing::event!(
                            $level,
                            event = "health",
                            service,
                            backend,
                            from,
                            to,
                            reason,
                            "{line}"
                        )
                    };
                }
                if to == BackendHealth::Unhealthy.name() {
                    health!(tracing::Level::WARN);
                } else {
                    health!(tracing::Level::INFO);
                }
            }
            DiffLine::PanicStarted { .. } => tracing::warn!(event = "panic_started", "{line}"),
            DiffLine::PanicEnded { .. } => tracing::info!(event = "panic_ended", "{line}"),
            other => tracing::info!(event = "changed", "{other}"),
        }
    }
}

/// Wall-clock milliseconds, as the registry records transition times.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
