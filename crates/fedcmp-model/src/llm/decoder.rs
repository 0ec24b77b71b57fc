//! The frozen LLaMA-family decoder, run forward with a hand-written backward
//! that produces ONLY the gradient of the input embeddings.
//!
//! Why not candle's autograd: it would compute (and keep) gradients for every
//! frozen weight, and several of candle's fused ops (rms_norm, rope,
//! softmax_last_dim) silently have no backward at all (STACK.md, pitfall 1).
//! Here the frozen path is a plain forward that records what its backward
//! needs, and an explicit backward that multiplies by the transposed weights
//! and never forms a weight gradient. The trainable projector upstream keeps
//! candle's autograd (see `alignment`). Each block is a handful of coarse
//! operations so that fused kernels can later replace them one at a time
//! without changing this interface.
//!
//! Conventions: tensors are (batch, time, hidden); weights are stored as
//! PyTorch/Hugging Face do, (out, in); rotary embedding uses the Hugging Face
//! half-rotation layout (GGUF's interleaved layout is converted at load time).
//! Sequences are right-padded, so with a causal mask no real position ever
//! attends to padding and no padding mask is needed.

use candle_core::{DType, Device, Tensor, D};

use crate::error::{ModelError, Result};
use crate::llm::config::DecoderConfig;
use crate::weights::WeightMap;

/// One transformer block's frozen weights.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    attn_norm: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    bq: Option<Tensor>,
    bk: Option<Tensor>,
    bv: Option<Tensor>,
    wo: Tensor,
    ffn_norm: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
}

/// A frozen decoder LLM: token embedding, blocks, final norm, LM head.
#[derive(Debug, Clone)]
pub struct FrozenDecoder {
    config: DecoderConfig,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    final_norm: Tensor,
    lm_head: Tensor,
}

/// What one block's backward needs from its forward.
#[derive(Debug)]
struct LayerTrace {
    x: Tensor,
    inv_rms_attn: Tensor,
    q_grouped: Tensor,
    k: Tensor,
    v: Tensor,
    probs: Tensor,
    h: Tensor,
    inv_rms_ffn: Tensor,
    gate: Tensor,
    up: Tensor,
}

/// Activations recorded by [`FrozenDecoder::forward_traced`].
#[derive(Debug)]
pub struct DecoderTrace {
    layers: Vec<LayerTrace>,
    last_hidden: Tensor,
    inv_rms_final: Tensor,
    rope: Rope,
}

/// Keys and values of every layer for the positions fed so far to
/// [`FrozenDecoder::logits_cached`] (empty to start a sequence).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
}

impl KvCache {
    /// Every sequence's keys and values `times` times in a row (batch b
    /// becomes b * times: sequence i at rows i * times ..), so that several
    /// continuations share each context.
    pub fn repeat_each(&self, times: usize) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| -> Result<(Tensor, Tensor)> {
                let expand = |t: &Tensor| -> Result<Tensor> {
                    let (b, h, len, d) = t.dims4()?;
                    Ok(t.unsqueeze(1)?
                        .broadcast_as((b, times, h, len, d))?
                        .contiguous()?
                        .reshape((b * times, h, len, d))?)
                };
                Ok((expand(k)?, expand(v)?))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            len: self.len,
        })
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before anything was fed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Positions where the loss is taken and the tokens expected there.
#[derive(Debug, Clone)]
pub struct LossTargets {
    /// Flat indices `b * time + t` of the positions whose logits are scored.
    pub positions: Tensor,
    /// The token expected at each of those positions (u32).
    pub labels: Tensor,
}

impl LossTargets {
    /// Number of scored tokens.
    pub fn len(&self) -> usize {
        self.labels.elem_count()
    }

    /// True when nothing is scored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Rotary tables for one sequence length, in the model's dtype.
#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
    neg_sin: Tensor,
}

