//! The alignment step is right: the projector gradient matches central finite
//! differences (and is never silently zero), the decoder's hand-written input
//! gradient matches finite differences, training lowers the loss, and the
//! Hugging Face and GGUF paths compute the same model.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use fedcmp_model::alignment::{
    beam_search_caption, caption_loss, caption_scores, generate_caption, generate_captions,
    loss_and_grads, loss_and_grads_many, train_step, AlignmentBatch, CaptionPrompt,
    TokenizedCaptions,
};
use fedcmp_model::llm::config::DecoderConfig;
use fedcmp_model::llm::decoder::{FrozenDecoder, KvCache, LossTargets};
use fedcmp_model::llm::gguf::{load_gguf_decoder, write_llama_gguf};
use fedcmp_model::llm::hf::{load_hf_decoder, load_hf_decoder_and_tokenizer};
use fedcmp_model::llm::synthetic::random_decoder_weights;
use fedcmp_model::optim::{AdamW, AdamWConfig};
use fedcmp_model::projector::{Projector, ProjectorConfig, ProjectorKind};
use fedcmp_model::tokenizer::{GgufBpeSpec, TextTokenizer};
use fedcmp_model::{ModelError, WeightMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const VOCAB: usize = 64;

fn tiny_decoder(config: DecoderConfig, dtype: DType) -> Result<FrozenDecoder> {
    let weights = random_decoder_weights(&config, 7, &Device::Cpu)?;
    Ok(FrozenDecoder::from_weights(config, &weights)?.to_dtype(dtype)?)
}

fn random_tensor(shape: &[usize], seed: u64, dtype: DType) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

/// Three captions of unequal length (so padding is exercised) after a
/// two-token prefix and a one-token separator (so the visual tokens sit
/// mid-sequence).
fn tokens() -> TokenizedCaptions {
    TokenizedCaptions {
        prefix: vec![1, 5],
        separator: vec![2],
        captions: vec![vec![3, 4, 5], vec![7, 8], vec![9, 10, 11, 12, 13]],
        pad_id: 0,
    }
}

fn set_element(t: &Tensor, index: usize, value: f64) -> Result<Tensor> {
    let mut data: Vec<f64> = t.flatten_all()?.to_vec1()?;
    data[index] = value;
    Ok(Tensor::from_vec(data, t.dims(), t.device())?)
}

/// ||a - b|| / ||b|| over whole vectors: robust to individual tiny entries.
fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
    let norm: f64 = b.iter().map(|y| y * y).sum::<f64>();
    (diff / norm.max(1e-300)).sqrt()
}

fn check_projector_gradient(config: DecoderConfig, kind: ProjectorKind) -> Result<()> {
    let decoder = tiny_decoder(config, DType::F64)?;
    let d_v = 6;
    let projector = Projector::new(
        ProjectorConfig {
            kind,
            input_dim: d_v,
            output_dim: decoder.config().hidden_size,
        },
        3,
        DType::F64,
        &Device::Cpu,
    )?;
    let features = random_tensor(&[3, 4, d_v], 11, DType::F64)?;
    let batch = AlignmentBatch::new(&decoder, features, &tokens())?;
    assert_eq!(batch.num_target_tokens(), 10);
    let out = loss_and_grads(&decoder, &projector, &batch)?;
    assert!(out.loss.is_finite() && out.loss > 0.0);
    let h = 1e-5;
    for ((name, var), grad) in projector.named_params().iter().zip(&out.grads) {
        let grad = grad
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("{name} got no gradient at all"))?;
        let analytic: Vec<f64> = grad.flatten_all()?.to_vec1()?;
        let norm = analytic.iter().map(|g| g * g).sum::<f64>().sqrt();
        assert!(norm > 1e-6, "{name}: gradient is (near) zero: {norm}");
        let original = var.as_tensor().copy()?;
        let values: Vec<f64> = original.flatten_all()?.to_vec1()?;
        let mut numeric = Vec::with_capacity(values.len());
        for (i, &v) in values.iter().enumerate() {
            var.set(&set_element(&original, i, v + h)?)?;
            let plus = caption_loss(&decoder, &projector, &batch)?;
            var.set(&set_element(&original, i, v - h)?)?;
            let minus = caption_loss(&decoder, &projector, &batch)?;
            numeric.push((plus - minus) / (2.0 * h));
        }
        var.set(&original)?;
        let err = relative_error(&analytic, &numeric);
        println!(
            "{kind} {name}: |grad| = {norm:.3e}, relative error vs finite differences = {err:.2e}"
        );
        assert!(err < 1e-6, "{name}: relative error {err:.3e}");
    }
    Ok(())
}

#[test]
fn projector_gradient_matches_finite_differences_mlp2x_gelu() -> Result<()> {
    check_projector_gradient(DecoderConfig::tiny(VOCAB), ProjectorKind::Mlp2xGelu)
}

#[test]
fn projector_gradient_matches_finite_differences_linear_qwen2_biases_untied_head() -> Result<()> {
    let mut config = DecoderConfig::tiny(VOCAB);
    config.attention_bias = true;
    config.tie_word_embeddings = false;
    config.num_kv_heads = 1;
    check_projector_gradient(config, ProjectorKind::Linear)
}

/// Two sequences of 7 input embeddings; the second is scored at two
/// positions only, so packing leaves its end out.
fn input_gradient_case(decoder: &FrozenDecoder, dtype: DType) -> Result<(Tensor, LossTargets)> {
    let inputs = random_tensor(&[2, 7, decoder.config().hidden_size], 5, dtype)?;
    let targets = LossTargets {
        positions: Tensor::new(&[2u32, 3, 5, 7 + 1, 7 + 4], &Device::Cpu)?,
        labels: Tensor::new(&[3u32, 9, 60, 1, 2], &Device::Cpu)?,
    };
    Ok((inputs, targets))
}

