//! Federation across sites, the server's side: fedcmp's own round loop,
//! strategy, seeded sampling, deadline and quorum, metrics and checkpoints
//! over a [`Transport`] whose clients are real sites (Flower's Grid, from
//! the Python package). It is `fedcmp run` without the data: the sites
//! hold the pairs and report what they have, the server never sees them.
//!
//! The run folder is the simulation's (`<out>/sites-<method>-s<seed>/`:
//! settings.toml, metrics.jsonl, checkpoints/, projector.safetensors,
//! summary.json); a server started again on the same folder and settings
//! resumes from its newest checkpoint, each site from its own state.
//!
//! The server loads the same frozen backbones as the sites: it builds the
//! initial projector from them (the same as the simulation's for the same
//! seed) and, given a held-out manifest of its own, validates the global
//! projector every `eval-every` rounds. Who takes part in a round is the
//! scenario's participation (clients per round or fraction); simulated
//! dropouts and stragglers do not apply across sites.

use std::path::Path;
use std::time::Instant;

use fedcmp_core::{ClientStatus, ParamSet, RoundTask};
use fedcmp_data::record::SkipReport;
use fedcmp_data::scenario::Scenario;
use fedcmp_runtime::checkpoint;
use fedcmp_runtime::convert::{projector_params, save_params_file};
use fedcmp_runtime::round_loop::{drive, CheckpointHook, RoundLoopState, Start, StopReason};
use fedcmp_runtime::simulation::RoundRng;
use fedcmp_runtime::transport::{RoundOutcome, Transport};
use fedcmp_strategy::Strategy;
use serde::Serialize;

use crate::events::{Event, Observer};
use crate::files::{append_jsonl, write_atomic};
use crate::run_folder::{last_epsilon, privacy_report, FailureCounts, PrivacyReport, RunFolder};
use crate::settings::{RunSettings, Training};
use crate::sites::Frozen;
use crate::training::round_loop_config;
use crate::{ExperimentError, Result};

/// How the server runs, besides the run settings.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions<'a> {
    /// Assets and the feature cache.
    pub cache_dir: &'a Path,
    /// A held-out manifest of the server's own to validate on (None: no
    /// validation; the metrics carry no val_loss).
    pub validation: Option<&'a Path>,
    /// The server's copy of the LLM, where the settings name another path.
    pub llm: Option<&'a Path>,
    /// Start over even where a checkpoint exists.
    pub fresh: bool,
}

/// Validation NLL of the untrained and the final projector.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Validation {
    pub init: f64,
    pub r#final: f64,
}

/// What the server writes to summary.json.
#[derive(Debug, Clone, Serialize)]
pub struct ServeSummary {
    /// Sites that answered the first status query.
    pub clients: usize,
    pub rounds: u64,
    pub stop: StopReason,
    pub samples_total: u64,
    pub seconds: f64,
    pub resumed_after: Option<u64>,
    pub consumed_per_client: Vec<(u32, u64)>,
    pub retired: Vec<u32>,
    pub failures: FailureCounts,
    pub validation_nll: Option<Validation>,
    /// Records each site skipped in its data (by client id; sites that
    /// skipped none are left out); file and line are in the site's log.
    pub skipped_per_site: std::collections::BTreeMap<u32, u64>,
    /// The privacy spent, for a federation under differential privacy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyReport>,
}

/// A transport that answers the round loop's first status query with the
/// one the server already made (each query costs a network round trip).
struct Remembered<'t> {
    inner: &'t mut dyn Transport,
    first: Option<(u64, Vec<ClientStatus>)>,
}

impl Transport for Remembered<'_> {
    fn status(&mut self, round: u64) -> fedcmp_runtime::Result<Vec<ClientStatus>> {
        match self.first.take() {
            Some((asked, statuses)) if asked == round => Ok(statuses),
            _ => self.inner.status(round),
        }
    }

    fn run_round(
        &mut self,
        tasks: Vec<RoundTask>,
        deadline: Option<Instant>,
    ) -> fedcmp_runtime::Result<RoundOutcome> {
        self.first = None;
        self.inner.run_round(tasks, deadline)
    }
}

