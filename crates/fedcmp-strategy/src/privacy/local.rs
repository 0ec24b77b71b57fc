//! Local differential privacy (`[privacy] mode = "local"`): each site
//! clips and noises its own update before it leaves, so the server, the
//! other sites and every later reader see only noised updates. The server
//! is not trusted; the price is one noise draw per site (the mean of `m`
//! noised updates carries `1/sqrt(m)` of the noise, where DP-FedAvg's
//! carries `1/m`).
//!
//! With clipping norm `C` and noise multiplier `z`, a site that trained
//! from the global `w` to `w_k` sends
//!
//! ```text
//! Delta_k  = w_k - w
//! w_k'     = w + Delta_k min(1, C / ||Delta_k||) + N(0, z^2 C^2 I)
//! ```
//!
//! Two of a site's possible clipped updates differ by at most `2 C` (its
//! whole data replaced: the neighbouring relation of client-level local
//! DP), so each release is the Gaussian mechanism with multiplier `z / 2`
//! (sensitivity `2 C`, noise `z C`). A site's releases compose without
//! amplification (it knows when it takes part, and the server sees it):
//! after `t` releases its epsilon at `delta` is the accountant's for `t`
//! steps at sampling rate 1 and multiplier `z / 2`. A target epsilon sets
//! `z` for a site that trains in every one of the planned rounds, and a
//! site refuses a round that would take it past the target
//! ([`LocalDp::check_budget`]).
//!
//! What still leaves a site in the clear: its sample count, local steps
//! and learning-rate sum (metadata fixed by its shard size and the
//! schedule, not by what its images and captions say). Its training loss
//! is withheld (sent as 0). SCAFFOLD is refused: its control variate is a
//! second, unnoised function of the data.
//!
//! The noise of round `r` comes from a stream seeded by a secret the site
//! draws from the operating system once and keeps in its own state: a
//! task delivered again (a retry, a resumed server) gets the same release,
//! so a retry never spends privacy twice, and the run's seed (which the
//! server knows) does not reveal it.
//!
//! On the server, [`LocalDpLedger`] wraps any other strategy, counts each
//! site's releases it received and reports the largest epsilon per round
//! (`dp_epsilon`, with `dp_noise_std`, the noise per value of one update).

use std::collections::BTreeMap;

use fedcmp_core::metrics::names;
use fedcmp_core::{ClientId, ClientInstruction, ClientUpdate, ParamSet};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::config::{epsilon_after, DpMode, PrivacyConfig};
use crate::config::StrategyConfig;
use crate::validate::positive;
use crate::{ops, Aggregate, Result, Strategy, StrategyError, StrategyState};

/// A site's clipped update moves by at most this many `C` when its data
/// is replaced.
pub const SENSITIVITY: f64 = 2.0;

/// Local DP, resolved: the noise multiplier known, and the budget if any.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalDp {
    pub clip_norm: f64,
    /// `z`: the noise's standard deviation per value, in units of `C`.
    pub noise_multiplier: f64,
    pub delta: f64,
    /// A release whose epsilon would exceed this is refused.
    pub budget: Option<f64>,
}

impl PrivacyConfig {
    /// Local DP for a run of `rounds` rounds (a target epsilon needs them:
    /// it is kept by a site that trains in all of them).
    pub fn resolve_local(&self, rounds: Option<u64>) -> Result<LocalDp> {
        if self.mode != DpMode::Local {
            return Err(StrategyError::Config {
                field: "mode".to_string(),
                reason: "central DP is applied by the server's wrapper, not by the sites"
                    .to_string(),
            });
        }
        Ok(LocalDp {
            clip_norm: self.clip_norm,
            noise_multiplier: self.noise_multiplier_for(1.0, rounds, SENSITIVITY)?,
            delta: self.delta,
            budget: self.target_epsilon,
        })
    }
}

/// What a site sends under local DP.
#[derive(Debug, Clone, PartialEq)]
pub struct Release {
    /// `w + clipped delta + noise`.
    pub params: ParamSet,
    /// The update's norm before clipping.
    pub norm: f64,
    /// Whether it was shortened to `C`.
    pub clipped: bool,
}

impl LocalDp {
    /// Epsilon at `delta` of a site after `releases` releases.
    pub fn epsilon(&self, releases: u64) -> Result<f64> {
        epsilon_after(
            1.0,
            self.noise_multiplier / SENSITIVITY,
            self.delta,
            releases,
        )
    }

    /// The noise's standard deviation per value of one update.
    pub fn noise_std(&self) -> f64 {
        self.noise_multiplier * self.clip_norm
    }

