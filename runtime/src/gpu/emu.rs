//! [`EmuDevice`]: the [`Device`] interface over `qvc-codegen`'s PTX emulator.
//!
//! Every launch is parsed PTX run thread by thread, with the emulator's
//! checks (out-of-bounds, misalignment, uninitialised shared memory, barrier
//! divergence) turning a kernel bug into an error that names the kernel,
//! instruction and thread. Slow (about 10⁸ instructions per second), so tests
//! run the fixture model, not the full-size one. Host-side misuse (a copy
//! outside an allocation) is a [`DeviceError::BadAddress`], not a panic.

use super::device::{DevPtr, Device, DeviceError, KArg, MemInfo};
use qvc_codegen::emu::{self, Arg, Program};
use qvc_codegen::Target;
use std::collections::HashMap;

/// The PTX emulator as a device.
pub struct EmuDevice {
    mem: emu::Device,
    target: Target,
    modules: Vec<Program>,
    /// Kernel name → index of the module that defines it.
    kernels: HashMap<String, usize>,
    sizes: HashMap<DevPtr, u64>,
    used: u64,
    peak: u64,
    /// Thread-instructions executed by all launches so far.
    pub instructions: u64,
    pub launches: u64,
    /// Whether `capture_begin` may record (off by default: the executor
    /// then runs every step directly, as it does on a device without graphs).
    pub graphs: bool,
    recording: Option<Vec<Recorded>>,
    recordings: Vec<Vec<Recorded>>,
}

/// One recorded operation of a capture.
enum Recorded {
    Launch { kernel: String, grid: [u32; 3], block: [u32; 3], args: Vec<KArg> },
    Zero { dst: DevPtr, bytes: usize },
}

impl EmuDevice {
    pub fn new(target: Target) -> EmuDevice {
        EmuDevice {
            mem: emu::Device::new(),
            target,
            modules: vec![],
            kernels: HashMap::new(),
            sizes: HashMap::new(),
            used: 0,
            peak: 0,
            instructions: 0,
            launches: 0,
            graphs: false,
            recording: None,
            recordings: vec![],
        }
    }

    /// An emulator that records captures like a CUDA device (for testing
    /// the executor's graph path).
    pub fn with_graphs(target: Target) -> EmuDevice {
        EmuDevice { graphs: true, ..EmuDevice::new(target) }
    }

    /// Captures recorded so far.
    pub fn captures(&self) -> usize {
        self.recordings.len()
    }

    fn run_launch(&mut self, kernel: &str, grid: [u32; 3], block: [u32; 3], args: &[KArg]) -> Result<(), DeviceError> {
        let &m = self.kernels.get(kernel).ok_or_else(|| DeviceError::UnknownKernel { kernel: kernel.into() })?;
        let args: Vec<Arg> = args
            .iter()
            .map(|a| match *a {
                KArg::Ptr(p) => Arg::Ptr(p),
                KArg::U32(v) => Arg::U32(v),
                KArg::S32(v) => Arg::S32(v),
                KArg::U64(v) => Arg::U64(v),
                KArg::F32(v) => Arg::F32(v),
            })
            .collect();
        let stats = self.modules[m]
            .launch(kernel, grid, block, &args, &mut self.mem)
            .map_err(|e| DeviceError::Launch { kernel: kernel.into(), detail: e.to_string() })?;
        self.instructions += stats.instructions;
        self.launches += 1;
        Ok(())
    }

    fn refuse_in_capture(&self, what: &str) -> Result<(), DeviceError> {
        match self.recording {
            Some(_) => Err(DeviceError::Driver { what: what.into(), detail: "not allowed while capturing".into() }),
            None => Ok(()),
        }
    }

    fn check(&self, ptr: DevPtr, bytes: usize, what: &str) -> Result<(), DeviceError> {
        if bytes == 0 || self.mem.contains(ptr, bytes) {
            Ok(())
        } else {
            Err(DeviceError::BadAddress { ptr, bytes, what: what.into() })
        }
    }
}

