//! Frozen vision encoders: image pixels in, a sequence of patch features out.
//!
//! Each backbone lives in its own file; they all implement [`VisionEncoder`],
//! which is what the feature cache and the alignment step see. Encoders are
//! inference-only (the projector is the only trainable part), so they may use
//! candle's fused ops freely.

pub mod legacy_pth;
pub mod mobilenet_v2;
pub mod patch_means;
pub mod vit;

use candle_core::Tensor;

use crate::error::{ModelError, Result};

/// Per-channel normalisation applied after scaling pixels to [0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalization {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalization {
    /// torchvision's ImageNet statistics.
    pub const IMAGENET: Self = Self {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };
    /// OpenAI CLIP's statistics.
    pub const CLIP: Self = Self {
        mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
        std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
    };
    /// SigLIP's statistics (maps [0, 1] to [-1, 1]).
    pub const SIGLIP: Self = Self {
        mean: [0.5, 0.5, 0.5],
        std: [0.5, 0.5, 0.5],
    };
}

/// What an encoder expects of its input images.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputSpec {
    /// Square side length in pixels after resize and center crop.
    pub image_size: usize,
    pub normalization: Normalization,
}

/// A frozen image encoder producing LLaVA-style patch features.
/// Average-pools a square patch grid down to `tokens` visual tokens:
/// `features` (batch, n_patch, d) with `n_patch = side^2` and
/// `tokens = (side / k)^2` for a whole factor `k`; each output token is
/// the mean of a `k x k` block of the row-major grid. `tokens = n_patch`
/// returns the features as they are.
pub fn pool_grid(features: &Tensor, tokens: usize) -> Result<Tensor> {
    let (b, n, d) = features.dims3()?;
    if tokens == n {
        return Ok(features.clone());
    }
    let side = (n as f64).sqrt().round() as usize;
    let out = (tokens as f64).sqrt().round() as usize;
    if side * side != n || out * out != tokens || out == 0 || !side.is_multiple_of(out) {
        return Err(ModelError::InvalidInput(format!(
            "{tokens} visual tokens cannot be pooled from a grid of {n} patches (a square grid \
             pools to a square number of tokens whose side divides the grid's)"
        )));
    }
    let k = side / out;
    let grid = features
        .reshape((b, side, side, d))?
        .permute((0, 3, 1, 2))?;
    let pooled = grid.contiguous()?.avg_pool2d(k)?;
    Ok(pooled.permute((0, 2, 3, 1))?.reshape((b, tokens, d))?)
}

pub trait VisionEncoder: Send + Sync + std::fmt::Debug {
    /// A stable string naming the architecture, the weights and the feature
    /// choice; the feature cache keys on it.
    fn identity(&self) -> String;
    /// Input size and normalisation.
    fn input_spec(&self) -> InputSpec;
    /// Width of one patch feature (d_v).
    fn feature_dim(&self) -> usize;
    /// Patch tokens per image (n_patch).
    fn num_patches(&self) -> usize;
    /// Side of the square patch grid, when the tokens form one (pooling needs it).
    fn grid_side(&self) -> Option<usize>;
    /// `pixels`: (batch, 3, size, size) f32, already normalised.
    /// Returns (batch, num_patches, feature_dim) f32.
    fn encode(&self, pixels: &Tensor) -> Result<Tensor>;
}
