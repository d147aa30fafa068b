//! The etcd discovery source against a real 3-member etcd cluster and a
//! real registry: adds, removals and reweights written to etcd reach the
//! registry; killing the leader during a change still converges on the
//! latest revision; with every member stopped, or the prefix emptied, the
//! registry keeps its state and the source reports it stale; a bad value
//! refuses its revision whole (named key and reason) and the next good one
//! applies. Last, the same through `weir agent`: its registry follows etcd,
//! and while etcd is down it keeps its state while `/metrics` and `weir
//! stats` show the source stale (and `weir stats` says when the agent that
//! follows it no longer runs).

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{TestInstance, add_service, free_port, require_root};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use weir::discovery::etcd::{self, EtcdConfig};
use weir::discovery::{self, Report, Update};
use weir::registry::{ApplyOptions, BackendAddr, Registry, ServiceAddr, ServiceModeName};
use weir_ebpf::abi::BackendState;
use weir_testbed::agent::{Agent, scrape, temp_dir};
use weir_testbed::etcd::EtcdCluster;
use weir_testbed::workspace_bin;

const PREFIX: &str = "/weir/test/";
const SERVICE: &str = "198.19.0.30:80";

/// How long a change may take from etcd to the registry.
const CONVERGE: Duration = Duration::from_secs(30);

fn svc() -> ServiceAddr {
    SERVICE.parse().unwrap()
}

fn backend_key(i: u8) -> String {
    format!("{PREFIX}backends/{SERVICE}/198.18.30.{i}")
}

fn backend(i: u8) -> BackendAddr {
    BackendAddr::parse_for(&format!("198.18.30.{i}"), &svc()).unwrap()
}

/// Active backends of the service and their weights, as the registry
/// holds them.
fn active(registry: &Registry) -> BTreeMap<BackendAddr, u16> {
    let state = registry.state().expect("read state");
    let id = state.service(&svc()).expect("service").id;
    state
        .backends_of(id)
        .filter(|(_, b)| b.state == BackendState::Active)
        .map(|(_, b)| (b.addr, b.weight))
        .collect()
}

fn backends(set: &[(u8, u16)]) -> BTreeMap<BackendAddr, u16> {
    set.iter().map(|&(i, w)| (backend(i), w)).collect()
}

/// The source under test, applying what it reports the way `weir agent`
/// does: each desired revision through `Registry::apply`, audited with the
/// source and revision; failures and empty prefixes change nothing.
struct Follower {
    reports: UnboundedReceiver<Report>,
    registry: Registry,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    applied: Option<i64>,
    /// Desired revisions reported (applied), counting repeats.
    reported: u32,
    failed: Vec<String>,
    empty: u32,
}

impl Follower {
    fn start(instance: &TestInstance, cluster: &EtcdCluster) -> Self {
        let registry = with_service(instance);
        let (tx, reports) = unbounded_channel();
        let stop = Arc::new(AtomicBool::new(false));
        let config = EtcdConfig {
            endpoints: cluster.endpoints(),
            prefix: PREFIX.into(),
        };
        let thread = etcd::spawn(config, tx, stop.clone()).expect("spawn etcd source");
        Self {
            reports,
            registry,
            stop,
            thread: Some(thread),
            applied: None,
            reported: 0,
            failed: Vec::new(),
            empty: 0,
        }
    }

    /// Handles every report waiting now.
    fn drain(&mut self) {
        while let Ok(report) = self.reports.try_recv() {
            match report.update {
                Update::Desired { revision, desired } => {
                    for change in desired.changes() {
                        let opts = ApplyOptions {
                            command: discovery::command(&report.source, &revision),
                            ..Default::default()
                        };
                        self.registry.apply(&change, opts).expect("apply revision");
                    }
                    self.applied = Some(revision.parse().expect("numeric revision"));
                    self.reported += 1;
                }
                Update::Empty { .. } => self.empty += 1,
                Update::Failed { reason } => self.failed.push(reason),
            }
        }
    }

    fn active(&self) -> BTreeMap<BackendAddr, u16> {
        active(&self.registry)
    }

