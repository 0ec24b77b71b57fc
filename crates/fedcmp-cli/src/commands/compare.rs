//! `fedcmp compare`: methods x scenarios under the fair tuning protocol
//! (the library's `compare` module runs it), and its report: test caption
//! NLL, recovery of the centralized gain, calibrated zero-shot accuracy
//! and captions that name their class as mean ± std over seeds (best
//! federated method in bold), chosen
//! settings, failed runs, captions, `results.json`, and PNG plots of the
//! validation curves and the interference diagnostics.

use crate::exit::BadFlags;
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Args, Parser};
use fedcmp_assets::cache_root;
use fedcmp_data::scenario::built_in_names;
use fedcmp_experiment::compare::{
    self, Cell, Comparison, Method, Plan, PER_CELL_KEYS, TUNING_SEED,
};
use fedcmp_experiment::files::write_atomic;
use fedcmp_experiment::settings::RunOptions;
use fedcmp_experiment::RunSettings;
use fedcmp_runtime::suite::SuiteConfig;

use fedcmp_experiment::compare::stats::paired_difference;
use fedcmp_experiment::compare::summary::{Measure, Summary};

use super::report::markdown_table;
use crate::args::{layers, RecipeArgs};
use crate::progress::Progress;

#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// Read the recipe from this TOML settings file (scenario, training,
    /// strategy, seed and out are set per cell and refused there).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Scenarios: built-in names or TOML files, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = built_in_names().into_iter().map(String::from).collect::<Vec<_>>())]
    pub scenarios: Vec<String>,
    /// Methods: strategy names, `centralized`, `local-only`, `init`, or the
    /// candidate rules `fedavgm-ema`, `cra-temporal`,
    /// `fed-cmp-ema-temporal` (docs/ALGORITHMS-NOTES.md), comma-separated
    /// [default: every strategy and reference, no candidate].
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    /// Seeds per method (mean and spread are over these).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Settings per method in the tuning grid (1 to 4): the shared server
    /// lrs 1, 0.1, 0.3, 2 (the adaptive optimisers: eta and tau).
    #[arg(long, default_value_t = 4)]
    pub grid: usize,
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Labelled test images per domain scored against every class prompt.
    #[arg(long, default_value_t = 100)]
    pub zero_shot_images: usize,
    /// Test images per domain captioned greedily and checked for their
    /// class's name.
    #[arg(long, default_value_t = 20)]
    pub caption_checks: usize,
    /// Of those, captions shown in the report.
    #[arg(long, default_value_t = 4)]
    pub caption_examples: usize,
    /// Output folder (cells, report, plots); reused to resume.
    #[arg(long, default_value = "runs/compare")]
    pub out: PathBuf,
    /// Skip the PNG plots (they need the DejaVu font asset).
    #[arg(long)]
    pub no_plots: bool,
    /// Methods trained at the same time, each with a share of the cores (1:
    /// one after another, each using every core; more pays on machines
    /// where one run cannot use all cores).
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// Start from the plain defaults (varied captions, no separator, the
    /// encoder's whole grid of visual tokens) instead of the research
    /// recipe (content captions after a newline, one visual token) that
    /// the main job and docs/RESULTS.md use.
    #[arg(long)]
    pub plain_recipe: bool,
}

/// `fedcmp main`: the main job with more seeds or another folder.
#[derive(Debug, Clone, Args)]
pub struct MainArgs {
    /// Paired seeds (the main job runs one; 3 is the full headline).
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Output folder; the same folder resumes, and more seeds there reuse
    /// the cells of the first ones.
    #[arg(long, default_value = "runs/main")]
    pub out: PathBuf,
}

impl MainArgs {
    /// The comparison these flags ask for.
    pub fn compare(&self) -> CompareArgs {
        CompareArgs {
            seeds: self.seeds,
            out: self.out.clone(),
            ..CompareArgs::main_job()
        }
    }
}

