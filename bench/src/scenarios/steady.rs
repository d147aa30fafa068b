//! Steady echo: a fixed set of connections echoing messages of a few
//! sizes through each system, closed loop (throughput, CPU per message) and
//! open loop at a fixed rate (latency without coordinated omission), with
//! the generator against one backend directly as the baseline.

use anyhow::Result;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::chart::{Area, Chart, Colors, FONT, SIZE, legend, lighten, marker, max_of, short_us};
use crate::load::{self, Talk};
use crate::results::{CpuSplit, Latency};
use crate::scenario::{Outcome, Scenario};
use crate::stage::Bench;
use crate::systems::{Kind, Running};
use crate::table::{
    CPU_SPLIT, L7_PEERS, Table, fmt_cpu, fmt_int, fmt_num, fmt_us, is_weir, measured, peer_row,
    ratio, ratio_cells,
};

/// Sizes of a full run, and of a quick one (`--quick`).
struct Sizes {
    /// Open loop's offered rate per message size.
    steady_rates: Vec<(usize, f64)>,
    steady_connections: usize,
    steady_secs: u64,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                steady_connections: 50,
                steady_secs: 3,
                steady_rates: vec![(64, 10_000.0), (4096, 5_000.0), (16_384, 2_000.0)],
            }
        } else {
            Sizes {
                steady_connections: 200,
                steady_secs: 15,
                steady_rates: vec![(64, 20_000.0), (4096, 10_000.0), (16_384, 5_000.0)],
            }
        }
    }
}

pub struct Steady;

/// One system (or `direct`) at one message size: both loops.
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

measured!(SteadyRow);

