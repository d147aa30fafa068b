//! L7 counters and the Prometheus `/metrics` endpoint.
//!
//! Each worker owns one [`WorkerMetrics`]: plain atomics for what changes
//! per read (frames, bytes), small locked maps for what changes per
//! connection (backends, statuses, close codes). The metrics thread sums
//! the workers when scraped, and writes the same snapshot as JSON under the
//! instance's state directory every second for `weir stats`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ejections::Ejections;

/// One worker's counters.
#[derive(Default)]
pub struct WorkerMetrics {
    pub accepted: AtomicU64,
    pub frames_c2b: AtomicU64,
    pub frames_b2c: AtomicU64,
    pub bytes_c2b: AtomicU64,
    pub bytes_b2c: AtomicU64,
    pub buffer_exhausted: AtomicU64,
    /// Times a quiet worker gave its buffer pool's memory back.
    pub pool_releases: AtomicU64,
    /// Accepts re-armed because a client waited in the queue while they
    /// were armed (a wakeup lost to another process's cancelled accept).
    pub accepts_kicked: AtomicU64,
    pub drains_in_progress: AtomicU64,
    /// Closes weir queued for a peer that were never written to its
    /// socket (the peer stopped reading, or the connection was cut).
    pub closes_undelivered_to_client: AtomicU64,
    pub closes_undelivered_to_backend: AtomicU64,
    /// Registry re-reads that failed: the worker routed on its last good
    /// state meanwhile.
    pub registry_refresh_errors: AtomicU64,
    /// Set while the worker's refresh keeps failing, so it logs once per
    /// failing spell rather than on every accept.
    pub registry_refresh_failing: AtomicBool,
    /// Backend sockets io_uring could not create or set up (answered 503).
    pub backend_socket_errors: AtomicU64,
    /// Connects to a backend that failed (refused, unreachable...) or were
    /// cut for taking longer than the connect timeout; another backend is
    /// tried after each.
    pub backend_connect_refused: AtomicU64,
    pub backend_connect_timeouts: AtomicU64,
    maps: Mutex<Maps>,
}

/// Keyed by values, not their text: a connection counts into these
/// several times, and formatting a key each time was a string allocation
/// per count. [`snapshot`] names them.
#[derive(Default, Clone, Debug)]
struct Maps {
    /// backend address -> (active, total)
    backends: BTreeMap<SocketAddr, (u64, u64)>,
    /// `None` upgraded, else the HTTP status weir answered
    handshakes: BTreeMap<Option<u16>, u64>,
    /// (direction, the code as [`close_code_label`] names it) -> count
    closes: BTreeMap<(CloseSeen, &'static str), u64>,
}

/// The label a close code is counted under. Peers choose codes freely, so
/// only the codes RFC 6455 and the IANA registry define get a series each;
/// each application range gets one, and everything else one ("invalid"):
/// a bounded set of series whatever peers send.
pub fn close_code_label(code: u16) -> &'static str {
    const DEFINED: [&str; 16] = [
        "1000", "1001", "1002", "1003", "invalid", "1005", "invalid", "1007", "1008", "1009",
        "1010", "1011", "1012", "1013", "1014", "invalid",
    ];
    match code {
        1000..=1015 => DEFINED[usize::from(code - 1000)],
        3000..=3999 => "3000-3999",
        4000..=4999 => "4000-4999",
        _ => "invalid",
    }
}

/// Close codes by who sent them to whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CloseSeen {
    FromClient,
    FromBackend,
    SentToClient,
    SentToBackend,
}

impl CloseSeen {
    fn label(self) -> &'static str {
        match self {
            Self::FromClient => "from_client",
            Self::FromBackend => "from_backend",
            Self::SentToClient => "sent_to_client",
            Self::SentToBackend => "sent_to_backend",
        }
    }
}

