//! L4 TCP forwarding: bulk throughput and short connections through weir's
//! XDP path and through HAProxy in TCP mode, to plain TCP sinks.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use serde::{Deserialize, Serialize};

use crate::procs;
use crate::results::CpuSplit;
use crate::scenario::{Outcome, Scenario};
use crate::stage::Bench;
use crate::systems::{Kind, Running, Spec};
use crate::table::{
    Table, fmt_cpu, fmt_f, fmt_int, fmt_num, is_weir, measured, peer_row, ratio, ratio_cells,
};
use crate::tcpload::TcpResult;

/// Port of the sinks.
const SINK_PORT: u16 = 9000;
/// HAProxy's TCP-mode listener.
const HAPROXY_TCP_PORT: u16 = 9001;
/// weir's peer.
const L4_PEER: &str = "haproxy-tcp";

/// Sizes of a full run, and of a quick one (`--quick`).
struct Sizes {
    l4_secs: f64,
    l4_streams: usize,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                l4_secs: 3.0,
                l4_streams: 4,
            }
        } else {
            Sizes {
                l4_secs: 10.0,
                l4_streams: 8,
            }
        }
    }
}

pub struct L4;

/// One L4 path: bulk streams, then short connections.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct L4Row {
    pub system: String,
    pub streams: usize,
    /// Bulk TCP throughput, client to backend, all streams, Gbit/s.
    pub bulk_gbit_s: f64,
    /// TCP connections (connect, 1 byte, answer, close) per second.
    pub conns_per_sec: f64,
    pub conn_errors: u64,
    /// CPU of the proxy process (HAProxy); the XDP path runs in softirq and
    /// has no process: its cost shows in `softirq_s`.
    pub bulk_cpu: CpuSplit,
    /// Softirq CPU seconds on the machine during the bulk phase.
    pub softirq_s: f64,
}

measured!(L4Row);

impl Scenario for L4 {
    const NAME: &'static str = "l4";
    const TITLE: &'static str = "L4 TCP forwarding";
    const SYSTEMS: &'static [&'static str] = &["weir-xdp", "haproxy-tcp"];

    type Row = L4Row;

    fn run(b: &mut Bench) -> Result<Outcome<L4Row>> {
        let s = Sizes::new(b.sizes.quick);
        let mut out = Outcome::new(&[
            ("seconds", s.l4_secs.to_string()),
            ("streams", s.l4_streams.to_string()),
            ("conn_concurrency", "64".into()),
            ("backends", "4 weir-sink".into()),
        ]);
        let weir = weir_testbed::workspace_bin("weir");
        let sink = weir_testbed::workspace_bin("weir-sink");
        let vip = b.topo.vip();
        let instance = format!("wb{}l4", std::process::id());
        let destroy = crate::systems::destroy_argv(&weir, &instance);
        weir_testbed::topology::register_cleanup_command(destroy.clone());
        let result = (|| -> Result<()> {
            let mut sinks = Vec::new();
            for i in 0..4 {
                let ns = b.topo.backend_ns[i].clone();
                let (pid, _) = b.topo.spawn_ready_in(
                    &ns,
                    &sink,
                    &["--listen", &format!("0.0.0.0:{SINK_PORT}")],
                    Duration::from_secs(10),
                )?;
                sinks.push(pid);
                let dev = b.topo.backend_dev(i);
                let out = b.topo.run_ok_in(
                    &ns,
                    &weir,
                    &[
                        "--instance",
                        &instance,
                        "--flows",
                        "262144",
                        "decap",
                        "attach",
                        "--dev",
                        &dev,
                        "--vip",
                        &vip.to_string(),
                        "--from",
                        &format!("{}/32", b.topo.lb_addr()),
                    ],
                )?;
                drop(out);
            }
            b.topo.attach_veth_peer_xdp()?;
            // Frames reach an edge host's NIC at the wire's MTU. veth would
            // hand the lb the client's 64 KiB TSO segments (and the
            // router's GRO aggregates) whole, which no wire carries and
            // which weir's XDP program drops as larger than the path MTU:
            // segment at the client and do not re-aggregate at the router.
            // Both L4 systems get the same frames.
            let client_ns = b.topo.client_ns.clone();
            let router_ns = b.topo.router_ns.clone();
            b.topo.run_ok_in(
                &client_ns,
                "ethtool",
                &["-K", "cli0", "tso", "off", "gso", "off"],
            )?;
            b.topo
                .run_ok_in(&router_ns, "ethtool", &["-K", "r-cli", "gro", "off"])?;
            let lb = |args: &[&str]| -> Result<()> {
                let mut full = vec!["--instance", instance.as_str(), "--flows", "262144"];
                full.extend_from_slice(args);
                b.topo.run_ok_in(&b.topo.lb_ns, &weir, &full).map(drop)
            };
            let lb_addr = b.topo.lb_addr().to_string();
            lb(&[
                "attach",
                "--dev",
                b.topo.lb_dev(),
                "--lb-addr",
                &lb_addr,
                "--mode",
                "native",
            ])?;
            let svc = format!("{vip}:{SINK_PORT}");
            lb(&["service", "add", &svc])?;
            let addrs: Vec<String> = (0..4).map(|i| b.topo.backend_addr(i).to_string()).collect();
            let mut set = vec!["backend", "set", svc.as_str()];
            set.extend(addrs.iter().map(String::as_str));
            lb(&set)?;
            let weir_target = SocketAddr::new(IpAddr::V4(vip), SINK_PORT);
            out.rows
                .push(l4_measure(b, &s, "weir-xdp", weir_target, None)?);

            let backends: Vec<SocketAddr> = (0..4)
                .map(|i| SocketAddr::new(IpAddr::V4(b.topo.backend_addr(i)), SINK_PORT))
                .collect();
            let spec = Spec {
                kind: Kind::Haproxy,
                listen: SocketAddr::new(IpAddr::V4(vip), HAPROXY_TCP_PORT),
                backends,
                workers: b.sizes.workers,
                shards: 1,
                drain_window: None,
                tcp_mode: true,
                max_connections: None,
                large_messages: false,
                health_checks: false,
                ring_size: None,
            };
            let row = b.with_system(spec, "l4", |b, sys| {
                l4_measure(b, &s, "haproxy-tcp", sys.spec.listen, Some(sys))
            });
            match row {
                Ok(row) => out.rows.push(row),
                Err(e) => out.notes.push(format!("haproxy-tcp: {e:#}")),
            }
            for pid in sinks {
                b.topo.stop_child(pid, Duration::from_secs(2));
            }
            Ok(())
        })();
        crate::systems::undo(&destroy);
        result?;
        Ok(out)
    }

    fn faults(rows: &[L4Row]) -> Vec<String> {
        let mut bad = Vec::new();
        for x in rows {
            if x.bulk_gbit_s <= 0.0 || x.conns_per_sec <= 0.0 {
                bad.push(format!("l4: {} moved nothing", x.system));
            }
        }
        bad
    }

    fn section(out: &mut String, rows: &[L4Row]) {
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
}

