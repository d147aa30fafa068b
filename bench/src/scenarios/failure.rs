//! Backend failure: connections arriving at a fixed rate while one backend
//! of four is killed (SIGKILL: its port refuses from then on) and later
//! started again, each system watching its backends its usual way (see
//! [`crate::systems::Spec::health_checks`]): how many handshakes failed,
//! how long until the system stopped sending new connections to the dead
//! backend, and how long until it used the backend again.
//!
//! Three views of one event: the clients' (how each connection ended and
//! which backend served it: `weir-echo` names itself in its 101), the
//! system's own (weir's registry, where its agent records health; HAProxy's
//! server state), and the dead backend's (every connection attempt its
//! namespace refused, health checks included).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::chart::{Area, Chart, Colors, FONT, finite, labelled_line, legend, linear_axes, max_of};
use crate::load::{self, ConnRecord, Talk};
use crate::procs;
use crate::results::Endings;
use crate::scenario::{Outcome, Scenario};
use crate::stage::{Bench, backend_name};
use crate::systems::{Kind, Running};
use crate::table::{
    L7_PEERS, Table, fmt_endings, fmt_int, fmt_ms, fmt_num, is_weir, measured, peer_row, ratio,
    ratio_cells,
};

/// The backend that is killed, of the four in use.
const VICTIM: usize = 0;
const BACKENDS: usize = 4;
/// Width of the timeline's bins.
const BIN_MS: u64 = 100;
/// How often the system's own view of the victim is read.
const POLL: Duration = Duration::from_millis(100);
/// Refused attempts in one bin beyond what a health check explains (one
/// per bin: HAProxy's and weir's agent's checks are a second or so
/// apart): the system was still sending clients' connections.
const SENDING: u32 = 2;

/// Sizes of a full run, and of a quick one (`--quick`).
struct Sizes {
    arrivals_per_sec: f64,
    /// Load before the kill: every backend in use.
    before_secs: u64,
    /// From the kill to the restart.
    down_secs: u64,
    /// After the restart: long enough for nginx's `fail_timeout` (10 s
    /// from its last failed attempt) to run out.
    after_secs: u64,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                arrivals_per_sec: 100.0,
                before_secs: 2,
                down_secs: 5,
                after_secs: 6,
            }
        } else {
            Sizes {
                arrivals_per_sec: 200.0,
                before_secs: 5,
                down_secs: 10,
                after_secs: 12,
            }
        }
    }

    fn total_secs(&self) -> u64 {
        self.before_secs + self.down_secs + self.after_secs
    }
}

pub struct Failure;

/// One system through one backend's death and return. Times are ms; the
/// bins count from the start of the load.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FailureRow {
    pub system: String,
    /// How the system watches its backends.
    pub watch: String,
    pub arrivals_per_sec: f64,
    /// From the start of the load to the kill, and to the restart.
    pub kill_ms: u64,
    pub restart_ms: u64,
    pub handshakes_ok: u64,
    pub handshakes_failed: u64,
    /// Failed handshakes by kind (`handshake:503`, `handshake:timeout`...).
    pub failures: Endings,
    /// Upgraded connections that ended without their echo and close
    /// (the ones on the backend when it died).
    pub cut: u64,
    /// From the kill until the system said the backend was down, read
    /// every [`POLL`] (weir: unhealthy in its registry, where its agent
    /// writes; HAProxy: the server DOWN in its state); None when it says
    /// nothing (nginx) or never did.
    pub detected_ms: Option<u64>,
    /// The transition time the system recorded, from the kill (weir:
    /// `health_since`, which counts whole seconds, so it may read up to
    /// 999 ms early, even before the kill).
    pub recorded_down_ms: Option<i64>,
    /// From the kill until the system stopped sending clients'
    /// connections to the dead backend, as that backend saw them: the end
    /// of the last bin with more refused attempts than a health check.
    pub stop_ms: Option<u64>,
    /// Failed handshakes of connections started after detection (the
    /// system's own, else when it stopped sending).
    pub failed_after_detection: u64,
    /// Connection attempts the dead backend refused, checks included.
    pub refused: u64,
    /// From the restart until the system said the backend was up, read as
    /// [`FailureRow::detected_ms`] is, and the time it recorded.
    pub up_ms: Option<u64>,
    pub recorded_up_ms: Option<i64>,
    /// From the restart until a client's connection was served by it.
    pub back_in_use_ms: Option<u64>,
    /// Connections the victim served before the kill: it was in use.
    pub served_before_kill: u64,
    pub failed_bins: Vec<u32>,
    pub refused_bins: Vec<u32>,
}

