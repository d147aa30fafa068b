//! `weir run --takeover`: a new process takes the listening sockets of
//! the running one, so that connects in a tight loop during the switch
//! never see a refusal or a reset; the old process keeps its WebSockets
//! echoing until they end, then exits. A second takeover while one runs,
//! a new process killed before it confirms and a request of another
//! protocol version all leave the old process serving as before.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::ws::{close_code, masked, recv, send, upgrade};
use common::{
    TestInstance, add_l7_service, apply, backend, free_port, metrics_answer, require_root,
};
use weir::l7::config::{ConfigBuilder, Timeout};
use weir::l7::frame::Opcode;
use weir::registry::{Change, ServiceAddr};
use weir_testbed::workspace_bin;

const SVC: ServiceAddr = ServiceAddr {
    vip: Ipv4Addr::new(198, 19, 0, 95),
    port: 80,
};

/// The test hook that holds a new process between its workers' start and
/// its confirmation.
const PAUSE: &str = "WEIR_TEST_TAKEOVER_PAUSE_MS";

/// The process taken over: the first one a bed starts.
const OLD: usize = 0;
const LONG: Duration = Duration::from_secs(300);

fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// An instance whose SVC an echo serves, and the `weir run` processes
/// started for it (each logging to its own file); all stopped on drop.
struct Bed {
    inst: TestInstance,
    echo: Child,
    runs: Vec<Child>,
    /// Processes `weir upgrade` started (not our children): by pid.
    detached: Vec<i32>,
    dir: PathBuf,
    port: u16,
    metrics: u16,
    bound: Duration,
}

impl Bed {
    /// A bed whose first `weir run` ([`OLD`]) serves already.
    fn serving(tag: &str, bound: Duration) -> Self {
        let mut bed = Self::bounded(tag, bound);
        bed.run(false, None);
        bed.wait_for_log(OLD, "running instance");
        bed
    }

