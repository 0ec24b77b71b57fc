//! Faulty and hostile clients, simulated as a wrapper around any
//! [`Transport`] (like dropouts): some clients train honestly, then send
//! something else in place of their update. The round loop and the
//! strategies cannot tell; a robust rule has to.
//!
//! With `theta_t` the global model a hostile client received and `theta_k`
//! what it trained, it sends `theta_t + a(theta_k - theta_t)` where `a` is
//! the attack:
//!
//! - `sign-flip`: `a(Delta) = -Delta` (its update, reversed);
//! - `scaled`: `a(Delta) = factor * Delta` (default -10: reversed and
//!   boosted; a positive factor is a boosting attack);
//! - `random`: `a(Delta) = N(0, std^2 I)`, independent of its data
//!   (Blanchard et al. 2017's Gaussian attack; default std 0.1 per value);
//! - `stale`: the update it computed the previous time it trained, on
//!   the current model (`theta_t + Delta_prev`), as a site whose replies
//!   arrive a round late; the first time it trains it has none and sends
//!   its update. The wrapper keeps each stale client's last update (in
//!   memory, and with a folder also on disk, one file per round, so a
//!   resumed run sends what the uninterrupted one sent).
//!
//! Its sample and step counts are left as they were. Which clients are
//! hostile is fixed for the run: `clients = [..]` by id, or `count = n`
//! drawn once from the run's seed (a seeded shuffle of the federation's
//! ids). The random values come from their own stream per (seed, round,
//! client), never from the federation's [`crate::simulation::RoundRng`]:
//! a run with attackers samples the same clients, dropouts and batches
//! as the same run without them (paired comparisons), and a resumed run
//! sends the same values.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use fedcmp_core::{ClientId, ClientStatus, ParamSet, RoundTask};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::convert::{read_params_file, save_params_file};
use crate::transport::{RoundOutcome, Transport};
use crate::{Result, RuntimeError};

/// What a hostile client sends instead of its update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackKind {
    SignFlip,
    Scaled,
    Random,
    Stale,
}

/// An attack as configured (`attack = { kind = "sign-flip", count = 2 }`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AttackConfig {
    pub kind: AttackKind,
    /// This many hostile clients, drawn from the run's seed ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    /// ... or these client ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<Vec<u32>>,
    /// `scaled`: the factor on the update (default -10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// `random`: the standard deviation per value (default 0.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub std: Option<f64>,
}

/// The default factor of `scaled`.
pub const DEFAULT_FACTOR: f64 = -10.0;
/// The default standard deviation of `random`.
pub const DEFAULT_STD: f64 = 0.1;

/// A validated attack on a known federation.
#[derive(Debug, Clone, PartialEq)]
pub struct Attack {
    /// The hostile clients.
    pub clients: BTreeSet<ClientId>,
    pub kind: AttackKind,
    /// `scaled`'s factor (-1 for `sign-flip`).
    pub factor: f64,
    /// `random`'s standard deviation.
    pub std: f64,
    /// The run's seed (the random attack's streams).
    pub seed: u64,
}

fn invalid(reason: String) -> RuntimeError {
    RuntimeError::Config(format!("attack: {reason}"))
}

impl AttackConfig {
    /// The attack of one real site on itself (a site configured to
    /// misbehave, across sites): `count` and `clients` do not apply.
    pub fn for_site(&self, client: ClientId, seed: u64) -> Result<Attack> {
        if self.count.is_some() || self.clients.is_some() {
            return Err(invalid(
                "a misbehaving site attacks as itself: leave out `count` and `clients`".into(),
            ));
        }
        if self.kind == AttackKind::Stale {
            return Err(invalid(
                "`stale` is simulated only (it needs the federation's past rounds); a site can \
                 misbehave as sign-flip, scaled or random"
                    .into(),
            ));
        }
        let (factor, std) = self.strength()?;
        Ok(Attack {
            clients: BTreeSet::from([client]),
            kind: self.kind,
            factor,
            std,
            seed,
        })
    }

