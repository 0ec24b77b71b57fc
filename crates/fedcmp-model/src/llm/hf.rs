//! Loads a decoder from a Hugging Face model folder: `config.json`,
//! `model.safetensors` (or shards listed in `model.safetensors.index.json`)
//! and `tokenizer.json`; the special ids from the folder's metadata files
//! ([`crate::special_tokens`]).

use std::path::Path;

use candle_core::Device;

use crate::error::{ModelError, Result};
use crate::llm::config::DecoderConfig;
use crate::llm::decoder::FrozenDecoder;
use crate::special_tokens::SpecialTokens;
use crate::tokenizer::TextTokenizer;
use crate::weights::load_hf_folder_weights;

/// Reads the folder's config and weights into a frozen f32 decoder.
pub fn load_hf_decoder(folder: &Path, device: &Device) -> Result<FrozenDecoder> {
    let config = DecoderConfig::from_hf_config(&folder.join("config.json"))?;
    let weights = load_hf_folder_weights(folder, device)?;
    FrozenDecoder::from_weight_map(config, weights)
}

/// Reads decoder and tokenizer, and checks that they agree on the vocabulary.
pub fn load_hf_decoder_and_tokenizer(
    folder: &Path,
    device: &Device,
) -> Result<(FrozenDecoder, TextTokenizer)> {
    let decoder = load_hf_decoder(folder, device)?;
    let tokenizer_path = folder.join("tokenizer.json");
    let mut tokenizer = TextTokenizer::from_file(&tokenizer_path)?;
    let special = SpecialTokens::from_hf_folder(folder, &|token| tokenizer.token_id(token))?;
    let config = decoder.config();
    special.check_range(config.vocab_size, folder)?;
    tokenizer.set_special(special);
    // A model may pad its embedding beyond the tokenizer (e.g. to a multiple
    // of 64); the reverse would index past the embedding.
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(ModelError::VocabMismatch {
            path: tokenizer_path,
            tokenizer: tokenizer.vocab_size(),
            model: config.vocab_size,
        });
    }
    Ok((decoder, tokenizer))
}
