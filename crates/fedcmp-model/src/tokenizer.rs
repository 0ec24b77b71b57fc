//! Text tokenization for the frozen decoder: a Hugging Face `tokenizer.json`,
//! or a byte-level BPE rebuilt from a GGUF file's metadata.
//!
//! Padding and truncation stored in a tokenizer.json are switched off: the
//! alignment batcher pads itself and must see every caption token
//! (STACK.md, pitfall 9).

use std::path::{Path, PathBuf};

use serde_json::json;
use tokenizers::Tokenizer;

use crate::error::{ModelError, Result};
use crate::special_tokens::SpecialTokens;

/// A tokenizer plus the special ids alignment needs (set by the loader from
/// the backbone's metadata, [`crate::special_tokens`]).
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    origin: PathBuf,
    special: SpecialTokens,
}

/// The byte-level BPE description found in GGUF metadata
/// (`tokenizer.ggml.*`, model `gpt2`).
#[derive(Debug, Clone)]
pub struct GgufBpeSpec {
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    /// llama.cpp token types; 3 marks control tokens such as `<|im_start|>`.
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.pre`, e.g. `smollm`, selecting the pre-tokenizer.
    pub pre: Option<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
}

const CONTROL_TOKEN: i32 = 3;

/// GPT-2's reversible byte -> printable-character map (printable bytes map
/// to themselves, the others to U+0100 onwards), from its definition.
pub fn gpt2_byte_chars() -> Vec<char> {
    let mut bytes: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = bytes.clone();
    let mut extra = 0;
    for byte in 0..256u32 {
        if !bytes.contains(&byte) {
            bytes.push(byte);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut table = vec!['?'; 256];
    for (b, c) in bytes.iter().zip(chars) {
        table[*b as usize] = char::from_u32(c).unwrap_or('?');
    }
    table
}

impl GgufBpeSpec {
    /// A complete byte-level BPE: the `control` tokens (ids 0..), the 256
    /// byte tokens, then one token per merge. Any text encodes; tests and
    /// tiny generated models use it.
    pub fn byte_level(control: &[&str], merges: &[(&str, &str)]) -> Self {
        let mut tokens: Vec<String> = control.iter().map(|t| t.to_string()).collect();
        tokens.extend(gpt2_byte_chars().into_iter().map(String::from));
        let mut merge_lines = Vec::with_capacity(merges.len());
        for (a, b) in merges {
            merge_lines.push(format!("{a} {b}"));
            tokens.push(format!("{a}{b}"));
        }
        let mut token_types = vec![CONTROL_TOKEN; control.len()];
        token_types.resize(tokens.len(), 1);
        Self {
            tokens,
            merges: merge_lines,
            token_types,
            pre: Some("smollm".into()),
            bos_id: (control.len() > 1).then_some(1),
            eos_id: (!control.is_empty()).then_some(0),
            pad_id: None,
        }
    }
}

impl TextTokenizer {
    /// Reads a Hugging Face `tokenizer.json`, with no special ids yet: the
    /// folder's other files declare them ([`Self::set_special`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut inner = Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| ModelError::Tokenizer {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Ok(Self {
            inner,
            origin: path.to_path_buf(),
            special: SpecialTokens::default(),
        })
    }

    /// Rebuilds a GPT-2-style byte-level BPE from GGUF metadata, the way
    /// llama.cpp interprets it: digits split individually, then byte-level
    /// pre-tokenization without a prefix space; control tokens are special.
    pub fn from_gguf_bpe(path: &Path, spec: &GgufBpeSpec) -> Result<Self> {
        let err = |message: String| ModelError::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        if spec.tokens.is_empty() {
            return Err(err("tokenizer.ggml.tokens is empty".to_string()));
        }
        match spec.pre.as_deref() {
            None | Some("smollm") | Some("default") | Some("gpt2") => {}
            Some(other) => {
                return Err(err(format!(
                    "pre-tokenizer `{other}` is not supported (supported: smollm, gpt2, default)"
                )))
            }
        }
        let mut vocab = serde_json::Map::with_capacity(spec.tokens.len());
        for (id, token) in spec.tokens.iter().enumerate() {
            vocab.insert(token.clone(), json!(id));
        }
        let mut merges = Vec::with_capacity(spec.merges.len());
        for (line, merge) in spec.merges.iter().enumerate() {
            let (a, b) = merge
                .split_once(' ')
                .ok_or_else(|| err(format!("merge {line} `{merge}` is not `left right`")))?;
            merges.push(json!([a, b]));
        }
        let added: Vec<serde_json::Value> = spec
            .tokens
            .iter()
            .enumerate()
            .filter(|(id, _)| spec.token_types.get(*id) == Some(&CONTROL_TOKEN))
            .map(|(id, token)| {
                json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let description = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
            ]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}
        });
        let inner = Tokenizer::from_bytes(description.to_string().as_bytes())
            .map_err(|e| err(e.to_string()))?;
        Ok(Self {
            inner,
            origin: path.to_path_buf(),
            special: SpecialTokens::from_gguf(spec.bos_id, spec.eos_id, spec.pad_id),
        })
    }

    /// Sets the special ids (the loader resolves them from the metadata).
    pub fn set_special(&mut self, special: SpecialTokens) {
        self.special = special;
    }

    /// The special ids in use.
    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    /// The id of `token`, if the vocabulary has it (special tokens included).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token ids of `text`, with no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer {
                path: self.origin.clone(),
                message: format!("cannot encode {text:?}: {e}"),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens kept.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| ModelError::Tokenizer {
                path: self.origin.clone(),
                message: format!("cannot decode {ids:?}: {e}"),
            })
    }

    /// Number of tokens, special ones included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Beginning-of-sequence id, if the tokenizer has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.special.bos
    }

    /// End-of-sequence id, if the tokenizer has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.special.eos
    }

    /// Every id generation stops at (the EOS first).
    pub fn stop_ids(&self) -> &[u32] {
        &self.special.stop
    }

    /// Padding id: the declared one, else end-of-sequence, else 0. Padding
    /// is never scored and, being right-aligned under a causal mask, never
    /// attended to, so any valid id serves.
    pub fn pad_id(&self) -> u32 {
        self.special.pad.or(self.special.eos).unwrap_or(0)
    }

    /// The underlying Hugging Face tokenizer (e.g. to save it as JSON).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}
