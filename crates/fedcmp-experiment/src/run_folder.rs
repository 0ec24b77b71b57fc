//! One run and its folder, `<out>/<scenario>-<method>-s<seed>/`:
//!
//! - `settings.toml`: the resolved settings (pinned: a folder holding a
//!   checkpoint resumes only under the same settings; `--config` reads the
//!   file back);
//! - `metrics.jsonl`: one line per round (sampled clients, failures and
//!   retirements, losses, update norms, interference diagnostics);
//! - `checkpoints/`: the server's checkpoints; `clients/client-<id>/`: each
//!   client's own saved states;
//! - `projector.safetensors`: the final projector;
//! - `summary.json`: the federation's facts and the held-out evaluation of
//!   the untrained and the final projector.
//!
//! Started again with the same settings, an interrupted run resumes from
//! the server's newest checkpoint (each client from its own states) and
//! ends bit-identical to an uninterrupted one.

use std::path::{Path, PathBuf};
use std::time::Instant;

use fedcmp_core::{ClientId, FailureKind, ParamSet};
use fedcmp_data::record::SkipReport;
use fedcmp_model::projector::Projector;
use fedcmp_runtime::checkpoint;
use fedcmp_runtime::convert::{load_projector, projector_params, save_params_file};
use fedcmp_runtime::round_loop::{RoundRecord, StopReason};
use fedcmp_runtime::suite::{evaluate, SuiteConfig, SuiteReport};
use fedcmp_strategy::privacy::config::{DpMode, PrivacyConfig};
use serde::Serialize;

use crate::assembly::Experiment;
use crate::events::{Event, Observer, RunStart, Stage};
use crate::files::{append_jsonl, pin, write_atomic};
use crate::settings::{RunSettings, Training};
use crate::training::{self, Storage};
use crate::{io_error, Result};

/// The files of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunFolder {
    pub name: String,
    pub dir: PathBuf,
}

impl RunFolder {
    /// `<out>/<scenario>-<method>-s<seed>`.
    pub fn new(out: &Path, scenario: &str, method: &str, seed: u64) -> Self {
        let name = format!("{scenario}-{method}-s{seed}");
        Self {
            dir: out.join(&name),
            name,
        }
    }

    pub fn settings(&self) -> PathBuf {
        self.dir.join("settings.toml")
    }
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
    pub fn summary(&self) -> PathBuf {
        self.dir.join("summary.json")
    }
    pub fn projector(&self) -> PathBuf {
        self.dir.join("projector.safetensors")
    }
    pub fn checkpoints(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }
    pub fn clients(&self) -> PathBuf {
        self.dir.join("clients")
    }

    /// Removes what a previous run left (its checkpoints, client states,
    /// metrics and results), keeping the folder.
    fn clear(&self) -> Result<()> {
        for dir in [self.checkpoints(), self.clients()] {
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(io_error(&dir))?;
            }
        }
        for file in [self.metrics(), self.summary(), self.projector()] {
            if file.exists() {
                std::fs::remove_file(&file).map_err(io_error(&file))?;
            }
        }
        Ok(())
    }

    /// Readies the folder for training under `settings_text` (resolved
    /// settings): with a checkpoint there (and not `fresh`), pins the
    /// settings, keeps the metrics of the rounds up to the checkpoint and
    /// returns it to resume from; otherwise clears what a previous run
    /// left and writes the settings. Either way, the metrics file opened
    /// for appending.
    pub fn open_for_training(
        &self,
        settings_text: &str,
        fresh: bool,
    ) -> Result<(Option<checkpoint::Checkpoint>, std::fs::File)> {
        std::fs::create_dir_all(&self.dir).map_err(io_error(&self.dir))?;
        let saved = if fresh {
            None
        } else {
            checkpoint::load_latest(&self.checkpoints())?
        };
        match &saved {
            Some(_) => {
                pin(
                    &self.settings(),
                    settings_text,
                    "a checkpoint of a run",
                    "rerun with the same settings to resume it, pass --fresh to start over, or \
                     choose another --out",
                )?;
            }
            None => {
                self.clear()?;
                write_atomic(&self.settings(), settings_text.as_bytes())?;
            }
        }
        let metrics_path = self.metrics();
        if let Some(saved) = &saved {
            // Rounds after the checkpoint will be run again: drop their lines.
            let round = saved.round_loop.round;
            let text = std::fs::read_to_string(&metrics_path).unwrap_or_default();
            let kept: String = text
                .lines()
                .filter(|line| {
                    serde_json::from_str::<serde_json::Value>(line)
                        .ok()
                        .and_then(|v| v.get("round").and_then(serde_json::Value::as_u64))
                        .is_some_and(|r| r <= round)
                })
                .map(|line| format!("{line}\n"))
                .collect();
            write_atomic(&metrics_path, kept.as_bytes())?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(io_error(&metrics_path))?;
        Ok((saved, file))
    }
}

