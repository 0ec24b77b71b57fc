//! The three kinds of training, all through the one round loop and the one
//! client node:
//!
//! - federated: the scenario's clients and participation with a strategy,
//!   simulated dropouts and stragglers wrapped around the in-process
//!   transport;
//! - centralized: every shard pooled into one client that takes part in
//!   every round, with plain FedAvg steps (server lr 1: the global model is
//!   the client's), so it trains with the same optimiser, schedule and
//!   sample budget; this is the only centralized training loop;
//! - local-only: every client alone on its shard, with its own schedule
//!   over its own samples.

use std::num::NonZeroU64;
use std::path::Path;

use fedcmp_core::{ClientId, FailureKind, ParamSet, WarmupCosine};
use fedcmp_data::scenario::Participation;
use fedcmp_model::optim::AdamWConfig;
use fedcmp_runtime::checkpoint::{self, Checkpoint};
use fedcmp_runtime::client::{ClientData, LocalConfig, LocalTrainer};
use fedcmp_runtime::client_store::ClientStore;
use fedcmp_runtime::convert::projector_params;
use fedcmp_runtime::hostile::Hostile;
use fedcmp_runtime::node::ClientNode;
use fedcmp_runtime::round_loop::{
    drive, CheckpointHook, LoopSummary, RoundLoopConfig, RoundLoopState, RoundRecord, Start,
};
use fedcmp_runtime::simulation::{RoundRng, Simulated, Unreliability};
use fedcmp_runtime::transport::InProcess;
use fedcmp_runtime::transport::Transport;
use fedcmp_strategy::config::StrategyConfig;
use fedcmp_strategy::privacy::central::{private, Federation};
use fedcmp_strategy::privacy::config::DpMode;
use fedcmp_strategy::privacy::local::locally_private;
use fedcmp_strategy::Strategy;

use crate::assembly::Experiment;
use crate::settings::{RunSettings, Training};
use crate::{ExperimentError, Result};

/// One client holding every shard (the centralized reference).
pub fn pooled(clients: &[ClientData]) -> ClientData {
    ClientData {
        id: ClientId(0),
        samples: clients.iter().flat_map(|c| c.samples.clone()).collect(),
    }
}

/// The samples a one-pass run consumes: every shard once.
pub fn sample_budget(clients: &[ClientData]) -> u64 {
    clients.iter().map(|c| c.samples.len() as u64).sum()
}

/// The clients a federated or centralized run trains, who takes part in
/// each round, and the server strategy.
pub fn federation_of(
    experiment: &Experiment,
    training: &Training,
) -> Result<(Vec<ClientData>, Participation, StrategyConfig)> {
    match training {
        Training::Federated(strategy) => Ok((
            experiment.clients.clone(),
            experiment.scenario.participation.clone(),
            strategy.clone(),
        )),
        Training::Centralized => Ok((
            vec![pooled(&experiment.clients)],
            Participation::default(),
            StrategyConfig::default(),
        )),
        Training::LocalOnly => Err(ExperimentError::Invalid(
            "local-only training has no federation; see train_local_only".into(),
        )),
    }
}

/// Clients sampled in a round out of `clients` under `participation`.
pub fn clients_per_round(participation: &Participation, clients: usize) -> usize {
    participation.clients_per_round.map_or_else(
        || {
            participation
                .fraction
                .map_or(clients, |f| (f * clients as f64).ceil() as usize)
        },
        |k| k.get(),
    )
}

/// The pairs of one local step. A federated (or local-only) client takes
/// `batch-size`; the centralized reference steps on a whole federated
/// round's worth, `batch-size` x the clients of a round of the scenario,
/// so that at equal samples it takes as many sequential optimiser steps
/// as the federation it bounds (steps parity, ALGORITHMS.md §7.3).
pub fn step_batch(experiment: &Experiment, settings: &RunSettings) -> usize {
    let batch = settings.recipe.batch_size.get();
    match settings.training {
        Training::Centralized => {
            batch
                * clients_per_round(&experiment.scenario.participation, experiment.clients.len())
                    .max(1)
        }
        Training::Federated(_) | Training::LocalOnly => batch,
    }
}

