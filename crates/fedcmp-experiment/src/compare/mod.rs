//! The comparison protocol (ALGORITHMS.md §5): methods x scenarios, fairly
//! tuned, over seeds.
//!
//! Per scenario, every federated method gets the same number of settings
//! (the first `grid` of [`grid::grid`]), each trained with the tuning seed
//! ([`TUNING_SEED`], never reported) and scored on the validation split;
//! the best setting (lowest validation NLL; a failed run never wins) is
//! trained with every reported seed (0, 1, ...), and each is scored on the
//! test split with the full evaluation suite (with a grid of one there is
//! nothing to choose, so no tuning run). The references (centralized,
//! local-only, init) have one setting. Seed s gives every method the same
//! initialisation, shard order and client sampling, so results pair by
//! seed ([`stats`]).
//!
//! Every cell is a run with [`RunSettings`]: the comparison's template with
//! the cell's scenario, training and seed. A cell is a JSON file under
//! `<out>/cells/<scenario>/<method>/g<setting>-s<seed>.json`, written
//! atomically when it finishes (beside it its projector, `.safetensors`,
//! and its own settings, `.settings.toml`; local-only cells, one projector
//! per client, keep neither),
//! so an interrupted comparison resumes where
//! it stopped and never reruns a finished cell. What cells depend on (the
//! template and the evaluation sizes) is pinned in `<out>/settings.toml`:
//! a folder refuses other settings. A run that fails (diverges, ...) is a
//! recorded cell with its error, never the end of the comparison.
//!
//! Cells run one after another by default (candle already spreads every
//! matrix product over all cores); `jobs > 1` trains that many methods at
//! once, each in its own thread pool with a share of the cores.

pub mod grid;
pub mod method;
pub mod stats;
pub mod summary;

use std::collections::BTreeMap;
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use fedcmp_core::metrics::names;
use fedcmp_core::ParamSet;
use fedcmp_data::record::SkipReport;
use fedcmp_runtime::convert::{
    load_projector, projector_params, read_params_file, save_params_file,
};
use fedcmp_runtime::round_loop::RoundRecord;
use fedcmp_runtime::suite::{average_reports, evaluate, SuiteConfig, SuiteReport};
use fedcmp_strategy::config::StrategyConfig;
use serde::{Deserialize, Serialize};

use crate::assembly::Experiment;
use crate::events::{Event, Observer, Stage};
use crate::files::{pin, write_atomic};
use crate::settings::{RunOptions, RunSettings, Training};
use crate::training::{train, train_local_only};
use crate::{io_error, ExperimentError, Result};

pub use method::Method;

/// The seed of the tuning runs: apart from the reported seeds 0, 1, ...,
/// so that no reported number was chosen on its own noise.
pub const TUNING_SEED: u64 = 1_000;

/// Local-only clients scored per seed (a seeded choice when there are
/// more): scoring 64 projectors of S4 would cost more than training them.
const LOCAL_ONLY_SCORED: usize = 8;

/// The extent of a comparison and where it lives.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Built-in scenario names or scenario files.
    pub scenarios: Vec<String>,
    pub methods: Vec<Method>,
    /// Seeds per method (mean and spread are over these).
    pub seeds: NonZeroU64,
    /// Settings per federated method (1 to [`grid::MAX_GRID`]).
    pub grid: usize,
    /// Methods trained at once.
    pub jobs: NonZeroUsize,
    /// Sizes of the evaluation suite's subsets.
    pub suite: SuiteConfig,
    /// The comparison's folder (cells, report).
    pub out: PathBuf,
}

impl Plan {
    /// Checks the plan once.
    pub fn validate(&self) -> Result<()> {
        if !(1..=grid::MAX_GRID).contains(&self.grid) {
            return Err(ExperimentError::Invalid(format!(
                "the grid must hold 1 to {} settings, got {}",
                grid::MAX_GRID,
                self.grid
            )));
        }
        if self.scenarios.is_empty() || self.methods.is_empty() {
            return Err(ExperimentError::Invalid(
                "a comparison needs at least one scenario and one method".into(),
            ));
        }
        Ok(())
    }

