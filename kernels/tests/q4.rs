//! Int4 (GPTQ) CPU kernels against the naive f64 reference: random ragged
//! shapes, group sizes (incl. ragged last groups, groups that split a packed
//! word, and −1 = one group), act-order permutations, symmetric and
//! asymmetric zeros, row-range views, accumulate, every code path this CPU
//! has, both the GEMV and the dequantize + GEMM paths, and the `gemm` entry
//! point that routes int4 weights. Plus batch invariance of the decode path.
//!
//! Tolerance: every element within `1e-5 ·` (Σ_c |x_c·W_oc| + |C₀|) of the
//! reference (plus 1e-30 absolute): f32 sums of that many terms stay far
//! inside it, while a wrong nibble, zero, scale or permutation shows up at
//! the 1e-2 level.

use half::f16;
use proptest::prelude::*;
use qvc_ir::{Elems, Q4Ref, Q4Words};
use qvc_kernels::q4::{
    dequantize, q4_gemm_dequant, q4_gemv, q4_linear, q4_linear_ref, q4_linear_with_math, Q4Path, GEMV_MAX_M,
};
use qvc_kernels::q4_i8::{q4_gemv_i8, Q4I8Path, I8_BLOCK_MAX};
use qvc_kernels::testutil::Rng;
use qvc_kernels::{gemm_with_isa, CpuMath, Isa, MatRef, DECODE_BATCH_INVARIANT_MAX};

const TOL: f64 = 1e-5;

/// A GPTQ v1 weight made from random integers (the test-side quantizer's
/// output: the kernels never see how the numbers were chosen).
struct Q4Owned {
    out: usize,
    inp: usize,
    group: usize,
    /// `q[r][o]`, stored row r.
    q: Vec<Vec<u32>>,
    /// Zero points (1..=16, as the kernels use them), `[groups][out]`.
    z: Vec<Vec<u32>>,
    scales: Vec<f16>,
    qweight: Vec<u32>,
    qzeros: Vec<u32>,
    perm: Option<Vec<u32>>,
    inv: Option<Vec<u32>>,
    /// `qweight` in [`Q4Words::Tiled`] order, when the groups allow it.
    tiled: Option<Vec<u32>>,
}

impl Q4Owned {
    fn random(rng: &mut Rng, out: usize, inp: usize, group: usize, asym: bool, act_order: bool) -> Q4Owned {
        assert!(out.is_multiple_of(8) && inp.is_multiple_of(8));
        let groups = inp.div_ceil(group);
        let q: Vec<Vec<u32>> = (0..inp).map(|_| (0..out).map(|_| (rng.next_u64() % 16) as u32).collect()).collect();
        let z: Vec<Vec<u32>> = (0..groups)
            .map(|_| (0..out).map(|_| if asym { (rng.next_u64() % 16) as u32 + 1 } else { 8 }).collect())
            .collect();
        // Positive scales over two decades, as GPTQ makes them.
        let scales: Vec<f16> =
            (0..groups * out).map(|_| f16::from_f32(0.002 * (1.0 + 9.0 * rng.uniform().abs()))).collect();
        let mut qweight = vec![0u32; inp / 8 * out];
        for (r, row) in q.iter().enumerate() {
            for (o, &v) in row.iter().enumerate() {
                qweight[r / 8 * out + o] |= v << (4 * (r % 8));
            }
        }
        // v1 stores zero − 1.
        let mut qzeros = vec![0u32; groups * out / 8];
        for (g, row) in z.iter().enumerate() {
            for (o, &v) in row.iter().enumerate() {
                qzeros[g * out / 8 + o / 8] |= (v - 1) << (4 * (o % 8));
            }
        }
        let (perm, inv) = if act_order {
            let mut p: Vec<u32> = (0..inp as u32).collect();
            for i in (1..inp).rev() {
                p.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            let mut inv = vec![0u32; inp];
            for (r, &c) in p.iter().enumerate() {
                inv[c as usize] = r as u32;
            }
            (Some(p), Some(inv))
        } else {
            (None, None)
        };
        let mut wq = Q4Owned { out, inp, group, q, z, scales, qweight, qzeros, perm, inv, tiled: None };
        wq.tiled = qvc_kernels::q4::tile_words(&wq.view());
        assert_eq!(wq.tiled, wq.view().tiled_words(), "the parallel tiling is the reference one");
        wq
    }

    /// The weight in every word order the kernels read: stored, and tiled
    /// when the groups allow it (then every kernel must give the same bits).
    fn views(&self) -> Vec<(&'static str, Q4Ref<'_>)> {
        let mut v = vec![("stored", self.view())];
        if let Some(t) = &self.tiled {
            v.push(("tiled", Q4Ref { qweight: t, words: Q4Words::Tiled, ..self.view() }));
        }
        v
    }

    fn view(&self) -> Q4Ref<'_> {
        let act_order = self.perm.as_deref().zip(self.inv.as_deref());
        Q4Ref::whole(self.out, self.inp, self.group, &self.qweight, &self.qzeros, &self.scales, act_order)
    }

