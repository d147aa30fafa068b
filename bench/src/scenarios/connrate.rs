//! Connection rate ramp: new connections per second (handshake, one echo,
//! close) offered in rising steps until a system fails, falls behind or
//! queues handshakes; the highest clean rate and its CPU cost.

use std::time::Duration;

use anyhow::Result;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::chart::{Area, Chart, Colors, FONT, SIZE, finite, legend, max_of, short};
use crate::load::{self, Talk};
use crate::results::{CpuSplit, Endings, Latency};
use crate::scenario::{Outcome, Scenario};
use crate::stage::Bench;
use crate::systems::{Kind, Running};
use crate::table::{
    CPU_SPLIT, L7_PEERS, Table, fmt_cpu, fmt_int, fmt_num, fmt_us, is_weir, latency_cells,
    measured, or_dash, peer_row, ratio, ratio_cells, tail_ratio_cells,
};

/// Sizes of a full run, and of a quick one (`--quick`).
struct Sizes {
    connrate_steps: Vec<f64>,
    connrate_step_secs: u64,
    share_step_secs: u64,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                connrate_steps: vec![250.0, 500.0, 1000.0, 2000.0, 4000.0],
                connrate_step_secs: 2,
                share_step_secs: 3,
            }
        } else {
            Sizes {
                connrate_steps: vec![
                    1000.0, 2000.0, 4000.0, 6000.0, 8000.0, 10_000.0, 12_000.0, 16_000.0,
                ],
                connrate_step_secs: 4,
                share_step_secs: 10,
            }
        }
    }
}

pub struct Connrate;

/// One step of a ramp: a rate offered for a few seconds.
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

impl ConnrateStep {
    /// Handshakes completed per proxy CPU second: the cost of a
    /// connection. 0 when no CPU was read.
    pub fn handshakes_per_cpu_s(&self) -> f64 {
        if self.cpu.proxy_s > 0.0 {
            self.ok as f64 / self.cpu.proxy_s
        } else {
            0.0
        }
    }
}

/// A connection-rate step whose handshake p99 exceeds this is saturated:
/// handshakes queue instead of completing at the offered rate.
pub const CLEAN_HANDSHAKE_P99_US: u64 = 500_000;

/// One system's ramp.
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
    /// One longer step at [`AT_SHARE`] of weir's highest clean rate, the
    /// same offer for every system: handshake latency and cost compared at
    /// one rate, where the ramp's own maxima differ between systems.
    #[serde(default)]
    pub at_share: Option<ConnrateStep>,
}

/// Share of weir's highest clean rate offered to every system in the
/// equal-rate step.
pub const AT_SHARE: f64 = 0.8;

measured!(ConnrateRow);

