//! Tests of the generic GPU kernels (`qvc_kernels::gpu::generic`): each
//! spec's emulated PTX against its `run_ref` on random small shapes (rank
//! 1..=6, odd sizes, broadcast, permuted and padded strides, offset
//! pointers), each `run_ref` against the IR interpreter itself on a few
//! graphs, the error paths, name uniqueness, and ptxas (sm_80, sm_90, no
//! spills) on a representative set.
//!
//! Comparisons: copies, gather, scatter, rotary and the correctly rounded
//! elementwise ops are exact (bit for bit; NaN matches NaN). The
//! approximated elementwise ops use a relative tolerance of 1e-6 (2e-6 for
//! erf), GELU adds 1e-6·|x| (the builder's erf has absolute error < 5e-7).
//! Sums compare within `(len + 2)·2^-24·Σ|terms|`, the bound of sequential
//! f32 accumulation. Outputs are poisoned (NaN) before each launch, so an
//! element the kernel fails to write fails the comparison.

use std::collections::HashMap;

use half::bf16;
use proptest::prelude::*;
use qvc_codegen::emu::{run, Arg, Device};
use qvc_codegen::{Module, Target};
use qvc_ir::{run_reference_output, BinaryOp, DType, Elems, Graph, InputRef, Op, ReduceOp, UnaryOp};
use qvc_kernels::gpu::generic::{
    contiguous_strides, CopySpec, EltOp, EltwiseSpec, GatherSpec, GenericError, KvAppendSpec, MatMulSpec, ReduceSpec,
    RopeSpec, ScatterRowsSpec,
};
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
    /// Uniform in [-1, 1), never exactly 0.
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
    /// Any finite f32 bit pattern (subnormals included).
    fn finite_bits(&mut self) -> u32 {
        let b = self.next() as u32;
        if (b >> 23) & 0xff == 0xff {
            b & !(1 << 30)
        } else {
            b
        }
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// Strides of a buffer holding `shape` in a random storage order with
/// random padding between dimensions; with `bcast`, about one dimension in
/// four gets stride 0.
fn random_strides(rng: &mut Rng, shape: &[usize], bcast: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..shape.len()).collect();
    rng.shuffle(&mut order);
    let mut strides = vec![0; shape.len()];
    let mut cur = 1;
    for d in order {
        if bcast && rng.below(4) == 0 {
            continue;
        }
        strides[d] = cur;
        cur = cur * shape[d] + if rng.below(3) == 0 { rng.below(3) } else { 0 };
    }
    strides
}

fn launch(spec: &dyn KernelSpec, args: &[Arg], dev: &mut Device) -> Result<(), TestCaseError> {
    let l = spec.launch();
    run(&spec.build(), l.grid, l.block, args, dev).map_err(|e| TestCaseError::fail(format!("{}: {e}", spec.name())))?;
    Ok(())
}

/// Bit-identical, or both NaN.
fn same(g: f32, w: f32) -> bool {
    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan())
}

fn check_exact(name: &str, got: &[f32], want: &[f32]) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        prop_assert!(
            same(g, w),
            "{}: element {} is {:e} ({:#x}), want {:e} ({:#x})",
            name,
            i,
            g,
            g.to_bits(),
            w,
            w.to_bits()
        );
    }
    Ok(())
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

// ---- copy ------------------------------------------------------------------

fn dtype_pair() -> impl Strategy<Value = (DType, DType)> {
    prop::sample::select(vec![
        (DType::F32, DType::F32),
        (DType::F32, DType::BF16),
        (DType::BF16, DType::F32),
        (DType::BF16, DType::BF16),
        (DType::I32, DType::I32),
    ])
}

/// `n` random elements of `dtype` as bytes: arbitrary bits when the copy
/// moves bits, finite values when it converts.
fn random_elems(rng: &mut Rng, dtype: DType, n: usize, convert: bool) -> Vec<u8> {
    let mut out = vec![];
    for _ in 0..n {
        let bits = if convert { rng.finite_bits() } else { rng.next() as u32 };
        match dtype {
            DType::BF16 => out.extend_from_slice(&((bits >> 16) as u16).to_le_bytes()),
            _ => out.extend_from_slice(&bits.to_le_bytes()),
        }
    }
    out
}

fn check_copy(spec: &CopySpec, src_off: usize, dst_off: usize, seed: u64) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(seed);
    let (ss, ds) = (spec.src.size(), spec.dst.size());
    let convert = spec.src != spec.dst;
    let src = random_elems(&mut rng, spec.src, src_off + spec.src_len(), convert);
    let dst0 = random_elems(&mut rng, spec.dst, dst_off + spec.dst_len(), false);
    let mut want = dst0.clone();
    spec.run_ref(&src[src_off * ss..], &mut want[dst_off * ds..]).unwrap();

    let mut dev = Device::new();
    let sp = dev.upload(&src);
    let dp = dev.upload(&dst0);
    launch(spec, &[Arg::Ptr(sp + (src_off * ss) as u64), Arg::Ptr(dp + (dst_off * ds) as u64)], &mut dev)?;
    let got = dev.download(dp, dst0.len());
    prop_assert!(got == want, "{}: dst bytes differ", spec.name());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Permuted, padded, broadcast (source) strides and offset pointers, every dtype pair.
    #[test]
    fn copy_matches_ref(
        shape in prop::collection::vec(1usize..=4, 1..=6), (src, dst) in dtype_pair(),
        src_off in 0usize..=3, dst_off in 0usize..=3, seed: u64,
    ) {
        let mut rng = Rng::new(seed ^ 0x5eed);
        let src_strides = random_strides(&mut rng, &shape, true);
        let dst_strides = random_strides(&mut rng, &shape, false);
        let spec = CopySpec { shape, src_strides, dst_strides, src, dst };
        prop_assert_eq!(spec.validate(), Ok(()));
        check_copy(&spec, src_off, dst_off, seed)?;
    }
}

