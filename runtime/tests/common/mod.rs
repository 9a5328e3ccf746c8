//! Helpers shared by the runtime's test files: bf16 test weights, a
//! deterministic value stream, and the relative errors the tolerances use.
#![allow(dead_code)] // each test file uses a subset

use half::bf16;
use qvc_ir::{Elems, WeightSource};
use std::collections::HashMap;

/// Weights for tests: bf16 params, as checkpoints store them.
pub struct W(pub HashMap<String, Vec<bf16>>);
impl WeightSource for W {
    fn weight(&self, name: &str) -> Option<Elems<'_>> {
        self.0.get(name).map(|v| Elems::BF16(v))
    }
}

/// `n` values in [-1, 1) from an LCG seeded by `seed` (never all zero).
pub fn vals(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// ‖a − b‖ / ‖b‖ in f64.
pub fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let n: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let d: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (n / d.max(1e-30)).sqrt()
}

/// ‖a − b‖ / ‖mag‖: the error of sums of products against the sums of their
/// terms' magnitudes (see the kernels' test utilities, where it is defined).
#[allow(unused_imports)] // each test file uses a subset
pub use qvc_kernels::testutil::rel_to_magnitude as rel_to;
