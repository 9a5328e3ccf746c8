//! Int4 (GPTQ) weights: `C = A·Wᵀ` with `W` a [`Q4Ref`], dequantized on the
//! fly. [`crate::gemm`] routes every int4 right-hand side here, so callers
//! (the CPU backend's `Linear`, `lm_head`) need not know the format.
//!
//! The layout is AutoGPTQ's v1 storage as the checkpoint has it (see
//! [`Q4Ref`]); act-order was resolved when the weight was loaded, so the
//! kernels see groups of consecutive stored rows and gather the activation
//! columns through `perm` once per call (into a scratch `xg`, row `i` holding
//! `x[i, perm[r]]` at stored row `r`), never the weight.
//!
//! Two paths:
//! * **GEMV** (m ≤ [`GEMV_MAX_M`]: decode, small batches): reads the packed
//!   words straight from the memory map. Each task owns a chunk of output
//!   columns (up to 2048) and sweeps the groups in order; within a group it
//!   takes a block of 1–4 word vectors (16 or 8 consecutive columns each)
//!   at a time and runs it over all the group's word rows (8 input rows
//!   each) with the accumulators in registers, then `y = fma(scale, acc,
//!   y)`; it software-prefetches, into L2, the same rows a few blocks
//!   ahead, or the next group's (the hardware prefetchers do not follow
//!   these strided runs). A word vector is dequantized in registers, exactly: nibble `j`
//!   is read in place as the float `2²³ + q·16^(j%4)` (one AND of a half
//!   word kept under the exponent bits of 2²³) minus the group's
//!   `2²³ + z·16^(j%4)`, i.e. `(q − z)·16^(j%4)` with no rounding, against
//!   an input prescaled by `16^-(j%4)` (see `GemvBufs::zb`). Each output
//!   element keeps a per-group accumulator `acc = Σ_r (q − z)·xg[r]` (one
//!   FMA chain in stored row order, from 0) and at the end of a group
//!   `y = fma(scale, acc, y)`. Every element of the result is therefore one
//!   fixed sequence of operations whatever m, the block width, the column
//!   chunking or the threads: batched decode is bit for bit single decode
//!   (on one [`Q4Path`]), for any m this path takes.
//!   The exact form costs three vector ops per 16 weights (AND, SUB, FMA).
//! * **Dequantize + GEMM** (larger m: prefill, vision-sized batches): the
//!   packed f32 GEMM of [`crate::gemm`], whose B packing dequantizes each
//!   `kc × nr` panel straight from the nibbles (`pack_b_q4`): A is packed
//!   once per k slice and shared, W is read and dequantized once, and no
//!   dequantized copy exists beyond a panel per thread. (Dequantizing column
//!   blocks into scratch and running one GEMM per block, as before, repacked
//!   all of A for every block: 43 times for 4096→11008, 52 for 11008→4096.)
//!
//! Under `--cpu-math fast` ([`crate::CpuMath::Fast`]) the GEMV sizes go to
//! [`crate::q4_i8`] instead: int8 activations, integer products (VNNI); and
//! where the CPU has AMX the GEMM sizes run on its tiles
//! ([`crate::gemm::amx`]), the panels dequantized as here, then rounded to
//! bf16 with the activations.
//!
//! Code paths ([`Q4Path`]): AVX-512F intrinsics (16 columns a vector,
//! runtime-detected here: the crate-wide [`Isa`] selects AVX2 vs portable),
//! AVX2+FMA (8 columns), and portable Rust (8-lane arrays, multiply then add).

use crate::common::{gather, Isa, SyncPtr};
use crate::gemm::{gemm_packed, gemm_strided, GemmScratch, MatRef, DECODE_BATCH_INVARIANT_MAX};
use crate::math::{cpu_math, CpuMath};
use crate::q4_i8::{gemv_i8, q4_gemv_i8, Q4I8Path};
use half::slice::HalfFloatSliceExt;
use qvc_ir::{Elems, Q4Ref, Q4Words, Q4_TILE};
use rayon::prelude::*;
use std::cell::Cell;

/// `f32` bits of 2²³: `f32::from_bits(q | MAGIC) == 2²³ + q` for `q < 2²³`.
const MAGIC: u32 = 0x4B00_0000;
const MAGIC_F: f32 = 8_388_608.0;
/// Most output columns per GEMV task for m ≤ 2: each word row is an 8 KiB
/// contiguous run (DRAM and the hardware prefetchers like long runs) and the
/// per-task results and zeros (5 × 8 KiB) stay in L1/L2.
pub(crate) const GEMV_COLS: usize = 2048;
/// The same for m > 2, whose accumulators and results take more room.
pub(crate) const GEMV_COLS_BATCH: usize = 512;
/// `16^-t`: the GEMV reads nibble `j` of a word in place, as `q·16^(j%4)`
/// (see `GemvBufs::zb`), so its input at stored row `r` is prescaled by
/// `16^-(r%4)`. Powers of two: the products are exactly `q·x`.
const NIBBLE_SCALE: [f32; 4] = [1.0, 1.0 / 16.0, 1.0 / 256.0, 1.0 / 4096.0];
/// Columns prefetched ahead in the GEMV sweep (on each word row of a group).
pub(crate) const PREFETCH_COLS: usize = 256;
/// Largest gathered-activation buffer kept for reuse (floats; 4 MiB).
const XG_KEEP_FLOATS: usize = 1 << 20;
/// Largest m the GEMV path takes. It must be at least
/// [`DECODE_BATCH_INVARIANT_MAX`] (its rows are bit-identical to single rows
/// for every m); above 8 it re-reads W once per 8 rows but never writes a
/// dequantized copy, which measured faster up to about 16 rows on the
/// decoder's shapes (kernels/benches/q4_family.rs prints the crossover).
pub const GEMV_MAX_M: usize = 16;

/// Whether int4 GEMMs above [`GEMV_MAX_M`] rows run on AMX tiles under
/// [`CpuMath::Fast`] on `isa` ([`crate::gemm::amx::gemm_q4`]: bf16 products
/// of exactly dequantized panels). Elsewhere, and in exact mode, they run
/// the f32 packed GEMM on FMAs: int4 has no `vdpbf16ps` path.
pub fn fast_prefill_on_tiles(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        isa.resolve() == Isa::Avx512 && crate::gemm::amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        false
    }
}
const _: () = assert!(GEMV_MAX_M >= DECODE_BATCH_INVARIANT_MAX);

/// Which code path the int4 kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Q4Path {
    /// Plain Rust over 8-lane arrays (multiply, then add).
    Portable,
    /// AVX2 + FMA + F16C intrinsics, 8 columns a vector.
    Avx2,
    /// AVX-512F intrinsics, 16 columns a vector.
    Avx512,
}

impl Q4Path {
    /// Every path, most capable last.
    pub const ALL: [Q4Path; 3] = [Q4Path::Portable, Q4Path::Avx2, Q4Path::Avx512];

