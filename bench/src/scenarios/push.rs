//! Server push: the backends stream small frames to many clients, as a
//! chat or notification server does. Every connection is up before the
//! first frame; then each backend sends its connections their frames on a
//! fixed schedule (spread over one period), each frame stamped with the
//! time it was due ([`weir_testbed::push`]). The generator records delivery
//! latency, its receive time minus that stamp, at a few fixed aggregate
//! rates, and counts frames expected against received; the proxy's CPU is
//! read over the frames only. The generator against one backend directly
//! is the baseline.

use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::chart::{Area, Chart, PercentileLine, SIZE, percentile_chart};
use crate::load::{self, Talk};
use crate::results::{CpuSplit, Latency, per_million};
use crate::scenario::{Outcome, Scenario};
use crate::stage::Bench;
use crate::systems::Running;
use crate::table::{
    CPU_SPLIT, L7_PEERS, Table, fmt_cpu, fmt_int, fmt_num, is_weir, latency_cells, measured,
    peer_row, ratio, ratio_cells, tail_ratio_cells,
};

/// Sizes of a full run, and of a quick one (`--quick`).
struct Sizes {
    connections: usize,
    /// Aggregate frames per second over all connections, one row each.
    rates: Vec<f64>,
    /// How long each rate is pushed.
    seconds: f64,
    frame_bytes: usize,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                connections: 100,
                rates: vec![2_000.0, 10_000.0],
                seconds: 3.0,
                frame_bytes: 64,
            }
        } else {
            Sizes {
                connections: 1_000,
                // The backends wake once per frame and connection: near
                // 20k frames/s they take most of this machine's two cores
                // and become the limit (`direct` then shows tens of ms).
                rates: vec![2_000.0, 5_000.0, 10_000.0],
                seconds: 10.0,
                frame_bytes: 64,
            }
        }
    }
}

/// Generator processes the connections are split over.
const PROCESSES: usize = 2;

pub struct Push;

/// One system (or `direct`) at one aggregate rate.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PushRow {
    pub system: String,
    pub connections: usize,
    pub frame_bytes: usize,
    /// Frames per second offered over all connections.
    pub rate: f64,
    /// Frames the clients asked for, and frames that arrived intact.
    pub expected: u64,
    pub received: u64,
    /// From the time the backend was due to send each frame to its arrival.
    pub latency: Latency,
    pub cpu: CpuSplit,
    /// Proxy CPU seconds per million frames received.
    pub cpu_s_per_million: f64,
    /// Frames lost or mangled, cut connections, failed handshakes.
    pub errors: u64,
}

measured!(PushRow);

