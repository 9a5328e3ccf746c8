//! The GEMM family on the GPU path: tiled mma.sync GEMM, decode GEMV and the
//! patch-embedding im2col.
//!
//! * Emulated PTX vs the naive f64 reference, on random ragged shapes, every
//!   epilogue, both output dtypes, padded strides, every tiling.
//! * The fast CPU paths vs the same reference.
//! * ptxas on the Qwen-VL model shapes (sm_80 and sm_90): registers, spills,
//!   shared memory printed; the GEMM must not spill.
//!
//! Data: uniform in [-1, 1) (never all zero), rounded to bf16 before use, so
//! that the inputs are exactly representable and the only differences are
//! accumulation order and the output rounding. Outputs are poisoned with NaN
//! (0xFF bytes) before each run, so an unwritten element fails, and padding
//! between rows must still be poison afterwards (no stray writes).
//!
//! Tolerances (relative L2 against the f64 reference):
//! * f32 out: 1e-5 (f32 accumulation of ≤ 200 exact products is ~1e-7);
//!   +5e-6 with GELU/SiLU (the PTX erf is A&S 7.1.26, |error| < 1.5e-7,
//!   `ex2.approx` ~2^-22 relative);
//! * bf16 out: 8e-3 (one bf16 rounding, 2^-9 relative, of each element);
//! * im2col: exact (both sides round f32 → bf16 to nearest even).

use half::{bf16, f16};
use proptest::prelude::*;
use qvc_codegen::emu::{run, Arg, Device};
use qvc_codegen::{Module, Target};
use qvc_ir::{DType, Elems};
use qvc_kernels::gpu::gemm::{self, Act, Epilogue, GemmSpec, LinearArgs, OutMut, SpecError, Tiles};
use qvc_kernels::gpu::gemv::{self, GemvSpec};
use qvc_kernels::gpu::patch::{self, PatchSpec};
use qvc_kernels::KernelSpec;

/// xorshift64*: deterministic test data from a proptest-chosen seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn uniform(&mut self) -> f32 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// `n` values in [-1, 1) rounded to bf16 (exact in bf16, f16 and f32).
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| bf16::from_f32(self.uniform()).to_f32()).collect()
    }
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() || !w.is_finite() {
            return f64::INFINITY;
        }
        // Subnormal results count as zero on both sides: the kernels' exp
        // (ex2.approx.ftz) flushes them, as GPUs do (a GELU of x < -13 or so).
        let ftz = |v: f32| if v.abs() < f32::MIN_POSITIVE { 0.0 } else { v as f64 };
        num += (ftz(g) - ftz(w)).powi(2);
        den += ftz(w).powi(2);
    }
    (num / den.max(1e-300)).sqrt()
}

fn tolerance(out: DType, act: Act) -> f64 {
    match (out, act) {
        (DType::BF16, _) => 8e-3,
        (_, Act::None) => 1e-5,
        _ => 1.5e-5,
    }
}

/// Host data of one Linear-family problem (A with row stride `lda`, out and
/// residual with row stride `ldc`).
struct Data {
    m: usize,
    ldc: usize,
    a: Vec<f32>,
    w: Vec<f32>,
    w2: Option<Vec<f32>>,
    bias: Option<Vec<f32>>,
    residual: Option<Vec<f32>>,
}

impl Data {
    #[allow(clippy::too_many_arguments)]
    fn new(seed: u64, m: usize, n: usize, k: usize, lda: usize, ldc: usize, epi: Epilogue) -> Data {
        let mut r = Rng::new(seed);
        let rows = |m: usize, ld: usize| (m - 1) * ld + ld;
        Data {
            m,
            ldc,
            a: r.vec(rows(m, lda)),
            w: r.vec(n * k),
            w2: (epi.act == Act::SiluMul).then(|| r.vec(n * k)),
            bias: epi.bias.then(|| r.vec(n)),
            residual: epi.residual.then(|| r.vec(rows(m, ldc))),
        }
    }
}