measured!(FailureRow);

impl FailureRow {
    /// When failures stop being the system's to excuse: its own
    /// detection, or, for a system that says nothing, when it stopped
    /// sending.
    fn detection_ms(&self) -> Option<u64> {
        self.detected_ms.or(self.stop_ms)
    }
}

impl Scenario for Failure {
    const NAME: &'static str = "failure";
    const TITLE: &'static str = "Backend failure";
    const SYSTEMS: &'static [&'static str] = &["weir", "haproxy", "nginx"];
    const CHART: Option<Chart<FailureRow>> = Some(Chart {
        file: "failure",
        size: (960, 820),
        draw: timeline_chart,
    });

    type Row = FailureRow;

    fn run(b: &mut Bench) -> Result<Outcome<FailureRow>> {
        let s = Sizes::new(b.sizes.quick);
        let mut out = Outcome::new(&[
            (
                "arrivals_per_s",
                format!(
                    "{} (handshake, one echo, close)",
                    fmt_num(s.arrivals_per_sec)
                ),
            ),
            ("backends", format!("b0-b{}", BACKENDS - 1)),
            (
                "kill",
                format!(
                    "{} (SIGKILL) after {} s, restarted {} s later, {} s more",
                    backend_name(VICTIM),
                    s.before_secs,
                    s.down_secs,
                    s.after_secs
                ),
            ),
        ]);
        for kind in Kind::ALL {
            let backends = (0..BACKENDS).map(|i| b.backend(i)).collect();
            let mut spec = b.spec(kind, backends, 1);
            spec.health_checks = true;
            // Not with_system: the victim is killed and restarted on the
            // bench, which the system's run borrows.
            let row = Running::start(&mut b.topo, spec, "fa").and_then(|sys| {
                let row = failure_row(b, &s, &sys);
                sys.stop(&mut b.topo);
                row
            });
            match row {
                Ok(row) => out.rows.push(row),
                Err(e) => out.notes.push(format!("{}: {e:#}", kind.name())),
            }
        }
        Ok(out)
    }

    fn faults(rows: &[FailureRow]) -> Vec<String> {
        let mut bad = Vec::new();
        for x in rows {
            if x.handshakes_ok == 0 || x.served_before_kill == 0 {
                bad.push(format!(
                    "failure: {} served {} connections, {} by {} before the kill",
                    x.system,
                    x.handshakes_ok,
                    x.served_before_kill,
                    backend_name(VICTIM)
                ));
            }
            if x.refused == 0 {
                bad.push(format!(
                    "failure: {}: the killed backend refused no connection",
                    x.system
                ));
            }
        }
        bad
    }

    fn section(out: &mut String, rows: &[FailureRow]) {
        let mut t = Table::new(&[
            "system",
            "watching",
            "handshakes ok",
            "failed",
            "failed after detection",
            "detected",
            "stopped sending",
            "refused attempts",
            "said up",
            "recorded down / up",
            "back in use",
            "weir/haproxy",
            "weir/nginx",
            "failures",
            "cut",
        ])
        .left(&["watching", "failures"]);
        for r in rows {
            let find = |p: &str| peer_row(rows, |_| (), p, &());
            let mut cells = vec![
                r.system.clone(),
                r.watch.clone(),
                fmt_int(r.handshakes_ok),
                fmt_int(r.handshakes_failed),
                fmt_int(r.failed_after_detection),
                fmt_ms(r.detected_ms),
                fmt_ms(r.stop_ms),
                fmt_int(r.refused),
                fmt_ms(r.up_ms),
                format!(
                    "{} / {}",
                    fmt_signed_ms(r.recorded_down_ms),
                    fmt_signed_ms(r.recorded_up_ms)
                ),
                fmt_ms(r.back_in_use_ms),
            ];
            cells.extend(ratio_cells(is_weir(&r.system), &L7_PEERS, find, |p| {
                ratio(p.handshakes_failed as f64, r.handshakes_failed as f64)
            }));
            cells.push(fmt_endings(&r.failures));
            cells.push(fmt_int(r.cut));
            t.row(cells);
        }
        t.write(out);
        if let (Some(w), Some(h)) = (
            rows.iter().find(|r| is_weir(&r.system)),
            rows.iter().find(|r| r.system == "haproxy"),
        ) {
            out.push_str(&format!(
                "\nweir: {} failed handshakes ({} after detection) against HAProxy's {} with \
                 `check inter 1s fall 2 rise 2`.\n",
                fmt_int(w.handshakes_failed),
                fmt_int(w.failed_after_detection),
                fmt_int(h.handshakes_failed)
            ));
        }
        out.push_str(
            "\nDetected and stopped sending count from the kill; said up and back in use from \
             the restart. Detected and said up are the system's own word, read every 100 ms \
             (weir: its registry's health, which its agent writes; HAProxy: the server's state \
             in `show servers state`); nginx keeps its failure counts to itself. Recorded: the \
             transition times the system stored (weir's `health_since`, in whole seconds). \
             Stopped sending is the dead backend's view: the end of the last 100 ms with more \
             refused connection attempts than one health check. Failed after detection counts connections started after \
             the system's detection, or after it stopped sending where it says nothing. \
             Ratios: peer's failed handshakes ÷ weir's; – when either had none.\n",
        );
    }
}

