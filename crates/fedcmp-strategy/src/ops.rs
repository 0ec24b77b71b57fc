//! The only place where shared aggregation math lives.
//!
//! Working precision is f64: a [`ParamSet`]'s f32 values are widened
//! exactly into one flat vector (tensors concatenated in the set's order),
//! every sum is accumulated in f64 in a fixed order, and a result is rounded
//! to f32 once, by [`unflatten`]. Biases and other 1-D tensors are values
//! like any other here.
//!
//! Determinism: every reduction runs in the order of its inputs, and the
//! callers pass clients sorted by id, so the result does not depend on the
//! order in which updates arrived. Binary operations check lengths and
//! return an error instead of silently truncating.

use std::ops::Range;

use fedcmp_core::ParamSet;
use rayon::prelude::*;

use crate::{Result, StrategyError};

/// A standard normal draw (Box-Muller), for the noise of privacy and of
/// simulated hostile clients.
pub fn standard_normal(rng: &mut impl rand::Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// All values of `set`, widened to f64 and concatenated in order.
pub fn flatten(set: &ParamSet) -> Vec<f64> {
    set.flat().map(f64::from).collect()
}

/// `values` rounded to f32 (nearest, ties to even) in `template`'s layout.
pub fn unflatten(template: &ParamSet, values: &[f64]) -> Result<ParamSet> {
    check_len("values to unflatten", template.num_values(), values.len())?;
    let mut out = template.clone();
    let mut rest = values;
    for tensor in out.tensors_mut() {
        let Some((head, tail)) = rest.split_at_checked(tensor.data.len()) else {
            return Err(StrategyError::Length {
                what: "values to unflatten",
                expected: template.num_values(),
                got: values.len(),
            });
        };
        for (dst, &src) in tensor.data.iter_mut().zip(head) {
            // Rounding to the nearest f32 is the one intended precision loss.
            *dst = src as f32;
        }
        rest = tail;
    }
    Ok(out)
}

/// Where each tensor of `template` lies in its flattened values: `(name,
/// shape, range)` in order. Per-matrix methods (e.g. a canonical merge of
/// each weight matrix) slice flat vectors with it.
pub fn tensor_ranges(template: &ParamSet) -> Vec<(&str, &[usize], Range<usize>)> {
    let mut start = 0;
    template
        .entries()
        .iter()
        .map(|(name, t)| {
            let range = start..start + t.data.len();
            start = range.end;
            (name.as_str(), t.shape.as_slice(), range)
        })
        .collect()
}

/// `params - global`, in f64 (`global` already flattened). The layouts must
/// have been checked; only the total length is checked here.
pub fn delta(global: &[f64], params: &ParamSet) -> Result<Vec<f64>> {
    check_len("client parameters", global.len(), params.num_values())?;
    Ok(params
        .flat()
        .zip(global)
        .map(|(p, &g)| f64::from(p) - g)
        .collect())
}

/// `sum_k weights[k] * vectors[k]`, accumulated in the order given.
pub fn weighted_sum(vectors: &[Vec<f64>], weights: &[f64]) -> Result<Vec<f64>> {
    check_len("weights", vectors.len(), weights.len())?;
    let Some(first) = vectors.first() else {
        return Ok(Vec::new());
    };
    let mut acc = vec![0.0; first.len()];
    for (v, &w) in vectors.iter().zip(weights) {
        axpy(w, v, &mut acc)?;
    }
    Ok(acc)
}

/// `y += alpha * x`.
pub fn axpy(alpha: f64, x: &[f64], y: &mut [f64]) -> Result<()> {
    check_len("axpy operand", y.len(), x.len())?;
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
    Ok(())
}

/// `x *= alpha`.
pub fn scale(alpha: f64, x: &mut [f64]) {
    for xi in x {
        *xi *= alpha;
    }
}

/// `a + b`.
pub fn add(a: &[f64], b: &[f64]) -> Result<Vec<f64>> {
    check_len("addend", a.len(), b.len())?;
    Ok(a.iter().zip(b).map(|(x, y)| x + y).collect())
}

/// `a - b`.
pub fn sub(a: &[f64], b: &[f64]) -> Result<Vec<f64>> {
    check_len("subtrahend", a.len(), b.len())?;
    Ok(a.iter().zip(b).map(|(x, y)| x - y).collect())
}

/// Inner product, accumulated in order.
pub fn dot(a: &[f64], b: &[f64]) -> Result<f64> {
    check_len("dot operand", a.len(), b.len())?;
    Ok(a.iter().zip(b).map(|(x, y)| x * y).sum())
}

/// Euclidean norm.
pub fn norm(a: &[f64]) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Cosine similarity; 0 when either vector is zero.
pub fn cosine(a: &[f64], b: &[f64]) -> Result<f64> {
    let ab = dot(a, b)?;
    Ok(cosine_from(ab, norm(a), norm(b)))
}

fn cosine_from(ab: f64, na: f64, nb: f64) -> f64 {
    if na > 0.0 && nb > 0.0 {
        (ab / (na * nb)).clamp(-1.0, 1.0)
    } else {
        0.0
    }
}

/// Values per block of [`gram`]: all vectors' blocks together stay in L2.
const GRAM_BLOCK: usize = 2048;
/// The fixed number of pieces [`gram`] is split into (see the header).
const GRAM_PIECES: usize = 64;

/// Gram matrix `G[i][j] = <v_i, v_j>`, row-major `k x k`, symmetric by
/// construction (each pair computed once).
///
/// One pass over the data: the index range is cut into [`GRAM_PIECES`]
/// contiguous pieces computed in parallel, each block by block with every
/// pair's partial dot products, and the pieces summed in order. The pieces
/// do not depend on the thread count, so neither do the bits.
pub fn gram(vectors: &[Vec<f64>]) -> Result<Vec<f64>> {
    let k = vectors.len();
    let n = vectors.first().map_or(0, Vec::len);
    for v in vectors {
        check_len("gram operand", n, v.len())?;
    }
    let piece = n.div_ceil(GRAM_PIECES).max(1);
    let partials: Vec<Vec<f64>> = (0..n.div_ceil(piece))
        .into_par_iter()
        .map(|p| {
            let mut g = vec![0.0; k * k];
            let end = ((p + 1) * piece).min(n);
            let mut start = p * piece;
            while start < end {
                let stop = (start + GRAM_BLOCK).min(end);
                for i in 0..k {
                    let a = &vectors[i][start..stop];
                    for j in i..k {
                        g[i * k + j] += dot_lanes(a, &vectors[j][start..stop]);
                    }
                }
                start = stop;
            }
            g
        })
        .collect();
    let mut g = vec![0.0; k * k];
    for part in &partials {
        for i in 0..k {
            for j in i..k {
                g[i * k + j] += part[i * k + j];
            }
        }
    }
    for i in 0..k {
        for j in 0..i {
            g[i * k + j] = g[j * k + i];
        }
    }
    Ok(g)
}

/// Inner product of equal-length slices with four interleaved
/// accumulators (vectorisable; the order is fixed by the length alone).
fn dot_lanes(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let (a4, b4) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = a4
        .remainder()
        .iter()
        .zip(b4.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a4.zip(b4) {
        for l in 0..4 {
            acc[l] += x[l] * y[l];
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// Pairwise cosine matrix of `vectors`, row-major `k x k`; the diagonal is
/// 1 (0 for a zero vector) and a pair involving a zero vector is 0.
pub fn cosine_matrix(vectors: &[Vec<f64>]) -> Result<Vec<f64>> {
    Ok(cosine_from_gram(&gram(vectors)?, vectors.len()))
}

/// The cosine matrix of [`cosine_matrix`] from a row-major `k x k` Gram.
pub fn cosine_from_gram(g: &[f64], k: usize) -> Vec<f64> {
    let norms: Vec<f64> = (0..k).map(|i| g[i * k + i].sqrt()).collect();
    let mut c = vec![0.0; k * k];
    for i in 0..k {
        for j in 0..k {
            c[i * k + j] = if i == j {
                if norms[i] > 0.0 {
                    1.0
                } else {
                    0.0
                }
            } else {
                cosine_from(g[i * k + j], norms[i], norms[j])
            };
        }
    }
    c
}

/// Sign with `sign(0) = 0` (unlike `f64::signum`), as in the papers.
pub fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Data weights `n_k / sum_j n_j`; `None` when every count is 0.
pub fn sample_weights(counts: &[u64]) -> Option<Vec<f64>> {
    // Counts are summed in f64: exact below 2^53 samples, and no overflow.
    let total: f64 = counts.iter().map(|&n| n as f64).sum();
    (total > 0.0).then(|| counts.iter().map(|&n| n as f64 / total).collect())
}

/// Equal weights `1 / k`.
pub fn uniform_weights(k: usize) -> Vec<f64> {
    vec![1.0 / k as f64; k]
}

/// `sum_k weights[k] * values[k]` for scalars (e.g. losses).
pub fn weighted_mean(values: &[f64], weights: &[f64]) -> Result<f64> {
    dot(values, weights)
}

/// Marks the `keep` values of largest magnitude; equal magnitudes are
/// taken in index order, so the mask is unique.
pub fn top_k_mask(values: &[f64], keep: usize) -> Vec<bool> {
    let n = values.len();
    if keep >= n {
        return vec![true; n];
    }
    let mut mask = vec![false; n];
    if keep == 0 {
        return mask;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.select_nth_unstable_by(keep - 1, |&a, &b| {
        values[b].abs().total_cmp(&values[a].abs()).then(a.cmp(&b))
    });
    for &i in &order[..keep] {
        mask[i] = true;
    }
    mask
}

/// The name of the first tensor of `set` holding a NaN or infinity.
pub fn first_non_finite(set: &ParamSet) -> Option<&str> {
    set.entries()
        .iter()
        .find(|(_, t)| t.data.iter().any(|v| !v.is_finite()))
        .map(|(name, _)| name.as_str())
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(StrategyError::Length {
            what,
            expected,
            got,
        })
    }
}

#[cfg(test)]
mod tests {
    use fedcmp_core::ParamTensor;

    use super::*;

    fn set() -> Result<ParamSet> {
        Ok(ParamSet::new(vec![
            (
                "w".to_string(),
                ParamTensor::new("w", vec![2, 2], vec![1.0, -2.0, 3.0, 0.5])?,
            ),
            ("b".to_string(), ParamTensor::new("b", vec![1], vec![4.0])?),
        ])?)
    }

    #[test]
    fn flatten_round_trips_and_delta_is_exact() -> Result<()> {
        let s = set()?;
        let flat = flatten(&s);
        assert_eq!(flat, vec![1.0, -2.0, 3.0, 0.5, 4.0]);
        assert_eq!(unflatten(&s, &flat)?, s);
        let ranges = tensor_ranges(&s);
        assert_eq!(ranges[0], ("w", &[2usize, 2][..], 0..4));
        assert_eq!(ranges[1], ("b", &[1usize][..], 4..5));
        assert!(unflatten(&s, &flat[..4]).is_err());
        assert_eq!(delta(&flat, &s)?, vec![0.0; 5]);
        Ok(())
    }

    #[test]
    fn reductions() -> Result<()> {
        let a = vec![3.0, 4.0];
        let b = vec![-4.0, 3.0];
        assert_eq!(norm(&a), 5.0);
        assert_eq!(cosine(&a, &b)?, 0.0);
        assert_eq!(cosine(&a, &[0.0, 0.0])?, 0.0);
        assert_eq!(
            weighted_sum(&[a.clone(), b.clone()], &[0.5, 0.5])?,
            vec![-0.5, 3.5]
        );
        let c = cosine_matrix(&[a.clone(), b, vec![0.0, 0.0], vec![6.0, 8.0]])?;
        assert_eq!(&c[..4], &[1.0, 0.0, 0.0, 1.0]);
        assert_eq!(c[2 * 4 + 2], 0.0);
        assert!(dot(&a, &[1.0]).is_err());
        assert_eq!(sign(0.0), 0.0);
        assert_eq!(sign(-0.0), 0.0);
        assert_eq!(sample_weights(&[0, 0]), None);
        assert_eq!(sample_weights(&[1, 3]), Some(vec![0.25, 0.75]));
        Ok(())
    }

    /// The blocked, parallel Gram against plain dot products, on lengths
    /// that do not divide into pieces, blocks or lanes.
    #[test]
    fn blocked_gram_matches_plain_dots() -> Result<()> {
        for n in [0usize, 1, 3, 7, 2049, 5003, 64 * 2048 + 5] {
            let vectors: Vec<Vec<f64>> = (0..4)
                .map(|k| {
                    (0..n)
                        .map(|i| ((i * 7 + k * 13) % 29) as f64 / 7.0 - 2.0)
                        .collect()
                })
                .collect();
            let g = gram(&vectors)?;
            for i in 0..4 {
                for j in 0..4 {
                    let want = dot(&vectors[i], &vectors[j])?;
                    let err = (g[i * 4 + j] - want).abs();
                    assert!(err <= 1e-12 * want.abs().max(1.0), "n {n}: {err}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn top_k_breaks_ties_by_index() {
        let v = [1.0, -3.0, 3.0, 0.5, -1.0];
        assert_eq!(top_k_mask(&v, 1), vec![false, true, false, false, false]);
        assert_eq!(top_k_mask(&v, 3), vec![true, true, true, false, false]);
        assert_eq!(top_k_mask(&v, 0), vec![false; 5]);
        assert_eq!(top_k_mask(&v, 9), vec![true; 5]);
    }
}
