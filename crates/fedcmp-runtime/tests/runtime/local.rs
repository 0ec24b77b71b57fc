//! The local objectives keep their papers' meaning under AdamW
//! (ALGORITHMS.md §7.6), shown on quadratic toys where the answer is known
//! in closed form, through the real local round and the real strategies:
//!
//! - FedProx: a larger mu keeps a client nearer the global model, and a
//!   pull of at least one step size keeps it there;
//! - SCAFFOLD: control variates of the order of the gradients (a weighted
//!   mean of them), and no client drift: two clients with different
//!   curvatures, many local steps; FedAvg settles away from the global
//!   optimum, SCAFFOLD at it.

use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use fedcmp_core::{
    ClientId, ClientInstruction, ClientUpdate, LocalObjective, ParamSet, ParamTensor, RoundTask,
    WarmupCosine,
};
use fedcmp_model::optim::AdamWConfig;
use fedcmp_runtime::client::{ClientState, LocalConfig};
use fedcmp_runtime::local::{
    local_round, local_rounds_together, JointJob, JointProblem, LocalProblem, LossAndGrads,
};
use fedcmp_strategy::config::StrategyConfig;

/// f(x) = 1/2 sum_j h_j (x_j - a_j)^2, the same for every batch.
struct Quadratic {
    x: Var,
    h: Tensor,
    a: Tensor,
    /// The largest gradient norm seen (for the units check).
    max_grad_norm: f64,
    /// Samples in the (toy) shard.
    shard: usize,
}

impl Quadratic {
    fn new(h: &[f32], a: &[f32]) -> Result<Self> {
        let d = h.len();
        Ok(Self {
            x: Var::zeros(d, DType::F32, &Device::Cpu)?,
            h: Tensor::new(h, &Device::Cpu)?,
            a: Tensor::new(a, &Device::Cpu)?,
            max_grad_norm: 0.0,
            shard: 1_000_000,
        })
    }
}

impl LocalProblem for Quadratic {
    fn vars(&self) -> Vec<Var> {
        vec![self.x.clone()]
    }

    fn params(&self) -> fedcmp_runtime::Result<ParamSet> {
        let data: Vec<f32> = self.x.as_tensor().to_vec1()?;
        Ok(ParamSet::new(vec![(
            "x".to_string(),
            ParamTensor::new("x", vec![data.len()], data)?,
        )])?)
    }

    fn set_params(&mut self, params: &ParamSet) -> fedcmp_runtime::Result<()> {
        let x = params.get("x").map(|t| t.data.clone()).unwrap_or_default();
        self.x.set(&Tensor::new(x.as_slice(), &Device::Cpu)?)?;
        Ok(())
    }

    fn shard_len(&self) -> usize {
        self.shard
    }

    fn loss_and_grads(&mut self, _batch: &[usize]) -> fedcmp_runtime::Result<LossAndGrads> {
        let diff = (self.x.as_tensor() - &self.a)?;
        let grad = (&self.h * &diff)?;
        let loss = (&grad * &diff)?.sum_all()?.to_scalar::<f32>()? as f64 / 2.0;
        let norm = grad.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64;
        self.max_grad_norm = self.max_grad_norm.max(norm);
        Ok(LossAndGrads {
            loss,
            grads: vec![Some(grad)],
        })
    }
}

fn config(local_steps: usize) -> LocalConfig {
    LocalConfig {
        local_steps,
        batch_size: 1,
        epochs: 1,
        reset_optimizer: false,
        adamw: AdamWConfig::default(),
        seed: 1,
    }
}

fn x_of(p: &ParamSet) -> Vec<f32> {
    p.get("x").map(|t| t.data.clone()).unwrap_or_default()
}

