//! Reconnect storm: a fleet of idle WebSockets all dropped at one instant
//! and all dialled again at once, without pacing or backoff, as after a
//! network blip: how long until every client is back, the reconnect curve,
//! the failures by kind and the proxy's CPU for the storm.
//!
//! How the drop is made (a reset from every client at a shared instant)
//! is in [`crate::load`]'s storm module.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use plotters::prelude::SeriesLabelPosition;
use serde::{Deserialize, Serialize};

use crate::chart::{
    Area, Chart, Colors, SIZE, finite, labelled_line, legend, linear_axes, max_of, short,
};
use crate::load::{self, StormPlan, Talk};
use crate::procs;
use crate::results::Endings;
use crate::scenario::{Outcome, Scenario};
use crate::scenarios::idle::processes_for;
use crate::stage::{Bench, with_suffix};
use crate::systems::{Kind, Running};
use crate::table::{
    L7_PEERS, Table, fmt_endings, fmt_f, fmt_int, fmt_pct, is_weir, measured, peer_row, ratio,
    ratio_cells,
};

/// How long a dropped client keeps trying to come back.
const GIVE_UP: Duration = Duration::from_secs(60);
/// A client's limit for connect + handshake: long enough that a slow
/// answer on this shared machine is not retried (which would add load),
/// short enough to show a proxy that does not answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Points of the reconnect curve kept per system.
const CURVE_POINTS: usize = 200;

pub struct Storm;

/// One system through one storm.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StormRow {
    pub system: String,
    /// Connections asked for before the storm.
    pub connections: usize,
    /// Proxy processes (and generator processes) the connections were
    /// spread over, as in `idle`.
    pub shards: usize,
    /// Connections open at the instant, and so dropped.
    pub dropped: u64,
    /// Dropped connections that came back (upgraded, one echo answered).
    pub back: u64,
    /// From the drop until the last one was back, ms; 0 when some never
    /// came back.
    pub all_back_ms: f64,
    pub p50_back_ms: f64,
    pub p99_back_ms: f64,
    /// Failed attempts to come back, by ending (see
    /// [`crate::load::StormResult::failures`]).
    pub failures: Endings,
    pub gave_up: u64,
    /// CPU seconds from the drop until every generator process reported
    /// its connections back or given up.
    pub proxy_cpu_s: f64,
    pub generator_cpu_s: f64,
    /// Connection requests the proxy's listeners dropped meanwhile (full
    /// accept queues): each costs its client a SYN retransmission, 1 s or
    /// more.
    #[serde(default)]
    pub listen_drops: u64,
    /// Connections back over time: (ms since the drop, connections back).
    pub curve: Vec<(f64, u64)>,
    /// Connections that answered a ping at the end of the run.
    pub alive_at_end: u64,
}

measured!(StormRow);

/// Sizes of a full run, and of a quick one (`--quick`).
fn connections(quick: bool) -> usize {
    if quick { 2_000 } else { 20_000 }
}

