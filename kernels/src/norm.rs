//! Row normalisations over the last axis (`cols`), rows = `x.len() / cols`:
//! * [`layer_norm`]: `y = (x − mean) / sqrt(var + eps) · w + b`, biased
//!   variance, as `torch.nn.LayerNorm`; mean and variance in f32, two passes
//!   (the second pass over `x − mean` avoids the cancellation of `E[x²] − mean²`).
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
                Isa::Avx2Fma => unsafe { layer_norm_row_avx2(xr, &w, &b, eps, or) },
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
                Isa::Avx2Fma => unsafe { rms_norm_row_avx2(xr, &w, eps, or) },
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

#[inline(always)]
fn layer_norm_row(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len() as f32;
    let mean = lane_sum(x, |v| v) / n;
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
    let rstd = 1.0 / (var + eps).sqrt();
    for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
        *o = (v - mean) * rstd * w + b;
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
