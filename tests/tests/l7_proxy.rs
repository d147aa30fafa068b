//! `weir run` with real sockets: WebSocket echo backends (weir-echo), raw
//! and load clients, the registry changed live with the CLI.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::ws::{close_code, raw_request, recv, send, upgrade};
use common::{TestInstance, add_l7_service, backend, free_port, require_root};
use weir::l7::config::{ConfigBuilder, Outlier, Timeout};
use weir::l7::frame::{self, FrameHeader, Opcode};
use weir::registry::{ApplyOptions, BackendAddr, Change, ServiceAddr};
use weir_testbed::workspace_bin;
use weir_testbed::ws_client::Ending;
use weir_testbed::wsload::LoadReport;

const SVC: ServiceAddr = ServiceAddr {
    vip: Ipv4Addr::new(198, 19, 0, 60),
    port: 80,
};
const EMPTY: ServiceAddr = ServiceAddr {
    vip: Ipv4Addr::new(198, 19, 0, 61),
    port: 80,
};
const DEAD: ServiceAddr = ServiceAddr {
    vip: Ipv4Addr::new(198, 19, 0, 62),
    port: 80,
};

/// weir run with `backends` echo servers behind SVC; everything is stopped
/// and removed on drop.
struct Bed {
    inst: TestInstance,
    echoes: Vec<(Child, SocketAddr)>,
    weir: Option<Child>,
    port: u16,
    metrics_port: u16,
    dir: std::path::PathBuf,
}

impl Bed {
    fn new(tag: &str, backends: usize) -> Self {
        Self::configured(tag, backends, |c| c)
    }

    /// Like `new`, with the configuration changed by `edit`.
    fn configured(
        tag: &str,
        backends: usize,
        edit: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
    ) -> Self {
        Self::with_run_args(tag, backends, edit, &[])
    }

    /// Like `configured`, with `run_args` added to `weir run`.
    fn with_run_args(
        tag: &str,
        backends: usize,
        edit: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
        run_args: &[&str],
    ) -> Self {
        Self::spawn(tag, backends, edit, run_args, None)
    }

    /// Like `with_run_args`; `nofile`, when given, is `weir run`'s
    /// open-files limit (soft and hard).
    fn spawn(
        tag: &str,
        backends: usize,
        edit: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
        run_args: &[&str],
        nofile: Option<u64>,
    ) -> Self {
        let inst = TestInstance::new(tag);
        let dir = std::env::temp_dir().join(format!("weir-l7-{}", inst.name()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut echoes = Vec::new();
        for i in 0..backends {
            echoes.push(weir_testbed::spawn_echo("127.0.0.1:0", &format!("e{i}")));
        }
        let mut reg = inst.registry();
        let force = || ApplyOptions {
            force: true,
            ..Default::default()
        };
        for svc in [SVC, EMPTY, DEAD] {
            reg.apply(&add_l7_service(svc), force()).unwrap();
        }
        let set = echoes.iter().map(|(_, a)| (backend(*a), 1)).collect();
        reg.apply(
            &Change::SetBackends {
                service: SVC,
                backends: set,
            },
            force(),
        )
        .unwrap();
        // Nothing listens on port 1: connecting is refused.
        let dead = BackendAddr {
            addr: Ipv4Addr::LOCALHOST,
            port: 1,
        };
        reg.apply(
            &Change::SetBackends {
                service: DEAD,
                backends: vec![(dead, 1)],
            },
            force(),
        )
        .unwrap();

        let port = free_port();
        let metrics_port = free_port();
        let ms = Duration::from_millis;
        let config = ConfigBuilder::new()
            .instance(inst.name())
            .workers(2)
            .buffers(1024)
            .metrics(SocketAddr::from((Ipv4Addr::LOCALHOST, metrics_port)))
            .timeout(Timeout::ClientHead, ms(1000))
            .timeout(Timeout::Close, ms(1000))
            .timeout(Timeout::Shutdown, ms(2000))
            .timeout(Timeout::BackendHead, ms(1000))
            .frame_limits(1 << 20, 2 << 20)
            .listener(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .route("/ws", SVC)
            .route("/empty", EMPTY)
            .route("/dead", DEAD);
        let config = edit(config).to_string();
        let path = dir.join("weir.toml");
        std::fs::write(&path, config).unwrap();
        let mut weir = Command::new(workspace_bin("weir"));
        weir.args(["run", "--config"])
            .arg(&path)
            .args(run_args)
            .stderr(std::fs::File::create(dir.join("weir.log")).unwrap());
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe; the struct outlives
            // the call.
            unsafe {
                weir.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                })
            };
        }
        let weir = weir.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "weir run did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            inst,
            echoes,
            weir: Some(weir),
            port,
            metrics_port,
            dir,
        }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// weir-wsclient against weir; `hold` keeps connections until the file
    /// exists.
    fn clients(&self, n: usize, secs: u64, hold: Option<&std::path::Path>) -> Child {
        let mut cmd = Command::new(workspace_bin("weir-wsclient"));
        cmd.args([
            "--url",
            &self.url(),
            "--connections",
            &n.to_string(),
            "--duration-secs",
            &secs.to_string(),
            "--quiet",
        ]);
        if let Some(h) = hold {
            cmd.arg("--hold-file").arg(h);
            cmd.arg("--ready-file").arg(h.with_extension("ready"));
        }
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// What weir run wrote to stderr so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("weir.log")).unwrap_or_default()
    }

    /// Waits until weir run's log has a line containing `text`.
    fn wait_for_log(&self, text: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} within {limit:?} in:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM to weir run; it must exit 0 within `limit`.
    fn stop(&mut self, limit: Duration) {
        let mut weir = self.weir.take().expect("weir run is running");
        // SAFETY: a plain kill(2) of the child this bed started.
        unsafe { libc::kill(weir.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = weir.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "weir did not exit within {limit:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{status}: {}", self.log());
    }

    /// `n` clients that talk for at most `secs`, held until the returned
    /// hold file exists; returns once every one of them has connected (or
    /// failed to).
    fn held_clients(&self, n: usize, secs: u64) -> (Child, std::path::PathBuf) {
        let hold = self.dir.join("hold");
        let clients = self.clients(n, secs, Some(&hold));
        let ready = hold.with_extension("ready");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            assert!(Instant::now() < deadline, "clients never connected");
            std::thread::sleep(Duration::from_millis(20));
        }
        (clients, hold)
    }

    /// A `weir agent` for the instance that only frees removed backends
    /// (no checks); the caller stops it.
    fn agent(&self) -> Child {
        let path = self.dir.join("agent.toml");
        std::fs::write(&path, format!("instance = \"{}\"\n", self.inst.name())).unwrap();
        Command::new(workspace_bin("weir"))
            .args(["agent", "--config"])
            .arg(&path)
            .stderr(std::fs::File::create(self.dir.join("agent.log")).unwrap())
            .spawn()
            .unwrap()
    }

