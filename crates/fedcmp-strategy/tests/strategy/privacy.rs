//! The privacy accountant against Google's dp-accounting (an independent
//! implementation; `tests/golden/dp_reference.py` made the numbers) and
//! the closed forms it must reduce to; DP-FedAvg around a strategy: its
//! sensitivity, noise, epsilon, resume and what it refuses.

use fedcmp_core::{ClientUpdate, ParamSet};
use fedcmp_strategy::privacy::accountant::{
    default_orders, epsilon, rdp_sampled_gaussian, RdpAccountant,
};
use fedcmp_strategy::privacy::central::{private, private_with, CentralDp, Federation, NoisedMean};
use fedcmp_strategy::privacy::config::{calibrate, PrivacyConfig};
use serde::Deserialize;

use crate::common::{config, shifted, step, update, wb, TestResult};
use crate::fedcmp::Gauss;

const REFERENCE: &str = include_str!("../golden/dp_accounting.json");

#[derive(Deserialize)]
struct Reference {
    delta: f64,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    q: f64,
    z: f64,
    rounds: u64,
    epsilon: f64,
    order: f64,
    rdp_orders: Vec<f64>,
    rdp_per_step: Vec<Option<f64>>,
}

#[test]
fn epsilon_matches_dp_accounting_to_one_percent() -> TestResult {
    let reference: Reference = serde_json::from_str(REFERENCE)?;
    let mut worst: f64 = 0.0;
    for c in &reference.cases {
        let mut acc = RdpAccountant::default();
        acc.compose(c.q, c.z, c.rounds)?;
        let (eps, order) = acc.epsilon(reference.delta);
        let rel = (eps - c.epsilon).abs() / c.epsilon;
        worst = worst.max(rel);
        assert!(
            rel < 0.01,
            "q {} z {} rounds {}: {eps} (order {order:?}) vs {} (order {})",
            c.q,
            c.z,
            c.rounds,
            c.epsilon,
            c.order
        );
        for (&alpha, want) in c.rdp_orders.iter().zip(&c.rdp_per_step) {
            let got = rdp_sampled_gaussian(c.q, c.z, alpha);
            match want {
                Some(w) => assert!(
                    (got - w).abs() <= 1e-9 * w.abs().max(1e-12) + 1e-15,
                    "q {} z {} alpha {alpha}: rdp {got} vs {w}",
                    c.q,
                    c.z
                ),
                None => assert!(
                    got.is_infinite(),
                    "q {} z {} alpha {alpha}: {got}",
                    c.q,
                    c.z
                ),
            }
        }
    }
    eprintln!(
        "accountant vs dp-accounting over {} cases: worst relative epsilon error {worst:.2e}",
        reference.cases.len()
    );
    Ok(())
}

