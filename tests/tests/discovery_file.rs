//! `weir agent` fed by a watched file, against a real registry: an atomic
//! replace applies; a file written in two steps applies only whole; a
//! deleted or truncated file keeps the last state and is counted; bad
//! syntax is refused at its file and line; a large removal is refused by
//! the guard rails and reported. The CLI warns on hand edits of a service
//! the file owns; a file in a missing directory is refused at start.

mod common;

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{TestInstance, add_l7_service, free_port, require_root};
use weir::registry::{ApplyOptions, ServiceAddr};
use weir_testbed::agent::{Agent, scrape, temp_dir};
use weir_testbed::workspace_bin;

const SVC: ServiceAddr = ServiceAddr {
    vip: Ipv4Addr::new(198, 19, 0, 90),
    port: 80,
};
const OTHER: ServiceAddr = ServiceAddr {
    vip: Ipv4Addr::new(198, 19, 0, 91),
    port: 80,
};

/// An instance with `SVC` and `OTHER`, both L7 and without backends.
fn instance(tag: &str) -> TestInstance {
    let inst = TestInstance::new(tag);
    let mut reg = inst.registry();
    for addr in [SVC, OTHER] {
        reg.apply(&add_l7_service(addr), ApplyOptions::default())
            .unwrap();
    }
    inst
}

/// The active backends of `svc` with their weights, as the registry has
/// them, in address order.
fn active(inst: &TestInstance, svc: ServiceAddr) -> Vec<String> {
    let state = inst.registry().state().unwrap();
    let id = state.services[&svc].id;
    let mut out: Vec<String> = state
        .backends_of(id)
        .filter(|(_, b)| b.state == weir_ebpf::abi::BackendState::Active)
        .map(|(_, b)| format!("{}@{}", b.addr, b.weight))
        .collect();
    out.sort();
    out
}