    /// `scaled`'s factor and `random`'s standard deviation, checked.
    fn strength(&self) -> Result<(f64, f64)> {
        let factor = match (self.kind, self.factor) {
            (AttackKind::Scaled, f) => f.unwrap_or(DEFAULT_FACTOR),
            (_, Some(_)) => {
                return Err(invalid("`factor` applies to kind = \"scaled\" only".into()))
            }
            (AttackKind::SignFlip, None) => -1.0,
            (AttackKind::Random | AttackKind::Stale, None) => 0.0,
        };
        let std = match (self.kind, self.std) {
            (AttackKind::Random, s) => s.unwrap_or(DEFAULT_STD),
            (_, Some(_)) => return Err(invalid("`std` applies to kind = \"random\" only".into())),
            (_, None) => 0.0,
        };
        if !factor.is_finite() {
            return Err(invalid(format!("`factor` must be finite, got {factor}")));
        }
        if !(std.is_finite() && std >= 0.0) && self.kind == AttackKind::Random {
            return Err(invalid(format!("`std` must be >= 0, got {std}")));
        }
        Ok((factor, std))
    }

    /// Checks the configuration against the federation's client ids and
    /// picks the hostile clients.
    pub fn resolve(&self, federation: &[ClientId], seed: u64) -> Result<Attack> {
        let clients: BTreeSet<ClientId> = match (self.count, &self.clients) {
            (Some(_), Some(_)) => {
                return Err(invalid("give `count` or `clients`, not both".into()))
            }
            (None, None) => return Err(invalid(
                "say which clients attack: `count = n` (drawn from the seed) or `clients = [ids]`"
                    .into(),
            )),
            (Some(n), None) => {
                if n == 0 || n >= federation.len() {
                    return Err(invalid(format!(
                        "`count` must be in 1..{} (the federation has {} clients), got {n}",
                        federation.len(),
                        federation.len()
                    )));
                }
                let mut ids = federation.to_vec();
                ids.sort_unstable();
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xbad5_17e5_0000_0001);
                ids.shuffle(&mut rng);
                ids.into_iter().take(n).collect()
            }
            (None, Some(list)) => {
                let chosen: BTreeSet<ClientId> = list.iter().map(|&id| ClientId(id)).collect();
                if let Some(unknown) = chosen.iter().find(|c| !federation.contains(c)) {
                    return Err(invalid(format!(
                        "`clients` names client {} but the federation's ids are 0..{}",
                        unknown.0,
                        federation.len()
                    )));
                }
                if chosen.is_empty() || chosen.len() >= federation.len() {
                    return Err(invalid(format!(
                        "`clients` must name 1 to {} clients, got {}",
                        federation.len().saturating_sub(1),
                        chosen.len()
                    )));
                }
                chosen
            }
        };
        let (factor, std) = self.strength()?;
        Ok(Attack {
            clients,
            kind: self.kind,
            factor,
            std,
            seed,
        })
    }
}

impl Attack {
    /// What hostile `client` sends in `round` in place of `trained`, having
    /// received `global`.
    pub fn corrupt(
        &self,
        round: u64,
        client: ClientId,
        global: &ParamSet,
        trained: &ParamSet,
    ) -> Result<ParamSet> {
        let mut out = trained.clone();
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.seed
                ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ^ u64::from(client.0).rotate_left(32),
        );
        if trained.check_same_layout(global).is_err() {
            return Err(invalid(format!(
                "client {}'s update does not match the global model",
                client.0
            )));
        }
        for (sent, (_, start)) in out.tensors_mut().zip(global.entries()) {
            for (x, &g) in sent.data.iter_mut().zip(&start.data) {
                let delta = f64::from(*x) - f64::from(g);
                let corrupted = match self.kind {
                    AttackKind::SignFlip | AttackKind::Scaled => self.factor * delta,
                    AttackKind::Random => {
                        self.std * fedcmp_strategy::ops::standard_normal(&mut rng)
                    }
                    // Needs the client's past: `Hostile` does it.
                    AttackKind::Stale => delta,
                };
                *x = (f64::from(g) + corrupted) as f32;
            }
        }
        Ok(out)
    }
}

/// A transport some of whose clients send corrupted updates.
#[derive(Debug)]
pub struct Hostile<T> {
    inner: T,
    attack: Attack,
    /// `stale`: each stale client's honest updates by round.
    past: BTreeMap<ClientId, BTreeMap<u64, ParamSet>>,
    /// `stale`: where those updates are kept across a resume.
    past_dir: Option<PathBuf>,
}

impl<T: Transport> Hostile<T> {
    pub fn new(inner: T, attack: Attack) -> Self {
        Self {
            inner,
            attack,
            past: BTreeMap::new(),
            past_dir: None,
        }
    }

