//! One round of local training, for any loss ([`LocalProblem`]): the
//! client's next one-pass batches, the learning rate read from the
//! federation's schedule, AdamW with state kept across rounds, and the
//! local objective the server asked for, kept true to its paper under an
//! adaptive optimiser (ALGORITHMS.md §7.6):
//!
//! - plain: the loss alone;
//! - FedProx (Li et al. 2020): the pull `mu (theta - theta_global)` acts in
//!   parameter space after each AdamW step, decoupled like AdamW's weight
//!   decay: `theta <- theta - min(1, lr mu) (theta - theta_global)`. Under
//!   SGD this is exactly FedProx's proximal gradient term; fed through
//!   Adam's normalisation instead it would be ~0 for any useful mu;
//! - SCAFFOLD (Karimireddy et al. 2020): every raw gradient is corrected by
//!   `c - c_i` before AdamW, and the client's control variate becomes the
//!   learning-rate-weighted mean of its raw gradients over the round,
//!   `c_i+ = sum_k lr_k g_k / sum_k lr_k`. Under SGD that is option II
//!   (`c_i - c + (x - y_i) / sum lr`); under AdamW option II would measure
//!   Adam's normalised steps, which outgrow the gradients and swamp them.
//!
//! A round at learning rate 0 (the federation past its schedule's end)
//! moves nothing: SCAFFOLD's client keeps `c_i` and reports a zero change.

use candle_core::{DType, Tensor, Var};
use fedcmp_core::{ClientId, ClientUpdate, LocalObjective, ParamSet, RoundTask};
use fedcmp_model::optim::{AdamW, AdamWState};

use crate::client::{global_norm, shuffled, ClientState, LocalConfig, OptimizerState};
use crate::convert::{params_to_tensors, tensors_to_params};
use crate::{Result, RuntimeError};

/// A loss and one gradient per trainable variable (None: no gradient).
#[derive(Debug)]
pub struct LossAndGrads {
    pub loss: f64,
    pub grads: Vec<Option<Tensor>>,
}

/// What local training minimises: the caption loss of the projector (the
/// client's trainer), or in tests any differentiable toy.
pub trait LocalProblem {
    /// The trainable variables, in parameter-set order.
    fn vars(&self) -> Vec<Var>;
    /// Their values as a parameter set.
    fn params(&self) -> Result<ParamSet>;
    /// Overwrites them (same layout).
    fn set_params(&mut self, params: &ParamSet) -> Result<()>;
    /// Samples in the client's shard.
    fn shard_len(&self) -> usize;
    /// Loss and gradients on the shard's samples `batch` at the current
    /// values.
    fn loss_and_grads(&mut self, batch: &[usize]) -> Result<LossAndGrads>;
}

/// SCAFFOLD's client side during one round.
struct Scaffold {
    /// c_i, the client's control variate.
    client: Vec<Tensor>,
    /// c - c_i, added to every raw gradient.
    correction: Vec<Tensor>,
    /// sum_k lr_k g_k over the round's raw gradients.
    weighted_grads: Vec<Tensor>,
}

/// The local objective's corrections for one round.
struct Corrections {
    /// FedProx: mu and the global parameters.
    proximal: Option<(f64, Vec<Tensor>)>,
    scaffold: Option<Scaffold>,
}

impl Corrections {
    fn new(
        objective: &LocalObjective,
        global: &ParamSet,
        global_tensors: &[Tensor],
        control: Option<&ParamSet>,
    ) -> Result<Self> {
        let dtype = DType::F32;
        let zeros = |like: &[Tensor]| -> Result<Vec<Tensor>> {
            Ok(like
                .iter()
                .map(Tensor::zeros_like)
                .collect::<candle_core::Result<_>>()?)
        };
        Ok(match objective {
            LocalObjective::Plain => Self {
                proximal: None,
                scaffold: None,
            },
            LocalObjective::Proximal { mu } => Self {
                proximal: (*mu > 0.0).then(|| (*mu, global_tensors.to_vec())),
                scaffold: None,
            },
            LocalObjective::Scaffold { server_control } => {
                // An empty set stands for c = 0 (before the server has seen
                // any update, it does not know the layout).
                let server = if server_control.is_empty() {
                    zeros(global_tensors)?
                } else {
                    global.check_same_layout(server_control)?;
                    params_to_tensors(server_control, dtype)?
                };
                let client = match control {
                    Some(ci) => {
                        global.check_same_layout(ci)?;
                        params_to_tensors(ci, dtype)?
                    }
                    None => zeros(&server)?,
                };
                let correction = server
                    .iter()
                    .zip(&client)
                    .map(|(c, ci)| c - ci)
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Self {
                    proximal: None,
                    scaffold: Some(Scaffold {
                        weighted_grads: zeros(&server)?,
                        client,
                        correction,
                    }),
                }
            }
        })
    }

    /// Turns the raw gradients into the ones AdamW sees (SCAFFOLD adds its
    /// correction, after remembering the raw ones).
    fn before_step(&mut self, grads: &mut [Option<Tensor>], lr: f64) -> Result<()> {
        let Some(s) = self.scaffold.as_mut() else {
            return Ok(());
        };
        for (i, grad) in grads.iter_mut().enumerate() {
            let Some(g) = grad.as_mut() else { continue };
            s.weighted_grads[i] = (&s.weighted_grads[i] + (&*g * lr)?)?;
            *g = (&*g + &s.correction[i])?;
        }
        Ok(())
    }

