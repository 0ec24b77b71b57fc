//! `fedcmp-fuzz`: longer fuzzing runs than CI's smoke run, on the stable
//! toolchain, with a table of what each target ran and found.
//!
//! ```text
//! cargo run --release -p fedcmp-fuzz -- --seconds 600            # every target, 10 min each
//! cargo run --release -p fedcmp-fuzz -- --target gguf --runs 1000000
//! cargo run --release -p fedcmp-fuzz -- --target gguf --reproduce crash.bin
//! cargo run --release -p fedcmp-fuzz -- --write-seeds fuzz/corpus  # libFuzzer corpora
//! ```
//!
//! Exit codes: 0 nothing found, 1 a panic found (inputs kept under
//! `--findings`), 3 a hang (the input named on stderr), and an abort
//! ("memory allocation of N bytes failed") when a run allocated past the
//! bound (the input is the target's file in the scratch folder, printed
//! at the start).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fedcmp_fuzz::engine::{fuzz, Limits, Report};
use fedcmp_fuzz::targets::{target, Seeds, TARGETS};

#[derive(Debug, Parser)]
#[command(
    name = "fedcmp-fuzz",
    about = "Fuzz fedcmp's decoders of untrusted bytes"
)]
struct Args {
    /// Fuzz only this target (default: all; `--list` names them).
    #[arg(long)]
    target: Option<String>,
    /// List the targets and exit.
    #[arg(long)]
    list: bool,
    /// Seconds per target.
    #[arg(long)]
    seconds: Option<u64>,
    /// Runs per target (with --seconds: whichever comes first).
    #[arg(long)]
    runs: Option<u64>,
    /// Seed of the mutations (a run is reproducible from it).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest input, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_len: usize,
    /// A run longer than this many seconds is a hang.
    #[arg(long, default_value_t = 5)]
    timeout: u64,
    /// Bytes a run may allocate beyond what it started with, in MiB.
    #[arg(long, default_value_t = 256)]
    alloc_mib: usize,
    /// Where inputs that panicked are kept.
    #[arg(long, default_value = "fuzz-findings")]
    findings: PathBuf,
    /// Run the target once on this input and print its verdict.
    #[arg(long)]
    reproduce: Option<PathBuf>,
    /// Write every target's seeds and regression inputs to DIR/<target>/
    /// (libFuzzer's starting corpora) and exit.
    #[arg(long, value_name = "DIR")]
    write_seeds: Option<PathBuf>,
}

fn main() -> ExitCode {
    // Candle captures a backtrace for every error when RUST_BACKTRACE is
    // set (and its pickle reader prints them): slow, and noise here.
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
    match run(&Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    if args.list {
        for t in TARGETS {
            println!("{:<14} {}", t.name, t.about);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let chosen: Vec<_> = match &args.target {
        Some(name) => vec![target(name).with_context(|| {
            let names: Vec<_> = TARGETS.iter().map(|t| t.name).collect();
            format!("no target {name:?} (targets: {})", names.join(", "))
        })?],
        None => TARGETS.iter().collect(),
    };
    let scratch = tempfile::Builder::new().prefix("fedcmp-fuzz-").tempdir()?;
    let seeds = Seeds::generate(scratch.path())?;
    if let Some(dir) = &args.write_seeds {
        for t in &chosen {
            let folder = dir.join(t.name);
            std::fs::create_dir_all(&folder)?;
            let inputs = seeds.of(t.name).iter().chain(seeds.regressions(t.name));
            for (i, input) in inputs.enumerate() {
                std::fs::write(folder.join(format!("seed-{i:03}")), input)?;
            }
        }
        println!("seeds written under {}", dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(input) = &args.reproduce {
        let bytes = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
        for t in &chosen {
            match t.run(scratch.path(), &bytes) {
                Ok(()) => println!("{}: accepted", t.name),
                Err(e) => println!("{}: refused: {e}", t.name),
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let limits = Limits {
        runs: args.runs,
        time: args.seconds.map(Duration::from_secs),
        max_len: args.max_len,
        timeout: Duration::from_secs(args.timeout),
        alloc_bound: args.alloc_mib << 20,
        seed: args.seed,
        findings: args.findings.clone(),
    };
    anyhow::ensure!(
        limits.runs.is_some() || limits.time.is_some(),
        "give --seconds or --runs"
    );
    eprintln!(
        "inputs are written to {} before each run: after an abort or a hang, the target's \
         file there is the input",
        scratch.path().display()
    );
    println!("{}", Report::HEADER);
    let mut found = 0;
    for t in chosen {
        let report = fuzz(
            t,
            seeds.of(t.name),
            seeds.regressions(t.name),
            scratch.path(),
            &limits,
        )?;
        println!("{}", report.row());
        for problem in report.problems() {
            eprintln!("  {problem}");
        }
        found += report.findings.len();
    }
    Ok(if found == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
