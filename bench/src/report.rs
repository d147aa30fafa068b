//! One Markdown report from a run's scenario files, so weir and its peers
//! can be read side by side without opening the JSON.
//!
//! Every ratio is oriented so that > 1 means weir did better: for metrics
//! where lower is better (CPU, memory, latency, disruption) the peer's value
//! is divided by weir's.

use std::fmt::Write as _;

use crate::plot;
use crate::results::{
    ChurnRow, ConnrateRow, CpuSplit, DrainRow, Endings, IdleRow, L4Row, Latency, RunInfo,
    ScenarioResult, SteadyRow, WEIR,
};

/// Scenarios in the order the report shows them.
const ORDER: [&str; 6] = ["steady", "idle", "connrate", "churn", "drain", "l4"];

/// Peers weir is compared with in the HTTP/WebSocket scenarios.
const L7_PEERS: [&str; 2] = ["haproxy", "nginx"];

/// Header of the CPU split column, shared by the tables that show it.
const CPU_SPLIT: &str = "CPU s: proxy / generator / backends (wall)";

/// weir's peer in the L4 (TCP) scenario.
const L4_PEER: &str = "haproxy-tcp";

/// `weir / peer`, or `None` when either is zero or not a finite number, so a
/// missing or failed measurement never shows up as 0× or ∞×.
///
/// Callers pass "higher is better" quantities; for a lower-is-better metric
/// pass `(peer, weir)`, e.g. CPU per message, so the result still reads
/// "> 1 means weir is better".
pub fn ratio(weir: f64, peer: f64) -> Option<f64> {
    if weir == 0.0 || peer == 0.0 || !weir.is_finite() || !peer.is_finite() {
        return None;
    }
    Some(weir / peer)
}

/// The whole report, naming the SVGs `plot::write_svgs(.., stem)` wrote.
pub fn markdown(results: &[ScenarioResult], stem: &str) -> String {
    let mut out = String::new();
    let Some(first) = results.first() else {
        out.push_str("# weir benchmark\n\nNo results.\n");
        return out;
    };
    heading(&mut out, &first.info);

    let mut sorted: Vec<&ScenarioResult> = results.iter().collect();
    sorted.sort_by_key(|r| {
        ORDER
            .iter()
            .position(|s| *s == r.scenario)
            .unwrap_or(ORDER.len())
    });
    for r in sorted {
        section(&mut out, r, &first.info, stem);
    }
    out
}

fn heading(out: &mut String, info: &RunInfo) {
    let _ = writeln!(out, "# weir benchmark — {}\n", or_dash(&info.date));
    let mode = if info.quick { "quick" } else { "full" };
    let _ = writeln!(out, "- Run: {mode}");
    let _ = writeln!(out, "- Kernel: {}", or_dash(&info.kernel));
    let _ = writeln!(out, "- CPUs: {}", info.cpus);
    let _ = writeln!(
        out,
        "- Workers per proxy process: {} (threads for weir and HAProxy, processes for nginx)",
        info.workers
    );
    let _ = writeln!(out, "- weir commit: `{}`", or_dash(&info.weir_commit));
    let _ = writeln!(out, "- HAProxy: {}", or_dash(&info.haproxy_version));
    let _ = writeln!(out, "- nginx: {}", or_dash(&info.nginx_version));
    out.push_str(
        "\nRatios read \"> 1 means weir is better\"; – means a row or value is missing.\n",
    );
}

fn section(out: &mut String, r: &ScenarioResult, head: &RunInfo, stem: &str) {
    let _ = writeln!(out, "\n## {}\n", title(&r.scenario));
    if r.info.date != head.date || r.info.weir_commit != head.weir_commit {
        let _ = writeln!(
            out,
            "_From another run: {}, weir `{}`._\n",
            or_dash(&r.info.date),
            or_dash(&r.info.weir_commit)
        );
    }
    if !r.params.is_empty() {
        let params: Vec<String> = r.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "Parameters: `{}`\n", params.join(" "));
    }

    let mut any = false;
    if !r.steady.is_empty() {
        steady(out, &r.steady);
        files_line(out, "steady", stem);
        any = true;
    }
    if !r.idle.is_empty() {
        idle(out, &r.idle);
        files_line(out, "idle", stem);
        any = true;
    }
    if !r.connrate.is_empty() {
        connrate(out, &r.connrate);
        files_line(out, "connrate", stem);
        any = true;
    }
    if !r.churn.is_empty() {
        churn(out, &r.churn);
        files_line(out, "churn", stem);
        any = true;
    }
    if !r.drain.is_empty() {
        drain(out, &r.drain);
        files_line(out, "drain", stem);
        any = true;
    }
    if !r.l4.is_empty() {
        l4(out, &r.l4);
        files_line(out, "l4", stem);
        any = true;
    }
    if !any {
        out.push_str("_No rows._\n");
    }

    if !r.notes.is_empty() {
        out.push_str("\nNotes:\n\n");
        for n in &r.notes {
            let _ = writeln!(out, "- {n}");
        }
    }
}

