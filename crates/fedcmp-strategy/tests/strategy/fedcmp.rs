//! Fed-CMP's canonical reliability-aware aggregation (CRA): the properties
//! that pin its definition (ALGORITHMS.md §3).

use faer::Mat;
use fedcmp_core::RoundMetrics;
use fedcmp_strategy::compose::{Aggregator, Plain};
use fedcmp_strategy::cra::{
    canonical_basis, merge_matrix, reliability, BasisSide, CanonicalMerge, CanonicalSgd, CraParams,
    Eigensolver,
};
use fedcmp_strategy::round::RoundInput;
use fedcmp_strategy::{ops, Composed, Strategy};

use crate::common::{aggregate_bits, config, shifted, update, wb, TestResult};

/// A seeded Gaussian stream (xorshift64* + Box-Muller).
pub(crate) struct Gauss(pub(crate) u64);

impl Gauss {
    pub(crate) fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub(crate) fn next(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    pub(crate) fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.next()).collect()
    }
}

pub(crate) fn weights(counts: &[u64]) -> Vec<f64> {
    ops::sample_weights(counts).unwrap_or_default()
}

fn params(energy: f64, tau: f64, gamma: f64, lambda: f64) -> CraParams {
    CraParams {
        energy,
        max_rank: None,
        tau,
        confidence_power: gamma,
        residual_weight: lambda,
        side: BasisSide::Auto,
        eigensolver: Eigensolver::Auto,
        ..CraParams::default()
    }
}

pub(crate) fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    ops::norm(&diff) / ops::norm(b).max(f64::MIN_POSITIVE)
}

fn merged(
    deltas: &[Vec<f64>],
    p: &[f64],
    rows: usize,
    cols: usize,
    params: &CraParams,
) -> TestResult<Vec<f64>> {
    let refs: Vec<&[f64]> = deltas.iter().map(Vec::as_slice).collect();
    Ok(merge_matrix(&refs, p, rows, cols, params)?.dense(rows, cols)?)
}

/// `U U^T` (row-major `rows x rows`) of a row-major `rows x r` basis.
pub(crate) fn projector(u: &[f64], rows: usize, r: usize) -> Vec<f64> {
    let mut out = vec![0.0; rows * rows];
    for i in 0..rows {
        for j in 0..rows {
            out[i * rows + j] = (0..r).map(|c| u[i * r + c] * u[j * r + c]).sum();
        }
    }
    out
}

/// `a b` for row-major `a: m x k`, `b: k x n`.
pub(crate) fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
        }
    }
    out
}

/// A random orthogonal `n x n` matrix: Q of the QR of a seeded Gaussian.
pub(crate) fn random_orthogonal(n: usize, g: &mut Gauss) -> Vec<f64> {
    let a = Mat::<f64>::from_fn(n, n, |_, _| g.next());
    let q = a.qr().compute_Q();
    (0..n * n).map(|i| q[(i / n, i % n)]).collect()
}

/// Shapes covering both sides of the smaller-side switch: (rows, cols, K).
pub(crate) const SHAPES: [(usize, usize, usize); 3] = [(6, 3, 4), (10, 2, 3), (5, 5, 2)];

#[test]
fn infinite_temperature_full_energy_is_fedavg() -> TestResult {
    let mut g = Gauss(11);
    let mut worst: f64 = 0.0;
    for (rows, cols, k) in SHAPES {
        let deltas: Vec<Vec<f64>> = (0..k).map(|_| g.vec(rows * cols)).collect();
        let p = weights(&(1..=k as u64).map(|i| 3 * i + 1).collect::<Vec<_>>());
        let mean = ops::weighted_sum(&deltas, &p)?;
        for lambda in [0.0, 0.4, 1.0] {
            for side in [BasisSide::Auto, BasisSide::Output, BasisSide::Stacked] {
                let mut prm = params(1.0, f64::INFINITY, 0.0, lambda);
                prm.side = side;
                let got = merged(&deltas, &p, rows, cols, &prm)?;
                let e = rel_err(&got, &mean);
                worst = worst.max(e);
                assert!(e < 1e-9, "{rows}x{cols} K={k} {side:?}: {e}");
            }
        }
    }
    eprintln!("fedavg limit: worst relative error {worst:e}");
    Ok(())
}

