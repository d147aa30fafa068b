//! Markdown tables and their cells, shared by every scenario's report
//! section so the sections read alike: numbers grouped and rounded the same
//! way, missing values as `–`, and ratios oriented so that > 1 means weir
//! did better (for metrics where lower is better, such as CPU, memory,
//! latency and disruption, the peer's value is divided by weir's).

use crate::results::{CpuSplit, Endings, Latency, WEIR};

/// Peers weir is compared with in the HTTP/WebSocket scenarios.
pub const L7_PEERS: [&str; 2] = ["haproxy", "nginx"];

/// Header of the CPU split column, shared by the tables that show it.
pub const CPU_SPLIT: &str = "CPU s: proxy / generator / backends (wall)";

/// `weir / peer`, or `None` when either is zero or not a finite number, so a
/// missing or failed measurement never shows up as 0× or ∞×.
///
/// Callers pass "higher is better" quantities; for a lower-is-better metric
/// pass `(peer, weir)`, e.g. CPU per message, so the result still reads
/// "> 1 means weir is better".
pub fn ratio(weir: f64, peer: f64) -> Option<f64> {
    if weir == 0.0 || peer == 0.0 || !weir.is_finite() || !peer.is_finite() {
        return None;
    }
    Some(weir / peer)
}

/// A Markdown table built row by row; cells are escaped so a `|` in a
/// system name or note cannot break the layout.
pub struct Table {
    header: Vec<String>,
    /// Columns holding text rather than numbers, aligned left.
    left: Vec<usize>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            left: vec![0],
            rows: Vec::new(),
        }
    }

    /// Aligns the named columns left.
    pub fn left(mut self, names: &[&str]) -> Self {
        for (i, h) in self.header.iter().enumerate() {
            if names.contains(&h.as_str()) {
                self.left.push(i);
            }
        }
        self
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn write(&self, out: &mut String) {
        let line = |cells: &[String]| {
            let cells: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
            format!("| {} |\n", cells.join(" | "))
        };
        out.push_str(&line(&self.header));
        let sep: Vec<String> = self
            .header
            .iter()
            .enumerate()
            .map(|(i, _)| {
                if self.left.contains(&i) {
                    ":--".into()
                } else {
                    "--:".into()
                }
            })
            .collect();
        out.push_str(&format!("|{}|\n", sep.join("|")));
        for r in &self.rows {
            out.push_str(&line(r));
        }
    }
}

pub fn is_weir(system: &str) -> bool {
    system == WEIR || system.starts_with("weir-")
}

/// Rows that name the system they measured, so peers can be looked up the
/// same way in every table.
pub trait Measured {
    fn system(&self) -> &str;
}

/// Implements [`Measured`] for row types with a `system` field.
macro_rules! measured {
    ($($t:ty),*) => {$(
        impl $crate::table::Measured for $t {
            fn system(&self) -> &str {
                &self.system
            }
        }
    )*};
}
pub(crate) use measured;

/// The row of `peer` measured under the same conditions (`key`) as a weir row.
pub fn peer_row<'a, T: Measured, K: PartialEq>(
    rows: &'a [T],
    key: impl Fn(&T) -> K,
    peer: &str,
    want: &K,
) -> Option<&'a T> {
    rows.iter().find(|r| r.system() == peer && key(r) == *want)
}

/// Ratio cells of one row: blank for peer rows (nothing to compare), one
/// cell per peer for weir rows.
pub fn ratio_cells<T>(
    is_weir_row: bool,
    peers: &[&str],
    peer_of: impl Fn(&str) -> Option<T>,
    value: impl Fn(T) -> Option<f64>,
) -> Vec<String> {
    peers
        .iter()
        .map(|p| {
            if !is_weir_row {
                return String::new();
            }
            fmt_ratio(peer_of(p).and_then(&value))
        })
        .collect()
}

/// Ratio cells of one row's tail latency, p99 then p99.9, one per peer
/// each, oriented peer ÷ weir (lower is better); blank for peer rows.
pub fn tail_ratio_cells<'a>(
    is_weir_row: bool,
    peers: &[&str],
    peer_latency: impl Fn(&str) -> Option<&'a Latency>,
    weir: &Latency,
) -> Vec<String> {
    let percentiles: [fn(&Latency) -> u64; 2] = [|l| l.p99_us, |l| l.p999_us];
    percentiles
        .into_iter()
        .flat_map(|pick| {
            ratio_cells(is_weir_row, peers, &peer_latency, |p| {
                ratio(sampled(p, pick), sampled(weir, pick))
            })
        })
        .collect()
}

pub fn or_dash(s: &str) -> &str {
    if s.is_empty() { "–" } else { s }
}

pub fn median(v: &[u64]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_unstable();
    Some(v[v.len() / 2])
}

/// The median of measured values (the upper one of an even count); sorts
/// `v` in place.
pub fn median_f(v: &mut [f64]) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// `1234567` → `1,234,567`.
pub fn fmt_int(v: u64) -> String {
    group(&v.to_string())
}