    /// Decoupled pulls after the AdamW step (FedProx).
    fn after_step(&self, vars: &[Var], lr: f64) -> Result<()> {
        if let Some((mu, global)) = &self.proximal {
            let pull = (lr * mu).min(1.0);
            for (var, g) in vars.iter().zip(global) {
                let theta = var.as_tensor();
                var.set(&(theta - ((theta - g)? * pull)?)?)?;
            }
        }
        Ok(())
    }
}

/// Trains `problem` for one round as `task` says, from `state` (advanced
/// in place), for the client `client` configured by `config`. Returns None
/// when the client has nothing left to train on.
pub fn local_round(
    problem: &mut dyn LocalProblem,
    config: &LocalConfig,
    client: ClientId,
    state: &mut ClientState,
    task: &RoundTask,
) -> Result<Option<ClientUpdate>> {
    let global: &ParamSet = &task.global;
    let instruction = &task.instruction;
    if instruction.client != client {
        return Err(RuntimeError::Config(format!(
            "instruction for client {} sent to client {}",
            instruction.client.0, client.0
        )));
    }
    problem.set_params(global)?;
    let dtype = DType::F32;
    let vars = problem.vars();
    let mut optimizer = AdamW::new(vars.clone(), config.adamw)?;
    if let (false, Some(saved)) = (config.reset_optimizer, &state.optimizer) {
        optimizer.set_state(AdamWState {
            step: saved.step,
            first_moments: params_to_tensors(&saved.first_moments, dtype)?,
            second_moments: params_to_tensors(&saved.second_moments, dtype)?,
        })?;
    }
    let global_tensors = params_to_tensors(global, dtype)?;
    let mut corrections = Corrections::new(
        &instruction.objective,
        global,
        &global_tensors,
        state.control.as_ref(),
    )?;

    let shard_len = problem.shard_len();
    let mut losses = Vec::new();
    let mut consumed = 0u64;
    let mut lr_sum = 0.0;
    let steps = instruction
        .max_local_steps
        .map_or(config.local_steps, |k| (k as usize).min(config.local_steps));
    for _ in 0..steps {
        let batch = next_batch(config, client, shard_len, state);
        if batch.is_empty() {
            break;
        }
        let mut out = problem.loss_and_grads(&batch)?;
        if let Some(s) = &corrections.scaffold {
            if losses.is_empty() && tracing::enabled!(tracing::Level::DEBUG) {
                // Whether the control variates are on the scale of the
                // gradients they correct.
                tracing::debug!(
                    client = client.0,
                    gradient_norm = global_norm(out.grads.iter().flatten())?,
                    correction_norm = global_norm(s.correction.iter())?,
                    "SCAFFOLD first local step"
                );
            }
        }
        let lr = task
            .schedule
            .lr_for_batch(task.samples_before + consumed, batch.len() as u64);
        consumed += batch.len() as u64;
        corrections.before_step(&mut out.grads, lr)?;
        optimizer.step(&out.grads, lr)?;
        corrections.after_step(&vars, lr)?;
        lr_sum += lr;
        losses.push(out.loss);
    }
    if consumed == 0 {
        return Ok(None);
    }
    state.consumed += consumed;
    let params = problem.params()?;
    let saved = optimizer.state();
    state.optimizer = Some(OptimizerState {
        step: saved.step,
        first_moments: tensors_to_params(global, &saved.first_moments)?,
        second_moments: tensors_to_params(global, &saved.second_moments)?,
    });
    let control_delta = match corrections.scaffold {
        Some(s) if lr_sum > 0.0 => {
            // c_i+ = sum lr g / sum lr, in raw-gradient units.
            let mut next = Vec::with_capacity(s.client.len());
            let mut delta = Vec::with_capacity(s.client.len());
            for (sum, ci) in s.weighted_grads.iter().zip(&s.client) {
                let c = (sum / lr_sum)?;
                delta.push((&c - ci)?);
                next.push(c);
            }
            state.control = Some(tensors_to_params(global, &next)?);
            Some(tensors_to_params(global, &delta)?)
        }
        // A round at learning rate 0 moved nothing and measured no
        // gradient with any weight: the client keeps c_i and reports a
        // zero change, which the server needs from every update to keep c
        // the mean of the c_i.
        Some(_) => Some(ParamSet::zeros_like(global)),
        None => None,
    };
    Ok(Some(ClientUpdate {
        client,
        params,
        num_samples: consumed,
        num_steps: losses.len() as u64,
        lr_sum,
        mean_loss: losses.iter().sum::<f64>() / losses.len() as f64,
        control_delta,
    }))
}

/// The next batch of sample indices, advancing the cursor (and the epoch
/// when one ends and more are allowed). Empty when exhausted.
fn next_batch(
    config: &LocalConfig,
    client: ClientId,
    shard_len: usize,
    state: &mut ClientState,
) -> Vec<usize> {
    if state.remaining() == 0 && state.epoch + 1 < config.epochs && shard_len > 0 {
        state.epoch += 1;
        state.order = shuffled(shard_len, config.seed, client, state.epoch);
        state.cursor = 0;
    }
    let take = config.batch_size.min(state.remaining());
    let batch = state.order[state.cursor..state.cursor + take]
        .iter()
        .map(|&i| i as usize)
        .collect();
    state.cursor += take;
    batch
}