/// The decoder's own backward, isolated: d loss / d input embeddings at
/// every position, including the prefix and the padding.
#[test]
fn decoder_input_gradient_matches_finite_differences() -> Result<()> {
    let decoder = tiny_decoder(DecoderConfig::tiny(VOCAB), DType::F64)?;
    let (inputs, targets) = input_gradient_case(&decoder, DType::F64)?;
    let (_, grad) = decoder.caption_loss_and_input_grad(&inputs, &targets)?;
    let analytic: Vec<f64> = grad.flatten_all()?.to_vec1()?;
    let values: Vec<f64> = inputs.flatten_all()?.to_vec1()?;
    let h = 1e-5;
    let mut numeric = Vec::new();
    for (i, &v) in values.iter().enumerate() {
        let plus = decoder.caption_loss(&set_element(&inputs, i, v + h)?, &targets)?;
        let minus = decoder.caption_loss(&set_element(&inputs, i, v - h)?, &targets)?;
        numeric.push((plus - minus) / (2.0 * h));
    }
    let err = relative_error(&analytic, &numeric);
    println!("decoder input gradient: relative error {err:.2e}");
    assert!(err < 1e-6, "relative error {err:.3e}");
    // Causality: positions after the last scored one get exactly zero.
    let last_row = grad.narrow(0, 1, 1)?.narrow(1, 5, 2)?;
    assert_eq!(last_row.abs()?.sum_all()?.to_scalar::<f64>()?, 0.0);
    Ok(())
}

/// Several batches, each with its own projector, through the decoder in
/// one pass: each gets the loss and gradient it gets alone (batches of
/// different sizes and caption lengths, so the stack is padded), and a
/// batch with another caption layout is refused.
#[test]
fn batches_passed_together_get_their_own_gradients() -> Result<()> {
    let decoder = tiny_decoder(DecoderConfig::tiny(VOCAB), DType::F64)?;
    let d_v = 6;
    let projector = |seed: u64| -> Result<Projector> {
        Ok(Projector::new(
            ProjectorConfig {
                kind: ProjectorKind::Mlp2xGelu,
                input_dim: d_v,
                output_dim: decoder.config().hidden_size,
            },
            seed,
            DType::F64,
            &Device::Cpu,
        )?)
    };
    let projectors = [projector(1)?, projector(2)?, projector(3)?];
    let short = TokenizedCaptions {
        captions: vec![vec![6, 7]],
        ..tokens()
    };
    let long = TokenizedCaptions {
        captions: vec![vec![3, 4, 5, 6, 7, 8, 9], vec![10], vec![11, 12]],
        ..tokens()
    };
    let batches = [
        AlignmentBatch::new(
            &decoder,
            random_tensor(&[3, 4, d_v], 21, DType::F64)?,
            &tokens(),
        )?,
        AlignmentBatch::new(
            &decoder,
            random_tensor(&[1, 4, d_v], 22, DType::F64)?,
            &short,
        )?,
        AlignmentBatch::new(
            &decoder,
            random_tensor(&[3, 4, d_v], 23, DType::F64)?,
            &long,
        )?,
    ];
    let items: Vec<(&Projector, &AlignmentBatch)> = projectors.iter().zip(&batches).collect();
    let together = loss_and_grads_many(&decoder, &items)?;
    assert_eq!(together.len(), 3);
    for (i, ((projector, batch), joint)) in items.iter().zip(&together).enumerate() {
        let alone = loss_and_grads(&decoder, projector, batch)?;
        assert!((joint.loss - alone.loss).abs() < 1e-12, "batch {i}: loss");
        assert_eq!(joint.tokens, alone.tokens);
        for (g, h) in joint.grads.iter().zip(&alone.grads) {
            let (Some(g), Some(h)) = (g, h) else {
                anyhow::bail!("batch {i}: a missing gradient");
            };
            let (g, h): (Vec<f64>, Vec<f64>) =
                (g.flatten_all()?.to_vec1()?, h.flatten_all()?.to_vec1()?);
            let err = relative_error(&g, &h);
            assert!(err < 1e-10, "batch {i}: relative error {err:.2e}");
            assert!(h.iter().any(|v| *v != 0.0), "batch {i}: a zero gradient");
        }
    }
    let no_prefix = TokenizedCaptions {
        prefix: Vec::new(),
        ..tokens()
    };
    let other = AlignmentBatch::new(
        &decoder,
        random_tensor(&[3, 4, d_v], 24, DType::F64)?,
        &no_prefix,
    )?;
    let refused = loss_and_grads_many(&decoder, &[items[0], (&projectors[1], &other)]);
    assert!(refused.is_err_and(|e| e.to_string().contains("caption layout")));
    Ok(())
}

/// The composed-candle path of every fused kernel (what a GPU or another
/// dtype takes) runs the whole decoder: here in f16 on the CPU, which the
/// fused loops do not take, against the f32 (fused) loss and input
/// gradient.
#[test]
fn the_decoder_runs_on_the_reference_kernels_too() -> Result<()> {
    let fused = tiny_decoder(DecoderConfig::tiny(VOCAB), DType::F32)?;
    let composed = fused.to_dtype(DType::F16)?;
    let (inputs, targets) = input_gradient_case(&fused, DType::F32)?;
    let (loss, grad) = fused.caption_loss_and_input_grad(&inputs, &targets)?;
    let (loss_16, grad_16) =
        composed.caption_loss_and_input_grad(&inputs.to_dtype(DType::F16)?, &targets)?;
    assert!((loss - loss_16).abs() < 2e-2 * loss, "{loss} vs {loss_16}");
    let grad: Vec<f64> = grad.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let grad_16: Vec<f64> = grad_16.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let err = relative_error(&grad_16, &grad);
    assert!(
        err < 3e-2,
        "input gradient, f16 reference path vs f32 fused: {err:.2e}"
    );
    Ok(())
}

