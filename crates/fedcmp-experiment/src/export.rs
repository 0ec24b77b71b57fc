//! `fedcmp export`: a trained projector in the layouts the LLaVA ecosystem
//! loads, each with a sidecar naming what it was aligned with.
//!
//! - `hf-llava/`: Hugging Face transformers' `LlavaForConditionalGeneration`
//!   names (`multi_modal_projector.linear_1.*`, `linear_2.*`; a two-layer
//!   GELU MLP, so only `mlp2x_gelu` projectors), in `model.safetensors`,
//!   with `projector_config.json`, the projector's part of a `LlavaConfig`
//!   (activation, bias, tokens per image, the two hidden sizes). Load it
//!   with `model.load_state_dict(..., strict=False)` into a LLaVA model
//!   whose towers are the backbones the sidecar names.
//! - `llava/`: LLaVA's own names (`model.mm_projector.0.*` and `.2.*` for
//!   `mlp2x_gelu`, `model.mm_projector.*` for `linear`) in
//!   `mm_projector.safetensors` (LLaVA's training saves the same state dict
//!   as `mm_projector.bin`), with `projector_config.json`, the `mm_*` keys
//!   of a LLaVA config.
//!
//! Every folder gets `fedcmp_export.json`: the projector's shape, the vision
//! encoder (weights, input size, feature map, how many visual tokens and
//! how they are pooled), the decoder LLM, the caption layout, and where the
//! projector came from. Files are written atomically. [`read_export`] reads
//! either layout back into fedcmp's names.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use fedcmp_core::ParamSet;
use fedcmp_model::projector::{ProjectorConfig, ProjectorKind};
use fedcmp_runtime::convert::{load_params_file, save_params_file};
use serde_json::json;

use crate::backbones::{VisionChoice, LLM_ASSET, VISION_ASSET};
use crate::files::write_atomic;
use crate::saved::SavedProjector;
use crate::settings::RunSettings;
use crate::{ExperimentError, Result};

/// An export layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// Hugging Face transformers' LLaVA names.
    HfLlava,
    /// LLaVA's own `mm_projector` names.
    Llava,
}

impl ExportFormat {
    pub const ALL: [Self; 2] = [Self::HfLlava, Self::Llava];

    fn name(self) -> &'static str {
        match self {
            Self::HfLlava => "hf-llava",
            Self::Llava => "llava",
        }
    }

    /// Whether this layout can hold a projector of `kind` (transformers'
    /// LLaVA projector is always the two-layer MLP).
    pub fn fits(self, kind: ProjectorKind) -> bool {
        self != Self::HfLlava || kind == ProjectorKind::Mlp2xGelu
    }

    fn weights_file(self) -> &'static str {
        match self {
            Self::HfLlava => "model.safetensors",
            Self::Llava => "mm_projector.safetensors",
        }
    }

    /// fedcmp's parameter name -> this layout's, for a projector of `kind`.
    fn rename(self, kind: ProjectorKind, name: &str) -> Option<String> {
        let (layer, field) = name.split_once('.')?;
        match (self, kind, layer) {
            (Self::HfLlava, ProjectorKind::Mlp2xGelu, "linear_1" | "linear_2") => {
                Some(format!("multi_modal_projector.{layer}.{field}"))
            }
            (Self::Llava, ProjectorKind::Mlp2xGelu, "linear_1") => {
                Some(format!("model.mm_projector.0.{field}"))
            }
            (Self::Llava, ProjectorKind::Mlp2xGelu, "linear_2") => {
                Some(format!("model.mm_projector.2.{field}"))
            }
            (Self::Llava, ProjectorKind::Linear, "linear_1") => {
                Some(format!("model.mm_projector.{field}"))
            }
            _ => None,
        }
    }
}

impl fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ExportFormat {
    type Err = ExperimentError;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                ExperimentError::Invalid(format!(
                    "unknown export format `{s}` (expected hf-llava or llava)"
                ))
            })
    }
}

