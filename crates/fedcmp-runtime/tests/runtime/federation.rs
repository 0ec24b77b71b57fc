//! 3 clients x 3 rounds of every strategy on a tiny generated model: it
//! runs, the same seed gives bit-identical results, every client consumes
//! its shard exactly once, and training lowers the validation loss.

use std::sync::Arc;

use crate::common::{grey_record, tiny_backbones};
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use fedcmp_core::{ClientId, ClientInstruction, LocalObjective, ParamSet};
use fedcmp_data::cache::FeatureCache;
use fedcmp_data::preprocess::Preprocess;
use fedcmp_data::record::Record;
use fedcmp_model::alignment::CaptionTemplate;
use fedcmp_model::llm::decoder::FrozenDecoder;
use fedcmp_model::optim::{AdamWConfig, WarmupCosine};
use fedcmp_model::projector::{Projector, ProjectorConfig, ProjectorKind};
use fedcmp_model::tokenizer::TextTokenizer;
use fedcmp_model::vision::patch_means::PatchMeans;
use fedcmp_runtime::checkpoint::{self, Checkpoint};
use fedcmp_runtime::client::{
    ClientData, ClientState, LocalConfig, LocalTrainer, RoundContext, Sample,
};
use fedcmp_runtime::convert::projector_params;
use fedcmp_runtime::engine::{run, CheckpointHook, EngineConfig, RunSummary, Start, StopReason};
use fedcmp_runtime::eval::Evaluator;
use fedcmp_runtime::transport::{InProcess, Transport};
use fedcmp_strategy::config::StrategyConfig;

struct Fixture {
    decoder: Arc<FrozenDecoder>,
    tokenizer: Arc<TextTokenizer>,
    cache: FeatureCache,
    clients: Vec<ClientData>,
    validation: Vec<Sample>,
    _dir: tempfile::TempDir,
}

/// Two visual "classes" (dark and bright images) with their own captions.
fn fixture() -> Result<Fixture> {
    let dir = tempfile::tempdir()?;
    let (decoder, tokenizer) = tiny_backbones()?;
    let records: Vec<Record> = (0..40u8)
        .map(|i| {
            let bright = i % 2 == 0;
            let base = if bright { 200u8 } else { 30 };
            let caption = if bright { "day" } else { "night" };
            grey_record(i, base, caption, Some(u32::from(bright)), "t")
        })
        .collect();
    let encoder = PatchMeans::new(8)?;
    let mut cache = FeatureCache::open(
        dir.path(),
        &encoder,
        Preprocess::square(8, [0.5; 3], [0.25; 3]),
    )?;
    let report = cache.ensure(&records, &encoder, 16, &mut |_| {})?;
    let samples: Vec<Sample> = report
        .keys
        .into_iter()
        .zip(&records)
        .filter_map(|(k, r)| {
            k.map(|key| Sample {
                key,
                caption: r.caption.clone(),
            })
        })
        .collect();
    // Unequal shards: 10, 8 and 14 samples; the last 8 are held out.
    let clients = [(0, 10), (10, 18), (18, 32)]
        .iter()
        .enumerate()
        .map(|(i, (a, b))| ClientData {
            id: ClientId(i as u32),
            samples: samples[*a..*b].to_vec(),
        })
        .collect();
    Ok(Fixture {
        decoder: Arc::new(decoder),
        tokenizer: Arc::new(tokenizer),
        cache,
        clients,
        validation: samples[32..].to_vec(),
        _dir: dir,
    })
}

fn projector(f: &Fixture) -> Result<Projector> {
    Ok(Projector::new(
        ProjectorConfig {
            kind: ProjectorKind::Mlp2xGelu,
            input_dim: 3,
            output_dim: f.decoder.config().hidden_size,
            pool: 1,
        },
        9,
        DType::F32,
        &Device::Cpu,
    )?)
}

