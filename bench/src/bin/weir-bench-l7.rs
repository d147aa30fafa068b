//! L7 measurements for issue 3, on loopback:
//!
//! - echo throughput and latency with 200 connections and 64-byte
//!   messages, closed loop (each connection sends, waits for the echo,
//!   sends again), through `weir run` and directly against the same echo
//!   backend, in the same run;
//! - weir's resident memory per idle proxied connection: RSS of the
//!   `weir run` process before and after opening N idle connections.
//!
//! Prints a table and writes bench/results/<date>-l7-micro.json.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;
use weir::instance::Instance;
use weir::registry::{
    ApplyOptions, BackendAddr, Change, CreateOptions, Registry, ServiceAddr, ServiceModeName,
};
use weir_testbed::workspace_bin;

#[derive(Parser)]
struct Args {
    /// Connections for the echo measurement.
    #[arg(long, default_value_t = 200)]
    connections: usize,
    /// Seconds per echo measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Idle connections for the memory measurement (weir holds one
    /// descriptor per client; backend sockets are io_uring direct
    /// descriptors, outside the 20,000-file process limit here).
    #[arg(long, default_value_t = 10000)]
    idle: usize,
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
struct Echo {
    target: String,
    connections: usize,
    message_bytes: usize,
    msgs_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
}

#[derive(Serialize)]
struct Idle {
    connections: usize,
    rss_before_kib: u64,
    rss_after_kib: u64,
    bytes_per_connection: f64,
}

#[derive(Serialize)]
struct Report {
    date: String,
    workers: usize,
    echo: Vec<Echo>,
    idle: Idle,
}

/// Kills and reaps on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Scratch(Instance);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = self.0.destroy();
    }
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("value")?.parse()?)
}

