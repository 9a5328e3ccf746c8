//! Test helpers: a tiny deterministic RNG (so proptest shrinks seeds, not
//! megabyte vectors) and error norms.
//!
//! Public so that checks outside this crate (`qvc selftest`) draw their data
//! from the same generator; nothing on an inference path uses it. Invariant:
//! [`Rng`]'s stream is a pure function of the seed, so every figure a test
//! prints is reproducible from its seed.

use half::{bf16, f16};
use qvc_ir::{DType, Elems};

/// xorshift64*: fast, deterministic, good enough for test data.
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// `n` values uniform in [-scale, scale).
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}

/// Owned storage in one of the three weight dtypes.
pub enum Owned {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Owned {
    /// `v` rounded to `dtype`.
    ///
    /// # Panics
    /// On [`DType::I32`] and [`DType::Q4`]: test code picks the dtype from
    /// [`FLOAT_DTYPES`] (int4 weights are made by quantizing, not rounding).
    pub fn from_f32(v: &[f32], dtype: DType) -> Owned {
        match dtype {
            DType::F32 => Owned::F32(v.to_vec()),
            DType::BF16 => Owned::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F16 => Owned::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::I32 | DType::Q4 => panic!("{dtype} is not a dtype to round to"),
        }
    }
    /// A borrowed view for the kernels' `Elems` arguments.
    pub fn elems(&self) -> Elems<'_> {
        match self {
            Owned::F32(v) => Elems::F32(v),
            Owned::BF16(v) => Elems::BF16(v),
            Owned::F16(v) => Elems::F16(v),
        }
    }
}

/// A logical `rows×cols` matrix stored with some layout, for GEMM tests:
/// owned data plus the view geometry.
pub struct StoredMat {
    own: Owned,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
    off: usize,
}

impl StoredMat {
    /// Random data rounded to `dtype`. `layout`: 0 row-major, 1
    /// column-major (a transposed view, as Linear weights are read), 2 both
    /// strides > 1. `pad` widens the leading stride and `off` starts the
    /// view into the buffer; junk fills the gaps.
    pub fn new(rng: &mut Rng, rows: usize, cols: usize, layout: u8, pad: usize, off: usize, dtype: DType) -> StoredMat {
        let (rs, cs) = match layout {
            0 => (cols + pad, 1),
            1 => (1, rows + pad),
            _ => (2 * cols + pad + 1, 2),
        };
        let span = if rows > 0 && cols > 0 { (rows - 1) * rs + (cols - 1) * cs + 1 } else { 0 };
        let data = rng.vec(off + span + 3, 1.0);
        StoredMat { own: Owned::from_f32(&data, dtype), rows, cols, rs, cs, off }
    }

    /// The matrix as the kernels read it.
    pub fn view(&self) -> crate::gemm::MatRef<'_> {
        crate::gemm::MatRef {
            data: self.own.elems(),
            rows: self.rows,
            cols: self.cols,
            row_stride: self.rs,
            col_stride: self.cs,
            offset: self.off,
        }
    }
}

/// The weight dtypes the CPU kernels read.
pub const FLOAT_DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// ‖got − want‖₂ / ‖mag‖₂: the error of sums of products against the sums
/// of their terms' magnitudes (`mag[i] = Σ|xₚ||wₚ|`), the yardstick of the
/// f32 dot bound `|ŷ − y| ≤ γ_k·Σ|xₚ||wₚ|`. A dot product that cancels to a
/// small fraction of its terms has a rounding error set by the terms, in
/// every kernel that accumulates in f32, so `‖want‖` would measure the
/// data's conditioning (seen: a 1×1×4111 dot, 2e-5 of its result).
///
/// # Panics
/// When the lengths differ (a test bug, not a data error).
pub fn rel_to_magnitude(got: &[f32], want: &[f32], mag: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert_eq!(got.len(), mag.len());
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w as f64).powi(2)).sum();
    let den: f64 = mag.iter().map(|&m| (m as f64).powi(2)).sum();
    if num.is_nan() {
        f64::INFINITY
    } else if num == 0.0 {
        0.0
    } else {
        (num / den.max(1e-300)).sqrt()
    }
}

/// The yardstick of [`rel_to_magnitude`] for `C (+)= A·B`: element `(i, j)`
/// is `Σₚ |a[i,p]|·|b[p,j]|`, plus `|c0[i,j]|` when accumulating.
pub fn gemm_magnitudes(a: &crate::MatRef, b: &crate::MatRef, c0: &[f32], accumulate: bool) -> Vec<f32> {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    (0..m * n)
        .map(|e| {
            let (i, j) = (e / n, e % n);
            let dot: f64 = (0..k).map(|p| (a.get(i, p) as f64 * b.get(p, j) as f64).abs()).sum();
            (dot + if accumulate { c0[e].abs() as f64 } else { 0.0 }) as f32
        })
        .collect()
}

/// ‖got − want‖₂ / ‖want‖₂ (0 when both are zero; inf on a NaN).
///
/// # Panics
/// When the lengths differ (a test bug, not a data error).
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        if g.is_nan() != w.is_nan() {
            return f64::INFINITY;
        }
        if w.is_nan() {
            continue;
        }
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    if num == 0.0 {
        0.0
    } else {
        (num / den.max(1e-300)).sqrt()
    }
}
