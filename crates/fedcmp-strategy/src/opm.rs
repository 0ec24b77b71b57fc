//! Orthogonality-Preserved Momentum (OPM), ALGORITHMS.md §4, and Fed-CMP =
//! CRA + OPM.
//!
//! Server state per weight matrix: the momentum in canonical form `(U_m,
//! K_m)`, `M = U_m K_m`; per bias a plain momentum vector `v`. At round `t`,
//! with `U_t`, `C*_t` and the residual term from CRA:
//!
//! ```text
//! Ktilde = (U_t^T U_m) K_m            (transport: projection onto span U_t;
//!                                       0 before the first round)
//! K_t    = beta Ktilde + C*_t          store (U_t, K_t)
//! W     += eta_s (U_t K_t + lambda_res sum_k p_k E_k)
//!          (nesterov: U_t (beta K_t + C*_t) instead of U_t K_t)
//! v_t    = beta v_{t-1} + mean delta;  b += eta_s v_t
//!          (nesterov: eta_s (beta v_t + mean delta))
//! ```
//!
//! `momentum-form = "ema"` ([`MomentumForm::Ema`]): `K_t = beta Ktilde +
//! (1 - beta) C*_t`, `v_t = beta v_{t-1} + (1 - beta) mean delta`, and the
//! applied momentum is divided by `1 - beta^t` (`t` = accumulations so
//! far, state scalar `opm_momentum_count`); with full span and uniform
//! reliability it is FedAvgM's EMA form, as heavy ball is FedAvgM's.
//!
//! State keys: `opm_basis` (`U_m`, one `rows x r` tensor per matrix, named
//! like it), `opm_coeffs` (`K_m`, `r x cols`), `opm_bias_momentum` (one
//! vector per bias). Like every other strategy's state it is held in memory
//! as f32 tensors, exactly what is saved, so a save/load round trip is
//! bit-exact and a resumed run continues identically.
//!
//! Metrics: `momentum_norm` (`sqrt(sum ||K_t||_F^2 + sum ||v_t||^2)`, `U_t`
//! being orthonormal) and `opm_dropped_fraction` (`1 - sum ||Ktilde||^2 /
//! sum ||K_m||^2`: the share of the old matrix momentum's energy that the
//! transport dropped; 0 when there was none).

use fedcmp_core::metrics::names;
use fedcmp_core::{ParamSet, ParamTensor, RoundMetrics};
use serde::{Deserialize, Serialize};

use crate::compose::{Composed, Plain, ServerOptimizer};
use crate::cra::{CanonicalMerge, CanonicalUpdate, CraConfig};
use crate::dense::{mul_rowmajor, tmul_rowmajor};
use crate::round::RoundInput;
use crate::server_opt::MomentumForm;
use crate::validate::{positive, unit_interval};
use crate::{ops, Result, StrategyError, StrategyState};

const BASIS_KEY: &str = "opm_basis";
const COEFFS_KEY: &str = "opm_coeffs";
const BIAS_KEY: &str = "opm_bias_momentum";
const COUNT_KEY: &str = "opm_momentum_count";

/// Orthogonality-preserved momentum on CRA's canonical update.
#[derive(Debug, Clone, PartialEq)]
pub struct OrthogonalMomentum {
    pub lr: f64,
    pub beta: f64,
    pub nesterov: bool,
    pub form: MomentumForm,
    basis: Option<ParamSet>,
    coeffs: Option<ParamSet>,
    bias: Option<ParamSet>,
    /// Accumulations so far (read by the EMA form's bias correction).
    count: u64,
}

impl OrthogonalMomentum {
    pub fn new(lr: f64, beta: f64, nesterov: bool) -> Self {
        Self::with_form(lr, beta, nesterov, MomentumForm::HeavyBall)
    }

    pub fn with_form(lr: f64, beta: f64, nesterov: bool, form: MomentumForm) -> Self {
        Self {
            lr,
            beta,
            nesterov,
            form,
            basis: None,
            coeffs: None,
            bias: None,
            count: 0,
        }
    }

    /// The stored `(U_m, K_m)` per matrix and bias momenta (None before
    /// the first step).
    pub fn momentum(&self) -> (Option<&ParamSet>, Option<&ParamSet>, Option<&ParamSet>) {
        (
            self.basis.as_ref(),
            self.coeffs.as_ref(),
            self.bias.as_ref(),
        )
    }
}

fn to_f32(values: &[f64]) -> Vec<f32> {
    // Rounding to f32 is the state's representation (see the header).
    values.iter().map(|&x| x as f32).collect()
}

fn widen(t: &ParamTensor) -> Vec<f64> {
    t.data.iter().map(|&x| f64::from(x)).collect()
}

fn layout_error(key: &str, name: &str, detail: String) -> StrategyError {
    StrategyError::StateLayout {
        key: key.to_string(),
        detail: fedcmp_core::CoreError::Invalid(format!("`{name}`: {detail}")),
    }
}

