//! Tests of the small GPU kernel families (norm, rotary, embed): the emulated
//! PTX and the fast CPU paths against the naive references on random ragged
//! shapes, and every model spec through ptxas (sm_80 and sm_90).
//!
//! Tolerances (relative L2 over the compared elements): f32 outputs 1e-5
//! (f32 arithmetic vs the f64 references, rows of at most ~1000 elements);
//! bf16 outputs 8e-3 (rounding to bf16 alone is up to 2^-9 ≈ 2e-3 per
//! element); the embedding copy and the residual sum are exact (compared
//! bit for bit). GPU outputs are poisoned with 0xFF bytes (NaN) before each
//! launch, so an element the kernel fails to write fails the comparison.

use half::bf16;
use proptest::prelude::*;
use qvc_codegen::emu::{run, Arg, Device};
use qvc_codegen::{Module, Target};
use qvc_ir::{DType, Elems};
use qvc_kernels::gpu::embed::{self, EmbedError, EmbedSpec};
use qvc_kernels::gpu::norm::{self, NormKind, NormSpec};
use qvc_kernels::gpu::rotary::{self, RotaryArgs, RotaryError, RotaryOut, RotarySpec};
use qvc_kernels::KernelSpec;

/// xorshift64*: deterministic test data from a proptest-chosen seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1), never exactly 0 (so no test input is all zeros).
    fn uniform(&mut self) -> f32 {
        let v = (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
        if v == 0.0 {
            0.5
        } else {
            v
        }
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// ‖got − want‖₂ / ‖want‖₂; infinite when any value is NaN (an unwritten,
/// poisoned element) or `want` is all zeros while `got` is not.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        if g.is_nan() || w.is_nan() {
            return f64::INFINITY;
        }
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    if num == 0.0 {
        0.0
    } else {
        (num / den).sqrt()
    }
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn from_bf16(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Downloads `n` elements of `dtype` (f32 or bf16) as f32.
fn download(dev: &Device, ptr: u64, n: usize, dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => dev.download_f32(ptr, n),
        _ => from_bf16(&dev.download_bf16(ptr, n)),
    }
}

fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        _ => 8e-3,
    }
}

fn launch(spec: &dyn KernelSpec, args: &[Arg], dev: &mut Device) -> Result<(), TestCaseError> {
    let l = spec.launch();
    run(&spec.build(), l.grid, l.block, args, dev).map_err(|e| TestCaseError::fail(format!("{}: {e}", spec.name())))?;
    Ok(())
}

// ---- norm ------------------------------------------------------------------

fn check_norm(spec: NormSpec, shift: f32, seed: u64) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(seed);
    let (n, cols) = (spec.rows * spec.cols, spec.cols);
    // A shifted mean checks that the variance is taken around the mean.
    let x0: Vec<f32> = rng.vec(n, 2.0).into_iter().map(|v| v + shift).collect();
    // |r| ≥ 0.25 with |x| ≤ 52: x + r ≠ x, so a residual element the kernel does
    // not write back is caught.
    let r: Vec<f32> = rng.vec(n, 1.0).into_iter().map(|v| v.signum() * (0.25 + v.abs())).collect();
    let w = to_bf16(&rng.vec(cols, 1.5));
    let bias = to_bf16(&rng.vec(cols, 0.5));
    let has_bias = matches!(spec.kind, NormKind::LayerNorm { bias: true });
    let r_in = spec.residual.then_some(&r[..]);
    let b_in = has_bias.then_some(Elems::BF16(&bias));

    let (mut x_ref, mut y_ref) = (x0.clone(), vec![0.0; n]);
    spec.run_ref(&mut x_ref, r_in, Elems::BF16(&w), b_in, &mut y_ref).unwrap();
    let (mut x_cpu, mut y_cpu) = (x0.clone(), vec![f32::NAN; n]);
    spec.run_cpu(&mut x_cpu, r_in, Elems::BF16(&w), b_in, &mut y_cpu).unwrap();
    prop_assert!(x_cpu == x_ref, "cpu residual sum differs");
    let e = rel_l2(&y_cpu, &y_ref);
    prop_assert!(e <= 1e-5, "cpu {}: rel err {e}", spec.name());

    let mut dev = Device::new();
    let xp = dev.upload_f32(&x0);
    let rp = dev.upload_f32(&r);
    let wp = dev.upload_bf16(&w);
    let bp = dev.upload_bf16(&bias);
    let yp = dev.alloc_poisoned(n * spec.out.size());
    let mut args = vec![Arg::Ptr(xp)];
    if spec.residual {
        args.push(Arg::Ptr(rp));
    }
    args.push(Arg::Ptr(wp));
    if has_bias {
        args.push(Arg::Ptr(bp));
    }
    args.push(Arg::Ptr(yp));
    prop_assert_eq!(args.len(), spec.param_names().len());
    launch(&spec, &args, &mut dev)?;
    let x_gpu = dev.download_f32(xp, n);
    prop_assert!(x_gpu == x_ref, "gpu {}: residual stream differs", spec.name());
    let y_gpu = download(&dev, yp, n, spec.out);
    for row in 0..spec.rows {
        let s = row * cols..(row + 1) * cols;
        let e = rel_l2(&y_gpu[s.clone()], &y_ref[s]);
        prop_assert!(e <= tol(spec.out), "gpu {} row {row}: rel err {e}", spec.name());
    }
    Ok(())
}