fn title(scenario: &str) -> String {
    match scenario {
        "steady" => "Steady echo (steady)".into(),
        "idle" => "Idle connections (idle)".into(),
        "connrate" => "Connection rate ramp (connrate)".into(),
        "churn" => "Backend churn (churn)".into(),
        "drain" => "Backend drain (drain)".into(),
        "l4" => "L4 TCP forwarding (l4)".into(),
        other => other.to_string(),
    }
}

fn files_line(out: &mut String, scenario: &str, stem: &str) {
    let files = plot::files_for(scenario, stem);
    if files.is_empty() {
        return;
    }
    let links: Vec<String> = files.iter().map(|f| format!("[{f}]({f})")).collect();
    let _ = writeln!(out, "\nPlots: {}", links.join(", "));
}

// ---------------------------------------------------------------------------
// Tables

/// A Markdown table built row by row; cells are escaped so a `|` in a
/// system name or note cannot break the layout.
struct Table {
    header: Vec<String>,
    /// Columns holding text rather than numbers, aligned left.
    left: Vec<usize>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            left: vec![0],
            rows: Vec::new(),
        }
    }

    /// Aligns the named columns left.
    fn left(mut self, names: &[&str]) -> Self {
        for (i, h) in self.header.iter().enumerate() {
            if names.contains(&h.as_str()) {
                self.left.push(i);
            }
        }
        self
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn write(&self, out: &mut String) {
        let line = |cells: &[String]| {
            let cells: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
            format!("| {} |\n", cells.join(" | "))
        };
        out.push_str(&line(&self.header));
        let sep: Vec<String> = self
            .header
            .iter()
            .enumerate()
            .map(|(i, _)| {
                if self.left.contains(&i) {
                    ":--".into()
                } else {
                    "--:".into()
                }
            })
            .collect();
        out.push_str(&format!("|{}|\n", sep.join("|")));
        for r in &self.rows {
            out.push_str(&line(r));
        }
    }
}

fn is_weir(system: &str) -> bool {
    system == WEIR || system.starts_with("weir-")
}

/// Rows that name the system they measured, so peers can be looked up the
/// same way in every table.
trait Measured {
    fn system(&self) -> &str;
}

macro_rules! measured {
    ($($t:ty),*) => {$(
        impl Measured for $t {
            fn system(&self) -> &str {
                &self.system
            }
        }
    )*};
}
measured!(SteadyRow, IdleRow, ConnrateRow, ChurnRow, L4Row);

/// The row of `peer` measured under the same conditions (`key`) as a weir row.
fn peer_row<'a, T: Measured, K: PartialEq>(
    rows: &'a [T],
    key: impl Fn(&T) -> K,
    peer: &str,
    want: &K,
) -> Option<&'a T> {
    rows.iter().find(|r| r.system() == peer && key(r) == *want)
}

/// Ratio cells of one row: blank for peer rows (nothing to compare), one
/// cell per peer for weir rows.
fn ratio_cells<T>(
    is_weir_row: bool,
    peers: &[&str],
    peer_of: impl Fn(&str) -> Option<T>,
    value: impl Fn(T) -> Option<f64>,
) -> Vec<String> {
    peers
        .iter()
        .map(|p| {
            if !is_weir_row {
                return String::new();
            }
            fmt_ratio(peer_of(p).and_then(&value))
        })
        .collect()
}

