//! The round protocol between the server and a client, as plain data that
//! any transport can carry (in process, or serialised over the network).
//!
//! - The server sends one self-contained [`RoundTask`] per client and round:
//!   the typed instruction, the global parameters, the learning-rate
//!   schedule with its position, and the newest round the server has
//!   checkpointed. Nothing else is needed to train: a client process can
//!   start cold for every task.
//! - The client answers with a [`ClientReply`]: its [`ClientStatus`] (how
//!   many samples it has left, so the server never inspects client data)
//!   and its update, or none when nothing was left to train on.
//! - A client that does not answer usefully is a [`ClientFailure`]: the
//!   round goes on without it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::params::ParamSet;
use crate::schedule::WarmupCosine;
use crate::update::{ClientId, ClientInstruction, ClientUpdate};

/// Everything one client needs for one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundTask {
    /// The round, the client, its local objective and step budget.
    pub instruction: ClientInstruction,
    /// The global parameters every client of the round starts from.
    pub global: Arc<ParamSet>,
    /// The federation's learning-rate schedule ...
    pub schedule: WarmupCosine,
    /// ... read from this many samples consumed (the whole federation's
    /// count when the round began: one global clock).
    pub samples_before: u64,
    /// The newest round whose server checkpoint is durable: a client may
    /// forget every saved state of its own older than its newest one at or
    /// before this round (a resumed server never goes back further).
    pub checkpointed_round: Option<u64>,
}

impl RoundTask {
    /// The round this task belongs to.
    pub fn round(&self) -> u64 {
        self.instruction.round
    }

    /// The client it is addressed to.
    pub fn client(&self) -> ClientId {
        self.instruction.client
    }
}

/// What a client has, as of some round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientStatus {
    pub client: ClientId,
    /// Samples it will still train on (0: it retires).
    pub samples_left: u64,
    /// Samples it has trained on so far (one pass: its whole shard).
    pub consumed: u64,
    /// Records of a site's data it skipped (malformed lines, missing or
    /// corrupt images), so the server can report them per site; 0 in a
    /// simulation, which reports its own.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A client's answer to a round task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientReply {
    /// The client's status after the round.
    pub status: ClientStatus,
    /// Its update; None when it had nothing left to train on.
    pub update: Option<ClientUpdate>,
}

/// Why a client contributed nothing to a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// Unavailable this round (simulated dropouts): not held against it.
    Dropped,
    /// It answered with an error.
    Error,
    /// No answer before the round's deadline.
    Timeout,
    /// The server refused its update: names or shapes unlike the global
    /// model's, values that are not finite, no samples, or a client or
    /// round it was not asked for.
    Refused,
}

/// A client that failed a round, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFailure {
    pub client: ClientId,
    pub kind: FailureKind,
    pub message: String,
}

impl ClientFailure {
    /// True for failures that count towards retiring a client (errors and
    /// timeouts; a simulated dropout is the client's normal absence).
    pub fn counts_against_client(&self) -> bool {
        !matches!(self.kind, FailureKind::Dropped)
    }
}
