//! Paired differences between two methods of a comparison, with bootstrap
//! intervals (ALGORITHMS.md §7.5).
//!
//! Seed s gives every method the same initialisation, shard order and
//! client sampling, and every cell is scored on the same test items, so a
//! method and its baseline pair by seed and by item. The statistic is the
//! mean over seeds of `measure(method) - measure(baseline)`, the measure
//! taken as the report takes it (test NLL per token per domain, then the
//! macro average; an accuracy per labelled domain, then its macro
//! average). Its 95% interval is the percentile bootstrap over seeds x
//! test items: every replicate draws seeds with replacement and, per
//! domain, test items with replacement (the same items for every drawn
//! seed and both methods: the test items are one population), and
//! recomputes the statistic. An interval that holds 0 is reported as "no
//! difference".

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::summary::Measure;
use super::{Cell, Method};
use fedcmp_runtime::suite::DomainItems;

/// Bootstrap replicates per interval.
pub const REPLICATES: usize = 2000;

/// A paired difference `method - baseline` and its 95% interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PairedDifference {
    pub mean: f64,
    pub low: f64,
    pub high: f64,
    /// Seeds both methods have.
    pub seeds: usize,
}

impl PairedDifference {
    /// True when the interval holds 0: no difference shown.
    pub fn holds_zero(&self) -> bool {
        self.low <= 0.0 && 0.0 <= self.high
    }
}

/// One domain's per-item values for a measure: (numerator, weight) per
/// item; the domain's value is `sum num / sum weight` (NLL: minus the
/// log-likelihood over tokens; accuracy: hit over 1).
pub(crate) type DomainValues = Vec<(f64, f64)>;

fn domain_values(items: &DomainItems, measure: Measure) -> Option<DomainValues> {
    let values: DomainValues = match measure {
        Measure::TestNll | Measure::Recovery => items
            .log_likelihood
            .iter()
            .zip(&items.tokens)
            .map(|(ll, t)| (-ll, f64::from(*t)))
            .collect(),
        Measure::ZeroShot => items
            .zero_shot
            .iter()
            .map(|hit| (f64::from(u8::from(*hit)), 1.0))
            .collect(),
        Measure::CaptionAccuracy => items
            .caption
            .iter()
            .map(|hit| (f64::from(u8::from(*hit)), 1.0))
            .collect(),
    };
    (!values.is_empty()).then_some(values)
}

/// Per domain (None where the measure has no items), per cell.
fn cell_values(cell: &Cell, measure: Measure) -> Option<Vec<Option<DomainValues>>> {
    let suite = cell.suite.as_ref()?;
    Some(
        suite
            .domains
            .iter()
            .map(|d| domain_values(&d.items, measure))
            .collect(),
    )
}

/// The macro average over domains of `sum num / sum weight`, over the
/// items `pick[d]` of each domain.
pub(crate) fn macro_value(domains: &[Option<DomainValues>], pick: &[Vec<usize>]) -> f64 {
    let mut sum = 0.0;
    let mut n = 0usize;
    for (values, idx) in domains.iter().zip(pick) {
        let Some(values) = values else { continue };
        let (mut num, mut weight) = (0.0, 0.0);
        for &i in idx {
            num += values[i].0;
            weight += values[i].1;
        }
        if weight > 0.0 {
            sum += num / weight;
            n += 1;
        }
    }
    if n == 0 {
        f64::NAN
    } else {
        sum / n as f64
    }
}

/// The paired difference of `method` to `baseline` on `measure` in
/// `scenario`, over the seeds both have; None when they share no seed or
/// their items do not line up (cells from different suites). `seed` fixes
/// the bootstrap's draws.
pub fn paired_difference(
    cells: &[Cell],
    scenario: &str,
    measure: Measure,
    method: Method,
    baseline: Method,
    seed: u64,
) -> Option<PairedDifference> {
    let of = |m: Method, s: u64| {
        cells
            .iter()
            .find(|c| c.scenario == scenario && c.method == m.name() && c.seed == s)
    };
    let mut pairs = Vec::new();
    let mut seeds: Vec<u64> = cells
        .iter()
        .filter(|c| c.scenario == scenario && c.method == method.name())
        .map(|c| c.seed)
        .collect();
    seeds.sort_unstable();
    seeds.dedup();
    for s in seeds {
        let (Some(a), Some(b)) = (of(method, s), of(baseline, s)) else {
            continue;
        };
        let (Some(va), Some(vb)) = (cell_values(a, measure), cell_values(b, measure)) else {
            continue;
        };
        pairs.push((va, vb));
    }
    paired_bootstrap(&pairs, seed)
}

