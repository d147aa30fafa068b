//! One L7 worker: a thread with its own io_uring, its own SO_REUSEPORT
//! listeners and its own connections. It only moves bytes: every decision
//! about a connection is its [`Conn`]'s (a sans-IO state machine), backend
//! choice is [`Upstream`]'s, and the operations and their completions are
//! [`Op`]s. This is the driver: it accepts, turns completions into the
//! connection's events, carries out what the connection asks for, and ticks.
//!
//! A connection is freed only after every operation it started has
//! completed, so the kernel never touches freed memory.
//!
//! A reload ([`Reconfig`]) is applied between completions: listeners are
//! added or stop accepting, and new connections take the new
//! configuration. A connection keeps the configuration it was accepted
//! with (its timeouts, limits and routes) for its whole life; what the
//! worker decides for many connections at once (drain windows, which
//! backends drain, the shutdown window) follows the latest one.

mod handoff;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, squeue, types};
use socket2::SockAddr;

use super::bufring::BufRing;
use super::config::Config;
use super::conn::{Action, Conn, Cx, Event, Output, Received, Side, Transmit};
use super::drain::DrainQueue;
use super::ejections::Ejections;
use super::files::{Sizing, Slots};
use super::frame;
use super::handoff::mailbox::Mailbox;
use super::handshake::{Reject, reject};
use super::metrics::{CloseSeen, WorkerMetrics};
use super::op::{self, Completion, ConnId, Op};
use super::reconfig::{Reconfig, Update};
use super::socket;
use super::table::Table;
use super::timers::{self, Wheel};
use super::upstream::{Rng, Upstream};
use super::view::RegistryView;
use crate::logs::RateLimit;
use crate::registry::{Maps, ServiceAddr};

/// What a worker needs from the configuration.
#[derive(Clone)]
pub struct Settings {
    pub config: Config,
    /// The instance's pinned maps.
    pub instance_dir: std::path::PathBuf,
    /// Where the L7 counters are written for `weir stats`.
    pub state_dir: std::path::PathBuf,
}

/// A connection and what the driver holds for it.
struct Entry {
    conn: Conn,
    generation: u32,
    /// The configuration it was accepted with: it keeps it to the end.
    config: Arc<Config>,
    /// The listener it came in on, in `config` (which has a handful).
    listener: u16,
    /// The client socket's slot in the ring's registered-file table,
    /// until weir closes it.
    client: Option<u32>,
    /// The backend socket's slot, while it has one.
    backend: Option<u32>,
    /// The address a connect in flight points at: it must stay put until
    /// the connect completes.
    connect_to: Option<Box<SockAddr>>,
    /// Operations submitted and not completed yet.
    inflight: u16,
    /// Refused for `max_connections`: not counted in `open`.
    over_limit: bool,
    /// Counted in a drain of its backend ([`Worker::draining`]), so that
    /// its end counts there once.
    in_drain: bool,
    /// The backend socket's creation or its option failed (the connect
    /// linked after them then completes cancelled).
    socket_failed: bool,
    /// The tick it is filed under in the timer wheel, or UNFILED.
    timer: u32,
}

impl Entry {
    /// The slot of one side's socket, while it has one.
    fn slot(&self, side: Side) -> Option<u32> {
        match side {
            Side::Client => self.client,
            Side::Backend => self.backend,
        }
    }
}

/// Pieces one send may gather.
const MAX_GATHER: usize = 8;

/// The header and iovec of a gathering send in flight.
struct Gather {
    msg: libc::msghdr,
    iov: [libc::iovec; MAX_GATHER],
}

impl Gather {
    fn boxed() -> Box<Self> {
        // SAFETY: all zeroes is a valid msghdr and iovec.
        Box::new(unsafe { std::mem::zeroed() })
    }
}

/// One accept kept armed on a listener, into a slot of the table; the
/// kernel writes the client's address here.
struct Accept {
    /// The slot its client lands in, while armed.
    slot: Option<u32>,
    /// Failed for a reason that would fail again at once: the tick re-arms.
    paused: bool,
    addr: libc::sockaddr_storage,
    len: libc::socklen_t,
}

/// A listening socket of this worker's and the accepts armed on it.
struct Listening {
    fd: OwnedFd,
    /// Its configured address, which a reload compares.
    listen: SocketAddr,
    /// Its place in the worker's current configuration.
    index: u16,
    /// A reload took it out: it accepts nothing more, and goes once its
    /// accepts have completed.
    removed: bool,
    /// Ticks in a row it had a client queued while accepts were armed on
    /// it ([`Worker::kick_stalled_accepts`]).
    stalled_ticks: u8,
    /// Never resized: the kernel writes into its elements.
    accepts: Box<[Accept]>,
}

impl Listening {
    fn new(fd: OwnedFd, listen: SocketAddr, index: u16, accepts: u32) -> Self {
        let accepts = (0..accepts)
            .map(|_| Accept {
                slot: None,
                paused: false,
                // SAFETY: all zeroes is a valid (empty) sockaddr_storage.
                addr: unsafe { std::mem::zeroed() },
                len: 0,
            })
            .collect();
        Self {
            fd,
            listen,
            index,
            removed: false,
            stalled_ticks: 0,
            accepts,
        }
    }
}

/// What a worker shares with the process: the stop flag, the connection
/// count, the outlier table and the reloads.
#[derive(Clone)]
pub struct Shared {
    pub stop: Arc<AtomicBool>,
    /// Connections across all workers, for `max_connections`.
    pub open: Arc<AtomicUsize>,
    pub outliers: Arc<Ejections>,
    pub reconfig: Arc<Reconfig>,
    /// Set once a `weir run --takeover` accepts on this process's
    /// listening sockets: the workers stop accepting without shutting
    /// them (they are the new process's now) and serve what they hold.
    pub handed_over: Arc<AtomicBool>,
    /// Set once a takeover's handoff is over: a worker holding nothing
    /// may end.
    pub released: Arc<AtomicBool>,
    /// Connections handed over to or from another process.
    pub mailbox: Arc<Mailbox>,
}

