//! One proxy process, as many idle WebSockets as it will hold: connections
//! added in steps until a step is not held, with the process' memory at
//! every step (the memory curve) and how the clients it could not take were
//! refused.

use std::time::Duration;

use anyhow::Result;
use plotters::prelude::SeriesLabelPosition;
use serde::{Deserialize, Serialize};

use crate::chart::{
    Area, Chart, Colors, SIZE, finite, labelled_line, legend, linear_axes, marker, max_of, short,
};
use crate::load::Talk;
use crate::procs;
use crate::results::Endings;
use crate::scenario::{Outcome, Scenario};
use crate::scenarios::idle::processes_for;
use crate::stage::Bench;
use crate::systems::{Kind, Running};
use crate::table::{
    L7_PEERS, Table, fmt_bytes, fmt_endings, fmt_int, fmt_kib, fmt_pct, is_weir, measured,
    peer_row, ratio, ratio_cells,
};

/// weir's connection limit here: above what the steps ask, so the process,
/// not the setting, is what stops it.
const WEIR_MAX_CONNECTIONS: u64 = 130_000;
/// Why a row stopped when the proxy process was gone after a step.
const EXITED: &str = "exited";
/// A step is held when at least this share of what it asked is open.
const HELD_SHARE: f64 = 0.99;

/// Connections asked for in total at each step, full and quick.
fn steps(quick: bool) -> Vec<usize> {
    if quick {
        vec![5_000, 15_000, 25_000]
    } else {
        vec![10_000, 20_000, 50_000, 100_000, 120_000]
    }
}

pub struct Bigconn;

/// One step: connections added on top of the ones already held.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BigconnStep {
    /// Connections asked for in total.
    pub asked: usize,
    /// Connections open in total once the step's attempts finished.
    pub held: u64,
    /// PSS of the proxy's processes.
    pub pss_kib: u64,
    /// (PSS − PSS before any connection) ÷ held.
    pub bytes_per_conn: f64,
    /// What this step added, per connection it added.
    pub marginal_bytes_per_conn: f64,
    /// How the step's connections that were not taken ended.
    pub refused: Endings,
}

/// One system's process, step by step.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BigconnRow {
    pub system: String,
    /// Processes of the system (HAProxy's and nginx's master count).
    pub processes: usize,
    pub base_pss_kib: u64,
    pub steps: Vec<BigconnStep>,
    /// Connections that answered a ping at the end, after the last step.
    pub alive_at_end: u64,
    /// `refused` (a step was not held), `exited` (the proxy process was
    /// gone after a step; that step's memory is 0) or `cap` (the last step
    /// was held).
    pub stopped_by: String,
}

impl BigconnRow {
    /// The most connections held at once.
    pub fn most_held(&self) -> u64 {
        self.steps.iter().map(|s| s.held).max().unwrap_or(0)
    }

    /// The last step that was held and measured, if any.
    pub fn last_held(&self) -> Option<&BigconnStep> {
        self.steps
            .iter()
            .rev()
            .find(|s| is_held(s) && s.pss_kib > 0)
    }
}

fn is_held(s: &BigconnStep) -> bool {
    s.held as f64 >= HELD_SHARE * s.asked as f64
}

measured!(BigconnRow);

