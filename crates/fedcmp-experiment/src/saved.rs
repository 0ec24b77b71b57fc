//! A trained projector on disk, with the settings it was made with: the
//! starting point of `fedcmp export`, `caption` and `eval`.
//!
//! Two kinds of folder hold one:
//! - a run folder (`fedcmp run`): `projector.safetensors` and
//!   `settings.toml`;
//! - a comparison folder (`fedcmp compare`, the main job's `runs/main`):
//!   one projector per reported cell,
//!   `cells/<scenario>/<method>/g<setting>-s<seed>.safetensors`, with the
//!   cell's own `.settings.toml` beside it. A cell is chosen
//!   by method, scenario (needed only when the folder holds several) and
//!   seed; the tuning runs' cells are never chosen.

use std::path::{Path, PathBuf};

use fedcmp_core::ParamSet;
use fedcmp_model::projector::{ProjectorConfig, ProjectorKind};
use fedcmp_runtime::convert::{load_params_file, projector_params};
use fedcmp_runtime::suite::SuiteConfig;

use crate::assembly::fresh_projector;
use crate::compare::TUNING_SEED;
use crate::settings::{Layers, RunSettings};
use crate::{io_error, ExperimentError, Result};

/// Which cell of a comparison folder (ignored for a run folder).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CellChoice {
    pub scenario: Option<String>,
    pub method: Option<String>,
    pub seed: u64,
}

/// A projector file and what it was made with.
#[derive(Debug, Clone)]
pub struct SavedProjector {
    pub file: PathBuf,
    /// The settings of the run (scenario, recipe, backbones, caption
    /// layout).
    pub settings: RunSettings,
    /// For people and file names: `<scenario>-<method>-s<seed>`.
    pub label: String,
    /// The evaluation sizes its numbers were measured with (a comparison's
    /// pinned `[evaluation]`; a run's are the defaults).
    pub suite: SuiteConfig,
}

impl SavedProjector {
    /// Finds the projector in `dir` (a run folder, or a comparison folder
    /// and `choice`).
    pub fn locate(dir: &Path, choice: &CellChoice) -> Result<Self> {
        if dir.join("projector.safetensors").is_file() {
            return Self::from_run_folder(dir);
        }
        if dir.join("cells").is_dir() {
            return Self::from_comparison(dir, choice);
        }
        Err(ExperimentError::File {
            path: dir.to_path_buf(),
            message: "neither a run folder (no projector.safetensors) nor a comparison folder \
                      (no cells/)"
                .into(),
        })
    }