pub struct Worker {
    // Field order: the ring goes first, then the buffers and accepts it
    // writes into.
    ring: IoUring,
    bufs: BufRing,
    /// By the number in their accepts' operations; a slot is reused once
    /// its listener is gone.
    listeners: Vec<Option<Listening>>,
    /// Accepts armed per listener.
    per_listener: u32,
    conns: Table<Entry>,
    free: Vec<u32>,
    next_generation: u32,
    upstream: Upstream,
    drains: DrainQueue<(u32, u32)>,
    /// The latest configuration: new connections take it.
    config: Arc<Config>,
    /// Its reload generation, and this worker's place among the workers.
    config_generation: u64,
    index: usize,
    reconfig: Arc<Reconfig>,
    tick: Box<types::Timespec>,
    /// When connections next need their timeout handled.
    wheel: Wheel,
    /// What the wheel handed out on this tick (kept for its storage).
    due: Vec<(timers::Key, u32)>,
    /// Ticks since the drain gauge was last counted.
    gauge_ticks: u32,
    start: Instant,
    /// When the completions being handled were reaped.
    now: Instant,
    rng: Rng,
    stop: Arc<AtomicBool>,
    accepting: bool,
    /// [`Shared::handed_over`], and whether this worker has acted on it.
    handing_over: Arc<AtomicBool>,
    handed_over: bool,
    metrics: Arc<WorkerMetrics>,
    /// Free slots of the registered-file table.
    slots: Slots,
    /// Its size.
    table: u32,
    /// After SIGTERM: what is still open at this point is cut.
    shutdown_deadline: Option<Instant>,
    /// Connections across all workers, for `max_connections`.
    open: Arc<AtomicUsize>,
    /// The buffer pool's memory can be given back only when the kernel
    /// fills buffers inside our own `io_uring_enter` (DEFER_TASKRUN).
    pool: PoolRelease,
    /// Backends with a metrics series in this worker, by address, with
    /// the registry id they had when last connected to.
    metric_backends: HashMap<SocketAddr, u32>,
    /// What connections report, emptied after every call into one.
    out: Output,
    /// Gathering sends in flight, by connection slot and side; they
    /// point into their box until they complete.
    gathers: HashMap<u64, Box<Gather>>,
    /// Boxes of sends that completed, for the next ones: the boxes move
    /// between here and `gathers`, and a send in flight points into its
    /// own, so each stays one allocation.
    #[allow(clippy::vec_box)]
    spare_gathers: Vec<Box<Gather>>,
    /// Log lines that happen per connection, rate-limited.
    chatter: Chatter,
    /// Drains of stopped backends in progress on this worker, by backend
    /// id: logged when they start and when their last connection is gone.
    draining: HashMap<u32, DrainLog>,
    /// The completions of the batch being handled (kept for its capacity).
    reaped: Vec<(u64, i32, u32)>,
    mailbox: Arc<Mailbox>,
    /// [`Shared::released`].
    released: Arc<AtomicBool>,
    /// Where the kernel writes the eventfd's counter the wake read takes.
    wake_buf: Box<[u8; 8]>,
    /// Handing connections over to a new process.
    giving: Option<handoff::Giving>,
    /// Connections taken over from an old process, until started.
    arrivals: handoff::Arrivals,
    install_failed_logged: bool,
}

/// Rate limits of the per-connection log lines: a few per window each,
/// then a count of what was left out.
struct Chatter {
    backend_failed: RateLimit,
    over_limit: RateLimit,
    out_of_slots: RateLimit,
    /// Debug level: handshakes refused, WebSockets weir closes.
    refused: RateLimit,
    closing: RateLimit,
}

impl Default for Chatter {
    fn default() -> Self {
        let limit = || RateLimit::new(5, Duration::from_secs(10));
        Self {
            backend_failed: limit(),
            over_limit: limit(),
            out_of_slots: limit(),
            refused: limit(),
            closing: limit(),
        }
    }
}

/// A drain of one backend's connections on this worker.
struct DrainLog {
    addr: SocketAddr,
    started: Instant,
    /// Connections it covered.
    total: u32,
    /// Of those, still open.
    open: u32,
}

/// When to give the buffer pool's memory back: after it was quiet (no
/// buffer taken) for [`POOL_QUIET_TICKS`] ticks, once per quiet spell.
#[derive(Default)]
struct PoolRelease {
    enabled: bool,
    /// `taken_total` at the last tick.
    seen: u64,
    /// Ticks without a buffer taken; counted only while enabled.
    quiet_ticks: u32,
    /// Released (or given up on) during this quiet spell.
    released: bool,
}

impl PoolRelease {
    /// Release after the current batch of completions.
    fn due(&self) -> bool {
        !self.released && self.quiet_ticks >= POOL_QUIET_TICKS
    }
}

/// One second of 50 ms ticks.
const SECOND_TICKS: u32 = 20;

/// The pool is given back after a quiet second.
const POOL_QUIET_TICKS: u32 = SECOND_TICKS;

/// How often the worker wakes for timeouts, drains and the registry.
const TICK: Duration = Duration::from_millis(50);

/// The timer wheel's horizon: 1024 ticks, 51.2 s. Idle timeouts further
/// away are looked at once per horizon.
const WHEEL_TICKS: usize = 1024;

