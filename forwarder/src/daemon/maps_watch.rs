//! The identity of the pinned maps a daemon (`weir run`, `weir agent`)
//! started on: a destroyed or re-created instance is noticed and stops the
//! daemon, never served or checked silently from orphaned maps.

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

/// What a look at the pins found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pins {
    /// They name the maps this process serves.
    Same,
    /// A pin is gone or names another map: why.
    Replaced(String),
    /// A pin is there but could not be read now (out of descriptors or
    /// memory, say): why. Not a reason to stop; the next look may work.
    Unreadable(String),
}

/// Why a pin could not be read.
enum PinError {
    /// It is not there.
    Gone(String),
    /// It is there, but reading it failed.
    Unreadable(String),
}

impl MapIds {
    /// Reads the id behind every pin under `dir` that the registry reads.
    pub fn read(dir: &Path) -> Result<Self, String> {
        Self::look(dir).map_err(|e| match e {
            PinError::Gone(why) | PinError::Unreadable(why) => why,
        })
    }

    fn look(dir: &Path) -> Result<Self, PinError> {
        let mut ids = Vec::new();
        for name in Maps::OPENED {
            let path = dir.join(name);
            let info = MapInfo::from_pin(&path).map_err(|e| {
                if path.exists() {
                    PinError::Unreadable(format!(
                        "pinned map {} is unreadable ({e})",
                        path.display()
                    ))
                } else {
                    PinError::Gone(format!(
                        "pinned map {} is gone: the instance was destroyed",
                        path.display()
                    ))
                }
            })?;
            ids.push((*name, info.id()));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            ids,
        })
    }

    /// Whether the pins still name these maps.
    pub fn check(&self) -> Pins {
        let now = match Self::look(&self.dir) {
            Ok(now) => now,
            Err(PinError::Gone(why)) => return Pins::Replaced(why),
            Err(PinError::Unreadable(why)) => return Pins::Unreadable(why),
        };
        self.ids
            .iter()
            .zip(&now.ids)
            .find(|(a, b)| a.1 != b.1)
            .map_or(Pins::Same, |((name, was), (_, is))| {
                Pins::Replaced(format!(
                    "the pinned map {name} is now map id {is}, this process serves map id {was}: \
                     the instance was destroyed and created again"
                ))
            })
    }
}

/// Compares the pins with `ids` every [`WATCH_INTERVAL`] until `stop` is
/// set. On a difference it logs one error, records the reason in `fault`
/// and sets `stop` (for `weir run`: the workers refuse new clients and close
/// the open ones within the shutdown window); the process then exits
/// non-zero. `stopping` tells the operator what stopping does. Pins
/// that are there but cannot be read now are logged once per spell (and
/// once when they can again) and looked at again: a process short of
/// descriptors must not take itself down for it.
///
/// Exiting beats re-opening the new maps: a supervisor restart or an
/// operator picks the new instance up explicitly, and a registry that was
/// replaced behind weir's back is never followed silently.
pub fn watch_maps(
    instance: String,
    ids: MapIds,
    stop: Arc<AtomicBool>,
    fault: Arc<Mutex<Option<String>>>,
    stopping: String,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("weir-map-watch".into())
        .spawn(move || {
            let mut unreadable = false;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(WATCH_INTERVAL);
                let why = match ids.check() {
                    Pins::Same => {
                        if std::mem::take(&mut unreadable) {
                            tracing::info!(
                                event = "maps_check_recovered",
                                "instance {instance}: its pins can be read again and name the \
                                 maps this process serves"
                            );
                        }
                        continue;
                    }
                    Pins::Unreadable(why) => {
                        if !std::mem::replace(&mut unreadable, true) {
                            tracing::warn!(
                                event = "maps_check_failed",
                                "instance {instance}: {why}; serving on and checking again every \
                                 {WATCH_INTERVAL:?}"
                            );
                        }
                        continue;
                    }
                    Pins::Replaced(why) => why,
                };
                let reason = format!("instance {instance}: {why}");
                tracing::error!(event = "maps_replaced", "{reason}; stopping ({stopping})");
                *fault.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                stop.store(true, Ordering::Relaxed);
                return;
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pin that is there but cannot be read (here: a plain file, not a
    /// map; in the field: a process out of descriptors) is not a destroyed
    /// instance. A pin that is gone is.
    #[test]
    fn an_unreadable_pin_is_not_a_destroyed_instance() {
        let dir = std::env::temp_dir().join(format!("weir-pins-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in Maps::OPENED {
            std::fs::write(dir.join(name), b"not a map").unwrap();
        }
        let ids = MapIds {
            dir: dir.clone(),
            ids: Maps::OPENED.iter().map(|n| (*n, 1)).collect(),
        };
        assert!(
            matches!(ids.check(), Pins::Unreadable(ref why) if why.contains("unreadable")),
            "{:?}",
            ids.check()
        );
        std::fs::remove_file(dir.join(Maps::OPENED[0])).unwrap();
        assert!(
            matches!(ids.check(), Pins::Replaced(ref why) if why.contains("destroyed")),
            "{:?}",
            ids.check()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
