//! The alignment step of LLaVA-style stage-1 pretraining: visual tokens from
//! the projector, followed by caption tokens, through the FROZEN decoder;
//! cross-entropy on the caption tokens only; the exact gradient of the
//! projector; AdamW on the projector.
//!
//! The gradient is assembled in two halves. The decoder's hand-written
//! backward gives dL/d(visual tokens) without forming any weight gradient;
//! candle's autograd then carries it through the small projector via the
//! surrogate `sum(visual_tokens * stop_grad(dL/d visual_tokens))`, whose
//! parameter gradient equals dL/d(projector parameters) by the chain rule.
//!
//! Sequence layout (LLaVA's `plain` template by default):
//!   [bos?] [prefix tokens] [visual tokens] [caption tokens] [suffix tokens] [pad...]
//! Loss on caption and suffix tokens only; sequences are right-padded.

use candle_core::{DType, Tensor};

use crate::error::{ModelError, Result};
use crate::llm::decoder::{FrozenDecoder, KvCache, LossTargets};
use crate::optim::AdamW;
use crate::projector::Projector;
use crate::tokenizer::TextTokenizer;

/// How an image-caption pair becomes one token sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptionTemplate {
    /// Put the tokenizer's BOS first, when it declares one. LLaVA's LLaMA
    /// tokenizers always do; SmolLM2's does not add it by itself, but a fixed
    /// first token (the position the decoder uses as an attention sink)
    /// aligned faster here: held-out loss 4.24 with it vs 4.59 without
    /// (`fedcmp align --lr 1e-3`, 60 steps, seed 0).
    pub add_bos: bool,
    /// Text before the image (not scored).
    pub prefix: String,
    /// Text between the image and the caption (not scored). LLaVA's plain
    /// layout has none; one newline there made the first caption token
    /// learnable (ALGORITHMS.md §7.1).
    pub separator: String,
    /// Text after the caption (scored, like LLaVA's `plain` separator).
    pub suffix: String,
    /// Captions longer than this many tokens (suffix included) are cut.
    pub max_caption_tokens: usize,
}

impl CaptionTemplate {
    /// LLaVA's `plain` pretraining template: image, caption, newline.
    pub fn plain() -> Self {
        Self {
            add_bos: true,
            prefix: String::new(),
            separator: String::new(),
            suffix: "\n".to_string(),
            max_caption_tokens: 64,
        }
    }
}

/// Caption token ids ready to batch: the tokenised prefix and separator
/// shared by every sample, and per sample the scored ids (caption +
/// suffix).
#[derive(Debug, Clone)]
pub struct TokenizedCaptions {
    pub prefix: Vec<u32>,
    pub separator: Vec<u32>,
    pub captions: Vec<Vec<u32>>,
    pub pad_id: u32,
}

impl TokenizedCaptions {
    /// Tokenises `captions` under `template`. An empty caption is an error
    /// (the data layer skips such records before they get here).
    pub fn new(
        tokenizer: &TextTokenizer,
        template: &CaptionTemplate,
        captions: &[&str],
    ) -> Result<Self> {
        let mut prefix = Vec::new();
        if template.add_bos {
            if let Some(bos) = tokenizer.bos_id() {
                prefix.push(bos);
            }
        }
        if !template.prefix.is_empty() {
            prefix.extend(tokenizer.encode(&template.prefix)?);
        }
        let encode = |text: &str| -> Result<Vec<u32>> {
            if text.is_empty() {
                Ok(Vec::new())
            } else {
                tokenizer.encode(text)
            }
        };
        let suffix = encode(&template.suffix)?;
        let separator = encode(&template.separator)?;
        let mut out = Vec::with_capacity(captions.len());
        for caption in captions {
            let mut ids = tokenizer.encode(caption)?;
            if ids.is_empty() {
                return Err(ModelError::InvalidInput(format!(
                    "caption {caption:?} has no tokens"
                )));
            }
            ids.extend(&suffix);
            ids.truncate(template.max_caption_tokens.max(1));
            out.push(ids);
        }
        Ok(Self {
            prefix,
            separator,
            captions: out,
            pad_id: tokenizer.pad_id(),
        })
    }
}

