//! Where an instance lives: its pinned maps and links under bpffs, and its
//! lock and audit log under the state directory.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Root of every instance's pins.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Default root of every instance's state; `WEIR_STATE_DIR` overrides it.
pub const STATE_ROOT: &str = "/var/lib/weir";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, Error)]
pub enum InstanceError {
    #[error("instance name {0:?} is invalid: use 1-32 characters from a-z, A-Z, 0-9, '-' and '_'")]
    BadName(String),
    #[error("weir must run as root (it needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)")]
    NotRoot,
    #[error(
        "no BPF filesystem at {BPFFS} and mounting one failed ({0}); mount it with \
         `mount -t bpf bpf {BPFFS}`"
    )]
    NoBpffs(io::Error),
    #[error(
        "instance {instance:?} is served by `weir run` (pid {pid}); stop it first \
         (`kill -TERM {pid}`), then run `weir --instance {instance} destroy` again"
    )]
    Served { instance: String, pid: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> InstanceError + '_ {
    move |source| InstanceError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A named weir instance. Several can share a host (tests use one each).
#[derive(Clone, Debug)]
pub struct Instance {
    name: String,
}

impl Instance {
    pub fn new(name: &str) -> Result<Self, InstanceError> {
        let ok = !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(InstanceError::BadName(name.into()));
        }
        Ok(Self { name: name.into() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/sys/fs/bpf/weir/<instance>`: the pinned maps.
    pub fn pin_dir(&self) -> PathBuf {
        Path::new(BPFFS).join("weir").join(&self.name)
    }

    /// Pinned links of attached programs.
    pub fn link_dir(&self) -> PathBuf {
        self.pin_dir().join("links")
    }

    /// `/var/lib/weir/<instance>` (or `$WEIR_STATE_DIR/<instance>`).
    pub fn state_dir(&self) -> PathBuf {
        let root = std::env::var_os("WEIR_STATE_DIR")
            .map_or_else(|| PathBuf::from(STATE_ROOT), PathBuf::from);
        root.join(&self.name)
    }

    pub fn audit_log(&self) -> PathBuf {
        self.state_dir().join("audit.log")
    }

    /// Held (flock) by the `weir run` serving this instance; it holds that
    /// process' pid.
    pub fn daemon_lock_path(&self) -> PathBuf {
        self.state_dir().join("daemon.lock")
    }

    /// The control socket of the `weir run` holding the daemon lock
    /// (`weir reload` talks to it); removed when that process exits.
    pub fn control_socket_path(&self) -> PathBuf {
        self.state_dir().join("control.sock")
    }

    /// Held (flock) by the `weir agent` of this instance; it holds that
    /// process' pid. Beside `weir run`'s: the two run side by side.
    pub fn agent_lock_path(&self) -> PathBuf {
        self.state_dir().join("agent.lock")
    }

    /// Takes the daemon lock without waiting. `Ok(None)`: another process
    /// holds it; [`Instance::daemon_pid`] says which.
    pub fn try_daemon_lock(&self) -> Result<Option<DaemonLock>, InstanceError> {
        self.try_lock_file(self.daemon_lock_path())
    }

    /// Takes the agent lock without waiting. `Ok(None)`: another agent
    /// holds it; [`Instance::agent_pid`] says which.
    pub fn try_agent_lock(&self) -> Result<Option<DaemonLock>, InstanceError> {
        self.try_lock_file(self.agent_lock_path())
    }

    fn try_lock_file(&self, path: PathBuf) -> Result<Option<DaemonLock>, InstanceError> {
        let dir = self.state_dir();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Ok(None);
            }
            return Err(InstanceError::Io { path, source: e });
        }
        Ok(Some(DaemonLock { file, path }))
    }

    /// The pid the serving `weir run` wrote into the daemon lock (`"?"`
    /// if it could not be read, e.g. a `weir destroy` holds the lock).
    pub fn daemon_pid(&self) -> String {
        pid_in(&self.daemon_lock_path())
    }

    /// The pid the running `weir agent` wrote into the agent lock.
    pub fn agent_pid(&self) -> String {
        pid_in(&self.agent_lock_path())
    }

    /// Checks privileges, mounts bpffs if missing and creates the
    /// directories.
    pub fn prepare(&self) -> Result<(), InstanceError> {
        require_root()?;
        ensure_bpffs()?;
        for dir in [self.pin_dir(), self.link_dir(), self.state_dir()] {
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        Ok(())
    }

    /// Takes the instance's writer lock; it is held until the guard drops.
    /// Every registry writer (CLI or daemon) takes it, so changes serialize.
    /// It is a flock on the pin directory itself: the lock lives where the
    /// registry lives, whatever state directory a writer was given.
    pub fn lock(&self) -> Result<LockGuard, InstanceError> {
        let dir = self.pin_dir();
        let file = File::open(&dir).map_err(io_err(&dir))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(InstanceError::Io {
                path: dir,
                source: io::Error::last_os_error(),
            });
        }
        Ok(LockGuard { _file: file })
    }

    /// Removes the instance's pins and its state, except the audit log:
    /// the record of what was done must outlive the instance. Attached
    /// programs whose links are pinned here are detached by removing the
    /// pins. Refused while a `weir run` serves the instance: it would go on
    /// serving the deleted maps, and would never see an instance created
    /// again under the same name.
    pub fn destroy(&self) -> Result<(), InstanceError> {
        // Held until the end, so no `weir run` starts half-way through.
        let _daemon = match self.try_daemon_lock()? {
            Some(lock) => {
                // A `weir run` refused meanwhile names no stale pid.
                let _ = lock.file.set_len(0);
                lock
            }
            None => {
                return Err(InstanceError::Served {
                    instance: self.name.clone(),
                    pid: self.daemon_pid(),
                });
            }
        };
        // Under the writer lock, so no change is half-way through.
        let _lock = match self.lock() {
            Ok(lock) => Some(lock),
            Err(InstanceError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                None
            }
            Err(e) => return Err(e),
        };
        let pins = self.pin_dir();
        match std::fs::remove_dir_all(&pins) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(InstanceError::Io {
                    path: pins,
                    source: e,
                });
            }
        }
        let state = self.state_dir();
        let keep = [
            self.audit_log(),
            self.daemon_lock_path(),
            self.agent_lock_path(),
        ];
        let entries = match std::fs::read_dir(&state) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(InstanceError::Io {
                    path: state,
                    source: e,
                });
            }
        };
        for entry in entries {
            let path = entry.map_err(io_err(&state))?.path();
            if keep.contains(&path) {
                continue;
            }
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match removed {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(InstanceError::Io { path, source: e }),
            }
        }
        Ok(())
    }
}

/// Held by the one `weir run` serving an instance (and by `weir destroy`
/// while it removes the instance), or by its one `weir agent`.
pub struct DaemonLock {
    file: File,
    path: PathBuf,
}

impl DaemonLock {
    /// The lock another process passed over (`weir run --takeover`): a
    /// flock belongs to the open file description, so holding a copy of
    /// its descriptor holds the lock.
    pub fn inherited(fd: std::os::fd::OwnedFd, path: PathBuf) -> Self {
        Self {
            file: File::from(fd),
            path,
        }
    }

    /// A copy of the descriptor, to pass the lock to another process.
    pub fn share(&self) -> Result<std::os::fd::OwnedFd, InstanceError> {
        self.file
            .try_clone()
            .map(Into::into)
            .map_err(io_err(&self.path))
    }

    /// Records this process as the one serving the instance. At offset
    /// 0: a lock passed over shares its file offset with the process
    /// that wrote before.
    pub fn write_pid(&mut self) -> Result<(), InstanceError> {
        use std::os::unix::fs::FileExt;
        self.file.set_len(0).map_err(io_err(&self.path))?;
        self.file
            .write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0)
            .map_err(io_err(&self.path))
    }
}

/// Held while a writer changes the registry.
pub struct LockGuard {
    _file: File,
}

/// The pid written in a lock file, `"?"` when there is none to read.
fn pid_in(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "?".into())
}

pub fn require_root() -> Result<(), InstanceError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(InstanceError::NotRoot);
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we pass.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Mounts bpffs at /sys/fs/bpf when it is not there.
pub fn ensure_bpffs() -> Result<(), InstanceError> {
    let root = Path::new(BPFFS);
    if is_bpffs(root) {
        return Ok(());
    }
    std::fs::create_dir_all(root).map_err(InstanceError::NoBpffs)?;
    let target = std::ffi::CString::new(BPFFS).expect("no NUL");
    let fstype = std::ffi::CString::new("bpf").expect("no NUL");
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(InstanceError::NoBpffs(io::Error::last_os_error()));
    }
    Ok(())
}
