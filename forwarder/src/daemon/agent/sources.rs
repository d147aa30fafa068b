//! Discovery sources in the agent: each report of a source becomes
//! registry changes, or is refused and counted, and the registry keeps
//! what it has.
//!
//! A revision is applied whole or not at all, as far as planning can tell:
//! when it names several services, every service's [`Change::SetBackends`]
//! is planned first (a dry run: validation and guard rails), and only when
//! all pass are they applied, one [`Registry::apply`] each (the registry
//! changes one service per apply; a failure between two applies, which
//! planning did not foresee, is logged with the services already applied).
//! A revision of one service skips the dry run: its one apply is already
//! whole or nothing, and planning a ring twice doubles the time a change
//! takes to reach the data planes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::metrics::{Metrics, SourceOutcome};
use crate::discovery::status::{self, SourceStatus};
use crate::discovery::{self, Desired, Report, Update};
use crate::registry::audit::now_ms;
use crate::registry::{ApplyOptions, Change, Registry, RegistryError, ServiceAddr};

/// What the agent remembers of its sources.
pub struct Sources {
    state_dir: PathBuf,
    /// Each source's last report and the revision applied from it, as
    /// recorded for `weir stats` and the CLI's ownership warning.
    status: BTreeMap<String, SourceStatus>,
}

impl Sources {
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            state_dir,
            status: BTreeMap::new(),
        }
    }

    /// Applies, or refuses, one report.
    pub fn report(&mut self, report: Report, registry: &mut Registry, metrics: &mut Metrics) {
        let Report { source, update } = report;
        // What became of it; why it was not applied; what now stands.
        let (outcome, reason, applied) = match update {
            Update::Desired { revision, desired } => {
                match apply(&source, &revision, &desired, registry) {
                    Ok(()) => {
                        let services = desired.services.keys().map(|s| s.to_string()).collect();
                        (SourceOutcome::Applied, None, Some((revision, services)))
                    }
                    Err((outcome, reason)) => (outcome, Some(reason), None),
                }
            }
            Update::Empty { revision, reason } => {
                tracing::warn!(
                    event = "source_empty",
                    source,
                    revision,
                    "{reason}: keeping the backends applied from it last (fail static; counted \
                     in weir_agent_source_reports_total{{outcome=\"empty\"}})"
                );
                (
                    SourceOutcome::Empty,
                    Some(format!("revision {revision}: {reason}")),
                    None,
                )
            }
            Update::Failed { reason } => {
                tracing::warn!(
                    event = "source_refused",
                    source,
                    "refused, nothing changes: {reason}"
                );
                (SourceOutcome::Refused, Some(reason), None)
            }
        };
        *metrics
            .sources
            .entry((source.clone(), outcome))
            .or_default() += 1;
        metrics
            .stale
            .insert(source.clone(), outcome != SourceOutcome::Applied);
        let entry = self.status.entry(source.clone()).or_insert(SourceStatus {
            source,
            ..SourceStatus::default()
        });
        entry.last = outcome.name().to_string();
        if let Some((revision, services)) = applied {
            entry.applied_revision = Some(revision);
            entry.applied_at_ms = Some(now_ms());
            entry.services = services;
        }
        match reason {
            None => {
                entry.stale = false;
                entry.stale_since_ms = None;
                entry.reason = None;
            }
            Some(reason) => {
                entry.stale_since_ms = entry.stale_since_ms.or(Some(now_ms()));
                entry.stale = true;
                entry.reason = Some(reason);
            }
        }
        self.record();
    }

    /// Writes what each source did and owns, for `weir stats` and the
    /// CLI's warning.
    fn record(&self) {
        let record = status::Record {
            agent_pid: std::process::id(),
            written_ms: now_ms(),
            sources: self.status.values().cloned().collect(),
        };
        if let Err(e) = status::write(&self.state_dir, &record) {
            tracing::warn!(
                event = "sources_unrecorded",
                "cannot record the sources' state in {}: {e}; `weir stats` will not show it and \
                 the CLI will not warn about hand edits",
                self.state_dir.display()
            );
        }
    }
}

/// Applies a revision whole, or says why not.
fn apply(
    source: &str,
    revision: &str,
    desired: &Desired,
    registry: &mut Registry,
) -> Result<(), (SourceOutcome, String)> {
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
    for (service, change) in changes.iter().filter(|_| changes.len() > 1) {
        if let Err(e) = registry.apply(change, opts(true)) {
            return Err(refused(source, revision, service, &e, "nothing changed"));
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
                return Err(refused(source, revision, service, &e, &done));
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
    Ok(())
}

/// Logs a refused revision; how it counts and why.
fn refused(
    source: &str,
    revision: &str,
    service: &ServiceAddr,
    e: &RegistryError,
    done: &str,
) -> (SourceOutcome, String) {
    let (outcome, how) = match e {
        RegistryError::Guard(_) => (
            SourceOutcome::Guard,
            "refused by the guard rails, as the same `weir backend set` would be",
        ),
        _ => (SourceOutcome::Error, "refused by the registry"),
    };
    let reason = format!(
        "revision {revision}: the backends of {service} {how}: {e}; {done}, the registry keeps \
         the last applied state"
    );
    tracing::warn!(
        event = "source_refused",
        source,
        revision,
        outcome = outcome.name(),
        "{reason}"
    );
    (outcome, reason)
}
