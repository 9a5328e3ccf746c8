//! CPU benchmarks: the GEMM kernel (f32 and bf16 weights, GEMM and the
//! decode-shaped GEMV) and one decode step of the tiny fixture model.
//! Throughput is reported in FLOP ("elements" = flops) so criterion prints
//! GFLOP/s; compare with the machine's peak (cores × GHz × 32 f32 flops per
//! cycle with two 256-bit FMA pipes).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use qvc_ir::Elems;
use qvc_kernels::{gemm, gemm_flops, MatRef};
use std::hint::black_box;

fn data(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 2654435761) % 1000) as f32 / 1000.0 - 0.5).collect()
}

fn bench_gemm(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm");
    g.sample_size(10);
    for &(m, n, k) in &[(256usize, 256usize, 256usize), (512, 512, 512)] {
        let (a, b) = (data(m * k), data(k * n));
        let mut out = vec![0f32; m * n];
        g.throughput(Throughput::Elements(gemm_flops(m, n, k)));
        g.bench_function(BenchmarkId::new("f32", format!("{m}x{n}x{k}")), |bch| {
            bch.iter(|| {
                gemm(
                    MatRef::row_major(Elems::F32(&a), m, k),
                    MatRef::row_major(Elems::F32(&b), k, n),
                    black_box(&mut out),
                    false,
                )
            })
        });
    }
    // A Linear layer with bf16 weights [out, in], as the model runs them.
    for &(m, n, k) in &[
        (128usize, 1024usize, 1024usize),
        (1, 151936, 128),
        (2, 151936, 128),
        (8, 151936, 128),
        (1, 4096, 4096),
        (4, 4096, 4096),
        (8, 4096, 4096),
    ] {
        let a = data(m * k);
        let w: Vec<bf16> = data(n * k).into_iter().map(bf16::from_f32).collect();
        let mut out = vec![0f32; m * n];
        g.throughput(Throughput::Elements(gemm_flops(m, n, k)));
        g.bench_function(BenchmarkId::new("bf16_linear", format!("{m}x{n}x{k}")), |bch| {
            bch.iter(|| {
                gemm(
                    MatRef::row_major(Elems::F32(&a), m, k),
                    MatRef::row_major(Elems::BF16(&w), n, k).transposed(),
                    black_box(&mut out),
                    false,
                )
            })
        });
    }
    g.finish();
}

fn bench_decode(c: &mut Criterion) {
    use qvc_model::{LoadOptions, Model, PrefillOptions, Session};
    let fixture = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/tiny-qwen-vl");
    let dir = if fixture.join("model.safetensors").is_file() {
        fixture
    } else {
        let d = std::env::temp_dir().join("qvc-bench-demo");
        qvc::demo::write_checkpoint(&d).expect("demo checkpoint");
        d
    };
    let model = Model::load(&dir, &LoadOptions::default()).expect("model loads");
    let cpu = qvc_runtime::Cpu;
    let mut g = c.benchmark_group("decode");
    g.sample_size(20);
    g.throughput(Throughput::Elements(1));
    g.bench_function("tiny_model_step_ctx64", |bch| {
        let mut s = Session::new(&model, &cpu);
        let prompt: Vec<u32> = (0..64).map(|i| 100 + i).collect();
        s.prefill(&prompt, &PrefillOptions::default()).unwrap();
        bch.iter(|| {
            if s.cached_tokens() > 256 {
                s.prefill(&prompt, &PrefillOptions::default()).unwrap();
            }
            black_box(s.step(42).unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, bench_gemm, bench_decode);
criterion_main!(benches);
