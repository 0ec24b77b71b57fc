//! The CPU kernels of the frozen decoder: its matrix products (one place,
//! [`matmul`]: an optimised BLAS when one was loaded at run time, see
//! [`blas`], candle's own kernels otherwise) and the fused element-wise
//! chains of its forward and backward, each one pass over its rows.
//!
//! Why: composed from candle ops, RMSNorm's backward is seven passes, the
//! SiLU gate's backward nine, the cross-entropy head eight over a
//! (targets, vocabulary) matrix, each pass allocating its output. Here each
//! chain reads its inputs once and writes one output, rows in parallel on
//! rayon's pool (the one the matrix products use).
//!
//! Every kernel has the same signature on every device: contiguous f32 or
//! f64 CPU tensors take the fused loop; anything else (a CUDA or Metal
//! tensor, another dtype) takes [`reference`], the same chain composed of
//! candle ops. A GPU build plugs its own kernel in behind the same function.
//! The reference is also what the fused loops are tested against.

pub mod blas;

use candle_core::{DType, Device, Storage, Tensor, D};
use rayon::prelude::*;

use crate::error::{ModelError, Result};

/// Rows per rayon task: below this a row chain is too short to be worth a
/// task of its own.
const MIN_ELEMENTS_PER_TASK: usize = 1 << 14;

/// The float operations the fused loops need, for f32 and f64.
trait Real:
    Copy
    + Send
    + Sync
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::SubAssign
    + PartialOrd
    + candle_core::WithDType
{
    /// The smallest positive normal value.
    const SMALLEST_NORMAL: Self;
    fn of(v: f64) -> Self;
    fn to(self) -> f64;
    fn exp(self) -> Self;
}

impl Real for f32 {
    const SMALLEST_NORMAL: Self = f32::MIN_POSITIVE;
    fn of(v: f64) -> Self {
        v as f32
    }
    fn to(self) -> f64 {
        f64::from(self)
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
}

impl Real for f64 {
    const SMALLEST_NORMAL: Self = f64::MIN_POSITIVE;
    fn of(v: f64) -> Self {
        v
    }
    fn to(self) -> f64 {
        self
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
}

/// Runs `f` on the CPU slice of a contiguous tensor.
fn with_slice<T: Real, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(ModelError::InvalidInput(
            "internal: not a CPU tensor".into(),
        ));
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| ModelError::InvalidInput("internal: not contiguous".into()))?;
    f(&cpu.as_slice::<T>()?[start..end])
}

/// Whether every tensor can take the fused CPU loop, and in which dtype.
fn fused_dtype(tensors: &[&Tensor]) -> Option<DType> {
    let dtype = tensors.first()?.dtype();
    let ok = tensors
        .iter()
        .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == dtype && t.is_contiguous());
    (ok && matches!(dtype, DType::F32 | DType::F64)).then_some(dtype)
}

/// Rows of `width` per rayon task.
fn rows_per_task(width: usize) -> usize {
    (MIN_ELEMENTS_PER_TASK / width.max(1)).max(1)
}

/// Fills `out` (rows of `out_width`) row by row in parallel; `f(row, out_row)`.
fn par_rows<T: Real>(out: &mut [T], out_width: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let per = rows_per_task(out_width);
    out.par_chunks_mut(per * out_width)
        .enumerate()
        .for_each(|(chunk, rows)| {
            for (i, row) in rows.chunks_mut(out_width).enumerate() {
                f(chunk * per + i, row);
            }
        });
}

