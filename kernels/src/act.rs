//! Activations: GELU (erf form, as `torch.nn.functional.gelu`), SiLU, and
//! SwiGLU (`out = a * silu(b)`, Qwen's MLP gate), plus the scalar
//! [`exp_f32`] and [`erf_f32`] they are built on.
//!
//! The scalar functions are branch-free (selects, not jumps), so the loops
//! over slices vectorise (8 lanes with AVX2, 16 with AVX-512: the same
//! scalar code compiled per feature set, about 1.7× faster GELU on Zen 5);
//! they use plain multiply-then-add (never fused), so results are
//! bit-identical on the portable, AVX2 and AVX-512 paths.
//!
//! Accuracy (checked by the tests against f64 references):
//! * `exp_f32`: ≤ 2 ulp over the whole range, including subnormal results,
//!   0 for `-inf`, `inf` on overflow, NaN in → NaN out.
//! * `erf_f32`: relative error < 2.5e-7 everywhere (≈ 2 ulp).
//! * `gelu_erf`: the normal CDF is formed without cancellation (for x < 0 it
//!   is `erfc(|x|/√2)/2` directly), so the error is within 1e-6 relative plus
//!   the rounding of `x/√2` (an absolute error far below torch's f32 GELU).

use crate::common::{par_chunks, worth_parallel, Isa};

/// Elements per task of the elementwise loops (64 KiB of f32).
const CHUNK: usize = 16 * 1024;

// The polynomials are shared with the PTX GELU (`KernelBuilder::gelu`), so
// both devices compute the same function.
use qvc_codegen::builder::{ERFC_LARGE, ERF_SMALL, ERF_SPLIT};

#[inline(always)]
fn horner<const N: usize>(c: &[f32; N], x: f32) -> f32 {
    let mut s = c[0];
    for &ci in &c[1..] {
        s = s * x + ci;
    }
    s
}

/// `e^x` in f32, branch-free and vectorisable.
///
/// `x = n·ln2 + r` with `|r| ≤ ln2/2` (Cody–Waite: ln 2 split so that `n·hi`
/// is exact), `e^r` by its degree-7 Taylor polynomial (truncation < 1e-8
/// relative), then scaled by `2^n` in two halves so that results down to
/// subnormals and up to overflow come out right without branches.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 355.0 / 512.0; // 9 significant bits, so n·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 − LN2_HI
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
                                     // e^-104 < half the smallest subnormal and e^89 > f32::MAX, so clamping
                                     // there changes no result; `clamp` keeps NaN.
    let x = x.clamp(-104.0, 89.0);
    let t = x * LOG2E + MAGIC;
    let n = t.to_bits() as i32 - MAGIC.to_bits() as i32; // round(x / ln 2)
    let nf = t - MAGIC;
    let r = (x - nf * LN2_HI) - nf * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n ∈ [-150, 129]: each half is a normal power of two.
    let n1 = n >> 1;
    let n2 = n - n1;
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127) as u32) << 23);
    p * s1 * s2
}

/// `erfc(a)` for `a ≥ ERF_SPLIT` (also fine, just less accurate, below it):
/// `exp(-a²) · t · H(t)`, `t = 1/(1+a)`.
#[inline(always)]
fn erfc_large(a: f32) -> f32 {
    let t = 1.0 / (1.0 + a);
    exp_f32(-(a * a)) * t * horner(&ERFC_LARGE, t)
}

/// The error function in f32 (relative error < 2.5e-7), branch-free.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let small = x * horner(&ERF_SMALL, x * x);
    let large = (1.0 - erfc_large(a)).copysign(x);
    if a < ERF_SPLIT {
        small
    } else {
        large
    }
}

/// `x · Φ(x)` with `Φ(x) = (1 + erf(x/√2)) / 2`.
#[inline(always)]
fn gelu_scalar(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let q = erfc_large(a);
    // 1 + erf(z): the small-|z| polynomial, or erfc(|z|) directly for z < 0
    // (no cancellation), or 2 − erfc(z).
    let one_plus_erf = if a < ERF_SPLIT {
        1.0 + z * horner(&ERF_SMALL, z * z)
    } else if z < 0.0 {
        q
    } else {
        2.0 - q
    };
    0.5 * x * one_plus_erf
}

/// `x · sigmoid(x)`.
#[inline(always)]
fn silu_scalar(x: f32) -> f32 {
    // For x < -88.7, e^-x overflows to inf and the result is -0: the true
    // value is below f32's normal range anyway.
    x / (1.0 + exp_f32(-x))
}

