//! Row normalisations over the last axis (`cols`), rows = `x.len() / cols`:
//! * [`layer_norm`]: `y = (x − mean) / sqrt(var + eps) · w + b`, biased
//!   variance, as `torch.nn.LayerNorm`; mean, variance and `x − mean` in f64,
//!   two passes (the second pass over `x − mean` avoids the cancellation of
//!   `E[x²] − mean²`).
//! * [`rms_norm`]: `y = x · (1 / sqrt(mean(x²) + eps)) · w`, in f32 as Qwen does.
//!
//! Weights (`w`, `b`, length `cols`) come in their stored dtype and are widened
//! once per call. Rows are independent, so tasks take whole rows; sums use 8
//! lanes (vectorisable and with a smaller rounding error than one running sum).

use crate::common::{par_chunks, worth_parallel, Isa};
use qvc_ir::Elems;

/// Elements per task (whole rows, at least one).
const CHUNK: usize = 16 * 1024;

fn check(x: &[f32], out: &[f32], cols: usize, what: &str) {
    assert_eq!(out.len(), x.len(), "{what}: out has {} elements, x has {}", out.len(), x.len());
    if cols == 0 {
        assert!(x.is_empty(), "{what}: cols = 0 with non-empty x");
    } else {
        assert_eq!(x.len() % cols, 0, "{what}: x.len() = {} is not a multiple of cols = {cols}", x.len());
    }
}

/// LayerNorm over rows of `cols` (see the module docs).
pub fn layer_norm(x: &[f32], w: Elems, b: Elems, eps: f32, cols: usize, out: &mut [f32]) {
    layer_norm_with_isa(Isa::detect(), x, w, b, eps, cols, out)
}

/// RMSNorm over rows of `cols` (see the module docs).
pub fn rms_norm(x: &[f32], w: Elems, eps: f32, cols: usize, out: &mut [f32]) {
    rms_norm_with_isa(Isa::detect(), x, w, eps, cols, out)
}

pub(crate) fn layer_norm_with_isa(isa: Isa, x: &[f32], w: Elems, b: Elems, eps: f32, cols: usize, out: &mut [f32]) {
    check(x, out, cols, "layer_norm");
    assert!(w.len() == cols && b.len() == cols, "layer_norm: w and b must have cols = {cols} elements");
    if x.is_empty() {
        return;
    }
    let (w, b) = (w.to_f32_vec(), b.to_f32_vec());
    let isa = isa.resolve();
    let chunk = (CHUNK / cols).max(1) * cols;
    par_chunks(out, chunk, worth_parallel(x.len() * 8), |ci, o| {
        let xs = &x[ci * chunk..][..o.len()];
        for (xr, or) in xs.chunks_exact(cols).zip(o.chunks_exact_mut(cols)) {
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` was resolved, so the CPU has AVX2 and FMA.
                Isa::Avx2Fma | Isa::Avx512 => unsafe { layer_norm_row_avx2(xr, &w, &b, eps, or) },
                _ => layer_norm_row(xr, &w, &b, eps, or),
            }
        }
    });
}

pub(crate) fn rms_norm_with_isa(isa: Isa, x: &[f32], w: Elems, eps: f32, cols: usize, out: &mut [f32]) {
    check(x, out, cols, "rms_norm");
    assert_eq!(w.len(), cols, "rms_norm: w must have cols = {cols} elements");
    if x.is_empty() {
        return;
    }
    let w = w.to_f32_vec();
    let isa = isa.resolve();
    let chunk = (CHUNK / cols).max(1) * cols;
    par_chunks(out, chunk, worth_parallel(x.len() * 4), |ci, o| {
        let xs = &x[ci * chunk..][..o.len()];
        for (xr, or) in xs.chunks_exact(cols).zip(o.chunks_exact_mut(cols)) {
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` was resolved, so the CPU has AVX2 and FMA.
                Isa::Avx2Fma | Isa::Avx512 => unsafe { rms_norm_row_avx2(xr, &w, eps, or) },
                _ => rms_norm_row(xr, &w, eps, or),
            }
        }
    });
}

