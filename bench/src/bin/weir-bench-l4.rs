//! Micro-benchmarks of the L4 path alone (see [`weir_bench::micro`]):
//! prints a table and writes bench/results/<date>-l4-micro.json. `cargo
//! xtask bench` runs the same measurements as its `micro` scenario.

use anyhow::Result;
use clap::Parser;
use weir_bench::micro::{self, Params};

/// Times the XDP program per packet against a bare XDP_TX floor, and
/// `weir backend set` with 1, 100 and 10,000 backends.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    params: Params,
    /// Where to write the JSON result (default bench/results/<date>-l4-micro.json).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let report = micro::run(&args.params, |line| eprintln!("{line}"))?;
    micro::print_table(&report);
    let out = args.out.unwrap_or_else(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
        root.join(format!("{}-l4-micro.json", &report.date[..10]))
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
