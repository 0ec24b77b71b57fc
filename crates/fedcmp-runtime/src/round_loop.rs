//! The round loop, the server's side of a federation: sample clients from
//! those that report data left, send each a self-contained round task
//! through a [`Transport`], aggregate what came back with the strategy
//! (the global model passed explicitly), evaluate, record, checkpoint. It
//! never trains, renders or knows whether its clients are simulated.
//!
//! Failures never end a run. A round aggregates when at least `quorum`
//! updates came back by the deadline; below that it is recorded and the
//! global model stays as it was. A client that fails `failure_limit`
//! rounds in a row (errors, timeouts and refused updates, not simulated
//! dropouts) is retired, so a broken site cannot keep a one-pass run from
//! ending; a site that reconnects (a transport reports it as joined) is
//! taken back.
//!
//! What the server knows of its clients comes from them: the status each
//! reports (samples left, samples consumed) when the loop starts and with
//! every reply.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedcmp_core::{
    ClientFailure, ClientId, ClientReply, ClientStatus, FailureKind, ParamSet, RoundMetrics,
    RoundTask, WarmupCosine,
};
use fedcmp_strategy::{Strategy, StrategyError};
use rand::seq::IndexedRandom;
use serde::Serialize;

use crate::simulation::RoundRng;
use crate::transport::Transport;
use crate::{Result, RuntimeError};

/// Round-loop settings (checked by [`RoundLoopConfig::validate`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RoundLoopConfig {
    /// Stop after this many rounds even if data remains.
    pub max_rounds: u64,
    /// Clients sampled per round; all active ones when None (see also
    /// `fraction`).
    pub clients_per_round: Option<usize>,
    /// Sample this fraction of the active clients instead (rounded up).
    pub fraction: Option<f64>,
    /// Sample at least this many (when that many are active).
    pub min_clients: usize,
    /// Evaluate the global model every this many rounds (and after the last).
    pub eval_every: u64,
    /// The learning-rate schedule over the planned sample budget.
    pub schedule: WarmupCosine,
    /// Updates a round needs to be aggregated.
    pub quorum: usize,
    /// How long a round waits for its clients (None: as long as they take).
    pub deadline: Option<Duration>,
    /// Consecutive failed rounds after which a client is retired.
    pub failure_limit: u32,
    /// The clients withhold their training loss (local DP): the round's
    /// `train_loss` is then NaN rather than a mean of placeholders.
    pub losses_withheld: bool,
}

impl RoundLoopConfig {
    /// Checks ranges once, so the loop can trust them.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(RuntimeError::Config(m));
        if self.max_rounds == 0 {
            return bad("max rounds must be positive".into());
        }
        if self.clients_per_round == Some(0) {
            return bad("clients per round must be positive".into());
        }
        if let Some(f) = self.fraction {
            if !(f > 0.0 && f <= 1.0) {
                return bad(format!("fraction {f} must be in (0, 1]"));
            }
        }
        if self.eval_every == 0 {
            return bad("eval-every must be positive".into());
        }
        if self.quorum == 0 {
            return bad("the quorum must be at least one update".into());
        }
        if self.failure_limit == 0 {
            return bad("the client failure limit must be positive".into());
        }
        Ok(())
    }
}

/// What happened in one round (one line of a run's metrics JSONL).
#[derive(Debug, Clone, Serialize)]
pub struct RoundRecord {
    pub round: u64,
    pub sampled: Vec<u32>,
    /// Clients that failed the round (dropped, erred, timed out), and how.
    pub failures: Vec<ClientFailure>,
    /// Clients told to stop early this round (simulated stragglers).
    pub stragglers: Vec<u32>,
    /// Clients whose update came back.
    pub answered: Vec<u32>,
    /// Clients retired this round after too many failures in a row.
    pub retired: Vec<u32>,
    /// Whether the updates reached the quorum and were aggregated.
    pub aggregated: bool,
    /// Why the strategy refused to aggregate this round's updates (e.g.
    /// Krum with too few of them): the global model stays as it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Records of their data the answering sites skipped (a site's whole
    /// count, by client id; sites only).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub skipped: BTreeMap<u32, u64>,
    /// Samples consumed in this round and in the whole run so far.
    pub samples: u64,
    pub samples_total: u64,
    /// Learning rate of the schedule once this round's samples are consumed.
    pub lr_end: f64,
    /// Sample-weighted mean of the clients' training losses.
    pub train_loss: f64,
    /// Validation caption NLL per token of the new global model, when
    /// evaluated this round.
    pub val_loss: Option<f64>,
    pub seconds: f64,
    pub metrics: RoundMetrics,
}

