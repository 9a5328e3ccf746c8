//! One query against many keys (a decode step): flash-decoding.
//!
//! The block path of [`super`] gives each task one head and walks its keys,
//! so a decode step read each head's 512-byte slice of a cached token row
//! and jumped 16 KiB (heads·d f32) to the next: one demand miss after
//! another, since a stride of several pages is not something the hardware
//! prefetcher follows. With 300 cached tokens that was 0.8 ms a layer on
//! 2 Zen 4 cores, 5% of a bf16 decode step.
//!
//! Here a task is a chunk of [`CHUNK`] consecutive keys for every head, so
//! it reads the chunk's key rows, then its value rows, each one contiguous
//! run of memory (the cache is `[tokens, heads, d]`). It scores its keys
//! (four at a time against each head's query), takes each head's maximum,
//! and sums `exp(s − max)` and `exp(s − max)·v` over them. Tasks run in
//! parallel; then every head merges the chunks in key order, rescaling each
//! to the common maximum. A first version that also split the heads into
//! groups (more tasks at short lengths, each row read in 4 KiB pieces) took
//! 0.80 ms a layer at 300 cached tokens from DRAM, whole rows in chunks of
//! 32 keys 0.55 ms (`decode_family`'s `attention_with_past_cpu`, before the
//! dot products below were written with explicit vectors: 0.34 ms).
//!
//! Arithmetic: score `s_j = (Σ q·k) · scale`, each dot product in 16 lanes
//! (element `p` in lane `p mod 16`, whole 16-element steps; the lanes then
//! added pairwise, then the tail one by one); per chunk `p_j = exp(s_j −
//! m_c)`, `l_c = Σ p_j` (8 lanes, as the softmax kernels), `o_c = Σ p_j·v_j`
//! in key order; merged `o = Σ_c o_c·exp(m_c − m)`, `l` the same, `out = o /
//! l`. Only the chunk boundaries (fixed multiples of [`CHUNK`] from the
//! first key) and the key order enter, never the thread count, so a
//! sequence's output is the same whatever else runs.
//! Multiply-adds are fused on the AVX2 and AVX-512 paths and separate on
//! the portable one.

use super::{AttnArgs, Past};
use crate::act::exp_f32;
use crate::common::{worth_parallel, Isa};
use crate::softmax::{exp_sub_sum, row_max};

/// Keys per task: its scores (`heads × CHUNK`) stay in L1, and at a few
/// hundred cached tokens there are still ten or more chunks to spread over
/// the threads (at 16–64 cores a short cache leaves some idle; the step is
/// bound by the GEMVs, which split over every core).
const CHUNK: usize = 32;

/// Lanes of each dot product (see the module doc).
const LANES: usize = 16;

/// One task's result: per head the chunk's max score, the sum
/// of its `exp(s − max)`, and their `exp(s − max)`-weighted sum of values.
struct Partial {
    m: Vec<f32>,
    l: Vec<f32>,
    /// `[heads, d]`.
    o: Vec<f32>,
}

