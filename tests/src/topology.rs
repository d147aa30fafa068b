//! The weir test topology: network namespaces joined through a router
//! namespace by veth pairs.
//!
//! ```text
//!  client ns                router ns                      lb ns
//!  cli0 198.18.1.2/24 ─── r-cli 198.18.1.1/24
//!  (+198.18.1.3.. extra)    r-lb  198.18.2.1/24 ─────────── lb0 198.18.2.2/24  (MTU 9000)
//!                           r-be0 198.18.10.1/24 ─┐
//!                           r-be1 198.18.11.1/24 ─┼─ ...   backend i ns
//!                           ...                   └─────── be{i} 198.18.(10+i).2/24 (MTU 9000)
//!                                                          lo: 198.19.0.10/32 (the VIP)
//!  router: 198.19.0.10/32 via 198.18.2.2 (the lb)
//! ```
//!
//! Every namespace is entered with `nsenter --net=/run/netns/NAME` (never
//! `ip netns exec`, which remounts /sys and hides /sys/fs/bpf pins). Every
//! namespace and child process is registered in a process-wide registry so
//! that [`cleanup_all`] (and the handler installed by
//! [`install_signal_cleanup`]) can tear everything down if the process is
//! interrupted; [`Topology`]'s `Drop` does the same for one topology.
//!
//! Only addresses in 198.18.0.0/15 are used, and only inside the namespaces
//! made here.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// The service address (VIP) of the topology, on every backend's `lo`.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
/// Most backends a topology can have (198.18.10.0/24 ..= 198.18.29.0/24).
pub const MAX_BACKENDS: usize = 20;
/// Most client source addresses (198.18.1.2 ..= 198.18.1.201).
pub const MAX_CLIENT_ADDRS: usize = 200;
/// Default time limit for one-shot commands ([`run_cmd`], [`Topology::run_in`]).
pub const DEFAULT_CMD_TIMEOUT: Duration = Duration::from_secs(120);

/// Time a child gets between SIGTERM and SIGKILL when a topology is dropped.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// What to build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopologySpec {
    /// Number of backend namespaces, 1..=20.
    pub backends: usize,
    /// Client source addresses (198.18.1.2, 198.18.1.3, ...), >= 1.
    pub client_addrs: usize,
}

impl Default for TopologySpec {
    fn default() -> Self {
        TopologySpec {
            backends: 2,
            client_addrs: 1,
        }
    }
}

// ---------------------------------------------------------------------------
// Process-wide registry of namespaces and child processes, for cleanup on
// signals and for best-effort cleanup calls.

struct Registry {
    namespaces: BTreeSet<String>,
    pids: BTreeSet<u32>,
    /// Commands that undo something made outside namespaces (e.g. a weir
    /// instance's pinned maps), run last.
    commands: Vec<Vec<String>>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    namespaces: BTreeSet::new(),
    pids: BTreeSet::new(),
    commands: Vec::new(),
});

/// Registers a command that [`cleanup_all`] runs (after killing children and
/// deleting namespaces), e.g. `weir --instance X destroy`.
pub fn register_cleanup_command(argv: Vec<String>) {
    registry().commands.push(argv);
}

/// Forgets a command registered with [`register_cleanup_command`] once the
/// caller has undone the thing itself.
pub fn unregister_cleanup_command(argv: &[String]) {
    registry().commands.retain(|c| c != argv);
}

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

fn register_pid(pid: u32) {
    registry().pids.insert(pid);
}

fn unregister_pid(pid: u32) {
    registry().pids.remove(&pid);
}

/// Best-effort teardown of everything this process made through this module
/// and that is still alive: SIGKILLs registered child processes and deletes
/// registered namespaces. Safe to call at any time; used by the signal
/// handler of [`install_signal_cleanup`].
pub fn cleanup_all() {
    let (pids, namespaces, commands) = {
        let mut reg = registry();
        (
            std::mem::take(&mut reg.pids),
            std::mem::take(&mut reg.namespaces),
            std::mem::take(&mut reg.commands),
        )
    };
    for pid in &pids {
        // The pid is registered until just before it is reaped, so it still
        // names our child (alive or a zombie).
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(*pid as libc::pid_t, libc::SIGKILL);
        }
    }
    for ns in &namespaces {
        let _ = delete_netns(ns);
    }
    for argv in &commands {
        if let Some((program, args)) = argv.split_first() {
            let _ = Command::new(program).args(args).output();
        }
    }
}

/// Installs (once per process) a handler thread for SIGINT, SIGTERM and SIGHUP
/// that runs [`cleanup_all`] and exits with status 130, so that an
/// interrupted test or demo leaves no namespaces or processes behind.
pub fn install_signal_cleanup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("weir-testbed: cannot install signal cleanup: {e}");
                return;
            }
        };
        let spawned = std::thread::Builder::new()
            .name("weir-testbed-signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    // Straight to fd 2: the test harness' capture of eprintln!
                    // would swallow it when we exit.
                    use std::io::Write;
                    let _ = writeln!(
                        std::io::stderr(),
                        "weir-testbed: signal {sig}: tearing down topologies"
                    );
                    cleanup_all();
                    std::process::exit(130);
                }
            });
        if let Err(e) = spawned {
            eprintln!("weir-testbed: cannot start signal thread: {e}");
        }
    });
}