    /// With `timeouts.takeover = bound`.
    fn bounded(tag: &str, bound: Duration) -> Self {
        let inst = TestInstance::new(tag);
        let dir = std::env::temp_dir().join(format!("weir-takeover-{}", inst.name()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut reg = inst.registry();
        let (echo, addr) = weir_testbed::spawn_echo("127.0.0.1:0", "e0");
        apply(&mut reg, add_l7_service(SVC));
        apply(
            &mut reg,
            Change::SetBackends {
                service: SVC,
                backends: vec![(backend(addr), 1)],
            },
        );
        let bed = Self {
            inst,
            echo,
            runs: Vec::new(),
            detached: Vec::new(),
            dir,
            port: free_port(),
            metrics: free_port(),
            bound,
        };
        bed.configure(2, None);
        bed
    }

    /// A serving bed and a WebSocket through its old process.
    fn with_a_websocket(tag: &str, bound: Duration) -> (Self, TcpStream) {
        let bed = Self::serving(tag, bound);
        let mut ws = open(bed.port);
        echoes(&mut ws, "before");
        (bed, ws)
    }

    /// Writes the configuration the next `weir run` reads: `workers`, the
    /// bed's listener and, when given, another one on `extra`.
    fn configure(&self, workers: u64, extra: Option<u16>) {
        let mut config = ConfigBuilder::new()
            .workers(workers)
            .buffers(256)
            .metrics(local(self.metrics))
            .timeout(Timeout::Idle, Duration::from_secs(60))
            .timeout(Timeout::Shutdown, Duration::from_secs(1))
            .timeout(Timeout::Takeover, self.bound)
            .listener(local(self.port))
            .route("/ws", SVC);
        if let Some(port) = extra {
            config = config.listener(local(port)).route("/ws", SVC);
        }
        std::fs::write(self.dir.join("weir.toml"), config.to_string()).unwrap();
    }

    /// Starts `weir run` number `self.runs.len()` (with `--takeover` and
    /// the pause hook when asked); its log is `run-N.log`.
    fn run(&mut self, takeover: bool, pause_ms: Option<u64>) -> usize {
        let n = self.runs.len();
        let mut cmd = Command::new(workspace_bin("weir"));
        cmd.args(["--instance", self.inst.name(), "run", "--config"])
            .arg(self.dir.join("weir.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join(format!("run-{n}.log"))).unwrap());
        if takeover {
            cmd.arg("--takeover");
        }
        if let Some(ms) = pause_ms {
            cmd.env(PAUSE, ms.to_string());
        }
        self.runs.push(cmd.spawn().unwrap());
        n
    }

    fn log(&self, n: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("run-{n}.log"))).unwrap_or_default()
    }

    fn wait_for_log(&self, n: usize, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.log(n).contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} in the log of run {n}:\n{}",
                self.log(n)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for run `n` to exit on its own.
    fn exited(&mut self, n: usize, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.runs[n].try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "run {n} did not exit:\n{}",
                self.log(n)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn running(&mut self, n: usize) -> bool {
        self.runs[n].try_wait().unwrap().is_none()
    }

    fn control_socket(&self) -> PathBuf {
        self.inst.instance.control_socket_path()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for pid in &self.detached {
            // SAFETY: a signal to a process this test started through
            // `weir upgrade`.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        for c in self.runs.iter_mut().chain([&mut self.echo]) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn open(port: u16) -> TcpStream {
    let (s, head) = upgrade(port, "/ws");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

fn echoes(s: &mut TcpStream, text: &str) {
    send(s, true, Opcode::Text, text.as_bytes());
    assert_eq!(recv(s), (true, 1, text.as_bytes().to_vec()), "{text}");
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

/// A control request line as another binary would write it, and the
/// answer.
fn raw_control(path: &std::path::Path, line: &str) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    answer
}

#[test]
fn a_takeover_refuses_no_connect_and_moves_the_websockets_to_the_new_process() {
    require_root();
    let (mut bed, mut before) = Bed::with_a_websocket("tkover", LONG);
    let port = bed.port;

    let stop = Arc::new(AtomicBool::new(false));
    let clients = hammer(port, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let new = bed.run(true, None);
    bed.wait_for_log(new, "takeover done: of ");
    std::thread::sleep(Duration::from_millis(300));
    every_client_upgraded(stop, clients);

    // The WebSocket moved: the old process holds nothing and exits; the
    // connection goes on in the new one, and new ones are served there.
    assert!(bed.exited(OLD, Duration::from_secs(10)).success());
    bed.wait_for_log(OLD, "handoff done");
    assert!(
        bed.log(OLD)
            .contains("1 connection(s) moved to the new weir run, 0 refused by it, 0 left"),
        "{}",
        bed.log(OLD)
    );
    echoes(&mut before, "moved to the new process");
    let mut after = open(port);
    echoes(&mut after, "after");
    let metrics = metrics_answer(bed.metrics);
    assert!(
        metrics.contains("weir_l7_takeover_connections_total{outcome=\"moved\"} 1\n")
            && metrics.contains("weir_l7_takeover_connections_total{outcome=\"left\"} 0\n"),
        "{metrics}"
    );
    echoes(&mut open(port), "a connection after the old process left");
    // The control socket is the new process's now.
    let out = Command::new(workspace_bin("weir"))
        .args(["--instance", bed.inst.name(), "reload"])
        .output()
        .unwrap();
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
    let (mut bed, mut before) = Bed::with_a_websocket("tkkill", LONG);
    let port = bed.port;

    let paused = bed.run(true, Some(60_000));
    bed.wait_for_log(paused, "pausing before confirm");
    let second = bed.run(true, None);
    assert!(!bed.exited(second, Duration::from_secs(10)).success());
    assert!(
        bed.log(second)
            .contains("a takeover of this weir run is already in progress"),
        "{}",
        bed.log(second)
    );

    // The sockets offered are the ones running: no reload meanwhile.
    let out = Command::new(workspace_bin("weir"))
        .args(["--instance", bed.inst.name(), "reload"])
        .output()
        .unwrap();
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
    let new = bed.run(true, None);
    bed.wait_for_log(
        new,
        "takeover done: of 1 connection(s), 1 moved, 0 failed, 0 left",
    );
    echoes(&mut open(port), "served after the takeover");
    echoes(&mut before, "still in the old process");
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
    let fake = old_bed.control_socket();
    std::fs::create_dir_all(fake.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&fake);
    let listener = std::os::unix::net::UnixListener::bind(&fake).unwrap();
    let new = old_bed.run(true, None);
    let (mut conversation, _) = listener.accept().unwrap();
    let mut request = String::new();
    BufReader::new(&conversation)
        .read_line(&mut request)
        .unwrap();
    assert!(request.contains("\"command\":\"takeover\""), "{request}");
    conversation
        .write_all(b"{\"version\":3,\"outcome\":\"offered\",\"pid\":1}\n")
        .unwrap();
    assert!(!old_bed.exited(new, Duration::from_secs(10)).success());
    let log = old_bed.log(new);
    assert!(log.contains("version 3"), "{log}");
    // Nothing moved: no confirm came, and nothing listens on its port.
    let mut rest = String::new();
    conversation
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let _ = conversation.read_to_string(&mut rest);
    assert_eq!(rest, "");
    assert!(TcpStream::connect(local(old_bed.port)).is_err());
}

/// A connection that cannot be quiesced stays in the old process: its
/// client stopped reading, so weir's send to it never completes. Past
/// `timeouts.takeover` it drains as on SIGTERM, and the old process exits.
#[test]
fn past_the_takeover_bound_the_old_process_drains_what_it_could_not_hand_over() {
    require_root();
    let (mut bed, mut kept) = Bed::with_a_websocket("tkbound", Duration::from_secs(1));
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
    let new = bed.run(true, None);
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
    let (mut bed, mut before) = Bed::with_a_websocket("tkrt", LONG);
    let port = bed.port;
    let extra = free_port();
    bed.configure(1, Some(extra));
    let stop = Arc::new(AtomicBool::new(false));
    let clients = hammer(port, stop.clone());
    std::thread::sleep(Duration::from_millis(200));
    let new = bed.run(true, None);
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
    echoes(&mut before, "still in the old process");
}

/// `weir upgrade` starts the new process itself, detached, and returns
/// once it serves, saying what moved; one that cannot start fails the
/// upgrade with its exit status and leaves the old process serving.
#[test]
fn weir_upgrade_starts_the_takeover_and_waits_until_the_new_process_serves() {
    require_root();
    let (mut bed, mut before) = Bed::with_a_websocket("tkupg", LONG);
    let upgrade = |bed: &Bed, extra: &[&str]| {
        let out = bed.dir.join("upgrade.out");
        let status = Command::new(workspace_bin("weir"))
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
            .stderr(std::fs::File::create(bed.dir.join("upgrade.err")).unwrap())
            .status()
            .unwrap();
        let err = std::fs::read_to_string(bed.dir.join("upgrade.err")).unwrap();
        (status, std::fs::read_to_string(out).unwrap(), err)
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
    let pid = std::fs::read_to_string(bed.inst.instance.daemon_lock_path()).unwrap();
    assert_eq!(pid.trim(), new.to_string());
}
