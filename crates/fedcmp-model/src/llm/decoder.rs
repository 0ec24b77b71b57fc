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
//!
//! Packing: when a loss is taken, the blocks run only on the positions it
//! needs, each sequence up to its last scored position (padding, and the
//! final token that predicts nothing, are never computed). Every
//! row-wise operation (norms, projections, MLP: nearly all the FLOPs)
//! works on those rows packed into one (rows, hidden) matrix; only
//! attention lays them out per sequence again ([`Packing`]). Outputs are
//! the same as on the padded batch up to float rounding.

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::llm::config::DecoderConfig;
use crate::llm::kernels;
use crate::weights::WeightMap;

/// One transformer block's frozen weights. The q, k and v projections are
/// stacked into one matrix, and so are gate and up: one product each
/// instead of three and two, forward and backward.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    attn_norm: Tensor,
    /// (q_dim + 2 kv_dim, hidden): q rows, then k, then v.
    w_qkv: Tensor,
    b_qkv: Option<Tensor>,
    wo: Tensor,
    ffn_norm: Tensor,
    /// (2 ffn, hidden): gate rows, then up.
    w_gate_up: Tensor,
    w_down: Tensor,
}

impl DecoderLayer {
    /// Every weight of the block (the q/k/v bias where it has one).
    fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        [
            &self.attn_norm,
            &self.w_qkv,
            &self.wo,
            &self.ffn_norm,
            &self.w_gate_up,
            &self.w_down,
        ]
        .into_iter()
        .chain(self.b_qkv.as_ref())
    }
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

/// What one block's backward needs from its forward (row tensors are
/// packed, attention tensors per sequence; see [`Packing`]).
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
    gate_up: Tensor,
}

/// Activations recorded by [`FrozenDecoder::forward_traced`].
#[derive(Debug)]
struct DecoderTrace {
    layers: Vec<LayerTrace>,
    last_hidden: Tensor,
    inv_rms_final: Tensor,
    rope: Rope,
}

/// Which positions of a right-padded (batch, time) input the blocks run
/// on: sequence i its first `lengths[i]` positions, packed row after row
/// into one (rows, hidden) matrix. Attention needs each sequence's
/// positions together again: it runs on a (batch, heads, span, head_dim)
/// layout, span the longest length, gathered from the packed rows in one
/// copy (positions past a sequence's end read row 0 in the forward, whose
/// values nobody attends to, and zero in the backward).
#[derive(Debug)]
struct Packing {
    batch: usize,
    span: usize,
    rows: usize,
    /// Packed row -> flat input position (b * time + s).
    input_rows: Tensor,
    /// Flat input position -> packed row, `rows` (a zero row) where none.
    to_input: Tensor,
    /// Flat input position -> packed row, where one.
    packed_of: Vec<Option<u32>>,
    /// Per sequence position (b, s < span): its packed row, or None.
    span_rows: Vec<Option<u32>>,
}

impl Packing {
    fn new(batch: usize, time: usize, lengths: &[usize], device: &Device) -> Result<Self> {
        let span = lengths.iter().copied().max().unwrap_or(0).max(1);
        let mut input_rows = Vec::new();
        let mut packed_of = vec![None; batch * time];
        let mut span_rows = vec![None; batch * span];
        for (b, &len) in lengths.iter().enumerate() {
            for s in 0..len.min(time) {
                let row = input_rows.len() as u32;
                packed_of[b * time + s] = Some(row);
                span_rows[b * span + s] = Some(row);
                input_rows.push((b * time + s) as u32);
            }
        }
        let rows = input_rows.len();
        let to_input: Vec<u32> = packed_of.iter().map(|r| r.unwrap_or(rows as u32)).collect();
        Ok(Self {
            batch,
            span,
            rows,
            input_rows: Tensor::from_vec(input_rows, rows, device)?,
            to_input: Tensor::from_vec(to_input, batch * time, device)?,
            packed_of,
            span_rows,
        })
    }

    /// Every position of every sequence.
    fn full(batch: usize, time: usize, device: &Device) -> Result<Self> {
        Self::new(batch, time, &vec![time; batch], device)
    }