    /// Cells per scenario: tuning runs and every seed of each federated
    /// method, every seed of every reference.
    pub fn cells_per_scenario(&self) -> u64 {
        let seeds = self.seeds.get();
        self.methods
            .iter()
            .map(|m| {
                if m.is_reference() || self.grid == 1 {
                    seeds
                } else {
                    self.grid as u64 + seeds
                }
            })
            .sum()
    }
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
        method: Method,
        setting: usize,
        config: Option<StrategyConfig>,
        seed: u64,
    ) -> Self {
        Self {
            scenario: scenario.to_string(),
            method: method.name().to_string(),
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

/// A cell of `method` at `seed` in scenario "s" holding `suite` (the
/// statistics and summary tests build their cells with it).
#[cfg(test)]
pub(crate) fn test_cell(method: &str, seed: u64, suite: SuiteReport) -> Cell {
    Cell {
        suite: Some(suite),
        ..Cell::blank(
            "s",
            Method::parse(method).unwrap_or(Method::Init),
            0,
            None,
            seed,
        )
    }
}

/// What a comparison produced.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// The cells reported: every seed of each method's chosen setting and
    /// of the references, in scenario then method order.
    pub reported: Vec<Cell>,
    /// Every failed cell seen, tuning runs included.
    pub failed: Vec<Cell>,
    /// The tuning runs (the tuning seed, every setting of the grid) of
    /// the federated methods, in scenario, method and setting order.
    pub tuning: Vec<Cell>,
    /// Minutes this invocation took.
    pub minutes: f64,
    /// What each scenario's readers and encoder skipped, by scenario name.
    pub skipped: BTreeMap<String, SkipReport>,
}

/// Diagnostics kept per round in a cell (for the interference plots).
const DIAGNOSTICS: [&str; 11] = [
    names::COSINE_MEAN,
    names::CRA_RHO_MEAN,
    names::MOMENTUM_NORM,
    names::OPM_DROPPED_FRACTION,
    names::MEAN_DELTA_NORM,
    names::CRA_SHARED_SHARE,
    names::CRA_GAIN_MEAN,
    names::SERVER_STEP_NORM,
    names::DP_EPSILON,
    names::DP_CLIPPED,
    names::ROBUST_CLIPPED,
];

/// Per-round keys of a cell for the shrinkage gain's 10%, 50% and 90%
/// quantiles over directions, and the mean basis drift over matrices.
pub const CRA_GAIN_P10: &str = "cra_gain_p10";
pub const CRA_GAIN_MEDIAN: &str = "cra_gain_median";
pub const CRA_GAIN_P90: &str = "cra_gain_p90";
pub const CRA_BASIS_DRIFT_MEAN: &str = "cra_basis_drift_mean";

/// The per-round key for the mean client alignment e_k of a cell.
pub const CRA_ALIGNMENT_MEAN: &str = "cra_alignment_mean";

fn diagnostics(r: &RoundRecord) -> BTreeMap<String, f64> {
    let mut d: BTreeMap<String, f64> = DIAGNOSTICS
        .iter()
        .filter_map(|k| r.metrics.scalars.get(*k).map(|v| (k.to_string(), *v)))
        .collect();
    if let Some(e) = r.metrics.series.get(names::CRA_CLIENT_ALIGNMENT) {
        if !e.is_empty() {
            d.insert(
                CRA_ALIGNMENT_MEAN.into(),
                e.iter().sum::<f64>() / e.len() as f64,
            );
        }
    }
    // Quantiles come as (min, 10%, 25%, median, 75%, 90%, max).
    if let Some(q) = r.metrics.series.get(names::CRA_GAIN_QUANTILES) {
        for (key, i) in [(CRA_GAIN_P10, 1), (CRA_GAIN_MEDIAN, 3), (CRA_GAIN_P90, 5)] {
            if let Some(v) = q.get(i) {
                d.insert(key.into(), *v);
            }
        }
    }
    if let Some(drift) = r.metrics.series.get(names::CRA_BASIS_DRIFT) {
        if !drift.is_empty() {
            d.insert(
                CRA_BASIS_DRIFT_MEAN.into(),
                drift.iter().sum::<f64>() / drift.len() as f64,
            );
        }
    }
    d.insert("round".into(), r.round as f64);
    d.insert("samples_total".into(), r.samples_total as f64);
    d
}

fn cell_path(out: &Path, scenario: &str, method: Method, setting: usize, seed: u64) -> PathBuf {
    out.join("cells")
        .join(scenario)
        .join(method.name())
        .join(format!("g{setting}-s{seed}.json"))
}

/// Saves a cell's projector and the cell's own settings next to its JSON
/// (before the JSON, so that a finished cell always has both): `fedcmp
/// export`, `caption` and `eval` use them, and a tuning run's suite is
/// computed from the projector later.
fn save_cell_projector(cell: &Path, params: &ParamSet, settings: &RunSettings) -> Result<()> {
    if let Some(dir) = cell.parent() {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    }
    write_atomic(
        &cell.with_extension("settings.toml"),
        settings.to_toml()?.as_bytes(),
    )?;
    Ok(save_params_file(
        params,
        &cell.with_extension("safetensors"),
    )?)
}

/// A cell's strategy as one line of JSON (or "no strategy").
fn describe(config: Option<&StrategyConfig>) -> String {
    config
        .and_then(|c| serde_json::to_string(c).ok())
        .unwrap_or_else(|| "no strategy".into())
}

fn read_cell(path: &Path) -> Result<Option<Cell>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(|e| {
            ExperimentError::File {
                path: path.to_path_buf(),
                message: format!("not a comparison cell ({e}); delete it to rerun"),
            }
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path)(e)),
    }
}

