//! Floating-point throughput microbenchmark: the f32 multiply-add peak of one
//! thread on a given code path, which `qvc bench` runs on every pool thread
//! at once to measure the CPU's FMA ceiling (instead of computing it from a
//! nominal clock).
//!
//! Invariants: every accumulator is an independent dependency chain, and there
//! are more chains than the multiply-add latency × issue width of current x86
//! cores (4 cycles × 2 pipes = 8 vectors), so the loop is bound by throughput,
//! not latency; the inputs go through `black_box`, so the compiler cannot fold
//! the loop; the AVX2 path runs only after [`Isa::resolve`].

use crate::common::Isa;
use rayon::prelude::*;
use std::time::Instant;

/// The buffer [`read_bandwidth`] sums: 256 MiB, far past any cache, filled
/// in parallel (so its pages are spread over the threads' memory), in huge
/// pages where the OS gives them, as the weights decode streams are
/// ([`crate::pages`]): the floor must be measured on the same kind of
/// memory (4 KiB pages read 10-40% slower in a VM, where every TLB miss is
/// a nested page walk).
pub fn read_buffer() -> Vec<f32> {
    crate::pages::huge_vec(64 << 20, 1.0f32)
}

/// Read bandwidth in bytes/s: the best of `reps` sums of `buf` on every
/// pool thread, each chunk summed on the widest path the CPU has with
/// [`READ_CHAINS`] independent vector accumulators ([`sum_chunk`]). What
/// `qvc bench` and the kernel benches divide memory-bound timings by.
///
/// Why so many chains: one chain of 8-lane adds reads 32 bytes per add
/// latency (3-4 cycles), about 35-40 GB/s per core at 4 GHz, which a
/// modern core's DRAM stream can exceed; the probe then measured the add
/// latency, not memory, and every "fraction of the bandwidth floor" above it
/// was flattered.
pub fn read_bandwidth(buf: &[f32], reps: usize) -> f64 {
    let isa = Isa::Avx512.resolve();
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        let s: f32 = buf.par_chunks(1 << 16).map(|c| sum_chunk(isa, c)).sum();
        std::hint::black_box(s);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    std::mem::size_of_val(buf) as f64 / best
}

/// Independent vector accumulators of [`sum_chunk`]: past add latency ×
/// two load ports on current x86 cores.
const READ_CHAINS: usize = 8;

/// The sum of `c` on `isa` (resolved first): [`READ_CHAINS`] vectors of
/// accumulators, the ragged end added one by one.
pub fn sum_chunk(isa: Isa, c: &[f32]) -> f32 {
    match isa.resolve() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: resolve() returned Avx512, so the CPU has AVX-512F.
        Isa::Avx512 => unsafe { sum_chunk_avx512(c) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: resolve() returned Avx2Fma, so the CPU has AVX2.
        Isa::Avx2Fma => unsafe { sum_chunk_avx2(c) },
        _ => {
            let mut acc = [[0f32; 8]; READ_CHAINS];
            let mut blocks = c.chunks_exact(8 * READ_CHAINS);
            for b in &mut blocks {
                for (a, v) in acc.iter_mut().zip(b.chunks_exact(8)) {
                    for (x, y) in a.iter_mut().zip(v) {
                        *x += y;
                    }
                }
            }
            acc.iter().flatten().sum::<f32>() + blocks.remainder().iter().sum::<f32>()
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_chunk_avx512(c: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); READ_CHAINS];
    let mut blocks = c.chunks_exact(16 * READ_CHAINS);
    for b in &mut blocks {
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: b holds 16·READ_CHAINS floats.
            *a = _mm512_add_ps(*a, _mm512_loadu_ps(b.as_ptr().add(16 * i)));
        }
    }
    let s = acc.iter().fold(_mm512_setzero_ps(), |s, &a| _mm512_add_ps(s, a));
    _mm512_reduce_add_ps(s) + blocks.remainder().iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_chunk_avx2(c: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); READ_CHAINS];
    let mut blocks = c.chunks_exact(8 * READ_CHAINS);
    for b in &mut blocks {
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: b holds 8·READ_CHAINS floats.
            *a = _mm256_add_ps(*a, _mm256_loadu_ps(b.as_ptr().add(8 * i)));
        }
    }
    let s = acc.iter().fold(_mm256_setzero_ps(), |s, &a| _mm256_add_ps(s, a));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), s);
    lanes.iter().sum::<f32>() + blocks.remainder().iter().sum::<f32>()
}

