//! One L7 worker: a thread with its own io_uring, its own SO_REUSEPORT
//! listeners and its own connections. It only moves bytes; every decision
//! comes from the sans-IO modules (`handshake`, `relay`, `drain`, `view`).
//!
//! Per connection: multishot receive from the client into the worker's
//! provided-buffer ring (an idle connection holds no buffer) → handshake
//! validated → route → backend picked → connect (another backend on
//! failure, before anything went upstream) → request forwarded → the
//! backend's 101 checked → relay, sending straight from the receive
//! buffers. A connection is freed only after every operation it started
//! has completed, so the kernel never touches freed memory.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use socket2::SockAddr;

use super::bufring::BufRing;
use super::config::{Config, Listener};
use super::drain::DrainQueue;
use super::frame::{self, Direction, Limits as FrameLimits};
use super::handshake::{self, BackendResponse, Reject, UpgradeRequest};
use super::metrics::{CloseSeen, WorkerMetrics};
use super::relay::Scanner;
use super::socket;
use super::table::Table;
use super::view::RegistryView;
use crate::registry::{Maps, ServiceAddr};

const OP_ACCEPT: u8 = 1;
const OP_CLIENT_RECV: u8 = 2;
const OP_BACKEND_RECV: u8 = 3;
const OP_CLIENT_SEND: u8 = 4;
const OP_BACKEND_SEND: u8 = 5;
const OP_CONNECT: u8 = 6;
const OP_TICK: u8 = 7;
const OP_CANCEL: u8 = 8;
const OP_SHUTDOWN: u8 = 9;

/// A socket as io_uring sees it: a plain descriptor (clients: weir needs
/// their address) or a slot of the ring's registered-file table (backends:
/// they cost no entry in the process' descriptor table, which is capped).
#[derive(Clone, Copy)]
enum Target {
    Fd(RawFd),
    Slot(u32),
}

impl Target {
    fn recv(self, bgid: u16) -> squeue::Entry {
        match self {
            Self::Fd(fd) => opcode::RecvMulti::new(types::Fd(fd), bgid).build(),
            Self::Slot(s) => opcode::RecvMulti::new(types::Fixed(s), bgid).build(),
        }
    }

    fn send(self, ptr: *const u8, len: u32) -> squeue::Entry {
        match self {
            Self::Fd(fd) => opcode::Send::new(types::Fd(fd), ptr, len)
                .flags(libc::MSG_NOSIGNAL)
                .build(),
            Self::Slot(s) => opcode::Send::new(types::Fixed(s), ptr, len)
                .flags(libc::MSG_NOSIGNAL)
                .build(),
        }
    }
}

/// Buffers queued towards one peer before weir stops reading from the
/// other: the per-connection bound on data in flight.
const HIGH_WATER: usize = 16;
/// Bytes a client may send before its handshake completes.
const MAX_EARLY: usize = 64 * 1024;
/// Connect attempts per connection (each on another backend).
const MAX_ATTEMPTS: usize = 3;

fn ud(op: u8, idx: u32, generation: u32) -> u64 {
    (u64::from(generation & 0xff_ffff) << 40) | (u64::from(idx) << 8) | u64::from(op)
}

fn split(user_data: u64) -> (u8, u32, u32) {
    (
        user_data as u8,
        (user_data >> 8) as u32,
        (user_data >> 40) as u32,
    )
}

/// What a worker needs from the configuration.
#[derive(Clone)]
pub struct Settings {
    pub config: Config,
    /// The instance's pinned maps.
    pub instance_dir: std::path::PathBuf,
    /// Where the L7 counters are written for `weir stats`.
    pub state_dir: std::path::PathBuf,
}

/// A seed from the kernel's random pool (getrandom(2)), per worker. Never
/// 0, which xorshift could not leave.
fn os_random_seed() -> io::Result<u64> {
    let mut seed = [0u8; 8];
    let mut got = 0;
    while got < seed.len() {
        // SAFETY: getrandom writes at most the given length into our buffer.
        let n = unsafe { libc::getrandom(seed[got..].as_mut_ptr().cast(), seed.len() - got, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io::Error::new(e.kind(), format!("getrandom: {e}")));
        }
        got += n as usize;
    }
    Ok(u64::from_ne_bytes(seed) | 1)
}

/// A piece of data queued towards one peer.
enum Seg {
    /// Bytes `start..end` of provided buffer `bid`, recycled once sent.
    Buf { bid: u16, start: u32, end: u32 },
    /// Bytes weir wrote itself (handshake answers, Close frames), from
    /// `offset` on. `close`: the code of weir's own Close frame, counted
    /// once the whole frame is written to the socket.
    Owned {
        data: Vec<u8>,
        offset: usize,
        close: Option<u16>,
    },
}

impl Seg {
    fn owned(data: Vec<u8>) -> Self {
        Self::Owned {
            data,
            offset: 0,
            close: None,
        }
    }

    /// weir's own Close frame with `code`.
    fn close(data: Vec<u8>, code: u16) -> Self {
        Self::Owned {
            data,
            offset: 0,
            close: Some(code),
        }
    }

    /// A Close of weir's that was queued and will never be written.
    fn undelivered_close(&self) -> bool {
        matches!(self, Self::Owned { close: Some(_), .. })
    }
}

#[derive(Default)]
struct SendQueue {
    segs: VecDeque<Seg>,
    in_flight: bool,
    /// No more data will be queued: shut the write side once flushed.
    finish: bool,
    shut: bool,
}

