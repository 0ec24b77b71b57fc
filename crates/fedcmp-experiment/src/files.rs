//! Writing files so that a crash never loses what was there: atomic
//! replacement, appended JSON lines, and settings pinning (a folder of
//! results remembers the settings that made it and refuses others).

use std::io::Write;
use std::path::Path;

use crate::{io_error, ExperimentError, Result};

/// Writes `bytes` to `path` through a temporary file in the same folder,
/// synced and renamed into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    let mut file = std::fs::File::create(&tmp).map_err(io_error(&tmp))?;
    file.write_all(bytes).map_err(io_error(&tmp))?;
    file.sync_all().map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error(path))
}

/// Appends one JSON line and flushes, so a crash loses at most the line
/// being written.
pub fn append_jsonl(
    file: &mut std::fs::File,
    path: &Path,
    value: &impl serde::Serialize,
) -> Result<()> {
    let mut line = serde_json::to_vec(value)
        .map_err(|e| ExperimentError::Internal(format!("cannot encode a record: {e}")))?;
    line.push(b'\n');
    file.write_all(&line).map_err(io_error(path))?;
    file.flush().map_err(io_error(path))
}

/// Whether a pinned settings file was new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinned {
    /// Written now: the folder is new to these settings.
    New,
    /// Already there, with the same text.
    Same,
}

/// Pins `text` (resolved settings) at `path`: writes it when absent;
/// refuses, naming the file, when a different text is there. `what` says
/// what the folder holds and `remedy` how to proceed, for the message.
pub fn pin(path: &Path, text: &str, what: &str, remedy: &str) -> Result<Pinned> {
    match std::fs::read_to_string(path) {
        Ok(previous) if previous == text => Ok(Pinned::Same),
        Ok(_) => Err(ExperimentError::File {
            path: path.to_path_buf(),
            message: format!("holds {what} made with other settings; {remedy}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io_error(dir))?;
            }
            write_atomic(path, text.as_bytes())?;
            Ok(Pinned::New)
        }
        Err(e) => Err(io_error(path)(e)),
    }
}