/// f32 → bf16 rounds to nearest even: ties in both directions, the largest
/// finite value rounding to inf, a subnormal, and the signs.
#[test]
fn copy_bf16_rounding() {
    let vals: Vec<f32> = [
        0x3f80_8000u32, // 1 + 2^-8: tie, even down to 1.0
        0x3f81_8000,    // tie, even up
        0x3f80_8001,    // above the tie: up
        0x7f7f_ffff,    // f32::MAX: to inf
        0x0000_1234,    // subnormal
        0xbf80_7fff,    // negative, below the tie: down
    ]
    .iter()
    .map(|&b| f32::from_bits(b))
    .collect();
    let spec = CopySpec::contiguous(vec![vals.len()], DType::F32, DType::BF16);
    let mut want = vec![0u8; vals.len() * 2];
    spec.run_ref(&to_bytes(&vals), &mut want).unwrap();
    let want_bits: Vec<u16> = want.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    assert_eq!(want_bits, [0x3f80, 0x3f82, 0x3f81, 0x7f80, 0x0000, 0xbf80]);
    let mut dev = Device::new();
    let sp = dev.upload_f32(&vals);
    let dp = dev.alloc_poisoned(vals.len() * 2);
    launch(&spec, &[Arg::Ptr(sp), Arg::Ptr(dp)], &mut dev).unwrap();
    assert_eq!(dev.download(dp, vals.len() * 2), want);
}

// ---- elementwise -----------------------------------------------------------

fn all_ops() -> Vec<EltOp> {
    use BinaryOp as B;
    use UnaryOp as U;
    let mut ops: Vec<EltOp> = [U::Neg, U::Exp, U::Log, U::Sqrt, U::Rsqrt, U::Recip, U::Erf, U::Tanh, U::Sigmoid]
        .into_iter()
        .map(EltOp::Unary)
        .collect();
    ops.extend([B::Add, B::Sub, B::Mul, B::Div, B::Max, B::Ge].into_iter().map(EltOp::Binary));
    ops.extend([EltOp::Where, EltOp::Gelu, EltOp::Silu]);
    ops
}

/// Whether the device result is the correctly rounded one (compared exactly).
fn exact_op(op: EltOp) -> bool {
    matches!(op, EltOp::Unary(UnaryOp::Neg | UnaryOp::Sqrt | UnaryOp::Recip) | EltOp::Binary(_) | EltOp::Where)
}

/// Input `k` of `op`: values over the op's interesting range, with about one
/// in 16 special (±0, ±inf, NaN; no −0 for Max, whose ±0 order is unspecified
/// in Rust).
fn elt_inputs(rng: &mut Rng, op: EltOp, k: usize, n: usize) -> Vec<f32> {
    let scale = match op {
        EltOp::Unary(UnaryOp::Exp) => [1.0, 10.0, 90.0][rng.below(3)],
        EltOp::Unary(UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt) => [1e-3, 1.0, 1e3][rng.below(3)],
        EltOp::Gelu | EltOp::Silu | EltOp::Unary(UnaryOp::Sigmoid) => [1.0, 6.0, 20.0][rng.below(3)],
        _ => [1.0, 4.0][rng.below(2)],
    };
    let positive = matches!(op, EltOp::Unary(UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt));
    let specials: &[f32] = if op == EltOp::Binary(BinaryOp::Max) {
        &[0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN]
    } else {
        &[0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN]
    };
    (0..n)
        .map(|_| {
            if rng.below(16) == 0 {
                return specials[rng.below(specials.len())];
            }
            // Where's condition: mostly exact zeros and ones.
            if op == EltOp::Where && k == 0 {
                return [0.0, 1.0, -0.0, 2.5][rng.below(4)];
            }
            let v = rng.uniform() * scale;
            if positive && rng.below(8) != 0 {
                v.abs()
            } else {
                v
            }
        })
        .collect()
}

/// Whether `g` is within tolerance of `w` for `op` on input magnitude `ax`.
fn elt_close(op: EltOp, g: f32, w: f32, ax: f32) -> bool {
    if exact_op(op) {
        return same(g, w);
    }
    if w.is_nan() || g.is_nan() || w.is_infinite() || g.is_infinite() {
        return same(g, w);
    }
    let rtol = if op == EltOp::Unary(UnaryOp::Erf) { 2e-6 } else { 1e-6 };
    let atol = if op == EltOp::Gelu { 1e-6 * ax as f64 } else { 0.0 } + 1e-37;
    (g as f64 - w as f64).abs() <= rtol * (w as f64).abs() + atol
}