/// Two local steps of two samples per round.
fn trainer(f: &Fixture) -> Result<LocalTrainer> {
    let local = LocalConfig {
        local_steps: 2,
        batch_size: 2,
        epochs: 1,
        reset_optimizer: false,
        adamw: AdamWConfig::default(),
        seed: 5,
    };
    Ok(LocalTrainer::new(
        f.decoder.clone(),
        f.tokenizer.clone(),
        CaptionTemplate::plain(),
        projector(f)?,
        local,
    )?)
}

/// Samples in all shards together: one pass.
fn budget(f: &Fixture) -> u64 {
    f.clients.iter().map(|c| c.samples.len() as u64).sum()
}

fn run_once(
    f: &Fixture,
    strategy: &str,
    max_rounds: u64,
) -> Result<(RunSummary, Vec<Option<f64>>)> {
    run_with(f, strategy, max_rounds, None, None, None)
}

/// Runs `strategy` for up to `max_rounds`; `partial` = (clients per round,
/// dropout); checkpoints every round into `save_to`; resumes from the
/// newest checkpoint in `resume_from`.
fn run_with(
    f: &Fixture,
    strategy: &str,
    max_rounds: u64,
    partial: Option<(usize, f64)>,
    save_to: Option<&std::path::Path>,
    resume_from: Option<&std::path::Path>,
) -> Result<(RunSummary, Vec<Option<f64>>)> {
    let config: StrategyConfig = serde_json::from_value(serde_json::json!({ "name": strategy }))?;
    let mut strategy = config.build(f.clients.len())?;
    let template = CaptionTemplate::plain();
    let mut transport = InProcess::new(trainer(f)?, &f.cache, f.clients.clone());
    let budget = budget(f);
    let engine = EngineConfig {
        max_rounds,
        clients_per_round: partial.map(|p| p.0),
        fraction: None,
        min_clients: 1,
        dropout: partial.map_or(0.0, |p| p.1),
        stragglers: partial.map_or(0.0, |p| p.1),
        straggler_steps: 1,
        seed: 5,
        eval_every: 1,
        schedule: WarmupCosine {
            peak_lr: 1e-2,
            total_samples: budget,
            warmup_ratio: 0.03,
        },
    };
    let work = projector(f)?;
    let initial = projector_params(&work)?;
    let evaluator = Evaluator {
        decoder: &f.decoder,
        tokenizer: &f.tokenizer,
        template: &template,
        cache: &f.cache,
        samples: &f.validation,
        batch_size: 4,
    };
    let start = match resume_from
        .map(checkpoint::load_latest)
        .transpose()?
        .flatten()
    {
        Some(saved) => {
            strategy.load_state(saved.strategy)?;
            transport.restore_client_states(saved.clients)?;
            Start::Resume(saved.engine)
        }
        None => Start::Fresh(initial),
    };
    let mut save = |engine: &fedcmp_runtime::engine::EngineState,
                    strategy: &dyn fedcmp_strategy::Strategy,
                    transport: &dyn fedcmp_runtime::transport::Transport| {
        match save_to {
            Some(dir) => checkpoint::save(
                dir,
                &Checkpoint {
                    engine: engine.clone(),
                    strategy: strategy.state(),
                    clients: transport.client_states(),
                },
            )
            .map(|_| ()),
            None => Ok(()),
        }
    };
    let mut records = Vec::new();
    let summary = run(
        &engine,
        strategy.as_mut(),
        &mut transport,
        start,
        &mut |p: &ParamSet| evaluator.nll_of(&work, p),
        &mut |r| records.push(r.clone()),
        Some(CheckpointHook {
            every: 1,
            save: &mut save,
        }),
    )?;
    let val = records.iter().map(|r| r.val_loss).collect();
    LAST_RECORDS.with(|cell| *cell.borrow_mut() = records);
    Ok((summary, val))
}