fn wait_active(inst: &TestInstance, svc: ServiceAddr, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = active(inst, svc);
        if now == want {
            return;
        }
        assert!(Instant::now() < deadline, "{svc}: {now:?}, never {want:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `[[service]]` tables, one per (service, backends).
fn file_text(services: &[(ServiceAddr, &[&str])]) -> String {
    services
        .iter()
        .map(|(svc, backends)| {
            let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
            format!(
                "[[service]]\nservice = \"{svc}\"\nbackends = [\n  {},\n]\n",
                list.join(",\n  ")
            )
        })
        .collect()
}

/// Writes `text` to a new file and renames it over `path`, as deploy tools
/// and most editors do.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_file_name(".backends.toml.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// An agent with `/metrics` and the file source `path`, and its metrics
/// port.
fn agent(inst: &TestInstance, dir: &Path, path: &Path) -> (Agent, u16) {
    let metrics = free_port();
    let config = format!(
        "[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n[[source]]\ntype = \"file\"\npath = \"{}\"\n",
        path.display()
    );
    (Agent::start(inst.name(), dir, &config), metrics)
}

/// The value of the metrics row that starts with `row`, 0 if absent.
fn metric(port: u16, row: &str) -> u64 {
    scrape(port)
        .lines()
        .find_map(|l| l.strip_prefix(row)?.trim().parse().ok())
        .unwrap_or(0)
}

fn reports(port: u16, path: &Path, outcome: &str) -> u64 {
    metric(
        port,
        &format!(
            "weir_agent_source_reports_total{{source=\"file {}\",outcome=\"{outcome}\"}}",
            path.display()
        ),
    )
}

fn stale(port: u16, path: &Path) -> u64 {
    metric(
        port,
        &format!(
            "weir_agent_source_stale{{source=\"file {}\"}}",
            path.display()
        ),
    )
}

fn wait_reports(port: u16, path: &Path, outcome: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while reports(port, path, outcome) < n {
        assert!(
            Instant::now() < deadline,
            "never {n} {outcome} report(s):\n{}",
            scrape(port)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The audit lines the file source wrote.
fn audit_lines(inst: &TestInstance, path: &Path) -> Vec<String> {
    let needle = format!("weir agent (file {} rev ", path.display());
    std::fs::read_to_string(inst.instance.audit_log())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(String::from)
        .collect()
}

/// Removes the test's directory on drop.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An instance, its file holding `text` and an agent that applied it.
fn started(tag: &str, text: &str) -> (TestInstance, PathBuf, Agent, u16, Dir) {
    let inst = instance(tag);
    let dir = temp_dir(inst.name());
    let path = dir.join("backends.toml");
    replace(&path, text);
    let (agent, port) = agent(&inst, &dir, &path);
    agent.wait_for("started");
    wait_reports(port, &path, "applied", 1);
    (inst, path, agent, port, Dir(dir))
}

#[test]
fn an_atomic_replace_applies_and_the_cli_warns_on_hand_edits() {
    require_root();
    let (inst, path, agent, port, _dir) = started(
        "dfrep",
        &file_text(&[
            (SVC, &["198.18.1.2:80", "198.18.1.3:80@3"]),
            (OTHER, &["198.18.2.2:80"]),
        ]),
    );
    wait_active(&inst, SVC, &["198.18.1.2:80@1", "198.18.1.3:80@3"]);
    wait_active(&inst, OTHER, &["198.18.2.2:80@1"]);
    agent.wait_for("source_applied");
    let line = agent.wait_line(|l| l.contains("\"event\":\"started\""));
    assert!(
        line.contains(&format!("backend sets from file {}", path.display())),
        "{line}"
    );
    let audit = audit_lines(&inst, &path);
    assert_eq!(audit.len(), 2, "one apply per service: {audit:?}");

    // A hand edit of a service the file owns is warned about.
    let out = Command::new(workspace_bin("weir"))
        .args(["--instance", inst.name(), "backend", "weight"])
        .args([&SVC.to_string(), "198.18.1.2:80", "5"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "service {SVC} is owned by source file {}; your change will be overwritten at its \
             next revision",
            path.display()
        )),
        "{stderr}"
    );
    wait_active(&inst, SVC, &["198.18.1.2:80@5", "198.18.1.3:80@3"]);

    // The next revision wins: reweighted, one added, one removed.
    replace(
        &path,
        &file_text(&[
            (SVC, &["198.18.1.2:80@2", "198.18.1.4:80"]),
            (OTHER, &["198.18.2.2:80"]),
        ]),
    );
    wait_active(&inst, SVC, &["198.18.1.2:80@2", "198.18.1.4:80@1"]);
    assert_eq!(active(&inst, OTHER), ["198.18.2.2:80@1"]);
    wait_reports(port, &path, "applied", 2);
    assert_eq!(stale(port, &path), 0);
    let audit = audit_lines(&inst, &path);
    assert!(
        audit.iter().any(|l| l.contains(" rev 2 ")),
        "the second revision is named in the audit log: {audit:?}"
    );
}

#[test]
fn a_file_written_in_two_steps_applies_only_whole() {
    require_root();
    let (inst, path, _agent, port, _dir) =
        started("dfpart", &file_text(&[(SVC, &["198.18.1.2:80"])]));
    wait_active(&inst, SVC, &["198.18.1.2:80@1"]);

    let whole = file_text(&[
        (SVC, &["198.18.1.2:80", "198.18.1.3:80"]),
        (OTHER, &["198.18.2.2:80"]),
    ]);
    // The first half alone is valid TOML naming SVC only: read within the
    // debounce, it would drop OTHER's update.
    let (first, rest) = whole.split_at(whole.find("[[service]]\nservice = \"198.19.0.91").unwrap());
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(first.as_bytes()).unwrap();
    f.flush().unwrap();
    std::thread::sleep(Duration::from_millis(80));
    f.write_all(rest.as_bytes()).unwrap();
    drop(f);
    wait_active(&inst, OTHER, &["198.18.2.2:80@1"]);
    assert_eq!(active(&inst, SVC), ["198.18.1.2:80@1", "198.18.1.3:80@1"]);
    wait_reports(port, &path, "applied", 2);
    assert_eq!(
        reports(port, &path, "applied"),
        2,
        "the two writes were read once"
    );

    // A half that stays half long past the debounce is refused at its
    // line; the rest, when it comes, applies.
    let whole = file_text(&[(SVC, &["198.18.1.2:80", "198.18.1.3:80", "198.18.1.6:80"])]);
    let (first, rest) = whole.split_at(whole.find("198.18.1.6").unwrap() + 4);
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(first.as_bytes()).unwrap();
    f.flush().unwrap();
    wait_reports(port, &path, "refused", 1);
    assert_eq!(stale(port, &path), 1);
    assert_eq!(active(&inst, SVC), ["198.18.1.2:80@1", "198.18.1.3:80@1"]);
    f.write_all(rest.as_bytes()).unwrap();
    drop(f);
    wait_active(
        &inst,
        SVC,
        &["198.18.1.2:80@1", "198.18.1.3:80@1", "198.18.1.6:80@1"],
    );
    assert_eq!(stale(port, &path), 0);
}

#[test]
fn a_deleted_or_truncated_file_keeps_the_last_state_and_is_counted() {
    require_root();
    let (inst, path, agent, port, _dir) = started(
        "dfgone",
        &file_text(&[(SVC, &["198.18.1.2:80", "198.18.1.3:80"])]),
    );
    wait_active(&inst, SVC, &["198.18.1.2:80@1", "198.18.1.3:80@1"]);
    let audit = audit_lines(&inst, &path).len();

    std::fs::File::create(&path).unwrap();
    wait_reports(port, &path, "empty", 1);
    assert_eq!(stale(port, &path), 1);
    agent.wait_for("source_empty");
    std::fs::remove_file(&path).unwrap();
    wait_reports(port, &path, "empty", 2);
    assert_eq!(active(&inst, SVC), ["198.18.1.2:80@1", "198.18.1.3:80@1"]);
    assert_eq!(audit_lines(&inst, &path).len(), audit, "nothing applied");
    let log = agent.log();
    assert!(
        log.contains(&format!("{} is empty", path.display())),
        "{log}"
    );
    assert!(
        log.contains(&format!("{} is gone", path.display())),
        "{log}"
    );

    replace(&path, &file_text(&[(SVC, &["198.18.1.2:80"])]));
    wait_active(&inst, SVC, &["198.18.1.2:80@1"]);
    assert_eq!(stale(port, &path), 0);
}

#[test]
fn bad_syntax_is_refused_with_file_and_line_and_nothing_changes() {
    require_root();
    let (inst, path, agent, port, _dir) =
        started("dfbad", &file_text(&[(SVC, &["198.18.1.2:80"])]));
    wait_active(&inst, SVC, &["198.18.1.2:80@1"]);

    // Line 5: a backend that is not an address; OTHER, valid, must not
    // apply either.
    replace(
        &path,
        &file_text(&[
            (SVC, &["198.18.1.2:80", "198.18.1.x:80"]),
            (OTHER, &["198.18.2.2:80"]),
        ]),
    );
    wait_reports(port, &path, "refused", 1);
    let line = agent.wait_line(|l| l.contains("\"event\":\"source_refused\""));
    assert!(
        line.contains(&format!("{}:5:", path.display())) && line.contains("198.18.1.x"),
        "{line}"
    );
    assert_eq!(active(&inst, SVC), ["198.18.1.2:80@1"]);
    assert_eq!(active(&inst, OTHER), Vec::<String>::new());
    assert_eq!(stale(port, &path), 1);
    assert_eq!(audit_lines(&inst, &path).len(), 1);
}

#[test]
fn a_large_removal_is_refused_by_the_guard_rails_and_reported() {
    require_root();
    let four = [
        "198.18.1.2:80",
        "198.18.1.3:80",
        "198.18.1.4:80",
        "198.18.1.5:80",
    ];
    let (inst, path, agent, port, _dir) = started(
        "dfguard",
        &file_text(&[(SVC, &four), (OTHER, &["198.18.2.2:80"])]),
    );
    let all = [
        "198.18.1.2:80@1",
        "198.18.1.3:80@1",
        "198.18.1.4:80@1",
        "198.18.1.5:80@1",
    ];
    wait_active(&inst, SVC, &all);
    wait_active(&inst, OTHER, &["198.18.2.2:80@1"]);

    // Three of four removed is more than the default half; OTHER's change
    // in the same revision does not apply either.
    replace(
        &path,
        &file_text(&[(SVC, &["198.18.1.2:80"]), (OTHER, &["198.18.2.3:80"])]),
    );
    wait_reports(port, &path, "guard", 1);
    let line = agent.wait_line(|l| l.contains("\"outcome\":\"guard\""));
    assert!(
        line.contains("guard rails") && line.contains(&SVC.to_string()),
        "{line}"
    );
    assert_eq!(active(&inst, SVC), all);
    assert_eq!(active(&inst, OTHER), ["198.18.2.2:80@1"]);
    assert_eq!(stale(port, &path), 1);
}

#[test]
fn a_file_source_in_a_missing_directory_is_refused_at_start() {
    require_root();
    let inst = instance("dfnodir");
    let dir = Dir(temp_dir(inst.name()));
    let path = dir.0.join("missing").join("backends.toml");
    let (mut agent, _port) = agent(&inst, &dir.0, &path);
    let status = agent.child.wait().unwrap();
    assert!(!status.success());
    let log = agent.log();
    assert!(
        log.contains(&format!("starting the source {}", path.display()))
            && log.contains(&format!("watching {}", dir.0.join("missing").display())),
        "{log}"
    );
}
