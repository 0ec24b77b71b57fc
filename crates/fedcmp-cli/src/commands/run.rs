//! `fedcmp run`: one federated pretraining run of a scenario with a
//! strategy, in simulation. Writes a run folder (resolved settings, metrics
//! per round as JSONL, the final projector and a summary) and shows round,
//! clients, loss, samples/s and ETA while it runs.

use std::io::Write;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use fedcmp_assets::cache_root;
use fedcmp_core::{ClientId, ParamSet};
use fedcmp_data::scenario::Participation;
use fedcmp_model::projector::Projector;
use fedcmp_runtime::checkpoint::{self, Checkpoint};
use fedcmp_runtime::client::ClientData;
use fedcmp_runtime::convert::{load_projector, projector_params, save_params_file};
use fedcmp_runtime::engine::{run as run_engine, CheckpointHook, EngineState, Start};
use fedcmp_runtime::suite::{evaluate as evaluate_suite, SuiteConfig};
use fedcmp_runtime::transport::Transport;
use fedcmp_strategy::config::StrategyConfig;

use super::experiment::{train_local_only, BackboneArgs, Env, TrainingArgs};
use super::report::print_suite;
use crate::progress::bar;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Scenario: a built-in name (iid, concept-skew, domain-silos, cross-device) or a TOML file.
    #[arg(long, default_value = "domain-silos")]
    pub scenario: String,
    /// Strategy name (fedavg, fedprox, fedavgm, fedadagrad, fedadam, fedyogi, scaffold, fednova,
    /// ties, fed-cmp, cra-only, opm-only), or an inline TOML table with its options, e.g.
    /// '{ name = "fed-cmp", energy = 0.9, beta = 0.8 }'.
    #[arg(long, default_value = "fedavg")]
    pub strategy: String,
    #[command(flatten)]
    pub training: TrainingArgs,
    /// Evaluate the global projector on the validation split every N rounds.
    #[arg(long, default_value_t = 5)]
    pub eval_every: u64,
    /// Seed of client sampling, dropouts, shuffles and initialisation (the
    /// scenario's own seed fixes the data split).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder for run folders.
    #[arg(long, default_value = "runs")]
    pub out: PathBuf,
    /// Save a checkpoint every N rounds (and after the last); an interrupted
    /// run resumes from the newest one when started again with the same
    /// settings.
    #[arg(long, default_value_t = 5)]
    pub checkpoint_every: u64,
    /// Start over even if the run folder holds a checkpoint.
    #[arg(long)]
    pub fresh: bool,
    /// The centralized reference instead of a federation: every client's
    /// shard pooled into one, trained with the same optimiser, schedule and
    /// sample budget (the upper bound a federation tries to reach).
    #[arg(long, conflicts_with = "local_only")]
    pub centralized: bool,
    /// The local-only reference: each client trains alone on its shard (its
    /// own schedule over its own samples); reports every client's projector
    /// on the held-out splits and their mean (the lower bound).
    #[arg(long)]
    pub local_only: bool,
    /// Cap every source of the scenario at this many records (a quick run
    /// of the same scenario on less data).
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub backbones: BackboneArgs,
}

/// `params` loaded into `work`.
pub fn load<'a>(work: &'a Projector, params: &ParamSet) -> Result<&'a Projector> {
    load_projector(work, params)?;
    Ok(work)
}

fn parse_strategy(text: &str) -> Result<StrategyConfig> {
    let trimmed = text.trim();
    let toml_text = if trimmed.starts_with('{') {
        // An inline table: turn `{ a = 1, b = 2 }` into top-level keys.
        let inner = trimmed.trim_start_matches('{').trim_end_matches('}');
        format!("x = {{{inner}}}")
    } else {
        format!("x = {{ name = \"{trimmed}\" }}")
    };
    #[derive(serde::Deserialize)]
    struct Wrapper {
        x: StrategyConfig,
    }
    let wrapper: Wrapper = toml::from_str(&toml_text)
        .with_context(|| format!("--strategy {text:?} is not a known strategy configuration"))?;
    Ok(wrapper.x)
}

