//! CPU fast paths of the decode family (the CPU decode step's attention over
//! its f32 cache, `attention_with_past_cpu`: 8 layers' caches in turn so each
//! call reads from DRAM, `ATT_COPIES=1` for one that stays in L3; the GPU
//! decode attention spec's CPU path over a full KV cache; softmax, argmax and
//! top-p over the 151936-token vocabulary) at
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

/// The CPU decode step's attention (`attention_with_past`, f32 cache
/// `[len, 32 heads, 128]`, one query) at several cache lengths, over 8
/// layers' caches in turn so that each call reads from DRAM as in a step.
fn bench_attention_with_past(c: &mut Criterion) {
    use qvc_kernels::attention::{attention_with_past, AttnArgs, Mask};
    let mut g = c.benchmark_group("attention_with_past_cpu");
    g.sample_size(20);
    let (heads, d) = (32usize, 128usize);
    let hd = heads * d;
    for past in [300usize, 1024, 2048] {
        let caches: Vec<(Vec<f32>, Vec<f32>)> =
            (0..std::env::var("ATT_COPIES").ok().and_then(|s| s.parse().ok()).unwrap_or(8))
                .map(|l| (data(past * hd + l), data(past * hd + 2 * l)))
                .collect();
        let (q, kn, vn) = (data(hd), data(hd), data(hd));
        let mut out = vec![0f32; hd];
        g.throughput(Throughput::Bytes((8 * past * hd + 16 * hd) as u64));
        let mut layer = 0;
        g.bench_function(BenchmarkId::from_parameter(format!("past{past}")), |bch| {
            bch.iter(|| {
                layer = (layer + 1) % caches.len();
                let (pk, pv) = &caches[layer];
                let args = AttnArgs {
                    q: &q,
                    q_stride: hd,
                    k: &kn,
                    v: &vn,
                    kv_stride: hd,
                    tq: 1,
                    tk: 1,
                    heads,
                    d,
                    scale: 1.0 / (d as f32).sqrt(),
                    mask: Mask::Causal,
                };
                attention_with_past(&args, &pk[..past * hd], &pv[..past * hd], black_box(&mut out))
            })
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

criterion_group!(benches, bench_attention_with_past, bench_decode_attention, bench_vocab);
criterion_main!(benches);
