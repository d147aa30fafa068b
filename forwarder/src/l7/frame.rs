//! WebSocket frame headers (RFC 6455 section 5), sans-IO.
//!
//! The relay never looks into payloads: it reads the 2–14 header bytes of
//! each frame with [`parse_header`], asks the [`Validator`] of that direction
//! whether the frame may pass, and forwards header and payload as they came
//! (client frames stay masked). Knowing where frames end is also what lets
//! weir inject a Close of its own without cutting a frame in two. It injects at
//! the next frame boundary, which may fall between two fragments of a message:
//! a control frame may come between fragments (5.4), and a Close ends the
//! stream, unfinished message included (waiting for the message to end could
//! wait forever on a peer that never finishes it).
//!
//! [`parse_header`] rejects encodings that can never be valid (5.2): a 64-bit
//! length with its most significant bit set, and a length not written in its
//! minimal form.
//!
//! [`Validator::check`] enforces, for one direction, with close code 1002
//! (protocol error, 7.4.1) unless noted:
//! - opcodes 0x3–0x7 and 0xB–0xF are reserved (5.2);
//! - RSV2 and RSV3 are clear; RSV1 is clear unless permessage-deflate was
//!   negotiated, and even then only set on the first frame of a data message
//!   (5.2, RFC 7692 section 6);
//! - control frames carry at most 125 bytes and are not fragmented (5.5);
//! - a Close payload is empty or starts with a 2-byte code, so a 1-byte one is
//!   invalid (5.5.1);
//! - that code is one a peer may send ([`close_code_allowed`], 7.4) and the
//!   reason after it is UTF-8 (5.5.1; else 1007, 8.1), checked by
//!   [`check_close_payload`] once the whole Close frame is in;
//! - a continuation frame continues a fragmented message, and a text or binary
//!   frame does not start one while another is open; control frames may come
//!   in between (5.4);
//! - client frames are masked, server frames are not (5.1, 5.3);
//! - nothing follows a Close in the same direction (5.5.1);
//! - a frame above [`Limits::max_frame`] or a message above
//!   [`Limits::max_message`] closes with 1009, message too big (7.4.1).
//!
//! With permessage-deflate the limits apply to compressed lengths: weir never
//! inflates.

/// Longest frame header: 2 bytes, an 8-byte extended length, a 4-byte mask.
pub const MAX_HEADER_LEN: usize = 14;
/// Longest payload of a control frame (5.5).
pub const MAX_CONTROL_PAYLOAD: u64 = 125;
/// Longest Close reason: a control payload less the 2-byte code (5.5.1).
pub const MAX_CLOSE_REASON: usize = 123;

/// Close code for an endpoint going away; drain and shutdown send it (7.4.1).
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code for a broken framing rule (7.4.1).
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// Close code for a frame or message over the limits (7.4.1).
pub const CLOSE_MESSAGE_TOO_BIG: u16 = 1009;
/// Close code for data that is not what its type says: a Close reason that
/// is not UTF-8 (7.4.1, 8.1).
pub const CLOSE_INVALID_PAYLOAD: u16 = 1007;
/// Close code "Bad Gateway" (IANA WebSocket Close Code Number Registry):
/// weir, a proxy, sends it to a client whose backend ended the stream
/// without a Close of its own (crashed, reset, or shut its socket).
pub const CLOSE_BAD_GATEWAY: u16 = 1014;
/// "No status received" (7.4.1): what a Close without a code is counted as.
/// A peer must never put it in a Close frame.
pub const CLOSE_NO_STATUS: u16 = 1005;

/// Whether a peer may send `code` in a Close frame (7.4.1, 7.4.2 and the IANA
/// registry): the codes RFC 6455 and the registry define for use on the wire
/// (1000-1003, 1007-1014), the range for libraries and frameworks
/// (3000-3999) and the private range (4000-4999). Everything else is
/// invalid: 0-999 is unused, 1004 reserved, 1005/1006/1015 must never be
/// sent, 1016-2999 is unassigned, 5000 and up undefined.
pub const fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Checks the unmasked payload of a complete Close frame: empty, or an
/// allowed code followed by a UTF-8 reason. Returns the code, or
/// [`CLOSE_NO_STATUS`] for an empty payload.
pub fn check_close_payload(payload: &[u8]) -> Result<u16, Violation> {
    let [hi, lo, reason @ ..] = payload else {
        if payload.is_empty() {
            return Ok(CLOSE_NO_STATUS);
        }
        return Err(protocol_error("close frame with a 1-byte payload"));
    };
    let code = u16::from_be_bytes([*hi, *lo]);
    if !close_code_allowed(code) {
        return Err(protocol_error("invalid close code"));
    }
    if std::str::from_utf8(reason).is_err() {
        return Err(Violation {
            code: CLOSE_INVALID_PAYLOAD,
            reason: "close reason is not UTF-8",
        });
    }
    Ok(code)
}

/// The opcodes RFC 6455 defines (5.2); every other 4-bit value is reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Opcode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl Opcode {
    /// `None` for reserved opcodes: [`FrameHeader`] keeps the raw 4 bits so
    /// that the [`Validator`] decides, not the parser.
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    /// Control opcodes have the high bit set (5.5).
    pub const fn is_control(self) -> bool {
        self as u8 & 0x8 != 0
    }
}

/// One frame header as it is on the wire; nothing is judged yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub rsv1: bool,
    pub rsv2: bool,
    pub rsv3: bool,
    /// Raw 4 bits: reserved values are the [`Validator`]'s to reject.
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// Bytes of header before the payload, 2..=14.
    pub header_len: usize,
}

impl FrameHeader {
    /// A header for a frame weir writes itself (RSV bits clear).
    pub const fn new(fin: bool, opcode: Opcode, mask: Option<[u8; 4]>, payload_len: u64) -> Self {
        Self {
            fin,
            rsv1: false,
            rsv2: false,
            rsv3: false,
            opcode: opcode as u8,
            mask,
            payload_len,
            header_len: header_len(payload_len, mask.is_some()),
        }
    }

    /// Appends the wire form, with the minimal length encoding, so that
    /// [`parse_header`] reads back `self`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        debug_assert!(self.opcode <= 0xF, "opcode has 4 bits");
        debug_assert!(self.payload_len >> 63 == 0, "payload length has 63 bits");
        debug_assert_eq!(
            self.header_len,
            header_len(self.payload_len, self.mask.is_some())
        );
        let bit = |set: bool, b: u8| if set { b } else { 0 };
        out.push(
            bit(self.fin, 0x80)
                | bit(self.rsv1, 0x40)
                | bit(self.rsv2, 0x20)
                | bit(self.rsv3, 0x10)
                | (self.opcode & 0x0F),
        );
        let masked = bit(self.mask.is_some(), 0x80);
        match self.payload_len {
            n @ 0..=125 => out.push(masked | n as u8),
            n @ 126..=0xFFFF => {
                out.push(masked | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(masked | 127);
                out.extend_from_slice(&n.to_be_bytes());
            }
        }
        if let Some(mask) = self.mask {
            out.extend_from_slice(&mask);
        }
    }
}