fn distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// `rounds` rounds of `strategy` over `clients` quadratics (data weights
/// equal), `local_steps` AdamW steps each, learning rate `lr` with a
/// cosine over the whole run; returns the final global x and every update.
fn federate(
    strategy: &str,
    clients: &mut [Quadratic],
    rounds: u64,
    local_steps: usize,
    lr: f64,
) -> Result<(Vec<f32>, Vec<ClientUpdate>)> {
    let strategy_config: StrategyConfig =
        serde_json::from_value(serde_json::json!({ "name": strategy }))?;
    let mut strategy = strategy_config.build(clients.len())?;
    let local = config(local_steps);
    let mut states: Vec<ClientState> = (0..clients.len())
        .map(|i| ClientState::fresh(clients[i].shard_len(), 1, ClientId(i as u32)))
        .collect();
    let mut global = clients[0].params()?;
    for t in global.tensors_mut() {
        t.data.iter_mut().for_each(|v| *v = 0.0);
    }
    let per_round = (clients.len() * local_steps) as u64;
    let schedule = WarmupCosine {
        peak_lr: lr,
        total_samples: rounds * per_round,
        warmup_ratio: 0.0,
    };
    let ids: Vec<ClientId> = (0..clients.len() as u32).map(ClientId).collect();
    let mut all = Vec::new();
    for round in 1..=rounds {
        let shared = Arc::new(global.clone());
        let mut updates = Vec::new();
        for (instruction, (problem, state)) in strategy
            .configure_round(round, &ids)
            .into_iter()
            .zip(clients.iter_mut().zip(&mut states))
        {
            let task = RoundTask {
                instruction,
                global: shared.clone(),
                schedule,
                samples_before: (round - 1) * per_round,
                checkpointed_round: None,
            };
            let client = task.client();
            let update = local_round(problem, &local, client, state, &task)?
                .ok_or_else(|| anyhow::anyhow!("the toy shard ran out"))?;
            updates.push(update);
        }
        global = strategy.aggregate(round, &global, &updates)?.params;
        all.extend(updates);
    }
    Ok((x_of(&global), all))
}

#[test]
fn scaffold_removes_the_client_drift_that_fedavg_shows() -> Result<()> {
    // Client 0: steep (h = 10) around +1; client 1: flat (h = 1) around -1.
    // The federation's optimum: (10 * 1 + 1 * -1) / 11 = 9 / 11.
    let make = || -> Result<Vec<Quadratic>> {
        Ok(vec![
            Quadratic::new(&[10.0], &[1.0])?,
            Quadratic::new(&[1.0], &[-1.0])?,
        ])
    };
    let optimum = [9.0f32 / 11.0];
    let (fedavg, _) = federate("fedavg", &mut make()?, 60, 20, 0.05)?;
    let mut clients = make()?;
    let (scaffold, updates) = federate("scaffold", &mut clients, 60, 20, 0.05)?;
    let drift = distance(&fedavg, &optimum);
    let error = distance(&scaffold, &optimum);
    assert!(
        drift > 0.2,
        "FedAvg should drift here: {fedavg:?} vs {optimum:?}"
    );
    assert!(
        error < 0.05,
        "SCAFFOLD should reach the optimum: {scaffold:?} vs {optimum:?}"
    );
    assert!(error < drift / 5.0, "SCAFFOLD {error} vs FedAvg {drift}");
    // The control variates are weighted means of raw gradients: never
    // larger than the largest gradient a client saw.
    let max_grad = clients.iter().map(|c| c.max_grad_norm).fold(0.0, f64::max);
    for u in &updates {
        let delta = u.control_delta.as_ref().map(x_of).unwrap_or_default();
        let norm = distance(&delta, &vec![0.0; delta.len()]);
        assert!(
            norm <= 2.0 * max_grad + 1e-6,
            "control change {norm} vs gradients up to {max_grad}"
        );
    }
    Ok(())
}

#[test]
fn fedprox_keeps_clients_near_the_global_model_as_mu_grows() -> Result<()> {
    let drift = |mu: f64| -> Result<f64> {
        let mut problem = Quadratic::new(&[1.0, 4.0], &[2.0, -3.0])?;
        let global = {
            let mut g = problem.params()?;
            for t in g.tensors_mut() {
                t.data.iter_mut().for_each(|v| *v = 0.0);
            }
            g
        };
        let mut state = ClientState::fresh(problem.shard_len(), 1, ClientId(0));
        let task = RoundTask {
            instruction: ClientInstruction {
                round: 1,
                client: ClientId(0),
                objective: fedcmp_core::LocalObjective::Proximal { mu },
                max_local_steps: None,
            },
            global: Arc::new(global.clone()),
            schedule: WarmupCosine {
                peak_lr: 0.05,
                total_samples: 1_000_000,
                warmup_ratio: 0.0,
            },
            samples_before: 0,
            checkpointed_round: None,
        };
        let update = local_round(&mut problem, &config(40), ClientId(0), &mut state, &task)?
            .ok_or_else(|| anyhow::anyhow!("no update"))?;
        Ok(distance(&x_of(&update.params), &x_of(&global)))
    };
    let drifts = [0.0, 0.1, 1.0, 10.0, 100.0]
        .iter()
        .map(|mu| drift(*mu))
        .collect::<Result<Vec<_>>>()?;
    for pair in drifts.windows(2) {
        assert!(
            pair[1] < pair[0],
            "drift must shrink as mu grows: {drifts:?}"
        );
    }
    // Without the pull the client walks ~40 steps of 0.05 per coordinate.
    assert!(drifts[0] > 1.5, "{drifts:?}");
    // lr * mu = 5 >= 1: pulled back to the global model after every step.
    assert!(drifts[4] < 1e-6, "{drifts:?}");
    // lr * mu = 0.5: a step of ~lr out, half of it pulled back, so about
    // lr from the global model per coordinate.
    assert!(drifts[3] < 0.1, "{drifts:?}");
    Ok(())
}