/// Σ f(x) with 8 independent lanes, combined pairwise at the end.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for l in 0..8 {
            acc[l] += f(c[l]);
        }
    }
    for (l, &v) in it.remainder().iter().enumerate() {
        acc[l] += f(v);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Σ f(x) in f64 with 8 independent lanes, combined pairwise at the end.
#[inline(always)]
fn lane_sum64(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for l in 0..8 {
            acc[l] += f(c[l] as f64);
        }
    }
    for (l, &v) in it.remainder().iter().enumerate() {
        acc[l] += f(v as f64);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Mean and deviations in f64: an f32 mean is off by up to half an ulp of
/// the mean, and that error shifts every deviation `x − mean`, a relative
/// error of `ulp(mean) / std` in the output, large for a row whose spread is
/// small next to its mean (1.5e-5 for two values near 3 that are close).
/// The row is read from cache twice more either way, so f64 costs nothing
/// measurable in a memory-bound kernel.
#[inline(always)]
fn layer_norm_row(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len() as f64;
    let mean = lane_sum64(x, |v| v) / n;
    let var = lane_sum64(x, |v| (v - mean) * (v - mean)) / n;
    let rstd = 1.0 / (var + eps as f64).sqrt();
    for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
        *o = ((v as f64 - mean) * rstd) as f32 * w + b;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn layer_norm_row_avx2(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    layer_norm_row(x, w, b, eps, out)
}

#[inline(always)]
fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = lane_sum(x, |v| v * v) / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
        *o = v * r * w;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rms_norm_row_avx2(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    rms_norm_row(x, w, eps, out)
}

/// Reference LayerNorm, everything in f64.
pub fn layer_norm_ref(x: &[f32], w: Elems, b: Elems, eps: f32, cols: usize, out: &mut [f32]) {
    check(x, out, cols, "layer_norm_ref");
    if cols == 0 {
        return;
    }
    for (xr, or) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        let n = cols as f64;
        let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for (j, (o, &v)) in or.iter_mut().zip(xr).enumerate() {
            *o = ((v as f64 - mean) * rstd * w.get(j) as f64 + b.get(j) as f64) as f32;
        }
    }
}

/// Reference RMSNorm, everything in f64.
pub fn rms_norm_ref(x: &[f32], w: Elems, eps: f32, cols: usize, out: &mut [f32]) {
    check(x, out, cols, "rms_norm_ref");
    if cols == 0 {
        return;
    }
    for (xr, or) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        let ms = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64;
        let r = 1.0 / (ms + eps as f64).sqrt();
        for (j, (o, &v)) in or.iter_mut().zip(xr).enumerate() {
            *o = (v as f64 * r * w.get(j) as f64) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{rel_l2, Owned, Rng, FLOAT_DTYPES};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn norms_match_ref(
            rows in 0usize..=9, cols in 1usize..=700, dw in 0usize..3,
            shift in prop::sample::select(vec![0.0f32, 3.0, -50.0]),
            eps in prop::sample::select(vec![1e-6f32, 1e-5]),
            seed: u64, portable: bool,
        ) {
            let isa = if portable { Isa::Portable } else { Isa::Avx2Fma };
            let mut rng = Rng::new(seed);
            // A shifted mean checks that the variance is taken around the mean.
            let x: Vec<f32> = rng.vec(rows * cols, 2.0).into_iter().map(|v| v + shift).collect();
            let w = Owned::from_f32(&rng.vec(cols, 1.5), FLOAT_DTYPES[dw]);
            let b = Owned::from_f32(&rng.vec(cols, 0.5), FLOAT_DTYPES[dw]);

            let (mut got, mut want) = (vec![0.0; x.len()], vec![0.0; x.len()]);
            layer_norm_with_isa(isa, &x, w.elems(), b.elems(), eps, cols, &mut got);
            layer_norm_ref(&x, w.elems(), b.elems(), eps, cols, &mut want);
            for r in 0..rows {
                let e = rel_l2(&got[r * cols..(r + 1) * cols], &want[r * cols..(r + 1) * cols]);
                prop_assert!(e < 1e-5, "layer_norm row {r}: rel err {e}");
            }

            rms_norm_with_isa(isa, &x, w.elems(), eps, cols, &mut got);
            rms_norm_ref(&x, w.elems(), eps, cols, &mut want);
            for r in 0..rows {
                let e = rel_l2(&got[r * cols..(r + 1) * cols], &want[r * cols..(r + 1) * cols]);
                prop_assert!(e < 1e-5, "rms_norm row {r}: rel err {e}");
            }
        }
    }

    #[test]
    fn edge_cases() {
        let w = [1.0f32; 4];
        let b = [0.0f32; 4];
        // No rows.
        layer_norm(&[], Elems::F32(&w), Elems::F32(&b), 1e-5, 4, &mut []);
        rms_norm(&[], Elems::F32(&w), 1e-5, 4, &mut []);
        // A constant row normalises to the bias.
        let x = [3.0f32; 4];
        let mut out = [9.0f32; 4];
        layer_norm(&x, Elems::F32(&w), Elems::F32(&[0.5; 4]), 1e-5, 4, &mut out);
        assert_eq!(out, [0.5; 4]);
        // One row: [1, -1, 1, -1] has mean 0, variance 1, rms 1.
        let x = [1.0f32, -1.0, 1.0, -1.0];
        rms_norm(&x, Elems::F32(&w), 0.0, 4, &mut out);
        assert_eq!(out, x);
        layer_norm(&x, Elems::F32(&w), Elems::F32(&b), 0.0, 4, &mut out);
        assert_eq!(out, x);
    }

    #[test]
    #[should_panic(expected = "not a multiple")]
    fn ragged_input_panics() {
        let w = [1.0f32; 3];
        rms_norm(&[1.0; 4], Elems::F32(&w), 1e-5, 3, &mut [0.0; 4]);
    }
}
