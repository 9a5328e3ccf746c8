//! Int4 (GPTQ) GEMV with int8 activations: the `--cpu-math fast` decode
//! kernel for [`Q4Ref`] weights (m ≤ [`crate::q4::GEMV_MAX_M`] rows).
//!
//! Read [`crate::q4`] first: same layout, same act-order handling (the
//! activations are gathered through `perm` into stored-row order), same
//! column chunking. What changes is the arithmetic. The exact GEMV
//! dequantizes every nibble to f32 (three vector ops per 16 weights) and is
//! compute-bound below the memory bandwidth; this one multiplies the nibbles
//! as integers, as llama.cpp does:
//!
//! * **Activations** are quantized per *block* of stored rows: each group
//!   of the weight, split into pieces of at most [`I8_BLOCK_MAX`] rows
//!   (group −1, one group over all inputs, gets 128-row blocks). Per row of
//!   x and block: `sx = max|x| / 127`, `xq = round_ties_even(x · (127 /
//!   max|x|))` clamped to ±127 (all zero when the block is). A NaN in a block
//!   makes `sx` NaN, so it reaches the output as in exact mode.
//! * **Products**: one 512-bit load is 16 output columns × 8 stored rows;
//!   `v & 0x0F0F0F0F` holds, as bytes, the nibbles of rows 8p, 8p+2, 8p+4,
//!   8p+6, `(v >> 4) & 0x0F0F0F0F` rows 8p+1, 8p+3, …; `vpdpbusd` multiplies
//!   those u8 weights with the four matching s8 activations (broadcast to
//!   every lane) and adds the four products to an i32 lane: two shift/AND
//!   and two `vpdpbusd` per 128 weights. The AVX2 path does the same with
//!   `vpmaddubsw` + `vpmaddwd` (u4 × s8 pairs sum to at most 2·15·127 =
//!   3810, so the i16 saturation never triggers).
//! * **Per block**, exactly in integers then f32: `acc = Σ q·xq` (i32), and
//!   `y = fma(f32(acc) − z·Σxq, s_w · sx, y)`. Every integer here is below
//!   2²⁴ in magnitude (≤ 128·15·127 and 16·128·127), so the conversion and
//!   the subtraction are exact; the only roundings are `s_w · sx` and the
//!   FMA. Row words straddling a group boundary (group sizes that are not a
//!   multiple of 8) are read once per block with the other rows' activations
//!   zeroed.
//!
//! Every path ([`Q4I8Path`]: AVX512-VNNI, AVX-VNNI, AVX2, portable) computes
//! the same integers and then the same f32 operations in the same order, so
//! all give bit-identical results; and each output element is one fixed
//! sequence whatever m, the column chunk or the threads (rows are quantized
//! on their own), so batched decode is bit for bit single decode.
//!
//! Error against exact f32 math: rounding x to the block's grid moves each
//! activation by at most `sx / 2 = max|x_block| / 254`, so an output moves
//! by at most `Σ_blocks max|x_b| / 254 · Σ_{c∈b} |W_oc|` (plus f32
//! rounding). Only [`crate::q4`]'s dispatcher calls this, and only under
//! [`crate::CpuMath::Fast`].

use crate::common::SyncPtr;
use crate::gemm::MatRef;
use crate::q4::{
    col_block, dispatch_rows, gemv_cols, prefetch_group_params, prefetch_l2, prefetch_target, with_xg, ColBlock,
    Q4Path, GEMV_COLS, GEMV_COLS_BATCH,
};
use half::f16;
use half::slice::HalfFloatSliceExt;
use qvc_ir::{Elems, Q4Ref};
use rayon::prelude::*;

/// Most stored rows one activation block spans (and so one i32
/// accumulation): groups larger than this are split. 128 keeps the per-block
/// f32 work (about 6 vector ops per 16 columns) small next to the block's
/// 16 word rows, and matches the group size of the published checkpoints.
pub const I8_BLOCK_MAX: usize = 128;

/// Which code path the int8-activation GEMV runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Q4I8Path {
    /// Plain Rust, 8 lanes of scalar integer products.
    Portable,
    /// AVX2 `vpmaddubsw` + `vpmaddwd`, 8 columns a vector.
    Avx2,
    /// AVX-VNNI `vpdpbusd` on 256-bit vectors, 8 columns.
    AvxVnni,
    /// AVX512-VNNI `vpdpbusd` on 512-bit vectors, 16 columns.
    Avx512Vnni,
}

