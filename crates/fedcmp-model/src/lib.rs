//! fedcmp-model: the frozen backbones of a LLaVA-style multimodal LLM and the
//! one operation the whole project rests on, the alignment step.
//!
//! - [`weights`]: named f32 tensors from safetensors, GGUF or torch pickles;
//! - [`llm`]: LLaMA-family decoders (LLaMA, SmolLM, Qwen2, Mistral) from
//!   Hugging Face folders or GGUF files, run frozen with a hand-written
//!   backward that yields only the gradient of the input embeddings;
//! - [`tokenizer`]: tokenizer.json, or a tokenizer rebuilt from GGUF metadata;
//! - [`special_tokens`]: BOS/EOS/PAD ids from the backbone's own metadata;
//! - [`vision`]: frozen vision encoders (MobileNetV2, CLIP, SigLIP);
//! - [`projector`]: the trainable cross-modal projector;
//! - [`alignment`]: caption cross-entropy through the frozen decoder, its
//!   projector gradient, and AdamW on the projector.

pub mod alignment;
pub mod error;
pub mod llm;
pub mod optim;
pub mod projector;
pub mod special_tokens;
pub mod tokenizer;
pub mod vision;
pub mod weights;

pub use error::{ModelError, Result};
pub use weights::WeightMap;
