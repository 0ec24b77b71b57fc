//! Fetching the registry assets an experiment reads, reporting progress
//! as events.

use std::path::Path;

use crate::events::{Event, Observer};
use crate::Result;

/// Ensures `names` are in the cache under `root` (fetched and verified
/// when missing).
pub fn ensure(root: &Path, names: &[&str], observer: &dyn Observer) -> Result<()> {
    fedcmp_assets::ensure_all(root, names, &mut |event| {
        observer.observe(Event::Asset(&event))
    })?;
    Ok(())
}