/// Runs (or resumes) the federation of `settings` over `transport`; see
/// the module header.
pub fn serve(
    settings: &RunSettings,
    transport: &mut dyn Transport,
    options: ServeOptions<'_>,
    observer: &dyn Observer,
) -> Result<(RunFolder, ServeSummary)> {
    let Training::Federated(strategy_config) = &settings.training else {
        return Err(ExperimentError::Invalid(format!(
            "training = {}: across sites only federated training runs (the data never \
             leaves the sites)",
            settings.training.method()
        )));
    };
    if settings.attack.is_some() {
        return Err(ExperimentError::Invalid(
            "`attack` is simulated (fedcmp run, compare, harness); across sites every update \
             comes from a real site"
                .into(),
        ));
    }
    let folder = RunFolder::new(
        &settings.out,
        "sites",
        settings.training.method(),
        settings.seed,
    );
    let (saved, mut metrics_file) =
        folder.open_for_training(&settings.to_toml()?, options.fresh)?;
    let resumed_after = saved.as_ref().map(|s| s.round_loop.round);

    let mut transport = Remembered {
        inner: transport,
        first: None,
    };
    let statuses = transport.status(resumed_after.unwrap_or(0))?;
    transport.first = Some((resumed_after.unwrap_or(0), statuses.clone()));
    if statuses.is_empty() {
        return Err(ExperimentError::Invalid(
            "no site answered the server's status query".into(),
        ));
    }
    // A site's shard size is what it consumed plus what it has left, as of
    // any round: the one-pass budget is the same on resume.
    let budget: u64 = statuses.iter().map(|s| s.consumed + s.samples_left).sum();
    if budget == 0 {
        return Err(ExperimentError::Invalid(
            "the sites that answered hold no training pair".into(),
        ));
    }
    observer.observe(Event::Status(format!(
        "{} sites, {budget} pairs in all{}",
        statuses.len(),
        resumed_after.map_or(String::new(), |r| format!(", resuming after round {r}"))
    )));
    for s in statuses.iter().filter(|s| s.skipped > 0) {
        observer.observe(Event::Status(format!(
            "site {} skipped {} records of its data (file and line in its site.log)",
            s.client.0, s.skipped
        )));
    }
    let (scenario, _) = Scenario::load(&settings.data.scenario)?;
    let per_round = crate::training::clients_per_round(&scenario.participation, statuses.len());
    let mut strategy =
        crate::training::build_strategy(settings, strategy_config, statuses.len(), per_round)?;

    let wanted = settings.data.backbones.with_llm(options.llm);
    let mut frozen = Frozen::load(options.cache_dir, settings, &wanted, observer)?;
    let (validation, skipped) = match options.validation {
        Some(path) => frozen.read_manifest(path, observer)?,
        None => (Vec::new(), SkipReport::default()),
    };
    if skipped.total() > 0 {
        tracing::warn!(skipped = skipped.total(), "validation records skipped");
    }
    let work = frozen.projector(settings.recipe.projector, settings.seed)?;
    let initial = projector_params(&work)?;
    let validator = frozen.evaluator(&validation);
    let validate = |p: &ParamSet| -> fedcmp_runtime::Result<Option<f64>> {
        if validation.is_empty() {
            Ok(None)
        } else {
            validator.nll_of(&work, p).map(Some)
        }
    };
    let init_val = validate(&initial)?;
    let start = match saved {
        Some(saved) => {
            strategy.load_state(saved.strategy)?;
            Start::Resume(saved.round_loop)
        }
        None => Start::Fresh(initial),
    };
    let checkpoints = folder.checkpoints();
    let mut save = |state: &RoundLoopState, strategy: &dyn Strategy| {
        checkpoint::save_server(&checkpoints, state, strategy)
    };
    let metrics_path = folder.metrics();
    let mut failures = FailureCounts::default();
    let mut epsilon = None;
    let mut write_error = None;
    let started = Instant::now();
    let summary = drive(
        &round_loop_config(settings, &scenario.participation, budget),
        &RoundRng::new(settings.seed),
        strategy.as_mut(),
        &mut transport,
        start,
        &mut |p: &ParamSet| validate(p),
        &mut |record| {
            failures.add(record);
            epsilon = last_epsilon(std::slice::from_ref(record)).or(epsilon);
            observer.observe(Event::Round(record));
            if let Err(e) = append_jsonl(&mut metrics_file, &metrics_path, record) {
                write_error.get_or_insert(e);
            }
        },
        Some(CheckpointHook {
            every: settings.protocol.checkpoint_every.get(),
            save: &mut save,
        }),
    )?;
    if let Some(e) = write_error {
        return Err(e);
    }
    save_params_file(&summary.final_params, &folder.projector())?;
    let final_val = match summary.final_val_loss {
        Some(v) => Some(v),
        None => validate(&summary.final_params)?,
    };
    let report = ServeSummary {
        clients: statuses.len(),
        rounds: summary.rounds,
        stop: summary.stop,
        samples_total: summary.samples_total,
        seconds: started.elapsed().as_secs_f64(),
        resumed_after,
        consumed_per_client: {
            let mut consumed: Vec<(u32, u64)> =
                summary.consumed.iter().map(|(c, n)| (c.0, *n)).collect();
            consumed.sort_unstable();
            consumed
        },
        retired: summary.retired.iter().map(|c| c.0).collect(),
        failures,
        skipped_per_site: statuses
            .iter()
            .filter(|s| s.skipped > 0)
            .map(|s| (s.client.0, s.skipped))
            .collect(),
        validation_nll: init_val
            .zip(final_val)
            .map(|(init, r#final)| Validation { init, r#final }),
        privacy: match &settings.privacy {
            None => None,
            Some(p) => Some(privacy_report(
                p,
                per_round,
                statuses.len(),
                settings.recipe.rounds.map(|r| r.get()),
                summary.rounds,
                epsilon,
            )?),
        },
    };
    let text = serde_json::to_string_pretty(&report)
        .map_err(|e| ExperimentError::Internal(format!("cannot encode the summary: {e}")))?;
    write_atomic(&folder.summary(), text.as_bytes())?;
    Ok((folder, report))
}
