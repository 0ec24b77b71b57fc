//! Federated scenarios as data: a TOML file names the sources, the held-out
//! splits, how the training split is dealt to clients, and who takes part in
//! a round. The four standard scenarios of shared/design/SCENARIOS.md ship
//! in `scenarios/*.toml` at the repository root; a user copies one and
//! changes a number, or points `sources` at their own manifest.
//!
//! Building a scenario is deterministic in its seed: same file, same data,
//! same shards and held-out splits, bit for bit.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::corpus::{load_source, SourceEnv, SourceSpec};
use crate::partition::{
    assign_clusters, items_from_records, plan, summarize, IndexedItems, PartitionKey,
    PartitionPlan, PartitionSpec, PartitionSummary, SplitSpec,
};
use crate::record::Corpus;
use crate::templates::CaptionStyle;
use crate::{DataError, Result};

/// Who takes part in each round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Participation {
    /// Clients sampled per round; all of them when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients_per_round: Option<NonZeroUsize>,
    /// Or: this fraction of the clients with data left, rounded up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    /// At least this many clients per round (when that many remain).
    #[serde(default = "one")]
    pub min_clients: usize,
    /// Probability that a sampled client drops out of the round.
    #[serde(default)]
    pub dropout: f64,
    /// Probability that a client that stays is a straggler: it completes
    /// only half of its local steps (rounded up) before reporting.
    #[serde(default)]
    pub stragglers: f64,
}

fn one() -> usize {
    1
}

impl Default for Participation {
    fn default() -> Self {
        Self {
            clients_per_round: None,
            fraction: None,
            min_clients: 1,
            dropout: 0.0,
            stragglers: 0.0,
        }
    }
}

/// How concepts are derived for records without labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Concepts {
    /// k of the k-means over cached vision features.
    pub clusters: NonZeroUsize,
}

impl Default for Concepts {
    fn default() -> Self {
        Self {
            clusters: NonZeroUsize::MIN.saturating_add(15),
        }
    }
}

/// A scenario file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Seed of the splits and the partition.
    #[serde(default)]
    pub seed: u64,
    pub clients: NonZeroUsize,
    pub sources: Vec<SourceSpec>,
    #[serde(default)]
    pub split: SplitSpec,
    pub partition: PartitionSpec,
    #[serde(default)]
    pub participation: Participation,
    #[serde(default)]
    pub concepts: Concepts,
    /// How template-captioned sources caption their images: `varied`
    /// (default) or `content` (the class's zero-shot prompt).
    #[serde(default)]
    pub captions: CaptionStyle,
}

/// The standard scenarios, by name.
const BUILT_IN: [(&str, &str); 4] = [
    ("iid", include_str!("../../../scenarios/iid.toml")),
    (
        "concept-skew",
        include_str!("../../../scenarios/concept-skew.toml"),
    ),
    (
        "domain-silos",
        include_str!("../../../scenarios/domain-silos.toml"),
    ),
    (
        "cross-device",
        include_str!("../../../scenarios/cross-device.toml"),
    ),
];

/// Names of the built-in scenarios.
pub fn built_in_names() -> Vec<&'static str> {
    BUILT_IN.iter().map(|(n, _)| *n).collect()
}

impl Scenario {
    /// Parses and validates scenario TOML; `origin` names it in errors.
    pub fn parse(origin: &Path, text: &str) -> Result<Self> {
        let bad = |message: String| DataError::Config {
            path: origin.to_path_buf(),
            message,
        };
        let scenario: Self = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if scenario.sources.is_empty() {
            return Err(bad("`sources` is empty".to_string()));
        }
        scenario
            .partition
            .validate()
            .map_err(|e| bad(format!("partition: {e}")))?;
        scenario
            .split
            .validate()
            .map_err(|e| bad(format!("split: {e}")))?;
        let p = &scenario.participation;
        if !(0.0..1.0).contains(&p.dropout) {
            return Err(bad(format!(
                "participation.dropout = {} must be in [0, 1)",
                p.dropout
            )));
        }
        if !(0.0..1.0).contains(&p.stragglers) {
            return Err(bad(format!(
                "participation.stragglers = {} must be in [0, 1)",
                p.stragglers
            )));
        }
        if let Some(f) = p.fraction {
            if !(f > 0.0 && f <= 1.0) || p.clients_per_round.is_some() {
                return Err(bad(format!(
                    "participation.fraction = {f} must be in (0, 1] and not combined with \
                     clients-per-round"
                )));
            }
        }
        if let Some(k) = p.clients_per_round {
            if k > scenario.clients {
                return Err(bad(format!(
                    "participation.clients-per-round = {k} exceeds clients = {}",
                    scenario.clients
                )));
            }
        }
        Ok(scenario)
    }