fn write_cell(path: &Path, cell: &Cell) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    }
    let text = serde_json::to_string_pretty(cell)
        .map_err(|e| ExperimentError::Internal(format!("cannot encode a cell: {e}")))?;
    write_atomic(path, text.as_bytes())
}

/// What cells depend on, pinned in `<out>/settings.toml`.
#[derive(Debug, Serialize)]
struct PinnedSettings {
    recipe: RunOptions,
    evaluation: SuiteConfig,
}

/// The keys a comparison sets per cell (refused in its template layers).
pub const PER_CELL_KEYS: [&str; 5] = ["scenario", "training", "strategy", "seed", "out"];

fn pinned_text(template: &RunSettings, suite: SuiteConfig) -> Result<String> {
    let mut recipe = template.to_options();
    recipe.scenario = None;
    recipe.training = None;
    recipe.strategy = None;
    recipe.seed = None;
    recipe.out = None;
    let body = toml::to_string(&PinnedSettings {
        recipe,
        evaluation: suite,
    })
    .map_err(|e| ExperimentError::Internal(format!("cannot encode settings: {e}")))?;
    Ok(format!(
        "# fedcmp compare: the settings every cell in this folder was made with.\n{body}"
    ))
}

/// One scenario's cells, with what they share.
struct Scene<'a> {
    experiment: &'a Experiment,
    /// What the experiment was assembled from.
    data: crate::settings::DataSettings,
    template: &'a RunSettings,
    plan: &'a Plan,
    observer: &'a dyn Observer,
    failed: &'a Mutex<Vec<Cell>>,
    tuning: &'a Mutex<Vec<Cell>>,
}

