//! One proxied WebSocket connection as a state machine, with no sockets,
//! no io_uring and no clock (the shape of quinn-proto's `Connection`). The
//! worker reports what happened with the `handle_*` methods, passing the
//! time in a [`Cx`], and carries out what the connection asks for with the
//! `poll_*` methods: bytes to send to a side, a receive to arm or cancel, a
//! connect to start, a socket to shut. Notable events (a refusal, a backend
//! that failed, a Close) and provided buffers to give back come out in the
//! [`Output`] the worker passes in, so that it turns them into counters in
//! one place.
//!
//! Relayed data is not copied: a receive's provided buffer is queued by its
//! number and sent from where the kernel wrote it.
//!
//! The lifecycle: the client's request head is read and checked
//! (`ClientHead`), a backend is picked and connected to (`Connecting`, more
//! than one on failure), the request goes out and the backend's answer is
//! checked (`BackendHead`), then frames are relayed both ways (`Relay`)
//! until a Close, a drain, a timeout or a broken rule; `Closing` flushes
//! what is queued and waits for both peers to end their streams.
//!
//! A relaying connection can be handed to another process (a binary
//! upgrade): [`Conn::quiesce`], then [`Conn::export`] to a [`Snapshot`]
//! and [`Conn::import`] there (`conn/snapshot.rs`).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use super::config::{Config, Listener};
use super::frame::{self, Direction, Limits as FrameLimits};
use super::handshake::{self, BackendResponse, Reject, UpgradeRequest, reject};
use super::relay::{Fed, Scanner};
use super::upstream::Attempts;
use crate::registry::ServiceAddr;

/// Buffers queued towards one peer before weir stops reading from the
/// other: the per-connection bound on data in flight. Reading resumes
/// below half of it.
pub const HIGH_WATER: usize = 16;
/// Bytes a client may send before its handshake completes.
const MAX_EARLY: usize = 64 * 1024;

/// One of the two peers of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    /// The peer on the other end of the proxy.
    pub fn other(self) -> Self {
        match self {
            Self::Client => Self::Backend,
            Self::Backend => Self::Client,
        }
    }
}

/// What a connection reports to its worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The backend accepted the upgrade: the connection relays.
    Upgraded { backend: u32 },
    /// The client got an HTTP refusal.
    Rejected { status: u16, reason: &'static str },
    /// Connected to the backend.
    Connected { backend: u32, addr: SocketAddr },
    /// The backend failed the upgrade: it answered with a server error
    /// (5xx), badly, not in time, or closed. A 4xx is the client's request
    /// refused, not this.
    UpgradeFailed { backend: u32 },
    /// A connect failed (refused, or cut for taking too long); the
    /// backend's socket is of no more use and another may be tried.
    ConnectFailed {
        backend: u32,
        addr: SocketAddr,
        timed_out: bool,
    },
    /// Frames and bytes relayed from one side in one read.
    Relayed {
        from: Side,
        frames: u32,
        bytes: usize,
    },
    /// A Close frame from a peer went by, with its code.
    CloseSeen { from: Side, code: u16 },
    /// weir's own Close was written whole to a peer.
    CloseSent { to: Side, code: u16 },
    /// weir's own Closes dropped from a queue before they were written.
    ClosesUndelivered { to: Side, count: u64 },
    /// weir is closing the WebSocket (drain, idle timeout, broken rule,
    /// backend gone).
    Closing { code: u16, reason: &'static str },
}

/// Where a connection puts what its worker must see, filled by every
/// `handle_*` call and emptied by the worker after it.
#[derive(Debug, Default)]
pub struct Output {
    pub events: Vec<Event>,
    /// Provided buffers the connection is done with.
    pub recycle: Vec<u16>,
}

/// What a connection needs from its worker for one call.
pub struct Cx<'a> {
    pub now: Instant,
    pub config: &'a Config,
    /// The routes of the listener the client came in on.
    pub routes: &'a Listener,
    /// A fresh random mask for a frame weir might send to the backend.
    pub mask: [u8; 4],
    pub out: &'a mut Output,
}

/// How a receive ended, or what it brought.
#[derive(Debug)]
pub enum Received<'a> {
    /// Bytes in provided buffer `bid`; the connection owns the buffer from
    /// here on (it queues it, or hands it back through [`Output`]).
    Data { bid: u16, bytes: &'a [u8] },
    /// The peer ended its stream.
    Eof,
    /// The socket failed (the peer reset it): its stream ended, and
    /// nothing more can reach the peer.
    Reset,
    /// The buffer pool was empty: data waits in the socket; reading
    /// resumes at the next [`Conn::handle_timeout`].
    NoBuffers,
    /// Cancelled for backpressure.
    Cancelled,
}

