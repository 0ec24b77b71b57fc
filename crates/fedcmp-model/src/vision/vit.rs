//! CLIP and SigLIP vision towers (Hugging Face layout), one pre-LayerNorm ViT
//! parameterised for both families, returning LLaVA's patch features.
//!
//! Forward, as in transformers' `modeling_clip.py` / `modeling_siglip.py`:
//!
//! ```text
//! x  = patches(pixels) @ W_patch^T (+ b_patch: SigLIP only)      (B, g*g, d)
//! x  = [cls; x] (CLIP only) + position_embedding
//! h0 = pre_layrnorm(x) (CLIP only; the field really is spelled so)
//! h_{k+1} = h_k + Attn(LN1(h_k));  h_{k+1} += MLP(LN2(h_{k+1}))
//! features = h_L'[feature_layer]  (no post_layernorm), CLIP's cls dropped
//! ```
//!
//! `hidden_states[0]` is the embedding output and `hidden_states[k]` the
//! output of encoder layer k, so LLaVA's default `feature_layer = -2` runs all
//! layers but the last. Layers after the chosen one are neither kept in
//! memory nor run, and SigLIP's attention-pooling head and both families'
//! `post_layernorm` are ignored: LLaVA consumes the patch tokens.
//!
//! Inference only (the projector is the trainable part), so the forward uses
//! fused candle ops and folds what it can at load time: Q, K and V are one
//! matmul with the 1/sqrt(head_dim) scale folded into Q, and the patch
//! convolution (kernel = stride, no padding) is an unfold plus one matmul.
//!
//! Folders: `config.json` of a full `CLIPModel` / `SiglipModel` (the tower's
//! settings nested under `vision_config`) or of a `CLIPVisionModel` /
//! `SiglipVisionModel`, with `model.safetensors` or a sharded checkpoint
//! listed in `model.safetensors.index.json`. Fields missing from the config
//! take transformers' defaults for that family, because Hugging Face saves
//! configs as a diff against those defaults (SigLIP's so400m config, for
//! one, has no `hidden_act` or `layer_norm_eps`).

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use serde_json::{Map, Value};

use crate::error::{ModelError, Result};
use crate::vision::{InputSpec, Normalization, VisionEncoder};
use crate::weights::Fnv1a;
use crate::weights::WeightMap;

/// Which family of pre-LayerNorm ViT a checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VitFamily {
    /// OpenAI-style CLIP: class token, bias-free patch conv, `pre_layrnorm`.
    Clip,
    /// SigLIP: no class token, patch conv with bias, no pre-LayerNorm.
    Siglip,
}

impl VitFamily {
    fn name(self) -> &'static str {
        match self {
            Self::Clip => "clip",
            Self::Siglip => "siglip",
        }
    }

    fn has_class_token(self) -> bool {
        matches!(self, Self::Clip)
    }
}

impl fmt::Display for VitFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The MLP activation named by `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VitActivation {
    /// `quick_gelu`: x * sigmoid(1.702 x), OpenAI CLIP.
    QuickGelu,
    /// `gelu`: the exact erf GELU.
    Gelu,
    /// `gelu_pytorch_tanh` (also `gelu_new`, `gelu_fast`): the tanh
    /// approximation, SigLIP.
    GeluTanh,
}

impl VitActivation {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            "gelu" => Some(Self::Gelu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Some(Self::GeluTanh),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::QuickGelu => "quick_gelu",
            Self::Gelu => "gelu",
            Self::GeluTanh => "gelu_pytorch_tanh",
        }
    }

    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            // candle_nn::Activation has no quick_gelu, so compose it.
            Self::QuickGelu => (xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?)?,
            Self::Gelu => xs.gelu_erf()?,
            // candle's `gelu` is the tanh approximation.
            Self::GeluTanh => xs.gelu()?,
        })
    }
}

/// Which tokens of the chosen hidden state become features (LLaVA's
/// `vision_feature_select_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FeatureSelect {
    /// Patch tokens only (LLaVA's "default"): CLIP's class token is dropped.
    #[default]
    Patch,
    /// Class token followed by the patch tokens (LLaVA's "full"); CLIP only.
    ClsPatch,
}

