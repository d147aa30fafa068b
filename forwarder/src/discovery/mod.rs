//! Discovery: backend sets that come from a source (a watched file, etcd)
//! instead of the command line. A source turns what it reads into a
//! [`Desired`] state; [`Desired::changes`] plans it into one
//! [`Change::SetBackends`] per service, which `weir agent` applies through
//! [`crate::registry::Registry::apply`] like any CLI command (guard rails,
//! read-back, audit line naming the source and its revision).
//!
//! Sources run on their own (a thread, a task) and report to the agent's
//! loop through a channel of [`Report`]s, so a blocking watch never stalls
//! the health checks.
//!
//! - [`file`]: a watched TOML or JSON file;
//! - [`etcd`]: an etcd v3 key prefix, read at a revision and watched;
//! - [`status`]: what each source last did and which services it owns, for
//!   `weir stats` and the CLI's warning.

pub mod etcd;
pub mod file;
pub mod status;

use std::collections::BTreeMap;

use crate::registry::{BackendAddr, Change, ServiceAddr};

/// What a source says the fleet should be: each service it names and
/// exactly the backends (with weights) it should have.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub services: BTreeMap<ServiceAddr, Vec<(BackendAddr, u16)>>,
}

impl Desired {
    /// One declarative change per service, backends in address order so
    /// two hosts reading the same source plan the same change.
    pub fn changes(&self) -> Vec<Change> {
        self.services
            .iter()
            .map(|(service, backends)| {
                let mut backends = backends.clone();
                backends.sort_unstable();
                Change::SetBackends {
                    service: *service,
                    backends,
                }
            })
            .collect()
    }
}

/// What a source reports to the agent.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The source, as the operator configured it: `file /etc/weir/backends.toml`.
    pub source: String,
    pub update: Update,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    /// A complete new revision of the desired state, naming at least one
    /// service.
    Desired { revision: String, desired: Desired },
    /// The source names no service at all (a file truncated to zero or
    /// deleted, an empty etcd prefix after a restore): the agent keeps what
    /// it applied last (fail static).
    Empty { revision: String, reason: String },
    /// The source could not be read or what it holds is refused (malformed,
    /// half-written, unreachable). Nothing changes; `reason` says where and
    /// why (file:line for a file).
    Failed { reason: String },
}

/// The command line an applied revision records in the audit log:
/// `weir agent (file /etc/weir/backends.toml rev 7)`.
pub fn command(source: &str, revision: &str) -> String {
    format!("weir agent ({source} rev {revision})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_one_sorted_set_per_service() {
        let svc: ServiceAddr = "198.19.0.10:80".parse().unwrap();
        let other: ServiceAddr = "198.19.0.11:80".parse().unwrap();
        let b = |s: &str| BackendAddr::parse_for(s, &svc).unwrap();
        let mut desired = Desired::default();
        desired
            .services
            .insert(svc, vec![(b("198.18.1.3"), 3), (b("198.18.1.2"), 1)]);
        desired.services.insert(other, vec![]);
        assert_eq!(
            desired.changes(),
            vec![
                Change::SetBackends {
                    service: svc,
                    backends: vec![(b("198.18.1.2"), 1), (b("198.18.1.3"), 3)],
                },
                Change::SetBackends {
                    service: other,
                    backends: vec![],
                },
            ]
        );
        assert_eq!(
            command("file /etc/weir/backends.toml", "7"),
            "weir agent (file /etc/weir/backends.toml rev 7)"
        );
    }
}