    /// Refuses round `round` when one more release after `released`
    /// would take the site past its target epsilon.
    pub fn check_budget(&self, round: u64, released: u64) -> Result<()> {
        let Some(budget) = self.budget else {
            return Ok(());
        };
        let epsilon = self.epsilon(released + 1)?;
        if epsilon > budget * (1.0 + 1e-9) {
            return Err(StrategyError::RoundRefused {
                round,
                reason: format!(
                    "this site's privacy budget is spent: a release {} would bring its epsilon \
                     to {epsilon:.4} (target {budget}) at delta {}",
                    released + 1,
                    self.delta
                ),
            });
        }
        Ok(())
    }

    /// The release of a site that trained from `global` to `trained` in
    /// `round`, its noise drawn from `secret`'s stream for that round.
    pub fn privatize(
        &self,
        global: &ParamSet,
        trained: &ParamSet,
        secret: u64,
        round: u64,
    ) -> Result<Release> {
        positive("clip-norm", self.clip_norm)?;
        positive("noise-multiplier", self.noise_multiplier)?;
        let start = ops::flatten(global);
        let mut delta = ops::delta(&start, trained)?;
        let norm = ops::norm(&delta);
        let clipped = norm > self.clip_norm;
        if clipped {
            ops::scale(self.clip_norm / norm, &mut delta);
        }
        let std = self.noise_std();
        let mut rng = ChaCha8Rng::seed_from_u64(secret ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for (d, w) in delta.iter_mut().zip(&start) {
            *d = w + *d + std * ops::standard_normal(&mut rng);
        }
        Ok(Release {
            params: ops::unflatten(global, &delta)?,
            norm,
            clipped,
        })
    }
}

/// The server's side of local DP: `inner` aggregates the noised updates
/// as they come; the ledger counts each site's releases and reports the
/// largest epsilon.
#[derive(Debug)]
pub struct LocalDpLedger {
    inner: Box<dyn Strategy>,
    dp: LocalDp,
    releases: BTreeMap<ClientId, u64>,
}

const RELEASES_PREFIX: &str = "dp_releases_";

impl LocalDpLedger {
    /// The largest epsilon any site has spent, as far as the server saw.
    pub fn epsilon(&self) -> Result<f64> {
        self.dp
            .epsilon(self.releases.values().copied().max().unwrap_or(0))
    }
}

impl Strategy for LocalDpLedger {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn configure_round(&self, round: u64, clients: &[ClientId]) -> Vec<ClientInstruction> {
        self.inner.configure_round(round, clients)
    }

    fn aggregate(
        &mut self,
        round: u64,
        global: &ParamSet,
        updates: &[ClientUpdate],
    ) -> Result<Aggregate> {
        let mut aggregate = self.inner.aggregate(round, global, updates)?;
        for u in updates {
            *self.releases.entry(u.client).or_default() += 1;
        }
        aggregate.metrics.set(names::DP_EPSILON, self.epsilon()?);
        aggregate
            .metrics
            .set(names::DP_NOISE_STD, self.dp.noise_std());
        Ok(aggregate)
    }

    fn state(&self) -> StrategyState {
        let mut state = self.inner.state();
        for (client, n) in &self.releases {
            state
                .scalars
                .insert(format!("{RELEASES_PREFIX}{}", client.0), *n as f64);
        }
        state
    }

    fn load_state(&mut self, mut state: StrategyState) -> Result<()> {
        let keys: Vec<String> = state
            .scalars
            .keys()
            .filter(|k| k.starts_with(RELEASES_PREFIX))
            .cloned()
            .collect();
        let mut releases = BTreeMap::new();
        for key in keys {
            let n = state.take_scalar(&key).unwrap_or(f64::NAN);
            let id = key[RELEASES_PREFIX.len()..].parse::<u32>().ok();
            match id {
                Some(id) if n >= 0.0 && n.fract() == 0.0 => {
                    releases.insert(ClientId(id), n as u64);
                }
                _ => {
                    return Err(StrategyError::State {
                        reason: format!("`{key}` must be a count of a client's releases, got {n}"),
                    })
                }
            }
        }
        self.inner.load_state(state)?;
        self.releases = releases;
        Ok(())
    }
}

/// `base` for a federation of `clients` whose sites apply `dp`: the same
/// strategy behind a [`LocalDpLedger`]; refuses SCAFFOLD (its control
/// variate would leave the site unnoised).
pub fn locally_private(
    base: &StrategyConfig,
    dp: LocalDp,
    clients: usize,
) -> Result<Box<dyn Strategy>> {
    positive("clip-norm", dp.clip_norm)?;
    positive("noise-multiplier", dp.noise_multiplier)?;
    if let StrategyConfig::Scaffold(_) = base {
        return Err(StrategyError::Config {
            field: "privacy".to_string(),
            reason: "local DP does not compose with `scaffold`: its control variate is a \
                     second function of a site's data that would leave the site unnoised"
                .to_string(),
        });
    }
    Ok(Box::new(LocalDpLedger {
        inner: base.build(clients)?,
        dp,
        releases: BTreeMap::new(),
    }))
}
