//! What only a simulation needs, as a wrapper around any [`Transport`]:
//! clients that drop out of a round (never reached) and stragglers (told to
//! stop after fewer local steps). The round loop never branches on them;
//! a deployment runs the same loop without the wrapper.
//!
//! Draws come from the federation's one random stream ([`RoundRng`]), right
//! after the round loop has sampled the round's clients: one dropout draw
//! per task, then one straggler draw per task that stays, whatever the
//! outcome. One stream means one position to checkpoint, and rounds
//! identical to those of the earlier loop that drew them itself.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use fedcmp_core::{ClientFailure, ClientStatus, FailureKind, RoundTask};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::transport::{RoundOutcome, Transport};
use crate::{Result, RuntimeError};

/// The federation's random stream (client sampling, simulated dropouts
/// and stragglers), shared by the round loop and the simulation wrapper.
#[derive(Debug, Clone)]
pub struct RoundRng(Arc<Mutex<ChaCha8Rng>>);

impl RoundRng {
    /// The stream of a run with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(
            seed ^ 0x5eed_c11e_47f0_0d01,
        ))))
    }

    /// Exclusive access to the generator.
    pub fn lock(&self) -> Result<MutexGuard<'_, ChaCha8Rng>> {
        self.0
            .lock()
            .map_err(|_| RuntimeError::Config("the round RNG was poisoned by a panic".into()))
    }

    /// The stream's position (for checkpoints).
    pub fn word_pos(&self) -> Result<u128> {
        Ok(self.lock()?.get_word_pos())
    }

    /// Moves the stream to a checkpointed position.
    pub fn set_word_pos(&self, position: u128) -> Result<()> {
        self.lock()?.set_word_pos(position);
        Ok(())
    }
}

/// How simulated clients misbehave.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Unreliability {
    /// Probability that a sampled client drops out of the round.
    pub dropout: f64,
    /// Probability that a client that stays is a straggler ...
    pub stragglers: f64,
    /// ... and completes only this many local steps (at least 1).
    pub straggler_steps: u32,
}

impl Unreliability {
    /// Every client answers in full.
    pub const NONE: Self = Self {
        dropout: 0.0,
        stragglers: 0.0,
        straggler_steps: 1,
    };

    /// Checks the probabilities once.
    pub fn validate(&self) -> Result<()> {
        for (name, p) in [("dropout", self.dropout), ("stragglers", self.stragglers)] {
            if !(0.0..1.0).contains(&p) {
                return Err(RuntimeError::Config(format!(
                    "{name} = {p} must be in [0, 1)"
                )));
            }
        }
        Ok(())
    }
}

/// A transport whose clients drop out and straggle at random.
#[derive(Debug)]
pub struct Simulated<T> {
    inner: T,
    rng: RoundRng,
    unreliability: Unreliability,
}

impl<T: Transport> Simulated<T> {
    /// Wraps `inner`, drawing from the federation's stream `rng`.
    pub fn new(inner: T, rng: RoundRng, unreliability: Unreliability) -> Result<Self> {
        unreliability.validate()?;
        Ok(Self {
            inner,
            rng,
            unreliability,
        })
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &T {
        &self.inner
    }
}

impl<T: Transport> Transport for Simulated<T> {
    fn status(&mut self, round: u64) -> Result<Vec<ClientStatus>> {
        self.inner.status(round)
    }

    fn run_round(
        &mut self,
        tasks: Vec<RoundTask>,
        deadline: Option<Instant>,
    ) -> Result<RoundOutcome> {
        let u = self.unreliability;
        let (mut kept, mut dropped, mut stragglers) = (Vec::new(), Vec::new(), Vec::new());
        {
            let mut rng = self.rng.lock()?;
            for task in tasks {
                if rng.random::<f64>() >= u.dropout {
                    kept.push(task);
                } else {
                    dropped.push(ClientFailure {
                        client: task.client(),
                        kind: FailureKind::Dropped,
                        message: "simulated dropout".into(),
                    });
                }
            }
            for task in &mut kept {
                if rng.random::<f64>() < u.stragglers {
                    task.instruction.max_local_steps = Some(u.straggler_steps.max(1));
                    stragglers.push(task.client());
                }
            }
        }
        let mut outcome = self.inner.run_round(kept, deadline)?;
        dropped.append(&mut outcome.failures);
        outcome.failures = dropped;
        outcome.stragglers.extend(stragglers);
        Ok(outcome)
    }
}
