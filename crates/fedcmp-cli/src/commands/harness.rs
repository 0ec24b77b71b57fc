//! `fedcmp harness`: the counterfactual harness of ALGORITHMS.md §7.7
//! (the library's `harness` module runs it) and its report: per scenario,
//! each rule's chosen server lr, mean validation NLL and paired difference
//! to FedAvg with its 95% interval; with `--replay` the same for every
//! rule on its own trajectory and where the two verdicts disagree;
//! `results.json`, `report.md` and a plot of each rule's NLL minus
//! FedAvg's per scored round (one per trajectory).

use crate::exit::BadFlags;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use fedcmp_assets::cache_root;
use fedcmp_experiment::compare::PER_CELL_KEYS;
use fedcmp_experiment::files::write_atomic;
use fedcmp_experiment::harness::{
    self, HarnessPlan, Rule, ScenarioResult, BASELINE, MOMENTUM_BASELINE,
};
use fedcmp_experiment::settings::RunOptions;
use fedcmp_experiment::RunSettings;

use super::report::difference_text;
use crate::args::{layers, RecipeArgs};
use crate::progress::Progress;

/// The recipe flags are `run`'s, with the research recipe as their
/// defaults (content captions after a newline, one visual token, the
/// steps-parity recipe's local steps, batch and peak lr) and `--rounds`
/// (default 8) the rounds recorded per seed.
#[derive(Debug, Clone, Args)]
pub struct HarnessArgs {
    /// Read the recipe from this TOML settings file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Scenarios: built-in names or TOML files, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "domain-silos")]
    pub scenarios: Vec<String>,
    /// Reported seeds (a FedAvg run is recorded for each, and one for the
    /// tuning seed).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Score every this many rounds (and the last).
    #[arg(long, default_value_t = 4)]
    pub score_every: u64,
    /// The server learning rates every rule searches, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = harness::SERVER_LRS.to_vec())]
    pub server_lrs: Vec<f64>,
    /// A rule as NAME=JSON (a strategy configuration), repeatable; one
    /// must be named `fedavg` [default: FedAvg, FedAvgM, CRA v1, each
    /// item of CRA v2 and their combinations with momentum].
    #[arg(long = "rule")]
    pub rules: Vec<String>,
    /// Also run every rule on its own trajectory for the recorded rounds
    /// (the same clients, dropouts and batches, training in the loop), so
    /// momentum rules are judged on the path they make; reports where the
    /// two verdicts disagree.
    #[arg(long)]
    pub replay: bool,
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Output folder (recorded rounds, scores, report); reused to resume.
    #[arg(long, default_value = "runs/harness")]
    pub out: PathBuf,
    /// Skip the PNG plot (it needs the DejaVu font asset).
    #[arg(long)]
    pub no_plots: bool,
}

impl HarnessArgs {
    fn resolve(&self) -> Result<(RunSettings, HarnessPlan)> {
        // The research recipe of the headline (ALGORITHMS.md §7.1-7.3).
        let defaults = RunOptions {
            // The rounds recorded per seed (`--rounds`).
            rounds: Some(8),
            ..fedcmp_experiment::settings::research_recipe()
        };
        let layers = layers(
            Some(("harness's default (the research recipe)", defaults)),
            self.config.as_deref(),
            &self.recipe.options(),
        )?;
        layers.refuse(&PER_CELL_KEYS, "the harness sets it for every recorded run")?;
        let template = RunSettings::resolve(&layers)?;
        let rules = if self.rules.is_empty() {
            harness::default_rules()?
        } else {
            self.rules
                .iter()
                .map(|r| Rule::parse(r))
                .collect::<fedcmp_experiment::Result<_>>()?
        };
        let plan = HarnessPlan {
            scenarios: self.scenarios.clone(),
            seeds: NonZeroU64::new(self.seeds)
                .ok_or_else(|| BadFlags("--seeds must be at least 1".into()))?,
            rounds: template.recipe.rounds.ok_or_else(|| {
                BadFlags("the harness records a fixed number of rounds (--rounds)".into())
            })?,
            score_every: NonZeroU64::new(self.score_every)
                .ok_or_else(|| BadFlags("--score-every must be at least 1".into()))?,
            server_lrs: self.server_lrs.clone(),
            rules,
            replay: self.replay,
            out: self.out.clone(),
        };
        plan.validate()?;
        Ok((template, plan))
    }
}

