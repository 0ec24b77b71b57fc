//! The round loop: sample clients, simulate dropouts, send typed
//! instructions through a [`Transport`], aggregate with the strategy (the
//! global model passed explicitly), evaluate, and emit one record per round.
//! It never trains, serialises or renders anything itself.

use fedcmp_core::{ClientId, ParamSet, RoundMetrics};
use fedcmp_model::optim::WarmupCosine;
use fedcmp_strategy::Strategy;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::transport::{RoundPlan, Transport};
use crate::{Result, RuntimeError};

/// Round-loop settings (validated by [`EngineConfig::validate`]).
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Stop after this many rounds even if data remains.
    pub max_rounds: u64,
    /// Clients sampled per round; all active ones when None (see also
    /// `fraction`).
    pub clients_per_round: Option<usize>,
    /// Sample this fraction of the active clients instead (rounded up).
    pub fraction: Option<f64>,
    /// Sample at least this many (when that many are active).
    pub min_clients: usize,
    /// Probability that a sampled client drops out of a round.
    pub dropout: f64,
    /// Probability that a client that stays is a straggler, and the local
    /// steps a straggler completes.
    pub stragglers: f64,
    pub straggler_steps: u32,
    pub seed: u64,
    /// Evaluate the global model every this many rounds (and after the last).
    pub eval_every: u64,
    /// The learning-rate schedule over the planned sample budget.
    pub schedule: WarmupCosine,
}

impl EngineConfig {
    /// Checks ranges once, so the loop can trust them.
    pub fn validate(&self) -> Result<()> {
        if self.max_rounds == 0 {
            return Err(RuntimeError::Config("max rounds must be positive".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(RuntimeError::Config(format!(
                "dropout {} must be in [0, 1)",
                self.dropout
            )));
        }
        if self.clients_per_round == Some(0) {
            return Err(RuntimeError::Config(
                "clients per round must be positive".into(),
            ));
        }
        if let Some(f) = self.fraction {
            if !(f > 0.0 && f <= 1.0) {
                return Err(RuntimeError::Config(format!(
                    "fraction {f} must be in (0, 1]"
                )));
            }
        }
        if !(0.0..1.0).contains(&self.stragglers) {
            return Err(RuntimeError::Config(format!(
                "stragglers {} must be in [0, 1)",
                self.stragglers
            )));
        }
        if self.eval_every == 0 {
            return Err(RuntimeError::Config("eval-every must be positive".into()));
        }
        Ok(())
    }
}

/// What happened in one round (one line of the run's metrics JSONL).
#[derive(Debug, Clone, Serialize)]
pub struct RoundRecord {
    pub round: u64,
    pub sampled: Vec<u32>,
    pub dropped: Vec<u32>,
    /// Clients told to stop early this round (simulated stragglers).
    pub stragglers: Vec<u32>,
    pub answered: Vec<u32>,
    /// Samples consumed in this round and in the whole run so far.
    pub samples: u64,
    pub samples_total: u64,
    /// Learning rate of the schedule once this round's samples are consumed.
    pub lr_end: f64,
    /// Sample-weighted mean of the clients' training losses.
    pub train_loss: f64,
    /// Validation caption NLL per token of the new global model, when
    /// evaluated this round.
    pub val_loss: Option<f64>,
    pub seconds: f64,
    pub metrics: RoundMetrics,
}

/// Where a run starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// Round 0 with these initial parameters.
    Fresh(ParamSet),
    /// After the rounds recorded in a checkpoint.
    Resume(EngineState),
}

/// Why the loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum StopReason {
    /// Every client consumed its shard (one pass done).
    DataExhausted,
    MaxRounds,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub rounds: u64,
    pub samples_total: u64,
    pub stop: StopReason,
    pub final_params: ParamSet,
    pub final_val_loss: Option<f64>,
    /// Samples each client consumed (to check the one-pass promise).
    pub consumed: Vec<(ClientId, u64)>,
}

/// Computes a validation loss for a global model.
pub type Evaluate<'a> = dyn FnMut(&ParamSet) -> Result<f64> + 'a;

/// The round loop's own state between rounds: with the strategy's state
/// and the clients' states it is everything a resumed run needs.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineState {
    /// Rounds completed.
    pub round: u64,
    pub samples_total: u64,
    /// Position of the sampling/dropout RNG stream (ChaCha8 word position).
    pub rng_word_pos: u128,
    pub global: ParamSet,
    pub last_val: Option<f64>,
}

/// Saves a checkpoint from the engine's, the strategy's and the clients'
/// states (the runtime's checkpoint module writes them to disk).
pub type SaveCheckpoint<'a> =
    dyn FnMut(&EngineState, &dyn Strategy, &dyn Transport) -> Result<()> + 'a;

/// Called after every `every` rounds (and after the last) with everything
/// to save.
pub struct CheckpointHook<'a> {
    pub every: u64,
    pub save: &'a mut SaveCheckpoint<'a>,
}

impl std::fmt::Debug for CheckpointHook<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointHook")
            .field("every", &self.every)
            .finish()
    }
}

