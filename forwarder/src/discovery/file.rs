//! The watched-file source: services and their backend sets in a TOML or
//! JSON file (by extension), read whole on every change.
//!
//! ```toml
//! [[service]]
//! service = "198.19.0.10:80"
//! backends = ["198.18.1.2:80", "198.18.1.3:80@3"]
//! ```
//!
//! The directory is watched, not the file: editors and deploy tools
//! replace a file by renaming a new one over it, which a watch on the old
//! inode would miss. Events are debounced ([`QUIET`]) so a file written in
//! several steps is read once, when the writes stop; a file that is still
//! half-written then is refused by the parser, and the next write reads it
//! again.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;

use super::{Desired, Report, Update};
use crate::config_file::{ConfigError, Source};
use crate::registry::{BackendAddr, ServiceAddr};

/// How long the directory must stay quiet before the file is read.
pub const QUIET: Duration = Duration::from_millis(200);
/// How often the watching thread looks at the stop flag.
const POLL: Duration = Duration::from_millis(100);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default, rename = "service")]
    services: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    service: toml::Spanned<String>,
    backends: Vec<toml::Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonFile {
    #[serde(default, rename = "service")]
    services: Vec<JsonService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonService {
    service: String,
    backends: Vec<String>,
}

/// The file's format, from its extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Toml,
    Json,
}

impl Format {
    /// `.json` is JSON; anything else is TOML.
    pub fn of(path: &Path) -> Self {
        match path.extension() {
            Some(e) if e.eq_ignore_ascii_case("json") => Format::Json,
            _ => Format::Toml,
        }
    }
}

/// Parses the file's text; `name` (the path) appears in errors, which
/// give the line of what is refused.
pub fn parse(text: &str, name: &str, format: Format) -> Result<Desired, ConfigError> {
    let src = Source::new(text, name);
    let services: Vec<(toml::Spanned<String>, Vec<toml::Spanned<String>>)> = match format {
        Format::Toml => src
            .parse::<RawFile>()?
            .services
            .into_iter()
            .map(|s| (s.service, s.backends))
            .collect(),
        Format::Json => {
            let raw: JsonFile = serde_json::from_str(text).map_err(|e| ConfigError {
                source_name: name.into(),
                line: e.line(),
                column: e.column(),
                reason: e.to_string(),
            })?;
            // serde_json keeps no spans: a refused value points at the
            // first place its quoted text appears.
            let mut from = 0;
            let mut spanned = |s: String| {
                let quoted = format!("\"{s}\"");
                let start = text[from..].find(&quoted).map_or(from, |i| from + i + 1);
                from = start;
                toml::Spanned::new(start..start + s.len(), s)
            };
            raw.services
                .into_iter()
                .map(|s| {
                    let service = spanned(s.service);
                    let backends = s.backends.into_iter().map(&mut spanned).collect();
                    (service, backends)
                })
                .collect()
        }
    };
    let mut desired = Desired::default();
    let mut places: BTreeMap<ServiceAddr, String> = BTreeMap::new();
    for (service, backends) in &services {
        let addr = src.service(service, "service")?;
        if let Some(at) = places.get(&addr) {
            return Err(src.error(
                service.span(),
                format!("service \"{addr}\" is listed already at {at}; list each service once"),
            ));
        }
        places.insert(addr, src.place(service.span()));
        let mut set: Vec<(BackendAddr, u16)> = Vec::with_capacity(backends.len());
        for b in backends {
            let (backend, weight) = BackendAddr::parse_weighted_for(b.get_ref(), &addr)
                .map_err(|e| src.error(b.span(), format!("backends of {addr}: {e}")))?;
            if set.iter().any(|(seen, _)| *seen == backend) {
                return Err(src.error(
                    b.span(),
                    format!("backends of {addr}: {backend} is listed twice"),
                ));
            }
            set.push((backend, weight));
        }
        desired.services.insert(addr, set);
    }
    Ok(desired)
}

