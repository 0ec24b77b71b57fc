//! Seeded, deterministic train/validation/test splits and federated
//! partitioners, as pure logic over abstract items.
//!
//! The input is one [`PartitionItem`] per record: its source (domain)
//! index, its class label where the source has labels, and its concept
//! cluster where one was derived ([`kmeans()`] over cached vision features).
//! Outputs are item indices: a [`Splits`] per source, then
//! shards (`Vec<Vec<usize>>`, one per client, each sorted).
//!
//! Order of operations, which is what keeps evaluation honest:
//!
//! 1. [`split()`] holds out validation and test items per source (stratified
//!    by label), never trained on;
//! 2. [`partition()`] sees only the train indices (the `pool`) and deals them
//!    to clients according to a [`PartitionSpec`].
//!
//! [`plan`] does both. The partitioners (one file each, with the paper
//! and definition in its header):
//!
//! - [`iid`]: uniform random, near-equal shards;
//! - [`dirichlet`]: label-side Dirichlet(alpha) over a [`PartitionKey`]
//!   (Yurochkin et al. 2019; NIID-Bench), or, with fixed shard sizes,
//!   client-side Dirichlet (Hsu et al. 2019);
//! - [`by_source`]: each source to one client or split across several;
//! - [`power_law`]: power-law shard sizes wrapped around another partitioner.
//!
//! [`summarize`] reports per-shard histograms and skew statistics (for
//! `fedcmp scenario show` and the tests).
//!
//! Determinism: same items, spec, client count and seed give the same
//! shards bit for bit; all randomness comes from ChaCha8 streams through
//! the crate's own sampling primitives (module `sampling`: ChaCha8 output
//! only, so a `rand` upgrade cannot change shards).
//!
//! Errors are [`PartitionError`]s with the numbers that make a request
//! impossible (more clients than items, a key the items lack, ...).

pub mod by_source;
pub mod dirichlet;
pub mod iid;
pub mod kmeans;
pub mod power_law;
mod sampling;
pub mod split;
pub mod summary;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::num::NonZeroUsize;

use serde::{Deserialize, Serialize};

use crate::record::Record;

pub use kmeans::{kmeans, KMeans, KMeansConfig};
pub use split::{split, SplitSpec, Splits};
pub use summary::{summarize, PartitionSummary, ShardSummary, SkewStats};

/// One shard of item indices per client, each sorted ascending.
pub type Shards = Vec<Vec<usize>>;

/// What a partitioner needs to know about one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PartitionItem {
    /// Index of the record's source (domain), e.g. into
    /// [`IndexedItems::sources`].
    pub source: u32,
    /// Class label within the source, where the source has labels.
    pub label: Option<u32>,
    /// Concept cluster within the source (k-means over vision features),
    /// where one was derived.
    pub cluster: Option<u32>,
}

/// Which property of an item a Dirichlet partition skews.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartitionKey {
    /// The class label. Equal labels of different sources count as the same
    /// value; use [`PartitionKey::SourceLabel`] to keep them apart.
    Label,
    /// The k-means concept cluster.
    Cluster,
    /// The label where the item has one, else its cluster (SCENARIOS.md S2:
    /// "labels where they exist, else k-means clusters").
    Concept,
    /// The source (domain).
    Source,
    /// The pair (source, label).
    SourceLabel,
    /// The pair (source, cluster).
    SourceCluster,
    /// The pair (source, concept) (SCENARIOS.md S4).
    SourceConcept,
}

