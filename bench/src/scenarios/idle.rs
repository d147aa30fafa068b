//! Idle connections: how much memory each system spends on connections
//! that are open and quiet, in the process (PSS) and in the kernel, at
//! growing counts spread over shards.

use std::time::Duration;

use anyhow::Result;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::chart::{
    Area, Chart, Colors, FONT, SIZE, finite, legend, marker, max_of, short, short_bytes, systems,
};
use crate::load::Talk;
use crate::procs;
use crate::results::Endings;
use crate::scenario::{Outcome, Scenario};
use crate::stage::Bench;
use crate::systems::{Kind, Running};
use crate::table::{
    L7_PEERS, Table, fmt_bytes, fmt_endings, fmt_int, fmt_kib, fmt_pct, is_weir, measured,
    peer_row, ratio, ratio_cells,
};

/// Connections one generator or proxy process is given at most (below the
/// 20,000 open files per process, two per proxied connection for peers).
pub(crate) const PER_PROCESS: usize = 9000;

/// Processes (proxy shards, or generators) that `n` connections need.
pub(crate) fn processes_for(n: usize) -> usize {
    n.div_ceil(PER_PROCESS)
}

/// Sizes of a full run, and of a quick one (`--quick`).
struct Sizes {
    idle_counts: Vec<usize>,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                idle_counts: vec![10_000],
            }
        } else {
            Sizes {
                idle_counts: vec![10_000, 50_000, 100_000],
            }
        }
    }
}

pub struct Idle;

/// One system holding one count of idle connections.
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

measured!(IdleRow);

impl Scenario for Idle {
    const NAME: &'static str = "idle";
    const TITLE: &'static str = "Idle connections";
    const SYSTEMS: &'static [&'static str] = &["weir", "haproxy", "nginx"];
    const CHART: Option<Chart<IdleRow>> = Some(Chart {
        file: "idle-rss",
        size: SIZE,
        draw: rss_chart,
    });

    type Row = IdleRow;

    fn run(b: &mut Bench) -> Result<Outcome<IdleRow>> {
        let s = Sizes::new(b.sizes.quick);
        let mut out = Outcome::new(&[
            ("counts", format!("{:?}", s.idle_counts)),
            ("per_process", PER_PROCESS.to_string()),
        ]);
        for &n in &s.idle_counts {
            let shards = processes_for(n);
            for kind in Kind::ALL {
                let spec = b.spec(kind, b.all_backends(), shards);
                let row = b.with_system(spec, "id", |b, sys| idle_row(b, sys, n, shards));
                match row {
                    Ok(row) => out.rows.push(row),
                    Err(e) => out.notes.push(format!("{} at {n}: {e:#}", kind.name())),
                }
                // Sockets of the last round leave TIME_WAIT behind; give the
                // kernel a moment so the next round's memory baseline is
                // not still shrinking.
                std::thread::sleep(Duration::from_secs(2));
            }
        }
        Ok(out)
    }

    fn faults(rows: &[IdleRow]) -> Vec<String> {
        let mut bad = Vec::new();
        for x in rows {
            if x.held * 10 < x.connections * 9 {
                bad.push(format!(
                    "idle: {} held {} of {}",
                    x.system, x.held, x.connections
                ));
            }
            if x.rss_after_kib == 0 {
                bad.push(format!("idle: {}'s memory was not measured", x.system));
            }
        }
        bad
    }

    fn section(out: &mut String, rows: &[IdleRow]) {
        let key = |r: &IdleRow| r.connections;
        let mut t = Table::new(&[
            "system",
            "conns",
            "held",
            "shards",
            "processes",
            "RSS before",
            "RSS after",
            "RSS per conn",
            "weir/haproxy (conns per RSS byte)",
            "weir/nginx (conns per RSS byte)",
            "marginal per conn",
            "weir/haproxy (marginal)",
            "weir/nginx (marginal)",
            "kernel per conn",
            "endings",
        ])
        .left(&["endings"]);
        for r in rows {
            let w = is_weir(&r.system);
            let find = |p: &str| peer_row(rows, key, p, &r.connections);
            let mut cells = vec![
                r.system.clone(),
                fmt_int(r.connections as u64),
                format!(
                    "{} / {} ({})",
                    fmt_int(r.held as u64),
                    fmt_int(r.connections as u64),
                    fmt_pct(r.held as f64, r.connections as f64)
                ),
                fmt_int(r.shards as u64),
                fmt_int(r.processes as u64),
                fmt_kib(r.rss_before_kib),
                fmt_kib(r.rss_after_kib),
                fmt_bytes(r.rss_bytes_per_conn),
            ];
            cells.extend(ratio_cells(w, &L7_PEERS, find, |p| {
                ratio(p.rss_bytes_per_conn, r.rss_bytes_per_conn)
            }));
            cells.push(fmt_bytes(r.marginal_bytes_per_conn));
            cells.extend(ratio_cells(w, &L7_PEERS, find, |p| {
                ratio(p.marginal_bytes_per_conn, r.marginal_bytes_per_conn)
            }));
            cells.push(fmt_bytes(r.kernel_bytes_per_conn));
            cells.push(fmt_endings(&r.endings));
            t.row(cells);
        }
        t.write(out);
        out.push_str(
            "\nRSS is PSS summed over the proxy's processes (shared pages once). \
             \"RSS per conn\" is (after − before) ÷ held and includes warm-up (buffer pools, \
             first allocations); \"marginal\" is what the second half of the connections added, \
             per connection. Memory ratios are peer ÷ weir. \"kernel per conn\" is machine-wide \
             slab + TCP pages: it includes the generator's and the backends' sockets, the same \
             for every system.\n",
        );
    }
}