impl Rope {
    fn new(config: &DecoderConfig, time: usize, dtype: DType, device: &Device) -> Result<Self> {
        let half = config.head_dim / 2;
        let mut cos = Vec::with_capacity(time * half);
        let mut sin = Vec::with_capacity(time * half);
        for pos in 0..time {
            for i in 0..half {
                // Computed in f64 so that f32 and f64 models see the same angles.
                let inv_freq = config
                    .rope_theta
                    .powf(-(2.0 * i as f64) / config.head_dim as f64);
                let angle = pos as f64 * inv_freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (time, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (time, half), device)?.to_dtype(dtype)?;
        let neg_sin = sin.neg()?;
        Ok(Self { cos, sin, neg_sin })
    }

    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::rotary_emb::rope(x, &self.cos, &self.sin)?)
    }

    /// The rotation for positions `start..start + len` only.
    fn window(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            cos: self.cos.narrow(0, start, len)?,
            sin: self.sin.narrow(0, start, len)?,
            neg_sin: self.neg_sin.narrow(0, start, len)?,
        })
    }

    /// The rotation is orthogonal, so its transpose is the rotation by -angle.
    fn apply_transpose(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::rotary_emb::rope(x, &self.cos, &self.neg_sin)?)
    }
}

/// x (n, in) times W^T for W (out, in), plus an optional bias.
fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// 1 / sqrt(mean(x^2) + eps) over the last dimension, kept as (.., 1).
fn inv_rms(x: &Tensor, eps: f64) -> Result<Tensor> {
    Ok((x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?)
}

/// y = x * inv_rms * g.
fn rms_apply(x: &Tensor, inv: &Tensor, g: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_mul(inv)?.broadcast_mul(g)?)
}

/// Input gradient of y = g * x / rms(x):
/// dx = inv * (g*dy - x * inv^2 * mean(g*dy*x)).
fn rms_backward(x: &Tensor, inv: &Tensor, g: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let gy = dy.broadcast_mul(g)?;
    let dot = (&gy * x)?.mean_keepdim(D::Minus1)?;
    let coeff = (inv.sqr()? * dot)?;
    let dx = (gy - x.broadcast_mul(&coeff)?)?;
    Ok(dx.broadcast_mul(inv)?)
}

/// Grouped-query attention of `q` (b, nh, t, hd) over `k` and `v`
/// (b, nkv, total, hd) with an additive `mask` broadcast to
/// (b, nh, t, total); returns the grouped queries (b, nkv, g t, hd), the
/// attention probabilities (b, nkv, g t, total), both kept for the
/// backward pass, and the attended values as rows (b t, nh hd). Query
/// heads j*g..(j+1)*g share kv head j (Hugging Face's repeat_kv order), so
/// grouping them along time lets one batched matmul serve the whole group
/// without copying k and v.
fn grouped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    (nkv, g): (usize, usize),
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, nh, t, hd) = q.dims4()?;
    let total = k.dims()[2];
    let q_grouped = q.reshape((b, nkv, g * t, hd))?;
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = (q_grouped.matmul(&k.t()?)? * scale)?
        .reshape((b, nh, t, total))?
        .broadcast_add(mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((b, nkv, g * t, total))?;
    let attn = probs
        .matmul(v)?
        .reshape((b, nh, t, hd))?
        .transpose(1, 2)?
        .reshape((b * t, nh * hd))?;
    Ok((q_grouped, probs, attn))
}

fn causal_mask(time: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..time)
        .flat_map(|i| (0..time).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (time, time), device)?.to_dtype(dtype)?)
}

