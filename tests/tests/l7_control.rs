//! `weir run` against the control plane: a served instance cannot be
//! destroyed, replaced maps stop the daemon, a listener is not silently
//! shared, and registry refresh failures are counted and logged.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use aya::maps::Array;
use common::{TestInstance, add_service, free_port, require_root};
use weir::instance::Instance;
use weir::l7::config::{ConfigBuilder, Timeout};
use weir::registry::{
    ApplyOptions, BackendAddr, Change, CreateOptions, Registry, ServiceAddr, ServiceModeName,
};
use weir_testbed::workspace_bin;

const SVC: ServiceAddr = ServiceAddr {
    vip: Ipv4Addr::new(198, 19, 0, 70),
    port: 80,
};

/// Declares SVC (L7) with one backend in `instance`.
fn declare(instance: &Instance) {
    let mut reg = Registry::open_or_create(instance, CreateOptions { flows: 4096 }).unwrap();
    let opts = || ApplyOptions {
        force: true,
        ..Default::default()
    };
    let add = add_service(SVC, ServiceModeName::L7);
    reg.apply(&add, opts()).unwrap();
    let set = Change::SetBackends {
        service: SVC,
        backends: vec![(
            BackendAddr {
                addr: Ipv4Addr::new(198, 18, 70, 1),
                port: 80,
            },
            1,
        )],
    };
    reg.apply(&set, opts()).unwrap();
}

