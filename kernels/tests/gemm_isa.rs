//! Every GEMM code path this CPU can run (portable, AVX2+FMA, AVX-512),
//! each on the same random cases: results against the f64 reference on
//! ragged shapes, all layouts and all weight dtypes, and the decode batch
//! invariance (each row of an m ≤ `DECODE_BATCH_INVARIANT_MAX` product bit
//! for bit the row computed alone) per path. Paths the CPU lacks are
//! skipped (and named once on stderr), never silently run as another.

use proptest::prelude::*;
use qvc_ir::{DType, Elems};
use qvc_kernels::testutil::{gemm_magnitudes, rel_l2, rel_to_magnitude, Owned, Rng, StoredMat, FLOAT_DTYPES};
use qvc_kernels::{gemm_ref, gemm_with_isa, Isa, MatRef, DECODE_BATCH_INVARIANT_MAX};

/// The paths this CPU has, most capable last.
fn paths() -> Vec<Isa> {
    let (have, lack): (Vec<Isa>, Vec<Isa>) = Isa::ALL.into_iter().partition(|i| i.available());
    if !lack.is_empty() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| eprintln!("gemm_isa: this CPU lacks {lack:?}; those paths are not tested here"));
    }
    have
}

/// One case on every path against the reference.
#[allow(clippy::too_many_arguments)]
fn check_all_paths(
    (m, n, k): (usize, usize, usize),
    (la, lb): (u8, u8),
    (da, db): (DType, DType),
    pad: usize,
    accumulate: bool,
    seed: u64,
) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(seed);
    let a = StoredMat::new(&mut rng, m, k, la, pad, 2, da);
    let b = StoredMat::new(&mut rng, k, n, lb, pad, 1, db);
    let c0 = rng.vec(m * n, 1.0);
    let mut want = c0.clone();
    gemm_ref(a.view(), b.view(), &mut want, accumulate);
    // The terms' magnitudes: a small m·n whose dots cancel would otherwise
    // measure the data's conditioning (see `rel_to_magnitude`).
    let mag = gemm_magnitudes(&a.view(), &b.view(), &c0, accumulate);
    for isa in paths() {
        let mut got = c0.clone();
        gemm_with_isa(isa, a.view(), b.view(), &mut got, accumulate);
        let e = rel_to_magnitude(&got, &want, &mag);
        // Inputs are exact after widening, so only the f32 accumulation
        // order differs: ~sqrt(k)·2⁻²⁴ of the terms' magnitudes.
        prop_assert!(e < 1e-5, "{isa:?} {m}x{n}x{k} layouts {la},{lb} dtypes {da},{db} acc {accumulate}: rel err {e}");
    }
    Ok(())
}

