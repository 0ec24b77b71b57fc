//! `fedcmp scenario`: list the standard scenarios, show how one deals its
//! data to clients (shard sizes, source and label histograms, skew), and
//! export its shards as site folders for a federation across sites.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use fedcmp_assets::cache_root;
use fedcmp_data::scenario::{built_in_names, Federation, Scenario};
use fedcmp_experiment::federation::{label_name, resolve};
use fedcmp_experiment::sites::export;
use fedcmp_experiment::{Layers, RunOptions, RunSettings};

use crate::progress::Progress;

#[derive(Debug, Subcommand)]
pub enum ScenarioAction {
    /// The built-in scenarios.
    List,
    /// Resolve a scenario on its data and print the clients' shards.
    Show {
        /// A built-in name (iid, concept-skew, domain-silos, cross-device) or a TOML file.
        name: String,
        /// Also write a PNG bar chart of the shards to this file.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Deal a scenario's data into one folder per site (`site-<id>/`: its
    /// images and `data.jsonl`, in shard order) and `held-out/` (the
    /// validation and test splits), for a federation across sites that
    /// trains exactly the pairs of the simulation.
    Export {
        /// A built-in name (iid, concept-skew, domain-silos, cross-device) or a TOML file.
        name: String,
        /// Folder to write the sites into.
        #[arg(long)]
        out: PathBuf,
        /// Cap every source of the scenario at this many records.
        #[arg(long)]
        limit: Option<usize>,
        /// How template-captioned sources caption: varied, or content.
        #[arg(long, value_parser = crate::args::kebab::<fedcmp_data::templates::CaptionStyle>)]
        captions: Option<fedcmp_data::templates::CaptionStyle>,
    },
}

pub fn run(cache_dir: Option<PathBuf>, action: ScenarioAction) -> Result<()> {
    let root = cache_root(cache_dir)?;
    match action {
        ScenarioAction::List => {
            for name in built_in_names() {
                let (s, _) = Scenario::load(name)?;
                println!("{:<14} {}", s.name, s.description);
            }
            Ok(())
        }
        ScenarioAction::Show { name, plot } => {
            let progress = Progress::default();
            let (scenario, federation) = resolve(&root, &name, &progress)?;
            progress.finish();
            print_federation(&scenario, &federation);
            if let Some(path) = plot {
                super::plot::shard_chart(&root, &scenario, &federation, &path)?;
                println!("\nplot written to {}", path.display());
            }
            Ok(())
        }
        ScenarioAction::Export {
            name,
            out,
            limit,
            captions,
        } => {
            let options = RunOptions {
                scenario: Some(name),
                limit,
                captions,
                ..RunOptions::default()
            };
            let settings = RunSettings::resolve(&Layers::new().flags(&options)?)?;
            let progress = Progress::default();
            let exported = export(&root, &settings, &out, &progress)?;
            progress.finish();
            for site in &exported.sites {
                println!(
                    "site {:>3}: {:>6} pairs  {}",
                    site.client,
                    site.pairs,
                    site.manifest.display()
                );
            }
            println!("validation: {}", exported.validation.display());
            println!("test:       {}", exported.test.display());
            Ok(())
        }
    }
}

fn print_federation(scenario: &Scenario, f: &Federation) {
    let splits = &f.plan.splits;
    println!("scenario {}: {}", scenario.name, scenario.description);
    println!(
        "partition {}  (seed {}, {} clients)",
        scenario.partition, scenario.seed, scenario.clients
    );
    println!(
        "records {}: train {}, validation {}, test {} (held out per source, never trained on)",
        f.corpus.records.len(),
        splits.train.len(),
        splits.validation.len(),
        splits.test.len()
    );
    if f.corpus.skipped.total() > 0 {
        println!("{}", f.corpus.skipped);
    }
    let sources = &f.items.sources;
    println!(
        "\n{:>6} {:>6}  {:<34} top labels",
        "client", "size", "sources"
    );
    for (client, shard) in f.summary.shards.iter().enumerate() {
        let mut by_source: Vec<(usize, &str)> = shard
            .sources
            .iter()
            .map(|(s, n)| (*n, sources.get(*s as usize).map_or("?", String::as_str)))
            .collect();
        by_source.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
        let source_text: Vec<String> = by_source
            .iter()
            .take(2)
            .map(|(n, s)| format!("{s} {:.0}%", 100.0 * *n as f64 / shard.size.max(1) as f64))
            .collect();
        let mut labels: Vec<(usize, String)> = shard
            .labels
            .iter()
            .map(|((s, l), n)| (*n, label_name(f, *s, *l)))
            .collect();
        labels.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let label_text: Vec<String> = labels
            .iter()
            .take(3)
            .map(|(n, l)| format!("{l} {:.0}%", 100.0 * *n as f64 / shard.size.max(1) as f64))
            .collect();
        let more = if by_source.len() > 2 { " +" } else { "" };
        println!(
            "{client:>6} {:>6}  {:<34} {}",
            shard.size,
            source_text.join(", ") + more,
            label_text.join(", ")
        );
    }
    let s = &f.summary.stats;
    println!(
        "\nshard sizes {}..{} (ratio {:.1}); over {:?}: mean top-1 share {:.2}, top-2 {:.2}, \
         total variation from the pool {:.2}; mean source purity {:.2}",
        s.min_size,
        s.max_size,
        s.size_ratio,
        f.summary.key,
        s.mean_top1_share,
        s.mean_top2_share,
        s.mean_total_variation,
        s.mean_source_purity
    );
    if let Some(k) = scenario.participation.clients_per_round {
        println!(
            "each round: {k} of {} clients sampled, each dropping out with probability {} \
             and straggling (half the local steps) with probability {}",
            scenario.clients, scenario.participation.dropout, scenario.participation.stragglers
        );
    }
}
