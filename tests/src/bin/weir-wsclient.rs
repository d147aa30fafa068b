//! weir-wsclient: opens N WebSocket connections, has each send a text message
//! every interval and check the echo, closes them with code 1000, and prints
//! one JSON report (see `weir_testbed::wsload::LoadReport`) on stdout.
//! Progress goes to stderr.

use std::time::Duration;

use clap::Parser;
use weir_testbed::wsload::{self, LoadConfig};

fn main() {
    let cfg = LoadConfig::parse();
    if cfg.fleet.duration > Duration::from_secs(24 * 3600) {
        eprintln!("weir-wsclient: --duration-secs must be at most 86400");
        std::process::exit(2);
    }
    if cfg.fleet.connections > 19_000 {
        eprintln!("weir-wsclient: --connections must be at most 19000 (open-file limit)");
        std::process::exit(2);
    }
    let have = weir_testbed::raise_nofile_limit(cfg.fleet.connections as u64 + 256);
    if (have as usize) < cfg.fleet.connections + 32 {
        eprintln!(
            "weir-wsclient: warning: open-file limit {have} is low for {} connections",
            cfg.fleet.connections
        );
    }

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
