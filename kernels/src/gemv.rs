//! Decode GEMV on AVX-512: `C[m×n] (+)= A[m×k] · Wᵀ` for a weight stored
//! `[n, k]` row-major (a Linear's `[out, in]`, so every output is a dot
//! product over one contiguous weight row), `m ≤ 24` rows of A (decode, batched
//! decode, short prompts; `gemm::DOT_M_AVX512`), long rows
//! (`k ≥ 1024`, see `gemm::SHORT_K`). This is the memory-bound core of a
//! decode step: each step reads every weight once, so the kernel's job is to
//! keep DRAM streaming while doing `m` exact f32 multiply-adds per weight.
//!
//! [`crate::gemm`]'s dot path calls [`cols_avx512`] for its column chunks
//! (task splitting, widening A to f32 and the short-k and non-AVX-512 paths
//! stay there).
//!
//! **Arithmetic (the batch-invariance contract on AVX-512):** element
//! `(i, j)` is `hsum16(c0 + c1) + tail`, where lane `l` of chain `c`
//! accumulates `a[i, p]·w[j, p]` for `p ≡ l (mod 16)`, `⌊p/16⌋ ≡ c (mod 2)`,
//! `p < k − k mod 16`, in increasing `p`, one FMA each (the weight widened
//! exactly to f32: bf16 by a shift, f16 by `vcvtph2ps`); the two chains are
//! added lane by lane, [`hsum16`] adds the lanes pairwise, and the `k mod 16`
//! tail products are added one by one with `mul_add`. Nothing in
//! that sequence depends on `m`, on how many weight rows a tile holds, or on
//! the column split, so a row of a batched decode step is bit-identical to
//! the row computed alone (`DECODE_BATCH_INVARIANT_MAX`). The AVX2 and
//! portable paths keep gemm's 8-lane sequence, so AVX-512 results differ
//! from theirs by f32 rounding only.
//!
//! **Tiles (measured on Zen 5, 2 cores, weights streamed from DRAM; see
//! `benches/gemv_family.rs`):** 16-lane zmm FMAs with the weight widened in
//! registers beat gemm's former 8-lane ymm tiles (half the widening and FMA
//! instructions per byte). At m = 1 the best access pattern depends on
//! whether A's row stays in L1 next to the weight stream: for `4k ≤ 16 KiB`
//! (k ≤ 4096) one weight row at a time (a single sequential stream, which
//! the hardware prefetcher follows best: 4096×12288 bf16 on one thread ~30
//! GB/s against ~27 for 8-row tiles; it is also prefetched into L2
//! [`ONE_ROW_AHEAD`] bytes ahead); for longer rows (11008) A no longer
//! fits beside the stream and one-row tiles fall to ~18 GB/s, so 8 rows share
//! each A load, each row software-prefetched [`AHEAD`] bytes ahead (~28-30
//! GB/s). With more rows of A, 4-row tiles run against the rows of A two at
//! a time: the first pair streams the tile from DRAM, the others re-read it
//! from L2 (8-row tiles before the second chain; see below). Measured from
//! DRAM, one thread, against the tiles of
//! `R` weight rows × all `M` rows (`R·M ≤ 24` zmm accumulators) this
//! replaced: m = 8 4096→12288 8.7-8.9 → 12.7-14.0 GB/s, 11008→4096 9.4-9.9
//! → 15.5-15.7; m = 4 16.9-18.7 → 18.0-20.3 and 19.5 → 22.2-23.1 (quads of
//! A rows over 4-row tiles were in between). Tiles of 2 weight rows, fastest
//! when the weight sits in cache, lost from DRAM at every m.
//!
//! **The next tile during the L2 passes (Zen 4 VM, 2026-12-03):** with
//! m ≥ 3 a tile is read in `⌈m/2⌉` passes and only the first streams from
//! DRAM, so DRAM idled while the others re-read the tile from L2. Each pass
//! now also prefetches its share of the next tile ([`Pf`]), keeping the
//! stream busy through the whole tile. `gemv_family`, 2 threads, medians of
//! 30 calls, three interleaved rounds before → after: m = 4 4096→12288
//! exact 20.0/18.8/14.8 → 25.4/28.6/25.9 GB/s, `fast` 22.6/22.6/19.4 →
//! 26.5/30.7/26.2 (best calls 0.90-0.95 of the read bandwidth); m = 8
//! exact 13.4/12.6/12.5 → 15.9/17.0/12.9, `fast` 16.1/15.8/16.0 →
//! 19.9/21.1/17.4; 11008→4096 m = 8 `fast` 17.9/16.2/12.7 → 20.9/18.3/19.2.
//! m = 8 stays below the stream: four passes of `vdpbf16ps`/FMA from L2.
//!
//! **Two chains (Zen 4, 2026-12-03):** with one accumulator per dot product
//! the k loop is one FMA dependency chain, 32 bytes of bf16 per FMA latency:
//! the ~30 GB/s per core above was that bound, not DRAM (a weight that sits
//! in L3, 4096→1024, one thread: 30.6-30.9 GB/s at m = 1). Alternate
//! 16-element steps now go to two accumulators: 54.7-55.4 GB/s at m = 1,
//! 41-43 (from 22) at m = 2, 21.6-21.8 (from 10.9) at m = 4, so a core can
//! follow a faster DRAM stream. From DRAM on that machine (≈ 32 GB/s for
//! two threads) both versions read at the memory's speed.
//!
//! **Staged tiles for m ≥ 3 (Sapphire Rapids, 2026-12-04):** each pass
//! of the pair tiles widened every weight again, as many widening
//! instructions as FMAs at m = 8, on the FMA ports. Exact products of
//! 16-bit weights with `m ≥ 3` now widen each tile once, [`KCH`] elements
//! at a time, into an f32 buffer in L1 and run every pass over it
//! ([`staged`]); the passes prefetch the next chunk into L2 between them.
//! Same products in the same lanes and order, so bit for bit the old
//! results. `gemv_family`, 2 threads, from DRAM, two interleaved rounds,
//! medians before → after: m = 8 4096→12288 13.5/13.9 → 15.5/15.3 GB/s,
//! 11008→4096 13.2/12.7 → 16.7/16.8; m = 3 20.8/20.8 → 23.1/24.5 and
//! 21.6/21.3 → 25.1/25.1. Then every operand 64-byte aligned (A's widened
//! rows by `gemm`, the staged buffer here): split loads had cost the loop a
//! third of its rate (an L1-resident probe: 80–102 → 126–138 GFLOP/s on
//! one thread); m = 8 from DRAM 14.4–16.0 → 16.7–18.6 GB/s. `qvc bench`
//! batch 8 (2-layer slice): 42.4–49.6 → 56.0–57.9 tok/s over the two
//! steps. In cache the loop still runs at about 0.4 of the FMA peak (A's
//! rows come from L2 at every tile), so m = 8 stays at about half the
//! stream; `--cpu-math fast` on AMX runs batched decode on the tiles
//! instead (`gemm::amx::gemv`).
//!
//! Invariants: only called after `Isa::resolve` returned `Avx512` (the
//! `#[target_feature]` functions are then sound); every weight row read lies
//! in the slice (checked once per call); each call writes only C's columns
//! `j0..j1` of rows `0..m`, which the caller's task owns. The module exists
//! on x86_64 only (`lib.rs`), like the dot path's call into it.

