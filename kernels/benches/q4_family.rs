//! CPU int4 (GPTQ) kernels at Qwen-VL-Chat's decoder widths, group 128.
//!
//! GEMV (decode, m = 1 and 8), exact (`--cpu-math exact`: f32 dequantized
//! in registers) and int8-activation (`--cpu-math fast`: VNNI integer
//! products, [`qvc_kernels::q4_i8`]): criterion's throughput is the bytes the kernel
//! reads from the weight ([`Q4Ref::bytes`]: nibbles, f16 scales, packed
//! zeros); it is memory-bound, so each shape also prints its GB/s as a
//! fraction of this machine's read bandwidth, measured here the way
//! `qvc bench` does (a vectorised sum over 256 MiB on every pool thread, best
//! of 12). GEMM (prefill, m = 300, at w1, c_proj and c_attn): criterion
//! counts flops; the printed lines give GFLOP/s next to the same GEMM with
//! bf16 weights (exact and `--cpu-math fast`), each as a fraction of the
//! measured f32 FMA peak
//! ([`qvc_kernels::peak::fma_loop`] on every thread at once, best of 10).
//!
//! Each decoder shape cycles through enough copies of its weight to stream
//! 128 MiB, so the weights come from DRAM as in a decode step (one 26 MB
//! matrix would otherwise sit in this CPU's 32 MiB L3). One extra row,
//! `l2_resident` (1024 → 2048, one 1.1 MB copy), shows the kernel's compute
//! rate when memory is not the limit.
//!
//! Speed is printed, never asserted. Weights are random (uniform nibbles and
//! zeros, act-order off: the published checkpoint's desc_act is false).
//! `Q4_BENCH_SHAPES=lm_head` (a substring of the shape names, or `gemm`),
//! `Q4_BENCH_M=1,2` and `Q4_BENCH_PATHS=int8` (a substring of the variant
//! labels) narrow the run; `Q4_BENCH_ORDER=tiled` (or `stored`) times one
//! word order only (each GEMV runs on both by default: the checkpoint's
//! stored order and the tiled order the loader puts it in).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::{bf16, f16};
use qvc_ir::{Elems, Q4Ref, Q4Words};
use qvc_kernels::gemm::gemm_with_math;
use qvc_kernels::q4::{q4_gemm_dequant, q4_gemv, q4_linear, tile_words, Q4Path};
use qvc_kernels::q4_i8::{q4_gemv_i8, Q4I8Path};
use qvc_kernels::{CpuMath, Isa, MatRef};
use rayon::prelude::*;
use std::hint::black_box;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const GROUP: usize = 128;

struct Weight {
    out: usize,
    inp: usize,
    qweight: Vec<u32>,
    qzeros: Vec<u32>,
    scales: Vec<f16>,
}

impl Weight {
    fn random(out: usize, inp: usize, seed: u64) -> Weight {
        let groups = inp.div_ceil(GROUP);
        let words = |n: usize, salt: u64| -> Vec<u32> {
            let mut v = qvc_kernels::pages::huge_vec(n, 0u32);
            v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, ch)| {
                let mut s = (seed ^ salt).wrapping_add(c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                for w in ch {
                    s ^= s >> 12;
                    s ^= s << 25;
                    s ^= s >> 27;
                    *w = (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32;
                }
            });
            v
        };
        let scales = (0..groups * out).map(|i| f16::from_f32(0.002 + (i % 97) as f32 * 1e-4)).collect();
        Weight { out, inp, qweight: words(inp / 8 * out, 1), qzeros: words(groups * out / 8, 2), scales }
    }

    fn view(&self) -> Q4Ref<'_> {
        Q4Ref::whole(self.out, self.inp, GROUP, &self.qweight, &self.qzeros, &self.scales, None)
    }
}

/// Read bandwidth in bytes/s, as `qvc bench` measures it: a vectorised sum
/// over 256 MiB on every pool thread, best of 12. Measured again next to
/// each shape, because other processes on a shared machine change it.
fn read_bandwidth() -> f64 {
    static BUF: OnceLock<Vec<f32>> = OnceLock::new();
    qvc_kernels::peak::read_bandwidth(BUF.get_or_init(qvc_kernels::peak::read_buffer), 12)
}

