//! A federated client's data, the state it keeps between rounds, and local
//! training: the [`LocalTrainer`] turns one [`RoundTask`] into an update.
//! The same code runs inside a simulation and inside a deployed client
//! process ([`crate::node`] wraps it with the client's own state store).
//!
//! One-pass schedule (ALGORITHMS.md §1): the shard is shuffled once with a
//! seeded RNG; each round consumes the next `local_steps x batch_size`
//! unseen samples from the cursor (fewer when the shard is nearly
//! exhausted); an exhausted client retires. `epochs > 1` reshuffles and
//! starts again, for studies.
//!
//! Local objective (typed, from the instruction): plain caption loss;
//! FedProx adds (mu/2)||theta - theta_global||^2, i.e. mu (theta -
//! theta_global) to the gradient; SCAFFOLD adds (c - c_i) to every gradient
//! and afterwards updates c_i by option II, c_i+ = c_i - c + (x - y_i) /
//! sum(lr), where the sum runs over the round's steps (it is K * lr for a
//! constant rate). The optimiser is AdamW; its moments stay with the client
//! across rounds unless `reset_optimizer`.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use fedcmp_core::{ClientId, ClientUpdate, LocalObjective, ParamSet, RoundTask};
use fedcmp_data::cache::{FeatureCache, FeatureKey};
use fedcmp_model::alignment::{loss_and_grads, AlignmentBatch, CaptionTemplate, TokenizedCaptions};
use fedcmp_model::llm::decoder::FrozenDecoder;
use fedcmp_model::optim::{AdamW, AdamWConfig, AdamWState};
use fedcmp_model::projector::Projector;
use fedcmp_model::tokenizer::TextTokenizer;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::convert::{load_projector, params_to_tensors, projector_params, tensors_to_params};
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