impl Scenario for Connrate {
    const NAME: &'static str = "connrate";
    const TITLE: &'static str = "Connection rate ramp";
    const SYSTEMS: &'static [&'static str] = &["weir", "haproxy", "nginx"];
    const CHART: Option<Chart<ConnrateRow>> = Some(Chart {
        file: "connrate",
        size: SIZE,
        draw: ramp_chart,
    });

    type Row = ConnrateRow;

    fn run(b: &mut Bench) -> Result<Outcome<ConnrateRow>> {
        let s = Sizes::new(b.sizes.quick);
        let mut out = Outcome::new(&[
            ("steps", format!("{:?}", s.connrate_steps)),
            ("step_seconds", s.connrate_step_secs.to_string()),
            (
                "per_connection",
                "handshake, one 64 B echo, close 1000".into(),
            ),
        ]);
        // weir's ramp runs first: its highest clean rate sets the offer of
        // every system's equal-rate step.
        let mut share_rate = None;
        for kind in Kind::ALL {
            let spec = b.spec(kind, b.all_backends(), 1);
            let measured = b.with_system(spec, "cr", |b, sys| {
                let mut row = connrate_row(b, &s, sys)?;
                if kind == Kind::Weir && row.max_clean_rate > 0.0 {
                    share_rate = Some((row.max_clean_rate * AT_SHARE / 10.0).round() * 10.0);
                }
                if let Some(rate) = share_rate {
                    std::thread::sleep(Duration::from_secs(2));
                    b.progress(&format!(
                        "{}: {rate} handshakes/s for {}s ({:.0}% of weir's highest clean rate)",
                        kind.name(),
                        s.share_step_secs,
                        AT_SHARE * 100.0
                    ));
                    row.at_share = Some(step(b, sys, rate, s.share_step_secs)?.0);
                }
                Ok(row)
            });
            match measured {
                Ok(row) => out.rows.push(row),
                Err(e) => out.notes.push(format!("{}: {e:#}", kind.name())),
            }
        }
        if share_rate.is_none() {
            out.notes.push(
                "no equal-rate step: weir had no clean step, so there is no rate to compare at"
                    .into(),
            );
        }
        Ok(out)
    }

    fn faults(rows: &[ConnrateRow]) -> Vec<String> {
        let mut bad = Vec::new();
        for x in rows {
            if x.steps.iter().all(|s| s.ok == 0) {
                bad.push(format!("connrate: {} completed no handshake", x.system));
            }
        }
        bad
    }

    fn section(out: &mut String, rows: &[ConnrateRow]) {
        let mut t = Table::new(&[
            "system",
            "steps",
            "max clean handshakes/s",
            "weir/haproxy",
            "weir/nginx",
            "handshakes per proxy CPU s",
            "weir/haproxy (per CPU s)",
            "weir/nginx (per CPU s)",
            "stopped by",
            "last step: offered / achieved / failed",
            "handshake p99 at max clean",
        ])
        .left(&["stopped by"]);
        for r in rows {
            let w = is_weir(&r.system);
            let find = |p: &str| peer_row(rows, |_| (), p, &());
            let mut cells = vec![
                r.system.clone(),
                fmt_int(r.steps.len() as u64),
                fmt_num(r.max_clean_rate),
            ];
            cells.extend(ratio_cells(w, &L7_PEERS, find, |p| {
                ratio(r.max_clean_rate, p.max_clean_rate)
            }));
            cells.push(fmt_num(r.handshakes_per_cpu_s));
            cells.extend(ratio_cells(w, &L7_PEERS, find, |p| {
                ratio(r.handshakes_per_cpu_s, p.handshakes_per_cpu_s)
            }));
            cells.push(or_dash(&r.stopped_by).to_string());
            cells.push(match r.steps.last() {
                Some(s) => format!(
                    "{} / {} / {}",
                    fmt_num(s.target),
                    fmt_num(s.achieved),
                    fmt_int(s.failed)
                ),
                None => "–".into(),
            });
            let best = r.steps.iter().find(|s| s.achieved == r.max_clean_rate);
            cells.push(match best {
                Some(s) if s.handshake.samples > 0 => fmt_us(s.handshake.p99_us),
                _ => "–".into(),
            });
            t.row(cells);
        }
        t.write(out);
        out.push_str(
            "\nA clean step has no failure, completes at least 90% of the offer with the \
             generator on time, and keeps the handshake p99 under 500 ms. `stopped by`: \
             `errors` (a step failed), `generator` (could not offer the rate), `saturated` \
             (completed well under the offer, or handshakes queued), `cap` (ramp ended). On a \
             small machine the proxy, the generator and the backends share the cores, so the \
             highest clean rate is partly the machine's; handshakes per proxy CPU second is \
             the proxy's own cost.\n",
        );
        share_section(out, rows);
    }
}