    fn weir_cli(&self, args: &[&str]) {
        let out = Command::new(workspace_bin("weir"))
            .args(["--instance", self.inst.name()])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(mut w) = self.weir.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        for (c, _) in &mut self.echoes {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn report(child: Child) -> LoadReport {
    let out = child.wait_with_output().unwrap();
    LoadReport::from_json(&String::from_utf8_lossy(&out.stdout)).unwrap()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn messages_of_every_kind_echo_through_weir() {
    require_root();
    let bed = Bed::new("l7echo", 2);
    let (mut s, head) = upgrade(bed.port, "/ws/chat");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase().contains("x-weir-backend: e"),
        "backend's own headers pass: {head}"
    );

    send(&mut s, true, Opcode::Text, b"hello");
    assert_eq!(recv(&mut s), (true, 1, b"hello".to_vec()));
    send(&mut s, true, Opcode::Binary, &[0, 1, 2, 255]);
    assert_eq!(recv(&mut s), (true, 2, vec![0, 1, 2, 255]));
    // Fragmented, with a ping between the fragments.
    send(&mut s, false, Opcode::Text, b"frag");
    send(&mut s, false, Opcode::Continuation, b"men");
    send(&mut s, true, Opcode::Ping, b"are you there");
    send(&mut s, true, Opcode::Continuation, b"ted");
    let mut got = [recv(&mut s), recv(&mut s)];
    got.sort_by_key(|f| f.1);
    assert_eq!(got[0], (true, 1, b"fragmented".to_vec()));
    assert_eq!(got[1], (true, 0xA, b"are you there".to_vec()));
    // 1 MiB in one message.
    let big: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    send(&mut s, true, Opcode::Binary, &big);
    let mut echoed = Vec::new();
    loop {
        let (fin, _, p) = recv(&mut s);
        echoed.extend(p);
        if fin {
            break;
        }
    }
    assert_eq!(echoed, big);
    // Close handshake, then TCP close by the server side.
    send(&mut s, true, Opcode::Close, &1000u16.to_be_bytes());
    let (_, op, payload) = recv(&mut s);
    assert_eq!((op, close_code(&payload)), (8, 1000));
    let mut rest = [0u8; 1];
    assert_eq!(
        s.read(&mut rest).unwrap_or(0),
        0,
        "then the connection ends"
    );
}

#[test]
fn a_thousand_connections_echo() {
    require_root();
    let bed = Bed::new("l7load", 3);
    let r = report(bed.clients(1000, 3, None));
    assert_eq!(r.summary.connected, 1000, "{:?}", r.summary);
    assert_eq!(r.summary.broken, 0, "{:?}", r.summary);
    assert_eq!(r.summary.messages_echoed, r.summary.messages_sent);
    assert_eq!(
        r.summary.per_backend.len(),
        3,
        "{:?}",
        r.summary.per_backend
    );
}

#[test]
fn handshake_rules_get_their_status() {
    require_root();
    let bed = Bed::new("l7hs", 1);
    let port = bed.port;
    let base =
        "Host: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n";
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let cases: Vec<(&str, String, &str)> = vec![
        ("no key", format!("GET /ws HTTP/1.1\r\n{base}\r\n"), "400"),
        (
            "POST",
            format!("POST /ws HTTP/1.1\r\n{base}{key}\r\n"),
            "400",
        ),
        (
            "version 8",
            format!(
                "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\n{key}\r\n"
            ),
            "426",
        ),
        (
            "huge head",
            format!(
                "GET /ws HTTP/1.1\r\n{base}{key}X-Pad: {}\r\n\r\n",
                "a".repeat(9000)
            ),
            "431",
        ),
        (
            "no route",
            format!("GET /nowhere HTTP/1.1\r\n{base}{key}\r\n"),
            "404",
        ),
        (
            "no backend",
            format!("GET /empty HTTP/1.1\r\n{base}{key}\r\n"),
            "503",
        ),
        (
            "backend refuses",
            format!("GET /dead HTTP/1.1\r\n{base}{key}\r\n"),
            "502",
        ),
    ];
    for (what, request, status) in cases {
        let (_, head) = raw_request(port, &request);
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: {head:?}"
        );
        if status == "426" {
            assert!(head.contains("Sec-WebSocket-Version: 13"), "{head}");
        }
    }
    // Slowloris: half a head, then nothing: weir gives up after 1 s.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: t\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn frame_rules_get_their_close_code() {
    require_root();
    let bed = Bed::new("l7fr", 1);
    let mut cases: Vec<(&str, Vec<u8>, u16)> = Vec::new();
    let mut unmasked = Vec::new();
    FrameHeader::new(true, Opcode::Text, None, 2).write_to(&mut unmasked);
    unmasked.extend(b"hi");
    cases.push(("unmasked", unmasked, 1002));
    cases.push(("reserved opcode", vec![0x83, 0x80, 1, 2, 3, 4], 1002));
    cases.push(("RSV2", vec![0xa1, 0x80, 1, 2, 3, 4], 1002));
    cases.push(("fragmented ping", vec![0x09, 0x80, 1, 2, 3, 4], 1002));
    cases.push(("continuation first", vec![0x80, 0x80, 1, 2, 3, 4], 1002));
    let mut long_ping = Vec::new();
    FrameHeader::new(true, Opcode::Ping, Some([1, 2, 3, 4]), 126).write_to(&mut long_ping);
    long_ping.extend([0; 126]);
    cases.push(("control over 125", long_ping, 1002));
    let mut too_big = Vec::new();
    FrameHeader::new(true, Opcode::Binary, Some([1, 2, 3, 4]), (1 << 20) + 1)
        .write_to(&mut too_big);
    cases.push(("frame over max_frame", too_big, 1009));
    for (what, bytes, code) in cases {
        let (mut s, head) = upgrade(bed.port, "/ws");
        assert!(head.starts_with("HTTP/1.1 101"), "{what}: {head}");
        send(&mut s, true, Opcode::Text, b"ok");
        assert_eq!(
            recv(&mut s).2,
            b"ok",
            "{what}: relaying before the violation"
        );
        s.write_all(&bytes).unwrap();
        let (_, op, payload) = recv(&mut s);
        assert_eq!((op, close_code(&payload)), (8, code), "{what}");
    }
}

#[test]
fn drain_closes_exactly_the_drained_backends_clients_spread_over_the_window() {
    require_root();
    let bed = Bed::configured("l7drain", 3, |c| c.drain_window(Duration::from_secs(3)));
    let (clients, hold) = bed.held_clients(200, 30);
    let drained = bed.echoes[1].1;
    let started = unix_ms();
    bed.weir_cli(&["backend", "drain", &SVC.to_string(), &drained.to_string()]);
    std::thread::sleep(Duration::from_secs(5));
    std::fs::write(&hold, b"done").unwrap();
    let r = report(clients);
    assert_eq!(r.summary.connected, 200, "{:?}", r.summary);
    let mut close_times = Vec::new();
    for c in &r.connections {
        let on_drained = c.backend.as_deref() == Some("e1");
        if on_drained {
            assert_eq!(c.close, Ending::PeerClose(1001), "{c:?}");
            close_times.push(c.peer_close_unix_ms.unwrap() - started);
        } else {
            assert_eq!(
                c.close,
                Ending::Clean,
                "a connection of another backend was touched: {c:?}"
            );
            assert!(c.error.is_none(), "{c:?}");
        }
        assert_eq!(c.mismatches, 0);
    }
    // Spread over the 3 s window: not all at once, none after it (plus the
    // registry poll and close handshake slack).
    close_times.sort();
    assert!(close_times.len() >= 30, "{} drained", close_times.len());
    let (first, last) = (close_times[0], *close_times.last().unwrap());
    assert!(
        last - first >= 1500,
        "closes spread over {} ms only",
        last - first
    );
    assert!(last <= 3000 + 1000, "last close {last} ms after the drain");
    // The drain is logged where it starts and where its last connection
    // went (each worker logs its own share).
    bed.wait_for_log(
        &format!("weir: drain of backend {drained} ended: "),
        Duration::from_secs(5),
    );
    assert!(
        bed.log()
            .contains(&format!("weir: drain of backend {drained} started: ")),
        "{}",
        bed.log()
    );
    let in_first_half = close_times
        .iter()
        .filter(|t| **t - first < (last - first) / 2)
        .count() as f64;
    let share = in_first_half / close_times.len() as f64;
    assert!(
        (0.3..=0.7).contains(&share),
        "{share} of the closes in the first half of the spread"
    );
}

#[test]
fn sigterm_drains_every_client_and_exits_zero() {
    require_root();
    let mut bed = Bed::new("l7term", 2);
    let (clients, hold) = bed.held_clients(50, 30);
    bed.stop(Duration::from_secs(6));
    std::fs::write(&hold, b"done").unwrap();
    let r = report(clients);
    assert_eq!(r.summary.connected, 50);
    assert_eq!(
        r.summary.closes.get("peer_close:1001"),
        Some(&50),
        "{:?}",
        r.summary.closes
    );
}

/// A backend that accepts and then does `behave` with each connection.
fn fake_backend(behave: fn(TcpStream)) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().take(4).flatten() {
            std::thread::spawn(move || behave(s));
        }
    });
    addr
}

#[test]
fn silent_and_refusing_backends_get_504_and_their_own_answer() {
    require_root();
    let bed = Bed::new("l7bad", 0);
    let silent = fake_backend(|s| {
        std::thread::sleep(Duration::from_secs(5));
        drop(s);
    });
    let forbidding = fake_backend(|mut s| {
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        let _ = s.write_all(
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnope",
        );
    });
    let mut reg = bed.inst.registry();
    let force = || ApplyOptions {
        force: true,
        ..Default::default()
    };
    reg.apply(
        &Change::SetBackends {
            service: SVC,
            backends: vec![(backend(silent), 1)],
        },
        force(),
    )
    .unwrap();
    let started = Instant::now();
    let (_, head) = upgrade(bed.port, "/ws");
    assert!(head.starts_with("HTTP/1.1 504 "), "{head}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "waited for backend_head"
    );

    reg.apply(
        &Change::SetBackends {
            service: SVC,
            backends: vec![(backend(forbidding), 1)],
        },
        force(),
    )
    .unwrap();
    let (mut s, head) = upgrade(bed.port, "/ws");
    assert!(
        head.starts_with("HTTP/1.1 403 Forbidden"),
        "the backend's answer passes: {head}"
    );
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    assert_eq!(body, "nope");
}

