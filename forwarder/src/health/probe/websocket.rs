//! The WebSocket check, as a client would do it: an upgrade with a fresh
//! key, a 101 with the matching `Sec-WebSocket-Accept`, a masked ping whose
//! payload must come back in a pong, then a close answered by a close. The
//! handshake parser and the frame codec are `weir run`'s own.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use weir_ebpf::abi::HealthReason;

use super::{MAX_HEAD, Outcome, Seed, Step};
use crate::l7::frame::{self, Direction, FrameKind, Validator};
use crate::l7::handshake::{self, BackendResponse};

/// Header fields a 101 may carry before it counts as malformed.
const MAX_HEADERS: usize = 64;

#[derive(Debug)]
pub(super) struct Exchange {
    key: String,
    ping: [u8; 8],
    ping_mask: [u8; 4],
    close_mask: [u8; 4],
    phase: Phase,
    /// Read and not yet understood: the head, then frames.
    buf: Vec<u8>,
    /// The backend's frames so far, checked as a client checks them.
    frames: Validator,
    /// Payload bytes of a data frame still to come and be skipped: data
    /// messages are not what the check waits for, and are never buffered.
    skip: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the answer to the upgrade.
    Handshake,
    /// Upgraded and pinged: waiting for the pong.
    Pong,
    /// Pong seen, close sent: waiting for the backend's close.
    Close,
}

impl Exchange {
    pub(super) fn start(path: &str, host: &str, seed: &Seed) -> (Self, Vec<u8>) {
        let key = B64.encode(&seed[..16]);
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: weir-agent\r\n\
             Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        let part = |at: usize| -> [u8; 4] { seed[at..at + 4].try_into().expect("4 bytes") };
        let exchange = Self {
            key,
            ping: seed[16..24].try_into().expect("8 bytes"),
            ping_mask: part(24),
            close_mask: part(28),
            phase: Phase::Handshake,
            buf: Vec::new(),
            frames: Validator::new(Direction::ServerToClient, false, frame::Limits::default()),
            skip: 0,
        };
        (exchange, request.into_bytes())
    }

    /// Upgraded and pinged: a timeout now means the ping went unanswered.
    pub(super) fn awaiting_pong(&self) -> bool {
        self.phase == Phase::Pong
    }

    pub(super) fn received(&mut self, bytes: &[u8]) -> Step {
        self.buf.extend_from_slice(bytes);
        let mut send = Vec::new();
        if self.phase == Phase::Handshake {
            let limits = handshake::Limits {
                max_head: MAX_HEAD,
                max_headers: MAX_HEADERS,
            };
            match handshake::parse_response(&self.buf, &self.key, &limits) {
                Ok(None) => return Step::Wait,
                Ok(Some(BackendResponse::Other { status, .. })) => {
                    return Step::Done(Outcome::new(HealthReason::NotUpgraded, status));
                }
                Err(_) => return Step::Done(Outcome::new(HealthReason::BadHandshake, 0)),
                Ok(Some(BackendResponse::Upgraded { head_len, .. })) => {
                    self.buf.drain(..head_len);
                    send = frame::ping_frame(&self.ping, Some(self.ping_mask));
                    self.phase = Phase::Pong;
                }
            }
        }
        match self.read_frames(&mut send) {
            Some(outcome) => Step::Done(outcome),
            None if send.is_empty() => Step::Wait,
            None => Step::Send(send),
        }
    }