#[test]
fn padding_does_not_change_the_loss_of_real_tokens() -> Result<()> {
    let decoder = tiny_decoder(DecoderConfig::tiny(VOCAB), DType::F64)?;
    let projector = Projector::new(
        ProjectorConfig {
            kind: ProjectorKind::Linear,
            input_dim: 6,
            output_dim: 32,
        },
        3,
        DType::F64,
        &Device::Cpu,
    )?;
    let features = random_tensor(&[1, 4, 6], 11, DType::F64)?;
    let alone = TokenizedCaptions {
        separator: Vec::new(),
        prefix: vec![1],
        captions: vec![vec![3, 4]],
        pad_id: 0,
    };
    let loss_alone = caption_loss(
        &decoder,
        &projector,
        &AlignmentBatch::new(&decoder, features.clone(), &alone)?,
    )?;
    // Same sample next to a longer one: it gets padded, the per-token mean
    // over both must equal the weighted mean of the two alone.
    let longer = TokenizedCaptions {
        separator: Vec::new(),
        prefix: vec![1],
        captions: vec![vec![9, 10, 11, 12, 13, 14]],
        pad_id: 0,
    };
    let features2 = random_tensor(&[1, 4, 6], 12, DType::F64)?;
    let loss_longer = caption_loss(
        &decoder,
        &projector,
        &AlignmentBatch::new(&decoder, features2.clone(), &longer)?,
    )?;
    let both = TokenizedCaptions {
        separator: Vec::new(),
        prefix: vec![1],
        captions: vec![vec![3, 4], vec![9, 10, 11, 12, 13, 14]],
        pad_id: 0,
    };
    let loss_both = caption_loss(
        &decoder,
        &projector,
        &AlignmentBatch::new(
            &decoder,
            Tensor::cat(&[features.clone(), features2.clone()], 0)?,
            &both,
        )?,
    )?;
    let expected = (2.0 * loss_alone + 6.0 * loss_longer) / 8.0;
    assert!(
        (loss_both - expected).abs() < 1e-10,
        "{loss_both} vs {expected}"
    );
    // Per-sample scores: each equals its sample alone (-loss x tokens), in
    // batch order, padding or not.
    let batch = AlignmentBatch::new(&decoder, Tensor::cat(&[features, features2], 0)?, &both)?;
    let scores = caption_scores(&decoder, &projector, &batch)?;
    assert_eq!(scores.iter().map(|s| s.tokens).collect::<Vec<_>>(), [2, 6]);
    assert!((scores[0].log_likelihood + 2.0 * loss_alone).abs() < 1e-10);
    assert!((scores[1].log_likelihood + 6.0 * loss_longer).abs() < 1e-10);
    assert!((scores[1].per_token() + loss_longer).abs() < 1e-12);
    Ok(())
}

#[test]
fn adamw_steps_lower_the_loss_on_a_fixed_batch() -> Result<()> {
    let decoder = tiny_decoder(DecoderConfig::tiny(VOCAB), DType::F32)?;
    let projector = Projector::new(
        ProjectorConfig {
            kind: ProjectorKind::Mlp2xGelu,
            input_dim: 6,
            output_dim: 32,
        },
        3,
        DType::F32,
        &Device::Cpu,
    )?;
    let features = random_tensor(&[3, 4, 6], 11, DType::F32)?;
    let batch = AlignmentBatch::new(&decoder, features, &tokens())?;
    let mut optimizer = AdamW::new(projector.vars(), AdamWConfig::default())?;
    let first = caption_loss(&decoder, &projector, &batch)?;
    let mut last = first;
    for _ in 0..20 {
        last = train_step(&decoder, &projector, &mut optimizer, &batch, 1e-2)?.loss;
    }
    let after = caption_loss(&decoder, &projector, &batch)?;
    println!("loss {first:.4} -> {after:.4} (last step {last:.4})");
    assert!(after < first - 0.1, "loss did not fall: {first} -> {after}");
    assert_eq!(optimizer.state().step, 20);
    Ok(())
}

