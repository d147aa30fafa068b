//! One direction of a relayed WebSocket, sans-IO: reads arrive in whatever
//! pieces TCP delivers; the scanner finds the frame headers in them, has
//! [`Validator`] judge each, and says which bytes may be sent on. Payloads
//! are never copied or unmasked: the worker sends straight from the
//! receive buffer.
//!
//! A header split across two reads is held back (at most 13 bytes, copied)
//! until it is complete and judged, so no byte of a frame that breaks a
//! rule ever reaches the other side, and weir can put its Close right
//! after the last good frame.

use super::frame::{self, Direction, FrameHeader, FrameKind, Limits, Validator, Violation};

/// What to do with one read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fed {
    /// Header bytes held from earlier reads, to send before this read's
    /// bytes.
    pub held: Option<Vec<u8>>,
    /// How many leading bytes of this read to send on.
    pub pass: usize,
    /// A rule was broken at the end of what passes: close with it.
    pub violation: Option<Violation>,
    /// Close frames that passed, with their codes when the payload had one
    /// (1005 "no status" otherwise), for the metrics.
    pub closes: Vec<u16>,
    /// Frames whose header passed in this read.
    pub frames: u32,
}

/// Scanner state of one direction.
#[derive(Debug)]
pub struct Scanner {
    validator: Validator,
    /// A header that began in an earlier read.
    partial: Vec<u8>,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
    /// Collecting a Close frame's code: mask, bytes so far, payload offset.
    close: Option<CloseCode>,
    /// A Close went by and more came after it: dropped from here on.
    discarding: bool,
}

#[derive(Debug)]
struct CloseCode {
    mask: Option<[u8; 4]>,
    /// The code's two bytes, `got` of them so far (inline: every
    /// connection carries a scanner).
    bytes: [u8; 2],
    got: u8,
}

/// "No status received" (RFC 6455 7.4.1), for a Close without a code.
pub const NO_STATUS: u16 = 1005;

impl Scanner {
    pub fn new(dir: Direction, allow_rsv1: bool, limits: Limits) -> Self {
        Self {
            validator: Validator::new(dir, allow_rsv1, limits),
            partial: Vec::new(),
            remaining: 0,
            close: None,
            discarding: false,
        }
    }