impl Scenario for Storm {
    const NAME: &'static str = "storm";
    const TITLE: &'static str = "Reconnect storm";
    const SYSTEMS: &'static [&'static str] = &["weir", "haproxy", "nginx"];
    const CHART: Option<Chart<StormRow>> = Some(Chart {
        file: "storm",
        size: SIZE,
        draw: curve_chart,
    });

    type Row = StormRow;

    fn run(b: &mut Bench) -> Result<Outcome<StormRow>> {
        let n = connections(b.sizes.quick);
        let shards = processes_for(n);
        let mut out = Outcome::new(&[
            ("connections", n.to_string()),
            ("shards", shards.to_string()),
            (
                "drop",
                "every client resets its connection (SO_LINGER 0) at one shared instant".into(),
            ),
            (
                "reconnect",
                format!(
                    "at once, no pacing, {} s to connect and upgrade; a failed attempt retried \
                     at once for up to {} s",
                    CONNECT_TIMEOUT.as_secs(),
                    GIVE_UP.as_secs()
                ),
            ),
        ]);
        for kind in Kind::ALL {
            let spec = b.spec(kind, b.all_backends(), shards);
            match b.with_system(spec, "st", |b, sys| storm_row(b, sys, n, shards)) {
                Ok(row) => out.rows.push(row),
                Err(e) => out.notes.push(format!("{}: {e:#}", kind.name())),
            }
            // Let the storm's sockets leave TIME_WAIT before the next system.
            std::thread::sleep(Duration::from_secs(2));
        }
        Ok(out)
    }

    fn faults(rows: &[StormRow]) -> Vec<String> {
        let mut bad = Vec::new();
        for x in rows {
            if x.dropped == 0 || x.back == 0 {
                bad.push(format!(
                    "storm: {} dropped {} and brought back {}",
                    x.system, x.dropped, x.back
                ));
            }
            if x.proxy_cpu_s <= 0.0 {
                bad.push(format!("storm: {}'s CPU was not measured", x.system));
            }
        }
        bad
    }

    fn section(out: &mut String, rows: &[StormRow]) {
        let mut t = Table::new(&[
            "system",
            "dropped",
            "back",
            "all back after",
            "weir/haproxy (time)",
            "weir/nginx (time)",
            "p50 / p99 back",
            "proxy CPU s",
            "weir/haproxy (CPU)",
            "weir/nginx (CPU)",
            "generator CPU s",
            "listen drops",
            "failed attempts",
            "alive at end",
        ])
        .left(&["failed attempts"]);
        for r in rows {
            let w = is_weir(&r.system);
            let find = |p: &str| peer_row(rows, |x| x.connections, p, &r.connections);
            let mut cells = vec![
                r.system.clone(),
                fmt_int(r.dropped),
                format!(
                    "{} ({})",
                    fmt_int(r.back),
                    fmt_pct(r.back as f64, r.dropped as f64)
                ),
                fmt_ms(r.all_back_ms),
            ];
            cells.extend(ratio_cells(w, &L7_PEERS, find, |p| {
                ratio(p.all_back_ms, r.all_back_ms)
            }));
            cells.push(format!(
                "{} / {}",
                fmt_ms(r.p50_back_ms),
                fmt_ms(r.p99_back_ms)
            ));
            cells.push(fmt_f(r.proxy_cpu_s, 2));
            cells.extend(ratio_cells(w, &L7_PEERS, find, |p| {
                ratio(p.proxy_cpu_s, r.proxy_cpu_s)
            }));
            cells.push(fmt_f(r.generator_cpu_s, 2));
            cells.push(fmt_int(r.listen_drops));
            cells.push(if r.failures.is_empty() && r.gave_up == 0 {
                "none".into()
            } else {
                format!("{}; gave up: {}", fmt_endings(&r.failures), r.gave_up)
            });
            cells.push(fmt_int(r.alive_at_end));
            t.row(cells);
        }
        t.write(out);
        out.push_str(
            "\nEvery client resets its connection (SO_LINGER 0) at one instant shared by the \
             generator processes, so the proxy tears down the old connections while the new \
             ones arrive; each client dials again at once, without pacing, and retries a \
             failed attempt at once. \"back\" is upgraded and one echo answered; times are \
             from the drop. Ratios are peer ÷ weir (time, CPU): > 1 means weir was back \
             sooner or spent less. Failed attempts by ending: `handshake:STATUS` (answered \
             without upgrading), `handshake:connect` (refused), `handshake:timeout`, \
             `handshake:io` (reset during the handshake), `reset`/`eof`/`timeout` of the \
             first echo. \"listen drops\" are connection requests the lb host's kernel \
             dropped because a listener's accept queue was full (TcpExt ListenDrops): each \
             costs its client a SYN retransmission. The generator shares the cores: its CPU \
             is shown beside the proxy's.\n",
        );
    }
}

fn fmt_ms(ms: f64) -> String {
    if ms > 0.0 {
        format!("{} ms", fmt_f(ms, 0))
    } else {
        "–".into()
    }
}