enum Host {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Host {
    fn new(v: &[f32], dtype: DType) -> Host {
        match dtype {
            DType::F32 => Host::F32(v.to_vec()),
            DType::BF16 => Host::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F16 => Host::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::I32 | DType::Q4 => unreachable!("the float GEMM tests make float operands only"),
        }
    }
    fn elems(&self) -> Elems<'_> {
        match self {
            Host::F32(v) => Elems::F32(v),
            Host::BF16(v) => Elems::BF16(v),
            Host::F16(v) => Elems::F16(v),
        }
    }
    fn upload(&self, dev: &mut Device) -> u64 {
        match self {
            Host::F32(v) => dev.upload_f32(v),
            Host::BF16(v) => dev.upload_bf16(v),
            Host::F16(v) => dev.upload_f16(v),
        }
    }
}

/// Which implementation to run.
#[derive(Clone, Copy, Debug)]
enum Path {
    Reference,
    Cpu,
}

/// Runs a CPU path into an NaN-filled buffer of `(m-1)·ldc + ldc` elements and
/// returns it widened to f32. `in_place` puts the residual into `out` first.
#[allow(clippy::too_many_arguments)]
fn run_host(
    d: &Data,
    a_dt: DType,
    w_dt: DType,
    out: DType,
    in_place: bool,
    path: Path,
    f: impl Fn(Path, &LinearArgs, OutMut) -> Result<(), SpecError>,
) -> Vec<f32> {
    let a = Host::new(&d.a, a_dt);
    let w = Host::new(&d.w, w_dt);
    let w2 = d.w2.as_ref().map(|v| Host::new(v, w_dt));
    let len = d.m * d.ldc;
    let args = LinearArgs {
        a: a.elems(),
        w: w.elems(),
        w2: w2.as_ref().map(|h| h.elems()),
        bias: d.bias.as_deref(),
        residual: if in_place { None } else { d.residual.as_deref() },
    };
    match out {
        DType::F32 => {
            let mut o = match (&d.residual, in_place) {
                (Some(r), true) => r.clone(),
                _ => vec![f32::NAN; len],
            };
            f(path, &args, OutMut::F32(&mut o)).unwrap();
            o
        }
        _ => {
            let mut o = vec![bf16::NAN; len];
            f(path, &args, OutMut::BF16(&mut o)).unwrap();
            o.iter().map(|v| v.to_f32()).collect()
        }
    }
}

/// Uploads the operands in kernel-param order (`a, w, [w2], [bias],
/// [residual], out`), runs the kernel, returns out widened to f32.
fn run_emu(
    d: &Data,
    a_dt: DType,
    w_dt: DType,
    out: DType,
    in_place: bool,
    kernel: &qvc_codegen::Kernel,
    launch: qvc_kernels::Launch,
) -> Vec<f32> {
    let mut dev = Device::new();
    let mut args = vec![Arg::Ptr(Host::new(&d.a, a_dt).upload(&mut dev))];
    args.push(Arg::Ptr(Host::new(&d.w, w_dt).upload(&mut dev)));
    if let Some(w2) = &d.w2 {
        args.push(Arg::Ptr(Host::new(w2, w_dt).upload(&mut dev)));
    }
    if let Some(b) = &d.bias {
        args.push(Arg::Ptr(dev.upload_f32(b)));
    }
    let len = d.m * d.ldc;
    let esize = if out == DType::F32 { 4 } else { 2 };
    let out_ptr = match (&d.residual, in_place) {
        (Some(r), true) => {
            let p = dev.upload_f32(r);
            args.push(Arg::Ptr(p));
            p
        }
        (Some(r), false) => {
            args.push(Arg::Ptr(dev.upload_f32(r)));
            dev.alloc_poisoned(len * esize)
        }
        (None, _) => dev.alloc_poisoned(len * esize),
    };
    args.push(Arg::Ptr(out_ptr));
    if let Err(e) = run(kernel, launch.grid, launch.block, &args, &mut dev) {
        panic!("{e}");
    }
    match out {
        DType::F32 => dev.download_f32(out_ptr, len),
        _ => dev.download_bf16(out_ptr, len).iter().map(|v| v.to_f32()).collect(),
    }
}