/// One batch laid out for the decoder.
#[derive(Debug, Clone)]
pub struct AlignmentBatch {
    /// Vision features (batch, n_patch, d_v), already pooled if configured.
    pub features: Tensor,
    /// Embeddings of the shared prefix (batch, prefix_len, d_llm), if any.
    prefix_embeds: Option<Tensor>,
    /// Embeddings of the shared separator (batch, sep_len, d_llm), if any.
    separator_embeds: Option<Tensor>,
    /// Embeddings of the padded caption ids (batch, max_len, d_llm).
    caption_embeds: Tensor,
    targets: LossTargets,
    /// Scored tokens of each sample, in batch order (targets are laid out
    /// sample by sample).
    tokens_per_sample: Vec<usize>,
}

impl AlignmentBatch {
    /// Lays out `features` and `tokens` for `decoder`.
    pub fn new(
        decoder: &FrozenDecoder,
        features: Tensor,
        tokens: &TokenizedCaptions,
    ) -> Result<Self> {
        let (b, n_vis, _) = features.dims3()?;
        if tokens.captions.len() != b {
            return Err(ModelError::InvalidInput(format!(
                "{b} images but {} captions",
                tokens.captions.len()
            )));
        }
        let device = decoder.device();
        let p = tokens.prefix.len();
        let max_len = tokens.captions.iter().map(Vec::len).max().unwrap_or(0);
        if max_len == 0 {
            return Err(ModelError::InvalidInput("empty batch".to_string()));
        }
        let sep = tokens.separator.len();
        let time = p + n_vis + sep + max_len;
        let mut padded = Vec::with_capacity(b * max_len);
        let mut positions = Vec::new();
        let mut labels = Vec::new();
        for (row, ids) in tokens.captions.iter().enumerate() {
            padded.extend(ids);
            padded.extend(std::iter::repeat_n(tokens.pad_id, max_len - ids.len()));
            for (j, &id) in ids.iter().enumerate() {
                // The token at sequence position s is predicted at s - 1.
                let s = p + n_vis + sep + j;
                positions.push((row * time + s - 1) as u32);
                labels.push(id);
            }
        }
        let caption_ids = Tensor::from_vec(padded, (b, max_len), device)?;
        let caption_embeds = decoder.embed_tokens(&caption_ids)?;
        let shared = |ids: &[u32]| -> Result<Option<Tensor>> {
            if ids.is_empty() {
                return Ok(None);
            }
            let all: Vec<u32> = (0..b).flat_map(|_| ids.iter().copied()).collect();
            let t = Tensor::from_vec(all, (b, ids.len()), device)?;
            Ok(Some(decoder.embed_tokens(&t)?))
        };
        let prefix_embeds = shared(&tokens.prefix)?;
        let separator_embeds = shared(&tokens.separator)?;
        let n = labels.len();
        let targets = LossTargets {
            positions: Tensor::from_vec(positions, n, device)?,
            labels: Tensor::from_vec(labels, n, device)?,
        };
        Ok(Self {
            features: features.to_dtype(decoder.dtype())?,
            prefix_embeds,
            separator_embeds,
            caption_embeds,
            targets,
            tokens_per_sample: tokens.captions.iter().map(Vec::len).collect(),
        })
    }

    /// Number of scored caption tokens.
    pub fn num_target_tokens(&self) -> usize {
        self.targets.len()
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.features.dims().first().copied().unwrap_or(0)
    }

    /// True when the batch holds no sample.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn prefix_len(&self) -> usize {
        self.prefix_embeds
            .as_ref()
            .and_then(|t| t.dims().get(1).copied())
            .unwrap_or(0)
    }

    /// The decoder input with `visual` in place of the image.
    fn inputs(&self, visual: &Tensor) -> Result<Tensor> {
        let mut parts = Vec::with_capacity(4);
        if let Some(prefix) = &self.prefix_embeds {
            parts.push(prefix.clone());
        }
        parts.push(visual.clone());
        if let Some(separator) = &self.separator_embeds {
            parts.push(separator.clone());
        }
        parts.push(self.caption_embeds.clone());
        Ok(Tensor::cat(&parts, 1)?)
    }
}

