//! Command-line flags for the run settings, mapped one to one onto the
//! library's raw options (`fedcmp_experiment::RunOptions`), and the layers
//! they join: a command's own defaults, `--config FILE`, `FEDCMP_*`
//! variables, then the flags. Flags carry no defaults of their own, so an
//! unset flag never hides a value from the file or the environment; the
//! defaults live in one place, `RunSettings::resolve`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use fedcmp_data::templates::CaptionStyle;
use fedcmp_experiment::backbones::VisionChoice;
use fedcmp_experiment::settings::{
    parse_attack, parse_privacy, parse_strategy, ClientsPerPass, TrainingKind,
};
use fedcmp_experiment::{Layers, RunOptions};
use fedcmp_runtime::hostile::AttackConfig;
use fedcmp_strategy::config::StrategyConfig;
use fedcmp_strategy::privacy::config::PrivacyConfig;

/// A kebab-case enum value, parsed as the settings file would.
pub(crate) fn kebab<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    T::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(text))
        .map_err(|e| e.to_string())
}

/// The --strategy help, naming every strategy of the registry.
fn strategy_help() -> String {
    format!(
        "Strategy: a name ({}), or an inline TOML table with its options, e.g. \
         '{{ name = \"fed-cmp\", energy = 0.9 }}' [default: fedavg]",
        fedcmp_strategy::config::NAMES.join(", ")
    )
}

/// A flag's text with `\n` and `\t` read as a newline and a tab.
fn unescape(text: &str) -> Result<String, String> {
    Ok(text.replace("\\n", "\n").replace("\\t", "\t"))
}

fn vision_choice(text: &str) -> Result<VisionChoice, String> {
    text.parse()
}

fn strategy(text: &str) -> Result<StrategyConfig, String> {
    parse_strategy(text).map_err(|e| e.to_string())
}

fn attack(text: &str) -> Result<AttackConfig, String> {
    parse_attack(text).map_err(|e| e.to_string())
}

fn privacy(text: &str) -> Result<PrivacyConfig, String> {
    parse_privacy(text).map_err(|e| e.to_string())
}

/// What every client trains with, and the backbones (shared by `run`,
/// `show-config` and `compare`).
#[derive(Debug, Clone, Default, Args)]
pub struct RecipeArgs {
    /// Cap every source of the scenario at this many records.
    #[arg(long)]
    pub limit: Option<usize>,
    /// How template-captioned sources caption: varied, or content (the
    /// class's zero-shot prompt) [default: the scenario's choice].
    #[arg(long, value_parser = kebab::<CaptionStyle>)]
    pub captions: Option<CaptionStyle>,
    /// Unscored text between the visual tokens and the caption, e.g. '\n'
    /// for a newline [default: none, LLaVA's plain layout].
    #[arg(long, value_parser = unescape)]
    pub caption_separator: Option<String>,
    /// Stop after this many rounds [default: one pass over every shard].
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Local optimiser steps per round [default: 8].
    #[arg(long)]
    pub local_steps: Option<usize>,
    /// Samples per local step of a client; the centralized reference steps
    /// on this times the clients of a round, the same number of sequential
    /// steps [default: 2].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate of the global warm-up + cosine schedule [default: 2e-2].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Share of the sample budget spent warming up [default: 0.03].
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// Reset each client's AdamW moments every round.
    #[arg(long)]
    pub reset_optimizer: bool,
    /// Projector kind: linear or mlp2x_gelu [default: mlp2x_gelu].
    #[arg(long)]
    pub projector: Option<String>,
    /// Validate the global projector every N rounds [default: 5; compare: 1].
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Updates a round needs to be aggregated [default: 1].
    #[arg(long)]
    pub quorum: Option<usize>,
    /// Seconds a round waits for its clients [default: as long as they take].
    #[arg(long)]
    pub round_deadline: Option<f64>,
    /// Rounds a client may fail in a row before it is retired [default: 3].
    #[arg(long)]
    pub failure_limit: Option<u32>,
    /// Simulation: clients whose local steps share one decoder pass, a
    /// number or `all` (same results up to float rounding) [default: all,
    /// a round's clients while their batches hold at most 256 pairs].
    #[arg(long)]
    pub clients_per_pass: Option<ClientsPerPass>,
    /// Decoder LLM: a .gguf file or a Hugging Face folder [default: SmolLM2-135M].
    #[arg(long)]
    pub llm: Option<PathBuf>,
    /// Vision encoder: mobilenet-v2, patch-means, or a Hugging Face CLIP or
    /// SigLIP model folder [default: mobilenet-v2].
    #[arg(long, value_parser = vision_choice)]
    pub vision: Option<VisionChoice>,
    /// A CLIP/SigLIP folder's feature layer: an index into its hidden
    /// states, negative from the end [default: -2, the penultimate].
    #[arg(long, allow_hyphen_values = true)]
    pub vision_feature_layer: Option<i32>,
    /// Encoder input size in pixels [default: 112; a CLIP/SigLIP folder's own].
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Visual tokens per image, pooled from the encoder's grid (MobileNetV2
    /// at 112 px: 16, 4 or 1) [default: the whole grid].
    #[arg(long)]
    pub visual_tokens: Option<usize>,
}