fn norm_kind() -> impl Strategy<Value = NormKind> {
    prop::sample::select(vec![
        NormKind::LayerNorm { bias: true },
        NormKind::LayerNorm { bias: false },
        NormKind::RmsNorm,
    ])
}

fn out_dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(vec![DType::F32, DType::BF16])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Ragged widths: 1..=1100 covers vectors of 4, 2 and 1, the
    /// warp-per-row layout (≤ 512) and blocks of 2 and 3 warps.
    #[test]
    fn norm_matches_ref(
        kind in norm_kind(), rows in 1usize..=20, cols in 1usize..=1100, residual: bool,
        out in out_dtype(), eps in prop::sample::select(vec![1e-6f32, 1e-5]),
        shift in prop::sample::select(vec![0.0f32, 3.0, -50.0]), seed: u64,
    ) {
        check_norm(NormSpec { kind, rows, cols, eps, residual, out }, shift, seed)?;
    }
}

/// The model width (256 threads, 8 warps) and a ragged large one, a few rows each.
#[test]
fn norm_wide_rows() {
    for (kind, cols, out) in [
        (NormKind::RmsNorm, 4096, DType::BF16),
        (NormKind::LayerNorm { bias: true }, 1664, DType::F32),
        (NormKind::LayerNorm { bias: false }, 4093, DType::F32),
    ] {
        check_norm(NormSpec { kind, rows: 3, cols, eps: 1e-6, residual: true, out }, 1.0, cols as u64).unwrap();
    }
}

#[test]
fn norm_rejects_bad_args() {
    let spec = NormSpec { kind: NormKind::RmsNorm, rows: 2, cols: 3, eps: 1e-6, residual: false, out: DType::BF16 };
    let w = [bf16::ONE; 3];
    let mut y = [0.0; 6];
    let err = spec.run_cpu(&mut [0.0; 5], None, Elems::BF16(&w), None, &mut y).unwrap_err();
    assert_eq!(err, norm::NormError::Len { what: "x", expected: 6, got: 5 });
    assert!(spec.run_cpu(&mut [1.0; 6], Some(&[0.0; 6]), Elems::BF16(&w), None, &mut y).is_err());
    let bad = NormSpec { out: DType::I32, ..spec };
    assert!(bad.validate().is_err());
    assert!(NormSpec { eps: f32::NAN, ..spec }.validate().is_err());
    assert!(NormSpec { cols: norm::MAX_COLS + 1, ..spec }.validate().is_err());
}

// ---- rotary ----------------------------------------------------------------