impl Worker {
    /// Sets up the ring (SINGLE_ISSUER and DEFER_TASKRUN where the kernel
    /// has them), the buffers, the listeners and the registry view.
    /// `index` is its place among the process's workers.
    pub fn new(
        settings: &Settings,
        sizing: Sizing,
        listener_fds: Vec<(usize, OwnedFd)>,
        metrics: Arc<WorkerMetrics>,
        shared: Shared,
        index: usize,
    ) -> io::Result<Self> {
        let Shared {
            stop,
            open,
            outliers,
            reconfig,
            handed_over: handing_over,
            released,
            mailbox,
        } = shared;
        let config = Arc::new(settings.config.clone());
        let entries = 4096;
        let deferred = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries);
        let defer_taskrun = deferred.is_ok();
        let mut ring = deferred
            .or_else(|_| IoUring::builder().setup_coop_taskrun().build(entries))
            .or_else(|_| IoUring::new(entries))
            .map_err(|e| io::Error::new(e.kind(), format!("io_uring is not available: {e}")))?;
        let bufs = BufRing::new(&ring, 0, config.buffers, config.buffer_size)?;
        let table = sizing.slots;
        ring.submitter().register_files_sparse(table).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("registering a table of {table} direct descriptors: {e}"),
            )
        })?;
        socket::check_ring_sockets(&mut ring, table - 1)?;
        let per_listener = sizing.accepts_per_listener;
        let listeners = listener_fds
            .into_iter()
            .map(|(i, fd)| {
                let listen = config.listeners[i].listen;
                Some(Listening::new(fd, listen, i as u16, per_listener))
            })
            .collect();
        let maps = Maps::open(&settings.instance_dir).map_err(io::Error::other)?;
        let drain_unhealthy = settings.config.drain_unhealthy.iter().copied().collect();
        let view = RegistryView::open(maps, drain_unhealthy).map_err(io::Error::other)?;
        let rng = Rng::from_os()?;
        Ok(Self {
            ring,
            bufs,
            listeners,
            per_listener,
            conns: Table::default(),
            free: Vec::new(),
            next_generation: 1,
            upstream: Upstream::new(view, outliers),
            drains: DrainQueue::new(),
            tick: Box::new(types::Timespec::from(TICK)),
            wheel: Wheel::new(Instant::now(), TICK, WHEEL_TICKS),
            due: Vec::new(),
            gauge_ticks: 0,
            start: Instant::now(),
            now: Instant::now(),
            rng,
            config,
            config_generation: 0,
            index,
            reconfig,
            stop,
            accepting: true,
            handing_over,
            handed_over: false,
            metrics,
            slots: Slots::new(table),
            table,
            shutdown_deadline: None,
            open,
            pool: PoolRelease {
                enabled: defer_taskrun,
                ..PoolRelease::default()
            },
            metric_backends: HashMap::new(),
            out: Output::default(),
            gathers: HashMap::new(),
            spare_gathers: Vec::new(),
            chatter: Chatter::default(),
            draining: HashMap::new(),
            reaped: Vec::new(),
            mailbox,
            released,
            wake_buf: Box::new([0; 8]),
            giving: None,
            arrivals: handoff::Arrivals::default(),
            install_failed_logged: false,
        })
    }

    /// Runs until the stop flag is set and every connection is gone.
    pub fn run(&mut self) -> io::Result<()> {
        self.arm_accepts();
        self.arm_tick();
        self.arm_wake();
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                // Interrupted, or the completion queue is full: reap, retry.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                    ) => {}
                Err(e) => return Err(e),
            }
            // Copied out so that handling one may submit more; the vector
            // is kept across batches, not allocated per wake-up.
            let mut reaped = std::mem::take(&mut self.reaped);
            reaped.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            // One clock read per batch: connections see the time their
            // completions were reaped.
            self.now = Instant::now();
            for (user_data, res, flags) in reaped.drain(..) {
                self.complete(user_data, res, flags);
            }
            self.reaped = reaped;
            // Only here: every completion the kernel posted is accounted
            // for, so `in_use` is exact.
            if self.pool.due() && self.ring.completion().is_empty() {
                match self.bufs.release_memory() {
                    Ok(true) => {
                        self.pool.released = true;
                        self.metrics.pool_releases.fetch_add(1, Ordering::Relaxed);
                    }
                    // A buffer is still out (a send waits): try again later.
                    Ok(false) => {}
                    // Not again this quiet spell.
                    Err(_) => self.pool.released = true,
                }
            }
            if self.reconfig.published() != self.config_generation {
                self.reload();
            }
            if !self.handed_over && self.handing_over.load(Ordering::Relaxed) {
                self.hand_over();
            }
            self.handoff_turn();
            // Handed over, it waits for the handoff's end (until then it may
            // have to accept again) and for its cancelled accepts (their
            // completions write into the listeners' storage).
            let done = !self.accepting
                || (self.handed_over
                    && self.released.load(Ordering::Relaxed)
                    && self.listeners.iter().all(Option::is_none));
            if done && self.conns.iter().all(Option::is_none) {
                return Ok(());
            }
        }
    }

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every pointer an entry carries lives in an Entry, an
            // Accept, a Gather, the buffer ring or `self.tick`, all kept
            // until its completion.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            let _ = self.ring.submit();
        }
    }

    /// Submits linked operations together: a chain cut by a full queue
    /// would be submitted in two parts, and the kernel ends a link at the
    /// end of a submission.
    fn submit_chain(&mut self, chain: [(Op, squeue::Entry); 3]) {
        let entries = chain.map(|(op, entry)| {
            self.count_in_flight(op);
            entry.user_data(op.user_data())
        });
        loop {
            // SAFETY: as in `push`.
            if unsafe { self.ring.submission().push_multiple(&entries) }.is_ok() {
                return;
            }
            let _ = self.ring.submit();
        }
    }

    /// Submits `op`.
    fn submit(&mut self, op: Op, entry: squeue::Entry) {
        self.count_in_flight(op);
        self.push(entry.user_data(op.user_data()));
    }

    /// The one place that counts a connection's operations in flight, for
    /// every submission (the other is where a completion ends one, in
    /// [`Worker::complete`]).
    fn count_in_flight(&mut self, op: Op) {
        if op.holds_conn()
            && let Some(id) = op.conn()
        {
            self.entry(id.idx).inflight += 1;
        }
    }

    /// A one-shot timeout, re-armed on every tick (multishot timeouts need
    /// kernel 6.4 and end silently when the completion queue overflows).
    fn arm_tick(&mut self) {
        let tick = opcode::Timeout::new(&*self.tick as *const types::Timespec).build();
        self.submit(Op::Tick, tick);
    }

    /// Arms every accept that is not armed, paused or waiting for a slot,
    /// while slots last: run after anything that frees a slot, so that a
    /// full table still accepts (and refuses with 503) rather than leave
    /// clients waiting in the listen queue.
    fn arm_accepts(&mut self) {
        if !self.accepting {
            return;
        }
        for l in 0..self.listeners.len() {
            for i in 0..self.per_listener as usize {
                let Some(listening) = self.listeners[l].as_mut().filter(|l| !l.removed) else {
                    break;
                };
                let a = &mut listening.accepts[i];
                if a.slot.is_some() || a.paused {
                    continue;
                }
                let Some(slot) = self.slots.take() else {
                    return;
                };
                a.slot = Some(slot);
                a.len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                let dest =
                    types::DestinationSlot::try_from_slot_target(slot).expect("slot in range");
                let fd = types::Fd(listening.fd.as_raw_fd());
                let entry = opcode::Accept::new(fd, (&raw mut a.addr).cast(), &raw mut a.len)
                    .file_index(Some(dest))
                    .build();
                let accept = l as u32 * self.per_listener + i as u32;
                self.submit(Op::Accept { accept }, entry);
            }
        }
    }

    /// Closes the descriptor in `slot`; the slot is free once that
    /// completes.
    fn close_slot(&mut self, slot: u32) {
        self.submit(
            Op::Close { slot },
            opcode::Close::new(types::Fixed(slot)).build(),
        );
    }

    fn complete(&mut self, user_data: u64, res: i32, flags: u32) {
        let Some(c) = Completion::new(user_data, res, flags) else {
            return;
        };
        let id = match c.op {
            Op::Accept { accept } => return self.on_accept(accept, c),
            Op::Tick => {
                self.arm_tick();
                return self.on_tick();
            }
            Op::Close { slot } => {
                self.slots.give(slot);
                return self.arm_accepts();
            }
            Op::Cancel { .. } => return,
            Op::Wake => return self.arm_wake(),
            // Posted only on failure, before the connect's own completion.
            Op::Socket { conn } | Op::NoDelay { conn } => {
                if let Some(e) = self.live(conn) {
                    e.socket_failed = true;
                    // The option after a socket that failed is cancelled:
                    // one failure, counted once.
                    let error = c.result.err();
                    if error.as_ref().and_then(io::Error::raw_os_error) != Some(libc::ECANCELED) {
                        self.count_socket_failure(error);
                    }
                }
                return;
            }
            Op::SendMsg { conn, side } => {
                // Its iovec is free again, whatever became of its connection.
                if let Some(g) = self.gathers.remove(&gather_key(conn.idx, side)) {
                    self.spare_gathers.push(g);
                }
                conn
            }
            Op::Recv { conn, .. }
            | Op::Send { conn, .. }
            | Op::Connect { conn }
            | Op::Shutdown { conn, .. }
            | Op::Install { conn, .. } => conn,
        };
        // A receive that picked a buffer owns it, whatever happened to its
        // connection since.
        if c.buffer.is_some() {
            self.bufs.taken();
        }
        if self.live(id).is_none() {
            if let Some(bid) = c.buffer {
                self.bufs.recycle(bid);
            }
            if let (Op::Install { .. }, Ok(fd)) = (c.op, &c.result) {
                // SAFETY: installed for us; nobody else owns it.
                drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(*fd as i32) });
            }
            return;
        }
        if !c.more {
            self.entry(id.idx).inflight -= 1;
        }
        match c.op {
            Op::Recv { side, .. } => self.on_recv(id.idx, side, c),
            Op::Send { side, .. } | Op::SendMsg { side, .. } => {
                self.with_conn(id.idx, |conn, cx, _| conn.handle_sent(cx, side, c.result));
            }
            Op::Install { side, .. } => self.installed(id, side, c.result),
            Op::Connect { .. } => {
                let e = self.entry(id.idx);
                e.connect_to = None;
                if std::mem::take(&mut e.socket_failed) {
                    self.refuse(id.idx, reject(503, "cannot open a backend socket"));
                } else {
                    let connected = c.result.is_ok();
                    self.with_conn(id.idx, |conn, cx, _| conn.handle_connected(cx, connected));
                }
            }
            _ => {}
        }
        self.drive(id.idx);
    }

    /// A free slot of the connection table and the generation of the
    /// connection about to fill it.
    fn vacant(&mut self) -> ConnId {
        let idx = self
            .free
            .pop()
            .unwrap_or_else(|| self.conns.push_empty() as u32);
        let generation = self.next_generation;
        self.next_generation = ConnId::next_generation(generation);
        ConnId { idx, generation }
    }

    fn entry(&mut self, idx: u32) -> &mut Entry {
        self.conns[idx as usize].as_mut().expect("live connection")
    }

    /// The connection `id` names, if it is still the one in its slot.
    fn live(&mut self, id: ConnId) -> Option<&mut Entry> {
        live_in(&mut self.conns, id)
    }

    /// Calls into connection `idx` with the time, its routes and a fresh
    /// mask; what it reports lands in `self.out`.
    fn with_conn<R>(&mut self, idx: u32, f: impl FnOnce(&mut Conn, &mut Cx, &BufRing) -> R) -> R {
        let mask = self.rng.next_u32().to_ne_bytes();
        let e = self.conns[idx as usize].as_mut().expect("live connection");
        let mut cx = Cx {
            now: self.now,
            config: &e.config,
            routes: &e.config.listeners[usize::from(e.listener)],
            mask,
            out: &mut self.out,
        };
        f(&mut e.conn, &mut cx, &self.bufs)
    }

    fn on_accept(&mut self, accept: u32, c: Completion) {
        let l = (accept / self.per_listener) as usize;
        let listening = self.listeners[l]
            .as_mut()
            .expect("an armed accept's listener");
        let (removed, listener) = (listening.removed, listening.index);
        let a = &mut listening.accepts[(accept % self.per_listener) as usize];
        let slot = a.slot.take().expect("an armed accept holds its slot");
        let peer = socket::sockaddr(&a.addr, a.len);
        if removed && listening.accepts.iter().all(|a| a.slot.is_none()) {
            // Its last accept is back: the socket closes.
            self.listeners[l] = None;
        }
        if let Err(e) = c.result {
            // Nothing landed in the slot.
            self.slots.give(slot);
            // A client that gave up in the queue, or a signal: go on. Any
            // other failure would repeat at once: the tick re-arms.
            let transient = matches!(
                e.raw_os_error(),
                Some(libc::ECONNABORTED | libc::EINTR | libc::EAGAIN | libc::ECANCELED)
            );
            if let Some(listening) = self.listeners[l].as_mut() {
                listening.accepts[(accept % self.per_listener) as usize].paused =
                    !transient && self.accepting && !removed;
            }
            return self.arm_accepts();
        }
        self.metrics.accepted.fetch_add(1, Ordering::Relaxed);
        // A client the kernel queued before its listener was taken out has
        // no routes left to follow; one accepted while the listeners were
        // being handed over is served here.
        if !self.accepting || (removed && !self.handed_over) {
            return self.close_slot(slot);
        }
        // Re-armed before this client takes a slot for its backend.
        self.arm_accepts();
        self.refresh_view();
        let peer = peer.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let ConnId { idx, generation } = self.vacant();
        // Counted while open; one refused for the limit does not count.
        let over = self.open.fetch_add(1, Ordering::Relaxed) >= self.config.max_connections;
        if over {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
        self.conns[idx as usize] = Some(Entry {
            conn: Conn::new(self.now, &self.config, peer),
            generation,
            config: self.config.clone(),
            listener,
            client: Some(slot),
            backend: None,
            connect_to: None,
            inflight: 0,
            over_limit: over,
            in_drain: false,
            socket_failed: false,
            timer: timers::UNFILED,
        });
        if over {
            if let Some(suppressed) = self.chatter.over_limit.admit(self.now) {
                tracing::warn!(
                    event = "connection_limit",
                    worker = %worker_name(),
                    max_connections = self.config.max_connections,
                    suppressed,
                    "connection limit reached: new clients get 503 until connections close \
                     (counted in weir_l7_handshakes_total{{status=\"503\"}})"
                );
            }
            self.with_conn(idx, |conn, cx, _| {
                conn.handle_reject(cx, reject(503, "over the connection limit"))
            });
        }
        self.drive(idx);
    }

    fn on_recv(&mut self, idx: u32, side: Side, c: Completion) {
        let Completion {
            result,
            buffer,
            more,
            ..
        } = c;
        if result
            .as_ref()
            .is_err_and(|e| e.raw_os_error() == Some(libc::ENOBUFS))
        {
            self.metrics
                .buffer_exhausted
                .fetch_add(1, Ordering::Relaxed);
        }
        self.with_conn(idx, |conn, cx, bufs| {
            let received = match result {
                Ok(0) => Received::Eof,
                Ok(n) => {
                    let bid = buffer.expect("a receive with data names its buffer");
                    Received::Data {
                        bid,
                        bytes: bufs.buffer(bid, n as usize),
                    }
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::ENOBUFS) => Received::NoBuffers,
                    Some(libc::ECANCELED) => Received::Cancelled,
                    _ => Received::Reset,
                },
            };
            conn.handle_recv(cx, side, received, more)
        });
    }

    /// Carries out what connection `idx` asks for after an event: its
    /// reports, its orders, its sends; then frees it if it is done.
    fn drive(&mut self, idx: u32) {
        loop {
            self.take_output(idx);
            let e = self.entry(idx);
            let Some(action) = e.conn.poll_action() else {
                break;
            };
            let id = ConnId {
                idx,
                generation: e.generation,
            };
            match action {
                Action::Connect(service) => self.connect(idx, service),
                Action::CancelConnect => {
                    // By the connect's tag, not its socket slot.
                    let cancel = opcode::AsyncCancel::new(Op::Connect { conn: id }.user_data());
                    self.submit(Op::Cancel { conn: id }, cancel.build());
                }
                Action::Recv(side) => {
                    let slot = e.slot(side).expect("a socket to read");
                    let bgid = self.bufs.bgid();
                    self.submit(Op::Recv { conn: id, side }, op::recv(slot, bgid));
                }
                Action::CancelRecv(side) => {
                    let cancel = opcode::AsyncCancel::new(Op::Recv { conn: id, side }.user_data());
                    self.submit(Op::Cancel { conn: id }, cancel.build());
                }
                Action::Abort(side) => self.close_side(idx, side, true),
            }
        }
        self.transmit(idx, Side::Client);
        self.transmit(idx, Side::Backend);
        if !self.maybe_free(idx) {
            self.file_timer(idx);
        }
    }

    /// Files connection `idx` in the timer wheel if it needs its timeout
    /// handled sooner than where it is filed.
    fn file_timer(&mut self, idx: u32) {
        let e = self.conns[idx as usize].as_mut().expect("live connection");
        let Some(at) = e.conn.poll_timeout(&e.config) else {
            return;
        };
        if e.timer == timers::UNFILED || self.wheel.tick_for(at) < e.timer {
            e.timer = self.wheel.file((idx, e.generation), at);
        }
    }

    /// Starts the next send towards one side of `idx`, if it has one.
    fn transmit(&mut self, idx: u32, side: Side) {
        let e = self.conns[idx as usize].as_mut().expect("live connection");
        let Some(slot) = e.slot(side) else { return };
        let (ptr, len) = match e.conn.poll_transmit(side) {
            None => return,
            Some(Transmit::Buf { bid, start, len }) => {
                let buf = self.bufs.buffer(bid, (start + len) as usize);
                (buf[start as usize..].as_ptr(), len)
            }
            Some(Transmit::Bytes(bytes)) => (bytes.as_ptr(), bytes.len() as u32),
            // A connection done with both peers closes its sockets once its
            // operations in flight complete: the close sends the FIN, and a
            // shutdown (which io_uring always hands to a kernel thread) is
            // saved.
            Some(Transmit::Finish) => {
                if !e.conn.is_finished() {
                    self.shut_write(idx, side);
                }
                return;
            }
            Some(Transmit::Close) => return self.close_side(idx, side, false),
        };
        let conn = ConnId {
            idx,
            generation: e.generation,
        };
        // What is queued behind goes in the same send; a box for its iovec
        // is taken only then.
        let mut gather: Option<Box<Gather>> = None;
        let mut n = 1;
        let (bufs, spare) = (&self.bufs, &mut self.spare_gathers);
        e.conn.gather(side, MAX_GATHER - 1, |piece| {
            let bytes = match piece {
                Transmit::Buf { bid, start, len } => {
                    &bufs.buffer(bid, (start + len) as usize)[start as usize..]
                }
                Transmit::Bytes(bytes) => bytes,
                Transmit::Finish | Transmit::Close => unreachable!("only data is gathered"),
            };
            let g = gather.get_or_insert_with(|| {
                let mut g = spare.pop().unwrap_or_else(Gather::boxed);
                g.iov[0] = libc::iovec {
                    iov_base: ptr as *mut libc::c_void,
                    iov_len: len as usize,
                };
                g
            });
            g.iov[n] = libc::iovec {
                iov_base: bytes.as_ptr() as *mut libc::c_void,
                iov_len: bytes.len(),
            };
            n += 1;
        });
        let Some(mut g) = gather else {
            return self.submit(Op::Send { conn, side }, op::send(slot, ptr, len));
        };
        g.msg.msg_iov = g.iov.as_mut_ptr();
        g.msg.msg_iovlen = n;
        let entry = op::send_msg(slot, &raw const g.msg);
        self.gathers.insert(gather_key(idx, side), g);
        self.submit(Op::SendMsg { conn, side }, entry);
    }

    /// Closes one side's socket before the connection is done (nothing
    /// more read from it matters, or, `cut`, the connection is cut): its
    /// operations are cancelled (the receive; when cut, sends and the
    /// connect too), so that each completes and the close drops the last
    /// reference and sends the FIN now. A shutdown would do the same
    /// through a kernel thread. Cancels go by tag, which the kernel finds
    /// by hash; by descriptor it would scan every request in flight.
    fn close_side(&mut self, idx: u32, side: Side, cut: bool) {
        let e = self.entry(idx);
        let slot = match side {
            Side::Client => e.client.take(),
            Side::Backend => e.backend.take(),
        };
        let Some(slot) = slot else { return };
        let conn = ConnId {
            idx,
            generation: e.generation,
        };
        let ops = [
            Some(Op::Recv { conn, side }),
            cut.then_some(Op::Send { conn, side }),
            cut.then_some(Op::SendMsg { conn, side }),
            (cut && side == Side::Backend).then_some(Op::Connect { conn }),
        ];
        for op in ops.into_iter().flatten() {
            let cancel = opcode::AsyncCancel::new(op.user_data());
            self.submit(Op::Cancel { conn }, cancel.build());
        }
        self.close_slot(slot);
    }

    /// Shuts the write side of one side's socket: the FIN of a half-close
    /// or a refusal, where the peer may still send (through the ring; the
    /// operation counts as in flight, so the slot is not closed under it).
    fn shut_write(&mut self, idx: u32, side: Side) {
        let e = self.entry(idx);
        let Some(slot) = e.slot(side) else { return };
        let conn = ConnId {
            idx,
            generation: e.generation,
        };
        let shut = opcode::Shutdown::new(types::Fixed(slot), libc::SHUT_WR).build();
        self.submit(Op::Shutdown { conn, side }, shut);
    }

    /// Gives back the buffers connection `idx` let go of and turns what it
    /// reported into counters and resources freed: the one place where a
    /// connection's events surface.
    fn take_output(&mut self, idx: u32) {
        for bid in self.out.recycle.drain(..) {
            self.bufs.recycle(bid);
        }
        let mut events = std::mem::take(&mut self.out.events);
        for event in events.drain(..) {
            self.on_event(idx, event);
        }
        // The vector's storage is kept for the next call.
        self.out.events = events;
    }

    fn on_event(&mut self, idx: u32, event: Event) {
        let m = &self.metrics;
        match event {
            Event::Upgraded { backend } => {
                m.handshake(None);
                self.upstream.succeeded(backend);
                // The backend may have left while this connection was being
                // set up: it drains like the others.
                let active = self
                    .upstream
                    .view()
                    .backend(backend)
                    .is_some_and(|b| b.state == weir_ebpf::abi::BackendState::Active);
                if !active {
                    let e = self.entry(idx);
                    e.in_drain = true;
                    let (generation, service) = (e.generation, e.conn.service());
                    let addr = e.conn.backend().map(|b| b.addr);
                    let now_ms = self.start.elapsed().as_millis() as u64;
                    let window = drain_window(&self.config, service);
                    self.drains.schedule(
                        now_ms,
                        window.as_millis() as u64,
                        vec![(idx, generation)],
                    );
                    if let Some(addr) = addr {
                        self.drain_started(backend, addr, 1, window);
                    }
                }
            }
            Event::Rejected { status, reason } => {
                m.handshake(Some(status));
                if tracing::enabled!(tracing::Level::DEBUG)
                    && let Some(suppressed) = self.chatter.refused.admit(self.now)
                {
                    tracing::debug!(
                        event = "handshake_refused",
                        worker = %worker_name(),
                        status,
                        suppressed,
                        "refused a client with {status}: {reason}"
                    );
                }
            }
            Event::Connected { backend, addr } => {
                m.connected(addr);
                self.metric_backends.insert(addr, backend);
            }
            Event::ConnectFailed {
                backend,
                addr,
                timed_out,
            } => {
                let counter = if timed_out {
                    &m.backend_connect_timeouts
                } else {
                    &m.backend_connect_refused
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let connect = self.entry(idx).config.timeouts.connect;
                if let Some(suppressed) = self.chatter.backend_failed.admit(self.now) {
                    if timed_out {
                        tracing::warn!(
                            event = "backend_timeout",
                            worker = %worker_name(),
                            backend = %addr,
                            suppressed,
                            "backend {addr} did not accept the connection within {:?}; trying \
                             another (counted in weir_l7_backend_connect_failures_total)",
                            connect
                        );
                    } else {
                        tracing::warn!(
                            event = "backend_refused",
                            worker = %worker_name(),
                            backend = %addr,
                            suppressed,
                            "backend {addr} refused the connection; trying another (counted in \
                             weir_l7_backend_connect_failures_total)"
                        );
                    }
                }
                // Its socket closes (no other operation uses it).
                if let Some(slot) = self.entry(idx).backend.take() {
                    self.close_slot(slot);
                }
                self.upstream.release(backend);
                self.outlier_failure(idx, backend, addr);
            }
            Event::UpgradeFailed { backend } => {
                if let Some(b) = self.entry(idx).conn.backend() {
                    self.outlier_failure(idx, backend, b.addr);
                }
            }
            Event::Relayed {
                from,
                frames,
                bytes,
            } => {
                let (f, b) = match from {
                    Side::Client => (&m.frames_c2b, &m.bytes_c2b),
                    Side::Backend => (&m.frames_b2c, &m.bytes_b2c),
                };
                f.fetch_add(u64::from(frames), Ordering::Relaxed);
                b.fetch_add(bytes as u64, Ordering::Relaxed);
            }
            Event::CloseSeen { from, code } => match from {
                Side::Client => m.close(CloseSeen::FromClient, code),
                Side::Backend => m.close(CloseSeen::FromBackend, code),
            },
            Event::CloseSent { to, code } => match to {
                Side::Client => m.close(CloseSeen::SentToClient, code),
                Side::Backend => m.close(CloseSeen::SentToBackend, code),
            },
            Event::ClosesUndelivered { to, count } => {
                let counter = match to {
                    Side::Client => &m.closes_undelivered_to_client,
                    Side::Backend => &m.closes_undelivered_to_backend,
                };
                counter.fetch_add(count, Ordering::Relaxed);
            }
            // Counted where it ends (the Close sent, or the connection cut).
            Event::Closing { code, reason } => {
                if tracing::enabled!(tracing::Level::DEBUG)
                    && let Some(suppressed) = self.chatter.closing.admit(self.now)
                {
                    tracing::debug!(
                        event = "closing",
                        worker = %worker_name(),
                        code,
                        suppressed,
                        "closing a WebSocket with {code}: {reason}"
                    );
                }
            }
        }
    }

    /// Counts a failure of backend `id` at `addr`, which connection `idx`
    /// saw, towards its ejection.
    fn outlier_failure(&mut self, idx: u32, id: u32, addr: SocketAddr) {
        if let Some(service) = self.entry(idx).conn.service() {
            self.upstream.failed(service, id, addr, self.now);
        }
    }

    /// Connects connection `idx` to the next backend for `service`, or
    /// refuses the client when there is none or no socket for it.
    fn connect(&mut self, idx: u32, service: ServiceAddr) {
        let random = [self.rng.next_u32(), self.rng.next_u32()];
        let e = self.conns[idx as usize].as_ref().expect("live connection");
        let attempts = e.conn.attempts().expect("a handshaking connection");
        let picked = self.upstream.pick(&service, attempts, random, self.now);
        let (id, addr) = match picked {
            Ok(picked) => picked,
            Err(r) => return self.refuse(idx, r),
        };
        let Some(slot) = self.slots.take() else {
            if let Some(suppressed) = self.chatter.out_of_slots.admit(self.now) {
                tracing::warn!(
                    event = "connection_slots_full",
                    worker = %worker_name(),
                    slots = self.table,
                    suppressed,
                    "this worker's io_uring file table is full: new clients get 503 until \
                     connections close (counted in weir_l7_handshakes_total{{status=\"503\"}}); \
                     raise the open-files limit or set runtime.workers = 0"
                );
            }
            return self.refuse(idx, reject(503, "out of connection slots"));
        };
        self.upstream.hold(id);
        self.with_conn(idx, |conn, cx, _| conn.handle_connecting(cx, id, addr));
        let e = self.entry(idx);
        e.backend = Some(slot);
        let to = e.connect_to.insert(Box::new(socket::raw_addr(addr)));
        let connect =
            opcode::Connect::new(types::Fixed(slot), to.as_ptr().cast(), to.len()).build();
        let conn = ConnId {
            idx,
            generation: e.generation,
        };
        let domain = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let dest = types::DestinationSlot::try_from_slot_target(slot).expect("slot in range");
        let socket = opcode::Socket::new(domain, libc::SOCK_STREAM, 0)
            .file_index(Some(dest))
            .build();
        let nodelay = socket::nodelay(slot);
        // Only failures of the first two complete: the connect's completion
        // says how the chain went.
        let linked = squeue::Flags::IO_LINK | squeue::Flags::SKIP_SUCCESS;
        self.submit_chain([
            (Op::Socket { conn }, socket.flags(linked)),
            (Op::NoDelay { conn }, nodelay.flags(linked)),
            (Op::Connect { conn }, connect),
        ]);
    }

    /// A backend socket could not be made (its client gets 503 when its
    /// connect completes).
    fn count_socket_failure(&self, error: Option<io::Error>) {
        if self
            .metrics
            .backend_socket_errors
            .fetch_add(1, Ordering::Relaxed)
            == 0
        {
            tracing::error!(
                event = "backend_socket_failed",
                worker = %worker_name(),
                "cannot open a backend socket through io_uring ({}); such clients get 503 \
                 (counted in weir_l7_backend_socket_errors_total)",
                error.map_or_else(|| "no error code".to_string(), |e| e.to_string())
            );
        }
    }

    fn refuse(&mut self, idx: u32, reject: Reject) {
        self.with_conn(idx, |conn, cx, _| conn.handle_reject(cx, reject));
    }

    /// Frees the slot once both peers are done with it and no operation
    /// of it is in flight (so the kernel touches none of its memory);
    /// says whether it did.
    fn maybe_free(&mut self, idx: u32) -> bool {
        let Some(e) = self.conns[idx as usize].as_ref() else {
            return true;
        };
        if !e.conn.is_finished() || e.inflight > 0 {
            return false;
        }
        let e = self.conns[idx as usize].take().expect("checked");
        if !e.over_limit {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(backend) = e.conn.backend() {
            self.upstream.release(backend.id);
            if backend.connected {
                self.metrics.disconnected(backend.addr);
            }
            if e.in_drain {
                self.drain_progress(backend.id);
            }
        }
        // Nothing is in flight: the sockets close with their last reference.
        for slot in [e.client, e.backend].into_iter().flatten() {
            self.close_slot(slot);
        }
        self.free.push(idx);
        true
    }

    /// The live connections' slots.
    fn open_conns(&self) -> Vec<u32> {
        (0..self.conns.len() as u32)
            .filter(|i| self.conns[*i as usize].is_some())
            .collect()
    }

    /// Schedules the drain of every relayed connection to a backend that
    /// stopped, spread over its service's drain window.
    fn schedule_drains(&mut self, stopped: &BTreeSet<u32>) {
        let now_ms = self.start.elapsed().as_millis() as u64;
        let mut by_service: BTreeMap<ServiceAddr, Vec<(u32, u32)>> = BTreeMap::new();
        // Backend id -> its address, the drain window of the first service
        // seen with it, and its connections here.
        let mut by_backend: BTreeMap<u32, (SocketAddr, Duration, u32)> = BTreeMap::new();
        for (i, e) in self.conns.iter_mut().enumerate() {
            let Some(e) = e else { continue };
            // One already counted (its backend stopped before) is drained
            // on the earlier schedule.
            if e.conn.is_relaying()
                && !e.in_drain
                && let Some(backend) = e.conn.backend().filter(|b| stopped.contains(&b.id))
                && let Some(service) = e.conn.service()
            {
                e.in_drain = true;
                by_service
                    .entry(service)
                    .or_default()
                    .push((i as u32, e.generation));
                by_backend
                    .entry(backend.id)
                    .or_insert_with(|| (backend.addr, drain_window(&self.config, Some(service)), 0))
                    .2 += 1;
            }
        }
        for (service, conns) in by_service {
            let window = drain_window(&self.config, Some(service));
            self.drains
                .schedule(now_ms, window.as_millis() as u64, conns);
        }
        for (id, (addr, window, n)) in by_backend {
            self.drain_started(id, addr, n, window);
        }
    }

    /// Logs a drain of `n` more connections to backend `id`; one already
    /// in progress takes them in.
    fn drain_started(&mut self, id: u32, addr: SocketAddr, n: u32, window: Duration) {
        if self.count_into_drain(id, addr, n) {
            tracing::info!(
                event = "drain_started",
                worker = %worker_name(),
                backend = %addr,
                connections = n,
                "drain of backend {addr} started: Close 1001 to {n} connection(s), spread over \
                 {window:?}"
            );
        }
    }

    /// A connection handed over from another process was draining: it
    /// counts in this worker's drain of its backend, which starts here if
    /// none is in progress (logged, as a drain taken over).
    fn drain_joined(&mut self, id: u32, addr: SocketAddr, window: Duration) {
        if self.count_into_drain(id, addr, 1) {
            tracing::info!(
                event = "drain_taken_over",
                worker = %worker_name(),
                backend = %addr,
                "drain of backend {addr} taken over from the old process: its connections \
                 close with 1001 when the old schedule said (window {window:?})"
            );
        }
    }

    /// Counts `n` more connections into the drain of backend `id`; `true`
    /// when that drain starts with them (none was in progress).
    fn count_into_drain(&mut self, id: u32, addr: SocketAddr, n: u32) -> bool {
        if let Some(d) = self.draining.get_mut(&id) {
            d.total += n;
            d.open += n;
            return false;
        }
        self.draining.insert(
            id,
            DrainLog {
                addr,
                started: self.now,
                total: n,
                open: n,
            },
        );
        true
    }

    /// A connection to backend `id` is gone: the last one of a drain ends it.
    fn drain_progress(&mut self, id: u32) {
        let Some(d) = self.draining.get_mut(&id) else {
            return;
        };
        d.open = d.open.saturating_sub(1);
        if d.open > 0 {
            return;
        }
        let d = self.draining.remove(&id).expect("present");
        let (addr, total) = (d.addr, d.total);
        tracing::info!(
            event = "drain_ended",
            worker = %worker_name(),
            backend = %addr,
            connections = total,
            "drain of backend {addr} ended: its {total} connection(s) closed in {} ms",
            self.now.saturating_duration_since(d.started).as_millis()
        );
    }

    fn on_tick(&mut self) {
        let taken = self.bufs.taken_total();
        if taken != self.pool.seen {
            self.pool.seen = taken;
            self.pool.quiet_ticks = 0;
            self.pool.released = false;
        } else if self.pool.enabled && !self.pool.released {
            self.pool.quiet_ticks += 1;
        }
        self.forget_departed_backends();
        if self.stop.load(Ordering::Relaxed) && self.accepting {
            self.shutdown();
        }
        self.kick_stalled_accepts();
        let mut accepts = self
            .listeners
            .iter()
            .flatten()
            .flat_map(|l| l.accepts.iter());
        if accepts.any(|a| a.paused) {
            for l in self.listeners.iter_mut().flatten() {
                for a in l.accepts.iter_mut() {
                    a.paused = false;
                }
            }
            self.arm_accepts();
        }
        if self.shutdown_deadline.is_some_and(|d| self.now >= d) {
            // Past `shutdown`: whatever is still open is cut.
            for idx in self.open_conns() {
                self.with_conn(idx, |conn, cx, _| conn.handle_abort(cx));
                self.drive(idx);
            }
        }
        self.refresh_view();
        self.upstream.outliers().poll_returns(self.now);
        let now_ms = self.start.elapsed().as_millis() as u64;
        for (idx, generation) in self.drains.due(now_ms) {
            if self
                .live(ConnId { idx, generation })
                .is_some_and(|e| e.conn.is_relaying())
            {
                self.with_conn(idx, |conn, cx, _| {
                    conn.handle_close(cx, frame::CLOSE_GOING_AWAY, "going away")
                });
                self.drive(idx);
            }
        }
        // The gauge visits every connection: once a second, not per tick.
        self.gauge_ticks += 1;
        if self.gauge_ticks >= SECOND_TICKS {
            self.gauge_ticks = 0;
            let pending = self
                .conns
                .iter()
                .flatten()
                .filter(|e| e.conn.is_draining())
                .count();
            self.metrics
                .drains_in_progress
                .store((self.drains.len() + pending) as u64, Ordering::Relaxed);
        }
        let mut due = std::mem::take(&mut self.due);
        self.wheel.advance(self.now, &mut due);
        for ((idx, generation), tick) in due.drain(..) {
            // The table alone, not `self.live`: the config is read below.
            let Some(e) = live_in(&mut self.conns, ConnId { idx, generation }) else {
                continue;
            };
            // Filed again, sooner, since: this filing is stale.
            if e.timer != tick {
                continue;
            }
            e.timer = timers::UNFILED;
            let now = self.now;
            if e.conn.poll_timeout(&e.config).is_some_and(|at| at <= now) {
                self.with_conn(idx, |conn, cx, _| conn.handle_timeout(cx));
                self.drive(idx);
            } else {
                self.file_timer(idx);
            }
        }
        self.due = due;
    }

    /// Drops the metrics series of backends that left the registry. A
    /// removed backend leaves it only once no worker holds a connection to
    /// it, so no worker still counts one.
    fn forget_departed_backends(&mut self) {
        let (view, metrics) = (self.upstream.view(), &self.metrics);
        self.metric_backends.retain(|addr, id| {
            let present = view.backend(*id).is_some_and(|b| b.addr == *addr);
            present || !metrics.forget_backend(*addr)
        });
    }

    /// Re-reads the registry if it changed and drains the backends that
    /// stopped. A failed re-read leaves the worker on its last good state:
    /// that is counted every time and logged once per failing spell (and
    /// once when it works again), so stale routing never goes unnoticed.
    fn refresh_view(&mut self) {
        let failing = &self.metrics.registry_refresh_failing;
        match self.upstream.view_mut().refresh() {
            Ok(changes) => {
                if failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(
                        event = "registry_refresh_recovered",
                        worker = %worker_name(),
                        "registry refresh works again"
                    );
                }
                if let Some(changes) = changes {
                    self.schedule_drains(&changes.stopped);
                    let view = self.upstream.view();
                    let outliers = self.upstream.outliers();
                    outliers.forget(|id, addr| view.backend(id).is_some_and(|b| b.addr == addr));
                    for id in &changes.healthy_again {
                        outliers.checked_healthy(*id, self.now);
                    }
                }
            }
            Err(e) => {
                self.metrics
                    .registry_refresh_errors
                    .fetch_add(1, Ordering::Relaxed);
                if !failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        event = "registry_refresh_failed",
                        worker = %worker_name(),
                        "registry refresh failed, routing on the last good state until it works \
                         (counted in weir_l7_registry_refresh_errors_total): {e}"
                    );
                }
            }
        }
    }

    /// Applies the reloads published since the last turn, oldest first,
    /// and tells the daemon the generation this worker runs.
    fn reload(&mut self) {
        // Handed over, then asked to accept again: the new process failed.
        if self.handed_over && !self.handing_over.load(Ordering::Relaxed) {
            self.handed_over = false;
        }
        for update in self.reconfig.take(self.index) {
            self.apply(update);
        }
        self.reconfig.applied(self.index, self.config_generation);
    }

    /// One reload: listeners taken out stop accepting (their connections
    /// stay), added ones start, new connections take the configuration,
    /// and a change of which services drain unhealthy backends is looked
    /// at against the registry at once.
    fn apply(&mut self, update: Update) {
        let Update {
            generation,
            config,
            added,
        } = update;
        // The worker's own copy: connections count references to it
        // without touching another core's cache line.
        let config = Arc::new(Config::clone(&config));
        for slot in self.listeners.iter_mut() {
            let Some(l) = slot.as_mut().filter(|l| !l.removed) else {
                continue;
            };
            match config.listeners.iter().position(|n| n.listen == l.listen) {
                Some(i) => l.index = i as u16,
                None => {
                    // Its armed accepts complete, and new connects are
                    // refused by the kernel.
                    l.removed = true;
                    socket::shut(&l.fd, Shutdown::Both);
                    if l.accepts.iter().all(|a| a.slot.is_none()) {
                        *slot = None;
                    }
                }
            }
        }
        for (listen, fd) in added {
            let Some(index) = config.listeners.iter().position(|n| n.listen == listen) else {
                continue;
            };
            // Stopping: the socket closes unused.
            if !self.accepting {
                continue;
            }
            let l = Listening::new(fd, listen, index as u16, self.per_listener);
            match self.listeners.iter().position(Option::is_none) {
                Some(free) => self.listeners[free] = Some(l),
                None => self.listeners.push(Some(l)),
            }
        }
        let drain_unhealthy = config.drain_unhealthy != self.config.drain_unhealthy;
        self.config = config;
        self.config_generation = generation;
        if drain_unhealthy {
            let services = self.config.drain_unhealthy.iter().copied().collect();
            self.upstream.view_mut().set_drain_unhealthy(services);
            self.refresh_view();
        }
        self.arm_accepts();
    }

    /// Stops accepting on sockets another process accepts on now: the
    /// armed accepts are cancelled, the sockets stay open (shutting one
    /// would end the new process's accepts too) and close here once their
    /// accepts are back.
    fn hand_over(&mut self) {
        self.handed_over = true;
        for l in 0..self.listeners.len() {
            let Some(listening) = self.listeners[l].as_mut() else {
                continue;
            };
            listening.removed = true;
            let armed: Vec<u32> = (0..self.per_listener)
                .filter(|i| listening.accepts[*i as usize].slot.is_some())
                .map(|i| l as u32 * self.per_listener + i)
                .collect();
            if armed.is_empty() {
                self.listeners[l] = None;
            }
            for accept in armed {
                let cancel = opcode::AsyncCancel::new(Op::Accept { accept }.user_data());
                // Its completion is not waited for: the accept's own is.
                let conn = ConnId {
                    idx: accept,
                    generation: 0,
                };
                self.submit(Op::Cancel { conn }, cancel.build());
            }
        }
    }

    /// Re-arms an accept on a listening socket that has had a client
    /// queued for two ticks in a row while accepts were armed on it. An
    /// armed accept waits for one exclusive wakeup per arriving client; a
    /// wakeup taken by an accept of another process that is then cancelled
    /// (the old `weir run` stopping its accepts in a takeover, both holding
    /// the same sockets) wakes no one else, and the client would sit in the
    /// queue until the next one arrives. Cancelling one armed accept makes
    /// it go again, and a fresh accept takes a queued client at once.
    fn kick_stalled_accepts(&mut self) {
        if !self.accepting {
            return;
        }
        let mut kick = Vec::new();
        for (l, listening) in self.listeners.iter_mut().enumerate() {
            let Some(listening) = listening.as_mut().filter(|l| !l.removed) else {
                continue;
            };
            let Some(armed) = listening.accepts.iter().position(|a| a.slot.is_some()) else {
                listening.stalled_ticks = 0;
                continue;
            };
            if !socket::readable(&listening.fd) {
                listening.stalled_ticks = 0;
                continue;
            }
            listening.stalled_ticks += 1;
            if listening.stalled_ticks >= 2 {
                listening.stalled_ticks = 0;
                kick.push(l as u32 * self.per_listener + armed as u32);
            }
        }
        for accept in kick {
            self.metrics.accepts_kicked.fetch_add(1, Ordering::Relaxed);
            let cancel = opcode::AsyncCancel::new(Op::Accept { accept }.user_data());
            let conn = ConnId {
                idx: accept,
                generation: 0,
            };
            self.submit(Op::Cancel { conn }, cancel.build());
        }
    }

    /// Stops accepting and drains every connection over the shutdown
    /// window.
    fn shutdown(&mut self) {
        // Sockets shared with another process (handed over, or passed to
        // a takeover that failed) must not be shut: the tick may come
        // before the loop looked at the flag.
        if !self.handed_over && self.handing_over.load(Ordering::Relaxed) {
            self.hand_over();
        }
        self.accepting = false;
        self.shutdown_deadline = Some(self.now + self.config.timeouts.shutdown);
        // Removed ones were shut by their reload, or handed over.
        for l in self.listeners.iter().flatten().filter(|l| !l.removed) {
            // Shutting the listening socket ends the accept.
            socket::shut(&l.fd, Shutdown::Both);
        }
        let now_ms = self.start.elapsed().as_millis() as u64;
        let window = (self.config.timeouts.shutdown.as_millis() as u64) * 3 / 4;
        let relaying: Vec<(u32, u32)> = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|e| (i as u32, e)))
            .filter(|(_, e)| e.conn.is_relaying())
            .map(|(i, e)| (i, e.generation))
            .collect();
        if !relaying.is_empty() {
            tracing::info!(
                event = "shutdown_drain_started",
                worker = %worker_name(),
                connections = relaying.len(),
                "stopping: Close 1001 to {} connection(s), spread over {window} ms; what is \
                 still open after {:?} is cut",
                relaying.len(),
                self.config.timeouts.shutdown
            );
        }
        self.drains.schedule(now_ms, window, relaying);
        for idx in self.open_conns() {
            self.with_conn(idx, |conn, cx, _| conn.handle_shutdown(cx));
            self.drive(idx);
        }
    }
}