/// Runs `weir args` for at most 20 s: a `weir run` that should have been
/// refused but serves is killed, and the test fails on its output.
fn weir(args: &[&str]) -> std::process::Output {
    let mut child = Command::new(workspace_bin("weir"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A running `weir run`; its stderr goes to a file the test reads.
struct Daemon {
    child: Child,
    stderr: PathBuf,
    dir: PathBuf,
    metrics_port: u16,
}

impl Daemon {
    /// Starts `weir run --instance NAME` on `port`; the file names the
    /// same instance if `in_file`; the listener is `shared` with other
    /// processes or not.
    fn start(instance: &str, port: u16, shared: bool, in_file: bool) -> Self {
        let dir = std::env::temp_dir().join(format!("weir-ctl-{instance}"));
        std::fs::create_dir_all(&dir).unwrap();
        let metrics_port = free_port();
        let config = dir.join("weir.toml");
        let mut file = ConfigBuilder::new();
        if in_file {
            file = file.instance(instance);
        }
        let file = file
            .workers(2)
            .buffers(64)
            .metrics(SocketAddr::from((Ipv4Addr::LOCALHOST, metrics_port)))
            .timeout(Timeout::Shutdown, Duration::from_secs(1))
            .listener(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .shared(shared)
            .route("/", SVC);
        std::fs::write(&config, file.to_string()).unwrap();
        let stderr = dir.join("stderr");
        let child = Command::new(workspace_bin("weir"))
            .args(["--instance", instance, "run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut d = Self {
            child,
            stderr,
            dir,
            metrics_port,
        };
        d.wait_for_line("running instance", Duration::from_secs(10));
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for a stderr line containing `text`; returns the line.
    fn wait_for_line(&mut self, text: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self.log().lines().find(|l| l.contains(text)) {
                return line.to_string();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "weir run exited ({status}) before logging {text:?}: {}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {text:?} within {limit:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn terminate(&mut self) -> Option<ExitStatus> {
        // SAFETY: a signal to the child this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait_exit(Duration::from_secs(10))
    }

    fn metric(&self, name: &str) -> u64 {
        let mut s = TcpStream::connect(("127.0.0.1", self.metrics_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn one_line_error(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "exit status {}", out.status);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    err
}

#[test]
fn destroy_is_refused_while_weir_run_serves_the_instance() {
    require_root();
    let inst = TestInstance::new("ctldestroy");
    declare(&inst.instance);
    let mut daemon = Daemon::start(inst.name(), free_port(), false, true);
    assert!(
        daemon
            .log()
            .contains(&format!("running instance {} on", inst.name())),
        "{}",
        daemon.log()
    );
    let pid = daemon.child.id();
    let err = one_line_error(&weir(&["--instance", inst.name(), "destroy"]));
    assert!(
        err.contains(&format!("served by `weir run` (pid {pid})"))
            && err.contains(&format!("kill -TERM {pid}")),
        "{err}"
    );
    assert!(inst.instance.pin_dir().join("weir_services").exists());
    assert!(daemon.child.try_wait().unwrap().is_none(), "still serving");
    assert!(daemon.terminate().is_some_and(|s| s.success()));
    let out = weir(&["--instance", inst.name(), "destroy"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Changes the pins by hand under a running daemon (`weir destroy` would
/// refuse): removes them, or, if `recreate`, puts the maps of a freshly
/// created instance in their place. Each pin is replaced by one rename, so
/// the daemon never sees a missing pin and must notice the new map ids.
fn replace_maps_under_the_daemon(recreate: bool, expect: &str) {
    require_root();
    let inst = TestInstance::new(if recreate { "ctlrecreate" } else { "ctlremove" });
    declare(&inst.instance);
    let fresh = TestInstance::new("ctlfresh");
    if recreate {
        declare(&fresh.instance);
    }
    let mut daemon = Daemon::start(inst.name(), free_port(), false, true);
    let replaced = Instant::now();
    if recreate {
        for pin in std::fs::read_dir(fresh.instance.pin_dir()).unwrap() {
            let pin = pin.unwrap();
            if pin.file_type().unwrap().is_file() {
                std::fs::rename(pin.path(), inst.instance.pin_dir().join(pin.file_name())).unwrap();
            }
        }
    } else {
        std::fs::remove_dir_all(inst.instance.pin_dir()).unwrap();
    }
    let line = daemon.wait_for_line(expect, Duration::from_secs(5));
    let noticed = replaced.elapsed();
    assert!(
        noticed < Duration::from_millis(3000),
        "noticed after {noticed:?}"
    );
    assert!(line.starts_with("weir: error: instance "), "{line}");
    // No connection is open: the shutdown window (1 s) is not needed.
    let status = daemon
        .wait_exit(Duration::from_secs(3))
        .unwrap_or_else(|| panic!("weir run still serves: {}", daemon.log()));
    assert!(!status.success(), "exit status {status}");
    let log = daemon.log();
    assert_eq!(
        log.lines().filter(|l| l.contains(expect)).count(),
        1,
        "{log}"
    );
}

#[test]
fn weir_run_stops_when_its_maps_are_replaced() {
    replace_maps_under_the_daemon(true, "destroyed and created again");
}

#[test]
fn weir_run_stops_when_its_maps_are_removed() {
    replace_maps_under_the_daemon(false, "the instance was destroyed");
}

#[test]
fn a_second_weir_run_on_the_same_listener_is_refused_unless_shared() {
    require_root();
    let a = TestInstance::new("ctlsharea");
    let b = TestInstance::new("ctlshareb");
    declare(&a.instance);
    declare(&b.instance);
    let port = free_port();
    let first = Daemon::start(a.name(), port, false, true);
    let dir = std::env::temp_dir().join(format!("weir-ctl-{}", b.name()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("weir.toml");
    let file = ConfigBuilder::new()
        .instance(b.name())
        .workers(1)
        .buffers(64)
        .listener(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .route("/", SVC);
    std::fs::write(&config, file.to_string()).unwrap();
    let out = weir(&[
        "--instance",
        b.name(),
        "run",
        "--config",
        config.to_str().unwrap(),
    ]);
    let err = one_line_error(&out);
    assert!(
        err.contains(&format!(
            "listener 127.0.0.1:{port} is already in use by pid {} (weir)",
            first.child.id()
        )),
        "{err}"
    );
    assert!(!err.contains("running"), "{err}");
    drop(first);
    let _ = std::fs::remove_dir_all(&dir);

    // Shards on purpose: both say so. The second names its instance only
    // with the flag, which the running line confirms.
    let port = free_port();
    let _first = Daemon::start(a.name(), port, true, true);
    let second = Daemon::start(b.name(), port, true, false);
    assert!(
        second
            .log()
            .contains(&format!("running instance {} on", b.name())),
        "{}",
        second.log()
    );
}

#[test]
fn registry_refresh_failures_are_counted_logged_once_and_exposed() {
    require_root();
    let inst = TestInstance::new("ctlrefresh");
    declare(&inst.instance);
    let mut daemon = Daemon::start(inst.name(), free_port(), false, true);
    let errors = "weir_l7_registry_refresh_errors_total";
    assert_eq!(daemon.metric(errors), 0);
    // A backend slot with a state no writer produces: every re-read of the
    // registry fails until it is put right.
    let slot = 60_000;
    let mut reg = inst.registry();
    let set_state = |reg: &mut Registry, state: u32| {
        let mut backends: Array<_, weir_ebpf::abi::Backend> =
            Array::try_from(reg.maps_mut().backends_map_mut()).unwrap();
        let mut b = backends.get(&slot, 0).unwrap();
        b.state = state;
        backends.set(slot, b, 0).unwrap();
        reg.maps_mut().bump_generation().unwrap();
    };
    set_state(&mut reg, 99);
    daemon.wait_for_line("registry refresh failed", Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(500));
    let failed = daemon.metric(errors);
    assert!(failed >= 5, "a failure per tick is counted: {failed}");
    let log = daemon.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("registry refresh failed"))
        .count();
    assert!((1..=2).contains(&lines), "once per worker: {log}");
    assert!(log.contains("backend 60000 has state 99"), "{log}");

    set_state(&mut reg, 0);
    daemon.wait_for_line("registry refresh works again", Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(300));
    let after = daemon.metric(errors);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(daemon.metric(errors), after, "no more failures once fixed");
    assert!(daemon.terminate().is_some_and(|s| s.success()));
}