fn check_eltwise(spec: &EltwiseSpec, seed: u64) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(seed);
    let n = spec.numel();
    let inputs: Vec<Vec<f32>> =
        (0..spec.strides.len()).map(|k| elt_inputs(&mut rng, spec.op, k, spec.input_len(k))).collect();
    let refs: Vec<&[f32]> = inputs.iter().map(|v| &v[..]).collect();
    let mut want = vec![0.0; n];
    spec.run_ref(&refs, &mut want).unwrap();

    let mut dev = Device::new();
    let mut args: Vec<Arg> = inputs.iter().map(|v| Arg::Ptr(dev.upload_f32(v))).collect();
    let op = dev.alloc_poisoned(n * 4);
    args.push(Arg::Ptr(op));
    prop_assert_eq!(args.len(), spec.param_names().len());
    launch(spec, &args, &mut dev)?;
    let got = dev.download_f32(op, n);
    // |x| of the first input at each output, for GELU's absolute tolerance.
    let mut x0 = vec![0.0f32; n];
    let s0 = &spec.strides[0];
    for (lin, x) in x0.iter_mut().enumerate() {
        let (mut rem, mut off) = (lin, 0);
        for d in (0..spec.shape.len()).rev() {
            off += (rem % spec.shape[d]) * s0[d];
            rem /= spec.shape[d];
        }
        *x = inputs[0][off].abs();
    }
    for i in 0..n {
        prop_assert!(
            elt_close(spec.op, got[i], want[i], x0[i]),
            "{} {:?}: element {} is {:e}, want {:e} (|x0| = {})",
            spec.name(),
            spec.op,
            i,
            got[i],
            want[i],
            x0[i]
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Every op, broadcast / permuted / padded input strides.
    #[test]
    fn eltwise_matches_ref(
        shape in prop::collection::vec(1usize..=4, 1..=6), op in prop::sample::select(all_ops()), seed: u64,
    ) {
        let mut rng = Rng::new(seed ^ 0xe17);
        let strides = (0..op.arity()).map(|_| random_strides(&mut rng, &shape, true)).collect();
        let spec = EltwiseSpec { shape, op, strides };
        prop_assert_eq!(spec.validate(), Ok(()));
        check_eltwise(&spec, seed)?;
    }
}

/// Every op on a dense sweep of its range (one contiguous launch each), so
/// each approximation is checked across its branches, not only where the
/// random cases fall.
#[test]
fn eltwise_sweeps() {
    for op in all_ops() {
        let n = 4001;
        let lim: f32 = match op {
            EltOp::Unary(UnaryOp::Exp) => 104.0,
            EltOp::Unary(UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt) => 0.0,
            _ => 12.0,
        };
        let xs: Vec<f32> = (0..n)
            .map(|i| {
                let t = i as f32 / (n - 1) as f32;
                if lim == 0.0 {
                    // Logarithmic over 1e-44 .. 1e38: subnormals to huge.
                    10f32.powf(-44.0 + 82.0 * t)
                } else {
                    (2.0 * t - 1.0) * lim
                }
            })
            .collect();
        let strides = vec![vec![1]; op.arity()];
        let spec = EltwiseSpec { shape: vec![n], op, strides };
        let inputs: Vec<Vec<f32>> =
            (0..op.arity()).map(|k| xs.iter().map(|x| x * (1.0 + k as f32 * 0.37)).collect()).collect();
        let refs: Vec<&[f32]> = inputs.iter().map(|v| &v[..]).collect();
        let mut want = vec![0.0; n];
        spec.run_ref(&refs, &mut want).unwrap();
        let mut dev = Device::new();
        let mut args: Vec<Arg> = inputs.iter().map(|v| Arg::Ptr(dev.upload_f32(v))).collect();
        let op_p = dev.alloc_poisoned(n * 4);
        args.push(Arg::Ptr(op_p));
        launch(&spec, &args, &mut dev).unwrap();
        let got = dev.download_f32(op_p, n);
        for i in 0..n {
            assert!(
                elt_close(op, got[i], want[i], xs[i].abs()),
                "{op:?} at x = {:e}: got {:e}, want {:e}",
                xs[i],
                got[i],
                want[i]
            );
        }
    }
}

// ---- gather / scatter ------------------------------------------------------

fn bad_id(rng: &mut Rng, n: usize) -> i32 {
    [-1, n as i32, n as i32 + 7, i32::MIN, i32::MAX][rng.below(5)]
}

fn check_gather(spec: &GatherSpec, ids: &[i32], seed: u64) -> Result<Vec<f32>, TestCaseError> {
    let mut rng = Rng::new(seed);
    let n_tab = spec.vocab * spec.cols;
    let tab_f: Vec<f32> = rng.vec(n_tab, 3.0);
    let tab_b: Vec<bf16> = tab_f.iter().map(|&x| bf16::from_f32(x)).collect();
    let table = match spec.table {
        DType::F32 => Elems::F32(&tab_f),
        _ => Elems::BF16(&tab_b),
    };
    let n = spec.rows * spec.cols;
    let mut want = vec![0.0; n];
    spec.run_ref(table, ids, &mut want).unwrap();
    let mut dev = Device::new();
    let tp = match spec.table {
        DType::F32 => dev.upload_f32(&tab_f),
        _ => dev.upload_bf16(&tab_b),
    };
    let ip = dev.upload_i32(ids);
    let op = dev.alloc_poisoned(n * 4);
    launch(spec, &[Arg::Ptr(tp), Arg::Ptr(ip), Arg::Ptr(op)], &mut dev)?;
    let got = dev.download_f32(op, n);
    check_exact(&spec.name(), &got, &want)?;
    Ok(got)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn gather_matches_ref(
        rows in 1usize..=10, cols in 1usize..=40, vocab in 1usize..=12,
        table in prop::sample::select(vec![DType::F32, DType::BF16]), seed: u64,
    ) {
        let mut rng = Rng::new(seed ^ 0x9a);
        let ids: Vec<i32> =
            (0..rows).map(|_| if rng.below(6) == 0 { bad_id(&mut rng, vocab) } else { rng.below(vocab) as i32 }).collect();
        check_gather(&GatherSpec { rows, cols, vocab, table }, &ids, seed)?;
    }

    #[test]
    fn scatter_rows_matches_ref(rows in 1usize..=8, cols in 1usize..=40, dst_rows in 1usize..=12, seed: u64) {
        let mut rng = Rng::new(seed);
        // Distinct targets (the kernel's duplicate order is unspecified), some bad.
        let mut perm: Vec<usize> = (0..dst_rows).collect();
        rng.shuffle(&mut perm);
        let idx: Vec<i32> = (0..rows)
            .map(|i| if i >= dst_rows || rng.below(5) == 0 { bad_id(&mut rng, dst_rows) } else { perm[i] as i32 })
            .collect();
        let spec = ScatterRowsSpec { rows, cols, dst_rows };
        check_scatter(&spec, &idx, seed)?;
    }

    /// A program compiled for `rows` feature rows run with only `real` of
    /// them: the tail of the index is `NO_ROW` (-1) and leaves the
    /// destination alone, exactly as the interpreter does.
    #[test]
    fn scatter_rows_skips_a_no_row_tail(rows in 1usize..=10, cols in 1usize..=40, dst_rows in 1usize..=12, seed: u64) {
        let mut rng = Rng::new(seed ^ 0x7e);
        let real = rng.below(rows.min(dst_rows) + 1);
        let mut perm: Vec<usize> = (0..dst_rows).collect();
        rng.shuffle(&mut perm);
        let idx: Vec<i32> = (0..rows).map(|i| if i < real { perm[i] as i32 } else { qvc_ir::NO_ROW }).collect();
        let spec = ScatterRowsSpec { rows, cols, dst_rows };
        let (before, after) = check_scatter(&spec, &idx, seed)?;
        let mut g = Graph::new();
        let di = g.input("dst", DType::F32, vec![dst_rows, cols]);
        let si = g.input("src", DType::F32, vec![rows, cols]);
        let ri = g.input("rows", DType::I32, vec![rows]);
        let y = g.scatter_rows(di, si, ri).unwrap();
        g.set_output("y", y);
        let src = Rng::new(seed ^ 0x5c).vec(rows * cols, 2.0);
        let want = interp(&g, &[("dst", &before), ("src", &src)], &[("rows", &idx)]);
        check_exact("scatter_rows vs interpreter", &after, &want)?;
        for r in (0..dst_rows).filter(|r| !perm[..real].contains(r)) {
            prop_assert_eq!(&after[r * cols..(r + 1) * cols], &before[r * cols..(r + 1) * cols], "row {} untouched", r);
        }
    }
}

fn check_scatter(spec: &ScatterRowsSpec, idx: &[i32], seed: u64) -> Result<(Vec<f32>, Vec<f32>), TestCaseError> {
    let mut rng = Rng::new(seed ^ 0x5c);
    let src = rng.vec(spec.rows * spec.cols, 2.0);
    let out0 = rng.vec(spec.dst_rows * spec.cols, 5.0);
    let mut want = out0.clone();
    spec.run_ref(&src, idx, &mut want).unwrap();
    let mut dev = Device::new();
    let sp = dev.upload_f32(&src);
    let rp = dev.upload_i32(idx);
    let op = dev.upload_f32(&out0);
    launch(spec, &[Arg::Ptr(sp), Arg::Ptr(rp), Arg::Ptr(op)], &mut dev)?;
    let got = dev.download_f32(op, out0.len());
    check_exact(&spec.name(), &got, &want)?;
    Ok((out0, got))
}

/// A bad id gives exactly that row of NaN; good rows are the table's.
#[test]
fn gather_bad_id_gives_nan_row() {
    let spec = GatherSpec { rows: 4, cols: 5, vocab: 3, table: DType::BF16 };
    let got = check_gather(&spec, &[2, -1, 3, 0], 11).unwrap();
    let row = |t: usize| &got[t * 5..(t + 1) * 5];
    assert!(row(1).iter().chain(row(2)).all(|v| v.is_nan()));
    assert!(row(0).iter().chain(row(3)).all(|v| v.is_finite()));
}

/// A row index outside `0..dst_rows` leaves the destination alone.
#[test]
fn scatter_skips_bad_rows() {
    let spec = ScatterRowsSpec { rows: 3, cols: 4, dst_rows: 3 };
    let (before, after) = check_scatter(&spec, &[2, 3, -1], 5).unwrap();
    assert_eq!(after[..8], before[..8], "rows 0 and 1 must be untouched");
    assert_ne!(after[8..], before[8..], "row 2 must be overwritten");
}

// ---- matmul, reduce --------------------------------------------------------

/// Largest |error| allowed for a sequential f32 sum of `n` terms whose
/// magnitudes add up to `mag`.
fn sum_tol(n: usize, mag: f64) -> f64 {
    (n as f64 + 2.0) * f64::powi(2.0, -24) * mag + 1e-30
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Random (permuted, padded) a and b layouts, shared or batched b, f32 or bf16 b.
    #[test]
    fn matmul_matches_ref(
        batch in 1usize..=3, m in 1usize..=5, n in 1usize..=6, k in 1usize..=48,
        b_dt in prop::sample::select(vec![DType::F32, DType::BF16]), shared_b: bool, seed: u64,
    ) {
        let mut rng = Rng::new(seed);
        let a_s = random_strides(&mut rng, &[batch, m, k], false);
        let mut b_s = random_strides(&mut rng, &[batch, k, n], false);
        if shared_b {
            b_s[0] = 0;
        }
        let spec = MatMulSpec { batch, m, n, k, a_strides: [a_s[0], a_s[1], a_s[2]], b_strides: [b_s[0], b_s[1], b_s[2]], b: b_dt };
        prop_assert_eq!(spec.validate(), Ok(()));
        let a = rng.vec(spec.a_len(), 2.0);
        let bf = rng.vec(spec.b_len(), 2.0);
        let bb: Vec<bf16> = bf.iter().map(|&x| bf16::from_f32(x)).collect();
        let bw: Vec<f32> = match b_dt { DType::F32 => bf.clone(), _ => bb.iter().map(|x| x.to_f32()).collect() };
        let b_in = match b_dt { DType::F32 => Elems::F32(&bf), _ => Elems::BF16(&bb) };
        let mut want = vec![0.0; batch * m * n];
        spec.run_ref(&a, b_in, &mut want).unwrap();
        let mut dev = Device::new();
        let ap = dev.upload_f32(&a);
        let bp = match b_dt { DType::F32 => dev.upload_f32(&bf), _ => dev.upload_bf16(&bb) };
        let op = dev.alloc_poisoned(want.len() * 4);
        launch(&spec, &[Arg::Ptr(ap), Arg::Ptr(bp), Arg::Ptr(op)], &mut dev)?;
        let got = dev.download_f32(op, want.len());
        let ([a0, a1, a2], [b0, b1, b2]) = (spec.a_strides, spec.b_strides);
        for bt in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    let mag: f64 = (0..k).map(|p| (a[bt * a0 + i * a1 + p * a2] * bw[bt * b0 + p * b1 + j * b2]).abs() as f64).sum();
                    let o = (bt * m + i) * n + j;
                    let err = (got[o] as f64 - want[o] as f64).abs();
                    prop_assert!(err <= sum_tol(k, mag), "{} out[{bt},{i},{j}] = {}, want {}", spec.name(), got[o], want[o]);
                }
            }
        }
    }

    /// Sum, Mean and Max (with NaN elements, which Max ignores).
    #[test]
    fn reduce_matches_ref(
        outer in 1usize..=5, len in 1usize..=60, inner in 1usize..=5,
        op in prop::sample::select(vec![ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max]), seed: u64,
    ) {
        let mut rng = Rng::new(seed);
        let spec = ReduceSpec { outer, len, inner, op };
        let mut x = rng.vec(outer * len * inner, 4.0);
        if op == ReduceOp::Max {
            for v in x.iter_mut() {
                if rng.below(10) == 0 {
                    *v = f32::NAN;
                }
            }
        }
        let mut want = vec![0.0; outer * inner];
        spec.run_ref(&x, &mut want).unwrap();
        let mut dev = Device::new();
        let xp = dev.upload_f32(&x);
        let op_p = dev.alloc_poisoned(want.len() * 4);
        launch(&spec, &[Arg::Ptr(xp), Arg::Ptr(op_p)], &mut dev)?;
        let got = dev.download_f32(op_p, want.len());
        if op == ReduceOp::Max {
            check_exact(&spec.name(), &got, &want)?;
        } else {
            for o in 0..outer {
                for i in 0..inner {
                    let mag: f64 = (0..len).map(|k| x[(o * len + k) * inner + i].abs() as f64).sum();
                    let scale = if op == ReduceOp::Mean { len as f64 } else { 1.0 };
                    let (g, w) = (got[o * inner + i] as f64, want[o * inner + i] as f64);
                    prop_assert!((g - w).abs() <= sum_tol(len, mag) / scale, "{} out[{o},{i}] = {g}, want {w}", spec.name());
                }
            }
        }
    }
}

