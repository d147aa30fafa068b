//! A worker's half of a connection handoff (see `l7/handoff/mailbox.rs`
//! for the exchange with the daemon thread, `l7/conn/snapshot.rs` for what
//! moves).
//!
//! Old process: a batch at a time, the worker quiesces up to `batch`
//! relaying connections, waits until none has an operation in flight,
//! installs their two direct descriptors as normal ones, exports them and
//! sends the batch; until the verdict they stay quiet and theirs. Only
//! then does it quiesce the next batch, so a connection stalls for one
//! batch's round trip, not for the whole handoff. Taken ones are let go
//! (their slots closed, not shut: the sockets live on in the new
//! process); refused or kept ones go on here. A connection whose send
//! does not complete within [`QUIET_WITHIN`] (a peer not reading) goes on
//! here and is tried again in a later batch, at most [`MAX_TRIES`] times.
//!
//! New process: a batch is imported (sockets into the file table, the
//! connection into the table, its backend held, its drain scheduled) but
//! started only once the old process let it go.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};

use super::{Entry, Worker, worker_name};
use crate::l7::config::Config;
use crate::l7::conn::{Conn, NotMovable, Settings, Side, Snapshot};
use crate::l7::handoff::mailbox::{Arriving, FromWorker, Leaving, Outgoing, ToWorker, Verdict};
use crate::l7::op::{ConnId, Op};
use crate::l7::timers;

/// How long a quiet connection may keep a send in flight before it goes
/// on here (its peer does not read) and waits for a later batch.
const QUIET_WITHIN: Duration = Duration::from_secs(1);

/// Batches a connection is tried in before it stays.
const MAX_TRIES: u8 = 3;

/// The old process's handoff on this worker.
pub(super) struct Giving {
    batch: usize,
    epoch: u64,
    /// Quiesced, on their way into the next batch.
    quiet: Vec<Quiet>,
    /// The batch sent, until its verdict.
    sent: Vec<ConnId>,
    /// Tries per connection that went on here; [`MAX_TRIES`]: it stays.
    tries: HashMap<ConnId, u8>,
    /// What this worker last told the daemon about having nothing more.
    idle: Option<bool>,
    /// When an idle worker looks for connections to hand over again.
    rescan_at: Instant,
}

impl Giving {
    /// Connection `id` went on here after `n` more tries ([`MAX_TRIES`]:
    /// it stays).
    fn tried(&mut self, id: ConnId, n: u8) {
        let t = self.tries.entry(id).or_insert(0);
        *t = t.saturating_add(n).min(MAX_TRIES);
    }
}

struct Quiet {
    id: ConnId,
    since: Instant,
    installing: bool,
    client: Option<OwnedFd>,
    backend: Option<OwnedFd>,
    /// An install failed: it cannot move.
    failed: bool,
}

/// The new process's imports waiting for their start, by batch.
#[derive(Default)]
pub(super) struct Arrivals {
    waiting: HashMap<u64, Vec<ConnId>>,
    /// Configurations of imported connections, by their settings: most
    /// share one, and a copy each would cost a `Config` per connection.
    configs: Vec<(Settings, Arc<Config>)>,
}

impl Worker {
    /// Arms the read of the eventfd the daemon thread wakes this worker
    /// through.
    pub(super) fn arm_wake(&mut self) {
        let fd = types::Fd(self.mailbox.wake_fd(self.index).as_raw_fd());
        let read = opcode::Read::new(fd, self.wake_buf.as_mut_ptr(), 8).build();
        self.submit(Op::Wake, read);
    }

    /// Carries out what the daemon thread sent, then moves the handoff on.
    pub(super) fn handoff_turn(&mut self) {
        for message in self.mailbox.take(self.index) {
            match message {
                ToWorker::Give { batch, epoch } => {
                    if self.giving.is_none() {
                        self.giving = Some(Giving {
                            batch: batch.max(1),
                            epoch,
                            quiet: Vec::new(),
                            sent: Vec::new(),
                            tries: HashMap::new(),
                            idle: None,
                            rescan_at: self.now,
                        });
                    }
                }
                ToWorker::Verdict(verdict) => self.verdict(verdict),
                ToWorker::StopGiving => self.stop_giving(),
                ToWorker::Import { batch, conns } => self.import_batch(batch, conns),
                ToWorker::Start { batch } => {
                    for id in self.arrivals.waiting.remove(&batch).unwrap_or_default() {
                        if self.live(id).is_some() {
                            self.drive(id.idx);
                        }
                    }
                }
            }
        }
        if self.giving.is_some() {
            self.give();
        }
    }