/// How every client of `settings` trains locally, a client's own batch
/// (see [`step_batch`] for the centralized one).
pub fn local_config(settings: &RunSettings) -> LocalConfig {
    LocalConfig {
        local_steps: settings.recipe.local_steps.get(),
        batch_size: settings.recipe.batch_size.get(),
        epochs: 1,
        reset_optimizer: settings.recipe.reset_optimizer,
        adamw: AdamWConfig::default(),
        seed: settings.seed,
    }
}

/// A trainer for clients that train as `local` says, over the
/// experiment's frozen backbones (one working projector; every client
/// node shares it).
pub fn local_trainer(
    experiment: &Experiment,
    settings: &RunSettings,
    local: &LocalConfig,
) -> Result<LocalTrainer> {
    Ok(LocalTrainer::new(
        experiment.decoder.clone(),
        experiment.tokenizer.clone(),
        experiment.template.clone(),
        experiment.projector(settings.recipe.projector, settings.seed)?,
        *local,
    )?)
}

/// The round loop's settings for `participation` over `budget` samples.
pub fn round_loop_config(
    settings: &RunSettings,
    participation: &Participation,
    budget: u64,
) -> RoundLoopConfig {
    let protocol = &settings.protocol;
    RoundLoopConfig {
        max_rounds: settings.recipe.rounds.map_or(u64::MAX, NonZeroU64::get),
        clients_per_round: participation.clients_per_round.map(|k| k.get()),
        fraction: participation.fraction,
        min_clients: participation.min_clients,
        eval_every: protocol.eval_every.get(),
        schedule: WarmupCosine {
            peak_lr: settings.recipe.lr,
            total_samples: budget.max(1),
            warmup_ratio: settings.recipe.warmup_ratio,
        },
        quorum: protocol.quorum.get(),
        deadline: protocol.round_deadline,
        failure_limit: protocol.failure_limit.get(),
        losses_withheld: settings
            .privacy
            .as_ref()
            .is_some_and(|p| p.mode == DpMode::Local),
    }
}

/// The simulated unreliability of `participation`: a straggler completes
/// half its local steps, rounded up.
pub fn unreliability(settings: &RunSettings, participation: &Participation) -> Unreliability {
    Unreliability {
        dropout: participation.dropout,
        stragglers: participation.stragglers,
        straggler_steps: settings.recipe.local_steps.get().div_ceil(2) as u32,
    }
}

/// Rounds until the largest shard is consumed under full participation,
/// or until the budget is consumed at partial participation, capped by
/// the configured rounds, for clients stepping on `batch` pairs: an
/// estimate for progress bars.
pub fn estimate_rounds(
    settings: &RunSettings,
    batch: usize,
    shard_sizes: &[usize],
    per_round: usize,
) -> u64 {
    let per_client_round = (settings.recipe.local_steps.get() * batch) as u64;
    let budget: u64 = shard_sizes.iter().map(|s| *s as u64).sum();
    let longest = shard_sizes.iter().max().copied().unwrap_or(0) as u64;
    longest
        .div_ceil(per_client_round)
        .max(budget.div_ceil(per_client_round * per_round.max(1) as u64))
        .min(settings.recipe.rounds.map_or(u64::MAX, NonZeroU64::get))
}

/// Where a run keeps what it needs to resume: server checkpoints and one
/// state folder per client.
#[derive(Debug)]
pub struct Storage<'a> {
    pub checkpoints: &'a Path,
    /// Holds `client-<id>/` folders.
    pub clients: &'a Path,
    /// Save a server checkpoint every this many rounds (and after the last).
    pub every: u64,
    /// Resume from this checkpoint (the clients restore their own states
    /// as of its round).
    pub resume: Option<Checkpoint>,
}

/// A client's state folder under `clients`.
pub fn client_store(clients: &Path, id: ClientId) -> Result<ClientStore> {
    Ok(ClientStore::open(
        clients.join(format!("client-{:04}", id.0)),
        id,
    )?)
}