    /// A built-in scenario by name, or a scenario file by path.
    pub fn load(name_or_path: &str) -> Result<(Self, PathBuf)> {
        if let Some((name, text)) = BUILT_IN.iter().find(|(n, _)| *n == name_or_path) {
            let origin = PathBuf::from(format!("<built-in scenario {name}>"));
            return Ok((Self::parse(&origin, text)?, PathBuf::new()));
        }
        let path = Path::new(name_or_path);
        if !path.exists() {
            return Err(DataError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "no such scenario file, and not a built-in scenario ({})",
                    built_in_names().join(", ")
                ),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok((Self::parse(path, &text)?, base))
    }

    /// Registry assets the sources read (for `fedcmp assets fetch`).
    pub fn required_assets(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self
            .sources
            .iter()
            .flat_map(|s| s.required_assets().iter().copied())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The key a Dirichlet partition skews over, if the partition has one.
    fn dirichlet_key(&self) -> Option<PartitionKey> {
        fn key(spec: &PartitionSpec) -> Option<PartitionKey> {
            match spec {
                PartitionSpec::Dirichlet { key, .. } => Some(*key),
                PartitionSpec::PowerLaw { inner, .. } => key(inner),
                PartitionSpec::BySource { .. } | PartitionSpec::Iid {} => None,
            }
        }
        key(&self.partition)
    }

    /// The key summaries report skew over: the Dirichlet key, the source
    /// for by-source, else (source, concept).
    pub fn summary_key(&self) -> PartitionKey {
        match (&self.partition, self.dirichlet_key()) {
            (_, Some(key)) => key,
            (PartitionSpec::BySource { .. }, None) => PartitionKey::Source,
            _ => PartitionKey::SourceConcept,
        }
    }

    /// Only a partition dealt by concept needs clusters for unlabelled
    /// records (the k-means runs over encoded images, so it is not free).
    fn needs_clusters(&self) -> bool {
        matches!(
            self.dirichlet_key(),
            Some(
                PartitionKey::Cluster
                    | PartitionKey::Concept
                    | PartitionKey::SourceCluster
                    | PartitionKey::SourceConcept
            )
        )
    }
}

/// A scenario resolved on real data: the records, their held-out splits and
/// each client's shard of the training split (indices into `corpus.records`).
#[derive(Debug, Clone)]
pub struct Federation {
    pub corpus: Corpus,
    pub items: IndexedItems,
    pub plan: PartitionPlan,
    pub summary: PartitionSummary,
}

/// Computes concept clusters for the records at `indices` (one source's
/// unlabelled records): returns one cluster id per index. The CLI runs
/// k-means over cached vision features here.
pub type ClusterFn<'a> = dyn FnMut(&Corpus, &[usize], usize) -> Result<Vec<u32>> + 'a;

impl Scenario {
    /// Caps every source at `limit` records (keeping a smaller limit it
    /// already has): the same scenario on less data, for quick or
    /// budgeted runs.
    pub fn cap_sources(&mut self, limit: NonZeroUsize) {
        for source in &mut self.sources {
            let common = source.common_mut();
            common.limit = Some(common.limit.map_or(limit, |l| l.min(limit)));
        }
    }

    /// Reads the sources and deals the training split to the clients.
    /// `clusters` is called only when the partition key uses concepts and
    /// some source has unlabelled records.
    pub fn build(
        &self,
        cache_root: &Path,
        base_dir: &Path,
        clusters: &mut ClusterFn<'_>,
    ) -> Result<Federation> {
        let env = SourceEnv::new(cache_root)
            .with_base_dir(base_dir)
            .with_captions(self.captions);
        let mut corpus = Corpus::default();
        for spec in &self.sources {
            corpus.extend(load_source(spec, &env)?);
        }
        if corpus.records.is_empty() {
            return Err(DataError::Malformed {
                path: base_dir.to_path_buf(),
                message: format!("scenario {} has no usable records", self.name),
            });
        }
        let mut items = items_from_records(&corpus.records)?;
        if self.needs_clusters() {
            for source in 0..items.sources.len() {
                let unlabelled: Vec<usize> = items
                    .items
                    .iter()
                    .enumerate()
                    .filter(|(_, it)| it.source as usize == source && it.label.is_none())
                    .map(|(i, _)| i)
                    .collect();
                if unlabelled.is_empty() {
                    continue;
                }
                let k = self.concepts.clusters.get().min(unlabelled.len());
                let ids = clusters(&corpus, &unlabelled, k)?;
                assign_clusters(&mut items.items, &unlabelled, &ids)?;
            }
        }
        let plan = plan(
            &items.items,
            &self.split,
            &self.partition,
            self.clients.get(),
            self.seed,
        )?;
        let summary = summarize(&items.items, &plan.shards, self.summary_key())?;
        Ok(Federation {
            corpus,
            items,
            plan,
            summary,
        })
    }
}
