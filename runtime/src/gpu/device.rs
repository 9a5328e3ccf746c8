//! The one interface the GPU executor drives: memory, modules, launches.
//!
//! Two implementations: [`super::EmuDevice`] runs PTX in `qvc-codegen`'s
//! emulator (tests, machines without a GPU) and [`super::CudaDevice`] drives a
//! real GPU through cudarc. The executor never knows which one it has, so the
//! emulator exercises exactly the code path the GPU runs.

use std::fmt;

/// A device address in bytes. `0` is never a valid allocation.
pub type DevPtr = u64;

/// One kernel argument, in the order the kernel declares its params.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KArg {
    /// A device pointer (a `.u64` param).
    Ptr(DevPtr),
    U32(u32),
    S32(i32),
    U64(u64),
    F32(f32),
}

/// Device memory in use, as this process's allocations see it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemInfo {
    /// Bytes currently allocated through this device.
    pub used: u64,
    /// The most bytes ever allocated at once.
    pub peak: u64,
    /// Total device memory (0 when unknown, e.g. the emulator).
    pub total: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("out of device memory: {what} needs {bytes} bytes ({used} in use of {total})")]
    OutOfMemory { what: String, bytes: u64, used: u64, total: u64 },
    #[error("kernel {kernel} is not loaded (load its module first)")]
    UnknownKernel { kernel: String },
    #[error("loading the kernel module failed: {detail}\n{log}")]
    ModuleLoad { detail: String, log: String },
    #[error("launching {kernel} failed: {detail}")]
    Launch { kernel: String, detail: String },
    #[error("{what} failed: {detail}")]
    Driver { what: String, detail: String },
    #[error("bad device address {ptr:#x} (+{bytes} bytes) in {what}")]
    BadAddress { ptr: DevPtr, bytes: usize, what: String },
}

/// A GPU, real or emulated. All calls are in stream order: a download sees
/// every launch issued before it.
pub trait Device: Send {
    /// A short human name ("NVIDIA H100 80GB HBM3", "PTX emulator").
    fn name(&self) -> String;
    /// The PTX target this device runs (`sm_80`, `sm_90`).
    fn target(&self) -> qvc_codegen::Target;
    /// Load a module: PTX text, with the cubin assembled from it when one
    /// matches this device (the driver then skips its JIT). Kernels of every
    /// loaded module stay callable by name; loading a name twice keeps the first.
    fn load_module(&mut self, ptx: &str, cubin: Option<&[u8]>) -> Result<(), DeviceError>;
    /// Whether a kernel of this name is loaded.
    fn has_kernel(&self, name: &str) -> bool;
    /// Allocate `bytes` (256-byte aligned, contents undefined).
    fn alloc(&mut self, bytes: usize, what: &str) -> Result<DevPtr, DeviceError>;
    fn free(&mut self, ptr: DevPtr);
    fn upload(&mut self, dst: DevPtr, bytes: &[u8]) -> Result<(), DeviceError>;
    fn download(&mut self, src: DevPtr, out: &mut [u8]) -> Result<(), DeviceError>;
    fn memset_zero(&mut self, dst: DevPtr, bytes: usize) -> Result<(), DeviceError>;
    /// Launch `kernel` (asynchronously on a real GPU).
    fn launch(&mut self, kernel: &str, grid: [u32; 3], block: [u32; 3], args: &[KArg]) -> Result<(), DeviceError>;
    /// Wait for everything issued so far; reports asynchronous launch errors.
    fn synchronize(&mut self) -> Result<(), DeviceError>;
    fn memory(&self) -> MemInfo;

    /// Launch and wait for it: the kernel's time in milliseconds (device
    /// time on a GPU; on the emulator, the emulation's wall time). For
    /// profiles, not for runs: it serialises the stream.
    fn launch_timed(
        &mut self,
        kernel: &str,
        grid: [u32; 3],
        block: [u32; 3],
        args: &[KArg],
    ) -> Result<f64, DeviceError> {
        let t0 = std::time::Instant::now();
        self.launch(kernel, grid, block, args)?;
        self.synchronize()?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    }

    /// Start recording launches and memsets instead of running them (a CUDA
    /// graph). `Ok(false)`: this device cannot, and nothing changed.
    fn capture_begin(&mut self) -> Result<bool, DeviceError> {
        Ok(false)
    }
    /// Stop recording; the recording's id for [`Device::replay`]. Pointers
    /// and arguments are frozen at capture time.
    fn capture_end(&mut self) -> Result<usize, DeviceError> {
        Err(DeviceError::Driver { what: "ending a capture".into(), detail: "this device does not capture".into() })
    }
    /// Run a recording again.
    fn replay(&mut self, _graph: usize) -> Result<(), DeviceError> {
        Err(DeviceError::Driver { what: "replaying a capture".into(), detail: "this device does not capture".into() })
    }
}

impl fmt::Debug for dyn Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Device({})", self.name())
    }
}
