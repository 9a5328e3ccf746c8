//! GEMM: `C[m×n] = A[m×k] · B[k×n]` (optionally `+= C`), f32 arithmetic.
//!
//! A and B are [`MatRef`]s: any dtype ([`Elems`]), any strides, any offset, so
//! a Linear layer's `x · Wᵀ` reads the bf16 `[out, in]` weight in place
//! (`MatRef::row_major(w, out, in).transposed()`). C is f32, row-major.
//!
//! Three paths, chosen by shape and layout (all give the same result to f32
//! rounding, and all are tested against [`gemm_ref`]):
//! * **dot** (m ≤ 8, or m ≤ 24 on AVX-512 when k ≥ 1024, and B's columns
//!   contiguous: the decode / lm_head case, batched decode, short prompts):
//!   parallel over column chunks of B. For k ≥ 1024 (memory-bound): register
//!   tiles of two rows × several columns, B widened in registers, each
//!   element one fixed 8-lane dot product. For shorter k (the lm_head of a
//!   small model, attention's q·kᵀ): groups of 32 columns transposed into
//!   f32 vectors (in registers for m ≤ 2, else into a small panel), each
//!   element one FMA chain over k, no horizontal sums. Either way a row's
//!   result does not depend on m or the column split
//!   ([`DECODE_BATCH_INVARIANT_MAX`]). A B too big for the caches is also
//!   prefetched a column group or two ahead, in address order (DRAM serves
//!   one sequential run faster than interleaved column streams).
//! * **axpy** (m ≤ 8 and B's rows contiguous, `x · P`): parallel over column
//!   chunks; each row of B is scaled into a small accumulator per A row.
//! * **packed** (everything else): BLIS-style. For each `KC` slice of k, A is
//!   packed into `MR`-row panels (once, shared); tasks own runs of B's
//!   columns, and each packs one `NR`-column B panel at a time (widened to
//!   f32, zero-padded, so ragged edges cost nothing in the inner loop) and
//!   runs an `MR×NR` register-blocked micro-kernel over it for every row
//!   panel of its rows, so B is read and widened once. Micro-kernels: 6×16
//!   AVX2+FMA, 12×32 AVX-512 (deeper slices: each slice sweeps C once), or
//!   a portable fixed-array 6×16. The kernels prefetch their C tile before
//!   the k loop.
//!
//! * **bf16 products** (only with [`CpuMath::Fast`], a bf16 B, m above the
//!   dot path's rows, and AVX512-BF16 that outruns the FMAs or AMX tiles:
//!   [`bf16_products_pay`]): the packed path's blocking and
//!   partitioning with k in pairs: A rounded to bf16 (nearest even) and
//!   packed as pairs, B packed as pairs, a 12×32 `vdpbf16ps` micro-kernel
//!   (two products per f32 lane), f32 sums. About twice the exact path's
//!   speed at prefill and ViT shapes on Zen 4/5 (AMX tiles, [`amx`], about
//!   three times on Sapphire Rapids); activations lose ~2⁻⁹ relative, so it
//!   is never the default. f16 weights stay exact (bf16 would round them).
//!   [`gemm_bf16_products`] runs the same kernel for any shape. Decode-sized
//!   Fast GEMMs (m ≤ 24, k ≥ `SHORT_K`, a bf16 `[out, in]` weight) run on
//!   AMX tiles where the CPU has them (m ≤ 16, k a multiple of 32:
//!   [`fast_decode_on_tiles`], [`amx::gemv`]), else the dot path's tiles
//!   with `vdpbf16ps` where that outruns the FMAs
//!   ([`fast_bf16_dot_applies`]): half the instructions per weight byte
//!   keeps more of the stream in flight.
//!
//! * **exact on AMX tiles** (the packed path's shapes with a bf16 B, where
//!   the CPU has AMX: [`exact_amx_applies`]): each element of A split
//!   exactly into three bf16 (`hi + mid + lo`, 24 significant bits), so
//!   each product with a bf16 weight is exact in f32 and only the f32 sums
//!   round, as on the FMAs but in another order and three times as many
//!   ([`amx::gemm`] with [`amx::SPLIT_PARTS`]). About 2.2–2.5× the FMA path at the ViT and
//!   prefill shapes on Sapphire Rapids. A bf16 weight and its f32 widening
//!   then give the same values to f32 rounding, not the same bits (f32
//!   weights stay on the FMAs). `QVC_AMX_EXACT=0` turns it off.
//!
//! Paths are chosen at run time ([`Isa::detect`]); AVX-512 runs its own
//! packed micro-kernel, its own long-k dot kernel ([`crate::gemv`]: 16-lane
//! dot products, weight rows streamed), and the AVX2 code of the short-k
//! dot and axpy paths, which are bound by transposes and loads.
//!
//! Invariants: C's rows are `ldc` apart; every tile writes a disjoint block of
//! C; the first `KC` slice overwrites C unless `accumulate`, later ones add.

use crate::common::{gather, par_chunks, par_for, worth_parallel, Isa, Src, SyncPtr};
#[cfg(target_arch = "x86_64")]
pub mod amx;
use crate::math::{cpu_math, CpuMath};
use qvc_ir::{DType, Elems};

/// Rows of the micro-kernel tile (broadcast A values).
pub const MR: usize = 6;
/// Columns of the micro-kernel tile (two 8-lane vectors).
pub const NR: usize = 16;
/// Depth of one packed slice: a `KC×NR` B panel (16 KiB) stays in L1.
const KC: usize = 256;
/// Rows of the AVX-512 micro-kernel tile.
pub const MR_AVX512: usize = 12;
/// Columns of the AVX-512 micro-kernel tile (two 16-lane vectors): with
/// `MR_AVX512` rows, 24 of the 32 zmm registers accumulate.
pub const NR_AVX512: usize = 32;
/// AVX-512 slice depth. Deep, because each slice sweeps C once (load, add,
/// store) and the 512-bit kernel finishes a tile's slice twice as fast as
/// the AVX2 one: measured on Zen 5 (1 thread, the ViT and decoder shapes),
/// 256 reached 73% of the FMA peak, 512 82%, 1024 86-88%, 2048 no more.
/// The 128 KiB B panel then lives in L2, which feeds the two loads per 24
/// FMAs easily.
const KC_AVX512: usize = 1024;
/// AVX-512 slice depth and most rows of a task's A block where each core
/// has at least [`BIG_L2`] of L2 (Intel's server cores since Sapphire
/// Rapids): the block (`480 × 512` f32, 960 KiB) then stays in L2 while the
/// task's B panels run over it, where the 1024-deep slice of a 1024-row A
/// (4 MiB) streamed from L3 for every panel. Measured on the 2-core Sapphire
/// Rapids guest (1 thread, three interleaved rounds, best of 10 calls, of
/// the FMA peak): ViT in_proj 1024×1664→4992 0.72/0.76/0.71 → 0.81/0.80/0.74,
/// c_proj 1024×8192→1664 0.71/0.73/0.71 → 0.76/0.81/0.74; on 2 threads (best of 8)
/// in_proj 0.67/0.70/0.70 → 0.79/0.74/0.73, c_proj 0.65/0.65/0.66 →
/// 0.73/0.71/0.77, c_fc 0.70/0.70/0.73 → 0.71/0.70/0.77. An A whose
/// 1024-deep slice fits [`A_L2_BYTES`] (a prefill of up to 320 rows) keeps
/// that slice: at 512 a 300-row c_attn lost 4-9% (mean of 8 calls) on 2
/// threads to the doubled sweeps of C. Zen 4 and 5 (1 MiB of L2, a fast
/// L3) keep [`KC_AVX512`] and whole-column tasks.
const KC_AVX512_L2: usize = 512;
const MC_AVX512_L2: usize = 480;
/// The A block the big-L2 blocking keeps in L2 (5/8 of 2 MiB).
const A_L2_BYTES: usize = 1280 << 10;
/// L2 per core from which the AVX-512 path blocks A's rows for it.
const BIG_L2: usize = 2 << 20;
/// The deepest slice of any blocking (sizes the packing's stack buffers).
const KC_MAX: usize = if KC > KC_AVX512 { KC } else { KC_AVX512 };

/// Whether each core has at least [`BIG_L2`] of L2 (CPUID 0x80000006, which
/// Intel and AMD both fill in; asked once).
fn big_l2() -> bool {
    static BIG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *BIG.get_or_init(|| l2_bytes() >= BIG_L2)
}

/// L2 per core in bytes, 0 where the CPU does not say.
pub fn l2_bytes() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU; leaf 0x80000006 is
        // asked only where the highest extended leaf reaches it.
        unsafe {
            if __cpuid(0x8000_0000).eax >= 0x8000_0006 {
                return (__cpuid(0x8000_0006).ecx >> 16) as usize * 1024;
            }
        }
    }
    0
}
/// Largest m the unpacked (dot/axpy) paths take.
const SMALL_M: usize = 8;
/// Largest m the AVX-512 decode dot path ([`crate::gemv`]) takes for long
/// rows (`k ≥ SHORT_K`, B's rows contiguous): it reads each weight tile once
/// from DRAM and re-reads it from L2 per pair of A rows, which beats
/// packing (widening) the whole weight for the blocked GEMM, whose A panels
/// are mostly empty at such m. `gemv_family`, Zen 4 VM, 2 threads, bf16,
/// GB/s of weight (best/median), packed → dot: exact m = 12 4096→12288
/// 6.5/6.0 → 14.0/7.3 and 7.7/7.1 → 11.8/11.2; m = 16 4.8/4.6 → 9.7/7.4,
/// 11008→4096 5.5/5.1 → 9.3/8.5; m = 20 4.6/3.5 → 7.4/6.6; m = 24 4.5/3.9
/// → 6.6/6.2 (`fast` 7.7/6.7 → 8.0/7.4); at m = 32 `fast` was a tie
/// (6.6/5.6 against 5.9/5.6).
const DOT_M_AVX512: usize = 24;

/// Whether `C = A·B` runs the AVX-512 decode dot path although `m >
/// SMALL_M` (see [`DOT_M_AVX512`]).
fn wide_dot(isa: Isa, a: &MatRef, b: &MatRef) -> bool {
    (SMALL_M + 1..=DOT_M_AVX512).contains(&a.rows)
        && a.cols >= SHORT_K
        && b.row_stride == 1
        && !matches!(b.data, Elems::Q4(_))
        && isa.resolve() == Isa::Avx512
}

/// The largest number of rows (sequences of a batched decode step) for which
/// every row of `gemm`'s result is bit-identical to computing that row alone
/// (same ISA), whatever the other rows, the column split or the threads: up
/// to this m, the dot and axpy paths compute each element with one fixed
/// sequence of operations (see `DOT_LANES`). Larger m take the packed path,
/// whose blocking depends on m, except on AVX-512 for rows of at least
/// `SHORT_K` inputs, which stay on the dot path (and so invariant) up to
/// `DOT_M_AVX512` (24); this constant is the bound on every CPU.
pub const DECODE_BATCH_INVARIANT_MAX: usize = SMALL_M;

/// How many rows a batched decode step may give one Linear (`x·Wᵀ` with `W`
/// an `[n, k]` weight stored as `w`, multiplied as the CPU backend does it:
/// the transposed view, under `math`) so that every row stays bit for bit
/// the row computed alone and the step still costs little more than one
/// row: 16 where bf16 weights run on AMX tiles ([`fast_decode_on_tiles`],
/// [`exact_decode_on_tiles`]: 16-row tiles, so 16 rows cost about what 8
/// do; 2-layer bf16 slice on a 2-core Sapphire Rapids, `fast`, one step of
/// 16 rows 155 tok/s against 88.7 for 8), else
/// [`DECODE_BATCH_INVARIANT_MAX`] (every CPU and path). A batch scheduler
/// takes the smallest over a model's weights.
pub fn decode_group_rows(isa: Isa, math: CpuMath, w: DType, k: usize) -> usize {
    // Shapes only: the predicates read dtypes, sizes and strides, never data.
    let b = match w {
        DType::BF16 => MatRef::row_major(Elems::BF16(&[]), 1, k).transposed(),
        _ => return DECODE_BATCH_INVARIANT_MAX,
    };
    let a = MatRef::row_major(Elems::F32(&[]), DECODE_GROUP_TILES, k);
    let tiles = match math {
        CpuMath::Fast => fast_decode_on_tiles(isa, &a, &b),
        CpuMath::Exact => exact_decode_on_tiles(isa, &a, &b),
    };
    if tiles {
        DECODE_GROUP_TILES
    } else {
        DECODE_BATCH_INVARIANT_MAX
    }
}

/// [`decode_group_rows`] on AMX tiles: one tile's rows.
const DECODE_GROUP_TILES: usize = 16;

/// Columns per task in the axpy path (its accumulators live on the stack).
const AXPY_COLS: usize = 256;

/// Int4 weights never reach the float paths: [`gemm_strided`] sends them to [`crate::q4`].
const Q4_ROUTED: &str = "q4 weights are routed to q4::gemm_q4 by gemm_strided";

/// A borrowed matrix view: element `(i, j)` is
/// `data[offset + i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: Elems<'a>,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
    pub offset: usize,
}

impl<'a> MatRef<'a> {
    /// A dense row-major `rows × cols` matrix.
    pub fn row_major(data: Elems<'a>, rows: usize, cols: usize) -> Self {
        MatRef { data, rows, cols, row_stride: cols, col_stride: 1, offset: 0 }
    }

