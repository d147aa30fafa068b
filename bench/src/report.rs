//! One Markdown report from a run's scenario files, so weir and its peers
//! can be read side by side without opening the JSON: the run's facts, then
//! one section per file in catalogue order, each scenario writing its own
//! tables (see [`crate::table`] for how ratios read).

use std::fmt::Write as _;

use crate::catalog::{self, ScenarioResult};
use crate::goals;
use crate::plot;
use crate::results::RunInfo;
use crate::table::or_dash;

/// The whole report, naming the SVGs `plot::write_svgs(.., stem)` wrote.
pub fn markdown(results: &[ScenarioResult], stem: &str) -> String {
    let mut out = String::new();
    let Some(first) = results.first() else {
        out.push_str("# weir benchmark\n\nNo results.\n");
        return out;
    };
    heading(&mut out, &first.info);
    goals::section(&mut out, results);

    let mut sorted: Vec<&ScenarioResult> = results.iter().collect();
    sorted.sort_by_key(|r| {
        catalog::ALL
            .iter()
            .position(|e| e.name == r.scenario)
            .unwrap_or(catalog::ALL.len())
    });
    for r in sorted {
        section(&mut out, r, &first.info, stem);
    }
    out
}

fn heading(out: &mut String, info: &RunInfo) {
    let _ = writeln!(out, "# weir benchmark — {}\n", or_dash(&info.date));
    let mode = if info.quick { "quick" } else { "full" };
    let _ = writeln!(out, "- Run: {mode}");
    let _ = writeln!(out, "- Kernel: {}", or_dash(&info.kernel));
    let _ = writeln!(out, "- CPUs: {}", info.cpus);
    let _ = writeln!(
        out,
        "- Workers per proxy process: {} (threads for weir and HAProxy, processes for nginx)",
        info.workers
    );
    let _ = writeln!(out, "- weir commit: `{}`", or_dash(&info.weir_commit));
    let _ = writeln!(out, "- HAProxy: {}", or_dash(&info.haproxy_version));
    let _ = writeln!(out, "- nginx: {}", or_dash(&info.nginx_version));
    out.push_str(
        "\nRatios read \"> 1 means weir is better\"; – means a row or value is missing.\n",
    );
}

fn section(out: &mut String, r: &ScenarioResult, head: &RunInfo, stem: &str) {
    let _ = writeln!(out, "\n## {}\n", title(&r.scenario));
    if r.info.date != head.date || r.info.weir_commit != head.weir_commit {
        let _ = writeln!(
            out,
            "_From another run: {}, weir `{}`._\n",
            or_dash(&r.info.date),
            or_dash(&r.info.weir_commit)
        );
    }
    if !r.params.is_empty() {
        let params: Vec<String> = r.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "Parameters: `{}`\n", params.join(" "));
    }

    let mut any = false;
    for e in &catalog::ALL {
        if e.has_rows(r) {
            e.section(out, r);
            files_line(out, e.name, stem);
            any = true;
        }
    }
    if !any {
        out.push_str("_No rows._\n");
    }

    if !r.notes.is_empty() {
        out.push_str("\nNotes:\n\n");
        for n in &r.notes {
            let _ = writeln!(out, "- {n}");
        }
    }
}

fn title(scenario: &str) -> String {
    match catalog::find(scenario) {
        Some(e) => format!("{} ({})", e.title, e.name),
        None => scenario.to_string(),
    }
}