impl SendQueue {
    /// Drops the segment that was sent. An emptied queue also lets go of
    /// its storage: an idle connection then holds no heap memory for its
    /// queues (a few hundred bytes each otherwise, times every idle
    /// connection), at the price of one allocation when it talks again.
    fn pop_sent(&mut self) {
        self.segs.pop_front();
        if self.segs.is_empty() {
            self.segs = VecDeque::new();
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    ClientHead,
    Connecting,
    BackendHead,
    Relay,
    /// Passing a non-101 backend answer through, then closing.
    PassThrough,
    /// Sending a refusal or closing frames, then shutting down.
    Closing,
}

/// What only the handshake needs. Boxed in [`Conn`] and dropped once the
/// connection relays, so an established (often idle) connection does not
/// carry it.
struct Handshake {
    /// The client's address, for X-Forwarded-For.
    peer: SocketAddr,
    /// The request head, then the backend's answer head.
    head: Vec<u8>,
    /// Client bytes that came before the backend answered.
    early: Vec<u8>,
    request: Option<UpgradeRequest>,
    /// Backends tried so far.
    tried: Vec<u32>,
    /// The address a connect in flight points at: it must stay put until
    /// the connect completes.
    backend_addr: Option<Box<SockAddr>>,
    /// The last connect attempt was cancelled for taking too long.
    timed_out: bool,
}

struct Conn {
    generation: u32,
    listener: usize,
    client: OwnedFd,
    /// The backend socket's slot in the ring's registered-file table.
    backend: Option<u32>,
    backend_id: Option<u32>,
    phase: Phase,
    /// Some until the connection relays.
    hs: Option<Box<Handshake>>,
    service: Option<ServiceAddr>,
    to_client: SendQueue,
    to_backend: SendQueue,
    c2b: Option<Scanner>,
    b2c: Option<Scanner>,
    client_recv: bool,
    backend_recv: bool,
    client_eof: bool,
    backend_eof: bool,
    /// Operations submitted and not completed yet.
    inflight: u32,
    deadline: Option<Instant>,
    last_activity: Instant,
    /// weir sent its own Close on each side (drain, violation, idle).
    closed_client: bool,
    closed_backend: bool,
    /// weir is closing this WebSocket with this code and reason; each peer
    /// gets its Close at its next frame boundary.
    pending_close: Option<(u16, &'static str)>,
    /// Refused for `max_connections`: not counted in `open`.
    over_limit: bool,
    /// A peer broke a framing rule: nothing more from it is relayed.
    failed_c2b: bool,
    failed_b2c: bool,
    /// Ended by weir: nothing more is sent, everything is let go.
    aborted: bool,
    /// Counted in `live` for its backend.
    counted: bool,
    /// When weir last sent the client a keepalive ping.
    last_ping: Instant,
    /// The backend's address, for the per-backend metrics.
    backend_sockaddr: Option<SocketAddr>,
}

pub struct Worker {
    // Field order: the ring goes first, then the buffers it writes into.
    ring: IoUring,
    bufs: BufRing,
    listeners: Vec<(OwnedFd, Listener)>,
    conns: Table<Conn>,
    free: Vec<u32>,
    next_generation: u32,
    view: RegistryView,
    live: HashMap<u32, u32>,
    drains: DrainQueue<(u32, u32)>,
    config: Config,
    tick: Box<types::Timespec>,
    start: Instant,
    rng: u64,
    stop: Arc<AtomicBool>,
    accepting: bool,
    metrics: Arc<WorkerMetrics>,
    /// Free slots of the registered-file table.
    slots: Vec<u32>,
    /// After SIGTERM: what is still open at this point is cut.
    shutdown_deadline: Option<Instant>,
    /// Connections across all workers, for `max_connections`.
    open: Arc<std::sync::atomic::AtomicUsize>,
    /// Listeners whose accept stopped for lack of descriptors; the tick
    /// re-arms them.
    accept_paused: Vec<bool>,
    /// The buffer pool's memory can be given back only when the kernel
    /// fills buffers inside our own `io_uring_enter` (DEFER_TASKRUN).
    pool: PoolRelease,
    /// Backends with a metrics series in this worker, by address, with
    /// the registry id they had when last connected to.
    metric_backends: HashMap<SocketAddr, u32>,
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
const POOL_QUIET_TICKS: u32 = 20;

impl Worker {
    /// Sets up the ring (SINGLE_ISSUER and DEFER_TASKRUN where the kernel
    /// has them), the buffers, the listeners and the registry view.
    pub fn new(
        settings: &Settings,
        listener_fds: Vec<OwnedFd>,
        stop: Arc<AtomicBool>,
        metrics: Arc<WorkerMetrics>,
        open: Arc<std::sync::atomic::AtomicUsize>,
    ) -> io::Result<Self> {
        let config = settings.config.clone();
        let entries = 4096;
        let deferred = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries);
        let defer_taskrun = deferred.is_ok();
        let ring = deferred
            .or_else(|_| IoUring::builder().setup_coop_taskrun().build(entries))
            .or_else(|_| IoUring::new(entries))
            .map_err(|e| io::Error::new(e.kind(), format!("io_uring is not available: {e}")))?;
        let bufs = BufRing::new(&ring, 0, config.buffers, config.buffer_size)?;
        // A sparse table of direct descriptors for backend sockets; the
        // kernel caps it at RLIMIT_NOFILE per ring.
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit fills the struct we pass.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        let table = (limit.rlim_cur as u32).clamp(64, 65536);
        ring.submitter().register_files_sparse(table).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("registering {table} direct descriptors: {e}"),
            )
        })?;
        let slots: Vec<u32> = (0..table).rev().collect();
        let accept_paused = vec![false; config.listeners.len()];
        let listeners: Vec<(OwnedFd, Listener)> = listener_fds
            .into_iter()
            .zip(config.listeners.iter().cloned())
            .collect();
        let maps = Maps::open(&settings.instance_dir).map_err(io::Error::other)?;
        let view = RegistryView::open(maps).map_err(io::Error::other)?;
        let seed = os_random_seed()?;
        Ok(Self {
            ring,
            bufs,
            listeners,
            conns: Table::default(),
            free: Vec::new(),
            next_generation: 1,
            view,
            live: HashMap::new(),
            drains: DrainQueue::new(),
            tick: Box::new(types::Timespec::from(Duration::from_millis(50))),
            start: Instant::now(),
            rng: seed,
            config,
            stop,
            accepting: true,
            metrics,
            slots,
            shutdown_deadline: None,
            open,
            accept_paused,
            pool: PoolRelease {
                enabled: defer_taskrun,
                ..PoolRelease::default()
            },
            metric_backends: HashMap::new(),
        })
    }