fn shuffled(n: usize, seed: u64, client: ClientId, epoch: u32) -> Vec<u32> {
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
        Self {
            order: shuffled(data.samples.len(), seed, data.id, 0),
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
        if config.local_steps == 0 || config.batch_size == 0 || config.epochs == 0 {
            return Err(RuntimeError::Config(
                "local steps, batch size and epochs must be positive".to_string(),
            ));
        }
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

    /// The next batch of sample indices, advancing the cursor (and the
    /// epoch when one ends and more are allowed). Empty when exhausted.
    fn next_batch(&self, data: &ClientData, state: &mut ClientState) -> Vec<usize> {
        if state.remaining() == 0
            && state.epoch + 1 < self.config.epochs
            && !data.samples.is_empty()
        {
            state.epoch += 1;
            state.order = shuffled(data.samples.len(), self.config.seed, data.id, state.epoch);
            state.cursor = 0;
        }
        let take = self.config.batch_size.min(state.remaining());
        let batch = state.order[state.cursor..state.cursor + take]
            .iter()
            .map(|&i| i as usize)
            .collect();
        state.cursor += take;
        batch
    }

    /// One round of local training from the task's global parameters,
    /// advancing `state`. Returns None when the client has nothing left to
    /// train on (it retires). The learning rate follows the federation's
    /// one schedule, read from the task's global sample count.
    pub fn train(
        &mut self,
        cache: &FeatureCache,
        data: &ClientData,
        state: &mut ClientState,
        task: &RoundTask,
    ) -> Result<Option<ClientUpdate>> {
        let global: &ParamSet = &task.global;
        let instruction = &task.instruction;
        let schedule = &task.schedule;
        let round_start_samples = task.samples_before;
        if instruction.client != data.id {
            return Err(RuntimeError::Config(format!(
                "instruction for client {} sent to client {}",
                instruction.client.0, data.id.0
            )));
        }
        load_projector(&self.projector, global)?;
        let dtype = DType::F32;
        let mut optimizer = AdamW::new(self.projector.vars(), self.config.adamw)?;
        if let (false, Some(saved)) = (self.config.reset_optimizer, &state.optimizer) {
            optimizer.set_state(AdamWState {
                step: saved.step,
                first_moments: params_to_tensors(&saved.first_moments, dtype)?,
                second_moments: params_to_tensors(&saved.second_moments, dtype)?,
            })?;
        }
        let global_tensors = params_to_tensors(global, dtype)?;
        // SCAFFOLD's correction c - c_i, constant over the round.
        let correction = match &instruction.objective {
            LocalObjective::Scaffold { server_control } => {
                // An empty set stands for c = 0 (before the server has seen
                // any update, it does not know the layout).
                let c = if server_control.is_empty() {
                    global_tensors
                        .iter()
                        .map(Tensor::zeros_like)
                        .collect::<candle_core::Result<Vec<_>>>()?
                } else {
                    global.check_same_layout(server_control)?;
                    params_to_tensors(server_control, dtype)?
                };
                let ci = match &state.control {
                    Some(ci) => params_to_tensors(ci, dtype)?,
                    None => c
                        .iter()
                        .map(Tensor::zeros_like)
                        .collect::<candle_core::Result<_>>()?,
                };
                Some((
                    c.clone(),
                    ci.clone(),
                    c.iter()
                        .zip(&ci)
                        .map(|(a, b)| a - b)
                        .collect::<candle_core::Result<Vec<_>>>()?,
                ))
            }
            _ => None,
        };

        let mut losses = Vec::new();
        let mut consumed = 0u64;
        let mut lr_sum = 0.0;
        let steps = instruction
            .max_local_steps
            .map_or(self.config.local_steps, |k| {
                (k as usize).min(self.config.local_steps)
            });
        for _ in 0..steps {
            let batch = self.next_batch(data, state);
            if batch.is_empty() {
                break;
            }
            let keys: Vec<&FeatureKey> = batch.iter().map(|&i| &data.samples[i].key).collect();
            let captions: Vec<&str> = batch
                .iter()
                .map(|&i| data.samples[i].caption.as_str())
                .collect();
            let tokens = TokenizedCaptions::new(&self.tokenizer, &self.template, &captions)?;
            let features = cache.batch(&keys)?;
            let aligned = AlignmentBatch::new(&self.decoder, features, &tokens)?;
            let mut out = loss_and_grads(&self.decoder, &self.projector, &aligned)?;
            if let Some((_, _, corr)) = &correction {
                if losses.is_empty() && tracing::enabled!(tracing::Level::DEBUG) {
                    // Whether the control variates are on the scale of the
                    // gradients they correct (Option II with AdamW steps).
                    tracing::debug!(
                        client = data.id.0,
                        gradient_norm = global_norm(out.grads.iter().flatten())?,
                        correction_norm = global_norm(corr.iter())?,
                        "SCAFFOLD first local step"
                    );
                }
            }
            let lr = schedule.lr_for_batch(round_start_samples + consumed, batch.len() as u64);
            consumed += batch.len() as u64;
            for (i, grad) in out.grads.iter_mut().enumerate() {
                let Some(g) = grad.as_mut() else { continue };
                match &instruction.objective {
                    LocalObjective::Proximal { mu } if *mu > 0.0 => {
                        let diff = (self.projector.vars()[i].as_tensor() - &global_tensors[i])?;
                        *g = (&*g + (diff * *mu)?)?;
                    }
                    LocalObjective::Scaffold { .. } => {
                        if let Some((_, _, corr)) = &correction {
                            *g = (&*g + &corr[i])?;
                        }
                    }
                    _ => {}
                }
            }
            optimizer.step(&out.grads, lr)?;
            lr_sum += lr;
            losses.push(out.loss);
        }
        if consumed == 0 {
            return Ok(None);
        }
        state.consumed += consumed;
        let params = projector_params(&self.projector)?;
        let saved = optimizer.state();
        state.optimizer = Some(OptimizerState {
            step: saved.step,
            first_moments: tensors_to_params(global, &saved.first_moments)?,
            second_moments: tensors_to_params(global, &saved.second_moments)?,
        });
        let control_delta = match correction {
            Some((c, ci, _)) if lr_sum > 0.0 => {
                // Option II: c_i+ = c_i - c + (x - y_i) / sum(lr).
                let y = self.projector.vars();
                let mut new_ci = Vec::with_capacity(ci.len());
                let mut delta = Vec::with_capacity(ci.len());
                for i in 0..ci.len() {
                    let drift = ((&global_tensors[i] - y[i].as_tensor())? / lr_sum)?;
                    let next = ((&ci[i] - &c[i])? + drift)?;
                    delta.push((&next - &ci[i])?);
                    new_ci.push(next);
                }
                state.control = Some(tensors_to_params(global, &new_ci)?);
                Some(tensors_to_params(global, &delta)?)
            }
            // A round at learning rate 0 (past the end of the schedule)
            // moved nothing, so Option II's drift is 0/0: the client keeps
            // c_i and reports a zero change, which the server needs from
            // every update to keep c the mean of the c_i.
            Some(_) => Some(ParamSet::zeros_like(global)),
            None => None,
        };
        Ok(Some(ClientUpdate {
            client: data.id,
            params,
            num_samples: consumed,
            num_steps: losses.len() as u64,
            lr_sum,
            mean_loss: losses.iter().sum::<f64>() / losses.len() as f64,
            control_delta,
        }))
    }
}

/// The L2 norm of several tensors taken together.
fn global_norm<'t>(tensors: impl Iterator<Item = &'t Tensor>) -> Result<f64> {
    let mut sum = 0.0;
    for t in tensors {
        sum += t
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}