    /// Whether this CPU can run the path.
    pub fn available(self) -> bool {
        match self {
            Q4Path::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Q4Path::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Q4Path::Avx512 => Q4Path::Avx2.available() && is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            Q4Path::Avx2 | Q4Path::Avx512 => false,
        }
    }

    /// The best path this CPU has.
    pub fn detect() -> Q4Path {
        Self::ALL.into_iter().rev().find(|p| p.available()).unwrap_or(Q4Path::Portable)
    }

    /// The path for a crate-wide [`Isa`]: portable stays portable, AVX2+FMA
    /// runs the AVX2 kernels, anything better the best this CPU has.
    pub fn for_isa(isa: Isa) -> Q4Path {
        let isa = isa.resolve();
        if isa == Isa::Portable {
            Q4Path::Portable
        } else if isa == Isa::Avx2Fma {
            Q4Path::Avx2
        } else {
            Q4Path::detect()
        }
    }

    /// `self` if the CPU has it, else the best path below it: every entry
    /// point goes through this, which makes the target-feature calls sound.
    fn resolve(self) -> Q4Path {
        match self {
            _ if self.available() => self,
            Q4Path::Avx512 => Q4Path::Avx2.resolve(),
            _ => Q4Path::Portable,
        }
    }

    /// The [`Isa`] of the f32 GEMM the dequantizing path runs.
    fn gemm_isa(self) -> Isa {
        match self {
            Q4Path::Portable => Isa::Portable,
            Q4Path::Avx2 => Isa::Avx2Fma,
            Q4Path::Avx512 => Isa::Avx512.resolve(),
        }
    }
}

/// [`Q4Ref::tiled_words`] in parallel, one task per group of word rows
/// ([`Q4Ref::tile_group_into`]): what the loaders run on whole matrices.
/// `None` when the groups split words.
pub fn tile_words(w: &Q4Ref) -> Option<Vec<u32>> {
    if !w.can_tile() {
        return None;
    }
    let tiled = Q4Ref { words: Q4Words::Tiled, ..*w };
    // Decode streams these words every token: huge pages (see `pages`).
    let mut out = crate::pages::huge_vec(tiled.qweight_len(), 0u32);
    if out.is_empty() {
        return Some(out);
    }
    let group_words = w.tile_group_rows() * w.ld.next_multiple_of(Q4_TILE);
    out.par_chunks_mut(group_words).enumerate().for_each(|(g, dst)| w.tile_group_into(g, dst));
    Some(out)
}

/// Dequantize every row of `w` into `out` (`w.rows × w.cols`, row-major,
/// columns in input order).
pub fn dequantize(w: &Q4Ref, out: &mut [f32]) {
    assert_eq!(out.len(), w.rows * w.cols, "q4 dequantize: output has the wrong size");
    if w.cols == 0 {
        return;
    }
    out.par_chunks_mut(w.cols).enumerate().for_each(|(row, dst)| {
        let o = w.row0 + row;
        for r in 0..w.cols {
            let g = r / w.group;
            let s = w.scales[g * w.ld + o].to_f32();
            let col = w.perm.map_or(r, |p| p[r] as usize);
            dst[col] = s * (w.q(r, o) as f32 - w.zero(g, o) as f32);
        }
    });
}

/// Naive reference: `y[i, o] (+)= Σ_c x[i, c] · W[o, c]` in f64, element by
/// element through [`Q4Ref::get`] (which resolves act-order the slow way).
pub fn q4_linear_ref(x: &[f32], m: usize, w: &Q4Ref, y: &mut [f32], accumulate: bool) {
    let (k, n) = (w.cols, w.rows);
    assert_eq!(x.len(), m * k, "q4_linear_ref: x has the wrong size");
    assert_eq!(y.len(), m * n, "q4_linear_ref: y has the wrong size");
    for i in 0..m {
        for o in 0..n {
            let mut s = if accumulate { y[i * n + o] as f64 } else { 0.0 };
            for c in 0..k {
                s += x[i * k + c] as f64 * w.get(o, c) as f64;
            }
            y[i * n + o] = s as f32;
        }
    }
}

/// `y (+)= x·Wᵀ` (`x` row-major `m × w.cols`, `y` row-major `m × w.rows`)
/// as [`crate::gemm`] runs it in exact mode: the GEMV path for
/// m ≤ [`GEMV_MAX_M`], else dequantize + GEMM.
pub fn q4_linear(path: Q4Path, x: &[f32], m: usize, w: &Q4Ref, y: &mut [f32], accumulate: bool) {
    q4_linear_with_math(CpuMath::Exact, path, x, m, w, y, accumulate)
}

/// [`q4_linear`] in a chosen [`CpuMath`] mode, as [`crate::gemm`] runs it
/// in that mode: under [`CpuMath::Fast`], m ≤ [`GEMV_MAX_M`] takes the
/// int8-activation GEMV ([`crate::q4_i8`], on [`Q4I8Path::for_q4`]`(path)`);
/// everything else is exact. For tests and benchmarks (the process-wide
/// mode is [`crate::cpu_math`]).
pub fn q4_linear_with_math(
    math: CpuMath,
    path: Q4Path,
    x: &[f32],
    m: usize,
    w: &Q4Ref,
    y: &mut [f32],
    accumulate: bool,
) {
    if m <= GEMV_MAX_M && math == CpuMath::Fast {
        q4_gemv_i8(Q4I8Path::for_q4(path), x, m, w, y, accumulate)
    } else if m <= GEMV_MAX_M {
        q4_gemv(path, x, m, w, y, accumulate)
    } else {
        q4_gemm_dequant(path, x, m, w, y, accumulate)
    }
}

fn check_sizes(what: &str, x: &[f32], m: usize, w: &Q4Ref, y: &[f32]) {
    assert_eq!(x.len(), m * w.cols, "{what}: x has {} elements, expected {m}x{}", x.len(), w.cols);
    assert_eq!(y.len(), m * w.rows, "{what}: y has {} elements, expected {m}x{}", y.len(), w.rows);
}

/// The exact GEMV path on any m (rows in batches of 8; the dispatcher sends
/// m ≤ [`GEMV_MAX_M`] here in exact mode). Public for tests and benchmarks.
pub fn q4_gemv(path: Q4Path, x: &[f32], m: usize, w: &Q4Ref, y: &mut [f32], accumulate: bool) {
    check_sizes("q4_gemv", x, m, w, y);
    let a = MatRef::row_major(Elems::F32(x), m, w.cols);
    let parallel = rayon::current_num_threads() > 1 && m * w.rows * w.cols >= 1 << 16;
    with_xg(&a, w, true, |xg| gemv(path.resolve(), xg, m, w, y, w.rows, accumulate, parallel));
}

