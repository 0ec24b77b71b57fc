//! GGUF decoder files (llama.cpp): configuration from metadata, every tensor
//! dequantized to f32 (gradients cannot flow through quantized matmuls), the
//! names mapped to Hugging Face's, the rotary layout converted, and the
//! tokenizer rebuilt from `tokenizer.ggml.*`.
//!
//! llama.cpp's converter permutes the rows of `attn_q`/`attn_k` of LLaMA-arch
//! models for its interleaved rotary embedding; the decoder here uses the
//! Hugging Face half-rotation layout, so those rows are permuted back at load
//! time (STACK.md, pitfall 4). Qwen2 files are not permuted by the converter.
//! The writer below applies the forward permutation, so tests can check that
//! a model saved both ways computes the same logits.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};
use crate::llm::config::{DecoderConfig, DecoderFamily};
use crate::llm::decoder::FrozenDecoder;
use crate::tokenizer::{GgufBpeSpec, TextTokenizer};
use crate::weights::WeightMap;

/// GGUF tensor name suffixes and their Hugging Face equivalents, per block.
const BLOCK_NAMES: [(&str, &str); 13] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
    // Present in some exports; harmless to map and ignore.
    ("rope_freqs.weight", "rope_freqs.weight"),
];

const GLOBAL_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