impl Scene<'_> {
    fn settings(&self, training: Training, seed: u64) -> RunSettings {
        // An attack and privacy are the federation's: the references
        // train without.
        let (attack, privacy) = match training {
            Training::Federated(_) => (self.template.attack.clone(), self.template.privacy.clone()),
            Training::Centralized | Training::LocalOnly => (None, None),
        };
        RunSettings {
            data: self.data.clone(),
            training,
            attack,
            privacy,
            seed,
            ..self.template.clone()
        }
    }

    fn path(&self, method: Method, setting: usize, seed: u64) -> PathBuf {
        cell_path(
            &self.plan.out,
            &self.experiment.scenario.name,
            method,
            setting,
            seed,
        )
    }

    fn record_failure(&self, cell: &Cell) {
        if cell.error.is_some() {
            if let Ok(mut failed) = self.failed.lock() {
                failed.push(cell.clone());
            }
        }
    }

    fn suite(&self, params: &ParamSet) -> Result<SuiteReport> {
        let work = self
            .experiment
            .projector(self.template.recipe.projector, 0)?;
        load_projector(&work, params)?;
        Ok(evaluate(
            &self.experiment.scorer(),
            &work,
            &self.experiment.suite,
            &mut |_| {},
        )?)
    }

    /// Trains (federated or centralized) unless the cell exists, and saves
    /// the projector next to the cell; without `with_suite` (a tuning run)
    /// the suite is left for later.
    fn trained_cell(
        &self,
        method: Method,
        setting: usize,
        config: Option<StrategyConfig>,
        seed: u64,
        with_suite: bool,
    ) -> Result<Cell> {
        let scenario = &self.experiment.scenario.name;
        let path = self.path(method, setting, seed);
        let weights = path.with_extension("safetensors");
        if let Some(mut cell) = read_cell(&path)? {
            // Cells are named by their index in the grid: one made when the
            // grid held another setting there must not stand for this one.
            if cell.config != config {
                return Err(ExperimentError::File {
                    path,
                    message: format!(
                        "made with {} where the grid now has {}; use another --out, or \
                         delete the cell to rerun it",
                        describe(cell.config.as_ref()),
                        describe(config.as_ref())
                    ),
                });
            }
            if with_suite && cell.suite.is_none() && cell.error.is_none() {
                let like = projector_params(
                    &self
                        .experiment
                        .projector(self.template.recipe.projector, 0)?,
                )?;
                let params = read_params_file(&weights, &like).map_err(|e| {
                    ExperimentError::from(e).context(format!("the projector of {}", path.display()))
                })?;
                cell.suite = Some(self.suite(&params)?);
                write_cell(&path, &cell)?;
            }
            self.record_failure(&cell);
            return Ok(cell);
        }
        let training = match &config {
            Some(c) => Training::Federated(c.clone()),
            None => Training::Centralized,
        };
        let settings = self.settings(training, seed);
        let started = Instant::now();
        let outcome = train(self.experiment, &settings, None, &mut |r| {
            self.observer.observe(Event::Status(format!(
                "{scenario} {method} g{setting} s{seed}: round {} loss {:.3}{}",
                r.round,
                r.train_loss,
                r.val_loss
                    .map(|v| format!(" val {v:.3}"))
                    .unwrap_or_default()
            )))
        });
        let seconds = started.elapsed().as_secs_f64();
        let trained = match outcome {
            Ok(trained) => trained,
            Err(e) => {
                let error = e.to_string();
                tracing::warn!(%scenario, %method, setting, seed, %error, "run failed; recorded");
                let cell = Cell {
                    seconds,
                    error: Some(error),
                    ..Cell::blank(scenario, method, setting, config, seed)
                };
                write_cell(&path, &cell)?;
                self.record_failure(&cell);
                return Ok(cell);
            }
        };
        save_cell_projector(&path, &trained.summary.final_params, &settings)?;
        let suite = if with_suite {
            Some(self.suite(&trained.summary.final_params)?)
        } else {
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

    fn init_cell(&self, seed: u64) -> Result<Cell> {
        let path = self.path(Method::Init, 0, seed);
        if let Some(cell) = read_cell(&path)? {
            return Ok(cell);
        }
        let work = self
            .experiment
            .projector(self.template.recipe.projector, seed)?;
        let params = projector_params(&work)?;
        save_cell_projector(
            &path,
            &params,
            &self.settings(self.template.training.clone(), seed),
        )?;
        let cell = Cell {
            val_nll: self.experiment.validator().nll(&work)?,
            suite: Some(crate::init_suite::untrained_suite(
                self.experiment.suite_memo.as_deref(),
                self.experiment,
                &work,
                &params,
                &mut |_| {},
            )?),
            ..Cell::blank(&self.experiment.scenario.name, Method::Init, 0, None, seed)
        };
        write_cell(&path, &cell)?;
        Ok(cell)
    }

    fn local_only_cell(&self, seed: u64) -> Result<Cell> {
        let scenario = &self.experiment.scenario.name;
        let path = self.path(Method::LocalOnly, 0, seed);
        if let Some(cell) = read_cell(&path)? {
            return Ok(cell);
        }
        let started = Instant::now();
        let settings = self.settings(Training::LocalOnly, seed);
        let trained = train_local_only(self.experiment, &settings, &mut |id| {
            self.observer.observe(Event::Status(format!(
                "{scenario} local-only s{seed}: client {} done",
                id.0
            )))
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
        let nll_suite = self.experiment.suite.nll_only();
        let work = self
            .experiment
            .projector(self.template.recipe.projector, seed)?;
        let mut reports = Vec::new();
        let mut vals = Vec::new();
        for &i in &order {
            load_projector(&work, &trained[i].params)?;
            vals.push(self.experiment.validator().nll(&work)?);
            reports.push(evaluate(
                &self.experiment.scorer(),
                &work,
                &nll_suite,
                &mut |_| {},
            )?);
        }
        let cell = Cell {
            val_nll: vals.iter().sum::<f64>() / vals.len().max(1) as f64,
            samples: trained.iter().map(|c| c.samples).sum(),
            seconds: started.elapsed().as_secs_f64(),
            suite: average_reports(&reports),
            ..Cell::blank(scenario, Method::LocalOnly, 0, None, seed)
        };
        write_cell(&path, &cell)?;
        Ok(cell)
    }

    /// Every cell of one method: the tuning runs, then the seeds of the
    /// best setting (references: their seeds); returns the reported cells;
    /// `tick` after each cell.
    fn method_cells(&self, method: Method, tick: &(dyn Fn() + Sync)) -> Result<Vec<Cell>> {
        let seeds = self.plan.seeds.get();
        let mut reported = Vec::new();
        match method {
            Method::Init => {
                for seed in 0..seeds {
                    reported.push(self.init_cell(seed)?);
                    tick();
                }
            }
            Method::LocalOnly => {
                for seed in 0..seeds {
                    reported.push(self.local_only_cell(seed)?);
                    tick();
                }
            }
            Method::Centralized => {
                for seed in 0..seeds {
                    reported.push(self.trained_cell(method, 0, None, seed, true)?);
                    tick();
                }
            }
            Method::Strategy(name) if self.plan.grid == 1 => {
                // One setting: nothing to choose, so no tuning run.
                let config = grid::grid(name).into_iter().next();
                for seed in 0..seeds {
                    reported.push(self.trained_cell(method, 0, config.clone(), seed, true)?);
                    tick();
                }
            }
            Method::Strategy(name) => {
                let mut tuned = Vec::new();
                for (g, config) in grid::grid(name)
                    .into_iter()
                    .take(self.plan.grid)
                    .enumerate()
                {
                    tuned.push(self.trained_cell(method, g, Some(config), TUNING_SEED, false)?);
                    tick();
                }
                if let Ok(mut kept) = self.tuning.lock() {
                    kept.extend(tuned.iter().cloned());
                }
                // The best validation NLL (first on ties; NaN never wins).
                let best = tuned
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.val_nll.is_finite())
                    .min_by(|a, b| a.1.val_nll.total_cmp(&b.1.val_nll))
                    .map_or(0, |(g, _)| g);
                let config = tuned.get(best).and_then(|c| c.config.clone());
                for seed in 0..seeds {
                    reported.push(self.trained_cell(method, best, config.clone(), seed, true)?);
                    tick();
                }
            }
        }
        Ok(reported)
    }
}

/// Runs (or resumes) the comparison `plan` of `template` runs under the
/// asset cache `root`; the report is the caller's to render.
pub fn run(
    root: &Path,
    template: &RunSettings,
    plan: &Plan,
    observer: &dyn Observer,
) -> Result<Comparison> {
    plan.validate()?;
    std::fs::create_dir_all(&plan.out).map_err(io_error(&plan.out))?;
    // Earlier versions pinned their settings in settings.json: their cells
    // cannot be told apart by settings, so they are never reused.
    let legacy = plan.out.join("settings.json");
    if legacy.exists() && !plan.out.join("settings.toml").exists() {
        return Err(ExperimentError::File {
            path: legacy,
            message: "this folder holds cells of an earlier version of fedcmp; use another \
                      --out, or delete the folder"
                .into(),
        });
    }
    pin(
        &plan.out.join("settings.toml"),
        &pinned_text(template, plan.suite)?,
        "comparison cells",
        "use the same settings, another --out, or delete the folder",
    )?;
    let total = plan.cells_per_scenario() * plan.scenarios.len() as u64;
    let done = std::sync::atomic::AtomicU64::new(0);
    let tick = || {
        let d = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        observer.observe(Event::Progress {
            stage: Stage::Cells,
            done: d,
            total,
        });
    };
    observer.observe(Event::Progress {
        stage: Stage::Cells,
        done: 0,
        total,
    });
    let started = Instant::now();
    let failed = Mutex::new(Vec::new());
    let tuning = Mutex::new(Vec::new());
    let mut reported = Vec::new();
    let mut skipped = BTreeMap::new();
    for scenario in &plan.scenarios {
        let data = crate::settings::DataSettings {
            scenario: scenario.clone(),
            ..template.data.clone()
        };
        let experiment = Experiment::assemble(root, &data, plan.suite, observer)?;
        skipped.insert(experiment.scenario.name.clone(), experiment.skipped.clone());
        let scene = Scene {
            experiment: &experiment,
            data,
            template,
            plan,
            observer,
            failed: &failed,
            tuning: &tuning,
        };
        reported.extend(run_methods(&scene, &tick)?);
    }
    observer.observe(Event::StageDone(Stage::Cells));
    let failed = failed.into_inner().unwrap_or_default();
    let mut tuning = tuning.into_inner().unwrap_or_default();
    // Jobs may finish methods out of order.
    let order = |c: &Cell| {
        (
            plan.scenarios
                .iter()
                .position(|s| s == &c.scenario)
                .unwrap_or(usize::MAX),
            plan.methods
                .iter()
                .position(|m| m.name() == c.method)
                .unwrap_or(usize::MAX),
            c.setting,
        )
    };
    tuning.sort_by_key(order);
    Ok(Comparison {
        reported,
        failed,
        tuning,
        minutes: started.elapsed().as_secs_f64() / 60.0,
        skipped,
    })
}

/// Every method of one scenario, one after another or `jobs` at a time
/// (each in its own rayon pool with a share of the cores); results in
/// method order.
fn run_methods(scene: &Scene<'_>, tick: &(dyn Fn() + Sync)) -> Result<Vec<Cell>> {
    let plan = scene.plan;
    let jobs = plan.jobs.get();
    let mut reported = Vec::new();
    if jobs <= 1 {
        for method in &plan.methods {
            reported.extend(scene.method_cells(*method, tick)?);
        }
        return Ok(reported);
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_job = (threads / jobs).max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<Vec<Cell>>>>> =
        plan.methods.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(plan.methods.len()) {
            scope.spawn(|| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(per_job).build();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some(method) = plan.methods.get(i) else {
                        break;
                    };
                    let outcome = match &pool {
                        Ok(pool) => pool.install(|| scene.method_cells(*method, tick)),
                        Err(e) => Err(ExperimentError::Internal(format!("thread pool: {e}"))),
                    };
                    if let Ok(mut slot) = results[i].lock() {
                        *slot = Some(outcome);
                    }
                }
            });
        }
    });
    for (method, slot) in plan.methods.iter().zip(results) {
        match slot.into_inner().ok().flatten() {
            Some(outcome) => reported.extend(outcome?),
            None => {
                return Err(ExperimentError::Invalid(format!(
                    "method {method} did not run"
                )));
            }
        }
    }
    Ok(reported)
}

