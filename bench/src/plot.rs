//! The SVG charts of a run: each scenario that has a chart
//! ([`crate::scenario::Scenario::CHART`]) draws it from its rows in every
//! file given, and [`files_for`] tells the report which file belongs to
//! which scenario.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::catalog::{self, ScenarioResult};
use crate::chart::Area;

/// The SVG files `write_svgs(.., stem)` writes for `scenario` when it has
/// rows; empty for scenarios without a chart.
pub fn files_for(scenario: &str, stem: &str) -> Vec<String> {
    catalog::find(scenario)
        .and_then(|e| e.chart.as_ref())
        .map(|c| format!("{stem}-{}.svg", c.file))
        .into_iter()
        .collect()
}

/// Writes every chart whose scenario has rows in `results` into `dir`
/// (created if missing) and returns the paths written.
pub fn write_svgs(results: &[ScenarioResult], dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let all: Vec<&ScenarioResult> = results.iter().collect();
    let mut written = Vec::new();
    for e in &catalog::ALL {
        let Some(chart) = &e.chart else { continue };
        if !results.iter().any(|r| e.has_rows(r)) {
            continue;
        }
        let file = dir.join(format!("{stem}-{}.svg", chart.file));
        written.push(save(&file, chart.size, |a| (chart.draw)(a, &all))?);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chart::{short, short_bytes, short_us};
    use crate::results::{Latency, TimelinePoint};
    use crate::scenarios::churn::ChurnRow;
    use crate::scenarios::connrate::{ConnrateRow, ConnrateStep};
    use crate::scenarios::failure::FailureRow;
    use crate::scenarios::idle::IdleRow;
    use crate::scenarios::push::PushRow;
    use crate::scenarios::steady::SteadyRow;
    use crate::scenarios::upgrade::{UpgradeRow, UpgradeStep};

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
                    at_share: None,
                })
                .collect(),
            ..Default::default()
        };
        let push = ScenarioResult {
            scenario: "push".into(),
            push: [("weir", 5_000.0, 400), ("nginx", 5_000.0, 600)]
                .iter()
                .map(|&(s, rate, p99)| PushRow {
                    system: s.into(),
                    rate,
                    latency: Latency {
                        p50_us: p99 / 4,
                        p90_us: p99 / 2,
                        p99_us: p99,
                        p999_us: p99 * 2,
                        max_us: p99 * 5,
                        samples: 1000,
                    },
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let failure = ScenarioResult {
            scenario: "failure".into(),
            failure: [("weir", 0), ("haproxy", 12)]
                .iter()
                .map(|&(s, failed)| FailureRow {
                    system: s.into(),
                    kill_ms: 2_000,
                    restart_ms: 7_000,
                    failed_bins: (0..130)
                        .map(|i| u32::from((20..45).contains(&i)) * failed)
                        .collect(),
                    refused_bins: (0..70).map(|i| u32::from(i >= 20) * 3).collect(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let upgrade = ScenarioResult {
            scenario: "upgrade".into(),
            upgrade: [("weir", 20_000), ("haproxy", 900_000)]
                .iter()
                .map(|&(s, stall_us)| UpgradeRow {
                    system: s.into(),
                    upgrades: [3.0, 6.0, 9.0]
                        .map(|at_s| UpgradeStep {
                            at_s,
                            ..Default::default()
                        })
                        .to_vec(),
                    timeline: (0..12)
                        .map(|t| TimelinePoint {
                            t_s: t as f64,
                            max_echo_us: if t == 6 { stall_us } else { 2_000 },
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        vec![steady, push, idle, churn, connrate, failure, upgrade]
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

        let expect: [(&str, &[&str]); 7] = [
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
            ("push", &["weir 5,000 frames/s", "nginx 5,000 frames/s"]),
            ("idle", &["weir", "haproxy", "nginx"]),
            ("connrate", &["weir", "haproxy"]),
            ("churn", &["weir", "haproxy-reload", "nginx-reload"]),
            (
                "failure",
                &["weir (0 failed)", "haproxy (300 failed)", "kill", "restart"],
            ),
            (
                "upgrade",
                &[
                    "weir",
                    "haproxy",
                    "triangles: upgrade commands",
                    "log scale",
                ],
            ),
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
