//! When the LB has no neighbour entry for the next hop, XDP hands the
//! encapsulated packet to the kernel, which must forward it and resolve
//! the neighbour; connections must not depend on the entry being there.

use std::time::Duration;

use weir_testbed::topology::{Topology, TopologySpec};
use weir_testbed::weir_cli::WeirCli;
use weir_testbed::workspace_bin;
use weir_testbed::wsload::LoadReport;

#[test]
fn connections_work_with_an_empty_neighbour_table() {
    weir_testbed::require_root();
    let mut topo = Topology::build(TopologySpec {
        backends: 1,
        client_addrs: 1,
    })
    .unwrap();
    let weir = WeirCli::new(&format!("nb{}", std::process::id())).unwrap();
    let vip = topo.vip().to_string();
    let service = format!("{vip}:8080");
    let (lb, be) = (topo.lb_ns.clone(), topo.backend_ns[0].clone());
    topo.spawn_ready_in(
        &be,
        &workspace_bin("weir-echo"),
        &["--listen", "0.0.0.0:8080", "--name", "b0"],
        Duration::from_secs(10),
    )
    .unwrap();
    weir.decap_backend(&topo, 0).unwrap();
    weir.attach_peer(&topo).unwrap();
    weir.attach_lb(&topo, "native").unwrap();
    weir.run(&topo, &lb, &["service", "add", &service]).unwrap();
    weir.run(
        &topo,
        &lb,
        &[
            "backend",
            "add",
            &service,
            &topo.backend_addr(0).to_string(),
        ],
    )
    .unwrap();

    // Route the backend through a second router address the LB has never
    // spoken to, so the LB has no neighbour entry for that next hop (and
    // no ARP request from the router can teach it one).
    topo.run_ok_in(
        &topo.router_ns,
        "ip",
        &["addr", "add", "198.18.2.3/24", "dev", topo.router_lb_dev()],
    )
    .unwrap();
    // (weir attach made sure accept_local is on: the kernel forwards the
    // encapsulated packet, whose source is this host's own address.)
    let backend_net = format!("{}/32", topo.backend_addr(0));
    topo.run_ok_in(
        &lb,
        "ip",
        &["route", "add", &backend_net, "via", "198.18.2.3"],
    )
    .unwrap();

    let out = topo
        .start_in(
            &topo.client_ns,
            &workspace_bin("weir-wsclient"),
            &[
                "--url",
                &format!("ws://{service}/"),
                "--connections",
                "5",
                "--duration-secs",
                "1",
                "--quiet",
            ],
        )
        .unwrap()
        .wait_output(Duration::from_secs(60))
        .unwrap();
    let report = LoadReport::from_json(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let stats = weir.run(&topo, &lb, &["--json", "stats"]).unwrap();
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert!(
        stats["xdp"]["pass_no_neigh"].as_u64().unwrap() >= 1,
        "the first packet met no neighbour: {stats}"
    );
    assert_eq!(
        report.summary.connected, 5,
        "{:?} / {stats}",
        report.summary
    );
    assert_eq!(report.summary.broken, 0);
}
