//! A client node: one client's private shard, its state between rounds and
//! (optionally) its own state store, answering the server's round tasks
//! and status queries. The in-process transport holds one node per
//! simulated client; a deployed site runs exactly one, behind whatever
//! carries the tasks to it.
//!
//! A node's state is always "as of" a round: the state after the newest
//! round (at or before it) in which the node trained. A task for round r
//! trains from the state as of r - 1; a status query for round R reports
//! from the state as of R. In memory the node keeps its newest state; it
//! reads its store when asked about an earlier round (a resumed server) or
//! when it starts cold with a store that has states.
//!
//! With a store, the node keeps only the light part of its state in memory
//! between the rounds it trains (shuffle order, cursor, counts): the AdamW
//! moments and SCAFFOLD's control variate are on disk and read back when
//! the client next trains. A simulation's memory then does not grow with
//! its number of clients.
//!
//! A task that fails (an error while training) leaves the node's state as
//! it was: training works on a copy, committed (and saved) only on success.
//! A task delivered again (a retry after a lost reply) trains from the
//! same state as of the round before, so it gets the same answer and no
//! sample is consumed twice; that needs a store to go back to.
//!
//! Under local DP ([`ClientNode::with_local_dp`]) the node clips and noises
//! every update before answering (its training loss withheld), counts its
//! releases in its state and refuses a task that would spend more than its
//! target epsilon, before training. The noise's secret lives in the store
//! (or in memory without one), so a retried task releases the same update.

use fedcmp_core::{ClientId, ClientReply, ClientStatus, ClientUpdate, RoundTask};
use fedcmp_data::cache::FeatureCache;

use crate::client::{ClientData, ClientState, LocalConfig, LocalTrainer};
use crate::client_store::ClientStore;
use crate::{Result, RuntimeError};
use fedcmp_strategy::privacy::local::LocalDp;
use rand::Rng;

/// One client: its data, its state, its store.
#[derive(Debug)]
pub struct ClientNode {
    data: ClientData,
    /// Seed of the shard's shuffles (the run's seed).
    seed: u64,
    /// Passes over the shard.
    epochs: u32,
    /// The newest state in memory and the round it is as of; None until
    /// first needed (a node with a store may have saved states).
    state: Option<(u64, ClientState)>,
    /// The in-memory state lacks its tensors (saved in the store).
    light: bool,
    store: Option<ClientStore>,
    /// Local DP applied to every update before it leaves.
    local_dp: Option<LocalDp>,
    /// Its noise's secret, once read or drawn.
    dp_secret: Option<u64>,
}

impl ClientNode {
    /// A node over `data`, shuffled and passed over as `local` says; with a
    /// store, it saves its state after every round it trains and resumes
    /// from it.
    pub fn new(data: ClientData, local: &LocalConfig, store: Option<ClientStore>) -> Self {
        Self {
            data,
            seed: local.seed,
            epochs: local.epochs,
            state: None,
            light: false,
            store,
            local_dp: None,
            dp_secret: None,
        }
    }

    /// This node under local DP: every update it sends is clipped and
    /// noised by `dp` ([`fedcmp_strategy::privacy::local`]).
    pub fn with_local_dp(mut self, dp: LocalDp) -> Self {
        self.local_dp = Some(dp);
        self
    }

    fn dp_secret(&mut self) -> Result<u64> {
        if let Some(secret) = self.dp_secret {
            return Ok(secret);
        }
        let secret = match &self.store {
            Some(store) => store.dp_secret()?,
            None => rand::rng().random(),
        };
        self.dp_secret = Some(secret);
        Ok(secret)
    }

    /// The client's id.
    pub fn id(&self) -> ClientId {
        self.data.id
    }