/// The dequantize + GEMM path on any m. Public for tests and benchmarks.
pub fn q4_gemm_dequant(path: Q4Path, x: &[f32], m: usize, w: &Q4Ref, y: &mut [f32], accumulate: bool) {
    check_sizes("q4_gemm_dequant", x, m, w, y);
    let a = MatRef::row_major(Elems::F32(x), m, w.cols);
    let parallel = rayon::current_num_threads() > 1 && m * w.rows * w.cols >= 1 << 16;
    let isa = path.resolve().gemm_isa();
    with_xg(&a, w, false, |xg| gemm_dequant(isa, xg, m, w, y, w.rows, accumulate, parallel));
}

/// `C (+)= A·B` where `B`'s data is the int4 weight `w`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_q4(
    isa: Isa,
    a: &MatRef,
    b: &MatRef,
    w: &Q4Ref,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) {
    let (m, k, n) = (a.rows, b.rows, b.cols);
    // B = Wᵀ restricted to rows r0.. of W: the only view the graphs make
    // (`x · wᵀ`). Any other view is served element by element.
    let cols = w.cols.max(1);
    let r0 = b.offset / cols;
    if b.row_stride == 1 && b.col_stride == w.cols && b.offset.is_multiple_of(cols) && k == w.cols && r0 + n <= w.rows {
        let view = w.rows_range(r0, r0 + n);
        let path = Q4Path::for_isa(isa);
        let small = m <= GEMV_MAX_M;
        if small && cpu_math() == CpuMath::Fast {
            gemv_i8(Q4I8Path::for_q4(path), a, &view, c, ldc, accumulate, parallel);
            return;
        }
        with_xg(a, &view, small, |xg| {
            if small {
                gemv(path, xg, m, &view, c, ldc, accumulate, parallel)
            } else {
                gemm_dequant(isa.resolve(), xg, m, &view, c, ldc, accumulate, parallel)
            }
        });
    } else {
        let mut d = vec![0f32; n * k];
        d.par_chunks_mut(k.max(1)).enumerate().for_each(|(j, row)| {
            for (p, v) in row.iter_mut().enumerate() {
                *v = b.get(p, j);
            }
        });
        let bf = MatRef::row_major(Elems::F32(&d), n, k).transposed();
        gemm_strided(isa, a, &bf, c, ldc, accumulate, parallel, &mut GemmScratch::default());
    }
}

thread_local! {
    /// Per-thread scratch reused across calls: the gathered activations and
    /// the packed GEMM's buffers. Taken out of
    /// the cell while in use, so a nested call on the same thread (a rayon
    /// task stolen while waiting) just allocates its own.
    static XG: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static GEMM: Cell<Option<GemmScratch>> = const { Cell::new(None) };
}

/// `f(xg)` with `xg` = `a` widened to f32 and gathered through `w.perm`:
/// row `i` (k floats) holds `a[i, perm[r]]` at stored row `r`, times
/// `NIBBLE_SCALE[r % 4]` when `scaled` (the GEMV's input).
pub(crate) fn with_xg(a: &MatRef, w: &Q4Ref, scaled: bool, f: impl FnOnce(&[f32])) {
    let (m, k) = (a.rows, a.cols);
    let mut xg = XG.with(Cell::take);
    if xg.len() < m * k {
        xg.resize(m * k, 0.0);
    }
    let mut row = vec![0f32; if w.perm.is_some() { k } else { 0 }];
    for i in 0..m {
        let dst = &mut xg[i * k..(i + 1) * k];
        match w.perm {
            None => gather(&a.data, a.index(i, 0), a.col_stride, dst),
            Some(perm) => {
                gather(&a.data, a.index(i, 0), a.col_stride, &mut row);
                for (d, &p) in dst.iter_mut().zip(perm) {
                    *d = row[p as usize];
                }
            }
        }
        if scaled {
            // Exact (powers of two), see `GemvBufs::zb`.
            for (r, d) in dst.iter_mut().enumerate() {
                *d *= NIBBLE_SCALE[r % 4];
            }
        }
    }
    f(&xg[..m * k]);
    // A prefill's gathered activations can be tens of MiB: keep only
    // decode-sized buffers for the next call.
    if xg.len() <= XG_KEEP_FLOATS {
        XG.with(|c| c.set(xg));
    }
}

// ---------------------------------------------------------------------------
// GEMV

/// Per-task buffers of the GEMV path, padded to whole 16-lane vectors.
#[derive(Default)]
struct GemvBufs {
    /// The ragged last word vector of a chunk, one group's word rows of
    /// it, 16 words a row, zero-padded (padding lanes compute 0 − 0 and are
    /// never stored to C).
    tail: Vec<u32>,
    /// Results, `rows × cwp`.
    y: Vec<f32>,
    /// Four rows of `cwp`: row `t` holds `2²³ + zero·16^t` of the current
    /// group, per column. A nibble `j` of word `w` is read in place as
    /// `f32::from_bits(w' & (15 << 4t) | 2²³ bits) = 2²³ + q·16^t` (`t = j % 4`,
    /// `w' = w >> 16` for `j ≥ 4`: one shift per word vector, one
    /// ternary-logic op per nibble), minus row `t`: exactly `(q − z)·16^t`
    /// (all values below 2²⁴). The input is prescaled by `16^-t`.
    zb: Vec<f32>,
    /// Scale of the current group, per column.
    sb: Vec<f32>,
}

/// What one chunk computes: rows `i0..i0 + M` of `xg` against columns
/// `c0..c0 + cw` of the view.
#[derive(Clone, Copy)]
struct Chunk<'a> {
    xg: &'a [f32],
    k: usize,
    w: &'a Q4Ref<'a>,
    i0: usize,
    c0: usize,
    cw: usize,
    c: SyncPtr,
    ldc: usize,
    accumulate: bool,
}

#[allow(clippy::too_many_arguments)]
fn gemv(path: Q4Path, xg: &[f32], m: usize, w: &Q4Ref, c: &mut [f32], ldc: usize, accumulate: bool, parallel: bool) {
    let (n, k) = (w.rows, w.cols);
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= (m - 1) * ldc + n, "q4 gemv: C too small");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    let cp = SyncPtr(c.as_mut_ptr());
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    let cap = if m <= 2 { GEMV_COLS } else { GEMV_COLS_BATCH };
    let gcols = gemv_cols(n, cap, threads);
    let chunks = n.div_ceil(gcols);
    let run = |bufs: &mut GemvBufs, t: usize| {
        let c0 = t * gcols;
        let cw = gcols.min(n - c0);
        let mut i0 = 0;
        while i0 < m {
            let rows = (m - i0).min(8);
            let ch = Chunk { xg, k, w, i0, c0, cw, c: cp, ldc, accumulate };
            // SAFETY: `path` is resolved (the CPU has its features); the chunk
            // writes only C rows i0..i0+rows, columns c0..c0+cw, which no
            // other task touches; C holds them (asserted above).
            unsafe { run_chunk(path, rows, &ch, bufs) };
            i0 += rows;
        }
    };
    if parallel && chunks > 1 {
        (0..chunks).into_par_iter().for_each_init(GemvBufs::default, run);
    } else {
        let mut bufs = GemvBufs::default();
        (0..chunks).for_each(|t| run(&mut bufs, t));
    }
}