/// One AdamW step from zero moments moves each coordinate by
/// lr * g / (|g| + eps) (bias correction makes m_hat = g, v_hat = g^2), and
/// weight decay shrinks theta by lr * wd * theta first.
#[test]
fn adamw_first_step_matches_closed_form() -> Result<()> {
    let theta = Tensor::new(&[1.0f64, -2.0, 0.5], &Device::Cpu)?;
    let var = candle_core::Var::from_tensor(&theta)?;
    let config = AdamWConfig {
        weight_decay: 0.1,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(vec![var.clone()], config)?;
    let g = Tensor::new(&[0.3f64, -4.0, 1e-3], &Device::Cpu)?;
    opt.step(&[Some(g.clone())], 0.01)?;
    let got: Vec<f64> = var.as_tensor().to_vec1()?;
    let (t, g): (Vec<f64>, Vec<f64>) = (theta.to_vec1()?, g.to_vec1()?);
    for i in 0..3 {
        let expected = t[i] * (1.0 - 0.01 * 0.1) - 0.01 * g[i] / (g[i].abs() + 1e-8);
        assert!(
            (got[i] - expected).abs() < 1e-12,
            "{i}: {} vs {expected}",
            got[i]
        );
    }
    Ok(())
}

fn tiny_bpe_spec() -> GgufBpeSpec {
    GgufBpeSpec::byte_level(
        &["<|endoftext|>", "<|im_start|>"],
        &[("h", "e"), ("l", "l"), ("he", "ll")],
    )
}

#[test]
fn gguf_tokenizer_applies_merges_digits_and_control_tokens() -> Result<()> {
    let spec = tiny_bpe_spec();
    let tok = TextTokenizer::from_gguf_bpe(std::path::Path::new("tiny.gguf"), &spec)?;
    let id = |s: &str| spec.tokens.iter().position(|t| t == s).map(|i| i as u32);
    let hell = id("hell").ok_or_else(|| anyhow::anyhow!("no hell"))?;
    let o = id("o").ok_or_else(|| anyhow::anyhow!("no o"))?;
    assert_eq!(tok.encode("hello")?, vec![hell, o]);
    // Digits are split one by one even where byte-level BPE would not.
    let digits: Vec<u32> = "123".chars().filter_map(|c| id(&c.to_string())).collect();
    assert_eq!(tok.encode("123")?, digits);
    // A control token is one id, never split into bytes.
    assert_eq!(tok.encode("<|im_start|>hello")?, vec![1, hell, o]);
    assert_eq!(tok.decode(&tok.encode("hello 42")?)?, "hello 42");
    Ok(())
}

pub(crate) fn write_hf_folder(
    dir: &std::path::Path,
    config: &DecoderConfig,
    weights: &WeightMap,
) -> Result<()> {
    let json = serde_json::json!({
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_word_embeddings,
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    let tensors: HashMap<String, Tensor> = weights
        .names()
        .into_iter()
        .map(|n| Ok((n.to_string(), weights.get_any(n, "")?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    Ok(())
}

/// The same weights saved as a Hugging Face folder and as a GGUF file (with
/// llama.cpp's q/k row permutation) give the same logits; loading the GGUF
/// without undoing the permutation would not (checked by comparing against
/// a deliberately wrong layout).
#[test]
fn hf_and_gguf_paths_compute_the_same_model() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = DecoderConfig::tiny(tiny_bpe_spec().tokens.len());
    config.tie_word_embeddings = false;
    let weights = random_decoder_weights(&config, 21, &Device::Cpu)?;
    write_hf_folder(dir.path(), &config, &weights)?;
    let gguf_path = dir.path().join("tiny.gguf");
    write_llama_gguf(&gguf_path, &config, &weights, &tiny_bpe_spec())?;

    let hf = load_hf_decoder(dir.path(), &Device::Cpu)?;
    let gguf = load_gguf_decoder(&gguf_path, &Device::Cpu)?;
    assert_eq!(gguf.decoder.config().num_layers, config.num_layers);
    assert!(!gguf.decoder.config().tie_word_embeddings);
    let ids = Tensor::new(&[[1u32, 40, 77, 99, 3, 200, 5]], &Device::Cpu)?;
    let a = hf.logits(&hf.embed_tokens(&ids)?)?;
    let b = gguf.decoder.logits(&gguf.decoder.embed_tokens(&ids)?)?;
    let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 1e-5, "HF vs GGUF logits differ by {diff}");

    // A model whose q/k rows are in the wrong (interleaved) layout differs.
    let mut wrong = weights.clone();
    for i in 0..config.num_layers {
        let name = format!("model.layers.{i}.self_attn.q_proj.weight");
        let q = weights.get_any(&name, "")?;
        let (rows, cols) = q.dims2()?;
        let hd = config.head_dim;
        let permuted = q
            .reshape((config.num_heads, 2, hd / 2, cols))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((rows, cols))?;
        wrong.insert(name, permuted);
    }
    let wrong = FrozenDecoder::from_weights(config.clone(), &wrong)?;
    let c = wrong.logits(&wrong.embed_tokens(&ids)?)?;
    let wrong_diff = (&a - &c)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(
        wrong_diff > 1e-3,
        "the rotary layout made no difference: {wrong_diff}"
    );
    Ok(())
}

/// A byte-level BPE whose BOS and EOS are `<|im_start|>` (1) and
/// `<|im_end|>` (2), next to `<|endoftext|>` (0): the token a guess by name
/// takes for both.
fn chat_bpe_spec() -> GgufBpeSpec {
    let mut spec = GgufBpeSpec::byte_level(
        &["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        &[("h", "e"), ("l", "l"), ("he", "ll"), ("o", "r")],
    );
    spec.bos_id = Some(1);
    spec.eos_id = Some(2);
    spec.pad_id = Some(2);
    spec
}

pub(crate) fn write_json(path: std::path::PathBuf, value: serde_json::Value) -> Result<()> {
    Ok(std::fs::write(path, serde_json::to_string_pretty(&value)?)?)
}

/// Writes the special-token metadata files of a chat model's Hugging Face
/// folder with the ids SmolLM2-135M-Instruct's GGUF declares (ASSETS.md:
/// bos 1, eos 2, pad 2): BOS `<|im_start|>` (1) and EOS `<|im_end|>` (2) in
/// config.json, generation_config.json and tokenizer_config.json (the EOS
/// there in the object form), PAD `<|im_end|>`.
pub(crate) fn write_chat_special_tokens(dir: &std::path::Path) -> Result<()> {
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    config["bos_token_id"] = 1.into();
    config["eos_token_id"] = 2.into();
    write_json(dir.join("config.json"), config)?;
    write_json(
        dir.join("generation_config.json"),
        serde_json::json!({"bos_token_id": 1, "eos_token_id": 2}),
    )?;
    write_json(
        dir.join("tokenizer_config.json"),
        serde_json::json!({"bos_token": "<|im_start|>",
                           "eos_token": {"content": "<|im_end|>", "special": true},
                           "pad_token": "<|im_end|>"}),
    )
}

/// The Hugging Face folder `dir` loads with the special ids of `gguf`
/// (BOS 1, which a guess by name would not give: `<|endoftext|>` is id 0),
/// tokenises `captions` alike, and gives the same caption loss under one
/// random projector.
pub(crate) fn assert_hf_folder_matches_gguf(
    dir: &std::path::Path,
    gguf: &fedcmp_model::llm::gguf::GgufDecoder,
    captions: &[&str],
) -> Result<()> {
    let (hf_decoder, hf_tokenizer) = load_hf_decoder_and_tokenizer(dir, &Device::Cpu)?;
    assert_eq!(hf_tokenizer.token_id("<|endoftext|>"), Some(0));
    assert_eq!(hf_tokenizer.special(), gguf.tokenizer.special());
    assert_eq!(hf_tokenizer.bos_id(), Some(1));
    let template = fedcmp_model::alignment::CaptionTemplate::plain();
    let a = TokenizedCaptions::new(&hf_tokenizer, &template, captions)?;
    let b = TokenizedCaptions::new(&gguf.tokenizer, &template, captions)?;
    assert_eq!(
        (&a.prefix, &a.captions, a.pad_id),
        (&b.prefix, &b.captions, b.pad_id)
    );
    assert_eq!(a.prefix, vec![1]);
    let projector = Projector::new(
        ProjectorConfig {
            kind: ProjectorKind::Mlp2xGelu,
            input_dim: 6,
            output_dim: hf_decoder.config().hidden_size,
        },
        3,
        DType::F32,
        &Device::Cpu,
    )?;
    let features = random_tensor(&[captions.len(), 2, 6], 9, DType::F32)?;
    let loss_hf = caption_loss(
        &hf_decoder,
        &projector,
        &AlignmentBatch::new(&hf_decoder, features.clone(), &a)?,
    )?;
    let loss_gguf = caption_loss(
        &gguf.decoder,
        &projector,
        &AlignmentBatch::new(&gguf.decoder, features, &b)?,
    )?;
    assert!(
        (loss_hf - loss_gguf).abs() < 1e-5 * loss_hf.abs(),
        "HF {loss_hf} vs GGUF {loss_gguf}"
    );
    Ok(())
}

/// One generated model saved as a Hugging Face folder, with the metadata
/// files a real one ships, and as GGUF: the same special ids, hence the
/// same token ids and the same caption loss. The ids are ones a guess by
/// token name gets wrong.
#[test]
fn hf_folder_and_gguf_agree_on_special_tokens_and_loss() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = chat_bpe_spec();
    let config = DecoderConfig::tiny(spec.tokens.len());
    let weights = random_decoder_weights(&config, 5, &Device::Cpu)?;
    write_hf_folder(dir.path(), &config, &weights)?;
    let gguf_path = dir.path().join("tiny.gguf");
    write_llama_gguf(&gguf_path, &config, &weights, &spec)?;
    TextTokenizer::from_gguf_bpe(&gguf_path, &spec)?
        .inner()
        .save(dir.path().join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    write_chat_special_tokens(dir.path())?;
    let gguf = load_gguf_decoder(&gguf_path, &Device::Cpu)?;
    let expected = fedcmp_model::special_tokens::SpecialTokens {
        bos: Some(1),
        eos: Some(2),
        pad: Some(2),
        stop: vec![2],
    };
    assert_eq!(gguf.tokenizer.special(), &expected);
    assert_hf_folder_matches_gguf(dir.path(), &gguf, &["hello world", "or 42 hell"])
}

/// Files that disagree on a special token stop the load, naming each file;
/// a list of EOS ids agrees with an id it holds and adds stop ids; a token
/// that is not in the vocabulary is refused naming the field.
#[test]
fn special_token_metadata_is_checked_across_files() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = chat_bpe_spec();
    let config = DecoderConfig::tiny(spec.tokens.len());
    write_hf_folder(
        dir.path(),
        &config,
        &random_decoder_weights(&config, 1, &Device::Cpu)?,
    )?;
    TextTokenizer::from_gguf_bpe(std::path::Path::new("t"), &spec)?
        .inner()
        .save(dir.path().join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let load = || load_hf_decoder_and_tokenizer(dir.path(), &Device::Cpu);

    write_json(
        dir.path().join("generation_config.json"),
        serde_json::json!({"bos_token_id": 1, "eos_token_id": [2, 0]}),
    )?;
    write_json(
        dir.path().join("tokenizer_config.json"),
        serde_json::json!({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}),
    )?;
    let msg = load().err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("disagree on the BOS token"), "{msg}");
    assert!(
        msg.contains("tokenizer_config.json `bos_token` = \"<|endoftext|>\" (id 0)"),
        "{msg}"
    );
    assert!(
        msg.contains("generation_config.json `bos_token_id` = 1"),
        "{msg}"
    );

    write_json(
        dir.path().join("tokenizer_config.json"),
        serde_json::json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}),
    )?;
    let (_, tokenizer) = load()?;
    assert_eq!(tokenizer.bos_id(), Some(1));
    assert_eq!(tokenizer.eos_id(), Some(2));
    assert_eq!(tokenizer.stop_ids(), &[2, 0]);

    write_json(
        dir.path().join("tokenizer_config.json"),
        serde_json::json!({"eos_token": "<|nope|>"}),
    )?;
    let msg = load().err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("tokenizer_config.json: field `eos_token`") && msg.contains("<|nope|>"),
        "{msg}"
    );

    write_json(
        dir.path().join("tokenizer_config.json"),
        serde_json::json!({}),
    )?;
    write_json(
        dir.path().join("generation_config.json"),
        serde_json::json!({"eos_token_id": 1_000_000}),
    )?;
    let msg = load().err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("outside the vocabulary"), "{msg}");
    Ok(())
}

