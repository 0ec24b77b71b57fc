//! The byzantine-robust rules (median, trimmed mean, Krum, norm bounding):
//! their papers' definitions on small closed-form cases, and the
//! tolerance each paper states, with hostile clients sending arbitrary
//! updates.

use fedcmp_core::{ClientUpdate, ParamSet};
use fedcmp_strategy::robust::krum::{scores, select};
use fedcmp_strategy::robust::norm_bound::clip;
use fedcmp_strategy::robust::trimmed_mean::trim_count;
use fedcmp_strategy::{ops, StrategyConfig, StrategyError};

use crate::common::{config, shifted, update, wb, TestResult};
use crate::fedcmp::Gauss;

/// A 2 x 2 weight and its 2 biases: 6 values.
const LEN: usize = 6;

fn global() -> TestResult<ParamSet> {
    wb(2, 2, &[0.25f32; LEN])
}

/// Updates `global + delta_k` for the given deltas, client ids 0.., with
/// unequal sample counts (the robust rules ignore them).
fn updates(global: &ParamSet, deltas: &[Vec<f32>]) -> TestResult<Vec<ClientUpdate>> {
    deltas
        .iter()
        .enumerate()
        .map(|(k, d)| Ok(update(k as u32, shifted(global, d)?, 3 + 5 * k as u64, 2)))
        .collect()
}

/// The step `theta_{t+1} - theta_t` a strategy takes on `deltas`, in f64.
fn step_of(json: &str, deltas: &[Vec<f32>]) -> TestResult<Vec<f64>> {
    let g = global()?;
    let mut s = config(json)?.build(8)?;
    let a = s.aggregate(0, &g, &updates(&g, deltas)?)?;
    Ok(a.params
        .flat()
        .zip(g.flat())
        .map(|(x, y)| f64::from(x) - f64::from(y))
        .collect())
}

/// `honest` Gaussian deltas (scale 0.01) and `hostile` ones of the given
/// kind, hostile last.
fn population(g: &mut Gauss, honest: usize, hostile: &[Vec<f32>]) -> Vec<Vec<f32>> {
    (0..honest)
        .map(|_| g.vec(LEN).iter().map(|x| (0.01 * x) as f32).collect())
        .chain(hostile.iter().cloned())
        .collect()
}

/// Per coordinate, `step` lies within the honest deltas' range (plus the
/// f32 rounding of the parameters).
fn within_honest_range(step: &[f64], honest: &[Vec<f32>]) -> bool {
    (0..LEN).all(|p| {
        let values = honest.iter().map(|d| f64::from(d[p]));
        let lo = values.clone().fold(f64::INFINITY, f64::min);
        let hi = values.fold(f64::NEG_INFINITY, f64::max);
        step[p] >= lo - 1e-7 && step[p] <= hi + 1e-7
    })
}

/// Hostile updates of several kinds: huge, huge and sign-flipped, all in
/// one direction (they cluster), or spread out.
fn attacks(f: usize) -> Vec<Vec<Vec<f32>>> {
    vec![
        vec![vec![1e6; LEN]; f],
        vec![vec![-1e6; LEN]; f],
        (0..f)
            .map(|i| {
                (0..LEN)
                    .map(|p| if (i + p) % 2 == 0 { 5e3 } else { -5e3 })
                    .collect()
            })
            .collect(),
    ]
}

