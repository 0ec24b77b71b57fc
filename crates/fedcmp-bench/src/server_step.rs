//! `server-step`: Fed-CMP's server aggregation at LLaVA-1.5-7B projector
//! size (mlp2x_gelu 1024 -> 4096 -> 4096, 10 clients), through the real
//! `Strategy::aggregate` path (f32 parameters in, f32 global out).
//!
//! Client deltas are synthetic with the structure of federated updates: a
//! shared low-rank part, a client-specific low-rank part and dense noise
//! (so the energy rule keeps a real fraction of the spectrum). With
//! `--dump DIR` the round-1 deltas, sample counts and fedcmp's round-1
//! update are written as raw little-endian f32 + JSON for
//! bench/numpy_server_step.py, which runs the same decomposition with
//! numpy/LAPACK and compares the results (bench/server_step.sh runs both).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use fedcmp_core::{ClientId, ClientUpdate, ParamSet, ParamTensor};
use fedcmp_strategy::StrategyConfig;
use rayon::prelude::*;

#[derive(Debug, clap::Args)]
pub struct ServerStepArgs {
    #[arg(long, default_value_t = 10)]
    clients: usize,
    /// Vision feature width (projector input).
    #[arg(long, default_value_t = 1024)]
    input: usize,
    /// Projector hidden width.
    #[arg(long, default_value_t = 4096)]
    hidden: usize,
    /// LLM width (projector output).
    #[arg(long, default_value_t = 4096)]
    output: usize,
    /// Rounds aggregated (from round 2 on, OPM transports its momentum).
    #[arg(long, default_value_t = 2)]
    rounds: u64,
    /// The strategy, as JSON.
    #[arg(long, default_value = r#"{"name": "fed-cmp"}"#)]
    strategy: String,
    /// Writes round 1's deltas and update here for the numpy reference.
    #[arg(long)]
    dump: Option<PathBuf>,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// A seeded Gaussian stream (xorshift64* + Box-Muller).
struct Gauss(u64);

impl Gauss {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn next(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| scale * self.next()).collect()
    }
}

/// `a b^T` for `a: rows x r`, `b: cols x r` (row-major), added into `out`.
fn add_low_rank(out: &mut [f32], a: &[f32], b: &[f32], cols: usize, r: usize) {
    out.par_chunks_mut(cols).enumerate().for_each(|(i, row)| {
        let ai = &a[i * r..(i + 1) * r];
        for (j, o) in row.iter_mut().enumerate() {
            let bj = &b[j * r..(j + 1) * r];
            *o += ai.iter().zip(bj).map(|(x, y)| x * y).sum::<f32>();
        }
    });
}

/// The projector's tensors: (name, shape).
fn layout(args: &ServerStepArgs) -> Vec<(String, Vec<usize>)> {
    vec![
        ("proj.0.weight".into(), vec![args.hidden, args.input]),
        ("proj.0.bias".into(), vec![args.hidden]),
        ("proj.2.weight".into(), vec![args.output, args.hidden]),
        ("proj.2.bias".into(), vec![args.output]),
    ]
}

/// One round's deltas per client, per tensor: shared rank-32 + own rank-8
/// structure + noise at 1/3 of the shared scale.
fn round_deltas(
    args: &ServerStepArgs,
    g: &mut Gauss,
    shapes: &[(String, Vec<usize>)],
) -> Vec<Vec<Vec<f32>>> {
    let (shared_rank, own_rank) = (32, 8);
    let shared: Vec<Option<(Vec<f32>, Vec<f32>)>> = shapes
        .iter()
        .map(|(_, s)| match s[..] {
            [rows, cols] => Some((
                g.vec(rows * shared_rank, 1e-2),
                g.vec(cols * shared_rank, 1e-2),
            )),
            _ => None,
        })
        .collect();
    (0..args.clients)
        .map(|_| {
            shapes
                .iter()
                .zip(&shared)
                .map(|((_, s), sh)| match (&s[..], sh) {
                    ([rows, cols], Some((a, b))) => {
                        let (rows, cols) = (*rows, *cols);
                        let mut d = g.vec(rows * cols, 1e-4 * (shared_rank as f32).sqrt() / 3.0);
                        add_low_rank(&mut d, a, b, cols, shared_rank);
                        let (oa, ob) = (g.vec(rows * own_rank, 1e-2), g.vec(cols * own_rank, 1e-2));
                        add_low_rank(&mut d, &oa, &ob, cols, own_rank);
                        d
                    }
                    _ => g.vec(s.iter().product(), 1e-4),
                })
                .collect()
        })
        .collect()
}

