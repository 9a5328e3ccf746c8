//! The int4 (GPTQ) GPU kernels: decode GEMV and tensor-core GEMM on the PTX
//! emulator against the naive reference `qvc_kernels::q4::q4_linear_ref`
//! (plus the epilogue in f64), and every model shape through ptxas.
//!
//! Weights are random GPTQ v1 storage on ragged shapes: N and K multiples of
//! 8 but not of any tile, group sizes 8..64 and −1 (one group over K), a
//! ragged last group whenever G does not divide K, symmetric (zero 8) or
//! random asymmetric zeros, and half the cases a random act-order
//! permutation. Outputs are poisoned with NaN before each launch, so an
//! element a kernel forgets to write fails, and row padding must stay NaN.
//!
//! Tolerances (relative L2 against the f64 reference):
//! * GEMV, f32 out: 1e-5 (+5e-6 with GELU/SiLU): the dequantized weight is
//!   the reference's f32 value exactly, only the f32 accumulation differs;
//!   any f16 scale is used;
//! * GEMM, f32 out: the same. The tensor cores take bf16, so the test data is
//!   exactly representable in bf16: activations are bf16 values and scales
//!   have 4 significant bits (`(8..16)·2^-e`), so that `scale·(q − z)`, with
//!   `|q − z| ≤ 16`, needs at most 8 — the kernel's bf16 rounding of the
//!   dequantized weight is then exact and a wrong nibble, zero or scale
//!   shows as an O(1) error, not as noise within a loose tolerance;
//! * bf16 out: 8e-3 (one bf16 rounding of each element, 2^-9 relative).

use half::{bf16, f16};
use proptest::prelude::*;
use qvc_codegen::emu::{run, Arg, Device};
use qvc_codegen::{Module, Target};
use qvc_ir::{DType, Q4Ref};
use qvc_kernels::gpu::gemm::{Act, Epilogue};
use qvc_kernels::gpu::q4::{self, Q4GemmSpec, Q4GemvSpec};
use qvc_kernels::q4::q4_linear_ref;
use qvc_kernels::{gelu_ref, KernelSpec};

/// xorshift64*: deterministic test data from a proptest-chosen seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        (self.next() >> 11) % n
    }
    /// Uniform in [-1, 1), rounded to bf16 (never all zero: the first is nonzero).
    fn bf16_vals(&mut self, n: usize) -> Vec<f32> {
        let mut v: Vec<f32> =
            (0..n).map(|_| bf16::from_f32((self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0).to_f32()).collect();
        if let Some(f) = v.first_mut() {
            *f = if *f == 0.0 { 0.5 } else { *f };
        }
        v
    }
}

/// One random GPTQ weight, owned.
struct QWeight {
    n: usize,
    k: usize,
    group: usize,
    qweight: Vec<u32>,
    qzeros: Vec<u32>,
    scales: Vec<f16>,
    perm: Option<Vec<u32>>,
    inv: Option<Vec<u32>>,
}

impl QWeight {
    /// `group` 0 means −1 (one group over all of K). `exact`: scales with 4
    /// significant bits (see the module doc).
    fn new(r: &mut Rng, n: usize, k: usize, group: usize, asym: bool, act_order: bool, exact: bool) -> QWeight {
        let group = if group == 0 { k } else { group };
        let groups = k.div_ceil(group);
        let qweight = (0..k / 8 * n).map(|_| r.next() as u32).collect();
        let qzeros = (0..groups * n / 8)
            .map(|_| if asym { r.next() as u32 } else { 0x7777_7777 }) // stored zero − 1
            .collect();
        // Scales ~ 1/16 so that Σ over K stays O(1)·sqrt(K)/16.
        let scales = (0..groups * n)
            .map(|_| {
                if exact {
                    f16::from_f32((8 + r.below(8)) as f32 / 256.0)
                } else {
                    f16::from_f32(0.03 + (r.below(1 << 20) as f32) / (1u64 << 20) as f32 * 0.06)
                }
            })
            .collect();
        let (perm, inv) = if act_order {
            let mut p: Vec<u32> = (0..k as u32).collect();
            for i in (1..k).rev() {
                p.swap(i, r.below(i as u64 + 1) as usize);
            }
            let mut inv = vec![0u32; k];
            for (s, &c) in p.iter().enumerate() {
                inv[c as usize] = s as u32;
            }
            (Some(p), Some(inv))
        } else {
            (None, None)
        };
        QWeight { n, k, group, qweight, qzeros, scales, perm, inv }
    }

