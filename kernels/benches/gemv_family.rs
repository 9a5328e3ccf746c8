//! Decode GEMV (`gemm` with m ≤ 8 rows against a transposed `[out, in]`
//! bf16 weight: the dot path, `qvc_kernels::gemv` on AVX-512, exact and
//! with `--cpu-math fast`'s bf16 products) at
//! Qwen-VL-Chat's decoder shapes, as GB/s of weight bytes and as a fraction
//! of the read bandwidth measured in the same process on the same threads
//! (`qvc_kernels::peak::read_bandwidth`, best of 8, once before and once
//! after each shape; the fraction is of the larger, so it is conservative).
//!
//! Each shape cycles through enough copies of its weight to stream at least
//! 256 MiB (this CPU's L3 is 32 MiB), so every call reads from DRAM as in a
//! decode step. The paths this CPU has are interleaved call by call, so slow
//! phases of a shared machine hit them alike; best and median are printed.
//! Speed is printed, never asserted.
//!
//! Plain `main` (no criterion): `cargo bench -p qvc-kernels --bench
//! gemv_family`. Environment: `GEMV_SHAPES=4096x12288,11008x4096` (in×out),
//! `GEMV_M=1,8`, `GEMV_THREADS=2,1`, `GEMV_CALLS=60` (calls per path),
//! `GEMV_COPIES=1` (one copy: a weight that fits the caches then shows the
//! kernel's compute rate instead of DRAM's).

use half::bf16;
use qvc_ir::Elems;
use qvc_kernels::gemm::{bf16_products_native, gemm_with_math};
use qvc_kernels::{CpuMath, Isa, MatRef};
use rayon::prelude::*;
use std::time::Instant;

fn env_list<T: std::str::FromStr>(name: &str, default: &str) -> Vec<T> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// A random bf16 weight `[out, in]`, filled in parallel.
fn weight(out: usize, inp: usize, seed: usize) -> Vec<bf16> {
    let mut v = qvc_kernels::pages::huge_vec(out * inp, bf16::ZERO);
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, ch)| {
        for (e, x) in ch.iter_mut().enumerate() {
            let h = ((c << 16) + e + seed).wrapping_mul(2_654_435_761) % 1000;
            *x = bf16::from_f32(h as f32 / 1000.0 - 0.5);
        }
    });
    v
}

fn main() {
    let shapes: Vec<(usize, usize)> = std::env::var("GEMV_SHAPES")
        .unwrap_or_else(|_| "4096x12288,4096x4096,4096x22016,11008x4096,4096x151936".into())
        .split(',')
        .filter_map(|s| {
            let (a, b) = s.split_once('x')?;
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect();
    let ms: Vec<usize> = env_list("GEMV_M", "1,4,8");
    let threads: Vec<usize> = env_list("GEMV_THREADS", "2,1");
    let calls: usize = env_list("GEMV_CALLS", "60").first().copied().unwrap_or(60);
    // (label, path, math): the exact paths the CPU has, and `--cpu-math
    // fast` (bf16 products, `vdpbf16ps`) where it has AVX512-BF16.
    let mut paths: Vec<(&str, Isa, CpuMath)> = vec![("Avx512", Isa::Avx512, CpuMath::Exact)];
    if bf16_products_native() {
        paths.push(("fast-bf16", Isa::Avx512, CpuMath::Fast));
    }
    paths.push(("Avx2Fma", Isa::Avx2Fma, CpuMath::Exact));
    paths.retain(|p| p.1.available());
    let buf = qvc_kernels::peak::read_buffer();
    let labels: Vec<&str> = paths.iter().map(|p| p.0).collect();
    println!(
        "paths: {labels:?} (AVX-512: qvc_kernels::gemv, 16 lanes; fast-bf16: the same tiles with bf16 products; \
         AVX2: gemm's 8-lane tiles)"
    );
    for &(inp, out) in &shapes {
        let bytes = out * inp * 2;
        let copies = match env_list::<usize>("GEMV_COPIES", "").first() {
            Some(&c) => c.max(1),
            None => (256usize << 20).div_ceil(bytes).max(1),
        };
        let ws: Vec<Vec<bf16>> = (0..copies).map(|c| weight(out, inp, c)).collect();
        for &m in &ms {
            let x: Vec<f32> = (0..m * inp).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
            let mut y = vec![0f32; m * out];
            for &t in &threads {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().expect("thread pool");
                pool.install(|| {
                    let bw0 = qvc_kernels::peak::read_bandwidth(&buf, 8);
                    let mut times = vec![Vec::with_capacity(calls); paths.len()];
                    let mut next = 0;
                    for _ in 0..calls {
                        for (pi, &(_, isa, math)) in paths.iter().enumerate() {
                            next = (next + 1) % copies;
                            let w = MatRef::row_major(Elems::BF16(&ws[next]), out, inp).transposed();
                            let t0 = Instant::now();
                            gemm_with_math(isa, math, MatRef::row_major(Elems::F32(&x), m, inp), w, &mut y, false);
                            times[pi].push(t0.elapsed().as_secs_f64());
                        }
                    }
                    let bw1 = qvc_kernels::peak::read_bandwidth(&buf, 8);
                    let bw = bw0.max(bw1);
                    for (pi, (label, ..)) in paths.iter().enumerate() {
                        let mut s = times[pi].clone();
                        s.sort_by(f64::total_cmp);
                        let (best, med) = (s[0], s[s.len() / 2]);
                        let gbs = |sec: f64| bytes as f64 / sec / 1e9;
                        println!(
                            "{inp:>5}->{out:<6} m={m} t={t} {:<8} best {:6.3} ms {:5.1} GB/s {:4.0}%   median {:6.3} ms \
                             {:5.1} GB/s {:4.0}%   (read bw {:.1} / {:.1} GB/s)",
                            label,
                            best * 1e3,
                            gbs(best),
                            100.0 * gbs(best) * 1e9 / bw,
                            med * 1e3,
                            gbs(med),
                            100.0 * gbs(med) * 1e9 / bw,
                            bw0 / 1e9,
                            bw1 / 1e9
                        );
                    }
                });
            }
        }
    }
}