fn gguf_to_hf_name(name: &str) -> Option<String> {
    if let Some((_, hf)) = GLOBAL_NAMES.iter().find(|(g, _)| *g == name) {
        return Some((*hf).to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (index, suffix) = rest.split_once('.')?;
    let index: usize = index.parse().ok()?;
    let (_, hf) = BLOCK_NAMES.iter().find(|(g, _)| *g == suffix)?;
    Some(format!("model.layers.{index}.{hf}"))
}

fn hf_to_gguf_name(name: &str) -> Option<String> {
    if let Some((g, _)) = GLOBAL_NAMES.iter().find(|(_, hf)| *hf == name) {
        return Some((*g).to_string());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (index, suffix) = rest.split_once('.')?;
    let (g, _) = BLOCK_NAMES.iter().find(|(_, hf)| *hf == suffix)?;
    Some(format!("blk.{index}.{g}"))
}

/// Rows of a q/k projection from llama.cpp's interleaved-rotary order to
/// Hugging Face's half-rotation order: within each head, row 2i+s moves to
/// s*(head_dim/2) + i.
fn unpermute_rotary_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let head_dim = rows / heads;
    Ok(w.reshape((heads, head_dim / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// The inverse of [`unpermute_rotary_rows`] (what llama.cpp's converter does).
fn permute_rotary_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let head_dim = rows / heads;
    Ok(w.reshape((heads, 2, head_dim / 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

struct Metadata<'a> {
    path: &'a Path,
    map: &'a HashMap<String, Value>,
}

impl Metadata<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.map
            .get(key)
            .ok_or_else(|| ModelError::config(self.path, key, "missing from GGUF metadata"))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        let n = v
            .to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
            .map_err(|e| ModelError::config(self.path, key, e.to_string()))?;
        usize::try_from(n).map_err(|e| ModelError::config(self.path, key, e.to_string()))
    }

    fn f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        v.to_f32()
            .map(f64::from)
            .or_else(|_| v.to_f64())
            .map_err(|e| ModelError::config(self.path, key, e.to_string()))
    }

    fn opt_u32(&self, key: &str) -> Option<u32> {
        self.map.get(key).and_then(|v| v.to_u32().ok())
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let items = self
            .get(key)?
            .to_vec()
            .map_err(|e| ModelError::config(self.path, key, e.to_string()))?;
        items
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|e| ModelError::config(self.path, key, e.to_string()))
            })
            .collect()
    }
}

/// A decoder and its tokenizer read from one GGUF file.
#[derive(Debug)]
pub struct GgufDecoder {
    pub decoder: FrozenDecoder,
    pub tokenizer: TextTokenizer,
}

/// What a GGUF decoder file holds, before the decoder is assembled: its
/// config, its f32 weights under Hugging Face names and layout, and its
/// tokenizer description (e.g. to write the model out as a HF folder).
#[derive(Debug)]
pub struct GgufParts {
    pub config: DecoderConfig,
    pub weights: WeightMap,
    pub tokenizer: GgufBpeSpec,
}

/// Reads a GGUF decoder file: f32 weights in Hugging Face layout, and the
/// tokenizer rebuilt from its metadata.
pub fn load_gguf_decoder(path: &Path, device: &Device) -> Result<GgufDecoder> {
    let parts = read_gguf_parts(path, device)?;
    let tokenizer = TextTokenizer::from_gguf_bpe(path, &parts.tokenizer)?;
    tokenizer
        .special()
        .check_range(parts.config.vocab_size, path)?;
    if tokenizer.vocab_size() > parts.config.vocab_size {
        return Err(ModelError::VocabMismatch {
            path: path.to_path_buf(),
            tokenizer: tokenizer.vocab_size(),
            model: parts.config.vocab_size,
        });
    }
    let decoder = FrozenDecoder::from_weight_map(parts.config, parts.weights)?;
    Ok(GgufDecoder { decoder, tokenizer })
}

/// Refuses a tensor that is empty or whose shape and type need bytes past
/// the end of the file, before candle sizes a buffer from them: a header may claim any
/// shape, and the element count of a hostile one overflows (found by
/// fuzzing; candle multiplies the dimensions unchecked).
fn check_tensor_span(
    path: &Path,
    name: &str,
    info: &candle_core::quantized::gguf_file::TensorInfo,
    data_offset: u64,
    file_len: u64,
) -> Result<()> {
    let dims = info.shape.dims();
    let block = info.ggml_dtype.block_size() as u64;
    let end = dims
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
        // An empty tensor is refused too: candle reinterprets the bytes it
        // read as blocks of the tensor's type, and an empty buffer's
        // pointer is not aligned for them (undefined behaviour; found by
        // fuzzing, caught by a debug assertion).
        .filter(|elems| *elems > 0 && block > 0 && elems % block == 0)
        .and_then(|elems| (elems / block).checked_mul(info.ggml_dtype.type_size() as u64))
        .and_then(|bytes| data_offset.checked_add(info.offset)?.checked_add(bytes));
    match end {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(ModelError::format(
            path,
            "GGUF",
            format!(
                "tensor `{name}`: shape {dims:?} of {:?} at offset {} is empty or does not \
                 fit in the file's {file_len} bytes",
                info.ggml_dtype, info.offset
            ),
        )),
    }
}

/// Reads a GGUF decoder file into its [`GgufParts`].
pub fn read_gguf_parts(path: &Path, device: &Device) -> Result<GgufParts> {
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut reader = BufReader::new(file);
    let content =
        Content::read(&mut reader).map_err(|e| ModelError::format(path, "GGUF", e.to_string()))?;
    let meta = Metadata {
        path,
        map: &content.metadata,
    };
    let arch = meta
        .get("general.architecture")?
        .to_string()
        .map_err(|e| ModelError::config(path, "general.architecture", e.to_string()))?
        .clone();
    let family = match arch.as_str() {
        "llama" => DecoderFamily::Llama,
        "qwen2" => DecoderFamily::Qwen2,
        _ => {
            return Err(ModelError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch,
                supported: "llama (incl. SmolLM, Mistral), qwen2".to_string(),
            })
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let embed_info = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| ModelError::MissingTensor {
            path: path.to_path_buf(),
            name: "token_embd.weight".to_string(),
            what: "the token embedding".to_string(),
        })?;
    let hidden_size = meta.usize(&key("embedding_length"))?;
    let num_heads = meta.usize(&key("attention.head_count"))?;
    let num_kv_heads = meta
        .usize(&key("attention.head_count_kv"))
        .unwrap_or(num_heads);
    let head_dim = meta
        .usize(&key("attention.key_length"))
        .unwrap_or(hidden_size.checked_div(num_heads).unwrap_or(0));
    let vocab_size = embed_info.shape.dims().first().copied().unwrap_or(0);
    let config = DecoderConfig {
        family,
        hidden_size,
        intermediate_size: meta.usize(&key("feed_forward_length"))?,
        num_layers: meta.usize(&key("block_count"))?,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        rms_norm_eps: meta.f64(&key("attention.layer_norm_rms_epsilon"))?,
        rope_theta: meta.f64(&key("rope.freq_base")).unwrap_or(10_000.0),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
    };
    config.validate(path)?;

    let file_len = reader
        .get_ref()
        .metadata()
        .map_err(|e| ModelError::io(path, e))?
        .len();
    let mut tensors = HashMap::with_capacity(content.tensor_infos.len());
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_unstable();
    for name in names {
        let Some(hf_name) = gguf_to_hf_name(name) else {
            tracing::debug!(tensor = %name, "ignoring unknown GGUF tensor");
            continue;
        };
        if let Some(info) = content.tensor_infos.get(name.as_str()) {
            check_tensor_span(path, name, info, content.tensor_data_offset, file_len)?;
        }
        let q = content
            .tensor(&mut reader, name, device)
            .map_err(|e| ModelError::format(path, "GGUF", format!("tensor `{name}`: {e}")))?;
        let mut t = q.dequantize(device)?;
        if family == DecoderFamily::Llama {
            if name.contains("attn_q.") {
                t = unpermute_rotary_rows(&t, config.num_heads)?;
            } else if name.contains("attn_k.") {
                t = unpermute_rotary_rows(&t, config.num_kv_heads)?;
            }
        }
        tensors.insert(hf_name, t);
    }
    let weights = WeightMap::new(path, tensors);

    let model = meta
        .get("tokenizer.ggml.model")?
        .to_string()
        .map_err(|e| ModelError::config(path, "tokenizer.ggml.model", e.to_string()))?;
    if model != "gpt2" {
        return Err(ModelError::Tokenizer {
            path: path.to_path_buf(),
            message: format!(
                "tokenizer.ggml.model `{model}` is not supported (only gpt2-style byte-level BPE)"
            ),
        });
    }
    let token_types = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| ModelError::config(path, "tokenizer.ggml.token_type", e.to_string()))?
            .iter()
            .map(|t| t.to_i32().unwrap_or(1))
            .collect(),
        None => Vec::new(),
    };
    let spec = GgufBpeSpec {
        tokens: meta.strings("tokenizer.ggml.tokens")?,
        merges: meta.strings("tokenizer.ggml.merges")?,
        token_types,
        pre: content
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok().cloned()),
        bos_id: meta.opt_u32("tokenizer.ggml.bos_token_id"),
        eos_id: meta.opt_u32("tokenizer.ggml.eos_token_id"),
        pad_id: meta.opt_u32("tokenizer.ggml.padding_token_id"),
    };
    Ok(GgufParts {
        config,
        weights,
        tokenizer: spec,
    })
}