/// Loss and projector gradients for one batch.
#[derive(Debug)]
pub struct StepOutput {
    /// Mean caption cross-entropy per token.
    pub loss: f64,
    /// Scored tokens in the batch.
    pub tokens: usize,
    /// Gradient of each projector parameter, in parameter order.
    pub grads: Vec<Option<Tensor>>,
}

/// Mean caption loss of `projector` on `batch` (no gradient).
pub fn caption_loss(
    decoder: &FrozenDecoder,
    projector: &Projector,
    batch: &AlignmentBatch,
) -> Result<f64> {
    let visual = projector.forward(&batch.features)?.detach();
    decoder.caption_loss(&batch.inputs(&visual)?, &batch.targets)
}

/// One sample's caption log-likelihood under the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CaptionScore {
    /// `sum_t log p(token_t | image, tokens < t)`.
    pub log_likelihood: f64,
    /// Number of scored caption tokens.
    pub tokens: usize,
}

impl CaptionScore {
    /// Log-likelihood per token (0 for an empty caption).
    pub fn per_token(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.log_likelihood / self.tokens as f64
        }
    }
}

/// The caption log-likelihood of every sample of `batch` (no gradient).
pub fn caption_scores(
    decoder: &FrozenDecoder,
    projector: &Projector,
    batch: &AlignmentBatch,
) -> Result<Vec<CaptionScore>> {
    let visual = projector.forward(&batch.features)?.detach();
    caption_scores_given_visual(decoder, &visual, batch)
}

/// The caption log-likelihood of every sample of `batch` with `visual`
/// (batch, n_vis, d_llm) in place of the projected images: e.g. the mean
/// visual token of a split, the "no image" reference of calibrated
/// zero-shot scores.
pub fn caption_scores_given_visual(
    decoder: &FrozenDecoder,
    visual: &Tensor,
    batch: &AlignmentBatch,
) -> Result<Vec<CaptionScore>> {
    let (b, n, _) = batch.features.dims3()?;
    let (vb, vn, vd) = visual.dims3()?;
    if (vb, vn, vd) != (b, n, decoder.config().hidden_size) {
        return Err(ModelError::InvalidInput(format!(
            "visual tokens {:?} do not fit a batch of {b} images with {n} tokens",
            visual.dims()
        )));
    }
    let log_probs = decoder.target_token_log_probs(&batch.inputs(visual)?, &batch.targets)?;
    let mut out = Vec::with_capacity(batch.tokens_per_sample.len());
    let mut start = 0;
    for &n in &batch.tokens_per_sample {
        let slice = log_probs.get(start..start + n).ok_or_else(|| {
            ModelError::InvalidInput("internal: fewer scores than caption tokens".to_string())
        })?;
        out.push(CaptionScore {
            log_likelihood: slice.iter().sum(),
            tokens: n,
        });
        start += n;
    }
    Ok(out)
}