#[test]
fn identical_clients_keep_the_shared_part() -> TestResult {
    let mut g = Gauss(5);
    for (rows, cols, k) in SHAPES {
        let d = g.vec(rows * cols);
        let deltas = vec![d.clone(); k];
        let p = weights(&(0..k as u64).map(|i| i + 2).collect::<Vec<_>>());
        for (energy, lambda) in [(0.6, 0.0), (0.6, 0.3), (0.6, 1.0), (1.0, 0.0), (1.0, 0.5)] {
            let prm = params(energy, 1.0, 0.0, lambda);
            let refs: Vec<&[f64]> = deltas.iter().map(Vec::as_slice).collect();
            let basis = canonical_basis(&refs, &p, rows, cols, &prm)?;
            let proj = matmul(&projector(&basis.u, rows, basis.rank), &d, rows, rows, cols);
            let expected: Vec<f64> = proj
                .iter()
                .zip(&d)
                .map(|(q, x)| q + lambda * (x - q))
                .collect();
            let got = merged(&deltas, &p, rows, cols, &prm)?;
            assert!(
                rel_err(&got, &expected) < 1e-9,
                "{rows}x{cols} {energy} {lambda}"
            );
            if energy == 1.0 || lambda == 1.0 {
                assert!(rel_err(&got, &d) < 1e-9, "{rows}x{cols} {energy} {lambda}");
            }
        }
    }
    Ok(())
}

pub(crate) fn round_updates(
    g: &mut Gauss,
    global: &fedcmp_core::ParamSet,
    ids: &[u32],
) -> TestResult<Vec<fedcmp_core::ClientUpdate>> {
    let n = global.num_values();
    ids.iter()
        .map(|&id| {
            let d: Vec<f32> = g.vec(n).iter().map(|x| (0.1 * x) as f32).collect();
            Ok(update(id, shifted(global, &d)?, 10 + 7 * u64::from(id), 3))
        })
        .collect()
}

#[test]
fn client_order_does_not_matter() -> TestResult {
    let mut g = Gauss(99);
    let (rows, cols) = (6, 4);
    let global = wb(rows, cols, &vec![0.25f32; rows * cols + rows])?;
    let updates = round_updates(&mut g, &global, &[4, 1, 7, 2])?;
    for json in [
        r#"{"name": "cra-only"}"#,
        r#"{"name": "cra-only", "tau": 0.3, "confidence-power": 1.5, "residual-weight": 0.5, "energy": 0.8}"#,
        r#"{"name": "cra-only", "tau": "inf", "energy": 1.0}"#,
    ] {
        let cfg = config(json)?;
        let mut a = cfg.build(8)?;
        let mut b = cfg.build(8)?;
        let mut reversed = updates.clone();
        reversed.reverse();
        let mut rotated = updates.clone();
        rotated.rotate_left(1);
        let first = a.aggregate(0, &global, &updates)?;
        let second = b.aggregate(0, &global, &reversed)?;
        assert_eq!(aggregate_bits(&first), aggregate_bits(&second), "{json}");
        let third = cfg.build(8)?.aggregate(0, &global, &rotated)?;
        assert_eq!(aggregate_bits(&first), aggregate_bits(&third), "{json}");
        for key in ["cra_rank", "cra_energy_kept", "cra_client_alignment"] {
            assert!(first.metrics.series.contains_key(key), "{key}");
        }
        assert!(first.metrics.scalars.contains_key("cra_rho_mean"));
        assert!(first.metrics.scalars.contains_key("cra_rho_min"));
        assert_eq!(first.metrics.series["cra_client_alignment"].len(), 4);
    }
    Ok(())
}

