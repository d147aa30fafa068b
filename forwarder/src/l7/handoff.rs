//! The handoff wire format: a batch of relaying connections
//! ([`Snapshot`]s, see `conn/snapshot.rs`) as the old `weir run` sends them
//! to the new one during a takeover (their sockets go beside it with
//! SCM_RIGHTS, in the same order).
//!
//! A batch is the magic `WEIRHOFF`, a format version (u16), the number of
//! connections (u32), then each connection as a u32 length and its
//! record; integers are little-endian, an optional value is a 0 or 1 byte
//! and the value after a 1, a byte string its length and its bytes.
//!
//! The version is read before anything else: a binary that meets another
//! version refuses the batch before it decodes a connection, so a
//! takeover between two binaries that do not share a format is refused
//! before anything moves. Any fault refuses the whole batch too: a
//! truncated or corrupt record, a length past the input, a value out of
//! range, a state no connection could be in ([`Snapshot::check`]). The
//! decoder never panics and never allocates more than the input holds.
//! The encoding is canonical (one byte string per batch): decoding then
//! encoding gives the input back, which the `handoff` fuzz target checks.

pub mod mailbox;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use super::conn::{InvalidSnapshot, PeerFlags, PeerSnapshot, Queued, Settings, Snapshot};
use super::frame::Limits as FrameLimits;
use super::relay::ScannerState;
use crate::registry::ServiceAddr;

pub const MAGIC: [u8; 8] = *b"WEIRHOFF";
/// The format this binary writes and reads. A change to what a snapshot
/// holds or how it is written is a new version.
pub const VERSION: u16 = 1;
/// Connections in one batch: the old process waits for the new one to
/// confirm each batch, so one lost takeover leaves at most this many to
/// the old one to keep serving.
pub const MAX_BATCH: usize = 4096;

/// Why a batch was refused, whole.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a weir handoff batch: {0} bytes, shorter than its header")]
    ShortHeader(usize),
    #[error("not a weir handoff batch (magic {0:02x?})")]
    Magic([u8; 8]),
    #[error("handoff format version {found}, this weir reads version {VERSION}: takeover refused")]
    Version { found: u16 },
    #[error("{0} connections in one batch, over the bound of {MAX_BATCH}")]
    TooMany(u32),
    #[error("connection {index} of the batch: {fault}")]
    Connection { index: u32, fault: Fault },
    #[error("{0} bytes after the batch's last connection")]
    Trailing(usize),
}

