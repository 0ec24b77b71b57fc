//! Run settings in two tiers.
//!
//! 1. [`RunOptions`]: raw options, every one optional, kebab-case keys,
//!    unknown keys refused. They come in [`Layers`], lowest first: built-in
//!    defaults of a command, a `--config` TOML file, `FEDCMP_*` environment
//!    variables (`FEDCMP_LOCAL_STEPS=2` sets `local-steps`), command-line
//!    flags. A higher layer overrides a lower one key by key.
//! 2. [`RunSettings`]: the merged options resolved once, with defaults,
//!    into typed values (non-zero counts, a strategy config, enums), each
//!    checked with an error that names the key, its value and where it was
//!    set.
//!
//! One rule joins two keys: centralized and local-only training have no
//! strategy, so a `strategy` from a lower layer than `training` gives way
//! (`--config <federated run>/settings.toml --centralized` is that run's
//! centralized reference), while one from the same or a higher layer is
//! refused.
//!
//! The resolved settings are written into every run folder as TOML in the
//! same format ([`RunSettings::to_toml`]), so `--config <run>/settings.toml`
//! repeats a run exactly, and `fedcmp show-config` prints them.
//!
//! ```toml
//! scenario = "domain-silos"
//! training = "federated"
//! seed = 0
//! local-steps = 4
//! lr = 0.0003
//!
//! [strategy]
//! name = "fed-cmp"
//! energy = 0.9
//! ```

use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use fedcmp_model::projector::ProjectorKind;
use fedcmp_runtime::hostile::AttackConfig;
use fedcmp_strategy::config::StrategyConfig;
use fedcmp_strategy::privacy::central::{private, CentralDp, Federation};
use fedcmp_strategy::privacy::config::{DpMode, PrivacyConfig};
use fedcmp_strategy::privacy::local::{locally_private, LocalDp};
use serde::{Deserialize, Deserializer, Serialize};

use fedcmp_data::templates::CaptionStyle;

use crate::backbones::{BackboneSettings, VisionChoice, DEFAULT_FEATURE_LAYER, DEFAULT_IMAGE_SIZE};
use crate::{ExperimentError, Result};

/// What kind of training a run does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrainingKind {
    /// The scenario's clients with a strategy.
    #[default]
    Federated,
    /// Every shard pooled into one client (the upper bound).
    Centralized,
    /// Every client alone on its shard (the lower bound).
    LocalOnly,
}

/// Raw options: what a user may set, each optional (see the module
/// header for where they come from).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RunOptions {
    /// A built-in scenario (iid, concept-skew, domain-silos, cross-device)
    /// or a scenario TOML file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scenario: Option<String>,
    /// Cap every source of the scenario at this many records.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// How template-captioned sources caption: varied or content (default:
    /// the scenario's own choice).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub captions: Option<CaptionStyle>,
    /// Text between the visual tokens and the caption, not scored (default
    /// none: LLaVA's plain layout).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption_separator: Option<String>,
    /// federated, centralized or local-only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingKind>,
    /// Seed of client sampling, dropouts, shuffles and initialisation (the
    /// scenario's own seed fixes the data split).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Stop after this many rounds (default: one pass over every shard).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rounds: Option<u64>,
    /// Local optimiser steps per round.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_steps: Option<usize>,
    /// Samples per local step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Peak learning rate of the global warm-up + cosine schedule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Share of the sample budget spent warming up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_ratio: Option<f64>,
    /// Reset each client's AdamW moments every round.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset_optimizer: Option<bool>,
    /// Projector kind: linear or mlp2x_gelu.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub projector: Option<String>,
    /// Validate the global projector every N rounds (and after the last).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_every: Option<u64>,
    /// Save a server checkpoint every N rounds (and after the last).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<u64>,
    /// Updates a round needs to be aggregated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quorum: Option<usize>,
    /// Seconds a round waits for its clients (default: as long as they take).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub round_deadline: Option<f64>,
    /// Rounds a client may fail in a row before it is retired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_limit: Option<u32>,
    /// Simulation: clients whose local steps share one decoder pass, a
    /// number or `"all"` (a round's clients, as memory allows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clients_per_pass: Option<ClientsPerPass>,
    /// Decoder LLM: a .gguf file or a Hugging Face folder (default:
    /// SmolLM2-135M from the registries).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm: Option<PathBuf>,
    /// Vision encoder: mobilenet-v2, patch-means, or a Hugging Face CLIP
    /// or SigLIP model folder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vision: Option<VisionChoice>,
    /// A CLIP/SigLIP folder's feature layer: an index into its hidden
    /// states, negative from the end (default -2, LLaVA's penultimate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vision_feature_layer: Option<i32>,
    /// Encoder input size in pixels (default 112; a CLIP/SigLIP folder's
    /// is its own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_size: Option<usize>,
    /// Visual tokens per image: the encoder's patch grid average-pooled to
    /// a square number (MobileNetV2 at 112 px: 16, 4 or 1; default: the
    /// whole grid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub visual_tokens: Option<usize>,
    /// Folder for run folders.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out: Option<PathBuf>,
    /// Simulation: hostile clients that send corrupted updates, a table
    /// (`{ kind = "sign-flip", count = 2 }`; see
    /// [`fedcmp_runtime::hostile`]). Federated training only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attack: Option<AttackConfig>,
    /// Client-level differential privacy, a table: `{ clip-norm = 0.5,
    /// noise-multiplier = 1.0 }` or `{ clip-norm = 0.5, target-epsilon = 8 }`
    /// (with `rounds`), `delta` (default 1e-5), `mode` (`central`, DP-FedAvg
    /// around the strategy, or `local`, each client noising its own
    /// update). Federated training only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyConfig>,
    /// The strategy: a name, or a table with `name` and its options.
    /// Last, since TOML tables follow plain keys.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strategy_by_name_or_table"
    )]
    pub strategy: Option<StrategyConfig>,
}

