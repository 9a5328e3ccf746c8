//! The PTX emulator: runs the kernels this crate prints, on the CPU, strictly.
//!
//! # Pipeline
//! [`run`] prints a [`Kernel`] with the module printer, [`Program::parse`]
//! reads the text back into the same [`crate::ptx`] data model (so every
//! emulated launch also tests the printer), and [`Program::launch`] decodes
//! the named kernel once into a compact instruction list (opcode strings
//! resolved to enums, registers to slot indices, labels to instruction
//! indices, `.shared`/`.param` symbols to offsets) before executing it. The
//! inner loop does no string work and no allocation.
//!
//! # Execution model (deterministic)
//! * Blocks run one after another, x fastest, then y, then z. Each block has
//!   its own zero-initialised registers (one flat `Vec<u64>`, `thread *
//!   nslots + slot`; values are stored zero-extended from their register
//!   width) and its own shared memory.
//! * Within a block every thread has its own pc. A thread runs until it
//!   reaches `bar.sync`, a warp collective (`shfl.sync`, `vote.sync`,
//!   `mma.sync`, `ldmatrix`) or `ret`/`exit`. Warps are consecutive linear
//!   thread ids (`x + y·ntid.x + z·ntid.x·ntid.y`) in groups of 32.
//! * A collective executes when all 32 lanes of its warp wait at the same
//!   instruction with a full membermask. A lane that waits elsewhere, exited,
//!   or is absent (partial last warp) is a `WarpDivergence` error.
//! * `bar.sync` releases when every thread of the block waits at a barrier.
//!   If a thread exited while others wait, that is `BarrierDivergence` (the
//!   GPU would count exited threads as arrived, but that is a latent bug in a
//!   generated kernel, so it is refused here), naming a waiting and the
//!   missing thread.
//! * `cp.async` reads its global source at issue and lands in shared memory
//!   when a `cp.async.wait_group` of its thread completes its group; until
//!   then its destination bytes read as an error, so a missing or too-weak
//!   wait is caught (the GPU would race).
//! * Atomics are trivially atomic and `membar`/`fence` are no-ops (one
//!   thread runs at a time, so every access is already ordered).
//! * A launch stops with `StepLimit` after [`Device::set_step_limit`]
//!   thread-instructions (default 2^34) instead of hanging.
//!
//! # What is checked
//! * Global memory: allocations get bases `(i+1) << 36`; any access (load,
//!   store, atomic, `cp.async` source with a non-zero source size) not fully
//!   inside one allocation is `OutOfBounds`, naming the nearest allocation.
//! * Alignment: an address that is not a multiple of the access size
//!   (vector size included; 16 for `ldmatrix` rows and `cp.async` 16) is
//!   `Misaligned`.
//! * Shared memory: per block a byte array of the kernel's static size and a
//!   written-map reset for each block. Reading a byte this block never wrote
//!   is `UninitShared`; accesses beyond the arrays are `OutOfBounds`.
//! * Launch arguments: count, types (`Ptr`/`U64` for 64-bit params, `U32`,
//!   `S32`, `F32`), pointers inside an allocation: `BadArgs`. Geometry
//!   (`.maxntid`, 1..=1024 threads, non-empty grid): `BadLaunch`.
//! * Opcodes and modifiers outside the supported set: `Unsupported` at decode
//!   time, before any thread runs.
//!
//! # What is approximated
//! * `ex2`, `lg2`, `rsqrt`, `rcp`, `sqrt`, `tanh`, `sin`, `cos` `.approx`
//!   are computed as exact f32 math (the GPU is within a few ulp).
//!   `div.approx`/`div.full` compute `a / b` rounded to nearest.
//! * `mma.sync` computes each output as `(Σ_k a·b) + c`, k ascending, in f32;
//!   bf16/f16 products are exact in f32. The tensor cores add in a different
//!   order (and with a wider internal sum), so compare with tolerances.
//! * Integer division by zero (unspecified in PTX) yields all ones for the
//!   quotient and the dividend for the remainder; it is not an error.
//! * `%warpid` is `linear tid / 32` (on hardware it is a scheduler slot that
//!   may differ and change; kernels should derive warps from `%tid`).
//!
//! # Not supported
//! wgmma, TMA/bulk copies, mbarriers, dynamic shared memory, local memory,
//! generic addressing, textures/surfaces, `.const`, f16/bf16 arithmetic
//! (only conversions and `mma`), `prmt`, named barriers with thread counts,
//! partial membermasks. Per-target feature availability (`cvt.bf16.f64`
//! needs sm_90) is ptxas's job: the emulator accepts the union.

// An `EmuError` carries its full context (kernel, instruction text, block,
// thread, detail) by value so tests can match on fields; it is built only on
// the failure path (the interpreter loop uses a small internal fault type),
// so its size costs nothing where speed matters.
#![allow(clippy::result_large_err)]

mod decode;
mod exec;
mod mem;
mod parse;

use std::fmt;

use crate::builder::Space;
use crate::ptx::{Kernel, Module, Target};

pub use mem::Device;

/// A launch argument, in the order the kernel declared its params.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    /// A device pointer from [`Device`] (for `.u64` params).
    Ptr(u64),
    U32(u32),
    S32(i32),
    U64(u64),
    F32(f32),
}

/// What one launch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaunchStats {
    /// Thread-instructions executed (predicated-off ones included; a warp
    /// collective counts once per lane).
    pub instructions: u64,
    pub blocks: u64,
    /// Threads launched (blocks × threads per block).
    pub threads: u64,
    /// Barrier releases summed over blocks.
    pub barriers: u64,
    /// Warp collectives executed (once per warp).
    pub collectives: u64,
}