/// The log-likelihood of every continuation after every context:
/// `contexts` (b, t, d_llm) input embeddings (equal lengths), and token ids
/// of C continuations (each at least one token) shared by all contexts;
/// returns b rows of C values `sum_j log p(c_j | context, c_<j)`. The
/// contexts run once and their keys and values serve every continuation
/// (a KV cache repeated over the continuations), so scoring C short
/// continuations of a long shared context costs the context once; the
/// continuations are packed (no position is computed for padding, and a
/// continuation's last token, which predicts nothing, is never fed), and
/// the LM head runs only where a token is scored.
pub fn continuation_scores(
    decoder: &FrozenDecoder,
    contexts: &Tensor,
    continuations: &[Vec<u32>],
    pad_id: u32,
) -> Result<Vec<Vec<f64>>> {
    if continuations.is_empty() || continuations.iter().any(Vec::is_empty) {
        return Err(ModelError::InvalidInput(
            "scoring needs continuations of at least one token".to_string(),
        ));
    }
    let device = decoder.device();
    let (b, _, _) = contexts.dims3()?;
    let c = continuations.len();
    let mut cache = KvCache::default();
    let logits = decoder.last_logits_cached(contexts, &mut cache)?;
    // The first token of each continuation, read at the context's end.
    let first_ids: Vec<u32> = continuations.iter().map(|x| x[0]).collect();
    let first_ids = Tensor::from_vec(first_ids, (1, c), device)?
        .broadcast_as((b, c))?
        .contiguous()?;
    let first: Vec<Vec<f32>> = candle_nn::ops::log_softmax(&logits, 1)?
        .gather(&first_ids, 1)?
        .to_dtype(DType::F32)?
        .to_vec2()?;
    let mut scores: Vec<Vec<f64>> = first
        .iter()
        .map(|row| row.iter().map(|v| f64::from(*v)).collect())
        .collect();
    let longest = continuations.iter().map(Vec::len).max().unwrap_or(1);
    if longest > 1 {
        // Inputs: every continuation but its last token, for every context.
        let (mut ids, mut lengths, mut next) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..b {
            for x in continuations {
                ids.extend(&x[..x.len() - 1]);
                ids.extend(std::iter::repeat_n(pad_id, longest - x.len()));
                lengths.push(x.len() - 1);
                next.push(x[1..].to_vec());
            }
        }
        let rows = b * c;
        let inputs = decoder.embed_tokens(&Tensor::from_vec(ids, (rows, longest - 1), device)?)?;
        let repeated = cache.repeat_each(c)?;
        let picked = decoder.continuation_log_probs_cached(&inputs, &lengths, &next, &repeated)?;
        for (row, values) in picked.iter().enumerate() {
            let (image, k) = (row / c, row % c);
            scores[image][k] += values.iter().sum::<f64>();
        }
    }
    Ok(scores)
}

/// Loss and exact projector gradient for `batch`.
pub fn loss_and_grads(
    decoder: &FrozenDecoder,
    projector: &Projector,
    batch: &AlignmentBatch,
) -> Result<StepOutput> {
    let visual = projector.forward(&batch.features)?;
    let inputs = batch.inputs(&visual.detach())?;
    let (loss, d_inputs) = decoder.caption_loss_and_input_grad(&inputs, &batch.targets)?;
    let n_vis = visual.dims()[1];
    let d_visual = d_inputs.narrow(1, batch.prefix_len(), n_vis)?;
    Ok(StepOutput {
        loss,
        tokens: batch.num_target_tokens(),
        grads: projector_grads(projector, &visual, &d_visual)?,
    })
}

/// The projector's parameter gradients given dL/d(its output) `d_visual`,
/// through candle's autograd on the surrogate `sum(visual * d_visual)`.
fn projector_grads(
    projector: &Projector,
    visual: &Tensor,
    d_visual: &Tensor,
) -> Result<Vec<Option<Tensor>>> {
    let surrogate = (visual * d_visual.detach())?.sum_all()?;
    let grad_store = surrogate.backward()?;
    Ok(projector
        .named_params()
        .iter()
        .map(|(_, var)| grad_store.get(var.as_tensor()).cloned())
        .collect())
}

