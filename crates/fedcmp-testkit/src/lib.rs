//! Fixtures for the workspace's tests: everything is generated here, so
//! no test needs a network, a GPU or downloaded weights.
//!
//! - [`tiny_backbones`]: a 2-layer decoder of width 32 with random weights
//!   and a byte-level tokenizer;
//! - [`grey_record`]: small grey in-memory images as records;
//! - [`tiny_world`]: the same decoder as a GGUF file, 48 PNG images in two
//!   domains (bright/dark "sky" images captioned by class, and unlabelled
//!   "stripes") behind a JSONL manifest, and a two-client scenario file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use candle_core::Device;
use fedcmp_data::record::{ImageSource, RawImage, Record};
use fedcmp_model::llm::config::DecoderConfig;
use fedcmp_model::llm::decoder::FrozenDecoder;
use fedcmp_model::llm::gguf::write_llama_gguf;
use fedcmp_model::llm::synthetic::random_decoder_weights;
use fedcmp_model::tokenizer::{GgufBpeSpec, TextTokenizer};

fn tiny_spec() -> GgufBpeSpec {
    GgufBpeSpec::byte_level(&["<|endoftext|>", "<|bos|>"], &[])
}

/// A 2-layer decoder of width 32 with random weights (seed 3) and a
/// byte-level tokenizer.
pub fn tiny_backbones() -> Result<(FrozenDecoder, TextTokenizer)> {
    let spec = tiny_spec();
    let tokenizer = TextTokenizer::from_gguf_bpe(Path::new("tiny"), &spec)?;
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

/// A generated world on disk.
#[derive(Debug, Clone)]
pub struct TinyWorld {
    /// The tiny decoder as a GGUF file.
    pub gguf: PathBuf,
    /// A two-client iid scenario over the manifest.
    pub scenario: PathBuf,
}

/// Writes [`TinyWorld`] under `dir`: 32 "sky" images (day: bright, night:
/// dark, captioned and labelled by class) and 16 unlabelled "stripes".
pub fn tiny_world(dir: &Path) -> Result<TinyWorld> {
    let spec = tiny_spec();
    let config = DecoderConfig::tiny(spec.tokens.len());
    let weights = random_decoder_weights(&config, 3, &Device::Cpu)?;
    let gguf = dir.join("tiny.gguf");
    write_llama_gguf(&gguf, &config, &weights, &spec)?;

    let images = dir.join("images");
    std::fs::create_dir_all(&images)?;
    let mut lines = String::new();
    for i in 0..48u32 {
        let (source, label, caption, base) = if i < 32 {
            let day = i % 2 == 0;
            (
                "sky",
                Some(if day { "day" } else { "night" }),
                if day { "day." } else { "night." },
                if day { 210u8 } else { 30 },
            )
        } else {
            ("stripes", None, "stripes.", 120u8)
        };
        let img = image::GrayImage::from_fn(8, 8, |x, y| {
            let stripe = if source == "stripes" && x % 2 == 0 {
                60
            } else {
                0
            };
            image::Luma([base
                .wrapping_add(((x + y + i) % 7) as u8)
                .wrapping_add(stripe)])
        });
        let file = format!("{i}.png");
        img.save(images.join(&file))?;
        let label = label.map_or(String::new(), |l| format!(r#", "label": "{l}""#));
        lines.push_str(&format!(
            r#"{{"image": "images/{file}", "caption": "{caption}", "source": "{source}"{label}}}"#
        ));
        lines.push('\n');
    }
    std::fs::write(dir.join("tiny.jsonl"), lines)?;
    let scenario = dir.join("tiny.toml");
    std::fs::write(
        &scenario,
        r#"name = "tiny"
description = "two clients, two domains, generated"
seed = 0
clients = 2
sources = [{ kind = "jsonl", path = "tiny.jsonl" }]
split = { validation = 0.15, test = 0.25 }
partition = { kind = "iid" }
"#,
    )?;
    Ok(TinyWorld { gguf, scenario })
}

/// A feature key that no other cache holds (encoded in a cache of its own
/// under a fresh folder): a client whose samples carry it fails every round
/// it trains, as a site with a corrupt feature store would.
pub fn missing_feature_key() -> Result<fedcmp_data::cache::FeatureKey> {
    use fedcmp_data::cache::FeatureCache;
    use fedcmp_data::preprocess::Preprocess;
    use fedcmp_model::vision::patch_means::PatchMeans;
    let dir = std::env::temp_dir().join(format!(
        "fedcmp-missing-key-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let encoder = PatchMeans::new(8)?;
    let mut cache = FeatureCache::open(&dir, &encoder, Preprocess::square(8, [0.5; 3], [0.25; 3]))?;
    let record = grey_record(99, 90, "elsewhere", None, "other");
    let report = cache.ensure(&[record], &encoder, 1, &mut |_| {})?;
    let _ = std::fs::remove_dir_all(&dir);
    report
        .keys
        .into_iter()
        .flatten()
        .next()
        .ok_or_else(|| anyhow::anyhow!("the stand-in image was not encoded"))
}

/// Opens the optimised BLAS for the tests that compare it with candle's
/// kernels: the library `FEDCMP_BLAS` names, else a system OpenBLAS or BLIS.
/// `Ok(false)`, after a line saying the BLAS half is skipped, when there is
/// none, unless `FEDCMP_REQUIRE_BLAS=1` (set by `scripts/test.sh`, which
/// provides one) makes that a failure.
pub fn blas_for_tests() -> Result<bool> {
    use fedcmp_model::llm::kernels::blas::{self, BlasSource, BlasStatus};
    let status = blas::load(&BlasSource::from_env(None))?;
    if let BlasStatus::Loaded { .. } = status {
        return Ok(true);
    }
    if std::env::var_os("FEDCMP_REQUIRE_BLAS").is_some_and(|v| v == "1") {
        anyhow::bail!("FEDCMP_REQUIRE_BLAS=1, but {status}");
    }
    eprintln!("the BLAS half of this test is skipped: {status}");
    Ok(false)
}
