//! What a partition looks like, for `fedcmp scenario show` and for tests:
//! per shard its size and source / label / key histograms, and skew
//! statistics over a [`PartitionKey`]:
//!
//! - size ratio `max_k |S_k| / min_k |S_k|` (quantity skew; infinite when
//!   a shard is empty);
//! - top-1 and top-2 share: the fraction of a shard's keyed items that
//!   belong to its one (two) most frequent key values, averaged over
//!   shards (label skew: ~1/C when IID over C values, -> 1 when each client
//!   sees one value);
//! - total-variation distance `0.5 * sum_v |q_k(v) - p(v)|` between a
//!   shard's key distribution and the pooled one, averaged over shards (0
//!   when IID);
//! - source purity: the share of a shard's dominant source, averaged.
//!
//! Shares are over the items that have a key value; items without one are
//! counted apart (`missing_key`).

use std::collections::BTreeMap;

use super::{KeyValue, PartitionError, PartitionItem, PartitionKey};

/// One shard's contents.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ShardSummary {
    pub size: usize,
    /// Items per source index.
    pub sources: BTreeMap<u32, usize>,
    /// Items per (source index, label); unlabelled items are not counted.
    pub labels: BTreeMap<(u32, u32), usize>,
    /// Items per value of the summary's key.
    pub keys: BTreeMap<KeyValue, usize>,
    /// Items without a value of the key.
    pub missing_key: usize,
    /// Share of the most frequent key value (0 for no keyed items).
    pub top1_share: f64,
    /// Share of the two most frequent key values.
    pub top2_share: f64,
    /// Total-variation distance to the pooled key distribution.
    pub total_variation: f64,
    /// Share of the most frequent source (0 for an empty shard).
    pub source_purity: f64,
}

/// Skew over all shards.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SkewStats {
    pub clients: usize,
    pub items: usize,
    pub min_size: usize,
    pub max_size: usize,
    /// `max_size / min_size` (infinite if a shard is empty).
    pub size_ratio: f64,
    pub mean_top1_share: f64,
    pub mean_top2_share: f64,
    pub mean_total_variation: f64,
    pub mean_source_purity: f64,
    /// Mean number of distinct key values per shard.
    pub mean_distinct_keys: f64,
}

/// Shards and their skew over one key.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionSummary {
    pub key: PartitionKey,
    pub shards: Vec<ShardSummary>,
    pub stats: SkewStats,
}

/// Summarises `shards` (indices into `items`) over `key`.
pub fn summarize(
    items: &[PartitionItem],
    shards: &[Vec<usize>],
    key: PartitionKey,
) -> Result<PartitionSummary, PartitionError> {
    let mut out: Vec<ShardSummary> = Vec::with_capacity(shards.len());
    let mut pooled: BTreeMap<KeyValue, usize> = BTreeMap::new();
    for shard in shards {
        let mut s = ShardSummary {
            size: shard.len(),
            ..ShardSummary::default()
        };
        for &i in shard {
            let item = items.get(i).ok_or(PartitionError::IndexOutOfRange {
                index: i,
                items: items.len(),
            })?;
            *s.sources.entry(item.source).or_default() += 1;
            if let Some(l) = item.label {
                *s.labels.entry((item.source, l)).or_default() += 1;
            }
            match key.value(item) {
                Some(v) => {
                    *s.keys.entry(v).or_default() += 1;
                    *pooled.entry(v).or_default() += 1;
                }
                None => s.missing_key += 1,
            }
        }
        let keyed = s.size - s.missing_key;
        let mut counts: Vec<usize> = s.keys.values().copied().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        s.top1_share = share(counts.iter().take(1).sum(), keyed);
        s.top2_share = share(counts.iter().take(2).sum(), keyed);
        s.source_purity = share(s.sources.values().copied().max().unwrap_or(0), s.size);
        out.push(s);
    }
    let pooled_total: usize = pooled.values().sum();
    for s in &mut out {
        let keyed = s.size - s.missing_key;
        s.total_variation = if keyed == 0 || pooled_total == 0 {
            0.0
        } else {
            0.5 * pooled
                .iter()
                .map(|(v, &c)| {
                    let q = share(s.keys.get(v).copied().unwrap_or(0), keyed);
                    (q - share(c, pooled_total)).abs()
                })
                .sum::<f64>()
        };
    }
    let stats = stats(&out);
    Ok(PartitionSummary {
        key,
        shards: out,
        stats,
    })
}

fn share(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn stats(shards: &[ShardSummary]) -> SkewStats {
    let k = shards.len();
    let mean = |f: &dyn Fn(&ShardSummary) -> f64| {
        if k == 0 {
            0.0
        } else {
            shards.iter().map(f).sum::<f64>() / k as f64
        }
    };
    let min_size = shards.iter().map(|s| s.size).min().unwrap_or(0);
    let max_size = shards.iter().map(|s| s.size).max().unwrap_or(0);
    SkewStats {
        clients: k,
        items: shards.iter().map(|s| s.size).sum(),
        min_size,
        max_size,
        size_ratio: if min_size == 0 {
            f64::INFINITY
        } else {
            max_size as f64 / min_size as f64
        },
        mean_top1_share: mean(&|s| s.top1_share),
        mean_top2_share: mean(&|s| s.top2_share),
        mean_total_variation: mean(&|s| s.total_variation),
        mean_source_purity: mean(&|s| s.source_purity),
        mean_distinct_keys: mean(&|s| s.keys.len() as f64),
    }
}
