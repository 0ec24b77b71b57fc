//! `fedcmp curves`: the validation curves of several run folders in one
//! PNG (validation caption NLL against pairs consumed), and each run's
//! last value as a table: a pilot's variants side by side.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use fedcmp_assets::cache_root;
use fedcmp_experiment::run_folder::validation_curve;

#[derive(Debug, Clone, Args)]
pub struct CurvesArgs {
    /// Run folders (each with its metrics.jsonl).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// The PNG to write.
    #[arg(long, default_value = "curves.png")]
    pub out: PathBuf,
    /// The chart's title.
    #[arg(long, default_value = "validation caption NLL")]
    pub title: String,
}

/// A run's label: its folder's name, or its parent's where several runs
/// share a folder name (a pilot's variants each hold a run of the same
/// scenario, method and seed).
fn labels(runs: &[PathBuf]) -> Vec<String> {
    let name = |p: &PathBuf| {
        p.file_name()
            .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into())
    };
    let names: Vec<String> = runs.iter().map(name).collect();
    runs.iter()
        .zip(&names)
        .map(|(run, n)| {
            let shared = names.iter().filter(|m| *m == n).count() > 1;
            match run.parent().filter(|_| shared) {
                Some(parent) if parent.file_name().is_some() => name(&parent.to_path_buf()),
                _ => n.clone(),
            }
        })
        .collect()
}

pub fn run(cache_dir: Option<PathBuf>, args: &CurvesArgs) -> Result<()> {
    let mut series = Vec::with_capacity(args.runs.len());
    for (run, label) in args.runs.iter().zip(labels(&args.runs)) {
        let curve = validation_curve(run)?;
        if curve.is_empty() {
            bail!("{}: no validated round yet", run.display());
        }
        series.push((label, curve));
    }
    let width = series
        .iter()
        .map(|(l, _)| l.len())
        .max()
        .unwrap_or(0)
        .max(3);
    println!(
        "{:<width$} {:>8} {:>9} {:>7}",
        "run", "pairs", "val NLL", "points"
    );
    for (label, curve) in &series {
        if let Some((pairs, nll)) = curve.last() {
            println!("{label:<width$} {pairs:>8} {nll:>9.4} {:>7}", curve.len());
        }
    }
    let root = cache_root(cache_dir)?;
    let points: Vec<(String, Vec<(f64, f64)>)> = series
        .into_iter()
        .map(|(l, c)| (l, c.into_iter().map(|(x, y)| (x as f64, y)).collect()))
        .collect();
    super::plot::line_chart(
        &root,
        &args.out,
        &args.title,
        "pairs consumed",
        "NLL per token",
        &points,
    )?;
    println!("wrote {}", args.out.display());
    Ok(())
}