impl FeatureSelect {
    fn name(self) -> &'static str {
        match self {
            Self::Patch => "patch",
            Self::ClsPatch => "cls_patch",
        }
    }
}

/// How to read features out of the tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VitOptions {
    /// Index into `hidden_states` (0 = embeddings, k = output of layer k);
    /// negative counts from the end, so -1 is the last layer's output and
    /// -2 (LLaVA's default) the penultimate one.
    pub feature_layer: i32,
    pub select: FeatureSelect,
}

impl Default for VitOptions {
    fn default() -> Self {
        Self {
            feature_layer: -2,
            select: FeatureSelect::Patch,
        }
    }
}

/// The tower's settings, resolved from `config.json` (with transformers'
/// per-family defaults for absent fields).
#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    pub family: VitFamily,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: VitActivation,
    /// Where the tower's fields sit in config.json (`vision_config.` or
    /// empty), so later errors name the field as the user sees it.
    field_scope: &'static str,
}

const SUPPORTED_MODEL_TYPES: &str = "clip, clip_vision_model, siglip, siglip_vision_model";

impl VitConfig {
    /// Reads and validates `config.json` (either layout, see the module docs).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let root: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::format(path, "JSON", e.to_string()))?;
        Self::from_json(&root, path)
    }

    /// Resolves the settings from a parsed config; `path` is only used in
    /// error messages.
    pub fn from_json(root: &Value, path: &Path) -> Result<Self> {
        let root = root
            .as_object()
            .ok_or_else(|| ModelError::config(path, "(root)", "expected a JSON object"))?;
        let model_type = match root.get("model_type") {
            Some(Value::String(s)) => s.as_str(),
            Some(other) => {
                return Err(ModelError::config(
                    path,
                    "model_type",
                    format!("expected a string, found {other}"),
                ))
            }
            None => return Err(ModelError::config(path, "model_type", "missing")),
        };
        // A full CLIPModel / SiglipModel keeps the tower's settings under
        // `vision_config`; the *VisionModel classes keep them at the top.
        let (family, fields, scope) = match model_type {
            "clip" | "siglip" => {
                let family = if model_type == "clip" {
                    VitFamily::Clip
                } else {
                    VitFamily::Siglip
                };
                let nested = match root.get("vision_config") {
                    Some(Value::Object(map)) => map,
                    Some(_) => {
                        return Err(ModelError::config(
                            path,
                            "vision_config",
                            "expected a JSON object",
                        ))
                    }
                    None => {
                        return Err(ModelError::config(
                            path,
                            "vision_config",
                            format!("missing (a `{model_type}` config nests the vision tower's settings there)"),
                        ))
                    }
                };
                (family, nested, "vision_config.")
            }
            "clip_vision_model" => (VitFamily::Clip, root, ""),
            "siglip_vision_model" => (VitFamily::Siglip, root, ""),
            other => {
                return Err(ModelError::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    arch: other.to_string(),
                    supported: SUPPORTED_MODEL_TYPES.to_string(),
                })
            }
        };
        let fields = Fields {
            map: fields,
            path,
            scope,
        };
        // transformers' CLIPVisionConfig / SiglipVisionConfig defaults.
        let (default_patch, default_act, default_eps) = match family {
            VitFamily::Clip => (32, "quick_gelu", 1e-5),
            VitFamily::Siglip => (16, "gelu_pytorch_tanh", 1e-6),
        };
        let act_name = fields.string("hidden_act", default_act)?;
        let hidden_act = VitActivation::parse(&act_name).ok_or_else(|| {
            ModelError::config(
                path,
                format!("{scope}hidden_act"),
                format!(
                    "unsupported activation `{act_name}` (supported: quick_gelu, gelu, gelu_pytorch_tanh, gelu_new, gelu_fast)"
                ),
            )
        })?;
        let config = Self {
            family,
            hidden_size: fields.positive("hidden_size", 768)?,
            intermediate_size: fields.positive("intermediate_size", 3072)?,
            num_hidden_layers: fields.positive("num_hidden_layers", 12)?,
            num_attention_heads: fields.positive("num_attention_heads", 12)?,
            image_size: fields.positive("image_size", 224)?,
            patch_size: fields.positive("patch_size", default_patch)?,
            num_channels: fields.positive("num_channels", 3)?,
            layer_norm_eps: fields.positive_float("layer_norm_eps", default_eps)?,
            hidden_act,
            field_scope: scope,
        };
        if !config
            .hidden_size
            .is_multiple_of(config.num_attention_heads)
        {
            return Err(ModelError::config(
                path,
                format!("{scope}num_attention_heads"),
                format!(
                    "{} heads do not divide hidden_size {}",
                    config.num_attention_heads, config.hidden_size
                ),
            ));
        }
        if !config.image_size.is_multiple_of(config.patch_size) {
            return Err(ModelError::config(
                path,
                format!("{scope}patch_size"),
                format!(
                    "patch size {} does not divide image_size {}",
                    config.patch_size, config.image_size
                ),
            ));
        }
        Ok(config)
    }

    /// Patches per side.
    pub fn grid_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens the encoder runs on (patches, plus CLIP's class token).
    pub fn num_positions(&self) -> usize {
        let patches = self.grid_side() * self.grid_side();
        patches + usize::from(self.family.has_class_token())
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// Typed lookups in one JSON object, with errors naming the dotted field.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    path: &'a Path,
    scope: &'static str,
}

impl Fields<'_> {
    fn error(&self, field: &str, message: String) -> ModelError {
        ModelError::config(self.path, format!("{}{field}", self.scope), message)
    }

    fn positive(&self, field: &str, default: usize) -> Result<usize> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(value) => value
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .filter(|&v| v > 0)
                .ok_or_else(|| {
                    self.error(field, format!("expected a positive integer, found {value}"))
                }),
        }
    }

    fn positive_float(&self, field: &str, default: f64) -> Result<f64> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(value) => value
                .as_f64()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| {
                    self.error(field, format!("expected a positive number, found {value}"))
                }),
        }
    }

    fn string(&self, field: &str, default: &str) -> Result<String> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(value) => Err(self.error(field, format!("expected a string, found {value}"))),
        }
    }
}