/// The federation a run trained on (summary.json's `federation`).
#[derive(Debug, Clone, Serialize)]
pub struct FederationFacts {
    pub scenario: String,
    pub vision: String,
    pub clients: usize,
    pub clients_per_round: usize,
    pub shard_sizes: Vec<usize>,
    pub budget_samples: u64,
    pub validation_samples: usize,
    pub test_samples: usize,
    /// Records the readers skipped and images the encoder could not read:
    /// counts by kind and the first few with file and line.
    pub skipped: SkipReport,
}

/// Caption NLL per token before and after training.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct InitFinal {
    pub init: f64,
    #[serde(with = "fedcmp_runtime::suite::nan_as_null")]
    pub r#final: f64,
}

/// What a federated or centralized run measured.
#[derive(Debug, Clone, Serialize)]
pub struct TrainedReport {
    pub federation: FederationFacts,
    pub rounds: u64,
    pub stop: StopReason,
    pub samples_total: u64,
    /// Seconds this invocation trained.
    pub seconds: f64,
    pub resumed_after: Option<u64>,
    pub validation_nll: InitFinal,
    pub test_nll: InitFinal,
    pub suite: SuiteComparison,
    pub consumed_per_client: Vec<(u32, u64)>,
    pub one_pass_complete: bool,
    /// Client failures over the rounds of this invocation, by kind.
    pub failures: FailureCounts,
    pub retired: Vec<u32>,
    /// The privacy spent, for a run under differential privacy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyReport>,
}

/// What a private run spent (DP-FedAvg, see
/// [`fedcmp_strategy::privacy::central`], or local DP,
/// [`fedcmp_strategy::privacy::local`]).
#[derive(Debug, Clone, Serialize)]
pub struct PrivacyReport {
    /// `central` (DP-FedAvg at the server) or `local` (at each site).
    pub mode: DpMode,
    pub clip_norm: f64,
    pub noise_multiplier: f64,
    /// The per-round sampling rate the accountant used (`m / N`; 1 for
    /// local DP, whose releases are not amplified by sampling).
    pub sampling_rate: f64,
    pub delta: f64,
    /// Epsilon at `delta` after the rounds aggregated (local DP: of the
    /// site that released most often).
    pub epsilon: f64,
    pub target_epsilon: Option<f64>,
}

/// The newest round's epsilon among `records`.
pub(crate) fn last_epsilon(records: &[RoundRecord]) -> Option<f64> {
    records.iter().rev().find_map(|r| {
        r.metrics
            .scalars
            .get(fedcmp_core::metrics::names::DP_EPSILON)
            .copied()
    })
}

