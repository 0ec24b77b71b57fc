//! One round's validated input, shared by every strategy, and the
//! diagnostics every round reports.
//!
//! [`RoundInput::new`] checks the updates once (non-empty, one per client,
//! same layout as the global model, finite values, some samples), sorts
//! them by client id (so that nothing downstream depends on arrival order)
//! and computes each client's delta `Delta_k = theta_k - theta_t` in f64 and
//! its data weight `p_k = n_k / sum_j n_j`.
//!
//! Metrics (names as recorded in [`RoundMetrics`]):
//! - scalars `clients`, `samples`, `loss` (mean client loss weighted by
//!   `p_k`), `mean_delta_norm` (`||sum_k p_k Delta_k||`),
//!   `client_delta_norm_mean` (the plain mean of `||Delta_k||`),
//!   `cosine_mean` and `cosine_min` over client pairs (only with two or more
//!   clients);
//! - series, in client-id order: `client_ids`, `client_weights` (`p_k`),
//!   `client_delta_norms`, and `cosine_matrix` (row-major `K x K`).
//!
//! The strategy adds `aggregate_norm` (its pseudo-gradient) and
//! `server_step_norm` (`||theta_{t+1} - theta_t||` after rounding), plus any
//! algorithm-specific diagnostics.

use fedcmp_core::metrics::names;
use fedcmp_core::{ClientId, ClientUpdate, ParamSet, RoundMetrics};

use rayon::prelude::*;

use crate::{ops, Result, StrategyError};

/// A round's updates, validated and sorted by client id, with deltas.
#[derive(Debug)]
pub struct RoundInput<'a> {
    pub round: u64,
    /// The global model the clients started from.
    pub global: &'a ParamSet,
    /// `global` flattened to f64.
    pub global_flat: Vec<f64>,
    /// The updates, sorted by client id.
    pub updates: Vec<&'a ClientUpdate>,
    /// `theta_k - theta_t` per update (same order), flat, f64.
    pub deltas: Vec<Vec<f64>>,
    /// `n_k / sum_j n_j` per update (same order).
    pub sample_weights: Vec<f64>,
}

impl<'a> RoundInput<'a> {
    /// Validates `updates` against `global` and prepares the deltas.
    pub fn new(round: u64, global: &'a ParamSet, updates: &'a [ClientUpdate]) -> Result<Self> {
        if updates.is_empty() {
            return Err(StrategyError::NoUpdates { round });
        }
        if let Some(parameter) = ops::first_non_finite(global) {
            return Err(StrategyError::NonFiniteGlobal {
                parameter: parameter.to_string(),
            });
        }
        let mut sorted: Vec<&ClientUpdate> = updates.iter().collect();
        sorted.sort_by_key(|u| u.client);
        for pair in sorted.windows(2) {
            if pair[0].client == pair[1].client {
                return Err(StrategyError::DuplicateClient {
                    client: pair[0].client,
                });
            }
        }
        // Each client's checks are independent: in parallel, then the first
        // failure in client order is reported.
        sorted
            .par_iter()
            .map(|u| -> Result<()> {
                global.check_same_layout(&u.params).map_err(|detail| {
                    StrategyError::LayoutMismatch {
                        client: u.client,
                        detail,
                    }
                })?;
                if let Some(parameter) = ops::first_non_finite(&u.params) {
                    return Err(StrategyError::NonFinite {
                        client: u.client,
                        parameter: parameter.to_string(),
                    });
                }
                if !u.mean_loss.is_finite() {
                    return Err(StrategyError::NonFinite {
                        client: u.client,
                        parameter: "mean_loss".to_string(),
                    });
                }
                Ok(())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .collect::<Result<()>>()?;
        let counts: Vec<u64> = sorted.iter().map(|u| u.num_samples).collect();
        let sample_weights =
            ops::sample_weights(&counts).ok_or(StrategyError::NoSamples { round })?;
        let global_flat = ops::flatten(global);
        let deltas = sorted
            .par_iter()
            .map(|u| ops::delta(&global_flat, &u.params))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            round,
            global,
            global_flat,
            updates: sorted,
            deltas,
            sample_weights,
        })
    }

    /// Number of participating clients, `|S|`.
    pub fn len(&self) -> usize {
        self.updates.len()
    }

    /// Always false: a round input holds at least one update.
    pub fn is_empty(&self) -> bool {
        self.updates.is_empty()
    }

    /// Participating client ids, sorted.
    pub fn clients(&self) -> impl Iterator<Item = ClientId> + '_ {
        self.updates.iter().map(|u| u.client)
    }

    /// The diagnostics every round reports (see the module header).
    pub fn metrics(&self) -> Result<RoundMetrics> {
        let mut m = RoundMetrics::default();
        let k = self.len();
        m.set(names::CLIENTS, k as f64);
        m.set(
            names::SAMPLES,
            self.updates
                .iter()
                .map(|u| u.num_samples as f64)
                .sum::<f64>(),
        );
        let losses: Vec<f64> = self.updates.iter().map(|u| u.mean_loss).collect();
        m.set(
            names::LOSS,
            ops::weighted_mean(&losses, &self.sample_weights)?,
        );
        // One pass over the deltas: every norm and cosine comes from the
        // Gram matrix, ||sum_k p_k Delta_k||^2 = p^T G p.
        let gram = ops::gram(&self.deltas)?;
        let p = &self.sample_weights;
        let mut mean_sq = 0.0;
        for i in 0..k {
            for j in 0..k {
                mean_sq += p[i] * p[j] * gram[i * k + j];
            }
        }
        m.set(names::MEAN_DELTA_NORM, mean_sq.max(0.0).sqrt());
        let norms: Vec<f64> = (0..k).map(|i| gram[i * k + i].sqrt()).collect();
        m.set(
            names::CLIENT_DELTA_NORM_MEAN,
            norms.iter().sum::<f64>() / k as f64,
        );
        let cos = ops::cosine_from_gram(&gram, k);
        if k >= 2 {
            let pairs: Vec<f64> = (0..k)
                .flat_map(|i| (i + 1..k).map(move |j| (i, j)))
                .map(|(i, j)| cos[i * k + j])
                .collect();
            m.set(
                names::COSINE_MEAN,
                pairs.iter().sum::<f64>() / pairs.len() as f64,
            );
            m.set(
                names::COSINE_MIN,
                pairs.iter().copied().fold(f64::INFINITY, f64::min),
            );
        }
        m.set_series(
            names::CLIENT_IDS,
            self.clients().map(|c| f64::from(c.0)).collect(),
        );
        m.set_series(names::CLIENT_WEIGHTS, self.sample_weights.clone());
        m.set_series(names::CLIENT_DELTA_NORMS, norms);
        m.set_series(names::COSINE_MATRIX, cos);
        Ok(m)
    }
}
