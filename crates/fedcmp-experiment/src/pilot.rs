//! Single-source scenarios for quick centralized checks (`fedcmp align`):
//! one client, one labelled domain, a held-out split of a given size. They
//! are ordinary scenario files, so a pilot run is an ordinary run that
//! `fedcmp run --config <run>/settings.toml` repeats.

use std::path::{Path, PathBuf};

use fedcmp_data::scenario::Scenario;

use crate::files::write_atomic;
use crate::{io_error, Result};

/// Fashion-MNIST's training images, `train` of them for one client and
/// `held_out` each for validation and test (a seeded subset), captioned
/// from the source's templates.
pub fn fashion_scenario_text(train: usize, held_out: usize, seed: u64) -> String {
    let total = train + 2 * held_out;
    let fraction = held_out as f64 / total as f64;
    format!(
        "# A single-domain pilot: Fashion-MNIST, one client (written by fedcmp align).\n\
         name = \"fashion-mnist-pilot\"\n\
         description = \"one client, Fashion-MNIST with template captions\"\n\
         seed = {seed}\n\
         clients = 1\n\
         sources = [{{ kind = \"fashion-mnist\", split = \"train\", limit = {total}, seed = {seed} }}]\n\
         split = {{ validation = {fraction}, test = {fraction}, min-count = {held_out} }}\n\
         partition = {{ kind = \"iid\" }}\n"
    )
}

/// Writes the pilot scenario under `dir` (checked by parsing it back) and
/// returns its path.
pub fn write_fashion_scenario(
    dir: &Path,
    train: usize,
    held_out: usize,
    seed: u64,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let path = dir.join("fashion-mnist-pilot.toml");
    let text = fashion_scenario_text(train, held_out, seed);
    Scenario::parse(&path, &text)?;
    write_atomic(&path, text.as_bytes())?;
    Ok(path)
}
