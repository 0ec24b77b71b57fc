//! Builders shared by the test modules: the tiny generated decoder with its
//! byte-level tokenizer, and small grey images as records.

use std::sync::Arc;

use anyhow::Result;
use candle_core::Device;
use fedcmp_data::record::{ImageSource, RawImage, Record};
use fedcmp_model::llm::config::DecoderConfig;
use fedcmp_model::llm::decoder::FrozenDecoder;
use fedcmp_model::llm::synthetic::random_decoder_weights;
use fedcmp_model::tokenizer::{GgufBpeSpec, TextTokenizer};

/// A 2-layer decoder of width 32 with random weights (seed 3) and a
/// byte-level tokenizer.
pub fn tiny_backbones() -> Result<(FrozenDecoder, TextTokenizer)> {
    let spec = GgufBpeSpec::byte_level(&["<|endoftext|>", "<|bos|>"], &[]);
    let tokenizer = TextTokenizer::from_gguf_bpe(std::path::Path::new("tiny"), &spec)?;
    let config = DecoderConfig::tiny(spec.tokens.len());
    let weights = random_decoder_weights(&config, 3, &Device::Cpu)?;
    Ok((FrozenDecoder::from_weights(config, &weights)?, tokenizer))
}

/// An 8x8 grey image around brightness `base`, varied by `i` so that no two
/// records share their pixels (or their cache entry).
pub fn grey_record(i: u8, base: u8, caption: &str, label: Option<u32>, source: &str) -> Record {
    Record {
        id: format!("{source}/{i}"),
        image: ImageSource::Raw(Arc::new(RawImage {
            width: 8,
            height: 8,
            channels: 1,
            pixels: (0..64)
                .map(|p| base.wrapping_add((p as u8 + i) % 7))
                .collect(),
        })),
        caption: caption.to_string(),
        label,
        source: source.to_string(),
    }
}

/// A parameter set's exact identity: the sha256 of its names, shapes and
/// little-endian f32 bytes, with its sum and norm (to tell a rounding-level
/// change from a real one when the digest differs).
pub fn fingerprint(params: &fedcmp_core::ParamSet) -> serde_json::Value {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for (name, tensor) in params.entries() {
        hash.update(name.as_bytes());
        for d in &tensor.shape {
            hash.update((*d as u64).to_le_bytes());
        }
        for v in &tensor.data {
            hash.update(v.to_le_bytes());
        }
    }
    let digest: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let sum: f64 = params.flat().map(f64::from).sum();
    let norm: f64 = params
        .flat()
        .map(|v| f64::from(v).powi(2))
        .sum::<f64>()
        .sqrt();
    serde_json::json!({ "sha256": digest, "sum": sum, "norm": norm })
}