/// Loss and exact gradient of several batches, each with its own projector
/// (several clients' local steps), in ONE pass through the frozen decoder.
/// The decoder is frozen and its sequences never see each other, so each
/// batch's gradient is exactly its own: the sequences are stacked (padded
/// to the longest, which the decoder skips), every target weighted by
/// 1 / (its batch's scored tokens), and each projector backpropagates its
/// own rows. Equal to [`loss_and_grads`] on each batch up to float
/// rounding; the batches must share the caption layout (prefix, visual
/// tokens, separator).
pub fn loss_and_grads_many(
    decoder: &FrozenDecoder,
    items: &[(&Projector, &AlignmentBatch)],
) -> Result<Vec<StepOutput>> {
    if let [(projector, batch)] = items {
        return Ok(vec![loss_and_grads(decoder, projector, batch)?]);
    }
    let Some((_, first)) = items.first() else {
        return Ok(Vec::new());
    };
    let prefix = first.prefix_len();
    let mut visuals = Vec::with_capacity(items.len());
    let mut inputs = Vec::with_capacity(items.len());
    for (projector, batch) in items {
        if batch.prefix_len() != prefix || batch.features.dims()[1] != first.features.dims()[1] {
            return Err(ModelError::InvalidInput(
                "batches passed together must share the caption layout".to_string(),
            ));
        }
        let visual = projector.forward(&batch.features)?;
        inputs.push(batch.inputs(&visual.detach())?);
        visuals.push(visual);
    }
    let time = inputs.iter().map(|x| x.dims()[1]).max().unwrap_or(0);
    let (mut positions, mut labels, mut weights) = (Vec::new(), Vec::new(), Vec::new());
    let mut rows = 0usize;
    let mut padded = Vec::with_capacity(items.len());
    for ((_, batch), x) in items.iter().zip(&inputs) {
        let (b, t, d) = x.dims3()?;
        let n = batch.num_target_tokens();
        for p in batch.targets.positions.to_vec1::<u32>()? {
            let (row, s) = (p as usize / t, p as usize % t);
            positions.push(((rows + row) * time + s) as u32);
        }
        labels.extend(batch.targets.labels.to_vec1::<u32>()?);
        weights.extend(std::iter::repeat_n(1.0 / n.max(1) as f64, n));
        padded.push(if t < time {
            let zeros = Tensor::zeros((b, time - t, d), x.dtype(), x.device())?;
            Tensor::cat(&[x, &zeros], 1)?
        } else {
            x.clone()
        });
        rows += b;
    }
    let device = decoder.device();
    let n = labels.len();
    let targets = LossTargets {
        positions: Tensor::from_vec(positions, n, device)?,
        labels: Tensor::from_vec(labels, n, device)?,
    };
    let stacked = Tensor::cat(&padded, 0)?;
    let (nll, d_inputs) = decoder.weighted_nll_and_input_grad(&stacked, &targets, &weights)?;
    let mut out = Vec::with_capacity(items.len());
    let (mut row, mut token) = (0usize, 0usize);
    for ((projector, batch), visual) in items.iter().zip(&visuals) {
        let (b, n_vis, _) = visual.dims3()?;
        let n = batch.num_target_tokens();
        let d_visual = d_inputs.narrow(0, row, b)?.narrow(1, prefix, n_vis)?;
        out.push(StepOutput {
            loss: nll[token..token + n].iter().sum::<f64>() / n.max(1) as f64,
            tokens: n,
            grads: projector_grads(projector, visual, &d_visual)?,
        });
        row += b;
        token += n;
    }
    Ok(out)
}

/// One optimisation step: loss, gradient, AdamW update with `lr`.
pub fn train_step(
    decoder: &FrozenDecoder,
    projector: &Projector,
    optimizer: &mut AdamW,
    batch: &AlignmentBatch,
    lr: f64,
) -> Result<StepOutput> {
    let out = loss_and_grads(decoder, projector, batch)?;
    optimizer.step(&out.grads, lr)?;
    Ok(out)
}

/// What a caption continues and where it stops: the template's ids
/// before (`prefix`) and after (`separator`) the image's visual tokens; it
/// ends at any of `stop_ids` or after `max_new_tokens`.
#[derive(Debug, Clone, Copy)]
pub struct CaptionPrompt<'a> {
    pub prefix: &'a [u32],
    pub separator: &'a [u32],
    pub stop_ids: &'a [u32],
    pub max_new_tokens: usize,
}

