//! `fedcmp assets`: fetch, verify and list the registry-hosted assets.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use fedcmp_assets::{cache_root, catalogue};

use crate::progress::Progress;

#[derive(Debug, Subcommand)]
pub enum AssetsAction {
    /// Fetch (if needed) and verify assets; all of them when none is named.
    Fetch {
        /// Asset names (see `fedcmp assets list`).
        names: Vec<String>,
    },
    /// List the known assets and whether each is cached.
    List,
}

pub fn run(cache_dir: Option<PathBuf>, action: AssetsAction) -> Result<()> {
    let root = cache_root(cache_dir)?;
    match action {
        AssetsAction::Fetch { names } => {
            let names: Vec<String> = if names.is_empty() {
                catalogue().iter().map(|a| a.name.to_string()).collect()
            } else {
                names
            };
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            fedcmp_experiment::assets::ensure(&root, &refs, &Progress::default())?;
            println!("assets ready in {}", root.join("assets").display());
        }
        AssetsAction::List => {
            println!(
                "{:<16} {:<8} {:<44} description",
                "asset", "cached", "source"
            );
            for asset in catalogue() {
                let cached = fedcmp_assets::verify(&root, asset).unwrap_or(false);
                println!(
                    "{:<16} {:<8} {:<44} {}",
                    asset.name,
                    if cached { "yes" } else { "no" },
                    asset.source.describe(),
                    asset.description
                );
            }
            println!("cache: {}", root.display());
        }
    }
    Ok(())
}