/// The kind of an emulation failure.
#[derive(Clone, Debug, PartialEq)]
pub enum EmuErrorKind {
    /// The PTX text could not be read (1-based line).
    Parse {
        line: usize,
        msg: String,
    },
    /// No `.entry` of that name in the program.
    UnknownKernel,
    /// Launch arguments do not match the params (see the detail).
    BadArgs,
    /// Grid or block shape the kernel cannot be launched with.
    BadLaunch,
    OutOfBounds {
        space: Space,
        addr: u64,
        bytes: usize,
    },
    /// A read of shared memory this block never wrote.
    UninitShared {
        addr: u64,
    },
    /// Some threads wait at `bar.sync` while others exited (or wait at a
    /// different barrier id).
    BarrierDivergence,
    /// A warp collective without all lanes of the warp at it.
    WarpDivergence,
    /// An opcode, modifier or operand form the emulator does not implement.
    Unsupported(String),
    Misaligned,
    /// The launch ran more thread-instructions than the step limit.
    StepLimit,
}

/// An emulation failure, located as precisely as possible.
#[derive(Clone, Debug, PartialEq)]
pub struct EmuError {
    pub kernel: String,
    /// Index of the instruction (labels and comments not counted).
    pub pc: Option<usize>,
    /// The instruction as printed.
    pub instr: Option<String>,
    pub ctaid: Option<[u32; 3]>,
    pub tid: Option<[u32; 3]>,
    pub kind: EmuErrorKind,
    /// Free-form specifics (nearest allocation, the missing thread, …).
    pub detail: String,
}

impl EmuError {
    pub(crate) fn new(kernel: &str, kind: EmuErrorKind, detail: impl Into<String>) -> EmuError {
        EmuError {
            kernel: kernel.to_string(),
            pc: None,
            instr: None,
            ctaid: None,
            tid: None,
            kind,
            detail: detail.into(),
        }
    }

    pub fn kind(&self) -> &EmuErrorKind {
        &self.kind
    }
}

impl fmt::Display for EmuErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            EmuErrorKind::Parse { line, msg } => write!(f, "parse error at line {line}: {msg}"),
            EmuErrorKind::UnknownKernel => f.write_str("unknown kernel"),
            EmuErrorKind::BadArgs => f.write_str("bad launch arguments"),
            EmuErrorKind::BadLaunch => f.write_str("bad launch geometry"),
            EmuErrorKind::OutOfBounds { space, addr, bytes } => {
                write!(f, "out-of-bounds {} access of {bytes} bytes at {addr:#x}", space.name())
            }
            EmuErrorKind::UninitShared { addr } => write!(f, "read of never-written shared memory at {addr:#x}"),
            EmuErrorKind::BarrierDivergence => f.write_str("barrier divergence"),
            EmuErrorKind::WarpDivergence => f.write_str("warp divergence at a collective"),
            EmuErrorKind::Unsupported(s) => write!(f, "unsupported: {s}"),
            EmuErrorKind::Misaligned => f.write_str("misaligned access"),
            EmuErrorKind::StepLimit => f.write_str("step limit exceeded"),
        }
    }
}

impl fmt::Display for EmuError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "kernel `{}`: {}", self.kernel, self.kind)?;
        if let Some(pc) = self.pc {
            write!(f, " at pc {pc}")?;
        }
        if let Some(i) = &self.instr {
            write!(f, " `{i}`")?;
        }
        if let Some([x, y, z]) = self.ctaid {
            write!(f, " in block ({x},{y},{z})")?;
        }
        if let Some([x, y, z]) = self.tid {
            write!(f, " thread ({x},{y},{z})")?;
        }
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        Ok(())
    }
}

impl std::error::Error for EmuError {}

/// A parsed PTX module.
#[derive(Clone, Debug)]
pub struct Program {
    /// The `.target` name (`sm_80`).
    target: String,
    kernels: Vec<Kernel>,
}

impl Program {
    /// Parses PTX text of the subset [`crate::ptx`] prints. Errors are
    /// [`EmuErrorKind::Parse`] with a 1-based line number.
    pub fn parse(ptx: &str) -> Result<Program, EmuError> {
        let (target, kernels) = parse::parse_module(ptx)?;
        Ok(Program { target, kernels })
    }

    pub fn kernel_names(&self) -> Vec<&str> {
        self.kernels.iter().map(|k| k.name.as_str()).collect()
    }

    /// The parsed kernels, in the data model the printer takes.
    pub fn kernels(&self) -> &[Kernel] {
        &self.kernels
    }

    pub fn kernel(&self, name: &str) -> Option<&Kernel> {
        self.kernels.iter().find(|k| k.name == name)
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    /// Decodes `kernel` and runs one launch of it on `dev`.
    pub fn launch(
        &self,
        kernel: &str,
        grid: [u32; 3],
        block: [u32; 3],
        args: &[Arg],
        dev: &mut Device,
    ) -> Result<LaunchStats, EmuError> {
        let k = self.kernel(kernel).ok_or_else(|| {
            EmuError::new(kernel, EmuErrorKind::UnknownKernel, format!("have {:?}", self.kernel_names()))
        })?;
        exec::launch(k, grid, block, args, dev)
    }
}

/// Prints `Module::new(Target::Sm80, vec![kernel.clone()])`, parses that
/// text and launches the kernel: what tests use.
pub fn run(
    kernel: &Kernel,
    grid: [u32; 3],
    block: [u32; 3],
    args: &[Arg],
    dev: &mut Device,
) -> Result<LaunchStats, EmuError> {
    let text = Module::new(Target::Sm80, vec![kernel.clone()]).print();
    let prog = Program::parse(&text)?;
    prog.launch(&kernel.name, grid, block, args, dev)
}
