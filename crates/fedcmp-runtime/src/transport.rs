//! How round tasks reach clients and their replies come back. The round
//! loop talks only to [`Transport`]: simulation uses [`InProcess`] (wrapped
//! in [`crate::simulation::Simulated`] for dropouts and stragglers), a
//! deployment carries the same tasks over the network to the same
//! [`ClientNode`] code.

use std::time::Instant;

use fedcmp_core::{ClientFailure, ClientId, ClientReply, ClientStatus, FailureKind, RoundTask};
use fedcmp_data::cache::FeatureCache;

use crate::client::LocalTrainer;
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

/// Every client in this process, trained one after another by one shared
/// trainer (the frozen backbones are loaded once).
#[derive(Debug)]
pub struct InProcess<'a> {
    trainer: LocalTrainer,
    cache: &'a FeatureCache,
    nodes: Vec<ClientNode>,
}

impl<'a> InProcess<'a> {
    /// Clients `nodes`, trained by `trainer` on features from `cache`.
    pub fn new(trainer: LocalTrainer, cache: &'a FeatureCache, nodes: Vec<ClientNode>) -> Self {
        Self {
            trainer,
            cache,
            nodes,
        }
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

    /// Clients train in task order; once the deadline has passed, the
    /// clients not yet started time out (a sequential simulation cannot
    /// interrupt one that has started).
    fn run_round(
        &mut self,
        tasks: Vec<RoundTask>,
        deadline: Option<Instant>,
    ) -> Result<RoundOutcome> {
        let mut outcome = RoundOutcome::default();
        for task in &tasks {
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
            let Some(node) = self.nodes.iter_mut().find(|n| n.id() == client) else {
                outcome
                    .failures
                    .push(fail(FailureKind::Error, "no such client".into()));
                continue;
            };
            match node.handle(&mut self.trainer, self.cache, task) {
                Ok(reply) => outcome.replies.push(reply),
                Err(e) => {
                    tracing::warn!(client = client.0, error = %e, "client failed its round");
                    outcome
                        .failures
                        .push(fail(FailureKind::Error, e.to_string()));
                }
            }
        }
        Ok(outcome)
    }
}
