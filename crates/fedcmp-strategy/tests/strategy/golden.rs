//! Golden values from the independent numpy reference
//! (`tests/golden/reference.py`, which writes `tests/golden/golden.json`):
//! every algorithm, 3 rounds of 3 clients out of 5, a 3x4 matrix and a
//! 3-vector bias, unequal sample and step counts, SCAFFOLD control deltas,
//! TIES with k = 50 %. Each round starts from the previous round's Rust
//! output, so optimiser state and the f32 global carry over as in a run.

use std::collections::BTreeMap;

use fedcmp_core::{ClientId, ClientUpdate, LocalObjective, ParamSet, ParamTensor};
use fedcmp_strategy::StrategyConfig;
use serde::Deserialize;

use crate::common::TestResult;

const GOLDEN: &str = include_str!("../golden/golden.json");
/// Absolute tolerance on every parameter, state value and metric.
const TOL: f64 = 1e-5;

#[derive(Deserialize)]
struct Golden {
    num_clients: usize,
    layout: Vec<(String, Vec<usize>)>,
    global0: Vec<Vec<f64>>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    id: String,
    config: StrategyConfig,
    rounds: Vec<Round>,
}

#[derive(Deserialize)]
struct Round {
    round: u64,
    updates: Vec<Update>,
    expected: Expected,
}

#[derive(Deserialize)]
struct Update {
    client: u32,
    num_samples: u64,
    num_steps: u64,
    lr_sum: f64,
    mean_loss: f64,
    params: Vec<Vec<f64>>,
    control_delta: Option<Vec<Vec<f64>>>,
}

#[derive(Deserialize)]
struct Expected {
    params: Vec<Vec<f64>>,
    scalars: BTreeMap<String, f64>,
    series: BTreeMap<String, Vec<f64>>,
    objective: Option<ProximalMu>,
    #[serde(default)]
    server_control_before: Option<Vec<Vec<f64>>>,
    #[serde(default)]
    server_control: Option<Vec<Vec<f64>>>,
}

#[derive(Deserialize)]
struct ProximalMu {
    proximal_mu: f64,
}

fn to_set(layout: &[(String, Vec<usize>)], values: &[Vec<f64>]) -> TestResult<ParamSet> {
    let mut entries = Vec::new();
    for ((name, shape), data) in layout.iter().zip(values) {
        let data = data.iter().map(|&v| v as f32).collect();
        entries.push((name.clone(), ParamTensor::new(name, shape.clone(), data)?));
    }
    Ok(ParamSet::new(entries)?)
}

/// Largest |got - want| over a set, failing on layout differences.
fn max_err(got: &ParamSet, want: &[Vec<f64>]) -> TestResult<f64> {
    if got.len() != want.len() {
        return Err(format!("{} tensors, expected {}", got.len(), want.len()).into());
    }
    let mut err: f64 = 0.0;
    for ((_, t), w) in got.entries().iter().zip(want) {
        if t.data.len() != w.len() {
            return Err("tensor length differs".into());
        }
        for (&g, &w) in t.data.iter().zip(w) {
            err = err.max((f64::from(g) - w).abs());
        }
    }
    Ok(err)
}

fn series_err(got: &[f64], want: &[f64]) -> TestResult<f64> {
    if got.len() != want.len() {
        return Err(format!("series of {} values, expected {}", got.len(), want.len()).into());
    }
    Ok(got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max))
}

