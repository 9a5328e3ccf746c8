//! # qvc-runtime: running programs
//!
//! Start with [`Backend`]: the one interface the model code uses to run a
//! [`qvc_ir::Graph`] with its weights and inputs. Three backends:
//! - [`Cpu`]: fast multithreaded kernels, weights read in place from the
//!   memory map;
//! - [`Reference`]: the naive interpreter of `qvc-ir`, for tests;
//! - [`gpu::GpuBackend`]: the graph lowered onto generated PTX kernels, on a
//!   [`gpu::Device`]: a CUDA GPU ([`gpu::CudaDevice`]) or the PTX emulator
//!   ([`gpu::EmuDevice`], which tests the GPU path without a GPU). It keeps
//!   the KV cache on the device and can sample there
//!   ([`Backend::kv_on_device`], [`Backend::samples_on_device`]).
//!
//! [`WeightStore`] maps checkpoints; [`KvCache`] holds decoder state between
//! steps on the host; [`artifact`] reads `qvc compile` output; [`cuda`] finds
//! GPUs without linking CUDA.

pub mod artifact;
pub mod cpu;
pub mod cuda;
pub mod gptq;
pub mod gpu;
pub mod kv;
mod pool;
pub mod weights;

pub use kv::KvCache;
/// The largest decode batch whose every row is bit-identical, on the [`Cpu`]
/// backend, to decoding that sequence alone (the GEMV and the padded-cache
/// attention are batch- and padding-invariant up to it): a scheduler that
/// wants greedy answers independent of what else runs splits larger decode
/// batches into groups of at most this many sequences. The GPU backends
/// decode up to 8 rows with the GEMV kernel, whose rows do not depend on
/// each other either (a batched step over any slots equals each sequence
/// alone bit for bit on the emulator: `tests/gpu_emu.rs`).
pub use qvc_kernels::DECODE_BATCH_INVARIANT_MAX;
pub use weights::{WeightError, WeightStore};

use qvc_ir::{ExecError, Graph, InputRef, WeightSource};
use std::collections::HashMap;

/// Rows one CPU decode step may batch when it multiplies weights stored as
/// these `(dtype, k)` (`[n, k]` each, every Linear of the step), under the
/// process's `--cpu-math`, with every row bit for bit the row alone: the
/// smallest [`qvc_kernels::decode_group_rows`] over them (16 where they all
/// decode on AMX tiles, which takes a process that declares batched decode),
/// [`DECODE_BATCH_INVARIANT_MAX`] for none.
pub fn cpu_decode_group(weights: impl IntoIterator<Item = (qvc_ir::DType, usize)>) -> usize {
    let (isa, math) = (qvc_kernels::Isa::detect(), qvc_kernels::cpu_math());
    weights
        .into_iter()
        .map(|(dtype, k)| qvc_kernels::decode_group_rows(isa, math, dtype, k))
        .min()
        .unwrap_or(DECODE_BATCH_INVARIANT_MAX)
}

/// One kernel's (GPU) or op's (CPU) share of a profile: how often it ran,
/// for how long, and the work it did by the backend's cost model
/// ([`gpu::GpuBackend::start_profile`], [`cpu::start_profile`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelTime {
    /// The kernel's name (GPU) or the op with its shapes (CPU).
    pub kernel: String,
    pub launches: u64,
    /// Total time, milliseconds.
    pub ms: f64,
    /// Total work of those launches.
    pub flops: u64,
    pub bytes: u64,
}

/// Named run-time inputs of a program.
pub type Inputs<'a> = HashMap<String, InputRef<'a>>;

/// Something that can run a graph.
pub trait Backend: Sync {
    fn name(&self) -> &'static str;
    /// Run `graph` and return all its named outputs as f32.
    fn run(
        &self,
        graph: &Graph,
        weights: &dyn WeightSource,
        inputs: &Inputs<'_>,
    ) -> Result<HashMap<String, Vec<f32>>, ExecError>;
    /// Whether the backend keeps the KV cache itself (a GPU's device memory).
    /// Then sessions pass `past_len` (and `kv_slot`, the sequence) instead of
    /// `past_k.*` / `past_v.*` inputs, and the backend returns no `k.*` /
    /// `v.*` outputs: the new rows went into its cache at row `past_len`.
    fn kv_on_device(&self) -> bool {
        false
    }
    /// Whether the backend can pick the next token itself: given inputs
    /// `sample.temperature` (0 = greedy), `sample.top_p`, `sample.top_k` and
    /// `sample.u` (one uniform in [0, 1) per row), it returns an output
    /// `token` (ids as f32, one per row) instead of `logits`, so only token
    /// ids leave the device.
    fn samples_on_device(&self) -> bool {
        false
    }
}

/// The fast CPU backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Backend for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn run(
        &self,
        graph: &Graph,
        weights: &dyn WeightSource,
        inputs: &Inputs<'_>,
    ) -> Result<HashMap<String, Vec<f32>>, ExecError> {
        cpu::run(graph, weights, inputs)
    }
}

/// The naive reference interpreter as a backend (slow; for tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct Reference;

impl Backend for Reference {
    fn name(&self) -> &'static str {
        "reference"
    }
    fn run(
        &self,
        graph: &Graph,
        weights: &dyn WeightSource,
        inputs: &Inputs<'_>,
    ) -> Result<HashMap<String, Vec<f32>>, ExecError> {
        let outs = qvc_ir::run_reference(graph, weights, inputs)?;
        Ok(outs.into_iter().map(|(k, v)| (k, v.into_f32())).collect())
    }
}