    fn q4ref(&self) -> Q4Ref<'_> {
        let act_order = self.perm.as_deref().zip(self.inv.as_deref());
        Q4Ref::whole(self.n, self.k, self.group, &self.qweight, &self.qzeros, &self.scales, act_order)
    }

    /// The kernel's params: qweight, qzeros, scales, perm (identity without act-order).
    fn upload(&self, dev: &mut Device) -> Vec<Arg> {
        let perm: Vec<u32> = self.perm.clone().unwrap_or_else(|| (0..self.k as u32).collect());
        vec![
            Arg::Ptr(dev.upload_u32(&self.qweight)),
            Arg::Ptr(dev.upload_u32(&self.qzeros)),
            Arg::Ptr(dev.upload_f16(&self.scales)),
            Arg::Ptr(dev.upload_u32(&perm)),
        ]
    }
}

/// One Linear problem: A `[m, lda]`, weights, bias, residual `[m, ldc]`.
struct Case {
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldc: usize,
    a_dt: DType,
    out: DType,
    epi: Epilogue,
    a: Vec<f32>,
    w: QWeight,
    w2: Option<QWeight>,
    bias: Option<Vec<f32>>,
    residual: Option<Vec<f32>>,
}

#[derive(Clone, Copy, Debug)]
struct Opts {
    group: usize,
    asym: bool,
    act_order: bool,
    exact: bool,
}

impl Case {
    #[allow(clippy::too_many_arguments)]
    fn new(
        seed: u64,
        (m, n, k): (usize, usize, usize),
        (lda, ldc): (usize, usize),
        a_dt: DType,
        out: DType,
        epi: Epilogue,
        o: Opts,
    ) -> Case {
        let mut r = Rng::new(seed);
        let w = QWeight::new(&mut r, n, k, o.group, o.asym, o.act_order, o.exact);
        let w2 = (epi.act == Act::SiluMul).then(|| QWeight::new(&mut r, n, k, o.group, o.asym, o.act_order, o.exact));
        Case {
            m,
            n,
            k,
            lda,
            ldc,
            a_dt,
            out,
            epi,
            a: r.bf16_vals(m * lda),
            w,
            w2,
            bias: epi.bias.then(|| r.bf16_vals(n)),
            residual: epi.residual.then(|| r.bf16_vals(m * ldc)),
        }
    }

    /// `[m, n]` through q4_linear_ref and the epilogue in f64.
    fn reference(&self) -> Vec<f32> {
        let (m, n, k) = (self.m, self.n, self.k);
        let x: Vec<f32> = (0..m).flat_map(|i| self.a[i * self.lda..i * self.lda + k].to_vec()).collect();
        let prod = |w: &QWeight| {
            let mut y = vec![0f32; m * n];
            q4_linear_ref(&x, m, &w.q4ref(), &mut y, false);
            y
        };
        let y = prod(&self.w);
        let g = self.w2.as_ref().map(prod);
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut v = y[i * n + j] as f64;
                if let Some(b) = &self.bias {
                    v += b[j] as f64;
                }
                v = match self.epi.act {
                    Act::None => v,
                    Act::Gelu => gelu_ref(v),
                    Act::SiluMul => {
                        let gv = g.as_ref().unwrap()[i * n + j] as f64;
                        v * gv / (1.0 + (-gv).exp())
                    }
                };
                if let Some(r) = &self.residual {
                    v += r[i * self.ldc + j] as f64;
                }
                out[i * n + j] = v as f32;
            }
        }
        out
    }

    /// Runs `kernel` (params `a, w…, [w2…], [bias], [residual], out, group,
    /// [group2]`); `in_place` passes the residual as out. Returns `[m, n]`
    /// after checking that row padding was not written.
    fn emulate(&self, kernel: &qvc_codegen::Kernel, launch: qvc_kernels::Launch, in_place: bool) -> Vec<f32> {
        let mut dev = Device::new();
        let a = match self.a_dt {
            DType::F32 => dev.upload_f32(&self.a),
            _ => dev.upload_bf16(&self.a.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()),
        };
        let mut args = vec![Arg::Ptr(a)];
        args.extend(self.w.upload(&mut dev));
        if let Some(w2) = &self.w2 {
            args.extend(w2.upload(&mut dev));
        }
        if let Some(b) = &self.bias {
            args.push(Arg::Ptr(dev.upload_f32(b)));
        }
        let len = self.m * self.ldc;
        let esize = if self.out == DType::F32 { 4 } else { 2 };
        let out = match (&self.residual, in_place) {
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
        args.push(Arg::Ptr(out));
        args.push(Arg::U32(self.w.group as u32));
        if let Some(w2) = &self.w2 {
            args.push(Arg::U32(w2.group as u32));
        }
        if let Err(e) = run(kernel, launch.grid, launch.block, &args, &mut dev) {
            panic!("{e}");
        }
        let v: Vec<f32> = match self.out {
            DType::F32 => dev.download_f32(out, len),
            _ => dev.download_bf16(out, len).iter().map(|v| v.to_f32()).collect(),
        };
        let mut got = Vec::with_capacity(self.m * self.n);
        for i in 0..self.m {
            got.extend_from_slice(&v[i * self.ldc..i * self.ldc + self.n]);
            if !in_place {
                let pad = &v[i * self.ldc + self.n..(i + 1) * self.ldc];
                assert!(pad.iter().all(|x| x.is_nan()), "{}: padding of row {i} was written", kernel.name);
            }
        }
        got
    }
}