/// The steps-parity recipe the federated pilot chose (docs/RESULTS.md §2,
/// `scripts/federated_pilot.sh`): on domain-silos (8 clients per round)
/// 8 local steps of 2 pairs per client and round take as many sequential
/// steps as the centralized reference at batch 16 (128 over one pass of
/// 2,040 pairs); peak lr 2e-2 had the best validation NLL of FedAvg on the
/// tuning seed among {3e-3, 1e-2, 2e-2}. The defaults of `local-steps`,
/// `batch-size` and `lr`.
pub const DEFAULT_LOCAL_STEPS: usize = 8;
/// Pairs per local step of one client (see [`DEFAULT_LOCAL_STEPS`]).
pub const DEFAULT_BATCH_SIZE: usize = 2;
/// Peak learning rate (see [`DEFAULT_LOCAL_STEPS`]).
pub const DEFAULT_LR: f64 = 2e-2;

/// The research recipe (ALGORITHMS.md §7.1-7.3): content captions after a
/// newline separator, one visual token per image, on top of the default
/// steps-parity recipe. The main job, the harness and the pilots start
/// from it.
pub fn research_recipe() -> RunOptions {
    RunOptions {
        captions: Some(CaptionStyle::Content),
        caption_separator: Some("\n".into()),
        visual_tokens: Some(1),
        ..RunOptions::default()
    }
}

/// Every option key, in file order.
pub const KEYS: [&str; 28] = [
    "scenario",
    "limit",
    "captions",
    "caption-separator",
    "training",
    "seed",
    "rounds",
    "local-steps",
    "batch-size",
    "lr",
    "warmup-ratio",
    "reset-optimizer",
    "projector",
    "eval-every",
    "checkpoint-every",
    "quorum",
    "round-deadline",
    "failure-limit",
    "clients-per-pass",
    "llm",
    "vision",
    "vision-feature-layer",
    "image-size",
    "visual-tokens",
    "out",
    "attack",
    "privacy",
    "strategy",
];

/// The environment variable that sets `key`.
pub fn env_var(key: &str) -> String {
    format!("FEDCMP_{}", key.to_uppercase().replace('-', "_"))
}