impl WorkerMetrics {
    fn with(&self, f: impl FnOnce(&mut Maps)) {
        f(&mut self.maps.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn connected(&self, backend: SocketAddr) {
        self.with(|m| {
            let e = m.backends.entry(backend).or_default();
            e.0 += 1;
            e.1 += 1;
        });
    }

    pub fn disconnected(&self, backend: SocketAddr) {
        self.with(|m| {
            if let Some(e) = m.backends.get_mut(&backend) {
                e.0 = e.0.saturating_sub(1);
            }
        });
    }

    /// Drops the series of a backend that left, so that backends coming and
    /// going do not grow `/metrics` forever. False (kept) while this worker
    /// still has a connection to it.
    pub fn forget_backend(&self, backend: SocketAddr) -> bool {
        let mut gone = false;
        self.with(|m| {
            if m.backends.get(&backend).is_none_or(|e| e.0 == 0) {
                m.backends.remove(&backend);
                gone = true;
            }
        });
        gone
    }

    /// A handshake ended: `None` upgraded, `Some(status)` refused.
    pub fn handshake(&self, status: Option<u16>) {
        self.with(|m| *m.handshakes.entry(status).or_default() += 1);
    }

    /// Counts a Close: one seen from a peer, or one of weir's own once it
    /// was written to the peer's socket.
    pub fn close(&self, seen: CloseSeen, code: u16) {
        self.with(|m| *m.closes.entry((seen, close_code_label(code))).or_default() += 1);
    }
}

/// The connections the takeover that started this process took over from
/// the old one (all zero in a process that started on its own).
#[derive(Default)]
pub struct TakeoverMetrics {
    pub moved: AtomicU64,
    /// Refused by this process: they stayed in the old one.
    pub failed: AtomicU64,
    /// Still in the old process when the handoff ended.
    pub left: AtomicU64,
    pub duration_us: AtomicU64,
    /// The longest one connection was held quiet.
    pub longest_stall_us: AtomicU64,
}

/// [`TakeoverMetrics`] as read.
#[derive(Default, Clone, Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct TakeoverSnapshot {
    pub moved: u64,
    pub failed: u64,
    pub left: u64,
    pub duration_us: u64,
    pub longest_stall_us: u64,
}

impl TakeoverMetrics {
    pub fn snapshot(&self) -> TakeoverSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TakeoverSnapshot {
            moved: get(&self.moved),
            failed: get(&self.failed),
            left: get(&self.left),
            duration_us: get(&self.duration_us),
            longest_stall_us: get(&self.longest_stall_us),
        }
    }
}

/// The sum over workers.
#[derive(Default, Clone, Serialize, Deserialize, Debug, PartialEq)]
pub struct Snapshot {
    pub accepted: u64,
    pub frames_client_to_backend: u64,
    pub frames_backend_to_client: u64,
    pub bytes_client_to_backend: u64,
    pub bytes_backend_to_client: u64,
    pub buffer_exhausted: u64,
    #[serde(default)]
    pub pool_releases: u64,
    #[serde(default)]
    pub accepts_kicked: u64,
    pub drains_in_progress: u64,
    #[serde(default)]
    pub closes_undelivered_to_client: u64,
    #[serde(default)]
    pub closes_undelivered_to_backend: u64,
    #[serde(default)]
    pub registry_refresh_errors: u64,
    #[serde(default)]
    pub backend_socket_errors: u64,
    #[serde(default)]
    pub backend_connect_refused: u64,
    #[serde(default)]
    pub backend_connect_timeouts: u64,
    /// backend -> [active, total]
    pub backends: BTreeMap<String, (u64, u64)>,
    pub handshakes: BTreeMap<String, u64>,
    pub closes: BTreeMap<String, u64>,
    /// Outlier detection's record of the backends that failed, per
    /// process (not per worker).
    #[serde(default)]
    pub outliers: Vec<OutlierRow>,
    /// The process's own takeover.
    #[serde(default)]
    pub takeover: TakeoverSnapshot,
}

/// One backend as outlier detection sees it.
#[derive(Clone, Serialize, Deserialize, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct OutlierRow {
    pub service: String,
    pub backend: String,
    /// Out of choice now.
    pub ejected: bool,
    pub ejections: u64,
    /// Ejections refused for `max_ejected_percent`.
    pub refused: u64,
}

