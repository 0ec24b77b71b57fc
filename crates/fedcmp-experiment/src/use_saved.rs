//! Using a saved projector: captions for a user's own images (`fedcmp
//! caption`) and the evaluation suite (`fedcmp eval`) on a scenario's test
//! split or on every pair of a manifest, with the backbones and caption
//! layout it was trained with.

use std::path::{Path, PathBuf};

use fedcmp_data::cache::{FeatureCache, FeatureKey};
use fedcmp_data::corpus::{load_source, SourceEnv, SourceSpec};
use fedcmp_data::record::{ImageSource, Record, SkipReport};
use fedcmp_model::alignment::CaptionTemplate;
pub use fedcmp_model::alignment::Decoding;
use fedcmp_model::projector::Projector;
use fedcmp_runtime::convert::load_projector;
use fedcmp_runtime::suite::{evaluate, Scorer, Suite, SuiteReport};
use serde::Deserialize;

use crate::assembly::{caption_template, evaluation_domains, evaluation_item, fresh_projector};
use crate::backbones::{self, Backbones};
use crate::events::{Observer, Stage};
use crate::saved::SavedProjector;
use crate::settings::DataSettings;
use crate::{Experiment, ExperimentError, Result};

/// How captions are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptionOptions {
    pub decoding: Decoding,
    /// At most this many tokens per caption.
    pub max_tokens: usize,
}

/// One image's caption, or why it has none (an unreadable image is
/// skipped, never the end of the others).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageCaption {
    pub image: PathBuf,
    pub caption: std::result::Result<String, String>,
}

/// The saved projector, checked against the backbones it will run between.
fn projector_for(saved: &SavedProjector, feature_dim: usize, hidden: usize) -> Result<Projector> {
    let (config, params) = saved.load()?;
    if (config.input_dim, config.output_dim) != (feature_dim, hidden) {
        return Err(ExperimentError::File {
            path: saved.file.clone(),
            message: format!(
                "the projector maps {}-d features to {}-d tokens, but the backbones of its \
                 settings give {feature_dim}-d features and a {hidden}-d decoder",
                config.input_dim, config.output_dim
            ),
        });
    }
    let projector = fresh_projector(config.kind, config.input_dim, config.output_dim, 0)?;
    load_projector(&projector, &params)?;
    Ok(projector)
}

/// A saved projector between the backbones of its settings, with their
/// feature cache and the run's caption layout.
struct Ready {
    backbones: Backbones,
    projector: Projector,
    cache: FeatureCache,
    template: CaptionTemplate,
}

impl Ready {
    fn load(root: &Path, saved: &SavedProjector, observer: &dyn Observer) -> Result<Self> {
        let data = &saved.settings.data;
        let backbones = backbones::load(root, &data.backbones, observer)?;
        let projector = projector_for(
            saved,
            backbones.encoder.feature_dim(),
            backbones.decoder.config().hidden_size,
        )?;
        let cache = backbones::served_cache(
            root,
            backbones.encoder.as_ref(),
            data.backbones.visual_tokens,
        )?;
        Ok(Self {
            backbones,
            projector,
            cache,
            template: caption_template(data),
        })
    }

    fn scorer(&self) -> Scorer<'_> {
        Scorer {
            decoder: &self.backbones.decoder,
            tokenizer: &self.backbones.tokenizer,
            template: &self.template,
            cache: &self.cache,
        }
    }
}

/// Captions `images` with the saved projector: each image goes through the
/// run's vision encoder (and its feature cache under `root`), its visual
/// tokens after the run's prefix and before its separator, then the decoder
/// writes until a newline, an end-of-sequence token or `max_tokens`.
pub fn caption_images(
    root: &Path,
    saved: &SavedProjector,
    images: &[PathBuf],
    options: CaptionOptions,
    observer: &dyn Observer,
) -> Result<Vec<ImageCaption>> {
    let mut ready = Ready::load(root, saved, observer)?;
    let records: Vec<Record> = images
        .iter()
        .map(|image| Record {
            id: image.display().to_string(),
            image: ImageSource::File(image.clone()),
            caption: String::new(),
            label: None,
            source: "caption".into(),
        })
        .collect();
    let report = backbones::cache_features(
        &mut ready.cache,
        ready.backbones.encoder.as_ref(),
        &records,
        Stage::Encode,
        observer,
    )?;
    let scorer = ready.scorer();
    // Greedy captions of every readable image in one batch; beam search
    // one image at a time (its hypotheses are the batch).
    let readable: Vec<&FeatureKey> = report.keys.iter().flatten().collect();
    let mut greedy = match options.decoding {
        Decoding::Greedy => scorer
            .greedy_captions(&ready.projector, &readable, options.max_tokens, &mut |_| {})?
            .into_iter(),
        Decoding::Beam { .. } => Vec::new().into_iter(),
    };
    let mut out = Vec::with_capacity(images.len());
    for (image, key) in images.iter().zip(report.keys.iter()) {
        let caption = match key {
            Some(key) => match options.decoding {
                Decoding::Greedy => Ok(greedy.next().unwrap_or_default()),
                Decoding::Beam { .. } => Ok(scorer.caption(
                    &ready.projector,
                    key,
                    options.max_tokens,
                    options.decoding,
                )?),
            },
            // The cache keeps the first few reasons of each kind.
            None => Err(report
                .skipped
                .examples()
                .iter()
                .find(|ex| ex.file == *image)
                .map_or_else(
                    || "skipped: the image could not be read (see the log)".to_string(),
                    |ex| format!("skipped ({}): {}", ex.kind, ex.message),
                )),
        };
        out.push(ImageCaption {
            image: image.clone(),
            caption,
        });
    }
    Ok(out)
}

