//! The held-out evaluation of a projector (ALGORITHMS.md §6-7.2), on fixed
//! subsets chosen once per suite so that every method is scored on the
//! same images and captions:
//!
//! - caption NLL per token and perplexity per domain (token-weighted within
//!   a domain) and their macro average over domains (macro perplexity =
//!   `exp(macro NLL)`), on every held-out item;
//! - zero-shot classification where a domain has labels, calibrated
//!   against each prompt's prior: every chosen image is scored against one
//!   prompt per class (the domain's first caption template with the
//!   class's first name, fixed in advance) by
//!   `log p(prompt_c | image) - log p(prompt_c | no image)`, where "no
//!   image" is the mean visual token of a fixed set of validation images
//!   under the same projector; the prediction is the best class (first on
//!   ties). The uncalibrated accuracy (likelihood alone) is reported too;
//! - captions that name the class: a greedy caption (decoded with a KV
//!   cache) names the class whose first name it contains (the longest such
//!   name when several do); the share of checked images whose caption
//!   names their own class. A few of these captions are kept for people
//!   to read.
//!
//! Retrieval between images and their own captions is not measured: with
//! template captions many images share a caption, so it would score
//! phrasing, not content (§7.2).
//!
//! Every per-item result is kept ([`DomainItems`]), so that comparisons can
//! resample test items (paired bootstrap). Scoring reuses the feature
//! cache (no encoder pass) and batches pairs. Recovery relative to init
//! and centralized needs several runs and is computed by the report
//! ([`recovery`]).

use candle_core::Tensor;
use fedcmp_data::cache::{FeatureCache, FeatureKey};
use fedcmp_model::alignment::{
    caption_scores, caption_scores_given_visual, continuation_scores, decode_caption,
    generate_captions, AlignmentBatch, CaptionPrompt, CaptionScore, CaptionTemplate, Decoding,
    TokenizedCaptions,
};
use fedcmp_model::llm::decoder::FrozenDecoder;
use fedcmp_model::projector::Projector;
use fedcmp_model::tokenizer::TextTokenizer;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::client::Sample;
use crate::{Result, RuntimeError};

/// One evaluation domain (a data source).
#[derive(Debug, Clone, PartialEq)]
pub struct Domain {
    pub name: String,
    /// Each class's first name, by label index (empty: no labels).
    pub class_names: Vec<String>,
    /// One zero-shot prompt per class, by label index; empty when the
    /// domain has no labels.
    pub class_prompts: Vec<String>,
}

/// One held-out image with its reference caption.
#[derive(Debug, Clone)]
pub struct Item {
    /// The record id (for people: caption examples name it).
    pub id: String,
    pub sample: Sample,
    /// Index into the suite's domains.
    pub domain: usize,
    pub label: Option<u32>,
}

/// Sizes of the fixed subsets (knobs for bigger machines).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SuiteConfig {
    /// Labelled images per domain scored against every class prompt.
    pub zero_shot_per_domain: usize,
    /// Labelled images per domain captioned greedily and checked for
    /// their class's name.
    pub caption_checks: usize,
    /// Of those, captions kept for people to read, round-robin over the
    /// domains.
    pub caption_examples: usize,
    /// Validation images whose mean visual token stands for "no image".
    pub calibration_images: usize,
    /// Longest generated caption, in tokens.
    pub max_caption_tokens: usize,
    /// Pairs scored per forward pass.
    pub batch_size: usize,
    /// Seed of the subset choice.
    pub seed: u64,
}

impl Default for SuiteConfig {
    fn default() -> Self {
        Self {
            zero_shot_per_domain: 100,
            caption_checks: 20,
            caption_examples: 4,
            calibration_images: 64,
            max_caption_tokens: 20,
            batch_size: 32,
            seed: 0,
        }
    }
}

/// The items and the fixed subsets every projector is scored on.
#[derive(Debug, Clone)]
pub struct Suite {
    pub domains: Vec<Domain>,
    pub items: Vec<Item>,
    /// Per domain: item indices for zero-shot classification.
    pub zero_shot: Vec<Vec<usize>>,
    /// Per domain: item indices captioned greedily (and, where the domain
    /// has classes, checked for the class they name).
    pub checks: Vec<Vec<usize>>,
    /// Item indices (among the checks) whose captions are kept.
    pub examples: Vec<usize>,
    /// Validation images for the "no image" reference.
    pub calibration: Vec<FeatureKey>,
    pub config: SuiteConfig,
}

