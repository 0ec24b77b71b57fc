//! Builders shared by the test modules.

use fedcmp_core::{ClientId, ClientUpdate, ParamSet, ParamTensor};
use fedcmp_strategy::{Aggregate, Strategy, StrategyConfig};

use crate::fedcmp::{round_updates, Gauss};

pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// A parameter set from `(name, shape, values)`.
pub fn params(entries: &[(&str, Vec<usize>, Vec<f32>)]) -> TestResult<ParamSet> {
    let mut out = Vec::new();
    for (name, shape, data) in entries {
        out.push((
            name.to_string(),
            ParamTensor::new(name, shape.clone(), data.clone())?,
        ));
    }
    Ok(ParamSet::new(out)?)
}

/// A `w` (rows x cols) and `b` (rows) set filled from `values`.
pub fn wb(rows: usize, cols: usize, values: &[f32]) -> TestResult<ParamSet> {
    let (w, b) = values.split_at(rows * cols);
    params(&[
        ("w", vec![rows, cols], w.to_vec()),
        ("b", vec![rows], b[..rows].to_vec()),
    ])
}

/// `global + delta`, in f32, in `global`'s layout.
pub fn shifted(global: &ParamSet, delta: &[f32]) -> TestResult<ParamSet> {
    let mut out = global.clone();
    let mut rest = delta;
    for t in out.tensors_mut() {
        let (head, tail) = rest.split_at(t.data.len());
        for (x, d) in t.data.iter_mut().zip(head) {
            *x += d;
        }
        rest = tail;
    }
    Ok(out)
}

/// An update with the given parameters and counts.
pub fn update(client: u32, params: ParamSet, num_samples: u64, num_steps: u64) -> ClientUpdate {
    ClientUpdate {
        client: ClientId(client),
        params,
        num_samples,
        num_steps,
        lr_sum: 0.01 * num_steps as f64,
        mean_loss: 1.5,
        control_delta: None,
    }
}

/// Parses a config from JSON text.
pub fn config(json: &str) -> TestResult<StrategyConfig> {
    Ok(serde_json::from_str(json)?)
}

/// One configuration of every algorithm (non-default values where that
/// exercises more).
pub fn all_configs() -> TestResult<Vec<StrategyConfig>> {
    [
        r#"{"name": "fedavg", "server-lr": 0.9}"#,
        r#"{"name": "fedprox", "mu": 0.1}"#,
        r#"{"name": "fedavgm", "momentum": 0.7}"#,
        r#"{"name": "fedavgm", "momentum": 0.5, "nesterov": true}"#,
        r#"{"name": "fedadagrad", "server-lr": 0.1}"#,
        r#"{"name": "fedadam", "server-lr": 0.1}"#,
        r#"{"name": "fedyogi", "server-lr": 0.1, "tau": 0.05}"#,
        r#"{"name": "scaffold"}"#,
        r#"{"name": "scaffold", "weighting": "samples", "server-lr": 0.5}"#,
        r#"{"name": "fednova"}"#,
        r#"{"name": "ties", "top-k-percent": 50}"#,
        r#"{"name": "cra-only"}"#,
        r#"{"name": "cra-only", "energy": 0.8, "tau": 0.5, "residual-weight": 0.5}"#,
        r#"{"name": "fed-cmp"}"#,
        r#"{"name": "fed-cmp", "nesterov": true, "confidence-power": 1.0}"#,
        r#"{"name": "opm-only", "beta": 0.5}"#,
        r#"{"name": "cra-only", "agreement": "leave-one-out", "gain": "shrinkage", "energy": 1.0, "residual-weight": 1.0}"#,
        r#"{"name": "fed-cmp", "agreement": "leave-one-out", "gain": "shrinkage", "energy": 1.0, "residual-weight": 1.0, "basis-beta": 0.5}"#,
        r#"{"name": "fed-cmp", "energy": 1.0, "tau": "inf", "gain": "temporal", "momentum-form": "ema"}"#,
        r#"{"name": "fedavgm", "momentum-form": "ema"}"#,
        r#"{"name": "median"}"#,
        r#"{"name": "trimmed-mean", "trim": 0.2, "server-momentum": 0.5}"#,
        r#"{"name": "krum", "byzantine": 0}"#,
        r#"{"name": "norm-bound"}"#,
        r#"{"name": "norm-bound", "max-norm": 0.05, "weighting": "uniform", "server-momentum": 0.9, "momentum-form": "ema"}"#,
    ]
    .iter()
    .map(|j| config(j))
    .collect()
}

