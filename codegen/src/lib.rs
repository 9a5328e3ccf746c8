//! # qvc-codegen: PTX, written and checked without a GPU
//!
//! Read in this order:
//! * [`ptx`]: the data model (types, registers, operands, instructions,
//!   kernels, modules) and the printer that turns it into PTX text.
//! * [`builder`]: [`KernelBuilder`], the typed surface every kernel generator
//!   uses: registers by type, params, shared arrays, arithmetic and math
//!   (GELU, SiLU, erf, exp built from `ex2`/`rcp`/`fma`), memory (vectorised,
//!   `cp.async`), `bar.sync`, `shfl.sync`, `mma.sync` m16n8k16, `ldmatrix`,
//!   labels and loops.
//! * [`emu`]: the PTX emulator. It parses the printed text (so the printer is
//!   tested by every run) and executes a launch thread by thread, with warps
//!   meeting at collectives (`shfl`, `mma`, `ldmatrix`) and blocks at
//!   barriers. Out-of-bounds accesses, reads of unwritten shared memory and
//!   barrier divergence are errors that name the kernel, instruction and thread.
//! * [`ptxas`]: the optional check with NVIDIA's assembler (found on `PATH`
//!   or in `.tools/bin`): every kernel must assemble for sm_80 and sm_90 with
//!   no warnings; registers, spills and shared memory are read back.
//!
//! The kernel families themselves (GEMM, attention, norms, …) live in
//! `qvc-kernels`; this crate knows nothing about models.

pub mod builder;
pub mod emu;
pub mod ptx;
pub mod ptxas;

pub use builder::{is_float, Cmp, KernelBuilder, Label, Space};
pub use ptx::{
    Addr, AddrBase, Guard, Instr, Kernel, Module, Operand, Param, Reg, RegClass, Shared, Sreg, Stmt, Target, Ty,
};