/// GELU, erf form, in place: `x · (1 + erf(x/√2)) / 2`.
pub fn gelu_erf(x: &mut [f32]) {
    gelu_erf_with_isa(Isa::detect(), x)
}

/// [`gelu_erf`] on the calling thread, kernel chosen once: for callers
/// that apply it to many short stretches (a GEMM epilogue's tile rows),
/// where picking the path per call would cost more than the stretch.
/// Bit for bit [`gelu_erf`]'s results.
pub fn gelu_erf_serial() -> impl Fn(&mut [f32]) + Copy + Send + Sync {
    let kernel = gelu_kernel(Isa::detect().resolve());
    // SAFETY: `resolve` picked a kernel this CPU can run.
    move |x: &mut [f32]| unsafe { kernel(x) }
}

/// SiLU in place: `x · sigmoid(x)`.
pub fn silu(x: &mut [f32]) {
    silu_with_isa(Isa::detect(), x)
}

/// SwiGLU: `out[i] = a[i] · silu(b[i])`.
pub fn swiglu(a: &[f32], b: &[f32], out: &mut [f32]) {
    swiglu_with_isa(Isa::detect(), a, b, out)
}

pub(crate) fn gelu_erf_with_isa(isa: Isa, x: &mut [f32]) {
    map_inplace(isa, x, gelu_kernel)
}

pub(crate) fn silu_with_isa(isa: Isa, x: &mut [f32]) {
    map_inplace(isa, x, silu_kernel)
}

pub(crate) fn swiglu_with_isa(isa: Isa, a: &[f32], b: &[f32], out: &mut [f32]) {
    assert!(a.len() == out.len() && b.len() == out.len(), "swiglu: a, b and out must have the same length");
    let isa = isa.resolve();
    // ~25 operations per element.
    par_chunks(out, CHUNK, worth_parallel(out.len() * 25), |ci, o| {
        let (a, b) = (&a[ci * CHUNK..][..o.len()], &b[ci * CHUNK..][..o.len()]);
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` was resolved, so the CPU has AVX-512F (and AVX2, FMA).
            Isa::Avx512 => unsafe { swiglu_chunk_avx512(a, b, o) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` was resolved, so the CPU has AVX2 and FMA.
            Isa::Avx2Fma => unsafe { swiglu_chunk_avx2(a, b, o) },
            _ => swiglu_chunk(a, b, o),
        }
    });
}

#[inline(always)]
fn swiglu_chunk(a: &[f32], b: &[f32], out: &mut [f32]) {
    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
        *o = a * silu_scalar(b);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_chunk_avx2(a: &[f32], b: &[f32], out: &mut [f32]) {
    swiglu_chunk(a, b, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn swiglu_chunk_avx512(a: &[f32], b: &[f32], out: &mut [f32]) {
    swiglu_chunk(a, b, out)
}

/// A chunk kernel: `x[i] = f(x[i])` for one function `f`.
type ChunkFn = unsafe fn(&mut [f32]);

/// `fn $name(isa) -> ChunkFn`: the portable or AVX2 chunk kernel of the
/// scalar function `$f`. Both call `$f` (`#[inline(always)]`) directly, not
/// through a closure or `Fn` bound, whose call shim LLVM does not inline into
/// a target-feature function; so the loop is inlined and vectorised.
macro_rules! chunk_kernel {
    ($name:ident, $f:ident) => {
        fn $name(isa: Isa) -> ChunkFn {
            /// SAFETY: none needed (`unsafe` only to share a type with the AVX2 kernel).
            unsafe fn portable(x: &mut [f32]) {
                for v in x {
                    *v = $f(*v);
                }
            }
            /// SAFETY: the CPU must have AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2(x: &mut [f32]) {
                for v in x {
                    *v = $f(*v);
                }
            }
            /// SAFETY: the CPU must have AVX-512F, AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn avx512(x: &mut [f32]) {
                for v in x {
                    *v = $f(*v);
                }
            }
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => avx512,
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2Fma => avx2,
                _ => portable,
            }
        }
    };
}

chunk_kernel!(gelu_kernel, gelu_scalar);
chunk_kernel!(silu_kernel, silu_scalar);

/// Apply the chunk kernel `pick(isa)` over `x` in parallel chunks.
fn map_inplace(isa: Isa, x: &mut [f32], pick: fn(Isa) -> ChunkFn) {
    let kernel = pick(isa.resolve());
    // SAFETY: an AVX2 kernel is only picked when `resolve` found the CPU
    // features; the portable one has no requirement.
    par_chunks(x, CHUNK, worth_parallel(x.len() * 25), |_, c| unsafe { kernel(c) });
}