fn connrate_row(b: &Bench, s: &Sizes, sys: &Running) -> Result<ConnrateRow> {
    let name = sys.spec.kind.name();
    let mut row = ConnrateRow {
        system: name.into(),
        stopped_by: "cap".into(),
        ..ConnrateRow::default()
    };
    for &target in &s.connrate_steps {
        b.progress(&format!(
            "{name}: {target} handshakes/s for {}s",
            s.connrate_step_secs
        ));
        let (step, late) = step(b, sys, target, s.connrate_step_secs)?;
        let failed = step.failed > 0;
        let saturated =
            step.achieved < 0.9 * target || step.handshake.p99_us > CLEAN_HANDSHAKE_P99_US;
        if !failed && !saturated && !late && step.achieved > row.max_clean_rate {
            row.max_clean_rate = step.achieved;
            row.handshakes_per_cpu_s = step.handshakes_per_cpu_s();
        }
        row.steps.push(step);
        if failed || saturated || late {
            row.stopped_by = if failed {
                "errors"
            } else if late {
                "generator"
            } else {
                "saturated"
            }
            .into();
            break;
        }
        // Let the step's TIME_WAIT and backlog drain.
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(row)
}

/// The equal-rate step: every system offered the same share of weir's
/// highest clean rate.
fn share_section(out: &mut String, rows: &[ConnrateRow]) {
    let Some(rate) = rows
        .iter()
        .find_map(|r| r.at_share.as_ref().map(|s| s.target))
    else {
        return;
    };
    out.push_str(&format!(
        "\n### At {:.0}% of weir's highest clean rate: {} handshakes/s for every system\n\n",
        AT_SHARE * 100.0,
        fmt_num(rate)
    ));
    let mut t = Table::new(&[
        "system",
        "offered / achieved / failed",
        "handshake p50",
        "p90",
        "p99",
        "p99.9",
        "max",
        "weir/haproxy (p99)",
        "weir/nginx (p99)",
        "weir/haproxy (p99.9)",
        "weir/nginx (p99.9)",
        "handshakes per proxy CPU s",
        "weir/haproxy (per CPU s)",
        "weir/nginx (per CPU s)",
        CPU_SPLIT,
    ])
    .left(&[CPU_SPLIT]);
    for r in rows {
        let Some(s) = &r.at_share else { continue };
        let w = is_weir(&r.system);
        let find = |p: &str| peer_row(rows, |_| (), p, &()).and_then(|p| p.at_share.as_ref());
        let mut cells = vec![
            r.system.clone(),
            format!(
                "{} / {} / {}",
                fmt_num(s.target),
                fmt_num(s.achieved),
                fmt_int(s.failed)
            ),
        ];
        cells.extend(latency_cells(&s.handshake));
        cells.extend(tail_ratio_cells(
            w,
            &L7_PEERS,
            |p| find(p).map(|x| &x.handshake),
            &s.handshake,
        ));
        cells.push(fmt_num(s.handshakes_per_cpu_s()));
        cells.extend(ratio_cells(w, &L7_PEERS, find, |p| {
            ratio(s.handshakes_per_cpu_s(), p.handshakes_per_cpu_s())
        }));
        cells.push(fmt_cpu(&s.cpu));
        t.row(cells);
    }
    t.write(out);
    out.push_str(&format!(
        "\nEvery system gets the same offer, {:.0}% of the highest rate weir completed \
         cleanly in its ramp, for longer than a ramp step. Latency ratios are peer ÷ weir; \
         handshakes per proxy CPU second at one rate compare the cost of a connection \
         without the batching a higher rate allows.\n",
        AT_SHARE * 100.0
    ));
}

/// Offers `target` new connections per second for `secs` seconds; the step,
/// and whether the generator fell behind its schedule (then the step says
/// more about the load side than about the proxy).
fn step(b: &Bench, sys: &Running, target: f64, secs: u64) -> Result<(ConnrateStep, bool)> {
    let mut plan = b.plan(0, Talk::Closed, 64, secs as f64);
    plan.arrivals_per_sec = target;
    plan.fleet.connect_timeout = Duration::from_secs(3);
    plan.fleet.echo_timeout = Duration::from_secs(3);
    let (r, cpu) = b.measure(Some(sys), &plan, 2)?;
    let step = ConnrateStep {
        target,
        achieved: r.handshakes_ok as f64 / secs as f64,
        ok: r.handshakes_ok,
        failed: r.handshakes_failed + r.cut(),
        handshake: load::latency_of(&load::decode_histogram(&r.handshake)?),
        cpu,
        endings: r.endings.clone(),
    };
    let late = r.arrivals_late as f64 > 0.02 * target * secs as f64;
    Ok((step, late))
}

fn ramp_chart(root: &Area, rows: &[&ConnrateRow]) -> Result<()> {
    let max = max_of(
        rows.iter()
            .flat_map(|r| r.steps.iter().flat_map(|s| [s.target, s.achieved])),
    )
    .max(1.0)
        * 1.05;
    let mut chart = ChartBuilder::on(root)
        .caption(
            "Connection rate ramp: completed vs offered handshakes (× = step with failures)",
            (FONT, 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..max, 0f64..max)?;
    chart
        .configure_mesh()
        .x_desc("offered handshakes/s")
        .y_desc("completed handshakes/s")
        .x_label_formatter(&|x| short(*x))
        .y_label_formatter(&|y| short(*y))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()?;

    let ideal = RGBColor(150, 150, 150).stroke_width(1);
    chart
        .draw_series(DashedLineSeries::new(
            vec![(0.0, 0.0), (max, max)],
            6,
            4,
            ideal,
        ))?
        .label("completed = offered")
        .legend(move |(x, y)| DashedPathElement::new(vec![(x, y), (x + 20, y)], 5, 3, ideal));

    let mut colors = Colors::default();
    for r in rows {
        let color = colors.get(&r.system);
        let points = finite(r.steps.iter().map(|s| (s.target, s.achieved)));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(format!(
                "{} (max clean {}/s, stopped: {})",
                r.system,
                short(r.max_clean_rate),
                if r.stopped_by.is_empty() {
                    "–"
                } else {
                    &r.stopped_by
                }
            ))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        let steps = r
            .steps
            .iter()
            .filter(|s| s.target.is_finite() && s.achieved.is_finite());
        chart.draw_series(steps.map(|s| {
            let p = (s.target, s.achieved);
            if s.failed > 0 {
                Cross::new(p, 6, color.stroke_width(2)).into_dyn()
            } else {
                Circle::new(p, 4, color.filled()).into_dyn()
            }
        }))?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)
}
