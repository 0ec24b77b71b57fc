//! An optimised BLAS (OpenBLAS or BLIS) opened at run time, for the f32
//! matrix products of [`super::matmul`].
//!
//! Why at run time (dlopen): a fresh clone must build and run without any
//! BLAS, and a link-time dependency would make one mandatory and fix its
//! build. Which library: `FEDCMP_BLAS` (a path, or `off`), else the
//! registry asset (`scipy-openblas32`, the OpenBLAS numpy and SciPy ship,
//! fetched with the backbones), else a system OpenBLAS or BLIS on the
//! loader's path; with none, candle's own kernels run. The first [`load`]
//! of a process decides, and says what it chose in one line
//! ([`BlasStatus`]).
//!
//! Threads: the library is asked for ONE thread. [`super::matmul`] cuts
//! each product into blocks, one per thread of the caller's rayon pool, so
//! the products and the element-wise kernels share that pool and never
//! oversubscribe the cores (a multi-threaded BLAS would keep its own
//! threads spinning beside rayon's).
//!
//! Both OpenBLAS's `scipy_`-prefixed symbols and the plain CBLAS names are
//! looked up; a library is accepted only after a small product it computes
//! matches the closed form (an ILP64 build behind plain names would not).

// dlopen and calls through C function pointers: the only unsafe code of the
// crate, each block with the invariant it relies on.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::ffi::{c_char, c_int, CStr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Storage, Tensor};

use crate::error::{ModelError, Result};

/// `cblas_sgemm`: C = alpha op(A) op(B) + beta C.
type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);
/// `openblas_set_num_threads`.
type SetThreads = unsafe extern "C" fn(c_int);
/// BLIS's `bli_thread_set_num_threads(dim_t)`.
type BlisSetThreads = unsafe extern "C" fn(i64);
/// `openblas_get_config`, `bli_info_get_version_str`.
type Describe = unsafe extern "C" fn() -> *const c_char;

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// The environment variable that names a library, or `off`.
pub const ENV: &str = "FEDCMP_BLAS";

/// System libraries tried, in order, by the dynamic loader's search.
const SYSTEM_NAMES: &[&str] = &[
    "libopenblas.so.0",
    "libopenblas.so",
    "libblis.so.4",
    "libblis.so",
];

/// An opened BLAS library.
pub struct Blas {
    sgemm: Sgemm,
    path: PathBuf,
    description: String,
    /// Keeps `sgemm` valid: the library is never closed.
    _library: libloading::Library,
}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blas")
            .field("path", &self.path)
            .field("description", &self.description)
            .finish()
    }
}

/// Whether an operand is read as stored or transposed, and its leading
/// dimension (row-major).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operand {
    AsStored { ld: usize },
    Transposed { ld: usize },
}

impl Operand {
    fn flag(self) -> c_int {
        match self {
            Self::AsStored { .. } => NO_TRANS,
            Self::Transposed { .. } => TRANS,
        }
    }

    fn ld(self) -> usize {
        match self {
            Self::AsStored { ld } | Self::Transposed { ld } => ld,
        }
    }

    /// Elements between consecutive rows and consecutive columns of the
    /// logical (rows, cols) matrix.
    fn steps(self) -> (usize, usize) {
        match self {
            Self::AsStored { ld } => (ld, 1),
            Self::Transposed { ld } => (1, ld),
        }
    }
}

/// One block of a product: `c` (m, n) = `a` (m, k) `b` (k, n), every
/// pointer at the block's first element.
#[derive(Debug, Clone, Copy)]
struct Block {
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    a_op: Operand,
    b: *const f32,
    b_op: Operand,
    c: *mut f32,
    ldc: usize,
}

// SAFETY: a block's pointers are only read (a, b) or written by the one
// task that owns it (c); `Blas::run_blocks` hands each block to one task
// and the blocks of one product write disjoint parts of the output.
unsafe impl Send for Block {}
unsafe impl Sync for Block {}

