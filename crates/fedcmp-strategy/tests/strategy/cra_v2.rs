//! CRA v2 (ALGORITHMS.md §3.1): leave-one-out agreement, the shrinkage
//! gain and basis momentum, with the properties that pin them, and the
//! interference measurement that motivated them.

use fedcmp_strategy::cra::{
    merge_matrix, merge_matrix_with, reliability, Agreement, CraParams, Gain, MergedMatrix,
};
use fedcmp_strategy::ops;

use crate::common::{aggregate_bits, config, wb, TestResult};
use crate::fedcmp::{
    matmul, random_orthogonal, rel_err, round_updates, transpose, weights, Gauss, SHAPES,
};

/// v2 as §3.1 lists it: leave-one-out, shrinkage, nothing deleted.
fn v2(tau: f64) -> CraParams {
    CraParams {
        energy: 1.0,
        tau,
        residual_weight: 1.0,
        agreement: Agreement::LeaveOneOut,
        gain: Gain::Shrinkage,
        ..CraParams::default()
    }
}

fn merged_with(
    deltas: &[Vec<f64>],
    p: &[f64],
    (rows, cols): (usize, usize),
    params: &CraParams,
    previous: Option<&[f32]>,
) -> TestResult<MergedMatrix> {
    let refs: Vec<&[f64]> = deltas.iter().map(Vec::as_slice).collect();
    Ok(merge_matrix_with(&refs, p, rows, cols, params, previous)?)
}