/// What the projector was aligned with, for the sidecar.
fn provenance(saved: &SavedProjector, config: &ProjectorConfig) -> serde_json::Value {
    let settings: &RunSettings = &saved.settings;
    let backbones = &settings.data.backbones;
    let vision = match &backbones.vision {
        VisionChoice::MobilenetV2 => json!({
            "encoder": "mobilenet-v2",
            "weights": format!("torchvision ImageNet MobileNetV2 (fedcmp asset `{}`: {})",
                               VISION_ASSET.0, VISION_ASSET.1),
            "features": "the last feature map (features.18, 1280 channels), one token per cell \
                         of its grid, row-major",
            "normalization": "ImageNet mean and std after scaling pixels to [0, 1]",
        }),
        VisionChoice::PatchMeans => json!({
            "encoder": "patch-means",
            "weights": null,
            "features": "per-patch channel means (no weights)",
        }),
        VisionChoice::Folder(folder) => json!({
            "encoder": "Hugging Face CLIP or SigLIP vision tower",
            "weights": folder.display().to_string(),
            "features": "LLaVA's: the hidden state `vision_feature_layer` (an index into \
                         hidden_states, negative from the end), patch tokens only (class \
                         token dropped)",
            "vision_feature_layer": backbones.feature_layer,
            "vision_feature_select_strategy": "default",
            "normalization": "the family's: CLIP's mean and std, or SigLIP's 0.5 / 0.5",
        }),
    };
    let mut vision = vision;
    vision["image_size"] = json!(backbones.image_size);
    vision["resize"] = json!("shorter side to image_size, then center crop");
    vision["visual_tokens"] = json!(backbones.visual_tokens);
    vision["token_pooling"] = json!(match backbones.visual_tokens {
        Some(_) => "average of square blocks of the patch grid, row-major (whole grid if null)",
        None => "none: every patch is a visual token",
    });
    let llm = match &backbones.llm {
        Some(path) => json!({"path": path.display().to_string()}),
        None => json!({"asset": LLM_ASSET.0, "file": LLM_ASSET.1,
                       "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to f32)"}),
    };
    json!({
        "projector": {
            "kind": config.kind.to_string(),
            "input_dim": config.input_dim,
            "output_dim": config.output_dim,
            "activation": match config.kind {
                ProjectorKind::Mlp2xGelu => "gelu (exact, erf)",
                ProjectorKind::Linear => "none",
            },
        },
        "vision": vision,
        "llm": llm,
        "caption_layout": {
            "template": "LLaVA plain: [BOS] visual tokens, separator, caption, newline",
            "separator": settings.data.caption_separator,
        },
        "source": {
            "projector": saved.file.display().to_string(),
            "label": saved.label,
            "scenario": settings.data.scenario,
            "seed": settings.seed,
        },
        "fedcmp_version": env!("CARGO_PKG_VERSION"),
    })
}

/// The projector's part of a config of `format`; `feature_layer` is the
/// vision tower's feature layer when it is a CLIP/SigLIP folder.
fn projector_config(
    format: ExportFormat,
    config: &ProjectorConfig,
    tokens: Option<usize>,
    feature_layer: Option<i32>,
) -> serde_json::Value {
    let mut out = match format {
        ExportFormat::HfLlava => json!({
            "model_type": "llava",
            "projector_hidden_act": "gelu",
            "multimodal_projector_bias": true,
            "image_seq_length": tokens,
            "vision_config": {"hidden_size": config.input_dim},
            "text_config": {"hidden_size": config.output_dim},
        }),
        ExportFormat::Llava => json!({
            "mm_projector_type": config.kind.to_string(),
            "mm_hidden_size": config.input_dim,
            "hidden_size": config.output_dim,
        }),
    };
    if let Some(layer) = feature_layer {
        let fields = match format {
            ExportFormat::HfLlava => [
                ("vision_feature_layer", json!(layer)),
                ("vision_feature_select_strategy", json!("default")),
            ],
            ExportFormat::Llava => [
                ("mm_vision_select_layer", json!(layer)),
                ("mm_vision_select_feature", json!("patch")),
            ],
        };
        for (key, value) in fields {
            out[key] = value;
        }
    }
    out
}

