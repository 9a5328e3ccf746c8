//! Row softmax over the last axis (`cols`), in place, in f32:
//! `y_j = exp(x_j − max x) / Σ_k exp(x_k − max x)`.
//!
//! Subtracting the row maximum keeps every exponent ≤ 0, so nothing
//! overflows; `-inf` entries become exactly 0. A row that is all `-inf` gives
//! NaN, as in PyTorch. Rows are independent: tasks take whole rows.

use crate::act::exp_f32;
use crate::common::{par_chunks, worth_parallel, Isa};

/// Elements per task (whole rows, at least one).
const CHUNK: usize = 16 * 1024;

/// Softmax of each row of `cols` elements of `x`, in place.
pub fn softmax_rows(x: &mut [f32], cols: usize) {
    softmax_rows_with_isa(Isa::detect(), x, cols)
}

fn check(x: &[f32], cols: usize) {
    if cols == 0 {
        assert!(x.is_empty(), "softmax_rows: cols = 0 with non-empty x");
    } else {
        assert_eq!(x.len() % cols, 0, "softmax_rows: x.len() = {} is not a multiple of cols = {cols}", x.len());
    }
}

pub(crate) fn softmax_rows_with_isa(isa: Isa, x: &mut [f32], cols: usize) {
    check(x, cols);
    if x.is_empty() {
        return;
    }
    let isa = isa.resolve();
    let chunk = (CHUNK / cols).max(1) * cols;
    par_chunks(x, chunk, worth_parallel(x.len() * 20), |_, c| {
        for row in c.chunks_exact_mut(cols) {
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` was resolved, so the CPU has AVX2 and FMA.
                Isa::Avx2Fma | Isa::Avx512 => unsafe { softmax_row_avx2(row) },
                _ => softmax_row(row),
            }
        }
    });
}

/// Maximum of a row, with 8 lanes so that it vectorises.
#[inline(always)]
pub(crate) fn row_max(x: &[f32]) -> f32 {
    row_max_lanes::<8>(x)
}

/// Maximum of a row in `L` lanes (16: one zmm where the caller enables
/// AVX-512).
#[inline(always)]
pub(crate) fn row_max_lanes<const L: usize>(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; L];
    let mut it = x.chunks_exact(L);
    for c in &mut it {
        for l in 0..L {
            m[l] = m[l].max(c[l]);
        }
    }
    for (l, &v) in it.remainder().iter().enumerate() {
        m[l] = m[l].max(v);
    }
    m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// `x_j = exp(x_j − max)` in place; returns Σ x_j (8 lanes).
#[inline(always)]
pub(crate) fn exp_sub_sum(x: &mut [f32], max: f32) -> f32 {
    sum8(exp_sub_lanes::<8>(x, max))
}

/// [`exp_sub_sum`] in 16 lanes (one zmm where the caller enables
/// AVX-512), the lanes folded to 8 (`s[l] + s[l + 8]`) and then summed as
/// there.
#[inline(always)]
pub(crate) fn exp_sub_sum16(x: &mut [f32], max: f32) -> f32 {
    let s = exp_sub_lanes::<16>(x, max);
    sum8(std::array::from_fn(|l| s[l] + s[l + 8]))
}

/// `x_j = exp(x_j − max)` in place; the per-lane sums (element j in lane
/// `j mod L`, the ragged end in the first lanes).
#[inline(always)]
fn exp_sub_lanes<const L: usize>(x: &mut [f32], max: f32) -> [f32; L] {
    let mut s = [0f32; L];
    let mut it = x.chunks_exact_mut(L);
    for c in &mut it {
        for l in 0..L {
            c[l] = exp_f32(c[l] - max);
            s[l] += c[l];
        }
    }
    for (l, v) in it.into_remainder().iter_mut().enumerate() {
        *v = exp_f32(*v - max);
        s[l] += *v;
    }
    s
}

#[inline(always)]
fn sum8(s: [f32; 8]) -> f32 {
    ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]))
}

#[inline(always)]
fn softmax_row(x: &mut [f32]) {
    let m = row_max(x);
    let sum = exp_sub_sum(x, m);
    let inv = 1.0 / sum;
    for v in x {
        *v *= inv;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(x: &mut [f32]) {
    softmax_row(x)
}

/// Reference row softmax in f64.
pub fn softmax_rows_ref(x: &mut [f32], cols: usize) {
    check(x, cols);
    if cols == 0 {
        return;
    }
    for row in x.chunks_exact_mut(cols) {
        let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        let e: Vec<f64> = row.iter().map(|&v| (v as f64 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        for (v, e) in row.iter_mut().zip(e) {
            *v = (e / s) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{rel_l2, Rng};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn softmax_matches_ref(
            rows in 0usize..=9, cols in 1usize..=700,
            scale in prop::sample::select(vec![0.1f32, 3.0, 30.0]),
            masked in 0usize..4, seed: u64, portable: bool,
        ) {
            let isa = if portable { Isa::Portable } else { Isa::Avx2Fma };
            let mut rng = Rng::new(seed);
            let mut x = rng.vec(rows * cols, scale);
            // Some -inf entries (never a whole row).
            for r in 0..rows {
                for j in 0..masked.min(cols - 1) {
                    x[r * cols + (j * 7) % cols] = f32::NEG_INFINITY;
                }
            }
            let (mut got, mut want) = (x.clone(), x);
            softmax_rows_with_isa(isa, &mut got, cols);
            softmax_rows_ref(&mut want, cols);
            for r in 0..rows {
                let (g, w) = (&got[r * cols..(r + 1) * cols], &want[r * cols..(r + 1) * cols]);
                let e = rel_l2(g, w);
                prop_assert!(e < 1e-5, "row {r}: rel err {e}");
                let s: f64 = g.iter().map(|&v| v as f64).sum();
                prop_assert!((s - 1.0).abs() < 1e-5, "row {r} sums to {s}");
            }
        }
    }

    #[test]
    fn edge_cases() {
        softmax_rows(&mut [], 5);
        let mut one = [42.0f32];
        softmax_rows(&mut one, 1);
        assert_eq!(one, [1.0]);
        let mut x = [0.0f32, f32::NEG_INFINITY, 0.0];
        softmax_rows(&mut x, 3);
        assert_eq!(x, [0.5, 0.0, 0.5]);
        let mut x = [f32::NEG_INFINITY; 2];
        softmax_rows(&mut x, 2);
        assert!(x[0].is_nan() && x[1].is_nan(), "all -inf gives NaN, as in PyTorch");
    }
}
