//! NVIDIA GPUs, found through the CUDA driver that cudarc loads at run time.
//!
//! The binary links no CUDA library: `libcuda` is opened on first use, so qvc
//! builds and starts on machines without CUDA. cudarc panics when asked for a
//! driver that is not there, so every entry point checks for the library
//! first and turns its absence into [`CudaError::NoDriver`].
//!
//! Today this module discovers GPUs (for `qvc devices` and for choosing
//! `qvc compile`'s default target); [`crate::gpu::CudaDevice`] builds on it.

use std::sync::Arc;

use cudarc::driver::{sys, CudaContext};
use qvc_codegen::Target;

/// One GPU as the driver describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor): (9, 0) is an H100.
    pub compute: (u32, u32),
    pub memory_bytes: u64,
    pub multiprocessors: u32,
}

impl GpuInfo {
    /// The PTX target qvc generates for this GPU, if it supports one:
    /// sm_90 for Hopper and newer, sm_80 for Ampere and Ada.
    pub fn target(&self) -> Option<Target> {
        match self.compute {
            (m, _) if m >= 9 => Some(Target::Sm90),
            (8, _) => Some(Target::Sm80),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error(
        "no NVIDIA driver found (libcuda could not be loaded): install the NVIDIA driver to use a GPU, or run on the CPU"
    )]
    NoDriver,
    #[error("the CUDA driver failed while {what}: {detail}")]
    Driver { what: String, detail: String },
}

fn driver(what: &str) -> impl Fn(cudarc::driver::DriverError) -> CudaError + '_ {
    move |e| CudaError::Driver { what: what.to_string(), detail: e.to_string() }
}

/// Whether the CUDA driver library can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the shared library; no driver call is made.
    unsafe { sys::is_culib_present() }
}

/// Every GPU the driver sees, in ordinal order (empty when the driver is
/// present but no device is). `NoDriver` when there is no driver at all.
pub fn gpus() -> Result<Vec<GpuInfo>, CudaError> {
    if !driver_present() {
        return Err(CudaError::NoDriver);
    }
    let n = CudaContext::device_count().map_err(driver("counting devices"))?;
    (0..n.max(0) as usize).map(gpu).collect()
}

fn gpu(ordinal: usize) -> Result<GpuInfo, CudaError> {
    let ctx: Arc<CudaContext> = CudaContext::new(ordinal).map_err(driver("opening a device"))?;
    let (major, minor) = ctx.compute_capability().map_err(driver("reading the compute capability"))?;
    let sms = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(driver("reading the multiprocessor count"))?;
    Ok(GpuInfo {
        ordinal,
        name: ctx.name().map_err(driver("reading the device name"))?,
        compute: (major as u32, minor as u32),
        memory_bytes: ctx.total_mem().map_err(driver("reading the memory size"))? as u64,
        multiprocessors: sms as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a driver the answer is an error that says so (never a panic
    /// inside cudarc); with one, every GPU it lists has a name and memory.
    #[test]
    fn gpus_or_a_clear_no_driver_error() {
        match gpus() {
            Err(CudaError::NoDriver) => {
                assert!(!driver_present());
                assert!(CudaError::NoDriver.to_string().contains("no NVIDIA driver found"));
            }
            Err(e) => panic!("driver present but failing: {e}"),
            Ok(list) => {
                assert!(driver_present());
                for g in list {
                    assert!(!g.name.is_empty() && g.memory_bytes > 0 && g.multiprocessors > 0, "{g:?}");
                }
            }
        }
    }

    #[test]
    fn compute_capability_picks_the_ptx_target() {
        let gpu = |compute| GpuInfo { ordinal: 0, name: "x".into(), compute, memory_bytes: 1, multiprocessors: 1 };
        assert_eq!(gpu((9, 0)).target(), Some(Target::Sm90));
        assert_eq!(gpu((10, 0)).target(), Some(Target::Sm90));
        assert_eq!(gpu((8, 9)).target(), Some(Target::Sm80));
        assert_eq!(gpu((8, 0)).target(), Some(Target::Sm80));
        assert_eq!(gpu((7, 5)).target(), None);
    }
}