    /// `W[o, c]` straight from the integers (independent of `Q4Ref`'s accessors).
    fn w(&self, o: usize, c: usize) -> f64 {
        let r = self.inv.as_ref().map_or(c, |inv| inv[c] as usize);
        let g = r / self.group;
        self.scales[g * self.out + o].to_f64() * (self.q[r][o] as f64 - self.z[g][o] as f64)
    }
}

/// Reference for output rows `o0..o0 + n`, plus each element's scale for the
/// tolerance (Σ|x·w| + |C₀|).
fn reference(
    wq: &Q4Owned,
    x: &[f32],
    m: usize,
    o0: usize,
    n: usize,
    c0: &[f32],
    accumulate: bool,
) -> (Vec<f32>, Vec<f64>) {
    let k = wq.inp;
    let (mut y, mut scale) = (vec![0f32; m * n], vec![0f64; m * n]);
    for i in 0..m {
        for j in 0..n {
            let init = if accumulate { c0[i * n + j] as f64 } else { 0.0 };
            let (mut s, mut a) = (init, init.abs());
            for c in 0..k {
                let t = x[i * k + c] as f64 * wq.w(o0 + j, c);
                s += t;
                a += t.abs();
            }
            y[i * n + j] = s as f32;
            scale[i * n + j] = a;
        }
    }
    (y, scale)
}

fn check(what: &str, got: &[f32], want: &[f32], scale: &[f64]) -> Result<(), TestCaseError> {
    for (e, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        let err = (g as f64 - w as f64).abs();
        prop_assert!(
            err <= TOL * s + 1e-30,
            "{what}: element {e}: got {g}, want {w} (error {err:e}, allowed {:e})",
            TOL * s + 1e-30
        );
    }
    Ok(())
}

fn paths() -> Vec<Q4Path> {
    Q4Path::ALL.into_iter().filter(|p| p.available()).collect()
}

fn isas() -> Vec<Isa> {
    [Isa::Portable, Isa::Avx2Fma, Isa::detect()].into_iter().filter(|i| i.available()).collect()
}

/// Group sizes real checkpoints use (32..128, −1 = the whole input) plus
/// small ones and ones that do not divide a packed word (the loader accepts
/// any size that makes equal groups but the last).
fn group_strategy() -> impl Strategy<Value = Option<usize>> {
    prop_oneof![
        Just(None),
        Just(Some(8)),
        Just(Some(12)),
        Just(Some(16)),
        Just(Some(20)),
        Just(Some(32)),
        Just(Some(40)),
        Just(Some(64)),
        Just(Some(128)),
    ]
}