impl Scenario for Steady {
    const NAME: &'static str = "steady";
    const TITLE: &'static str = "Steady echo";
    const SYSTEMS: &'static [&'static str] = &["weir", "haproxy", "nginx"];
    const CHART: Option<Chart<SteadyRow>> = Some(Chart {
        file: "steady-latency",
        size: SIZE,
        draw: latency_chart,
    });

    type Row = SteadyRow;

    fn run(b: &mut Bench) -> Result<Outcome<SteadyRow>> {
        let s = Sizes::new(b.sizes.quick);
        let mut out = Outcome::new(&[
            ("connections", s.steady_connections.to_string()),
            ("seconds_per_phase", s.steady_secs.to_string()),
            ("open_rates", format!("{:?}", s.steady_rates)),
            ("workers", b.sizes.workers.to_string()),
        ]);
        // `direct`: the generator against one echo backend, no proxy: what
        // the load side can do on its own.
        let mut systems: Vec<Option<Kind>> = vec![None];
        systems.extend(Kind::ALL.map(Some));
        for kind in systems {
            let name = kind.map(Kind::name).unwrap_or("direct");
            let rows = match kind {
                Some(k) => {
                    let spec = b.spec(k, b.all_backends(), 1);
                    b.with_system(spec, "st", |b, sys| system_rows(b, &s, name, Some(sys)))
                }
                None => system_rows(b, &s, name, None),
            };
            match rows {
                Ok(rows) => out.rows.extend(rows),
                Err(e) => out.notes.push(format!("{name}: {e:#}")),
            }
        }
        Ok(out)
    }

    fn faults(rows: &[SteadyRow]) -> Vec<String> {
        let mut bad = Vec::new();
        for x in rows {
            if x.closed_msgs_per_sec <= 0.0 || x.open_achieved <= 0.0 {
                bad.push(format!(
                    "steady: {} moved no messages at {} B",
                    x.system, x.message_bytes
                ));
            }
            if x.system != "direct" && x.closed_cpu.proxy_s <= 0.0 {
                bad.push(format!("steady: {}'s CPU time was not measured", x.system));
            }
        }
        bad
    }

    fn section(out: &mut String, rows: &[SteadyRow]) {
        let key = |r: &SteadyRow| (r.message_bytes, r.connections);
        let per_cpu_s = |r: &SteadyRow| 1e6 / r.cpu_s_per_million;

        out.push_str("### Closed loop: throughput and CPU\n\n");
        let mut t = Table::new(&[
            "system",
            "msg bytes",
            "conns",
            "msgs/s",
            "weir/haproxy (msgs/s)",
            "weir/nginx (msgs/s)",
            "proxy CPU s per M msgs",
            "msgs per proxy CPU s",
            "weir/haproxy (msgs per CPU s)",
            "weir/nginx (msgs per CPU s)",
            CPU_SPLIT,
            "errors",
        ])
        .left(&[CPU_SPLIT]);
        for r in rows {
            let w = is_weir(&r.system);
            let find = |p: &str| peer_row(rows, key, p, &key(r));
            let mut cells = vec![
                r.system.clone(),
                fmt_int(r.message_bytes as u64),
                fmt_int(r.connections as u64),
                fmt_num(r.closed_msgs_per_sec),
            ];
            cells.extend(ratio_cells(w, &L7_PEERS, find, |p| {
                ratio(r.closed_msgs_per_sec, p.closed_msgs_per_sec)
            }));
            cells.push(fmt_num(r.cpu_s_per_million));
            cells.push(if r.cpu_s_per_million > 0.0 {
                fmt_num(per_cpu_s(r))
            } else {
                "–".into()
            });
            // Messages per proxy CPU second: peer CPU per message over weir's.
            cells.extend(ratio_cells(w, &L7_PEERS, find, |p| {
                ratio(p.cpu_s_per_million, r.cpu_s_per_million)
            }));
            cells.push(fmt_cpu(&r.closed_cpu));
            cells.push(fmt_int(r.errors));
            t.row(cells);
        }
        t.write(out);
        out.push_str(
            "\nThe CPU split shows whether the generator or the backends, not the proxy, were the limit.\n",
        );

        out.push_str("\n### Open loop: latency at a fixed offered rate\n\n");
        let mut t = Table::new(&[
            "system",
            "msg bytes",
            "conns",
            "offered msgs/s",
            "achieved msgs/s",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "max",
            "samples",
            "weir/haproxy (p99)",
            "weir/nginx (p99)",
            CPU_SPLIT,
        ])
        .left(&[CPU_SPLIT]);
        for r in rows {
            let w = is_weir(&r.system);
            let find = |p: &str| peer_row(rows, key, p, &key(r));
            let l = &r.open_latency;
            let mut cells = vec![
                r.system.clone(),
                fmt_int(r.message_bytes as u64),
                fmt_int(r.connections as u64),
                fmt_num(r.open_rate),
                fmt_num(r.open_achieved),
            ];
            cells.extend(latency_cells(l));
            cells.push(fmt_int(l.samples));
            cells.extend(ratio_cells(w, &L7_PEERS, find, |p| {
                ratio(p99(&p.open_latency), p99(l))
            }));
            cells.push(fmt_cpu(&r.open_cpu));
            t.row(cells);
        }
        t.write(out);
        out.push_str(
            "\nLatency is measured from each message's scheduled send time (no coordinated omission); \
             the p99 ratio is peer p99 ÷ weir p99.\n",
        );
    }
}

fn system_rows(
    b: &Bench,
    s: &Sizes,
    name: &str,
    running: Option<&mut Running>,
) -> Result<Vec<SteadyRow>> {
    let running = running.map(|r| &*r);
    let mut rows = Vec::new();
    for &(bytes, rate) in &s.steady_rates {
        let url = match running {
            Some(_) => b.url(),
            None => format!("ws://{}/", b.backend(0)),
        };
        b.progress(&format!(
            "{name}, {bytes} B, closed loop, {}s",
            s.steady_secs
        ));
        let mut plan = b.plan(
            s.steady_connections,
            Talk::Closed,
            bytes,
            s.steady_secs as f64,
        );
        plan.fleet.url = url.clone();
        let (closed, closed_cpu) = b.measure(running, &plan, 2)?;
        b.progress(&format!("{name}, {bytes} B, open loop at {rate} msgs/s"));
        let mut plan = b.plan(
            s.steady_connections,
            Talk::Open(rate),
            bytes,
            s.steady_secs as f64,
        );
        plan.fleet.url = url;
        let (open, open_cpu) = b.measure(running, &plan, 2)?;
        let lat = load::latency_of(&load::decode_histogram(&open.latency)?);
        let closed_rate = closed.echoed as f64 / s.steady_secs as f64;
        rows.push(SteadyRow {
            system: name.into(),
            message_bytes: bytes,
            connections: s.steady_connections,
            closed_msgs_per_sec: closed_rate,
            cpu_s_per_million: if closed.echoed > 0 {
                closed_cpu.proxy_s / closed.echoed as f64 * 1e6
            } else {
                0.0
            },
            closed_cpu,
            open_rate: rate,
            open_achieved: open.echoed as f64 / s.steady_secs as f64,
            open_latency: lat,
            open_cpu,
            errors: closed.lost
                + open.lost
                + closed.cut()
                + open.cut()
                + closed.handshakes_failed
                + open.handshakes_failed,
        });
    }
    Ok(rows)
}

