//! Reload in place: on SIGHUP or a `weir reload` over the control socket,
//! `weir run` reads its configuration file again, compares it with what
//! runs ([`plan_reload`]) and applies it whole in the running workers, or
//! refuses it whole with one line saying why (file:line and reason, or the
//! field that needs a restart). Each reload is logged (`reloaded`,
//! `reload_refused`) and a `weir reload` gets the same lines.
//!
//! The same loop answers a `weir run --takeover` ([`super::takeover`]):
//! once the new process confirms, this one stops accepting, leaves the
//! control socket to it and serves what it holds until that ends or
//! `timeouts.takeover` passes.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::control::{Call, Command, ControlSocket, Outcome};
use super::takeover::Giving;
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
    /// Removed from the state directory when this goes; `None` once
    /// handed over.
    socket: Option<ControlSocket>,
    /// The daemon lock's descriptor, which a takeover passes on.
    lock: OwnedFd,
    /// The takeover in progress, and when it started.
    giving: Option<(Giving, Instant)>,
}

impl Reloads {
    /// Installs the SIGHUP handler and serves the instance's control
    /// socket. `running` is the configuration the workers start with;
    /// `lock` a copy of the daemon lock's descriptor.
    pub fn listen(
        instance: &Instance,
        path: Option<PathBuf>,
        running: Config,
        lock: OwnedFd,
    ) -> Result<Self> {
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
            socket: Some(socket),
            lock,
            giving: None,
        })
    }

    /// Serves reloads and a takeover until every worker has ended.
    pub fn serve(&mut self, workers: &mut Running) {
        while !workers.finished() {
            if let Ok(call) = self.calls.recv_timeout(Duration::from_millis(50)) {
                self.answer(call, workers);
            }
            if self.hangup.swap(false, Ordering::Relaxed) {
                self.reload(workers, "SIGHUP");
            }
            let outcome = self.giving.as_ref().and_then(|(g, _)| g.outcome());
            if let Some(outcome) = outcome {
                let (giving, started) = self.giving.take().expect("a takeover in progress");
                match outcome {
                    Ok(()) => return self.hand_over(giving, started, workers),
                    Err(reason) => tracing::warn!(
                        event = "takeover_failed",
                        "takeover failed, this process goes on accepting: {reason}"
                    ),
                }
            }
        }
    }

    fn answer(&mut self, call: Call, workers: &mut Running) {
        let outcome = match call.command {
            Command::Reload => self.reload(workers, "weir reload"),
            Command::Takeover => match self.give(call.conversation, workers) {
                // The takeover goes on over the connection: no answer here.
                Ok(()) => return,
                Err(reason) => {
                    tracing::warn!(event = "takeover_refused", "takeover refused: {reason}");
                    Outcome::Refused { reason }
                }
            },
            Command::Confirm => Outcome::Refused {
                reason: "confirm answers a takeover offer, on its connection".into(),
            },
        };
        let _ = call.reply.send(outcome);
    }

    /// Offers the listening sockets to the process asking.
    fn give(
        &mut self,
        conversation: Option<std::os::unix::net::UnixStream>,
        workers: &Running,
    ) -> Result<(), String> {
        if self.giving.is_some() {
            return Err("a takeover of this weir run is already in progress".into());
        }
        if workers.stopping() {
            return Err("weir run is stopping".into());
        }
        let stream = conversation.ok_or("the takeover's connection is gone")?;
        let lock = self.lock.try_clone().map_err(|e| e.to_string())?;
        let offer = workers.offer(lock).map_err(|e| e.to_string())?;
        let sockets: usize = offer.listeners.iter().map(|l| l.sockets.len()).sum();
        let giving = Giving::start(stream, offer).map_err(|e| e.to_string())?;
        tracing::info!(
            event = "takeover_started",
            sockets,
            "takeover: offered {sockets} listening socket(s) to a new weir run"
        );
        self.giving = Some((giving, Instant::now()));
        Ok(())
    }

    /// The new process accepts on every socket: this one stops accepting
    /// and leaves it the control socket, then serves what it holds until
    /// that ends, or drains it as on SIGTERM after `timeouts.takeover`.
    fn hand_over(&mut self, giving: Giving, started: Instant, workers: &mut Running) {
        let connections = workers.hand_over();
        self.socket = None;
        giving.done(connections);
        let bound = self.running.timeouts.takeover;
        tracing::info!(
            event = "takeover_done",
            connections,
            ms = started.elapsed().as_millis() as u64,
            "takeover done: the new weir run accepts; {connections} connection(s) stay here \
             until they end, at most {bound:?}"
        );
        let deadline = Instant::now() + bound;
        let mut stopping = false;
        while !workers.finished() {
            if !stopping && Instant::now() >= deadline {
                stopping = true;
                tracing::info!(
                    event = "takeover_bound",
                    connections = workers.open(),
                    "timeouts.takeover ({bound:?}) passed: draining the {} connection(s) left",
                    workers.open()
                );
                workers.stop();
            }
            std::thread::sleep(Duration::from_millis(50));
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
        // The sockets offered are the ones that run now; the new process
        // reads its own file.
        if self.giving.is_some() {
            return Err("a takeover of this weir run is in progress; reload the new one".into());
        }
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
