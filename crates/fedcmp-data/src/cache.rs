//! The frozen-feature cache: the vision encoder is frozen, so each image is
//! encoded ONCE per (encoder identity, preprocessing, image content) and its
//! patch features are reused by every client, every round and every run on
//! the machine.
//!
//! Layout: `<cache>/features/<key>/` where `<key>` hashes the encoder's
//! identity and the preprocessing; `meta.json` there records both in clear.
//! Features live in safetensors shards (`shard-*.safetensors`), one f16
//! tensor (n_patch, d_v) per image, named by the first 128 bits of the
//! sha256 of the image's content (file bytes, or dimensions + pixels). A
//! shard is written to a temporary name, synced, then renamed, so a crash
//! never leaves a half-written shard visible; an interrupted encode resumes
//! from the last complete shard. Shards are memory-mapped when read.
//! A different encoder or preprocessing is a different folder: stale
//! features are never served.
//!
//! f16 halves the disk and page-cache footprint (MobileNetV2 at 112 px:
//! 40 KiB per image instead of 80); features are widened back to f32 on
//! read, and the projector and the loss stay in f32.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use fedcmp_model::vision::VisionEncoder;
use sha2::{Digest, Sha256};

use crate::corpus::load_image;
use crate::preprocess::Preprocess;
use crate::record::{ImageSource, Record, SkipKind, SkipReport};
use crate::{DataError, Result};

/// 128-bit content key of one image, as 32 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FeatureKey(String);

impl FeatureKey {
    fn from_digest(digest: &[u8]) -> Self {
        Self(digest.iter().take(16).map(|b| format!("{b:02x}")).collect())
    }

    /// The key as stored in the shards.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The content key of an image, reading a file's bytes (not decoding it).
/// A missing file is reported as such; the caller counts it.
pub fn content_key(source: &ImageSource) -> std::result::Result<FeatureKey, (SkipKind, String)> {
    let mut hasher = Sha256::new();
    match source {
        ImageSource::File(path) => {
            let bytes = fs::read(path).map_err(|e| {
                let kind = if e.kind() == std::io::ErrorKind::NotFound {
                    SkipKind::MissingImage
                } else {
                    SkipKind::UndecodableImage
                };
                (kind, format!("{}: {e}", path.display()))
            })?;
            hasher.update(b"file\0");
            hasher.update(&bytes);
        }
        ImageSource::Raw(raw) => {
            hasher.update(b"raw\0");
            hasher.update(raw.width.to_le_bytes());
            hasher.update(raw.height.to_le_bytes());
            hasher.update([raw.channels]);
            hasher.update(&raw.pixels);
        }
    }
    Ok(FeatureKey::from_digest(&hasher.finalize()))
}

/// Progress of [`FeatureCache::ensure`], for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CacheEvent {
    /// `missing` of `total` images need encoding.
    Planned { total: usize, missing: usize },
    /// `done` of the missing images are encoded, at `images_per_s`.
    Encoded { done: usize, images_per_s: f64 },
}

/// What [`FeatureCache::ensure`] did.
#[derive(Debug, Clone, Default)]
pub struct EnsureReport {
    /// Per input record: its key, or None when its image was skipped.
    pub keys: Vec<Option<FeatureKey>>,
    /// Images run through the encoder by this call.
    pub encoded: usize,
    /// Images found in the cache.
    pub reused: usize,
    /// Images that could not be read or decoded.
    pub skipped: SkipReport,
}

#[derive(Debug)]
struct Shard {
    path: PathBuf,
    map: memmap2::Mmap,
}

/// Where one image's f16 features sit inside a mapped shard; found once
/// when the shard is indexed, so a lookup is a slice, not a header parse.
#[derive(Debug, Clone, Copy)]
struct Entry {
    shard: usize,
    start: usize,
    len: usize,
}

/// Features of one encoder + preprocessing, on disk.
#[derive(Debug)]
pub struct FeatureCache {
    dir: PathBuf,
    preprocess: Preprocess,
    num_patches: usize,
    feature_dim: usize,
    shards: Vec<Shard>,
    index: HashMap<FeatureKey, Entry>,
    /// Images this process has run through the encoder (tests assert a
    /// second pass over the same corpus adds none).
    encoder_passes: usize,
    /// Images per shard file.
    shard_size: usize,
    /// Visual tokens per image in batches (the patch grid pooled down;
    /// `num_patches` = no pooling).
    visual_tokens: usize,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, message: impl Into<String>) -> DataError {
    DataError::Malformed {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = fs::File::open(path).map_err(io(path))?;
    // SAFETY: shards are written under a temporary name and renamed into
    // place complete; nothing ever writes to a published shard again, so
    // the mapped bytes cannot change underneath us.
    #[allow(unsafe_code)]
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io(path))?;
    Ok(map)
}

