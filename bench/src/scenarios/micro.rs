//! The L4 path's own costs, with no peer to run beside: XDP nanoseconds per
//! packet against a bare `XDP_TX` floor timed in the same loop, and the
//! wall time of `weir backend set` ([`crate::micro`]). Part of the full run
//! so that its report shows every goal of the performance issue.

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::micro::{self, Params, Timing, XdpResult};
use crate::scenario::{Outcome, Scenario};
use crate::stage::Bench;
use crate::table::{Table, fmt_f, fmt_int, fmt_ratio, measured, ratio};

/// SYN of a new flow: at most this many times the floor.
pub const SYN_GOAL: f64 = 5.0;
/// A packet of an established flow: at most this many times the floor.
pub const ESTABLISHED_GOAL: f64 = 1.6;
/// `weir backend set` of 10,000 backends, from empty and for one replaced.
pub const SET_GOAL_MS: f64 = 100.0;
/// Backends in the set the goal is about.
pub const SET_GOAL_BACKENDS: usize = 10_000;

pub struct Micro;

/// Everything one run measured; weir is the only system.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MicroRow {
    pub system: String,
    pub xdp: Vec<XdpResult>,
    pub backend_set: Vec<micro::SetResult>,
}

measured!(MicroRow);

impl MicroRow {
    /// Lowest and highest `packet ÷ floor` over every round, backend count
    /// and table state, from means.
    pub fn range(&self, packet: impl Fn(&micro::Packets) -> &Timing) -> Option<(f64, f64)> {
        let ratios: Vec<f64> = self
            .xdp
            .iter()
            .flat_map(XdpResult::tables)
            .filter_map(|(_, p)| ratio(packet(p).mean, p.floor.mean))
            .collect();
        let lo = ratios.iter().copied().reduce(f64::min)?;
        let hi = ratios.iter().copied().reduce(f64::max)?;
        Some((lo, hi))
    }

    /// The `backend set` timing of the goal's size.
    pub fn goal_set(&self) -> Option<&micro::SetResult> {
        self.backend_set
            .iter()
            .find(|s| s.backends == SET_GOAL_BACKENDS)
    }
}

/// Whether a `backend set` timing meets the goal, from empty and for one
/// replaced.
pub fn set_goal_met(s: &micro::SetResult) -> bool {
    s.initial_ms <= SET_GOAL_MS && s.change_ms <= SET_GOAL_MS
}

impl Scenario for Micro {
    const NAME: &'static str = "micro";
    const TITLE: &'static str = "XDP cost per packet and `weir backend set` time";
    const SYSTEMS: &'static [&'static str] = &["weir"];

    type Row = MicroRow;

    fn run(b: &mut Bench) -> Result<Outcome<MicroRow>> {
        let p = if b.sizes.quick {
            Params::QUICK
        } else {
            Params::FULL
        };
        let mut out = Outcome::new(&[
            ("runs", p.runs.to_string()),
            ("rounds", p.rounds.to_string()),
            ("table_flows", p.table_flows.to_string()),
            ("set_repeats", p.set_repeats.to_string()),
        ]);
        let report = micro::run(&p, |line| b.progress(line))?;
        out.rows.push(MicroRow {
            system: "weir".into(),
            xdp: report.xdp,
            backend_set: report.backend_set,
        });
        Ok(out)
    }

    fn faults(rows: &[MicroRow]) -> Vec<String> {
        let mut bad = Vec::new();
        for r in rows {
            let timings = r.xdp.iter().flat_map(XdpResult::tables).flat_map(|(_, p)| {
                [
                    &p.syn_new_flow,
                    &p.established_one_flow,
                    &p.established_spread,
                    &p.floor,
                ]
            });
            if r.xdp.is_empty() || timings.into_iter().any(|t| t.runs == 0 || t.mean <= 0.0) {
                bad.push("micro: an XDP packet kind was not timed".into());
            }
            if r.goal_set().is_none() {
                bad.push(format!(
                    "micro: no `backend set` timing of {SET_GOAL_BACKENDS} backends"
                ));
            }
        }
        bad
    }

    fn section(out: &mut String, rows: &[MicroRow]) {
        let Some(r) = rows.first() else { return };
        let mut t = Table::new(&[
            "round",
            "backends",
            "flows in the table",
            "SYN, new flow (ns)",
            "× floor",
            "established, one flow (ns)",
            "× floor",
            "established, scattered (ns)",
            "× floor",
            "floor: bare XDP_TX (ns)",
        ]);
        for x in &r.xdp {
            for (flows, p) in x.tables() {
                let mut cells = vec![
                    x.round.to_string(),
                    fmt_int(u64::from(x.backends)),
                    fmt_int(u64::from(flows)),
                ];
                for t in [
                    &p.syn_new_flow,
                    &p.established_one_flow,
                    &p.established_spread,
                ] {
                    cells.push(fmt_f(t.mean, 0));
                    cells.push(fmt_ratio(ratio(t.mean, p.floor.mean)));
                }
                cells.push(fmt_f(p.floor.mean, 0));
                t.row(cells);
            }
        }
        t.write(out);
        let range = |packet: fn(&micro::Packets) -> &Timing| match r.range(packet) {
            Some((lo, hi)) => format!("{}–{}", fmt_ratio(Some(lo)), fmt_ratio(Some(hi))),
            None => "–".into(),
        };
        out.push_str(&format!(
            "\nMeans of single BPF_PROG_RUN runs, the kernel's own timing, with M = 65537; \
             \"× floor\" divides by the bare program's mean in the same loop. \"flows in the \
             table\" 0 starts from an empty table (the scattered packets are one of each flow \
             the SYNs made); otherwise the table is filled first and the scattered packets \
             visit its flows out of order. Over all rows: SYN {} the floor (goal ≤ {}×), \
             established one flow {} (goal ≤ {}×), scattered {} (no goal: each packet's lookup \
             misses the cache).\n\n",
            range(|p| &p.syn_new_flow),
            SYN_GOAL,
            range(|p| &p.established_one_flow),
            ESTABLISHED_GOAL,
            range(|p| &p.established_spread),
        ));
        let mut t = Table::new(&[
            "backends",
            "ring",
            "from empty (ms)",
            "one replaced (ms)",
            "goal",
        ])
        .left(&["goal"]);
        for s in &r.backend_set {
            let goal = if s.backends == SET_GOAL_BACKENDS {
                let met = set_goal_met(s);
                format!(
                    "≤ {} ms both: {}",
                    fmt_f(SET_GOAL_MS, 0),
                    if met { "met" } else { "not met" }
                )
            } else {
                String::new()
            };
            t.row(vec![
                fmt_int(s.backends as u64),
                fmt_int(u64::from(s.ring_size)),
                fmt_f(s.initial_ms, 1),
                fmt_f(s.change_ms, 1),
                goal,
            ]);
        }
        t.write(out);
        out.push_str(
            "\nWall time of the `weir backend set` command as an operator runs it (a fresh \
             instance each repetition, median shown): Maglev build, map writes, read-back \
             and the audit line included.\n",
        );
    }
}
