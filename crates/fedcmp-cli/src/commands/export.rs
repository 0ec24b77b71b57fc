//! `fedcmp export`: a trained projector (a run folder's, or one cell of a
//! comparison folder) in the Hugging Face LLaVA and LLaVA layouts.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use fedcmp_experiment::export::{export, ExportFormat};
use fedcmp_experiment::saved::{CellChoice, SavedProjector};

/// Which saved projector: a run folder, or a comparison folder and a cell.
#[derive(Debug, Clone, Args)]
pub struct ProjectorArgs {
    /// A run folder (`fedcmp run`) or a comparison folder (`fedcmp compare`;
    /// the main job's is runs/main).
    #[arg(long)]
    pub run: PathBuf,
    /// Comparison folders: the method's cell (e.g. fed-cmp, fedavg,
    /// centralized, init).
    #[arg(long)]
    pub method: Option<String>,
    /// Comparison folders: the scenario [default: the only one].
    #[arg(long)]
    pub scenario: Option<String>,
    /// Comparison folders: the seed of the cell.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl ProjectorArgs {
    pub fn locate(&self) -> Result<SavedProjector> {
        let choice = CellChoice {
            scenario: self.scenario.clone(),
            method: self.method.clone(),
            seed: self.seed,
        };
        Ok(SavedProjector::locate(&self.run, &choice)?)
    }
}

#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub projector: ProjectorArgs,
    /// Layouts to write: hf-llava, llava [default: both that fit the projector].
    #[arg(long, value_delimiter = ',')]
    pub format: Vec<String>,
    /// Output folder [default: <run>/export/<scenario>-<method>-s<seed>].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: &ExportArgs) -> Result<()> {
    let saved = args.projector.locate()?;
    let formats = if args.format.is_empty() {
        ExportFormat::ALL
            .into_iter()
            .filter(|f| f.fits(saved.settings.recipe.projector))
            .collect()
    } else {
        args.format
            .iter()
            .map(|f| f.parse::<ExportFormat>())
            .collect::<Result<Vec<_>, _>>()?
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.projector.run.join("export").join(&saved.label));
    let written = export(&saved, &out, &formats)?;
    println!("exported {} ({}):", saved.label, saved.file.display());
    for file in written {
        println!("  {}", file.display());
    }
    Ok(())
}