    /// The transpose, as a view (no copy): swaps rows/cols and the strides.
    pub fn transposed(self) -> Self {
        MatRef { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    /// Index into `data` of element `(i, j)`.
    #[inline(always)]
    pub fn index(&self, i: usize, j: usize) -> usize {
        self.offset + i * self.row_stride + j * self.col_stride
    }

    /// Element `(i, j)` widened to f32.
    #[inline]
    pub fn get(&self, i: usize, j: usize) -> f32 {
        self.data.get(self.index(i, j))
    }

    /// Panics unless every element of the view lies inside `data`; the packing
    /// code relies on this (it indexes with checks, but a clear message helps).
    pub(crate) fn check(&self, what: &str) {
        if self.rows > 0 && self.cols > 0 {
            let last = self.index(self.rows - 1, self.cols - 1);
            assert!(
                last < self.data.len(),
                "gemm: {what} view {}x{} (strides {}, {}, offset {}) reaches element {last} of {}",
                self.rows,
                self.cols,
                self.row_stride,
                self.col_stride,
                self.offset,
                self.data.len()
            );
        }
    }
}

/// Reusable packing buffers (grown on demand, never shrunk), so that callers
/// that run many small GEMMs (attention) allocate once per task.
#[derive(Default)]
pub(crate) struct GemmScratch {
    a: Vec<f32>,
    /// A's rows rounded to bf16 (bit patterns) for [`gemv_dot_bf16`] and
    /// [`gemv_dot_tiles`], or split in three for the latter.
    a16: Vec<u16>,
}

fn ensure(v: &mut Vec<f32>, len: usize) {
    if v.len() < len {
        v.resize(len, 0.0);
    }
}

/// `C = A·B` (or `C += A·B` when `accumulate`), C `m×n` row-major with
/// `c.len() == m * n`. Uses the best instruction set the CPU has, in the
/// process-wide [`CpuMath`] mode ([`cpu_math`]).
pub fn gemm(a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool) {
    gemm_with_math(Isa::detect(), cpu_math(), a, b, c, accumulate)
}

/// [`gemm`] on a chosen code path (falls back to [`Isa::Portable`] if the CPU
/// lacks the requested one), always exact ([`CpuMath::Exact`], whatever the
/// process-wide mode). For tests and benchmarks.
pub fn gemm_with_isa(isa: Isa, a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool) {
    gemm_with_math(isa, CpuMath::Exact, a, b, c, accumulate)
}

/// [`gemm`] on a chosen code path and arithmetic. [`CpuMath::Fast`] runs the
/// bf16-product packed path (A rounded to bf16, `vdpbf16ps`, f32 sums; same
/// partitioning and accumulate semantics as the exact packed path) where
/// [`fast_bf16_applies`]; every other case, and [`CpuMath::Exact`], runs the
/// exact paths.
pub fn gemm_with_math(isa: Isa, math: CpuMath, a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool) {
    gemm_then(isa, math, a, b, c, accumulate, None)
}

/// What a Linear layer does to its GEMM's result before anyone reads it
/// (bias, activation, residual): `f(row, col0, values)` gets a stretch of
/// row `row` of C from column `col0`, holding final GEMM values, and may
/// change them in place. Every element of C is passed exactly once.
pub type Epilogue<'e> = &'e (dyn Fn(usize, usize, &mut [f32]) + Sync);

/// [`gemm_with_math`], then `epi` on every element of C. The packed paths
/// (exact and bf16 products: prefill, the ViT) run it on each micro-tile as
/// the tile's last k slice finishes, while the tile is still in L1; the
/// others (decode rows, int4) on each row after the product. Either way an
/// element gets the same operations as a pass over C afterwards would give
/// it, so results are bit for bit those of the unfused sequence; what is
/// saved is reading and writing C again per epilogue step (for the ViT's
/// MLP, 32 MiB of f32 twice per layer).
pub fn gemm_then(
    isa: Isa,
    math: CpuMath,
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    accumulate: bool,
    epi: Option<Epilogue>,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm: A is {m}x{k} but B is {}x{n}", b.rows);
    assert_eq!(c.len(), m * n, "gemm: C has {} elements, expected {m}x{n}", c.len());
    let parallel = worth_parallel(m * n * k);
    #[cfg(target_arch = "x86_64")]
    if math == CpuMath::Fast && fast_bf16_applies(isa, &a, &b) {
        if let Elems::BF16(w) = b.data {
            a.check("A");
            b.check("B");
            // SAFETY: `fast_bf16_applies` checked AVX-512 F/BW/VL + BF16 and
            // m, n, k > 0; the views were checked just above; C is m×n.
            unsafe { gemm_bf16_fast(&a, &b, w, c, n, accumulate, parallel, epi) };
            return;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if math == CpuMath::Exact && exact_amx_applies(isa, &a, &b) {
        if let Elems::BF16(w) = b.data {
            a.check("A");
            b.check("B");
            // SAFETY: `exact_amx_applies` checked AMX (AVX-512 F/BW/VL +
            // BF16 with it) and m, n, k > 0; the views were checked just
            // above; C is m×n.
            unsafe { amx::gemm(&a, &b, w, amx::SPLIT_PARTS, c, n, accumulate, parallel, epi) };
            return;
        }
    }
    let isa = isa.resolve();
    let mut scratch = GemmScratch::default();
    if epi.is_some() && m > SMALL_M && k > 0 && !matches!(b.data, Elems::Q4(_)) && !wide_dot(isa, &a, &b) {
        a.check("A");
        b.check("B");
        gemm_packed(isa, &a, &b, c, n, accumulate, parallel, &mut scratch, epi);
        return;
    }
    if !fast_dot(isa, math, &a, &b, c, accumulate, parallel, &mut scratch) {
        gemm_strided(isa, &a, &b, c, n, accumulate, parallel, &mut scratch);
    }
    if let Some(f) = epi {
        if n > 0 {
            par_chunks(c, n, parallel, |i, row| f(i, 0, row));
        }
    }
}

/// Runs `epi` on rows `i..i + rows`, columns `j..j + cols` of C (`ldc`
/// apart), one call per row.
///
/// SAFETY: that block lies in C and no other thread touches it.
#[inline]
unsafe fn tile_epilogue(epi: Epilogue, c: SyncPtr, ldc: usize, (i, rows): (usize, usize), (j, cols): (usize, usize)) {
    for r in i..i + rows {
        epi(r, j, std::slice::from_raw_parts_mut(c.get().add(r * ldc + j), cols));
    }
}

/// The engine behind [`gemm`]: C element `(i, j)` is `c[i * ldc + j]`.
/// `isa` must already be resolved. `parallel` says whether to use the pool.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    isa: Isa,
    a: &MatRef,
    b: &MatRef,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
    scratch: &mut GemmScratch,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    debug_assert_eq!(b.rows, k);
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n, "gemm: C too small for {m}x{n} with ldc {ldc}");
    a.check("A");
    b.check("B");
    if k == 0 {
        // An empty sum: C = 0 (or unchanged when accumulating).
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    if let Elems::Q4(w) = b.data {
        crate::q4::gemm_q4(isa, a, b, &w, c, ldc, accumulate, parallel);
    } else if (m <= SMALL_M || wide_dot(isa, a, b)) && b.row_stride == 1 {
        gemv_dot(isa, a, b, c, ldc, accumulate, parallel, scratch);
    } else if m <= SMALL_M && b.col_stride == 1 {
        gemv_axpy(isa, a, b, c, ldc, accumulate, parallel, scratch);
    } else {
        gemm_packed(isa, a, b, c, ldc, accumulate, parallel, scratch, None);
    }
}

/// Naive reference: `C (+)= A·B` with f64 accumulation, element by element.
pub fn gemm_ref(a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm_ref: inner dimensions differ");
    assert_eq!(c.len(), m * n, "gemm_ref: C has the wrong size");
    for i in 0..m {
        for j in 0..n {
            let mut s = if accumulate { c[i * n + j] as f64 } else { 0.0 };
            for p in 0..k {
                s += a.get(i, p) as f64 * b.get(p, j) as f64;
            }
            c[i * n + j] = s as f32;
        }
    }
}

/// Floating-point operations of an `m×n×k` GEMM (a multiply-add counts 2).
pub fn gemm_flops(m: usize, n: usize, k: usize) -> u64 {
    2 * m as u64 * n as u64 * k as u64
}

/// Bytes a GEMM must move at least: read A and B once in their dtypes, write C (f32).
pub fn gemm_min_bytes(m: usize, n: usize, k: usize, a_dtype: DType, b_dtype: DType) -> u64 {
    let (m, n, k) = (m as u64, n as u64, k as u64);
    m * k * a_dtype.size() as u64 + k * n * b_dtype.size() as u64 + m * n * 4
}

#[inline(always)]
fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    // `mul_add` is a single instruction only where FMA is enabled; elsewhere it
    // would be a libm call, so the portable path multiplies then adds.
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Write (or add) one C element through the shared pointer.
///
/// SAFETY: `c.0.add(idx)` must be in bounds and no other task may touch it.
#[inline(always)]
unsafe fn store_c(c: SyncPtr, idx: usize, v: f32, accumulate: bool) {
    let p = c.get().add(idx);
    if accumulate {
        *p += v;
    } else {
        *p = v;
    }
}

/// A's rows widened to f32, `m × k` contiguous, from a 64-byte boundary:
/// with `k` a multiple of 16 (every decoder width) each row's vectors are
/// then whole cache lines. Split loads cost the decode GEMV's staged tiles
/// a third of their rate (`crate::gemv::staged`).
fn widen_a_rows<'s>(a: &MatRef, buf: &'s mut Vec<f32>) -> &'s [f32] {
    let (m, k) = (a.rows, a.cols);
    let rows = aligned(buf, m * k);
    for i in 0..m {
        gather(&a.data, a.index(i, 0), a.col_stride, &mut rows[i * k..(i + 1) * k]);
    }
    rows
}

/// Columns per task for the unpacked paths: enough tasks to balance the pool,
/// but each at least ~32k multiply-adds so that scheduling stays negligible.
fn cols_per_task(n: usize, work_per_col: usize, parallel: bool, max: usize) -> usize {
    if !parallel {
        return n.min(max);
    }
    let by_balance = n.div_ceil(8 * rayon::current_num_threads());
    let by_work = (1usize << 15).div_ceil(work_per_col.max(1));
    by_balance.max(by_work).clamp(1, max)
}

// ---------------------------------------------------------------- dot path

#[allow(clippy::too_many_arguments)]
fn gemv_dot(
    isa: Isa,
    a: &MatRef,
    b: &MatRef,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
    scratch: &mut GemmScratch,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let arows = widen_a_rows(a, &mut scratch.a);
    let mut cols = cols_per_task(n, m * k, parallel, usize::MAX);
    if k < SHORT_K {
        // Whole panels per task (only the last one ragged).
        cols = cols.next_multiple_of(SHORT_PANEL).min(n);
    }
    let cp = SyncPtr(c.as_mut_ptr());
    // A weight that does not stay in cache is streamed from DRAM: prefetch
    // the next column group in address order while a group computes.
    let prefetch = n * k * b.data.dtype().size() >= STREAM_BYTES;
    let job = DotJob { isa, a: arows, m, k, off: b.offset, cs: b.col_stride, c: cp, ldc, accumulate, prefetch };
    par_for(n.div_ceil(cols), parallel, |t| {
        let (j0, j1) = (t * cols, ((t + 1) * cols).min(n));
        // SAFETY (for the writes inside): task t owns columns j0..j1 of C, and
        // `gemm_strided` checked that C covers every (i, j) with i < m, j < n.
        match b.data {
            Elems::F32(w) => job.run(w, j0, j1),
            Elems::BF16(w) => job.run(w, j0, j1),
            Elems::F16(w) => job.run(w, j0, j1),
            Elems::Q4(_) => unreachable!("{Q4_ROUTED}"),
        }
    });
}

/// What every dot task shares: A's rows, B's column layout, C.
#[derive(Clone, Copy)]
struct DotJob<'a> {
    isa: Isa,
    a: &'a [f32],
    m: usize,
    k: usize,
    off: usize,
    cs: usize,
    c: SyncPtr,
    ldc: usize,
    accumulate: bool,
    /// Software-prefetch the next column group (see `gemv_dot`).
    prefetch: bool,
}

/// Bytes of B from which the dot path prefetches: several times the L2,
/// so B comes from DRAM (or a shared L3) on every call.
const STREAM_BYTES: usize = 2 << 20;

/// Lanes of every dot product's partial sums: for `k ≥ SHORT_K`, element
/// `(i, j)` is always `hsum(lanes) + tail`, where lane `l` accumulates
/// `a[i, p]·b[p, j]` for `p ≡ l (mod 8)`, `p < k − k mod 8`, in increasing `p`
/// (one FMA each on the AVX2 path, a multiply then an add on the portable
/// one), [`hsum`] adds the lanes pairwise, and the `k mod 8` tail products
/// are added one by one. For `k < SHORT_K` (see there) element `(i, j)` is
/// one chain `s = a[i, p]·b[p, j] + s` over p = 0, 1, ..., k − 1 from s = 0
/// (an FMA each on AVX2, a multiply then an add on the portable path), the
/// columns vectorised 8 at a time. Nothing in either sequence depends on `m`,
/// on the tile or on the column split, which is what makes decode
/// batch-invariant ([`DECODE_BATCH_INVARIANT_MAX`]). The AVX-512 path
/// computes the AVX2 short-k chain; for `k ≥ SHORT_K` it runs
/// [`crate::gemv`], whose sequence is the same with 16 lanes (so its long-k
/// results differ from AVX2's by rounding). The short-k chain is
/// also what the packed micro-kernels and the axpy path compute when
/// `k ≤ KC` (one slice), so for such k a row is the same for every m (test
/// `short_k_rows_equal_for_every_m`); from `KC` on the packed path adds its
/// slices separately, so only m ≤ `SMALL_M` is invariant.
const DOT_LANES: usize = 8;

/// Below this k, a column is short (at most 2 KiB of bf16): columns are
/// computed in groups of [`SHORT_PANEL`] as single FMA chains over k (no
/// horizontal sums: with the columns transposed into vectors, each FMA
/// does 8 columns' step p); from it on, tiles of several columns do 8-lane
/// dot products (one accumulator per element, B prefetched ahead).
const SHORT_K: usize = 1024;

impl DotJob<'_> {
    /// Columns `j0..j1` of C, in register tiles of at most 2 rows × `C`
    /// columns: independent FMA chains come from several columns (and rows)
    /// at once, never from splitting one dot product over more lanes. With
    /// more than 2 rows, the tiles of one column group run one after another
    /// over its columns while they are in L1.
    fn run<T: Src>(&self, w: &[T], j0: usize, j1: usize) {
        if self.k < SHORT_K {
            return self.short_cols(w, j0, j1);
        }
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Avx512 {
            let (a, m, k, off, cs, c, ldc, accumulate) =
                (self.a, self.m, self.k, self.off, self.cs, self.c, self.ldc, self.accumulate);
            let job = crate::gemv::GemvJob { a, m, k, off, cs, c, ldc, accumulate, stream: self.prefetch };
            // SAFETY: `isa` was resolved to Avx512, so the CPU has AVX-512
            // F/BW/VL, AVX2, FMA and F16C; this task owns columns j0..j1 of C
            // (see `gemv_dot`).
            return unsafe { crate::gemv::cols_avx512(&job, w, j0, j1) };
        }
        if self.m == 1 {
            self.tiles::<T, 8>(w, j0, j1)
        } else {
            self.tiles::<T, 6>(w, j0, j1)
        }
    }

    /// Columns `j0..j1` in groups of `C`, the ragged rest one at a time (the
    /// same arithmetic per element); rows in pairs, the odd one alone.
    #[inline(always)]
    fn tiles<T: Src, const C: usize>(&self, w: &[T], j0: usize, j1: usize) {
        let mut j = j0;
        while j < j1 {
            let group = if j + C <= j1 { C } else { 1 };
            // While the first row pair runs, the next group's columns are
            // prefetched (the other pairs find this group in L1).
            let next = (j + group)..(j + group + C).min(j1);
            for i0 in (0..self.m).step_by(2) {
                let pf = if i0 == 0 && self.prefetch { next.clone() } else { 0..0 };
                match (self.m - i0 >= 2, group == C) {
                    (true, true) => self.tile::<T, 2, C>(w, i0, j, pf),
                    (false, true) => self.tile::<T, 1, C>(w, i0, j, pf),
                    (true, false) => self.tile::<T, 2, 1>(w, i0, j, pf),
                    (false, false) => self.tile::<T, 1, 1>(w, i0, j, pf),
                }
            }
            j += group;
        }
    }

    /// Short columns (`k < SHORT_K`): see [`dot_short_cols_avx2`].
    fn short_cols<T: Src>(&self, w: &[T], j0: usize, j1: usize) {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` was resolved, so the CPU has AVX2, FMA and F16C
            // (AVX-512 implies them); see `gemv_dot` for C. AVX-512 runs the
            // same chains: short columns are bound by the transposes, not
            // by the FMA width.
            Isa::Avx2Fma | Isa::Avx512 => {
                with_short_panel(self.k, |panel| unsafe { dot_short_cols_avx2(self, w, j0, j1, panel) })
            }
            _ => with_short_panel(self.k, |panel| dot_short_cols(self, w, j0, j1, panel)),
        }
    }

    /// Rows `i0..i0 + R`, columns `j..j + C`; prefetches columns `pf`.
    #[inline(always)]
    fn tile<T: Src, const R: usize, const C: usize>(&self, w: &[T], i0: usize, j: usize, pf: std::ops::Range<usize>) {
        // Every column read below lies in `w` (one check per column).
        let cols: [&[T]; C] = std::array::from_fn(|c| &w[self.off + (j + c) * self.cs..][..self.k]);
        let a = &self.a[i0 * self.k..(i0 + R) * self.k];
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` was resolved, so the CPU has AVX2, FMA and F16C
            // (AVX-512 long-k tiles run `crate::gemv` instead); the columns
            // hold k elements each, `a` R rows of k; see `gemv_dot` for C.
            // The prefetched span is inside `w`.
            Isa::Avx2Fma | Isa::Avx512 => unsafe {
                let span = if pf.is_empty() {
                    &w[..0]
                } else {
                    let start = self.off + pf.start * self.cs;
                    &w[start..self.off + (pf.end - 1) * self.cs + self.k]
                };
                dot_tile_avx2::<T, R, C>(self, a, &cols, i0, j, span)
            },
            // SAFETY: see `gemv_dot` for C. (No prefetching here.)
            _ => {
                let _ = pf;
                unsafe { dot_tile::<T, R, C>(self, a, &cols, i0, j) }
            }
        }
    }
}

/// AVX2 version of [`dot_tile`]: B widened in registers (no staging buffer),
/// `R × C` vector accumulators, one 8-lane chain per C element. Spread over
/// its k loop, it prefetches `prefetch` (the next columns) in address order:
/// DRAM streams one sequential run much faster than the C interleaved
/// column streams the loop itself reads.
///
/// SAFETY: the CPU must have AVX2, FMA and F16C; `a` holds `R` rows of
/// `job.k`, each of `cols` `job.k` elements; C covers rows `i0..i0+R`,
/// columns `j..j+C` (see `gemv_dot`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_tile_avx2<T: Src, const R: usize, const C: usize>(
    job: &DotJob,
    a_rows: &[f32],
    cols: &[&[T]; C],
    i0: usize,
    j: usize,
    prefetch: &[T],
) {
    dot_tile_8lane::<T, R, C>(job, a_rows, cols, i0, j, prefetch)
}

