//! The held-out evaluation of a projector (ALGORITHMS.md §6), on fixed
//! subsets chosen once per suite so that every method is scored on the
//! same images and captions:
//!
//! - caption NLL per token and perplexity per domain (token-weighted within
//!   a domain) and their macro average over domains (macro perplexity =
//!   `exp(macro NLL)`), on every held-out item;
//! - zero-shot classification where a domain has labels: each chosen image
//!   is scored against one prompt per class (the domain's first caption
//!   template with the class's first name, fixed in advance) by total
//!   caption log-likelihood; the prediction is the best class (first on
//!   ties);
//! - image-to-caption retrieval within a fixed pool per domain: every image
//!   against every pool caption, by log-likelihood per token (so that
//!   length does not decide); the rank of an image's own caption is 1 +
//!   the number of captions scoring strictly higher (an identical caption
//!   of another image is as good as its own); R@1 and R@5;
//! - greedy-decoded captions for a few fixed images, for people to read.
//!
//! Scoring reuses the feature cache (no encoder pass) and batches pairs.
//! Recovery relative to init and centralized needs several runs and is
//! computed by the report ([`recovery`]).

use fedcmp_data::cache::{FeatureCache, FeatureKey};
use fedcmp_model::alignment::{
    caption_scores, generate_caption, AlignmentBatch, CaptionScore, CaptionTemplate,
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
    /// Images (and their captions) per domain in the retrieval pool.
    pub retrieval_pool: usize,
    /// Images captioned greedily, taken round-robin over the domains.
    pub caption_examples: usize,
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
            zero_shot_per_domain: 10,
            retrieval_pool: 8,
            caption_examples: 4,
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
    /// Per domain: item indices of the retrieval pool.
    pub pools: Vec<Vec<usize>>,
    /// Item indices captioned greedily.
    pub examples: Vec<usize>,
    pub config: SuiteConfig,
}