fn steady(out: &mut String, rows: &[SteadyRow]) {
    let key = |r: &SteadyRow| (r.message_bytes, r.connections);
    let per_cpu_s = |r: &SteadyRow| 1e6 / r.cpu_s_per_million;

    out.push_str("### Closed loop: throughput and CPU\n\n");
    let mut t = Table::new(&[
        "system",
        "msg bytes",
        "conns",
        "msgs/s",
        "weir/haproxy (msgs/s)",
        "weir/nginx (msgs/s)",
        "proxy CPU s per M msgs",
        "msgs per proxy CPU s",
        "weir/haproxy (msgs per CPU s)",
        "weir/nginx (msgs per CPU s)",
        CPU_SPLIT,
        "errors",
    ])
    .left(&[CPU_SPLIT]);
    for r in rows {
        let w = is_weir(&r.system);
        let find = |p: &str| peer_row(rows, key, p, &key(r));
        let mut cells = vec![
            r.system.clone(),
            fmt_int(r.message_bytes as u64),
            fmt_int(r.connections as u64),
            fmt_num(r.closed_msgs_per_sec),
        ];
        cells.extend(ratio_cells(w, &L7_PEERS, find, |p| {
            ratio(r.closed_msgs_per_sec, p.closed_msgs_per_sec)
        }));
        cells.push(fmt_num(r.cpu_s_per_million));
        cells.push(if r.cpu_s_per_million > 0.0 {
            fmt_num(per_cpu_s(r))
        } else {
            "–".into()
        });
        // Messages per proxy CPU second: peer CPU per message over weir's.
        cells.extend(ratio_cells(w, &L7_PEERS, find, |p| {
            ratio(p.cpu_s_per_million, r.cpu_s_per_million)
        }));
        cells.push(fmt_cpu(&r.closed_cpu));
        cells.push(fmt_int(r.errors));
        t.row(cells);
    }
    t.write(out);
    out.push_str(
        "\nThe CPU split shows whether the generator or the backends, not the proxy, were the limit.\n",
    );

    out.push_str("\n### Open loop: latency at a fixed offered rate\n\n");
    let mut t = Table::new(&[
        "system",
        "msg bytes",
        "conns",
        "offered msgs/s",
        "achieved msgs/s",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "max",
        "samples",
        "weir/haproxy (p99)",
        "weir/nginx (p99)",
        CPU_SPLIT,
    ])
    .left(&[CPU_SPLIT]);
    for r in rows {
        let w = is_weir(&r.system);
        let find = |p: &str| peer_row(rows, key, p, &key(r));
        let l = &r.open_latency;
        let mut cells = vec![
            r.system.clone(),
            fmt_int(r.message_bytes as u64),
            fmt_int(r.connections as u64),
            fmt_num(r.open_rate),
            fmt_num(r.open_achieved),
        ];
        cells.extend(latency_cells(l));
        cells.push(fmt_int(l.samples));
        cells.extend(ratio_cells(w, &L7_PEERS, find, |p| {
            ratio(p99(&p.open_latency), p99(l))
        }));
        cells.push(fmt_cpu(&r.open_cpu));
        t.row(cells);
    }
    t.write(out);
    out.push_str(
        "\nLatency is measured from each message's scheduled send time (no coordinated omission); \
         the p99 ratio is peer p99 ÷ weir p99.\n",
    );
}

/// Percentile cells; `–` when nothing was sampled, since the zeros of an
/// empty histogram are not a latency.
fn latency_cells(l: &Latency) -> Vec<String> {
    [l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us]
        .iter()
        .map(|&v| {
            if l.samples == 0 {
                "–".into()
            } else {
                fmt_us(v)
            }
        })
        .collect()
}

/// p99 for ratios: 0 (shown as –) when nothing was sampled.
fn p99(l: &Latency) -> f64 {
    if l.samples == 0 { 0.0 } else { l.p99_us as f64 }
}