impl Blas {
    /// Runs `blocks` on the caller's rayon pool, one task each.
    ///
    /// # Safety
    /// Every block must satisfy [`Self::gemm`]'s contract, and no two may
    /// write the same element.
    unsafe fn run_blocks(&self, blocks: &[Block]) {
        use rayon::prelude::*;
        match blocks {
            // SAFETY: see the contract above.
            [one] => unsafe { self.gemm(*one) },
            _ => blocks
                .par_iter()
                .for_each(|block| unsafe { self.gemm(*block) }),
        }
    }

    /// Opens `path` (a file, or a bare name for the loader's search) and
    /// checks it on a product with a known result.
    pub fn open(path: &Path) -> Result<Self> {
        let fail = |message: String| ModelError::Blas {
            library: path.display().to_string(),
            message,
        };
        // SAFETY: loading runs the library's initialisers; OpenBLAS and
        // BLIS only set up their thread pools and CPU detection there.
        let library = unsafe { libloading::Library::new(path.as_os_str()) }
            .map_err(|e| fail(e.to_string()))?;
        let symbol = |name: &str| -> Option<*const ()> {
            let name = format!("{name}\0");
            // SAFETY: the pointer is only called through the type its C
            // declaration gives (below), and `library` outlives it.
            unsafe { library.get::<*const ()>(name.as_bytes()) }
                .ok()
                .map(|s| *s)
                .filter(|p| !p.is_null())
        };
        let Some((prefix, sgemm)) = ["scipy_", ""]
            .into_iter()
            .find_map(|p| symbol(&format!("{p}cblas_sgemm")).map(|s| (p, s)))
        else {
            return Err(fail("no cblas_sgemm (nor scipy_cblas_sgemm) symbol".into()));
        };
        // SAFETY: the symbol is CBLAS's sgemm, whose C signature `Sgemm` is.
        let sgemm: Sgemm = unsafe { std::mem::transmute::<*const (), Sgemm>(sgemm) };
        let describe = |name: &str| -> Option<String> {
            let f = symbol(name)?;
            // SAFETY: both describers take nothing and return a static C string.
            let f: Describe = unsafe { std::mem::transmute::<*const (), Describe>(f) };
            let text = unsafe { f() };
            (!text.is_null()).then(|| {
                unsafe { CStr::from_ptr(text) }
                    .to_string_lossy()
                    .trim()
                    .to_string()
            })
        };
        let description = if let Some(set) = symbol(&format!("{prefix}openblas_set_num_threads")) {
            // SAFETY: openblas_set_num_threads(int).
            unsafe { std::mem::transmute::<*const (), SetThreads>(set)(1) };
            describe(&format!("{prefix}openblas_get_config"))
                .unwrap_or_else(|| "OpenBLAS".to_string())
        } else if let Some(set) = symbol("bli_thread_set_num_threads") {
            // SAFETY: bli_thread_set_num_threads(dim_t), dim_t = int64_t.
            unsafe { std::mem::transmute::<*const (), BlisSetThreads>(set)(1) };
            format!(
                "BLIS {}",
                describe("bli_info_get_version_str").unwrap_or_default()
            )
        } else {
            return Err(fail(
                "neither OpenBLAS nor BLIS: cannot set its thread count to 1".into(),
            ));
        };
        let blas = Self {
            sgemm,
            path: path.to_path_buf(),
            description,
            _library: library,
        };
        blas.self_check().map_err(fail)?;
        Ok(blas)
    }

    /// A 2x3 by 3x2 product (with B read transposed) against its closed form.
    fn self_check(&self) -> std::result::Result<(), String> {
        let a = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        // B^T stored (2, 3): B = [[1, 0], [0, 1], [1, 1]].
        let bt = [1.0f32, 0.0, 1.0, 0.0, 1.0, 1.0];
        let mut c = [f32::NAN; 4];
        let block = Block {
            m: 2,
            n: 2,
            k: 3,
            a: a.as_ptr(),
            a_op: Operand::AsStored { ld: 3 },
            b: bt.as_ptr(),
            b_op: Operand::Transposed { ld: 3 },
            c: c.as_mut_ptr(),
            ldc: 2,
        };
        // SAFETY: every pointer covers its (rows, ld) extent above.
        unsafe { self.gemm(block) };
        let expected = [4.0f32, 5.0, 10.0, 11.0];
        if c == expected {
            Ok(())
        } else {
            Err(format!(
                "a check product gave {c:?}, expected {expected:?} (an ILP64 build?)"
            ))
        }
    }

