//! The performance goals of issue 11 (and issue 12's for a backend's
//! failure, issue 14's for upgrades), each checked against the run's own
//! rows: what weir measured, the best peer in the same run, and whether
//! the goal holds. The report puts this first, so that a run says by itself
//! which goals it meets.

use crate::catalog::ScenarioResult;
use crate::results::Latency;
use crate::scenarios::bigconn::BigconnRow;
use crate::scenarios::connrate::{AT_SHARE, ConnrateRow, ConnrateStep};
use crate::scenarios::failure::FailureRow;
use crate::scenarios::micro::{
    ESTABLISHED_GOAL, MicroRow, SET_GOAL_BACKENDS, SET_GOAL_MS, SYN_GOAL, set_goal_met,
};
use crate::scenarios::propagate::{GOAL_MS, PropagateRow};
use crate::scenarios::push::PushRow;
use crate::scenarios::steady::SteadyRow;
use crate::scenarios::upgrade::{UPGRADES, UpgradeRow};
use crate::table::{
    L7_PEERS, Table, fmt_bytes, fmt_f, fmt_int, fmt_num, fmt_ratio, fmt_us, is_weir, ratio,
};

/// Idle connections one `weir run` process must hold.
const HELD_GOAL: u64 = 100_000;
/// Memory per idle connection, at most.
const BYTES_PER_CONN_GOAL: f64 = 512.0;
/// Handshakes per proxy CPU second, against the best peer.
const HANDSHAKE_CPU_GOAL: f64 = 1.5;
/// Messages per proxy CPU second, against the best peer.
const MSG_CPU_GOAL: f64 = 2.0;

/// One goal's line.
struct Line {
    goal: String,
    weir: String,
    best_peer: String,
    ratio: Option<f64>,
    met: bool,
}

/// The goals table, or nothing when the run has none of their scenarios.
pub fn section(out: &mut String, results: &[ScenarioResult]) {
    let mut lines = Vec::new();
    if let Some(rows) = rows(results, |r| &r.steady) {
        steady(&mut lines, rows);
    }
    if let Some(rows) = rows(results, |r| &r.push) {
        push(&mut lines, rows);
    }
    if let Some(rows) = rows(results, |r| &r.connrate) {
        connrate(&mut lines, rows);
    }
    if let Some(rows) = rows(results, |r| &r.bigconn) {
        bigconn(&mut lines, rows);
    }
    if let Some(rows) = rows(results, |r| &r.micro) {
        micro(&mut lines, rows);
    }
    if let Some(rows) = rows(results, |r| &r.propagate) {
        propagate(&mut lines, rows);
    }
    let mut issues = vec!["11"];
    if let Some(rows) = rows(results, |r| &r.failure) {
        failure(&mut lines, rows);
        issues.push("12");
    }
    if let Some(rows) = rows(results, |r| &r.upgrade) {
        upgrade(&mut lines, rows);
        issues.push("14");
    }
    let issues = match issues.split_last() {
        Some((last, rest)) if !rest.is_empty() => {
            format!("issues {} and {last}", rest.join(", "))
        }
        _ => "issue 11".to_string(),
    };
    if lines.is_empty() {
        return;
    }
    let met = lines.iter().filter(|l| l.met).count();
    out.push_str(&format!(
        "\n## Goals\n\nThe goals of {issues}, checked against this run's rows: {met} of {} met.\n\n",
        lines.len()
    ));
    let mut t = Table::new(&["goal", "weir", "best peer", "weir ÷ best peer", "verdict"]).left(&[
        "weir",
        "best peer",
        "verdict",
    ]);
    for l in lines {
        t.row(vec![
            l.goal,
            l.weir,
            l.best_peer,
            fmt_ratio(l.ratio),
            if l.met { "met" } else { "not met" }.into(),
        ]);
    }
    t.write(out);
    out.push_str(
        "\nRatios are oriented so that > 1 means weir did better (for latency, the best \
         peer's value over weir's). The sections below hold every figure.\n",
    );
}

/// A scenario's rows from the first file that has them.
fn rows<T>(results: &[ScenarioResult], field: impl Fn(&ScenarioResult) -> &Vec<T>) -> Option<&[T]> {
    results
        .iter()
        .map(|r| field(r).as_slice())
        .find(|rows| !rows.is_empty())
}

