//! weir-load: the bench's load generator, one process of several.
//!
//! `weir-load ws --plan JSON` runs a WebSocket [`Plan`] and prints its
//! [`LoadResult`] as JSON on stdout; `weir-load tcp-bulk` and
//! `weir-load tcp-conns` drive the L4 scenario against `weir-sink`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use weir_bench::load::Plan;
use weir_bench::tcpload::{bulk, conns};

#[derive(Parser)]
#[command(name = "weir-load", about = "weir bench load generator")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// WebSocket load from a JSON plan (see weir_bench::load::Plan).
    Ws {
        #[arg(long)]
        plan: String,
        /// Runtime threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Bulk TCP streams to a weir-sink; prints bytes the sinks counted.
    TcpBulk {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        streams: usize,
        #[arg(long)]
        seconds: f64,
        #[arg(long)]
        source: Vec<IpAddr>,
    },
    /// Short TCP connections (connect, 1 byte, answer, close) to a
    /// weir-sink, `concurrency` at a time.
    TcpConns {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        concurrency: usize,
        #[arg(long)]
        seconds: f64,
        #[arg(long)]
        source: Vec<IpAddr>,
    },
}

fn main() -> Result<()> {
    weir_testbed::raise_nofile_limit(20_000);
    match Cli::parse().mode {
        Mode::Ws { plan, threads } => {
            let plan: Plan = serde_json::from_str(&plan).context("parsing --plan")?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads.max(1))
                .enable_all()
                .build()?;
            let result = rt.block_on(weir_bench::load::run(plan))?;
            println!("{}", serde_json::to_string(&result)?);
        }
        Mode::TcpBulk {
            target,
            streams,
            seconds,
            source,
        } => {
            let r = bulk(target, streams, Duration::from_secs_f64(seconds), &source)?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Mode::TcpConns {
            target,
            concurrency,
            seconds,
            source,
        } => {
            let r = conns(
                target,
                concurrency,
                Duration::from_secs_f64(seconds),
                &source,
            )?;
            println!("{}", serde_json::to_string(&r)?);
        }
    }
    Ok(())
}