/// Milliseconds that may be negative (a time recorded in whole seconds).
fn fmt_signed_ms(ms: Option<i64>) -> String {
    match ms {
        Some(ms) if ms < 0 => format!("-{}", fmt_ms(Some(ms.unsigned_abs()))),
        other => fmt_ms(other.map(|ms| ms as u64)),
    }
}

/// The moments of one run, in unix ms, and what the system said.
#[derive(Default)]
struct Moments {
    kill: u64,
    restart: u64,
    /// The system's own word: down, then up again.
    down: Option<Said>,
    up: Option<Said>,
}

/// When the system was first read saying a state, and the time it
/// recorded for the transition, where it records one.
#[derive(Clone, Copy)]
struct Said {
    read: u64,
    recorded: Option<u64>,
}

fn failure_row(b: &mut Bench, s: &Sizes, sys: &Running) -> Result<FailureRow> {
    let name = sys.spec.kind.name();
    let victim = b.backend(VICTIM);
    let mut plan = b.plan(0, Talk::Closed, 64, s.total_secs() as f64);
    plan.arrivals_per_sec = s.arrivals_per_sec;
    plan.arrival_life = Duration::ZERO;
    plan.record_connections = true;
    plan.fleet.connect_timeout = Duration::from_secs(5);
    plan.fleet.echo_timeout = Duration::from_secs(5);
    let epoch = plan.epoch_unix_ms;
    b.progress(&format!(
        "{name}: {} arrivals/s, {} killed after {} s for {} s",
        s.arrivals_per_sec,
        backend_name(VICTIM),
        s.before_secs,
        s.down_secs
    ));
    let refusals = Refusals::start(b, VICTIM)?;
    let clients = b.start_load(&plan, 1)?;
    let mut m = Moments::default();
    sleep_until(epoch + s.before_secs * 1000);
    m.kill = load::unix_ms();
    b.kill_backend(VICTIM)?;
    // Whatever the system says meanwhile, the victim comes back.
    let watched = watch(b, sys, victim, true, m.kill + s.down_secs * 1000);
    m.restart = load::unix_ms();
    b.restart_backend(VICTIM)?;
    m.down = watched?;
    // Up means something only from a system that said down.
    let end = epoch + s.total_secs() * 1000 - POLL.as_millis() as u64;
    if m.down.is_some() {
        m.up = watch(b, sys, victim, false, end)?;
    }
    let r = Bench::wait_load(clients, Duration::from_secs(s.total_secs() + 60))?;
    let refused = refusals.finish()?;
    let row = row_of(sys.spec.kind, s, epoch, &m, &r.connections, &refused);
    b.progress(&format!(
        "{name}: {} ok, {} failed ({} after detection), detected {}, stopped sending {}, \
         back in use {}",
        row.handshakes_ok,
        row.handshakes_failed,
        row.failed_after_detection,
        fmt_ms(row.detected_ms),
        fmt_ms(row.stop_ms),
        fmt_ms(row.back_in_use_ms)
    ));
    Ok(row)
}

fn sleep_until(unix_ms: u64) {
    std::thread::sleep(Duration::from_millis(
        unix_ms.saturating_sub(load::unix_ms()),
    ));
}