/// What the worker must do for a connection, besides sending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Pick a backend for the service (given the attempts so far, see
    /// [`Conn::attempts`]) and report it with [`Conn::handle_connecting`],
    /// or refuse with [`Conn::handle_reject`].
    Connect(ServiceAddr),
    /// Cut the connect in flight; it then completes with an error.
    CancelConnect,
    /// Arm a (multishot) receive from a side.
    Recv(Side),
    /// Cancel the receive from a side (its data would have nowhere to go).
    CancelRecv(Side),
    /// Shut both directions of a side's socket, ending its operations.
    Abort(Side),
}

/// The next piece of bytes to send to a side.
#[derive(Debug, PartialEq, Eq)]
pub enum Transmit<'a> {
    /// Bytes `start..start + len` of provided buffer `bid`.
    Buf { bid: u16, start: u32, len: u32 },
    /// Bytes weir wrote itself.
    Bytes(&'a [u8]),
    /// Nothing more goes to this side: shut its write direction.
    Finish,
    /// Everything for this side is sent and nothing more read from it
    /// could matter (its close handshake is done, or its socket or its
    /// client's failed): close its socket, which sends the FIN, and stop
    /// reading it, rather than shut it and wait for the end of its stream.
    Close,
}

/// The backend a connection uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    pub id: u32,
    pub addr: SocketAddr,
    /// The connect succeeded.
    pub connected: bool,
}

