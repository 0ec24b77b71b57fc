//! A strategy's server state as plain, format-free data.
//!
//! Everything a strategy carries from one round to the next lives here:
//! the number of aggregations done, named scalars and named parameter-shaped
//! tensors (momenta, moments, control variates). The runtime decides the
//! on-disk format (safetensors for the tensors, JSON for the rest); loading
//! what [`crate::Strategy::state`] returned into a freshly built strategy of
//! the same configuration makes the next round bit-identical.
//!
//! In-memory state is kept in exactly this representation (f32 tensors), so
//! nothing is rounded on the way to disk and back.

use std::collections::BTreeMap;

use fedcmp_core::ParamSet;
use serde::{Deserialize, Serialize};

use crate::{Result, StrategyError};

/// A strategy's serialisable state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StrategyState {
    /// The strategy's config name (`fedavg`, `scaffold`, ...); loading
    /// checks it.
    pub algorithm: String,
    /// Aggregations performed so far.
    pub step: u64,
    pub scalars: BTreeMap<String, f64>,
    pub tensors: BTreeMap<String, ParamSet>,
}

impl StrategyState {
    /// An empty state for `algorithm` after `step` aggregations.
    pub fn new(algorithm: impl Into<String>, step: u64) -> Self {
        Self {
            algorithm: algorithm.into(),
            step,
            ..Self::default()
        }
    }

    /// Stores a tensor when present (absent = not initialised yet).
    pub fn put_tensor(&mut self, key: &str, value: Option<&ParamSet>) {
        if let Some(v) = value {
            self.tensors.insert(key.to_string(), v.clone());
        }
    }

    /// Removes and returns a tensor; components take their own keys so
    /// that leftovers can be reported.
    pub fn take_tensor(&mut self, key: &str) -> Option<ParamSet> {
        self.tensors.remove(key)
    }

    /// Removes and returns every tensor whose key starts with `prefix`
    /// (per-client entries), in key order.
    pub fn take_prefixed(&mut self, prefix: &str) -> Vec<(String, ParamSet)> {
        let keys: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        keys.into_iter()
            .filter_map(|k| self.tensors.remove(&k).map(|v| (k, v)))
            .collect()
    }

    /// Removes and returns a scalar.
    pub fn take_scalar(&mut self, key: &str) -> Option<f64> {
        self.scalars.remove(key)
    }

    /// Fails when keys remain that no component of the strategy knows.
    pub fn expect_consumed(&self) -> Result<()> {
        let unknown: Vec<&str> = self
            .tensors
            .keys()
            .chain(self.scalars.keys())
            .map(String::as_str)
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(StrategyError::State {
                reason: format!("`{}` has no entries called {unknown:?}", self.algorithm),
            })
        }
    }
}
