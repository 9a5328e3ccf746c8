//! CPU fast paths of the GEMM family (tiled GEMM, decode GEMV, im2col) at
//! Qwen-VL-Chat shapes scaled down to run in seconds, and the packed GEMM
//! per code path (`gemm_isa`: AVX-512 vs AVX2+FMA): GEMM and GEMV in
//! GFLOP/s (`Throughput::Elements` counts flops, so criterion's "elem/s" reads
//! as flop/s), im2col in GB/s. Scaling keeps K (the reduction length, which
//! sets the inner-loop behaviour) and cuts M and N.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use qvc_ir::{DType, Elems};
use qvc_kernels::gemm::gemm_with_math;
use qvc_kernels::gpu::gemm::{Act, Epilogue, GemmSpec, LinearArgs, OutMut};
use qvc_kernels::gpu::gemv::GemvSpec;
use qvc_kernels::gpu::patch::PatchSpec;
use qvc_kernels::{gemm_flops, gemm_with_isa, CpuMath, Isa, KernelSpec, MatRef};
use std::hint::black_box;
use std::time::Duration;

fn data(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 2654435761) % 1000) as f32 / 1000.0 - 0.5).collect()
}

fn bf(n: usize) -> Vec<bf16> {
    data(n).into_iter().map(bf16::from_f32).collect()
}

/// Runs one Linear-family CPU path under criterion with flop throughput.
#[allow(clippy::too_many_arguments)]
fn bench_linear(
    g: &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>,
    name: String,
    flops: u64,
    (m, n, k): (usize, usize, usize),
    out: DType,
    epi: Epilogue,
    run: &dyn Fn(&LinearArgs, OutMut),
) {
    let a = bf(m * k);
    let w = bf(n * k);
    let w2 = bf(n * k);
    let bias = data(n);
    let residual = data(m * n);
    let args = LinearArgs {
        a: Elems::BF16(&a),
        w: Elems::BF16(&w),
        w2: (epi.act == Act::SiluMul).then_some(Elems::BF16(&w2)),
        bias: epi.bias.then_some(&bias[..]),
        residual: epi.residual.then_some(&residual[..]),
    };
    let mut o32 = vec![0f32; m * n];
    let mut o16 = vec![bf16::ZERO; m * n];
    g.throughput(Throughput::Elements(flops));
    g.bench_function(BenchmarkId::from_parameter(name), |bch| {
        bch.iter(|| match out {
            DType::F32 => run(black_box(&args), OutMut::F32(&mut o32)),
            _ => run(black_box(&args), OutMut::BF16(&mut o16)),
        })
    });
}

fn bench_gemm(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm_cpu");
    g.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    let e = Epilogue::new;
    // (M, N, K, out, epilogue): ViT c_fc / c_proj / in_proj at 1024 tokens
    // scaled to 64 tokens and N/4; decoder SwiGLU and c_attn at 300 tokens
    // scaled to 32 tokens and N/4.
    let shapes = [
        (64, 2048, 1664, DType::BF16, e(true, Act::Gelu, false)),
        (64, 416, 8192, DType::F32, e(true, Act::None, true)),
        (64, 1248, 1664, DType::BF16, e(true, Act::None, false)),
        (32, 2752, 4096, DType::BF16, e(false, Act::SiluMul, false)),
        (32, 3072, 4096, DType::F32, e(true, Act::None, false)),
    ];
    for (m, n, k, out, epi) in shapes {
        let spec = GemmSpec::new(m, n, k, DType::BF16, out, epi).unwrap();
        bench_linear(&mut g, spec.name(), spec.cost().flops, (m, n, k), out, epi, &|a, o| spec.cpu(a, o).unwrap());
    }
}

