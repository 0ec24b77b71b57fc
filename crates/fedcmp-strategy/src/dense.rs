//! Dense f64 matrix kernels for Fed-CMP (faer), deterministic and parallel.
//!
//! Every product and decomposition runs with `Par::Rayon(TASKS)`: faer
//! splits the work into `TASKS` pieces whatever the size of the rayon pool,
//! so the floating-point result depends on `TASKS` (a constant) and not on
//! how many threads execute the pieces. One core or sixty-four give
//! bit-identical servers (tests/strategy/fedcmp.rs checks pools of 1 and 3
//! threads).
//!
//! Matrices cross this module's boundary as row-major `&[f64]` slices (the
//! layout of the flat parameter vector).

use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
use faer::linalg::evd::{self_adjoint_evd, self_adjoint_evd_scratch, ComputeEigenvectors};
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::linalg::triangular_solve::solve_lower_triangular_in_place;
use faer::{Accum, Mat, MatMut, MatRef, Par};
use fedcmp_core::CoreError;

use crate::{Result, StrategyError};

/// The fixed number of pieces every parallel kernel is split into.
pub const TASKS: usize = 8;

/// The parallelism every kernel uses (see the module header).
pub fn par() -> Par {
    Par::rayon(TASKS)
}

/// A row-major slice viewed as an `rows x cols` matrix.
pub fn view(data: &[f64], rows: usize, cols: usize) -> Result<MatRef<'_, f64>> {
    if data.len() != rows * cols {
        return Err(StrategyError::Length {
            what: "matrix",
            expected: rows * cols,
            got: data.len(),
        });
    }
    Ok(MatRef::from_row_major_slice(data, rows, cols))
}

/// A matrix copied out row-major.
pub fn to_row_major(m: MatRef<'_, f64>) -> Vec<f64> {
    let (rows, cols) = (m.nrows(), m.ncols());
    let mut out = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        out.extend((0..cols).map(|j| m[(i, j)]));
    }
    out
}

