//! What a bench run measured, as written to `bench/results/<date>-<scenario>.json`
//! and read back by [`crate::report`] and [`crate::plot`].
//!
//! Every row names its `system` (`weir`, `haproxy`, `nginx`, and for the
//! churn scenario the way backends were changed, e.g. `haproxy-reload`), so
//! a report can put weir beside each peer measured in the same run.

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

// ---------------------------------------------------------------------------

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SteadyRow {
    pub system: String,
    pub message_bytes: usize,
    pub connections: usize,
    /// Closed loop: every connection sends as soon as its echo came back.
    pub closed_msgs_per_sec: f64,
    pub closed_cpu: CpuSplit,
    /// Proxy CPU seconds per million echoed messages, closed loop.
    pub cpu_s_per_million: f64,
    /// Open loop: the fixed offered rate (messages/s, all connections).
    pub open_rate: f64,
    /// Echoes per second actually received in the open-loop phase.
    pub open_achieved: f64,
    /// Latency from each message's scheduled send time (no coordinated
    /// omission), open loop.
    pub open_latency: Latency,
    pub open_cpu: CpuSplit,
    /// Messages lost or mismatched, and broken connections, over both phases.
    pub errors: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IdleRow {
    pub system: String,
    /// Connections asked for.
    pub connections: usize,
    /// Connections that were upgraded and still answered a ping at the end.
    pub held: usize,
    /// Proxy processes the connections were spread over (20,000 open files
    /// per process here).
    pub shards: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// (after - before) / held.
    pub rss_bytes_per_conn: f64,
    /// Memory the second half of the connections added, per connection:
    /// the cost of one more connection once pools are warm.
    #[serde(default)]
    pub marginal_bytes_per_conn: f64,
    /// Kernel socket memory in the load balancer's namespace (TCP slab
    /// objects estimated from `ss -tm` buffers plus sockstat), per connection.
    pub kernel_bytes_per_conn: f64,
    pub processes: usize,
    pub endings: Endings,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConnrateStep {
    /// Handshakes per second offered.
    pub target: f64,
    /// Handshakes per second completed.
    pub achieved: f64,
    pub ok: u64,
    pub failed: u64,
    pub handshake: Latency,
    pub cpu: CpuSplit,
    pub endings: Endings,
}

/// A connection-rate step whose handshake p99 exceeds this is saturated:
/// handshakes queue instead of completing at the offered rate.
pub const CLEAN_HANDSHAKE_P99_US: u64 = 500_000;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConnrateRow {
    pub system: String,
    pub steps: Vec<ConnrateStep>,
    /// Highest completed rate of a clean step: no failure, at least 90%
    /// of the offer completed, the generator on time, handshake p99 under
    /// [`CLEAN_HANDSHAKE_P99_US`].
    pub max_clean_rate: f64,
    /// Handshakes per proxy CPU second in that step: the cost of a
    /// connection, which does not depend on how much CPU the generator and
    /// the backends left the proxy on this shared machine.
    #[serde(default)]
    pub handshakes_per_cpu_s: f64,
    /// Why the ramp stopped: `errors`, `generator` (it could not offer the
    /// rate: the proxy was not the limit), `saturated` (completed well under
    /// the offer, or handshakes queued past the p99 limit) or `cap` (the
    /// ramp's last step passed).
    pub stopped_by: String,
}

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
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ChurnRow {
    /// System and method, e.g. `weir`, `haproxy-api`, `haproxy-reload`,
    /// `nginx-reload`.
    pub system: String,
    pub seconds: f64,
    /// Backend set replacements made.
    pub changes: usize,
    /// Seconds each replacement took to apply (the command's wall time).
    pub change_ms: Vec<u64>,
    pub handshakes_ok: u64,
    pub handshakes_failed: u64,
    /// Connections that ended in reset, EOF, timeout or error.
    pub cut: u64,
    /// Connections the proxy closed with a Close frame (e.g. 1001 on drain).
    pub closed_by_peer: u64,
    pub messages_echoed: u64,
    pub endings: Endings,
    pub processes_after: usize,
    pub rss_after_kib: u64,
    pub rss_before_kib: u64,
    pub timeline: Vec<TimelinePoint>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DrainRow {
    pub system: String,
    /// How the backend was removed, e.g. `weir backend remove`.
    pub method: String,
    /// Connections on the removed backend.
    pub connections: usize,
    /// The drain window the system was given, seconds.
    pub window_s: f64,
    pub endings: Endings,
    /// Milliseconds from the removal command to the first, median and last
    /// close of a removed backend's connection.
    pub first_close_ms: Option<u64>,
    pub median_close_ms: Option<u64>,
    pub last_close_ms: Option<u64>,
    /// Connections still open when the run gave up waiting.
    pub still_open: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct L4Row {
    pub system: String,
    pub streams: usize,
    /// Bulk TCP throughput, client to backend, all streams, Gbit/s.
    pub bulk_gbit_s: f64,
    /// TCP connections (connect, 1 byte, answer, close) per second.
    pub conns_per_sec: f64,
    pub conn_errors: u64,
    /// CPU of the proxy process (HAProxy); the XDP path runs in softirq and
    /// has no process: its cost shows in `softirq_s`.
    pub bulk_cpu: CpuSplit,
    /// Softirq CPU seconds on the machine during the bulk phase.
    pub softirq_s: f64,
}

/// One scenario's file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub scenario: String,
    pub info: RunInfo,
    /// Parameters of the scenario (connections, durations, rates).
    pub params: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steady: Vec<SteadyRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub idle: Vec<IdleRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connrate: Vec<ConnrateRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub churn: Vec<ChurnRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drain: Vec<DrainRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub l4: Vec<L4Row>,
    /// Problems seen (a system that failed to start, a sanity check).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}