impl ServerOptimizer<CanonicalUpdate> for OrthogonalMomentum {
    fn step(
        &mut self,
        input: &RoundInput<'_>,
        update: &CanonicalUpdate,
        metrics: &mut RoundMetrics,
    ) -> Result<Vec<f64>> {
        let mut next = input.global_flat.clone();
        let mut new_basis = Vec::new();
        let mut new_coeffs = Vec::new();
        let mut new_bias = Vec::new();
        let (mut old_energy, mut kept_energy, mut momentum_sq) = (0.0, 0.0, 0.0);
        let count = match self.form {
            MomentumForm::HeavyBall => 0,
            MomentumForm::Ema => self.count + 1,
        };
        let weight = self.form.update_weight(self.beta);
        let scale = self.form.step_scale(self.beta, count);
        for m in &update.matrices {
            let (rows, cols, r) = (m.rows, m.cols, m.rank);
            // Ktilde = (U_t^T U_m) K_m.
            let mut k_t = vec![0.0; r * cols];
            let old_u = self.basis.as_ref().and_then(|s| s.get(&m.name));
            let old_k = self.coeffs.as_ref().and_then(|s| s.get(&m.name));
            if let (Some(u_m), Some(k_m)) = (old_u, old_k) {
                let (Some((ur, rm)), Some((kr, kc))) = (u_m.matrix_dims(), k_m.matrix_dims())
                else {
                    return Err(layout_error(BASIS_KEY, &m.name, "not a matrix".into()));
                };
                if ur != rows || kr != rm || kc != cols {
                    return Err(layout_error(
                        BASIS_KEY,
                        &m.name,
                        format!("({ur} x {rm}, {kr} x {kc}) does not fit {rows} x {cols}"),
                    ));
                }
                let (u_m, k_m) = (widen(u_m), widen(k_m));
                old_energy += k_m.iter().map(|x| x * x).sum::<f64>();
                let overlap = tmul_rowmajor(&m.basis, &u_m, rows, r, rm)?;
                let tilde = mul_rowmajor(&overlap, &k_m, r, rm, cols)?;
                kept_energy += tilde.iter().map(|x| x * x).sum::<f64>();
                k_t = tilde;
            }
            ops::scale(self.beta, &mut k_t);
            ops::axpy(weight, &m.coeffs, &mut k_t)?;
            let applied = if self.nesterov {
                let mut a = k_t.clone();
                ops::scale(self.beta, &mut a);
                ops::axpy(1.0, &m.coeffs, &mut a)?;
                a
            } else if scale != 1.0 {
                let mut a = k_t.clone();
                ops::scale(scale, &mut a);
                a
            } else {
                k_t.clone()
            };
            let mut step = mul_rowmajor(&m.basis, &applied, rows, r, cols)?;
            if let Some(res) = &m.residual {
                ops::axpy(1.0, res, &mut step)?;
            }
            let dst = next.get_mut(m.range.clone()).ok_or(StrategyError::Length {
                what: "canonical update",
                expected: input.global_flat.len(),
                got: m.range.end,
            })?;
            ops::axpy(self.lr, &step, dst)?;
            momentum_sq += k_t.iter().map(|x| x * x).sum::<f64>();
            new_basis.push((
                m.name.clone(),
                ParamTensor::new(&m.name, vec![rows, r], to_f32(&m.basis))?,
            ));
            new_coeffs.push((
                m.name.clone(),
                ParamTensor::new(&m.name, vec![r, cols], to_f32(&k_t))?,
            ));
        }
        for v in &update.vectors {
            let mut vel = match self.bias.as_ref().and_then(|s| s.get(&v.name)) {
                Some(t) if t.data.len() == v.mean.len() => widen(t),
                Some(t) => {
                    return Err(layout_error(
                        BIAS_KEY,
                        &v.name,
                        format!(
                            "{} values where {} were expected",
                            t.data.len(),
                            v.mean.len()
                        ),
                    ))
                }
                None => vec![0.0; v.mean.len()],
            };
            ops::scale(self.beta, &mut vel);
            ops::axpy(weight, &v.mean, &mut vel)?;
            let dst = next.get_mut(v.range.clone()).ok_or(StrategyError::Length {
                what: "canonical update",
                expected: input.global_flat.len(),
                got: v.range.end,
            })?;
            if self.nesterov {
                ops::axpy(self.lr * self.beta, &vel, dst)?;
                ops::axpy(self.lr, &v.mean, dst)?;
            } else {
                ops::axpy(self.lr * scale, &vel, dst)?;
            }
            momentum_sq += vel.iter().map(|x| x * x).sum::<f64>();
            new_bias.push((
                v.name.clone(),
                ParamTensor::new(&v.name, vec![vel.len()], to_f32(&vel))?,
            ));
        }
        metrics.set(names::MOMENTUM_NORM, momentum_sq.sqrt());
        metrics.set(
            names::OPM_DROPPED_FRACTION,
            if old_energy > 0.0 {
                (1.0 - kept_energy / old_energy).clamp(0.0, 1.0)
            } else {
                0.0
            },
        );
        self.basis = Some(ParamSet::new(new_basis)?);
        self.coeffs = Some(ParamSet::new(new_coeffs)?);
        self.bias = Some(ParamSet::new(new_bias)?);
        self.count = count;
        Ok(next)
    }

