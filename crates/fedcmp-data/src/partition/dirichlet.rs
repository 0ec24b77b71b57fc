//! Dirichlet partitions: skew over a [`PartitionKey`] (label, concept
//! cluster, source, or a (source, concept) pair).
//!
//! **Label-side** ([`label_side`], free shard sizes). For each key value
//! `c` with items `I_c` (shuffled), draw client proportions
//! `w_c ~ Dir(alpha * 1_K)` and give client `k` the slice
//! `I_c[floor(n_c * W_{k-1}) .. floor(n_c * W_k)]`, `W_k = w_c1 + .. + w_ck`.
//! This is the scheme of Yurochkin et al. 2019 (PFNM) and Wang et al. 2020
//! (FedMA), as implemented by NIID-Bench (Li et al. 2022, "Federated
//! Learning on Non-IID Data Silos: An Experimental Study") and FedLab's
//! `hetero_dir_partition`, including two of their details:
//! - balance: a client already holding `N / K` items gets no share of the
//!   remaining key values (its `w_ck` is zeroed and `w_c` renormalised), so
//!   one client cannot absorb most of the data;
//! - minimum size: if any shard ends below `min_size`, everything is drawn
//!   again, at most [`MAX_DRAWS`] times, then a clear error.
//!
//! **Client-side** ([`client_side`], shard sizes given, e.g. power-law).
//! Hsu, Qi & Brown 2019, "Measuring the Effects of Non-Identical Data
//! Distribution for Federated Visual Classification": client `k` draws
//! its key mixture `q_k ~ Dir(a * p)` with `p` the pooled key distribution;
//! items are then dealt one at a time to a random client with room left,
//! of a key drawn from its `q_k` (FedLab's
//! `client_inner_dirichlet_partition`). We set `a = alpha * C` (C key
//! values) so that alpha means what it means label-side: with balanced keys
//! both give each client roughly a `Dir(alpha * 1_C)` mixture. A key that
//! runs out is removed from every mixture (renormalised) rather than
//! redrawn in a loop, so the deal always terminates.

use rand_chacha::ChaCha8Rng;

use super::{group_by_key, sampling, PartitionError, PartitionKey, Shards};

/// Redraws allowed for the minimum shard size before giving up.
pub const MAX_DRAWS: usize = 1000;

/// Minimum shard size when a scenario does not say (NIID-Bench's value).
pub const DEFAULT_MIN_SIZE: usize = 10;

/// Parameters of a Dirichlet partition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    pub alpha: f64,
    pub key: PartitionKey,
    pub min_size: usize,
}

fn check_alpha(alpha: f64) -> Result<(), PartitionError> {
    if alpha.is_finite() && alpha > 0.0 {
        Ok(())
    } else {
        Err(PartitionError::InvalidParameter {
            name: "alpha",
            value: alpha,
            expected: "a finite number > 0",
        })
    }
}

/// Label-side Dirichlet partition of `pool` (sorted, unique) into
/// `clients` shards.
pub fn label_side(
    items: &[super::PartitionItem],
    pool: &[usize],
    clients: usize,
    params: &Params,
    rng: &mut ChaCha8Rng,
) -> Result<Shards, PartitionError> {
    check_alpha(params.alpha)?;
    if clients == 0 {
        return Err(PartitionError::NoClients);
    }
    let floor = params.min_size.max(1);
    if pool.len() < clients.saturating_mul(floor) {
        return Err(PartitionError::TooFewItems {
            items: pool.len(),
            clients,
            min_size: floor,
        });
    }
    let groups = group_by_key(items, pool, params.key)?;
    let concentration = vec![params.alpha; clients];
    // NIID-Bench's balance cap: N / K items.
    let cap = pool.len() as f64 / clients as f64;
    let mut smallest = 0;
    for _ in 0..MAX_DRAWS {
        let mut shards: Shards = vec![Vec::new(); clients];
        for members in groups.values() {
            let mut members = members.clone();
            sampling::shuffle(rng, &mut members);
            let mut w = sampling::dirichlet(rng, &concentration);
            for (wk, shard) in w.iter_mut().zip(&shards) {
                if shard.len() as f64 >= cap {
                    *wk = 0.0;
                }
            }
            let total: f64 = w.iter().sum();
            if total > 0.0 {
                for wk in &mut w {
                    *wk /= total;
                }
            } else {
                // Every client with room drew a weight that underflowed
                // (alpha far below 0.01): share evenly among them. Some
                // client always has room while items remain.
                let open: Vec<bool> = shards.iter().map(|s| (s.len() as f64) < cap).collect();
                let n_open = open.iter().filter(|&&o| o).count().max(1) as f64;
                for (wk, o) in w.iter_mut().zip(open) {
                    *wk = if o { 1.0 / n_open } else { 0.0 };
                }
            }
            let n = members.len();
            let mut start = 0;
            let mut cumulative = 0.0;
            for (k, (wk, shard)) in w.iter().zip(shards.iter_mut()).enumerate() {
                cumulative += wk;
                let end = if k + 1 == clients {
                    n
                } else {
                    ((cumulative * n as f64).floor() as usize).clamp(start, n)
                };
                shard.extend_from_slice(&members[start..end]);
                start = end;
            }
        }
        smallest = shards.iter().map(Vec::len).min().unwrap_or(0);
        if smallest >= params.min_size {
            return Ok(shards);
        }
    }
    Err(PartitionError::MinSizeUnreachable {
        alpha: params.alpha,
        key: params.key,
        min_size: params.min_size,
        attempts: MAX_DRAWS,
        smallest,
    })
}

