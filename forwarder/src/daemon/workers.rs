//! The worker threads of `weir run`: one io_uring worker per core and the
//! metrics endpoint, started together (one that cannot start fails the
//! whole start) and joined together.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use crate::l7::ejections::Ejections;
use crate::l7::files::{self, Sizing};
use crate::l7::metrics::WorkerMetrics;
use crate::l7::socket::bind_listeners;
use crate::l7::worker::{Settings, Worker};
use crate::registry::Maps;

/// Runs the workers ([`files::size`] says how many: one per core, or more
/// where the open-files limit caps their tables) and the metrics thread
/// until `stop` is set and every connection has drained; returns the final
/// counters. A worker that cannot start fails the whole start. Once every
/// worker serves, `listening` gets the addresses the listeners are bound
/// to (a configured port 0 resolved).
pub fn serve(
    settings: Settings,
    stop: Arc<AtomicBool>,
    listening: impl FnOnce(&[SocketAddr], &Sizing),
) -> io::Result<crate::l7::metrics::Snapshot> {
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
    let metrics_stop = Arc::new(AtomicBool::new(false));
    let snapshot_file = settings.state_dir.join("l7-stats.json");
    let _ = std::fs::create_dir_all(&settings.state_dir);
    let metrics_thread = crate::l7::metrics::serve(
        settings.config.metrics,
        snapshot_file,
        metrics.clone(),
        outliers.clone(),
        metrics_stop.clone(),
    )
    .map_err(|e| io::Error::new(e.kind(), format!("metrics endpoint: {e}")))?;
    let open = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = std::sync::mpsc::channel();
    let mut handles = Vec::new();
    for ((i, m), fds) in metrics.iter().enumerate().zip(listener_fds) {
        let settings = settings.clone();
        let stop = stop.clone();
        let tx = tx.clone();
        let m = m.clone();
        let open = open.clone();
        let outliers = outliers.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("weir-worker-{i}"))
                .spawn(move || -> io::Result<()> {
                    let mut worker =
                        match Worker::new(&settings, sizing, fds, stop, m, open, outliers) {
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
        for h in handles {
            let _ = h.join();
        }
        metrics_stop.store(true, Ordering::Relaxed);
        let _ = metrics_thread.join();
        return Err(e);
    }
    listening(&bound, &sizing);
    let mut result = Ok(());
    for h in handles {
        let r = h
            .join()
            .map_err(|_| io::Error::other("a worker panicked"))
            .and_then(|r| r);
        if result.is_ok() {
            result = r;
        }
    }
    metrics_stop.store(true, Ordering::Relaxed);
    let _ = metrics_thread.join();
    result.map(|()| crate::l7::metrics::snapshot_with_outliers(&metrics, &outliers, Instant::now()))
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