/// Percentile cells; `–` when nothing was sampled, since the zeros of an
/// empty histogram are not a latency.
fn latency_cells(l: &Latency) -> Vec<String> {
    [l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us]
        .iter()
        .map(|&v| {
            if l.samples == 0 {
                "–".into()
            } else {
                fmt_us(v)
            }
        })
        .collect()
}

/// p99 for ratios: 0 (shown as –) when nothing was sampled.
fn p99(l: &Latency) -> f64 {
    if l.samples == 0 { 0.0 } else { l.p99_us as f64 }
}

const PERCENTILES: [&str; 5] = ["p50", "p90", "p99", "p99.9", "max"];

fn latency_chart(root: &Area, rows: &[&SteadyRow]) -> Result<()> {
    let value = |r: &SteadyRow| {
        let l = &r.open_latency;
        [l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us].map(|v| v.max(1) as f64)
    };
    // Rows without samples measured nothing: plotting them would draw a
    // fake 1 µs line, so they only get a legend entry.
    let measured = |r: &SteadyRow| r.open_latency.samples > 0;
    let all: Vec<f64> = rows
        .iter()
        .filter(|r| measured(r))
        .flat_map(|r| value(r))
        .collect();
    let (lo, hi) = if all.is_empty() {
        (1.0, 1000.0)
    } else {
        let lo = all.iter().copied().fold(f64::MAX, f64::min);
        (lo, max_of(all.into_iter()))
    };
    let (lo, hi) = ((lo / 1.5).max(0.5), hi * 1.5);

    let several_conns = rows.iter().any(|r| r.connections != rows[0].connections);
    let mut chart = ChartBuilder::on(root)
        .caption(
            "Steady echo: open-loop latency percentiles (from scheduled send time)",
            (FONT, 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.3f64..4.3, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .x_labels(PERCENTILES.len())
        .disable_x_mesh()
        .y_desc("latency (log scale)")
        .x_label_formatter(&|x| {
            // Only whole positions are percentiles.
            if (x - x.round()).abs() > 1e-6 || *x < 0.0 {
                return String::new();
            }
            PERCENTILES
                .get(x.round() as usize)
                .copied()
                .unwrap_or("")
                .to_string()
        })
        .y_label_formatter(&|y| short_us(*y))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()?;

    let mut colors = Colors::default();
    // Variants (message sizes, connection counts) of one system share its
    // hue, lighter and with another marker, so systems stay recognisable.
    for (i, r) in rows.iter().enumerate() {
        let k = rows[..i].iter().filter(|x| x.system == r.system).count();
        let total = rows.iter().filter(|x| x.system == r.system).count();
        let color = lighten(colors.get(&r.system), k as f64 / (total as f64 + 1.0));
        let mut label = format!("{} {} B", r.system, r.message_bytes);
        if several_conns {
            label.push_str(&format!(" × {} conns", r.connections));
        }
        let points: Vec<(f64, f64)> = if measured(r) {
            value(r)
                .into_iter()
                .enumerate()
                .map(|(i, v)| (i as f64, v))
                .collect()
        } else {
            label.push_str(" (no samples)");
            Vec::new()
        };
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(points.into_iter().map(|p| marker(p, k, color)))?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)
}