/// f32 FMA peak in flop/s on every pool thread at once, best of 10 × ~20 ms.
fn fma_peak() -> f64 {
    static PEAK: OnceLock<f64> = OnceLock::new();
    *PEAK.get_or_init(|| {
        use qvc_kernels::peak::fma_loop;
        let isa = Isa::detect();
        let probe = 200_000;
        let t0 = Instant::now();
        black_box(fma_loop(isa, probe));
        let iters = ((0.02 / (t0.elapsed().as_secs_f64().max(1e-9) / probe as f64)) as usize).max(probe);
        let mut best = 0f64;
        for _ in 0..10 {
            let t0 = Instant::now();
            let done: Vec<(u64, f32)> = rayon::broadcast(|_| fma_loop(isa, iters));
            let s = t0.elapsed().as_secs_f64();
            best = best.max(done.iter().map(|d| d.0).sum::<u64>() as f64 / s);
            black_box(&done);
        }
        eprintln!("measured f32 FMA peak: {:.1} GFLOP/s ({isa:?}, all threads, best of 10)", best / 1e9);
        best
    })
}

/// Best wall time of `reps` runs of `f` after one warm-up.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

/// One GEMV variant: the exact path (f32 dequantized in registers) or the
/// int8-activation path of `--cpu-math fast`.
#[derive(Clone, Copy)]
enum Variant {
    Exact(Q4Path),
    Int8(Q4I8Path),
}

impl Variant {
    fn label(self) -> String {
        match self {
            Variant::Exact(p) => format!("exact {p:?}"),
            Variant::Int8(p) => format!("int8 {p:?}"),
        }
    }
    fn run(self, x: &[f32], m: usize, w: &Q4Ref, y: &mut [f32]) {
        match self {
            Variant::Exact(p) => q4_linear(p, x, m, w, y, false),
            Variant::Int8(p) => q4_gemv_i8(p, x, m, w, y, false),
        }
    }
}

/// The variants timed at `m` rows: the best exact and int8 paths, and at
/// m = 1 the others this CPU has (for reference). `Q4_BENCH_PATHS=int8`
/// (or `exact`, or a path name) narrows them.
fn variants(m: usize) -> Vec<Variant> {
    let mut v: Vec<Variant> = Q4Path::ALL
        .into_iter()
        .filter(|p| p.available() && (m == 1 || *p == Q4Path::detect()))
        .map(Variant::Exact)
        .collect();
    v.extend(
        Q4I8Path::ALL.into_iter().filter(|p| p.available() && (m == 1 || *p == Q4I8Path::detect())).map(Variant::Int8),
    );
    v.retain(|v| std::env::var("Q4_BENCH_PATHS").map_or(true, |f| v.label().contains(&f)));
    v
}

fn bench_gemv(c: &mut Criterion) {
    let mut g = c.benchmark_group("q4_gemv");
    g.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    let shapes = [
        ("c_attn", 4096, 12288),
        ("attn_c_proj", 4096, 4096),
        ("w1", 4096, 11008),
        ("w1w2", 4096, 22016),
        ("c_proj_mlp", 11008, 4096),
        ("lm_head", 4096, 151_936),
        ("l2_resident", 1024, 2048),
    ];
    for (name, inp, out) in shapes {
        if std::env::var("Q4_BENCH_SHAPES").is_ok_and(|o| !name.contains(&o)) {
            continue;
        }
        // Enough copies to stream at least 128 MiB, cycled, so that the
        // weights come from DRAM as in a decode step (a 26 MB matrix would
        // otherwise be served from this CPU's 32 MiB L3).
        let first = Weight::random(out, inp, out as u64);
        let one = first.view().bytes();
        let copies = if name == "l2_resident" { 1 } else { (128usize << 20).div_ceil(one) };
        let mut ws = vec![first];
        ws.extend((1..copies).map(|c| Weight::random(out, inp, (out + c) as u64)));
        // Each copy in both word orders: as stored, and tiled as the
        // checkpoint loader regroups it for the CPU (`tile_words`).
        let t0 = Instant::now();
        let tiled: Vec<Vec<u32>> = ws.iter().map(|w| tile_words(&w.view()).expect("group 128 tiles")).collect();
        let tiled_mb = tiled.iter().map(|t| t.len() * 4).sum::<usize>() as f64 / 1e6;
        eprintln!(
            "q4 tile_words {name}: {tiled_mb:.0} MB of words regrouped in {:.1} ms ({:.1} GB/s, {} threads; what a \
             checkpoint's load pays once)",
            t0.elapsed().as_secs_f64() * 1e3,
            tiled_mb / 1e3 / t0.elapsed().as_secs_f64(),
            rayon::current_num_threads()
        );
        let orders: Vec<(&str, Vec<Q4Ref>)> = vec![
            ("stored", ws.iter().map(|w| w.view()).collect()),
            (
                "tiled",
                ws.iter().zip(&tiled).map(|(w, t)| Q4Ref { qweight: t, words: Q4Words::Tiled, ..w.view() }).collect(),
            ),
        ];
        let bytes = one;
        let mut next = 0usize;
        let mut pick = move || {
            next = (next + 1) % copies;
            next
        };
        let ms: Vec<usize> = std::env::var("Q4_BENCH_M")
            .map_or(vec![1, 8], |v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect());
        for m in ms {
            let x: Vec<f32> = (0..m * inp).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
            let mut y = vec![0f32; m * out];
            for (v, (order, qs)) in variants(m).into_iter().flat_map(|v| orders.iter().map(move |o| (v, o))) {
                if std::env::var("Q4_BENCH_ORDER").is_ok_and(|o| o != *order) {
                    continue;
                }
                let bw = read_bandwidth();
                let s = best_of(if name == "l2_resident" { 2000 } else { 40 }, || v.run(&x, m, &qs[pick()], &mut y));
                let gbs = bytes as f64 / s / 1e9;
                eprintln!(
                    "q4 gemv {name} {inp}->{out} m={m} {} {order}: {:.3} ms, {gbs:.1} GB/s of {:.1} MB = {:.0}% of the read \
                     bandwidth measured just before ({:.1} GB/s: 256 MiB sum, {} threads, best of 12)",
                    v.label(),
                    s * 1e3,
                    bytes as f64 / 1e6,
                    100.0 * gbs * 1e9 / bw,
                    bw / 1e9,
                    rayon::current_num_threads()
                );
                g.throughput(Throughput::Bytes(bytes as u64));
                g.bench_function(BenchmarkId::new(format!("{name}_m{m}"), format!("{} {order}", v.label())), |b| {
                    b.iter(|| v.run(black_box(&x), m, &qs[pick()], &mut y))
                });
            }
        }
    }
    g.finish();
}