/// The peer rows matching `same` (same size, topology, rate...).
fn peers<T>(
    rows: &[T],
    system: impl Fn(&T) -> &str,
    same: impl Fn(&T) -> bool,
) -> impl Iterator<Item = &T> {
    rows.iter()
        .filter(move |r| L7_PEERS.contains(&system(r)) && same(r))
}

/// Latency goal: weir's p99 and p99.9 at most the best peer's.
fn latency_line(goal: String, weir: &Latency, best: Option<(&Latency, &Latency)>) -> Line {
    let fmt = |l: &Latency| format!("p99 {} / p99.9 {}", fmt_us(l.p99_us), fmt_us(l.p999_us));
    match best {
        Some((p99, p999)) if weir.samples > 0 => Line {
            goal,
            weir: fmt(weir),
            best_peer: format!(
                "p99 {} / p99.9 {}",
                fmt_us(p99.p99_us),
                fmt_us(p999.p999_us)
            ),
            ratio: (weir.p99_us > 0).then(|| p99.p99_us as f64 / weir.p99_us as f64),
            met: weir.p99_us <= p99.p99_us && weir.p999_us <= p999.p999_us,
        },
        _ => missing(goal),
    }
}

/// The lowest p99 and the lowest p99.9 among sampled latencies.
fn best_latency<'a>(ls: impl Iterator<Item = &'a Latency>) -> Option<(&'a Latency, &'a Latency)> {
    let sampled: Vec<&Latency> = ls.filter(|l| l.samples > 0).collect();
    let p99 = sampled.iter().min_by_key(|l| l.p99_us)?;
    let p999 = sampled.iter().min_by_key(|l| l.p999_us)?;
    Some((p99, p999))
}

fn missing(goal: String) -> Line {
    Line {
        goal,
        weir: "–".into(),
        best_peer: "–".into(),
        ratio: None,
        met: false,
    }
}

/// A "weir at least `factor` × the best peer" line for a higher-is-better
/// figure.
fn lead_line(goal: String, weir: f64, best: Option<f64>, factor: f64) -> Line {
    match best {
        Some(p) if weir > 0.0 && p > 0.0 => Line {
            goal,
            weir: fmt_num(weir),
            best_peer: fmt_num(p),
            ratio: Some(weir / p),
            met: weir >= factor * p,
        },
        _ => missing(goal),
    }
}

