//! The `fedcmp` command-line program: clap arguments -> typed settings ->
//! library calls (`fedcmp-experiment`); progress bars, tables, reports and
//! plots are rendered here and only here.
//!
//! With no subcommand it runs the main job: the S3 domain-silos scenario on
//! real backbones and images, FedAvg, FedAvgM and Fed-CMP side by side with
//! the untrained and centralized references (a `compare`, sized to fit 15
//! minutes on two cores).

mod args;
mod commands;
mod exit;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Federated pretraining of the cross-modal projector of multimodal LLMs.
#[derive(Debug, Parser)]
#[command(name = "fedcmp", version, about, long_about = None)]
struct Cli {
    /// Cache folder for fetched assets (default: $FEDCMP_CACHE_DIR, else ~/.cache/fedcmp).
    #[arg(long, global = true, env = "FEDCMP_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Log filter, e.g. `info`, `debug`, `fedcmp_model=trace` (also RUST_LOG).
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fetch, verify or list the registry-hosted weights and images.
    Assets {
        #[command(subcommand)]
        action: commands::assets::AssetsAction,
    },
    /// The federated scenarios: list them, or show how one deals its data.
    Scenario {
        #[command(subcommand)]
        action: commands::scenario::ScenarioAction,
    },
    /// One run of a scenario (simulation): federated with a strategy,
    /// centralized, or local-only; resumable.
    Run(Box<args::RunArgs>),
    /// Print the settings `run` would use with the same flags, config file
    /// and FEDCMP_* variables (a valid --config file).
    ShowConfig(Box<args::RunArgs>),
    /// Linear probe of the frozen vision features (as the projector sees
    /// them) on each labelled domain: the ceiling for zero-shot accuracy.
    Probe(Box<args::RunArgs>),
    /// Methods x scenarios with fair tuning, seeds, and a report (resumable).
    Compare(Box<commands::compare::CompareArgs>),
    /// The main job (what `fedcmp` runs with no subcommand), with more
    /// seeds or another folder: `fedcmp main --seeds 3` is the full
    /// headline (resumes the one-seed job's folder).
    Main(commands::compare::MainArgs),
    /// The counterfactual harness: records client updates of FedAvg runs,
    /// then scores aggregation rules on exactly those updates (resumable).
    Harness(Box<commands::harness::HarnessArgs>),
    /// Centralized alignment on Fashion-MNIST with template captions: a
    /// quick single-domain check of a decoder (any LLaMA-family GGUF file
    /// or Hugging Face folder).
    Align(commands::align::AlignArgs),
    /// Write a trained projector in the Hugging Face LLaVA and LLaVA
    /// layouts, with a sidecar naming the backbones it was aligned with.
    Export(Box<commands::export::ExportArgs>),
    /// Caption your own images with a trained projector (greedy or beam
    /// search).
    Caption(Box<commands::use_saved::CaptionArgs>),
    /// The evaluation suite (caption NLL, zero-shot accuracy, captions) of
    /// a trained projector on any scenario's test split.
    Eval(Box<commands::use_saved::EvalArgs>),
    /// Validation curves of run folders in one PNG (e.g. a pilot's
    /// variants), with each run's last value.
    Curves(commands::curves::CurvesArgs),
}

fn main() -> ExitCode {
    exit::quiet_error_backtraces();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let result = match cli.command {
        Some(Command::Assets { action }) => commands::assets::run(cli.cache_dir, action),
        Some(Command::Scenario { action }) => commands::scenario::run(cli.cache_dir, action),
        Some(Command::Run(args)) => commands::run::run(cli.cache_dir, &args),
        Some(Command::ShowConfig(args)) => commands::run::show_config(&args),
        Some(Command::Probe(args)) => commands::run::probe(cli.cache_dir, &args),
        Some(Command::Compare(args)) => commands::compare::run(cli.cache_dir, &args),
        Some(Command::Main(args)) => commands::compare::run(cli.cache_dir, &args.compare()),
        Some(Command::Harness(args)) => commands::harness::run(cli.cache_dir, &args),
        Some(Command::Align(args)) => commands::align::run(cli.cache_dir, &args),
        Some(Command::Export(args)) => commands::export::run(&args),
        Some(Command::Caption(args)) => commands::use_saved::caption(cli.cache_dir, &args),
        Some(Command::Eval(args)) => commands::use_saved::eval(cli.cache_dir, &args),
        Some(Command::Curves(args)) => commands::curves::run(cli.cache_dir, &args),
        None => commands::compare::run(cli.cache_dir, &commands::compare::CompareArgs::main_job()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => exit::report(&err),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every subcommand's flags are consistent (no flag defined twice, ...).
    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