    /// One step of handing over: the verdict awaited, or the quiet batch
    /// made ready and sent, or the next batch quiesced. With nothing to
    /// hand over now, the connections are looked at again once per tick,
    /// not on every completion.
    fn give(&mut self) {
        let g = self.giving.as_mut().expect("giving");
        if !g.sent.is_empty() {
            return;
        }
        if g.quiet.is_empty() {
            // A look that found nothing is not repeated before the next
            // tick: a handshake may take seconds to relay.
            if self.now < g.rescan_at {
                return;
            }
            self.quiesce_next();
            let now = self.now;
            let g = self.giving.as_ref().expect("giving");
            // Idle: nothing left to try, and no handshake that may yet
            // become a relaying connection.
            let idle =
                g.quiet.is_empty() && !self.conns.iter().flatten().any(|e| e.conn.is_handshaking());
            let g = self.giving.as_mut().expect("giving");
            if g.quiet.is_empty() {
                g.rescan_at = now + super::TICK;
            }
            if g.idle != Some(idle) {
                g.idle = Some(idle);
                let (worker, epoch) = (self.index, g.epoch);
                self.mailbox.report(FromWorker::Idle {
                    worker,
                    idle,
                    epoch,
                });
            }
        }
        self.settle_quiet();
        let g = self.giving.as_ref().expect("giving");
        let ready = !g.quiet.is_empty()
            && g.quiet
                .iter()
                .all(|q| q.client.is_some() && q.backend.is_some());
        if ready {
            self.send_batch();
        }
    }