#[test]
fn loader_errors_name_the_file_and_tensor() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = DecoderConfig::tiny(VOCAB);
    let mut weights = random_decoder_weights(&config, 1, &Device::Cpu)?;
    weights.remove("model.layers.1.mlp.up_proj.weight");
    write_hf_folder(dir.path(), &config, &weights)?;
    let err = load_hf_decoder(dir.path(), &Device::Cpu)
        .err()
        .ok_or_else(|| anyhow::anyhow!("a missing tensor loaded"))?;
    let msg = err.to_string();
    assert!(msg.contains("model.layers.1.mlp.up_proj.weight"), "{msg}");
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");

    let mut weights = random_decoder_weights(&config, 1, &Device::Cpu)?;
    weights.insert(
        "model.norm.weight",
        Tensor::zeros(config.hidden_size + 1, DType::F32, &Device::Cpu)?,
    );
    write_hf_folder(dir.path(), &config, &weights)?;
    match load_hf_decoder(dir.path(), &Device::Cpu) {
        Err(ModelError::ShapeMismatch {
            name,
            expected,
            got,
            ..
        }) => {
            assert_eq!(name, "model.norm.weight");
            assert_eq!(expected, vec![config.hidden_size]);
            assert_eq!(got, vec![config.hidden_size + 1]);
        }
        other => anyhow::bail!("expected a shape mismatch, got {other:?}"),
    }

    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "gpt_neox"}"#,
    )?;
    match load_hf_decoder(dir.path(), &Device::Cpu) {
        Err(ModelError::UnsupportedArchitecture { arch, path, .. }) => {
            assert_eq!(arch, "gpt_neox");
            assert!(path.ends_with("config.json"));
        }
        other => anyhow::bail!("expected unsupported architecture, got {other:?}"),
    }
    Ok(())
}

