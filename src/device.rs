//! Where a model runs: the `--device` choice and the backend it makes (the
//! CPU, or a GPU executor on CUDA or the PTX emulator). Below every command
//! module; it imports only the workspace crates and [`crate::compile`].

use anyhow::{bail, Result};
use qvc_model::Model;
use qvc_runtime::Cpu;

/// `--device` value parser: the text as given, once [`DeviceChoice::parse`] accepts it.
pub fn parse_device(s: &str) -> Result<String, String> {
    DeviceChoice::parse(s).map(|_| s.to_string()).map_err(|e| e.to_string())
}

/// A progress bar on stderr while weights upload to the device (hidden when
/// stderr is not a terminal; finished when a batch of uploads completes).
fn with_upload_bar(mut b: qvc_runtime::gpu::GpuBackend) -> qvc_runtime::gpu::GpuBackend {
    let bar = std::sync::Mutex::new(None::<indicatif::ProgressBar>);
    b.set_progress(Box::new(move |done, total| {
        let Ok(mut bar) = bar.lock() else { return };
        let pb = bar.get_or_insert_with(|| {
            let pb = indicatif::ProgressBar::new(total);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "uploading weights {bar:30} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} [{elapsed}]",
                )
                .expect("valid template"),
            );
            pb
        });
        pb.set_length(total);
        pb.set_position(done);
        if done >= total {
            pb.finish_and_clear();
            *bar = None;
        }
    }));
    b
}

pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
    Emu,
    Auto,
}

impl DeviceChoice {
    pub fn parse(s: &str) -> Result<DeviceChoice> {
        let s = s.trim().to_ascii_lowercase();
        Ok(match s.as_str() {
            "cpu" => DeviceChoice::Cpu,
            "emu" | "emulator" => DeviceChoice::Emu,
            "auto" => DeviceChoice::Auto,
            "cuda" | "gpu" => DeviceChoice::Cuda(0),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => DeviceChoice::Cuda(n),
                _ => bail!("{s:?} is not a device: expected cpu, cuda, cuda:N (e.g. cuda:1), emu or auto"),
            },
        })
    }
}

/// KV-cache rows a GPU backend gets for a checkpoint (an artifact has its own `--max-seq`).
pub const GPU_CHECKPOINT_MAX_SEQ: usize = 2048;

/// The backend `--device` asks for: the CPU, or a GPU executor (CUDA or the
/// emulator) with a device KV cache for `slots` sequences.
pub fn make_backend(model: &Model, device: &str, slots: usize) -> Result<Box<dyn qvc_runtime::Backend>> {
    use qvc_runtime::gpu::{CudaDevice, EmuDevice};
    let choice = DeviceChoice::parse(device)?;
    let gpu_artifact = model.compiled().is_none_or(|m| m.options.target != "cpu");
    let max_seq = model.compiled().map_or(GPU_CHECKPOINT_MAX_SEQ, |m| m.options.max_seq);
    let choice = match choice {
        DeviceChoice::Auto => match qvc_runtime::cuda::gpus() {
            Ok(g) if g.first().and_then(|g| g.target()).is_some() => {
                if model.compiled().is_some() && gpu_artifact {
                    DeviceChoice::Cuda(0)
                } else {
                    // A checkpoint builds its graphs per step; an artifact
                    // compiled for the GPU is what runs fast there.
                    let what = if model.compiled().is_some() {
                        "this artifact was compiled for the CPU"
                    } else {
                        "this is a checkpoint"
                    };
                    eprintln!(
                        "[qvc] running on the CPU although a GPU is present ({what}): `qvc compile MODEL -o model.qvc` \
                         compiles it for the GPU, or pass --device cuda to run it there as is"
                    );
                    DeviceChoice::Cpu
                }
            }
            _ => DeviceChoice::Cpu,
        },
        c => c,
    };
    Ok(match choice {
        DeviceChoice::Cpu | DeviceChoice::Auto => Box::new(Cpu),
        DeviceChoice::Emu => {
            let target = model
                .compiled()
                .and_then(|m| crate::compile::Target::parse(&m.options.target))
                .and_then(|t| match t {
                    crate::compile::Target::Gpu(t) => Some(t),
                    crate::compile::Target::Cpu => None,
                })
                .unwrap_or(qvc_codegen::Target::Sm80);
            eprintln!("[qvc] running on the PTX emulator ({}): slow, for checking the GPU path", target.name());
            Box::new(with_upload_bar(model.gpu_backend(Box::new(EmuDevice::new(target)), slots, max_seq)?))
        }
        DeviceChoice::Cuda(n) => {
            let dev = CudaDevice::open(n)?;
            eprintln!("[qvc] running on GPU {n}: {}", qvc_runtime::gpu::Device::name(&dev));
            Box::new(with_upload_bar(model.gpu_backend(Box::new(dev), slots, max_seq)?))
        }
    })
}