fn idle(out: &mut String, rows: &[IdleRow]) {
    let key = |r: &IdleRow| r.connections;
    let mut t = Table::new(&[
        "system",
        "conns",
        "held",
        "shards",
        "processes",
        "RSS before",
        "RSS after",
        "RSS per conn",
        "weir/haproxy (conns per RSS byte)",
        "weir/nginx (conns per RSS byte)",
        "marginal per conn",
        "weir/haproxy (marginal)",
        "weir/nginx (marginal)",
        "kernel per conn",
        "endings",
    ])
    .left(&["endings"]);
    for r in rows {
        let w = is_weir(&r.system);
        let find = |p: &str| peer_row(rows, key, p, &r.connections);
        let mut cells = vec![
            r.system.clone(),
            fmt_int(r.connections as u64),
            format!(
                "{} / {} ({})",
                fmt_int(r.held as u64),
                fmt_int(r.connections as u64),
                fmt_pct(r.held as f64, r.connections as f64)
            ),
            fmt_int(r.shards as u64),
            fmt_int(r.processes as u64),
            fmt_kib(r.rss_before_kib),
            fmt_kib(r.rss_after_kib),
            fmt_bytes(r.rss_bytes_per_conn),
        ];
        cells.extend(ratio_cells(w, &L7_PEERS, find, |p| {
            ratio(p.rss_bytes_per_conn, r.rss_bytes_per_conn)
        }));
        cells.push(fmt_bytes(r.marginal_bytes_per_conn));
        cells.extend(ratio_cells(w, &L7_PEERS, find, |p| {
            ratio(p.marginal_bytes_per_conn, r.marginal_bytes_per_conn)
        }));
        cells.push(fmt_bytes(r.kernel_bytes_per_conn));
        cells.push(fmt_endings(&r.endings));
        t.row(cells);
    }
    t.write(out);
    out.push_str(
        "\nRSS is PSS summed over the proxy's processes (shared pages once). \
         \"RSS per conn\" is (after − before) ÷ held and includes warm-up (buffer pools, \
         first allocations); \"marginal\" is what the second half of the connections added, \
         per connection. Memory ratios are peer ÷ weir. \"kernel per conn\" is machine-wide \
         slab + TCP pages: it includes the generator's and the backends' sockets, the same \
         for every system.\n",
    );
}

fn connrate(out: &mut String, rows: &[ConnrateRow]) {
    let mut t = Table::new(&[
        "system",
        "steps",
        "max clean handshakes/s",
        "weir/haproxy",
        "weir/nginx",
        "handshakes per proxy CPU s",
        "weir/haproxy (per CPU s)",
        "weir/nginx (per CPU s)",
        "stopped by",
        "last step: offered / achieved / failed",
        "handshake p99 at max clean",
    ])
    .left(&["stopped by"]);
    for r in rows {
        let w = is_weir(&r.system);
        let find = |p: &str| peer_row(rows, |_| (), p, &());
        let mut cells = vec![
            r.system.clone(),
            fmt_int(r.steps.len() as u64),
            fmt_num(r.max_clean_rate),
        ];
        cells.extend(ratio_cells(w, &L7_PEERS, find, |p| {
            ratio(r.max_clean_rate, p.max_clean_rate)
        }));
        cells.push(fmt_num(r.handshakes_per_cpu_s));
        cells.extend(ratio_cells(w, &L7_PEERS, find, |p| {
            ratio(r.handshakes_per_cpu_s, p.handshakes_per_cpu_s)
        }));
        cells.push(or_dash(&r.stopped_by).to_string());
        cells.push(match r.steps.last() {
            Some(s) => format!(
                "{} / {} / {}",
                fmt_num(s.target),
                fmt_num(s.achieved),
                fmt_int(s.failed)
            ),
            None => "–".into(),
        });
        let best = r.steps.iter().find(|s| s.achieved == r.max_clean_rate);
        cells.push(match best {
            Some(s) if s.handshake.samples > 0 => fmt_us(s.handshake.p99_us),
            _ => "–".into(),
        });
        t.row(cells);
    }
    t.write(out);
    out.push_str(
        "\nA clean step has no failure, completes at least 90% of the offer with the \
         generator on time, and keeps the handshake p99 under 500 ms. `stopped by`: \
         `errors` (a step failed), `generator` (could not offer the rate), `saturated` \
         (completed well under the offer, or handshakes queued), `cap` (ramp ended). On a \
         small machine the proxy, the generator and the backends share the cores, so the \
         highest clean rate is partly the machine's; handshakes per proxy CPU second is \
         the proxy's own cost.\n",
    );
}

