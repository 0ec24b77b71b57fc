//! A scenario resolved on its data: the records, held-out splits and each
//! client's shard. Partitions dealt by concept need concepts for
//! unlabelled images: k-means over cached MobileNetV2 features
//! (mean-pooled over patches), fetched and encoded here.

use std::path::{Path, PathBuf};

use fedcmp_data::cache::FeatureCache;
use fedcmp_data::partition::kmeans::{kmeans, KMeansConfig};
use fedcmp_data::record::Corpus;
use fedcmp_data::scenario::{Federation, Scenario};
use fedcmp_model::vision::mobilenet_v2::MobileNetV2;
use fedcmp_model::vision::VisionEncoder;

use crate::backbones::{cache_features, feature_cache, VISION_ASSET};
use crate::events::{Observer, Stage};
use crate::Result;

/// Fetches what `scenario` reads and builds its federation (`base`: the
/// folder its relative paths start from).
pub fn build(
    root: &Path,
    scenario: &Scenario,
    base: &Path,
    observer: &dyn Observer,
) -> Result<Federation> {
    crate::assets::ensure(root, &scenario.required_assets(), observer)?;
    let mut clusters = |corpus: &Corpus, indices: &[usize], k: usize| {
        cluster_records(root, corpus, indices, k, scenario.seed, observer).map_err(|e| {
            fedcmp_data::DataError::Malformed {
                path: PathBuf::from(&scenario.name),
                message: format!("concept clustering failed: {e}"),
            }
        })
    };
    scenario.build(root, base, &mut clusters).map_err(|e| {
        crate::ExperimentError::from(e).context(format!("building scenario {}", scenario.name))
    })
}

/// The scenario `data` names, its sources capped and captioned as `data`
/// asks, built.
pub fn build_data(
    root: &Path,
    data: &crate::settings::DataSettings,
    observer: &dyn Observer,
) -> Result<(Scenario, Federation)> {
    let (mut scenario, base) = Scenario::load(&data.scenario)?;
    if let Some(limit) = data.limit {
        scenario.cap_sources(limit);
    }
    if let Some(style) = data.captions {
        scenario.captions = style;
    }
    let federation = build(root, &scenario, &base, observer)?;
    Ok((scenario, federation))
}

/// A built-in scenario by name, or a scenario file, built.
pub fn resolve(root: &Path, name: &str, observer: &dyn Observer) -> Result<(Scenario, Federation)> {
    let (scenario, base) = Scenario::load(name)?;
    let federation = build(root, &scenario, &base, observer)?;
    Ok((scenario, federation))
}

fn cluster_records(
    root: &Path,
    corpus: &Corpus,
    indices: &[usize],
    k: usize,
    seed: u64,
    observer: &dyn Observer,
) -> Result<Vec<u32>> {
    crate::assets::ensure(root, &[VISION_ASSET.0], observer)?;
    let encoder = MobileNetV2::load(
        &fedcmp_assets::asset_path(root, VISION_ASSET.0, VISION_ASSET.1),
        &candle_core::Device::Cpu,
    )?;
    let mut cache: FeatureCache = feature_cache(root, &encoder)?;
    let records: Vec<_> = indices.iter().map(|&i| corpus.records[i].clone()).collect();
    let keys = cache_features(&mut cache, &encoder, &records, Stage::Cluster, observer)?.keys;
    let dim = encoder.feature_dim();
    let mut data = Vec::with_capacity(records.len() * dim);
    for key in &keys {
        match key {
            Some(key) => data.extend(cache.get(key)?.mean(0)?.to_vec1::<f32>()?),
            // An unreadable image still needs a concept; it will be skipped
            // again when training, so any cluster will do.
            None => data.extend(std::iter::repeat_n(0.0, dim)),
        }
    }
    let result =
        kmeans(&data, dim, &KMeansConfig::new(k, seed)).map_err(fedcmp_data::DataError::from)?;
    Ok(result.assignments)
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