/// Columns per GEMV task: at most `cap` (rounded up to a whole tile), a
/// multiple of [`Q4_TILE`] (so that tiled blocks never cross a tile edge
/// when the view starts on one), and (when the
/// matrix is wide enough) a number of tasks that is a multiple of the
/// threads, so that they finish together. Only the speed depends on it.
pub(crate) fn gemv_cols(n: usize, cap: usize, threads: usize) -> usize {
    let threads = threads.max(1);
    let mut chunks = threads;
    while n.div_ceil(chunks) > cap {
        chunks += threads;
    }
    n.div_ceil(chunks).next_multiple_of(Q4_TILE)
}

/// SAFETY: `path` must be available on this CPU; see [`chunk`].
unsafe fn run_chunk(path: Q4Path, rows: usize, ch: &Chunk, bufs: &mut GemvBufs) {
    match path {
        #[cfg(target_arch = "x86_64")]
        Q4Path::Avx512 => chunk_avx512(rows, ch, bufs),
        #[cfg(target_arch = "x86_64")]
        Q4Path::Avx2 => chunk_avx2(rows, ch, bufs),
        _ => chunk_portable(rows, ch, bufs),
    }
}

/// `chunk::<K, rows>(ch, bufs)` for a run-time row count 1..=8: the row
/// count is a const generic so that each kernel keeps its accumulators in
/// registers. `chunk` resolves where the macro is used, so the exact kernels
/// here and the int8 ones in [`crate::q4_i8`] share it.
macro_rules! dispatch_rows {
    ($k:ty, $rows:expr, $ch:expr, $bufs:expr) => {
        match $rows {
            1 => chunk::<$k, 1>($ch, $bufs),
            2 => chunk::<$k, 2>($ch, $bufs),
            3 => chunk::<$k, 3>($ch, $bufs),
            4 => chunk::<$k, 4>($ch, $bufs),
            5 => chunk::<$k, 5>($ch, $bufs),
            6 => chunk::<$k, 6>($ch, $bufs),
            7 => chunk::<$k, 7>($ch, $bufs),
            8 => chunk::<$k, 8>($ch, $bufs),
            r => unreachable!("int4 GEMV chunk of {r} rows (chunks hold 1 to 8)"),
        }
    };
}
pub(crate) use dispatch_rows;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn chunk_avx512(rows: usize, ch: &Chunk, bufs: &mut GemvBufs) {
    dispatch_rows!(Avx512K, rows, ch, bufs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn chunk_avx2(rows: usize, ch: &Chunk, bufs: &mut GemvBufs) {
    dispatch_rows!(Avx2K, rows, ch, bufs)
}

unsafe fn chunk_portable(rows: usize, ch: &Chunk, bufs: &mut GemvBufs) {
    dispatch_rows!(PortableK, rows, ch, bufs)
}

/// One word vector's worth of work on a code path. `LANES` consecutive
/// columns; all pointers are to padded buffers (whole vectors readable).
trait Kern {
    const LANES: usize;
    /// A vector of `LANES` f32 (an accumulator, held in a register).
    type V: Copy;
    /// The zero vector.
    ///
    /// SAFETY: the path's CPU features.
    unsafe fn zero() -> Self::V;
    /// Nibbles `j0..j1` (all 8 when `j0 == 0 && j1 == 8`) of the word
    /// vector at `wp`: `a[u][i] += (q_j − z)·x[i][j]` in nibble order, for
    /// each of the `M` rows (`x[i]` points at the word row's first prescaled
    /// input; the four zero rows of [`GemvBufs::zb`] at `zp + t·ld`).
    ///
    /// `U` consecutive word vectors at once (independent FMA chains for the
    /// out-of-order core; each element's chain is the same whatever `U`).
    ///
    /// SAFETY: `U·LANES` elements readable at `wp` and at each `zp + t·ld`;
    /// `x[i] + j1 - 1` readable; the path's CPU features.
    unsafe fn word<const M: usize, const U: usize>(
        wp: *const u32,
        zp: *const f32,
        x: &[*const f32; M],
        a: &mut [[Self::V; M]; U],
        ld: usize,
        j0: usize,
        j1: usize,
    );
    /// End of a group over one vector: `y = fma(s, acc, y)` for each row
    /// (row `i` of `y` at `y + i·ld`).
    ///
    /// SAFETY: `LANES` elements readable at `sp`, readable and writable at
    /// each `y + i·ld`; the path's CPU features.
    unsafe fn group_end<const M: usize>(sp: *const f32, a: &[Self::V; M], y: *mut f32, ld: usize);
    /// The group's rows of [`GemvBufs::zb`] and its scales `sb` for columns
    /// `o0..o0 + cw` (rows `cwp` apart).
    ///
    /// SAFETY: the path's CPU features.
    #[inline(always)]
    unsafe fn fill(w: &Q4Ref, g: usize, o0: usize, cw: usize, cwp: usize, zb: &mut [f32], sb: &mut [f32]) {
        fill_group(w, g, o0, cw, zb, sb);
        let (z0, zt) = zb.split_at_mut(cwp);
        for (t, zr) in zt.chunks_mut(cwp).enumerate() {
            let f = (16u32 << (4 * t)) as f32;
            for (d, &z) in zr[..cw].iter_mut().zip(&z0[..cw]) {
                *d = (z - MAGIC_F) * f + MAGIC_F;
            }
        }
    }
}

/// One group over one block of `U` word vectors: the accumulators stay in
/// registers over all the group's word rows `pa..pb` (stored rows `ra..rb`),
/// then `y = fma(s, acc, y)`. Word row `p` of the block is at
/// `wp + (p − pa)·wld`; `pf` (with the same stride, `pf_rows` rows) is
/// what the sweep reads next, prefetched a row at a time.
///
/// SAFETY: as for [`Kern::word`] on every word row, and for
/// [`Kern::group_end`] on every vector; `xr[i] + rb − 1` readable.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block<K: Kern, const M: usize, const U: usize>(
    wp: *const u32,
    wld: usize,
    (pa, pb, ra, rb): (usize, usize, usize, usize),
    (pf, pf_rows): (*const u32, usize),
    zp: *const f32,
    sp: *const f32,
    xr: &[*const f32; M],
    y: *mut f32,
    ld: usize,
) {
    let mut a = [[K::zero(); M]; U];
    for p in pa..pb {
        let (j0, j1) = (ra.max(p * 8) - p * 8, (rb - p * 8).min(8));
        let d = p - pa;
        if d < pf_rows {
            let row = pf.wrapping_add(d * wld);
            for l in (0..U * K::LANES).step_by(16) {
                prefetch_l2(row.wrapping_add(l));
            }
        }
        let x: [*const f32; M] = std::array::from_fn(|i| xr[i].add(p * 8));
        K::word::<M, U>(wp.add(d * wld), zp, &x, &mut a, ld, j0, j1);
    }
    for (u, au) in a.iter().enumerate() {
        K::group_end::<M>(sp.add(u * K::LANES), au, y.add(u * K::LANES), ld);
    }
}

/// The GEMV sweep of one chunk over all groups (see the module doc).
///
/// SAFETY: `K`'s CPU features; C must hold rows `ch.i0..ch.i0 + M` ×
/// columns `ch.c0..ch.c0 + ch.cw` and no other thread may touch them.
#[inline(always)]
unsafe fn chunk<K: Kern, const M: usize>(ch: &Chunk, bufs: &mut GemvBufs) {
    let Chunk { xg, k, w, i0, c0, cw, c, ldc, accumulate } = *ch;
    let cwp = cw.next_multiple_of(16);
    bufs.y.clear();
    bufs.y.resize(M * cwp, 0.0);
    for (v, len, pad) in [(&mut bufs.zb, 4 * cwp, MAGIC_F), (&mut bufs.sb, cwp, 0.0)] {
        v.clear();
        v.resize(len, pad);
    }
    let y = bufs.y.as_mut_ptr();
    let cbase = c.get().add(i0 * ldc + c0);
    if accumulate {
        for i in 0..M {
            std::ptr::copy_nonoverlapping(cbase.add(i * ldc), y.add(i * cwp), cw);
        }
    }
    let o0 = w.row0 + c0;
    let words = k.div_ceil(8);
    let qw = w.qweight.as_ptr();
    assert!(w.qweight.len() >= w.qweight_len(), "q4 gemv: qweight too short");
    let xr: [*const f32; M] = std::array::from_fn(|i| xg.as_ptr().add((i0 + i) * k));
    // Few rows: several vectors at once, so that enough independent FMA
    // chains are in flight (see `unroll`).
    let step = K::LANES * unroll(M, K::LANES);
    for g in 0..w.groups() {
        let (ra, rb) = (g * w.group, ((g + 1) * w.group).min(k));
        let (pa, pb) = (ra / 8, rb.div_ceil(8));
        K::fill(w, g, o0, cw, cwp, &mut bufs.zb, &mut bufs.sb);
        let (zb, sb) = (bufs.zb.as_ptr(), bufs.sb.as_ptr());
        let rows = (pa, pb, ra, rb);
        let next = (pb, (pb - pa).min(words.saturating_sub(pb)));
        let pf = |v: usize| prefetch_target(w, (pa, pb - pa), next, o0, v, cw);
        let mut v = 0;
        while v < cw {
            prefetch_group_params(w, g + 1, o0 + v);
            let (zp, sp, yp) = (zb.add(v), sb.add(v), y.add(v));
            v += match col_block(w, (pa, pb - pa), o0 + v, cw - v, step, K::LANES, &mut bufs.tail) {
                ColBlock::Wide(wp, wld) => {
                    match unroll(M, K::LANES) {
                        4 => block::<K, M, 4>(wp, wld, rows, pf(v), zp, sp, &xr, yp, cwp),
                        2 => block::<K, M, 2>(wp, wld, rows, pf(v), zp, sp, &xr, yp, cwp),
                        _ => block::<K, M, 1>(wp, wld, rows, pf(v), zp, sp, &xr, yp, cwp),
                    }
                    step
                }
                ColBlock::One(wp, wld) => {
                    block::<K, M, 1>(wp, wld, rows, pf(v), zp, sp, &xr, yp, cwp);
                    K::LANES
                }
                ColBlock::Copied(tp, n) => {
                    block::<K, M, 1>(tp, 16, rows, (qw, 0), zp, sp, &xr, yp, cwp);
                    n
                }
            };
        }
    }
    for i in 0..M {
        std::ptr::copy_nonoverlapping(y.add(i * cwp), cbase.add(i * ldc), cw);
    }
}

/// Where the GEMV sweep's next block of columns comes from (both int4
/// GEMVs): `Wide` is `step` columns (the unrolled block) in place, `One`
/// one vector of `lanes` columns in place, each as (first word, word-row
/// stride); `Copied` is a ragged last vector or one across a tile edge,
/// its words copied into `tail` (16 words a row, zero-padded), with its
/// column count.
pub(crate) enum ColBlock {
    Wide(*const u32, usize),
    One(*const u32, usize),
    Copied(*const u32, usize),
}

/// The block at absolute column `o` of word rows `(p, rows)` with `left`
/// columns left in the chunk (see [`ColBlock`]).
#[inline(always)]
pub(crate) fn col_block(
    w: &Q4Ref,
    (p, rows): (usize, usize),
    o: usize,
    left: usize,
    step: usize,
    lanes: usize,
    tail: &mut Vec<u32>,
) -> ColBlock {
    let at = |(i, wld): (usize, usize)| (w.qweight.as_ptr().wrapping_add(i), wld);
    if let Some((wp, wld)) = w.word_run(p, o, step).filter(|_| step <= left).map(at) {
        return ColBlock::Wide(wp, wld);
    }
    if let Some((wp, wld)) = w.word_run(p, o, lanes).filter(|_| lanes <= left).map(at) {
        return ColBlock::One(wp, wld);
    }
    let n = left.min(lanes);
    tail.clear();
    tail.resize(rows * 16, 0);
    for (d, t) in tail.chunks_mut(16).enumerate() {
        w.words_into(p + d, o, &mut t[..n]);
    }
    ColBlock::Copied(tail.as_ptr(), n)
}

/// Prefetch, into L2, group `g`'s scales and zeros for the block of
/// [`Q4_TILE`] columns from absolute column `o` (nothing past the last
/// group). The sweeps call it for the next group on every block of the
/// current one, so the next group's parameters, one short run a whole row
/// after this group's that the hardware prefetchers do not follow, arrive
/// a few lines at a time. Prefetching a chunk's whole run at a group's
/// start stalled on the first scales of each group all the same
/// (`perf annotate`: 4.6% of an lm_head GEMV on `vcvtph2ps` of the
/// scales): 64 lines issued at once into a full stream of weight misses,
/// then evicted from L1 by the 128 KiB of words read before their use.
#[inline(always)]
pub(crate) fn prefetch_group_params(w: &Q4Ref, g: usize, o: usize) {
    if g >= w.groups() {
        return;
    }
    let s = w.scales.as_ptr().wrapping_add(g * w.ld + o) as *const u8;
    prefetch_l2(s);
    prefetch_l2(s.wrapping_add(64));
    prefetch_l2(w.qzeros.as_ptr().wrapping_add((g * w.ld + o) / 8));
}

/// Prefetch the cache line at `p` into L2 (no-op where unsupported): what
/// both int4 GEMVs prefetch their words with. Into L1 (`prefetcht0`, as
/// before) each line in flight holds one of the core's few L1 miss buffers
/// for a whole DRAM latency, which caps a core's stream below what it can
/// read; the L2's queue is deeper. Measured on a Zen 4 VM, 2 threads, three
/// interleaved rounds of `benches/q4_family.rs` (c_attn, lm_head; tiled):
/// int8 GEMV 22-30 GB/s with L1 prefetches, 26-30 with L2 ones; exact
/// 16-20 against 16-22 (9 of 12 pairs faster); no software prefetch at all
/// was as good for int8 and worse for exact (13-17).
#[inline(always)]
pub(crate) fn prefetch_l2<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// What to prefetch while the block at chunk column `v` of word rows
/// `here = (p, rows)` runs: the same word rows [`PREFETCH_COLS`] columns
/// on, or past the chunk's end (`cw` columns from absolute column `o0`) the
/// start of the word rows read next, `next = (p, rows)`; as (first word,
/// word rows), their stride being the block's. In the stored order each
/// block reads `rows` strided runs, which the hardware prefetchers do not
/// follow; in tiled order this stays a few KiB ahead in the same stream.
#[inline(always)]
pub(crate) fn prefetch_target(
    w: &Q4Ref,
    here: (usize, usize),
    next: (usize, usize),
    o0: usize,
    v: usize,
    cw: usize,
) -> (*const u32, usize) {
    let qw = w.qweight.as_ptr();
    let (p, o, rows) = match v + PREFETCH_COLS {
        pc if pc < cw => (here.0, o0 + pc, here.1),
        pc if next.0 < w.word_rows() => (next.0, o0 + pc - cw, next.1),
        _ => return (qw, 0),
    };
    // Only an address: clamped into the slice, never read.
    let i = w.word_index(p, o).min(w.qweight.len().saturating_sub(1));
    (qw.wrapping_add(i), rows)
}

/// Word vectors per step of the GEMV sweep for `m` rows: enough
/// independent FMA chains (`U·m`) without spilling the `U·m` accumulators
/// and `2U` half words (32 registers with AVX-512, 16 with AVX2; measured
/// single-thread, cache-resident, AVX-512: m = 3 with `U` = 4 instead of 2
/// ran 30% faster, m = 8 with 2 instead of 1 33% faster).
const fn unroll(m: usize, lanes: usize) -> usize {
    match (m, lanes) {
        (1..=4, 16) | (1..=2, _) => 4,
        (5..=8, 16) | (3..=4, _) => 2,
        _ => 1,
    }
}

/// `zb[l] = 2²³ + zero(g, o0 + l)`, `sb[l] = scale(g, o0 + l)` for `l < cw`.
#[inline(always)]
fn fill_group(w: &Q4Ref, g: usize, o0: usize, cw: usize, zb: &mut [f32], sb: &mut [f32]) {
    w.scales[g * w.ld + o0..g * w.ld + o0 + cw].convert_to_f32_slice(&mut sb[..cw]);
    let zrow = &w.qzeros[g * w.ld / 8..];
    if o0.is_multiple_of(8) {
        for (zc, &word) in zb[..cw].chunks_mut(8).zip(&zrow[o0 / 8..]) {
            for (j, z) in zc.iter_mut().enumerate() {
                *z = f32::from_bits(((word >> (4 * j)) & 15) + 1 + MAGIC);
            }
        }
    } else {
        for (l, z) in zb[..cw].iter_mut().enumerate() {
            let o = o0 + l;
            *z = f32::from_bits(((zrow[o / 8] >> (4 * (o % 8))) & 15) + 1 + MAGIC);
        }
    }
}

struct PortableK;

// Lane and row loops index several arrays in step; iterators would obscure it.
#[allow(clippy::needless_range_loop)]
impl Kern for PortableK {
    const LANES: usize = 8;
    type V = [f32; 8];
    #[inline(always)]
    unsafe fn zero() -> [f32; 8] {
        [0.0; 8]
    }
    #[inline(always)]
    unsafe fn word<const M: usize, const U: usize>(
        wp: *const u32,
        zp: *const f32,
        x: &[*const f32; M],
        a: &mut [[[f32; 8]; M]; U],
        ld: usize,
        j0: usize,
        j1: usize,
    ) {
        for (u, au) in a.iter_mut().enumerate() {
            Self::word1::<M>(wp.add(8 * u), zp.add(8 * u), x, au, ld, j0, j1);
        }
    }
    #[inline(always)]
    unsafe fn group_end<const M: usize>(sp: *const f32, a: &[[f32; 8]; M], y: *mut f32, ld: usize) {
        for i in 0..M {
            for l in 0..8 {
                let yy = y.add(i * ld + l);
                *yy += *sp.add(l) * a[i][l];
            }
        }
    }
}

#[allow(clippy::needless_range_loop)]
impl PortableK {
    /// One vector of [`Kern::word`].
    #[inline(always)]
    unsafe fn word1<const M: usize>(
        wp: *const u32,
        zp: *const f32,
        x: &[*const f32; M],
        a: &mut [[f32; 8]; M],
        ld: usize,
        j0: usize,
        j1: usize,
    ) {
        let w0: [u32; 8] = std::ptr::read_unaligned(wp as *const [u32; 8]);
        let w16 = w0.map(|v| v >> 16);
        let z: [[f32; 8]; 4] = std::array::from_fn(|t| std::ptr::read_unaligned(zp.add(t * ld) as *const [f32; 8]));
        for j in j0..j1 {
            let (src, t) = if j < 4 { (&w0, j) } else { (&w16, j - 4) };
            let mut q = [0f32; 8];
            for l in 0..8 {
                q[l] = f32::from_bits((src[l] & (15 << (4 * t))) | MAGIC) - z[t][l];
            }
            for i in 0..M {
                let xv = *x[i].add(j);
                for l in 0..8 {
                    a[i][l] += q[l] * xv;
                }
            }
        }
    }
}

/// The nibble step of the AVX kernels: `$q(u, half, t)` dequantizes nibble
/// `4·half + t` of word vector `u` exactly (see [`GemvBufs::zb`]); nibbles
/// `j0..j1` go into the `U × M` accumulators, each chain in nibble order.
/// Unrolled (constant masks) when the word is whole.
macro_rules! nibbles {
    ($q:expr, $fma:expr, $a:expr, $x:expr, $j0:expr, $j1:expr, $m:expr, $u:expr) => {
        if $j0 == 0 && $j1 == 8 {
            // Written out: constant half/mask indices keep everything in
            // registers (a loop over j is not always unrolled).
            nibbles!(@one $q, $fma, $a, $x, $m, $u, 0, 0, 0);
            nibbles!(@one $q, $fma, $a, $x, $m, $u, 1, 0, 1);
            nibbles!(@one $q, $fma, $a, $x, $m, $u, 2, 0, 2);
            nibbles!(@one $q, $fma, $a, $x, $m, $u, 3, 0, 3);
            nibbles!(@one $q, $fma, $a, $x, $m, $u, 4, 1, 0);
            nibbles!(@one $q, $fma, $a, $x, $m, $u, 5, 1, 1);
            nibbles!(@one $q, $fma, $a, $x, $m, $u, 6, 1, 2);
            nibbles!(@one $q, $fma, $a, $x, $m, $u, 7, 1, 3);
        } else {
            for j in $j0..$j1 {
                for u in 0..$u {
                    let q = $q(u, j / 4, j % 4);
                    for i in 0..$m {
                        $a[u][i] = $fma(q, *$x[i].add(j), $a[u][i]);
                    }
                }
            }
        }
    };
    (@one $q:expr, $fma:expr, $a:expr, $x:expr, $m:expr, $u:expr, $j:literal, $h:literal, $t:literal) => {
        for u in 0..$u {
            let q = $q(u, $h, $t);
            for i in 0..$m {
                $a[u][i] = $fma(q, *$x[i].add($j), $a[u][i]);
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
struct Avx2K;

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
impl Kern for Avx2K {
    const LANES: usize = 8;
    type V = std::arch::x86_64::__m256;
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        std::arch::x86_64::_mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn word<const M: usize, const U: usize>(
        wp: *const u32,
        zp: *const f32,
        x: &[*const f32; M],
        a: &mut [[Self::V; M]; U],
        ld: usize,
        j0: usize,
        j1: usize,
    ) {
        use std::arch::x86_64::*;
        let w0: [__m256i; U] = std::array::from_fn(|u| _mm256_loadu_si256(wp.add(8 * u) as *const __m256i));
        let magic = _mm256_set1_epi32(MAGIC as i32);
        // As in the AVX-512 kernel: half words under the bits of 2²³.
        let w: [[__m256i; 2]; U] = std::array::from_fn(|u| {
            let lo = _mm256_or_si256(_mm256_and_si256(w0[u], _mm256_set1_epi32(0xFFFF)), magic);
            [lo, _mm256_or_si256(_mm256_srli_epi32::<16>(w0[u]), magic)]
        });
        let q = |u: usize, h: usize, t: usize| {
            let bits = _mm256_and_si256(w[u][h], _mm256_set1_epi32((15 << (4 * t)) | MAGIC as i32));
            _mm256_sub_ps(_mm256_castsi256_ps(bits), _mm256_loadu_ps(zp.add(t * ld + 8 * u)))
        };
        let fma = |q: __m256, x: f32, a: __m256| _mm256_fmadd_ps(q, _mm256_set1_ps(x), a);
        nibbles!(q, fma, a, x, j0, j1, M, U);
    }
    #[inline(always)]
    unsafe fn group_end<const M: usize>(sp: *const f32, a: &[Self::V; M], y: *mut f32, ld: usize) {
        use std::arch::x86_64::*;
        let s = _mm256_loadu_ps(sp);
        for i in 0..M {
            let yy = y.add(i * ld);
            _mm256_storeu_ps(yy, _mm256_fmadd_ps(s, a[i], _mm256_loadu_ps(yy)));
        }
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx512K;

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
impl Kern for Avx512K {
    const LANES: usize = 16;
    type V = std::arch::x86_64::__m512;
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        std::arch::x86_64::_mm512_setzero_ps()
    }
    /// The same values as the portable fill (`2²³ + z·16^t` is the bit
    /// pattern `MAGIC | z << 4t`, z ≤ 16), 16 columns at a time: on a
    /// 2048-column chunk the scalar fill cost a good part of the sweep.
    #[inline(always)]
    unsafe fn fill(w: &Q4Ref, g: usize, o0: usize, cw: usize, cwp: usize, zb: &mut [f32], sb: &mut [f32]) {
        use std::arch::x86_64::*;
        if !o0.is_multiple_of(8) {
            fill_group(w, g, o0, cw, zb, sb);
            let (z0, zt) = zb.split_at_mut(cwp);
            for (t, zr) in zt.chunks_mut(cwp).enumerate() {
                let f = (16u32 << (4 * t)) as f32;
                for (d, &z) in zr[..cw].iter_mut().zip(&z0[..cw]) {
                    *d = (z - MAGIC_F) * f + MAGIC_F;
                }
            }
            return;
        }
        assert!(zb.len() >= 4 * cwp && sb.len() >= cw && cw <= cwp, "q4 gemv: fill buffers too small");
        let zrow = &w.qzeros[g * w.ld / 8 + o0 / 8..g * w.ld / 8 + (o0 + cw).div_ceil(8)];
        let srow = &w.scales[g * w.ld + o0..g * w.ld + o0 + cw];
        let idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let sh = _mm512_set_epi32(28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0);
        let (fifteen, one, magic) = (_mm512_set1_epi32(15), _mm512_set1_epi32(1), _mm512_set1_epi32(MAGIC as i32));
        let (zp, sp) = (zb.as_mut_ptr(), sb.as_mut_ptr());
        let mut v = 0;
        while v + 16 <= cw {
            // SAFETY: words v/8, v/8 + 1 and scales v..v + 16 are in the
            // rows sliced above; zb holds 4 rows of cwp ≥ cw, sb cw.
            let pair = _mm512_castsi128_si512(_mm_loadl_epi64(zrow.as_ptr().add(v / 8) as *const __m128i));
            let z = _mm512_add_epi32(
                _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(idx, pair), sh), fifteen),
                one,
            );
            _mm512_storeu_si512(zp.add(v) as *mut __m512i, _mm512_or_si512(z, magic));
            _mm512_storeu_si512(zp.add(cwp + v) as *mut __m512i, _mm512_or_si512(_mm512_slli_epi32::<4>(z), magic));
            _mm512_storeu_si512(zp.add(2 * cwp + v) as *mut __m512i, _mm512_or_si512(_mm512_slli_epi32::<8>(z), magic));
            _mm512_storeu_si512(
                zp.add(3 * cwp + v) as *mut __m512i,
                _mm512_or_si512(_mm512_slli_epi32::<12>(z), magic),
            );
            _mm512_storeu_ps(sp.add(v), _mm512_cvtph_ps(_mm256_loadu_si256(srow.as_ptr().add(v) as *const __m256i)));
            v += 16;
        }
        for l in v..cw {
            let z = ((zrow[l / 8] >> (4 * (l % 8))) & 15) + 1;
            for t in 0..4 {
                zb[t * cwp + l] = f32::from_bits(MAGIC | (z << (4 * t)));
            }
            sb[l] = srow[l].to_f32();
        }
    }
    #[inline(always)]
    unsafe fn word<const M: usize, const U: usize>(
        wp: *const u32,
        zp: *const f32,
        x: &[*const f32; M],
        a: &mut [[Self::V; M]; U],
        ld: usize,
        j0: usize,
        j1: usize,
    ) {
        use std::arch::x86_64::*;
        let w0: [__m512i; U] = std::array::from_fn(|u| _mm512_loadu_si512(wp.add(16 * u) as *const __m512i));
        let magic = _mm512_set1_epi32(MAGIC as i32);
        // Each half word (nibbles 0..4, 4..8) in the low 16 bits under the
        // exponent bits of 2²³ (`A & B | C` = 0xEA); a nibble is then one
        // non-destructive AND with `15 << 4t | MAGIC`.
        let w: [[__m512i; 2]; U] = std::array::from_fn(|u| {
            let lo = _mm512_ternarylogic_epi32::<0xEA>(w0[u], _mm512_set1_epi32(0xFFFF), magic);
            [lo, _mm512_or_si512(_mm512_srli_epi32::<16>(w0[u]), magic)]
        });
        let q = |u: usize, h: usize, t: usize| {
            let bits = _mm512_and_si512(w[u][h], _mm512_set1_epi32((15 << (4 * t)) | MAGIC as i32));
            _mm512_sub_ps(_mm512_castsi512_ps(bits), _mm512_loadu_ps(zp.add(t * ld + 16 * u)))
        };
        let fma = |q: __m512, x: f32, a: __m512| _mm512_fmadd_ps(q, _mm512_set1_ps(x), a);
        nibbles!(q, fma, a, x, j0, j1, M, U);
    }
    #[inline(always)]
    unsafe fn group_end<const M: usize>(sp: *const f32, a: &[Self::V; M], y: *mut f32, ld: usize) {
        use std::arch::x86_64::*;
        let s = _mm512_loadu_ps(sp);
        for i in 0..M {
            let yy = y.add(i * ld);
            _mm512_storeu_ps(yy, _mm512_fmadd_ps(s, a[i], _mm512_loadu_ps(yy)));
        }
    }
}

// ---------------------------------------------------------------------------
// Dequantize + GEMM

/// `C (+)= xg·Wstoredᵀ` through the packed f32 GEMM ([`gemm_packed`]): A
/// (the gathered activations) is packed once per k slice and shared by all
/// tasks, and each task dequantizes its `kc × nr` B panels straight from
/// the nibbles ([`pack_b_q4`], called by the GEMM's B packing), once per
/// panel, so the weight is read and dequantized exactly once and no
/// dequantized copy of it exists beyond one panel per thread.
#[allow(clippy::too_many_arguments)]
fn gemm_dequant(
    isa: Isa,
    xg: &[f32],
    m: usize,
    w: &Q4Ref,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) {
    let (n, k) = (w.rows, w.cols);
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= (m - 1) * ldc + n, "q4 gemm: C too small");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    let a = MatRef::row_major(Elems::F32(&xg[..m * k]), m, k);
    // B(p, j) = W[j, stored row p]: act-order is already in xg.
    let stored = Q4Ref { perm: None, inv: None, ..*w };
    let b = MatRef::row_major(Elems::Q4(stored), n, k).transposed();
    #[cfg(target_arch = "x86_64")]
    if cpu_math() == CpuMath::Fast && fast_prefill_on_tiles(isa) {
        // SAFETY: AMX is available; A is m × k f32 rows; C covers m rows of
        // n, ldc apart (asserted above); m, n, k > 0.
        unsafe { crate::gemm::amx::gemm_q4(&a, &b, &stored, c, ldc, accumulate, parallel) };
        return;
    }
    let mut gs = GEMM.with(Cell::take).unwrap_or_default();
    gemm_packed(isa, &a, &b, c, ldc, accumulate, parallel, &mut gs, None);
    GEMM.with(|c| c.set(Some(gs)));
}

/// The packed GEMM's B panel of an int4 `b` (as [`gemm_dequant`] makes it:
/// `B(p, j) = W[j, stored row p]`): `panel[p·nr + jj] = B(pc + p, j0 + jj)`
/// for `p < kc`, `jj < cols`, zero for `cols ≤ jj < nr`. Each value is
/// `(q − z)·s` in f32, exactly [`dequantize`]'s.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_b_q4(
    isa: Isa,
    w: &Q4Ref,
    b: &MatRef,
    pc: usize,
    kc: usize,
    j0: usize,
    cols: usize,
    nr: usize,
    panel: &mut [f32],
) {
    assert!(
        w.perm.is_none() && b.offset == 0 && b.row_stride == 1 && b.col_stride == w.cols && b.cols == w.rows,
        "q4 pack_b: only the stored-row view gemm_dequant makes is packed"
    );
    assert!(
        cols <= nr && j0 + cols <= w.rows && pc + kc <= w.cols && panel.len() >= kc * nr,
        "q4 pack_b: out of range"
    );
    match (isa, nr) {
        // SAFETY: `isa` is resolved (the CPU has the features).
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, 32) => unsafe { pack_q4_avx512::<32>(w, pc, kc, j0, cols, panel) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2Fma | Isa::Avx512, 16) => unsafe { pack_q4_avx2::<16>(w, pc, kc, j0, cols, panel) },
        (_, 16) => pack_q4::<16>(w, pc, kc, j0, cols, panel),
        (_, 32) => pack_q4::<32>(w, pc, kc, j0, cols, panel),
        (_, nr) => unreachable!("q4 pack_b: panel width {nr}"),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn pack_q4_avx512<const NR: usize>(w: &Q4Ref, pc: usize, kc: usize, j0: usize, cols: usize, panel: &mut [f32]) {
    pack_q4::<NR>(w, pc, kc, j0, cols, panel)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_q4_avx2<const NR: usize>(w: &Q4Ref, pc: usize, kc: usize, j0: usize, cols: usize, panel: &mut [f32]) {
    pack_q4::<NR>(w, pc, kc, j0, cols, panel)
}

/// [`pack_b_q4`] for one panel width: the lane loops over `NR` columns
/// compile to vector shifts, converts and multiplies in the target-feature
/// copies above.
#[inline(always)]
fn pack_q4<const NR: usize>(w: &Q4Ref, pc: usize, kc: usize, j0: usize, cols: usize, panel: &mut [f32]) {
    let o0 = w.row0 + j0;
    let (mut z, mut s, mut words) = ([0f32; NR], [0f32; NR], [0u32; NR]);
    let mut gcur = usize::MAX;
    for (p, dst) in panel[..kc * NR].chunks_exact_mut(NR).enumerate() {
        let r = pc + p;
        let g = r / w.group;
        if g != gcur {
            // Padding columns keep z = s = 0 (and words 0): they pack 0.
            gcur = g;
            for l in 0..cols {
                z[l] = w.zero(g, o0 + l) as f32;
                s[l] = w.scales[g * w.ld + o0 + l].to_f32();
            }
        }
        if p == 0 || r.is_multiple_of(8) {
            w.words_into(r / 8, o0, &mut words[..cols]);
        }
        let sh = 4 * (r % 8);
        let dst: &mut [f32; NR] = dst.try_into().expect("chunks of NR");
        for l in 0..NR {
            dst[l] = (((words[l] >> sh) & 15) as f32 - z[l]) * s[l];
        }
    }
}