impl Suite {
    /// Validates the items against the domains and draws the subsets (a
    /// seeded shuffle of each domain's labelled items, then the first
    /// ones); `calibration` are validation images (the first
    /// `calibration_images` are used).
    pub fn new(
        domains: Vec<Domain>,
        items: Vec<Item>,
        calibration: Vec<FeatureKey>,
        config: SuiteConfig,
    ) -> Result<Self> {
        if config.batch_size == 0 {
            return Err(RuntimeError::Config(
                "evaluation batch-size must be positive".into(),
            ));
        }
        let mut per_domain = vec![Vec::new(); domains.len()];
        for (i, item) in items.iter().enumerate() {
            let Some(domain) = domains.get(item.domain) else {
                return Err(RuntimeError::Config(format!(
                    "held-out item {} names domain {} of {}",
                    item.id,
                    item.domain,
                    domains.len()
                )));
            };
            if domain.class_names.len() != domain.class_prompts.len() {
                return Err(RuntimeError::Config(format!(
                    "domain {} has {} class names and {} prompts",
                    domain.name,
                    domain.class_names.len(),
                    domain.class_prompts.len()
                )));
            }
            if let Some(label) = item.label {
                if !domain.class_prompts.is_empty() && label as usize >= domain.class_prompts.len()
                {
                    return Err(RuntimeError::Config(format!(
                        "held-out item {} has label {label}, domain {} has {} classes",
                        item.id,
                        domain.name,
                        domain.class_prompts.len()
                    )));
                }
            }
            per_domain[item.domain].push(i);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        for list in &mut per_domain {
            list.shuffle(&mut rng);
        }
        // Labelled items where the domain has classes; any item otherwise
        // (or nothing, for zero-shot).
        let subset = |take: usize, unlabelled_too: bool| -> Vec<Vec<usize>> {
            per_domain
                .iter()
                .zip(&domains)
                .map(|(list, d)| {
                    if d.class_prompts.is_empty() {
                        let take = if unlabelled_too { take } else { 0 };
                        return list.iter().copied().take(take).collect();
                    }
                    list.iter()
                        .copied()
                        .filter(|&i| items[i].label.is_some())
                        .take(take)
                        .collect()
                })
                .collect()
        };
        let zero_shot = subset(config.zero_shot_per_domain, false);
        let checks = subset(config.caption_checks, true);
        let mut examples = Vec::new();
        let mut round = 0;
        while examples.len() < config.caption_examples {
            let before = examples.len();
            for list in &checks {
                if examples.len() < config.caption_examples {
                    if let Some(&i) = list.get(round) {
                        examples.push(i);
                    }
                }
            }
            if examples.len() == before {
                break;
            }
            round += 1;
        }
        let mut calibration = calibration;
        calibration.truncate(config.calibration_images);
        Ok(Self {
            domains,
            items,
            zero_shot,
            checks,
            examples,
            calibration,
            config,
        })
    }

    /// The same items with only the NLL part (no zero-shot or captions):
    /// for scoring many projectors cheaply.
    pub fn nll_only(&self) -> Suite {
        Suite {
            domains: self.domains.clone(),
            items: self.items.clone(),
            zero_shot: vec![Vec::new(); self.domains.len()],
            checks: vec![Vec::new(); self.domains.len()],
            examples: Vec::new(),
            calibration: Vec::new(),
            config: self.config,
        }
    }

    /// Caption pairs and captions the evaluation scores (for progress bars).
    pub fn num_pairs(&self) -> usize {
        let zero_shot: usize = self
            .zero_shot
            .iter()
            .zip(&self.domains)
            .map(|(z, d)| z.len() * d.class_prompts.len())
            .sum();
        let checks: usize = self.checks.iter().map(Vec::len).sum();
        self.items.len() + zero_shot + checks
    }
}

/// JSON has no NaN or infinity: they are written as `null` and read back
/// as NaN (a domain without test items has no NLL).
pub mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &f64, s: S) -> Result<S::Ok, S::Error> {
        if value.is_finite() {
            s.serialize_f64(*value)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// Every item's result in one domain, in the suite's order: what a paired
/// bootstrap resamples.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DomainItems {
    /// Each held-out item's caption log-likelihood and scored tokens.
    pub log_likelihood: Vec<f64>,
    pub tokens: Vec<u32>,
    /// Each zero-shot image: calibrated prediction right.
    pub zero_shot: Vec<bool>,
    /// Each checked image: its greedy caption names its class.
    pub caption: Vec<bool>,
}

/// One domain's scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainScores {
    pub domain: String,
    pub samples: usize,
    pub tokens: usize,
    #[serde(with = "nan_as_null")]
    pub nll: f64,
    #[serde(with = "nan_as_null")]
    pub perplexity: f64,
    /// Calibrated zero-shot accuracy, where the domain has labels.
    pub zero_shot_accuracy: Option<f64>,
    /// Zero-shot accuracy by likelihood alone (no calibration).
    pub zero_shot_raw_accuracy: Option<f64>,
    pub zero_shot_images: usize,
    pub classes: usize,
    /// Share of checked captions that name the image's class.
    pub caption_accuracy: Option<f64>,
    pub caption_checks: usize,
    /// Per-item results (empty in averaged reports).
    #[serde(default)]
    pub items: DomainItems,
}

