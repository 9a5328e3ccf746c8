//! Timings of the fast kernels at Qwen-VL-Chat's real GEMM shapes, as
//! fractions of ceilings measured in the same run (not a benchmark suite:
//! `benches/` is). Run:
//! `RAYON_NUM_THREADS=2 cargo run -p qvc-kernels --release --example kernel_speed [-- quick] [-- portable] [-- fast]`
//! (`fast`: only the `CpuMath::Fast` section, bf16 products against the exact path).
//!
//! For every code path the CPU has (AVX-512, AVX2+FMA; portable only when
//! asked: it is slow): the FMA peak of that path on all pool threads at once
//! and on one thread (`qvc_kernels::peak`, best of 10 × ~20 ms), then each GEMM (f32
//! activations × a bf16 `[out, in]` weight, as the Linear layers run it)
//! in GFLOP/s and as a fraction of that peak, and the decode GEMV (one and
//! eight rows × a bf16 weight too big for the caches) in GB/s of weight
//! read and as a fraction of the measured read bandwidth (a 256 MiB sum).
//! The load average is printed first and last: the machine is shared, and
//! a busy neighbour lowers every number. GEMMs are also given per CPU-second
//! of the pool's threads (Linux schedstat), against one thread's peak: what
//! a core does while it runs, whatever the neighbours take.

use half::bf16;
use qvc_ir::Elems;
use qvc_kernels::gemm::gemm_with_math;
use qvc_kernels::peak::{fma_loop, fma_loop_flops_per_iter};
use qvc_kernels::*;
use rayon::prelude::*;
use std::time::Instant;

/// Best of `reps` runs of `f`, in seconds.
fn best(reps: usize, f: impl FnMut()) -> f64 {
    best_wall_cpu(reps, f).0
}

/// CPU time this process's threads have run, in seconds (Linux
/// `/proc/self/task/*/schedstat`, nanoseconds; 0 elsewhere).
fn cpu_time() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return 0.0 };
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum::<u64>() as f64
        * 1e-9
}

/// Best of `reps` runs of `f`: (wall seconds, CPU seconds of all threads).
/// On a shared machine the CPU time shows what the kernel does while it
/// runs, the wall time also what neighbours took from it.
fn best_wall_cpu(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    f(); // warm-up: page faults, thread-pool start
    (0..reps)
        .map(|_| {
            let (t, c) = (Instant::now(), cpu_time());
            f();
            (t.elapsed().as_secs_f64(), cpu_time() - c)
        })
        .fold((f64::INFINITY, f64::INFINITY), |(w, c), (w1, c1)| (w.min(w1), c.min(c1)))
}

fn data(n: usize, seed: u32) -> Vec<f32> {
    // Cheap deterministic values in [-1, 1].
    (0..n)
        .into_par_iter()
        .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1u32 << 23) as f32 - 1.0)
        .collect()
}

fn bf16_data(n: usize, seed: u32) -> Vec<bf16> {
    data(n, seed).into_par_iter().map(bf16::from_f32).collect()
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.trim().to_string()).unwrap_or_else(|_| "?".into())
}

/// f32 FMA peak of `isa` on one thread (the calling one) per second of
/// that thread's CPU time (so a busy neighbour does not lower it), GFLOP/s:
/// best of 5 runs of ~200 ms (the kernel accounts CPU time in ticks).
fn fma_peak_one(isa: Isa) -> f64 {
    let thread_cpu = || {
        std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .map(|ns| ns as f64 * 1e-9)
    };
    let iters = (200e-3 * 250e9) as usize / fma_loop_flops_per_iter(isa) as usize;
    (0..5)
        .map(|_| {
            let (t0, c0) = (Instant::now(), thread_cpu());
            let (flops, s) = fma_loop(isa, iters);
            std::hint::black_box(s);
            let secs = match (c0, thread_cpu()) {
                (Some(c0), Some(c1)) if c1 > c0 => c1 - c0,
                _ => t0.elapsed().as_secs_f64(),
            };
            flops as f64 / secs / 1e9
        })
        .fold(0.0, f64::max)
}

/// f32 FMA peak of `isa` on every pool thread at once, GFLOP/s.
fn fma_peak(isa: Isa) -> f64 {
    let probe = 200_000;
    let t0 = Instant::now();
    std::hint::black_box(fma_loop(isa, probe));
    let per_trip = t0.elapsed().as_secs_f64().max(1e-9) / probe as f64;
    let iters = ((0.02 / per_trip) as usize).clamp(probe, 1 << 32);
    let mut peak = 0f64;
    for _ in 0..10 {
        let t0 = Instant::now();
        let done: Vec<(u64, f32)> = rayon::broadcast(|_| fma_loop(isa, iters));
        let s = t0.elapsed().as_secs_f64();
        std::hint::black_box(&done);
        peak = peak.max(done.iter().map(|d| d.0).sum::<u64>() as f64 / s / 1e9);
    }
    peak
}