// ---- rotary ----------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// q/k columns inside a wider (QKV-like, padded) row, read through an offset pointer.
    #[test]
    fn rope_matches_ref(
        tokens in 1usize..=6, heads in 1usize..=4, half in 1usize..=12, head_pad in 0usize..=2,
        row_extra in 0usize..=20, x_off in 0usize..=9, logn: bool, bf16_out: bool, seed: u64,
    ) {
        let mut rng = Rng::new(seed);
        let d = 2 * half;
        let head_stride = d + head_pad;
        let token_stride = heads * head_stride + row_extra;
        let spec = RopeSpec { tokens, heads, head_dim: d, token_stride, head_stride, logn, bf16_out };
        let x = rng.vec(x_off + spec.x_len(), 2.0);
        let ang = rng.vec(tokens * d, 3.0);
        let cos: Vec<f32> = ang.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = ang.iter().map(|a| a.sin()).collect();
        let ln: Vec<f32> = rng.vec(tokens, 0.5).into_iter().map(|v| 1.2 + v).collect();
        let n = tokens * heads * d;
        let mut want = vec![0.0; n];
        spec.run_ref(&x[x_off..], &cos, &sin, logn.then_some(&ln[..]), &mut want).unwrap();
        let mut dev = Device::new();
        let xp = dev.upload_f32(&x);
        let mut args = vec![Arg::Ptr(xp + 4 * x_off as u64), Arg::Ptr(dev.upload_f32(&cos)), Arg::Ptr(dev.upload_f32(&sin))];
        if logn {
            args.push(Arg::Ptr(dev.upload_f32(&ln)));
        }
        let op = dev.alloc_poisoned(n * 4);
        args.push(Arg::Ptr(op));
        prop_assert_eq!(args.len(), spec.param_names().len());
        launch(&spec, &args, &mut dev)?;
        if bf16_out {
            // The f32 result rounded to nearest even.
            let got: Vec<u16> = dev.download_bf16(op, n).iter().map(|v| v.to_bits()).collect();
            let want: Vec<u16> = want.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
            prop_assert_eq!(got, want, "{}", spec.name());
        } else {
            check_exact(&spec.name(), &dev.download_f32(op, n), &want)?;
        }
    }
}

