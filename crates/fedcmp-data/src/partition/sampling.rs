//! Seeded random primitives for splits, partitioners and k-means, built only
//! on ChaCha8's raw 64-bit output.
//!
//! Why not `rand`'s `shuffle`, `random_range` or `rand_distr::Gamma`? Their
//! algorithms may change in a value-breaking way with a minor version bump
//! (rand 0.10 is already in the lock file through another dependency),
//! which would silently change every scenario's shards. The ChaCha8 stream
//! itself is fixed by its specification, and everything below is a few
//! lines with a fixed draw order, so a seed keeps meaning the same shards.
//!
//! - [`below`]: an unbiased integer in `0..n` (Lemire 2019, "Fast random
//!   integer generation in an interval", multiply-and-reject on 64 bits);
//! - [`shuffle`]: Fisher-Yates (Knuth's Algorithm P), last position first;
//! - [`normal`]: Marsaglia's polar method (only `ln` and `sqrt`, no `sin`);
//! - [`ln_gamma`]: `ln G` with `G ~ Gamma(shape, 1)` by Marsaglia & Tsang
//!   (2000), "A simple method for generating gamma variables", with their
//!   boost `G(a) = G(a + 1) * U^(1/a)` for `a < 1`, kept in log space so
//!   tiny shapes (Dirichlet alpha = 0.01) never underflow to zero;
//! - [`dirichlet`]: `p ~ Dir(a)` as normalised Gammas, softmax of the logs.
//!
//! Streams: one seed drives several independent streams (ChaCha's 64-bit
//! stream id), one per [`Purpose`] and index, so the split of one source
//! does not change when another source is added, and the split and the
//! partition never share draws.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What a random stream is for; the tag occupies the stream id's top byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    Split = 1,
    Partition = 2,
    KMeans = 3,
}

/// The generator for `purpose` and `index` (e.g. the source index) under
/// `seed`.
pub(crate) fn stream(seed: u64, purpose: Purpose, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Top byte: purpose; lower 56 bits: index (a source index is a u32).
    rng.set_stream(((purpose as u64) << 56) | (index & ((1 << 56) - 1)));
    rng
}

/// Uniform integer in `0..n`; `n` must be positive (callers check).
pub(crate) fn below(rng: &mut impl RngCore, n: usize) -> usize {
    let n = n as u64;
    if n <= 1 {
        return 0;
    }
    let mut m = u128::from(rng.next_u64()) * u128::from(n);
    if (m as u64) < n {
        // Reject the low products that would bias small results.
        let threshold = n.wrapping_neg() % n;
        while (m as u64) < threshold {
            m = u128::from(rng.next_u64()) * u128::from(n);
        }
    }
    (m >> 64) as usize
}

/// Uniform in `[0, 1)` with 53 random bits.
pub(crate) fn unit(rng: &mut impl RngCore) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Uniform in `(0, 1]`, safe to take the logarithm of.
pub(crate) fn unit_open0(rng: &mut impl RngCore) -> f64 {
    ((rng.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Fisher-Yates shuffle in place.
pub(crate) fn shuffle<T>(rng: &mut impl RngCore, items: &mut [T]) {
    for i in (1..items.len()).rev() {
        let j = below(rng, i + 1);
        items.swap(i, j);
    }
}

/// Standard normal by the polar method (one of the pair is dropped, so the
/// function keeps no state between calls).
pub(crate) fn normal(rng: &mut impl RngCore) -> f64 {
    loop {
        let u = 2.0 * unit(rng) - 1.0;
        let v = 2.0 * unit(rng) - 1.0;
        let s = u * u + v * v;
        if s > 0.0 && s < 1.0 {
            return u * (-2.0 * s.ln() / s).sqrt();
        }
    }
}

/// `ln G` for `G ~ Gamma(shape, 1)`; `shape` must be finite and positive.
pub(crate) fn ln_gamma(rng: &mut impl RngCore, shape: f64) -> f64 {
    if shape < 1.0 {
        // Marsaglia & Tsang §6: G(a) = G(a + 1) * U^(1/a), in log space.
        let boosted = ln_gamma(rng, shape + 1.0);
        return boosted + unit_open0(rng).ln() / shape;
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = 1.0 + c * x;
        if v <= 0.0 {
            continue;
        }
        let v = v * v * v;
        let u = unit_open0(rng);
        let x2 = x * x;
        // The squeeze accepts ~98% without a logarithm; then the exact test.
        if u < 1.0 - 0.0331 * x2 * x2 || u.ln() < 0.5 * x2 + d * (1.0 - v + v.ln()) {
            return (d * v).ln();
        }
    }
}

/// `p ~ Dir(concentration)`; every concentration must be finite and
/// positive. The result sums to 1 and its largest entry is positive.
pub(crate) fn dirichlet(rng: &mut impl RngCore, concentration: &[f64]) -> Vec<f64> {
    let logs: Vec<f64> = concentration.iter().map(|&a| ln_gamma(rng, a)).collect();
    let max = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut p: Vec<f64> = logs.iter().map(|&l| (l - max).exp()).collect();
    let sum: f64 = p.iter().sum();
    for x in &mut p {
        *x /= sum;
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gamma_moments_match_the_shape() {
        // E[G] = a and Var[G] = a for Gamma(a, 1).
        for &a in &[0.1, 0.5, 1.0, 3.0] {
            let mut rng = stream(7, Purpose::Partition, 0);
            let n = 40_000;
            let xs: Vec<f64> = (0..n).map(|_| ln_gamma(&mut rng, a).exp()).collect();
            let mean = xs.iter().sum::<f64>() / n as f64;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            assert!((mean - a).abs() < 0.05 * a.max(0.2), "a={a} mean={mean}");
            assert!((var - a).abs() < 0.1 * a.max(0.2), "a={a} var={var}");
        }
    }

    #[test]
    fn below_is_in_range_and_covers_it() {
        let mut rng = stream(1, Purpose::Split, 3);
        let mut seen = [0usize; 7];
        for _ in 0..7000 {
            seen[below(&mut rng, 7)] += 1;
        }
        assert!(seen.iter().all(|&c| (800..1200).contains(&c)), "{seen:?}");
    }
}