/// A peak loop of `qvc_kernels::peak` shape: iterations in, (flops, value to keep) out.
type PeakLoop = fn(usize) -> (u64, f32);

/// The bf16 peak of `run_loop` (`vdpbf16ps` chains or AMX tiles), GFLOP/s:
/// on every pool thread at once (wall time, best of 10 × ~20 ms), and on
/// one thread per second of its CPU time (best of 5 × ~200 ms), as for the
/// FMA peaks.
fn dpbf16_peaks(run_loop: PeakLoop) -> (f64, f64) {
    let probe = 200_000;
    let t0 = Instant::now();
    std::hint::black_box(run_loop(probe));
    let per_trip = t0.elapsed().as_secs_f64().max(1e-9) / probe as f64;
    let iters = ((0.02 / per_trip) as usize).clamp(probe, 1 << 32);
    let mut all = 0f64;
    for _ in 0..10 {
        let t0 = Instant::now();
        let done: Vec<(u64, f32)> = rayon::broadcast(|_| run_loop(iters));
        let s = t0.elapsed().as_secs_f64();
        std::hint::black_box(&done);
        all = all.max(done.iter().map(|d| d.0).sum::<u64>() as f64 / s / 1e9);
    }
    let one = (0..5)
        .map(|_| {
            let (t0, c0) = (Instant::now(), thread_cpu());
            let (flops, v) = run_loop(10 * iters);
            std::hint::black_box(v);
            let secs = match (c0, thread_cpu()) {
                (Some(c0), Some(c1)) if c1 > c0 => c1 - c0,
                _ => t0.elapsed().as_secs_f64(),
            };
            flops as f64 / secs / 1e9
        })
        .fold(0.0, f64::max);
    (all, one)
}

/// CPU seconds the calling thread has run (Linux), if known.
fn thread_cpu() -> Option<f64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map(|ns| ns as f64 * 1e-9)
}