/// Independent 8-lane accumulators of the AVX2 loop (12 of the 16 ymm
/// registers; two more hold the multiplier and the addend).
const AVX2_CHAINS: usize = 12;
/// Independent 16-lane accumulators of the AVX-512 loop (24 of the 32 zmm
/// registers: more than latency × pipes on any AVX-512 core, so the loop is
/// throughput-bound whether the core has one or two 512-bit FMA pipes).
const AVX512_CHAINS: usize = 24;
/// Independent 8-lane accumulators of the portable loop (each is two SSE
/// registers on the x86_64 baseline: 12 of 16).
const PORTABLE_CHAINS: usize = 6;

/// Runs `iters` trips of the multiply-add loop on `isa` (resolved first) on
/// the calling thread. Returns the floating-point operations done (a
/// multiply-add counts 2) and a value derived from every accumulator, which
/// the caller should pass to `black_box`.
pub fn fma_loop(isa: Isa, iters: usize) -> (u64, f32) {
    match isa.resolve() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: resolve() returned Avx2Fma, so the CPU has AVX2 and FMA.
        Isa::Avx2Fma => unsafe { fma_loop_avx2(iters) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: resolve() returned Avx512, so the CPU has AVX-512F.
        Isa::Avx512 => unsafe { fma_loop_avx512(iters) },
        _ => fma_loop_portable(iters),
    }
}

/// Flops per trip of [`fma_loop`] on `isa` (resolved first).
pub fn fma_loop_flops_per_iter(isa: Isa) -> u64 {
    match isa.resolve() {
        Isa::Avx2Fma => (AVX2_CHAINS * 8 * 2) as u64,
        Isa::Avx512 => (AVX512_CHAINS * 16 * 2) as u64,
        Isa::Portable => (PORTABLE_CHAINS * 8 * 2) as u64,
    }
}

/// Flops of one trip of [`bf16_dot_loop`]: 24 `vdpbf16ps` × 16 lanes × two
/// products (each product and its add count 2).
pub const BF16_DOT_FLOPS_PER_ITER: u64 = (AVX512_CHAINS * 16 * 4) as u64;

/// The bf16 analogue of [`fma_loop`], the ceiling of `--cpu-math fast`
/// GEMMs: `iters` trips of 24 independent `vdpbf16ps` chains on the calling
/// thread. Returns the flops done and a value to `black_box`; `(0, 0.0)`
/// where the CPU lacks AVX512-BF16 (see [`crate::gemm::bf16_products_native`]).
pub fn bf16_dot_loop(iters: usize) -> (u64, f32) {
    #[cfg(target_arch = "x86_64")]
    if crate::gemm::bf16_products_native() {
        // SAFETY: AVX-512F and AVX512-BF16 checked just above.
        return (iters as u64 * BF16_DOT_FLOPS_PER_ITER, unsafe { bf16_dot_loop_avx512(iters) });
    }
    let _ = iters;
    (0, 0.0)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_dot_loop_avx512(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    // Pairs of bf16 (0.5, 0.5) and (1e-3, 1e-3) reinterpreted from f32 bit patterns: the values
    // only need to stay finite.
    let x: __m512bh = std::mem::transmute(_mm512_set1_ps(std::hint::black_box(0.5)));
    let y: __m512bh = std::mem::transmute(_mm512_set1_ps(std::hint::black_box(1e-3)));
    let mut acc = [_mm512_setzero_ps(); AVX512_CHAINS];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = _mm512_dpbf16_ps(*a, x, y);
        }
    }
    let mut s = _mm512_setzero_ps();
    for a in acc {
        s = _mm512_add_ps(s, a);
    }
    _mm512_reduce_add_ps(s)
}