#[test]
fn a_registry_change_applies_to_the_very_next_connection() {
    require_root();
    let bed = Bed::new("l7live", 2);
    let (first, second) = (bed.echoes[0].1, bed.echoes[1].1);
    let mut reg = bed.inst.registry();
    let force = || ApplyOptions {
        force: true,
        ..Default::default()
    };
    let name = |head: &str| {
        head.lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("x-weir-backend: ")
                    .map(str::to_string)
            })
            .unwrap_or_default()
    };
    for (target, want) in [(first, "e0"), (second, "e1"), (first, "e0")] {
        reg.apply(
            &Change::SetBackends {
                service: SVC,
                backends: vec![(backend(target), 1)],
            },
            force(),
        )
        .unwrap();
        let changed = Instant::now();
        // No pause: the worker checks the generation on every accept.
        let (_, head) = upgrade(bed.port, "/ws");
        let took = changed.elapsed();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert_eq!(name(&head), want, "the next connection follows the change");
        assert!(
            took < Duration::from_millis(100),
            "handshake after the change took {took:?}"
        );
    }
}

#[test]
fn quiet_clients_are_pinged_and_dead_ones_timed_out() {
    require_root();
    // Pings every 300 ms; gives up after 1 s without a frame.
    let bed = Bed::configured("l7ping", 1, |c| {
        c.timeout(Timeout::PingInterval, Duration::from_millis(300))
            .timeout(Timeout::Idle, Duration::from_secs(1))
    });
    let (mut s, head) = upgrade(bed.port, "/ws");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let started = Instant::now();
    let (_, op, payload) = recv(&mut s);
    assert_eq!(
        (op, payload.as_slice()),
        (0x9, b"weir".as_slice()),
        "a ping"
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
    // Answering keeps the connection; silence then ends it with 1001.
    send(&mut s, true, Opcode::Pong, b"weir");
    loop {
        let (_, op, payload) = recv(&mut s);
        if op == 0x8 {
            assert_eq!(close_code(&payload), 1001);
            break;
        }
        assert_eq!(op, 0x9, "only pings until the idle timeout");
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1200),
        "the pong counted as activity"
    );
}

#[test]
fn metrics_and_stats_report_what_happened() {
    require_root();
    let bed = Bed::new("l7met", 1);
    let r = report(bed.clients(10, 1, None));
    assert_eq!(r.summary.connected, 10);
    let _ = raw_request(bed.port, "GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n");
    let (mut s, _) = upgrade(bed.port, "/ws");
    s.write_all(&[0x83, 0x80, 1, 2, 3, 4]).unwrap();
    let (_, op, _) = recv(&mut s);
    assert_eq!(op, 8);
    drop(s);
    std::thread::sleep(Duration::from_millis(300));

    let (mut m, _) = raw_request(bed.metrics_port, "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut text = String::new();
    m.read_to_string(&mut text).unwrap();
    let value = |line_start: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
    };
    let backend = bed.echoes[0].1;
    assert_eq!(value("weir_l7_handshakes_total{outcome=\"upgraded\"}"), 11);
    assert_eq!(
        value("weir_l7_handshakes_total{outcome=\"rejected\",status=\"400\"}"),
        1,
        "no Upgrade header: 400"
    );
    assert_eq!(
        value(&format!(
            "weir_l7_connections_total{{backend=\"{backend}\"}}"
        )),
        11
    );
    assert_eq!(
        value(&format!(
            "weir_l7_connections_active{{backend=\"{backend}\"}}"
        )),
        0
    );
    assert_eq!(
        value("weir_l7_close_codes_total{direction=\"sent_to_client\",code=\"1002\"}"),
        1
    );
    assert_eq!(
        value("weir_l7_close_codes_total{direction=\"from_client\",code=\"1000\"}"),
        10
    );
    assert!(value("weir_l7_frames_total{direction=\"client_to_backend\"}") >= 10 * 9);
    assert!(value("weir_l7_bytes_total{direction=\"backend_to_client\"}") > 0);

    // weir stats shows the same, from the snapshot the daemon writes.
    std::thread::sleep(Duration::from_millis(1200));
    let out = Command::new(workspace_bin("weir"))
        .args(["--instance", bed.inst.name(), "--json", "stats"])
        .output()
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["l7"]["handshakes"]["upgraded"], 11, "{stats}");
}

#[test]
fn a_removed_backend_leaves_the_registry_after_its_last_connection() {
    require_root();
    let bed = Bed::configured("l7gone", 2, |c| c.drain_window(Duration::from_secs(1)));
    // Freeing removed backends is `weir agent`'s work.
    let mut agent = bed.agent();
    let (clients, hold) = bed.held_clients(20, 30);
    let (kept, leaving) = (bed.echoes[0].1, bed.echoes[1].1);
    bed.weir_cli(&[
        "backend",
        "set",
        &SVC.to_string(),
        &kept.to_string(),
        "--force",
    ]);
    let state_of = |addr: SocketAddr| {
        let state = bed.inst.registry().state().unwrap();
        state
            .backends
            .values()
            .find(|b| b.addr == backend(addr))
            .map(|b| b.state.name())
    };
    assert_eq!(
        state_of(leaving),
        Some("removed"),
        "still carrying L7 connections"
    );
    let deadline = Instant::now() + Duration::from_secs(6);
    while state_of(leaving).is_some() {
        assert!(
            Instant::now() < deadline,
            "the drained backend never left the registry"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(state_of(kept), Some("active"));
    agent.kill().unwrap();
    agent.wait().unwrap();
    std::fs::write(&hold, b"done").unwrap();
    let r = report(clients);
    let drained = r
        .connections
        .iter()
        .filter(|c| c.close == Ending::PeerClose(1001))
        .count();
    assert_eq!(
        drained,
        r.summary.per_backend.get("e1").copied().unwrap_or(0)
    );
}

#[test]
fn churn_replacing_the_whole_set_fails_no_handshake_and_cuts_nothing() {
    require_root();
    let mut bed = Bed::configured("l7churn", 8, |c| c.drain_window(Duration::from_secs(1)));
    let sets: Vec<Vec<String>> = (0..4)
        .map(|k| {
            vec![
                bed.echoes[2 * k].1.to_string(),
                bed.echoes[2 * k + 1].1.to_string(),
            ]
        })
        .collect();
    let set = |bed: &Bed, i: usize| {
        let mut args = vec![
            "backend".to_string(),
            "set".into(),
            SVC.to_string(),
            "--force".into(),
        ];
        args.extend(sets[i].iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        bed.weir_cli(&args);
    };
    set(&bed, 0);
    // 50 new connections a second for 8 seconds, each talking for 2 s; the
    // whole set is replaced at 2, 4 and 6 s, and a replaced set's servers
    // are stopped 2 s later (after its 1 s drain window): a connection left
    // on them would be cut, not drained.
    let mut batches = Vec::new();
    let started = Instant::now();
    for second in 0..10u64 {
        while started.elapsed() < Duration::from_secs(second) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if second > 0 && second % 2 == 0 && second <= 6 {
            set(&bed, (second / 2) as usize);
        }
        if second >= 4 && second % 2 == 0 && second <= 8 {
            let old = (second / 2 - 2) as usize;
            for (child, _) in &mut bed.echoes[2 * old..2 * old + 2] {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if second < 8 {
            batches.push(bed.clients(50, 2, None));
        }
    }
    let mut closes = std::collections::BTreeMap::new();
    let mut backends = std::collections::BTreeSet::new();
    for b in batches {
        let r = report(b);
        assert_eq!(r.summary.failed, 0, "failed handshakes: {:?}", r.summary);
        for c in &r.connections {
            *closes.entry(c.close).or_insert(0) += 1;
            backends.insert(c.backend.clone().unwrap_or_default());
            assert_eq!(c.mismatches, 0);
        }
    }
    let cut: usize = closes
        .iter()
        .filter(|(k, _)| **k != Ending::Clean && **k != Ending::PeerClose(1001))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(cut, 0, "connections cut: {closes:?}");
    assert_eq!(closes.values().sum::<usize>(), 400);
    assert!(
        closes.get(&Ending::PeerClose(1001)).copied().unwrap_or(0) > 0,
        "some were drained: {closes:?}"
    );
    assert_eq!(backends.len(), 8, "every set served: {backends:?}");
}

/// What a client sees after sending a case: the frames that came back
/// (opcode, payload; Close frames reduced to their code) until the stream
/// ended or went quiet.
fn outcome(addr: (&str, u16), path: &str, case: &[u8]) -> Vec<String> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1);
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    let _ = s.write_all(case);
    let mut seen = Vec::new();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => {
                seen.push("eof".to_string());
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                seen.push("quiet".to_string());
                break;
            }
            Err(_) => {
                seen.push("reset".to_string());
                break;
            }
        }
        while let Ok(Some(h)) = frame::parse_header(&buf) {
            let total = h.header_len + h.payload_len as usize;
            if buf.len() < total {
                break;
            }
            let payload = &buf[h.header_len..total];
            seen.push(match h.opcode {
                0x8 => format!(
                    "close {}",
                    if payload.len() >= 2 {
                        close_code(payload)
                    } else {
                        1005
                    }
                ),
                op => format!("{op:x} {}", String::from_utf8_lossy(payload)),
            });
            buf.drain(..total);
        }
    }
    seen
}

fn masked(fin: bool, rsv: u8, op: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0xa1, 0xb2, 0xc3, 0xd4];
    let mut out = Vec::new();
    let mut h = FrameHeader::new(fin, Opcode::Binary, Some(mask), payload.len() as u64);
    h.opcode = op;
    h.rsv1 = rsv & 4 != 0;
    h.rsv2 = rsv & 2 != 0;
    h.rsv3 = rsv & 1 != 0;
    h.write_to(&mut out);
    let mut p = payload.to_vec();
    frame::apply_mask(&mut p, mask, 0);
    out.extend(p);
    out
}