/// Header length of a frame with this payload length and masking.
pub const fn header_len(payload_len: u64, masked: bool) -> usize {
    let len = match payload_len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    };
    if masked { len + 4 } else { len }
}

/// Parses a frame header from the start of `buf`.
///
/// `Ok(None)`: `buf` is a prefix of a header and more bytes are needed; a
/// short buffer is never an error. `Err` only for encodings that can never be
/// valid (5.2): a 64-bit length with the top bit set, or a length not in its
/// minimal encoding. These are reported as soon as the length field is
/// complete, even if mask bytes are still missing.
pub fn parse_header(buf: &[u8]) -> Result<Option<FrameHeader>, Violation> {
    let [b0, b1, rest @ ..] = buf else {
        return Ok(None);
    };
    let (payload_len, len_bytes) = match b1 & 0x7F {
        126 => {
            let Some(ext) = rest.first_chunk::<2>() else {
                return Ok(None);
            };
            let n = u64::from(u16::from_be_bytes(*ext));
            if n < 126 {
                return Err(NON_MINIMAL_LENGTH);
            }
            (n, 2)
        }
        127 => {
            let Some(ext) = rest.first_chunk::<8>() else {
                return Ok(None);
            };
            let n = u64::from_be_bytes(*ext);
            if n >> 63 != 0 {
                return Err(protocol_error("64-bit payload length with the top bit set"));
            }
            if n <= 0xFFFF {
                return Err(NON_MINIMAL_LENGTH);
            }
            (n, 8)
        }
        n => (u64::from(n), 0),
    };
    let mask = if b1 & 0x80 != 0 {
        let Some(mask) = rest[len_bytes..].first_chunk::<4>() else {
            return Ok(None);
        };
        Some(*mask)
    } else {
        None
    };
    Ok(Some(FrameHeader {
        fin: b0 & 0x80 != 0,
        rsv1: b0 & 0x40 != 0,
        rsv2: b0 & 0x20 != 0,
        rsv3: b0 & 0x10 != 0,
        opcode: b0 & 0x0F,
        mask,
        payload_len,
        header_len: 2 + len_bytes + if mask.is_some() { 4 } else { 0 },
    }))
}

const NON_MINIMAL_LENGTH: Violation = protocol_error("payload length not minimally encoded");

/// Which way frames flow: it decides which masking is required (5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

/// Close code and reason weir must send when a rule is broken (RFC 6455
/// 7.4.1): 1002 protocol error, 1007 invalid payload, 1009 message too big.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (close {code})")]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

const fn protocol_error(reason: &'static str) -> Violation {
    Violation {
        code: CLOSE_PROTOCOL_ERROR,
        reason,
    }
}

const fn too_big(reason: &'static str) -> Violation {
    Violation {
        code: CLOSE_MESSAGE_TOO_BIG,
        reason,
    }
}

/// Size limits, inclusive. Defaults leave room for the 16 MiB frames and
/// messages of the Autobahn suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload of one frame.
    pub max_frame: u64,
    /// Largest sum of the payloads of one data message.
    pub max_message: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: 16 << 20,
            max_message: 64 << 20,
        }
    }
}

/// What the relay needs to know about a frame that passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// A text, binary or continuation frame; `first` and `last` place it in
    /// its message (both for an unfragmented one).
    Data {
        first: bool,
        last: bool,
    },
    Close,
    Ping,
    Pong,
}

/// Framing state of one direction of one connection: whether a fragmented
/// message is open and how long it is so far, whether a Close went by.
///
/// [`check`](Self::check) changes the state only when it returns `Ok`; after
/// an `Err` the relay closes the connection with the [`Violation`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validator {
    dir: Direction,
    allow_rsv1: bool,
    limits: Limits,
    /// Payload bytes of the open fragmented message; `None` between messages.
    message: Option<u64>,
    closed: bool,
}

impl Validator {
    /// `allow_rsv1`: the handshake negotiated permessage-deflate, whose
    /// compressed messages set RSV1; weir passes them through untouched.
    pub fn new(dir: Direction, allow_rsv1: bool, limits: Limits) -> Self {
        Self {
            dir,
            allow_rsv1,
            limits,
            message: None,
            closed: false,
        }
    }

    /// A validator that goes on from where another left off (the state
    /// [`open_message`](Self::open_message) and [`closed`](Self::closed)
    /// read): how a connection handed to another process keeps judging
    /// its frames.
    pub fn resume(
        dir: Direction,
        allow_rsv1: bool,
        limits: Limits,
        open_message: Option<u64>,
        closed: bool,
    ) -> Self {
        Self {
            dir,
            allow_rsv1,
            limits,
            message: open_message,
            closed,
        }
    }

    /// Checks one header, in stream order, against the rules in the module
    /// documentation, and updates the state when it passes.
    pub fn check(&mut self, h: &FrameHeader) -> Result<FrameKind, Violation> {
        if self.closed {
            return Err(protocol_error("frame after close"));
        }
        let Some(op) = Opcode::from_u8(h.opcode) else {
            return Err(protocol_error("reserved opcode"));
        };
        if h.rsv2 || h.rsv3 {
            return Err(protocol_error("RSV2 or RSV3 set"));
        }
        if h.rsv1 && !self.allow_rsv1 {
            return Err(protocol_error("RSV1 set without a negotiated extension"));
        }
        match (self.dir, h.mask.is_some()) {
            (Direction::ClientToServer, false) => {
                return Err(protocol_error("unmasked client frame"));
            }
            (Direction::ServerToClient, true) => return Err(protocol_error("masked server frame")),
            _ => {}
        }
        if op.is_control() {
            if !h.fin {
                return Err(protocol_error("fragmented control frame"));
            }
            if h.payload_len > MAX_CONTROL_PAYLOAD {
                return Err(protocol_error("control frame payload over 125 bytes"));
            }
            if h.rsv1 {
                return Err(protocol_error("RSV1 set on a control frame"));
            }
            if op == Opcode::Close && h.payload_len == 1 {
                return Err(protocol_error("close frame with a 1-byte payload"));
            }
        }
        if h.payload_len > self.limits.max_frame {
            return Err(too_big("frame too big"));
        }
        Ok(match op {
            Opcode::Close => {
                self.closed = true;
                FrameKind::Close
            }
            Opcode::Ping => FrameKind::Ping,
            Opcode::Pong => FrameKind::Pong,
            Opcode::Continuation => {
                let Some(so_far) = self.message else {
                    return Err(protocol_error("continuation frame outside a message"));
                };
                if h.rsv1 {
                    return Err(protocol_error("RSV1 set on a continuation frame"));
                }
                let len = self.message_len(so_far, h.payload_len)?;
                self.message = (!h.fin).then_some(len);
                FrameKind::Data {
                    first: false,
                    last: h.fin,
                }
            }
            Opcode::Text | Opcode::Binary => {
                if self.message.is_some() {
                    return Err(protocol_error("new message before the previous one ended"));
                }
                let len = self.message_len(0, h.payload_len)?;
                self.message = (!h.fin).then_some(len);
                FrameKind::Data {
                    first: true,
                    last: h.fin,
                }
            }
        })
    }