impl Scenario for Push {
    const NAME: &'static str = "push";
    const TITLE: &'static str = "Server push";
    const SYSTEMS: &'static [&'static str] = &["weir", "haproxy", "nginx"];
    const CHART: Option<Chart<PushRow>> = Some(Chart {
        file: "push-latency",
        size: SIZE,
        draw: latency_chart,
    });

    type Row = PushRow;

    fn run(b: &mut Bench) -> Result<Outcome<PushRow>> {
        let s = Sizes::new(b.sizes.quick);
        let mut out = Outcome::new(&[
            ("connections", s.connections.to_string()),
            ("rates", format!("{:?}", s.rates)),
            ("seconds_per_rate", s.seconds.to_string()),
            ("frame_bytes", s.frame_bytes.to_string()),
            ("workers", b.sizes.workers.to_string()),
        ]);
        let (rows, notes) = b.direct_and_systems(
            "pu",
            |spec| spec,
            |b, name, sys| system_rows(b, &s, name, sys),
        );
        out.rows = rows;
        out.notes = notes;
        Ok(out)
    }

    fn faults(rows: &[PushRow]) -> Vec<String> {
        let mut bad = Vec::new();
        for r in rows {
            if r.received == 0 {
                bad.push(format!(
                    "push: {} delivered no frames at {} frames/s",
                    r.system, r.rate
                ));
            }
            if r.system != "direct" && r.cpu.proxy_s <= 0.0 {
                bad.push(format!("push: {}'s CPU time was not measured", r.system));
            }
        }
        bad
    }

    fn section(out: &mut String, rows: &[PushRow]) {
        let key = |r: &PushRow| (r.connections, r.frame_bytes, r.rate.to_bits());
        let mut t = Table::new(&[
            "system",
            "conns",
            "frame bytes",
            "offered frames/s",
            "expected",
            "received",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "max",
            "weir/haproxy (p99)",
            "weir/nginx (p99)",
            "weir/haproxy (p99.9)",
            "weir/nginx (p99.9)",
            "proxy CPU s per M frames",
            "weir/haproxy (frames per CPU s)",
            "weir/nginx (frames per CPU s)",
            CPU_SPLIT,
            "errors",
        ])
        .left(&[CPU_SPLIT]);
        for r in rows {
            let w = is_weir(&r.system);
            let find = |p: &str| peer_row(rows, key, p, &key(r));
            let l = &r.latency;
            let mut cells = vec![
                r.system.clone(),
                fmt_int(r.connections as u64),
                fmt_int(r.frame_bytes as u64),
                fmt_num(r.rate),
                fmt_int(r.expected),
                fmt_int(r.received),
            ];
            cells.extend(latency_cells(l));
            cells.extend(tail_ratio_cells(
                w,
                &L7_PEERS,
                |p| find(p).map(|x| &x.latency),
                l,
            ));
            cells.push(fmt_num(r.cpu_s_per_million));
            cells.extend(ratio_cells(w, &L7_PEERS, find, |p| {
                ratio(p.cpu_s_per_million, r.cpu_s_per_million)
            }));
            cells.push(fmt_cpu(&r.cpu));
            cells.push(fmt_int(r.errors));
            t.row(cells);
        }
        t.write(out);
        out.push_str(
            "\nLatency runs from the time the backend was due to send a frame (its schedule, \
             not the moment it got to it) to the frame's arrival at the client; latency ratios \
             are peer ÷ weir. CPU is read from the start signal to the last frame, \
             after every connection is up.\n",
        );
    }
}

fn system_rows(
    b: &Bench,
    s: &Sizes,
    name: &str,
    running: Option<&mut Running>,
) -> Result<Vec<PushRow>> {
    let running = running.map(|r| &*r);
    let url = match running {
        Some(_) => b.url(),
        None => format!("ws://{}/", b.backend(0)),
    };
    let mut rows = Vec::new();
    for &rate in &s.rates {
        b.progress(&format!(
            "{name}: {} connections, push at {rate} frames/s for {}s",
            s.connections, s.seconds
        ));
        // The plan's duration only bounds the wait for the start file.
        let mut plan = b.plan(
            s.connections,
            Talk::Push {
                rate,
                seconds: s.seconds,
            },
            s.frame_bytes,
            300.0,
        );
        plan.fleet.url = url.clone();
        let file = |what: &str| b.scratch.join(format!("{what}-push-{name}-{rate}"));
        let (hold, ready, start) = (file("hold"), file("ready"), file("start"));
        for f in [&hold, &ready, &start] {
            let _ = std::fs::remove_file(f);
        }
        plan.fleet.hold_file = Some(hold.clone());
        plan.fleet.ready_file = Some(ready);
        plan.start_file = Some(start);
        let limit = Duration::from_secs_f64(s.seconds) + Duration::from_secs(60);
        let measured = b.measure_from_start(running, &plan, PROCESSES, limit);
        let _ = std::fs::remove_file(&hold);
        let (r, cpu) = measured?;
        rows.push(PushRow {
            system: name.into(),
            connections: s.connections,
            frame_bytes: s.frame_bytes,
            rate,
            expected: r.sent,
            received: r.echoed,
            latency: load::latency_of(&load::decode_histogram(&r.latency)?),
            cpu_s_per_million: per_million(cpu.proxy_s, r.echoed),
            cpu,
            errors: r.lost + r.cut() + r.handshakes_failed,
        });
    }
    Ok(rows)
}

fn latency_chart(root: &Area, rows: &[&PushRow]) -> Result<()> {
    let lines: Vec<PercentileLine> = rows
        .iter()
        .map(|r| PercentileLine {
            system: &r.system,
            label: format!("{} {} frames/s", r.system, fmt_num(r.rate)),
            latency: &r.latency,
        })
        .collect();
    percentile_chart(
        root,
        "Server push: delivery latency percentiles (from the backend's schedule)",
        &lines,
    )
}
