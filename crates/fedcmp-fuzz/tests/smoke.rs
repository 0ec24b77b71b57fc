//! The CI smoke run: every target fuzzed for a fixed number of runs from
//! its seeds (deterministic mutations), under the run-time and allocation
//! bounds of [`Limits::smoke`]. Passes when no run panicked, hung or
//! allocated past the bound, and every seed is accepted (a seed the
//! decoder refuses would make the mutations start from an error path).
//!
//! Inputs of past findings (`regressions/<target>/`) run first, every time.
//!
//! On an abort (allocation past the bound) or a hang, the input is
//! `target/fuzz-smoke/scratch/<the target's file>`; panicking inputs are
//! kept in `target/fuzz-smoke/findings/`. Longer runs: see the README
//! (`cargo run --release -p fedcmp-fuzz -- --seconds 600`).

use std::path::PathBuf;

use fedcmp_fuzz::engine::{fuzz, Limits};
use fedcmp_fuzz::targets::{Seeds, TARGETS};

/// Runs per target; FEDCMP_FUZZ_RUNS overrides it.
const SMOKE_RUNS: u64 = 3000;

#[test]
fn every_decoder_survives_a_smoke_run() -> anyhow::Result<()> {
    // Candle captures a backtrace for every error under RUST_BACKTRACE:
    // slow, and its pickle reader prints them. (The only test here.)
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
    let runs = std::env::var("FEDCMP_FUZZ_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SMOKE_RUNS);
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-smoke");
    let scratch = root.join("scratch");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)?;
    }
    std::fs::create_dir_all(&scratch)?;
    let seeds = Seeds::generate(&scratch)?;
    let limits = Limits::smoke(runs, root.join("findings"));
    let mut failures = Vec::new();
    println!("{}", fedcmp_fuzz::engine::Report::HEADER);
    for target in TARGETS {
        let report = fuzz(
            target,
            seeds.of(target.name),
            seeds.regressions(target.name),
            &scratch,
            &limits,
        )?;
        println!("{}", report.row());
        failures.extend(report.problems());
    }
    anyhow::ensure!(failures.is_empty(), "findings:\n{}", failures.join("\n"));
    Ok(())
}