impl RecipeArgs {
    /// These flags as options (unset flags stay unset).
    pub fn options(&self) -> RunOptions {
        RunOptions {
            limit: self.limit,
            captions: self.captions,
            caption_separator: self.caption_separator.clone(),
            rounds: self.rounds,
            local_steps: self.local_steps,
            batch_size: self.batch_size,
            lr: self.lr,
            warmup_ratio: self.warmup_ratio,
            reset_optimizer: self.reset_optimizer.then_some(true),
            projector: self.projector.clone(),
            eval_every: self.eval_every,
            quorum: self.quorum,
            round_deadline: self.round_deadline,
            failure_limit: self.failure_limit,
            clients_per_pass: self.clients_per_pass,
            llm: self.llm.clone(),
            vision: self.vision.clone(),
            vision_feature_layer: self.vision_feature_layer,
            image_size: self.image_size,
            visual_tokens: self.visual_tokens,
            ..RunOptions::default()
        }
    }
}

/// `run` and `show-config`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Read settings from this TOML file (a run folder's settings.toml
    /// repeats that run); FEDCMP_* variables and flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Scenario: a built-in name (iid, concept-skew, domain-silos,
    /// cross-device) or a TOML file [default: domain-silos].
    #[arg(long)]
    pub scenario: Option<String>,
    #[arg(long, value_parser = strategy, help = strategy_help())]
    pub strategy: Option<StrategyConfig>,
    /// federated, centralized or local-only [default: federated].
    #[arg(long, value_parser = kebab::<TrainingKind>)]
    pub training: Option<TrainingKind>,
    /// Short for --training centralized: every shard pooled into one client,
    /// trained with the same optimiser, schedule and sample budget (the
    /// upper bound a federation tries to reach).
    #[arg(long, conflicts_with_all = ["training", "local_only"])]
    pub centralized: bool,
    /// Short for --training local-only: each client alone on its shard (its
    /// own schedule over its own samples; the lower bound).
    #[arg(long, conflicts_with = "training")]
    pub local_only: bool,
    /// Seed of client sampling, dropouts, shuffles and initialisation (the
    /// scenario's own seed fixes the data split) [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Folder for run folders [default: runs].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Save a server checkpoint every N rounds (and after the last); an
    /// interrupted run resumes when started again with the same settings
    /// [default: 5].
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Simulated hostile clients, an inline table: `{ kind = "sign-flip",
    /// count = 2 }` (kinds sign-flip, scaled with `factor`, random with
    /// `std`, stale; `count` drawn from the seed, or `clients = [ids]`).
    #[arg(long, value_parser = attack)]
    pub attack: Option<AttackConfig>,
    /// Client-level differential privacy, an inline table: `{ clip-norm =
    /// 0.5, noise-multiplier = 1.0 }`, or `{ clip-norm = 0.5,
    /// target-epsilon = 8.0 }` with `--rounds`; `delta` defaults to 1e-5;
    /// `mode = "local"` noises each client's update before it leaves
    /// (default "central": DP-FedAvg around the strategy).
    #[arg(long, value_parser = privacy)]
    pub privacy: Option<PrivacyConfig>,
    /// Start over even if the run folder holds a checkpoint.
    #[arg(long)]
    pub fresh: bool,
}

impl RunArgs {
    /// These flags as options.
    pub fn options(&self) -> RunOptions {
        let training = if self.centralized {
            Some(TrainingKind::Centralized)
        } else if self.local_only {
            Some(TrainingKind::LocalOnly)
        } else {
            self.training
        };
        RunOptions {
            scenario: self.scenario.clone(),
            strategy: self.strategy.clone(),
            attack: self.attack.clone(),
            privacy: self.privacy.clone(),
            training,
            seed: self.seed,
            out: self.out.clone(),
            checkpoint_every: self.checkpoint_every,
            ..self.recipe.options()
        }
    }
}

/// The option layers of a command: its own `defaults` (named `what`),
/// then `config`, the environment and `flags`.
pub fn layers(
    defaults: Option<(&str, RunOptions)>,
    config: Option<&Path>,
    flags: &RunOptions,
) -> Result<Layers> {
    let mut layers = Layers::new();
    if let Some((what, options)) = defaults {
        layers = layers.defaults(what, &options)?;
    }
    if let Some(path) = config {
        layers = layers.file(path)?;
    }
    Ok(layers.environment(std::env::vars())?.flags(flags)?)
}
