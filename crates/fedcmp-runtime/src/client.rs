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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{Tensor, Var};
use fedcmp_core::{ClientId, ClientUpdate, ParamSet, RoundTask};
use fedcmp_data::cache::{FeatureCache, FeatureKey};
use fedcmp_model::alignment::{
    loss_and_grads, loss_and_grads_many, AlignmentBatch, CaptionTemplate, TokenizedCaptions,
};
use fedcmp_model::llm::decoder::FrozenDecoder;
use fedcmp_model::optim::AdamWConfig;
use fedcmp_model::projector::Projector;
use fedcmp_model::tokenizer::TextTokenizer;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::convert::{load_projector, projector_params};
use crate::local::{
    local_round, local_rounds_together, JointJob, JointProblem, LocalProblem, LossAndGrads,
};
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
    /// Local DP: updates released so far (what its epsilon counts).
    pub dp_releases: u64,
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
            dp_releases: 0,
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
/// every simulated client: it owns a working copy of the projector per
/// client trained at once (one, or the clients of one joint pass), so
/// memory does not grow with the number of clients.
#[derive(Debug)]
pub struct LocalTrainer {
    decoder: Arc<FrozenDecoder>,
    tokenizer: Arc<TextTokenizer>,
    template: CaptionTemplate,
    projector: Projector,
    /// Working copies for the other clients of a joint pass, made when
    /// first needed.
    more_projectors: Vec<Projector>,
    config: LocalConfig,
    passes: PassCounter,
}

/// Decoder passes a trainer has made and the client steps they served
/// (their ratio: clients per pass). A shared handle: clones count
/// together.
#[derive(Debug, Clone, Default)]
pub struct PassCounter(Arc<[AtomicU64; 2]>);

impl PassCounter {
    /// Decoder passes (forward and backward) so far.
    pub fn passes(&self) -> u64 {
        self.0[0].load(Ordering::Relaxed)
    }

    /// Client local steps those passes served.
    pub fn client_steps(&self) -> u64 {
        self.0[1].load(Ordering::Relaxed)
    }

    fn record(&self, clients: usize) {
        self.0[0].fetch_add(1, Ordering::Relaxed);
        self.0[1].fetch_add(clients as u64, Ordering::Relaxed);
    }
}

/// One client's round task, for [`LocalTrainer::train_together`].
#[derive(Debug)]
pub struct TrainJob<'a> {
    pub data: &'a ClientData,
    pub state: &'a mut ClientState,
    pub task: &'a RoundTask,
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
            more_projectors: Vec::new(),
            config,
            passes: PassCounter::default(),
        })
    }

    /// The trainer's pass counts (a handle that stays live).
    pub fn pass_counter(&self) -> PassCounter {
        self.passes.clone()
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
            passes: &self.passes,
        };
        local_round(&mut problem, &self.config, data.id, state, task)
    }

    /// One round for several clients whose local steps go through the
    /// decoder together, each with its own projector copy, optimiser and
    /// loss ([`local_rounds_together`]); one result per job, in order. A
    /// single job trains exactly as [`Self::train`].
    pub fn train_together(
        &mut self,
        cache: &FeatureCache,
        mut jobs: Vec<TrainJob<'_>>,
    ) -> Result<Vec<Result<Option<ClientUpdate>>>> {
        if jobs.len() == 1 {
            if let Some(job) = jobs.pop() {
                return Ok(vec![self.train(cache, job.data, job.state, job.task)]);
            }
        }
        while self.more_projectors.len() + 1 < jobs.len() {
            let first = &self.projector;
            let dtype = self.decoder.dtype();
            self.more_projectors.push(Projector::new(
                *first.config(),
                0,
                dtype,
                self.decoder.device(),
            )?);
        }
        let projectors = std::iter::once(&self.projector).chain(&self.more_projectors);
        let members = jobs
            .iter()
            .zip(projectors)
            .map(|(job, projector)| CaptionProblem {
                decoder: &self.decoder,
                tokenizer: &self.tokenizer,
                template: &self.template,
                projector,
                cache,
                data: job.data,
                passes: &self.passes,
            })
            .collect();
        let mut joint = CaptionJoint {
            decoder: &self.decoder,
            members,
            passes: &self.passes,
        };
        let mut joint_jobs: Vec<JointJob<'_>> = jobs
            .into_iter()
            .enumerate()
            .map(|(member, job)| JointJob {
                member,
                client: job.data.id,
                state: job.state,
                task: job.task,
            })
            .collect();
        local_rounds_together(&mut joint, &self.config, &mut joint_jobs)
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
    passes: &'a PassCounter,
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
        let aligned = self.prepare(batch)?;
        let out = loss_and_grads(self.decoder, self.projector, &aligned)?;
        self.passes.record(1);
        Ok(LossAndGrads {
            loss: out.loss,
            grads: out.grads,
        })
    }
}

impl CaptionProblem<'_> {
    /// The shard's samples `batch`, features and tokens laid out for the
    /// decoder.
    fn prepare(&self, batch: &[usize]) -> Result<AlignmentBatch> {
        let samples = &self.data.samples;
        let keys: Vec<&FeatureKey> = batch.iter().map(|&i| &samples[i].key).collect();
        let captions: Vec<&str> = batch.iter().map(|&i| samples[i].caption.as_str()).collect();
        let tokens = TokenizedCaptions::new(self.tokenizer, self.template, &captions)?;
        let features = self.cache.batch(&keys)?;
        Ok(AlignmentBatch::new(self.decoder, features, &tokens)?)
    }
}

/// Several clients' caption problems over one frozen decoder.
struct CaptionJoint<'a> {
    decoder: &'a FrozenDecoder,
    members: Vec<CaptionProblem<'a>>,
    passes: &'a PassCounter,
}

impl<'a> CaptionJoint<'a> {
    fn get(&mut self, i: usize) -> Result<&mut CaptionProblem<'a>> {
        let n = self.members.len();
        self.members.get_mut(i).ok_or_else(|| {
            RuntimeError::Config(format!("internal: member {i} of a joint pass of {n}"))
        })
    }
}

impl JointProblem for CaptionJoint<'_> {
    fn member(&mut self, i: usize) -> Result<&mut dyn LocalProblem> {
        Ok(self.get(i)?)
    }

    fn joint_loss_and_grads(
        &mut self,
        requests: &[(usize, Vec<usize>)],
    ) -> Result<Vec<Result<LossAndGrads>>> {
        let mut prepared = Vec::with_capacity(requests.len());
        for (i, batch) in requests {
            let member = self.get(*i)?;
            prepared.push(member.prepare(batch).map(|b| (member.projector, b)));
        }
        let items: Vec<(&Projector, &AlignmentBatch)> = prepared
            .iter()
            .filter_map(|p| {
                p.as_ref()
                    .ok()
                    .map(|(projector, batch)| (*projector, batch))
            })
            .collect();
        let mut outs = loss_and_grads_many(self.decoder, &items)?.into_iter();
        self.passes.record(items.len());
        Ok(prepared
            .into_iter()
            .map(|p| {
                let _ = p?;
                let out = outs.next().ok_or_else(|| {
                    RuntimeError::Config("internal: a joint pass lost a result".into())
                })?;
                Ok(LossAndGrads {
                    loss: out.loss,
                    grads: out.grads,
                })
            })
            .collect())
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