/// Autobahn-style cases, run directly against the echo backend and through
/// weir: the client must see the same thing either way (weir is
/// transparent; where it enforces a rule itself it answers as the backend
/// would).
#[test]
fn conformance_cases_give_the_same_results_through_weir_as_direct() {
    require_root();
    let bed = Bed::new("l7conf", 1);
    let direct = bed.echoes[0].1;
    let close_1000 = masked(true, 0, 0x8, &1000u16.to_be_bytes());
    let cat = |parts: &[Vec<u8>]| parts.concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "1.1 text",
            cat(&[masked(true, 0, 0x1, b"Hello"), close_1000.clone()]),
        ),
        (
            "1.2 binary",
            cat(&[masked(true, 0, 0x2, &[0xff; 300]), close_1000.clone()]),
        ),
        (
            "2.1 ping",
            cat(&[masked(true, 0, 0x9, b"ping"), close_1000.clone()]),
        ),
        ("2.5 ping over 125", masked(true, 0, 0x9, &[b'x'; 126])),
        (
            "2.6 unsolicited pong",
            cat(&[
                masked(true, 0, 0xA, b"pong"),
                masked(true, 0, 0x1, b"after"),
                close_1000.clone(),
            ]),
        ),
        ("3.1 RSV1", masked(true, 4, 0x1, b"rsv")),
        (
            "3.2 RSV2 after a good frame",
            cat(&[masked(true, 0, 0x1, b"ok"), masked(true, 2, 0x1, b"rsv")]),
        ),
        ("4.1 reserved opcode 3", masked(true, 0, 0x3, b"")),
        ("4.2 reserved opcode 0xB", masked(true, 0, 0xB, b"")),
        ("5.1 fragmented ping", masked(false, 0, 0x9, b"ping")),
        (
            "5.3 fragments",
            cat(&[
                masked(false, 0, 0x1, b"frag"),
                masked(true, 0, 0x0, b"ment"),
                close_1000.clone(),
            ]),
        ),
        (
            "5.6 fragments with a ping",
            cat(&[
                masked(false, 0, 0x1, b"a"),
                masked(true, 0, 0x9, b"p"),
                masked(true, 0, 0x0, b"b"),
                close_1000.clone(),
            ]),
        ),
        ("5.9 continuation first", masked(true, 0, 0x0, b"cont")),
        (
            "5.18 text inside a fragmented message",
            cat(&[masked(false, 0, 0x1, b"a"), masked(true, 0, 0x1, b"b")]),
        ),
        ("7.1 close 1000", close_1000.clone()),
        ("7.3 close without code", masked(true, 0, 0x8, b"")),
        ("7.3.2 close with 1 byte", masked(true, 0, 0x8, b"x")),
        (
            "7.1.5 text after close",
            cat(&[close_1000.clone(), masked(true, 0, 0x1, b"late")]),
        ),
    ];
    // A failed connection is a failed connection: the echo backend drops
    // TCP at once, weir sends Close 1002 first (as RFC 6455 7.1.7 asks).
    // Autobahn counts both the same.
    let normalize = |v: Vec<String>| -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for e in v {
            if e == "eof" || e == "reset" {
                let failed_close = out
                    .last()
                    .is_some_and(|l| l == "close 1002" || l == "close 1009");
                if failed_close {
                    out.pop();
                    out.push("failed".into());
                } else if !out.last().is_some_and(|l| l.starts_with("close ")) {
                    out.push("failed".into());
                } else {
                    out.push(e);
                }
            } else {
                out.push(e);
            }
        }
        out
    };
    let mut differ = Vec::new();
    for (name, bytes) in &cases {
        let a = normalize(outcome(("127.0.0.1", direct.port()), "/", bytes));
        let b = normalize(outcome(("127.0.0.1", bed.port), "/ws", bytes));
        // weir fails the connection where the bad frame is; an echo the
        // backend had not sent back yet by then is not seen (Autobahn:
        // non-strict). Everything else must match.
        let both_failed =
            a.last().is_some_and(|l| l == "failed") && b.last().is_some_and(|l| l == "failed");
        let same = a == b || (both_failed && a[..a.len() - 1].starts_with(&b[..b.len() - 1]));
        if !same {
            differ.push(format!("{name}: direct {a:?} / weir {b:?}"));
        }
    }
    assert!(differ.is_empty(), "results differ:\n{}", differ.join("\n"));
}

#[test]
fn over_the_connection_limit_clients_get_503() {
    require_root();
    // One connection for the whole process (both workers together).
    let bed = Bed::configured("l7limit", 1, |c| c.max_connections(1));
    // The readiness probes of the bed have closed by now.
    std::thread::sleep(Duration::from_millis(200));
    let mut held = Vec::new();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let (s, head) = upgrade(bed.port, "/ws");
        statuses.push(head.split_whitespace().nth(1).unwrap_or("").to_string());
        held.push(s);
    }
    assert_eq!(
        statuses.iter().filter(|s| *s == "101").count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| *s == "503").count(),
        5,
        "{statuses:?}"
    );
}

/// Client sockets are direct descriptors in their worker's io_uring file
/// table, which the kernel caps at the open-files limit. With the limit at
/// 64, one worker's table has 64 slots, 16 of them kept for armed accepts:
/// it relays 24 connections (a client and a backend slot each). The next
/// clients get 503, not a wait in the listen queue nor a reset; the start
/// warned of it; a slot freed by a client that leaves serves the next.
#[test]
fn a_full_file_table_answers_503_and_a_freed_slot_serves_the_next() {
    require_root();
    let bed = Bed::spawn("l7table", 1, |c| c.workers(1), &[], Some(64));
    // The readiness probes of the bed have closed by now.
    std::thread::sleep(Duration::from_millis(300));
    let mut held = Vec::new();
    for i in 0..24 {
        let (s, head) = upgrade(bed.port, "/ws");
        assert!(head.starts_with("HTTP/1.1 101"), "connection {i}: {head}");
        held.push(s);
    }
    for i in 0..3 {
        let (_s, head) = upgrade(bed.port, "/ws");
        assert!(head.starts_with("HTTP/1.1 503"), "client {i} over: {head}");
    }
    let log = bed.log();
    assert!(
        log.contains("1 worker(s) hold at most 24 connections"),
        "{log}"
    );
    assert!(log.contains("io_uring file table is full"), "{log}");
    // One leaves: its two slots come back once weir has closed them.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (s, head) = upgrade(bed.port, "/ws");
        if head.starts_with("HTTP/1.1 101") {
            held.push(s);
            break;
        }
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        assert!(Instant::now() < deadline, "no slot came back");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(held.len(), 24);
}

#[test]
fn the_drain_window_can_differ_per_service() {
    require_root();
    // The service's own window (0.5 s) wins over the global 30 s.
    let bed = Bed::configured("l7svcdrain", 2, |c| {
        c.drain_window(Duration::from_secs(30))
            .service_drain(SVC, Duration::from_millis(500))
    });
    let (mut s, head) = upgrade(bed.port, "/ws");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let name = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-weir-backend: ")
                .map(str::to_string)
        })
        .unwrap();
    let addr = bed.echoes[if name == "e0" { 0 } else { 1 }].1;
    let started = Instant::now();
    bed.weir_cli(&[
        "backend",
        "drain",
        &SVC.to_string(),
        &addr.to_string(),
        "--force",
    ]);
    let (_, op, payload) = recv(&mut s);
    assert_eq!((op, close_code(&payload)), (8, 1001));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed after {:?}",
        started.elapsed()
    );
}

#[test]
fn weirs_close_never_lands_inside_a_frame() {
    require_root();
    let bed = Bed::new("l7midframe", 1);
    for _ in 0..5 {
        let (mut s, head) = upgrade(bed.port, "/ws");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        // A 1 MiB echo is on its way back when the client breaks a rule.
        send(&mut s, true, Opcode::Binary, &vec![7u8; 1 << 20]);
        std::thread::sleep(Duration::from_millis(2));
        s.write_all(&[0x81, 0x02, b'n', b'o']).unwrap(); // unmasked: 1002
        // Whatever arrives parses as whole frames: the echo (whole, if it
        // had started) and then the Close.
        loop {
            let (_, op, payload) = recv(&mut s);
            if op == 8 {
                assert_eq!(close_code(&payload), 1002);
                break;
            }
            assert_eq!(op, 2, "only the echo before the Close");
        }
    }
}

