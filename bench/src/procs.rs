//! CPU and memory of process trees, from /proc: the proxy's cost is the sum
//! over all of its processes (HAProxy's master and workers, nginx's, and
//! the old workers a reload leaves behind).

use std::collections::{BTreeMap, BTreeSet};

/// Clock ticks per second of /proc's CPU times.
fn ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// `(ppid, utime + stime ticks)` from /proc/PID/stat.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
    let ppid = f.get(1)?.parse().ok()?;
    let ut: u64 = f.get(11)?.parse().ok()?;
    let st: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, ut + st))
}

/// Whether `pid` is gone: no process, or a zombie whose every thread
/// ended (one still ending may hold its files, a daemon lock among them).
pub fn gone(pid: u32) -> bool {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count);
    threads == 0 || (threads == 1 && !running(pid))
}

/// Whether `pid` runs: it exists and has not exited (a zombie has).
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s[s.rfind(')')? + 2..].chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// Every process's children, by parent pid.
fn children_by_parent() -> BTreeMap<u32, Vec<u32>> {
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok())
                && let Some((ppid, _)) = stat(pid)
            {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    children
}

/// The children of `pid` that run (not zombies).
pub fn children(pid: u32) -> Vec<u32> {
    let mut c = children_by_parent().remove(&pid).unwrap_or_default();
    c.retain(|p| running(*p));
    c.sort_unstable();
    c
}

/// A process's command line, its arguments joined by spaces.
pub fn command_line(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    (!args.is_empty()).then(|| args.join(" "))
}

/// `roots` and all their descendants that are alive now.
pub fn tree(roots: &[u32]) -> Vec<u32> {
    let children = children_by_parent();
    let mut out = BTreeSet::new();
    let mut todo: Vec<u32> = roots
        .iter()
        .copied()
        .filter(|p| stat(*p).is_some())
        .collect();
    while let Some(p) = todo.pop() {
        if out.insert(p)
            && let Some(c) = children.get(&p)
        {
            todo.extend(c);
        }
    }
    out.into_iter().collect()
}

/// CPU seconds (user + system) the processes have used so far.
pub fn cpu_s(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|p| stat(*p))
        .map(|(_, t)| t)
        .sum::<u64>() as f64
        / ticks()
}

/// CPU seconds per pid, to difference across a measurement even when
/// processes come and go.
pub fn cpu_by_pid(pids: &[u32]) -> BTreeMap<u32, f64> {
    let t = ticks();
    pids.iter()
        .filter_map(|p| stat(*p).map(|(_, c)| (*p, c as f64 / t)))
        .collect()
}

/// CPU used between two snapshots: processes that exited in between count
/// with what they had at the first snapshot (their last moments are lost).
pub fn cpu_delta(before: &BTreeMap<u32, f64>, after: &BTreeMap<u32, f64>) -> f64 {
    // A fold from +0.0: an empty sum of f64 is -0.0, which prints oddly.
    after
        .iter()
        .map(|(p, a)| a - before.get(p).copied().unwrap_or(0.0))
        .fold(0.0, |acc, x| acc + x)
}

/// Proportional set size summed over the processes, KiB: resident memory
/// with shared pages (nginx's workers share their master's) counted once.
pub fn pss_kib(pids: &[u32]) -> u64 {
    kib_summed(pids, "smaps_rollup", "Pss:")
}

/// The `key` line's KiB in `/proc/PID/file`, summed over the processes
/// (those gone meanwhile count nothing).
fn kib_summed(pids: &[u32], file: &str, key: &str) -> u64 {
    pids.iter()
        .filter_map(|p| {
            let s = std::fs::read_to_string(format!("/proc/{p}/{file}")).ok()?;
            let line = s.lines().find(|l| l.starts_with(key))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum()
}

/// Resident set size summed over the processes, KiB: shared pages once
/// per process that maps them, as `ps` and most dashboards add it up.
pub fn rss_kib(pids: &[u32]) -> u64 {
    kib_summed(pids, "status", "VmRSS:")
}

/// Machine-wide kernel memory that grows with sockets: slab (socket
/// objects) plus TCP buffer pages (`/proc/net/sockstat`), bytes.
pub fn kernel_socket_bytes() -> u64 {
    let slab = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Slab:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    let tcp_pages = std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("TCP:"))?;
            let f: Vec<&str> = line.split_whitespace().collect();
            let i = f.iter().position(|w| *w == "mem")?;
            f.get(i + 1)?.parse::<u64>().ok()
        })
        .unwrap_or(0);
    slab + tcp_pages * 4096
}