/// Splits a strided `[m, ldc]` result into its `[m, n]` part and checks that
/// the padding columns are still NaN (never written).
fn valid_part(v: &[f32], m: usize, n: usize, ldc: usize, what: &str) -> Vec<f32> {
    let mut out = Vec::with_capacity(m * n);
    for i in 0..m {
        out.extend_from_slice(&v[i * ldc..i * ldc + n]);
        assert!(v[i * ldc + n..(i + 1) * ldc].iter().all(|x| x.is_nan()), "{what}: padding of row {i} was written");
    }
    out
}

fn act_strategy() -> impl Strategy<Value = Act> {
    prop_oneof![Just(Act::None), Just(Act::Gelu), Just(Act::SiluMul)]
}

fn epilogue(act: Act, bias: bool, residual: bool) -> Epilogue {
    Epilogue::new(bias && act != Act::SiluMul, act, residual)
}

/// Checks a GEMM spec's kernel (with `tiles`) and CPU path against the reference.
fn check_gemm(spec: &GemmSpec, tiles: Tiles, seed: u64, in_place: bool) {
    let d = Data::new(seed, spec.m, spec.n, spec.k, spec.lda, spec.ldc, spec.epilogue);
    let f = |p: Path, args: &LinearArgs, out: OutMut| match p {
        Path::Reference => spec.reference(args, out),
        Path::Cpu => spec.cpu(args, out),
    };
    let want = run_host(&d, spec.a, spec.w, spec.out, in_place, Path::Reference, f);
    let cpu = run_host(&d, spec.a, spec.w, spec.out, in_place, Path::Cpu, f);
    let kernel = spec.build_with_tiles(tiles);
    let gpu = run_emu(&d, spec.a, spec.w, spec.out, in_place, &kernel, spec.launch_with_tiles(tiles));
    let tol = tolerance(spec.out, spec.epilogue.act);
    let (m, n, ldc) = (spec.m, spec.n, spec.ldc);
    let pad_checked = !(in_place || spec.ldc == spec.n);
    let (want_v, cpu_v, gpu_v) = if pad_checked {
        (
            valid_part(&want, m, n, ldc, "reference"),
            valid_part(&cpu, m, n, ldc, "cpu"),
            valid_part(&gpu, m, n, ldc, &kernel.name),
        )
    } else {
        let take = |v: &[f32]| (0..m).flat_map(|i| v[i * ldc..i * ldc + n].to_vec()).collect::<Vec<_>>();
        (take(&want), take(&cpu), take(&gpu))
    };
    let e_gpu = rel_l2(&gpu_v, &want_v);
    assert!(e_gpu <= tol, "{}: PTX rel L2 {e_gpu:e} > {tol:e} ({tiles:?})", kernel.name);
    let e_cpu = rel_l2(&cpu_v, &want_v);
    assert!(e_cpu <= tol, "{}: CPU rel L2 {e_cpu:e} > {tol:e}", kernel.name);
}

