//! `weir run` reloading its configuration in place (`weir reload` and
//! SIGHUP): routes, listeners, timeouts, drain windows and the metrics
//! endpoint change while WebSockets opened before the reload stay up and
//! keep echoing; a bad file or a restart-only change is refused whole.
//!
//! The rule checked: a connection keeps the configuration it was accepted
//! with (timeouts, limits, routes); what is decided for many connections
//! at once (a drain's window) follows the latest configuration.

mod common;

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::ws::{close_code, recv, send, upgrade};
use common::{
    TestInstance, add_l7_service, apply, backend, free_port, metrics_answer, require_root,
};
use weir::l7::config::{ConfigBuilder, Timeout};
use weir::l7::frame::Opcode;
use weir::registry::{Change, ServiceAddr};
use weir_testbed::workspace_bin;

const SVC: ServiceAddr = ServiceAddr {
    vip: Ipv4Addr::new(198, 19, 0, 90),
    port: 80,
};
const CHAT: ServiceAddr = ServiceAddr {
    vip: Ipv4Addr::new(198, 19, 0, 91),
    port: 80,
};

fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// What every configuration of these tests shares: two workers, a short
/// shutdown, an idle timeout far longer than a test.
fn base(metrics_port: u16) -> ConfigBuilder {
    ConfigBuilder::new()
        .workers(2)
        .buffers(256)
        .metrics(local(metrics_port))
        .timeout(Timeout::Idle, Duration::from_secs(30))
        .timeout(Timeout::Shutdown, Duration::from_secs(1))
}

/// `weir run` for an instance whose SVC is served by echo `e0` and CHAT by
/// echo `e1`; everything is stopped and removed on drop.
struct Bed {
    inst: TestInstance,
    echoes: Vec<Child>,
    weir: Option<Child>,
    dir: PathBuf,
}

