//! A relaying connection as plain data, so that another `weir run` process
//! (a binary upgrade) can go on with it: [`Conn::export`] here, the
//! sockets passed beside it, [`Conn::import`] there. `l7/handoff.rs` puts
//! snapshots on the wire.
//!
//! The handover happens at any point of the stream, not at frame
//! boundaries: a long or never-ending message in one direction may not
//! reach a boundary for as long as the takeover may wait, and the state
//! that makes a boundary matter is small and fully captured (per
//! direction the scanner: the open message's length, the bytes of a header
//! or Close not complete yet, the payload still to come, whether a Close
//! went by). Bytes in the kernel's socket buffers stay there and are read
//! by the new process; bytes weir read and has not sent yet travel in the
//! snapshot, with weir's own Close frames marked so the new process
//! reports them when they are written.
//!
//! Only a relaying connection moves: one in its handshake finishes it
//! where it started (it is short, and bounded by the handshake timeouts),
//! and so does one closing (bounded by the close timeout). No operation
//! may be in flight: the kernel could still be writing to a receive buffer
//! or reading from a queued one, and provided buffers belong to the old
//! process's ring, so queued ones are copied out.
//!
//! Instants do not cross processes: deadlines and the idle and ping clocks
//! travel as durations from the export. A connection keeps the settings
//! it was accepted with (as across a reload), so they travel too.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{
    Backend, CANCELLING, CLOSED, Conn, EOF, FAILED, FINISH, GONE, IN_FLIGHT, Peer, Phase, RECV,
    SHUT, Seg, Side,
};
use crate::config_file::MAX_DURATION;
use crate::l7::config::Config;
use crate::l7::frame::{Direction, Limits as FrameLimits, MAX_CLOSE_REASON};
use crate::l7::relay::{Scanner, ScannerState};
use crate::registry::ServiceAddr;

/// Pieces queued towards one peer that a handover carries. Reading stops
/// at [`super::HIGH_WATER`] buffers; this leaves room for what arrives
/// before the receive is cancelled and for weir's own frames.
pub const MAX_QUEUED_PIECES: usize = 1024;
/// Bytes queued towards one peer that a handover carries: `HIGH_WATER`
/// buffers of the largest size (1 MiB), twice.
pub const MAX_QUEUED_BYTES: usize = 32 << 20;

/// What of its configuration a relaying connection still reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    pub idle: Duration,
    pub ping_interval: Option<Duration>,
    /// The close handshake's bound.
    pub close: Duration,
    pub limits: FrameLimits,
}

impl Settings {
    /// `base` (the new process's configuration) with these settings: the
    /// configuration a handed-over connection runs with.
    pub fn apply(&self, base: &Config) -> Config {
        let mut config = base.clone();
        config.timeouts.idle = self.idle;
        config.timeouts.ping_interval = self.ping_interval;
        config.timeouts.close = self.close;
        config.limits.max_frame = self.limits.max_frame;
        config.limits.max_message = self.limits.max_message;
        config
    }
}

/// The state bits of a peer that outlive a handover. Those about
/// operations (a receive armed or being cancelled, a send in flight) are
/// clear in a movable connection; a read that found the old process's
/// buffer pool empty is retried at once by the new one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerFlags {
    /// Its stream ended.
    pub eof: bool,
    /// weir sent (or gave up sending) its own Close to it.
    pub closed: bool,
    /// It broke a framing rule: nothing more from it is relayed.
    pub failed: bool,
    /// Its write side shuts once its queue is sent.
    pub finish: bool,
    /// Its write side is shut.
    pub shut: bool,
    /// Its socket failed.
    pub gone: bool,
}

impl PeerFlags {
    fn of(bits: u16) -> Self {
        let on = |bit| bits & bit != 0;
        Self {
            eof: on(EOF),
            closed: on(CLOSED),
            failed: on(FAILED),
            finish: on(FINISH),
            shut: on(SHUT),
            gone: on(GONE),
        }
    }

    fn bits(self) -> u16 {
        [
            (self.eof, EOF),
            (self.closed, CLOSED),
            (self.failed, FAILED),
            (self.finish, FINISH),
            (self.shut, SHUT),
            (self.gone, GONE),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .fold(0, |bits, (_, bit)| bits | bit)
    }
}

/// Bytes queued towards a peer and not sent yet, in the order they go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued {
    pub bytes: Vec<u8>,
    /// weir's own Close frame with this code, reported once written whole.
    pub close: Option<u16>,
}

/// One peer of a handed-over connection: what goes to it, and the scanner
/// of what comes from it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerSnapshot {
    pub flags: PeerFlags,
    pub queued: Vec<Queued>,
    pub scanner: ScannerState,
}

