//! What a bench scenario is: one module in `crate::scenarios` that runs it,
//! defines its rows, checks them, writes its report section and draws its
//! chart. [`crate::catalog`] lists the scenarios for the harness, the
//! report and the plots.

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::chart::Chart;
use crate::stage::Bench;
use crate::table::Measured;

/// A bench scenario. It holds no state: the bench it runs on is passed in,
/// and what it measured lives in its rows.
pub trait Scenario {
    /// On the command line, in file names, as the JSON `scenario`, and the
    /// key of its rows in the result file.
    const NAME: &'static str;
    /// Heading of its report section, before the name.
    const TITLE: &'static str;
    /// Systems a complete run has a row for: a missing one fails the bench.
    const SYSTEMS: &'static [&'static str];
    /// Its chart, for scenarios that have one.
    const CHART: Option<Chart<Self::Row>> = None;

    /// One system measured under one set of conditions.
    type Row: Measured + Serialize + DeserializeOwned;

    /// Runs weir and every peer one after the other on the bench's
    /// topology, backends and load.
    fn run(bench: &mut Bench) -> Result<Outcome<Self::Row>>;

    /// Rows that moved no traffic or were not measured: what CI asserts of
    /// a quick run beyond [`Self::SYSTEMS`]. Speed is not judged here.
    fn faults(rows: &[Self::Row]) -> Vec<String>;

    /// Its tables and what they mean, under the section heading.
    fn section(out: &mut String, rows: &[Self::Row]);
}

/// What a run of a scenario produced, before it is filed with the run's
/// facts.
pub struct Outcome<R> {
    /// Parameters of the scenario (connections, durations, rates).
    pub params: BTreeMap<String, String>,
    pub rows: Vec<R>,
    /// Problems seen (a system that failed to start, a sanity check).
    pub notes: Vec<String>,
}

impl<R> Outcome<R> {
    pub fn new(params: &[(&str, String)]) -> Outcome<R> {
        Outcome {
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }
}