    /// Keeps the stale clients' past updates in `dir` too (a run folder's),
    /// so that a resumed run sends what the uninterrupted run sent.
    pub fn with_folder(mut self, dir: PathBuf) -> Self {
        self.past_dir = Some(dir);
        self
    }

    fn past_file(dir: &Path, client: ClientId, round: u64) -> PathBuf {
        dir.join(format!(
            "client-{:04}-round-{round:06}.safetensors",
            client.0
        ))
    }

    /// The newest honest update of `client` from before `round`.
    fn past_update(
        &self,
        client: ClientId,
        round: u64,
        like: &ParamSet,
    ) -> Result<Option<ParamSet>> {
        if let Some((_, delta)) = self
            .past
            .get(&client)
            .and_then(|by_round| by_round.range(..round).next_back())
        {
            return Ok(Some(delta.clone()));
        }
        let Some(dir) = &self.past_dir else {
            return Ok(None);
        };
        let prefix = format!("client-{:04}-round-", client.0);
        let mut newest: Option<u64> = None;
        if dir.exists() {
            for entry in std::fs::read_dir(dir).map_err(crate::io(dir))?.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(r) = name
                    .strip_prefix(&prefix)
                    .and_then(|n| n.strip_suffix(".safetensors"))
                    .and_then(|n| n.parse::<u64>().ok())
                    .filter(|r| *r < round)
                {
                    newest = Some(newest.map_or(r, |n| n.max(r)));
                }
            }
        }
        newest
            .map(|r| read_params_file(&Self::past_file(dir, client, r), like))
            .transpose()
    }

    /// What stale `client` sends in `round`: its update from the previous
    /// time it trained, on `global`; and it remembers this round's.
    fn stale(
        &mut self,
        client: ClientId,
        round: u64,
        global: &ParamSet,
        trained: &ParamSet,
    ) -> Result<ParamSet> {
        let mut delta = trained.clone();
        for (d, (_, g)) in delta.tensors_mut().zip(global.entries()) {
            for (x, &w) in d.data.iter_mut().zip(&g.data) {
                *x = (f64::from(*x) - f64::from(w)) as f32;
            }
        }
        let previous = self.past_update(client, round, global)?;
        if let Some(dir) = &self.past_dir {
            std::fs::create_dir_all(dir).map_err(crate::io(dir))?;
            save_params_file(&delta, &Self::past_file(dir, client, round))?;
        }
        self.past.entry(client).or_default().insert(round, delta);
        let Some(previous) = previous else {
            return Ok(trained.clone());
        };
        let mut sent = global.clone();
        for (x, (_, d)) in sent.tensors_mut().zip(previous.entries()) {
            for (w, &dv) in x.data.iter_mut().zip(&d.data) {
                *w = (f64::from(*w) + f64::from(dv)) as f32;
            }
        }
        Ok(sent)
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &T {
        &self.inner
    }
}

impl<T: Transport> Transport for Hostile<T> {
    fn status(&mut self, round: u64) -> Result<Vec<ClientStatus>> {
        self.inner.status(round)
    }

