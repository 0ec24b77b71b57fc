//! k-means clustering of cached vision features, to give concept labels to
//! sources that have none (SCENARIOS.md S2: k = 16).
//!
//! Minimises the inertia `sum_i ||x_i - mu_{a(i)}||^2` by Lloyd's algorithm
//! (Lloyd 1982, "Least squares quantization in PCM"): assign each point to
//! its nearest centroid (ties to the lower index), move each centroid to
//! the mean of its points, repeat until no assignment changes or
//! `max_iter` rounds.
//!
//! Initialisation: greedy k-means++ (Arthur & Vassilvitskii 2007,
//! "k-means++: The Advantages of Careful Seeding"): the first centre is a
//! uniform point; each next one is the best, by resulting inertia, of
//! `2 + floor(ln k)` candidates drawn with probability proportional to the
//! squared distance to the nearest chosen centre (scikit-learn's variant;
//! the extra candidates make a centre landing in an already-covered blob
//! much less likely).
//!
//! Empty clusters are re-seeded deterministically with the point farthest
//! from its centroid (lowest index on ties, each point used once per
//! round), the usual fix that moves a centre to where the inertia is.
//!
//! Determinism: data is f32 but distances and means are accumulated in
//! f64, always in index order, and all randomness is one ChaCha8 stream of
//! the seed; results are bit-identical across runs and platforms (no
//! threads, no fused multiply-add: Rust never contracts `a * b + c`).

use super::{sampling, PartitionError};

/// k-means parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KMeansConfig {
    /// Number of clusters.
    pub k: usize,
    /// Most Lloyd rounds.
    pub max_iter: usize,
    pub seed: u64,
}

impl KMeansConfig {
    /// `k` clusters, at most 100 Lloyd rounds.
    pub fn new(k: usize, seed: u64) -> Self {
        Self {
            k,
            max_iter: 100,
            seed,
        }
    }
}

/// A clustering.
#[derive(Debug, Clone, PartialEq)]
pub struct KMeans {
    /// `k * dim` values, row-major.
    pub centroids: Vec<f32>,
    pub dim: usize,
    /// Cluster of each point, in `0..k`.
    pub assignments: Vec<u32>,
    /// Sum of squared distances of points to their centroids.
    pub inertia: f64,
    /// Lloyd rounds run.
    pub iterations: usize,
    /// Whether the assignments stopped changing before `max_iter`.
    pub converged: bool,
}

/// Clusters the rows of `data` (`n * dim` values, row-major).
pub fn kmeans(data: &[f32], dim: usize, config: &KMeansConfig) -> Result<KMeans, PartitionError> {
    if dim == 0 || !data.len().is_multiple_of(dim) {
        return Err(PartitionError::FeatureShape {
            len: data.len(),
            dim,
        });
    }
    let n = data.len() / dim;
    let k = config.k;
    if k == 0 || n < k {
        return Err(PartitionError::TooFewPoints { points: n, k });
    }
    if u32::try_from(k).is_err() {
        return Err(PartitionError::TooMany {
            what: "clusters",
            count: k,
        });
    }
    if let Some(row) = data
        .chunks_exact(dim)
        .position(|r| r.iter().any(|v| !v.is_finite()))
    {
        return Err(PartitionError::NonFiniteFeature { row });
    }
    let rows: Vec<&[f32]> = data.chunks_exact(dim).collect();
    let mut rng = sampling::stream(config.seed, sampling::Purpose::KMeans, 0);
    let mut centroids = init_plus_plus(&rows, k, &mut rng);

    let mut assignments = vec![usize::MAX; n];
    let mut d2 = vec![0.0f64; n];
    let mut iterations = 0;
    let mut converged = false;
    while iterations < config.max_iter {
        iterations += 1;
        let changed = assign(&rows, &centroids, &mut assignments, &mut d2);
        if !changed {
            // The centroids are already the means of these assignments.
            converged = true;
            break;
        }
        update(&rows, &mut centroids, &assignments, &d2);
    }
    if !converged {
        // Make the returned assignments match the returned centroids.
        assign(&rows, &centroids, &mut assignments, &mut d2);
    }
    Ok(KMeans {
        centroids: centroids.iter().flatten().map(|&v| v as f32).collect(),
        dim,
        assignments: assignments.iter().map(|&a| a as u32).collect(),
        inertia: d2.iter().sum(),
        iterations,
        converged,
    })
}

