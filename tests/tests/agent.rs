//! `weir agent` with real sockets on loopback: WebSocket echo backends
//! (weir-echo) behind an L7 service, killed and started again; a backend
//! that accepts TCP but answers every upgrade with 500; one agent per
//! instance; bad configurations refused at start with the file and line.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{TestInstance, add_service, free_port, require_root};
use weir::registry::{ApplyOptions, BackendAddr, Change, ServiceAddr, ServiceModeName};
use weir_testbed::agent::{Agent, scrape, temp_dir};
use weir_testbed::{spawn_echo as echo, workspace_bin};

const SVC: ServiceAddr = ServiceAddr {
    vip: Ipv4Addr::new(198, 19, 0, 70),
    port: 80,
};
const TCP_SVC: ServiceAddr = ServiceAddr {
    vip: Ipv4Addr::new(198, 19, 0, 71),
    port: 80,
};
const HTTP_SVC: ServiceAddr = ServiceAddr {
    vip: Ipv4Addr::new(198, 19, 0, 73),
    port: 80,
};
/// Checks every 200 ms: fall (2) × interval + jitter (10%) is 440 ms.
const INTERVAL: Duration = Duration::from_millis(200);

fn backend(a: SocketAddr) -> BackendAddr {
    match a {
        SocketAddr::V4(v4) => BackendAddr {
            addr: *v4.ip(),
            port: v4.port(),
        },
        SocketAddr::V6(_) => unreachable!("backends listen on IPv4"),
    }
}

/// A backend that accepts TCP and answers whatever comes with 500.
fn answers_500() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    addr
}

/// An instance with `services` (L7), each with `backends`.
fn instance(tag: &str, services: &[(ServiceAddr, Vec<SocketAddr>)]) -> TestInstance {
    instance_of(tag, ServiceModeName::L7, services)
}

fn instance_of(
    tag: &str,
    mode: ServiceModeName,
    services: &[(ServiceAddr, Vec<SocketAddr>)],
) -> TestInstance {
    let inst = TestInstance::new(tag);
    let mut reg = inst.registry();
    let force = || ApplyOptions {
        force: true,
        ..Default::default()
    };
    for (svc, backends) in services {
        let add = add_service(*svc, mode);
        reg.apply(&add, force()).unwrap();
        let set = Change::SetBackends {
            service: *svc,
            backends: backends.iter().map(|a| (backend(*a), 1)).collect(),
        };
        reg.apply(&set, force()).unwrap();
    }
    inst
}

fn check_config(svc: ServiceAddr, kind: &str, metrics: u16) -> String {
    format!(
        "[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n[[check]]\nservice = \"{svc}\"\n\
         type = \"{kind}\"\ninterval = \"{}ms\"\njitter = \"10%\"\ntimeout = \"150ms\"\nrise = 2\n\
         fall = 2\n",
        INTERVAL.as_millis()
    )
}

/// `weir backend list --json` of `svc`: the row of `b`.
fn row(inst: &TestInstance, svc: ServiceAddr, b: SocketAddr) -> serde_json::Value {
    let out = Command::new(workspace_bin("weir"))
        .args(["--instance", inst.name(), "--json", "backend", "list"])
        .arg(svc.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["backend"] == b.to_string())
        .cloned()
        .unwrap_or_else(|| panic!("{b} not listed: {rows}"))
}