fn idle_row(b: &Bench, sys: &Running, n: usize, shards: usize) -> Result<IdleRow> {
    let name = sys.spec.kind.name();
    std::thread::sleep(Duration::from_millis(500));
    let before = procs::pss_kib(&sys.pids());
    let kernel_before = procs::kernel_socket_bytes();
    b.progress(&format!(
        "{name}: opening {n} idle connections ({shards} shards)"
    ));
    let hold = b.scratch.join(format!("hold-idle-{name}-{n}"));
    let _ = std::fs::remove_file(&hold);
    // Two halves: the second half's memory is the marginal cost of a
    // connection, free of warm-up (buffer pools, first allocations).
    let mut clients = Vec::new();
    let mut ready_files = Vec::new();
    let mut mid = (0, 0);
    for half in 0..2 {
        let ready = b.scratch.join(format!("ready-idle-{name}-{n}-{half}"));
        let count = if half == 0 { n / 2 } else { n - n / 2 };
        let mut plan = b.plan(count, Talk::Idle, 64, 600.0);
        plan.fleet.hold_file = Some(hold.clone());
        plan.fleet.ready_file = Some(ready.clone());
        plan.fleet.connect_concurrency = 100;
        let gens = processes_for(count);
        let (started, files) = b.start_held(&plan, gens, Duration::from_secs(300))?;
        clients.extend(started);
        ready_files.extend(files);
        // Let lazily freed memory settle before reading it.
        std::thread::sleep(Duration::from_secs(2));
        if half == 0 {
            mid = (procs::pss_kib(&sys.pids()), n / 2);
        }
    }
    let pids = sys.pids();
    let after = procs::pss_kib(&pids);
    let kernel_after = procs::kernel_socket_bytes();
    b.progress(&format!(
        "{name}: {n} open; proxy {before} -> {} -> {after} KiB; checking each with an echo",
        mid.0
    ));
    std::fs::write(&hold, b"done")?;
    let r = Bench::wait_load(clients, Duration::from_secs(300));
    let _ = std::fs::remove_file(&hold);
    for f in &ready_files {
        let _ = std::fs::remove_file(f);
    }
    let r = r?;
    let held = r.alive_at_end as usize;
    Ok(IdleRow {
        system: name.into(),
        connections: n,
        held,
        shards,
        rss_before_kib: before,
        rss_after_kib: after,
        rss_bytes_per_conn: per(after.saturating_sub(before) * 1024, held),
        marginal_bytes_per_conn: per(after.saturating_sub(mid.0) * 1024, n - mid.1),
        kernel_bytes_per_conn: per(kernel_after.saturating_sub(kernel_before), held),
        processes: pids.len(),
        endings: r.endings,
    })
}

fn per(total: u64, n: usize) -> f64 {
    if n == 0 { 0.0 } else { total as f64 / n as f64 }
}

fn rss_chart(root: &Area, rows: &[&IdleRow]) -> Result<()> {
    let systems = systems(rows.iter().map(|r| r.system.as_str()));
    let x_max = max_of(rows.iter().map(|r| r.connections as f64)).max(1.0) * 1.08;
    let y_max = max_of(
        rows.iter()
            .flat_map(|r| [r.rss_bytes_per_conn, r.kernel_bytes_per_conn]),
    )
    .max(1.0)
        * 1.2;

    let mut chart = ChartBuilder::on(root)
        .caption("Idle connections: memory per held connection", (FONT, 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("connections asked for")
        .y_desc("bytes per connection")
        .x_label_formatter(&|x| short(*x))
        .y_label_formatter(&|y| short_bytes(*y))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()?;

    let mut colors = Colors::default();
    for system in systems {
        let color = colors.get(system);
        let mut mine: Vec<&IdleRow> = rows
            .iter()
            .copied()
            .filter(|r| r.system == system)
            .collect();
        mine.sort_by_key(|r| r.connections);
        let rss: Vec<(f64, f64)> = finite(
            mine.iter()
                .map(|r| (r.connections as f64, r.rss_bytes_per_conn)),
        );
        let kernel: Vec<(f64, f64)> = finite(
            mine.iter()
                .map(|r| (r.connections as f64, r.kernel_bytes_per_conn)),
        );

        chart
            .draw_series(LineSeries::new(rss.clone(), color.stroke_width(2)))?
            .label(format!("{system} process RSS"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(rss.into_iter().map(|p| marker(p, 0, color)))?;

        let dashed = color.stroke_width(2);
        chart
            .draw_series(DashedLineSeries::new(kernel.clone(), 6, 4, dashed))?
            .label(format!("{system} kernel sockets"))
            .legend(move |(x, y)| DashedPathElement::new(vec![(x, y), (x + 20, y)], 5, 3, dashed));
        chart.draw_series(kernel.into_iter().map(|p| marker(p, 1, color)))?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}
