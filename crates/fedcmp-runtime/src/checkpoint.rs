//! The server's checkpoints: everything the server side of a run needs to
//! continue exactly where it was: the round loop's state (round, samples,
//! RNG position, global projector, clients' failure records) and the
//! strategy's state. Clients checkpoint their own state on their side
//! ([`crate::client_store`]) and restore it when a resumed server asks
//! for their status as of the checkpoint's round.
//!
//! On disk, under `<run>/checkpoints/`: one folder per saved round holding
//! `state.json` (small values; every f64 stored as its bit pattern, so the
//! round trip is exact) and `tensors.safetensors` (f32, exact). A folder is
//! written under a temporary name, synced, then renamed, and `LATEST` (also
//! replaced by rename) names the newest complete one: a kill at any moment
//! leaves the previous checkpoint intact and findable. The two newest are
//! kept.

use std::collections::{BTreeMap, HashMap};

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use fedcmp_core::{ClientId, ParamSet};
use fedcmp_strategy::{Strategy, StrategyState};
use serde::{Deserialize, Serialize};

use crate::convert::{param_to_tensor, tensor_to_param};
use crate::round_loop::{ClientRecord, RoundLoopState};
use crate::{io, Result, RuntimeError};

/// A snapshot of the server between two rounds.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub round_loop: RoundLoopState,
    pub strategy: StrategyState,
}

const FORMAT: u32 = 2;
const LATEST: &str = "LATEST";

#[derive(Debug, Serialize, Deserialize)]
struct StrategyManifest {
    algorithm: String,
    step: u64,
    scalars: BTreeMap<String, u64>,
    tensors: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ClientManifest {
    id: u32,
    failures_in_a_row: u32,
    retired: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    round: u64,
    samples_total: u64,
    /// u128 as a decimal string (JSON numbers stop at 64 bits).
    rng_word_pos: String,
    last_val_bits: Option<u64>,
    param_names: Vec<String>,
    strategy: StrategyManifest,
    clients: Vec<ClientManifest>,
}

fn corrupt(path: &Path, message: impl Into<String>) -> RuntimeError {
    RuntimeError::Config(format!("checkpoint {}: {}", path.display(), message.into()))
}

fn put_set(out: &mut HashMap<String, Tensor>, prefix: &str, set: &ParamSet) -> Result<()> {
    for (name, p) in set.entries() {
        out.insert(format!("{prefix}/{name}"), param_to_tensor(p, DType::F32)?);
    }
    Ok(())
}

fn take_set(
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    names: &[String],
    path: &Path,
) -> Result<ParamSet> {
    let entries = names
        .iter()
        .map(|name| {
            let key = format!("{prefix}/{name}");
            let t = tensors
                .get(&key)
                .ok_or_else(|| corrupt(path, format!("tensor `{key}` is missing")))?;
            Ok((name.clone(), tensor_to_param(name, t)?))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ParamSet::new(entries)?)
}

fn names(set: &ParamSet) -> Vec<String> {
    set.entries().iter().map(|(n, _)| n.clone()).collect()
}

fn sync_dir(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// Writes `checkpoint` under `dir` (the run's `checkpoints/` folder).
pub fn save(dir: &Path, checkpoint: &Checkpoint) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let e = &checkpoint.round_loop;
    let s = &checkpoint.strategy;
    let mut tensors = HashMap::new();
    put_set(&mut tensors, "global", &e.global)?;
    for (key, set) in &s.tensors {
        put_set(&mut tensors, &format!("strategy/{key}"), set)?;
    }
    let clients = e
        .clients
        .iter()
        .map(|(id, r)| ClientManifest {
            id: id.0,
            failures_in_a_row: r.failures_in_a_row,
            retired: r.retired,
        })
        .collect();
    let manifest = Manifest {
        format: FORMAT,
        round: e.round,
        samples_total: e.samples_total,
        rng_word_pos: e.rng_word_pos.to_string(),
        last_val_bits: e.last_val.map(f64::to_bits),
        param_names: names(&e.global),
        strategy: StrategyManifest {
            algorithm: s.algorithm.clone(),
            step: s.step,
            scalars: s
                .scalars
                .iter()
                .map(|(k, v)| (k.clone(), v.to_bits()))
                .collect(),
            tensors: s
                .tensors
                .iter()
                .map(|(k, v)| (k.clone(), names(v)))
                .collect(),
        },
        clients,
    };
    let name = format!("round-{:06}", e.round);
    let final_dir = dir.join(&name);
    let tmp_dir = dir.join(format!("{name}.partial"));
    if tmp_dir.exists() {
        fs::remove_dir_all(&tmp_dir).map_err(io(&tmp_dir))?;
    }
    fs::create_dir_all(&tmp_dir).map_err(io(&tmp_dir))?;
    let tensor_path = tmp_dir.join("tensors.safetensors");
    candle_core::safetensors::save(&tensors, &tensor_path)?;
    let json = serde_json::to_vec(&manifest)
        .map_err(|e| RuntimeError::Config(format!("cannot encode checkpoint: {e}")))?;
    let state_path = tmp_dir.join("state.json");
    let mut f = fs::File::create(&state_path).map_err(io(&state_path))?;
    f.write_all(&json).map_err(io(&state_path))?;
    f.sync_all().map_err(io(&state_path))?;
    fs::File::open(&tensor_path)
        .and_then(|f| f.sync_all())
        .map_err(io(&tensor_path))?;
    if final_dir.exists() {
        fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    fs::rename(&tmp_dir, &final_dir).map_err(io(&final_dir))?;
    let latest_tmp = dir.join(format!("{LATEST}.partial"));
    fs::write(&latest_tmp, name.as_bytes()).map_err(io(&latest_tmp))?;
    fs::File::open(&latest_tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(&latest_tmp))?;
    fs::rename(&latest_tmp, dir.join(LATEST)).map_err(io(dir))?;
    sync_dir(dir)?;
    prune(dir, &name)?;
    Ok(final_dir)
}

/// Saves the server's state between rounds under `dir` (the round loop's
/// checkpoint hook).
pub fn save_server(dir: &Path, round_loop: &RoundLoopState, strategy: &dyn Strategy) -> Result<()> {
    save(
        dir,
        &Checkpoint {
            round_loop: round_loop.clone(),
            strategy: strategy.state(),
        },
    )
    .map(|_| ())
}

/// Keeps the newest two complete checkpoints and removes leftovers of
/// interrupted writes.
fn prune(dir: &Path, newest: &str) -> Result<()> {
    let mut complete = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".partial") && path.is_dir() {
            let _ = fs::remove_dir_all(&path);
        } else if name.starts_with("round-") && path.is_dir() {
            complete.push(name);
        }
    }
    complete.sort();
    let keep_from = complete.len().saturating_sub(2);
    for old in &complete[..keep_from] {
        if old != newest {
            let _ = fs::remove_dir_all(dir.join(old));
        }
    }
    Ok(())
}

/// The newest complete checkpoint under `dir`, if any.
pub fn load_latest(dir: &Path) -> Result<Option<Checkpoint>> {
    let latest = dir.join(LATEST);
    let name = match fs::read_to_string(&latest) {
        Ok(name) => name,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&latest)(e)),
    };
    load(&dir.join(name.trim())).map(Some)
}

