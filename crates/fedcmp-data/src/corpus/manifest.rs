//! JSONL and CSV manifests: one image-caption pair per line (JSONL) or row
//! (CSV, or TSV when the file ends in `.tsv`), with named fields
//!
//! | field | | |
//! |---|---|---|
//! | `image` | required | a local path, relative to the manifest's folder or a given image root |
//! | `caption` | required | |
//! | `label` | optional | a class name, or a non-negative integer class index |
//! | `source` | optional | the record's source (domain); default: the manifest's source name |
//! | `id` | optional | the record's id within its source; default: the line number |
//!
//! (the names can be changed per manifest, see
//! [`ColumnNames`](super::ColumnNames)). Other fields are ignored. CSV
//! headers match case-insensitively. Record ids are `<source>/<id>`.
//!
//! Labels: when every label of a source is an integer, the integers are the
//! class indices; otherwise the distinct names, sorted, are the classes (in
//! [`Corpus::label_names`]), so the indices do not depend on row order.
//!
//! A bad line or row is skipped and counted (malformed, empty caption,
//! missing image) with its 1-based line. A file that cannot be a manifest at
//! all (unreadable, a CSV without an `image` or `caption` column, a JSONL
//! file where no line is a JSON object) is an error naming the file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::{check_image_file, read_bytes, Collector, ColumnNames, ImageRoot};
use crate::record::{Corpus, ImageSource, Record, SkipKind};
use crate::{DataError, Result};

/// How to read a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Folder relative image paths start from; `None`: the manifest's folder.
    pub image_root: Option<PathBuf>,
    pub columns: ColumnNames,
    /// The source name of rows that do not name their own.
    pub source: String,
    /// Decode each image now instead of only checking it exists.
    pub verify_images: bool,
    /// Let image paths leave the image root (see [`super::ImageRoot`]).
    pub allow_images_outside_root: bool,
}

/// One line or row, before checks.
struct Row {
    line: usize,
    image: String,
    caption: Option<String>,
    label: Option<String>,
    source: Option<String>,
    id: Option<String>,
}

type Skip = (SkipKind, String);

fn malformed(message: impl Into<String>) -> Skip {
    (SkipKind::MalformedRecord, message.into())
}

/// Reads a JSONL manifest; see the module header.
pub fn read_jsonl(path: &Path, options: &Options) -> Result<Corpus> {
    let bytes = read_bytes(path)?;
    let mut reader = Reader::new(path, options);
    let (mut non_empty, mut objects) = (0usize, 0usize);
    let mut first_error = None;
    let body = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        let number = i + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        non_empty += 1;
        let parsed = std::str::from_utf8(line)
            .map_err(|e| format!("not UTF-8 ({e})"))
            .and_then(|s| serde_json::from_str::<Map<String, Value>>(s).map_err(|e| e.to_string()));
        let object = match parsed {
            Ok(object) => object,
            Err(message) => {
                first_error.get_or_insert_with(|| format!("line {number}: {message}"));
                reader.out.skip(SkipKind::MalformedRecord, number, message);
                continue;
            }
        };
        objects += 1;
        match jsonl_row(&object, number, &options.columns) {
            Ok(row) => reader.accept(row),
            Err((kind, message)) => reader.out.skip(kind, number, message),
        }
    }
    if non_empty > 0 && objects == 0 {
        return Err(DataError::Malformed {
            path: path.to_path_buf(),
            message: format!(
                "not a JSONL manifest: none of its {non_empty} lines is a JSON object ({}){}",
                first_error.unwrap_or_default(),
                if body.trim_ascii_start().starts_with(b"[") {
                    "; a JSON array of LLaVA entries is read with kind = \"llava-json\""
                } else {
                    ""
                }
            ),
        });
    }
    Ok(reader.finish())
}