impl CompareArgs {
    /// The main job (`fedcmp` with no subcommand), the headline of
    /// ALGORITHMS.md §7: the S3 domain-silos scenario on the real offline
    /// assets (8 clients, 2,040 training samples), FedAvg, FedAvgM and
    /// Fed-CMP next to the untrained projector and the centralized
    /// reference, at the research recipe (one visual token, content
    /// captions after a newline) and the default steps-parity recipe
    /// (every client 8 local steps of 2 pairs per round, the round's
    /// clients through the decoder together: 16 merges and 128 sequential
    /// steps, like the centralized reference's 128 steps of 16 pairs),
    /// every federated method at server lr 1 (a grid of one: no tuning
    /// run), one seed: what fits in 15 minutes here. The same as `fedcmp
    /// compare --scenarios domain-silos --methods
    /// init,fedavg,fedavgm,fed-cmp,centralized --seeds 1 --grid 1 --out
    /// runs/main` (compare's defaults are the research recipe, validation
    /// every 4 rounds), so `fedcmp compare --out runs/main` with more
    /// methods or a larger grid reuses the main job's cells.
    pub fn main_job() -> Self {
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: CompareArgs,
        }
        Wrapper::parse_from([
            "fedcmp",
            "--scenarios",
            "domain-silos",
            "--methods",
            "init,fedavg,fedavgm,fed-cmp,centralized",
            "--seeds",
            "1",
            "--grid",
            "1",
            "--out",
            "runs/main",
        ])
        .args
    }

    fn suite(&self) -> SuiteConfig {
        SuiteConfig {
            zero_shot_per_domain: self.zero_shot_images,
            caption_checks: self.caption_checks,
            caption_examples: self.caption_examples,
            ..SuiteConfig::default()
        }
    }

    /// The run settings every cell starts from, and the plan.
    fn resolve(&self) -> Result<(RunSettings, Plan)> {
        let (what, base) = if self.plain_recipe {
            ("compare's plain default", RunOptions::default())
        } else {
            (
                "compare's default (the research recipe)",
                fedcmp_experiment::settings::research_recipe(),
            )
        };
        // Validation every 4 rounds: a curve of 4 points over the parity
        // recipe's 16 merges, at a quarter of the cost of every round.
        let defaults = RunOptions {
            eval_every: Some(4),
            ..base
        };
        let layers = layers(
            Some((what, defaults)),
            self.config.as_deref(),
            &self.recipe.options(),
        )?;
        layers.refuse(&PER_CELL_KEYS, "compare sets it for every cell")?;
        let template = RunSettings::resolve(&layers)?;
        let methods = if self.methods.is_empty() {
            Method::all()
        } else {
            self.methods
                .iter()
                .map(|m| Method::parse(m))
                .collect::<fedcmp_experiment::Result<_>>()?
        };
        let plan = Plan {
            scenarios: self.scenarios.clone(),
            methods,
            seeds: NonZeroU64::new(self.seeds)
                .ok_or_else(|| BadFlags("--seeds must be at least 1".into()))?,
            grid: self.grid,
            jobs: NonZeroUsize::new(self.jobs)
                .ok_or_else(|| BadFlags("--jobs must be at least 1".into()))?,
            suite: self.suite(),
            out: self.out.clone(),
        };
        plan.validate()?;
        Ok((template, plan))
    }
}

pub fn run(cache_dir: Option<PathBuf>, args: &CompareArgs) -> Result<()> {
    let (template, plan) = args.resolve()?;
    let root = cache_root(cache_dir)?;
    let progress = Progress::default();
    let comparison = compare::run(&root, &template, &plan, &progress)?;
    progress.finish();
    write_report(&root, args, &template, &plan, &comparison)?;
    print!("{}", summary_table(&comparison.reported, &plan.methods));
    for (scenario, report) in &comparison.skipped {
        if report.total() > 0 {
            println!("scenario {scenario}: {report}");
        }
    }
    println!(
        "{} cells; the full report (report.md), every number (results.json) and plots are in {}",
        comparison.reported.len(),
        plan.out.display()
    );
    Ok(())
}

