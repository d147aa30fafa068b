//! One direction of a relayed WebSocket, sans-IO: reads arrive in whatever
//! pieces TCP delivers; the scanner finds the frame headers in them, has
//! [`Validator`] judge each, and says which bytes may be sent on. Payloads
//! are never copied or unmasked: the worker sends straight from the
//! receive buffer.
//!
//! A header split across two reads is held back (at most 13 bytes, copied)
//! until it is complete and judged, so no byte of a frame that breaks a
//! rule ever reaches the other side, and weir can put its Close right
//! after the last good frame. A Close frame is held back whole (at most
//! 139 bytes) for the same reason: its code and reason, in the payload, are
//! part of what is judged.

use super::frame::{
    self, Direction, FrameHeader, FrameKind, Limits, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, Opcode,
    Validator, Violation,
};

/// What to do with one read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fed {
    /// Bytes held from earlier reads, to send before this read's bytes.
    pub held: Option<Vec<u8>>,
    /// How many leading bytes of this read to send on.
    pub pass: usize,
    /// A rule was broken at the end of what passes: close with it.
    pub violation: Option<Violation>,
    /// Codes of the Close frames seen, for the metrics: those that passed
    /// (1005 "no status" for one without a code), and the code of one
    /// refused for it.
    pub closes: Vec<u16>,
    /// Frames that passed in this read.
    pub frames: u32,
}

/// Scanner state of one direction.
#[derive(Debug)]
pub struct Scanner {
    validator: Validator,
    /// A header, or a whole Close frame, that began in an earlier read.
    partial: Vec<u8>,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
    /// A valid Close passed.
    close_passed: bool,
    /// A Close went by and more came after it: dropped from here on.
    discarding: bool,
}

/// The most the scanner holds back: a whole Close frame.
const MAX_HELD: usize = MAX_HEADER_LEN + MAX_CONTROL_PAYLOAD as usize;

/// Where a scanner stands, as plain data: what a connection handed to
/// another process carries for each direction. It is all the scanner
/// knows, so a scanner resumed from it goes on at any byte of the stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScannerState {
    /// Payload bytes of the open fragmented message so far; `None` between
    /// messages.
    pub open_message: Option<u64>,
    /// A Close frame's header was accepted (its payload may still have
    /// been refused).
    pub close_seen: bool,
    /// A header, or a whole Close frame, not complete yet.
    pub partial: Vec<u8>,
    /// Payload bytes of the current frame still to come.
    pub remaining: u64,
    /// A valid Close passed.
    pub close_passed: bool,
    /// Bytes after a Close are dropped.
    pub discarding: bool,
}