/// `a b`.
pub fn mul(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> Mat<f64> {
    let mut out = Mat::<f64>::zeros(a.nrows(), b.ncols());
    matmul(out.as_mut(), Accum::Replace, a, b, 1.0, par());
    out
}

/// `a b` written straight into a new row-major buffer.
pub fn mul_to_row_major(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> Vec<f64> {
    let (rows, cols) = (a.nrows(), b.ncols());
    let mut out = vec![0.0; rows * cols];
    matmul(
        MatMut::from_row_major_slice_mut(&mut out, rows, cols),
        Accum::Replace,
        a,
        b,
        1.0,
        par(),
    );
    out
}

/// Row-major `(m x k) (k x n)`.
pub fn mul_rowmajor(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Result<Vec<f64>> {
    Ok(mul_to_row_major(view(a, m, k)?, view(b, k, n)?))
}

/// Row-major `a^T b` for `a: m x k`, `b: m x n` (result `k x n`).
pub fn tmul_rowmajor(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Result<Vec<f64>> {
    Ok(mul_to_row_major(view(a, m, k)?.transpose(), view(b, m, n)?))
}

/// `sum_k w_k D_k D_k^T` for row-major `rows x cols` matrices `D_k`, lower
/// triangle only (what [`symmetric_eigen`] reads), accumulated client by
/// client in the given order.
pub fn weighted_gram_lower(
    matrices: &[&[f64]],
    weights: &[f64],
    rows: usize,
    cols: usize,
) -> Result<Mat<f64>> {
    let mut g = Mat::<f64>::zeros(rows, rows);
    for (d, &w) in matrices.iter().zip(weights) {
        let d = view(d, rows, cols)?;
        triangular::matmul(
            g.as_mut(),
            BlockStructure::TriangularLower,
            Accum::Add,
            d,
            BlockStructure::Rectangular,
            d.transpose(),
            BlockStructure::Rectangular,
            w.max(0.0),
            par(),
        );
    }
    Ok(g)
}

/// Eigen-decomposition of a symmetric matrix from its lower triangle:
/// eigenvalues ascending, eigenvectors as columns. One body for f64 and f32
/// (the refined solver below starts from an f32 decomposition).
macro_rules! symmetric_eigen_impl {
    ($name:ident, $t:ty) => {
        pub fn $name(a: MatRef<'_, $t>) -> Result<(Vec<$t>, Mat<$t>)> {
            let n = a.nrows();
            let mut s = Diag::<$t>::zeros(n);
            let mut u = Mat::<$t>::zeros(n, n);
            let mut buffer = MemBuffer::new(self_adjoint_evd_scratch::<$t>(
                n,
                ComputeEigenvectors::Yes,
                par(),
                Default::default(),
            ));
            self_adjoint_evd(
                a,
                s.as_mut(),
                Some(u.as_mut()),
                par(),
                MemStack::new(&mut buffer),
                Default::default(),
            )
            .map_err(|e| {
                StrategyError::Core(CoreError::Invalid(format!(
                    "symmetric eigendecomposition ({n} x {n}, {}) failed: {e:?}",
                    stringify!($t)
                )))
            })?;
            let values = s.column_vector().iter().copied().collect();
            Ok((values, u))
        }
    };
}

symmetric_eigen_impl!(symmetric_eigen, f64);
symmetric_eigen_impl!(symmetric_eigen_f32, f32);

/// Copies the lower triangle onto the upper one.
pub fn symmetrize_from_lower(a: &mut Mat<f64>) {
    for j in 0..a.ncols() {
        for i in 0..j {
            a[(i, j)] = a[(j, i)];
        }
    }
}

/// Orthonormalises the columns of a well-conditioned `y` in place by
/// Cholesky QR (`Y^T Y = L L^T`, `Y <- Y L^-T`). `None` when `Y^T Y` is not
/// numerically positive definite (the caller falls back).
pub fn cholesky_qr(y: &mut Mat<f64>) -> Option<()> {
    let m = y.ncols();
    let mut gram = mul(y.transpose(), y.as_ref());
    let mut buffer = MemBuffer::new(cholesky_in_place_scratch::<f64>(
        m,
        par(),
        Default::default(),
    ));
    cholesky_in_place(
        gram.as_mut(),
        Default::default(),
        par(),
        MemStack::new(&mut buffer),
        Default::default(),
    )
    .ok()?;
    solve_lower_triangular_in_place(gram.as_ref(), y.as_mut().transpose_mut(), par());
    Some(())
}

/// What [`refined_top_eigen`] returns: Ritz values (descending), Ritz
/// vectors (as columns, same order), and the approximate f32 eigenvalues
/// beyond them (descending).
#[derive(Debug, Clone)]
pub struct TopEigen {
    pub values: Vec<f64>,
    pub vectors: Mat<f64>,
    pub rest: Vec<f64>,
}

/// The top eigenpairs of a symmetric positive semi-definite `g` (full,
/// both triangles) by mixed precision: an f32 eigendecomposition gives
/// approximate eigenvalues `lambda32` (descending) and vectors; `top(&
/// lambda32)` says how many directions are wanted; the top `m` (that plus
/// an oversampling margin) vectors get one f64 subspace-iteration step
/// (`G Q`, columns rescaled by `lambda32` to stay well conditioned, then
/// Cholesky QR twice) and an f64 Rayleigh-Ritz projection. Returns the
/// Ritz values (descending, `m` of them), the Ritz vectors (`n x m`), and
/// the f32 eigenvalues beyond `m` (descending, approximate). `None` when the
/// wanted subspace is too large for this to pay, or the orthonormalisation
/// breaks down: the caller then uses the exact f64 solver.
pub fn refined_top_eigen(
    g: MatRef<'_, f64>,
    top: impl Fn(&[f64]) -> usize,
) -> Result<Option<TopEigen>> {
    let n = g.nrows();
    let g32 = Mat::<f32>::from_fn(n, n, |i, j| g[(i, j)] as f32);
    let (values32, vectors32) = symmetric_eigen_f32(g32.as_ref())?;
    drop(g32);
    let lambda32: Vec<f64> = values32
        .iter()
        .rev()
        .map(|&v| f64::from(v).max(0.0))
        .collect();
    let wanted = top(&lambda32);
    let m = (wanted + (wanted / 8).max(16)).min(n);
    // Beyond ~60% of the dimension the exact solver costs about as much.
    if wanted == 0 || 5 * m > 3 * n {
        return Ok(None);
    }
    let floor = lambda32[0] * f64::from(f32::EPSILON);
    let mut q = Mat::<f64>::from_fn(n, m, |i, j| f64::from(vectors32[(i, n - 1 - j)]));
    drop(vectors32);
    // One power step: q_j <- G q_j / lambda_j keeps the columns near unit
    // length, so Cholesky QR stays accurate.
    let mut y = mul(g, q.as_ref());
    for j in 0..m {
        let scale = 1.0 / lambda32[j].max(floor).max(f64::MIN_POSITIVE);
        for i in 0..n {
            y[(i, j)] *= scale;
        }
    }
    q = y;
    if cholesky_qr(&mut q).is_none() || cholesky_qr(&mut q).is_none() {
        return Ok(None);
    }
    let gq = mul(g, q.as_ref());
    let b = mul(q.transpose(), gq.as_ref());
    drop(gq);
    let (ritz, w) = symmetric_eigen(b.as_ref())?;
    let order: Vec<usize> = (0..m).rev().collect();
    let values: Vec<f64> = order.iter().map(|&i| ritz[i].max(0.0)).collect();
    let w_sorted = Mat::<f64>::from_fn(m, m, |i, j| w[(i, order[j])]);
    let vectors = mul(q.as_ref(), w_sorted.as_ref());
    Ok(Some(TopEigen {
        values,
        vectors,
        rest: lambda32[m..].to_vec(),
    }))
}

/// Modified Gram-Schmidt, twice ("twice is enough"), in column order.
pub fn orthonormalize(u: &mut Mat<f64>) {
    let (rows, cols) = (u.nrows(), u.ncols());
    for _ in 0..2 {
        for j in 0..cols {
            for i in 0..j {
                let d: f64 = (0..rows).map(|r| u[(r, i)] * u[(r, j)]).sum();
                for r in 0..rows {
                    u[(r, j)] -= d * u[(r, i)];
                }
            }
            let nrm = (0..rows).map(|r| u[(r, j)] * u[(r, j)]).sum::<f64>().sqrt();
            if nrm > 0.0 {
                for r in 0..rows {
                    u[(r, j)] /= nrm;
                }
            }
        }
    }
}

/// Makes each column's largest-magnitude component (first on ties)
/// positive, so that a basis does not depend on the eigensolver's signs.
pub fn fix_signs(u: &mut Mat<f64>) {
    for j in 0..u.ncols() {
        let mut best = 0.0f64;
        let mut sign = 1.0;
        for r in 0..u.nrows() {
            let x = u[(r, j)];
            if x.abs() > best {
                best = x.abs();
                sign = if x < 0.0 { -1.0 } else { 1.0 };
            }
        }
        if sign < 0.0 {
            for r in 0..u.nrows() {
                u[(r, j)] = -u[(r, j)];
            }
        }
    }
}
