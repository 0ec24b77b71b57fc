//! Canonical Reliability-Aware Aggregation (CRA), ALGORITHMS.md §3, and the
//! plain server step for its output (`cra-only`).
//!
//! For every weight MATRIX (2-D tensor, `d_out x d_in`) independently, with
//! data weights `p_k` and client deltas `Delta_k`:
//!
//! ```text
//! S      = [sqrt(p_1) Delta_1, ..., sqrt(p_K) Delta_K]     (d_out x K d_in)
//! U      = top-r left singular vectors of S                 (d_out x r)
//! C_k    = U^T Delta_k,   E_k = Delta_k - U C_k
//! cbar_j = sum_k p_k c_kj                  (c_kj = row j of C_k)
//! a_kj   = cos(c_kj, cbar_j)               (0 when either is 0)
//! alpha_kj = p_k exp(a_kj / tau) / sum_l p_l exp(a_lj / tau)   (tau = inf: p_k)
//! rho_j  = ||cbar_j|| / sum_k p_k ||c_kj||                      (in [0, 1])
//! c*_j   = rho_j^gamma sum_k alpha_kj c_kj
//! Delta* = U C* + lambda_res sum_k p_k E_k
//! ```
//!
//! Every other tensor (biases) gets the data-weighted mean delta
//! `sum_k p_k delta_k`.
//!
//! CRA v2 (§3.1) changes what "reliable" means, one knob per item, v1
//! being the defaults until the counterfactual harness chooses:
//!
//! ```text
//! agreement = "leave-one-out":  a_kj = cos(c_kj, sum_{l != k} p_l c_lj)
//! gain = "shrinkage":           r_j = sum_k p_k^2 ||c_kj||^2 / ||cbar_j||^2
//!                               g_j = clip((1 - r_j) / (1 - sum_k p_k^2), 0, 1)
//!                               c*_j = g_j rho_j^gamma sum_k alpha_kj c_kj
//! basis-beta > 0:               U from G_t = beta G_{t-1} + sum_k p_k Delta_k Delta_k^T
//! gain = "temporal":            g_kj = max(0, cos(c_kj, u_j^T Delta_k^prev))   (1 with no past)
//!                               c*_j = rho_j^gamma sum_k alpha_kj g_kj c_kj
//! ```
//!
//! The temporal gain (ALGORITHMS-NOTES.md §1) judges a client's direction
//! by its agreement with the same client's previous update, `Delta_k^prev`
//! (from the last round it took part in), rather than with the other
//! clients: a domain-specific direction that a client repeats is kept, one
//! that flips or appears once is shrunk. Under `c = s + noise` with
//! independent noise of equal size in both rounds, the cosine estimates
//! the Wiener factor `||s||^2 / (||s||^2 + sigma^2)`. The past deltas are
//! the aggregator's state (`cra_past_delta/<client id>`, one f32 set of
//! the weight matrices per client ever seen, held in memory as saved);
//! the direction's reported gain is `sum_k p_k g_kj ||c_kj||^2 / sum_k p_k
//! ||c_kj||^2`.
//!
//! Both v2 rules read the `K x K` Gram matrix of the direction's
//! coefficient rows, so that the cross-client term `sum_{k != l} p_k p_l
//! <c_kj, c_lj>` is a sum of exact products: a direction that one client
//! uses alone (the others exactly 0 there) gets gain exactly 0 and
//! agreement exactly 0, not a rounding residue. The averaged Gram `G_t` is
//! the aggregator's state (`cra_basis_gram`, one f32 `rows x rows` tensor
//! per matrix, named like it, held in memory as saved): the basis is then
//! always computed on the output side.
//!
//! The basis is computed from the smaller side of `S`, in f64: when
//! `d_out <= K d_in`, `U` = eigenvectors of `G = S S^T = sum_k p_k Delta_k
//! Delta_k^T` (accumulated client by client, lower triangle only, `S`
//! never formed); otherwise `V` = eigenvectors of `S^T S` and `U = S V
//! Sigma^{-1}`, re-orthonormalised (Gram-Schmidt, twice). `sigma_i^2` are the
//! eigenvalues (negative rounding clamped to 0), sorted descending.
//!
//! Rank: the smallest `r` with `sum_{i<=r} sigma_i^2 >= energy sum_i
//! sigma_i^2`, capped by `max_rank`, and never above the numerical rank.
//! Because the basis comes from a Gram matrix, whose eigenvalues carry an
//! absolute error of order `eps lambda_max`, the numerical rank (`energy =
//! 1`) counts `lambda_i > max(shape) eps lambda_max`, i.e. `sigma_i >
//! sqrt(max(shape) eps) sigma_max` (the Gram analogue of the SVD rule
//! `sigma_i > max(shape) eps sigma_max`); directions below it are noise of
//! the eigensolver, not of the data.
//!
//! Large output-side Gram matrices (dimension >= [`REFINED_MIN_DIM`], energy
//! < 1; the `eigensolver` knob) use the refined solver: an f32
//! eigendecomposition picks the wanted directions, one f64 subspace step
//! and a Rayleigh-Ritz projection make them f64-accurate, and the rank is
//! chosen from the f64 Ritz values against the exact `trace(G)` (Ritz
//! values are lower bounds, so the energy kept is at least `energy`).
//! Where the spectrum has a gap at the cut it matches the exact solver to
//! 1e-7 (tested); where the cut falls inside a cluster of near-equal
//! eigenvalues, the basis there is fixed by the data only up to the f32
//! rounding of the clients' parameters divided by the tiny gap, for any
//! solver, and the two differ accordingly (1.9e-4 relative on the
//! LLaVA-size benchmark, BENCHMARKS.md). It declines (exact solver) when
//! the wanted rank is most of the dimension.
//!
//! Determinism: products and the eigendecomposition run through
//! [`crate::dense`] (parallel, split into a fixed number of pieces, so the
//! bits do not depend on the thread count), directions are fused in
//! parallel but each one sequentially, clients arrive sorted by id, and
//! each basis vector's sign is fixed (its largest-magnitude component,
//! first on ties, is positive): the result depends neither on thread count
//! nor on arrival order.
//!
//! Metrics: series `cra_rank` and `cra_energy_kept` (one value per matrix,
//! in layout order), scalars `cra_rho_mean` / `cra_rho_min` (over all
//! kept directions of all matrices) and series `cra_client_alignment`
//! (`e_k = sum ||U C_k||_F^2 / sum ||Delta_k||_F^2` over the matrices, per
//! client in id order; 0 for a zero delta). Interference diagnostics:
//! `cra_shared_share`, the cross-client share of the merged (FedAvg)
//! energy in the kept directions, `sum_j cross_j / ((1 - sum_k p_k^2)
//! sum_j ||cbar_j||^2)` (1 for identical clients, ~0 for independent ones,
//! negative when they cancel); with the shrinkage gain, `cra_gain_mean`
//! (`sum_j g_j ||cbar_j||^2 / sum_j ||cbar_j||^2`) and the series
//! `cra_gain_quantiles` (min, 10%, 25%, median, 75%, 90%, max over all
//! kept directions); with basis momentum, the series `cra_basis_drift`
//! per matrix, `1 - <P_t, G_{t-1}>_F / (||P_t||_F ||G_{t-1}||_F)` between
//! the round's Gram `P_t` and the averaged one before it (0 = the same
//! directions and spectrum shape, 1 = orthogonal).