#[test]
fn a_second_weir_run_for_the_same_instance_is_refused() {
    require_root();
    let bed = Bed::new("l7twice", 1);
    let out = Command::new(workspace_bin("weir"))
        .args(["run", "--config"])
        .arg(bed.dir.join("weir.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another `weir run`"), "{err}");
}

/// Traffic touches the whole provided-buffer pool in turn; once a worker
/// has been quiet for a second it gives the pool's memory back (idle
/// connections hold no buffer memory), and connections opened afterwards still relay every byte
/// intact through the re-faulted buffers.
#[test]
fn a_quiet_worker_gives_its_buffer_pool_back_and_still_relays() {
    require_root();
    let bed = Bed::new("l7pool", 1);
    let releases = || -> u64 {
        let (mut m, _) = raw_request(bed.metrics_port, "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
        let mut text = String::new();
        m.read_to_string(&mut text).unwrap();
        text.lines()
            .find(|l| l.starts_with("weir_l7_buffer_pool_releases_total"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no pool release counter in\n{text}"))
    };
    let r = report(bed.clients(50, 1, None));
    assert_eq!(r.summary.broken, 0, "{:?}", r.summary);
    let after_traffic = releases();
    // Quiet for more than a second: every worker releases its pool once.
    std::thread::sleep(Duration::from_millis(1600));
    let quiet = releases();
    assert!(
        quiet >= after_traffic + 2,
        "both workers release after a quiet second: {after_traffic} -> {quiet}"
    );
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(releases(), quiet, "once per quiet spell, not every tick");

    let r = report(bed.clients(50, 1, None));
    assert_eq!(r.summary.connected, 50);
    assert_eq!(r.summary.broken, 0, "{:?}", r.summary);
    assert_eq!(r.summary.mismatches, 0);
    assert_eq!(r.summary.messages_echoed, r.summary.messages_sent);
}

fn metrics_text(port: u16) -> String {
    let (mut m, _) = raw_request(port, "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut text = String::new();
    m.read_to_string(&mut text).unwrap();
    text
}

/// Reads one frame, masked or not: (header, payload as sent).
fn recv_frame(s: &mut TcpStream) -> std::io::Result<(FrameHeader, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    let header = loop {
        if let Some(h) = frame::parse_header(&buf).unwrap() {
            break h;
        }
        s.read_exact(&mut byte)?;
        buf.push(byte[0]);
    };
    let mut payload = vec![0u8; header.payload_len as usize];
    s.read_exact(&mut payload)?;
    Ok((header, payload))
}

/// A fake backend's read of the request head weir forwards (byte by byte,
/// so nothing after it is taken); `None` if the stream ended first.
fn request_head(s: &mut TcpStream) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).unwrap_or(0) == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(head)
}

/// What a backend does with a connection after its 101.
type Behave = std::sync::Arc<dyn Fn(TcpStream) + Send + Sync>;

/// A WebSocket backend that answers up to `n` handshakes with a valid 101,
/// then hands each connection to `behave`.
fn ws_fake_backend(n: usize, behave: Behave) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().take(n).flatten() {
            let behave = behave.clone();
            std::thread::spawn(move || {
                let Some(head) = request_head(&mut s) else {
                    return;
                };
                let text = String::from_utf8_lossy(&head).into_owned();
                let key = text
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("sec-websocket-key")
                            .then(|| value.trim().to_string())
                    })
                    .expect("weir forwards the key");
                let answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    weir::l7::handshake::accept_key(&key)
                );
                if s.write_all(answer.as_bytes()).is_ok() {
                    behave(s);
                }
            });
        }
    });
    addr
}

impl Bed {
    /// Puts exactly `addrs` behind SVC.
    fn set_backends(&self, addrs: &[SocketAddr]) {
        self.inst
            .registry()
            .apply(
                &Change::SetBackends {
                    service: SVC,
                    backends: addrs.iter().map(|a| (backend(*a), 1)).collect(),
                },
                ApplyOptions {
                    force: true,
                    ..Default::default()
                },
            )
            .unwrap();
    }
}

/// weir's listening sockets on `port` (one per worker), borrowed from the
/// weir process with pidfd_getfd(2): the same sockets, to ask or to set.
/// Its connections' sockets are io_uring direct descriptors, in no
/// descriptor table; they inherit the listener's options when accepted.
fn weir_listeners(pid: u32, port: u16) -> Vec<TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscalls; results checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) } as i32;
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: we own the new descriptor.
    let _pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd) };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        let Ok(target) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // SAFETY: as above.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, target, 0) } as i32;
        if fd < 0 {
            continue;
        }
        // SAFETY: a socket descriptor we now own.
        let sock = unsafe { TcpStream::from_raw_fd(fd) };
        let listening = sock.peer_addr().is_err();
        if listening && sock.local_addr().is_ok_and(|a| a.port() == port) {
            found.push(sock);
        }
    }
    assert!(
        !found.is_empty(),
        "weir (pid {pid}) listens on no port {port}"
    );
    found
}

/// weir writes a message to a client in as many sends as it read it in.
/// With Nagle on the client socket, the last piece of every 16 KiB echo
/// waited for the client's delayed ACK (about 40 ms a message); with
/// TCP_NODELAY an echo on loopback takes well under a millisecond or two.
#[test]
fn sixteen_kib_echoes_are_not_held_by_delayed_acks() {
    require_root();
    let bed = Bed::new("l7nodelay", 1);
    let (mut s, head) = upgrade(bed.port, "/ws");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.set_nodelay(true).unwrap();
    let msg: Vec<u8> = (0..16 * 1024).map(|i| i as u8).collect();
    let n = 40u32;
    let started = Instant::now();
    for _ in 0..n {
        send(&mut s, true, Opcode::Binary, &msg);
        let (fin, op, payload) = recv(&mut s);
        assert_eq!((fin, op), (true, 2));
        assert_eq!(payload, msg);
    }
    let per_message = started.elapsed() / n;
    eprintln!("{per_message:?} per 16 KiB echo");
    assert!(
        per_message < Duration::from_millis(20),
        "{per_message:?} per 16 KiB echo: delayed-ACK stalls"
    );
    let pid = bed.weir.as_ref().unwrap().id();
    for listener in weir_listeners(pid, bed.port) {
        assert!(
            listener.nodelay().unwrap(),
            "weir's listener has Nagle on, and so do the clients it accepts"
        );
    }
}

fn close_payload(code: u16) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(b"bye");
    p
}

/// An invalid close code from a client never reaches the backend: weir
/// fails the connection with 1002 on both sides. Valid ones pass as sent.
#[test]
fn invalid_close_codes_are_1002_and_valid_ones_pass() {
    require_root();
    let bed = Bed::new("l7codes", 0);
    let invalid = [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535];
    let valid = [1000u16, 1001, 1011, 3000, 4999];
    // The backend reports the code of the Close it got, and answers it.
    let (tx, rx) = std::sync::mpsc::channel::<u16>();
    let tx = std::sync::Mutex::new(tx);
    let be = ws_fake_backend(
        invalid.len() + valid.len(),
        std::sync::Arc::new(move |mut s: TcpStream| {
            while let Ok((h, mut payload)) = recv_frame(&mut s) {
                if h.opcode == 8 {
                    frame::apply_mask(&mut payload, h.mask.unwrap(), 0);
                    let code = close_code(&payload);
                    tx.lock().unwrap().send(code).unwrap();
                    let mut answer = Vec::new();
                    FrameHeader::new(true, Opcode::Close, None, 2).write_to(&mut answer);
                    answer.extend(code.to_be_bytes());
                    let _ = s.write_all(&answer);
                    return;
                }
            }
        }),
    );
    bed.set_backends(&[be]);
    for code in invalid.into_iter().chain(valid) {
        let (mut s, head) = upgrade(bed.port, "/ws");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        send(&mut s, true, Opcode::Close, &close_payload(code));
        let (_, op, payload) = recv(&mut s);
        let at_backend = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let want = if valid.contains(&code) { code } else { 1002 };
        assert_eq!(
            (op, close_code(&payload), at_backend),
            (8, want, want),
            "close code {code} from the client: (opcode, to the client, to the backend)"
        );
    }
}