#[cfg(test)]
mod diagnostics_tests {
    use super::*;
    use fedcmp_core::RoundMetrics;

    #[test]
    fn a_round_keeps_the_gain_quantiles_and_the_mean_drift() {
        let mut metrics = RoundMetrics::default();
        metrics.set(names::CRA_SHARED_SHARE, 0.4);
        metrics.set(names::CRA_GAIN_MEAN, 0.5);
        metrics.set_series(
            names::CRA_GAIN_QUANTILES,
            vec![0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0],
        );
        metrics.set_series(names::CRA_BASIS_DRIFT, vec![0.2, 0.4]);
        let record = RoundRecord {
            round: 3,
            sampled: Vec::new(),
            failures: Vec::new(),
            stragglers: Vec::new(),
            answered: Vec::new(),
            retired: Vec::new(),
            aggregated: true,
            refused: None,
            skipped: Default::default(),
            samples: 0,
            samples_total: 7,
            lr_end: 0.0,
            train_loss: 0.0,
            val_loss: None,
            seconds: 0.0,
            metrics,
        };
        let d = diagnostics(&record);
        assert_eq!(d[names::CRA_SHARED_SHARE], 0.4);
        assert_eq!(d[names::CRA_GAIN_MEAN], 0.5);
        assert_eq!(d[CRA_GAIN_P10], 0.1);
        assert_eq!(d[CRA_GAIN_MEDIAN], 0.5);
        assert_eq!(d[CRA_GAIN_P90], 0.9);
        assert!((d[CRA_BASIS_DRIFT_MEAN] - 0.3).abs() < 1e-15);
        assert_eq!(d["round"], 3.0);
    }
}