/// What a run under privacy spent: the last round's own epsilon; a
/// resumed run that trained no round counts every round of the run (for
/// local DP, as if one site had released in each).
pub(crate) fn privacy_report(
    p: &PrivacyConfig,
    per_round: usize,
    clients: usize,
    planned: Option<u64>,
    rounds: u64,
    last: Option<f64>,
) -> Result<PrivacyReport> {
    Ok(match p.mode {
        DpMode::Central => {
            let resolved = p.resolve(per_round, clients, planned)?;
            PrivacyReport {
                mode: p.mode,
                clip_norm: resolved.clip_norm,
                noise_multiplier: resolved.noise_multiplier,
                sampling_rate: (per_round as f64 / clients.max(1) as f64).min(1.0),
                delta: resolved.delta,
                epsilon: match last {
                    Some(e) => e,
                    None => resolved.epsilon(per_round, clients, rounds)?,
                },
                target_epsilon: resolved.budget,
            }
        }
        DpMode::Local => {
            let resolved = p.resolve_local(planned)?;
            PrivacyReport {
                mode: p.mode,
                clip_norm: resolved.clip_norm,
                noise_multiplier: resolved.noise_multiplier,
                sampling_rate: 1.0,
                delta: resolved.delta,
                epsilon: match last {
                    Some(e) => e,
                    None => resolved.epsilon(rounds)?,
                },
                target_epsilon: resolved.budget,
            }
        }
    })
}

/// The full held-out suite of the untrained and the final projector.
#[derive(Debug, Clone, Serialize)]
pub struct SuiteComparison {
    pub init: SuiteReport,
    pub r#final: SuiteReport,
}

/// Failures counted by kind.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct FailureCounts {
    pub dropped: usize,
    pub errors: usize,
    pub timeouts: usize,
    /// Updates the server refused (see the round loop's checks).
    pub refused: usize,
}

impl FailureCounts {
    /// Counts a round's failures.
    pub fn add(&mut self, record: &fedcmp_runtime::round_loop::RoundRecord) {
        self.dropped += record.failed(FailureKind::Dropped);
        self.errors += record.failed(FailureKind::Error);
        self.timeouts += record.failed(FailureKind::Timeout);
        self.refused += record.failed(FailureKind::Refused);
    }
}

/// One client of the local-only reference.
#[derive(Debug, Clone, Serialize)]
pub struct LocalOnlyRow {
    pub client: u32,
    pub samples: u64,
    pub validation_nll: f64,
    pub test_nll: f64,
}

/// What the local-only reference measured.
#[derive(Debug, Clone, Serialize)]
pub struct LocalOnlyReport {
    pub federation: FederationFacts,
    pub clients: Vec<LocalOnlyRow>,
    pub validation_nll_mean: f64,
    pub test_nll_mean: f64,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Measured {
    Trained(Box<TrainedReport>),
    LocalOnly(LocalOnlyReport),
}

/// A finished run: its folder and what it measured.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub folder: RunFolder,
    pub measured: Measured,
}

/// A run folder's validation curve: (pairs consumed, validation NLL) of
/// the untrained projector (from `summary.json`, or the run's start when
/// the run has not finished) and of every round that was validated (from
/// `metrics.jsonl`), in order.
pub fn validation_curve(dir: &Path) -> Result<Vec<(u64, f64)>> {
    let folder_error = |path: &Path, message: String| crate::ExperimentError::File {
        path: path.to_path_buf(),
        message,
    };
    let metrics = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics).map_err(io_error(&metrics))?;
    let mut curve = Vec::new();
    let summary = dir.join("summary.json");
    if let Ok(bytes) = std::fs::read(&summary) {
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| folder_error(&summary, format!("not a run summary: {e}")))?;
        if let Some(init) = value
            .pointer("/validation_nll/init")
            .and_then(serde_json::Value::as_f64)
        {
            curve.push((0, init));
        }
    }
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            folder_error(&metrics, format!("line {}: not a round record: {e}", i + 1))
        })?;
        let samples = value
            .get("samples_total")
            .and_then(serde_json::Value::as_u64);
        let loss = value.get("val_loss").and_then(serde_json::Value::as_f64);
        match (samples, loss) {
            (Some(samples), Some(loss)) => curve.push((samples, loss)),
            (None, _) => {
                return Err(folder_error(
                    &metrics,
                    format!("line {}: no samples_total", i + 1),
                ))
            }
            (Some(_), None) => {}
        }
    }
    Ok(curve)
}

