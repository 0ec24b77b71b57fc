//! The untrained projector's evaluation suite, computed once and reused:
//! every run of a seed starts from the same projector, so `fedcmp run`
//! (which reports the suite before and after training) and a comparison's
//! `init` cells would otherwise score the same projector on the same
//! items again for every method and cell.
//!
//! A report is stored under the asset cache (`<cache>/suites/<key>.json`)
//! and keyed by everything it depends on: the projector's values, the
//! suite (items, captions, labels, domains, calibration images, sizes),
//! the scenario's data settings and vision features, the caption template,
//! a sample of the decoder's weights, and [`SUITE_VERSION`], bumped
//! whenever what the suite measures changes. A missing or unreadable
//! entry is computed (and written atomically); it is never an error.

use std::path::{Path, PathBuf};

use fedcmp_core::ParamSet;
use fedcmp_model::projector::Projector;
use fedcmp_runtime::convert::load_projector;
use fedcmp_runtime::suite::{evaluate, SuiteReport};
use sha2::{Digest, Sha256};

use crate::assembly::Experiment;
use crate::files::write_atomic;
use crate::Result;

/// What the suite measures, as a number: part of every key, so that a
/// change to its definition never reuses an older report.
pub const SUITE_VERSION: u32 = 2;

/// Decoder values hashed per weight tensor.
const DECODER_SAMPLE: usize = 64;

/// The memo of untrained-projector reports under the asset cache `root`.
pub fn memo_dir(root: &Path) -> PathBuf {
    root.join("suites")
}

/// The key of `params`' suite on `experiment`.
fn key(experiment: &Experiment, params: &ParamSet) -> Result<String> {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(format!("fedcmp init suite v{SUITE_VERSION}").as_bytes());
    field(format!("{:?}", experiment.data).as_bytes());
    field(experiment.encoder_identity.as_bytes());
    field(format!("{:?}", experiment.template).as_bytes());
    field(format!("{:?}", experiment.decoder.config()).as_bytes());
    let sample = experiment.decoder.weight_sample(DECODER_SAMPLE)?;
    field(
        &sample
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    );
    let suite = &experiment.suite;
    field(format!("{:?}", suite.config).as_bytes());
    field(format!("{:?}", suite.domains).as_bytes());
    for item in &suite.items {
        field(
            format!(
                "{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{:?}",
                item.id,
                item.sample.key.as_str(),
                item.sample.caption,
                item.domain,
                item.label
            )
            .as_bytes(),
        );
    }
    field(
        format!(
            "{:?} {:?} {:?}",
            suite.zero_shot, suite.checks, suite.examples
        )
        .as_bytes(),
    );
    for key in &suite.calibration {
        field(key.as_str().as_bytes());
    }
    for (name, tensor) in params.entries() {
        field(name.as_bytes());
        field(format!("{:?}", tensor.shape).as_bytes());
        field(
            &tensor
                .data
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The suite of the untrained projector `params` (loaded into `work`),
/// from the memo under `dir` when there, else computed and stored;
/// `done(n)` reports scored pairs when it is computed.
pub fn untrained_suite(
    dir: Option<&Path>,
    experiment: &Experiment,
    work: &Projector,
    params: &ParamSet,
    done: &mut dyn FnMut(usize),
) -> Result<SuiteReport> {
    let path = match dir {
        Some(dir) => Some(dir.join(format!("{}.json", key(experiment, params)?))),
        None => None,
    };
    if let Some(path) = &path {
        if let Ok(bytes) = std::fs::read(path) {
            match serde_json::from_slice::<SuiteReport>(&bytes) {
                Ok(report) => {
                    tracing::debug!(path = %path.display(), "untrained projector's suite reused");
                    done(experiment.suite.num_pairs());
                    return Ok(report);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable suite memo; computing it again")
                }
            }
        }
    }
    load_projector(work, params)?;
    let report = evaluate(&experiment.scorer(), work, &experiment.suite, done)?;
    if let Some(path) = &path {
        let stored = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .map_err(|e| e.to_string())
            .and_then(|()| serde_json::to_vec(&report).map_err(|e| e.to_string()))
            .and_then(|bytes| write_atomic(path, &bytes).map_err(|e| e.to_string()));
        if let Err(error) = stored {
            // A memo that cannot be written costs time later, not results.
            tracing::warn!(path = %path.display(), %error, "the untrained suite was not memoised");
        }
    }
    Ok(report)
}