// ---- the references against the IR interpreter ----------------------------

/// Runs `g` (output "y") on f32 and i32 inputs with the reference interpreter.
fn interp(g: &Graph, f: &[(&str, &[f32])], i: &[(&str, &[i32])]) -> Vec<f32> {
    let mut inputs = HashMap::new();
    for (name, v) in f {
        inputs.insert(name.to_string(), InputRef::F32(v));
    }
    for (name, v) in i {
        inputs.insert(name.to_string(), InputRef::I32(v));
    }
    let weights: HashMap<String, Vec<f32>> = HashMap::new();
    run_reference_output(g, &weights, &inputs, "y").unwrap()
}

fn assert_same(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(same(g, w), "{what}: element {i} is {g:e}, the interpreter gives {w:e}");
    }
}

/// Every elementwise op with broadcasting (inputs `[3,1,5]`, `[4,1]`, `[3,4,1]`
/// onto `[3,4,5]`): `run_ref` is bit-identical to the interpreter.
#[test]
fn eltwise_ref_is_the_interpreter() {
    let mut rng = Rng::new(3);
    let shapes: [&[usize]; 3] = [&[3, 1, 5], &[4, 1], &[3, 4, 1]];
    // The strides each input has when broadcast onto [3, 4, 5].
    let strides = [vec![5, 0, 1], vec![0, 1, 0], vec![4, 1, 0]];
    let data: Vec<Vec<f32>> = shapes.iter().map(|s| rng.vec(s.iter().product(), 3.0)).collect();
    for op in all_ops() {
        let mut g = Graph::new();
        let names = ["a", "b", "c"];
        let mut ins: Vec<_> = (0..op.arity()).map(|k| g.input(names[k], DType::F32, shapes[k].to_vec())).collect();
        // Unary ops take the full shape: broadcast input 0 with a zero add.
        if op.arity() == 1 {
            let z = g.constant(vec![0.0; 60], vec![3, 4, 5]).unwrap();
            ins[0] = g.add(ins[0], z).unwrap();
        }
        let y = match op {
            EltOp::Unary(u) => g.unary(u, ins[0]),
            EltOp::Binary(o) => g.binary(o, ins[0], ins[1]),
            EltOp::Where => g.where_(ins[0], ins[1], ins[2]),
            EltOp::Gelu => g.gelu(ins[0]),
            EltOp::Silu => g.silu(ins[0]),
        }
        .unwrap();
        g.set_output("y", y);
        let mut data = data.clone();
        if matches!(op, EltOp::Unary(UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt)) {
            data[0].iter_mut().for_each(|v| *v = v.abs());
        }
        let f: Vec<(&str, &[f32])> = (0..op.arity()).map(|k| (names[k], &data[k][..])).collect();
        let want = interp(&g, &f, &[]);
        let spec = EltwiseSpec { shape: vec![3, 4, 5], op, strides: strides[..op.arity()].to_vec() };
        let refs: Vec<&[f32]> = data[..op.arity()].iter().map(|v| &v[..]).collect();
        let mut got = vec![0.0; 60];
        spec.run_ref(&refs, &mut got).unwrap();
        assert_same(&format!("{op:?}"), &got, &want);
    }
}

