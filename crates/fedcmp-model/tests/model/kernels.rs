//! The fused decoder kernels equal their chains composed of candle ops
//! (`kernels::reference`) on arbitrary shapes and values, in f64 to
//! rounding and in f32 within float tolerance; a tensor the fused loops do
//! not take (not contiguous) goes through the reference and gets the same
//! answer. The whole decoder's gradient is checked against finite
//! differences in `alignment.rs`.

use candle_core::{DType, Device, Tensor};
use fedcmp_model::llm::kernels::{self, blas, reference};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// An error as a failed test case.
fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

fn tensor(values: &[f64], shape: &[usize], dtype: DType) -> Result<Tensor, TestCaseError> {
    Tensor::from_vec(values.to_vec(), shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .map_err(fail)
}

fn values(t: &Tensor) -> Result<Vec<f64>, TestCaseError> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .map_err(fail)
}

/// max |a - b| / max(1, max |b|).
fn error(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        1e-12
    } else {
        2e-5
    }
}

/// rows x width values in [-3, 3].
fn matrix(max_rows: usize, max_width: usize) -> impl Strategy<Value = (usize, usize, Vec<f64>)> {
    (1..=max_rows, 1..=max_width).prop_flat_map(|(r, w)| {
        (
            Just(r),
            Just(w),
            proptest::collection::vec(-3.0f64..3.0, r * w),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn rms_norm_and_its_backward((r, w, x) in matrix(6, 40), seed in 0u64..1000) {
        for dtype in [DType::F64, DType::F32] {
            let g: Vec<f64> = (0..w).map(|i| 0.5 + ((i as u64 * 31 + seed) % 17) as f64 / 10.0).collect();
            let dy: Vec<f64> = x.iter().rev().map(|v| v * 0.7 - 0.1).collect();
            let res: Vec<f64> = x.iter().map(|v| v.sin()).collect();
            let (x, g, dy, res) = (
                tensor(&x, &[r, w], dtype)?,
                tensor(&g, &[w], dtype)?,
                tensor(&dy, &[r, w], dtype)?,
                tensor(&res, &[r, w], dtype)?,
            );
            let (y, inv) = kernels::rms_norm(&x, &g, 1e-5).map_err(fail)?;
            let (y_ref, inv_ref) = reference::rms_norm(&x, &g, 1e-5).map_err(fail)?;
            prop_assert!(error(&values(&y)?, &values(&y_ref)?) < tolerance(dtype));
            prop_assert!(error(&values(&inv)?, &values(&inv_ref)?) < tolerance(dtype));
            prop_assert_eq!(inv.dims(), &[r, 1]);
            let dx = kernels::rms_norm_backward(&x, &inv, &g, &dy, &res).map_err(fail)?;
            let dx_ref = reference::rms_norm_backward(&x, &inv, &g, &dy, &res).map_err(fail)?;
            prop_assert!(error(&values(&dx)?, &values(&dx_ref)?) < tolerance(dtype));
        }
    }

    #[test]
    fn silu_gate_and_its_backward((r, half, gu) in matrix(5, 24)) {
        // The generated row is gate and up side by side: width 2 * half.
        let gu: Vec<f64> = gu.iter().chain(gu.iter().map(|v| -0.5 * v).collect::<Vec<_>>().iter()).copied().collect();
        let interleaved: Vec<f64> = (0..r)
            .flat_map(|i| {
                let gate = gu[i * half..(i + 1) * half].to_vec();
                let up = gu[r * half + i * half..r * half + (i + 1) * half].to_vec();
                gate.into_iter().chain(up)
            })
            .collect();
        let d_act: Vec<f64> = (0..r * half).map(|i| ((i * 7) % 11) as f64 / 5.0 - 1.0).collect();
        for dtype in [DType::F64, DType::F32] {
            let gu = tensor(&interleaved, &[r, 2 * half], dtype)?;
            let d = tensor(&d_act, &[r, half], dtype)?;
            let act = kernels::silu_gate(&gu).map_err(fail)?;
            prop_assert!(error(&values(&act)?, &values(&reference::silu_gate(&gu).map_err(fail)?)?) < tolerance(dtype));
            let back = kernels::silu_gate_backward(&gu, &d).map_err(fail)?;
            let back_ref = reference::silu_gate_backward(&gu, &d).map_err(fail)?;
            prop_assert_eq!(back.dims(), &[r, 2 * half]);
            prop_assert!(error(&values(&back)?, &values(&back_ref)?) < tolerance(dtype));
        }
    }

    #[test]
    fn softmax_backward_matches((r, w, logits) in matrix(6, 12), scale in 0.1f64..2.0) {
        for dtype in [DType::F64, DType::F32] {
            let probs = candle_nn::ops::softmax_last_dim(&tensor(&logits, &[r, w], dtype)?).map_err(fail)?;
            let dp: Vec<f64> = logits.iter().map(|v| v.cos()).collect();
            let dp = tensor(&dp, &[r, w], dtype)?;
            let fused = kernels::softmax_backward(&probs, &dp, scale).map_err(fail)?;
            let composed = reference::softmax_backward(&probs, &dp, scale).map_err(fail)?;
            prop_assert!(error(&values(&fused)?, &values(&composed)?) < tolerance(dtype));
        }
    }

    #[test]
    fn cross_entropy_and_its_gradient((r, w, logits) in matrix(6, 50), label_seed in 0usize..1000) {
        let labels: Vec<u32> = (0..r).map(|i| ((i * 13 + label_seed) % w) as u32).collect();
        let weights: Vec<f64> = (0..r).map(|i| 1.0 / (i + 1) as f64).collect();
        // Large logits: the log-sum-exp must not overflow.
        let shifted: Vec<f64> = logits.iter().map(|v| v * 30.0).collect();
        for dtype in [DType::F64, DType::F32] {
            let x = tensor(&shifted, &[r, w], dtype)?;
            let (nll, grad) = kernels::cross_entropy(&x, &labels, Some(&weights)).map_err(fail)?;
            let (nll_ref, grad_ref) = reference::cross_entropy(&x, &labels, Some(&weights)).map_err(fail)?;
            prop_assert!(nll.iter().all(|v| v.is_finite() && *v >= -1e-9));
            prop_assert!(error(&nll, &nll_ref) < tolerance(dtype) * 100.0);
            let (Some(grad), Some(grad_ref)) = (grad, grad_ref) else {
                return Err(fail("no gradient"));
            };
            prop_assert!(error(&values(&grad)?, &values(&grad_ref)?) < tolerance(dtype));
            // Each gradient row sums to zero (softmax minus one-hot).
            for row in values(&grad)?.chunks(w) {
                prop_assert!(row.iter().sum::<f64>().abs() < 1e-4);
            }
            let (alone, none) = kernels::cross_entropy(&x, &labels, None).map_err(fail)?;
            prop_assert!(none.is_none());
            prop_assert_eq!(alone, nll);
        }
    }
}

/// A transposed (strided) input is not what the fused loops read: it goes
/// through the reference and the answer is the same as for its contiguous
/// copy.
#[test]
fn strided_inputs_take_the_reference_path() -> Result<(), TestCaseError> {
    let data: Vec<f64> = (0..24).map(|i| (i as f64 * 0.37).sin()).collect();
    let x = tensor(&data, &[4, 6], DType::F32)?.t().map_err(fail)?;
    assert!(!x.is_contiguous());
    let g = tensor(&[1.0, 0.5, 2.0, 1.5], &[4], DType::F32)?;
    let (y, _) = kernels::rms_norm(&x, &g, 1e-6).map_err(fail)?;
    let (y_copy, _) = kernels::rms_norm(&x.contiguous().map_err(fail)?, &g, 1e-6).map_err(fail)?;
    assert!(error(&values(&y)?, &values(&y_copy)?) < 1e-6);
    Ok(())
}

/// Bad labels are an error naming the label, never a panic or an
/// out-of-bounds read.
#[test]
fn a_label_outside_the_vocabulary_is_refused() -> Result<(), TestCaseError> {
    let x = tensor(&[0.0; 6], &[2, 3], DType::F32)?;
    let err = kernels::cross_entropy(&x, &[0, 3], None)
        .err()
        .map(|e| e.to_string());
    assert!(err.is_some_and(|e| e.contains("label 3")));
    Ok(())
}

// ---- Matrix products: the loaded BLAS against candle's own kernels ----

/// A (batch.., rows, cols) f32 operand filled from `seed`, laid out as the
/// decoder's products meet them: as stored, or the transposed view of a
/// (cols, rows) matrix, optionally a narrowed view inside wider rows.
fn product_operand(
    batch: &[usize],
    (rows, cols): (usize, usize),
    transposed: bool,
    narrowed: bool,
    seed: u64,
) -> Result<Tensor, TestCaseError> {
    let (stored_rows, stored_cols) = if transposed {
        (cols, rows)
    } else {
        (rows, cols)
    };
    let extra = if narrowed { 3 } else { 0 };
    let mut shape = batch.to_vec();
    shape.extend([stored_rows, stored_cols + extra]);
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n)
        .map(|i| ((i as u64 * 2654435761 + seed * 97) % 2001) as f64 / 1000.0 - 1.0)
        .collect();
    let t = tensor(&data, &shape, DType::F32)?;
    let rank = shape.len();
    let t = if narrowed {
        t.narrow(rank - 1, 2, stored_cols).map_err(fail)?
    } else {
        t
    };
    if transposed {
        t.t().map_err(fail)
    } else {
        Ok(t)
    }
}

/// `kernels::matmul` on the BLAS and on candle's kernels (both through the
/// same function, the second inside `with_candle_kernels`), and candle's
/// `matmul` called directly: all three agree, shapes included.
fn assert_products_agree(a: &Tensor, b: &Tensor) -> Result<(), TestCaseError> {
    let on_blas = kernels::matmul(a, b).map_err(fail)?;
    let on_candle = blas::with_candle_kernels(|| kernels::matmul(a, b)).map_err(fail)?;
    let direct = a.matmul(b).map_err(fail)?;
    prop_assert_eq!(on_blas.dims(), direct.dims());
    prop_assert_eq!(values(&on_candle)?, values(&direct)?);
    let err = error(&values(&on_blas)?, &values(&direct)?);
    prop_assert!(
        err < 1e-5,
        "{:?} x {:?}: relative error {:e}",
        a.dims(),
        b.dims(),
        err
    );
    Ok(())
}

fn blas_loaded() -> Result<bool, TestCaseError> {
    fedcmp_testkit::blas_for_tests().map_err(fail)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any sizes (an empty inner dimension included), 0-2 batch
    /// dimensions, either operand transposed or narrowed.
    #[test]
    fn blas_products_equal_candles(
        batch in proptest::collection::vec(1usize..4, 0..=2),
        (m, k, n) in (1usize..70, 0usize..50, 1usize..70),
        (a_t, b_t, a_narrow, b_narrow) in any::<(bool, bool, bool, bool)>(),
        seed in 0u64..1000,
    ) {
        if !blas_loaded()? {
            return Ok(());
        }
        let a = product_operand(&batch, (m, k), a_t, a_narrow, seed)?;
        let b = product_operand(&batch, (k, n), b_t, b_narrow, seed + 1)?;
        assert_products_agree(&a, &b)?;
    }
}

/// Products large enough to be cut into one block per thread, along the
/// rows (tall output) and along the columns (wide output, like the LM head
/// at few targets); attention's batched, transposed shapes; and what the
/// BLAS path leaves to candle (f64, mismatched shapes: the same error).
#[test]
fn blas_products_split_across_threads_and_fall_back() -> Result<(), TestCaseError> {
    if !blas_loaded()? {
        return Ok(());
    }
    // (batch dimensions, (m, k, n), a transposed, b transposed)
    type Case = (&'static [usize], (usize, usize, usize), bool, bool);
    let cases: [Case; 4] = [
        (&[], (300, 96, 70), false, true),
        (&[], (5, 64, 500), false, false),
        (&[2, 3], (40, 16, 41), false, true),
        (&[2, 3], (41, 40, 16), true, false),
    ];
    for (i, (batch, (m, k, n), a_t, b_t)) in cases.into_iter().enumerate() {
        let a = product_operand(batch, (m, k), a_t, false, i as u64)?;
        let b = product_operand(batch, (k, n), b_t, i % 2 == 0, 10 + i as u64)?;
        assert_products_agree(&a, &b)?;
    }
    let a = product_operand(&[], (8, 4), false, false, 1)?
        .to_dtype(DType::F64)
        .map_err(fail)?;
    let b = product_operand(&[], (4, 8), false, false, 2)?
        .to_dtype(DType::F64)
        .map_err(fail)?;
    assert_eq!(
        values(&kernels::matmul(&a, &b).map_err(fail)?)?,
        values(&a.matmul(&b).map_err(fail)?)?
    );
    let wrong = product_operand(&[], (5, 8), false, false, 3)?;
    let a32 = product_operand(&[], (8, 4), false, false, 1)?;
    // The first line: candle appends a backtrace.
    let first_line = |e: String| e.lines().next().unwrap_or_default().to_string();
    let err = kernels::matmul(&a32, &wrong)
        .err()
        .map(|e| first_line(e.to_string()));
    let candle = a32.matmul(&wrong).err().map(|e| first_line(e.to_string()));
    assert!(
        err.as_deref().is_some_and(|e| e.contains("shape mismatch")),
        "{err:?}"
    );
    assert_eq!(err, candle);
    Ok(())
}

/// A library that is not a BLAS is refused with a message naming it, and
/// `off` is honoured by the status line.
#[test]
fn a_library_that_is_not_a_blas_is_refused_by_name() {
    let err = blas::Blas::open(std::path::Path::new("libm.so.6"))
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("libm.so.6") && e.contains("cblas_sgemm")),
        "{err:?}"
    );
    let missing = blas::Blas::open(std::path::Path::new("/nonexistent/libblas.so"))
        .err()
        .map(|e| e.to_string());
    assert!(missing.is_some_and(|e| e.contains("/nonexistent/libblas.so")));
    assert!(blas::BlasStatus::Off
        .to_string()
        .contains("FEDCMP_BLAS=off"));
}