    /// Runs one block on the calling thread.
    ///
    /// # Safety
    /// Each pointer must cover its matrix: `a` the (m, k) operand read with
    /// `a_op`'s steps, `b` the (k, n) one, `c` (m rows of `ldc`, n used),
    /// and `c` must not be written by anyone else meanwhile. Every size and
    /// leading dimension must fit a C int (checked by the caller).
    unsafe fn gemm(&self, blk: Block) {
        let int = |v: usize| v as c_int;
        // SAFETY: forwarded from the caller.
        unsafe {
            (self.sgemm)(
                ROW_MAJOR,
                blk.a_op.flag(),
                blk.b_op.flag(),
                int(blk.m),
                int(blk.n),
                int(blk.k),
                1.0,
                blk.a,
                int(blk.a_op.ld().max(1)),
                blk.b,
                int(blk.b_op.ld().max(1)),
                0.0,
                blk.c,
                int(blk.ldc.max(1)),
            );
        }
    }

    /// The file (or name) it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The library's own description (OpenBLAS's build configuration, or
    /// BLIS's version).
    pub fn description(&self) -> &str {
        &self.description
    }
}

/// Which library [`load`] should open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlasSource {
    /// None: candle's kernels.
    Off,
    /// Exactly this file; failing to open it is an error.
    Library(PathBuf),
    /// The fetched asset when given and present, else a system library.
    Search { fetched: Option<PathBuf> },
}

impl BlasSource {
    /// `FEDCMP_BLAS` when set (`off`, or a path), else a search that tries
    /// `fetched` first.
    pub fn from_env(fetched: Option<PathBuf>) -> Self {
        match std::env::var_os(ENV).filter(|v| !v.is_empty()) {
            Some(v) if v == "off" => Self::Off,
            Some(v) => Self::Library(PathBuf::from(v)),
            None => Self::Search { fetched },
        }
    }

    /// Whether a fetched asset could be used (nothing named the library).
    pub fn searches(&self) -> bool {
        matches!(self, Self::Search { .. })
    }
}

/// What the process's products run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlasStatus {
    Loaded { description: String, path: PathBuf },
    Off,
    NotFound { tried: Vec<String> },
}

impl std::fmt::Display for BlasStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Loaded { description, path } => {
                write!(f, "matrix products: {description} ({})", path.display())
            }
            Self::Off => write!(f, "matrix products: candle's kernels ({ENV}=off)"),
            Self::NotFound { tried } => write!(
                f,
                "matrix products: candle's kernels (no BLAS found; tried {}; \
                 `fedcmp assets fetch openblas` or {ENV}=<path> to use one)",
                tried.join(", ")
            ),
        }
    }
}

static LOADED: OnceLock<(Option<Blas>, BlasStatus)> = OnceLock::new();

thread_local! {
    /// Set by [`with_candle_kernels`] for the current thread.
    static BYPASS: Cell<bool> = const { Cell::new(false) };
}

/// Opens the library `source` names, once per process: the first call
/// decides and later calls return what it chose. An explicit library that
/// cannot be opened is an error (and decides nothing).
pub fn load(source: &BlasSource) -> Result<BlasStatus> {
    if let Some((_, status)) = LOADED.get() {
        return Ok(status.clone());
    }
    let chosen = match source {
        BlasSource::Off => (None, BlasStatus::Off),
        BlasSource::Library(path) => loaded(Blas::open(path)?),
        BlasSource::Search { fetched } => search(fetched.as_deref()),
    };
    let (_, status) = LOADED.get_or_init(|| chosen);
    if let BlasStatus::Loaded { .. } = status {
        tracing::info!("{status}");
    }
    Ok(status.clone())
}

fn loaded(blas: Blas) -> (Option<Blas>, BlasStatus) {
    let status = BlasStatus::Loaded {
        description: blas.description.clone(),
        path: blas.path.clone(),
    };
    (Some(blas), status)
}