/// QkvRotary with logn (and plain Rotary): `run_ref` on the offset slice of
/// the QKV rows is bit-identical to the interpreter.
#[test]
fn rope_ref_is_the_interpreter() {
    let (t, heads, d, width, offset) = (3, 2, 8, 56, 20);
    let mut rng = Rng::new(9);
    let qkv = rng.vec(t * width, 2.0);
    let cos = rng.vec(t * d, 1.0);
    let sin = rng.vec(t * d, 1.0);
    let ln = rng.vec(t, 1.5);
    for logn in [false, true] {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, vec![t, width]);
        let c = g.input("cos", DType::F32, vec![t, d]);
        let s = g.input("sin", DType::F32, vec![t, d]);
        let mut ins = vec![x, c, s];
        if logn {
            ins.push(g.input("logn", DType::F32, vec![t, 1, 1]));
        }
        let y = g.push(Op::QkvRotary { offset, heads, logn }, &ins).unwrap();
        g.set_output("y", y);
        let want = interp(&g, &[("x", &qkv), ("cos", &cos), ("sin", &sin), ("logn", &ln)], &[]);
        let spec =
            RopeSpec { tokens: t, heads, head_dim: d, token_stride: width, head_stride: d, logn, bf16_out: false };
        let mut got = vec![0.0; t * heads * d];
        spec.run_ref(&qkv[offset..], &cos, &sin, logn.then_some(&ln[..]), &mut got).unwrap();
        assert_same(&format!("qkv_rotary logn={logn}"), &got, &want);
    }
    // Plain Rotary on a contiguous [t, heads, d].
    let xr = rng.vec(t * heads * d, 2.0);
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![t, heads, d]);
    let c = g.input("cos", DType::F32, vec![t, d]);
    let s = g.input("sin", DType::F32, vec![t, d]);
    let y = g.rotary(x, c, s).unwrap();
    g.set_output("y", y);
    let want = interp(&g, &[("x", &xr), ("cos", &cos), ("sin", &sin)], &[]);
    let spec = RopeSpec {
        tokens: t,
        heads,
        head_dim: d,
        token_stride: heads * d,
        head_stride: d,
        logn: false,
        bf16_out: false,
    };
    let mut got = vec![0.0; t * heads * d];
    spec.run_ref(&xr, &cos, &sin, None, &mut got).unwrap();
    assert_same("rotary", &got, &want);
}

/// Reduce over a middle axis, a batched MatMul with a shared transposed b,
/// Gather and ScatterRows: `run_ref` equals the interpreter.
#[test]
fn other_refs_are_the_interpreter() {
    let mut rng = Rng::new(4);
    let x = rng.vec(2 * 5 * 3, 3.0);
    for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
        let mut g = Graph::new();
        let xi = g.input("x", DType::F32, vec![2, 5, 3]);
        let y = g.reduce(op, xi, 1).unwrap();
        g.set_output("y", y);
        let want = interp(&g, &[("x", &x)], &[]);
        let mut got = vec![0.0; 6];
        ReduceSpec { outer: 2, len: 5, inner: 3, op }.run_ref(&x, &mut got).unwrap();
        assert_same(&format!("reduce {op:?}"), &got, &want);
    }

    let (a, w) = (rng.vec(2 * 3 * 4, 1.0), rng.vec(5 * 4, 1.0));
    let mut g = Graph::new();
    let ai = g.input("a", DType::F32, vec![2, 3, 4]);
    let wi = g.input("w", DType::F32, vec![5, 4]);
    let y = g.matmul_t(ai, wi).unwrap();
    g.set_output("y", y);
    let want = interp(&g, &[("a", &a), ("w", &w)], &[]);
    let mut got = vec![0.0; 2 * 3 * 5];
    MatMulSpec::contiguous(2, 3, 5, 4, true, true, DType::F32).run_ref(&a, Elems::F32(&w), &mut got).unwrap();
    assert_same("matmul_t", &got, &want);

    let table = rng.vec(6 * 3, 1.0);
    let ids = [5, 0, 2, 2];
    let mut g = Graph::new();
    let ti = g.input("table", DType::F32, vec![6, 3]);
    let ii = g.input("ids", DType::I32, vec![4]);
    let y = g.gather(ti, ii).unwrap();
    g.set_output("y", y);
    let want = interp(&g, &[("table", &table)], &[("ids", &ids)]);
    let mut got = vec![0.0; 12];
    GatherSpec { rows: 4, cols: 3, vocab: 6, table: DType::F32 }.run_ref(Elems::F32(&table), &ids, &mut got).unwrap();
    assert_same("gather", &got, &want);

    let (dst, src, rows) = (rng.vec(5 * 3, 1.0), rng.vec(2 * 3, 1.0), [4, 1]);
    let mut g = Graph::new();
    let di = g.input("dst", DType::F32, vec![5, 3]);
    let si = g.input("src", DType::F32, vec![2, 3]);
    let ri = g.input("rows", DType::I32, vec![2]);
    let y = g.scatter_rows(di, si, ri).unwrap();
    g.set_output("y", y);
    let want = interp(&g, &[("dst", &dst), ("src", &src)], &[("rows", &rows)]);
    let mut got = dst.clone();
    ScatterRowsSpec { rows: 2, cols: 3, dst_rows: 5 }.run_ref(&src, &rows, &mut got).unwrap();
    assert_same("scatter_rows", &got, &want);
}

// ---- errors, names, cost, ptxas --------------------------------------------

