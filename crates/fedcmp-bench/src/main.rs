//! fedcmp-bench: benchmarks only (never run by the test suite).
//!
//! `align-step`: one alignment step at SmolLM2-135M size with random weights
//! (no download), shaped exactly like bench/pytorch_alignment_step.py so the
//! two can run side by side:
//!
//!     RAYON_NUM_THREADS=2 cargo run --release -p fedcmp-bench -- align-step
//!     bash bench/alignment_step.sh        # this and PyTorch in one run
//!
//! `server-step`: Fed-CMP's server aggregation at LLaVA-1.5-7B projector
//! size against numpy/LAPACK (bash bench/server_step.sh; see
//! server_step.rs).
//!
//! `client-state`: a client's own checkpoint (save and load) against raw
//! file I/O of the same bytes (see client_state.rs).
//!
//! The step = projector forward, frozen decoder forward + caption loss,
//! decoder input-gradient backward, projector backward, AdamW update. The
//! LAST line printed is one JSON object, like the PyTorch script's.

mod client_state;
mod server_step;

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};
use fedcmp_model::alignment::{caption_loss, train_step, AlignmentBatch, TokenizedCaptions};
use fedcmp_model::llm::config::DecoderConfig;
use fedcmp_model::llm::decoder::FrozenDecoder;
use fedcmp_model::llm::kernels::blas::{self, BlasSource, BlasStatus};
use fedcmp_model::llm::synthetic::random_decoder_weights;
use fedcmp_model::optim::{AdamW, AdamWConfig};
use fedcmp_model::projector::{Projector, ProjectorConfig, ProjectorKind};

#[derive(Debug, Parser)]
#[command(name = "fedcmp-bench", about = "fedcmp benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One alignment step at SmolLM2-135M size against PyTorch's shapes.
    AlignStep(AlignStepArgs),
    /// Fed-CMP's server step at LLaVA-1.5-7B projector size.
    ServerStep(server_step::ServerStepArgs),
    /// Saving and loading a client's own state, against raw file I/O.
    ClientState(client_state::ClientStateArgs),
}

#[derive(Debug, clap::Args)]
struct AlignStepArgs {
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 16)]
    visual_tokens: usize,
    #[arg(long, default_value_t = 1280)]
    visual_dim: usize,
    /// Longest caption; sample i has caption_tokens - i*caption_tokens/(2*batch).
    #[arg(long, default_value_t = 16)]
    caption_tokens: usize,
    #[arg(long, default_value_t = 30)]
    layers: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 9)]
    steps: usize,
}

/// The PyTorch script's caption lengths (16, 15, ..., 9 for the defaults).
fn caption_lengths(batch: usize, caption_tokens: usize) -> Vec<usize> {
    (0..batch)
        .map(|i| (caption_tokens - (i * caption_tokens) / (2 * batch)).max(1))
        .collect()
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        0.5 * (xs[n / 2 - 1] + xs[n / 2])
    }
}

fn align_step(args: &AlignStepArgs) -> Result<()> {
    // candle sizes its pools from RAYON_NUM_THREADS (default: physical cores).
    let threads = candle_core::utils::get_num_threads();
    let products = open_blas()?;
    let device = Device::Cpu;
    let mut config = DecoderConfig::smollm2_135m();
    config.num_layers = args.layers;
    let weights = random_decoder_weights(&config, 0, &device)?;
    let decoder = FrozenDecoder::from_weights(config.clone(), &weights)?;
    drop(weights);
    let projector = Projector::new(
        ProjectorConfig {
            kind: ProjectorKind::Mlp2xGelu,
            input_dim: args.visual_dim,
            output_dim: config.hidden_size,
        },
        0,
        DType::F32,
        &device,
    )?;
    let lengths = caption_lengths(args.batch, args.caption_tokens);
    // Ids above the 17 control tokens, deterministic.
    let captions: Vec<Vec<u32>> = lengths
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            (0..n)
                .map(|j| 17 + ((i * 7919 + j * 104_729) % 49_000) as u32)
                .collect()
        })
        .collect();
    let tokens = TokenizedCaptions {
        separator: Vec::new(),
        prefix: Vec::new(),
        captions,
        pad_id: 2,
    };
    let features = Tensor::randn(
        0f32,
        1.0,
        (args.batch, args.visual_tokens, args.visual_dim),
        &device,
    )?;
    let batch = AlignmentBatch::new(&decoder, features, &tokens)?;
    let mut optimizer = AdamW::new(projector.vars(), AdamWConfig::default())?;
    println!("{products}");
    println!(
        "candle 0.11.1: batch {}  visual {}x{}  caption lengths {:?} (padded to {})  seq {}  threads {}",
        args.batch,
        args.visual_tokens,
        args.visual_dim,
        lengths,
        args.caption_tokens,
        args.visual_tokens + args.caption_tokens,
        threads
    );
    for _ in 0..args.warmup {
        train_step(&decoder, &projector, &mut optimizer, &batch, 1e-3)?;
    }
    let mut steps = Vec::with_capacity(args.steps);
    let mut forwards = Vec::with_capacity(args.steps);
    for i in 0..args.steps {
        let t = Instant::now();
        let out = train_step(&decoder, &projector, &mut optimizer, &batch, 1e-3)?;
        steps.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        caption_loss(&decoder, &projector, &batch)?;
        forwards.push(t.elapsed().as_secs_f64());
        println!(
            "step {i}: {:.3} s (loss {:.4}), forward alone {:.3} s",
            steps[i], out.loss, forwards[i]
        );
    }
    let min = steps.iter().copied().fold(f64::INFINITY, f64::min);
    let step_median = median(&mut steps);
    let forward_median = median(&mut forwards);
    println!(
        "median {step_median:.3} s/step (min {min:.3}); forward {forward_median:.3} s, backward+update {:.3} s",
        step_median - forward_median
    );
    let json = serde_json::json!({
        "stack": "fedcmp (candle 0.11.1)",
        "threads": threads,
        "products": products.to_string(),
        "batch": args.batch,
        "visual_tokens": args.visual_tokens,
        "caption_tokens": args.caption_tokens,
        "layers": args.layers,
        "median_s": step_median,
        "min_s": min,
        "forward_median_s": forward_median,
        "backward_median_s": step_median - forward_median,
    });
    println!("{json}");
    Ok(())
}

/// The optimised BLAS as a run would open it: `FEDCMP_BLAS` (a path, or
/// `off`), else the fetched registry asset, else a system one.
fn open_blas() -> Result<BlasStatus> {
    let fetched = fedcmp_assets::cache_root(None)
        .ok()
        .map(|root| fedcmp_assets::openblas_library(&root));
    Ok(blas::load(&BlasSource::from_env(fetched))?)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::AlignStep(args) => align_step(&args),
        Command::ServerStep(args) => server_step::run(&args),
        Command::ClientState(args) => client_state::run(&args),
    }
}