fn facts(experiment: &Experiment, clients_per_round: usize) -> FederationFacts {
    let shard_sizes: Vec<usize> = experiment.clients.iter().map(|c| c.samples.len()).collect();
    FederationFacts {
        scenario: experiment.scenario.name.clone(),
        vision: experiment.encoder_identity.clone(),
        clients: shard_sizes.len(),
        clients_per_round,
        budget_samples: training::sample_budget(&experiment.clients),
        shard_sizes,
        validation_samples: experiment.validation.len(),
        test_samples: experiment.test.len(),
        skipped: experiment.skipped.clone(),
    }
}

fn load<'a>(work: &'a Projector, params: &ParamSet) -> Result<&'a Projector> {
    load_projector(work, params)?;
    Ok(work)
}

/// `fedcmp run`: assembles the scenario under the asset cache `root`, then
/// trains (or resumes) one run as `settings` say, in its folder; `fresh`
/// starts over even where a checkpoint exists.
pub fn run(
    root: &Path,
    settings: &RunSettings,
    fresh: bool,
    observer: &dyn Observer,
) -> Result<RunReport> {
    let experiment = Experiment::assemble(root, &settings.data, SuiteConfig::default(), observer)?;
    run_on(&experiment, settings, fresh, observer)
}

/// [`run`] on an assembled experiment.
pub fn run_on(
    experiment: &Experiment,
    settings: &RunSettings,
    fresh: bool,
    observer: &dyn Observer,
) -> Result<RunReport> {
    let folder = RunFolder::new(
        &settings.out,
        &experiment.scenario.name,
        &settings.run_label(),
        settings.seed,
    );
    std::fs::create_dir_all(&folder.dir).map_err(io_error(&folder.dir))?;
    let settings_text = settings.to_toml()?;
    if settings.training == Training::LocalOnly {
        folder.clear()?;
        write_atomic(&folder.settings(), settings_text.as_bytes())?;
        let report = local_only(experiment, settings, observer)?;
        write_summary(&folder, &report)?;
        return Ok(RunReport {
            folder,
            measured: report,
        });
    }
    let (saved, mut metrics_file) = folder.open_for_training(&settings_text, fresh)?;
    let resumed_after = saved.as_ref().map(|s| s.round_loop.round);
    let metrics_path = folder.metrics();

    let (clients, participation, _) = training::federation_of(experiment, &settings.training)?;
    let shard_sizes: Vec<usize> = clients.iter().map(|c| c.samples.len()).collect();
    let per_round = training::clients_per_round(&participation, clients.len());
    let kind = settings.recipe.projector;
    let work = experiment.projector(kind, settings.seed)?;
    let initial = projector_params(&work)?;
    let validator = experiment.validator();
    let tester = experiment.tester();
    let init_val = validator.nll_of(&work, &initial)?;
    let step_batch = training::step_batch(experiment, settings);
    let start = RunStart {
        local_steps: settings.recipe.local_steps.get(),
        step_batch,
        clients_per_pass: settings
            .protocol
            .clients_per_pass
            .resolve(per_round, step_batch),
        name: folder.name.clone(),
        clients: clients.len(),
        clients_per_round: per_round,
        budget: training::sample_budget(&clients),
        validation: experiment.validation.len(),
        test: experiment.test.len(),
        initial_val_nll: init_val,
        estimated_rounds: training::estimate_rounds(settings, step_batch, &shard_sizes, per_round),
        resumed_after,
    };
    observer.observe(Event::RunStarted(&start));

    let started = Instant::now();
    let mut write_error = None;
    let mut failures = FailureCounts::default();
    let (checkpoints, client_dir) = (folder.checkpoints(), folder.clients());
    let trained = training::train(
        experiment,
        settings,
        Some(Storage {
            checkpoints: &checkpoints,
            clients: &client_dir,
            every: settings.protocol.checkpoint_every.get(),
            resume: saved,
        }),
        &mut |record| {
            failures.add(record);
            observer.observe(Event::Round(record));
            if let Err(e) = append_jsonl(&mut metrics_file, &metrics_path, record) {
                write_error.get_or_insert(e);
            }
        },
    )?;
    if let Some(e) = write_error {
        return Err(e);
    }
    let seconds = started.elapsed().as_secs_f64();
    let summary = &trained.summary;
    save_params_file(&summary.final_params, &folder.projector())?;
    let init_test = tester.nll_of(&work, &initial)?;
    let final_test = tester.nll_of(&work, &summary.final_params)?;
    // The full held-out suite (per-domain NLL, zero-shot, greedy
    // captions) for the untrained and the final projector.
    let total = 2 * experiment.suite.num_pairs() as u64;
    let mut done = 0u64;
    let mut tick = |n: usize| {
        done += n as u64;
        observer.observe(Event::Progress {
            stage: Stage::Evaluate,
            done,
            total,
        });
    };
    let suite_init = crate::init_suite::untrained_suite(
        experiment.suite_memo.as_deref(),
        experiment,
        &work,
        &initial,
        &mut tick,
    )?;
    let suite_final = evaluate(
        &experiment.scorer(),
        load(&work, &summary.final_params)?,
        &experiment.suite,
        &mut tick,
    )?;
    observer.observe(Event::StageDone(Stage::Evaluate));
    let one_pass_complete = summary
        .consumed
        .iter()
        .zip(&shard_sizes)
        .all(|((_, n), size)| *n as usize == *size);
    let privacy = match &settings.privacy {
        None => None,
        Some(p) => Some(privacy_report(
            p,
            per_round,
            clients.len(),
            settings.recipe.rounds.map(|r| r.get()),
            summary.rounds,
            last_epsilon(&trained.records),
        )?),
    };
    let report = Measured::Trained(Box::new(TrainedReport {
        federation: facts(experiment, per_round),
        rounds: summary.rounds,
        stop: summary.stop,
        samples_total: summary.samples_total,
        seconds,
        resumed_after,
        validation_nll: InitFinal {
            init: init_val,
            r#final: summary.final_val_loss.unwrap_or(trained.val_nll),
        },
        test_nll: InitFinal {
            init: init_test,
            r#final: final_test,
        },
        suite: SuiteComparison {
            init: suite_init,
            r#final: suite_final,
        },
        consumed_per_client: summary.consumed.iter().map(|(c, n)| (c.0, *n)).collect(),
        one_pass_complete,
        failures,
        retired: summary.retired.iter().map(|c| c.0).collect(),
        privacy,
    }));
    write_summary(&folder, &report)?;
    Ok(RunReport {
        folder,
        measured: report,
    })
}