impl Scenario for Bigconn {
    const NAME: &'static str = "bigconn";
    const TITLE: &'static str = "Idle connections held by one process";
    const SYSTEMS: &'static [&'static str] = &["weir", "haproxy", "nginx"];
    const CHART: Option<Chart<BigconnRow>> = Some(Chart {
        file: "bigconn-memory",
        size: SIZE,
        draw: memory_chart,
    });

    type Row = BigconnRow;

    fn run(b: &mut Bench) -> Result<Outcome<BigconnRow>> {
        let steps = steps(b.sizes.quick);
        let mut out = Outcome::new(&[
            ("steps", format!("{steps:?}")),
            ("weir_max_connections", WEIR_MAX_CONNECTIONS.to_string()),
            (
                "processes",
                "one proxy process: weir run (workers = 0: as many rings as the connections \
                 need under the open-files limit), HAProxy (master + one worker), nginx \
                 (worker_processes 1)"
                    .into(),
            ),
        ]);
        for kind in Kind::ALL {
            let mut spec = b.spec(kind, b.all_backends(), 1);
            match kind {
                // `workers = 0`: as many io_uring rings as the connections
                // need, each ring's file table being capped at the
                // open-files limit (threads of the one process).
                Kind::Weir => {
                    spec.max_connections = Some(WEIR_MAX_CONNECTIONS);
                    spec.workers = 0;
                }
                // nginx's workers are processes: one, so the count is its.
                Kind::Nginx => spec.workers = 1,
                Kind::Haproxy => {}
            }
            match b.with_system(spec, "bc", |b, sys| bigconn_row(b, sys, &steps)) {
                Ok(row) => out.rows.push(row),
                Err(e) => out.notes.push(format!("{}: {e:#}", kind.name())),
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        Ok(out)
    }

    fn faults(rows: &[BigconnRow]) -> Vec<String> {
        let mut bad = Vec::new();
        for x in rows {
            if x.most_held() == 0 {
                bad.push(format!("bigconn: {} held no connection", x.system));
            }
            // A process that exited has no memory left to read.
            let measured = match x.stopped_by.as_str() {
                EXITED => &x.steps[..x.steps.len().saturating_sub(1)],
                _ => &x.steps[..],
            };
            if measured.iter().any(|s| s.pss_kib == 0) {
                bad.push(format!("bigconn: {}'s memory was not measured", x.system));
            }
        }
        bad
    }

    fn section(out: &mut String, rows: &[BigconnRow]) {
        let mut summary = Table::new(&[
            "system",
            "processes",
            "most held",
            "weir/haproxy (held)",
            "weir/nginx (held)",
            "per conn at the last held step",
            "weir/haproxy (per conn)",
            "weir/nginx (per conn)",
            "stopped by",
            "alive at end",
        ])
        .left(&["stopped by"]);
        let per_conn = |r: &BigconnRow| r.last_held().map_or(0.0, |s| s.bytes_per_conn);
        for r in rows {
            let w = is_weir(&r.system);
            let find = |p: &str| peer_row(rows, |_| (), p, &());
            let mut cells = vec![
                r.system.clone(),
                fmt_int(r.processes as u64),
                fmt_int(r.most_held()),
            ];
            cells.extend(ratio_cells(w, &L7_PEERS, find, |p| {
                ratio(r.most_held() as f64, p.most_held() as f64)
            }));
            cells.push(fmt_bytes(per_conn(r)));
            cells.extend(ratio_cells(w, &L7_PEERS, find, |p| {
                ratio(per_conn(p), per_conn(r))
            }));
            cells.push(r.stopped_by.clone());
            cells.push(fmt_int(r.alive_at_end));
            summary.row(cells);
        }
        summary.write(out);

        let mut t = Table::new(&[
            "system",
            "asked",
            "held",
            "PSS",
            "per conn",
            "marginal per conn",
            "weir/haproxy (per conn)",
            "weir/nginx (per conn)",
            "not taken",
        ])
        .left(&["not taken"]);
        for r in rows {
            let w = is_weir(&r.system);
            for s in &r.steps {
                let find = |p: &str| {
                    rows.iter()
                        .find(|x| x.system == p)
                        .and_then(|x| x.steps.iter().find(|y| y.asked == s.asked))
                };
                let mut cells = vec![
                    r.system.clone(),
                    fmt_int(s.asked as u64),
                    format!(
                        "{} ({})",
                        fmt_int(s.held),
                        fmt_pct(s.held as f64, s.asked as f64)
                    ),
                    fmt_kib(s.pss_kib),
                    fmt_bytes(s.bytes_per_conn),
                    fmt_bytes(s.marginal_bytes_per_conn),
                ];
                cells.extend(ratio_cells(w, &L7_PEERS, find, |p| {
                    ratio(p.bytes_per_conn, s.bytes_per_conn)
                }));
                cells.push(if s.refused.is_empty() {
                    "–".into()
                } else {
                    fmt_endings(&s.refused)
                });
                t.row(cells);
            }
        }
        out.push('\n');
        t.write(out);
        out.push_str(
            "\nOne proxy process per system, idle WebSockets added step by step until a step \
             is not held (99% of what it asked open) or the process exited (`exited`: its \
             memory reads 0 and \"alive at end\" tells what survived). weir runs with `max_connections = \
             130000`; HAProxy and nginx keep the bench's limits (`maxconn 9500`, \
             `worker_connections 19000`), which the 20,000 open files per process bound \
             anyway: a proxied connection costs them two. Memory is PSS over the system's \
             processes; \"per conn\" is (PSS − PSS before any connection) ÷ held, \
             \"marginal\" what the step added per connection it added. Ratios: held is weir ÷ \
             peer, memory peer ÷ weir. \"not taken\" is how the clients the step could not \
             add ended: `handshake:STATUS` (refused with a status), `handshake:io` (reset \
             during the handshake), `handshake:timeout` (never answered), \
             `handshake:connect` (TCP refused).\n",
        );
    }
}

fn bigconn_row(b: &Bench, sys: &Running, steps: &[usize]) -> Result<BigconnRow> {
    let name = sys.spec.kind.name();
    std::thread::sleep(Duration::from_millis(500));
    let base = procs::pss_kib(&sys.pids());
    let hold = b.scratch.join(format!("hold-bigconn-{name}"));
    let _ = std::fs::remove_file(&hold);
    let mut row = BigconnRow {
        system: name.into(),
        base_pss_kib: base,
        stopped_by: "cap".into(),
        ..BigconnRow::default()
    };
    let mut clients = Vec::new();
    let mut ready_files = Vec::new();
    let (mut prev_asked, mut prev_held, mut prev_pss) = (0, 0, base);
    let mut outcome = Ok(());
    for &asked in steps {
        let count = asked - prev_asked;
        b.progress(&format!("{name}: {prev_held} held, adding {count}"));
        let ready = b.scratch.join(format!("ready-bigconn-{name}-{asked}"));
        let mut plan = b.plan(count, Talk::Idle, 64, 900.0);
        plan.fleet.hold_file = Some(hold.clone());
        plan.fleet.ready_file = Some(ready);
        // Clients the process does not take wait out their timeout: many
        // at once, so a refused step does not take minutes.
        plan.fleet.connect_concurrency = 500;
        plan.fleet.connect_timeout = Duration::from_secs(5);
        let (started, files) =
            match b.start_held(&plan, processes_for(count), Duration::from_secs(600)) {
                Ok(s) => s,
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            };
        clients.extend(started);
        let step = Bench::read_ready(&files);
        ready_files.extend(files);
        let step = match step {
            Ok(s) => s,
            Err(e) => {
                outcome = Err(e);
                break;
            }
        };
        // Let lazily freed memory settle before reading it.
        std::thread::sleep(Duration::from_secs(2));
        let pids = sys.pids();
        let pss = procs::pss_kib(&pids);
        let held = prev_held + step.open;
        let s = BigconnStep {
            asked,
            held,
            pss_kib: pss,
            bytes_per_conn: per(pss.saturating_sub(base) * 1024, held),
            marginal_bytes_per_conn: per(
                pss.saturating_sub(prev_pss) * 1024,
                held.saturating_sub(prev_held),
            ),
            refused: step.endings,
        };
        b.progress(&format!(
            "{name}: {held} of {asked} held, PSS {pss} KiB ({:.0} B per connection)",
            s.bytes_per_conn
        ));
        let held_step = is_held(&s);
        row.steps.push(s);
        (prev_asked, prev_held, prev_pss) = (asked, held, pss);
        if pids.is_empty() {
            row.stopped_by = EXITED.into();
            break;
        }
        if !held_step {
            row.stopped_by = "refused".into();
            break;
        }
    }
    row.processes = sys.pids().len();
    std::fs::write(&hold, b"done")?;
    let r = Bench::wait_load(clients, Duration::from_secs(600));
    let _ = std::fs::remove_file(&hold);
    for f in &ready_files {
        let _ = std::fs::remove_file(f);
    }
    outcome?;
    row.alive_at_end = r?.alive_at_end;
    Ok(row)
}

fn per(total: u64, n: u64) -> f64 {
    if n == 0 { 0.0 } else { total as f64 / n as f64 }
}

fn memory_chart(root: &Area, rows: &[&BigconnRow]) -> Result<()> {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let x_max = max_of(rows.iter().map(|r| r.most_held() as f64)).max(1.0) * 1.08;
    let y_max = max_of(
        rows.iter()
            .flat_map(|r| r.steps.iter().map(|s| mib(s.pss_kib))),
    )
    .max(1.0)
        * 1.15;
    let mut chart = linear_axes(
        root,
        "One process: memory against idle connections held",
        (x_max, y_max),
        ("connections held", "PSS, MiB"),
    )?;
    let mut colors = Colors::default();
    for r in rows {
        let color = colors.get(&r.system);
        let points = finite(
            std::iter::once((0.0, mib(r.base_pss_kib)))
                .chain(r.steps.iter().map(|s| (s.held as f64, mib(s.pss_kib)))),
        );
        let label = format!(
            "{} (most held {}, stopped: {})",
            r.system,
            short(r.most_held() as f64),
            r.stopped_by
        );
        labelled_line(&mut chart, points.clone(), color, label)?;
        chart.draw_series(points.into_iter().map(|p| marker(p, 0, color)))?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(asked: usize, held: u64, per_conn: f64) -> BigconnStep {
        BigconnStep {
            asked,
            held,
            pss_kib: 1,
            bytes_per_conn: per_conn,
            ..BigconnStep::default()
        }
    }

    #[test]
    fn the_summary_takes_the_last_held_step_and_the_most_held() {
        let row = BigconnRow {
            system: "weir".into(),
            steps: vec![step(10_000, 10_000, 500.0), step(20_000, 19_000, 480.0)],
            stopped_by: "refused".into(),
            ..BigconnRow::default()
        };
        assert_eq!(row.most_held(), 19_000);
        assert_eq!(row.last_held().unwrap().asked, 10_000);
        assert!(is_held(&step(100, 99, 0.0)) && !is_held(&step(100, 98, 0.0)));
        let mut out = String::new();
        Bigconn::section(&mut out, std::slice::from_ref(&row));
        assert!(out.contains("| weir | 0 | 19,000 |"), "{out}");
        assert!(out.contains("19,000 (95.0%)"), "{out}");
        assert!(Bigconn::faults(std::slice::from_ref(&row)).is_empty());
    }

    #[test]
    fn only_a_process_that_exited_may_leave_a_step_unmeasured() {
        let mut gone = step(20_000, 20_000, 0.0);
        gone.pss_kib = 0;
        let mut row = BigconnRow {
            system: "weir".into(),
            steps: vec![step(10_000, 10_000, 500.0), gone],
            stopped_by: EXITED.into(),
            ..BigconnRow::default()
        };
        assert!(Bigconn::faults(std::slice::from_ref(&row)).is_empty());
        // The step the process left is not the last held one.
        assert_eq!(row.last_held().unwrap().asked, 10_000);
        row.stopped_by = "cap".into();
        assert_eq!(
            Bigconn::faults(&[row]),
            vec!["bigconn: weir's memory was not measured".to_string()]
        );
    }
}
