//! The upgrade handshake parser on arbitrary input: no panic; whatever it
//! accepts forwards to a request it accepts again with the same key, path
//! and host; and backend answers parse without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir::l7::handshake::{self, Limits};

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_head: 4096, max_headers: 32 };
    if let Ok(Some(req)) = handshake::parse_request(data, &limits) {
        assert!(req.head_len <= data.len());
        let out = handshake::forward_request(&req, "198.18.1.2".parse().unwrap(), "http");
        let big = Limits { max_head: 1 << 16, max_headers: 64 };
        let again = handshake::parse_request(&out, &big)
            .expect("what weir forwards is a valid handshake")
            .expect("and complete");
        assert_eq!((again.key, again.path, again.host), (req.key.clone(), req.path, req.host));
        let _ = handshake::parse_response(data, &req.key, &limits);
    }
    let _ = handshake::parse_response(data, "dGhlIHNhbXBsZSBub25jZQ==", &limits);
});