fn strategy_by_name_or_table<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<StrategyConfig>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Name(String),
        Table(toml::Table),
    }
    let table = match Raw::deserialize(d)? {
        Raw::Name(name) => {
            toml::Table::from_iter([("name".to_string(), toml::Value::String(name))])
        }
        Raw::Table(t) => t,
    };
    StrategyConfig::deserialize(toml::Value::Table(table))
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// A strategy from a command-line value: a name (`fed-cmp`) or an inline
/// TOML table (`{ name = "fed-cmp", energy = 0.9 }`).
pub fn parse_strategy(text: &str) -> Result<StrategyConfig> {
    let trimmed = text.trim();
    let value: toml::Value = if trimmed.starts_with('{') {
        toml::from_str::<toml::Table>(&format!("v = {trimmed}"))
            .map_err(|e| bad_strategy(text, e))?
            .remove("v")
            .unwrap_or(toml::Value::Boolean(false))
    } else {
        toml::Value::String(trimmed.to_string())
    };
    let options = RunOptions::deserialize(toml::Value::Table(toml::Table::from_iter([(
        "strategy".to_string(),
        value,
    )])))
    .map_err(|e| bad_strategy(text, e))?;
    options
        .strategy
        .ok_or_else(|| ExperimentError::Invalid(format!("no strategy in {text:?}")))
}

/// Options with `key` set from a command-line value, an inline TOML table;
/// `example` shows the reader one when it is not.
fn inline_table(key: &str, text: &str, example: &str) -> Result<RunOptions> {
    let bad = |e: &dyn std::fmt::Display| {
        ExperimentError::Invalid(format!(
            "{key} {text:?} is not a {key} table ({e}); e.g. {example}"
        ))
    };
    let table =
        toml::from_str::<toml::Table>(&format!("{key} = {}", text.trim())).map_err(|e| bad(&e))?;
    RunOptions::deserialize(toml::Value::Table(table)).map_err(|e| bad(&e))
}

/// An attack from a command-line value: an inline TOML table
/// (`{ kind = "sign-flip", count = 2 }`).
pub fn parse_attack(text: &str) -> Result<AttackConfig> {
    inline_table(
        "attack",
        text,
        "{ kind = \"sign-flip\", count = 2 } (kinds sign-flip, scaled with factor, random with std)",
    )?
    .attack
    .ok_or_else(|| ExperimentError::Invalid(format!("no attack in {text:?}")))
}

/// Privacy settings from a command-line value: an inline TOML table
/// (`{ clip-norm = 0.5, noise-multiplier = 1.0 }`).
pub fn parse_privacy(text: &str) -> Result<PrivacyConfig> {
    inline_table(
        "privacy",
        text,
        "{ clip-norm = 0.5, noise-multiplier = 1.0 } or { clip-norm = 0.5, target-epsilon = 8.0 }",
    )?
    .privacy
    .ok_or_else(|| ExperimentError::Invalid(format!("no privacy settings in {text:?}")))
}

fn bad_strategy(text: &str, e: impl std::fmt::Display) -> ExperimentError {
    ExperimentError::Invalid(format!(
        "strategy {text:?} is not a strategy configuration ({e}); known names: {}",
        fedcmp_strategy::config::NAMES.join(", ")
    ))
}

/// Where a layer of options came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A command's own defaults (named).
    Defaults(String),
    /// A `--config` file.
    File(PathBuf),
    /// `FEDCMP_*` variables.
    Environment,
    /// Command-line flags.
    Flags,
}

#[derive(Debug, Clone)]
struct Layer {
    origin: Origin,
    table: toml::Table,
}

/// Option layers, lowest first; see the module header.
#[derive(Debug, Clone, Default)]
pub struct Layers {
    layers: Vec<Layer>,
}

/// The options as a TOML table. TOML integers are signed 64-bit: a
/// larger value is refused here, naming its key.
fn to_table(options: &RunOptions, origin: &Origin) -> Result<toml::Table> {
    if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(options) {
        for (key, value) in fields {
            if value.as_u64().is_some_and(|v| v > i64::MAX as u64) {
                return Err(ExperimentError::Setting {
                    origin: origin_text(origin, &key),
                    field: key,
                    value: value.to_string(),
                    reason: format!("must be at most {} (a TOML integer)", i64::MAX),
                });
            }
        }
    }
    toml::Table::try_from(options)
        .map_err(|e| ExperimentError::Internal(format!("cannot encode options: {e}")))
}

fn origin_text(origin: &Origin, key: &str) -> String {
    match origin {
        Origin::Flags => format!("--{key}"),
        Origin::Environment => env_var(key),
        Origin::File(path) => path.display().to_string(),
        Origin::Defaults(what) => what.clone(),
    }
}

impl Layers {
    /// No options at all (every setting at its default).
    pub fn new() -> Self {
        Self::default()
    }