/// Quadratics whose "joint pass" asks each member in turn: exact, so the
/// lockstep driver must reproduce the one-client-at-a-time rounds bit for
/// bit.
struct Together(Vec<Quadratic>);

impl JointProblem for Together {
    fn member(&mut self, i: usize) -> fedcmp_runtime::Result<&mut dyn LocalProblem> {
        let n = self.0.len();
        self.0
            .get_mut(i)
            .map(|q| q as &mut dyn LocalProblem)
            .ok_or_else(|| fedcmp_runtime::RuntimeError::Config(format!("member {i} of {n}")))
    }

    fn joint_loss_and_grads(
        &mut self,
        requests: &[(usize, Vec<usize>)],
    ) -> fedcmp_runtime::Result<Vec<fedcmp_runtime::Result<LossAndGrads>>> {
        Ok(requests
            .iter()
            .map(|(i, batch)| self.member(*i)?.loss_and_grads(batch))
            .collect())
    }
}

/// Clients trained in lockstep take exactly the steps they take alone:
/// SCAFFOLD, FedProx and plain objectives side by side, a straggler told
/// to stop after 2 steps, and a shard that runs out after 3; two rounds,
/// so the optimiser state and control variates carry over.
#[test]
fn lockstep_rounds_equal_the_rounds_one_client_at_a_time() -> Result<()> {
    let make = || -> Result<Vec<Quadratic>> {
        let mut q = vec![
            Quadratic::new(&[10.0, 2.0], &[1.0, -0.5])?,
            Quadratic::new(&[1.0, 3.0], &[-1.0, 0.25])?,
            Quadratic::new(&[4.0, 0.5], &[0.5, 2.0])?,
        ];
        q[2].shard = 3;
        Ok(q)
    };
    let local = config(5);
    let global = Arc::new(ParamSet::new(vec![(
        "x".to_string(),
        ParamTensor::new("x", vec![2], vec![0.1, -0.2])?,
    )])?);
    let server_control = ParamSet::new(vec![(
        "x".to_string(),
        ParamTensor::new("x", vec![2], vec![0.3, -0.1])?,
    )])?;
    let objectives = [
        LocalObjective::Scaffold { server_control },
        LocalObjective::Proximal { mu: 0.5 },
        LocalObjective::Plain,
    ];
    let task = |round: u64, i: usize| RoundTask {
        instruction: ClientInstruction {
            round,
            client: ClientId(i as u32),
            objective: objectives[i].clone(),
            max_local_steps: (i == 1).then_some(2),
        },
        global: global.clone(),
        schedule: WarmupCosine {
            peak_lr: 0.05,
            total_samples: 40,
            warmup_ratio: 0.1,
        },
        samples_before: (round - 1) * 12,
        checkpointed_round: None,
    };
    let fresh = |q: &[Quadratic]| -> Vec<ClientState> {
        q.iter()
            .enumerate()
            .map(|(i, c)| ClientState::fresh(c.shard, 1, ClientId(i as u32)))
            .collect()
    };
    let mut alone = make()?;
    let mut alone_states = fresh(&alone);
    let mut together = Together(make()?);
    let mut together_states = fresh(&together.0);
    for round in 1..=2 {
        let tasks: Vec<RoundTask> = (0..3).map(|i| task(round, i)).collect();
        let mut expected = Vec::new();
        for (i, (problem, state)) in alone.iter_mut().zip(&mut alone_states).enumerate() {
            expected.push(local_round(
                problem,
                &local,
                ClientId(i as u32),
                state,
                &tasks[i],
            )?);
        }
        let mut jobs: Vec<JointJob<'_>> = together_states
            .iter_mut()
            .zip(&tasks)
            .enumerate()
            .map(|(i, (state, task))| JointJob {
                member: i,
                client: ClientId(i as u32),
                state,
                task,
            })
            .collect();
        let got = local_rounds_together(&mut together, &local, &mut jobs)?
            .into_iter()
            .collect::<fedcmp_runtime::Result<Vec<_>>>()?;
        assert_eq!(got, expected, "round {round}");
        assert_eq!(together_states, alone_states, "round {round}");
    }
    let steps: Vec<u64> = alone_states.iter().map(|s| s.consumed).collect();
    assert_eq!(
        steps,
        vec![10, 4, 3],
        "5 + 5 steps, 2 + 2, then the shard ran out"
    );
    Ok(())
}
