//! `cargo xtask demo`: weir's main job on an embedded default. Builds a
//! namespace topology, attaches the XDP balancer, declares an L4 service,
//! keeps 100 WebSocket connections talking through the VIP while a backend
//! is drained, a fourth added and a weight changed, then prints what
//! happened. Cleans up after itself, also when interrupted.

use std::process::ExitCode;

use weir_testbed::scenario::{L4Options, L4Report, run_l4};
use weir_testbed::topology::install_signal_cleanup;

fn main() -> ExitCode {
    if !weir_testbed::is_root() {
        eprintln!(
            "weir-demo: error: the demo builds network namespaces and attaches XDP: run it as root"
        );
        return ExitCode::FAILURE;
    }
    install_signal_cleanup();
    let opts = L4Options {
        verbose: true,
        ..L4Options::default()
    };
    println!(
        "weir demo: L4 service through XDP, live backend changes under 100 WebSocket connections\n"
    );
    match run_l4(&opts) {
        Ok(report) => {
            let ok = summarize(&report);
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("weir-demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn summarize(r: &L4Report) -> bool {
    let long = &r.long_lived.summary;
    let after = &r.after.summary;
    println!("\n== changes made while the connections talked");
    for s in &r.steps {
        println!("  +{:>5.1}s  {}", s.at_ms as f64 / 1000.0, s.command);
        for line in s.output.lines() {
            println!("           {line}");
        }
    }
    println!("\n== long-lived connections (opened before the changes)");
    println!(
        "  connections kept: {}/{}  broken: {}  failed to connect: {}",
        long.connected - long.broken,
        long.connections,
        long.broken,
        long.failed
    );
    println!(
        "  messages echoed: {}/{}  mismatches: {}  closes: {:?}",
        long.messages_echoed, long.messages_sent, long.mismatches, long.closes
    );
    println!("  per backend: {:?}", long.per_backend);
    println!("\n== new connections (opened after the changes)");
    println!(
        "  connected: {}/{}  per backend: {:?}",
        after.connected, after.connections, after.per_backend
    );
    println!("  (b1 drained: no new connections; b3 added; b2 weight 3 vs 1)");
    println!("\n== XDP counters vs what the clients saw");
    let kernel = r.new_flows_per_backend();
    let clients = r.client_connections_per_backend();
    for (name, addr) in &r.backends {
        println!(
            "  {name} {addr:<12} new flows counted by XDP: {:>4}   connections seen by clients: {:>4}",
            kernel.get(name).copied().unwrap_or(0),
            clients.get(name).copied().unwrap_or(0)
        );
    }
    let xdp = &r.stats["xdp"];
    println!(
        "  xdp tx {}  flow_new {}  flow_miss {}  drop_no_backend {}  pass_not_ipv4 {}",
        xdp["tx"], xdp["flow_new"], xdp["flow_miss"], xdp["drop_no_backend"], xdp["pass_not_ipv4"]
    );
    println!("  decap ok {}", r.stats["decap"]["decap_ok"]);

    let kept = long.connected == long.connections && long.broken == 0;
    let agree = kernel == clients;
    println!();
    if kept && agree && after.broken == 0 {
        println!(
            "RESULT: every connection kept ({}/{}), counters agree with the clients",
            long.connected, long.connections
        );
        true
    } else {
        println!(
            "RESULT: FAILED (kept {}/{}, broken {}, counters agree: {agree})",
            long.connected - long.broken,
            long.connections,
            long.broken
        );
        false
    }
}