impl RoundRecord {
    /// Failures of one kind this round.
    pub fn failed(&self, kind: fedcmp_core::FailureKind) -> usize {
        self.failures.iter().filter(|f| f.kind == kind).count()
    }
}

/// Where the loop starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// Round 0 with these initial parameters.
    Fresh(ParamSet),
    /// After the rounds recorded in a checkpoint.
    Resume(RoundLoopState),
}

/// Why the loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum StopReason {
    /// Every client consumed its shard (one pass done) or was retired.
    DataExhausted,
    MaxRounds,
}

/// The loop's result.
#[derive(Debug, Clone)]
pub struct LoopSummary {
    pub rounds: u64,
    pub samples_total: u64,
    pub stop: StopReason,
    pub final_params: ParamSet,
    pub final_val_loss: Option<f64>,
    /// Samples each client consumed, as it reported at the end (to check
    /// the one-pass promise).
    pub consumed: Vec<(ClientId, u64)>,
    /// Clients retired after too many failures.
    pub retired: Vec<ClientId>,
}

/// Computes a validation loss for a global model (None: this server has
/// no validation data, e.g. a server across sites without a split of its
/// own).
pub type Evaluate<'a> = dyn FnMut(&ParamSet) -> Result<Option<f64>> + 'a;

/// What the server remembers of a client besides its reported status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientRecord {
    /// Rounds failed in a row (errors and timeouts).
    pub failures_in_a_row: u32,
    pub retired: bool,
}

/// The loop's own state between rounds: with the strategy's state it is
/// everything the server needs to resume (clients resume their own).
#[derive(Debug, Clone, PartialEq)]
pub struct RoundLoopState {
    /// Rounds completed.
    pub round: u64,
    pub samples_total: u64,
    /// Position of the federation's random stream (ChaCha8 word position).
    pub rng_word_pos: u128,
    pub global: ParamSet,
    pub last_val: Option<f64>,
    /// Clients with failures or retired (the others have none).
    pub clients: BTreeMap<ClientId, ClientRecord>,
}

/// Saves a checkpoint of the loop's and the strategy's states (the
/// runtime's checkpoint module writes them to disk).
pub type SaveCheckpoint<'a> = dyn FnMut(&RoundLoopState, &dyn Strategy) -> Result<()> + 'a;

/// Called after every `every` rounds (and after the last) with everything
/// to save.
pub struct CheckpointHook<'a> {
    pub every: u64,
    pub save: &'a mut SaveCheckpoint<'a>,
}

impl std::fmt::Debug for CheckpointHook<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointHook")
            .field("every", &self.every)
            .finish()
    }
}

/// The clients as the server knows them.
#[derive(Debug, Default)]
struct ClientBook {
    left: BTreeMap<ClientId, u64>,
    records: BTreeMap<ClientId, ClientRecord>,
}

impl ClientBook {
    fn report(&mut self, status: &ClientStatus) {
        self.left.insert(status.client, status.samples_left);
    }

    /// Clients to sample from, in id order.
    fn active(&self) -> Vec<ClientId> {
        self.left
            .iter()
            .filter(|(c, left)| **left > 0 && !self.records.get(c).is_some_and(|r| r.retired))
            .map(|(c, _)| *c)
            .collect()
    }

    /// Books a round's successes and failures; returns newly retired clients.
    fn book_round(
        &mut self,
        answered: &[ClientId],
        failures: &[ClientFailure],
        limit: u32,
    ) -> Vec<ClientId> {
        for c in answered {
            if let Some(r) = self.records.get_mut(c) {
                r.failures_in_a_row = 0;
            }
        }
        let mut retired = Vec::new();
        // A refused second reply from a client that answered is the
        // transport's fault, not the client's.
        let against =
            |f: &&ClientFailure| f.counts_against_client() && !answered.contains(&f.client);
        for f in failures.iter().filter(against) {
            let r = self.records.entry(f.client).or_default();
            r.failures_in_a_row += 1;
            if r.failures_in_a_row >= limit && !r.retired {
                r.retired = true;
                retired.push(f.client);
            }
        }
        self.records
            .retain(|_, r| r.retired || r.failures_in_a_row > 0);
        retired
    }
}

