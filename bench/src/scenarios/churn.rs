//! Backend churn: long-lived and arriving connections while the backend
//! set is replaced every few seconds, each system changed the way its
//! operators change it (weir's CLI, HAProxy's Runtime API, reloads).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::chart::{Area, Chart, Colors, FONT, finite, legend, max_of, short};
use crate::load::Talk;
use crate::procs;
use crate::results::{Endings, TimelinePoint};
use crate::scenario::{Outcome, Scenario};
use crate::stage::Bench;
use crate::systems::{Kind, Method, Running};
use crate::table::{
    Table, fmt_int, fmt_kib, fmt_num, is_weir, measured, median, peer_row, ratio, ratio_cells,
};

/// Two panels (open connections, failures) need more height than one chart.
const CHURN_SIZE: (u32, u32) = (960, 820);

/// Sizes of a full run, and of a quick one (`--quick`).
struct Sizes {
    churn_secs: u64,
    churn_period_secs: u64,
    churn_connections: usize,
    churn_arrivals: f64,
    /// How long an arriving connection lives: longer than the period, as
    /// WebSockets do, so every backend set has connections when it goes.
    churn_arrival_life_secs: u64,
    /// Drain window during churn (weir's window, HAProxy's wait before
    /// cutting): shorter than the period, so changes keep their pace.
    churn_drain_secs: u64,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                churn_secs: 20,
                churn_period_secs: 5,
                churn_connections: 100,
                churn_arrivals: 20.0,
                churn_arrival_life_secs: 10,
                churn_drain_secs: 2,
            }
        } else {
            Sizes {
                churn_secs: 60,
                churn_period_secs: 5,
                churn_connections: 500,
                churn_arrivals: 20.0,
                churn_arrival_life_secs: 30,
                churn_drain_secs: 2,
            }
        }
    }
}

pub struct Churn;

/// One system changed one way, over the whole run.
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

measured!(ChurnRow);

impl Scenario for Churn {
    const NAME: &'static str = "churn";
    const TITLE: &'static str = "Backend churn";
    const SYSTEMS: &'static [&'static str] =
        &["weir", "haproxy-api", "haproxy-reload", "nginx-reload"];
    const CHART: Option<Chart<ChurnRow>> = Some(Chart {
        file: "churn-timeline",
        size: CHURN_SIZE,
        draw: timeline_chart,
    });

    type Row = ChurnRow;

    fn run(b: &mut Bench) -> Result<Outcome<ChurnRow>> {
        let s = Sizes::new(b.sizes.quick);
        let mut out = Outcome::new(&[
            ("seconds", s.churn_secs.to_string()),
            ("replace_every_s", s.churn_period_secs.to_string()),
            (
                "long_lived",
                format!(
                    "{} at 10 msgs/s each, reconnect after any close",
                    s.churn_connections
                ),
            ),
            (
                "arrivals_per_s",
                format!(
                    "{} living {} s at 10 msgs/s",
                    s.churn_arrivals, s.churn_arrival_life_secs
                ),
            ),
            ("sets", "b0-b3 and b4-b7, alternating".into()),
            ("drain_window_s", s.churn_drain_secs.to_string()),
        ]);
        let set_a: Vec<SocketAddr> = (0..4).map(|i| b.backend(i)).collect();
        let set_b: Vec<SocketAddr> = (4..8).map(|i| b.backend(i)).collect();
        let cases = [
            (Kind::Weir, Method::WeirCli),
            (Kind::Haproxy, Method::HaproxyApi),
            (Kind::Haproxy, Method::Reload),
            (Kind::Nginx, Method::Reload),
        ];
        for (kind, method) in cases {
            let label = method.label(kind);
            let mut spec = b.spec(kind, set_a.clone(), 1);
            spec.drain_window = Some(Duration::from_secs(s.churn_drain_secs));
            if method == Method::Reload {
                // Both peers' defaults: old workers live as long as their
                // connections.
                spec.drain_window = None;
            }
            let (first, second) = (set_a.clone(), set_b.clone());
            match b.with_system(spec, "ch", |bench, sys| {
                churn_row(bench, &s, sys, method, &first, &second)
            }) {
                Ok(row) => out.rows.push(row),
                Err(e) => out.notes.push(format!("{label}: {e:#}")),
            }
        }
        Ok(out)
    }

    fn faults(rows: &[ChurnRow]) -> Vec<String> {
        let mut bad = Vec::new();
        for x in rows {
            if x.handshakes_ok == 0 || x.messages_echoed == 0 || x.changes == 0 {
                bad.push(format!(
                    "churn: {} moved no traffic or made no change",
                    x.system
                ));
            }
        }
        bad
    }

    fn section(out: &mut String, rows: &[ChurnRow]) {
        // Every non-weir method is a peer of its own: a reload and an API
        // change of the same proxy behave differently.
        let mut peers: Vec<&str> = Vec::new();
        for r in rows {
            if !is_weir(&r.system) && !peers.contains(&r.system.as_str()) {
                peers.push(&r.system);
            }
        }
        let ratio_headers: Vec<String> = peers.iter().map(|p| format!("weir/{p}")).collect();
        let mut header = vec![
            "system",
            "seconds",
            "changes",
            "change ms (median)",
            "handshakes ok",
            "handshakes failed",
            "cut",
            "closed by peer",
            "messages echoed",
            "processes after",
            "RSS before → after",
        ];
        header.extend(ratio_headers.iter().map(String::as_str));
        let mut t = Table::new(&header);
        let disrupted = |r: &ChurnRow| (r.handshakes_failed + r.cut) as f64;
        for r in rows {
            let w = is_weir(&r.system);
            let find = |p: &str| peer_row(rows, |_| (), p, &());
            let mut cells = vec![
                r.system.clone(),
                fmt_num(r.seconds),
                fmt_int(r.changes as u64),
                median(&r.change_ms).map_or_else(|| "–".into(), fmt_int),
                fmt_int(r.handshakes_ok),
                fmt_int(r.handshakes_failed),
                fmt_int(r.cut),
                fmt_int(r.closed_by_peer),
                fmt_int(r.messages_echoed),
                fmt_int(r.processes_after as u64),
                format!(
                    "{} → {}",
                    fmt_kib(r.rss_before_kib),
                    fmt_kib(r.rss_after_kib)
                ),
            ];
            cells.extend(ratio_cells(w, &peers, find, |p| {
                ratio(disrupted(p), disrupted(r))
            }));
            t.row(cells);
        }
        t.write(out);
        out.push_str(
            "\nRatios compare disrupted connections (failed handshakes + cut): peer ÷ weir; \
             – when either side had none, so read the counts.\n",
        );
    }
}

