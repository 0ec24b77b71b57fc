//! `fedcmp caption` and `fedcmp eval`: a saved projector (a run folder's,
//! or one cell of a comparison folder) captioning the user's own images,
//! and scored by the evaluation suite on any scenario.

use crate::exit::BadFlags;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use fedcmp_assets::cache_root;
use fedcmp_experiment::saved::{CellChoice, SavedProjector};
use fedcmp_experiment::use_saved::{
    caption_images, evaluate_manifest, evaluate_saved, CaptionOptions, Decoding, ManifestFile,
};

use super::export::ProjectorArgs;
use super::report::print_suite;
use crate::progress::Progress;

#[derive(Debug, Clone, Args)]
pub struct CaptionArgs {
    #[command(flatten)]
    pub projector: ProjectorArgs,
    /// Image files (PNG, JPEG, WebP).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Beam width; 1 decodes greedily.
    #[arg(long, default_value_t = 1)]
    pub beams: usize,
    /// At most this many tokens per caption.
    #[arg(long, default_value_t = 30)]
    pub max_tokens: usize,
}

pub fn caption(cache_dir: Option<PathBuf>, args: &CaptionArgs) -> Result<()> {
    let saved = args.projector.locate()?;
    let decoding = match args.beams {
        0 => return Err(BadFlags("--beams must be at least 1".into()).into()),
        1 => Decoding::Greedy,
        width => Decoding::Beam { width },
    };
    let root = cache_root(cache_dir)?;
    let progress = Progress::default();
    let captions = caption_images(
        &root,
        &saved,
        &args.images,
        CaptionOptions {
            decoding,
            max_tokens: args.max_tokens,
        },
        &progress,
    )?;
    progress.finish();
    println!("projector: {} ({})", saved.label, saved.file.display());
    for c in &captions {
        match &c.caption {
            Ok(text) => println!("{}: {text}", c.image.display()),
            Err(why) => println!("{}: [{why}]", c.image.display()),
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// A run folder (`fedcmp run`) or a comparison folder (`fedcmp compare`).
    #[arg(long)]
    pub run: PathBuf,
    /// Comparison folders: the method's cell.
    #[arg(long)]
    pub method: Option<String>,
    /// Comparison folders: the seed of the cell.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate on this scenario's test split (a built-in name or a
    /// scenario file) [default: the one the projector was trained on]; in
    /// a comparison folder it also picks the cell when the folder has cells
    /// of it.
    #[arg(long, conflicts_with = "manifest")]
    pub scenario: Option<String>,
    /// Evaluate on every pair of this manifest instead (a .jsonl or .csv
    /// with columns image, caption, optional label and source; or a LLaVA
    /// .json): a site's own held-out data.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Folder the manifest's relative image paths start from, and that
    /// every image must be inside [default: the manifest's folder].
    #[arg(long, requires = "manifest")]
    pub image_root: Option<PathBuf>,
    /// Read the manifest's images even where they leave the image root.
    #[arg(long, requires = "manifest")]
    pub allow_images_outside_root: bool,
}

pub fn eval(cache_dir: Option<PathBuf>, args: &EvalArgs) -> Result<()> {
    let held = SavedProjector::cell_scenarios(&args.run)?;
    let cell_scenario = args.scenario.clone().filter(|s| held.contains(s));
    let saved = SavedProjector::locate(
        &args.run,
        &CellChoice {
            scenario: cell_scenario,
            method: args.method.clone(),
            seed: args.seed,
        },
    )?;
    let root = cache_root(cache_dir)?;
    let progress = Progress::default();
    if let Some(manifest) = &args.manifest {
        let file = ManifestFile {
            path: manifest.clone(),
            image_root: args.image_root.clone(),
            allow_images_outside_root: args.allow_images_outside_root,
        };
        let outcome = evaluate_manifest(&root, &saved, &file, &progress)?;
        progress.finish();
        println!(
            "projector {} ({}) on {} pairs of {}:",
            saved.label,
            saved.file.display(),
            outcome.pairs,
            manifest.display()
        );
        print_suite(&[(saved.label.as_str(), &outcome.report)]);
        if outcome.skipped.total() > 0 {
            println!("{}", outcome.skipped);
        }
        return Ok(());
    }
    let (scenario, report) = evaluate_saved(&root, &saved, args.scenario.as_deref(), &progress)?;
    progress.finish();
    println!(
        "projector {} ({}) on the test split of {scenario}:",
        saved.label,
        saved.file.display()
    );
    print_suite(&[(saved.label.as_str(), &report)]);
    Ok(())
}