const SMALL: Tiles = Tiles { bm: 64, bn: 64, warps_m: 2, warps_n: 2, stages: 4 };

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The default (64×64) tiling on ragged shapes: M, N anything, K a
    /// multiple of 8 but mostly not of the 32-wide k-tile; padded strides.
    #[test]
    fn gemm_ptx_and_cpu_match_reference(
        m in 1usize..140, n in 1usize..140, k8 in 1usize..25, act in act_strategy(),
        bias: bool, residual: bool, bf16_out: bool, f16_in in proptest::bool::weighted(0.2),
        lda_pad in 0usize..3, ldc_pad in 0usize..3, seed: u64,
    ) {
        let a = if f16_in { DType::F16 } else { DType::BF16 };
        let out = if bf16_out { DType::BF16 } else { DType::F32 };
        let spec = GemmSpec::new(m, n, 8 * k8, a, out, epilogue(act, bias, residual))
            .and_then(|s| s.with_strides(8 * k8 + 8 * lda_pad, n + ldc_pad))
            .unwrap();
        let tiles = spec.tiles();
        prop_assert_eq!(tiles.bm, 64);
        check_gemm(&spec, tiles, seed, false);
    }

    /// The large tilings the generator uses at model sizes (128×128 with 8
    /// warps, 128×64 for SiluMul, 3 stages) and a narrow 2-stage one, forced
    /// on small ragged shapes; K up to 47 k-chunks (12 k-tiles) so that the
    /// ring wraps several times.
    #[test]
    fn gemm_large_tiles_match_reference(
        m in 1usize..300, n in 1usize..300, k8 in 1usize..48, act in act_strategy(),
        bias: bool, residual: bool, bf16_out: bool, narrow: bool, seed: u64,
    ) {
        let out = if bf16_out { DType::BF16 } else { DType::F32 };
        let spec = GemmSpec::new(m, n, 8 * k8, DType::BF16, out, epilogue(act, bias, residual)).unwrap();
        let tiles = match (act == Act::SiluMul, narrow) {
            (_, true) => Tiles { bm: 64, bn: 32, warps_m: 2, warps_n: 2, stages: 2 },
            (false, false) => Tiles { bm: 128, bn: 128, warps_m: 2, warps_n: 4, stages: 3 },
            (true, false) => Tiles { bm: 128, bn: 64, warps_m: 4, warps_n: 2, stages: 3 },
        };
        check_gemm(&spec, tiles, seed, false);
    }

    /// In-place residual update of the f32 residual stream (out aliases residual).
    #[test]
    fn gemm_in_place_residual(m in 1usize..140, n in 1usize..140, k8 in 1usize..17, bias: bool, seed: u64) {
        let spec = GemmSpec::new(m, n, 8 * k8, DType::BF16, DType::F32, Epilogue::new(bias, Act::None, true)).unwrap();
        check_gemm(&spec, SMALL, seed, true);
    }

    /// GEMV: M 1..=8, any K (odd K takes the scalar-width loads), f32 or bf16
    /// activations, every epilogue, both outputs, padded strides.
    #[test]
    fn gemv_ptx_and_cpu_match_reference(
        m in 1usize..=8, n in 1usize..70, k in 1usize..600, act in act_strategy(),
        bias: bool, residual: bool, bf16_out: bool, f32_in: bool, lda_pad in 0usize..9, ldc_pad in 0usize..3,
        in_place: bool, seed: u64,
    ) {
        let a = if f32_in { DType::F32 } else { DType::BF16 };
        let out = if bf16_out { DType::BF16 } else { DType::F32 };
        let spec = GemvSpec::new(m, n, k, a, out, epilogue(act, bias, residual))
            .and_then(|s| s.with_strides(k + lda_pad, n + ldc_pad))
            .unwrap();
        let in_place = in_place && residual && !bf16_out;
        let d = Data::new(seed, m, n, k, spec.lda, spec.ldc, spec.epilogue);
        let f = |p: Path, args: &LinearArgs, o: OutMut| match p {
            Path::Reference => spec.reference(args, o),
            Path::Cpu => spec.cpu(args, o),
        };
        let want = run_host(&d, a, DType::BF16, out, in_place, Path::Reference, f);
        let cpu = run_host(&d, a, DType::BF16, out, in_place, Path::Cpu, f);
        let kernel = spec.build();
        let gpu = run_emu(&d, a, DType::BF16, out, in_place, &kernel, spec.launch());
        let tol = tolerance(out, act);
        let check_pad = !in_place;
        let part = |v: &[f32], what: &str| {
            if check_pad {
                valid_part(v, m, n, spec.ldc, what)
            } else {
                (0..m).flat_map(|i| v[i * spec.ldc..i * spec.ldc + n].to_vec()).collect()
            }
        };
        let want = part(&want, "reference");
        let e_gpu = rel_l2(&part(&gpu, &kernel.name), &want);
        prop_assert!(e_gpu <= tol, "{}: PTX rel L2 {:e} > {:e}", kernel.name, e_gpu, tol);
        let e_cpu = rel_l2(&part(&cpu, "cpu"), &want);
        prop_assert!(e_cpu <= tol, "{}: CPU rel L2 {:e} > {:e}", kernel.name, e_cpu, tol);
    }

    /// im2col: emulated PTX, CPU and reference agree exactly, padding zeroed.
    #[test]
    fn patch_ptx_and_cpu_match_reference(
        channels in 1usize..4, patch in prop_oneof![Just(2usize), Just(3), Just(4), Just(7), Just(14)],
        gy in 1usize..4, gx in 1usize..4, extra_h in 0usize..5, extra_w in 0usize..5, ld_pad in 0usize..5, seed: u64,
    ) {
        let image = (gy * patch + extra_h.min(patch - 1), gx * patch + extra_w.min(patch - 1));
        let base = PatchSpec::new(channels, image, patch).unwrap();
        let spec = base.with_ld(base.cols() + ld_pad).unwrap();
        let pixels = Rng::new(seed).vec(channels * image.0 * image.1);
        // Unrounded pixels too: the f32 → bf16 rounding itself is compared.
        let pixels: Vec<f32> = pixels.iter().enumerate().map(|(i, v)| v + (i as f32) * 1.0e-4).collect();
        let len = spec.patches() * spec.ld;
        let mut want = vec![bf16::NAN; len];
        spec.reference(&pixels, &mut want).unwrap();
        let mut cpu = vec![bf16::NAN; len];
        spec.cpu(&pixels, &mut cpu).unwrap();
        let mut dev = Device::new();
        let pin = dev.upload_f32(&pixels);
        let pout = dev.alloc_poisoned(len * 2);
        let l = spec.launch();
        let kernel = spec.build();
        if let Err(e) = run(&kernel, l.grid, l.block, &[Arg::Ptr(pin), Arg::Ptr(pout)], &mut dev) {
            panic!("{e}");
        }
        let gpu = dev.download_bf16(pout, len);
        let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert!(want.iter().all(|v| !v.is_nan()), "reference left a hole");
        prop_assert_eq!(bits(&cpu), bits(&want), "cpu");
        prop_assert_eq!(bits(&gpu), bits(&want), "{}", kernel.name);
    }
}

