//! Arbitrary bytes as a stream of frames, through the header parser and a
//! validator for each direction, as the relay would: nothing may panic, what
//! parses re-encodes to the same bytes, and a rejected frame leaves the
//! validator as it was.
//!
//! `cargo +nightly fuzz run frame`

#![no_main]

use libfuzzer_sys::fuzz_target;
use weir::l7::frame::*;

/// Frames looked at per input, so that runs of empty frames stay fast.
const MAX_FRAMES: usize = 1024;

fuzz_target!(|data: &[u8]| {
    // Small limits let short inputs reach the 1009 paths.
    let small = Limits {
        max_frame: 64,
        max_message: 256,
    };
    for dir in [Direction::ClientToServer, Direction::ServerToClient] {
        for allow_rsv1 in [false, true] {
            for limits in [Limits::default(), small] {
                relay(data, dir, Validator::new(dir, allow_rsv1, limits));
            }
        }
    }
});

fn relay(mut rest: &[u8], dir: Direction, mut v: Validator) {
    for _ in 0..MAX_FRAMES {
        let h = match parse_header(rest) {
            Ok(Some(h)) => h,
            Ok(None) => {
                assert!(rest.len() < MAX_HEADER_LEN);
                return;
            }
            Err(e) => {
                assert_eq!(e.code, CLOSE_PROTOCOL_ERROR);
                return;
            }
        };
        assert!((2..=MAX_HEADER_LEN).contains(&h.header_len));
        assert!(h.header_len <= rest.len());
        let mut wire = Vec::with_capacity(MAX_HEADER_LEN);
        h.write_to(&mut wire);
        assert_eq!(wire, rest[..h.header_len]);

        let before = v.clone();
        let kind = match v.check(&h) {
            Ok(kind) => kind,
            Err(e) => {
                assert!(e.code == CLOSE_PROTOCOL_ERROR || e.code == CLOSE_MESSAGE_TOO_BIG);
                assert_eq!(v, before);
                return;
            }
        };
        // What follows the header, which may be less than the whole payload.
        let payload = &rest[h.header_len..];
        if kind == FrameKind::Close {
            assert!(v.closed());
            // Control payloads are at most 125 bytes: no overflow.
            let body = &payload[..payload.len().min(h.payload_len as usize)];
            let code = close_code(body, h.mask);
            assert_eq!(code.is_some(), body.len() >= 2);
            // What weir would send back in this direction must pass too.
            let reason = String::from_utf8_lossy(body);
            let reply = close_frame(code.unwrap_or(CLOSE_PROTOCOL_ERROR), &reason, h.mask);
            let rh = parse_header(&reply).unwrap().unwrap();
            assert_eq!(rh.header_len as u64 + rh.payload_len, reply.len() as u64);
            let mut fresh = Validator::new(dir, false, Limits::default());
            assert_eq!(fresh.check(&rh), Ok(FrameKind::Close));
        }
        let Some(next) = usize::try_from(h.payload_len)
            .ok()
            .and_then(|n| payload.get(n..))
        else {
            return;
        };
        rest = next;
    }
}