async fn echo_load(
    url: &str,
    connections: usize,
    seconds: u64,
    size: usize,
) -> Result<(u64, hdrhistogram::Histogram<u64>)> {
    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        streams.push(ws);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for mut ws in streams {
        tasks.push(tokio::spawn(async move {
            let mut hist =
                hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let payload = vec![0x42u8; size];
            let mut n = 0u64;
            while tokio::time::Instant::now() < deadline {
                let t0 = Instant::now();
                ws.send(Message::binary(payload.clone())).await?;
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) if b.len() == size => {}
                    other => bail!("unexpected echo: {other:?}"),
                }
                hist.record(t0.elapsed().as_micros().max(1) as u64)?;
                n += 1;
            }
            let _ = ws.close(None).await;
            Ok::<_, anyhow::Error>((n, hist))
        }));
    }
    let mut total = 0;
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        let (n, h) = t.await??;
        total += n;
        hist.add(h)?;
    }
    Ok((total, hist))
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        weir_testbed::is_root(),
        "run as root: weir run uses the pinned registry"
    );
    let instance = Scratch(Instance::new(&format!("benchl7{}", std::process::id()))?);
    let mut reg = Registry::open_or_create(&instance.0, CreateOptions { flows: 65536 })?;
    let svc = ServiceAddr {
        vip: "198.19.0.70".parse()?,
        port: 80,
    };
    let force = || ApplyOptions {
        force: true,
        ..Default::default()
    };
    reg.apply(
        &Change::AddService {
            addr: svc,
            mode: ServiceModeName::L7,
            ring_size: None,
            max_remove_fraction: None,
            min_backends: None,
        },
        force(),
    )?;
    let mut echo = Command::new(workspace_bin("weir-echo"))
        .args(["--listen", "127.0.0.1:0", "--name", "bench"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(echo.stdout.as_mut().context("stdout")?).read_line(&mut line)?;
    let echo_addr: SocketAddr = line
        .split_whitespace()
        .nth(1)
        .context("ready ADDR")?
        .parse()?;
    let _echo = Proc(echo);
    let SocketAddr::V4(v4) = echo_addr else {
        bail!("IPv4 echo")
    };
    reg.apply(
        &Change::SetBackends {
            service: svc,
            backends: vec![(
                BackendAddr {
                    addr: *v4.ip(),
                    port: v4.port(),
                },
                1,
            )],
        },
        force(),
    )?;

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let workers = 2;
    let dir = std::env::temp_dir().join(format!("weir-bench-l7-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("weir.toml");
    std::fs::write(
        &config,
        format!(
            "instance = \"{}\"\n[runtime]\nworkers = {workers}\n[[listener]]\nlisten = \"127.0.0.1:{port}\"\n[[listener.route]]\nservice = \"{svc}\"\n",
            instance.0.name()
        ),
    )?;
    let weir = Proc(
        Command::new(workspace_bin("weir"))
            .args(["run", "--config"])
            .arg(&config)
            .stderr(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(Instant::now() < deadline, "weir run did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut echo_results = Vec::new();
    for (target, url) in [
        ("direct", format!("ws://{echo_addr}/")),
        ("weir", format!("ws://127.0.0.1:{port}/")),
    ] {
        let (n, hist) = rt.block_on(echo_load(&url, args.connections, args.seconds, 64))?;
        let r = Echo {
            target: target.into(),
            connections: args.connections,
            message_bytes: 64,
            msgs_per_sec: n as f64 / args.seconds as f64,
            p50_us: hist.value_at_quantile(0.5),
            p99_us: hist.value_at_quantile(0.99),
            p999_us: hist.value_at_quantile(0.999),
        };
        eprintln!(
            "echo {target}: {:.0} msgs/s, p50 {} us, p99 {} us",
            r.msgs_per_sec, r.p50_us, r.p99_us
        );
        echo_results.push(r);
    }

    // Idle connections: RSS of weir run before and after.
    std::thread::sleep(Duration::from_millis(500));
    let pid = weir.0.id();
    let before = rss_kib(pid)?;
    let idle = args.idle;
    let url = format!("ws://127.0.0.1:{port}/");
    let held = rt.block_on(async {
        let mut held = Vec::with_capacity(idle);
        for _ in 0..idle {
            let (ws, _) = tokio_tungstenite::connect_async(&url).await?;
            held.push(ws);
        }
        Ok::<_, anyhow::Error>(held)
    })?;
    std::thread::sleep(Duration::from_secs(1));
    let after = rss_kib(pid)?;
    drop(held);
    let idle = Idle {
        connections: idle,
        rss_before_kib: before,
        rss_after_kib: after,
        bytes_per_connection: (after.saturating_sub(before) * 1024) as f64 / idle as f64,
    };
    eprintln!(
        "idle: {} connections, weir RSS {} -> {} KiB: {:.0} bytes per connection",
        idle.connections, before, after, idle.bytes_per_connection
    );
    let _ = std::fs::remove_dir_all(&dir);

    let date = weir::registry::audit::rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
    );
    let report = Report {
        date: date.clone(),
        workers,
        echo: echo_results,
        idle,
    };
    println!("\n## L7 micro-benchmarks ({date}, weir run with {workers} workers, loopback)\n");
    println!("| target | connections | msg | msgs/s | p50 (us) | p99 (us) | p99.9 (us) |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for e in &report.echo {
        println!(
            "| {} | {} | {} B | {:.0} | {} | {} | {} |",
            e.target, e.connections, e.message_bytes, e.msgs_per_sec, e.p50_us, e.p99_us, e.p999_us
        );
    }
    println!(
        "\nidle: {} connections through weir: RSS {} -> {} KiB, {:.0} bytes per connection",
        report.idle.connections,
        report.idle.rss_before_kib,
        report.idle.rss_after_kib,
        report.idle.bytes_per_connection
    );
    let out = args.out.unwrap_or_else(|| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("results")
            .join(format!("{}-l7-micro.json", &date[..10]))
    });
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("wrote {}", out.display());
    drop(weir);
    Ok(())
}
