//! `cargo xtask deps|build|test|demo|bench`: the developer and CI entry points.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "weir developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing Debian packages (as root) or list them.
    Deps,
    /// Build everything (the BPF objects are built by weir-ebpf's build.rs).
    Build,
    /// Format check, clippy, and every test, including the root/namespace ones.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the demo: an L4 service through XDP, changed live under traffic.
    Demo,
    /// Benchmark weir against HAProxy and nginx (release build); writes
    /// JSON, Markdown and SVG under bench/results/.
    Bench {
        /// steady, push, idle, bigconn, connrate, storm, churn, propagate,
        /// discover, drain, failure, l4, micro (all if none).
        scenarios: Vec<String>,
        /// Small sizes, every scenario in a few minutes (what CI runs).
        #[arg(long)]
        quick: bool,
    },
}

/// Debian packages weir needs to build and test, with a file each provides.
const PACKAGES: &[(&str, &str)] = &[
    ("clang", "/usr/bin/clang"),
    ("llvm", "/usr/bin/llvm-objdump"),
    ("libbpf-dev", "/usr/include/bpf/bpf_helpers.h"),
    ("linux-libc-dev", "/usr/include/linux/bpf.h"),
    ("libc6-dev", "/usr/include/x86_64-linux-gnu/asm/types.h"),
    ("iproute2", "/usr/bin/ip"),
    ("ethtool", "/usr/sbin/ethtool"),
    ("util-linux", "/usr/bin/nsenter"),
    ("procps", "/usr/sbin/sysctl"),
    // etcd-client's build generates its gRPC code with protoc.
    ("protobuf-compiler", "/usr/bin/protoc"),
    // The etcd discovery tests run a real cluster and write through etcdctl.
    ("etcd-server", "/usr/bin/etcd"),
    ("etcd-client", "/usr/bin/etcdctl"),
];

/// What the benchmark adds: the peers it measures weir against.
const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("haproxy", "/usr/sbin/haproxy"),
    ("nginx-light", "/usr/sbin/nginx"),
];

fn main() -> Result<()> {
    let cli = Cli::parse();
    if Command::new("cargo").arg("--version").output().is_err()
        && std::env::var_os("CARGO").is_none()
    {
        bail!("cargo is not on PATH: weir needs the Rust 1.95 toolchain (rustup) installed");
    }
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.task {
        Task::Deps => deps(PACKAGES),
        Task::Build => {
            deps(PACKAGES)?;
            cargo(&["build", "--workspace", "--all-targets"])
        }
        Task::Test { args } => {
            deps(PACKAGES)?;
            require_root("the tests attach XDP and build network namespaces")?;
            cargo(&["fmt", "--all", "--check"])?;
            cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])?;
            cargo(&["build", "--workspace", "--all-targets"])?;
            let mut test = vec!["test", "--workspace", "--"];
            test.extend(args.iter().map(String::as_str));
            cargo_test(&test)
        }
        Task::Bench { scenarios, quick } => {
            deps(PACKAGES)?;
            deps(BENCH_PACKAGES)?;
            require_root("the bench builds network namespaces and attaches XDP")?;
            cargo(&["build", "--release", "--workspace", "--bins"])?;
            let bench = root.join("target/release/weir-bench");
            let mut cmd = Command::new(&bench);
            cmd.args(&scenarios);
            if quick {
                cmd.arg("--quick");
            }
            run(&mut cmd)
        }
        Task::Demo => {
            deps(PACKAGES)?;
            require_root("the demo attaches XDP and builds network namespaces")?;
            cargo(&["build", "--workspace", "--bins"])?;
            let demo = root.join("target/debug/weir-demo");
            let status = Command::new(&demo)
                .status()
                .with_context(|| format!("running {}", demo.display()))?;
            if !status.success() {
                bail!("the demo failed ({status})");
            }
            Ok(())
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn is_root() -> bool {
    // std has no geteuid; /proc tells the effective uid.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

fn require_root(why: &str) -> Result<()> {
    if !is_root() {
        bail!("run as root: {why}");
    }
    Ok(())
}

fn deps(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, f)| !Path::new(f).exists())
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages: {}; install them with `apt-get install {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    run(Command::new(cargo).args(args))
}

/// What the test binaries reported, summed over every `test result:` line.
#[derive(Debug, Default, PartialEq)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
    /// Names of the tests that were ignored: weir's tests skip none.
    ignored_names: Vec<String>,
}

impl Tally {
    /// Takes one line of libtest's output.
    fn read(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(['.', ';']) {
                let mut words = part.split_whitespace();
                let (Some(n), Some(what)) = (words.next(), words.next()) else {
                    continue;
                };
                let Ok(n) = n.parse::<u64>() else { continue };
                match what {
                    "passed" => self.passed += n,
                    "failed" => self.failed += n,
                    "ignored" => self.ignored += n,
                    _ => {}
                }
            }
        } else if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" ... ignored"))
        {
            self.ignored_names.push(name.to_string());
        } else if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|l| l.split_once(" ... ignored, "))
        {
            self.ignored_names.push(name.0.to_string());
        }
    }
}

/// Runs `cargo test`, passing its output through, and prints how many tests
/// ran, failed and were skipped. Any skipped test fails the run: a test
/// that needs root fails without it rather than skip, so a skip is a defect.
fn cargo_test(args: &[&str]) -> Result<()> {
    use std::io::{BufRead, BufReader, Write};

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    let mut child = Command::new(cargo)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let mut tally = Tally::default();
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        tally.read(&line);
        writeln!(out, "{line}")?;
    }
    drop(out);
    let status = child.wait().context("waiting for cargo test")?;
    println!(
        "tests: {} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.ignored
    );
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    if tally.ignored > 0 {
        bail!(
            "{} test(s) skipped ({}); weir's tests skip none: remove the #[ignore]",
            tally.ignored,
            tally.ignored_names.join(", ")
        );
    }
    if tally.passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn tally_sums_every_binary_and_names_skips() {
        let mut t = Tally::default();
        for line in [
            "running 3 tests",
            "test a ... ok",
            "test slow ... ignored",
            "test other ... ignored, needs a GPU",
            "test result: ok. 2 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.01s",
            "test result: FAILED. 5 passed; 1 failed; 0 ignored; 0 measured; 3 filtered out; finished in 1.00s",
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s",
        ] {
            t.read(line);
        }
        assert_eq!((t.passed, t.failed, t.ignored), (7, 1, 2));
        assert_eq!(t.ignored_names, ["slow", "other"]);
    }
}
