//! Named numbers a round reports (losses, norms, diagnostics), kept in a
//! sorted map so the JSONL stream and tables are stable across runs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Scalars and per-client series from one round.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundMetrics {
    pub scalars: BTreeMap<String, f64>,
    pub series: BTreeMap<String, Vec<f64>>,
}

impl RoundMetrics {
    /// Records a scalar (replacing one of the same name).
    pub fn set(&mut self, name: impl Into<String>, value: f64) {
        self.scalars.insert(name.into(), value);
    }

    /// Records a series (e.g. one value per client or per direction).
    pub fn set_series(&mut self, name: impl Into<String>, values: Vec<f64>) {
        self.series.insert(name.into(), values);
    }

    /// Adds another set, prefixing its names (e.g. `server.`).
    pub fn merge_prefixed(&mut self, prefix: &str, other: RoundMetrics) {
        for (k, v) in other.scalars {
            self.scalars.insert(format!("{prefix}{k}"), v);
        }
        for (k, v) in other.series {
            self.series.insert(format!("{prefix}{k}"), v);
        }
    }
}

/// The names under which strategies record their diagnostics, shared by
/// the strategy crate (which writes them) and every reader (reports,
/// plots, tests), so a renamed metric cannot silently vanish from a table.
pub mod names {
    // Every round (fedcmp_strategy::round).
    /// Clients aggregated.
    pub const CLIENTS: &str = "clients";
    /// Samples aggregated.
    pub const SAMPLES: &str = "samples";
    /// Sample-weighted mean client loss.
    pub const LOSS: &str = "loss";
    /// `||sum_k p_k Delta_k||`.
    pub const MEAN_DELTA_NORM: &str = "mean_delta_norm";
    /// Plain mean of `||Delta_k||`.
    pub const CLIENT_DELTA_NORM_MEAN: &str = "client_delta_norm_mean";
    /// Mean and minimum pairwise cosine of client deltas.
    pub const COSINE_MEAN: &str = "cosine_mean";
    pub const COSINE_MIN: &str = "cosine_min";
    /// Series, in client-id order.
    pub const CLIENT_IDS: &str = "client_ids";
    pub const CLIENT_WEIGHTS: &str = "client_weights";
    pub const CLIENT_DELTA_NORMS: &str = "client_delta_norms";
    /// Row-major K x K.
    pub const COSINE_MATRIX: &str = "cosine_matrix";

    // Composed strategies (fedcmp_strategy::compose).
    /// The aggregator's pseudo-gradient norm.
    pub const AGGREGATE_NORM: &str = "aggregate_norm";
    /// `||theta_{t+1} - theta_t||` after rounding to f32.
    pub const SERVER_STEP_NORM: &str = "server_step_norm";
    /// Server momentum (FedAvgM, adaptive optimisers, OPM).
    pub const MOMENTUM_NORM: &str = "momentum_norm";

    // Algorithm-specific.
    /// SCAFFOLD's server control variate norm.
    pub const CONTROL_NORM: &str = "control_norm";
    /// FedNova's effective number of steps.
    pub const TAU_EFF: &str = "tau_eff";
    /// TIES: entries kept per tensor and the share of sign conflicts.
    pub const TIES_KEPT: &str = "ties_kept";
    pub const TIES_SIGN_CONFLICT_FRACTION: &str = "ties_sign_conflict_fraction";
    /// CRA: rank and energy kept per matrix (series).
    pub const CRA_RANK: &str = "cra_rank";
    pub const CRA_ENERGY_KEPT: &str = "cra_energy_kept";
    /// CRA: mean and minimum direction confidence rho.
    pub const CRA_RHO_MEAN: &str = "cra_rho_mean";
    pub const CRA_RHO_MIN: &str = "cra_rho_min";
    /// CRA: each client's alignment e_k with the kept subspace (series).
    pub const CRA_CLIENT_ALIGNMENT: &str = "cra_client_alignment";
    /// CRA: the cross-client share of the merged energy in the kept
    /// directions (1 = identical clients, ~0 = independent).
    pub const CRA_SHARED_SHARE: &str = "cra_shared_share";
    /// CRA v2 shrinkage gain: energy-weighted mean, and quantiles (min,
    /// 10%, 25%, median, 75%, 90%, max) over the kept directions.
    pub const CRA_GAIN_MEAN: &str = "cra_gain_mean";
    pub const CRA_GAIN_QUANTILES: &str = "cra_gain_quantiles";
    /// CRA basis momentum: per matrix, 1 - cosine between the round's Gram
    /// and the averaged Gram before it.
    pub const CRA_BASIS_DRIFT: &str = "cra_basis_drift";
    /// OPM: share of momentum energy the basis change dropped.
    pub const OPM_DROPPED_FRACTION: &str = "opm_dropped_fraction";
    /// Robust rules: values trimmed per end (trimmed mean), the client ids
    /// selected (Krum, series), the norm bound and the deltas it shortened
    /// (norm bounding).
    pub const ROBUST_TRIMMED: &str = "robust_trimmed";
    pub const ROBUST_SELECTED: &str = "robust_selected";
    pub const ROBUST_BOUND: &str = "robust_bound";
    pub const ROBUST_CLIPPED: &str = "robust_clipped";
    /// Differential privacy: epsilon spent so far (at the configured
    /// delta), updates clipped this round, and the noise's standard
    /// deviation per value of the aggregate.
    pub const DP_EPSILON: &str = "dp_epsilon";
    pub const DP_CLIPPED: &str = "dp_clipped";
    pub const DP_NOISE_STD: &str = "dp_noise_std";
    /// The clipping norm used this round (it moves under adaptive
    /// clipping).
    pub const DP_CLIP_NORM: &str = "dp_clip_norm";
}