impl FeatureCache {
    /// Opens (creating if needed) the cache of `encoder` with `preprocess`
    /// under `root` (the fedcmp cache folder). Leftover temporary files of
    /// an interrupted run are removed; complete shards are indexed.
    pub fn open(root: &Path, encoder: &dyn VisionEncoder, preprocess: Preprocess) -> Result<Self> {
        let description = format!(
            "encoder={}\npreprocess={preprocess:?}\nfilter=triangle\nstorage=f16",
            encoder.identity()
        );
        let digest = Sha256::digest(description.as_bytes());
        let key: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        let dir = root.join("features").join(key);
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let meta = dir.join("meta.json");
        if !meta.exists() {
            let text = format!(
                "{{\"encoder\": {:?}, \"preprocess\": {:?}, \"num_patches\": {}, \"feature_dim\": {}, \"dtype\": \"f16\"}}\n",
                encoder.identity(),
                format!("{preprocess:?}"),
                encoder.num_patches(),
                encoder.feature_dim()
            );
            write_atomic(&meta, text.as_bytes())?;
        }
        let mut cache = Self {
            dir,
            preprocess,
            num_patches: encoder.num_patches(),
            feature_dim: encoder.feature_dim(),
            shards: Vec::new(),
            index: HashMap::new(),
            encoder_passes: 0,
            shard_size: 512,
            visual_tokens: encoder.num_patches(),
        };
        cache.load_shards()?;
        Ok(cache)
    }

    /// Batches with `tokens` visual tokens per image: the encoder's patch
    /// grid average-pooled ([`fedcmp_model::vision::pool_grid`]). The cache
    /// keeps the full grid, so runs with different token counts share it.
    pub fn with_visual_tokens(mut self, tokens: usize) -> Result<Self> {
        let probe = Tensor::zeros((1, self.num_patches, 1), DType::F32, &Device::Cpu)?;
        fedcmp_model::vision::pool_grid(&probe, tokens)?;
        self.visual_tokens = tokens;
        Ok(self)
    }

    /// Visual tokens per image in [`FeatureCache::batch`].
    pub fn visual_tokens(&self) -> usize {
        self.visual_tokens
    }

    /// Patches the encoder gives per image.
    pub fn num_patches(&self) -> usize {
        self.num_patches
    }

    /// Images per shard file (default 512); smaller in tests.
    pub fn with_shard_size(mut self, n: usize) -> Self {
        self.shard_size = n.max(1);
        self
    }

    /// The folder holding this cache's shards.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Images encoded by this process so far.
    pub fn encoder_passes(&self) -> usize {
        self.encoder_passes
    }

    /// Images cached.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Tokens per image and their width.
    pub fn feature_shape(&self) -> (usize, usize) {
        (self.num_patches, self.feature_dim)
    }