/// One medium shape with the tiling the generator picks on its own at model
/// sizes (128×128, 8 warps, 2 stages) and a long k-loop, GELU epilogue.
#[test]
fn gemm_medium_shape_with_default_tiles() {
    let spec = GemmSpec::new(1200, 1700, 328, DType::BF16, DType::BF16, Epilogue::new(true, Act::Gelu, false)).unwrap();
    let tiles = spec.tiles();
    assert_eq!((tiles.bm, tiles.bn, tiles.threads()), (128, 128, 256));
    check_gemm(&spec, tiles, 11, false);
}

/// The conv stem end to end at a small size: im2col (padded rows) + GEMM
/// equals a direct convolution computed here in f64.
#[test]
fn patch_then_gemm_is_the_convolution() {
    let (c, p, width) = (3, 14, 24);
    let image = (28, 42);
    let spec = PatchSpec::new(c, image, p).unwrap().with_ld(592).unwrap();
    let mut r = Rng::new(7);
    let pixels = r.vec(c * image.0 * image.1);
    let weight = r.vec(width * c * p * p); // [width, 3, 14, 14]
    let mut cols = vec![bf16::NAN; spec.patches() * spec.ld];
    spec.cpu(&pixels, &mut cols).unwrap();
    // Weight zero-padded to [width, 592], as the compiler packs it.
    let mut wpad = vec![bf16::ZERO; width * 592];
    for o in 0..width {
        for j in 0..c * p * p {
            wpad[o * 592 + j] = bf16::from_f32(weight[o * c * p * p + j]);
        }
    }
    let g = GemmSpec::new(spec.patches(), width, 592, DType::BF16, DType::F32, Epilogue::NONE).unwrap();
    let mut dev = Device::new();
    let pa = dev.upload_bf16(&cols);
    let pw = dev.upload_bf16(&wpad);
    let po = dev.alloc_poisoned(spec.patches() * width * 4);
    let l = g.launch();
    run(&g.build(), l.grid, l.block, &[Arg::Ptr(pa), Arg::Ptr(pw), Arg::Ptr(po)], &mut dev)
        .unwrap_or_else(|e| panic!("{e}"));
    let got = dev.download_f32(po, spec.patches() * width);
    let gx = image.1 / p;
    let mut want = vec![0.0f32; got.len()];
    for (patch, row) in want.chunks_mut(width).enumerate() {
        let (py, px) = (patch / gx, patch % gx);
        for (o, v) in row.iter_mut().enumerate() {
            let mut s = 0.0f64;
            for ch in 0..c {
                for ky in 0..p {
                    for kx in 0..p {
                        let x = pixels[(ch * image.0 + py * p + ky) * image.1 + px * p + kx];
                        s += x as f64 * weight[((o * c + ch) * p + ky) * p + kx] as f64;
                    }
                }
            }
            *v = s as f32;
        }
    }
    let e = rel_l2(&got, &want);
    assert!(e <= 1e-5, "conv via im2col + GEMM: rel L2 {e:e}");
}

