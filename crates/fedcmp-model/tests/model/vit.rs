//! CLIP and SigLIP vision towers against an independent numpy reference.
//!
//! The fixtures under `tests/fixtures/vit_{clip,siglip}/` (tiny towers:
//! hidden 16, 2 heads, 3 layers, image 32, patch 8) and their expected
//! features were written by `tests/fixtures/vit_reference.py`, a float64
//! numpy implementation of the Hugging Face modules that shares no code with
//! the Rust one. Rerun it to regenerate them. Other checks (sharding, bf16,
//! truncation, errors) rewrite copies of those folders in a tempdir.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use fedcmp_model::vision::vit::{load_vit, FeatureSelect, VitFamily, VitOptions};
use fedcmp_model::vision::{Normalization, VisionEncoder};
use fedcmp_model::ModelError;

const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected(name: &str) -> Result<HashMap<String, Tensor>> {
    let path = fixture(name).join("expected.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).with_context(|| path.display().to_string())
}

fn tensor<'a>(map: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    map.get(name)
        .with_context(|| format!("no `{name}` in expected.safetensors"))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    anyhow::ensure!(
        a.dims() == b.dims(),
        "shape {:?} vs {:?}",
        a.dims(),
        b.dims()
    );
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn options(feature_layer: i32, select: FeatureSelect) -> VitOptions {
    VitOptions {
        feature_layer,
        select,
    }
}

/// Loads `folder` with `opts`, encodes the fixture's pixels and returns the
/// max abs difference from `expected[key]`.
fn diff_against(folder: &Path, fixture_name: &str, opts: VitOptions, key: &str) -> Result<f32> {
    let expected = expected(fixture_name)?;
    let encoder = load_vit(folder, opts, &Device::Cpu)?;
    let features = encoder.encode(tensor(&expected, "pixels")?)?;
    let diff = max_abs_diff(&features, tensor(&expected, key)?)?;
    assert!(
        diff < TOLERANCE,
        "{fixture_name} {key}: max abs diff {diff} >= {TOLERANCE}"
    );
    Ok(diff)
}

/// Copies a fixture's config.json and model.safetensors into a fresh tempdir.
fn copy_fixture(name: &str) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(file), dir.path().join(file))?;
    }
    Ok(dir)
}

fn fixture_weights(name: &str) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        fixture(name).join("model.safetensors"),
        &Device::Cpu,
    )?)
}

fn read_config(dir: &Path) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        dir.join("config.json"),
    )?)?)
}

fn write_config(dir: &Path, config: &serde_json::Value) -> Result<()> {
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config)?,
    )?;
    Ok(())
}

fn encode_fixture_pixels(folder: &Path, fixture_name: &str, opts: VitOptions) -> Result<Tensor> {
    let expected = expected(fixture_name)?;
    let encoder = load_vit(folder, opts, &Device::Cpu)?;
    Ok(encoder.encode(tensor(&expected, "pixels")?)?)
}

#[test]
fn clip_matches_numpy_reference() -> Result<()> {
    let folder = fixture("vit_clip");
    let mut worst = 0f32;
    for (opts, key) in [
        (VitOptions::default(), "features.layer-2.patch"),
        (options(-1, FeatureSelect::Patch), "features.layer-1.patch"),
        (options(0, FeatureSelect::Patch), "features.layer0.patch"),
        // -4 is hidden_states[0] of a 3-layer tower, like 0.
        (options(-4, FeatureSelect::Patch), "features.layer0.patch"),
        (options(2, FeatureSelect::Patch), "features.layer-2.patch"),
        (
            options(-2, FeatureSelect::ClsPatch),
            "features.layer-2.cls_patch",
        ),
    ] {
        worst = worst.max(diff_against(&folder, "vit_clip", opts, key)?);
    }
    eprintln!("clip: max abs diff vs numpy = {worst:e}");
    Ok(())
}