use crate::common::{Src, SyncPtr};
use std::any::TypeId;

/// Lanes of every dot product on this path (see the module doc).
pub(crate) const LANES: usize = 16;

/// Largest k (f32 A row of `4k` bytes: a third of a 48 KiB L1) for which
/// m = 1 reads one weight row at a time (see the module doc).
const ONE_ROW_MAX_K: usize = 4096;

/// Software-prefetch distance (into L2) of the one-row stream, in bytes:
/// past where the hardware prefetcher runs. Zen 4 VM, 2 threads, median
/// of 30 calls in six interleaved rounds, 4096 → 12288 bf16: none 3.65-4.68
/// ms, 4096 bytes 2.61-3.47, 8192 3.10-3.44, 1024 no better than none;
/// lm_head (151936 rows) none 34.9-54.0 ms, 4096 bytes 31.5-41.2.
const ONE_ROW_AHEAD: usize = 4096;

/// Weight rows per tile when A's row does not fit L1 beside the stream or
/// there are several rows of A (see the module doc).
const TILE_ROWS: usize = 8;

/// Software-prefetch distance in each weight row of a multi-row tile, in
/// bytes (16 cache lines). Measured at 2 threads, 11008 → 4096 bf16: no
/// prefetch 26.7 GB/s, 1024 bytes 30.0, 2048 worse again. The lines go to
/// L2 (`prefetcht1`), not L1: an L1 prefetch holds one of the core's few L1
/// miss buffers for a whole DRAM latency (Zen 4 VM, 3 interleaved rounds:
/// 11008 → 4096 best 30.8-33.8 → 38.6-41.3 GB/s at m = 1, 4096 → 12288
/// 17.9-18.6 → 20.4-22.2 at m = 4).
const AHEAD: usize = 1024;