/// What is wrong with one connection's record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("cut short in {0}")]
    Truncated(&'static str),
    #[error("{what}: {value} is not a valid value")]
    Value { what: &'static str, value: u64 },
    #[error("{what}: not UTF-8")]
    Utf8 { what: &'static str },
    #[error("{0} bytes after the end of its record")]
    Trailing(usize),
    #[error(transparent)]
    Invalid(#[from] InvalidSnapshot),
}

/// The batch on the wire. At most [`MAX_BATCH`] snapshots: the caller
/// splits larger sets.
pub fn encode<'a, I>(batch: I) -> Vec<u8>
where
    I: IntoIterator<Item = &'a Snapshot>,
    I::IntoIter: ExactSizeIterator,
{
    let batch = batch.into_iter();
    assert!(
        batch.len() <= MAX_BATCH,
        "a batch of {} connections",
        batch.len()
    );
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(batch.len() as u32).to_le_bytes());
    for snapshot in batch {
        let mut w = Writer(Vec::new());
        w.snapshot(snapshot);
        out.extend_from_slice(&(w.0.len() as u32).to_le_bytes());
        out.extend_from_slice(&w.0);
    }
    out
}

/// The batch `input` holds, all of it checked, or why it is refused.
pub fn decode(input: &[u8]) -> Result<Vec<Snapshot>, DecodeError> {
    let Some((header, body)) = input.split_at_checked(MAGIC.len() + 6) else {
        return Err(DecodeError::ShortHeader(input.len()));
    };
    let (magic, rest) = header.split_at(MAGIC.len());
    if magic != MAGIC {
        let mut found = [0; 8];
        found.copy_from_slice(magic);
        return Err(DecodeError::Magic(found));
    }
    let found = u16::from_le_bytes([rest[0], rest[1]]);
    if found != VERSION {
        return Err(DecodeError::Version { found });
    }
    let count = u32::from_le_bytes([rest[2], rest[3], rest[4], rest[5]]);
    if count as usize > MAX_BATCH {
        return Err(DecodeError::TooMany(count));
    }
    let mut r = Reader(body);
    let mut batch = Vec::new();
    for index in 0..count {
        let fault = |fault| DecodeError::Connection { index, fault };
        let record = r.len_prefixed("the record length").map_err(fault)?;
        let mut rec = Reader(record);
        let snapshot = rec.snapshot().map_err(fault)?;
        if !rec.0.is_empty() {
            return Err(fault(Fault::Trailing(rec.0.len())));
        }
        snapshot.check().map_err(|e| fault(e.into()))?;
        batch.push(snapshot);
    }
    if !r.0.is_empty() {
        return Err(DecodeError::Trailing(r.0.len()));
    }
    Ok(batch)
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }

    fn option<T: Copy>(&mut self, v: Option<T>, write: impl FnOnce(&mut Self, T)) {
        self.bool(v.is_some());
        if let Some(v) = v {
            write(self, v);
        }
    }

    /// Nanoseconds: a snapshot's durations are at most 24h.
    fn duration(&mut self, d: Duration) {
        self.u64(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }

    fn addr(&mut self, addr: SocketAddr) {
        match addr {
            SocketAddr::V4(a) => {
                self.u8(4);
                self.0.extend_from_slice(&a.ip().octets());
            }
            SocketAddr::V6(a) => {
                self.u8(6);
                self.0.extend_from_slice(&a.ip().octets());
                self.u32(a.flowinfo());
                self.u32(a.scope_id());
            }
        }
        self.u16(addr.port());
    }

    fn snapshot(&mut self, s: &Snapshot) {
        self.0.extend_from_slice(&s.service.vip.octets());
        self.u16(s.service.port);
        self.u32(s.backend);
        self.addr(s.backend_addr);
        let settings = &s.settings;
        self.duration(settings.idle);
        self.option(settings.ping_interval, Self::duration);
        self.duration(settings.close);
        self.u64(settings.limits.max_frame);
        self.u64(settings.limits.max_message);
        self.bool(s.allow_rsv1);
        self.peer(&s.client);
        self.peer(&s.server);
        self.option(s.deadline_in, Self::duration);
        self.duration(s.idle_for);
        self.duration(s.pinged_ago);
        self.bool(s.pending_close.is_some());
        if let Some((code, reason)) = &s.pending_close {
            self.u16(*code);
            self.bytes(reason.as_bytes());
        }
        self.option(s.drain_in, Self::duration);
    }

    fn peer(&mut self, p: &PeerSnapshot) {
        let f = p.flags;
        let flags = [f.eof, f.closed, f.failed, f.finish, f.shut, f.gone];
        self.u8(bits(&flags));
        let s = &p.scanner;
        self.option(s.open_message, Self::u64);
        self.u8(bits(&[s.close_seen, s.close_passed, s.discarding]));
        self.bytes(&s.partial);
        self.u64(s.remaining);
        self.u32(p.queued.len() as u32);
        for q in &p.queued {
            self.option(q.close, Self::u16);
            self.bytes(&q.bytes);
        }
    }
}

/// Booleans as the bits of a byte, the first the lowest.
fn bits(flags: &[bool]) -> u8 {
    flags
        .iter()
        .enumerate()
        .fold(0, |b, (i, &on)| b | (u8::from(on) << i))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Fault> {
        let (taken, rest) = self.0.split_at_checked(n).ok_or(Fault::Truncated(what))?;
        self.0 = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], Fault> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, Fault> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, Fault> {
        self.array(what).map(u16::from_le_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, Fault> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, Fault> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A byte holding `N` booleans, its other bits clear.
    fn bits<const N: usize>(&mut self, what: &'static str) -> Result<[bool; N], Fault> {
        let b = self.u8(what)?;
        if u32::from(b) >> N != 0 {
            return Err(Fault::Value {
                what,
                value: b.into(),
            });
        }
        Ok(std::array::from_fn(|i| b & (1 << i) != 0))
    }

    fn bool(&mut self, what: &'static str) -> Result<bool, Fault> {
        self.bits::<1>(what).map(|[b]| b)
    }

    fn option<T>(
        &mut self,
        what: &'static str,
        read: impl FnOnce(&mut Self, &'static str) -> Result<T, Fault>,
    ) -> Result<Option<T>, Fault> {
        match self.bool(what)? {
            true => read(self, what).map(Some),
            false => Ok(None),
        }
    }

    fn duration(&mut self, what: &'static str) -> Result<Duration, Fault> {
        self.u64(what).map(Duration::from_nanos)
    }

    fn len_prefixed(&mut self, what: &'static str) -> Result<&'a [u8], Fault> {
        let len = self.u32(what)?;
        self.take(len as usize, what)
    }

    fn addr(&mut self, what: &'static str) -> Result<SocketAddr, Fault> {
        let ip = match self.u8(what)? {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>(what)?)),
            6 => {
                let ip = Ipv6Addr::from(self.array::<16>(what)?);
                let (flowinfo, scope) = (self.u32(what)?, self.u32(what)?);
                let port = self.u16(what)?;
                return Ok(SocketAddrV6::new(ip, port, flowinfo, scope).into());
            }
            family => {
                return Err(Fault::Value {
                    what,
                    value: family.into(),
                });
            }
        };
        Ok(SocketAddr::new(ip, self.u16(what)?))
    }

    fn snapshot(&mut self) -> Result<Snapshot, Fault> {
        let service = ServiceAddr {
            vip: Ipv4Addr::from(self.array::<4>("the service")?),
            port: self.u16("the service")?,
        };
        let backend = self.u32("the backend")?;
        let backend_addr = self.addr("the backend's address")?;
        let settings = Settings {
            idle: self.duration("the idle timeout")?,
            ping_interval: self.option("the ping interval", Self::duration)?,
            close: self.duration("the close timeout")?,
            limits: FrameLimits {
                max_frame: self.u64("the frame limit")?,
                max_message: self.u64("the message limit")?,
            },
        };
        let allow_rsv1 = self.bool("the RSV1 flag")?;
        let client = self.peer()?;
        let server = self.peer()?;
        let deadline_in = self.option("the deadline", Self::duration)?;
        let idle_for = self.duration("the idle time")?;
        let pinged_ago = self.duration("the time since the last ping")?;
        let pending_close = self.option("the pending close", |r, what| {
            let code = r.u16(what)?;
            let reason = r.len_prefixed(what)?;
            let reason = std::str::from_utf8(reason).map_err(|_| Fault::Utf8 { what })?;
            Ok((code, reason.to_owned()))
        })?;
        let drain_in = self.option("the drain", Self::duration)?;
        Ok(Snapshot {
            service,
            backend,
            backend_addr,
            settings,
            allow_rsv1,
            client,
            server,
            deadline_in,
            idle_for,
            pinged_ago,
            pending_close,
            drain_in,
        })
    }

    fn peer(&mut self) -> Result<PeerSnapshot, Fault> {
        let [eof, closed, failed, finish, shut, gone] = self.bits("a peer's flags")?;
        let open_message = self.option("the open message", Self::u64)?;
        let [close_seen, close_passed, discarding] = self.bits("a scanner's flags")?;
        let partial = self.len_prefixed("a held header")?.to_vec();
        let remaining = self.u64("a frame's remaining payload")?;
        let pieces = self.u32("the queued pieces")?;
        let mut queued = Vec::new();
        for _ in 0..pieces {
            let close = self.option("a queued Close", Self::u16)?;
            let bytes = self.len_prefixed("queued bytes")?.to_vec();
            queued.push(Queued { bytes, close });
        }
        Ok(PeerSnapshot {
            flags: PeerFlags {
                eof,
                closed,
                failed,
                finish,
                shut,
                gone,
            },
            queued,
            scanner: ScannerState {
                open_message,
                close_seen,
                partial,
                remaining,
                close_passed,
                discarding,
            },
        })
    }
}

#[cfg(test)]
pub(crate) mod tests;
