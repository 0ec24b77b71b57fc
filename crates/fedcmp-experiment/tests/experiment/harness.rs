//! The counterfactual harness on the generated tiny world: recorded rounds
//! replay FedAvg exactly, every rule is scored on the same items, the
//! chosen lr is the tuning argmin, and a second invocation resumes without
//! scoring anything again.

use std::num::NonZeroU64;

use anyhow::Result;
use fedcmp_experiment::compare::TUNING_SEED;
use fedcmp_experiment::harness::{
    default_rules, read_round, run_scenario, with_server_lr, HarnessPlan, Rule, BASELINE,
};
use fedcmp_experiment::{RunOptions, Silent};
use fedcmp_runtime::convert::projector_params;
use fedcmp_strategy::config::StrategyConfig;

use crate::runs::world;

fn plan(out: std::path::PathBuf, rules: Vec<Rule>) -> HarnessPlan {
    HarnessPlan {
        scenarios: vec!["unused: run_scenario takes the experiment".into()],
        seeds: NonZeroU64::MIN.saturating_add(1),
        rounds: NonZeroU64::MIN.saturating_add(2),
        score_every: NonZeroU64::MIN.saturating_add(1),
        server_lrs: vec![1.0, 0.5],
        rules,
        replay: false,
        out,
    }
}

fn rules() -> Result<Vec<Rule>> {
    Ok(vec![
        Rule::parse(r#"fedavg={"name": "fedavg"}"#)?,
        Rule::parse(r#"fedavgm={"name": "fedavgm"}"#)?,
        Rule::parse(
            r#"v2={"name": "fed-cmp", "agreement": "leave-one-out", "gain": "shrinkage", "energy": 1.0, "residual-weight": 1.0, "basis-beta": 0.5}"#,
        )?,
    ])
}

/// A rule's chosen server lr is its tuning argmin.
fn assert_chose_the_tuning_argmin(rule: &fedcmp_experiment::harness::RuleResult) {
    let best = rule
        .tuning
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(lr, _)| *lr);
    assert_eq!(Some(rule.server_lr), best, "{}", rule.rule);
}

/// The harness of `rules()` run once on a fresh tiny world, into
/// `<world>/<name>`, with or without replay.
struct Ran {
    w: crate::runs::World,
    settings: fedcmp_experiment::RunSettings,
    experiment: fedcmp_experiment::Experiment,
    plan: HarnessPlan,
    first: fedcmp_experiment::harness::ScenarioResult,
    /// The scenario's folder.
    dir: std::path::PathBuf,
}

fn ran(name: &str, replay: bool) -> Result<Ran> {
    let w = world()?;
    let settings = w.settings(RunOptions::default())?;
    let experiment = w.experiment(&settings)?;
    let out = w.dir.path().join(name);
    let plan = HarnessPlan {
        replay,
        ..plan(out.clone(), rules()?)
    };
    let first = run_scenario(&experiment, &settings, &plan, &Silent)?;
    let dir = out.join(&experiment.scenario.name);
    Ok(Ran {
        w,
        settings,
        experiment,
        plan,
        first,
        dir,
    })
}

#[test]
fn rules_are_scored_paired_on_recorded_fedavg_rounds_and_resume() -> Result<()> {
    // `_world` keeps the world's folder until the test ends.
    let Ran {
        w: _world,
        settings,
        experiment,
        plan,
        first,
        dir,
    } = ran("harness", false)?;

    // FedAvg at server lr 1 on round t's updates is the recorded global of
    // round t + 1, bit for bit: the recording is the FedAvg trajectory.
    let like = projector_params(&experiment.projector(settings.recipe.projector, 0)?)?;
    for seed in [TUNING_SEED, 0, 1] {
        let seed_dir = dir.join(format!("seed-{seed}"));
        let r1 = read_round(&seed_dir, 1, &like)?;
        let r2 = read_round(&seed_dir, 2, &like)?;
        assert!(!r1.updates.is_empty());
        let fedavg = with_server_lr(&StrategyConfig::default(), 1.0)?;
        let next = fedavg
            .build(experiment.clients.len())?
            .aggregate(1, &r1.global, &r1.updates)?;
        assert_eq!(next.params, r2.global, "seed {seed}");
    }

    assert_eq!(first.scored_rounds, vec![2, 3]);
    assert_eq!(first.rules.len(), 3);
    assert_eq!(first.start_nll.len(), 2);
    for rule in &first.rules {
        assert_eq!(rule.per_round.len(), 2, "{}", rule.rule);
        assert!(rule.val_nll.is_finite());
        assert_eq!(rule.tuning.len(), 2);
        assert_chose_the_tuning_argmin(rule);
        match rule.rule.as_str() {
            BASELINE => assert!(rule.vs_baseline.is_none()),
            _ => {
                let d = rule
                    .vs_baseline
                    .as_ref()
                    .ok_or("no paired difference")
                    .map_err(anyhow::Error::msg)?;
                assert_eq!(d.seeds, 2);
                assert!(d.low <= d.mean && d.mean <= d.high);
            }
        }
    }

    // Resumed: nothing is scored again, the result is the same.
    let lines =
        |p: &std::path::Path| -> Result<usize> { Ok(std::fs::read_to_string(p)?.lines().count()) };
    let scores = dir.join("scores.jsonl");
    let before = lines(&scores)?;
    // 2 lrs x 3 rules x 2 rounds (tuning) + 3 rules x 2 seeds x 2 rounds
    // (reported) + 2 seeds x 2 rounds (starts).
    assert_eq!(before, 12 + 12 + 4);
    let second = run_scenario(&experiment, &settings, &plan, &Silent)?;
    assert_eq!(lines(&scores)?, before);
    assert_eq!(
        serde_json::to_value(&second.rules)?,
        serde_json::to_value(&first.rules)?
    );

    // Other rounds are refused, naming the folder.
    let mut other = plan.clone();
    other.rounds = NonZeroU64::MIN.saturating_add(3);
    let err = run_scenario(&experiment, &settings, &other, &Silent)
        .err()
        .ok_or(anyhow::anyhow!("a different recording was accepted"))?;
    assert!(format!("{err}").contains("settings.toml"), "{err}");
    Ok(())
}

/// (replay, seed, rule, lr bits, round) -> per-item NLL.
type Scores = std::collections::BTreeMap<(bool, u64, String, u64, u64), Vec<f64>>;

/// The validation scores of `scores.jsonl` in `dir`.
fn scores_of(dir: &std::path::Path) -> Result<Scores> {
    std::fs::read_to_string(dir.join("scores.jsonl"))?
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            let nll: Vec<f64> = serde_json::from_value(v["nll"].clone())?;
            Ok((
                (
                    v["replay"].as_bool().unwrap_or(false),
                    v["seed"].as_u64().unwrap_or(u64::MAX),
                    v["rule"].as_str().unwrap_or_default().to_string(),
                    v["server_lr"].as_f64().unwrap_or(f64::NAN).to_bits(),
                    v["round"].as_u64().unwrap_or(0),
                ),
                nll,
            ))
        })
        .collect()
}

