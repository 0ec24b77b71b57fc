//! How round tasks reach clients and their replies come back. The round
//! loop talks only to [`Transport`]: simulation uses [`InProcess`] (wrapped
//! in [`crate::simulation::Simulated`] for dropouts and stragglers), a
//! deployment carries the same tasks over the network to the same
//! [`ClientNode`] code.

use std::time::Instant;

use fedcmp_core::{ClientFailure, ClientId, ClientReply, ClientStatus, FailureKind, RoundTask};
use fedcmp_data::cache::FeatureCache;

use crate::client::{LocalTrainer, TrainJob};
use crate::node::ClientNode;
use crate::Result;

/// What came back from one round: the replies, and the clients that
/// failed it (errors, timeouts, simulated dropouts).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoundOutcome {
    pub replies: Vec<ClientReply>,
    pub failures: Vec<ClientFailure>,
    /// Clients told to stop after fewer local steps (simulated stragglers).
    pub stragglers: Vec<ClientId>,
    /// Statuses of clients the transport found this round besides the
    /// replies (a site that connected or reconnected since the loop
    /// started): the round loop samples them from the next round on.
    pub joined: Vec<ClientStatus>,
}

/// Delivers round tasks and status queries to clients.
///
/// A client that errs or misses the deadline is a failure in the outcome,
/// never an `Err`: `Err` means the transport itself is broken.
pub trait Transport {
    /// Every reachable client's status as of the end of `round` (0: before
    /// any training). A resumed server asks with its checkpoint's round.
    fn status(&mut self, round: u64) -> Result<Vec<ClientStatus>>;

    /// Delivers one task per client and collects what comes back by
    /// `deadline`.
    fn run_round(
        &mut self,
        tasks: Vec<RoundTask>,
        deadline: Option<Instant>,
    ) -> Result<RoundOutcome>;
}

/// Every client in this process, trained by one shared trainer (the frozen
/// backbones are loaded once): one after another, or several at a time
/// with their local steps through the decoder together
/// ([`Self::clients_per_pass`]).
#[derive(Debug)]
pub struct InProcess<'a> {
    trainer: LocalTrainer,
    cache: &'a FeatureCache,
    nodes: Vec<ClientNode>,
    clients_per_pass: usize,
}

impl<'a> InProcess<'a> {
    /// Clients `nodes`, trained by `trainer` on features from `cache`, one
    /// at a time.
    pub fn new(trainer: LocalTrainer, cache: &'a FeatureCache, nodes: Vec<ClientNode>) -> Self {
        Self {
            trainer,
            cache,
            nodes,
            clients_per_pass: 1,
        }
    }

    /// Trains up to `n` clients of a round together (in task order, `n` at
    /// a time): one decoder pass per local step for all of them. Each
    /// client's update equals its sequential one up to float rounding; a
    /// run is bit-identical to itself at the same `n`.
    pub fn clients_per_pass(mut self, n: usize) -> Self {
        self.clients_per_pass = n.max(1);
        self
    }

    /// The local trainer (its configuration builds the nodes).
    pub fn trainer(&self) -> &LocalTrainer {
        &self.trainer
    }
}

impl Transport for InProcess<'_> {
    fn status(&mut self, round: u64) -> Result<Vec<ClientStatus>> {
        self.nodes.iter_mut().map(|n| n.status(round)).collect()
    }

    /// Clients train in task order, `clients_per_pass` at a time; once the
    /// deadline has passed, the clients not yet started time out (a
    /// simulation cannot interrupt clients that have started).
    fn run_round(
        &mut self,
        tasks: Vec<RoundTask>,
        deadline: Option<Instant>,
    ) -> Result<RoundOutcome> {
        let mut outcome = RoundOutcome::default();
        for group in tasks.chunks(self.clients_per_pass) {
            // (node index, task, working state) of the group's clients.
            let mut started = Vec::with_capacity(group.len());
            for task in group {
                let client = task.client();
                let fail = |kind, message: String| ClientFailure {
                    client,
                    kind,
                    message,
                };
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    outcome.failures.push(fail(
                        FailureKind::Timeout,
                        "the round's deadline passed before it started".into(),
                    ));
                    continue;
                }
                let Some(at) = self.nodes.iter().position(|n| n.id() == client) else {
                    outcome
                        .failures
                        .push(fail(FailureKind::Error, "no such client".into()));
                    continue;
                };
                match self.nodes[at].begin(task) {
                    Ok(working) => started.push((at, task, working)),
                    Err(e) => outcome.failures.push(client_error(client, &e)),
                }
            }
            let jobs = started
                .iter_mut()
                .map(|(at, task, working)| TrainJob {
                    data: self.nodes[*at].data(),
                    state: working,
                    task,
                })
                .collect();
            let results = self.trainer.train_together(self.cache, jobs)?;
            for ((at, task, working), result) in started.into_iter().zip(results) {
                let reply = result.and_then(|update| self.nodes[at].commit(task, working, update));
                match reply {
                    Ok(reply) => outcome.replies.push(reply),
                    Err(e) => outcome.failures.push(client_error(task.client(), &e)),
                }
            }
        }
        Ok(outcome)
    }
}

/// A client's failed round, logged.
fn client_error(client: ClientId, e: &crate::RuntimeError) -> ClientFailure {
    tracing::warn!(client = client.0, error = %e, "client failed its round");
    ClientFailure {
        client,
        kind: FailureKind::Error,
        message: e.to_string(),
    }
}
