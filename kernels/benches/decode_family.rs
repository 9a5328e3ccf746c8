//! CPU fast paths of the decode family (decode attention over a full KV
//! cache, softmax, argmax and top-p over the 151936-token vocabulary) at
//! Qwen-VL-Chat shapes, in GB/s (`Throughput::Bytes`): all are memory-bound,
//! so compare with the machine's memory bandwidth. Bytes are what the CPU path
//! must move, each buffer once (attention: q, the `len` valid K and V rows and
//! an f32 output; softmax: f32 in and out; argmax and top-p: the logits).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use qvc_ir::DType;
use qvc_kernels::gpu::decode_attention::DecodeAttnSpec;
use qvc_kernels::gpu::sample::{ArgmaxSpec, TopPParams, TopPSpec};
use qvc_kernels::gpu::softmax::SoftmaxSpec;
use std::hint::black_box;

fn data(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 2654435761) % 1000) as f32 / 1000.0 - 0.5).collect()
}

fn bench_decode_attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_attention_cpu");
    g.sample_size(10);
    for (batch, max_seq) in [(1usize, 2048usize), (1, 8192), (8, 2048)] {
        let spec = DecodeAttnSpec::new(batch, 32, 128, max_seq, 1, 1.0 / (128f32).sqrt(), DType::F32).unwrap();
        let bh = batch * 32;
        let q: Vec<bf16> = data(bh * 128).into_iter().map(bf16::from_f32).collect();
        let k: Vec<bf16> = data(bh * max_seq * 128).into_iter().map(bf16::from_f32).collect();
        let v = k.clone();
        let lens = vec![max_seq as u32; batch];
        let slots: Vec<u32> = (0..batch as u32).collect();
        let mut out = vec![0f32; bh * 128];
        let bytes = bh * (2 * max_seq * 128 * 2 + 128 * 2 + 128 * 4);
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(BenchmarkId::from_parameter(format!("b{batch}_s{max_seq}")), |bch| {
            bch.iter(|| spec.cpu(&q, &k, &v, &lens, &slots, black_box(&mut out)))
        });
    }
}

/// Logits with a realistic spread (a few strong tokens, a long tail).
fn logits(rows: usize, cols: usize) -> Vec<f32> {
    data(rows * cols).into_iter().enumerate().map(|(i, x)| x * 8.0 + if i % 9973 == 0 { 6.0 } else { 0.0 }).collect()
}

fn bench_vocab(c: &mut Criterion) {
    let cols = 151_936;
    let mut g = c.benchmark_group("vocab_cpu");
    g.sample_size(10);
    for rows in [1usize, 8] {
        let x = logits(rows, cols);
        let n = rows * cols;

        let spec = SoftmaxSpec::new(rows, cols).unwrap();
        let mut y = vec![0f32; n];
        g.throughput(Throughput::Bytes(8 * n as u64));
        g.bench_function(BenchmarkId::new("softmax", rows), |bch| bch.iter(|| spec.cpu(&x, black_box(&mut y))));

        let spec = ArgmaxSpec::new(rows, cols).unwrap();
        let mut ids = vec![0i32; rows];
        g.throughput(Throughput::Bytes(4 * n as u64));
        g.bench_function(BenchmarkId::new("argmax", rows), |bch| bch.iter(|| spec.cpu(&x, black_box(&mut ids))));

        let spec = TopPSpec::new(rows, cols).unwrap();
        let u: Vec<f32> = (0..rows).map(|r| (r as f32 + 0.5) / rows as f32).collect();
        for (top_p, top_k) in [(0.9f32, 0u32), (0.8, 50)] {
            let p = TopPParams { temperature: 0.7, top_p, top_k };
            g.throughput(Throughput::Bytes(4 * n as u64));
            g.bench_function(BenchmarkId::new(format!("top_p{top_p}_k{top_k}"), rows), |bch| {
                bch.iter(|| spec.cpu(&x, &u, &p, black_box(&mut ids)))
            });
        }
    }
}

criterion_group!(benches, bench_decode_attention, bench_vocab);
criterion_main!(benches);
