//! Upgrades under load: thousands of WebSockets echo checked messages
//! while each system is upgraded or reloaded three times in a row, the way
//! its operators do it; what the clients saw (cut connections, Close
//! frames, bytes lost, duplicated or reordered, the longest stall) and
//! what the system still runs a while after the last upgrade.

use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use plotters::prelude::*;

use crate::chart::{
    Area, Chart, Colors, FONT, SIZE, finite, labelled_line, legend, marker, max_of, short,
};
use crate::load::checked::{HEADER, Tally};
use crate::load::{self, LoadResult, Talk};
use crate::procs;
use crate::results::{Endings, Latency, TimelinePoint};
use crate::scenario::{Outcome, Scenario};
use crate::scenarios::idle::processes_for;
use crate::stage::Bench;
use crate::systems::{Kind, Running};
use crate::table::{Table, fmt_bytes, fmt_endings, fmt_int, fmt_kib, fmt_us, measured};

/// Upgrades per system, one after the other.
pub const UPGRADES: usize = 3;
/// Bytes per message: the checked header and filler.
const MESSAGE_BYTES: usize = 128;
const _: () = assert!(MESSAGE_BYTES >= HEADER);
/// Messages per second each connection sends.
const PER_CONNECTION_RATE: f64 = 1.0;
/// How long one upgrade may take before the run gives up on it.
const UPGRADE_LIMIT: Duration = Duration::from_secs(60);

/// Sizes of a full run, and of a quick one (`--quick`).
struct Sizes {
    connections: usize,
    /// Traffic before the first upgrade: what the longest stall is
    /// compared with.
    warm_up: Duration,
    /// Traffic between one upgrade's end and the next one's start.
    between: Duration,
    /// After the last upgrade, until the processes left are counted.
    settle: Duration,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                connections: 300,
                warm_up: Duration::from_secs(3),
                between: Duration::from_secs(3),
                settle: Duration::from_secs(5),
            }
        } else {
            Sizes {
                connections: 10_000,
                warm_up: Duration::from_secs(10),
                between: Duration::from_secs(10),
                settle: Duration::from_secs(60),
            }
        }
    }
}

pub struct Upgrade;

/// One upgrade of a system.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UpgradeStep {
    /// Seconds from the start of the load to the upgrade command.
    pub at_s: f64,
    /// Until the new generation served (see `systems::Running::upgrade`).
    pub took_ms: u64,
    /// The longest echo that arrived from the command until the next
    /// upgrade (or the count of processes left).
    pub longest_stall_us: u64,
    /// What each shard's new generation said: what `weir upgrade` said
    /// moved, HAProxy's new worker command line, nginx's new workers.
    pub said: Vec<String>,
}

/// One system upgraded three times under load.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UpgradeRow {
    pub system: String,
    /// How it was upgraded.
    pub method: String,
    /// Connections asked for, and open when the first upgrade began.
    pub connections: usize,
    pub connected: u64,
    pub shards: usize,
    pub message_bytes: usize,
    /// Messages per second over all connections.
    pub rate: f64,
    pub upgrades: Vec<UpgradeStep>,
    /// How the connections ended: `clean` is the clients' own close at the
    /// end of the run.
    pub endings: Endings,
    /// Connections that ended in a reset or EOF without a Close, a timeout
    /// or an error.
    pub cut: u64,
    /// Connections the proxy closed with a Close frame.
    pub closed_by_peer: u64,
    /// The checked messages, counted.
    pub messages: Tally,
    /// Seconds from the start of the load until every connection was up.
    pub connected_at_s: f64,
    /// The longest time from a message's scheduled send to its echo, from
    /// the first whole second after every connection was up (the
    /// handshakes' own load is not an upgrade's) to the end, and over the
    /// same start to the first upgrade only (what the machine and the
    /// generator cost without an upgrade).
    pub longest_stall_us: u64,
    pub stall_before_us: u64,
    /// Echo latency over the whole run, handshakes included.
    pub latency: Latency,
    /// The system's processes (zombies not counted) and their memory just
    /// before the first upgrade, and `left_after_s` after the last one.
    pub processes_before: usize,
    pub rss_before_kib: u64,
    pub processes_left: usize,
    pub rss_left_kib: u64,
    pub pss_left_kib: u64,
    pub left_after_s: f64,
    /// The clients' seconds: open connections, cuts, Close frames and the
    /// longest echo of each.
    pub timeline: Vec<TimelinePoint>,
}

