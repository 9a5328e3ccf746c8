//! `qvc selftest` (hidden): the flags; [`crate::selftest`] checks each GPU
//! kernel family against its CPU reference.

use crate::device::DeviceChoice;
use anyhow::{bail, Result};
use clap::Args;

#[derive(Args)]
pub struct SelftestArgs {
    /// `emu` (the PTX emulator), `cuda` or `cuda:N`.
    #[arg(long, default_value = "emu", value_name = "DEVICE")]
    device: String,
    /// Random cases per family.
    #[arg(long, default_value_t = 4, value_name = "N")]
    cases: usize,
    /// Small shapes only (quick on the emulator).
    #[arg(long)]
    small: bool,
    /// Seed of the random shapes and data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub fn run(a: SelftestArgs) -> Result<()> {
    use qvc_runtime::gpu::{CudaDevice, Device, EmuDevice};
    let mut dev: Box<dyn Device> = match DeviceChoice::parse(&a.device)? {
        DeviceChoice::Emu => Box::new(EmuDevice::new(qvc_codegen::Target::Sm80)),
        DeviceChoice::Cuda(n) => Box::new(CudaDevice::open(n)?),
        DeviceChoice::Cpu | DeviceChoice::Auto => {
            bail!("qvc selftest checks the GPU kernels: give --device emu, cuda or cuda:N")
        }
    };
    let name = dev.name();
    let results = crate::selftest::run(dev.as_mut(), a.cases.max(1), a.small, a.seed);
    if !crate::selftest::print(&name, &results) {
        bail!("some kernel families failed");
    }
    Ok(())
}
