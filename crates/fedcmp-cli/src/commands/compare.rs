//! `fedcmp compare`: a matrix of methods x scenarios under the fair tuning
//! protocol of ALGORITHMS.md §5, and its report.
//!
//! Per scenario: every federated method gets the same number of settings
//! (`--grid N`: the first N of its list below), each trained with seed 0
//! and scored on the validation split; the best setting (lowest validation
//! NLL) is then trained with the remaining seeds, and every seed of it is
//! scored on the test split with the full evaluation suite. `centralized`
//! and `local-only` (references) and `init` (the untrained projector) have
//! one setting. Every cell is a JSON file under `<out>/cells/`, written
//! atomically when it finishes, so an interrupted comparison resumes where
//! it stopped and finished cells are never rerun.
//!
//! The report (`<out>/report.md`, `<out>/results.json`, PNG plots) gives
//! test caption NLL, recovery of the centralized gain, zero-shot accuracy
//! and retrieval R@1 as mean ± std over seeds, best federated method in
//! bold; validation NLL against samples consumed per method; the
//! interference diagnostics per round.
//!
//! Cells run one after another by default: candle already spreads every
//! matrix product over all cores. `--jobs N` trains N methods at once, each
//! in its own thread pool with a share of the cores (for machines where
//! one run cannot use them all). The same cells run with the same settings
//! either way; only candle's floating-point sums may split differently
//! over fewer threads.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use fedcmp_assets::cache_root;
use fedcmp_core::ParamSet;
use fedcmp_runtime::convert::{load_projector, projector_params};
use fedcmp_runtime::engine::RoundRecord;
use fedcmp_runtime::suite::{average_reports, evaluate, recovery, SuiteConfig, SuiteReport};
use fedcmp_strategy::config::StrategyConfig;
use serde::{Deserialize, Serialize};

use super::experiment::{train, train_local_only, BackboneArgs, Env, Mode, Recipe, TrainingArgs};
use super::report::{markdown_table, mean_std};
use super::run::{parse_limit, save_projector, write_atomic};
use crate::progress::bar;

/// The four standard scenarios.
pub const SCENARIOS: [&str; 4] = ["iid", "concept-skew", "domain-silos", "cross-device"];

/// Every method, in report order: the baselines, Fed-CMP and its
/// ablations, then the references.
pub const METHODS: [&str; 15] = [
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadagrad",
    "fedadam",
    "fedyogi",
    "scaffold",
    "fednova",
    "ties",
    "fed-cmp",
    "cra-only",
    "opm-only",
    "centralized",
    "local-only",
    "init",
];

const REFERENCES: [&str; 3] = ["centralized", "local-only", "init"];

/// Local-only clients scored per seed (a seeded choice when there are
/// more): scoring 64 projectors of S4 would cost more than training them.
const LOCAL_ONLY_SCORED: usize = 8;

