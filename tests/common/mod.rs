//! Shared helpers of the end-to-end tests: finding `../shared/fixtures`,
//! reading expected tensors, comparing with a relative error.
#![allow(dead_code)]

pub mod group;
pub mod parity;

use std::path::PathBuf;

/// The fixture directory, or `None` (and a note) where it is absent. With
/// `QVC_REQUIRE_FIXTURES=1` (CI) a missing fixture is a failure.
pub fn fixtures() -> Option<PathBuf> {
    fixture("tiny-qwen-vl")
}

/// `../shared/fixtures/NAME`, like [`fixtures`].
pub fn fixture(name: &str) -> Option<PathBuf> {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures").join(name);
    if d.join("expected.safetensors").is_file() {
        return Some(d);
    }
    if std::env::var("QVC_REQUIRE_FIXTURES").as_deref() == Ok("1") {
        panic!("QVC_REQUIRE_FIXTURES=1 but {} is missing", d.display());
    }
    eprintln!("skipped: ../shared/fixtures not found ({})", d.display());
    None
}

pub struct Expected {
    bytes: Vec<u8>,
    pub json: serde_json::Value,
}

impl Expected {
    pub fn load(dir: &std::path::Path) -> Self {
        let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
        let json = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        Expected { bytes, json }
    }
    pub fn f32(&self, name: &str) -> Vec<f32> {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("no tensor {name} in expected.safetensors"));
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }
    pub fn ids(&self, v: &serde_json::Value) -> Vec<u32> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
    }
}

/// ‖a − b‖ / ‖b‖ in f64.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

pub fn max_abs(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max)
}

/// Assert a relative error below `tol`, printing the numbers either way.
pub fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let (r, m) = (rel_err(got, want), max_abs(got, want));
    eprintln!("{what}: rel err {r:.2e}, max abs {m:.2e}");
    assert!(r < tol, "{what}: relative error {r:.3e} exceeds {tol:e} (max abs {m:.3e})");
}
