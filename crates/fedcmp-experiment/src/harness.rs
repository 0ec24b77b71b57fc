//! The counterfactual harness for aggregation rules (ALGORITHMS.md §7.7):
//! record every client's update for R rounds of a FedAvg run, then score
//! any list of aggregation rules on exactly those updates, forward only.
//!
//! Recording: per seed, a FedAvg run (server lr 1) of the template's
//! recipe, stopped after R rounds, writes each round it aggregates under
//! `<out>/<scenario>/seed-<s>/round-<NNNN>/`: the global model the clients
//! started from (`global.safetensors`), every client's returned model
//! (`client-<id>.safetensors`) and `round.json` (sample and step counts,
//! written last: a round folder without it is incomplete and recorded
//! again). `complete.json` marks a finished seed; an interrupted seed is
//! recorded again from round 1.
//!
//! Scoring: a rule at server lr `eta` is a fresh strategy fed the recorded
//! rounds in order; at round t it aggregates the recorded updates on the
//! recorded global theta_{t-1} (the FedAvg trajectory), and the model it
//! proposes is scored on the validation split (per item: caption
//! log-likelihood and tokens). Stateful rules (momenta, averaged Grams)
//! carry their state along the recorded trajectory, so a rule's proposal
//! at round t is what it would do given the updates of rounds 1..t: a
//! one-step counterfactual, perfectly paired (same updates, same start,
//! same items for every rule). Every rule's server lr is chosen from the
//! same grid on the tuning seed ([`TUNING_SEED`], never reported), by the
//! mean validation NLL over the scored rounds; the reported seeds are then
//! scored at that lr. Scores are appended to `scores.jsonl` as they are
//! made, so an interrupted harness resumes where it stopped.
//!
//! Replay (`replay`): the counterfactual judges a stateful rule on a
//! trajectory it did not make (FedAvg's), and a momentum that would have
//! moved the model elsewhere is never charged for it. So each rule also
//! runs its own trajectory for the recorded rounds: the same seed, hence
//! the same clients sampled, the same dropouts and the same batches of
//! each client as the recording, but every round's clients start from the
//! rule's own global model and train (training in the loop). Its
//! proposals are scored at the same rounds on the same items, its server
//! lr is chosen on the tuning seed the same way, on its own path. FedAvg
//! at server lr 1 replays the recording bit for bit. A replay that
//! diverges is kept with its error and never chosen. Replay scores are
//! marked in `scores.jsonl` (`"replay": true`) and resume likewise; a
//! replay missing any scored round is run again from round 1.
//!
//! Result per rule: the mean validation NLL over reported seeds and
//! scored rounds (macro over domains), and its paired difference to the
//! rule named `fedavg` with a 95% bootstrap interval over seeds x items
//! (the comparison's statistics, [`crate::compare::stats`]); with replay,
//! the same for the replays, and per rule whether the two verdicts on it
//! (better, worse, no difference than FedAvg and FedAvgM) agree.

use std::collections::BTreeMap;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fedcmp_core::{ClientId, ClientInstruction, ClientUpdate, ParamSet};
use fedcmp_runtime::convert::{
    load_projector, projector_params, read_params_file, save_params_file,
};
use fedcmp_strategy::config::StrategyConfig;
use fedcmp_strategy::fedavg::FedAvgConfig;
use fedcmp_strategy::{Aggregate, Strategy, StrategyState};
use serde::{Deserialize, Serialize};

use crate::compare::stats::{
    macro_value, paired_bootstrap, DomainValues, PairedDifference, SeedPair,
};
use crate::compare::TUNING_SEED;
use crate::events::{Event, Observer, Stage};
use crate::files::{append_jsonl, pin, write_atomic};
use crate::settings::{DataSettings, RunSettings, Training};
use crate::training::train_with;
use crate::{io_error, Experiment, ExperimentError, Result};

/// The rule every other is compared with.
pub const BASELINE: &str = "fedavg";
/// The second baseline, when a rule has its name: Fed-CMP's variants must
/// beat it to become the default (server momentum without CRA).
pub const MOMENTUM_BASELINE: &str = "fedavgm";

/// The server learning rates every rule searches (the comparison's grid).
pub const SERVER_LRS: [f64; 4] = crate::compare::grid::SERVER_LRS;

/// An aggregation rule: a name for tables and a strategy configuration
/// (its server lr is replaced by the grid's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub name: String,
    pub config: StrategyConfig,
}

impl Rule {
    /// Parses `NAME=JSON` (a strategy configuration as in a settings file).
    pub fn parse(text: &str) -> Result<Self> {
        let (name, json) = text.split_once('=').ok_or_else(|| {
            ExperimentError::Invalid(format!(
                "rule `{text}`: expected NAME=JSON, e.g. v2={{\"name\": \"cra-only\", \"gain\": \
                 \"shrinkage\"}}"
            ))
        })?;
        let config: StrategyConfig = serde_json::from_str(json)
            .map_err(|e| ExperimentError::Invalid(format!("rule `{name}`: {e}")))?;
        let rule = Self {
            name: name.trim().to_string(),
            config,
        };
        rule.check()?;
        Ok(rule)
    }

    fn check(&self) -> Result<()> {
        let ok = !self.name.is_empty()
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(ExperimentError::Invalid(format!(
                "rule name `{}`: use letters, digits, - and _",
                self.name
            )));
        }
        with_server_lr(&self.config, 1.0)?;
        Ok(())
    }

    fn new(name: &str, json: &str) -> Result<Self> {
        let config = serde_json::from_str(json)
            .map_err(|e| ExperimentError::Invalid(format!("built-in rule `{name}`: {e}")))?;
        Ok(Self {
            name: name.to_string(),
            config,
        })
    }
}

