//! What the takeover and handoff tests share: an instance whose one
//! service is served by backends on loopback, the `weir run` processes
//! started for it (each logging to its own file, all stopped on drop), and
//! a fake old process for the new one's side of the control protocol.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use weir::l7::config::{ConfigBuilder, Timeout};
use weir::l7::frame::Opcode;
use weir::registry::{Change, ServiceAddr};
use weir_testbed::workspace_bin;

use super::ws::{recv, send, upgrade};
use super::{TestInstance, add_l7_service, apply, backend, free_port};

pub const SVC: ServiceAddr = ServiceAddr {
    vip: Ipv4Addr::new(198, 19, 0, 95),
    port: 80,
};

/// The process taken over: the first one a bed starts.
pub const OLD: usize = 0;

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// An instance whose SVC `weir-echo`s (and any other backends a test
/// serves itself) serve, and the `weir run` processes started for it.
pub struct Bed {
    pub inst: TestInstance,
    pub echoes: Vec<(Child, SocketAddr)>,
    pub runs: Vec<Child>,
    /// Processes `weir upgrade` started (not children of the test): by pid.
    pub detached: Vec<i32>,
    pub dir: PathBuf,
    pub port: u16,
    pub metrics: u16,
    bound: Duration,
    /// `drain.window` in the files [`Bed::configure`] writes.
    pub drain_window: Option<Duration>,
    /// Runs log JSON lines (`--log-format json`): their `event` fields.
    pub json_logs: bool,
}

impl Bed {
    /// A bed whose first `weir run` ([`OLD`]) serves already.
    pub fn serving(tag: &str, bound: Duration) -> Self {
        let mut bed = Self::bounded(tag, bound);
        bed.start_old();
        bed
    }

    /// With `timeouts.takeover = bound` and one `weir-echo` behind SVC.
    pub fn bounded(tag: &str, bound: Duration) -> Self {
        Self::behind(tag, bound, 1, &[])
    }

    /// With `timeouts.takeover = bound`; SVC's backends are `echoes`
    /// `weir-echo`s (named e0, e1, ...) and the servers at `others`.
    pub fn behind(tag: &str, bound: Duration, echoes: usize, others: &[SocketAddr]) -> Self {
        let inst = TestInstance::new(tag);
        let dir = std::env::temp_dir().join(format!("weir-takeover-{}", inst.name()));
        std::fs::create_dir_all(&dir).unwrap();
        let echoes: Vec<_> = (0..echoes)
            .map(|i| weir_testbed::spawn_echo("127.0.0.1:0", &format!("e{i}")))
            .collect();
        let mut reg = inst.registry();
        apply(&mut reg, add_l7_service(SVC));
        let backends = echoes
            .iter()
            .map(|(_, a)| a)
            .chain(others)
            .map(|a| (backend(*a), 1))
            .collect();
        apply(
            &mut reg,
            Change::SetBackends {
                service: SVC,
                backends,
            },
        );
        let bed = Self {
            inst,
            echoes,
            runs: Vec::new(),
            detached: Vec::new(),
            dir,
            port: free_port(),
            metrics: free_port(),
            bound,
            drain_window: None,
            json_logs: false,
        };
        bed.configure(2, None);
        bed
    }

    /// Starts the first `weir run` and waits until it serves.
    pub fn start_old(&mut self) {
        self.run(false, &[]);
        self.wait_for_log(OLD, "running instance");
    }

    /// Writes the configuration the next `weir run` reads: `workers`, the
    /// bed's listener and, when given, another one on `extra`.
    pub fn configure(&self, workers: u64, extra: Option<u16>) {
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
        if let Some(window) = self.drain_window {
            config = config.drain_window(window);
        }
        std::fs::write(self.dir.join("weir.toml"), config.to_string()).unwrap();
    }