fn jsonl_row(
    object: &Map<String, Value>,
    line: usize,
    columns: &ColumnNames,
) -> std::result::Result<Row, Skip> {
    let text = |key: &str| -> std::result::Result<Option<String>, Skip> {
        match object.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(malformed(format!("`{key}` is not a string: {other}"))),
        }
    };
    // Labels and ids may be integers too.
    let text_or_integer = |key: &str| -> std::result::Result<Option<String>, Skip> {
        match object.get(key) {
            Some(Value::Number(n)) if n.as_u64().is_some_and(|v| v <= u64::from(u32::MAX)) => {
                Ok(Some(n.to_string()))
            }
            Some(Value::Number(n)) => Err(malformed(format!(
                "`{key}` {n} is not a non-negative 32-bit integer"
            ))),
            _ => text(key),
        }
    };
    let image =
        text(&columns.image)?.ok_or_else(|| malformed(format!("no `{}` field", columns.image)))?;
    let caption = text(&columns.caption)?;
    if caption.is_none() {
        return Err(malformed(format!("no `{}` field", columns.caption)));
    }
    Ok(Row {
        line,
        image,
        caption,
        label: text_or_integer(&columns.label)?,
        source: text(&columns.source)?,
        id: text_or_integer(&columns.id)?,
    })
}

/// Reads a CSV manifest (tab-separated when the name ends in `.tsv`); see
/// the module header.
pub fn read_csv(path: &Path, options: &Options) -> Result<Corpus> {
    let bytes = read_bytes(path)?;
    let bad = |message: String| DataError::Malformed {
        path: path.to_path_buf(),
        message,
    };
    let body = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let tsv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("tsv"));
    let mut csv = csv::ReaderBuilder::new()
        .delimiter(if tsv { b'\t' } else { b',' })
        // Rows of the wrong length are counted here, not fatal to the file.
        .flexible(true)
        .from_reader(body);
    let header: Vec<String> = csv
        .byte_headers()
        .map_err(|e| bad(format!("cannot read the CSV header: {e}")))?
        .iter()
        .map(|h| String::from_utf8_lossy(h).trim().to_lowercase())
        .collect();
    if header.iter().all(String::is_empty) {
        return Err(bad("empty CSV: no header row".to_string()));
    }
    let find = |name: &str| header.iter().position(|h| *h == name.to_lowercase());
    let need = |name: &str| {
        find(name).ok_or_else(|| {
            bad(format!(
                "no `{name}` column (the header is: {})",
                header.join(", ")
            ))
        })
    };
    let columns = &options.columns;
    let image_col = need(&columns.image)?;
    let caption_col = need(&columns.caption)?;
    let (label_col, source_col, id_col) = (
        find(&columns.label),
        find(&columns.source),
        find(&columns.id),
    );

    let mut reader = Reader::new(path, options);
    let mut record = csv::ByteRecord::new();
    loop {
        match csv.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e.position().map_or(0, |p| line_of(body, p));
                let stop = matches!(e.kind(), csv::ErrorKind::Io(_));
                reader
                    .out
                    .skip(SkipKind::MalformedRecord, line, e.to_string());
                if stop {
                    break;
                }
                continue;
            }
        }
        let line = record.position().map_or(0, |p| line_of(body, p));
        if record.len() != header.len() {
            reader.out.skip(
                SkipKind::MalformedRecord,
                line,
                format!("{} fields, the header has {}", record.len(), header.len()),
            );
            continue;
        }
        let field = |col: usize| -> std::result::Result<String, Skip> {
            let raw = record.get(col).unwrap_or_default();
            std::str::from_utf8(raw)
                .map(str::to_string)
                .map_err(|e| malformed(format!("column {} is not UTF-8 ({e})", col + 1)))
        };
        let optional = |col: Option<usize>| -> std::result::Result<Option<String>, Skip> {
            Ok(match col {
                Some(c) => Some(field(c)?),
                None => None,
            })
        };
        let row = (|| {
            Ok::<_, Skip>(Row {
                line,
                image: field(image_col)?,
                caption: Some(field(caption_col)?),
                label: optional(label_col)?,
                source: optional(source_col)?,
                id: optional(id_col)?,
            })
        })();
        match row {
            Ok(row) => reader.accept(row),
            Err((kind, message)) => reader.out.skip(kind, line, message),
        }
    }
    Ok(reader.finish())
}