/// `out[0, h, :]` for every head: the single query of `a` (`a.tq == 1`)
/// against every key it sees, `past` first.
pub(super) fn decode(isa: Isa, a: &AttnArgs, past: Past, out: &mut [f32]) {
    debug_assert_eq!(a.tq, 1);
    let (heads, d) = (a.heads, a.d);
    let n = a.visible(0);
    if n == 0 {
        // No key to see: zeros, as on the block path.
        out.fill(0.0);
        return;
    }
    let chunks = n.div_ceil(CHUNK);
    let parallel = worth_parallel(4 * n * heads * d);
    let task = |c: usize| {
        let keys = c * CHUNK..((c + 1) * CHUNK).min(n);
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` is resolved, so the CPU has these features.
            Isa::Avx512 => unsafe { chunk_avx512(a, past, keys) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2Fma => unsafe { chunk_avx2(a, past, keys) },
            _ => chunk::<PORTABLE>(a, past, keys),
        }
    };
    let parts: Vec<Partial> = if parallel {
        use rayon::prelude::*;
        (0..chunks).into_par_iter().map(task).collect()
    } else {
        (0..chunks).map(task).collect()
    };
    for h in 0..heads {
        let m = parts.iter().map(|p| p.m[h]).fold(f32::NEG_INFINITY, f32::max);
        let o = &mut out[h * d..(h + 1) * d];
        o.fill(0.0);
        let mut l = 0f32;
        for p in &parts {
            let w = exp_f32(p.m[h] - m);
            l += p.l[h] * w;
            for (x, &y) in o.iter_mut().zip(&p.o[h * d..(h + 1) * d]) {
                *x += y * w;
            }
        }
        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
        o.iter_mut().for_each(|x| *x *= inv);
    }
}

/// SAFETY: the CPU must have AVX-512F, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn chunk_avx512(a: &AttnArgs, past: Past, keys: std::ops::Range<usize>) -> Partial {
    chunk::<AVX512>(a, past, keys)
}

/// SAFETY: the CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_avx2(a: &AttnArgs, past: Past, keys: std::ops::Range<usize>) -> Partial {
    chunk::<AVX2>(a, past, keys)
}

/// Which code a [`chunk`] is compiled for (a const parameter, so that each
/// entry point inlines its own dot product).
const PORTABLE: u8 = 0;
const AVX2: u8 = 1;
const AVX512: u8 = 2;

/// Keys `keys` for every head (see [`Partial`]). For `AVX2` and
/// `AVX512` the caller must have enabled those features.
#[inline(always)]
fn chunk<'a, const ISA: u8>(a: &AttnArgs<'a>, past: Past<'a>, keys: std::ops::Range<usize>) -> Partial {
    let (d, hd, nh, kb) = (a.d, a.heads * a.d, a.heads, keys.len());
    // Key j's row (every head) in the cache or among the new keys.
    let at = |j: usize| {
        if j < past.len {
            (true, j * hd)
        } else {
            (false, (j - past.len) * a.kv_stride)
        }
    };
    let q = &a.q[..hd];
    // The chunk's keys four at a time: (offset in the chunk, how many
    // are real, their rows in the cache `buf_past` or the new `buf_new`),
    // the last real row repeated where fewer than four are left.
    let quads = |buf_past: &'a [f32], buf_new: &'a [f32]| {
        (0..kb).step_by(4).map(move |jj| {
            let n4 = (kb - jj).min(4);
            let rows: [&'a [f32]; 4] = std::array::from_fn(|i| match at(keys.start + jj + i.min(n4 - 1)) {
                (true, o) => &buf_past[o..o + nh * d],
                (false, o) => &buf_new[o..o + nh * d],
            });
            (jj, n4, rows)
        })
    };
    // Scores, one row of kb per head, four keys at a time (four
    // independent dot products per head; each key row read once).
    let mut s = vec![0f32; nh * kb];
    for (jj, n4, k) in quads(past.k, a.k) {
        for h in 0..nh {
            let hs = h * d..(h + 1) * d;
            let dots = dot4::<ISA>(&q[hs.clone()], k.map(|k| &k[hs.clone()]));
            for (i, &x) in dots.iter().enumerate().take(n4) {
                s[h * kb + jj + i] = x * a.scale;
            }
        }
    }
    let (mut m, mut l) = (vec![0f32; nh], vec![0f32; nh]);
    for h in 0..nh {
        let sr = &mut s[h * kb..(h + 1) * kb];
        m[h] = row_max(sr);
        l[h] = exp_sub_sum(sr, m[h]);
    }
    // o += p·v in key order; four keys per pass over o (the same sums as
    // one key at a time, with a quarter of the loads and stores of o).
    let mut o = vec![0f32; nh * d];
    for (jj, n4, v) in quads(past.v, a.v) {
        for h in 0..nh {
            let hs = h * d..(h + 1) * d;
            let p: [f32; 4] = std::array::from_fn(|i| s[h * kb + jj + i.min(n4 - 1)]);
            let (v0, v1, v2, v3) = (&v[0][hs.clone()], &v[1][hs.clone()], &v[2][hs.clone()], &v[3][hs.clone()]);
            let o = &mut o[hs];
            match n4 {
                4 => {
                    for ((((x, &a0), &a1), &a2), &a3) in o.iter_mut().zip(v0).zip(v1).zip(v2).zip(v3) {
                        *x = madd::<ISA>(
                            p[3],
                            a3,
                            madd::<ISA>(p[2], a2, madd::<ISA>(p[1], a1, madd::<ISA>(p[0], a0, *x))),
                        );
                    }
                }
                n => {
                    for (i, vi) in [v0, v1, v2].into_iter().enumerate().take(n) {
                        for (x, &y) in o.iter_mut().zip(vi) {
                            *x = madd::<ISA>(p[i], y, *x);
                        }
                    }
                }
            }
        }
    }
    Partial { m, l, o }
}

/// `a·b + c`, fused except on the portable path (the others enabled FMA).
#[inline(always)]
fn madd<const ISA: u8>(a: f32, b: f32, c: f32) -> f32 {
    if ISA != PORTABLE {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Σ x·y in [`LANES`] lanes, the lanes added pairwise (l + l+8, then +4,
/// +2, +1), then the tail one by one: the same sums on every path, fused
/// multiply-adds except on the portable one.
#[inline(always)]
fn dot<const ISA: u8>(x: &[f32], y: &[f32]) -> f32 {
    assert_eq!(x.len(), y.len());
    let full = x.len() - x.len() % LANES;
    #[cfg(target_arch = "x86_64")]
    if ISA != PORTABLE {
        // SAFETY: `chunk`'s caller enabled the features ISA names; every
        // load lies below `full ≤ len` of both slices.
        let s = unsafe {
            if ISA == AVX512 {
                dot16_avx512(x.as_ptr(), y.as_ptr(), full)
            } else {
                dot16_avx2(x.as_ptr(), y.as_ptr(), full)
            }
        };
        return (full..x.len()).fold(s, |s, p| madd::<ISA>(x[p], y[p], s));
    }
    let mut acc = [0f32; LANES];
    for (xc, yc) in x[..full].chunks_exact(LANES).zip(y[..full].chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += xc[l] * yc[l];
        }
    }
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    (full..x.len()).fold(acc[0], |s, p| madd::<ISA>(x[p], y[p], s))
}

/// [`dot`] of `x` with four vectors at once (four independent chains).
#[inline(always)]
fn dot4<const ISA: u8>(x: &[f32], y: [&[f32]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if ISA == AVX512 {
        let full = x.len() - x.len() % LANES;
        assert!(y.iter().all(|y| y.len() == x.len()));
        // SAFETY: as in `dot`.
        let s = unsafe { dot16x4_avx512(x.as_ptr(), y.map(|y| y.as_ptr()), full) };
        return std::array::from_fn(|i| (full..x.len()).fold(s[i], |s, p| madd::<ISA>(x[p], y[i][p], s)));
    }
    y.map(|y| dot::<ISA>(x, y))
}

/// Four [`dot16_avx512`]s sharing the loads of `x`.
///
/// SAFETY: as [`dot16_avx512`], for `x` and every `y`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot16x4_avx512(x: *const f32, y: [*const f32; 4], full: usize) -> [f32; 4] {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 4];
    for p in (0..full).step_by(LANES) {
        let xv = _mm512_loadu_ps(x.add(p));
        for (a, y) in acc.iter_mut().zip(y) {
            *a = _mm512_fmadd_ps(xv, _mm512_loadu_ps(y.add(p)), *a);
        }
    }
    acc.map(|a| hsum16(a))
}

/// The first `full` (a multiple of 16) products of [`dot`], one zmm.
///
/// SAFETY: AVX-512F enabled by the caller; `x` and `y` readable for `full`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot16_avx512(x: *const f32, y: *const f32, full: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm512_setzero_ps();
    for p in (0..full).step_by(LANES) {
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(x.add(p)), _mm512_loadu_ps(y.add(p)), acc);
    }
    hsum16(acc)
}

/// Lanes of a zmm added pairwise: l + l+8, then [`hsum8`].
///
/// SAFETY: AVX-512F enabled by the caller.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hsum16(a: std::arch::x86_64::__m512) -> f32 {
    use std::arch::x86_64::*;
    let lo = _mm512_castps512_ps256(a);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
    hsum8(_mm256_add_ps(lo, hi))
}

/// [`dot16_avx512`] with lanes 0-7 and 8-15 in two ymm.
///
/// SAFETY: AVX2 and FMA enabled by the caller; `x` and `y` readable for `full`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot16_avx2(x: *const f32, y: *const f32, full: usize) -> f32 {
    use std::arch::x86_64::*;
    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for p in (0..full).step_by(LANES) {
        lo = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(p)), _mm256_loadu_ps(y.add(p)), lo);
        hi = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(p + 8)), _mm256_loadu_ps(y.add(p + 8)), hi);
    }
    hsum8(_mm256_add_ps(lo, hi))
}

/// Lanes of a ymm added pairwise: l + l+4, then +2, then +1.
///
/// SAFETY: AVX enabled by the caller.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hsum8(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
    _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)))
}