/// Writes a LLaMA-arch GGUF file (f32 tensors) from Hugging Face-named
/// weights, permuting q/k rows as llama.cpp's converter does. For tests and
/// for exporting tiny models; real files come from llama.cpp.
pub fn write_llama_gguf(
    path: &Path,
    config: &DecoderConfig,
    weights: &WeightMap,
    tokenizer: &GgufBpeSpec,
) -> Result<()> {
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for name in weights.names() {
        let gguf_name = hf_to_gguf_name(name)
            .ok_or_else(|| ModelError::InvalidInput(format!("no GGUF name for tensor `{name}`")))?;
        let mut t = weights.get_any(name, "a decoder tensor")?;
        if gguf_name.contains("attn_q.") {
            t = permute_rotary_rows(&t, config.num_heads)?;
        } else if gguf_name.contains("attn_k.") {
            t = permute_rotary_rows(&t, config.num_kv_heads)?;
        }
        tensors.push((gguf_name, QTensor::quantize(&t, GgmlDType::F32)?));
    }
    let u32v = |v: usize| Value::U32(v as u32);
    let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.block_count".into(), u32v(config.num_layers)),
        ("llama.embedding_length".into(), u32v(config.hidden_size)),
        (
            "llama.feed_forward_length".into(),
            u32v(config.intermediate_size),
        ),
        ("llama.attention.head_count".into(), u32v(config.num_heads)),
        (
            "llama.attention.head_count_kv".into(),
            u32v(config.num_kv_heads),
        ),
        ("llama.attention.key_length".into(), u32v(config.head_dim)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(config.rms_norm_eps as f32),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(config.rope_theta as f32),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), strings(&tokenizer.tokens)),
        ("tokenizer.ggml.merges".into(), strings(&tokenizer.merges)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                tokenizer
                    .token_types
                    .iter()
                    .map(|&t| Value::I32(t))
                    .collect(),
            ),
        ),
    ];
    if let Some(pre) = &tokenizer.pre {
        metadata.push(("tokenizer.ggml.pre".into(), Value::String(pre.clone())));
    }
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", tokenizer.bos_id),
        ("tokenizer.ggml.eos_token_id", tokenizer.eos_id),
        ("tokenizer.ggml.padding_token_id", tokenizer.pad_id),
    ] {
        if let Some(id) = id {
            metadata.push((key.into(), Value::U32(id)));
        }
    }
    let meta_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = File::create(path).map_err(|e| ModelError::io(path, e))?;
    gguf_file::write(&mut file, &meta_refs, &tensor_refs)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for name in [
            "token_embd.weight",
            "output.weight",
            "blk.3.attn_q.weight",
            "blk.12.ffn_down.weight",
            "blk.0.attn_k.bias",
        ] {
            let hf = gguf_to_hf_name(name);
            assert!(hf.is_some(), "{name}");
            assert_eq!(hf.and_then(|h| hf_to_gguf_name(&h)).as_deref(), Some(name));
        }
        assert_eq!(gguf_to_hf_name("blk.x.attn_q.weight"), None);
    }

    #[test]
    fn rotary_permutation_inverts_and_moves_rows_as_llama_cpp() -> Result<()> {
        // 2 heads of dim 4, one column: rows hold their own index.
        let w = Tensor::arange(0f32, 8.0, &Device::Cpu)?.reshape((8, 1))?;
        let permuted = permute_rotary_rows(&w, 2)?;
        // llama.cpp: reshape(heads, 2, hd/2).swapaxes(1, 2) -> per head
        // [0, 2, 1, 3]: the two halves are interleaved.
        let got: Vec<f32> = permuted.flatten_all()?.to_vec1()?;
        assert_eq!(got, vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        let back: Vec<f32> = unpermute_rotary_rows(&permuted, 2)?
            .flatten_all()?
            .to_vec1()?;
        assert_eq!(back, (0..8).map(|i| i as f32).collect::<Vec<_>>());
        Ok(())
    }
}
