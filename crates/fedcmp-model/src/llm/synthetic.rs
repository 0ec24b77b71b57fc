//! Seeded random decoders for tests and benchmarks: no download, any shape.
//!
//! The weights are named as in a Hugging Face checkpoint, so the same
//! [`WeightMap`] can be written to a safetensors folder or a GGUF file and
//! read back through the real loaders.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::Result;
use crate::llm::config::DecoderConfig;
use crate::weights::WeightMap;

fn uniform(rng: &mut ChaCha8Rng, shape: &[usize], scale: f32, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// Norm gains near one, perturbed so that a backward that ignored them
/// would be caught by the gradient check.
fn gains(rng: &mut ChaCha8Rng, n: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..n).map(|_| 1.0 + rng.random_range(-0.2..0.2)).collect();
    Ok(Tensor::from_vec(data, n, device)?)
}

/// Hugging Face-named f32 weights for `config`, deterministic in `seed`.
/// Linear layers are uniform with variance 1/fan_in, embeddings of scale 1,
/// so activations stay O(1) through any depth a test uses.
pub fn random_decoder_weights(
    config: &DecoderConfig,
    seed: u64,
    device: &Device,
) -> Result<WeightMap> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let d = config.hidden_size;
    let q = config.num_heads * config.head_dim;
    let kv = config.num_kv_heads * config.head_dim;
    let f = config.intermediate_size;
    let lin = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
    let mut t = HashMap::new();
    t.insert(
        "model.embed_tokens.weight".to_string(),
        uniform(&mut rng, &[config.vocab_size, d], 1.0, device)?,
    );
    for i in 0..config.num_layers {
        let p = format!("model.layers.{i}");
        let mut put = |name: &str, tensor: Tensor| {
            t.insert(format!("{p}.{name}"), tensor);
        };
        put("input_layernorm.weight", gains(&mut rng, d, device)?);
        put(
            "self_attn.q_proj.weight",
            uniform(&mut rng, &[q, d], lin(d), device)?,
        );
        put(
            "self_attn.k_proj.weight",
            uniform(&mut rng, &[kv, d], lin(d), device)?,
        );
        put(
            "self_attn.v_proj.weight",
            uniform(&mut rng, &[kv, d], lin(d), device)?,
        );
        if config.attention_bias {
            put(
                "self_attn.q_proj.bias",
                uniform(&mut rng, &[q], 0.1, device)?,
            );
            put(
                "self_attn.k_proj.bias",
                uniform(&mut rng, &[kv], 0.1, device)?,
            );
            put(
                "self_attn.v_proj.bias",
                uniform(&mut rng, &[kv], 0.1, device)?,
            );
        }
        put(
            "self_attn.o_proj.weight",
            uniform(&mut rng, &[d, q], lin(q), device)?,
        );
        put(
            "post_attention_layernorm.weight",
            gains(&mut rng, d, device)?,
        );
        put(
            "mlp.gate_proj.weight",
            uniform(&mut rng, &[f, d], lin(d), device)?,
        );
        put(
            "mlp.up_proj.weight",
            uniform(&mut rng, &[f, d], lin(d), device)?,
        );
        put(
            "mlp.down_proj.weight",
            uniform(&mut rng, &[d, f], lin(f), device)?,
        );
    }
    t.insert("model.norm.weight".to_string(), gains(&mut rng, d, device)?);
    if !config.tie_word_embeddings {
        t.insert(
            "lm_head.weight".to_string(),
            uniform(&mut rng, &[config.vocab_size, d], lin(d), device)?,
        );
    }
    Ok(WeightMap::new(format!("<random decoder, seed {seed}>"), t))
}
