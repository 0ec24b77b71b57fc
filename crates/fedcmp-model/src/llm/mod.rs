//! LLaMA-family decoder LLMs, frozen: configuration, loaders (Hugging Face
//! folders and GGUF files) and the forward/backward used by alignment.

pub mod config;
pub mod decoder;
pub mod gguf;
pub mod hf;
pub mod kernels;
pub mod synthetic;

pub use config::{DecoderConfig, DecoderFamily};
pub use decoder::{FrozenDecoder, LossTargets};