/// What one call shares: A's rows (widened to f32, `m × k` contiguous), the
/// weight's layout (row `j` starts at `off + j·cs`), and C.
#[derive(Clone, Copy)]
pub(crate) struct GemvJob<'a, A = f32> {
    /// f32 for exact products; the bf16 bit patterns of A rounded to bf16
    /// for [`cols_bf16_products`].
    pub a: &'a [A],
    pub m: usize,
    pub k: usize,
    pub off: usize,
    pub cs: usize,
    pub c: SyncPtr,
    pub ldc: usize,
    pub accumulate: bool,
    /// Whether the weight streams from DRAM (prefetch multi-row tiles).
    pub stream: bool,
}

/// C columns `j0..j1` (weight rows `j0..j1`) for all `m` rows of A.
///
/// SAFETY: the CPU must have AVX-512 F/BW/VL, AVX2, FMA and F16C (the caller
/// resolved `Isa::Avx512`); C must cover element `(i, j)` at
/// `c + i·ldc + j` for `i < m`, `j0 ≤ j < j1`, and no other thread may
/// touch those elements during the call.
pub(crate) unsafe fn cols_avx512<T: Src>(job: &GemvJob, w: &[T], j0: usize, j1: usize) {
    cols_checked::<Exact, T>(job, w, j0, j1)
}

/// [`cols_avx512`] with bf16 products (`--cpu-math fast`): A's rows come
/// rounded to bf16 and each pair of elements is multiplied with the bf16
/// weights by `vdpbf16ps` (two products per f32 lane, summed in f32), in the
/// same tiles and the same two chains of 32-element steps. Half the
/// instructions and A bytes of the exact path per weight byte, so more of
/// the weight stream is in flight: in a two-thread test on Zen 4, 1 GiB of
/// bf16 rows read at 33.5-35.6 GB/s against 29.0-33.9 widened to f32.
///
/// Arithmetic, per element `(i, j)`: lane `l` of chain `c` accumulates
/// `vdpbf16ps` of pairs `(2l, 2l+1)` of 32-element steps `s ≡ c (mod 2)`
/// below `k − k mod 32`; the chains are added lane by lane, then [`hsum16`],
/// then the `k mod 32` tail products one by one with `mul_add` (rounded A
/// times the exact weight). As on the exact path nothing depends on `m`, the
/// tile or the column split, so batched decode stays bit for bit single
/// decode.
///
/// SAFETY: as [`cols_avx512`], and the CPU must have AVX512-BF16.
pub(crate) unsafe fn cols_bf16_products(job: &GemvJob<u16>, w: &[half::bf16], j0: usize, j1: usize) {
    cols_checked::<Bf16Pairs, half::bf16>(job, w, j0, j1)
}

/// Both entry points: the job's bounds checked once, then [`cols_impl`].
///
/// SAFETY: as the entry point's.
unsafe fn cols_checked<P: Products, T: Src>(job: &GemvJob<P::A>, w: &[T], j0: usize, j1: usize) {
    if j0 >= j1 || job.m == 0 {
        return;
    }
    assert!(job.m <= 24, "gemv: m = {} > 24", job.m);
    assert!(job.k >= LANES, "gemv: k = {} shorter than one vector", job.k);
    assert!(job.a.len() >= job.m * job.k, "gemv: A holds {} < {}x{}", job.a.len(), job.m, job.k);
    // Every weight element read below lies in `w` (checked once).
    assert!(job.off + (j1 - 1) * job.cs + job.k <= w.len(), "gemv: weight rows out of bounds");
    cols_impl::<P, T>(job, w.as_ptr().add(job.off), j0, j1)
}

/// How a tile multiplies A by the weight rows: which A it reads, how many
/// elements one chain step takes, and the k loop over the whole steps.
trait Products {
    /// One element of A as the tile reads it.
    type A: Copy;
    /// Elements of k per step of one chain.
    const STEP: usize;
    /// The k loop up to `k − k mod STEP` (see [`dot_loop`]).
    ///
    /// SAFETY: as [`tile`].
    unsafe fn dot<T: Src, const R: usize, const M: usize>(
        a: *const Self::A,
        k: usize,
        rows: &[*const T; R],
        pf: &Pf<R>,
    ) -> [Acc<R, M>; CHAINS];
    /// An A element as the f32 the tail multiplies.
    fn f32(a: Self::A) -> f32;
    /// Runs [`cols_impl`]'s columns on the staged path ([`staged`]) where
    /// it has one for these weights; false where it does not.
    ///
    /// SAFETY: as [`cols_impl`], with `job.m ≥ 3`.
    unsafe fn staged<T: Src>(_job: &GemvJob<Self::A>, _base: *const T, _j0: usize, _j1: usize) -> bool {
        false
    }
}

