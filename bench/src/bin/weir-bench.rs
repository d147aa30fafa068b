//! weir-bench: runs the scenarios (all by default) for weir, HAProxy and
//! nginx on one namespace topology (`steady` also on loopback) and writes,
//! per scenario,
//! `<out>/<date>[-quick]-<scenario>.json`, plus a Markdown report and SVG
//! plots. `cargo xtask bench [SCENARIO...] [--quick]` builds and runs it.

use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use weir_bench::catalog::{self, ScenarioResult};
use weir_bench::stage::{self, Bench, Sizes};

#[derive(Parser)]
#[command(
    name = "weir-bench",
    about = "weir against HAProxy and nginx, side by side"
)]
struct Args {
    /// Scenarios to run (steady, push, idle, bigconn, connrate, storm,
    /// churn, propagate, discover, drain, failure, upgrade, l4, micro); all
    /// if none.
    scenarios: Vec<String>,
    /// Small sizes (idle: 10k only, short phases): every scenario in a few
    /// minutes; completeness and sanity are checked, not speed.
    #[arg(long)]
    quick: bool,
    /// Where results go.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        weir_testbed::is_root(),
        "run as root: the bench builds network namespaces and attaches XDP"
    );
    for (prog, pkg) in [
        ("/usr/sbin/haproxy", "haproxy"),
        ("/usr/sbin/nginx", "nginx-light"),
    ] {
        if !std::path::Path::new(prog).exists() {
            bail!("{prog} is missing: install the Debian package {pkg} (cargo xtask bench does)");
        }
    }
    let scenarios: Vec<&catalog::Entry> = if args.scenarios.is_empty() {
        catalog::ALL.iter().collect()
    } else {
        let known: Vec<&str> = catalog::ALL.iter().map(|e| e.name).collect();
        args.scenarios
            .iter()
            .map(|s| {
                catalog::find(s)
                    .with_context(|| format!("unknown scenario {s:?}; known: {}", known.join(", ")))
            })
            .collect::<Result<_>>()?
    };
    weir_testbed::raise_nofile_limit(20_000);
    weir_testbed::topology::install_signal_cleanup();
    let sizes = Sizes::new(args.quick);
    let info = stage::run_info(args.quick, sizes.workers);
    let out_dir = args
        .out
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let stem = format!(
        "{}{}",
        &info.date[..10],
        if args.quick { "-quick" } else { "" }
    );

    let mut bench = Bench::new(sizes, info)?;
    let mut results: Vec<ScenarioResult> = Vec::new();
    let mut failures = Vec::new();
    for s in scenarios {
        match s.run(&mut bench) {
            Ok(r) => {
                let path = out_dir.join(format!("{stem}-{}.json", s.name));
                std::fs::write(&path, serde_json::to_string_pretty(&r)? + "\n")?;
                eprintln!("wrote {}", path.display());
                failures.extend(catalog::check(&r));
                results.push(r);
            }
            Err(e) => failures.push(format!("{}: {e:#}", s.name)),
        }
    }
    bench.finish()?;

    let md = weir_bench::report::markdown(&results, &stem);
    let md_path = out_dir.join(format!("{stem}-report.md"));
    std::fs::write(&md_path, &md)?;
    let svgs = weir_bench::plot::write_svgs(&results, &out_dir, &stem)?;
    println!("{md}");
    eprintln!("wrote {}", md_path.display());
    for f in svgs {
        eprintln!("wrote {}", f.display());
    }
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("FAILED: {f}");
        }
        bail!("{} check(s) failed", failures.len());
    }
    Ok(())
}