/// Why an update cannot be aggregated, if it cannot: it must come from a
/// client sampled this round that has not answered already (a second reply
/// would count that client twice), have trained on samples, and match the
/// global model's names and shapes with finite values (its control
/// variate too). Checked for every transport, so a broken or hostile site
/// costs its own update, never the round.
pub fn update_refusal(
    reply: &ClientReply,
    global: &ParamSet,
    sampled: &[ClientId],
    answered: &BTreeSet<ClientId>,
) -> Option<String> {
    let client = reply.status.client;
    if !sampled.contains(&client) {
        return Some(format!("client {} was not sampled this round", client.0));
    }
    if answered.contains(&client) {
        return Some(format!("client {} already answered this round", client.0));
    }
    let update = reply.update.as_ref()?;
    if update.client != client {
        return Some(format!(
            "client {} sent an update of client {}",
            client.0, update.client.0
        ));
    }
    if update.num_samples == 0 {
        return Some("an update trained on no sample".into());
    }
    if !(update.lr_sum.is_finite() && update.mean_loss.is_finite()) {
        return Some("its learning-rate sum or loss is not finite".into());
    }
    let sets = std::iter::once(("parameters", &update.params)).chain(
        update
            .control_delta
            .as_ref()
            .map(|c| ("control variate", c)),
    );
    for (what, set) in sets {
        if let Err(e) = global.check_same_layout(set) {
            return Some(format!("its {what} do not match the global model: {e}"));
        }
        for (name, tensor) in set.entries() {
            if let Some(i) = tensor.data.iter().position(|v| !v.is_finite()) {
                return Some(format!(
                    "its {what}: `{name}` holds a non-finite value ({} at index {i})",
                    tensor.data[i]
                ));
            }
        }
    }
    None
}

