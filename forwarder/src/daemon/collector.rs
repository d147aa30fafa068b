//! Frees removed backends once nothing uses them: the registry's garbage
//! collector, run by `weir run` because only a running daemon knows its L7
//! connection counts are live.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::l7::metrics::WorkerMetrics;
use crate::l7::worker::Settings;

/// Every second, frees removed backends that neither flows nor L7
/// connections use any more: a drained backend leaves the registry once its
/// last connection is gone. A failed round is counted in `metrics` and
/// logged once per failing spell (and once when it works again).
pub fn collect_removed(
    settings: &Settings,
    metrics: Arc<WorkerMetrics>,
    stop: Arc<AtomicBool>,
) -> io::Result<std::thread::JoinHandle<()>> {
    let instance =
        crate::instance::Instance::new(&settings.config.instance).map_err(io::Error::other)?;
    std::thread::Builder::new()
        .name("weir-collect".into())
        .spawn(move || {
            let mut last = Instant::now();
            let mut failing = false;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                if last.elapsed() < Duration::from_secs(1) {
                    continue;
                }
                last = Instant::now();
                let collected = crate::registry::Registry::open(&instance)
                    .and_then(|mut registry| registry.collect("weir run"));
                match collected {
                    Ok(_) if failing => {
                        failing = false;
                        tracing::info!(
                            event = "collect_recovered",
                            "freeing removed backends works again"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => {
                        metrics
                            .registry_collect_errors
                            .fetch_add(1, Ordering::Relaxed);
                        if !failing {
                            failing = true;
                            tracing::warn!(
                                event = "collect_failed",
                                "freeing removed backends failed; they stay `removed` until it \
                                 works (counted in weir_l7_registry_collect_errors_total): {e}"
                            );
                        }
                    }
                }
            }
        })
}
