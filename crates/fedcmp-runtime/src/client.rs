//! A federated client's data, the state it keeps between rounds, and the
//! [`LocalTrainer`], which turns one [`fedcmp_core::RoundTask`] into an
//! update by minimising the caption loss of the projector through the
//! frozen decoder ([`crate::local`] holds the round itself, for any loss).
//! The same code runs inside a simulation and inside a deployed client
//! process ([`crate::node`] wraps it with the client's own state store).
//!
//! One-pass schedule (ALGORITHMS.md §1): the shard is shuffled once with a
//! seeded RNG; each round consumes the next `local_steps x batch_size`
//! unseen samples from the cursor (fewer when the shard is nearly
//! exhausted); an exhausted client retires. `epochs > 1` reshuffles and
//! starts again, for studies.

use std::sync::Arc;

use candle_core::{Tensor, Var};
use fedcmp_core::{ClientId, ClientUpdate, ParamSet, RoundTask};
use fedcmp_data::cache::{FeatureCache, FeatureKey};
use fedcmp_model::alignment::{loss_and_grads, AlignmentBatch, CaptionTemplate, TokenizedCaptions};
use fedcmp_model::llm::decoder::FrozenDecoder;
use fedcmp_model::optim::AdamWConfig;
use fedcmp_model::projector::Projector;
use fedcmp_model::tokenizer::TextTokenizer;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::convert::{load_projector, projector_params};
use crate::local::{local_round, LocalProblem, LossAndGrads};
use crate::{Result, RuntimeError};

/// One training sample: its cached image features and its caption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub key: FeatureKey,
    pub caption: String,
}

/// A client's private training data.
#[derive(Debug, Clone)]
pub struct ClientData {
    pub id: ClientId,
    pub samples: Vec<Sample>,
}

/// AdamW moments as parameter sets (so they checkpoint like parameters).
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    pub step: u64,
    pub first_moments: ParamSet,
    pub second_moments: ParamSet,
}

/// What a client keeps between rounds.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientState {
    /// Shuffled sample order of the current epoch.
    pub order: Vec<u32>,
    /// Next unseen position in `order`.
    pub cursor: usize,
    /// Completed passes over the shard.
    pub epoch: u32,
    /// Samples consumed over the whole run.
    pub consumed: u64,
    pub optimizer: Option<OptimizerState>,
    /// SCAFFOLD's client control variate c_i.
    pub control: Option<ParamSet>,
}

/// The shard's sample order in `epoch`.
pub(crate) fn shuffled(n: usize, seed: u64, client: ClientId, epoch: u32) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    // One stream per (run seed, client, epoch): independent of which other
    // clients exist or in which order they train.
    let stream = seed ^ (u64::from(client.0) << 32) ^ u64::from(epoch).wrapping_mul(0x9e37_79b9);
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(stream));
    order
}

impl ClientState {
    /// A fresh client: shard shuffled once with the run's seed.
    pub fn new(data: &ClientData, seed: u64) -> Self {
        Self::fresh(data.samples.len(), seed, data.id)
    }

    /// A fresh state for a shard of `shard_len` samples of `client`.
    pub fn fresh(shard_len: usize, seed: u64, client: ClientId) -> Self {
        Self {
            order: shuffled(shard_len, seed, client, 0),
            cursor: 0,
            epoch: 0,
            consumed: 0,
            optimizer: None,
            control: None,
        }
    }

    /// Samples not yet consumed in the current epoch.
    pub fn remaining(&self) -> usize {
        self.order.len() - self.cursor.min(self.order.len())
    }

    /// Samples still to train on: the rest of this epoch and every epoch
    /// after it (`epochs` passes over a shard of `shard_len`).
    pub fn samples_left(&self, shard_len: usize, epochs: u32) -> u64 {
        if shard_len == 0 {
            return 0;
        }
        let later_epochs = u64::from(epochs.saturating_sub(self.epoch + 1));
        self.remaining() as u64 + later_epochs * shard_len as u64
    }
}