fn group(digits: &str) -> String {
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Fixed decimals with thousands separators; `–` for NaN or infinity.
pub fn fmt_f(v: f64, decimals: usize) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let s = format!("{:.*}", decimals, v.abs());
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s.as_str(), None),
    };
    let sign = if v < 0.0 && s.chars().any(|c| c.is_ascii_digit() && c != '0') {
        "-"
    } else {
        ""
    };
    match frac {
        Some(f) => format!("{sign}{}.{f}", group(int)),
        None => format!("{sign}{}", group(int)),
    }
}

/// Decimals by magnitude: enough to compare, not more than is meaningful.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    let decimals = if a >= 100.0 || a == 0.0 {
        0
    } else if a >= 10.0 {
        1
    } else {
        2
    };
    fmt_f(v, decimals)
}

pub fn fmt_ratio(r: Option<f64>) -> String {
    match r {
        Some(r) if r >= 100.0 => format!("{}×", fmt_f(r, 0)),
        Some(r) if r >= 10.0 => format!("{r:.1}×"),
        Some(r) => format!("{r:.2}×"),
        None => "–".into(),
    }
}

pub fn fmt_pct(part: f64, whole: f64) -> String {
    if whole > 0.0 {
        format!("{:.1}%", 100.0 * part / whole)
    } else {
        "–".into()
    }
}

pub fn fmt_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.2} ms", us as f64 / 1e3)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

pub fn fmt_ms(ms: Option<u64>) -> String {
    ms.map_or_else(|| "–".into(), |ms| format!("{} ms", fmt_int(ms)))
}

pub fn fmt_bytes(b: f64) -> String {
    if !b.is_finite() {
        return "–".into();
    }
    if b.abs() < 1024.0 {
        format!("{} B", fmt_f(b, 0))
    } else if b.abs() < 1024.0 * 1024.0 {
        format!("{} KiB", fmt_f(b / 1024.0, 1))
    } else {
        format!("{} MiB", fmt_f(b / (1024.0 * 1024.0), 1))
    }
}

pub fn fmt_kib(kib: u64) -> String {
    fmt_bytes(kib as f64 * 1024.0)
}

/// `–` when the split was not measured (no wall time).
pub fn fmt_cpu(c: &CpuSplit) -> String {
    if c.wall_s <= 0.0 {
        return "–".into();
    }
    format!(
        "{} / {} / {} ({} s)",
        fmt_f(c.proxy_s, 2),
        fmt_f(c.generator_s, 2),
        fmt_f(c.backends_s, 2),
        fmt_f(c.wall_s, 1)
    )
}

/// Cells p50, p90, p99, p99.9 and max; `–` when nothing was sampled,
/// since the zeros of an empty histogram are not a latency.
pub fn latency_cells(l: &Latency) -> Vec<String> {
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

/// One percentile for ratios: 0 (shown as –) when nothing was sampled.
pub fn sampled(l: &Latency, percentile: impl Fn(&Latency) -> u64) -> f64 {
    if l.samples == 0 {
        0.0
    } else {
        percentile(l) as f64
    }
}

/// Most frequent ending first, so the normal case leads.
pub fn fmt_endings(e: &Endings) -> String {
    if e.is_empty() {
        return "–".into();
    }
    let mut v: Vec<(&String, &u64)> = e.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let parts: Vec<String> = v
        .iter()
        .map(|(k, n)| format!("{k}: {}", fmt_int(**n)))
        .collect();
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endings(pairs: &[(&str, u64)]) -> Endings {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn ratio_math() {
        assert_eq!(ratio(200.0, 100.0), Some(2.0));
        assert_eq!(ratio(0.0, 100.0), None);
        assert_eq!(ratio(100.0, 0.0), None);
        assert_eq!(ratio(f64::NAN, 1.0), None);
        assert_eq!(fmt_ratio(ratio(3.0, 2.0)), "1.50×");
        assert_eq!(fmt_ratio(None), "–");
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_int(0), "0");
        assert_eq!(fmt_int(999), "999");
        assert_eq!(fmt_int(1_000), "1,000");
        assert_eq!(fmt_int(1_234_567), "1,234,567");
        assert_eq!(fmt_f(12_345.678, 2), "12,345.68");
        assert_eq!(fmt_f(-1_234.5, 1), "-1,234.5");
        assert_eq!(fmt_num(123_456.7), "123,457");
        assert_eq!(fmt_num(1.234), "1.23");
        assert_eq!(fmt_us(999), "999 µs");
        assert_eq!(fmt_us(1_500), "1.50 ms");
        assert_eq!(fmt_bytes(2048.0), "2.0 KiB");
        assert_eq!(
            fmt_endings(&endings(&[("reset", 1), ("clean", 5)])),
            "clean: 5, reset: 1"
        );
        assert_eq!(median(&[5, 3, 9]), Some(5));
    }
}