fn size(bytes: usize) -> String {
    if bytes >= 1024 {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

fn steady(lines: &mut Vec<Line>, rows: &[SteadyRow]) {
    for w in rows.iter().filter(|r| is_weir(&r.system)) {
        let same = |r: &&SteadyRow| r.topology == w.topology && r.message_bytes == w.message_bytes;
        let best = peers(rows, |r| &r.system, |r| same(&r))
            .map(SteadyRow::msgs_per_cpu_s)
            .filter(|v| *v > 0.0)
            .reduce(f64::max);
        lines.push(lead_line(
            format!(
                "msgs per proxy CPU s ≥ {MSG_CPU_GOAL}× the best peer: {}, {}",
                size(w.message_bytes),
                w.topology.name()
            ),
            w.msgs_per_cpu_s(),
            best,
            MSG_CPU_GOAL,
        ));
    }
    for w in rows.iter().filter(|r| is_weir(&r.system)) {
        let same = |r: &SteadyRow| r.topology == w.topology && r.message_bytes == w.message_bytes;
        let best = best_latency(peers(rows, |r| &r.system, same).map(|r| &r.open_latency));
        lines.push(latency_line(
            format!(
                "echo p99 and p99.9 ≤ the best peer's: {} at {} msgs/s, {}",
                size(w.message_bytes),
                fmt_num(w.open_rate),
                w.topology.name()
            ),
            &w.open_latency,
            best,
        ));
    }
}

fn push(lines: &mut Vec<Line>, rows: &[PushRow]) {
    for w in rows.iter().filter(|r| is_weir(&r.system)) {
        let best =
            best_latency(peers(rows, |r| &r.system, |r| r.rate == w.rate).map(|r| &r.latency));
        lines.push(latency_line(
            format!(
                "push p99 and p99.9 ≤ the best peer's: {} frames/s to {} clients",
                fmt_num(w.rate),
                fmt_int(w.connections as u64)
            ),
            &w.latency,
            best,
        ));
    }
}

fn connrate(lines: &mut Vec<Line>, rows: &[ConnrateRow]) {
    let Some(w) = rows.iter().find(|r| is_weir(&r.system)) else {
        return;
    };
    let best = peers(rows, |r| &r.system, |_| true)
        .map(|r| r.handshakes_per_cpu_s)
        .filter(|v| *v > 0.0)
        .reduce(f64::max);
    lines.push(lead_line(
        format!(
            "handshakes per proxy CPU s ≥ {HANDSHAKE_CPU_GOAL}× the best peer (each at its \
             highest clean rate)"
        ),
        w.handshakes_per_cpu_s,
        best,
        HANDSHAKE_CPU_GOAL,
    ));
    let shares = || peers(rows, |r| &r.system, |_| true).filter_map(|r| r.at_share.as_ref());
    let Some(ws) = &w.at_share else {
        lines.push(missing(format!(
            "handshake p99 at {:.0}% of weir's highest clean rate ≤ the best peer's",
            AT_SHARE * 100.0
        )));
        return;
    };
    lines.push(lead_line(
        format!(
            "handshakes per proxy CPU s ≥ {HANDSHAKE_CPU_GOAL}× the best peer (all at {} \
             handshakes/s)",
            fmt_num(ws.target)
        ),
        ws.handshakes_per_cpu_s(),
        shares()
            .map(ConnrateStep::handshakes_per_cpu_s)
            .filter(|v| *v > 0.0)
            .reduce(f64::max),
        HANDSHAKE_CPU_GOAL,
    ));
    let best = shares()
        .filter(|s| s.handshake.samples > 0)
        .min_by_key(|s| s.handshake.p99_us);
    let goal = format!(
        "handshake p99 at {:.0}% of weir's highest clean rate ({}/s) ≤ the best peer's",
        AT_SHARE * 100.0,
        fmt_num(ws.target)
    );
    lines.push(match best {
        Some(p) if ws.handshake.samples > 0 => Line {
            goal,
            weir: fmt_us(ws.handshake.p99_us),
            best_peer: fmt_us(p.handshake.p99_us),
            ratio: (ws.handshake.p99_us > 0)
                .then(|| p.handshake.p99_us as f64 / ws.handshake.p99_us as f64),
            met: ws.handshake.p99_us <= p.handshake.p99_us,
        },
        _ => missing(goal),
    });
}

fn bigconn(lines: &mut Vec<Line>, rows: &[BigconnRow]) {
    let Some(w) = rows.iter().find(|r| is_weir(&r.system)) else {
        return;
    };
    let best = peers(rows, |r| &r.system, |_| true)
        .map(BigconnRow::most_held)
        .max();
    let held = w.most_held();
    let per_conn = w.last_held().map(|s| s.bytes_per_conn);
    lines.push(Line {
        goal: format!(
            "≥ {} idle WebSockets held by one process, ≤ {} B each",
            fmt_int(HELD_GOAL),
            fmt_f(BYTES_PER_CONN_GOAL, 0)
        ),
        weir: format!(
            "{}, {} each",
            fmt_int(held),
            per_conn.map_or("–".into(), fmt_bytes)
        ),
        best_peer: best.map_or("–".into(), fmt_int),
        ratio: best.filter(|b| *b > 0).map(|b| held as f64 / b as f64),
        met: held >= HELD_GOAL && per_conn.is_some_and(|b| b <= BYTES_PER_CONN_GOAL),
    });
}

fn micro(lines: &mut Vec<Line>, rows: &[MicroRow]) {
    let Some(r) = rows.first() else { return };
    let ratio_line = |goal: String, range: Option<(f64, f64)>, limit: f64| match range {
        Some((lo, hi)) => Line {
            goal,
            weir: format!("{}–{} the floor", fmt_ratio(Some(lo)), fmt_ratio(Some(hi))),
            best_peer: "no peer".into(),
            ratio: None,
            met: hi <= limit,
        },
        None => missing(goal),
    };
    lines.push(ratio_line(
        format!("XDP SYN of a new flow ≤ {SYN_GOAL}× the floor"),
        r.range(|p| &p.syn_new_flow),
        SYN_GOAL,
    ));
    lines.push(ratio_line(
        format!("XDP established flow ≤ {ESTABLISHED_GOAL}× the floor (also with a full table)"),
        r.range(|p| &p.established_one_flow),
        ESTABLISHED_GOAL,
    ));
    let goal = format!(
        "`backend set` of {} backends ≤ {} ms, from empty and one replaced",
        fmt_int(SET_GOAL_BACKENDS as u64),
        fmt_f(SET_GOAL_MS, 0)
    );
    lines.push(match r.goal_set() {
        Some(s) => Line {
            goal,
            weir: format!("{} / {} ms", fmt_f(s.initial_ms, 1), fmt_f(s.change_ms, 1)),
            best_peer: "no peer".into(),
            ratio: None,
            met: set_goal_met(s),
        },
        None => missing(goal),
    });
}

fn propagate(lines: &mut Vec<Line>, rows: &[PropagateRow]) {
    let Some(w) = rows.iter().find(|r| is_weir(&r.system)) else {
        return;
    };
    lines.push(Line {
        goal: format!(
            "a CLI change seen by every worker within {} ms",
            fmt_f(GOAL_MS, 0)
        ),
        weir: format!(
            "{} ms (max over {} switches)",
            fmt_f(w.max_last_old_ms, 2),
            w.switches.len()
        ),
        best_peer: "no peer".into(),
        ratio: None,
        met: !w.switches.is_empty() && w.max_last_old_ms <= GOAL_MS,
    });
}

/// Issue 12's goal: a killed backend costs fewer failed handshakes than
/// HAProxy with its usual checks, and none once weir knows.
fn failure(lines: &mut Vec<Line>, rows: &[FailureRow]) {
    let Some(w) = rows.iter().find(|r| is_weir(&r.system)) else {
        return;
    };
    let goal = "a killed backend: fewer failed handshakes than HAProxy with its usual checks, \
                and none after detection"
        .to_string();
    lines.push(match rows.iter().find(|r| r.system == "haproxy") {
        Some(h) => Line {
            goal,
            weir: format!(
                "{} failed, {} after detection",
                fmt_int(w.handshakes_failed),
                fmt_int(w.failed_after_detection)
            ),
            best_peer: format!("haproxy: {} failed", fmt_int(h.handshakes_failed)),
            ratio: ratio(h.handshakes_failed as f64, w.handshakes_failed as f64),
            met: w.handshakes_failed < h.handshakes_failed && w.failed_after_detection == 0,
        },
        None => missing(goal),
    });
}

/// Issue 14's goal: upgrades of weir under load that no client notices,
/// and no old process left behind.
fn upgrade(lines: &mut Vec<Line>, rows: &[UpgradeRow]) {
    let Some(w) = rows.iter().find(|r| is_weir(&r.system)) else {
        return;
    };
    let said = |r: &UpgradeRow| {
        format!(
            "{} cut, {} Close, {} lost, {} process(es) left ({} shard(s))",
            fmt_int(r.cut),
            fmt_int(r.closed_by_peer),
            fmt_bytes(r.bytes(r.messages.lost) as f64),
            r.processes_left,
            r.shards
        )
    };
    let best = peers(rows, |r| &r.system, |_| true)
        .min_by_key(|r| (r.cut + r.closed_by_peer + r.messages.lost, r.processes_left));
    lines.push(Line {
        goal: format!(
            "{UPGRADES} upgrades under {} connections: 0 cut, 0 Close, 0 bytes lost, one \
             process per shard left",
            fmt_int(w.connections as u64)
        ),
        weir: said(w),
        best_peer: best.map_or("–".into(), |p| format!("{}: {}", p.system, said(p))),
        ratio: None,
        met: w.connected > 0
            && w.upgrades.len() == UPGRADES
            && w.cut == 0
            && w.closed_by_peer == 0
            && w.messages.lost == 0
            && w.processes_left == w.shards,
    });
}