impl PartitionKey {
    /// The key's value for `item`, or `None` when the item lacks it.
    pub fn value(self, item: &PartitionItem) -> Option<KeyValue> {
        let concept = || match (item.label, item.cluster) {
            (Some(l), _) => Some(KeyValue::Label(l)),
            (None, Some(c)) => Some(KeyValue::Cluster(c)),
            (None, None) => None,
        };
        let s = item.source;
        match self {
            Self::Label => item.label.map(KeyValue::Label),
            Self::Cluster => item.cluster.map(KeyValue::Cluster),
            Self::Concept => concept(),
            Self::Source => Some(KeyValue::Source(s)),
            Self::SourceLabel => item.label.map(|l| KeyValue::SourceLabel(s, l)),
            Self::SourceCluster => item.cluster.map(|c| KeyValue::SourceCluster(s, c)),
            Self::SourceConcept => concept().map(|v| match v {
                KeyValue::Label(l) => KeyValue::SourceLabel(s, l),
                KeyValue::Cluster(c) => KeyValue::SourceCluster(s, c),
                other => other,
            }),
        }
    }

    fn hint(self) -> &'static str {
        match self {
            Self::Label | Self::SourceLabel => {
                "use key = \"concept\" (or \"source-concept\") and derive clusters \
                 with k-means for sources without labels"
            }
            Self::Cluster | Self::SourceCluster | Self::Concept | Self::SourceConcept => {
                "run k-means over the cached vision features of unlabelled sources \
                 and set each item's cluster"
            }
            Self::Source => "every item has a source",
        }
    }
}

impl fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Label => "label",
            Self::Cluster => "cluster",
            Self::Concept => "concept",
            Self::Source => "source",
            Self::SourceLabel => "source-label",
            Self::SourceCluster => "source-cluster",
            Self::SourceConcept => "source-concept",
        })
    }
}

/// One value of a [`PartitionKey`]. Labels and clusters are distinct values
/// even when their numbers coincide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyValue {
    Label(u32),
    Cluster(u32),
    Source(u32),
    SourceLabel(u32, u32),
    SourceCluster(u32, u32),
}

impl fmt::Display for KeyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Label(l) => write!(f, "label {l}"),
            Self::Cluster(c) => write!(f, "cluster {c}"),
            Self::Source(s) => write!(f, "source {s}"),
            Self::SourceLabel(s, l) => write!(f, "source {s} label {l}"),
            Self::SourceCluster(s, c) => write!(f, "source {s} cluster {c}"),
        }
    }
}

/// How the training pool is dealt to clients; a scenario file's
/// `partition = { kind = "...", ... }`.
///
/// ```toml
/// partition = { kind = "dirichlet", alpha = 0.1, key = "concept" }
/// partition = { kind = "by-source", clients-per-source = 2 }
/// partition = { kind = "power-law", ratio = 20.0, inner = { kind = "dirichlet", alpha = 0.3, key = "source-concept" } }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "kebab-case",
    rename_all_fields = "kebab-case",
    deny_unknown_fields
)]
pub enum PartitionSpec {
    /// Uniform random split into near-equal shards ([`iid`]). A struct
    /// variant without fields, not a unit variant, because serde ignores
    /// unknown fields next to the tag of an internally tagged unit variant.
    Iid {},
    /// Dirichlet(alpha) skew over `key` ([`dirichlet`]).
    Dirichlet {
        /// Concentration: small (0.1) = each client sees few key values;
        /// large (100) = close to the pooled distribution.
        alpha: f64,
        key: PartitionKey,
        /// Every shard gets at least this many items; draws are repeated
        /// (at most [`dirichlet::MAX_DRAWS`] times) until they do.
        #[serde(default = "default_min_size")]
        min_size: usize,
    },
    /// Clients hold one source each ([`by_source`]).
    BySource {
        /// Clients per source; when absent, the requested clients are
        /// spread over the sources, one each and the rest to the largest.
        #[serde(default)]
        clients_per_source: Option<NonZeroUsize>,
    },
    /// Power-law shard sizes, largest/smallest = `ratio`, dealt by `inner`
    /// (`iid` or `dirichlet`) ([`power_law`]).
    PowerLaw {
        ratio: f64,
        inner: Box<PartitionSpec>,
    },
}

fn default_min_size() -> usize {
    dirichlet::DEFAULT_MIN_SIZE
}

