//! The catalog: every kernel the Qwen-VL-Chat programs use, one place.
//!
//! Each family lists its model shapes (`model_specs`); the catalog gathers
//! them, labelled by family, without duplicates (two specs with the same
//! name are the same kernel). The ptxas check, the PTX snapshot, the
//! benches and `qvc kernels` all walk this list, so a family that is added
//! here is checked everywhere at once.

use std::collections::HashSet;

use crate::KernelSpec;

/// One kernel of the catalog.
#[derive(Debug)]
pub struct Entry {
    /// The family (module) it comes from: `gemm`, `attention`, …
    pub family: &'static str,
    pub spec: Box<dyn KernelSpec + Send + Sync>,
}

/// Every kernel of the Qwen-VL-Chat programs at 448 and 896 pixels, prefill
/// and decode at batch 1 and 8, in family order; names are unique.
pub fn model_kernels() -> Vec<Entry> {
    let mut out: Vec<Entry> = vec![];
    let mut seen = HashSet::new();
    let mut add = |family: &'static str, spec: Box<dyn KernelSpec + Send + Sync>| {
        if seen.insert(spec.name()) {
            out.push(Entry { family, spec });
        }
    };
    for s in super::patch::model_specs() {
        add("patch", Box::new(s));
    }
    for s in super::gemm::model_specs() {
        add("gemm", Box::new(s));
    }
    for s in super::gemv::model_specs() {
        add("gemv", Box::new(s));
    }
    for s in super::norm::model_specs() {
        add("norm", Box::new(s));
    }
    for s in super::attention::model_specs() {
        add("attention", Box::new(s));
    }
    for s in super::rotary::model_specs() {
        add("rotary", Box::new(s));
    }
    for s in super::embed::model_specs() {
        add("embed", Box::new(s));
    }
    for s in super::decode_attention::DecodeAttnSpec::model_specs() {
        add("decode_attention", Box::new(s.partial()));
        add("decode_attention", Box::new(s.combine()));
    }
    for s in super::softmax::SoftmaxSpec::model_specs() {
        add("softmax", Box::new(s));
    }
    for s in super::sample::ArgmaxSpec::model_specs() {
        add("argmax", Box::new(s));
    }
    for s in super::sample::TopPSpec::model_specs() {
        add("top_p", Box::new(s));
    }
    out
}

/// FNV-1a, 64 bit: a stable fingerprint of a kernel's PTX for the snapshot
/// (std's hasher is not stable across Rust releases).
pub fn fingerprint(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}
