//! SVG charts of a run, drawn with plotters' SVG backend so they need no
//! system fonts: text is left to the SVG viewer.
//!
//! Each chart puts every system on the same axes so weir and its peers are
//! compared at a glance; [`files_for`] tells the report which chart belongs
//! to which scenario.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;

use crate::results::{
    ChurnRow, ConnrateRow, IdleRow, ScenarioResult, SteadyRow, TimelinePoint, WEIR,
};

const SIZE: (u32, u32) = (960, 600);
const CHURN_SIZE: (u32, u32) = (960, 820);
const FONT: &str = "sans-serif";

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// The SVG files `write_svgs(.., stem)` writes for `scenario` when it has
/// rows; empty for scenarios without a chart.
pub fn files_for(scenario: &str, stem: &str) -> Vec<String> {
    let suffix = match scenario {
        "steady" => "steady-latency",
        "idle" => "idle-rss",
        "churn" => "churn-timeline",
        "connrate" => "connrate",
        _ => return Vec::new(),
    };
    vec![format!("{stem}-{suffix}.svg")]
}

/// Writes every chart whose scenario has rows in `results` into `dir`
/// (created if missing) and returns the paths written.
pub fn write_svgs(results: &[ScenarioResult], dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let steady: Vec<&SteadyRow> = results.iter().flat_map(|r| &r.steady).collect();
    let idle: Vec<&IdleRow> = results.iter().flat_map(|r| &r.idle).collect();
    let churn: Vec<&ChurnRow> = results.iter().flat_map(|r| &r.churn).collect();
    let connrate: Vec<&ConnrateRow> = results.iter().flat_map(|r| &r.connrate).collect();

    let mut written = Vec::new();
    let file = |scenario: &str| dir.join(&files_for(scenario, stem)[0]);
    if !steady.is_empty() {
        written.push(save(&file("steady"), SIZE, |a| steady_latency(a, &steady))?);
    }
    if !idle.is_empty() {
        written.push(save(&file("idle"), SIZE, |a| idle_rss(a, &idle))?);
    }
    if !churn.is_empty() {
        written.push(save(&file("churn"), CHURN_SIZE, |a| {
            churn_timeline(a, &churn)
        })?);
    }
    if !connrate.is_empty() {
        written.push(save(&file("connrate"), SIZE, |a| {
            connrate_ramp(a, &connrate)
        })?);
    }
    Ok(written)
}

/// Draws into a string first so a failed chart leaves no half-written file.
fn save(path: &Path, size: (u32, u32), draw: impl FnOnce(&Area) -> Result<()>) -> Result<PathBuf> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root).with_context(|| format!("drawing {}", path.display()))?;
        root.present()?;
    }
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
    Ok(path.to_path_buf())
}

// ---------------------------------------------------------------------------
// Charts

const PERCENTILES: [&str; 5] = ["p50", "p90", "p99", "p99.9", "max"];

fn steady_latency(root: &Area, rows: &[&SteadyRow]) -> Result<()> {
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

fn idle_rss(root: &Area, rows: &[&IdleRow]) -> Result<()> {
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

fn churn_timeline(root: &Area, rows: &[&ChurnRow]) -> Result<()> {
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

fn connrate_ramp(root: &Area, rows: &[&ConnrateRow]) -> Result<()> {
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

// ---------------------------------------------------------------------------
// Helpers

fn legend<'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    position: SeriesLabelPosition,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// A data point marker: shape by variant, so lines of one hue differ in
/// print too.
fn marker<'b, DB: DrawingBackend>(
    p: (f64, f64),
    variant: usize,
    color: RGBColor,
) -> DynElement<'b, DB, (f64, f64)> {
    match variant % 3 {
        0 => Circle::new(p, 4, color.filled()).into_dyn(),
        1 => TriangleMarker::new(p, 5, color.filled()).into_dyn(),
        _ => Cross::new(p, 5, color.stroke_width(2)).into_dyn(),
    }
}

/// The systems in order of first appearance.
fn systems<'a>(names: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for n in names {
        if !out.contains(&n) {
            out.push(n);
        }
    }
    out
}