/// Exact f32 products: the weight widened, one FMA per element.
struct Exact;

impl Products for Exact {
    type A = f32;
    const STEP: usize = LANES;
    #[inline(always)]
    unsafe fn dot<T: Src, const R: usize, const M: usize>(
        a: *const f32,
        k: usize,
        rows: &[*const T; R],
        pf: &Pf<R>,
    ) -> [Acc<R, M>; CHAINS] {
        dot_loop::<T, R, M>(a, k, rows, pf)
    }
    #[inline(always)]
    fn f32(a: f32) -> f32 {
        a
    }
    /// 16-bit weights (f32 ones need no widening).
    unsafe fn staged<T: Src>(job: &GemvJob<f32>, base: *const T, j0: usize, j1: usize) -> bool {
        if TypeId::of::<T>() == TypeId::of::<f32>() {
            return false;
        }
        staged::<T>(job, base, j0, j1);
        true
    }
}

/// bf16 products: A rounded to bf16, pairs by `vdpbf16ps` (bf16 weights
/// only; [`cols_bf16_products`]).
struct Bf16Pairs;

impl Products for Bf16Pairs {
    type A = u16;
    const STEP: usize = 2 * LANES;
    #[inline(always)]
    unsafe fn dot<T: Src, const R: usize, const M: usize>(
        a: *const u16,
        k: usize,
        rows: &[*const T; R],
        pf: &Pf<R>,
    ) -> [Acc<R, M>; CHAINS] {
        debug_assert!(TypeId::of::<T>() == TypeId::of::<half::bf16>());
        dot_loop_bf16::<R, M>(a, k, &rows.map(|r| r as *const u16), pf)
    }
    #[inline(always)]
    fn f32(a: u16) -> f32 {
        f32::from_bits((a as u32) << 16)
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn cols_impl<P: Products, T: Src>(job: &GemvJob<P::A>, base: *const T, j0: usize, j1: usize) {
    let ahead = if job.stream { AHEAD } else { 0 };
    if job.m == 1 && job.k <= ONE_ROW_MAX_K {
        // One weight row at a time: a single sequential stream, prefetched
        // into L2 a few KiB ahead.
        let pf = Pf::ahead(if job.stream { ONE_ROW_AHEAD } else { 0 });
        for j in j0..j1 {
            tile::<P, T, 1, 1>(job, base, j, 0, &pf);
        }
        return;
    }
    if job.m >= 3 && P::staged::<T>(job, base, j0, j1) {
        return;
    }
    // Tiles of weight rows against the rows of A in pairs (the odd last row
    // alone): the first pair streams the tile from DRAM with the prefetch,
    // the other pairs find it in L2. TILE_ROWS rows for one row of A, half as
    // many for pairs (2 chains × rows × rows of A ≤ 16 zmm accumulators).
    // With several passes, each also prefetches its share of the next tile
    // (see [`Pf`]). Then the ragged rest of the columns, one weight row at a
    // time.
    let rows = if job.m == 1 { TILE_ROWS } else { TILE_ROWS / 2 };
    let passes = job.m.div_ceil(2);
    let mut j = j0;
    while j1 - j >= rows {
        let next = job.stream && passes > 1 && j1 - j >= 2 * rows;
        let mut i0 = 0;
        while i0 < job.m {
            let pf_ahead = if i0 == 0 { ahead } else { 0 };
            if rows == TILE_ROWS {
                tile::<P, T, TILE_ROWS, 1>(job, base, j, i0, &Pf::ahead(pf_ahead));
            } else {
                let pf = Pf::<{ TILE_ROWS / 2 }>::with_next(pf_ahead, next, base, j + rows, job.cs, passes, i0 / 2);
                if job.m - i0 >= 2 {
                    tile::<P, T, { TILE_ROWS / 2 }, 2>(job, base, j, i0, &pf);
                } else {
                    tile::<P, T, { TILE_ROWS / 2 }, 1>(job, base, j, i0, &pf);
                }
            }
            i0 += 2;
        }
        j += rows;
    }
    while j < j1 {
        let mut i0 = 0;
        while i0 < job.m {
            if job.m - i0 >= 2 {
                tile::<P, T, 1, 2>(job, base, j, i0, &Pf::ahead(0));
            } else {
                tile::<P, T, 1, 1>(job, base, j, i0, &Pf::ahead(0));
            }
            i0 += 2;
        }
        j += 1;
    }
}

/// Elements of k per staged chunk ([`staged`]): the tile's widened chunk
/// (`STAGED_ROWS × KCH` f32, 8 KiB) and a pair of A rows' chunk (4 KiB) sit
/// in L1 together. A multiple of `CHAINS × LANES`, so chunks keep the chains.
const KCH: usize = 512;

const _: () = assert!(KCH.is_multiple_of(CHAINS * LANES) && 2 * MAX_PASSES >= 24);

/// Weight rows per staged tile: the pair tiles' rows, so the accumulators
/// (2 chains × 4 rows × 2 rows of A) stay 16 zmm.
const STAGED_ROWS: usize = TILE_ROWS / 2;

/// Most passes (pairs of A rows) a staged tile keeps accumulators for.
const MAX_PASSES: usize = 12;

/// [`cols_impl`] for exact products of 16-bit weights with `m ≥ 3` rows
/// of A. The pair tiles read each tile in `⌈m/2⌉` passes, and each pass
/// widened every weight again (a shift and a zero-extension per 16
/// weights, on the ports the FMAs use): at m = 8 as many widening
/// instructions as FMAs, so the kernel ran at about 16 GB/s from the cache
/// as from DRAM, half the memory's speed. Here each tile is widened once,
/// [`KCH`] elements at a time, into an f32 buffer in L1 (the next chunk's
/// lines prefetched meanwhile), and every pass runs its FMAs over that
/// buffer, keeping its accumulators between chunks. Per element the
/// products, their lanes, chains and order are those of [`tile`], so the
/// results are bit for bit the same (tested against it).
///
/// SAFETY: as [`cols_avx512`]; `job.m ≥ 3`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn staged<T: Src>(job: &GemvJob<f32>, base: *const T, j0: usize, j1: usize) {
    use std::arch::x86_64::*;
    const R: usize = STAGED_ROWS;
    let (m, k) = (job.m, job.k);
    let passes = m.div_ceil(2);
    debug_assert!((2..=MAX_PASSES).contains(&passes), "staged: m = {m}");
    let full = k - k % LANES;
    // Rows of whole cache lines (split loads cost a third of the rate).
    #[repr(C, align(64))]
    struct Staged([[f32; KCH]; STAGED_ROWS]);
    let mut staged_buf = Staged([[0f32; KCH]; R]);
    let wf = &mut staged_buf.0;
    let zero = [[[_mm512_setzero_ps(); R]; 2]; CHAINS];
    let zero1 = [[[_mm512_setzero_ps(); R]; 1]; CHAINS];
    // The passes' accumulators, reset per tile (only those in use: the
    // whole array is 12 KiB).
    let mut pairs = [zero; MAX_PASSES];
    let mut j = j0;
    while j1 - j >= R {
        let rows: [*const T; R] = std::array::from_fn(|r| base.add((j + r) * job.cs));
        let next_tile = j1 - j >= 2 * R;
        pairs[..m / 2].fill(zero);
        let mut odd = zero1;
        let mut p0 = 0;
        while p0 < full {
            let len = KCH.min(full - p0);
            for (r, dst) in wf.iter_mut().enumerate() {
                let src = rows[r].add(p0);
                let mut q = 0;
                while q < len {
                    _mm512_storeu_ps(dst.as_mut_ptr().add(q), load16::<T>(src.add(q)));
                    q += LANES;
                }
            }
            // While the passes run over the widened chunk, they prefetch
            // (into L2) the next chunk, or the next tile's first, a share
            // each, so the widening of the next finds it in L2 and DRAM
            // keeps streaming through the FMAs.
            let next: Option<[*const T; R]> = if p0 + KCH < full {
                Some(std::array::from_fn(|r| rows[r].add(p0 + KCH)))
            } else if next_tile {
                Some(std::array::from_fn(|r| base.add((j + R + r) * job.cs)))
            } else {
                None
            };
            let pf = |phase: usize| match next {
                Some(n) => Pf::next_only(n, passes, phase),
                None => Pf::ahead(0),
            };
            let wrows: [*const f32; R] = std::array::from_fn(|r| wf[r].as_ptr());
            for (pi, acc) in pairs.iter_mut().enumerate().take(m / 2) {
                let a = job.a.as_ptr().add(2 * pi * k + p0);
                *acc = dot_loop_from::<f32, R, 2>(*acc, a, k, &wrows, len, &pf(pi));
            }
            if m % 2 == 1 {
                let a = job.a.as_ptr().add((m - 1) * k + p0);
                odd = dot_loop_from::<f32, R, 1>(odd, a, k, &wrows, len, &pf(m / 2));
            }
            p0 += KCH;
        }
        for (pi, &acc) in pairs.iter().enumerate().take(m / 2) {
            finish::<Exact, T, R, 2>(job, &rows, j, 2 * pi, acc);
        }
        if m % 2 == 1 {
            finish::<Exact, T, R, 1>(job, &rows, j, m - 1, odd);
        }
        j += R;
    }
    // The ragged rest of the columns, one weight row at a time.
    while j < j1 {
        let mut i0 = 0;
        while i0 < m {
            if m - i0 >= 2 {
                tile::<Exact, T, 1, 2>(job, base, j, i0, &Pf::ahead(0));
            } else {
                tile::<Exact, T, 1, 1>(job, base, j, i0, &Pf::ahead(0));
            }
            i0 += 2;
        }
        j += 1;
    }
}

/// What a tile's k loop prefetches into L2: each of its own rows `ahead`
/// bytes in front of the reads (0: none), and, when a tile is read in
/// several passes (one per pair of A rows), a share of the next tile's rows.
/// Only the first pass streams a tile from DRAM; the others re-read it from
/// L2, and without the next-tile share DRAM would idle through them. Pass
/// `phase` of `period` prefetches the lines of trips `t ≡ phase (mod
/// period)` of the next tile, at the same offsets it reads, so the passes
/// together fetch every line of it once, spread over the whole tile.
struct Pf<const R: usize> {
    ahead: usize,
    /// The next tile's rows (as bytes), or `None`.
    next: Option<[*const u8; R]>,
    /// Bytes per element of the next rows (the staged tiles read widened
    /// f32 copies but prefetch the 16-bit weight).
    next_size: usize,
    period: usize,
    phase: usize,
}

impl<const R: usize> Pf<R> {
    fn ahead(ahead: usize) -> Self {
        Pf { ahead, next: None, next_size: 0, period: 1, phase: 0 }
    }