#[test]
fn invalid_specs_are_rejected() {
    let f = DType::F32;
    let ok = CopySpec::contiguous(vec![2, 3], f, DType::BF16);
    assert_eq!(ok.validate(), Ok(()));
    let err = |s: CopySpec| s.validate().unwrap_err();
    assert!(matches!(err(CopySpec::contiguous(vec![], f, f)), GenericError::Rank { rank: 0, .. }));
    assert!(matches!(err(CopySpec::contiguous(vec![1; 7], f, f)), GenericError::Rank { rank: 7, .. }));
    assert!(matches!(err(CopySpec::contiguous(vec![2, 0], f, f)), GenericError::Empty { .. }));
    assert!(matches!(err(CopySpec { src_strides: vec![1], ..ok.clone() }), GenericError::StridesLen { .. }));
    assert!(matches!(err(CopySpec { src: DType::I32, ..ok.clone() }), GenericError::DType { .. }));
    assert!(matches!(err(CopySpec { dst: DType::F16, ..ok.clone() }), GenericError::DType { .. }));
    assert!(matches!(err(CopySpec { dst_strides: vec![1, 1], ..ok.clone() }), GenericError::DstOverlap { .. }));
    assert!(matches!(err(CopySpec { dst_strides: vec![0, 1], ..ok.clone() }), GenericError::DstOverlap { .. }));
    assert!(matches!(err(CopySpec::contiguous(vec![1 << 16, 1 << 15], f, f)), GenericError::TooLarge { .. }));
    assert!(matches!(err(CopySpec { src_strides: vec![1 << 31, 1], ..ok.clone() }), GenericError::TooLarge { .. }));
    // A broadcast source is fine.
    assert_eq!(CopySpec { src_strides: vec![0, 1], ..ok.clone() }.validate(), Ok(()));

    let e = EltwiseSpec { shape: vec![4], op: EltOp::Binary(BinaryOp::Add), strides: vec![vec![1]] };
    assert!(matches!(e.validate().unwrap_err(), GenericError::StridesLen { want: 2, got: 1, .. }));
    let gs = GatherSpec { rows: 2, cols: 3, vocab: 4, table: DType::I32 };
    assert!(matches!(gs.validate().unwrap_err(), GenericError::DType { .. }));
    let r =
        RopeSpec { tokens: 2, heads: 1, head_dim: 5, token_stride: 5, head_stride: 5, logn: false, bf16_out: false };
    assert_eq!(r.validate(), Err(GenericError::OddHeadDim { head_dim: 5 }));
    assert!(MatMulSpec::contiguous(1, 2, 3, 4, false, false, DType::I32).validate().is_err());
    assert!(MatMulSpec::contiguous(1, 2, 3, 0, false, false, DType::F32).validate().is_err());
    assert!(ReduceSpec { outer: 1, len: 0, inner: 1, op: ReduceOp::Sum }.validate().is_err());
    assert!(ScatterRowsSpec { rows: 1 << 20, cols: 1 << 11, dst_rows: 1 }.validate().is_err());

    // Buffers that do not fit the spec are errors, not panics.
    let mut out = [0.0; 5];
    let red = ReduceSpec { outer: 2, len: 3, inner: 1, op: ReduceOp::Max };
    assert_eq!(red.run_ref(&[0.0; 6], &mut out), Err(GenericError::Len { what: "out", need: 2, got: 5 }));
    let mut dst = [0u8; 11];
    assert!(matches!(ok.run_ref(&[0u8; 24], &mut dst), Err(GenericError::Len { what: "dst bytes", .. })));
    let rl = RopeSpec { head_dim: 4, token_stride: 4, head_stride: 4, logn: true, ..r };
    assert!(rl.run_ref(&[0.0; 8], &[0.0; 8], &[0.0; 8], None, &mut [0.0; 8]).is_err());
    assert!(GatherSpec { table: DType::F32, ..gs }.run_ref(Elems::F32(&[0.0; 12]), &[0, 1, 2], &mut [0.0; 6]).is_err());
}

/// A spread of specs, each differing from another in one field.
fn sample_specs() -> Vec<Box<dyn KernelSpec>> {
    let f = DType::F32;
    let bf = DType::BF16;
    let mut v: Vec<Box<dyn KernelSpec>> = vec![];
    let base = CopySpec::contiguous(vec![4, 6, 8], f, bf);
    v.push(Box::new(base.clone()));
    v.push(Box::new(CopySpec { dst: f, ..base.clone() }));
    v.push(Box::new(CopySpec { src: bf, ..base.clone() }));
    v.push(Box::new(CopySpec { src_strides: vec![1, 4, 24], ..base.clone() }));
    v.push(Box::new(CopySpec { dst_strides: vec![96, 8, 1], ..base.clone() }));
    v.push(Box::new(CopySpec { shape: vec![4, 6, 7], ..base.clone() }));
    v.push(Box::new(CopySpec {
        shape: vec![2, 3, 2, 3, 2, 5],
        src_strides: vec![1, 2, 6, 12, 36, 72],
        dst_strides: contiguous_strides(&[2, 3, 2, 3, 2, 5]),
        src: DType::I32,
        dst: DType::I32,
    }));
    for op in all_ops() {
        let strides = [vec![0, 5, 1], vec![20, 0, 1], vec![20, 5, 1]];
        v.push(Box::new(EltwiseSpec { shape: vec![3, 4, 5], op, strides: strides[..op.arity()].to_vec() }));
    }
    v.push(Box::new(EltwiseSpec { shape: vec![3, 4, 5], op: EltOp::Gelu, strides: vec![vec![20, 5, 1]] }));
    for table in [f, bf] {
        v.push(Box::new(GatherSpec { rows: 7, cols: 4096, vocab: 151_936, table }));
    }
    v.push(Box::new(GatherSpec { rows: 8, cols: 4096, vocab: 151_936, table: bf }));
    v.push(Box::new(ScatterRowsSpec { rows: 256, cols: 4096, dst_rows: 300 }));
    v.push(Box::new(ScatterRowsSpec { rows: 256, cols: 4096, dst_rows: 301 }));
    for b in [f, bf] {
        v.push(Box::new(MatMulSpec::contiguous(16, 300, 300, 128, true, false, b)));
        v.push(Box::new(MatMulSpec::contiguous(16, 300, 300, 128, false, false, b)));
        v.push(Box::new(MatMulSpec::contiguous(16, 300, 300, 128, false, true, b)));
    }
    for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
        v.push(Box::new(ReduceSpec { outer: 300, len: 4096, inner: 1, op }));
    }
    v.push(Box::new(ReduceSpec { outer: 300, len: 1, inner: 4096, op: ReduceOp::Sum }));
    for logn in [false, true] {
        v.push(Box::new(RopeSpec {
            tokens: 300,
            heads: 32,
            head_dim: 128,
            token_stride: 12288,
            head_stride: 128,
            logn,
            bf16_out: logn,
        }));
    }
    v.push(Box::new(RopeSpec {
        tokens: 300,
        heads: 32,
        head_dim: 128,
        token_stride: 4096,
        head_stride: 128,
        logn: true,
        bf16_out: false,
    }));
    v.push(Box::new(KvAppendSpec { batch: 8, heads: 32, head_dim: 128, max_seq: 2048, cache_stride: 32 * 2048 * 128 }));
    v
}

