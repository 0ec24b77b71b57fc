//! Strategies by composition: a strategy is three parts, each with its own
//! explicit state.
//!
//! 1. [`ClientProtocol`]: what each client is told (its typed
//!    [`LocalObjective`]) and any state that follows from what clients send
//!    back besides their parameters (SCAFFOLD's control variate);
//! 2. [`Aggregator`]: the round's deltas -> one aggregated update (a weighted
//!    mean, FedNova's normalised mean, a TIES merge, ...);
//! 3. [`ServerOptimizer`]: the aggregated update (a pseudo-gradient) -> the
//!    next global model (SGD with a server learning rate, heavy-ball
//!    momentum, Adagrad/Adam/Yogi).
//!
//! [`Composed`] wires them into a [`Strategy`]. The aggregated update's type
//! is the aggregator's choice (`Aggregator::Output`): the baselines produce
//! a flat f64 vector, and a structured update (e.g. Fed-CMP's canonical
//! basis and coefficients) can be consumed by an optimiser written for it
//! (`ServerOptimizer<CanonicalUpdate>`, e.g. orthogonal momentum) without
//! changing anything here.
//!
//! A round is transactional: the parts are updated on copies, and the
//! strategy's state changes only when the whole round succeeded.

use fedcmp_core::metrics::names;
use std::fmt;

use fedcmp_core::{
    ClientId, ClientInstruction, ClientUpdate, LocalObjective, ParamSet, RoundMetrics,
};

use crate::round::RoundInput;
use crate::{ops, Aggregate, Result, Strategy, StrategyError, StrategyState};

/// What clients are told, and the client-side state the server tracks.
pub trait ClientProtocol: fmt::Debug + Clone + Send + 'static {
    /// The local objective for `client` in `round`.
    fn objective(&self, round: u64, client: ClientId) -> LocalObjective;

    /// Updates protocol state from the round's updates (before aggregation).
    fn observe(&mut self, _input: &RoundInput<'_>, _metrics: &mut RoundMetrics) -> Result<()> {
        Ok(())
    }

    /// Writes this part's state.
    fn save(&self, _state: &mut StrategyState) {}

    /// Replaces this part's state, taking its own keys out of `state`.
    fn load(&mut self, _state: &mut StrategyState) -> Result<()> {
        Ok(())
    }
}

/// A round's aggregated update, whatever its structure.
pub trait PseudoGradient {
    /// Euclidean norm (reported as `aggregate_norm`).
    fn norm(&self) -> f64;
}

/// The baselines' aggregated update: flat f64 values in the global model's
/// layout order.
impl PseudoGradient for Vec<f64> {
    fn norm(&self) -> f64 {
        ops::norm(self)
    }
}

/// Turns a round's deltas into one aggregated update.
pub trait Aggregator: fmt::Debug + Clone + Send + 'static {
    type Output: PseudoGradient;

    /// Combines the validated, sorted input.
    fn combine(
        &mut self,
        input: &RoundInput<'_>,
        metrics: &mut RoundMetrics,
    ) -> Result<Self::Output>;

    /// Writes this part's state.
    fn save(&self, _state: &mut StrategyState) {}

    /// Replaces this part's state, taking its own keys out of `state`.
    fn load(&mut self, _state: &mut StrategyState) -> Result<()> {
        Ok(())
    }
}

/// Applies an aggregated update `G` to the global model.
pub trait ServerOptimizer<G>: fmt::Debug + Clone + Send + 'static {
    /// The next global model, flat f64 in the layout of `input.global`.
    fn step(
        &mut self,
        input: &RoundInput<'_>,
        update: &G,
        metrics: &mut RoundMetrics,
    ) -> Result<Vec<f64>>;

    /// Writes this part's state.
    fn save(&self, _state: &mut StrategyState) {}

    /// Replaces this part's state, taking its own keys out of `state`.
    fn load(&mut self, _state: &mut StrategyState) -> Result<()> {
        Ok(())
    }
}

/// Plain local training: the caption loss alone.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Plain;

impl ClientProtocol for Plain {
    fn objective(&self, _round: u64, _client: ClientId) -> LocalObjective {
        LocalObjective::Plain
    }
}

/// A strategy made of a client protocol, an aggregator and a server
/// optimiser.
#[derive(Debug, Clone)]
pub struct Composed<P, A, O> {
    name: &'static str,
    protocol: P,
    aggregator: A,
    optimizer: O,
    step: u64,
}