impl UpgradeRow {
    /// Bytes of `messages` checked messages.
    pub fn bytes(&self, messages: u64) -> u64 {
        messages * self.message_bytes as u64
    }
}

measured!(UpgradeRow);

impl Scenario for Upgrade {
    const NAME: &'static str = "upgrade";
    const TITLE: &'static str = "Upgrades under load";
    const SYSTEMS: &'static [&'static str] = &["weir", "haproxy", "nginx"];
    const CHART: Option<Chart<UpgradeRow>> = Some(Chart {
        file: "upgrade-stalls",
        size: SIZE,
        draw: stall_chart,
    });

    type Row = UpgradeRow;

    fn run(b: &mut Bench) -> Result<Outcome<UpgradeRow>> {
        let s = Sizes::new(b.sizes.quick);
        let shards = processes_for(s.connections);
        let mut out = Outcome::new(&[
            ("connections", s.connections.to_string()),
            ("shards", shards.to_string()),
            ("message_bytes", MESSAGE_BYTES.to_string()),
            ("msgs_per_s_per_connection", PER_CONNECTION_RATE.to_string()),
            ("upgrades", UPGRADES.to_string()),
            ("warm_up_s", s.warm_up.as_secs_f64().to_string()),
            ("between_s", s.between.as_secs_f64().to_string()),
            ("settle_s", s.settle.as_secs_f64().to_string()),
        ]);
        for kind in Kind::ALL {
            let mut spec = b.spec(kind, b.all_backends(), shards);
            // Each system's own default for what an old generation keeps:
            // HAProxy without `hard-stop-after`, nginx without
            // `worker_shutdown_timeout`, weir with `timeouts.takeover`.
            spec.drain_window = None;
            // Not with_system: an upgrade starts processes on the bench's
            // topology, which the system's run borrows.
            let row = Running::start(&mut b.topo, spec, "up").and_then(|mut sys| {
                let row = upgrade_row(b, &s, &mut sys);
                sys.stop(&mut b.topo);
                row
            });
            match row {
                Ok(row) => out.rows.push(row),
                Err(e) => out.notes.push(format!("{}: {e:#}", kind.name())),
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        Ok(out)
    }

    fn faults(rows: &[UpgradeRow]) -> Vec<String> {
        let mut bad = Vec::new();
        for x in rows {
            if x.connected == 0 || x.messages.intact == 0 {
                bad.push(format!("upgrade: {} moved no messages", x.system));
            }
            if x.upgrades.len() < UPGRADES {
                bad.push(format!(
                    "upgrade: {} was upgraded {} times of {UPGRADES}",
                    x.system,
                    x.upgrades.len()
                ));
            }
            if x.processes_left == 0 || x.rss_left_kib == 0 {
                bad.push(format!(
                    "upgrade: {}'s processes left were not measured",
                    x.system
                ));
            }
        }
        bad
    }

    fn section(out: &mut String, rows: &[UpgradeRow]) {
        let mut t = Table::new(&[
            "system",
            "method",
            "conns",
            "upgrades took",
            "cut",
            "Close frames",
            "bytes lost",
            "duplicated",
            "reordered",
            "corrupted / foreign",
            "longest stall",
            "before the upgrades",
            "processes before → left",
            "RSS before → left",
            "PSS left",
            "endings",
        ])
        .left(&["method", "upgrades took", "endings"]);
        for r in rows {
            let m = &r.messages;
            let took: Vec<String> = r
                .upgrades
                .iter()
                .map(|u| format!("{} ms", fmt_int(u.took_ms)))
                .collect();
            t.row(vec![
                r.system.clone(),
                r.method.clone(),
                format!(
                    "{} / {}",
                    fmt_int(r.connected),
                    fmt_int(r.connections as u64)
                ),
                took.join(", "),
                fmt_int(r.cut),
                fmt_int(r.closed_by_peer),
                bytes_cell(r, m.lost),
                bytes_cell(r, m.duplicated),
                bytes_cell(r, m.reordered),
                format!("{} / {}", fmt_int(m.corrupted), fmt_int(m.foreign)),
                fmt_us(r.longest_stall_us),
                fmt_us(r.stall_before_us),
                format!("{} → {}", r.processes_before, r.processes_left),
                format!(
                    "{} → {}",
                    fmt_kib(r.rss_before_kib),
                    fmt_kib(r.rss_left_kib)
                ),
                fmt_kib(r.pss_left_kib),
                fmt_endings(&r.endings),
            ]);
        }
        t.write(out);
        let settle = rows.first().map_or(0.0, |r| r.left_after_s);
        out.push_str(&format!(
            "\nEvery connection sends a checked message (its id, sequence number and a hash) \
             once a second and checks every echo. Cut: reset or EOF without a Close, timeout \
             or error; Close frames: connections the proxy closed. Bytes lost: messages \
             never echoed; duplicated: echoed twice; reordered: echoed after a later one; \
             corrupted: wrong hash or length; foreign: another connection's message. The \
             longest stall is the longest time from a message's scheduled send to its echo, \
             from the first whole second with every connection up to the end; \"before the \
             upgrades\" is the same until the first upgrade, what the machine and the \
             generator cost alone. Processes (and their summed RSS, and \
             PSS: shared pages once) are counted just before the first upgrade and {} s \
             after the last. Old generations keep each system's default: HAProxy has no \
             `hard-stop-after`, nginx no `worker_shutdown_timeout`, weir's \
             `timeouts.takeover` is 5 minutes.\n",
            fmt_int(settle as u64)
        ));
        let mut steps = Table::new(&["system", "upgrade", "at", "took", "longest stall", "said"])
            .left(&["said"]);
        for r in rows {
            for (i, u) in r.upgrades.iter().enumerate() {
                steps.row(vec![
                    r.system.clone(),
                    (i + 1).to_string(),
                    format!("{:.1} s", u.at_s),
                    format!("{} ms", fmt_int(u.took_ms)),
                    fmt_us(u.longest_stall_us),
                    u.said.join(" | "),
                ]);
            }
        }
        out.push('\n');
        steps.write(out);
        out.push_str(
            "\nPer upgrade: seconds from the start of the load to the command, how long until \
             the new generation served (weir: `weir upgrade` returned; HAProxy: the master's \
             `Loading success.`; nginx: all new workers started), the longest echo that \
             arrived from then until the next upgrade, and what each shard's new generation \
             said.\n",
        );
    }
}

fn bytes_cell(r: &UpgradeRow, messages: u64) -> String {
    if messages == 0 {
        "0".into()
    } else {
        format!(
            "{} ({} msgs)",
            fmt_bytes(r.bytes(messages) as f64),
            fmt_int(messages)
        )
    }
}

/// How each system is upgraded here.
fn method(kind: Kind) -> &'static str {
    match kind {
        Kind::Weir => "weir upgrade (weir run --takeover: a new process, the same binary)",
        Kind::Haproxy => "SIGUSR2 to the master (-W): re-exec, -sf old workers, -x listeners",
        Kind::Nginx => "nginx -s reload",
    }
}