/// Reads the system's view of `backend` every [`POLL`] until `until`
/// (unix ms); returns when it first said `down`, None if it never did or
/// says nothing.
fn watch(
    b: &Bench,
    sys: &Running,
    backend: std::net::SocketAddr,
    down: bool,
    until: u64,
) -> Result<Option<Said>> {
    let (mut seen, mut answered, mut failed) = (None, false, None);
    while load::unix_ms() < until {
        let asked = load::unix_ms();
        if seen.is_none() {
            match sys.health_of(&b.topo, backend) {
                Ok(view) => {
                    answered = true;
                    if let Some(v) = view.filter(|v| v.down == down) {
                        seen = Some(Said {
                            read: asked,
                            recorded: v.since_unix_ms,
                        });
                    }
                }
                // A read may fail now and then on a busy machine (a
                // command timing out); the next one is 100 ms away.
                Err(e) => failed = Some(e),
            }
        }
        sleep_until((asked + POLL.as_millis() as u64).min(until));
    }
    match failed {
        Some(e) if !answered => Err(e.context("reading the system's view of the backend")),
        _ => Ok(seen),
    }
}

/// The row from the clients' records and the victim's refusals.
fn row_of(
    kind: Kind,
    s: &Sizes,
    epoch: u64,
    m: &Moments,
    conns: &[ConnRecord],
    refused_at: &[u64],
) -> FailureRow {
    let victim = backend_name(VICTIM);
    let started = |c: &ConnRecord| c.started_unix_us / 1000;
    let failed: Vec<&ConnRecord> = conns
        .iter()
        .filter(|c| c.ending.starts_with(load::ending::HANDSHAKE))
        .collect();
    let mut failures = Endings::new();
    for c in &failed {
        *failures.entry(c.ending.clone()).or_default() += 1;
    }
    let down: Vec<u64> = refused_at
        .iter()
        .copied()
        .filter(|t| (m.kill..m.restart).contains(t))
        .collect();
    let since_kill = |t: u64| t.saturating_sub(m.kill);
    let recorded = |said: Option<Said>, from: u64| {
        said.and_then(|x| x.recorded)
            .map(|t| t as i64 - from as i64)
    };
    let mut row = FailureRow {
        system: kind.name().into(),
        watch: watch_of(kind).into(),
        arrivals_per_sec: s.arrivals_per_sec,
        kill_ms: m.kill.saturating_sub(epoch),
        restart_ms: m.restart.saturating_sub(epoch),
        handshakes_ok: conns.iter().filter(|c| c.backend.is_some()).count() as u64,
        handshakes_failed: failed.len() as u64,
        failures,
        cut: conns.iter().filter(|c| load::is_cut(&c.ending)).count() as u64,
        detected_ms: m.down.map(|x| since_kill(x.read)),
        recorded_down_ms: recorded(m.down, m.kill),
        stop_ms: stopped_sending(&down, m.kill, m.restart),
        refused: down.len() as u64,
        up_ms: m.up.map(|x| x.read.saturating_sub(m.restart)),
        recorded_up_ms: recorded(m.up, m.restart),
        back_in_use_ms: conns
            .iter()
            .filter(|c| c.backend.as_deref() == Some(victim.as_str()) && started(c) >= m.restart)
            .map(|c| started(c) - m.restart)
            .min(),
        served_before_kill: conns
            .iter()
            .filter(|c| c.backend.as_deref() == Some(victim.as_str()) && started(c) < m.kill)
            .count() as u64,
        failed_bins: bins(failed.iter().map(|c| started(c)), epoch),
        refused_bins: bins(down.iter().copied(), epoch),
        ..FailureRow::default()
    };
    row.failed_after_detection = match row.detection_ms() {
        Some(d) => failed.iter().filter(|c| started(c) >= m.kill + d).count() as u64,
        None => row.handshakes_failed,
    };
    row
}

/// How each system watches its backends here.
fn watch_of(kind: Kind) -> &'static str {
    match kind {
        Kind::Weir => "weir agent (defaults, WebSocket check), weir run (defaults)",
        Kind::Haproxy => "check inter 1s fall 2 rise 2 (TCP connect)",
        Kind::Nginx => "max_fails=1 fail_timeout=10s (passive, per worker)",
    }
}

/// ms from the kill to the end of the last bin (counted from the kill,
/// before the restart) in which the victim refused at least [`SENDING`]
/// attempts; 0 when no bin did.
fn stopped_sending(refused_at: &[u64], kill: u64, restart: u64) -> Option<u64> {
    if restart <= kill {
        return None;
    }
    let n = (restart - kill).div_ceil(BIN_MS) as usize;
    let mut per_bin = vec![0u32; n];
    for t in refused_at.iter().filter(|t| (kill..restart).contains(*t)) {
        per_bin[((t - kill) / BIN_MS) as usize] += 1;
    }
    Some(
        per_bin
            .iter()
            .rposition(|c| *c >= SENDING)
            .map_or(0, |i| (i as u64 + 1) * BIN_MS),
    )
}

