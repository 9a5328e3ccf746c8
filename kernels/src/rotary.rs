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
    assert!(d & 1 == 0, "rotary: d = {d} must be even");
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
            let rot: Vec<f64> =
                (0..d).map(|j| if j < d / 2 { -(v[j + d / 2] as f64) } else { v[j - d / 2] as f64 }).collect();
            for j in 0..d {
                v[j] = (v[j] as f64 * cos[tt * d + j] as f64 + rot[j] * sin[tt * d + j] as f64) as f32;
            }
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
        fn rotary_matches_ref(t in 0usize..=20, heads in 1usize..=4, half in 1usize..=64, seed: u64) {
            let d = 2 * half;
            let mut rng = Rng::new(seed);
            let x = rng.vec(t * heads * d, 2.0);
            // Real tables: cos/sin of angles, so cos² + sin² = 1 like the model's.
            let ang = rng.vec(t * d, 3.0);
            let cos: Vec<f32> = ang.iter().map(|a| a.cos()).collect();
            let sin: Vec<f32> = ang.iter().map(|a| a.sin()).collect();
            let (mut got, mut want) = (x.clone(), x);
            rotary(&mut got, &cos, &sin, heads, d);
            rotary_ref(&mut want, &cos, &sin, heads, d);
            let e = rel_l2(&got, &want);
            prop_assert!(e < 1e-6, "rel err {e}");
        }
    }

    #[test]
    fn quarter_turn() {
        // cos = 0, sin = 1: out = rotate_half(x) = [-x2, x1].
        let mut x = [1.0f32, 2.0, 3.0, 4.0];
        rotary(&mut x, &[0.0; 4], &[1.0; 4], 1, 4);
        assert_eq!(x, [-3.0, -4.0, 1.0, 2.0]);
        rotary(&mut [], &[], &[], 2, 4);
    }

    #[test]
    #[should_panic(expected = "must be even")]
    fn odd_d_panics() {
        rotary(&mut [0.0; 3], &[0.0; 3], &[0.0; 3], 1, 3);
    }
}