/// Softirq CPU seconds of the whole machine so far (where XDP and the
/// kernel's forwarding run).
pub fn softirq_s() -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("cpu "))?;
            // cpu user nice system idle iowait irq softirq
            line.split_whitespace().nth(7)?.parse::<u64>().ok()
        })
        .map(|t| t as f64 / ticks())
        .unwrap_or(0.0)
}

/// `TcpExt: ListenDrops` of a `/proc/net/netstat`: connection requests
/// dropped because a listener's accept queue was full (or for lack of
/// memory), counted per network namespace.
pub fn listen_drops(netstat: &str) -> Option<u64> {
    net_counter(netstat, "TcpExt:", "ListenDrops")
}

/// `Tcp: OutRsts` of a `/proc/net/snmp`: resets sent, among them one for
/// every connection attempt to a port nobody listens on.
pub fn out_rsts(snmp: &str) -> Option<u64> {
    net_counter(snmp, "Tcp:", "OutRsts")
}

/// One counter of a /proc/net/{snmp,netstat} file, where each group is a
/// line of names followed by a line of values.
fn net_counter(text: &str, group: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(group));
    let (names, values) = (lines.next()?, lines.next()?);
    let i = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_tree_cpu_and_memory() {
        let me = std::process::id();
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let t = tree(&[me]);
        assert!(t.contains(&me));
        assert!(t.contains(&child.id()), "{t:?}");
        assert!(children(me).contains(&child.id()));
        assert_eq!(
            command_line(child.id()).as_deref(),
            Some("sleep 5"),
            "{:?}",
            command_line(child.id())
        );
        assert!(rss_kib(&[me, child.id()]) > rss_kib(&[me]));
        // Burn a little CPU so the counter moves.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(300) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        assert!(x != 1);
        assert!(cpu_s(&[me]) > 0.1);
        assert!(pss_kib(&[me]) > 100);
        let before = cpu_by_pid(&[me]);
        assert!(cpu_delta(&before, &cpu_by_pid(&[me])) >= 0.0);
        child.kill().unwrap();
        // A zombie is no child that runs.
        while running(child.id()) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!children(me).contains(&child.id()));
        child.wait().unwrap();
        assert!(!tree(&[me]).contains(&child.id()));
        assert!(kernel_socket_bytes() > 0);
        assert!(softirq_s() >= 0.0);
    }

    #[test]
    fn listen_drops_are_read_by_name() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\n\
                       TcpExt: 0 7 9\n\
                       IpExt: InNoRoutes\n\
                       IpExt: 0\n";
        assert_eq!(listen_drops(netstat), Some(9));
        assert_eq!(listen_drops("IpExt: InNoRoutes\nIpExt: 0\n"), None);
        let own = std::fs::read_to_string("/proc/net/netstat").unwrap();
        assert!(listen_drops(&own).is_some());
    }

    #[test]
    fn a_child_runs_until_it_exits() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(running(child.id()));
        child.kill().unwrap();
        // Killed but not reaped: a zombie, which does not run.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while running(child.id()) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!running(child.id()));
        child.wait().unwrap();
        assert!(!running(child.id()));
    }

    #[test]
    fn out_rsts_are_read_from_the_tcp_group() {
        let snmp = "Ip: Forwarding DefaultTTL\n\
                    Ip: 1 64\n\
                    Tcp: RtoAlgorithm ActiveOpens OutRsts InCsumErrors\n\
                    Tcp: 1 12 5 0\n";
        assert_eq!(out_rsts(snmp), Some(5));
        assert_eq!(out_rsts("Ip: Forwarding\nIp: 1\n"), None);
        let own = std::fs::read_to_string("/proc/net/snmp").unwrap();
        assert!(out_rsts(&own).is_some());
    }
}
