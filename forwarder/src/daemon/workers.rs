//! The worker threads of `weir run`: one io_uring worker per core and the
//! metrics endpoint, started together (one that cannot start fails the
//! whole start), reloaded together and joined together.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::takeover::{self, Handed, Offer, Taken};
use crate::l7::config::{Config, ReloadPlan};
use crate::l7::ejections::Ejections;
use crate::l7::files::{self, Sizing};
use crate::l7::handoff::mailbox::Mailbox;
use crate::l7::metrics::{TakeoverMetrics, WorkerMetrics};
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
    handed_over: Arc<AtomicBool>,
    /// Set once a takeover's handoff is over: the workers may end as soon
    /// as they hold nothing.
    released: Arc<AtomicBool>,
    open: Arc<AtomicUsize>,
    pub mailbox: Arc<Mailbox>,
    pub takeover: Arc<TakeoverMetrics>,
    /// `None` once handed over: the new process serves the endpoint and
    /// writes the stats file.
    endpoint: Option<Endpoint>,
    snapshot_file: PathBuf,
    /// Copies of every worker's listening sockets and of the metrics
    /// listener, to offer a takeover.
    listening: Vec<Handed>,
    metrics_listener: Option<(SocketAddr, OwnedFd)>,
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
/// whole start. With `taken`, the sockets a takeover passed are used
/// rather than bound (what is left of it was not configured).
pub fn start(
    settings: Settings,
    stop: Arc<AtomicBool>,
    mut taken: Option<&mut Taken>,
) -> io::Result<Running> {
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
    let (listener_fds, bound) = match taken.as_deref_mut() {
        Some(t) => takeover::listeners(&settings.config.listeners, n, &mut t.listeners)?,
        None => {
            let (fds, bound) = bind_listeners(&settings.config.listeners, n)?;
            let fds = fds
                .into_iter()
                .map(|w| w.into_iter().enumerate().collect())
                .collect();
            (fds, bound)
        }
    };
    let listening = copies(&settings.config, &listener_fds, &bound)?;
    let metrics: Vec<Arc<WorkerMetrics>> =
        (0..n).map(|_| Arc::new(WorkerMetrics::default())).collect();
    // One outlier table for the process: an ejection holds for every
    // worker.
    let outliers = Arc::new(Ejections::new(config.outlier, Instant::now()));
    // A starting daemon holds no connection: counts left by one that died
    // would keep removed backends in the registry forever. One taking over
    // shares the counts with the process that still holds its own.
    if taken.is_none() {
        Maps::open(&settings.instance_dir)
            .map_err(io::Error::other)?
            .reset_l7_connections();
    }
    // The metrics endpoint first: a taken port fails the start, not the
    // exit hours later.
    let snapshot_file = settings.state_dir.join("l7-stats.json");
    let _ = std::fs::create_dir_all(&settings.state_dir);
    let metrics_socket = match taken.and_then(|t| t.metrics.take()) {
        Some((addr, l)) if Some(addr) == settings.config.metrics => Some(l),
        _ => bind_metrics(settings.config.metrics)?,
    };
    let metrics_listener = metrics_copy(settings.config.metrics, metrics_socket.as_ref())?;
    let takeover = Arc::new(TakeoverMetrics::default());
    let handed_over = Arc::new(AtomicBool::new(false));
    let endpoint = serve_metrics(
        metrics_socket,
        &snapshot_file,
        &metrics,
        &outliers,
        &takeover,
        &handed_over,
    )?;
    let shared = Shared {
        stop: stop.clone(),
        open: Arc::new(AtomicUsize::new(0)),
        outliers: outliers.clone(),
        reconfig: Arc::new(Reconfig::new(n)),
        handed_over,
        released: Arc::new(AtomicBool::new(false)),
        mailbox: Arc::new(Mailbox::new(n)?),
    };
    let reconfig = shared.reconfig.clone();
    let (handed_over, open) = (shared.handed_over.clone(), shared.open.clone());
    let (released, mailbox) = (shared.released.clone(), shared.mailbox.clone());
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
        handed_over,
        released,
        open,
        mailbox,
        takeover,
        endpoint: Some(endpoint),
        snapshot_file,
        listening,
        metrics_listener,
        bound,
        sizing,
    })
}

/// Copies of the workers' listening sockets, grouped by listener.
fn copies(
    config: &Config,
    per_worker: &takeover::WorkerSockets,
    bound: &[SocketAddr],
) -> io::Result<Vec<Handed>> {
    let mut listening: Vec<Handed> = config
        .listeners
        .iter()
        .zip(bound)
        .map(|(l, b)| Handed {
            listen: l.listen,
            bound: *b,
            sockets: Vec::new(),
        })
        .collect();
    for (i, fd) in per_worker.iter().flatten() {
        listening[*i].sockets.push(fd.try_clone()?);
    }
    Ok(listening)
}

