//! Quick timings of the fast kernels (not a benchmark suite: `benches/cpu.rs`
//! is). Run: `cargo run -p qvc-kernels --release --example kernel_speed`.

use half::bf16;
use qvc_ir::Elems;
use qvc_kernels::*;
use std::time::Instant;

/// Best of `reps` runs of `f`, in seconds.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up: page faults, thread-pool start
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn data(n: usize, seed: u32) -> Vec<f32> {
    // Cheap deterministic values in [-1, 1].
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1u32 << 23) as f32 - 1.0)
        .collect()
}

fn main() {
    println!("threads: {}, isa: {:?}", rayon::current_num_threads(), Isa::detect());
    for isa in [Isa::detect(), Isa::Portable] {
        // 512³ f32, both row-major.
        let (m, n, k) = (512, 512, 512);
        let (a, b) = (data(m * k, 1), data(k * n, 2));
        let mut c = vec![0.0; m * n];
        let t = best(5, || {
            gemm_with_isa(
                isa,
                MatRef::row_major(Elems::F32(&a), m, k),
                MatRef::row_major(Elems::F32(&b), k, n),
                &mut c,
                false,
            )
        });
        println!("{isa:?} gemm 512x512x512 f32: {:.1} GFLOP/s", gemm_flops(m, n, k) as f64 / t / 1e9);

        // Linear layer: 256 tokens × W[4096 out, 4096 in] bf16.
        let (m, n, k) = (256, 4096, 4096);
        let x = data(m * k, 3);
        let w: Vec<bf16> = data(n * k, 4).into_iter().map(bf16::from_f32).collect();
        let mut y = vec![0.0; m * n];
        let t = best(2, || {
            gemm_with_isa(
                isa,
                MatRef::row_major(Elems::F32(&x), m, k),
                MatRef::row_major(Elems::BF16(&w), n, k).transposed(),
                &mut y,
                false,
            )
        });
        println!("{isa:?} gemm 256x4096x4096 bf16 W^T: {:.1} GFLOP/s", gemm_flops(m, n, k) as f64 / t / 1e9);

        // Decode GEMV: 1 × W[4096, 4096] bf16.
        let t = best(5, || {
            gemm_with_isa(
                isa,
                MatRef::row_major(Elems::F32(&x[..k]), 1, k),
                MatRef::row_major(Elems::BF16(&w), n, k).transposed(),
                &mut y[..n],
                false,
            )
        });
        println!("{isa:?} gemv 1x4096x4096 bf16 W^T: {:.2} ms, {:.1} GB/s", t * 1e3, (n * k * 2) as f64 / t / 1e9);

        // Vision attention: tq = tk = 1024, 16 heads, d 104.
        let (tq, heads, d) = (1024, 16, 104);
        let qkv = data(tq * 3 * heads * d, 5);
        let hd = heads * d;
        let args = AttnArgs {
            q: &qkv,
            q_stride: 3 * hd,
            k: &qkv[hd..],
            v: &qkv[2 * hd..],
            kv_stride: 3 * hd,
            tq,
            tk: tq,
            heads,
            d,
            scale: 0.1,
            mask: Mask::None,
        };
        let mut out = vec![0.0; tq * hd];
        let t = best(2, || attention_with_isa(isa, &args, &mut out));
        println!(
            "{isa:?} attention 1024x1024 h16 d104: {:.1} ms, {:.1} GFLOP/s",
            t * 1e3,
            attention_flops(tq, tq, heads, d, Mask::None) as f64 / t / 1e9
        );

        // Decode attention: 1 query, 2048 cached keys, 32 heads, d 128, causal.
        let (tk, heads, d) = (2048, 32, 128);
        let kv = data(tk * heads * d, 6);
        let q1 = data(heads * d, 7);
        let args = AttnArgs {
            q: &q1,
            q_stride: heads * d,
            k: &kv,
            v: &kv,
            kv_stride: heads * d,
            tq: 1,
            tk,
            heads,
            d,
            scale: 0.088,
            mask: Mask::Causal,
        };
        let mut out = vec![0.0; heads * d];
        let t = best(5, || attention_with_isa(isa, &args, &mut out));
        println!(
            "{isa:?} decode attention tk 2048 h32 d128: {:.2} ms, {:.1} GB/s",
            t * 1e3,
            (2 * tk * heads * d * 4) as f64 / t / 1e9
        );
    }
    let mut v = data(1 << 22, 8);
    let t = best(5, || gelu_erf(&mut v));
    println!("gelu_erf: {:.2} ns/elem", t * 1e9 / (1 << 22) as f64);
    let t = best(5, || silu(&mut v));
    println!("silu: {:.2} ns/elem", t * 1e9 / (1 << 22) as f64);
}