    /// Each sequence up to its last scored position: the only positions
    /// a loss at `targets` depends on (causal attention).
    fn for_targets(
        batch: usize,
        time: usize,
        targets: &LossTargets,
        device: &Device,
    ) -> Result<Self> {
        let mut lengths = vec![0usize; batch];
        for p in targets.positions.to_vec1::<u32>()? {
            let p = p as usize;
            if p >= batch * time {
                return Err(ModelError::InvalidInput(format!(
                    "loss position {p} is outside a batch of {batch} x {time} positions"
                )));
            }
            let (b, s) = (p / time, p % time);
            lengths[b] = lengths[b].max(s + 1);
        }
        Self::new(batch, time, &lengths, device)
    }

    /// `targets` with positions renumbered as packed rows.
    fn targets(&self, targets: &LossTargets) -> Result<LossTargets> {
        let positions = targets
            .positions
            .to_vec1::<u32>()?
            .into_iter()
            .map(|p| {
                self.packed_of
                    .get(p as usize)
                    .copied()
                    .flatten()
                    .ok_or_else(|| {
                        ModelError::InvalidInput(format!("loss position {p} is not packed"))
                    })
            })
            .collect::<Result<Vec<u32>>>()?;
        let n = positions.len();
        Ok(LossTargets {
            positions: Tensor::from_vec(positions, n, targets.positions.device())?,
            labels: targets.labels.clone(),
        })
    }

    /// (batch, time, d) -> packed (rows, d).
    fn pack(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        Ok(x.reshape((b * t, d))?.index_select(&self.input_rows, 0)?)
    }

    /// Packed (rows, d) -> (batch, time, d), zero where nothing ran.
    fn unpack(&self, y: &Tensor, time: usize) -> Result<Tensor> {
        let d = y.dim(1)?;
        let zero = Tensor::zeros((1, d), y.dtype(), y.device())?;
        Ok(Tensor::cat(&[y, &zero], 0)?
            .index_select(&self.to_input, 0)?
            .reshape((self.batch, time, d))?)
    }

    /// Heads `first..first + heads` of packed rows `y` (rows, all * hd)
    /// as (batch, heads, span, hd); positions past a sequence's end read
    /// packed row `fill` (row 0, or the zero row appended at `rows`).
    fn gather_heads(
        &self,
        y: &Tensor,
        (all, first, heads): (usize, usize, usize),
        fill: u32,
    ) -> Result<Tensor> {
        let hd = y.dim(1)? / all;
        let (b, span) = (self.batch, self.span);
        let mut index = Vec::with_capacity(b * heads * span);
        for bi in 0..b {
            for h in first..first + heads {
                for s in 0..span {
                    let row = self.span_rows[bi * span + s].unwrap_or(fill);
                    index.push(row * all as u32 + h as u32);
                }
            }
        }
        let n = index.len();
        let rows = y.dim(0)?;
        Ok(y.reshape((rows * all, hd))?
            .index_select(&Tensor::from_vec(index, n, y.device())?, 0)?
            .reshape((b, heads, span, hd))?)
    }

    /// Heads `first..first + heads` of packed rows (rows, all * hd) as
    /// (batch, heads, span, hd) for the forward (past the end: row 0, never
    /// attended to).
    fn to_heads(&self, y: &Tensor, all: usize, first: usize, heads: usize) -> Result<Tensor> {
        self.gather_heads(y, (all, first, heads), 0)
    }

    /// Packed (rows, heads * hd) as (batch, heads, span, hd), zeros past
    /// the end (gradients).
    fn to_heads_zero_filled(&self, y: &Tensor, heads: usize) -> Result<Tensor> {
        let zero = Tensor::zeros((1, y.dim(1)?), y.dtype(), y.device())?;
        let padded = Tensor::cat(&[y, &zero], 0)?;
        self.gather_heads(&padded, (heads, 0, heads), self.rows as u32)
    }