use fedcmp_core::metrics::names;
use std::collections::BTreeMap;
use std::ops::Range;

use faer::Mat;
use fedcmp_core::{ClientId, ParamSet, ParamTensor, RoundMetrics};
use rayon::prelude::*;

use serde::{Deserialize, Serialize};

use crate::compose::{Aggregator, Composed, Plain, PseudoGradient, ServerOptimizer};
use crate::round::RoundInput;
use crate::validate::{check, non_negative, positive, unit_interval};
use crate::{dense, ops, Result, StrategyError, StrategyState};

/// Which side of `S` the basis is computed from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BasisSide {
    /// The smaller one (`d_out <= K d_in`: output side).
    #[default]
    Auto,
    /// Eigenvectors of `S S^T` (`d_out x d_out`).
    Output,
    /// Eigenvectors of `S^T S` (`K d_in x K d_in`), mapped back.
    Stacked,
}

/// How the top eigenvectors of the output-side Gram matrix are computed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Eigensolver {
    /// `Refined` for Gram matrices of dimension >= [`REFINED_MIN_DIM`] when
    /// `energy < 1`, `Exact` otherwise.
    #[default]
    Auto,
    /// The full f64 eigendecomposition.
    Exact,
    /// f32 eigendecomposition, then one f64 subspace-iteration step and
    /// Rayleigh-Ritz on the wanted directions (see
    /// [`dense::refined_top_eigen`]); the rank is chosen from the f64 Ritz
    /// values against the exact total energy `trace(G)`. Falls back to
    /// `Exact` when `energy = 1` (the numerical rank needs the whole exact
    /// spectrum) or when the wanted rank is most of the dimension.
    Refined,
}

/// The Gram dimension from which `Eigensolver::Auto` refines.
pub const REFINED_MIN_DIM: usize = 1024;

/// What a client's coefficient row is compared with (§3 step 4, §3.1 item 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Agreement {
    /// v1: the consensus `cbar_j`, which includes the client itself.
    #[default]
    Consensus,
    /// v2: the other clients' weighted sum `sum_{l != k} p_l c_lj`.
    LeaveOneOut,
}

/// The per-direction factor on the fused coefficients (§3.1 item 2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Gain {
    /// v1: none (1 on every direction).
    #[default]
    None,
    /// v2: the positive-part James-Stein share of cross-client energy.
    Shrinkage,
    /// Per client and direction: the positive part of the cosine with the
    /// same client's previous delta there (ALGORITHMS-NOTES.md §1).
    Temporal,
}

/// CRA's hyper-parameters (validated by the config layer).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CraParams {
    /// Fraction of `sum sigma^2` kept, in (0, 1].
    pub energy: f64,
    /// Cap on the rank per matrix (>= 1).
    pub max_rank: Option<usize>,
    /// Temperature `tau > 0`; `f64::INFINITY` gives `alpha = p`.
    pub tau: f64,
    /// `gamma >= 0`.
    pub confidence_power: f64,
    /// `lambda_res` in [0, 1].
    pub residual_weight: f64,
    /// Which Gram matrix to decompose (tests pin both).
    pub side: BasisSide,
    pub eigensolver: Eigensolver,
    pub agreement: Agreement,
    pub gain: Gain,
    /// `basis_beta` in [0, 1): weight of the previous averaged Gram.
    pub basis_beta: f64,
}

impl Default for CraParams {
    /// The config's defaults (one place for them).
    fn default() -> Self {
        CraConfig::default().params()
    }
}

/// One weight matrix's canonical update.
#[derive(Debug, Clone, PartialEq)]
pub struct CanonicalMatrix {
    /// The tensor's name.
    pub name: String,
    /// Where it lies in the flat layout.
    pub range: Range<usize>,
    pub rows: usize,
    pub cols: usize,
    /// `U`, row-major `rows x rank`, orthonormal columns.
    pub basis: Vec<f64>,
    /// `C*`, row-major `rank x cols`.
    pub coeffs: Vec<f64>,
    /// `lambda_res sum_k p_k E_k`, row-major `rows x cols`; `None` when
    /// `lambda_res = 0`.
    pub residual: Option<Vec<f64>>,
    pub rank: usize,
}

impl CanonicalMatrix {
    /// `U C* + residual` (row-major `rows x cols`).
    pub fn dense(&self) -> Result<Vec<f64>> {
        reconstruct(
            &self.basis,
            &self.coeffs,
            self.residual.as_deref(),
            (self.rows, self.rank, self.cols),
        )
    }

    /// `||U C* + residual||_F^2` without forming it: `U` is orthonormal and
    /// the residual lies outside its span, so the parts are orthogonal.
    pub fn norm_sq(&self) -> f64 {
        let sq = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>();
        sq(&self.coeffs) + self.residual.as_deref().map_or(0.0, sq)
    }
}

/// `U C* + residual` for a row-major basis `rows x rank` and coefficients
/// `rank x cols`.
fn reconstruct(
    basis: &[f64],
    coeffs: &[f64],
    residual: Option<&[f64]>,
    (rows, rank, cols): (usize, usize, usize),
) -> Result<Vec<f64>> {
    let mut d = dense::mul_rowmajor(basis, coeffs, rows, rank, cols)?;
    if let Some(res) = residual {
        ops::axpy(1.0, res, &mut d)?;
    }
    Ok(d)
}

/// A non-matrix tensor's update: the data-weighted mean delta.
#[derive(Debug, Clone, PartialEq)]
pub struct MeanVector {
    pub name: String,
    pub range: Range<usize>,
    pub mean: Vec<f64>,
}

