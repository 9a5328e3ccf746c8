//! Int4 (GPTQ) weights: `C = A·Wᵀ` with `W` a [`Q4Ref`], dequantized on the
//! fly. [`crate::gemm`] routes every int4 right-hand side here, so callers
//! (the CPU backend's `Linear`, `lm_head`) need not know the format.
//!
//! The layout is AutoGPTQ's v1 storage as the checkpoint has it (see
//! [`Q4Ref`]); act-order was resolved when the weight was loaded, so the
//! kernels see groups of consecutive stored rows and gather the activation
//! columns through `perm` once per call, never the weight.

use crate::common::Isa;
use crate::gemm::{gemm_strided, GemmScratch, MatRef};
use qvc_ir::{Elems, Q4Ref};
use rayon::prelude::*;

/// Dequantize every row of `w` into `out` (`w.rows × w.cols`, row-major,
/// columns in input order).
pub fn dequantize(w: &Q4Ref, out: &mut [f32]) {
    assert_eq!(out.len(), w.rows * w.cols, "q4 dequantize: output has the wrong size");
    if w.cols == 0 {
        return;
    }
    out.par_chunks_mut(w.cols).enumerate().for_each(|(row, dst)| {
        let o = w.row0 + row;
        for r in 0..w.cols {
            let g = r / w.group;
            let s = w.scales[g * w.ld + o].to_f32();
            let col = w.perm.map_or(r, |p| p[r] as usize);
            dst[col] = s * (w.q(r, o) as f32 - w.zero(g, o) as f32);
        }
    });
}

/// Naive reference: `y[i, o] (+)= Σ_c x[i, c] · W[o, c]` in f64, element by
/// element through [`Q4Ref::get`] (which resolves act-order the slow way).
pub fn q4_linear_ref(x: &[f32], m: usize, w: &Q4Ref, y: &mut [f32], accumulate: bool) {
    let (k, n) = (w.cols, w.rows);
    assert_eq!(x.len(), m * k, "q4_linear_ref: x has the wrong size");
    assert_eq!(y.len(), m * n, "q4_linear_ref: y has the wrong size");
    for i in 0..m {
        for o in 0..n {
            let mut s = if accumulate { y[i * n + o] as f64 } else { 0.0 };
            for c in 0..k {
                s += x[i * k + c] as f64 * w.get(o, c) as f64;
            }
            y[i * n + o] = s as f32;
        }
    }
}

/// `C (+)= A·B` where `B`'s data is the int4 weight `w`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_q4(
    isa: Isa,
    a: &MatRef,
    b: &MatRef,
    w: &Q4Ref,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) {
    let (k, n) = (b.rows, b.cols);
    // B = Wᵀ restricted to rows r0.. of W: the only view the graphs make
    // (`x · wᵀ`). Any other view is served element by element.
    let r0 = b.offset / w.cols.max(1);
    let dequant = if b.row_stride == 1 && b.col_stride == w.cols && b.offset % w.cols.max(1) == 0 && k == w.cols {
        let mut d = vec![0f32; n * k];
        dequantize(&w.rows_range(r0, r0 + n), &mut d);
        d
    } else {
        let mut d = vec![0f32; n * k];
        d.par_chunks_mut(k.max(1)).enumerate().for_each(|(j, row)| {
            for (p, v) in row.iter_mut().enumerate() {
                *v = b.get(p, j);
            }
        });
        d
    };
    let bf = MatRef::row_major(Elems::F32(&dequant), n, k).transposed();
    gemm_strided(isa, a, &bf, c, ldc, accumulate, parallel, &mut GemmScratch::default());
}
