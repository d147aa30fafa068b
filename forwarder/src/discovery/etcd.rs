//! An etcd v3 key prefix as a discovery source.
//!
//! # Key layout
//!
//! Under the instance's prefix `P` (e.g. `/weir/default/`):
//!
//! ```text
//! P services/<VIP:PORT>                 {}              the service is source-owned
//! P backends/<VIP:PORT>/<ADDR[:PORT]>   {"weight": 3}   one backend; weight 1..=65535, default 1
//! ```
//!
//! A service key with no backend keys asks for an empty backend set (the
//! guard rails decide whether that may happen). Values are JSON objects;
//! unknown fields are refused so that a typo is not silently ignored.
//!
//! # A bad key refuses the whole revision
//!
//! A writer changes several keys in one transaction (replace a backend: put
//! the new one, delete the old one), and etcd gives all of them one
//! revision. Applying only the good keys of a revision would install a
//! backend set that no revision ever held (the old backend deleted, its
//! replacement refused), and every host would then run a state that differs
//! from what its operators can read back from etcd. So a revision with any
//! bad key (not an address, a negative or zero weight, a backend of an
//! undeclared service, a key outside the layout) is reported as
//! [`Update::Failed`] naming the key and why, and nothing of it applies;
//! the next good revision applies whole.
//!
//! # Revisions, reconnects, fail static
//!
//! The source reads the prefix at one revision `R`, then watches from
//! `R + 1`: etcd sends every event after `R` in revision order, and the
//! events of one revision in one response, so each report is a state the
//! prefix really had. On any error (a member restarted, a leader change
//! without a leader for a while, a partition, a compacted watch) it
//! reconnects with backoff and reads the prefix again: the fresh read
//! replaces the local copy whole, so a backend deleted while the source was
//! away is not resurrected and none is lost. A read at a revision older
//! than one already reported (a restore from backup, a member far behind)
//! is refused: applying it would take back changes already applied.
//!
//! While etcd is unreachable the source reports [`Update::Failed`] and an
//! empty prefix [`Update::Empty`]: the agent keeps the last applied state
//! (fail static) and counts it as stale.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use serde::Deserialize;
use thiserror::Error;
use tokio::sync::mpsc::UnboundedSender;

use super::{Desired, Report, Update};
use crate::registry::addr::parse_weight;
use crate::registry::{BackendAddr, ServiceAddr};

/// Where a source reads: the cluster's client URLs and the instance's
/// prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
}

/// Why one key refuses its revision.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("key {key}: {reason}")]
pub struct KeyError {
    pub key: String,
    pub reason: String,
}

/// Why a connection to etcd ended; the source reconnects after each.
#[derive(Debug, Error)]
enum SessionError {
    #[error("etcd: {0}")]
    Client(#[from] etcd_client::Error),
    #[error("etcd answered without a revision")]
    NoRevision,
    #[error(
        "etcd revision went back from {seen} to {now} (a restore or a member behind); \
         not applied: it would take back changes already applied"
    )]
    WentBack { seen: i64, now: i64 },
    #[error("the watch was canceled (compacted at revision {0}): reading the prefix again")]
    Canceled(i64),
    #[error("the watch stream ended")]
    Ended,
}

