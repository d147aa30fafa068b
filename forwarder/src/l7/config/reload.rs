//! What a reload of a running `weir run` would change: the running
//! configuration against the file read again, as pure code. The daemon
//! applies a [`ReloadPlan`] whole or not at all; a field baked into the
//! workers' io_uring setup refuses the reload whole ([`NeedsRestart`]).

use std::fmt::{Debug, Display};
use std::net::SocketAddr;
use std::time::Duration;

use super::{Config, Listener, Route};
use crate::registry::ServiceAddr;

/// What a reload changes: one line per change for the operator, and what
/// the daemon must prepare before anything applies.
#[derive(Debug, Default, PartialEq)]
pub struct ReloadPlan {
    /// One line per change (`timeouts.idle: 300s -> 10s`), in file order.
    pub changes: Vec<String>,
    /// Listeners to bind (checked free first) before anything applies.
    pub added: Vec<Listener>,
    /// Listeners that stop accepting; their connections stay.
    pub removed: Vec<SocketAddr>,
    /// The new metrics address (`Some(None)`: the endpoint goes), when it
    /// changes.
    pub metrics: Option<Option<SocketAddr>>,
}

/// A reload that changes a field a running process cannot: the workers'
/// rings, buffer pools and file tables were sized for it at start. A new
/// process can, and takes every connection over (`weir upgrade`); another
/// instance is another process altogether.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error(
    "{field} cannot change in a running weir run ({was} -> {now}): {}",
    if *.field == "instance" {
        "it needs a restart"
    } else {
        "it needs a new process: `weir upgrade` starts one and hands it every connection"
    }
)]
pub struct NeedsRestart {
    pub field: &'static str,
    pub was: String,
    pub now: String,
}

/// Compares the running configuration with the new one. `new.instance`
/// must already be resolved the way `weir run` resolved it at start.
pub fn plan_reload(old: &Config, new: &Config) -> Result<ReloadPlan, NeedsRestart> {
    fixed("instance", &old.instance, &new.instance)?;
    fixed("runtime.workers", &old.workers, &new.workers)?;
    fixed("runtime.buffers", &old.buffers, &new.buffers)?;
    fixed("runtime.buffer_size", &old.buffer_size, &new.buffer_size)?;
    // It sizes every worker's registered-file table.
    fixed(
        "runtime.max_connections",
        &old.max_connections,
        &new.max_connections,
    )?;

    let mut plan = ReloadPlan::default();
    let changes = &mut plan.changes;
    if old.metrics != new.metrics {
        changes.push(format!(
            "metrics.listen: {} -> {}",
            or_off(old.metrics),
            or_off(new.metrics)
        ));
        plan.metrics = Some(new.metrics);
    }
    let (o, n) = (&old.timeouts, &new.timeouts);
    changed(
        changes,
        "timeouts.client_head",
        shown(o.client_head),
        shown(n.client_head),
    );
    changed(
        changes,
        "timeouts.connect",
        shown(o.connect),
        shown(n.connect),
    );
    changed(
        changes,
        "timeouts.backend_head",
        shown(o.backend_head),
        shown(n.backend_head),
    );
    changed(changes, "timeouts.idle", shown(o.idle), shown(n.idle));
    if o.ping_interval != n.ping_interval {
        changes.push(format!(
            "timeouts.ping_interval: {} -> {}",
            ping(o.ping_interval),
            ping(n.ping_interval)
        ));
    }
    changed(changes, "timeouts.close", shown(o.close), shown(n.close));
    changed(
        changes,
        "timeouts.shutdown",
        shown(o.shutdown),
        shown(n.shutdown),
    );
    changed(
        changes,
        "timeouts.takeover",
        shown(o.takeover),
        shown(n.takeover),
    );
    let (o, n) = (&old.limits, &new.limits);
    changed(
        changes,
        "limits.max_head_bytes",
        o.max_head_bytes,
        n.max_head_bytes,
    );
    changed(changes, "limits.max_headers", o.max_headers, n.max_headers);
    changed(changes, "limits.max_frame", o.max_frame, n.max_frame);
    changed(changes, "limits.max_message", o.max_message, n.max_message);
    changed(
        changes,
        "drain.window",
        shown(old.drain_window),
        shown(new.drain_window),
    );
    let (o, n) = (&old.outlier, &new.outlier);
    changed(changes, "outlier.consecutive", o.consecutive, n.consecutive);
    changed(
        changes,
        "outlier.base_ejection",
        shown(o.base_ejection),
        shown(n.base_ejection),
    );
    changed(
        changes,
        "outlier.max_ejection",
        shown(o.max_ejection),
        shown(n.max_ejection),
    );
    changed(
        changes,
        "outlier.max_ejected_percent",
        o.max_ejected_percent,
        n.max_ejected_percent,
    );
    services(changes, old, new);
    listeners(&mut plan, old, new);
    Ok(plan)
}