// ------------------------------------------------------------------ layers

/// LayerNorm over the last dimension.
#[derive(Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(weights: &WeightMap, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: weights.get(&format!("{name}.weight"), &[dim])?,
            bias: weights.get(&format!("{name}.bias"), &[dim])?,
            // candle's fused kernel takes f32; configs hold 1e-5 / 1e-6.
            eps: eps as f32,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // candle's fused layer_norm computes the variance as E[x^2] - E[x]^2
        // in f32, which loses precision when |mean| is large next to the
        // spread (deep ViT residual streams carry large offsets). Centering
        // first keeps it accurate for the price of one reduction.
        let centered = xs.broadcast_sub(&xs.mean_keepdim(D::Minus1)?)?;
        Ok(candle_nn::ops::layer_norm(
            &centered,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

/// y = x W^T + b on 2-D input (tokens, in).
#[derive(Debug)]
struct Linear {
    /// (in, out): the checkpoint's (out, in) weight, transposed once at load.
    weight_t: Tensor,
    bias: Tensor,
}

impl Linear {
    fn new(weight: &Tensor, bias: Tensor) -> Result<Self> {
        Ok(Self {
            weight_t: weight.t()?.contiguous()?,
            bias,
        })
    }

    fn load(weights: &WeightMap, name: &str, out_dim: usize, in_dim: usize) -> Result<Self> {
        let weight = weights.get(&format!("{name}.weight"), &[out_dim, in_dim])?;
        let bias = weights.get(&format!("{name}.bias"), &[out_dim])?;
        Self::new(&weight, bias)
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(xs.matmul(&self.weight_t)?.broadcast_add(&self.bias)?)
    }
}

/// One encoder layer: x += Attn(LN1 x); x += MLP(LN2 x).
#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    /// Q, K and V stacked along the output dimension, Q pre-scaled.
    qkv: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn load(weights: &WeightMap, prefix: &str, config: &VitConfig) -> Result<Self> {
        let d = config.hidden_size;
        let attn = format!("{prefix}self_attn.");
        let get = |proj: &str| -> Result<(Tensor, Tensor)> {
            Ok((
                weights.get(&format!("{attn}{proj}.weight"), &[d, d])?,
                weights.get(&format!("{attn}{proj}.bias"), &[d])?,
            ))
        };
        let (q_w, q_b) = get("q_proj")?;
        let (k_w, k_b) = get("k_proj")?;
        let (v_w, v_b) = get("v_proj")?;
        // HF scales the queries after the projection; folding the scale into
        // W_q and b_q gives the same result without a per-token multiply.
        let scale = (config.head_dim() as f64).powf(-0.5);
        let q_w = (q_w * scale)?;
        let q_b = (q_b * scale)?;
        let qkv = Linear::new(
            &Tensor::cat(&[&q_w, &k_w, &v_w], 0)?,
            Tensor::cat(&[&q_b, &k_b, &v_b], 0)?,
        )?;
        let eps = config.layer_norm_eps;
        Ok(Self {
            layer_norm1: LayerNorm::load(weights, &format!("{prefix}layer_norm1"), d, eps)?,
            qkv,
            out_proj: Linear::load(weights, &format!("{attn}out_proj"), d, d)?,
            layer_norm2: LayerNorm::load(weights, &format!("{prefix}layer_norm2"), d, eps)?,
            fc1: Linear::load(
                weights,
                &format!("{prefix}mlp.fc1"),
                config.intermediate_size,
                d,
            )?,
            fc2: Linear::load(
                weights,
                &format!("{prefix}mlp.fc2"),
                d,
                config.intermediate_size,
            )?,
        })
    }

    /// `xs`: (batch * tokens, hidden).
    fn forward(
        &self,
        xs: &Tensor,
        batch: usize,
        tokens: usize,
        config: &VitConfig,
    ) -> Result<Tensor> {
        let heads = config.num_attention_heads;
        let head_dim = config.head_dim();
        let d = config.hidden_size;

        let qkv = self.qkv.forward(&self.layer_norm1.forward(xs)?)?;
        // (B*N, 3d) -> (3, B, H, N, hd)
        let qkv = qkv
            .reshape((batch, tokens, 3, heads, head_dim))?
            .permute((2, 0, 3, 1, 4))?;
        // candle's matmul wants plain row-major operands (a transposed view
        // of a contiguous tensor is fine, arbitrary permutations are not).
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let probs = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
        let attended = probs
            .matmul(&v)? // (B, H, N, hd)
            .transpose(1, 2)?
            .reshape((batch * tokens, d))?;
        let xs = (xs + self.out_proj.forward(&attended)?)?;

        let hidden = config
            .hidden_act
            .apply(&self.fc1.forward(&self.layer_norm2.forward(&xs)?)?)?;
        Ok((&xs + self.fc2.forward(&hidden)?)?)
    }
}

// ------------------------------------------------------------------ encoder

/// A loaded CLIP or SigLIP tower, truncated after the feature layer.
#[derive(Debug)]
pub struct VitEncoder {
    config: VitConfig,
    options: VitOptions,
    device: Device,
    /// (c * p * p, d): the patch conv kernel flattened in (c, ky, kx) order
    /// and transposed, so that embedding unfolded patches is one matmul.
    patch_weight_t: Tensor,
    patch_bias: Option<Tensor>,
    class_embedding: Option<Tensor>,
    /// (1, positions, d)
    position_embedding: Tensor,
    pre_layernorm: Option<LayerNorm>,
    /// Only the layers up to the feature layer.
    layers: Vec<EncoderLayer>,
    identity: String,
}

/// Loads a CLIP or SigLIP vision tower from a Hugging Face model folder,
/// keeping only what `options.feature_layer` needs.
pub fn load_vit(folder: &Path, options: VitOptions, device: &Device) -> Result<VitEncoder> {
    let config_path = folder.join("config.json");
    let config = VitConfig::from_file(&config_path)?;

    let layers_to_run = resolve_feature_layer(options.feature_layer, config.num_hidden_layers)
        .ok_or_else(|| {
            ModelError::InvalidInput(format!(
                "{}: feature_layer {} is out of range for a {}-layer encoder (valid: {}..={})",
                folder.display(),
                options.feature_layer,
                config.num_hidden_layers,
                -(config.num_hidden_layers as i64) - 1,
                config.num_hidden_layers
            ))
        })?;
    if options.select == FeatureSelect::ClsPatch && !config.family.has_class_token() {
        return Err(ModelError::InvalidInput(format!(
            "{}: feature select `cls_patch` needs a class token, and {} has none",
            folder.display(),
            config.family
        )));
    }

    let checkpoint = Checkpoint::locate(folder)?;
    let weights = checkpoint.load(device)?;
    let prefix = tower_prefix(&weights);

    // With config defaults in play, a checkpoint holding more layers than
    // the config declares means the config is wrong (e.g. a missing
    // num_hidden_layers falling back to 12): refuse rather than silently
    // reading features from the wrong depth.
    let extra_layer = format!(
        "{prefix}encoder.layers.{}.layer_norm1.weight",
        config.num_hidden_layers
    );
    if weights.contains(&extra_layer) {
        return Err(ModelError::config(
            &config_path,
            format!("{}num_hidden_layers", config.field_scope),
            format!(
                "the config says {} layers but {} has `{extra_layer}`",
                config.num_hidden_layers,
                weights.origin().display()
            ),
        ));
    }

    let d = config.hidden_size;
    let p = config.patch_size;
    let c = config.num_channels;
    let embeddings = format!("{prefix}embeddings.");
    let patch_weight = weights.get(
        &format!("{embeddings}patch_embedding.weight"),
        &[d, c, p, p],
    )?;
    let patch_weight_t = patch_weight.reshape((d, c * p * p))?.t()?.contiguous()?;
    let (patch_bias, class_embedding, pre_layernorm) = match config.family {
        VitFamily::Clip => (
            None,
            Some(
                weights
                    .get(&format!("{embeddings}class_embedding"), &[d])?
                    .reshape((1, 1, d))?,
            ),
            Some(LayerNorm::load(
                &weights,
                &format!("{prefix}pre_layrnorm"),
                d,
                config.layer_norm_eps,
            )?),
        ),
        VitFamily::Siglip => (
            Some(weights.get(&format!("{embeddings}patch_embedding.bias"), &[d])?),
            None,
            None,
        ),
    };
    let positions = config.num_positions();
    let position_embedding = weights
        .get(
            &format!("{embeddings}position_embedding.weight"),
            &[positions, d],
        )?
        .unsqueeze(0)?;
    let layers = (0..layers_to_run)
        .map(|i| EncoderLayer::load(&weights, &format!("{prefix}encoder.layers.{i}."), &config))
        .collect::<Result<Vec<_>>>()?;

    let identity = format!(
        "{family}-vit:d{d}:l{layers}:p{p}:s{size}:{act}:layer{layers_to_run}:{select}:w{hash:016x}",
        family = config.family,
        layers = config.num_hidden_layers,
        size = config.image_size,
        act = config.hidden_act.name(),
        select = options.select.name(),
        hash = fingerprint(&checkpoint.files, &config)?,
    );

    Ok(VitEncoder {
        config,
        options,
        device: device.clone(),
        patch_weight_t,
        patch_bias,
        class_embedding,
        position_embedding,
        pre_layernorm,
        layers,
        identity,
    })
}

/// `hidden_states` index -> number of encoder layers to run, or None when
/// out of range (there are `layers + 1` hidden states).
fn resolve_feature_layer(feature_layer: i32, layers: usize) -> Option<usize> {
    let states = i64::try_from(layers).ok()? + 1;
    let index = i64::from(feature_layer);
    let index = if index < 0 { states + index } else { index };
    if (0..states).contains(&index) {
        usize::try_from(index).ok()
    } else {
        None
    }
}

/// The key prefix of the vision tower: `vision_model.` in every HF layout,
/// but detected so that checkpoints saved without it (or under another
/// parent module) load too.
fn tower_prefix(weights: &WeightMap) -> String {
    const STANDARD: &str = "vision_model.";
    const ANCHOR: &str = "embeddings.patch_embedding.weight";
    if weights.contains(&format!("{STANDARD}{ANCHOR}")) {
        return STANDARD.to_string();
    }
    let mut candidates = weights
        .names()
        .into_iter()
        .filter_map(|name| name.strip_suffix(ANCHOR))
        .filter(|prefix| prefix.is_empty() || prefix.ends_with('.'));
    match (candidates.next(), candidates.next()) {
        (Some(prefix), None) => prefix.to_string(),
        // None or ambiguous: keep the standard prefix so that the error names
        // the tensor a HF checkpoint would have.
        _ => STANDARD.to_string(),
    }
}

impl VitEncoder {
    /// The resolved config.
    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    /// The options it was loaded with.
    pub fn options(&self) -> VitOptions {
        self.options
    }

    /// Encoder layers held and run per image (the feature layer's index).
    pub fn layers_run(&self) -> usize {
        self.layers.len()
    }

    /// Embeddings -> (batch * tokens, d), tokens = num_positions.
    fn embed(&self, pixels: &Tensor, batch: usize) -> Result<Tensor> {
        let c = self.config.num_channels;
        let p = self.config.patch_size;
        let g = self.config.grid_side();
        let d = self.config.hidden_size;
        // Unfold non-overlapping p x p patches in (row, column) order, each
        // flattened in (channel, ky, kx) order like the conv kernel: then the
        // stride-p convolution is a single matmul.
        let patches = pixels
            .reshape((batch, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((batch * g * g, c * p * p))?;
        let mut xs = patches.matmul(&self.patch_weight_t)?;
        if let Some(bias) = &self.patch_bias {
            xs = xs.broadcast_add(bias)?;
        }
        let mut xs = xs.reshape((batch, g * g, d))?;
        if let Some(cls) = &self.class_embedding {
            xs = Tensor::cat(&[&cls.broadcast_as((batch, 1, d))?, &xs], 1)?;
        }
        let xs = xs.broadcast_add(&self.position_embedding)?;
        let tokens = self.config.num_positions();
        let xs = xs.reshape((batch * tokens, d))?;
        match &self.pre_layernorm {
            Some(norm) => norm.forward(&xs),
            None => Ok(xs),
        }
    }
}

impl VisionEncoder for VitEncoder {
    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn input_spec(&self) -> InputSpec {
        InputSpec {
            image_size: self.config.image_size,
            normalization: match self.config.family {
                VitFamily::Clip => Normalization::CLIP,
                VitFamily::Siglip => Normalization::SIGLIP,
            },
        }
    }

    fn feature_dim(&self) -> usize {
        self.config.hidden_size
    }

    fn num_patches(&self) -> usize {
        let patches = self.config.grid_side() * self.config.grid_side();
        match self.options.select {
            FeatureSelect::Patch => patches,
            FeatureSelect::ClsPatch => patches + 1,
        }
    }

    fn grid_side(&self) -> Option<usize> {
        // With the class token in front the tokens no longer form a square.
        match self.options.select {
            FeatureSelect::Patch => Some(self.config.grid_side()),
            FeatureSelect::ClsPatch => None,
        }
    }

    fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = pixels.dims4().map_err(|_| {
            ModelError::InvalidInput(format!(
                "{} expects pixels of shape (batch, {}, {s}, {s}), got {:?}",
                self.config.family,
                self.config.num_channels,
                pixels.dims(),
                s = self.config.image_size,
            ))
        })?;
        let size = self.config.image_size;
        if channels != self.config.num_channels || height != size || width != size {
            return Err(ModelError::InvalidInput(format!(
                "{} expects pixels of shape (batch, {}, {size}, {size}), got {:?}",
                self.config.family,
                self.config.num_channels,
                pixels.dims()
            )));
        }
        if batch == 0 {
            return Err(ModelError::InvalidInput(
                "empty batch of pixels".to_string(),
            ));
        }
        let pixels = pixels.to_device(&self.device)?.to_dtype(DType::F32)?;

        let tokens = self.config.num_positions();
        let mut xs = self.embed(&pixels, batch)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, batch, tokens, &self.config)?;
        }
        let xs = xs.reshape((batch, tokens, self.config.hidden_size))?;
        let skip = match self.options.select {
            FeatureSelect::Patch => usize::from(self.config.family.has_class_token()),
            FeatureSelect::ClsPatch => 0,
        };
        if skip == 0 {
            Ok(xs)
        } else {
            Ok(xs.narrow(1, skip, tokens - skip)?.contiguous()?)
        }
    }
}

