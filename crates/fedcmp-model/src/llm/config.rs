//! The shape of a LLaMA-family decoder (LLaMA, SmolLM, Qwen2, Mistral), read
//! from a Hugging Face `config.json` or from GGUF metadata, and validated once.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Which member of the family; they differ only in details handled here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecoderFamily {
    Llama,
    Mistral,
    /// Qwen2 adds biases to the q, k and v projections.
    Qwen2,
}

impl DecoderFamily {
    fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "llama" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }

    /// The model types this crate can load, for error messages.
    pub const SUPPORTED: &'static str = "llama (incl. SmolLM), mistral, qwen2";
}

/// A validated decoder configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecoderConfig {
    pub family: DecoderFamily,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// The output head shares the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2).
    pub attention_bias: bool,
}

/// The subset of a Hugging Face `config.json` we read.
#[derive(Debug, Deserialize)]
struct HfConfigFile {
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
}

impl DecoderConfig {
    /// Parses and validates a Hugging Face `config.json`.
    pub fn from_hf_config(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let raw: HfConfigFile = serde_json::from_str(&text)
            .map_err(|e| ModelError::format(path, "config.json", e.to_string()))?;
        let model_type = raw
            .model_type
            .ok_or_else(|| ModelError::config(path, "model_type", "missing"))?;
        let family = DecoderFamily::from_model_type(&model_type).ok_or_else(|| {
            ModelError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch: model_type.clone(),
                supported: DecoderFamily::SUPPORTED.to_string(),
            }
        })?;
        if let Some(scaling) = raw.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            return Err(ModelError::config(
                path,
                "rope_scaling",
                format!("rope scaling {scaling} is not supported (alignment uses short contexts)"),
            ));
        }
        let need = |v: Option<usize>, field: &str| {
            v.ok_or_else(|| ModelError::config(path, field, "missing"))
        };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let config = Self {
            family,
            hidden_size,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(num_heads),
            head_dim: raw
                .head_dim
                .unwrap_or(hidden_size.checked_div(num_heads).unwrap_or(0)),
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(family == DecoderFamily::Qwen2),
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Checks the invariants every other module relies on.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ModelError::config(path, field, "must be positive"));
            }
        }
        // Widths are multiplied together below and in every layer; metadata
        // that overflows them describes no model.
        let widths = [
            (
                "num_attention_heads",
                self.num_heads.checked_mul(self.head_dim),
            ),
            (
                "num_key_value_heads",
                self.num_kv_heads.checked_mul(self.head_dim),
            ),
            (
                "intermediate_size",
                self.intermediate_size.checked_mul(self.hidden_size),
            ),
            ("vocab_size", self.vocab_size.checked_mul(self.hidden_size)),
        ];
        for (field, product) in widths {
            if product.is_none_or(|n| n > 1 << 40) {
                return Err(ModelError::config(
                    path,
                    field,
                    "makes a weight matrix of more than 2^40 elements",
                ));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(ModelError::config(
                path,
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads = {}",
                    self.num_kv_heads, self.num_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ModelError::config(
                path,
                "head_dim",
                format!("{} must be even for rotary embeddings", self.head_dim),
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return Err(ModelError::config(path, "rms_norm_eps", "must be > 0"));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return Err(ModelError::config(path, "rope_theta", "must be > 0"));
        }
        Ok(())
    }

    /// Query heads that share one key/value head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// A tiny configuration for tests and examples (two layers, GQA, biases
    /// optional), shaped like SmolLM2 in miniature.
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            family: DecoderFamily::Llama,
            hidden_size: 32,
            intermediate_size: 48,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            vocab_size,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: true,
            attention_bias: false,
        }
    }

    /// SmolLM2-135M's shape (random-weight benchmarks use it).
    pub fn smollm2_135m() -> Self {
        Self {
            family: DecoderFamily::Llama,
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            vocab_size: 49_152,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            tie_word_embeddings: true,
            attention_bias: false,
        }
    }
}