fn fixed<T: PartialEq + Debug>(field: &'static str, was: &T, now: &T) -> Result<(), NeedsRestart> {
    if was == now {
        return Ok(());
    }
    Err(NeedsRestart {
        field,
        was: format!("{was:?}"),
        now: format!("{now:?}"),
    })
}

fn changed<T: PartialEq + Display>(changes: &mut Vec<String>, key: &str, was: T, now: T) {
    if was != now {
        changes.push(format!("{key}: {was} -> {now}"));
    }
}

/// A duration as the file may write it (`0s`, `300s`, `1.5s`, `100ms`).
fn shown(d: Duration) -> String {
    if d.is_zero() {
        "0s".into()
    } else {
        format!("{d:?}")
    }
}

fn or_off(addr: Option<SocketAddr>) -> String {
    addr.map_or_else(|| "off".into(), |a| a.to_string())
}

fn ping(every: Option<Duration>) -> String {
    every.map_or_else(|| "off".into(), shown)
}

/// The `[[service]]` overrides, per service address.
fn services(changes: &mut Vec<String>, old: &Config, new: &Config) {
    let window = |c: &Config, s: &ServiceAddr| {
        c.service_drain
            .iter()
            .find(|(a, _)| a == s)
            .map(|(_, w)| *w)
    };
    let mut all: Vec<ServiceAddr> = old
        .service_drain
        .iter()
        .chain(&new.service_drain)
        .map(|(s, _)| *s)
        .chain(
            old.drain_unhealthy
                .iter()
                .chain(&new.drain_unhealthy)
                .copied(),
        )
        .collect();
    all.sort();
    all.dedup();
    for s in all {
        let (was, now) = (window(old, &s), window(new, &s));
        if was != now {
            let window = |w: Option<Duration>| w.map_or_else(|| "drain.window".into(), shown);
            changes.push(format!(
                "service {s} drain_window: {} -> {}",
                window(was),
                window(now)
            ));
        }
        let (was, now) = (
            old.drain_unhealthy.contains(&s),
            new.drain_unhealthy.contains(&s),
        );
        if was != now {
            changes.push(format!("service {s} drain_unhealthy: {was} -> {now}"));
        }
    }
}