// ------------------------------------------------------------- references

/// Reference `erf` in f64 (relative error ~1e-13): the Maclaurin series for
/// |x| < 3, `1 − erfc` by its continued fraction beyond.
pub fn erf_ref(x: f64) -> f64 {
    let a = x.abs();
    if a.is_nan() {
        return f64::NAN;
    }
    if a >= 3.0 {
        return (1.0 - erfc_cf(a)).copysign(x);
    }
    // erf x = 2/√π Σ (−1)ⁿ x^(2n+1) / (n! (2n+1)); `term` = (−1)ⁿ x^(2n+1) / n!.
    let (mut term, mut sum, mut n) = (x, 0.0f64, 0.0f64);
    loop {
        let c = term / (2.0 * n + 1.0);
        sum += c;
        if (c.abs() <= 1e-17 * sum.abs() && n > a * a) || n > 200.0 {
            break;
        }
        term *= -x * x / (n + 1.0);
        n += 1.0;
    }
    std::f64::consts::FRAC_2_SQRT_PI * sum
}

/// `erfc(a)` for `a ≥ 3` from the continued fraction
/// `erfc a = e^(−a²)/√π · 1/(a + (1/2)/(a + 1/(a + (3/2)/(a + …))))`,
/// evaluated bottom-up (200 levels is far past convergence for a ≥ 3).
fn erfc_cf(a: f64) -> f64 {
    let mut f = a;
    for n in (1..=200).rev() {
        f = a + (n as f64 / 2.0) / f;
    }
    (-a * a).exp() / (std::f64::consts::PI.sqrt() * f)
}

/// Reference GELU (erf form) of one value in f64: `x · Φ(x)`, Φ without
/// cancellation (a very negative `x` keeps its tiny result's relative
/// accuracy, which `1 + erf` loses).
pub fn gelu_ref(x: f64) -> f64 {
    let z = x * std::f64::consts::FRAC_1_SQRT_2;
    let phi = if z <= -3.0 { 0.5 * erfc_cf(-z) } else { 0.5 * (1.0 + erf_ref(z)) };
    x * phi
}

/// Reference GELU (erf form) in f64, in place ([`gelu_ref`]).
pub fn gelu_erf_ref(x: &mut [f32]) {
    for v in x {
        *v = gelu_ref(*v as f64) as f32;
    }
}

/// Reference SiLU in f64.
pub fn silu_ref(x: &mut [f32]) {
    for v in x {
        let xd = *v as f64;
        *v = (xd / (1.0 + (-xd).exp())) as f32;
    }
}

