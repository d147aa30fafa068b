//! The `weir` binary on bad input of every kind: a non-zero exit, one clear
//! line on stderr, and no change to the registry.

use std::process::{Command, Output};

use weir::l7::config::ConfigBuilder;

const WEIR: &str = env!("CARGO_BIN_EXE_weir");
const SVC: &str = "198.19.0.30:8080";

/// Fails the calling test unless it runs as root: a skipped test would
/// report ok without having checked anything.
fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() == 0 };
    assert!(
        root,
        "this test needs root (BPF maps, XDP): run `cargo xtask test` as root"
    );
}

struct Inst(String);

impl Inst {
    fn new(tag: &str) -> Self {
        Self(format!("cli{}{tag}", std::process::id()))
    }

    fn weir(&self, args: &[&str]) -> Output {
        Command::new(WEIR)
            .arg("--instance")
            .arg(&self.0)
            .args(args)
            .output()
            .expect("run weir")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.weir(args);
        assert!(
            out.status.success(),
            "weir {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Registry contents and generation, as the CLI shows them.
    fn snapshot(&self) -> (String, u64) {
        let backends = self.ok(&["--json", "backend", "list", SVC]);
        let stats: serde_json::Value =
            serde_json::from_str(&self.ok(&["--json", "stats"])).unwrap();
        (backends, stats["generation"].as_u64().unwrap())
    }
}

impl Drop for Inst {
    fn drop(&mut self) {
        let _ = Command::new(WEIR)
            .args(["--instance", &self.0, "destroy"])
            .output();
        // `destroy` keeps the audit log; a throwaway instance leaves nothing.
        let _ = std::fs::remove_dir_all(format!("/var/lib/weir/{}", self.0));
    }
}

fn assert_one_line_error(out: &Output, expect: &str, what: &str) {
    assert!(!out.status.success(), "{what}: exit status {}", out.status);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{what}: one line, got {err:?}"
    );
    assert!(
        err.to_lowercase().contains(&expect.to_lowercase()),
        "{what}: {err:?} lacks {expect:?}"
    );
}

#[test]
fn bad_input_is_refused_with_one_line_and_changes_nothing() {
    require_root();
    let inst = Inst::new("bad");
    inst.ok(&[
        "--flows",
        "4096",
        "service",
        "add",
        SVC,
        "--min-backends",
        "3",
    ]);
    inst.ok(&[
        "backend",
        "set",
        SVC,
        "198.18.50.1",
        "198.18.50.2",
        "198.18.50.3@2",
    ]);
    let before = inst.snapshot();

    let cases: &[(&[&str], &str)] = &[
        (
            &["backend", "add", "198.19.0.99:80", "198.18.50.9:80"],
            "no service 198.19.0.99:80",
        ),
        (
            &["backend", "set", SVC, "198.18.50.1", "198.18.50.1@3"],
            "listed twice",
        ),
        (&["backend", "add", SVC, "198.18.50.1"], "already active"),
        (
            &[
                "service",
                "add",
                "198.19.0.31:80",
                "--panic-threshold",
                "1.5",
            ],
            "panic-threshold 1.5 must be between 0 and 1",
        ),
        (
            &["backend", "add", SVC, "backend-host"],
            "not an IPv4 address",
        ),
        (&["backend", "add", SVC, "198.18.50.9:0"], "port"),
        (
            &["backend", "add", SVC, "198.18.50.9:9000"],
            "must be the service port",
        ),
        (
            &["backend", "add", SVC, "127.0.0.1"],
            "not a unicast address",
        ),
        (
            &["backend", "add", SVC, "198.18.50.9", "--weight", "0"],
            "weight",
        ),
        (
            &["backend", "weight", SVC, "198.18.50.1", "70000"],
            "weight",
        ),
        (&["backend", "drain", SVC, "198.18.50.99"], "no backend"),
        (&["backend", "set", SVC, "198.18.50.1"], "refusing"),
        (
            &["backend", "remove", SVC, "198.18.50.1"],
            "refusing to leave 2",
        ),
        (&["service", "add", "300.1.1.1:80"], "not an IPv4 address"),
        (&["service", "add", "198.19.0.31"], "VIP:PORT"),
        (&["service", "add", SVC], "exists already"),
        (
            &["service", "add", "198.19.0.31:80", "--ring-size", "1000"],
            "prime",
        ),
        (
            &[
                "service",
                "add",
                "198.19.0.31:80",
                "--max-remove-fraction",
                "1.5",
            ],
            "between 0 and 1",
        ),
        (&["service", "remove", SVC], "still has 3 backend"),
        (&["detach", "--dev", "lo"], "not attached"),
        (
            &["attach", "--dev", "nosuchdev0", "--lb-addr", "198.18.2.2"],
            "no network interface",
        ),
        (&["decap", "detach", "--dev", "lo"], "not attached"),
        (
            &["decap", "attach", "--dev", "lo", "--vip", "198.19.0.10"],
            "--from",
        ),
        (
            &[
                "decap",
                "attach",
                "--dev",
                "lo",
                "--vip",
                "198.19.0.10",
                "--from",
                "198.18.2.2/24",
            ],
            "host bits",
        ),
        (
            &[
                "decap",
                "revoke",
                "--vip",
                "198.19.0.10",
                "--from",
                "198.18.2.2",
            ],
            "has no decapsulator",
        ),
        (&["--instance", "../etc", "service", "list"], "invalid"),
        (
            &["--instance", "nosuchinstance", "service", "list"],
            "does not exist",
        ),
        (&["backend", "frobnicate"], "unrecognized subcommand"),
    ];
    for (args, expect) in cases {
        let out = if args[0] == "--instance" {
            Command::new(WEIR).args(*args).output().unwrap()
        } else {
            inst.weir(args)
        };
        assert_one_line_error(&out, expect, &format!("weir {args:?}"));
        assert_eq!(
            inst.snapshot(),
            before,
            "weir {args:?} changed the registry"
        );
    }

    // Forwarding off: a fresh network namespace has it off.
    let out = Command::new("unshare")
        .args([
            "-n",
            WEIR,
            "--instance",
            &inst.0,
            "attach",
            "--dev",
            "lo",
            "--lb-addr",
            "198.18.2.2",
        ])
        .output()
        .unwrap();
    assert_one_line_error(&out, "forwarding is off", "attach with forwarding off");
    let script = format!(
        "sysctl -qw net.ipv4.conf.lo.forwarding=1 && exec {WEIR} --instance {} attach --dev lo --lb-addr 198.18.2.2",
        inst.0
    );
    let out = Command::new("unshare")
        .args(["-n", "sh", "-c", &script])
        .output()
        .unwrap();
    assert_one_line_error(&out, "accept_local is off", "attach with accept_local off");

    // Not root.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            WEIR,
            "--instance",
            &inst.0,
            "backend",
            "list",
            SVC,
        ])
        .output()
        .unwrap();
    assert_one_line_error(&out, "must run as root", "not root");

    // No bpffs: in a private mount namespace without it, weir mounts a fresh
    // (empty) one and says the instance is not there.
    let script = format!(
        "umount /sys/fs/bpf && exec {WEIR} --instance {} backend list {SVC}",
        inst.0
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    assert_one_line_error(&out, "does not exist", "no bpffs");
    assert_eq!(inst.snapshot(), before);
}