#[test]
fn every_algorithm_matches_the_numpy_reference() -> TestResult {
    let golden: Golden = serde_json::from_str(GOLDEN)?;
    let mut seen = std::collections::BTreeSet::new();
    let mut report = Vec::new();
    // Every round's output, bit for bit, for the Python package's test
    // (python/tests/test_strategy.py: the same cases through
    // `fedcmp.Strategy` must give these exact bits).
    let mut outputs: BTreeMap<String, Vec<Vec<Vec<u32>>>> = BTreeMap::new();
    for case in &golden.cases {
        seen.insert(case.config.name());
        let mut strategy = case.config.build(golden.num_clients)?;
        let mut global = to_set(&golden.layout, &golden.global0)?;
        let mut worst: f64 = 0.0;
        for round in &case.rounds {
            let ctx = format!("{} round {}", case.id, round.round);
            let ids: Vec<ClientId> = round.updates.iter().map(|u| ClientId(u.client)).collect();

            // What the clients are told before training.
            for instr in strategy.configure_round(round.round, &ids) {
                match (&instr.objective, case.config.name()) {
                    (LocalObjective::Scaffold { server_control }, "scaffold") => {
                        match &round.expected.server_control_before {
                            None => assert!(server_control.is_empty(), "{ctx}: c_0 is sent empty"),
                            Some(c) => worst = worst.max(max_err(server_control, c)?),
                        }
                    }
                    (LocalObjective::Proximal { mu }, "fedprox") => {
                        let want = round.expected.objective.as_ref().map(|o| o.proximal_mu);
                        assert_eq!(Some(*mu), want, "{ctx}");
                    }
                    (LocalObjective::Plain, name) => {
                        assert!(
                            !matches!(name, "scaffold" | "fedprox"),
                            "{ctx}: plain objective"
                        )
                    }
                    (other, name) => panic!("{ctx}: {name} sent {other:?}"),
                }
            }

            let mut updates = Vec::new();
            for u in &round.updates {
                updates.push(ClientUpdate {
                    client: ClientId(u.client),
                    params: to_set(&golden.layout, &u.params)?,
                    num_samples: u.num_samples,
                    num_steps: u.num_steps,
                    lr_sum: u.lr_sum,
                    mean_loss: u.mean_loss,
                    control_delta: match &u.control_delta {
                        Some(c) => Some(to_set(&golden.layout, c)?),
                        None => None,
                    },
                });
            }
            let out = strategy.aggregate(round.round, &global, &updates)?;

            let e = max_err(&out.params, &round.expected.params)?;
            assert!(e <= TOL, "{ctx}: params differ by {e:e}");
            worst = worst.max(e);

            let got: Vec<&String> = out.metrics.scalars.keys().collect();
            let want: Vec<&String> = round.expected.scalars.keys().collect();
            assert_eq!(got, want, "{ctx}: scalar metric names");
            for (name, want) in &round.expected.scalars {
                let e = (out.metrics.scalars[name] - want).abs();
                assert!(e <= TOL, "{ctx}: metric {name} differs by {e:e}");
                worst = worst.max(e);
            }
            let got: Vec<&String> = out.metrics.series.keys().collect();
            let want: Vec<&String> = round.expected.series.keys().collect();
            assert_eq!(got, want, "{ctx}: series names");
            for (name, want) in &round.expected.series {
                let e = series_err(&out.metrics.series[name], want)?;
                assert!(e <= TOL, "{ctx}: series {name} differs by {e:e}");
                worst = worst.max(e);
            }

            if let Some(c) = &round.expected.server_control {
                let state = strategy.state();
                let stored = state
                    .tensors
                    .get("server_control")
                    .ok_or(format!("{ctx}: no server control in the state"))?;
                let e = max_err(stored, c)?;
                assert!(e <= TOL, "{ctx}: server control differs by {e:e}");
                worst = worst.max(e);
            }
            outputs.entry(case.id.clone()).or_default().push(
                out.params
                    .entries()
                    .iter()
                    .map(|(_, t)| t.data.iter().map(|v| v.to_bits()).collect())
                    .collect(),
            );
            global = out.params;
        }
        report.push(format!("{}: {worst:.1e}", case.id));
    }
    let all: std::collections::BTreeSet<&str> =
        fedcmp_strategy::config::NAMES.iter().copied().collect();
    assert_eq!(seen, all, "a golden case for every algorithm");
    eprintln!("golden max abs error per case: {}", report.join(", "));
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
        std::path::PathBuf::from,
    );
    let dir = target.join("golden");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("rust-outputs.json"),
        serde_json::to_string(&outputs)?,
    )?;
    Ok(())
}
