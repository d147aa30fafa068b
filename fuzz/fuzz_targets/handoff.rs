//! The handoff decoder on arbitrary bytes: never a panic; a batch it
//! accepts encodes back to the same bytes (the format is canonical); and
//! every connection in it imports and runs: driven with frames both ways,
//! sends and ticks, then cut, it finishes and gives back each buffer it was
//! handed exactly once.
#![no_main]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use weir::l7::config;
use weir::l7::conn::{Conn, Cx, Output, Received, Side, Transmit};
use weir::l7::frame::{Opcode, whole_frame};
use weir::l7::handoff;

fuzz_target!(|input: &[u8]| {
    let Ok(batch) = handoff::decode(input) else {
        return;
    };
    assert_eq!(handoff::encode(&batch), input, "a batch encodes back to its bytes");
    let text = "[[listener]]\nlisten = \"127.0.0.1:8080\"\n[[listener.route]]\n\
                path_prefix = \"/chat\"\nservice = \"198.19.0.1:80\"\n";
    let base = config::parse(text, "fuzz").expect("a valid configuration");
    // A snapshot's clocks go back at most 24h from the import.
    let mut now = Instant::now() + Duration::from_secs(24 * 3600);
    let frames = [
        (Side::Client, whole_frame(Opcode::Text, true, b"up", Some([1, 2, 3, 4]))),
        (Side::Backend, whole_frame(Opcode::Binary, false, b"down", None)),
    ];
    for snapshot in batch {
        let config = snapshot.settings.apply(&base);
        let mut conn = Conn::import(snapshot, now).expect("a checked snapshot imports");
        let mut out = Output::default();
        let mut handed = BTreeSet::new();
        let mut back = BTreeSet::new();
        let mut call = |conn: &mut Conn, now, f: &mut dyn FnMut(&mut Conn, &mut Cx)| {
            let mut cx = Cx {
                now,
                config: &config,
                routes: &config.listeners[0],
                mask: [9, 8, 7, 6],
                out: &mut out,
            };
            f(conn, &mut cx);
            for bid in out.recycle.drain(..) {
                assert!(back.insert(bid), "buffer {bid} given back twice");
            }
            out.events.clear();
        };
        for round in 0..16u16 {
            while conn.poll_action().is_some() {}
            for side in [Side::Client, Side::Backend] {
                let len = match conn.poll_transmit(side) {
                    Some(Transmit::Bytes(b)) => b.len() as u32,
                    Some(Transmit::Buf { len, .. }) => len,
                    Some(Transmit::Finish | Transmit::Close) | None => continue,
                };
                call(&mut conn, now, &mut |c, cx| c.handle_sent(cx, side, Ok(len)));
            }
            let (side, bytes) = &frames[usize::from(round % 2)];
            handed.insert(round);
            call(&mut conn, now, &mut |c, cx| {
                c.handle_recv(cx, *side, Received::Data { bid: round, bytes }, true)
            });
            now += Duration::from_secs(1);
            if conn.poll_timeout(&config).is_some_and(|at| at <= now) {
                call(&mut conn, now, &mut |c, cx| c.handle_timeout(cx));
            }
        }
        call(&mut conn, now, &mut |c, cx| c.handle_abort(cx));
        assert!(conn.is_finished(), "a cut connection is finished");
        assert_eq!(handed, back, "every buffer handed comes back");
    }
});