/// Deletes `wt<pid>x<n>-*` namespaces left behind by processes that no
/// longer exist (e.g. a test run that was SIGKILLed), after SIGKILLing the
/// processes still running inside them (orphaned `weir-echo`s and the like:
/// only testbed code makes such namespaces). Returns the names it deleted.
/// Namespaces of live processes are never touched.
pub fn cleanup_stale_namespaces() -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return removed;
    };
    for entry in entries.flatten().take(10_000) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid_of_ns_name(&name) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(out) = run_cmd(Command::new("ip").args(["netns", "pids", &name])) {
            for p in String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse::<libc::pid_t>().ok())
                .filter(|p| *p > 1)
                .take(10_000)
            {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe {
                    libc::kill(p, libc::SIGKILL);
                }
            }
        }
        if delete_netns(&name).is_ok() {
            removed.push(name);
        }
    }
    removed
}

/// Parses `wt<pid>x<n>-<role>` and returns pid; None for any other name.
fn owner_pid_of_ns_name(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("wt")?;
    let (pid, rest) = rest.split_once('x')?;
    let (counter, role) = rest.split_once('-')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if counter.is_empty() || !counter.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let role_ok = matches!(role, "c" | "r" | "l" | "m")
        || role
            .strip_prefix('b')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if !role_ok {
        return None;
    }
    pid.parse().ok()
}

fn delete_netns(name: &str) -> Result<()> {
    run_cmd(Command::new("ip").args(["netns", "del", name]))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Commands.

/// Renders a command line for error messages.
pub fn command_line(cmd: &Command) -> String {
    let mut s = String::new();
    let parts = std::iter::once(cmd.get_program()).chain(cmd.get_args());
    for (i, part) in parts.enumerate() {
        if i > 0 {
            s.push(' ');
        }
        let p = part.to_string_lossy();
        if p.is_empty() || p.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
            let _ = write!(s, "'{}'", p.replace('\'', r"'\''"));
        } else {
            s.push_str(&p);
        }
    }
    s
}

/// Runs a command to completion (at most [`DEFAULT_CMD_TIMEOUT`]) and returns
/// its output; fails with the command line, exit status and stderr if it
/// could not start, timed out or exited non-zero.
pub fn run_cmd(cmd: &mut Command) -> Result<Output> {
    run_cmd_timeout(cmd, DEFAULT_CMD_TIMEOUT)
}

/// [`run_cmd`] with an explicit time limit; on timeout the child is killed.
pub fn run_cmd_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let out = output_timeout(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            command_line(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Runs a command to completion (bounded by `timeout`) and returns its output
/// whatever the exit status. Errors only if it cannot start or times out.
pub fn output_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", command_line(cmd)))?;
    let proc = Proc::from_child(child, command_line(cmd));
    proc.wait_output(timeout)
}

fn nsenter_cmd(ns_path: &str, program: impl AsRef<OsStr>, args: &[&str]) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={ns_path}"))
        .arg("--")
        .arg(program)
        .args(args);
    cmd
}

fn reader_thread<R: Read + Send + 'static>(mut r: R) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// True once `pid` (a child of ours) has exited; does not reap it, so its pid
/// stays ours until `wait`.
fn exited_nowait(pid: u32) -> bool {
    // SAFETY: waitid writes into a zeroed siginfo_t we own.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        if rc != 0 {
            // ECHILD: already reaped (or not ours): nothing left to wait for.
            return true;
        }
        info.si_pid() != 0
    }
}