/// The snapshot of `workers` with outlier detection's rows at `now` and
/// the process's takeover.
pub fn snapshot_with_outliers(
    workers: &[Arc<WorkerMetrics>],
    outliers: &Ejections,
    takeover: &TakeoverMetrics,
    now: std::time::Instant,
) -> Snapshot {
    let mut s = snapshot(workers);
    s.takeover = takeover.snapshot();
    s.outliers = outliers
        .rows(now)
        .into_iter()
        .map(|r| OutlierRow {
            service: r.service.to_string(),
            backend: r.addr.to_string(),
            ejected: r.ejected,
            ejections: r.ejections_total,
            refused: r.refused_total,
        })
        .collect();
    s.outliers.sort();
    s
}

pub fn snapshot(workers: &[Arc<WorkerMetrics>]) -> Snapshot {
    let mut s = Snapshot::default();
    for w in workers {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        s.accepted += get(&w.accepted);
        s.frames_client_to_backend += get(&w.frames_c2b);
        s.frames_backend_to_client += get(&w.frames_b2c);
        s.bytes_client_to_backend += get(&w.bytes_c2b);
        s.bytes_backend_to_client += get(&w.bytes_b2c);
        s.buffer_exhausted += get(&w.buffer_exhausted);
        s.pool_releases += get(&w.pool_releases);
        s.accepts_kicked += get(&w.accepts_kicked);
        s.drains_in_progress += get(&w.drains_in_progress);
        s.closes_undelivered_to_client += get(&w.closes_undelivered_to_client);
        s.closes_undelivered_to_backend += get(&w.closes_undelivered_to_backend);
        s.registry_refresh_errors += get(&w.registry_refresh_errors);
        s.backend_socket_errors += get(&w.backend_socket_errors);
        s.backend_connect_refused += get(&w.backend_connect_refused);
        s.backend_connect_timeouts += get(&w.backend_connect_timeouts);
        let m = w.maps.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (k, (a, t)) in m.backends {
            let e = s.backends.entry(k.to_string()).or_default();
            e.0 += a;
            e.1 += t;
        }
        for (k, v) in m.handshakes {
            let key = k.map_or_else(|| "upgraded".to_string(), |s| s.to_string());
            *s.handshakes.entry(key).or_default() += v;
        }
        for ((seen, code), v) in m.closes {
            *s.closes
                .entry(format!("{} {code}", seen.label()))
                .or_default() += v;
        }
    }
    s
}