/// The body of [`dot_tile_avx2`] (inlined into its target-feature callers).
///
/// SAFETY: as [`dot_tile_avx2`]; only call from code compiled with AVX2,
/// FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_tile_8lane<T: Src, const R: usize, const C: usize>(
    job: &DotJob,
    a_rows: &[f32],
    cols: &[&[T]; C],
    i0: usize,
    j: usize,
    prefetch: &[T],
) {
    use std::arch::x86_64::*;
    let k = job.k;
    debug_assert_eq!(a_rows.len(), R * k);
    let a = a_rows.as_ptr();
    let cp: [*const T; C] = std::array::from_fn(|c| cols[c].as_ptr());
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let full = k - k % DOT_LANES;
    let (pf, pf_lines) = (prefetch.as_ptr() as *const i8, std::mem::size_of_val(prefetch).div_ceil(64));
    let mut line = 0;
    let mut p = 0;
    // One step: acc[i][c] += a[i, p..p+8] * b[p..p+8, c].
    macro_rules! step {
        () => {
            let av: [__m256; R] = std::array::from_fn(|i| _mm256_loadu_ps(a.add(i * k + p)));
            for (c, &col) in cp.iter().enumerate() {
                let wv = T::load8(col.add(p));
                for (acc_i, &av_i) in acc.iter_mut().zip(&av) {
                    acc_i[c] = _mm256_fmadd_ps(av_i, wv, acc_i[c]);
                }
            }
            p += DOT_LANES;
        };
    }
    // The prefetches are spread evenly over the k loop (both forms measured
    // fastest for their tile shape on Zen 3).
    if R == 1 {
        // Outside branch-free chunks of PF_CHUNK steps.
        const PF_CHUNK: usize = 8 * DOT_LANES;
        let per_chunk = pf_lines.div_ceil(full.div_ceil(PF_CHUNK).max(1));
        while p < full {
            let stop = (line + per_chunk).min(pf_lines);
            while line < stop {
                // A hint only: the address lies inside `prefetch`.
                _mm_prefetch::<_MM_HINT_T0>(pf.add(line * 64));
                line += 1;
            }
            let chunk_end = (p + PF_CHUNK).min(full);
            while p < chunk_end {
                step!();
            }
        }
    } else {
        // A few per step.
        let per_step = pf_lines.div_ceil((full / DOT_LANES).max(1));
        while p < full {
            for _ in 0..per_step {
                if line < pf_lines {
                    // A hint only: the address lies inside `prefetch`.
                    _mm_prefetch::<_MM_HINT_T0>(pf.add(line * 64));
                }
                line += 1;
            }
            step!();
        }
    }
    for (c, col) in cols.iter().enumerate() {
        let mut tail = [0f32; DOT_LANES];
        let wt = T::as_f32(&col[full..], &mut tail);
        for (i, acc_i) in acc.iter().enumerate() {
            let mut lanes = [0f32; DOT_LANES];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc_i[c]);
            let mut s = hsum(&lanes);
            for (q, &x) in wt.iter().enumerate() {
                s = a_rows[i * k + full + q].mul_add(x, s);
            }
            store_c(job.c, (i0 + i) * job.ldc + j + c, s, job.accumulate);
        }
    }
}

/// Columns of one panel of the short-k dot path: four 8-column blocks.
const SHORT_PANEL: usize = 4 * DOT_LANES;

thread_local! {
    /// Each thread's `k × SHORT_PANEL` panel for the short-k dot path
    /// (grown on demand, never shrunk: attention calls it per head).
    static SHORT_PANEL_BUF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's panel, at least `k * SHORT_PANEL` floats.
fn with_short_panel<R>(k: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SHORT_PANEL_BUF.with(|buf| match buf.try_borrow_mut() {
        Ok(mut b) => {
            ensure(&mut b, k * SHORT_PANEL);
            f(&mut b[..k * SHORT_PANEL])
        }
        // Not reached (no GEMM runs inside another on one thread), but safe.
        Err(_) => f(&mut vec![0f32; k * SHORT_PANEL]),
    })
}

/// Software prefetch of a group of B columns, spread over a loop of
/// `steps` steps: the cache lines of columns `j..j + cols` in address
/// order, a few per [`ColPrefetch::step`]. Prefetches are hints: nothing
/// is dereferenced, so the addresses need not be valid.
struct ColPrefetch {
    /// The column being prefetched, and the next line in it.
    col: *const i8,
    line: usize,
    col_bytes: usize,
    col_lines: usize,
    /// Columns left, counting the current one.
    cols_left: usize,
    per_step: usize,
}

impl ColPrefetch {
    /// Columns `j..j + cols` of `job`'s B from `base` (None: prefetch nothing).
    fn new<T: Src>(job: &DotJob, base: *const T, j: Option<usize>, cols: usize, steps: usize) -> Self {
        let col_bytes = job.cs * std::mem::size_of::<T>();
        let col_lines = (job.k * std::mem::size_of::<T>()).div_ceil(64);
        let cols_left = if j.is_some() { cols } else { 0 };
        let col = base.wrapping_add(j.unwrap_or(0) * job.cs) as *const i8;
        let per_step = (cols_left * col_lines).div_ceil(steps.max(1));
        ColPrefetch { col, line: 0, col_bytes, col_lines, cols_left, per_step }
    }

    /// The next few lines.
    ///
    /// SAFETY: the CPU must have SSE (x86_64 always has).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn step(&mut self) {
        use std::arch::x86_64::*;
        for _ in 0..self.per_step {
            if self.cols_left == 0 {
                return;
            }
            _mm_prefetch::<_MM_HINT_T0>(self.col.wrapping_add(64 * self.line));
            self.line += 1;
            if self.line == self.col_lines {
                self.line = 0;
                self.col = self.col.wrapping_add(self.col_bytes);
                self.cols_left -= 1;
            }
        }
    }
}

/// Columns `j0..j1` of C for short columns (`k < SHORT_K`), in the order of
/// [`DOT_LANES`]: each element one FMA chain over k from zero. With m ≤ 2,
/// groups of [`SHORT_PANEL`] columns are transposed in registers straight
/// into four accumulators per row (four or eight chains in flight);
/// otherwise (and for a ragged last group) a group is packed once into a
/// `k × SHORT_PANEL` f32 panel (in L1 for the usual k) that every pair of
/// rows then reads: per step four panel vectors and one broadcast of A per
/// row.
///
/// SAFETY: the CPU must have AVX2, FMA and F16C; see `gemv_dot` for C. `panel`
/// holds at least `k * SHORT_PANEL` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_short_cols_avx2<T: Src>(job: &DotJob, w: &[T], j0: usize, j1: usize, panel: &mut [f32]) {
    let (m, k) = (job.m, job.k);
    if j0 >= j1 {
        return;
    }
    // Every column read below lies in `w` (checked once).
    assert!(job.off + (j1 - 1) * job.cs + k <= w.len(), "gemm: B columns out of bounds");
    let base = w.as_ptr().add(job.off);
    let mut j = j0;
    if m <= 2 {
        while j + SHORT_PANEL <= j1 {
            // Two groups ahead (measured best on Zen 5 for the lm_head).
            let next = (job.prefetch && j + 3 * SHORT_PANEL <= j1).then_some(j + 2 * SHORT_PANEL);
            if m == 1 {
                dot_short_direct_avx2::<T, 1>(job, base, 0, j, next);
            } else {
                dot_short_direct_avx2::<T, 2>(job, base, 0, j, next);
            }
            j += SHORT_PANEL;
        }
        if j == j1 {
            return;
        }
    }
    assert!(panel.len() >= k * SHORT_PANEL);
    let pp = panel.as_mut_ptr();
    while j < j1 {
        let nb = SHORT_PANEL.min(j1 - j);
        let next = (job.prefetch && j + nb < j1).then_some(j + nb);
        pack_short_avx2::<T>(job, base, j, nb, pp, next);
        let mut i0 = 0;
        while i0 + 2 <= m {
            short_panel_rows_avx2::<2>(job, pp, i0, j, nb);
            i0 += 2;
        }
        if i0 < m {
            short_panel_rows_avx2::<1>(job, pp, i0, j, nb);
        }
        j += nb;
    }
}

/// `B[p..p+8, c]` of eight columns as eight vectors, `first` pointing at
/// `B[p, c0]` and column `c0 + c` at `first + c·cs`: vector `q` holds
/// `B[p + q, c0..c0 + 8]`. bf16 is transposed as pairs of words (8
/// shuffles after 4 two-column loads) and widened by shifts and masks;
/// other types are widened by `load8` then [`transpose8`].
///
/// SAFETY: CPU with AVX2/F16C; `first + c·cs + (0..8)` readable for c < 8.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_cols8<T: Src>(first: *const T, cs: usize) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<half::bf16>() {
        // Lanes: columns c (low 128 bits) and c + 4 (high), 8 words each:
        // dword d of a lane is the pair (p + 2d, p + 2d + 1) of its column.
        let ld = |c: usize| {
            _mm256_loadu2_m128i(first.add((c + 4) * cs) as *const __m128i, first.add(c * cs) as *const __m128i)
        };
        let (r0, r1, r2, r3) = (ld(0), ld(1), ld(2), ld(3));
        // A 4×4 dword transpose per lane: pair d of all 8 columns, in order.
        let u0 = _mm256_unpacklo_epi32(r0, r1);
        let u1 = _mm256_unpackhi_epi32(r0, r1);
        let u2 = _mm256_unpacklo_epi32(r2, r3);
        let u3 = _mm256_unpackhi_epi32(r2, r3);
        let d = [
            _mm256_unpacklo_epi64(u0, u2),
            _mm256_unpackhi_epi64(u0, u2),
            _mm256_unpacklo_epi64(u1, u3),
            _mm256_unpackhi_epi64(u1, u3),
        ];
        // bf16 -> f32 is the word in the high half: shift the low word of a
        // pair up, mask the high one (no shuffles).
        let hi = _mm256_set1_epi32(0xffff_0000_u32 as i32);
        let mut out = [_mm256_setzero_ps(); 8];
        for (h, &dh) in d.iter().enumerate() {
            out[2 * h] = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(dh));
            out[2 * h + 1] = _mm256_castsi256_ps(_mm256_and_si256(dh, hi));
        }
        out
    } else {
        transpose8(std::array::from_fn(|c| T::load8(first.add(c * cs))))
    }
}

/// One element widened to f32.
#[inline(always)]
fn widen1<T: Src>(x: T) -> f32 {
    let mut buf = [0f32; 1];
    T::as_f32(&[x], &mut buf)[0]
}

/// Rows `i0..i0 + R` (R ≤ 2), columns `j..j + SHORT_PANEL`: four 8-column
/// blocks transposed in registers, one accumulator per row and block
/// (`acc = fma(a[p], B[p, cols], acc)` for p = 0, 1, ..., k − 1).
/// Prefetches the group of columns from `next` on (if any) spread over the
/// k loop.
///
/// SAFETY: as [`dot_short_cols_avx2`]; the columns lie in `w` from `base`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_short_direct_avx2<T: Src, const R: usize>(
    job: &DotJob,
    base: *const T,
    i0: usize,
    j: usize,
    next: Option<usize>,
) {
    use std::arch::x86_64::*;
    const BLOCKS: usize = SHORT_PANEL / DOT_LANES;
    let (k, cs) = (job.k, job.cs);
    let a = job.a.as_ptr().add(i0 * k);
    // B[0, j + 8b] for each block b.
    let firsts: [*const T; BLOCKS] = std::array::from_fn(|b| base.add((j + 8 * b) * cs));
    let mut acc = [[_mm256_setzero_ps(); BLOCKS]; R];
    let full = k - k % DOT_LANES;
    let mut pf = ColPrefetch::new(job, base, next, SHORT_PANEL, full / DOT_LANES);
    let mut p = 0;
    while p < full {
        pf.step();
        for (b, &first) in firsts.iter().enumerate() {
            let v = load_cols8::<T>(first.add(p), cs);
            for (q, &vq) in v.iter().enumerate() {
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    acc_i[b] = _mm256_fmadd_ps(_mm256_broadcast_ss(&*a.add(i * k + p + q)), vq, acc_i[b]);
                }
            }
        }
        p += DOT_LANES;
    }
    while p < k {
        for (b, &first) in firsts.iter().enumerate() {
            let v: [f32; 8] = std::array::from_fn(|c| widen1(*first.add(c * cs + p)));
            let v = _mm256_loadu_ps(v.as_ptr());
            for (i, acc_i) in acc.iter_mut().enumerate() {
                acc_i[b] = _mm256_fmadd_ps(_mm256_broadcast_ss(&*a.add(i * k + p)), v, acc_i[b]);
            }
        }
        p += 1;
    }
    for (i, acc_i) in acc.iter().enumerate() {
        let mut lanes = [0f32; SHORT_PANEL];
        for (b, &x) in acc_i.iter().enumerate() {
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * b), x);
        }
        for (c, &v) in lanes.iter().enumerate() {
            store_c(job.c, (i0 + i) * job.ldc + j + c, v, job.accumulate);
        }
    }
}

/// Pack columns `j..j + nb` (`nb ≤ SHORT_PANEL`) into `panel`: row p holds
/// `B[p, j..j + SHORT_PANEL]` widened, zero past `nb`. Prefetches the
/// group of columns from `next` on (if any).
///
/// SAFETY: as [`dot_short_direct_avx2`]; `panel` holds `k * SHORT_PANEL` floats.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn pack_short_avx2<T: Src>(
    job: &DotJob,
    base: *const T,
    j: usize,
    nb: usize,
    panel: *mut f32,
    next: Option<usize>,
) {
    use std::arch::x86_64::*;
    let (k, cs) = (job.k, job.cs);
    let full = k - k % DOT_LANES;
    let mut pf = ColPrefetch::new(job, base, next, SHORT_PANEL, SHORT_PANEL / DOT_LANES * (full / DOT_LANES));
    for c0 in (0..SHORT_PANEL).step_by(DOT_LANES) {
        if c0 + DOT_LANES <= nb {
            let cols: [*const T; 8] = std::array::from_fn(|c| base.add((j + c0 + c) * cs));
            let mut p = 0;
            while p < full {
                pf.step();
                for (q, &v) in load_cols8::<T>(cols[0].add(p), cs).iter().enumerate() {
                    _mm256_storeu_ps(panel.add((p + q) * SHORT_PANEL + c0), v);
                }
                p += DOT_LANES;
            }
            for p in full..k {
                for (c, &col) in cols.iter().enumerate() {
                    *panel.add(p * SHORT_PANEL + c0 + c) = widen1(*col.add(p));
                }
            }
        } else {
            for c in c0..c0 + DOT_LANES {
                for p in 0..k {
                    *panel.add(p * SHORT_PANEL + c) = if c < nb { widen1(*base.add((j + c) * cs + p)) } else { 0.0 };
                }
            }
        }
    }
}

/// Rows `i0..i0 + R` of C, columns `j..j + nb`, from a packed panel: `R × 4`
/// accumulators, each one FMA chain over p = 0, 1, ..., k − 1 from zero.
///
/// SAFETY: as [`pack_short_avx2`], the panel packed; C covers the block.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn short_panel_rows_avx2<const R: usize>(job: &DotJob, panel: *const f32, i0: usize, j: usize, nb: usize) {
    use std::arch::x86_64::*;
    const BLOCKS: usize = SHORT_PANEL / DOT_LANES;
    let k = job.k;
    let a = job.a.as_ptr().add(i0 * k);
    let mut acc = [[_mm256_setzero_ps(); BLOCKS]; R];
    for p in 0..k {
        let bv: [__m256; BLOCKS] = std::array::from_fn(|b| _mm256_loadu_ps(panel.add(p * SHORT_PANEL + 8 * b)));
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*a.add(i * k + p));
            for (x, &v) in acc_i.iter_mut().zip(&bv) {
                *x = _mm256_fmadd_ps(av, v, *x);
            }
        }
    }
    for (i, acc_i) in acc.iter().enumerate() {
        let mut lanes = [0f32; SHORT_PANEL];
        for (b, &x) in acc_i.iter().enumerate() {
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * b), x);
        }
        for (c, &v) in lanes[..nb].iter().enumerate() {
            store_c(job.c, (i0 + i) * job.ldc + j + c, v, job.accumulate);
        }
    }
}

/// The portable [`dot_short_cols_avx2`]: the same panels, each element one
/// chain `acc = a[p]·b[p] + acc` (multiply then add: no FMA) over p from zero.
fn dot_short_cols<T: Src>(job: &DotJob, w: &[T], j0: usize, j1: usize, panel: &mut [f32]) {
    let (m, k) = (job.m, job.k);
    let panel = &mut panel[..k * SHORT_PANEL];
    let mut buf = [0f32; SHORT_K];
    let mut j = j0;
    while j < j1 {
        let nb = SHORT_PANEL.min(j1 - j);
        for c in 0..SHORT_PANEL {
            if c < nb {
                let col = T::as_f32(&w[job.off + (j + c) * job.cs..][..k], &mut buf);
                for (p, &x) in col.iter().enumerate() {
                    panel[p * SHORT_PANEL + c] = x;
                }
            } else {
                for p in 0..k {
                    panel[p * SHORT_PANEL + c] = 0.0;
                }
            }
        }
        for i in 0..m {
            let a = &job.a[i * k..(i + 1) * k];
            let mut acc = [0f32; SHORT_PANEL];
            for (&av, bv) in a.iter().zip(panel.chunks_exact(SHORT_PANEL)) {
                for (x, &b) in acc.iter_mut().zip(bv) {
                    *x = fmadd::<false>(av, b, *x);
                }
            }
            for (c, &v) in acc[..nb].iter().enumerate() {
                // SAFETY: see `gemv_dot`.
                unsafe { store_c(job.c, i * job.ldc + j + c, v, job.accumulate) };
            }
        }
        j += nb;
    }
}