fn tensor<T: Real>(data: Vec<T>, shape: &[usize], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// y = x / rms(x) * g over the last dimension, and 1 / rms(x) as (.., 1).
pub fn rms_norm(x: &Tensor, g: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    match fused_dtype(&[x, g]) {
        Some(DType::F32) => rms_norm_fused::<f32>(x, g, eps),
        Some(DType::F64) => rms_norm_fused::<f64>(x, g, eps),
        _ => reference::rms_norm(x, g, eps),
    }
}

fn rms_norm_fused<T: Real>(x: &Tensor, g: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let d = x.dim(D::Minus1)?;
    let rows = x.elem_count() / d.max(1);
    let mut y = vec![T::of(0.0); rows * d];
    let mut inv = vec![T::of(0.0); rows];
    with_slice::<T, _>(x, |xs| {
        with_slice::<T, _>(g, |gs| {
            inv.par_iter_mut().enumerate().for_each(|(r, inv)| {
                let row = &xs[r * d..(r + 1) * d];
                let ss: f64 = row.iter().map(|v| v.to() * v.to()).sum();
                *inv = T::of(1.0 / (ss / d as f64 + eps).sqrt());
            });
            par_rows(&mut y, d, |r, out| {
                let row = &xs[r * d..(r + 1) * d];
                let s = inv[r];
                for ((o, &v), &w) in out.iter_mut().zip(row).zip(gs) {
                    *o = v * s * w;
                }
            });
            Ok(())
        })
    })?;
    let mut inv_shape = x.dims().to_vec();
    if let Some(last) = inv_shape.last_mut() {
        *last = 1;
    }
    Ok((
        tensor(y, x.dims(), x.device())?,
        tensor(inv, &inv_shape, x.device())?,
    ))
}

/// `residual` plus the input gradient of y = g * x * inv:
/// dx = inv * (g dy - x inv^2 mean(g dy x)).
pub fn rms_norm_backward(
    x: &Tensor,
    inv: &Tensor,
    g: &Tensor,
    dy: &Tensor,
    residual: &Tensor,
) -> Result<Tensor> {
    match fused_dtype(&[x, inv, g, dy, residual]) {
        Some(DType::F32) => rms_norm_backward_fused::<f32>(x, inv, g, dy, residual),
        Some(DType::F64) => rms_norm_backward_fused::<f64>(x, inv, g, dy, residual),
        _ => reference::rms_norm_backward(x, inv, g, dy, residual),
    }
}

fn rms_norm_backward_fused<T: Real>(
    x: &Tensor,
    inv: &Tensor,
    g: &Tensor,
    dy: &Tensor,
    residual: &Tensor,
) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let rows = x.elem_count() / d.max(1);
    let mut out = vec![T::of(0.0); rows * d];
    with_slice::<T, _>(x, |xs| {
        with_slice::<T, _>(inv, |invs| {
            with_slice::<T, _>(g, |gs| {
                with_slice::<T, _>(dy, |dys| {
                    with_slice::<T, _>(residual, |res| {
                        par_rows(&mut out, d, |r, o| {
                            let span = r * d..(r + 1) * d;
                            let (xr, dyr, rr) = (&xs[span.clone()], &dys[span.clone()], &res[span]);
                            let mut dot = 0.0f64;
                            for ((&xv, &dv), &w) in xr.iter().zip(dyr).zip(gs) {
                                dot += (dv * w).to() * xv.to();
                            }
                            let s = invs[r];
                            let coeff = T::of(s.to() * s.to() * dot / d as f64);
                            for i in 0..d {
                                o[i] = rr[i] + s * (dyr[i] * gs[i] - xr[i] * coeff);
                            }
                        });
                        Ok(())
                    })
                })
            })
        })
    })?;
    tensor(out, x.dims(), x.device())
}

/// silu(gate) * up for `gate_up` (.., 2F) holding gate then up; (.., F).
pub fn silu_gate(gate_up: &Tensor) -> Result<Tensor> {
    match fused_dtype(&[gate_up]) {
        Some(DType::F32) => silu_gate_fused::<f32>(gate_up),
        Some(DType::F64) => silu_gate_fused::<f64>(gate_up),
        _ => reference::silu_gate(gate_up),
    }
}

fn sigmoid<T: Real>(z: T) -> T {
    T::of(1.0) / (T::of(1.0) + (T::of(0.0) - z).exp())
}

