//! What `run`, `compare` and the main job share: a scenario prepared once
//! (its federation, the frozen backbones, cached vision features, the
//! held-out splits and the evaluation suite) and the pieces of one training
//! run on it (the local recipe, the engine settings, the three kinds of
//! run: federated, centralized, local-only).

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use clap::Args;
use fedcmp_core::{ClientId, ParamSet};
use fedcmp_data::scenario::{Participation, Scenario};
use fedcmp_model::alignment::CaptionTemplate;
use fedcmp_model::llm::decoder::FrozenDecoder;
use fedcmp_model::optim::{AdamWConfig, WarmupCosine};
use fedcmp_model::projector::{Projector, ProjectorConfig, ProjectorKind};
use fedcmp_model::tokenizer::TextTokenizer;
use fedcmp_runtime::client::{ClientData, LocalConfig, LocalTrainer, Sample};
use fedcmp_runtime::convert::projector_params;
use fedcmp_runtime::engine::{run as run_engine, EngineConfig, RoundRecord, RunSummary, Start};
use fedcmp_runtime::eval::Evaluator;
use fedcmp_runtime::suite::{Domain, Item, Scorer, Suite, SuiteConfig};
use fedcmp_runtime::transport::InProcess;
use fedcmp_strategy::config::StrategyConfig;

use super::backbones::{self, VisionChoice};

/// Which frozen backbones to use.
#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct BackboneArgs {
    /// Decoder LLM: a .gguf file or a Hugging Face folder (default: SmolLM2-135M).
    #[arg(long)]
    pub llm: Option<PathBuf>,
    /// Vision encoder.
    #[arg(long, value_enum, default_value_t = VisionChoice::MobilenetV2)]
    pub vision: VisionChoice,
    /// Encoder input size in pixels.
    #[arg(long, default_value_t = 112)]
    pub image_size: usize,
}

/// How every client trains (shared by `run` and `compare`).
#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct TrainingArgs {
    /// Stop after this many rounds (default: when every shard is consumed once).
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Local optimiser steps per round.
    #[arg(long, default_value_t = 4)]
    pub local_steps: usize,
    /// Samples per local step.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Peak learning rate of the global warm-up + cosine schedule.
    #[arg(long, default_value_t = 3e-4)]
    pub lr: f64,
    /// Reset each client's AdamW moments every round.
    #[arg(long)]
    pub reset_optimizer: bool,
    /// Projector kind: linear or mlp2x_gelu.
    #[arg(long, default_value = "mlp2x_gelu")]
    #[serde(serialize_with = "display")]
    pub projector: ProjectorKind,
}

fn display<S: serde::Serializer>(kind: &ProjectorKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&kind.to_string())
}

impl Default for TrainingArgs {
    fn default() -> Self {
        Self {
            rounds: None,
            local_steps: 4,
            batch_size: 8,
            lr: 3e-4,
            reset_optimizer: false,
            projector: ProjectorKind::Mlp2xGelu,
        }
    }
}

impl TrainingArgs {
    /// The recipe with `seed`, validating every `eval_every` rounds.
    pub fn recipe(&self, seed: u64, eval_every: u64) -> Recipe {
        Recipe {
            local_steps: self.local_steps,
            batch_size: self.batch_size,
            lr: self.lr,
            reset_optimizer: self.reset_optimizer,
            projector: self.projector,
            seed,
            rounds: self.rounds,
            eval_every,
        }
    }
}

/// A scenario ready to train and evaluate on.
pub struct Env {
    pub scenario: Scenario,
    pub decoder: Arc<FrozenDecoder>,
    pub tokenizer: Arc<TextTokenizer>,
    pub encoder_identity: String,
    pub feature_dim: usize,
    pub cache: fedcmp_data::cache::FeatureCache,
    pub clients: Vec<ClientData>,
    pub validation: Vec<Sample>,
    pub test: Vec<Sample>,
    /// The test split with domains and labels, and its fixed subsets.
    pub suite: Suite,
    pub template: CaptionTemplate,
}