impl PartitionSpec {
    /// Checks the parameters that do not depend on the data: alpha and
    /// ratio ranges, and the supported compositions.
    pub fn validate(&self) -> Result<(), PartitionError> {
        match self {
            Self::Iid {} | Self::BySource { .. } => Ok(()),
            Self::Dirichlet { alpha, .. } => {
                if alpha.is_finite() && *alpha > 0.0 {
                    Ok(())
                } else {
                    Err(PartitionError::InvalidParameter {
                        name: "alpha",
                        value: *alpha,
                        expected: "a finite number > 0",
                    })
                }
            }
            Self::PowerLaw { ratio, inner } => {
                if !(ratio.is_finite() && *ratio >= 1.0) {
                    return Err(PartitionError::InvalidParameter {
                        name: "ratio",
                        value: *ratio,
                        expected: "a finite number >= 1 (largest shard / smallest shard)",
                    });
                }
                match inner.as_ref() {
                    Self::Iid {} | Self::Dirichlet { .. } => inner.validate(),
                    Self::BySource { .. } => Err(PartitionError::UnsupportedComposition {
                        inner: "by-source",
                        reason: "by-source shard sizes follow the sources",
                    }),
                    Self::PowerLaw { .. } => Err(PartitionError::UnsupportedComposition {
                        inner: "power-law",
                        reason: "a shard can have only one size",
                    }),
                }
            }
        }
    }
}

impl fmt::Display for PartitionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Iid {} => f.write_str("iid"),
            Self::Dirichlet {
                alpha,
                key,
                min_size,
            } => write!(
                f,
                "dirichlet(alpha = {alpha}, key = {key}, min-size = {min_size})"
            ),
            Self::BySource {
                clients_per_source: Some(n),
            } => write!(f, "by-source({n} per source)"),
            Self::BySource {
                clients_per_source: None,
            } => f.write_str("by-source"),
            Self::PowerLaw { ratio, inner } => write!(f, "power-law(ratio = {ratio}) of {inner}"),
        }
    }
}

/// Why a split, partition or clustering request cannot be met.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PartitionError {
    #[error("a partition needs at least one client")]
    NoClients,
    #[error(
        "cannot deal {items} training item(s) to {clients} client(s) with at least \
         {min_size} item(s) each"
    )]
    TooFewItems {
        items: usize,
        clients: usize,
        min_size: usize,
    },
    #[error("invalid {name} = {value}: expected {expected}")]
    InvalidParameter {
        name: &'static str,
        value: f64,
        expected: &'static str,
    },
    #[error("{missing} of {items} item(s) have no {key} value (the first is item {first}); {}", key.hint())]
    MissingKey {
        key: PartitionKey,
        missing: usize,
        items: usize,
        first: usize,
    },
    #[error(
        "Dirichlet(alpha = {alpha}) over {key} left a shard below {min_size} item(s) in all \
         {attempts} draws (smallest shard: {smallest}); raise alpha, lower min-size or use \
         fewer clients"
    )]
    MinSizeUnreachable {
        alpha: f64,
        key: PartitionKey,
        min_size: usize,
        attempts: usize,
        smallest: usize,
    },
    #[error(
        "power-law sizes (ratio {ratio}) for {clients} clients over {items} item(s) make the \
         smallest shard {smallest} item(s), below the minimum of {min_size}; lower the ratio \
         or use fewer clients"
    )]
    PowerLawTooSmall {
        ratio: f64,
        clients: usize,
        items: usize,
        smallest: usize,
        min_size: usize,
    },
    #[error(
        "by-source with clients-per-source = {per_source} over {sources} source(s) makes \
         {expected} clients, but {clients} were requested"
    )]
    ClientCountMismatch {
        per_source: usize,
        sources: usize,
        expected: usize,
        clients: usize,
    },
    #[error("by-source needs at least one client per source: {sources} source(s) but {clients} client(s)")]
    FewerClientsThanSources { sources: usize, clients: usize },
    #[error("source {source_index} has {items} training item(s), too few for {clients} client(s)")]
    SourceTooSmallForClients {
        source_index: u32,
        items: usize,
        clients: usize,
    },
    #[error("power-law sizes cannot wrap {inner}: {reason}")]
    UnsupportedComposition {
        inner: &'static str,
        reason: &'static str,
    },
    #[error("item index {index} is out of range: there are {items} item(s)")]
    IndexOutOfRange { index: usize, items: usize },
    #[error("item {index} appears more than once in the training pool")]
    DuplicateIndex { index: usize },
    #[error(
        "invalid {name} fraction {value}: expected 0 <= fraction < 1 with validation + test < 1"
    )]
    InvalidFraction { name: &'static str, value: f64 },
    #[error(
        "source {source_index} has {items} item(s): too few to hold out {validation} validation \
         and {test} test item(s) and keep at least one for training"
    )]
    SourceTooSmallForSplit {
        source_index: u32,
        items: usize,
        validation: usize,
        test: usize,
    },
    #[error("k-means: {len} feature value(s) do not form rows of dimension {dim}")]
    FeatureShape { len: usize, dim: usize },
    #[error("k-means: {points} point(s) cannot form {k} cluster(s)")]
    TooFewPoints { points: usize, k: usize },
    #[error("k-means: feature row {row} has a non-finite value")]
    NonFiniteFeature { row: usize },
    #[error("{what}: expected {expected} value(s), got {got}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("too many {what}: {count} (at most 2^32)")]
    TooMany { what: &'static str, count: usize },
}

