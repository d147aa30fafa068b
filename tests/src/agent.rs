//! A running `weir agent` for the tests and bench scenarios that drive
//! one: its own configuration file, its JSON log, its `/metrics`. Test
//! plumbing: it panics when the agent cannot be started or read.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::workspace_bin;

/// A running `weir agent`; killed on drop.
pub struct Agent {
    pub child: Child,
    log: PathBuf,
}

impl Agent {
    /// Starts `weir agent` on `instance` with `config` (everything but the
    /// instance line), writing its files into `dir`.
    pub fn start(instance: &str, dir: &Path, config: &str) -> Self {
        static STARTED: AtomicU32 = AtomicU32::new(0);
        let path = dir.join("agent.toml");
        std::fs::write(&path, format!("instance = \"{instance}\"\n{config}")).unwrap();
        let log = dir.join(format!(
            "agent-{}-{}.log",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        let child = Command::new(workspace_bin("weir"))
            .args(["agent", "--log-format", "json", "--config"])
            .arg(&path)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `probe` until it gives a value, for at most `limit`; the
    /// error names `what` and carries the agent's log.
    pub fn until<T>(
        &self,
        what: &str,
        limit: Duration,
        mut probe: impl FnMut() -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = probe() {
                return Ok(v);
            }
            if Instant::now() > deadline {
                anyhow::bail!("{what} within {limit:?}; agent log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the agent logged `event`.
    pub fn wait_for(&self, event: &str) {
        let event = format!("\"event\":\"{event}\"");
        self.wait_line(|l| l.contains(&event));
    }

    /// Waits for a log line `want` accepts, and returns it.
    pub fn wait_line(&self, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| want(l)) {
                return line.to_string();
            }
            assert!(Instant::now() < deadline, "not logged:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory of the instance's own for the agent's files and logs.
pub fn temp_dir(instance: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("weir-agent-{instance}"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `/metrics` of an agent listening on `port`.
pub fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}