/// Counts of `times` (unix ms) per [`BIN_MS`] from `epoch`.
fn bins(times: impl Iterator<Item = u64>, epoch: u64) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::new();
    for t in times {
        let i = (t.saturating_sub(epoch) / BIN_MS) as usize;
        if out.len() <= i {
            out.resize(i + 1, 0);
        }
        out[i] += 1;
    }
    out
}

/// The connection attempts a backend's namespace refused, with their
/// times: a thread in that namespace reads its resets sent (`Tcp:
/// OutRsts`; with no listener, each SYN is answered by one) every 5 ms,
/// until [`Refusals::finish`] or the drop of a run that failed.
struct Refusals {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<Vec<u64>>>>,
}

impl Drop for Refusals {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Refusals {
    fn start(b: &Bench, i: usize) -> Result<Refusals> {
        let ns = b.topo.ns_path(&b.topo.backend_ns[i]);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("failure-refusals".into())
            .spawn(move || weir_testbed::topology::in_netns(&ns, move || count_resets(&flag))?)
            .context("starting the refusal counter")?;
        Ok(Refusals {
            stop,
            thread: Some(thread),
        })
    }

    fn finish(mut self) -> Result<Vec<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .context("the refusal counter was finished twice")?
            .join()
            .map_err(|_| anyhow::anyhow!("the refusal counter panicked"))?
    }
}

/// Unix ms of each reset this thread's namespace sent until `stop`.
fn count_resets(stop: &AtomicBool) -> Result<Vec<u64>> {
    // The thread's own namespace: /proc/net is the process'.
    let read = || -> Result<u64> {
        let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")
            .context("reading /proc/thread-self/net/snmp")?;
        procs::out_rsts(&snmp).context("no Tcp OutRsts in /proc/thread-self/net/snmp")
    };
    let mut last = read()?;
    let mut times = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(5));
        let now = read()?;
        let at = load::unix_ms();
        times.extend(std::iter::repeat_n(at, now.saturating_sub(last) as usize));
        last = now;
    }
    Ok(times)
}

