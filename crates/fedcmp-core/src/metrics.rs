//! Named numbers a round reports (losses, norms, diagnostics), kept in a
//! sorted map so the JSONL stream and tables are stable across runs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Scalars and per-client series from one round.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundMetrics {
    pub scalars: BTreeMap<String, f64>,
    pub series: BTreeMap<String, Vec<f64>>,
}

impl RoundMetrics {
    /// Records a scalar (replacing one of the same name).
    pub fn set(&mut self, name: impl Into<String>, value: f64) {
        self.scalars.insert(name.into(), value);
    }

    /// Records a series (e.g. one value per client or per direction).
    pub fn set_series(&mut self, name: impl Into<String>, values: Vec<f64>) {
        self.series.insert(name.into(), values);
    }

    /// Adds another set, prefixing its names (e.g. `server.`).
    pub fn merge_prefixed(&mut self, prefix: &str, other: RoundMetrics) {
        for (k, v) in other.scalars {
            self.scalars.insert(format!("{prefix}{k}"), v);
        }
        for (k, v) in other.series {
            self.series.insert(format!("{prefix}{k}"), v);
        }
    }
}