/// What one read of the file says, with the revision it is recorded as.
fn read(path: &Path, name: &str, counter: &mut u64) -> Update {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Update::Empty {
                revision: counter.to_string(),
                reason: format!("{name} is gone"),
            };
        }
        Err(e) => {
            return Update::Failed {
                reason: format!("{name}: cannot read: {e}"),
            };
        }
    };
    if text.trim().is_empty() {
        return Update::Empty {
            revision: counter.to_string(),
            reason: format!("{name} is empty"),
        };
    }
    match parse(&text, name, Format::of(path)) {
        Ok(desired) if desired.services.is_empty() => Update::Empty {
            revision: counter.to_string(),
            reason: format!("{name} lists no service"),
        },
        Ok(desired) => {
            *counter += 1;
            Update::Desired {
                revision: revision(path, *counter),
                desired,
            }
        }
        Err(e) => Update::Failed {
            reason: e.to_string(),
        },
    }
}

/// A revision names the read (a counter since the agent started) and the
/// file's modification time, so the audit line ties a change to the file.
fn revision(path: &Path, counter: u64) -> String {
    let mtime = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok());
    match mtime {
        Some(t) => format!("{counter} mtime {}.{:03}", t.as_secs(), t.subsec_millis()),
        None => counter.to_string(),
    }
}

/// An inotify watch on a directory, closed on drop.
struct Watch {
    fd: std::os::fd::OwnedFd,
}

impl Watch {
    fn new(dir: &Path) -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: inotify_init1 takes no pointers; a valid result is a new
        // descriptor this struct owns.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let dir = CString::new(dir.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let mask = libc::IN_CLOSE_WRITE
            | libc::IN_MODIFY
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_ATTRIB;
        use std::os::fd::AsRawFd;
        // SAFETY: `dir` is a NUL-terminated path that outlives the call.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), dir.as_ptr(), mask) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Waits up to `timeout` for events; whether one named `file`.
    fn wait(&self, file: &std::ffi::OsStr, timeout: Duration) -> std::io::Result<bool> {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        let mut hit = false;
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reads into a buffer of the given length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            let mut at = 0;
            let header = std::mem::size_of::<libc::inotify_event>();
            while at + header <= n as usize {
                // SAFETY: the kernel wrote a whole event header at `at`;
                // read_unaligned copes with the byte buffer's alignment.
                let event: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
                let name = &buf[at + header..at + header + event.len as usize];
                let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                hit |= name == file.as_bytes() || event.mask & libc::IN_Q_OVERFLOW != 0;
                at += header + event.len as usize;
            }
        }
        Ok(hit)
    }
}

/// Watches `path` on a thread of its own and reports each settled read
/// (and one at start) until `stop` is set. The directory must exist: its
/// watch is set up before this returns, so a missing one is refused at
/// start.
pub fn spawn(
    path: PathBuf,
    reports: tokio::sync::mpsc::UnboundedSender<Report>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file = path
        .file_name()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} names no file", path.display()),
            )
        })?
        .to_os_string();
    let watch = Watch::new(&dir)
        .map_err(|e| std::io::Error::new(e.kind(), format!("watching {}: {e}", dir.display())))?;
    let source = source_name(&path);
    std::thread::Builder::new()
        .name("weir-discovery-file".into())
        .spawn(move || {
            let mut counter = 0;
            let send = |update| {
                reports
                    .send(Report {
                        source: source.clone(),
                        update,
                    })
                    .is_ok()
            };
            if !send(read(&path, &source, &mut counter)) {
                return;
            }
            let mut due: Option<Instant> = None;
            while !stop.load(Ordering::Relaxed) {
                let timeout = due.map_or(POLL, |d| {
                    d.saturating_duration_since(Instant::now()).min(POLL)
                });
                match watch.wait(&file, timeout) {
                    Ok(true) => due = Some(Instant::now() + QUIET),
                    Ok(false) => {}
                    Err(e) => {
                        send(Update::Failed {
                            reason: format!("{source}: the watch failed, changes stop: {e}"),
                        });
                        return;
                    }
                }
                if due.is_some_and(|d| Instant::now() >= d) {
                    due = None;
                    if !send(read(&path, &source, &mut counter)) {
                        return;
                    }
                }
            }
        })
}

