//! The relay scanner on arbitrary bytes cut at arbitrary points: no panic,
//! and what it lets through is always a prefix of the input, the same
//! whatever the cuts (the first byte of input chooses them).
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir::l7::frame::{Direction, Limits};
use weir::l7::relay::Scanner;

fn run(data: &[u8], cut: usize, dir: Direction) -> Vec<u8> {
    let mut s = Scanner::new(dir, true, Limits { max_frame: 1 << 16, max_message: 1 << 17 });
    let mut out = Vec::new();
    for chunk in data.chunks(cut.max(1)) {
        let fed = s.feed(chunk);
        if let Some(h) = fed.held {
            out.extend(h);
        }
        out.extend_from_slice(&chunk[..fed.pass]);
        if fed.violation.is_some() {
            break;
        }
    }
    out
}

fuzz_target!(|input: &[u8]| {
    let Some((&cut, data)) = input.split_first() else { return };
    for dir in [Direction::ClientToServer, Direction::ServerToClient] {
        let whole = run(data, data.len(), dir);
        let pieces = run(data, cut as usize % 17 + 1, dir);
        assert!(data.starts_with(&whole));
        assert_eq!(whole, pieces, "cuts changed what passed");
    }
});