/// Replay: every rule runs its own trajectory. FedAvg at server lr 1 is
/// the recording itself, so its replay scores equal its counterfactual
/// ones bit for bit; FedAvgM at lr 1 takes FedAvg's step in round 1, so
/// its round-2 proposal is the same either way, and its round-3 proposal
/// differs (its own round-2 model is not FedAvg's). A second invocation
/// scores nothing again.
#[test]
fn replay_runs_every_rule_on_its_own_trajectory() -> Result<()> {
    let ran = ran("harness-replay", true)?;
    let (settings, experiment, plan, first, dir) = (
        &ran.settings,
        &ran.experiment,
        &ran.plan,
        &ran.first,
        &ran.dir,
    );
    let scores = scores_of(dir)?;
    let at = |replay: bool, seed: u64, rule: &str, lr: f64, round: u64| {
        scores
            .get(&(replay, seed, rule.to_string(), lr.to_bits(), round))
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no score {replay} {seed} {rule} {lr} {round}"))
    };
    for round in [2, 3] {
        assert_eq!(
            at(true, TUNING_SEED, "fedavg", 1.0, round)?,
            at(false, TUNING_SEED, "fedavg", 1.0, round)?,
            "FedAvg's replay is the recording (round {round})"
        );
    }
    assert_eq!(
        at(true, TUNING_SEED, "fedavgm", 1.0, 2)?,
        at(false, TUNING_SEED, "fedavgm", 1.0, 2)?
    );
    assert_ne!(
        at(true, TUNING_SEED, "fedavgm", 1.0, 3)?,
        at(false, TUNING_SEED, "fedavgm", 1.0, 3)?
    );

    assert_eq!(first.replay.len(), 3);
    for rule in &first.replay {
        assert!(rule.val_nll.is_finite(), "{}", rule.rule);
        assert!(rule.failures.is_empty());
        assert_chose_the_tuning_argmin(rule);
    }
    // Every rule against each baseline but itself.
    let judged: Vec<(&str, &str)> = first
        .agreement
        .iter()
        .map(|a| (a.rule.as_str(), a.versus.as_str()))
        .collect();
    assert_eq!(
        judged,
        [
            ("fedavg", "fedavgm"),
            ("fedavgm", "fedavg"),
            ("v2", "fedavg"),
            ("v2", "fedavgm")
        ]
    );

    let lines = std::fs::read_to_string(dir.join("scores.jsonl"))?
        .lines()
        .count();
    // Per trajectory: 2 lrs x 3 rules x 2 rounds + 3 rules x 2 seeds x 2
    // rounds; and the starts, 2 seeds x 2 rounds.
    assert_eq!(lines, 2 * (12 + 12) + 4);
    let second = run_scenario(experiment, settings, plan, &Silent)?;
    assert_eq!(
        std::fs::read_to_string(dir.join("scores.jsonl"))?
            .lines()
            .count(),
        lines
    );
    assert_eq!(
        serde_json::to_value(&second.replay)?,
        serde_json::to_value(&first.replay)?
    );
    Ok(())
}