fn set_from(shapes: &[(String, Vec<usize>)], values: Vec<Vec<f32>>) -> Result<ParamSet> {
    let mut entries = Vec::new();
    for ((name, shape), data) in shapes.iter().zip(values) {
        entries.push((name.clone(), ParamTensor::new(name, shape.clone(), data)?));
    }
    Ok(ParamSet::new(entries)?)
}

fn write_f32(path: &Path, values: impl Iterator<Item = f32>) -> Result<()> {
    let bytes: Vec<u8> = values.flat_map(f32::to_le_bytes).collect();
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

pub fn run(args: &ServerStepArgs) -> Result<()> {
    let threads = rayon::current_num_threads();
    let config: StrategyConfig =
        serde_json::from_str(&args.strategy).context("--strategy is not a strategy config")?;
    let mut strategy = config.build(args.clients)?;
    let shapes = layout(args);
    let mut g = Gauss(args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut global = set_from(
        &shapes,
        shapes
            .iter()
            .map(|(_, s)| g.vec(s.iter().product(), 0.02))
            .collect(),
    )?;
    let counts: Vec<u64> = (0..args.clients as u64).map(|k| 200 + 37 * k).collect();
    let mut times = Vec::new();
    let mut last_metrics = None;
    let mut ranks_per_round = Vec::new();
    for round in 0..args.rounds {
        let t0 = Instant::now();
        let deltas = round_deltas(args, &mut g, &shapes);
        let updates: Vec<ClientUpdate> = deltas
            .iter()
            .enumerate()
            .map(|(k, per_tensor)| {
                let params = global
                    .entries()
                    .iter()
                    .zip(per_tensor)
                    .map(|((_, t), d)| t.data.iter().zip(d).map(|(x, y)| x + y).collect())
                    .collect();
                Ok(ClientUpdate {
                    client: ClientId(k as u32),
                    params: set_from(&shapes, params)?,
                    num_samples: counts[k],
                    num_steps: 4,
                    lr_sum: 4e-4,
                    mean_loss: 2.0,
                    control_delta: None,
                })
            })
            .collect::<Result<_>>()?;
        eprintln!(
            "round {}: generated {} client deltas in {:.1} s",
            round + 1,
            args.clients,
            t0.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let out = strategy.aggregate(round, &global, &updates)?;
        let secs = t.elapsed().as_secs_f64();
        times.push(secs);
        let ranks = out
            .metrics
            .series
            .get("cra_rank")
            .cloned()
            .unwrap_or_default();
        eprintln!(
            "round {}: aggregate {secs:.2} s, ranks {ranks:?}",
            round + 1
        );
        ranks_per_round.push(ranks);
        if round == 0 {
            if let Some(dir) = &args.dump {
                dump(
                    dir,
                    &shapes,
                    &deltas,
                    &counts,
                    &global,
                    &out.params,
                    &config,
                )?;
            }
        }
        last_metrics = Some(out.metrics.clone());
        global = out.params;
    }
    let metrics = last_metrics.unwrap_or_default();
    let json = serde_json::json!({
        "stack": "fedcmp (faer 0.24)",
        "strategy": config,
        "threads": threads,
        "clients": args.clients,
        "shape": [args.input, args.hidden, args.output],
        "round_s": times,
        "ranks": ranks_per_round,
        "energy_kept_last_round": metrics.series.get("cra_energy_kept"),
    });
    println!("{json}");
    Ok(())
}

fn dump(
    dir: &Path,
    shapes: &[(String, Vec<usize>)],
    deltas: &[Vec<Vec<f32>>],
    counts: &[u64],
    global: &ParamSet,
    next: &ParamSet,
    config: &StrategyConfig,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for (k, per_tensor) in deltas.iter().enumerate() {
        write_f32(
            &dir.join(format!("delta-{k}.f32")),
            per_tensor.iter().flatten().copied(),
        )?;
    }
    // The update as the server applied it (f32 global after minus before).
    write_f32(
        &dir.join("update.f32"),
        next.entries()
            .iter()
            .zip(global.entries())
            .flat_map(|((_, a), (_, b))| a.data.iter().zip(&b.data).map(|(x, y)| x - y)),
    )?;
    let meta = serde_json::json!({
        "layout": shapes,
        "counts": counts,
        "clients": deltas.len(),
        "strategy": config,
    });
    std::fs::write(dir.join("meta.json"), serde_json::to_vec_pretty(&meta)?)?;
    Ok(())
}