/// A greedy caption next to its reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptionExample {
    pub id: String,
    pub domain: String,
    pub reference: String,
    pub generated: String,
}

/// Everything [`evaluate`] measures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteReport {
    pub domains: Vec<DomainScores>,
    #[serde(with = "nan_as_null")]
    pub macro_nll: f64,
    #[serde(with = "nan_as_null")]
    pub macro_perplexity: f64,
    /// Means over the domains with labels.
    pub macro_zero_shot_accuracy: Option<f64>,
    pub macro_zero_shot_raw_accuracy: Option<f64>,
    pub macro_caption_accuracy: Option<f64>,
    /// Chance level of zero-shot: the mean over labelled domains of one
    /// over the number of classes.
    pub chance: Option<f64>,
    pub captions: Vec<CaptionExample>,
}

/// The frozen parts every score needs.
#[derive(Debug, Clone, Copy)]
pub struct Scorer<'a> {
    pub decoder: &'a FrozenDecoder,
    pub tokenizer: &'a TextTokenizer,
    pub template: &'a CaptionTemplate,
    pub cache: &'a FeatureCache,
}

impl Scorer<'_> {
    /// The log-likelihood of each `(image, caption)` pair, `batch` pairs per
    /// forward pass; `done(n)` after each batch.
    pub fn score_pairs(
        &self,
        projector: &Projector,
        pairs: &[(&FeatureKey, &str)],
        batch: usize,
        done: &mut dyn FnMut(usize),
    ) -> Result<Vec<CaptionScore>> {
        let mut out = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(batch.max(1)) {
            let keys: Vec<&FeatureKey> = chunk.iter().map(|(k, _)| *k).collect();
            let captions: Vec<&str> = chunk.iter().map(|(_, c)| *c).collect();
            let tokens = TokenizedCaptions::new(self.tokenizer, self.template, &captions)?;
            let batch = AlignmentBatch::new(self.decoder, self.cache.batch(&keys)?, &tokens)?;
            out.extend(caption_scores(self.decoder, projector, &batch)?);
            done(chunk.len());
        }
        Ok(out)
    }

    /// The mean visual token of `images` under `projector`: (1, n, d_llm).
    pub fn mean_visual(&self, projector: &Projector, images: &[FeatureKey]) -> Result<Tensor> {
        let keys: Vec<&FeatureKey> = images.iter().collect();
        let visual = projector.forward(&self.cache.batch(&keys)?)?.detach();
        Ok(visual.mean_keepdim(0)?)
    }

    /// The log-likelihood of each of `captions` after the visual tokens
    /// `visual` (1, n, d_llm) (no image of its own), with `like` (any
    /// image) giving the batch its shape.
    pub fn score_given_visual(
        &self,
        visual: &Tensor,
        like: &FeatureKey,
        captions: &[&str],
    ) -> Result<Vec<CaptionScore>> {
        let keys = vec![like; captions.len()];
        let tokens = TokenizedCaptions::new(self.tokenizer, self.template, captions)?;
        let batch = AlignmentBatch::new(self.decoder, self.cache.batch(&keys)?, &tokens)?;
        let (_, n, d) = visual.dims3()?;
        let repeated = visual.broadcast_as((captions.len(), n, d))?.contiguous()?;
        Ok(caption_scores_given_visual(
            self.decoder,
            &repeated,
            &batch,
        )?)
    }

    /// How `prompts` are laid out for scoring after an image: the
    /// template's prefix and separator, the prompts' common first tokens
    /// (at most all but one of the shortest's), and each prompt's own
    /// tokens after those.
    fn prompt_layout(&self, prompts: &[&str]) -> Result<PromptLayout> {
        let layout = TokenizedCaptions::new(self.tokenizer, self.template, prompts)?;
        let shortest = layout.captions.iter().map(Vec::len).min().unwrap_or(0);
        let first = layout.captions.first().cloned().unwrap_or_default();
        let common = first
            .iter()
            .enumerate()
            .take_while(|(j, id)| layout.captions.iter().all(|c| c.get(*j) == Some(id)))
            .count()
            .min(shortest.saturating_sub(1));
        let rest = layout
            .captions
            .iter()
            .map(|c| c[common..].to_vec())
            .collect();
        Ok(PromptLayout {
            prefix: layout.prefix,
            separator: layout.separator,
            common: first[..common].to_vec(),
            rest,
            pad_id: layout.pad_id,
        })
    }

    /// Zero-shot scores of `prompts` after each image's visual tokens
    /// `visual` (b, n, d_llm): one row per image, one value per prompt, the
    /// prompt's log-likelihood up to a term shared by all prompts (that of
    /// their common first tokens), which no comparison between prompts
    /// sees. The shared part runs once per image, each prompt's own tokens
    /// once per image and prompt.
    pub fn prompt_scores(&self, visual: &Tensor, prompts: &[&str]) -> Result<Vec<Vec<f64>>> {
        self.scores_after(visual, &self.prompt_layout(prompts)?)
    }

    /// [`Self::prompt_scores`] of prompts already laid out.
    fn scores_after(&self, visual: &Tensor, layout: &PromptLayout) -> Result<Vec<Vec<f64>>> {
        let (b, _, d) = visual.dims3()?;
        let embed = |ids: &[u32]| -> Result<Option<Tensor>> {
            if ids.is_empty() {
                return Ok(None);
            }
            let t = Tensor::from_vec(ids.to_vec(), (1, ids.len()), self.decoder.device())?;
            Ok(Some(
                self.decoder
                    .embed_tokens(&t)?
                    .broadcast_as((b, ids.len(), d))?
                    .contiguous()?,
            ))
        };
        let mut parts = Vec::with_capacity(4);
        parts.extend(embed(&layout.prefix)?);
        parts.push(visual.to_dtype(self.decoder.dtype())?);
        parts.extend(embed(&layout.separator)?);
        parts.extend(embed(&layout.common)?);
        let contexts = Tensor::cat(&parts, 1)?;
        Ok(continuation_scores(
            self.decoder,
            &contexts,
            &layout.rest,
            layout.pad_id,
        )?)
    }

    /// Runs `decode` with the prompt every caption continues: the
    /// template's prefix and separator around the visual tokens; it ends
    /// at a newline (the template's end of caption), at any of the
    /// tokenizer's stop ids, or after `max_tokens`.
    fn with_caption_prompt<R>(
        &self,
        max_tokens: usize,
        decode: impl FnOnce(&CaptionPrompt<'_>) -> Result<R>,
    ) -> Result<R> {
        let layout = TokenizedCaptions::new(self.tokenizer, self.template, &["x"])?;
        let mut stops = self.tokenizer.encode("\n")?;
        stops.extend(self.tokenizer.stop_ids());
        decode(&CaptionPrompt {
            prefix: &layout.prefix,
            separator: &layout.separator,
            stop_ids: &stops,
            max_new_tokens: max_tokens,
        })
    }

    /// A caption for one cached image (see [`Self::with_caption_prompt`]
    /// for where it ends).
    pub fn caption(
        &self,
        projector: &Projector,
        key: &FeatureKey,
        max_tokens: usize,
        decoding: Decoding,
    ) -> Result<String> {
        let ids = self.with_caption_prompt(max_tokens, |prompt| {
            Ok(decode_caption(
                self.decoder,
                projector,
                &self.cache.batch(&[key])?,
                prompt,
                decoding,
            )?)
        })?;
        Ok(self.tokenizer.decode(&ids)?.trim().to_string())
    }

    /// Greedy captions for many cached images, decoded together
    /// ([`generate_captions`], [`CAPTIONS_PER_PASS`] images at a time):
    /// each is the caption [`Self::caption`] gives its image alone.
    pub fn greedy_captions(
        &self,
        projector: &Projector,
        keys: &[&FeatureKey],
        max_tokens: usize,
        done: &mut dyn FnMut(usize),
    ) -> Result<Vec<String>> {
        self.with_caption_prompt(max_tokens, |prompt| {
            let mut out = Vec::with_capacity(keys.len());
            for chunk in keys.chunks(CAPTIONS_PER_PASS) {
                let ids =
                    generate_captions(self.decoder, projector, &self.cache.batch(chunk)?, prompt)?;
                for caption in ids {
                    out.push(self.tokenizer.decode(&caption)?.trim().to_string());
                }
                done(chunk.len());
            }
            Ok(out)
        })
    }
}