/// Fixed colours for weir and the main peers so they match across charts;
/// other systems (churn methods) take the next free one.
#[derive(Default)]
struct Colors {
    assigned: Vec<(String, usize)>,
}

const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),  // blue: weir
    RGBColor(255, 127, 14),  // orange: haproxy
    RGBColor(44, 160, 44),   // green: nginx
    RGBColor(214, 39, 40),   // red
    RGBColor(148, 103, 189), // purple
    RGBColor(140, 86, 75),   // brown
    RGBColor(227, 119, 194), // pink
    RGBColor(127, 127, 127), // grey
    RGBColor(188, 189, 34),  // olive
    RGBColor(23, 190, 207),  // cyan
];

impl Colors {
    fn get(&mut self, system: &str) -> RGBColor {
        if let Some((_, i)) = self.assigned.iter().find(|(s, _)| s == system) {
            return PALETTE[*i];
        }
        let fixed = match system {
            WEIR => Some(0),
            "haproxy" | "haproxy-tcp" => Some(1),
            "nginx" => Some(2),
            _ => None,
        };
        let i = fixed.unwrap_or_else(|| {
            let next = (3..PALETTE.len()).find(|i| !self.assigned.iter().any(|(_, j)| j == i));
            next.unwrap_or(self.assigned.len() % PALETTE.len())
        });
        self.assigned.push((system.to_string(), i));
        PALETTE[i]
    }
}