    fn load_shards(&mut self) -> Result<()> {
        let mut paths = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let path = entry.map_err(io(&self.dir))?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.ends_with(".partial") {
                // A shard whose writer died before the rename.
                let _ = fs::remove_file(&path);
            } else if name.starts_with("shard-") && name.ends_with(".safetensors") {
                paths.push(path);
            }
        }
        paths.sort();
        for path in paths {
            if let Err(err) = self.add_shard(path.clone()) {
                // Keep the bytes for inspection but stop serving them; the
                // images they held are simply encoded again.
                let aside = path.with_extension("corrupt");
                tracing::warn!(shard = %path.display(), %err, "set aside an unreadable feature shard");
                fs::rename(&path, &aside).map_err(io(&path))?;
            }
        }
        Ok(())
    }

    fn add_shard(&mut self, path: PathBuf) -> Result<()> {
        let map = map_file(&path)?;
        let tensors = safetensors::SafeTensors::deserialize(&map)
            .map_err(|e| corrupt(&path, format!("unreadable feature shard: {e}")))?;
        let shard = self.shards.len();
        let base = map.as_ptr() as usize;
        let expected = [self.num_patches, self.feature_dim];
        let mut entries = Vec::new();
        for (name, view) in tensors.tensors() {
            if view.dtype() != safetensors::Dtype::F16 || view.shape() != expected {
                return Err(corrupt(
                    &path,
                    format!(
                        "tensor {name} is {:?} {:?}, expected F16 {expected:?}",
                        view.dtype(),
                        view.shape()
                    ),
                ));
            }
            let start = view.data().as_ptr() as usize - base;
            let entry = Entry {
                shard,
                start,
                len: view.data().len(),
            };
            entries.push((FeatureKey(name), entry));
        }
        // Only a shard that checks out entirely is indexed. Two processes
        // may have encoded the same image: the first shard wins.
        for (key, entry) in entries {
            self.index.entry(key).or_insert(entry);
        }
        self.shards.push(Shard { path, map });
        Ok(())
    }

    /// Makes sure every record's image is cached, encoding the missing ones
    /// in batches of `batch_size`. Unreadable images are skipped and counted.
    pub fn ensure(
        &mut self,
        records: &[Record],
        encoder: &dyn VisionEncoder,
        batch_size: usize,
        observe: &mut dyn FnMut(CacheEvent),
    ) -> Result<EnsureReport> {
        let mut report = EnsureReport::default();
        let mut missing: Vec<(usize, FeatureKey)> = Vec::new();
        let mut planned = std::collections::HashSet::new();
        for (i, record) in records.iter().enumerate() {
            match content_key(&record.image) {
                Ok(key) => {
                    if !self.index.contains_key(&key) && planned.insert(key.clone()) {
                        missing.push((i, key.clone()));
                    }
                    report.keys.push(Some(key));
                }
                Err((kind, message)) => {
                    report.skipped.skip(kind, image_path(record), None, message);
                    report.keys.push(None);
                }
            }
        }
        observe(CacheEvent::Planned {
            total: records.len(),
            missing: missing.len(),
        });
        let started = Instant::now();
        let size = encoder.input_spec().image_size;
        let mut pending: Vec<(FeatureKey, Tensor)> = Vec::new();
        let mut done = 0;
        for chunk in missing.chunks(batch_size.max(1)) {
            let mut pixels = Vec::with_capacity(chunk.len() * 3 * size * size);
            let mut keys = Vec::with_capacity(chunk.len());
            for (i, key) in chunk {
                match load_image(&records[*i].image) {
                    Ok(img) => {
                        pixels.extend(self.preprocess.apply(&img));
                        keys.push(key.clone());
                    }
                    Err(e) => {
                        report
                            .skipped
                            .skip(e.kind, image_path(&records[*i]), None, e.message);
                        report.keys[*i] = None;
                    }
                }
            }
            if !keys.is_empty() {
                let batch = Tensor::from_vec(pixels, (keys.len(), 3, size, size), &Device::Cpu)?;
                let features = encoder.encode(&batch)?.to_dtype(DType::F16)?;
                for (j, key) in keys.into_iter().enumerate() {
                    pending.push((key, features.get(j)?));
                }
                self.encoder_passes += features.dims()[0];
                report.encoded += features.dims()[0];
            }
            done += chunk.len();
            if pending.len() >= self.shard_size {
                self.flush(&mut pending)?;
            }
            observe(CacheEvent::Encoded {
                done,
                images_per_s: done as f64 / started.elapsed().as_secs_f64().max(1e-9),
            });
        }
        self.flush(&mut pending)?;
        report.reused = report.keys.iter().flatten().count() - report.encoded;
        Ok(report)
    }

    /// Writes pending features as one new shard.
    fn flush(&mut self, pending: &mut Vec<(FeatureKey, Tensor)>) -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let tensors: Vec<(String, Tensor)> = pending.drain(..).map(|(k, t)| (k.0, t)).collect();
        // Unique across processes and calls: time, pid and a per-process count.
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!(
            "shard-{stamp:024}-{}-{}.safetensors",
            std::process::id(),
            self.shards.len()
        );
        let path = self.dir.join(name);
        let tmp = path.with_extension("partial");
        candle_core::safetensors::save(&tensors.into_iter().collect::<HashMap<_, _>>(), &tmp)?;
        let file = fs::File::open(&tmp).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        self.add_shard(path)
    }

    /// The cached features of `key`, (n_patch, d_v) f32.
    pub fn get(&self, key: &FeatureKey) -> Result<Tensor> {
        let entry = self
            .index
            .get(key)
            .ok_or_else(|| corrupt(&self.dir, format!("no cached features for {}", key.0)))?;
        let shard = &self.shards[entry.shard];
        let bytes = shard
            .map
            .get(entry.start..entry.start + entry.len)
            .ok_or_else(|| corrupt(&shard.path, "feature shard shrank after indexing"))?;
        let t = Tensor::from_raw_buffer(
            bytes,
            DType::F16,
            &[self.num_patches, self.feature_dim],
            &Device::Cpu,
        )?;
        Ok(t.to_dtype(DType::F32)?)
    }

    /// Features of several images stacked and pooled to the configured
    /// visual tokens: (batch, tokens, d_v) f32.
    pub fn batch(&self, keys: &[&FeatureKey]) -> Result<Tensor> {
        let rows = keys
            .iter()
            .map(|k| self.get(k))
            .collect::<Result<Vec<_>>>()?;
        Ok(fedcmp_model::vision::pool_grid(
            &Tensor::stack(&rows, 0)?,
            self.visual_tokens,
        )?)
    }
}

fn image_path(record: &Record) -> PathBuf {
    match &record.image {
        ImageSource::File(p) => p.clone(),
        ImageSource::Raw(_) => PathBuf::from(&record.id),
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}
