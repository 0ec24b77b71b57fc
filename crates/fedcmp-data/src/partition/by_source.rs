//! By-source partition ("domain silos", SCENARIOS.md S3): every client
//! holds items of exactly one source, as in cross-silo feature-shift
//! benchmarks (e.g. FedBN, Li et al. 2021, "FedBN: Federated Learning on
//! Non-IID Features via Local Batch Normalization", one client per domain).
//!
//! - `clients_per_source = n`: each source is split uniformly at random
//!   into `n` near-equal shards; the client count must be `n * sources`.
//! - no `clients_per_source`: the requested clients are spread over the
//!   sources, one each, and every further client goes to the source whose
//!   clients currently hold the most items each (ties: fewer clients, then
//!   lower source index), which keeps the largest shard as small as
//!   possible; with 6 clients over 4 sources the two largest sources get
//!   two ("one or two per source").
//!
//! Clients are numbered source by source, in source-index order.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;

use rand_chacha::ChaCha8Rng;

use super::{cut, equal_sizes, sampling, PartitionError, PartitionItem, Shards};

/// By-source partition of `pool` (sorted, unique).
pub fn by_source(
    items: &[PartitionItem],
    pool: &[usize],
    clients: usize,
    clients_per_source: Option<NonZeroUsize>,
    rng: &mut ChaCha8Rng,
) -> Result<Shards, PartitionError> {
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
    let mut groups: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for &i in pool {
        if let Some(item) = items.get(i) {
            groups.entry(item.source).or_default().push(i);
        }
    }
    let sizes: Vec<usize> = groups.values().map(Vec::len).collect();
    let counts = clients_per_sources(&sizes, clients, clients_per_source)?;
    let mut shards = Vec::with_capacity(clients);
    for ((&source, members), &n) in groups.iter().zip(&counts) {
        if members.len() < n {
            return Err(PartitionError::SourceTooSmallForClients {
                source_index: source,
                items: members.len(),
                clients: n,
            });
        }
        let mut members = members.clone();
        sampling::shuffle(rng, &mut members);
        shards.extend(cut(&members, &equal_sizes(members.len(), n)));
    }
    Ok(shards)
}

/// How many clients each source (with `sizes[s]` items) gets.
pub fn clients_per_sources(
    sizes: &[usize],
    clients: usize,
    clients_per_source: Option<NonZeroUsize>,
) -> Result<Vec<usize>, PartitionError> {
    let sources = sizes.len();
    if let Some(n) = clients_per_source {
        let expected = n.get().saturating_mul(sources);
        if expected != clients {
            return Err(PartitionError::ClientCountMismatch {
                per_source: n.get(),
                sources,
                expected,
                clients,
            });
        }
        return Ok(vec![n.get(); sources]);
    }
    if clients < sources || sources == 0 {
        return Err(PartitionError::FewerClientsThanSources { sources, clients });
    }
    let mut counts = vec![1usize; sources];
    for _ in sources..clients {
        // The source whose clients hold the most items each gets the next
        // one (greedy, which minimises the largest shard); on a tie the one
        // with fewer clients, so clients spread over sources. Compared as
        // cross products: exact integer arithmetic.
        let mut best = 0;
        for s in 1..sources {
            let lhs = sizes[s] as u128 * counts[best] as u128;
            let rhs = sizes[best] as u128 * counts[s] as u128;
            if lhs > rhs || (lhs == rhs && counts[s] < counts[best]) {
                best = s;
            }
        }
        counts[best] += 1;
    }
    Ok(counts)
}