/// Prompts laid out for scoring ([`Scorer::prompt_layout`]).
struct PromptLayout {
    prefix: Vec<u32>,
    separator: Vec<u32>,
    common: Vec<u32>,
    rest: Vec<Vec<u32>>,
    pad_id: u32,
}

impl PromptLayout {
    /// Decoder positions scoring every prompt after one image of
    /// `visual_tokens` tokens runs: the shared context once, then each
    /// prompt's own tokens but its last (which predicts nothing).
    fn positions(&self, visual_tokens: usize) -> usize {
        self.prefix.len()
            + visual_tokens
            + self.separator.len()
            + self.common.len()
            + self
                .rest
                .iter()
                .map(|r| r.len().saturating_sub(1))
                .sum::<usize>()
    }
}

/// Images captioned together (one batch through the decoder per new
/// token).
pub const CAPTIONS_PER_PASS: usize = 128;

/// Images whose prompts are scored in one pass (their contexts once, then
/// every image x prompt continuation together). Measured on domain-silos
/// (60 images x 10 prompts per domain): 2 per pass 32.8 s, 8 21.8 s, 30
/// 20.7 s, 60 20.6 s; 32 keeps the LM head's logits of a pass (rows x
/// vocabulary) near 400 MB.
const ZERO_SHOT_IMAGES_PER_PASS: usize = 32;

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

