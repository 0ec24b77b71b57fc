//! The one record type every corpus reader produces: an image (a file on
//! disk or decoded pixels held in memory), its caption, an optional class
//! label, the source (domain) it belongs to, and a stable id.
//!
//! Readers never fail a whole run over one bad record: they skip it and
//! count it in a [`SkipReport`] by kind, with the file and line of the first
//! few, for the end-of-run summary.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// Decoded pixels kept in memory (IDX digits, CSV digits, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawImage {
    pub width: u32,
    pub height: u32,
    /// 1 (grayscale) or 3 (RGB), interleaved, row-major.
    pub channels: u8,
    pub pixels: Vec<u8>,
}

/// Where a record's image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// An encoded image file (PNG, JPEG, WebP), decoded when needed.
    File(PathBuf),
    /// Pixels already in memory, shared cheaply between clones.
    Raw(Arc<RawImage>),
}

/// One image-caption pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Stable across runs and machines: `<source>/<id within the source>`.
    pub id: String,
    pub image: ImageSource,
    pub caption: String,
    /// Class index within the source, where the source has labels.
    pub label: Option<u32>,
    /// The source (domain) name, e.g. `fashion-mnist`.
    pub source: String,
}

/// Why a record was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SkipKind {
    /// The image file does not exist.
    MissingImage,
    /// The image file exists but cannot be decoded (truncated, corrupt,
    /// unsupported format).
    UndecodableImage,
    /// The caption is empty or whitespace.
    EmptyCaption,
    /// A line or entry of a manifest cannot be parsed.
    MalformedRecord,
    /// The image path leaves the manifest's image root (after `..` and
    /// symlinks), and the source does not allow that.
    OutsideRoot,
}

impl fmt::Display for SkipKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::MissingImage => "missing image",
            Self::UndecodableImage => "undecodable image",
            Self::EmptyCaption => "empty caption",
            Self::MalformedRecord => "malformed record",
            Self::OutsideRoot => "image outside its root",
        })
    }
}

/// Where a skipped record was found, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SkipExample {
    pub kind: SkipKind,
    pub file: PathBuf,
    /// 1-based line the record starts on, when known (for a JSON array the
    /// entry's first line; the message also gives the entry's index).
    pub line: Option<usize>,
    pub message: String,
}

/// Skipped records by kind, with the first few examples of each kind.
/// Serialised (summary.json, results.json) as `{"total", "counts",
/// "examples"}`; displayed as a summary line and one line per example.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SkipReport {
    counts: BTreeMap<SkipKind, usize>,
    examples: Vec<SkipExample>,
}

impl SkipReport {
    /// Examples kept per kind; the counts are always complete.
    pub const EXAMPLES_PER_KIND: usize = 5;

    /// Counts one skipped record.
    pub fn skip(
        &mut self,
        kind: SkipKind,
        file: impl Into<PathBuf>,
        line: Option<usize>,
        message: impl Into<String>,
    ) {
        let count = self.counts.entry(kind).or_insert(0);
        *count += 1;
        if *count <= Self::EXAMPLES_PER_KIND {
            self.examples.push(SkipExample {
                kind,
                file: file.into(),
                line,
                message: message.into(),
            });
        }
    }

    /// Adds another report's counts and examples.
    pub fn merge(&mut self, other: SkipReport) {
        for (kind, n) in other.counts {
            *self.counts.entry(kind).or_insert(0) += n;
        }
        for ex in other.examples {
            let kept = self.examples.iter().filter(|e| e.kind == ex.kind).count();
            if kept < Self::EXAMPLES_PER_KIND {
                self.examples.push(ex);
            }
        }
    }

    /// Skipped records of `kind`.
    pub fn count(&self, kind: SkipKind) -> usize {
        self.counts.get(&kind).copied().unwrap_or(0)
    }

    /// All skipped records.
    pub fn total(&self) -> usize {
        self.counts.values().sum()
    }

    /// Counts by kind, in a fixed order.
    pub fn counts(&self) -> &BTreeMap<SkipKind, usize> {
        &self.counts
    }

    /// The first few examples of each kind.
    pub fn examples(&self) -> &[SkipExample] {
        &self.examples
    }
}

/// Records from one or more sources, with what was skipped and the class
/// names of labelled sources.
#[derive(Debug, Clone, Default)]
pub struct Corpus {
    pub records: Vec<Record>,
    pub skipped: SkipReport,
    /// Source name -> class names by label index.
    pub label_names: BTreeMap<String, Vec<String>>,
    /// Source name -> the caption template zero-shot prompts use (the
    /// domain's first template, with `{label}`), for labelled sources.
    pub prompt_templates: BTreeMap<String, String>,
}

impl Corpus {
    /// One zero-shot prompt per class of `source` (its prompt template, or
    /// `"A photo of {label}."` for a manifest with string labels, filled
    /// with each class's first name), or None for a source without labels.
    pub fn class_prompts(&self, source: &str) -> Option<Vec<String>> {
        let names = self.label_names.get(source)?;
        let template = self
            .prompt_templates
            .get(source)
            .map_or("A photo of {label}.", String::as_str);
        Some(
            names
                .iter()
                .map(|n| crate::templates::fill(template, n))
                .collect(),
        )
    }

    /// Appends another corpus (sources must not collide; ids stay unique
    /// because they are prefixed by the source).
    pub fn extend(&mut self, other: Corpus) {
        self.records.extend(other.records);
        self.skipped.merge(other.skipped);
        self.label_names.extend(other.label_names);
        self.prompt_templates.extend(other.prompt_templates);
    }
}

impl serde::Serialize for SkipReport {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut out = serializer.serialize_struct("SkipReport", 3)?;
        out.serialize_field("total", &self.total())?;
        out.serialize_field("counts", &self.counts)?;
        out.serialize_field("examples", &self.examples)?;
        out.end()
    }
}

/// `skipped 3 records: 2 missing image, 1 malformed record`, then the
/// examples as `  <file>:<line>: <kind>: <message>`; empty when nothing
/// was skipped.
impl fmt::Display for SkipReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.total() == 0 {
            return Ok(());
        }
        let kinds: Vec<String> = self
            .counts
            .iter()
            .map(|(kind, n)| format!("{n} {kind}"))
            .collect();
        let plural = if self.total() == 1 { "" } else { "s" };
        write!(
            f,
            "skipped {} record{plural}: {}",
            self.total(),
            kinds.join(", ")
        )?;
        for ex in &self.examples {
            let line = ex.line.map(|l| format!(":{l}")).unwrap_or_default();
            write!(
                f,
                "\n  {}{line}: {}: {}",
                ex.file.display(),
                ex.kind,
                ex.message
            )?;
        }
        Ok(())
    }
}
