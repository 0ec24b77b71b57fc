//! Train / validation / test splits, per source and stratified by label.
//!
//! Every source keeps its own held-out test split (never trained on) and
//! validation split (hyperparameter choice only), so evaluation can report
//! per domain (SCENARIOS.md, common rules). For a source of `n` items:
//!
//! - `n_test = max(round(test * n), min_count)` (0 when `test = 0`), and
//!   likewise `n_val`; at least one item must stay for training;
//! - the items are grouped into strata by label (items without a label form
//!   one stratum; a source without labels is one stratum), and each
//!   stratum of `m` items gives `n_test * m / n` test items, rounded by the
//!   largest-remainder (Hamilton) method so the totals are exact and every
//!   stratum is within one item of its proportional share (Hamilton's
//!   quota property); validation is apportioned the same way from what the
//!   test split left;
//! - which items of a stratum are held out is uniformly random.
//!
//! Each source draws from its own ChaCha8 stream (the source index is the
//! stream id), so adding a source leaves the other sources' splits as they
//! were. The partitioners then only ever see [`Splits::train`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{sampling, PartitionError, PartitionItem};

/// Held-out fractions per source; a scenario file's
/// `split = { validation = 0.05, test = 0.1, min-count = 1 }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct SplitSpec {
    /// Fraction of each source held out for validation.
    pub validation: f64,
    /// Fraction of each source held out for test.
    pub test: f64,
    /// Smallest validation and test split of a source (applies only to a
    /// split whose fraction is positive).
    pub min_count: usize,
}

impl Default for SplitSpec {
    fn default() -> Self {
        Self {
            validation: 0.05,
            test: 0.1,
            min_count: 1,
        }
    }
}

impl SplitSpec {
    /// Checks `0 <= fraction < 1` for both and `validation + test < 1`.
    pub fn validate(&self) -> Result<(), PartitionError> {
        for (name, value) in [("validation", self.validation), ("test", self.test)] {
            if !(value.is_finite() && (0.0..1.0).contains(&value)) {
                return Err(PartitionError::InvalidFraction { name, value });
            }
        }
        if self.validation + self.test >= 1.0 {
            return Err(PartitionError::InvalidFraction {
                name: "validation + test",
                value: self.validation + self.test,
            });
        }
        Ok(())
    }

    fn count(&self, fraction: f64, n: usize) -> usize {
        if fraction > 0.0 {
            ((fraction * n as f64).round() as usize).max(self.min_count)
        } else {
            0
        }
    }
}

/// Item indices of each split, each sorted ascending; disjoint, and
/// together every item.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Splits {
    pub train: Vec<usize>,
    pub validation: Vec<usize>,
    pub test: Vec<usize>,
}

/// Splits every source of `items` as `spec` says.
pub fn split(
    items: &[PartitionItem],
    spec: &SplitSpec,
    seed: u64,
) -> Result<Splits, PartitionError> {
    spec.validate()?;
    let mut by_source: BTreeMap<u32, BTreeMap<Option<u32>, Vec<usize>>> = BTreeMap::new();
    for (i, item) in items.iter().enumerate() {
        by_source
            .entry(item.source)
            .or_default()
            .entry(item.label)
            .or_default()
            .push(i);
    }
    let mut out = Splits::default();
    for (&source, strata) in &by_source {
        let n: usize = strata.values().map(Vec::len).sum();
        let n_test = spec.count(spec.test, n);
        let n_val = spec.count(spec.validation, n);
        if n_test + n_val >= n {
            return Err(PartitionError::SourceTooSmallForSplit {
                source_index: source,
                items: n,
                validation: n_val,
                test: n_test,
            });
        }
        let mut rng = sampling::stream(seed, sampling::Purpose::Split, u64::from(source));
        let mut strata: Vec<Vec<usize>> = strata.values().cloned().collect();
        for members in &mut strata {
            sampling::shuffle(&mut rng, members);
        }
        // A random order breaks ties between equal remainders, so no label
        // is systematically the one that gives the extra item.
        let mut order: Vec<usize> = (0..strata.len()).collect();
        sampling::shuffle(&mut rng, &mut order);
        let sizes: Vec<usize> = strata.iter().map(Vec::len).collect();
        let test = apportion(n_test, &sizes, &sizes, &order);
        let room: Vec<usize> = sizes.iter().zip(&test).map(|(m, t)| m - t).collect();
        let validation = apportion(n_val, &sizes, &room, &order);
        for ((members, t), v) in strata.iter().zip(&test).zip(&validation) {
            out.test.extend_from_slice(&members[..*t]);
            out.validation.extend_from_slice(&members[*t..t + v]);
            out.train.extend_from_slice(&members[t + v..]);
        }
    }
    out.train.sort_unstable();
    out.validation.sort_unstable();
    out.test.sort_unstable();
    Ok(out)
}

/// `total` split over strata in proportion to `weights`, each at most its
/// `cap` (largest remainder; ties in `order`). Requires
/// `total <= sum(cap)`, which the caller's size check guarantees.
fn apportion(total: usize, weights: &[usize], caps: &[usize], order: &[usize]) -> Vec<usize> {
    let wsum: u128 = weights.iter().map(|&w| w as u128).sum();
    if wsum == 0 {
        return vec![0; weights.len()];
    }
    // Exact integer quotas: floor and remainder of total * w / wsum.
    let exact: Vec<(usize, u128)> = weights
        .iter()
        .map(|&w| {
            let p = total as u128 * w as u128;
            ((p / wsum) as usize, p % wsum)
        })
        .collect();
    let mut out: Vec<usize> = exact
        .iter()
        .zip(caps)
        .map(|(&(q, _), &c)| q.min(c))
        .collect();
    let mut left = total.saturating_sub(out.iter().sum());
    let mut ranked = order.to_vec();
    // Stable: among equal remainders, `order` decides.
    ranked.sort_by(|&a, &b| exact[b].1.cmp(&exact[a].1));
    for &s in &ranked {
        if left == 0 {
            break;
        }
        if out[s] < caps[s] {
            out[s] += 1;
            left -= 1;
        }
    }
    // Caps bound (tiny strata): give what is left wherever there is room.
    for &s in &ranked {
        let take = left.min(caps[s] - out[s]);
        out[s] += take;
        left -= take;
    }
    out
}