/// The batch-invariance check both int4 GEMVs share: for every m ≤ `mmax`,
/// each row of `run` on `x[..m·inp]` is bit for bit that row run alone; and
/// `run` on the row-range view `rows_range(cut % out, out)` (3 rows) gives
/// the full matrix's columns bit for bit (the column chunking does not
/// matter).
#[allow(clippy::too_many_arguments)]
fn rows_match_rows_alone(
    what: &str,
    x: &[f32],
    inp: usize,
    out: usize,
    mmax: usize,
    w: &Q4Ref,
    cut: usize,
    run: impl Fn(&[f32], usize, &Q4Ref, &mut [f32]),
) -> Result<(), TestCaseError> {
    let alone: Vec<Vec<f32>> = (0..mmax)
        .map(|i| {
            let mut y = vec![0f32; out];
            run(&x[i * inp..(i + 1) * inp], 1, w, &mut y);
            y
        })
        .collect();
    for m in 1..=mmax {
        let mut y = vec![0f32; m * out];
        run(&x[..m * inp], m, w, &mut y);
        for i in 0..m {
            prop_assert!(
                bits_eq(&y[i * out..(i + 1) * out], &alone[i]),
                "{what}: row {i} of m={m} differs from the row alone"
            );
        }
    }
    let a = cut % out;
    let mut y = vec![0f32; 3 * (out - a)];
    run(&x[..3 * inp], 3, &w.rows_range(a, out), &mut y);
    for i in 0..3 {
        prop_assert!(
            bits_eq(&y[i * (out - a)..(i + 1) * (out - a)], &alone[i][a..]),
            "{what}: rows_range({a}, {out}) differs from the full matrix's columns"
        );
    }
    Ok(())
}

/// Every word order of `wq` gives the same bits through `run` at every
/// m ≤ GEMV_MAX_M (the tiled order changes where words are, not the
/// arithmetic).
fn same_bits_in_every_order(
    wq: &Q4Owned,
    x: &[f32],
    run: impl Fn(&[f32], usize, &Q4Ref, &mut [f32]),
) -> Result<(), TestCaseError> {
    let views = wq.views();
    for m in [1, 2, 3, 8, GEMV_MAX_M] {
        let ys: Vec<Vec<f32>> = views
            .iter()
            .map(|(_, w)| {
                let mut y = vec![0f32; m * wq.out];
                run(&x[..m * wq.inp], m, w, &mut y);
                y
            })
            .collect();
        for ((order, _), y) in views.iter().zip(&ys).skip(1) {
            prop_assert!(bits_eq(y, &ys[0]), "m={m}: {order} order differs from the stored order");
        }
    }
    Ok(())
}