/// The tuning grid of a federated method, most plausible first; `--grid N`
/// takes the first N (the same number for every method).
pub fn grid(method: &str) -> Vec<String> {
    let lrs = |name: &str, values: [&str; 4]| -> Vec<String> {
        values
            .iter()
            .map(|v| format!(r#"{{"name": "{name}", "server-lr": {v}}}"#))
            .collect()
    };
    match method {
        "fedavg" | "scaffold" | "fednova" => lrs(method, ["1.0", "1.5", "0.7", "2.0"]),
        "fedadagrad" | "fedadam" | "fedyogi" => lrs(method, ["1e-3", "3e-3", "1e-2", "3e-4"]),
        "fedprox" => ["0.01", "0.1", "0.001", "1.0"]
            .iter()
            .map(|mu| format!(r#"{{"name": "fedprox", "mu": {mu}}}"#))
            .collect(),
        "fedavgm" => [
            r#"{"name": "fedavgm", "momentum": 0.9}"#,
            r#"{"name": "fedavgm", "momentum": 0.5}"#,
            r#"{"name": "fedavgm", "momentum": 0.9, "server-lr": 0.5}"#,
            r#"{"name": "fedavgm", "momentum": 0.7}"#,
        ]
        .map(String::from)
        .to_vec(),
        "ties" => ["20", "50", "10", "80"]
            .iter()
            .map(|k| format!(r#"{{"name": "ties", "top-k-percent": {k}}}"#))
            .collect(),
        "fed-cmp" => [
            r#"{"name": "fed-cmp"}"#,
            r#"{"name": "fed-cmp", "energy": 0.9, "beta": 0.5}"#,
            r#"{"name": "fed-cmp", "tau": 0.5}"#,
            r#"{"name": "fed-cmp", "energy": 0.99, "beta": 0.7}"#,
        ]
        .map(String::from)
        .to_vec(),
        "cra-only" => [
            r#"{"name": "cra-only"}"#,
            r#"{"name": "cra-only", "energy": 0.9}"#,
            r#"{"name": "cra-only", "tau": 0.5}"#,
            r#"{"name": "cra-only", "energy": 0.99, "residual-weight": 0.5}"#,
        ]
        .map(String::from)
        .to_vec(),
        "opm-only" => ["0.9", "0.5", "0.7", "0.95"]
            .iter()
            .map(|b| format!(r#"{{"name": "opm-only", "beta": {b}}}"#))
            .collect(),
        _ => Vec::new(),
    }
}

#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// Scenarios: built-in names or TOML files, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = SCENARIOS.map(String::from))]
    pub scenarios: Vec<String>,
    /// Methods: strategy names, `centralized`, `local-only`, `init`,
    /// comma-separated (default: all of them).
    #[arg(long, value_delimiter = ',', default_values_t = METHODS.map(String::from))]
    pub methods: Vec<String>,
    /// Seeds per method (mean and spread are over these).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Settings per method in the tuning grid (1 to 4).
    #[arg(long, default_value_t = 2)]
    pub grid: usize,
    /// Cap every source of every scenario at this many records.
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub training: TrainingArgs,
    /// Validation every N rounds (the curves in the report).
    #[arg(long, default_value_t = 1)]
    pub eval_every: u64,
    /// Labelled test images per domain scored against every class prompt.
    #[arg(long, default_value_t = 10)]
    pub zero_shot_images: usize,
    /// Test images (and captions) per domain in the retrieval pool.
    #[arg(long, default_value_t = 8)]
    pub retrieval_pool: usize,
    /// Test images captioned greedily in the report.
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
    #[command(flatten)]
    pub backbones: BackboneArgs,
}

/// One finished cell.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    pub scenario: String,
    pub method: String,
    /// Index in the method's grid (0 for the references).
    pub setting: usize,
    pub config: Option<StrategyConfig>,
    pub seed: u64,
    /// Validation caption NLL of the final projector (NaN, `null` in
    /// JSON, when the run failed).
    #[serde(with = "fedcmp_runtime::suite::nan_as_null")]
    pub val_nll: f64,
    pub rounds: u64,
    pub samples: u64,
    pub seconds: f64,
    /// (samples consumed, validation NLL) after each evaluated round.
    pub curve: Vec<(u64, f64)>,
    /// Interference diagnostics per round.
    pub diagnostics: Vec<BTreeMap<String, f64>>,
    /// The test suite (only for the cells reported).
    pub suite: Option<SuiteReport>,
    /// Why the run failed (diverged, ...), when it did.
    #[serde(default)]
    pub error: Option<String>,
}

impl Cell {
    /// A cell with its identity and nothing measured yet (NaN NLL, no
    /// rounds, no suite); the callers fill in what they measured.
    fn blank(
        scenario: &str,
        method: &str,
        setting: usize,
        config: Option<StrategyConfig>,
        seed: u64,
    ) -> Self {
        Self {
            scenario: scenario.to_string(),
            method: method.to_string(),
            setting,
            config,
            seed,
            val_nll: f64::NAN,
            rounds: 0,
            samples: 0,
            seconds: 0.0,
            curve: Vec::new(),
            diagnostics: Vec::new(),
            suite: None,
            error: None,
        }
    }
}

fn cell_path(out: &Path, scenario: &str, method: &str, setting: usize, seed: u64) -> PathBuf {
    out.join("cells")
        .join(scenario)
        .join(method)
        .join(format!("g{setting}-s{seed}.json"))
}

fn read_cell(path: &Path) -> Result<Option<Cell>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not a comparison cell (delete it to rerun)",
                path.display()
            )
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Every cell under `<out>/cells/`, in path order (unreadable files are
/// skipped: this feeds the report's list of failed runs).
fn all_cells(out: &Path) -> Vec<Cell> {
    let mut files = Vec::new();
    let mut stack = vec![out.join("cells")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for path in entries.flatten().map(|e| e.path()) {
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "json") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
        .iter()
        .filter_map(|p| read_cell(p).ok().flatten())
        .collect()
}

fn write_cell(path: &Path, cell: &Cell) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_atomic(path, serde_json::to_string_pretty(cell)?.as_bytes())
}

const DIAGNOSTICS: [&str; 5] = [
    "cosine_mean",
    "cra_rho_mean",
    "momentum_norm",
    "opm_dropped_fraction",
    "mean_delta_norm",
];

fn diagnostics(r: &RoundRecord) -> BTreeMap<String, f64> {
    let mut d: BTreeMap<String, f64> = DIAGNOSTICS
        .iter()
        .filter_map(|k| r.metrics.scalars.get(*k).map(|v| (k.to_string(), *v)))
        .collect();
    if let Some(e) = r.metrics.series.get("cra_client_alignment") {
        if !e.is_empty() {
            d.insert(
                "cra_alignment_mean".into(),
                e.iter().sum::<f64>() / e.len() as f64,
            );
        }
    }
    d.insert("round".into(), r.round as f64);
    d.insert("samples_total".into(), r.samples_total as f64);
    d
}

/// One method's setting: its grid index and strategy (None: centralized).
#[derive(Debug, Clone)]
struct Setting<'a> {
    method: &'a str,
    index: usize,
    config: Option<StrategyConfig>,
}

/// What one comparison needs besides the scenario.
struct Plan<'a> {
    args: &'a CompareArgs,
    out: &'a Path,
}

impl Plan<'_> {
    fn recipe(&self, seed: u64) -> Recipe {
        self.args.training.recipe(seed, self.args.eval_every)
    }

    /// Trains (federated or centralized) unless the cell exists; saves the
    /// projector next to the cell when `keep` (for a later suite run).
    fn trained_cell(
        &self,
        env: &Env,
        setting: &Setting<'_>,
        seed: u64,
        with_suite: bool,
        status: &(dyn Fn(String) + Sync),
    ) -> Result<Cell> {
        let Setting {
            method,
            index: setting,
            config,
        } = setting.clone();
        let scenario = &env.scenario.name;
        let path = cell_path(self.out, scenario, method, setting, seed);
        let weights = path.with_extension("safetensors");
        if let Some(mut cell) = read_cell(&path)? {
            if with_suite && cell.suite.is_none() && cell.error.is_none() {
                let like = projector_params(&env.projector(self.args.training.projector, 0)?)?;
                let params = fedcmp_runtime::convert::read_params_file(&weights, &like)
                    .with_context(|| format!("the projector of {}", path.display()))?;
                cell.suite = Some(self.suite(env, &params)?);
                write_cell(&path, &cell)?;
            }
            return Ok(cell);
        }
        let mode = match &config {
            Some(c) => Mode::Federated(c.clone()),
            None => Mode::Centralized,
        };
        let started = Instant::now();
        let outcome = train(env, &self.recipe(seed), &mode, &mut |r| {
            status(format!(
                "{scenario} {method} g{setting} s{seed}: round {} loss {:.3}{}",
                r.round,
                r.train_loss,
                r.val_loss
                    .map(|v| format!(" val {v:.3}"))
                    .unwrap_or_default()
            ))
        });
        let seconds = started.elapsed().as_secs_f64();
        let trained = match outcome {
            Ok(trained) => trained,
            Err(e) => {
                // A setting that diverges (or any failed run) is recorded,
                // not fatal: tuning skips it, tables leave it out.
                let error = format!("{e:#}");
                tracing::warn!(%scenario, method, setting, seed, %error, "run failed; recorded");
                let cell = Cell {
                    seconds,
                    error: Some(error),
                    ..Cell::blank(scenario, method, setting, config, seed)
                };
                write_cell(&path, &cell)?;
                return Ok(cell);
            }
        };
        let suite = if with_suite {
            Some(self.suite(env, &trained.summary.final_params)?)
        } else {
            if let Some(dir) = weights.parent() {
                std::fs::create_dir_all(dir)?;
            }
            save_projector(&trained.summary.final_params, &weights)?;
            None
        };
        let cell = Cell {
            val_nll: trained.val_nll,
            rounds: trained.summary.rounds,
            samples: trained.summary.samples_total,
            seconds,
            curve: trained
                .records
                .iter()
                .filter_map(|r| r.val_loss.map(|v| (r.samples_total, v)))
                .collect(),
            diagnostics: trained.records.iter().map(diagnostics).collect(),
            suite,
            ..Cell::blank(scenario, method, setting, config, seed)
        };
        write_cell(&path, &cell)?;
        Ok(cell)
    }

    /// Every cell of one method in one scenario: the tuning runs, then the
    /// seeds of the best setting (references: their seeds); returns the
    /// reported cells; `tick` after each cell.
    fn method_cells(
        &self,
        env: &Env,
        method: &str,
        status: &(dyn Fn(String) + Sync),
        tick: &(dyn Fn() + Sync),
    ) -> Result<Vec<Cell>> {
        let seeds = self.args.seeds;
        let mut reported = Vec::new();
        match method {
            "init" => {
                for seed in 0..seeds {
                    reported.push(self.init_cell(env, seed)?);
                    tick();
                }
            }
            "local-only" => {
                for seed in 0..seeds {
                    reported.push(self.local_only_cell(env, seed, status)?);
                    tick();
                }
            }
            "centralized" => {
                let setting = Setting {
                    method,
                    index: 0,
                    config: None,
                };
                for seed in 0..seeds {
                    reported.push(self.trained_cell(env, &setting, seed, true, status)?);
                    tick();
                }
            }
            _ => {
                let mut tuned = Vec::new();
                for (g, text) in grid(method).iter().take(self.args.grid).enumerate() {
                    let config: StrategyConfig = serde_json::from_str(text)
                        .with_context(|| format!("grid setting {text}"))?;
                    let setting = Setting {
                        method,
                        index: g,
                        config: Some(config),
                    };
                    tuned.push(self.trained_cell(env, &setting, 0, false, status)?);
                    tick();
                }
                // The best validation NLL (first on ties; NaN never wins).
                let best = tuned
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.val_nll.is_finite())
                    .min_by(|a, b| a.1.val_nll.total_cmp(&b.1.val_nll))
                    .map_or(0, |(g, _)| g);
                let setting = Setting {
                    method,
                    index: best,
                    config: tuned.get(best).and_then(|c| c.config.clone()),
                };
                for seed in 0..seeds {
                    reported.push(self.trained_cell(env, &setting, seed, true, status)?);
                    if seed > 0 {
                        tick();
                    }
                }
            }
        }
        Ok(reported)
    }

    fn suite(&self, env: &Env, params: &ParamSet) -> Result<SuiteReport> {
        let work = env.projector(self.args.training.projector, 0)?;
        load_projector(&work, params)?;
        Ok(evaluate(&env.scorer(), &work, &env.suite, &mut |_| {})?)
    }

    fn init_cell(&self, env: &Env, seed: u64) -> Result<Cell> {
        let path = cell_path(self.out, &env.scenario.name, "init", 0, seed);
        if let Some(cell) = read_cell(&path)? {
            return Ok(cell);
        }
        let work = env.projector(self.args.training.projector, seed)?;
        let params = projector_params(&work)?;
        let cell = Cell {
            val_nll: env.validator().nll(&work)?,
            suite: Some(self.suite(env, &params)?),
            ..Cell::blank(&env.scenario.name, "init", 0, None, seed)
        };
        write_cell(&path, &cell)?;
        Ok(cell)
    }

    fn local_only_cell(
        &self,
        env: &Env,
        seed: u64,
        status: &(dyn Fn(String) + Sync),
    ) -> Result<Cell> {
        let path = cell_path(self.out, &env.scenario.name, "local-only", 0, seed);
        if let Some(cell) = read_cell(&path)? {
            return Ok(cell);
        }
        let started = Instant::now();
        let trained = train_local_only(env, &self.recipe(seed), &mut |id| {
            status(format!(
                "{} local-only s{seed}: client {} done",
                env.scenario.name, id.0
            ))
        })?;
        // Score a seeded choice of at most LOCAL_ONLY_SCORED clients.
        let mut order: Vec<usize> = (0..trained.len()).collect();
        {
            use rand::seq::SliceRandom;
            use rand::SeedableRng;
            order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        }
        order.truncate(LOCAL_ONLY_SCORED);
        order.sort_unstable();
        let nll_suite = env.suite.nll_only();
        let work = env.projector(self.args.training.projector, seed)?;
        let mut reports = Vec::new();
        let mut vals = Vec::new();
        for &i in &order {
            let (_, _, params) = &trained[i];
            load_projector(&work, params)?;
            vals.push(env.validator().nll(&work)?);
            reports.push(evaluate(&env.scorer(), &work, &nll_suite, &mut |_| {})?);
        }
        let cell = Cell {
            val_nll: mean_std(&vals).map_or(f64::NAN, |m| m.0),
            samples: trained.iter().map(|(_, n, _)| n).sum(),
            seconds: started.elapsed().as_secs_f64(),
            suite: average_reports(&reports),
            ..Cell::blank(&env.scenario.name, "local-only", 0, None, seed)
        };
        write_cell(&path, &cell)?;
        Ok(cell)
    }
}

/// Runs (or resumes) the matrix and writes the report; returns the
/// reported cells.
pub fn compare(cache_dir: Option<PathBuf>, args: &CompareArgs) -> Result<Vec<Cell>> {
    if !(1..=4).contains(&args.grid) {
        bail!("--grid must be 1 to 4, got {}", args.grid);
    }
    if args.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    for m in &args.methods {
        if !METHODS.contains(&m.as_str()) {
            bail!("unknown method {m:?}; known: {}", METHODS.join(", "));
        }
    }
    let root = cache_root(cache_dir)?;
    let limit: Option<NonZeroUsize> = parse_limit(args.limit)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let suite_config = SuiteConfig {
        zero_shot_per_domain: args.zero_shot_images,
        retrieval_pool: args.retrieval_pool,
        caption_examples: args.caption_examples,
        ..SuiteConfig::default()
    };
    // Cells are reused only under the settings that made them: what a cell
    // depends on (all but the matrix's extent: scenarios, methods, seeds,
    // grid, jobs) is pinned in <out>/settings.json on first use.
    let settings = serde_json::to_string_pretty(&serde_json::json!({
        "limit": args.limit,
        "training": args.training,
        "eval_every": args.eval_every,
        "suite": suite_config,
        "backbones": args.backbones,
    }))?;
    let pinned = args.out.join("settings.json");
    match std::fs::read_to_string(&pinned) {
        Ok(previous) if previous != settings => bail!(
            "{} holds cells made with other settings ({}); use the same settings, \
             another --out, or delete the folder",
            args.out.display(),
            pinned.display()
        ),
        Ok(_) => {}
        Err(_) => write_atomic(&pinned, settings.as_bytes())?,
    }
    let plan = Plan {
        args,
        out: &args.out,
    };
    // Cells per scenario: tuning runs + the other seeds + references.
    let federated: Vec<&String> = args
        .methods
        .iter()
        .filter(|m| !REFERENCES.contains(&m.as_str()))
        .collect();
    let per_scenario = federated.len() as u64 * (args.grid as u64 + args.seeds - 1)
        + args
            .methods
            .iter()
            .filter(|m| REFERENCES.contains(&m.as_str()))
            .count() as u64
            * args.seeds;
    let progress = bar(per_scenario * args.scenarios.len() as u64, "cells");
    let status = |s: String| progress.set_message(s);
    let started = Instant::now();
    let mut reported = Vec::new();
    for scenario in &args.scenarios {
        let env = Env::prepare(&root, scenario, limit, &args.backbones, suite_config)?;
        let run_method = |method: &String| -> Result<Vec<Cell>> {
            plan.method_cells(&env, method, &status, &|| progress.inc(1))
        };
        if args.jobs <= 1 {
            for method in &args.methods {
                reported.extend(run_method(method)?);
            }
            continue;
        }
        // Methods in parallel, each in its own rayon pool with a share of
        // the cores; results are kept in method order.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per_job = (threads / args.jobs).max(1);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results: Vec<std::sync::Mutex<Option<Result<Vec<Cell>>>>> = args
            .methods
            .iter()
            .map(|_| std::sync::Mutex::new(None))
            .collect();
        std::thread::scope(|scope| {
            for _ in 0..args.jobs.min(args.methods.len()) {
                scope.spawn(|| {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(per_job).build();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let Some(method) = args.methods.get(i) else {
                            break;
                        };
                        let outcome = match &pool {
                            Ok(pool) => pool.install(|| run_method(method)),
                            Err(e) => Err(anyhow::anyhow!("thread pool: {e}")),
                        };
                        if let Ok(mut slot) = results[i].lock() {
                            *slot = Some(outcome);
                        }
                    }
                });
            }
        });
        for (method, slot) in args.methods.iter().zip(results) {
            match slot.into_inner().ok().flatten() {
                Some(outcome) => reported.extend(outcome?),
                None => bail!("method {method} did not run"),
            }
        }
    }
    progress.finish_and_clear();
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    write_report(&root, args, &reported, minutes)?;
    Ok(reported)
}

/// The value of a reported cell for one table.
fn metric(cell: &Cell, what: &str) -> Option<f64> {
    let s = cell.suite.as_ref()?;
    match what {
        "nll" => Some(s.macro_nll),
        "zero-shot" => s.macro_zero_shot_accuracy,
        "r1" => s.macro_retrieval_r1,
        _ => None,
    }
}

fn write_report(root: &Path, args: &CompareArgs, cells: &[Cell], minutes: f64) -> Result<()> {
    let scenarios: Vec<String> = {
        let mut v: Vec<String> = Vec::new();
        for c in cells {
            if !v.contains(&c.scenario) {
                v.push(c.scenario.clone());
            }
        }
        v
    };
    let methods: Vec<String> = args
        .methods
        .iter()
        .filter(|m| cells.iter().any(|c| &c.method == *m))
        .cloned()
        .collect();
    let values = |what: &'static str| {
        move |m: &str, s: &str| -> Vec<f64> {
            cells
                .iter()
                .filter(|c| c.method == m && c.scenario == s)
                .filter_map(|c| metric(c, what))
                .collect()
        }
    };
    let mean_of = |m: &str, s: &str| mean_std(&values("nll")(m, s)).map(|x| x.0);
    let recovery_of = |m: &str, s: &str| -> Vec<f64> {
        let (Some(init), Some(central)) = (mean_of("init", s), mean_of("centralized", s)) else {
            return Vec::new();
        };
        values("nll")(m, s)
            .into_iter()
            .filter_map(|v| recovery(init, v, central))
            .collect()
    };
    let federated = |m: &str| !REFERENCES.contains(&m);
    let mut md = String::new();
    md.push_str(&format!(
        "# Comparison\n\nScenarios: {}. Seeds: {}. Grid: {} setting(s) per method, chosen on \
         validation NLL with seed 0. Recipe: {} local steps x batch {}, peak lr {}, {}. \
         Sources capped at {} records. Took {minutes:.1} min for the cells run in this \
         invocation.\n\nBest federated method per scenario in bold (references never are).\n\n",
        scenarios.join(", "),
        args.seeds,
        args.grid,
        args.training.local_steps,
        args.training.batch_size,
        args.training.lr,
        args.training
            .rounds
            .map_or("one pass over every shard".to_string(), |r| format!(
                "{r} rounds"
            )),
        args.limit.map_or("no cap".to_string(), |l| l.to_string()),
    ));
    md.push_str("## Test caption NLL per token (macro over domains; lower is better)\n\n");
    md.push_str(&markdown_table(
        "method",
        &scenarios,
        &methods,
        &values("nll"),
        &federated,
        true,
        4,
    ));
    md.push_str(
        "\n## Recovery of the centralized gain, (init - method) / (init - centralized)\n\n",
    );
    md.push_str(&markdown_table(
        "method",
        &scenarios,
        &methods,
        &recovery_of,
        &federated,
        false,
        3,
    ));
    md.push_str("\n## Zero-shot classification accuracy (macro over labelled domains)\n\n");
    md.push_str(&markdown_table(
        "method",
        &scenarios,
        &methods,
        &values("zero-shot"),
        &federated,
        false,
        3,
    ));
    md.push_str("\n## Image-to-caption retrieval R@1 (macro over domains)\n\n");
    md.push_str(&markdown_table(
        "method",
        &scenarios,
        &methods,
        &values("r1"),
        &federated,
        false,
        3,
    ));
    md.push_str("\n## Chosen settings (seed-0 validation NLL)\n\n| scenario | method | setting |\n|---|---|---|\n");
    for s in &scenarios {
        for m in methods.iter().filter(|m| federated(m)) {
            if let Some(c) = cells.iter().find(|c| &c.scenario == s && &c.method == m) {
                let setting = c
                    .config
                    .as_ref()
                    .map(|x| serde_json::to_string(x).unwrap_or_default())
                    .unwrap_or_default();
                md.push_str(&format!("| {s} | {m} | `{setting}` |\n"));
            }
        }
    }
    let failed: Vec<Cell> = all_cells(&args.out)
        .into_iter()
        .filter(|c| c.error.is_some() && scenarios.contains(&c.scenario))
        .collect();
    if !failed.is_empty() {
        md.push_str("\n## Failed runs (recorded, left out of the tables)\n\n| scenario | method | setting | seed | error |\n|---|---|---|---|---|\n");
        for c in &failed {
            let error = c
                .error
                .as_deref()
                .unwrap_or("")
                .replace('|', "/")
                .replace('\n', " ");
            md.push_str(&format!(
                "| {} | {} | {} | {} | {error} |\n",
                c.scenario, c.method, c.setting, c.seed
            ));
        }
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
    write_atomic(&args.out.join("report.md"), md.as_bytes())?;
    let json = serde_json::json!({ "settings": {
            "scenarios": scenarios, "methods": methods, "seeds": args.seeds, "grid": args.grid,
            "limit": args.limit, "training": args.training, "backbones": args.backbones,
        }, "minutes": minutes, "cells": cells });
    write_atomic(
        &args.out.join("results.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    if !args.no_plots {
        for s in &scenarios {
            // Every curve starts at the untrained projector (same seed, same
            // initialisation) when init is in the comparison.
            let start = cells
                .iter()
                .find(|c| &c.scenario == s && c.method == "init" && c.seed == 0)
                .map(|c| (0.0, c.val_nll));
            let curves: Vec<(String, Vec<(f64, f64)>)> = methods
                .iter()
                .filter_map(|m| {
                    let c = cells
                        .iter()
                        .find(|c| &c.scenario == s && &c.method == m && c.seed == 0)?;
                    (!c.curve.is_empty()).then(|| {
                        let points = start
                            .into_iter()
                            .chain(c.curve.iter().map(|(x, y)| (*x as f64, *y)))
                            .collect();
                        (m.clone(), points)
                    })
                })
                .collect();
            super::plot::line_chart(
                root,
                &args.out.join(format!("curves-{s}.png")),
                &format!("{s}: validation caption NLL (seed 0)"),
                "samples consumed",
                "NLL per token",
                &curves,
            )?;
            let mut diag: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
            for m in methods.iter().filter(|m| federated(m)) {
                let Some(c) = cells
                    .iter()
                    .find(|c| &c.scenario == s && &c.method == m && c.seed == 0)
                else {
                    continue;
                };
                for (key, label) in [
                    ("cosine_mean", "client cosine"),
                    ("cra_rho_mean", "rho"),
                    ("cra_alignment_mean", "e_k"),
                ] {
                    let points: Vec<(f64, f64)> = c
                        .diagnostics
                        .iter()
                        .filter_map(|d| Some((*d.get("round")?, *d.get(key)?)))
                        .collect();
                    if !points.is_empty() && (key == "cosine_mean" || m == "fed-cmp") {
                        diag.push((format!("{m} {label}"), points));
                    }
                }
            }
            super::plot::line_chart(
                root,
                &args.out.join(format!("interference-{s}.png")),
                &format!("{s}: interference per round (seed 0)"),
                "round",
                "mean pairwise cosine / rho / e_k",
                &diag,
            )?;
        }
    }
    Ok(())
}

pub fn run(cache_dir: Option<PathBuf>, args: CompareArgs) -> Result<()> {
    let cells = compare(cache_dir, &args)?;
    print!("{}", summary_table(&cells));
    println!(
        "{} cells; the full report (report.md), every number (results.json) and plots are in {}",
        cells.len(),
        args.out.display()
    );
    Ok(())
}

/// One line per scenario and method: test NLL, recovery, zero-shot
/// accuracy and R@1, means over seeds.
pub fn summary_table(cells: &[Cell]) -> String {
    let mut keys: Vec<(String, String)> = Vec::new();
    for c in cells {
        let k = (c.scenario.clone(), c.method.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mean = |s: &str, m: &str, what: &str| {
        let v: Vec<f64> = cells
            .iter()
            .filter(|c| c.scenario == s && c.method == m)
            .filter_map(|c| metric(c, what))
            .collect();
        mean_std(&v).map(|x| x.0)
    };
    let fmt = |v: Option<f64>, d: usize| v.map_or("-".to_string(), |x| format!("{x:.d$}"));
    let mut out = format!(
        "{:<14} {:<12} {:>9} {:>9} {:>10} {:>6}\n",
        "scenario", "method", "test NLL", "recovery", "zero-shot", "R@1"
    );
    for (s, m) in &keys {
        let nll = mean(s, m, "nll");
        let rec = match (mean(s, "init", "nll"), mean(s, "centralized", "nll"), nll) {
            (Some(i), Some(c), Some(v)) => recovery(i, v, c),
            _ => None,
        };
        out.push_str(&format!(
            "{s:<14} {m:<12} {:>9} {:>9} {:>10} {:>6}\n",
            fmt(nll, 4),
            fmt(rec, 3),
            fmt(mean(s, m, "zero-shot"), 3),
            fmt(mean(s, m, "r1"), 3)
        ));
    }
    out
}

/// The main job (`fedcmp` with no subcommand): the S3 domain-silos scenario
/// on the real offline assets, Fed-CMP and FedAvg side by side with the
/// untrained and the centralized references, one seed, sized to finish in
/// about ten minutes on a 2-core machine (each source capped at 180
/// records: 8 clients of ~76 samples, 3 rounds of 4 local steps x 8;
/// 11.3 min measured at a cap of 200).
pub fn main_job_args() -> CompareArgs {
    CompareArgs {
        scenarios: vec!["domain-silos".into()],
        methods: ["init", "fedavg", "fed-cmp", "centralized"]
            .map(String::from)
            .to_vec(),
        seeds: 1,
        grid: 1,
        limit: Some(180),
        training: TrainingArgs::default(),
        eval_every: 1,
        zero_shot_images: 10,
        retrieval_pool: 8,
        caption_examples: 4,
        out: PathBuf::from("runs/main"),
        no_plots: false,
        jobs: 1,
        backbones: BackboneArgs {
            llm: None,
            vision: super::backbones::VisionChoice::MobilenetV2,
            image_size: 112,
        },
    }
}