impl Device for EmuDevice {
    fn name(&self) -> String {
        format!("PTX emulator ({})", self.target.name())
    }
    fn target(&self) -> Target {
        self.target
    }
    fn load_module(&mut self, ptx: &str, _cubin: Option<&[u8]>) -> Result<(), DeviceError> {
        let p =
            Program::parse(ptx).map_err(|e| DeviceError::ModuleLoad { detail: e.to_string(), log: String::new() })?;
        let idx = self.modules.len();
        for name in p.kernel_names() {
            self.kernels.entry(name.to_string()).or_insert(idx);
        }
        self.modules.push(p);
        Ok(())
    }
    fn has_kernel(&self, name: &str) -> bool {
        self.kernels.contains_key(name)
    }
    fn alloc(&mut self, bytes: usize, _what: &str) -> Result<DevPtr, DeviceError> {
        // Poisoned (NaN) contents: a value the executor forgets to write shows.
        let p = self.mem.alloc_poisoned(bytes.max(1));
        self.sizes.insert(p, bytes as u64);
        self.used += bytes as u64;
        self.peak = self.peak.max(self.used);
        Ok(p)
    }
    fn free(&mut self, ptr: DevPtr) {
        if let Some(b) = self.sizes.remove(&ptr) {
            self.used -= b;
            self.mem.free(ptr);
        }
    }
    fn upload(&mut self, dst: DevPtr, bytes: &[u8]) -> Result<(), DeviceError> {
        self.refuse_in_capture("an upload")?;
        self.check(dst, bytes.len(), "an upload")?;
        if !bytes.is_empty() {
            self.mem.write(dst, bytes);
        }
        Ok(())
    }
    fn download(&mut self, src: DevPtr, out: &mut [u8]) -> Result<(), DeviceError> {
        self.refuse_in_capture("a download")?;
        self.check(src, out.len(), "a download")?;
        if !out.is_empty() {
            out.copy_from_slice(&self.mem.download(src, out.len()));
        }
        Ok(())
    }
    fn memset_zero(&mut self, dst: DevPtr, bytes: usize) -> Result<(), DeviceError> {
        self.check(dst, bytes, "a memset")?;
        if let Some(r) = &mut self.recording {
            r.push(Recorded::Zero { dst, bytes });
            return Ok(());
        }
        if bytes > 0 {
            self.mem.write(dst, &vec![0; bytes]);
        }
        Ok(())
    }
    fn launch(&mut self, kernel: &str, grid: [u32; 3], block: [u32; 3], args: &[KArg]) -> Result<(), DeviceError> {
        if let Some(r) = &mut self.recording {
            if !self.kernels.contains_key(kernel) {
                return Err(DeviceError::UnknownKernel { kernel: kernel.into() });
            }
            r.push(Recorded::Launch { kernel: kernel.into(), grid, block, args: args.to_vec() });
            return Ok(());
        }
        self.run_launch(kernel, grid, block, args)
    }
    fn synchronize(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
    fn memory(&self) -> MemInfo {
        MemInfo { used: self.used, peak: self.peak, total: 0 }
    }
    fn capture_begin(&mut self) -> Result<bool, DeviceError> {
        if !self.graphs {
            return Ok(false);
        }
        self.refuse_in_capture("starting a capture")?;
        self.recording = Some(vec![]);
        Ok(true)
    }
    fn capture_end(&mut self) -> Result<usize, DeviceError> {
        let r = self.recording.take().ok_or_else(|| DeviceError::Driver {
            what: "ending a capture".into(),
            detail: "no capture in progress".into(),
        })?;
        self.recordings.push(r);
        Ok(self.recordings.len() - 1)
    }
    fn replay(&mut self, graph: usize) -> Result<(), DeviceError> {
        self.refuse_in_capture("a replay")?;
        let rec = std::mem::take(self.recordings.get_mut(graph).ok_or_else(|| DeviceError::Driver {
            what: "replaying a capture".into(),
            detail: format!("no capture {graph}"),
        })?);
        let mut result = Ok(());
        for op in &rec {
            result = match op {
                Recorded::Launch { kernel, grid, block, args } => self.run_launch(kernel, *grid, *block, args),
                Recorded::Zero { dst, bytes } => {
                    self.mem.write(*dst, &vec![0; *bytes]);
                    Ok(())
                }
            };
            if result.is_err() {
                break;
            }
        }
        self.recordings[graph] = rec;
        result
    }
}