fn rng_for(config: &EngineConfig) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(config.seed ^ 0x5eed_c11e_47f0_0d01)
}

/// Drives rounds until the data is consumed or `max_rounds` is reached,
/// starting from `initial` (a fresh run) or from a saved [`EngineState`]
/// (the strategy and the transport's clients must have been restored from
/// the same checkpoint).
pub fn run(
    config: &EngineConfig,
    strategy: &mut dyn Strategy,
    transport: &mut dyn Transport,
    start: Start,
    evaluate: &mut Evaluate<'_>,
    observe: &mut dyn FnMut(&RoundRecord),
    mut checkpoint: Option<CheckpointHook<'_>>,
) -> Result<RunSummary> {
    config.validate()?;
    let mut rng = rng_for(config);
    let (mut global, mut samples_total, mut round, mut last_val) = match start {
        Start::Fresh(initial) => (initial, 0u64, 0u64, None),
        Start::Resume(state) => {
            rng.set_word_pos(state.rng_word_pos);
            (
                state.global,
                state.samples_total,
                state.round,
                state.last_val,
            )
        }
    };
    let stop = loop {
        let mut active = transport.active_clients();
        if active.is_empty() {
            break StopReason::DataExhausted;
        }
        if round >= config.max_rounds {
            break StopReason::MaxRounds;
        }
        round += 1;
        let started = std::time::Instant::now();
        active.sort_unstable();
        let wanted = match (config.clients_per_round, config.fraction) {
            (Some(k), _) => Some(k),
            (None, Some(f)) => Some((f * active.len() as f64).ceil() as usize),
            (None, None) => None,
        }
        .map(|k| k.max(config.min_clients));
        let sampled: Vec<ClientId> = match wanted {
            Some(k) if k < active.len() => {
                let mut chosen: Vec<ClientId> =
                    active.choose_multiple(&mut rng, k).copied().collect();
                chosen.sort_unstable();
                chosen
            }
            _ => active,
        };
        // Drawn for every sampled client, so the stream does not depend on
        // the outcome.
        let (kept, dropped): (Vec<ClientId>, Vec<ClientId>) = sampled
            .iter()
            .partition(|_| rng.random::<f64>() >= config.dropout);
        // Likewise one draw per kept client, straggler or not.
        let straggling: Vec<bool> = kept
            .iter()
            .map(|_| rng.random::<f64>() < config.stragglers)
            .collect();
        let mut instructions = strategy.configure_round(round, &kept);
        for (instruction, slow) in instructions.iter_mut().zip(&straggling) {
            if *slow {
                instruction.max_local_steps = Some(config.straggler_steps.max(1));
            }
        }
        let plan = RoundPlan {
            global: &global,
            instructions,
            schedule: config.schedule,
            round_start_samples: samples_total,
        };
        let updates = transport.run_round(&plan)?;
        let round_samples: u64 = updates.iter().map(|u| u.num_samples).sum();
        let train_loss = if round_samples > 0 {
            updates
                .iter()
                .map(|u| u.mean_loss * u.num_samples as f64)
                .sum::<f64>()
                / round_samples as f64
        } else {
            f64::NAN
        };
        let mut metrics = RoundMetrics::default();
        if !updates.is_empty() {
            let aggregate = strategy.aggregate(round, &global, &updates)?;
            global = aggregate.params;
            metrics = aggregate.metrics;
        }
        samples_total += round_samples;
        let exhausted = transport.active_clients().is_empty();
        let evaluate_now =
            round.is_multiple_of(config.eval_every) || exhausted || round == config.max_rounds;
        let val_loss = if evaluate_now {
            let v = evaluate(&global)?;
            last_val = Some(v);
            Some(v)
        } else {
            None
        };
        let record = RoundRecord {
            round,
            sampled: sampled.iter().map(|c| c.0).collect(),
            dropped: dropped.iter().map(|c| c.0).collect(),
            stragglers: kept
                .iter()
                .zip(&straggling)
                .filter(|(_, s)| **s)
                .map(|(c, _)| c.0)
                .collect(),
            answered: updates.iter().map(|u| u.client.0).collect(),
            samples: round_samples,
            samples_total,
            lr_end: config.schedule.lr_at(samples_total as f64),
            train_loss,
            val_loss,
            seconds: started.elapsed().as_secs_f64(),
            metrics,
        };
        observe(&record);
        if let Some(hook) = checkpoint.as_mut() {
            let last = exhausted || round == config.max_rounds;
            if round.is_multiple_of(hook.every.max(1)) || last {
                let state = EngineState {
                    round,
                    samples_total,
                    rng_word_pos: rng.get_word_pos(),
                    global: global.clone(),
                    last_val,
                };
                (hook.save)(&state, &*strategy, &*transport)?;
            }
        }
    };
    Ok(RunSummary {
        rounds: round,
        samples_total,
        stop,
        final_params: global,
        final_val_loss: last_val,
        consumed: transport.consumed(),
    })
}
