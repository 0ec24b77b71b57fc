//! LLaVA pretraining JSON (`blip_laion_cc_sbu_558k.json` and alike): one
//! JSON array of entries
//!
//! ```json
//! {"id": "004539375", "image": "00453/004539375.jpg",
//!  "conversations": [
//!    {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
//!    {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"}]}
//! ```
//!
//! The caption is the first `gpt` (or `assistant`) turn after the first
//! `human` (or `user`) turn that holds `<image>`; the instruction itself is
//! not kept (projector pretraining aligns images with captions). Image paths
//! are relative to an image folder. Record ids are `<source>/<entry id>`.
//!
//! The array is parsed into borrowed raw entries first and each entry on its
//! own, so one bad entry is a counted skip, not a failed run, and a 558k
//! corpus is never held as a `serde_json::Value` tree. A file that is not a
//! JSON array at all is an error.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{check_image_file, read_bytes, Collector, ImageRoot};
use crate::record::{Corpus, ImageSource, Record, SkipKind};
use crate::{DataError, Result};

/// How to read a LLaVA JSON file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Folder relative image paths start from; `None`: the file's folder.
    pub image_root: Option<PathBuf>,
    /// The source name of every record (and prefix of its id).
    pub source: String,
    /// Decode each image now instead of only checking it exists.
    pub verify_images: bool,
    /// Let image paths leave the image root (see [`super::ImageRoot`]).
    pub allow_images_outside_root: bool,
}

/// One entry, leniently: fields other than these are ignored (LLaVA mixes
/// carry extras such as `model`), and a missing field is reported by name.
#[derive(Debug, Deserialize)]
struct Entry {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    conversations: Option<Vec<Turn>>,
}

#[derive(Debug, Deserialize)]
struct Turn {
    from: String,
    value: String,
}

/// Reads a LLaVA JSON file; see the module header.
pub fn read(path: &Path, options: &Options) -> Result<Corpus> {
    let bytes = read_bytes(path)?;
    let text = std::str::from_utf8(&bytes).map_err(|e| DataError::Malformed {
        path: path.to_path_buf(),
        message: format!("not UTF-8 text ({e}); expected a LLaVA JSON array"),
    })?;
    // Editors on Windows may open the file with a byte-order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let entries: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| DataError::Malformed {
        path: path.to_path_buf(),
        message: format!("not a LLaVA JSON array of entries: {e}"),
    })?;
    let root = ImageRoot::new(
        path,
        options.image_root.as_deref(),
        options.allow_images_outside_root,
    );
    let mut out = Collector::new(path);
    let mut lines = LineCounter::new(text);
    for (i, raw) in entries.iter().enumerate() {
        let number = i + 1;
        let line = lines.line_of(raw.get());
        match entry_record(raw, number, &root, options) {
            Ok(record) => {
                if !out.claim_id(&record.id) {
                    out.skip(
                        SkipKind::MalformedRecord,
                        line,
                        format!("entry {number}: duplicate id {:?}", record.id),
                    );
                    continue;
                }
                let ImageSource::File(image) = &record.image else {
                    continue;
                };
                if let Some(bad) = check_image_file(image, options.verify_images) {
                    out.skip(bad.kind, line, format!("entry {number}: {}", bad.message));
                    continue;
                }
                out.push(record);
            }
            Err((kind, message)) => out.skip(kind, line, format!("entry {number}: {message}")),
        }
    }
    Ok(out.finish())
}

/// The record of one entry, or why it is skipped (before the image check,
/// which the caller makes once the id is known to be new).
fn entry_record(
    raw: &RawValue,
    number: usize,
    root: &ImageRoot,
    options: &Options,
) -> std::result::Result<Record, (SkipKind, String)> {
    let malformed = |m: String| (SkipKind::MalformedRecord, m);
    let entry: Entry = serde_json::from_str(raw.get()).map_err(|e| malformed(e.to_string()))?;
    let local_id = match &entry.id {
        None | Some(serde_json::Value::Null) => number.to_string(),
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        Some(other) => return Err(malformed(format!("id {other} is not a string or number"))),
    };
    let image = entry
        .image
        .as_deref()
        .ok_or_else(|| malformed("no `image` (a text-only entry)".to_string()))?;
    let turns = entry
        .conversations
        .as_deref()
        .ok_or_else(|| malformed("no `conversations`".to_string()))?;
    let caption = caption(turns).map_err(malformed)?;
    if caption.is_empty() {
        return Err((SkipKind::EmptyCaption, "the gpt turn is empty".to_string()));
    }
    let image = root.resolve(image)?;
    Ok(Record {
        id: format!("{}/{local_id}", options.source),
        image: ImageSource::File(image),
        caption: caption.to_string(),
        label: None,
        source: options.source.clone(),
    })
}

fn caption(turns: &[Turn]) -> std::result::Result<&str, String> {
    let is_human = |t: &Turn| matches!(t.from.as_str(), "human" | "user");
    let is_gpt = |t: &Turn| matches!(t.from.as_str(), "gpt" | "assistant");
    let Some(asks) = turns
        .iter()
        .position(|t| is_human(t) && t.value.contains("<image>"))
    else {
        return Err("no `<image>` in a human turn".to_string());
    };
    turns[asks + 1..]
        .iter()
        .find(|t| is_gpt(t))
        .map(|t| t.value.trim())
        .ok_or_else(|| "no gpt turn after the `<image>` turn".to_string())
}

/// 1-based line numbers of positions in `text`, for entries visited in
/// order: counting resumes where the last call stopped, so a whole file
/// costs one pass.
struct LineCounter<'a> {
    text: &'a str,
    offset: usize,
    line: usize,
}

impl<'a> LineCounter<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text,
            offset: 0,
            line: 1,
        }
    }

    /// The line `slice` (a sub-slice of the text) starts on.
    fn line_of(&mut self, slice: &str) -> usize {
        // Raw entries borrow from `text`, so the address difference is the
        // byte offset; no unsafe needed.
        let at = (slice.as_ptr() as usize).saturating_sub(self.text.as_ptr() as usize);
        let at = at.min(self.text.len());
        if at >= self.offset {
            let newlines = self.text.as_bytes()[self.offset..at]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            self.line += newlines;
            self.offset = at;
        }
        self.line
    }
}