fn send_signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; pid is our unreaped child.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Stops children: SIGTERM to all, up to `grace` for them to exit, then
/// SIGKILL; reaps all of them.
fn stop_children(children: &mut Vec<Child>, grace: Duration) -> Vec<(u32, ExitStatus)> {
    for c in children.iter() {
        if !exited_nowait(c.id()) {
            send_signal(c.id(), libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    for _ in 0..100_000 {
        if Instant::now() >= deadline || children.iter().all(|c| exited_nowait(c.id())) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut statuses = Vec::new();
    for mut c in children.drain(..) {
        let pid = c.id();
        if !exited_nowait(pid) {
            send_signal(pid, libc::SIGKILL);
        }
        unregister_pid(pid);
        if let Ok(st) = c.wait() {
            statuses.push((pid, st));
        }
    }
    statuses
}

/// A child process with captured stdout/stderr. Killed (SIGKILL) and reaped
/// on drop unless it was waited for.
pub struct Proc {
    child: Option<Child>,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    what: String,
}

impl Proc {
    fn from_child(mut child: Child, what: String) -> Proc {
        register_pid(child.id());
        let stdout = child.stdout.take().map(reader_thread);
        let stderr = child.stderr.take().map(reader_thread);
        Proc {
            child: Some(child),
            stdout,
            stderr,
            what,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Sends a signal (e.g. `libc::SIGTERM`) if the process has not exited.
    pub fn signal(&self, sig: libc::c_int) {
        if let Some(c) = &self.child
            && !exited_nowait(c.id())
        {
            send_signal(c.id(), sig);
        }
    }

    /// True once the process has exited (it is not reaped yet).
    pub fn has_exited(&self) -> bool {
        self.child.as_ref().is_none_or(|c| exited_nowait(c.id()))
    }

    /// Waits up to `timeout` for the process to exit and returns its status
    /// and captured output. On timeout it is killed and an error carrying its
    /// stderr so far is returned.
    pub fn wait_output(mut self, timeout: Duration) -> Result<Output> {
        let mut child = self.child.take().ok_or_else(|| anyhow!("already waited"))?;
        let pid = child.id();
        let deadline = Instant::now() + timeout;
        let mut timed_out = false;
        let mut sleep = Duration::from_millis(1);
        while !exited_nowait(pid) {
            if Instant::now() >= deadline {
                timed_out = true;
                send_signal(pid, libc::SIGKILL);
                break;
            }
            std::thread::sleep(sleep);
            sleep = (sleep * 2).min(Duration::from_millis(20));
        }
        unregister_pid(pid);
        let status = child
            .wait()
            .with_context(|| format!("waiting for `{}`", self.what))?;
        let stdout = self
            .stdout
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        if timed_out {
            bail!(
                "`{}` did not finish within {:?}; killed. stderr: {}",
                self.what,
                timeout,
                String::from_utf8_lossy(&stderr).trim()
            );
        }
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; returns the exit status.
    pub fn stop(mut self, grace: Duration) -> Option<ExitStatus> {
        let mut v: Vec<Child> = self.child.take().into_iter().collect();
        stop_children(&mut v, grace).pop().map(|(_, st)| st)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id();
            if !exited_nowait(pid) {
                send_signal(pid, libc::SIGKILL);
            }
            unregister_pid(pid);
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Running code inside a namespace from this process.

/// Runs `f` on a new thread whose network namespace is the one at `ns_path`
/// (`/run/netns/NAME`) and returns its result. Sockets created inside `f`
/// belong to that namespace, also after they are returned.
pub fn in_netns<T, F>(ns_path: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = ns_path.to_string();
    let handle = std::thread::Builder::new()
        .name("weir-testbed-netns".into())
        .spawn(move || -> Result<T> {
            let file = File::open(&path).with_context(|| format!("open {path}"))?;
            // SAFETY: setns on this thread only, with a valid namespace fd.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error()).context(format!("setns {path}"));
            }
            Ok(f())
        })
        .context("spawn netns thread")?;
    handle
        .join()
        .map_err(|_| anyhow!("thread in {ns_path} panicked"))?
}

fn icmp_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One ICMP echo over a raw socket in the calling thread's namespace; true if
/// a matching echo reply from `dst` arrives within `timeout`.
fn icmp_echo(dst: Ipv4Addr, timeout: Duration) -> std::io::Result<bool> {
    static SEQ: AtomicU32 = AtomicU32::new(1);
    let ident = (std::process::id() & 0xffff) as u16;
    let seq = (SEQ.fetch_add(1, Ordering::Relaxed) & 0xffff) as u16;
    // SAFETY: plain socket syscalls on an fd we own and close.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let _close = scopeguard_fd(fd);
        let mut pkt = [0u8; 24];
        pkt[0] = 8; // echo request
        pkt[4..6].copy_from_slice(&ident.to_be_bytes());
        pkt[6..8].copy_from_slice(&seq.to_be_bytes());
        pkt[8..24].copy_from_slice(b"weir-testbed-png");
        let ck = icmp_checksum(&pkt);
        pkt[2..4].copy_from_slice(&ck.to_be_bytes());
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(dst).to_be(),
            },
            sin_zero: [0; 8],
        };
        let n = libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if n < 0 {
            // e.g. ENETUNREACH: no route, so no reply.
            return Ok(false);
        }
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 1500];
        for _ in 0..10_000 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let left = deadline - now;
            let tv = libc::timeval {
                tv_sec: left.as_secs() as libc::time_t,
                tv_usec: left.subsec_micros().max(1000) as libc::suseconds_t,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
            let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Ok(false); // timeout
            }
            let pkt = &buf[..n as usize];
            if pkt.len() < 20 {
                continue;
            }
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            if pkt.len() < ihl + 8 {
                continue;
            }
            let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
            let icmp = &pkt[ihl..];
            let r_ident = u16::from_be_bytes([icmp[4], icmp[5]]);
            let r_seq = u16::from_be_bytes([icmp[6], icmp[7]]);
            if icmp[0] == 0 && src == dst && r_ident == ident && r_seq == seq {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

struct FdGuard(libc::c_int);
impl Drop for FdGuard {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe {
            libc::close(self.0);
        }
    }
}
fn scopeguard_fd(fd: libc::c_int) -> FdGuard {
    FdGuard(fd)
}

// ---------------------------------------------------------------------------
// The topology.

thread_local! {
    static FAIL_AFTER_STEPS: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Test hook: makes the next [`Topology::build`] on this thread fail after
/// `steps` successful setup commands (to test cleanup on failure).
#[doc(hidden)]
pub fn inject_build_failure_after(steps: usize) {
    FAIL_AFTER_STEPS.with(|c| c.set(Some(steps)));
}

static TOPOLOGY_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A built topology. Dropping it stops the processes spawned through it and
/// deletes its namespaces (which removes their veths).
pub struct Topology {
    /// Unique prefix of this topology's namespace names (`wt<pid>x<n>`).
    pub id: String,
    /// Client namespace (addresses 198.18.1.2.., default route via 198.18.1.1).
    pub client_ns: String,
    /// Router namespace: forwards between all links; VIP routed to the lb.
    pub router_ns: String,
    /// Load-balancer namespace (198.18.2.2, forwarding on).
    pub lb_ns: String,
    /// Backend namespaces, index i has 198.18.(10+i).2 and the VIP on lo.
    pub backend_ns: Vec<String>,
    /// The second load balancer's namespace (198.18.3.2), once
    /// [`Topology::add_second_lb`] made it.
    pub lb2_ns: Option<String>,
    spec: TopologySpec,
    created: Vec<String>,
    children: Vec<Child>,
    /// XDP links this topology attached (detached when dropped).
    xdp_links: Vec<aya::programs::links::FdLink>,
    steps: usize,
    fail_after: Option<usize>,
}

impl Topology {
    /// Builds the topology. Needs root. On failure, everything made so far is
    /// torn down before the error is returned.
    pub fn build(spec: TopologySpec) -> Result<Topology> {
        if spec.backends == 0 || spec.backends > MAX_BACKENDS {
            bail!("backends must be 1..={MAX_BACKENDS}, got {}", spec.backends);
        }
        if spec.client_addrs == 0 || spec.client_addrs > MAX_CLIENT_ADDRS {
            bail!(
                "client_addrs must be 1..={MAX_CLIENT_ADDRS}, got {}",
                spec.client_addrs
            );
        }
        let _ = cleanup_stale_namespaces();
        let n = TOPOLOGY_COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("wt{}x{}", std::process::id(), n);
        let mut topo = Topology {
            client_ns: format!("{id}-c"),
            router_ns: format!("{id}-r"),
            lb_ns: format!("{id}-l"),
            backend_ns: (0..spec.backends).map(|i| format!("{id}-b{i}")).collect(),
            lb2_ns: None,
            id,
            spec,
            created: Vec::new(),
            children: Vec::new(),
            xdp_links: Vec::new(),
            steps: 0,
            fail_after: FAIL_AFTER_STEPS.with(|c| c.take()),
        };
        // On error `topo` is dropped here, which tears down what was made.
        topo.setup()
            .with_context(|| format!("building topology {}", topo.id))?;
        Ok(topo)
    }

    /// The spec this topology was built from.
    pub fn spec(&self) -> &TopologySpec {
        &self.spec
    }

    /// All namespace names: client, router, lb, then the backends.
    pub fn namespaces(&self) -> Vec<String> {
        let mut v = vec![
            self.client_ns.clone(),
            self.router_ns.clone(),
            self.lb_ns.clone(),
        ];
        v.extend(self.backend_ns.iter().cloned());
        v.extend(self.lb2_ns.iter().cloned());
        v
    }

    /// `/run/netns/NAME`, for `nsenter --net=` or [`in_netns`].
    pub fn ns_path(&self, ns: &str) -> String {
        format!("/run/netns/{ns}")
    }

    /// Client source address `i` (0-based): 198.18.1.(2+i).
    pub fn client_addr(&self, i: usize) -> Ipv4Addr {
        assert!(
            i < self.spec.client_addrs,
            "client address {i} out of range"
        );
        Ipv4Addr::new(198, 18, 1, 2 + i as u8)
    }

    /// All client source addresses.
    pub fn client_addrs(&self) -> Vec<Ipv4Addr> {
        (0..self.spec.client_addrs)
            .map(|i| self.client_addr(i))
            .collect()
    }

    /// The client's interface (in `client_ns`).
    pub fn client_dev(&self) -> &str {
        "cli0"
    }

    /// The router's address on the client link (the client's gateway).
    pub fn client_gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 1, 1)
    }

    /// The load balancer's address: 198.18.2.2.
    pub fn lb_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 2, 2)
    }

    /// The router's address on the lb link (the lb's gateway): 198.18.2.1.
    pub fn lb_gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 2, 1)
    }

    /// The lb's interface inside `lb_ns` (attach XDP here).
    pub fn lb_dev(&self) -> &str {
        "lb0"
    }

    /// The router-side peer of the lb link (GRO on, so XDP_TX works).
    pub fn router_lb_dev(&self) -> &str {
        "r-lb"
    }

    /// The second load balancer's address: 198.18.3.2.
    pub fn lb2_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 3, 2)
    }

    /// The second load balancer's interface inside its namespace.
    pub fn lb2_dev(&self) -> &str {
        "lb1"
    }

    /// The router-side peer of the second lb link.
    pub fn router_lb2_dev(&self) -> &str {
        "r-lb1"
    }

    /// Backend `i`'s address: 198.18.(10+i).2.
    pub fn backend_addr(&self, i: usize) -> Ipv4Addr {
        assert!(i < self.spec.backends, "backend {i} out of range");
        Ipv4Addr::new(198, 18, 10 + i as u8, 2)
    }

    /// The router's address on backend `i`'s link: 198.18.(10+i).1.
    pub fn backend_gateway(&self, i: usize) -> Ipv4Addr {
        assert!(i < self.spec.backends, "backend {i} out of range");
        Ipv4Addr::new(198, 18, 10 + i as u8, 1)
    }

    /// Backend `i`'s interface inside `backend_ns[i]`.
    pub fn backend_dev(&self, i: usize) -> String {
        assert!(i < self.spec.backends, "backend {i} out of range");
        format!("be{i}")
    }

    /// The router-side peer of backend `i`'s link.
    pub fn router_backend_dev(&self, i: usize) -> String {
        format!("r-be{i}")
    }

    /// The VIP, 198.19.0.10 (on every backend's lo; routed to the lb).
    pub fn vip(&self) -> Ipv4Addr {
        VIP
    }

    fn step(&mut self, cmd: &mut Command) -> Result<Output> {
        if let Some(n) = self.fail_after
            && self.steps >= n
        {
            bail!(
                "injected failure after {n} steps (before `{}`)",
                command_line(cmd)
            );
        }
        self.steps += 1;
        run_cmd(cmd)
    }

    fn ns_step(&mut self, ns: &str, program: &str, args: &[&str]) -> Result<Output> {
        let mut cmd = nsenter_cmd(&self.ns_path(ns), program, args);
        self.step(&mut cmd)
    }

    fn ip(&mut self, ns: &str, args: &[&str]) -> Result<Output> {
        self.ns_step(ns, "ip", args)
    }

    fn sysctl(&mut self, ns: &str, settings: &[String]) -> Result<Output> {
        let mut args = vec!["-q", "-w"];
        args.extend(settings.iter().map(String::as_str));
        self.ns_step(ns, "sysctl", &args)
    }

    /// Creates a veth pair with each end directly in its namespace (the names
    /// never exist in the caller's namespace), MTU set on both ends.
    fn veth(&mut self, ns_a: &str, dev_a: &str, ns_b: &str, dev_b: &str, mtu: u32) -> Result<()> {
        let mtu = mtu.to_string();
        let mut cmd = Command::new("ip");
        cmd.args(["link", "add", dev_a, "netns", ns_a, "mtu", &mtu])
            .args(["type", "veth", "peer", "name", dev_b, "netns", ns_b, "mtu"])
            .arg(&mtu);
        self.step(&mut cmd)?;
        Ok(())
    }

    fn link_up_with_gro(&mut self, ns: &str, dev: &str, cidr: &str) -> Result<()> {
        self.ip(ns, &["addr", "add", cidr, "dev", dev])?;
        self.ip(ns, &["link", "set", dev, "up"])?;
        self.ns_step(ns, "ethtool", &["-K", dev, "gro", "on"])?;
        Ok(())
    }

    /// Creates namespace `ns` with its loopback up. It is registered before
    /// creation, so an interrupt in between still deletes it.
    fn add_namespace(&mut self, ns: &str) -> Result<()> {
        registry().namespaces.insert(ns.to_string());
        self.step(Command::new("ip").args(["netns", "add", ns]))?;
        self.created.push(ns.to_string());
        self.ip(ns, &["link", "set", "lo", "up"])?;
        Ok(())
    }

    /// A load balancer's link to the router, MTU 9000: `dev` in `ns` has
    /// 198.18.`net`.2/24, `router_dev` 198.18.`net`.1/24, the lb's default
    /// route, and forwarding on.
    fn lb_link(&mut self, ns: &str, dev: &str, router_dev: &str, net: u8) -> Result<()> {
        let router_ns = self.router_ns.clone();
        self.veth(ns, dev, &router_ns, router_dev, 9000)?;
        self.link_up_with_gro(ns, dev, &format!("198.18.{net}.2/24"))?;
        self.link_up_with_gro(&router_ns, router_dev, &format!("198.18.{net}.1/24"))?;
        let gateway = format!("198.18.{net}.1");
        self.ip(ns, &["route", "add", "default", "via", &gateway])?;
        self.sysctl(
            ns,
            &[
                "net.ipv4.ip_forward=1".into(),
                "net.ipv4.conf.all.forwarding=1".into(),
                // weir attach requires it: packets to unresolved next hops
                // go to the kernel with this host's address as source.
                "net.ipv4.conf.all.accept_local=1".into(),
            ],
        )?;
        Ok(())
    }

    fn setup(&mut self) -> Result<()> {
        let client_ns = self.client_ns.clone();
        let router_ns = self.router_ns.clone();
        let lb_ns = self.lb_ns.clone();
        let backend_ns = self.backend_ns.clone();

        for ns in self.namespaces() {
            self.add_namespace(&ns)?;
        }

        // Client link, MTU 1500.
        self.veth(&client_ns, "cli0", &router_ns, "r-cli", 1500)?;
        self.link_up_with_gro(&client_ns, "cli0", "198.18.1.2/24")?;
        // veth leaves TCP checksums to "offload" (CHECKSUM_PARTIAL) and
        // fills them in never; native XDP on the way to the lb turns the
        // skb into a bare frame and that note is lost, so the backend would
        // see a bad checksum. A real NIC computes it before the wire; here
        // the client's stack must.
        self.ns_step(&client_ns, "ethtool", &["-K", "cli0", "tx", "off"])?;
        for i in 1..self.spec.client_addrs {
            let cidr = format!("198.18.1.{}/24", 2 + i);
            self.ip(&client_ns, &["addr", "add", &cidr, "dev", "cli0"])?;
        }
        self.link_up_with_gro(&router_ns, "r-cli", "198.18.1.1/24")?;
        self.ip(
            &client_ns,
            &["route", "add", "default", "via", "198.18.1.1"],
        )?;

        self.lb_link(&lb_ns, "lb0", "r-lb", 2)?;

        // Backends, MTU 9000, VIP on lo.
        let mut router_sysctls = vec![
            "net.ipv4.ip_forward=1".to_string(),
            "net.ipv4.conf.all.forwarding=1".into(),
            "net.ipv4.conf.all.rp_filter=0".into(),
            "net.ipv4.conf.default.rp_filter=0".into(),
            "net.ipv4.conf.lo.rp_filter=0".into(),
            "net.ipv4.conf.r-cli.rp_filter=0".into(),
            "net.ipv4.conf.r-lb.rp_filter=0".into(),
        ];
        for (i, ns) in backend_ns.iter().enumerate() {
            let dev = self.backend_dev(i);
            let rdev = self.router_backend_dev(i);
            self.veth(ns, &dev, &router_ns, &rdev, 9000)?;
            self.link_up_with_gro(ns, &dev, &format!("198.18.{}.2/24", 10 + i))?;
            self.link_up_with_gro(&router_ns, &rdev, &format!("198.18.{}.1/24", 10 + i))?;
            let gw = self.backend_gateway(i).to_string();
            self.ip(ns, &["route", "add", "default", "via", &gw])?;
            self.ip(ns, &["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            self.sysctl(
                ns,
                &[
                    "net.ipv4.conf.all.rp_filter=0".into(),
                    "net.ipv4.conf.default.rp_filter=0".into(),
                    "net.ipv4.conf.lo.rp_filter=0".into(),
                    format!("net.ipv4.conf.{dev}.rp_filter=0"),
                    // DSR hygiene: never answer ARP for the VIP (on lo) on the link.
                    "net.ipv4.conf.all.arp_ignore=1".into(),
                    "net.ipv4.conf.all.arp_announce=2".into(),
                ],
            )?;
            router_sysctls.push(format!("net.ipv4.conf.{rdev}.rp_filter=0"));
        }

        // Router: forwarding, no reverse-path filtering, VIP to the lb.
        self.sysctl(&router_ns, &router_sysctls)?;
        self.ip(
            &router_ns,
            &["route", "add", &format!("{VIP}/32"), "via", "198.18.2.2"],
        )?;
        Ok(())
    }

    /// Adds a second load balancer namespace (`lb1` 198.18.3.2/24, MTU 9000,
    /// linked like the first) and routes the VIP over both with an L4 hash
    /// (`fib_multipath_hash_policy=1`), as an ECMP edge router does: each
    /// TCP connection sticks to one of them. Returns the namespace.
    pub fn add_second_lb(&mut self) -> Result<String> {
        if let Some(ns) = &self.lb2_ns {
            return Ok(ns.clone());
        }
        let ns = format!("{}-m", self.id);
        let router_ns = self.router_ns.clone();
        self.lb2_ns = Some(ns.clone());
        self.add_namespace(&ns)?;
        let (dev, router_dev) = (
            self.lb2_dev().to_string(),
            self.router_lb2_dev().to_string(),
        );
        self.lb_link(&ns, &dev, &router_dev, 3)?;
        self.sysctl(
            &router_ns,
            &[
                format!("net.ipv4.conf.{router_dev}.rp_filter=0"),
                "net.ipv4.fib_multipath_hash_policy=1".into(),
            ],
        )?;
        let (lb1, lb2) = (self.lb_addr(), self.lb2_addr());
        self.route_vip_via(&[lb1, lb2])?;
        Ok(ns)
    }

    /// Replaces the router's VIP route: over every address in `via` (ECMP),
    /// or through the one given, as a withdrawn BGP path leaves it.
    pub fn route_vip_via(&self, via: &[Ipv4Addr]) -> Result<()> {
        let vip = format!("{VIP}/32");
        let hops: Vec<String> = via.iter().map(Ipv4Addr::to_string).collect();
        let mut args = vec!["route", "replace", vip.as_str()];
        match hops.as_slice() {
            [one] => args.extend(["via", one.as_str()]),
            many => {
                for hop in many {
                    args.extend(["nexthop", "via", hop.as_str()]);
                }
            }
        }
        self.run_ok_in(&self.router_ns, "ip", &args)?;
        Ok(())
    }

    /// Lets the router's end of the lb link take native XDP_TX frames from
    /// the lb: veth queues XDP_TX frames to its peer but wakes the peer's
    /// NAPI only if the peer runs XDP itself (GRO alone leaves them in the
    /// ring until it overflows). Attaches weir's pass-through program
    /// `weir_veth_peer` there; it stays until the topology is dropped.
    pub fn attach_veth_peer_xdp(&mut self) -> Result<()> {
        let dev = self.router_lb_dev().to_string();
        let link = in_netns(
            &self.ns_path(&self.router_ns),
            move || -> Result<aya::programs::links::FdLink> {
                let mut ebpf = aya::Ebpf::load(weir_ebpf::support_object())
                    .context("loading weir_veth_peer")?;
                let prog: &mut aya::programs::Xdp = ebpf
                    .program_mut(weir_ebpf::VETH_PEER_PROGRAM)
                    .context("weir_veth_peer missing")?
                    .try_into()?;
                prog.load()?;
                let id = prog.attach(&dev, aya::programs::XdpMode::Driver)?;
                let link = prog.take_link(id)?;
                Ok(link.try_into()?)
            },
        )??;
        self.xdp_links.push(link);
        Ok(())
    }

    /// Deletes one of this topology's namespaces now (with the devices in
    /// it), e.g. to test what outlives it; teardown then skips it.
    pub fn delete_namespace(&mut self, ns: &str) -> Result<()> {
        if !self.created.iter().any(|n| n == ns) {
            bail!("{ns} is not a namespace of topology {}", self.id);
        }
        delete_netns(ns)?;
        self.created.retain(|n| n != ns);
        Ok(())
    }

    /// Sets the MTU of both ends of the lb link (9000 as built). Native XDP
    /// on a veth refuses a program without `xdp.frags` support while the
    /// peer's MTU is above about 3500 ("veth: Peer MTU is too large to set
    /// XDP"); a test loading such a program can lower it first.
    pub fn set_lb_link_mtu(&self, mtu: u32) -> Result<()> {
        let mtu = mtu.to_string();
        for (ns, dev) in [
            (&self.router_ns, self.router_lb_dev()),
            (&self.lb_ns, self.lb_dev()),
        ] {
            self.run_ok_in(ns, "ip", &["link", "set", "dev", dev, "mtu", &mtu])?;
        }
        Ok(())
    }

    /// A `Command` running `program args` inside namespace `ns` via nsenter.
    pub fn command_in(&self, ns: &str, program: impl AsRef<OsStr>, args: &[&str]) -> Command {
        nsenter_cmd(&self.ns_path(ns), program, args)
    }

    /// Runs a one-shot command inside `ns` (bounded by [`DEFAULT_CMD_TIMEOUT`])
    /// and returns its output whatever the exit status.
    pub fn run_in(&self, ns: &str, program: impl AsRef<OsStr>, args: &[&str]) -> Result<Output> {
        self.run_in_timeout(ns, program, args, DEFAULT_CMD_TIMEOUT)
    }

    /// [`Topology::run_in`] with an explicit time limit.
    pub fn run_in_timeout(
        &self,
        ns: &str,
        program: impl AsRef<OsStr>,
        args: &[&str],
        timeout: Duration,
    ) -> Result<Output> {
        output_timeout(&mut self.command_in(ns, program, args), timeout)
    }

    /// Like [`Topology::run_in`] but fails (with command line and stderr)
    /// unless the command exits 0.
    pub fn run_ok_in(&self, ns: &str, program: impl AsRef<OsStr>, args: &[&str]) -> Result<Output> {
        run_cmd(&mut self.command_in(ns, program, args))
    }

    /// Starts a long-running program inside `ns`; stdout goes to /dev/null,
    /// stderr is inherited. The child is tracked: stopped (SIGTERM, then
    /// SIGKILL) and reaped when the topology is dropped. Returns its pid.
    pub fn spawn_in(&mut self, ns: &str, program: &Path, args: &[&str]) -> Result<u32> {
        let mut cmd = self.command_in(ns, program, args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", command_line(&cmd)))?;
        let pid = child.id();
        register_pid(pid);
        self.children.push(child);
        Ok(pid)
    }

    /// Like [`Topology::spawn_in`], then waits up to `timeout` for the child
    /// to print a line starting with `ready` on stdout (as `weir-echo` does)
    /// and returns its pid and that line. Later stdout lines are copied to
    /// stderr. If the child exits or stays silent, it is killed and an error
    /// is returned.
    pub fn spawn_ready_in(
        &mut self,
        ns: &str,
        program: &Path,
        args: &[&str],
        timeout: Duration,
    ) -> Result<(u32, String)> {
        let mut cmd = self.command_in(ns, program, args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", command_line(&cmd)))?;
        let pid = child.id();
        register_pid(pid);
        let stdout = child.stdout.take();
        self.children.push(child);
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        if let Some(out) = stdout {
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if line.starts_with("ready")
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send(line);
                        continue;
                    }
                    eprintln!("[{pid}] {line}");
                }
            });
        }
        match rx.recv_timeout(timeout) {
            Ok(line) => Ok((pid, line)),
            Err(e) => {
                let status = self.stop_child(pid, Duration::from_millis(200));
                bail!(
                    "`{}` did not report ready within {timeout:?} ({e}); exit: {status:?}",
                    command_line(&cmd)
                )
            }
        }
    }

    /// Starts `weir-echo` named `b<i>` on `0.0.0.0:port` in backend `i`'s
    /// namespace and waits until it listens; returns its pid.
    pub fn start_echo(&mut self, i: usize, port: u16) -> Result<u32> {
        let ns = self.backend_ns[i].clone();
        let listen = format!("0.0.0.0:{port}");
        let name = format!("b{i}");
        let echo = crate::workspace_bin("weir-echo");
        let args = ["--listen", listen.as_str(), "--name", name.as_str()];
        let (pid, _) = self.spawn_ready_in(&ns, &echo, &args, Duration::from_secs(10))?;
        Ok(pid)
    }

    /// Starts a program inside `ns` with stdout and stderr captured, e.g.
    /// `weir-wsclient` in hold-file mode; collect with [`Proc::wait_output`].
    /// The returned [`Proc`] is owned by the caller (killed on its drop) and
    /// also covered by [`cleanup_all`].
    pub fn start_in(&self, ns: &str, program: &Path, args: &[&str]) -> Result<Proc> {
        let mut cmd = self.command_in(ns, program, args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", command_line(&cmd)))?;
        Ok(Proc::from_child(child, command_line(&cmd)))
    }

    /// Pids of the tracked children (from spawn_in / spawn_ready_in).
    pub fn child_pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// Stops one tracked child (SIGTERM, `grace`, SIGKILL), reaps it and stops
    /// tracking it. None if `pid` is not a tracked child.
    pub fn stop_child(&mut self, pid: u32, grace: Duration) -> Option<ExitStatus> {
        let pos = self.children.iter().position(|c| c.id() == pid)?;
        let mut v = vec![self.children.remove(pos)];
        stop_children(&mut v, grace).pop().map(|(_, st)| st)
    }

    /// Sends a signal to a tracked child that has not exited (e.g. SIGKILL to
    /// simulate a crashed backend). Returns false if `pid` is not tracked.
    pub fn signal_child(&self, pid: u32, sig: libc::c_int) -> bool {
        let Some(c) = self.children.iter().find(|c| c.id() == pid) else {
            return false;
        };
        if !exited_nowait(c.id()) {
            send_signal(c.id(), sig);
        }
        true
    }

    /// One ICMP echo (1 s timeout) from namespace `from_ns` to `addr`; true if
    /// answered. Equivalent to `ping -c1 -W1`, without needing iputils.
    pub fn ping(&self, from_ns: &str, addr: Ipv4Addr) -> bool {
        in_netns(&self.ns_path(from_ns), move || {
            icmp_echo(addr, Duration::from_secs(1)).unwrap_or(false)
        })
        .unwrap_or(false)
    }

    /// Tries to connect over TCP from `from_ns` to `addr` until it succeeds or
    /// `timeout` passes (e.g. to wait for a daemon to listen).
    pub fn wait_tcp(&self, from_ns: &str, addr: SocketAddr, timeout: Duration) -> bool {
        in_netns(&self.ns_path(from_ns), move || {
            let deadline = Instant::now() + timeout;
            for _ in 0..100_000 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                if TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(1))).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20).min(left));
            }
            false
        })
        .unwrap_or(false)
    }

    /// Stops tracked children and deletes the namespaces, reporting failures.
    /// Dropping the topology does the same, ignoring failures.
    pub fn teardown(mut self) -> Result<()> {
        self.teardown_inner()
    }

    fn teardown_inner(&mut self) -> Result<()> {
        stop_children(&mut self.children, STOP_GRACE);
        let mut errors = Vec::new();
        for ns in std::mem::take(&mut self.created).iter().rev() {
            if let Err(e) = delete_netns(ns) {
                errors.push(format!("{e:#}"));
            }
        }
        {
            let mut reg = registry();
            for ns in self.namespaces() {
                reg.namespaces.remove(&ns);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("teardown of {}: {}", self.id, errors.join("; "))
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Err(e) = self.teardown_inner() {
            eprintln!("weir-testbed: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ns_name_parsing() {
        assert_eq!(owner_pid_of_ns_name("wt123x4-c"), Some(123));
        assert_eq!(owner_pid_of_ns_name("wt123x4-b19"), Some(123));
        assert_eq!(owner_pid_of_ns_name("wt123x4-l"), Some(123));
        assert_eq!(owner_pid_of_ns_name("wt123x4-m"), Some(123));
        assert_eq!(owner_pid_of_ns_name("wt123x4-b"), None);
        assert_eq!(owner_pid_of_ns_name("wt123x4-q"), None);
        assert_eq!(owner_pid_of_ns_name("wtx4-c"), None);
        assert_eq!(owner_pid_of_ns_name("other"), None);
        assert_eq!(owner_pid_of_ns_name("wt12ax4-c"), None);
    }

    #[test]
    fn interface_names_fit() {
        for name in [
            "cli0", "r-cli", "lb0", "r-lb", "lb1", "r-lb1", "be19", "r-be19",
        ] {
            assert!(name.len() <= 15, "{name}");
        }
    }

    #[test]
    fn checksum_known_value() {
        // Echo request, id 1, seq 1, no payload: checksum 0xf7fd.
        let pkt = [8u8, 0, 0, 0, 0, 1, 0, 1];
        assert_eq!(icmp_checksum(&pkt), 0xf7fd);
    }

    #[test]
    fn command_line_quotes() {
        let mut c = Command::new("ip");
        c.args(["a b", "c"]);
        assert_eq!(command_line(&c), "ip 'a b' c");
    }

    #[test]
    fn output_timeout_kills() {
        let err =
            output_timeout(Command::new("sleep").arg("5"), Duration::from_millis(100)).unwrap_err();
        assert!(format!("{err:#}").contains("did not finish"), "{err:#}");
        let err = run_cmd(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("oops") && msg.contains("sh -c"), "{msg}");
    }
}