#[test]
fn set_prints_the_diff_and_dry_run_applies_nothing() {
    require_root();
    let inst = Inst::new("diff");
    inst.ok(&["--flows", "4096", "service", "add", SVC]);
    inst.ok(&["backend", "set", SVC, "198.18.51.1", "198.18.51.2"]);
    let before = inst.snapshot();
    let out = inst.ok(&[
        "backend",
        "set",
        SVC,
        "198.18.51.2@3",
        "198.18.51.3",
        "--dry-run",
    ]);
    assert!(
        out.contains("+ 198.19.0.30:8080 backend 198.18.51.3:8080 weight 1"),
        "{out}"
    );
    assert!(out.contains("198.18.51.2:8080: weight 1 -> 3"), "{out}");
    assert!(out.contains("198.18.51.1:8080: active -> removed"), "{out}");
    assert!(out.contains("dry run"), "{out}");
    assert_eq!(inst.snapshot(), before);

    let out = inst.ok(&["backend", "set", SVC, "198.18.51.2@3", "198.18.51.3"]);
    assert!(out.contains("applied (generation"), "{out}");
    let list: serde_json::Value =
        serde_json::from_str(&inst.ok(&["--json", "backend", "list", SVC])).unwrap();
    let states: Vec<(String, String, u64)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["backend"].as_str().unwrap().into(),
                b["state"].as_str().unwrap().into(),
                b["ring_slots"].as_u64().unwrap(),
            )
        })
        .collect();
    // The leaver carries no flow, so the same command freed its slot.
    assert!(out.contains("198.18.51.1:8080 freed"), "{out}");
    assert_eq!(states.len(), 2, "{states:?}");
    assert_eq!(states[0].0, "198.18.51.2:8080");
    assert_eq!(states[1].0, "198.18.51.3:8080");
    let (a, b) = (states[0].2 as f64, states[1].2 as f64);
    assert!((a / b - 3.0).abs() < 0.03, "weights 3:1 give slots {a}:{b}");
    inst.ok(&["check"]);
}