#[test]
fn specs_reject_what_the_kernels_cannot_do() {
    let bf = DType::BF16;
    let is_invalid = |r: Result<(), SpecError>| matches!(r, Err(SpecError::Invalid { .. }));
    assert!(is_invalid(GemmSpec::new(4, 4, 12, bf, DType::F32, Epilogue::NONE).map(|_| ())));
    assert!(is_invalid(
        GemmSpec::new(4, 4, 16, bf, DType::F32, Epilogue::NONE).unwrap().with_strides(20, 4).map(|_| ())
    ));
    assert!(is_invalid(GemmSpec::new(4, 4, 16, DType::F32, DType::F32, Epilogue::NONE).map(|_| ())));
    assert!(is_invalid(GemmSpec::new(4, 4, 16, bf, DType::F32, Epilogue::new(true, Act::SiluMul, false)).map(|_| ())));
    assert!(is_invalid(GemvSpec::new(9, 4, 16, bf, DType::F32, Epilogue::NONE).map(|_| ())));
    assert!(is_invalid(PatchSpec::new(3, (13, 28), 14).map(|_| ())));
    assert!(is_invalid(PatchSpec::new(3, (28, 28), 14).unwrap().with_ld(500).map(|_| ())));

    // Buffer checks on the CPU paths.
    let spec = GemmSpec::new(2, 3, 8, bf, DType::F32, Epilogue::new(true, Act::None, false)).unwrap();
    let a = vec![bf16::ONE; 16];
    let w = vec![bf16::ONE; 24];
    let mut out = vec![0.0f32; 6];
    let args = LinearArgs { a: Elems::BF16(&a), w: Elems::BF16(&w), w2: None, bias: None, residual: None };
    assert!(matches!(spec.cpu(&args, OutMut::F32(&mut out)), Err(SpecError::Operand { expected: true, .. })));
    let bias = vec![0.5f32; 2];
    let args = LinearArgs { bias: Some(&bias), ..args };
    assert!(matches!(spec.cpu(&args, OutMut::F32(&mut out)), Err(SpecError::Buffer { what: "bias", .. })));
    let bias = vec![0.5f32; 3];
    let args = LinearArgs { bias: Some(&bias), ..args };
    spec.cpu(&args, OutMut::F32(&mut out)).unwrap();
    assert_eq!(out, vec![8.5f32; 6]);
}