/// Listeners by address: added, removed, or kept with their routes
/// compared by host and path prefix.
fn listeners(plan: &mut ReloadPlan, old: &Config, new: &Config) {
    for l in &old.listeners {
        if !new.listeners.iter().any(|n| n.listen == l.listen) {
            plan.changes.push(format!(
                "listener {} removed (its connections stay)",
                l.listen
            ));
            plan.removed.push(l.listen);
        }
    }
    for l in &new.listeners {
        let Some(was) = old.listeners.iter().find(|o| o.listen == l.listen) else {
            plan.changes.push(format!("listener {} added", l.listen));
            plan.added.push(l.clone());
            continue;
        };
        if was.shared != l.shared {
            plan.changes.push(format!(
                "listener {} shared: {} -> {}",
                l.listen, was.shared, l.shared
            ));
        }
        let same_match = |a: &Route, b: &Route| a.host == b.host && a.path_prefix == b.path_prefix;
        for r in &was.routes {
            match l.routes.iter().find(|n| same_match(n, r)) {
                None => plan.changes.push(format!(
                    "listener {} route {}{} -> {}: removed",
                    l.listen, r.host, r.path_prefix, r.service
                )),
                Some(n) if n.service != r.service => plan.changes.push(format!(
                    "listener {} route {}{}: {} -> {}",
                    l.listen, r.host, r.path_prefix, r.service, n.service
                )),
                Some(_) => {}
            }
        }
        for n in &l.routes {
            if !was.routes.iter().any(|r| same_match(r, n)) {
                plan.changes.push(format!(
                    "listener {} route {}{} -> {}: added",
                    l.listen, n.host, n.path_prefix, n.service
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ConfigBuilder, Outlier, Timeout, parse};
    use super::*;

    const SVC: &str = "198.19.0.10:80";
    const CHAT: &str = "198.19.0.11:80";

    fn base() -> ConfigBuilder {
        ConfigBuilder::new()
            .workers(2)
            .metrics("127.0.0.1:9100".parse().unwrap())
            .listener("127.0.0.1:8080".parse().unwrap())
            .route("/", SVC)
    }

    fn config(b: ConfigBuilder) -> Config {
        parse(&b.to_string(), "weir.toml").expect("valid")
    }

    fn plan(old: ConfigBuilder, new: ConfigBuilder) -> Result<ReloadPlan, NeedsRestart> {
        plan_reload(&config(old), &config(new))
    }

    #[test]
    fn the_same_file_changes_nothing() {
        assert_eq!(plan(base(), base()).unwrap(), ReloadPlan::default());
    }

    #[test]
    fn each_runtime_setting_needs_a_restart_and_is_named() {
        let cases: [(ConfigBuilder, &str); 4] = [
            (base().workers(3), "runtime.workers"),
            (base().buffers(1024), "runtime.buffers"),
            (base().max_connections(10), "runtime.max_connections"),
            (base().instance("other"), "instance"),
        ];
        for (new, field) in cases {
            let e = plan(base(), new).unwrap_err();
            assert_eq!(e.field, field);
            let remedy = if field == "instance" {
                "needs a restart"
            } else {
                "`weir upgrade` starts one"
            };
            assert!(e.to_string().contains(remedy), "{e}");
        }
        let mut big = config(base());
        big.buffer_size = 32768;
        let e = plan_reload(&config(base()), &big).unwrap_err();
        assert_eq!(
            e.to_string(),
            "runtime.buffer_size cannot change in a running weir run (16384 -> 32768): it \
             needs a new process: `weir upgrade` starts one and hands it every connection"
        );
    }

    #[test]
    fn timeouts_limits_drains_and_outliers_are_listed_one_line_each() {
        let new = base()
            .timeout(Timeout::Idle, Duration::from_secs(10))
            .timeout(Timeout::PingInterval, Duration::from_secs(1))
            .frame_limits(1 << 20, 2 << 20)
            .drain_window(Duration::from_secs(5))
            .service_drain(CHAT, Duration::from_secs(1))
            .drain_unhealthy(SVC)
            .outlier(Outlier {
                consecutive: 0,
                base_ejection: Duration::from_secs(10),
                max_ejection: Duration::from_secs(300),
                max_ejected_percent: 50,
            });
        let p = plan(base(), new).unwrap();
        assert_eq!(
            p.changes,
            [
                "timeouts.idle: 300s -> 10s",
                "timeouts.ping_interval: off -> 1s",
                "limits.max_frame: 16777216 -> 1048576",
                "limits.max_message: 67108864 -> 2097152",
                "drain.window: 30s -> 5s",
                "outlier.consecutive: 5 -> 0",
                "service 198.19.0.10:80 drain_unhealthy: false -> true",
                "service 198.19.0.11:80 drain_window: drain.window -> 1s",
            ]
        );
        assert!(p.added.is_empty() && p.removed.is_empty() && p.metrics.is_none());
    }

    #[test]
    fn routes_and_listeners_are_compared_by_address_and_match() {
        let old = base()
            .route("/chat", CHAT)
            .listener("127.0.0.1:8081".parse().unwrap())
            .route("/", SVC);
        let new = base()
            .route("/chat", SVC)
            .route("/admin", CHAT)
            .listener("127.0.0.1:8082".parse().unwrap())
            .route("/", SVC);
        let p = plan(old, new).unwrap();
        assert_eq!(
            p.changes,
            [
                "listener 127.0.0.1:8081 removed (its connections stay)",
                "listener 127.0.0.1:8080 route */chat: 198.19.0.11:80 -> 198.19.0.10:80",
                "listener 127.0.0.1:8080 route */admin -> 198.19.0.11:80: added",
                "listener 127.0.0.1:8082 added",
            ]
        );
        assert_eq!(p.removed, ["127.0.0.1:8081".parse().unwrap()]);
        assert_eq!(p.added.len(), 1);
        assert_eq!(p.added[0].listen, "127.0.0.1:8082".parse().unwrap());
        let p = plan(base().route("/chat", CHAT), base()).unwrap();
        assert_eq!(
            p.changes,
            ["listener 127.0.0.1:8080 route */chat -> 198.19.0.11:80: removed"]
        );
    }

    #[test]
    fn a_moved_metrics_endpoint_is_planned() {
        let mut new = config(base());
        new.metrics = None;
        let p = plan_reload(&config(base()), &new).unwrap();
        assert_eq!(p.changes, ["metrics.listen: 127.0.0.1:9100 -> off"]);
        assert_eq!(p.metrics, Some(None));
        let p = plan(base(), base().metrics("127.0.0.1:9200".parse().unwrap())).unwrap();
        assert_eq!(p.metrics, Some(Some("127.0.0.1:9200".parse().unwrap())));
    }
}