/// A relaying connection, as [`Conn::export`] found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub service: ServiceAddr,
    pub backend: u32,
    pub backend_addr: SocketAddr,
    pub settings: Settings,
    /// permessage-deflate was negotiated: frames may set RSV1.
    pub allow_rsv1: bool,
    pub client: PeerSnapshot,
    pub server: PeerSnapshot,
    /// The close deadline (while weir closes the connection), from the
    /// export; an overdue one is zero.
    pub deadline_in: Option<Duration>,
    /// Since the last bytes came in from either peer.
    pub idle_for: Duration,
    /// Since weir last pinged the client.
    pub pinged_ago: Duration,
    /// weir's Close on its way (a drain, a timeout, a broken rule): code
    /// and reason.
    pub pending_close: Option<(u16, String)>,
    /// When its drain (its backend's, or a stopping process's) closes it
    /// with 1001, from the export. The worker's drain schedule holds this,
    /// not the connection: [`Conn::export`] leaves it `None` and the
    /// worker fills it in; the new worker schedules it again.
    pub drain_in: Option<Duration>,
}

/// Why a connection cannot be handed over now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotMovable {
    #[error("still in its handshake: it finishes in this process")]
    Handshaking,
    #[error("closing: it ends in this process within the close timeout")]
    Closing,
    #[error("aborted")]
    Aborted,
    #[error("a receive from the {0:?} side is armed")]
    Receiving(Side),
    #[error("a send to the {0:?} side is in flight")]
    Sending(Side),
    #[error(
        "{pieces} pieces of {bytes} bytes queued to the {side:?} side, over the handover's bounds"
    )]
    Overfull {
        side: Side,
        pieces: usize,
        bytes: usize,
    },
    #[error("provided buffer {bid} is shorter than what is queued from it")]
    ShortBuffer { bid: u16 },
}