/// Waits until `b`'s health is `health`; returns how long it took.
fn wait_health(inst: &TestInstance, svc: ServiceAddr, b: SocketAddr, health: &str) -> Duration {
    let start = Instant::now();
    loop {
        let r = row(inst, svc, b);
        if r["health"] == health {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{b} never {health}: {r}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_killed_backend_leaves_the_ring_after_fall_checks_and_returns_after_rise() {
    require_root();
    let mut echoes: Vec<(Child, SocketAddr)> = (0..3)
        .map(|i| echo("127.0.0.1:0", &format!("e{i}")))
        .collect();
    let addrs: Vec<SocketAddr> = echoes.iter().map(|e| e.1).collect();
    let inst = instance("agkill", &[(SVC, addrs.clone())]);
    let dir = temp_dir(inst.name());
    let metrics = free_port();
    let agent = Agent::start(inst.name(), &dir, &check_config(SVC, "websocket", metrics));
    for a in &addrs {
        wait_health(&inst, SVC, *a, "healthy");
    }
    let victim = addrs[2];
    let slots = row(&inst, SVC, victim)["ring_slots"].as_u64().unwrap();
    assert!(slots > 0, "a healthy backend is in the ring");

    echoes[2].0.kill().unwrap();
    echoes[2].0.wait().unwrap();
    let took = wait_health(&inst, SVC, victim, "unhealthy");
    // fall × interval + jitter, plus one interval for the check in flight
    // when it died and the agent's batching and registry round.
    let bound = 2 * INTERVAL + INTERVAL / 10 + INTERVAL + Duration::from_millis(700);
    assert!(
        took < bound,
        "unhealthy after {took:?}, more than {bound:?}"
    );
    let r = row(&inst, SVC, victim);
    assert_eq!(r["health_reason"], "refused", "{r}");
    assert_eq!(
        r["ring_slots"], 0,
        "an unhealthy backend leaves the ring: {r}"
    );
    assert!(r["health_since"].is_string(), "{r}");
    for a in &addrs[..2] {
        assert_eq!(row(&inst, SVC, *a)["health"], "healthy");
    }
    // Logged right after the change is applied.
    let line = agent.wait_line(|l| {
        l.contains("\"event\":\"health\"")
            && l.contains(&victim.to_string())
            && l.contains("\"to\":\"unhealthy\"")
    });
    let line: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (&line["from"], &line["to"], &line["reason"]),
        (&"healthy".into(), &"unhealthy".into(), &"refused".into()),
        "{line}"
    );

    // The agent reads the registry back right after its change.
    let unhealthy = format!(
        "weir_agent_backend_health{{service=\"{SVC}\",backend=\"{victim}\",state=\"active\",\
         health=\"unhealthy\",reason=\"refused\"}} 1"
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    let text = loop {
        let text = scrape(metrics);
        if text.lines().any(|l| l == unhealthy) || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(text.lines().any(|l| l == unhealthy), "{text}");
    assert!(
        text.contains(&format!(
            "weir_agent_transitions_total{{service=\"{SVC}\",to=\"unhealthy\"}} 1"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "weir_agent_checks_total{{service=\"{SVC}\",type=\"websocket\",outcome=\"refused\"}}"
        )),
        "{text}"
    );

    // Back on the same address: healthy after rise passes.
    let (child, _) = echo(&victim.to_string(), "e2-again");
    echoes[2].0 = child;
    let took = wait_health(&inst, SVC, victim, "healthy");
    let bound = 2 * INTERVAL + INTERVAL / 10 + INTERVAL + Duration::from_millis(700);
    assert!(
        took < bound,
        "healthy again after {took:?}, more than {bound:?}"
    );
    let r = row(&inst, SVC, victim);
    assert!(r["ring_slots"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["health_reason"], "passed", "{r}");
    drop(agent);
    for (mut c, _) in echoes {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_backend_answering_500_fails_the_websocket_and_http_checks_and_passes_the_tcp_one() {
    require_root();
    let mut echoes: Vec<(Child, SocketAddr)> = (0..2)
        .map(|i| echo("127.0.0.1:0", &format!("e{i}")))
        .collect();
    let bad = answers_500();
    let mut set: Vec<SocketAddr> = echoes.iter().map(|e| e.1).collect();
    set.push(bad);
    let inst = instance(
        "ag500",
        &[(SVC, set.clone()), (TCP_SVC, set.clone()), (HTTP_SVC, set)],
    );
    let dir = temp_dir(inst.name());
    // weir-echo answers `GET /health` with 200.
    let both = format!(
        "{}[[check]]\nservice = \"{TCP_SVC}\"\ntype = \"tcp\"\ninterval = \"200ms\"\n\
         [[check]]\nservice = \"{HTTP_SVC}\"\ntype = \"http\"\npath = \"/health\"\n\
         interval = \"200ms\"\n",
        check_config(SVC, "websocket", free_port())
    );
    let agent = Agent::start(inst.name(), &dir, &both);
    wait_health(&inst, SVC, bad, "unhealthy");
    let r = row(&inst, SVC, bad);
    assert_eq!(
        (&r["health_reason"], &r["health_detail"]),
        (&"not_upgraded".into(), &500.into()),
        "{r}"
    );
    wait_health(&inst, TCP_SVC, bad, "healthy");
    wait_health(&inst, HTTP_SVC, bad, "unhealthy");
    let r = row(&inst, HTTP_SVC, bad);
    assert_eq!(
        (&r["health_reason"], &r["health_detail"]),
        (&"status".into(), &500.into()),
        "{r}"
    );
    for (_, e) in &echoes {
        for svc in [SVC, TCP_SVC, HTTP_SVC] {
            wait_health(&inst, svc, *e, "healthy");
        }
    }
    // A restarted agent resumes from the registry: no transition of its
    // own, the health and its time stay.
    let since = row(&inst, SVC, bad)["health_since"].clone();
    drop(agent);
    let again = Agent::start(inst.name(), &dir, &both);
    again.wait_for("started");
    std::thread::sleep(5 * INTERVAL);
    assert!(
        !again.log().contains("\"event\":\"health\""),
        "{}",
        again.log()
    );
    let r = row(&inst, SVC, bad);
    assert_eq!(
        (&r["health"], &r["health_since"]),
        (&"unhealthy".into(), &since),
        "{r}"
    );
    drop(again);
    for (c, _) in &mut echoes {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// An L4 check goes through the probe path; where it is not attached (no
/// `weir attach` here), the checks do not run and the backends keep their
/// health: a missing probe path must not empty a fleet.
#[test]
fn without_the_probe_path_l4_checks_wait_and_health_stays() {
    require_root();
    let l4 = ServiceAddr {
        vip: Ipv4Addr::new(198, 19, 0, 72),
        port: 80,
    };
    let b: SocketAddr = "198.18.0.72:80".parse().unwrap();
    let inst = instance_of("agl4", ServiceModeName::L4, &[(l4, vec![b])]);
    let dir = temp_dir(inst.name());
    let metrics = free_port();
    let agent = Agent::start(inst.name(), &dir, &check_config(l4, "tcp", metrics));
    agent.wait_for("probe_path_missing");
    std::thread::sleep(5 * INTERVAL);
    let r = row(&inst, l4, b);
    assert_eq!(
        (&r["health"], &r["health_reason"]),
        (&"unknown".into(), &"none".into()),
        "{r}"
    );
    let text = scrape(metrics);
    let skipped = text
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!(
                "weir_agent_probe_path_skipped_total{{service=\"{l4}\"}} "
            ))
        })
        .unwrap_or_else(|| panic!("no skipped checks counted:\n{text}"));
    assert!(skipped.parse::<u64>().unwrap() >= 3, "{text}");
    assert!(
        !text.contains("weir_agent_checks_total{"),
        "no check ran: {text}"
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_agent_is_refused_with_the_first_ones_pid_and_sigterm_stops_it() {
    require_root();
    let inst = instance("agtwo", &[]);
    let dir = temp_dir(inst.name());
    let first = Agent::start(inst.name(), &dir, "");
    first.wait_for("started");
    let out = Command::new(workspace_bin("weir"))
        .args(["--instance", inst.name(), "agent"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "another `weir agent` (pid {}) runs",
            first.child.id()
        )),
        "{err}"
    );
    // SIGTERM stops it cleanly; then the instance may have an agent again.
    let mut first = first;
    // SAFETY: kill(2) on the pid of a child this test started.
    assert_eq!(
        unsafe { libc::kill(first.child.id() as i32, libc::SIGTERM) },
        0
    );
    let status = first.child.wait().unwrap();
    assert!(status.success(), "{status}: {}", first.log());
    first.wait_for("stopped");
    let second = Agent::start(inst.name(), &dir, "");
    second.wait_for("started");
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_configurations_are_refused_at_start_with_file_line_and_reason() {
    require_root();
    let inst = instance("agbad", &[]);
    let dir = temp_dir(inst.name());
    let check = |rest: &str| format!("[[check]]\nservice = \"{SVC}\"\n{rest}");
    let cases = [
        (
            check("type = \"icmp\"\n"),
            4,
            "check.type = \"icmp\": must be tcp, http or websocket",
        ),
        (
            check("type = \"tcp\"\ninterval = \"0s\"\n"),
            5,
            "check.interval = \"0s\"",
        ),
        (check("type = \"tcp\"\nrise = 0\n"), 5, "check.rise = 0"),
        (
            check("type = \"http\"\npath = \"health\"\n"),
            5,
            "must start with /",
        ),
        (
            "[metrics]\nlisten = \"192.0.2.1:9101\"\n".to_string(),
            3,
            "metrics.listen = \"192.0.2.1:9101\": cannot listen there",
        ),
    ];
    for (text, line, reason) in cases {
        let path = dir.join("bad.toml");
        // The instance line comes first.
        std::fs::write(&path, format!("instance = \"{}\"\n{text}", inst.name())).unwrap();
        let out = Command::new(workspace_bin("weir"))
            .args(["agent", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        let at = format!("{}:{line}:", path.display());
        assert!(
            err.contains(&at) && err.contains(reason),
            "{text}\nwant {at} {reason}\n{err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// One agent, one thread, 2,000 backends: every one checked each second
/// (at most 1,000 checks at once), all healthy within rise × interval
/// after the first checks spread over one interval; when the port closes,
/// all unhealthy within fall × interval, and the service panics instead of
/// emptying.
#[test]
fn one_agent_checks_two_thousand_backends() {
    require_root();
    const N: usize = 2000;
    // One listener on every loopback address: 127.x.y.z:port all reach it.
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let accepting = open.clone();
    let acceptor = std::thread::spawn(move || {
        while accepting.load(std::sync::atomic::Ordering::Relaxed) {
            match listener.accept() {
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        // The listener closes here: connects are refused from now on.
    });
    let addrs: Vec<SocketAddr> = (0..N)
        .map(|i| SocketAddr::from(([127, 1 + (i / 200) as u8, 0, 1 + (i % 200) as u8], port)))
        .collect();
    let inst = TestInstance::new("agscale");
    let mut reg = inst.registry();
    let force = || ApplyOptions {
        force: true,
        ..Default::default()
    };
    let ring = weir::registry::maglev::checked_next_prime(100 * N as u32 + 1).unwrap();
    reg.apply(
        &Change::AddService {
            addr: TCP_SVC,
            mode: ServiceModeName::L7,
            ring_size: Some(ring),
            max_remove_fraction: None,
            min_backends: None,
            panic_threshold: None,
        },
        force(),
    )
    .unwrap();
    reg.apply(
        &Change::SetBackends {
            service: TCP_SVC,
            backends: addrs.iter().map(|a| (backend(*a), 1)).collect(),
        },
        force(),
    )
    .unwrap();
    let dir = temp_dir(inst.name());
    let metrics = free_port();
    let _agent = Agent::start(
        inst.name(),
        &dir,
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n[[check]]\nservice = \"{TCP_SVC}\"\n\
             type = \"tcp\"\ninterval = \"1s\"\njitter = \"10%\"\ntimeout = \"500ms\"\nrise = 2\n\
             fall = 2\n"
        ),
    );
    let count = |health: &str| -> usize {
        let out = Command::new(workspace_bin("weir"))
            .args(["--instance", inst.name(), "--json", "backend", "list"])
            .arg(TCP_SVC.to_string())
            .output()
            .unwrap();
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(rows.len(), N);
        rows.iter().filter(|r| r["health"] == health).count()
    };
    let wait_all = |health: &str, limit: Duration| -> Duration {
        let start = Instant::now();
        loop {
            let n = count(health);
            if n == N {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "{n} of {N} {health} after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // First checks spread over one interval (1 s), then rise 2: the last
    // backend is healthy about 2.1 s in; fall 2 takes at most 2.2 s (2.4 s
    // each measured alone). The bound is what an agent that keeps up
    // cannot miss even on a host busy with other tests (one run under
    // `cargo xtask test` had 26 of 2,000 left at 4 s); one that fell
    // behind its interval would miss it by whole intervals.
    let limit = Duration::from_secs(8);
    let up = wait_all("healthy", limit);
    open.store(false, std::sync::atomic::Ordering::Relaxed);
    acceptor.join().unwrap();
    let down = wait_all("unhealthy", limit);
    eprintln!(
        "{N} backends: all healthy after {up:?}, all unhealthy {down:?} after the port closed"
    );
    let text = scrape(metrics);
    let checks: u64 = text
        .lines()
        .filter(|l| l.starts_with("weir_agent_checks_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(checks >= 4 * N as u64, "{checks} checks:\n{text}");
    // Every check failing at once is what a broken check path looks like:
    // the service panics and keeps all 2,000 in the ring.
    let out = Command::new(workspace_bin("weir"))
        .args(["--instance", inst.name(), "--json", "service", "list"])
        .output()
        .unwrap();
    let services: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let s = &services[0];
    assert_eq!(s["panic"], true, "{s}");
    assert_eq!(s["in_ring"], N, "{s}");
    // Kept when the test fails: the agent's log is there.
    let _ = std::fs::remove_dir_all(&dir);
}