#[test]
fn attach_and_detach_pin_and_unpin_the_link() {
    require_root();
    let inst = Inst::new("attach");
    // Pins are named <kind>-<netns>-<ifindex>-<mode>-<device>.
    let links = format!("/sys/fs/bpf/weir/{}/links", inst.0);
    // In a throwaway network namespace: attach to its loopback, twice, then
    // detach twice; report each step's exit code and whether the pin exists.
    let _ = std::fs::remove_file(format!("/tmp/weir-attach-{}.err", inst.0));
    let script = format!(
        "set -u; sysctl -qw net.ipv4.conf.lo.forwarding=1 net.ipv4.conf.lo.accept_local=1; ip link set lo up; \
         w() {{ {WEIR} --instance {i} \"$@\" >/dev/null 2>>/tmp/weir-attach-{i}.err; echo \"$? $(ls {links} 2>/dev/null | grep -q -- '^xdp-.*-lo$' && echo pinned || echo none) $(ip link show lo | grep -c 'prog/xdp')\"; }}; \
         w attach --dev lo --lb-addr 198.18.2.2 --mode generic; \
         w attach --dev lo --lb-addr 198.18.2.2 --mode generic; \
         ip link add v0 type veth peer name v1; ip link set v0 up; \
         sysctl -qw net.ipv4.conf.v0.forwarding=1 net.ipv4.conf.v0.accept_local=1; \
         w attach --dev v0 --lb-addr 198.18.2.9 --mode generic; \
         w detach --dev lo; \
         w detach --dev lo",
        i = inst.0
    );
    let out = Command::new("unshare")
        .args(["-n", "sh", "-c", &script])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let steps: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        steps.len(),
        5,
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(steps[0][..2], ["0", "pinned"], "attach: {text}");
    assert_eq!(steps[0].last(), Some(&"1"), "program on lo: {text}");
    assert_eq!(
        steps[1][..2],
        ["1", "pinned"],
        "second attach refused: {text}"
    );
    assert_eq!(
        steps[2][..2],
        ["1", "pinned"],
        "another LB address on a second device refused: {text}"
    );
    assert_eq!(steps[3][..2], ["0", "none"], "detach unpins: {text}");
    assert_eq!(steps[3].last(), Some(&"0"), "program gone from lo: {text}");
    assert_eq!(
        steps[4][..2],
        ["1", "none"],
        "second detach refused: {text}"
    );
    let err =
        std::fs::read_to_string(format!("/tmp/weir-attach-{}.err", inst.0)).unwrap_or_default();
    let errors: Vec<&str> = err.lines().collect();
    assert_eq!(errors.len(), 3, "one line per refusal: {err}");
    assert!(errors[0].contains("already attached to lo"), "{err}");
    assert!(
        errors[1].contains("already encapsulates from 198.18.2.2"),
        "{err}"
    );
    assert!(errors[2].contains("not attached to lo"), "{err}");
    let _ = std::fs::remove_file(format!("/tmp/weir-attach-{}.err", inst.0));
}

