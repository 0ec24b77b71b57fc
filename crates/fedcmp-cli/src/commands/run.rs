//! `fedcmp run`: one run of a scenario (federated, centralized or
//! local-only) in its run folder, resumable; and `fedcmp show-config`,
//! the settings it would use.

use std::path::PathBuf;

use anyhow::Result;
use fedcmp_assets::cache_root;
use fedcmp_experiment::run_folder::{self, Measured, TrainedReport};
use fedcmp_experiment::RunSettings;

use super::report::print_suite;
use crate::args::{layers, RunArgs};
use crate::progress::Progress;

fn resolve(args: &RunArgs) -> Result<(RunSettings, fedcmp_experiment::Layers)> {
    let layers = layers(None, args.config.as_deref(), &args.options())?;
    Ok((RunSettings::resolve(&layers)?, layers))
}

/// `fedcmp show-config`: the resolved settings as a settings file, with
/// where each value that is not a default came from.
pub fn show_config(args: &RunArgs) -> Result<()> {
    let (settings, layers) = resolve(args)?;
    print!("{}", settings.to_toml()?);
    let origins = RunSettings::origins(&layers);
    if !origins.is_empty() {
        println!("\n# set by (every other value is a default):");
        for (key, origin) in origins {
            println!("#   {key:<17} {origin}");
        }
    }
    Ok(())
}

/// `fedcmp probe`: the linear probe of every labelled domain of the
/// scenario the flags describe.
pub fn probe(cache_dir: Option<PathBuf>, args: &RunArgs) -> Result<()> {
    let (settings, _) = resolve(args)?;
    let root = cache_root(cache_dir)?;
    let progress = Progress::default();
    let experiment = fedcmp_experiment::Experiment::assemble(
        &root,
        &settings.data,
        fedcmp_runtime::suite::SuiteConfig::default(),
        &progress,
    )?;
    let report = fedcmp_experiment::probe::linear_probe(&experiment)?;
    progress.finish();
    println!(
        "{:<16} {:>7} {:>6} {:>6} {:>8} {:>10} {:>9}",
        "domain", "classes", "train", "test", "l2", "validation", "test acc."
    );
    for d in &report.domains {
        println!(
            "{:<16} {:>7} {:>6} {:>6} {:>8.0e} {:>10.3} {:>9.3}",
            d.domain, d.classes, d.train, d.test, d.l2, d.validation_accuracy, d.test_accuracy
        );
    }
    println!("{:<16} {:>51.3}", "macro average", report.macro_accuracy);
    Ok(())
}

pub fn run(cache_dir: Option<PathBuf>, args: &RunArgs) -> Result<()> {
    let (settings, _) = resolve(args)?;
    let root = cache_root(cache_dir)?;
    let progress = Progress::default();
    let report = run_folder::run(&root, &settings, args.fresh, &progress)?;
    progress.finish();
    match &report.measured {
        Measured::Trained(r) => print_trained(r),
        Measured::LocalOnly(r) => {
            println!(
                "{:>8} {:>8} {:>12} {:>10}",
                "client", "samples", "validation", "test"
            );
            for c in &r.clients {
                println!(
                    "{:>8} {:>8} {:>12.4} {:>10.4}",
                    c.client, c.samples, c.validation_nll, c.test_nll
                );
            }
            println!(
                "{:>8} {:>8} {:>12.4} {:>10.4}",
                "mean", "", r.validation_nll_mean, r.test_nll_mean
            );
        }
    }
    println!("run folder: {}", report.folder.dir.display());
    Ok(())
}

fn print_trained(r: &TrainedReport) {
    println!(
        "{} rounds ({:?}), {} samples in total; this session took {:.0} s",
        r.rounds, r.stop, r.samples_total, r.seconds
    );
    let f = &r.failures;
    if f.dropped + f.errors + f.timeouts > 0 {
        println!(
            "client failures: {} dropped, {} errors, {} timeouts (per round in metrics.jsonl); \
             retired: {:?}",
            f.dropped, f.errors, f.timeouts, r.retired
        );
    }
    println!("{:>14} {:>10} {:>10}", "caption NLL", "init", "final");
    println!(
        "{:>14} {:>10.4} {:>10.4}",
        "validation", r.validation_nll.init, r.validation_nll.r#final
    );
    println!(
        "{:>14} {:>10.4} {:>10.4}",
        "test", r.test_nll.init, r.test_nll.r#final
    );
    print_suite(&[("init", &r.suite.init), ("final", &r.suite.r#final)]);
    println!(
        "every client consumed its shard once: {}",
        if r.one_pass_complete {
            "yes"
        } else {
            "no (stopped early)"
        }
    );
}