#[test]
fn a_backend_that_vanishes_mid_stream_closes_the_client_with_1014() {
    require_root();
    let bed = Bed::new("l7vanish", 0);
    // One answers the first frame, then shuts its socket (FIN); the other
    // resets it.
    let fin = ws_fake_backend(
        1,
        std::sync::Arc::new(|mut s: TcpStream| {
            let _ = recv_frame(&mut s);
            let _ = s.write_all(&[0x81, 0x02, b'o', b'k']);
            let _ = s.shutdown(std::net::Shutdown::Both);
        }),
    );
    let reset = ws_fake_backend(
        1,
        std::sync::Arc::new(|mut s: TcpStream| {
            use std::os::fd::AsRawFd;
            let _ = recv_frame(&mut s);
            let _ = s.write_all(&[0x81, 0x02, b'o', b'k']);
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: setsockopt on our own socket; dropping it then
            // sends a RST.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    size_of::<libc::linger>() as libc::socklen_t,
                )
            };
        }),
    );
    for (how, be) in [("FIN", fin), ("RST", reset)] {
        bed.set_backends(&[be]);
        let (mut s, head) = upgrade(bed.port, "/ws");
        assert!(head.starts_with("HTTP/1.1 101"), "{how}: {head}");
        send(&mut s, true, Opcode::Text, b"hi");
        assert_eq!(recv(&mut s).2, b"ok", "{how}");
        let mut rest = Vec::new();
        let frame = recv_frame(&mut s);
        let _ = s.read_to_end(&mut rest);
        let (h, payload) =
            frame.unwrap_or_else(|e| panic!("{how}: no Close, the stream ended: {e}"));
        assert_eq!(
            (h.opcode, close_code(&payload)),
            (8, 1014),
            "{how}: the client gets 1014 bad gateway"
        );
    }
}

#[test]
fn routes_match_whole_segments_of_the_normalised_path() {
    require_root();
    let bed = Bed::new("l7route", 1);
    for (path, status) in [
        ("/ws", "101"),
        ("/ws/room?x=1", "101"),
        ("/ws?x=/../dead", "101"),
        ("/wsx", "404"),
        ("/ws.html", "404"),
        ("/empty", "503"),
        ("/ws/../empty", "503"),
        ("/ws/%2e%2E/empty", "503"),
        ("/empty/../ws", "101"),
        ("/ws/./a/../b", "101"),
        ("/ws/../../x", "400"),
        ("/..", "400"),
    ] {
        let (_, head) = upgrade(bed.port, path);
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{path}: {head}"
        );
    }
}

/// RFC 6455 5.3: masks must be unpredictable. weir puts one on every frame
/// it sends a backend; its Close on a client's protocol error is one.
#[test]
fn masks_on_frames_weir_sends_to_backends_are_random() {
    require_root();
    let bed = Bed::new("l7mask", 0);
    let n = 40;
    let (tx, rx) = std::sync::mpsc::channel::<[u8; 4]>();
    let tx = std::sync::Mutex::new(tx);
    let be = ws_fake_backend(
        n,
        std::sync::Arc::new(move |mut s: TcpStream| {
            while let Ok((h, _)) = recv_frame(&mut s) {
                if h.opcode == 8 {
                    let mask = h.mask.expect("frames to a backend are masked");
                    tx.lock().unwrap().send(mask).unwrap();
                    return;
                }
            }
        }),
    );
    bed.set_backends(&[be]);
    let mut masks = Vec::new();
    for _ in 0..n {
        let (mut s, head) = upgrade(bed.port, "/ws");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        s.write_all(&[0x81, 0x02, b'n', b'o']).unwrap(); // unmasked: 1002
        let (_, op, _) = recv(&mut s);
        assert_eq!(op, 8);
        masks.push(rx.recv_timeout(Duration::from_secs(5)).unwrap());
    }
    let distinct: std::collections::BTreeSet<[u8; 4]> = masks.iter().copied().collect();
    assert_eq!(distinct.len(), n, "masks repeat: {masks:x?}");
    for byte in 0..4 {
        let values: std::collections::BTreeSet<u8> = masks.iter().map(|m| m[byte]).collect();
        assert!(
            values.len() > n / 2,
            "mask byte {byte} takes {} values over {n} masks: {masks:x?}",
            values.len()
        );
    }
}

/// Clients choose close codes freely: they may not grow /metrics without
/// bound.
#[test]
fn close_code_series_stay_bounded_whatever_clients_send() {
    require_root();
    let bed = Bed::new("l7series", 1);
    for i in 0..300u16 {
        let code = [3000, 4000, 5000][usize::from(i % 3)] + i;
        let (mut s, head) = upgrade(bed.port, "/ws");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        send(&mut s, true, Opcode::Close, &close_payload(code));
        let (_, op, _) = recv(&mut s);
        assert_eq!(op, 8);
    }
    std::thread::sleep(Duration::from_millis(200));
    let text = metrics_text(bed.metrics_port);
    let closes: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("weir_l7_close_codes_total{"))
        .collect();
    assert!(
        closes.len() <= 8,
        "{} close-code series after 300 codes:\n{}",
        closes.len(),
        closes.join("\n")
    );
    for want in [
        "weir_l7_close_codes_total{direction=\"from_client\",code=\"3000-3999\"} 100",
        "weir_l7_close_codes_total{direction=\"from_client\",code=\"4000-4999\"} 100",
        "weir_l7_close_codes_total{direction=\"from_client\",code=\"invalid\"} 100",
        "weir_l7_close_codes_total{direction=\"sent_to_client\",code=\"1002\"} 100",
    ] {
        assert!(
            closes.contains(&want),
            "no {want:?} in\n{}",
            closes.join("\n")
        );
    }
}

/// Backends come and go: the series of one that left the registry goes
/// with it.
#[test]
fn a_departed_backends_metrics_series_goes() {
    require_root();
    let bed = Bed::configured("l7departed", 2, |c| c.drain_window(Duration::from_secs(1)));
    let r = report(bed.clients(20, 1, None));
    assert_eq!(r.summary.connected, 20);
    let (kept, leaving) = (bed.echoes[0].1, bed.echoes[1].1);
    let series = |addr: SocketAddr| format!("weir_l7_connections_total{{backend=\"{addr}\"}}");
    let text = metrics_text(bed.metrics_port);
    assert!(
        text.contains(&series(leaving)) && text.contains(&series(kept)),
        "20 connections used both backends:\n{text}"
    );
    bed.weir_cli(&[
        "backend",
        "set",
        &SVC.to_string(),
        &kept.to_string(),
        "--force",
    ]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = metrics_text(bed.metrics_port);
        if !text.contains(&series(leaving)) {
            assert!(text.contains(&series(kept)), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the departed backend's series stayed:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A listener on port 0: every worker serves the one port the kernel
/// picked, and the log names it.
#[test]
fn a_listener_on_port_0_is_one_port_for_every_worker_and_logged() {
    require_root();
    let inst = TestInstance::new("l7port0");
    let dir = std::env::temp_dir().join(format!("weir-l7-{}", inst.name()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("weir.toml");
    std::fs::write(
        &path,
        ConfigBuilder::new()
            .instance(inst.name())
            .workers(3)
            .buffers(64)
            .timeout(Timeout::Shutdown, Duration::from_secs(1))
            .listener(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .route("/", SVC)
            .to_string(),
    )
    .unwrap();
    struct Killed(Child, std::path::PathBuf);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }
    let mut weir = Killed(
        Command::new(workspace_bin("weir"))
            .args(["run", "--config"])
            .arg(&path)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        dir,
    );
    // Three workers hold fewer than the default max_connections under
    // this machine's open-files limit: a warning may come first.
    let mut stderr = BufReader::new(weir.0.stderr.as_mut().unwrap());
    let mut line = String::new();
    while !line.contains("running instance") {
        line.clear();
        assert_ne!(stderr.read_line(&mut line).unwrap(), 0, "weir ended");
    }
    let addr: SocketAddr = line
        .split_once(" on ")
        .and_then(|(_, rest)| rest.split_once(": "))
        .and_then(|(addr, _)| addr.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    assert_ne!(addr.port(), 0, "the log names the real port: {line:?}");
    // Three listening sockets of this process on that port, one per
    // worker.
    let port_hex = format!(":{:04X} ", addr.port());
    let tcp = std::fs::read_to_string(format!("/proc/{}/net/tcp", weir.0.id())).unwrap();
    let listening = tcp
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && format!("{} ", f[1]).ends_with(&port_hex) && f[3] == "0A"
        })
        .count();
    assert_eq!(listening, 3, "{line:?}\n{tcp}");
}

fn set_buffer(s: &TcpStream, option: libc::c_int, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt on a socket we hold; checked.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&bytes as *const libc::c_int).cast(),
            4,
        )
    };
    assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
}

/// A client that never reads: weir's SIGTERM Close to it waits behind
/// data its socket cannot take, and is cut at the shutdown deadline. The
/// summary must not count it as a 1001 delivered.
#[test]
fn a_close_never_written_to_a_client_is_not_counted_as_sent() {
    require_root();
    let mut bed = Bed::new("l7unsent", 0);
    // On the client's first frame, 64 KiB of whole frames come back.
    let be = ws_fake_backend(
        1,
        std::sync::Arc::new(|mut s: TcpStream| {
            if recv_frame(&mut s).is_err() {
                return;
            }
            let mut burst = Vec::new();
            for _ in 0..4 {
                FrameHeader::new(true, Opcode::Binary, None, 16_000).write_to(&mut burst);
                burst.extend(std::iter::repeat_n(7u8, 16_000));
            }
            let _ = s.write_all(&burst);
            while recv_frame(&mut s).is_ok() {}
        }),
    );
    bed.set_backends(&[be]);
    // Both ends of the path to the client take little: the client's
    // receive buffer and weir's send buffer for it (set on weir's
    // listeners, whose options its accepted sockets inherit), so most of
    // the burst stays queued inside weir.
    let pid = bed.weir.as_ref().unwrap().id();
    for listener in weir_listeners(pid, bed.port) {
        set_buffer(&listener, libc::SO_SNDBUF, 4096);
    }
    let mut s = TcpStream::connect(("127.0.0.1", bed.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    set_buffer(&s, libc::SO_RCVBUF, 4096);
    send(&mut s, true, Opcode::Text, b"go");
    std::thread::sleep(Duration::from_millis(300));

    bed.stop(Duration::from_secs(6));
    let log = bed.log();
    let summary = log
        .lines()
        .find(|l| l.starts_with("weir: stopped after"))
        .unwrap_or_else(|| panic!("no summary in {log:?}"));
    assert!(
        summary.contains("0 closed with 1001")
            && summary.contains("Closes to clients never written: 1"),
        "{summary}"
    );
    drop(s);
}

/// weir run's log lines as JSON objects, each checked for the fields a log
/// shipper relies on.
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            for key in ["timestamp", "level", "message", "event"] {
                assert!(v.get(key).is_some(), "no {key} in {l}");
            }
            v
        })
        .collect()
}

fn events<'a>(lines: &'a [serde_json::Value], event: &str) -> Vec<&'a serde_json::Value> {
    lines.iter().filter(|v| v["event"] == event).collect()
}

