//! A client's own checkpoints, on the client's side: what it keeps between
//! rounds (shuffle order and cursor, AdamW moments, SCAFFOLD's control
//! variate, local DP's count of releases) saved after every round it trains, so that a site can stop and
//! resume on its own and a simulation can resume every client from its run
//! folder.
//!
//! One folder per client holds one file per saved round,
//! `round-000012.safetensors`: the tensors (moments `m/...`, `v/...`,
//! control `c/...`, the shuffle `order` as u32) and, in the safetensors
//! header, the small values. A file is written under a temporary name,
//! synced and renamed, so a kill leaves the previous files intact.
//!
//! Why several rounds: the server checkpoints every few rounds, the client
//! after each of its own. A server resumed at round R needs every client's
//! state as of R, which is the client's newest file at or before R. The
//! server's round tasks say which round is durably checkpointed; the client
//! then forgets every file older than its newest one at or before that
//! round, so a folder holds a few files at most.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fedcmp_core::{ClientId, ParamSet};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::client::{ClientState, OptimizerState};
use crate::convert::{param_to_tensor, tensor_to_param};
use crate::{io, Result, RuntimeError};

const FORMAT: u32 = 1;
const PREFIX: &str = "round-";
const SUFFIX: &str = ".safetensors";
const DP_SECRET: &str = "dp-secret";

/// The small values of a saved state (the safetensors header metadata).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    format: u32,
    client: u32,
    round: u64,
    cursor: usize,
    epoch: u32,
    consumed: u64,
    optimizer_step: Option<u64>,
    has_control: bool,
    /// Local DP's releases so far (absent without local DP).
    #[serde(default, skip_serializing_if = "is_zero")]
    dp_releases: u64,
    /// Parameter names in order (the file's tensors are sorted by name).
    param_names: Vec<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One client's folder of saved states.
#[derive(Debug, Clone)]
pub struct ClientStore {
    dir: PathBuf,
    client: ClientId,
}

fn corrupt(path: &Path, message: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Config(format!("client state {}: {message}", path.display()))
}