/// Reads one checkpoint folder.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let state_path = path.join("state.json");
    let text = fs::read(&state_path).map_err(io(&state_path))?;
    let m: Manifest = serde_json::from_slice(&text)
        .map_err(|e| corrupt(&state_path, format!("unreadable: {e}")))?;
    if m.format != FORMAT {
        return Err(corrupt(
            path,
            format!(
                "format {} (expected {FORMAT}): written by another version of fedcmp; \
                 start the run over (`--fresh`)",
                m.format
            ),
        ));
    }
    let tensor_path = path.join("tensors.safetensors");
    let tensors = candle_core::safetensors::load(&tensor_path, &candle_core::Device::Cpu)
        .map_err(|e| corrupt(&tensor_path, e.to_string()))?;
    let global = take_set(&tensors, "global", &m.param_names, path)?;
    let mut strategy = StrategyState::new(m.strategy.algorithm.clone(), m.strategy.step);
    strategy.scalars = m
        .strategy
        .scalars
        .iter()
        .map(|(k, v)| (k.clone(), f64::from_bits(*v)))
        .collect();
    for (key, set_names) in &m.strategy.tensors {
        let set = take_set(&tensors, &format!("strategy/{key}"), set_names, path)?;
        strategy.tensors.insert(key.clone(), set);
    }
    let clients = m
        .clients
        .iter()
        .map(|c| {
            (
                ClientId(c.id),
                ClientRecord {
                    failures_in_a_row: c.failures_in_a_row,
                    retired: c.retired,
                },
            )
        })
        .collect();
    let rng_word_pos = m
        .rng_word_pos
        .parse()
        .map_err(|e| corrupt(&state_path, format!("rng position: {e}")))?;
    Ok(Checkpoint {
        round_loop: RoundLoopState {
            round: m.round,
            samples_total: m.samples_total,
            rng_word_pos,
            global,
            last_val: m.last_val_bits.map(f64::from_bits),
            clients,
        },
        strategy,
    })
}
