//! The candidate rules of ALGORITHMS-NOTES.md: the bias-corrected EMA form
//! of server momentum (FedAvgM and OPM) and CRA's temporal gain, with the
//! properties that pin them.

use fedcmp_core::ParamSet;
use fedcmp_strategy::cra::{merge_matrix_history, reliability_with, CraParams, Gain, MergedMatrix};
use fedcmp_strategy::{ops, Aggregate, Strategy, StrategyConfig};

use crate::common::{bits, config, resumes_bit_for_bit, shifted, step, update, wb, TestResult};
use crate::fedcmp::{
    matmul, random_orthogonal, rel_err, round_updates, transpose, weights, Gauss, SHAPES,
};

// ---------------------------------------------------------------------------
// Bias-corrected EMA momentum (ALGORITHMS-NOTES.md §2).

/// Every client sends `global + delta_t` in round `t`; returns the
/// aggregates.
fn run_deltas(
    strategy: &mut dyn Strategy,
    global: &ParamSet,
    deltas: &[Vec<f32>],
) -> TestResult<Vec<Aggregate>> {
    let mut global = global.clone();
    let mut out = Vec::new();
    for (t, d) in deltas.iter().enumerate() {
        let updates = vec![
            update(0, shifted(&global, d)?, 4, 2),
            update(3, shifted(&global, d)?, 9, 2),
        ];
        let a = strategy.aggregate(t as u64, &global, &updates)?;
        global = a.params.clone();
        out.push(a);
    }
    Ok(out)
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn ema_steps_are_the_bias_corrected_average_of_past_updates() -> TestResult {
    // Closed form: after updates D_1..D_t, the step is
    // eta (1 - beta) sum_s beta^(t-s) D_s / (1 - beta^t). (OPM equals it
    // where its span is full, tested below; here each round's span is
    // one delta's, and OPM drops the rest by design.)
    let global = wb(3, 2, &[0.5f32; 9])?;
    let mut g = Gauss(5);
    let deltas: Vec<Vec<f32>> = (0..4)
        .map(|_| g.vec(9).iter().map(|x| (0.01 * x) as f32).collect())
        .collect();
    for (beta, lr) in [(0.9f64, 1.0f64), (0.5, 0.3)] {
        let cfg = config(&format!(
            r#"{{"name": "fedavgm", "momentum": {beta}, "server-lr": {lr}, "momentum-form": "ema"}}"#
        ))?;
        let aggregates = run_deltas(cfg.build(8)?.as_mut(), &global, &deltas)?;
        let mut before = global.clone();
        for (t, a) in aggregates.iter().enumerate() {
            let mut expected = vec![0.0; 9];
            for (s, d) in deltas[..=t].iter().enumerate() {
                let w = (1.0 - beta) * beta.powi((t - s) as i32);
                for (e, x) in expected.iter_mut().zip(d) {
                    *e += w * f64::from(*x);
                }
            }
            let correction = 1.0 - beta.powi(t as i32 + 1);
            expected.iter_mut().for_each(|e| *e *= lr / correction);
            let got = step(&before, &a.params);
            // f32 parameters: the deltas are read back at ~1e-8.
            assert!(
                max_abs_diff(&got, &expected) < 2e-7,
                "beta {beta} round {t}: {got:?} vs {expected:?}"
            );
            before = a.params.clone();
        }
    }
    Ok(())
}

#[test]
fn ema_with_a_constant_update_steps_by_it_from_the_first_round() -> TestResult {
    let global = wb(2, 2, &[0.0f32; 6])?;
    let d: Vec<f32> = vec![0.01, -0.02, 0.03, 0.005, -0.01, 0.02];
    let deltas = vec![d.clone(); 6];
    let ema = config(r#"{"name": "fedavgm", "momentum-form": "ema"}"#)?;
    let heavy = config(r#"{"name": "fedavgm"}"#)?;
    let (mut before_e, mut before_h) = (global.clone(), global.clone());
    let re = run_deltas(ema.build(8)?.as_mut(), &global, &deltas)?;
    let rh = run_deltas(heavy.build(8)?.as_mut(), &global, &deltas)?;
    let wanted: Vec<f64> = d.iter().map(|&x| f64::from(x)).collect();
    for (t, (a, b)) in re.iter().zip(&rh).enumerate() {
        let se = step(&before_e, &a.params);
        assert!(max_abs_diff(&se, &wanted) < 1e-7, "ema round {t}: {se:?}");
        // Heavy ball's step grows towards 1 / (1 - beta) = 10 times it.
        let sh = step(&before_h, &b.params);
        let growth = ops::norm(&sh) / ops::norm(&wanted);
        let closed = (1.0 - 0.9f64.powi(t as i32 + 1)) / (1.0 - 0.9);
        assert!(
            (growth - closed).abs() < 1e-4,
            "heavy ball round {t}: {growth}"
        );
        before_e = a.params.clone();
        before_h = b.params.clone();
    }
    Ok(())
}

#[test]
fn ema_with_zero_beta_is_fedavg() -> TestResult {
    let global = wb(4, 3, &[0.1f32; 16])?;
    for name in ["fedavgm", "opm-only"] {
        let field = if name == "fedavgm" {
            "momentum"
        } else {
            "beta"
        };
        let mut a = config(&format!(
            r#"{{"name": "{name}", "{field}": 0.0, "server-lr": 0.7, "momentum-form": "ema"}}"#
        ))?
        .build(8)?;
        let mut b = config(r#"{"name": "fedavg", "server-lr": 0.7}"#)?.build(8)?;
        let mut g = Gauss(8);
        let mut global = global.clone();
        for t in 0..3 {
            let updates = round_updates(&mut g, &global, &[0, 2, 5])?;
            let x = a.aggregate(t, &global, &updates)?;
            let y = b.aggregate(t, &global, &updates)?;
            for (p, q) in x.params.flat().zip(y.params.flat()) {
                assert!((p - q).abs() <= 1e-6 * q.abs().max(1.0), "{name} round {t}");
            }
            global = y.params;
        }
    }
    Ok(())
}

#[test]
fn opm_ema_with_full_span_and_uniform_reliability_is_fedavgm_ema() -> TestResult {
    let global = wb(4, 3, &[0.1f32; 16])?;
    for (beta, lr) in [(0.9, 1.0), (0.5, 0.3)] {
        let mut a = config(&format!(
            r#"{{"name": "opm-only", "beta": {beta}, "server-lr": {lr}, "momentum-form": "ema"}}"#
        ))?
        .build(8)?;
        let mut b = config(&format!(
            r#"{{"name": "fedavgm", "momentum": {beta}, "server-lr": {lr}, "momentum-form": "ema"}}"#
        ))?
        .build(8)?;
        let mut g = Gauss(23);
        let mut global = global.clone();
        for t in 0..4 {
            let updates = round_updates(&mut g, &global, &[0, 2, 5])?;
            let x = a.aggregate(t, &global, &updates)?;
            let y = b.aggregate(t, &global, &updates)?;
            assert_eq!(x.metrics.series["cra_rank"], vec![4.0]);
            for (p, q) in x.params.flat().zip(y.params.flat()) {
                let e = f64::from((p - q).abs()) / f64::from(q.abs()).max(1.0);
                assert!(e < 1e-5, "beta {beta} round {t}: {p} vs {q}");
            }
            global = y.params;
        }
    }
    Ok(())
}

#[test]
fn ema_state_round_trips_and_a_missing_count_is_refused() -> TestResult {
    for (json, key) in [
        (
            r#"{"name": "fedavgm", "momentum-form": "ema"}"#,
            "momentum_count",
        ),
        (
            r#"{"name": "fed-cmp", "energy": 0.9, "momentum-form": "ema"}"#,
            "opm_momentum_count",
        ),
    ] {
        let cfg = config(json)?;
        let state = resumes_bit_for_bit(&cfg, [&[0, 1, 6], &[0, 2], &[1, 2, 6]])?;
        assert_eq!(state.scalars.get(key), Some(&2.0), "{json}");
        let mut broken = state.clone();
        broken.scalars.remove(key);
        let err = cfg.build(8)?.load_state(broken).err().ok_or("accepted")?;
        assert!(err.to_string().contains(key), "{err}");
    }
    // Heavy ball keeps no count: its states are what they were.
    let heavy = resumes_bit_for_bit(&config(r#"{"name": "fedavgm"}"#)?, [&[0], &[1], &[2]])?;
    assert!(heavy.scalars.is_empty());
    Ok(())
}

#[test]
fn momentum_form_is_validated_and_left_out_when_default() -> TestResult {
    for json in [
        r#"{"name": "fedavgm", "nesterov": true, "momentum-form": "ema"}"#,
        r#"{"name": "fed-cmp", "nesterov": true, "momentum-form": "ema"}"#,
        r#"{"name": "opm-only", "nesterov": true, "momentum-form": "ema"}"#,
    ] {
        let err = config(json)?.build(8).err().ok_or("accepted")?;
        assert!(err.to_string().contains("`nesterov`"), "{json}: {err}");
    }
    let bad: Result<StrategyConfig, _> =
        serde_json::from_str(r#"{"name": "fedavgm", "momentum-form": "adam"}"#);
    assert!(bad.is_err());
    // Settings written before the option existed serialise (and hash) alike.
    for json in [
        r#"{"name": "fedavgm"}"#,
        r#"{"name": "fed-cmp"}"#,
        r#"{"name": "opm-only"}"#,
    ] {
        let text = serde_json::to_string(&config(json)?)?;
        assert!(!text.contains("momentum-form"), "{text}");
    }
    let text = serde_json::to_string(&config(r#"{"name": "fed-cmp", "momentum-form": "ema"}"#)?)?;
    assert!(text.contains(r#""momentum-form":"ema""#), "{text}");
    Ok(())
}

// ---------------------------------------------------------------------------
// CRA's temporal gain (ALGORITHMS-NOTES.md §1).

/// The temporal gain alone: every direction kept, data weights.
fn temporal() -> CraParams {
    CraParams {
        energy: 1.0,
        tau: f64::INFINITY,
        gain: Gain::Temporal,
        ..CraParams::default()
    }
}

fn merged(
    deltas: &[Vec<f64>],
    past: &[Option<Vec<f64>>],
    p: &[f64],
    (rows, cols): (usize, usize),
    params: &CraParams,
) -> TestResult<MergedMatrix> {
    let refs: Vec<&[f64]> = deltas.iter().map(Vec::as_slice).collect();
    let past32: Vec<Option<Vec<f32>>> = past
        .iter()
        .map(|d| d.as_ref().map(|d| d.iter().map(|&x| x as f32).collect()))
        .collect();
    let past_refs: Vec<Option<&[f32]>> = past32.iter().map(|d| d.as_deref()).collect();
    Ok(merge_matrix_history(
        &refs, p, rows, cols, params, None, &past_refs,
    )?)
}

/// `x` rounded through f32, as a stored past delta is.
fn f32_round(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v as f32)).collect()
}

#[test]
fn without_a_past_or_when_every_client_repeats_itself_it_is_fedavg() -> TestResult {
    let mut g = Gauss(14);
    for (rows, cols, k) in SHAPES {
        let deltas: Vec<Vec<f64>> = (0..k).map(|_| g.vec(rows * cols)).collect();
        let p = weights(&(1..=k as u64).map(|i| 3 * i + 1).collect::<Vec<_>>());
        let mean = ops::weighted_sum(&deltas, &p)?;
        let none = merged(&deltas, &vec![None; k], &p, (rows, cols), &temporal())?;
        assert!(
            rel_err(&none.dense(rows, cols)?, &mean) < 1e-9,
            "{rows}x{cols} no past"
        );
        // Each client's past is a positive multiple of its delta (rounded
        // to f32 as stored): every gain is 1 up to that rounding.
        let past: Vec<Option<Vec<f64>>> = deltas
            .iter()
            .enumerate()
            .map(|(i, d)| Some(d.iter().map(|x| x * (0.5 + i as f64)).collect()))
            .collect();
        let m = merged(&deltas, &past, &p, (rows, cols), &temporal())?;
        assert!(
            rel_err(&m.dense(rows, cols)?, &mean) < 1e-6,
            "{rows}x{cols} repeat"
        );
        assert!(
            m.gain.iter().all(|g| (g - 1.0).abs() < 1e-6),
            "{:?}",
            m.gain
        );
    }
    Ok(())
}

#[test]
fn a_client_that_reverses_itself_contributes_nothing() -> TestResult {
    let mut g = Gauss(15);
    for (rows, cols, k) in SHAPES {
        let deltas: Vec<Vec<f64>> = (0..k).map(|_| f32_round(&g.vec(rows * cols))).collect();
        let p = weights(&(1..=k as u64).map(|i| 2 * i + 5).collect::<Vec<_>>());
        for flipped in 0..k {
            let past: Vec<Option<Vec<f64>>> = deltas
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let sign = if i == flipped { -2.0 } else { 3.0 };
                    Some(d.iter().map(|x| sign * x).collect())
                })
                .collect();
            let m = merged(&deltas, &past, &p, (rows, cols), &temporal())?;
            let mut others = vec![0.0; rows * cols];
            for (i, d) in deltas.iter().enumerate() {
                if i != flipped {
                    ops::axpy(p[i], d, &mut others)?;
                }
            }
            assert!(
                rel_err(&m.dense(rows, cols)?, &others) < 1e-9,
                "{rows}x{cols} flipped {flipped}"
            );
        }
    }
    Ok(())
}

#[test]
fn the_gain_ignores_the_scale_of_the_past_and_follows_rotations() -> TestResult {
    let mut g = Gauss(16);
    for (rows, cols, k) in SHAPES {
        let deltas: Vec<Vec<f64>> = (0..k).map(|_| g.vec(rows * cols)).collect();
        let past: Vec<Option<Vec<f64>>> = (0..k)
            .map(|i| (i != 1).then(|| f32_round(&g.vec(rows * cols))))
            .collect();
        let p = weights(&(1..=k as u64).map(|i| i + 4).collect::<Vec<_>>());
        let base = merged(&deltas, &past, &p, (rows, cols), &temporal())?.dense(rows, cols)?;
        // A past 4x larger (exact in f32): the same result.
        let scaled: Vec<Option<Vec<f64>>> = past
            .iter()
            .map(|d| d.as_ref().map(|d| d.iter().map(|x| 4.0 * x).collect()))
            .collect();
        let again = merged(&deltas, &scaled, &p, (rows, cols), &temporal())?.dense(rows, cols)?;
        assert!(rel_err(&again, &base) < 1e-9, "{rows}x{cols} scale");
        // Rotating the output space of every delta, past ones included.
        let q = random_orthogonal(rows, &mut g);
        let rot = |d: &Vec<f64>| matmul(&q, d, rows, rows, cols);
        let rotated: Vec<Vec<f64>> = deltas.iter().map(rot).collect();
        let rotated_past: Vec<Option<Vec<f64>>> =
            past.iter().map(|d| d.as_ref().map(rot)).collect();
        // The f32 rounding of a rotated past differs from the rotated
        // rounding; compare at that precision.
        let got =
            merged(&rotated, &rotated_past, &p, (rows, cols), &temporal())?.dense(rows, cols)?;
        let back = matmul(&transpose(&q, rows, rows), &got, rows, rows, cols);
        assert!(rel_err(&back, &base) < 1e-5, "{rows}x{cols} rotation");
    }
    Ok(())
}

#[test]
fn permuting_clients_with_their_pasts_changes_nothing() -> TestResult {
    let mut g = Gauss(17);
    let (rows, cols, k) = (6, 3, 4);
    let deltas: Vec<Vec<f64>> = (0..k).map(|_| g.vec(rows * cols)).collect();
    let past: Vec<Option<Vec<f64>>> = (0..k)
        .map(|i| (i != 2).then(|| f32_round(&g.vec(rows * cols))))
        .collect();
    let p = weights(&[3, 8, 5, 2]);
    let base = merged(&deltas, &past, &p, (rows, cols), &temporal())?.dense(rows, cols)?;
    let order = [2, 0, 3, 1];
    let pick = |v: &[Vec<f64>]| order.iter().map(|&i| v[i].clone()).collect::<Vec<_>>();
    let past_p: Vec<Option<Vec<f64>>> = order.iter().map(|&i| past[i].clone()).collect();
    let p_p: Vec<f64> = order.iter().map(|&i| p[i]).collect();
    let got =
        merged(&pick(&deltas), &past_p, &p_p, (rows, cols), &temporal())?.dense(rows, cols)?;
    assert!(rel_err(&got, &base) < 1e-12);
    Ok(())
}

#[test]
fn the_gain_estimates_the_signal_share_of_a_noisy_repeated_direction() -> TestResult {
    // c_t = s + n_t, c_{t-1} = s + n_{t-1}, independent noise of the same
    // size: cos -> ||s||^2 / (||s||^2 + ||n||^2) (the Wiener factor), and a
    // direction with no repeated signal gets ~0.
    let mut g = Gauss(18);
    let width = 20_000;
    for (signal, noise, wiener) in [(1.0, 1.0, 0.5), (2.0, 1.0, 0.8), (0.0, 1.0, 0.0)] {
        let s: Vec<f64> = g.vec(width).iter().map(|x| signal * x).collect();
        let now: Vec<f64> = s.iter().map(|x| x + noise * g.next()).collect();
        let before: Vec<f64> = s.iter().map(|x| x + noise * g.next()).collect();
        let r = reliability_with(&[&now], &[Some(&before)], &[1.0], &temporal())?;
        assert!(
            (r.client_gain[0] - wiener).abs() < 0.02,
            "signal {signal}: gain {} vs {wiener}",
            r.client_gain[0]
        );
        let fused_ratio = ops::norm(&r.fused) / ops::norm(&now);
        assert!((fused_ratio - r.client_gain[0]).abs() < 1e-12);
    }
    Ok(())
}

#[test]
fn the_past_is_each_clients_last_delta_and_survives_a_resume() -> TestResult {
    for json in [
        r#"{"name": "cra-only", "energy": 1.0, "tau": "inf", "gain": "temporal"}"#,
        r#"{"name": "fed-cmp", "energy": 1.0, "tau": "inf", "gain": "temporal", "momentum-form": "ema"}"#,
    ] {
        let cfg = config(json)?;
        // Client 6 takes part in round 0 only: its past is kept, and used
        // when it returns in round 2.
        let state = resumes_bit_for_bit(&cfg, [&[0, 1, 6], &[0, 1], &[0, 1, 6]])?;
        let keys: Vec<&String> = state
            .tensors
            .keys()
            .filter(|k| k.starts_with("cra_past_delta/"))
            .collect();
        assert_eq!(
            keys,
            ["cra_past_delta/0", "cra_past_delta/1", "cra_past_delta/6"],
            "{json}"
        );
        // Only the weight matrix is kept, as f32.
        let past = &state.tensors["cra_past_delta/6"];
        assert_eq!(past.entries().len(), 1);
        assert_eq!(past.entries()[0].0, "w");
        assert!(!bits(past).is_empty());
    }
    Ok(())
}

#[test]
fn a_client_repeating_its_update_through_the_strategy_gets_gain_one() -> TestResult {
    // Round 0: no past (gain 1, FedAvg); round 1: every client sends its
    // round-0 delta again, so the gains are 1 and the step is FedAvg's.
    let global = wb(4, 3, &[0.1f32; 16])?;
    let mut s = config(r#"{"name": "cra-only", "energy": 1.0, "tau": "inf", "gain": "temporal"}"#)?
        .build(8)?;
    let mut f = config(r#"{"name": "fedavg"}"#)?.build(8)?;
    let mut g = Gauss(19);
    let deltas: Vec<Vec<f32>> = (0..3)
        .map(|_| g.vec(16).iter().map(|x| (0.05 * x) as f32).collect())
        .collect();
    let mut global_s = global.clone();
    for t in 0..2 {
        let updates: Vec<_> = deltas
            .iter()
            .enumerate()
            .map(|(i, d)| Ok(update(i as u32, shifted(&global_s, d)?, 5 + i as u64, 2)))
            .collect::<TestResult<_>>()?;
        let a = s.aggregate(t, &global_s, &updates)?;
        let b = f.aggregate(t, &global_s, &updates)?;
        for (x, y) in a.params.flat().zip(b.params.flat()) {
            assert!((x - y).abs() < 1e-6, "round {t}: {x} vs {y}");
        }
        let q = &a.metrics.series["cra_gain_quantiles"];
        assert!(q.iter().all(|v| (v - 1.0).abs() < 1e-5), "round {t}: {q:?}");
        global_s = a.params;
    }
    Ok(())
}
