//! The identity of the pinned maps a `weir run` process started on: a
//! destroyed or re-created instance is noticed and stops the daemon, never
//! served silently from orphaned maps.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aya::maps::MapInfo;

use crate::registry::maps::Maps;

/// How often a running daemon compares the pins with the maps it serves.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// The kernel ids of an instance's pinned maps at one moment. Map ids are
/// never reused while a map exists and are allocated cyclically, so a
/// re-created map gets a different id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapIds {
    dir: PathBuf,
    ids: Vec<(&'static str, u32)>,
}

impl MapIds {
    /// Reads the id behind every pin under `dir` that the registry reads.
    pub fn read(dir: &Path) -> Result<Self, String> {
        let mut ids = Vec::new();
        for name in Maps::OPENED {
            let path = dir.join(name);
            let info = MapInfo::from_pin(&path).map_err(|e| {
                format!("pinned map {} is gone or unreadable ({e})", path.display())
            })?;
            ids.push((*name, info.id()));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            ids,
        })
    }

    /// Why the pins no longer name these maps, if they do not.
    pub fn changed(&self) -> Option<String> {
        let now = match Self::read(&self.dir) {
            Ok(now) => now,
            Err(e) => return Some(format!("{e}: the instance was destroyed")),
        };
        self.ids
            .iter()
            .zip(&now.ids)
            .find(|(a, b)| a.1 != b.1)
            .map(|((name, was), (_, is))| {
                format!(
                    "the pinned map {name} is now map id {is}, this process serves map id {was}: \
                     the instance was destroyed and created again"
                )
            })
    }
}

/// Compares the pins with `ids` every [`WATCH_INTERVAL`] until `stop` is
/// set. On a difference it logs one error, records the reason in `fault`
/// and sets `stop`, so the workers refuse new clients and close the open
/// ones within the shutdown window; the process then exits non-zero.
/// Exiting beats re-opening the new maps: a supervisor restart or an
/// operator picks the new instance up explicitly, and a registry that was
/// replaced behind weir's back is never followed silently.
pub fn watch_maps(
    instance: String,
    ids: MapIds,
    stop: Arc<AtomicBool>,
    fault: Arc<Mutex<Option<String>>>,
    shutdown: Duration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("weir-map-watch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(WATCH_INTERVAL);
                if let Some(why) = ids.changed() {
                    let reason = format!("instance {instance}: {why}");
                    tracing::error!(
                        event = "maps_replaced",
                        "{reason}; stopping (new clients are refused, open connections close \
                         within {shutdown:?}); start `weir run` again to serve the new instance"
                    );
                    *fault.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                    stop.store(true, Ordering::Relaxed);
                    return;
                }
            }
        })
}