/// A tokenizer with more tokens than the model's embedding has rows would
/// index past the embedding: the loader refuses it, naming tokenizer.json.
#[test]
fn tokenizer_larger_than_the_embedding_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = DecoderConfig::tiny(VOCAB);
    write_hf_folder(
        dir.path(),
        &config,
        &random_decoder_weights(&config, 1, &Device::Cpu)?,
    )?;
    let spec = tiny_bpe_spec();
    assert!(spec.tokens.len() > VOCAB);
    let tok = TextTokenizer::from_gguf_bpe(std::path::Path::new("tiny"), &spec)?;
    tok.inner()
        .save(dir.path().join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    match load_hf_decoder_and_tokenizer(dir.path(), &Device::Cpu) {
        Err(ModelError::VocabMismatch {
            path,
            tokenizer,
            model,
        }) => {
            assert!(path.ends_with("tokenizer.json"));
            assert_eq!((tokenizer, model), (spec.tokens.len(), VOCAB));
        }
        other => anyhow::bail!("expected a vocabulary mismatch, got {other:?}"),
    }
    Ok(())
}

/// Pooling 4x4 patches to 4 tokens averages each 2x2 block of the
/// row-major grid; to 1 token, all 16; to 16, nothing.
#[test]
fn pooling_averages_grid_blocks() -> Result<()> {
    // Patch (r, c) carries (r*4 + c, -(r*4 + c)).
    let data: Vec<f64> = (0..16).flat_map(|i| [i as f64, -(i as f64)]).collect();
    let features = Tensor::from_vec(data, (1, 16, 2), &Device::Cpu)?;
    let pooled = fedcmp_model::vision::pool_grid(&features, 4)?;
    assert_eq!(pooled.dims(), &[1, 4, 2]);
    let got: Vec<f64> = pooled.flatten_all()?.to_vec1()?;
    // Block (0,0) = patches 0, 1, 4, 5 -> mean 2.5; (0,1) = 2, 3, 6, 7 -> 4.5 ...
    assert_eq!(got, vec![2.5, -2.5, 4.5, -4.5, 10.5, -10.5, 12.5, -12.5]);
    let one: Vec<f64> = fedcmp_model::vision::pool_grid(&features, 1)?
        .flatten_all()?
        .to_vec1()?;
    assert_eq!(one, vec![7.5, -7.5]);
    let all = fedcmp_model::vision::pool_grid(&features, 16)?;
    assert_eq!(
        all.flatten_all()?.to_vec1::<f64>()?,
        features.flatten_all()?.to_vec1::<f64>()?
    );
    for bad in [3, 9, 0] {
        assert!(
            fedcmp_model::vision::pool_grid(&features, bad).is_err(),
            "{bad}"
        );
    }
    Ok(())
}

/// Feeding a sequence to the decoder in pieces through the KV cache gives
/// the logits of one full forward pass (f64: to rounding).
#[test]
fn kv_cached_logits_equal_the_full_forward() -> Result<()> {
    let decoder = tiny_decoder(DecoderConfig::tiny(VOCAB), DType::F64)?;
    let d = decoder.config().hidden_size;
    let embeds = random_tensor(&[2, 9, d], 11, DType::F64)?;
    let full: Vec<f64> = decoder.logits(&embeds)?.flatten_all()?.to_vec1()?;
    let mut cache = KvCache::default();
    let mut pieces = Vec::new();
    for (start, len) in [(0, 5), (5, 1), (6, 1), (7, 2)] {
        pieces.push(decoder.logits_cached(&embeds.narrow(1, start, len)?, &mut cache)?);
    }
    assert_eq!(cache.len(), 9);
    let cached: Vec<f64> = Tensor::cat(&pieces, 1)?.flatten_all()?.to_vec1()?;
    assert!(
        relative_error(&cached, &full) < 1e-12,
        "{}",
        relative_error(&cached, &full)
    );
    Ok(())
}

/// With a separator, caption scores are the log-probabilities of the
/// caption tokens in the sequence [prefix, visual, separator, caption],
/// read off a plain forward pass.
#[test]
fn caption_scores_follow_the_layout_with_a_separator() -> Result<()> {
    let decoder = tiny_decoder(DecoderConfig::tiny(VOCAB), DType::F64)?;
    let d = decoder.config().hidden_size;
    let projector = Projector::new(
        ProjectorConfig {
            kind: ProjectorKind::Linear,
            input_dim: 6,
            output_dim: d,
        },
        4,
        DType::F64,
        &Device::Cpu,
    )?;
    let tokens = tokens();
    let features = random_tensor(&[3, 4, 6], 5, DType::F64)?;
    let batch = AlignmentBatch::new(&decoder, features.clone(), &tokens)?;
    let scores = caption_scores(&decoder, &projector, &batch)?;
    for (row, ids) in tokens.captions.iter().enumerate() {
        let embed = |ids: &[u32]| -> Result<Tensor> {
            Ok(decoder.embed_tokens(&Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?)?)
        };
        let visual = projector.forward(&features.narrow(0, row, 1)?)?;
        let seq = Tensor::cat(
            &[
                embed(&tokens.prefix)?,
                visual,
                embed(&tokens.separator)?,
                embed(ids)?,
            ],
            1,
        )?;
        let log_probs = candle_nn::ops::log_softmax(&decoder.logits(&seq)?.squeeze(0)?, 1)?;
        let start = tokens.prefix.len() + 4 + tokens.separator.len();
        let mut expected = 0.0;
        for (j, &id) in ids.iter().enumerate() {
            let lp: f64 = log_probs
                .get(start + j - 1)?
                .get(id as usize)?
                .to_scalar()?;
            expected += lp;
        }
        let got = scores[row].log_likelihood;
        assert!(
            (got - expected).abs() < 1e-9,
            "row {row}: {got} vs {expected}"
        );
        assert_eq!(scores[row].tokens, ids.len());
    }
    Ok(())
}