/// CRA's aggregated update: a canonical form per matrix, a mean per bias.
#[derive(Debug, Clone, PartialEq)]
pub struct CanonicalUpdate {
    pub matrices: Vec<CanonicalMatrix>,
    pub vectors: Vec<MeanVector>,
    /// Length of the flat layout.
    pub len: usize,
}

impl CanonicalUpdate {
    /// The update as one flat vector in the global model's layout.
    pub fn dense(&self) -> Result<Vec<f64>> {
        let mut out = vec![0.0; self.len];
        for m in &self.matrices {
            let values = m.dense()?;
            if let Some(dst) = out.get_mut(m.range.clone()) {
                dst.copy_from_slice(&values);
            }
        }
        for v in &self.vectors {
            if let Some(dst) = out.get_mut(v.range.clone()) {
                dst.copy_from_slice(&v.mean);
            }
        }
        Ok(out)
    }
}

impl PseudoGradient for CanonicalUpdate {
    fn norm(&self) -> f64 {
        let matrices: f64 = self.matrices.iter().map(CanonicalMatrix::norm_sq).sum();
        let vectors: f64 = self
            .vectors
            .iter()
            .map(|v| v.mean.iter().map(|x| x * x).sum::<f64>())
            .sum();
        (matrices + vectors).sqrt()
    }
}

/// The shared basis of one matrix and the spectrum of `S`.
#[derive(Debug, Clone, PartialEq)]
pub struct Basis {
    /// Row-major `rows x rank`.
    pub u: Vec<f64>,
    pub rank: usize,
    /// All singular values of `S` (from the Gram eigenvalues), descending;
    /// with the refined solver, those beyond the refined ones are the f32
    /// approximations.
    pub sigma: Vec<f64>,
    /// `sum_i sigma_i^2 = ||S||_F^2` (exactly `trace(G)` with the refined
    /// solver).
    pub total_energy: f64,
    /// Whether the refined solver produced it (else the exact one).
    pub refined: bool,
    /// With basis momentum: the averaged Gram it came from.
    pub averaged: Option<AveragedGram>,
}

impl Basis {
    /// `sum_{i<rank} sigma_i^2 / ||S||_F^2` (1 for a zero `S`).
    pub fn energy_kept(&self) -> f64 {
        let total = self.total_energy;
        if total > 0.0 {
            self.sigma[..self.rank].iter().map(|s| s * s).sum::<f64>() / total
        } else {
            1.0
        }
    }
}

/// The shared basis `U` of `S = [sqrt(p_k) Delta_k]_k` for row-major
/// `rows x cols` deltas, without basis momentum.
pub fn canonical_basis(
    deltas: &[&[f64]],
    weights: &[f64],
    rows: usize,
    cols: usize,
    params: &CraParams,
) -> Result<Basis> {
    let mut plain = *params;
    plain.basis_beta = 0.0;
    canonical_basis_with(deltas, weights, rows, cols, &plain, None)
}

/// The shared basis, with basis momentum when `params.basis_beta > 0`:
/// then `U` = top eigenvectors of `G_t = basis_beta G_{t-1} + sum_k p_k
/// Delta_k Delta_k^T`, `previous` being `G_{t-1}` (row-major `rows x
/// rows`; none before the first round), and [`Basis::averaged`] holds
/// `G_t`.
pub fn canonical_basis_with(
    deltas: &[&[f64]],
    weights: &[f64],
    rows: usize,
    cols: usize,
    params: &CraParams,
    previous: Option<&[f32]>,
) -> Result<Basis> {
    if deltas.len() != weights.len() {
        return Err(StrategyError::Length {
            what: "weights",
            expected: deltas.len(),
            got: weights.len(),
        });
    }
    for d in deltas {
        if d.len() != rows * cols {
            return Err(StrategyError::Length {
                what: "matrix delta",
                expected: rows * cols,
                got: d.len(),
            });
        }
    }
    let k = deltas.len();
    let wide = k * cols;
    let momentum = params.basis_beta > 0.0;
    let output_side = momentum
        || match params.side {
            BasisSide::Auto => rows <= wide,
            BasisSide::Output => true,
            BasisSide::Stacked => false,
        };
    // S is only formed on the stacked side, where it is the small one.
    let stacked = (!output_side).then(|| {
        Mat::<f64>::from_fn(rows, wide, |i, j| {
            let (client, c) = (j / cols.max(1), j % cols.max(1));
            weights[client].max(0.0).sqrt() * deltas[client][i * cols + c]
        })
    });
    let mut gram = match &stacked {
        None => dense::weighted_gram_lower(deltas, weights, rows, cols)?,
        Some(s) => dense::mul(s.transpose(), s.as_ref()),
    };
    let averaged = if momentum {
        Some(average_gram(&mut gram, previous, params.basis_beta)?)
    } else {
        None
    };
    let refine = match params.eigensolver {
        Eigensolver::Exact => false,
        Eigensolver::Refined => true,
        Eigensolver::Auto => rows >= REFINED_MIN_DIM,
    };
    if output_side && refine && params.energy < 1.0 {
        dense::symmetrize_from_lower(&mut gram);
        if let Some(mut basis) = refined_basis(
            &gram,
            rows,
            wide,
            structural_rank(rows, wide, momentum),
            params,
        )? {
            basis.averaged = averaged;
            return Ok(basis);
        }
    }
    let (values, vectors) = dense::symmetric_eigen(gram.as_ref())?;
    drop(gram);
    // Descending order, clamped at 0.
    let n = values.len();
    let order: Vec<usize> = (0..n).rev().collect();
    let lambdas: Vec<f64> = order.iter().map(|&i| values[i].max(0.0)).collect();
    let mut sigma: Vec<f64> = lambdas.iter().map(|l| l.sqrt()).collect();
    // Singular values of S beyond min(rows, wide) are structurally zero
    // (not those of an averaged Gram, which accumulates rounds).
    sigma.truncate(structural_rank(rows, wide, momentum));
    let rank = choose_rank(&lambdas, rows.max(wide), params);

    // Eigenvalues come ascending: the top `rank` vectors are the last
    // columns, taken in descending order.
    let top = |len: usize| Mat::<f64>::from_fn(len, rank, |r, j| vectors[(r, order[j])]);
    let mut u = match &stacked {
        None => top(rows),
        Some(s) => {
            let mut u = dense::mul(s.as_ref(), top(wide).as_ref());
            for j in 0..rank {
                let inv = 1.0 / lambdas[j].sqrt();
                for r in 0..rows {
                    u[(r, j)] *= inv;
                }
            }
            dense::orthonormalize(&mut u);
            u
        }
    };
    dense::fix_signs(&mut u);
    Ok(Basis {
        u: dense::to_row_major(u.as_ref()),
        rank,
        total_energy: lambdas.iter().sum(),
        sigma,
        refined: false,
        averaged,
    })
}