/// The portable tile: C[i0 + i, j + c] (+)= A[i0 + i, :] · B[:, j + c] for
/// i < R, c < C, A's row i0 + i being `a[i*k..]` and B's column j + c
/// `cols[c]`, in the order of [`DOT_LANES`] (multiply then add: no FMA).
///
/// SAFETY: C covers rows `i0..i0+R`, columns `j..j+C` (see `gemv_dot`).
#[inline(always)]
unsafe fn dot_tile<T: Src, const R: usize, const C: usize>(
    job: &DotJob,
    a: &[f32],
    cols: &[&[T]; C],
    i0: usize,
    j: usize,
) {
    let k = job.k;
    let mut acc = [[[0f32; DOT_LANES]; C]; R];
    let full = k - k % DOT_LANES;
    let mut buf = [[0f32; DOT_LANES]; C];
    let mut p = 0;
    while p < full {
        for (c, col) in cols.iter().enumerate() {
            let wv: &[f32; DOT_LANES] = T::as_f32(&col[p..p + DOT_LANES], &mut buf[c]).try_into().unwrap();
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let av: &[f32; DOT_LANES] = a[i * k + p..][..DOT_LANES].try_into().unwrap();
                for l in 0..DOT_LANES {
                    acc_i[c][l] = fmadd::<false>(av[l], wv[l], acc_i[c][l]);
                }
            }
        }
        p += DOT_LANES;
    }
    for (c, col) in cols.iter().enumerate() {
        let mut tail = [0f32; DOT_LANES];
        let wt = T::as_f32(&col[full..], &mut tail);
        for (i, acc_i) in acc.iter().enumerate() {
            let mut s = hsum(&acc_i[c]);
            for (q, &x) in wt.iter().enumerate() {
                s = fmadd::<false>(a[i * k + full + q], x, s);
            }
            store_c(job.c, (i0 + i) * job.ldc + j + c, s, job.accumulate);
        }
    }
}

/// Pairwise horizontal sum (the pairing keeps rounding error O(log L)).
#[inline(always)]
fn hsum<const L: usize>(v: &[f32; L]) -> f32 {
    let mut t = *v;
    let mut w = L;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            t[l] += t[l + w];
        }
    }
    t[0]
}

// -------------------------------------------------------------- axpy path

#[allow(clippy::too_many_arguments)]
fn gemv_axpy(
    isa: Isa,
    a: &MatRef,
    b: &MatRef,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
    scratch: &mut GemmScratch,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let arows = widen_a_rows(a, &mut scratch.a);
    let cols = cols_per_task(n, m * k, parallel, AXPY_COLS);
    let cp = SyncPtr(c.as_mut_ptr());
    let job = AxpyJob { isa, a: arows, m, k, off: b.offset, rs: b.row_stride, c: cp, ldc, accumulate };
    par_for(n.div_ceil(cols), parallel, |t| {
        let (j0, j1) = (t * cols, ((t + 1) * cols).min(n));
        // SAFETY (writes inside): task t owns columns j0..j1 of C.
        match b.data {
            Elems::F32(w) => job.run(w, j0, j1),
            Elems::BF16(w) => job.run(w, j0, j1),
            Elems::F16(w) => job.run(w, j0, j1),
            Elems::Q4(_) => unreachable!("{Q4_ROUTED}"),
        }
    });
}

#[derive(Clone, Copy)]
struct AxpyJob<'a> {
    isa: Isa,
    a: &'a [f32],
    m: usize,
    k: usize,
    off: usize,
    rs: usize,
    c: SyncPtr,
    ldc: usize,
    accumulate: bool,
}

impl AxpyJob<'_> {
    fn run<T: Src>(&self, w: &[T], j0: usize, j1: usize) {
        macro_rules! go {
            ($m:literal) => {
                match self.isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `isa` was resolved, so the CPU has AVX2 and FMA
                    // (AVX-512 implies them and runs the AVX2 code: this path
                    // is bound by reading B's rows, not by the FMA width).
                    Isa::Avx2Fma | Isa::Avx512 => unsafe { axpy_cols_avx2::<T, $m>(self, w, j0, j1) },
                    _ => axpy_cols::<T, $m, false>(self, w, j0, j1),
                }
            };
        }
        match self.m {
            1 => go!(1),
            2 => go!(2),
            3 => go!(3),
            4 => go!(4),
            5 => go!(5),
            6 => go!(6),
            7 => go!(7),
            8 => go!(8),
            m => unreachable!("axpy path with m = {m}"),
        }
    }
}

/// AVX2 version of [`axpy_cols`]: register-blocked, `M` rows × 32 columns
/// of C held in vector registers across the whole k loop (B is read once).
///
/// SAFETY: the CPU must have AVX2, FMA and F16C; rows of B over columns
/// `j0..j1` lie in `w`; see `gemv_axpy` for C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_cols_avx2<T: Src, const M: usize>(job: &AxpyJob, w: &[T], j0: usize, j1: usize) {
    use std::arch::x86_64::*;
    let k = job.k;
    if k == 0 {
        return;
    }
    // Bounds of every B element read below, checked once.
    assert!(job.off + (k - 1) * job.rs + j1 <= w.len());
    let a = job.a.as_ptr();
    let base = w.as_ptr().add(job.off);
    let mut j = j0;
    // Groups of 4 vectors, then of 1, then a scalar tail.
    while j + 8 <= j1 {
        let u = if j + 32 <= j1 { 4 } else { 1 };
        let mut acc = [[_mm256_setzero_ps(); 4]; M];
        for p in 0..k {
            let row = base.add(p * job.rs + j);
            if u == 4 {
                let wv = [T::load8(row), T::load8(row.add(8)), T::load8(row.add(16)), T::load8(row.add(24))];
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*a.add(i * k + p));
                    for (x, &wv) in acc_i.iter_mut().zip(&wv) {
                        *x = _mm256_fmadd_ps(av, wv, *x);
                    }
                }
            } else {
                let wv = T::load8(row);
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    acc_i[0] = _mm256_fmadd_ps(_mm256_broadcast_ss(&*a.add(i * k + p)), wv, acc_i[0]);
                }
            }
        }
        for (i, acc_i) in acc.iter().enumerate() {
            let mut lanes = [0f32; 32];
            for (v, &x) in acc_i.iter().enumerate().take(u) {
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * v), x);
            }
            for (jj, &v) in lanes[..8 * u].iter().enumerate() {
                store_c(job.c, i * job.ldc + j + jj, v, job.accumulate);
            }
        }
        j += 8 * u;
    }
    if j < j1 {
        let job_tail = AxpyJob { isa: Isa::Portable, ..*job };
        axpy_cols::<T, M, true>(&job_tail, w, j, j1);
    }
}

/// C[i, j0..j1] (+)= Σ_p A[i, p] · B[p, j0..j1], B's row p being
/// `w[off + p*rs ..]` (contiguous columns).
#[inline(always)]
fn axpy_cols<T: Src, const M: usize, const FMA: bool>(job: &AxpyJob, w: &[T], j0: usize, j1: usize) {
    let width = j1 - j0;
    let mut acc = [[0f32; AXPY_COLS]; M];
    let mut buf = [0f32; AXPY_COLS];
    for p in 0..job.k {
        let start = job.off + p * job.rs + j0;
        let row = T::as_f32(&w[start..start + width], &mut buf);
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let av = job.a[i * job.k + p];
            for (x, &r) in acc_i[..width].iter_mut().zip(row) {
                *x = fmadd::<FMA>(av, r, *x);
            }
        }
    }
    for (i, acc_i) in acc.iter().enumerate() {
        for (jj, &v) in acc_i[..width].iter().enumerate() {
            // SAFETY: see `gemv_axpy`.
            unsafe { store_c(job.c, i * job.ldc + j0 + jj, v, job.accumulate) };
        }
    }
}

// ------------------------------------------------------------ packed path

/// `kernel(kc, a_panel, b_panel, c, ldc, mr, nr, overwrite)`: C[..mr, ..nr]
/// (+)= A_panel · B_panel over `kc` steps.
type Kernel = unsafe fn(usize, *const f32, *const f32, *mut f32, usize, usize, usize, bool);

/// Register tile and cache blocking of one ISA's packed path.
#[derive(Clone, Copy)]
struct Blocking {
    /// Micro-kernel tile: `mr` rows × `nr` columns.
    mr: usize,
    nr: usize,
    /// Depth of one packed k slice.
    kc: usize,
    kernel: Kernel,
}

fn blocking(isa: Isa) -> Blocking {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Blocking { mr: MR_AVX512, nr: NR_AVX512, kc: KC_AVX512, kernel: kernel_avx512 },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => Blocking { mr: MR, nr: NR, kc: KC, kernel: kernel_avx2 },
        _ => Blocking { mr: MR, nr: NR, kc: KC, kernel: kernel_portable },
    }
}

/// The packed path, B packed panel by panel by the task that uses it: tasks
/// own column ranges (and row ranges too only when there are fewer column
/// panels than tasks wanted); each packs one `kc × nr` B panel into its
/// thread's buffer, runs every row panel of its rows over it (A, packed
/// once per k slice and shared by all tasks, streams from L2/L3 at a few
/// bytes per cycle), then packs the next. So B is read and widened exactly
/// once when the rows are not split, no packed copy of B outlives its
/// panel, and packing and computing need no barrier between them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_packed(
    isa: Isa,
    a: &MatRef,
    b: &MatRef,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
    scratch: &mut GemmScratch,
    epi: Option<Epilogue>,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let Blocking { mr: bmr, nr: bnr, kc, kernel } = blocking(isa);
    // Most rows of A one task takes: all, unless A's block is kept in L2 (see KC_AVX512_L2).
    let (bkc, mc_max) = if isa == Isa::Avx512 && big_l2() && m * kc.min(k) * 4 > A_L2_BYTES {
        (KC_AVX512_L2, MC_AVX512_L2)
    } else {
        (kc, usize::MAX)
    };
    let kc_max = k.min(bkc);
    let mpanels = m.div_ceil(bmr);
    let npanels = n.div_ceil(bnr);
    ensure(&mut scratch.a, mpanels * bmr * kc_max);
    let cp = SyncPtr(c.as_mut_ptr());
    let part = Partition::new(m, bmr, npanels, parallel, mc_max);
    let Partition { nsplit, mblocks, mc, .. } = part;
    for pc in (0..k).step_by(bkc) {
        let kc = bkc.min(k - pc);
        let ap = &mut scratch.a[..mpanels * bmr * kc];
        pack_a(isa, a, bmr, pc, kc, ap, parallel && m * kc >= 1 << 15);
        let ap: &[f32] = ap;
        let overwrite = pc == 0 && !accumulate;
        let last = if pc + kc == k { epi } else { None };
        par_for(mblocks * nsplit, parallel, |t| {
            let (mb, ns) = (t / nsplit, t % nsplit);
            let (i_lo, i_hi) = (mb * mc, (mb * mc + mc).min(m));
            let (jr_lo, jr_hi) = part.panels(ns);
            with_aligned(&B_PANEL_BUF, bnr * kc, |bp| {
                for jr in jr_lo..jr_hi {
                    let j = jr * bnr;
                    let nr = bnr.min(n - j);
                    pack_b(isa, b, bnr, pc, kc, j, nr, bp, false);
                    let bpanel = bp.as_ptr();
                    for i in (i_lo..i_hi).step_by(bmr) {
                        let mr = bmr.min(m - i);
                        let apanel = ap[(i / bmr) * bmr * kc..][..bmr * kc].as_ptr();
                        // SAFETY: the panels hold mr*kc and nr*kc floats of
                        // this blocking; C covers rows i..i+mr, columns
                        // j..j+nr (checked in `gemm_strided`), and this task
                        // is the only one writing that block (tiles
                        // partition C). `kernel` matches the resolved `isa`.
                        unsafe { kernel(kc, apanel, bpanel, cp.get().add(i * ldc + j), ldc, mr, nr, overwrite) };
                        if let Some(f) = last {
                            // SAFETY: the tile just written, this task's alone.
                            unsafe { tile_epilogue(f, cp, ldc, (i, mr), (j, nr)) };
                        }
                    }
                }
            });
        });
    }
}

/// How the packed paths split C into tasks: `nsplit` runs of column
/// panels ([`Partition::panels`]), times `mblocks` blocks of `mc` rows.
/// About 4 tasks per thread, so work stealing evens out cores that run at
/// different speeds; rows are split when there are fewer column panels
/// than that, or into blocks of at most `mc_max` rows (each row block packs
/// its B panels again).
struct Partition {
    nsplit: usize,
    npanels: usize,
    mblocks: usize,
    mc: usize,
}

impl Partition {
    fn new(m: usize, mr: usize, npanels: usize, parallel: bool, mc_max: usize) -> Partition {
        let want_tasks = if parallel { 4 * rayon::current_num_threads() } else { 1 };
        let nsplit = want_tasks.min(npanels).max(1);
        let mpanels = m.div_ceil(mr);
        let by_size = mpanels.div_ceil((mc_max / mr).max(1));
        let mblocks = want_tasks.div_ceil(nsplit).min(mpanels).max(by_size).max(1);
        let mc = mpanels.div_ceil(mblocks) * mr;
        Partition { nsplit, npanels, mblocks: m.div_ceil(mc), mc }
    }

    /// Column panels `lo..hi` of run `ns`: the panels dealt out evenly (runs
    /// differ by at most one). Runs of `ceil(npanels / nsplit)` with the rest
    /// in the last left, e.g. for the ViT's c_proj (52 panels, 8 runs), a
    /// last run of 3 against 7: one thread idled for ~4 panels at the end of
    /// every k slice (kernel_speed, 2 threads, two rounds: 0.79-0.80 of the
    /// FMA peak then, 0.86-0.87 dealt evenly).
    fn panels(&self, ns: usize) -> (usize, usize) {
        (ns * self.npanels / self.nsplit, (ns + 1) * self.npanels / self.nsplit)
    }
}

thread_local! {
    /// Each thread's packed B panel for [`gemm_packed`] (grown on
    /// demand, never shrunk).
    static B_PANEL_BUF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `len` elements of `v` from a 64-byte boundary (`v` grown as needed,
/// never shrunk; the elements keep whatever they held).
pub(crate) fn aligned<T: Copy + Default>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    let slack = 64 / std::mem::size_of::<T>();
    if v.len() < len + slack {
        v.resize(len + slack, T::default());
    }
    let skip = v.as_ptr().align_offset(64).min(slack);
    &mut v[skip..skip + len]
}

/// Runs `f` on `len` elements of this thread's `buf` from a 64-byte
/// boundary, so that every 64-byte row of a panel or tile is one cache line
/// (grown on demand, never shrunk; a fresh vector when the buffer is
/// already in use, which no GEMM nested in another on one thread reaches).
pub(crate) fn with_aligned<T: Copy + Default, R>(
    buf: &'static std::thread::LocalKey<std::cell::RefCell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    buf.with(|b| match b.try_borrow_mut() {
        Ok(mut v) => f(aligned(&mut v, len)),
        Err(_) => f(aligned(&mut Vec::new(), len)),
    })
}

/// Pack `A[:, pc..pc+kc]` into `mr`-row panels: panel r holds, for each p,
/// the `mr` values `A[r*mr + ii, pc + p]` contiguously (zero past row m).
fn pack_a(isa: Isa, a: &MatRef, mr: usize, pc: usize, kc: usize, ap: &mut [f32], parallel: bool) {
    let m = a.rows;
    par_chunks(ap, mr * kc, parallel, |pi, panel| {
        let i0 = pi * mr;
        let rows = mr.min(m - i0);
        #[cfg(target_arch = "x86_64")]
        if let (Elems::F32(s), true, true) = (&a.data, a.col_stride == 1, matches!(isa, Isa::Avx2Fma | Isa::Avx512)) {
            // Row-major f32 (the activations of every Linear): 8×8 transposes.
            let (base, last) = (a.index(i0, pc), a.index(i0 + rows - 1, pc + kc - 1));
            assert!(last < s.len() && mr <= 16, "pack_a: A's rows run past its data");
            // SAFETY: the CPU has AVX2 (`isa` is resolved); rows i0..i0+rows,
            // columns pc..pc+kc lie in `s` (the last element was checked, and
            // rows are `row_stride` apart); `panel` holds mr·kc floats.
            unsafe { pack_a_rows_avx2(s, base, a.row_stride, rows, mr, kc, panel) };
            return;
        }
        let _ = isa;
        if a.row_stride == 1 && a.col_stride != 1 {
            // Columns of A are contiguous (A is a transposed view): read mr at a time.
            for p in 0..kc {
                let dst = &mut panel[p * mr..p * mr + mr];
                gather(&a.data, a.index(i0, pc + p), 1, &mut dst[..rows]);
                dst[rows..].fill(0.0);
            }
        } else {
            let mut tmp = [0f32; KC_MAX];
            for ii in 0..mr {
                if ii < rows {
                    gather(&a.data, a.index(i0 + ii, pc), a.col_stride, &mut tmp[..kc]);
                    for p in 0..kc {
                        panel[p * mr + ii] = tmp[p];
                    }
                } else {
                    for p in 0..kc {
                        panel[p * mr + ii] = 0.0;
                    }
                }
            }
        }
    });
}