fn search(fetched: Option<&Path>) -> (Option<Blas>, BlasStatus) {
    let mut tried = Vec::new();
    let candidates = fetched
        .filter(|p| p.is_file())
        .map(Path::to_path_buf)
        .into_iter()
        .chain(SYSTEM_NAMES.iter().map(PathBuf::from));
    for path in candidates {
        match Blas::open(&path) {
            Ok(blas) => return loaded(blas),
            Err(e) => {
                tracing::debug!("{e}");
                tried.push(path.display().to_string());
            }
        }
    }
    if let Some(missing) = fetched.filter(|p| !p.is_file()) {
        tried.insert(0, format!("{} (not fetched)", missing.display()));
    }
    (None, BlasStatus::NotFound { tried })
}

/// The library products use on this thread now: none before [`load`],
/// after a load that found none, or inside [`with_candle_kernels`].
pub fn active() -> Option<&'static Blas> {
    if BYPASS.with(Cell::get) {
        return None;
    }
    LOADED.get().and_then(|(blas, _)| blas.as_ref())
}

/// What [`load`] chose, if it ran.
pub fn status() -> Option<BlasStatus> {
    LOADED.get().map(|(_, s)| s.clone())
}

/// Runs `f` with candle's kernels for the products this thread starts
/// (benchmarks and the equivalence tests run both ways in one process).
pub fn with_candle_kernels<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            BYPASS.with(|b| b.set(self.0));
        }
    }
    let _restore = Restore(BYPASS.with(|b| b.replace(true)));
    f()
}

// ---- Products: tensors to blocks ----

/// Output rows (or columns) below which a block is not split further.
const MIN_BLOCK_SIDE: usize = 32;

/// How a (rows, cols) matrix with element strides (`s0`, `s1`) is read:
/// row-major as stored, or as the transpose of a row-major matrix; `None`
/// when neither fits (a copy makes it row-major).
fn operand(rows: usize, cols: usize, s0: usize, s1: usize) -> Option<Operand> {
    if (s1 == 1 || cols == 1) && (rows == 1 || s0 >= cols) {
        let ld = if rows == 1 { cols } else { s0 };
        Some(Operand::AsStored { ld: ld.max(cols) })
    } else if (s0 == 1 || rows == 1) && (cols == 1 || s1 >= rows) {
        let ld = if cols == 1 { rows } else { s1 };
        Some(Operand::Transposed { ld: ld.max(rows) })
    } else {
        None
    }
}

/// The operand view of a tensor whose last two dimensions are the matrix:
/// how each matrix is read, and the element offset of each batch entry.
struct MatrixView {
    op: Operand,
    offsets: Vec<usize>,
}

/// `None` when a BLAS cannot read `t`'s strides, or they reach past its
/// storage of `slice_len` elements.
fn matrix_view(t: &Tensor, slice_len: usize) -> Option<MatrixView> {
    let layout = t.layout();
    let (dims, strides) = (layout.dims(), layout.stride());
    let rank = dims.len();
    let (rows, cols) = (dims[rank - 2], dims[rank - 1]);
    let op = operand(rows, cols, strides[rank - 2], strides[rank - 1])?;
    let last = layout.start_offset()
        + dims
            .iter()
            .zip(strides)
            .map(|(&d, &s)| d.saturating_sub(1) * s)
            .sum::<usize>();
    if last >= slice_len || op.ld() > c_int_max() {
        return None;
    }
    let batch_dims = &dims[..rank - 2];
    let offsets = (0..batch_dims.iter().product::<usize>())
        .map(|flat| {
            let (mut rest, mut offset) = (flat, layout.start_offset());
            for (&d, &s) in batch_dims.iter().zip(strides).rev() {
                offset += (rest % d) * s;
                rest /= d;
            }
            offset
        })
        .collect();
    Some(MatrixView { op, offsets })
}

fn c_int_max() -> usize {
    std::ffi::c_int::MAX as usize
}