    /// Handles reports until `done` holds or [`CONVERGE`] passes.
    fn until(&mut self, what: &str, mut done: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + CONVERGE;
        loop {
            self.drain();
            if done(self) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what} not reached within {CONVERGE:?}: applied revision {:?}, active {:?}, \
                 failures {:?}",
                self.applied,
                self.active(),
                self.failed
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn until_active(&mut self, want: &[(u8, u16)]) {
        let want = backends(want);
        self.until(&format!("backends {want:?}"), |f| f.active() == want);
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The instance's registry, with the (empty) service the source fills:
/// sources set backends of services an operator created.
fn with_service(instance: &TestInstance) -> Registry {
    let mut registry = instance.registry();
    registry
        .apply(
            &add_service(svc(), ServiceModeName::L4),
            ApplyOptions::default(),
        )
        .expect("add service");
    registry
}

/// A cluster with the service and backends 1..=n (weight 1) written.
fn seeded(tag: &str, n: u8) -> EtcdCluster {
    let cluster = EtcdCluster::start(tag).expect("start etcd cluster");
    cluster
        .put(&format!("{PREFIX}services/{SERVICE}"), "{}")
        .unwrap();
    for i in 1..=n {
        cluster.put(&backend_key(i), "{}").unwrap();
    }
    cluster
}

/// A cluster seeded with backends 1..=4 and a follower that applied them.
fn following(tag: &str) -> (EtcdCluster, TestInstance, Follower) {
    let cluster = seeded(tag, 4);
    let instance = TestInstance::new(&format!("etcd{tag}"));
    let mut follower = Follower::start(&instance, &cluster);
    follower.until_active(&[(1, 1), (2, 1), (3, 1), (4, 1)]);
    (cluster, instance, follower)
}

/// Retries a write while the cluster elects a new leader.
fn put_retrying(cluster: &EtcdCluster, key: &str, value: &str) {
    let deadline = Instant::now() + CONVERGE;
    while let Err(e) = cluster.put(key, value) {
        assert!(Instant::now() < deadline, "put {key}: {e}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn add_remove_and_reweight_through_etcd_reach_the_registry() {
    require_root();
    let (cluster, instance, mut follower) = following("arw");
    // Quiet for longer than the source's per-request timeout and two of its
    // keep-alive pings: neither cuts the watch (no failure below; pings
    // more often than etcd allows made it close the connection).
    std::thread::sleep(Duration::from_secs(22));

    cluster.put(&backend_key(5), r#"{"weight":2}"#).unwrap();
    follower.until_active(&[(1, 1), (2, 1), (3, 1), (4, 1), (5, 2)]);

    cluster.put(&backend_key(2), r#"{"weight":7}"#).unwrap();
    follower.until_active(&[(1, 1), (2, 7), (3, 1), (4, 1), (5, 2)]);

    cluster.delete(&backend_key(3)).unwrap();
    follower.until_active(&[(1, 1), (2, 7), (4, 1), (5, 2)]);

    let revision = cluster.revision().unwrap();
    follower.until("the latest revision", |f| f.applied == Some(revision));
    assert!(follower.failed.is_empty(), "{:?}", follower.failed);
    let audit = std::fs::read_to_string(instance.instance.audit_log()).unwrap();
    assert!(
        audit.contains(&format!("rev {revision})")),
        "the audit log names the source revision: {audit}"
    );
}

#[test]
fn leader_killed_during_a_change_converges_on_the_latest_revision() {
    require_root();
    let (mut cluster, _instance, mut follower) = following("leader");

    let leader = cluster.leader().unwrap();
    cluster.put(&backend_key(5), "{}").unwrap();
    cluster.kill(leader).unwrap();
    // Written while the survivors elect a new leader and the source
    // reconnects (its member may be the one killed).
    put_retrying(&cluster, &backend_key(6), r#"{"weight":4}"#);
    cluster.delete(&backend_key(1)).unwrap();
    cluster.restart(leader).unwrap();
    cluster.wait_leader().unwrap();
    put_retrying(&cluster, &backend_key(2), r#"{"weight":3}"#);

    let revision = cluster.revision().unwrap();
    follower.until("the latest revision", |f| f.applied == Some(revision));
    follower.until_active(&[(2, 3), (3, 1), (4, 1), (5, 1), (6, 4)]);
}

#[test]
fn all_members_stopped_keep_the_state_and_report_it_stale() {
    require_root();
    let (mut cluster, _instance, mut follower) = following("stop");
    let before = follower.registry.state().unwrap();

    cluster.stop_all().unwrap();
    follower.until("a stale report", |f| !f.failed.is_empty());
    assert!(
        follower.failed[0].contains("keeping the last applied state"),
        "{:?}",
        follower.failed
    );
    assert_eq!(follower.registry.state().unwrap(), before);

    // Back: the source reports the unchanged revision again (so the agent
    // stops counting it stale), and a change made after the restart applies.
    let reported = follower.reported;
    let revision = follower.applied;
    cluster.restart_all().unwrap();
    follower.until("the same revision reported again", |f| {
        f.reported > reported
    });
    assert_eq!(follower.applied, revision);
    put_retrying(&cluster, &backend_key(5), "{}");
    follower.until_active(&[(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]);

    // An emptied prefix (a restore gone wrong) is reported empty: the
    // registry keeps the last applied state too.
    let before = follower.registry.state().unwrap();
    cluster.ctl(&["del", "--prefix", "--", PREFIX]).unwrap();
    follower.until("an empty report", |f| f.empty > 0);
    assert_eq!(follower.registry.state().unwrap(), before);
}

#[test]
fn a_bad_value_refuses_its_revision_whole_and_is_reported() {
    require_root();
    let (cluster, _instance, mut follower) = following("bad");
    let before = follower.registry.state().unwrap();

    // One transaction: a good add and a negative weight. Neither applies.
    let txn = format!(
        // etcdctl txn unquotes a double-quoted value as a Go string.
        r#"
put {} {{}}
put {} "{{\"weight\":-3}}"


"#,
        backend_key(5),
        backend_key(6)
    );
    cluster.txn(&txn).unwrap();
    let stored = cluster
        .ctl(&["get", "--print-value-only", "--", &backend_key(5)])
        .unwrap();
    assert_eq!(stored.trim(), "{}", "etcd committed the transaction");
    follower.until("a refusal", |f| !f.failed.is_empty());
    let reason = &follower.failed[0];
    assert!(
        reason.contains(&backend_key(6)) && reason.contains("\"-3\""),
        "{reason}"
    );
    assert_eq!(follower.registry.state().unwrap(), before);

    // Later revisions are refused too while the bad key stays.
    cluster.put(&backend_key(7), "{}").unwrap();
    follower.until("a second refusal", |f| f.failed.len() >= 2);
    assert!(
        follower.failed[1].contains(&backend_key(6)),
        "{:?}",
        follower.failed
    );

    cluster.put(&backend_key(6), r#"{"weight":2}"#).unwrap();
    cluster.delete(&backend_key(7)).unwrap();
    follower.until_active(&[(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 2)]);
}

/// `weir_agent_source_stale` of the etcd source in `/metrics`.
fn stale(metrics: u16) -> Option<u64> {
    scrape(metrics)
        .lines()
        .find(|l| l.starts_with("weir_agent_source_stale{source=\"etcd "))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

/// `weir stats` of the instance: its `sources` record (JSON) and the text.
fn stats_sources(instance: &TestInstance) -> (serde_json::Value, String) {
    let run = |json: bool| {
        let mut cmd = Command::new(workspace_bin("weir"));
        cmd.args(["--instance", instance.name()]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.arg("stats").output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let v: serde_json::Value = serde_json::from_str(&run(true)).unwrap();
    (v["sources"].clone(), run(false))
}

fn until(what: &str, agent: &Agent, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + CONVERGE;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} not reached within {CONVERGE:?}; agent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn weir_agent_follows_etcd_and_keeps_its_state_while_etcd_is_down() {
    require_root();
    let mut cluster = seeded("agent", 4);
    let instance = TestInstance::new("etcdagent");
    let registry = with_service(&instance);
    let metrics = free_port();
    let endpoints: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    let config = format!(
        "[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n[[source]]\ntype = \"etcd\"\n\
         endpoints = [{}]\nprefix = \"{PREFIX}\"\n",
        endpoints.join(", ")
    );
    let dir = temp_dir(instance.name());
    let agent = Agent::start(instance.name(), &dir, &config);
    until("the seeded backends", &agent, || {
        active(&registry) == backends(&[(1, 1), (2, 1), (3, 1), (4, 1)])
    });
    cluster.put(&backend_key(5), r#"{"weight":2}"#).unwrap();
    until("the added backend", &agent, || {
        active(&registry) == backends(&[(1, 1), (2, 1), (3, 1), (4, 1), (5, 2)])
    });
    until("a fresh source", &agent, || stale(metrics) == Some(0));
    let before = registry.state().unwrap();
    let (sources, text) = stats_sources(&instance);
    assert_eq!(sources["agent_running"], true, "{sources}");
    let source = &sources["sources"][0];
    assert_eq!(source["stale"], false, "{sources}");
    assert_eq!(
        source["services"],
        serde_json::json!([SERVICE]),
        "{sources}"
    );
    let applied = source["applied_revision"].as_str().expect("a revision");
    assert!(
        text.contains(&format!(": fresh, revision {applied} applied ")),
        "{text}"
    );

    cluster.stop_all().unwrap();
    until("the source counted stale", &agent, || {
        stale(metrics) == Some(1)
    });
    assert_eq!(registry.state().unwrap(), before, "fail static");
    assert!(agent.log().contains("keeping the last applied state"));
    let (sources, text) = stats_sources(&instance);
    let source = &sources["sources"][0];
    assert_eq!(source["stale"], true, "{sources}");
    assert_eq!(source["last"], "refused", "{sources}");
    assert_eq!(
        source["applied_revision"].as_str(),
        Some(applied),
        "{sources}"
    );
    assert!(
        !source["reason"].as_str().unwrap_or("").is_empty(),
        "{sources}"
    );
    assert!(
        text.contains("STALE since ")
            && text.contains(&format!("keeping revision {applied} applied")),
        "{text}"
    );

    cluster.restart_all().unwrap();
    until("the source fresh again", &agent, || {
        stale(metrics) == Some(0)
    });
    assert_eq!(registry.state().unwrap(), before);
    assert_eq!(stats_sources(&instance).0["sources"][0]["stale"], false);
    // Kept when the test fails: the agent's log is there.
    drop(agent);
    let (sources, text) = stats_sources(&instance);
    assert_eq!(sources["agent_running"], false, "{sources}");
    assert!(
        text.contains(", not running since its record of "),
        "{text}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
