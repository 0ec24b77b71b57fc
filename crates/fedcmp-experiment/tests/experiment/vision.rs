//! A Hugging Face CLIP folder as a run's vision encoder (`vision = <folder>`,
//! `vision-feature-layer`): the settings round-trip, the run trains on the
//! tower's features, images reach the tower with the tower's own size and
//! normalisation, the feature cache keys on the tower and the layer, and
//! misuses are refused naming the key. (The tower itself is checked against
//! an independent numpy reference in fedcmp-model's tests.)

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use fedcmp_data::preprocess::Preprocess;
use fedcmp_data::record::{ImageSource, Record};
use fedcmp_experiment::backbones::{self, VisionChoice};
use fedcmp_experiment::run_folder::{run_on, Measured};
use fedcmp_experiment::{Experiment, Layers, RunOptions, RunSettings, Silent};
use fedcmp_runtime::suite::SuiteConfig;

use crate::runs::{world, World};

fn clip_folder() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fedcmp-model/tests/fixtures/vit_clip")
}

/// The test world's settings with the CLIP folder as the encoder.
fn clip_settings(w: &World, extra: RunOptions) -> Result<RunSettings> {
    let base = w.options()?;
    let base = RunOptions {
        vision: Some(VisionChoice::Folder(clip_folder())),
        image_size: None,
        ..base
    };
    let layers = Layers::new()
        .defaults("the test world", &base)?
        .flags(&extra)?;
    Ok(RunSettings::resolve(&layers)?)
}

fn difference(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
}

#[test]
fn a_clip_folder_is_the_vision_encoder_of_a_run() -> Result<()> {
    let w = world()?;
    let settings = clip_settings(&w, RunOptions::default())?;
    let backbones = &settings.data.backbones;
    assert_eq!(backbones.feature_layer, Some(-2));
    assert_eq!(backbones.image_size, None);
    let text = settings.to_toml()?;
    assert!(text.contains("vision-feature-layer = -2"), "{text}");
    let again = RunSettings::resolve(&Layers::new().text("the file", &text)?)?;
    assert_eq!(again, settings, "the settings file reads back");

    let experiment =
        Experiment::assemble(&w.cache(), &settings.data, SuiteConfig::default(), &Silent)?;
    assert_eq!(experiment.feature_dim, 16);
    assert!(
        experiment.encoder_identity.starts_with("clip-vit")
            && experiment.encoder_identity.contains(":layer2:"),
        "{}",
        experiment.encoder_identity
    );
    let report = run_on(&experiment, &settings, false, &Silent)?;
    let Measured::Trained(r) = &report.measured else {
        anyhow::bail!("no training");
    };
    assert!(r.one_pass_complete);
    assert!(r.test_nll.r#final.is_finite() && r.test_nll.r#final != r.test_nll.init);

    // An image in the cache is what the tower gives for it at its own size
    // and with CLIP's normalisation (stored as f16: to its rounding).
    let loaded = backbones::load(&w.cache(), backbones, &Silent)?;
    let encoder = loaded.encoder.as_ref();
    let spec = encoder.input_spec();
    assert_eq!(spec.image_size, 32);
    let file = w.dir.path().join("images/5.png");
    let record = Record {
        id: "five".into(),
        image: ImageSource::File(file.clone()),
        caption: "x".into(),
        label: None,
        source: "check".into(),
    };
    let mut cache = backbones::served_cache(&w.cache(), encoder, None)?;
    let keys = backbones::cache_features(
        &mut cache,
        encoder,
        &[record],
        fedcmp_experiment::events::Stage::Encode,
        &Silent,
    )?
    .keys;
    let key = keys[0].clone().context("the image is cached")?;
    let pixels = Preprocess::square(32, spec.normalization.mean, spec.normalization.std)
        .apply(&image::open(&file)?);
    let direct = encoder.encode(&Tensor::from_vec(pixels, (1, 3, 32, 32), &Device::Cpu)?)?;
    let cached = cache.get(&key)?.unsqueeze(0)?;
    let scale = direct.abs()?.max_all()?.to_scalar::<f32>()?;
    let off = difference(&cached, &direct)?;
    assert!(off <= 1e-3 * scale, "{off} vs scale {scale}");

    // Another feature layer is another encoder to the cache.
    let last = clip_settings(
        &w,
        RunOptions {
            vision_feature_layer: Some(-1),
            ..RunOptions::default()
        },
    )?;
    let other = Experiment::assemble(&w.cache(), &last.data, SuiteConfig::default(), &Silent)?;
    assert_ne!(other.encoder_identity, experiment.encoder_identity);
    let sample = &experiment.test[0].key;
    assert!(difference(&other.cache.get(sample)?, &experiment.cache.get(sample)?)? > 1e-3);
    Ok(())
}

#[test]
fn misuses_of_a_vision_folder_are_refused_naming_the_key() -> Result<()> {
    let w = world()?;
    let sized = clip_settings(
        &w,
        RunOptions {
            image_size: Some(8),
            ..RunOptions::default()
        },
    )?;
    let msg = Experiment::assemble(&w.cache(), &sized.data, SuiteConfig::default(), &Silent)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        msg.contains("image-size = 8") && msg.contains("32-pixel"),
        "{msg}"
    );

    let deep = clip_settings(
        &w,
        RunOptions {
            vision_feature_layer: Some(9),
            ..RunOptions::default()
        },
    )?;
    let msg = Experiment::assemble(&w.cache(), &deep.data, SuiteConfig::default(), &Silent)
        .err()
        .map(|e| format!("{e}: {:?}", e))
        .unwrap_or_default();
    assert!(msg.contains("feature_layer 9 is out of range"), "{msg}");

    let msg = w
        .settings(RunOptions {
            vision_feature_layer: Some(-1),
            ..RunOptions::default()
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        msg.contains("vision-feature-layer = -1") && msg.contains("patch-means"),
        "{msg}"
    );
    Ok(())
}
