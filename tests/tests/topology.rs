//! Self-test of the test bed: topology routing, weir-echo and weir-wsclient
//! talking directly to a backend (no load balancer), and clean teardown.
//! Needs root: each test fails without it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use weir_testbed::topology::{Topology, TopologySpec, install_signal_cleanup};
use weir_testbed::ws_client::Ending;
use weir_testbed::wsload::LoadReport;

const ECHO: &str = env!("CARGO_BIN_EXE_weir-echo");
const WSCLIENT: &str = env!("CARGO_BIN_EXE_weir-wsclient");

/// Needs root (fails otherwise); cleans up namespaces on Ctrl-C.
fn root_or_fail() {
    weir_testbed::require_root();
    install_signal_cleanup();
}

fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_namespaces_gone(names: &[String]) {
    let list = netns_list();
    for name in names {
        let present = list
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name.as_str()));
        assert!(!present, "namespace {name} still exists:\n{list}");
        assert!(!Path::new(&format!("/run/netns/{name}")).exists());
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Starts weir-echo named b{i} in every backend namespace on 0.0.0.0:8080.
fn start_echoes(topo: &mut Topology) -> Vec<u32> {
    let mut pids = Vec::new();
    for i in 0..topo.backend_ns.len() {
        let ns = topo.backend_ns[i].clone();
        let name = format!("b{i}");
        let (pid, line) = topo
            .spawn_ready_in(
                &ns,
                Path::new(ECHO),
                &["--listen", "0.0.0.0:8080", "--name", &name],
                Duration::from_secs(10),
            )
            .expect("start weir-echo");
        assert_eq!(line, "ready 0.0.0.0:8080");
        pids.push(pid);
    }
    pids
}

#[test]
fn topology_routes_echoes_and_cleans_up() {
    root_or_fail();
    let mut topo = Topology::build(TopologySpec {
        backends: 3,
        client_addrs: 2,
    })
    .expect("build topology");
    let names = topo.namespaces();
    assert_eq!(names.len(), 6);
    let list = netns_list();
    for n in &names {
        assert!(list.contains(n.as_str()), "{n} missing from:\n{list}");
    }

    // Routing through the router works without the load balancer.
    for i in 0..3 {
        let addr = topo.backend_addr(i);
        assert!(
            topo.ping(&topo.client_ns, addr),
            "client -> backend {i} ({addr})"
        );
        assert!(
            topo.ping(&topo.backend_ns[i], topo.client_addr(1)),
            "backend {i} -> client"
        );
    }
    assert!(topo.ping(&topo.client_ns, topo.lb_addr()), "client -> lb");
    assert!(
        topo.ping(&topo.lb_ns, topo.backend_addr(2)),
        "lb -> backend 2"
    );
    // The VIP is routed to the lb, which has no VIP and no XDP program yet:
    // nothing answers from 198.19.0.10.
    assert!(
        !topo.ping(&topo.client_ns, topo.vip()),
        "VIP answered without the lb"
    );

    // Interfaces and MTUs as specified.
    let link = |ns: &str, dev: &str| {
        let out = topo
            .run_ok_in(ns, "ip", &["-o", "link", "show", "dev", dev])
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(link(&topo.lb_ns, topo.lb_dev()).contains("mtu 9000"));
    assert!(link(&topo.router_ns, topo.router_lb_dev()).contains("mtu 9000"));
    assert!(link(&topo.backend_ns[1], &topo.backend_dev(1)).contains("mtu 9000"));
    assert!(link(&topo.client_ns, topo.client_dev()).contains("mtu 1500"));
    let gro = topo
        .run_ok_in(&topo.router_ns, "ethtool", &["-k", topo.router_lb_dev()])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&gro.stdout).contains("generic-receive-offload: on"),
        "GRO off on the router side of the lb link"
    );

    topo.set_lb_link_mtu(3000).unwrap();
    assert!(link(&topo.router_ns, topo.router_lb_dev()).contains("mtu 3000"));
    topo.set_lb_link_mtu(9000).unwrap();

    assert_eq!(weir_testbed::workspace_bin("weir-echo"), Path::new(ECHO));

    let echo_pids = start_echoes(&mut topo);
    assert!(topo.wait_tcp(
        &topo.client_ns,
        "198.18.12.2:8080".parse().unwrap(),
        Duration::from_secs(5)
    ));

    // Health endpoint, from the client namespace.
    let health = weir_testbed::topology::in_netns(&topo.ns_path(&topo.client_ns), || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(
            &"198.18.11.2:8080".parse().unwrap(),
            Duration::from_secs(2),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        std::io::Result::Ok(resp)
    })
    .unwrap()
    .expect("health request");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("x-weir-backend: b1"), "{health}");

    // 20 connections straight to backend 0 for 2 s, from both client addresses.
    let (c0, c1) = (
        topo.client_addr(0).to_string(),
        topo.client_addr(1).to_string(),
    );
    let t0 = Instant::now();
    let out = topo
        .run_in_timeout(
            &topo.client_ns,
            WSCLIENT,
            &[
                "--url",
                "ws://198.18.10.2:8080/",
                "--connections",
                "20",
                "--duration-secs",
                "2",
                "--source",
                &c0,
                "--source",
                &c1,
                "--quiet",
            ],
            Duration::from_secs(60),
        )
        .expect("run weir-wsclient");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "weir-wsclient failed: {stderr}");
    let report = LoadReport::from_json(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|e| panic!("{e:#}; stderr: {stderr}"));
    let s = &report.summary;
    assert_eq!(s.connected, 20, "{s:?}");
    assert_eq!(s.failed, 0, "{s:?}");
    assert_eq!(s.broken, 0, "{report:?}");
    assert_eq!(s.per_backend.len(), 1, "{s:?}");
    assert_eq!(s.per_backend.get("b0"), Some(&20), "{s:?}");
    assert!(s.messages_sent >= 20 * 10, "{s:?}");
    assert_eq!(s.messages_sent, s.messages_echoed, "{s:?}");
    assert!(t0.elapsed() < Duration::from_secs(15));
    for c in &report.connections {
        assert_eq!(c.close, Ending::Clean, "{c:?}");
        assert_eq!(c.mismatches, 0);
        let local = c.local_addr.as_deref().unwrap();
        let want = if c.index % 2 == 0 { &c0 } else { &c1 };
        assert!(local.starts_with(&format!("{want}:")), "{c:?}");
        // The backend saw the real client address (no NAT on the way).
        assert_eq!(c.peer_seen.as_deref(), Some(local), "{c:?}");
    }

    // Killing one backend by hand works and is reaped.
    let st = topo.stop_child(echo_pids[2], Duration::from_secs(2));
    assert!(
        st.is_some_and(|s| s.success()),
        "weir-echo did not exit cleanly: {st:?}"
    );

    drop(topo);
    assert_namespaces_gone(&names);
    for pid in echo_pids {
        assert!(!pid_alive(pid), "weir-echo {pid} still running");
    }
}