/// One finished federated or centralized training.
#[derive(Debug)]
pub struct Trained {
    pub summary: LoopSummary,
    /// The records of the rounds run in this call.
    pub records: Vec<RoundRecord>,
    /// Validation NLL of the final projector.
    pub val_nll: f64,
}

/// Trains one projector, federated or centralized, as `settings` say;
/// with `storage`, checkpointing (and resuming) on disk. `observe` sees
/// every round.
pub fn train(
    experiment: &Experiment,
    settings: &RunSettings,
    storage: Option<Storage<'_>>,
    observe: &mut dyn FnMut(&RoundRecord),
) -> Result<Trained> {
    let (clients, participation, strategy_config) = federation_of(experiment, &settings.training)?;
    let per_round = clients_per_round(&participation, clients.len());
    let strategy = build_strategy(settings, &strategy_config, clients.len(), per_round)?;
    train_with(experiment, settings, strategy, storage, observe)
}

/// The strategy of `settings` for a federation of `clients`, `per_round`
/// of them per round: `config` as it is, or under DP-FedAvg when the
/// settings ask for privacy (its noise set for the planned rounds when
/// they give a target epsilon).
pub fn build_strategy(
    settings: &RunSettings,
    config: &StrategyConfig,
    clients: usize,
    per_round: usize,
) -> Result<Box<dyn Strategy>> {
    match &settings.privacy {
        None => Ok(config.build(clients)?),
        Some(privacy) if privacy.mode == DpMode::Local => {
            let dp = privacy.resolve_local(settings.recipe.rounds.map(|r| r.get()))?;
            Ok(locally_private(config, dp, clients)?)
        }
        Some(privacy) => {
            let resolved =
                privacy.resolve(per_round, clients, settings.recipe.rounds.map(|r| r.get()))?;
            let federation = Federation { clients, per_round };
            Ok(private(config, &resolved, federation)?)
        }
    }
}

/// The node of client `data`, under local DP when the settings ask for it
/// (the sites' side of `[privacy] mode = "local"`).
pub fn client_node(
    settings: &RunSettings,
    data: ClientData,
    local: &LocalConfig,
    store: Option<ClientStore>,
) -> Result<ClientNode> {
    let node = ClientNode::new(data, local, store);
    Ok(match &settings.privacy {
        Some(privacy) if privacy.mode == DpMode::Local => {
            node.with_local_dp(privacy.resolve_local(settings.recipe.rounds.map(|r| r.get()))?)
        }
        _ => node,
    })
}

