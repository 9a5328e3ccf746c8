//! CPU fast paths of the fused attention family at the model's shapes
//! (`gpu::attention::model_specs`): ViT global and window attention, the
//! adapter's cross attention, decoder causal prefill. Throughput is the spec's
//! flop count (attended pairs only), so criterion prints GFLOP/s.
//!
//! `ATT_MATH=fast` times `--cpu-math fast` (bf16 products where the CPU
//! has AVX512-BF16) instead of the exact default.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use qvc_ir::Elems;
use qvc_kernels::gpu::attention::{model_specs, FlashSpec};
use qvc_kernels::KernelSpec;
use std::hint::black_box;

/// A bf16 buffer big enough for one of q/k/v of `spec` with strides `s`.
fn buffer(tokens: u32, s: qvc_kernels::gpu::attention::Strides, spec: &FlashSpec) -> Vec<bf16> {
    let n =
        (tokens as usize - 1) * s.token as usize + (spec.heads as usize - 1) * s.head as usize + spec.head_dim as usize;
    (0..n).map(|i| bf16::from_f32(((i * 2654435761) % 1000) as f32 / 500.0 - 1.0)).collect()
}

fn bench_attention(c: &mut Criterion) {
    if let Some(m) = std::env::var("ATT_MATH").ok().and_then(|s| qvc_kernels::CpuMath::parse(&s)) {
        qvc_kernels::math::set_cpu_math(m);
    }
    let mut g = c.benchmark_group("attention_family");
    g.sample_size(10);
    for spec in model_specs() {
        let q = buffer(spec.tq, spec.q, &spec);
        let k = buffer(spec.tk, spec.k, &spec);
        let v = buffer(spec.tk, spec.v, &spec);
        let mut out = vec![0f32; (spec.tq * spec.heads * spec.head_dim) as usize];
        g.throughput(Throughput::Elements(spec.cost().flops));
        let id = format!("{:?}_q{}_k{}_h{}_d{}", spec.mask, spec.tq, spec.tk, spec.heads, spec.head_dim)
            .replace([' ', '{', '}', ':', ',', '(', ')'], "");
        g.bench_function(BenchmarkId::new("cpu", id), |b| {
            b.iter(|| {
                spec.run_cpu(Elems::BF16(&q), Elems::BF16(&k), Elems::BF16(&v), black_box(&mut out)).unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_attention);
criterion_main!(benches);