/// [`pack_a`]'s panel for a row-major f32 A: rows `base`, `base + rs`, …
/// (`rows` of them, the rest of the `mr` zero), `kc` columns; eight columns
/// at a time, each group of up to 8 rows loaded as 8 vectors and transposed,
/// so each column's values are one store instead of `mr` scalar ones.
///
/// SAFETY: AVX2; `s[base + i·rs + p]` exists for i < rows, p < kc; mr ≤ 16;
/// `panel` holds `mr·kc` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_a_rows_avx2(s: &[f32], base: usize, rs: usize, rows: usize, mr: usize, kc: usize, panel: &mut [f32]) {
    use std::arch::x86_64::*;
    let (src, dst) = (s.as_ptr().add(base), panel.as_mut_ptr());
    let mut p0 = 0;
    while p0 + 8 <= kc {
        for g in (0..mr).step_by(8) {
            let r: [__m256; 8] = std::array::from_fn(|t| {
                if g + t < rows {
                    _mm256_loadu_ps(src.add((g + t) * rs + p0))
                } else {
                    _mm256_setzero_ps()
                }
            });
            let t = transpose8(r);
            let w = (mr - g).min(8);
            for (q, v) in t.iter().enumerate() {
                let d = dst.add((p0 + q) * mr + g);
                if w == 8 {
                    _mm256_storeu_ps(d, *v);
                } else {
                    // A short last group (mr = 12: 4 rows, mr = 6: 6): no
                    // full-width store past this column's values.
                    let mut tmp = [0f32; 8];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), *v);
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), d, w);
                }
            }
        }
        p0 += 8;
    }
    for p in p0..kc {
        for ii in 0..mr {
            *dst.add(p * mr + ii) = if ii < rows { *src.add(ii * rs + p) } else { 0.0 };
        }
    }
}

/// Pack `B[pc..pc+kc, jc..jc+nc]` into `nr`-column panels: panel q holds, for
/// each p, the `nr` values `B[pc + p, jc + q*nr + jj]` contiguously (zero past nc).
#[allow(clippy::too_many_arguments)]
fn pack_b(isa: Isa, b: &MatRef, nr: usize, pc: usize, kc: usize, jc: usize, nc: usize, bp: &mut [f32], parallel: bool) {
    par_chunks(bp, nr * kc, parallel, |q, panel| {
        let j0 = jc + q * nr;
        let cols = nr.min(jc + nc - j0);
        if let Elems::Q4(w) = b.data {
            // Only `q4::gemm_q4`'s prefill packs an int4 B: dequantized
            // straight into the panel there.
            crate::q4::pack_b_q4(isa, &w, b, pc, kc, j0, cols, nr, panel);
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if isa.has_avx2() && b.row_stride == 1 && cols == nr {
            // Transposed weights, full panel: 8×8 register transposes read 8
            // columns of W at once (more memory parallelism than one column
            // at a time) and widen in registers.
            // SAFETY: `isa` was resolved (AVX-512 implies AVX2 here);
            // `b.check` bounds every element read.
            macro_rules! t_full {
                ($w:expr) => {
                    if nr == NR_AVX512 {
                        pack_b_t_avx2::<_, NR_AVX512>($w, b, pc, kc, j0, panel)
                    } else {
                        pack_b_t_avx2::<_, NR>($w, b, pc, kc, j0, panel)
                    }
                };
            }
            unsafe {
                match b.data {
                    Elems::F32(w) => t_full!(w),
                    Elems::BF16(w) => t_full!(w),
                    Elems::F16(w) => t_full!(w),
                    Elems::Q4(_) => unreachable!("{Q4_ROUTED}"),
                }
            }
            return;
        }
        let _ = isa;
        if b.col_stride == 1 && cols == nr && (nr == NR || nr == NR_AVX512) {
            // Rows of B contiguous (`x · P`), full panel: fixed-size copies
            // (inlined vector moves; a `memcpy` call per 16 floats would
            // dominate small GEMMs such as attention's P·V).
            macro_rules! rows_full {
                ($w:expr) => {
                    if nr == NR {
                        pack_rows_full::<_, NR>($w, b, pc, kc, j0, panel)
                    } else {
                        pack_rows_full::<_, NR_AVX512>($w, b, pc, kc, j0, panel)
                    }
                };
            }
            match b.data {
                Elems::F32(w) => rows_full!(w),
                Elems::BF16(w) => rows_full!(w),
                Elems::F16(w) => rows_full!(w),
                Elems::Q4(_) => unreachable!("{Q4_ROUTED}"),
            }
        } else if b.col_stride == 1 {
            // Rows of B contiguous, ragged last panel: one short read per p.
            for p in 0..kc {
                let dst = &mut panel[p * nr..p * nr + nr];
                gather(&b.data, b.index(pc + p, j0), 1, &mut dst[..cols]);
                dst[cols..].fill(0.0);
            }
        } else {
            // Columns contiguous (transposed `[out, in]` weights) or general:
            // read each column along k, then scatter into the panel.
            let mut tmp = [0f32; KC_MAX];
            for jj in 0..nr {
                if jj < cols {
                    gather(&b.data, b.index(pc, j0 + jj), b.row_stride, &mut tmp[..kc]);
                    for p in 0..kc {
                        panel[p * nr + jj] = tmp[p];
                    }
                } else {
                    for p in 0..kc {
                        panel[p * nr + jj] = 0.0;
                    }
                }
            }
        }
    });
}

/// Full `W`-wide panel of a B with contiguous rows: row p of the panel is
/// `B[pc + p, j0..j0 + W]`.
#[inline(always)]
fn pack_rows_full<T: Src, const W: usize>(w: &[T], b: &MatRef, pc: usize, kc: usize, j0: usize, panel: &mut [f32]) {
    for (p, dst) in panel[..kc * W].chunks_exact_mut(W).enumerate() {
        let start = b.index(pc + p, j0);
        let src: &[T; W] = w[start..start + W].try_into().unwrap();
        let mut buf = [0f32; W];
        let vals: &[f32; W] = T::as_f32(src, &mut buf).try_into().unwrap();
        let dst: &mut [f32; W] = dst.try_into().unwrap();
        *dst = *vals;
    }
}

/// Transpose of 8 vectors: output q holds element q of every input.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose8(r: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ]
}

/// Pack one full `W`-column panel (`W` a multiple of 8) of a B whose columns
/// are contiguous (`row_stride == 1`), rows `pc..pc+kc`, columns `j0..j0+W`.
///
/// SAFETY: CPU with AVX2/FMA/F16C; every element of the panel lies in `w`
/// (`MatRef::check`); `panel` holds `NR * kc` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_b_t_avx2<T: Src, const W: usize>(
    w: &[T],
    b: &MatRef,
    pc: usize,
    kc: usize,
    j0: usize,
    panel: &mut [f32],
) {
    use std::arch::x86_64::*;
    debug_assert!(panel.len() >= W * kc);
    let base = w.as_ptr();
    let dst = panel.as_mut_ptr();
    let col = |jj: usize| b.index(pc, j0 + jj);
    let full = kc - kc % 8;
    let mut p = 0;
    while p < full {
        for g in 0..W / 8 {
            // Columns are `col_stride` apart (bf16 transposed as word pairs).
            for (q, v) in load_cols8::<T>(base.add(col(8 * g) + p), b.col_stride).into_iter().enumerate() {
                _mm256_storeu_ps(dst.add((p + q) * W + 8 * g), v);
            }
        }
        p += 8;
    }
    if p < kc {
        let mut tmp = [0f32; 8];
        for jj in 0..W {
            let start = col(jj) + p;
            let vals = T::as_f32(&w[start..start + (kc - p)], &mut tmp);
            for (q, &v) in vals.iter().enumerate() {
                *dst.add((p + q) * W + jj) = v;
            }
        }
    }
}

/// Store (or add) a full MR×NR tile held in `acc`, keeping only `mr×nr`.
///
/// SAFETY: C must cover `mr` rows of `nr` elements, `ldc` apart, from `c`.
#[inline(always)]
unsafe fn store_tile(acc: &[[f32; NR]; MR], c: *mut f32, ldc: usize, mr: usize, nr: usize, overwrite: bool) {
    for (i, row) in acc.iter().enumerate().take(mr) {
        let cr = c.add(i * ldc);
        for (j, &v) in row.iter().enumerate().take(nr) {
            if overwrite {
                *cr.add(j) = v;
            } else {
                *cr.add(j) += v;
            }
        }
    }
}

/// Portable micro-kernel: fixed-size arrays so that LLVM keeps the tile in
/// vector registers on any target.
///
/// SAFETY: `a` holds `MR*kc`, `b` `NR*kc` floats; see [`store_tile`] for `c`.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_portable(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    overwrite: bool,
) {
    let a = std::slice::from_raw_parts(a, MR * kc);
    let b = std::slice::from_raw_parts(b, NR * kc);
    let mut acc = [[0f32; NR]; MR];
    for (av, bv) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        let bv: &[f32; NR] = bv.try_into().unwrap();
        for i in 0..MR {
            let ai = av[i];
            for j in 0..NR {
                acc[i][j] += ai * bv[j];
            }
        }
    }
    store_tile(&acc, c, ldc, mr, nr, overwrite);
}

/// AVX2+FMA micro-kernel: 12 ymm accumulators (6 rows × 2×8 columns), one
/// broadcast and two B loads per step: the classic 6×16 Haswell-style tile.
///
/// SAFETY: as [`kernel_portable`], and the CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_avx2(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    overwrite: bool,
) {
    use std::arch::x86_64::*;
    // C's tile is read (or written) only after the k loop: fetch its lines
    // now (see `kernel_avx512`). Hints only.
    for i in 0..mr {
        _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(i * ldc) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(i * ldc + NR - 1) as *const i8);
    }
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    let (mut a, mut b) = (a, b);
    for _ in 0..kc {
        let b0 = _mm256_loadu_ps(b);
        let b1 = _mm256_loadu_ps(b.add(8));
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let ai = _mm256_broadcast_ss(&*a.add(i));
            acc_i[0] = _mm256_fmadd_ps(ai, b0, acc_i[0]);
            acc_i[1] = _mm256_fmadd_ps(ai, b1, acc_i[1]);
        }
        a = a.add(MR);
        b = b.add(NR);
    }
    if mr == MR && nr == NR {
        for (i, acc_i) in acc.iter().enumerate() {
            let cr = c.add(i * ldc);
            let (mut v0, mut v1) = (acc_i[0], acc_i[1]);
            if !overwrite {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(cr));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(cr.add(8)));
            }
            _mm256_storeu_ps(cr, v0);
            _mm256_storeu_ps(cr.add(8), v1);
        }
    } else {
        let mut tile = [[0f32; NR]; MR];
        for (t, acc_i) in tile.iter_mut().zip(&acc) {
            _mm256_storeu_ps(t.as_mut_ptr(), acc_i[0]);
            _mm256_storeu_ps(t.as_mut_ptr().add(8), acc_i[1]);
        }
        store_tile(&tile, c, ldc, mr, nr, overwrite);
    }
}

/// AVX-512 micro-kernel: 24 zmm accumulators (12 rows × 2×16 columns), per
/// step two B loads and twelve broadcasts of A for 24 FMAs. Ragged tiles
/// store (and read, when adding) through lane masks.
///
/// SAFETY: `a` holds `MR_AVX512*kc`, `b` `NR_AVX512*kc` floats; C covers
/// `mr` rows of `nr` elements, `ldc` apart, from `c`; the CPU must have
/// AVX-512F (and the AVX2 set `Isa::Avx512` implies).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_avx512(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    overwrite: bool,
) {
    use std::arch::x86_64::*;
    prefetch_c_tile(c, ldc, mr);
    let mut acc = [[_mm512_setzero_ps(); 2]; MR_AVX512];
    let (mut a, mut b) = (a, b);
    for _ in 0..kc {
        let b0 = _mm512_loadu_ps(b);
        let b1 = _mm512_loadu_ps(b.add(16));
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let ai = _mm512_set1_ps(*a.add(i));
            acc_i[0] = _mm512_fmadd_ps(ai, b0, acc_i[0]);
            acc_i[1] = _mm512_fmadd_ps(ai, b1, acc_i[1]);
        }
        a = a.add(MR_AVX512);
        b = b.add(NR_AVX512);
    }
    store_c_tile(&acc, c, ldc, mr, nr, overwrite);
}

/// Prefetches the `mr` rows of a 12×32 C tile. C's tile is read (or
/// written) only after the k loop: fetch its lines now, so that they arrive
/// while the loop runs (C is usually far bigger than L2, and each k slice
/// sweeps it once). Hints only: nothing is dereferenced. Inlined into the
/// kernels' `#[target_feature]` bodies.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_c_tile(c: *mut f32, ldc: usize, mr: usize) {
    use std::arch::x86_64::*;
    for i in 0..mr {
        let cr = c.wrapping_add(i * ldc) as *const i8;
        _mm_prefetch::<_MM_HINT_T0>(cr);
        _mm_prefetch::<_MM_HINT_T0>(cr.wrapping_add(64));
    }
}

/// Writes (or, unless `overwrite`, adds) the accumulators of a 12×32 tile
/// to C's `mr` rows of `nr` columns, for both AVX-512 micro-kernels.
///
/// SAFETY: as the kernels: C covers `mr` rows of `nr` elements, `ldc`
/// apart, from `c`; only call from code compiled with AVX-512F (it is
/// inlined into the kernels' `#[target_feature]` bodies).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_c_tile(
    acc: &[[std::arch::x86_64::__m512; 2]; MR_AVX512],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    overwrite: bool,
) {
    use std::arch::x86_64::*;
    // Lanes kept in each half: masked-off lanes are neither read nor
    // written (no fault either), so a ragged edge needs no staging tile.
    let lanes = |w: usize| ((1u32 << w.min(16)) - 1) as __mmask16;
    let (k0, k1) = (lanes(nr), lanes(nr.saturating_sub(16)));
    for (i, acc_i) in acc.iter().enumerate().take(mr) {
        let cr = c.add(i * ldc);
        let (mut v0, mut v1) = (acc_i[0], acc_i[1]);
        if !overwrite {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(k0, cr));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(k1, cr.wrapping_add(16)));
        }
        _mm512_mask_storeu_ps(cr, k0, v0);
        // `wrapping_add`: with nr <= 16 this half may point past C, but its
        // mask is empty, so nothing there is touched.
        _mm512_mask_storeu_ps(cr.wrapping_add(16), k1, v1);
    }
}

// ------------------------------------------------------ caller-packed operands

/// The packed path's pieces for a caller that packs an operand once and
/// multiplies it many times, tile by tile: attention packs each head's keys
/// and values once for all its query blocks, and each query block once for
/// all its key blocks, where [`gemm_packed`] would pack both again on every
/// call. f32 panels on the ISA's blocking, or with `bf16` the pairs of the
/// bf16-product path (each dword two bf16 of consecutive k, kept in f32
/// buffers: both are 4 bytes, and only [`PanelGemm::tile`] reads them);
/// where [`amx::available`], the bf16 A panels are 32 rows in AMX tile order
/// and the tiles multiply them ([`amx::tile`]).
///
/// A panels: `mr` rows × `depth(kc)` ([`PanelGemm::pack_a`] packs every row
/// panel of an A); B panels: `nr` columns × `depth(kc)`, one per call of
/// [`PanelGemm::pack_b`]. Ragged rows and columns are zero-padded by the
/// packers, and `tile` masks them on store, as in [`gemm_packed`].
#[derive(Clone, Copy)]
pub(crate) struct PanelGemm {
    isa: Isa,
    bf16: bool,
    /// bf16 products on AMX tiles ([`amx::tile`]) rather than `vdpbf16ps`.
    amx: bool,
    blk: Blocking,
}

impl PanelGemm {
    /// The f32 blocking of `isa` (resolved here), or with `bf16` the
    /// `vdpbf16ps` path, which needs [`bf16_products_native`] (asserted).
    pub(crate) fn new(isa: Isa, bf16: bool) -> PanelGemm {
        let isa = isa.resolve();
        assert!(!bf16 || (isa == Isa::Avx512 && bf16_products_native()), "PanelGemm: bf16 products need AVX512-BF16");
        #[cfg(target_arch = "x86_64")]
        let amx = bf16 && amx::available();
        #[cfg(not(target_arch = "x86_64"))]
        let amx = false;
        PanelGemm { isa, bf16, amx, blk: blocking(isa) }
    }

    /// Rows of an A panel.
    pub(crate) fn mr(&self) -> usize {
        #[cfg(target_arch = "x86_64")]
        if self.amx {
            return amx::MR_AMX;
        }
        if self.bf16 {
            MR_AVX512
        } else {
            self.blk.mr
        }
    }

    /// Columns of a B panel.
    pub(crate) fn nr(&self) -> usize {
        if self.bf16 {
            NR_AVX512
        } else {
            self.blk.nr
        }
    }

    /// Packed steps of a `kc`-deep slice: `kc`, or its pairs (on AMX padded
    /// to whole tile steps of 16 pairs).
    pub(crate) fn depth(&self, kc: usize) -> usize {
        if self.amx {
            kc.div_ceil(32) * 16
        } else if self.bf16 {
            kc.div_ceil(2)
        } else {
            kc
        }
    }

