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

    /// Removes the instance's pins and state. Attached programs whose links
    /// are pinned here are detached by removing the pins.
    pub fn destroy(&self) -> Result<(), InstanceError> {
        // Under the writer lock, so no change is half-way through.
        let _lock = match self.lock() {
            Ok(lock) => Some(lock),
            Err(InstanceError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                None
            }
            Err(e) => return Err(e),
        };
        for dir in [self.pin_dir(), self.state_dir()] {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(InstanceError::Io {
                        path: dir,
                        source: e,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Held while a writer changes the registry.
pub struct LockGuard {
    _file: File,
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
