//! `weir run --takeover`: a new process takes the listening sockets of
//! the running one, so that connects in a tight loop during the switch
//! never see a refusal or a reset, then its WebSockets (l7_handoff.rs
//! tests that under load); the old process exits once it holds nothing.
//! A second takeover while one runs, a new process killed before it
//! confirms and a request of another protocol version all leave the old
//! process serving as before. `weir upgrade` starts a takeover and waits
//! for it.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::takeover::{Bed, FakeOld, OLD, echoes, local, open, raw_control, rest_of};
use common::ws::{close_code, masked, recv};
use common::{free_port, metrics_answer, require_root};
use weir::l7::frame::Opcode;

/// The test hook that holds a new process between its workers' start and
/// its confirmation.
const PAUSE: &str = "WEIR_TEST_TAKEOVER_PAUSE_MS";

const LONG: Duration = Duration::from_secs(300);

/// A serving bed and a WebSocket through its old process.
fn with_a_websocket(tag: &str, bound: Duration) -> (Bed, TcpStream) {
    let bed = Bed::serving(tag, bound);
    let mut ws = open(bed.port);
    echoes(&mut ws, "before");
    (bed, ws)
}

/// What clients connecting in a tight loop saw.
#[derive(Debug, Default, PartialEq)]
struct Connects {
    upgraded: u64,
    refused: u64,
    reset: u64,
    other: u64,
    /// The longest a client waited from its connect to its 101.
    slowest: Duration,
}

/// Connects and upgrades in a loop until `stop`, counting outcomes.
fn hammer(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Connects> {
    std::thread::spawn(move || {
        let mut seen = Connects::default();
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let mut s = match TcpStream::connect(local(port)) {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    seen.refused += 1;
                    continue;
                }
                Err(_) => {
                    seen.other += 1;
                    continue;
                }
            };
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let request = "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: \
                           Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                           Sec-WebSocket-Version: 13\r\n\r\n";
            let mut head = [0u8; 12];
            match s
                .write_all(request.as_bytes())
                .and_then(|()| s.read_exact(&mut head))
            {
                Ok(()) if &head == b"HTTP/1.1 101" => {
                    seen.upgraded += 1;
                    seen.slowest = seen.slowest.max(started.elapsed());
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => seen.reset += 1,
                _ => seen.other += 1,
            }
        }
        seen
    })
}

/// Stops the [`hammer`] and checks what its clients saw during the
/// takeover: every one upgraded, none refused, reset or left waiting. A
/// client whose accept wakeup went to the old process's cancelled accept
/// waits until a worker's tick re-arms (about 100 ms), not for the next
/// client.
fn every_client_upgraded(stop: Arc<AtomicBool>, clients: std::thread::JoinHandle<Connects>) {
    stop.store(true, Ordering::Relaxed);
    let seen = clients.join().unwrap();
    eprintln!("connects during the takeover: {seen:?}");
    assert!(seen.upgraded > 0, "{seen:?}");
    assert_eq!(
        (seen.refused, seen.reset, seen.other),
        (0, 0, 0),
        "clients connecting during the takeover: {seen:?}"
    );
    assert!(seen.slowest < Duration::from_secs(1), "{seen:?}");
}