/// Partition items built from records, with the source names by index.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IndexedItems {
    /// One per record, in record order.
    pub items: Vec<PartitionItem>,
    /// Source names, sorted, so a source's index does not depend on the
    /// order records were read in.
    pub sources: Vec<String>,
}

/// Adapter from records: source names become sorted indices, labels are
/// copied, clusters are left unset (see [`assign_clusters`]).
pub fn items_from_records(records: &[Record]) -> Result<IndexedItems, PartitionError> {
    let names: BTreeSet<&str> = records.iter().map(|r| r.source.as_str()).collect();
    let mut index = BTreeMap::new();
    for (i, name) in names.iter().enumerate() {
        let i = u32::try_from(i).map_err(|_| PartitionError::TooMany {
            what: "sources",
            count: names.len(),
        })?;
        index.insert(*name, i);
    }
    let items = records
        .iter()
        .map(|r| PartitionItem {
            source: index.get(r.source.as_str()).copied().unwrap_or_default(),
            label: r.label,
            cluster: None,
        })
        .collect();
    Ok(IndexedItems {
        items,
        sources: names.into_iter().map(str::to_owned).collect(),
    })
}

/// Sets `items[indices[j]].cluster = clusters[j]`, e.g. with the
/// [`KMeans::assignments`] of one source's features.
pub fn assign_clusters(
    items: &mut [PartitionItem],
    indices: &[usize],
    clusters: &[u32],
) -> Result<(), PartitionError> {
    if indices.len() != clusters.len() {
        return Err(PartitionError::LengthMismatch {
            what: "cluster assignments",
            expected: indices.len(),
            got: clusters.len(),
        });
    }
    let n = items.len();
    for (&i, &c) in indices.iter().zip(clusters) {
        let item = items
            .get_mut(i)
            .ok_or(PartitionError::IndexOutOfRange { index: i, items: n })?;
        item.cluster = Some(c);
    }
    Ok(())
}