    fn push(mut self, origin: Origin, options: &RunOptions) -> Result<Self> {
        let table = to_table(options, &origin)?;
        self.layers.push(Layer { origin, table });
        Ok(self)
    }

    /// A command's own defaults, `what` naming them in messages.
    pub fn defaults(self, what: &str, options: &RunOptions) -> Result<Self> {
        self.push(Origin::Defaults(what.to_string()), options)
    }

    /// A TOML settings file (a run folder's `settings.toml` is one).
    pub fn file(self, path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(crate::io_error(path))?;
        self.settings_text(Origin::File(path.to_path_buf()), &text)
    }

    /// Settings in TOML text that did not come from a file of this
    /// process (e.g. what a federation's server sent its sites), `what`
    /// naming them in messages.
    pub fn text(self, what: &str, text: &str) -> Result<Self> {
        self.settings_text(Origin::Defaults(what.to_string()), text)
    }

    fn settings_text(self, origin: Origin, text: &str) -> Result<Self> {
        let options: RunOptions = toml::from_str(text).map_err(|e| ExperimentError::File {
            path: match &origin {
                Origin::File(path) => path.clone(),
                other => PathBuf::from(origin_text(other, "settings")),
            },
            message: format!("not a settings file: {e}"),
        })?;
        self.push(origin, &options)
    }

    /// The `FEDCMP_<KEY>` variables among `vars` (others are ignored;
    /// `FEDCMP_*` names that are no key draw a warning). A value is read as
    /// a TOML value (`2`, `1e-3`, `true`, `{ name = "fed-cmp" }`), else as
    /// a string.
    pub fn environment(self, vars: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        let mut table = toml::Table::new();
        for (var, text) in vars {
            let Some(rest) = var.strip_prefix("FEDCMP_") else {
                continue;
            };
            let key = rest.to_lowercase().replace('_', "-");
            if !KEYS.contains(&key.as_str()) {
                if var != "FEDCMP_CACHE_DIR" {
                    tracing::warn!(%var, "not a setting; ignored (settings: FEDCMP_ + a key of `fedcmp show-config`)");
                }
                continue;
            }
            let parsed = toml::from_str::<toml::Table>(&format!("v = {text}"))
                .ok()
                .and_then(|mut t| t.remove("v"));
            let candidates = parsed
                .into_iter()
                .chain(std::iter::once(toml::Value::String(text.clone())));
            let mut accepted = None;
            let mut last_error = String::new();
            for value in candidates {
                let single = toml::Table::from_iter([(key.clone(), value.clone())]);
                match RunOptions::deserialize(toml::Value::Table(single)) {
                    Ok(_) => {
                        accepted = Some(value);
                        break;
                    }
                    Err(e) => last_error = e.to_string(),
                }
            }
            let value = accepted.ok_or_else(|| ExperimentError::Setting {
                field: key.clone(),
                value: text.clone(),
                origin: var.clone(),
                reason: last_error,
            })?;
            table.insert(key, value);
        }
        let mut layers = self;
        layers.layers.push(Layer {
            origin: Origin::Environment,
            table,
        });
        Ok(layers)
    }

    /// Command-line flags.
    pub fn flags(self, options: &RunOptions) -> Result<Self> {
        self.push(Origin::Flags, options)
    }

    /// The merged options (each key from the highest layer that sets it).
    pub fn options(&self) -> Result<RunOptions> {
        let mut merged = toml::Table::new();
        for layer in &self.layers {
            for (k, v) in &layer.table {
                merged.insert(k.clone(), v.clone());
            }
        }
        RunOptions::deserialize(toml::Value::Table(merged))
            .map_err(|e| ExperimentError::Invalid(format!("merged settings: {e}")))
    }

    /// Where `key` was set, for messages: a flag, a variable, a file, a
    /// command's defaults, or "default".
    pub fn origin(&self, key: &str) -> String {
        self.layers
            .iter()
            .rev()
            .find(|l| l.table.contains_key(key))
            .map_or_else(|| "default".to_string(), |l| origin_text(&l.origin, key))
    }

    /// The position of the highest layer that sets `key` (higher wins).
    fn layer_of(&self, key: &str) -> Option<usize> {
        self.layers.iter().rposition(|l| l.table.contains_key(key))
    }

