//! Rotary position embedding, rotate-half form, in place:
//! `x ← x · cos + rotate_half(x) · sin` with
//! `rotate_half(x) = cat(−x[d/2..], x[..d/2])`.
//!
//! `x` is `[t, heads, d]` row-major; `cos`/`sin` are `[t, d]` (one row per
//! token, shared by the heads). `d` must be even. Each (token, head) vector
//! is rotated independently: tasks take whole tokens.

use crate::common::{par_chunks, worth_parallel};

/// Apply rotary embedding to `x: [t, heads, d]` in place (see module docs).
pub fn rotary(x: &mut [f32], cos: &[f32], sin: &[f32], heads: usize, d: usize) {
    let t = check(x, cos, sin, heads, d);
    if t == 0 || heads == 0 || d == 0 {
        return;
    }
    let hd = heads * d;
    let tokens_per_task = (16 * 1024 / hd).max(1);
    par_chunks(x, tokens_per_task * hd, worth_parallel(x.len() * 3), |ci, c| {
        for (ti, tok) in c.chunks_exact_mut(hd).enumerate() {
            let tt = ci * tokens_per_task + ti;
            let (cs, sn) = (&cos[tt * d..(tt + 1) * d], &sin[tt * d..(tt + 1) * d]);
            for v in tok.chunks_exact_mut(d) {
                rotate(v, cs, sn);
            }
        }
    });
}

/// Checks shapes; returns t.
fn check(x: &[f32], cos: &[f32], sin: &[f32], heads: usize, d: usize) -> usize {
    assert!(d % 2 == 0, "rotary: d = {d} must be even");
    let hd = heads * d;
    if hd == 0 {
        assert!(x.is_empty(), "rotary: heads * d = 0 with non-empty x");
        return 0;
    }
    assert_eq!(x.len() % hd, 0, "rotary: x.len() = {} is not a multiple of heads * d = {hd}", x.len());
    let t = x.len() / hd;
    assert!(cos.len() == t * d && sin.len() == t * d, "rotary: cos and sin must be [t = {t}, d = {d}]");
    t
}

#[inline(always)]
fn rotate(v: &mut [f32], cos: &[f32], sin: &[f32]) {
    let h = v.len() / 2;
    let (lo, hi) = v.split_at_mut(h);
    let (c_lo, c_hi) = cos.split_at(h);
    let (s_lo, s_hi) = sin.split_at(h);
    for j in 0..h {
        let (x1, x2) = (lo[j], hi[j]);
        lo[j] = x1 * c_lo[j] - x2 * s_lo[j];
        hi[j] = x2 * c_hi[j] + x1 * s_hi[j];
    }
}

/// Reference rotary in f64, written as the formula: build `rotate_half(x)`, then combine.
pub fn rotary_ref(x: &mut [f32], cos: &[f32], sin: &[f32], heads: usize, d: usize) {
    let t = check(x, cos, sin, heads, d);
    for tt in 0..t {
        for h in 0..heads {
            let v = &mut x[(tt * heads + h) * d..][..d];
            let rot: Vec<f64> = (0..d).map(|j| if j < d / 2 { -(v[j + d / 2] as f64) } else { v[j - d / 2] as f64 }).collect();
            for j in 0..d {
                v[j] = (v[j] as f64 * cos[tt * d + j] as f64 + rot[j] * sin[tt * d + j] as f64) as f32;
            }
        }
    }
}