/// ‖got − want‖₂ / ‖want‖₂, infinite on any NaN.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        if g.is_nan() || w.is_nan() {
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

fn act_strategy() -> impl Strategy<Value = Act> {
    prop_oneof![Just(Act::None), Just(Act::Gelu), Just(Act::SiluMul)]
}

/// 0 stands for −1 (one group over K).
fn group_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![Just(8usize), Just(16), Just(24), Just(32), Just(64), Just(0)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Decode GEMV: M 1..=8, N up to 104 (blocks of 8, 16 or 32 columns,
    /// ragged), K up to 1200 (chunks of 1024 or 512 rows by M, ragged),
    /// every group size and epilogue, act-order or not, padded strides,
    /// in-place residual.
    #[test]
    fn q4_gemv_matches_reference(
        m in 1usize..=8, n8 in 1usize..=13, k8 in 1usize..=150, cols_log in 3u32..=5, group in group_strategy(),
        asym: bool, act_order: bool, act in act_strategy(), bias: bool, residual: bool,
        bf16_out: bool, f32_in: bool, lda_pad in 0usize..5, ldc_pad in 0usize..3, in_place: bool, seed: u64,
    ) {
        let (n, k) = (8 * n8, 8 * k8);
        let a = if f32_in { DType::F32 } else { DType::BF16 };
        let out = if bf16_out { DType::BF16 } else { DType::F32 };
        let epi = Epilogue::new(bias && act != Act::SiluMul, act, residual);
        let spec = Q4GemvSpec::new(m, n, k, a, out, epi).and_then(|s| s.with_strides(k + lda_pad, n + ldc_pad)).unwrap();
        let in_place = in_place && residual && !bf16_out;
        let c = Case::new(seed, (m, n, k), (spec.lda, spec.ldc), a, out, epi,
            Opts { group, asym, act_order, exact: false });
        let kernel = spec.build_with_cols(1 << cols_log);
        let got = c.emulate(&kernel, spec.launch_with_cols(1 << cols_log), in_place);
        let e = rel_l2(&got, &c.reference());
        let tol = tolerance(out, act);
        prop_assert!(e <= tol, "{} (group {}, act-order {}): rel L2 {:e} > {:e}", kernel.name, c.w.group, act_order, e, tol);
    }

    /// Prefill GEMM: M 1..=70 (one or two 64-row tiles), N up to 136 (64-wide
    /// tiles, ragged), K up to 320 (32-row k-tiles, ragged groups), every
    /// epilogue, f32 or bf16 activations, act-order or not, padded strides.
    #[test]
    fn q4_gemm_matches_reference(
        m in 1usize..=70, n8 in 1usize..=17, k8 in 1usize..=40, group in group_strategy(),
        asym: bool, act_order: bool, act in act_strategy(), bias: bool, residual: bool,
        bf16_out: bool, f32_in: bool, lda_pad in 0usize..5, ldc_pad in 0usize..3, in_place: bool, seed: u64,
    ) {
        let (n, k) = (8 * n8, 8 * k8);
        let a = if f32_in { DType::F32 } else { DType::BF16 };
        let out = if bf16_out { DType::BF16 } else { DType::F32 };
        let epi = Epilogue::new(bias && act != Act::SiluMul, act, residual);
        let spec = Q4GemmSpec::new(m, n, k, a, out, epi).and_then(|s| s.with_strides(k + lda_pad, n + ldc_pad)).unwrap();
        let in_place = in_place && residual && !bf16_out;
        let c = Case::new(seed, (m, n, k), (spec.lda, spec.ldc), a, out, epi,
            Opts { group, asym, act_order, exact: true });
        let kernel = spec.build();
        let got = c.emulate(&kernel, spec.launch(), in_place);
        let e = rel_l2(&got, &c.reference());
        let tol = tolerance(out, act);
        prop_assert!(e <= tol, "{} (group {}, act-order {}): rel L2 {:e} > {:e}", kernel.name, c.w.group, act_order, e, tol);
    }
}

/// The GEMM with arbitrary f16 scales (dequantized weights not exact in
/// bf16): the error is the bf16 rounding of each weight, at most 2^-8
/// relative, about 2^-8/√3 ≈ 2.3e-3 in L2 over random data; nonzero, so the
/// weights really went through bf16.
#[test]
fn q4_gemm_rounds_dequantized_weights_to_bf16_only() {
    let epi = Epilogue::new(true, Act::None, false);
    let spec = Q4GemmSpec::new(37, 72, 200, DType::BF16, DType::F32, epi).unwrap();
    let c = Case::new(
        7,
        (37, 72, 200),
        (200, 72),
        DType::BF16,
        DType::F32,
        epi,
        Opts { group: 64, asym: true, act_order: true, exact: false },
    );
    let got = c.emulate(&spec.build(), spec.launch(), false);
    let e = rel_l2(&got, &c.reference());
    assert!(e > 0.0 && e < 4e-3, "rel L2 {e:e}");
}

#[test]
fn q4_specs_reject_what_the_kernels_cannot_do() {
    let e = Epilogue::NONE;
    let (bf, f32_) = (DType::BF16, DType::F32);
    assert!(Q4GemvSpec::new(9, 64, 64, bf, f32_, e).is_err(), "M > 8");
    assert!(Q4GemvSpec::new(1, 60, 64, bf, f32_, e).is_err(), "N % 8");
    assert!(Q4GemmSpec::new(10, 64, 60, bf, f32_, e).is_err(), "K % 8");
    assert!(Q4GemmSpec::new(10, 64, 64, DType::F16, f32_, e).is_err(), "f16 activations");
    assert!(Q4GemmSpec::new(10, 64, 64, bf, f32_, Epilogue::new(true, Act::SiluMul, false)).is_err());
    assert!(Q4GemmSpec::new(10, 64, 64, bf, f32_, e).unwrap().with_strides(63, 64).is_err(), "lda < K");
    let s = Q4GemvSpec::new(3, 64, 128, f32_, bf, Epilogue::new(true, Act::Gelu, true)).unwrap();
    assert_eq!(s.name(), "q4gemv_f32_m3_n64_k128_bias_gelu_res_bf16");
    let g = Q4GemmSpec::new(300, 64, 128, bf, f32_, e).unwrap().with_strides(136, 72).unwrap();
    assert_eq!(g.name(), "q4gemm_bf16_m300_n64_k128_lda136_ldc72_f32");
    // Columns per block: the widest with two blocks per SM (132 SMs).
    let cols = |n| Q4GemvSpec::new(1, n, 4096, bf, f32_, e).unwrap().cols();
    assert_eq!((cols(4096), cols(6144), cols(11008), cols(151936)), (8, 16, 32, 32));
    let s = Q4GemvSpec::new(1, 4096, 4096, bf, f32_, e).unwrap();
    assert_eq!(s.launch().grid, [512, 1, 1]);
    assert_eq!(s.build_with_cols(32).name, "q4gemv_bf16_m1_n4096_k4096_f32_c32");
    // The cost counts half a byte per weight, not two.
    assert!(g.cost().bytes < 300 * 128 * 2 + 64 * 128 + 300 * 72 * 4);
}

/// Every model-shape int4 kernel (and the paths they do not take: f32
/// activations, bf16 out with GELU) assembles for sm_80 and sm_90, and none
/// spills.
#[test]
fn q4_model_shapes_assemble_with_ptxas() {
    let Some(ptxas) = qvc_codegen::ptxas::for_tests() else {
        println!("SKIPPED: ptxas not found");
        return;
    };
    let (gemv, gemm) = q4::model_specs();
    let mut kernels: Vec<qvc_codegen::Kernel> = gemv.iter().map(|s| s.build()).collect();
    kernels.extend(gemm.iter().map(|s| s.build()));
    let e = Epilogue::new(true, Act::Gelu, true);
    kernels.push(Q4GemvSpec::new(5, 1000, 1000, DType::F32, DType::BF16, e).unwrap().build());
    // 16 columns per block (no model shape takes it), one and eight rows.
    for m in [1, 8] {
        let s = Q4GemvSpec::new(m, 6144, 4096, DType::BF16, DType::F32, Epilogue::new(true, Act::None, true)).unwrap();
        assert_eq!(s.cols(), 16);
        kernels.push(s.build());
    }
    kernels.push(Q4GemmSpec::new(300, 1000, 1000, DType::F32, DType::BF16, e).unwrap().build());
    let mut names: Vec<String> = kernels.iter().map(|k| k.name.clone()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), kernels.len(), "int4 kernel names collide");
    for target in Target::ALL {
        let text = Module::new(target, kernels.clone()).print();
        let usage = qvc_codegen::ptxas::assemble(&ptxas, &text, target).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(usage.len(), kernels.len());
        for k in &kernels {
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
            assert_eq!(u.spill_stores + u.spill_loads, 0, "{}: spills on {}", u.name, target.name());
        }
    }
}