fn check_rotary(spec: RotarySpec, past: usize, seed: u64) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(seed);
    let (t, h, d, s) = (spec.tokens, spec.heads, spec.head_dim, spec.max_seq);
    let half = d / 2;
    let qkv = rng.vec(t * 3 * h * d, 2.0);
    let qkv_bf = to_bf16(&qkv);
    let qkv_in = match spec.qkv_in {
        DType::F32 => Elems::F32(&qkv),
        _ => Elems::BF16(&qkv_bf),
    };
    // Real tables: cos and sin of one angle, so cos² + sin² = 1 as in the model.
    let ang = rng.vec(s * half, 3.0);
    let cos: Vec<f32> = ang.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = ang.iter().map(|a| a.sin()).collect();
    let logn: Vec<f32> = rng.vec(s, 0.5).into_iter().map(|v| 1.5 + v).collect();
    let args = RotaryArgs { qkv: qkv_in, cos: &cos, sin: &sin, logn: spec.logn.then_some(&logn[..]), past };
    // Cache contents before the launch: bf16 values, so the GPU's copy compares exactly.
    let cache0 = from_bf16(&to_bf16(&rng.vec(h * s * d, 1.0)));
    let written = |i: usize| (past..past + t).contains(&(i / d % s));

    let (mut q_ref, mut k_ref, mut v_ref) = (vec![0.0; h * t * d], cache0.clone(), cache0.clone());
    spec.run_ref(&args, &mut RotaryOut { q: &mut q_ref, k_cache: &mut k_ref, v_cache: &mut v_ref }).unwrap();
    let (mut q_cpu, mut k_cpu, mut v_cpu) = (vec![f32::NAN; h * t * d], cache0.clone(), cache0.clone());
    spec.run_cpu(&args, &mut RotaryOut { q: &mut q_cpu, k_cache: &mut k_cpu, v_cache: &mut v_cpu }).unwrap();
    let e = rel_l2(&q_cpu, &q_ref).max(rel_l2(&k_cpu, &k_ref)).max(rel_l2(&v_cpu, &v_ref));
    prop_assert!(e <= 1e-5, "cpu {}: rel err {e}", spec.name());
    for i in (0..h * s * d).filter(|&i| !written(i)) {
        prop_assert!(k_cpu[i] == cache0[i] && v_cpu[i] == cache0[i], "cpu wrote cache element {i}");
    }

    let mut dev = Device::new();
    let qkv_p = match spec.qkv_in {
        DType::F32 => dev.upload_f32(&qkv),
        _ => dev.upload_bf16(&qkv_bf),
    };
    let cos_p = dev.upload_f32(&cos);
    let sin_p = dev.upload_f32(&sin);
    let logn_p = dev.upload_f32(&logn);
    let q_p = dev.alloc_poisoned(h * t * d * 2);
    let k_p = dev.upload_bf16(&to_bf16(&cache0));
    let v_p = dev.upload_bf16(&to_bf16(&cache0));
    // Poison exactly the cache rows the kernel must write.
    for hh in 0..h {
        dev.poison(k_p + ((hh * s + past) * d * 2) as u64, t * d * 2);
        dev.poison(v_p + ((hh * s + past) * d * 2) as u64, t * d * 2);
    }
    let mut a = vec![Arg::Ptr(qkv_p), Arg::Ptr(cos_p), Arg::Ptr(sin_p)];
    if spec.logn {
        a.push(Arg::Ptr(logn_p));
    }
    a.extend([Arg::Ptr(q_p), Arg::Ptr(k_p), Arg::Ptr(v_p), Arg::U32(past as u32)]);
    prop_assert_eq!(a.len(), spec.param_names().len());
    launch(&spec, &a, &mut dev)?;
    let q = download(&dev, q_p, h * t * d, DType::BF16);
    let k = download(&dev, k_p, h * s * d, DType::BF16);
    let v = download(&dev, v_p, h * s * d, DType::BF16);
    let e = rel_l2(&q, &q_ref);
    prop_assert!(e <= tol(DType::BF16), "gpu {} q: rel err {e}", spec.name());
    for (name, got, want) in [("k", &k, &k_ref), ("v", &v, &v_ref)] {
        let pick = |c: &Vec<f32>| (0..h * s * d).filter(|&i| written(i)).map(|i| c[i]).collect::<Vec<_>>();
        let e = rel_l2(&pick(got), &pick(want));
        prop_assert!(e <= tol(DType::BF16), "gpu {} {name}: rel err {e}", spec.name());
        for i in (0..h * s * d).filter(|&i| !written(i)) {
            prop_assert!(got[i] == cache0[i], "gpu {} wrote {name} cache element {i}", spec.name());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// head_dim 2..=128: pairs per thread 4, 2 and 1; caches with spare rows
    /// before and after the written ones.
    #[test]
    fn rotary_matches_ref(
        tokens in 1usize..=20, heads in 1usize..=4, half in 1usize..=64,
        qkv_in in out_dtype(), logn: bool, past in 0usize..=50, spare in 0usize..=4, seed: u64,
    ) {
        let spec = RotarySpec { tokens, heads, head_dim: 2 * half, qkv_in, logn, max_seq: past + tokens + spare };
        check_rotary(spec, past, seed)?;
    }
}

#[test]
fn rotary_model_head_dim() {
    let spec = RotarySpec { tokens: 3, heads: 3, head_dim: 128, qkv_in: DType::BF16, logn: true, max_seq: 40 };
    check_rotary(spec, 35, 7).unwrap();
}

#[test]
fn rotary_rejects_full_cache() {
    let spec = RotarySpec { tokens: 2, heads: 1, head_dim: 4, qkv_in: DType::F32, logn: false, max_seq: 4 };
    let qkv = [1.0f32; 24];
    let tab = [0.5f32; 8];
    let args = RotaryArgs { qkv: Elems::F32(&qkv), cos: &tab, sin: &tab, logn: None, past: 3 };
    let (mut q, mut k, mut v) = ([0.0; 8], [0.0; 16], [0.0; 16]);
    let err = spec.run_cpu(&args, &mut RotaryOut { q: &mut q, k_cache: &mut k, v_cache: &mut v }).unwrap_err();
    assert_eq!(err, RotaryError::CacheFull { past: 3, tokens: 2, max_seq: 4 });
    assert!(RotarySpec { head_dim: 5, ..spec }.validate().is_err());
}

#[test]
fn rotary_host_tables() {
    // No NTK scaling up to seq_length; doubling past it.
    assert_eq!(rotary::ntk_base(10000.0, 128, 300, 2048), 10000.0);
    let b = rotary::ntk_base(10000.0, 128, 3000, 2048);
    assert!((b - 10000.0 * 3f64.powf(128.0 / 126.0)).abs() < 1e-6 * b);
    let (cos, sin) = rotary::rope_tables(128, 10, 10000.0);
    assert_eq!((cos[0], sin[0]), (1.0, 0.0));
    // Position 1, pair 1: angle 10000^(-2/128).
    let a = 10000f64.powf(-2.0 / 128.0);
    assert!((cos[64 + 1] as f64 - a.cos()).abs() < 1e-6 && (sin[64 + 1] as f64 - a.sin()).abs() < 1e-6);
    let l = rotary::logn_table(2050, 2048);
    assert_eq!((l[0], l[2047]), (1.0, 1.0));
    assert!((l[2048] as f64 - 2049f64.ln() / 2048f64.ln()).abs() < 1e-7);
}

// ---- embed -----------------------------------------------------------------

/// Random indices for `spec`: each token is an image row with probability ½
/// (when there are feature rows), else a text id.
fn embed_indices(spec: &EmbedSpec, rng: &mut Rng) -> (Vec<i32>, Vec<i32>) {
    let ids = (0..spec.tokens).map(|_| rng.below(spec.vocab) as i32).collect();
    let src = (0..spec.tokens)
        .map(|_| if spec.feature_rows > 0 && rng.below(2) == 0 { rng.below(spec.feature_rows) as i32 } else { -1 })
        .collect();
    (ids, src)
}

/// Runs the embed kernel on the emulator and returns x.
fn embed_gpu(
    spec: &EmbedSpec,
    ids: &[i32],
    src: &[i32],
    table: &[bf16],
    feat: &[f32],
) -> Result<Vec<f32>, TestCaseError> {
    let mut dev = Device::new();
    let ids_p = dev.upload_i32(ids);
    let src_p = dev.upload_i32(src);
    let table_p = dev.upload_bf16(table);
    // A zero-row feature array still needs a valid (never read) pointer.
    let feat_p = match spec.features {
        DType::F32 => dev.upload_f32(if feat.is_empty() { &[0.0] } else { feat }),
        _ => dev.upload_bf16(&to_bf16(if feat.is_empty() { &[0.0] } else { feat })),
    };
    let n = spec.tokens * spec.hidden;
    let x_p = dev.alloc_poisoned(n * 4);
    let args = [Arg::Ptr(ids_p), Arg::Ptr(src_p), Arg::Ptr(table_p), Arg::Ptr(feat_p), Arg::Ptr(x_p)];
    launch(spec, &args, &mut dev)?;
    Ok(dev.download_f32(x_p, n))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Ragged widths (vectors of 4, 2 and 1, rows shorter and longer than a block).
    #[test]
    fn embed_matches_ref(
        tokens in 1usize..=20, hidden in 1usize..=1100, vocab in 1usize..=40, feature_rows in 0usize..=30,
        features in out_dtype(), seed: u64,
    ) {
        let spec = EmbedSpec { tokens, hidden, vocab, features, feature_rows };
        let mut rng = Rng::new(seed);
        let table = to_bf16(&rng.vec(vocab * hidden, 1.0));
        // bf16-representable features, so both dtypes hold the same values.
        let feat = from_bf16(&to_bf16(&rng.vec(feature_rows * hidden, 3.0)));
        let feat_bf = to_bf16(&feat);
        let feat_in = match features {
            DType::F32 => Elems::F32(&feat),
            _ => Elems::BF16(&feat_bf),
        };
        let (ids, src) = embed_indices(&spec, &mut rng);
        let n = tokens * hidden;
        let mut want = vec![0.0; n];
        spec.run_ref(&ids, &src, Elems::BF16(&table), feat_in, &mut want).unwrap();
        let mut cpu = vec![f32::NAN; n];
        spec.run_cpu(&ids, &src, Elems::BF16(&table), feat_in, &mut cpu).unwrap();
        prop_assert!(cpu == want, "cpu {} differs", spec.name());
        // A copy is exact: compare bit for bit (NaN ≠ NaN catches unwritten elements).
        let gpu = embed_gpu(&spec, &ids, &src, &table, &feat)?;
        prop_assert!(gpu == want, "gpu {} differs", spec.name());
    }
}

/// Out-of-range indices: the host check and the CPU paths return errors; the
/// kernel reads nothing out of bounds and writes NaN rows for exactly those tokens.
#[test]
fn embed_bad_indices() {
    let spec = EmbedSpec { tokens: 5, hidden: 6, vocab: 3, features: DType::F32, feature_rows: 2 };
    let table: Vec<bf16> = to_bf16(&(0..18).map(|i| i as f32 + 1.0).collect::<Vec<_>>());
    let feat: Vec<f32> = (0..12).map(|i| -(i as f32) - 1.0).collect();
    let ids = [0, 3, -1, 2, 7];
    let src = [-1, -1, -1, 2, 1];
    assert_eq!(spec.validate_indices(&ids, &src), Err(EmbedError::Id { token: 1, id: 3, vocab: 3 }));
    let mut x = vec![0.0; 30];
    assert!(spec.run_cpu(&ids, &src, Elems::BF16(&table), Elems::F32(&feat), &mut x).is_err());
    let gpu = embed_gpu(&spec, &ids, &src, &table, &feat).unwrap();
    let row = |t: usize| &gpu[t * 6..(t + 1) * 6];
    assert_eq!(row(0), &from_bf16(&table[0..6])[..]);
    assert!(row(1).iter().chain(row(2)).chain(row(3)).all(|v| v.is_nan()));
    assert_eq!(row(4), &feat[6..12]);
}

// ---- ptxas -----------------------------------------------------------------

fn ptxas_all(specs: Vec<Box<dyn KernelSpec>>) {
    let Some(ptxas) = qvc_codegen::ptxas::for_tests() else {
        eprintln!("ptxas not found: skipped");
        return;
    };
    for s in &specs {
        for t in Target::ALL {
            let text = Module::new(t, vec![s.build()]).print();
            let usage = qvc_codegen::ptxas::assemble(&ptxas, &text, t).unwrap_or_else(|e| panic!("{}: {e}", s.name()));
            for u in usage {
                println!(
                    "{} {}: {} registers, {} spill stores, {} spill loads, {} shared bytes",
                    t.name(),
                    u.name,
                    u.registers,
                    u.spill_stores,
                    u.spill_loads,
                    u.shared_bytes
                );
                assert_eq!(u.spill_stores + u.spill_loads, 0, "{} spills on {}", u.name, t.name());
            }
        }
    }
}

#[test]
fn ptxas_model_specs() {
    let mut specs: Vec<Box<dyn KernelSpec>> = vec![];
    specs.extend(norm::model_specs().into_iter().map(|s| Box::new(s) as Box<dyn KernelSpec>));
    specs.extend(rotary::model_specs().into_iter().map(|s| Box::new(s) as Box<dyn KernelSpec>));
    specs.extend(embed::model_specs().into_iter().map(|s| Box::new(s) as Box<dyn KernelSpec>));
    // Ragged shapes too: every vector width, the warp-per-row norm, a 1024-thread norm.
    for cols in [1, 2, 3, 6, 100, 1023, 16383] {
        let kind = if cols % 2 == 0 { NormKind::LayerNorm { bias: false } } else { NormKind::RmsNorm };
        specs.push(Box::new(NormSpec { kind, rows: 3, cols, eps: 1e-5, residual: true, out: DType::BF16 }));
    }
    for head_dim in [2, 6, 12] {
        specs.push(Box::new(RotarySpec { tokens: 5, heads: 3, head_dim, qkv_in: DType::F32, logn: false, max_seq: 9 }));
    }
    for hidden in [1, 6, 1000] {
        specs.push(Box::new(EmbedSpec { tokens: 4, hidden, vocab: 10, features: DType::BF16, feature_rows: 3 }));
    }
    ptxas_all(specs);
}

#[test]
fn names_are_distinct() {
    let mut names: Vec<String> = norm::model_specs().iter().map(|s| s.name()).collect();
    names.extend(rotary::model_specs().iter().map(|s| s.name()));
    names.extend(embed::model_specs().iter().map(|s| s.name()));
    let n = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), n);
    assert!(names.contains(&"rmsnorm_r300_c4096_e1em6_res_bf16".to_string()), "{names:?}");
}