thread_local! {
    /// The round records of the thread's last `run_with` (for tests that
    /// look at sampling, dropouts and stragglers).
    static LAST_RECORDS: std::cell::RefCell<Vec<fedcmp_runtime::engine::RoundRecord>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

const STRATEGIES: [&str; 12] = [
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadagrad",
    "fedadam",
    "fedyogi",
    "scaffold",
    "fednova",
    "ties",
    "cra-only",
    "fed-cmp",
    "opm-only",
];

#[test]
fn every_strategy_runs_three_rounds_deterministically() -> Result<()> {
    let f = fixture()?;
    for name in STRATEGIES {
        let (a, val_a) = run_once(&f, name, 3)?;
        let (b, val_b) = run_once(&f, name, 3)?;
        assert_eq!(a.rounds, 3, "{name}");
        assert_eq!(a.stop, StopReason::MaxRounds, "{name}");
        assert_eq!(
            a.final_params, b.final_params,
            "{name}: same seed, different model"
        );
        assert_eq!(val_a, val_b, "{name}");
        assert!(
            val_a.iter().flatten().all(|v| v.is_finite()),
            "{name}: {val_a:?}"
        );
        // 3 rounds x 2 steps x 2 samples, capped by each shard.
        let consumed: Vec<u64> = a.consumed.iter().map(|(_, n)| *n).collect();
        assert_eq!(consumed, vec![10, 8, 12], "{name}");
    }
    Ok(())
}

/// Fed-CMP's interference diagnostics reach the metrics stream every round
/// (ALGORITHMS.md §6): rank and energy per matrix, rho, e_k per client,
/// momentum norm and dropped fraction, all within their ranges.
#[test]
fn fed_cmp_reports_its_diagnostics_every_round() -> Result<()> {
    let f = fixture()?;
    run_once(&f, "fed-cmp", 3)?;
    let records = LAST_RECORDS.with(|cell| cell.borrow().clone());
    assert_eq!(records.len(), 3);
    let matrices = projector_params(&projector(&f)?)?
        .entries()
        .iter()
        .filter(|(_, t)| t.shape.len() == 2)
        .count();
    for r in &records {
        let m = &r.metrics;
        let ranks = &m.series["cra_rank"];
        assert_eq!(ranks.len(), matrices, "round {}", r.round);
        assert!(ranks.iter().all(|&k| k >= 1.0), "{ranks:?}");
        assert!(m.series["cra_energy_kept"]
            .iter()
            .all(|e| (0.95 - 1e-9..=1.0 + 1e-9).contains(e)));
        let alignment = &m.series["cra_client_alignment"];
        assert_eq!(alignment.len(), r.answered.len());
        assert!(alignment.iter().all(|e| (0.0..=1.0).contains(e)));
        let (rho_min, rho_mean) = (m.scalars["cra_rho_min"], m.scalars["cra_rho_mean"]);
        assert!(0.0 <= rho_min && rho_min <= rho_mean && rho_mean <= 1.0);
        assert!(m.scalars["momentum_norm"] > 0.0);
        assert!((0.0..=1.0).contains(&m.scalars["opm_dropped_fraction"]));
    }
    Ok(())
}

#[test]
fn one_pass_consumes_every_shard_exactly_once_and_learns() -> Result<()> {
    let f = fixture()?;
    let (summary, val) = run_once(&f, "fedavg", 100)?;
    assert_eq!(summary.stop, StopReason::DataExhausted);
    let consumed: Vec<u64> = summary.consumed.iter().map(|(_, n)| *n).collect();
    assert_eq!(consumed, vec![10, 8, 14], "each shard once");
    assert_eq!(summary.samples_total, 32);
    // The largest shard needs ceil(14 / 4) = 4 rounds.
    assert_eq!(summary.rounds, 4);
    let first = val.first().copied().flatten().unwrap_or(f64::NAN);
    let last = summary.final_val_loss.unwrap_or(f64::NAN);
    assert!(
        last < first,
        "validation loss did not fall: {first} -> {last}"
    );
    Ok(())
}

/// A run killed after round 2 (and once more in the middle of writing the
/// round-3 checkpoint) and resumed ends bit-identical to an uninterrupted
/// run: global model, strategy state, client cursors and moments, control
/// variates and the sampling/dropout RNG all come back exactly.
#[test]
fn kill_and_resume_is_bit_identical() -> Result<()> {
    let f = fixture()?;
    for strategy in ["fedavg", "fedadam", "scaffold", "fedavgm", "fed-cmp"] {
        let partial = Some((2, 0.2));
        let (straight, straight_val) = run_with(&f, strategy, 5, partial, None, None)?;

        let dir = tempfile::tempdir()?;
        let ckpt = dir.path().join("checkpoints");
        run_with(&f, strategy, 2, partial, Some(&ckpt), None)?;
        // A kill while the round-3 checkpoint was being written.
        std::fs::create_dir_all(ckpt.join("round-000003.partial"))?;
        std::fs::write(
            ckpt.join("round-000003.partial/state.json"),
            b"{\"round\": 3",
        )?;
        std::fs::write(ckpt.join("LATEST.partial"), b"round-000003")?;
        let saved =
            checkpoint::load_latest(&ckpt)?.ok_or_else(|| anyhow::anyhow!("no checkpoint"))?;
        assert_eq!(saved.engine.round, 2, "{strategy}");

        let (resumed, resumed_val) = run_with(&f, strategy, 5, partial, Some(&ckpt), Some(&ckpt))?;
        assert_eq!(resumed.final_params, straight.final_params, "{strategy}");
        assert_eq!(resumed.rounds, straight.rounds, "{strategy}");
        assert_eq!(resumed.consumed, straight.consumed, "{strategy}");
        assert_eq!(resumed_val[..], straight_val[2..], "{strategy}");
        assert!(!ckpt.join("round-000003.partial").exists() || resumed.rounds < 3);
    }
    Ok(())
}

/// A checkpoint read back equals what was written (every f64 exact).
#[test]
fn checkpoint_round_trip_is_exact() -> Result<()> {
    let f = fixture()?;
    let dir = tempfile::tempdir()?;
    run_with(&f, "scaffold", 2, None, Some(dir.path()), None)?;
    let a = checkpoint::load_latest(dir.path())?.ok_or_else(|| anyhow::anyhow!("none"))?;
    let again = tempfile::tempdir()?;
    checkpoint::save(again.path(), &a)?;
    let b = checkpoint::load_latest(again.path())?.ok_or_else(|| anyhow::anyhow!("none"))?;
    assert_eq!(a, b);
    assert!(a
        .clients
        .iter()
        .all(|(_, c)| c.control.is_some() && c.optimizer.is_some()));
    Ok(())
}

/// Stragglers report after fewer local steps: with straggler steps = 1 a
/// straggling client consumes one batch instead of two in that round.
#[test]
fn stragglers_and_dropouts_follow_the_configured_rates() -> Result<()> {
    let f = fixture()?;
    let (summary, _) = run_with(&f, "fednova", 6, Some((3, 0.3)), None, None)?;
    let records = LAST_RECORDS.with(|cell| cell.borrow().clone());
    assert_eq!(records.len() as u64, summary.rounds);
    let dropped: usize = records.iter().map(|r| r.dropped.len()).sum();
    let straggled: usize = records.iter().map(|r| r.stragglers.len()).sum();
    assert!(
        dropped > 0 && straggled > 0,
        "dropped {dropped}, straggled {straggled}"
    );
    for r in &records {
        for s in &r.stragglers {
            assert!(!r.dropped.contains(s), "a dropped client cannot straggle");
            assert!(r.answered.contains(s) || r.samples == 0);
        }
        // Two full steps of 2 samples per normal client, one per straggler,
        // unless a shard ran out.
        let full =
            (r.answered.len() - r.stragglers.len()) as u64 * 4 + r.stragglers.len() as u64 * 2;
        assert!(
            r.samples <= full,
            "round {}: {} > {full}",
            r.round,
            r.samples
        );
    }
    Ok(())
}

/// A SCAFFOLD round at learning rate 0 (the federation past the end of its
/// schedule) moves nothing; the client must still report a control change,
/// a zero one, keeping its c_i (the cross-device matrix failed with "needs
/// `control_delta` in every update" before).
#[test]
fn scaffold_round_at_learning_rate_zero_reports_a_zero_control_change() -> Result<()> {
    let f = fixture()?;
    let mut trainer = trainer(&f)?;
    let data = &f.clients[0];
    let mut state = ClientState::new(data, 5);
    let global = projector_params(&projector(&f)?)?;
    let schedule = WarmupCosine {
        peak_lr: 1e-2,
        total_samples: budget(&f),
        warmup_ratio: 0.03,
    };
    let instruction = ClientInstruction {
        round: 1,
        client: data.id,
        objective: LocalObjective::Scaffold {
            server_control: ParamSet::default(),
        },
        max_local_steps: None,
    };
    let round = |start: u64| RoundContext {
        cache: &f.cache,
        global: &global,
        instruction: &instruction,
        schedule: &schedule,
        round_start_samples: start,
    };
    let norm = |p: &ParamSet| -> f64 {
        p.entries()
            .iter()
            .flat_map(|(_, t)| &t.data)
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            .sqrt()
    };

    // A first round inside the schedule trains and moves c_i.
    let trained = trainer
        .train(data, &mut state, &round(0))?
        .context("shard has samples")?;
    assert!(trained.lr_sum > 0.0);
    assert!(norm(trained.control_delta.as_ref().context("scaffold delta")?) > 0.0);
    let control_after_first = state.control.clone().context("c_i kept")?;

    // A round past the end of the schedule: lr 0 for every batch.
    let idle = trainer
        .train(data, &mut state, &round(budget(&f)))?
        .context("shard has samples left")?;
    assert_eq!(idle.lr_sum, 0.0);
    assert_eq!(
        idle.params, global,
        "a zero learning rate moved the projector"
    );
    let delta = idle
        .control_delta
        .context("scaffold delta in every update")?;
    global.check_same_layout(&delta)?;
    assert_eq!(norm(&delta), 0.0);
    assert_eq!(state.control.as_ref(), Some(&control_after_first));
    Ok(())
}

/// The final projector of a fixed small federation, pinned as a digest of
/// its exact f32 bytes: Fed-CMP and SCAFFOLD, each at full participation
/// (3 rounds) and at 2 clients per round with dropouts and stragglers (4
/// rounds). The digests in `tests/golden/pinned_runs.json` were computed at
/// commit 5613ad2, before the round protocol moved to self-contained tasks,
/// client-side state and a simulation wrapper around the transport; the
/// same bytes must come out after it. Regenerate (only for an intended
/// numerical change, saying why in the commit) with
/// `FEDCMP_WRITE_PINNED=1 cargo test -p fedcmp-runtime pinned`.
#[test]
fn pinned_runs_reproduce_their_bytes() -> Result<()> {
    let f = fixture()?;
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/pinned_runs.json");
    let mut measured = serde_json::Map::new();
    for strategy in ["fed-cmp", "scaffold"] {
        for (label, rounds, partial) in [("full", 3, None), ("partial", 4, Some((2, 0.25)))] {
            let (summary, _) = run_with(&f, strategy, rounds, partial, None, None)?;
            if partial.is_some() {
                let records = LAST_RECORDS.with(|cell| cell.borrow().clone());
                let dropped: usize = records.iter().map(|r| r.dropped.len()).sum();
                let straggled: usize = records.iter().map(|r| r.stragglers.len()).sum();
                assert!(
                    dropped > 0 && straggled > 0,
                    "{strategy}: {dropped} dropped, {straggled} straggled"
                );
            }
            measured.insert(
                format!("{strategy}/{label}"),
                crate::common::fingerprint(&summary.final_params),
            );
        }
    }
    let measured = serde_json::Value::Object(measured);
    if std::env::var_os("FEDCMP_WRITE_PINNED").is_some() {
        std::fs::create_dir_all(path.parent().context("golden folder")?)?;
        std::fs::write(&path, serde_json::to_string_pretty(&measured)? + "\n")?;
    }
    let pinned: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    for (case, want) in pinned.as_object().context("pinned runs: an object")? {
        let got = &measured[case.as_str()];
        assert_eq!(
            got["sha256"], want["sha256"],
            "{case}: the final projector's bytes changed (sum {} vs pinned {}, norm {} vs {})",
            got["sum"], want["sum"], got["norm"], want["norm"]
        );
    }
    assert_eq!(pinned.as_object().map(|o| o.len()), Some(4));
    Ok(())
}
