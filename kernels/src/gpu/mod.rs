//! GPU kernel families: for each, a spec (static shapes, dtypes, options) that
//! implements [`crate::KernelSpec`] (PTX generator, launch geometry, cost
//! model) and carries the family's fast CPU implementation and naive
//! reference, so one value describes the kernel on every backend.
//!
//! Conventions shared by all families (the compiler relies on them):
//! * weights are bf16, Linear weights `[out, in]` row-major as in the checkpoint;
//! * the residual stream is f32; GEMM inputs (norm outputs) are bf16;
//! * tensors are row-major with explicit row strides where a kernel reads a
//!   slice of a wider buffer (q/k/v inside a fused QKV output);
//! * every kernel guards ragged edges itself: any shape is valid, not only
//!   multiples of its tiles.

pub mod attention;
pub mod catalog;
pub mod decode_attention;
pub mod embed;
pub mod gemm;
pub mod gemv;
pub mod generic;
pub mod norm;
pub mod patch;
pub mod q4;
pub mod rotary;
pub mod sample;
pub mod softmax;

/// A spec (or runtime parameter) that no kernel can be generated for, with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidSpec {
    pub spec: &'static str,
    pub reason: String,
}

impl std::fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "invalid {}: {}", self.spec, self.reason)
    }
}

impl std::error::Error for InvalidSpec {}
