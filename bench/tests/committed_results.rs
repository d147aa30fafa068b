//! The committed results of a full run (`bench/results/2026-12-06-*`) still
//! parse, and rendering them again gives the committed report and charts
//! byte for byte: a change to the result files, the report or the charts
//! shows up here, not in the next bench run.

use std::path::{Path, PathBuf};

use weir_bench::catalog::{self, ScenarioResult};

const STEM: &str = "2026-12-06";
/// The scenarios that run had; scenarios added since have no file of it.
const SCENARIOS: [&str; 11] = [
    "steady",
    "push",
    "idle",
    "bigconn",
    "connrate",
    "storm",
    "churn",
    "propagate",
    "drain",
    "l4",
    "micro",
];

fn results_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("results")
}

fn committed() -> Vec<ScenarioResult> {
    SCENARIOS
        .iter()
        .map(|name| {
            assert!(catalog::find(name).is_some(), "{name} is not a scenario");
            let path = results_dir().join(format!("{STEM}-{name}.json"));
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|err| panic!("reading {}: {err}", path.display()));
            serde_json::from_str(&text)
                .unwrap_or_else(|err| panic!("parsing {}: {err}", path.display()))
        })
        .collect()
}

/// Removes the test's directory even when an assertion fails.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn every_committed_file_parses_complete() {
    for r in committed() {
        assert!(
            catalog::ALL.iter().any(|e| e.has_rows(&r)),
            "{} has no rows",
            r.scenario
        );
        assert_eq!(catalog::check(&r), Vec::<String>::new(), "{}", r.scenario);
    }
}

#[test]
fn report_renders_as_committed() {
    let md = weir_bench::report::markdown(&committed(), STEM);
    let want = std::fs::read_to_string(results_dir().join(format!("{STEM}-report.md"))).unwrap();
    assert!(
        md == want,
        "the report differs from the committed one:\n{md}"
    );
}

#[test]
fn charts_render_as_committed() {
    let dir =
        TempDir(std::env::temp_dir().join(format!("weir-bench-committed-{}", std::process::id())));
    let written = weir_bench::plot::write_svgs(&committed(), &dir.0, STEM).unwrap();
    assert_eq!(written.len(), 7, "{written:?}");
    for path in written {
        let name = path.file_name().unwrap();
        let svg = std::fs::read(&path).unwrap();
        let want = std::fs::read(results_dir().join(name)).unwrap();
        assert!(
            svg == want,
            "{} differs from the committed one",
            name.display()
        );
    }
}