fn timeline_chart(root: &Area, rows: &[&FailureRow]) -> Result<()> {
    let root = root.titled(
        "Backend failure: one backend of four killed, then restarted",
        (FONT, 22),
    )?;
    let panels = root.split_evenly((2, 1));
    let secs = |i: usize| (i as u64 * BIN_MS) as f64 / 1e3;
    let t_max = max_of(rows.iter().map(|r| {
        secs(r.failed_bins.len().max(r.refused_bins.len())).max(r.restart_ms as f64 / 1e3)
    }))
    .max(1.0)
        * 1.02;
    type Bins = fn(&FailureRow) -> &Vec<u32>;
    // Caption, axis, values, and what a legend entry counts.
    let series: [(&str, &str, Bins, &str); 2] = [
        (
            "failed handshakes per 100 ms",
            "failed handshakes",
            |r| &r.failed_bins,
            "failed",
        ),
        (
            "connection attempts the killed backend refused per 100 ms (health checks included)",
            "refused attempts",
            |r| &r.refused_bins,
            "refused",
        ),
    ];
    for ((caption, y_desc, values, counted), panel) in series.into_iter().zip(&panels) {
        let y_max = max_of(
            rows.iter()
                .flat_map(|r| values(r).iter().map(|v| *v as f64)),
        )
        .max(1.0)
            * 1.15;
        let mut chart = linear_axes(
            panel,
            caption,
            (t_max, y_max),
            ("seconds since the load started", y_desc),
        )?;
        // The schedule is every system's: mark it once, from the first row.
        if let Some(r) = rows.first() {
            for (what, ms) in [("kill", r.kill_ms), ("restart", r.restart_ms)] {
                let x = ms as f64 / 1e3;
                chart.draw_series(DashedLineSeries::new(
                    [(x, 0.0), (x, y_max)],
                    6,
                    4,
                    BLACK.stroke_width(1),
                ))?;
                chart.draw_series(std::iter::once(Text::new(
                    what,
                    (x, y_max * 0.97),
                    (FONT, 14),
                )))?;
            }
        }
        let mut colors = Colors::default();
        for r in rows {
            let points = finite(
                values(r)
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (secs(i), *v as f64)),
            );
            // Lines at zero hide under the axis: the legend says so.
            let total: u32 = values(r).iter().sum();
            let label = format!("{} ({} {counted})", r.system, fmt_int(u64::from(total)));
            labelled_line(&mut chart, points, colors.get(&r.system), label)?;
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sending_stops_after_the_last_bin_beyond_a_check() {
        let kill = 10_000;
        // A burst over the first 350 ms, then one check a second.
        let mut at: Vec<u64> = (0..35).map(|i| kill + i * 10).collect();
        at.extend([kill + 1_000, kill + 2_000, kill + 3_050]);
        assert_eq!(stopped_sending(&at, kill, kill + 5_000), Some(400));
        // Two attempts in one late bin: still sending then.
        at.extend([kill + 4_510, kill + 4_520]);
        assert_eq!(stopped_sending(&at, kill, kill + 5_000), Some(4_600));
        // Only checks: it never sent a client there.
        assert_eq!(
            stopped_sending(&[kill + 500, kill + 1_500], kill, kill + 5_000),
            Some(0)
        );
        // Attempts outside the down time do not count.
        assert_eq!(
            stopped_sending(
                &[kill - 5, kill - 1, kill + 5_000, kill + 5_001],
                kill,
                kill + 5_000
            ),
            Some(0)
        );
        assert_eq!(stopped_sending(&[], kill, kill), None);
    }

    #[test]
    fn bins_count_from_the_epoch() {
        assert_eq!(
            bins([1_000, 1_050, 1_250].into_iter(), 1_000),
            vec![2, 0, 1]
        );
        assert_eq!(bins(std::iter::empty(), 1_000), Vec::<u32>::new());
    }

    fn record(backend: Option<&str>, started_ms: u64, ending: &str) -> ConnRecord {
        ConnRecord {
            backend: backend.map(str::to_string),
            started_unix_us: started_ms * 1000,
            ending: ending.into(),
            ended_unix_ms: started_ms + 5,
        }
    }

    #[test]
    fn failures_after_detection_count_from_the_systems_word() {
        let epoch = 100_000;
        let m = Moments {
            kill: epoch + 2_000,
            restart: epoch + 7_000,
            down: Some(Said {
                read: epoch + 4_000,
                recorded: Some(epoch + 1_000),
            }),
            up: Some(Said {
                read: epoch + 9_000,
                recorded: None,
            }),
        };
        let conns = vec![
            record(Some("b0"), epoch + 100, "clean"),
            record(Some("b1"), epoch + 150, "clean"),
            record(Some("b0"), epoch + 1_990, "reset"),
            record(None, epoch + 2_100, "handshake:503"),
            record(None, epoch + 3_900, "handshake:503"),
            record(None, epoch + 4_100, "handshake:timeout"),
            record(Some("b2"), epoch + 5_000, "clean"),
            record(Some("b0"), epoch + 7_400, "clean"),
            record(Some("b0"), epoch + 7_900, "clean"),
        ];
        let s = Sizes::new(true);
        let refused: Vec<u64> = (0..30).map(|i| m.kill + i * 10).collect();
        let row = row_of(Kind::Weir, &s, epoch, &m, &conns, &refused);
        assert_eq!(row.handshakes_ok, 6);
        assert_eq!(row.handshakes_failed, 3);
        assert_eq!(row.failures["handshake:503"], 2);
        assert_eq!(row.failures["handshake:timeout"], 1);
        assert_eq!(row.cut, 1);
        assert_eq!(row.served_before_kill, 2);
        assert_eq!(row.detected_ms, Some(2_000));
        // Recorded in whole seconds: it may read before the kill.
        assert_eq!(row.recorded_down_ms, Some(-1_000));
        assert_eq!(row.recorded_up_ms, None);
        assert_eq!(row.stop_ms, Some(300));
        assert_eq!(row.failed_after_detection, 1);
        assert_eq!(row.refused, 30);
        assert_eq!(row.up_ms, Some(2_000));
        assert_eq!(row.back_in_use_ms, Some(400));
        assert_eq!((row.kill_ms, row.restart_ms), (2_000, 7_000));
        assert_eq!(row.failed_bins.iter().sum::<u32>(), 3);
        assert_eq!(row.failed_bins[21], 1);
        assert_eq!(row.refused_bins[20..23], [10, 10, 10]);

        // A system that says nothing: detection is when it stopped sending.
        let quiet = Moments {
            down: None,
            up: None,
            ..m
        };
        let row = row_of(Kind::Weir, &s, epoch, &quiet, &conns, &refused);
        assert_eq!(row.detected_ms, None);
        assert_eq!(row.failed_after_detection, 2);
    }
}
