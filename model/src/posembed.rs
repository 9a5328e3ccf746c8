//! Resolution-dependent constants, folded once when a program is built:
//! the learned 16×16 position tables resized to the actual patch grid with
//! torch's bicubic (a = −0.75, align_corners = False, no antialias), in f32
//! as the reference computes them (QWEN-VL.md §4.2).

/// Torch's cubic convolution weights for fractional offset `t`.
fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let c1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t)]
}

/// Source index and weights of output index `i` when resizing `n_in` → `n_out`.
fn taps(i: usize, n_in: usize, n_out: usize) -> (i64, [f32; 4]) {
    let scale = n_in as f32 / n_out as f32;
    let real = scale * (i as f32 + 0.5) - 0.5;
    let idx = (real.floor() as i64).min(n_in as i64 - 1);
    let t = (real - idx as f32).clamp(0.0, 1.0);
    (idx, cubic_weights(t))
}

/// Resize a `[src·src, c]` table (row-major grid of `c`-vectors) to
/// `[dst·dst, c]`. Identity when the sizes agree, as in the reference.
pub fn resize_pos_embed(table: &[f32], src: usize, dst: usize, c: usize) -> Vec<f32> {
    assert_eq!(table.len(), src * src * c, "position table is not {src}×{src}×{c}");
    if src == dst {
        return table.to_vec();
    }
    let at = |y: i64, x: i64, ch: usize| {
        let cy = y.clamp(0, src as i64 - 1) as usize;
        let cx = x.clamp(0, src as i64 - 1) as usize;
        table[(cy * src + cx) * c + ch]
    };
    let mut out = vec![0f32; dst * dst * c];
    for oy in 0..dst {
        let (iy, wy) = taps(oy, src, dst);
        for ox in 0..dst {
            let (ix, wx) = taps(ox, src, dst);
            for ch in 0..c {
                let mut rows = [0f32; 4];
                for (r, row) in rows.iter_mut().enumerate() {
                    let y = iy - 1 + r as i64;
                    *row = at(y, ix - 1, ch) * wx[0]
                        + at(y, ix, ch) * wx[1]
                        + at(y, ix + 1, ch) * wx[2]
                        + at(y, ix + 2, ch) * wx[3];
                }
                out[(oy * dst + ox) * c + ch] = rows[0] * wy[0] + rows[1] * wy[1] + rows[2] * wy[2] + rows[3] * wy[3];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_constant_tables() {
        let t: Vec<f32> = (0..2 * 2 * 3).map(|x| x as f32).collect();
        assert_eq!(resize_pos_embed(&t, 2, 2, 3), t);
        // Cubic weights sum to one, so a constant table stays constant.
        let c = vec![0.25f32; 4 * 4 * 2];
        for v in resize_pos_embed(&c, 4, 8, 2) {
            assert!((v - 0.25).abs() < 1e-6);
        }
    }

    #[test]
    fn weights_sum_to_one() {
        for t in [0.0f32, 0.25, 0.5, 0.75, 1.0] {
            let s: f32 = cubic_weights(t).iter().sum();
            assert!((s - 1.0).abs() < 1e-6, "{t}: {s}");
        }
    }
}