    /// Walks the complete frames buffered, adding what to send to `send`:
    /// `Some` once the check is decided.
    fn read_frames(&mut self, send: &mut Vec<u8>) -> Option<Outcome> {
        loop {
            let skipped = self.skip.min(self.buf.len() as u64);
            self.buf.drain(..skipped as usize);
            self.skip -= skipped;
            if self.skip > 0 {
                return None;
            }
            let header = match frame::parse_header(&self.buf) {
                Ok(Some(h)) => h,
                Ok(None) => return None,
                Err(v) => return Some(Outcome::new(HealthReason::BadFrame, v.code)),
            };
            let kind = match self.frames.check(&header) {
                Ok(kind) => kind,
                Err(v) => return Some(Outcome::new(HealthReason::BadFrame, v.code)),
            };
            if let FrameKind::Data { .. } = kind {
                self.skip = header.header_len as u64 + header.payload_len;
                continue;
            }
            // A control frame: at most 125 bytes of payload (checked above).
            let whole = header.header_len + header.payload_len as usize;
            if self.buf.len() < whole {
                return None;
            }
            let payload: Vec<u8> = self.buf.drain(..whole).skip(header.header_len).collect();
            match (kind, self.phase) {
                (FrameKind::Pong, Phase::Pong) if payload == self.ping => {
                    send.extend(frame::close_frame(
                        frame::CLOSE_GOING_AWAY,
                        "",
                        Some(self.close_mask),
                    ));
                    self.phase = Phase::Close;
                }
                (FrameKind::Close, Phase::Close) => return Some(Outcome::PASSED),
                (FrameKind::Close, _) => {
                    let code = frame::close_code(&payload, None).unwrap_or(frame::CLOSE_NO_STATUS);
                    return Some(Outcome::new(HealthReason::NoPong, code));
                }
                // Pings of the backend's own and pongs to other pings: not
                // the answer the check waits for.
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Check, Probe, Step};
    use super::*;
    use crate::l7::frame::Opcode;

    const SEED: Seed = [
        1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, // key
        b'p', b'i', b'n', b'g', b'-', b'4', b'2', b'!', // ping payload
        0x11, 0x22, 0x33, 0x44, // ping mask
        0x55, 0x66, 0x77, 0x88, // close mask
    ];

    fn check() -> Check {
        Check::WebSocket {
            path: "/ws".into(),
            host: None,
        }
    }

    /// A probe that has sent its upgrade, and the key it sent.
    fn started() -> (Probe, String) {
        let mut p = Probe::new(&check(), "198.18.0.7:9000", SEED);
        let Step::Send(request) = p.connected() else {
            panic!("a WebSocket check sends its upgrade first");
        };
        let req = handshake::parse_request(&request, &handshake::Limits::default())
            .expect("the upgrade is one weir run itself accepts")
            .expect("complete");
        assert_eq!(
            (req.path.as_str(), req.host.as_str()),
            ("/ws", "198.18.0.7:9000")
        );
        (p, req.key)
    }

    fn switching(key: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            handshake::accept_key(key)
        )
        .into_bytes()
    }

    /// One frame the probe sent: opcode, and payload unmasked.
    fn sent_frame(bytes: &[u8]) -> (Opcode, Vec<u8>, usize) {
        let h = frame::parse_header(bytes).unwrap().unwrap();
        let mask = h.mask.expect("a client masks every frame");
        let end = h.header_len + h.payload_len as usize;
        let mut payload = bytes[h.header_len..end].to_vec();
        frame::apply_mask(&mut payload, mask, 0);
        (Opcode::from_u8(h.opcode).unwrap(), payload, end)
    }

    fn server(opcode: Opcode, payload: &[u8]) -> Vec<u8> {
        frame::whole_frame(opcode, true, payload, None)
    }

    /// Upgrade, the probe's ping: returns the probe and the ping payload.
    fn pinged() -> (Probe, Vec<u8>) {
        let (mut p, key) = started();
        let Step::Send(ping) = p.received(&switching(&key)) else {
            panic!("a 101 is answered with a ping");
        };
        let (op, payload, len) = sent_frame(&ping);
        assert_eq!((op, len), (Opcode::Ping, ping.len()));
        (p, payload)
    }

    #[test]
    fn upgrade_ping_pong_close_passes() {
        let (mut p, payload) = pinged();
        assert_eq!(payload, b"ping-42!");
        let Step::Send(close) = p.received(&server(Opcode::Pong, &payload)) else {
            panic!("the matching pong is answered with a close");
        };
        let (op, body, _) = sent_frame(&close);
        assert_eq!(
            (op, frame::close_code(&body, None)),
            (Opcode::Close, Some(1001))
        );
        assert_eq!(
            p.received(&server(Opcode::Close, &1000u16.to_be_bytes())),
            Step::Done(Outcome::PASSED)
        );
    }

    #[test]
    fn the_whole_exchange_may_arrive_in_one_read_or_byte_by_byte() {
        let (mut p, key) = started();
        let mut all = switching(&key);
        all.extend(server(Opcode::Pong, b"ping-42!"));
        all.extend(server(Opcode::Close, &[]));
        let Step::Done(outcome) = p.received(&all) else {
            panic!("decided in one read");
        };
        assert_eq!(outcome, Outcome::PASSED);

        let (mut p, key) = started();
        let mut all = switching(&key);
        all.extend(server(Opcode::Binary, &[7; 300]));
        all.extend(server(Opcode::Pong, b"ping-42!"));
        all.extend(server(Opcode::Close, &[]));
        let mut sent = vec![];
        for (i, b) in all.iter().enumerate() {
            match p.received(&[*b]) {
                Step::Wait => {}
                Step::Send(s) => sent.push(sent_frame(&s).0),
                Step::Done(o) => {
                    assert_eq!((o, i + 1), (Outcome::PASSED, all.len()));
                    assert_eq!(sent, [Opcode::Ping, Opcode::Close]);
                    return;
                }
            }
        }
        panic!("never decided");
    }

    #[test]
    fn a_non_101_fails_as_not_upgraded_with_the_status() {
        let (mut p, _) = started();
        assert_eq!(
            p.received(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"),
            Step::Done(Outcome::new(HealthReason::NotUpgraded, 500))
        );
        let (mut p, _) = started();
        assert_eq!(
            p.received(b"HTTP/1.1 200 OK\r\n\r\n"),
            Step::Done(Outcome::new(HealthReason::NotUpgraded, 200))
        );
    }

    #[test]
    fn a_101_without_the_right_accept_is_a_bad_handshake() {
        let bad = Step::Done(Outcome::new(HealthReason::BadHandshake, 0));
        let (mut p, _) = started();
        assert_eq!(p.received(&switching("some other key")), bad);
        let (mut p, _) = started();
        assert_eq!(
            p.received(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
            bad
        );
        let (mut p, _) = started();
        assert_eq!(p.received(b"\x16\x03\x01 not http\r\n\r\n"), bad);
    }

    #[test]
    fn pings_data_and_other_pongs_are_not_the_answer() {
        let (mut p, payload) = pinged();
        assert_eq!(p.received(&server(Opcode::Ping, b"yours")), Step::Wait);
        assert_eq!(p.received(&server(Opcode::Pong, b"stale")), Step::Wait);
        assert_eq!(p.received(&server(Opcode::Text, b"hello")), Step::Wait);
        assert!(matches!(
            p.received(&server(Opcode::Pong, &payload)),
            Step::Send(_)
        ));
        assert_eq!(
            p.timed_out(),
            Outcome::new(HealthReason::Timeout, 0),
            "pong seen: the close is late"
        );
    }

    #[test]
    fn no_pong_in_time_or_a_close_instead_fails_as_no_pong() {
        let (mut p, _) = pinged();
        assert_eq!(p.timed_out(), Outcome::new(HealthReason::NoPong, 0));
        let (mut p, _) = pinged();
        assert_eq!(
            p.received(&server(Opcode::Close, &1011u16.to_be_bytes())),
            Step::Done(Outcome::new(HealthReason::NoPong, 1011))
        );
        let (mut p, key) = started();
        assert_eq!(p.received(&switching(&key)[..20]), Step::Wait);
        assert_eq!(
            p.timed_out(),
            Outcome::new(HealthReason::Timeout, 0),
            "not upgraded yet"
        );
    }

    #[test]
    fn protocol_errors_fail_as_bad_frame_with_the_close_code() {
        let (mut p, _) = pinged();
        let masked = frame::whole_frame(Opcode::Pong, true, b"ping-42!", Some([1, 2, 3, 4]));
        assert_eq!(
            p.received(&masked),
            Step::Done(Outcome::new(
                HealthReason::BadFrame,
                frame::CLOSE_PROTOCOL_ERROR
            ))
        );
        let (mut p, _) = pinged();
        assert_eq!(
            p.received(&[0x83, 0x00]),
            Step::Done(Outcome::new(
                HealthReason::BadFrame,
                frame::CLOSE_PROTOCOL_ERROR
            )),
            "reserved opcode"
        );
        let (mut p, _) = pinged();
        assert_eq!(
            p.received(&[0x82, 0x7E, 0x00, 0x05]),
            Step::Done(Outcome::new(
                HealthReason::BadFrame,
                frame::CLOSE_PROTOCOL_ERROR
            )),
            "non-minimal length"
        );
    }

    #[test]
    fn a_connection_closed_mid_check_is_a_reset() {
        let (mut p, _) = pinged();
        assert_eq!(p.closed(), Outcome::new(HealthReason::Reset, 0));
    }

    proptest::proptest! {
        /// After a valid upgrade, any bytes from the backend end the check
        /// or leave it waiting; it never panics and never passes without
        /// the pong and the close.
        #[test]
        fn any_frames_after_the_upgrade(
            chunks in proptest::collection::vec(proptest::collection::vec(0u8..=255, 0..200), 0..8)
        ) {
            let (mut p, key) = started();
            let _ = p.received(&switching(&key));
            for c in &chunks {
                if let Step::Done(o) = p.received(c) {
                    let echoed = chunks.concat().windows(8).any(|w| w == b"ping-42!");
                    proptest::prop_assert!(!o.passed() || echoed);
                    break;
                }
            }
        }
    }
}