/// Hyper-parameters of local training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalConfig {
    pub local_steps: usize,
    pub batch_size: usize,
    /// Passes over each shard (1 = one-pass pretraining).
    pub epochs: u32,
    pub reset_optimizer: bool,
    pub adamw: AdamWConfig,
    /// Seed of the per-client shuffles.
    pub seed: u64,
}

/// Runs local training against a shared frozen decoder. One trainer serves
/// every simulated client in turn: it owns only a working copy of the
/// projector, so memory does not grow with the number of clients.
#[derive(Debug)]
pub struct LocalTrainer {
    decoder: Arc<FrozenDecoder>,
    tokenizer: Arc<TextTokenizer>,
    template: CaptionTemplate,
    projector: Projector,
    config: LocalConfig,
}

impl LocalTrainer {
    /// `projector` is the working copy (its values are overwritten each round).
    pub fn new(
        decoder: Arc<FrozenDecoder>,
        tokenizer: Arc<TextTokenizer>,
        template: CaptionTemplate,
        projector: Projector,
        config: LocalConfig,
    ) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            decoder,
            tokenizer,
            template,
            projector,
            config,
        })
    }

    /// The local configuration.
    pub fn config(&self) -> &LocalConfig {
        &self.config
    }

    /// One round of local training from the task's global parameters,
    /// advancing `state`. Returns None when the client has nothing left to
    /// train on (it retires).
    pub fn train(
        &mut self,
        cache: &FeatureCache,
        data: &ClientData,
        state: &mut ClientState,
        task: &RoundTask,
    ) -> Result<Option<ClientUpdate>> {
        let mut problem = CaptionProblem {
            decoder: &self.decoder,
            tokenizer: &self.tokenizer,
            template: &self.template,
            projector: &self.projector,
            cache,
            data,
        };
        local_round(&mut problem, &self.config, data.id, state, task)
    }
}

impl LocalConfig {
    /// Checks the counts once.
    pub fn validate(&self) -> Result<()> {
        if self.local_steps == 0 || self.batch_size == 0 || self.epochs == 0 {
            return Err(RuntimeError::Config(
                "local steps, batch size and epochs must be positive".to_string(),
            ));
        }
        Ok(())
    }
}

/// The caption loss of a client's samples through the frozen decoder.
struct CaptionProblem<'a> {
    decoder: &'a FrozenDecoder,
    tokenizer: &'a TextTokenizer,
    template: &'a CaptionTemplate,
    projector: &'a Projector,
    cache: &'a FeatureCache,
    data: &'a ClientData,
}

impl LocalProblem for CaptionProblem<'_> {
    fn vars(&self) -> Vec<Var> {
        self.projector.vars()
    }

    fn params(&self) -> Result<ParamSet> {
        projector_params(self.projector)
    }

    fn set_params(&mut self, params: &ParamSet) -> Result<()> {
        load_projector(self.projector, params)
    }

    fn shard_len(&self) -> usize {
        self.data.samples.len()
    }

    fn loss_and_grads(&mut self, batch: &[usize]) -> Result<LossAndGrads> {
        let samples = &self.data.samples;
        let keys: Vec<&FeatureKey> = batch.iter().map(|&i| &samples[i].key).collect();
        let captions: Vec<&str> = batch.iter().map(|&i| samples[i].caption.as_str()).collect();
        let tokens = TokenizedCaptions::new(self.tokenizer, self.template, &captions)?;
        let features = self.cache.batch(&keys)?;
        let aligned = AlignmentBatch::new(self.decoder, features, &tokens)?;
        let out = loss_and_grads(self.decoder, self.projector, &aligned)?;
        Ok(LossAndGrads {
            loss: out.loss,
            grads: out.grads,
        })
    }
}

/// The L2 norm of several tensors taken together.
pub(crate) fn global_norm<'t>(tensors: impl Iterator<Item = &'t Tensor>) -> Result<f64> {
    let mut sum = 0.0;
    for t in tensors {
        sum += t
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}
