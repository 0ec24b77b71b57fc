//! The trainable cross-modal projector (LLaVA's `mm_projector`): patch
//! features of the frozen vision encoder -> visual tokens in the LLM's
//! embedding space. It is the only trainable part of the whole model, and
//! the only thing a federated client ever sends.
//!
//! Kinds (LLaVA names): `linear` = one Linear(d_v -> d_llm); `mlp2x_gelu` =
//! Linear(d_v -> d_llm), GELU, Linear(d_llm -> d_llm). Fewer visual
//! tokens (average pooling of the patch grid, [`crate::vision::pool_grid`])
//! are the features' business, not the projector's: it has no parameters.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Projector architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProjectorKind {
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "mlp2x_gelu")]
    Mlp2xGelu,
}

impl FromStr for ProjectorKind {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(Self::Linear),
            "mlp2x_gelu" => Ok(Self::Mlp2xGelu),
            other => Err(ModelError::InvalidInput(format!(
                "unknown projector kind `{other}` (expected linear or mlp2x_gelu)"
            ))),
        }
    }
}

impl fmt::Display for ProjectorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Linear => "linear",
            Self::Mlp2xGelu => "mlp2x_gelu",
        })
    }
}

/// Everything that fixes a projector's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectorConfig {
    pub kind: ProjectorKind,
    /// Width of the vision features (d_v).
    pub input_dim: usize,
    /// Width of the LLM embeddings (d_llm).
    pub output_dim: usize,
}

/// A projector whose parameters are candle variables, in a fixed order with
/// stable names (`linear_1.weight`, `linear_1.bias`, `linear_2.*`).
#[derive(Debug, Clone)]
pub struct Projector {
    config: ProjectorConfig,
    params: Vec<(String, Var)>,
}

/// GELU from `erf`, whose backward is exact; candle's `gelu_erf` backward
/// rounds 1/sqrt(2 pi) to six digits (STACK.md, pitfall 3).
fn gelu(x: &Tensor) -> Result<Tensor> {
    let cdf = ((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5;
    Ok((x * cdf?)?)
}

impl Projector {
    /// A freshly initialised projector, deterministic in `seed`, using
    /// PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
    /// weights and biases.
    pub fn new(config: ProjectorConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        if config.input_dim == 0 || config.output_dim == 0 {
            return Err(ModelError::InvalidInput(format!(
                "projector dimensions must be positive, got {config:?}"
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = Vec::new();
        let mut layer = |name: &str, fan_in: usize, fan_out: usize| -> Result<()> {
            let bound = 1.0 / (fan_in as f64).sqrt();
            let w: Vec<f64> = (0..fan_in * fan_out)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            let b: Vec<f64> = (0..fan_out)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            let w = Tensor::from_vec(w, (fan_out, fan_in), device)?.to_dtype(dtype)?;
            let b = Tensor::from_vec(b, fan_out, device)?.to_dtype(dtype)?;
            params.push((format!("{name}.weight"), Var::from_tensor(&w)?));
            params.push((format!("{name}.bias"), Var::from_tensor(&b)?));
            Ok(())
        };
        layer("linear_1", config.input_dim, config.output_dim)?;
        if config.kind == ProjectorKind::Mlp2xGelu {
            layer("linear_2", config.output_dim, config.output_dim)?;
        }
        Ok(Self { config, params })
    }

    /// The projector's configuration.
    pub fn config(&self) -> &ProjectorConfig {
        &self.config
    }

    /// Trainable variables in their fixed order.
    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|(_, v)| v.clone()).collect()
    }

    /// Named parameters in their fixed order.
    pub fn named_params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Overwrites every parameter from `values` (same names and shapes).
    pub fn load(&self, values: &[(String, Tensor)]) -> Result<()> {
        if values.len() != self.params.len() {
            return Err(ModelError::InvalidInput(format!(
                "projector has {} parameters, got {}",
                self.params.len(),
                values.len()
            )));
        }
        for ((name, var), (other, value)) in self.params.iter().zip(values) {
            if name != other || var.dims() != value.dims() {
                return Err(ModelError::InvalidInput(format!(
                    "parameter `{other}` {:?} does not match `{name}` {:?}",
                    value.dims(),
                    var.dims()
                )));
            }
            var.set(&value.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Visual tokens: (batch, n, d_v) -> (batch, n, d_llm), tracked by
    /// candle's autograd with respect to the parameters.
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let (b, n, d) = features.dims3()?;
        if d != self.config.input_dim {
            return Err(ModelError::InvalidInput(format!(
                "features have width {d}, the projector expects {}",
                self.config.input_dim
            )));
        }
        let x = features.reshape((b * n, d))?;
        let linear = |x: &Tensor, i: usize| -> Result<Tensor> {
            let w = self.params[2 * i].1.as_tensor();
            let bias = self.params[2 * i + 1].1.as_tensor();
            Ok(x.matmul(&w.t()?)?.broadcast_add(bias)?)
        };
        let mut y = linear(&x, 0)?;
        if self.config.kind == ProjectorKind::Mlp2xGelu {
            y = linear(&gelu(&y)?, 1)?;
        }
        Ok(y.reshape((b, n, self.config.output_dim))?)
    }
}
