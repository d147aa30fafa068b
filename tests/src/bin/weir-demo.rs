//! `cargo xtask demo`: weir's main job on an embedded default. Builds a
//! namespace topology, attaches the XDP balancer, declares an L4 service,
//! keeps 100 WebSocket connections talking through the VIP while a backend
//! is drained, a fourth added and a weight changed, then prints what
//! happened; then the same for an L7 service through `weir run`, and then
//! `weir agent` looking after the fleet on its own (a backend killed and
//! restarted, three of four killed, the agent killed). Cleans up after
//! itself, also when interrupted.

use std::process::ExitCode;

use weir_testbed::health::{HealthReport, run_health};
use weir_testbed::scenario::{L4Options, L4Report, L7Report, run_l4, run_l7};
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
    let l4_ok = match run_l4(&opts) {
        Ok(report) => summarize(&report),
        Err(e) => {
            eprintln!("weir-demo: error: {e:#}");
            false
        }
    };
    println!(
        "\nweir demo, part 2: L7 service through weir run (io_uring), backend replaced live\n"
    );
    let l7_ok = match run_l7(&opts) {
        Ok(report) => summarize_l7(&report),
        Err(e) => {
            eprintln!("weir-demo: error: {e:#}");
            false
        }
    };
    println!(
        "\nweir demo, part 3: weir agent checks the L4 backends through the tunnel; one dies and \
         returns, three die (panic), the agent is killed and restarted\n"
    );
    let health_ok = match run_health(&opts, false) {
        Ok(report) => summarize_health(&report),
        Err(e) => {
            eprintln!("weir-demo: error: {e:#}");
            false
        }
    };
    if l4_ok && l7_ok && health_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
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
    println!(
        "  decap ok {}  refused (source not allowed) {}",
        r.stats["decap"]["decap_ok"], r.stats["decap"]["decap_drop_source"]
    );

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

fn summarize_l7(r: &L7Report) -> bool {
    println!("\n== the change made while the connections talked");
    for s in &r.steps {
        println!("  +{:>5.1}s  {}", s.at_ms as f64 / 1000.0, s.command);
        for line in s.output.lines() {
            println!("           {line}");
        }
    }
    let long = &r.long_lived.summary;
    println!(
        "\n== long-lived connections: {} connected, per backend {:?}",
        long.connected, long.per_backend
    );
    println!("  closes: {:?}", long.closes);
    println!(
        "== new connections after the change: per backend {:?}",
        r.after.summary.per_backend
    );
    let l7 = &r.stats["l7"];
    println!(
        "== weir run: handshakes {}, close codes {}",
        l7["handshakes"], l7["closes"]
    );
    let failed = r.failed_handshakes();
    let drained = r.drained();
    let cut = r.cut();
    let b0_long = long.per_backend.get("b0").copied().unwrap_or(0);
    let b0_after = r.after.summary.per_backend.get("b0").copied().unwrap_or(0);
    println!("\n  handshakes failed:                 {failed} (should be 0)");
    println!("  connections closed with 1001 by drain: {drained} (b0 had {b0_long})");
    println!("  connections cut:                   {cut} (should be 0)");
    println!("  new connections to the removed b0: {b0_after} (should be 0)");
    println!("  weir run exited cleanly on SIGTERM: {}", r.exit_ok);
    let ok = failed == 0 && cut == 0 && drained == b0_long && b0_after == 0 && r.exit_ok;
    println!();
    if ok {
        println!(
            "RESULT: L7 backend replaced live: 0 failed handshakes, {drained} drained with 1001, 0 cut"
        );
    } else {
        println!("RESULT: FAILED");
    }
    ok
}

fn summarize_health(r: &HealthReport) -> bool {
    let row = &r.detected_row;
    println!(
        "\n== b3's server killed: unhealthy after {:.1} s ({} {}), state still {}, ring slots {}",
        r.detect.as_secs_f64(),
        row["health_reason"].as_str().unwrap_or("?"),
        row["health_detail"],
        row["state"].as_str().unwrap_or("?"),
        row["ring_slots"]
    );
    let out = &r.while_out.summary;
    println!(
        "   new connections meanwhile: {}/{} connected, per backend {:?}",
        out.connected, out.connections, out.per_backend
    );
    println!(
        "== b3 restarted: healthy after {:.1} s; new connections then: {:?}",
        r.recover.as_secs_f64(),
        r.after_return.summary.per_backend
    );
    let decap_ok = match &r.decap {
        Some((t, _, direct)) => {
            println!(
                "== b2's decap detached: unhealthy after {:.1} s although its own address answers: {direct}",
                t.as_secs_f64()
            );
            *direct
        }
        None => false,
    };
    let svc = &r.panic_service;
    println!(
        "== b1-b3 killed: panic {}, {} of {} healthy, {} in the ring (episodes {})",
        svc["panic"], svc["healthy"], svc["active"], svc["in_ring"], svc["panics"]
    );
    let unchanged = serde_json::to_string(&r.before_agent_kill).ok()
        == serde_json::to_string(&r.after_agent_kill).ok();
    let w = &r.without_agent.summary;
    println!(
        "== agent killed (SIGKILL): registry unchanged: {unchanged}; new connections without it: {}/{}",
        w.connected, w.connections
    );
    println!(
        "== agent started again: all healthy after {:.1} s, panic {}",
        r.converge.as_secs_f64(),
        r.converged_service["panic"]
    );
    let ok = !out.per_backend.contains_key("b3")
        && out.connected == out.connections
        && r.after_return.summary.per_backend.contains_key("b3")
        && decap_ok
        && svc["panic"] == true
        && unchanged
        && w.connected == w.connections
        && r.converged_service["panic"] == false;
    println!();
    if ok {
        println!(
            "RESULT: the fleet looked after itself: dead backend out in {:.1} s and back in {:.1} s, \
             panic kept all four, the agent's death changed nothing",
            r.detect.as_secs_f64(),
            r.recover.as_secs_f64()
        );
    } else {
        println!("RESULT: FAILED");
    }
    ok
}