fn churn(out: &mut String, rows: &[ChurnRow]) {
    // Every non-weir method is a peer of its own: a reload and an API
    // change of the same proxy behave differently.
    let mut peers: Vec<&str> = Vec::new();
    for r in rows {
        if !is_weir(&r.system) && !peers.contains(&r.system.as_str()) {
            peers.push(&r.system);
        }
    }
    let ratio_headers: Vec<String> = peers.iter().map(|p| format!("weir/{p}")).collect();
    let mut header = vec![
        "system",
        "seconds",
        "changes",
        "change ms (median)",
        "handshakes ok",
        "handshakes failed",
        "cut",
        "closed by peer",
        "messages echoed",
        "processes after",
        "RSS before → after",
    ];
    header.extend(ratio_headers.iter().map(String::as_str));
    let mut t = Table::new(&header);
    let disrupted = |r: &ChurnRow| (r.handshakes_failed + r.cut) as f64;
    for r in rows {
        let w = is_weir(&r.system);
        let find = |p: &str| peer_row(rows, |_| (), p, &());
        let mut cells = vec![
            r.system.clone(),
            fmt_num(r.seconds),
            fmt_int(r.changes as u64),
            median(&r.change_ms).map_or_else(|| "–".into(), fmt_int),
            fmt_int(r.handshakes_ok),
            fmt_int(r.handshakes_failed),
            fmt_int(r.cut),
            fmt_int(r.closed_by_peer),
            fmt_int(r.messages_echoed),
            fmt_int(r.processes_after as u64),
            format!(
                "{} → {}",
                fmt_kib(r.rss_before_kib),
                fmt_kib(r.rss_after_kib)
            ),
        ];
        cells.extend(ratio_cells(w, &peers, find, |p| {
            ratio(disrupted(p), disrupted(r))
        }));
        t.row(cells);
    }
    t.write(out);
    out.push_str(
        "\nRatios compare disrupted connections (failed handshakes + cut): peer ÷ weir; \
         – when either side had none, so read the counts.\n",
    );
}

fn drain(out: &mut String, rows: &[DrainRow]) {
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

fn l4(out: &mut String, rows: &[L4Row]) {
    let key = |r: &L4Row| r.streams;
    let peers = [L4_PEER];
    let mut t = Table::new(&[
        "system",
        "streams",
        "bulk Gbit/s",
        "weir/haproxy-tcp (Gbit/s)",
        "conns/s",
        "weir/haproxy-tcp (conns/s)",
        "conn errors",
        "bulk CPU s: proxy / generator / backends (wall)",
        "softirq s",
    ])
    .left(&["bulk CPU s: proxy / generator / backends (wall)"]);
    for r in rows {
        let w = is_weir(&r.system);
        let find = |p: &str| peer_row(rows, key, p, &r.streams);
        let mut cells = vec![
            r.system.clone(),
            fmt_int(r.streams as u64),
            fmt_f(r.bulk_gbit_s, 2),
        ];
        cells.extend(ratio_cells(w, &peers, find, |p| {
            ratio(r.bulk_gbit_s, p.bulk_gbit_s)
        }));
        cells.push(fmt_num(r.conns_per_sec));
        cells.extend(ratio_cells(w, &peers, find, |p| {
            ratio(r.conns_per_sec, p.conns_per_sec)
        }));
        cells.push(fmt_int(r.conn_errors));
        cells.push(fmt_cpu(&r.bulk_cpu));
        cells.push(fmt_f(r.softirq_s, 2));
        t.row(cells);
    }
    t.write(out);
    out.push_str(
        "\nweir's XDP path has no process: its cost shows in softirq seconds, not proxy CPU.\n",
    );
}

// ---------------------------------------------------------------------------
// Formatting

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "–" } else { s }
}

fn median(v: &[u64]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_unstable();
    Some(v[v.len() / 2])
}

/// `1234567` → `1,234,567`.
fn fmt_int(v: u64) -> String {
    group(&v.to_string())
}

fn group(digits: &str) -> String {
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Fixed decimals with thousands separators; `–` for NaN or infinity.
fn fmt_f(v: f64, decimals: usize) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let s = format!("{:.*}", decimals, v.abs());
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s.as_str(), None),
    };
    let sign = if v < 0.0 && s.chars().any(|c| c.is_ascii_digit() && c != '0') {
        "-"
    } else {
        ""
    };
    match frac {
        Some(f) => format!("{sign}{}.{f}", group(int)),
        None => format!("{sign}{}", group(int)),
    }
}

/// Decimals by magnitude: enough to compare, not more than is meaningful.
fn fmt_num(v: f64) -> String {
    let a = v.abs();
    let decimals = if a >= 100.0 || a == 0.0 {
        0
    } else if a >= 10.0 {
        1
    } else {
        2
    };
    fmt_f(v, decimals)
}