#[test]
fn clip_with_exact_gelu_matches_numpy_reference() -> Result<()> {
    let dir = copy_fixture("vit_clip")?;
    let mut config = read_config(dir.path())?;
    config["vision_config"]["hidden_act"] = "gelu".into();
    write_config(dir.path(), &config)?;
    let diff = diff_against(
        dir.path(),
        "vit_clip",
        VitOptions::default(),
        "features.gelu.layer-2.patch",
    )?;
    eprintln!("clip gelu: max abs diff vs numpy = {diff:e}");
    Ok(())
}

#[test]
fn siglip_matches_numpy_reference() -> Result<()> {
    let folder = fixture("vit_siglip");
    let mut worst = 0f32;
    for (opts, key) in [
        (VitOptions::default(), "features.layer-2.patch"),
        (options(-1, FeatureSelect::Patch), "features.layer-1.patch"),
        (options(0, FeatureSelect::Patch), "features.layer0.patch"),
    ] {
        worst = worst.max(diff_against(&folder, "vit_siglip", opts, key)?);
    }
    eprintln!("siglip: max abs diff vs numpy = {worst:e}");

    // The tolerance is tight enough to tell the activations apart: with the
    // exact GELU instead of SigLIP's default tanh form the features are off
    // by ~7e-4.
    let dir = copy_fixture("vit_siglip")?;
    let mut config = read_config(dir.path())?;
    config["hidden_act"] = "gelu".into();
    write_config(dir.path(), &config)?;
    let wrong = encode_fixture_pixels(dir.path(), "vit_siglip", VitOptions::default())?;
    let diff = max_abs_diff(
        &wrong,
        tensor(&expected("vit_siglip")?, "features.layer-2.patch")?,
    )?;
    assert!(
        diff > 5.0 * TOLERANCE,
        "exact GELU should not match, diff {diff}"
    );
    Ok(())
}

#[test]
fn vision_model_and_full_model_configs_load_alike() -> Result<()> {
    // CLIP fixture is a CLIPModel config: flatten it into a CLIPVisionModel one.
    let clip = copy_fixture("vit_clip")?;
    let config = read_config(clip.path())?;
    let mut flat = config["vision_config"].clone();
    flat["model_type"] = "clip_vision_model".into();
    write_config(clip.path(), &flat)?;
    diff_against(
        clip.path(),
        "vit_clip",
        VitOptions::default(),
        "features.layer-2.patch",
    )?;

    // SigLIP fixture is a SiglipVisionModel config: nest it as a SiglipModel one.
    let siglip = copy_fixture("vit_siglip")?;
    let flat = read_config(siglip.path())?;
    let nested = serde_json::json!({
        "model_type": "siglip",
        "text_config": { "model_type": "siglip_text_model" },
        "vision_config": flat,
    });
    write_config(siglip.path(), &nested)?;
    diff_against(
        siglip.path(),
        "vit_siglip",
        VitOptions::default(),
        "features.layer-2.patch",
    )?;
    Ok(())
}

#[test]
fn encoder_reports_its_shape_and_input() -> Result<()> {
    let clip = load_vit(&fixture("vit_clip"), VitOptions::default(), &Device::Cpu)?;
    assert_eq!(clip.config().family, VitFamily::Clip);
    assert_eq!(clip.feature_dim(), 16);
    assert_eq!(clip.num_patches(), 16);
    assert_eq!(clip.grid_side(), Some(4));
    assert_eq!(clip.input_spec().image_size, 32);
    assert_eq!(clip.input_spec().normalization, Normalization::CLIP);

    let with_cls = load_vit(
        &fixture("vit_clip"),
        options(-2, FeatureSelect::ClsPatch),
        &Device::Cpu,
    )?;
    assert_eq!(with_cls.num_patches(), 17);
    assert_eq!(
        with_cls.grid_side(),
        None,
        "cls + patches is not a square grid"
    );

    let siglip = load_vit(&fixture("vit_siglip"), VitOptions::default(), &Device::Cpu)?;
    assert_eq!(siglip.config().family, VitFamily::Siglip);
    assert_eq!(siglip.num_patches(), 16);
    assert_eq!(siglip.grid_side(), Some(4));
    assert_eq!(siglip.input_spec().normalization, Normalization::SIGLIP);
    // Omitted from the fixture's config: transformers' SigLIP defaults apply.
    assert_eq!(siglip.config().layer_norm_eps, 1e-6);

    // cls_patch makes no sense without a class token.
    let err = load_vit(
        &fixture("vit_siglip"),
        options(-2, FeatureSelect::ClsPatch),
        &Device::Cpu,
    )
    .err()
    .context("siglip + cls_patch should fail")?;
    assert!(matches!(err, ModelError::InvalidInput(_)), "{err}");
    Ok(())
}