    /// The deepest slice one panel may hold.
    pub(crate) fn max_kc(&self) -> usize {
        #[cfg(target_arch = "x86_64")]
        if self.bf16 {
            return 2 * KP_BF16;
        }
        self.blk.kc
    }

    /// Floats of the packed A of `rows` rows and a `kc`-deep slice.
    pub(crate) fn a_len(&self, rows: usize, kc: usize) -> usize {
        rows.div_ceil(self.mr()) * self.mr() * self.depth(kc)
    }

    /// Every row panel of `a` (all of its `a.cols ≤ max_kc` columns) into
    /// `out` (at least [`a_len`](Self::a_len) floats), panel `r` at
    /// `r · mr · depth`; bf16 rounds to nearest even as the bf16 GEMMs do.
    pub(crate) fn pack_a(&self, a: &MatRef, out: &mut [f32]) {
        let (mr, kc) = (self.mr(), a.cols);
        assert!(kc > 0 && kc <= self.max_kc(), "PanelGemm: A slice of {kc} columns");
        let len = self.a_len(a.rows, kc);
        a.check("A");
        #[cfg(target_arch = "x86_64")]
        if self.amx {
            let out: &mut [u16] = bytemuck::cast_slice_mut(&mut out[..len]);
            // SAFETY: `new` saw `amx::available` (AVX-512 BF16 included); A
            // was checked; `out` is ⌈rows/32⌉ panels of depth(kc)/16 steps.
            unsafe { amx::pack_a(a, out, self.depth(kc) / 16, 1, false) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if self.bf16 {
            let kp = self.depth(kc);
            let out: &mut [u32] = bytemuck::cast_slice_mut(&mut out[..len]);
            for (r, panel) in out.chunks_exact_mut(mr * kp).enumerate() {
                // SAFETY: `new` checked AVX512-BF16; A was checked; the panel
                // holds mr·kp dwords, kp ≤ KP_BF16 (max_kc).
                unsafe { pack_a_bf16_pairs(a, 0, kp, r, panel) };
            }
            return;
        }
        pack_a(self.isa, a, mr, 0, kc, &mut out[..len], false)
    }

    /// One B panel: rows `k0..k0 + kc` (`kc ≤ max_kc`, k0 even for bf16)
    /// and columns `j..j + nr` of `b` (zero past `b.cols`) into `out` (at
    /// least `nr · depth(kc)` floats). bf16 needs `b` in bf16.
    pub(crate) fn pack_b(&self, b: &MatRef, k0: usize, kc: usize, j: usize, out: &mut [f32]) {
        let nr = self.nr();
        assert!(kc > 0 && kc <= self.max_kc() && k0 + kc <= b.rows && j < b.cols, "PanelGemm: B panel out of range");
        let cols = nr.min(b.cols - j);
        let out = &mut out[..nr * self.depth(kc)];
        b.check("B");
        #[cfg(target_arch = "x86_64")]
        if self.bf16 {
            let Elems::BF16(w) = b.data else { panic!("PanelGemm: bf16 products need a bf16 B") };
            assert!(k0.is_multiple_of(2), "PanelGemm: bf16 B panels start at an even k");
            // Pairs past the slice's kc (an odd kc's last high half) must be
            // zero: the packer reads up to b.rows, so cut the view at k0 + kc.
            let cut = MatRef { rows: k0 + kc, ..*b };
            // SAFETY: `new` checked AVX-512 BW; the view lies in `w` (checked
            // above, and `cut` only shortens it); out holds nr·kp dwords.
            unsafe { pack_b_bf16_pairs(&cut, w, k0 / 2, self.depth(kc), j, cols, bytemuck::cast_slice_mut(out)) };
            return;
        }
        pack_b(self.isa, b, nr, k0, kc, j, cols, out, false)
    }

    /// `C[rows × cols] (+)= A panel · B panel` over a `kc`-deep slice:
    /// overwrite C when `overwrite`, else add.
    ///
    /// SAFETY: `a` holds `mr · depth(kc)` and `b` `nr · depth(kc)` floats
    /// packed by this `PanelGemm`; C covers `rows ≤ mr` rows of
    /// `cols ≤ nr` elements, `ldc` apart, and no other thread touches them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn tile(
        &self,
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        overwrite: bool,
    ) {
        #[cfg(target_arch = "x86_64")]
        if self.amx {
            return amx::tile(self.depth(kc) / 16, a as *const u16, b as *const u32, c, ldc, rows, cols, overwrite);
        }
        #[cfg(target_arch = "x86_64")]
        if self.bf16 {
            return kernel_bf16(self.depth(kc), a as *const u32, b as *const u32, c, ldc, rows, cols, overwrite);
        }
        (self.blk.kernel)(kc, a, b, c, ldc, rows, cols, overwrite)
    }
}

// ------------------------------------------------------ bf16 products

/// Whether [`gemm_bf16_products`] (and [`CpuMath::Fast`] GEMMs with bf16
/// weights) run on AVX512-BF16 (`vdpbf16ps`) here.
pub fn bf16_products_native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        Isa::Avx512.available() && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether [`CpuMath::Fast`] runs its compute-bound work (the packed GEMMs
/// of prefill and the ViT, attention over more than one query) on bf16
/// products: where [`amx::available`], or where `vdpbf16ps` outruns the f32
/// FMAs by at least a fifth (Zen 4 and 5 run it at twice their FMA rate).
/// Sapphire Rapids without its tiles (`QVC_AMX=0`, or Linux before 5.16,
/// which cannot grant them) runs `vdpbf16ps` at half its FMA rate: there the
/// bf16 path made the ViT 1.5× slower than exact (1485–1536 against
/// 1003–1054 ms for two layers at 448, 2 threads), so fast keeps the exact
/// GEMMs and attention and rounds nothing. Decode-sized GEMMs follow
/// [`bf16_dots_pay`] instead (AMX does not run them).
pub fn bf16_products_pay() -> bool {
    #[cfg(target_arch = "x86_64")]
    if bf16_products_native() {
        return amx::available() || bf16_dots_pay();
    }
    false
}

/// Whether `vdpbf16ps` outruns the AVX-512 FMAs by at least a fifth here
/// (Zen 4 and 5: about 2×; Sapphire Rapids: 0.5×). The two rates are
/// measured once per process on the calling thread (best of 5 × about
/// 0.2 ms each). Where it does not, [`CpuMath::Fast`]'s decode-sized GEMMs
/// run the exact dot path ([`fast_bf16_dot_applies`]): on Sapphire Rapids,
/// with the exact path's staged tiles (`crate::gemv`), the bf16 one was no
/// faster at batch 1 and slower at batch 8 (`qvc bench`, 2-layer slice, two
/// interleaved rounds: 15.0/15.2 against 15.3/15.3 tok/s, and 54.8/57.4
/// against 60.5/64.9).
pub fn bf16_dots_pay() -> bool {
    static PAY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PAY.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if bf16_products_native() {
            return bf16_dot_rate_over_fma() >= 1.2;
        }
        false
    })
}

/// `vdpbf16ps`'s flop rate over the AVX-512 FMAs', each the best of 5 short
/// loops on the calling thread (a product and its add count 2 in both).
#[cfg(target_arch = "x86_64")]
fn bf16_dot_rate_over_fma() -> f64 {
    use crate::peak::{bf16_dot_loop, fma_loop};
    let best = |run: &dyn Fn() -> (u64, f32)| {
        (0..5)
            .map(|_| {
                let t = std::time::Instant::now();
                let (flops, v) = run();
                std::hint::black_box(v);
                flops as f64 / t.elapsed().as_secs_f64().max(1e-9)
            })
            .fold(0.0, f64::max)
    };
    let dot = best(&|| bf16_dot_loop(2000));
    let fma = best(&|| fma_loop(Isa::Avx512, 2000));
    dot / fma
}

/// Whether a [`CpuMath::Fast`] GEMM with these operands runs the decode
/// dot path with bf16 products ([`gemv_dot_bf16`]): the operands suit it
/// ([`bf16_dot_kernel_runs`]) and `vdpbf16ps` outruns the FMAs here
/// ([`bf16_dots_pay`]). Otherwise decode-sized Fast GEMMs run exact.
pub fn fast_bf16_dot_applies(isa: Isa, a: &MatRef, b: &MatRef) -> bool {
    bf16_dot_kernel_runs(isa, a, b) && bf16_dots_pay()
}

/// Whether the bf16-product decode kernel ([`gemv_bf16_products`]) can run
/// these operands here: bf16 weight rows (B's rows contiguous: a Linear's
/// `[out, in]` weight), 1 to `DOT_M_AVX512` rows of A, `k ≥ SHORT_K` (the
/// exact dot path's own vectors from there), AVX-512 with AVX512-BF16.
pub fn bf16_dot_kernel_runs(isa: Isa, a: &MatRef, b: &MatRef) -> bool {
    matches!(b.data, Elems::BF16(_))
        && (1..=DOT_M_AVX512).contains(&a.rows)
        && a.cols >= SHORT_K
        && b.cols > 0
        && b.row_stride == 1
        && isa.resolve() == Isa::Avx512
        && bf16_products_native()
}

/// `C = round_bf16(A) · B` (or `C +=`) on the bf16-product decode kernel,
/// whether or not [`CpuMath::Fast`] would pick it here, so that it is
/// tested on every CPU that can run it; false (C untouched) where it cannot
/// ([`bf16_dot_kernel_runs`]).
pub fn gemv_bf16_products(isa: Isa, a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool) -> bool {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm: A is {m}x{k} but B is {}x{n}", b.rows);
    assert_eq!(c.len(), m * n, "gemm: C has {} elements, expected {m}x{n}", c.len());
    #[cfg(target_arch = "x86_64")]
    if bf16_dot_kernel_runs(isa, &a, &b) {
        if let Elems::BF16(w) = b.data {
            a.check("A");
            b.check("B");
            let parallel = worth_parallel(m * n * k);
            // SAFETY: `bf16_dot_kernel_runs` checked AVX-512 F/BW/VL + BF16,
            // 1 ≤ m ≤ DOT_M_AVX512, k ≥ SHORT_K, n > 0 and B's rows
            // contiguous; the views were checked just above; C is m×n.
            unsafe { gemv_dot_bf16(&a, &b, w, c, n, accumulate, parallel, &mut GemmScratch::default()) };
            return true;
        }
    }
    false
}

/// Runs [`gemv_dot_bf16`] (C = m×n) where a Fast GEMM qualifies
/// ([`fast_bf16_dot_applies`]); whether it ran.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn fast_dot(
    isa: Isa,
    math: CpuMath,
    a: &MatRef,
    b: &MatRef,
    c: &mut [f32],
    accumulate: bool,
    parallel: bool,
    scratch: &mut GemmScratch,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if let (CpuMath::Exact, Elems::BF16(w)) = (math, b.data) {
        if exact_decode_on_tiles(isa, a, b) {
            a.check("A");
            b.check("B");
            // SAFETY: the predicate implies AVX-512 F/BW/VL + BF16, usable
            // AMX, 1 ≤ m ≤ 16, k a multiple of 32 (≥ SHORT_K), n > 0, B's
            // rows contiguous; the views were checked just above; C is m×n.
            unsafe { gemv_dot_tiles(a, b, w, true, c, accumulate, parallel, scratch) };
            return true;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if let (CpuMath::Fast, Elems::BF16(w)) = (math, b.data) {
        let tiles = fast_decode_on_tiles(isa, a, b);
        if tiles || fast_bf16_dot_applies(isa, a, b) {
            a.check("A");
            b.check("B");
            // SAFETY: both predicates imply `bf16_dot_kernel_runs` (AVX-512
            // F/BW/VL + BF16, 1 ≤ m ≤ DOT_M_AVX512, k ≥ SHORT_K, n > 0, B's
            // rows contiguous), and `tiles` also usable AMX, m ≤ 16 and k a
            // multiple of 32; the views were checked just above; C is m×n.
            unsafe {
                if tiles {
                    gemv_dot_tiles(a, b, w, false, c, accumulate, parallel, scratch)
                } else {
                    gemv_dot_bf16(a, b, w, c, b.cols, accumulate, parallel, scratch)
                }
            }
            return true;
        }
    }
    false
}

/// Whether a [`CpuMath::Fast`] GEMM with these operands runs decode-sized
/// on AMX tiles ([`amx::gemv`]): a bf16 `[out, in]` weight, 1 to 16 rows of
/// A, `k ≥ SHORT_K` and a multiple of 32, AVX-512 with usable AMX, in a
/// process that decodes batches ([`set_batched_decode`]). Tried before the
/// `vdpbf16ps` dot path ([`fast_bf16_dot_applies`]). As in exact math, a
/// lone row reads its weights more slowly there than on the dot path (2-layer
/// slice, 2 threads, three interleaved rounds: 0.93–0.95 of the paired read
/// floor against 1.03–1.06 for exact on the FMAs), so a process that
/// decodes one sequence keeps the dot path.
pub fn fast_decode_on_tiles(isa: Isa, a: &MatRef, b: &MatRef) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        batched_decode()
            && bf16_dot_kernel_runs(isa, a, b)
            && a.rows <= amx::GEMV_M_MAX
            && a.cols.is_multiple_of(32)
            && amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, a, b);
        false
    }
}

/// Whether an exact GEMM with these operands runs decode-sized on AMX tiles
/// with A split in three ([`amx::gemv`] with [`amx::SPLIT_PARTS`]): the
/// shapes of [`fast_decode_on_tiles`], where [`exact_on_tiles`], in a
/// process that decodes batches ([`set_batched_decode`]). Each row's result
/// is its own (batch-invariant up to 16 rows), every product exact, f32
/// sums; the tiles' work per weight byte hardly grows with the rows, where
/// the FMA dot path's does. 2-layer slice on the 2-core Sapphire Rapids, two
/// interleaved rounds: batch 8 63–69 tok/s (0.75–0.82 of the paired read
/// floor) against 48–50 (0.55–0.58) on the FMAs, and a step of 16 rows
/// 93–111 tok/s; but a lone row 0.91–0.93 of the floor against 0.98–1.00,
/// so a process that only ever decodes one sequence keeps the FMAs.
pub fn exact_decode_on_tiles(isa: Isa, a: &MatRef, b: &MatRef) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        batched_decode()
            && exact_on_tiles()
            && bf16_dot_kernel_runs(isa, a, b)
            && a.rows <= amx::GEMV_M_MAX
            && a.cols.is_multiple_of(32)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, a, b);
        false
    }
}

/// A's rows widened, then rounded to bf16 (nearest even, row by row so
/// each element rounds the same way whatever m is) into `scratch.a16` from
/// a 64-byte boundary: the activations of both bf16 decode paths.
///
/// SAFETY: AVX-512 F + BF16.
#[cfg(target_arch = "x86_64")]
unsafe fn rounded_a_rows<'s>(a: &MatRef, scratch: &'s mut GemmScratch) -> &'s [u16] {
    let (m, k) = (a.rows, a.cols);
    let arows = widen_a_rows(a, &mut scratch.a);
    let a16 = aligned(&mut scratch.a16, m * k);
    for i in 0..m {
        round_bf16_bits(&arows[i * k..(i + 1) * k], &mut a16[i * k..(i + 1) * k]);
    }
    a16
}

/// The decode GEMM on AMX tiles ([`amx::gemv`]), C = m×n (`ldc = n`): A's
/// rows rounded to bf16 ([`rounded_a_rows`]), or with `split` split
/// exactly into three bf16 ([`amx::split_rows`]), each part a column of the
/// tiles.
///
/// SAFETY: [`fast_decode_on_tiles`] holds (with `split`,
/// [`exact_decode_on_tiles`]); A and B checked; C is m×n.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_dot_tiles(
    a: &MatRef,
    b: &MatRef,
    w: &[half::bf16],
    split: bool,
    c: &mut [f32],
    accumulate: bool,
    parallel: bool,
    scratch: &mut GemmScratch,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(c.len() >= m * n, "gemm: C too small for {m}x{n}");
    assert!(b.offset + (n - 1) * b.col_stride + k <= w.len(), "gemm: weight rows out of bounds");
    let (a16, parts) = if split {
        let arows = widen_a_rows(a, &mut scratch.a);
        let a16 = aligned(&mut scratch.a16, amx::SPLIT_PARTS * m * k);
        amx::split_rows(arows, m, k, a16);
        (&*a16, amx::SPLIT_PARTS)
    } else {
        (rounded_a_rows(a, scratch), 1)
    };
    amx::gemv(a16, m, parts, k, w, b.offset, b.col_stride, n, SyncPtr(c.as_mut_ptr()), n, accumulate, parallel);
}