fn fma_loop_portable(iters: usize) -> (u64, f32) {
    let m = std::hint::black_box(0.999_999_f32);
    let c = std::hint::black_box(1e-7_f32);
    let mut acc = [[0f32; 8]; PORTABLE_CHAINS];
    for (i, a) in acc.iter_mut().enumerate() {
        *a = [i as f32 * 0.01; 8];
    }
    for _ in 0..iters {
        for a in acc.iter_mut() {
            for x in a.iter_mut() {
                *x = *x * m + c;
            }
        }
    }
    let s = acc.iter().flatten().sum();
    (iters as u64 * fma_loop_flops_per_iter(Isa::Portable), s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop_avx2(iters: usize) -> (u64, f32) {
    use std::arch::x86_64::*;
    let m = _mm256_set1_ps(std::hint::black_box(0.999_999_f32));
    let c = _mm256_set1_ps(std::hint::black_box(1e-7_f32));
    let mut acc = [_mm256_setzero_ps(); AVX2_CHAINS];
    for (i, a) in acc.iter_mut().enumerate() {
        *a = _mm256_set1_ps(i as f32 * 0.01);
    }
    for _ in 0..iters {
        // Unrolled by the compiler (constant trip count): 12 independent FMAs.
        for a in acc.iter_mut() {
            *a = _mm256_fmadd_ps(*a, m, c);
        }
    }
    let mut s = _mm256_setzero_ps();
    for a in acc {
        s = _mm256_add_ps(s, a);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), s);
    (iters as u64 * fma_loop_flops_per_iter(Isa::Avx2Fma), lanes.iter().sum())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_loop_avx512(iters: usize) -> (u64, f32) {
    use std::arch::x86_64::*;
    let m = _mm512_set1_ps(std::hint::black_box(0.999_999_f32));
    let c = _mm512_set1_ps(std::hint::black_box(1e-7_f32));
    let mut acc = [_mm512_setzero_ps(); AVX512_CHAINS];
    for (i, a) in acc.iter_mut().enumerate() {
        *a = _mm512_set1_ps(i as f32 * 0.01);
    }
    for _ in 0..iters {
        // Unrolled by the compiler (constant trip count): 24 independent FMAs.
        for a in acc.iter_mut() {
            *a = _mm512_fmadd_ps(*a, m, c);
        }
    }
    let mut s = _mm512_setzero_ps();
    for a in acc {
        s = _mm512_add_ps(s, a);
    }
    let mut lanes = [0f32; 16];
    _mm512_storeu_ps(lanes.as_mut_ptr(), s);
    (iters as u64 * fma_loop_flops_per_iter(Isa::Avx512), lanes.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both paths compute the same recurrence: x ← x·m + c from x₀ = i/100 on
    /// every lane, so the sum is checked against a scalar f64 evaluation, and
    /// the flop count is the trips times the per-trip constant.
    /// Every path sums exactly (small integers in f32), ragged lengths included.
    #[test]
    fn sum_chunk_is_the_sum_on_every_path() {
        for isa in Isa::ALL {
            for n in [0usize, 1, 7, 127, 128, 129, 1000, 4099] {
                let c: Vec<f32> = (0..n).map(|i| (i % 13) as f32).collect();
                let want: f32 = c.iter().sum();
                assert_eq!(sum_chunk(isa, &c), want, "{isa:?} n={n}");
            }
        }
    }

    #[test]
    fn both_paths_compute_the_recurrence_and_count_flops() {
        for isa in Isa::ALL {
            let (chains, lanes) = match isa.resolve() {
                Isa::Avx512 => (AVX512_CHAINS, 16),
                Isa::Avx2Fma => (AVX2_CHAINS, 8),
                Isa::Portable => (PORTABLE_CHAINS, 8),
            };
            let iters = 1000;
            let (flops, s) = fma_loop(isa, iters);
            assert_eq!(flops, iters as u64 * chains as u64 * lanes * 2, "{isa:?}");
            let want: f64 = (0..chains)
                .map(|i| {
                    let mut x = i as f64 * 0.01;
                    for _ in 0..iters {
                        x = x * 0.999_999 + 1e-7;
                    }
                    lanes as f64 * x
                })
                .sum();
            assert!(((s as f64) - want).abs() <= 1e-4 * want.abs().max(1.0), "{isa:?}: {s} vs {want}");
        }
    }
}