    fn message_len(&self, so_far: u64, frame: u64) -> Result<u64, Violation> {
        so_far
            .checked_add(frame)
            .filter(|&n| n <= self.limits.max_message)
            .ok_or(too_big("message too big"))
    }

    /// True between the first and the last frame of a fragmented data
    /// message. A Close weir injects at a frame boundary while this is true
    /// ends the stream with the message unfinished (see the module
    /// documentation).
    pub fn in_message(&self) -> bool {
        self.message.is_some()
    }

    /// Payload bytes of the open fragmented message so far; `None` between
    /// messages.
    pub fn open_message(&self) -> Option<u64> {
        self.message
    }

    pub fn allow_rsv1(&self) -> bool {
        self.allow_rsv1
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A Close frame has passed in this direction: nothing more may follow,
    /// and weir must not inject another.
    pub fn closed(&self) -> bool {
        self.closed
    }
}

/// Builds a complete Close frame: 2-byte `code` and `reason` cut to
/// [`MAX_CLOSE_REASON`] bytes at a char boundary (5.5.1). Frames weir sends to
/// a backend must be masked, frames to a client must not (5.1); masks should
/// be unpredictable (5.3).
pub fn close_frame(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let reason = &reason.as_bytes()[..reason.floor_char_boundary(MAX_CLOSE_REASON)];
    let mut payload = [0; MAX_CONTROL_PAYLOAD as usize];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + reason.len()].copy_from_slice(reason);
    control_frame(Opcode::Close, &payload[..2 + reason.len()], mask)
}

/// Builds a complete Ping frame, masked as [`close_frame`] says.
///
/// # Panics
/// If `payload` is longer than 125 bytes (5.5).
pub fn ping_frame(payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    assert!(
        payload.len() as u64 <= MAX_CONTROL_PAYLOAD,
        "ping payload over 125 bytes"
    );
    control_frame(Opcode::Ping, payload, mask)
}

fn control_frame(opcode: Opcode, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    whole_frame(opcode, true, payload, mask)
}

/// A whole frame: header and `payload`, masked with `mask` if given.
pub fn whole_frame(opcode: Opcode, fin: bool, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_HEADER_LEN + payload.len());
    FrameHeader::new(fin, opcode, mask, payload.len() as u64).write_to(&mut out);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(mask) = mask {
        apply_mask(&mut out[start..], mask, 0);
    }
    out
}

/// Reads the close code from the first bytes of a Close frame's payload,
/// unmasking with `mask`; for metrics of close codes sent and received.
/// `payload_start` must hold only that payload's bytes, not the next frame's.
///
/// `None` when fewer than 2 bytes are given: either the payload is empty (no
/// code; the peer reports 1005, 7.1.5) or the caller has not received the
/// rest yet. A 1-byte Close payload never gets here: [`Validator::check`]
/// rejects it.
pub fn close_code(payload_start: &[u8], mask: Option<[u8; 4]>) -> Option<u16> {
    let &[hi, lo, ..] = payload_start else {
        return None;
    };
    let mut code = [hi, lo];
    if let Some(mask) = mask {
        apply_mask(&mut code, mask, 0);
    }
    Some(u16::from_be_bytes(code))
}