/// How many singular values the basis can have: `min(rows, K cols)` for
/// one round's `S`, `rows` for an averaged Gram.
fn structural_rank(rows: usize, wide: usize, momentum: bool) -> usize {
    if momentum {
        rows
    } else {
        rows.min(wide)
    }
}

/// The averaged Gram after a round of basis momentum.
#[derive(Debug, Clone, PartialEq)]
pub struct AveragedGram {
    /// `G_t`, row-major `rows x rows`, symmetric.
    pub gram: Vec<f64>,
    /// `1 - <P_t, G_{t-1}>_F / (||P_t||_F ||G_{t-1}||_F)`; none in the
    /// first round or when either is 0.
    pub drift: Option<f64>,
}

/// Turns the round's Gram `P_t` (lower triangle in `gram`) into `G_t =
/// beta G_{t-1} + P_t` in place (whole matrix), measuring the drift.
fn average_gram(gram: &mut Mat<f64>, previous: Option<&[f32]>, beta: f64) -> Result<AveragedGram> {
    let n = gram.nrows();
    dense::symmetrize_from_lower(gram);
    let drift = match previous {
        None => None,
        Some(prev) => {
            if prev.len() != n * n {
                return Err(StrategyError::StateLayout {
                    key: GRAM_KEY.to_string(),
                    detail: fedcmp_core::CoreError::Invalid(format!(
                        "{} values where a {n} x {n} Gram matrix was expected",
                        prev.len()
                    )),
                });
            }
            let (mut inner, mut p_sq, mut g_sq) = (0.0, 0.0, 0.0);
            for i in 0..n {
                for j in 0..n {
                    let (p, g) = (gram[(i, j)], f64::from(prev[i * n + j]));
                    inner += p * g;
                    p_sq += p * p;
                    g_sq += g * g;
                }
            }
            for i in 0..n {
                for j in 0..n {
                    gram[(i, j)] += beta * f64::from(prev[i * n + j]);
                }
            }
            (p_sq > 0.0 && g_sq > 0.0).then(|| 1.0 - inner / (p_sq.sqrt() * g_sq.sqrt()))
        }
    };
    Ok(AveragedGram {
        gram: dense::to_row_major(gram.as_ref()),
        drift,
    })
}

/// The basis by [`Eigensolver::Refined`] from the full Gram matrix `g`
/// (`rows x rows`); `None` to fall back to the exact solver.
fn refined_basis(
    g: &Mat<f64>,
    rows: usize,
    wide: usize,
    structural: usize,
    params: &CraParams,
) -> Result<Option<Basis>> {
    let total: f64 = (0..rows).map(|i| g[(i, i)]).sum();
    let wanted = |lambda32: &[f64]| choose_rank(lambda32, rows.max(wide), params);
    let Some(dense::TopEigen {
        values: ritz,
        vectors,
        rest,
    }) = dense::refined_top_eigen(g.as_ref(), wanted)?
    else {
        return Ok(None);
    };
    // Ritz values are lower bounds of the eigenvalues (Cauchy interlacing),
    // so the rank reaching `energy` of the exact total here keeps at least
    // that energy; if the refined directions do not reach it, fall back.
    let target = params.energy * total;
    let mut cum = 0.0;
    let by_energy = ritz
        .iter()
        .position(|l| {
            cum += l;
            cum >= target
        })
        .map(|i| i + 1);
    let rank = match (by_energy, params.max_rank) {
        (Some(r), cap) => r.min(cap.unwrap_or(usize::MAX)),
        // The energy rank lies beyond the refined directions, the cap within.
        (None, Some(cap)) if cap <= ritz.len() => cap,
        (None, _) => return Ok(None),
    };
    let mut u = Mat::<f64>::from_fn(rows, rank, |r, j| vectors[(r, j)]);
    dense::fix_signs(&mut u);
    let mut sigma: Vec<f64> = ritz.iter().chain(&rest).map(|l| l.sqrt()).collect();
    sigma.truncate(structural);
    Ok(Some(Basis {
        u: dense::to_row_major(u.as_ref()),
        rank,
        sigma,
        total_energy: total,
        refined: true,
        averaged: None,
    }))
}

/// The rank kept from descending Gram eigenvalues `lambdas` (= sigma^2).
fn choose_rank(lambdas: &[f64], max_dim: usize, params: &CraParams) -> usize {
    let lmax = lambdas.first().copied().unwrap_or(0.0);
    if lmax <= 0.0 {
        return 0;
    }
    let tol = max_dim as f64 * f64::EPSILON * lmax;
    let numerical = lambdas.iter().take_while(|&&l| l > tol).count();
    let mut rank = if params.energy >= 1.0 {
        numerical
    } else {
        let total: f64 = lambdas[..numerical].iter().sum();
        let target = params.energy * total;
        let mut cum = 0.0;
        let mut r = numerical;
        for (i, l) in lambdas[..numerical].iter().enumerate() {
            cum += l;
            if cum >= target {
                r = i + 1;
                break;
            }
        }
        r
    };
    if let Some(cap) = params.max_rank {
        rank = rank.min(cap);
    }
    rank
}

/// One direction's reliability: agreements, weights, confidence, gain,
/// fusion.
#[derive(Debug, Clone, PartialEq)]
pub struct Reliability {
    /// `a_kj` per client.
    pub agreement: Vec<f64>,
    /// `alpha_kj` per client (sums to 1).
    pub alpha: Vec<f64>,
    /// `rho_j` in [0, 1] (0 when every `c_kj` is 0).
    pub rho: f64,
    /// `g_j` in [0, 1] (1 without a gain; with the temporal gain, the
    /// energy-weighted mean of the clients' gains).
    pub gain: f64,
    /// `g_kj` per client (the temporal gain; 1 for the other rules).
    pub client_gain: Vec<f64>,
    /// The cross-client term `sum_{k != l} p_k p_l <c_kj, c_lj>`.
    pub cross: f64,
    /// `||cbar_j||^2`.
    pub merged_sq: f64,
    /// `c*_j = g_j rho^gamma sum_k alpha_kj c_kj`.
    pub fused: Vec<f64>,
}

