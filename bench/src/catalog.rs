//! Every scenario, in the order a run and the report take them, and the
//! file a scenario's run writes ([`ScenarioResult`]).
//!
//! The file has one field per scenario for its rows, so this is the one
//! module that names them all: a scenario knows only its own rows, and the
//! harness, the report and the plots know only [`Entry`].

use std::collections::BTreeMap;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::chart::{Area, Chart};
use crate::results::RunInfo;
use crate::scenario::Scenario;
use crate::scenarios::bigconn::{Bigconn, BigconnRow};
use crate::scenarios::churn::{Churn, ChurnRow};
use crate::scenarios::connrate::{Connrate, ConnrateRow};
use crate::scenarios::discover::{Discover, DiscoverRow};
use crate::scenarios::drain::{Drain, DrainRow};
use crate::scenarios::failure::{Failure, FailureRow};
use crate::scenarios::idle::{Idle, IdleRow};
use crate::scenarios::l4::{L4, L4Row};
use crate::scenarios::micro::{Micro, MicroRow};
use crate::scenarios::propagate::{Propagate, PropagateRow};
use crate::scenarios::push::{Push, PushRow};
use crate::scenarios::steady::{Steady, SteadyRow};
use crate::scenarios::storm::{Storm, StormRow};
use crate::scenarios::upgrade::{Upgrade, UpgradeRow};
use crate::stage::Bench;
use crate::table::Measured;

/// One scenario's file, `bench/results/<date>-<scenario>.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub scenario: String,
    pub info: RunInfo,
    /// Parameters of the scenario (connections, durations, rates).
    pub params: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steady: Vec<SteadyRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub push: Vec<PushRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub idle: Vec<IdleRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connrate: Vec<ConnrateRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub churn: Vec<ChurnRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drain: Vec<DrainRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub l4: Vec<L4Row>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub micro: Vec<MicroRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub storm: Vec<StormRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bigconn: Vec<BigconnRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub propagate: Vec<PropagateRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failure: Vec<FailureRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub discover: Vec<DiscoverRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upgrade: Vec<UpgradeRow>,
    /// Problems seen (a system that failed to start, a sanity check).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Which field of [`ScenarioResult`] holds a row type: what lets
/// [`Entry::of`] reach a scenario's rows by its `Row` type.
macro_rules! rows_in_field {
    ($($field:ident: $row:ty),* $(,)?) => {$(
        impl AsRef<[$row]> for ScenarioResult {
            fn as_ref(&self) -> &[$row] {
                &self.$field
            }
        }

        impl AsMut<Vec<$row>> for ScenarioResult {
            fn as_mut(&mut self) -> &mut Vec<$row> {
                &mut self.$field
            }
        }
    )*};
}

rows_in_field!(
    steady: SteadyRow,
    push: PushRow,
    idle: IdleRow,
    connrate: ConnrateRow,
    churn: ChurnRow,
    drain: DrainRow,
    l4: L4Row,
    micro: MicroRow,
    storm: StormRow,
    bigconn: BigconnRow,
    propagate: PropagateRow,
    failure: FailureRow,
    discover: DiscoverRow,
    upgrade: UpgradeRow,
);

/// The scenarios, in the order a run and the report take them.
pub static ALL: [Entry; 14] = [
    Entry::of::<Steady>(),
    Entry::of::<Push>(),
    Entry::of::<Idle>(),
    Entry::of::<Bigconn>(),
    Entry::of::<Connrate>(),
    Entry::of::<Storm>(),
    Entry::of::<Churn>(),
    Entry::of::<Propagate>(),
    Entry::of::<Discover>(),
    Entry::of::<Drain>(),
    Entry::of::<Failure>(),
    Entry::of::<Upgrade>(),
    Entry::of::<L4>(),
    Entry::of::<Micro>(),
];

pub fn find(name: &str) -> Option<&'static Entry> {
    ALL.iter().find(|e| e.name == name)
}

/// Checks that a scenario's result is complete and sane (every system
/// measured, traffic moved): what CI asserts of a quick run. Speed is not
/// judged here.
pub fn check(r: &ScenarioResult) -> Vec<String> {
    match find(&r.scenario) {
        Some(e) => (e.check)(r),
        None => vec![format!("unknown scenario {}", r.scenario)],
    }
}

/// A [`Scenario`] bound to its rows in [`ScenarioResult`], so scenarios of
/// different row types can be listed together.
pub struct Entry {
    pub name: &'static str,
    pub title: &'static str,
    /// Its chart, drawn from its rows in every file given.
    pub chart: Option<Chart<ScenarioResult>>,
    run: fn(&mut Bench) -> Result<ScenarioResult>,
    check: fn(&ScenarioResult) -> Vec<String>,
    has_rows: fn(&ScenarioResult) -> bool,
    section: fn(&mut String, &ScenarioResult),
}

impl Entry {
    const fn of<S: Scenario>() -> Entry
    where
        ScenarioResult: AsRef<[S::Row]> + AsMut<Vec<S::Row>>,
    {
        Entry {
            name: S::NAME,
            title: S::TITLE,
            chart: match S::CHART {
                Some(c) => Some(Chart {
                    file: c.file,
                    size: c.size,
                    draw: draw::<S>,
                }),
                None => None,
            },
            run: run::<S>,
            check: check_rows::<S>,
            has_rows: |r| !AsRef::<[S::Row]>::as_ref(r).is_empty(),
            section: |out, r| S::section(out, r.as_ref()),
        }
    }