/// Masks or unmasks (it is its own inverse, 5.3) `data` in place, `data[0]`
/// being payload byte number `offset`, so a payload split across buffers can
/// be handled piece by piece.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: u64) {
    let skip = (offset % 4) as usize;
    for (byte, m) in data.iter_mut().zip(mask.iter().cycle().skip(skip)) {
        *byte ^= m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Direction::{ClientToServer, ServerToClient};

    const M: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

    fn hdr(fin: bool, opcode: u8, mask: Option<[u8; 4]>, len: u64) -> FrameHeader {
        FrameHeader {
            opcode,
            ..FrameHeader::new(fin, Opcode::Text, mask, len)
        }
    }

    fn encode(h: &FrameHeader) -> Vec<u8> {
        let mut out = Vec::new();
        h.write_to(&mut out);
        out
    }

    fn parse(buf: &[u8]) -> FrameHeader {
        parse_header(buf).expect("valid").expect("complete")
    }

    /// The mask a direction requires.
    fn mask_for(dir: Direction) -> Option<[u8; 4]> {
        match dir {
            ClientToServer => Some(M),
            ServerToClient => None,
        }
    }

    fn validator(dir: Direction) -> Validator {
        Validator::new(dir, false, Limits::default())
    }

    /// A legal header for `dir`.
    fn frame(dir: Direction, fin: bool, opcode: u8, len: u64) -> FrameHeader {
        hdr(fin, opcode, mask_for(dir), len)
    }

    fn assert_violation(r: Result<FrameKind, Violation>, code: u16, reason: &str) {
        let v = r.expect_err("should be a violation");
        assert_eq!((v.code, v.reason), (code, reason));
    }

    const TEXT: u8 = 0x1;
    const BINARY: u8 = 0x2;
    const CONT: u8 = 0x0;
    const CLOSE: u8 = 0x8;
    const PING: u8 = 0x9;
    const PONG: u8 = 0xA;
    const CONTROLS: [u8; 3] = [CLOSE, PING, PONG];

    // ---- parse_header ----

    #[test]
    fn rfc_examples() {
        // RFC 6455 section 5.7.
        let h = parse(&[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        assert_eq!(h, FrameHeader::new(true, Opcode::Text, None, 5));
        assert_eq!(h.header_len, 2);

        let masked = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let h = parse(&masked);
        assert_eq!(h, FrameHeader::new(true, Opcode::Text, Some(M), 5));
        assert_eq!(h.header_len, 6);
        let mut payload = masked[6..].to_vec();
        apply_mask(&mut payload, M, 0);
        assert_eq!(payload, b"Hello");

        let h = parse(&[0x01, 0x03, 0x48, 0x65, 0x6c]);
        assert_eq!((h.fin, h.opcode, h.payload_len), (false, TEXT, 3));
        let h = parse(&[0x80, 0x02, 0x6c, 0x6f]);
        assert_eq!((h.fin, h.opcode, h.payload_len), (true, CONT, 2));
        assert_eq!(parse(&[0x89, 0x05]).opcode, PING);
        assert_eq!(parse(&[0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d]).opcode, PONG);
        assert_eq!(parse(&[0x82, 0x7E, 0x01, 0x00]).payload_len, 256);
        assert_eq!(
            parse(&[0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0]).payload_len,
            65536
        );
    }

    #[test]
    fn length_encodings_at_their_boundaries() {
        let cases: [(u64, &[u8]); 6] = [
            (0, &[0x82, 0]),
            (125, &[0x82, 125]),
            (126, &[0x82, 126, 0, 126]),
            (65535, &[0x82, 126, 0xFF, 0xFF]),
            (65536, &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
            (
                i64::MAX as u64,
                &[0x82, 127, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
            ),
        ];
        for (len, wire) in cases {
            let h = FrameHeader::new(true, Opcode::Binary, None, len);
            assert_eq!(encode(&h), wire, "{len}");
            assert_eq!(parse(wire), h, "{len}");
            assert_eq!(h.header_len, wire.len());

            let masked = FrameHeader::new(true, Opcode::Binary, Some(M), len);
            let mut wire = wire.to_vec();
            wire[1] |= 0x80;
            wire.extend_from_slice(&M);
            assert_eq!(encode(&masked), wire, "{len} masked");
            assert_eq!(parse(&wire), masked, "{len} masked");
            assert_eq!(masked.header_len, wire.len());
        }
    }

    #[test]
    fn non_minimal_lengths_are_rejected() {
        let bad: [&[u8]; 5] = [
            &[0x82, 126, 0, 0],
            &[0x82, 126, 0, 125],
            &[0x82, 127, 0, 0, 0, 0, 0, 0, 0, 0],
            &[0x82, 127, 0, 0, 0, 0, 0, 0, 0, 125],
            &[0x82, 127, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF],
        ];
        for wire in bad {
            let v = parse_header(wire).unwrap_err();
            assert_eq!(v, NON_MINIMAL_LENGTH, "{wire:?}");
            assert_eq!(v.code, 1002);
        }
        // The smallest values each encoding is for.
        assert_eq!(parse(&[0x82, 126, 0, 126]).payload_len, 126);
        assert_eq!(
            parse(&[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]).payload_len,
            65536
        );
    }

    #[test]
    fn top_bit_of_64_bit_length_is_rejected() {
        for first in [0x80, 0xFF] {
            let wire = [0x82, 127, first, 0, 0, 0, 0, 0, 0, 0];
            let v = parse_header(&wire).unwrap_err();
            assert_eq!(v.code, 1002);
            assert_eq!(v.reason, "64-bit payload length with the top bit set");
        }
        let max = [0x82, 127, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];
        assert_eq!(parse(&max).payload_len, (1 << 63) - 1);
    }

    #[test]
    fn errors_come_once_the_length_field_is_complete() {
        // Masked, so the header is 8 bytes, but the bad length is known at 4.
        assert_eq!(parse_header(&[0x82, 0xFE, 0]), Ok(None));
        assert!(parse_header(&[0x82, 0xFE, 0, 5]).is_err());
        assert_eq!(
            parse_header(&[0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0]),
            Ok(None)
        );
        assert!(parse_header(&[0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn every_truncated_prefix_needs_more() {
        for len in [0, 1, 125, 126, 127, 65535, 65536, 1 << 40] {
            for mask in [None, Some(M), Some([0; 4])] {
                for b0 in [0x00, 0x81, 0xFF] {
                    let h = FrameHeader {
                        fin: b0 & 0x80 != 0,
                        rsv1: b0 & 0x40 != 0,
                        rsv2: b0 & 0x20 != 0,
                        rsv3: b0 & 0x10 != 0,
                        opcode: b0 & 0x0F,
                        ..FrameHeader::new(false, Opcode::Continuation, mask, len)
                    };
                    let mut wire = encode(&h);
                    assert_eq!(wire.len(), h.header_len);
                    assert_eq!(wire[0], b0);
                    for cut in 0..wire.len() {
                        assert_eq!(parse_header(&wire[..cut]), Ok(None), "{h:?} cut at {cut}");
                    }
                    assert_eq!(parse(&wire), h);
                    // Payload bytes after the header change nothing.
                    wire.extend_from_slice(&[0xAA; 20]);
                    assert_eq!(parse(&wire), h);
                }
            }
        }
    }

    #[test]
    fn mask_bytes_are_read_after_the_extended_length() {
        let h = parse(&[0x82, 0xFE, 0x01, 0x00, 9, 8, 7, 6, 0xEE]);
        assert_eq!(h.mask, Some([9, 8, 7, 6]));
        assert_eq!((h.payload_len, h.header_len), (256, 8));
        let h = parse(&[0x82, 0xFF, 0, 0, 0, 0, 0, 1, 0, 0, 1, 2, 3, 4]);
        assert_eq!(h.mask, Some([1, 2, 3, 4]));
        assert_eq!((h.payload_len, h.header_len), (65536, 14));
        // A zero mask is still a mask.
        assert_eq!(parse(&[0x82, 0x80, 0, 0, 0, 0]).mask, Some([0; 4]));
        assert_eq!(parse(&[0x82, 0x00, 1, 2, 3, 4]).mask, None);
    }

    #[test]
    fn first_byte_bits() {
        let h = parse(&[0xFF, 0]);
        assert!(h.fin && h.rsv1 && h.rsv2 && h.rsv3);
        assert_eq!(h.opcode, 0xF);
        let h = parse(&[0x00, 0]);
        assert!(!h.fin && !h.rsv1 && !h.rsv2 && !h.rsv3);
        assert_eq!(h.opcode, 0);
        assert!(parse(&[0x40, 0]).rsv1);
        assert!(parse(&[0x20, 0]).rsv2);
        assert!(parse(&[0x10, 0]).rsv3);
        // Reserved opcodes parse: rejecting them is the validator's job.
        assert_eq!(parse(&[0x83, 0]).opcode, 3);
    }

    #[test]
    fn opcodes() {
        let known = [
            Opcode::Continuation,
            Opcode::Text,
            Opcode::Binary,
            Opcode::Close,
            Opcode::Ping,
            Opcode::Pong,
        ];
        for v in 0..=u8::MAX {
            let op = Opcode::from_u8(v);
            assert_eq!(op.is_some(), matches!(v, 0..=2 | 8..=10), "{v}");
            if let Some(op) = op {
                assert_eq!(op as u8, v);
                assert_eq!(op.is_control(), v >= 8);
                assert!(known.contains(&op));
            }
        }
    }

    // ---- Validator: each rule broken once, and its legal neighbours ----

    #[test]
    fn reserved_opcodes() {
        for dir in [ClientToServer, ServerToClient] {
            for op in (0x3..=0x7).chain(0xB..=0xF) {
                let r = validator(dir).check(&frame(dir, true, op, 0));
                assert_violation(r, 1002, "reserved opcode");
            }
            for op in [TEXT, BINARY, CLOSE, PING, PONG] {
                assert!(
                    validator(dir).check(&frame(dir, true, op, 0)).is_ok(),
                    "{op}"
                );
            }
            let mut v = validator(dir);
            v.check(&frame(dir, false, TEXT, 0)).unwrap();
            assert!(v.check(&frame(dir, true, CONT, 0)).is_ok());
        }
    }

    #[test]
    fn rsv2_and_rsv3() {
        for allow_rsv1 in [false, true] {
            let mut v = Validator::new(ServerToClient, allow_rsv1, Limits::default());
            let ok = frame(ServerToClient, true, BINARY, 3);
            let r = v.check(&FrameHeader { rsv2: true, ..ok });
            assert_violation(r, 1002, "RSV2 or RSV3 set");
            let r = v.check(&FrameHeader { rsv3: true, ..ok });
            assert_violation(r, 1002, "RSV2 or RSV3 set");
            assert!(v.check(&ok).is_ok());
        }
    }

    #[test]
    fn rsv1_without_negotiation() {
        for dir in [ClientToServer, ServerToClient] {
            for op in [TEXT, BINARY, PING] {
                let h = FrameHeader {
                    rsv1: true,
                    ..frame(dir, true, op, 3)
                };
                let r = validator(dir).check(&h);
                assert_violation(r, 1002, "RSV1 set without a negotiated extension");
            }
        }
    }

    #[test]
    fn rsv1_with_permessage_deflate() {
        for dir in [ClientToServer, ServerToClient] {
            let mut v = Validator::new(dir, true, Limits::default());
            let rsv1 = |h: FrameHeader| FrameHeader { rsv1: true, ..h };
            // Allowed on the first frame of a message, fragmented or not...
            assert!(v.check(&rsv1(frame(dir, true, TEXT, 5))).is_ok());
            assert!(v.check(&rsv1(frame(dir, true, BINARY, 5))).is_ok());
            assert!(v.check(&rsv1(frame(dir, false, TEXT, 5))).is_ok());
            // ...and uncompressed messages stay legal.
            let mut plain = Validator::new(dir, true, Limits::default());
            assert!(plain.check(&frame(dir, true, TEXT, 5)).is_ok());
            // Not on a continuation frame...
            let r = v.check(&rsv1(frame(dir, false, CONT, 5)));
            assert_violation(r, 1002, "RSV1 set on a continuation frame");
            assert!(v.check(&frame(dir, true, CONT, 5)).is_ok());
            // ...nor on a control frame.
            for op in CONTROLS {
                let r = v.check(&rsv1(frame(dir, true, op, 2)));
                assert_violation(r, 1002, "RSV1 set on a control frame");
            }
        }
    }

    #[test]
    fn control_frame_payload_limit() {
        for dir in [ClientToServer, ServerToClient] {
            for op in CONTROLS {
                assert!(validator(dir).check(&frame(dir, true, op, 125)).is_ok());
                for len in [126, 65536, i64::MAX as u64] {
                    let r = validator(dir).check(&frame(dir, true, op, len));
                    assert_violation(r, 1002, "control frame payload over 125 bytes");
                }
            }
        }
    }

    #[test]
    fn control_frames_are_not_fragmented() {
        for dir in [ClientToServer, ServerToClient] {
            for op in CONTROLS {
                let r = validator(dir).check(&frame(dir, false, op, 0));
                assert_violation(r, 1002, "fragmented control frame");
            }
        }
    }

    #[test]
    fn close_payload_of_one_byte() {
        for dir in [ClientToServer, ServerToClient] {
            let r = validator(dir).check(&frame(dir, true, CLOSE, 1));
            assert_violation(r, 1002, "close frame with a 1-byte payload");
            for len in [0, 2, 125] {
                assert_eq!(
                    validator(dir).check(&frame(dir, true, CLOSE, len)),
                    Ok(FrameKind::Close)
                );
            }
            // Only Close needs a code.
            assert!(validator(dir).check(&frame(dir, true, PING, 1)).is_ok());
        }
    }

    #[test]
    fn continuation_outside_a_message() {
        for dir in [ClientToServer, ServerToClient] {
            let cont = |fin| frame(dir, fin, CONT, 1);
            let reason = "continuation frame outside a message";
            for fin in [false, true] {
                assert_violation(validator(dir).check(&cont(fin)), 1002, reason);
            }
            // After a whole unfragmented message.
            let mut v = validator(dir);
            v.check(&frame(dir, true, BINARY, 1)).unwrap();
            assert_violation(v.check(&cont(true)), 1002, reason);
            // After a fragmented message ended.
            v.check(&frame(dir, false, BINARY, 1)).unwrap();
            v.check(&cont(true)).unwrap();
            assert_violation(v.check(&cont(false)), 1002, reason);
        }
    }

    #[test]
    fn new_message_inside_a_message() {
        for dir in [ClientToServer, ServerToClient] {
            for first in [TEXT, BINARY] {
                for second in [TEXT, BINARY] {
                    for fin in [false, true] {
                        let mut v = validator(dir);
                        v.check(&frame(dir, false, first, 1)).unwrap();
                        let r = v.check(&frame(dir, fin, second, 1));
                        assert_violation(r, 1002, "new message before the previous one ended");
                        // Once the message ends, a new one may start.
                        v.check(&frame(dir, true, CONT, 1)).unwrap();
                        assert!(v.check(&frame(dir, fin, second, 1)).is_ok());
                    }
                }
            }
        }
    }

    #[test]
    fn client_frames_are_masked() {
        for op in [TEXT, BINARY, CLOSE, PING, PONG] {
            let r = validator(ClientToServer).check(&hdr(true, op, None, 2));
            assert_violation(r, 1002, "unmasked client frame");
            assert!(
                validator(ClientToServer)
                    .check(&hdr(true, op, Some(M), 2))
                    .is_ok()
            );
            assert!(
                validator(ClientToServer)
                    .check(&hdr(true, op, Some([0; 4]), 2))
                    .is_ok()
            );
        }
    }

    #[test]
    fn server_frames_are_not_masked() {
        for op in [TEXT, BINARY, CLOSE, PING, PONG] {
            let r = validator(ServerToClient).check(&hdr(true, op, Some(M), 2));
            assert_violation(r, 1002, "masked server frame");
            let r = validator(ServerToClient).check(&hdr(true, op, Some([0; 4]), 2));
            assert_violation(r, 1002, "masked server frame");
            assert!(
                validator(ServerToClient)
                    .check(&hdr(true, op, None, 2))
                    .is_ok()
            );
        }
    }

    #[test]
    fn frame_size_limit() {
        let limits = Limits {
            max_frame: 1000,
            max_message: 1 << 40,
        };
        for dir in [ClientToServer, ServerToClient] {
            for op in [TEXT, BINARY] {
                let mut v = Validator::new(dir, false, limits);
                assert!(v.check(&frame(dir, true, op, 1000)).is_ok());
                assert_violation(v.check(&frame(dir, true, op, 1001)), 1009, "frame too big");
                v.check(&frame(dir, false, op, 0)).unwrap();
                assert_violation(
                    v.check(&frame(dir, true, CONT, 1001)),
                    1009,
                    "frame too big",
                );
                assert!(v.check(&frame(dir, true, CONT, 1000)).is_ok());
            }
            // Default: 16 MiB frames pass (Autobahn 9.x sends them).
            let mut v = validator(dir);
            assert!(v.check(&frame(dir, true, BINARY, 16 << 20)).is_ok());
            let r = v.check(&frame(dir, true, BINARY, (16 << 20) + 1));
            assert_violation(r, 1009, "frame too big");
            let r = v.check(&frame(dir, true, BINARY, i64::MAX as u64));
            assert_violation(r, 1009, "frame too big");
        }
    }

    #[test]
    fn message_size_limit() {
        let limits = Limits {
            max_frame: 100,
            max_message: 250,
        };
        for dir in [ClientToServer, ServerToClient] {
            let mut v = Validator::new(dir, false, limits);
            v.check(&frame(dir, false, TEXT, 100)).unwrap();
            // Control frames do not count toward the message.
            v.check(&frame(dir, true, PING, 100)).unwrap();
            v.check(&frame(dir, false, CONT, 100)).unwrap();
            assert!(v.check(&frame(dir, true, CONT, 50)).is_ok(), "exactly 250");

            v.check(&frame(dir, false, BINARY, 100)).unwrap();
            v.check(&frame(dir, false, CONT, 100)).unwrap();
            v.check(&frame(dir, false, CONT, 50)).unwrap();
            let r = v.check(&frame(dir, true, CONT, 1));
            assert_violation(r, 1009, "message too big");
            assert!(v.check(&frame(dir, true, CONT, 0)).is_ok());

            // A limit below the frame limit applies to unfragmented messages.
            let mut v = Validator::new(
                dir,
                false,
                Limits {
                    max_frame: 100,
                    max_message: 10,
                },
            );
            assert!(v.check(&frame(dir, true, TEXT, 10)).is_ok());
            assert_violation(
                v.check(&frame(dir, true, TEXT, 11)),
                1009,
                "message too big",
            );
            assert!(v.check(&frame(dir, true, PING, 100)).is_ok());
        }
    }

    #[test]
    fn default_limits() {
        let d = Limits::default();
        assert_eq!((d.max_frame, d.max_message), (16 << 20, 64 << 20));
        let dir = ClientToServer;
        let mut v = validator(dir);
        v.check(&frame(dir, false, BINARY, 16 << 20)).unwrap();
        v.check(&frame(dir, false, CONT, 16 << 20)).unwrap();
        v.check(&frame(dir, false, CONT, 16 << 20)).unwrap();
        v.check(&frame(dir, false, CONT, 16 << 20)).unwrap();
        assert_violation(v.check(&frame(dir, true, CONT, 1)), 1009, "message too big");
    }

    #[test]
    fn nothing_after_close() {
        for dir in [ClientToServer, ServerToClient] {
            for next in [TEXT, BINARY, CONT, CLOSE, PING, PONG, 0x3] {
                let mut v = validator(dir);
                assert!(!v.closed());
                assert_eq!(v.check(&frame(dir, true, CLOSE, 2)), Ok(FrameKind::Close));
                assert!(v.closed());
                let r = v.check(&frame(dir, true, next, 0));
                assert_violation(r, 1002, "frame after close");
            }
            // Each direction has its own state.
            let mut this = validator(dir);
            let other_dir = match dir {
                ClientToServer => ServerToClient,
                ServerToClient => ClientToServer,
            };
            let mut other = validator(other_dir);
            this.check(&frame(dir, true, CLOSE, 0)).unwrap();
            assert!(other.check(&frame(other_dir, true, TEXT, 1)).is_ok());
            assert_eq!(
                other.check(&frame(other_dir, true, CLOSE, 0)),
                Ok(FrameKind::Close)
            );
        }
    }

    #[test]
    fn close_inside_a_fragmented_message() {
        // Legal (control frames may interleave), and it ends the stream.
        let dir = ClientToServer;
        let mut v = validator(dir);
        v.check(&frame(dir, false, TEXT, 3)).unwrap();
        assert_eq!(v.check(&frame(dir, true, CLOSE, 2)), Ok(FrameKind::Close));
        assert!(v.in_message() && v.closed());
        assert_violation(
            v.check(&frame(dir, true, CONT, 3)),
            1002,
            "frame after close",
        );
    }

    #[test]
    fn a_violation_changes_nothing() {
        let dir = ServerToClient;
        let mut v = Validator::new(
            dir,
            false,
            Limits {
                max_frame: 100,
                max_message: 150,
            },
        );
        v.check(&frame(dir, false, TEXT, 100)).unwrap();
        let before = v.clone();
        let bad = [
            frame(dir, true, 0x3, 0),
            frame(dir, true, TEXT, 0),
            frame(dir, true, CONT, 51),
            frame(dir, true, CONT, 101),
            frame(dir, false, CLOSE, 0),
            hdr(true, CONT, Some(M), 0),
            FrameHeader {
                rsv1: true,
                ..frame(dir, true, CONT, 0)
            },
        ];
        for h in bad {
            assert!(v.check(&h).is_err(), "{h:?}");
            assert_eq!(v, before, "{h:?}");
        }
        assert_eq!(
            v.check(&frame(dir, true, CONT, 50)),
            Ok(FrameKind::Data {
                first: false,
                last: true
            })
        );
    }

    #[test]
    fn violation_display() {
        let v = protocol_error("reserved opcode");
        assert_eq!(v.to_string(), "reserved opcode (close 1002)");
        assert_eq!(
            too_big("frame too big").to_string(),
            "frame too big (close 1009)"
        );
    }

    // ---- fragmentation ----

    #[test]
    fn fragmented_message() {
        for dir in [ClientToServer, ServerToClient] {
            let mut v = validator(dir);
            assert!(!v.in_message());
            let data = |first, last| Ok(FrameKind::Data { first, last });
            assert_eq!(v.check(&frame(dir, false, TEXT, 3)), data(true, false));
            assert!(v.in_message());
            assert_eq!(v.check(&frame(dir, false, CONT, 0)), data(false, false));
            assert!(v.in_message());
            assert_eq!(v.check(&frame(dir, true, CONT, 3)), data(false, true));
            assert!(!v.in_message());
            // An unfragmented one is first and last.
            assert_eq!(v.check(&frame(dir, true, BINARY, 3)), data(true, true));
            assert!(!v.in_message());
        }
    }

    #[test]
    fn fragmented_message_with_interleaved_control_frames() {
        for dir in [ClientToServer, ServerToClient] {
            let mut v = validator(dir);
            let data = |first, last| Ok(FrameKind::Data { first, last });
            assert_eq!(v.check(&frame(dir, false, BINARY, 10)), data(true, false));
            assert_eq!(v.check(&frame(dir, true, PING, 4)), Ok(FrameKind::Ping));
            assert!(v.in_message(), "a control frame does not end the message");
            assert_eq!(v.check(&frame(dir, false, CONT, 10)), data(false, false));
            assert_eq!(v.check(&frame(dir, true, PONG, 4)), Ok(FrameKind::Pong));
            assert_eq!(v.check(&frame(dir, true, PING, 0)), Ok(FrameKind::Ping));
            assert!(v.in_message());
            assert_eq!(v.check(&frame(dir, true, CONT, 10)), data(false, true));
            assert!(!v.in_message());
            assert_eq!(v.check(&frame(dir, true, PONG, 0)), Ok(FrameKind::Pong));
            assert!(!v.in_message());
        }
    }

    // ---- frames weir builds ----

    /// Parses a whole built frame, checks it in `dir`, returns the kind and
    /// the unmasked payload.
    fn roundtrip(wire: &[u8], dir: Direction) -> (FrameHeader, FrameKind, Vec<u8>) {
        let h = parse(wire);
        assert_eq!(h.header_len as u64 + h.payload_len, wire.len() as u64);
        let kind = validator(dir).check(&h).expect("legal");
        let mut payload = wire[h.header_len..].to_vec();
        if let Some(mask) = h.mask {
            apply_mask(&mut payload, mask, 0);
        }
        (h, kind, payload)
    }

    #[test]
    fn close_frame_roundtrip() {
        for dir in [ClientToServer, ServerToClient] {
            for (code, reason) in [(1000, ""), (1001, "going away"), (1009, "x"), (4999, "é")] {
                let wire = close_frame(code, reason, mask_for(dir));
                let (h, kind, payload) = roundtrip(&wire, dir);
                assert_eq!(kind, FrameKind::Close);
                assert_eq!(h.mask, mask_for(dir));
                assert_eq!(close_code(&wire[h.header_len..], h.mask), Some(code));
                assert_eq!(&payload[..2], code.to_be_bytes());
                assert_eq!(&payload[2..], reason.as_bytes());
            }
        }
        // The masked payload really is masked.
        let wire = close_frame(1001, "bye", Some(M));
        assert_eq!(&wire[..6], [0x88, 0x85, 0x37, 0xFA, 0x21, 0x3D]);
        assert_ne!(&wire[6..8], 1001u16.to_be_bytes());
        assert_eq!(close_frame(1000, "", None), [0x88, 0x02, 0x03, 0xE8]);
    }

    #[test]
    fn close_reason_is_cut_at_a_char_boundary() {
        let reason_of = |reason: &str| {
            let wire = close_frame(1000, reason, None);
            assert!(wire.len() <= 2 + 125);
            String::from_utf8(wire[4..].to_vec()).expect("UTF-8")
        };
        assert_eq!(reason_of(&"a".repeat(123)), "a".repeat(123));
        assert_eq!(reason_of(&"a".repeat(200)), "a".repeat(123));
        // 2-byte chars: 61 fit (122 bytes), the 62nd would end at 124.
        assert_eq!(reason_of(&"é".repeat(100)), "é".repeat(61));
        // 3-byte chars: 41 fit exactly.
        assert_eq!(reason_of(&"€".repeat(41)), "€".repeat(41));
        assert_eq!(reason_of(&"€".repeat(42)), "€".repeat(41));
        // 4-byte chars straddling 123 at every offset.
        for pad in 0..4 {
            let reason = "a".repeat(pad) + &"🦀".repeat(40);
            let cut = reason_of(&reason);
            assert!(reason.starts_with(&cut));
            assert!(cut.len() <= 123 && cut.len() > 119, "{pad}: {}", cut.len());
        }
    }

    #[test]
    fn ping_frame_roundtrip() {
        for dir in [ClientToServer, ServerToClient] {
            for payload in [&b""[..], b"keepalive", &[0xA5; 125]] {
                let wire = ping_frame(payload, mask_for(dir));
                let (h, kind, got) = roundtrip(&wire, dir);
                assert_eq!(kind, FrameKind::Ping);
                assert_eq!(h.mask, mask_for(dir));
                assert_eq!(got, payload);
            }
        }
        assert_eq!(ping_frame(b"", None), [0x89, 0x00]);
    }

    #[test]
    #[should_panic(expected = "ping payload over 125 bytes")]
    fn ping_payload_over_125_bytes() {
        ping_frame(&[0; 126], None);
    }

    #[test]
    fn close_code_reading() {
        assert_eq!(close_code(&[], None), None);
        assert_eq!(close_code(&[], Some(M)), None);
        assert_eq!(close_code(&[0x03], None), None);
        assert_eq!(close_code(&[0x03, 0xE9], None), Some(1001));
        assert_eq!(close_code(&[0x03, 0xE9, b'x', b'y'], None), Some(1001));
        let masked = [0x03 ^ M[0], 0xEA ^ M[1], b'x' ^ M[2]];
        assert_eq!(close_code(&masked, Some(M)), Some(1002));
    }

    #[test]
    fn close_codes_a_peer_may_send() {
        let allowed: Vec<u16> = (0..=u16::MAX).filter(|c| close_code_allowed(*c)).collect();
        let mut expected: Vec<u16> = vec![1000, 1001, 1002, 1003];
        expected.extend(1007..=1014);
        expected.extend(3000..=4999);
        assert_eq!(allowed, expected);
        for bad in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!close_code_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn close_payloads() {
        assert_eq!(check_close_payload(&[]), Ok(CLOSE_NO_STATUS));
        assert_eq!(check_close_payload(&[0x03, 0xE8]), Ok(1000));
        assert_eq!(check_close_payload(b"\x0f\xa0caf\xc3\xa9"), Ok(4000));
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            let mut p = code.to_be_bytes().to_vec();
            p.extend_from_slice(b"x");
            assert_eq!(
                check_close_payload(&p).map_err(|v| (v.code, v.reason)),
                Err((1002, "invalid close code")),
                "{code}"
            );
        }
        assert_eq!(
            check_close_payload(&[0x03, 0xE8, 0xff, 0xfe]).map_err(|v| v.code),
            Err(1007)
        );
        assert_eq!(check_close_payload(&[0x03]).map_err(|v| v.code), Err(1002));
    }

    #[test]
    fn masking_at_an_offset() {
        let mut hello = *b"Hello";
        apply_mask(&mut hello, M, 0);
        assert_eq!(hello, [0x7f, 0x9f, 0x4d, 0x51, 0x58]);
        // Unmask "llo" alone: it starts at payload byte 2.
        let mut tail = [0x4d, 0x51, 0x58];
        apply_mask(&mut tail, M, 2);
        assert_eq!(&tail, b"llo");
        // Offsets wrap modulo 4, even at the top of the range.
        let mut a = *b"abcd";
        apply_mask(&mut a, M, u64::MAX - 1);
        let mut b = *b"abcd";
        apply_mask(&mut b, M, 2);
        assert_eq!(a, b);
        apply_mask(&mut [], M, 3);
    }

    // ---- properties ----

    mod properties {
        use super::*;
        use proptest::collection::vec;
        use proptest::option;
        use proptest::prelude::*;

        /// Payload lengths spread over all three encodings and their edges.
        fn any_len() -> impl Strategy<Value = u64> {
            prop_oneof![
                0..=125u64,
                126..=0xFFFFu64,
                0x1_0000..=i64::MAX as u64,
                prop::sample::select(vec![0, 125, 126, 0xFFFF, 0x1_0000, i64::MAX as u64]),
            ]
        }

        /// Byte strings that often start like a header with an extended length.
        fn header_like_bytes() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                vec(any::<u8>(), 0..20),
                (
                    any::<u8>(),
                    any::<bool>(),
                    prop::sample::select(vec![126u8, 127]),
                    vec(any::<u8>(), 0..16)
                )
                    .prop_map(|(b0, masked, len, rest)| {
                        let mut v = vec![b0, len | if masked { 0x80 } else { 0 }];
                        v.extend(rest);
                        v
                    }),
            ]
        }

        fn any_header() -> impl Strategy<Value = FrameHeader> {
            (
                any::<[bool; 4]>(),
                0..16u8,
                option::of(any::<[u8; 4]>()),
                any_len(),
            )
                .prop_map(|([fin, rsv1, rsv2, rsv3], opcode, mask, len)| FrameHeader {
                    rsv1,
                    rsv2,
                    rsv3,
                    opcode,
                    ..FrameHeader::new(fin, Opcode::Continuation, mask, len)
                })
        }

        proptest! {
            #[test]
            fn parse_never_panics_and_reencodes(buf in header_like_bytes()) {
                match parse_header(&buf) {
                    Ok(Some(h)) => {
                        prop_assert!((2..=MAX_HEADER_LEN).contains(&h.header_len));
                        prop_assert!(h.header_len <= buf.len());
                        prop_assert_eq!(h.header_len, header_len(h.payload_len, h.mask.is_some()));
                        prop_assert_eq!(encode(&h), &buf[..h.header_len]);
                        for cut in 0..h.header_len {
                            prop_assert_eq!(parse_header(&buf[..cut]), Ok(None));
                        }
                    }
                    Ok(None) => prop_assert!(buf.len() < MAX_HEADER_LEN),
                    Err(v) => prop_assert_eq!(v.code, CLOSE_PROTOCOL_ERROR),
                }
            }

            #[test]
            fn encode_then_parse_is_identity(h in any_header(), tail in vec(any::<u8>(), 0..8)) {
                let mut wire = encode(&h);
                prop_assert_eq!(wire.len(), h.header_len);
                wire.extend(tail);
                prop_assert_eq!(parse_header(&wire), Ok(Some(h)));
            }

            #[test]
            fn check_is_all_or_nothing(
                dir in prop_oneof![Just(ClientToServer), Just(ServerToClient)],
                allow_rsv1: bool,
                max_frame in 0..300u64,
                max_message in 0..1000u64,
                headers in vec(any_header(), 0..40),
            ) {
                let mut v = Validator::new(dir, allow_rsv1, Limits { max_frame, max_message });
                for h in headers {
                    let h = FrameHeader { payload_len: h.payload_len % 400, ..h };
                    let before = v.clone();
                    match v.check(&h) {
                        Err(e) => {
                            prop_assert_eq!(&v, &before);
                            prop_assert!(e.code == 1002 || e.code == 1009);
                        }
                        Ok(kind) => {
                            // The stateless rules, restated.
                            let op = Opcode::from_u8(h.opcode).expect("known opcode");
                            prop_assert!(!before.closed() && !h.rsv2 && !h.rsv3);
                            prop_assert_eq!(h.mask.is_some(), dir == ClientToServer);
                            prop_assert!(h.payload_len <= max_frame);
                            prop_assert!(!h.rsv1 || (allow_rsv1 && matches!(op, Opcode::Text | Opcode::Binary)));
                            if op.is_control() {
                                prop_assert!(h.fin && h.payload_len <= 125);
                                prop_assert_eq!(v.in_message(), before.in_message());
                            }
                            match kind {
                                FrameKind::Data { first, last } => {
                                    prop_assert_eq!(first, !before.in_message());
                                    prop_assert_eq!(last, !v.in_message());
                                }
                                FrameKind::Close => prop_assert!(v.closed()),
                                FrameKind::Ping | FrameKind::Pong => {}
                            }
                        }
                    }
                }
            }

            #[test]
            fn masking_is_an_involution_at_any_split(
                data in vec(any::<u8>(), 0..64),
                mask: [u8; 4],
                offset in prop_oneof![any::<u64>().prop_map(|o| o / 2), 0..8u64],
                split: prop::sample::Index,
            ) {
                let split = split.index(data.len() + 1);
                let mut whole = data.clone();
                apply_mask(&mut whole, mask, offset);
                let mut pieces = data.clone();
                let (a, b) = pieces.split_at_mut(split);
                apply_mask(a, mask, offset);
                apply_mask(b, mask, offset + split as u64);
                prop_assert_eq!(&whole, &pieces);
                apply_mask(&mut whole, mask, offset);
                prop_assert_eq!(whole, data);
            }
        }

        /// Like [`any_len`], capped so that message lengths cannot overflow.
        fn data_len() -> impl Strategy<Value = u64> {
            prop_oneof![
                0..=125u64,
                126..=0xFFFFu64,
                0x1_0000..=1u64 << 40,
                prop::sample::select(vec![0, 125, 126, 0xFFFF, 0x1_0000]),
            ]
        }

        /// One data message: opcode, RSV1 wish, and per fragment its length
        /// and an optional control frame to send after it.
        type Message = (u8, bool, Vec<(u64, Option<(u8, u64)>)>);

        fn message() -> impl Strategy<Value = Message> {
            let control = (prop::sample::select(vec![PING, PONG]), 0..=125u64);
            (
                prop::sample::select(vec![TEXT, BINARY]),
                any::<bool>(),
                vec((data_len(), option::of(control)), 1..6),
            )
        }

        proptest! {
            /// Valid sequences pass with limits set to exactly their largest
            /// frame and message, and fail with 1009 when the message limit is
            /// one less.
            #[test]
            fn valid_sequences_pass(
                dir in prop_oneof![Just(ClientToServer), Just(ServerToClient)],
                allow_rsv1: bool,
                mask: [u8; 4],
                messages in vec(message(), 0..8),
                close in option::of(prop_oneof![Just(0u64), 2..=125u64]),
            ) {
                let mask = (dir == ClientToServer).then_some(mask);
                let mut frames = Vec::new();
                let (mut max_frame, mut max_message) = (125, 0);
                for (opcode, rsv1, fragments) in &messages {
                    let n = fragments.len();
                    let mut total = 0u64;
                    for (i, &(len, control)) in fragments.iter().enumerate() {
                        let op = if i == 0 { *opcode } else { CONT };
                        let h = FrameHeader {
                            rsv1: i == 0 && *rsv1 && allow_rsv1,
                            ..hdr(i == n - 1, op, mask, len)
                        };
                        frames.push((h, FrameKind::Data { first: i == 0, last: i == n - 1 }));
                        if let Some((op, len)) = control {
                            let kind = if op == PING { FrameKind::Ping } else { FrameKind::Pong };
                            frames.push((hdr(true, op, mask, len), kind));
                        }
                        max_frame = max_frame.max(len);
                        total += len;
                    }
                    max_message = max_message.max(total);
                }
                if let Some(len) = close {
                    frames.push((hdr(true, CLOSE, mask, len), FrameKind::Close));
                }

                let limits = Limits { max_frame, max_message };
                let mut v = Validator::new(dir, allow_rsv1, limits);
                let mut open = false;
                for (h, kind) in &frames {
                    prop_assert_eq!(parse_header(&encode(h)), Ok(Some(*h)));
                    prop_assert_eq!(v.check(h), Ok(*kind));
                    if let FrameKind::Data { last, .. } = kind {
                        open = !last;
                    }
                    prop_assert_eq!(v.in_message(), open);
                }
                prop_assert!(!v.in_message());
                prop_assert_eq!(v.closed(), close.is_some());
                if close.is_some() {
                    let r = v.check(&hdr(true, PING, mask, 0));
                    prop_assert_eq!(r.unwrap_err().reason, "frame after close");
                }

                if max_message > 0 {
                    let limits = Limits { max_message: max_message - 1, ..limits };
                    let mut v = Validator::new(dir, allow_rsv1, limits);
                    let first_err = frames.iter().find_map(|(h, _)| v.check(h).err());
                    prop_assert_eq!(first_err.map(|e| e.code), Some(CLOSE_MESSAGE_TOO_BIG));
                }
            }
        }
    }
}
