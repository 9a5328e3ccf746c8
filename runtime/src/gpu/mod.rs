//! Running compiled programs on a GPU: the device interface, its two
//! implementations (the PTX emulator and CUDA), the lowering of an IR graph
//! onto kernel launches, and the executor that runs them.

pub mod cuda;
pub mod device;
pub mod emu;
pub mod exec;
pub mod lower;

pub use crate::KernelTime;
pub use cuda::CudaDevice;
pub use device::{DevPtr, Device, DeviceError, KArg, MemInfo};
pub use emu::EmuDevice;
pub use exec::{ExecStats, GpuBackend};