fn half_width(gate_up: &Tensor) -> Result<usize> {
    let w = gate_up.dim(D::Minus1)?;
    if w % 2 != 0 {
        return Err(ModelError::InvalidInput(format!(
            "internal: gate and up of odd width {w}"
        )));
    }
    Ok(w / 2)
}

fn silu_gate_fused<T: Real>(gate_up: &Tensor) -> Result<Tensor> {
    let f = half_width(gate_up)?;
    let rows = gate_up.elem_count() / (2 * f).max(1);
    let mut out = vec![T::of(0.0); rows * f];
    with_slice::<T, _>(gate_up, |gu| {
        par_rows(&mut out, f, |r, o| {
            let (gate, up) = gu[r * 2 * f..(r + 1) * 2 * f].split_at(f);
            for i in 0..f {
                o[i] = gate[i] * sigmoid(gate[i]) * up[i];
            }
        });
        Ok(())
    })?;
    let mut shape = gate_up.dims().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = f;
    }
    tensor(out, &shape, gate_up.device())
}

/// The gradient with respect to `gate_up` (.., 2F) of silu(gate) * up,
/// given `d_act` (.., F): d gate = d_act up silu'(gate), d up = d_act
/// silu(gate), with silu'(z) = s(z) (1 + z (1 - s(z))).
pub fn silu_gate_backward(gate_up: &Tensor, d_act: &Tensor) -> Result<Tensor> {
    match fused_dtype(&[gate_up, d_act]) {
        Some(DType::F32) => silu_gate_backward_fused::<f32>(gate_up, d_act),
        Some(DType::F64) => silu_gate_backward_fused::<f64>(gate_up, d_act),
        _ => reference::silu_gate_backward(gate_up, d_act),
    }
}

fn silu_gate_backward_fused<T: Real>(gate_up: &Tensor, d_act: &Tensor) -> Result<Tensor> {
    let f = half_width(gate_up)?;
    let rows = gate_up.elem_count() / (2 * f).max(1);
    if d_act.elem_count() != rows * f {
        return Err(ModelError::InvalidInput(
            "internal: gate/up and their gradient differ in size".into(),
        ));
    }
    let mut out = vec![T::of(0.0); rows * 2 * f];
    with_slice::<T, _>(gate_up, |gu| {
        with_slice::<T, _>(d_act, |da| {
            par_rows(&mut out, 2 * f, |r, o| {
                let (gate, up) = gu[r * 2 * f..(r + 1) * 2 * f].split_at(f);
                let d = &da[r * f..(r + 1) * f];
                let (d_gate, d_up) = o.split_at_mut(f);
                for i in 0..f {
                    let z = gate[i];
                    let s = sigmoid(z);
                    d_up[i] = d[i] * z * s;
                    d_gate[i] = d[i] * up[i] * s * (T::of(1.0) + z * (T::of(1.0) - s));
                }
            });
            Ok(())
        })
    })?;
    tensor(out, gate_up.dims(), gate_up.device())
}

/// Softmax backward over the last dimension, times `scale`:
/// dS = scale P (dP - sum(dP P)).
pub fn softmax_backward(probs: &Tensor, d_probs: &Tensor, scale: f64) -> Result<Tensor> {
    match fused_dtype(&[probs, d_probs]) {
        Some(DType::F32) => softmax_backward_fused::<f32>(probs, d_probs, scale),
        Some(DType::F64) => softmax_backward_fused::<f64>(probs, d_probs, scale),
        _ => reference::softmax_backward(probs, d_probs, scale),
    }
}

