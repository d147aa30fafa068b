//! What keeps a `weir run` process honest about what it serves: the
//! identity of the pinned maps it started on (a destroyed or re-created
//! instance is noticed, not served silently from orphaned maps), and a
//! check that no other process listens on its addresses before it binds
//! them with SO_REUSEPORT (which would silently split the traffic).

use std::net::SocketAddr;
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
/// set. On a difference it logs one line, records the reason in `fault`
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
                    eprintln!(
                        "weir: error: {reason}; stopping (new clients are refused, open \
                         connections close within {shutdown:?}); start `weir run` again to \
                         serve the new instance"
                    );
                    *fault.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                    stop.store(true, Ordering::Relaxed);
                    return;
                }
            }
        })
}

/// Refuses to share `addr` with another process. weir's listeners use
/// SO_REUSEPORT so that its own workers share them; without this check a
/// second process (another `weir run` instance, or any other server with
/// SO_REUSEPORT) on the same address would start and silently take part
/// of the connections. A probe bound without SO_REUSEPORT fails exactly
/// when someone listens there.
pub fn check_listener_free(addr: SocketAddr) -> Result<(), String> {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let owners = listening_pids(addr);
            let by = if owners.is_empty() {
                "another process".to_string()
            } else {
                owners
                    .iter()
                    .map(|(pid, comm)| format!("pid {pid} ({comm})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            Err(format!(
                "listener {addr} is already in use by {by}; weir run does not share a listener \
                 with another process: stop it, or set `shared = true` on this [[listener]] in \
                 every process that serves it on purpose"
            ))
        }
        Err(e) => Err(format!("listening on {addr}: {e}")),
    }
}

/// Processes in this network namespace with a TCP socket listening on
/// `addr` (or on the wildcard address of its port).
fn listening_pids(addr: SocketAddr) -> Vec<(u32, String)> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ... inode (column 9)
            if cols.len() < 10 || cols[3] != "0A" {
                continue;
            }
            let Some(local) = parse_proc_addr(cols[1]) else {
                continue;
            };
            let same_ip = local.ip() == addr.ip()
                || local.ip().is_unspecified()
                || addr.ip().is_unspecified();
            if local.port() == addr.port() && same_ip {
                inodes.push(format!("socket:[{}]", cols[9]));
            }
        }
    }
    let mut owners = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return owners;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let listens = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
        });
        if listens && pid != std::process::id() {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            owners.push((pid, comm.trim().to_string()));
        }
    }
    owners
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6), as the
/// kernel prints them: each 32-bit word in host byte order.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(u32::to_ne_bytes);
    match ip.len() {
        8 => Some(SocketAddr::from((word(ip)?, port))),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(&ip[i * 8..i * 8 + 8])?);
            }
            Some(SocketAddr::from((bytes, port)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_addresses_parse() {
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_proc_addr("0100007F:1F90"),
                Some("127.0.0.1:8080".parse().unwrap())
            );
            assert_eq!(
                parse_proc_addr("00000000000000000000000001000000:0050"),
                Some("[::1]:80".parse().unwrap())
            );
        }
        assert_eq!(parse_proc_addr("zz:1"), None);
    }

    #[test]
    fn a_taken_listener_is_refused_and_names_its_owner() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        // Our own process is left out of the owners; the message still
        // refuses.
        let err = check_listener_free(addr).unwrap_err();
        assert!(
            err.contains(&addr.to_string()) && err.contains("in use"),
            "{err}"
        );
        drop(taken);
        check_listener_free(addr).unwrap();
    }
}
