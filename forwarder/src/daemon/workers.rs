//! The worker threads of `weir run`: one io_uring worker per core and the
//! metrics endpoint, started together (one that cannot start fails the
//! whole start), reloaded together and joined together.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::l7::config::{Config, ReloadPlan};
use crate::l7::ejections::Ejections;
use crate::l7::files::{self, Sizing};
use crate::l7::metrics::WorkerMetrics;
use crate::l7::reconfig::Reconfig;
use crate::l7::socket::bind_listeners;
use crate::l7::worker::{Settings, Shared, Worker};
use crate::registry::Maps;

/// How long a reload waits for every worker to run it. A worker looks
/// at least once per 50 ms tick.
const APPLIED_WITHIN: Duration = Duration::from_secs(10);

/// The workers and the metrics endpoint of a serving `weir run`.
pub struct Running {
    workers: Vec<JoinHandle<io::Result<()>>>,
    metrics: Vec<Arc<WorkerMetrics>>,
    outliers: Arc<Ejections>,
    reconfig: Arc<Reconfig>,
    stop: Arc<AtomicBool>,
    endpoint: Endpoint,
    snapshot_file: PathBuf,
    /// The addresses the listeners are bound to (a configured port 0
    /// resolved), in configuration order at start.
    pub bound: Vec<SocketAddr>,
    pub sizing: Sizing,
}

/// The metrics thread and its stop flag.
struct Endpoint {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Endpoint {
    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// Starts the workers ([`files::size`] says how many: one per core, or
/// more where the open-files limit caps their tables) and the metrics
/// thread; they serve until `stop` is set and every connection has
/// drained ([`Running::join`]). A worker that cannot start fails the
/// whole start.
pub fn start(settings: Settings, stop: Arc<AtomicBool>) -> io::Result<Running> {
    let config = &settings.config;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let nofile = super::raise_open_files_limit();
    let sizing = files::size(
        config.max_connections as u64,
        config.workers,
        cores,
        nofile,
        config.listeners.len(),
    );
    warn_capacity(&sizing, config.max_connections as u64, nofile);
    let n = sizing.workers;
    let (listener_fds, bound) = bind_listeners(&settings.config.listeners, n)?;
    let metrics: Vec<Arc<WorkerMetrics>> =
        (0..n).map(|_| Arc::new(WorkerMetrics::default())).collect();
    // One outlier table for the process: an ejection holds for every
    // worker.
    let outliers = Arc::new(Ejections::new(config.outlier, Instant::now()));
    // A starting daemon holds no connection: counts left by one that died
    // would keep removed backends in the registry forever.
    Maps::open(&settings.instance_dir)
        .map_err(io::Error::other)?
        .reset_l7_connections();
    // The metrics endpoint first: a taken port fails the start, not the
    // exit hours later.
    let snapshot_file = settings.state_dir.join("l7-stats.json");
    let _ = std::fs::create_dir_all(&settings.state_dir);
    let endpoint = serve_metrics(
        bind_metrics(settings.config.metrics)?,
        &snapshot_file,
        &metrics,
        &outliers,
    )?;
    let shared = Shared {
        stop: stop.clone(),
        open: Arc::new(AtomicUsize::new(0)),
        outliers: outliers.clone(),
        reconfig: Arc::new(Reconfig::new(n)),
    };
    let reconfig = shared.reconfig.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut workers = Vec::new();
    for ((i, m), fds) in metrics.iter().enumerate().zip(listener_fds) {
        let settings = settings.clone();
        let tx = tx.clone();
        let m = m.clone();
        let shared = shared.clone();
        workers.push(
            std::thread::Builder::new()
                .name(format!("weir-worker-{i}"))
                .spawn(move || -> io::Result<()> {
                    let mut worker = match Worker::new(&settings, sizing, fds, m, shared, i) {
                        Ok(w) => {
                            let _ = tx.send(Ok(()));
                            w
                        }
                        Err(e) => {
                            let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                            return Err(e);
                        }
                    };
                    worker.run()
                })?,
        );
    }
    drop(tx);
    let mut started = Ok(());
    for _ in 0..n {
        if let Ok(Err(e)) = rx.recv() {
            started = Err(e);
            break;
        }
    }
    if let Err(e) = started {
        stop.store(true, Ordering::Relaxed);
        for h in workers {
            let _ = h.join();
        }
        endpoint.stop();
        return Err(e);
    }
    Ok(Running {
        workers,
        metrics,
        outliers,
        reconfig,
        stop,
        endpoint,
        snapshot_file,
        bound,
        sizing,
    })
}

fn bind_metrics(addr: Option<SocketAddr>) -> io::Result<Option<TcpListener>> {
    addr.map(|a| {
        TcpListener::bind(a)
            .map_err(|e| io::Error::new(e.kind(), format!("metrics endpoint {a}: {e}")))
    })
    .transpose()
}

fn serve_metrics(
    listener: Option<TcpListener>,
    snapshot_file: &std::path::Path,
    metrics: &[Arc<WorkerMetrics>],
    outliers: &Arc<Ejections>,
) -> io::Result<Endpoint> {
    let stop = Arc::new(AtomicBool::new(false));
    let thread = crate::l7::metrics::serve(
        listener,
        snapshot_file.to_path_buf(),
        metrics.to_vec(),
        outliers.clone(),
        stop.clone(),
    )
    .map_err(|e| io::Error::new(e.kind(), format!("metrics endpoint: {e}")))?;
    Ok(Endpoint { stop, thread })
}

impl Running {
    /// Every worker has ended (after a stop, once its connections drained,
    /// or on an error [`Running::join`] returns).
    pub fn finished(&self) -> bool {
        self.workers.iter().all(JoinHandle::is_finished)
    }