/// Blends towards white by `f` (0 = unchanged).
fn lighten(c: RGBColor, f: f64) -> RGBColor {
    let mix = |v: u8| (v as f64 + (255.0 - v as f64) * f.clamp(0.0, 0.8)).round() as u8;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

fn finite(points: impl Iterator<Item = (f64, f64)>) -> Vec<(f64, f64)> {
    points
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect()
}

/// Largest finite value, 0 for none, so an empty chart still gets a range.
fn max_of(values: impl Iterator<Item = f64>) -> f64 {
    values.filter(|v| v.is_finite()).fold(0.0, f64::max)
}

/// Axis numbers: `12k`, `1.5M`.
fn short(v: f64) -> String {
    let a = v.abs();
    let (scaled, unit) = if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let s = if scaled.fract().abs() < 1e-9 || scaled.abs() >= 10.0 {
        format!("{scaled:.0}")
    } else {
        format!("{scaled:.1}")
    };
    format!("{s}{unit}")
}

fn short_us(us: f64) -> String {
    if us >= 1e6 {
        format!("{} s", short(us / 1e6))
    } else if us >= 1e3 {
        format!("{} ms", short(us / 1e3))
    } else {
        format!("{} µs", short(us))
    }
}

fn short_bytes(b: f64) -> String {
    if b >= 1024.0 * 1024.0 {
        format!("{} MiB", short(b / (1024.0 * 1024.0)))
    } else if b >= 1024.0 {
        format!("{} KiB", short(b / 1024.0))
    } else {
        format!("{b:.0} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{ConnrateStep, Latency, TimelinePoint};

    fn results() -> Vec<ScenarioResult> {
        let steady = ScenarioResult {
            scenario: "steady".into(),
            steady: [
                ("weir", 64, 300),
                ("weir", 4096, 500),
                ("weir", 16_384, 700),
                ("haproxy", 64, 900),
                ("nginx", 64, 0),
            ]
            .iter()
            .map(|&(s, bytes, p99)| SteadyRow {
                system: s.into(),
                message_bytes: bytes,
                connections: 100,
                open_latency: Latency {
                    p50_us: p99 / 3,
                    p90_us: p99 / 2,
                    p99_us: p99,
                    p999_us: p99 * 3,
                    max_us: p99 * 20,
                    samples: if p99 == 0 { 0 } else { 1000 },
                },
                ..Default::default()
            })
            .collect(),
            ..Default::default()
        };
        let idle = ScenarioResult {
            scenario: "idle".into(),
            idle: ["weir", "haproxy", "nginx"]
                .iter()
                .flat_map(|s| {
                    [1_000usize, 10_000].map(|n| IdleRow {
                        system: s.to_string(),
                        connections: n,
                        held: n,
                        rss_bytes_per_conn: 3000.0 + n as f64 / 10.0,
                        kernel_bytes_per_conn: 4500.0,
                        ..Default::default()
                    })
                })
                .collect(),
            ..Default::default()
        };
        let churn = ScenarioResult {
            scenario: "churn".into(),
            churn: ["weir", "haproxy-reload", "nginx-reload"]
                .iter()
                .enumerate()
                .map(|(i, s)| ChurnRow {
                    system: s.to_string(),
                    timeline: (0..10)
                        .map(|t| TimelinePoint {
                            t_s: t as f64,
                            open: 100 - (i as u64 * t),
                            cut: i as u64 * (t % 3),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let connrate = ScenarioResult {
            scenario: "connrate".into(),
            connrate: ["weir", "haproxy"]
                .iter()
                .map(|s| ConnrateRow {
                    system: s.to_string(),
                    steps: [1000.0, 2000.0, 4000.0]
                        .map(|t| ConnrateStep {
                            target: t,
                            achieved: t.min(3000.0),
                            failed: u64::from(t > 3000.0),
                            ..Default::default()
                        })
                        .to_vec(),
                    max_clean_rate: 2000.0,
                    handshakes_per_cpu_s: 5000.0,
                    stopped_by: "errors".into(),
                })
                .collect(),
            ..Default::default()
        };
        vec![steady, idle, churn, connrate]
    }

    /// Removes the test's directory even when an assertion fails; set
    /// `WEIR_BENCH_KEEP_PLOTS` to keep the charts for a look.
    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            if std::env::var_os("WEIR_BENCH_KEEP_PLOTS").is_some() {
                eprintln!("kept {}", self.0.display());
                return;
            }
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn writes_every_chart() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = TempDir(
            std::env::temp_dir().join(format!("weir-bench-plot-{}-{nanos}", std::process::id())),
        );
        let written = write_svgs(&results(), &dir.0, "test").unwrap();

        let expect: [(&str, &[&str]); 4] = [
            (
                "steady",
                &[
                    "weir 64 B",
                    "weir 4096 B",
                    "weir 16384 B",
                    "haproxy",
                    "nginx",
                    "p99.9",
                ],
            ),
            ("idle", &["weir", "haproxy", "nginx"]),
            ("churn", &["weir", "haproxy-reload", "nginx-reload"]),
            ("connrate", &["weir", "haproxy"]),
        ];
        assert_eq!(written.len(), expect.len());
        for ((scenario, names), path) in expect.iter().zip(&written) {
            let name = &files_for(scenario, "test")[0];
            assert_eq!(path, &dir.0.join(name));
            let svg = std::fs::read_to_string(path).unwrap();
            assert!(svg.starts_with("<svg"), "{name} is not an SVG");
            assert!(svg.trim_end().ends_with("</svg>"), "{name} is truncated");
            for n in *names {
                assert!(svg.contains(n), "{name} does not mention {n}");
            }
        }
    }

    #[test]
    fn only_charts_with_data() {
        let dir = TempDir(
            std::env::temp_dir().join(format!("weir-bench-plot-empty-{}", std::process::id())),
        );
        let mut only_idle = results();
        only_idle.retain(|r| r.scenario == "idle");
        let written = write_svgs(&only_idle, &dir.0, "x").unwrap();
        assert_eq!(written, vec![dir.0.join("x-idle-rss.svg")]);
        assert!(write_svgs(&[], &dir.0, "x").unwrap().is_empty());
    }

    #[test]
    fn names_and_labels() {
        assert_eq!(files_for("steady", "s"), ["s-steady-latency.svg"]);
        assert!(files_for("drain", "s").is_empty());
        assert_eq!(short(12_000.0), "12k");
        assert_eq!(short(1_500_000.0), "1.5M");
        assert_eq!(short_us(2_000.0), "2 ms");
        assert_eq!(short_bytes(4096.0), "4 KiB");
    }
}
