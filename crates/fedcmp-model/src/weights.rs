//! A named set of f32 tensors read from one checkpoint (safetensors, GGUF or a
//! torch pickle), with lookups that check shapes and name the file on error.
//!
//! Every loader in this crate produces a [`WeightMap`]; every model is built
//! from one by `take`-ing the tensors it needs, so missing or misshapen
//! tensors are reported the same way whatever the file format.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// Tensors by name, all f32 on one device, plus where they came from.
#[derive(Debug, Clone)]
pub struct WeightMap {
    origin: PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl WeightMap {
    /// Wraps tensors read from `origin` (a file or a folder).
    pub fn new(origin: impl Into<PathBuf>, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            origin: origin.into(),
            tensors,
        }
    }

    /// Reads one or more safetensors files (a sharded checkpoint lists its
    /// shards in `model.safetensors.index.json`), converting every tensor to
    /// f32 on `device`.
    pub fn from_safetensors(files: &[PathBuf], origin: &Path, device: &Device) -> Result<Self> {
        let mut tensors = HashMap::new();
        for file in files {
            let loaded = candle_core::safetensors::load(file, device)
                .map_err(|e| ModelError::format(file, "safetensors", e.to_string()))?;
            for (name, tensor) in loaded {
                tensors.insert(name, tensor.to_dtype(DType::F32)?);
            }
        }
        Ok(Self::new(origin, tensors))
    }

    /// The file or folder these tensors came from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Tensor names, sorted (for messages and tests).
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The tensor `name`, which must have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let tensor = self.get_any(name, &format!("shape {shape:?}"))?;
        if tensor.dims() != shape {
            return Err(ModelError::ShapeMismatch {
                path: self.origin.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got: tensor.dims().to_vec(),
            });
        }
        Ok(tensor)
    }

    /// The tensor `name`, whatever its shape; `what` says what was expected.
    pub fn get_any(&self, name: &str, what: &str) -> Result<Tensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.origin.clone(),
                name: name.to_string(),
                what: what.to_string(),
            })
    }

    /// Inserts or replaces a tensor (used by format adapters, e.g. to
    /// un-permute GGUF's rotary layout).
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.tensors.insert(name.into(), tensor);
    }

    /// Removes and returns a tensor.
    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }
}

/// The safetensors files of a Hugging Face folder: the shards named in
/// `model.safetensors.index.json` when it exists, else `model.safetensors`.
pub fn safetensors_files(folder: &Path) -> Result<Vec<PathBuf>> {
    let index = folder.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::format(&index, "safetensors index", e.to_string()))?;
        let map = json
            .get("weight_map")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| ModelError::config(&index, "weight_map", "missing or not an object"))?;
        let mut shards: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        shards.sort_unstable();
        shards.dedup();
        // Shards live in the folder: a name with a path in it (`../x`,
        // `/etc/x`) would make a downloaded index read files elsewhere.
        if let Some(bad) = shards.iter().find(|s| {
            let mut parts = Path::new(s.as_str()).components();
            !matches!(
                (parts.next(), parts.next()),
                (Some(std::path::Component::Normal(_)), None)
            )
        }) {
            return Err(ModelError::config(
                &index,
                "weight_map",
                format!("shard {bad:?} is not a file name in the model's folder"),
            ));
        }
        let files: Vec<PathBuf> = shards.iter().map(|s| folder.join(s)).collect();
        if let Some(missing) = files.iter().find(|f| !f.exists()) {
            return Err(ModelError::format(
                &index,
                "safetensors index",
                format!("shard {} is listed but does not exist", missing.display()),
            ));
        }
        return Ok(files);
    }
    let single = folder.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::io(
        folder,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no model.safetensors or model.safetensors.index.json in this folder",
        ),
    ))
}

/// Reads every tensor of a Hugging Face folder (single or sharded).
pub fn load_hf_folder_weights(folder: &Path, device: &Device) -> Result<WeightMap> {
    let files = safetensors_files(folder)?;
    WeightMap::from_safetensors(&files, folder, device)
}

/// 64-bit FNV-1a: small and dependency-free, enough to key a feature cache
/// (it tells checkpoints apart; it does not authenticate them).
#[derive(Debug, Clone)]
pub(crate) struct Fnv1a(u64);

impl Fnv1a {
    pub(crate) fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{safetensors_files, Fnv1a};

    /// An index may only name shards inside its folder.
    #[test]
    fn shards_outside_the_folder_are_refused() -> crate::Result<()> {
        let dir = tempfile::tempdir().map_err(|e| crate::ModelError::io(Path::new("tmp"), e))?;
        let index = dir.path().join("model.safetensors.index.json");
        let write = |shard: &str| {
            std::fs::write(
                &index,
                format!(r#"{{"weight_map": {{"a.weight": "{shard}"}}}}"#),
            )
        };
        let io = |e| crate::ModelError::io(&index, e);
        std::fs::write(dir.path().join("model-1.safetensors"), b"x").map_err(io)?;
        write("model-1.safetensors").map_err(io)?;
        assert_eq!(safetensors_files(dir.path())?.len(), 1);
        for bad in [
            "../model-1.safetensors",
            "/etc/passwd",
            "sub/model-1.safetensors",
            "..",
        ] {
            write(bad).map_err(io)?;
            let err = safetensors_files(dir.path()).err().map(|e| e.to_string());
            assert!(
                err.as_deref()
                    .is_some_and(|e| e.contains("not a file name")),
                "{bad}: {err:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn fnv1a_matches_published_vectors() {
        // From the FNV reference test suite (Fowler, Noll, Vo).
        for (input, expected) in [
            ("", 0xcbf2_9ce4_8422_2325u64),
            ("a", 0xaf63_dc4c_8601_ec8c),
            ("foobar", 0x8594_4171_f739_67e8),
        ] {
            let mut h = Fnv1a::new();
            h.update(input.as_bytes());
            assert_eq!(h.finish(), expected, "{input:?}");
        }
    }
}