/// [`train`] with a strategy built by the caller (e.g. one that records
/// what it aggregates) instead of the one `settings` name.
pub fn train_with(
    experiment: &Experiment,
    settings: &RunSettings,
    mut strategy: Box<dyn Strategy>,
    storage: Option<Storage<'_>>,
    observe: &mut dyn FnMut(&RoundRecord),
) -> Result<Trained> {
    let (clients, participation, _) = federation_of(experiment, &settings.training)?;
    let budget = sample_budget(&clients);
    if budget == 0 {
        return Err(ExperimentError::Invalid(format!(
            "scenario {} leaves no training sample",
            experiment.scenario.name
        )));
    }
    let local = LocalConfig {
        batch_size: step_batch(experiment, settings),
        ..local_config(settings)
    };
    let kind = settings.recipe.projector;
    let trainer = local_trainer(experiment, settings, &local)?;
    let per_pass = settings.protocol.clients_per_pass.resolve(
        clients_per_round(&participation, clients.len()),
        local.batch_size,
    );
    let nodes = clients
        .into_iter()
        .map(|data| {
            let store = storage
                .as_ref()
                .map(|s| client_store(s.clients, data.id))
                .transpose()?;
            client_node(settings, data, &local, store)
        })
        .collect::<Result<Vec<_>>>()?;
    let ids: Vec<ClientId> = nodes.iter().map(|n| n.id()).collect();
    let rng = RoundRng::new(settings.seed);
    let simulated = Simulated::new(
        InProcess::new(trainer, &experiment.cache, nodes).clients_per_pass(per_pass),
        rng.clone(),
        unreliability(settings, &participation),
    )?;
    let mut transport: Box<dyn Transport + '_> = match &settings.attack {
        Some(attack) => {
            let hostile = Hostile::new(simulated, attack.resolve(&ids, settings.seed)?);
            // A stale client's past updates resume with the run.
            Box::new(match &storage {
                Some(s) => hostile.with_folder(s.clients.join("hostile")),
                None => hostile,
            })
        }
        None => Box::new(simulated),
    };
    let work = experiment.projector(kind, settings.seed)?;
    let validator = experiment.validator();
    let (start, hook_dir, every) = match storage {
        Some(Storage {
            checkpoints,
            every,
            resume,
            ..
        }) => {
            let start = match resume {
                Some(saved) => {
                    strategy.load_state(saved.strategy)?;
                    Start::Resume(saved.round_loop)
                }
                None => Start::Fresh(projector_params(&work)?),
            };
            (start, Some(checkpoints), every)
        }
        None => (Start::Fresh(projector_params(&work)?), None, 1),
    };
    let mut save = |state: &RoundLoopState, strategy: &dyn Strategy| match hook_dir {
        Some(dir) => checkpoint::save_server(dir, state, strategy),
        None => Ok(()),
    };
    let mut records = Vec::new();
    // In simulation every client is this process's own training, so an
    // update the round loop refuses (non-finite values) means the run
    // diverged: the run fails rather than ending quietly without its
    // clients (across sites a refused update is a bad site, and the round
    // goes on; see `server`).
    let mut refused: Option<String> = None;
    let summary = drive(
        &round_loop_config(settings, &participation, budget),
        &rng,
        strategy.as_mut(),
        transport.as_mut(),
        start,
        &mut |p: &ParamSet| validator.nll_of(&work, p).map(Some),
        &mut |r| {
            if refused.is_none() {
                refused = r
                    .failures
                    .iter()
                    .find(|f| f.kind == FailureKind::Refused)
                    .map(|f| format!("round {}, client {}: {}", r.round, f.client.0, f.message));
            }
            observe(r);
            records.push(r.clone());
        },
        hook_dir.map(|_| CheckpointHook {
            every,
            save: &mut save,
        }),
    )?;
    if let Some(reason) = refused {
        return Err(ExperimentError::Invalid(format!(
            "the run diverged: the server refused an update ({reason})"
        )));
    }
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

/// One client's result in the local-only reference.
#[derive(Debug, Clone)]
pub struct LocalOnlyClient {
    pub client: ClientId,
    /// Samples it consumed.
    pub samples: u64,
    pub params: ParamSet,
}

/// The local-only reference: every client trains alone on its shard (its
/// own schedule over its own samples); `done` after each client.
pub fn train_local_only(
    experiment: &Experiment,
    settings: &RunSettings,
    done: &mut dyn FnMut(ClientId),
) -> Result<Vec<LocalOnlyClient>> {
    let mut out = Vec::new();
    let local = local_config(settings);
    let kind = settings.recipe.projector;
    for client in &experiment.clients {
        let id = client.id;
        let size = client.samples.len() as u64;
        let trainer = local_trainer(experiment, settings, &local)?;
        let node = ClientNode::new(client.clone(), &local, None);
        let mut transport = InProcess::new(trainer, &experiment.cache, vec![node]);
        let mut strategy = StrategyConfig::default().build(1)?;
        let config = round_loop_config(settings, &Participation::default(), size);
        let summary = drive(
            &config,
            &RoundRng::new(settings.seed),
            strategy.as_mut(),
            &mut transport,
            Start::Fresh(projector_params(
                &experiment.projector(kind, settings.seed)?,
            )?),
            &mut |_| Ok(None),
            &mut |_| {},
            None,
        )?;
        out.push(LocalOnlyClient {
            client: id,
            samples: summary.samples_total,
            params: summary.final_params,
        });
        done(id);
    }
    Ok(out)
}