    /// Refuses any of `keys` set in any layer, saying `why`.
    pub fn refuse(&self, keys: &[&str], why: &str) -> Result<()> {
        for key in keys {
            if self.layers.iter().any(|l| l.table.contains_key(*key)) {
                return Err(ExperimentError::Invalid(format!(
                    "`{key}` (from {}) cannot be set here: {why}",
                    self.origin(key)
                )));
            }
        }
        Ok(())
    }
}

/// How a run trains.
#[derive(Debug, Clone, PartialEq)]
pub enum Training {
    Federated(StrategyConfig),
    Centralized,
    LocalOnly,
}

impl Training {
    /// The method's name in run folders and reports: the strategy's name,
    /// `centralized` or `local-only`.
    pub fn method(&self) -> &'static str {
        match self {
            Training::Federated(s) => s.name(),
            Training::Centralized => "centralized",
            Training::LocalOnly => "local-only",
        }
    }
}

/// How every client trains, and for how long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recipe {
    /// Stop after this many rounds (None: one pass over every shard).
    pub rounds: Option<NonZeroU64>,
    pub local_steps: NonZeroUsize,
    pub batch_size: NonZeroUsize,
    /// Peak learning rate of the global warm-up + cosine schedule.
    pub lr: f64,
    pub warmup_ratio: f64,
    pub reset_optimizer: bool,
    pub projector: ProjectorKind,
}

/// Simulation: how many of a round's clients train through the frozen
/// decoder in one pass (their local steps together, each with its own
/// projector, optimiser and loss; equal to one at a time up to float
/// rounding, and bit-identical to itself at the same number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientsPerPass {
    /// Every client of a round, as long as their batches hold at most
    /// [`SAMPLES_PER_PASS`] pairs together; more clients than that train in
    /// passes of as many as fit. Depends only on the settings, never on the
    /// machine, so results are the same everywhere.
    All,
    /// At most this many at a time.
    At(NonZeroUsize),
}

/// The most pairs one decoder pass holds when `clients-per-pass = "all"`
/// (about 10 MB of activations per pair at SmolLM2-135M's size, so ~2.5
/// GB here).
pub const SAMPLES_PER_PASS: usize = 256;

impl ClientsPerPass {
    /// Clients per pass for rounds of `round_clients` clients taking
    /// `batch_size` pairs per local step.
    pub fn resolve(self, round_clients: usize, batch_size: usize) -> usize {
        match self {
            ClientsPerPass::At(n) => n.get(),
            ClientsPerPass::All => round_clients
                .min(SAMPLES_PER_PASS / batch_size.max(1))
                .max(1),
        }
    }
}

impl std::fmt::Display for ClientsPerPass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientsPerPass::All => f.write_str("all"),
            ClientsPerPass::At(n) => write!(f, "{n}"),
        }
    }
}

impl std::str::FromStr for ClientsPerPass {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let text = text.trim();
        if text == "all" {
            return Ok(ClientsPerPass::All);
        }
        text.parse::<usize>()
            .ok()
            .and_then(NonZeroUsize::new)
            .map(ClientsPerPass::At)
            .ok_or_else(|| {
                format!("{text:?} is neither \"all\" nor a number of clients (at least 1)")
            })
    }
}

impl Serialize for ClientsPerPass {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            ClientsPerPass::All => s.serialize_str("all"),
            ClientsPerPass::At(n) => s.serialize_u64(n.get() as u64),
        }
    }
}

impl<'de> Deserialize<'de> for ClientsPerPass {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u64),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) => usize::try_from(n)
                .ok()
                .and_then(NonZeroUsize::new)
                .map(ClientsPerPass::At)
                .ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "clients-per-pass = {n}: must be \"all\" or at least 1"
                    ))
                }),
            Raw::Word(w) => w.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// How rounds are run and recorded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Protocol {
    pub eval_every: NonZeroU64,
    pub checkpoint_every: NonZeroU64,
    pub quorum: NonZeroUsize,
    pub round_deadline: Option<Duration>,
    pub failure_limit: NonZeroU32,
    /// Simulation only: how many of a round's clients train together.
    pub clients_per_pass: ClientsPerPass,
}