    /// (batch, heads, span, hd) -> packed (rows, heads * hd).
    fn rows_from_heads(&self, z: &Tensor) -> Result<Tensor> {
        let (b, heads, span, hd) = z.dims4()?;
        let mut index = Vec::with_capacity(self.rows * heads);
        for bi in 0..b {
            for s in 0..span {
                if self.span_rows[bi * span + s].is_some() {
                    for h in 0..heads {
                        index.push(((bi * heads + h) * span + s) as u32);
                    }
                }
            }
        }
        let n = index.len();
        Ok(z.contiguous()?
            .reshape((b * heads * span, hd))?
            .index_select(&Tensor::from_vec(index, n, z.device())?, 0)?
            .reshape((self.rows, heads * hd))?)
    }
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

    /// The sequences at `rows` (a u32 index, repeats allowed), in that
    /// order: beam search keeps the contexts of the hypotheses it keeps.
    pub fn select(&self, rows: &Tensor) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| Ok((k.index_select(rows, 0)?, v.index_select(rows, 0)?)))
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
    let y = kernels::matmul(x, &w.t()?)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// Grouped-query attention of `q` (b, nh, t, hd) over `k` and `v`
/// (b, nkv, total, hd) with an additive `mask` broadcast to
/// (b, nh, t, total); returns the grouped queries (b, nkv, g t, hd), the
/// attention probabilities (b, nkv, g t, total), both kept for the
/// backward pass, and the attended values (b, nh, t, hd). Query heads
/// j*g..(j+1)*g share kv head j (Hugging Face's repeat_kv order), so
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
    let scores = (kernels::matmul(&q_grouped, &k.t()?)? * scale)?
        .reshape((b, nh, t, total))?
        .broadcast_add(mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((b, nkv, g * t, total))?;
    let attn = kernels::matmul(&probs, v)?.reshape((b, nh, t, hd))?;
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
        Self::from_weight_map(config, weights.clone())
    }

    /// Like [`Self::from_weights`], taking the map: each layer's q/k/v and
    /// gate/up are stacked and their separate tensors freed as it goes, so
    /// loading never holds both copies of the model.
    pub fn from_weight_map(config: DecoderConfig, mut weights: WeightMap) -> Result<Self> {
        config.validate(weights.origin())?;
        let d = config.hidden_size;
        let q_dim = config.num_heads * config.head_dim;
        let kv_dim = config.num_kv_heads * config.head_dim;
        let ffn = config.intermediate_size;
        let embed = weights.get("model.embed_tokens.weight", &[config.vocab_size, d])?;
        // Every layer needs tensors of its own: a layer count from a file's
        // metadata is bounded by the tensors the file holds (a hostile
        // `block_count` of 2^32 made this reserve 220 GB; found by fuzzing).
        let mut layers = Vec::with_capacity(config.num_layers.min(weights.len()));
        for i in 0..config.num_layers {
            let p = format!("model.layers.{i}");
            let mut take = |name: String, shape: &[usize]| -> Result<Tensor> {
                let t = weights.get(&name, shape)?;
                weights.remove(&name);
                Ok(t)
            };
            let mut attn = |name: &str, n: usize| -> Result<Tensor> {
                take(format!("{p}.self_attn.{name}.weight"), &[n, d])
            };
            let w_qkv = Tensor::cat(
                &[
                    attn("q_proj", q_dim)?,
                    attn("k_proj", kv_dim)?,
                    attn("v_proj", kv_dim)?,
                ],
                0,
            )?;
            let b_qkv = if config.attention_bias {
                let mut bias = |name: &str, n: usize| -> Result<Tensor> {
                    take(format!("{p}.self_attn.{name}.bias"), &[n])
                };
                Some(Tensor::cat(
                    &[
                        bias("q_proj", q_dim)?,
                        bias("k_proj", kv_dim)?,
                        bias("v_proj", kv_dim)?,
                    ],
                    0,
                )?)
            } else {
                None
            };
            let w_gate_up = Tensor::cat(
                &[
                    take(format!("{p}.mlp.gate_proj.weight"), &[ffn, d])?,
                    take(format!("{p}.mlp.up_proj.weight"), &[ffn, d])?,
                ],
                0,
            )?;
            layers.push(DecoderLayer {
                attn_norm: weights.get(&format!("{p}.input_layernorm.weight"), &[d])?,
                w_qkv,
                b_qkv,
                wo: weights.get(&format!("{p}.self_attn.o_proj.weight"), &[d, q_dim])?,
                ffn_norm: weights.get(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
                w_gate_up,
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

    /// `per_tensor` evenly spaced values of every weight (as f32), in a
    /// fixed order: enough to tell two decoders apart without hashing
    /// hundreds of megabytes (what memoised evaluations are keyed by).
    pub fn weight_sample(&self, per_tensor: usize) -> Result<Vec<f32>> {
        let mut tensors = vec![&self.embed, &self.final_norm, &self.lm_head];
        for l in &self.layers {
            tensors.extend(l.tensors());
        }
        let mut out = Vec::with_capacity(tensors.len() * per_tensor);
        for t in tensors {
            let n = t.elem_count();
            if n == 0 || per_tensor == 0 {
                continue;
            }
            let picks: Vec<u32> = (0..per_tensor.min(n))
                .map(|i| (i * n / per_tensor.min(n)) as u32)
                .collect();
            let count = picks.len();
            out.extend(
                t.flatten_all()?
                    .index_select(&Tensor::from_vec(picks, count, t.device())?, 0)?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?,
            );
        }
        Ok(out)
    }

    /// Number of frozen parameters (tied heads counted once).
    pub fn num_parameters(&self) -> usize {
        let mut n = self.embed.elem_count() + self.final_norm.elem_count();
        if !self.config.tie_word_embeddings {
            n += self.lm_head.elem_count();
        }
        for l in &self.layers {
            n += l.tensors().map(Tensor::elem_count).sum::<usize>();
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
                w_qkv: c(&l.w_qkv)?,
                b_qkv: co(&l.b_qkv)?,
                wo: c(&l.wo)?,
                ffn_norm: c(&l.ffn_norm)?,
                w_gate_up: c(&l.w_gate_up)?,
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
        let (b, t, _) = inputs_embeds.dims3()?;
        let packing = Packing::full(b, t, self.device())?;
        let (hidden, _) = self.run(inputs_embeds, &packing, false)?;
        let logits = linear(&hidden, &self.lm_head, None)?;
        Ok(logits.reshape((b, t, self.config.vocab_size))?)
    }

    /// Logits at the positions of `new_embeds` (batch, t_new, hidden), which
    /// follow the positions already in `cache`; the new keys and values are
    /// appended to it. Feeding a sequence in pieces gives the logits of
    /// [`Self::logits`] on the whole (up to float rounding), each piece
    /// costing only its own positions: greedy decoding without recomputing
    /// the prefix.
    pub fn logits_cached(&self, new_embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t, _) = new_embeds.dims3()?;
        let hidden = self.hidden_cached(new_embeds, cache)?;
        let logits = linear(&hidden, &self.lm_head, None)?;
        Ok(logits.reshape((b, t, self.config.vocab_size))?)
    }

    /// Like [`Self::logits_cached`], with the LM head at each sequence's
    /// last new position only: (batch, vocab), what the next token is
    /// chosen from.
    pub fn last_logits_cached(&self, new_embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t, _) = new_embeds.dims3()?;
        let hidden = self.hidden_cached(new_embeds, cache)?;
        let last: Vec<u32> = (0..b).map(|i| (i * t + t - 1) as u32).collect();
        let last = hidden.index_select(&Tensor::from_vec(last, b, self.device())?, 0)?;
        linear(&last, &self.lm_head, None)
    }

    /// The normalised hidden states of every position of `new_embeds`
    /// (batch, t, hidden) after `cache`, as (batch * t, hidden) rows.
    fn hidden_cached(&self, new_embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t, _) = new_embeds.dims3()?;
        let packing = Packing::full(b, t, self.device())?;
        self.run_cached(new_embeds, &packing, cache)
    }

    /// The log-probability of each target token after `cache`, no
    /// gradient: `new_embeds` (batch, t, hidden) is right-padded, sequence
    /// i's first `lengths[i]` positions are real and the blocks run on
    /// those only; `next[i][s]` is the token expected after position s of
    /// sequence i (`lengths[i]` of them). Returns them sequence by
    /// sequence. The cache is left as it was (scoring many continuations
    /// of one context).
    pub fn continuation_log_probs_cached(
        &self,
        new_embeds: &Tensor,
        lengths: &[usize],
        next: &[Vec<u32>],
        cache: &KvCache,
    ) -> Result<Vec<Vec<f64>>> {
        let (b, t, _) = new_embeds.dims3()?;
        if lengths.len() != b || next.len() != b {
            return Err(ModelError::InvalidInput(format!(
                "{} lengths and {} target lists for {b} sequences",
                lengths.len(),
                next.len()
            )));
        }
        if let Some(i) = (0..b).find(|&i| lengths[i] > t || next[i].len() != lengths[i]) {
            return Err(ModelError::InvalidInput(format!(
                "sequence {i}: {} real positions of {t}, {} targets",
                lengths[i],
                next[i].len()
            )));
        }
        let packing = Packing::new(b, t, lengths, self.device())?;
        if packing.rows == 0 {
            return Ok(vec![Vec::new(); b]);
        }
        let mut scratch = cache.clone();
        let hidden = self.run_cached(new_embeds, &packing, &mut scratch)?;
        // Packed rows are sequence by sequence, position by position.
        let labels: Vec<u32> = next.iter().flatten().copied().collect();
        let n = labels.len();
        let targets = LossTargets {
            positions: Tensor::arange(0u32, n as u32, self.device())?,
            labels: Tensor::from_vec(labels, n, self.device())?,
        };
        let (nll, _) = self.head_nll(&hidden, &targets, None)?;
        let mut out = Vec::with_capacity(b);
        let mut at = 0;
        for &len in lengths {
            out.push(nll[at..at + len].iter().map(|v| -v).collect());
            at += len;
        }
        Ok(out)
    }

    /// The blocks and the final norm on the positions of `new_embeds`
    /// (batch, t, hidden) that `packing` selects, after the positions in
    /// `cache` (which gains the keys and values of all t positions, so a
    /// padded batch must not be extended further); returns the normalised
    /// hidden states as packed rows.
    fn run_cached(
        &self,
        new_embeds: &Tensor,
        packing: &Packing,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
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
        if let Some((k, _)) = cache.layers.first() {
            if k.dim(0)? != b {
                return Err(ModelError::InvalidInput(format!(
                    "the KV cache holds {} sequences, the input {b}",
                    k.dim(0)?
                )));
            }
        }
        let span = packing.span;
        if packing.batch != b || span > t {
            return Err(ModelError::InvalidInput(
                "internal: the packing does not fit the input".to_string(),
            ));
        }
        let start = cache.len;
        let rope = Rope::new(&self.config, start + span, self.dtype(), self.device())?
            .window(start, span)?;
        // New position i (absolute start + i) sees every position up to it.
        let mask: Vec<f32> = (0..span)
            .flat_map(|i| {
                (0..start + span).map(move |j| {
                    if j > start + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask =
            Tensor::from_vec(mask, (span, start + span), self.device())?.to_dtype(self.dtype())?;
        let mut x = packing.pack(&new_embeds.contiguous()?)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let past = cache.layers.get(i).cloned();
            let (out, k, v) = self.layer_forward_cached(layer, &x, &rope, &mask, past, packing)?;
            if i < cache.layers.len() {
                cache.layers[i] = (k, v);
            } else {
                cache.layers.push((k, v));
            }
            x = out;
        }
        cache.len += span;
        let (hidden, _) = kernels::rms_norm(&x, &self.final_norm, self.config.rms_norm_eps)?;
        Ok(hidden)
    }

    /// One block on new packed rows `x` (rows, hidden), attending to
    /// `past` keys and values (b, nkv, t_past, hd) too; returns its output
    /// rows and all keys and values so far (b, nkv, t_past + span, hd).
    fn layer_forward_cached(
        &self,
        l: &DecoderLayer,
        x: &Tensor,
        rope: &Rope,
        mask: &Tensor,
        past: Option<(Tensor, Tensor)>,
        packing: &Packing,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.config;
        let (nh, nkv, g) = (c.num_heads, c.num_kv_heads, c.group_size());
        let (xn, _) = kernels::rms_norm(x, &l.attn_norm, c.rms_norm_eps)?;
        let qkv = linear(&xn, &l.w_qkv, l.b_qkv.as_ref())?;
        let all = nh + 2 * nkv;
        let q = rope.apply(&packing.to_heads(&qkv, all, 0, nh)?)?;
        let k_new = rope.apply(&packing.to_heads(&qkv, all, nh, nkv)?)?;
        let v_new = packing.to_heads(&qkv, all, nh + nkv, nkv)?;
        let (k, v) = match past {
            Some((k, v)) => (
                Tensor::cat(&[&k, &k_new], 2)?.contiguous()?,
                Tensor::cat(&[&v, &v_new], 2)?.contiguous()?,
            ),
            None => (k_new, v_new),
        };
        let (_, _, attn) = grouped_attention(&q, &k, &v, mask, (nkv, g))?;
        let h = (x + linear(&packing.rows_from_heads(&attn)?, &l.wo, None)?)?;
        let (hn, _) = kernels::rms_norm(&h, &l.ffn_norm, c.rms_norm_eps)?;
        let act = kernels::silu_gate(&linear(&hn, &l.w_gate_up, None)?)?;
        let out = (&h + linear(&act, &l.w_down, None)?)?;
        Ok((out, k, v))
    }

    /// Mean caption cross-entropy at `targets`, without recording anything
    /// for a backward pass (evaluation).
    pub fn caption_loss(&self, inputs_embeds: &Tensor, targets: &LossTargets) -> Result<f64> {
        let (packing, targets) = self.packing_for(inputs_embeds, targets)?;
        let (hidden, _) = self.run(inputs_embeds, &packing, false)?;
        let (nll, _) = self.head_nll(&hidden, &targets, None)?;
        Ok(nll.iter().sum::<f64>() / nll.len() as f64)
    }

    /// Mean caption cross-entropy at `targets` and its gradient with respect
    /// to `inputs_embeds`. No gradient of any frozen weight is formed.
    pub fn caption_loss_and_input_grad(
        &self,
        inputs_embeds: &Tensor,
        targets: &LossTargets,
    ) -> Result<(f64, Tensor)> {
        // d(mean CE) = sum over tokens of d(CE) / n.
        let n = targets.len().max(1);
        let (nll, d_inputs) =
            self.weighted_nll_and_input_grad(inputs_embeds, targets, &vec![1.0 / n as f64; n])?;
        Ok((nll.iter().sum::<f64>() / n as f64, d_inputs))
    }

    /// The cross-entropy of each target token (in target order) and the
    /// gradient of `sum_j weights[j] * nll[j]` with respect to
    /// `inputs_embeds`: with weights 1 / n_g over each group g of targets,
    /// the gradient of the sum of the groups' mean losses, i.e. several
    /// independent batches' gradients from one pass.
    pub fn weighted_nll_and_input_grad(
        &self,
        inputs_embeds: &Tensor,
        targets: &LossTargets,
        weights: &[f64],
    ) -> Result<(Vec<f64>, Tensor)> {
        if weights.len() != targets.len() {
            return Err(ModelError::InvalidInput(format!(
                "{} loss weights for {} targets",
                weights.len(),
                targets.len()
            )));
        }
        let (packing, packed_targets) = self.packing_for(inputs_embeds, targets)?;
        let (hidden, trace) = self.run(inputs_embeds, &packing, true)?;
        let trace = trace.ok_or_else(|| {
            ModelError::InvalidInput("internal: forward recorded no trace".to_string())
        })?;
        let (nll, d_hidden) = self.head_nll(&hidden, &packed_targets, Some(weights))?;
        let d_hidden = d_hidden.ok_or_else(|| {
            ModelError::InvalidInput("internal: loss produced no gradient".to_string())
        })?;
        let d_inputs = self.backward(&trace, &packing, &d_hidden)?;
        Ok((nll, packing.unpack(&d_inputs, inputs_embeds.dim(1)?)?))
    }

    /// The packing a loss at `targets` needs, and the targets renumbered
    /// as its rows.
    fn packing_for(
        &self,
        inputs_embeds: &Tensor,
        targets: &LossTargets,
    ) -> Result<(Packing, LossTargets)> {
        let (b, t, _) = inputs_embeds.dims3()?;
        if targets.is_empty() {
            return Err(ModelError::InvalidInput(
                "the batch has no caption token to score".to_string(),
            ));
        }
        let packing = Packing::for_targets(b, t, targets, self.device())?;
        let renumbered = packing.targets(targets)?;
        Ok((packing, renumbered))
    }

    /// The blocks and the final norm on the rows `packing` selects; returns
    /// the normalised last hidden state (rows, hidden) and, when `record`,
    /// what the backward needs.
    fn run(
        &self,
        x: &Tensor,
        packing: &Packing,
        record: bool,
    ) -> Result<(Tensor, Option<DecoderTrace>)> {
        let (_, _, d) = x.dims3()?;
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
        let span = packing.span;
        let rope = Rope::new(&self.config, span, self.dtype(), self.device())?;
        let mask = causal_mask(span, self.dtype(), self.device())?;
        let mut traces = Vec::with_capacity(if record { self.layers.len() } else { 0 });
        let mut x = packing.pack(&x.contiguous()?)?;
        for layer in &self.layers {
            let (out, trace) = self.layer_forward(layer, &x, &rope, &mask, packing)?;
            if record {
                traces.push(trace);
            }
            x = out;
        }
        let (hidden, inv) = kernels::rms_norm(&x, &self.final_norm, self.config.rms_norm_eps)?;
        let trace = record.then(|| DecoderTrace {
            layers: traces,
            last_hidden: x,
            inv_rms_final: inv,
            rope,
        });
        Ok((hidden, trace))
    }

    /// One block on packed rows `x` (rows, hidden).
    fn layer_forward(
        &self,
        l: &DecoderLayer,
        x: &Tensor,
        rope: &Rope,
        mask: &Tensor,
        packing: &Packing,
    ) -> Result<(Tensor, LayerTrace)> {
        let c = &self.config;
        let (nh, nkv, g) = (c.num_heads, c.num_kv_heads, c.group_size());
        let (xn, inv_rms_attn) = kernels::rms_norm(x, &l.attn_norm, c.rms_norm_eps)?;
        let qkv = linear(&xn, &l.w_qkv, l.b_qkv.as_ref())?;
        let all = nh + 2 * nkv;
        let q = rope.apply(&packing.to_heads(&qkv, all, 0, nh)?)?;
        let k = rope.apply(&packing.to_heads(&qkv, all, nh, nkv)?)?;
        let v = packing.to_heads(&qkv, all, nh + nkv, nkv)?;
        let (q_grouped, probs, attn) = grouped_attention(&q, &k, &v, mask, (nkv, g))?;
        let h = (x + linear(&packing.rows_from_heads(&attn)?, &l.wo, None)?)?;
        let (hn, inv_rms_ffn) = kernels::rms_norm(&h, &l.ffn_norm, c.rms_norm_eps)?;
        let gate_up = linear(&hn, &l.w_gate_up, None)?;
        let act = kernels::silu_gate(&gate_up)?;
        let out = (&h + linear(&act, &l.w_down, None)?)?;
        let trace = LayerTrace {
            x: x.clone(),
            inv_rms_attn,
            q_grouped,
            k,
            v,
            probs,
            h,
            inv_rms_ffn,
            gate_up,
        };
        Ok((out, trace))
    }

    /// The cross-entropy of each target token, in target order, from the
    /// packed hidden states (rows, hidden): the LM head runs at the target
    /// rows only. With `weights` (one per target), also the gradient of
    /// `sum weights * nll` with respect to the hidden states.
    fn head_nll(
        &self,
        hidden: &Tensor,
        targets: &LossTargets,
        weights: Option<&[f64]>,
    ) -> Result<(Vec<f64>, Option<Tensor>)> {
        let n = targets.len();
        if targets.positions.elem_count() != n {
            return Err(ModelError::InvalidInput(format!(
                "{} loss positions but {n} labels",
                targets.positions.elem_count()
            )));
        }
        let selected = hidden.index_select(&targets.positions, 0)?;
        let logits = linear(&selected, &self.lm_head, None)?;
        let labels = targets.labels.to_vec1::<u32>()?;
        let (nll, d_logits) = kernels::cross_entropy(&logits, &labels, weights)?;
        let d_hidden = match d_logits {
            Some(d_logits) => Some(hidden.zeros_like()?.index_add(
                &targets.positions,
                &kernels::matmul(&d_logits, &self.lm_head)?,
                0,
            )?),
            None => None,
        };
        Ok((nll, d_hidden))
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
        let (packing, targets) = self.packing_for(inputs_embeds, targets)?;
        let (hidden, _) = self.run(inputs_embeds, &packing, false)?;
        let (nll, _) = self.head_nll(&hidden, &targets, None)?;
        Ok(nll.into_iter().map(|v| -v).collect())
    }

    /// Backward through final norm and blocks: d(normalised last hidden) ->
    /// d(input embeddings), both as packed rows.
    fn backward(
        &self,
        trace: &DecoderTrace,
        packing: &Packing,
        d_hidden: &Tensor,
    ) -> Result<Tensor> {
        let mut dx = kernels::rms_norm_backward(
            &trace.last_hidden,
            &trace.inv_rms_final,
            &self.final_norm,
            d_hidden,
            &d_hidden.zeros_like()?,
        )?;
        for (layer, lt) in self.layers.iter().zip(&trace.layers).rev() {
            dx = self.layer_backward(layer, lt, &trace.rope, packing, &dx)?;
        }
        Ok(dx)
    }

    fn layer_backward(
        &self,
        l: &DecoderLayer,
        s: &LayerTrace,
        rope: &Rope,
        packing: &Packing,
        d_out: &Tensor,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);

        // Feed-forward: out = h + W_down (silu(W_gate hn) * W_up hn).
        let d_act = kernels::matmul(d_out, &l.w_down)?;
        let d_gate_up = kernels::silu_gate_backward(&s.gate_up, &d_act)?;
        let d_hn = kernels::matmul(&d_gate_up, &l.w_gate_up)?;
        let d_h = kernels::rms_norm_backward(&s.h, &s.inv_rms_ffn, &l.ffn_norm, &d_hn, d_out)?;

        // Attention: h = x + W_o attn.
        let d_attn = kernels::matmul(&d_h, &l.wo)?;
        let d_o = packing.to_heads_zero_filled(&d_attn, nh)?;
        let (b, _, span, _) = d_o.dims4()?;
        let d_o = d_o.reshape((b, nkv, nh / nkv * span, hd))?;
        let d_probs = kernels::matmul(&d_o, &s.v.t()?)?;
        let d_v = kernels::matmul(&s.probs.t()?, &d_o)?;
        let d_scores = kernels::softmax_backward(&s.probs, &d_probs, 1.0 / (hd as f64).sqrt())?;
        let d_q = kernels::matmul(&d_scores, &s.k)?.reshape((b, nh, span, hd))?;
        let d_k = kernels::matmul(&d_scores.t()?, &s.q_grouped)?;
        let d_q = rope.apply_transpose(&d_q.contiguous()?)?;
        let d_k = rope.apply_transpose(&d_k.contiguous()?)?;
        let d_qkv = Tensor::cat(
            &[
                packing.rows_from_heads(&d_q)?,
                packing.rows_from_heads(&d_k)?,
                packing.rows_from_heads(&d_v)?,
            ],
            1,
        )?;
        let d_xn = kernels::matmul(&d_qkv, &l.w_qkv)?;
        kernels::rms_norm_backward(&s.x, &s.inv_rms_attn, &l.attn_norm, &d_xn, &d_h)
    }
}