// ------------------------------------------------------------------ files

/// The safetensors files of a folder and the path errors should name.
#[derive(Debug)]
struct Checkpoint {
    files: Vec<PathBuf>,
    /// `model.safetensors`, or the index for a sharded checkpoint.
    origin: PathBuf,
}

impl Checkpoint {
    fn locate(folder: &Path) -> Result<Self> {
        let single = folder.join("model.safetensors");
        if single.is_file() {
            return Ok(Self {
                files: vec![single.clone()],
                origin: single,
            });
        }
        let index = folder.join("model.safetensors.index.json");
        if index.is_file() {
            return Ok(Self {
                files: shards(&index, folder)?,
                origin: index,
            });
        }
        Err(ModelError::io(
            single,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "neither model.safetensors nor model.safetensors.index.json is in the folder",
            ),
        ))
    }

    fn load(&self, device: &Device) -> Result<WeightMap> {
        WeightMap::from_safetensors(&self.files, &self.origin, device)
    }
}

/// The distinct shard files named by an index's `weight_map`, sorted.
fn shards(index: &Path, folder: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::io(index, e))?;
    let root: Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::format(index, "safetensors index", e.to_string()))?;
    let map = root
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| ModelError::format(index, "safetensors index", "no `weight_map` object"))?;
    let mut names = BTreeSet::new();
    for (tensor, shard) in map {
        let shard = shard.as_str().ok_or_else(|| {
            ModelError::format(
                index,
                "safetensors index",
                format!("`weight_map.{tensor}` is not a file name"),
            )
        })?;
        // Shards must sit next to the index: refuse paths that climb out.
        if Path::new(shard).file_name().and_then(|n| n.to_str()) != Some(shard) {
            return Err(ModelError::format(
                index,
                "safetensors index",
                format!("shard `{shard}` is not a plain file name"),
            ));
        }
        names.insert(shard);
    }
    if names.is_empty() {
        return Err(ModelError::format(
            index,
            "safetensors index",
            "`weight_map` is empty",
        ));
    }
    Ok(names.into_iter().map(|name| folder.join(name)).collect())
}