/// Client-side Dirichlet partition of `pool` (sorted, unique) into shards
/// of exactly `sizes` (which must sum to the pool's length).
pub fn client_side(
    items: &[super::PartitionItem],
    pool: &[usize],
    sizes: &[usize],
    alpha: f64,
    key: PartitionKey,
    rng: &mut ChaCha8Rng,
) -> Result<Shards, PartitionError> {
    check_alpha(alpha)?;
    if sizes.is_empty() {
        return Err(PartitionError::NoClients);
    }
    let total: usize = sizes.iter().sum();
    if total != pool.len() {
        return Err(PartitionError::LengthMismatch {
            what: "shard sizes (sum)",
            expected: pool.len(),
            got: total,
        });
    }
    let mut groups: Vec<Vec<usize>> = group_by_key(items, pool, key)?.into_values().collect();
    for members in &mut groups {
        sampling::shuffle(rng, members);
    }
    let n_keys = groups.len() as f64;
    let concentration: Vec<f64> = groups
        .iter()
        .map(|g| alpha * n_keys * g.len() as f64 / total as f64)
        .collect();
    let mixtures: Vec<Vec<f64>> = sizes
        .iter()
        .map(|_| sampling::dirichlet(rng, &concentration))
        .collect();

    let mut shards: Shards = sizes.iter().map(|&s| Vec::with_capacity(s)).collect();
    let mut room = sizes.to_vec();
    let mut open: Vec<usize> = (0..sizes.len()).filter(|&k| room[k] > 0).collect();
    let mut left = total;
    while !open.is_empty() {
        let slot = sampling::below(rng, open.len());
        let k = open[slot];
        let chosen = draw_key(rng, &mixtures[k], &groups, left);
        if let Some(item) = groups.get_mut(chosen).and_then(Vec::pop) {
            shards[k].push(item);
            left -= 1;
        }
        room[k] -= 1;
        if room[k] == 0 {
            open.swap_remove(slot);
        }
    }
    Ok(shards)
}

/// A key with items left, drawn from `mixture` restricted to such keys;
/// if the client's mixture has no mass left on them, in proportion to the
/// items left (`left` of them, at least one).
fn draw_key(rng: &mut ChaCha8Rng, mixture: &[f64], groups: &[Vec<usize>], left: usize) -> usize {
    let mass: f64 = mixture
        .iter()
        .zip(groups)
        .filter(|(_, g)| !g.is_empty())
        .map(|(q, _)| q)
        .sum();
    let mut last = 0;
    if mass > 0.0 {
        let target = sampling::unit(rng) * mass;
        let mut cumulative = 0.0;
        for (c, (q, g)) in mixture.iter().zip(groups).enumerate() {
            if g.is_empty() {
                continue;
            }
            cumulative += q;
            last = c;
            if cumulative > target {
                return c;
            }
        }
        // Rounding left the target just past the sum: the last key.
        return last;
    }
    let mut target = sampling::below(rng, left.max(1));
    for (c, g) in groups.iter().enumerate() {
        if target < g.len() {
            return c;
        }
        target -= g.len();
        if !g.is_empty() {
            last = c;
        }
    }
    last
}
