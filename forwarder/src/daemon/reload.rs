//! Reload in place: on SIGHUP or a `weir reload` over the control socket,
//! `weir run` reads its configuration file again, compares it with what
//! runs ([`plan_reload`]) and applies it whole in the running workers, or
//! refuses it whole with one line saying why (file:line and reason, or the
//! field that needs a restart). Each reload is logged (`reloaded`,
//! `reload_refused`) and a `weir reload` gets the same lines.
//!
//! The same loop answers a `weir run --takeover` ([`super::takeover`]):
//! once the new process confirms, this one stops accepting, leaves the
//! control socket to it and hands it its connections
//! ([`super::handoff`]); it serves what it could not hand over until that
//! ends or `timeouts.takeover` passes. If the new process fails during the
//! handoff, this one accepts again and goes on.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::control::{Call, Command, ControlSocket, Outcome};
use super::handoff::{self, Given};
use super::takeover::{Confirmed, Giving};
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
    /// For the control socket again, after a takeover that failed.
    calls_to: mpsc::Sender<Call>,
    socket_path: PathBuf,
    /// Removed from the state directory when this goes; `None` once
    /// handed over.
    socket: Option<ControlSocket>,
    /// The daemon lock's descriptor, which a takeover passes on.
    lock: OwnedFd,
    /// The takeover in progress, and when it started.
    giving: Option<(Giving, Instant)>,
}

impl Reloads {
    /// The reloads of `instance`, counting SIGHUPs in `hangup`; not yet
    /// serving its control socket ([`Reloads::bind`]). `running` is the
    /// configuration the workers start with; `lock` a copy of the daemon
    /// lock's descriptor.
    pub fn new(
        instance: &Instance,
        path: Option<PathBuf>,
        running: Config,
        lock: OwnedFd,
        hangup: Arc<AtomicBool>,
    ) -> Self {
        let (calls_to, calls) = mpsc::channel();
        Self {
            path,
            running,
            hangup,
            calls,
            calls_to,
            socket_path: instance.control_socket_path(),
            socket: None,
            lock,
            giving: None,
        }
    }

    /// Serves the instance's control socket.
    pub fn bind(&mut self) -> Result<()> {
        let socket = ControlSocket::serve(&self.socket_path, self.calls_to.clone(), ANSWER_WITHIN)
            .with_context(|| format!("control socket {}", self.socket_path.display()))?;
        self.socket = Some(socket);
        Ok(())
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
                    Ok(confirmed) => {
                        if !self.hand_over(giving, confirmed, started, workers) {
                            return;
                        }
                    }
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
            Command::Status => Outcome::Status {
                pid: std::process::id(),
                connections: workers.open(),
                takeover: workers.takeover.snapshot(),
            },
            Command::Confirm { .. } | Command::Taken { .. } => Outcome::Refused {
                reason: "confirm and taken answer a takeover, on its connection".into(),
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

    /// The new process accepts on every socket: this one stops accepting,
    /// leaves it the control socket and hands it its connections in the
    /// batches it `confirmed`; then serves what it could not hand over
    /// until that ends, or drains it as on SIGTERM after
    /// `timeouts.takeover`.
    /// `true`: the new process failed during the handoff, and this one
    /// accepts again and goes on serving.
    fn hand_over(
        &mut self,
        giving: Giving,
        confirmed: Confirmed,
        started: Instant,
        workers: &mut Running,
    ) -> bool {
        let batch = confirmed.batch;
        let connections = workers.hand_over();
        self.socket = None;
        tracing::info!(
            event = "handoff_started",
            connections,
            "the new weir run accepts: handing it {connections} connection(s) in batches of \
             {batch}"
        );
        let given = match giving.done(connections, confirmed) {
            Ok(mut conv) => {
                let mailbox = workers.mailbox.clone();
                let mut given = handoff::give(&mut conv, &mailbox, |w| workers.worker_finished(w));
                if given.broken.is_none()
                    && let Err(e) = handoff::finish(&mut conv, &given, workers.open())
                {
                    given.broken =
                        Some(format!("telling the new process the handoff is over: {e}"));
                }
                given
            }
            Err(e) => Given {
                broken: Some(format!("telling the new process it accepts alone: {e}")),
                ..Given::default()
            },
        };
        if let Some(reason) = &given.broken {
            self.take_back(workers, reason, &given);
            return true;
        }
        workers.release();
        let left = workers.open();
        let bound = self.running.timeouts.takeover;
        tracing::info!(
            event = "handoff_done",
            moved = given.moved,
            failed = given.failed,
            left,
            ms = given.took.as_millis() as u64,
            longest_stall_ms = given.longest_stall.as_millis() as u64,
            takeover_ms = started.elapsed().as_millis() as u64,
            "handoff done in {} ms: {} connection(s) moved to the new weir run, {} refused by \
             it, {left} left here until they end (at most {bound:?}); the longest a connection \
             was held quiet: {} ms",
            given.took.as_millis(),
            given.moved,
            given.failed,
            given.longest_stall.as_millis()
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
        false
    }

    /// The new process failed during the handoff: this process accepts
    /// again, serves its metrics endpoint and its control socket again, and
    /// keeps what it did not hand over.
    fn take_back(&mut self, workers: &mut Running, reason: &str, given: &Given) {
        tracing::error!(
            event = "takeover_failed",
            moved = given.moved,
            "the new weir run failed during the handoff ({reason}); {} connection(s) went to it \
             before; this process accepts again and serves the {} it holds",
            given.moved,
            workers.open()
        );
        if let Err(e) = workers.resume(&self.running) {
            tracing::error!(
                event = "resume_failed",
                "accepting again after the failed takeover: {e}; restart weir run"
            );
        }
        if let Err(e) = self.bind() {
            tracing::error!(
                event = "control_socket_failed",
                "serving it again after the failed takeover: {e:#}; `weir reload` and a new \
                 takeover cannot reach this process, restart it"
            );
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