/// Live processes of the system (an exited weir run stays a zombie
/// child of the bench until it is reaped).
fn live(sys: &Running) -> Vec<u32> {
    sys.pids()
        .into_iter()
        .filter(|p| procs::running(*p))
        .collect()
}

fn upgrade_row(b: &mut Bench, s: &Sizes, sys: &mut Running) -> Result<UpgradeRow> {
    let name = sys.spec.kind.name();
    let n = s.connections;
    let rate = n as f64 * PER_CONNECTION_RATE;
    let hold = b.scratch.join(format!("hold-upgrade-{name}"));
    let ready = b.scratch.join(format!("ready-upgrade-{name}"));
    let _ = std::fs::remove_file(&hold);
    let mut plan = b.plan(n, Talk::Checked(rate), MESSAGE_BYTES, 1800.0);
    plan.fleet.hold_file = Some(hold.clone());
    plan.fleet.ready_file = Some(ready);
    plan.fleet.connect_concurrency = 100;
    // A stall is measured, not ended: only a much longer silence cuts.
    plan.fleet.echo_timeout = Duration::from_secs(30);
    let epoch = plan.epoch_unix_ms;
    let since_epoch = || load::unix_ms().saturating_sub(epoch) as f64 / 1000.0;
    b.progress(&format!(
        "{name}: {n} connections, {rate} checked msgs/s ({} shards)",
        sys.spec.shards
    ));
    let gens = processes_for(n).max(2);
    let (clients, ready_files) = b.start_held(&plan, gens, Duration::from_secs(300))?;
    let upgraded = upgrades(b, s, sys, &ready_files, since_epoch);
    // Whatever happened, the clients close and report.
    std::fs::write(&hold, b"done")?;
    let load = Bench::wait_load(clients, Duration::from_secs(120));
    let _ = std::fs::remove_file(&hold);
    for f in &ready_files {
        let _ = std::fs::remove_file(f);
    }
    let mut row = upgraded?;
    let r = load?;
    b.progress(&format!(
        "{name}: {} cut, {} closed, {:?}",
        r.cut(),
        r.closed_by_peer(),
        r.checked
    ));
    fill_from_load(&mut row, &r, s.between)?;
    Ok(row)
}