impl<P, A, O> Composed<P, A, O> {
    /// Wires the parts; `name` is the config name, checked on load.
    pub fn new(name: &'static str, protocol: P, aggregator: A, optimizer: O) -> Self {
        Self {
            name,
            protocol,
            aggregator,
            optimizer,
            step: 0,
        }
    }

    pub fn protocol(&self) -> &P {
        &self.protocol
    }

    pub fn aggregator(&self) -> &A {
        &self.aggregator
    }

    pub fn optimizer(&self) -> &O {
        &self.optimizer
    }

    /// Aggregations performed so far.
    pub fn step(&self) -> u64 {
        self.step
    }
}

impl<P, A, O> Strategy for Composed<P, A, O>
where
    P: ClientProtocol,
    A: Aggregator,
    O: ServerOptimizer<A::Output>,
{
    fn name(&self) -> &str {
        self.name
    }

    fn configure_round(&self, round: u64, clients: &[ClientId]) -> Vec<ClientInstruction> {
        clients
            .iter()
            .map(|&client| ClientInstruction {
                round,
                client,
                objective: self.protocol.objective(round, client),
                max_local_steps: None,
            })
            .collect()
    }

    fn aggregate(
        &mut self,
        round: u64,
        global: &ParamSet,
        updates: &[ClientUpdate],
    ) -> Result<Aggregate> {
        let input = RoundInput::new(round, global, updates)?;
        let mut metrics = input.metrics()?;
        let mut protocol = self.protocol.clone();
        let mut aggregator = self.aggregator.clone();
        let mut optimizer = self.optimizer.clone();

        protocol.observe(&input, &mut metrics)?;
        let update = aggregator.combine(&input, &mut metrics)?;
        metrics.set(names::AGGREGATE_NORM, update.norm());
        let next = optimizer.step(&input, &update, &mut metrics)?;
        let params = ops::unflatten(global, &next)?;
        if let Some(parameter) = ops::first_non_finite(&params) {
            return Err(StrategyError::NonFiniteResult {
                parameter: parameter.to_string(),
            });
        }
        let step = ops::sub(&ops::flatten(&params), &input.global_flat)?;
        metrics.set(names::SERVER_STEP_NORM, ops::norm(&step));

        self.protocol = protocol;
        self.aggregator = aggregator;
        self.optimizer = optimizer;
        self.step += 1;
        Ok(Aggregate { params, metrics })
    }

    fn state(&self) -> StrategyState {
        let mut state = StrategyState::new(self.name, self.step);
        self.protocol.save(&mut state);
        self.aggregator.save(&mut state);
        self.optimizer.save(&mut state);
        state
    }

    fn load_state(&mut self, mut state: StrategyState) -> Result<()> {
        if state.algorithm != self.name {
            return Err(StrategyError::State {
                reason: format!(
                    "it was saved by `{}`, this strategy is `{}`",
                    state.algorithm, self.name
                ),
            });
        }
        let mut protocol = self.protocol.clone();
        let mut aggregator = self.aggregator.clone();
        let mut optimizer = self.optimizer.clone();
        protocol.load(&mut state)?;
        aggregator.load(&mut state)?;
        optimizer.load(&mut state)?;
        state.expect_consumed()?;
        self.protocol = protocol;
        self.aggregator = aggregator;
        self.optimizer = optimizer;
        self.step = state.step;
        Ok(())
    }
}

/// Checks that a loaded state tensor still fits the global model.
pub(crate) fn check_state_layout(key: &str, value: &ParamSet, global: &ParamSet) -> Result<()> {
    global
        .check_same_layout(value)
        .map_err(|detail| StrategyError::StateLayout {
            key: key.to_string(),
            detail,
        })
}

/// A state tensor in f64 (checked against the global model), or `fill`
/// everywhere when it was never initialised.
pub(crate) fn state_or(
    key: &str,
    value: Option<&ParamSet>,
    input: &RoundInput<'_>,
    fill: f64,
) -> Result<Vec<f64>> {
    match value {
        Some(v) => {
            check_state_layout(key, v, input.global)?;
            Ok(ops::flatten(v))
        }
        None => Ok(vec![fill; input.global_flat.len()]),
    }
}