impl Blas {
    /// The product on this library, or `Ok(None)` where it does not serve
    /// (another dtype or device, mismatched shapes: candle reports those).
    pub(super) fn matmul(&self, a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
        let cpu = |t: &Tensor| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32;
        let (ad, bd) = (a.dims(), b.dims());
        let rank = ad.len();
        if !cpu(a) || !cpu(b) || rank < 2 || bd.len() != rank || ad[..rank - 2] != bd[..rank - 2] {
            return Ok(None);
        }
        let (m, k, n) = (ad[rank - 2], ad[rank - 1], bd[rank - 1]);
        if bd[rank - 2] != k || [m, n, k].iter().any(|&v| v > c_int_max()) {
            return Ok(None);
        }
        let mut shape = ad[..rank - 2].to_vec();
        shape.extend([m, n]);
        let batches: usize = ad[..rank - 2].iter().product();
        if batches * m * n == 0 || k == 0 {
            return Ok(Some(Tensor::zeros(shape, DType::F32, a.device())?));
        }
        // Operands whose strides a BLAS cannot read are copied row-major.
        let readable = |t: &Tensor| -> Result<Tensor> {
            let (dims, strides) = (t.dims(), t.stride());
            let fits = operand(
                dims[rank - 2],
                dims[rank - 1],
                strides[rank - 2],
                strides[rank - 1],
            );
            Ok(if fits.is_some() {
                t.clone()
            } else {
                t.contiguous()?
            })
        };
        let (a, b) = (readable(a)?, readable(b)?);
        let (a_storage, _) = a.storage_and_layout();
        let (b_storage, _) = b.storage_and_layout();
        let (Storage::Cpu(a_cpu), Storage::Cpu(b_cpu)) = (&*a_storage, &*b_storage) else {
            return Ok(None);
        };
        let (a_data, b_data) = (a_cpu.as_slice::<f32>()?, b_cpu.as_slice::<f32>()?);
        let (Some(av), Some(bv)) = (matrix_view(&a, a_data.len()), matrix_view(&b, b_data.len()))
        else {
            return Ok(None);
        };
        // Not zeroed: with beta = 0 the library writes every element of
        // every block (OpenBLAS never reads C then), and the blocks tile C.
        let mut out: Vec<f32> = Vec::with_capacity(batches * m * n);
        let threads = rayon::current_num_threads().max(1);
        let split_rows = m >= n;
        let side = if split_rows { m } else { n };
        let parts = threads
            .div_ceil(batches)
            .min(side.div_ceil(MIN_BLOCK_SIDE))
            .max(1);
        let chunk = side.div_ceil(parts);
        let (a_ptr, b_ptr, c_ptr) = (a_data.as_ptr(), b_data.as_ptr(), out.as_mut_ptr());
        let mut blocks = Vec::with_capacity(batches * parts);
        for batch in 0..batches {
            for start in (0..side).step_by(chunk) {
                let len = chunk.min(side - start);
                let (a_off, b_off, c_off) = (av.offsets[batch], bv.offsets[batch], batch * m * n);
                // Pointer arithmetic stays inside the operands: `matrix_view`
                // checked the last element of each, and blocks only narrow.
                blocks.push(if split_rows {
                    Block {
                        m: len,
                        n,
                        k,
                        a: a_ptr.wrapping_add(a_off + start * av.op.steps().0),
                        a_op: av.op,
                        b: b_ptr.wrapping_add(b_off),
                        b_op: bv.op,
                        c: c_ptr.wrapping_add(c_off + start * n),
                        ldc: n,
                    }
                } else {
                    Block {
                        m,
                        n: len,
                        k,
                        a: a_ptr.wrapping_add(a_off),
                        a_op: av.op,
                        b: b_ptr.wrapping_add(b_off + start * bv.op.steps().1),
                        b_op: bv.op,
                        c: c_ptr.wrapping_add(c_off + start),
                        ldc: n,
                    }
                });
            }
        }
        // SAFETY: every block lies inside its operands (above) and inside
        // `out`, blocks write disjoint rows or columns of `out`, and the
        // storage guards keep `a` and `b` alive and unchanged meanwhile.
        unsafe { self.run_blocks(&blocks) };
        drop((a_storage, b_storage));
        // SAFETY: the blocks tile all batches * m * n elements and each was
        // written by its sgemm call above.
        unsafe { out.set_len(batches * m * n) };
        Ok(Some(Tensor::from_vec(out, shape, a.device())?))
    }
}