/// Writes `saved` in every layout of `formats` under `out/<layout>/`;
/// returns the files written.
pub fn export(
    saved: &SavedProjector,
    out: &Path,
    formats: &[ExportFormat],
) -> Result<Vec<PathBuf>> {
    let (config, params) = saved.load()?;
    let sidecar = provenance(saved, &config);
    let backbones = &saved.settings.data.backbones;
    let shape = LayoutShape {
        visual_tokens: backbones.visual_tokens,
        feature_layer: backbones.feature_layer,
    };
    let mut written = Vec::new();
    for &format in formats {
        let dir = out.join(format.name());
        written.extend(write_layout(
            format, &params, &config, shape, &sidecar, &dir,
        )?);
    }
    Ok(written)
}

/// What a layout's config says about the projector's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LayoutShape {
    /// Visual tokens per image (None: the encoder's whole grid).
    pub visual_tokens: Option<usize>,
    /// The CLIP/SigLIP tower's feature layer, when the encoder is one.
    pub feature_layer: Option<i32>,
}

/// Writes one layout of a projector (`params` in fedcmp's names) into
/// `dir`: its weights, its `projector_config.json` and `sidecar` as
/// `fedcmp_export.json`. Returns the files written.
pub fn write_layout(
    format: ExportFormat,
    params: &ParamSet,
    config: &ProjectorConfig,
    shape: LayoutShape,
    sidecar: &serde_json::Value,
    dir: &Path,
) -> Result<Vec<PathBuf>> {
    let renamed = params
        .entries()
        .iter()
        .map(|(name, tensor)| {
            let new = format.rename(config.kind, name).ok_or_else(|| {
                ExperimentError::Invalid(format!(
                    "the {format} layout has no place for a {} projector's `{name}`{}",
                    config.kind,
                    if format == ExportFormat::HfLlava {
                        " (transformers' LLaVA projector is a two-layer GELU MLP; export a \
                         linear projector with --format llava)"
                    } else {
                        ""
                    }
                ))
            })?;
            Ok((new, tensor.clone()))
        })
        .collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(dir).map_err(crate::io_error(dir))?;
    let weights = dir.join(format.weights_file());
    save_params_file(&ParamSet::new(renamed)?, &weights)?;
    let mut written = vec![weights];
    for (file, value) in [
        (
            "projector_config.json",
            projector_config(format, config, shape.visual_tokens, shape.feature_layer),
        ),
        ("fedcmp_export.json", sidecar.clone()),
    ] {
        let path = dir.join(file);
        let text = serde_json::to_string_pretty(&value)
            .map_err(|e| ExperimentError::Internal(format!("cannot encode {file}: {e}")))?;
        write_atomic(&path, text.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

/// Reads an exported folder (`hf-llava/` or `llava/`) back into fedcmp's
/// parameter names, with the projector's kind.
pub fn read_export(dir: &Path) -> Result<(ParamSet, ProjectorKind)> {
    for format in ExportFormat::ALL {
        let path = dir.join(format.weights_file());
        if !path.is_file() {
            continue;
        }
        let params = load_params_file(&path)?;
        for kind in [ProjectorKind::Mlp2xGelu, ProjectorKind::Linear] {
            let names: Vec<&str> = match kind {
                ProjectorKind::Mlp2xGelu => {
                    vec![
                        "linear_1.weight",
                        "linear_1.bias",
                        "linear_2.weight",
                        "linear_2.bias",
                    ]
                }
                ProjectorKind::Linear => vec!["linear_1.weight", "linear_1.bias"],
            };
            let entries: Option<Vec<_>> = names
                .iter()
                .map(|name| {
                    let theirs = format.rename(kind, name)?;
                    Some((name.to_string(), params.get(&theirs)?.clone()))
                })
                .collect();
            if let Some(entries) = entries.filter(|_| params.len() == names.len()) {
                return Ok((ParamSet::new(entries)?, kind));
            }
        }
        return Err(ExperimentError::File {
            path,
            message: format!("not a projector in the {format} layout"),
        });
    }
    Err(ExperimentError::File {
        path: dir.to_path_buf(),
        message: "no model.safetensors (hf-llava) or mm_projector.safetensors (llava)".into(),
    })
}