fn share(hits: &[bool]) -> Option<f64> {
    (!hits.is_empty()).then(|| hits.iter().filter(|h| **h).count() as f64 / hits.len() as f64)
}

/// The class a caption names: the class whose name occurs in it
/// (case-insensitive), the longest name when several do ("a t-shirt"
/// over "a shirt"); None when none does.
pub fn named_class(caption: &str, class_names: &[String]) -> Option<usize> {
    let text = caption.to_lowercase();
    class_names
        .iter()
        .enumerate()
        .filter(|(_, n)| !n.is_empty() && text.contains(&n.to_lowercase()))
        .max_by_key(|(i, n)| (n.len(), std::cmp::Reverse(*i)))
        .map(|(i, _)| i)
}

/// The index of the largest value (first on ties).
fn argmax(values: impl Iterator<Item = f64>) -> usize {
    values
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |(bi, bv), (i, v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// Scores `projector` on `suite`; `done(n)` reports scored pairs.
pub fn evaluate(
    scorer: &Scorer<'_>,
    projector: &Projector,
    suite: &Suite,
    done: &mut dyn FnMut(usize),
) -> Result<SuiteReport> {
    if suite.items.is_empty() {
        return Err(RuntimeError::Config("the evaluation split is empty".into()));
    }
    let batch = suite.config.batch_size;
    let started = std::time::Instant::now();
    let mut seconds = [0.0f64; 3];
    // Caption NLL on every item.
    let pairs: Vec<(&FeatureKey, &str)> = suite
        .items
        .iter()
        .map(|i| (&i.sample.key, i.sample.caption.as_str()))
        .collect();
    let own = scorer.score_pairs(projector, &pairs, batch, done)?;
    seconds[0] = started.elapsed().as_secs_f64();
    // Decoder positions each part runs (for throughput in the log).
    let context = {
        let layout = TokenizedCaptions::new(scorer.tokenizer, scorer.template, &["x"])?;
        layout.prefix.len() + layout.separator.len()
    };
    let visual_tokens = match suite.items.first() {
        Some(item) => scorer.cache.batch(&[&item.sample.key])?.dim(1)?,
        None => 0,
    };
    let nll_positions: usize = own
        .iter()
        .map(|s| context + visual_tokens + s.tokens.saturating_sub(1))
        .sum();
    let mut zero_shot_positions = 0usize;
    let null_visual = if suite.calibration.is_empty() {
        None
    } else {
        Some(scorer.mean_visual(projector, &suite.calibration)?)
    };
    // Every checked image's greedy caption, all domains in one batch.
    let part = std::time::Instant::now();
    let checked: Vec<usize> = suite.checks.iter().flatten().copied().collect();
    let keys: Vec<&FeatureKey> = checked
        .iter()
        .map(|&i| &suite.items[i].sample.key)
        .collect();
    let generated: std::collections::HashMap<usize, String> = checked
        .iter()
        .copied()
        .zip(scorer.greedy_captions(projector, &keys, suite.config.max_caption_tokens, done)?)
        .collect();
    seconds[2] = part.elapsed().as_secs_f64();
    let mut captions = Vec::new();
    let mut domains = Vec::with_capacity(suite.domains.len());
    for (d, domain) in suite.domains.iter().enumerate() {
        let mut items = DomainItems::default();
        for (item, score) in suite.items.iter().zip(&own) {
            if item.domain == d {
                items.log_likelihood.push(score.log_likelihood);
                items.tokens.push(score.tokens as u32);
            }
        }
        let tokens: usize = items.tokens.iter().map(|t| *t as usize).sum();
        let nll = if tokens > 0 {
            -items.log_likelihood.iter().sum::<f64>() / tokens as f64
        } else {
            f64::NAN
        };

        // Zero-shot: every chosen image against every class prompt, each
        // prompt's prior taken once.
        let part = std::time::Instant::now();
        let chosen = &suite.zero_shot[d];
        let classes = domain.class_prompts.len();
        let prompts: Vec<&str> = domain.class_prompts.iter().map(String::as_str).collect();
        let layout = scorer.prompt_layout(&prompts)?;
        let prior: Vec<f64> = match (&null_visual, chosen.is_empty()) {
            (Some(null), false) => scorer
                .scores_after(null, &layout)?
                .pop()
                .unwrap_or_default(),
            _ => vec![0.0; classes],
        };
        let mut raw_hits = Vec::with_capacity(chosen.len());
        if !prompts.is_empty() {
            zero_shot_positions += chosen.len() * layout.positions(visual_tokens);
        }
        for images in chosen.chunks(ZERO_SHOT_IMAGES_PER_PASS) {
            let keys: Vec<&FeatureKey> =
                images.iter().map(|&i| &suite.items[i].sample.key).collect();
            let visual = projector.forward(&scorer.cache.batch(&keys)?)?.detach();
            let scores = scorer.scores_after(&visual, &layout)?;
            for (s, &i) in scores.iter().zip(images) {
                let label = suite.items[i].label.map(|l| l as usize);
                let raw = argmax(s.iter().copied());
                let calibrated = argmax(s.iter().zip(&prior).map(|(x, p)| x - p));
                raw_hits.push(label == Some(raw));
                items.zero_shot.push(label == Some(calibrated));
            }
            done(images.len() * classes);
        }
        let (zero_shot_accuracy, zero_shot_raw_accuracy) = if null_visual.is_some() {
            (share(&items.zero_shot), share(&raw_hits))
        } else {
            (share(&raw_hits), share(&raw_hits))
        };

        seconds[1] += part.elapsed().as_secs_f64();
        // Captions: decoded (all domains' together, above), checked for
        // the class they name.
        for &i in &suite.checks[d] {
            let item = &suite.items[i];
            let generated = generated.get(&i).cloned().unwrap_or_default();
            if let (Some(label), false) = (item.label, domain.class_names.is_empty()) {
                let named = named_class(&generated, &domain.class_names);
                items.caption.push(named == Some(label as usize));
            }
            if suite.examples.contains(&i) {
                captions.push(CaptionExample {
                    id: item.id.clone(),
                    domain: domain.name.clone(),
                    reference: item.sample.caption.clone(),
                    generated,
                });
            }
        }
        domains.push(DomainScores {
            domain: domain.name.clone(),
            samples: items.tokens.len(),
            tokens,
            nll,
            perplexity: nll.exp(),
            zero_shot_accuracy,
            zero_shot_raw_accuracy,
            zero_shot_images: chosen.len(),
            classes,
            caption_accuracy: share(&items.caption),
            caption_checks: items.caption.len(),
            items,
        });
    }
    // Examples in the suite's round-robin order.
    captions.sort_by_key(|c| {
        suite
            .examples
            .iter()
            .position(|&i| suite.items[i].id == c.id)
            .unwrap_or(usize::MAX)
    });
    tracing::debug!(
        nll_s = seconds[0],
        zero_shot_s = seconds[1],
        captions_s = seconds[2],
        nll_positions,
        zero_shot_positions,
        "evaluation suite timed"
    );
    let scored: Vec<&DomainScores> = domains.iter().filter(|d| d.tokens > 0).collect();
    let macro_nll = mean(scored.iter().map(|d| d.nll)).unwrap_or(f64::NAN);
    Ok(SuiteReport {
        macro_nll,
        macro_perplexity: macro_nll.exp(),
        macro_zero_shot_accuracy: mean(domains.iter().filter_map(|d| d.zero_shot_accuracy)),
        macro_zero_shot_raw_accuracy: mean(domains.iter().filter_map(|d| d.zero_shot_raw_accuracy)),
        macro_caption_accuracy: mean(domains.iter().filter_map(|d| d.caption_accuracy)),
        chance: mean(
            domains
                .iter()
                .filter(|d| d.zero_shot_images > 0 && d.classes > 0)
                .map(|d| 1.0 / d.classes as f64),
        ),
        domains,
        captions,
    })
}

/// The element-wise mean of reports over the same suite (e.g. over the
/// clients of the local-only reference): every number averaged over the
/// reports that have it; caption examples from the first report; no
/// per-item results.
pub fn average_reports(reports: &[SuiteReport]) -> Option<SuiteReport> {
    let first = reports.first()?;
    let avg = |f: &dyn Fn(&SuiteReport) -> Option<f64>| mean(reports.iter().filter_map(f));
    let domains = first
        .domains
        .iter()
        .enumerate()
        .map(|(d, proto)| {
            let get = |f: &dyn Fn(&DomainScores) -> Option<f64>| {
                mean(reports.iter().filter_map(|r| r.domains.get(d).and_then(f)))
            };
            let nll = get(&|x| Some(x.nll)).unwrap_or(f64::NAN);
            DomainScores {
                nll,
                perplexity: nll.exp(),
                zero_shot_accuracy: get(&|x| x.zero_shot_accuracy),
                zero_shot_raw_accuracy: get(&|x| x.zero_shot_raw_accuracy),
                caption_accuracy: get(&|x| x.caption_accuracy),
                items: DomainItems::default(),
                ..proto.clone()
            }
        })
        .collect();
    let macro_nll = avg(&|r| Some(r.macro_nll)).unwrap_or(f64::NAN);
    Some(SuiteReport {
        domains,
        macro_nll,
        macro_perplexity: macro_nll.exp(),
        macro_zero_shot_accuracy: avg(&|r| r.macro_zero_shot_accuracy),
        macro_zero_shot_raw_accuracy: avg(&|r| r.macro_zero_shot_raw_accuracy),
        macro_caption_accuracy: avg(&|r| r.macro_caption_accuracy),
        chance: first.chance,
        captions: first.captions.clone(),
    })
}

/// Recovery (ALGORITHMS.md §6): the fraction of the centralized gain over
/// init that a method reaches, `(init - method) / (init - centralized)`
/// for a lower-is-better NLL; None when centralized did not improve on
/// init (the ratio would be meaningless).
pub fn recovery(init: f64, method: f64, centralized: f64) -> Option<f64> {
    let gain = init - centralized;
    (gain > 0.0 && gain.is_finite() && method.is_finite()).then(|| (init - method) / gain)
}
