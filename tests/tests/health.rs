//! Health checks end to end, in network namespaces with real backends,
//! the real XDP path or `weir run`, and `weir agent`: a killed backend
//! leaves the ring within fall × interval and comes back after rise
//! checks; an L4 backend without decapsulation fails although its own
//! address answers; three of four dead make the service panic; a killed
//! agent changes nothing and a restarted one resumes.

use std::time::Duration;

use serde_json::Value;
use weir_testbed::health::{FALL, HealthReport, INTERVAL, TIMEOUT, run_health};
use weir_testbed::scenario::L4Options;
use weir_testbed::ws_client::Ending;

fn opts(tag: &str) -> L4Options {
    L4Options {
        instance: format!("{tag}{}", std::process::id()),
        connections: 40,
        new_connections: 60,
        interval: Duration::from_millis(100),
        settle: Duration::from_secs(1),
        verbose: true,
        ..L4Options::default()
    }
}

fn slots(rows: &[Value]) -> Vec<(String, u64)> {
    rows.iter()
        .map(|r| {
            (
                r["backend"].as_str().unwrap().to_string(),
                r["ring_slots"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn check(r: &HealthReport, l7: bool) {
    // Detection within fall × interval (+ 10% jitter, the check timeout
    // and the time to apply and read back).
    let bound = INTERVAL * FALL + INTERVAL / 10 + TIMEOUT + Duration::from_millis(700);
    assert!(
        r.detect <= bound,
        "detected after {:?} > {bound:?}",
        r.detect
    );
    let row = &r.detected_row;
    assert_eq!(row["state"], "active", "operator intent untouched: {row}");
    assert_eq!(row["ring_slots"], 0, "out of the ring: {row}");
    let reason = row["health_reason"].as_str().unwrap();
    assert!(
        ["refused", "reset", "connect_timeout", "timeout"].contains(&reason),
        "reason {reason}: {row}"
    );
    assert!(row["health_since"].is_string(), "{row}");

    // No new connection reached b3 while it was out, and all connected.
    let out = &r.while_out.summary;
    assert_eq!(out.connected, out.connections, "{out:?}");
    assert!(!out.per_backend.contains_key("b3"), "{out:?}");
    // Live connections to the other backends were untouched.
    for c in &r.long_lived.connections {
        if c.connected && c.backend.as_deref() != Some("b3") {
            assert_eq!(c.close, Ending::Clean, "{c:?}");
        }
    }
    assert!(r.long_lived.summary.per_backend.len() >= 3);

    // Back after rise checks, and new connections reach it again.
    assert!(r.recover <= INTERVAL * 6, "returned after {:?}", r.recover);
    let back = &r.after_return.summary;
    assert_eq!(back.connected, back.connections, "{back:?}");
    assert!(back.per_backend.contains_key("b3"), "{back:?}");

    if !l7 {
        let (t, row, direct) = r.decap.as_ref().expect("L4 runs the decap phase");
        assert!(*t <= bound, "decap: detected after {t:?}");
        assert_eq!(row["ring_slots"], 0, "{row}");
        assert!(*direct, "b2's own address still answered");
    }

    // Panic: all four in the ring, counted and shown.
    let svc = &r.panic_service;
    assert_eq!(svc["panic"], true, "{svc}");
    assert!(svc["panics"].as_u64().unwrap() >= 1, "{svc}");
    assert!(svc["panic_since"].is_string(), "{svc}");
    assert_eq!(svc["in_ring"], 4, "{svc}");
    assert_eq!(svc["healthy"], 1, "{svc}");
    for (b, n) in slots(&r.panic_backends) {
        assert!(n > 0, "{b} left the ring in panic");
    }
    let stats_svc = &r.panic_stats["services"][0];
    assert_eq!(stats_svc["panic"], true, "{stats_svc}");

    // SIGKILL of the agent: the registry stays as it was (fail static),
    // forwarding goes on.
    assert_eq!(
        serde_json::to_string(&r.before_agent_kill).unwrap(),
        serde_json::to_string(&r.after_agent_kill).unwrap(),
        "nothing changed without the agent"
    );
    let w = &r.without_agent.summary;
    assert_eq!(w.connected, w.connections, "{w:?}");
    assert_eq!(w.per_backend.len(), 4, "all four serve: {w:?}");

    // Restarted, it resumes from the registry and converges.
    assert!(
        r.converge <= INTERVAL * 8,
        "converged after {:?}",
        r.converge
    );
    assert_eq!(r.converged_service["panic"], false);
    let b0 = |rows: &[Value]| {
        rows.iter()
            .find(|x| x["health"] == "healthy" && x["id"] == 0)
            .map(|x| x["health_since"].clone())
    };
    assert_eq!(
        b0(&r.before_agent_kill),
        b0(&r.converged),
        "b0 stayed healthy across the restart: resumed, not started over"
    );
}

#[test]
fn l4_backends_leave_and_return_by_their_checks() {
    weir_testbed::require_root();
    let r = run_health(&opts("hl4"), false).expect("scenario runs");
    check(&r, false);
}

#[test]
fn l7_backends_leave_and_return_by_their_checks() {
    weir_testbed::require_root();
    let r = run_health(&opts("hl7"), true).expect("scenario runs");
    check(&r, true);
}