fn churn_row(
    b: &Bench,
    s: &Sizes,
    sys: &mut Running,
    method: Method,
    set_a: &[SocketAddr],
    set_b: &[SocketAddr],
) -> Result<ChurnRow> {
    let label = method.label(sys.spec.kind);
    std::thread::sleep(Duration::from_millis(300));
    let rss_before = procs::pss_kib(&sys.pids());
    let mut plan = b.plan(
        s.churn_connections,
        Talk::Open(10.0 * s.churn_connections as f64),
        64,
        s.churn_secs as f64,
    );
    plan.arrivals_per_sec = s.churn_arrivals;
    plan.arrival_life = Duration::from_secs(s.churn_arrival_life_secs);
    plan.arrival_interval = Duration::from_millis(100);
    plan.reconnect = true;
    b.progress(&format!(
        "{label}: load for {}s, backend set replaced every {}s",
        s.churn_secs, s.churn_period_secs
    ));
    let started = Instant::now();
    let clients = b.start_load(&plan, 1)?;
    let mut changes = Vec::new();
    let mut k = 1;
    loop {
        let at = started + Duration::from_secs(s.churn_period_secs * k);
        if at + Duration::from_secs(s.churn_period_secs)
            > started + Duration::from_secs(s.churn_secs)
        {
            break;
        }
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        let set = if k % 2 == 1 { set_b } else { set_a };
        let took = sys.set_backends(&b.topo, set, method)?;
        changes.push(took.as_millis() as u64);
        k += 1;
    }
    // The proxy's processes and memory while the last connections
    // are still open (old reload workers leave once theirs close).
    let end = started + Duration::from_secs(s.churn_secs);
    std::thread::sleep(end.saturating_duration_since(Instant::now() + Duration::from_secs(1)));
    let pids = sys.pids();
    let rss_after = procs::pss_kib(&pids);
    let r = Bench::wait_load(clients, Duration::from_secs(s.churn_secs + 90))?;
    let row = ChurnRow {
        system: label.clone(),
        seconds: s.churn_secs as f64,
        changes: changes.len(),
        change_ms: changes,
        handshakes_ok: r.handshakes_ok,
        handshakes_failed: r.handshakes_failed,
        cut: r.cut(),
        closed_by_peer: r.closed_by_peer(),
        messages_echoed: r.echoed,
        endings: r.endings.clone(),
        processes_after: pids.len(),
        rss_after_kib: rss_after,
        rss_before_kib: rss_before,
        timeline: r.timeline.clone(),
    };
    b.progress(&format!(
        "{label}: {} handshakes ok, {} failed, {} cut, {} processes after",
        r.handshakes_ok,
        r.handshakes_failed,
        r.cut(),
        pids.len()
    ));
    Ok(row)
}

fn timeline_chart(root: &Area, rows: &[&ChurnRow]) -> Result<()> {
    let root = root.titled(
        "Backend churn: connections while the backend set is replaced",
        (FONT, 22),
    )?;
    let panels = root.split_evenly((2, 1));
    let t_max = max_of(rows.iter().flat_map(|r| r.timeline.iter().map(|p| p.t_s))).max(1.0);

    type Value = fn(&TimelinePoint) -> f64;
    // Open connections stay near the top in a good run, failures near the
    // bottom: each legend goes where its lines usually are not.
    let series: [(&str, &str, Value, SeriesLabelPosition); 2] = [
        (
            "open connections",
            "open",
            |p| p.open as f64,
            SeriesLabelPosition::LowerLeft,
        ),
        (
            "failures per second (failed handshakes + cut connections)",
            "per second",
            |p| (p.new_failed + p.cut) as f64,
            SeriesLabelPosition::UpperRight,
        ),
    ];
    for ((caption, y_desc, value, position), panel) in series.into_iter().zip(&panels) {
        let y_max = max_of(rows.iter().flat_map(|r| r.timeline.iter().map(value))).max(1.0) * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .caption(caption, (FONT, 18))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..t_max, 0f64..y_max)?;
        chart
            .configure_mesh()
            .x_desc("seconds since start")
            .y_desc(y_desc)
            .y_label_formatter(&|y| short(*y))
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .draw()?;

        let mut colors = Colors::default();
        for r in rows {
            let color = colors.get(&r.system);
            let points = finite(r.timeline.iter().map(|p| (p.t_s, value(p))));
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(r.system.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        legend(&mut chart, position)?;
    }
    Ok(())
}
