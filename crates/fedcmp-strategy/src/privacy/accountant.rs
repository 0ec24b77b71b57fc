//! Rényi-DP accounting for the Poisson-subsampled Gaussian mechanism
//! (Mironov, Talwar, Zhang 2019, "Rényi Differential Privacy of the
//! Sampled Gaussian Mechanism", §3.3), converted to (epsilon, delta).
//!
//! One round of DP-FedAvg samples each client with probability `q` and
//! adds Gaussian noise of standard deviation `z C` to the sum of updates
//! clipped to norm `C`: the sampled Gaussian mechanism with noise
//! multiplier `z`. Its RDP at order `alpha` is `log(A_alpha) / (alpha -
//! 1)` with
//!
//! ```text
//! integer alpha:    A = sum_{i=0..alpha} C(alpha, i) q^i (1-q)^(alpha-i) exp((i^2 - i) / (2 z^2))
//! fractional alpha: A = A0 + A1, z0 = z^2 ln(1/q - 1) + 1/2, for i = 0, 1, ... and j = alpha - i:
//!   A0 = sum_i |C(alpha, i)| q^i (1-q)^j exp((i^2 - i) / (2 z^2)) erfc((i - z0) / (sqrt(2) z)) / 2
//!   A1 = sum_i |C(alpha, i)| q^j (1-q)^i exp((j^2 - j) / (2 z^2)) erfc((z0 - j) / (sqrt(2) z)) / 2
//! q = 1:            RDP = alpha / (2 z^2) (the plain Gaussian);  q = 0: 0
//! ```
//!
//! computed in log space. The fractional series stops once both terms
//! fall and are 30 nats below the sum; one that has not after 1000 terms
//! makes that order infinite (it is then not used). Taking `|C(alpha,
//! i)|` bounds `A` from above for fractional orders (the binomial
//! coefficients alternate in sign beyond `alpha`), as Google's
//! `dp-accounting` does, so the accountant is conservative and agrees
//! with it. RDP composes by addition over rounds, order by order.
//!
//! Conversion (Balle et al. 2020, "Hypothesis testing interpretations and
//! Rényi differential privacy", Prop. 12; Canonne et al. 2020, eq. 20), per
//! order, minimised over orders:
//!
//! ```text
//! epsilon = max(0, r + ln(1 - 1/alpha) - ln(delta alpha) / (alpha - 1))   (alpha > 1.01)
//! epsilon = 0 when delta^2 + expm1(-r) > 0
//! ```
//!
//! The orders are `dp-accounting`'s defaults (1.1 to 10.9 by 0.1, 11 to
//! 63, 128, 256, 512, 1024); the test suite checks epsilon against
//! `dp-accounting` 0.6.0 on a grid of (q, z, rounds) to 1%
//! (`tests/golden/dp_accounting.json`, from `tests/golden/dp_reference.py`).

use serde::{Deserialize, Serialize};

use crate::{Result, StrategyError};

/// Terms summed at most for a fractional order.
const MAX_TERMS: usize = 1000;

/// The default RDP orders (156 of them, as `dp-accounting`'s).
pub fn default_orders() -> Vec<f64> {
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((11..64).map(f64::from))
        .chain([128.0, 256.0, 512.0, 1024.0])
        .collect()
}

