//! The measurements every scenario's rows are made of (CPU, latency, how
//! connections ended), and the facts of the run that frame them; the rows
//! themselves belong to their scenario (`crate::scenarios`), the file that
//! holds them is [`crate::catalog::ScenarioResult`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The system every other row is compared against.
pub const WEIR: &str = "weir";

/// Facts about the run that make its numbers interpretable.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunInfo {
    /// RFC 3339, UTC.
    pub date: String,
    pub quick: bool,
    pub kernel: String,
    pub cpus: usize,
    pub weir_commit: String,
    pub haproxy_version: String,
    pub nginx_version: String,
    /// Worker threads (weir, HAProxy) or processes (nginx) per proxy process.
    pub workers: usize,
}

/// CPU and memory of a set of processes over a measurement.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Usage {
    /// User + system CPU seconds consumed during the measurement.
    pub cpu_s: f64,
    /// Resident memory at the end, summed over the processes.
    pub rss_kib: u64,
    /// Processes alive at the end.
    pub processes: usize,
}

/// Where the CPU went during a measurement: the proxy, the load generator
/// and the echo backends, so a reader can see which one was the limit.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CpuSplit {
    pub proxy_s: f64,
    pub generator_s: f64,
    pub backends_s: f64,
    pub wall_s: f64,
    /// Softirq CPU seconds of the whole machine (/proc/stat), where the
    /// kernel carries packets across veth, the router and lo. This kernel
    /// samples CPU time by tick without IRQ time accounting, so a tick
    /// that lands in softirq counts here *and* in the process it
    /// interrupted (often the sender of the packets).
    #[serde(default)]
    pub softirq_s: f64,
}

/// CPU seconds per million messages (or frames); 0 when none went by.
pub fn per_million(cpu_s: f64, count: u64) -> f64 {
    if count > 0 {
        cpu_s / count as f64 * 1e6
    } else {
        0.0
    }
}

/// How connections ended, by kind: `clean`, `peer_close:CODE`, `reset`,
/// `eof` (closed without a Close frame), `timeout`, `error`,
/// `handshake:STATUS` / `handshake:io` (never upgraded), `open` (still open
/// when the run ended).
pub type Endings = BTreeMap<String, u64>;

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub samples: u64,
}

/// One second of a run, as the load generator saw it (the churn timeline).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TimelinePoint {
    /// Seconds since the start of the run.
    pub t_s: f64,
    /// Connections open at that second.
    pub open: u64,
    /// Handshakes completed / failed during that second.
    pub new_ok: u64,
    pub new_failed: u64,
    /// Connections cut (reset, EOF without Close, timeout, error) during
    /// that second.
    pub cut: u64,
    /// Connections closed by the proxy with a Close frame during that second.
    pub closed_by_peer: u64,
    /// The longest an echo that arrived during that second took, µs (0:
    /// none arrived): when in a run a stall happened.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_echo_us: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}
