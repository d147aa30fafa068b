//! weir-wsclient: opens N WebSocket connections, has each send a text message
//! every interval and check the echo, closes them with code 1000, and prints
//! one JSON report (see `weir_testbed::wsload::LoadReport`) on stdout.
//! Progress goes to stderr.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use weir_testbed::wsload::{self, LoadConfig};

#[derive(Parser, Debug)]
#[command(name = "weir-wsclient", about = "WebSocket load client for weir tests")]
struct Args {
    /// ws://HOST:PORT/PATH
    #[arg(long)]
    url: String,
    /// Number of connections.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Seconds each connection talks (the upper bound with --hold-file).
    #[arg(long, default_value_t = 2)]
    duration_secs: u64,
    /// Milliseconds between messages on a connection.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Talk until this file exists (at most --duration-secs), then close.
    #[arg(long)]
    hold_file: Option<PathBuf>,
    /// Create this file once every connection attempt has finished.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Source address to bind; repeat to use several round-robin.
    #[arg(long = "source")]
    sources: Vec<IpAddr>,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// Milliseconds allowed for TCP connect + WebSocket handshake.
    #[arg(long, default_value_t = 5000)]
    connect_timeout_ms: u64,
    /// Milliseconds allowed for an echo to come back.
    #[arg(long, default_value_t = 5000)]
    echo_timeout_ms: u64,
    /// Milliseconds allowed for the close handshake.
    #[arg(long, default_value_t = 5000)]
    close_timeout_ms: u64,
    /// Padding bytes added to each message.
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
}

fn main() {
    let args = Args::parse();
    if args.duration_secs > 24 * 3600 {
        eprintln!("weir-wsclient: --duration-secs must be at most 86400");
        std::process::exit(2);
    }
    if args.connections > 19_000 {
        eprintln!("weir-wsclient: --connections must be at most 19000 (open-file limit)");
        std::process::exit(2);
    }
    let have = weir_testbed::raise_nofile_limit(args.connections as u64 + 256);
    if (have as usize) < args.connections + 32 {
        eprintln!(
            "weir-wsclient: warning: open-file limit {have} is low for {} connections",
            args.connections
        );
    }
    let cfg = LoadConfig {
        url: args.url,
        connections: args.connections,
        duration: Duration::from_secs(args.duration_secs),
        interval: Duration::from_millis(args.interval_ms.max(1)),
        hold_file: args.hold_file,
        ready_file: args.ready_file,
        sources: args.sources,
        connect_concurrency: args.concurrency.max(1),
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        echo_timeout: Duration::from_millis(args.echo_timeout_ms),
        close_timeout: Duration::from_millis(args.close_timeout_ms),
        payload_bytes: args.payload_bytes,
        progress: !args.quiet,
    };

    // Last-resort guard: the async code ends by hard_limit; this ends the
    // process a little later if something is stuck anyway.
    let guard = cfg.hard_limit() + Duration::from_secs(10);
    std::thread::spawn(move || {
        std::thread::sleep(guard);
        eprintln!("weir-wsclient: watchdog: still running after {guard:?}; exiting");
        std::process::exit(3);
    });

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weir-wsclient: cannot start runtime: {e}");
            std::process::exit(1);
        }
    };
    let report = match rt.block_on(wsload::run(cfg)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weir-wsclient: {e:#}");
            std::process::exit(1);
        }
    };
    rt.shutdown_timeout(Duration::from_millis(100));
    let s = &report.summary;
    eprintln!(
        "weir-wsclient: connected {} failed {} broken {} sent {} echoed {} per_backend {:?}",
        s.connected, s.failed, s.broken, s.messages_sent, s.messages_echoed, s.per_backend
    );
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let written = serde_json::to_writer(&mut out, &report)
        .map_err(std::io::Error::other)
        .and_then(|()| writeln!(out))
        .and_then(|()| out.flush());
    if let Err(e) = written {
        eprintln!("weir-wsclient: writing report: {e}");
        std::process::exit(1);
    }
}