fn storm_row(b: &Bench, sys: &Running, n: usize, shards: usize) -> Result<StormRow> {
    let name = sys.spec.kind.name();
    let file = |what: &str| b.scratch.join(format!("storm-{what}-{name}"));
    let (hold, ready, signal, done) = (file("hold"), file("ready"), file("at"), file("done"));
    for f in [&hold, &signal] {
        let _ = std::fs::remove_file(f);
    }
    let mut plan = b.plan(n, Talk::Idle, 64, 600.0);
    plan.fleet.hold_file = Some(hold.clone());
    plan.fleet.ready_file = Some(ready);
    plan.fleet.connect_concurrency = 100;
    plan.fleet.connect_timeout = CONNECT_TIMEOUT;
    plan.storm = Some(StormPlan {
        signal_file: signal.clone(),
        done_file: done.clone(),
        give_up: GIVE_UP,
    });
    b.progress(&format!("{name}: opening {n} idle connections"));
    let (clients, ready_files) = b.start_held(&plan, shards, Duration::from_secs(300))?;
    let done_files: Vec<PathBuf> = (0..shards).map(|k| with_suffix(&done, k)).collect();
    for f in &done_files {
        let _ = std::fs::remove_file(f);
    }
    let gens: Vec<u32> = clients.iter().map(|c| c.pid()).collect();
    let up = Bench::read_ready(&ready_files)?.open;
    std::thread::sleep(Duration::from_secs(1));

    // The instant, far enough ahead for every process to read it.
    let at_ms = load::unix_ms() + 500;
    let tmp = signal.with_extension("tmp");
    std::fs::write(&tmp, format!("{at_ms}\n"))?;
    std::fs::rename(&tmp, &signal)?;
    std::thread::sleep(Duration::from_millis(at_ms.saturating_sub(load::unix_ms())));
    let p0 = procs::cpu_by_pid(&sys.pids());
    let g0 = procs::cpu_by_pid(&procs::tree(&gens));
    let drops0 = b.lb_listen_drops()?;
    b.progress(&format!("{name}: {up} open, all dropped now"));
    let limit = Instant::now() + GIVE_UP + Duration::from_secs(15);
    while !done_files.iter().all(|f| f.exists()) && Instant::now() < limit {
        std::thread::sleep(Duration::from_millis(20));
    }
    let proxy_cpu_s = procs::cpu_delta(&p0, &procs::cpu_by_pid(&sys.pids()));
    let generator_cpu_s = procs::cpu_delta(&g0, &procs::cpu_by_pid(&procs::tree(&gens)));
    let listen_drops = b.lb_listen_drops()?.saturating_sub(drops0);

    std::fs::write(&hold, b"done")?;
    let r = Bench::wait_load(clients, Duration::from_secs(300));
    for f in [&hold, &signal]
        .into_iter()
        .chain(&ready_files)
        .chain(&done_files)
    {
        let _ = std::fs::remove_file(f);
    }
    let r = r?;
    let storm = r.storm.context("the generators reported no storm")?;
    let back = storm.back_us.len() as u64;
    let ms = |q: f64| match storm.back_us.len() {
        0 => 0.0,
        len => storm.back_us[((len - 1) as f64 * q).round() as usize] as f64 / 1e3,
    };
    let row = StormRow {
        system: name.into(),
        connections: n,
        shards,
        dropped: storm.dropped,
        back,
        all_back_ms: if back == storm.dropped { ms(1.0) } else { 0.0 },
        p50_back_ms: ms(0.5),
        p99_back_ms: ms(0.99),
        failures: storm.failures.clone(),
        gave_up: storm.gave_up,
        proxy_cpu_s,
        generator_cpu_s,
        listen_drops,
        curve: curve(&storm.back_us),
        alive_at_end: r.alive_at_end,
    };
    b.progress(&format!(
        "{name}: {back} of {} back, all after {} ms, proxy {:.2} CPU s",
        storm.dropped, row.all_back_ms, proxy_cpu_s
    ));
    Ok(row)
}

/// At most [`CURVE_POINTS`] points of (ms since the drop, connections
/// back), from the first back to the last.
fn curve(back_us: &[u64]) -> Vec<(f64, u64)> {
    let step = back_us.len().div_ceil(CURVE_POINTS).max(1);
    let mut points = vec![(0.0, 0)];
    for (i, us) in back_us.iter().enumerate() {
        if (i + 1) % step == 0 || i + 1 == back_us.len() {
            points.push((*us as f64 / 1e3, i as u64 + 1));
        }
    }
    points
}

fn curve_chart(root: &Area, rows: &[&StormRow]) -> Result<()> {
    let x_max = max_of(rows.iter().flat_map(|r| r.curve.iter().map(|p| p.0))).max(1.0) * 1.05;
    let y_max = max_of(rows.iter().map(|r| r.dropped as f64)).max(1.0) * 1.08;
    let mut chart = linear_axes(
        root,
        "Reconnect storm: connections back after all were dropped",
        (x_max, y_max),
        (
            "ms since the drop",
            "connections back (upgraded, one echo answered)",
        ),
    )?;
    let mut colors = Colors::default();
    for r in rows {
        let color = colors.get(&r.system);
        let points = finite(r.curve.iter().map(|&(ms, n)| (ms, n as f64)));
        let label = if r.all_back_ms > 0.0 {
            format!(
                "{} ({} back in {} ms)",
                r.system,
                short(r.back as f64),
                fmt_f(r.all_back_ms, 0)
            )
        } else {
            format!(
                "{} ({} of {} back)",
                r.system,
                short(r.back as f64),
                short(r.dropped as f64)
            )
        };
        labelled_line(&mut chart, points, color, label)?;
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_curve_keeps_its_ends_and_stays_small() {
        let back: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let c = curve(&back);
        assert!(c.len() <= CURVE_POINTS + 1, "{}", c.len());
        assert_eq!(c[0], (0.0, 0));
        assert_eq!(*c.last().unwrap(), (1000.0, 1000));
        assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
        assert_eq!(curve(&[]), vec![(0.0, 0)]);
        assert_eq!(curve(&[2500]), vec![(0.0, 0), (2.5, 1)]);
    }
}