fn fmt_ratio(r: Option<f64>) -> String {
    match r {
        Some(r) if r >= 100.0 => format!("{}×", fmt_f(r, 0)),
        Some(r) if r >= 10.0 => format!("{r:.1}×"),
        Some(r) => format!("{r:.2}×"),
        None => "–".into(),
    }
}

fn fmt_pct(part: f64, whole: f64) -> String {
    if whole > 0.0 {
        format!("{:.1}%", 100.0 * part / whole)
    } else {
        "–".into()
    }
}

fn fmt_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.2} ms", us as f64 / 1e3)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

fn fmt_ms(ms: Option<u64>) -> String {
    ms.map_or_else(|| "–".into(), |ms| format!("{} ms", fmt_int(ms)))
}

fn fmt_bytes(b: f64) -> String {
    if !b.is_finite() {
        return "–".into();
    }
    if b.abs() < 1024.0 {
        format!("{} B", fmt_f(b, 0))
    } else if b.abs() < 1024.0 * 1024.0 {
        format!("{} KiB", fmt_f(b / 1024.0, 1))
    } else {
        format!("{} MiB", fmt_f(b / (1024.0 * 1024.0), 1))
    }
}

fn fmt_kib(kib: u64) -> String {
    fmt_bytes(kib as f64 * 1024.0)
}

/// `–` when the split was not measured (no wall time).
fn fmt_cpu(c: &CpuSplit) -> String {
    if c.wall_s <= 0.0 {
        return "–".into();
    }
    format!(
        "{} / {} / {} ({} s)",
        fmt_f(c.proxy_s, 2),
        fmt_f(c.generator_s, 2),
        fmt_f(c.backends_s, 2),
        fmt_f(c.wall_s, 1)
    )
}