#[test]
fn feature_layer_selects_depth_and_truncates_the_encoder() -> Result<()> {
    let folder = fixture("vit_clip");
    let last = load_vit(&folder, options(-1, FeatureSelect::Patch), &Device::Cpu)?;
    let penultimate = load_vit(&folder, options(-2, FeatureSelect::Patch), &Device::Cpu)?;
    assert_eq!(last.layers_run(), 3);
    assert_eq!(penultimate.layers_run(), 2);

    let pixels = expected("vit_clip")?.remove("pixels").context("pixels")?;
    let diff = max_abs_diff(&last.encode(&pixels)?, &penultimate.encode(&pixels)?)?;
    assert!(
        diff > 0.1,
        "layers -1 and -2 should differ, max diff {diff}"
    );
    assert_ne!(last.identity(), penultimate.identity());

    // The layer after the feature layer is never read: a checkpoint without
    // it still loads at -2 (and gives the same features), but not at -1.
    let dir = copy_fixture("vit_clip")?;
    let mut weights = fixture_weights("vit_clip")?;
    weights.retain(|name, _| !name.starts_with("vision_model.encoder.layers.2."));
    candle_core::safetensors::save(&weights, dir.path().join("model.safetensors"))?;
    let truncated = load_vit(dir.path(), options(-2, FeatureSelect::Patch), &Device::Cpu)?;
    assert_eq!(
        max_abs_diff(&truncated.encode(&pixels)?, &penultimate.encode(&pixels)?)?,
        0.0
    );
    let err = load_vit(dir.path(), options(-1, FeatureSelect::Patch), &Device::Cpu)
        .err()
        .context("-1 without the last layer should fail")?;
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err}");

    // Out of range: a 3-layer tower has hidden_states[0..=3].
    for bad in [4, -5] {
        let err = load_vit(&folder, options(bad, FeatureSelect::Patch), &Device::Cpu)
            .err()
            .with_context(|| format!("feature_layer {bad} should fail"))?;
        assert!(matches!(err, ModelError::InvalidInput(_)), "{err}");
    }
    Ok(())
}

#[test]
fn sharded_checkpoint_loads_identically() -> Result<()> {
    let dir = copy_fixture("vit_siglip")?;
    std::fs::remove_file(dir.path().join("model.safetensors"))?;
    let weights = fixture_weights("vit_siglip")?;
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let tensors: HashMap<&str, Tensor> = part
            .iter()
            .map(|name| (name.as_str(), weights[*name].clone()))
            .collect();
        candle_core::safetensors::save(&tensors, dir.path().join(shard))?;
        for name in part {
            weight_map.insert((*name).clone(), shard.into());
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": weight_map });
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?,
    )?;

    let sharded = encode_fixture_pixels(dir.path(), "vit_siglip", VitOptions::default())?;
    let single =
        encode_fixture_pixels(&fixture("vit_siglip"), "vit_siglip", VitOptions::default())?;
    assert_eq!(max_abs_diff(&sharded, &single)?, 0.0);
    Ok(())
}