fn softmax_backward_fused<T: Real>(probs: &Tensor, d_probs: &Tensor, scale: f64) -> Result<Tensor> {
    let n = probs.dim(D::Minus1)?;
    let rows = probs.elem_count() / n.max(1);
    let mut out = vec![T::of(0.0); rows * n];
    with_slice::<T, _>(probs, |ps| {
        with_slice::<T, _>(d_probs, |dps| {
            par_rows(&mut out, n, |r, o| {
                let (p, dp) = (&ps[r * n..(r + 1) * n], &dps[r * n..(r + 1) * n]);
                let dot: f64 = p.iter().zip(dp).map(|(a, b)| a.to() * b.to()).sum();
                let dot = T::of(dot);
                let s = T::of(scale);
                for i in 0..n {
                    o[i] = s * p[i] * (dp[i] - dot);
                }
            });
            Ok(())
        })
    })?;
    tensor(out, probs.dims(), probs.device())
}

/// Cross-entropy of each row of `logits` (n, vocab) against `labels` (n),
/// as `-log softmax(row)[label]` in f64, and with `weights` (one per row)
/// the gradient of `sum_r weights[r] * nll[r]` with respect to the logits.
pub fn cross_entropy(
    logits: &Tensor,
    labels: &[u32],
    weights: Option<&[f64]>,
) -> Result<(Vec<f64>, Option<Tensor>)> {
    let (n, vocab) = logits.dims2()?;
    if labels.len() != n || weights.is_some_and(|w| w.len() != n) {
        return Err(ModelError::InvalidInput(format!(
            "internal: {n} rows of logits, {} labels",
            labels.len()
        )));
    }
    if let Some(bad) = labels.iter().find(|&&l| l as usize >= vocab) {
        return Err(ModelError::InvalidInput(format!(
            "label {bad} is outside the vocabulary of {vocab} tokens"
        )));
    }
    match fused_dtype(&[logits]) {
        Some(DType::F32) => cross_entropy_fused::<f32>(logits, labels, weights),
        Some(DType::F64) => cross_entropy_fused::<f64>(logits, labels, weights),
        _ => reference::cross_entropy(logits, labels, weights),
    }
}

fn cross_entropy_fused<T: Real>(
    logits: &Tensor,
    labels: &[u32],
    weights: Option<&[f64]>,
) -> Result<(Vec<f64>, Option<Tensor>)> {
    let (n, vocab) = logits.dims2()?;
    // Row maximum and log-sum-exp, in f64.
    let lse = |row: &[T]| -> f64 {
        let max = row.iter().fold(f64::NEG_INFINITY, |m, v| m.max(v.to()));
        let m = T::of(max);
        let sum: f64 = row.iter().map(|&v| (v - m).exp().to()).sum();
        max + sum.ln()
    };
    with_slice::<T, _>(logits, |xs| {
        let Some(weights) = weights else {
            let nll = (0..n)
                .into_par_iter()
                .map(|r| {
                    let row = &xs[r * vocab..(r + 1) * vocab];
                    lse(row) - row[labels[r] as usize].to()
                })
                .collect();
            return Ok((nll, None));
        };
        let mut grad = vec![T::of(0.0); n * vocab];
        let mut nll = vec![0.0; n];
        grad.par_chunks_mut(vocab)
            .zip(nll.par_iter_mut())
            .enumerate()
            .for_each(|(r, (g, nll))| {
                let row = &xs[r * vocab..(r + 1) * vocab];
                let l = lse(row);
                let label = labels[r] as usize;
                *nll = l - row[label].to();
                // d nll / d logit = softmax - onehot. Probabilities in the
                // subnormal range (a logit ~87 below the row's log-sum-exp
                // in f32) are flushed to zero: they change nothing, and
                // every product that reads a subnormal runs ~100x slower on
                // x86 (measured: the LM head's backward, 56 ms -> 7.3 s).
                let (lt, w) = (T::of(l), T::of(weights[r]));
                for (o, &v) in g.iter_mut().zip(row) {
                    let p = (v - lt).exp() * w;
                    *o = if p < T::SMALLEST_NORMAL {
                        T::of(0.0)
                    } else {
                        p
                    };
                }
                g[label] -= w;
            });
        Ok((nll, Some(tensor(grad, &[n, vocab], logits.device())?)))
    })
}