impl Bed {
    fn start(tag: &str, config: ConfigBuilder) -> Self {
        let inst = TestInstance::new(tag);
        let dir = std::env::temp_dir().join(format!("weir-reload-{}", inst.name()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut reg = inst.registry();
        let mut echoes = Vec::new();
        for (i, svc) in [SVC, CHAT].into_iter().enumerate() {
            let (child, addr) = weir_testbed::spawn_echo("127.0.0.1:0", &format!("e{i}"));
            echoes.push(child);
            apply(&mut reg, add_l7_service(svc));
            let backends = vec![(backend(addr), 1)];
            apply(
                &mut reg,
                Change::SetBackends {
                    service: svc,
                    backends,
                },
            );
        }
        let mut bed = Self {
            inst,
            echoes,
            weir: None,
            dir,
        };
        bed.write(config);
        let weir = Command::new(workspace_bin("weir"))
            .args(["--instance", bed.inst.name(), "run", "--config"])
            .arg(bed.config_path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(bed.dir.join("weir.log")).unwrap())
            .spawn()
            .unwrap();
        bed.weir = Some(weir);
        bed.wait_for_log("running instance");
        bed
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("weir.toml")
    }

    fn write(&self, config: ConfigBuilder) {
        self.write_text(&config.to_string());
    }

    fn write_text(&self, text: &str) {
        std::fs::write(self.config_path(), text).unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("weir.log")).unwrap_or_default()
    }

    fn wait_for_log(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} in the log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `weir reload` for this bed's instance.
    fn reload(&self) -> Output {
        Command::new(workspace_bin("weir"))
            .args(["--instance", self.inst.name(), "reload"])
            .output()
            .unwrap()
    }

    /// `weir reload`, which must succeed; its lines.
    fn reloaded(&self) -> String {
        let out = self.reload();
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `weir reload`, which must be refused; its message.
    fn refused(&self) -> String {
        let out = self.reload();
        assert!(
            !out.status.success(),
            "accepted: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = self.weir.as_ref().expect("running").id();
        // SAFETY: a plain kill(2) of the child this bed started.
        unsafe { libc::kill(pid as libc::pid_t, signal) };
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(mut w) = self.weir.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        for c in &mut self.echoes {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A WebSocket through weir on `port` and `path`, upgraded by echo
/// `backend` (`e0` or `e1`).
fn open(port: u16, path: &str, backend: &str) -> TcpStream {
    let (s, head) = upgrade(port, path);
    assert!(head.starts_with("HTTP/1.1 101"), "{path}: {head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("x-weir-backend: {backend}")),
        "{path} reached another backend: {head}"
    );
    s
}

/// The connection still relays both ways.
fn echoes(s: &mut TcpStream, text: &str) {
    send(s, true, Opcode::Text, text.as_bytes());
    assert_eq!(recv(s), (true, 1, text.as_bytes().to_vec()), "{text}");
}

fn status(port: u16, path: &str) -> String {
    let (_, head) = upgrade(port, path);
    head.lines().next().unwrap_or_default().to_string()
}

fn refused_connect(port: u16) -> bool {
    TcpStream::connect(local(port))
        .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
}

#[test]
fn a_route_added_by_reload_serves_new_connections_and_old_ones_keep_echoing() {
    require_root();
    let (port, metrics) = (free_port(), free_port());
    let first = || base(metrics).listener(local(port)).route("/ws", SVC);
    let bed = Bed::start("rlroute", first());
    let mut before = open(port, "/ws", "e0");
    echoes(&mut before, "before");
    assert_eq!(status(port, "/chat"), "HTTP/1.1 404 Not Found");

    bed.write(first().route("/chat", CHAT));
    let lines = bed.reloaded();
    assert_eq!(
        lines.trim(),
        format!("listener 127.0.0.1:{port} route */chat -> {CHAT}: added")
    );
    let mut chat = open(port, "/chat", "e1");
    echoes(&mut chat, "new route");
    echoes(&mut before, "still up");
    // The same file again changes nothing, and says so.
    assert_eq!(bed.reloaded().trim(), "reloaded: nothing changed");
    echoes(&mut before, "after a second reload");
    bed.wait_for_log("configuration reloaded (weir reload)");
}

#[test]
fn a_listener_added_accepts_and_a_removed_one_keeps_its_connections() {
    require_root();
    let (kept, removed, added, metrics) = (free_port(), free_port(), free_port(), free_port());
    let bed = Bed::start(
        "rllisten",
        base(metrics)
            .listener(local(kept))
            .route("/ws", SVC)
            .listener(local(removed))
            .route("/ws", SVC),
    );
    let mut on_removed = open(removed, "/ws", "e0");
    echoes(&mut on_removed, "before");

    bed.write(
        base(metrics)
            .listener(local(kept))
            .route("/ws", SVC)
            .listener(local(added))
            .route("/ws", CHAT),
    );
    let lines = bed.reloaded();
    assert!(
        lines.contains(&format!(
            "listener 127.0.0.1:{removed} removed (its connections stay)"
        )) && lines.contains(&format!("listener 127.0.0.1:{added} added")),
        "{lines}"
    );
    let mut on_added = open(added, "/ws", "e1");
    echoes(&mut on_added, "added");
    assert!(
        refused_connect(removed),
        "the removed listener still accepts"
    );
    echoes(&mut on_removed, "accepted before the removal");
    open(kept, "/ws", "e0");
}

#[test]
fn a_changed_idle_timeout_applies_to_connections_accepted_after_the_reload() {
    require_root();
    let (port, metrics) = (free_port(), free_port());
    let bed = Bed::start(
        "rlidle",
        base(metrics).listener(local(port)).route("/ws", SVC),
    );
    let mut before = open(port, "/ws", "e0");
    echoes(&mut before, "before");

    bed.write(
        base(metrics)
            .timeout(Timeout::Idle, Duration::from_secs(1))
            .listener(local(port))
            .route("/ws", SVC),
    );
    assert_eq!(bed.reloaded().trim(), "timeouts.idle: 30s -> 1s");
    let mut after = open(port, "/ws", "e0");
    echoes(&mut after, "after");
    let quiet = Instant::now();
    // Both stay quiet; only the one accepted after the reload times out.
    let (_, op, payload) = recv(&mut after);
    assert_eq!((op, close_code(&payload)), (8, 1001), "idle timeout");
    assert!(quiet.elapsed() >= Duration::from_millis(900));
    std::thread::sleep(Duration::from_millis(1500));
    echoes(&mut before, "accepted with idle = 30s");
}

#[test]
fn a_drain_after_the_reload_takes_the_new_window_for_older_connections_too() {
    require_root();
    let (port, metrics) = (free_port(), free_port());
    let bed = Bed::start(
        "rldrain",
        base(metrics)
            .drain_window(Duration::from_secs(60))
            .listener(local(port))
            .route("/ws", SVC),
    );
    let mut before = open(port, "/ws", "e0");
    echoes(&mut before, "before");
    bed.write(
        base(metrics)
            .drain_window(Duration::ZERO)
            .listener(local(port))
            .route("/ws", SVC),
    );
    assert_eq!(bed.reloaded().trim(), "drain.window: 60s -> 0s");
    // Its backend leaves: with the window it was accepted under, its
    // Close would come 30 s from now.
    let set = Change::SetBackends {
        service: SVC,
        backends: vec![],
    };
    apply(&mut bed.inst.registry(), set);
    let drained = Instant::now();
    let (_, op, payload) = recv(&mut before);
    assert_eq!((op, close_code(&payload)), (8, 1001));
    assert!(drained.elapsed() < Duration::from_secs(3));
}

#[test]
fn a_broken_or_restart_only_file_is_refused_whole_and_changes_nothing() {
    require_root();
    let (port, metrics) = (free_port(), free_port());
    let first = || base(metrics).listener(local(port)).route("/ws", SVC);
    let bed = Bed::start("rlbad", first());
    let mut live = open(port, "/ws", "e0");
    echoes(&mut live, "before");
    let good = first().to_string();

    // A value out of range: file, line and reason.
    let bad = good.replace("idle = \"30000ms\"", "idle = \"5 minutes\"");
    assert_ne!(bad, good);
    let line = bad.lines().position(|l| l.starts_with("idle =")).unwrap() + 1;
    bed.write_text(&bad);
    let e = bed.refused();
    let place = format!("{}:{line}:", bed.config_path().display());
    assert!(
        e.contains("reload refused") && e.contains(&place) && e.contains("timeouts.idle"),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    // Not TOML at all.
    bed.write_text(&format!("{good}[timeouts\n"));
    let e = bed.refused();
    let line = good.lines().count() + 1;
    assert!(
        e.contains(&format!("{}:{line}:", bed.config_path().display())),
        "{e}"
    );
    // A field sized into the workers at start.
    bed.write(first().workers(3));
    let e = bed.refused();
    assert!(
        e.contains("runtime.workers cannot change in a running weir run (2 -> 3)")
            && e.contains("`weir upgrade` starts one and hands it every connection"),
        "{e}"
    );
    // A listener someone else holds refuses the whole file: the route
    // added beside it does not apply either.
    let taken = TcpListener::bind(local(0)).unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    bed.write(
        first()
            .route("/chat", CHAT)
            .listener(local(taken_port))
            .route("/ws", SVC),
    );
    let e = bed.refused();
    assert!(
        e.contains(&format!(
            "listener 127.0.0.1:{taken_port} is already in use"
        )),
        "{e}"
    );
    assert_eq!(status(port, "/chat"), "HTTP/1.1 404 Not Found");
    // So does a metrics address that cannot be bound: the old endpoint
    // keeps answering.
    bed.write(base(taken_port).listener(local(port)).route("/ws", SVC));
    let e = bed.refused();
    assert!(
        e.contains(&format!("metrics endpoint 127.0.0.1:{taken_port}")),
        "{e}"
    );
    assert!(metrics_answer(metrics).contains("weir_l7_"));
    // Nothing of it ran: the live connection and new ones are served as
    // before, and each refusal is in the log.
    echoes(&mut live, "after five refusals");
    open(port, "/ws", "e0");
    assert_eq!(bed.log().matches("reload refused (weir reload)").count(), 5);
}

#[test]
fn sighup_reloads_like_weir_reload_and_moves_the_metrics_endpoint() {
    require_root();
    let (port, metrics, moved) = (free_port(), free_port(), free_port());
    let bed = Bed::start(
        "rlhup",
        base(metrics).listener(local(port)).route("/ws", SVC),
    );
    let mut live = open(port, "/ws", "e0");
    assert!(metrics_answer(metrics).contains("weir_l7_"));

    bed.write(
        base(moved)
            .listener(local(port))
            .route("/ws", SVC)
            .route("/chat", CHAT),
    );
    bed.signal(libc::SIGHUP);
    bed.wait_for_log("configuration reloaded (SIGHUP)");
    let log = bed.log();
    assert!(
        log.contains(&format!(
            "metrics.listen: 127.0.0.1:{metrics} -> 127.0.0.1:{moved}"
        )),
        "{log}"
    );
    open(port, "/chat", "e1");
    assert!(metrics_answer(moved).contains("weir_l7_"));
    assert!(refused_connect(metrics), "the old endpoint still answers");
    echoes(&mut live, "through a SIGHUP");

    bed.write_text("[[listener]]\n");
    bed.signal(libc::SIGHUP);
    bed.wait_for_log("reload refused (SIGHUP)");
    echoes(&mut live, "through a refused SIGHUP");
    open(port, "/chat", "e1");
}