#[test]
fn half_precision_checkpoints_are_widened_to_f32() -> Result<()> {
    // bf16 weights must give exactly what their f32 widening gives.
    let weights = fixture_weights("vit_clip")?;
    let (bf16, widened) = (copy_fixture("vit_clip")?, copy_fixture("vit_clip")?);
    let mut half = HashMap::new();
    let mut wide = HashMap::new();
    for (name, tensor) in &weights {
        let rounded = tensor.to_dtype(DType::BF16)?;
        wide.insert(name.clone(), rounded.to_dtype(DType::F32)?);
        half.insert(name.clone(), rounded);
    }
    candle_core::safetensors::save(&half, bf16.path().join("model.safetensors"))?;
    candle_core::safetensors::save(&wide, widened.path().join("model.safetensors"))?;
    let a = encode_fixture_pixels(bf16.path(), "vit_clip", VitOptions::default())?;
    let b = encode_fixture_pixels(widened.path(), "vit_clip", VitOptions::default())?;
    assert_eq!(a.dtype(), DType::F32);
    assert_eq!(max_abs_diff(&a, &b)?, 0.0);
    Ok(())
}

#[test]
fn identity_tracks_weights_and_feature_choice() -> Result<()> {
    let folder = fixture("vit_clip");
    let a = load_vit(&folder, VitOptions::default(), &Device::Cpu)?.identity();
    let again = load_vit(&folder, VitOptions::default(), &Device::Cpu)?.identity();
    assert_eq!(a, again, "identity must be stable");
    assert!(a.starts_with("clip-vit:d16:l3:"), "{a}");
    let cls = load_vit(&folder, options(-2, FeatureSelect::ClsPatch), &Device::Cpu)?.identity();
    assert_ne!(a, cls);

    // Same shapes, different values: a different identity.
    let dir = copy_fixture("vit_clip")?;
    let mut weights = fixture_weights("vit_clip")?;
    let name = "vision_model.encoder.layers.0.mlp.fc1.bias";
    let bumped = (weights[name].clone() + 1.0)?;
    weights.insert(name.to_string(), bumped);
    candle_core::safetensors::save(&weights, dir.path().join("model.safetensors"))?;
    let other = load_vit(dir.path(), VitOptions::default(), &Device::Cpu)?.identity();
    assert_ne!(a, other);
    Ok(())
}

#[test]
fn missing_tensor_error_names_file_and_tensor() -> Result<()> {
    let dir = copy_fixture("vit_clip")?;
    let mut weights = fixture_weights("vit_clip")?;
    let name = "vision_model.encoder.layers.1.self_attn.k_proj.weight";
    weights.remove(name);
    candle_core::safetensors::save(&weights, dir.path().join("model.safetensors"))?;
    let err = load_vit(dir.path(), VitOptions::default(), &Device::Cpu)
        .err()
        .context("load should fail")?;
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains(name), "{message}");
    let file = dir.path().join("model.safetensors");
    assert!(message.contains(&file.display().to_string()), "{message}");
    Ok(())
}

#[test]
fn wrong_shape_error_names_file_and_tensor() -> Result<()> {
    let dir = copy_fixture("vit_siglip")?;
    let mut weights = fixture_weights("vit_siglip")?;
    let name = "vision_model.encoder.layers.0.mlp.fc1.weight";
    weights.insert(
        name.to_string(),
        Tensor::zeros((31, 16), DType::F32, &Device::Cpu)?,
    );
    candle_core::safetensors::save(&weights, dir.path().join("model.safetensors"))?;
    let err = load_vit(dir.path(), VitOptions::default(), &Device::Cpu)
        .err()
        .context("load should fail")?;
    match &err {
        ModelError::ShapeMismatch { expected, got, .. } => {
            assert_eq!(expected, &[32, 16]);
            assert_eq!(got, &[31, 16]);
        }
        other => anyhow::bail!("expected ShapeMismatch, got {other}"),
    }
    let message = err.to_string();
    assert!(message.contains(name), "{message}");
    let file = dir.path().join("model.safetensors");
    assert!(message.contains(&file.display().to_string()), "{message}");
    Ok(())
}