fn tcp_load(b: &Bench, mode: &str, target: SocketAddr, n: usize, secs: f64) -> Result<TcpResult> {
    let mut args = vec![
        mode.to_string(),
        "--target".into(),
        target.to_string(),
        if mode == "tcp-bulk" {
            "--streams"
        } else {
            "--concurrency"
        }
        .into(),
        n.to_string(),
        "--seconds".into(),
        secs.to_string(),
    ];
    for a in b.sources().iter().take(4) {
        args.push("--source".into());
        args.push(a.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = b.topo.start_in(&b.topo.client_ns, &b.load_bin, &args)?;
    let out = p.wait_output(Duration::from_secs_f64(secs + 60.0))?;
    ensure!(
        out.status.success(),
        "weir-load {mode} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn l4_measure(
    b: &Bench,
    s: &Sizes,
    name: &str,
    target: SocketAddr,
    sys: Option<&Running>,
) -> Result<L4Row> {
    b.progress(&format!(
        "{name}: {} bulk streams for {}s",
        s.l4_streams, s.l4_secs
    ));
    let pids = sys.map(Running::pids).unwrap_or_default();
    let p0 = procs::cpu_by_pid(&pids);
    let soft0 = procs::softirq_s();
    let t0 = Instant::now();
    let bulk = tcp_load(b, "tcp-bulk", target, s.l4_streams, s.l4_secs)?;
    let bulk_cpu = CpuSplit {
        proxy_s: procs::cpu_delta(&p0, &procs::cpu_by_pid(&pids)),
        generator_s: bulk.cpu_s,
        backends_s: 0.0,
        wall_s: t0.elapsed().as_secs_f64(),
        softirq_s: procs::softirq_s() - soft0,
    };
    b.progress(&format!(
        "{name}: short connections, 64 in flight, {}s",
        s.l4_secs
    ));
    let conns = tcp_load(b, "tcp-conns", target, 64, s.l4_secs)?;
    Ok(L4Row {
        system: name.into(),
        streams: s.l4_streams,
        bulk_gbit_s: bulk.bytes as f64 * 8.0 / bulk.seconds.max(1e-9) / 1e9,
        conns_per_sec: conns.ok as f64 / conns.seconds.max(1e-9),
        conn_errors: conns.errors + bulk.errors,
        softirq_s: bulk_cpu.softirq_s,
        bulk_cpu,
    })
}
