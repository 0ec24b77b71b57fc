//! The feature cache encodes each image once: a second pass over the same
//! corpus runs the encoder zero times (counted, not timed), bad images are
//! skipped and counted, a changed preprocessing is a separate cache, and an
//! interrupted encode resumes from its complete shards.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use candle_core::{Device, Tensor};
use fedcmp_data::cache::{CacheEvent, FeatureCache};
use fedcmp_data::preprocess::Preprocess;
use fedcmp_data::record::{ImageSource, RawImage, Record, SkipKind};
use fedcmp_model::vision::patch_means::PatchMeans;
use fedcmp_model::vision::VisionEncoder;

fn raw(seed: u8) -> ImageSource {
    let pixels: Vec<u8> = (0..8 * 8).map(|i| (i as u8).wrapping_mul(seed)).collect();
    ImageSource::Raw(Arc::new(RawImage {
        width: 8,
        height: 8,
        channels: 1,
        pixels,
    }))
}

fn record(i: usize, image: ImageSource) -> Record {
    Record {
        id: format!("test/{i}"),
        image,
        caption: format!("caption {i}"),
        label: None,
        source: "test".into(),
    }
}

fn corpus(dir: &Path) -> Result<Vec<Record>> {
    let mut records: Vec<Record> = (1..=5).map(|i| record(i, raw(i as u8 * 3))).collect();
    let png = dir.join("ok.png");
    image::RgbImage::from_pixel(16, 12, image::Rgb([200, 10, 90])).save(&png)?;
    records.push(record(6, ImageSource::File(png.clone())));
    records.push(record(7, ImageSource::File(dir.join("missing.png"))));
    let bytes = std::fs::read(&png)?;
    let truncated = dir.join("truncated.png");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2])?;
    records.push(record(8, ImageSource::File(truncated)));
    // The same pixels as record 1 under another id: encoded once.
    records.push(record(9, raw(3)));
    Ok(records)
}

fn preprocess() -> Preprocess {
    Preprocess::square(8, [0.5; 3], [0.25; 3])
}

#[test]
fn second_pass_runs_the_encoder_zero_times() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let records = corpus(dir.path())?;
    let encoder = PatchMeans::new(8)?;
    let root = dir.path().join("cache");

    let mut cache = FeatureCache::open(&root, &encoder, preprocess())?.with_shard_size(2);
    let mut events = Vec::new();
    let first = cache.ensure(&records, &encoder, 4, &mut |e| events.push(e))?;
    assert_eq!(
        first.encoded, 6,
        "five raw images + one PNG, the duplicate once"
    );
    assert_eq!(cache.encoder_passes(), 6);
    assert_eq!(first.skipped.count(SkipKind::MissingImage), 1);
    assert_eq!(first.skipped.count(SkipKind::UndecodableImage), 1);
    assert_eq!(first.skipped.total(), 2);
    assert!(first.keys[6].is_none() && first.keys[7].is_none());
    assert_eq!(first.keys[0], first.keys[8], "same content, same key");
    assert_eq!(first.reused, 1, "the duplicate is served from the cache");
    assert_eq!(
        events.first(),
        Some(&CacheEvent::Planned {
            total: 9,
            missing: 7
        })
    );
    let features = cache.get(
        first.keys[5]
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("png"))?,
    )?;
    assert_eq!(features.dims(), &[4, 3]);

    // A new process (a fresh handle) over the same corpus: nothing encoded.
    let encoder2 = PatchMeans::new(8)?;
    let mut again = FeatureCache::open(&root, &encoder2, preprocess())?;
    let second = again.ensure(&records, &encoder2, 4, &mut |_| {})?;
    assert_eq!(second.encoded, 0);
    assert_eq!(again.encoder_passes(), 0);
    assert_eq!(encoder2.encoded(), 0);
    assert_eq!(second.reused, 7);
    assert_eq!(second.keys, first.keys);
    let keys: Vec<_> = second.keys.iter().flatten().collect();
    let a = cache.batch(&keys)?;
    let b = again.batch(&keys)?;
    assert_eq!(a.dims(), &[7, 4, 3]);
    assert_eq!(
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?,
        0.0,
        "identical features from disk"
    );
    Ok(())
}

#[test]
fn features_match_the_encoder_up_to_f16_rounding() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let records = vec![record(1, raw(7))];
    let encoder = PatchMeans::new(8)?;
    let mut cache = FeatureCache::open(dir.path(), &encoder, preprocess())?;
    let report = cache.ensure(&records, &encoder, 4, &mut |_| {})?;
    let key = report.keys[0]
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no key"))?;
    let cached = cache.get(&key)?;
    let img = fedcmp_data::corpus::load_image(&records[0].image)
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let pixels = Tensor::from_vec(preprocess().apply(&img), (1, 3, 8, 8), &Device::Cpu)?;
    let direct = encoder.encode(&pixels)?.squeeze(0)?;
    let err = (cached - direct)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(err < 2e-3, "f16 round trip error {err}");
    Ok(())
}

#[test]
fn other_preprocessing_is_another_cache() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let records = vec![record(1, raw(5)), record(2, raw(6))];
    let encoder = PatchMeans::new(8)?;
    let mut a = FeatureCache::open(dir.path(), &encoder, preprocess())?;
    a.ensure(&records, &encoder, 4, &mut |_| {})?;
    let other = Preprocess::square(8, [0.4; 3], [0.25; 3]);
    let mut b = FeatureCache::open(dir.path(), &encoder, other)?;
    assert_ne!(a.dir(), b.dir());
    assert_eq!(b.ensure(&records, &encoder, 4, &mut |_| {})?.encoded, 2);
    Ok(())
}

#[test]
fn interrupted_encoding_resumes_from_complete_shards() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let records: Vec<Record> = (1..=6).map(|i| record(i, raw(i as u8 + 10))).collect();
    let encoder = PatchMeans::new(8)?;
    let mut cache = FeatureCache::open(dir.path(), &encoder, preprocess())?.with_shard_size(2);
    cache.ensure(&records, &encoder, 2, &mut |_| {})?;
    let cache_dir = cache.dir().to_path_buf();
    drop(cache);
    let mut shards: Vec<_> = std::fs::read_dir(&cache_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    shards.sort();
    assert_eq!(shards.len(), 3);
    // A crash: the last shard never got renamed into place, and its
    // temporary file is left behind half-written.
    let last = shards.pop().ok_or_else(|| anyhow::anyhow!("no shard"))?;
    let bytes = std::fs::read(&last)?;
    std::fs::remove_file(&last)?;
    std::fs::write(last.with_extension("partial"), &bytes[..bytes.len() / 3])?;
    // And one complete shard got corrupted on disk.
    std::fs::write(&shards[0], b"garbage")?;

    let encoder2 = PatchMeans::new(8)?;
    let mut resumed = FeatureCache::open(dir.path(), &encoder2, preprocess())?;
    let report = resumed.ensure(&records, &encoder2, 2, &mut |_| {})?;
    assert_eq!(
        report.encoded, 4,
        "the lost and the corrupted shard's images only"
    );
    assert_eq!(report.reused, 2);
    assert!(!last.with_extension("partial").exists());
    assert!(shards[0].with_extension("corrupt").exists());
    Ok(())
}