/// A piece of data queued towards one peer.
enum Seg {
    /// Bytes `start..end` of provided buffer `bid`, recycled once sent.
    Buf { bid: u16, start: u32, end: u32 },
    /// Bytes weir wrote itself (handshake answers, Close frames), from
    /// `offset` on. `close`: the code of weir's own Close frame, reported
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

/// One fact about a peer, as a bit of [`Peer::flags`]: a connection is
/// mostly idle state, and bits keep it small.
const RECV: u16 = 1;
/// That receive is being cancelled.
const CANCELLING: u16 = 1 << 1;
/// Reading waits for the next tick (the buffer pool ran dry).
const STARVED: u16 = 1 << 2;
/// This peer's stream ended.
const EOF: u16 = 1 << 3;
/// weir sent (or gave up sending) its own Close to this peer.
const CLOSED: u16 = 1 << 4;
/// This peer broke a framing rule: nothing more from it is relayed.
const FAILED: u16 = 1 << 5;
/// A send to this peer is in flight.
const IN_FLIGHT: u16 = 1 << 6;
/// No more data will be queued to this peer: shut its write side once
/// flushed.
const FINISH: u16 = 1 << 7;
/// Its write side is shut.
const SHUT: u16 = 1 << 8;
/// Its socket failed: what is queued for it can never go.
const GONE: u16 = 1 << 9;

/// What weir knows of one peer: what goes to it, and what comes from it.
#[derive(Default)]
struct Peer {
    /// Bytes queued towards this peer.
    segs: VecDeque<Seg>,
    /// The frames coming from this peer; Some once relaying.
    scanner: Option<Scanner>,
    /// `RECV` (a receive from it is armed), `EOF`... (the consts above).
    flags: u16,
    /// Segments at the front of `segs` that a send in flight carries.
    sending: u8,
}

impl Peer {
    fn is(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    fn set(&mut self, flag: u16, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    /// Drops the front segment, which was sent. An emptied queue also lets
    /// go of its storage: an idle connection then holds no heap memory for
    /// its queues (a few hundred bytes each otherwise, times every idle
    /// connection), at the price of one allocation when it talks again.
    fn pop_sent(&mut self) {
        self.segs.pop_front();
        if self.segs.is_empty() {
            self.segs = VecDeque::new();
        }
    }

    /// Drops what is queued for this peer, except the segments a send in
    /// flight carries (the kernel may still read them; they go when it
    /// completes); returns the Closes of weir's among what was dropped.
    fn drop_unsent(&mut self, recycle: &mut Vec<u16>) -> u64 {
        let keep = if self.is(IN_FLIGHT) {
            usize::from(self.sending)
        } else {
            0
        };
        let mut closes = 0;
        for seg in self.segs.drain(keep.min(self.segs.len())..) {
            closes += u64::from(seg.undelivered_close());
            if let Seg::Buf { bid, .. } = seg {
                recycle.push(bid);
            }
        }
        closes
    }

    fn scanner_closed(&self) -> bool {
        self.scanner.as_ref().is_some_and(Scanner::closed)
    }

    fn at_boundary(&self) -> bool {
        self.scanner.as_ref().is_none_or(Scanner::at_boundary)
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
    attempts: Attempts,
}

/// One-shot orders for the worker, taken by [`Conn::poll_action`].
const WANT_CONNECT: u8 = 1;
const CANCEL_CONNECT: u8 = 2;
const ABORT_CLIENT: u8 = 4;
const ABORT_BACKEND: u8 = 8;

/// One proxied connection, from the accepted client socket to the end of
/// both streams (see the module docs).
pub struct Conn {
    phase: Phase,
    /// Some until the connection relays.
    hs: Option<Box<Handshake>>,
    service: Option<ServiceAddr>,
    backend: Option<Backend>,
    client: Peer,
    server: Peer,
    deadline: Option<Instant>,
    last_activity: Instant,
    /// When weir last sent the client a keepalive ping.
    last_ping: Instant,
    /// weir is closing this WebSocket with this code and reason; each peer
    /// gets its Close at its next frame boundary. The reason is owned only
    /// in a connection handed over from another process.
    pending_close: Option<(u16, Cow<'static, str>)>,
    /// Ended by weir: nothing more is sent, everything is let go.
    aborted: bool,
    /// Being handed to another process: no receive or send starts.
    quiet: bool,
    /// Orders not yet taken by the worker.
    orders: u8,
}

impl Conn {
    /// A client connection from `peer`, accepted at `now`: its request
    /// head is awaited.
    pub fn new(now: Instant, config: &Config, peer: SocketAddr) -> Self {
        Self {
            phase: Phase::ClientHead,
            hs: Some(Box::new(Handshake {
                peer,
                head: Vec::new(),
                early: Vec::new(),
                request: None,
                attempts: Attempts::default(),
            })),
            service: None,
            backend: None,
            client: Peer::default(),
            server: Peer::default(),
            deadline: Some(now + config.timeouts.client_head),
            last_activity: now,
            last_ping: now,
            pending_close: None,
            aborted: false,
            quiet: false,
            orders: 0,
        }
    }

    fn peer(&mut self, side: Side) -> &mut Peer {
        match side {
            Side::Client => &mut self.client,
            Side::Backend => &mut self.server,
        }
    }

    fn peer_ref(&self, side: Side) -> &Peer {
        match side {
            Side::Client => &self.client,
            Side::Backend => &self.server,
        }
    }

    fn hs(&mut self) -> &mut Handshake {
        self.hs.as_mut().expect("a handshaking connection")
    }

    /// The service the request was routed to.
    pub fn service(&self) -> Option<ServiceAddr> {
        self.service
    }

    /// The backend in use (being connected to, or connected).
    pub fn backend(&self) -> Option<Backend> {
        self.backend
    }

    /// The attempts to connect so far (empty once connected).
    pub fn attempts(&self) -> Option<&Attempts> {
        self.hs.as_ref().map(|hs| &hs.attempts)
    }

    /// In the relay phase (weir's own Close may be on its way: see
    /// [`Conn::is_draining`]).
    pub fn is_relaying(&self) -> bool {
        self.phase == Phase::Relay
    }

    /// Relaying, with weir's Close on its way.
    pub fn is_draining(&self) -> bool {
        self.phase == Phase::Relay && self.pending_close.is_some()
    }

    /// Still in the handshake (not relaying, not closing).
    pub fn is_handshaking(&self) -> bool {
        !matches!(self.phase, Phase::Relay | Phase::Closing)
    }

    #[cfg(test)]
    pub fn is_aborted(&self) -> bool {
        self.aborted
    }

    /// Both peers are done: once none of its operations is in flight, the
    /// connection can be freed.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Closing
            && (self.aborted
                || (self.client.segs.is_empty()
                    && self.server.segs.is_empty()
                    && self.client.is(EOF)
                    && (self.backend.is_none() || self.server.is(EOF))))
    }

    /// When [`Conn::handle_timeout`] has something to do next: a deadline
    /// of the phase, the idle timeout, the next keepalive ping, or (a read
    /// that found no buffer) at once. The worker files the connection in
    /// its timer wheel under this; between now and then the connection
    /// needs no tick.
    pub fn poll_timeout(&self, config: &Config) -> Option<Instant> {
        if self.client.is(STARVED) || self.server.is(STARVED) {
            // Any time not after now: the next tick.
            return Some(self.last_activity);
        }
        let mut next = self.deadline;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if self.phase == Phase::Relay && self.pending_close.is_none() {
            at(self.last_activity + config.timeouts.idle);
            if let Some(every) = config.timeouts.ping_interval {
                at(self.last_activity.max(self.last_ping) + every);
            }
        }
        next
    }

    /// The next order for the worker.
    pub fn poll_action(&mut self) -> Option<Action> {
        for (bit, action) in [
            (ABORT_CLIENT, Action::Abort(Side::Client)),
            (ABORT_BACKEND, Action::Abort(Side::Backend)),
            (CANCEL_CONNECT, Action::CancelConnect),
        ] {
            if self.orders & bit != 0 {
                self.orders &= !bit;
                return Some(action);
            }
        }
        if self.orders & WANT_CONNECT != 0 {
            self.orders &= !WANT_CONNECT;
            return Some(Action::Connect(self.service.expect("routed")));
        }
        for side in [Side::Client, Side::Backend] {
            if self.wants_recv(side) {
                self.peer(side).set(RECV, true);
                return Some(Action::Recv(side));
            }
            if self.overflowing(side) {
                self.peer(side).set(CANCELLING, true);
                return Some(Action::CancelRecv(side));
            }
        }
        None
    }

    /// Whether a receive from `side` should be armed: it is connected,
    /// its stream goes on, and the other peer's queue has room.
    fn wants_recv(&self, side: Side) -> bool {
        let p = self.peer_ref(side);
        if self.aborted || self.quiet || p.is(RECV) || p.is(EOF) || p.is(STARVED) {
            return false;
        }
        let connected = match side {
            Side::Client => true,
            Side::Backend => {
                self.backend.is_some_and(|b| b.connected)
                    && matches!(
                        self.phase,
                        Phase::BackendHead | Phase::Relay | Phase::PassThrough | Phase::Closing
                    )
            }
        };
        connected && self.peer_ref(side.other()).segs.len() < HIGH_WATER / 2
    }

    /// Whether nothing more read from `side` could matter once what is
    /// queued for it is sent, so that weir closes its socket rather than
    /// shut it and wait for its end: it sent its Close and got one (relayed
    /// from the other peer, or weir's own); or its socket failed; or it is
    /// the backend of a client whose socket failed, with no one left to
    /// read what it would send.
    fn done_reading(&self, side: Side) -> bool {
        let peer = self.peer_ref(side);
        let other = self.peer_ref(side.other());
        let handshake = matches!(self.phase, Phase::Relay | Phase::Closing)
            && peer.scanner_closed()
            && (peer.is(CLOSED) || other.scanner_closed());
        handshake || peer.is(GONE) || (side == Side::Backend && other.is(GONE))
    }

    /// Whether the receive from `side` must stop: the other peer cannot
    /// take its data.
    fn overflowing(&self, side: Side) -> bool {
        let p = self.peer_ref(side);
        p.is(RECV)
            && !p.is(CANCELLING)
            && (self.quiet
                || (matches!(self.phase, Phase::Relay | Phase::PassThrough)
                    && self.peer_ref(side.other()).segs.len() >= HIGH_WATER))
    }

    /// The next bytes to send to `side`, if no send to it is in flight.
    /// The send is in flight from here until [`Conn::handle_sent`].
    pub fn poll_transmit(&mut self, side: Side) -> Option<Transmit<'_>> {
        if self.aborted || self.quiet || (side == Side::Backend && self.backend.is_none()) {
            return None;
        }
        let done = self.done_reading(side);
        let peer = self.peer(side);
        if peer.is(IN_FLIGHT) {
            return None;
        }
        if peer.segs.is_empty() {
            if peer.is(FINISH) && !peer.is(SHUT) {
                peer.set(SHUT, true);
                if done {
                    peer.set(EOF, true);
                    return Some(Transmit::Close);
                }
                return Some(Transmit::Finish);
            }
            return None;
        }
        peer.set(IN_FLIGHT, true);
        peer.sending = 1;
        Some(match peer.segs.front()? {
            Seg::Buf { bid, start, end } => Transmit::Buf {
                bid: *bid,
                start: *start,
                len: end - start,
            },
            Seg::Owned { data, offset, .. } => Transmit::Bytes(&data[*offset..]),
        })
    }

    /// After [`Conn::poll_transmit`] gave the first piece of a send to
    /// `side`: the pieces queued behind it, up to `max` more, which the
    /// same send may carry (one gathering send instead of one each). Those
    /// taken are in flight with the first until [`Conn::handle_sent`].
    pub fn gather(&mut self, side: Side, max: usize, mut take: impl FnMut(Transmit<'_>)) {
        let peer = self.peer(side);
        if !peer.is(IN_FLIGHT) || peer.sending != 1 {
            return;
        }
        let more = peer.segs.len().saturating_sub(1).min(max);
        for seg in peer.segs.iter().skip(1).take(more) {
            take(match seg {
                Seg::Buf { bid, start, end } => Transmit::Buf {
                    bid: *bid,
                    start: *start,
                    len: end - start,
                },
                Seg::Owned { data, offset, .. } => Transmit::Bytes(&data[*offset..]),
            });
        }
        peer.sending += more as u8;
    }

    /// A receive from `side` completed; `more`: it stays armed.
    pub fn handle_recv(&mut self, cx: &mut Cx, side: Side, received: Received, more: bool) {
        if !more {
            let p = self.peer(side);
            p.set(RECV, false);
            p.set(CANCELLING, false);
        }
        let (bid, bytes) = match received {
            // Read just before weir closed this side: past its Close.
            Received::Data { bid, .. } if self.peer_ref(side).is(EOF) => {
                return cx.out.recycle.push(bid);
            }
            Received::Data { bid, bytes } => (bid, bytes),
            Received::NoBuffers => {
                self.peer(side).set(STARVED, true);
                return;
            }
            // Re-armed once the other side drained (which may already be
            // the case).
            Received::Cancelled => return,
            Received::Eof => {
                self.peer(side).set(EOF, true);
                return self.on_eof(cx, side);
            }
            Received::Reset => {
                let p = self.peer(side);
                p.set(EOF, true);
                p.set(GONE, true);
                self.drop_queue(cx, side);
                return self.on_eof(cx, side);
            }
        };
        self.last_activity = cx.now;
        match (self.phase, side) {
            (Phase::ClientHead, Side::Client) => {
                self.hs().head.extend_from_slice(bytes);
                cx.out.recycle.push(bid);
                self.try_request(cx);
            }
            (Phase::Connecting | Phase::BackendHead, Side::Client) => {
                cx.out.recycle.push(bid);
                let hs = self.hs();
                hs.early.extend_from_slice(bytes);
                if hs.early.len() > MAX_EARLY {
                    self.abort(cx);
                }
            }
            (Phase::BackendHead, Side::Backend) => {
                self.hs().head.extend_from_slice(bytes);
                cx.out.recycle.push(bid);
                self.try_response(cx);
            }
            (Phase::Relay, _) => self.relay(cx, side, bid, bytes),
            (Phase::PassThrough, Side::Backend) => {
                self.client.segs.push_back(Seg::Buf {
                    bid,
                    start: 0,
                    end: bytes.len() as u32,
                });
            }
            _ => cx.out.recycle.push(bid),
        }
    }

    /// A send to `side` completed with `result` (bytes written, or the
    /// send failed: the peer is gone).
    pub fn handle_sent(&mut self, cx: &mut Cx, side: Side, result: io::Result<u32>) {
        let aborted = self.aborted;
        let peer = self.peer(side);
        peer.set(IN_FLIGHT, false);
        // The send carried the first `carried` segments, in order; it may
        // have taken only part of them.
        let carried = std::mem::take(&mut peer.sending);
        let sent = match result {
            Ok(n) if !aborted => n,
            _ => {
                // The peer is gone: drop what was queued for it.
                self.drop_queue(cx, side);
                if !self.aborted {
                    self.abort(cx);
                }
                return;
            }
        };
        let mut sent = sent as usize;
        let mut returned = false;
        for _ in 0..carried {
            if sent == 0 {
                break;
            }
            match peer.segs.front_mut() {
                Some(Seg::Buf { bid, start, end }) => {
                    let took = sent.min((*end - *start) as usize);
                    *start += took as u32;
                    sent -= took;
                    if *start >= *end {
                        cx.out.recycle.push(*bid);
                        peer.pop_sent();
                        returned = true;
                    }
                }
                Some(Seg::Owned {
                    data,
                    offset,
                    close,
                }) => {
                    let took = sent.min(data.len() - *offset);
                    *offset += took;
                    sent -= took;
                    if *offset >= data.len() {
                        if let Some(code) = *close {
                            cx.out.events.push(Event::CloseSent { to: side, code });
                        }
                        peer.pop_sent();
                    }
                }
                None => break,
            }
        }
        if returned {
            // A buffer went back to the pool: reads that found it empty
            // may try again now rather than at the tick.
            self.client.set(STARVED, false);
            self.server.set(STARVED, false);
        }
    }

    /// The worker picked backend `id` at `addr` and started connecting.
    pub fn handle_connecting(&mut self, cx: &mut Cx, id: u32, addr: SocketAddr) {
        self.backend = Some(Backend {
            id,
            addr,
            connected: false,
        });
        self.phase = Phase::Connecting;
        self.deadline = Some(cx.now + cx.config.timeouts.connect);
        self.hs().attempts.start(id);
    }

    /// The connect completed: connected, or failed (refused, or cancelled
    /// for taking too long).
    pub fn handle_connected(&mut self, cx: &mut Cx, connected: bool) {
        if self.phase != Phase::Connecting {
            return;
        }
        if !connected {
            let timed_out = self.hs().attempts.timed_out();
            let backend = self.backend.take().expect("connecting");
            cx.out.events.push(Event::ConnectFailed {
                backend: backend.id,
                addr: backend.addr,
                timed_out,
            });
            self.orders |= WANT_CONNECT;
            return;
        }
        let backend = self.backend.as_mut().expect("connecting");
        backend.connected = true;
        let (id, addr) = (backend.id, backend.addr);
        let hs = self.hs();
        let req = hs.request.as_ref().expect("handshake parsed");
        let forwarded = handshake::forward_request(req, hs.peer.ip(), "http");
        // Connected: what only connecting needed goes.
        hs.attempts = Attempts::default();
        self.server.segs.push_back(Seg::owned(forwarded));
        self.phase = Phase::BackendHead;
        self.deadline = Some(cx.now + cx.config.timeouts.backend_head);
        cx.out.events.push(Event::Connected { backend: id, addr });
    }

    /// The worker refuses the client (no backend to try, out of sockets,
    /// shutting down).
    pub fn handle_reject(&mut self, cx: &mut Cx, reject: Reject) {
        self.reject(cx, reject);
    }

    /// weir closes the WebSocket with `code` (a drain).
    pub fn handle_close(&mut self, cx: &mut Cx, code: u16, reason: &'static str) {
        if self.phase == Phase::Relay {
            self.close_both(cx, code, reason);
        }
    }

    /// The connection is to be handed to another process: from here on no
    /// receive or send starts and armed receives are cancelled, so that
    /// once the operations in flight complete it is
    /// [`movable`](Conn::movable). Events still come in (a receive that
    /// lands before its cancel is relayed and queued as usual).
    pub fn quiesce(&mut self) {
        self.quiet = true;
    }

    /// The handover did not happen: the connection goes on here.
    pub fn resume(&mut self) {
        self.quiet = false;
    }

    /// The worker stops: a connection still in its handshake is refused.
    /// One passing a backend's refusal through already has its answer.
    pub fn handle_shutdown(&mut self, cx: &mut Cx) {
        if self.is_handshaking() && self.phase != Phase::PassThrough {
            self.reject(cx, reject(503, "shutting down"));
        }
    }

    /// The worker ends the connection now (its shutdown window is over).
    pub fn handle_abort(&mut self, cx: &mut Cx) {
        if !self.aborted {
            self.abort(cx);
        }
    }

    /// The tick: deadlines, the idle timeout, keepalive pings, and reads
    /// that waited for buffers.
    pub fn handle_timeout(&mut self, cx: &mut Cx) {
        let now = cx.now;
        self.client.set(STARVED, false);
        self.server.set(STARVED, false);
        let expired = self.deadline.is_some_and(|d| now >= d);
        let idle_out = self.phase == Phase::Relay
            && self.pending_close.is_none()
            && now.duration_since(self.last_activity) >= cx.config.timeouts.idle;
        if idle_out {
            return self.close_both(cx, frame::CLOSE_GOING_AWAY, "idle timeout");
        }
        if let Some(every) = cx.config.timeouts.ping_interval {
            self.keepalive(now, every);
        }
        if !expired {
            return;
        }
        match self.phase {
            Phase::ClientHead => self.reject(cx, reject(408, "the request head took too long")),
            Phase::Connecting => {
                // The cancelled connect fails; another backend is tried.
                self.hs().attempts.time_out();
                self.deadline = None;
                self.orders |= CANCEL_CONNECT;
            }
            Phase::BackendHead => {
                self.upgrade_failed(cx);
                self.reject(
                    cx,
                    reject(504, "backend did not answer the handshake in time"),
                )
            }
            // Relay has a deadline only while weir closes it (a peer
            // stuck mid-frame); pass-through has one for the answer.
            Phase::Closing | Phase::Relay | Phase::PassThrough => self.abort(cx),
        }
    }

    fn try_request(&mut self, cx: &mut Cx) {
        let limits = handshake::Limits {
            max_head: cx.config.limits.max_head_bytes,
            max_headers: cx.config.limits.max_headers,
        };
        let req = match handshake::parse_request(&self.hs().head, &limits) {
            Ok(None) => return,
            Ok(Some(req)) => req,
            Err(reject) => return self.reject(cx, reject),
        };
        let Some(service) = cx.routes.route(&req.host, &req.path) else {
            return self.reject(cx, reject(404, "no route for this host and path"));
        };
        self.service = Some(service);
        let hs = self.hs();
        hs.early = hs.head.split_off(req.head_len);
        hs.head = Vec::new();
        hs.request = Some(req);
        self.orders |= WANT_CONNECT;
    }

    fn try_response(&mut self, cx: &mut Cx) {
        let limits = handshake::Limits {
            max_head: cx.config.limits.max_head_bytes,
            max_headers: cx.config.limits.max_headers,
        };
        let hs = self.hs();
        let key = &hs.request.as_ref().expect("parsed").key;
        match handshake::parse_response(&hs.head, key, &limits) {
            Ok(None) => {}
            Err(reject) => {
                self.upgrade_failed(cx);
                self.reject(cx, reject)
            }
            Ok(Some(BackendResponse::Other { status, .. })) => {
                if status >= 500 {
                    self.upgrade_failed(cx);
                }
                let head = std::mem::take(&mut self.hs().head);
                self.client.segs.push_back(Seg::owned(head));
                self.phase = Phase::PassThrough;
                // The answer gets as long as the handshake did.
                self.deadline = Some(cx.now + cx.config.timeouts.backend_head);
            }
            Ok(Some(BackendResponse::Upgraded {
                head,
                head_len,
                rsv1,
                ..
            })) => {
                let limits = FrameLimits {
                    max_frame: cx.config.limits.max_frame,
                    max_message: cx.config.limits.max_message,
                };
                // Relaying from here on: the handshake state goes.
                let mut hs = self.hs.take().expect("a handshaking connection");
                let after = hs.head.split_off(head_len);
                let early = std::mem::take(&mut hs.early);
                drop(hs);
                self.client.segs.push_back(Seg::owned(head));
                self.client.scanner = Some(Scanner::new(Direction::ClientToServer, rsv1, limits));
                self.server.scanner = Some(Scanner::new(Direction::ServerToClient, rsv1, limits));
                self.phase = Phase::Relay;
                self.deadline = None;
                let backend = self.backend.expect("connected").id;
                cx.out.events.push(Event::Upgraded { backend });
                if !after.is_empty() {
                    self.relay_owned(cx, Side::Backend, after);
                }
                if !early.is_empty() {
                    self.relay_owned(cx, Side::Client, early);
                }
            }
        }
    }

    /// Reports that the backend in use failed the upgrade.
    fn upgrade_failed(&self, cx: &mut Cx) {
        if let Some(b) = self.backend {
            cx.out.events.push(Event::UpgradeFailed { backend: b.id });
        }
    }

    /// Reports what passed in one read.
    fn count_fed(cx: &mut Cx, from: Side, fed: &Fed) {
        cx.out.events.push(Event::Relayed {
            from,
            frames: fed.frames,
            bytes: fed.pass,
        });
        for &code in &fed.closes {
            cx.out.events.push(Event::CloseSeen { from, code });
        }
    }

    /// Relays bytes weir holds (not in a provided buffer).
    fn relay_owned(&mut self, cx: &mut Cx, from: Side, data: Vec<u8>) {
        let mut fed = self
            .peer(from)
            .scanner
            .as_mut()
            .expect("relaying")
            .feed(&data);
        let peer = self.peer(from.other());
        if let Some(h) = fed.held.take() {
            peer.segs.push_back(Seg::owned(h));
        }
        if fed.pass > 0 {
            peer.segs.push_back(Seg::owned(data[..fed.pass].to_vec()));
        }
        Self::count_fed(cx, from, &fed);
        if let Some(v) = fed.violation {
            self.fail(cx, from, v.code, v.reason);
        }
    }

    fn relay(&mut self, cx: &mut Cx, from: Side, bid: u16, data: &[u8]) {
        // After weir's own Close to a peer, nothing more goes to it.
        if self.peer_ref(from.other()).is(CLOSED) || self.peer_ref(from).is(FAILED) {
            cx.out.recycle.push(bid);
            return;
        }
        let mut fed = self
            .peer(from)
            .scanner
            .as_mut()
            .expect("relaying")
            .feed(data);
        let peer = self.peer(from.other());
        if let Some(h) = fed.held.take() {
            peer.segs.push_back(Seg::owned(h));
        }
        if fed.pass > 0 {
            peer.segs.push_back(Seg::Buf {
                bid,
                start: 0,
                end: fed.pass as u32,
            });
        } else {
            cx.out.recycle.push(bid);
        }
        Self::count_fed(cx, from, &fed);
        match fed.violation {
            Some(v) => self.fail(cx, from, v.code, v.reason),
            None => self.try_close(cx),
        }
    }

    /// A peer broke a rule: nothing more from it passes, and both sides
    /// get a Close with the rule's code.
    fn fail(&mut self, cx: &mut Cx, from: Side, code: u16, reason: &'static str) {
        self.peer(from).set(FAILED, true);
        self.close_both(cx, code, reason);
    }

    /// weir closes the WebSocket on both sides with `code`. Each Close goes
    /// out at a frame boundary of the bytes flowing to that peer: if a frame
    /// towards it is half sent, the rest of that frame is relayed first.
    /// What does not finish within the close timeout is cut.
    fn close_both(&mut self, cx: &mut Cx, code: u16, reason: &'static str) {
        if self.pending_close.is_none() {
            self.pending_close = Some((code, Cow::Borrowed(reason)));
            self.deadline = Some(cx.now + cx.config.timeouts.close);
            cx.out.events.push(Event::Closing { code, reason });
        }
        self.try_close(cx);
    }

    /// Sends the pending Close to each peer whose incoming frames are at a
    /// boundary; once both have theirs, the connection is closing.
    fn try_close(&mut self, cx: &mut Cx) {
        // Out while the peers are borrowed; it stays pending.
        let Some((code, reason)) = self.pending_close.take() else {
            return;
        };
        let has_backend = self.backend.is_some();
        // The frames towards the client come from the backend, and the
        // other way round.
        for (to, mask) in [(Side::Client, None), (Side::Backend, Some(cx.mask))] {
            let source_closed = self.peer_ref(to.other()).scanner_closed();
            let source_at_boundary = self.peer_ref(to.other()).at_boundary();
            let reachable = to == Side::Client || has_backend;
            let p = self.peer(to);
            // A peer that sent its own Close, or whose write side is shut,
            // gets nothing more.
            let done = !reachable || p.is(FINISH) || source_closed;
            if p.is(CLOSED) || !(done || source_at_boundary) {
                continue;
            }
            p.set(CLOSED, true);
            if reachable && !p.is(FINISH) {
                if !source_closed {
                    let close = frame::close_frame(code, &reason, mask);
                    p.segs.push_back(Seg::close(close, code));
                }
                p.set(FINISH, true);
            }
        }
        self.pending_close = Some((code, reason));
        if self.client.is(CLOSED) && self.server.is(CLOSED) {
            self.phase = Phase::Closing;
        }
    }

    fn reject(&mut self, cx: &mut Cx, reject: Reject) {
        cx.out.events.push(Event::Rejected {
            status: reject.status,
            reason: reject.reason,
        });
        self.client.segs.push_back(Seg::owned(reject.response()));
        self.client.set(FINISH, true);
        self.phase = Phase::Closing;
        self.deadline = Some(cx.now + cx.config.timeouts.close);
        if self.backend.is_some() {
            self.server.set(EOF, true);
            self.orders |= ABORT_BACKEND;
        }
    }

    /// Ends the connection now: both sockets shut, so every pending
    /// operation completes and the connection can be freed.
    fn abort(&mut self, cx: &mut Cx) {
        self.phase = Phase::Closing;
        self.aborted = true;
        for side in [Side::Client, Side::Backend] {
            self.drop_queue(cx, side);
        }
        self.orders |= ABORT_CLIENT | ABORT_BACKEND;
    }

    /// Drops what waits for `side` and can never go, counting weir's own
    /// Closes among it as undelivered.
    fn drop_queue(&mut self, cx: &mut Cx, side: Side) {
        let count = self.peer(side).drop_unsent(&mut cx.out.recycle);
        if count > 0 {
            cx.out
                .events
                .push(Event::ClosesUndelivered { to: side, count });
        }
    }

    fn on_eof(&mut self, cx: &mut Cx, from: Side) {
        let backend_vanished = from == Side::Backend
            && self.phase == Phase::Relay
            && !self.client.is(CLOSED)
            && self
                .server
                .scanner
                .as_ref()
                .is_some_and(|s| !s.closed() && s.at_boundary());
        if backend_vanished {
            return self.backend_gone(cx);
        }
        match self.phase {
            Phase::Relay | Phase::PassThrough | Phase::Closing => {
                // Half-close: what was read goes out, then the write side of
                // the other peer shuts; or, once its close handshake is
                // done, its socket closes and nothing more is read from it.
                let other = from.other();
                self.peer(other).set(FINISH, true);
                if self.done_reading(other) {
                    self.peer(other).set(EOF, true);
                }
                if self.phase != Phase::Closing && self.client.is(EOF) && self.server.is(EOF) {
                    self.phase = Phase::Closing;
                    self.deadline = Some(cx.now + cx.config.timeouts.close);
                }
            }
            Phase::ClientHead | Phase::Connecting | Phase::BackendHead => match from {
                Side::Client => self.abort(cx),
                Side::Backend => {
                    self.upgrade_failed(cx);
                    self.reject(cx, reject(502, "backend closed during the handshake"))
                }
            },
        }
    }

    /// The backend's stream ended between frames without a Close (it
    /// crashed, was reset, or shut its socket). Rather than pass on a bare
    /// FIN, which a client can only report as an abnormal closure (1006),
    /// weir closes the client with 1014 "bad gateway", the code for a proxy
    /// whose upstream failed. Nothing more goes to the backend. A stream
    /// that ended inside a frame cannot take a Close after it: the client
    /// gets the FIN then.
    fn backend_gone(&mut self, cx: &mut Cx) {
        self.server.set(CLOSED, true);
        self.server.set(FINISH, true);
        self.close_both(cx, frame::CLOSE_BAD_GATEWAY, "backend went away");
    }

    /// Pings a quiet client every `every`, between frames, so dead peers
    /// and middleboxes that drop idle flows are found out; the client's
    /// Pong (passed on to the backend, which RFC 6455 allows for an
    /// unsolicited Pong) counts as activity.
    fn keepalive(&mut self, now: Instant, every: std::time::Duration) {
        let due = self.phase == Phase::Relay
            && !self.client.is(CLOSED)
            && self.pending_close.is_none()
            && !self.client.is(FINISH)
            && !self.server.scanner_closed()
            && now.duration_since(self.last_activity) >= every
            && now.duration_since(self.last_ping) >= every
            && self
                .server
                .scanner
                .as_ref()
                .is_some_and(Scanner::at_boundary);
        if due {
            self.last_ping = now;
            self.client
                .segs
                .push_back(Seg::owned(frame::ping_frame(b"weir", None)));
        }
    }
}

mod snapshot;
#[cfg(test)]
mod tests;

pub use snapshot::{
    InvalidSnapshot, MAX_QUEUED_BYTES, MAX_QUEUED_PIECES, NotMovable, PeerFlags, PeerSnapshot,
    Queued, Settings, Snapshot,
};
