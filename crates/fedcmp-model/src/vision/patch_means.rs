//! A tiny, deterministic stand-in vision encoder for tests and examples:
//! square images cut into a 2x2 grid of patches, each patch's per-channel
//! mean as a 3-wide feature. It counts the images it encodes, so tests can
//! assert that a cache really avoided the encoder.

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::Tensor;

use crate::error::{ModelError, Result};
use crate::vision::{InputSpec, Normalization, VisionEncoder};

/// 2x2 patches of channel means; `image_size` must be even.
#[derive(Debug)]
pub struct PatchMeans {
    image_size: usize,
    encoded: AtomicUsize,
}

impl PatchMeans {
    /// An encoder for `image_size` x `image_size` inputs.
    pub fn new(image_size: usize) -> Result<Self> {
        if image_size == 0 || !image_size.is_multiple_of(2) {
            return Err(ModelError::InvalidInput(format!(
                "PatchMeans needs an even image size, got {image_size}"
            )));
        }
        Ok(Self {
            image_size,
            encoded: AtomicUsize::new(0),
        })
    }

    /// Images encoded so far.
    pub fn encoded(&self) -> usize {
        self.encoded.load(Ordering::SeqCst)
    }
}

impl VisionEncoder for PatchMeans {
    fn identity(&self) -> String {
        format!("patch-means/{}px", self.image_size)
    }
    fn input_spec(&self) -> InputSpec {
        InputSpec {
            image_size: self.image_size,
            normalization: Normalization::IMAGENET,
        }
    }
    fn feature_dim(&self) -> usize {
        3
    }
    fn num_patches(&self) -> usize {
        4
    }
    fn grid_side(&self) -> Option<usize> {
        Some(2)
    }
    fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.dims().first().copied().unwrap_or(0);
        self.encoded.fetch_add(b, Ordering::SeqCst);
        Ok(pixels
            .avg_pool2d(self.image_size / 2)?
            .reshape((b, 3, 4))?
            .transpose(1, 2)?
            .contiguous()?)
    }
}
