//! The entry point of the coverage-guided (libFuzzer) targets in `fuzz/`:
//! one call per input, under the same allocation bound as the mutational
//! engine. An allocation past the bound aborts, a panic aborts (libFuzzer's
//! panic hook), and libFuzzer keeps the input of either as a crash.

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::targets::{target, Seeds};
use crate::ALLOCATOR;

/// What a libFuzzer run may allocate per input beyond what it holds.
pub const ALLOC_BOUND: usize = 256 << 20;

/// The scratch folder, with the files the seeds refer to (images of the
/// manifests), made once per process and left for inspection.
fn scratch() -> &'static PathBuf {
    static SCRATCH: OnceLock<PathBuf> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fedcmp-libfuzzer-{}", std::process::id()));
        if let Err(e) = std::fs::create_dir_all(&dir)
            .map_err(anyhow::Error::from)
            .and_then(|_| {
                Seeds::generate(&dir)?;
                Ok(())
            })
        {
            panic!(
                "cannot prepare the fuzz scratch folder {}: {e:#}",
                dir.display()
            );
        }
        dir
    })
}

/// Runs the target called `name` on `data`.
pub fn run_once(name: &str, data: &[u8]) {
    let Some(target) = target(name) else {
        panic!("no fuzz target {name:?}");
    };
    let scratch = scratch();
    let _ = ALLOCATOR.set_limit(ALLOCATOR.allocated().saturating_add(ALLOC_BOUND));
    let _verdict = target.run(scratch, data);
    let _ = ALLOCATOR.set_limit(usize::MAX);
}