    /// Applies `config`, which `plan` compared with the running one: what
    /// can fail (added listeners free and bound, the new metrics address
    /// bound) is done first, and a failure there changes nothing. Returns
    /// the addresses the added listeners are bound to, once every worker
    /// runs the new configuration.
    pub fn reload(&mut self, config: Config, plan: &ReloadPlan) -> Result<Vec<SocketAddr>, String> {
        if self.stop.load(Ordering::Relaxed) {
            return Err("weir run is stopping".into());
        }
        for l in plan.added.iter().filter(|l| !l.shared) {
            super::check_listener_free(l.listen)?;
        }
        let n = self.workers.len();
        let (per_worker, bound) = bind_listeners(&plan.added, n).map_err(|e| e.to_string())?;
        let added: Vec<Vec<(SocketAddr, OwnedFd)>> = per_worker
            .into_iter()
            .map(|fds| plan.added.iter().map(|l| l.listen).zip(fds).collect())
            .collect();
        let metrics = match plan.metrics {
            Some(addr) => Some(bind_metrics(addr).map_err(|e| e.to_string())?),
            None => None,
        };
        if let Some(listener) = metrics {
            let endpoint =
                serve_metrics(listener, &self.snapshot_file, &self.metrics, &self.outliers)
                    .map_err(|e| e.to_string())?;
            std::mem::replace(&mut self.endpoint, endpoint).stop();
        }
        self.outliers.set_settings(config.outlier);
        let generation = self.reconfig.publish(config, added);
        self.reconfig
            .wait_applied(generation, APPLIED_WITHIN)
            .map_err(|lagging| {
                format!(
                    "reload {generation} is published but worker(s) {lagging:?} did not apply \
                     it within {APPLIED_WITHIN:?}"
                )
            })?;
        Ok(bound)
    }

    /// Waits for every worker to end and returns the final counters.
    pub fn join(self) -> io::Result<crate::l7::metrics::Snapshot> {
        let mut result = Ok(());
        for h in self.workers {
            let r = h
                .join()
                .map_err(|_| io::Error::other("a worker panicked"))
                .and_then(|r| r);
            if result.is_ok() {
                result = r;
            }
        }
        self.endpoint.stop();
        result.map(|()| {
            crate::l7::metrics::snapshot_with_outliers(
                &self.metrics,
                &self.outliers,
                Instant::now(),
            )
        })
    }
}

/// Warns when the workers hold fewer connections than `max_connections`
/// (the start line says how many they hold otherwise).
fn warn_capacity(sizing: &Sizing, max_connections: u64, nofile: u64) {
    if sizing.capacity < max_connections {
        tracing::warn!(
            event = "capacity",
            "{} worker(s) hold at most {} connections here, fewer than \
             runtime.max_connections ({max_connections}): each worker's io_uring file table is \
             capped at the open-files limit ({nofile}); clients beyond get 503. Set \
             runtime.workers = 0 to run as many as it takes, or raise the limit",
            sizing.workers,
            sizing.capacity
        );
    }
}
