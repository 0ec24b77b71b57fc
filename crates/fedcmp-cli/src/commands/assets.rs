//! `fedcmp assets`: fetch, verify and list the offline default assets.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Subcommand;
use fedcmp_assets::{cache_root, catalogue, ensure, find, FetchEvent};

use crate::progress::spinner;

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
            fetch(&root, &refs)?;
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

/// Ensures `names` are cached, with a spinner per asset.
pub fn fetch(root: &Path, names: &[&str]) -> Result<()> {
    for name in names {
        let asset = find(name)?;
        let bar = spinner(name);
        bar.set_message(format!("checking ({})", asset.source.describe()));
        ensure(root, asset, &mut |event| match event {
            FetchEvent::Present { .. } => bar.set_message("cached"),
            FetchEvent::Downloading { command, .. } => {
                tracing::info!(asset = name, %command, "fetching");
                bar.set_message(format!("running `{command}`"));
            }
            FetchEvent::Verified { file, .. } => bar.set_message(format!("verified {file}")),
            FetchEvent::Ready { .. } => tracing::info!(asset = name, "fetched and verified"),
        })?;
        bar.finish_and_clear();
    }
    Ok(())
}