#[test]
fn logs_are_json_when_asked_at_their_levels_and_rate_limited_per_connection() {
    require_root();
    let mut bed = Bed::with_run_args(
        "l7logs",
        2,
        |c| {
            c.max_connections(3)
                .drain_window(Duration::from_millis(300))
        },
        &["--log-format", "json"],
    );
    // The readiness probes of the bed have closed by now.
    std::thread::sleep(Duration::from_millis(200));
    // A connection weir answered counts against max_connections until
    // weir's close of it completes, which on a busy machine can come after
    // the client read the answer: the next client then gets 503. Those are
    // retried for a moment, so that each try below reaches a free slot.
    let past_closing = |path: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (s, head) = upgrade(bed.port, path);
            if head.starts_with("HTTP/1.1 503 ") && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            break (s, head);
        }
    };
    // A refusing backend, many times: every failure counted, few logged.
    for _ in 0..30 {
        let (_, head) = past_closing("/dead");
        assert!(head.starts_with("HTTP/1.1 502 "), "{head}");
    }
    // The connection limit, many times.
    let mut held = Vec::new();
    for _ in 0..3 {
        let (s, head) = past_closing("/ws");
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        held.push((s, head));
    }
    for _ in 0..20 {
        let (_, head) = upgrade(bed.port, "/ws");
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
    }
    let metrics = metrics_text(bed.metrics_port);
    let refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix("weir_l7_backend_connect_failures_total{reason=\"refused\"} "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no refused count in {metrics}"));
    assert!(refused >= 30, "{refused} refusals counted");
    // A drain of the backend the first held connection is on. The raw
    // client never answers the Close: weir ends it after `close`.
    let name = held[0]
        .1
        .lines()
        .find_map(|l| l.strip_prefix("x-weir-backend: "))
        .expect("weir-echo names itself")
        .trim()
        .to_string();
    let index: usize = name.trim_start_matches('e').parse().unwrap();
    let drained = bed.echoes[index].1;
    bed.weir_cli(&["backend", "drain", &SVC.to_string(), &drained.to_string()]);
    bed.wait_for_log("\"drain_ended\"", Duration::from_secs(5));
    bed.stop(Duration::from_secs(6));
    drop(held);

    let log = bed.log();
    let lines = json_lines(&log);
    let one = |event: &str, level: &str| {
        let found = events(&lines, event);
        assert!(!found.is_empty(), "no {event} in\n{log}");
        for v in &found {
            assert_eq!(v["level"], level, "{v}");
        }
        found
    };
    one("started", "INFO");
    one("stopped", "INFO");
    let refusals = one("backend_refused", "WARN");
    assert!(
        refusals.iter().all(|v| v["backend"] == "127.0.0.1:1"),
        "{refusals:?}"
    );
    // Five per worker per window, two workers: not one line per refusal.
    assert!(
        refusals.len() <= 10,
        "{} lines for 30 refusals",
        refusals.len()
    );
    let limits = one("connection_limit", "WARN");
    assert!(limits.len() <= 10, "{} lines for 20 refusals", limits.len());
    assert!(
        limits.iter().all(|v| v["max_connections"] == 3),
        "{limits:?}"
    );
    let drained = drained.to_string();
    let mut per_worker = std::collections::BTreeMap::<String, (u64, u64)>::new();
    for (event, started) in [("drain_started", true), ("drain_ended", false)] {
        let found = one(event, "INFO");
        assert!(
            found.iter().all(|v| v["backend"] == drained.as_str()),
            "{found:?}"
        );
        for v in found {
            let n = v["connections"].as_u64().expect("a count");
            let counts = per_worker.entry(v["worker"].to_string()).or_default();
            if started {
                counts.0 += n;
            } else {
                counts.1 += n;
            }
        }
    }
    // Each worker's drain ends with the connections it started with.
    for (worker, (started, ended)) in &per_worker {
        assert_eq!(started, ended, "{worker}: {log}");
    }
    // Debug lines are below the default level.
    assert!(events(&lines, "handshake_refused").is_empty(), "{log}");
}

#[test]
fn the_log_level_leaves_out_what_is_less_severe() {
    require_root();
    // weir run at `level`, one client refused by a dead backend: the log
    // once `expect` is in it and weir run stopped.
    let log_at = |level: &str, expect: &str| {
        let mut bed =
            Bed::with_run_args(&format!("l7log{level}"), 1, |c| c, &["--log-level", level]);
        let (_, head) = upgrade(bed.port, "/dead");
        assert!(head.starts_with("HTTP/1.1 502 "), "{head}");
        bed.wait_for_log(expect, Duration::from_secs(5));
        bed.stop(Duration::from_secs(6));
        bed.log()
    };
    let log = log_at(
        "warn",
        "weir: warning: backend 127.0.0.1:1 refused the connection",
    );
    assert!(!log.contains("running instance"), "info logged: {log}");
    assert!(!log.contains("stopped after"), "info logged: {log}");
    // At debug, each refused handshake is named too.
    let log = log_at("debug", "weir: debug: refused a client with 502");
    assert!(log.contains("running instance"), "{log}");
}

/// A backend that accepts TCP and answers every upgrade with 500; counts
/// the connections it accepted.
fn failing_backend() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::spawn(move || {
                if request_head(&mut s).is_none() {
                    return;
                }
                let _ = s.write_all(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            });
        }
    });
    (addr, accepted)
}

impl Bed {
    /// `echoes` echo servers, JSON logs, and outlier detection that ejects
    /// a backend after `consecutive` failures for `base_ejection` (doubled
    /// per ejection up to a minute), at most half of a service's backends.
    fn ejecting(tag: &str, echoes: usize, consecutive: u32, base_ejection: Duration) -> Self {
        let outlier = Outlier {
            consecutive,
            base_ejection,
            max_ejection: Duration::from_secs(60),
            max_ejected_percent: 50,
        };
        Self::with_run_args(
            tag,
            echoes,
            |c| c.outlier(outlier),
            &["--log-format", "json"],
        )
    }
}