/// Why no connection can go on from a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("impossible connection state: {0}")]
pub struct InvalidSnapshot(pub &'static str);

impl Snapshot {
    /// Whether a connection can go on from this snapshot: within the
    /// handover's bounds, and in a state a connection could have been in.
    pub fn check(&self) -> Result<(), InvalidSnapshot> {
        let spans = [
            Some(self.settings.idle),
            self.settings.ping_interval,
            Some(self.settings.close),
            self.deadline_in,
            self.drain_in,
            Some(self.idle_for),
            Some(self.pinged_ago),
        ];
        if spans.into_iter().flatten().any(|d| d > MAX_DURATION) {
            return Err(InvalidSnapshot("a duration over 24h"));
        }
        if let Some((_, reason)) = &self.pending_close
            && reason.len() > MAX_CLOSE_REASON
        {
            return Err(InvalidSnapshot("a close reason over 123 bytes"));
        }
        for peer in [&self.client, &self.server] {
            let bytes: usize = peer.queued.iter().map(|q| q.bytes.len()).sum();
            if peer.queued.len() > MAX_QUEUED_PIECES || bytes > MAX_QUEUED_BYTES {
                return Err(InvalidSnapshot("more queued than a handover carries"));
            }
            if peer.queued.iter().any(|q| q.bytes.is_empty()) {
                return Err(InvalidSnapshot("an empty queued piece"));
            }
        }
        self.scanners(self.client.scanner.clone(), self.server.scanner.clone())
            .map(drop)
    }

    /// The scanners of what comes from the client and from the backend.
    fn scanners(
        &self,
        client: ScannerState,
        server: ScannerState,
    ) -> Result<(Scanner, Scanner), InvalidSnapshot> {
        let (rsv1, limits) = (self.allow_rsv1, self.settings.limits);
        let resume =
            |dir, state| Scanner::resume(dir, rsv1, limits, state).map_err(InvalidSnapshot);
        Ok((
            resume(Direction::ClientToServer, client)?,
            resume(Direction::ServerToClient, server)?,
        ))
    }
}

impl Conn {
    /// Whether the connection can be handed over now (see the module
    /// docs): relaying, and no operation of its in flight.
    pub fn movable(&self) -> Result<(), NotMovable> {
        if self.aborted {
            return Err(NotMovable::Aborted);
        }
        match self.phase {
            Phase::Relay => {}
            Phase::Closing => return Err(NotMovable::Closing),
            _ => return Err(NotMovable::Handshaking),
        }
        for side in [Side::Client, Side::Backend] {
            let p = self.peer_ref(side);
            if p.is(RECV) || p.is(CANCELLING) {
                return Err(NotMovable::Receiving(side));
            }
            if p.is(IN_FLIGHT) {
                return Err(NotMovable::Sending(side));
            }
            let bytes: usize = p.segs.iter().map(Seg::len).sum();
            if p.segs.len() > MAX_QUEUED_PIECES || bytes > MAX_QUEUED_BYTES {
                return Err(NotMovable::Overfull {
                    side,
                    pieces: p.segs.len(),
                    bytes,
                });
            }
        }
        Ok(())
    }

    /// The connection as plain data at `now`, if it is
    /// [`movable`](Conn::movable). `config` is the one it runs with;
    /// `buffer(bid, len)` gives the first `len` bytes of provided buffer
    /// `bid` (the worker owns their memory), which are copied out.
    pub fn export<'b>(
        &self,
        now: Instant,
        config: &Config,
        buffer: impl Fn(u16, usize) -> &'b [u8],
    ) -> Result<Snapshot, NotMovable> {
        self.movable()?;
        let (Some(service), Some(backend), Some(scanner)) =
            (self.service, self.backend, self.client.scanner.as_ref())
        else {
            // Every relaying connection was routed, connected and has its
            // scanners: one that is not never relayed.
            return Err(NotMovable::Handshaking);
        };
        let peer = |p: &Peer| -> Result<PeerSnapshot, NotMovable> {
            let queued = p
                .segs
                .iter()
                .map(|seg| match seg {
                    Seg::Buf { bid, start, end } => buffer(*bid, *end as usize)
                        .get(*start as usize..*end as usize)
                        .map(|bytes| Queued {
                            bytes: bytes.to_vec(),
                            close: None,
                        })
                        .ok_or(NotMovable::ShortBuffer { bid: *bid }),
                    Seg::Owned {
                        data,
                        offset,
                        close,
                    } => Ok(Queued {
                        bytes: data[*offset..].to_vec(),
                        close: *close,
                    }),
                })
                .collect::<Result<_, _>>()?;
            Ok(PeerSnapshot {
                flags: PeerFlags::of(p.flags),
                queued,
                scanner: p.scanner.as_ref().map(Scanner::state).unwrap_or_default(),
            })
        };
        // Only the comparisons with a timeout of at most 24h use these:
        // longer spans change nothing.
        let ago = |t: Instant| now.saturating_duration_since(t).min(MAX_DURATION);
        Ok(Snapshot {
            service,
            backend: backend.id,
            backend_addr: backend.addr,
            settings: Settings {
                idle: config.timeouts.idle,
                ping_interval: config.timeouts.ping_interval,
                close: config.timeouts.close,
                // The scanners' own: set at the upgrade.
                limits: scanner.limits(),
            },
            allow_rsv1: scanner.allow_rsv1(),
            client: peer(&self.client)?,
            server: peer(&self.server)?,
            deadline_in: self.deadline.map(|d| d.saturating_duration_since(now)),
            idle_for: ago(self.last_activity),
            pinged_ago: ago(self.last_ping),
            pending_close: self
                .pending_close
                .as_ref()
                .map(|(code, reason)| (*code, reason.to_string())),
            drain_in: None,
        })
    }

    /// The connection a snapshot describes, going on at `now` as the
    /// original would have. It runs with
    /// [`snapshot.settings.apply(..)`](Settings::apply).
    pub fn import(mut snapshot: Snapshot, now: Instant) -> Result<Conn, InvalidSnapshot> {
        snapshot.check()?;
        let before = |d: Duration| {
            now.checked_sub(d)
                .ok_or(InvalidSnapshot("a time before this clock's start"))
        };
        let deadline = match snapshot.deadline_in {
            Some(d) => Some(
                now.checked_add(d)
                    .ok_or(InvalidSnapshot("a deadline past this clock's end"))?,
            ),
            None => None,
        };
        let (last_activity, last_ping) = (before(snapshot.idle_for)?, before(snapshot.pinged_ago)?);
        let client = std::mem::take(&mut snapshot.client.scanner);
        let server = std::mem::take(&mut snapshot.server.scanner);
        let (client_scanner, server_scanner) = snapshot.scanners(client, server)?;
        let peer = |p: PeerSnapshot, scanner: Scanner| Peer {
            segs: p
                .queued
                .into_iter()
                .map(|q| Seg::Owned {
                    data: q.bytes,
                    offset: 0,
                    close: q.close,
                })
                .collect::<VecDeque<_>>(),
            scanner: Some(scanner),
            flags: p.flags.bits(),
            sending: 0,
        };
        Ok(Conn {
            phase: Phase::Relay,
            hs: None,
            service: Some(snapshot.service),
            backend: Some(Backend {
                id: snapshot.backend,
                addr: snapshot.backend_addr,
                connected: true,
            }),
            client: peer(snapshot.client, client_scanner),
            server: peer(snapshot.server, server_scanner),
            deadline,
            last_activity,
            last_ping,
            pending_close: snapshot
                .pending_close
                .map(|(code, reason)| (code, Cow::Owned(reason))),
            aborted: false,
            quiet: false,
            orders: 0,
        })
    }

    /// The new process took the connection over: this one lets it go,
    /// giving back the provided buffers its queues held (their bytes went
    /// in the snapshot). Its sockets are closed, not shut: they live on in
    /// the new process.
    pub fn handed_over(self, out: &mut super::Output) {
        for seg in self.client.segs.into_iter().chain(self.server.segs) {
            if let Seg::Buf { bid, .. } = seg {
                out.recycle.push(bid);
            }
        }
    }
}

impl Seg {
    /// Bytes of it not sent yet.
    fn len(&self) -> usize {
        match self {
            Seg::Buf { start, end, .. } => end.saturating_sub(*start) as usize,
            Seg::Owned { data, offset, .. } => data.len() - offset,
        }
    }
}