#[test]
fn the_accountant_reduces_to_its_closed_forms() -> TestResult {
    // q = 1: the plain Gaussian, RDP alpha / (2 z^2) at every order.
    for alpha in [1.5, 2.0, 7.0, 64.0] {
        assert!((rdp_sampled_gaussian(1.0, 2.0, alpha) - alpha / 8.0).abs() < 1e-15);
    }
    // q = 0: nothing is spent; z = 0: no privacy.
    assert_eq!(rdp_sampled_gaussian(0.0, 1.0, 2.0), 0.0);
    assert!(rdp_sampled_gaussian(0.5, 0.0, 2.0).is_infinite());
    // Order 2 in closed form: A_2 = (1-q)^2 + 2q(1-q) + q^2 e^(1/z^2).
    for (q, z) in [(0.01f64, 1.0f64), (0.3, 0.7), (0.9, 3.0)] {
        let a2 = (1.0f64 - q).powi(2) + 2.0 * q * (1.0 - q) + q * q * (1.0 / (z * z)).exp();
        let got = rdp_sampled_gaussian(q, z, 2.0);
        assert!(
            (got - a2.ln()).abs() < 1e-13,
            "q {q} z {z}: {got} vs {}",
            a2.ln()
        );
    }
    // Composition adds: two rounds of one spend what one call of two does.
    let (mut a, mut b) = (RdpAccountant::default(), RdpAccountant::default());
    a.compose(0.1, 1.2, 1)?;
    a.compose(0.1, 1.2, 1)?;
    b.compose(0.1, 1.2, 2)?;
    for (x, y) in a.rdp.iter().zip(&b.rdp) {
        // (An order whose series does not settle is infinite in both.)
        assert!(
            x == y || (x - y).abs() <= 1e-12 * y.abs().max(1.0),
            "{x} vs {y}"
        );
    }
    // More rounds, less noise or a larger sampling rate never spend less.
    let eps = |q: f64, z: f64, rounds: u64| -> TestResult<f64> {
        let mut acc = RdpAccountant::default();
        acc.compose(q, z, rounds)?;
        Ok(acc.epsilon(1e-5).0)
    };
    assert!(eps(0.1, 1.0, 20)? > eps(0.1, 1.0, 10)?);
    assert!(eps(0.1, 0.8, 10)? > eps(0.1, 1.0, 10)?);
    assert!(eps(0.2, 1.0, 10)? > eps(0.1, 1.0, 10)?);
    // Nothing spent is epsilon 0; bad inputs are refused, naming them.
    let none = RdpAccountant::default();
    assert_eq!(none.epsilon(1e-5).0, 0.0);
    assert_eq!(default_orders().len(), 156);
    assert_eq!(epsilon(&[2.0], &[f64::INFINITY], 1e-5).0, f64::INFINITY);
    let err = RdpAccountant::default()
        .compose(1.5, 1.0, 1)
        .err()
        .ok_or("accepted")?;
    assert!(err.to_string().contains("q = 1.5"), "{err}");
    // The state survives serialisation bit for bit.
    let text = serde_json::to_string(&a)?;
    let back: RdpAccountant = serde_json::from_str(&text)?;
    assert_eq!(back, a);
    Ok(())
}

// ---------------------------------------------------------------------------
// DP-FedAvg around a strategy.

const FED: Federation = Federation {
    clients: 10,
    per_round: 4,
};

fn dp(clip_norm: f64, noise_multiplier: f64) -> CentralDp {
    CentralDp {
        clip_norm,
        noise_multiplier,
        delta: 1e-5,
        budget: None,
        adaptive: None,
    }
}

/// `k` clients with Gaussian deltas of scale `scale`, equal sample counts.
pub(crate) fn round_of(
    g: &mut Gauss,
    global: &ParamSet,
    k: usize,
    scale: f64,
) -> TestResult<Vec<ClientUpdate>> {
    let n = global.num_values();
    (0..k)
        .map(|c| {
            let d: Vec<f32> = g.vec(n).iter().map(|x| (scale * x) as f32).collect();
            Ok(update(c as u32, shifted(global, &d)?, 8, 2))
        })
        .collect()
}

#[test]
fn with_negligible_noise_and_no_clipping_it_is_the_base_strategy() -> TestResult {
    // Equal sample counts and m = the round's clients: the unweighted,
    // fixed-denominator mean is FedAvg's mean, and the server steps agree.
    let fed = Federation {
        per_round: 4,
        ..FED
    };
    for json in [
        r#"{"name": "fedavg", "server-lr": 0.7}"#,
        r#"{"name": "fedavgm", "momentum": 0.5}"#,
        r#"{"name": "fedadam", "server-lr": 0.1, "tau": 0.01}"#,
        r#"{"name": "fedprox", "mu": 0.1}"#,
    ] {
        let base = config(json)?;
        // Noise of 2.5e-10 per value (z C / m): far below the tolerance
        // whatever the secret draws.
        let mut a = private(&base, &dp(1e6, 1e-15), fed)?;
        let mut b = base.build(10)?;
        let mut g = Gauss(60);
        let mut global = wb(3, 4, &[0.1f32; 15])?;
        for t in 0..3 {
            let ups = round_of(&mut g, &global, 4, 0.01)?;
            let x = a.aggregate(t, &global, &ups)?;
            let y = b.aggregate(t, &global, &ups)?;
            for (p, q) in x.params.flat().zip(y.params.flat()) {
                assert!((p - q).abs() <= 1e-6, "{json} round {t}: {p} vs {q}");
            }
            assert_eq!(a.configure_round(t, &[]), b.configure_round(t, &[]));
            global = y.params;
        }
    }
    Ok(())
}

