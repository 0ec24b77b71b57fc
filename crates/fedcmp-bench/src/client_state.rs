//! `client-state`: what a client's own checkpoint costs per round. A
//! client with a store saves its state after every round it trains
//! (`fedcmp_runtime::client_store`): AdamW moments and SCAFFOLD's control
//! variate at the projector's size, its shuffle order, a JSON header, one
//! safetensors file written under a temporary name, synced and renamed.
//! The reference, in the same run: the same number of bytes written with
//! `std::fs` (create, write, sync, rename) and read back, i.e. what the
//! disk itself costs.
//!
//!     cargo run --release -p fedcmp-bench -- client-state
//!
//! Default size: `mlp2x_gelu` between MobileNetV2 (1280) and SmolLM2-135M
//! (576), the main job's projector, and a shard of 10,000 samples.

use std::io::Write;
use std::time::Instant;

use anyhow::Result;
use fedcmp_core::{ClientId, ParamSet, ParamTensor};
use fedcmp_runtime::client::{ClientState, OptimizerState};
use fedcmp_runtime::client_store::ClientStore;

#[derive(Debug, clap::Args)]
pub struct ClientStateArgs {
    #[arg(long, default_value_t = 1280)]
    input_dim: usize,
    #[arg(long, default_value_t = 576)]
    hidden: usize,
    #[arg(long, default_value_t = 10_000)]
    shard: usize,
    #[arg(long, default_value_t = 9)]
    repeats: usize,
}

fn params(input: usize, hidden: usize, offset: f32) -> Result<ParamSet> {
    let tensor = |name: &str, shape: Vec<usize>| -> Result<(String, ParamTensor)> {
        let n: usize = shape.iter().product();
        let data = (0..n).map(|i| (i as f32 * 1e-3 + offset).sin()).collect();
        Ok((name.to_string(), ParamTensor::new(name, shape, data)?))
    };
    Ok(ParamSet::new(vec![
        tensor("linear_1.weight", vec![hidden, input])?,
        tensor("linear_1.bias", vec![hidden])?,
        tensor("linear_2.weight", vec![hidden, hidden])?,
        tensor("linear_2.bias", vec![hidden])?,
    ])?)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

pub fn run(args: &ClientStateArgs) -> Result<()> {
    let dir =
        std::env::temp_dir().join(format!("fedcmp-bench-client-state-{}", std::process::id()));
    let store = ClientStore::open(dir.join("store"), ClientId(0))?;
    let state = ClientState {
        order: (0..args.shard as u32).rev().collect(),
        cursor: args.shard / 2,
        epoch: 0,
        consumed: args.shard as u64 / 2,
        optimizer: Some(OptimizerState {
            step: 40,
            first_moments: params(args.input_dim, args.hidden, 0.1)?,
            second_moments: params(args.input_dim, args.hidden, 0.2)?,
        }),
        control: Some(params(args.input_dim, args.hidden, 0.3)?),
        dp_releases: 0,
    };
    let (mut save, mut load, mut raw_write, mut raw_read) = (vec![], vec![], vec![], vec![]);
    let raw = dir.join("raw.bin");
    for round in 1..=args.repeats as u64 {
        let t = Instant::now();
        store.save(round, &state)?;
        save.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let back = store.load(round)?;
        load.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(back == state, "the state did not read back");
        store.prune(round)?;

        let bytes = std::fs::read(dir.join(format!("store/round-{round:06}.safetensors")))?;
        let t = Instant::now();
        let tmp = raw.with_extension("partial");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &raw)?;
        raw_write.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let again = std::fs::read(&raw)?;
        raw_read.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(again.len() == bytes.len());
    }
    let size = std::fs::metadata(&raw)?.len();
    std::fs::remove_dir_all(&dir)?;
    let (s, l, w, r) = (
        median(save),
        median(load),
        median(raw_write),
        median(raw_read),
    );
    println!(
        "client state of {:.1} MB, median of {} rounds:",
        size as f64 / 1e6,
        args.repeats
    );
    println!("{:<28} {:>10} {:>10}", "", "save (s)", "load (s)");
    println!("{:<28} {:>10.4} {:>10.4}", "ClientStore", s, l);
    println!("{:<28} {:>10.4} {:>10.4}", "std::fs, same bytes", w, r);
    println!("{:<28} {:>10.2} {:>10.2}", "ratio", s / w, l / r);
    println!(
        "{}",
        serde_json::json!({ "bytes": size, "save_s": s, "load_s": l, "raw_write_s": w, "raw_read_s": r })
    );
    Ok(())
}