/// The value of the series `name{service=SVC,backend=backend}`.
fn outlier_series(text: &str, name: &str, backend: SocketAddr) -> Option<u64> {
    let series = format!("{name}{{service=\"{SVC}\",backend=\"{backend}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.parse().ok())
}

/// The status line's code of a handshake answer.
fn status_of(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"))
}

/// `n` clients one after the other, each answered with `status`.
fn answered_with(port: u16, n: usize, status: u16) {
    for _ in 0..n {
        let (_, head) = upgrade(port, "/ws");
        assert_eq!(status_of(&head), status, "{head}");
    }
}

#[test]
fn a_backend_answering_500_is_ejected_then_returns_for_twice_as_long() {
    require_root();
    let bed = Bed::ejecting("l7outl", 1, 3, Duration::from_secs(1));
    let (bad, accepted) = failing_backend();
    let accepted = || accepted.load(std::sync::atomic::Ordering::SeqCst);
    bed.set_backends(&[bed.echoes[0].1, bad]);
    // Clients until the bad backend failed three times in a row (the
    // good one's 101s in between are its own).
    let fail_until = |n: usize| {
        let mut failed = 0;
        for _ in 0..200 {
            if accepted() >= n {
                break;
            }
            let (_, head) = upgrade(bed.port, "/ws");
            match status_of(&head) {
                101 => {}
                500 => failed += 1,
                other => panic!("{other}: {head}"),
            }
        }
        assert_eq!(accepted(), n, "the bad backend was tried");
        failed
    };
    assert_eq!(fail_until(3), 3, "each of its connections answered 500");
    let ejected_at = Instant::now();
    // Ejected: clients keep connecting, none reaches it.
    answered_with(bed.port, 30, 101);
    assert_eq!(accepted(), 3, "no new connection was tried on it");
    let text = metrics_text(bed.metrics_port);
    assert_eq!(
        outlier_series(&text, "weir_l7_outlier_ejections_total", bad),
        Some(1),
        "{text}"
    );
    assert_eq!(
        outlier_series(&text, "weir_l7_outlier_ejected", bad),
        Some(1),
        "{text}"
    );
    // It returns on its own at the end of its time.
    bed.wait_for_log("\"outlier_returned\"", Duration::from_secs(5));
    assert!(
        ejected_at.elapsed() >= Duration::from_millis(900),
        "returned after {:?}",
        ejected_at.elapsed()
    );
    let text = metrics_text(bed.metrics_port);
    assert_eq!(
        outlier_series(&text, "weir_l7_outlier_ejected", bad),
        Some(0),
        "{text}"
    );
    // Tried again; three more failures eject it for twice as long.
    assert_eq!(fail_until(6), 3);
    let lines_with = |event: &str| {
        let lines = json_lines(&bed.log());
        events(&lines, event)
            .into_iter()
            .cloned()
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while lines_with("outlier_ejected").len() < 2 {
        assert!(Instant::now() < deadline, "{}", bed.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let ejections = lines_with("outlier_ejected");
    let returns = lines_with("outlier_returned");
    for v in ejections.iter().chain(&returns) {
        assert_eq!(v["backend"], bad.to_string().as_str(), "{v}");
        assert_eq!(v["service"], SVC.to_string().as_str(), "{v}");
    }
    let durations: Vec<u64> = ejections
        .iter()
        .map(|v| v["duration_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(durations, [1000, 2000]);
    assert!(
        ejections.iter().all(|v| v["failures"] == 3),
        "{ejections:?}"
    );
    assert_eq!(returns[0]["duration_ms"], 1000);
    answered_with(bed.port, 10, 101);
    assert_eq!(accepted(), 6);
    let text = metrics_text(bed.metrics_port);
    assert_eq!(
        outlier_series(&text, "weir_l7_outlier_ejections_total", bad),
        Some(2),
        "{text}"
    );
}

#[test]
fn refused_connects_eject_a_backend_while_its_clients_go_on_to_another() {
    require_root();
    let bed = Bed::ejecting("l7outr", 1, 3, Duration::from_secs(30));
    // Nothing listens on port 1: every connect there is refused.
    let dead = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
    bed.set_backends(&[bed.echoes[0].1, dead]);
    let refused = || {
        let text = metrics_text(bed.metrics_port);
        text.lines()
            .find_map(|l| {
                l.strip_prefix("weir_l7_backend_connect_failures_total{reason=\"refused\"} ")
            })
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no refused count in {text}"))
    };
    let mut tries = 0;
    while refused() < 3 {
        tries += 1;
        assert!(tries < 200, "the dead backend was never tried");
        let (_, head) = upgrade(bed.port, "/ws");
        assert_eq!(status_of(&head), 101, "retried on the echo: {head}");
    }
    answered_with(bed.port, 30, 101);
    assert_eq!(refused(), 3, "no connect tried on it once ejected");
    let text = metrics_text(bed.metrics_port);
    assert_eq!(
        outlier_series(&text, "weir_l7_outlier_ejected", dead),
        Some(1),
        "{text}"
    );
    let lines = json_lines(&bed.log());
    let ejected = events(&lines, "outlier_ejected");
    assert_eq!(ejected.len(), 1, "{}", bed.log());
    assert_eq!(ejected[0]["backend"], "127.0.0.1:1");
    assert_eq!(ejected[0]["failures"], 3);
}

#[test]
fn at_most_the_configured_share_of_a_services_backends_is_ejected() {
    require_root();
    let bed = Bed::ejecting("l7outs", 0, 2, Duration::from_secs(30));
    let (a, a_accepted) = failing_backend();
    let (b, b_accepted) = failing_backend();
    bed.set_backends(&[a, b]);
    // Both fail every upgrade: one is ejected, the other stays in choice
    // (and clients keep getting its answer, never a 503 for ejection).
    answered_with(bed.port, 30, 500);
    let text = metrics_text(bed.metrics_port);
    let series = |name, backend| outlier_series(&text, name, backend).unwrap_or(0);
    let ejected: Vec<SocketAddr> = [a, b]
        .into_iter()
        .filter(|be| series("weir_l7_outlier_ejected", *be) == 1)
        .collect();
    assert_eq!(ejected.len(), 1, "two of two bad: one ejected\n{text}");
    let (out, kept) = if ejected[0] == a { (a, b) } else { (b, a) };
    assert_eq!(series("weir_l7_outlier_ejections_total", out), 1, "{text}");
    assert_eq!(series("weir_l7_outlier_ejections_total", kept), 0, "{text}");
    assert!(
        series("weir_l7_outlier_ejections_refused_total", kept) >= 1,
        "{text}"
    );
    let count = |be: SocketAddr| {
        let n = if be == a { &a_accepted } else { &b_accepted };
        n.load(std::sync::atomic::Ordering::SeqCst)
    };
    assert_eq!(count(out), 2, "nothing after its ejection");
    assert_eq!(count(kept), 28);
    // weir stats shows the same, from the snapshot written every second.
    std::thread::sleep(Duration::from_millis(1200));
    let stats = |json: bool| {
        let mut cmd = Command::new(workspace_bin("weir"));
        cmd.args(["--instance", bed.inst.name()]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.arg("stats").output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let json: serde_json::Value = serde_json::from_str(&stats(true)).unwrap();
    let rows = json["l7"]["outliers"].as_array().expect("outlier rows");
    let row = |be: SocketAddr| {
        rows.iter()
            .find(|r| r["backend"] == be.to_string().as_str())
            .unwrap_or_else(|| panic!("no {be} in {rows:?}"))
    };
    assert_eq!(row(out)["ejected"], true);
    assert_eq!(row(kept)["ejected"], false);
    assert!(row(kept)["refused"].as_u64() >= Some(1), "{rows:?}");
    let text = stats(false);
    assert!(
        text.contains(&format!("outlier {out:<22} of {SVC}: ejected ejections 1")),
        "{text}"
    );
    let lines = json_lines(&bed.log());
    assert_eq!(events(&lines, "outlier_ejected").len(), 1, "{}", bed.log());
    let refused = events(&lines, "outlier_ejection_refused");
    assert_eq!(refused.len(), 1, "logged once per run of failures");
    assert_eq!(refused[0]["backend"], kept.to_string().as_str());
    assert_eq!(
        (
            refused[0]["ejected"].as_u64(),
            refused[0]["active"].as_u64()
        ),
        (Some(1), Some(2))
    );
}

#[test]
fn a_backend_the_agent_finds_healthy_returns_before_its_ejection_ends() {
    require_root();
    let bed = Bed::ejecting("l7outh", 1, 3, Duration::from_secs(60));
    // A port nothing listens on yet: every connect there is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sick = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    bed.set_backends(&[bed.echoes[0].1, sick]);
    for _ in 0..200 {
        let text = metrics_text(bed.metrics_port);
        if outlier_series(&text, "weir_l7_outlier_ejected", sick) == Some(1) {
            break;
        }
        let (_, head) = upgrade(bed.port, "/ws");
        assert_eq!(status_of(&head), 101, "retried on the echo: {head}");
    }
    bed.wait_for_log("\"outlier_ejected\"", Duration::from_secs(5));
    // It comes back (answering 500, which is enough to see it chosen) and
    // a check finds it healthy: the registry says so, as weir agent would.
    let listener = std::net::TcpListener::bind(sick).unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if request_head(&mut s).is_some() {
                let _ = s.write_all(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n");
            }
        }
    });
    answered_with(bed.port, 20, 101);
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "still ejected before the check"
    );
    bed.inst
        .registry()
        .apply(
            &Change::SetHealth {
                updates: vec![weir::registry::HealthUpdate {
                    service: SVC,
                    backend: backend(sick),
                    health: weir_ebpf::abi::BackendHealth::Healthy,
                    reason: weir_ebpf::abi::HealthReason::Passed,
                    detail: 0,
                    at_ms: 1,
                }],
            },
            ApplyOptions::default(),
        )
        .unwrap();
    bed.wait_for_log("\"health_check\"", Duration::from_secs(5));
    let lines = json_lines(&bed.log());
    let back = events(&lines, "outlier_returned");
    assert_eq!(back.len(), 1, "{}", bed.log());
    assert_eq!(back[0]["by"], "health_check");
    assert!(back[0]["duration_ms"].as_u64().unwrap() < 60_000);
    for _ in 0..100 {
        if accepted.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            break;
        }
        upgrade(bed.port, "/ws");
    }
    assert!(
        accepted.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "chosen again long before its 60 s were up"
    );
}