/// Read bandwidth: a vectorised sum over 256 MiB on the pool, best of 12, GB/s.
fn read_bandwidth() -> f64 {
    qvc_kernels::peak::read_bandwidth(&qvc_kernels::peak::read_buffer(), 12) / 1e9
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "quick");
    // `fast`: only the CpuMath::Fast section (with its exact comparison).
    let fast_only = args.iter().any(|a| a == "fast");
    let mut isas: Vec<Isa> = [Isa::Avx512, Isa::Avx2Fma].into_iter().filter(|i| i.available()).collect();
    if args.iter().any(|a| a == "portable") {
        isas.push(Isa::Portable);
    }
    println!(
        "threads: {}, detected isa: {:?}, L2 per core: {} KiB, load: {}",
        rayon::current_num_threads(),
        Isa::detect(),
        qvc_kernels::gemm::l2_bytes() / 1024,
        load()
    );
    let bw = read_bandwidth();
    println!("read bandwidth: {bw:.1} GB/s (256 MiB sum, best of 12)");

    // (name, m, n = out, k = in): ViT-bigG at one 448 picture (1024
    // patches), the decoder at a 300-token prefill.
    let mut shapes = vec![
        ("vit c_fc", 1024, 8192, 1664),
        ("vit c_proj", 1024, 1664, 8192),
        ("vit in_proj", 1024, 4992, 1664),
        ("llm c_attn", 300, 12288, 4096),
        ("llm attn c_proj", 300, 4096, 4096),
        ("llm w1/w2", 300, 11008, 4096),
        ("llm c_proj(mlp)", 300, 4096, 11008),
    ];
    if quick {
        shapes.truncate(1);
        shapes.push(("llm c_attn", 300, 12288, 4096));
    }
    let weights: Vec<Vec<bf16>> = shapes.iter().map(|&(_, _, n, k)| bf16_data(n * k, 4)).collect();
    let acts: Vec<Vec<f32>> = shapes.iter().map(|&(_, m, _, k)| data(m * k, 3)).collect();
    let threads = rayon::current_num_threads();
    for &isa in isas.iter().filter(|_| !fast_only) {
        let peak = fma_peak(isa);
        let peak1 = fma_peak_one(isa);
        println!("{isa:?}: FMA peak {peak:.1} GFLOP/s on {threads} threads at once, {peak1:.1} per CPU-second of one");
        for (((name, m, n, k), w), x) in shapes.iter().zip(&weights).zip(&acts) {
            let (m, n, k) = (*m, *n, *k);
            let mut y = vec![0.0; m * n];
            let (t, cpu) = best_wall_cpu(3, || {
                gemm_with_isa(
                    isa,
                    MatRef::row_major(Elems::F32(x), m, k),
                    MatRef::row_major(Elems::BF16(w), n, k).transposed(),
                    &mut y,
                    false,
                )
            });
            let flops = gemm_flops(m, n, k) as f64;
            let gf = flops / t / 1e9;
            // Per CPU-second of the pool's threads, against one thread's peak:
            // what a core does while it runs this GEMM.
            let gf_cpu = flops / cpu / 1e9;
            println!(
                "  gemm {name:<16} {m}x{k} · ({n}x{k})ᵀ bf16: {:7.1} ms {gf:6.1} GFLOP/s = {:.3} of peak \
                 (per CPU-second: {gf_cpu:5.1} = {:.3} of one thread's peak)",
                t * 1e3,
                gf / peak,
                gf_cpu / peak1
            );
        }
        // Decode: the widest decoder weights, streamed from DRAM on every call.
        for &(m, n, k) in &[(1, 12288, 4096), (8, 12288, 4096), (1, 4096, 11008)] {
            let w = bf16_data(n * k, 5);
            let x = data(m * k, 6);
            let mut y = vec![0.0; m * n];
            let t = best(10, || {
                gemm_with_isa(
                    isa,
                    MatRef::row_major(Elems::F32(&x), m, k),
                    MatRef::row_major(Elems::BF16(&w), n, k).transposed(),
                    &mut y,
                    false,
                )
            });
            let gbs = (n * k * 2) as f64 / t / 1e9;
            println!(
                "  gemv {m}x{k} · ({n}x{k})ᵀ bf16: {:6.2} ms {gbs:5.1} GB/s = {:.3} of read bandwidth",
                t * 1e3,
                gbs / bw
            );
        }
    }
    // `--cpu-math fast`: bf16 activations × bf16 weights (AMX tiles where
    // the CPU has them, else `vdpbf16ps`), against the measured peak of the
    // instruction they run on (`vdpbf16ps`: two products per f32 lane, so
    // nominally twice the FMA peak; measured, since cores differ) and
    // against the exact AVX-512 path on the same shape. Per CPU-second
    // figures too: on a shared machine the wall-clock ones mostly measure
    // the neighbours.
    if qvc_kernels::gemm::bf16_products_native() {
        let amx = qvc_kernels::gemm::amx::available();
        let (name, run_loop): (&str, PeakLoop) = if amx {
            ("AMX tdpbf16ps", qvc_kernels::gemm::amx::dot_loop)
        } else {
            ("vdpbf16ps", qvc_kernels::peak::bf16_dot_loop)
        };
        let (peak, peak1) = dpbf16_peaks(run_loop);
        let (peak_fma, peak_fma1) = (fma_peak(Isa::Avx512), fma_peak_one(Isa::Avx512));
        println!(
            "CpuMath::Fast (bf16 products, {name}) on {threads} threads, load {}: {name} peak {peak:.1} GFLOP/s \
             on all threads at once, {peak1:.1} per CPU-second of one ({:.2}x the f32 FMA peak {peak_fma:.1} / {peak_fma1:.1})",
            load(),
            peak1 / peak_fma1
        );
        for (((name, m, n, k), w), x) in shapes.iter().zip(&weights).zip(&acts) {
            let (m, n, k) = (*m, *n, *k);
            let mut y = vec![0.0; m * n];
            let (am, bm) =
                (MatRef::row_major(Elems::F32(x), m, k), MatRef::row_major(Elems::BF16(w), n, k).transposed());
            let (t, cpu) = best_wall_cpu(3, || gemm_with_math(Isa::Avx512, CpuMath::Fast, am, bm, &mut y, false));
            let (te, cpue) = best_wall_cpu(3, || gemm_with_math(Isa::Avx512, CpuMath::Exact, am, bm, &mut y, false));
            let flops = gemm_flops(m, n, k) as f64 / 1e9;
            println!(
                "  {name:<16} {m}x{k} · ({n}x{k})ᵀ bf16: fast {:6.1} ms {:6.1} GFLOP/s = {:.3} of the bf16 peak \
                 (per CPU-s {:6.1} = {:.3} of one thread's); exact {:6.1} ms {:6.1} GFLOP/s = {:.3} of the FMA peak \
                 (per CPU-s {:6.1} = {:.3}); fast/exact {:.2}x (per CPU-s {:.2}x)",
                t * 1e3,
                flops / t,
                flops / t / peak,
                flops / cpu,
                flops / cpu / peak1,
                te * 1e3,
                flops / te,
                flops / te / peak_fma,
                flops / cpue,
                flops / cpue / peak_fma1,
                te / t,
                cpue / cpu
            );
        }
    }
    println!("load at the end: {}", load());
}