    /// Starts `weir run` number `self.runs.len()` (with `--takeover` when
    /// asked, and the test hooks in `env`); its log is `run-N.log`.
    pub fn run(&mut self, takeover: bool, env: &[(&str, u64)]) -> usize {
        let n = self.runs.len();
        let mut cmd = Command::new(workspace_bin("weir"));
        cmd.args(["--instance", self.inst.name(), "run", "--config"])
            .arg(self.dir.join("weir.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join(format!("run-{n}.log"))).unwrap());
        if takeover {
            cmd.arg("--takeover");
        }
        if self.json_logs {
            cmd.args(["--log-format", "json"]);
        }
        for (key, value) in env {
            cmd.env(key, value.to_string());
        }
        self.runs.push(cmd.spawn().unwrap());
        n
    }

    pub fn log(&self, n: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("run-{n}.log"))).unwrap_or_default()
    }

    pub fn wait_for_log(&self, n: usize, text: &str) {
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
    pub fn exited(&mut self, n: usize, within: Duration) -> ExitStatus {
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

    pub fn running(&mut self, n: usize) -> bool {
        self.runs[n].try_wait().unwrap().is_none()
    }

    pub fn control_socket(&self) -> PathBuf {
        self.inst.instance.control_socket_path()
    }

    /// `weir --instance <this one> <args>`, run to its end.
    pub fn weir_cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(workspace_bin("weir"))
            .args(["--instance", self.inst.name()])
            .args(args)
            .output()
            .unwrap()
    }

    /// A series of the `/metrics` answer of whichever process holds the
    /// metrics listener: `name` with its labels, as in the exposition.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let text = super::metrics_answer(self.metrics);
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for pid in &self.detached {
            // SAFETY: a signal to a process the test started through
            // `weir upgrade`.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        // Not our children: gone once /proc has no thread of theirs left
        // but a zombie leader (its other threads may hold the daemon lock
        // for a moment after the first one ended), so that the instance's
        // pins can go.
        let deadline = Instant::now() + Duration::from_secs(5);
        for pid in &self.detached {
            while Instant::now() < deadline && !dead(*pid) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let echoes = self.echoes.iter_mut().map(|(c, _)| c);
        for c in self.runs.iter_mut().chain(echoes) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether process `pid` is gone, or a zombie whose every thread ended.
fn dead(pid: i32) -> bool {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count);
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    });
    threads == 0 || (threads == 1 && zombie)
}

/// The old side of a takeover as another binary would speak it: bound on
/// `bed`'s control socket before `bed` starts a `weir run --takeover`.
pub struct FakeOld {
    listener: UnixListener,
}

impl FakeOld {
    pub fn bind(bed: &Bed) -> Self {
        let path = bed.control_socket();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let _ = std::fs::remove_file(&path);
        Self {
            listener: UnixListener::bind(&path).unwrap(),
        }
    }

    /// Takes the new process's takeover request and answers `offer` (one
    /// line), passing `fds` with it; returns the conversation.
    pub fn answer(&self, offer: &str, fds: &[&dyn AsRawFd]) -> UnixStream {
        let (conversation, _) = self.listener.accept().unwrap();
        conversation
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut request = String::new();
        BufReader::new(&conversation)
            .read_line(&mut request)
            .unwrap();
        assert!(request.contains("\"command\":\"takeover\""), "{request}");
        let fds: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
        weir::daemon::fdpass::send(&conversation, offer.as_bytes(), &fds).unwrap();
        conversation
    }
}

/// What the new process wrote after an offer: nothing, if it refused.
pub fn rest_of(mut conversation: UnixStream) -> String {
    let mut rest = String::new();
    conversation
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let _ = conversation.read_to_string(&mut rest);
    rest
}

/// A control request line as another binary would write it, and the
/// answer.
pub fn raw_control(path: &std::path::Path, line: &str) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    answer
}

pub fn open(port: u16) -> TcpStream {
    let (s, head) = upgrade(port, "/ws");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

pub fn echoes(s: &mut TcpStream, text: &str) {
    send(s, true, Opcode::Text, text.as_bytes());
    assert_eq!(recv(s), (true, 1, text.as_bytes().to_vec()), "{text}");
}
