//! What `weir agent` counts, and its `/metrics` endpoint (Prometheus
//! text). Health and panic are read from the registry, so they show what
//! the data planes act on, not what the agent meant to write.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::prometheus::family;
use crate::registry::{BackendAddr, ServiceAddr, State};

/// The agent's counters and the registry's view of health, shared between
/// the check loop and the endpoint.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Finished checks by service, check type and outcome (a reason name).
    pub checks: BTreeMap<(ServiceAddr, &'static str, &'static str), u64>,
    /// Applied health transitions by service and new health.
    pub transitions: BTreeMap<(ServiceAddr, String), u64>,
    /// Checks not run because the L4 probe path is not attached.
    pub probe_path_skipped: BTreeMap<ServiceAddr, u64>,
    /// Checks that failed on the agent's side (no socket): not counted
    /// against the backend.
    pub check_errors: u64,
    /// Health changes the registry refused (retried next round).
    pub apply_errors: u64,
    /// Failed rounds of freeing removed backends.
    pub collect_errors: u64,
    pub in_flight: u64,
    /// Reports of each discovery source by what became of them
    /// ([`SourceOutcome`]).
    pub sources: BTreeMap<(String, SourceOutcome), u64>,
    /// Sources whose last report was not applied: the registry keeps an
    /// older revision (fail static).
    pub stale: BTreeMap<String, bool>,
    /// From the last registry read.
    pub backends: Vec<BackendRow>,
    pub services: Vec<ServiceRow>,
    /// Every service's ring digest (service, ring size, digest), from the
    /// last read after the generation moved: what operators compare across
    /// hosts fed the same backends.
    pub digests: Vec<(ServiceAddr, u32, String)>,
}

/// What became of one report of a discovery source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SourceOutcome {
    /// Every service it names is as it says.
    Applied,
    /// It named no service (empty, deleted): the last state is kept.
    Empty,
    /// Unreadable or malformed: refused, nothing changed.
    Refused,
    /// The guard rails refused a change it asked for: nothing changed.
    Guard,
    /// The registry refused a change otherwise (an unknown service, say).
    Error,
}

impl SourceOutcome {
    pub fn name(self) -> &'static str {
        match self {
            SourceOutcome::Applied => "applied",
            SourceOutcome::Empty => "empty",
            SourceOutcome::Refused => "refused",
            SourceOutcome::Guard => "guard",
            SourceOutcome::Error => "error",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendRow {
    pub service: ServiceAddr,
    pub backend: BackendAddr,
    pub state: &'static str,
    pub health: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRow {
    pub service: ServiceAddr,
    pub panic: bool,
    pub panics: u32,
}

impl Metrics {
    /// Takes health and panic from a registry read, for the services the
    /// agent checks.
    pub fn read(&mut self, state: &State, checked: &[ServiceAddr]) {
        self.backends.clear();
        self.services.clear();
        for service in checked {
            let Some(s) = state.services.get(service) else {
                continue;
            };
            self.services.push(ServiceRow {
                service: *service,
                panic: s.panic,
                panics: s.panics,
            });
            for (_, b) in state.backends_of(s.id) {
                self.backends.push(BackendRow {
                    service: *service,
                    backend: b.addr,
                    state: b.state.name(),
                    health: b.health.name(),
                    reason: b.health_reason.name(),
                });
            }
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        family(
            &mut out,
            "weir_agent_checks_total",
            "counter",
            "Health checks finished, by service, check type and outcome (passed or the reason it failed).",
            self.checks.iter().map(|((s, kind, outcome), n)| {
                (
                    format!("{{service=\"{s}\",type=\"{kind}\",outcome=\"{outcome}\"}}"),
                    *n,
                )
            }),
        );
        family(
            &mut out,
            "weir_agent_transitions_total",
            "counter",
            "Health transitions the agent applied, by service and new health.",
            self.transitions
                .iter()
                .map(|((s, to), n)| (format!("{{service=\"{s}\",to=\"{to}\"}}"), *n)),
        );
        family(
            &mut out,
            "weir_agent_backend_health",
            "gauge",
            "1 per backend of a checked service: its state, health and the reason of its last transition, as the registry has them.",
            self.backends.iter().map(|b| {
                (
                    format!(
                        "{{service=\"{}\",backend=\"{}\",state=\"{}\",health=\"{}\",reason=\"{}\"}}",
                        b.service, b.backend, b.state, b.health, b.reason
                    ),
                    1,
                )
            }),
        );
        family(
            &mut out,
            "weir_agent_service_panic",
            "gauge",
            "1 while a checked service is in panic mode (every active backend kept in the ring).",
            self.services
                .iter()
                .map(|s| (format!("{{service=\"{}\"}}", s.service), u64::from(s.panic))),
        );
        family(
            &mut out,
            "weir_agent_ring_digest",
            "gauge",
            "1 per service, labelled with its ring's digest over slot -> backend address (as `weir check` prints it): equal on every host fed the same backends.",
            self.digests.iter().map(|(service, size, digest)| {
                (
                    format!("{{service=\"{service}\",ring_size=\"{size}\",digest=\"{digest}\"}}"),
                    1,
                )
            }),
        );
        family(
            &mut out,
            "weir_agent_service_panics_total",
            "counter",
            "Panic episodes of a checked service, as the registry counts them.",
            self.services.iter().map(|s| {
                (
                    format!("{{service=\"{}\"}}", s.service),
                    u64::from(s.panics),
                )
            }),
        );
        family(
            &mut out,
            "weir_agent_probe_path_skipped_total",
            "counter",
            "Checks of L4 backends not run because the probe path is not attached (their health is left as it is).",
            self.probe_path_skipped
                .iter()
                .map(|(s, n)| (format!("{{service=\"{s}\"}}"), *n)),
        );
        family(
            &mut out,
            "weir_agent_check_errors_total",
            "counter",
            "Checks the agent could not start (no socket); not counted against the backend.",
            [(String::new(), self.check_errors)],
        );
        family(
            &mut out,
            "weir_agent_apply_errors_total",
            "counter",
            "Health changes the registry refused; retried the next round.",
            [(String::new(), self.apply_errors)],
        );
        family(
            &mut out,
            "weir_agent_collect_errors_total",
            "counter",
            "Failed rounds of freeing removed backends that nothing uses any more.",
            [(String::new(), self.collect_errors)],
        );
        family(
            &mut out,
            "weir_agent_source_reports_total",
            "counter",
            "Revisions a discovery source reported, by what became of them: applied, empty (last state kept), refused (malformed or unreadable), guard (refused by the guard rails), error.",
            self.sources.iter().map(|((s, outcome), n)| {
                (
                    format!("{{source=\"{}\",outcome=\"{}\"}}", label(s), outcome.name()),
                    *n,
                )
            }),
        );
        family(
            &mut out,
            "weir_agent_source_stale",
            "gauge",
            "1 while a discovery source's last report was not applied: the registry keeps the last state applied from it (fail static).",
            self.stale
                .iter()
                .map(|(s, stale)| (format!("{{source=\"{}\"}}", label(s)), u64::from(*stale))),
        );
        family(
            &mut out,
            "weir_agent_checks_in_flight",
            "gauge",
            "Checks running now.",
            [(String::new(), self.in_flight)],
        );
        out
    }
}

/// A label value as Prometheus text takes it.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `/metrics` on `listener` (bound at start) until the runtime
/// stops: one task per scrape, each cut off after two seconds.
pub fn serve(listener: TcpListener, metrics: Arc<Mutex<Metrics>>) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                // Out of descriptors, say: try again in a moment, not in a
                // busy loop.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(tokio::time::timeout(Duration::from_secs(2), async move {
                let mut request = [0u8; 1024];
                let n = stream.read(&mut request).await.unwrap_or(0);
                let answer = crate::prometheus::answer(&request[..n], || {
                    metrics.lock().unwrap_or_else(|e| e.into_inner()).render()
                });
                let _ = stream.write_all(&answer).await;
            }));
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use weir_ebpf::abi::{BackendHealth, HealthReason};