/// The Prometheus text exposition of a snapshot.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, rows: Vec<(String, u64)>| {
        crate::prometheus::family(&mut out, name, kind, help, rows)
    };
    metric(
        "weir_l7_accepted_total",
        "counter",
        "Client connections accepted.",
        vec![(String::new(), s.accepted)],
    );
    metric(
        "weir_l7_connections_active",
        "gauge",
        "Relayed connections per backend.",
        s.backends
            .iter()
            .map(|(b, (a, _))| (format!("{{backend=\"{b}\"}}"), *a))
            .collect(),
    );
    metric(
        "weir_l7_connections_total",
        "counter",
        "Connections made to each backend.",
        s.backends
            .iter()
            .map(|(b, (_, t))| (format!("{{backend=\"{b}\"}}"), *t))
            .collect(),
    );
    metric(
        "weir_l7_handshakes_total",
        "counter",
        "Handshakes by outcome: upgraded, or the HTTP status weir answered.",
        s.handshakes
            .iter()
            .map(|(k, v)| {
                let labels = if k == "upgraded" {
                    "{outcome=\"upgraded\"}".to_string()
                } else {
                    format!("{{outcome=\"rejected\",status=\"{k}\"}}")
                };
                (labels, *v)
            })
            .collect(),
    );
    metric(
        "weir_l7_frames_total",
        "counter",
        "Frames relayed.",
        vec![
            (
                "{direction=\"client_to_backend\"}".into(),
                s.frames_client_to_backend,
            ),
            (
                "{direction=\"backend_to_client\"}".into(),
                s.frames_backend_to_client,
            ),
        ],
    );
    metric(
        "weir_l7_bytes_total",
        "counter",
        "Bytes relayed after the handshake.",
        vec![
            (
                "{direction=\"client_to_backend\"}".into(),
                s.bytes_client_to_backend,
            ),
            (
                "{direction=\"backend_to_client\"}".into(),
                s.bytes_backend_to_client,
            ),
        ],
    );
    metric(
        "weir_l7_close_codes_total",
        "counter",
        "Close frames by direction and code: RFC 6455 and IANA codes by number, 3000-3999 and 4000-4999 as one each, anything else as invalid; sent_* are weir's own, counted once written to the socket.",
        s.closes
            .iter()
            .map(|(k, v)| {
                let (dir, code) = k.split_once(' ').unwrap_or((k, ""));
                (format!("{{direction=\"{dir}\",code=\"{code}\"}}"), *v)
            })
            .collect(),
    );
    metric(
        "weir_l7_closes_undelivered_total",
        "counter",
        "Closes weir queued for a peer that were never written to its socket.",
        vec![
            (
                "{direction=\"to_client\"}".into(),
                s.closes_undelivered_to_client,
            ),
            (
                "{direction=\"to_backend\"}".into(),
                s.closes_undelivered_to_backend,
            ),
        ],
    );
    metric(
        "weir_l7_drains_in_progress",
        "gauge",
        "Connections waiting for their drain Close.",
        vec![(String::new(), s.drains_in_progress)],
    );
    metric(
        "weir_l7_buffer_exhausted_total",
        "counter",
        "Receives that found the provided-buffer ring empty.",
        vec![(String::new(), s.buffer_exhausted)],
    );
    metric(
        "weir_l7_accepts_kicked_total",
        "counter",
        "Accepts re-armed because a client waited in a listening socket's queue for two ticks while they were armed (a wakeup lost to another process's cancelled accept, as in a takeover).",
        vec![(String::new(), s.accepts_kicked)],
    );
    metric(
        "weir_l7_buffer_pool_releases_total",
        "counter",
        "Times a quiet worker gave its receive buffer pool's memory back to the kernel.",
        vec![(String::new(), s.pool_releases)],
    );
    metric(
        "weir_l7_registry_refresh_errors_total",
        "counter",
        "Registry re-reads that failed; the worker routed on its last good state meanwhile.",
        vec![(String::new(), s.registry_refresh_errors)],
    );
    metric(
        "weir_l7_backend_socket_errors_total",
        "counter",
        "Backend sockets io_uring could not create or set up (the client got 503).",
        vec![(String::new(), s.backend_socket_errors)],
    );
    metric(
        "weir_l7_backend_connect_failures_total",
        "counter",
        "Connects to backends that failed or timed out (another backend was tried).",
        vec![
            ("{reason=\"refused\"}".into(), s.backend_connect_refused),
            ("{reason=\"timeout\"}".into(), s.backend_connect_timeouts),
        ],
    );
    let outlier_labels =
        |r: &OutlierRow| format!("{{service=\"{}\",backend=\"{}\"}}", r.service, r.backend);
    metric(
        "weir_l7_outlier_ejections_total",
        "counter",
        "Times outlier detection took a backend out of this process's choices.",
        s.outliers
            .iter()
            .map(|r| (outlier_labels(r), r.ejections))
            .collect(),
    );
    metric(
        "weir_l7_outlier_ejected",
        "gauge",
        "1 while outlier detection keeps a backend out of this process's choices.",
        s.outliers
            .iter()
            .map(|r| (outlier_labels(r), u64::from(r.ejected)))
            .collect(),
    );
    metric(
        "weir_l7_outlier_ejections_refused_total",
        "counter",
        "Ejections refused because outlier.max_ejected_percent of the service's backends were out.",
        s.outliers
            .iter()
            .map(|r| (outlier_labels(r), r.refused))
            .collect(),
    );
    let t = &s.takeover;
    metric(
        "weir_l7_takeover_connections_total",
        "counter",
        "Connections of the takeover that started this process: moved here, refused here (they stayed in the old process), left in the old process when the handoff ended.",
        vec![
            ("{outcome=\"moved\"}".into(), t.moved),
            ("{outcome=\"failed\"}".into(), t.failed),
            ("{outcome=\"left\"}".into(), t.left),
        ],
    );
    let seconds = |us: u64| vec![(String::new(), us as f64 / 1e6)];
    crate::prometheus::family(
        &mut out,
        "weir_l7_takeover_duration_seconds",
        "gauge",
        "How long the connection handoff of the takeover that started this process took.",
        seconds(t.duration_us),
    );
    crate::prometheus::family(
        &mut out,
        "weir_l7_takeover_longest_stall_seconds",
        "gauge",
        "The longest one connection was held quiet (nothing read or sent) while it moved.",
        seconds(t.longest_stall_us),
    );
    out
}