    /// With the next tile (rows `j..j + R` at stride `cs` from `base`) when `next`.
    fn with_next<T>(
        ahead: usize,
        next: bool,
        base: *const T,
        j: usize,
        cs: usize,
        period: usize,
        phase: usize,
    ) -> Self {
        let rows = next.then(|| std::array::from_fn(|r| base.wrapping_add((j + r) * cs) as *const u8));
        Pf { ahead, next: rows, next_size: std::mem::size_of::<T>(), period, phase }
    }

    /// No prefetch ahead; pass `phase` of `period` prefetches its share of
    /// the rows `next` (elements of type `T`), as [`Pf::with_next`].
    fn next_only<T>(next: [*const T; R], period: usize, phase: usize) -> Self {
        Pf { ahead: 0, next: Some(next.map(|r| r as *const u8)), next_size: std::mem::size_of::<T>(), period, phase }
    }

    /// The prefetches of k-loop trip number `trip`, which reads `lines`
    /// cache lines of each row from element `p`.
    ///
    /// SAFETY: `rows[r].add(p)` in bounds, and so the same element of the
    /// next tile's rows (they lie in the same checked span); the prefetched
    /// addresses themselves may be anywhere (a prefetch is a hint).
    #[inline(always)]
    unsafe fn trip<T>(&self, rows: &[*const T; R], p: usize, trip: usize, lines: usize) {
        if self.ahead > 0 {
            prefetch_rows(rows, p, self.ahead, lines);
        }
        if let Some(next) = &self.next {
            if (trip as u32) % (self.period as u32) == self.phase as u32 {
                // The same elements of the next rows: as many lines as
                // they take at their own element size.
                let elems = lines * 64 / std::mem::size_of::<T>();
                prefetch_rows(next, p * self.next_size, 0, (elems * self.next_size).div_ceil(64));
            }
        }
    }
}

/// Sixteen weights from `p`, widened exactly to f32.
///
/// SAFETY: `p..p+16` readable; only call from code compiled with AVX-512F
/// (and F16C).
#[inline(always)]
unsafe fn load16<T: Src>(p: *const T) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    if TypeId::of::<T>() == TypeId::of::<half::bf16>() {
        // Zero-extend the 16-bit patterns and shift them into the high half.
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    } else if TypeId::of::<T>() == TypeId::of::<half::f16>() {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    } else {
        debug_assert!(TypeId::of::<T>() == TypeId::of::<f32>());
        _mm512_loadu_ps(p as *const f32)
    }
}