/// Deals the training `pool` (indices into `items`, in any order, no
/// duplicates) to `clients` shards as `spec` says. Each shard is sorted;
/// every pool item lands in exactly one shard.
pub fn partition(
    items: &[PartitionItem],
    pool: &[usize],
    spec: &PartitionSpec,
    clients: usize,
    seed: u64,
) -> Result<Shards, PartitionError> {
    spec.validate()?;
    if clients == 0 {
        return Err(PartitionError::NoClients);
    }
    let pool = normalise_pool(items.len(), pool)?;
    let mut rng = sampling::stream(seed, sampling::Purpose::Partition, 0);
    let mut shards = match spec {
        PartitionSpec::Iid {} => iid::iid(&pool, clients, &mut rng)?,
        PartitionSpec::Dirichlet {
            alpha,
            key,
            min_size,
        } => dirichlet::label_side(
            items,
            &pool,
            clients,
            &dirichlet::Params {
                alpha: *alpha,
                key: *key,
                min_size: *min_size,
            },
            &mut rng,
        )?,
        PartitionSpec::BySource { clients_per_source } => {
            by_source::by_source(items, &pool, clients, *clients_per_source, &mut rng)?
        }
        PartitionSpec::PowerLaw { ratio, inner } => {
            power_law::power_law(items, &pool, clients, *ratio, inner, &mut rng)?
        }
    };
    for shard in &mut shards {
        shard.sort_unstable();
    }
    Ok(shards)
}

/// The held-out splits and the clients' shards of the train split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionPlan {
    pub splits: Splits,
    pub shards: Shards,
}

/// [`split()`] then [`partition()`] of the train split, from one seed (the two
/// use independent streams).
pub fn plan(
    items: &[PartitionItem],
    split_spec: &SplitSpec,
    spec: &PartitionSpec,
    clients: usize,
    seed: u64,
) -> Result<PartitionPlan, PartitionError> {
    let splits = split(items, split_spec, seed)?;
    let shards = partition(items, &splits.train, spec, clients, seed)?;
    Ok(PartitionPlan { splits, shards })
}

/// Sorted, in range, without duplicates: the result no longer depends on
/// the order the caller listed the pool in.
fn normalise_pool(items: usize, pool: &[usize]) -> Result<Vec<usize>, PartitionError> {
    let mut sorted = pool.to_vec();
    sorted.sort_unstable();
    for pair in sorted.windows(2) {
        if pair[0] == pair[1] {
            return Err(PartitionError::DuplicateIndex { index: pair[0] });
        }
    }
    if let Some(&last) = sorted.last() {
        if last >= items {
            return Err(PartitionError::IndexOutOfRange { index: last, items });
        }
    }
    Ok(sorted)
}

/// The pool's items grouped by key value, in key order, each group in pool
/// order; an error names the items that lack the key.
fn group_by_key(
    items: &[PartitionItem],
    pool: &[usize],
    key: PartitionKey,
) -> Result<BTreeMap<KeyValue, Vec<usize>>, PartitionError> {
    let mut groups: BTreeMap<KeyValue, Vec<usize>> = BTreeMap::new();
    let mut missing = 0;
    let mut first = None;
    for &i in pool {
        let value = items.get(i).and_then(|item| key.value(item));
        match value {
            Some(v) => groups.entry(v).or_default().push(i),
            None => {
                missing += 1;
                first.get_or_insert(i);
            }
        }
    }
    match first {
        None => Ok(groups),
        Some(first) => Err(PartitionError::MissingKey {
            key,
            missing,
            items: pool.len(),
            first,
        }),
    }
}

/// Cuts `shuffled` into consecutive shards of the given sizes (which sum
/// to its length).
fn cut(shuffled: &[usize], sizes: &[usize]) -> Shards {
    let mut shards = Vec::with_capacity(sizes.len());
    let mut start = 0;
    for &size in sizes {
        let end = (start + size).min(shuffled.len());
        shards.push(shuffled[start..end].to_vec());
        start = end;
    }
    shards
}

/// `n` split into `parts` near-equal sizes, the first `n % parts` one
/// larger; `parts` must be positive.
fn equal_sizes(n: usize, parts: usize) -> Vec<usize> {
    let base = n / parts;
    let extra = n % parts;
    (0..parts).map(|k| base + usize::from(k < extra)).collect()
}