/// What an experiment is assembled from: the scenario and its data, how a
/// pair becomes a token sequence, and the frozen backbones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataSettings {
    /// A built-in scenario name or a scenario file.
    pub scenario: String,
    pub limit: Option<NonZeroUsize>,
    /// Overrides the scenario's caption style.
    pub captions: Option<CaptionStyle>,
    /// Unscored text between the visual tokens and the caption.
    pub caption_separator: String,
    pub backbones: BackboneSettings,
}

/// Where run folders go when `out` is unset.
pub const DEFAULT_OUT: &str = "runs";

/// Resolved, validated settings of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSettings {
    pub data: DataSettings,
    pub training: Training,
    /// Simulated hostile clients (federated training only).
    pub attack: Option<AttackConfig>,
    /// Client-level differential privacy (federated training only).
    pub privacy: Option<PrivacyConfig>,
    pub seed: u64,
    pub recipe: Recipe,
    pub protocol: Protocol,
    pub out: PathBuf,
}

/// Checks one value, naming the key, its value and its origin on failure.
struct Resolver<'a> {
    layers: &'a Layers,
}

impl Resolver<'_> {
    fn fail(&self, key: &str, value: impl std::fmt::Display, reason: &str) -> ExperimentError {
        ExperimentError::Setting {
            field: key.to_string(),
            value: value.to_string(),
            origin: self.layers.origin(key),
            reason: reason.to_string(),
        }
    }

    fn count<T: TryFrom<u64> + Copy>(
        &self,
        key: &str,
        value: Option<u64>,
        default: u64,
    ) -> Result<T> {
        let v = value.unwrap_or(default);
        if v == 0 {
            return Err(self.fail(key, v, "must be at least 1"));
        }
        T::try_from(v).map_err(|_| self.fail(key, v, "is too large"))
    }
}