/// Weight rows `j..j + R` against rows `i0..i0 + M` of A: `M × R` sums, each
/// [`CHAINS`] accumulators of 16 lanes (the contract in the module doc), each
/// weight vector widened once per step for all `M` rows, each A vector loaded
/// once for all `R` weight rows. With `ahead > 0`, each weight row is
/// prefetched `ahead` bytes in front of its reads (one line per 64 bytes
/// read).
///
/// SAFETY: as [`cols_avx512`], with rows `j..j + R` inside the checked span
/// and `i0 + M ≤ m`.
#[inline(always)]
unsafe fn tile<P: Products, T: Src, const R: usize, const M: usize>(
    job: &GemvJob<P::A>,
    base: *const T,
    j: usize,
    i0: usize,
    pf: &Pf<R>,
) {
    let rows: [*const T; R] = std::array::from_fn(|r| base.add((j + r) * job.cs));
    let a = job.a.as_ptr().add(i0 * job.k);
    let acc = P::dot::<T, R, M>(a, job.k, &rows, pf);
    finish::<P, T, R, M>(job, &rows, j, i0, acc);
}

/// The end of a tile: per element the two chains added, [`hsum16`], the
/// `k mod STEP` tail products one by one, and the store into C.
///
/// SAFETY: as [`tile`]; `rows` are weight rows `j..j + R`.
#[inline(always)]
unsafe fn finish<P: Products, T: Src, const R: usize, const M: usize>(
    job: &GemvJob<P::A>,
    rows: &[*const T; R],
    j: usize,
    i0: usize,
    [c0, c1]: [Acc<R, M>; CHAINS],
) {
    use std::arch::x86_64::*;
    let k = job.k;
    let full = k - k % P::STEP;
    let a = job.a.as_ptr().add(i0 * job.k);
    for (r, &row) in rows.iter().enumerate() {
        for i in 0..M {
            // The chains folded in one fixed order, then the lanes.
            let mut lanes = [0f32; LANES];
            _mm512_storeu_ps(lanes.as_mut_ptr(), _mm512_add_ps(c0[i][r], c1[i][r]));
            let mut s = hsum16(&lanes);
            for q in full..k {
                s = P::f32(*a.add(i * k + q)).mul_add(widen1(*row.add(q)), s);
            }
            let dst = job.c.get().add((i0 + i) * job.ldc + j + r);
            if job.accumulate {
                *dst += s;
            } else {
                *dst = s;
            }
        }
    }
}