/// What the scanner judges at the start of `buf`, and its length: a frame
/// header, or for a Close frame the whole frame. `Ok(None)`: incomplete.
fn unit(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, Violation> {
    let Some(h) = frame::parse_header(buf)? else {
        return Ok(None);
    };
    // A longer Close is refused on its header alone.
    if h.opcode == Opcode::Close as u8 && h.payload_len <= MAX_CONTROL_PAYLOAD {
        let total = h.header_len + h.payload_len as usize;
        return Ok((buf.len() >= total).then_some((h, total)));
    }
    Ok(Some((h, h.header_len)))
}

impl Scanner {
    pub fn new(dir: Direction, allow_rsv1: bool, limits: Limits) -> Self {
        Self {
            validator: Validator::new(dir, allow_rsv1, limits),
            partial: Vec::new(),
            remaining: 0,
            close_passed: false,
            discarding: false,
        }
    }

    /// A scanner that goes on from `state`, refused (with the reason) if
    /// no scanner could have been in that state: one that would
    /// misjudge the next bytes rather than go on.
    pub fn resume(
        dir: Direction,
        allow_rsv1: bool,
        limits: Limits,
        state: ScannerState,
    ) -> Result<Self, &'static str> {
        let held = !state.partial.is_empty();
        if state.partial.len() >= MAX_HELD || (held && !matches!(unit(&state.partial), Ok(None))) {
            return Err("held bytes that are not the start of a header or Close");
        }
        if held && state.remaining > 0 {
            return Err("held bytes inside a payload");
        }
        if (state.close_passed || state.discarding) && !state.close_seen {
            return Err("a Close passed that the validator did not see");
        }
        if state.close_seen && (held || state.remaining > 0) {
            return Err("a frame under way after a Close");
        }
        if state.open_message.is_some_and(|n| n > limits.max_message) {
            return Err("an open message over the message limit");
        }
        Ok(Self {
            validator: Validator::resume(
                dir,
                allow_rsv1,
                limits,
                state.open_message,
                state.close_seen,
            ),
            partial: state.partial,
            remaining: state.remaining,
            close_passed: state.close_passed,
            discarding: state.discarding,
        })
    }

    /// Where this scanner stands (see [`Scanner::resume`]).
    pub fn state(&self) -> ScannerState {
        ScannerState {
            open_message: self.validator.open_message(),
            close_seen: self.validator.closed(),
            partial: self.partial.clone(),
            remaining: self.remaining,
            close_passed: self.close_passed,
            discarding: self.discarding,
        }
    }

    /// Whether frames may carry RSV1 (permessage-deflate was negotiated).
    pub fn allow_rsv1(&self) -> bool {
        self.validator.allow_rsv1()
    }

    pub fn limits(&self) -> Limits {
        self.validator.limits()
    }

    /// Between frames: weir may insert a frame of its own here.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0 && self.partial.is_empty()
    }

    /// A valid Close frame passed in this direction.
    pub fn closed(&self) -> bool {
        self.close_passed
    }

    /// Scans one read.
    pub fn feed(&mut self, data: &[u8]) -> Fed {
        let mut fed = Fed::default();
        if self.discarding {
            return fed;
        }
        let mut i = 0;
        // A header or Close begun in an earlier read, completed by this one.
        let mut held_from_earlier = std::mem::take(&mut self.partial);
        while i < data.len() {
            if self.remaining > 0 {
                let take = (self.remaining.min((data.len() - i) as u64)) as usize;
                self.remaining -= take as u64;
                i += take;
                continue;
            }
            // After a Close, a peer must send nothing more (RFC 6455
            // 5.5.1); what it sends anyway is dropped, as an endpoint that
            // received the Close would ignore it.
            if self.validator.closed() {
                fed.pass = i;
                self.discarding = true;
                return fed;
            }
            // The unit to judge: from the held bytes plus this read (only
            // ever the first unit of a read), or from this read.
            let start = i;
            let old = held_from_earlier.len();
            let joined: Vec<u8>;
            let buf: &[u8] = if old == 0 {
                &data[i..]
            } else {
                joined = [
                    held_from_earlier.as_slice(),
                    &data[i..(i + MAX_HELD).min(data.len())],
                ]
                .concat();
                &joined
            };
            let (header, len) = match unit(buf) {
                Ok(Some((h, len))) => (Ok(h), len),
                Ok(None) => {
                    // Not complete: everything from `start` on is held
                    // (less than MAX_HELD bytes, or it would be complete).
                    held_from_earlier.extend_from_slice(&data[i..]);
                    self.partial = held_from_earlier;
                    fed.pass = start;
                    return fed;
                }
                Err(v) => (Err(v), 0),
            };
            let judged = header.and_then(|h| {
                let kind = self.validator.check(&h)?;
                if kind != FrameKind::Close {
                    return Ok((h, None));
                }
                let mut payload = buf[h.header_len..len].to_vec();
                if let Some(mask) = h.mask {
                    frame::apply_mask(&mut payload, mask, 0);
                }
                match frame::check_close_payload(&payload) {
                    Ok(code) => Ok((h, Some(code))),
                    Err(v) => {
                        fed.closes.extend(frame::close_code(&payload, None));
                        Err(v)
                    }
                }
            });
            match judged {
                Ok((h, close)) => {
                    fed.frames += 1;
                    // A held unit needed more than what was held.
                    i += len - old;
                    match close {
                        Some(code) => {
                            fed.closes.push(code);
                            self.close_passed = true;
                        }
                        None => self.remaining = h.payload_len,
                    }
                    // The held bytes are good now: they go out first.
                    if old > 0 {
                        fed.held = Some(std::mem::take(&mut held_from_earlier));
                    }
                }
                Err(v) => {
                    // Nothing of the bad frame passes, held bytes included
                    // (`start` is 0 when bytes were held).
                    fed.pass = start;
                    fed.violation = Some(v);
                    return fed;
                }
            }
        }
        fed.pass = data.len();
        fed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l7::frame::{Opcode, close_frame, ping_frame, whole_frame};

    /// A client stream: text, fragmented binary with a ping between, a big
    /// frame (16-bit length), and a Close 1000.
    fn client_stream() -> Vec<u8> {
        let m = Some([1, 2, 3, 4]);
        let mut s = whole_frame(Opcode::Text, true, b"hello", m);
        s.extend(whole_frame(Opcode::Binary, false, &[7; 300], m));
        s.extend(ping_frame(b"p", m));
        s.extend(whole_frame(Opcode::Continuation, true, &[8; 70_000], m));
        s.extend(close_frame(1000, "bye", m));
        s
    }

    /// Feeds `stream` in pieces of `size` bytes; returns the bytes passed
    /// (held + pass ranges in order), the close codes seen and frames.
    fn relay(stream: &[u8], size: usize) -> (Vec<u8>, Vec<u16>, u32, Option<Violation>) {
        let mut s = Scanner::new(Direction::ClientToServer, false, Limits::default());
        let (mut out, mut closes, mut frames) = (Vec::new(), Vec::new(), 0);
        for chunk in stream.chunks(size) {
            let fed = s.feed(chunk);
            if let Some(h) = fed.held {
                out.extend(h);
            }
            out.extend_from_slice(&chunk[..fed.pass]);
            closes.extend(fed.closes);
            frames += fed.frames;
            if fed.violation.is_some() {
                return (out, closes, frames, fed.violation);
            }
        }
        assert!(s.at_boundary());
        (out, closes, frames, None)
    }

    #[test]
    fn every_byte_passes_whatever_the_read_sizes() {
        let stream = client_stream();
        for size in [1, 2, 3, 7, 13, 14, 15, 100, 1000, 4096, stream.len()] {
            let (out, closes, frames, v) = relay(&stream, size);
            assert_eq!(v, None, "size {size}");
            assert_eq!(out, stream, "size {size}");
            assert_eq!(closes, [1000], "size {size}");
            assert_eq!(frames, 5, "size {size}");
        }
    }

    #[test]
    fn a_bad_frame_stops_at_the_last_good_byte() {
        let good = whole_frame(Opcode::Text, true, b"ok", Some([9, 9, 9, 9]));
        let mut stream = good.clone();
        // Unmasked from a client: 1002.
        stream.extend(whole_frame(Opcode::Text, true, b"bad", None));
        stream.extend(whole_frame(
            Opcode::Text,
            true,
            b"never",
            Some([1, 1, 1, 1]),
        ));
        for size in [1, 2, 5, 8, 64] {
            let (out, _, _, v) = relay(&stream, size);
            assert_eq!(out, good, "size {size}");
            assert_eq!(v.map(|v| v.code), Some(1002), "size {size}");
        }
    }

    #[test]
    fn oversized_frames_are_1009_before_any_payload_passes() {
        let mut s = Scanner::new(
            Direction::ServerToClient,
            false,
            Limits {
                max_frame: 1000,
                max_message: 1000,
            },
        );
        let frame = whole_frame(Opcode::Binary, true, &[0; 1001], None);
        let fed = s.feed(&frame);
        assert_eq!((fed.pass, fed.violation.map(|v| v.code)), (0, Some(1009)));
    }

    #[test]
    fn boundaries_are_known_for_injection() {
        let stream = whole_frame(Opcode::Binary, true, &[5; 100], Some([1, 2, 3, 4]));
        let mut s = Scanner::new(Direction::ClientToServer, false, Limits::default());
        assert!(s.at_boundary());
        s.feed(&stream[..1]);
        assert!(!s.at_boundary(), "inside a header");
        s.feed(&stream[1..50]);
        assert!(!s.at_boundary(), "inside a payload");
        s.feed(&stream[50..]);
        assert!(s.at_boundary());
    }

    #[test]
    fn close_codes_are_read_through_the_mask_and_across_reads() {
        let f = close_frame(4000, "custom", Some([0xaa, 0xbb, 0xcc, 0xdd]));
        for size in 1..f.len() {
            let (_, closes, _, v) = relay(&f, size);
            assert_eq!((closes, v), (vec![4000], None), "size {size}");
        }
        let mut s = Scanner::new(Direction::ServerToClient, false, Limits::default());
        let fed = s.feed(&close_frame(1001, "", None));
        assert_eq!(fed.closes, [1001]);
        assert!(s.closed());
        let fed = s.feed(&whole_frame(Opcode::Text, true, b"late", None));
        assert_eq!(
            (fed.pass, fed.violation),
            (0, None),
            "dropped after a Close, not failed"
        );
        // In the same read as the Close: the Close passes, the rest not.
        let mut s = Scanner::new(Direction::ServerToClient, false, Limits::default());
        let close = close_frame(1000, "", None);
        let both = [
            close.clone(),
            whole_frame(Opcode::Text, true, b"late", None),
        ]
        .concat();
        let fed = s.feed(&both);
        assert_eq!((fed.pass, fed.violation), (close.len(), None));
    }

    #[test]
    fn a_close_with_an_invalid_code_never_passes() {
        let good = whole_frame(Opcode::Text, true, b"ok", Some([9, 9, 9, 9]));
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            let mut stream = good.clone();
            stream.extend(close_frame(code, "bye", Some([0xaa, 0xbb, 0xcc, 0xdd])));
            for size in [1, 2, 5, 8, 9, 64] {
                let (out, closes, frames, v) = relay(&stream, size);
                assert_eq!(out, good, "code {code}, size {size}");
                assert_eq!(
                    v.map(|v| (v.code, v.reason)),
                    Some((1002, "invalid close code")),
                    "code {code}, size {size}"
                );
                assert_eq!(
                    (closes, frames),
                    (vec![code], 1),
                    "code {code}, size {size}"
                );
            }
        }
        // Refused, the Close did not pass: weir still owes that peer's
        // other side a Close of its own.
        let mut s = Scanner::new(Direction::ServerToClient, false, Limits::default());
        let fed = s.feed(&close_frame(1005, "", None));
        assert_eq!(fed.violation.map(|v| v.code), Some(1002));
        assert!(!s.closed());
    }

    #[test]
    fn a_close_reason_that_is_not_utf8_is_1007() {
        let mut f = Vec::new();
        FrameHeader::new(true, Opcode::Close, None, 4).write_to(&mut f);
        f.extend([0x03, 0xE8, 0xff, 0xfe]);
        let mut s = Scanner::new(Direction::ServerToClient, false, Limits::default());
        let fed = s.feed(&f);
        assert_eq!((fed.pass, fed.violation.map(|v| v.code)), (0, Some(1007)));
    }

    #[test]
    fn a_close_is_held_until_it_is_whole() {
        let close = close_frame(1000, "a reason", Some([1, 2, 3, 4]));
        let mut s = Scanner::new(Direction::ClientToServer, false, Limits::default());
        let fed = s.feed(&close[..7]);
        assert_eq!((fed.pass, fed.held.clone(), fed.closes.len()), (0, None, 0));
        assert!(!s.at_boundary() && !s.closed());
        let fed = s.feed(&close[7..]);
        assert_eq!(fed.held.as_deref(), Some(&close[..7]));
        assert_eq!((fed.pass, fed.closes), (close.len() - 7, vec![1000]));
        assert!(s.at_boundary() && s.closed());
    }

    proptest::proptest! {
        /// Any split of a valid stream relays it unchanged.
        #[test]
        fn splits_never_change_the_stream(cuts in proptest::collection::vec(1usize..5000, 1..40)) {
            let stream = client_stream();
            let mut s = Scanner::new(Direction::ClientToServer, false, Limits::default());
            let mut out = Vec::new();
            let mut at = 0usize;
            for c in cuts.iter().chain(std::iter::once(&usize::MAX)) {
                let end = at.saturating_add(*c).min(stream.len());
                let fed = s.feed(&stream[at..end]);
                proptest::prop_assert!(fed.violation.is_none());
                if let Some(h) = fed.held { out.extend(h); }
                out.extend_from_slice(&stream[at..at + fed.pass]);
                at = end;
                if at == stream.len() { break; }
            }
            proptest::prop_assert_eq!(out, stream);
        }

        /// Arbitrary bytes, Close frames with any code among them: what
        /// passes does not depend on how the reads were cut.
        #[test]
        fn what_passes_does_not_depend_on_the_cuts(
            codes in proptest::collection::vec(proptest::prelude::any::<u16>(), 0..4),
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..60),
            cut in 1usize..20,
        ) {
            let mut data = whole_frame(Opcode::Text, true, b"hi", Some([1, 2, 3, 4]));
            for code in &codes {
                data.extend(close_frame(*code, "r", Some([5, 6, 7, 8])));
            }
            data.extend(noise);
            let run = |size: usize| {
                let mut s = Scanner::new(Direction::ClientToServer, false, Limits::default());
                let mut out = Vec::new();
                for chunk in data.chunks(size) {
                    let fed = s.feed(chunk);
                    if let Some(h) = fed.held { out.extend(h); }
                    out.extend_from_slice(&chunk[..fed.pass]);
                    if fed.violation.is_some() { break; }
                }
                out
            };
            let whole = run(data.len());
            proptest::prop_assert!(data.starts_with(&whole));
            proptest::prop_assert_eq!(whole, run(cut));
        }

        /// Arbitrary bytes: never a panic, and what passes is a prefix.
        #[test]
        fn arbitrary_input_passes_a_prefix(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400), size in 1usize..50) {
            let mut s = Scanner::new(Direction::ClientToServer, true, Limits { max_frame: 1 << 20, max_message: 1 << 20 });
            let mut out = Vec::new();
            for chunk in data.chunks(size) {
                let fed = s.feed(chunk);
                if let Some(h) = fed.held { out.extend(h); }
                out.extend_from_slice(&chunk[..fed.pass]);
                if fed.violation.is_some() { break; }
            }
            proptest::prop_assert!(data.starts_with(&out));
        }
    }
}
