//! CPU fast paths of the small GPU families (norm, rotary, embed) at
//! Qwen-VL-Chat shapes, in GB/s (`Throughput::Bytes`): these kernels are
//! memory-bound, so compare with the machine's memory bandwidth. Bytes are
//! what the CPU path moves, each buffer once (the CPU writes f32 outputs, so
//! they count 4 bytes per element where the GPU cost model counts bf16).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use qvc_ir::{DType, Elems};
use qvc_kernels::gpu::embed::EmbedSpec;
use qvc_kernels::gpu::norm::{NormKind, NormSpec};
use qvc_kernels::gpu::rotary::{logn_table, rope_tables, RotaryArgs, RotaryOut, RotarySpec};
use qvc_kernels::KernelSpec;
use std::hint::black_box;

fn data(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 2654435761) % 1000) as f32 / 1000.0 - 0.5).collect()
}

fn bench_norm(c: &mut Criterion) {
    let mut g = c.benchmark_group("norm_cpu");
    g.sample_size(20);
    let specs = [
        NormSpec {
            kind: NormKind::LayerNorm { bias: true },
            rows: 1024,
            cols: 1664,
            eps: 1e-6,
            residual: true,
            out: DType::F32,
        },
        NormSpec { kind: NormKind::RmsNorm, rows: 300, cols: 4096, eps: 1e-6, residual: true, out: DType::F32 },
        NormSpec { kind: NormKind::RmsNorm, rows: 1, cols: 4096, eps: 1e-6, residual: false, out: DType::F32 },
    ];
    for spec in specs {
        let n = spec.rows * spec.cols;
        let mut x = data(n);
        let r = data(n);
        let w: Vec<bf16> = data(spec.cols).into_iter().map(bf16::from_f32).collect();
        let mut y = vec![0f32; n];
        let bias = matches!(spec.kind, NormKind::LayerNorm { bias: true }).then_some(Elems::BF16(&w));
        // out = F32 makes the cost model's byte count exactly what the CPU moves.
        g.throughput(Throughput::Bytes(spec.cost().bytes));
        g.bench_function(BenchmarkId::from_parameter(spec.name()), |bch| {
            bch.iter(|| {
                spec.run_cpu(black_box(&mut x), spec.residual.then_some(&r[..]), Elems::BF16(&w), bias, &mut y).unwrap()
            })
        });
    }
}

fn bench_rotary(c: &mut Criterion) {
    let mut g = c.benchmark_group("rotary_cpu");
    g.sample_size(20);
    for tokens in [1, 300] {
        let spec = RotarySpec { tokens, heads: 32, head_dim: 128, qkv_in: DType::F32, logn: true, max_seq: 2048 };
        let n = tokens * 32 * 128;
        let qkv = data(3 * n);
        let (cos, sin) = rope_tables(128, spec.max_seq, 10000.0);
        let logn = logn_table(spec.max_seq, 2048);
        let (mut q, mut k, mut v) =
            (vec![0f32; n], vec![0f32; 32 * spec.max_seq * 128], vec![0f32; 32 * spec.max_seq * 128]);
        // The cost model counts bf16 outputs; the CPU writes f32 (2 more bytes each).
        g.throughput(Throughput::Bytes(spec.cost().bytes + 3 * n as u64 * 2));
        g.bench_function(BenchmarkId::from_parameter(spec.name()), |bch| {
            bch.iter(|| {
                let args = RotaryArgs { qkv: Elems::F32(&qkv), cos: &cos, sin: &sin, logn: Some(&logn), past: 7 };
                let mut out = RotaryOut { q: black_box(&mut q), k_cache: &mut k, v_cache: &mut v };
                spec.run_cpu(&args, &mut out).unwrap()
            })
        });
    }
}

fn bench_embed(c: &mut Criterion) {
    let mut g = c.benchmark_group("embed_cpu");
    g.sample_size(20);
    // A 16k-row table (128 MiB) instead of the full 1.2 GiB one: the gather
    // reads one row per token whatever the vocabulary.
    let (hidden, vocab, feature_rows) = (4096, 16384, 256);
    let table: Vec<bf16> = data(vocab * hidden).into_iter().map(bf16::from_f32).collect();
    let feat: Vec<bf16> = data(feature_rows * hidden).into_iter().map(bf16::from_f32).collect();
    for tokens in [1, 300] {
        let spec = EmbedSpec { tokens, hidden, vocab, features: DType::BF16, feature_rows };
        let ids: Vec<i32> = (0..tokens).map(|t| ((t * 7919) % vocab) as i32).collect();
        // Image rows in the middle of the prompt, as after `<img>`.
        let src: Vec<i32> = (0..tokens).map(|t| if (20..276).contains(&t) { (t - 20) as i32 } else { -1 }).collect();
        let mut x = vec![0f32; tokens * hidden];
        g.throughput(Throughput::Bytes(spec.cost().bytes));
        g.bench_function(BenchmarkId::from_parameter(spec.name()), |bch| {
            bch.iter(|| spec.run_cpu(&ids, &src, Elems::BF16(&table), Elems::BF16(&feat), black_box(&mut x)).unwrap())
        });
    }
}

criterion_group!(benches, bench_norm, bench_rotary, bench_embed);
criterion_main!(benches);