/// The upgrades and the count of what is left, with the load running.
fn upgrades(
    b: &mut Bench,
    s: &Sizes,
    sys: &mut Running,
    ready_files: &[std::path::PathBuf],
    since_epoch: impl Fn() -> f64,
) -> Result<UpgradeRow> {
    let kind = sys.spec.kind;
    let name = kind.name();
    let connected = Bench::read_ready(ready_files)?.open;
    let connected_at_s = since_epoch();
    std::thread::sleep(s.warm_up);
    let before = live(sys);
    let mut row = UpgradeRow {
        system: name.into(),
        method: method(kind).into(),
        connections: s.connections,
        connected,
        connected_at_s,
        shards: sys.spec.shards,
        message_bytes: MESSAGE_BYTES,
        rate: s.connections as f64 * PER_CONNECTION_RATE,
        processes_before: before.len(),
        rss_before_kib: procs::rss_kib(&before),
        ..UpgradeRow::default()
    };
    for i in 1..=UPGRADES {
        let at_s = since_epoch();
        b.progress(&format!("{name}: upgrade {i} of {UPGRADES}"));
        let t0 = std::time::Instant::now();
        let said = sys
            .upgrade(&mut b.topo, UPGRADE_LIMIT)
            .with_context(|| format!("upgrade {i}"))?;
        let took_ms = t0.elapsed().as_millis() as u64;
        b.progress(&format!("{name}: upgrade {i} took {took_ms} ms: {said:?}"));
        row.upgrades.push(UpgradeStep {
            at_s,
            took_ms,
            longest_stall_us: 0,
            said,
        });
        if i < UPGRADES {
            std::thread::sleep(s.between);
        }
    }
    std::thread::sleep(s.settle);
    let left = live(sys);
    row.processes_left = left.len();
    row.rss_left_kib = procs::rss_kib(&left);
    row.pss_left_kib = procs::pss_kib(&left);
    row.left_after_s = s.settle.as_secs_f64();
    b.progress(&format!(
        "{name}: {} processes before, {} left {} s after the last upgrade, RSS {} KiB",
        row.processes_before,
        row.processes_left,
        s.settle.as_secs(),
        row.rss_left_kib
    ));
    Ok(row)
}

/// What the clients saw, into the row: endings, the checked messages and
/// the stalls, overall and before the first upgrade (both from the first
/// whole second with every connection up), and over each upgrade until the
/// next (at most `between` after it ended).
fn fill_from_load(row: &mut UpgradeRow, r: &LoadResult, between: Duration) -> Result<()> {
    row.endings = r.endings.clone();
    row.timeline = r.timeline.clone();
    row.cut = r.cut();
    row.closed_by_peer = r.closed_by_peer();
    row.messages = r
        .checked
        .clone()
        .context("the load generator counted no checked messages")?;
    row.latency = load::latency_of(&load::decode_histogram(&r.latency)?);
    let up = row.connected_at_s.ceil();
    let first = row.upgrades.first().map_or(f64::INFINITY, |u| u.at_s);
    row.longest_stall_us = worst(&r.timeline, up, f64::INFINITY);
    row.stall_before_us = worst(&r.timeline, up, first);
    // Each upgrade's window: until the next one, and as long after the
    // last one, so that the settling minute is not counted to it.
    let ends: Vec<f64> = row
        .upgrades
        .iter()
        .skip(1)
        .map(|u| u.at_s)
        .chain([f64::INFINITY])
        .collect();
    for (u, next) in row.upgrades.iter_mut().zip(ends) {
        let end = next.min(u.at_s + u.took_ms as f64 / 1000.0 + between.as_secs_f64());
        u.longest_stall_us = worst(&r.timeline, u.at_s, end);
    }
    Ok(())
}

/// The longest echo that arrived in the seconds of the timeline that
/// overlap `[from, to)` (seconds since the start of the load).
fn worst(timeline: &[TimelinePoint], from: f64, to: f64) -> u64 {
    timeline
        .iter()
        .filter(|p| p.t_s + 1.0 > from && p.t_s < to)
        .map(|p| p.max_echo_us)
        .max()
        .unwrap_or(0)
}