/// The connection `id` names in `conns`, if it is still the one in its
/// slot.
fn live_in(conns: &mut Table<Entry>, id: ConnId) -> Option<&mut Entry> {
    conns
        .get_mut(id.idx as usize)
        .and_then(|e| e.as_mut())
        .filter(|e| e.generation == id.generation)
}

/// Which gathering send a connection slot and side have in flight.
fn gather_key(idx: u32, side: Side) -> u64 {
    (u64::from(idx) << 1) | u64::from(side == Side::Backend)
}

/// The drain window of a service: its own, or the default.
fn drain_window(config: &Config, service: Option<ServiceAddr>) -> Duration {
    service
        .and_then(|svc| {
            config
                .service_drain
                .iter()
                .find(|(s, _)| *s == svc)
                .map(|(_, w)| *w)
        })
        .unwrap_or(config.drain_window)
}

/// The worker's thread name, for log lines.
fn worker_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("weir-worker")
        .to_string()
}

#[cfg(test)]
mod tests {
    /// Every connection costs at least this much memory; keep it small:
    /// idle connections must cost almost nothing.
    #[test]
    fn a_connection_slot_stays_small() {
        let size = size_of::<Option<super::Entry>>();
        assert!(size <= 448, "a connection slot grew to {size} bytes");
    }
}