fn write_summary(folder: &RunFolder, measured: &Measured) -> Result<()> {
    let text = serde_json::to_string_pretty(measured)
        .map_err(|e| crate::ExperimentError::Internal(format!("cannot encode the summary: {e}")))?;
    write_atomic(&folder.summary(), text.as_bytes())
}

fn local_only(
    experiment: &Experiment,
    settings: &RunSettings,
    observer: &dyn Observer,
) -> Result<Measured> {
    let total = experiment.clients.len() as u64;
    let mut done = 0u64;
    let trained = training::train_local_only(experiment, settings, &mut |id: ClientId| {
        done += 1;
        observer.observe(Event::Progress {
            stage: Stage::LocalClients,
            done,
            total,
        });
        observer.observe(Event::Status(format!("client {} done", id.0)));
    })?;
    observer.observe(Event::StageDone(Stage::LocalClients));
    let work = experiment.projector(settings.recipe.projector, settings.seed)?;
    let (validator, tester) = (experiment.validator(), experiment.tester());
    let clients = trained
        .iter()
        .map(|c| {
            Ok(LocalOnlyRow {
                client: c.client.0,
                samples: c.samples,
                validation_nll: validator.nll_of(&work, &c.params)?,
                test_nll: tester.nll_of(&work, &c.params)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mean = |f: fn(&LocalOnlyRow) -> f64| {
        clients.iter().map(f).sum::<f64>() / clients.len().max(1) as f64
    };
    Ok(Measured::LocalOnly(LocalOnlyReport {
        federation: facts(experiment, 1),
        validation_nll_mean: mean(|r| r.validation_nll),
        test_nll_mean: mean(|r| r.test_nll),
        clients,
    }))
}