/// The decode dot path ([`gemv_dot`]) with bf16 products: A's rows rounded
/// to bf16 (nearest even), then [`crate::gemv::cols_bf16_products`] over the
/// same column tasks. Decode is bound by the weight stream; the bf16 loop
/// keeps more of it in flight (see there).
///
/// SAFETY: [`fast_bf16_dot_applies`] holds; A and B checked; C holds
/// `(m − 1)·ldc + n` elements.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_dot_bf16(
    a: &MatRef,
    b: &MatRef,
    w: &[half::bf16],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
    scratch: &mut GemmScratch,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n, "gemm: C too small for {m}x{n} with ldc {ldc}");
    let a16 = rounded_a_rows(a, scratch);
    let cols = cols_per_task(n, m * k, parallel, usize::MAX);
    let stream = n * k * 2 >= STREAM_BYTES;
    let job = crate::gemv::GemvJob {
        a: a16,
        m,
        k,
        off: b.offset,
        cs: b.col_stride,
        c: SyncPtr(c.as_mut_ptr()),
        ldc,
        accumulate,
        stream,
    };
    par_for(n.div_ceil(cols), parallel, |t| {
        let (j0, j1) = (t * cols, ((t + 1) * cols).min(n));
        // SAFETY: the CPU has AVX-512 + BF16 (the caller's check); task t
        // owns columns j0..j1 of C, which C covers (asserted above).
        unsafe { crate::gemv::cols_bf16_products(&job, w, j0, j1) };
    });
}

/// `dst[p]` = the bf16 bits of `src[p]` rounded to nearest even, 32 at a
/// time by `vcvtne2ps2bf16` (subnormals may flush to zero, as in
/// [`pack_a_bf16_pairs`]), the rest by `half`.
///
/// SAFETY: CPU with AVX-512F and BF16; `dst.len() == src.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn round_bf16_bits(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    debug_assert_eq!(src.len(), dst.len());
    let full = src.len() - src.len() % 32;
    let mut p = 0;
    while p < full {
        let v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src.as_ptr().add(p + 16)), _mm512_loadu_ps(src.as_ptr().add(p)));
        _mm512_storeu_si512(dst.as_mut_ptr().add(p) as *mut __m512i, std::mem::transmute::<__m512bh, __m512i>(v));
        p += 32;
    }
    for (d, &x) in dst[full..].iter_mut().zip(&src[full..]) {
        *d = half::bf16::from_f32(x).to_bits();
    }
}

/// Whether [`gemm_with_math`] with [`CpuMath::Fast`] multiplies these
/// operands in bf16 on `isa`: B holds bf16 elements (f16 weights stay exact:
/// rounding them to bf16 would lose three mantissa bits of the *weights*),
/// A has more than the dot path's rows (prefill and the ViT; decode-sized
/// GEMMs keep their own paths), and the path is AVX-512 on a CPU where bf16
/// products are faster than f32 FMAs ([`bf16_products_pay`]). Otherwise
/// Fast runs the exact path.
pub fn fast_bf16_applies(isa: Isa, a: &MatRef, b: &MatRef) -> bool {
    matches!(b.data, Elems::BF16(_))
        && a.rows > SMALL_M
        && !wide_dot(isa, a, b)
        && a.cols > 0
        && b.cols > 0
        && isa.resolve() == Isa::Avx512
        && bf16_products_pay()
}

/// Whether an exact ([`CpuMath::Exact`]) GEMM runs on AMX tiles with A
/// split into three bf16 ([`amx::gemm`] with [`amx::SPLIT_PARTS`]): the shapes Fast would run
/// there (a bf16 B, more rows than the dot path takes), where the tiles
/// are usable; `QVC_AMX_EXACT=0` keeps the FMA path.
pub fn exact_amx_applies(isa: Isa, a: &MatRef, b: &MatRef) -> bool {
    exact_on_tiles()
        && matches!(b.data, Elems::BF16(_))
        && a.rows > SMALL_M
        && !wide_dot(isa, a, b)
        && a.cols > 0
        && b.cols > 0
        && isa.resolve() == Isa::Avx512
}

/// Whether this process decodes batches of sequences ([`set_batched_decode`]).
static BATCHED_DECODE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Declares whether this process decodes several sequences per step (`qvc
/// serve`, `qvc bench --batch`): decode GEMMs then run on AMX tiles where
/// they can ([`exact_decode_on_tiles`], [`fast_decode_on_tiles`]), which
/// makes a batch of 8 to 16 much cheaper and a lone row a little dearer. Every decode step of the
/// process takes the same path, so a row's bits never depend on its batch.
/// Set it before loading a model: decode groups ([`decode_group_rows`]) are
/// fixed at load. Off by default (`qvc chat`, `qvc generate`: one sequence).
pub fn set_batched_decode(on: bool) {
    BATCHED_DECODE.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// See [`set_batched_decode`].
pub fn batched_decode() -> bool {
    BATCHED_DECODE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether this process runs exact GEMMs of bf16 weights on AMX tiles at
/// all ([`exact_amx_applies`] then says which): [`amx::available`] and
/// `QVC_AMX_EXACT` not `0`/`off`. Asked once per process. Where it holds,
/// a bf16 weight and its f32 widening give the same values to f32
/// rounding, no longer the same bits (only bf16 weights take the tiles).
pub fn exact_on_tiles() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            let off = std::env::var("QVC_AMX_EXACT").is_ok_and(|v| matches!(v.trim(), "0" | "off" | "false"));
            !off && amx::available()
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `C = round_bf16(A) · B` (or `C +=` when `accumulate`): A's elements
/// rounded to bf16 (to nearest even) before multiplying, the products and
/// their sums in f32. An explicit opt-in whatever the shape: rounding
/// activations costs about 2⁻⁹ relative per element, far outside the 1e-4
/// parity of the default path. Where the CPU has AVX512-BF16 and B is bf16,
/// it runs the same packed `vdpbf16ps` path as a [`CpuMath::Fast`] GEMM
/// (two products per f32 lane); elsewhere the rounded A goes through the
/// exact [`gemm_with_isa`], which gives the same values to f32 rounding.
pub fn gemm_bf16_products(a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm: A is {m}x{k} but B is {}x{n}", b.rows);
    assert_eq!(c.len(), m * n, "gemm: C has {} elements, expected {m}x{n}", c.len());
    a.check("A");
    b.check("B");
    #[cfg(target_arch = "x86_64")]
    if let Elems::BF16(w) = b.data {
        if bf16_products_native() && m > 0 && n > 0 && k > 0 {
            // SAFETY: AVX-512 F/BW/VL + BF16 checked just above; views checked.
            unsafe { gemm_bf16_fast(&a, &b, w, c, n, accumulate, worth_parallel(m * n * k), None) };
            return;
        }
    }
    let mut ar = vec![0f32; m * k];
    for i in 0..m {
        for (p, x) in ar[i * k..(i + 1) * k].iter_mut().enumerate() {
            *x = half::bf16::from_f32(a.get(i, p)).to_f32();
        }
    }
    gemm_with_isa(Isa::detect(), MatRef::row_major(Elems::F32(&ar), m, k), b, c, accumulate);
}

/// k pairs per slice of the bf16 path (2048 elements of k): the same
/// 128 KiB B panel as the f32 AVX-512 path's 1024-deep slice, twice the
/// depth, so C is swept half as often.
#[cfg(target_arch = "x86_64")]
const KP_BF16: usize = 1024;

thread_local! {
    /// The calling thread's packed A (bf16 pairs) for [`gemm_bf16_packed`].
    #[cfg(target_arch = "x86_64")]
    static A_PAIRS_BUF: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Each thread's packed B panel (bf16 pairs) for [`gemm_bf16_packed`].
    #[cfg(target_arch = "x86_64")]
    static B_PAIRS_BUF: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The bf16-product GEMM: AMX tiles ([`amx::gemm`]) where [`amx::available`],
/// else the `vdpbf16ps` packed path ([`gemm_bf16_packed`]). Same contract.
///
/// SAFETY: as [`gemm_bf16_packed`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_bf16_fast(
    a: &MatRef,
    b: &MatRef,
    w: &[half::bf16],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
    epi: Option<Epilogue>,
) {
    if amx::available() {
        amx::gemm(a, b, w, 1, c, ldc, accumulate, parallel, epi)
    } else {
        gemm_bf16_packed(a, b, w, c, ldc, accumulate, parallel, epi)
    }
}

/// The bf16-product packed path, the AVX-512 blocking with k in pairs: for
/// each slice of `KP_BF16` pairs, A is packed once (shared by all tasks) as
/// `MR_AVX512`-row panels of bf16 pairs (`a[i, 2q]` in the low half of a
/// dword, `a[i, 2q + 1]` in the high half, zero past k and past m); tasks
/// own runs of B's column panels (and row blocks only when there are fewer
/// column panels than tasks wanted), exactly as in [`gemm_packed`]; each
/// packs one 32-column B panel of pairs at a time and runs the 12×32
/// `vdpbf16ps` tile over every row panel of its rows. The first slice
/// overwrites C unless `accumulate`; later ones add. C element `(i, j)` is
/// `c[i * ldc + j]`.
///
/// SAFETY: the CPU must have AVX-512 F/BW/VL and BF16; `a` and `b` were
/// checked (`MatRef::check`), `w` is `b`'s data; C covers `m` rows of `n`
/// elements, `ldc` apart; m, n, k > 0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_bf16_packed(
    a: &MatRef,
    b: &MatRef,
    w: &[half::bf16],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
    epi: Option<Epilogue>,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n, "gemm: C too small for {m}x{n} with ldc {ldc}");
    let (mr, nr) = (MR_AVX512, NR_AVX512);
    let kpairs = k.div_ceil(2);
    let mpanels = m.div_ceil(mr);
    let npanels = n.div_ceil(nr);
    let part = Partition::new(m, mr, npanels, parallel, usize::MAX);
    let Partition { nsplit, mblocks, mc, .. } = part;
    let cp = SyncPtr(c.as_mut_ptr());
    with_aligned(&A_PAIRS_BUF, mpanels * mr * kpairs.min(KP_BF16), |ap| {
        for q0 in (0..kpairs).step_by(KP_BF16) {
            let kp = KP_BF16.min(kpairs - q0);
            let ap = &mut ap[..mpanels * mr * kp];
            let pack = |r: usize, panel: &mut [u32]| {
                // SAFETY: AVX512-BF16 (this function's contract); A checked.
                unsafe { pack_a_bf16_pairs(a, q0, kp, r, panel) }
            };
            if parallel && m * kp >= 1 << 14 {
                use rayon::prelude::*;
                ap.par_chunks_mut(mr * kp).enumerate().for_each(|(r, panel)| pack(r, panel));
            } else {
                ap.chunks_mut(mr * kp).enumerate().for_each(|(r, panel)| pack(r, panel));
            }
            let ap: &[u32] = ap;
            let overwrite = q0 == 0 && !accumulate;
            let last = if q0 + kp == kpairs { epi } else { None };
            par_for(mblocks * nsplit, parallel, |t| {
                let (mb, ns) = (t / nsplit, t % nsplit);
                let (i_lo, i_hi) = (mb * mc, (mb * mc + mc).min(m));
                let (jr_lo, jr_hi) = part.panels(ns);
                with_aligned(&B_PAIRS_BUF, nr * kp, |bp| {
                    for jr in jr_lo..jr_hi {
                        let j = jr * nr;
                        let cols = nr.min(n - j);
                        // SAFETY: AVX-512 BW (contract); `b.check` bounds every element read.
                        unsafe { pack_b_bf16_pairs(b, w, q0, kp, j, cols, bp) };
                        for i in (i_lo..i_hi).step_by(mr) {
                            let rows = mr.min(m - i);
                            let apanel = ap[(i / mr) * mr * kp..][..mr * kp].as_ptr();
                            // SAFETY: as in `gemm_packed`: panels of this
                            // blocking; C's block i..i+rows × j..j+cols is
                            // this task's alone; the CPU has AVX512-BF16.
                            unsafe {
                                kernel_bf16(
                                    kp,
                                    apanel,
                                    bp.as_ptr(),
                                    cp.get().add(i * ldc + j),
                                    ldc,
                                    rows,
                                    cols,
                                    overwrite,
                                )
                            };
                            if let Some(f) = last {
                                // SAFETY: the tile just written, this task's alone.
                                unsafe { tile_epilogue(f, cp, ldc, (i, rows), (j, cols)) };
                            }
                        }
                    }
                });
            });
        }
    });
}

/// One `MR_AVX512`-row panel `r` of A's pairs `q0..q0+kp`:
/// `panel[q * MR_AVX512 + ii]` holds `round_bf16(A[i, 2(q0+q)])` (low word)
/// and `round_bf16(A[i, 2(q0+q)+1])` (high), `i = r * MR_AVX512 + ii`, zero
/// past k and past m. Each row is read once (any dtype, any stride) and
/// rounded 32 elements at a time by `vcvtne2ps2bf16` (round to nearest
/// even, as `half::bf16::from_f32`; subnormal inputs may flush to zero).
///
/// SAFETY: CPU with AVX-512F and BF16; A's elements in bounds (`MatRef::check`);
/// `panel` holds `MR_AVX512 * kp` dwords, `kp <= KP_BF16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_a_bf16_pairs(a: &MatRef, q0: usize, kp: usize, r: usize, panel: &mut [u32]) {
    use std::arch::x86_64::*;
    let mr = MR_AVX512;
    let (m, k) = (a.rows, a.cols);
    debug_assert!(kp <= KP_BF16 && panel.len() >= mr * kp);
    let p0 = 2 * q0;
    let len = (2 * kp).min(k - p0);
    // One row of the slice as f32, zero-padded to whole 32-element groups.
    let mut row = [0f32; 2 * KP_BF16];
    let groups = kp.div_ceil(16);
    let dst = panel.as_mut_ptr();
    for ii in 0..mr {
        let i = r * mr + ii;
        if i >= m {
            for q in 0..kp {
                *dst.add(q * mr + ii) = 0;
            }
            continue;
        }
        gather(&a.data, a.index(i, p0), a.col_stride, &mut row[..len]);
        row[len..32 * groups].fill(0.0);
        for g in 0..groups {
            let src = row.as_ptr().add(32 * g);
            let v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src.add(16)), _mm512_loadu_ps(src));
            let mut pairs = [0u32; 16];
            _mm512_storeu_si512(pairs.as_mut_ptr() as *mut _, std::mem::transmute::<__m512bh, __m512i>(v));
            for (qq, &d) in pairs.iter().enumerate().take(kp - 16 * g) {
                *dst.add((16 * g + qq) * mr + ii) = d;
            }
        }
    }
}

/// One B panel of bf16 pairs: `bp[q * 32 + jj]` = `B[2(q0+q), j+jj]` (low
/// word) and `B[2(q0+q)+1, j+jj]` (high), zero past k and past `cols`. A
/// transposed `[out, in]` weight (pairs adjacent in memory) goes through 8×8
/// dword transposes; a row-major B through a word interleave of two rows;
/// ragged panels and other layouts element by element.
///
/// SAFETY: CPU with AVX-512 F/BW; `b`'s elements in `w` (`MatRef::check`);
/// `bp` holds `NR_AVX512 * kp` dwords.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2")]
unsafe fn pack_b_bf16_pairs(b: &MatRef, w: &[half::bf16], q0: usize, kp: usize, j: usize, cols: usize, bp: &mut [u32]) {
    use std::arch::x86_64::*;
    let k = b.rows;
    let nr = NR_AVX512;
    debug_assert!(bp.len() >= nr * kp);
    let base = w.as_ptr();
    let out = bp.as_mut_ptr();
    let mut q = 0;
    if b.row_stride == 1 && cols == nr {
        // Full groups of 8 pairs (16 elements of k) read as 8 dwords per column.
        while q + 8 <= kp && 2 * (q0 + q + 8) <= k {
            for g in 0..nr / 8 {
                let r: [__m256; 8] = std::array::from_fn(|c| {
                    _mm256_loadu_ps(base.add(b.index(2 * (q0 + q), j + 8 * g + c)) as *const f32)
                });
                for (qq, v) in transpose8(r).into_iter().enumerate() {
                    _mm256_storeu_ps(out.add((q + qq) * nr + 8 * g) as *mut f32, v);
                }
            }
            q += 8;
        }
    } else if b.col_stride == 1 && cols == nr {
        // Rows contiguous: interleave the words of rows 2q and 2q + 1.
        let lo = _mm512_set_epi16(
            47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33,
            1, 32, 0,
        );
        let hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
        while q < kp && 2 * (q0 + q) + 1 < k {
            let p = 2 * (q0 + q);
            let r0 = _mm512_loadu_si512(base.add(b.index(p, j)) as *const _);
            let r1 = _mm512_loadu_si512(base.add(b.index(p + 1, j)) as *const _);
            _mm512_storeu_si512(out.add(q * nr) as *mut _, _mm512_permutex2var_epi16(r0, lo, r1));
            _mm512_storeu_si512(out.add(q * nr + 16) as *mut _, _mm512_permutex2var_epi16(r0, hi, r1));
            q += 1;
        }
    }
    for q in q..kp {
        let p = 2 * (q0 + q);
        for jj in 0..nr {
            *out.add(q * nr + jj) = if jj < cols && p < k {
                let lo = w[b.index(p, j + jj)].to_bits() as u32;
                let hi = if p + 1 < k { w[b.index(p + 1, j + jj)].to_bits() as u32 } else { 0 };
                lo | hi << 16
            } else {
                0
            };
        }
    }
}