fn dist2(a: &[f32], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &c)| {
            let d = f64::from(x) - c;
            d * d
        })
        .sum()
}

fn to_f64(row: &[f32]) -> Vec<f64> {
    row.iter().map(|&v| f64::from(v)).collect()
}

/// Greedy k-means++ seeding.
fn init_plus_plus(rows: &[&[f32]], k: usize, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<Vec<f64>> {
    let n = rows.len();
    let trials = 2 + (k as f64).ln().floor() as usize;
    let first = sampling::below(rng, n);
    let mut chosen = vec![first];
    let mut centroids = vec![to_f64(rows[first])];
    let mut nearest: Vec<f64> = rows.iter().map(|r| dist2(r, &centroids[0])).collect();
    while centroids.len() < k {
        let total: f64 = nearest.iter().sum();
        let pick = if total > 0.0 {
            let mut best: Option<(f64, usize, Vec<f64>)> = None;
            for _ in 0..trials {
                let candidate = sample_by_weight(rng, &nearest, total);
                let centre = to_f64(rows[candidate]);
                let potential: f64 = rows
                    .iter()
                    .zip(&nearest)
                    .map(|(r, &d)| d.min(dist2(r, &centre)))
                    .sum();
                if best.as_ref().is_none_or(|(p, _, _)| potential < *p) {
                    best = Some((potential, candidate, centre));
                }
            }
            best.map(|(_, i, _)| i)
        } else {
            None
        };
        // Every point coincides with a centre (fewer distinct points than
        // k): take the lowest index not chosen yet; its cluster stays empty.
        let pick = pick
            .or_else(|| (0..n).find(|i| !chosen.contains(i)))
            .unwrap_or(first);
        let centre = to_f64(rows[pick]);
        for (d, r) in nearest.iter_mut().zip(rows) {
            *d = d.min(dist2(r, &centre));
        }
        chosen.push(pick);
        centroids.push(centre);
    }
    centroids
}

/// An index drawn with probability `weights[i] / total`.
fn sample_by_weight(rng: &mut rand_chacha::ChaCha8Rng, weights: &[f64], total: f64) -> usize {
    let target = sampling::unit(rng) * total;
    let mut cumulative = 0.0;
    let mut last = 0;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            cumulative += w;
            last = i;
            if cumulative > target {
                return i;
            }
        }
    }
    last
}

/// Nearest-centroid assignment; returns whether any assignment changed.
fn assign(
    rows: &[&[f32]],
    centroids: &[Vec<f64>],
    assignments: &mut [usize],
    d2: &mut [f64],
) -> bool {
    let mut changed = false;
    for ((row, a), d) in rows.iter().zip(assignments.iter_mut()).zip(d2.iter_mut()) {
        let mut best = (f64::INFINITY, 0);
        for (c, centre) in centroids.iter().enumerate() {
            let dc = dist2(row, centre);
            if dc < best.0 {
                best = (dc, c);
            }
        }
        if *a != best.1 {
            *a = best.1;
            changed = true;
        }
        *d = best.0;
    }
    changed
}

/// Centroids to the means of their points; empty clusters re-seeded.
fn update(rows: &[&[f32]], centroids: &mut [Vec<f64>], assignments: &[usize], d2: &[f64]) {
    let dim = centroids.first().map_or(0, Vec::len);
    let mut sums = vec![vec![0.0f64; dim]; centroids.len()];
    let mut counts = vec![0usize; centroids.len()];
    for (row, &a) in rows.iter().zip(assignments) {
        counts[a] += 1;
        for (s, &v) in sums[a].iter_mut().zip(row.iter()) {
            *s += f64::from(v);
        }
    }
    // Farthest points first (lowest index on ties) for empty clusters.
    let mut far: Vec<usize> = Vec::new();
    if counts.contains(&0) {
        far = (0..rows.len()).collect();
        far.sort_by(|&a, &b| d2[b].total_cmp(&d2[a]));
        far.reverse();
    }
    for ((centre, sum), &count) in centroids.iter_mut().zip(sums).zip(&counts) {
        if count > 0 {
            for (c, s) in centre.iter_mut().zip(sum) {
                *c = s / count as f64;
            }
        } else if let Some(i) = far.pop() {
            *centre = to_f64(rows[i]);
        }
    }
}