/// Each row of an `m`-row product equals, bit for bit, that row computed
/// alone on the same path. `lb` 0: B is a transposed `[out, in]` weight
/// (the dot path), 1: row-major (the axpy path).
fn check_batch_invariant_all_paths(
    (m, n, k): (usize, usize, usize),
    lb: u8,
    db: DType,
    accumulate: bool,
    seed: u64,
) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(seed);
    let a = rng.vec(m * k, 1.0);
    let b = StoredMat::new(&mut rng, k, n, if lb == 0 { 1 } else { 0 }, 1, 1, db);
    let c0 = rng.vec(m * n, 1.0);
    for isa in paths() {
        let mut batch = c0.clone();
        gemm_with_isa(isa, MatRef::row_major(Elems::F32(&a), m, k), b.view(), &mut batch, accumulate);
        for i in 0..m {
            let row = MatRef { offset: i * k, ..MatRef::row_major(Elems::F32(&a), 1, k) };
            let mut alone = c0[i * n..(i + 1) * n].to_vec();
            gemm_with_isa(isa, row, b.view(), &mut alone, accumulate);
            let got: Vec<u32> = batch[i * n..(i + 1) * n].iter().map(|x| x.to_bits()).collect();
            let want: Vec<u32> = alone.iter().map(|x| x.to_bits()).collect();
            prop_assert!(
                got == want,
                "{isa:?} row {i} of {m}x{n}x{k} (B layout {lb}, {db}, acc {accumulate}) differs from the row alone"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Every path's territory (dot, axpy, packed with ragged tiles), k past
    /// the short-k dot limit (1024), every layout and dtype pair.
    #[test]
    fn every_path_matches_ref(
        m in 0usize..=30, n in 0usize..=70, k in 0usize..=1100,
        la in 0u8..3, lb in 0u8..3, da in 0usize..3, db in 0usize..3,
        pad in 0usize..3, acc: bool, seed: u64,
    ) {
        check_all_paths((m, n, k), (la, lb), (FLOAT_DTYPES[da], FLOAT_DTYPES[db]), pad, acc, seed)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// The packed path over several k slices on every path (AVX-512's are
    /// 1024 deep, AVX2's and the portable path's 256), ragged last slice,
    /// weights read as Linear layers do (`[out, in]` transposed).
    #[test]
    fn packed_deep_k_matches_ref(
        m in 9usize..=30, n in 1usize..=70, k in 1000usize..=2300,
        db in 0usize..3, acc: bool, seed: u64,
    ) {
        check_all_paths((m, n, k), (0, 1), (DType::F32, FLOAT_DTYPES[db]), 0, acc, seed)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Decode batch invariance on every path, short and long k (the 8-lane
    /// and 16-lane dot tiles take k ≥ 1024), both B layouts, every dtype.
    #[test]
    fn every_path_is_batch_invariant(
        m in 1usize..=DECODE_BATCH_INVARIANT_MAX, n in 1usize..=150, k in 1usize..=2100,
        lb in 0u8..2, db in 0usize..3, acc: bool, seed: u64,
    ) {
        check_batch_invariant_all_paths((m, n, k), lb, FLOAT_DTYPES[db], acc, seed)?;
    }
}

/// Decode-like shapes large enough to split over threads and stream B
/// (prefetching), every m up to the invariant maximum, k a multiple of 16
/// and not.
#[test]
fn decode_shapes_batch_invariant_every_path() {
    for m in 1..=DECODE_BATCH_INVARIANT_MAX {
        for &(n, k) in &[(1000, 4096), (515, 4100), (3000, 1030)] {
            check_batch_invariant_all_paths((m, n, k), 0, DType::BF16, false, (m * k) as u64).unwrap();
        }
    }
}

/// Path selection: the detected path is available, and asking for any path
/// yields one the CPU has (the best below it when it lacks the one asked).
#[test]
fn detect_and_resolve_pick_available_paths() {
    assert!(Isa::detect().available());
    assert_eq!(Isa::detect(), *paths().last().unwrap());
    for isa in Isa::ALL {
        let r = isa.resolve();
        assert!(r.available(), "{isa:?} resolved to {r:?}, which this CPU lacks");
        if isa.available() {
            assert_eq!(r, isa);
        }
    }
}

/// For rows shorter than 1024 the AVX-512 path runs the AVX2 dot
/// arithmetic (the short-k chains), so for m ≤ `DECODE_BATCH_INVARIANT_MAX`
/// and a transposed weight the two paths agree bit for bit there. (Longer
/// rows run `qvc_kernels::gemv`'s 16-lane sequence on AVX-512, pinned
/// against a scalar model in tests/gemv.rs.)
#[test]
fn avx512_decode_equals_avx2_bit_for_bit() {
    if !Isa::Avx512.available() {
        eprintln!("gemm_isa: no AVX-512 here; the AVX-512 = AVX2 decode check is not run");
        return;
    }
    let mut rng = Rng::new(11);
    for m in 1..=DECODE_BATCH_INVARIANT_MAX {
        for &(n, k) in &[(300, 1023), (257, 515), (100, 300), (77, 9)] {
            for db in FLOAT_DTYPES {
                let a = rng.vec(m * k, 1.0);
                let b = StoredMat::new(&mut rng, k, n, 1, 0, 0, db);
                let am = MatRef::row_major(Elems::F32(&a), m, k);
                let (mut c512, mut c2) = (vec![0f32; m * n], vec![0f32; m * n]);
                gemm_with_isa(Isa::Avx512, am, b.view(), &mut c512, false);
                gemm_with_isa(Isa::Avx2Fma, am, b.view(), &mut c2, false);
                let same = c512.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{m}x{n}x{k} {db}: AVX-512 and AVX2 decode results differ");
            }
        }
    }
}

/// A (f32, `m × k`, layout `la`), B (`db`, `k × n`, layout `lb`) and a
/// starting C (`m × n`), drawn in that order from `seed`.
fn f32_a_and_b(
    (m, n, k): (usize, usize, usize),
    (la, lb): (u8, u8),
    db: DType,
    seed: u64,
) -> (StoredMat, StoredMat, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let a = StoredMat::new(&mut rng, m, k, la, 1, 2, DType::F32);
    let b = StoredMat::new(&mut rng, k, n, lb, 1, 1, db);
    let c0 = rng.vec(m * n, 1.0);
    (a, b, c0)
}

/// `gemm_bf16_products` (the explicit bf16-activation opt-in) against the
/// reference on A rounded to bf16: on AVX512-BF16 (`vdpbf16ps`, when B is
/// bf16) and on the fallback (other B dtypes, or CPUs without it) the only
/// differences left are f32 summation order.
fn check_bf16_products(
    (m, n, k): (usize, usize, usize),
    (la, lb): (u8, u8),
    db: DType,
    acc: bool,
    seed: u64,
) -> Result<(), TestCaseError> {
    use qvc_kernels::gemm::gemm_bf16_products;
    let (a, b, c0) = f32_a_and_b((m, n, k), (la, lb), db, seed);
    // The reference multiplies the bf16-rounded A (as exact f32 values).
    let ar: Vec<f32> =
        (0..m * k).map(|x| half::bf16::from_f32(a.view().get(x / k.max(1), x % k.max(1))).to_f32()).collect();
    let mut want = c0.clone();
    gemm_ref(MatRef::row_major(Elems::F32(&ar), m, k), b.view(), &mut want, acc);
    let mut got = c0;
    gemm_bf16_products(a.view(), b.view(), &mut got, acc);
    let e = rel_l2(&got, &want);
    prop_assert!(e < 1e-5, "{m}x{n}x{k} layouts {la},{lb} {db} acc {acc}: rel err {e}");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn bf16_products_match_ref_on_rounded_activations(
        m in 0usize..=30, n in 0usize..=70, k in 0usize..=300,
        la in 0u8..3, lb in 0u8..3, db in 0usize..3, acc: bool, seed: u64,
    ) {
        check_bf16_products((m, n, k), (la, lb), FLOAT_DTYPES[db], acc, seed)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    /// Several 2048-deep slices of the native path, odd k, bf16 `[out, in]` weights.
    #[test]
    fn bf16_products_deep_k(
        m in 1usize..=30, n in 1usize..=70, k in 2000usize..=4500, acc: bool, seed: u64,
    ) {
        check_bf16_products((m, n, k), (0, 1), DType::BF16, acc, seed)?;
    }
}

/// The opt-in really rounds: on data whose activations are not bf16-exact,
/// its result differs from the default GEMM by about bf16's precision, and
/// the default GEMM keeps f32 precision.
#[test]
fn bf16_products_round_activations_default_does_not() {
    use qvc_kernels::gemm::{bf16_products_native, gemm_bf16_products};
    eprintln!("gemm_isa: bf16 products native (vdpbf16ps): {}", bf16_products_native());
    let (m, n, k) = (20, 64, 512);
    let mut rng = Rng::new(5);
    let a = rng.vec(m * k, 1.0);
    let w = Owned::from_f32(&rng.vec(n * k, 1.0), DType::BF16);
    let (am, bm) = (MatRef::row_major(Elems::F32(&a), m, k), MatRef::row_major(w.elems(), n, k).transposed());
    let (mut exact, mut fast, mut rounded) = (vec![0f32; m * n], vec![0f32; m * n], vec![0f32; m * n]);
    gemm_ref(am, bm, &mut exact, false);
    qvc_kernels::gemm(am, bm, &mut fast, false);
    gemm_bf16_products(am, bm, &mut rounded, false);
    let (e_default, e_bf16) = (rel_l2(&fast, &exact), rel_l2(&rounded, &exact));
    assert!(e_default < 1e-5, "default GEMM rel err {e_default}");
    assert!(e_bf16 > 1e-4 && e_bf16 < 1e-2, "bf16-activation GEMM rel err {e_bf16}");
}

/// `CpuMath::Fast` through `gemm_with_math` on every path, against a
/// reference that rounds A to bf16 and multiplies in f64. Where the fast
/// bf16 path applies (bf16 B, m above the dot path's rows, AVX-512 with
/// AVX512-BF16), each element must be within the f32 accumulation bound
/// `(k + 4)·ε·Σ|terms|` of that reference (the bf16 products themselves
/// are exact in f32); everywhere else Fast must be the exact path, bit for
/// bit. `CpuMath::Exact` is always the exact path, bit for bit.
#[allow(clippy::too_many_arguments)]
fn check_fast(
    (m, n, k): (usize, usize, usize),
    (la, lb): (u8, u8),
    (da, db): (DType, DType),
    pad: usize,
    acc: bool,
    seed: u64,
) -> Result<(), TestCaseError> {
    use qvc_kernels::gemm::{
        fast_bf16_applies, fast_bf16_dot_applies, fast_decode_on_tiles, gemm_with_math, gemv_bf16_products,
    };
    use qvc_kernels::CpuMath;
    let mut rng = Rng::new(seed);
    let a = StoredMat::new(&mut rng, m, k, la, pad, 2, da);
    let b = StoredMat::new(&mut rng, k, n, lb, pad, 1, db);
    let c0 = rng.vec(m * n, 1.0);
    let (av, bv) = (a.view(), b.view());
    for isa in paths() {
        let mut exact = c0.clone();
        gemm_with_isa(isa, av, bv, &mut exact, acc);
        let mut exact_mode = c0.clone();
        gemm_with_math(isa, CpuMath::Exact, av, bv, &mut exact_mode, acc);
        prop_assert!(
            exact.iter().zip(&exact_mode).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{isa:?} {m}x{n}x{k}: CpuMath::Exact is not the exact path"
        );
        let mut got = c0.clone();
        gemm_with_math(isa, CpuMath::Fast, av, bv, &mut got, acc);
        // The bf16 decode kernel where this CPU can run it, picked by Fast or not.
        let mut kernel = c0.clone();
        let mut rounded = vec![("fast", got.clone())];
        if gemv_bf16_products(isa, av, bv, &mut kernel, acc) {
            rounded.push(("bf16 decode kernel", kernel));
        }
        if !fast_bf16_applies(isa, &av, &bv)
            && !fast_bf16_dot_applies(isa, &av, &bv)
            && !fast_decode_on_tiles(isa, &av, &bv)
        {
            prop_assert!(
                exact.iter().zip(&got).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{isa:?} {m}x{n}x{k} {db}: Fast without the bf16 path must be the exact path"
            );
            rounded.remove(0);
        }
        for (what, got) in &rounded {
            check_rounded(isa, what, (m, n, k), (la, lb), da, acc, &c0, &av, &bv, got)?;
        }
    }
    Ok(())
}

/// `got` within f32 rounding of `round_bf16(A) · B` (+ `c0` when `acc`).
#[allow(clippy::too_many_arguments)]
fn check_rounded(
    isa: Isa,
    what: &str,
    (m, n, k): (usize, usize, usize),
    (la, lb): (u8, u8),
    da: DType,
    acc: bool,
    c0: &[f32],
    av: &MatRef,
    bv: &MatRef,
    got: &[f32],
) -> Result<(), TestCaseError> {
    for i in 0..m {
        for j in 0..n {
            let c_in = if acc { c0[i * n + j] as f64 } else { 0.0 };
            let (mut s, mut mag) = (c_in, c_in.abs());
            for p in 0..k {
                let t = half::bf16::from_f32(av.get(i, p)).to_f32() as f64 * bv.get(p, j) as f64;
                s += t;
                mag += t.abs();
            }
            let bound = (k + 4) as f64 * f32::EPSILON as f64 * mag + f32::MIN_POSITIVE as f64;
            let e = (got[i * n + j] as f64 - s).abs();
            prop_assert!(
                e <= bound,
                "{isa:?} {what} {m}x{n}x{k} layouts {la},{lb} A {da} acc {acc}: C[{i},{j}] = {} want {s} (err {e} > {bound})",
                got[i * n + j]
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Ragged shapes (m, n, k not multiples of the 12×32 tile or of 2),
    /// every layout (row-major, the Linear's transposed `[out, in]`, both
    /// strided), padded strides, A in every float dtype, accumulate on/off.
    #[test]
    fn fast_bf16_gemm_matches_rounded_ref(
        m in 9usize..=40, n in 1usize..=100, k in 1usize..=300,
        la in 0u8..3, lb in 0u8..3, da in 0usize..3, pad in 0usize..3, acc: bool, seed: u64,
    ) {
        check_fast((m, n, k), (la, lb), (FLOAT_DTYPES[da], DType::BF16), pad, acc, seed)?;
    }

    /// Fast with f16 or f32 weights is the exact path (f16 weights are
    /// not rounded to bf16: that would lose weight bits).
    #[test]
    fn fast_with_f16_or_f32_weights_is_exact(
        m in 9usize..=30, n in 1usize..=70, k in 1usize..=200,
        lb in 0u8..3, db in 0usize..3, acc: bool, seed: u64,
    ) {
        let db = FLOAT_DTYPES[db];
        prop_assume!(db != DType::BF16);
        check_fast((m, n, k), (0, lb), (DType::F32, db), 0, acc, seed)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]

    /// Several 2048-deep slices (the second and later add to C), odd k,
    /// the Linear layout, more row panels than one task's block.
    #[test]
    fn fast_bf16_gemm_deep_k(
        m in 9usize..=70, n in 1usize..=90, k in 2040usize..=4300, lb in 0u8..2, acc: bool, seed: u64,
    ) {
        check_fast((m, n, k), (0, if lb == 0 { 1 } else { 0 }), (DType::F32, DType::BF16), 1, acc, seed)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Decode-sized Fast GEMMs (m ≤ 24: batched decode and short prompts
    /// on AVX-512) on bf16 `[out, in]` weights: the bf16-product dot path,
    /// ragged k (k mod 64 both below and above 32: the odd last step of
    /// chain 0, then the scalar tail), k past 4096 (8-row tiles at m = 1),
    /// padded strides, A in every dtype.
    #[test]
    fn fast_bf16_decode_matches_rounded_ref(
        m in 1usize..=24, n in 1usize..=40, k in 1024usize..=4700,
        da in 0usize..3, pad in 0usize..2, acc: bool, seed: u64,
    ) {
        check_fast((m, n, k), (0, 1), (FLOAT_DTYPES[da], DType::BF16), pad, acc, seed)?;
    }

    /// k a multiple of 32 and m ≤ 16: on AMX tiles where the CPU has them
    /// and the process decodes batches (not this one, which never declares
    /// it: the tile kernel's own tests are in `gemm::amx`), else the dot
    /// path (ragged weight rows past the last 16, padded strides, accumulate).
    #[test]
    fn fast_decode_on_tiles_matches_rounded_ref(
        m in 1usize..=16, n in 1usize..=70, k32 in 32usize..=150,
        da in 0usize..3, pad in 0usize..2, acc: bool, seed: u64,
    ) {
        check_fast((m, n, 32 * k32), (0, 1), (FLOAT_DTYPES[da], DType::BF16), pad, acc, seed)?;
    }
}

/// Fast decode keeps the batch-invariance contract: each row of an m-row
/// GEMM is bit for bit the row computed alone, on the bf16-product dot path
/// too (one-row stream, tiles with pairs of A rows, the odd row, the
/// software-prefetched stream of a weight past 2 MiB).
#[test]
fn fast_bf16_decode_is_batch_invariant() {
    use qvc_kernels::gemm::{fast_bf16_dot_applies, fast_decode_on_tiles, gemm_with_math, gemv_bf16_products};
    use qvc_kernels::CpuMath;
    // k a multiple of 32 (and m ≤ 16) runs on AMX tiles where the CPU has them
    // in a process that decodes batches (not this one).
    for (m, n, k) in [
        (8, 37, 1100),
        (3, 300, 4096),
        (5, 45, 4700),
        (2, 19, 1024 + 63),
        (16, 41, 1100),
        (23, 30, 4103),
        (8, 37, 1024),
        (16, 45, 4096),
        (7, 100, 11008),
        (9, 17, 2048 + 32),
    ] {
        let mut rng = Rng::new((m * n * k) as u64);
        let a = rng.vec(m * k, 1.0);
        let w = Owned::from_f32(&rng.vec(n * k, 1.0), DType::BF16);
        let bm = MatRef::row_major(w.elems(), n, k).transposed();
        let am = MatRef::row_major(Elems::F32(&a), m, k);
        let isa = Isa::detect();
        // The kernel itself (where this CPU has AVX512-BF16), then Fast
        // mode, whichever decode path it picks here.
        let mut batch = vec![0f32; m * n];
        if !gemv_bf16_products(isa, am, bm, &mut batch, false) {
            eprintln!("gemm_isa: no AVX512-BF16 here; the bf16 decode kernel does not run");
        } else {
            for i in 0..m {
                let row = MatRef::row_major(Elems::F32(&a[i * k..(i + 1) * k]), 1, k);
                let mut alone = vec![0f32; n];
                assert!(gemv_bf16_products(isa, row, bm, &mut alone, false));
                assert!(
                    alone.iter().zip(&batch[i * n..(i + 1) * n]).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{m}x{n}x{k}: bf16 decode kernel, row {i} of the batch differs from the row alone"
                );
            }
        }
        eprintln!(
            "gemm_isa: {m}x{n}x{k} Fast decode on AMX tiles: {}, on the bf16 kernel: {}",
            fast_decode_on_tiles(isa, &am, &bm),
            fast_bf16_dot_applies(isa, &am, &bm)
        );
        gemm_with_math(isa, CpuMath::Fast, am, bm, &mut batch, false);
        for i in 0..m {
            let row = MatRef::row_major(Elems::F32(&a[i * k..(i + 1) * k]), 1, k);
            let mut alone = vec![0f32; n];
            gemm_with_math(isa, CpuMath::Fast, row, bm, &mut alone, false);
            assert!(
                alone.iter().zip(&batch[i * n..(i + 1) * n]).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{m}x{n}x{k}: Fast, row {i} of the batch differs from the row alone"
            );
        }
    }
}

/// The Fast path really multiplies in bf16 where it applies: on
/// activations that are not bf16-exact it differs from the exact GEMM by
/// about bf16's precision, and it is the same kernel as the explicit
/// `gemm_bf16_products` (bit for bit).
#[test]
fn fast_mode_rounds_activations_like_bf16_products() {
    use qvc_kernels::gemm::{bf16_products_pay, gemm_bf16_products, gemm_with_math};
    use qvc_kernels::CpuMath;
    let (m, n, k) = (40, 96, 700);
    let mut rng = Rng::new(11);
    let a = rng.vec(m * k, 1.0);
    let w = Owned::from_f32(&rng.vec(n * k, 1.0), DType::BF16);
    let (am, bm) = (MatRef::row_major(Elems::F32(&a), m, k), MatRef::row_major(w.elems(), n, k).transposed());
    let (mut exact, mut fast, mut products) = (vec![0f32; m * n], vec![0f32; m * n], vec![0f32; m * n]);
    gemm_ref(am, bm, &mut exact, false);
    gemm_with_math(Isa::detect(), CpuMath::Fast, am, bm, &mut fast, false);
    gemm_bf16_products(am, bm, &mut products, false);
    let e = rel_l2(&fast, &exact);
    if bf16_products_pay() {
        assert!(e > 1e-4 && e < 1e-2, "Fast GEMM rel err {e}: not bf16 products");
        assert!(
            fast.iter().zip(&products).all(|(x, y)| x.to_bits() == y.to_bits()),
            "Fast GEMM and gemm_bf16_products differ"
        );
    } else {
        eprintln!(
            "gemm_isa: bf16 products do not pay here (no AVX512-BF16, or slower than the FMAs); Fast GEMMs are exact"
        );
        assert!(e < 1e-5, "Fast GEMM without paying bf16 products: rel err {e}");
    }
}

/// `gemm_then` = the product, then the epilogue over C, bit for bit, on
/// every path and both maths, and the epilogue sees every element exactly
/// once at its own (row, column). The epilogue depends on the position, so
/// a tile handed over with the wrong row or column offset fails.
fn check_epilogue(
    (m, n, k): (usize, usize, usize),
    (la, lb): (u8, u8),
    db: DType,
    acc: bool,
    seed: u64,
) -> Result<(), TestCaseError> {
    use qvc_kernels::gemm::gemm_with_math;
    use qvc_kernels::{gemm_then, CpuMath};
    use std::sync::atomic::{AtomicU32, Ordering};
    let (a, b, c0) = f32_a_and_b((m, n, k), (la, lb), db, seed);
    let visits: Vec<AtomicU32> = (0..m * n).map(|_| AtomicU32::new(0)).collect();
    let f = |r: usize, c: usize, v: &mut [f32]| {
        for (e, x) in v.iter_mut().enumerate() {
            *x = (*x * 0.5 + ((r * 1000 + c + e) as f32) * 1e-3).max(-0.25);
            visits[r * n + c + e].fetch_add(1, Ordering::Relaxed);
        }
    };
    for isa in paths() {
        for math in [CpuMath::Exact, CpuMath::Fast] {
            let mut want = c0.clone();
            gemm_with_math(isa, math, a.view(), b.view(), &mut want, acc);
            for (i, row) in want.chunks_mut(n).enumerate() {
                f(i, 0, row);
            }
            visits.iter().for_each(|v| v.store(0, Ordering::Relaxed));
            let mut got = c0.clone();
            gemm_then(isa, math, a.view(), b.view(), &mut got, acc, Some(&f));
            let bad = got.iter().zip(&want).position(|(x, y)| x.to_bits() != y.to_bits());
            prop_assert!(
                bad.is_none(),
                "{isa:?} {math:?} {m}x{n}x{k} {db} acc {acc}: element {bad:?} differs from the pass after the GEMM"
            );
            let seen = visits.iter().position(|v| v.load(Ordering::Relaxed) != 1);
            prop_assert!(
                seen.is_none(),
                "{isa:?} {math:?} {m}x{n}x{k}: element {seen:?} was not given to the epilogue exactly once"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Decode rows (m ≤ 8: dot and axpy paths, epilogue after the product)
    /// and packed tiles (epilogue per tile), ragged edges, bf16/f16/f32 weights.
    #[test]
    fn gemm_then_is_the_product_then_the_epilogue(
        m in 1usize..=40, n in 1usize..=100, k in 1usize..=300,
        la in 0u8..3, lb in 0u8..3, db in 0usize..3, acc: bool, seed: u64,
    ) {
        check_epilogue((m, n, k), (la, lb), FLOAT_DTYPES[db], acc, seed)?;
    }
}

/// Several k slices (past both KC sizes): the epilogue must wait for the last.
#[test]
fn gemm_then_runs_after_the_last_k_slice() {
    for (k, seed) in [(1030, 1), (2100, 2), (257, 3)] {
        check_epilogue((27, 70, k), (0, 1), DType::BF16, false, seed).unwrap();
        check_epilogue((13, 33, k), (0, 0), DType::F32, true, seed).unwrap();
    }
}

/// `decode_group_rows`: 16 exactly where Fast decode of 16 rows of that
/// weight runs on AMX tiles (asked of the dispatcher's own predicate), the
/// invariance bound for everything else (exact math, f32 and int4 weights,
/// narrow or odd k).
#[test]
fn decode_group_rows_follows_the_tiles() {
    use qvc_kernels::gemm::{exact_decode_on_tiles, fast_decode_on_tiles};
    use qvc_kernels::{decode_group_rows, CpuMath};
    let isa = Isa::detect();
    for k in [64, 1000, 1024, 1056, 4096, 11008] {
        let (x, w) = (vec![0f32; 16 * k], vec![half::bf16::ZERO; 4 * k]);
        let a = MatRef::row_major(Elems::F32(&x), 16, k);
        let b = MatRef::row_major(Elems::BF16(&w), 4, k).transposed();
        let want = if fast_decode_on_tiles(isa, &a, &b) { 16 } else { DECODE_BATCH_INVARIANT_MAX };
        assert_eq!(decode_group_rows(isa, CpuMath::Fast, DType::BF16, k), want, "bf16, k = {k}");
        let want = if exact_decode_on_tiles(isa, &a, &b) { 16 } else { DECODE_BATCH_INVARIANT_MAX };
        assert_eq!(decode_group_rows(isa, CpuMath::Exact, DType::BF16, k), want, "exact bf16, k = {k}");
        for (math, dtype) in [(CpuMath::Exact, DType::F32), (CpuMath::Fast, DType::F32), (CpuMath::Fast, DType::Q4)] {
            assert_eq!(
                decode_group_rows(isa, math, dtype, k),
                DECODE_BATCH_INVARIANT_MAX,
                "{math:?} {dtype:?}, k = {k}"
            );
        }
    }
}