fn write_report(
    root: &Path,
    args: &CompareArgs,
    template: &RunSettings,
    plan: &Plan,
    comparison: &Comparison,
) -> Result<()> {
    let cells = &comparison.reported;
    let minutes = comparison.minutes;
    let skipped = &comparison.skipped;
    let recipe = &template.recipe;
    let summary = Summary { cells };
    let scenarios = summary.scenarios();
    let methods = summary.methods(&plan.methods);
    let federated = |m: &str| Method::parse(m).is_ok_and(|m| !m.is_reference());
    let mut md = format!(
        "# Comparison\n\nScenarios: {}. Seeds: {}. Grid: {} setting(s) per method, chosen on \
         validation NLL with the tuning seed {TUNING_SEED} (never reported; no tuning run \
         with one setting). Recipe: {} local steps x batch {} per client (the centralized \
         reference: batch {} x the clients of a round, the same number of sequential steps), \
         peak lr {}, {}. \
         Source cap: {}. Took {minutes:.1} min for the cells run in this \
         invocation.\n\nBest federated method per scenario in bold (references never are).\n",
        scenarios.join(", "),
        plan.seeds,
        plan.grid,
        recipe.local_steps,
        recipe.batch_size,
        recipe.batch_size,
        recipe.lr,
        recipe
            .rounds
            .map_or("one pass over every shard".to_string(), |r| format!(
                "{r} rounds"
            )),
        template
            .data
            .limit
            .map_or("none".to_string(), |l| format!("{l} records")),
    );
    for measure in Measure::ALL {
        md.push_str(&format!("\n## {}\n\n", measure.title()));
        md.push_str(&markdown_table(&summary, measure, &methods));
    }
    md.push_str(&super::report::paired_section(&summary, &methods));
    md.push_str(&super::report::merges_table(
        &summary,
        &methods,
        recipe.local_steps.get(),
    ));
    let methods: Vec<String> = methods.iter().map(|m| m.name().to_string()).collect();
    md.push_str("\n## Chosen settings (validation NLL at the tuning seed)\n\n| scenario | method | setting |\n|---|---|---|\n");
    for s in &scenarios {
        for m in methods.iter().filter(|m| federated(m)) {
            if let Some(c) = cells.iter().find(|c| &c.scenario == s && &c.method == m) {
                md.push_str(&format!("| {s} | {m} | `{}` |\n", setting_text(c)));
            }
        }
    }
    let tuning: Vec<&Cell> = comparison
        .tuning
        .iter()
        .filter(|c| scenarios.contains(&c.scenario))
        .collect();
    if !tuning.is_empty() {
        md.push_str(
            "\n## Tuning (validation NLL at the tuning seed per setting; the chosen one in bold)\n\n\
             | scenario | method | setting | validation NLL |\n|---|---|---|---|\n",
        );
        for c in &tuning {
            let chosen = cells.iter().any(|r| {
                r.scenario == c.scenario && r.method == c.method && r.setting == c.setting
            });
            let nll = match &c.error {
                Some(e) => format!("failed: {}", cell_text(e)),
                None if chosen => format!("**{:.4}**", c.val_nll),
                None => format!("{:.4}", c.val_nll),
            };
            md.push_str(&format!(
                "| {} | {} | `{}` | {nll} |\n",
                c.scenario,
                c.method,
                setting_text(c)
            ));
        }
    }
    let failed: Vec<&Cell> = comparison
        .failed
        .iter()
        .filter(|c| scenarios.contains(&c.scenario))
        .collect();
    if !failed.is_empty() {
        md.push_str("\n## Failed runs (recorded, left out of the tables)\n\n| scenario | method | setting | seed | error |\n|---|---|---|---|---|\n");
        for c in &failed {
            let error = cell_text(c.error.as_deref().unwrap_or(""));
            md.push_str(&format!(
                "| {} | {} | {} | {} | {error} |\n",
                c.scenario, c.method, c.setting, c.seed
            ));
        }
    }
    for (scenario, report) in skipped.iter().filter(|(_, r)| r.total() > 0) {
        md.push_str(&format!(
            "\n## Skipped records: {scenario}\n\n```text\n{report}\n```\n"
        ));
    }
    md.push_str("\n## Captions (seed 0, first scenario)\n\n");
    if let Some(s) = scenarios.first() {
        for m in &methods {
            if let Some(c) = cells
                .iter()
                .find(|c| &c.scenario == s && &c.method == m && c.seed == 0)
            {
                for ex in c.suite.iter().flat_map(|r| &r.captions) {
                    md.push_str(&format!(
                        "- {m}, {} ({}): \"{}\" (reference: \"{}\")\n",
                        ex.id, ex.domain, ex.generated, ex.reference
                    ));
                }
            }
        }
    }
    write_atomic(&plan.out.join("report.md"), md.as_bytes())?;
    let json = serde_json::json!({ "settings": {
            "scenarios": scenarios, "methods": methods, "seeds": plan.seeds, "grid": plan.grid,
            "recipe": template.to_options(), "evaluation": plan.suite,
        }, "minutes": minutes, "skipped": skipped, "cells": cells, "tuning": tuning });
    write_atomic(
        &plan.out.join("results.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    if !args.no_plots {
        for s in &scenarios {
            let curves = summary.curves(s, &plan.methods);
            super::plot::line_chart(
                root,
                &plan.out.join(format!("curves-{s}.png")),
                &format!("{s}: validation caption NLL (seed 0)"),
                "samples consumed",
                "NLL per token",
                &curves,
            )?;
            let diag = summary.interference(s, &plan.methods);
            super::plot::line_chart(
                root,
                &plan.out.join(format!("interference-{s}.png")),
                &format!("{s}: interference per round (seed 0)"),
                "round",
                "cosine / rho / e_k / shared share / gain / drift",
                &diag,
            )?;
        }
    }
    Ok(())
}

/// One line per scenario and method with every measure's mean over seeds;
/// then, per trained method, its paired differences (method - baseline,
/// 95% bootstrap interval over seeds x test items) in test NLL, zero-shot
/// accuracy and captions naming the class, to the untrained projector and
/// to FedAvg (Fed-CMP's also to FedAvgM); then a few greedy captions per
/// method (seed 0).
pub fn summary_table(cells: &[Cell], methods: &[Method]) -> String {
    let summary = Summary { cells };
    let mut out = format!("{:<14} {:<12}", "scenario", "method");
    for m in Measure::ALL {
        out.push_str(&format!(" {:>10}", m.label()));
    }
    out.push('\n');
    for s in summary.scenarios() {
        for m in summary.methods(methods) {
            out.push_str(&format!("{s:<14} {:<12}", m.name()));
            for measure in Measure::ALL {
                let digits = measure.digits();
                let value = summary
                    .mean(measure, &s, m)
                    .map_or("-".to_string(), |x| format!("{x:.digits$}"));
                out.push_str(&format!(" {value:>10}"));
            }
            out.push('\n');
        }
    }
    let mut differences = String::new();
    for s in summary.scenarios() {
        for m in summary.methods(methods) {
            if m == Method::Init {
                continue;
            }
            let mut against = vec![Method::Init];
            against.extend(super::report::baselines(m));
            for baseline in against {
                for (measure, digits) in [
                    (Measure::TestNll, 4),
                    (Measure::ZeroShot, 3),
                    (Measure::CaptionAccuracy, 3),
                ] {
                    if let Some(d) = paired_difference(cells, &s, measure, m, baseline, 0) {
                        differences.push_str(&format!(
                            "{s:<14} {:<12} vs {:<10} {:<10} {}\n",
                            m.name(),
                            baseline.name(),
                            measure.label(),
                            super::report::difference_text(&d, digits)
                        ));
                    }
                }
            }
        }
    }
    if !differences.is_empty() {
        out.push_str(
            "\npaired differences, method - baseline: mean over seeds [95% bootstrap interval \
             over seeds x test items]\n",
        );
        out.push_str(&differences);
    }
    let mut captions = String::new();
    for s in summary.scenarios() {
        for m in summary.methods(methods) {
            let examples = cells
                .iter()
                .find(|c| c.scenario == s && c.method == m.name() && c.seed == 0)
                .and_then(|c| c.suite.as_ref())
                .map(|r| r.captions.iter().take(CAPTIONS_PRINTED))
                .into_iter()
                .flatten();
            for ex in examples {
                captions.push_str(&format!(
                    "{s:<14} {:<12} {:<16} \"{}\" (reference: \"{}\")\n",
                    m.name(),
                    ex.domain,
                    ex.generated,
                    ex.reference
                ));
            }
        }
    }
    if !captions.is_empty() {
        out.push_str("\ngreedy captions of test images (seed 0)\n");
        out.push_str(&captions);
    }
    out
}

/// A cell's strategy as one line of JSON (empty for the references).
fn setting_text(c: &Cell) -> String {
    c.config
        .as_ref()
        .map(|x| serde_json::to_string(x).unwrap_or_default())
        .unwrap_or_default()
}

/// `text` fit for one markdown table cell.
fn cell_text(text: &str) -> String {
    text.replace('|', "/").replace('\n', " ")
}

/// Greedy captions printed per method after the table (the report has
/// them all).
const CAPTIONS_PRINTED: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;
    use fedcmp_data::templates::CaptionStyle;
    use fedcmp_experiment::settings::{ClientsPerPass, DEFAULT_LR};

    /// The main job is domain-silos at the research recipe and the
    /// steps-parity defaults, one seed, untuned; `fedcmp main` is the same
    /// comparison with its own seeds and folder (so `--seeds 3` resumes
    /// the one-seed job's folder).
    #[test]
    fn the_main_job_is_the_research_recipe_at_steps_parity() -> Result<()> {
        let job = CompareArgs::main_job();
        let (template, plan) = job.resolve()?;
        assert_eq!(plan.scenarios, ["domain-silos"]);
        assert_eq!(
            plan.methods.iter().map(|m| m.name()).collect::<Vec<_>>(),
            ["init", "fedavg", "fedavgm", "fed-cmp", "centralized"]
        );
        assert_eq!((plan.seeds.get(), plan.grid), (1, 1));
        let recipe = &template.recipe;
        assert_eq!((recipe.local_steps.get(), recipe.batch_size.get()), (8, 2));
        assert_eq!(recipe.lr, DEFAULT_LR);
        assert_eq!(template.data.captions, Some(CaptionStyle::Content));
        assert_eq!(template.data.caption_separator, "\n");
        assert_eq!(template.data.backbones.visual_tokens, Some(1));
        assert_eq!(template.protocol.clients_per_pass, ClientsPerPass::All);
        assert_eq!(template.protocol.eval_every.get(), 4);

        let three = MainArgs {
            seeds: 3,
            out: PathBuf::from("runs/main"),
        }
        .compare();
        let (same, plan3) = three.resolve()?;
        assert_eq!(same, template);
        assert_eq!((plan3.seeds.get(), &plan3.out), (3, &plan.out));
        // `compare` starts from the research recipe too, unless told not to.
        let plain = CompareArgs {
            plain_recipe: true,
            ..CompareArgs::main_job()
        };
        assert_eq!(plain.resolve()?.0.data.captions, None);
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: CompareArgs,
        }
        let (bare, bare_plan) = Wrapper::parse_from(["fedcmp"]).args.resolve()?;
        assert_eq!(bare, template, "`fedcmp compare` is the main job's recipe");
        assert_eq!(bare_plan.grid, 4);
        Ok(())
    }
}