impl Env {
    /// Loads `scenario` (a built-in name or a TOML file), optionally with
    /// every source capped at `limit` records, builds its federation, loads
    /// the backbones and caches every image's features.
    pub fn prepare(
        root: &Path,
        scenario: &str,
        limit: Option<NonZeroUsize>,
        backbone_args: &BackboneArgs,
        suite_config: SuiteConfig,
    ) -> Result<Self> {
        let (mut scenario, base) = Scenario::load(scenario)?;
        if let Some(limit) = limit {
            scenario.cap_sources(limit);
        }
        let federation = super::scenario::build(root, &scenario, &base)?;
        let loaded = backbones::load(
            root,
            backbone_args.llm.as_ref(),
            backbone_args.vision,
            backbone_args.image_size,
        )?;
        let mut cache = loaded.feature_cache(root)?;
        let corpus = &federation.corpus;
        let keys = backbones::cache_features(&mut cache, loaded.encoder.as_ref(), &corpus.records)?;
        let sample = |i: usize| -> Option<Sample> {
            keys.get(i).cloned().flatten().map(|key| Sample {
                key,
                caption: corpus.records[i].caption.clone(),
            })
        };
        let clients = federation
            .plan
            .shards
            .iter()
            .enumerate()
            .map(|(c, shard)| ClientData {
                id: ClientId(c as u32),
                samples: shard.iter().filter_map(|&i| sample(i)).collect(),
            })
            .collect();
        let splits = &federation.plan.splits;
        let validation = splits
            .validation
            .iter()
            .filter_map(|&i| sample(i))
            .collect();
        let test: Vec<Sample> = splits.test.iter().filter_map(|&i| sample(i)).collect();

        // Domains in order of first appearance among the sources.
        let mut names: Vec<String> = Vec::new();
        for r in &corpus.records {
            if !names.contains(&r.source) {
                names.push(r.source.clone());
            }
        }
        let domains: Vec<Domain> = names
            .iter()
            .map(|n| Domain {
                name: n.clone(),
                class_prompts: corpus.class_prompts(n).unwrap_or_default(),
            })
            .collect();
        let items = splits
            .test
            .iter()
            .filter_map(|&i| {
                let record = &corpus.records[i];
                Some(Item {
                    id: record.id.clone(),
                    sample: sample(i)?,
                    domain: names.iter().position(|n| *n == record.source)?,
                    label: record.label,
                })
            })
            .collect();
        let suite = Suite::new(domains, items, suite_config)?;
        let backbones::Backbones {
            decoder,
            tokenizer,
            encoder,
        } = loaded;
        Ok(Self {
            scenario,
            decoder: Arc::new(decoder),
            tokenizer: Arc::new(tokenizer),
            encoder_identity: encoder.identity(),
            feature_dim: encoder.feature_dim(),
            cache,
            clients,
            validation,
            test,
            suite,
            template: CaptionTemplate::plain(),
        })
    }

    /// A fresh projector (its initialisation depends on `seed` only).
    pub fn projector(&self, kind: ProjectorKind, seed: u64) -> Result<Projector> {
        Ok(Projector::new(
            ProjectorConfig {
                kind,
                input_dim: self.feature_dim,
                output_dim: self.decoder.config().hidden_size,
                pool: 1,
            },
            seed,
            DType::F32,
            &Device::Cpu,
        )?)
    }

    fn evaluator<'a>(&'a self, samples: &'a [Sample]) -> Evaluator<'a> {
        Evaluator {
            decoder: &self.decoder,
            tokenizer: &self.tokenizer,
            template: &self.template,
            cache: &self.cache,
            samples,
            batch_size: 16,
        }
    }

    /// Caption NLL on the validation split.
    pub fn validator(&self) -> Evaluator<'_> {
        self.evaluator(&self.validation)
    }

    /// Caption NLL on the test split.
    pub fn tester(&self) -> Evaluator<'_> {
        self.evaluator(&self.test)
    }

    /// The full suite's scorer.
    pub fn scorer(&self) -> Scorer<'_> {
        Scorer {
            decoder: &self.decoder,
            tokenizer: &self.tokenizer,
            template: &self.template,
            cache: &self.cache,
        }
    }

    /// A local trainer over `clients`, in process.
    pub fn transport(&self, recipe: &Recipe, clients: Vec<ClientData>) -> Result<InProcess<'_>> {
        let trainer = LocalTrainer::new(
            self.decoder.clone(),
            self.tokenizer.clone(),
            self.template.clone(),
            self.projector(recipe.projector, recipe.seed)?,
            recipe.local(),
        )?;
        Ok(InProcess::new(trainer, &self.cache, clients))
    }
}

/// How every client trains, and for how long.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Recipe {
    pub local_steps: usize,
    pub batch_size: usize,
    /// Peak learning rate of the global warm-up + cosine schedule.
    pub lr: f64,
    pub reset_optimizer: bool,
    pub projector: ProjectorKind,
    pub seed: u64,
    /// Stop after this many rounds (default: one pass over every shard).
    pub rounds: Option<u64>,
    /// Validation every N rounds (u64::MAX: only at the end).
    pub eval_every: u64,
}