#[test]
fn a_takeover_refuses_no_connect_and_moves_the_websockets_to_the_new_process() {
    require_root();
    let (mut bed, mut before) = with_a_websocket("tkover", LONG);
    let port = bed.port;

    let stop = Arc::new(AtomicBool::new(false));
    let clients = hammer(port, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let new = bed.run(true, &[]);
    bed.wait_for_log(new, "takeover done: of ");
    std::thread::sleep(Duration::from_millis(300));
    every_client_upgraded(stop, clients);

    // The WebSocket moved: the old process holds nothing and exits; the
    // connection goes on in the new one, and new ones are served there.
    assert!(bed.exited(OLD, Duration::from_secs(10)).success());
    assert!(
        bed.log(OLD)
            .contains("1 connection(s) moved to the new weir run, 0 refused by it, 0 left"),
        "{}",
        bed.log(OLD)
    );
    echoes(&mut before, "moved to the new process");
    echoes(&mut open(port), "after");
    assert_eq!(
        (
            bed.metric("weir_l7_takeover_connections_total{outcome=\"moved\"}"),
            bed.metric("weir_l7_takeover_connections_total{outcome=\"left\"}")
        ),
        (Some(1.0), Some(0.0))
    );
    // The control socket is the new process's now.
    let out = bed.weir_cli(&["reload"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("nothing changed"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        bed.log(new)
    );
    let pid = std::fs::read_to_string(bed.inst.instance.daemon_lock_path()).unwrap();
    assert_eq!(pid.trim(), bed.runs[new].id().to_string());
}

#[test]
fn a_second_takeover_is_refused_and_a_new_process_killed_before_it_confirms_changes_nothing() {
    require_root();
    let (mut bed, mut before) = with_a_websocket("tkkill", LONG);
    let port = bed.port;

    let paused = bed.run(true, &[(PAUSE, 60_000)]);
    bed.wait_for_log(paused, "pausing before confirm");
    let second = bed.run(true, &[]);
    assert!(!bed.exited(second, Duration::from_secs(10)).success());
    assert!(
        bed.log(second)
            .contains("a takeover of this weir run is already in progress"),
        "{}",
        bed.log(second)
    );

    // The sockets offered are the ones running: no reload meanwhile.
    let out = bed.weir_cli(&["reload"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a takeover of this weir run is in progress"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    bed.runs[paused].kill().unwrap();
    bed.runs[paused].wait().unwrap();
    bed.wait_for_log(OLD, "takeover failed, this process goes on accepting");
    echoes(&mut before, "the old process kept it");
    for i in 0..20 {
        echoes(&mut open(port), &format!("accepted by the old process {i}"));
    }
    assert!(bed.running(OLD));

    // A later takeover works.
    let new = bed.run(true, &[]);
    bed.wait_for_log(
        new,
        "takeover done: of 1 connection(s), 1 moved, 0 failed, 0 left",
    );
    echoes(&mut open(port), "served after the takeover");
    echoes(&mut before, "moved to the new process");
}

#[test]
fn a_takeover_in_another_protocol_version_is_refused_before_anything_moves() {
    require_root();
    let bed = Bed::serving("tkver", LONG);
    let answer = raw_control(
        &bed.control_socket(),
        "{\"version\":3,\"command\":\"takeover\"}\n",
    );
    assert!(
        answer.contains("\"outcome\":\"refused\"") && answer.contains("version 3"),
        "{answer}"
    );
    assert!(!bed.log(OLD).contains("takeover_started") && !bed.log(OLD).contains("takeover:"));
    echoes(&mut open(bed.port), "still accepting");

    // The other way round: an old process of another version; the new one
    // refuses its offer and keeps nothing.
    let mut old_bed = Bed::bounded("tkver2", LONG);
    let fake = FakeOld::bind(&old_bed);
    let new = old_bed.run(true, &[]);
    let conversation = fake.answer("{\"version\":3,\"outcome\":\"offered\",\"pid\":1}\n", &[]);
    assert!(!old_bed.exited(new, Duration::from_secs(10)).success());
    let log = old_bed.log(new);
    assert!(log.contains("version 3"), "{log}");
    // Nothing moved: no confirm came, and nothing listens on its port.
    assert_eq!(rest_of(conversation), "");
    assert!(TcpStream::connect(local(old_bed.port)).is_err());
}

/// A connection that cannot be quiesced stays in the old process: its
/// client stopped reading, so weir's send to it never completes. Past
/// `timeouts.takeover` it drains as on SIGTERM, and the old process exits.
#[test]
fn past_the_takeover_bound_the_old_process_drains_what_it_could_not_hand_over() {
    require_root();
    let (mut bed, mut kept) = with_a_websocket("tkbound", Duration::from_secs(1));
    // Echoes pile up unread until nothing more goes: weir's queue towards
    // the client is full and its send waits.
    kept.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let frame = masked(true, Opcode::Binary, &[b'x'; 60_000]);
    let mut stuck = false;
    for _ in 0..2_000 {
        if kept.write_all(&frame).is_err() {
            stuck = true;
            break;
        }
    }
    assert!(stuck, "120 MB went without the client reading");
    let new = bed.run(true, &[]);
    bed.wait_for_log(
        new,
        "takeover done: of 1 connection(s), 0 moved, 0 failed, 1 left",
    );
    bed.wait_for_log(
        OLD,
        "timeouts.takeover (1s) passed: draining the 1 connection(s) left",
    );
    // The client reads again: its echoes, then weir's Close 1001, as on
    // SIGTERM; then the old process exits.
    kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let close = loop {
        let (_, op, payload) = recv(&mut kept);
        if op == 8 {
            break close_code(&payload);
        }
    };
    assert_eq!(close, 1001);
    assert!(bed.exited(OLD, Duration::from_secs(10)).success());
    echoes(&mut open(bed.port), "the new process serves");
}

/// A new binary may run other `[runtime]` keys and listeners: one worker
/// takes both sockets of the old process's two (none closes with clients
/// queued), a listener only the new file names is bound, and the metrics
/// endpoint moves with its socket.
#[test]
fn a_takeover_may_change_the_workers_and_listeners_without_a_refused_connect() {
    require_root();
    let (mut bed, mut before) = with_a_websocket("tkrt", LONG);
    let port = bed.port;
    let extra = free_port();
    bed.configure(1, Some(extra));
    let stop = Arc::new(AtomicBool::new(false));
    let clients = hammer(port, stop.clone());
    std::thread::sleep(Duration::from_millis(200));
    let new = bed.run(true, &[]);
    bed.wait_for_log(new, "running instance");
    std::thread::sleep(Duration::from_millis(300));
    every_client_upgraded(stop, clients);
    assert!(bed.log(new).contains("1 worker(s)"), "{}", bed.log(new));
    // Many connects: the kernel spreads them over both passed sockets,
    // which the one new worker accepts on.
    for i in 0..40 {
        echoes(&mut open(port), &format!("one worker {i}"));
    }
    echoes(&mut open(extra), "the added listener");
    let metrics = metrics_answer(bed.metrics);
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    echoes(&mut before, "moved to the new process");
}

/// `weir upgrade` starts the new process itself, detached, and returns
/// once it serves, saying what moved; one that cannot start fails the
/// upgrade with its exit status and leaves the old process serving.
#[test]
fn weir_upgrade_starts_the_takeover_and_waits_until_the_new_process_serves() {
    require_root();
    let (mut bed, mut before) = with_a_websocket("tkupg", LONG);
    let upgrade = |bed: &Bed, extra: &[&str]| {
        let (out, err) = (bed.dir.join("upgrade.out"), bed.dir.join("upgrade.err"));
        // Files, not pipes: the new process keeps its copies open.
        let status = std::process::Command::new(weir_testbed::workspace_bin("weir"))
            .args([
                "--instance",
                bed.inst.name(),
                "--json",
                "upgrade",
                "--config",
            ])
            .arg(bed.dir.join("weir.toml"))
            .args(extra)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .status()
            .unwrap();
        (
            status,
            std::fs::read_to_string(out).unwrap(),
            std::fs::read_to_string(err).unwrap(),
        )
    };

    let (status, _, err) = upgrade(&bed, &["--binary", "/bin/false"]);
    assert!(!status.success());
    assert!(
        err.contains("exited with exit status: 1 during the takeover"),
        "{err}"
    );
    echoes(&mut before, "the old process serves on");

    let (status, out, err) = upgrade(&bed, &[]);
    assert!(status.success(), "{out}\n{err}");
    let answer: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let new = answer["to"].as_u64().unwrap() as i32;
    bed.detached.push(new);
    assert_eq!(
        (&answer["from"], &answer["moved"], &answer["left"]),
        (&bed.runs[OLD].id().into(), &1.into(), &0.into()),
        "{answer}"
    );
    assert!(bed.exited(OLD, Duration::from_secs(10)).success());
    echoes(&mut before, "moved by weir upgrade");
    // `weir stats` says it too, from the stats file the new process
    // writes every second.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = String::from_utf8_lossy(&bed.weir_cli(&["stats"]).stdout).into_owned();
        if stats.contains("took over: moved 1 refused 0 left in the old process 0") {
            break;
        }
        assert!(Instant::now() < deadline, "{stats}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let pid = std::fs::read_to_string(bed.inst.instance.daemon_lock_path()).unwrap();
    assert_eq!(pid.trim(), new.to_string());
}