    /// xorshift64 from a seed of the kernel's: backend picks and the masks
    /// of frames weir sends to backends (which RFC 6455 5.3 wants
    /// unpredictable) differ per worker and per run.
    fn random(&mut self) -> u32 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 16) as u32
    }

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every pointer an entry carries lives in a Conn, the
            // buffer ring or `self.tick`, all kept until its completion.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            let _ = self.ring.submit();
        }
    }

    /// Runs until the stop flag is set and every connection is gone.
    pub fn run(&mut self) -> io::Result<()> {
        for i in 0..self.listeners.len() {
            self.arm_accept(i);
        }
        self.arm_tick();
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
            let completions: Vec<(u64, i32, u32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags()))
                .collect();
            for (user_data, res, flags) in completions {
                self.complete(user_data, res, flags);
            }
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
            if !self.accepting && self.conns.iter().all(Option::is_none) {
                return Ok(());
            }
        }
    }

    /// A one-shot timeout, re-armed on every tick (multishot timeouts need
    /// kernel 6.4 and end silently when the completion queue overflows).
    fn arm_tick(&mut self) {
        let tick = opcode::Timeout::new(&*self.tick as *const types::Timespec)
            .build()
            .user_data(ud(OP_TICK, 0, 0));
        self.push(tick);
    }

    fn arm_accept(&mut self, listener: usize) {
        let fd = self.listeners[listener].0.as_raw_fd();
        let entry = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(ud(OP_ACCEPT, listener as u32, 0));
        self.push(entry);
    }

    fn complete(&mut self, user_data: u64, res: i32, flags: u32) {
        let (op, idx, generation) = split(user_data);
        match op {
            OP_ACCEPT => self.on_accept(idx as usize, res, flags),
            OP_TICK => {
                self.arm_tick();
                self.on_tick();
            }
            OP_CANCEL => {}
            _ => {
                // A receive that picked a buffer owns it, whatever happened
                // to its connection since.
                let bid = cqueue::buffer_select(flags);
                if bid.is_some() {
                    self.bufs.taken();
                }
                let live = self
                    .conns
                    .get(idx as usize)
                    .and_then(|c| c.as_ref())
                    .is_some_and(|c| c.generation == generation);
                if !live {
                    if let Some(bid) = bid {
                        self.bufs.recycle(bid);
                    }
                    return;
                }
                let more = cqueue::more(flags);
                match op {
                    OP_CLIENT_RECV | OP_BACKEND_RECV => {
                        self.on_recv(idx, op == OP_CLIENT_RECV, res, bid, more)
                    }
                    OP_CLIENT_SEND | OP_BACKEND_SEND => {
                        self.on_send(idx, op == OP_CLIENT_SEND, res)
                    }
                    OP_CONNECT => self.on_connect(idx, res),
                    OP_SHUTDOWN => self.conn(idx).inflight -= 1,
                    _ => {}
                }
                self.maybe_free(idx);
            }
        }
    }

    fn conn(&mut self, idx: u32) -> &mut Conn {
        self.conns[idx as usize].as_mut().expect("live connection")
    }

    /// The handshake state of a connection that is still handshaking.
    fn hs(&mut self, idx: u32) -> &mut Handshake {
        self.conn(idx)
            .hs
            .as_mut()
            .expect("a handshaking connection")
    }

    fn on_accept(&mut self, listener: usize, res: i32, flags: u32) {
        let out_of_files = res == -libc::EMFILE || res == -libc::ENFILE;
        if !cqueue::more(flags) && self.accepting {
            if out_of_files {
                // Re-arming now would spin: the tick tries again.
                self.accept_paused[listener] = true;
            } else {
                self.arm_accept(listener);
            }
        }
        if res < 0 {
            return;
        }
        // SAFETY: the kernel handed us this new descriptor.
        let client = unsafe { OwnedFd::from_raw_fd(res) };
        self.metrics.accepted.fetch_add(1, Ordering::Relaxed);
        if !self.accepting {
            return;
        }
        self.refresh_view();
        let peer = socket::peer_addr(&client).unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let idx = self
            .free
            .pop()
            .unwrap_or_else(|| self.conns.push_empty() as u32);
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1) & 0xff_ffff;
        let now = Instant::now();
        // Counted while open; one refused for the limit does not count.
        let over = self.open.fetch_add(1, Ordering::Relaxed) >= self.config.max_connections;
        if over {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
        self.conns[idx as usize] = Some(Conn {
            generation,
            listener,
            client,
            backend: None,
            backend_id: None,
            phase: Phase::ClientHead,
            hs: Some(Box::new(Handshake {
                peer,
                head: Vec::new(),
                early: Vec::new(),
                request: None,
                tried: Vec::new(),
                backend_addr: None,
                timed_out: false,
            })),
            service: None,
            to_client: SendQueue::default(),
            to_backend: SendQueue::default(),
            c2b: None,
            b2c: None,
            client_recv: false,
            backend_recv: false,
            client_eof: false,
            backend_eof: false,
            inflight: 0,
            deadline: Some(now + self.config.timeouts.client_head),
            last_activity: now,
            closed_client: false,
            closed_backend: false,
            pending_close: None,
            over_limit: over,
            failed_c2b: false,
            failed_b2c: false,
            aborted: false,
            counted: false,
            last_ping: now,
            backend_sockaddr: None,
        });
        if over {
            self.reject(
                idx,
                Reject {
                    status: 503,
                    reason: "over the connection limit",
                },
            );
            return;
        }
        self.arm_recv(idx, true);
    }

    fn arm_recv(&mut self, idx: u32, client: bool) {
        let bgid = self.bufs.bgid();
        let c = self.conn(idx);
        let (target, op) = if client {
            if c.client_recv || c.client_eof {
                return;
            }
            c.client_recv = true;
            (Target::Fd(c.client.as_raw_fd()), OP_CLIENT_RECV)
        } else {
            let Some(slot) = c.backend else { return };
            if c.backend_recv || c.backend_eof {
                return;
            }
            c.backend_recv = true;
            (Target::Slot(slot), OP_BACKEND_RECV)
        };
        c.inflight += 1;
        let entry = target.recv(bgid).user_data(ud(op, idx, c.generation));
        self.push(entry);
    }

    fn on_recv(&mut self, idx: u32, from_client: bool, res: i32, bid: Option<u16>, more: bool) {
        if !more {
            let c = self.conn(idx);
            c.inflight -= 1;
            if from_client {
                c.client_recv = false;
            } else {
                c.backend_recv = false;
            }
        }
        if res == -libc::ENOBUFS {
            // The pool is empty: data waits in the socket; the tick re-arms.
            self.metrics
                .buffer_exhausted
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        if res == -libc::ECANCELED {
            // Paused by backpressure: re-armed once the other side drained
            // (which may already be the case).
            self.backpressure(idx);
            return;
        }
        if res <= 0 {
            let c = self.conn(idx);
            if from_client {
                c.client_eof = true;
            } else {
                c.backend_eof = true;
            }
            self.on_eof(idx, from_client);
            return;
        }
        let bid = bid.expect("a receive with data names its buffer");
        let len = res as usize;
        self.conn(idx).last_activity = Instant::now();
        let phase = self.conn(idx).phase;
        match (phase, from_client) {
            (Phase::ClientHead, true) => {
                let data = self.bufs.buffer(bid, len).to_vec();
                self.bufs.recycle(bid);
                self.hs(idx).head.extend_from_slice(&data);
                self.try_request(idx);
            }
            (Phase::Connecting | Phase::BackendHead, true) => {
                let data = self.bufs.buffer(bid, len).to_vec();
                self.bufs.recycle(bid);
                let hs = self.hs(idx);
                hs.early.extend_from_slice(&data);
                if hs.early.len() > MAX_EARLY {
                    self.abort(idx);
                }
            }
            (Phase::BackendHead, false) => {
                let data = self.bufs.buffer(bid, len).to_vec();
                self.bufs.recycle(bid);
                self.hs(idx).head.extend_from_slice(&data);
                self.try_response(idx);
            }
            (Phase::Relay, _) => self.relay(idx, from_client, bid, len),
            (Phase::PassThrough, false) => {
                self.conn(idx).to_client.segs.push_back(Seg::Buf {
                    bid,
                    start: 0,
                    end: len as u32,
                });
                self.flush(idx, true);
            }
            _ => self.bufs.recycle(bid),
        }
        self.backpressure(idx);
    }

    fn try_request(&mut self, idx: u32) {
        let limits = handshake::Limits {
            max_head: self.config.limits.max_head_bytes,
            max_headers: self.config.limits.max_headers,
        };
        let parsed = handshake::parse_request(&self.hs(idx).head, &limits);
        let req = match parsed {
            Ok(None) => return,
            Ok(Some(req)) => req,
            Err(reject) => return self.reject(idx, reject),
        };
        let listener = self.conn(idx).listener;
        let Some(service) = self.listeners[listener].1.route(&req.host, &req.path) else {
            return self.reject(
                idx,
                Reject {
                    status: 404,
                    reason: "no route for this host and path",
                },
            );
        };
        let c = self.conn(idx);
        c.service = Some(service);
        let hs = c.hs.as_mut().expect("a handshaking connection");
        hs.early = hs.head.split_off(req.head_len);
        hs.head = Vec::new();
        hs.request = Some(req);
        self.connect_next(idx);
    }

    /// Connects to a backend not tried yet; 503 when none is left to try.
    fn connect_next(&mut self, idx: u32) {
        let service = self.conn(idx).service.expect("routed");
        if !self.view.has_service(&service) {
            return self.reject(
                idx,
                Reject {
                    status: 503,
                    reason: "no such L7 service in the registry",
                },
            );
        }
        let tried = self.hs(idx).tried.clone();
        if tried.len() >= MAX_ATTEMPTS {
            let timed_out = self.hs(idx).timed_out;
            return self.reject(
                idx,
                if timed_out {
                    Reject {
                        status: 504,
                        reason: "backend did not answer in time",
                    }
                } else {
                    Reject {
                        status: 502,
                        reason: "backend refused the connection",
                    }
                },
            );
        }
        let random = [self.random(), self.random()];
        let live = &self.live;
        let Some((id, addr)) = self.view.pick(&service, random, &tried, |id| {
            live.get(&id).copied().unwrap_or(0)
        }) else {
            let timed_out = self.hs(idx).timed_out;
            let reject = match (tried.is_empty(), timed_out) {
                (true, _) => Reject {
                    status: 503,
                    reason: "no healthy backend",
                },
                (false, true) => Reject {
                    status: 504,
                    reason: "backend did not answer in time",
                },
                (false, false) => Reject {
                    status: 502,
                    reason: "backend refused the connection",
                },
            };
            return self.reject(idx, reject);
        };
        let Ok(fd) = socket::backend_socket(addr) else {
            return self.reject(
                idx,
                Reject {
                    status: 503,
                    reason: "out of sockets",
                },
            );
        };
        let Some(slot) = self.slots.pop() else {
            return self.reject(
                idx,
                Reject {
                    status: 503,
                    reason: "out of backend socket slots",
                },
            );
        };
        if let Err(e) = self
            .ring
            .submitter()
            .register_files_update(slot, &[fd.as_raw_fd()])
        {
            self.slots.push(slot);
            if self
                .metrics
                .socket_register_errors
                .fetch_add(1, Ordering::Relaxed)
                == 0
            {
                eprintln!(
                    "weir: {}: cannot register a backend socket with io_uring ({e}); such \
                     clients get 503 (counted in weir_l7_socket_register_errors_total)",
                    worker_name()
                );
            }
            return self.reject(
                idx,
                Reject {
                    status: 503,
                    reason: "cannot register the backend socket",
                },
            );
        }
        drop(fd);
        let connect_timeout = self.config.timeouts.connect;
        // Counted from the pick on: a backend being connected to is in use
        // (the registry must not free it meanwhile).
        *self.live.entry(id).or_insert(0) += 1;
        self.view.add_l7_connections(id, 1);
        let c = self.conn(idx);
        c.counted = true;
        c.backend = Some(slot);
        c.backend_id = Some(id);
        c.phase = Phase::Connecting;
        c.deadline = Some(Instant::now() + connect_timeout);
        c.inflight += 1;
        let hs = c.hs.as_mut().expect("a handshaking connection");
        hs.timed_out = false;
        hs.tried.push(id);
        let sa = hs.backend_addr.insert(Box::new(socket::raw_addr(addr)));
        let entry = opcode::Connect::new(types::Fixed(slot), sa.as_ptr().cast(), sa.len())
        .build()
        .user_data(ud(OP_CONNECT, idx, c.generation));
        self.push(entry);
    }

    fn on_connect(&mut self, idx: u32, res: i32) {
        let backend_head = self.config.timeouts.backend_head;
        let c = self.conn(idx);
        c.inflight -= 1;
        if c.phase != Phase::Connecting {
            return;
        }
        if res < 0 {
            // Refused or timed out (the tick cancelled it): its slot goes
            // back (no other operation uses it), and another backend is tried.
            if let Some(slot) = c.backend.take() {
                let _ = self.ring.submitter().register_files_update(slot, &[-1]);
                self.slots.push(slot);
            }
            let c = self.conn(idx);
            c.counted = false;
            if let Some(id) = c.backend_id.take() {
                if let Some(n) = self.live.get_mut(&id) {
                    *n = n.saturating_sub(1);
                }
                self.view.add_l7_connections(id, -1);
            }
            return self.connect_next(idx);
        }
        let id = c.backend_id.expect("connecting to a backend");
        let hs = c.hs.as_mut().expect("a handshaking connection");
        let req = hs.request.as_ref().expect("handshake parsed");
        let forwarded = handshake::forward_request(req, hs.peer.ip(), "http");
        // Connected: what only connecting needed goes.
        hs.backend_addr = None;
        hs.tried = Vec::new();
        c.to_backend.segs.push_back(Seg::owned(forwarded));
        c.phase = Phase::BackendHead;
        c.deadline = Some(Instant::now() + backend_head);
        if let Some(addr) = self.view.backend(id).map(|b| b.addr) {
            self.metrics.connected(addr);
            self.metric_backends.insert(addr, id);
            self.conn(idx).backend_sockaddr = Some(addr);
        }
        self.flush(idx, false);
        self.arm_recv(idx, false);
    }

    fn try_response(&mut self, idx: u32) {
        let limits = handshake::Limits {
            max_head: self.config.limits.max_head_bytes,
            max_headers: self.config.limits.max_headers,
        };
        let backend_head = self.config.timeouts.backend_head;
        let hs = self.hs(idx);
        let key = hs.request.as_ref().expect("parsed").key.clone();
        let parsed = handshake::parse_response(&hs.head, &key, &limits);
        match parsed {
            Ok(None) => {}
            Err(reject) => self.reject(idx, reject),
            Ok(Some(BackendResponse::Other { .. })) => {
                let head = std::mem::take(&mut self.hs(idx).head);
                let c = self.conn(idx);
                c.to_client.segs.push_back(Seg::owned(head));
                c.phase = Phase::PassThrough;
                // The answer gets as long as the handshake did.
                c.deadline = Some(Instant::now() + backend_head);
                self.flush(idx, true);
            }
            Ok(Some(BackendResponse::Upgraded {
                head,
                head_len,
                rsv1,
                ..
            })) => {
                self.metrics.handshake(None);
                let limits = FrameLimits {
                    max_frame: self.config.limits.max_frame,
                    max_message: self.config.limits.max_message,
                };
                let c = self.conn(idx);
                // Relaying from here on: the handshake state goes.
                let mut hs = c.hs.take().expect("a handshaking connection");
                let after = hs.head.split_off(head_len);
                let early = std::mem::take(&mut hs.early);
                drop(hs);
                c.to_client.segs.push_back(Seg::owned(head));
                c.c2b = Some(Scanner::new(Direction::ClientToServer, rsv1, limits));
                c.b2c = Some(Scanner::new(Direction::ServerToClient, rsv1, limits));
                c.phase = Phase::Relay;
                c.deadline = None;
                if !after.is_empty() {
                    self.relay_owned(idx, false, after);
                }
                if !early.is_empty() {
                    self.relay_owned(idx, true, early);
                }
                self.flush(idx, true);
                self.flush(idx, false);
                self.arm_recv(idx, true);
                // The backend may have left while this connection was being
                // set up: it drains like the others.
                let c = self.conn(idx);
                let (id, generation) = (c.backend_id, c.generation);
                let active = id
                    .and_then(|id| self.view.backend(id))
                    .is_some_and(|b| b.state == weir_ebpf::abi::BackendState::Active);
                if !active {
                    let now_ms = self.start.elapsed().as_millis() as u64;
                    let window = self.drain_window_of(idx).as_millis() as u64;
                    self.drains
                        .schedule(now_ms, window, vec![(idx, generation)]);
                }
            }
        }
    }

    /// Counts the frames, bytes and Closes that passed in one read.
    fn count_fed(&self, from_client: bool, frames: u32, closes: &[u16], bytes: usize) {
        let m = &self.metrics;
        let (f, b, seen) = if from_client {
            (&m.frames_c2b, &m.bytes_c2b, CloseSeen::FromClient)
        } else {
            (&m.frames_b2c, &m.bytes_b2c, CloseSeen::FromBackend)
        };
        f.fetch_add(u64::from(frames), Ordering::Relaxed);
        b.fetch_add(bytes as u64, Ordering::Relaxed);
        for code in closes {
            m.close(seen, *code);
        }
    }

    /// Closes of weir's own dropped from a queue before they were written.
    fn count_undelivered(&self, to_client: bool, closes: u64) {
        let counter = if to_client {
            &self.metrics.closes_undelivered_to_client
        } else {
            &self.metrics.closes_undelivered_to_backend
        };
        counter.fetch_add(closes, Ordering::Relaxed);
    }

    /// Relays bytes weir holds (not in a provided buffer).
    fn relay_owned(&mut self, idx: u32, from_client: bool, data: Vec<u8>) {
        let c = self.conn(idx);
        let scanner = if from_client {
            c.c2b.as_mut()
        } else {
            c.b2c.as_mut()
        }
        .expect("relaying");
        let fed = scanner.feed(&data);
        let queue = if from_client {
            &mut c.to_backend
        } else {
            &mut c.to_client
        };
        if let Some(h) = fed.held {
            queue.segs.push_back(Seg::owned(h));
        }
        if fed.pass > 0 {
            queue.segs.push_back(Seg::owned(data[..fed.pass].to_vec()));
        }
        self.count_fed(from_client, fed.frames, &fed.closes, fed.pass);
        if let Some(v) = fed.violation {
            self.fail(idx, from_client, v.code, v.reason);
        }
    }

    fn relay(&mut self, idx: u32, from_client: bool, bid: u16, len: usize) {
        let data = self.bufs.buffer(bid, len);
        let c = self.conns[idx as usize].as_mut().expect("live");
        // After weir's own Close to a peer, nothing more goes to it.
        let dropped = if from_client {
            c.closed_backend || c.failed_c2b
        } else {
            c.closed_client || c.failed_b2c
        };
        if dropped {
            self.bufs.recycle(bid);
            return;
        }
        let scanner = if from_client {
            c.c2b.as_mut()
        } else {
            c.b2c.as_mut()
        }
        .expect("relaying");
        let fed = scanner.feed(data);
        let queue = if from_client {
            &mut c.to_backend
        } else {
            &mut c.to_client
        };
        if let Some(h) = fed.held {
            queue.segs.push_back(Seg::owned(h));
        }
        if fed.pass > 0 {
            queue.segs.push_back(Seg::Buf {
                bid,
                start: 0,
                end: fed.pass as u32,
            });
        } else {
            self.bufs.recycle(bid);
        }
        self.count_fed(from_client, fed.frames, &fed.closes, fed.pass);
        if let Some(v) = fed.violation {
            self.fail(idx, from_client, v.code, v.reason);
        } else {
            self.try_close(idx);
        }
        self.flush(idx, !from_client);
    }

    /// A peer broke a rule: nothing more from it passes, and both sides
    /// get a Close with the rule's code.
    fn fail(&mut self, idx: u32, from_client: bool, code: u16, reason: &'static str) {
        let c = self.conn(idx);
        if from_client {
            c.failed_c2b = true;
        } else {
            c.failed_b2c = true;
        }
        self.close_both(idx, code, reason);
    }

    /// weir closes the WebSocket on both sides with `code`. Each Close goes
    /// out at a frame boundary of the bytes flowing to that peer: if a frame
    /// towards it is half sent, the rest of that frame is relayed first.
    /// What does not finish within the close timeout is cut.
    fn close_both(&mut self, idx: u32, code: u16, reason: &'static str) {
        let close_timeout = self.config.timeouts.close;
        let c = self.conn(idx);
        if c.pending_close.is_none() {
            c.pending_close = Some((code, reason));
            c.deadline = Some(Instant::now() + close_timeout);
        }
        self.try_close(idx);
    }

    /// Sends the pending Close to each peer whose incoming frames are at a
    /// boundary; once both have theirs, the connection is closing.
    fn try_close(&mut self, idx: u32) {
        if self.conn(idx).pending_close.is_none() {
            return;
        }
        let mask = self.random().to_ne_bytes();
        let c = self.conn(idx);
        let Some((code, reason)) = c.pending_close else {
            return;
        };
        // A peer that sent its own Close, or whose write side is shut,
        // gets nothing more.
        let client_done = c.to_client.finish || c.b2c.as_ref().is_some_and(Scanner::closed);
        let backend_done = c.backend.is_none()
            || c.to_backend.finish
            || c.c2b.as_ref().is_some_and(Scanner::closed);
        if !c.closed_client && (client_done || c.b2c.as_ref().is_none_or(Scanner::at_boundary)) {
            c.closed_client = true;
            if !c.to_client.finish {
                if !c.b2c.as_ref().is_some_and(Scanner::closed) {
                    let close = frame::close_frame(code, reason, None);
                    c.to_client.segs.push_back(Seg::close(close, code));
                }
                c.to_client.finish = true;
            }
        }
        if !c.closed_backend && (backend_done || c.c2b.as_ref().is_none_or(Scanner::at_boundary)) {
            c.closed_backend = true;
            if c.backend.is_some() && !c.to_backend.finish {
                if !c.c2b.as_ref().is_some_and(Scanner::closed) {
                    let close = frame::close_frame(code, reason, Some(mask));
                    c.to_backend.segs.push_back(Seg::close(close, code));
                }
                c.to_backend.finish = true;
            }
        }
        if c.closed_client && c.closed_backend {
            c.phase = Phase::Closing;
        }
        self.flush(idx, true);
        self.flush(idx, false);
    }

    fn reject(&mut self, idx: u32, reject: Reject) {
        self.metrics.handshake(Some(reject.status));
        let close_timeout = self.config.timeouts.close;
        let c = self.conn(idx);
        c.to_client.segs.push_back(Seg::owned(reject.response()));
        c.to_client.finish = true;
        c.phase = Phase::Closing;
        c.deadline = Some(Instant::now() + close_timeout);
        if c.backend.is_some() {
            c.backend_eof = true;
            self.shut_backend(idx, libc::SHUT_RDWR);
        }
        self.flush(idx, true);
    }

    /// Shuts the backend socket (a direct descriptor: through the ring; the
    /// operation counts as in flight, so the slot is not freed under it).
    fn shut_backend(&mut self, idx: u32, how: i32) {
        let c = self.conn(idx);
        let Some(slot) = c.backend else { return };
        c.inflight += 1;
        let entry = opcode::Shutdown::new(types::Fixed(slot), how)
            .build()
            .user_data(ud(OP_SHUTDOWN, idx, c.generation));
        self.push(entry);
    }

    /// Ends a connection now: both sockets shut, so every pending
    /// operation completes and the slot can be freed.
    fn abort(&mut self, idx: u32) {
        let c = self.conns[idx as usize].as_mut().expect("live");
        c.phase = Phase::Closing;
        c.aborted = true;
        let mut bids = Vec::new();
        let mut unsent = [0; 2];
        for (queue, unsent) in [&mut c.to_client, &mut c.to_backend]
            .into_iter()
            .zip(&mut unsent)
        {
            // A segment being sent stays until its send completes.
            let keep = usize::from(queue.in_flight);
            for seg in queue.segs.drain(keep..) {
                *unsent += u64::from(seg.undelivered_close());
                if let Seg::Buf { bid, .. } = seg {
                    bids.push(bid);
                }
            }
        }
        // Shutting the socket ends its operations.
        socket::shut(&c.client, Shutdown::Both);
        self.count_undelivered(true, unsent[0]);
        self.count_undelivered(false, unsent[1]);
        for bid in bids {
            self.bufs.recycle(bid);
        }
        self.shut_backend(idx, libc::SHUT_RDWR);
    }

    fn on_eof(&mut self, idx: u32, from_client: bool) {
        let close_timeout = self.config.timeouts.close;
        let c = self.conn(idx);
        let backend_vanished = !from_client
            && c.phase == Phase::Relay
            && !c.closed_client
            && c.b2c
                .as_ref()
                .is_some_and(|s| !s.closed() && s.at_boundary());
        if backend_vanished {
            return self.backend_gone(idx);
        }
        match c.phase {
            Phase::Relay | Phase::PassThrough | Phase::Closing => {
                // Half-close: what was read goes out, then the write side of
                // the other peer shuts.
                let queue = if from_client {
                    &mut c.to_backend
                } else {
                    &mut c.to_client
                };
                queue.finish = true;
                if c.phase != Phase::Closing && c.client_eof && c.backend_eof {
                    c.phase = Phase::Closing;
                    c.deadline = Some(Instant::now() + close_timeout);
                }
                self.flush(idx, !from_client);
            }
            Phase::ClientHead | Phase::Connecting | Phase::BackendHead => {
                if from_client {
                    self.abort(idx);
                } else {
                    self.reject(
                        idx,
                        Reject {
                            status: 502,
                            reason: "backend closed during the handshake",
                        },
                    );
                }
            }
        }
    }

    /// The backend's stream ended between frames without a Close (it
    /// crashed, was reset, or shut its socket). Rather than pass on a bare
    /// FIN, which a client can only report as an abnormal closure (1006),
    /// weir closes the client with 1014 "bad gateway", the code for a proxy
    /// whose upstream failed. Nothing more goes to the backend. A stream
    /// that ended inside a frame cannot take a Close after it: the client
    /// gets the FIN then.
    fn backend_gone(&mut self, idx: u32) {
        let c = self.conn(idx);
        c.closed_backend = true;
        c.to_backend.finish = true;
        self.close_both(idx, frame::CLOSE_BAD_GATEWAY, "backend went away");
    }

    /// Starts the next send towards one peer if none is in flight.
    fn flush(&mut self, idx: u32, to_client: bool) {
        let buf_base = |bufs: &BufRing, bid: u16, start: u32| {
            bufs.buffer(bid, start as usize).as_ptr() as usize + start as usize
        };
        let c = self.conns[idx as usize].as_mut().expect("live");
        let generation = c.generation;
        let (queue, target, op) = if to_client {
            (
                &mut c.to_client,
                Some(Target::Fd(c.client.as_raw_fd())),
                OP_CLIENT_SEND,
            )
        } else {
            (
                &mut c.to_backend,
                c.backend.map(Target::Slot),
                OP_BACKEND_SEND,
            )
        };
        let Some(target) = target else { return };
        if queue.in_flight || c.aborted {
            return;
        }
        let (ptr, len) = match queue.segs.front() {
            Some(Seg::Buf { bid, start, end }) => (buf_base(&self.bufs, *bid, *start), end - start),
            Some(Seg::Owned { data, offset, .. }) => (
                data[*offset..].as_ptr() as usize,
                (data.len() - offset) as u32,
            ),
            None => {
                if queue.finish && !queue.shut {
                    queue.shut = true;
                    match target {
                        Target::Fd(_) => socket::shut(&c.client, Shutdown::Write),
                        Target::Slot(_) => self.shut_backend(idx, libc::SHUT_WR),
                    }
                }
                return;
            }
        };
        queue.in_flight = true;
        c.inflight += 1;
        let entry = target
            .send(ptr as *const u8, len)
            .user_data(ud(op, idx, generation));
        self.push(entry);
    }

    fn on_send(&mut self, idx: u32, to_client: bool, res: i32) {
        let c = self.conns[idx as usize].as_mut().expect("live");
        c.inflight -= 1;
        let queue = if to_client {
            &mut c.to_client
        } else {
            &mut c.to_backend
        };
        queue.in_flight = false;
        if res < 0 || c.aborted {
            // The peer is gone: drop what was queued for it.
            let mut bids = Vec::new();
            let mut unsent = 0;
            for seg in queue.segs.drain(..) {
                unsent += u64::from(seg.undelivered_close());
                if let Seg::Buf { bid, .. } = seg {
                    bids.push(bid);
                }
            }
            self.count_undelivered(to_client, unsent);
            for bid in bids {
                self.bufs.recycle(bid);
            }
            if !self.conn(idx).aborted {
                self.abort(idx);
            }
            return;
        }
        let sent = res as u32;
        let mut done = None;
        let mut written_close = None;
        match queue.segs.front_mut() {
            Some(Seg::Buf { bid, start, end }) => {
                *start += sent;
                if *start >= *end {
                    done = Some(*bid);
                }
            }
            Some(Seg::Owned {
                data,
                offset,
                close,
            }) => {
                *offset += sent as usize;
                if *offset >= data.len() {
                    written_close = *close;
                    queue.pop_sent();
                }
            }
            None => {}
        }
        if let Some(bid) = done {
            queue.pop_sent();
            self.bufs.recycle(bid);
        }
        if let Some(code) = written_close {
            let seen = if to_client {
                CloseSeen::SentToClient
            } else {
                CloseSeen::SentToBackend
            };
            self.metrics.close(seen, code);
        }
        self.flush(idx, to_client);
        self.backpressure(idx);
    }

    /// Stops reading from a peer whose data the other cannot take, and
    /// starts again once it drained.
    fn backpressure(&mut self, idx: u32) {
        let Some(c) = self.conns[idx as usize].as_mut() else {
            return;
        };
        if !matches!(c.phase, Phase::Relay | Phase::PassThrough) {
            return;
        }
        let generation = c.generation;
        let mut cancels = Vec::new();
        let mut arms = Vec::new();
        for (from_client, queue_len, armed) in [
            (true, c.to_backend.segs.len(), c.client_recv),
            (false, c.to_client.segs.len(), c.backend_recv),
        ] {
            let op = if from_client {
                OP_CLIENT_RECV
            } else {
                OP_BACKEND_RECV
            };
            if queue_len >= HIGH_WATER && armed {
                cancels.push(ud(op, idx, generation));
            } else if queue_len < HIGH_WATER / 2 && !armed {
                arms.push(from_client);
            }
        }
        for target in cancels {
            let entry = opcode::AsyncCancel::new(target)
                .build()
                .user_data(ud(OP_CANCEL, idx, generation));
            self.push(entry);
        }
        for from_client in arms {
            self.arm_recv(idx, from_client);
        }
    }

    /// Frees the slot once both peers are done with it and no operation
    /// of it is in flight (so the kernel touches none of its memory).
    fn maybe_free(&mut self, idx: u32) {
        let Some(c) = self.conns[idx as usize].as_ref() else {
            return;
        };
        let ended = c.phase == Phase::Closing
            && (c.aborted
                || (c.to_client.segs.is_empty()
                    && c.to_backend.segs.is_empty()
                    && c.client_eof
                    && (c.backend.is_none() || c.backend_eof)));
        if !ended || c.inflight > 0 {
            return;
        }
        let c = self.conns[idx as usize].take().expect("checked");
        if !c.over_limit {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(id) = c.backend_id
            && c.counted
            && let Some(n) = self.live.get_mut(&id)
        {
            *n = n.saturating_sub(1);
        }
        if let (true, Some(addr)) = (c.counted, c.backend_sockaddr) {
            self.metrics.disconnected(addr);
        }
        if let (true, Some(id)) = (c.counted, c.backend_id) {
            self.view.add_l7_connections(id, -1);
        }
        if let Some(slot) = c.backend {
            // Nothing is in flight: the socket closes with its last reference.
            let _ = self.ring.submitter().register_files_update(slot, &[-1]);
            self.slots.push(slot);
        }
        self.free.push(idx);
    }

    /// The drain window of a connection's service.
    fn drain_window_of(&self, idx: u32) -> Duration {
        let service = self.conns[idx as usize].as_ref().and_then(|c| c.service);
        service
            .and_then(|svc| {
                self.config
                    .service_drain
                    .iter()
                    .find(|(s, _)| *s == svc)
                    .map(|(_, w)| *w)
            })
            .unwrap_or(self.config.drain_window)
    }

    /// Schedules the drain of every relayed connection to a backend that
    /// stopped, spread over its service's drain window.
    fn schedule_drains(&mut self, stopped: &std::collections::BTreeSet<u32>) {
        let now_ms = self.start.elapsed().as_millis() as u64;
        let mut by_service: std::collections::BTreeMap<ServiceAddr, Vec<(u32, u32)>> =
            Default::default();
        for (i, c) in self.conns.iter().enumerate() {
            let Some(c) = c else { continue };
            if c.phase == Phase::Relay
                && c.backend_id.is_some_and(|id| stopped.contains(&id))
                && let Some(service) = c.service
            {
                by_service
                    .entry(service)
                    .or_default()
                    .push((i as u32, c.generation));
            }
        }
        for (service, conns) in by_service {
            let window = self
                .config
                .service_drain
                .iter()
                .find(|(s, _)| *s == service)
                .map_or(self.config.drain_window, |(_, w)| *w);
            self.drains
                .schedule(now_ms, window.as_millis() as u64, conns);
        }
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
        for i in 0..self.accept_paused.len() {
            if self.accept_paused[i] && self.accepting {
                self.accept_paused[i] = false;
                self.arm_accept(i);
            }
        }
        if self.shutdown_deadline.is_some_and(|d| Instant::now() >= d) {
            // Past `shutdown`: whatever is still open is cut.
            let open: Vec<u32> = (0..self.conns.len() as u32)
                .filter(|i| self.conns[*i as usize].is_some())
                .collect();
            for idx in open {
                if !self.conn(idx).aborted {
                    self.abort(idx);
                }
                self.maybe_free(idx);
            }
        }
        self.refresh_view();
        let now_ms = self.start.elapsed().as_millis() as u64;
        for (idx, generation) in self.drains.due(now_ms) {
            if self
                .conns
                .get(idx as usize)
                .and_then(|c| c.as_ref())
                .is_some_and(|c| c.generation == generation && c.phase == Phase::Relay)
            {
                self.close_both(idx, frame::CLOSE_GOING_AWAY, "going away");
            }
        }
        let pending = self
            .conns
            .iter()
            .flatten()
            .filter(|c| c.phase == Phase::Relay && c.pending_close.is_some())
            .count();
        self.metrics
            .drains_in_progress
            .store((self.drains.len() + pending) as u64, Ordering::Relaxed);
        let now = Instant::now();
        let idle = self.config.timeouts.idle;
        let ids: Vec<u32> = (0..self.conns.len() as u32)
            .filter(|i| self.conns[*i as usize].is_some())
            .collect();
        for idx in ids {
            let c = self.conn(idx);
            let expired = c.deadline.is_some_and(|d| now >= d);
            let phase = c.phase;
            let idle_out = phase == Phase::Relay
                && c.pending_close.is_none()
                && now.duration_since(c.last_activity) >= idle;
            let reads_client = matches!(
                phase,
                Phase::ClientHead
                    | Phase::Connecting
                    | Phase::BackendHead
                    | Phase::Relay
                    | Phase::Closing
            );
            if reads_client
                && !c.aborted
                && !c.client_recv
                && !c.client_eof
                && c.to_backend.segs.len() < HIGH_WATER / 2
            {
                self.arm_recv(idx, true);
            }
            let c = self.conn(idx);
            let reads_backend = matches!(
                phase,
                Phase::BackendHead | Phase::Relay | Phase::PassThrough | Phase::Closing
            );
            if reads_backend
                && !c.aborted
                && !c.backend_recv
                && !c.backend_eof
                && c.to_client.segs.len() < HIGH_WATER / 2
            {
                self.arm_recv(idx, false);
            }
            if idle_out {
                self.close_both(idx, frame::CLOSE_GOING_AWAY, "idle timeout");
                continue;
            }
            if let Some(every) = self.config.timeouts.ping_interval {
                self.keepalive(idx, now, every);
            }
            if !expired {
                continue;
            }
            match phase {
                Phase::ClientHead => {
                    self.reject(
                        idx,
                        Reject {
                            status: 408,
                            reason: "the request head took too long",
                        },
                    );
                }
                Phase::Connecting => {
                    // Cancelling the connect (by its tag, not its socket
                    // slot) fails it; on_connect then tries another backend.
                    self.hs(idx).timed_out = true;
                    let c = self.conn(idx);
                    c.deadline = None;
                    let target = ud(OP_CONNECT, idx, c.generation);
                    let entry = opcode::AsyncCancel::new(target).build().user_data(ud(
                        OP_CANCEL,
                        idx,
                        c.generation,
                    ));
                    self.push(entry);
                }
                Phase::BackendHead => self.reject(
                    idx,
                    Reject {
                        status: 504,
                        reason: "backend did not answer the handshake in time",
                    },
                ),
                // Relay has a deadline only while weir closes it (a peer
                // stuck mid-frame); pass-through has one for the answer.
                Phase::Closing | Phase::Relay | Phase::PassThrough => self.abort(idx),
            }
            self.maybe_free(idx);
        }
    }

    /// Drops the metrics series of backends that left the registry. A
    /// removed backend leaves it only once no worker holds a connection to
    /// it, so no worker still counts one.
    fn forget_departed_backends(&mut self) {
        let (view, metrics) = (&self.view, &self.metrics);
        self.metric_backends.retain(|addr, id| {
            let present = view.backend(*id).is_some_and(|b| b.addr == *addr);
            present || !metrics.forget_backend(*addr)
        });
    }

    /// Pings a quiet client every `every`, between frames, so dead peers
    /// and middleboxes that drop idle flows are found out; the client's
    /// Pong (passed on to the backend, which RFC 6455 allows for an
    /// unsolicited Pong) counts as activity.
    fn keepalive(&mut self, idx: u32, now: Instant, every: Duration) {
        let c = self.conn(idx);
        let due = c.phase == Phase::Relay
            && !c.closed_client
            && c.pending_close.is_none()
            && !c.to_client.finish
            && !c.b2c.as_ref().is_some_and(Scanner::closed)
            && now.duration_since(c.last_activity) >= every
            && now.duration_since(c.last_ping) >= every
            && c.b2c.as_ref().is_some_and(Scanner::at_boundary);
        if due {
            c.last_ping = now;
            c.to_client
                .segs
                .push_back(Seg::owned(frame::ping_frame(b"weir", None)));
            self.flush(idx, true);
        }
    }

    /// Re-reads the registry if it changed and drains the backends that
    /// stopped. A failed re-read leaves the worker on its last good state:
    /// that is counted every time and logged once per failing spell (and
    /// once when it works again), so stale routing never goes unnoticed.
    fn refresh_view(&mut self) {
        let failing = &self.metrics.registry_refresh_failing;
        match self.view.refresh() {
            Ok(changes) => {
                if failing.swap(false, Ordering::Relaxed) {
                    eprintln!("weir: {}: registry refresh works again", worker_name());
                }
                if let Some(changes) = changes {
                    self.schedule_drains(&changes.stopped);
                }
            }
            Err(e) => {
                self.metrics
                    .registry_refresh_errors
                    .fetch_add(1, Ordering::Relaxed);
                if !failing.swap(true, Ordering::Relaxed) {
                    eprintln!(
                        "weir: {}: registry refresh failed, routing on the last good state \
                         until it works (counted in weir_l7_registry_refresh_errors_total): {e}",
                        worker_name()
                    );
                }
            }
        }
    }

    /// Stops accepting and drains every connection over the shutdown
    /// window.
    fn shutdown(&mut self) {
        self.accepting = false;
        self.shutdown_deadline = Some(Instant::now() + self.config.timeouts.shutdown);
        for (fd, _) in &self.listeners {
            // Shutting the listening socket ends the accept.
            socket::shut(fd, Shutdown::Both);
        }
        let now_ms = self.start.elapsed().as_millis() as u64;
        let window = (self.config.timeouts.shutdown.as_millis() as u64) * 3 / 4;
        let conns: Vec<(u32, u32)> = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (i as u32, c.generation, c.phase)))
            .filter(|(_, _, p)| *p == Phase::Relay)
            .map(|(i, g, _)| (i, g))
            .collect();
        self.drains.schedule(now_ms, window, conns);
        let others: Vec<u32> = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                c.as_ref()
                    .filter(|c| c.phase != Phase::Relay && c.phase != Phase::Closing)
                    .map(|_| i as u32)
            })
            .collect();
        for idx in others {
            self.reject(
                idx,
                Reject {
                    status: 503,
                    reason: "shutting down",
                },
            );
        }
    }
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
    /// Each worker seeds from the kernel: seeds differ between calls (so
    /// between workers), and none is 0.
    #[test]
    fn workers_get_seeds_of_their_own() {
        let seeds: std::collections::BTreeSet<u64> = (0..64)
            .map(|_| super::os_random_seed().expect("getrandom"))
            .collect();
        assert_eq!(seeds.len(), 64);
        assert!(!seeds.contains(&0));
    }

    /// Every connection costs at least this much memory; keep it small:
    /// idle connections must cost almost nothing.
    #[test]
    fn a_connection_slot_stays_small() {
        let size = size_of::<Option<super::Conn>>();
        assert!(size <= 448, "Conn grew to {size} bytes");
    }
}