#[test]
fn rotating_the_output_space_rotates_the_result() -> TestResult {
    let mut g = Gauss(2024);
    let mut worst: f64 = 0.0;
    for (rows, cols, k) in SHAPES {
        let q = random_orthogonal(rows, &mut g);
        let deltas: Vec<Vec<f64>> = (0..k).map(|_| g.vec(rows * cols)).collect();
        let rotated: Vec<Vec<f64>> = deltas
            .iter()
            .map(|d| matmul(&q, d, rows, rows, cols))
            .collect();
        let p = weights(&(0..k as u64).map(|i| 5 + i * i).collect::<Vec<_>>());
        for prm in [
            params(0.8, 0.5, 1.0, 0.3),
            params(1.0, 1.0, 0.0, 0.0),
            params(0.95, 2.0, 2.0, 1.0),
        ] {
            let base = merged(&deltas, &p, rows, cols, &prm)?;
            let expected = matmul(&q, &base, rows, rows, cols);
            let got = merged(&rotated, &p, rows, cols, &prm)?;
            let e = rel_err(&got, &expected);
            worst = worst.max(e);
            assert!(e < 1e-9, "{rows}x{cols} K={k} {prm:?}: {e}");
        }
    }
    eprintln!("rotation equivariance: worst relative error {worst:e}");
    Ok(())
}

