//! How soon a CLI change reaches every `weir run` worker: the backend set
//! is switched with `weir backend set` while new connections arrive from
//! many source ports (so SO_REUSEPORT spreads them over both workers), and
//! each connection's backend, which names itself in its 101, tells which
//! set it was given. weir only: the peers have no CLI to compare.
//!
//! A worker re-reads the registry when its generation counter moved, and
//! it looks at the counter on every accept, so a connection accepted after
//! the command returned cannot be given the old set. The figure per switch
//! is the start of the last connection that still reached the old set,
//! relative to the command's return (0 when none started after it).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::load::{self, ConnRecord, Talk};
use crate::scenario::{Outcome, Scenario};
use crate::stage::{Bench, backend_name};
use crate::systems::{Kind, Method};
use crate::table::{Table, fmt_f, fmt_int, measured, median_f};

/// The goal: every worker sees a change within this.
pub const GOAL_MS: f64 = 10.0;
/// Time between switches.
const PERIOD: Duration = Duration::from_secs(1);
/// Backends per set; the sets take turns, so a set rests three periods
/// (longer than the drain window) before it comes back.
const SET_SIZE: usize = 2;
const SETS: usize = 4;

/// Sizes of a full run, and of a quick one (`--quick`).
struct Sizes {
    switches: usize,
    arrivals_per_sec: f64,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                switches: 8,
                arrivals_per_sec: 1000.0,
            }
        } else {
            Sizes {
                switches: 20,
                arrivals_per_sec: 2000.0,
            }
        }
    }
}

pub struct Propagate;

/// One switch of the backend set.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Switch {
    /// The command's wall time.
    pub command_ms: f64,
    /// Start of the last connection that reached the old set, ms relative
    /// to the command's return (negative: before it returned).
    pub last_old_ms: Option<f64>,
    /// Start of the first connection that reached the new set, ms relative
    /// to the return (negative: it started while the command ran).
    pub first_new_ms: Option<f64>,
    /// Connections that reached a backend and started within half a period
    /// of the return.
    pub connections: u64,
}

/// weir's switches.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PropagateRow {
    pub system: String,
    pub workers: usize,
    pub switches: Vec<Switch>,
    /// The figure of the goal, over the switches: how long after the
    /// return the old set was still given (0 when it was not).
    pub max_last_old_ms: f64,
    pub p99_last_old_ms: f64,
    /// Connections that reached a backend, and the ones that did not.
    pub identified: u64,
    pub failed: u64,
}

measured!(PropagateRow);