/// The decode checks both int4 GEMVs share, on every path and word order:
/// [`rows_match_rows_alone`] (batch rows are the rows alone, a row range is
/// the full matrix's columns) and [`same_bits_in_every_order`].
fn batch_invariant_in_every_order<P: Copy + std::fmt::Debug>(
    wq: &Q4Owned,
    x: &[f32],
    mmax: usize,
    cut: usize,
    paths: Vec<P>,
    run: impl Fn(P, &[f32], usize, &Q4Ref, &mut [f32]),
) -> Result<(), TestCaseError> {
    for (order, w) in wq.views() {
        for &path in &paths {
            rows_match_rows_alone(&format!("{path:?} {order}"), x, wq.inp, wq.out, mmax, &w, cut, |x, m, w, y| {
                run(path, x, m, w, y)
            })?;
        }
    }
    for &path in &paths {
        same_bits_in_every_order(wq, x, |x, m, w, y| run(path, x, m, w, y))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Every path (GEMV, dequantize + GEMM, the dispatcher) on every code
    /// path, on a random row-range view, against the reference.
    #[test]
    fn kernels_match_reference(
        out8 in 1usize..=24,
        in8 in 1usize..=48,
        group in group_strategy(),
        m in 1usize..=40,
        asym in any::<bool>(),
        act_order in any::<bool>(),
        accumulate in any::<bool>(),
        range in (0usize..1000, 0usize..1000),
        seed in any::<u64>(),
    ) {
        let (out, inp) = (out8 * 8, in8 * 8);
        let group = group.unwrap_or(inp);
        let mut rng = Rng::new(seed);
        let wq = Q4Owned::random(&mut rng, out, inp, group, asym, act_order);
        // A random non-empty row range (often not 8-aligned).
        let a = range.0 % out;
        let b = a + 1 + range.1 % (out - a);
        let n = b - a;
        let x = rng.vec(m * inp, 1.0);
        let c0 = rng.vec(m * n, 1.0);
        let (want, scale) = reference(&wq, &x, m, a, n, &c0, accumulate);

        for (order, full) in wq.views() {
            let w = full.rows_range(a, b);
            // The crate's own reference agrees with this one.
            let mut y = c0.clone();
            q4_linear_ref(&x, m, &w, &mut y, accumulate);
            check(&format!("q4_linear_ref {order}"), &y, &want, &scale)?;

            for path in paths() {
                let mut y = c0.clone();
                q4_gemv(path, &x, m, &w, &mut y, accumulate);
                check(&format!("gemv {path:?} {order}"), &y, &want, &scale)?;
                let mut y = c0.clone();
                q4_gemm_dequant(path, &x, m, &w, &mut y, accumulate);
                check(&format!("gemm_dequant {path:?} {order}"), &y, &want, &scale)?;
                let mut y = c0.clone();
                q4_linear(path, &x, m, &w, &mut y, accumulate);
                check(&format!("q4_linear {path:?} {order}"), &y, &want, &scale)?;
            }
            // Through `gemm`, as the CPU backend calls it: B = Wᵀ of the whole
            // matrix, restricted to rows a..b by the view's offset.
            let bmat = MatRef { offset: a * inp, rows: n, ..MatRef::row_major(Elems::Q4(full), out, inp) }.transposed();
            for isa in isas() {
                let mut y = c0.clone();
                gemm_with_isa(isa, MatRef::row_major(Elems::F32(&x), m, inp), bmat, &mut y, accumulate);
                check(&format!("gemm {isa:?} {order}"), &y, &want, &scale)?;
            }
        }
    }

    /// Rows of a decode batch (m ≤ GEMV_MAX_M ≥ DECODE_BATCH_INVARIANT_MAX) are bit for
    /// bit the rows computed alone, on every path and through `gemm`; and a
    /// row-range view gives the full matrix's columns bit for bit (the
    /// column chunking does not matter).
    #[test]
    fn decode_is_batch_invariant(
        out8 in 1usize..=160,
        in8 in 1usize..=40,
        group in group_strategy(),
        asym in any::<bool>(),
        act_order in any::<bool>(),
        cut in 0usize..1000,
        seed in any::<u64>(),
    ) {
        let (out, inp) = (out8 * 8, in8 * 8);
        let group = group.unwrap_or(inp);
        let mut rng = Rng::new(seed);
        let wq = Q4Owned::random(&mut rng, out, inp, group, asym, act_order);
        // The serving contract is m ≤ DECODE_BATCH_INVARIANT_MAX; the int4
        // GEMV keeps it for every m it takes.
        let mmax = GEMV_MAX_M;
        assert!(mmax >= DECODE_BATCH_INVARIANT_MAX);
        let x = rng.vec(mmax * inp, 1.0);
        batch_invariant_in_every_order(&wq, &x, mmax, cut, paths(), |path, x, m, w, y| {
            q4_linear(path, x, m, w, y, false)
        })?;
        let w = wq.view();
        for isa in isas() {
            let b = MatRef::row_major(Elems::Q4(w), out, inp).transposed();
            let mut one = vec![0f32; out];
            gemm_with_isa(isa, MatRef::row_major(Elems::F32(&x[..inp]), 1, inp), b, &mut one, false);
            let mut all = vec![0f32; mmax * out];
            gemm_with_isa(isa, MatRef::row_major(Elems::F32(&x), mmax, inp), b, &mut all, false);
            prop_assert!(
                all[..out].iter().zip(&one).all(|(a, b)| a.to_bits() == b.to_bits()),
                "gemm {isa:?}: row 0 of m={mmax} differs from m=1"
            );
        }
    }
}

/// Shapes wide enough for several GEMV tasks and several dequantized blocks
/// (lm_head-like: many columns, a ragged last vector), act-order, group 128
/// with a ragged last group; an activation that is a strided bf16 view.
#[test]
fn wide_shapes_and_strided_activations() {
    let mut rng = Rng::new(7);
    let (out, inp) = (1304, 264);
    let wq = Q4Owned::random(&mut rng, out, inp, 128, true, true);
    let w = wq.view();
    for m in [1, 2, 5, 8, 9, 33] {
        let x = rng.vec(m * inp, 2.0);
        let c0 = vec![0f32; m * out];
        let (want, scale) = reference(&wq, &x, m, 0, out, &c0, false);
        for path in paths() {
            type Kernel = fn(Q4Path, &[f32], usize, &Q4Ref, &mut [f32], bool);
            for (name, f) in [("gemv", q4_gemv as Kernel), ("gemm_dequant", q4_gemm_dequant)] {
                let mut y = vec![f32::NAN; m * out];
                f(path, &x, m, &w, &mut y, false);
                check(&format!("{name} {path:?} m={m}"), &y, &want, &scale).unwrap();
            }
        }
        // x stored transposed (k × m) as bf16-exact values: A is a strided
        // view of another dtype.
        let xb: Vec<half::bf16> = (0..inp * m).map(|t| half::bf16::from_f32(x[(t % m) * inp + t / m])).collect();
        let xr: Vec<f32> = (0..m * inp).map(|t| xb[(t % inp) * m + t / inp].to_f32()).collect();
        let (want, scale) = reference(&wq, &xr, m, 0, out, &c0, false);
        let a = MatRef::row_major(Elems::BF16(&xb), inp, m).transposed();
        for isa in isas() {
            let mut y = vec![f32::NAN; m * out];
            gemm_with_isa(isa, a, MatRef::row_major(Elems::Q4(w), out, inp).transposed(), &mut y, false);
            check(&format!("gemm {isa:?} strided bf16 A m={m}"), &y, &want, &scale).unwrap();
        }
    }
}

/// `dequantize` gives `W[o, c]` exactly (columns in input order).
#[test]
fn dequantize_is_exact() {
    let mut rng = Rng::new(3);
    let wq = Q4Owned::random(&mut rng, 48, 72, 24, true, true);
    let w = wq.view().rows_range(5, 41);
    let mut d = vec![0f32; 36 * 72];
    dequantize(&w, &mut d);
    for o in 0..36 {
        for c in 0..72 {
            assert_eq!(d[o * 72 + c] as f64, wq.w(5 + o, c), "W[{o}, {c}]");
        }
    }
}

/// A wrong layout must fail the check (guards against a test that cannot
/// fail): swapping two nibbles of one word changes the result.
#[test]
fn a_wrong_weight_is_detected() {
    let mut rng = Rng::new(11);
    let mut wq = Q4Owned::random(&mut rng, 16, 16, 8, true, false);
    let x = rng.vec(16, 1.0);
    let (want, scale) = reference(&wq, &x, 1, 0, 16, &[0.0; 16], false);
    // Make nibbles 0 and 1 of column 3 differ, then swap them in storage only.
    wq.qweight[3] = (wq.qweight[3] & !0xFF) | 0x1F;
    let mut y = vec![0f32; 16];
    q4_gemv(Q4Path::detect(), &x, 1, &wq.view(), &mut y, false);
    let wrong = check("swapped", &y, &want, &scale);
    if wq.q[0][3] == 15 && wq.q[1][3] == 1 {
        assert!(wrong.is_ok());
    } else {
        assert!(wrong.is_err(), "a changed weight went unnoticed");
    }
}

/// A view of an int4 weight other than `x · Wᵀ` (here `x · W`, and a column
/// sub-range of `Wᵀ`) takes `gemm`'s element-by-element fallback and still
/// matches the reference.
#[test]
fn other_views_of_an_int4_weight() {
    let mut rng = Rng::new(19);
    let (out, inp) = (40, 24);
    let wq = Q4Owned::random(&mut rng, out, inp, 8, true, true);
    let w = wq.view();
    let views = [
        ("x·W", MatRef::row_major(Elems::Q4(w), out, inp)),
        ("x·Wᵀ[:16, :]", MatRef { cols: 16, ..MatRef::row_major(Elems::Q4(w), out, inp) }.transposed()),
    ];
    for (name, b) in views {
        for m in [1, 3, 20] {
            let a = rng.vec(m * b.rows, 1.0);
            let am = MatRef::row_major(Elems::F32(&a), m, b.rows);
            let mut want = vec![0f32; m * b.cols];
            qvc_kernels::gemm_ref(am, b, &mut want, false);
            // Scale for the tolerance: Σ|a·b| per element.
            let mut scale = vec![0f64; m * b.cols];
            for i in 0..m {
                for j in 0..b.cols {
                    scale[i * b.cols + j] = (0..b.rows).map(|p| (am.get(i, p) as f64 * b.get(p, j) as f64).abs()).sum();
                }
            }
            for isa in isas() {
                let mut y = vec![f32::NAN; m * b.cols];
                gemm_with_isa(isa, am, b, &mut y, false);
                check(&format!("{name} {isa:?} m={m}"), &y, &want, &scale).unwrap();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Int8-activation GEMV (`--cpu-math fast`)

/// Activation blocks as the module doc defines them, written out again
/// here: each group of stored rows, split into pieces of at most
/// `I8_BLOCK_MAX` rows from the group's start. `(group, ra, rb)`.
fn i8_blocks(inp: usize, group: usize) -> Vec<(usize, usize, usize)> {
    let mut v = Vec::new();
    for g in 0..inp.div_ceil(group) {
        let (ga, gb) = (g * group, ((g + 1) * group).min(inp));
        let mut ra = ga;
        while ra < gb {
            let rb = (ra + I8_BLOCK_MAX).min(gb);
            v.push((g, ra, rb));
            ra = rb;
        }
    }
    v
}

/// One row's activations in stored-row order, quantized per block:
/// `(xq, [(sx, Σxq, max|x|)] per block)`.
#[allow(clippy::type_complexity)]
fn i8_quantize(wq: &Q4Owned, x: &[f32]) -> (Vec<i32>, Vec<(f32, i64, f32)>) {
    let xs: Vec<f32> = (0..wq.inp).map(|r| x[wq.perm.as_ref().map_or(r, |p| p[r] as usize)]).collect();
    let mut xq = vec![0i32; wq.inp];
    let mut per = Vec::new();
    for (_, ra, rb) in i8_blocks(wq.inp, wq.group) {
        let amax = xs[ra..rb].iter().fold(0f32, |a, v| a.max(v.abs()));
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        for r in ra..rb {
            xq[r] = ((xs[r] * inv).round_ties_even() as i32).clamp(-127, 127);
        }
        per.push((amax / 127.0, xq[ra..rb].iter().map(|&v| v as i64).sum(), amax));
    }
    (xq, per)
}

/// The int8 GEMV's result computed the plain way: the same quantization,
/// exact integer dot products per block (i64), then the kernel's f32 steps
/// `y = fma(f32(acc − z·Σxq), s_w·sx, y)` block by block. The kernels must
/// match it bit for bit (their integers are exact and their f32 operations
/// the same).
fn i8_reference(wq: &Q4Owned, x: &[f32], m: usize, o0: usize, n: usize, c0: &[f32], accumulate: bool) -> Vec<f32> {
    let k = wq.inp;
    let blocks = i8_blocks(k, wq.group);
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        let (xq, per) = i8_quantize(wq, &x[i * k..(i + 1) * k]);
        for j in 0..n {
            let o = o0 + j;
            let mut acc = if accumulate { c0[i * n + j] } else { 0.0 };
            for (&(g, ra, rb), &(sx, sum, _)) in blocks.iter().zip(&per) {
                let dot: i64 = (ra..rb).map(|r| wq.q[r][o] as i64 * xq[r] as i64).sum();
                let t = (dot - wq.z[g][o] as i64 * sum) as f32;
                acc = t.mul_add(wq.scales[g * wq.out + o].to_f32() * sx, acc);
            }
            y[i * n + j] = acc;
        }
    }
    y
}

/// The bound of the module doc on |int8 result − exact result|: each
/// activation moves by at most max|x_block| / 254 (·(1 + 1e-6) for the f32
/// rounding of the scale and its inverse), times Σ|W| over the block, plus
/// the f32-rounding tolerance of the exact tests.
fn i8_bound(wq: &Q4Owned, x: &[f32], m: usize, o0: usize, n: usize, scale: &[f64]) -> Vec<f64> {
    let k = wq.inp;
    let blocks = i8_blocks(k, wq.group);
    let mut b = vec![0f64; m * n];
    for i in 0..m {
        let (_, per) = i8_quantize(wq, &x[i * k..(i + 1) * k]);
        for j in 0..n {
            let o = o0 + j;
            let mut e = 0f64;
            for (&(_, ra, rb), &(_, _, amax)) in blocks.iter().zip(&per) {
                let wsum: f64 = (ra..rb)
                    .map(|r| {
                        let c = wq.perm.as_ref().map_or(r, |p| p[r] as usize);
                        wq.w(o, c).abs()
                    })
                    .sum();
                e += amax as f64 / 254.0 * (1.0 + 1e-6) * wsum;
            }
            b[i * n + j] = e + TOL * scale[i * n + j] + 1e-30;
        }
    }
    b
}

fn i8_paths() -> Vec<Q4I8Path> {
    Q4I8Path::ALL.into_iter().filter(|p| p.available()).collect()
}

fn bits_eq(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Every int8 path on a random row-range view (ragged columns, groups
    /// that split words, groups larger than a block, act-order, asymmetric
    /// zeros, accumulate) equals the plain integer reference bit for bit,
    /// and stays within the quantization bound of the exact f64 result.
    #[test]
    fn i8_gemv_matches_integer_reference(
        out8 in 1usize..=24,
        in8 in 1usize..=48,
        group in prop_oneof![group_strategy(), Just(Some(256))],
        m in 1usize..=GEMV_MAX_M,
        asym in any::<bool>(),
        act_order in any::<bool>(),
        accumulate in any::<bool>(),
        range in (0usize..1000, 0usize..1000),
        seed in any::<u64>(),
    ) {
        let (out, inp) = (out8 * 8, in8 * 8);
        let group = group.unwrap_or(inp);
        let mut rng = Rng::new(seed);
        let wq = Q4Owned::random(&mut rng, out, inp, group, asym, act_order);
        let a = range.0 % out;
        let b = a + 1 + range.1 % (out - a);
        let n = b - a;
        // Some rows with one large activation (an outlier sets its block's scale).
        let mut x = rng.vec(m * inp, 1.0);
        if seed % 3 == 0 {
            x[(seed as usize / 3) % (m * inp)] = 40.0;
        }
        let c0 = rng.vec(m * n, 1.0);
        let want = i8_reference(&wq, &x, m, a, n, &c0, accumulate);
        let (exact, scale) = reference(&wq, &x, m, a, n, &c0, accumulate);
        let bound = i8_bound(&wq, &x, m, a, n, &scale);
        for (path, (order, full)) in i8_paths().into_iter().flat_map(|p| wq.views().into_iter().map(move |v| (p, v))) {
            let w = full.rows_range(a, b);
            let mut y = c0.clone();
            q4_gemv_i8(path, &x, m, &w, &mut y, accumulate);
            for (e, (&g, &r)) in y.iter().zip(&want).enumerate() {
                prop_assert!(
                    g.to_bits() == r.to_bits(),
                    "{path:?} {order}: element {e}: got {g}, integer reference {r}"
                );
            }
            for (e, ((&g, &r), &bd)) in y.iter().zip(&exact).zip(&bound).enumerate() {
                let err = (g as f64 - r as f64).abs();
                prop_assert!(err <= bd, "{path:?}: element {e}: {g} vs exact {r}: error {err:e} > bound {bd:e}");
            }
        }
    }

    /// Rows of an int8 batch (m ≤ GEMV_MAX_M) are bit for bit the rows
    /// alone on every path, and a column sub-range gives the full matrix's
    /// columns (wide enough for several column chunks and threads).
    #[test]
    fn i8_gemv_is_batch_invariant(
        out8 in 1usize..=300,
        in8 in 1usize..=40,
        group in group_strategy(),
        asym in any::<bool>(),
        act_order in any::<bool>(),
        cut in 0usize..1000,
        seed in any::<u64>(),
    ) {
        let (out, inp) = (out8 * 8, in8 * 8);
        let group = group.unwrap_or(inp);
        let mut rng = Rng::new(seed);
        let wq = Q4Owned::random(&mut rng, out, inp, group, asym, act_order);
        let x = rng.vec(GEMV_MAX_M * inp, 1.0);
        batch_invariant_in_every_order(&wq, &x, GEMV_MAX_M, cut, i8_paths(), |path, x, m, w, y| {
            q4_gemv_i8(path, x, m, w, y, false)
        })?;
    }
}

/// `q4_linear_with_math`: Exact is `q4_linear` bit for bit at every m; Fast
/// is the int8 GEMV (on `Q4I8Path::for_q4(path)`) for m ≤ GEMV_MAX_M, and
/// exact above. The int8 results differ from the exact ones (so the routing
/// is really seen).
#[test]
fn fast_mode_routes_decode_sizes_to_int8() {
    let mut rng = Rng::new(23);
    let (out, inp) = (136, 200);
    let wq = Q4Owned::random(&mut rng, out, inp, 40, true, true);
    let w = wq.view();
    for path in paths() {
        for m in [1, 2, 8, GEMV_MAX_M, GEMV_MAX_M + 1, 40] {
            let x = rng.vec(m * inp, 1.0);
            let run = |f: &dyn Fn(&mut [f32])| {
                let mut y = vec![f32::NAN; m * out];
                f(&mut y);
                y
            };
            let exact = run(&|y| q4_linear(path, &x, m, &w, y, false));
            let exact2 = run(&|y| q4_linear_with_math(CpuMath::Exact, path, &x, m, &w, y, false));
            let fast = run(&|y| q4_linear_with_math(CpuMath::Fast, path, &x, m, &w, y, false));
            assert!(bits_eq(&exact, &exact2), "{path:?} m={m}: Exact mode is not q4_linear");
            if m <= GEMV_MAX_M {
                let i8 = run(&|y| q4_gemv_i8(Q4I8Path::for_q4(path), &x, m, &w, y, false));
                assert!(bits_eq(&fast, &i8), "{path:?} m={m}: Fast mode is not the int8 GEMV");
                assert!(!bits_eq(&fast, &exact), "{path:?} m={m}: Fast mode gave the exact result");
            } else {
                assert!(bits_eq(&fast, &exact), "{path:?} m={m}: Fast mode above GEMV_MAX_M is not exact");
            }
        }
    }
    assert_eq!(Q4I8Path::for_q4(Q4Path::Portable), Q4I8Path::Portable);
}

/// NaN and infinite activations reach the output as in exact mode (they are
/// not quantized away), and an all-zero block contributes nothing.
#[test]
fn i8_non_finite_and_zero_activations() {
    let mut rng = Rng::new(29);
    let (out, inp) = (24, 256);
    let wq = Q4Owned::random(&mut rng, out, inp, 128, true, false);
    let w = wq.view();
    for path in i8_paths() {
        for bad in [f32::NAN, f32::INFINITY] {
            let mut x = rng.vec(inp, 1.0);
            x[5] = bad;
            let mut y = vec![0f32; out];
            q4_gemv_i8(path, &x, 1, &w, &mut y, false);
            assert!(y.iter().all(|v| !v.is_finite()), "{path:?}: {bad} in x gave a finite output");
        }
        let mut x = rng.vec(inp, 1.0);
        x[..128].fill(0.0);
        let mut y = vec![0f32; out];
        q4_gemv_i8(path, &x, 1, &w, &mut y, false);
        let want = i8_reference(&wq, &x, 1, 0, out, &[], false);
        assert!(bits_eq(&y, &want), "{path:?}: zero block");
        assert!(y.iter().all(|v| v.is_finite()));
    }
}

/// Prefill-sized GEMMs deeper than one packed k slice (1024 on AVX-512, 256
/// otherwise), with groups that straddle slice and word boundaries, on a
/// row-range view that starts mid-word, with and without act-order.
#[test]
fn deep_prefill_gemm_matches_reference() {
    let mut rng = Rng::new(31);
    let (out, inp) = (88, 1064);
    for (group, act_order) in [(40, true), (128, false), (1064, true)] {
        let wq = Q4Owned::random(&mut rng, out, inp, group, true, act_order);
        let (a, b) = (3, 77);
        let m = 29;
        let x = rng.vec(m * inp, 1.0);
        let c0 = rng.vec(m * (b - a), 1.0);
        let (want, scale) = reference(&wq, &x, m, a, b - a, &c0, true);
        for ((order, full), path) in wq.views().into_iter().flat_map(|v| paths().into_iter().map(move |p| (v, p))) {
            let w = full.rows_range(a, b);
            let mut y = c0.clone();
            q4_gemm_dequant(path, &x, m, &w, &mut y, true);
            check(&format!("deep gemm_dequant {path:?} group {group} {order}"), &y, &want, &scale).unwrap();
        }
    }
}