/// Reference SwiGLU in f64: `out = a · silu(b)`.
pub fn swiglu_ref(a: &[f32], b: &[f32], out: &mut [f32]) {
    assert!(a.len() == out.len() && b.len() == out.len(), "swiglu_ref: length mismatch");
    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
        let bd = b as f64;
        *o = (a as f64 * bd / (1.0 + (-bd).exp())) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Rng;
    use proptest::prelude::*;

    /// Distance in ulps between an f32 and the exact value (for normal results).
    fn ulps(got: f32, want: f64) -> f64 {
        let ulp = (want.abs() as f32).max(f32::MIN_POSITIVE);
        let ulp = (f32::from_bits(ulp.to_bits() + 1) - ulp) as f64;
        (got as f64 - want).abs() / ulp
    }

    #[test]
    fn exp_is_within_2_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.7 {
            worst = worst.max(ulps(exp_f32(x), (x as f64).exp()));
            x += 0.000_731;
        }
        assert!(worst <= 2.0, "exp_f32: {worst} ulp");
        // Subnormal results: absolute error within a couple of the smallest subnormals.
        for i in 0..2000 {
            let x = -87.5 - i as f32 * 0.008;
            let d = (exp_f32(x) as f64 - (x as f64).exp()).abs();
            assert!(d <= 2.0 * 1.4013e-45, "exp_f32({x}) off by {d}");
        }
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn erf_ref_is_accurate() {
        // Values from the defining integral (mpmath, 30 digits).
        let table = [
            (0.1, 0.112_462_916_018_284_9),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.5, 0.999_999_256_901_627_7),
        ];
        for (x, want) in table {
            assert!((erf_ref(x) - want).abs() < 1e-15, "erf_ref({x})");
            assert!((erf_ref(-x) + want).abs() < 1e-15, "erf_ref(-{x})");
        }
        // erfc(5) = 1.5374597944280348502e-12 through the continued fraction.
        assert!((erfc_cf(5.0) / 1.537_459_794_428_035e-12 - 1.0).abs() < 1e-13);
    }

    #[test]
    fn erf_relative_error() {
        let mut worst = 0.0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            let want = erf_ref(x as f64);
            if want != 0.0 {
                worst = worst.max(((erf_f32(x) as f64 - want) / want).abs());
            }
            x += 0.000_37;
        }
        for x in [1e-30f32, -1e-20, 1e-6, 0.874_999_9, 0.875, 3.9, 4.0, 10.0] {
            let want = erf_ref(x as f64);
            worst = worst.max(((erf_f32(x) as f64 - want) / want).abs());
        }
        assert!(worst < 2.5e-7, "erf_f32 relative error {worst}");
        assert_eq!(erf_f32(0.0), 0.0);
        assert_eq!(erf_f32(f32::INFINITY), 1.0);
        assert_eq!(erf_f32(f32::NEG_INFINITY), -1.0);
        assert!(erf_f32(f32::NAN).is_nan());
    }

    /// `|got − want| ≤ rel·|want| + 1e-9·scale`: relative, except where the
    /// result underflows toward 0 (deep negative tails), where an absolute
    /// error far below one f32 ulp of the input scale is allowed.
    fn check_close(got: &[f32], want: &[f32], scale: &[f32], rel: f64, what: &str) -> Result<(), TestCaseError> {
        for ((&g, &w), &sc) in got.iter().zip(want).zip(scale) {
            let tol = rel * w.abs() as f64 + 1e-9 * sc.abs() as f64;
            prop_assert!(((g - w) as f64).abs() <= tol, "{what}: got {g}, want {w} (scale {sc})");
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn elementwise_match_ref(len in 0usize..3000, scale in prop::sample::select(vec![1.0f32, 4.0, 12.0, 40.0]), seed: u64, portable: bool) {
            let isa = if portable { Isa::Portable } else { Isa::Avx2Fma };
            let mut rng = Rng::new(seed);
            let x = rng.vec(len, scale);
            let b = rng.vec(len, scale);

            let (mut g, mut w) = (x.clone(), x.clone());
            gelu_erf_with_isa(isa, &mut g);
            gelu_erf_ref(&mut w);
            check_close(&g, &w, &x, 1e-6, "gelu")?;

            let (mut g, mut w) = (x.clone(), x.clone());
            silu_with_isa(isa, &mut g);
            silu_ref(&mut w);
            check_close(&g, &w, &x, 1e-6, "silu")?;

            let (mut g, mut w) = (vec![0.0; len], vec![0.0; len]);
            swiglu_with_isa(isa, &x, &b, &mut g);
            swiglu_ref(&x, &b, &mut w);
            let ab: Vec<f32> = x.iter().zip(&b).map(|(a, b)| a * b).collect();
            check_close(&g, &w, &ab, 1e-6, "swiglu")?;
        }
    }

    /// Every path this CPU has (portable, AVX2, AVX-512) gives the portable
    /// path's bits, including through [`gelu_erf_serial`].
    #[test]
    fn paths_are_bit_identical() {
        let x = Rng::new(3).vec(70_001, 8.0);
        let y = Rng::new(4).vec(70_001, 8.0);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        let run = |isa: Isa| {
            let (mut g, mut s, mut w) = (x.clone(), x.clone(), vec![0.0; x.len()]);
            gelu_erf_with_isa(isa, &mut g);
            silu_with_isa(isa, &mut s);
            swiglu_with_isa(isa, &x, &y, &mut w);
            (bits(&g), bits(&s), bits(&w))
        };
        let want = run(Isa::Portable);
        for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
            assert!(run(isa) == want, "{isa:?} differs from the portable path");
        }
        let mut g = x.clone();
        let serial = gelu_erf_serial();
        g.chunks_mut(37).for_each(serial);
        assert!(bits(&g) == want.0, "gelu_erf_serial differs");
    }

    #[test]
    fn empty_and_special() {
        gelu_erf(&mut []);
        silu(&mut []);
        swiglu(&[], &[], &mut []);
        let mut v = [0.0f32, 1.0, -1.0, 30.0, -30.0, f32::INFINITY];
        gelu_erf(&mut v);
        assert_eq!(v[0], 0.0);
        assert!((v[1] - 0.841_344_7).abs() < 1e-7 && (v[2] + 0.158_655_26).abs() < 1e-7);
        assert_eq!(v[3], 30.0);
        assert!(v[4] == 0.0 || v[4].abs() < 1e-37);
        assert_eq!(v[5], f32::INFINITY);
        let mut s = [0.0f32, -100.0, 100.0];
        silu(&mut s);
        assert_eq!(s, [0.0, -0.0, 100.0]);
    }
}
