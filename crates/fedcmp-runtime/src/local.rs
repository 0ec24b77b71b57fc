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
    let mut run = LocalRun::start(problem, config, client, state, task)?;
    while let Some(batch) = run.next_batch(problem.shard_len(), state) {
        let out = problem.loss_and_grads(&batch)?;
        run.step(out, batch.len())?;
    }
    run.finish(problem, state)
}

/// Several clients' problems whose losses can be computed in one pass
/// (the simulation's clients sharing one frozen decoder).
pub trait JointProblem {
    /// Member `i`'s own problem.
    fn member(&mut self, i: usize) -> Result<&mut dyn LocalProblem>;
    /// For each `(member, batch)`, that member's loss and gradients at its
    /// current values, all in one pass. An inner error is that member's
    /// alone (its batch could not be prepared); the outer one fails the
    /// pass.
    fn joint_loss_and_grads(
        &mut self,
        requests: &[(usize, Vec<usize>)],
    ) -> Result<Vec<Result<LossAndGrads>>>;
}

/// One round task for member `member` of a [`JointProblem`].
#[derive(Debug)]
pub struct JointJob<'a> {
    pub member: usize,
    pub client: ClientId,
    pub state: &'a mut ClientState,
    pub task: &'a RoundTask,
}

/// Trains several clients for one round in lockstep: at each local step,
/// every client that still has a step to take contributes its next batch
/// to one joint pass, then each takes its own optimiser step. Each client
/// does exactly what [`local_round`] would (the same batches, learning
/// rates, objective and optimiser state); only the float rounding of the
/// shared pass differs. Returns one result per job, in job order; a
/// client whose step fails is dropped from later passes with its error.
pub fn local_rounds_together(
    problems: &mut dyn JointProblem,
    config: &LocalConfig,
    jobs: &mut [JointJob<'_>],
) -> Result<Vec<Result<Option<ClientUpdate>>>> {
    let mut runs: Vec<Result<LocalRun<'_>>> = jobs
        .iter()
        .map(|job| {
            LocalRun::start(
                problems.member(job.member)?,
                config,
                job.client,
                &*job.state,
                job.task,
            )
        })
        .collect();
    let mut done = vec![false; jobs.len()];
    loop {
        let mut requests = Vec::new();
        let mut who = Vec::new();
        for (i, (job, run)) in jobs.iter_mut().zip(runs.iter_mut()).enumerate() {
            let Ok(run) = run else { continue };
            if done[i] {
                continue;
            }
            let shard_len = problems.member(job.member)?.shard_len();
            match run.next_batch(shard_len, job.state) {
                Some(batch) => {
                    requests.push((job.member, batch));
                    who.push(i);
                }
                None => done[i] = true,
            }
        }
        if requests.is_empty() {
            break;
        }
        let outs = problems.joint_loss_and_grads(&requests)?;
        for ((i, (_, batch)), out) in who.into_iter().zip(&requests).zip(outs) {
            let stepped = out.and_then(|out| match &mut runs[i] {
                Ok(run) => run.step(out, batch.len()),
                Err(_) => Ok(()),
            });
            if let Err(e) = stepped {
                runs[i] = Err(e);
            }
        }
    }
    Ok(jobs
        .iter_mut()
        .zip(runs)
        .map(|(job, run)| run.and_then(|run| run.finish(problems.member(job.member)?, job.state)))
        .collect())
}

/// One client's round in progress: its optimiser, its objective's
/// corrections and what it has done so far.
struct LocalRun<'t> {
    client: ClientId,
    config: LocalConfig,
    vars: Vec<Var>,
    optimizer: AdamW,
    corrections: Corrections,
    global: &'t ParamSet,
    schedule_start: u64,
    schedule: fedcmp_core::WarmupCosine,
    steps: usize,
    losses: Vec<f64>,
    consumed: u64,
    lr_sum: f64,
}

impl<'t> LocalRun<'t> {
    /// Loads the task's global parameters into `problem` and the client's
    /// optimiser state.
    fn start(
        problem: &mut dyn LocalProblem,
        config: &LocalConfig,
        client: ClientId,
        state: &ClientState,
        task: &'t RoundTask,
    ) -> Result<Self> {
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
        let corrections = Corrections::new(
            &instruction.objective,
            global,
            &global_tensors,
            state.control.as_ref(),
        )?;
        let steps = instruction
            .max_local_steps
            .map_or(config.local_steps, |k| (k as usize).min(config.local_steps));
        Ok(Self {
            client,
            config: *config,
            vars,
            optimizer,
            corrections,
            global,
            schedule_start: task.samples_before,
            schedule: task.schedule,
            steps,
            losses: Vec::new(),
            consumed: 0,
            lr_sum: 0.0,
        })
    }

    /// The next batch, or None when the round's steps are taken or the
    /// shard is exhausted.
    fn next_batch(&mut self, shard_len: usize, state: &mut ClientState) -> Option<Vec<usize>> {
        if self.losses.len() >= self.steps {
            return None;
        }
        let batch = next_batch(&self.config, self.client, shard_len, state);
        (!batch.is_empty()).then_some(batch)
    }

    /// One optimiser step with the loss and gradients of a batch of
    /// `batch_len` samples.
    fn step(&mut self, mut out: LossAndGrads, batch_len: usize) -> Result<()> {
        if let Some(s) = &self.corrections.scaffold {
            if self.losses.is_empty() && tracing::enabled!(tracing::Level::DEBUG) {
                // Whether the control variates are on the scale of the
                // gradients they correct.
                tracing::debug!(
                    client = self.client.0,
                    gradient_norm = global_norm(out.grads.iter().flatten())?,
                    correction_norm = global_norm(s.correction.iter())?,
                    "SCAFFOLD first local step"
                );
            }
        }
        let lr = self
            .schedule
            .lr_for_batch(self.schedule_start + self.consumed, batch_len as u64);
        self.consumed += batch_len as u64;
        self.corrections.before_step(&mut out.grads, lr)?;
        self.optimizer.step(&out.grads, lr)?;
        self.corrections.after_step(&self.vars, lr)?;
        self.lr_sum += lr;
        self.losses.push(out.loss);
        Ok(())
    }

    /// The client's update (None when it trained on nothing), with its
    /// optimiser state and control variate saved into `state`.
    fn finish(
        self,
        problem: &mut dyn LocalProblem,
        state: &mut ClientState,
    ) -> Result<Option<ClientUpdate>> {
        let (global, consumed, lr_sum) = (self.global, self.consumed, self.lr_sum);
        if consumed == 0 {
            return Ok(None);
        }
        state.consumed += consumed;
        let params = problem.params()?;
        let saved = self.optimizer.state();
        state.optimizer = Some(OptimizerState {
            step: saved.step,
            first_moments: tensors_to_params(global, &saved.first_moments)?,
            second_moments: tensors_to_params(global, &saved.second_moments)?,
        });
        let control_delta = match self.corrections.scaffold {
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
            client: self.client,
            params,
            num_samples: consumed,
            num_steps: self.losses.len() as u64,
            lr_sum,
            mean_loss: self.losses.iter().sum::<f64>() / self.losses.len() as f64,
            control_delta,
        }))
    }
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