#[test]
fn a_direction_one_client_uses_alone_is_not_rewarded() -> TestResult {
    let own: &[f64] = &[0.3, -1.2, 2.0, 0.7];
    let zero: &[f64] = &[0.0; 4];
    for p in [
        vec![0.25; 4],
        vec![0.1, 0.4, 0.3, 0.2],
        vec![0.7, 0.1, 0.1, 0.1],
    ] {
        for alone in 0..4 {
            let rows: Vec<&[f64]> = (0..4)
                .map(|k| if k == alone { own } else { zero })
                .collect();
            for tau in [0.05, 0.2, 1.0, 10.0] {
                let r = reliability(&rows, &p, &v2(tau))?;
                assert!(
                    r.alpha[alone] <= p[alone],
                    "{p:?} alone {alone} tau {tau}: {r:?}"
                );
                assert_eq!(r.gain, 0.0, "{p:?} alone {alone} tau {tau}");
                assert!(r.fused.iter().all(|&x| x == 0.0));
                // v1 rewards it: agreement 1 with a consensus that is its own.
                let mut v1 = v2(tau);
                v1.agreement = Agreement::Consensus;
                v1.gain = Gain::None;
                let r1 = reliability(&rows, &p, &v1)?;
                assert!(
                    r1.alpha[alone] > p[alone],
                    "v1 {p:?} alone {alone} tau {tau}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn identical_clients_get_gain_one_and_the_exact_delta() -> TestResult {
    let mut g = Gauss(31);
    for (rows, cols, k) in SHAPES {
        let d = g.vec(rows * cols);
        let deltas = vec![d.clone(); k];
        let p = weights(&(0..k as u64).map(|i| 2 * i + 3).collect::<Vec<_>>());
        for tau in [0.1, 1.0, f64::INFINITY] {
            for energy in [1.0, 0.6] {
                let prm = CraParams { energy, ..v2(tau) };
                let m = merged_with(&deltas, &p, (rows, cols), &prm, None)?;
                for gain in &m.gain {
                    assert!(
                        (gain - 1.0).abs() < 1e-12,
                        "{rows}x{cols} tau {tau}: {gain}"
                    );
                }
                let got = m.dense(rows, cols)?;
                assert!(
                    rel_err(&got, &d) < 1e-9,
                    "{rows}x{cols} tau {tau} energy {energy}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn without_gain_at_infinite_temperature_any_agreement_is_fedavg() -> TestResult {
    let mut g = Gauss(12);
    for (rows, cols, k) in SHAPES {
        let deltas: Vec<Vec<f64>> = (0..k).map(|_| g.vec(rows * cols)).collect();
        let p = weights(&(1..=k as u64).map(|i| 5 * i).collect::<Vec<_>>());
        let mean = ops::weighted_sum(&deltas, &p)?;
        for agreement in [Agreement::Consensus, Agreement::LeaveOneOut] {
            for residual_weight in [0.0, 1.0] {
                let prm = CraParams {
                    agreement,
                    gain: Gain::None,
                    residual_weight,
                    ..v2(f64::INFINITY)
                };
                let got = merged_with(&deltas, &p, (rows, cols), &prm, None)?.dense(rows, cols)?;
                assert!(rel_err(&got, &mean) < 1e-9, "{rows}x{cols} {agreement:?}");
            }
        }
    }
    Ok(())
}

/// `Q G Q^T` for row-major `n x n` matrices.
fn conjugate(q: &[f64], gram: &[f64], n: usize) -> Vec<f64> {
    matmul(&matmul(q, gram, n, n, n), &transpose(q, n, n), n, n, n)
}

#[test]
fn v2_rotates_with_the_output_space_and_ignores_client_order() -> TestResult {
    let mut g = Gauss(808);
    for (rows, cols, k) in SHAPES {
        let q = random_orthogonal(rows, &mut g);
        let p = weights(&(0..k as u64).map(|i| 4 + i * i).collect::<Vec<_>>());
        let first: Vec<Vec<f64>> = (0..k).map(|_| g.vec(rows * cols)).collect();
        let second: Vec<Vec<f64>> = (0..k).map(|_| g.vec(rows * cols)).collect();
        let rotate = |ds: &[Vec<f64>]| -> Vec<Vec<f64>> {
            ds.iter().map(|d| matmul(&q, d, rows, rows, cols)).collect()
        };
        for prm in [
            v2(1.0),
            CraParams {
                energy: 0.8,
                residual_weight: 0.5,
                ..v2(0.3)
            },
            CraParams {
                basis_beta: 0.8,
                ..v2(0.5)
            },
            CraParams {
                basis_beta: 0.5,
                energy: 0.7,
                ..v2(2.0)
            },
        ] {
            // Round one, then round two over round one's averaged Gram.
            let a1 = merged_with(&first, &p, (rows, cols), &prm, None)?;
            let b1 = merged_with(&rotate(&first), &p, (rows, cols), &prm, None)?;
            let e1 = rel_err(
                &b1.dense(rows, cols)?,
                &matmul(&q, &a1.dense(rows, cols)?, rows, rows, cols),
            );
            assert!(e1 < 1e-9, "{rows}x{cols} {prm:?} round 1: {e1}");
            let prev = a1.averaged.as_ref().map(|a| a.gram.clone());
            let prev_a: Option<Vec<f32>> =
                prev.as_ref().map(|g| g.iter().map(|&x| x as f32).collect());
            let prev_b: Option<Vec<f32>> = prev
                .as_ref()
                .map(|g| conjugate(&q, g, rows).iter().map(|&x| x as f32).collect());
            let a2 = merged_with(&second, &p, (rows, cols), &prm, prev_a.as_deref())?;
            let b2 = merged_with(&rotate(&second), &p, (rows, cols), &prm, prev_b.as_deref())?;
            let e2 = rel_err(
                &b2.dense(rows, cols)?,
                &matmul(&q, &a2.dense(rows, cols)?, rows, rows, cols),
            );
            // The previous Gram is stored in f32: rotating before or after
            // rounding differs by its rounding.
            let tol = if prm.basis_beta > 0.0 { 1e-5 } else { 1e-9 };
            assert!(e2 < tol, "{rows}x{cols} {prm:?} round 2: {e2}");
            // Client order.
            let mut order: Vec<usize> = (0..k).collect();
            order.reverse();
            let pr: Vec<f64> = order.iter().map(|&i| p[i]).collect();
            let sr: Vec<Vec<f64>> = order.iter().map(|&i| second[i].clone()).collect();
            let c2 = merged_with(&sr, &pr, (rows, cols), &prm, prev_a.as_deref())?;
            assert!(rel_err(&c2.dense(rows, cols)?, &a2.dense(rows, cols)?) < 1e-9);
        }
    }
    Ok(())
}

#[test]
fn client_order_does_not_change_a_v2_round_bit_for_bit() -> TestResult {
    let mut g = Gauss(4242);
    let (rows, cols) = (6, 4);
    let mut global = wb(rows, cols, &vec![0.25f32; rows * cols + rows])?;
    let cfg = config(
        r#"{"name": "fed-cmp", "agreement": "leave-one-out", "gain": "shrinkage", "energy": 1.0, "residual-weight": 1.0, "basis-beta": 0.6}"#,
    )?;
    let (mut a, mut b) = (cfg.build(8)?, cfg.build(8)?);
    for t in 0..3 {
        let updates = round_updates(&mut g, &global, &[4, 1, 7, 2])?;
        let mut reversed = updates.clone();
        reversed.reverse();
        let x = a.aggregate(t, &global, &updates)?;
        let y = b.aggregate(t, &global, &reversed)?;
        assert_eq!(aggregate_bits(&x), aggregate_bits(&y), "round {t}");
        for key in ["cra_shared_share", "cra_gain_mean"] {
            assert!(x.metrics.scalars.contains_key(key), "{key}");
        }
        assert_eq!(x.metrics.series["cra_gain_quantiles"].len(), 7);
        assert_eq!(x.metrics.series.contains_key("cra_basis_drift"), t > 0);
        global = x.params;
    }
    Ok(())
}

#[test]
fn zero_basis_beta_is_no_basis_momentum() -> TestResult {
    let mut g = Gauss(5150);
    for (rows, cols, k) in SHAPES {
        let deltas: Vec<Vec<f64>> = (0..k).map(|_| g.vec(rows * cols)).collect();
        let p = weights(&(0..k as u64).map(|i| i + 1).collect::<Vec<_>>());
        let stale: Vec<f32> = g.vec(rows * rows).iter().map(|&x| x as f32).collect();
        for prm in [
            v2(1.0),
            CraParams {
                energy: 0.7,
                ..v2(0.5)
            },
        ] {
            let refs: Vec<&[f64]> = deltas.iter().map(Vec::as_slice).collect();
            let with = merge_matrix_with(&refs, &p, rows, cols, &prm, Some(&stale))?;
            let without = merge_matrix(&refs, &p, rows, cols, &prm)?;
            assert_eq!(with, without, "{rows}x{cols}");
            assert!(with.averaged.is_none());
        }
    }
    let global = wb(5, 3, &[0.2f32; 20])?;
    let mut s =
        config(r#"{"name": "fed-cmp", "gain": "shrinkage", "basis-beta": 0.0}"#)?.build(8)?;
    let updates = round_updates(&mut g, &global, &[0, 1, 2])?;
    s.aggregate(0, &global, &updates)?;
    assert!(!s.state().tensors.contains_key("cra_basis_gram"));
    Ok(())
}

#[test]
fn the_averaged_gram_is_the_state_and_survives_save_and_load() -> TestResult {
    let (rows, cols) = (5, 3);
    let beta = 0.7;
    let mut global = wb(rows, cols, &[0.2f32; 20])?;
    let cfg = config(&format!(
        r#"{{"name": "fed-cmp", "agreement": "leave-one-out", "gain": "shrinkage", "energy": 0.9, "basis-beta": {beta}}}"#
    ))?;
    let mut a = cfg.build(8)?;
    let mut g = Gauss(90);
    let mut expected: Option<Vec<f64>> = None;
    for t in 0..2 {
        let updates = round_updates(&mut g, &global, &[0, 1, 6])?;
        // The round's Gram from the deltas, independently.
        let input = fedcmp_strategy::round::RoundInput::new(t, &global, &updates)?;
        let mut round_gram = vec![0.0; rows * rows];
        for (d, w) in input.deltas.iter().zip(&input.sample_weights) {
            let m = &d[..rows * cols];
            let ddt = matmul(m, &transpose(m, rows, cols), rows, cols, rows);
            ops::axpy(*w, &ddt, &mut round_gram)?;
        }
        if let Some(prev) = &expected {
            ops::axpy(beta, prev, &mut round_gram)?;
        }
        global = a.aggregate(t, &global, &updates)?.params;
        let state = a.state();
        let stored = state.tensors["cra_basis_gram"]
            .get("w")
            .ok_or("no Gram for w")?;
        assert_eq!(stored.shape, vec![rows, rows]);
        let stored64: Vec<f64> = stored.data.iter().map(|&x| f64::from(x)).collect();
        assert!(rel_err(&stored64, &round_gram) < 1e-6, "round {t}");
        // The next round starts from the stored (f32) matrix.
        expected = Some(stored64);
    }
    let state = a.state();
    let restored: fedcmp_strategy::StrategyState =
        serde_json::from_str(&serde_json::to_string(&state)?)?;
    assert_eq!(restored, state);
    let mut b = cfg.build(8)?;
    b.load_state(restored)?;
    let updates = round_updates(&mut g, &global, &[0, 2, 6])?;
    let x = a.aggregate(2, &global, &updates)?;
    let y = b.aggregate(2, &global, &updates)?;
    assert_eq!(aggregate_bits(&x), aggregate_bits(&y));
    assert_eq!(a.state(), b.state());
    Ok(())
}

#[test]
fn basis_momentum_lets_a_recurring_direction_outrank_one_round_noise() -> TestResult {
    // Every round each client moves output row 0 a little (the recurring
    // direction) and, more strongly, one row that changes every round.
    let (rows, cols, k) = (8, 4, 3);
    let p = weights(&[10, 10, 10]);
    let top_row = |m: &MergedMatrix| -> usize {
        (0..rows)
            .max_by(|&a, &b| {
                m.basis[a * m.rank]
                    .abs()
                    .total_cmp(&m.basis[b * m.rank].abs())
            })
            .unwrap_or(0)
    };
    for (beta, recurring_wins_from) in [(0.0, None), (0.9, Some(3))] {
        let prm = CraParams {
            energy: 1.0,
            max_rank: Some(1),
            basis_beta: beta,
            ..v2(1.0)
        };
        let mut previous: Option<Vec<f32>> = None;
        for t in 0..6usize {
            let deltas: Vec<Vec<f64>> = (0..k)
                .map(|c| {
                    let mut d = vec![0.0; rows * cols];
                    for j in 0..cols {
                        d[j] = 1.0 / (cols as f64).sqrt();
                        d[(1 + t % 7) * cols + j] = 1.5 * if (j + c) % 2 == 0 { 0.5 } else { -0.5 };
                    }
                    d
                })
                .collect();
            let m = merged_with(&deltas, &p, (rows, cols), &prm, previous.as_deref())?;
            let wins = recurring_wins_from.is_some_and(|from| t + 1 >= from);
            assert_eq!(top_row(&m) == 0, wins, "beta {beta} round {t}");
            previous = m
                .averaged
                .map(|a| a.gram.iter().map(|&x| x as f32).collect());
        }
    }
    Ok(())
}

/// Energy of the rows `from..to` of a row-major `rows x cols` matrix.
fn rows_energy(m: &[f64], cols: usize, from: usize, to: usize) -> f64 {
    m[from * cols..to * cols].iter().map(|x| x * x).sum()
}

#[test]
fn client_specific_directions_are_suppressed_and_shared_ones_kept() -> TestResult {
    // §3.1's measurement in small: K = 8 equal clients share a rank-2
    // signal in output rows 0-1; each also moves its own row (2 + k) with
    // about 3x the shared norm. Shared and own parts use disjoint input
    // columns, so each own row is an exact direction of the basis.
    let (rows, cols, k) = (12, 6, 8usize);
    let mut g = Gauss(3);
    let shared: Vec<f64> = {
        let mut s = vec![0.0; rows * cols];
        for r in 0..2 {
            for c in 0..3 {
                s[r * cols + c] = g.next();
            }
        }
        s
    };
    let shared_norm = ops::norm(&shared);
    let deltas: Vec<Vec<f64>> = (0..k)
        .map(|c| {
            let mut d = shared.clone();
            let own: Vec<f64> = (0..3).map(|_| g.next()).collect();
            let scale = 3.0 * shared_norm * (1.0 + 0.1 * c as f64) / ops::norm(&own);
            for (j, x) in own.iter().enumerate() {
                d[(2 + c) * cols + 3 + j] = scale * x;
            }
            d
        })
        .collect();
    let p = vec![1.0 / k as f64; k];
    let fedavg = ops::weighted_sum(&deltas, &p)?;
    let own_fedavg = rows_energy(&fedavg, cols, 2, rows);
    let shared_fedavg = rows_energy(&fedavg, cols, 0, 2);
    let own_of = |prm: &CraParams| -> TestResult<(f64, f64)> {
        let m = merged_with(&deltas, &p, (rows, cols), prm, None)?.dense(rows, cols)?;
        Ok((rows_energy(&m, cols, 2, rows), rows_energy(&m, cols, 0, 2)))
    };
    // v1 at tau = 1 (and energy 0.95, its default) gives the client-specific
    // rows MORE energy than FedAvg does.
    let v1 = CraParams::default();
    let (own_v1, _) = own_of(&v1)?;
    eprintln!(
        "client-specific energy / FedAvg's: v1 {:.3}",
        own_v1 / own_fedavg
    );
    assert!(
        own_v1 > 1.5 * own_fedavg,
        "v1 {own_v1} vs fedavg {own_fedavg}"
    );
    // v2 removes them and keeps the shared signal whole.
    let (own_v2, shared_v2) = own_of(&v2(1.0))?;
    eprintln!(
        "client-specific energy / FedAvg's: v2 {:.3e}; shared kept {:.6}",
        own_v2 / own_fedavg,
        shared_v2 / shared_fedavg
    );
    assert!(
        own_v2 < 1e-12 * own_fedavg,
        "v2 {own_v2} vs fedavg {own_fedavg}"
    );
    assert!((shared_v2 / shared_fedavg - 1.0).abs() < 1e-9);
    // The gain alone (v1 agreement) already removes them.
    let gain_only = CraParams {
        agreement: Agreement::Consensus,
        ..v2(1.0)
    };
    assert!(own_of(&gain_only)?.0 < 1e-12 * own_fedavg);
    Ok(())
}

#[test]
fn the_gain_matches_its_closed_form_for_signal_plus_noise() -> TestResult {
    // c_k = mu + n_k, n_k independent with total energy s2 each, K equal
    // clients: g -> ||mu||^2 / (||mu||^2 + s2 / K) (ALGORITHMS.md §3.1).
    let (width, k) = (40_000, 8usize);
    let mut g = Gauss(2718);
    let mu: Vec<f64> = g.vec(width);
    let mu_sq: f64 = mu.iter().map(|x| x * x).sum();
    for ratio in [0.5, 2.0, 8.0] {
        // ||mu||^2 = ratio * s2 / K.
        let s2 = mu_sq * k as f64 / ratio;
        let sigma = (s2 / width as f64).sqrt();
        let rows: Vec<Vec<f64>> = (0..k)
            .map(|_| mu.iter().map(|m| m + sigma * g.next()).collect())
            .collect();
        let refs: Vec<&[f64]> = rows.iter().map(Vec::as_slice).collect();
        let r = reliability(&refs, &vec![1.0 / k as f64; k], &v2(1.0))?;
        let predicted = ratio / (ratio + 1.0);
        eprintln!(
            "gain at ||mu||^2 = {ratio} s2/K: {:.4} (closed form {predicted:.4})",
            r.gain
        );
        assert!(
            (r.gain - predicted).abs() < 0.02,
            "{ratio}: {} vs {predicted}",
            r.gain
        );
    }
    // Independent contributions (no shared mean): ~0.
    let rows: Vec<Vec<f64>> = (0..k).map(|_| g.vec(width)).collect();
    let refs: Vec<&[f64]> = rows.iter().map(Vec::as_slice).collect();
    let r = reliability(&refs, &vec![1.0 / k as f64; k], &v2(1.0))?;
    assert!(r.gain < 0.02, "independent: {}", r.gain);
    Ok(())
}

#[test]
fn v2_knobs_parse_validate_and_round_trip() -> TestResult {
    let c = config(
        r#"{"name": "cra-only", "agreement": "leave-one-out", "gain": "shrinkage", "basis-beta": 0.5}"#,
    )?;
    assert_eq!(config(&serde_json::to_string(&c)?)?, c);
    assert!(c.build(4).is_ok());
    for bad in [
        r#"{"name": "cra-only", "basis-beta": 1.0}"#,
        r#"{"name": "cra-only", "basis-beta": -0.1}"#,
    ] {
        assert!(config(bad)?.build(4).is_err(), "{bad} was accepted");
    }
    for unknown in [
        r#"{"name": "cra-only", "agreement": "majority"}"#,
        r#"{"name": "cra-only", "gain": "wiener"}"#,
    ] {
        assert!(config(unknown).is_err(), "{unknown} parsed");
    }
    Ok(())
}