/// The evaluation suite of the saved projector on `scenario`'s test split
/// (None: the scenario it was trained on), with the run's backbones,
/// caption layout and evaluation sizes. Returns the scenario's name and the
/// report.
pub fn evaluate_saved(
    root: &Path,
    saved: &SavedProjector,
    scenario: Option<&str>,
    observer: &dyn Observer,
) -> Result<(String, SuiteReport)> {
    let data = DataSettings {
        scenario: scenario.map_or_else(|| saved.settings.data.scenario.clone(), str::to_string),
        ..saved.settings.data.clone()
    };
    let experiment = Experiment::assemble(root, &data, saved.suite, observer)?;
    let projector = projector_for(
        saved,
        experiment.feature_dim,
        experiment.decoder.config().hidden_size,
    )?;
    let report = evaluate(
        &experiment.scorer(),
        &projector,
        &experiment.suite,
        &mut |_| {},
    )?;
    Ok((experiment.scenario.name.clone(), report))
}

/// What a manifest evaluation scored, and what it could not.
#[derive(Debug, Clone)]
pub struct ManifestEvaluation {
    pub report: SuiteReport,
    /// Pairs scored (images that decoded, captions that were not empty).
    pub pairs: usize,
    /// Records the manifest's reader skipped, and images the encoder could
    /// not read, with file and line.
    pub skipped: SkipReport,
}

/// A manifest to evaluate on, and where its images may be.
#[derive(Debug, Clone, Default)]
pub struct ManifestFile {
    pub path: PathBuf,
    /// Folder relative image paths start from, and that every image must
    /// be inside; default: the manifest's folder.
    pub image_root: Option<PathBuf>,
    /// Read images outside the image root too.
    pub allow_images_outside_root: bool,
}

/// The source kind a manifest file's extension names.
fn manifest_spec(file: &ManifestFile) -> Result<SourceSpec> {
    let manifest = &file.path;
    let kind = match manifest.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => "jsonl",
        Some("csv" | "tsv") => "csv",
        Some("json") => "llava-json",
        _ => {
            return Err(ExperimentError::File {
                path: manifest.to_path_buf(),
                message: "expected a .jsonl or .csv manifest (columns image, caption, optional \
                          label and source) or a LLaVA .json file"
                    .into(),
            })
        }
    };
    let mut table = toml::Table::new();
    table.insert("kind".into(), kind.into());
    table.insert("path".into(), manifest.display().to_string().into());
    if let Some(root) = &file.image_root {
        table.insert("image-root".into(), root.display().to_string().into());
    }
    if file.allow_images_outside_root {
        table.insert("allow-images-outside-root".into(), true.into());
    }
    SourceSpec::deserialize(toml::Value::Table(table)).map_err(|e| ExperimentError::File {
        path: manifest.to_path_buf(),
        message: e.to_string(),
    })
}

/// The evaluation suite of the saved projector on every pair of
/// `manifest` (a site's own held-out data): caption NLL per source, and
/// where the manifest has labels, calibrated zero-shot accuracy (prompts
/// `A photo of {label}.`) and captions that name the class. The "no image"
/// calibration uses the mean visual token of the manifest's own images.
/// Relative image paths start at the image root (default: the manifest's
/// folder), and images outside it are skipped unless allowed.
pub fn evaluate_manifest(
    root: &Path,
    saved: &SavedProjector,
    manifest: &ManifestFile,
    observer: &dyn Observer,
) -> Result<ManifestEvaluation> {
    let spec = manifest_spec(manifest)?;
    let env = SourceEnv::new(root);
    let corpus = load_source(&spec, &env)?;
    let mut ready = Ready::load(root, saved, observer)?;
    let (keys, skipped) = backbones::encode_corpus(
        &mut ready.cache,
        ready.backbones.encoder.as_ref(),
        &corpus,
        observer,
    )?;
    let domains = evaluation_domains(&corpus);
    let items: Vec<_> = (0..corpus.records.len())
        .filter_map(|i| evaluation_item(&corpus, &keys, &domains, i))
        .collect();
    if items.is_empty() {
        return Err(ExperimentError::File {
            path: manifest.path.clone(),
            message: format!("no usable pair ({}): {skipped}", skipped.total()),
        });
    }
    let calibration = items.iter().map(|item| item.sample.key.clone()).collect();
    let pairs = items.len();
    let suite = Suite::new(domains, items, calibration, saved.suite)?;
    let report = evaluate(&ready.scorer(), &ready.projector, &suite, &mut |_| {})?;
    Ok(ManifestEvaluation {
        report,
        pairs,
        skipped,
    })
}