    fn run_round(
        &mut self,
        tasks: Vec<RoundTask>,
        deadline: Option<Instant>,
    ) -> Result<RoundOutcome> {
        let received: Vec<(ClientId, u64, Arc<ParamSet>)> = tasks
            .iter()
            .filter(|t| self.attack.clients.contains(&t.client()))
            .map(|t| (t.client(), t.round(), Arc::clone(&t.global)))
            .collect();
        let mut outcome = self.inner.run_round(tasks, deadline)?;
        for reply in &mut outcome.replies {
            let Some(update) = reply.update.as_mut() else {
                continue;
            };
            if let Some((client, round, global)) =
                received.iter().find(|(c, _, _)| *c == update.client)
            {
                update.params = match self.attack.kind {
                    AttackKind::Stale => self.stale(*client, *round, global, &update.params)?,
                    _ => self
                        .attack
                        .corrupt(*round, *client, global, &update.params)?,
                };
            }
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedcmp_core::ParamTensor;

    fn set(values: &[f32]) -> ParamSet {
        let t = ParamTensor::new("w", vec![values.len()], values.to_vec());
        ParamSet::new(vec![("w".to_string(), t.unwrap_or_else(|e| panic!("{e}")))])
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn config(kind: AttackKind) -> AttackConfig {
        AttackConfig {
            kind,
            count: Some(2),
            clients: None,
            factor: None,
            std: None,
        }
    }

    fn ids(n: u32) -> Vec<ClientId> {
        (0..n).map(ClientId).collect()
    }

    #[test]
    fn hostile_clients_are_drawn_once_from_the_seed_or_named() -> Result<()> {
        let a = config(AttackKind::SignFlip).resolve(&ids(8), 7)?;
        assert_eq!(a.clients.len(), 2);
        assert_eq!(a, config(AttackKind::SignFlip).resolve(&ids(8), 7)?);
        let seeds: BTreeSet<Vec<ClientId>> = (0..20)
            .map(|s| config(AttackKind::SignFlip).resolve(&ids(8), s))
            .map(|r| r.map(|a| a.clients.into_iter().collect()))
            .collect::<Result<_>>()?;
        assert!(seeds.len() > 1, "every seed chose the same clients");
        let named = AttackConfig {
            count: None,
            clients: Some(vec![3, 0]),
            ..config(AttackKind::Random)
        }
        .resolve(&ids(8), 7)?;
        assert_eq!(named.clients, [ClientId(0), ClientId(3)].into());
        assert_eq!(named.std, DEFAULT_STD);
        Ok(())
    }

    #[test]
    fn bad_attacks_are_refused_with_the_field() {
        let cases = [
            (
                AttackConfig {
                    count: Some(0),
                    ..config(AttackKind::SignFlip)
                },
                "`count`",
            ),
            (
                AttackConfig {
                    count: Some(8),
                    ..config(AttackKind::SignFlip)
                },
                "`count`",
            ),
            (
                AttackConfig {
                    count: None,
                    ..config(AttackKind::SignFlip)
                },
                "`count = n`",
            ),
            (
                AttackConfig {
                    clients: Some(vec![1]),
                    ..config(AttackKind::SignFlip)
                },
                "not both",
            ),
            (
                AttackConfig {
                    count: None,
                    clients: Some(vec![9]),
                    ..config(AttackKind::Scaled)
                },
                "client 9",
            ),
            (
                AttackConfig {
                    factor: Some(2.0),
                    ..config(AttackKind::SignFlip)
                },
                "`factor`",
            ),
            (
                AttackConfig {
                    std: Some(1.0),
                    ..config(AttackKind::Scaled)
                },
                "`std`",
            ),
            (
                AttackConfig {
                    std: Some(-1.0),
                    ..config(AttackKind::Random)
                },
                "`std`",
            ),
        ];
        for (bad, needle) in cases {
            let err = bad
                .resolve(&ids(8), 0)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
    }

    #[test]
    fn updates_are_corrupted_as_defined() -> Result<()> {
        let global = set(&[0.5, -1.0, 2.0, 0.0]);
        let trained = set(&[0.75, -1.5, 2.0, 0.125]);
        let client = ClientId(1);
        let flip = config(AttackKind::SignFlip).resolve(&ids(4), 3)?;
        let sent = flip.corrupt(2, client, &global, &trained)?;
        assert_eq!(sent.entries()[0].1.data, vec![0.25, -0.5, 2.0, -0.125]);
        let scaled = AttackConfig {
            factor: Some(4.0),
            ..config(AttackKind::Scaled)
        }
        .resolve(&ids(4), 3)?;
        let sent = scaled.corrupt(2, client, &global, &trained)?;
        assert_eq!(sent.entries()[0].1.data, vec![1.5, -3.0, 2.0, 0.5]);
        assert_eq!(
            config(AttackKind::Scaled).resolve(&ids(4), 3)?.factor,
            DEFAULT_FACTOR
        );
        // Random: N(0, std^2) around the global, whatever was trained; the
        // same values for the same (seed, round, client), others otherwise.
        let n = 20_000;
        let big_global = set(&vec![1.0; n]);
        let random = AttackConfig {
            std: Some(0.5),
            ..config(AttackKind::Random)
        }
        .resolve(&ids(4), 3)?;
        let a = random.corrupt(5, client, &big_global, &big_global)?;
        let b = random.corrupt(5, client, &big_global, &set(&vec![9.0; n]))?;
        assert_eq!(a, b);
        assert_ne!(a, random.corrupt(6, client, &big_global, &big_global)?);
        assert_ne!(a, random.corrupt(5, ClientId(2), &big_global, &big_global)?);
        let d: Vec<f64> = a.entries()[0]
            .1
            .data
            .iter()
            .map(|&x| f64::from(x) - 1.0)
            .collect();
        let mean = d.iter().sum::<f64>() / n as f64;
        let sd = (d.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64).sqrt();
        assert!(
            mean.abs() < 0.02 && (sd - 0.5).abs() < 0.02,
            "mean {mean}, sd {sd}"
        );
        Ok(())
    }

    /// Client `k` moves every value by `(k + 1) * round / 8` (exact in f32).
    struct Honest;

    impl Transport for Honest {
        fn status(&mut self, _round: u64) -> Result<Vec<ClientStatus>> {
            Ok(Vec::new())
        }

        fn run_round(
            &mut self,
            tasks: Vec<RoundTask>,
            _deadline: Option<Instant>,
        ) -> Result<RoundOutcome> {
            let replies = tasks
                .iter()
                .map(|t| {
                    let step = (t.client().0 + 1) as f32 * t.round() as f32 / 8.0;
                    let moved: Vec<f32> = t.global.flat().map(|x| x + step).collect();
                    fedcmp_core::ClientReply {
                        status: ClientStatus {
                            client: t.client(),
                            samples_left: 1,
                            consumed: 1,
                            skipped: 0,
                        },
                        update: Some(fedcmp_core::ClientUpdate {
                            client: t.client(),
                            params: set(&moved),
                            num_samples: 1,
                            num_steps: 1,
                            lr_sum: 0.1,
                            mean_loss: 1.0,
                            control_delta: None,
                        }),
                    }
                })
                .collect();
            Ok(RoundOutcome {
                replies,
                failures: Vec::new(),
                stragglers: Vec::new(),
                joined: Vec::new(),
            })
        }
    }

    fn round_of(hostile: &mut Hostile<Honest>, round: u64, global: f32) -> Result<Vec<f32>> {
        let tasks = (0..2)
            .map(|k| RoundTask {
                instruction: fedcmp_core::ClientInstruction {
                    round,
                    client: ClientId(k),
                    objective: fedcmp_core::LocalObjective::Plain,
                    max_local_steps: None,
                },
                global: Arc::new(set(&[global, global])),
                schedule: fedcmp_core::WarmupCosine {
                    peak_lr: 0.1,
                    total_samples: 10,
                    warmup_ratio: 0.0,
                },
                samples_before: 0,
                checkpointed_round: None,
            })
            .collect();
        let outcome = hostile.run_round(tasks, None)?;
        Ok(outcome
            .replies
            .iter()
            .map(|r| {
                r.update
                    .as_ref()
                    .map_or(f32::NAN, |u| u.params.entries()[0].1.data[0])
            })
            .collect())
    }

    #[test]
    fn a_stale_client_sends_its_previous_update_and_resumes_it() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| invalid(e.to_string()))?;
        let stale = AttackConfig {
            count: None,
            clients: Some(vec![1]),
            ..config(AttackKind::Stale)
        }
        .resolve(&ids(2), 0)?;
        let mut hostile = Hostile::new(Honest, stale.clone()).with_folder(dir.path().into());
        // Round 1: nothing earlier, its own update (client 1 moves 2/8).
        assert_eq!(round_of(&mut hostile, 1, 1.0)?, vec![1.125, 1.25]);
        // Round 2 on another global: round 1's update (+0.25), not its own
        // (+0.5); the honest client is untouched.
        assert_eq!(round_of(&mut hostile, 2, 3.0)?, vec![3.25, 3.25]);
        // A wrapper started again (a resumed run) reads round 2's update.
        let mut resumed = Hostile::new(Honest, stale.clone()).with_folder(dir.path().into());
        assert_eq!(round_of(&mut resumed, 3, 0.0)?, vec![0.375, 0.5]);
        // Without the folder it would have nothing to send but its own.
        let mut forgetful = Hostile::new(Honest, stale);
        assert_eq!(round_of(&mut forgetful, 3, 0.0)?, vec![0.375, 0.75]);
        // A site cannot be stale: it has no past rounds to replay.
        let err = AttackConfig {
            count: None,
            ..config(AttackKind::Stale)
        }
        .for_site(ClientId(0), 0)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("simulated only"), "{err}");
        Ok(())
    }
}