fn bench_gemv(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemv_cpu");
    g.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    let e = Epilogue::new;
    // Decode steps at full K, N cut to keep a run near 10 ms (bandwidth-bound:
    // 2·N·K bytes of weights per call).
    let shapes = [
        (1, 4096, 4096, DType::F32, e(false, Act::None, true)),
        (1, 2752, 4096, DType::BF16, e(false, Act::SiluMul, false)),
        (8, 4096, 4096, DType::F32, e(true, Act::None, false)),
        (1, 16384, 4096, DType::F32, Epilogue::NONE),
    ];
    for (m, n, k, out, epi) in shapes {
        let spec = GemvSpec::new(m, n, k, DType::BF16, out, epi).unwrap();
        bench_linear(&mut g, spec.name(), spec.cost().flops, (m, n, k), out, epi, &|a, o| spec.cpu(a, o).unwrap());
    }
}

fn bench_patch(c: &mut Criterion) {
    let mut g = c.benchmark_group("patch_cpu");
    g.sample_size(20).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_secs(1));
    let spec = PatchSpec::new(3, (448, 448), 14).unwrap().with_ld(592).unwrap();
    let pixels = data(3 * 448 * 448);
    let mut out = vec![bf16::ZERO; spec.patches() * spec.ld];
    g.throughput(Throughput::Bytes(spec.cost().bytes));
    g.bench_function(BenchmarkId::from_parameter(spec.name()), |bch| {
        bch.iter(|| spec.cpu(black_box(&pixels), &mut out).unwrap())
    });
}

/// The packed GEMM on each code path the CPU has (AVX-512, AVX2+FMA), at
/// the real shapes' widths with fewer rows: f32 activations × a bf16
/// `[out, in]` weight, as Linear layers run it, then the same under
/// `--cpu-math fast`. `kernel_speed` reports the same against the measured
/// FMA and bf16 peaks.
fn bench_gemm_isa(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm_isa");
    g.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    // (M, N, K): ViT c_fc / c_proj at 256 of its 1024 rows, decoder c_attn
    // at 96 of a 300-token prefill's rows, all at full N and K.
    let shapes = [(256, 8192, 1664), (256, 1664, 8192), (96, 12288, 4096)];
    for isa in [Isa::Avx512, Isa::Avx2Fma].into_iter().filter(|i| i.available()) {
        for (m, n, k) in shapes {
            let a = data(m * k);
            let w = bf(n * k);
            let mut out = vec![0f32; m * n];
            g.throughput(Throughput::Elements(gemm_flops(m, n, k)));
            g.bench_function(BenchmarkId::new(format!("{isa:?}"), format!("{m}x{n}x{k}")), |bch| {
                bch.iter(|| {
                    gemm_with_isa(
                        isa,
                        MatRef::row_major(Elems::F32(black_box(&a)), m, k),
                        MatRef::row_major(Elems::BF16(&w), n, k).transposed(),
                        &mut out,
                        false,
                    )
                })
            });
        }
    }
    // `--cpu-math fast` on AVX-512: bf16 products on AMX tiles where the CPU
    // has them (`QVC_AMX=0` times the `vdpbf16ps` path instead).
    if Isa::Avx512.available() && qvc_kernels::gemm::bf16_products_native() {
        let path = if qvc_kernels::gemm::amx::available() { "fast-amx" } else { "fast-vdpbf16ps" };
        for (m, n, k) in shapes {
            let a = data(m * k);
            let w = bf(n * k);
            let mut out = vec![0f32; m * n];
            g.throughput(Throughput::Elements(gemm_flops(m, n, k)));
            g.bench_function(BenchmarkId::new(path, format!("{m}x{n}x{k}")), |bch| {
                bch.iter(|| {
                    gemm_with_math(
                        Isa::Avx512,
                        CpuMath::Fast,
                        MatRef::row_major(Elems::F32(black_box(&a)), m, k),
                        MatRef::row_major(Elems::BF16(&w), n, k).transposed(),
                        &mut out,
                        false,
                    )
                })
            });
        }
    }
}

criterion_group!(benches, bench_gemm, bench_gemv, bench_patch, bench_gemm_isa);
criterion_main!(benches);