    /// Brings the in-memory state to "as of `round`" and returns it.
    fn state_as_of(&mut self, round: u64) -> Result<&ClientState> {
        let current = matches!(&self.state, Some((as_of, _)) if *as_of <= round);
        if !current {
            let loaded = match &self.store {
                Some(store) => store.load_as_of(round)?,
                None if self.state.is_some() => {
                    return Err(RuntimeError::Config(format!(
                        "client {} holds its state after round {}; it has no store to go \
                         back to round {round}",
                        self.data.id.0,
                        self.state.as_ref().map_or(0, |(r, _)| *r)
                    )))
                }
                None => None,
            };
            let (as_of, state) = match loaded {
                Some((as_of, state)) => {
                    if state.order.len() != self.data.samples.len() {
                        return Err(RuntimeError::Config(format!(
                            "client {}: its saved state covers {} samples, its shard has {}",
                            self.data.id.0,
                            state.order.len(),
                            self.data.samples.len()
                        )));
                    }
                    (as_of, state)
                }
                None => (0, ClientState::new(&self.data, self.seed)),
            };
            self.state = Some((as_of, state));
            self.light = false;
        }
        match &self.state {
            Some((_, state)) => Ok(state),
            None => Err(RuntimeError::Config("client state missing".into())),
        }
    }

    fn status_of(&self, state: &ClientState) -> ClientStatus {
        ClientStatus {
            client: self.data.id,
            samples_left: state.samples_left(self.data.samples.len(), self.epochs),
            consumed: state.consumed,
            skipped: 0,
        }
    }

    /// What the client has as of the end of `round`.
    pub fn status(&mut self, round: u64) -> Result<ClientStatus> {
        let state = self.state_as_of(round)?.clone();
        Ok(self.status_of(&state))
    }

    /// Trains for one round task with `trainer` and answers it.
    pub fn handle(
        &mut self,
        trainer: &mut LocalTrainer,
        cache: &FeatureCache,
        task: &RoundTask,
    ) -> Result<ClientReply> {
        let mut working = self.begin(task)?;
        let update = trainer.train(cache, &self.data, &mut working, task)?;
        self.commit(task, working, update)
    }

    /// The state a task trains from (a copy, committed only on success),
    /// after checking that the task is this client's.
    pub fn begin(&mut self, task: &RoundTask) -> Result<ClientState> {
        if task.client() != self.data.id {
            return Err(RuntimeError::Config(format!(
                "a task for client {} reached client {}",
                task.client().0,
                self.data.id.0
            )));
        }
        let as_of = task.round().saturating_sub(1);
        self.state_as_of(as_of)?;
        if let (true, Some(store), Some((saved, _))) = (self.light, &self.store, &self.state) {
            let saved = *saved;
            let (_, full) = store
                .load_as_of(saved)?
                .filter(|(r, _)| *r == saved)
                .ok_or_else(|| {
                    RuntimeError::Config(format!(
                        "client {}: its state after round {saved} is missing from {}",
                        self.data.id.0,
                        store.dir().display()
                    ))
                })?;
            self.state = Some((saved, full));
            self.light = false;
        }
        let state = match &self.state {
            Some((_, state)) => state.clone(),
            None => return Err(RuntimeError::Config("client state missing".into())),
        };
        if let Some(dp) = &self.local_dp {
            dp.check_budget(task.round(), state.dp_releases)?;
        }
        Ok(state)
    }

    /// The client's data (what a trainer trains on).
    pub fn data(&self) -> &ClientData {
        &self.data
    }

    /// Keeps (and saves) the state a task trained to, and answers it.
    pub fn commit(
        &mut self,
        task: &RoundTask,
        mut working: ClientState,
        update: Option<ClientUpdate>,
    ) -> Result<ClientReply> {
        let round = task.round();
        let status = self.status_of(&working);
        let update = match (self.local_dp, update) {
            (Some(dp), Some(mut update)) => {
                let secret = self.dp_secret()?;
                let release = dp.privatize(&task.global, &update.params, secret, round)?;
                update.params = release.params;
                // The loss is a function of the data the noise does not cover.
                update.mean_loss = 0.0;
                working.dp_releases += 1;
                tracing::debug!(
                    client = self.data.id.0,
                    round,
                    norm = release.norm,
                    clipped = release.clipped,
                    "update released under local DP"
                );
                Some(update)
            }
            (_, update) => update,
        };
        if update.is_some() {
            if let Some(store) = &self.store {
                store.save(round, &working)?;
                if let Some(checkpointed) = task.checkpointed_round {
                    store.prune(checkpointed)?;
                }
                // Saved: keep the light part only.
                self.state = Some((
                    round,
                    ClientState {
                        optimizer: None,
                        control: None,
                        ..working
                    },
                ));
                self.light = true;
            } else {
                self.state = Some((round, working));
            }
        }
        Ok(ClientReply { status, update })
    }
}