impl Scenario for Propagate {
    const NAME: &'static str = "propagate";
    const TITLE: &'static str = "CLI change seen by every worker";
    const SYSTEMS: &'static [&'static str] = &["weir"];

    type Row = PropagateRow;

    fn run(b: &mut Bench) -> Result<Outcome<PropagateRow>> {
        let s = Sizes::new(b.sizes.quick);
        let mut out = Outcome::new(&[
            ("switches", s.switches.to_string()),
            ("every_ms", PERIOD.as_millis().to_string()),
            ("arrivals_per_s", s.arrivals_per_sec.to_string()),
            (
                "sets",
                format!("{SETS} sets of {SET_SIZE} backends, taking turns"),
            ),
            ("per_connection", "handshake, one 64 B echo, close".into()),
        ]);
        // Backend indices of each set.
        let sets: Vec<Vec<usize>> = (0..SETS)
            .map(|k| (k * SET_SIZE..(k + 1) * SET_SIZE).collect())
            .collect();
        let addrs = |b: &Bench, set: &[usize]| -> Vec<SocketAddr> {
            set.iter().map(|&i| b.backend(i)).collect()
        };
        let names =
            |set: &[usize]| -> Vec<String> { set.iter().map(|&i| backend_name(i)).collect() };
        let mut spec = b.spec(Kind::Weir, addrs(b, &sets[0]), 1);
        spec.drain_window = Some(PERIOD / 2);
        match b.with_system(spec, "pg", |b, sys| {
            let name = sys.spec.kind.name();
            let mut plan = b.plan(
                0,
                Talk::Closed,
                64,
                ((s.switches + 2) as u32 * PERIOD).as_secs_f64(),
            );
            plan.arrivals_per_sec = s.arrivals_per_sec;
            plan.record_connections = true;
            plan.fleet.connect_timeout = Duration::from_secs(3);
            plan.fleet.echo_timeout = Duration::from_secs(3);
            b.progress(&format!(
                "{name}: {} switches, {} new connections/s",
                s.switches, s.arrivals_per_sec
            ));
            let started = Instant::now();
            let clients = b.start_load(&plan, 2)?;
            let mut changes = Vec::new();
            for k in 1..=s.switches {
                let at = started + PERIOD * k as u32;
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                let took =
                    sys.set_backends(&b.topo, &addrs(b, &sets[k % SETS]), Method::WeirCli)?;
                changes.push(Change {
                    returned_us: load::unix_us(),
                    command_ms: took.as_secs_f64() * 1e3,
                    old: names(&sets[(k - 1) % SETS]),
                    new: names(&sets[k % SETS]),
                });
            }
            let r = Bench::wait_load(clients, plan.fleet.duration + Duration::from_secs(60))?;
            Ok(row(name, sys.spec.workers, &changes, &r.connections))
        }) {
            Ok(row) => out.rows.push(row),
            Err(e) => out.notes.push(format!("weir: {e:#}")),
        }
        Ok(out)
    }

    fn faults(rows: &[PropagateRow]) -> Vec<String> {
        let mut bad = Vec::new();
        for x in rows {
            if x.switches.is_empty() || x.identified == 0 {
                bad.push(format!(
                    "propagate: {} made {} switches, {} connections reached a backend",
                    x.system,
                    x.switches.len(),
                    x.identified
                ));
            }
            if x.switches.iter().any(|s| s.connections == 0) {
                bad.push(format!(
                    "propagate: {} had a switch without new connections",
                    x.system
                ));
            }
        }
        bad
    }

    fn section(out: &mut String, rows: &[PropagateRow]) {
        let mut t = Table::new(&[
            "system",
            "workers",
            "switches",
            "last old-set start after the return: max",
            "p99",
            "goal (≤ 10 ms)",
            "last old-set start: median",
            "first new-set start: median",
            "command ms (median)",
            "connections (failed)",
        ]);
        for r in rows {
            let mut last: Vec<f64> = r.switches.iter().filter_map(|s| s.last_old_ms).collect();
            let mut first: Vec<f64> = r.switches.iter().filter_map(|s| s.first_new_ms).collect();
            let mut command: Vec<f64> = r.switches.iter().map(|s| s.command_ms).collect();
            t.row(vec![
                r.system.clone(),
                fmt_int(r.workers as u64),
                fmt_int(r.switches.len() as u64),
                format!("{} ms", fmt_f(r.max_last_old_ms, 2)),
                format!("{} ms", fmt_f(r.p99_last_old_ms, 2)),
                if r.max_last_old_ms <= GOAL_MS {
                    "met".into()
                } else {
                    "not met".into()
                },
                median_f(&mut last).map_or("–".into(), |m| format!("{} ms", fmt_f(m, 2))),
                median_f(&mut first).map_or("–".into(), |m| format!("{} ms", fmt_f(m, 2))),
                median_f(&mut command).map_or("–".into(), |m| fmt_f(m, 1)),
                format!("{} ({})", fmt_int(r.identified), fmt_int(r.failed)),
            ]);
        }
        t.write(out);
        out.push_str(
            "\nThe backend set is switched every second between sets of two backends while \
             new connections (handshake, one echo, close) arrive from 16 source addresses \
             and many ports, spread over both workers by SO_REUSEPORT; each backend names \
             itself in its 101. Per switch: the start of the last connection that still \
             reached the old set, relative to the instant `weir backend set` returned, and of \
             the first that reached the new set (negative: it started while the command ran); \
             the goal's figure is the first of these when positive, 0 otherwise. The gap \
             between the two medians is when, within the command, the workers switched. A worker \
             reads the registry's generation counter on every accept and re-reads the maps \
             when it moved, so the bound is the command's own: once it returns, every \
             connection accepted after that goes by the new set.\n",
        );
    }
}