/// Checks rows and turns them into records, keeping each record's label
/// text until the whole file is known.
struct Reader<'a> {
    out: Collector,
    options: &'a Options,
    root: ImageRoot,
    labels: Vec<Option<String>>,
}

impl<'a> Reader<'a> {
    fn new(path: &Path, options: &'a Options) -> Self {
        Self {
            out: Collector::new(path),
            options,
            root: ImageRoot::new(
                path,
                options.image_root.as_deref(),
                options.allow_images_outside_root,
            ),
            labels: Vec::new(),
        }
    }

    /// Keeps the row or counts why not. Each row counts once, under the
    /// first problem found: malformed, then empty caption, then image.
    fn accept(&mut self, row: Row) {
        let line = row.line;
        match self.record(row) {
            Ok((record, label)) => {
                self.out.push(record);
                self.labels.push(label);
            }
            Err((kind, message)) => self.out.skip(kind, line, message),
        }
    }

    fn record(&mut self, row: Row) -> std::result::Result<(Record, Option<String>), Skip> {
        let non_empty =
            |s: Option<String>| s.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        let source = non_empty(row.source).unwrap_or_else(|| self.options.source.clone());
        if source.contains('/') {
            return Err(malformed(format!("source {source:?} contains `/`")));
        }
        let image = self.root.resolve(&row.image)?;
        let caption = row.caption.unwrap_or_default().trim().to_string();
        if caption.is_empty() {
            return Err((SkipKind::EmptyCaption, "empty caption".to_string()));
        }
        let id = format!(
            "{source}/{}",
            non_empty(row.id).unwrap_or_else(|| row.line.to_string())
        );
        if !self.out.claim_id(&id) {
            return Err(malformed(format!("duplicate id {id:?}")));
        }
        if let Some(bad) = check_image_file(&image, self.options.verify_images) {
            return Err((bad.kind, bad.message));
        }
        Ok((
            Record {
                id,
                image: ImageSource::File(image),
                caption,
                label: None,
                source,
            },
            non_empty(row.label),
        ))
    }

    /// Assigns class indices per source (see the module header).
    fn finish(self) -> Corpus {
        let mut corpus = self.out.finish();
        let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (record, label) in corpus.records.iter().zip(&self.labels) {
            if let Some(label) = label {
                names
                    .entry(record.source.clone())
                    .or_default()
                    .insert(label.clone());
            }
        }
        let mut index: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
        for (source, set) in names {
            if set.iter().all(|l| canonical_index(l).is_some()) {
                continue;
            }
            let classes: Vec<String> = set.into_iter().collect();
            let map = classes
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), u32::try_from(i).unwrap_or(u32::MAX)))
                .collect();
            index.insert(source.clone(), map);
            corpus.label_names.insert(source, classes);
        }
        for (record, label) in corpus.records.iter_mut().zip(self.labels) {
            record.label = label.and_then(|l| match index.get(&record.source) {
                Some(map) => map.get(&l).copied(),
                None => canonical_index(&l),
            });
        }
        corpus
    }
}

/// The 1-based line a CSV record starts on. The csv crate skips blank lines
/// but reports a record after them at the first blank line, so step over
/// the line breaks that open the record.
fn line_of(body: &[u8], p: &csv::Position) -> usize {
    let start = usize::try_from(p.byte()).unwrap_or(usize::MAX);
    let breaks = body
        .get(start..)
        .unwrap_or_default()
        .iter()
        .take_while(|&&b| b == b'\n' || b == b'\r')
        .filter(|&&b| b == b'\n')
        .count();
    usize::try_from(p.line())
        .unwrap_or(usize::MAX)
        .saturating_add(breaks)
}

/// `"7"` -> 7; `"07"`, `"+7"`, `"-1"`, `"x"` -> None (those are names).
fn canonical_index(label: &str) -> Option<u32> {
    label.parse::<u32>().ok().filter(|n| n.to_string() == label)
}