    /// Runs the scenario and files its outcome with the run's facts.
    pub fn run(&self, bench: &mut Bench) -> Result<ScenarioResult> {
        (self.run)(bench)
    }

    pub fn has_rows(&self, r: &ScenarioResult) -> bool {
        (self.has_rows)(r)
    }

    /// Writes the scenario's tables for its rows in `r`.
    pub fn section(&self, out: &mut String, r: &ScenarioResult) {
        (self.section)(out, r)
    }
}

fn run<S: Scenario>(bench: &mut Bench) -> Result<ScenarioResult>
where
    ScenarioResult: AsMut<Vec<S::Row>>,
{
    bench.begin(S::NAME);
    let outcome = S::run(bench)?;
    let mut r = ScenarioResult {
        scenario: S::NAME.into(),
        info: bench.info.clone(),
        params: outcome.params,
        notes: outcome.notes,
        ..ScenarioResult::default()
    };
    *AsMut::<Vec<S::Row>>::as_mut(&mut r) = outcome.rows;
    Ok(r)
}

fn check_rows<S: Scenario>(r: &ScenarioResult) -> Vec<String>
where
    ScenarioResult: AsRef<[S::Row]>,
{
    let rows: &[S::Row] = r.as_ref();
    let measured: Vec<&str> = rows.iter().map(Measured::system).collect();
    let mut bad: Vec<String> = S::SYSTEMS
        .iter()
        .filter(|w| !measured.contains(w))
        .map(|w| format!("{}: no result for {w}", r.scenario))
        .collect();
    bad.extend(S::faults(rows));
    bad
}

/// Only [`Entry::of`] a scenario with a chart points here.
fn draw<S: Scenario>(area: &Area, results: &[&ScenarioResult]) -> Result<()>
where
    ScenarioResult: AsRef<[S::Row]>,
{
    let rows: Vec<&S::Row> = results
        .iter()
        .flat_map(|r| AsRef::<[S::Row]>::as_ref(*r))
        .collect();
    match S::CHART {
        Some(chart) => (chart.draw)(area, &rows),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::CpuSplit;
    use crate::stage::Net;

    fn steady(system: &str, rate: f64) -> SteadyRow {
        SteadyRow {
            system: system.into(),
            message_bytes: 64,
            closed_msgs_per_sec: rate,
            open_achieved: rate,
            closed_cpu: CpuSplit {
                proxy_s: 1.0,
                ..CpuSplit::default()
            },
            ..SteadyRow::default()
        }
    }

    #[test]
    fn check_wants_every_system_and_moving_traffic() {
        let mut r = ScenarioResult {
            scenario: "steady".into(),
            steady: vec![
                steady("weir", 10.0),
                steady("haproxy", 10.0),
                steady("nginx", 10.0),
            ],
            ..ScenarioResult::default()
        };
        assert!(check(&r).is_empty(), "{:?}", check(&r));
        r.steady.pop();
        assert_eq!(check(&r), vec!["steady: no result for nginx".to_string()]);
        r.steady.push(steady("nginx", 0.0));
        assert_eq!(check(&r).len(), 1, "{:?}", check(&r));
        assert!(check(&r)[0].contains("nginx moved no messages"));
    }

    #[test]
    fn check_wants_every_system_on_every_topology_measured() {
        let mut r = ScenarioResult {
            scenario: "steady".into(),
            steady: ["weir", "haproxy", "nginx", "weir", "haproxy"]
                .iter()
                .enumerate()
                .map(|(i, s)| SteadyRow {
                    topology: if i < 3 {
                        Net::Namespaces
                    } else {
                        Net::Loopback
                    },
                    ..steady(s, 10.0)
                })
                .collect(),
            ..ScenarioResult::default()
        };
        assert_eq!(
            check(&r),
            vec!["steady: no loopback result for nginx".to_string()]
        );
        r.steady.retain(|x| x.topology == Net::Namespaces);
        assert!(check(&r).is_empty(), "{:?}", check(&r));
    }

    #[test]
    fn check_wants_frames_pushed_through_every_system() {
        let row = |system: &str, received, proxy_s| PushRow {
            system: system.into(),
            rate: 5_000.0,
            expected: 100,
            received,
            cpu: CpuSplit {
                proxy_s,
                ..CpuSplit::default()
            },
            ..PushRow::default()
        };
        let r = ScenarioResult {
            scenario: "push".into(),
            push: vec![
                row("direct", 100, 0.0),
                row("weir", 100, 1.0),
                row("haproxy", 0, 1.0),
                row("nginx", 100, 0.0),
            ],
            ..ScenarioResult::default()
        };
        assert_eq!(
            check(&r),
            vec![
                "push: haproxy delivered no frames at 5000 frames/s".to_string(),
                "push: nginx's CPU time was not measured".to_string(),
            ]
        );
    }

    #[test]
    fn check_flags_an_idle_run_that_lost_connections() {
        let row = |system: &str, held| IdleRow {
            system: system.into(),
            connections: 1000,
            held,
            rss_after_kib: 1,
            ..IdleRow::default()
        };
        let r = ScenarioResult {
            scenario: "idle".into(),
            idle: vec![row("weir", 1000), row("haproxy", 950), row("nginx", 10)],
            ..ScenarioResult::default()
        };
        assert_eq!(check(&r), vec!["idle: nginx held 10 of 1000".to_string()]);
    }

    #[test]
    fn check_refuses_unknown_scenarios() {
        let r = ScenarioResult {
            scenario: "nope".into(),
            ..ScenarioResult::default()
        };
        assert_eq!(check(&r), vec!["unknown scenario nope".to_string()]);
    }
}