#[test]
fn alpha_favours_agreeing_clients() -> TestResult {
    let rows: [&[f64]; 4] = [
        &[1.0, 0.2, 0.0],
        &[0.9, 0.1, 0.3],
        &[-0.5, 1.0, 0.0],
        &[0.2, -0.8, 1.0],
    ];
    let p = [0.1, 0.4, 0.3, 0.2];
    for tau in [0.1, 1.0, 10.0] {
        let r = reliability(&rows, &p, &params(1.0, tau, 0.0, 0.0))?;
        let lo = (0..4)
            .min_by(|&a, &b| r.agreement[a].total_cmp(&r.agreement[b]))
            .unwrap_or(0);
        let hi = (0..4)
            .max_by(|&a, &b| r.agreement[a].total_cmp(&r.agreement[b]))
            .unwrap_or(0);
        assert!(r.alpha[lo] < p[lo], "tau {tau}: {r:?}");
        assert!(r.alpha[hi] > p[hi], "tau {tau}: {r:?}");
        assert!((r.alpha.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((0.0..=1.0).contains(&r.rho));
        // alpha_kj / p_k is increasing in a_kj.
        let mut order: Vec<usize> = (0..4).collect();
        order.sort_by(|&a, &b| r.agreement[a].total_cmp(&r.agreement[b]));
        for w in order.windows(2) {
            assert!(r.alpha[w[0]] / p[w[0]] <= r.alpha[w[1]] / p[w[1]]);
        }
    }
    let inf = reliability(&rows, &p, &params(1.0, f64::INFINITY, 0.0, 0.0))?;
    assert_eq!(inf.alpha, p.to_vec());
    // Agreeing clients: rho = 1.
    let same: [&[f64]; 2] = [&[1.0, 2.0], &[2.0, 4.0]];
    assert!(
        (reliability(&same, &[0.5, 0.5], &params(1.0, 1.0, 1.0, 0.0))?.rho - 1.0).abs() < 1e-12
    );
    Ok(())
}

#[test]
fn basis_matches_the_exact_svd_from_both_sides() -> TestResult {
    let mut g = Gauss(7);
    let mut worst: f64 = 0.0;
    for (rows, cols, k) in SHAPES {
        let deltas: Vec<Vec<f64>> = (0..k).map(|_| g.vec(rows * cols)).collect();
        let p = weights(&(0..k as u64).map(|i| 1 + 2 * i).collect::<Vec<_>>());
        let refs: Vec<&[f64]> = deltas.iter().map(Vec::as_slice).collect();
        let s = Mat::<f64>::from_fn(rows, k * cols, |i, j| {
            p[j / cols].sqrt() * deltas[j / cols][i * cols + j % cols]
        });
        let svd = s.thin_svd().map_err(|e| format!("svd: {e:?}"))?;
        for energy in [0.5, 0.8, 1.0] {
            let mut sides = Vec::new();
            for side in [BasisSide::Output, BasisSide::Stacked] {
                let mut prm = params(energy, 1.0, 0.0, 0.0);
                prm.side = side;
                let b = canonical_basis(&refs, &p, rows, cols, &prm)?;
                let r = b.rank;
                assert!(r >= 1);
                let exact: Vec<f64> = (0..rows * r).map(|i| svd.U()[(i / r, i % r)]).collect();
                let d = rel_dist(&projector(&b.u, rows, r), &projector(&exact, rows, r));
                worst = worst.max(d);
                assert!(
                    d < 1e-8,
                    "{rows}x{cols} K={k} {side:?} energy {energy}: {d}"
                );
                // Singular values agree too.
                for (i, s) in b.sigma.iter().enumerate().take(r) {
                    assert!((s - svd.S()[i]).abs() < 1e-8 * svd.S()[0]);
                }
                // U^T U = I.
                let gram = matmul(&transpose(&b.u, rows, r), &b.u, r, rows, r);
                for i in 0..r {
                    for j in 0..r {
                        let e = if i == j { 1.0 } else { 0.0 };
                        assert!((gram[i * r + j] - e).abs() < 1e-12);
                    }
                }
                sides.push(b);
            }
            assert_eq!(sides[0].rank, sides[1].rank);
            let merged_sides: Vec<Vec<f64>> = [BasisSide::Output, BasisSide::Stacked]
                .iter()
                .map(|&side| {
                    let mut prm = params(energy, 0.7, 1.0, 0.2);
                    prm.side = side;
                    merged(&deltas, &p, rows, cols, &prm)
                })
                .collect::<TestResult<_>>()?;
            assert!(rel_err(&merged_sides[0], &merged_sides[1]) < 1e-9);
        }
    }
    eprintln!("basis vs exact SVD: worst ||UU^T - VV^T|| {worst:e}");
    Ok(())
}

pub(crate) fn transpose(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    (0..n * m).map(|i| a[(i % m) * n + i / m]).collect()
}

pub(crate) fn rel_dist(a: &[f64], b: &[f64]) -> f64 {
    let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    ops::norm(&diff)
}

#[test]
fn cra_only_with_fedavg_settings_matches_fedavg_and_biases_are_means() -> TestResult {
    let mut g = Gauss(3);
    let (rows, cols) = (5, 3);
    let global = wb(rows, cols, &vec![0.5f32; rows * cols + rows])?;
    let updates = round_updates(&mut g, &global, &[0, 3, 5])?;
    let input = RoundInput::new(0, &global, &updates)?;
    let mut agg = CanonicalMerge::new(params(1.0, f64::INFINITY, 0.0, 0.0));
    let out = agg.combine(&input, &mut RoundMetrics::default())?;
    let mean = ops::weighted_sum(&input.deltas, &input.sample_weights)?;
    assert!(rel_err(&out.dense()?, &mean) < 1e-9);
    assert_eq!(out.matrices.len(), 1);
    assert_eq!(out.vectors.len(), 1);
    assert_eq!(out.vectors[0].mean, mean[rows * cols..].to_vec());
    let mut cra = Composed::new("cra-only", Plain, agg, CanonicalSgd::new(1.0));
    let a = cra.aggregate(0, &global, &updates)?;
    let b = config(r#"{"name": "fedavg"}"#)?
        .build(8)?
        .aggregate(0, &global, &updates)?;
    for (x, y) in a.params.flat().zip(b.params.flat()) {
        assert!((x - y).abs() <= 1e-6 * y.abs().max(1.0), "{x} vs {y}");
    }
    Ok(())
}

#[test]
fn cra_config_parses_and_validates() -> TestResult {
    let c = config(r#"{"name": "cra-only", "tau": "inf", "max-rank": 3}"#)?;
    let again = config(&serde_json::to_string(&c)?)?;
    assert_eq!(again, c);
    assert!(c.build(4).is_ok());
    for bad in [
        r#"{"name": "cra-only", "energy": 0.0}"#,
        r#"{"name": "cra-only", "energy": 1.5}"#,
        r#"{"name": "cra-only", "tau": 0.0}"#,
        r#"{"name": "cra-only", "tau": -1.0}"#,
        r#"{"name": "cra-only", "max-rank": 0}"#,
        r#"{"name": "cra-only", "residual-weight": 1.5}"#,
        r#"{"name": "cra-only", "confidence-power": -1.0}"#,
        r#"{"name": "cra-only", "server-lr": 0.0}"#,
    ] {
        let err = config(bad)?.build(4);
        assert!(err.is_err(), "{bad} was accepted");
    }
    assert!(config(r#"{"name": "cra-only", "tau": "hot"}"#).is_err());
    assert!(config(r#"{"name": "cra-only", "beta": 0.9}"#).is_err());
    Ok(())
}

// ---------------------------------------------------------------------------
// Orthogonality-preserved momentum (OPM), ALGORITHMS.md §4.

/// Runs `rounds` rounds of fresh random updates; returns every aggregate.
fn run_rounds(
    strategy: &mut dyn Strategy,
    global: &fedcmp_core::ParamSet,
    seed: u64,
    rounds: usize,
) -> TestResult<Vec<fedcmp_strategy::Aggregate>> {
    let mut g = Gauss(seed);
    let mut global = global.clone();
    let mut out = Vec::new();
    for t in 0..rounds {
        let updates = round_updates(&mut g, &global, &[0, 2, 5])?;
        let a = strategy.aggregate(t as u64, &global, &updates)?;
        global = a.params.clone();
        out.push(a);
    }
    Ok(out)
}

#[test]
fn opm_with_zero_beta_is_cra_alone() -> TestResult {
    let global = wb(4, 3, &[0.1f32; 16])?;
    for extra in [
        "",
        r#", "energy": 0.7, "tau": 0.5, "residual-weight": 0.5, "confidence-power": 1.0"#,
    ] {
        let mut a = config(&format!(r#"{{"name": "fed-cmp", "beta": 0.0{extra}}}"#))?.build(8)?;
        let mut b = config(&format!(r#"{{"name": "cra-only"{extra}}}"#))?.build(8)?;
        let ra = run_rounds(a.as_mut(), &global, 17, 3)?;
        let rb = run_rounds(b.as_mut(), &global, 17, 3)?;
        for (x, y) in ra.iter().zip(&rb) {
            assert_eq!(
                crate::common::bits(&x.params),
                crate::common::bits(&y.params)
            );
        }
    }
    Ok(())
}

#[test]
fn opm_with_full_span_and_uniform_reliability_is_fedavgm() -> TestResult {
    let global = wb(4, 3, &[0.1f32; 16])?;
    let mut worst: f64 = 0.0;
    for (beta, nesterov, lr) in [(0.9, false, 1.0), (0.5, true, 0.7)] {
        let mut a = config(&format!(
            r#"{{"name": "opm-only", "beta": {beta}, "nesterov": {nesterov}, "server-lr": {lr}}}"#
        ))?
        .build(8)?;
        let mut b = config(&format!(
            r#"{{"name": "fedavgm", "momentum": {beta}, "nesterov": {nesterov}, "server-lr": {lr}}}"#
        ))?
        .build(8)?;
        let ra = run_rounds(a.as_mut(), &global, 23, 3)?;
        let rb = run_rounds(b.as_mut(), &global, 23, 3)?;
        for (x, y) in ra.iter().zip(&rb) {
            assert_eq!(x.metrics.series["cra_rank"], vec![4.0]);
            for (p, q) in x.params.flat().zip(y.params.flat()) {
                let e = f64::from((p - q).abs()) / f64::from(q.abs()).max(1.0);
                worst = worst.max(e);
                assert!(e < 1e-5, "{p} vs {q}");
            }
        }
    }
    eprintln!("opm-only vs fedavgm over 3 rounds: worst relative error {worst:e}");
    Ok(())
}

#[test]
fn momentum_outside_the_new_span_is_dropped() -> TestResult {
    let (rows, cols) = (4, 3);
    let global = wb(rows, cols, &[0.0f32; 16])?;
    // Round 0 moves rows 0-1 only, round 1 rows 2-3 only: orthogonal spans.
    let mk = |base: &fedcmp_core::ParamSet,
              rows_used: [usize; 2],
              scale: f32|
     -> TestResult<Vec<fedcmp_core::ClientUpdate>> {
        (0..3u32)
            .map(|c| {
                let mut d = vec![0.0f32; 16];
                for (i, &r) in rows_used.iter().enumerate() {
                    for j in 0..cols {
                        d[r * cols + j] = scale * (1.0 + c as f32 + (i * cols + j) as f32 * 0.37);
                    }
                }
                Ok(update(c, shifted(base, &d)?, 5 + u64::from(c), 1))
            })
            .collect()
    };
    let cfg = r#"{"name": "fed-cmp", "energy": 1.0, "tau": "inf", "beta": 0.9}"#;
    let mut s = config(cfg)?.build(8)?;
    let first = s.aggregate(0, &global, &mk(&global, [0, 1], 0.1)?)?;
    assert_eq!(first.metrics.scalars["opm_dropped_fraction"], 0.0);
    let second_updates = mk(&first.params, [2, 3], 0.05)?;
    let second = s.aggregate(1, &first.params, &second_updates)?;
    assert_eq!(second.metrics.scalars["opm_dropped_fraction"], 1.0);
    // Only this round's update was applied to the matrix: rows 0-1 unchanged.
    let mut cra = config(r#"{"name": "cra-only", "energy": 1.0, "tau": "inf"}"#)?.build(8)?;
    let alone = cra.aggregate(1, &first.params, &second_updates)?;
    let (w2, wa) = (
        &second.params.entries()[0].1.data,
        &alone.params.entries()[0].1.data,
    );
    assert_eq!(w2, wa);
    Ok(())
}

#[test]
fn basis_stays_orthonormal_and_momentum_in_its_span() -> TestResult {
    let global = wb(6, 2, &[0.1f32; 18])?;
    let mut s = config(r#"{"name": "fed-cmp", "energy": 0.8, "beta": 0.9}"#)?.build(8)?;
    let mut g = Gauss(41);
    let mut global = global;
    for t in 0..4 {
        let updates = round_updates(&mut g, &global, &[1, 3, 4])?;
        let a = s.aggregate(t, &global, &updates)?;
        global = a.params;
        let state = s.state();
        let (u, k) = (
            state.tensors["opm_basis"].get("w").ok_or("no basis")?,
            state.tensors["opm_coeffs"].get("w").ok_or("no coeffs")?,
        );
        let (rows, r) = (u.shape[0], u.shape[1]);
        let cols = k.shape[1];
        let u64s: Vec<f64> = u.data.iter().map(|&x| f64::from(x)).collect();
        let k64: Vec<f64> = k.data.iter().map(|&x| f64::from(x)).collect();
        let gram = matmul(&transpose(&u64s, rows, r), &u64s, r, rows, r);
        for i in 0..r {
            for j in 0..r {
                let e = if i == j { 1.0 } else { 0.0 };
                assert!((gram[i * r + j] - e).abs() < 1e-5, "round {t}: U^T U");
            }
        }
        let m = matmul(&u64s, &k64, rows, r, cols);
        let pm = matmul(&projector(&u64s, rows, r), &m, rows, rows, cols);
        assert!(rel_dist(&pm, &m) <= 1e-5 * ops::norm(&m), "round {t}: span");
        assert!(a.metrics.scalars.contains_key("momentum_norm"));
    }
    Ok(())
}

#[test]
fn opm_state_round_trips_bit_for_bit() -> TestResult {
    let cfg = config(r#"{"name": "fed-cmp", "energy": 0.9, "residual-weight": 0.3}"#)?;
    crate::common::resumes_bit_for_bit(&cfg, [&[0, 1, 6], &[0, 1, 6], &[0, 2, 6]])?;
    Ok(())
}

#[test]
fn fed_cmp_configs_parse_and_validate() -> TestResult {
    for json in [
        r#"{"name": "fed-cmp"}"#,
        r#"{"name": "fed-cmp", "tau": "inf", "beta": 0.5, "nesterov": true, "max-rank": 2}"#,
        r#"{"name": "opm-only"}"#,
        r#"{"name": "opm-only", "beta": 0.0}"#,
    ] {
        let c = config(json)?;
        assert_eq!(config(&serde_json::to_string(&c)?)?, c);
        assert!(c.build(4).is_ok(), "{json}");
    }
    for bad in [
        r#"{"name": "fed-cmp", "beta": 1.0}"#,
        r#"{"name": "fed-cmp", "energy": 2.0}"#,
        r#"{"name": "opm-only", "server-lr": -1.0}"#,
    ] {
        assert!(config(bad)?.build(4).is_err(), "{bad}");
    }
    assert!(config(r#"{"name": "fed-cmp", "momentum": 0.9}"#).is_err());
    assert!(config(r#"{"name": "opm-only", "energy": 0.5}"#).is_err());
    Ok(())
}

/// The server's result does not depend on the thread count: three rounds
/// of Fed-CMP on a matrix large enough for faer to split its products and
/// eigendecomposition, inside rayon pools of 1 and 3 threads, bit for bit.
#[test]
fn fed_cmp_is_bit_identical_for_any_thread_count() -> TestResult {
    let (rows, cols, clients) = (512, 96, 6);
    let mut g = Gauss(0x5eed_cafe);
    let global_values: Vec<f32> = g
        .vec(rows * cols + rows)
        .iter()
        .map(|&x| x as f32)
        .collect();
    let global = wb(rows, cols, &global_values)?;
    let rounds: Vec<Vec<fedcmp_core::ClientUpdate>> = (0..3)
        .map(|_| {
            (0..clients)
                .map(|k| {
                    let delta: Vec<f32> = g
                        .vec(rows * cols + rows)
                        .iter()
                        .map(|&x| (0.01 * x) as f32)
                        .collect();
                    Ok(update(
                        k,
                        shifted(&global, &delta)?,
                        10 + 7 * u64::from(k),
                        3,
                    ))
                })
                .collect::<TestResult<Vec<_>>>()
        })
        .collect::<TestResult<_>>()?;
    let strategy_config = config(r#"{"name": "fed-cmp", "energy": 0.9, "residual-weight": 0.3}"#)?;
    let run = |threads: usize| -> TestResult<Vec<_>> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        let outcome = pool.install(|| {
            let mut strategy = strategy_config.build(clients as usize)?;
            let mut current = global.clone();
            let mut out = Vec::new();
            for (t, updates) in rounds.iter().enumerate() {
                let agg = strategy.aggregate(t as u64, &current, updates)?;
                out.push(aggregate_bits(&agg));
                current = agg.params;
            }
            Ok::<_, fedcmp_strategy::StrategyError>(out)
        });
        Ok(outcome?)
    };
    let one = run(1)?;
    let three = run(3)?;
    assert!(one == three, "1 and 3 threads differ");
    Ok(())
}

/// The refined (f32 + f64 Rayleigh-Ritz) eigensolver against the exact one.
/// With a spectrum that has gaps (planted directions with singular values
/// 0.8^j, plus small noise) the basis and the merged update agree to 1e-7;
/// on pure noise (no gap anywhere, the subspace at the cut is not
/// determined by the data) the refined basis is still orthonormal, keeps at
/// least the requested energy, and its rank is never below the exact one.
#[test]
fn refined_eigensolver_matches_the_exact_one() -> TestResult {
    let (rows, cols, k) = (300, 80, 5);
    let mut g = Gauss(11);
    // Shared orthonormal output directions u_j (Gram-Schmidt).
    let dirs = 24;
    let mut u: Vec<Vec<f64>> = Vec::new();
    while u.len() < dirs {
        let mut v = g.vec(rows);
        for w in &u {
            let d = ops::dot(&v, w)?;
            ops::axpy(-d, w, &mut v)?;
        }
        let n = ops::norm(&v);
        ops::scale(1.0 / n, &mut v);
        u.push(v);
    }
    let planted: Vec<Vec<f64>> = (0..k)
        .map(|_| {
            let mut d: Vec<f64> = g.vec(rows * cols).iter().map(|x| 1e-4 * x).collect();
            for (j, uj) in u.iter().enumerate() {
                let s = 0.8f64.powi(j as i32);
                let v = g.vec(cols);
                for r in 0..rows {
                    for c in 0..cols {
                        d[r * cols + c] += s * uj[r] * v[c] / (cols as f64).sqrt();
                    }
                }
            }
            d
        })
        .collect();
    let noise: Vec<Vec<f64>> = (0..k).map(|_| g.vec(rows * cols)).collect();
    let p = weights(&[10, 30, 20, 25, 15]);
    let with = |solver: Eigensolver, energy: f64, cap: Option<usize>| {
        let mut prm = params(energy, 0.5, 1.0, 0.3);
        prm.eigensolver = solver;
        prm.max_rank = cap;
        prm
    };
    // The exact and the refined basis of the same deltas.
    let both = |deltas: &[Vec<f64>], energy: f64, cap: Option<usize>| -> TestResult<_> {
        let refs: Vec<&[f64]> = deltas.iter().map(Vec::as_slice).collect();
        let basis = |solver| canonical_basis(&refs, &p, rows, cols, &with(solver, energy, cap));
        Ok((basis(Eigensolver::Exact)?, basis(Eigensolver::Refined)?))
    };
    for (energy, cap) in [(0.9, None), (0.99, None), (0.99, Some(5))] {
        let (exact, refined) = both(&planted, energy, cap)?;
        assert!(refined.refined && !exact.refined);
        assert_eq!(exact.rank, refined.rank, "energy {energy} cap {cap:?}");
        let r = exact.rank;
        let d = rel_dist(
            &projector(&refined.u, rows, r),
            &projector(&exact.u, rows, r),
        );
        assert!(
            d < 1e-7,
            "planted, energy {energy}: subspace distance {d:e}"
        );
        assert!((refined.energy_kept() - exact.energy_kept()).abs() < 1e-9);
        let merge = |solver| merged(&planted, &p, rows, cols, &with(solver, energy, cap));
        let e = rel_err(&merge(Eigensolver::Refined)?, &merge(Eigensolver::Exact)?);
        assert!(e < 1e-7, "planted, energy {energy}: merged differ by {e:e}");

        // Pure noise needs most of the dimension for high energies (where
        // the refined solver declines by design): ask for less.
        let energy = energy - 0.4;
        let (exact, refined) = both(&noise, energy, cap)?;
        assert!(refined.refined, "noise, energy {energy}: fell back");
        assert!(refined.rank >= exact.rank);
        if cap.is_none() {
            assert!(refined.energy_kept() >= energy - 1e-12);
        }
        let r = refined.rank;
        let gram = matmul(&transpose(&refined.u, rows, r), &refined.u, r, rows, r);
        for i in 0..r {
            for j in 0..r {
                let e = if i == j { 1.0 } else { 0.0 };
                assert!((gram[i * r + j] - e).abs() < 1e-10);
            }
        }
    }
    // Most of the dimension wanted: the refined solver declines.
    let refs: Vec<&[f64]> = noise.iter().map(Vec::as_slice).collect();
    let all = canonical_basis(
        &refs,
        &p,
        rows,
        cols,
        &with(Eigensolver::Refined, 0.99, None),
    )?;
    assert!(!all.refined && all.rank > rows / 2);
    Ok(())
}