#[test]
fn unknown_model_type_is_unsupported_architecture() -> Result<()> {
    let dir = copy_fixture("vit_siglip")?;
    let mut config = read_config(dir.path())?;
    config["model_type"] = "dinov2".into();
    write_config(dir.path(), &config)?;
    let err = load_vit(dir.path(), VitOptions::default(), &Device::Cpu)
        .err()
        .context("load should fail")?;
    match &err {
        ModelError::UnsupportedArchitecture { path, arch, .. } => {
            assert_eq!(arch, "dinov2");
            assert_eq!(path, &dir.path().join("config.json"));
        }
        other => anyhow::bail!("expected UnsupportedArchitecture, got {other}"),
    }
    Ok(())
}

#[test]
fn bad_config_fields_are_config_errors() -> Result<()> {
    let cases: [(&str, serde_json::Value, &str); 4] = [
        ("hidden_size", "wide".into(), "vision_config.hidden_size"),
        (
            "num_attention_heads",
            3.into(),
            "vision_config.num_attention_heads",
        ),
        ("hidden_act", "swish".into(), "vision_config.hidden_act"),
        ("patch_size", 5.into(), "vision_config.patch_size"),
    ];
    for (field, value, expected_field) in cases {
        let dir = copy_fixture("vit_clip")?;
        let mut config = read_config(dir.path())?;
        config["vision_config"][field] = value;
        write_config(dir.path(), &config)?;
        let err = load_vit(dir.path(), VitOptions::default(), &Device::Cpu)
            .err()
            .with_context(|| format!("bad {field} should fail"))?;
        match &err {
            ModelError::Config { field, path, .. } => {
                assert_eq!(field, expected_field);
                assert_eq!(path, &dir.path().join("config.json"));
            }
            other => anyhow::bail!("{field}: expected a Config error, got {other}"),
        }
    }

    // A CLIPModel config without its vision_config.
    let dir = copy_fixture("vit_clip")?;
    let mut config = read_config(dir.path())?;
    config
        .as_object_mut()
        .context("config object")?
        .remove("vision_config");
    write_config(dir.path(), &config)?;
    let err = load_vit(dir.path(), VitOptions::default(), &Device::Cpu)
        .err()
        .context("missing vision_config should fail")?;
    assert!(
        matches!(&err, ModelError::Config { field, .. } if field == "vision_config"),
        "{err}"
    );

    // Fewer layers declared than the checkpoint holds: the config is wrong.
    let dir = copy_fixture("vit_clip")?;
    let mut config = read_config(dir.path())?;
    config["vision_config"]["num_hidden_layers"] = 2.into();
    write_config(dir.path(), &config)?;
    let err = load_vit(dir.path(), VitOptions::default(), &Device::Cpu)
        .err()
        .context("layer count mismatch should fail")?;
    assert!(
        matches!(&err, ModelError::Config { field, .. } if field == "vision_config.num_hidden_layers"),
        "{err}"
    );
    Ok(())
}

#[test]
fn encode_rejects_wrong_input_shapes() -> Result<()> {
    let encoder = load_vit(&fixture("vit_siglip"), VitOptions::default(), &Device::Cpu)?;
    for dims in [vec![1, 3, 16, 16], vec![1, 1, 32, 32], vec![3, 32, 32]] {
        let pixels = Tensor::zeros(dims.as_slice(), DType::F32, &Device::Cpu)?;
        let err = encoder
            .encode(&pixels)
            .err()
            .with_context(|| format!("{dims:?} should fail"))?;
        assert!(matches!(err, ModelError::InvalidInput(_)), "{err}");
    }
    Ok(())
}