pub fn run(cache_dir: Option<PathBuf>, args: &HarnessArgs) -> Result<()> {
    let (template, plan) = args.resolve()?;
    let root = cache_root(cache_dir)?;
    let progress = Progress::default();
    let results = harness::run(&root, &template, &plan, &progress)?;
    progress.finish();
    let text = serde_json::to_vec_pretty(&results).context("encoding the results")?;
    std::fs::create_dir_all(&plan.out)
        .with_context(|| format!("creating {}", plan.out.display()))?;
    write_atomic(&plan.out.join("results.json"), &text)?;
    let mut md = String::from("# Counterfactual harness (ALGORITHMS.md §7.7)\n");
    for r in &results {
        md.push_str(&scenario_table(r));
        if !args.no_plots {
            let path = plan.out.join(format!("harness-{}.png", r.scenario));
            let title = format!("{}: each rule's one-step proposal vs FedAvg's", r.scenario);
            plot(&root, &r.rules, &title, &path)?;
            md.push_str(&format!("\n![{}]({})\n", r.scenario, path.display()));
            if !r.replay.is_empty() {
                let path = plan.out.join(format!("harness-{}-replay.png", r.scenario));
                let title = format!("{}: each rule on its own trajectory vs FedAvg", r.scenario);
                plot(&root, &r.replay, &title, &path)?;
                md.push_str(&format!("\n![{} replay]({})\n", r.scenario, path.display()));
            }
        }
    }
    write_atomic(&plan.out.join("report.md"), md.as_bytes())?;
    for r in &results {
        print!("{}", scenario_table(r));
    }
    println!(
        "\nThe report (report.md), every number (results.json) and the plots are in {}",
        plan.out.display()
    );
    Ok(())
}

/// One scenario's tables (markdown): the counterfactual, and with replay
/// the replay and where the two disagree.
pub fn scenario_table(r: &ScenarioResult) -> String {
    let starts: Vec<String> = r
        .start_nll
        .iter()
        .map(|(t, v)| format!("{t}: {v:.4}"))
        .collect();
    let mut md = format!(
        "\n## {} ({} seeds, {} recorded rounds, scored at rounds {:?}, {} validation pairs, {:.1} \
         min in this invocation)\n\nValidation NLL per token of each rule's proposal, macro over domains, mean over \
         seeds and scored rounds; a difference is rule - baseline (each at its chosen lr) with \
         a 95% bootstrap interval over seeds x items. Recorded start before each scored round (no step): {}.\n\n\
         {}",
        r.scenario,
        r.seeds,
        r.rounds,
        r.scored_rounds,
        r.validation_items,
        r.minutes,
        starts.join(", "),
        rules_table(&r.rules),
    );
    if !r.replay.is_empty() {
        md.push_str(&format!(
            "\nReplay: every rule on its own trajectory for the {} recorded rounds (the same \
             clients, dropouts and batches; its clients start from its own global model), \
             scored at the same rounds on the same items, server lr chosen on the tuning \
             seed on its own path.\n\n{}",
            r.rounds,
            rules_table(&r.replay)
        ));
        md.push_str(
            "\nVerdicts (validation NLL, 95% interval) on the recorded trajectory and on the \
             rule's own:\n\n| rule | versus | counterfactual | replay | |\n|---|---|---|---|---|\n",
        );
        for a in &r.agreement {
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                a.rule,
                a.versus,
                a.recorded,
                a.own,
                if a.agrees() { "agree" } else { "**disagree**" }
            ));
        }
    }
    md
}

/// The rules' table (markdown): chosen lr, NLL, differences, tuning.
fn rules_table(rules: &[fedcmp_experiment::harness::RuleResult]) -> String {
    let mut md = format!(
        "| rule | server lr | val NLL | vs {BASELINE} | vs {MOMENTUM_BASELINE} | tuning (lr: NLL) \
         |\n|---|---|---|---|---|---|\n"
    );
    for rule in rules {
        let text = |d: Option<&fedcmp_experiment::compare::stats::PairedDifference>| {
            d.map_or_else(
                || "(itself or absent)".to_string(),
                |d| difference_text(d, 4),
            )
        };
        let vs = text(rule.vs_baseline.as_ref());
        let vs_momentum = text(rule.vs_momentum.as_ref());
        let tuning: Vec<String> = rule
            .tuning
            .iter()
            .map(|(lr, v)| format!("{lr}: {v:.4}"))
            .collect();
        let nll = match rule.failures.first() {
            None => format!("{:.4}", rule.val_nll),
            Some(why) => format!(
                "{:.4} ({} scored rounds failed: {why})",
                rule.val_nll,
                rule.failures.len()
            ),
        };
        md.push_str(&format!(
            "| {} | {} | {nll} | {vs} | {vs_momentum} | {} |\n",
            rule.rule,
            rule.server_lr,
            tuning.join(", ")
        ));
    }
    md
}

/// Each rule's validation NLL minus FedAvg's, per scored round.
fn plot(
    root: &Path,
    rules: &[fedcmp_experiment::harness::RuleResult],
    title: &str,
    path: &Path,
) -> Result<()> {
    let Some(base) = rules.iter().find(|x| x.rule == BASELINE) else {
        return Ok(());
    };
    let series: Vec<(String, Vec<(f64, f64)>)> = rules
        .iter()
        .map(|rule| {
            let points = rule
                .per_round
                .iter()
                .zip(&base.per_round)
                .map(|((t, v), (_, b))| (*t as f64, v - b))
                .collect();
            (format!("{} (lr {})", rule.rule, rule.server_lr), points)
        })
        .collect();
    super::plot::line_chart(
        root,
        path,
        title,
        "round",
        &format!("validation NLL - {BASELINE}'s"),
        &series,
    )
}