/// The rules scored when none are given: the baselines, CRA v1 and each
/// item of CRA v2 (§3.1) alone and together, with and without momentum.
pub fn default_rules() -> Result<Vec<Rule>> {
    const V2: &str = r#""agreement": "leave-one-out", "gain": "shrinkage", "energy": 1.0, "residual-weight": 1.0"#;
    [
        (BASELINE, r#"{"name": "fedavg"}"#.to_string()),
        ("fedavgm", r#"{"name": "fedavgm"}"#.to_string()),
        ("cra-v1", r#"{"name": "cra-only"}"#.to_string()),
        (
            "cra-v2-gain",
            r#"{"name": "cra-only", "gain": "shrinkage", "energy": 1.0, "residual-weight": 1.0}"#
                .to_string(),
        ),
        (
            "cra-v2-loo",
            r#"{"name": "cra-only", "agreement": "leave-one-out", "energy": 1.0, "residual-weight": 1.0}"#
                .to_string(),
        ),
        ("cra-v2", format!(r#"{{"name": "cra-only", {V2}}}"#)),
        ("fed-cmp-v1", r#"{"name": "fed-cmp"}"#.to_string()),
        ("fed-cmp-v2", format!(r#"{{"name": "fed-cmp", {V2}}}"#)),
        (
            "fed-cmp-v2-basis",
            format!(r#"{{"name": "fed-cmp", {V2}, "basis-beta": 0.5}}"#),
        ),
    ]
    .iter()
    .map(|(name, json)| Rule::new(name, json))
    .collect()
}

/// `config` with its server learning rate set to `lr` (every strategy
/// with a plain or adaptive server step has one, called `server-lr`).
pub fn with_server_lr(config: &StrategyConfig, lr: f64) -> Result<StrategyConfig> {
    let mut value = serde_json::to_value(config)
        .map_err(|e| ExperimentError::Internal(format!("cannot encode a strategy: {e}")))?;
    let fields = value.as_object_mut().ok_or_else(|| {
        ExperimentError::Invalid("a strategy configuration is not an object".into())
    })?;
    if !fields.contains_key("server-lr") {
        return Err(ExperimentError::Invalid(format!(
            "strategy `{}` has no server-lr to search",
            config.name()
        )));
    }
    fields.insert("server-lr".into(), lr.into());
    serde_json::from_value(value)
        .map_err(|e| ExperimentError::Invalid(format!("server-lr {lr}: {e}")))
}

/// What the harness runs.
#[derive(Debug, Clone)]
pub struct HarnessPlan {
    pub scenarios: Vec<String>,
    /// Reported seeds 0..seeds.
    pub seeds: NonZeroU64,
    /// Rounds recorded per seed.
    pub rounds: NonZeroU64,
    /// Rounds scored: every this many, and the last.
    pub score_every: NonZeroU64,
    pub server_lrs: Vec<f64>,
    pub rules: Vec<Rule>,
    /// Also run every rule on its own trajectory (see the module header).
    pub replay: bool,
    pub out: PathBuf,
}

impl HarnessPlan {
    pub fn validate(&self) -> Result<()> {
        if self.rules.iter().all(|r| r.name != BASELINE) {
            return Err(ExperimentError::Invalid(format!(
                "the rules must include one named `{BASELINE}` (the baseline)"
            )));
        }
        let mut names: Vec<&str> = self.rules.iter().map(|r| r.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(ExperimentError::Invalid(format!(
                "rule `{}` is given twice",
                w[0]
            )));
        }
        for rule in &self.rules {
            rule.check()?;
        }
        if self.server_lrs.is_empty()
            || self.server_lrs.iter().any(|l| !(l.is_finite() && *l > 0.0))
        {
            return Err(ExperimentError::Invalid(format!(
                "server lrs must be positive numbers, got {:?}",
                self.server_lrs
            )));
        }
        if self.scenarios.is_empty() {
            return Err(ExperimentError::Invalid("no scenario to run".into()));
        }
        Ok(())
    }

    /// The rounds scored: every `score_every`-th and the last.
    pub fn scored_rounds(&self) -> Vec<u64> {
        let (r, k) = (self.rounds.get(), self.score_every.get());
        let mut out: Vec<u64> = (1..=r).filter(|t| t % k == 0).collect();
        if out.last() != Some(&r) {
            out.push(r);
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Recording.

/// One aggregated round as recorded.
#[derive(Debug, Clone)]
pub struct RecordedRound {
    pub round: u64,
    /// The global model the clients started from.
    pub global: ParamSet,
    /// What they returned, by client id.
    pub updates: Vec<ClientUpdate>,
}

#[derive(Debug, Serialize, Deserialize)]
struct RoundMeta {
    round: u64,
    clients: Vec<ClientMeta>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ClientMeta {
    client: u32,
    num_samples: u64,
    num_steps: u64,
    lr_sum: f64,
    mean_loss: f64,
}

fn round_dir(seed_dir: &Path, round: u64) -> PathBuf {
    seed_dir.join(format!("round-{round:04}"))
}

fn client_file(dir: &Path, client: ClientId) -> PathBuf {
    dir.join(format!("client-{:04}.safetensors", client.0))
}

/// Writes one round (the metadata last: it marks the round complete).
fn write_round(seed_dir: &Path, round: &RecordedRound) -> Result<()> {
    let dir = round_dir(seed_dir, round.round);
    std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    save_params_file(&round.global, &dir.join("global.safetensors"))?;
    for u in &round.updates {
        save_params_file(&u.params, &client_file(&dir, u.client))?;
    }
    let meta = RoundMeta {
        round: round.round,
        clients: round
            .updates
            .iter()
            .map(|u| ClientMeta {
                client: u.client.0,
                num_samples: u.num_samples,
                num_steps: u.num_steps,
                lr_sum: u.lr_sum,
                mean_loss: u.mean_loss,
            })
            .collect(),
    };
    let text = serde_json::to_vec_pretty(&meta)
        .map_err(|e| ExperimentError::Internal(format!("cannot encode a round: {e}")))?;
    write_atomic(&dir.join("round.json"), &text)
}

/// Reads round `round` of a recorded seed, in `like`'s layout.
pub fn read_round(seed_dir: &Path, round: u64, like: &ParamSet) -> Result<RecordedRound> {
    let dir = round_dir(seed_dir, round);
    let path = dir.join("round.json");
    let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
    let meta: RoundMeta = serde_json::from_str(&text).map_err(|e| ExperimentError::File {
        path: path.clone(),
        message: format!("not a recorded round: {e}"),
    })?;
    if meta.round != round {
        return Err(ExperimentError::File {
            path,
            message: format!(
                "holds round {} where round {round} was expected",
                meta.round
            ),
        });
    }
    let global = read_params_file(&dir.join("global.safetensors"), like)?;
    let updates = meta
        .clients
        .iter()
        .map(|c| {
            Ok(ClientUpdate {
                client: ClientId(c.client),
                params: read_params_file(&client_file(&dir, ClientId(c.client)), like)?,
                num_samples: c.num_samples,
                num_steps: c.num_steps,
                lr_sum: c.lr_sum,
                mean_loss: c.mean_loss,
                control_delta: None,
            })
        })
        .collect::<Result<_>>()?;
    Ok(RecordedRound {
        round,
        global,
        updates,
    })
}

/// What a [`Recorder`] hands over after a round: the round as the
/// clients saw it and the model the strategy proposed.
type Handed = Arc<Mutex<Option<(RecordedRound, ParamSet)>>>;

/// A strategy that hands every round it aggregates to `slot` (the
/// recording loop writes it out, the replay scores its proposal, after
/// the round) and otherwise is `inner`.
#[derive(Debug)]
struct Recorder {
    inner: Box<dyn Strategy>,
    slot: Handed,
}

impl Strategy for Recorder {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn configure_round(&self, round: u64, clients: &[ClientId]) -> Vec<ClientInstruction> {
        self.inner.configure_round(round, clients)
    }

    fn aggregate(
        &mut self,
        round: u64,
        global: &ParamSet,
        updates: &[ClientUpdate],
    ) -> fedcmp_strategy::Result<Aggregate> {
        let out = self.inner.aggregate(round, global, updates)?;
        let mut updates = updates.to_vec();
        updates.sort_by_key(|u| u.client);
        if let Ok(mut slot) = self.slot.lock() {
            *slot = Some((
                RecordedRound {
                    round,
                    global: global.clone(),
                    updates,
                },
                out.params.clone(),
            ));
        }
        Ok(out)
    }

    fn state(&self) -> StrategyState {
        self.inner.state()
    }

    fn load_state(&mut self, state: StrategyState) -> fedcmp_strategy::Result<()> {
        self.inner.load_state(state)
    }
}

/// The settings of the recorded FedAvg run of `seed`.
fn recording_settings(template: &RunSettings, rounds: NonZeroU64, seed: u64) -> RunSettings {
    let mut s = template.clone();
    s.training = Training::Federated(StrategyConfig::FedAvg(FedAvgConfig { server_lr: 1.0 }));
    s.recipe.rounds = Some(rounds);
    s.protocol.eval_every = rounds;
    s.seed = seed;
    s
}

/// Records `rounds` rounds of seed `seed` under `seed_dir` unless a
/// complete recording is there.
pub fn record(
    experiment: &Experiment,
    template: &RunSettings,
    rounds: NonZeroU64,
    seed: u64,
    seed_dir: &Path,
    observer: &dyn Observer,
) -> Result<u64> {
    let complete = seed_dir.join("complete.json");
    if let Ok(text) = std::fs::read_to_string(&complete) {
        if let Ok(done) = serde_json::from_str::<Complete>(&text) {
            return Ok(done.rounds);
        }
    }
    std::fs::create_dir_all(seed_dir).map_err(io_error(seed_dir))?;
    let settings = recording_settings(template, rounds, seed);
    observer.observe(Event::Status(format!(
        "recording {} rounds of FedAvg, seed {seed}",
        rounds
    )));
    let (clients, _, config) = crate::training::federation_of(experiment, &settings.training)?;
    let slot: Handed = Arc::new(Mutex::new(None));
    let recorder = Recorder {
        inner: config.build(clients.len())?,
        slot: Arc::clone(&slot),
    };
    let mut failure: Option<ExperimentError> = None;
    let mut recorded = 0u64;
    train_with(
        experiment,
        &settings,
        Box::new(recorder),
        None,
        &mut |record| {
            observer.observe(Event::Round(record));
            let taken = slot.lock().ok().and_then(|mut s| s.take());
            if let (Some((round, _)), None) = (taken, &failure) {
                match write_round(seed_dir, &round) {
                    Ok(()) => recorded += 1,
                    Err(e) => failure = Some(e),
                }
            }
        },
    )?;
    if let Some(e) = failure {
        return Err(e);
    }
    let text = serde_json::to_vec(&Complete { rounds: recorded })
        .map_err(|e| ExperimentError::Internal(format!("cannot encode: {e}")))?;
    write_atomic(&complete, &text)?;
    Ok(recorded)
}

#[derive(Debug, Serialize, Deserialize)]
struct Complete {
    rounds: u64,
}

// ---------------------------------------------------------------------------
// Scoring.

/// One rule's proposal at one round of one seed, scored per validation
/// item (in the experiment's validation order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub seed: u64,
    pub rule: String,
    pub server_lr: f64,
    pub round: u64,
    /// `-log p(caption | image)` per item (empty when the replay failed).
    pub nll: Vec<f64>,
    pub tokens: Vec<u32>,
    /// A proposal of the rule's own trajectory (replay), not of the
    /// recorded one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replay: bool,
    /// Why the replay produced no proposal at this round (it diverged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Scores keyed by (replay, seed, rule, lr bits, round).
type ScoreKey = (bool, u64, String, u64, u64);

fn key_of(s: &Score) -> ScoreKey {
    (
        s.replay,
        s.seed,
        s.rule.clone(),
        s.server_lr.to_bits(),
        s.round,
    )
}

/// Which trajectory a rule is scored on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trajectory {
    /// The recorded FedAvg trajectory (the one-step counterfactual).
    Recorded,
    /// The rule's own (replay).
    Own,
}

impl Trajectory {
    fn is_replay(self) -> bool {
        self == Trajectory::Own
    }
}

/// Per-domain item values of scores (summed over the given scores, item
/// by item): the macro NLL of the result is the mean over those rounds.
fn domain_values(
    scores: &[&Score],
    domains: &[usize],
    n_domains: usize,
) -> Vec<Option<DomainValues>> {
    let mut out: Vec<DomainValues> = vec![Vec::new(); n_domains];
    let Some(first) = scores.first() else {
        return vec![None; n_domains];
    };
    // A failed replay's rounds have no items: the whole set has no value
    // (its macro NLL is NaN, never chosen).
    let items = first.nll.len();
    if scores
        .iter()
        .any(|s| s.error.is_some() || s.nll.len() != items || s.tokens.len() != items)
    {
        return vec![None; n_domains];
    }
    for (i, &d) in domains.iter().enumerate().take(items) {
        let num: f64 = scores.iter().map(|s| s.nll[i]).sum();
        let weight: f64 = scores.iter().map(|s| f64::from(s.tokens[i])).sum();
        if let Some(v) = out.get_mut(d) {
            v.push((num, weight));
        }
    }
    out.into_iter()
        .map(|v| (!v.is_empty()).then_some(v))
        .collect()
}

/// One rule's result in one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct RuleResult {
    pub rule: String,
    /// The configuration at the chosen server lr.
    pub config: StrategyConfig,
    pub server_lr: f64,
    /// Mean validation NLL at the tuning seed per server lr of the grid.
    pub tuning: Vec<(f64, f64)>,
    /// Mean validation NLL over reported seeds and scored rounds.
    pub val_nll: f64,
    /// Per scored round: the mean over reported seeds.
    pub per_round: Vec<(u64, f64)>,
    /// The paired difference to the baseline (None for the baseline).
    pub vs_baseline: Option<PairedDifference>,
    /// The paired difference to [`MOMENTUM_BASELINE`] (None for it, or
    /// when no rule has its name).
    pub vs_momentum: Option<PairedDifference>,
    /// Why reported replays failed (diverged), one per failed round.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<String>,
}

/// The harness's result in one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub scenario: String,
    pub seeds: u64,
    pub rounds: u64,
    pub scored_rounds: Vec<u64>,
    pub validation_items: usize,
    /// Mean validation NLL of the recorded global before each scored round
    /// (the start every rule steps from), over reported seeds.
    pub start_nll: Vec<(u64, f64)>,
    /// On the recorded trajectory (the one-step counterfactual).
    pub rules: Vec<RuleResult>,
    /// On each rule's own trajectory (empty without replay).
    pub replay: Vec<RuleResult>,
    /// Per rule and baseline, the two trajectories' verdicts (empty
    /// without replay).
    pub agreement: Vec<Agreement>,
    pub minutes: f64,
    /// Records the scenario's readers and encoder skipped.
    pub skipped: fedcmp_data::record::SkipReport,
}

/// A rule's proposals by round, or why its run did not reach the round.
type Proposals = Vec<(u64, std::result::Result<ParamSet, String>)>;

/// Scores proposals of the recorded rounds of one scenario, and of the
/// rules' own trajectories.
struct Scoring<'a> {
    experiment: &'a Experiment,
    /// The recorded runs' settings (seed and strategy set per replay).
    template: &'a RunSettings,
    rounds: NonZeroU64,
    work: fedcmp_model::projector::Projector,
    like: ParamSet,
    dir: PathBuf,
    scores: BTreeMap<ScoreKey, Score>,
    file: std::fs::File,
    file_path: PathBuf,
    observer: &'a dyn Observer,
    done: u64,
    total: u64,
}

impl Scoring<'_> {
    fn seed_dir(&self, seed: u64) -> PathBuf {
        self.dir.join(format!("seed-{seed}"))
    }

    /// Per-item validation scores of `params`.
    fn score_params(&self, params: &ParamSet) -> Result<(Vec<f64>, Vec<u32>)> {
        load_projector(&self.work, params)?;
        let pairs: Vec<_> = self
            .experiment
            .validation_items
            .iter()
            .map(|i| (&i.sample.key, i.sample.caption.as_str()))
            .collect();
        let scores = self
            .experiment
            .scorer()
            .score_pairs(&self.work, &pairs, 16, &mut |_| {})?;
        Ok((
            scores.iter().map(|s| -s.log_likelihood).collect(),
            scores.iter().map(|s| s.tokens as u32).collect(),
        ))
    }

    fn tick(&mut self) {
        self.done += 1;
        self.observer.observe(Event::Progress {
            stage: Stage::Score,
            done: self.done,
            total: self.total,
        });
    }

    fn keep(&mut self, score: Score) -> Result<()> {
        append_jsonl(&mut self.file, &self.file_path, &score)?;
        self.scores.insert(key_of(&score), score);
        self.tick();
        Ok(())
    }

    /// The scored rounds of `rule` at `lr` on `seed` not scored yet.
    fn missing(&self, on: Trajectory, seed: u64, rule: &str, lr: f64, scored: &[u64]) -> Vec<u64> {
        scored
            .iter()
            .copied()
            .filter(|&t| self.get(on, seed, rule, lr, t).is_none())
            .collect()
    }

    /// Scores `rule` at `lr` on the scored rounds of `seed` (those not
    /// scored yet), on the recorded trajectory or its own.
    fn score_rule(
        &mut self,
        on: Trajectory,
        seed: u64,
        rule: &Rule,
        lr: f64,
        scored: &[u64],
    ) -> Result<()> {
        let missing = self.missing(on, seed, &rule.name, lr, scored);
        if missing.is_empty() {
            return Ok(());
        }
        let proposals = match on {
            Trajectory::Recorded => self.counterfactual(seed, rule, lr, &missing)?,
            Trajectory::Own => self.replay(seed, rule, lr, &missing)?,
        };
        for t in missing {
            let score = match proposals.iter().find(|(r, _)| *r == t) {
                Some((_, Ok(params))) => {
                    let (nll, tokens) = self.score_params(params)?;
                    let bad = nll.iter().filter(|x| !x.is_finite()).count();
                    // JSON has no NaN: a diverged proposal is kept as a
                    // failure (never chosen), not as a score that would be
                    // dropped on reading and made again on every resume.
                    let (nll, tokens, error) = if bad > 0 {
                        let reason = format!("non-finite NLL on {bad} of {} items", nll.len());
                        (Vec::new(), Vec::new(), Some(reason))
                    } else {
                        (nll, tokens, None)
                    };
                    Score {
                        seed,
                        rule: rule.name.clone(),
                        server_lr: lr,
                        round: t,
                        nll,
                        tokens,
                        replay: on.is_replay(),
                        error,
                    }
                }
                Some((_, Err(reason))) => Score {
                    seed,
                    rule: rule.name.clone(),
                    server_lr: lr,
                    round: t,
                    nll: Vec::new(),
                    tokens: Vec::new(),
                    replay: on.is_replay(),
                    error: Some(reason.clone()),
                },
                None => {
                    return Err(ExperimentError::Internal(format!(
                        "rule {} at lr {lr}, seed {seed}: no proposal for round {t}",
                        rule.name
                    )))
                }
            };
            self.keep(score)?;
        }
        Ok(())
    }

    /// The rule's proposals at rounds `wanted`, run over the recorded
    /// rounds in order (the FedAvg trajectory). A rule that fails at a
    /// round (a non-finite step) leaves its reason at every wanted round
    /// from there on.
    fn counterfactual(&self, seed: u64, rule: &Rule, lr: f64, wanted: &[u64]) -> Result<Proposals> {
        let Some(&last) = wanted.last() else {
            return Ok(Vec::new());
        };
        let config = with_server_lr(&rule.config, lr)?;
        let mut strategy = config.build(self.experiment.clients.len())?;
        let seed_dir = self.seed_dir(seed);
        let mut out = Vec::new();
        for t in 1..=last {
            let round = read_round(&seed_dir, t, &self.like)?;
            match strategy.aggregate(t, &round.global, &round.updates) {
                Ok(proposed) => {
                    if wanted.contains(&t) {
                        out.push((t, Ok(proposed.params)));
                    }
                }
                Err(e) => {
                    let reason = format!("round {t}: {e}");
                    tracing::warn!(rule = %rule.name, lr, seed, %reason, "rule failed; recorded");
                    out.extend(
                        wanted
                            .iter()
                            .filter(|&&w| w >= t)
                            .map(|&w| (w, Err(reason.clone()))),
                    );
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The rule's proposals at rounds `wanted` on its own trajectory: the
    /// recorded run's settings with the rule as the strategy, trained from
    /// round 1. A run that fails (diverges) leaves its reason at every
    /// wanted round it did not reach.
    fn replay(&self, seed: u64, rule: &Rule, lr: f64, wanted: &[u64]) -> Result<Proposals> {
        let config = with_server_lr(&rule.config, lr)?;
        let mut settings = recording_settings(self.template, self.rounds, seed);
        settings.training = Training::Federated(config.clone());
        let slot: Handed = Arc::new(Mutex::new(None));
        let recorder = Recorder {
            inner: config.build(self.experiment.clients.len())?,
            slot: Arc::clone(&slot),
        };
        let mut out = Vec::new();
        let outcome = train_with(
            self.experiment,
            &settings,
            Box::new(recorder),
            None,
            &mut |record| {
                self.observer.observe(Event::Round(record));
                let taken = slot.lock().ok().and_then(|mut s| s.take());
                if let Some((round, proposal)) = taken {
                    if wanted.contains(&round.round) {
                        out.push((round.round, Ok(proposal)));
                    }
                }
            },
        );
        if let Err(e) = outcome {
            let reason = e.to_string();
            tracing::warn!(rule = %rule.name, lr, seed, %reason, "replay failed; recorded");
            for &t in wanted {
                if out.iter().all(|(r, _)| *r != t) {
                    out.push((t, Err(reason.clone())));
                }
            }
        }
        Ok(out)
    }

    /// Scores the recorded start of each scored round (no step at all).
    fn score_starts(&mut self, seed: u64, scored: &[u64]) -> Result<()> {
        for &t in scored {
            if self
                .get(Trajectory::Recorded, seed, START, 0.0, t)
                .is_some()
            {
                continue;
            }
            let round = read_round(&self.seed_dir(seed), t, &self.like)?;
            let (nll, tokens) = self.score_params(&round.global)?;
            self.keep(Score {
                seed,
                rule: START.to_string(),
                server_lr: 0.0,
                round: t,
                nll,
                tokens,
                replay: false,
                error: None,
            })?;
        }
        Ok(())
    }

    fn get(&self, on: Trajectory, seed: u64, rule: &str, lr: f64, round: u64) -> Option<&Score> {
        self.scores
            .get(&(on.is_replay(), seed, rule.to_string(), lr.to_bits(), round))
    }
}

/// The pseudo-rule of the recorded starts in `scores.jsonl`.
const START: &str = "(start)";

fn read_scores(path: &Path) -> BTreeMap<ScoreKey, Score> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // A torn last line (a crash mid-write) is dropped and scored again.
    text.lines()
        .filter_map(|l| serde_json::from_str::<Score>(l).ok())
        .map(|s| (key_of(&s), s))
        .collect()
}

/// The text pinned in each scenario folder: the recipe of the recorded
/// runs and the harness's shape.
fn pinned_text(template: &RunSettings, plan: &HarnessPlan) -> Result<String> {
    let mut recipe = recording_settings(template, plan.rounds, 0).to_options();
    recipe.scenario = None;
    recipe.seed = None;
    recipe.out = None;
    let body = toml::to_string(&recipe)
        .map_err(|e| ExperimentError::Internal(format!("cannot encode settings: {e}")))?;
    Ok(format!(
        "# fedcmp harness: the recipe of the recorded FedAvg runs in this folder.\n{body}"
    ))
}

/// Runs the harness on every scenario of `plan`.
pub fn run(
    root: &Path,
    template: &RunSettings,
    plan: &HarnessPlan,
    observer: &dyn Observer,
) -> Result<Vec<ScenarioResult>> {
    plan.validate()?;
    refuse_privacy(template)?;
    let mut out = Vec::new();
    for scenario in &plan.scenarios {
        let data = DataSettings {
            scenario: scenario.clone(),
            ..template.data.clone()
        };
        let experiment = Experiment::assemble(root, &data, Default::default(), observer)?;
        out.push(run_scenario(&experiment, template, plan, observer)?);
    }
    Ok(out)
}

/// The harness on one assembled scenario.
/// The harness compares aggregation rules on the same updates; privacy
/// would noise each rule's aggregate differently.
fn refuse_privacy(template: &RunSettings) -> Result<()> {
    if template.privacy.is_some() {
        return Err(ExperimentError::Invalid(
            "`privacy` is not taken by the harness (it compares aggregation rules on the same \
             updates); run `fedcmp run` or `compare` for private federations"
                .into(),
        ));
    }
    Ok(())
}

pub fn run_scenario(
    experiment: &Experiment,
    template: &RunSettings,
    plan: &HarnessPlan,
    observer: &dyn Observer,
) -> Result<ScenarioResult> {
    plan.validate()?;
    refuse_privacy(template)?;
    let started = std::time::Instant::now();
    let name = experiment.scenario.name.clone();
    let dir = plan.out.join(&name);
    std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    pin(
        &dir.join("settings.toml"),
        &pinned_text(template, plan)?,
        "recorded rounds",
        "use the same recipe and rounds, another --out, or delete the folder",
    )?;
    let seeds: Vec<u64> = (0..plan.seeds.get()).collect();
    for &seed in std::iter::once(&TUNING_SEED).chain(&seeds) {
        let recorded = record(
            experiment,
            template,
            plan.rounds,
            seed,
            &dir.join(format!("seed-{seed}")),
            observer,
        )?;
        if recorded < plan.rounds.get() {
            return Err(ExperimentError::Invalid(format!(
                "{name}, seed {seed}: the run ended after {recorded} rounds (data exhausted); \
                 ask for at most {recorded} rounds"
            )));
        }
    }
    let scored = plan.scored_rounds();
    let file_path = dir.join("scores.jsonl");
    let scores = read_scores(&file_path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file_path)
        .map_err(io_error(&file_path))?;
    let work = experiment.projector(template.recipe.projector, 0)?;
    let like = projector_params(&work)?;
    let rounds_scored = scored.len() as u64;
    let rules = plan.rules.len() as u64;
    let lrs = plan.server_lrs.len() as u64;
    let trajectories = if plan.replay {
        vec![Trajectory::Recorded, Trajectory::Own]
    } else {
        vec![Trajectory::Recorded]
    };
    let per_trajectory = rounds_scored * (rules * lrs + rules * plan.seeds.get());
    let total = per_trajectory * trajectories.len() as u64 + rounds_scored * plan.seeds.get();
    let mut scorer = Scoring {
        experiment,
        template,
        rounds: plan.rounds,
        work,
        like,
        dir: dir.clone(),
        scores,
        file,
        file_path,
        observer,
        done: 0,
        total,
    };
    scorer.done = (scorer.scores.len() as u64).min(total);

    let domains: Vec<usize> = experiment
        .validation_items
        .iter()
        .map(|i| i.domain)
        .collect();
    let n_domains = experiment.suite.domains.len();
    let macro_of = |scores: &[&Score]| -> f64 {
        let values = domain_values(scores, &domains, n_domains);
        let all: Vec<Vec<usize>> = values
            .iter()
            .map(|v| (0..v.as_ref().map_or(0, Vec::len)).collect())
            .collect();
        macro_value(&values, &all)
    };
    let what = |on: Trajectory| match on {
        Trajectory::Recorded => "",
        Trajectory::Own => " (replay)",
    };

    for &seed in &seeds {
        scorer.score_starts(seed, &scored)?;
    }
    // Per trajectory: every rule at every lr on the tuning seed, then the
    // reported seeds at each rule's chosen lr.
    let mut chosen_on: Vec<Vec<Chosen<'_>>> = Vec::new();
    for &on in &trajectories {
        let mut chosen = Vec::new();
        for rule in &plan.rules {
            let mut tuning = Vec::new();
            for &lr in &plan.server_lrs {
                observer.observe(Event::Status(format!(
                    "{name}: tuning {} at server lr {lr}{}",
                    rule.name,
                    what(on)
                )));
                scorer.score_rule(on, TUNING_SEED, rule, lr, &scored)?;
                let mine: Vec<&Score> = scored
                    .iter()
                    .filter_map(|&t| scorer.get(on, TUNING_SEED, &rule.name, lr, t))
                    .collect();
                tuning.push((lr, macro_of(&mine)));
            }
            let best = tuning
                .iter()
                .filter(|(_, v)| v.is_finite())
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map_or(plan.server_lrs[0], |(lr, _)| *lr);
            chosen.push((rule, best, tuning));
        }
        for &seed in &seeds {
            for (rule, lr, _) in &chosen {
                observer.observe(Event::Status(format!(
                    "{name}: seed {seed}, {} at server lr {lr}{}",
                    rule.name,
                    what(on)
                )));
                scorer.score_rule(on, seed, rule, *lr, &scored)?;
            }
        }
        chosen_on.push(chosen);
    }
    observer.observe(Event::StageDone(Stage::Score));

    let seed_scores = |on: Trajectory, rule: &str, lr: f64, seed: u64| -> Vec<&Score> {
        scored
            .iter()
            .filter_map(|&t| scorer.get(on, seed, rule, lr, t))
            .collect()
    };
    // Per scored round, the mean over reported seeds of a rule's macro NLL.
    let curve = |on: Trajectory, rule: &str, lr: f64| -> Vec<(u64, f64)> {
        scored
            .iter()
            .map(|&t| {
                let v: Vec<f64> = seeds
                    .iter()
                    .filter_map(|&s| scorer.get(on, s, rule, lr, t))
                    .map(|sc| macro_of(&[sc]))
                    .collect();
                (t, v.iter().sum::<f64>() / v.len().max(1) as f64)
            })
            .collect()
    };
    let results = |on: Trajectory, chosen: &[Chosen<'_>]| {
        let lr_of = |name: &str| {
            chosen
                .iter()
                .find(|(r, _, _)| r.name == name)
                .map(|(_, lr, _)| *lr)
        };
        // Paired by seed and item: the rule's scores against `base`'s at
        // its lr, on the same trajectory kind.
        let versus = |rule: &Rule, lr: f64, base: &str| -> Option<PairedDifference> {
            let base_lr = lr_of(base)?;
            if rule.name == base {
                return None;
            }
            let pairs: Vec<SeedPair> = seeds
                .iter()
                .map(|&s| {
                    (
                        domain_values(&seed_scores(on, &rule.name, lr, s), &domains, n_domains),
                        domain_values(&seed_scores(on, base, base_lr, s), &domains, n_domains),
                    )
                })
                .collect();
            paired_bootstrap(&pairs, 0)
        };
        chosen
            .iter()
            .map(|(rule, lr, tuning)| {
                let per_seed: Vec<f64> = seeds
                    .iter()
                    .map(|&s| macro_of(&seed_scores(on, &rule.name, *lr, s)))
                    .collect();
                Ok(RuleResult {
                    rule: rule.name.clone(),
                    config: with_server_lr(&rule.config, *lr)?,
                    server_lr: *lr,
                    tuning: tuning.clone(),
                    val_nll: per_seed.iter().sum::<f64>() / per_seed.len().max(1) as f64,
                    per_round: curve(on, &rule.name, *lr),
                    vs_baseline: versus(rule, *lr, BASELINE),
                    vs_momentum: versus(rule, *lr, MOMENTUM_BASELINE),
                    failures: seeds
                        .iter()
                        .flat_map(|&s| seed_scores(on, &rule.name, *lr, s))
                        .filter_map(|sc| sc.error.clone())
                        .collect(),
                })
            })
            .collect::<Result<Vec<_>>>()
    };
    let mut per_trajectory = trajectories
        .iter()
        .zip(&chosen_on)
        .map(|(&on, chosen)| results(on, chosen));
    let rule_results = per_trajectory.next().transpose()?.unwrap_or_default();
    let replay = per_trajectory.next().transpose()?.unwrap_or_default();
    let agreement = agreements(&rule_results, &replay);
    let start_nll = curve(Trajectory::Recorded, START, 0.0);
    Ok(ScenarioResult {
        scenario: name,
        seeds: plan.seeds.get(),
        rounds: plan.rounds.get(),
        scored_rounds: scored,
        validation_items: experiment.validation_items.len(),
        start_nll,
        rules: rule_results,
        replay,
        agreement,
        minutes: started.elapsed().as_secs_f64() / 60.0,
        skipped: experiment.skipped.clone(),
    })
}

/// A rule, its chosen server lr and its tuning (lr, NLL) on one
/// trajectory.
type Chosen<'a> = (&'a Rule, f64, Vec<(f64, f64)>);

/// What a paired difference in validation NLL says about a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Lower NLL: the interval lies below 0.
    Better,
    /// Higher NLL: the interval lies above 0.
    Worse,
    /// The interval holds 0.
    NoDifference,
}

impl Verdict {
    pub fn of(d: &PairedDifference) -> Self {
        if d.holds_zero() {
            Verdict::NoDifference
        } else if d.high < 0.0 {
            Verdict::Better
        } else {
            Verdict::Worse
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Better => "better",
            Verdict::Worse => "worse",
            Verdict::NoDifference => "no difference",
        })
    }
}

/// One rule against one baseline, judged on the recorded trajectory and
/// on its own.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Agreement {
    pub rule: String,
    /// The baseline ([`BASELINE`] or [`MOMENTUM_BASELINE`]).
    pub versus: String,
    pub recorded: Verdict,
    pub own: Verdict,
}

impl Agreement {
    pub fn agrees(&self) -> bool {
        self.recorded == self.own
    }
}

/// For every rule with a difference to a baseline on both trajectories,
/// the two verdicts (the counterfactual's and the replay's).
fn agreements(recorded: &[RuleResult], own: &[RuleResult]) -> Vec<Agreement> {
    let mut out = Vec::new();
    for r in recorded {
        let Some(o) = own.iter().find(|o| o.rule == r.rule) else {
            continue;
        };
        for (versus, a, b) in [
            (BASELINE, &r.vs_baseline, &o.vs_baseline),
            (MOMENTUM_BASELINE, &r.vs_momentum, &o.vs_momentum),
        ] {
            if let (Some(a), Some(b)) = (a, b) {
                out.push(Agreement {
                    rule: r.rule.clone(),
                    versus: versus.to_string(),
                    recorded: Verdict::of(a),
                    own: Verdict::of(b),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod verdict_tests {
    use super::*;

    fn difference(low: f64, high: f64) -> PairedDifference {
        PairedDifference {
            mean: (low + high) / 2.0,
            low,
            high,
            seeds: 3,
        }
    }

    /// NLL differences: an interval below 0 is better, above 0 worse,
    /// one that holds 0 (its ends included) no difference.
    #[test]
    fn a_verdict_reads_the_interval_of_an_nll_difference() {
        assert_eq!(Verdict::of(&difference(-0.3, -0.1)), Verdict::Better);
        assert_eq!(Verdict::of(&difference(0.1, 0.3)), Verdict::Worse);
        assert_eq!(Verdict::of(&difference(-0.1, 0.1)), Verdict::NoDifference);
        assert_eq!(Verdict::of(&difference(0.0, 0.2)), Verdict::NoDifference);
        assert_eq!(Verdict::of(&difference(-0.2, 0.0)), Verdict::NoDifference);
    }

    /// Scores with a failed round among them have no value (NaN macro,
    /// never chosen), instead of reading past the failed round's items.
    #[test]
    fn a_failed_round_leaves_no_value_and_no_panic() {
        let score = |nll: Vec<f64>, error: Option<String>| Score {
            seed: 0,
            rule: "r".into(),
            server_lr: 1.0,
            round: 1,
            tokens: vec![2; nll.len()],
            nll,
            replay: true,
            error,
        };
        let good = score(vec![1.0, 2.0], None);
        let failed = score(Vec::new(), Some("diverged".into()));
        let values = domain_values(&[&good, &failed], &[0, 1], 2);
        assert_eq!(values, vec![None, None]);
        let values = domain_values(&[&good], &[0, 1], 2);
        assert_eq!(values, vec![Some(vec![(1.0, 2.0)]), Some(vec![(2.0, 2.0)])]);
    }

    /// A rule is judged against each baseline it has a difference to on
    /// both trajectories; verdicts that differ are a disagreement.
    #[test]
    fn agreements_pair_the_two_trajectories_rule_by_rule() -> Result<()> {
        let result = |rule: &str, vs: Option<PairedDifference>| -> Result<RuleResult> {
            Ok(RuleResult {
                rule: rule.into(),
                config: with_server_lr(&StrategyConfig::default(), 1.0)?,
                server_lr: 1.0,
                tuning: Vec::new(),
                val_nll: 1.0,
                per_round: Vec::new(),
                vs_baseline: vs,
                vs_momentum: None,
                failures: Vec::new(),
            })
        };
        let recorded = [
            result(BASELINE, None)?,
            result("a", Some(difference(0.1, 0.2)))?,
            result("b", Some(difference(-0.2, -0.1)))?,
            result("only-recorded", Some(difference(0.1, 0.2)))?,
        ];
        let own = [
            result(BASELINE, None)?,
            result("a", Some(difference(-0.1, 0.2)))?,
            result("b", Some(difference(-0.3, -0.1)))?,
        ];
        let found = agreements(&recorded, &own);
        assert_eq!(
            found,
            [
                Agreement {
                    rule: "a".into(),
                    versus: BASELINE.into(),
                    recorded: Verdict::Worse,
                    own: Verdict::NoDifference,
                },
                Agreement {
                    rule: "b".into(),
                    versus: BASELINE.into(),
                    recorded: Verdict::Better,
                    own: Verdict::Better,
                },
            ]
        );
        assert!(!found[0].agrees() && found[1].agrees());
        Ok(())
    }
}