impl Suite {
    /// Validates the items against the domains and draws the subsets (a
    /// seeded shuffle of each domain's items, then the first ones).
    pub fn new(domains: Vec<Domain>, items: Vec<Item>, config: SuiteConfig) -> Result<Self> {
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
        let zero_shot = per_domain
            .iter()
            .zip(&domains)
            .map(|(list, d)| {
                if d.class_prompts.is_empty() {
                    return Vec::new();
                }
                list.iter()
                    .copied()
                    .filter(|&i| items[i].label.is_some())
                    .take(config.zero_shot_per_domain)
                    .collect()
            })
            .collect();
        let pools = per_domain
            .iter()
            .map(|list| list.iter().copied().take(config.retrieval_pool).collect())
            .collect();
        let mut examples = Vec::new();
        let mut round = 0;
        while examples.len() < config.caption_examples {
            let before = examples.len();
            for list in &per_domain {
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
        Ok(Self {
            domains,
            items,
            zero_shot,
            pools,
            examples,
            config,
        })
    }

    /// The same items with only the NLL part (no zero-shot, retrieval or
    /// captions): for scoring many projectors cheaply.
    pub fn nll_only(&self) -> Suite {
        Suite {
            domains: self.domains.clone(),
            items: self.items.clone(),
            zero_shot: vec![Vec::new(); self.domains.len()],
            pools: vec![Vec::new(); self.domains.len()],
            examples: Vec::new(),
            config: self.config,
        }
    }

    /// Caption pairs the evaluation scores (for progress bars).
    pub fn num_pairs(&self) -> usize {
        let zero_shot: usize = self
            .zero_shot
            .iter()
            .zip(&self.domains)
            .map(|(z, d)| z.len() * d.class_prompts.len())
            .sum();
        let retrieval: usize = self.pools.iter().map(|p| p.len() * p.len()).sum();
        self.items.len() + zero_shot + retrieval
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
    /// Accuracy and number of images, where the domain has labels.
    pub zero_shot_accuracy: Option<f64>,
    pub zero_shot_images: usize,
    pub classes: usize,
    /// Retrieval recalls within the pool (None for a pool of 0).
    pub retrieval_r1: Option<f64>,
    pub retrieval_r5: Option<f64>,
    pub pool: usize,
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
    /// Mean over the domains with labels.
    pub macro_zero_shot_accuracy: Option<f64>,
    pub macro_retrieval_r1: Option<f64>,
    pub macro_retrieval_r5: Option<f64>,
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

    /// A greedy caption for one cached image.
    pub fn caption(
        &self,
        projector: &Projector,
        key: &FeatureKey,
        max_tokens: usize,
    ) -> Result<String> {
        let layout = TokenizedCaptions::new(self.tokenizer, self.template, &["x"])?;
        let mut stops = self.tokenizer.encode("\n")?;
        stops.extend(self.tokenizer.eos_id());
        let ids = generate_caption(
            self.decoder,
            projector,
            &self.cache.batch(&[key])?,
            &layout.prefix,
            &layout.separator,
            &stops,
            max_tokens,
        )?;
        Ok(self.tokenizer.decode(&ids)?.trim().to_string())
    }
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
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
    // Caption NLL on every item.
    let pairs: Vec<(&FeatureKey, &str)> = suite
        .items
        .iter()
        .map(|i| (&i.sample.key, i.sample.caption.as_str()))
        .collect();
    let own = scorer.score_pairs(projector, &pairs, batch, done)?;
    let mut domains = Vec::with_capacity(suite.domains.len());
    for (d, domain) in suite.domains.iter().enumerate() {
        let (mut ll, mut tokens, mut samples) = (0.0, 0usize, 0usize);
        for (item, score) in suite.items.iter().zip(&own) {
            if item.domain == d {
                ll += score.log_likelihood;
                tokens += score.tokens;
                samples += 1;
            }
        }
        let nll = if tokens > 0 {
            -ll / tokens as f64
        } else {
            f64::NAN
        };

        // Zero-shot: every chosen image against every class prompt.
        let chosen = &suite.zero_shot[d];
        let classes = domain.class_prompts.len();
        let mut pairs = Vec::with_capacity(chosen.len() * classes);
        for &i in chosen {
            for prompt in &domain.class_prompts {
                pairs.push((&suite.items[i].sample.key, prompt.as_str()));
            }
        }
        let scores = scorer.score_pairs(projector, &pairs, batch, done)?;
        let correct = chosen
            .iter()
            .enumerate()
            .filter(|(row, &i)| {
                let s = &scores[row * classes..(row + 1) * classes];
                let best = s
                    .iter()
                    .enumerate()
                    .fold((0, f64::NEG_INFINITY), |(bi, bv), (c, v)| {
                        if v.log_likelihood > bv {
                            (c, v.log_likelihood)
                        } else {
                            (bi, bv)
                        }
                    })
                    .0;
                suite.items[i].label == Some(best as u32)
            })
            .count();
        let zero_shot_accuracy = (!chosen.is_empty()).then(|| correct as f64 / chosen.len() as f64);

        // Retrieval within the pool.
        let pool = &suite.pools[d];
        let p = pool.len();
        let mut pairs = Vec::with_capacity(p * p);
        for &i in pool {
            for &j in pool {
                pairs.push((
                    &suite.items[i].sample.key,
                    suite.items[j].sample.caption.as_str(),
                ));
            }
        }
        let scores = scorer.score_pairs(projector, &pairs, batch, done)?;
        let ranks: Vec<usize> = (0..p)
            .map(|row| {
                let s = &scores[row * p..(row + 1) * p];
                let own = s[row].per_token();
                1 + s.iter().filter(|x| x.per_token() > own).count()
            })
            .collect();
        let recall =
            |k: usize| (p > 0).then(|| ranks.iter().filter(|&&r| r <= k).count() as f64 / p as f64);
        domains.push(DomainScores {
            domain: domain.name.clone(),
            samples,
            tokens,
            nll,
            perplexity: nll.exp(),
            zero_shot_accuracy,
            zero_shot_images: chosen.len(),
            classes,
            retrieval_r1: recall(1),
            retrieval_r5: recall(5),
            pool: p,
        });
    }
    let captions = suite
        .examples
        .iter()
        .map(|&i| {
            let item = &suite.items[i];
            Ok(CaptionExample {
                id: item.id.clone(),
                domain: suite.domains[item.domain].name.clone(),
                reference: item.sample.caption.clone(),
                generated: scorer.caption(
                    projector,
                    &item.sample.key,
                    suite.config.max_caption_tokens,
                )?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let scored: Vec<&DomainScores> = domains.iter().filter(|d| d.tokens > 0).collect();
    let macro_nll = mean(scored.iter().map(|d| d.nll)).unwrap_or(f64::NAN);
    Ok(SuiteReport {
        macro_nll,
        macro_perplexity: macro_nll.exp(),
        macro_zero_shot_accuracy: mean(domains.iter().filter_map(|d| d.zero_shot_accuracy)),
        macro_retrieval_r1: mean(domains.iter().filter_map(|d| d.retrieval_r1)),
        macro_retrieval_r5: mean(domains.iter().filter_map(|d| d.retrieval_r5)),
        domains,
        captions,
    })
}

/// The element-wise mean of reports over the same suite (e.g. over the
/// clients of the local-only reference): every number averaged over the
/// reports that have it; caption examples from the first report.
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
                retrieval_r1: get(&|x| x.retrieval_r1),
                retrieval_r5: get(&|x| x.retrieval_r5),
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
        macro_retrieval_r1: avg(&|r| r.macro_retrieval_r1),
        macro_retrieval_r5: avg(&|r| r.macro_retrieval_r5),
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
