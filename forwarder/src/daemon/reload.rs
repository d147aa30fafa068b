//! Reload in place: on SIGHUP or a `weir reload` over the control socket,
//! `weir run` reads its configuration file again, compares it with what
//! runs ([`plan_reload`]) and applies it whole in the running workers, or
//! refuses it whole with one line saying why (file:line and reason, or the
//! field that needs a restart). Each reload is logged (`reloaded`,
//! `reload_refused`) and a `weir reload` gets the same lines.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};

use super::control::{Call, Command, ControlSocket, Outcome};
use super::workers::Running;
use crate::instance::Instance;
use crate::l7::config::{self, Config, plan_reload};

/// How long the control socket waits for a reload to be applied before it
/// answers the client that it did not hear back.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// What triggers reloads of one `weir run`, and the configuration it runs.
pub struct Reloads {
    /// The file read at start; `None`: the embedded default.
    path: Option<PathBuf>,
    running: Config,
    hangup: Arc<AtomicBool>,
    calls: mpsc::Receiver<Call>,
    /// Removed from the state directory when this goes.
    _socket: ControlSocket,
}

impl Reloads {
    /// Installs the SIGHUP handler and serves the instance's control
    /// socket. `running` is the configuration the workers start with.
    pub fn listen(instance: &Instance, path: Option<PathBuf>, running: Config) -> Result<Self> {
        let hangup = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGHUP, hangup.clone())
            .context("installing the SIGHUP handler")?;
        let (tx, calls) = mpsc::channel();
        let socket_path = instance.control_socket_path();
        let socket = ControlSocket::serve(&socket_path, tx, ANSWER_WITHIN)
            .with_context(|| format!("control socket {}", socket_path.display()))?;
        Ok(Self {
            path,
            running,
            hangup,
            calls,
            _socket: socket,
        })
    }

    /// Serves reloads until every worker has ended.
    pub fn serve(&mut self, workers: &mut Running) {
        while !workers.finished() {
            if let Ok(call) = self.calls.recv_timeout(Duration::from_millis(50)) {
                let outcome = match call.command {
                    Command::Reload => self.reload(workers, "weir reload"),
                };
                let _ = call.reply.send(outcome);
            }
            if self.hangup.swap(false, Ordering::Relaxed) {
                self.reload(workers, "SIGHUP");
            }
        }
    }

    /// One reload, logged with what asked for it.
    fn reload(&mut self, workers: &mut Running, by: &str) -> Outcome {
        match self.apply(workers) {
            Ok(changes) => {
                tracing::info!(
                    event = "reloaded",
                    by,
                    changes = changes.len(),
                    "configuration reloaded ({by}): {}",
                    if changes.is_empty() {
                        "nothing changed".to_string()
                    } else {
                        changes.join("; ")
                    }
                );
                Outcome::Reloaded { changes }
            }
            Err(reason) => {
                tracing::error!(
                    event = "reload_refused",
                    by,
                    "reload refused ({by}), the running configuration stays: {reason}"
                );
                Outcome::Refused { reason }
            }
        }
    }

    /// Reads the file, plans and applies; the change lines, or the one
    /// line that refuses it.
    fn apply(&mut self, workers: &mut Running) -> Result<Vec<String>, String> {
        let mut next = match &self.path {
            Some(p) => config::load(p),
            None => config::parse(config::DEFAULT, "default configuration"),
        }
        .map_err(|e| e.to_string())?;
        // The instance was settled at start (flag or file); a file naming
        // another one asks for another process.
        if let Some(at) = &next.instance_set_at
            && next.instance != self.running.instance
        {
            return Err(format!(
                "instance = {:?} at {at}: this weir run serves instance {:?}; the instance \
                 cannot change in a running weir run: it needs a restart",
                next.instance, self.running.instance
            ));
        }
        next.instance = self.running.instance.clone();
        let mut plan = plan_reload(&self.running, &next).map_err(|e| e.to_string())?;
        if plan.changes.is_empty() {
            return Ok(Vec::new());
        }
        let bound = workers.reload(next.clone(), &plan)?;
        for (l, at) in plan.added.iter().zip(bound) {
            if l.listen != at {
                plan.changes
                    .push(format!("listener {} bound to {at}", l.listen));
            }
        }
        self.running = next;
        Ok(plan.changes)
    }
}