    /// Between frames: weir may insert a frame of its own here.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0 && self.partial.is_empty()
    }

    /// A Close frame went by in this direction.
    pub fn closed(&self) -> bool {
        self.validator.closed()
    }

    /// Scans one read.
    pub fn feed(&mut self, data: &[u8]) -> Fed {
        let mut fed = Fed::default();
        if self.discarding {
            return fed;
        }
        let mut i = 0;
        // A header begun in an earlier read, completed by this one.
        let mut held_from_earlier = std::mem::take(&mut self.partial);
        while i < data.len() {
            if self.remaining > 0 {
                let take = (self.remaining.min((data.len() - i) as u64)) as usize;
                self.collect_close(&data[i..i + take], &mut fed);
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
            // A header: from the held bytes plus this read, or this read.
            let start = i;
            let (header, used) = if held_from_earlier.is_empty() {
                match frame::parse_header(&data[i..]) {
                    Ok(Some(h)) => (Ok(h), h.header_len),
                    Ok(None) => {
                        self.partial = data[i..].to_vec();
                        fed.pass = start;
                        return fed;
                    }
                    Err(v) => (Err(v), 0),
                }
            } else {
                let old = held_from_earlier.len();
                let mut joined = held_from_earlier.clone();
                joined.extend_from_slice(&data[i..(i + 14).min(data.len())]);
                match frame::parse_header(&joined) {
                    Ok(Some(h)) => (Ok(h), h.header_len - old),
                    Ok(None) => {
                        // Still not complete: everything so far is held.
                        held_from_earlier.extend_from_slice(&data[i..]);
                        self.partial = held_from_earlier;
                        fed.pass = 0;
                        return fed;
                    }
                    Err(v) => (Err(v), 0),
                }
            };
            let judged = header.and_then(|h| self.validator.check(&h).map(|kind| (h, kind)));
            match judged {
                Ok((h, kind)) => {
                    fed.frames += 1;
                    self.start_frame(&h, kind, &mut fed);
                    i += used;
                    // The held bytes are good now: they go out first.
                    if !held_from_earlier.is_empty() {
                        fed.held = Some(std::mem::take(&mut held_from_earlier));
                    }
                }
                Err(v) => {
                    // Nothing of the bad frame passes, held bytes included.
                    fed.pass = if held_from_earlier.is_empty() {
                        start
                    } else {
                        0
                    };
                    fed.violation = Some(v);
                    return fed;
                }
            }
        }
        fed.pass = data.len();
        fed
    }

    fn start_frame(&mut self, h: &FrameHeader, kind: FrameKind, fed: &mut Fed) {
        self.remaining = h.payload_len;
        if kind == FrameKind::Close {
            if h.payload_len == 0 {
                fed.closes.push(NO_STATUS);
            } else {
                self.close = Some(CloseCode {
                    mask: h.mask,
                    bytes: [0; 2],
                    got: 0,
                });
            }
        }
    }

    fn collect_close(&mut self, payload: &[u8], fed: &mut Fed) {
        let Some(c) = self.close.as_mut() else {
            return;
        };
        let got = c.got as usize;
        let take = (2 - got).min(payload.len());
        c.bytes[got..got + take].copy_from_slice(&payload[..take]);
        c.got += take as u8;
        if c.got == 2 || self.remaining == payload.len() as u64 {
            let code = frame::close_code(&c.bytes[..c.got as usize], c.mask).unwrap_or(NO_STATUS);
            fed.closes.push(code);
            self.close = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l7::frame::{FrameHeader, Opcode, close_frame, ping_frame};

    fn data_frame(op: Opcode, fin: bool, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = Vec::new();
        FrameHeader::new(fin, op, mask, payload.len() as u64).write_to(&mut out);
        let mut p = payload.to_vec();
        if let Some(m) = mask {
            frame::apply_mask(&mut p, m, 0);
        }
        out.extend_from_slice(&p);
        out
    }

    /// A client stream: text, fragmented binary with a ping between, a big
    /// frame (16-bit length), and a Close 1000.
    fn client_stream() -> Vec<u8> {
        let m = Some([1, 2, 3, 4]);
        let mut s = data_frame(Opcode::Text, true, b"hello", m);
        s.extend(data_frame(Opcode::Binary, false, &[7; 300], m));
        s.extend(ping_frame(b"p", m));
        s.extend(data_frame(Opcode::Continuation, true, &[8; 70_000], m));
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
        let good = data_frame(Opcode::Text, true, b"ok", Some([9, 9, 9, 9]));
        let mut stream = good.clone();
        // Unmasked from a client: 1002.
        stream.extend(data_frame(Opcode::Text, true, b"bad", None));
        stream.extend(data_frame(Opcode::Text, true, b"never", Some([1, 1, 1, 1])));
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
        let frame = data_frame(Opcode::Binary, true, &[0; 1001], None);
        let fed = s.feed(&frame);
        assert_eq!((fed.pass, fed.violation.map(|v| v.code)), (0, Some(1009)));
    }

    #[test]
    fn boundaries_are_known_for_injection() {
        let stream = data_frame(Opcode::Binary, true, &[5; 100], Some([1, 2, 3, 4]));
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
        let fed = s.feed(&data_frame(Opcode::Text, true, b"late", None));
        assert_eq!(
            (fed.pass, fed.violation),
            (0, None),
            "dropped after a Close, not failed"
        );
        // In the same read as the Close: the Close passes, the rest not.
        let mut s = Scanner::new(Direction::ServerToClient, false, Limits::default());
        let close = close_frame(1000, "", None);
        let both = [close.clone(), data_frame(Opcode::Text, true, b"late", None)].concat();
        let fed = s.feed(&both);
        assert_eq!((fed.pass, fed.violation), (close.len(), None));
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