/// The 12×32 AVX-512 tile with `vdpbf16ps`: per pair step two B loads,
/// twelve dword broadcasts of A, 24 two-product FMAs. Masked ragged edges
/// and the C prefetch as [`kernel_avx512`].
///
/// SAFETY: `a` holds `MR_AVX512*kp`, `b` `NR_AVX512*kp` dwords; C covers
/// `mr` rows of `nr` elements, `ldc` apart; CPU with AVX-512F and BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_bf16(
    kp: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    overwrite: bool,
) {
    use std::arch::x86_64::*;
    prefetch_c_tile(c, ldc, mr);
    let mut acc = [[_mm512_setzero_ps(); 2]; MR_AVX512];
    let (mut a, mut b) = (a, b);
    for _ in 0..kp {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(16) as *const _));
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(i) as i32));
            acc_i[0] = _mm512_dpbf16_ps(acc_i[0], ai, b0);
            acc_i[1] = _mm512_dpbf16_ps(acc_i[1], ai, b1);
        }
        a = a.add(MR_AVX512);
        b = b.add(NR_AVX512);
    }
    store_c_tile(&acc, c, ldc, mr, nr, overwrite);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fast's bf16 products run wherever AMX does, never without
    /// AVX512-BF16, and otherwise as the measured rates say; its decode
    /// dots (which AMX does not run) only as the rates say; the answers are
    /// kept for the process.
    #[test]
    fn bf16_products_pay_where_they_can() {
        let (pay, dots) = (bf16_products_pay(), bf16_dots_pay());
        eprintln!("bf16 products pay: {pay}, bf16 dots pay: {dots} (AMX {})", amx::available());
        assert!(!amx::available() || pay, "AMX runs the tiles, so bf16 products pay");
        assert!(bf16_products_native() || !(pay || dots), "no AVX512-BF16, yet bf16 products said to pay");
        assert_eq!(pay, bf16_products_native() && (amx::available() || dots));
        #[cfg(target_arch = "x86_64")]
        if bf16_products_native() {
            // Far from the 1.2 threshold on every CPU measured (2 on Zen 4/5,
            // 0.5 on Sapphire Rapids), so a second measurement agrees.
            let r = bf16_dot_rate_over_fma();
            eprintln!("vdpbf16ps flop rate / FMA flop rate: {r:.2}");
            assert!((r >= 1.2) == dots || (0.9..1.6).contains(&r), "rate ratio {r}, dots pay {dots}");
        }
        assert_eq!((pay, dots), (bf16_products_pay(), bf16_dots_pay()));
    }

    /// Column runs cover every panel once, in order, and differ by at most
    /// one panel; rows are split when panels are fewer than tasks, and into
    /// whole panels of at most `mc_max` rows.
    #[test]
    fn partition_deals_panels_evenly() {
        let any = usize::MAX;
        for (m, npanels, parallel, mc_max) in [
            (1024, 52, true, any),
            (300, 384, true, any),
            (7, 3, true, any),
            (300, 52, false, any),
            (13, 1, true, any),
            (1024, 156, true, MC_AVX512_L2),
            (1024, 156, false, MC_AVX512_L2),
            (300, 384, true, MC_AVX512_L2),
            (481, 2, false, MC_AVX512_L2),
        ] {
            let p = Partition::new(m, MR_AVX512, npanels, parallel, mc_max);
            // Row blocks are whole panels, at most mc_max rows where that is one panel or more.
            assert!(p.mc.is_multiple_of(MR_AVX512) && p.mc <= mc_max.max(MR_AVX512), "mc {} over {mc_max}", p.mc);
            let runs: Vec<(usize, usize)> = (0..p.nsplit).map(|ns| p.panels(ns)).collect();
            assert_eq!(runs.first().map(|r| r.0), Some(0));
            assert_eq!(runs.last().map(|r| r.1), Some(npanels));
            assert!(runs.windows(2).all(|w| w[0].1 == w[1].0), "{runs:?}");
            let sizes: Vec<usize> = runs.iter().map(|r| r.1 - r.0).collect();
            let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(hi - lo <= 1 && *lo >= 1, "{npanels} panels: runs {sizes:?}");
            assert!(p.mblocks * p.mc >= m && (p.mblocks - 1) * p.mc < m);
            if !parallel {
                assert_eq!((p.nsplit, p.mblocks), (1, m.div_ceil(mc_max.min(m))), "{m} rows, mc_max {mc_max}");
            }
        }
    }
    use crate::testutil::{rel_l2, Rng, StoredMat, FLOAT_DTYPES};
    use half::bf16;
    use proptest::prelude::*;

    const ISAS: [Isa; 3] = Isa::ALL;

    #[allow(clippy::too_many_arguments)]
    fn check_case(
        isa: Isa,
        (m, n, k): (usize, usize, usize),
        (la, lb): (u8, u8),
        (da, db): (DType, DType),
        pad: usize,
        off: usize,
        accumulate: bool,
        seed: u64,
    ) -> Result<(), TestCaseError> {
        let mut rng = Rng::new(seed);
        let a = StoredMat::new(&mut rng, m, k, la, pad, off, da);
        let b = StoredMat::new(&mut rng, k, n, lb, pad, off + 1, db);
        let c0 = rng.vec(m * n, 1.0);
        let (mut fast, mut want) = (c0.clone(), c0);
        gemm_with_isa(isa, a.view(), b.view(), &mut fast, accumulate);
        gemm_ref(a.view(), b.view(), &mut want, accumulate);
        let e = rel_l2(&fast, &want);
        // Inputs are exact in every dtype after widening, so only f32
        // accumulation order differs: ~sqrt(k)·2⁻²⁴.
        prop_assert!(e < 1e-5, "{isa:?} {m}x{n}x{k} layouts {la},{lb} dtypes {da},{db} acc {accumulate}: rel err {e}");
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// All three paths' territory, ragged sizes, every layout and dtype.
        #[test]
        fn gemm_matches_ref(
            m in 0usize..=70, n in 0usize..=70, k in 0usize..=70,
            la in 0u8..3, lb in 0u8..3, da in 0usize..3, db in 0usize..3,
            pad in 0usize..3, off in 0usize..4, acc: bool, seed: u64, isa in 0usize..3,
        ) {
            check_case(ISAS[isa], (m, n, k), (la, lb), (FLOAT_DTYPES[da], FLOAT_DTYPES[db]), pad, off, acc, seed)?;
        }

        /// Small m (the unpacked dot/axpy paths) with n and k past their chunk sizes.
        #[test]
        fn gemm_small_m_matches_ref(
            m in 0usize..=9, n in 0usize..=600, k in 0usize..=1100,
            la in 0u8..3, lb in 0u8..3, db in 0usize..3,
            acc: bool, seed: u64, isa in 0usize..3,
        ) {
            check_case(ISAS[isa], (m, n, k), (la, lb), (DType::F32, FLOAT_DTYPES[db]), 1, 2, acc, seed)?;
        }
    }

    /// Each row of an `m`-row product (`m ≤ DECODE_BATCH_INVARIANT_MAX`: the
    /// rows of a batched decode step) equals, bit for bit, that row computed
    /// alone: the batch is split over threads (column tiles), the single row
    /// is not. `lb` 0 is a transposed `[out, in]` weight (the dot path), 1 a
    /// row-major one (the axpy path).
    #[allow(clippy::too_many_arguments)]
    fn check_batch_invariant(
        isa: Isa,
        (m, n, k): (usize, usize, usize),
        lb: u8,
        db: DType,
        pad: usize,
        accumulate: bool,
        seed: u64,
    ) -> Result<(), TestCaseError> {
        let isa = isa.resolve();
        let mut rng = Rng::new(seed);
        let a = rng.vec(m * k, 1.0);
        let b = StoredMat::new(&mut rng, k, n, if lb == 0 { 1 } else { 0 }, pad, 1, db);
        let c0 = rng.vec(m * n, 1.0);
        let mut batch = c0.clone();
        let am = MatRef::row_major(Elems::F32(&a), m, k);
        gemm_strided(isa, &am, &b.view(), &mut batch, n, accumulate, true, &mut GemmScratch::default());
        for i in 0..m {
            let row = MatRef { offset: i * k, ..MatRef::row_major(Elems::F32(&a), 1, k) };
            let mut alone = c0[i * n..(i + 1) * n].to_vec();
            gemm_strided(isa, &row, &b.view(), &mut alone, n, accumulate, false, &mut GemmScratch::default());
            let got: Vec<u32> = batch[i * n..(i + 1) * n].iter().map(|x| x.to_bits()).collect();
            let want: Vec<u32> = alone.iter().map(|x| x.to_bits()).collect();
            prop_assert!(
                got == want,
                "{isa:?} row {i} of {m}x{n}x{k} (B layout {lb}, {db}, acc {accumulate}) differs from the row alone"
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn small_m_rows_are_batch_invariant(
            m in 1usize..=DECODE_BATCH_INVARIANT_MAX, n in 1usize..=200, k in 1usize..=1300,
            lb in 0u8..2, db in 0usize..3, pad in 0usize..3, acc: bool, seed: u64, isa in 0usize..3,
        ) {
            check_batch_invariant(ISAS[isa], (m, n, k), lb, FLOAT_DTYPES[db], pad, acc, seed)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// For `k ≤ KC` the short-k dot path (and the axpy path), the packed
        /// path's micro-kernels in their single k slice all compute one chain
        /// `s = a·b + s` over p from zero (see `DOT_LANES`), so a row of a
        /// product with more than `SMALL_M` rows (packed path) equals that
        /// row alone (dot or axpy path) bit for bit. Longer k are not:
        /// the packed path adds its `KC` slices separately.
        #[test]
        fn short_k_rows_equal_for_every_m(
            m in (SMALL_M + 1)..=20, n in 1usize..=120, k in 1usize..=KC,
            lb in 0u8..2, db in 0usize..3, pad in 0usize..3, acc: bool, seed: u64, isa in 0usize..3,
        ) {
            check_batch_invariant(ISAS[isa], (m, n, k), lb, FLOAT_DTYPES[db], pad, acc, seed)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// m from `SMALL_M + 1` to `DOT_M_AVX512` against `[out, in]` weights
        /// with long rows: on AVX-512 the decode dot path ([`wide_dot`]),
        /// elsewhere the packed path. Either way the reference agrees, and
        /// on AVX-512 each row is also bit for bit that row alone.
        #[test]
        fn wide_dot_rows(
            m in (SMALL_M + 1)..=DOT_M_AVX512, n in 1usize..=90, k in SHORT_K..=SHORT_K + 300,
            db in 0usize..3, pad in 0usize..3, acc: bool, seed: u64, isa in 0usize..3,
        ) {
            check_case(ISAS[isa], (m, n, k), (0, 1), (DType::F32, FLOAT_DTYPES[db]), pad, 1, acc, seed)?;
            if ISAS[isa].resolve() == Isa::Avx512 {
                check_batch_invariant(ISAS[isa], (m, n, k), 0, FLOAT_DTYPES[db], pad, acc, seed)?;
            }
        }
    }

    /// Decode-sized shapes (k a multiple of 8 and not, n past the parallel
    /// split), every m up to the invariant maximum, on each path.
    #[test]
    fn decode_shapes_are_batch_invariant() {
        for isa in ISAS {
            for m in 1..=DECODE_BATCH_INVARIANT_MAX {
                // (8200, 128) streams B (the prefetching m = 1 short-k groups).
                for &(n, k) in &[(1000, 256), (777, 515), (300, 1030), (1100, 1029), (8200, 128), (101, 7)] {
                    for db in [DType::F32, DType::BF16] {
                        check_batch_invariant(isa, (m, n, k), 0, db, 0, false, (m * n) as u64).unwrap();
                    }
                }
            }
        }
    }

    /// Bigger ragged shapes: several KC slices, several row blocks, parallel tiles.
    #[test]
    fn gemm_bigger_shapes() {
        // (26, 77, 2100): several AVX-512 slices (KC_AVX512 = 1024), ragged last one.
        // (1000, 70, 1100) and (490, 45, 1030): on a CPU with 2 MiB of L2, A's
        // blocks for L2 (512-deep slices, row blocks of at most 480 rows).
        let shapes = [
            (130, 257, 300),
            (150, 33, 513),
            (7, 3100, 20),
            (4, 1000, 700),
            (26, 77, 2100),
            (1000, 70, 1100),
            (490, 45, 1030),
        ];
        for (si, &(m, n, k)) in shapes.iter().enumerate() {
            for isa in ISAS {
                for (li, &(la, lb)) in [(0, 1), (0, 0), (1, 2)].iter().enumerate() {
                    let db = FLOAT_DTYPES[(si + li) % 3];
                    check_case(isa, (m, n, k), (la, lb), (DType::F32, db), 0, 0, li == 1, si as u64).unwrap();
                }
            }
        }
    }

    /// bf16 B gives bit-for-bit the result of its f32 widening, on every path.
    #[test]
    fn bf16_equals_widened_f32() {
        let mut rng = Rng::new(7);
        for &(m, n, k) in &[(1, 300, 700), (3, 300, 200), (7, 90, 300), (50, 70, 300)] {
            for transposed in [true, false] {
                let w: Vec<bf16> = rng.vec(n * k, 1.0).into_iter().map(bf16::from_f32).collect();
                let wf: Vec<f32> = w.iter().map(|x| x.to_f32()).collect();
                let a = rng.vec(m * k, 1.0);
                let view = |e| {
                    if transposed {
                        MatRef::row_major(e, n, k).transposed()
                    } else {
                        MatRef::row_major(e, k, n)
                    }
                };
                for isa in ISAS {
                    let mut c1 = vec![0.0; m * n];
                    let mut c2 = vec![0.0; m * n];
                    let am = MatRef::row_major(Elems::F32(&a), m, k);
                    gemm_with_isa(isa, am, view(Elems::BF16(&w)), &mut c1, false);
                    gemm_with_isa(isa, am, view(Elems::F32(&wf)), &mut c2, false);
                    if exact_amx_applies(isa, &am, &view(Elems::BF16(&w))) {
                        // AMX multiplies bf16 weights only (A split in three, sums in
                        // another order): the same values to f32 rounding, not bits.
                        let mut r = vec![0.0; m * n];
                        gemm_ref(am, view(Elems::F32(&wf)), &mut r, false);
                        for (i, (&x, &y)) in c1.iter().zip(&r).enumerate() {
                            let scale: f32 = (0..k)
                                .map(|p| (a[i / n * k + p] * wf[view(Elems::F32(&wf)).index(p, i % n)]).abs())
                                .sum();
                            assert!(
                                (x - y).abs() <= 4.0 * f32::EPSILON * scale,
                                "{isa:?} {m}x{n}x{k} at {i}: {x} vs {y}"
                            );
                        }
                        continue;
                    }
                    assert_eq!(c1, c2, "{isa:?} {m}x{n}x{k} transposed={transposed}");
                }
            }
        }
    }

    #[test]
    fn empty_and_degenerate() {
        let one = [2.0f32];
        let a = MatRef::row_major(Elems::F32(&one), 1, 1);
        let mut c = [3.0f32];
        gemm(a, a, &mut c, false);
        assert_eq!(c, [4.0]);
        gemm(a, a, &mut c, true);
        assert_eq!(c, [8.0]);
        // k = 0: C = 0, or unchanged when accumulating.
        let e: [f32; 0] = [];
        let a0 = MatRef::row_major(Elems::F32(&e), 2, 0);
        let b0 = MatRef::row_major(Elems::F32(&e), 0, 3);
        let mut c = [1.0f32; 6];
        gemm(a0, b0, &mut c, true);
        assert_eq!(c, [1.0; 6]);
        gemm(a0, b0, &mut c, false);
        assert_eq!(c, [0.0; 6]);
        // m = 0 or n = 0: nothing to write.
        let mut none: [f32; 0] = [];
        let bk = MatRef::row_major(Elems::F32(&one), 1, 1);
        gemm(MatRef::row_major(Elems::F32(&e), 0, 1), bk, &mut none, false);
        gemm(bk, MatRef::row_major(Elems::F32(&e), 1, 0), &mut none, false);
    }

    #[test]
    #[should_panic(expected = "reaches element")]
    fn out_of_bounds_view_panics() {
        let d = [0.0f32; 5];
        let a = MatRef::row_major(Elems::F32(&d), 2, 3);
        let mut c = [0.0f32; 4];
        gemm(a, MatRef::row_major(Elems::F32(&d), 3, 2), &mut c, false);
    }

    #[test]
    fn cost_model() {
        assert_eq!(gemm_flops(2, 3, 4), 48);
        assert_eq!(gemm_min_bytes(2, 3, 4, DType::F32, DType::BF16), 2 * 4 * 4 + 4 * 3 * 2 + 2 * 3 * 4);
    }

    #[test]
    fn transposed_swaps() {
        let d = [0.0f32; 12];
        let t = MatRef { offset: 1, ..MatRef::row_major(Elems::F32(&d), 3, 4) }.transposed();
        assert_eq!((t.rows, t.cols, t.row_stride, t.col_stride, t.offset), (4, 3, 1, 4, 1));
    }
}