/// Accumulators per dot product: 16-element step `s` (elements
/// `16s..16s+16`) goes to chain `s mod CHAINS`. One chain would bound a
/// one-row stream by the FMA latency: 32 bytes of bf16 per 4 cycles, about
/// 30 GB/s per core at 3.7 GHz, below what one core's DRAM stream delivers.
/// [`dot_loop`] and [`tile`] are written for exactly two.
const CHAINS: usize = 2;

/// One chain's accumulators of a tile: `[row of A][weight row]`.
type Acc<const R: usize, const M: usize> = [[std::arch::x86_64::__m512; R]; M];

/// The k loop of [`tile`] up to `k − k mod 16`: the accumulators of both
/// chains, passed by value from step to step ([`step`]). (Written as an
/// in-place array inside [`tile`], the compiler also stored all accumulators
/// to the stack on every step; the speed on Zen 5 was the same.)
///
/// SAFETY: as [`tile`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn dot_loop<T: Src, const R: usize, const M: usize>(
    a: *const f32,
    k: usize,
    rows: &[*const T; R],
    pf: &Pf<R>,
) -> [Acc<R, M>; CHAINS] {
    use std::arch::x86_64::_mm512_setzero_ps;
    dot_loop_from::<T, R, M>([[[_mm512_setzero_ps(); R]; M]; CHAINS], a, k, rows, k, pf)
}

/// [`dot_loop`] over elements `0..len` of A's rows (`k` apart) and of the
/// weight rows, adding to `acc`. Step `s` goes to chain `s mod 2`, so a
/// range starting at an element that is a multiple of 32 continues the
/// chains of the elements before it exactly ([`staged`]).
///
/// SAFETY: as [`tile`], with `len ≤ k` elements readable in every row.
#[inline(always)]
unsafe fn dot_loop_from<T: Src, const R: usize, const M: usize>(
    [mut c0, mut c1]: [Acc<R, M>; CHAINS],
    a: *const f32,
    k: usize,
    rows: &[*const T; R],
    len: usize,
    pf: &Pf<R>,
) -> [Acc<R, M>; CHAINS] {
    let full = len - len % LANES;
    let size = std::mem::size_of::<T>();
    // One step per chain per trip: 64 bytes of each bf16/f16 row (one
    // prefetched line), 128 of an f32 row (two).
    let full2 = len - len % (CHAINS * LANES);
    let mut p = 0;
    while p < full2 {
        pf.trip(rows, p, p / (CHAINS * LANES), if size > 2 { 2 } else { 1 });
        c0 = step::<T, R, M>(c0, a, k, rows, p);
        c1 = step::<T, R, M>(c1, a, k, rows, p + LANES);
        p += CHAINS * LANES;
    }
    if p < full {
        // Step full2 / 16 is even: chain 0.
        c0 = step::<T, R, M>(c0, a, k, rows, p);
    }
    [c0, c1]
}