/// Most frequent ending first, so the normal case leads.
fn fmt_endings(e: &Endings) -> String {
    if e.is_empty() {
        return "–".into();
    }
    let mut v: Vec<(&String, &u64)> = e.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let parts: Vec<String> = v
        .iter()
        .map(|(k, n)| format!("{k}: {}", fmt_int(**n)))
        .collect();
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{ConnrateStep, TimelinePoint};

    fn endings(pairs: &[(&str, u64)]) -> Endings {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn info() -> RunInfo {
        RunInfo {
            date: "2026-11-27T10:00:00Z".into(),
            quick: true,
            kernel: "6.12.0".into(),
            cpus: 8,
            weir_commit: "abc1234".into(),
            haproxy_version: "3.0.5".into(),
            nginx_version: "1.26.2".into(),
            workers: 2,
        }
    }

    fn steady_row(system: &str, bytes: usize, msgs: f64, cpu_per_m: f64, p99: u64) -> SteadyRow {
        SteadyRow {
            system: system.into(),
            message_bytes: bytes,
            connections: 100,
            closed_msgs_per_sec: msgs,
            closed_cpu: CpuSplit {
                proxy_s: 1.5,
                generator_s: 3.0,
                backends_s: 0.5,
                wall_s: 10.0,
            },
            cpu_s_per_million: cpu_per_m,
            open_rate: 10_000.0,
            open_achieved: 9_990.0,
            open_latency: Latency {
                p50_us: 80,
                p90_us: 150,
                p99_us: p99,
                p999_us: 2_000,
                max_us: 15_000,
                samples: 100_000,
            },
            open_cpu: CpuSplit::default(),
            errors: 0,
        }
    }

    fn all_scenarios() -> Vec<ScenarioResult> {
        let base = |name: &str| ScenarioResult {
            scenario: name.into(),
            info: info(),
            params: [("seconds".to_string(), "10".to_string())].into(),
            ..Default::default()
        };
        let mut steady = base("steady");
        steady.steady = vec![
            steady_row("weir", 64, 200_000.0, 2.0, 400),
            steady_row("haproxy", 64, 100_000.0, 4.0, 800),
            steady_row("nginx", 64, 50_000.0, 8.0, 1_600),
            // No peer measured at this size: ratios must be "–".
            steady_row("weir", 4096, 80_000.0, 5.0, 900),
        ];
        steady.notes = vec!["nginx worker count capped".into()];

        let mut idle = base("idle");
        idle.idle = ["weir", "haproxy", "nginx"]
            .iter()
            .enumerate()
            .map(|(i, s)| IdleRow {
                system: s.to_string(),
                connections: 10_000,
                held: 10_000,
                shards: 1,
                rss_before_kib: 10_000,
                rss_after_kib: 10_000 + 10_000 * (i as u64 + 1),
                rss_bytes_per_conn: 1024.0 * (i as f64 + 1.0),
                marginal_bytes_per_conn: 512.0 * (i as f64 + 1.0),
                kernel_bytes_per_conn: 4000.0,
                processes: 1,
                endings: endings(&[("clean", 10_000)]),
            })
            .collect();

        let mut connrate = base("connrate");
        connrate.connrate = vec![
            ConnrateRow {
                system: "weir".into(),
                steps: vec![ConnrateStep {
                    target: 1000.0,
                    achieved: 1000.0,
                    ..Default::default()
                }],
                max_clean_rate: 3000.0,
                handshakes_per_cpu_s: 6000.0,
                stopped_by: "cap".into(),
            },
            ConnrateRow {
                system: "haproxy".into(),
                steps: vec![],
                max_clean_rate: 1000.0,
                handshakes_per_cpu_s: 4000.0,
                stopped_by: "errors".into(),
            },
        ];

        let mut churn = base("churn");
        let churn_row = |s: &str, failed: u64, cut: u64| ChurnRow {
            system: s.into(),
            seconds: 30.0,
            changes: 10,
            change_ms: vec![5, 3, 9],
            handshakes_ok: 1000,
            handshakes_failed: failed,
            cut,
            timeline: vec![TimelinePoint {
                t_s: 1.0,
                open: 100,
                ..Default::default()
            }],
            ..Default::default()
        };
        churn.churn = vec![
            churn_row("weir", 1, 1),
            churn_row("haproxy-api", 2, 2),
            churn_row("haproxy-reload", 10, 30),
            churn_row("nginx-reload", 0, 0),
        ];

        let mut drain = base("drain");
        drain.drain = vec![DrainRow {
            system: "weir".into(),
            method: "weir backend remove".into(),
            connections: 100,
            window_s: 5.0,
            endings: endings(&[("peer_close:1001", 90), ("reset", 10)]),
            first_close_ms: Some(12),
            median_close_ms: Some(2500),
            last_close_ms: None,
            still_open: 0,
        }];

        let mut l4 = base("l4");
        l4.l4 = vec![
            L4Row {
                system: "weir".into(),
                streams: 8,
                bulk_gbit_s: 30.0,
                conns_per_sec: 50_000.0,
                ..Default::default()
            },
            L4Row {
                system: "haproxy-tcp".into(),
                streams: 8,
                bulk_gbit_s: 20.0,
                conns_per_sec: 0.0,
                ..Default::default()
            },
        ];
        // Out of order on purpose: the report sorts sections.
        vec![l4, drain, churn, connrate, idle, steady]
    }

    /// The cells of the table row whose first cell is `system` and that
    /// contains `needle`, in the first table after `section`.
    fn row_cells(md: &str, section: &str, system: &str, needle: &str) -> Vec<String> {
        let start = md.find(section).expect("section");
        md[start..]
            .lines()
            .filter(|l| l.starts_with("| "))
            .map(|l| {
                l.trim_matches('|')
                    .split(" | ")
                    .map(|c| c.trim().to_string())
                    .collect::<Vec<_>>()
            })
            .find(|c| c[0] == system && c.iter().any(|x| x.contains(needle)))
            .expect("row")
    }

    #[test]
    fn ratio_math() {
        assert_eq!(ratio(200.0, 100.0), Some(2.0));
        assert_eq!(ratio(0.0, 100.0), None);
        assert_eq!(ratio(100.0, 0.0), None);
        assert_eq!(ratio(f64::NAN, 1.0), None);
        assert_eq!(fmt_ratio(ratio(3.0, 2.0)), "1.50×");
        assert_eq!(fmt_ratio(None), "–");
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_int(0), "0");
        assert_eq!(fmt_int(999), "999");
        assert_eq!(fmt_int(1_000), "1,000");
        assert_eq!(fmt_int(1_234_567), "1,234,567");
        assert_eq!(fmt_f(12_345.678, 2), "12,345.68");
        assert_eq!(fmt_f(-1_234.5, 1), "-1,234.5");
        assert_eq!(fmt_num(123_456.7), "123,457");
        assert_eq!(fmt_num(1.234), "1.23");
        assert_eq!(fmt_us(999), "999 µs");
        assert_eq!(fmt_us(1_500), "1.50 ms");
        assert_eq!(fmt_bytes(2048.0), "2.0 KiB");
        assert_eq!(
            fmt_endings(&endings(&[("reset", 1), ("clean", 5)])),
            "clean: 5, reset: 1"
        );
        assert_eq!(median(&[5, 3, 9]), Some(5));
    }

    #[test]
    fn every_scenario_gets_a_table_in_order() {
        let md = markdown(&all_scenarios(), "2026-11-27");
        assert!(md.starts_with("# weir benchmark — 2026-11-27T10:00:00Z"));
        for needle in ["quick", "6.12.0", "abc1234", "3.0.5", "1.26.2", "CPUs: 8"] {
            assert!(md.contains(needle), "heading lacks {needle}");
        }
        let mut last = 0;
        for s in ORDER {
            let heading = format!("## {}", title(s));
            let at = md
                .find(&heading)
                .unwrap_or_else(|| panic!("no section {s}"));
            assert!(at >= last, "section {s} out of order");
            last = at;
            let body = &md[at..];
            let end = body[3..].find("\n## ").map_or(body.len(), |e| e + 3);
            let body = &body[..end];
            assert!(body.contains("\n| system |"), "no table for {s}");
            assert!(body.contains("`seconds=10`"), "no params for {s}");
            for f in plot::files_for(s, "2026-11-27") {
                assert!(body.contains(&f), "section {s} does not name {f}");
            }
        }
        assert!(md.contains("- nginx worker count capped"));
    }

    #[test]
    fn ratios_in_tables() {
        let md = markdown(&all_scenarios(), "2026-11-27");

        // Steady closed loop: weir 200k vs 100k / 50k msgs/s; CPU per M 2
        // vs 4 / 8 means 2× / 4× messages per CPU second.
        let c = row_cells(&md, "### Closed loop", "weir", "200,000");
        assert_eq!(c[4], "2.00×");
        assert_eq!(c[5], "4.00×");
        assert_eq!(c[7], "500,000");
        assert_eq!(c[8], "2.00×");
        assert_eq!(c[9], "4.00×");
        assert_eq!(c[10], "1.50 / 3.00 / 0.50 (10.0 s)");
        // The 4096-byte weir row has no peers.
        let c = row_cells(&md, "### Closed loop", "weir", "4,096");
        assert_eq!(&c[4..6], ["–", "–"]);
        // Peer rows carry no ratio.
        let c = row_cells(&md, "### Closed loop", "haproxy", "64");
        assert_eq!(&c[4..6], ["", ""]);
        // Open loop p99: 800 / 400 and 1600 / 400.
        let c = row_cells(&md, "### Open loop", "weir", "400 µs");
        assert_eq!(&c[11..13], ["2.00×", "4.00×"]);

        // Idle: peer bytes per conn over weir's.
        let c = row_cells(&md, "## Idle", "weir", "10,000");
        assert_eq!(&c[8..10], ["2.00×", "3.00×"]);

        // Connrate: nginx missing.
        let c = row_cells(&md, "## Connection rate", "weir", "3,000");
        assert_eq!(&c[3..5], ["3.00×", "–"]);

        // Churn: one column per peer method; disruption 2 vs 4 / 40 / 0.
        assert!(md.contains("| weir/haproxy-api | weir/haproxy-reload | weir/nginx-reload |"));
        let c = row_cells(&md, "## Backend churn", "weir", "1,000");
        assert_eq!(&c[11..14], ["2.00×", "20.0×", "–"]);

        // Drain: 90 of 100 graceful.
        let c = row_cells(&md, "## Backend drain", "weir", "100");
        assert_eq!(c[4], "90 (90.0%)");
        assert_eq!(c[8], "–");

        // L4: 30 / 20 Gbit/s; peer conns/s is 0 so its ratio is missing.
        let c = row_cells(&md, "## L4", "weir", "30.00");
        assert_eq!(c[3], "1.50×");
        assert_eq!(c[5], "–");
    }

    #[test]
    fn empty_and_rowless() {
        assert!(markdown(&[], "2026-11-27").contains("No results."));
        let r = ScenarioResult {
            scenario: "idle".into(),
            notes: vec!["haproxy failed to start".into()],
            ..Default::default()
        };
        let md = markdown(&[r], "2026-11-27");
        assert!(md.contains("_No rows._"));
        assert!(md.contains("- haproxy failed to start"));
    }
}
