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

/// ‖a − b‖ / ‖mag‖ in f64: the error of a sum of products measured against
/// the sums of its terms' magnitudes (`mag`: the same computation on `|x|`,
/// `|w|`), the yardstick of the f32 dot bound `|ŷ − y| ≤ γ_k·Σ|xᵢ||wᵢ|`. A
/// result that cancels to near zero has a rounding error set by its terms,
/// in every backend that accumulates in f32, so `‖b‖` would measure the
/// data's conditioning, not the backend.
pub fn rel_to(a: &[f32], b: &[f32], mag: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    assert_eq!(a.len(), mag.len());
    let n: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let d: f64 = mag.iter().map(|m| (*m as f64).powi(2)).sum();
    (n / d.max(1e-30)).sqrt()
}