fn bench_gemm(c: &mut Criterion) {
    if std::env::var("Q4_BENCH_SHAPES").is_ok_and(|o| o != "gemm") {
        return;
    }
    let peak = fma_peak();
    let mut g = c.benchmark_group("q4_gemm");
    g.sample_size(10).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_millis(500));
    let m = 300usize;
    let path = Q4Path::detect();
    // Prefill at the decoder's shapes, against the same GEMM with bf16
    // weights (the exact path, and the bf16-product path of
    // `--cpu-math fast`): int4 prefill should be no slower than bf16's.
    for (name, inp, out) in [("w1", 4096usize, 11008usize), ("c_proj_mlp", 11008, 4096), ("c_attn", 4096, 12288)] {
        let w = Weight::random(out, inp, 5);
        let q = w.view();
        let mut wd = vec![0f32; out * inp];
        qvc_kernels::q4::dequantize(&q, &mut wd);
        let wb: Vec<bf16> = wd.iter().map(|&v| bf16::from_f32(v)).collect();
        drop(wd);
        let x: Vec<f32> = (0..m * inp).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
        let mut y = vec![0f32; m * out];
        let flops = (2 * m * inp * out) as f64;
        let a = MatRef::row_major(Elems::F32(&x), m, inp);
        let b = MatRef::row_major(Elems::BF16(&wb), out, inp).transposed();
        let t_q4 = best_of(3, || q4_linear(path, &x, m, &q, &mut y, false));
        let t_bf = best_of(3, || gemm_with_math(Isa::detect(), CpuMath::Exact, a, b, &mut y, false));
        let t_bff = best_of(3, || gemm_with_math(Isa::detect(), CpuMath::Fast, a, b, &mut y, false));
        let rate =
            |t: f64| format!("{:.1} ms, {:.0} GFLOP/s = {:.0}%", t * 1e3, flops / t / 1e9, 100.0 * flops / t / peak);
        eprintln!(
            "q4 gemm {name} m={m} {inp}->{out} ({} threads): int4 exact {path:?} {} | bf16 exact {} | bf16 fast {} \
             (% of the measured FMA peak)",
            rayon::current_num_threads(),
            rate(t_q4),
            rate(t_bf),
            rate(t_bff)
        );
        if name == "w1" {
            // Where the dequantizing path starts to beat the GEMV path (which
            // re-reads the weight once per 8 rows but never writes it out).
            for mm in [8usize, 16, 24, 32, 64] {
                let (xs, mut ys) = (&x[..mm * inp], vec![0f32; mm * out]);
                let t_gemv = best_of(3, || q4_gemv(path, xs, mm, &q, &mut ys, false));
                let t_deq = best_of(3, || q4_gemm_dequant(path, xs, mm, &q, &mut ys, false));
                eprintln!(
                    "q4 m={mm} {inp}->{out} {path:?}: gemv path {:.1} ms, dequantize+gemm path {:.1} ms",
                    t_gemv * 1e3,
                    t_deq * 1e3
                );
            }
            g.throughput(Throughput::Elements(flops as u64));
            g.bench_function(BenchmarkId::new(format!("m{m}_{inp}x{out}"), format!("{path:?}")), |bch| {
                bch.iter(|| q4_linear(path, black_box(&x), m, &q, &mut y, false))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_gemv, bench_gemm);
criterion_main!(benches);