    use super::*;
    use crate::registry::ServiceModeName;
    use crate::registry::model::{Change, plan};

    #[test]
    fn health_panic_and_counters_are_rendered() {
        let svc: ServiceAddr = "198.19.0.10:80".parse().unwrap();
        let add = Change::AddService {
            addr: svc,
            mode: ServiceModeName::L7,
            ring_size: None,
            max_remove_fraction: None,
            min_backends: None,
            panic_threshold: None,
        };
        let mut state = plan(&State::default(), &add, false).unwrap().next;
        let b = BackendAddr {
            addr: std::net::Ipv4Addr::new(198, 18, 10, 1),
            port: 80,
        };
        let add = Change::AddBackend {
            service: svc,
            backend: b,
            weight: 1,
        };
        state = plan(&state, &add, false).unwrap().next;
        for e in state.backends.values_mut() {
            e.health = BackendHealth::Unhealthy;
            e.health_reason = HealthReason::NotUpgraded;
        }
        for s in state.services.values_mut() {
            (s.panic, s.panics) = (true, 3);
        }
        let mut m = Metrics::default();
        m.read(&state, &[svc, "198.19.0.11:80".parse().unwrap()]);
        m.checks.insert((svc, "websocket", "not_upgraded"), 5);
        m.transitions.insert((svc, "unhealthy".into()), 1);
        m.probe_path_skipped.insert(svc, 7);
        (
            m.check_errors,
            m.apply_errors,
            m.collect_errors,
            m.in_flight,
        ) = (1, 2, 4, 9);
        m.digests = vec![(svc, 65537, "ab12".into())];
        let text = m.render();
        for line in [
            "weir_agent_checks_total{service=\"198.19.0.10:80\",type=\"websocket\",outcome=\"not_upgraded\"} 5",
            "weir_agent_transitions_total{service=\"198.19.0.10:80\",to=\"unhealthy\"} 1",
            "weir_agent_backend_health{service=\"198.19.0.10:80\",backend=\"198.18.10.1:80\",state=\"active\",health=\"unhealthy\",reason=\"not_upgraded\"} 1",
            "weir_agent_service_panic{service=\"198.19.0.10:80\"} 1",
            "weir_agent_service_panics_total{service=\"198.19.0.10:80\"} 3",
            "weir_agent_probe_path_skipped_total{service=\"198.19.0.10:80\"} 7",
            "weir_agent_check_errors_total 1",
            "weir_agent_apply_errors_total 2",
            "weir_agent_collect_errors_total 4",
            "weir_agent_checks_in_flight 9",
            "weir_agent_ring_digest{service=\"198.19.0.10:80\",ring_size=\"65537\",digest=\"ab12\"} 1",
            "# TYPE weir_agent_backend_health gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(
            !text.contains("198.19.0.11"),
            "a service the registry lacks has no rows"
        );
    }
}
