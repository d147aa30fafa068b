//! `weir upgrade`: starts a new `weir run --takeover` (the binary on disk,
//! or another) for the instance and waits until it serves: it has the
//! listeners and the connections, and answers on the control socket. The
//! new process is detached (its own session) so that it outlives the
//! command; under systemd it tells the service manager it is the main
//! process now ([`super::notify`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::control::{self, Outcome};
use crate::instance::Instance;
use crate::l7::metrics::TakeoverSnapshot;

/// What an upgrade did.
pub struct Upgraded {
    pub from: u32,
    pub to: u32,
    /// Connections the running process held when the upgrade started.
    pub held: usize,
    pub takeover: TakeoverSnapshot,
}

/// What to start: the binary, and the arguments `weir run` takes after
/// `--takeover` (configuration, log format).
pub struct Plan {
    pub binary: PathBuf,
    pub run_args: Vec<String>,
    pub within: Duration,
}

/// Starts the new process and waits, at most `plan.within`, until it
/// answers on the control socket. A new process that exits first fails
/// the upgrade (the old one serves on, as the takeover guarantees).
pub fn upgrade(instance: &Instance, plan: &Plan) -> Result<Upgraded> {
    let socket = instance.control_socket_path();
    let ask = |within| control::call(&socket, control::Command::Status, within);
    let (from, held) = match ask(Duration::from_secs(5)) {
        Ok(Outcome::Status {
            pid, connections, ..
        }) => (pid, connections),
        Ok(other) => bail!("the running weir run answered {other:?} to a status request"),
        Err(e) => bail!(
            "instance {:?}: no weir run to upgrade ({e}); start one with `weir run`",
            instance.name()
        ),
    };
    let mut command = Command::new(&plan.binary);
    command
        .args(["--instance", instance.name(), "run", "--takeover"])
        .args(&plan.run_args)
        .stdin(Stdio::null());
    // SAFETY: setsid is async-signal-safe; it detaches the new process
    // from this command's session and terminal.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", plan.binary.display()))?;
    let to = child.id();
    let deadline = Instant::now() + plan.within;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the new weir run (pid {to}) exited with {status} during the takeover; pid \
                 {from} goes on serving everything it did not hand over (both logs say why)"
            );
        }
        if let Ok(Outcome::Status { pid, takeover, .. }) = ask(Duration::from_secs(2))
            && pid == to
        {
            return Ok(Upgraded {
                from,
                to,
                held,
                takeover,
            });
        }
        if Instant::now() >= deadline {
            bail!(
                "the new weir run (pid {to}) does not serve the control socket after {:?}; it may \
                 still be taking over: see its log and `weir stats`",
                plan.within
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The binary an upgrade starts by default: the one on disk at this
/// command's path (which a package upgrade replaced), not the copy this
/// process runs from.
pub fn default_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the weir binary")?;
    // A replaced binary reads as "... (deleted)": the path is what counts.
    let path = exe.to_string_lossy();
    Ok(Path::new(path.trim_end_matches(" (deleted)")).to_path_buf())
}
