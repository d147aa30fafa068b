//! weir test bed.
//!
//! - [`agent`]: a running `weir agent` with its config, log and `/metrics`.
//! - [`etcd`]: a real 3-member etcd cluster on loopback (discovery tests).
//! - [`topology`]: network-namespace topologies (client, router, load balancer,
//!   backends) built with `ip`, torn down on drop and on SIGINT/SIGTERM.
//! - [`ecmp`]: two weir hosts behind an ECMP router; what survives when
//!   one of them leaves the route.
//! - [`weir_cli`]: the `weir` command for one throwaway instance, run in a
//!   topology's namespaces and destroyed with it.
//! - [`ws_client`]: what every WebSocket load client shares (URL, connect,
//!   how a connection ended, close handshake, hold and ready files); the
//!   bench's generator uses it too.
//! - [`wsload`]: the WebSocket load client behind the `weir-wsclient` binary,
//!   and the JSON report types tests parse.
//! - [`push`]: server push as `weir-echo` does it on request: frames on a
//!   schedule, each stamped with the time it was due.
//! - `weir-echo` (binary): WebSocket echo backend that names itself in the
//!   `x-weir-backend` response header, and pushes on request.

use std::path::{Path, PathBuf};

pub mod agent;
pub mod ecmp;
pub mod etcd;
pub mod health;
pub mod packet;
pub mod progrun;
pub mod push;
pub mod scenario;
pub mod topology;
pub mod weir_cli;
pub mod ws_client;
pub mod wsload;

/// A loopback port nothing listens on right now, for a server a test
/// starts. Taken below the kernel's ephemeral range (32768 and up by
/// default), where `bind(0)` and outgoing connections never land: a port
/// from `bind(0)` is freed at once and could be handed to a backend that
/// binds port 0, or to a client's connection, before the server binds it.
/// Ports go round a range in steps from a per-process start, so the tests
/// of one binary (threads) never pick the same one.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + start.wrapping_add(n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port in {FIRST}..{}", FIRST + SPAN)
}

/// Locates a binary built into the same target directory as the running
/// executable (a test, a bench or a binary of this workspace), e.g. `weir`,
/// `weir-echo` or `weir-wsclient`.
///
/// Looks next to the current executable and up to three directories above it
/// (a test runs from `target/<profile>/deps/`), then at `CARGO_BIN_EXE_<name>`
/// and `CARGO_TARGET_DIR`. If nothing exists, returns the most likely path
/// (`target/<profile>/<name>`) so that spawning it fails with a clear path in
/// the error.
pub fn workspace_bin(name: &str) -> PathBuf {
    let mut guess: Option<PathBuf> = None;
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(4) {
            let candidate = dir.join(name);
            if is_executable_file(&candidate) {
                return candidate;
            }
            // target/<profile>/deps -> target/<profile>
            if guess.is_none() && dir.file_name().is_some_and(|n| n != "deps") {
                guess = Some(candidate);
            }
        }
    }
    if let Some(p) = std::env::var_os(format!("CARGO_BIN_EXE_{name}")) {
        let p = PathBuf::from(p);
        if is_executable_file(&p) {
            return p;
        }
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        for profile in ["debug", "release"] {
            let candidate = PathBuf::from(&dir).join(profile).join(name);
            if is_executable_file(&candidate) {
                return candidate;
            }
        }
    }
    guess.unwrap_or_else(|| PathBuf::from(name))
}

/// A `weir-echo` on `listen` in this namespace (port 0: any), named
/// `name`; returns it once it is ready, with the address it listens on.
pub fn spawn_echo(listen: &str, name: &str) -> (std::process::Child, std::net::SocketAddr) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(workspace_bin("weir-echo"))
        .args(["--listen", listen, "--name", name])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start weir-echo");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().expect("piped"))
        .read_line(&mut line)
        .expect("weir-echo says it is ready");
    let addr = line
        .split_whitespace()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("weir-echo: expected `ready ADDR`, got {line:?}"));
    (child, addr)
}

fn is_executable_file(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Raises this process' soft RLIMIT_NOFILE towards `want`, never above the
/// hard limit nor above 20,000 (the workplace's per-process cap). Returns the
/// soft limit in force afterwards.
pub fn raise_nofile_limit(want: u64) -> u64 {
    let want = want.min(20_000);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read a properly sized struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        let target = want.min(lim.rlim_max);
        if target > lim.rlim_cur {
            let new = libc::rlimit {
                rlim_cur: target,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &new) == 0 {
                return target;
            }
        }
        lim.rlim_cur
    }
}

/// True when running as root (euid 0): the topology needs it.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Fails the calling test unless it runs as root. Tests that need BPF or
/// network namespaces never skip: a skipped test would report ok without
/// having checked anything.
pub fn require_root() {
    assert!(
        is_root(),
        "this test needs root (BPF maps and programs, network namespaces): \
         run `cargo xtask test` as root"
    );
}
