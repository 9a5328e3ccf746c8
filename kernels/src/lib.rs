//! # qvc-kernels: kernel families
//!
//! Each family has a fast CPU implementation (multithreaded with rayon, f32
//! arithmetic, weights read in their stored dtype through [`qvc_ir::Elems`]),
//! a naive reference written for clarity (f64 accumulation), and a cost model
//! (flops and minimum bytes moved) for benchmarks. PTX generators join them in
//! the PTX issue.
//!
//! Families (one module each, all re-exported here):
//! * [`gemm`]: `C = A·B (+C)` for any strides and weight dtypes; packed,
//!   register-blocked and parallel, with an unpacked memory-bound path for
//!   m ≤ 8 (decode at batch 1..8, lm_head), whose long rows run the private
//!   `gemv` module on AVX-512 (16-lane dot products, weight rows streamed).
//!   Under `--cpu-math fast` bf16 weights meet bf16-rounded activations on
//!   `vdpbf16ps`, or on AMX tiles where the CPU has them ([`gemm::amx`]),
//!   wherever that is faster than f32 ([`gemm::bf16_products_pay`]).
//! * [`norm`]: LayerNorm and RMSNorm over rows.
//! * [`act`]: GELU (erf form), SiLU, SwiGLU, with the vectorisable
//!   [`exp_f32`] and [`erf_f32`] they are built on.
//! * [`softmax`]: row softmax.
//! * [`rotary`]: rotary position embedding (rotate-half form).
//! * [`attention`]: multi-head attention (optionally causal) reading q/k/v in
//!   place through token strides, flash-style (online softmax, blocked).
//!
//! [`math`] holds the process-wide [`CpuMath`] mode (`--cpu-math`): exact f32
//! products (the default) or the faster bf16/int8-activation variants.
//!
//! [`peak`] is the f32 multiply-add throughput loop `qvc bench` measures the
//! CPU's FMA ceiling with.
//!
//! [`testutil`] holds the deterministic test-data helpers (an xorshift RNG,
//! error norms) that the unit tests and `qvc selftest` share.
//!
//! Code paths: [`Isa::detect`] picks AVX2+FMA where the CPU has it, else
//! portable Rust loops; the `*_with_isa` entry points force one, and the tests
//! run both against the references.

mod common;

pub mod act;
pub mod attention;
pub mod gemm;
#[cfg(target_arch = "x86_64")]
mod gemv;
pub mod gpu;
pub mod math;
pub mod norm;
pub mod pages;
pub mod peak;
pub mod q4;
pub mod q4_i8;
pub mod rotary;
pub mod softmax;
pub mod spec;

pub mod testutil;

pub use act::{erf_f32, erf_ref, exp_f32, gelu_erf, gelu_erf_ref, gelu_ref, silu, silu_ref, swiglu, swiglu_ref};
pub use attention::{
    attention, attention_flops, attention_min_bytes, attention_ref, attention_with_isa, attention_with_past, AttnArgs,
    Mask,
};
pub use common::Isa;
pub use gemm::{
    decode_group_rows, gemm, gemm_flops, gemm_min_bytes, gemm_ref, gemm_then, gemm_with_isa, Epilogue, MatRef,
    DECODE_BATCH_INVARIANT_MAX,
};
pub use math::{cpu_math, set_cpu_math, CpuMath};
pub use norm::{layer_norm, layer_norm_ref, rms_norm, rms_norm_ref};
pub use rotary::{rotary, rotary_ref};
pub use softmax::{softmax_rows, softmax_rows_ref};
pub use spec::{Cost, KernelSpec, Launch};