/// How the audit line and the logs name a file source.
pub fn source_name(path: &Path) -> String {
    format!("file {}", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "/etc/weir/backends.toml";

    fn svc(s: &str) -> ServiceAddr {
        s.parse().unwrap()
    }

    fn be(s: &str) -> BackendAddr {
        BackendAddr::parse_for(s, &svc("198.19.0.10:80")).unwrap()
    }

    #[test]
    fn parses_toml_with_weights_and_default_ports() {
        let text = "[[service]]\nservice = \"198.19.0.10:80\"\nbackends = [\"198.18.1.2:80\", \
                    \"198.18.1.3@3\"]\n\n[[service]]\nservice = \"198.19.0.11:80\"\nbackends = \
                    []\n";
        let d = parse(text, NAME, Format::Toml).unwrap();
        assert_eq!(
            d.services[&svc("198.19.0.10:80")],
            vec![(be("198.18.1.2:80"), 1), (be("198.18.1.3:80"), 3)]
        );
        assert_eq!(d.services[&svc("198.19.0.11:80")], vec![]);
    }

    #[test]
    fn parses_json() {
        let text =
            r#"{"service": [{"service": "198.19.0.10:80", "backends": ["198.18.1.2:80@2"]}]}"#;
        let d = parse(text, "b.json", Format::Json).unwrap();
        assert_eq!(
            d.services[&svc("198.19.0.10:80")],
            vec![(be("198.18.1.2:80"), 2)]
        );
    }

    #[test]
    fn refuses_with_file_and_line() {
        let half = "[[service]]\nservice = \"198.19.0.10:80\"\nbackends = [\"198.18.1.2:80\",\n";
        let e = parse(half, NAME, Format::Toml).unwrap_err();
        assert_eq!(e.source_name, NAME);
        assert!(e.line >= 3, "{e}");
        let bad = "[[service]]\nservice = \"198.19.0.10:80\"\nbackends = [\n  \"198.18.1.2:80\",\n  \"198.18.1.x:80\",\n]\n";
        let e = parse(bad, NAME, Format::Toml).unwrap_err();
        assert_eq!((e.line, e.column), (5, 3), "{e}");
        assert!(e.reason.contains("198.18.1.x"), "{e}");
        let weight =
            "[[service]]\nservice = \"198.19.0.10:80\"\nbackends = [\"198.18.1.2:80@0\"]\n";
        let e = parse(weight, NAME, Format::Toml).unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        let twice = "[[service]]\nservice = \"198.19.0.10:80\"\nbackends = []\n[[service]]\nservice = \"198.19.0.10:80\"\nbackends = []\n";
        let e = parse(twice, NAME, Format::Toml).unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert!(e.reason.contains(&format!("{NAME}:2")), "{e}");
        let json =
            "{\"service\": [\n {\"service\": \"198.19.0.10:80\",\n  \"backends\": [\"nope\"]}]}";
        let e = parse(json, "b.json", Format::Json).unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        let e = parse("{\"service\": [", "b.json", Format::Json).unwrap_err();
        assert_eq!(e.line, 1, "{e}");
    }

    #[test]
    fn empty_deleted_and_bare_files_are_empty() {
        let dir = std::env::temp_dir().join(format!("weir-discovery-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("backends.toml");
        let mut counter = 0;
        assert!(matches!(
            read(&path, NAME, &mut counter),
            Update::Empty { .. }
        ));
        std::fs::write(&path, "").unwrap();
        assert!(matches!(
            read(&path, NAME, &mut counter),
            Update::Empty { .. }
        ));
        std::fs::write(&path, "# nothing yet\n").unwrap();
        assert!(matches!(
            read(&path, NAME, &mut counter),
            Update::Empty { .. }
        ));
        std::fs::write(
            &path,
            "[[service]]\nservice = \"198.19.0.10:80\"\nbackends = []\n",
        )
        .unwrap();
        assert!(matches!(
            read(&path, NAME, &mut counter),
            Update::Desired { .. }
        ));
        assert_eq!(counter, 1);
        std::fs::write(&path, "[[service]\n").unwrap();
        assert!(matches!(
            read(&path, NAME, &mut counter),
            Update::Failed { .. }
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