/// `a` (.., m, k) times `b` (.., k, n), batch dimensions equal: on the
/// loaded BLAS for f32 CPU tensors, else candle's `matmul`. The two agree
/// to float rounding (tests/model/kernels.rs); each is deterministic.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if let Some(library) = blas::active() {
        if let Some(product) = library.matmul(a, b)? {
            return Ok(product);
        }
    }
    Ok(a.matmul(b)?)
}

/// The same chains composed of candle ops: the path of every device the
/// fused loops do not serve, and the tests' reference.
pub mod reference {
    use candle_core::{DType, Tensor, D};

    use crate::error::Result;

    /// See [`super::rms_norm`].
    pub fn rms_norm(x: &Tensor, g: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
        let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        let y = x.broadcast_mul(&inv)?.broadcast_mul(g)?;
        Ok((y, inv))
    }

    /// See [`super::rms_norm_backward`].
    pub fn rms_norm_backward(
        x: &Tensor,
        inv: &Tensor,
        g: &Tensor,
        dy: &Tensor,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let gy = dy.broadcast_mul(g)?;
        let dot = (&gy * x)?.mean_keepdim(D::Minus1)?;
        let coeff = (inv.sqr()? * dot)?;
        let dx = (gy - x.broadcast_mul(&coeff)?)?;
        Ok((residual + dx.broadcast_mul(inv)?)?)
    }

    fn halves(gate_up: &Tensor) -> Result<(Tensor, Tensor)> {
        let f = gate_up.dim(D::Minus1)? / 2;
        Ok((
            gate_up.narrow(D::Minus1, 0, f)?,
            gate_up.narrow(D::Minus1, f, f)?,
        ))
    }

    /// See [`super::silu_gate`].
    pub fn silu_gate(gate_up: &Tensor) -> Result<Tensor> {
        let (gate, up) = halves(gate_up)?;
        Ok((candle_nn::ops::silu(&gate)? * up)?)
    }

    /// See [`super::silu_gate_backward`].
    pub fn silu_gate_backward(gate_up: &Tensor, d_act: &Tensor) -> Result<Tensor> {
        let (gate, up) = halves(gate_up)?;
        let sig = candle_nn::ops::sigmoid(&gate)?;
        let silu = (&gate * &sig)?;
        let dsilu = (&sig * ((&gate * (1.0 - &sig)?)? + 1.0)?)?;
        let d_gate = ((d_act * up)? * dsilu)?;
        let d_up = (d_act * silu)?;
        Ok(Tensor::cat(&[d_gate, d_up], D::Minus1)?)
    }

    /// See [`super::softmax_backward`].
    pub fn softmax_backward(probs: &Tensor, d_probs: &Tensor, scale: f64) -> Result<Tensor> {
        let row_dot = (d_probs * probs)?.sum_keepdim(D::Minus1)?;
        Ok(((probs * d_probs.broadcast_sub(&row_dot)?)? * scale)?)
    }

    /// See [`super::cross_entropy`].
    pub fn cross_entropy(
        logits: &Tensor,
        labels: &[u32],
        weights: Option<&[f64]>,
    ) -> Result<(Vec<f64>, Option<Tensor>)> {
        let (n, _) = logits.dims2()?;
        let device = logits.device();
        let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        let index = Tensor::from_vec(labels.to_vec(), (n, 1), device)?;
        let nll: Vec<f64> = log_probs
            .gather(&index, 1)?
            .neg()?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        let Some(weights) = weights else {
            return Ok((nll, None));
        };
        let w = Tensor::from_vec(weights.to_vec(), (n, 1), device)?.to_dtype(logits.dtype())?;
        let grad = log_probs
            .exp()?
            .scatter_add(
                &index,
                &Tensor::full(-1.0, (n, 1), device)?.to_dtype(logits.dtype())?,
                1,
            )?
            .broadcast_mul(&w)?;
        Ok((nll, Some(grad)))
    }
}
