//! End to end through the XDP path in network namespaces: 100 WebSocket
//! connections keep talking while a backend is drained, another added and a
//! weight changed. None may break; new connections must follow the new ring;
//! the kernel's counters must agree with what the clients saw.

use std::time::Duration;

use weir_testbed::scenario::{L4Options, run_l4};

#[test]
fn connections_survive_live_backend_changes() {
    weir_testbed::require_root();
    let opts = L4Options {
        instance: format!("l4t{}", std::process::id()),
        connections: 100,
        new_connections: 200,
        interval: Duration::from_millis(100),
        settle: Duration::from_secs(1),
        verbose: true,
        ..L4Options::default()
    };
    let report = run_l4(&opts).expect("scenario runs");
    eprintln!("stats: {}", report.stats);
    let long = &report.long_lived.summary;

    // Every long-lived connection connected, kept echoing, closed cleanly.
    assert_eq!(long.connected, 100, "{:?}", long);
    assert_eq!(long.broken, 0, "connections broke: {:?}", long);
    assert_eq!(long.mismatches, 0);
    assert_eq!(
        long.messages_echoed, long.messages_sent,
        "every message came back"
    );
    assert!(
        long.messages_sent >= 100 * 30,
        "they kept talking: {} messages",
        long.messages_sent
    );
    assert_eq!(
        long.per_backend.keys().collect::<Vec<_>>(),
        ["b0", "b1", "b2"],
        "initial ring: b0-b2"
    );
    assert!(
        long.per_backend["b1"] > 0,
        "the drained backend held connections"
    );

    // New connections follow the new ring: none to the drained b1, some to
    // the added b3, and b2 (weight 3) gets more than b0 and b3 (weight 1).
    let after = &report.after.summary;
    assert_eq!(after.connected, 200, "{:?}", after);
    assert_eq!(after.broken, 0);
    assert!(
        !after.per_backend.contains_key("b1"),
        "new connection to a draining backend: {:?}",
        after.per_backend
    );
    let n = |b: &str| after.per_backend.get(b).copied().unwrap_or(0);
    assert!(n("b3") > 0, "{:?}", after.per_backend);
    assert!(
        n("b2") > n("b0") && n("b2") > n("b3"),
        "weight 3 not honoured: {:?}",
        after.per_backend
    );
    // 200 draws from a 1:3:1 split: b2 expects 120; 80 is far below any
    // plausible sample (binomial sd ~ 7).
    assert!(n("b2") >= 80, "{:?}", after.per_backend);

    // The kernel counted exactly the connections the clients made.
    assert_eq!(
        report.new_flows_per_backend(),
        report.client_connections_per_backend()
    );
    let xdp = &report.stats["xdp"];
    assert_eq!(xdp["drop_no_backend"], 0);
    assert_eq!(xdp["drop_bad_ring"], 0);
    assert_eq!(xdp["flow_miss"], 0, "no established packet lost its flow");
    assert!(xdp["tx"].as_u64().unwrap() > 0);
    let decap_ok = report.stats["decap"]["decap_ok"].as_u64().unwrap();
    assert!(
        decap_ok >= xdp["tx"].as_u64().unwrap(),
        "backends decapsulated what XDP sent"
    );
    let states: Vec<(String, String)> = report
        .backend_list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["backend"].as_str().unwrap().to_string(),
                b["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(states.iter().any(|(_, s)| s == "draining"), "{states:?}");
}
