//! Micro-benchmarks of the L4 path alone (see [`weir_bench::micro`]):
//! prints a table and writes bench/results/<date>-l4-micro.json. `cargo
//! xtask bench` runs the same measurements as its `micro` scenario.

use anyhow::Result;
use clap::Parser;
use weir_bench::micro::{self, Params};

#[derive(Parser)]
struct Args {
    /// Timed runs per measurement.
    #[arg(long, default_value_t = 100_000)]
    runs: u32,
    /// Rounds of the XDP measurements (the machine drifts between rounds;
    /// every round is reported).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Flows in the table before the full-table timings.
    #[arg(long, default_value_t = 100_000)]
    table_flows: u32,
    /// Repetitions of each `weir backend set` timing (median reported).
    #[arg(long, default_value_t = 5)]
    set_repeats: usize,
    /// Where to write the JSON result (default bench/results/<date>-l4-micro.json).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let params = Params {
        runs: args.runs,
        rounds: args.rounds,
        table_flows: args.table_flows,
        set_repeats: args.set_repeats,
    };
    let report = micro::run(&params, |line| eprintln!("{line}"))?;
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