/// A fast content fingerprint for the feature cache's key: FNV-1a (64-bit)
/// over each file's name, size, first MiB and last MiB, plus the resolved
/// numeric settings that change features without changing weights. Not a
/// security hash: it tells checkpoints apart, it does not authenticate them.
fn fingerprint(files: &[PathBuf], config: &VitConfig) -> Result<u64> {
    const WINDOW: u64 = 1 << 20;
    let mut hash = Fnv1a::new();
    hash.update(
        format!(
            "eps={:e};heads={}",
            config.layer_norm_eps, config.num_attention_heads
        )
        .as_bytes(),
    );
    let mut buffer = Vec::new();
    for file in files {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        hash.update(name.as_bytes());
        let mut handle = File::open(file).map_err(|e| ModelError::io(file, e))?;
        let len = handle
            .metadata()
            .map_err(|e| ModelError::io(file, e))?
            .len();
        hash.update(&len.to_le_bytes());
        let mut windows = vec![(0, len.min(WINDOW))];
        if len > WINDOW {
            let start = (len - WINDOW).max(WINDOW);
            windows.push((start, len - start));
        }
        for (start, size) in windows {
            buffer.clear();
            handle
                .seek(SeekFrom::Start(start))
                .and_then(|_| (&mut handle).take(size).read_to_end(&mut buffer))
                .map_err(|e| ModelError::io(file, e))?;
            hash.update(&buffer);
        }
    }
    Ok(hash.finish())
}
