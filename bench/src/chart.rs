//! What every chart shares: plotters' SVG backend (no system fonts needed:
//! text is left to the SVG viewer), the size and font, fixed colours per
//! system so weir and its peers look the same in every chart, markers,
//! legends, axis labels, and the latency percentile chart scenarios share.

use anyhow::Result;
use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::results::{Latency, WEIR};

/// Size of a chart unless its scenario needs more room.
pub const SIZE: (u32, u32) = (960, 600);
pub const FONT: &str = "sans-serif";

pub type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// A scenario's chart: the file it is saved as and how it is drawn from
/// the scenario's rows (`R`), all systems on the same axes.
pub struct Chart<R> {
    /// Saved as `<stem>-<file>.svg`.
    pub file: &'static str,
    pub size: (u32, u32),
    pub draw: fn(&Area, &[&R]) -> Result<()>,
}

/// A chart on linear axes from 0 to `max` (x, y), described by `desc`
/// (x, y), numbers written by [`short`]: the frame of most line charts.
pub fn linear_axes<'b>(
    root: &Area<'b>,
    caption: &str,
    max: (f64, f64),
    desc: (&str, &str),
) -> Result<ChartContext<'b, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>> {
    let mut chart = ChartBuilder::on(root)
        .caption(caption, (FONT, 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..max.0, 0f64..max.1)?;
    chart
        .configure_mesh()
        .x_desc(desc.0)
        .y_desc(desc.1)
        .x_label_formatter(&|x| short(*x))
        .y_label_formatter(&|y| short(*y))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()?;
    Ok(chart)
}

/// One system's line, with its legend entry.
pub fn labelled_line<'a, X: Ranged<ValueType = f64>, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    points: Vec<(f64, f64)>,
    color: RGBColor,
    label: String,
) -> Result<()> {
    chart
        .draw_series(LineSeries::new(points, color.stroke_width(2)))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    Ok(())
}

pub fn legend<'a, X: Ranged, Y: Ranged>(
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
pub fn marker<'b, DB: DrawingBackend>(
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
pub fn systems<'a>(names: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
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
pub struct Colors {
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
    pub fn get(&mut self, system: &str) -> RGBColor {
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
pub fn lighten(c: RGBColor, f: f64) -> RGBColor {
    let mix = |v: u8| (v as f64 + (255.0 - v as f64) * f.clamp(0.0, 0.8)).round() as u8;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

pub fn finite(points: impl Iterator<Item = (f64, f64)>) -> Vec<(f64, f64)> {
    points
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect()
}

/// Largest finite value, 0 for none, so an empty chart still gets a range.
pub fn max_of(values: impl Iterator<Item = f64>) -> f64 {
    values.filter(|v| v.is_finite()).fold(0.0, f64::max)
}

const PERCENTILES: [&str; 5] = ["p50", "p90", "p99", "p99.9", "max"];

/// One line of a percentile chart: a system's latency under one set of
/// conditions.
pub struct PercentileLine<'a> {
    pub system: &'a str,
    pub label: String,
    pub latency: &'a Latency,
}

/// Latency percentiles (p50 to max) on a log scale, one line each. Lines
/// of one system (message sizes, rates) share its hue, lighter and with
/// another marker, so systems stay recognisable.
pub fn percentile_chart(root: &Area, caption: &str, rows: &[PercentileLine]) -> Result<()> {
    let value = |r: &PercentileLine| {
        let l = r.latency;
        [l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us].map(|v| v.max(1) as f64)
    };
    // Rows without samples measured nothing: plotting them would draw a
    // fake 1 µs line, so they only get a legend entry.
    let measured = |r: &PercentileLine| r.latency.samples > 0;
    let all: Vec<f64> = rows
        .iter()
        .filter(|r| measured(r))
        .flat_map(&value)
        .collect();
    let (lo, hi) = if all.is_empty() {
        (1.0, 1000.0)
    } else {
        let lo = all.iter().copied().fold(f64::MAX, f64::min);
        (lo, max_of(all.into_iter()))
    };
    let (lo, hi) = ((lo / 1.5).max(0.5), hi * 1.5);

    let mut chart = ChartBuilder::on(root)
        .caption(caption, (FONT, 22))
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
    for (i, r) in rows.iter().enumerate() {
        let k = rows[..i].iter().filter(|x| x.system == r.system).count();
        let total = rows.iter().filter(|x| x.system == r.system).count();
        let color = lighten(colors.get(r.system), k as f64 / (total as f64 + 1.0));
        let mut label = r.label.clone();
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

/// Axis numbers: `12k`, `1.5M`.
pub fn short(v: f64) -> String {
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

pub fn short_us(us: f64) -> String {
    if us >= 1e6 {
        format!("{} s", short(us / 1e6))
    } else if us >= 1e3 {
        format!("{} ms", short(us / 1e3))
    } else {
        format!("{} µs", short(us))
    }
}

pub fn short_bytes(b: f64) -> String {
    if b >= 1024.0 * 1024.0 {
        format!("{} MiB", short(b / (1024.0 * 1024.0)))
    } else if b >= 1024.0 {
        format!("{} KiB", short(b / 1024.0))
    } else {
        format!("{b:.0} B")
    }
}
