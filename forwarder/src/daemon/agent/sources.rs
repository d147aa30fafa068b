//! Discovery sources in the agent: each report of a source becomes
//! registry changes, or is refused and counted, and the registry keeps
//! what it has.
//!
//! A revision is applied whole or not at all, as far as planning can tell:
//! every service's [`Change::SetBackends`] is planned first (a dry run:
//! validation and guard rails), and only when all pass are they applied,
//! one [`Registry::apply`] each (the registry changes one service per
//! apply; a failure between two applies, which planning did not foresee,
//! is logged with the services already applied).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use super::metrics::{Metrics, SourceOutcome};
use crate::discovery::{self, Desired, Report, Update, ownership};
use crate::registry::{ApplyOptions, Change, Registry, RegistryError, ServiceAddr};

/// What the agent remembers of its sources.
pub struct Sources {
    state_dir: PathBuf,
    /// The services each source named at its last applied revision.
    named: BTreeMap<String, BTreeSet<ServiceAddr>>,
}

impl Sources {
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            state_dir,
            named: BTreeMap::new(),
        }
    }

    /// Applies, or refuses, one report.
    pub fn report(&mut self, report: Report, registry: &mut Registry, metrics: &mut Metrics) {
        let Report { source, update } = report;
        let outcome = match update {
            Update::Desired { revision, desired } => {
                self.apply(&source, &revision, &desired, registry)
            }
            Update::Empty { revision, reason } => {
                tracing::warn!(
                    event = "source_empty",
                    source,
                    revision,
                    "{reason}: keeping the backends applied from it last (fail static; counted \
                     in weir_agent_source_reports_total{{outcome=\"empty\"}})"
                );
                SourceOutcome::Empty
            }
            Update::Failed { reason } => {
                tracing::warn!(
                    event = "source_refused",
                    source,
                    "refused, nothing changes: {reason}"
                );
                SourceOutcome::Refused
            }
        };
        *metrics
            .sources
            .entry((source.clone(), outcome))
            .or_default() += 1;
        metrics
            .stale
            .insert(source, outcome != SourceOutcome::Applied);
    }

    fn apply(
        &mut self,
        source: &str,
        revision: &str,
        desired: &Desired,
        registry: &mut Registry,
    ) -> SourceOutcome {
        // `changes` follows the order of `desired.services`.
        let changes: Vec<(ServiceAddr, Change)> = desired
            .services
            .keys()
            .copied()
            .zip(desired.changes())
            .collect();
        let opts = |dry_run| ApplyOptions {
            command: discovery::command(source, revision),
            dry_run,
            ..Default::default()
        };
        for (service, change) in &changes {
            if let Err(e) = registry.apply(change, opts(true)) {
                return refused(source, revision, service, &e, "nothing changed");
            }
        }
        let mut applied: Vec<String> = Vec::new();
        let mut changed = 0;
        for (service, change) in &changes {
            match registry.apply(change, opts(false)) {
                Ok(outcome) => {
                    for w in &outcome.warnings {
                        tracing::warn!(event = "apply_warning", source, "{w}");
                    }
                    for line in &outcome.diff {
                        tracing::info!(event = "changed", source, revision, "{line}");
                    }
                    changed += usize::from(!outcome.diff.is_empty());
                    applied.push(service.to_string());
                }
                Err(e) => {
                    let done = if applied.is_empty() {
                        "nothing changed".to_string()
                    } else {
                        format!("applied before it: {}", applied.join(", "))
                    };
                    return refused(source, revision, service, &e, &done);
                }
            }
        }
        tracing::info!(
            event = "source_applied",
            source,
            revision,
            "applied: {} service(s), {changed} changed",
            changes.len()
        );
        self.named.insert(
            source.to_string(),
            desired.services.keys().copied().collect(),
        );
        self.record();
        SourceOutcome::Applied
    }

    /// Writes which source owns which service, for the CLI's warning.
    fn record(&self) {
        let owners: BTreeMap<ServiceAddr, String> = self
            .named
            .iter()
            .flat_map(|(source, services)| services.iter().map(|s| (*s, source.clone())))
            .collect();
        if let Err(e) = ownership::record(&self.state_dir, &owners) {
            tracing::warn!(
                event = "ownership_unrecorded",
                "cannot record which services the sources own in {}: {e}; the CLI will not \
                 warn about hand edits",
                self.state_dir.display()
            );
        }
    }
}

/// Logs a refused revision and says how it counts.
fn refused(
    source: &str,
    revision: &str,
    service: &ServiceAddr,
    e: &RegistryError,
    done: &str,
) -> SourceOutcome {
    let (outcome, how) = match e {
        RegistryError::Guard(_) => (
            SourceOutcome::Guard,
            "refused by the guard rails, as the same `weir backend set` would be",
        ),
        _ => (SourceOutcome::Error, "refused by the registry"),
    };
    tracing::warn!(
        event = "source_refused",
        source,
        revision,
        outcome = outcome.name(),
        "revision {revision}: the backends of {service} {how}: {e}; {done}, the registry keeps \
         the last applied state"
    );
    outcome
}