fn files_line(out: &mut String, scenario: &str, stem: &str) {
    let files = plot::files_for(scenario, stem);
    if files.is_empty() {
        return;
    }
    let links: Vec<String> = files.iter().map(|f| format!("[{f}]({f})")).collect();
    let _ = writeln!(out, "\nPlots: {}", links.join(", "));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::checked::Tally;
    use crate::micro::{FullTable, Packets, SetResult, Timing, XdpResult};
    use crate::results::{CpuSplit, Endings, Latency, TimelinePoint};
    use crate::scenarios::bigconn::{BigconnRow, BigconnStep};
    use crate::scenarios::churn::ChurnRow;
    use crate::scenarios::connrate::{ConnrateRow, ConnrateStep};
    use crate::scenarios::discover::{DiscoverRow, Join};
    use crate::scenarios::drain::DrainRow;
    use crate::scenarios::failure::FailureRow;
    use crate::scenarios::idle::IdleRow;
    use crate::scenarios::l4::L4Row;
    use crate::scenarios::micro::MicroRow;
    use crate::scenarios::propagate::{PropagateRow, Switch};
    use crate::scenarios::push::PushRow;
    use crate::scenarios::steady::SteadyRow;
    use crate::scenarios::storm::StormRow;
    use crate::scenarios::upgrade::{UpgradeRow, UpgradeStep};
    use crate::stage::Net;

    fn endings(pairs: &[(&str, u64)]) -> Endings {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn info() -> RunInfo {
        RunInfo {
            date: "2026-11-27T10:00:00Z".into(),
            quick: true,
            kernel: "6.12.0".into(),
            cpus: 8,
            weir_commit: "abc1234".into(),
            haproxy_version: "3.0.5".into(),
            nginx_version: "1.26.2".into(),
            workers: 2,
        }
    }

    fn steady_row(system: &str, bytes: usize, msgs: f64, cpu_per_m: f64, p99: u64) -> SteadyRow {
        SteadyRow {
            system: system.into(),
            message_bytes: bytes,
            connections: 100,
            closed_msgs_per_sec: msgs,
            closed_cpu: CpuSplit {
                proxy_s: 1.5,
                generator_s: 3.0,
                backends_s: 0.5,
                wall_s: 10.0,
                softirq_s: 0.0,
            },
            cpu_s_per_million: cpu_per_m,
            open_rate: 10_000.0,
            open_achieved: 9_990.0,
            open_latency: Latency {
                p50_us: 80,
                p90_us: 150,
                p99_us: p99,
                p999_us: 2_000,
                max_us: 15_000,
                samples: 100_000,
            },
            open_cpu: CpuSplit::default(),
            errors: 0,
            ..SteadyRow::default()
        }
    }

    fn all_scenarios() -> Vec<ScenarioResult> {
        let base = |name: &str| ScenarioResult {
            scenario: name.into(),
            info: info(),
            params: [("seconds".to_string(), "10".to_string())].into(),
            ..Default::default()
        };
        let mut steady = base("steady");
        steady.steady = vec![
            steady_row("weir", 64, 200_000.0, 2.0, 400),
            steady_row("haproxy", 64, 100_000.0, 4.0, 800),
            steady_row("nginx", 64, 50_000.0, 8.0, 1_600),
            // No peer measured at this size: ratios must be "–".
            steady_row("weir", 4096, 80_000.0, 5.0, 900),
        ];
        // On loopback weir's peer is HAProxy on loopback only.
        for (system, msgs, cpu) in [("weir", 150_000.0, 1.0), ("haproxy", 100_000.0, 2.0)] {
            steady.steady.push(SteadyRow {
                topology: Net::Loopback,
                softirq_s_per_million: cpu * 1.5,
                ..steady_row(system, 64, msgs, cpu, 500)
            });
        }
        steady.steady[0].softirq_s_per_million = 3.0;
        steady.notes = vec!["nginx worker count capped".into()];

        let mut push = base("push");
        push.push = [
            ("weir", 500, 4.0),
            ("haproxy", 1_000, 8.0),
            ("nginx", 250, 2.0),
        ]
        .iter()
        .map(|&(system, p99, cpu)| PushRow {
            system: system.into(),
            connections: 1_000,
            frame_bytes: 64,
            rate: 20_000.0,
            expected: 200_000,
            received: 200_000,
            latency: Latency {
                p50_us: 100,
                p90_us: 200,
                p99_us: p99,
                p999_us: p99 * 3,
                max_us: 40_000,
                samples: 200_000,
            },
            cpu_s_per_million: cpu,
            ..Default::default()
        })
        .collect();

        let mut idle = base("idle");
        idle.idle = ["weir", "haproxy", "nginx"]
            .iter()
            .enumerate()
            .map(|(i, s)| IdleRow {
                system: s.to_string(),
                connections: 10_000,
                held: 10_000,
                shards: 1,
                rss_before_kib: 10_000,
                rss_after_kib: 10_000 + 10_000 * (i as u64 + 1),
                rss_bytes_per_conn: 1024.0 * (i as f64 + 1.0),
                marginal_bytes_per_conn: 512.0 * (i as f64 + 1.0),
                kernel_bytes_per_conn: 4000.0,
                processes: 1,
                endings: endings(&[("clean", 10_000)]),
            })
            .collect();

        let mut connrate = base("connrate");
        // The equal-rate step: 24,000 handshakes on `proxy_s` CPU seconds.
        let share = |proxy_s: f64| ConnrateStep {
            target: 2400.0,
            achieved: 2400.0,
            ok: 24_000,
            cpu: CpuSplit {
                proxy_s,
                ..Default::default()
            },
            ..Default::default()
        };
        connrate.connrate = vec![
            ConnrateRow {
                system: "weir".into(),
                steps: vec![ConnrateStep {
                    target: 1000.0,
                    achieved: 1000.0,
                    ..Default::default()
                }],
                max_clean_rate: 3000.0,
                handshakes_per_cpu_s: 6000.0,
                stopped_by: "cap".into(),
                at_share: Some(share(3.0)),
            },
            ConnrateRow {
                system: "haproxy".into(),
                steps: vec![],
                max_clean_rate: 1000.0,
                handshakes_per_cpu_s: 4000.0,
                stopped_by: "errors".into(),
                at_share: Some(share(6.0)),
            },
        ];

        let mut churn = base("churn");
        let churn_row = |s: &str, failed: u64, cut: u64| ChurnRow {
            system: s.into(),
            seconds: 30.0,
            changes: 10,
            change_ms: vec![5, 3, 9],
            handshakes_ok: 1000,
            handshakes_failed: failed,
            cut,
            timeline: vec![TimelinePoint {
                t_s: 1.0,
                open: 100,
                ..Default::default()
            }],
            ..Default::default()
        };
        churn.churn = vec![
            churn_row("weir", 1, 1),
            churn_row("haproxy-api", 2, 2),
            churn_row("haproxy-reload", 10, 30),
            churn_row("nginx-reload", 0, 0),
        ];

        let mut drain = base("drain");
        drain.drain = vec![DrainRow {
            system: "weir".into(),
            method: "weir backend remove".into(),
            connections: 100,
            window_s: 5.0,
            endings: endings(&[("peer_close:1001", 90), ("reset", 10)]),
            first_close_ms: Some(12),
            median_close_ms: Some(2500),
            last_close_ms: None,
            still_open: 0,
        }];

        let mut failure = base("failure");
        failure.failure = [("weir", 0, 0), ("haproxy", 120, 20), ("nginx", 0, 0)]
            .iter()
            .map(|&(s, failed, after)| FailureRow {
                system: s.into(),
                handshakes_ok: 3_000,
                handshakes_failed: failed,
                failed_after_detection: after,
                failures: endings(&[("handshake:503", failed)]),
                detected_ms: Some(2_100),
                ..Default::default()
            })
            .collect();

        // weir: nothing cut, 4 processes left of 2 shards (old generations
        // still there); HAProxy: 3 connections cut, 2 messages lost.
        let mut upgrade = base("upgrade");
        upgrade.upgrade = [
            ("weir", 0, 0, 4),
            ("haproxy", 3, 2, 10),
            ("nginx", 0, 0, 17),
        ]
        .iter()
        .map(|&(s, cut, lost, left)| UpgradeRow {
            system: s.into(),
            connections: 10_000,
            connected: 10_000,
            shards: 2,
            message_bytes: 128,
            upgrades: vec![UpgradeStep::default(); 3],
            cut,
            messages: Tally {
                sent: 1_000,
                intact: 1_000 - lost,
                lost,
                ..Tally::default()
            },
            processes_left: left,
            rss_left_kib: 1,
            ..Default::default()
        })
        .collect();

        let mut l4 = base("l4");
        l4.l4 = vec![
            L4Row {
                system: "weir".into(),
                streams: 8,
                bulk_gbit_s: 30.0,
                conns_per_sec: 50_000.0,
                ..Default::default()
            },
            L4Row {
                system: "haproxy-tcp".into(),
                streams: 8,
                bulk_gbit_s: 20.0,
                conns_per_sec: 0.0,
                ..Default::default()
            },
        ];
        let mut storm = base("storm");
        storm.storm = [("weir", 1_000.0, 0.5), ("haproxy", 2_000.0, 1.5)]
            .iter()
            .map(|&(s, ms, cpu)| StormRow {
                system: s.into(),
                connections: 2_000,
                dropped: 2_000,
                back: 2_000,
                all_back_ms: ms,
                proxy_cpu_s: cpu,
                curve: vec![(0.0, 0), (ms, 2_000)],
                ..Default::default()
            })
            .collect();

        let mut bigconn = base("bigconn");
        let step = |asked, held, bytes_per_conn| BigconnStep {
            asked,
            held,
            pss_kib: 10_000,
            bytes_per_conn,
            ..Default::default()
        };
        bigconn.bigconn = [
            ("weir", 19_000, 500.0, 480.0),
            ("nginx", 9_500, 20_000.0, 19_000.0),
        ]
        .iter()
        .map(|&(s, held, first, second)| BigconnRow {
            system: s.into(),
            // The second step is not held: the first is the last held.
            steps: vec![step(10_000, 10_000, first), step(20_000, held, second)],
            stopped_by: "refused".into(),
            ..Default::default()
        })
        .collect();

        let mut propagate = base("propagate");
        propagate.propagate = vec![PropagateRow {
            system: "weir".into(),
            workers: 2,
            switches: vec![Switch {
                command_ms: 5.0,
                connections: 100,
                ..Default::default()
            }],
            identified: 100,
            ..Default::default()
        }];
        let mut discover = base("discover");
        discover.discover = vec![DiscoverRow {
            system: "weir".into(),
            backends: 1_000,
            ring_size: 100_103,
            joins: vec![Join {
                ring_ms: Some(4.0),
                weir_run_ms: Some(6.0),
                while_in: 400,
                reached: 300,
                ..Default::default()
            }],
            identified: 1_000,
            ..Default::default()
        }];
        let mut micro = base("micro");
        let ns = |mean: f64| Timing {
            mean,
            p50: mean,
            runs: 100,
        };
        // SYN 8× and 10× the floor, established 1.5×.
        let packets = |syn: f64| Packets {
            syn_new_flow: ns(syn),
            established_one_flow: ns(60.0),
            established_spread: ns(200.0),
            floor: ns(40.0),
        };
        micro.micro = vec![MicroRow {
            system: "weir".into(),
            xdp: vec![XdpResult {
                round: 1,
                backends: 10,
                ring_size: 65537,
                empty_table: packets(320.0),
                flows: 100,
                full_table: FullTable {
                    table_flows: 1000,
                    packets: packets(400.0),
                },
            }],
            backend_set: vec![SetResult {
                backends: 10_000,
                ring_size: 1_000_003,
                initial_ms: 90.0,
                change_ms: 120.0,
            }],
        }];
        // Out of order on purpose: the report sorts sections.
        vec![
            micro, l4, upgrade, failure, discover, propagate, drain, churn, storm, connrate,
            bigconn, idle, push, steady,
        ]
    }

    /// The cells of the table row whose first cell is `system` and that
    /// contains `needle`, in the first table after `section`.
    fn row_cells(md: &str, section: &str, system: &str, needle: &str) -> Vec<String> {
        let start = md.find(section).expect("section");
        md[start..]
            .lines()
            .filter(|l| l.starts_with("| "))
            .map(|l| {
                l.trim_matches('|')
                    .split(" | ")
                    .map(|c| c.trim().to_string())
                    .collect::<Vec<_>>()
            })
            .find(|c| c[0] == system && c.iter().any(|x| x.contains(needle)))
            .expect("row")
    }

    /// The cells of the goals table's row whose goal starts with `prefix`.
    fn goal(md: &str, prefix: &str) -> Vec<String> {
        let start = md.find("## Goals").expect("goals section");
        let end = md[start..].find("\n## Steady").expect("goals end") + start;
        md[start..end]
            .lines()
            .filter(|l| l.starts_with(&format!("| {prefix}")))
            .map(|l| {
                l.trim_matches('|')
                    .split(" | ")
                    .map(|c| c.trim().to_string())
                    .collect::<Vec<_>>()
            })
            .next()
            .unwrap_or_else(|| panic!("no goal {prefix}"))
    }

    #[test]
    fn goals_are_judged_from_the_rows_of_the_run() {
        let md = markdown(&all_scenarios(), "2026-11-27");
        // 500k msgs per CPU s against HAProxy's 250k: exactly 2×.
        let g = goal(
            &md,
            "msgs per proxy CPU s ≥ 2× the best peer: 64 B, namespaces",
        );
        assert_eq!(&g[1..], ["500,000", "250,000", "2.00×", "met"]);
        // p99 400 µs against HAProxy's 800; every p99.9 is 2 ms.
        let g = goal(&md, "echo p99 and p99.9 ≤ the best peer's: 64 B");
        assert_eq!(&g[3..], ["2.00×", "met"]);
        // Push: nginx's p99 is half of weir's.
        let g = goal(&md, "push p99 and p99.9 ≤ the best peer's");
        assert_eq!(&g[3..], ["0.50×", "not met"]);
        // 6,000 handshakes per CPU s against HAProxy's 4,000; at one rate
        // 8,000 against 4,000; no handshake latency was sampled.
        let g = goal(&md, "handshakes per proxy CPU s ≥ 1.5× the best peer (each");
        assert_eq!(&g[3..], ["1.50×", "met"]);
        let g = goal(
            &md,
            "handshakes per proxy CPU s ≥ 1.5× the best peer (all at 2,400",
        );
        assert_eq!(&g[1..], ["8,000", "4,000", "2.00×", "met"]);
        let g = goal(&md, "handshake p99 at 80%");
        assert_eq!(&g[1..], ["–", "–", "–", "not met"]);
        // 19,000 held is short of 100,000.
        let g = goal(&md, "≥ 100,000 idle WebSockets");
        assert_eq!(g[4], "not met");
        // SYN at 8× and 10× the floor, established at 1.5×, `backend set`
        // 90 ms from empty but 120 ms for one replaced.
        let g = goal(&md, "XDP SYN");
        assert_eq!(
            &g[1..],
            ["8.00×–10.0× the floor", "no peer", "–", "not met"]
        );
        let g = goal(&md, "XDP established");
        assert_eq!(g[4], "met");
        let g = goal(&md, "`backend set`");
        assert_eq!(&g[1..], ["90.0 / 120.0 ms", "no peer", "–", "not met"]);
        let g = goal(&md, "a CLI change seen");
        assert_eq!(g[4], "met");
        // No failed handshake against HAProxy's 120: no ratio of a zero,
        // and the goal is met.
        let g = goal(&md, "a killed backend");
        assert_eq!(
            &g[1..],
            [
                "0 failed, 0 after detection",
                "haproxy: 120 failed",
                "–",
                "met"
            ]
        );
        // weir's clients saw nothing, but its old processes were still
        // there: 4 for 2 shards. The best peer is the one whose clients
        // saw least: nginx, however many processes it left.
        let g = goal(&md, "3 upgrades under 10,000 connections");
        assert_eq!(
            &g[1..],
            [
                "0 cut, 0 Close, 0 B lost, 4 process(es) left (2 shard(s))",
                "nginx: 0 cut, 0 Close, 0 B lost, 17 process(es) left (2 shard(s))",
                "–",
                "not met"
            ]
        );
        assert!(md.contains("The goals of issues 11, 12 and 14"));
        assert!(md.contains("met.\n"), "no count of goals met");
    }

    #[test]
    fn every_scenario_gets_a_table_in_order() {
        let md = markdown(&all_scenarios(), "2026-11-27");
        assert!(md.starts_with("# weir benchmark — 2026-11-27T10:00:00Z"));
        for needle in ["quick", "6.12.0", "abc1234", "3.0.5", "1.26.2", "CPUs: 8"] {
            assert!(md.contains(needle), "heading lacks {needle}");
        }
        let mut last = 0;
        for s in catalog::ALL.iter().map(|e| e.name) {
            let heading = format!("## {}", title(s));
            let at = md
                .find(&heading)
                .unwrap_or_else(|| panic!("no section {s}"));
            assert!(at >= last, "section {s} out of order");
            last = at;
            let body = &md[at..];
            let end = body[3..].find("\n## ").map_or(body.len(), |e| e + 3);
            let body = &body[..end];
            // The micro-benchmarks measure weir alone, by round.
            let table = if s == "micro" {
                "\n| round |"
            } else {
                "\n| system |"
            };
            assert!(body.contains(table), "no table for {s}");
            assert!(body.contains("`seconds=10`"), "no params for {s}");
            for f in plot::files_for(s, "2026-11-27") {
                assert!(body.contains(&f), "section {s} does not name {f}");
            }
        }
        assert!(md.contains("- nginx worker count capped"));
    }

    #[test]
    fn ratios_in_tables() {
        let md = markdown(&all_scenarios(), "2026-11-27");

        // Steady closed loop: weir 200k vs 100k / 50k msgs/s; CPU per M 2
        // vs 4 / 8 means 2× / 4× messages per CPU second.
        let c = row_cells(&md, "### Closed loop", "weir", "200,000");
        assert_eq!(c[1], "namespaces");
        assert_eq!(c[5], "2.00×");
        assert_eq!(c[6], "4.00×");
        assert_eq!(c[8], "500,000");
        assert_eq!(c[9], "2.00×");
        assert_eq!(c[10], "4.00×");
        assert_eq!(c[11], "1.50 / 3.00 / 0.50 (10.0 s)");
        // The 4096-byte weir row has no peers.
        let c = row_cells(&md, "### Closed loop", "weir", "4,096");
        assert_eq!(&c[5..7], ["–", "–"]);
        // Peer rows carry no ratio.
        let c = row_cells(&md, "### Closed loop", "haproxy", "64");
        assert_eq!(&c[5..7], ["", ""]);
        // Open loop p99: 800 / 400 and 1600 / 400.
        let c = row_cells(&md, "### Open loop", "weir", "400 µs");
        assert_eq!(&c[12..14], ["2.00×", "4.00×"]);
        // A loopback peer is not weir's peer on the namespaces.
        let c = row_cells(&md, "### Closed loop", "weir", "loopback");
        assert_eq!(&c[5..7], ["1.50×", "–"]);
        // Both topologies measured: cost per message side by side,
        // namespaces (2 s per M) against loopback (1 s per M).
        let c = row_cells(&md, "### Loopback against namespaces", "weir", "64");
        assert_eq!(&c[2..5], ["2.00", "1.00", "2.00×"]);
        assert_eq!(&c[5..7], ["3.00", "1.50"]);

        // Push: p99 1000 / 500 and 250 / 500, p99.9 likewise; CPU per
        // frame 8 / 4 and 2 / 4.
        let c = row_cells(&md, "## Server push", "weir", "20,000");
        assert_eq!(&c[11..15], ["2.00×", "0.50×", "2.00×", "0.50×"]);
        assert_eq!(&c[16..18], ["2.00×", "0.50×"]);

        // Idle: peer bytes per conn over weir's.
        let c = row_cells(&md, "## Idle", "weir", "10,000");
        assert_eq!(&c[8..10], ["2.00×", "3.00×"]);

        // Connrate: nginx missing.
        let c = row_cells(&md, "## Connection rate", "weir", "3,000");
        assert_eq!(&c[3..5], ["3.00×", "–"]);
        // Its equal-rate step: 24,000 handshakes on 3 CPU s against
        // HAProxy's 6; no latency sampled, so no latency ratio.
        let c = row_cells(&md, "### At 80%", "weir", "2,400 / 2,400 / 0");
        assert_eq!(&c[7..11], ["–", "–", "–", "–"]);
        assert_eq!(c[11], "8,000");
        assert_eq!(&c[12..14], ["2.00×", "–"]);

        // Churn: one column per peer method; disruption 2 vs 4 / 40 / 0.
        assert!(md.contains("| weir/haproxy-api | weir/haproxy-reload | weir/nginx-reload |"));
        let c = row_cells(&md, "## Backend churn", "weir", "1,000");
        assert_eq!(&c[11..14], ["2.00×", "20.0×", "–"]);

        // Drain: 90 of 100 graceful.
        let c = row_cells(&md, "## Backend drain", "weir", "100");
        assert_eq!(c[4], "90 (90.0%)");
        assert_eq!(c[8], "–");

        // Storm: haproxy took 2,000 ms and 1.5 CPU s, weir 1,000 and 0.5;
        // nginx missing.
        let c = row_cells(&md, "## Reconnect storm", "weir", "1,000 ms");
        assert_eq!(&c[4..6], ["2.00×", "–"]);
        assert_eq!(&c[8..10], ["3.00×", "–"]);

        // Bigconn: weir held 19,000 against nginx's 10,000, at 500 B per
        // connection against 20,000 B at the last held step.
        let c = row_cells(&md, "## Idle connections held", "weir", "19,000");
        assert_eq!(&c[3..5], ["–", "1.90×"]);
        assert_eq!(c[5], "500 B");
        assert_eq!(&c[6..8], ["–", "40.0×"]);
        let c = row_cells(&md, "## Idle connections held", "weir", "19,000 (95.0%)");
        assert_eq!(&c[6..8], ["–", "39.6×"]);

        // Failure: HAProxy failed 120 of its handshakes, 20 after it said
        // the server was down; weir none, so no ratio.
        let c = row_cells(&md, "## Backend failure", "haproxy", "120");
        assert_eq!(&c[3..6], ["120", "20", "2,100 ms"]);
        assert_eq!(c[9], "– / –");
        let c = row_cells(&md, "## Backend failure", "weir", "3,000");
        assert_eq!(&c[11..13], ["–", "–"]);
        assert!(md.contains("weir: 0 failed handshakes (0 after detection) against HAProxy's 120"));

        // Upgrade: HAProxy cut 3 connections and lost 2 messages of 128 B.
        let c = row_cells(&md, "## Upgrades under load", "haproxy", "10,000 / 10,000");
        assert_eq!(&c[4..7], ["3", "0", "256 B (2 msgs)"]);

        // L4: 30 / 20 Gbit/s; peer conns/s is 0 so its ratio is missing.
        let c = row_cells(&md, "## L4", "weir", "30.00");
        assert_eq!(c[3], "1.50×");
        assert_eq!(c[5], "–");
    }

    #[test]
    fn empty_and_rowless() {
        assert!(markdown(&[], "2026-11-27").contains("No results."));
        let r = ScenarioResult {
            scenario: "idle".into(),
            notes: vec!["haproxy failed to start".into()],
            ..Default::default()
        };
        let md = markdown(&[r], "2026-11-27");
        assert!(md.contains("_No rows._"));
        assert!(md.contains("- haproxy failed to start"));
    }
}