/// A switch as the harness made it.
struct Change {
    returned_us: u64,
    command_ms: f64,
    old: Vec<String>,
    new: Vec<String>,
}

fn row(system: &str, workers: usize, changes: &[Change], records: &[ConnRecord]) -> PropagateRow {
    let half = (PERIOD / 2).as_micros() as i64;
    let switches: Vec<Switch> = changes
        .iter()
        .map(|c| {
            let near: Vec<(i64, &str)> = records
                .iter()
                .filter_map(|r| {
                    let rel = r.started_unix_us as i64 - c.returned_us as i64;
                    (rel.abs() < half).then_some((rel, r.backend.as_deref()?))
                })
                .collect();
            let in_set = |set: &[String], b: &str| set.iter().any(|x| x == b);
            let last_old = near
                .iter()
                .filter(|(_, b)| in_set(&c.old, b))
                .map(|(rel, _)| *rel)
                .max();
            let first_new = near
                .iter()
                .filter(|(_, b)| in_set(&c.new, b))
                .map(|(rel, _)| *rel)
                .min();
            Switch {
                command_ms: c.command_ms,
                last_old_ms: last_old.map(|us| us as f64 / 1e3),
                first_new_ms: first_new.map(|us| us as f64 / 1e3),
                connections: near.len() as u64,
            }
        })
        .collect();
    let mut last: Vec<f64> = switches
        .iter()
        .map(|s| s.last_old_ms.unwrap_or(0.0).max(0.0))
        .collect();
    last.sort_by(f64::total_cmp);
    let p99 = match last.len() {
        0 => 0.0,
        n => last[((n - 1) as f64 * 0.99).round() as usize],
    };
    PropagateRow {
        system: system.into(),
        workers,
        max_last_old_ms: last.last().copied().unwrap_or(0.0),
        p99_last_old_ms: p99,
        switches,
        identified: records.iter().filter(|r| r.backend.is_some()).count() as u64,
        failed: records.iter().filter(|r| r.backend.is_none()).count() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(started_unix_us: u64, backend: &str) -> ConnRecord {
        ConnRecord {
            backend: Some(backend.into()),
            started_unix_us,
            ending: "clean".into(),
            ..ConnRecord::default()
        }
    }

    #[test]
    fn a_switch_is_judged_by_the_connections_around_its_return() {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let changes = [
            Change {
                returned_us: 10_000_000,
                command_ms: 4.0,
                old: set(&["b0", "b1"]),
                new: set(&["b2", "b3"]),
            },
            Change {
                returned_us: 11_000_000,
                command_ms: 6.0,
                old: set(&["b2", "b3"]),
                new: set(&["b4", "b5"]),
            },
        ];
        let records = [
            // Before the first return: old set, fine.
            rec(9_990_000, "b0"),
            // Started 3 ms after the first return and still given b1.
            rec(10_003_000, "b1"),
            rec(9_999_000, "b2"),
            rec(10_200_000, "b3"),
            // Far from both returns: ignored by both.
            rec(10_500_000, "b0"),
            // Second switch: old set only before the return.
            rec(10_999_500, "b3"),
            rec(11_000_100, "b4"),
            ConnRecord {
                backend: None,
                started_unix_us: 11_000_200,
                ending: "handshake:503".into(),
                ..ConnRecord::default()
            },
        ];
        let r = row("weir", 2, &changes, &records);
        assert_eq!(r.switches.len(), 2);
        assert_eq!(r.switches[0].last_old_ms, Some(3.0));
        assert_eq!(r.switches[0].first_new_ms, Some(-1.0));
        assert_eq!(r.switches[0].connections, 4);
        assert_eq!(r.switches[1].last_old_ms, Some(-0.5));
        assert_eq!(r.switches[1].first_new_ms, Some(0.1));
        assert_eq!(r.max_last_old_ms, 3.0);
        assert_eq!(r.p99_last_old_ms, 3.0);
        assert_eq!((r.identified, r.failed), (7, 1));
        let mut out = String::new();
        Propagate::section(&mut out, &[r]);
        assert!(
            out.contains("| 3.00 ms | 3.00 ms | met | 3.00 ms | 0.10 ms |"),
            "{out}"
        );
    }
}