/// One seed's per-domain values of a method and of its baseline (`None`
/// where a domain has no items for the measure).
pub(crate) type SeedPair = (Vec<Option<DomainValues>>, Vec<Option<DomainValues>>);

/// The paired difference over `pairs` (one per seed): the mean over seeds
/// of the macro value of the method minus that of the baseline, with the
/// percentile bootstrap over seeds x items described in the module header.
/// None without pairs, when the items do not line up (every seed and both
/// sides must have the same items per domain) or when nothing is finite.
pub(crate) fn paired_bootstrap(pairs: &[SeedPair], seed: u64) -> Option<PairedDifference> {
    let (first, _) = pairs.first()?;
    // Every cell must have the same items per domain.
    let lens: Vec<usize> = first
        .iter()
        .map(|d| d.as_ref().map_or(0, Vec::len))
        .collect();
    let same = |v: &[Option<DomainValues>]| {
        v.len() == lens.len()
            && v.iter()
                .zip(&lens)
                .all(|(d, n)| d.as_ref().map_or(0, Vec::len) == *n)
    };
    if !pairs.iter().all(|(a, b)| same(a) && same(b)) {
        return None;
    }
    let all: Vec<Vec<usize>> = lens.iter().map(|n| (0..*n).collect()).collect();
    let difference = |pick: &[Vec<usize>], seeds: &[usize]| -> f64 {
        seeds
            .iter()
            .map(|&s| macro_value(&pairs[s].0, pick) - macro_value(&pairs[s].1, pick))
            .sum::<f64>()
            / seeds.len() as f64
    };
    let n = pairs.len();
    let mean = difference(&all, &(0..n).collect::<Vec<_>>());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut replicates: Vec<f64> = (0..REPLICATES)
        .map(|_| {
            let drawn: Vec<usize> = (0..n).map(|_| rng.random_range(0..n)).collect();
            let pick: Vec<Vec<usize>> = lens
                .iter()
                .map(|&len| (0..len).map(|_| rng.random_range(0..len)).collect())
                .collect();
            difference(&pick, &drawn)
        })
        .filter(|v| v.is_finite())
        .collect();
    if replicates.is_empty() || !mean.is_finite() {
        return None;
    }
    replicates.sort_by(f64::total_cmp);
    let at = |q: f64| replicates[((q * (replicates.len() - 1) as f64).round()) as usize];
    Some(PairedDifference {
        mean,
        low: at(0.025),
        high: at(0.975),
        seeds: n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedcmp_runtime::suite::{DomainScores, SuiteReport};

    fn cell(method: &str, seed: u64, domains: Vec<DomainItems>) -> Cell {
        super::super::test_cell(
            method,
            seed,
            SuiteReport {
                domains: domains
                    .into_iter()
                    .map(|items| DomainScores {
                        domain: "d".into(),
                        samples: items.tokens.len(),
                        tokens: items.tokens.iter().map(|t| *t as usize).sum(),
                        nll: f64::NAN,
                        perplexity: f64::NAN,
                        zero_shot_accuracy: None,
                        zero_shot_raw_accuracy: None,
                        zero_shot_images: items.zero_shot.len(),
                        classes: 2,
                        caption_accuracy: None,
                        caption_checks: items.caption.len(),
                        items,
                    })
                    .collect(),
                macro_nll: f64::NAN,
                macro_perplexity: f64::NAN,
                macro_zero_shot_accuracy: None,
                macro_zero_shot_raw_accuracy: None,
                macro_caption_accuracy: None,
                chance: None,
                captions: Vec::new(),
            },
        )
    }

    fn items(ll: &[f64], tokens: &[u32], hits: &[bool]) -> DomainItems {
        DomainItems {
            log_likelihood: ll.to_vec(),
            tokens: tokens.to_vec(),
            zero_shot: hits.to_vec(),
            caption: Vec::new(),
        }
    }

    const FEDAVG: Method = Method::Strategy("fedavg");
    const FEDCMP: Method = Method::Strategy("fed-cmp");

    /// A method that is the baseline shifted by exactly d nats per token
    /// differs by d in every replicate: the interval is [d, d].
    #[test]
    fn a_constant_shift_is_recovered_exactly() {
        let tokens = [3u32, 5, 2, 7];
        let base_ll = [-6.0, -11.0, -3.0, -15.0];
        let shifted: Vec<f64> = base_ll
            .iter()
            .zip(&tokens)
            .map(|(ll, t)| ll - 0.25 * f64::from(*t))
            .collect();
        let cells: Vec<Cell> = (0..3)
            .flat_map(|s| {
                [
                    cell("fedavg", s, vec![items(&base_ll, &tokens, &[])]),
                    cell("fed-cmp", s, vec![items(&shifted, &tokens, &[])]),
                ]
            })
            .collect();
        let d = paired_difference(&cells, "s", Measure::TestNll, FEDCMP, FEDAVG, 1);
        let d = d.unwrap_or(PairedDifference {
            mean: 0.0,
            low: 0.0,
            high: 0.0,
            seeds: 0,
        });
        assert_eq!(d.seeds, 3);
        for v in [d.mean, d.low, d.high] {
            assert!((v - 0.25).abs() < 1e-12, "{d:?}");
        }
        assert!(!d.holds_zero());
        let same = paired_difference(&cells, "s", Measure::TestNll, FEDAVG, FEDAVG, 1);
        assert!(same.is_some_and(|d| d.mean == 0.0 && d.holds_zero()));
    }

    /// One seed, one domain, paired hits: the bootstrap interval of the
    /// mean difference is close to the normal one, mean +- 1.96 sd / sqrt(n)
    /// (n = 400 items, where the two agree to a few thousandths).
    #[test]
    fn the_interval_matches_the_normal_approximation() {
        let n = 400;
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let base: Vec<bool> = (0..n).map(|_| rng.random_bool(0.5)).collect();
        let better: Vec<bool> = base.iter().map(|b| *b || rng.random_bool(0.2)).collect();
        let cells = vec![
            cell("fedavg", 0, vec![items(&[], &[], &base)]),
            cell("fed-cmp", 0, vec![items(&[], &[], &better)]),
        ];
        let d = paired_difference(&cells, "s", Measure::ZeroShot, FEDCMP, FEDAVG, 3);
        let Some(d) = d else {
            panic!("no difference computed");
        };
        let diffs: Vec<f64> = better
            .iter()
            .zip(&base)
            .map(|(a, b)| f64::from(u8::from(*a)) - f64::from(u8::from(*b)))
            .collect();
        let mean = diffs.iter().sum::<f64>() / n as f64;
        let var = diffs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let half = 1.96 * (var / n as f64).sqrt();
        assert!((d.mean - mean).abs() < 1e-12);
        assert!(
            (d.low - (mean - half)).abs() < 0.01,
            "{d:?} vs {}",
            mean - half
        );
        assert!(
            (d.high - (mean + half)).abs() < 0.01,
            "{d:?} vs {}",
            mean + half
        );
        assert!(!d.holds_zero());
    }

    /// Cells scored on different items do not pair.
    #[test]
    fn mismatched_items_do_not_pair() {
        let cells = vec![
            cell("fedavg", 0, vec![items(&[-1.0, -2.0], &[1, 1], &[])]),
            cell("fed-cmp", 0, vec![items(&[-1.0], &[1], &[])]),
        ];
        assert!(paired_difference(&cells, "s", Measure::TestNll, FEDCMP, FEDAVG, 0).is_none());
        assert!(paired_difference(&cells, "s", Measure::ZeroShot, FEDCMP, FEDAVG, 0).is_none());
    }
}
