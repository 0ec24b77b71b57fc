//! IID partition: a uniform random permutation of the pool cut into `K`
//! near-equal shards (sizes differ by at most one), the "IID" baseline of
//! McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
//! from Decentralized Data" (FedAvg), and SCENARIOS.md S1.
//!
//! [`iid_sized`] cuts the same permutation into given sizes instead, which
//! is how [`super::power_law`] gets quantity skew without label skew.

use rand_chacha::ChaCha8Rng;

use super::{cut, equal_sizes, sampling, PartitionError, Shards};

/// `pool` (sorted, unique) into `clients` near-equal random shards.
pub fn iid(pool: &[usize], clients: usize, rng: &mut ChaCha8Rng) -> Result<Shards, PartitionError> {
    if clients == 0 {
        return Err(PartitionError::NoClients);
    }
    if pool.len() < clients {
        return Err(PartitionError::TooFewItems {
            items: pool.len(),
            clients,
            min_size: 1,
        });
    }
    iid_sized(pool, &equal_sizes(pool.len(), clients), rng)
}

/// `pool` into random shards of exactly `sizes` (which must sum to the
/// pool's length).
pub fn iid_sized(
    pool: &[usize],
    sizes: &[usize],
    rng: &mut ChaCha8Rng,
) -> Result<Shards, PartitionError> {
    let total: usize = sizes.iter().sum();
    if total != pool.len() {
        return Err(PartitionError::LengthMismatch {
            what: "shard sizes (sum)",
            expected: pool.len(),
            got: total,
        });
    }
    let mut shuffled = pool.to_vec();
    sampling::shuffle(rng, &mut shuffled);
    Ok(cut(&shuffled, sizes))
}