#[test]
fn names_encode_the_spec_and_costs_count_the_work() {
    let s = GemmSpec::new(1024, 4992, 1664, DType::BF16, DType::F32, Epilogue::new(true, Act::Gelu, false)).unwrap();
    assert_eq!(s.name(), "gemm_bf16_m1024_n4992_k1664_bias_gelu_f32");
    let c = s.cost();
    assert_eq!(c.flops, 2 * 1024 * 4992 * 1664 + 1024 * 4992 * 11);
    assert_eq!(c.bytes, 1024 * 1664 * 2 + 4992 * 1664 * 2 + 4992 * 4 + 1024 * 4992 * 4);
    let s2 = s.with_strides(1672, 5000).unwrap();
    assert_eq!(s2.name(), "gemm_bf16_m1024_n4992_k1664_lda1672_ldc5000_bias_gelu_f32");
    let v = GemvSpec::new(8, 11008, 4096, DType::BF16, DType::BF16, Epilogue::new(false, Act::SiluMul, false)).unwrap();
    assert_eq!(v.name(), "gemv_bf16_m8_n11008_k4096_silumul_bf16");
    assert_eq!(v.cost().bytes, 8 * 4096 * 2 + 2 * 11008 * 4096 * 2 + 8 * 11008 * 2);
    let p = PatchSpec::new(3, (448, 448), 14).unwrap().with_ld(592).unwrap();
    assert_eq!(p.name(), "patch_c3_h448_w448_p14_ld592_bf16");
    assert_eq!(p.patches(), 1024);
    let mut all: Vec<String> = gemm::model_specs().iter().map(|s| s.name()).collect();
    all.extend(gemv::model_specs().iter().map(|s| s.name()));
    all.extend(patch::model_specs().iter().map(|s| s.name()));
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "model spec names collide");
}

/// Every model-shape kernel of the three families assembles for sm_80 and
/// sm_90 without warnings; the GEMM must not spill.
#[test]
fn model_shapes_assemble_with_ptxas() {
    let Some(ptxas) = qvc_codegen::ptxas::for_tests() else {
        println!("SKIPPED: ptxas not found");
        return;
    };
    let mut kernels: Vec<(qvc_codegen::Kernel, bool)> = vec![];
    let mut seen = std::collections::HashSet::new();
    for s in gemm::model_specs() {
        if seen.insert(s.name()) {
            kernels.push((s.build(), true));
        }
    }
    for s in gemv::model_specs() {
        if seen.insert(s.name()) {
            kernels.push((s.build(), false));
        }
    }
    for s in patch::model_specs() {
        kernels.push((s.build(), false));
    }
    // Code paths the model shapes do not take: narrow GEMV loads (K odd, ≡ 2,
    // 4 mod 8), f32 activations, f16 GEMM, unpaired (odd N) stores, scalar im2col.
    let e = Epilogue::new;
    let (bf, f32_) = (DType::BF16, DType::F32);
    for (k, a) in [(4095, bf), (4094, f32_), (4092, bf), (4096, f32_)] {
        let s = GemvSpec::new(3, 1001, k, a, bf, e(true, Act::Gelu, true)).unwrap();
        kernels.push((s.build(), false));
    }
    let s = GemvSpec::new(5, 999, 1000, bf, f32_, e(false, Act::SiluMul, true)).unwrap();
    kernels.push((s.build(), false));
    let s = GemmSpec::new(300, 1001, 1024, DType::F16, bf, e(true, Act::Gelu, true)).unwrap();
    kernels.push((s.with_strides(1032, 1003).unwrap().build(), true));
    let s = GemmSpec::new(300, 1001, 1024, bf, f32_, e(false, Act::SiluMul, true)).unwrap();
    kernels.push((s.build(), true));
    kernels.push((PatchSpec::new(3, (45, 46), 3).unwrap().build(), false));
    for target in Target::ALL {
        let text = Module::new(target, kernels.iter().map(|(k, _)| k.clone()).collect()).print();
        let usage = qvc_codegen::ptxas::assemble(&ptxas, &text, target).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(usage.len(), kernels.len());
        for (k, is_gemm) in &kernels {
            let u =
                usage.iter().find(|u| u.name == k.name).unwrap_or_else(|| panic!("ptxas did not report {}", k.name));
            println!(
                "{} {:<60} regs {:>3} spill st/ld {}/{} smem {}",
                target.name(),
                u.name,
                u.registers,
                u.spill_stores,
                u.spill_loads,
                u.shared_bytes
            );
            if *is_gemm {
                assert_eq!(u.spill_stores + u.spill_loads, 0, "{}: the mma GEMM spills on {}", u.name, target.name());
            }
        }
    }
}