/// `ln(e^a + e^b)` (`-inf` is zero).
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// `ln |C(n, k)|` for real `n` and integer `k`.
fn log_binomial(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// `ln erfc(x)`, accurate in the far tail where `erfc` underflows.
fn log_erfc(x: f64) -> f64 {
    let r = libm::erfc(x);
    if r > 1e-300 {
        return r.ln();
    }
    // erfc(x) ~ exp(-x^2) / (x sqrt(pi)) (1 - 1/(2x^2) + 3/(4x^4) - ...).
    let x2 = x * x;
    -x2 - x.ln() - 0.5 * std::f64::consts::PI.ln() + (-0.5 / x2 + 0.625 / (x2 * x2))
}

/// `ln A_alpha` for an integer order.
fn log_a_integer(q: f64, z: f64, alpha: u64) -> f64 {
    let a = alpha as f64;
    let (lq, l1q) = (q.ln(), (-q).ln_1p());
    (0..=alpha)
        .map(|i| {
            let i = i as f64;
            log_binomial(a, i) + i * lq + (a - i) * l1q + (i * i - i) / (2.0 * z * z)
        })
        .fold(f64::NEG_INFINITY, log_add)
}

/// `ln A_alpha` for a fractional order; `inf` when the series does not
/// settle within [`MAX_TERMS`] terms.
fn log_a_fractional(q: f64, z: f64, alpha: f64) -> f64 {
    let (lq, l1q) = (q.ln(), (-q).ln_1p());
    let z0 = z * z * (1.0 / q - 1.0).ln() + 0.5;
    let scale = std::f64::consts::SQRT_2 * z;
    let half = 0.5f64.ln();
    let (mut a0, mut a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let (mut last0, mut last1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for step in 0..MAX_TERMS {
        let i = step as f64;
        let j = alpha - i;
        let coef = log_binomial(alpha, i);
        let s0 = coef
            + i * lq
            + j * l1q
            + (i * i - i) / (2.0 * z * z)
            + half
            + log_erfc((i - z0) / scale);
        let s1 = coef
            + j * lq
            + i * l1q
            + (j * j - j) / (2.0 * z * z)
            + half
            + log_erfc((z0 - j) / scale);
        a0 = log_add(a0, s0);
        a1 = log_add(a1, s1);
        let total = log_add(a0, a1);
        if s0 < last0 && s1 < last1 && s0.max(s1) < total - 30.0 {
            return total;
        }
        last0 = s0;
        last1 = s1;
    }
    f64::INFINITY
}

/// The RDP at order `alpha` of one step of the sampled Gaussian mechanism
/// with sampling rate `q` and noise multiplier `z`.
pub fn rdp_sampled_gaussian(q: f64, z: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if z == 0.0 || alpha.is_infinite() {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return alpha / (2.0 * z * z);
    }
    let log_a = if alpha.fract() == 0.0 {
        log_a_integer(q, z, alpha as u64)
    } else {
        log_a_fractional(q, z, alpha)
    };
    log_a / (alpha - 1.0)
}

/// Epsilon at `delta` from accumulated RDP `rdp` at `orders`, and the
/// order that gives it (none when every order is infinite).
pub fn epsilon(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, Option<f64>) {
    let mut best = (f64::INFINITY, None);
    for (&alpha, &r) in orders.iter().zip(rdp) {
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else if alpha > 1.01 {
            r + (-1.0 / alpha).ln_1p() - (delta * alpha).ln() / (alpha - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, Some(alpha));
        }
    }
    (best.0.max(0.0), best.1)
}

/// The privacy spent so far: RDP per order, added up round by round.
/// Serialisable, so a resumed run keeps its budget (an infinite order, one
/// whose series did not settle, is written as null: JSON has no infinity).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RdpAccountant {
    pub orders: Vec<f64>,
    #[serde(with = "infinite_as_null")]
    pub rdp: Vec<f64>,
}

mod infinite_as_null {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(values: &[f64], s: S) -> Result<S::Ok, S::Error> {
        let out: Vec<Option<f64>> = values.iter().map(|v| v.is_finite().then_some(*v)).collect();
        out.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        let raw: Vec<Option<f64>> = Vec::deserialize(d)?;
        Ok(raw
            .into_iter()
            .map(|v| v.unwrap_or(f64::INFINITY))
            .collect())
    }
}

impl Default for RdpAccountant {
    fn default() -> Self {
        let orders = default_orders();
        let rdp = vec![0.0; orders.len()];
        Self { orders, rdp }
    }
}

impl RdpAccountant {
    /// Adds `steps` rounds of the sampled Gaussian mechanism (`q` in [0,
    /// 1], `z` >= 0).
    pub fn compose(&mut self, q: f64, z: f64, steps: u64) -> Result<()> {
        if !((0.0..=1.0).contains(&q) && z.is_finite() && z >= 0.0) {
            return Err(StrategyError::Config {
                field: "privacy".to_string(),
                reason: format!(
                    "the accountant needs a sampling rate in [0, 1] and a noise multiplier >= 0, got q = {q}, z = {z}"
                ),
            });
        }
        for (r, &alpha) in self.rdp.iter_mut().zip(&self.orders) {
            *r += steps as f64 * rdp_sampled_gaussian(q, z, alpha);
        }
        Ok(())
    }

    /// Epsilon at `delta` (and the order giving it).
    pub fn epsilon(&self, delta: f64) -> (f64, Option<f64>) {
        epsilon(&self.orders, &self.rdp, delta)
    }
}
