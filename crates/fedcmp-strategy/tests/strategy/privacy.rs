//! The privacy accountant against Google's dp-accounting (an independent
//! implementation; `tests/golden/dp_reference.py` made the numbers), and
//! the closed forms it must reduce to.

use fedcmp_strategy::privacy::accountant::{
    default_orders, epsilon, rdp_sampled_gaussian, RdpAccountant,
};
use serde::Deserialize;

use crate::common::TestResult;

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