/// Reconnect backoff: first wait, then doubled up to the cap.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// HTTP/2 pings that find a silent member (a partition: a killed one
/// closes its connections at once). etcd closes connections that ping more
/// often than every 5 s (`--grpc-keepalive-min-time`), so not shorter.
const KEEP_ALIVE: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a waiting source looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(200);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceValue {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendValue {
    /// Signed so that a negative weight is reported as such, not as a type
    /// error.
    weight: Option<i64>,
}

/// How the audit line and the logs name an etcd source.
pub fn source_name(config: &EtcdConfig) -> String {
    format!("etcd {} {}", config.endpoints.join(","), config.prefix)
}

/// The desired state held by the keys under `prefix` at one revision;
/// the first bad key (in key order) refuses all of it.
pub fn parse<'a>(
    prefix: &str,
    kvs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<Desired, KeyError> {
    let mut services: BTreeMap<ServiceAddr, Vec<(BackendAddr, u16)>> = BTreeMap::new();
    let mut backends = Vec::new();
    for (key, value) in kvs {
        let key = String::from_utf8_lossy(key);
        let refuse = |reason: String| KeyError {
            key: key.to_string(),
            reason,
        };
        let rest = key
            .strip_prefix(prefix)
            .ok_or_else(|| refuse(format!("not under the prefix {prefix}")))?;
        let value = std::str::from_utf8(value).map_err(|_| refuse("value is not UTF-8".into()))?;
        if let Some(service) = rest.strip_prefix("services/") {
            let service: ServiceAddr = service.parse().map_err(|e| refuse(format!("{e}")))?;
            serde_json::from_str::<ServiceValue>(value)
                .map_err(|e| refuse(format!("value {value:?}: {e}")))?;
            services.entry(service).or_default();
        } else if let Some(path) = rest.strip_prefix("backends/") {
            let (service, backend) = path
                .split_once('/')
                .ok_or_else(|| refuse("want backends/<VIP:PORT>/<ADDR[:PORT]>".into()))?;
            let service: ServiceAddr = service.parse().map_err(|e| refuse(format!("{e}")))?;
            let backend =
                BackendAddr::parse_for(backend, &service).map_err(|e| refuse(format!("{e}")))?;
            let parsed: BackendValue =
                serde_json::from_str(value).map_err(|e| refuse(format!("value {value:?}: {e}")))?;
            let weight = match parsed.weight {
                Some(w) => parse_weight(&w.to_string()).map_err(|e| refuse(format!("{e}")))?,
                None => 1,
            };
            backends.push((key.to_string(), service, backend, weight));
        } else {
            return Err(refuse(
                "not in the layout (services/<VIP:PORT> or backends/<VIP:PORT>/<ADDR[:PORT]>)"
                    .into(),
            ));
        }
    }
    for (key, service, backend, weight) in backends {
        let set = services.get_mut(&service).ok_or_else(|| KeyError {
            key,
            reason: format!("backend of {service}, which has no services/{service} key"),
        })?;
        set.push((backend, weight));
    }
    Ok(Desired { services })
}

/// The report for the keys held at `revision`.
fn update(prefix: &str, kvs: &BTreeMap<Vec<u8>, Vec<u8>>, revision: i64) -> Update {
    let pairs = kvs.iter().map(|(k, v)| (k.as_slice(), v.as_slice()));
    match parse(prefix, pairs) {
        Ok(desired) if desired.services.is_empty() => Update::Empty {
            revision: revision.to_string(),
            reason: format!("no service under {prefix} at revision {revision}"),
        },
        Ok(desired) => Update::Desired {
            revision: revision.to_string(),
            desired,
        },
        Err(e) => Update::Failed {
            reason: format!("revision {revision} refused whole: {e}"),
        },
    }
}

/// One source's reporting and the newest revision it has judged.
struct Reporter {
    config: EtcdConfig,
    name: String,
    reports: UnboundedSender<Report>,
    stop: Arc<AtomicBool>,
    seen: i64,
    /// A failure was reported since `seen`: report the next read even at
    /// the same revision, so that the agent stops counting the source stale.
    resend: bool,
}

impl Reporter {
    /// False once the agent is gone.
    fn send(&self, update: Update) -> bool {
        self.reports
            .send(Report {
                source: self.name.clone(),
                update,
            })
            .is_ok()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.reports.is_closed()
    }

    /// Judges the keys at `revision` unless that revision was judged
    /// already and nothing failed since (a resync that found nothing new).
    fn judge(&mut self, kvs: &BTreeMap<Vec<u8>, Vec<u8>>, revision: i64) {
        if revision != self.seen || self.resend {
            self.seen = revision;
            self.resend = false;
            self.send(update(&self.config.prefix, kvs, revision));
        }
    }

    /// One connection: read the prefix, then follow it until an error or
    /// the stop flag. `connected` is called once the read succeeded.
    async fn session(&mut self, connected: &mut impl FnMut()) -> Result<(), SessionError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(KEEP_ALIVE, KEEP_ALIVE_TIMEOUT)
            .with_require_leader(true);
        let mut client = Client::connect(&self.config.endpoints, Some(options)).await?;
        let prefix = self.config.prefix.clone();
        let read = client
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await?;
        let revision = read
            .header()
            .map(|h| h.revision())
            .ok_or(SessionError::NoRevision)?;
        if revision < self.seen {
            return Err(SessionError::WentBack {
                seen: self.seen,
                now: revision,
            });
        }
        connected();
        let mut kvs: BTreeMap<Vec<u8>, Vec<u8>> = read
            .kvs()
            .iter()
            .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
            .collect();
        self.judge(&kvs, revision);
        let watch = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1)
            .with_progress_notify();
        let mut stream = client.watch(prefix.as_str(), Some(watch)).await?;
        loop {
            let message = tokio::select! {
                m = stream.message() => m?,
                () = tokio::time::sleep(STOP_POLL) => {
                    if self.stopped() {
                        return Ok(());
                    }
                    continue;
                }
            };
            let response = message.ok_or(SessionError::Ended)?;
            if response.canceled() {
                return Err(SessionError::Canceled(response.compact_revision()));
            }
            let mut newest = None;
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                match event.event_type() {
                    EventType::Put => kvs.insert(kv.key().to_vec(), kv.value().to_vec()),
                    EventType::Delete => kvs.remove(kv.key()),
                };
                newest = newest.max(Some(kv.mod_revision()));
            }
            if let Some(revision) = newest {
                self.judge(&kvs, revision);
            }
        }
    }

    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        while !self.stopped() {
            let result = self.session(&mut || backoff = BACKOFF_MIN).await;
            let Err(e) = result else { return };
            let reason = format!(
                "{}: {e}; keeping the last applied state, retrying in {backoff:?}",
                self.name
            );
            if !self.send(Update::Failed { reason }) {
                return;
            }
            self.resend = true;
            let until = tokio::time::Instant::now() + backoff;
            while tokio::time::Instant::now() < until && !self.stopped() {
                tokio::time::sleep(STOP_POLL.min(backoff)).await;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// Follows the prefix on a thread of its own (with its own runtime, so a
/// slow etcd never stalls the agent's loop) and reports each revision
/// until `stop` is set or the agent drops its receiver.
pub fn spawn(
    config: EtcdConfig,
    reports: UnboundedSender<Report>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reporter = Reporter {
        name: source_name(&config),
        config,
        reports,
        stop,
        seen: 0,
        resend: false,
    };
    std::thread::Builder::new()
        .name("weir-discovery-etcd".into())
        .spawn(move || runtime.block_on(reporter.run()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/weir/t/";

    fn parse_pairs(pairs: &[(&str, &str)]) -> Result<Desired, KeyError> {
        parse(P, pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())))
    }

    fn svc(s: &str) -> ServiceAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_services_backends_and_weights() {
        let desired = parse_pairs(&[
            ("/weir/t/backends/198.19.0.10:80/198.18.1.2", "{}"),
            (
                "/weir/t/backends/198.19.0.10:80/198.18.1.3:8080",
                r#"{"weight":3}"#,
            ),
            ("/weir/t/services/198.19.0.10:80", "{}"),
            ("/weir/t/services/198.19.0.11:80", "{}"),
        ])
        .unwrap();
        let s = svc("198.19.0.10:80");
        let b = |a: &str| BackendAddr::parse_for(a, &s).unwrap();
        assert_eq!(
            desired.services[&s],
            vec![(b("198.18.1.2:80"), 1), (b("198.18.1.3:8080"), 3)]
        );
        assert_eq!(desired.services[&svc("198.19.0.11:80")], vec![]);
        assert_eq!(desired.services.len(), 2);
    }

    #[test]
    fn a_bad_key_refuses_the_revision_naming_key_and_reason() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "/weir/t/backends/198.19.0.10:80/not-an-ip",
                "{}",
                "backend address",
            ),
            (
                "/weir/t/backends/198.19.0.10:80/198.18.1.2",
                r#"{"weight":-2}"#,
                "\"-2\"",
            ),
            (
                "/weir/t/backends/198.19.0.10:80/198.18.1.2",
                r#"{"weight":0}"#,
                "1 to 65535",
            ),
            (
                "/weir/t/backends/198.19.0.10:80/198.18.1.2",
                r#"{"wieght":2}"#,
                "unknown field",
            ),
            (
                "/weir/t/backends/198.19.0.10:80/198.18.1.2",
                "3",
                "value \"3\"",
            ),
            ("/weir/t/services/198.19.0.10", "{}", "service"),
            ("/weir/t/other/x", "{}", "not in the layout"),
            (
                "/weir/t/backends/198.19.0.12:80/198.18.1.2",
                "{}",
                "no services/198.19.0.12:80",
            ),
        ];
        for (key, value, want) in cases {
            let err = parse_pairs(&[
                ("/weir/t/backends/198.19.0.10:80/198.18.1.9", "{}"),
                ("/weir/t/services/198.19.0.10:80", "{}"),
                (key, value),
            ])
            .unwrap_err();
            assert_eq!(err.key, *key, "{err}");
            assert!(err.reason.contains(want), "{key}={value}: {err}");
        }
    }

    #[test]
    fn empty_prefix_reports_empty_and_bad_revision_fails_whole() {
        let mut kvs = BTreeMap::new();
        assert!(matches!(update(P, &kvs, 4), Update::Empty { revision, .. } if revision == "4"));
        kvs.insert(b"/weir/t/services/198.19.0.10:80".to_vec(), b"{}".to_vec());
        assert!(matches!(update(P, &kvs, 5), Update::Desired { revision, .. } if revision == "5"));
        kvs.insert(
            b"/weir/t/backends/198.19.0.10:80/198.18.1.2".to_vec(),
            br#"{"weight":-1}"#.to_vec(),
        );
        match update(P, &kvs, 6) {
            Update::Failed { reason } => assert!(
                reason.starts_with("revision 6 refused whole: key /weir/t/backends/"),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
    }
}