#[test]
fn names_are_distinct_and_stable() {
    let specs = sample_specs();
    let mut names: Vec<String> = specs.iter().map(|s| s.name()).collect();
    let n = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), n, "{names:?}");
    // Equal specs give the same name and byte-identical PTX.
    let a = CopySpec::contiguous(vec![3, 5], DType::BF16, DType::F32);
    let b = a.clone();
    assert_eq!(a.name(), b.name());
    let print = |s: &dyn KernelSpec| Module::new(Target::Sm80, vec![s.build()]).print();
    assert_eq!(print(&a), print(&b));
    assert!(a.name().starts_with("copy_r2_bf16_f32_"), "{}", a.name());
}

#[test]
fn costs() {
    let mm = MatMulSpec::contiguous(2, 3, 5, 7, true, true, DType::BF16);
    let c = mm.cost();
    assert_eq!(c.flops, 2 * 2 * 3 * 5 * 7);
    assert_eq!(c.bytes, 4 * 2 * 3 * 7 + 2 * 5 * 7 + 4 * 2 * 3 * 5);
    let cp = CopySpec::contiguous(vec![10, 3], DType::F32, DType::BF16).cost();
    assert_eq!((cp.flops, cp.bytes), (0, 30 * 6));
    // A broadcast input is read once per distinct element.
    let e = EltwiseSpec { shape: vec![4, 8], op: EltOp::Binary(BinaryOp::Mul), strides: vec![vec![8, 1], vec![0, 1]] };
    assert_eq!(e.cost().bytes, 4 * (32 + 8 + 32));
    let r = ReduceSpec { outer: 3, len: 10, inner: 2, op: ReduceOp::Mean }.cost();
    assert_eq!((r.flops, r.bytes), (60 + 6, 4 * (60 + 6)));
}

#[test]
fn ptxas_representative_specs() {
    let Some(ptxas) = qvc_codegen::ptxas::for_tests() else {
        eprintln!("ptxas not found: skipped");
        return;
    };
    for s in sample_specs() {
        for t in Target::ALL {
            let text = Module::new(t, vec![s.build()]).print();
            let usage = qvc_codegen::ptxas::assemble(&ptxas, &text, t).unwrap_or_else(|e| panic!("{}: {e}", s.name()));
            for u in usage {
                println!(
                    "{} {}: {} registers, {} spill stores, {} spill loads",
                    t.name(),
                    u.name,
                    u.registers,
                    u.spill_stores,
                    u.spill_loads
                );
                assert_eq!(u.spill_stores + u.spill_loads, 0, "{} spills on {}", u.name, t.name());
            }
        }
    }
}

// ---- KV-cache append ---------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Each sequence's row lands at `lens[b] − 1` of its own cache, bit for
    /// bit (f32 → bf16 round to nearest even); a length of 0 or past
    /// `max_seq` writes nothing; nothing else in the caches changes.
    #[test]
    fn kv_append_matches_ref(
        batch in 1usize..=4, heads in 1usize..=5, head_dim in 1usize..=40, max_seq in 1usize..=9,
        pad in 0usize..=17, seed: u64,
    ) {
        let mut rng = Rng::new(seed);
        let spec = KvAppendSpec { batch, heads, head_dim, max_seq, cache_stride: heads * max_seq * head_dim + pad };
        let lens: Vec<u32> = (0..batch).map(|_| rng.below(max_seq + 3) as u32).collect();
        // Distinct slots in random order, among up to two more than the batch.
        let cached = batch + rng.below(3);
        let mut all: Vec<u32> = (0..cached as u32).collect();
        for i in (1..cached).rev() {
            all.swap(i, rng.below(i + 1));
        }
        let slots = all[..batch].to_vec();
        let (k, v) = (rng.vec(batch * heads * head_dim, 3.0), rng.vec(batch * heads * head_dim, 2.0));
        let n = cached * spec.cache_stride;
        let kc0: Vec<bf16> = rng.vec(n, 1.0).into_iter().map(bf16::from_f32).collect();
        let vc0: Vec<bf16> = rng.vec(n, 1.0).into_iter().map(bf16::from_f32).collect();
        let (mut kw, mut vw) = (kc0.clone(), vc0.clone());
        spec.run_ref(&k, &v, &lens, &slots, &mut kw, &mut vw).unwrap();
        let mut dev = Device::new();
        let (kp, vp) = (dev.upload_f32(&k), dev.upload_f32(&v));
        let (lp, sp) = (dev.upload_u32(&lens), dev.upload_u32(&slots));
        let (kcp, vcp) = (dev.upload_bf16(&kc0), dev.upload_bf16(&vc0));
        let args = [Arg::Ptr(kp), Arg::Ptr(vp), Arg::Ptr(lp), Arg::Ptr(sp), Arg::Ptr(kcp), Arg::Ptr(vcp)];
        launch(&spec, &args, &mut dev)?;
        let mut got = dev.download_bf16(kcp, n);
        got.extend(dev.download_bf16(vcp, n));
        let mut want = kw;
        want.extend(vw);
        let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&got), bits(&want), "{}", spec.name());
    }
}

#[test]
fn kv_append_validates() {
    let ok = KvAppendSpec { batch: 2, heads: 2, head_dim: 8, max_seq: 4, cache_stride: 64 };
    assert!(ok.validate().is_ok());
    assert!(KvAppendSpec { cache_stride: 63, ..ok.clone() }.validate().is_err());
    assert!(KvAppendSpec { heads: 0, ..ok }.validate().is_err());
}