/// The longest echo of each second, per system, with the upgrade
/// commands marked on the time axis: a stall shows where it happened.
fn stall_chart(root: &Area, rows: &[&UpgradeRow]) -> Result<()> {
    let ms = |us: u64| us as f64 / 1000.0;
    let seconds = |r: &UpgradeRow| {
        r.timeline
            .iter()
            .filter(|p| p.max_echo_us > 0)
            .map(|p| (p.t_s, ms(p.max_echo_us)))
            .collect::<Vec<_>>()
    };
    let all: Vec<f64> = rows.iter().flat_map(|r| seconds(r)).map(|p| p.1).collect();
    let lo = all.iter().copied().fold(f64::MAX, f64::min).min(1.0) / 1.5;
    let hi = max_of(all.into_iter()).max(10.0) * 1.5;
    let t_max = max_of(rows.iter().flat_map(|r| r.timeline.iter().map(|p| p.t_s))).max(1.0) + 1.0;
    let mut chart = ChartBuilder::on(root)
        .caption(
            "Upgrades under load: the longest echo in each second",
            (FONT, 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..t_max, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("seconds since the load started (triangles: upgrade commands)")
        .y_desc("ms (log scale)")
        .y_label_formatter(&|y| short(*y))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()?;
    let mut colors = Colors::default();
    for r in rows {
        let color = colors.get(&r.system);
        labelled_line(
            &mut chart,
            finite(seconds(r).into_iter()),
            color,
            r.system.clone(),
        )?;
        chart.draw_series(
            r.upgrades
                .iter()
                .map(|u| marker((u.at_s, lo * 1.2), 1, color)),
        )?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(t_s: f64, max_echo_us: u64) -> TimelinePoint {
        TimelinePoint {
            t_s,
            max_echo_us,
            ..TimelinePoint::default()
        }
    }

    #[test]
    fn stalls_are_read_per_window_of_the_timeline() {
        let timeline: Vec<TimelinePoint> = [900_000, 1_000, 50_000, 2_000, 7_000, 3_000, 90_000]
            .iter()
            .enumerate()
            .map(|(t, us)| point(t as f64, *us))
            .collect();
        let r = LoadResult {
            timeline,
            checked: Some(Tally {
                sent: 10,
                intact: 10,
                ..Tally::default()
            }),
            endings: [("clean".to_string(), 3), ("eof".to_string(), 1)].into(),
            ..LoadResult::default()
        };
        let step = |at_s| UpgradeStep {
            at_s,
            ..UpgradeStep::default()
        };
        let mut row = UpgradeRow {
            connected_at_s: 0.4,
            upgrades: vec![step(2.5), step(4.2)],
            ..UpgradeRow::default()
        };
        let between = Duration::from_millis(1500);
        fill_from_load(&mut row, &r, between).unwrap();
        // Second 0, where the connections were still dialled, counts for
        // nothing; before the first upgrade: seconds 1 and 2.
        assert_eq!(row.stall_before_us, 50_000);
        assert_eq!(row.longest_stall_us, 90_000);
        // Until the next upgrade; the last one's window ends 1.5 s after
        // it, before the settling second 6.
        assert_eq!(row.upgrades[0].longest_stall_us, 50_000);
        assert_eq!(row.upgrades[1].longest_stall_us, 7_000);
        assert_eq!(row.latency.samples, 0, "no echo in the histogram");
        assert_eq!(row.timeline.len(), 7);
        assert_eq!((row.cut, row.closed_by_peer), (1, 0));
        assert_eq!(row.messages.intact, 10);
        // A run whose generator checked nothing is not a measurement.
        let unchecked = LoadResult { checked: None, ..r };
        assert!(fill_from_load(&mut row, &unchecked, between).is_err());
    }

    #[test]
    fn faults_want_messages_three_upgrades_and_the_processes_left() {
        let good = UpgradeRow {
            system: "weir".into(),
            connected: 10,
            messages: Tally {
                intact: 5,
                ..Tally::default()
            },
            upgrades: vec![UpgradeStep::default(); UPGRADES],
            processes_left: 1,
            rss_left_kib: 1,
            ..UpgradeRow::default()
        };
        assert!(Upgrade::faults(std::slice::from_ref(&good)).is_empty());
        let bad = UpgradeRow {
            system: "nginx".into(),
            upgrades: vec![UpgradeStep::default()],
            ..UpgradeRow::default()
        };
        assert_eq!(
            Upgrade::faults(&[good, bad]),
            vec![
                "upgrade: nginx moved no messages".to_string(),
                "upgrade: nginx was upgraded 1 times of 3".to_string(),
                "upgrade: nginx's processes left were not measured".to_string(),
            ]
        );
    }
}