impl ClientStore {
    /// The store of `client` in `dir` (created when missing).
    pub fn open(dir: impl Into<PathBuf>, client: ClientId) -> Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(Self { dir, client })
    }

    /// Local DP's secret (see [`fedcmp_strategy::privacy::local`]): read
    /// from `dp-secret` in this folder, or drawn from the operating system
    /// and written there (atomically) at its first use, so every release of
    /// this client, retries and resumes included, uses the same one.
    pub fn dp_secret(&self) -> Result<u64> {
        let path = self.dir.join(DP_SECRET);
        match fs::read_to_string(&path) {
            Ok(text) => u64::from_str_radix(text.trim(), 16)
                .map_err(|e| corrupt(&path, format!("expected 16 hex digits: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret: u64 = rand::rng().random();
                let tmp = path.with_extension("partial");
                let mut file = fs::File::create(&tmp).map_err(io(&tmp))?;
                file.write_all(format!("{secret:016x}\n").as_bytes())
                    .map_err(io(&tmp))?;
                file.sync_all().map_err(io(&tmp))?;
                fs::rename(&tmp, &path).map_err(io(&path))?;
                Ok(secret)
            }
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// The folder of this store.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, round: u64) -> PathBuf {
        self.dir.join(format!("{PREFIX}{round:06}{SUFFIX}"))
    }

    /// Rounds with a saved state, ascending (leftovers of interrupted
    /// writes are ignored).
    pub fn rounds(&self) -> Result<Vec<u64>> {
        let mut rounds = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let name = entry.map_err(io(&self.dir))?.file_name();
            let name = name.to_string_lossy();
            if let Some(round) = name
                .strip_prefix(PREFIX)
                .and_then(|n| n.strip_suffix(SUFFIX))
                .and_then(|n| n.parse::<u64>().ok())
            {
                rounds.push(round);
            }
        }
        rounds.sort_unstable();
        Ok(rounds)
    }

    /// Saves the state the client holds after `round`.
    pub fn save(&self, round: u64, state: &ClientState) -> Result<()> {
        // Every parameter-shaped tensor shares one layout; its names, in
        // order, go into the header.
        let like = state
            .optimizer
            .as_ref()
            .map(|o| &o.first_moments)
            .or(state.control.as_ref());
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        let mut put = |prefix: &str, set: &ParamSet| -> Result<()> {
            if let Some(like) = like {
                like.check_same_layout(set)?;
            }
            for (name, p) in set.entries() {
                tensors.insert(format!("{prefix}/{name}"), param_to_tensor(p, DType::F32)?);
            }
            Ok(())
        };
        if let Some(opt) = &state.optimizer {
            put("m", &opt.first_moments)?;
            put("v", &opt.second_moments)?;
        }
        if let Some(control) = &state.control {
            put("c", control)?;
        }
        tensors.insert(
            "order".to_string(),
            Tensor::from_vec(state.order.clone(), state.order.len(), &Device::Cpu)?,
        );
        let header = Header {
            format: FORMAT,
            client: self.client.0,
            round,
            cursor: state.cursor,
            epoch: state.epoch,
            consumed: state.consumed,
            optimizer_step: state.optimizer.as_ref().map(|o| o.step),
            has_control: state.control.is_some(),
            dp_releases: state.dp_releases,
            param_names: like
                .map(|l| l.entries().iter().map(|(n, _)| n.clone()).collect())
                .unwrap_or_default(),
        };
        let header = serde_json::to_string(&header)
            .map_err(|e| RuntimeError::Config(format!("cannot encode a client state: {e}")))?;
        let mut sorted: Vec<(String, Tensor)> = tensors.into_iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let bytes = safetensors::serialize(
            sorted,
            Some(HashMap::from([("fedcmp".to_string(), header)])),
        )
        .map_err(|e| RuntimeError::Config(format!("cannot encode a client state: {e}")))?;
        let path = self.path(round);
        let tmp = path.with_extension("partial");
        let mut file = fs::File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(&bytes).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
    }

    /// The newest state saved at or before `round`, with its round.
    pub fn load_as_of(&self, round: u64) -> Result<Option<(u64, ClientState)>> {
        let Some(saved) = self.rounds()?.into_iter().rev().find(|r| *r <= round) else {
            return Ok(None);
        };
        self.load(saved).map(|s| Some((saved, s)))
    }

    /// Reads the state saved after `round`.
    pub fn load(&self, round: u64) -> Result<ClientState> {
        let path = self.path(round);
        let bytes = fs::read(&path).map_err(io(&path))?;
        let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| corrupt(&path, format!("unreadable: {e}")))?;
        let header_text = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get("fedcmp"))
            .ok_or_else(|| corrupt(&path, "no fedcmp header"))?;
        let header: Header = serde_json::from_str(header_text)
            .map_err(|e| corrupt(&path, format!("header: {e}")))?;
        if header.format != FORMAT {
            return Err(corrupt(
                &path,
                format!("format {} (expected {FORMAT})", header.format),
            ));
        }
        if header.client != self.client.0 || header.round != round {
            return Err(corrupt(
                &path,
                format!(
                    "holds client {} after round {}, expected client {} after round {round}",
                    header.client, header.round, self.client.0
                ),
            ));
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| corrupt(&path, e))?;
        let take = |prefix: &str| -> Result<ParamSet> {
            let entries = header
                .param_names
                .iter()
                .map(|name| {
                    let key = format!("{prefix}/{name}");
                    let t = tensors
                        .get(&key)
                        .ok_or_else(|| corrupt(&path, format!("tensor `{key}` is missing")))?;
                    Ok((name.clone(), tensor_to_param(name, t)?))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(ParamSet::new(entries)?)
        };
        let order: Vec<u32> = tensors
            .get("order")
            .ok_or_else(|| corrupt(&path, "tensor `order` is missing"))?
            .to_vec1()?;
        if header.cursor > order.len() {
            return Err(corrupt(
                &path,
                format!("cursor {} past {} samples", header.cursor, order.len()),
            ));
        }
        let optimizer = match header.optimizer_step {
            Some(step) => Some(OptimizerState {
                step,
                first_moments: take("m")?,
                second_moments: take("v")?,
            }),
            None => None,
        };
        let control = if header.has_control {
            Some(take("c")?)
        } else {
            None
        };
        Ok(ClientState {
            order,
            cursor: header.cursor,
            epoch: header.epoch,
            consumed: header.consumed,
            optimizer,
            control,
            dp_releases: header.dp_releases,
        })
    }

    /// Forgets every state older than the newest one at or before
    /// `checkpointed` (the server never resumes before that round).
    pub fn prune(&self, checkpointed: u64) -> Result<()> {
        let rounds = self.rounds()?;
        let Some(keep_from) = rounds.iter().rev().find(|r| **r <= checkpointed) else {
            return Ok(());
        };
        for old in rounds.iter().filter(|r| *r < keep_from) {
            let path = self.path(*old);
            fs::remove_file(&path).map_err(io(&path))?;
        }
        Ok(())
    }
}