impl RunSettings {
    /// Resolves and validates merged `layers` (defaults where unset).
    pub fn resolve(layers: &Layers) -> Result<Self> {
        let o = layers.options()?;
        let r = Resolver { layers };
        let nz_usize = |key: &str, v: Option<usize>, default: u64| -> Result<NonZeroUsize> {
            let n: usize = r.count(key, v.map(|x| x as u64), default)?;
            NonZeroUsize::new(n).ok_or_else(|| r.fail(key, n, "must be at least 1"))
        };
        let nz_u64 = |key: &str, v: Option<u64>, default: u64| -> Result<NonZeroU64> {
            let n: u64 = r.count(key, v, default)?;
            NonZeroU64::new(n).ok_or_else(|| r.fail(key, n, "must be at least 1"))
        };
        let training = match (o.training.unwrap_or_default(), o.strategy) {
            (TrainingKind::Federated, strategy) => {
                let strategy = strategy.unwrap_or_default();
                strategy
                    .validate(1)
                    .map_err(|e| r.fail("strategy", strategy.name(), &e.to_string()))?;
                Training::Federated(strategy)
            }
            // A strategy from a lower layer than the training kind (a run
            // folder's settings.toml under `--centralized`) is overridden.
            (TrainingKind::Centralized, Some(_))
                if layers.layer_of("strategy") < layers.layer_of("training") =>
            {
                Training::Centralized
            }
            (TrainingKind::LocalOnly, Some(_))
                if layers.layer_of("strategy") < layers.layer_of("training") =>
            {
                Training::LocalOnly
            }
            (kind, Some(strategy)) => {
                let training = if kind == TrainingKind::Centralized {
                    "centralized"
                } else {
                    "local-only"
                };
                return Err(r.fail(
                    "strategy",
                    strategy.name(),
                    &format!(
                        "{training} training ({}) has no server strategy; leave `strategy` unset",
                        layers.origin("training")
                    ),
                ));
            }
            (TrainingKind::Centralized, None) => Training::Centralized,
            (TrainingKind::LocalOnly, None) => Training::LocalOnly,
        };
        if let (Some(attack), false) = (&o.attack, matches!(training, Training::Federated(_))) {
            return Err(r.fail(
                "attack",
                format!("{:?}", attack.kind),
                &format!(
                    "applies to federated training, not {} ({})",
                    training.method(),
                    layers.origin("training")
                ),
            ));
        }
        if let Some(privacy) = &o.privacy {
            let Training::Federated(strategy) = &training else {
                return Err(r.fail(
                    "privacy",
                    "[privacy]",
                    &format!(
                        "applies to federated training, not {} ({})",
                        training.method(),
                        layers.origin("training")
                    ),
                ));
            };
            privacy
                .validate()
                .map_err(|e| r.fail("privacy", "[privacy]", &e.to_string()))?;
            if privacy.target_epsilon.is_some() && o.rounds.is_none() {
                return Err(r.fail(
                    "privacy",
                    "[privacy]",
                    "`target-epsilon` needs `rounds` (the noise is set for the planned rounds)",
                ));
            }
            // Whether the strategy composes with privacy, on a stand-in
            // federation (the real one is known when the run starts).
            let composes = match privacy.mode {
                DpMode::Central => {
                    let stand_in = CentralDp {
                        clip_norm: privacy.clip_norm,
                        noise_multiplier: 1.0,
                        delta: privacy.delta,
                        budget: None,
                        adaptive: None,
                    };
                    let federation = Federation {
                        clients: 2,
                        per_round: 1,
                    };
                    private(strategy, &stand_in, federation).map(drop)
                }
                DpMode::Local => {
                    let stand_in = LocalDp {
                        clip_norm: privacy.clip_norm,
                        noise_multiplier: 1.0,
                        delta: privacy.delta,
                        budget: None,
                    };
                    locally_private(strategy, stand_in, 2).map(drop)
                }
            };
            composes.map_err(|e| r.fail("privacy", "[privacy]", &e.to_string()))?;
        }
        let lr = o.lr.unwrap_or(DEFAULT_LR);
        if !(lr.is_finite() && lr > 0.0) {
            return Err(r.fail("lr", lr, "must be a positive number"));
        }
        let warmup_ratio = o.warmup_ratio.unwrap_or(0.03);
        if !(0.0..1.0).contains(&warmup_ratio) {
            return Err(r.fail("warmup-ratio", warmup_ratio, "must be in [0, 1)"));
        }
        let projector_text = o.projector.unwrap_or_else(|| "mlp2x_gelu".to_string());
        let projector = ProjectorKind::from_str(&projector_text)
            .map_err(|_| r.fail("projector", &projector_text, "must be linear or mlp2x_gelu"))?;
        let round_deadline = match o.round_deadline {
            None => None,
            Some(s) if s.is_finite() && s > 0.0 => Some(Duration::from_secs_f64(s)),
            Some(s) => {
                return Err(r.fail("round-deadline", s, "must be a positive number of seconds"))
            }
        };
        let failure_limit = o.failure_limit.unwrap_or(3);
        let scenario = o.scenario.unwrap_or_else(|| "domain-silos".to_string());
        if scenario.trim().is_empty() {
            return Err(r.fail(
                "scenario",
                "\"\"",
                "must name a scenario or a scenario file",
            ));
        }
        let vision = o.vision.clone().unwrap_or_default();
        let feature_layer = match (&vision, o.vision_feature_layer) {
            (VisionChoice::Folder(_), layer) => Some(layer.unwrap_or(DEFAULT_FEATURE_LAYER)),
            (_, None) => None,
            (other, Some(layer)) => {
                return Err(r.fail(
                    "vision-feature-layer",
                    layer,
                    &format!("applies to a CLIP or SigLIP model folder, not to vision = {other}"),
                ))
            }
        };
        let visual_tokens = o
            .visual_tokens
            .map(|n| nz_usize("visual-tokens", Some(n), 1).map(NonZeroUsize::get))
            .transpose()?;
        Ok(Self {
            data: DataSettings {
                scenario,
                limit: o.limit.map(|l| nz_usize("limit", Some(l), 1)).transpose()?,
                captions: o.captions,
                caption_separator: o.caption_separator.unwrap_or_default(),
                backbones: BackboneSettings {
                    llm: o.llm,
                    image_size: match (&vision, o.image_size) {
                        (VisionChoice::Folder(_), None) => None,
                        (_, size) => {
                            Some(nz_usize("image-size", size, DEFAULT_IMAGE_SIZE as u64)?.get())
                        }
                    },
                    feature_layer,
                    vision,
                    visual_tokens,
                },
            },
            training,
            attack: o.attack,
            privacy: o.privacy,
            seed: o.seed.unwrap_or(0),
            recipe: Recipe {
                rounds: o.rounds.map(|n| nz_u64("rounds", Some(n), 1)).transpose()?,
                local_steps: nz_usize("local-steps", o.local_steps, DEFAULT_LOCAL_STEPS as u64)?,
                batch_size: nz_usize("batch-size", o.batch_size, DEFAULT_BATCH_SIZE as u64)?,
                lr,
                warmup_ratio,
                reset_optimizer: o.reset_optimizer.unwrap_or(false),
                projector,
            },
            protocol: Protocol {
                eval_every: nz_u64("eval-every", o.eval_every, 5)?,
                checkpoint_every: nz_u64("checkpoint-every", o.checkpoint_every, 5)?,
                quorum: nz_usize("quorum", o.quorum, 1)?,
                round_deadline,
                failure_limit: NonZeroU32::new(failure_limit)
                    .ok_or_else(|| r.fail("failure-limit", 0, "must be at least 1"))?,
                clients_per_pass: o.clients_per_pass.unwrap_or(ClientsPerPass::All),
            },
            out: o.out.unwrap_or_else(|| PathBuf::from(DEFAULT_OUT)),
        })
    }