    fn save(&self, state: &mut StrategyState) {
        state.put_tensor(BASIS_KEY, self.basis.as_ref());
        state.put_tensor(COEFFS_KEY, self.coeffs.as_ref());
        state.put_tensor(BIAS_KEY, self.bias.as_ref());
        self.form.save_count(COUNT_KEY, self.count, state);
    }

    fn load(&mut self, state: &mut StrategyState) -> Result<()> {
        self.basis = state.take_tensor(BASIS_KEY);
        self.coeffs = state.take_tensor(COEFFS_KEY);
        self.bias = state.take_tensor(BIAS_KEY);
        let has_momentum = self.coeffs.is_some() || self.bias.is_some();
        self.count = self.form.load_count(COUNT_KEY, has_momentum, state)?;
        Ok(())
    }
}

/// The config name of Fed-CMP.
pub const FED_CMP: &str = "fed-cmp";
/// The config name of the OPM ablation (energy 1, tau infinite).
pub const OPM_ONLY: &str = "opm-only";

/// Fed-CMP's hyper-parameters: CRA's (flattened in) plus the momentum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct FedCmpConfig {
    #[serde(flatten)]
    pub cra: CraConfig,
    /// `beta` in [0, 1).
    pub beta: f64,
    /// Nesterov's look-ahead form (heavy ball only).
    pub nesterov: bool,
    /// `heavy-ball` (default) or `ema` (bias-corrected).
    #[serde(skip_serializing_if = "MomentumForm::is_heavy_ball")]
    pub momentum_form: MomentumForm,
}

impl Default for FedCmpConfig {
    fn default() -> Self {
        Self {
            cra: CraConfig::default(),
            beta: 0.9,
            nesterov: false,
            momentum_form: MomentumForm::HeavyBall,
        }
    }
}

impl FedCmpConfig {
    pub fn validate(&self) -> Result<()> {
        self.cra.validate()?;
        positive("server-lr", self.cra.server_lr)?;
        unit_interval("beta", self.beta)?;
        self.momentum_form.check_nesterov(self.nesterov)
    }
}

/// OPM's hyper-parameters: the momentum alone (CRA at energy 1, tau
/// infinite, gamma 0, i.e. FedAvgM).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct OpmOnlyConfig {
    /// `eta_s` > 0.
    pub server_lr: f64,
    /// `beta` in [0, 1).
    pub beta: f64,
    pub nesterov: bool,
    /// `heavy-ball` (default) or `ema` (bias-corrected).
    #[serde(skip_serializing_if = "MomentumForm::is_heavy_ball")]
    pub momentum_form: MomentumForm,
}

impl Default for OpmOnlyConfig {
    fn default() -> Self {
        Self {
            server_lr: 1.0,
            beta: 0.9,
            nesterov: false,
            momentum_form: MomentumForm::HeavyBall,
        }
    }
}

/// CRA + OPM.
pub type FedCmp = Composed<Plain, CanonicalMerge, OrthogonalMomentum>;

/// Builds Fed-CMP after validating `config`.
pub fn fed_cmp(config: &FedCmpConfig) -> Result<FedCmp> {
    build(FED_CMP, config)
}

/// Builds `opm-only`: Fed-CMP with energy 1, tau infinite, gamma 0.
pub fn opm_only(config: &OpmOnlyConfig) -> Result<FedCmp> {
    let full = FedCmpConfig {
        cra: CraConfig {
            energy: 1.0,
            max_rank: None,
            tau: f64::INFINITY,
            confidence_power: 0.0,
            residual_weight: 0.0,
            server_lr: config.server_lr,
            eigensolver: crate::cra::Eigensolver::Exact,
            // Whatever Fed-CMP's defaults become, opm-only stays FedAvgM.
            agreement: crate::cra::Agreement::Consensus,
            gain: crate::cra::Gain::None,
            basis_beta: 0.0,
        },
        beta: config.beta,
        nesterov: config.nesterov,
        momentum_form: config.momentum_form,
    };
    build(OPM_ONLY, &full)
}

fn build(name: &'static str, config: &FedCmpConfig) -> Result<FedCmp> {
    config.validate()?;
    Ok(Composed::new(
        name,
        Plain,
        CanonicalMerge::new(config.cra.params()),
        OrthogonalMomentum::with_form(
            config.cra.server_lr,
            config.beta,
            config.nesterov,
            config.momentum_form,
        ),
    ))
}