#[test]
fn rules_and_plans_are_checked() -> Result<()> {
    let defaults = default_rules()?;
    assert!(defaults.iter().any(|r| r.name == BASELINE));
    let mut names: Vec<&str> = defaults.iter().map(|r| r.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), defaults.len());
    for bad in [
        "fedavg",
        r#"fedavg={"name": "nope"}"#,
        r#"bad name={"name": "fedavg"}"#,
        r#"x={"name": "fedavg", "momentum": 0.9}"#,
    ] {
        assert!(Rule::parse(bad).is_err(), "{bad} was accepted");
    }
    let dir = tempfile::tempdir()?;
    let mut p = plan(dir.path().to_path_buf(), rules()?);
    p.rules.remove(0);
    assert!(p.validate().is_err(), "no baseline");
    let mut p = plan(dir.path().to_path_buf(), rules()?);
    p.rules.push(p.rules[1].clone());
    assert!(p.validate().is_err(), "a rule twice");
    let mut p = plan(dir.path().to_path_buf(), rules()?);
    p.server_lrs = vec![1.0, -1.0];
    assert!(p.validate().is_err(), "a negative lr");
    Ok(())
}

#[test]
fn every_registered_strategy_takes_a_server_lr() -> Result<()> {
    for name in fedcmp_strategy::config::NAMES {
        let config: StrategyConfig = serde_json::from_str(&format!(r#"{{"name": "{name}"}}"#))?;
        let set = with_server_lr(&config, 0.25)?;
        let json = serde_json::to_value(&set)?;
        assert_eq!(json["server-lr"], 0.25, "{name}");
        assert_eq!(set.name(), config.name());
    }
    Ok(())
}

/// Server lrs so large that the proposal's NLL overflows (1e38: the
/// parameters stay finite f32) or the step itself does (1e300: the
/// strategy refuses a non-finite result in round 1). Both failures are
/// kept as scores with their reason (not as NaN, which JSON cannot hold),
/// never chosen, and a resume scores nothing again.
#[test]
fn a_diverging_rule_is_recorded_as_failed_and_never_chosen() -> Result<()> {
    let w = world()?;
    let settings = w.settings(RunOptions::default())?;
    let experiment = w.experiment(&settings)?;
    let out = w.dir.path().join("harness-diverging");
    let plan = HarnessPlan {
        server_lrs: vec![1.0, 1e38, 1e300],
        ..plan(
            out.clone(),
            vec![
                Rule::parse(r#"fedavg={"name": "fedavg"}"#)?,
                Rule::parse(r#"fedavgm={"name": "fedavgm"}"#)?,
            ],
        )
    };
    let first = run_scenario(&experiment, &settings, &plan, &Silent)?;
    for rule in &first.rules {
        assert_eq!(rule.server_lr, 1.0, "{}", rule.rule);
        assert!(rule.val_nll.is_finite(), "{}", rule.rule);
        let failed = rule.tuning.iter().filter(|(_, v)| !v.is_finite()).count();
        assert_eq!(failed, 2, "{}: {:?}", rule.rule, rule.tuning);
    }
    let scores = out.join(&experiment.scenario.name).join("scores.jsonl");
    let text = std::fs::read_to_string(&scores)?;
    let values: Vec<serde_json::Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    for (lr, why) in [(1e38, "non-finite NLL"), (1e300, "round 1")] {
        let failed: Vec<&serde_json::Value> =
            values.iter().filter(|v| v["server_lr"] == lr).collect();
        // 2 rules x 2 scored rounds, each with its reason and no values.
        assert_eq!(failed.len(), 4, "lr {lr}");
        for v in failed {
            let reason = v["error"].as_str().unwrap_or_default();
            assert!(reason.contains(why), "lr {lr}: {v}");
            assert_eq!(v["nll"], serde_json::json!([]));
        }
    }
    let before = text.lines().count();
    run_scenario(&experiment, &settings, &plan, &Silent)?;
    assert_eq!(std::fs::read_to_string(&scores)?.lines().count(), before);
    Ok(())
}