impl Q4I8Path {
    /// Every path, most capable last.
    pub const ALL: [Q4I8Path; 4] = [Q4I8Path::Portable, Q4I8Path::Avx2, Q4I8Path::AvxVnni, Q4I8Path::Avx512Vnni];

    /// Whether this CPU can run the path.
    pub fn available(self) -> bool {
        match self {
            Q4I8Path::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Q4I8Path::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Q4I8Path::AvxVnni => Q4I8Path::Avx2.available() && is_x86_feature_detected!("avxvnni"),
            #[cfg(target_arch = "x86_64")]
            Q4I8Path::Avx512Vnni => {
                Q4I8Path::Avx2.available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The best path this CPU has.
    pub fn detect() -> Q4I8Path {
        Self::ALL.into_iter().rev().find(|p| p.available()).unwrap_or(Q4I8Path::Portable)
    }

    /// The int8 path matching an exact-math [`Q4Path`]: portable stays
    /// portable, AVX2 takes AVX-VNNI where the CPU has it, AVX-512 the best.
    pub fn for_q4(path: Q4Path) -> Q4I8Path {
        match path {
            Q4Path::Portable => Q4I8Path::Portable,
            Q4Path::Avx2 => Q4I8Path::AvxVnni.resolve(),
            Q4Path::Avx512 => Q4I8Path::detect(),
        }
    }

    /// `self` if the CPU has it, else the best path below it: every entry
    /// point goes through this, which makes the target-feature calls sound.
    fn resolve(self) -> Q4I8Path {
        match self {
            _ if self.available() => self,
            Q4I8Path::Avx512Vnni => Q4I8Path::AvxVnni.resolve(),
            Q4I8Path::AvxVnni => Q4I8Path::Avx2.resolve(),
            _ => Q4I8Path::Portable,
        }
    }
}

/// `y (+)= x·Wᵀ` with int8 activations (`x` row-major `m × w.cols`, `y`
/// row-major `m × w.rows`), on any m (rows 8 at a time). Public for tests
/// and benchmarks; the dispatcher sends decode-sized m here in fast mode.
pub fn q4_gemv_i8(path: Q4I8Path, x: &[f32], m: usize, w: &Q4Ref, y: &mut [f32], accumulate: bool) {
    assert_eq!(x.len(), m * w.cols, "q4_gemv_i8: x has {} elements, expected {m}x{}", x.len(), w.cols);
    assert_eq!(y.len(), m * w.rows, "q4_gemv_i8: y has {} elements, expected {m}x{}", y.len(), w.rows);
    let a = MatRef::row_major(Elems::F32(x), m, w.cols);
    let parallel = rayon::current_num_threads() > 1 && m * w.rows * w.cols >= 1 << 16;
    gemv_i8(path, &a, w, y, w.rows, accumulate, parallel);
}

/// The engine: `C (+)= A·Wᵀ` with C's rows `ldc` apart. A may be any view
/// (it is gathered through `perm` first).
pub(crate) fn gemv_i8(
    path: Q4I8Path,
    a: &MatRef,
    w: &Q4Ref,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) {
    let (m, n, k) = (a.rows, w.rows, w.cols);
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= (m - 1) * ldc + n, "q4 gemv i8: C too small");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    let path = path.resolve();
    let mut act = None;
    with_xg(a, w, false, |xg| act = Some(Act::quantize(xg, m, k, w, path)));
    let act = act.expect("with_xg runs its closure");
    let cp = SyncPtr(c.as_mut_ptr());
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    let cap = if m <= 2 { GEMV_COLS } else { GEMV_COLS_BATCH };
    let gcols = gemv_cols(n, cap, threads);
    let chunks = n.div_ceil(gcols);
    let run = |bufs: &mut Bufs, t: usize| {
        let c0 = t * gcols;
        let cw = gcols.min(n - c0);
        let mut i0 = 0;
        while i0 < m {
            let rows = (m - i0).min(8);
            let ch = Chunk { act: &act, w, i0, c0, cw, c: cp, ldc, accumulate };
            // SAFETY: `path` is resolved (the CPU has its features); the
            // chunk writes only C rows i0..i0+rows, columns c0..c0+cw, which
            // no other task touches; C holds them (asserted above).
            unsafe { run_chunk(path, rows, &ch, bufs) };
            i0 += rows;
        }
    };
    if parallel && chunks > 1 {
        (0..chunks).into_par_iter().for_each_init(Bufs::default, run);
    } else {
        let mut bufs = Bufs::default();
        (0..chunks).for_each(|t| run(&mut bufs, t));
    }
}

/// One activation block: stored rows `ra..rb`, all in group `g`; its word
/// rows are `pa..pb`, whose activation quads start at `off` in each row's
/// quad array.
#[derive(Clone, Copy, Debug)]
struct Blk {
    g: usize,
    ra: usize,
    rb: usize,
    pa: usize,
    pb: usize,
    off: usize,
}

/// The quantized activations of all m rows.
struct Act {
    blk: Vec<Blk>,
    /// Quads per row (Σ over blocks of `pb − pa`).
    nq: usize,
    /// Row `i`, word row `p` of block `b`: `quads[i·nq + off_b + p − pa]`
    /// = the s8 activations of stored rows (8p, 8p+2, 8p+4, 8p+6) and
    /// (8p+1, 8p+3, 8p+5, 8p+7) as the bytes of two i32, rows outside the
    /// block zero.
    quads: Vec<[i32; 2]>,
    /// Row `i`, block `b`: `Σ xq` (an integer, exact in f32) and `sx`.
    sum: Vec<f32>,
    scale: Vec<f32>,
}

impl Act {
    /// The AVX-512 paths quantize blocks of whole word rows with
    /// [`quantize_block_avx512`] (the same bytes; the scalar loop, a `rintf`
    /// call per activation, took 45% of a batch-8 GEMV whose weight sat in
    /// L2, and runs before the GEMV's threads start); the others, and
    /// ragged blocks, in scalar code.
    fn quantize(xg: &[f32], m: usize, k: usize, w: &Q4Ref, path: Q4I8Path) -> Act {
        let mut blk = Vec::new();
        let mut nq = 0;
        for g in 0..w.groups() {
            let (ga, gb) = (g * w.group, ((g + 1) * w.group).min(k));
            let mut ra = ga;
            while ra < gb {
                let rb = (ra + I8_BLOCK_MAX).min(gb);
                let (pa, pb) = (ra / 8, rb.div_ceil(8));
                blk.push(Blk { g, ra, rb, pa, pb, off: nq });
                nq += pb - pa;
                ra = rb;
            }
        }
        let nb = blk.len();
        let mut quads = vec![[0i32; 2]; m * nq];
        let (mut sum, mut scale) = (vec![0f32; m * nb], vec![0f32; m * nb]);
        let mut xq = [0i8; I8_BLOCK_MAX];
        for i in 0..m {
            let x = &xg[i * k..(i + 1) * k];
            for (b, bl) in blk.iter().enumerate() {
                let n = bl.rb - bl.ra;
                #[cfg(target_arch = "x86_64")]
                if path == Q4I8Path::Avx512Vnni && bl.ra.is_multiple_of(8) && n.is_multiple_of(8) {
                    let dst = &mut quads[i * nq + bl.off..i * nq + bl.off + n / 8];
                    // SAFETY: the path is resolved, so the CPU has AVX-512F.
                    let (sx, sq) = unsafe { quantize_block_avx512(&x[bl.ra..bl.rb], dst) };
                    (scale[i * nb + b], sum[i * nb + b]) = (sx, sq as f32);
                    continue;
                }
                scale[i * nb + b] = quantize_block(&x[bl.ra..bl.rb], &mut xq[..n]);
                sum[i * nb + b] = xq[..n].iter().map(|&v| v as i32).sum::<i32>() as f32;
                let q = |r: usize| -> u8 {
                    if (bl.ra..bl.rb).contains(&r) {
                        xq[r - bl.ra] as u8
                    } else {
                        0
                    }
                };
                for p in bl.pa..bl.pb {
                    let quad = |odd: usize| i32::from_le_bytes(std::array::from_fn(|t| q(8 * p + 2 * t + odd)));
                    quads[i * nq + bl.off + p - bl.pa] = [quad(0), quad(1)];
                }
            }
        }
        Act { blk, nq, quads, sum, scale }
    }
}

/// Quantizes one block of activations to `q` and returns its scale (see the
/// module doc for the rule).
fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let inv = if amax > 0.0 && amax.is_finite() { 127.0 / amax } else { 0.0 };
    for (d, &v) in q.iter_mut().zip(x) {
        *d = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    if x.iter().any(|v| v.is_nan()) {
        f32::NAN
    } else {
        amax / 127.0
    }
}

/// [`quantize_block`] for a block of whole word rows (`x.len()` a multiple
/// of 8), written straight as its quads, 16 activations a step; returns the
/// scale and `Σ xq`. The same operations as the scalar code on every lane
/// (the max ignores NaN as `f32::max` does, the product, rounding to
/// nearest even and clamp are the same f32 operations), so the same bytes;
/// a NaN activation gives byte 0 as `as i8` does.
///
/// SAFETY: AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_block_avx512(x: &[f32], quads: &mut [[i32; 2]]) -> (f32, i32) {
    use std::arch::x86_64::*;
    let n = x.len();
    debug_assert!(n.is_multiple_of(8) && quads.len() == n / 8);
    let xp = x.as_ptr();
    // Lanes in quad order: each 8 rows as 0, 2, 4, 6, 1, 3, 5, 7.
    let order = _mm512_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
    let load = |l: usize| -> __m512 {
        // 16 lanes, or 8 (the rest zero) at a block's odd last word row pair.
        let mask: __mmask16 = if l + 16 <= n { 0xFFFF } else { 0x00FF };
        _mm512_maskz_loadu_ps(mask, xp.add(l))
    };
    let (mut amax, mut nan) = (_mm512_setzero_ps(), 0u16);
    let mut l = 0;
    while l < n {
        let v = load(l);
        // `max(|v|, acc)` returns acc where |v| is NaN: NaN is skipped.
        amax = _mm512_max_ps(_mm512_abs_ps(v), amax);
        nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        l += 16;
    }
    let amax = _mm512_reduce_max_ps(amax);
    let inv = if amax > 0.0 && amax.is_finite() { 127.0 / amax } else { 0.0 };
    let (vinv, lo, hi) = (_mm512_set1_ps(inv), _mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    let mut sum = _mm512_setzero_si512();
    let out = quads.as_mut_ptr() as *mut u8;
    l = 0;
    while l < n {
        let v = _mm512_permutexvar_ps(order, load(l));
        let p = _mm512_mul_ps(v, vinv);
        let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(p);
        let c = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
        // NaN lanes (a NaN activation, or ∞·0) become 0.
        let q = _mm512_maskz_cvtps_epi32(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(p, p), c);
        sum = _mm512_add_epi32(sum, q);
        let bytes = _mm512_cvtepi32_epi8(q);
        if l + 16 <= n {
            _mm_storeu_si128(out.add(l) as *mut __m128i, bytes);
        } else {
            _mm_storel_epi64(out.add(l) as *mut __m128i, bytes);
        }
        l += 16;
    }
    let scale = if nan != 0 { f32::NAN } else { amax / 127.0 };
    (scale, _mm512_reduce_add_epi32(sum))
}

/// Per-task buffers, padded to whole 16-lane vectors.
#[derive(Default)]
struct Bufs {
    /// The ragged last word vector of a chunk, one block's word rows of it,
    /// 16 words a row, zero-padded (padding lanes are never stored to C).
    tail: Vec<u32>,
    /// Results, `rows × cwp`.
    y: Vec<f32>,
    /// Zero points (1..=16, as f32) of the current group from the 8-aligned
    /// column at or below the chunk's first (`o0 % 8` floats before it).
    z: Vec<f32>,
    /// Scales of the current group, per column.
    s: Vec<f32>,
}

/// What one chunk computes: rows `i0..i0 + M` against columns `c0..c0 + cw`.
#[derive(Clone, Copy)]
struct Chunk<'a> {
    act: &'a Act,
    w: &'a Q4Ref<'a>,
    i0: usize,
    c0: usize,
    cw: usize,
    c: SyncPtr,
    ldc: usize,
    accumulate: bool,
}

/// SAFETY: `path` must be available on this CPU; see [`chunk`].
unsafe fn run_chunk(path: Q4I8Path, rows: usize, ch: &Chunk, bufs: &mut Bufs) {
    match path {
        #[cfg(target_arch = "x86_64")]
        Q4I8Path::Avx512Vnni => chunk_avx512vnni(rows, ch, bufs),
        #[cfg(target_arch = "x86_64")]
        Q4I8Path::AvxVnni => chunk_avxvnni(rows, ch, bufs),
        #[cfg(target_arch = "x86_64")]
        Q4I8Path::Avx2 => chunk_avx2(rows, ch, bufs),
        _ => chunk_portable(rows, ch, bufs),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni,avx2,fma,f16c")]
unsafe fn chunk_avx512vnni(rows: usize, ch: &Chunk, bufs: &mut Bufs) {
    dispatch_rows!(Avx512VnniK, rows, ch, bufs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avxvnni,avx2,fma,f16c")]
unsafe fn chunk_avxvnni(rows: usize, ch: &Chunk, bufs: &mut Bufs) {
    dispatch_rows!(AvxVnniK, rows, ch, bufs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn chunk_avx2(rows: usize, ch: &Chunk, bufs: &mut Bufs) {
    dispatch_rows!(Avx2K, rows, ch, bufs)
}

unsafe fn chunk_portable(rows: usize, ch: &Chunk, bufs: &mut Bufs) {
    dispatch_rows!(PortableK, rows, ch, bufs)
}

/// One word vector's worth of work on a code path (`LANES` consecutive
/// columns).
trait Kern {
    const LANES: usize;
    /// `LANES` i32 accumulators (a register).
    type V: Copy;
    /// SAFETY: the path's CPU features.
    unsafe fn zero() -> Self::V;
    /// `dst[l] = src[l]` widened, for the group's scales (once per group and
    /// chunk). The AVX paths convert 8 or 16 at a time in registers: the
    /// `half` slice conversion (a call per 8 values) took ~9% of a decode
    /// step.
    ///
    /// SAFETY: the path's CPU features.
    #[inline(always)]
    unsafe fn scales(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    /// One word row of `U` consecutive word vectors at `wp`:
    /// `a[u][i] += Σ_j q_j · xq_i,j` over the 8 stored rows, `q[i]`
    /// pointing at row `i`'s activation quads of this word row.
    ///
    /// SAFETY: `U·LANES` words readable at `wp`; the path's CPU features.
    unsafe fn word<const M: usize, const U: usize>(wp: *const u32, q: &[*const [i32; 2]; M], a: &mut [[Self::V; M]; U]);
    /// End of a block on one vector: for each row `i`,
    /// `y_i = fma(f32(a_i) − z·sum_i, s·sx_i, y_i)` (row `i` at `y + i·ld`).
    ///
    /// SAFETY: `LANES` floats readable at `zp` and `sp`, readable and
    /// writable at each `y + i·ld`; the path's CPU features.
    unsafe fn end<const M: usize>(
        a: &[Self::V; M],
        zp: *const f32,
        sp: *const f32,
        sum: &[f32; M],
        sx: &[f32; M],
        y: *mut f32,
        ld: usize,
    );
}

/// Word vectors per step for `m` rows: enough independent accumulation
/// chains (`U·m`) without spilling the `U·m` accumulators and `2U` weight
/// vectors (32 registers with AVX-512, 16 with AVX2).
const fn unroll(m: usize, lanes: usize) -> usize {
    match (m, lanes) {
        (1..=4, 16) | (1, _) => 4,
        (5..=8, 16) | (2..=4, _) => 2,
        _ => 1,
    }
}

/// One block over `U` word vectors: integer accumulators in registers over
/// the block's `np` word rows (row `d` at `wp + d·wld`), then [`Kern::end`].
/// `pf` (same stride, `pf_rows` rows) is what the sweep reads next.
///
/// SAFETY: as for [`Kern::word`] on every word row and [`Kern::end`] on
/// every vector; `q[i] + np − 1` readable.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block<K: Kern, const M: usize, const U: usize>(
    wp: *const u32,
    wld: usize,
    np: usize,
    (pf, pf_rows): (*const u32, usize),
    q: &[*const [i32; 2]; M],
    (zp, sp): (*const f32, *const f32),
    (sum, sx): (&[f32; M], &[f32; M]),
    y: *mut f32,
    ld: usize,
) {
    let mut a = [[K::zero(); M]; U];
    for d in 0..np {
        if d < pf_rows {
            let row = pf.wrapping_add(d * wld);
            for l in (0..U * K::LANES).step_by(16) {
                prefetch_l2(row.wrapping_add(l));
            }
        }
        let qd: [*const [i32; 2]; M] = std::array::from_fn(|i| q[i].add(d));
        K::word::<M, U>(wp.add(d * wld), &qd, &mut a);
    }
    for (u, au) in a.iter().enumerate() {
        let l = u * K::LANES;
        K::end::<M>(au, zp.add(l), sp.add(l), sum, sx, y.add(l), ld);
    }
}

/// The sweep of one chunk: groups in order, each group's blocks in order,
/// each block over the chunk's columns.
///
/// SAFETY: `K`'s CPU features; C must hold rows `ch.i0..ch.i0 + M` ×
/// columns `ch.c0..ch.c0 + ch.cw` and no other thread may touch them.
#[inline(always)]
unsafe fn chunk<K: Kern, const M: usize>(ch: &Chunk, bufs: &mut Bufs) {
    let Chunk { act, w, i0, c0, cw, c, ldc, accumulate } = *ch;
    let k = w.cols;
    let cwp = cw.next_multiple_of(16);
    let o0 = w.row0 + c0;
    let zoff = o0 % 8;
    bufs.y.clear();
    bufs.y.resize(M * cwp, 0.0);
    bufs.z.clear();
    bufs.z.resize(cwp + 16, 0.0);
    bufs.s.clear();
    bufs.s.resize(cwp, 0.0);
    let y = bufs.y.as_mut_ptr();
    let cbase = c.get().add(i0 * ldc + c0);
    if accumulate {
        for i in 0..M {
            std::ptr::copy_nonoverlapping(cbase.add(i * ldc), y.add(i * cwp), cw);
        }
    }
    let words = k.div_ceil(8);
    let qw = w.qweight.as_ptr();
    assert!(w.qweight.len() >= w.qweight_len(), "q4 gemv i8: qweight too short");
    let nb = act.blk.len();
    let step = K::LANES * unroll(M, K::LANES);
    let mut b = 0;
    for g in 0..w.groups() {
        // The group's scales and zeros over the chunk's columns.
        K::scales(&w.scales[g * w.ld + o0..g * w.ld + o0 + cw], &mut bufs.s[..cw]);
        let zrow = &w.qzeros[g * w.ld / 8 + o0 / 8..g * w.ld / 8 + (o0 + cw).div_ceil(8)];
        for (zc, &word) in bufs.z.chunks_exact_mut(8).zip(zrow) {
            for (j, z) in zc.iter_mut().enumerate() {
                *z = (((word >> (4 * j)) & 15) + 1) as f32;
            }
        }
        let (zb, sb) = (bufs.z.as_ptr().add(zoff), bufs.s.as_ptr());
        while b < nb && act.blk[b].g == g {
            let bl = act.blk[b];
            let np = bl.pb - bl.pa;
            let q: [*const [i32; 2]; M] = std::array::from_fn(|i| act.quads.as_ptr().add((i0 + i) * act.nq + bl.off));
            let sum: [f32; M] = std::array::from_fn(|i| act.sum[(i0 + i) * nb + b]);
            let sx: [f32; M] = std::array::from_fn(|i| act.scale[(i0 + i) * nb + b]);
            // What to prefetch while a column step runs: see `prefetch_target`
            // (the next block's rows past the chunk's end).
            let next = act.blk.get(b + 1).map_or((words, words), |n| (n.pa, n.pb));
            let pf = |v: usize| prefetch_target(w, (bl.pa, np), (next.0, next.1 - next.0), o0, v, cw);
            let sc = (&sum, &sx);
            let mut v = 0;
            while v < cw {
                prefetch_group_params(w, g + 1, o0 + v);
                let (zs, yp) = ((zb.add(v), sb.add(v)), y.add(v));
                v += match col_block(w, (bl.pa, np), o0 + v, cw - v, step, K::LANES, &mut bufs.tail) {
                    ColBlock::Wide(wp, wld) => {
                        match unroll(M, K::LANES) {
                            4 => block::<K, M, 4>(wp, wld, np, pf(v), &q, zs, sc, yp, cwp),
                            2 => block::<K, M, 2>(wp, wld, np, pf(v), &q, zs, sc, yp, cwp),
                            _ => block::<K, M, 1>(wp, wld, np, pf(v), &q, zs, sc, yp, cwp),
                        }
                        step
                    }
                    ColBlock::One(wp, wld) => {
                        block::<K, M, 1>(wp, wld, np, pf(v), &q, zs, sc, yp, cwp);
                        K::LANES
                    }
                    ColBlock::Copied(tp, n) => {
                        block::<K, M, 1>(tp, 16, np, (qw, 0), &q, zs, sc, yp, cwp);
                        n
                    }
                };
            }
            b += 1;
        }
    }
    for i in 0..M {
        std::ptr::copy_nonoverlapping(y.add(i * cwp), cbase.add(i * ldc), cw);
    }
}

struct PortableK;

// Lane and row loops index several arrays in step; iterators would obscure it.
#[allow(clippy::needless_range_loop)]
impl Kern for PortableK {
    const LANES: usize = 8;
    type V = [i32; 8];
    #[inline(always)]
    unsafe fn zero() -> [i32; 8] {
        [0; 8]
    }
    #[inline(always)]
    unsafe fn word<const M: usize, const U: usize>(
        wp: *const u32,
        q: &[*const [i32; 2]; M],
        a: &mut [[[i32; 8]; M]; U],
    ) {
        for (u, au) in a.iter_mut().enumerate() {
            let wv: [u32; 8] = std::ptr::read_unaligned(wp.add(8 * u) as *const [u32; 8]);
            for i in 0..M {
                let [e, o] = *q[i];
                let (e, o) = (e.to_le_bytes(), o.to_le_bytes());
                for l in 0..8 {
                    let mut s = 0i32;
                    for t in 0..4 {
                        s += ((wv[l] >> (8 * t)) & 15) as i32 * e[t] as i8 as i32;
                        s += ((wv[l] >> (8 * t + 4)) & 15) as i32 * o[t] as i8 as i32;
                    }
                    au[i][l] += s;
                }
            }
        }
    }
    #[inline(always)]
    unsafe fn end<const M: usize>(
        a: &[[i32; 8]; M],
        zp: *const f32,
        sp: *const f32,
        sum: &[f32; M],
        sx: &[f32; M],
        y: *mut f32,
        ld: usize,
    ) {
        for i in 0..M {
            for l in 0..8 {
                // Exact: integers below 2²⁴ (see the module doc).
                let t = a[i][l] as f32 - *zp.add(l) * sum[i];
                let yy = y.add(i * ld + l);
                *yy = t.mul_add(*sp.add(l) * sx[i], *yy);
            }
        }
    }
}

/// The block end of the 256-bit paths.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn end256<const M: usize>(
    a: &[std::arch::x86_64::__m256i; M],
    zp: *const f32,
    sp: *const f32,
    sum: &[f32; M],
    sx: &[f32; M],
    y: *mut f32,
    ld: usize,
) {
    use std::arch::x86_64::*;
    let (z, s) = (_mm256_loadu_ps(zp), _mm256_loadu_ps(sp));
    for i in 0..M {
        let t = _mm256_fnmadd_ps(z, _mm256_set1_ps(sum[i]), _mm256_cvtepi32_ps(a[i]));
        let yy = y.add(i * ld);
        _mm256_storeu_ps(yy, _mm256_fmadd_ps(t, _mm256_mul_ps(s, _mm256_set1_ps(sx[i])), _mm256_loadu_ps(yy)));
    }
}

/// [`Kern::scales`] with F16C, 8 at a time.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scales256(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let mut l = 0;
    while l + 8 <= n {
        // SAFETY: l + 8 ≤ both lengths.
        _mm256_storeu_ps(
            dst.as_mut_ptr().add(l),
            _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().add(l) as *const __m128i)),
        );
        l += 8;
    }
    src[l..n].convert_to_f32_slice(&mut dst[l..n]);
}

/// The low and high nibbles of `U` word vectors of 8 words, as bytes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn nibbles256<const U: usize>(wp: *const u32) -> [[std::arch::x86_64::__m256i; 2]; U] {
    use std::arch::x86_64::*;
    let mask = _mm256_set1_epi32(0x0F0F_0F0F);
    std::array::from_fn(|u| {
        let v = _mm256_loadu_si256(wp.add(8 * u) as *const __m256i);
        [_mm256_and_si256(v, mask), _mm256_and_si256(_mm256_srli_epi32::<4>(v), mask)]
    })
}

#[cfg(target_arch = "x86_64")]
struct Avx2K;

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
impl Kern for Avx2K {
    const LANES: usize = 8;
    type V = std::arch::x86_64::__m256i;
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        std::arch::x86_64::_mm256_setzero_si256()
    }
    #[inline(always)]
    unsafe fn word<const M: usize, const U: usize>(
        wp: *const u32,
        q: &[*const [i32; 2]; M],
        a: &mut [[Self::V; M]; U],
    ) {
        use std::arch::x86_64::*;
        let nib = nibbles256::<U>(wp);
        let ones = _mm256_set1_epi16(1);
        for i in 0..M {
            let [e, o] = *q[i];
            let (xe, xo) = (_mm256_set1_epi32(e), _mm256_set1_epi32(o));
            for u in 0..U {
                // u8 × s8 pairs to i16 (at most 3810: no saturation), then
                // pairs of those to i32.
                let pe = _mm256_madd_epi16(_mm256_maddubs_epi16(nib[u][0], xe), ones);
                let po = _mm256_madd_epi16(_mm256_maddubs_epi16(nib[u][1], xo), ones);
                a[u][i] = _mm256_add_epi32(a[u][i], _mm256_add_epi32(pe, po));
            }
        }
    }
    #[inline(always)]
    unsafe fn end<const M: usize>(
        a: &[Self::V; M],
        zp: *const f32,
        sp: *const f32,
        sum: &[f32; M],
        sx: &[f32; M],
        y: *mut f32,
        ld: usize,
    ) {
        end256::<M>(a, zp, sp, sum, sx, y, ld)
    }
}

#[cfg(target_arch = "x86_64")]
struct AvxVnniK;

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
impl Kern for AvxVnniK {
    const LANES: usize = 8;
    type V = std::arch::x86_64::__m256i;
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        std::arch::x86_64::_mm256_setzero_si256()
    }
    #[inline(always)]
    unsafe fn word<const M: usize, const U: usize>(
        wp: *const u32,
        q: &[*const [i32; 2]; M],
        a: &mut [[Self::V; M]; U],
    ) {
        use std::arch::x86_64::*;
        let nib = nibbles256::<U>(wp);
        for i in 0..M {
            let [e, o] = *q[i];
            let (xe, xo) = (_mm256_set1_epi32(e), _mm256_set1_epi32(o));
            for u in 0..U {
                a[u][i] = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(a[u][i], nib[u][0], xe), nib[u][1], xo);
            }
        }
    }
    #[inline(always)]
    unsafe fn end<const M: usize>(
        a: &[Self::V; M],
        zp: *const f32,
        sp: *const f32,
        sum: &[f32; M],
        sx: &[f32; M],
        y: *mut f32,
        ld: usize,
    ) {
        end256::<M>(a, zp, sp, sum, sx, y, ld)
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx512VnniK;

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
impl Kern for Avx512VnniK {
    const LANES: usize = 16;
    type V = std::arch::x86_64::__m512i;
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        std::arch::x86_64::_mm512_setzero_si512()
    }
    #[inline(always)]
    unsafe fn word<const M: usize, const U: usize>(
        wp: *const u32,
        q: &[*const [i32; 2]; M],
        a: &mut [[Self::V; M]; U],
    ) {
        use std::arch::x86_64::*;
        let mask = _mm512_set1_epi32(0x0F0F_0F0F);
        let nib: [[__m512i; 2]; U] = std::array::from_fn(|u| {
            let v = _mm512_loadu_si512(wp.add(16 * u) as *const __m512i);
            [_mm512_and_si512(v, mask), _mm512_and_si512(_mm512_srli_epi32::<4>(v), mask)]
        });
        for i in 0..M {
            let [e, o] = *q[i];
            let (xe, xo) = (_mm512_set1_epi32(e), _mm512_set1_epi32(o));
            for u in 0..U {
                a[u][i] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a[u][i], nib[u][0], xe), nib[u][1], xo);
            }
        }
    }
    #[inline(always)]
    unsafe fn end<const M: usize>(
        a: &[Self::V; M],
        zp: *const f32,
        sp: *const f32,
        sum: &[f32; M],
        sx: &[f32; M],
        y: *mut f32,
        ld: usize,
    ) {
        use std::arch::x86_64::*;
        let (z, s) = (_mm512_loadu_ps(zp), _mm512_loadu_ps(sp));
        for i in 0..M {
            let t = _mm512_fnmadd_ps(z, _mm512_set1_ps(sum[i]), _mm512_cvtepi32_ps(a[i]));
            let yy = y.add(i * ld);
            _mm512_storeu_ps(yy, _mm512_fmadd_ps(t, _mm512_mul_ps(s, _mm512_set1_ps(sx[i])), _mm512_loadu_ps(yy)));
        }
    }
    #[inline(always)]
    unsafe fn scales(src: &[f16], dst: &mut [f32]) {
        use std::arch::x86_64::*;
        let n = src.len().min(dst.len());
        let mut l = 0;
        while l + 16 <= n {
            // SAFETY: l + 16 ≤ both lengths.
            let h = _mm256_loadu_si256(src.as_ptr().add(l) as *const __m256i);
            _mm512_storeu_ps(dst.as_mut_ptr().add(l), _mm512_cvtph_ps(h));
            l += 16;
        }
        scales256(&src[l..n], &mut dst[l..n]);
    }
}
