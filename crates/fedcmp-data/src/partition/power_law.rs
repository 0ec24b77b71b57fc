//! Power-law quantity skew (SCENARIOS.md S4): shard sizes follow a Zipf-like
//! power law, `size_r ∝ r^(-a)` for ranks `r = 1..K`, the unbalanced
//! setting of LEAF (Caldas et al. 2018, "LEAF: A Benchmark for Federated
//! Settings", whose real device datasets have power-law sizes) and of
//! Li et al. 2020 (FedProx), combined with a partitioner that decides
//! which items fill each shard.
//!
//! The exponent is set from the requested ratio of the largest shard to
//! the smallest, `ratio = K^a`, so `a = ln(ratio) / ln(K)` and the target
//! is met exactly before rounding to whole items (largest remainder, which
//! keeps the sizes non-increasing in rank). The sizes are then dealt to
//! clients in a random order, so a client's id says nothing about its size.
//!
//! Composition: `inner = iid` cuts a random permutation into those sizes;
//! `inner = dirichlet` deals them by client-side Dirichlet
//! ([`super::dirichlet::client_side`]), so label/concept skew and quantity
//! skew combine.

use rand_chacha::ChaCha8Rng;

use super::{dirichlet, iid, sampling, PartitionError, PartitionItem, PartitionSpec, Shards};

/// Power-law partition of `pool` (sorted, unique) into `clients` shards.
pub fn power_law(
    items: &[PartitionItem],
    pool: &[usize],
    clients: usize,
    ratio: f64,
    inner: &PartitionSpec,
    rng: &mut ChaCha8Rng,
) -> Result<Shards, PartitionError> {
    match inner {
        PartitionSpec::Iid {} => {
            let mut s = sizes(pool.len(), clients, ratio, 1)?;
            sampling::shuffle(rng, &mut s);
            iid::iid_sized(pool, &s, rng)
        }
        PartitionSpec::Dirichlet {
            alpha,
            key,
            min_size,
        } => {
            let mut s = sizes(pool.len(), clients, ratio, *min_size)?;
            sampling::shuffle(rng, &mut s);
            dirichlet::client_side(items, pool, &s, *alpha, *key, rng)
        }
        PartitionSpec::BySource { .. } => Err(PartitionError::UnsupportedComposition {
            inner: "by-source",
            reason: "by-source shard sizes follow the sources",
        }),
        PartitionSpec::PowerLaw { .. } => Err(PartitionError::UnsupportedComposition {
            inner: "power-law",
            reason: "a shard can have only one size",
        }),
    }
}

/// Shard sizes by rank (largest first) summing to `total`, largest /
/// smallest = `ratio` up to rounding; every size at least `min_size` (and
/// at least 1), else an error.
pub fn sizes(
    total: usize,
    clients: usize,
    ratio: f64,
    min_size: usize,
) -> Result<Vec<usize>, PartitionError> {
    if clients == 0 {
        return Err(PartitionError::NoClients);
    }
    if !(ratio.is_finite() && ratio >= 1.0) {
        return Err(PartitionError::InvalidParameter {
            name: "ratio",
            value: ratio,
            expected: "a finite number >= 1 (largest shard / smallest shard)",
        });
    }
    let floor = min_size.max(1);
    if total < clients.saturating_mul(floor) {
        return Err(PartitionError::TooFewItems {
            items: total,
            clients,
            min_size: floor,
        });
    }
    let exponent = if clients > 1 {
        ratio.ln() / (clients as f64).ln()
    } else {
        0.0
    };
    let weights: Vec<f64> = (1..=clients).map(|r| (r as f64).powf(-exponent)).collect();
    let sum: f64 = weights.iter().sum();
    let quotas: Vec<f64> = weights.iter().map(|w| total as f64 * w / sum).collect();
    let mut out: Vec<usize> = quotas.iter().map(|q| q.floor() as usize).collect();
    let assigned: usize = out.iter().sum();
    // Largest remainder; a stable sort keeps lower ranks first on ties.
    let mut order: Vec<usize> = (0..clients).collect();
    order.sort_by(|&a, &b| {
        let fa = quotas[a] - quotas[a].floor();
        let fb = quotas[b] - quotas[b].floor();
        fb.total_cmp(&fa)
    });
    for &r in order.iter().cycle().take(total.saturating_sub(assigned)) {
        out[r] += 1;
    }
    let smallest = out.iter().copied().min().unwrap_or(0);
    if smallest < floor {
        return Err(PartitionError::PowerLawTooSmall {
            ratio,
            clients,
            items: total,
            smallest,
            min_size: floor,
        });
    }
    Ok(out)
}