/// The contexts captions continue: `prefix`, each image's visual tokens,
/// `separator`, embedded as (n, len, d) for `features` (n, k, d_v).
fn caption_contexts(
    decoder: &FrozenDecoder,
    projector: &Projector,
    features: &Tensor,
    prompt: &CaptionPrompt<'_>,
) -> Result<Tensor> {
    let (prefix, separator) = (prompt.prefix, prompt.separator);
    let device = decoder.device();
    let visual = projector
        .forward(&features.to_dtype(decoder.dtype())?)?
        .detach();
    let (n, _, d) = visual.dims3()?;
    let shared = |ids: &[u32]| -> Result<Tensor> {
        let t = Tensor::from_vec(ids.to_vec(), (1, ids.len()), device)?;
        Ok(decoder
            .embed_tokens(&t)?
            .broadcast_as((n, ids.len(), d))?
            .contiguous()?)
    };
    let mut parts = Vec::new();
    if !prefix.is_empty() {
        parts.push(shared(prefix)?);
    }
    parts.push(visual);
    if !separator.is_empty() {
        parts.push(shared(separator)?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// Greedy decoding of a caption for one image's `features` (1, n, d_v).
/// The context is run once; each new token costs only its own position (a
/// KV cache).
pub fn generate_caption(
    decoder: &FrozenDecoder,
    projector: &Projector,
    features: &Tensor,
    prompt: &CaptionPrompt<'_>,
) -> Result<Vec<u32>> {
    generate_captions(decoder, projector, features, prompt)?
        .pop()
        .ok_or_else(|| ModelError::InvalidInput("no image to caption".to_string()))
}

/// Greedy decoding of captions for many images at once, `features`
/// (n, k, d_v): every image's context runs in one pass, then each step
/// feeds the last token of every caption still going as one batch over
/// one KV cache; a caption that stops leaves the batch. Each caption is
/// the one [`generate_caption`] gives its image alone (up to float
/// rounding in the products).
pub fn generate_captions(
    decoder: &FrozenDecoder,
    projector: &Projector,
    features: &Tensor,
    prompt: &CaptionPrompt<'_>,
) -> Result<Vec<Vec<u32>>> {
    let device = decoder.device();
    let n = features.dim(0)?;
    let mut out = vec![Vec::new(); n];
    if n == 0 {
        return Ok(out);
    }
    let mut inputs = caption_contexts(decoder, projector, features, prompt)?;
    let mut cache = KvCache::default();
    // The image each row of the batch (and of the cache) belongs to.
    let mut live: Vec<usize> = (0..n).collect();
    for _ in 0..prompt.max_new_tokens {
        let logits = decoder.last_logits_cached(&inputs, &mut cache)?;
        let next = logits.argmax(1)?.to_vec1::<u32>()?;
        let mut kept = Vec::with_capacity(live.len());
        let mut tokens = Vec::with_capacity(live.len());
        for (row, (&image, &token)) in live.iter().zip(&next).enumerate() {
            if !prompt.stop_ids.contains(&token) {
                out[image].push(token);
                kept.push(row);
                tokens.push(token);
            }
        }
        if kept.is_empty() {
            break;
        }
        if kept.len() < live.len() {
            let rows = kept.iter().map(|&r| r as u32).collect::<Vec<_>>();
            cache = cache.select(&Tensor::from_vec(rows, kept.len(), device)?)?;
            live = kept.iter().map(|&r| live[r]).collect();
        }
        let count = tokens.len();
        inputs = decoder.embed_tokens(&Tensor::from_vec(tokens, (count, 1), device)?)?;
    }
    Ok(out)
}

/// How a caption is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoding {
    /// The likeliest token at every step ([`generate_caption`]).
    Greedy,
    /// Beam search over `width` hypotheses ([`beam_search_caption`]).
    Beam { width: usize },
}

/// A caption's token ids for one image, decoded as `decoding` says.
pub fn decode_caption(
    decoder: &FrozenDecoder,
    projector: &Projector,
    features: &Tensor,
    prompt: &CaptionPrompt<'_>,
    decoding: Decoding,
) -> Result<Vec<u32>> {
    match decoding {
        Decoding::Greedy => generate_caption(decoder, projector, features, prompt),
        Decoding::Beam { width } => {
            Ok(beam_search_caption(decoder, projector, features, prompt, width)?.ids)
        }
    }
}

/// A caption hypothesis: its tokens (without the stop token) and the sum
/// of their log-probabilities (with the stop token's, once it ended).
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    pub ids: Vec<u32>,
    pub log_prob: f64,
    /// Tokens scored: the caption's, plus one if it ended at a stop token.
    pub scored: usize,
}

impl Hypothesis {
    /// Log-probability per scored token (beam search's length-normalised
    /// score, transformers' `length_penalty = 1`).
    pub fn score(&self) -> f64 {
        self.log_prob / self.scored.max(1) as f64
    }
}

/// Beam search for one image's caption: `width` hypotheses advance
/// together through the decoder as one batch, sharing the context's KV
/// cache; a hypothesis that picks a stop token is finished. The search
/// ends after `max_new_tokens` (live hypotheses then count as finished),
/// or once `width` finished hypotheses are at least as good as the best
/// live one could be at its current length (transformers' heuristic).
/// Returns the best finished hypothesis by [`Hypothesis::score`]. Width 1
/// is not greedy decoding: a finished hypothesis may lose to a longer one.
pub fn beam_search_caption(
    decoder: &FrozenDecoder,
    projector: &Projector,
    features: &Tensor,
    prompt: &CaptionPrompt<'_>,
    width: usize,
) -> Result<Hypothesis> {
    if width == 0 {
        return Err(ModelError::InvalidInput("beam width 0".to_string()));
    }
    let device = decoder.device();
    let mut inputs = caption_contexts(decoder, projector, features, prompt)?;
    let mut cache = KvCache::default();
    let mut live = vec![Hypothesis {
        ids: Vec::new(),
        log_prob: 0.0,
        scored: 0,
    }];
    let mut finished: Vec<Hypothesis> = Vec::new();
    for _ in 0..prompt.max_new_tokens {
        let logits = decoder.last_logits_cached(&inputs, &mut cache)?;
        let log_probs: Vec<Vec<f32>> =
            candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, 1)?.to_vec2()?;
        // Each live hypothesis's best 2 * width continuations: enough for
        // `width` of them not to stop.
        let mut candidates: Vec<(f64, usize, u32)> = Vec::new();
        for (row, lp) in log_probs.iter().enumerate() {
            let mut order: Vec<u32> = (0..lp.len() as u32).collect();
            let keep = (2 * width).min(order.len());
            order.select_nth_unstable_by(keep.saturating_sub(1), |&a, &b| {
                lp[b as usize].total_cmp(&lp[a as usize])
            });
            for &token in &order[..keep] {
                candidates.push((
                    live[row].log_prob + f64::from(lp[token as usize]),
                    row,
                    token,
                ));
            }
        }
        candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut next = Vec::with_capacity(width);
        let mut rows = Vec::with_capacity(width);
        for (log_prob, row, token) in candidates {
            if next.len() == width {
                break;
            }
            let parent = &live[row];
            if prompt.stop_ids.contains(&token) {
                finished.push(Hypothesis {
                    ids: parent.ids.clone(),
                    log_prob,
                    scored: parent.scored + 1,
                });
            } else {
                let mut ids = parent.ids.clone();
                ids.push(token);
                next.push(Hypothesis {
                    ids,
                    log_prob,
                    scored: parent.scored + 1,
                });
                rows.push(row);
            }
        }
        live = next;
        if live.is_empty() {
            break;
        }
        finished.sort_by(|a, b| b.score().total_cmp(&a.score()));
        finished.truncate(width);
        let best_live = live
            .iter()
            .map(Hypothesis::score)
            .fold(f64::NEG_INFINITY, f64::max);
        if finished.len() == width && finished.iter().all(|h| h.score() >= best_live) {
            live.clear();
            break;
        }
        let index = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            device,
        )?;
        cache = cache.select(&index)?;
        let tokens: Vec<u32> = live.iter().filter_map(|h| h.ids.last().copied()).collect();
        let n = tokens.len();
        inputs = decoder.embed_tokens(&Tensor::from_vec(tokens, (n, 1), device)?)?;
    }
    finished.extend(live);
    finished
        .into_iter()
        .max_by(|a, b| a.score().total_cmp(&b.score()))
        .ok_or_else(|| ModelError::InvalidInput("beam search produced nothing".to_string()))
}