impl FrozenDecoder {
    /// Builds the decoder from Hugging Face tensor names
    /// (`model.layers.N.self_attn.q_proj.weight`, ...), checking every shape.
    pub fn from_weights(config: DecoderConfig, weights: &WeightMap) -> Result<Self> {
        config.validate(weights.origin())?;
        let d = config.hidden_size;
        let q_dim = config.num_heads * config.head_dim;
        let kv_dim = config.num_kv_heads * config.head_dim;
        let ffn = config.intermediate_size;
        let embed = weights.get("model.embed_tokens.weight", &[config.vocab_size, d])?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("model.layers.{i}");
            let bias = |name: &str, n: usize| -> Result<Option<Tensor>> {
                if config.attention_bias {
                    Ok(Some(
                        weights.get(&format!("{p}.self_attn.{name}.bias"), &[n])?,
                    ))
                } else {
                    Ok(None)
                }
            };
            layers.push(DecoderLayer {
                attn_norm: weights.get(&format!("{p}.input_layernorm.weight"), &[d])?,
                wq: weights.get(&format!("{p}.self_attn.q_proj.weight"), &[q_dim, d])?,
                wk: weights.get(&format!("{p}.self_attn.k_proj.weight"), &[kv_dim, d])?,
                wv: weights.get(&format!("{p}.self_attn.v_proj.weight"), &[kv_dim, d])?,
                bq: bias("q_proj", q_dim)?,
                bk: bias("k_proj", kv_dim)?,
                bv: bias("v_proj", kv_dim)?,
                wo: weights.get(&format!("{p}.self_attn.o_proj.weight"), &[d, q_dim])?,
                ffn_norm: weights.get(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
                w_gate: weights.get(&format!("{p}.mlp.gate_proj.weight"), &[ffn, d])?,
                w_up: weights.get(&format!("{p}.mlp.up_proj.weight"), &[ffn, d])?,
                w_down: weights.get(&format!("{p}.mlp.down_proj.weight"), &[d, ffn])?,
            });
        }
        let final_norm = weights.get("model.norm.weight", &[d])?;
        let lm_head = if config.tie_word_embeddings || !weights.contains("lm_head.weight") {
            if !config.tie_word_embeddings {
                tracing::warn!(
                    origin = %weights.origin().display(),
                    "no lm_head.weight: using the token embedding as the output head"
                );
            }
            embed.clone()
        } else {
            weights.get("lm_head.weight", &[config.vocab_size, d])?
        };
        Ok(Self {
            config,
            embed,
            layers,
            final_norm,
            lm_head,
        })
    }

    /// The configuration the decoder was built with.
    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// The dtype of the weights (f32 for training, f64 for gradient checks).
    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// Number of frozen parameters (tied heads counted once).
    pub fn num_parameters(&self) -> usize {
        let mut n = self.embed.elem_count() + self.final_norm.elem_count();
        if !self.config.tie_word_embeddings {
            n += self.lm_head.elem_count();
        }
        for l in &self.layers {
            for t in [
                &l.attn_norm,
                &l.wq,
                &l.wk,
                &l.wv,
                &l.wo,
                &l.ffn_norm,
                &l.w_gate,
                &l.w_up,
                &l.w_down,
            ] {
                n += t.elem_count();
            }
            for t in [&l.bq, &l.bk, &l.bv].into_iter().flatten() {
                n += t.elem_count();
            }
        }
        n
    }