    /// Up to `n` relaying connections not tried too often.
    fn candidates(&self, n: usize) -> Vec<ConnId> {
        let Some(g) = self.giving.as_ref() else {
            return Vec::new();
        };
        self.conns
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let e = e.as_ref()?;
                let id = ConnId {
                    idx: i as u32,
                    generation: e.generation,
                };
                let tried = g.tries.get(&id).copied().unwrap_or(0);
                (e.conn.is_relaying() && tried < MAX_TRIES).then_some(id)
            })
            .take(n)
            .collect()
    }

    /// Quiesces the next batch.
    fn quiesce_next(&mut self) {
        let picked = self.candidates(self.giving.as_ref().expect("giving").batch);
        let now = self.now;
        for id in &picked {
            self.with_conn(id.idx, |conn, _, _| conn.quiesce());
            self.drive(id.idx);
        }
        let g = self.giving.as_mut().expect("giving");
        g.quiet = picked
            .into_iter()
            .map(|id| Quiet {
                id,
                since: now,
                installing: false,
                client: None,
                backend: None,
                failed: false,
            })
            .collect();
    }

    /// Drops from the quiet set what cannot move (it goes on here) and
    /// installs the sockets of what can.
    fn settle_quiet(&mut self) {
        let mut quiet = std::mem::take(&mut self.giving.as_mut().expect("giving").quiet);
        let mut resume = Vec::new();
        let mut tried = Vec::new();
        let mut installs = Vec::new();
        quiet.retain_mut(|q| {
            let Some(e) = super::live_in(&mut self.conns, q.id) else {
                return false;
            };
            if q.failed {
                resume.push(q.id);
                tried.push((q.id, MAX_TRIES));
                return false;
            }
            match e.conn.movable() {
                Ok(()) => {
                    if !q.installing {
                        q.installing = true;
                        match (e.client, e.backend) {
                            (Some(c), Some(b)) => {
                                installs.push((q.id, Side::Client, c));
                                installs.push((q.id, Side::Backend, b));
                            }
                            // A side already closed: it ends here.
                            _ => q.failed = true,
                        }
                    }
                    true
                }
                Err(NotMovable::Receiving(_) | NotMovable::Sending(_))
                    if self.now.saturating_duration_since(q.since) < QUIET_WITHIN =>
                {
                    true
                }
                Err(NotMovable::Receiving(_) | NotMovable::Sending(_)) => {
                    resume.push(q.id);
                    tried.push((q.id, 1));
                    false
                }
                // Closing, aborted, over the bounds: it ends here.
                Err(_) => {
                    resume.push(q.id);
                    tried.push((q.id, MAX_TRIES));
                    false
                }
            }
        });
        let g = self.giving.as_mut().expect("giving");
        g.quiet = quiet;
        for (id, n) in tried {
            g.tried(id, n);
        }
        for (conn, side, slot) in installs {
            let install = opcode::FixedFdInstall::new(types::Fixed(slot), 0).build();
            self.submit(Op::Install { conn, side }, install);
        }
        for id in resume {
            self.resume(id);
        }
    }

    /// An install completed: the descriptor joins its quiet connection, or
    /// closes if that one went on here meanwhile.
    pub(super) fn installed(&mut self, id: ConnId, side: Side, result: std::io::Result<u32>) {
        let fd = match result {
            // SAFETY: the kernel just installed this descriptor for us.
            Ok(fd) => Some(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
            Err(e) => {
                if !self.install_failed_logged {
                    self.install_failed_logged = true;
                    tracing::warn!(
                        event = "handoff_install_failed",
                        worker = %worker_name(),
                        "cannot install a socket for the handoff ({e}; io_uring's \
                         FIXED_FD_INSTALL needs Linux 6.8): such connections stay in this \
                         process until they end or timeouts.takeover"
                    );
                }
                None
            }
        };
        let Some(q) = self
            .giving
            .as_mut()
            .and_then(|g| g.quiet.iter_mut().find(|q| q.id == id))
        else {
            return;
        };
        match (fd, side) {
            (Some(fd), Side::Client) => q.client = Some(fd),
            (Some(fd), Side::Backend) => q.backend = Some(fd),
            (None, _) => q.failed = true,
        }
    }

    /// Exports the quiet batch and sends it to the daemon thread.
    fn send_batch(&mut self) {
        let quiet = std::mem::take(&mut self.giving.as_mut().expect("giving").quiet);
        let now = self.now;
        let now_ms = self.start.elapsed().as_millis() as u64;
        let ids: std::collections::HashSet<(u32, u32)> =
            quiet.iter().map(|q| (q.id.idx, q.id.generation)).collect();
        let drains: HashMap<(u32, u32), u64> = self
            .drains
            .iter()
            .filter(|(_, k)| ids.contains(k))
            .map(|(due, k)| (*k, due))
            .collect();
        let quiet_since = quiet.iter().map(|q| q.since).min().unwrap_or(now);
        let mut conns = Vec::new();
        let mut resume = Vec::new();
        for q in quiet {
            let e = self.conns[q.id.idx as usize]
                .as_ref()
                .expect("quiet and live");
            let bufs = &self.bufs;
            match e
                .conn
                .export(now, &e.config, |bid, len| bufs.buffer(bid, len))
            {
                Ok(mut snapshot) => {
                    snapshot.drain_in = drains
                        .get(&(q.id.idx, q.id.generation))
                        .map(|due| Duration::from_millis(due.saturating_sub(now_ms)));
                    conns.push(Leaving {
                        id: q.id,
                        snapshot,
                        client: q.client.expect("ready"),
                        backend: q.backend.expect("ready"),
                    });
                }
                Err(_) => resume.push(q.id),
            }
        }
        let g = self.giving.as_mut().expect("giving");
        // It changed since it was found movable (it is closing now): it
        // ends here, and is not tried again.
        for id in &resume {
            g.tried(*id, MAX_TRIES);
        }
        g.sent = conns.iter().map(|l| l.id).collect();
        for id in resume {
            self.resume(id);
        }
        let g = self.giving.as_mut().expect("giving");
        if conns.is_empty() {
            return;
        }
        let epoch = g.epoch;
        self.mailbox.report(FromWorker::Batch(Outgoing {
            worker: self.index,
            epoch,
            conns,
            quiet_since,
        }));
    }

    fn verdict(&mut self, verdict: Verdict) {
        let Some(g) = self.giving.as_mut() else {
            return;
        };
        let sent = std::mem::take(&mut g.sent);
        let refused = match verdict {
            Verdict::Taken { refused } => refused,
            Verdict::Kept => (0..sent.len() as u32).collect(),
        };
        for (i, id) in sent.iter().enumerate() {
            if refused.contains(&(i as u32)) {
                g.tried(*id, MAX_TRIES);
            }
        }
        for (i, id) in sent.into_iter().enumerate() {
            if refused.contains(&(i as u32)) {
                self.resume(id);
            } else {
                self.let_go(id);
            }
        }
    }

    fn stop_giving(&mut self) {
        let Some(g) = self.giving.take() else {
            return;
        };
        for id in g.quiet.into_iter().map(|q| q.id).chain(g.sent) {
            self.resume(id);
        }
    }

    /// A quiet connection goes on here.
    fn resume(&mut self, id: ConnId) {
        if self.live(id).is_some() {
            self.with_conn(id.idx, |conn, _, _| conn.resume());
            self.drive(id.idx);
        }
    }

    /// The new process runs connection `id` now: this one lets it go,
    /// closing its copies of the sockets.
    fn let_go(&mut self, id: ConnId) {
        if self.live(id).is_none() {
            return;
        }
        let e = self.conns[id.idx as usize].take().expect("live");
        let Entry {
            conn,
            over_limit,
            in_drain,
            client,
            backend,
            ..
        } = e;
        let peer = conn.backend();
        conn.handed_over(&mut self.out);
        for bid in self.out.recycle.drain(..) {
            self.bufs.recycle(bid);
        }
        if !over_limit {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(b) = peer {
            self.upstream.release(b.id);
            self.metrics.disconnected(b.addr);
            if in_drain {
                self.drain_progress(b.id);
            }
        }
        for slot in [client, backend].into_iter().flatten() {
            self.close_slot(slot);
        }
        self.free.push(id.idx);
    }

    /// Imports a batch's share of this worker; reports what it refused.
    fn import_batch(&mut self, batch: u64, conns: Vec<Arriving>) {
        let mut refused = Vec::new();
        let mut ids = Vec::new();
        for a in conns {
            match self.import(a.snapshot, a.client, a.backend) {
                Ok(id) => ids.push(id),
                Err(reason) => {
                    if let Some(suppressed) = self.chatter.out_of_slots.admit(self.now) {
                        tracing::warn!(
                            event = "handoff_refused",
                            worker = %worker_name(),
                            suppressed,
                            "refused a connection handed over: {reason}; it stays in the old \
                             process"
                        );
                    }
                    refused.push(a.index);
                }
            }
        }
        self.arrivals.waiting.insert(batch, ids);
        self.mailbox.report(FromWorker::Imported {
            worker: self.index,
            batch,
            refused,
        });
    }

    /// One connection into this worker, not started.
    fn import(
        &mut self,
        snapshot: Snapshot,
        client: OwnedFd,
        backend: OwnedFd,
    ) -> Result<ConnId, String> {
        if !self.accepting {
            return Err("this weir run is stopping".into());
        }
        let drain_in = snapshot.drain_in;
        let settings = snapshot.settings;
        let conn = Conn::import(snapshot, self.now).map_err(|e| e.to_string())?;
        let (Some(service), Some(peer)) = (conn.service(), conn.backend()) else {
            return Err("a relaying connection without its backend".into());
        };
        let mut slots = Vec::new();
        for fd in [&client, &backend] {
            let Some(slot) = self.slots.take() else {
                for s in slots {
                    self.slots.give(s);
                }
                return Err(format!(
                    "this worker's io_uring file table ({} slots) is full",
                    self.table
                ));
            };
            if let Err(e) = self
                .ring
                .submitter()
                .register_files_update(slot, &[fd.as_raw_fd()])
            {
                // What was registered closes with its slot.
                for s in slots {
                    self.close_slot(s);
                }
                self.slots.give(slot);
                return Err(format!("registering its socket: {e}"));
            }
            slots.push(slot);
        }
        // The table holds the sockets now; these copies close.
        drop((client, backend));
        let config = self.imported_config(settings);
        let ConnId { idx, generation } = self.vacant();
        self.open.fetch_add(1, Ordering::Relaxed);
        self.conns[idx as usize] = Some(Entry {
            conn,
            generation,
            config,
            listener: 0,
            client: Some(slots[0]),
            backend: Some(slots[1]),
            connect_to: None,
            inflight: 0,
            over_limit: false,
            in_drain: drain_in.is_some(),
            socket_failed: false,
            timer: timers::UNFILED,
        });
        self.upstream.hold(peer.id);
        self.metrics.connected(peer.addr);
        self.metric_backends.insert(peer.addr, peer.id);
        if let Some(d) = drain_in {
            let now_ms = self.start.elapsed().as_millis() as u64;
            self.drains.schedule_at(
                now_ms.saturating_add(d.as_millis() as u64),
                (idx, generation),
            );
            let window = super::drain_window(&self.config, Some(service));
            self.drain_joined(peer.id, peer.addr, window);
        }
        Ok(ConnId { idx, generation })
    }

    /// The configuration an imported connection runs with: this process's
    /// with the settings it was accepted with.
    fn imported_config(&mut self, settings: Settings) -> Arc<Config> {
        let configs = &mut self.arrivals.configs;
        if let Some((_, c)) = configs.iter().find(|(s, _)| *s == settings) {
            return c.clone();
        }
        if configs.len() >= 16 {
            configs.clear();
        }
        let config = Arc::new(settings.apply(&self.config));
        configs.push((settings, config.clone()));
        config
    }
}
