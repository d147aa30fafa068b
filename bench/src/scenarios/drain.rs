//! Backend drain: connections on one backend when it is removed, and how
//! each system ends them (a WebSocket Close within the window, or a cut).

use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::load::{self, Talk};
use crate::results::Endings;
use crate::scenario::{Outcome, Scenario};
use crate::stage::Bench;
use crate::systems::{Kind, Method, Running};
use crate::table::{Table, fmt_endings, fmt_int, fmt_ms, fmt_num, fmt_pct, measured, or_dash};

/// Sizes of a full run, and of a quick one (`--quick`).
struct Sizes {
    drain_connections: usize,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                drain_connections: 200,
            }
        } else {
            Sizes {
                drain_connections: 1000,
            }
        }
    }
}

pub struct Drain;

/// One system removing the backend one way.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DrainRow {
    pub system: String,
    /// How the backend was removed, e.g. `weir backend remove`.
    pub method: String,
    /// Connections on the removed backend.
    pub connections: usize,
    /// The drain window the system was given, seconds.
    pub window_s: f64,
    pub endings: Endings,
    /// Milliseconds from the removal command to the first, median and last
    /// close of a removed backend's connection.
    pub first_close_ms: Option<u64>,
    pub median_close_ms: Option<u64>,
    pub last_close_ms: Option<u64>,
    /// Connections still open when the run gave up waiting.
    pub still_open: u64,
}

measured!(DrainRow);

impl Scenario for Drain {
    const NAME: &'static str = "drain";
    const TITLE: &'static str = "Backend drain";
    const SYSTEMS: &'static [&'static str] =
        &["weir", "haproxy-api", "haproxy-reload", "nginx-reload"];

    type Row = DrainRow;

    fn run(b: &mut Bench) -> Result<Outcome<DrainRow>> {
        let s = Sizes::new(b.sizes.quick);
        let mut out = Outcome::new(&[
            ("connections", s.drain_connections.to_string()),
            ("window_s", b.sizes.drain_window.as_secs_f64().to_string()),
        ]);
        let cases = [
            (
                Kind::Weir,
                Method::WeirCli,
                "weir backend set (drain window)",
            ),
            (
                Kind::Haproxy,
                Method::HaproxyApi,
                "set server state drain; window; shutdown sessions; del server",
            ),
            (
                Kind::Haproxy,
                Method::Reload,
                "reload with hard-stop-after = window",
            ),
            (
                Kind::Nginx,
                Method::Reload,
                "reload with worker_shutdown_timeout = window",
            ),
        ];
        for (kind, method, how) in cases {
            let label = method.label(kind);
            let spec = b.spec(kind, vec![b.backend(0)], 1);
            match b.with_system(spec, "dr", |b, sys| drain_row(b, &s, sys, method, how)) {
                Ok(row) => out.rows.push(row),
                Err(e) => out.notes.push(format!("{label}: {e:#}")),
            }
        }
        Ok(out)
    }

    fn faults(rows: &[DrainRow]) -> Vec<String> {
        let mut bad = Vec::new();
        for x in rows {
            if x.connections == 0 {
                bad.push(format!(
                    "drain: {} had no connection on the removed backend",
                    x.system
                ));
            }
        }
        bad
    }

    fn section(out: &mut String, rows: &[DrainRow]) {
        let mut t = Table::new(&[
            "system",
            "method",
            "conns",
            "window s",
            "graceful",
            "endings",
            "first close",
            "median close",
            "last close",
            "still open",
        ])
        .left(&["method", "endings"]);
        for r in rows {
            let graceful: u64 = r
                .endings
                .iter()
                .filter(|(k, _)| *k == "clean" || k.starts_with("peer_close:"))
                .map(|(_, v)| *v)
                .sum();
            t.row(vec![
                r.system.clone(),
                or_dash(&r.method).to_string(),
                fmt_int(r.connections as u64),
                fmt_num(r.window_s),
                format!(
                    "{} ({})",
                    fmt_int(graceful),
                    fmt_pct(graceful as f64, r.connections as f64)
                ),
                fmt_endings(&r.endings),
                fmt_ms(r.first_close_ms),
                fmt_ms(r.median_close_ms),
                fmt_ms(r.last_close_ms),
                fmt_int(r.still_open),
            ]);
        }
        t.write(out);
        out.push_str(
            "\nGraceful = ended with a WebSocket Close (`clean` or `peer_close:*`); \
             close times are from the removal command.\n",
        );
    }
}

fn drain_row(
    b: &Bench,
    s: &Sizes,
    sys: &mut Running,
    method: Method,
    how: &str,
) -> Result<DrainRow> {
    let label = method.label(sys.spec.kind);
    let hold = b.scratch.join(format!("hold-drain-{label}"));
    let ready = b.scratch.join(format!("ready-drain-{label}"));
    let _ = std::fs::remove_file(&hold);
    let n = s.drain_connections;
    let mut plan = b.plan(n, Talk::Open(n as f64), 64, 120.0);
    plan.fleet.hold_file = Some(hold.clone());
    plan.fleet.ready_file = Some(ready.clone());
    plan.record_connections = true;
    b.progress(&format!("{label}: {n} connections on b0"));
    let (clients, ready_files) = b.start_held(&plan, 1, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(1));
    let removed_at = load::unix_ms();
    b.progress(&format!("{label}: b0 replaced by b1 ({how})"));
    sys.set_backends(&b.topo, &[b.backend(1)], method)?;
    // Wait for the window, and then some, before counting.
    let settle = removed_at + (b.sizes.drain_window + Duration::from_secs(5)).as_millis() as u64;
    std::thread::sleep(Duration::from_millis(
        settle.saturating_sub(load::unix_ms()),
    ));
    std::fs::write(&hold, b"done")?;
    let r = Bench::wait_load(clients, Duration::from_secs(90))?;
    let _ = std::fs::remove_file(&hold);
    for f in &ready_files {
        let _ = std::fs::remove_file(f);
    }
    // Connections of b0 that ended before we stopped the run.
    let mut closes: Vec<u64> = r
        .connections
        .iter()
        .filter(|c| c.backend.as_deref() == Some("b0") && c.ending != load::ending::CLEAN)
        .map(|c| c.ended_unix_ms.saturating_sub(removed_at))
        .collect();
    closes.sort_unstable();
    let still_open = r
        .connections
        .iter()
        .filter(|c| c.backend.as_deref() == Some("b0") && c.ending == load::ending::CLEAN)
        .count() as u64;
    let mut endings = Endings::new();
    for c in r
        .connections
        .iter()
        .filter(|c| c.backend.as_deref() == Some("b0"))
    {
        let e = if c.ending == load::ending::CLEAN {
            load::ending::OPEN.to_string()
        } else {
            c.ending.clone()
        };
        *endings.entry(e).or_default() += 1;
    }
    Ok(DrainRow {
        system: label.clone(),
        method: how.into(),
        connections: r
            .connections
            .iter()
            .filter(|c| c.backend.as_deref() == Some("b0"))
            .count(),
        window_s: b.sizes.drain_window.as_secs_f64(),
        endings,
        first_close_ms: closes.first().copied(),
        median_close_ms: closes.get(closes.len() / 2).copied(),
        last_close_ms: closes.last().copied(),
        still_open,
    })
}