#[test]
fn config_default_prints_a_valid_config_and_check_reports_line_and_reason() {
    let out = Command::new(WEIR)
        .args(["config", "default"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let dir = std::env::temp_dir().join(format!("weir-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, &out.stdout).unwrap();
    let check = Command::new(WEIR)
        .args(["config", "check"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let bad = dir.join("bad.toml");
    let text = String::from_utf8(out.stdout)
        .unwrap()
        .replace("idle = \"5m\"", "idle = \"five minutes\"");
    let line = text.lines().position(|l| l.starts_with("idle =")).unwrap() + 1;
    std::fs::write(&bad, text).unwrap();
    let check = Command::new(WEIR)
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_one_line_error(&check, &format!("bad.toml:{line}:"), "bad config");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `weir config default --agent` prints a configuration `config check
/// --agent` and the agent accept; a bad one is refused at its line.
#[test]
fn the_agents_default_config_checks_and_a_bad_one_names_its_line() {
    let out = Command::new(WEIR)
        .args(["config", "default", "--agent"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("[[check]]"), "{text}");
    let good = write_config("agent-good", &text);
    let check = Command::new(WEIR)
        .args(["--json", "config", "check", "--agent"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&check.stdout).trim(),
        r#"{"checks":1,"ok":true}"#
    );
    let bad_text = text.replace("rise = 2", "rise = 0");
    let line = bad_text
        .lines()
        .position(|l| l.starts_with("rise ="))
        .unwrap()
        + 1;
    let bad = write_config("agent-bad", &bad_text);
    let check = Command::new(WEIR)
        .args(["config", "check", "--agent"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_one_line_error(&check, &format!("weir.toml:{line}:"), "bad agent config");
    let err = String::from_utf8_lossy(&check.stderr);
    assert!(err.contains("check.rise = 0: must be 1..=100"), "{err}");
    for path in [good, bad] {
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}

/// The registry refuses what cannot work: a VIP nobody can send to, a
/// backend that is the service itself, a ring too small for one backend;
/// IPv6 is named as IPv6.
#[test]
fn the_registry_refuses_loops_unusable_vips_and_tiny_rings() {
    require_root();
    let inst = Inst::new("vip");
    inst.ok(&["--flows", "4096", "service", "add", SVC]);
    inst.ok(&["backend", "set", SVC, "198.18.52.1"]);
    let before = inst.snapshot();
    let cases: &[(&[&str], &str)] = &[
        (
            &["service", "add", "0.0.0.0:80"],
            "VIP 0.0.0.0 is unspecified",
        ),
        (
            &["service", "add", "0.0.0.0:80", "--mode", "l7"],
            "VIP 0.0.0.0 is unspecified",
        ),
        (&["service", "add", "224.0.0.1:80"], "multicast"),
        (&["service", "add", "255.255.255.255:80"], "broadcast"),
        (&["service", "add", "127.0.0.1:80"], "loopback"),
        (&["service", "add", "[::1]:80"], "\"[::1]:80\" is IPv6"),
        (
            &["backend", "add", SVC, "[::1]:8080"],
            "\"[::1]:8080\" is IPv6",
        ),
        (
            &["backend", "add", SVC, "198.19.0.30"],
            "is the service 198.19.0.30:8080 itself",
        ),
        (
            &["service", "add", "198.19.0.31:80", "--ring-size", "97"],
            "between 101",
        ),
    ];
    for (args, expect) in cases {
        let out = inst.weir(args);
        assert_one_line_error(&out, expect, &format!("weir {args:?}"));
        assert_eq!(
            inst.snapshot(),
            before,
            "weir {args:?} changed the registry"
        );
    }
    // Loopback is where `weir run` serves L7.
    inst.ok(&["service", "add", "127.0.0.1:18080", "--mode", "l7"]);
    // The smallest ring holds one backend; the advice for two names the
    // smallest ring that fits, not the 65537 default.
    inst.ok(&["service", "add", "198.19.0.32:80", "--ring-size", "101"]);
    inst.ok(&["backend", "add", "198.19.0.32:80", "198.18.52.1"]);
    let out = inst.weir(&["backend", "add", "198.19.0.32:80", "198.18.52.2"]);
    assert_one_line_error(&out, "--ring-size (at least 211)", "second backend");
}

/// `weir destroy` removes the maps but keeps the audit log.
#[test]
fn destroy_keeps_the_audit_log() {
    require_root();
    let inst = Inst::new("audit");
    inst.ok(&["--flows", "4096", "service", "add", SVC]);
    let log = std::path::Path::new("/var/lib/weir")
        .join(&inst.0)
        .join("audit.log");
    let before = std::fs::read_to_string(&log).expect("audit log written");
    assert!(before.contains("service"), "{before}");
    let out = inst.ok(&["destroy"]);
    assert!(out.contains("audit log stays at"), "{out}");
    assert!(!std::path::Path::new(&format!("/sys/fs/bpf/weir/{}", inst.0)).exists());
    assert_eq!(std::fs::read_to_string(&log).unwrap(), before);
    // A destroyed instance is gone for every command.
    let out = inst.weir(&["service", "list"]);
    assert_one_line_error(&out, "does not exist", "list after destroy");
}

/// Runs `weir args` and waits at most 20 s: a `weir run` that should have
/// been refused but serves is killed, and the test fails on its output.
fn weir_bounded(args: &[&str]) -> Output {
    let mut child = Command::new(WEIR)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run weir");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn write_config(tag: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("weir-cli-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("weir.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Out-of-range values are refused by `config check` and `weir run` alike,
/// naming the file, the line, the key and the allowed range.
#[test]
fn config_check_and_run_bound_every_value() {
    let text = "[runtime]\nworkers = 100000\n[[listener]]\nlisten = \"127.0.0.1:1\"\n\
                [[listener.route]]\nservice = \"198.19.0.30:8080\"\n";
    let path = write_config("bounds", text);
    let want = format!(
        "{}:2:11: runtime.workers = 100000: must be 0..=1024",
        path.display()
    );
    for args in [&["config", "check"][..], &["run", "--config"][..]] {
        let mut args = args.to_vec();
        args.push(path.to_str().unwrap());
        let out = weir_bounded(&args);
        assert_one_line_error(&out, &want, &format!("weir {args:?}"));
    }
    // For a log shipper, the refusal is one JSON object at level ERROR.
    let out = weir_bounded(&[
        "run",
        "--log-format",
        "json",
        "--config",
        path.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let line: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON line");
    assert_eq!(line["level"], "ERROR", "{line}");
    assert_eq!(line["event"], "refused", "{line}");
    let message = line["message"].as_str().unwrap_or_default();
    assert!(message.starts_with(&want), "{line}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
    // Fractional durations are durations.
    let path = write_config(
        "fraction",
        &text.replace(
            "workers = 100000",
            "workers = 1\n[timeouts]\nidle = \"1.5s\"",
        ),
    );
    let out = Command::new(WEIR)
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// A bad `[outlier]` table is refused by `config check` and at the start of
/// `weir run` alike, with the file, the line and the reason.
#[test]
fn config_check_and_run_refuse_a_bad_outlier_table() {
    let listener = "[[listener]]\nlisten = \"127.0.0.1:1\"\n[[listener.route]]\n\
                    service = \"198.19.0.30:8080\"\n";
    for (tag, table, want) in [
        (
            "percent",
            "[outlier]\nmax_ejected_percent = 150\n",
            "2:23: outlier.max_ejected_percent = 150: must be 0..=100",
        ),
        (
            "base",
            "[outlier]\nconsecutive = 3\nbase_ejection = \"0s\"\n",
            "3:17: outlier.base_ejection = \"0s\": must be from 1ms to 24h",
        ),
        (
            "max",
            "[outlier]\nbase_ejection = \"1m\"\nmax_ejection = \"10s\"\n",
            "3:16: outlier.max_ejection = \"10s\": must be from 60s to 24h",
        ),
        (
            "count",
            "[outlier]\nconsecutive = 5000\n",
            "2:15: outlier.consecutive = 5000: must be 0..=1000 (0: off)",
        ),
        (
            "unknown",
            "[outlier]\nwindow = \"10s\"\n",
            "2:1: unknown field `window`",
        ),
    ] {
        let path = write_config(&format!("outlier-{tag}"), &format!("{table}{listener}"));
        let want = format!("{}:{want}", path.display());
        for args in [&["config", "check"][..], &["run", "--config"][..]] {
            let mut args = args.to_vec();
            args.push(path.to_str().unwrap());
            let out = weir_bounded(&args);
            assert_one_line_error(&out, &want, &format!("weir {args:?}"));
        }
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}

/// `weir run` never creates an instance (it would serve 503 to everyone
/// from an empty registry), and `--instance` never silently loses to the
/// file's `instance`.
#[test]
fn run_refuses_a_missing_instance_and_a_conflicting_flag() {
    require_root();
    // Guards: should weir run create either instance, it goes again.
    let file = Inst::new("file");
    let name = Inst::new("none");
    let path = write_config(
        "missing",
        &ConfigBuilder::new()
            .instance(&file.0)
            .listener("127.0.0.1:1".parse().unwrap())
            .route("/", SVC)
            .to_string(),
    );
    let out = weir_bounded(&[
        "--instance",
        &name.0,
        "run",
        "--config",
        path.to_str().unwrap(),
    ]);
    assert_one_line_error(
        &out,
        &format!(
            "--instance {} conflicts with instance = \"{}\" at {}:1",
            name.0,
            file.0,
            path.display()
        ),
        "conflicting --instance",
    );
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace(&file.0, &name.0)).unwrap();
    let out = weir_bounded(&["run", "--config", path.to_str().unwrap()]);
    assert_one_line_error(
        &out,
        &format!(
            "`weir --instance {} service add 198.19.0.30:8080 --mode l7`",
            name.0
        ),
        "missing instance",
    );
    for i in [&file, &name] {
        assert!(
            !std::path::Path::new(&format!("/sys/fs/bpf/weir/{}", i.0)).exists(),
            "weir run created instance {}",
            i.0
        );
    }
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// A listener that is in use: one line, the error (naming who holds it),
/// non-zero, and no "running" line before it.
#[test]
fn run_on_a_taken_port_says_one_line_and_never_running() {
    require_root();
    let inst = Inst::new("taken");
    inst.ok(&[
        "--flows",
        "4096",
        "service",
        "add",
        "127.0.0.1:18081",
        "--mode",
        "l7",
    ]);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let path = write_config(
        "taken",
        &ConfigBuilder::new()
            .workers(1)
            .buffers(64)
            .listener(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
            .route("/", "127.0.0.1:18081")
            .to_string(),
    );
    let out = weir_bounded(&[
        "--instance",
        &inst.0,
        "run",
        "--config",
        path.to_str().unwrap(),
    ]);
    assert_one_line_error(
        &out,
        &format!(
            "listener 127.0.0.1:{port} is already in use by pid {}",
            std::process::id()
        ),
        "taken port",
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("running"));
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn lists_show_intent_and_health_apart() {
    require_root();
    let inst = Inst::new("health");
    inst.ok(&[
        "--flows",
        "4096",
        "service",
        "add",
        SVC,
        "--panic-threshold",
        "0.25",
    ]);
    inst.ok(&["backend", "set", SVC, "198.18.50.1", "198.18.50.2"]);
    inst.ok(&["backend", "drain", SVC, "198.18.50.2"]);
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&inst.ok(&["--json", "backend", "list", SVC])).unwrap();
    let pairs: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["state"].as_str().unwrap(),
                r["health"].as_str().unwrap(),
                r["health_reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        pairs,
        [
            ("active", "unknown", "none"),
            ("draining", "unknown", "none")
        ]
    );
    assert!(rows[0]["health_since"].is_null(), "never checked");
    let text = inst.ok(&["backend", "list", SVC]);
    assert!(text.lines().next().unwrap().ends_with("HEALTH"), "{text}");
    let services: Vec<serde_json::Value> =
        serde_json::from_str(&inst.ok(&["--json", "service", "list"])).unwrap();
    let s = &services[0];
    assert_eq!(
        (
            &s["panic_threshold"],
            &s["panic"],
            &s["panics"],
            &s["healthy"],
            &s["in_ring"]
        ),
        (
            &serde_json::json!(0.25),
            &serde_json::json!(false),
            &serde_json::json!(0),
            &serde_json::json!(1),
            &serde_json::json!(1)
        )
    );
    let stats: serde_json::Value = serde_json::from_str(&inst.ok(&["--json", "stats"])).unwrap();
    assert_eq!(stats["services"][0]["panic"], false);
    assert_eq!(stats["services"][0]["backends"][0]["health"], "unknown");
}

/// Two hosts fed the same backends in different orders (so with other
/// backend ids) install rings with the same digest over slot → address;
/// one more backend on one of them and the digests part.
#[test]
fn check_prints_a_ring_digest_hosts_can_compare() {
    require_root();
    let (a, b) = (Inst::new("dga"), Inst::new("dgb"));
    for inst in [&a, &b] {
        inst.ok(&["--flows", "4096", "service", "add", SVC]);
    }
    a.ok(&[
        "backend",
        "set",
        SVC,
        "198.18.50.1",
        "198.18.50.2@3",
        "198.18.50.3",
    ]);
    b.ok(&["backend", "add", SVC, "198.18.50.9"]);
    b.ok(&["backend", "add", SVC, "198.18.50.3"]);
    b.ok(&["backend", "add", SVC, "198.18.50.2", "--weight", "3"]);
    b.ok(&["backend", "add", SVC, "198.18.50.1"]);
    b.ok(&["backend", "remove", SVC, "198.18.50.9", "--force"]);
    let digest = |inst: &Inst| -> (String, String) {
        let v: serde_json::Value = serde_json::from_str(&inst.ok(&["--json", "check"])).unwrap();
        assert_eq!(v["ok"], true, "{v}");
        let s = &v["services"][0];
        assert_eq!(s["service"], SVC, "{v}");
        (
            s["ring_digest"].as_str().unwrap().to_string(),
            inst.ok(&["--json", "backend", "list", SVC]),
        )
    };
    let (da, list_a) = digest(&a);
    let (db, list_b) = digest(&b);
    assert_ne!(
        list_a, list_b,
        "the hosts number their backends differently"
    );
    assert_eq!(da, db, "same addresses and weights: same ring");
    assert!(
        a.ok(&["check"]).contains(&format!("digest {da}")),
        "the text form prints it too"
    );
    b.ok(&["backend", "add", SVC, "198.18.50.4"]);
    assert_ne!(digest(&b).0, da, "another backend set: another ring");
}