    /// Converts every weight to `dtype` (f64 for finite-difference checks).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let c = |t: &Tensor| t.to_dtype(dtype);
        let co = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_dtype(dtype)).transpose();
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            layers.push(DecoderLayer {
                attn_norm: c(&l.attn_norm)?,
                wq: c(&l.wq)?,
                wk: c(&l.wk)?,
                wv: c(&l.wv)?,
                bq: co(&l.bq)?,
                bk: co(&l.bk)?,
                bv: co(&l.bv)?,
                wo: c(&l.wo)?,
                ffn_norm: c(&l.ffn_norm)?,
                w_gate: c(&l.w_gate)?,
                w_up: c(&l.w_up)?,
                w_down: c(&l.w_down)?,
            });
        }
        let embed = c(&self.embed)?;
        let lm_head = if self.config.tie_word_embeddings {
            embed.clone()
        } else {
            c(&self.lm_head)?
        };
        Ok(Self {
            config: self.config.clone(),
            embed,
            layers,
            final_norm: c(&self.final_norm)?,
            lm_head,
        })
    }

    /// Token embeddings: ids (batch, time) u32 -> (batch, time, hidden).
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let vocab = self.config.vocab_size;
        if let Some(bad) = flat
            .to_vec1::<u32>()?
            .into_iter()
            .find(|&id| id as usize >= vocab)
        {
            return Err(ModelError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary of {vocab} tokens"
            )));
        }
        Ok(self
            .embed
            .index_select(&flat, 0)?
            .reshape((b, t, self.config.hidden_size))?)
    }

    /// Logits at every position, for inference and reference checks:
    /// (batch, time, hidden) -> (batch, time, vocab).
    pub fn logits(&self, inputs_embeds: &Tensor) -> Result<Tensor> {
        let (hidden, _) = self.run(inputs_embeds, false)?;
        let (b, t, d) = hidden.dims3()?;
        let logits = linear(&hidden.reshape((b * t, d))?, &self.lm_head, None)?;
        Ok(logits.reshape((b, t, self.config.vocab_size))?)
    }

    /// Logits at the positions of `new_embeds` (batch, t_new, hidden), which
    /// follow the positions already in `cache`; the new keys and values are
    /// appended to it. Feeding a sequence in pieces gives the logits of
    /// [`Self::logits`] on the whole (up to float rounding), each piece
    /// costing only its own positions: greedy decoding without recomputing
    /// the prefix.
    pub fn logits_cached(&self, new_embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t, d) = new_embeds.dims3()?;
        if d != self.config.hidden_size {
            return Err(ModelError::InvalidInput(format!(
                "input embeddings have width {d}, the decoder expects {}",
                self.config.hidden_size
            )));
        }
        if cache.layers.len() != self.layers.len() && !cache.layers.is_empty() {
            return Err(ModelError::InvalidInput(
                "the KV cache belongs to another decoder".to_string(),
            ));
        }
        let start = cache.len;
        let rope =
            Rope::new(&self.config, start + t, self.dtype(), self.device())?.window(start, t)?;
        // New position i (absolute start + i) sees every position up to it.
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..start + t).map(move |j| {
                    if j > start + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, start + t), self.device())?.to_dtype(self.dtype())?;
        let mut x = new_embeds.contiguous()?;
        for (i, layer) in self.layers.iter().enumerate() {
            let past = cache.layers.get(i).cloned();
            let (out, k, v) = self.layer_forward_cached(layer, &x, &rope, &mask, past, (b, t))?;
            if i < cache.layers.len() {
                cache.layers[i] = (k, v);
            } else {
                cache.layers.push((k, v));
            }
            x = out;
        }
        cache.len += t;
        let inv = inv_rms(&x, self.config.rms_norm_eps)?;
        let hidden = rms_apply(&x, &inv, &self.final_norm)?;
        let logits = linear(&hidden.reshape((b * t, d))?, &self.lm_head, None)?;
        Ok(logits.reshape((b, t, self.config.vocab_size))?)
    }

    /// One block on new positions, attending to `past` keys and values
    /// (b, nkv, t_past, hd) too; returns its output and all keys and
    /// values so far.
    fn layer_forward_cached(
        &self,
        l: &DecoderLayer,
        x: &Tensor,
        rope: &Rope,
        mask: &Tensor,
        past: Option<(Tensor, Tensor)>,
        (b, t): (usize, usize),
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.config;
        let (nh, nkv, hd, g) = (c.num_heads, c.num_kv_heads, c.head_dim, c.group_size());
        let d = c.hidden_size;
        let inv = inv_rms(x, c.rms_norm_eps)?;
        let xn = rms_apply(x, &inv, &l.attn_norm)?.reshape((b * t, d))?;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = rope.apply(&heads(linear(&xn, &l.wq, l.bq.as_ref())?, nh)?)?;
        let k_new = rope.apply(&heads(linear(&xn, &l.wk, l.bk.as_ref())?, nkv)?)?;
        let v_new = heads(linear(&xn, &l.wv, l.bv.as_ref())?, nkv)?;
        let (k, v) = match past {
            Some((k, v)) => (
                Tensor::cat(&[&k, &k_new], 2)?.contiguous()?,
                Tensor::cat(&[&v, &v_new], 2)?.contiguous()?,
            ),
            None => (k_new, v_new),
        };
        let (_, _, attn) = grouped_attention(&q, &k, &v, mask, (nkv, g))?;
        let h = (x + linear(&attn, &l.wo, None)?.reshape((b, t, d))?)?;
        let inv_ffn = inv_rms(&h, c.rms_norm_eps)?;
        let hn = rms_apply(&h, &inv_ffn, &l.ffn_norm)?.reshape((b * t, d))?;
        let act =
            (candle_nn::ops::silu(&linear(&hn, &l.w_gate, None)?)? * linear(&hn, &l.w_up, None)?)?;
        let out = (&h + linear(&act, &l.w_down, None)?.reshape((b, t, d))?)?;
        Ok((out, k, v))
    }

    /// Mean caption cross-entropy at `targets`, without recording anything
    /// for a backward pass (evaluation).
    pub fn caption_loss(&self, inputs_embeds: &Tensor, targets: &LossTargets) -> Result<f64> {
        let (hidden, _) = self.run(inputs_embeds, false)?;
        let (loss, _) = self.head_loss(&hidden, targets, false)?;
        Ok(loss)
    }

    /// Mean caption cross-entropy at `targets` and its gradient with respect
    /// to `inputs_embeds`. No gradient of any frozen weight is formed.
    pub fn caption_loss_and_input_grad(
        &self,
        inputs_embeds: &Tensor,
        targets: &LossTargets,
    ) -> Result<(f64, Tensor)> {
        let (hidden, trace) = self.run(inputs_embeds, true)?;
        let trace = trace.ok_or_else(|| {
            ModelError::InvalidInput("internal: forward recorded no trace".to_string())
        })?;
        let (loss, d_hidden) = self.head_loss(&hidden, targets, true)?;
        let d_hidden = d_hidden.ok_or_else(|| {
            ModelError::InvalidInput("internal: loss produced no gradient".to_string())
        })?;
        let d_inputs = self.backward(&trace, &d_hidden)?;
        Ok((loss, d_inputs))
    }

    /// The blocks and the final norm; returns the normalised last hidden
    /// state and, when `record`, what the backward needs.
    fn run(&self, x: &Tensor, record: bool) -> Result<(Tensor, Option<DecoderTrace>)> {
        let (b, t, d) = x.dims3()?;
        if d != self.config.hidden_size {
            return Err(ModelError::InvalidInput(format!(
                "input embeddings have width {d}, the decoder expects {}",
                self.config.hidden_size
            )));
        }
        if x.dtype() != self.dtype() {
            return Err(ModelError::InvalidInput(format!(
                "input embeddings are {:?}, the decoder weights are {:?}",
                x.dtype(),
                self.dtype()
            )));
        }
        let rope = Rope::new(&self.config, t, self.dtype(), self.device())?;
        let mask = causal_mask(t, self.dtype(), self.device())?;
        let mut traces = Vec::with_capacity(if record { self.layers.len() } else { 0 });
        let mut x = x.contiguous()?;
        for layer in &self.layers {
            let (out, trace) = self.layer_forward(layer, &x, &rope, &mask, (b, t))?;
            if record {
                traces.push(trace);
            }
            x = out;
        }
        let inv = inv_rms(&x, self.config.rms_norm_eps)?;
        let hidden = rms_apply(&x, &inv, &self.final_norm)?;
        let trace = record.then(|| DecoderTrace {
            layers: traces,
            last_hidden: x,
            inv_rms_final: inv,
            rope,
        });
        Ok((hidden, trace))
    }

    fn layer_forward(
        &self,
        l: &DecoderLayer,
        x: &Tensor,
        rope: &Rope,
        mask: &Tensor,
        (b, t): (usize, usize),
    ) -> Result<(Tensor, LayerTrace)> {
        let c = &self.config;
        let (nh, nkv, hd, g) = (c.num_heads, c.num_kv_heads, c.head_dim, c.group_size());
        let d = c.hidden_size;
        let inv_rms_attn = inv_rms(x, c.rms_norm_eps)?;
        let xn = rms_apply(x, &inv_rms_attn, &l.attn_norm)?.reshape((b * t, d))?;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = heads(linear(&xn, &l.wq, l.bq.as_ref())?, nh)?;
        let k = heads(linear(&xn, &l.wk, l.bk.as_ref())?, nkv)?;
        let v = heads(linear(&xn, &l.wv, l.bv.as_ref())?, nkv)?;
        let q = rope.apply(&q)?;
        let k = rope.apply(&k)?;
        let (q_grouped, probs, attn) = grouped_attention(&q, &k, &v, mask, (nkv, g))?;
        let h = (x + linear(&attn, &l.wo, None)?.reshape((b, t, d))?)?;
        let inv_rms_ffn = inv_rms(&h, c.rms_norm_eps)?;
        let hn = rms_apply(&h, &inv_rms_ffn, &l.ffn_norm)?.reshape((b * t, d))?;
        let gate = linear(&hn, &l.w_gate, None)?;
        let up = linear(&hn, &l.w_up, None)?;
        let act = (candle_nn::ops::silu(&gate)? * &up)?;
        let out = (&h + linear(&act, &l.w_down, None)?.reshape((b, t, d))?)?;
        let trace = LayerTrace {
            x: x.clone(),
            inv_rms_attn,
            q_grouped,
            k,
            v,
            probs,
            h,
            inv_rms_ffn,
            gate,
            up,
        };
        Ok((out, trace))
    }

    /// Cross-entropy at the target positions only (the LM head never runs
    /// anywhere else) and, when `want_grad`, its gradient with respect to
    /// the normalised hidden state.
    /// Log-softmax over the vocabulary at the target positions of the
    /// flattened `(b * t, d)` hidden states, and the log-probability of each
    /// target token (`(n, 1)`).
    fn target_log_probs(&self, flat: &Tensor, targets: &LossTargets) -> Result<(Tensor, Tensor)> {
        let selected = flat.index_select(&targets.positions, 0)?;
        let logits = linear(&selected, &self.lm_head, None)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let picked = log_probs.gather(&targets.labels.unsqueeze(1)?, 1)?;
        Ok((log_probs, picked))
    }

    /// The log-probability of each target token, in target order (no
    /// gradient): the per-token scores behind [`Self::caption_loss`], for
    /// likelihood-based evaluation.
    pub fn target_token_log_probs(
        &self,
        inputs_embeds: &Tensor,
        targets: &LossTargets,
    ) -> Result<Vec<f64>> {
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let (hidden, _) = self.run(inputs_embeds, false)?;
        let (b, t, d) = hidden.dims3()?;
        let (_, picked) = self.target_log_probs(&hidden.reshape((b * t, d))?, targets)?;
        Ok(picked
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?)
    }

    fn head_loss(
        &self,
        hidden: &Tensor,
        targets: &LossTargets,
        want_grad: bool,
    ) -> Result<(f64, Option<Tensor>)> {
        let (b, t, d) = hidden.dims3()?;
        let n = targets.len();
        if n == 0 {
            return Err(ModelError::InvalidInput(
                "the batch has no caption token to score".to_string(),
            ));
        }
        if targets.positions.elem_count() != n {
            return Err(ModelError::InvalidInput(format!(
                "{} loss positions but {n} labels",
                targets.positions.elem_count()
            )));
        }
        let flat = hidden.reshape((b * t, d))?;
        let (log_probs, picked) = self.target_log_probs(&flat, targets)?;
        let labels = targets.labels.unsqueeze(1)?;
        let loss = -picked.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()? / n as f64;
        if !want_grad {
            return Ok((loss, None));
        }
        // d(mean CE)/d logits = (softmax - onehot) / n.
        let probs = log_probs.exp()?;
        let minus_one = Tensor::full(-1.0f32, (n, 1), hidden.device())?.to_dtype(probs.dtype())?;
        let d_logits = (probs.scatter_add(&labels, &minus_one, 1)? / n as f64)?;
        let d_selected = d_logits.matmul(&self.lm_head)?;
        let d_flat = flat
            .zeros_like()?
            .index_add(&targets.positions, &d_selected, 0)?;
        Ok((loss, Some(d_flat.reshape((b, t, d))?)))
    }

    /// Backward through final norm and blocks: d(normalised last hidden) ->
    /// d(input embeddings).
    fn backward(&self, trace: &DecoderTrace, d_hidden: &Tensor) -> Result<Tensor> {
        let mut dx = rms_backward(
            &trace.last_hidden,
            &trace.inv_rms_final,
            &self.final_norm,
            d_hidden,
        )?;
        for (layer, lt) in self.layers.iter().zip(&trace.layers).rev() {
            dx = self.layer_backward(layer, lt, &trace.rope, &dx)?;
        }
        Ok(dx)
    }

    fn layer_backward(
        &self,
        l: &DecoderLayer,
        s: &LayerTrace,
        rope: &Rope,
        d_out: &Tensor,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (nh, nkv, hd, g) = (c.num_heads, c.num_kv_heads, c.head_dim, c.group_size());
        let (b, t, d) = d_out.dims3()?;
        let n = b * t;

        // Feed-forward: out = h + W_down (silu(W_gate hn) * W_up hn).
        let d_act = d_out.reshape((n, d))?.matmul(&l.w_down)?;
        let sig = candle_nn::ops::sigmoid(&s.gate)?;
        let silu = (&s.gate * &sig)?;
        // silu'(z) = sig(z) * (1 + z * (1 - sig(z))).
        let dsilu = (&sig * ((&s.gate * (1.0 - &sig)?)? + 1.0)?)?;
        let d_gate = ((&d_act * &s.up)? * dsilu)?;
        let d_up = (&d_act * silu)?;
        let d_hn = (d_gate.matmul(&l.w_gate)? + d_up.matmul(&l.w_up)?)?.reshape((b, t, d))?;
        let d_h = (d_out + rms_backward(&s.h, &s.inv_rms_ffn, &l.ffn_norm, &d_hn)?)?;

        // Attention: h = x + W_o attn.
        let d_attn = d_h.reshape((n, d))?.matmul(&l.wo)?;
        let d_o = d_attn
            .reshape((b, t, nh, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, nkv, g * t, hd))?;
        let d_probs = d_o.matmul(&s.v.t()?)?;
        let d_v = s.probs.t()?.matmul(&d_o)?;
        // Softmax backward: dS = P * (dP - sum(dP * P)).
        let row_dot = (&d_probs * &s.probs)?.sum_keepdim(D::Minus1)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let d_scores = ((&s.probs * d_probs.broadcast_sub(&row_dot)?)? * scale)?;
        let d_q = d_scores
            .matmul(&s.k)?
            .reshape((b, nh, t, hd))?
            .contiguous()?;
        let d_k = d_scores.t()?.matmul(&s.q_grouped)?.contiguous()?;
        let d_q = rope.apply_transpose(&d_q)?;
        let d_k = rope.apply_transpose(&d_k)?;
        let flat = |y: Tensor, heads: usize| -> Result<Tensor> {
            Ok(y.transpose(1, 2)?.reshape((n, heads * hd))?)
        };
        let d_xn = ((flat(d_q, nh)?.matmul(&l.wq)? + flat(d_k, nkv)?.matmul(&l.wk)?)?
            + flat(d_v, nkv)?.matmul(&l.wv)?)?
        .reshape((b, t, d))?;
        Ok((d_h + rms_backward(&s.x, &s.inv_rms_attn, &l.attn_norm, &d_xn)?)?)
    }
}
