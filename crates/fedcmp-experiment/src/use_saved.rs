//! Using a saved projector: captions for a user's own images (`fedcmp
//! caption`) and the evaluation suite on a scenario's test split (`fedcmp
//! eval`), with the backbones and caption layout it was trained with.

use std::path::{Path, PathBuf};

use fedcmp_data::corpus::load_image;
use fedcmp_data::record::{ImageSource, Record};
pub use fedcmp_model::alignment::Decoding;
use fedcmp_model::projector::Projector;
use fedcmp_runtime::convert::load_projector;
use fedcmp_runtime::suite::{evaluate, Scorer, SuiteReport};

use crate::assembly::{caption_template, fresh_projector};
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
    let data = &saved.settings.data;
    let Backbones {
        decoder,
        tokenizer,
        encoder,
    } = backbones::load(root, &data.backbones, observer)?;
    let projector = projector_for(saved, encoder.feature_dim(), decoder.config().hidden_size)?;
    let mut out: Vec<ImageCaption> = Vec::with_capacity(images.len());
    let mut records = Vec::new();
    for image in images {
        match load_image(&ImageSource::File(image.clone())) {
            Ok(_) => records.push(Record {
                id: image.display().to_string(),
                image: ImageSource::File(image.clone()),
                caption: String::new(),
                label: None,
                source: "caption".into(),
            }),
            Err(e) => out.push(ImageCaption {
                image: image.clone(),
                caption: Err(format!("skipped ({}): {}", e.kind, e.message)),
            }),
        }
    }
    let mut cache = backbones::served_cache(root, encoder.as_ref(), data.backbones.visual_tokens)?;
    let keys = backbones::cache_features(
        &mut cache,
        encoder.as_ref(),
        &records,
        Stage::Encode,
        observer,
    )?;
    let template = caption_template(data);
    let scorer = Scorer {
        decoder: &decoder,
        tokenizer: &tokenizer,
        template: &template,
        cache: &cache,
    };
    for (record, key) in records.iter().zip(keys) {
        let image = match &record.image {
            ImageSource::File(path) => path.clone(),
            ImageSource::Raw(_) => PathBuf::from(&record.id),
        };
        let caption = match key {
            Some(key) => {
                Ok(scorer.caption(&projector, &key, options.max_tokens, options.decoding)?)
            }
            None => Err("skipped: the encoder could not read it (see the log)".to_string()),
        };
        out.push(ImageCaption { image, caption });
    }
    // In the order given.
    out.sort_by_key(|c| images.iter().position(|i| *i == c.image));
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