/// Configurations that, with server lr 1 and fresh state, return the one
/// (or the common) client model unchanged.
pub fn identity_configs() -> TestResult<Vec<StrategyConfig>> {
    [
        r#"{"name": "fedavg"}"#,
        r#"{"name": "fedprox", "mu": 0.1}"#,
        r#"{"name": "fedavgm", "momentum": 0.9}"#,
        r#"{"name": "fedavgm", "momentum": 0.9, "nesterov": false}"#,
        r#"{"name": "scaffold"}"#,
        r#"{"name": "scaffold", "weighting": "samples"}"#,
        r#"{"name": "fednova"}"#,
        r#"{"name": "ties", "top-k-percent": 100}"#,
    ]
    .iter()
    .map(|j| config(j))
    .collect()
}

/// Federation size used with [`StrategyConfig::build`].
pub const NUM_CLIENTS: usize = 8;

/// Builds a strategy for [`NUM_CLIENTS`] clients.
pub fn build(config: &StrategyConfig) -> TestResult<Box<dyn Strategy>> {
    Ok(config.build(NUM_CLIENTS)?)
}

/// Named values as bits.
pub type Bits<T> = Vec<(String, Vec<T>)>;

/// Every f32 of a set, as bits (NaN-safe, sign-of-zero-sensitive).
pub fn bits(set: &ParamSet) -> Bits<u32> {
    set.entries()
        .iter()
        .map(|(n, t)| (n.clone(), t.data.iter().map(|v| v.to_bits()).collect()))
        .collect()
}

/// An aggregate as bits, metrics included.
pub fn aggregate_bits(a: &Aggregate) -> (Bits<u32>, Bits<u64>) {
    let metrics = a
        .metrics
        .scalars
        .iter()
        .map(|(k, v)| (k.clone(), vec![v.to_bits()]))
        .chain(
            a.metrics
                .series
                .iter()
                .map(|(k, v)| (k.clone(), v.iter().map(|x| x.to_bits()).collect())),
        )
        .collect();
    (bits(&a.params), metrics)
}

/// Runs two rounds, saves, restores into a fresh strategy, and checks the
/// third round is bit-identical; returns the saved state.
pub fn resumes_bit_for_bit(
    cfg: &StrategyConfig,
    ids: [&[u32]; 3],
) -> TestResult<fedcmp_strategy::StrategyState> {
    let mut a = cfg.build(8)?;
    let mut g = Gauss(77);
    let mut global = wb(5, 3, &[0.2f32; 20])?;
    for (t, round_ids) in ids[..2].iter().enumerate() {
        let updates = round_updates(&mut g, &global, round_ids)?;
        global = a.aggregate(t as u64, &global, &updates)?.params;
    }
    let state = a.state();
    let restored: fedcmp_strategy::StrategyState =
        serde_json::from_str(&serde_json::to_string(&state)?)?;
    assert_eq!(restored, state);
    let mut b = cfg.build(8)?;
    b.load_state(restored)?;
    assert_eq!(b.state(), state);
    let updates = round_updates(&mut g, &global, ids[2])?;
    let x = a.aggregate(2, &global, &updates)?;
    let y = b.aggregate(2, &global, &updates)?;
    assert_eq!(aggregate_bits(&x), aggregate_bits(&y));
    Ok(state)
}

/// `after - before`, flat, f64.
pub fn step(before: &ParamSet, after: &ParamSet) -> Vec<f64> {
    after
        .flat()
        .zip(before.flat())
        .map(|(a, b)| f64::from(a) - f64::from(b))
        .collect()
}