/// Prefetch into L2 `lines` 64-byte lines of each row, `ahead` bytes past
/// its element `p` (one trip of [`dot_loop`] or [`dot_loop_bf16`]).
///
/// SAFETY: `rows[r].add(p)` in bounds (the prefetched addresses need not be:
/// a prefetch is a hint).
#[inline(always)]
unsafe fn prefetch_rows<T, const R: usize>(rows: &[*const T; R], p: usize, ahead: usize, lines: usize) {
    use std::arch::x86_64::*;
    for &r in rows {
        let q = (r.add(p) as *const i8).wrapping_add(ahead);
        for l in 0..lines {
            _mm_prefetch::<_MM_HINT_T1>(q.wrapping_add(64 * l));
        }
    }
}

/// One 16-element step at `p`: every weight row's vector widened once, every
/// row of A loaded once, `M × R` FMAs. Takes and returns the accumulators by
/// value (see [`dot_loop`]).
///
/// SAFETY: as [`tile`]; `p + 16 ≤ k`.
#[inline(always)]
unsafe fn step<T: Src, const R: usize, const M: usize>(
    mut acc: Acc<R, M>,
    a: *const f32,
    k: usize,
    rows: &[*const T; R],
    p: usize,
) -> Acc<R, M> {
    use std::arch::x86_64::*;
    let wv: [__m512; R] = std::array::from_fn(|r| load16::<T>(rows[r].add(p)));
    for (i, acc_i) in acc.iter_mut().enumerate() {
        let av = _mm512_loadu_ps(a.add(i * k + p));
        for (x, &v) in acc_i.iter_mut().zip(&wv) {
            *x = _mm512_fmadd_ps(av, v, *x);
        }
    }
    acc
}

/// [`dot_loop`] with bf16 products ([`Bf16Pairs`]): 32-element steps, A
/// and the weight rows as bf16 bit patterns, one `vdpbf16ps` per weight
/// vector and row of A.
///
/// SAFETY: as [`tile`], and the CPU must have AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")]
unsafe fn dot_loop_bf16<const R: usize, const M: usize>(
    a: *const u16,
    k: usize,
    rows: &[*const u16; R],
    pf: &Pf<R>,
) -> [Acc<R, M>; CHAINS] {
    use std::arch::x86_64::*;
    const STEP: usize = 2 * LANES;
    let full = k - k % STEP;
    let [mut c0, mut c1] = [[[_mm512_setzero_ps(); R]; M]; CHAINS];
    // One 64-byte line of each row per step: two per trip.
    let full2 = k - k % (CHAINS * STEP);
    let mut p = 0;
    while p < full2 {
        pf.trip(rows, p, p / (CHAINS * STEP), 2);
        c0 = step_bf16::<R, M>(c0, a, k, rows, p);
        c1 = step_bf16::<R, M>(c1, a, k, rows, p + STEP);
        p += CHAINS * STEP;
    }
    if p < full {
        c0 = step_bf16::<R, M>(c0, a, k, rows, p);
    }
    [c0, c1]
}

/// One 32-element step of [`dot_loop_bf16`] at `p`.
///
/// SAFETY: as [`dot_loop_bf16`]; `p + 32 ≤ k`.
#[inline(always)]
unsafe fn step_bf16<const R: usize, const M: usize>(
    mut acc: Acc<R, M>,
    a: *const u16,
    k: usize,
    rows: &[*const u16; R],
    p: usize,
) -> Acc<R, M> {
    use std::arch::x86_64::*;
    let wv: [__m512bh; R] = std::array::from_fn(|r| {
        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(rows[r].add(p) as *const __m512i))
    });
    for (i, acc_i) in acc.iter_mut().enumerate() {
        let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(a.add(i * k + p) as *const __m512i));
        for (x, &v) in acc_i.iter_mut().zip(&wv) {
            *x = _mm512_dpbf16_ps(*x, av, v);
        }
    }
    acc
}

/// One weight widened to f32 (exact).
#[inline(always)]
fn widen1<T: Src>(x: T) -> f32 {
    let mut buf = [0f32; 1];
    T::as_f32(&[x], &mut buf)[0]
}

/// Pairwise sum of the 16 lanes: lane l + lane l+8, then +4, +2, +1.
#[inline(always)]
fn hsum16(v: &[f32; LANES]) -> f32 {
    let mut t = *v;
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            t[l] += t[l + w];
        }
    }
    t[0]
}