fn metrics_copy(
    addr: Option<SocketAddr>,
    socket: Option<&TcpListener>,
) -> io::Result<Option<(SocketAddr, OwnedFd)>> {
    match (addr, socket) {
        (Some(a), Some(l)) => Ok(Some((a, l.as_fd().try_clone_to_owned()?))),
        _ => Ok(None),
    }
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
    takeover: &Arc<TakeoverMetrics>,
    handed_over: &Arc<AtomicBool>,
) -> io::Result<Endpoint> {
    let stop = Arc::new(AtomicBool::new(false));
    let thread = crate::l7::metrics::serve(
        listener,
        snapshot_file.to_path_buf(),
        metrics.to_vec(),
        outliers.clone(),
        takeover.clone(),
        stop.clone(),
        handed_over.clone(),
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
        if self.stopping() {
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
            Some(addr) => {
                let listener = bind_metrics(addr).map_err(|e| e.to_string())?;
                let copy = metrics_copy(addr, listener.as_ref()).map_err(|e| e.to_string())?;
                Some((listener, copy))
            }
            None => None,
        };
        let mut copied = Vec::new();
        for (l, at) in plan.added.iter().zip(&bound) {
            let sockets = added
                .iter()
                .map(|w| {
                    w.iter()
                        .find(|(a, _)| *a == l.listen)
                        .map(|(_, fd)| fd.try_clone())
                })
                .collect::<Option<io::Result<Vec<OwnedFd>>>>()
                .transpose()
                .map_err(|e| e.to_string())?
                .unwrap_or_default();
            copied.push(Handed {
                listen: l.listen,
                bound: *at,
                sockets,
            });
        }
        if let Some((listener, copy)) = metrics {
            self.metrics_listener = copy;
            let endpoint = self.endpoint_on(listener)?;
            if let Some(old) = self.endpoint.replace(endpoint) {
                old.stop();
            }
        }
        self.listening.retain(|h| !plan.removed.contains(&h.listen));
        self.listening.extend(copied);
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

    /// Copies of the daemon lock `lock`, the metrics listener and every
    /// listening socket, for a takeover.
    pub fn offer(&self, lock: OwnedFd) -> io::Result<Offer> {
        let metrics = match &self.metrics_listener {
            Some((a, fd)) => Some((*a, fd.try_clone()?)),
            None => None,
        };
        let listeners = self
            .listening
            .iter()
            .map(|h| {
                Ok(Handed {
                    listen: h.listen,
                    bound: h.bound,
                    sockets: h
                        .sockets
                        .iter()
                        .map(OwnedFd::try_clone)
                        .collect::<io::Result<_>>()?,
                })
            })
            .collect::<io::Result<_>>()?;
        Ok(Offer {
            lock,
            metrics,
            listeners,
        })
    }

    /// Another process accepts on the listening sockets now: the workers
    /// stop accepting (the sockets stay open there) and the metrics
    /// endpoint stops. This process keeps copies of the sockets until the
    /// handoff is over ([`Running::release`]), to accept again if the new
    /// process fails ([`Running::resume`]). Returns the connections it
    /// holds.
    pub fn hand_over(&mut self) -> usize {
        self.handed_over.store(true, Ordering::Relaxed);
        if let Some(e) = self.endpoint.take() {
            e.stop();
        }
        self.open.load(Ordering::Relaxed)
    }

    /// The handoff is over and the new process serves: the copies of the
    /// sockets close, and each worker ends once it holds nothing.
    pub fn release(&mut self) {
        self.listening.clear();
        self.metrics_listener = None;
        self.released.store(true, Ordering::Relaxed);
        // An idle worker looks at the flag now, not at its next tick.
        for w in 0..self.mailbox.workers() {
            self.mailbox.wake(w);
        }
    }

    /// The new process failed during the handoff: this one accepts again on
    /// its copies of the sockets (with `config`, the one it runs) and
    /// serves the metrics endpoint again.
    pub fn resume(&mut self, config: &Config) -> Result<(), String> {
        let n = self.workers.len();
        let mut per_worker: Vec<Vec<(SocketAddr, OwnedFd)>> = (0..n).map(|_| Vec::new()).collect();
        for h in &self.listening {
            for (i, fd) in h.sockets.iter().enumerate() {
                let fd = fd.try_clone().map_err(|e| e.to_string())?;
                per_worker[i % n].push((h.listen, fd));
            }
        }
        self.handed_over.store(false, Ordering::Relaxed);
        let generation = self.reconfig.publish(config.clone(), per_worker);
        self.reconfig
            .wait_applied(generation, APPLIED_WITHIN)
            .map_err(|lagging| {
                format!("worker(s) {lagging:?} did not accept again within {APPLIED_WITHIN:?}")
            })?;
        let listener = match &self.metrics_listener {
            Some((_, fd)) => Some(TcpListener::from(
                fd.try_clone().map_err(|e| e.to_string())?,
            )),
            None => None,
        };
        self.endpoint = Some(self.endpoint_on(listener)?);
        Ok(())
    }

    /// The metrics endpoint of these workers on `listener`.
    fn endpoint_on(&self, listener: Option<TcpListener>) -> Result<Endpoint, String> {
        serve_metrics(
            listener,
            &self.snapshot_file,
            &self.metrics,
            &self.outliers,
            &self.takeover,
            &self.handed_over,
        )
        .map_err(|e| e.to_string())
    }

    /// Worker `w` has ended.
    pub fn worker_finished(&self, w: usize) -> bool {
        self.workers.get(w).is_none_or(JoinHandle::is_finished)
    }

    /// The connections the workers hold.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A stop (SIGTERM, a failed start, the maps replaced) is under way.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Drains every connection over the shutdown window, as on SIGTERM.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
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
        if let Some(e) = self.endpoint {
            e.stop();
        }
        result.map(|()| {
            crate::l7::metrics::snapshot_with_outliers(
                &self.metrics,
                &self.outliers,
                &self.takeover,
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