    /// The run's name in run folders: the method, and the attack when
    /// there is one (`fedavg-sign-flip-2`, `median-scaled-clients-0-3`),
    /// so that a run under attack never resumes the same run without.
    pub fn run_label(&self) -> String {
        let method = self.training.method();
        match &self.attack {
            None => method.to_string(),
            Some(a) => {
                let kind = serde_json::to_value(a.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                let who = match (&a.count, &a.clients) {
                    (Some(n), _) => n.to_string(),
                    (None, Some(ids)) => {
                        let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
                        format!("clients-{}", ids.join("-"))
                    }
                    (None, None) => String::new(),
                };
                format!("{method}-{kind}-{who}")
            }
        }
    }

    /// The settings as options (every key that has a value), the inverse
    /// of [`RunSettings::resolve`].
    pub fn to_options(&self) -> RunOptions {
        let (training, strategy) = match &self.training {
            Training::Federated(s) => (TrainingKind::Federated, Some(s.clone())),
            Training::Centralized => (TrainingKind::Centralized, None),
            Training::LocalOnly => (TrainingKind::LocalOnly, None),
        };
        let data = &self.data;
        RunOptions {
            scenario: Some(data.scenario.clone()),
            limit: data.limit.map(NonZeroUsize::get),
            captions: data.captions,
            caption_separator: Some(data.caption_separator.clone()),
            training: Some(training),
            seed: Some(self.seed),
            rounds: self.recipe.rounds.map(NonZeroU64::get),
            local_steps: Some(self.recipe.local_steps.get()),
            batch_size: Some(self.recipe.batch_size.get()),
            lr: Some(self.recipe.lr),
            warmup_ratio: Some(self.recipe.warmup_ratio),
            reset_optimizer: Some(self.recipe.reset_optimizer),
            projector: Some(self.recipe.projector.to_string()),
            eval_every: Some(self.protocol.eval_every.get()),
            checkpoint_every: Some(self.protocol.checkpoint_every.get()),
            quorum: Some(self.protocol.quorum.get()),
            round_deadline: self.protocol.round_deadline.map(|d| d.as_secs_f64()),
            failure_limit: Some(self.protocol.failure_limit.get()),
            clients_per_pass: Some(self.protocol.clients_per_pass),
            llm: data.backbones.llm.clone(),
            vision: Some(data.backbones.vision.clone()),
            vision_feature_layer: data.backbones.feature_layer,
            image_size: data.backbones.image_size,
            visual_tokens: data.backbones.visual_tokens,
            out: Some(self.out.clone()),
            attack: self.attack.clone(),
            privacy: self.privacy.clone(),
            strategy,
        }
    }

    /// The settings as a TOML settings file (what run folders hold and
    /// `--config` reads back).
    pub fn to_toml(&self) -> Result<String> {
        let body = toml::to_string(&self.to_options())
            .map_err(|e| ExperimentError::Internal(format!("cannot encode settings: {e}")))?;
        Ok(format!(
            "# fedcmp run settings, resolved: `fedcmp run --config <this file>` repeats the run.\n{body}"
        ))
    }

    /// The keys set in `layers` with where each came from (for
    /// `show-config`), in file order.
    pub fn origins(layers: &Layers) -> Vec<(&'static str, String)> {
        KEYS.iter()
            .map(|k| (*k, layers.origin(k)))
            .filter(|(_, o)| o != "default")
            .collect()
    }
}