/// A tiny decoder, a projector and one image's features (4 patches) to
/// caption, in `dtype`.
fn caption_case(dtype: DType) -> Result<(FrozenDecoder, Projector, Tensor)> {
    let decoder = tiny_decoder(DecoderConfig::tiny(VOCAB), dtype)?;
    let projector = Projector::new(
        ProjectorConfig {
            kind: ProjectorKind::Mlp2xGelu,
            input_dim: 6,
            output_dim: decoder.config().hidden_size,
        },
        8,
        dtype,
        &Device::Cpu,
    )?;
    let features = random_tensor(&[1, 4, 6], 9, dtype)?;
    Ok((decoder, projector, features))
}

/// Greedy decoding with the KV cache picks the tokens that recomputing
/// the whole sequence for every token picks.
#[test]
fn greedy_decoding_with_the_cache_matches_recomputing() -> Result<()> {
    let (decoder, projector, features) = caption_case(DType::F32)?;
    let (prefix, separator) = ([1u32, 5], [2u32]);
    let prompt = CaptionPrompt {
        prefix: &prefix,
        separator: &separator,
        stop_ids: &[],
        max_new_tokens: 12,
    };
    let got = generate_caption(&decoder, &projector, &features, &prompt)?;
    let embed = |ids: &[u32]| -> Result<Tensor> {
        Ok(decoder.embed_tokens(&Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?)?)
    };
    let mut seq = Tensor::cat(
        &[
            embed(&prefix)?,
            projector.forward(&features)?,
            embed(&separator)?,
        ],
        1,
    )?;
    let mut expected = Vec::new();
    for _ in 0..12 {
        let logits = decoder.logits(&seq)?;
        let t = logits.dims()[1];
        let next = logits
            .narrow(1, t - 1, 1)?
            .flatten_all()?
            .argmax(0)?
            .to_scalar::<u32>()?;
        expected.push(next);
        seq = Tensor::cat(&[seq, embed(&[next])?], 1)?;
    }
    assert_eq!(got, expected);
    Ok(())
}

/// Captions decoded for many images together (one batch, rows leaving it
/// as their captions stop) are the captions each image gets alone; stop
/// tokens are picked from the unconstrained captions so that captions
/// end at different steps.
#[test]
fn batched_greedy_captions_equal_decoding_each_image_alone() -> Result<()> {
    let (decoder, projector, _) = caption_case(DType::F32)?;
    // Large features: the images, not the tiny decoder's habits, steer
    // the captions.
    let features = (random_tensor(&[6, 4, 6], 13, DType::F32)? * 40.0)?;
    let (prefix, separator) = ([1u32, 5], [2u32]);
    fn prompt<'a>(
        prefix: &'a [u32],
        separator: &'a [u32],
        stop_ids: &'a [u32],
    ) -> CaptionPrompt<'a> {
        CaptionPrompt {
            prefix,
            separator,
            stop_ids,
            max_new_tokens: 10,
        }
    }
    let alone = |stops: &[u32]| -> Result<Vec<Vec<u32>>> {
        (0..6)
            .map(|i| {
                Ok(generate_caption(
                    &decoder,
                    &projector,
                    &features.narrow(0, i, 1)?,
                    &prompt(&prefix, &separator, stops),
                )?)
            })
            .collect()
    };
    let free = alone(&[])?;
    assert_eq!(
        generate_captions(
            &decoder,
            &projector,
            &features,
            &prompt(&prefix, &separator, &[])
        )?,
        free
    );
    let stops = [free[0][2], free[1][5], free[3][0]];
    let expected = alone(&stops)?;
    let lengths: std::collections::BTreeSet<usize> = expected.iter().map(Vec::len).collect();
    assert!(lengths.len() > 2, "caption lengths {lengths:?}");
    let got = generate_captions(
        &decoder,
        &projector,
        &features,
        &prompt(&prefix, &separator, &stops),
    )?;
    assert_eq!(got, expected);
    let none = generate_captions(
        &decoder,
        &projector,
        &features.narrow(0, 0, 0)?,
        &prompt(&prefix, &separator, &stops),
    )?;
    assert!(none.is_empty());
    Ok(())
}

/// Continuations scored after shared contexts (one pass over each context,
/// its cache repeated) equal the log-probabilities read off a plain
/// forward pass over context + continuation.
#[test]
fn continuation_scores_equal_the_plain_forward() -> Result<()> {
    let decoder = tiny_decoder(DecoderConfig::tiny(VOCAB), DType::F64)?;
    let d = decoder.config().hidden_size;
    let contexts = random_tensor(&[2, 5, d], 21, DType::F64)?;
    let continuations = vec![vec![3u32, 9, 4], vec![7u32], vec![11u32, 2]];
    let got = fedcmp_model::alignment::continuation_scores(&decoder, &contexts, &continuations, 0)?;
    assert_eq!((got.len(), got[0].len()), (2, 3));
    for (b, row) in got.iter().enumerate() {
        for (k, ids) in continuations.iter().enumerate() {
            let tokens =
                decoder.embed_tokens(&Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?)?;
            let seq = Tensor::cat(&[contexts.narrow(0, b, 1)?, tokens], 1)?;
            let lp = candle_nn::ops::log_softmax(&decoder.logits(&seq)?.squeeze(0)?, 1)?;
            let mut expected = 0.0;
            for (j, &id) in ids.iter().enumerate() {
                let v: f64 = lp.get(5 + j - 1)?.get(id as usize)?.to_scalar()?;
                expected += v;
            }
            assert!(
                (row[k] - expected).abs() < 1e-5,
                "context {b}, continuation {k}: {} vs {expected}",
                row[k]
            );
        }
    }
    assert!(
        fedcmp_model::alignment::continuation_scores(&decoder, &contexts, &[vec![]], 0).is_err()
    );
    Ok(())
}