/// Serves `/metrics` on `listener` (bound by the caller, so that a taken
/// address fails a start or a reload before anything changes) and writes
/// `snapshot_file` every second, until `stop`; once more then, unless
/// `handed_over` (the file is the new process's).
pub fn serve(
    listener: Option<TcpListener>,
    snapshot_file: std::path::PathBuf,
    workers: Vec<Arc<WorkerMetrics>>,
    outliers: Arc<Ejections>,
    takeover: Arc<TakeoverMetrics>,
    stop: Arc<AtomicBool>,
    handed_over: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    if let Some(l) = &listener {
        l.set_nonblocking(true)?;
    }
    std::thread::Builder::new()
        .name("weir-metrics".into())
        .spawn(move || {
            let mut last_write = std::time::Instant::now() - Duration::from_secs(2);
            loop {
                let done = stop.load(Ordering::Relaxed);
                if done && handed_over.load(Ordering::Relaxed) {
                    return;
                }
                if last_write.elapsed() >= Duration::from_secs(1) || done {
                    let snap = snapshot_with_outliers(
                        &workers,
                        &outliers,
                        &takeover,
                        std::time::Instant::now(),
                    );
                    if let Ok(json) = serde_json::to_vec(&snap) {
                        let tmp = snapshot_file.with_extension("tmp");
                        if std::fs::write(&tmp, json).is_ok() {
                            let _ = std::fs::rename(&tmp, &snapshot_file);
                        }
                    }
                    last_write = std::time::Instant::now();
                }
                if done {
                    return;
                }
                if let Some(l) = &listener
                    && let Ok((mut s, _)) = l.accept()
                {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut req = [0u8; 1024];
                    let n = s.read(&mut req).unwrap_or(0);
                    let _ = s.write_all(&crate::prometheus::answer(&req[..n], || {
                        render(&snapshot_with_outliers(
                            &workers,
                            &outliers,
                            &takeover,
                            std::time::Instant::now(),
                        ))
                    }));
                    continue;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_are_counted_in_a_bounded_set_of_series() {
        let m = WorkerMetrics::default();
        for code in 0..=u16::MAX {
            m.close(CloseSeen::FromClient, code);
        }
        let s = snapshot(&[Arc::new(m)]);
        let labels: Vec<&str> = s
            .closes
            .keys()
            .map(|k| k.split_once(' ').unwrap().1)
            .collect();
        assert_eq!(
            labels.len(),
            16,
            "13 codes by number, two ranges, invalid; some: {:?}",
            &labels[..labels.len().min(20)]
        );
        assert_eq!(s.closes["from_client 1000"], 1);
        assert_eq!(s.closes["from_client 1014"], 1);
        assert_eq!(s.closes["from_client 3000-3999"], 1000);
        assert_eq!(s.closes["from_client 4000-4999"], 1000);
        assert_eq!(
            s.closes["from_client invalid"],
            65536 - 13 - 2000,
            "0-999, 1004, 1006, 1015, 1016-2999, 5000 and up"
        );
    }

    /// The rows come from the process's table, not summed per worker.
    #[test]
    fn outlier_rows_come_from_the_shared_table() {
        let settings = crate::l7::config::Outlier {
            consecutive: 1,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(60),
            max_ejected_percent: 100,
        };
        let now = std::time::Instant::now();
        let table = Ejections::new(settings, now);
        let backend: SocketAddr = "127.0.0.1:9003".parse().unwrap();
        table.failed(
            crate::l7::outlier::Subject {
                id: 4,
                addr: backend,
                service: "198.19.0.1:80".parse().unwrap(),
                active: 2,
            },
            now,
        );
        let workers = [
            Arc::new(WorkerMetrics::default()),
            Arc::new(WorkerMetrics::default()),
        ];
        let takeover = TakeoverMetrics::default();
        let s = snapshot_with_outliers(&workers, &table, &takeover, now);
        assert_eq!(
            s.outliers,
            [OutlierRow {
                service: "198.19.0.1:80".into(),
                backend: "127.0.0.1:9003".into(),
                ejected: true,
                ejections: 1,
                refused: 0,
            }]
        );
        let later =
            snapshot_with_outliers(&workers, &table, &takeover, now + Duration::from_secs(10));
        assert!(!later.outliers[0].ejected, "back after its time");
    }

    #[test]
    fn a_backend_series_goes_only_once_its_connections_did() {
        let m = WorkerMetrics::default();
        let be: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        m.connected(be);
        assert!(!m.forget_backend(be), "a connection is open");
        m.disconnected(be);
        assert!(m.forget_backend(be));
        assert!(snapshot(&[Arc::new(m)]).backends.is_empty());
    }

    #[test]
    fn workers_sum_and_render() {
        let a = Arc::new(WorkerMetrics::default());
        let b = Arc::new(WorkerMetrics::default());
        let be: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        a.connected(be);
        b.connected(be);
        b.disconnected(be);
        a.handshake(None);
        a.handshake(Some(404));
        b.handshake(Some(404));
        a.close(CloseSeen::SentToClient, 1001);
        a.frames_c2b.fetch_add(3, Ordering::Relaxed);
        a.registry_refresh_errors.fetch_add(2, Ordering::Relaxed);
        b.registry_refresh_errors.fetch_add(1, Ordering::Relaxed);
        b.backend_socket_errors.fetch_add(1, Ordering::Relaxed);
        a.backend_connect_refused.fetch_add(2, Ordering::Relaxed);
        b.backend_connect_timeouts.fetch_add(1, Ordering::Relaxed);
        let mut s = snapshot(&[a, b]);
        s.outliers.push(OutlierRow {
            service: "198.19.0.1:80".into(),
            backend: "127.0.0.1:9002".into(),
            ejected: true,
            ejections: 2,
            refused: 3,
        });
        s.takeover = TakeoverSnapshot {
            moved: 998,
            failed: 2,
            left: 1,
            duration_us: 1_250_000,
            longest_stall_us: 4_500,
        };
        assert_eq!(s.backends["127.0.0.1:9001"], (1, 2));
        assert_eq!(s.handshakes["404"], 2);
        let text = render(&s);
        for line in [
            "weir_l7_connections_active{backend=\"127.0.0.1:9001\"} 1",
            "weir_l7_connections_total{backend=\"127.0.0.1:9001\"} 2",
            "weir_l7_handshakes_total{outcome=\"upgraded\"} 1",
            "weir_l7_handshakes_total{outcome=\"rejected\",status=\"404\"} 2",
            "weir_l7_close_codes_total{direction=\"sent_to_client\",code=\"1001\"} 1",
            "weir_l7_frames_total{direction=\"client_to_backend\"} 3",
            "# TYPE weir_l7_drains_in_progress gauge",
            "weir_l7_registry_refresh_errors_total 3",
            "weir_l7_backend_socket_errors_total 1",
            "weir_l7_backend_connect_failures_total{reason=\"refused\"} 2",
            "weir_l7_backend_connect_failures_total{reason=\"timeout\"} 1",
            "weir_l7_outlier_ejections_total{service=\"198.19.0.1:80\",backend=\"127.0.0.1:9002\"} 2",
            "weir_l7_outlier_ejected{service=\"198.19.0.1:80\",backend=\"127.0.0.1:9002\"} 1",
            "weir_l7_outlier_ejections_refused_total{service=\"198.19.0.1:80\",backend=\"127.0.0.1:9002\"} 3",
            "weir_l7_takeover_connections_total{outcome=\"moved\"} 998",
            "weir_l7_takeover_connections_total{outcome=\"failed\"} 2",
            "weir_l7_takeover_connections_total{outcome=\"left\"} 1",
            "weir_l7_takeover_duration_seconds 1.25",
            "weir_l7_takeover_longest_stall_seconds 0.0045",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