/// Drives rounds until no client has data left or `max_rounds` is reached,
/// starting from `start` (a resumed start needs the strategy restored from
/// the same checkpoint; the clients restore themselves when asked for
/// their status as of its round). `rng` is the federation's random stream.
#[allow(clippy::too_many_arguments)]
pub fn drive(
    config: &RoundLoopConfig,
    rng: &RoundRng,
    strategy: &mut dyn Strategy,
    transport: &mut dyn Transport,
    start: Start,
    evaluate: &mut Evaluate<'_>,
    observe: &mut dyn FnMut(&RoundRecord),
    mut checkpoint: Option<CheckpointHook<'_>>,
) -> Result<LoopSummary> {
    config.validate()?;
    let mut book = ClientBook::default();
    let (global, mut samples_total, mut round, mut last_val, mut checkpointed) = match start {
        Start::Fresh(initial) => (initial, 0u64, 0u64, None, None),
        Start::Resume(state) => {
            rng.set_word_pos(state.rng_word_pos)?;
            book.records = state.clients;
            (
                state.global,
                state.samples_total,
                state.round,
                state.last_val,
                Some(state.round),
            )
        }
    };
    let mut global = Arc::new(global);
    for status in transport.status(round)? {
        book.report(&status);
    }
    let stop = loop {
        let active = book.active();
        if active.is_empty() {
            break StopReason::DataExhausted;
        }
        if round >= config.max_rounds {
            break StopReason::MaxRounds;
        }
        round += 1;
        let started = Instant::now();
        let wanted = match (config.clients_per_round, config.fraction) {
            (Some(k), _) => Some(k),
            (None, Some(f)) => Some((f * active.len() as f64).ceil() as usize),
            (None, None) => None,
        }
        .map(|k| k.max(config.min_clients));
        let sampled: Vec<ClientId> = match wanted {
            Some(k) if k < active.len() => {
                let mut chosen: Vec<ClientId> = active
                    .choose_multiple(&mut *rng.lock()?, k)
                    .copied()
                    .collect();
                chosen.sort_unstable();
                chosen
            }
            _ => active,
        };
        let tasks: Vec<RoundTask> = strategy
            .configure_round(round, &sampled)
            .into_iter()
            .map(|instruction| RoundTask {
                instruction,
                global: Arc::clone(&global),
                schedule: config.schedule,
                samples_before: samples_total,
                checkpointed_round: checkpointed,
            })
            .collect();
        let deadline = config.deadline.map(|d| started + d);
        let mut outcome = transport.run_round(tasks, deadline)?;
        for status in &outcome.joined {
            // A site that reconnects gets another chance, even if retired.
            if book.records.remove(&status.client).is_some() {
                tracing::info!(
                    client = status.client.0,
                    "client reconnected; its failures are forgiven"
                );
            }
            book.report(status);
        }
        let mut updates = Vec::with_capacity(outcome.replies.len());
        let mut replied = BTreeSet::new();
        let mut skipped = BTreeMap::new();
        for reply in outcome.replies {
            if let Some(reason) = update_refusal(&reply, &global, &sampled, &replied) {
                let client = reply.status.client;
                tracing::warn!(round, client = client.0, %reason, "update refused");
                outcome.failures.push(ClientFailure {
                    client,
                    kind: FailureKind::Refused,
                    message: reason,
                });
                continue;
            }
            replied.insert(reply.status.client);
            if reply.status.skipped > 0 {
                skipped.insert(reply.status.client.0, reply.status.skipped);
            }
            book.report(&reply.status);
            updates.extend(reply.update);
        }
        // Replies arrive in any order across sites; aggregating in client
        // order makes the sums, hence the run, independent of it.
        updates.sort_by_key(|u| u.client);
        let answered: Vec<ClientId> = updates.iter().map(|u| u.client).collect();
        let retired = book.book_round(&answered, &outcome.failures, config.failure_limit);
        for c in &retired {
            tracing::warn!(
                client = c.0,
                failures = config.failure_limit,
                "client retired after failing rounds in a row"
            );
        }
        let round_samples: u64 = updates.iter().map(|u| u.num_samples).sum();
        let train_loss = if round_samples > 0 && !config.losses_withheld {
            updates
                .iter()
                .map(|u| u.mean_loss * u.num_samples as f64)
                .sum::<f64>()
                / round_samples as f64
        } else {
            f64::NAN
        };
        let mut aggregated = !updates.is_empty() && updates.len() >= config.quorum;
        let mut metrics = RoundMetrics::default();
        let mut refused = None;
        if aggregated {
            match strategy.aggregate(round, &global, &updates) {
                Ok(aggregate) => {
                    global = Arc::new(aggregate.params);
                    metrics = aggregate.metrics;
                }
                // A rule that cannot use this round's updates (and keeps its
                // state as it was) costs the round, not the run.
                Err(StrategyError::RoundRefused { reason, .. }) => {
                    tracing::warn!(round, %reason, "the strategy refused the round: not aggregated");
                    aggregated = false;
                    refused = Some(reason);
                }
                Err(e) => return Err(e.into()),
            }
        } else if !updates.is_empty() {
            tracing::warn!(
                round,
                updates = updates.len(),
                quorum = config.quorum,
                "too few updates: the round is not aggregated"
            );
        }
        samples_total += round_samples;
        let exhausted = book.active().is_empty();
        let last = exhausted || round == config.max_rounds;
        let val_loss = if round.is_multiple_of(config.eval_every) || last {
            let v = evaluate(&global)?;
            if v.is_some() {
                last_val = v;
            }
            v
        } else {
            None
        };
        let record = RoundRecord {
            round,
            sampled: sampled.iter().map(|c| c.0).collect(),
            failures: outcome.failures,
            stragglers: outcome.stragglers.iter().map(|c| c.0).collect(),
            answered: answered.iter().map(|c| c.0).collect(),
            retired: retired.iter().map(|c| c.0).collect(),
            aggregated,
            refused,
            skipped,
            samples: round_samples,
            samples_total,
            lr_end: config.schedule.lr_at(samples_total as f64),
            train_loss,
            val_loss,
            seconds: started.elapsed().as_secs_f64(),
            metrics,
        };
        observe(&record);
        if let Some(hook) = checkpoint.as_mut() {
            if round.is_multiple_of(hook.every.max(1)) || last {
                let state = RoundLoopState {
                    round,
                    samples_total,
                    rng_word_pos: rng.word_pos()?,
                    global: ParamSet::clone(&global),
                    last_val,
                    clients: book.records.clone(),
                };
                (hook.save)(&state, &*strategy)?;
                checkpointed = Some(round);
            }
        }
    };
    let consumed = transport
        .status(round)?
        .iter()
        .map(|s| (s.client, s.consumed))
        .collect();
    Ok(LoopSummary {
        rounds: round,
        samples_total,
        stop,
        final_params: Arc::unwrap_or_clone(global),
        final_val_loss: last_val,
        consumed,
        retired: book
            .records
            .iter()
            .filter(|(_, r)| r.retired)
            .map(|(c, _)| *c)
            .collect(),
    })
}