/// Beam search against exhaustive search over every caption of at most two
/// tokens (each scored by a full forward pass, no cache): with a width of
/// the whole vocabulary it finds the best length-normalised caption; with
/// width 3, a caption whose reported log-probability is its true one and
/// whose score is at most the best.
#[test]
fn beam_search_matches_exhaustive_search_over_short_captions() -> Result<()> {
    let (decoder, projector, features) = caption_case(DType::F64)?;
    let (prefix, separator) = ([1u32, 5], [2u32]);
    let embed = |ids: &[u32]| -> Result<Tensor> {
        Ok(decoder.embed_tokens(&Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?)?)
    };
    let context = Tensor::cat(
        &[
            embed(&prefix)?,
            projector.forward(&features)?,
            embed(&separator)?,
        ],
        1,
    )?;
    let next_log_probs = |seq: &Tensor| -> Result<Vec<f64>> {
        let logits = decoder.logits(seq)?;
        let t = logits.dims()[1];
        Ok(
            candle_nn::ops::log_softmax(&logits.narrow(1, t - 1, 1)?.flatten_all()?, 0)?
                .to_vec1()?,
        )
    };
    // Two stop tokens: the third and the eighth likeliest first token, so
    // that stopping early is a contender but not a sure winner.
    let first = next_log_probs(&context)?;
    let mut order: Vec<usize> = (0..first.len()).collect();
    order.sort_by(|&a, &b| first[b].total_cmp(&first[a]));
    let stops = [order[2] as u32, order[7] as u32];
    // Every caption: (tokens, log-probability, scored tokens).
    let mut all: Vec<(Vec<u32>, f64, usize)> = Vec::new();
    for a in 0..first.len() as u32 {
        if stops.contains(&a) {
            all.push((vec![], first[a as usize], 1));
            continue;
        }
        let second = next_log_probs(&Tensor::cat(&[context.clone(), embed(&[a])?], 1)?)?;
        for b in 0..second.len() as u32 {
            let lp = first[a as usize] + second[b as usize];
            if stops.contains(&b) {
                all.push((vec![a], lp, 2));
            } else {
                all.push((vec![a, b], lp, 2));
            }
        }
    }
    let score = |c: &(Vec<u32>, f64, usize)| c.1 / c.2 as f64;
    let best = all
        .iter()
        .max_by(|x, y| score(x).total_cmp(&score(y)))
        .ok_or_else(|| anyhow::anyhow!("no caption"))?;

    let search = |width: usize| {
        let prompt = CaptionPrompt {
            prefix: &prefix,
            separator: &separator,
            stop_ids: &stops,
            max_new_tokens: 2,
        };
        beam_search_caption(&decoder, &projector, &features, &prompt, width)
    };
    let wide = search(VOCAB)?;
    assert_eq!(wide.ids, best.0);
    assert_eq!(
        wide.ids.len(),
        2,
        "the best caption here runs to the length limit"
    );
    assert!(
        (wide.score() - score(best)).abs() < 1e-5,
        "{} vs {}",
        wide.score(),
        score(best)
    );

    // Its log-probability is that of one caption with its tokens (captions
    // that stop at different stop tokens share their tokens).
    let narrow = search(3)?;
    let closest = all
        .iter()
        .filter(|c| c.0 == narrow.ids && c.2 == narrow.scored)
        .map(|c| (c.1 - narrow.log_prob).abs())
        .fold(f64::INFINITY, f64::min);
    assert!(closest < 1e-5, "{narrow:?}: off by {closest}");
    assert!(narrow.score() <= score(best) + 1e-6);
    Ok(())
}

/// The decoder's forward and backward and the whole alignment step give the
/// same loss and gradients whether the products run on the loaded BLAS or
/// on candle's kernels (to float rounding), and so do greedy captions
/// (through the KV cache).
#[test]
fn the_decoder_and_the_alignment_step_agree_on_a_blas() -> Result<()> {
    use fedcmp_model::llm::kernels::blas::with_candle_kernels;
    if !fedcmp_testkit::blas_for_tests()? {
        return Ok(());
    }
    let decoder = tiny_decoder(DecoderConfig::tiny(VOCAB), DType::F32)?;
    let (inputs, targets) = input_gradient_case(&decoder, DType::F32)?;
    let (loss, grad) = decoder.caption_loss_and_input_grad(&inputs, &targets)?;
    let (loss_c, grad_c) =
        with_candle_kernels(|| decoder.caption_loss_and_input_grad(&inputs, &targets))?;
    assert!(
        (loss - loss_c).abs() < 1e-5 * loss_c.abs(),
        "{loss} vs {loss_c}"
    );
    let as_f64 =
        |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?) };
    let err = relative_error(&as_f64(&grad)?, &as_f64(&grad_c)?);
    assert!(err < 1e-4, "input gradient, BLAS vs candle: {err:.2e}");

    let projector = Projector::new(
        ProjectorConfig {
            kind: ProjectorKind::Mlp2xGelu,
            input_dim: 6,
            output_dim: decoder.config().hidden_size,
        },
        3,
        DType::F32,
        &Device::Cpu,
    )?;
    let features = random_tensor(&[3, 4, 6], 11, DType::F32)?;
    let batch = AlignmentBatch::new(&decoder, features.clone(), &tokens())?;
    let step = loss_and_grads(&decoder, &projector, &batch)?;
    let step_c = with_candle_kernels(|| loss_and_grads(&decoder, &projector, &batch))?;
    assert!((step.loss - step_c.loss).abs() < 1e-5 * step_c.loss);
    for ((name, _), (g, g_c)) in projector
        .named_params()
        .iter()
        .zip(step.grads.iter().zip(&step_c.grads))
    {
        let (Some(g), Some(g_c)) = (g, g_c) else {
            anyhow::bail!("{name}: no gradient");
        };
        let err = relative_error(&as_f64(g)?, &as_f64(g_c)?);
        assert!(err < 1e-4, "{name}: BLAS vs candle {err:.2e}");
    }

    let prompt = CaptionPrompt {
        prefix: &[1, 5],
        separator: &[2],
        stop_ids: &[],
        max_new_tokens: 6,
    };
    let loud = (features * 40.0)?;
    assert_eq!(
        generate_captions(&decoder, &projector, &loud, &prompt)?,
        with_candle_kernels(|| generate_captions(&decoder, &projector, &loud, &prompt))?
    );
    Ok(())
}
