//! The agent's HTTP and WebSocket checks on arbitrary backend answers: no
//! panic, and a check passes only on what its kind requires (the expected
//! status; the echoed ping payload after a valid 101).
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir::health::probe::{Check, Probe, Step};

const SEED: [u8; 32] = *b"0123456789abcdefPING-PAYmaskMASK";

fuzz_target!(|data: &[u8]| {
    let checks = [
        Check::Http { path: "/healthz".into(), host: None, expect_status: 204 },
        Check::WebSocket { path: "/".into(), host: None },
    ];
    for check in &checks {
        let mut probe = Probe::new(check, "198.18.0.1:80", SEED);
        let _ = probe.connected();
        // The first byte splits the answer in two reads.
        let split = usize::from(data.first().copied().unwrap_or(0)).min(data.len());
        for chunk in [&data[..split], &data[split..]] {
            if let Step::Done(outcome) = probe.received(chunk) {
                if outcome.passed() {
                    match check {
                        Check::Http { .. } => assert!(data.windows(4).any(|w| w == b" 204")),
                        _ => assert!(data.windows(8).any(|w| w == b"PING-PAY")),
                    }
                }
                break;
            }
        }
        let _ = probe.timed_out();
    }
});
