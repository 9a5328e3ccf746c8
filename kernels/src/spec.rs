//! What every GPU kernel of every family exposes, so that the compiler, the
//! runtime, the ptxas check and the benches treat them alike.
//!
//! A spec is a plain value holding the static shapes, dtypes and options of
//! one kernel; everything else (its PTX, its launch geometry, its cost) is a
//! pure function of it. Two equal specs give byte-identical PTX.

use qvc_codegen::Kernel;

/// Grid and block dimensions of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
}

impl Launch {
    pub fn new(grid: [u32; 3], block: [u32; 3]) -> Launch {
        Launch { grid, block }
    }
    pub fn threads_per_block(&self) -> u32 {
        self.block.iter().product()
    }
}

/// The work a kernel must do: useful floating-point operations (a multiply-add
/// counts 2) and the minimum bytes it must move to and from global memory
/// (each input read once, each output written once).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    pub flops: u64,
    pub bytes: u64,
}

/// One generated kernel.
pub trait KernelSpec: std::fmt::Debug + Send + Sync {
    /// The PTX entry name; it encodes the spec, so distinct specs never collide.
    fn name(&self) -> String;
    /// The generated kernel (built with `qvc_codegen::KernelBuilder`).
    fn build(&self) -> Kernel;
    /// The grid and block it must be launched with.
    fn launch(&self) -> Launch;
    fn cost(&self) -> Cost;
}