    fn from_run_folder(dir: &Path) -> Result<Self> {
        let settings_file = dir.join("settings.toml");
        let settings = RunSettings::resolve(&Layers::new().file(&settings_file)?)?;
        let label = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into());
        Ok(Self {
            file: dir.join("projector.safetensors"),
            settings,
            label,
            suite: SuiteConfig::default(),
        })
    }

    /// The scenarios a comparison folder holds cells of (empty for any
    /// other folder).
    pub fn cell_scenarios(dir: &Path) -> Result<Vec<String>> {
        let cells = dir.join("cells");
        if cells.is_dir() {
            subfolders(&cells)
        } else {
            Ok(Vec::new())
        }
    }

    fn from_comparison(dir: &Path, choice: &CellChoice) -> Result<Self> {
        let cells = dir.join("cells");
        let scenarios = subfolders(&cells)?;
        let scenario = match (&choice.scenario, scenarios.as_slice()) {
            (Some(s), _) if scenarios.contains(s) => s.clone(),
            (None, [only]) => only.clone(),
            (given, _) => {
                return Err(ExperimentError::Invalid(format!(
                    "{}: {} (scenarios here: {})",
                    dir.display(),
                    match given {
                        Some(s) => format!("no cells of scenario `{s}`"),
                        None => "several scenarios; choose one with --scenario".into(),
                    },
                    scenarios.join(", ")
                )))
            }
        };
        let methods = subfolders(&cells.join(&scenario))?;
        let method = match &choice.method {
            Some(m) if methods.contains(m) => m.clone(),
            given => {
                return Err(ExperimentError::Invalid(format!(
                    "{}: {} (methods of {scenario} here: {})",
                    dir.display(),
                    match given {
                        Some(m) => format!("no cells of method `{m}`"),
                        None => "a comparison folder: choose a method with --method".into(),
                    },
                    methods.join(", ")
                )))
            }
        };
        let folder = cells.join(&scenario).join(&method);
        let seed = choice.seed;
        let suffix = format!("-s{seed}.json");
        let mut reported: Vec<PathBuf> = std::fs::read_dir(&folder)
            .map_err(io_error(&folder))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('g') && n.ends_with(&suffix))
            })
            .collect();
        reported.sort();
        let cell = match reported.as_slice() {
            [one] if seed != TUNING_SEED => one.clone(),
            _ => {
                return Err(ExperimentError::Invalid(format!(
                    "{}: no reported cell of seed {seed} (choose another with --seed)",
                    folder.display()
                )))
            }
        };
        let file = cell.with_extension("safetensors");
        if !file.is_file() || !cell.with_extension("settings.toml").is_file() {
            return Err(ExperimentError::File {
                path: cell,
                message: "this cell kept no projector (local-only cells do not, nor did cells \
                          of versions before 2026-11-30); run the comparison again in a new \
                          folder"
                    .into(),
            });
        }
        let settings_file = cell.with_extension("settings.toml");
        let settings = RunSettings::resolve(&Layers::new().file(&settings_file)?)?;
        Ok(Self {
            file,
            settings,
            label: format!("{scenario}-{method}-s{seed}"),
            suite: pinned_suite(dir)?,
        })
    }

    /// The projector's shape and parameters (in the projector's own
    /// order), checked against the recipe's kind.
    pub fn load(&self) -> Result<(ProjectorConfig, ParamSet)> {
        let context = |e: ExperimentError| e.context(format!("reading {}", self.file.display()));
        let by_name = load_params_file(&self.file).map_err(|e| context(e.into()))?;
        let config = self.config(&by_name)?;
        let like = projector_params(&fresh_projector(
            config.kind,
            config.input_dim,
            config.output_dim,
            0,
        )?)?;
        // The file lists tensors by name; the projector wants its own order.
        let ordered = like
            .entries()
            .iter()
            .map(|(name, _)| {
                let tensor = by_name
                    .get(name)
                    .cloned()
                    .ok_or_else(|| ExperimentError::File {
                        path: self.file.clone(),
                        message: format!("no tensor `{name}`"),
                    })?;
                Ok((name.clone(), tensor))
            })
            .collect::<Result<Vec<_>>>()?;
        let params = ParamSet::new(ordered)?;
        like.check_same_layout(&params)
            .map_err(|e| context(ExperimentError::from(e)))?;
        Ok((config, params))
    }

    /// The projector's shape, from the file's tensors and the recipe's kind.
    fn config(&self, params: &ParamSet) -> Result<ProjectorConfig> {
        let kind = self.settings.recipe.projector;
        let bad = |what: &str| ExperimentError::File {
            path: self.file.clone(),
            message: format!("not a {kind} projector: {what}"),
        };
        let first = params
            .get("linear_1.weight")
            .ok_or_else(|| bad("no `linear_1.weight`"))?;
        let [output_dim, input_dim] = first.shape[..] else {
            return Err(bad("`linear_1.weight` is not a matrix"));
        };
        let expected = match kind {
            ProjectorKind::Linear => 2,
            ProjectorKind::Mlp2xGelu => 4,
        };
        if params.len() != expected {
            return Err(bad(&format!(
                "{} tensors, expected {expected}",
                params.len()
            )));
        }
        Ok(ProjectorConfig {
            kind,
            input_dim,
            output_dim,
        })
    }
}

/// Names of the folders directly under `dir`, sorted.
fn subfolders(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(io_error(dir))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// A comparison's pinned `[evaluation]` sizes (`settings.toml`).
fn pinned_suite(dir: &Path) -> Result<SuiteConfig> {
    #[derive(serde::Deserialize)]
    struct Pinned {
        evaluation: SuiteConfig,
    }
    let path = dir.join("settings.toml");
    let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
    let pinned: Pinned = toml::from_str(&text).map_err(|e| ExperimentError::File {
        path: path.clone(),
        message: format!("not a comparison's settings file: {e}"),
    })?;
    Ok(pinned.evaluation)
}