#[test]
fn hold_file_ends_talking_early() {
    root_or_fail();
    let mut topo = Topology::build(TopologySpec {
        backends: 1,
        client_addrs: 1,
    })
    .expect("build topology");
    let names = topo.namespaces();
    start_echoes(&mut topo);
    let dir = std::env::temp_dir().join(format!("{}-hold", topo.id));
    std::fs::create_dir_all(&dir).unwrap();
    let hold = dir.join("hold");
    let ready = dir.join("ready");
    let (hold_s, ready_s) = (
        hold.to_string_lossy().into_owned(),
        ready.to_string_lossy().into_owned(),
    );
    let t0 = Instant::now();
    let client = topo
        .start_in(
            &topo.client_ns,
            Path::new(WSCLIENT),
            &[
                "--url",
                "ws://198.18.10.2:8080/",
                "--connections",
                "10",
                "--duration-secs",
                "30",
                "--interval-ms",
                "50",
                "--hold-file",
                &hold_s,
                "--ready-file",
                &ready_s,
            ],
        )
        .expect("start weir-wsclient");
    let mut ready_seen = false;
    for _ in 0..200 {
        if ready.exists() {
            ready_seen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ready_seen, "ready file not created");
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&hold, b"go").unwrap();
    let out = client
        .wait_output(Duration::from_secs(20))
        .expect("wsclient");
    let elapsed = t0.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    let report = LoadReport::from_json(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let s = &report.summary;
    assert!(
        elapsed < Duration::from_secs(15),
        "hold file ignored: {elapsed:?}"
    );
    assert_eq!((s.connected, s.failed, s.broken), (10, 0, 0), "{report:?}");
    assert!(s.messages_echoed >= 10, "{s:?}");
    assert_eq!(s.per_backend.get("b0"), Some(&10));
    drop(topo);
    assert_namespaces_gone(&names);
}

#[test]
fn failed_build_cleans_up() {
    root_or_fail();
    assert!(
        Topology::build(TopologySpec {
            backends: 0,
            client_addrs: 1
        })
        .is_err()
    );
    assert!(
        Topology::build(TopologySpec {
            backends: 21,
            client_addrs: 1
        })
        .is_err()
    );
    // Fail midway (after the namespaces and some links exist).
    weir_testbed::topology::inject_build_failure_after(14);
    let err = match Topology::build(TopologySpec {
        backends: 2,
        client_addrs: 1,
    }) {
        Ok(_) => panic!("injected failure did not happen"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("injected failure"), "{err}");
    // "building topology wt<pid>x<n>: ..."
    let id = err
        .split_whitespace()
        .find(|w| w.starts_with("wt"))
        .map(|w| w.trim_end_matches(':'))
        .unwrap_or_else(|| panic!("no topology id in {err}"));
    let prefix = format!("{id}-");
    let list = netns_list();
    assert!(
        !list.lines().any(|l| l.starts_with(&prefix)),
        "left behind by {id}:\n{list}"
    );
}

#[test]
fn thousand_connections_through_the_router() {
    root_or_fail();
    let mut topo = Topology::build(TopologySpec {
        backends: 1,
        client_addrs: 4,
    })
    .expect("build topology");
    start_echoes(&mut topo);
    let sources: Vec<String> = topo.client_addrs().iter().map(|a| a.to_string()).collect();
    let mut args = vec![
        "--url",
        "ws://198.18.10.2:8080/",
        "--connections",
        "1000",
        "--duration-secs",
        "2",
        "--interval-ms",
        "250",
        "--quiet",
    ];
    for s in &sources {
        args.extend(["--source", s.as_str()]);
    }
    let out = topo
        .run_in_timeout(&topo.client_ns, WSCLIENT, &args, Duration::from_secs(90))
        .expect("run weir-wsclient");
    let report = LoadReport::from_json(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|e| panic!("{e:#}: {}", String::from_utf8_lossy(&out.stderr)));
    let s = &report.summary;
    assert_eq!((s.connected, s.failed, s.broken), (1000, 0, 0), "{s:?}");
    assert_eq!(s.messages_sent, s.messages_echoed, "{s:?}");
    assert_eq!(s.per_backend.get("b0"), Some(&1000));
}

/// weir-echo pushes on request: `count` frames on its schedule, stamped
/// with the times they were due, in order; a malformed request gets Close
/// 1008 instead. No namespaces: the host's loopback.
#[test]
fn weir_echo_pushes_frames_on_request() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use weir_testbed::push::{PushRequest, read_frame, realtime_ns};
    use weir_testbed::ws_client::Dialer;

    root_or_fail();
    let mut echo = Command::new(ECHO)
        .args(["--listen", "127.0.0.1:0", "--name", "pusher"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start weir-echo");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(echo.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr: std::net::SocketAddr = line.trim().strip_prefix("ready ").unwrap().parse().unwrap();
    let dialer = Dialer {
        target: addr,
        uri: format!("ws://{addr}/").parse().unwrap(),
        timeout: Duration::from_secs(5),
        read_buffer: 8 * 1024,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let outcome = rt.block_on(async {
        let mut ws = dialer.dial(None).await.expect("dial").ws;
        let req = PushRequest {
            rate: 100.0,
            size: 48,
            count: 20,
            delay: Duration::from_millis(30),
        };
        let asked = realtime_ns();
        ws.send(Message::text(req.to_string())).await.unwrap();
        let mut stamps = Vec::new();
        while stamps.len() < 20 {
            let msg = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
            let Ok(Some(Ok(Message::Binary(b)))) = msg else {
                panic!("expected a frame, got {msg:?}");
            };
            let (stamp, seq) = read_frame(&b, 48).expect("a well-formed frame");
            assert_eq!(seq, stamps.len() as u64);
            assert!(realtime_ns() >= stamp, "frame {seq} came before it was due");
            stamps.push(stamp);
        }
        assert!(stamps[0] >= asked + 30_000_000, "the delay was not kept");
        for w in stamps.windows(2) {
            assert_eq!(w[1] - w[0], 10_000_000);
        }
        // Nothing more than asked for.
        let extra = tokio::time::timeout(Duration::from_millis(100), ws.next()).await;
        assert!(extra.is_err(), "{extra:?}");

        let mut bad = dialer.dial(None).await.expect("dial").ws;
        bad.send(Message::text("push rate=0 size=48 count=1"))
            .await
            .unwrap();
        let msg = tokio::time::timeout(Duration::from_secs(5), bad.next()).await;
        let Ok(Some(Ok(Message::Close(Some(frame))))) = msg else {
            panic!("expected Close, got {msg:?}");
        };
        u16::from(frame.code)
    });
    let _ = echo.kill();
    let _ = echo.wait();
    assert_eq!(outcome, 1008);
}