#[test]
fn each_update_counts_for_at_most_the_clipping_norm() -> TestResult {
    // One client's update, however large, moves the (noise-free) aggregate
    // times m by at most C.
    let c = 0.05;
    let global = wb(3, 4, &[0.0f32; 15])?;
    let mut g = Gauss(61);
    let honest = round_of(&mut g, &global, 3, 0.01)?;
    let fedavg = config(r#"{"name": "fedavg"}"#)?;
    let run = |ups: &[ClientUpdate]| -> TestResult<(Vec<f64>, f64)> {
        let mut s = private(&fedavg, &dp(c, 1e-12), FED)?;
        let a = s.aggregate(0, &global, ups)?;
        Ok((step(&global, &a.params), a.metrics.scalars["dp_clipped"]))
    };
    let (without, _) = run(&honest)?;
    let mut with = honest.clone();
    let huge: Vec<f32> = g.vec(15).iter().map(|x| (1e3 * x) as f32).collect();
    with.push(update(9, shifted(&global, &huge)?, 1_000_000, 2));
    let (attacked, clipped) = run(&with)?;
    assert_eq!(clipped, 1.0);
    let moved: Vec<f64> = attacked
        .iter()
        .zip(&without)
        .map(|(a, b)| (a - b) * 4.0)
        .collect();
    assert!(
        fedcmp_strategy::ops::norm(&moved) <= c * (1.0 + 1e-5),
        "{moved:?}"
    );
    Ok(())
}

#[test]
fn the_noise_has_the_stated_size_and_the_epsilon_is_the_accountants() -> TestResult {
    let (c, z) = (0.5, 1.3);
    let rows = 100;
    let global = wb(rows, 100, &vec![0.0f32; rows * 100 + rows])?;
    let mut s = private(&config(r#"{"name": "fedavg"}"#)?, &dp(c, z), FED)?;
    // Clients that send the global back: the aggregate is the noise alone.
    let same: Vec<ClientUpdate> = (0..4).map(|k| update(k, global.clone(), 5, 1)).collect();
    let mut eps = Vec::new();
    for t in 0..3 {
        let a = s.aggregate(t, &global, &same)?;
        let noise = step(&global, &a.params);
        let n = noise.len() as f64;
        let sd = (noise.iter().map(|x| x * x).sum::<f64>() / n).sqrt();
        let want = z * c / 4.0;
        assert!(
            (sd - want).abs() < 0.03 * want,
            "round {t}: sd {sd} vs {want}"
        );
        assert!((a.metrics.scalars["dp_noise_std"] - want).abs() < 1e-15);
        let mut acc = RdpAccountant::default();
        acc.compose(0.4, z, t + 1)?;
        assert_eq!(a.metrics.scalars["dp_epsilon"], acc.epsilon(1e-5).0);
        eps.push(a.metrics.scalars["dp_epsilon"]);
    }
    assert!(eps[0] < eps[1] && eps[1] < eps[2], "{eps:?}");
    Ok(())
}

#[test]
fn a_private_run_resumes_with_the_same_noise() -> TestResult {
    let base = config(r#"{"name": "fedavgm"}"#)?;
    let mut a = private(&base, &dp(0.1, 0.8), FED)?;
    let mut g = Gauss(62);
    let mut global = wb(3, 4, &[0.1f32; 15])?;
    for t in 0..2 {
        let ups = round_of(&mut g, &global, 4, 0.05)?;
        global = a.aggregate(t, &global, &ups)?.params;
    }
    let state = a.state();
    assert_eq!(state.scalars.get("dp_rounds"), Some(&2.0));
    assert!(
        state.scalars.contains_key("dp_secret_hi") && state.scalars.contains_key("dp_secret_lo")
    );
    let mut broken = state.clone();
    broken.scalars.remove("dp_secret_lo");
    let err = private(&base, &dp(0.1, 0.8), FED)?
        .load_state(broken)
        .err()
        .ok_or("a state without its secret was accepted")?;
    assert!(err.to_string().contains("dp_secret_lo"), "{err}");
    let mut b = private(&base, &dp(0.1, 0.8), FED)?;
    b.load_state(serde_json::from_str(&serde_json::to_string(&state)?)?)?;
    let ups = round_of(&mut g, &global, 4, 0.05)?;
    let x = a.aggregate(2, &global, &ups)?;
    let y = b.aggregate(2, &global, &ups)?;
    assert_eq!(x.params, y.params);
    assert_eq!(
        x.metrics.scalars["dp_epsilon"],
        y.metrics.scalars["dp_epsilon"]
    );
    Ok(())
}

#[test]
fn privacy_refuses_what_it_cannot_protect_with_the_reason() -> TestResult {
    for (json, why) in [
        (r#"{"name": "fed-cmp"}"#, "CRA"),
        (r#"{"name": "cra-only"}"#, "CRA"),
        (r#"{"name": "scaffold"}"#, "control variates"),
        (r#"{"name": "fednova"}"#, "normalises"),
        (r#"{"name": "median"}"#, "individual updates"),
        (r#"{"name": "ties"}"#, "individual updates"),
    ] {
        let err = private(&config(json)?, &dp(1.0, 1.0), FED)
            .err()
            .ok_or("accepted")?;
        assert!(err.to_string().contains(why), "{json}: {err}");
    }
    for (bad, field) in [
        (dp(0.0, 1.0), "clip-norm"),
        (dp(1.0, 0.0), "noise-multiplier"),
    ] {
        let err = private(&config(r#"{"name": "fedavg"}"#)?, &bad, FED)
            .err()
            .ok_or("accepted")?;
        assert!(err.to_string().contains(&format!("`{field}`")), "{err}");
    }
    for (json, field) in [
        (r#"{"clip-norm": 1.0}"#, "noise-multiplier"),
        (
            r#"{"clip-norm": 1.0, "noise-multiplier": 1.0, "target-epsilon": 4.0}"#,
            "noise-multiplier",
        ),
        (
            r#"{"clip-norm": 1.0, "noise-multiplier": 1.0, "delta": 1.0}"#,
            "delta",
        ),
        (
            r#"{"clip-norm": -1.0, "noise-multiplier": 1.0}"#,
            "clip-norm",
        ),
        (
            r#"{"clip-norm": 1.0, "target-epsilon": 0.0}"#,
            "target-epsilon",
        ),
    ] {
        let cfg: PrivacyConfig = serde_json::from_str(json)?;
        let err = cfg.resolve(4, 10, Some(10)).err().ok_or("accepted")?;
        assert!(
            err.to_string().contains(&format!("`{field}`")),
            "{json}: {err}"
        );
    }
    let needs_rounds: PrivacyConfig =
        serde_json::from_str(r#"{"clip-norm": 1.0, "target-epsilon": 4.0}"#)?;
    let err = needs_rounds.resolve(4, 10, None).err().ok_or("accepted")?;
    assert!(err.to_string().contains("rounds"), "{err}");
    let err = private(
        &config(r#"{"name": "fedavg"}"#)?,
        &dp(1.0, 1.0),
        Federation {
            per_round: 11,
            ..FED
        },
    )
    .err()
    .ok_or("accepted")?;
    assert!(err.to_string().contains("clients per round"), "{err}");
    Ok(())
}

#[test]
fn a_target_epsilon_sets_the_noise_and_is_never_exceeded() -> TestResult {
    let cfg: PrivacyConfig = serde_json::from_str(r#"{"clip-norm": 0.5, "target-epsilon": 4.0}"#)?;
    let resolved = cfg.resolve(4, 10, Some(3))?;
    let z = resolved.noise_multiplier;
    assert_eq!(resolved.budget, Some(4.0));
    // The smallest such z, to 0.1%: epsilon at z within the target, at
    // 0.998 z beyond it.
    assert!(resolved.epsilon(4, 10, 3)? <= 4.0);
    let looser = CentralDp {
        noise_multiplier: z * 0.998,
        ..resolved
    };
    assert!(looser.epsilon(4, 10, 3)? > 4.0, "z {z} is not the smallest");
    assert_eq!(calibrate(4.0, 1e-5, 0.4, 3)?, z);
    // Three rounds fit; the fourth is refused, the state unchanged.
    let mut s = private(&config(r#"{"name": "fedavg"}"#)?, &resolved, FED)?;
    let mut g = Gauss(63);
    let mut global = wb(3, 4, &[0.1f32; 15])?;
    for t in 0..3 {
        let ups = round_of(&mut g, &global, 4, 0.05)?;
        let a = s.aggregate(t, &global, &ups)?;
        assert!(a.metrics.scalars["dp_epsilon"] <= 4.0);
        global = a.params;
    }
    let before = s.state();
    let ups = round_of(&mut g, &global, 4, 0.05)?;
    let err = s
        .aggregate(3, &global, &ups)
        .err()
        .ok_or("a fourth round was aggregated")?;
    assert!(err.to_string().contains("privacy budget"), "{err}");
    assert_eq!(s.state(), before);
    Ok(())
}

#[test]
fn the_noise_is_secret_unless_given() -> TestResult {
    // Two fresh private strategies draw their own secrets: different
    // noise on the same round; a given secret repeats it.
    let base = config(r#"{"name": "fedavg"}"#)?;
    let global = wb(3, 4, &[0.0f32; 15])?;
    let same: Vec<ClientUpdate> = (0..4).map(|k| update(k, global.clone(), 5, 1)).collect();
    let noise = |mut s: Box<dyn fedcmp_strategy::Strategy>| -> TestResult<ParamSet> {
        Ok(s.aggregate(0, &global, &same)?.params)
    };
    let a = noise(private(&base, &dp(1.0, 1.0), FED)?)?;
    let b = noise(private(&base, &dp(1.0, 1.0), FED)?)?;
    assert_ne!(a, b);
    let fixed = || NoisedMean::new(dp(1.0, 1.0), FED).with_secret(42);
    assert_eq!(
        noise(private_with(&base, fixed())?)?,
        noise(private_with(&base, fixed())?)?
    );
    Ok(())
}

#[test]
fn adaptive_clipping_follows_the_target_quantile_of_the_norms() -> TestResult {
    // Ten clients of norms 1..10 every round, the count's noise tiny: C
    // moves geometrically towards the norm that half of them stay under
    // (between 5 and 6), from 0.1 and from 100 alike.
    let fed = Federation {
        clients: 10,
        per_round: 10,
    };
    let global = wb(1, 4, &[0.0f32; 5])?;
    let updates: Vec<ClientUpdate> = (1..=10u32)
        .map(|k| {
            let d = [k as f32, 0.0, 0.0, 0.0, 0.0];
            Ok(update(k, shifted(&global, &d)?, 3, 1))
        })
        .collect::<TestResult<_>>()?;
    for start in [0.1, 100.0] {
        let cfg: PrivacyConfig = serde_json::from_str(&format!(
            r#"{{"clip-norm": {start}, "noise-multiplier": 1e-6,
                "adaptive": {{"target-quantile": 0.5, "learning-rate": 0.2, "count-stddev": 1e-5}}}}"#
        ))?;
        let resolved = cfg.resolve(10, 10, None)?;
        let a = resolved.adaptive.ok_or("no adaptive clipping")?;
        // z_Delta^-2 = z^-2 - (2 sigma_b)^-2.
        let want = (1e-12f64.recip() - (2e-5f64).powi(-2)).powf(-0.5);
        assert!((a.update_noise_multiplier - want).abs() <= 1e-9 * want);
        let mut s = private(&config(r#"{"name": "fedavg"}"#)?, &resolved, fed)?;
        let mut clip = Vec::new();
        for t in 0..120 {
            let out = s.aggregate(t, &global, &updates)?;
            clip.push(out.metrics.scalars["dp_clip_norm"]);
        }
        assert_eq!(clip[0], start);
        let last = clip[clip.len() - 1];
        assert!((5.0..=6.0).contains(&last), "from {start}: {last}");
        // The state carries C: a resumed strategy continues from it.
        let mut resumed = private(&config(r#"{"name": "fedavg"}"#)?, &resolved, fed)?;
        resumed.load_state(s.state())?;
        let x = s.aggregate(120, &global, &updates)?;
        let y = resumed.aggregate(120, &global, &updates)?;
        assert_eq!(
            x.metrics.scalars["dp_clip_norm"],
            y.metrics.scalars["dp_clip_norm"]
        );
        assert_ne!(x.metrics.scalars["dp_clip_norm"], start);
        assert_eq!(x.params, y.params);
    }
    // The paper's condition z < 2 sigma_b, named.
    let bad: PrivacyConfig =
        serde_json::from_str(r#"{"clip-norm": 1.0, "noise-multiplier": 1.0, "adaptive": {}}"#)?;
    let err = bad.resolve(8, 10, None).err().ok_or("accepted")?;
    assert!(err.to_string().contains("`count-stddev`"), "{err}");
    Ok(())
}