/// Appends one JSON line and flushes, so a crash loses at most the line
/// being written.
fn append_jsonl(file: &mut std::fs::File, value: &impl serde::Serialize) -> Result<()> {
    serde_json::to_writer(&mut *file, value)?;
    file.write_all(b"\n")?;
    file.flush()?;
    Ok(())
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn save_projector(params: &ParamSet, path: &Path) -> Result<()> {
    save_params_file(params, path).with_context(|| format!("writing {}", path.display()))
}

/// Cap on each source's records (`--limit`), shared by `run` and `compare`.
pub fn parse_limit(limit: Option<usize>) -> Result<Option<NonZeroUsize>> {
    limit
        .map(|n| NonZeroUsize::new(n).context("--limit must be positive"))
        .transpose()
}

pub fn run(cache_dir: Option<PathBuf>, args: RunArgs) -> Result<()> {
    let strategy_config = parse_strategy(&args.strategy)?;
    if args.centralized && !matches!(strategy_config, StrategyConfig::FedAvg(_)) {
        bail!("--centralized trains one pooled model; leave --strategy at fedavg");
    }
    let recipe = args.training.recipe(args.seed, args.eval_every);
    recipe.validate()?;
    let root = cache_root(cache_dir)?;
    let env = Env::prepare(
        &root,
        &args.scenario,
        parse_limit(args.limit)?,
        &args.backbones,
        SuiteConfig::default(),
    )?;
    let scenario = &env.scenario;
    let validator = env.validator();
    let tester = env.tester();
    if args.local_only {
        let dir = args
            .out
            .join(format!("{}-local-only-s{}", scenario.name, args.seed));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let progress = bar(env.clients.len() as u64, "client");
        let trained = train_local_only(&env, &recipe, &mut |id| {
            progress.inc(1);
            progress.set_message(format!("client {} done", id.0));
        })?;
        progress.finish_and_clear();
        let work = env.projector(args.training.projector, args.seed)?;
        let mut rows = Vec::new();
        for (id, samples, params) in &trained {
            rows.push(serde_json::json!({
                "client": id.0, "samples": samples,
                "validation_nll": validator.nll_of(&work, params)?,
                "test_nll": tester.nll_of(&work, params)?,
            }));
        }
        let mean = |key: &str| {
            rows.iter().filter_map(|r| r[key].as_f64()).sum::<f64>() / rows.len().max(1) as f64
        };
        let (val_mean, test_mean) = (mean("validation_nll"), mean("test_nll"));
        println!(
            "{:>8} {:>8} {:>12} {:>10}",
            "client", "samples", "validation", "test"
        );
        for r in &rows {
            println!(
                "{:>8} {:>8} {:>12.4} {:>10.4}",
                r["client"].as_u64().unwrap_or(0),
                r["samples"].as_u64().unwrap_or(0),
                r["validation_nll"].as_f64().unwrap_or(f64::NAN),
                r["test_nll"].as_f64().unwrap_or(f64::NAN)
            );
        }
        println!("{:>8} {:>8} {val_mean:>12.4} {test_mean:>10.4}", "mean", "");
        let result = serde_json::json!({
            "clients": rows, "validation_nll_mean": val_mean, "test_nll_mean": test_mean,
        });
        write_atomic(
            &dir.join("summary.json"),
            serde_json::to_string_pretty(&result)?.as_bytes(),
        )?;
        println!("run folder: {}", dir.display());
        return Ok(());
    }
    let (clients, participation) = if args.centralized {
        let pooled = ClientData {
            id: ClientId(0),
            samples: env.clients.iter().flat_map(|c| c.samples.clone()).collect(),
        };
        (vec![pooled], Participation::default())
    } else {
        (env.clients.clone(), scenario.participation.clone())
    };
    let budget: u64 = clients.iter().map(|c| c.samples.len() as u64).sum();
    if budget == 0 {
        bail!("scenario {} leaves no training sample", scenario.name);
    }
    let num_clients = clients.len();
    let shard_sizes: Vec<usize> = clients.iter().map(|c| c.samples.len()).collect();
    let mut transport = env.transport(&recipe, clients)?;
    let mut strategy = strategy_config.build(num_clients)?;
    let per_round = participation.clients_per_round.map_or_else(
        || {
            participation
                .fraction
                .map_or(num_clients, |f| (f * num_clients as f64).ceil() as usize)
        },
        |k| k.get(),
    );
    let engine = recipe.engine(&participation, budget);

    let method = if args.centralized {
        "centralized"
    } else {
        strategy.name()
    };
    let run_name = format!("{}-{method}-s{}", scenario.name, args.seed);
    let dir = args.out.join(&run_name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let settings = serde_json::json!({
        "scenario": scenario,
        "strategy": strategy_config,
        "centralized": args.centralized,
        "local_steps": args.training.local_steps,
        "batch_size": args.training.batch_size,
        "lr": args.training.lr,
        "reset_optimizer": args.training.reset_optimizer,
        "eval_every": args.eval_every,
        "projector": args.training.projector.to_string(),
        "backbones": args.backbones,
        "limit": args.limit,
        "seed": args.seed,
        "vision": env.encoder_identity,
        "clients": num_clients,
        "shard_sizes": shard_sizes,
        "budget_samples": budget,
        "validation_samples": env.validation.len(),
        "test_samples": env.test.len(),
    });
    let settings_text = serde_json::to_string_pretty(&settings)?;
    let checkpoints = dir.join("checkpoints");
    let saved = if args.fresh {
        None
    } else {
        checkpoint::load_latest(&checkpoints)?
    };
    if let Some(saved) = &saved {
        let previous = std::fs::read_to_string(dir.join("config.json")).unwrap_or_default();
        if previous != settings_text {
            bail!(
                "{} holds a checkpoint of a run with other settings; rerun with the same \
                 settings to resume it, pass --fresh to start over, or choose another --out",
                dir.display()
            );
        }
        println!("resuming {run_name} after round {}", saved.engine.round);
    } else {
        write_atomic(&dir.join("config.json"), settings_text.as_bytes())?;
    }
    let metrics_path = dir.join("metrics.jsonl");
    if let Some(saved) = &saved {
        // Rounds after the checkpoint will be run again: drop their lines.
        let text = std::fs::read_to_string(&metrics_path).unwrap_or_default();
        let kept: String = text
            .lines()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("round").and_then(serde_json::Value::as_u64))
                    .is_some_and(|r| r <= saved.engine.round)
            })
            .map(|line| format!("{line}\n"))
            .collect();
        write_atomic(&metrics_path, kept.as_bytes())?;
    }
    let mut metrics_file = if saved.is_some() {
        std::fs::OpenOptions::new()
            .append(true)
            .open(&metrics_path)?
    } else {
        std::fs::File::create(&metrics_path)?
    };

    let work = env.projector(args.training.projector, args.seed)?;
    let initial = projector_params(&work)?;
    let init_val = validator.nll_of(&work, &initial)?;
    println!(
        "run {run_name}: {num_clients} clients ({per_round} per round), {budget} training samples, \
         {} validation, {} test; initial validation NLL {init_val:.4}",
        env.validation.len(),
        env.test.len()
    );
    // Rounds until the largest shard is consumed under full participation,
    // or until the budget is at partial participation: an estimate for the bar.
    let per_client_round = (args.training.local_steps * args.training.batch_size) as u64;
    let longest = shard_sizes.iter().max().copied().unwrap_or(0) as u64;
    let estimate = longest
        .div_ceil(per_client_round)
        .max(budget.div_ceil(per_client_round * per_round as u64))
        .min(args.training.rounds.unwrap_or(u64::MAX));
    let progress = bar(estimate, "round");
    let started = Instant::now();
    let mut last_val = init_val;
    let mut validate = |p: &ParamSet| validator.nll_of(&work, p);
    let mut write_error = None;
    let start = match saved {
        Some(saved) => {
            strategy.load_state(saved.strategy)?;
            transport.restore_client_states(saved.clients)?;
            progress.set_position(saved.engine.round);
            if let Some(v) = saved.engine.last_val {
                last_val = v;
            }
            Start::Resume(saved.engine)
        }
        None => Start::Fresh(initial.clone()),
    };
    let mut save = |engine: &EngineState,
                    strategy: &dyn fedcmp_strategy::Strategy,
                    transport: &dyn Transport| {
        checkpoint::save(
            &checkpoints,
            &Checkpoint {
                engine: engine.clone(),
                strategy: strategy.state(),
                clients: transport.client_states(),
            },
        )
        .map(|_| ())
    };
    let summary = run_engine(
        &engine,
        strategy.as_mut(),
        &mut transport,
        start,
        &mut validate,
        &mut |record| {
            if let Some(v) = record.val_loss {
                last_val = v;
            }
            if record.round > progress.length().unwrap_or(0) {
                progress.set_length(record.round);
            }
            progress.set_position(record.round);
            let rate = record.samples_total as f64 / started.elapsed().as_secs_f64().max(1e-9);
            progress.set_message(format!(
                "clients {}/{}  loss {:.3}  val {:.3}  {:.1} samples/s",
                record.answered.len(),
                record.sampled.len(),
                record.train_loss,
                last_val,
                rate
            ));
            if let Err(e) = append_jsonl(&mut metrics_file, record) {
                write_error.get_or_insert(e);
            }
        },
        Some(CheckpointHook {
            every: args.checkpoint_every.max(1),
            save: &mut save,
        }),
    )?;
    progress.finish_and_clear();
    if let Some(e) = write_error {
        return Err(e.context(format!("writing {}", dir.join("metrics.jsonl").display())));
    }
    let secs = started.elapsed().as_secs_f64();
    save_projector(&summary.final_params, &dir.join("projector.safetensors"))?;
    let init_test = tester.nll_of(&work, &initial)?;
    let final_test = tester.nll_of(&work, &summary.final_params)?;
    // The full held-out suite (per-domain NLL, zero-shot, retrieval,
    // captions) for the untrained and the final projector.
    let progress = bar(2 * env.suite.num_pairs() as u64, "evaluate");
    let mut tick = |n: usize| progress.inc(n as u64);
    let suite_init = evaluate_suite(&env.scorer(), load(&work, &initial)?, &env.suite, &mut tick)?;
    let suite_final = evaluate_suite(
        &env.scorer(),
        load(&work, &summary.final_params)?,
        &env.suite,
        &mut tick,
    )?;
    progress.finish_and_clear();
    let one_pass = summary
        .consumed
        .iter()
        .zip(&shard_sizes)
        .all(|((_, n), size)| *n as usize == *size);
    let result = serde_json::json!({
        "rounds": summary.rounds,
        "stop": summary.stop,
        "samples_total": summary.samples_total,
        "seconds": secs,
        "validation_nll": { "init": init_val, "final": summary.final_val_loss },
        "test_nll": { "init": init_test, "final": final_test },
        "suite": { "init": suite_init, "final": suite_final },
        "consumed_per_client": summary.consumed.iter().map(|(c, n)| (c.0, *n)).collect::<Vec<_>>(),
        "one_pass_complete": one_pass,
    });
    write_atomic(
        &dir.join("summary.json"),
        serde_json::to_string_pretty(&result)?.as_bytes(),
    )?;
    println!(
        "{} rounds ({:?}), {} samples in total; this session took {secs:.0} s",
        summary.rounds, summary.stop, summary.samples_total
    );
    println!("{:>14} {:>10} {:>10}", "caption NLL", "init", "final");
    println!(
        "{:>14} {:>10.4} {:>10.4}",
        "validation",
        init_val,
        summary.final_val_loss.unwrap_or(f64::NAN)
    );
    println!("{:>14} {:>10.4} {:>10.4}", "test", init_test, final_test);
    print_suite(&[("init", &suite_init), ("final", &suite_final)]);
    println!(
        "every client consumed its shard once: {}",
        if one_pass {
            "yes"
        } else {
            "no (stopped early)"
        }
    );
    println!("run folder: {}", dir.display());
    Ok(())
}
