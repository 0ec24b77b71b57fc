//! How a round's instructions reach clients and their updates come back.
//! The round loop only talks to [`Transport`]; simulation uses
//! [`InProcess`], deployment a network transport, with the same strategy
//! and the same local trainer behind both.

use fedcmp_core::{ClientId, ClientInstruction, ClientUpdate, ParamSet};
use fedcmp_data::cache::FeatureCache;
use fedcmp_model::optim::WarmupCosine;

use crate::client::{ClientData, ClientState, LocalTrainer, RoundContext};
use crate::{Result, RuntimeError};

/// Everything a client needs for one round besides its own data and state.
#[derive(Debug, Clone)]
pub struct RoundPlan<'a> {
    pub global: &'a ParamSet,
    pub instructions: Vec<ClientInstruction>,
    pub schedule: WarmupCosine,
    /// Global samples consumed before this round (the schedule's clock).
    pub round_start_samples: u64,
}

/// Delivers a round to clients and collects the updates of those that
/// answered (a client that failed or had no data left is simply absent).
pub trait Transport {
    fn run_round(&mut self, plan: &RoundPlan<'_>) -> Result<Vec<ClientUpdate>>;
    /// Clients that still have data to train on.
    fn active_clients(&self) -> Vec<ClientId>;
    /// Samples each client has consumed so far, by client id.
    fn consumed(&self) -> Vec<(ClientId, u64)>;
    /// The state of the clients this process holds (for checkpoints); a
    /// network transport's clients checkpoint themselves and return none.
    fn client_states(&self) -> Vec<(ClientId, ClientState)>;
    /// Restores states saved by [`Transport::client_states`].
    fn restore_client_states(&mut self, states: Vec<(ClientId, ClientState)>) -> Result<()>;
}

/// All clients in this process, trained one after another by one shared
/// trainer (the frozen backbones are loaded once).
#[derive(Debug)]
pub struct InProcess<'a> {
    trainer: LocalTrainer,
    cache: &'a FeatureCache,
    clients: Vec<(ClientData, ClientState)>,
}

impl<'a> InProcess<'a> {
    /// Clients with fresh state (shards shuffled with the trainer's seed).
    pub fn new(trainer: LocalTrainer, cache: &'a FeatureCache, data: Vec<ClientData>) -> Self {
        let seed = trainer.config().seed;
        let clients = data
            .into_iter()
            .map(|d| {
                let s = ClientState::new(&d, seed);
                (d, s)
            })
            .collect();
        Self {
            trainer,
            cache,
            clients,
        }
    }
}

impl Transport for InProcess<'_> {
    fn run_round(&mut self, plan: &RoundPlan<'_>) -> Result<Vec<ClientUpdate>> {
        let mut updates = Vec::with_capacity(plan.instructions.len());
        for instruction in &plan.instructions {
            let Some((data, state)) = self
                .clients
                .iter_mut()
                .find(|(d, _)| d.id == instruction.client)
            else {
                tracing::warn!(
                    client = instruction.client.0,
                    "instruction for an unknown client"
                );
                continue;
            };
            let context = RoundContext {
                cache: self.cache,
                global: plan.global,
                instruction,
                schedule: &plan.schedule,
                round_start_samples: plan.round_start_samples,
            };
            if let Some(update) = self.trainer.train(data, state, &context)? {
                updates.push(update);
            }
        }
        Ok(updates)
    }

    fn active_clients(&self) -> Vec<ClientId> {
        let epochs = self.trainer.config().epochs;
        self.clients
            .iter()
            .filter(|(d, s)| !d.samples.is_empty() && (s.remaining() > 0 || s.epoch + 1 < epochs))
            .map(|(d, _)| d.id)
            .collect()
    }

    fn consumed(&self) -> Vec<(ClientId, u64)> {
        self.clients
            .iter()
            .map(|(d, s)| (d.id, s.consumed))
            .collect()
    }

    fn client_states(&self) -> Vec<(ClientId, ClientState)> {
        self.clients
            .iter()
            .map(|(d, s)| (d.id, s.clone()))
            .collect()
    }

    fn restore_client_states(&mut self, states: Vec<(ClientId, ClientState)>) -> Result<()> {
        if states.len() != self.clients.len() {
            return Err(RuntimeError::Config(format!(
                "checkpoint holds {} clients, this federation has {}",
                states.len(),
                self.clients.len()
            )));
        }
        for ((data, state), (id, saved)) in self.clients.iter_mut().zip(states) {
            if data.id != id || saved.order.len() != data.samples.len() {
                return Err(RuntimeError::Config(format!(
                    "checkpoint client {} ({} samples) does not match client {} ({} samples)",
                    id.0,
                    saved.order.len(),
                    data.id.0,
                    data.samples.len()
                )));
            }
            *state = saved;
        }
        Ok(())
    }
}
