//! What a client is told each round and what it sends back.
//!
//! The instruction is typed: a proximal term or SCAFFOLD's control variate
//! is a variant, never a string-keyed option, so a client cannot silently
//! ignore what an algorithm needs (a Flower pitfall).

use serde::{Deserialize, Serialize};

use crate::params::ParamSet;

/// A client's stable id (its index in the scenario).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClientId(pub u32);

/// The local objective a client minimises this round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LocalObjective {
    /// The caption loss alone (FedAvg and most server-side methods).
    Plain,
    /// FedProx: loss + (mu / 2) ||theta - theta_global||^2.
    Proximal { mu: f64 },
    /// SCAFFOLD: every local gradient is corrected by (c - c_i); `server`
    /// is c, the client keeps its own c_i.
    Scaffold { server_control: ParamSet },
}

/// One round's instruction to one client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientInstruction {
    pub round: u64,
    pub client: ClientId,
    pub objective: LocalObjective,
    /// A straggler's budget: at most this many local steps this round
    /// (None = the client's configured number).
    #[serde(default)]
    pub max_local_steps: Option<u32>,
}

/// A client's answer after local training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientUpdate {
    pub client: ClientId,
    /// The client's parameters after local training.
    pub params: ParamSet,
    /// Samples consumed this round (the aggregation weight n_k).
    pub num_samples: u64,
    /// Local optimiser steps taken (FedNova's tau_k).
    pub num_steps: u64,
    /// Sum of the learning rates of those steps (SCAFFOLD option II divides
    /// the model change by it).
    pub lr_sum: f64,
    /// Mean training loss over the round's steps.
    pub mean_loss: f64,
    /// SCAFFOLD: the change of the client's control variate, c_i+ - c_i.
    pub control_delta: Option<ParamSet>,
}
