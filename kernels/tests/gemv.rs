//! The decode GEMV (m ≤ 8 rows of A against a transposed `[out, in]`
//! weight, rows of `k ≥ 1024`: gemm's dot path, `qvc_kernels::gemv` on
//! AVX-512) on every code path this CPU has:
//! * against the f64 reference on random ragged shapes (n not a multiple of
//!   any tile, k around the 1024 / 4096 thresholds and not a multiple of the
//!   lanes, padded weight rows, offsets, all weight dtypes, accumulate);
//! * bit for bit against a scalar model of each path's documented sequence
//!   (AVX-512: 16 lanes in two chains of alternate 16-element steps, FMA; AVX2: 8 lanes, FMA; portable: 8 lanes,
//!   multiply then add; pairwise lane sum, tail added one by one), which
//!   pins the arithmetic to something that cannot depend on m, tiles or
//!   threads;
//! * batch invariance: each row of an m-row product equals that row alone,
//!   bit for bit, with the batch split over 2 threads and the row on 1.
//!
//! Paths the CPU lacks are skipped and named on stderr.

use proptest::prelude::*;
use qvc_ir::{DType, Elems};
use qvc_kernels::testutil::{gemm_magnitudes, rel_to_magnitude, Owned, Rng, FLOAT_DTYPES};
use qvc_kernels::{gemm_ref, gemm_with_isa, Isa, MatRef, DECODE_BATCH_INVARIANT_MAX};

/// The paths this CPU has.
fn paths() -> Vec<Isa> {
    let (have, lack): (Vec<Isa>, Vec<Isa>) = Isa::ALL.into_iter().partition(|i| i.available());
    if !lack.is_empty() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| eprintln!("gemv: this CPU lacks {lack:?}; those paths are not tested here"));
    }
    have
}

/// A `[n, k]` weight stored with rows `k + pad` apart from `off`, viewed
/// transposed (`k × n`, columns contiguous), as a Linear reads it.
struct Weight {
    own: Owned,
    n: usize,
    k: usize,
    ld: usize,
    off: usize,
}

impl Weight {
    fn new(rng: &mut Rng, n: usize, k: usize, pad: usize, off: usize, dtype: DType) -> Weight {
        let ld = k + pad;
        let data = rng.vec(off + n * ld + 2, 1.0);
        Weight { own: Owned::from_f32(&data, dtype), n, k, ld, off }
    }
    fn view(&self) -> MatRef<'_> {
        MatRef {
            data: self.own.elems(),
            rows: self.k,
            cols: self.n,
            row_stride: 1,
            col_stride: self.ld,
            offset: self.off,
        }
    }
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool")
}

/// The documented per-element sequence of `isa`'s long-k dot path.
fn model(isa: Isa, a: &[f32], b: &MatRef, j: usize, c0: f32, accumulate: bool) -> f32 {
    let k = a.len();
    // Lanes, fused multiply-add, chains (step s of `lanes` elements goes to chain s mod chains).
    let (lanes, fused, chains) = match isa {
        Isa::Avx512 => (16, true, 2),
        Isa::Avx2Fma => (8, true, 1),
        Isa::Portable => (8, false, 1),
    };
    let step = |x: f32, y: f32, s: f32| if fused { x.mul_add(y, s) } else { x * y + s };
    let full = k - k % lanes;
    let mut chain = vec![vec![0f32; lanes]; chains];
    for (p, &x) in a[..full].iter().enumerate() {
        let c = &mut chain[(p / lanes) % chains][p % lanes];
        *c = step(x, b.get(p, j), *c);
    }
    // The chains added lane by lane, in order.
    let mut acc = chain[0].clone();
    for c in &chain[1..] {
        for (x, y) in acc.iter_mut().zip(c) {
            *x += y;
        }
    }
    let mut w = lanes;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    let mut s = acc[0];
    for (p, &x) in a.iter().enumerate().skip(full) {
        s = step(x, b.get(p, j), s);
    }
    if accumulate {
        c0 + s
    } else {
        s
    }
}