/// The reliability rule of §3 step 4-5 (and §3.1 items 1-2) for one
/// direction `j`: `rows[k]` is `c_kj`, `weights[k]` is `p_k`; `params`
/// gives `tau`, `gamma`, the agreement and the gain. No client has a past
/// (the temporal gain is then 1).
pub fn reliability(rows: &[&[f64]], weights: &[f64], params: &CraParams) -> Result<Reliability> {
    reliability_with(rows, &[], weights, params)
}

/// [`reliability`] with each client's previous coefficient row on the same
/// direction, `past[k]` (`u_j^T Delta_k^prev`; `None`, or `past` shorter
/// than `rows`, for a client without one), read by the temporal gain.
pub fn reliability_with(
    rows: &[&[f64]],
    past: &[Option<&[f64]>],
    weights: &[f64],
    params: &CraParams,
) -> Result<Reliability> {
    if rows.len() != weights.len() {
        return Err(StrategyError::Length {
            what: "weights",
            expected: rows.len(),
            got: weights.len(),
        });
    }
    let k = rows.len();
    let width = rows.first().map_or(0, |r| r.len());
    let mut cbar = vec![0.0; width];
    for (row, &p) in rows.iter().zip(weights) {
        ops::axpy(p, row, &mut cbar)?;
    }
    let norms: Vec<f64> = rows.iter().map(|c| ops::norm(c)).collect();
    let cbar_norm = ops::norm(&cbar);
    // The v2 rules read the rows' Gram (exact cross terms); v1 never forms it.
    let v2 = params.agreement == Agreement::LeaveOneOut || params.gain == Gain::Shrinkage;
    let pairs = if v2 { Some(row_gram(rows)?) } else { None };
    let (cross, merged_sq) = match &pairs {
        Some(g) => {
            let (mut own, mut cross) = (0.0, 0.0);
            for i in 0..k {
                for j in 0..k {
                    let term = weights[i] * weights[j] * g[i * k + j];
                    if i == j {
                        own += term;
                    } else {
                        cross += term;
                    }
                }
            }
            (cross, own + cross)
        }
        None => {
            let own: f64 = weights
                .iter()
                .zip(&norms)
                .map(|(p, n)| (p * n) * (p * n))
                .sum();
            (cbar_norm * cbar_norm - own, cbar_norm * cbar_norm)
        }
    };
    let agreement: Vec<f64> = match (params.agreement, &pairs) {
        (Agreement::LeaveOneOut, Some(g)) => (0..k)
            .map(|i| leave_one_out_cosine(g, weights, i))
            .collect(),
        _ => rows
            .iter()
            .map(|c| ops::cosine(c, &cbar))
            .collect::<Result<_>>()?,
    };
    let tau = params.tau;
    let all_equal = agreement.windows(2).all(|w| w[0] == w[1]);
    let alpha: Vec<f64> = if tau.is_infinite() || all_equal {
        // Equal agreements give alpha = p exactly, not up to rounding.
        weights.to_vec()
    } else {
        // Shifted by the largest agreement so that a small tau cannot
        // overflow; the shift cancels in the normalisation.
        let amax = agreement.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let raw: Vec<f64> = weights
            .iter()
            .zip(&agreement)
            .map(|(p, a)| p * ((a - amax) / tau).exp())
            .collect();
        let z: f64 = raw.iter().sum();
        if z > 0.0 {
            raw.iter().map(|x| x / z).collect()
        } else {
            weights.to_vec()
        }
    };
    let denom: f64 = norms.iter().zip(weights).map(|(n, p)| p * n).sum();
    let rho = if denom > 0.0 {
        (cbar_norm / denom).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let client_gain: Vec<f64> = match params.gain {
        Gain::Temporal => rows
            .iter()
            .enumerate()
            .map(|(k, row)| match past.get(k).copied().flatten() {
                Some(before) => Ok(ops::cosine(row, before)?.max(0.0)),
                None => Ok(1.0),
            })
            .collect::<Result<_>>()?,
        Gain::None | Gain::Shrinkage => vec![1.0; k],
    };
    let gain = match params.gain {
        Gain::None => 1.0,
        Gain::Shrinkage => shrinkage_gain(cross, merged_sq, weights),
        Gain::Temporal => {
            let (mut kept, mut all) = (0.0, 0.0);
            for ((g, n), p) in client_gain.iter().zip(&norms).zip(weights) {
                kept += p * g * n * n;
                all += p * n * n;
            }
            if all > 0.0 {
                kept / all
            } else {
                1.0
            }
        }
    };
    let mut fused = vec![0.0; width];
    for ((row, &a), &g) in rows.iter().zip(&alpha).zip(&client_gain) {
        ops::axpy(a * g, row, &mut fused)?;
    }
    // The temporal gain is already inside the sum (per client).
    let direction_gain = if params.gain == Gain::Temporal {
        1.0
    } else {
        gain
    };
    let factor = direction_gain
        * if params.confidence_power != 0.0 {
            rho.powf(params.confidence_power)
        } else {
            1.0
        };
    if factor != 1.0 {
        ops::scale(factor, &mut fused);
    }
    Ok(Reliability {
        agreement,
        alpha,
        rho,
        gain,
        client_gain,
        cross,
        merged_sq,
        fused,
    })
}

/// `G[i][j] = <rows_i, rows_j>`, row-major `k x k`, each pair once, in
/// order.
fn row_gram(rows: &[&[f64]]) -> Result<Vec<f64>> {
    let k = rows.len();
    let mut g = vec![0.0; k * k];
    for i in 0..k {
        for j in i..k {
            let v = ops::dot(rows[i], rows[j])?;
            g[i * k + j] = v;
            g[j * k + i] = v;
        }
    }
    Ok(g)
}

/// `cos(c_i, sum_{l != i} p_l c_l)` from the rows' Gram `g`; 0 when either
/// vector is 0.
fn leave_one_out_cosine(g: &[f64], weights: &[f64], i: usize) -> f64 {
    let k = weights.len();
    let others = (0..k).filter(|&l| l != i);
    let dot: f64 = others.clone().map(|l| weights[l] * g[i * k + l]).sum();
    let rest_sq: f64 = others
        .clone()
        .flat_map(|l| others.clone().map(move |m| (l, m)))
        .map(|(l, m)| weights[l] * weights[m] * g[l * k + m])
        .sum();
    let own_sq = g[i * k + i];
    if own_sq > 0.0 && rest_sq > 0.0 {
        (dot / (own_sq.sqrt() * rest_sq.sqrt())).clamp(-1.0, 1.0)
    } else {
        0.0
    }
}

/// `g_j = clip((1 - r_j) / (1 - sum_k p_k^2), 0, 1)` with `1 - r_j =
/// cross / ||cbar_j||^2`: 1 when one client holds all the weight, 0 when
/// `cbar_j = 0`.
fn shrinkage_gain(cross: f64, merged_sq: f64, weights: &[f64]) -> f64 {
    let spread = 1.0 - weights.iter().map(|p| p * p).sum::<f64>();
    if spread <= 16.0 * f64::EPSILON {
        return 1.0;
    }
    if merged_sq <= 0.0 {
        return 0.0;
    }
    (cross / (merged_sq * spread)).clamp(0.0, 1.0)
}

/// One matrix merged by CRA, with its diagnostics.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedMatrix {
    /// `U`, row-major `rows x rank`.
    pub basis: Vec<f64>,
    /// `C*`, row-major `rank x cols`.
    pub coeffs: Vec<f64>,
    /// `lambda_res sum_k p_k E_k` (`None` when `lambda_res = 0`).
    pub residual: Option<Vec<f64>>,
    pub rank: usize,
    pub energy_kept: f64,
    /// `rho_j` per kept direction.
    pub rho: Vec<f64>,
    /// `g_j` per kept direction.
    pub gain: Vec<f64>,
    /// The cross-client term per kept direction (see [`Reliability`]).
    pub cross: Vec<f64>,
    /// `||cbar_j||^2` per kept direction.
    pub merged_sq: Vec<f64>,
    /// With basis momentum: the averaged Gram to keep for the next round.
    pub averaged: Option<AveragedGram>,
    /// `||C_k||_F^2` per client.
    pub kept: Vec<f64>,
    /// `||Delta_k||_F^2` per client.
    pub total: Vec<f64>,
}

