//! A real 3-member etcd cluster on loopback for the discovery tests: the
//! Debian `etcd` server, each member a child process this harness started
//! and tracks by PID, data under a directory of its own. Members can be
//! killed and restarted (a leader change, a partition seen from a client);
//! dropping the cluster kills the members still running and removes the
//! data, also when a test fails half-way.
//!
//! Leader and health come from `etcdctl endpoint status` (Debian
//! `etcd-client`), so the harness needs no client library of its own.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::free_port;

/// Members in a test cluster: the smallest that survives losing one.
pub const MEMBERS: usize = 3;

/// How long a cluster or a restarted member may take to serve.
const READY_LIMIT: Duration = Duration::from_secs(30);

/// One member: its ports, its data, and its process while it runs.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

/// A running (or partly stopped) etcd cluster.
pub struct EtcdCluster {
    dir: PathBuf,
    members: Vec<Member>,
    initial_cluster: String,
}

impl EtcdCluster {
    /// Starts [`MEMBERS`] members under a fresh directory named for `tag`
    /// and waits until they have elected a leader.
    pub fn start(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("weir-etcd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut members = Vec::with_capacity(MEMBERS);
        for i in 0..MEMBERS {
            let name = format!("m{i}");
            members.push(Member {
                data_dir: dir.join(&name),
                log: dir.join(format!("{name}.log")),
                name,
                client_port: free_port()?,
                peer_port: free_port()?,
                child: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            dir,
            members,
            initial_cluster,
        };
        for i in 0..MEMBERS {
            cluster.spawn(i)?;
        }
        cluster.wait_leader()?;
        Ok(cluster)
    }

    /// Client URLs of every member, running or not: what a client is
    /// configured with.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let initial_cluster = self.initial_cluster.clone();
        let m = &mut self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .with_context(|| format!("open {}", m.log.display()))?;
        let child = Command::new("etcd")
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .arg("--listen-client-urls")
            .arg(m.client_url())
            .arg("--advertise-client-urls")
            .arg(m.client_url())
            .arg("--listen-peer-urls")
            .arg(m.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(m.peer_url())
            .arg("--initial-cluster")
            .arg(&initial_cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(self.dir.file_name().unwrap_or_default())
            // Loopback: a new leader within about a second of losing one,
            // with room for a busy test host's scheduling delays.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start etcd (Debian package etcd-server)")?;
        m.child = Some(child);
        Ok(())
    }

    /// `etcdctl endpoint status` of one member: (member id, leader id).
    fn status(&self, i: usize) -> Result<(u64, u64)> {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--dial-timeout", "1s", "--command-timeout", "2s"])
            .arg("--endpoints")
            .arg(self.members[i].client_url())
            .args(["endpoint", "status", "--write-out", "json"])
            .output()
            .context("run etcdctl (Debian package etcd-client)")?;
        if !out.status.success() {
            bail!(
                "etcdctl status {}: {}",
                self.members[i].name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("etcdctl status {}: not JSON", self.members[i].name))?;
        let status = &v[0]["Status"];
        let id = status["header"]["member_id"].as_u64();
        let leader = status["leader"].as_u64();
        match (id, leader) {
            (Some(id), Some(leader)) => Ok((id, leader)),
            _ => bail!(
                "etcdctl status {}: no member or leader id in {v}",
                self.members[i].name
            ),
        }
    }

    /// Index of the current leader among the running members.
    pub fn leader(&self) -> Result<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            if let Ok((id, leader)) = self.status(i)
                && id == leader
            {
                return Ok(i);
            }
        }
        bail!("no running member is the leader")
    }

    /// Waits until every running member names the same, running leader.
    pub fn wait_leader(&self) -> Result<usize> {
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            let running: Vec<usize> = (0..MEMBERS)
                .filter(|&i| self.members[i].child.is_some())
                .collect();
            let statuses: Vec<_> = running.iter().map(|&i| self.status(i)).collect();
            if let Ok(statuses) = statuses.into_iter().collect::<Result<Vec<_>>>()
                && let Some(&(_, leader)) = statuses.first()
                && leader != 0
                && statuses.iter().all(|&(_, l)| l == leader)
                && let Some(pos) = statuses.iter().position(|&(id, _)| id == leader)
            {
                return Ok(running[pos]);
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd cluster had no agreed leader within {READY_LIMIT:?} (logs in {})",
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills member `i` (SIGKILL: no goodbye to its peers) and reaps it.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut child) = self.members[i].child.take() {
            child
                .kill()
                .with_context(|| format!("kill etcd {}", self.members[i].name))?;
            child.wait()?;
        }
        Ok(())
    }

    /// Restarts a killed member on its data (it rejoins, catching up).
    pub fn restart(&mut self, i: usize) -> Result<()> {
        if self.members[i].child.is_none() {
            self.spawn(i)?;
        }
        Ok(())
    }

    /// Kills every member: the cluster is unreachable until restarted.
    pub fn stop_all(&mut self) -> Result<()> {
        for i in 0..MEMBERS {
            self.kill(i)?;
        }
        Ok(())
    }

    /// Restarts every stopped member and waits for a leader.
    pub fn restart_all(&mut self) -> Result<usize> {
        for i in 0..MEMBERS {
            self.restart(i)?;
        }
        self.wait_leader()
    }

    /// Runs `etcdctl` against every running member; its stdout.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        self.ctl_with_input(args, "")
    }

    /// Runs one transaction: `script` in `etcdctl txn`'s format (compares,
    /// blank line, operations on success, blank line, on failure).
    pub fn txn(&self, script: &str) -> Result<()> {
        self.ctl_with_input(&["txn"], script).map(drop)
    }

    fn ctl_with_input(&self, args: &[&str], input: &str) -> Result<String> {
        let endpoints: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(Member::client_url)
            .collect();
        let mut child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--dial-timeout", "2s", "--command-timeout", "5s"])
            .arg("--endpoints")
            .arg(endpoints.join(","))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("run etcdctl (Debian package etcd-client)")?;
        child
            .stdin
            .take()
            .context("etcdctl stdin")?
            .write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "etcdctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Puts one key.
    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        // `--` so that a value starting with '-' is not an option.
        self.ctl(&["put", "--", key, value]).map(drop)
    }

    /// Deletes one key.
    pub fn delete(&self, key: &str) -> Result<()> {
        self.ctl(&["del", "--", key]).map(drop)
    }

    /// The cluster's current revision.
    pub fn revision(&self) -> Result<i64> {
        let out = self.ctl(&["get", "--write-out", "json", "--", "/"])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("etcdctl get: not JSON")?;
        v["header"]["revision"]
            .as_i64()
            .with_context(|| format!("etcdctl get: no revision in {v}"))
    }

    /// Where the members' data and logs are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