#[allow(clippy::too_many_arguments)]
fn case(
    m: usize,
    n: usize,
    k: usize,
    pad: usize,
    off: usize,
    dtype: DType,
    acc: bool,
    seed: u64,
) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(seed);
    let a = rng.vec(m * k, 1.0);
    let w = Weight::new(&mut rng, n, k, pad, off, dtype);
    let c0 = rng.vec(m * n, 1.0);
    let am = MatRef::row_major(Elems::F32(&a), m, k);
    let mut want = c0.clone();
    gemm_ref(am, w.view(), &mut want, acc);
    // The terms' magnitudes, the yardstick for a dot that may cancel.
    let mag = gemm_magnitudes(&am, &w.view(), &c0, acc);
    for isa in paths() {
        let mut got = c0.clone();
        gemm_with_isa(isa, am, w.view(), &mut got, acc);
        let e = rel_to_magnitude(&got, &want, &mag);
        // Weights widen exactly, so only the f32 summation order differs.
        prop_assert!(e < 1e-5, "{isa:?} {m}x{n}x{k} pad {pad} off {off} {dtype} acc {acc}: rel err {e}");
        for i in 0..m {
            for j in 0..n {
                let x = model(isa, &a[i * k..(i + 1) * k], &w.view(), j, c0[i * n + j], acc);
                let g = got[i * n + j];
                prop_assert!(
                    g.to_bits() == x.to_bits(),
                    "{isa:?} {m}x{n}x{k} {dtype} acc {acc}: C[{i},{j}] = {g} but the documented sequence gives {x}"
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// Ragged shapes around the thresholds, every dtype, padded rows.
    #[test]
    fn gemv_matches_ref_and_sequence(
        m in 1usize..=8, n in 1usize..=70, k in prop_oneof![1024usize..=1100, 4080usize..=4112, 1024usize..=6000],
        pad in 0usize..3, off in 0usize..4, db in 0usize..3, acc: bool, seed: u64,
    ) {
        case(m, n, k, pad, off, FLOAT_DTYPES[db], acc, seed)?;
    }
}

/// Found by the proptest: one output whose 4111 products cancel to a small
/// fraction of their magnitudes (2e-5 of the result on the portable path,
/// far less of the terms).
#[test]
fn cancelling_dot() {
    case(1, 1, 4111, 0, 0, FLOAT_DTYPES[1], false, 15496429364705571272).unwrap();
}

/// The decoder's real row lengths (4096, 11008) and a long ragged one, at
/// a few outputs, against the reference and the sequence.
#[test]
fn real_row_lengths() {
    for (si, &k) in [4096usize, 11008, 4111].iter().enumerate() {
        for m in [1, 2, 5, 8] {
            for dtype in FLOAT_DTYPES {
                case(m, 37, k, 0, 0, dtype, m == 2, (si * 10 + m) as u64).unwrap();
            }
        }
    }
}

/// Each row of an m-row product (split over 2 threads) equals, bit for bit,
/// the row alone on 1 thread, on every path; n large enough that the 2-thread
/// call splits its columns into several tasks.
fn batch_invariant(m: usize, n: usize, k: usize, dtype: DType, acc: bool, seed: u64) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(seed);
    let a = rng.vec(m * k, 1.0);
    let w = Weight::new(&mut rng, n, k, 1, 3, dtype);
    let c0 = rng.vec(m * n, 1.0);
    let (two, one) = (pool(2), pool(1));
    for isa in paths() {
        let mut batch = c0.clone();
        two.install(|| gemm_with_isa(isa, MatRef::row_major(Elems::F32(&a), m, k), w.view(), &mut batch, acc));
        for i in 0..m {
            let row = MatRef { offset: i * k, ..MatRef::row_major(Elems::F32(&a), 1, k) };
            let mut alone = c0[i * n..(i + 1) * n].to_vec();
            one.install(|| gemm_with_isa(isa, row, w.view(), &mut alone, acc));
            let same = batch[i * n..(i + 1) * n].iter().zip(&alone).all(|(x, y)| x.to_bits() == y.to_bits());
            prop_assert!(same, "{isa:?} row {i} of {m}x{n}x{k} ({dtype}, acc {acc}) differs from the row alone");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn rows_are_batch_invariant(
        m in 1usize..=DECODE_BATCH_INVARIANT_MAX, n in 1usize..=400, k in prop_oneof![1024usize..=1200, 4090usize..=4120],
        db in 0usize..3, acc: bool, seed: u64,
    ) {
        batch_invariant(m, n, k, FLOAT_DTYPES[db], acc, seed)?;
    }
}

/// Decode shapes large enough to stream (the software-prefetching tiles):
/// 4096 and 11008-long rows, every m up to the invariant maximum.
#[test]
fn streamed_shapes_are_batch_invariant() {
    for (n, k) in [(700usize, 4096usize), (300, 11008)] {
        for m in 1..=DECODE_BATCH_INVARIANT_MAX {
            batch_invariant(m, n, k, DType::BF16, false, (m * k) as u64).unwrap();
        }
    }
}