impl MergedMatrix {
    /// `U C* + residual`, row-major.
    pub fn dense(&self, rows: usize, cols: usize) -> Result<Vec<f64>> {
        reconstruct(
            &self.basis,
            &self.coeffs,
            self.residual.as_deref(),
            (rows, self.rank, cols),
        )
    }
}

/// CRA on one matrix: row-major `rows x cols` deltas with data weights,
/// without basis momentum.
pub fn merge_matrix(
    slices: &[&[f64]],
    p: &[f64],
    rows: usize,
    cols: usize,
    params: &CraParams,
) -> Result<MergedMatrix> {
    let mut plain = *params;
    plain.basis_beta = 0.0;
    merge_matrix_with(slices, p, rows, cols, &plain, None)
}

/// CRA on one matrix, with basis momentum over `previous` (the averaged
/// Gram of the rounds before, see [`canonical_basis_with`]).
pub fn merge_matrix_with(
    slices: &[&[f64]],
    p: &[f64],
    rows: usize,
    cols: usize,
    params: &CraParams,
    previous: Option<&[f32]>,
) -> Result<MergedMatrix> {
    merge_matrix_history(slices, p, rows, cols, params, previous, &[])
}

/// CRA on one matrix with everything it can carry between rounds: the
/// averaged Gram `previous` and, for the temporal gain, each client's
/// previous delta of this matrix `past[k]` (row-major `rows x cols`;
/// `None`, or `past` shorter than `slices`, for a client without one).
pub fn merge_matrix_history(
    slices: &[&[f64]],
    p: &[f64],
    rows: usize,
    cols: usize,
    params: &CraParams,
    previous: Option<&[f32]>,
    past: &[Option<&[f32]>],
) -> Result<MergedMatrix> {
    let mut basis = canonical_basis_with(slices, p, rows, cols, params, previous)?;
    let averaged = basis.averaged.take();
    let r = basis.rank;
    let u = dense::view(&basis.u, rows, r)?;
    let coeffs: Vec<Vec<f64>> = slices
        .iter()
        .map(|d| {
            Ok(dense::mul_to_row_major(
                u.transpose(),
                dense::view(d, rows, cols)?,
            ))
        })
        .collect::<Result<_>>()?;
    // The past deltas in the round's basis (only the temporal gain reads them).
    let past_coeffs: Vec<Option<Vec<f64>>> = if params.gain == Gain::Temporal {
        past.iter()
            .map(|before| {
                before
                    .map(|b| {
                        if b.len() != rows * cols {
                            return Err(StrategyError::StateLayout {
                                key: PAST_KEY.to_string(),
                                detail: fedcmp_core::CoreError::Invalid(format!(
                                    "{} values where a {rows} x {cols} delta was expected",
                                    b.len()
                                )),
                            });
                        }
                        let wide: Vec<f64> = b.iter().map(|&x| f64::from(x)).collect();
                        Ok(dense::mul_to_row_major(
                            u.transpose(),
                            dense::view(&wide, rows, cols)?,
                        ))
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let kept = coeffs
        .iter()
        .map(|c| c.iter().map(|x| x * x).sum())
        .collect();
    let total = slices
        .iter()
        .map(|d| d.iter().map(|x| x * x).sum())
        .collect();
    // Directions are independent: in parallel, each one sequential, so the
    // result does not depend on the thread count.
    let directions: Vec<Reliability> = (0..r)
        .into_par_iter()
        .map(|j| {
            let rows_j: Vec<&[f64]> = coeffs
                .iter()
                .map(|c| &c[j * cols..(j + 1) * cols])
                .collect();
            let past_j: Vec<Option<&[f64]>> = past_coeffs
                .iter()
                .map(|c| c.as_deref().map(|c| &c[j * cols..(j + 1) * cols]))
                .collect();
            reliability_with(&rows_j, &past_j, p, params)
        })
        .collect::<Result<_>>()?;
    drop(coeffs);
    drop(past_coeffs);
    let mut fused = Vec::with_capacity(r * cols);
    let (mut rho, mut gain, mut cross, mut merged_sq) = (
        Vec::with_capacity(r),
        Vec::with_capacity(r),
        Vec::with_capacity(r),
        Vec::with_capacity(r),
    );
    for d in directions {
        rho.push(d.rho);
        gain.push(d.gain);
        cross.push(d.cross);
        merged_sq.push(d.merged_sq);
        fused.extend_from_slice(&d.fused);
    }
    let residual = if params.residual_weight != 0.0 {
        // sum_k p_k E_k = mean - U U^T mean.
        let mut mean = vec![0.0; rows * cols];
        for (d, &w) in slices.iter().zip(p) {
            ops::axpy(w, d, &mut mean)?;
        }
        let inside = dense::mul_to_row_major(
            u,
            dense::mul(u.transpose(), dense::view(&mean, rows, cols)?).as_ref(),
        );
        Some(
            mean.iter()
                .zip(inside)
                .map(|(m, q)| params.residual_weight * (m - q))
                .collect(),
        )
    } else {
        None
    };
    Ok(MergedMatrix {
        energy_kept: basis.energy_kept(),
        basis: basis.u,
        coeffs: fused,
        residual,
        rank: r,
        rho,
        gain,
        cross,
        merged_sq,
        averaged,
        kept,
        total,
    })
}

/// The state key of the averaged Gram matrices (basis momentum).
const GRAM_KEY: &str = "cra_basis_gram";
/// The state key prefix of the clients' past deltas (temporal gain),
/// followed by the client id.
const PAST_KEY: &str = "cra_past_delta/";

/// CRA as an [`Aggregator`]. Its state: the averaged Gram of basis
/// momentum (none when `basis_beta = 0`) and, with the temporal gain, each
/// client's last delta of every weight matrix.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CanonicalMerge {
    pub params: CraParams,
    gram: Option<ParamSet>,
    past: BTreeMap<ClientId, ParamSet>,
}

impl CanonicalMerge {
    pub fn new(params: CraParams) -> Self {
        Self {
            params,
            gram: None,
            past: BTreeMap::new(),
        }
    }

    /// Each client's last delta of every weight matrix (temporal gain).
    pub fn past_deltas(&self) -> &BTreeMap<ClientId, ParamSet> {
        &self.past
    }

    /// The averaged Gram per matrix (basis momentum; none before the first
    /// round).
    pub fn averaged_gram(&self) -> Option<&ParamSet> {
        self.gram.as_ref()
    }
}

/// Quantiles (min, 10%, 25%, median, 75%, 90%, max) of `values`, by the
/// nearest-rank rule.
fn quantiles(values: &[f64]) -> Vec<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
        .iter()
        .map(|q| sorted[((q * (n - 1) as f64).round() as usize).min(n - 1)])
        .collect()
}

impl Aggregator for CanonicalMerge {
    type Output = CanonicalUpdate;

    fn combine(
        &mut self,
        input: &RoundInput<'_>,
        metrics: &mut RoundMetrics,
    ) -> Result<CanonicalUpdate> {
        let p = &input.sample_weights;
        let k = input.len();
        let mut matrices = Vec::new();
        let mut vectors = Vec::new();
        let mut ranks = Vec::new();
        let mut energies = Vec::new();
        let mut rhos = Vec::new();
        let mut gains = Vec::new();
        let (mut gained_sq, mut cross_sum, mut merged_sum) = (0.0, 0.0, 0.0);
        let mut grams = Vec::new();
        let mut drifts = Vec::new();
        let mut kept = vec![0.0; k];
        let mut total = vec![0.0; k];
        let temporal = self.params.gain == Gain::Temporal;
        let mut seen: Vec<Vec<(String, ParamTensor)>> = vec![Vec::new(); k];
        for (name, shape, range) in ops::tensor_ranges(input.global) {
            let slices: Vec<&[f64]> = input
                .deltas
                .iter()
                .map(|d| {
                    d.get(range.clone()).ok_or(StrategyError::Length {
                        what: "client delta",
                        expected: input.global_flat.len(),
                        got: d.len(),
                    })
                })
                .collect::<Result<_>>()?;
            let &[rows, cols] = shape else {
                let owned: Vec<Vec<f64>> = slices.iter().map(|s| s.to_vec()).collect();
                vectors.push(MeanVector {
                    name: name.to_string(),
                    range,
                    mean: ops::weighted_sum(&owned, p)?,
                });
                continue;
            };
            let previous = self
                .gram
                .as_ref()
                .and_then(|g| g.get(name))
                .map(|t| t.data.as_slice());
            let past: Vec<Option<&[f32]>> = if temporal {
                input
                    .updates
                    .iter()
                    .map(|u| {
                        self.past
                            .get(&u.client)
                            .and_then(|set| set.get(name))
                            .map(|t| t.data.as_slice())
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let merged =
                merge_matrix_history(&slices, p, rows, cols, &self.params, previous, &past)?;
            if temporal {
                for (held, slice) in seen.iter_mut().zip(&slices) {
                    // Rounding to f32 is the state's representation (held as saved).
                    let values = slice.iter().map(|&x| x as f32).collect();
                    held.push((
                        name.to_string(),
                        ParamTensor::new(name, vec![rows, cols], values)?,
                    ));
                }
            }
            for (i, (a, b)) in merged.kept.iter().zip(&merged.total).enumerate() {
                kept[i] += a;
                total[i] += b;
            }
            rhos.extend_from_slice(&merged.rho);
            gains.extend_from_slice(&merged.gain);
            for ((g, c), m) in merged.gain.iter().zip(&merged.cross).zip(&merged.merged_sq) {
                gained_sq += g * m;
                cross_sum += c;
                merged_sum += m;
            }
            ranks.push(merged.rank as f64);
            energies.push(merged.energy_kept);
            if let Some(averaged) = &merged.averaged {
                // Rounding to f32 is the state's representation (held as saved).
                let values = averaged.gram.iter().map(|&x| x as f32).collect();
                grams.push((
                    name.to_string(),
                    ParamTensor::new(name, vec![rows, rows], values)?,
                ));
                drifts.extend(averaged.drift);
            }
            matrices.push(CanonicalMatrix {
                name: name.to_string(),
                range,
                rows,
                cols,
                basis: merged.basis,
                coeffs: merged.coeffs,
                residual: merged.residual,
                rank: merged.rank,
            });
        }
        if !grams.is_empty() {
            self.gram = Some(ParamSet::new(grams)?);
        }
        if temporal {
            for (update, held) in input.updates.iter().zip(seen) {
                self.past.insert(update.client, ParamSet::new(held)?);
            }
        }
        metrics.set_series(names::CRA_RANK, ranks);
        metrics.set_series(names::CRA_ENERGY_KEPT, energies);
        if !rhos.is_empty() {
            metrics.set(
                names::CRA_RHO_MEAN,
                rhos.iter().sum::<f64>() / rhos.len() as f64,
            );
            metrics.set(
                names::CRA_RHO_MIN,
                rhos.iter().copied().fold(f64::INFINITY, f64::min),
            );
        }
        let spread = 1.0 - p.iter().map(|w| w * w).sum::<f64>();
        if merged_sum > 0.0 && spread > 16.0 * f64::EPSILON {
            metrics.set(names::CRA_SHARED_SHARE, cross_sum / (spread * merged_sum));
        }
        if self.params.gain != Gain::None && !gains.is_empty() {
            metrics.set_series(names::CRA_GAIN_QUANTILES, quantiles(&gains));
            if merged_sum > 0.0 {
                metrics.set(names::CRA_GAIN_MEAN, gained_sq / merged_sum);
            }
        }
        if !drifts.is_empty() {
            metrics.set_series(names::CRA_BASIS_DRIFT, drifts);
        }
        metrics.set_series(
            names::CRA_CLIENT_ALIGNMENT,
            kept.iter()
                .zip(&total)
                .map(|(a, b)| {
                    if *b > 0.0 {
                        (a / b).clamp(0.0, 1.0)
                    } else {
                        0.0
                    }
                })
                .collect(),
        );
        Ok(CanonicalUpdate {
            matrices,
            vectors,
            len: input.global_flat.len(),
        })
    }

    fn save(&self, state: &mut StrategyState) {
        state.put_tensor(GRAM_KEY, self.gram.as_ref());
        for (client, set) in &self.past {
            state.put_tensor(&format!("{PAST_KEY}{}", client.0), Some(set));
        }
    }

    fn load(&mut self, state: &mut StrategyState) -> Result<()> {
        self.gram = state.take_tensor(GRAM_KEY);
        self.past = BTreeMap::new();
        for (key, set) in state.take_prefixed(PAST_KEY) {
            let id = key[PAST_KEY.len()..]
                .parse::<u32>()
                .map_err(|_| StrategyError::State {
                    reason: format!("`{key}`: expected {PAST_KEY}<client id>"),
                })?;
            self.past.insert(ClientId(id), set);
        }
        Ok(())
    }
}

/// `theta += eta_s (U C* + residual)` (and the mean for biases): the
/// server step of `cra-only`. No state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CanonicalSgd {
    pub lr: f64,
}

impl CanonicalSgd {
    pub fn new(lr: f64) -> Self {
        Self { lr }
    }
}

impl ServerOptimizer<CanonicalUpdate> for CanonicalSgd {
    fn step(
        &mut self,
        input: &RoundInput<'_>,
        update: &CanonicalUpdate,
        _metrics: &mut RoundMetrics,
    ) -> Result<Vec<f64>> {
        let mut next = input.global_flat.clone();
        ops::axpy(self.lr, &update.dense()?, &mut next)?;
        Ok(next)
    }
}

/// The config name of CRA with the plain server step.
pub const CRA_ONLY: &str = "cra-only";

/// `cra-only`'s hyper-parameters (also CRA's part of `fed-cmp`).
///
/// `tau` is a number > 0 or the string `"inf"` (TOML also accepts the float
/// literal `inf`): infinity gives `alpha_kj = p_k`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct CraConfig {
    /// Fraction of `sum sigma^2` kept per matrix, in (0, 1].
    pub energy: f64,
    /// Cap on the rank per matrix (>= 1); none by default.
    pub max_rank: Option<usize>,
    /// Temperature `tau` > 0, or infinity.
    #[serde(with = "temperature")]
    pub tau: f64,
    /// `gamma` >= 0.
    pub confidence_power: f64,
    /// `lambda_res` in [0, 1].
    pub residual_weight: f64,
    /// `eta_s` > 0.
    pub server_lr: f64,
    /// `auto` (default), `exact` or `refined`: see [`Eigensolver`].
    pub eigensolver: Eigensolver,
    /// `consensus` (v1, default) or `leave-one-out` (v2).
    pub agreement: Agreement,
    /// `none` (v1, default), `shrinkage` (v2) or `temporal`.
    pub gain: Gain,
    /// Basis momentum `basis_beta` in [0, 1); 0 (default) = off.
    pub basis_beta: f64,
}

impl Default for CraConfig {
    fn default() -> Self {
        Self {
            energy: 0.95,
            max_rank: None,
            tau: 1.0,
            confidence_power: 0.0,
            residual_weight: 0.0,
            server_lr: 1.0,
            eigensolver: Eigensolver::Auto,
            agreement: Agreement::Consensus,
            gain: Gain::None,
            basis_beta: 0.0,
        }
    }
}

impl CraConfig {
    pub fn validate(&self) -> Result<()> {
        check(
            "energy",
            self.energy,
            self.energy > 0.0 && self.energy <= 1.0,
            "in (0, 1]",
        )?;
        if self.max_rank == Some(0) {
            return Err(StrategyError::Config {
                field: "max-rank".to_string(),
                reason: "must be >= 1 when given, got 0".to_string(),
            });
        }
        check("tau", self.tau, self.tau > 0.0, "> 0 (or \"inf\")")?;
        non_negative("confidence-power", self.confidence_power)?;
        check(
            "residual-weight",
            self.residual_weight,
            (0.0..=1.0).contains(&self.residual_weight),
            "in [0, 1]",
        )?;
        positive("server-lr", self.server_lr)?;
        unit_interval("basis-beta", self.basis_beta)
    }

    /// The aggregator's parameters.
    pub fn params(&self) -> CraParams {
        CraParams {
            energy: self.energy,
            max_rank: self.max_rank,
            tau: self.tau,
            confidence_power: self.confidence_power,
            residual_weight: self.residual_weight,
            side: BasisSide::Auto,
            eigensolver: self.eigensolver,
            agreement: self.agreement,
            gain: self.gain,
            basis_beta: self.basis_beta,
        }
    }
}

/// CRA with the plain server step.
pub type CraOnly = Composed<Plain, CanonicalMerge, CanonicalSgd>;

/// Builds `cra-only` after validating `config`.
pub fn cra_only(config: &CraConfig) -> Result<CraOnly> {
    config.validate()?;
    Ok(Composed::new(
        CRA_ONLY,
        Plain,
        CanonicalMerge::new(config.params()),
        CanonicalSgd::new(config.server_lr),
    ))
}

/// Serde for a temperature: a number, or `"inf"` for infinity (JSON has no
/// infinite numbers).
pub(crate) mod temperature {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Number(f64),
        Text(String),
    }

    pub fn serialize<S: Serializer>(value: &f64, s: S) -> Result<S::Ok, S::Error> {
        if value.is_infinite() && *value > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_f64(*value)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Number(x) => Ok(x),
            Repr::Text(t) if matches!(t.to_ascii_lowercase().as_str(), "inf" | "infinity") => {
                Ok(f64::INFINITY)
            }
            Repr::Text(t) => Err(serde::de::Error::custom(format!(
                "expected a number or \"inf\", got \"{t}\""
            ))),
        }
    }
}