impl Recipe {
    pub fn validate(&self) -> Result<()> {
        if self.local_steps == 0 || self.batch_size == 0 {
            bail!("local steps and batch size must be positive");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("the learning rate must be positive, got {}", self.lr);
        }
        Ok(())
    }

    pub fn local(&self) -> LocalConfig {
        LocalConfig {
            local_steps: self.local_steps,
            batch_size: self.batch_size,
            epochs: 1,
            reset_optimizer: self.reset_optimizer,
            adamw: AdamWConfig::default(),
            seed: self.seed,
        }
    }

    /// The engine settings for `participation` over `budget` samples.
    pub fn engine(&self, participation: &Participation, budget: u64) -> EngineConfig {
        EngineConfig {
            max_rounds: self.rounds.unwrap_or(u64::MAX),
            clients_per_round: participation.clients_per_round.map(|k| k.get()),
            fraction: participation.fraction,
            min_clients: participation.min_clients,
            dropout: participation.dropout,
            stragglers: participation.stragglers,
            straggler_steps: self.local_steps.div_ceil(2) as u32,
            seed: self.seed,
            eval_every: self.eval_every.max(1),
            schedule: WarmupCosine {
                peak_lr: self.lr,
                total_samples: budget.max(1),
                warmup_ratio: 0.03,
            },
        }
    }
}

/// What a training run is measured against.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// The scenario's clients with this strategy.
    Federated(StrategyConfig),
    /// Every shard pooled into one client, plain FedAvg steps on it (the
    /// upper bound).
    Centralized,
}

/// One finished training run.
pub struct Trained {
    pub summary: RunSummary,
    pub records: Vec<RoundRecord>,
    /// Validation NLL of the final projector.
    pub val_nll: f64,
}

/// Trains one projector on `env` with `recipe`, without checkpoints
/// (callers that need resumable runs use the engine directly, as `run`
/// does); `observe` sees every round.
pub fn train(
    env: &Env,
    recipe: &Recipe,
    mode: &Mode,
    observe: &mut dyn FnMut(&RoundRecord),
) -> Result<Trained> {
    recipe.validate()?;
    let (clients, participation, strategy_config) = match mode {
        Mode::Federated(s) => (
            env.clients.clone(),
            env.scenario.participation.clone(),
            s.clone(),
        ),
        Mode::Centralized => (
            vec![ClientData {
                id: ClientId(0),
                samples: env.clients.iter().flat_map(|c| c.samples.clone()).collect(),
            }],
            Participation::default(),
            StrategyConfig::default(),
        ),
    };
    let budget: u64 = clients.iter().map(|c| c.samples.len() as u64).sum();
    if budget == 0 {
        bail!("scenario {} leaves no training sample", env.scenario.name);
    }
    let mut strategy = strategy_config.build(clients.len())?;
    let mut transport = env.transport(recipe, clients)?;
    let work = env.projector(recipe.projector, recipe.seed)?;
    let validator = env.validator();
    let mut records = Vec::new();
    let summary = run_engine(
        &recipe.engine(&participation, budget),
        strategy.as_mut(),
        &mut transport,
        Start::Fresh(projector_params(&work)?),
        &mut |p: &ParamSet| validator.nll_of(&work, p),
        &mut |r| {
            observe(r);
            records.push(r.clone());
        },
        None,
    )?;
    let val_nll = match summary.final_val_loss {
        Some(v) => v,
        None => validator.nll_of(&work, &summary.final_params)?,
    };
    Ok(Trained {
        summary,
        records,
        val_nll,
    })
}

/// The local-only reference: every client trains alone on its shard (its
/// own schedule over its own samples). Returns each client's final
/// projector with the samples it consumed; `done` after each client.
pub fn train_local_only(
    env: &Env,
    recipe: &Recipe,
    done: &mut dyn FnMut(ClientId),
) -> Result<Vec<(ClientId, u64, ParamSet)>> {
    recipe.validate()?;
    let mut out = Vec::new();
    for client in &env.clients {
        let size = client.samples.len() as u64;
        let mut transport = env.transport(recipe, vec![client.clone()])?;
        let mut strategy = StrategyConfig::default().build(1)?;
        let mut engine = recipe.engine(&Participation::default(), size);
        engine.eval_every = u64::MAX;
        let summary = run_engine(
            &engine,
            strategy.as_mut(),
            &mut transport,
            Start::Fresh(projector_params(
                &env.projector(recipe.projector, recipe.seed)?,
            )?),
            &mut |_| Ok(f64::NAN),
            &mut |_| {},
            None,
        )?;
        out.push((client.id, summary.samples_total, summary.final_params));
        done(client.id);
    }
    Ok(out)
}