#[test]
fn median_and_trimmed_mean_match_their_closed_forms() -> TestResult {
    // One coordinate's values over 4 clients: 0.5, 1, 2, 100 (f32-exact
    // steps from a zero model).
    let g = wb(2, 2, &[0.0f32; LEN])?;
    let deltas: Vec<Vec<f32>> = [0.5f32, 1.0, 2.0, 100.0]
        .iter()
        .map(|&v| vec![v; LEN])
        .collect();
    let run = |json: &str, ds: &[Vec<f32>]| -> TestResult<f32> {
        let mut s = config(json)?.build(8)?;
        Ok(s.aggregate(0, &g, &updates(&g, ds)?)?
            .params
            .flat()
            .next()
            .unwrap_or(f32::NAN))
    };
    // Even count: the mean of the two middle values.
    assert_eq!(run(r#"{"name": "median"}"#, &deltas)?, 1.5);
    assert_eq!(run(r#"{"name": "median"}"#, &deltas[..3])?, 1.0);
    // beta 0.25 of 4: one value cut at each end (Flower's and SciPy's case).
    assert_eq!(
        run(r#"{"name": "trimmed-mean", "trim": 0.25}"#, &deltas)?,
        1.5
    );
    // beta 0: the unweighted mean, whatever the sample counts.
    assert_eq!(
        run(r#"{"name": "trimmed-mean", "trim": 0.0}"#, &deltas)?,
        25.875
    );
    assert_eq!(trim_count(0.29, 100), 29);
    assert_eq!(trim_count(0.2, 8), 1);
    assert_eq!(trim_count(0.49, 3), 1);
    Ok(())
}

#[test]
fn median_tolerates_fewer_than_half_hostile() -> TestResult {
    let mut g = Gauss(40);
    for (honest, f) in [(3, 2), (5, 4), (6, 1)] {
        for hostile in attacks(f) {
            let deltas = population(&mut g, honest, &hostile);
            let step = step_of(r#"{"name": "median"}"#, &deltas)?;
            assert!(
                within_honest_range(&step, &deltas[..honest]),
                "{honest} honest, {f} hostile: {step:?}"
            );
        }
    }
    // Half or more hostile and clustered: the median is theirs.
    let deltas = population(&mut g, 2, &[vec![1e6; LEN], vec![1e6; LEN]]);
    let step = step_of(r#"{"name": "median"}"#, &deltas)?;
    assert!(!within_honest_range(&step, &deltas[..2]));
    Ok(())
}

#[test]
fn trimmed_mean_tolerates_as_many_hostile_as_it_trims() -> TestResult {
    let mut g = Gauss(41);
    // 10 clients, beta 0.2: 2 trimmed at each end, so up to 2 hostile.
    let json = r#"{"name": "trimmed-mean", "trim": 0.2}"#;
    for f in [1, 2] {
        for hostile in attacks(f) {
            let deltas = population(&mut g, 10 - f, &hostile);
            let step = step_of(json, &deltas)?;
            assert!(
                within_honest_range(&step, &deltas[..10 - f]),
                "f {f}: {step:?}"
            );
        }
    }
    // One more than it trims: a clustered attack drags the mean out.
    let deltas = population(&mut g, 7, &vec![vec![1e6; LEN]; 3]);
    assert!(!within_honest_range(&step_of(json, &deltas)?, &deltas[..7]));
    Ok(())
}

#[test]
fn krum_scores_and_selection_follow_the_paper() -> TestResult {
    // Flower's case: n = 3 is below 2f + 3 for f = 1, so use f = 0 on 3
    // scalars 0.2, 0.7, 1.0: neighbours n - f - 2 = 1, squared distances.
    let v = |x: f64| vec![x];
    let s = scores(&[v(0.2), v(0.7), v(1.0)], 0)?;
    let expected = [0.25, 0.09, 0.09];
    for (a, b) in s.iter().zip(expected) {
        assert!((a - b).abs() < 1e-12, "{s:?}");
    }
    // A tie goes to the lower index.
    assert_eq!(select(&s, 1), vec![1]);
    assert_eq!(select(&s, 2), vec![1, 2]);
    assert_eq!(select(&[3.0, 1.0, 2.0, 1.0], 3), vec![1, 2, 3]);
    Ok(())
}

#[test]
fn krum_chooses_honest_updates_when_2f_plus_2_is_below_k() -> TestResult {
    let mut g = Gauss(42);
    for (honest, f) in [(5, 1), (7, 2), (8, 2)] {
        for hostile in attacks(f) {
            let deltas = population(&mut g, honest, &hostile);
            let hostile_ids: Vec<f64> = (honest..honest + f).map(|i| i as f64).collect();
            // Krum: one honest delta, verbatim.
            let mut s = config(&format!(
                r#"{{"name": "krum", "byzantine": {f}, "keep": 1}}"#
            ))?
            .build(8)?;
            let gl = global()?;
            let a = s.aggregate(0, &gl, &updates(&gl, &deltas)?)?;
            let chosen = &a.metrics.series["robust_selected"];
            assert_eq!(chosen.len(), 1);
            assert!(!hostile_ids.contains(&chosen[0]), "{chosen:?}");
            // Multi-Krum with m = K - f (the default): exactly the honest mean.
            let step = step_of(&format!(r#"{{"name": "krum", "byzantine": {f}}}"#), &deltas)?;
            let honest64: Vec<Vec<f64>> = deltas[..honest]
                .iter()
                .map(|d| d.iter().map(|&x| f64::from(x)).collect())
                .collect();
            let mean = ops::weighted_sum(&honest64, &ops::uniform_weights(honest))?;
            let err = step
                .iter()
                .zip(&mean)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(
                err < 1e-7,
                "{honest} honest, {f} hostile: {step:?} vs {mean:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn krum_refuses_a_round_too_small_for_its_guarantee() -> TestResult {
    let mut g = Gauss(43);
    let deltas = population(&mut g, 4, &[]);
    let gl = global()?;
    let mut s = config(r#"{"name": "krum", "byzantine": 1}"#)?.build(8)?;
    let before = s.state();
    let err = s
        .aggregate(3, &gl, &updates(&gl, &deltas)?)
        .err()
        .ok_or("accepted")?;
    assert!(
        matches!(err, StrategyError::RoundRefused { round: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("2f + 2 < K"), "{err}");
    assert_eq!(s.state(), before);
    // keep = K: the unweighted mean of all.
    let deltas = population(&mut g, 5, &[]);
    let all = step_of(r#"{"name": "krum", "byzantine": 1, "keep": 5}"#, &deltas)?;
    let d64: Vec<Vec<f64>> = deltas
        .iter()
        .map(|d| d.iter().map(|&x| f64::from(x)).collect())
        .collect();
    let mean = ops::weighted_sum(&d64, &ops::uniform_weights(5))?;
    assert!(all.iter().zip(&mean).all(|(a, b)| (a - b).abs() < 1e-7));
    Ok(())
}

#[test]
fn norm_bound_clips_to_the_bound_and_keeps_short_updates() -> TestResult {
    let mut d = vec![3.0, 4.0];
    assert!(clip(&mut d, 1.0));
    assert!((ops::norm(&d) - 1.0).abs() < 1e-15);
    assert!(
        (d[0] - 0.6).abs() < 1e-15 && (d[1] - 0.8).abs() < 1e-15,
        "{d:?}"
    );
    let mut short = vec![0.3, 0.4];
    assert!(!clip(&mut short, 1.0));
    assert_eq!(short, vec![0.3, 0.4]);
    let mut zero = vec![0.0; 3];
    assert!(!clip(&mut zero, 0.5));
    assert_eq!(zero, vec![0.0; 3]);

    // A bound above every norm is FedAvg exactly (the data-weighted mean).
    let mut g = Gauss(44);
    let deltas = population(&mut g, 5, &[]);
    let bounded = step_of(r#"{"name": "norm-bound", "max-norm": 100.0}"#, &deltas)?;
    let fedavg = step_of(r#"{"name": "fedavg"}"#, &deltas)?;
    assert_eq!(bounded, fedavg);
    Ok(())
}

#[test]
fn norm_bound_at_the_median_norm_limits_hostile_clients() -> TestResult {
    let mut g = Gauss(45);
    for (honest, f) in [(5, 2), (6, 1)] {
        for hostile in attacks(f) {
            let deltas = population(&mut g, honest, &hostile);
            let gl = global()?;
            let mut s = config(r#"{"name": "norm-bound", "weighting": "uniform"}"#)?.build(8)?;
            let a = s.aggregate(0, &gl, &updates(&gl, &deltas)?)?;
            let bound = a.metrics.scalars["robust_bound"];
            let norms: Vec<f64> = deltas[..honest]
                .iter()
                .map(|d| ops::norm(&d.iter().map(|&x| f64::from(x)).collect::<Vec<_>>()))
                .collect();
            let max_honest = norms.iter().copied().fold(0.0, f64::max);
            // The median norm lies within the honest norms' range ...
            assert!(bound <= max_honest * (1.0 + 1e-6), "{bound} > {max_honest}");
            assert!(a.metrics.scalars["robust_clipped"] >= f as f64);
            // ... so the step is no longer than the longest honest delta.
            let step: Vec<f64> = a
                .params
                .flat()
                .zip(gl.flat())
                .map(|(x, y)| f64::from(x) - f64::from(y))
                .collect();
            assert!(ops::norm(&step) <= max_honest * (1.0 + 1e-5));
        }
    }
    Ok(())
}

#[test]
fn robust_rules_ignore_client_order_and_take_a_momentum_step() -> TestResult {
    let mut g = Gauss(46);
    let deltas = population(&mut g, 6, &attacks(1)[0]);
    let gl = global()?;
    let forward = updates(&gl, &deltas)?;
    let mut backward = forward.clone();
    backward.reverse();
    for json in [
        r#"{"name": "median"}"#,
        r#"{"name": "trimmed-mean", "trim": 0.2}"#,
        r#"{"name": "krum", "byzantine": 1}"#,
        r#"{"name": "norm-bound"}"#,
        r#"{"name": "norm-bound", "max-norm": 0.01, "weighting": "uniform"}"#,
    ] {
        let cfg: StrategyConfig = config(json)?;
        let a = cfg.build(8)?.aggregate(0, &gl, &forward)?;
        let b = cfg.build(8)?.aggregate(0, &gl, &backward)?;
        assert_eq!(a.params, b.params, "{json}");
        // With server momentum 0.5, two equal rounds step by 1 then 1.5
        // times the first step (heavy ball), and the state resumes.
        let with_momentum = json.replace('}', r#", "server-momentum": 0.5}"#);
        let mut s = config(&with_momentum)?.build(8)?;
        let first = s.aggregate(0, &gl, &forward)?;
        let state = s.state();
        let mut resumed = config(&with_momentum)?.build(8)?;
        resumed.load_state(state)?;
        let second = s.aggregate(1, &gl, &forward)?;
        let again = resumed.aggregate(1, &gl, &forward)?;
        assert_eq!(second.params, again.params, "{json}");
        for ((x1, x2), x0) in first.params.flat().zip(second.params.flat()).zip(gl.flat()) {
            let (s1, s2) = (f64::from(x1) - f64::from(x0), f64::from(x2) - f64::from(x0));
            // f32 parameters near 0.25: steps read back within ~1e-7.
            assert!((s2 - 1.5 * s1).abs() <= 2e-7, "{json}: {s1} then {s2}");
        }
    }
    Ok(())
}

#[test]
fn a_robust_rule_takes_every_server_optimizer() -> TestResult {
    // A bound above every norm leaves FedAvg's mean, so with each server
    // optimiser norm bounding is the matching baseline, round after round.
    let mut g = Gauss(47);
    for (robust, baseline) in [
        (
            r#"{"name": "norm-bound", "max-norm": 1e9, "server-optimizer": "adam", "server-lr": 0.1, "tau": 0.01}"#,
            r#"{"name": "fedadam", "server-lr": 0.1, "tau": 0.01}"#,
        ),
        (
            r#"{"name": "norm-bound", "max-norm": 1e9, "server-optimizer": "yogi", "server-lr": 0.1, "beta2": 0.9}"#,
            r#"{"name": "fedyogi", "server-lr": 0.1, "beta2": 0.9}"#,
        ),
        (
            r#"{"name": "norm-bound", "max-norm": 1e9, "server-optimizer": "adagrad", "server-lr": 0.1}"#,
            r#"{"name": "fedadagrad", "server-lr": 0.1}"#,
        ),
        (
            r#"{"name": "norm-bound", "max-norm": 1e9, "server-momentum": 0.9}"#,
            r#"{"name": "fedavgm"}"#,
        ),
    ] {
        let mut a = config(robust)?.build(8)?;
        let mut b = config(baseline)?.build(8)?;
        let mut gl = global()?;
        for t in 0..3 {
            let deltas = population(&mut g, 4, &[]);
            let ups = updates(&gl, &deltas)?;
            let x = a.aggregate(t, &gl, &ups)?;
            let y = b.aggregate(t, &gl, &ups)?;
            assert_eq!(x.params, y.params, "{robust} round {t}");
            gl = y.params;
        }
    }
    Ok(())
}

#[test]
fn robust_configs_are_validated_naming_the_field() -> TestResult {
    for (json, field) in [
        (r#"{"name": "trimmed-mean", "trim": 0.5}"#, "trim"),
        (r#"{"name": "trimmed-mean", "trim": -0.1}"#, "trim"),
        (r#"{"name": "krum", "keep": 0}"#, "keep"),
        (r#"{"name": "norm-bound", "max-norm": 0.0}"#, "max-norm"),
        (r#"{"name": "median", "server-lr": 0.0}"#, "server-lr"),
        (
            r#"{"name": "median", "server-momentum": 1.0}"#,
            "server-momentum",
        ),
    ] {
        let err = config(json)?.build(8).err().ok_or("accepted")?;
        assert!(
            err.to_string().contains(&format!("`{field}`")),
            "{json}: {err}"
        );
    }
    for bad in [
        r#"{"name": "median", "trim": 0.1}"#,
        r#"{"name": "norm-bound", "max-norm": "mean"}"#,
        r#"{"name": "krum", "byzantine": -1}"#,
    ] {
        let parsed: Result<StrategyConfig, _> = serde_json::from_str(bad);
        assert!(parsed.is_err(), "{bad} was accepted");
    }
    Ok(())
}
