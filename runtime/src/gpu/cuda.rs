//! [`CudaDevice`]: the [`Device`] interface on a real NVIDIA GPU, driven
//! through cudarc's driver bindings (libcuda is opened at run time).
//!
//! One context (the device's primary context) and one non-blocking stream
//! per device; every operation is issued on that stream, so the trait's
//! promise "all calls are in stream order" holds without host waits except
//! where a call must see finished work (`download`, `synchronize`).
//!
//! Invariants:
//! * Nothing reaches cudarc before [`crate::cuda::driver_present`] says
//!   libcuda loads (cudarc panics otherwise): [`CudaDevice::open`] is the
//!   only constructor and checks it first.
//! * Every device address handed to the driver by `upload`, `download`,
//!   `memset_zero`, `copy_d2d` and every pointer kernel argument lies inside
//!   (or, for kernel pointers, one past) an allocation of this device, the
//!   same checks the emulator makes, so host-side misuse is a
//!   [`DeviceError::BadAddress`] or [`DeviceError::Launch`], never a driver
//!   write to a wild address.
//! * Kernel arguments are checked against the params declared in the PTX
//!   (count and type) before `cuLaunchKernel`, which trusts its caller and
//!   would otherwise read past the argument array.
//! * The caller's host slices are never referenced after a call returns:
//!   large uploads are copied into pinned staging buffers first, small ones
//!   use `cuMemcpyHtoDAsync` from pageable memory, which the driver
//!   documents as consuming the source before it returns.
//! * While a graph is being captured, nothing that would break the capture
//!   or be silently left out of it runs: allocation, host copies and
//!   synchronisation are errors, and frees are deferred to `end_capture`.
//! * `Drop` frees everything this device created: allocations, pinned
//!   buffers, events, modules, the stream, and its hold on the context.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaStream, DriverError};
use qvc_codegen::Target;
use rayon::prelude::*;

use super::device::{DevPtr, Device, DeviceError, KArg, MemInfo};
use crate::cuda::{driver_present, CudaError, GpuInfo};

/// Size of each of the two pinned staging buffers that large uploads go
/// through: big enough that the per-copy overhead is negligible at PCIe
/// speeds, small enough to pin without pressure on host memory.
pub const STAGING_CHUNK: usize = 32 << 20;

/// Uploads shorter than this skip the staging buffers: the driver's own
/// pageable path is as fast for them, and it never waits for earlier work.
pub const SMALL_UPLOAD: usize = 1 << 20;

/// Bytes of the JIT's error and info logs kept on a failed PTX load.
const JIT_LOG_BYTES: usize = 64 << 10;

/// Distinguishes devices so a graph captured on one is never replayed on another.
static NEXT_DEVICE_ID: AtomicU64 = AtomicU64::new(1);

/// The type of one kernel param, as declared in the PTX.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ParamTy {
    /// `.u64`, `.b64`, `.s64`: a pointer or a 64-bit integer.
    Bits64,
    /// `.u32`, `.b32`.
    U32,
    S32,
    F32,
    /// Anything else (arrays, `.align`, other widths): qvc's kernels declare
    /// none, and a launch of a kernel with one is refused.
    Other(String),
}

impl ParamTy {
    fn parse(decl: &str) -> ParamTy {
        // `.param .u64 p_x` (possibly with `.align N` or `.ptr` qualifiers).
        let tys: Vec<&str> = decl.split_whitespace().filter(|w| w.starts_with('.') && *w != ".param").collect();
        match tys.as_slice() {
            [".u64" | ".b64" | ".s64"] => ParamTy::Bits64,
            [".u32" | ".b32"] => ParamTy::U32,
            [".s32"] => ParamTy::S32,
            [".f32"] => ParamTy::F32,
            _ => ParamTy::Other(decl.trim().to_string()),
        }
    }

    fn accepts(&self, a: &KArg) -> bool {
        matches!(
            (self, a),
            (ParamTy::Bits64, KArg::Ptr(_) | KArg::U64(_))
                | (ParamTy::U32, KArg::U32(_))
                | (ParamTy::S32, KArg::S32(_))
                | (ParamTy::F32, KArg::F32(_))
        )
    }
}

/// An `.entry` of a PTX module: name and param types, in declaration order.
#[derive(Clone, Debug, PartialEq, Eq)]
struct EntryDecl {
    name: String,
    params: Vec<(String, ParamTy)>,
}

/// Finds every `.entry` in PTX text (`[.visible] .entry NAME(params)`),
/// skipping `//` comment lines. The driver resolves the functions; this
/// only needs the names and the param lists.
fn parse_entries(ptx: &str) -> Result<Vec<EntryDecl>, String> {
    let mut out = vec![];
    let mut pos = 0;
    for line in ptx.split_inclusive('\n') {
        let start = pos;
        pos += line.len();
        let t = line.trim_start();
        if t.starts_with("//") {
            continue;
        }
        let t = t.strip_prefix(".visible").map(str::trim_start).unwrap_or(t);
        let Some(after) = t.strip_prefix(".entry") else { continue };
        if !after.starts_with(char::is_whitespace) {
            continue;
        }
        let decl = &ptx[start + (line.len() - after.len())..];
        let open = decl.find('(').ok_or_else(|| format!("malformed .entry (no param list): {}", line.trim()))?;
        let name = decl[..open].trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(format!("malformed .entry name: {}", line.trim()));
        }
        let close = decl[open..].find(')').ok_or_else(|| format!("unterminated param list of .entry {name}"))? + open;
        let list = decl[open + 1..close].trim();
        let mut params = vec![];
        if !list.is_empty() {
            for p in list.split(',') {
                let pname = p.split_whitespace().last().unwrap_or("").to_string();
                params.push((pname, ParamTy::parse(p)));
            }
        }
        out.push(EntryDecl { name: name.to_string(), params });
    }
    Ok(out)
}

/// `CUDA_ERROR_X: message`, readable in an error chain (cudarc's Display
/// is its Debug form).
fn describe(e: DriverError) -> String {
    let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
    match e.error_string() {
        Ok(s) => format!("{name}: {}", s.to_string_lossy()),
        Err(_) => name,
    }
}

fn driver_err(what: impl Into<String>) -> impl FnOnce(DriverError) -> DeviceError {
    let what = what.into();
    move |e| DeviceError::Driver { what, detail: describe(e) }
}

/// A NUL-terminated string the JIT wrote into `buf`.
fn log_text(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).trim_end().to_string()
}

/// Whether `image` is an ELF64 file whose headers all lie inside it, so the
/// driver's loader (which takes no length) reads only these bytes.
fn plausible_cubin(image: &[u8]) -> bool {
    let u16_at = |o: usize| image.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u64);
    let u64_at = |o: usize| image.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    // Magic, 64-bit class, little-endian.
    if image.len() < 64 || image[..4] != *b"\x7fELF" || image[4] != 2 || image[5] != 1 {
        return false;
    }
    let fits = |off: Option<u64>, size: Option<u64>, n: Option<u64>| match (off, size, n) {
        (Some(o), Some(s), Some(n)) => {
            s.checked_mul(n).and_then(|b| b.checked_add(o)).is_some_and(|end| end <= image.len() as u64)
        }
        _ => false,
    };
    // Program headers (e_phoff, e_phentsize, e_phnum) and section headers
    // (e_shoff, e_shentsize, e_shnum).
    fits(u64_at(0x20), u16_at(0x36), u16_at(0x38)) && fits(u64_at(0x28), u16_at(0x3a), u16_at(0x3c))
}

/// A loaded kernel.
struct Kernel {
    func: sys::CUfunction,
    params: Vec<(String, ParamTy)>,
}

/// One pinned host buffer of the upload staging pair, and the event
/// recorded after the last copy out of it.
struct Staging {
    host: *mut u8,
    done: CudaEvent,
}

/// One argument's value, laid out as `cuLaunchKernel` reads it: the param's
/// size in bytes from this address (8-aligned so any width reads aligned).
#[repr(C, align(8))]
struct ArgSlot([u8; 8]);

impl ArgSlot {
    fn new(a: &KArg) -> ArgSlot {
        let mut s = [0u8; 8];
        match *a {
            KArg::Ptr(v) | KArg::U64(v) => s.copy_from_slice(&v.to_ne_bytes()),
            KArg::U32(v) => s[..4].copy_from_slice(&v.to_ne_bytes()),
            KArg::S32(v) => s[..4].copy_from_slice(&v.to_ne_bytes()),
            KArg::F32(v) => s[..4].copy_from_slice(&v.to_ne_bytes()),
        }
        ArgSlot(s)
    }
}

/// An allocation: `size` is what bounds checks use (at least 1, as the
/// driver allocates), `counted` what the caller asked for (memory accounting).
#[derive(Clone, Copy)]
struct Alloc {
    size: u64,
    counted: u64,
}

/// An NVIDIA GPU as a [`Device`].
pub struct CudaDevice {
    id: u64,
    info: GpuInfo,
    target: Target,
    /// Total device memory (from `cuMemGetInfo` at open).
    total: u64,
    /// Stream-ordered allocation (`cuMemAllocAsync`) when the device has
    /// memory pools: frees then wait for the work queued before them.
    async_alloc: bool,
    allocs: BTreeMap<DevPtr, Alloc>,
    used: u64,
    peak: u64,
    modules: Vec<sys::CUmodule>,
    kernels: HashMap<String, Kernel>,
    /// Lazily created pinned staging pair; `Err` remembers why pinning
    /// failed (uploads then use the pageable path).
    staging: Option<Result<[Staging; 2], String>>,
    capturing: bool,
    /// Frees asked for during a capture, done when it ends.
    deferred_frees: Vec<DevPtr>,
    /// The first error of a call that cannot return one (`free`), reported
    /// by the next `synchronize`.
    pending_error: Option<DeviceError>,
    cubins_loaded: usize,
    ptx_jitted: usize,
    /// Graphs captured through the `Device` trait, by id.
    graphs: Vec<Option<CapturedGraph>>,
    // Declared last: dropped after `Drop::drop` freed what lives in them.
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

// SAFETY: the raw handles held here (modules, functions, pinned host
// pointers) are plain driver handles owned by this device alone, never
// shared with another value. The CUDA driver API is thread-safe, and a
// context may be used from any thread once it is made current there: every
// method that calls the driver first calls `ctx.bind_to_thread()`, so moving
// the device to another thread is sound. `&mut self` on every driver-using
// method rules out concurrent use, so no `Sync` is claimed.
unsafe impl Send for CudaDevice {}

/// A CUDA graph captured from this device's stream (see
/// [`CudaDevice::begin_capture`]), instantiated and ready to replay.
///
/// Everything in it is frozen at capture time: the kernels, their grids,
/// their argument values (device pointers included) and the sizes and
/// addresses of memsets and copies. A replay re-runs exactly that, so the
/// buffers it touches must stay allocated while the graph lives, and inputs
/// that change between replays must be written into the same buffers.
pub struct CapturedGraph {
    owner: u64,
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    ctx: Arc<CudaContext>,
    /// Nodes (launches, memsets, copies) recorded into it.
    pub nodes: usize,
}

// SAFETY: a graph and its executable are driver handles owned by this value
// alone; CUDA forbids concurrent use of one graph, which `&` access from a
// single owner at a time (no `Sync`) guarantees, and the context is bound
// before each use (replay binds in `CudaDevice`, drop binds here).
unsafe impl Send for CapturedGraph {}

impl Drop for CapturedGraph {
    fn drop(&mut self) {
        // Errors cannot be reported from drop; the handles are gone either way.
        let _ = self.ctx.bind_to_thread();
        // SAFETY: both handles were created by `end_capture` and are destroyed only here.
        unsafe {
            let _ = result::graph::exec_destroy(self.exec);
            let _ = result::graph::destroy(self.graph);
        }
    }
}

impl CudaDevice {
    /// Opens GPU `ordinal`: its primary context and one stream. Errors when
    /// there is no driver ("no NVIDIA driver found"), no such GPU (naming how
    /// many there are) or a GPU older than compute capability 8.0.
    pub fn open(ordinal: usize) -> Result<CudaDevice, DeviceError> {
        let what = format!("opening CUDA device {ordinal}");
        if !driver_present() {
            return Err(DeviceError::Driver { what, detail: CudaError::NoDriver.to_string() });
        }
        let count = match CudaContext::device_count() {
            Ok(n) => n.max(0) as usize,
            Err(DriverError(sys::CUresult::CUDA_ERROR_NO_DEVICE)) => 0,
            Err(e) => return Err(driver_err(format!("{what} (counting GPUs)"))(e)),
        };
        if ordinal >= count {
            let detail = match count {
                0 => "the NVIDIA driver sees no GPU (0 devices)".to_string(),
                1 => "there is 1 GPU (ordinal 0)".to_string(),
                n => format!("there are {n} GPUs (ordinals 0..={})", n - 1),
            };
            return Err(DeviceError::Driver { what, detail });
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_err(what.clone()))?;
        let (major, minor) = ctx.compute_capability().map_err(driver_err(what.clone()))?;
        let name = ctx.name().map_err(driver_err(what.clone()))?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver_err(what.clone()))?;
        let (_, total) = ctx.mem_get_info().map_err(driver_err(what.clone()))?;
        let info = GpuInfo {
            ordinal,
            name,
            compute: (major.max(0) as u32, minor.max(0) as u32),
            memory_bytes: total as u64,
            multiprocessors: sms.max(0) as u32,
        };
        let target = info.target().ok_or_else(|| DeviceError::Driver {
            what: what.clone(),
            detail: format!(
                "{} has compute capability {major}.{minor}; qvc needs compute capability 8.0 or newer",
                info.name
            ),
        })?;
        let stream = ctx.new_stream().map_err(driver_err(format!("{what} (creating a stream)")))?;
        Ok(CudaDevice {
            id: NEXT_DEVICE_ID.fetch_add(1, Ordering::Relaxed),
            info,
            target,
            total: total as u64,
            async_alloc: ctx.has_async_alloc(),
            allocs: BTreeMap::new(),
            used: 0,
            peak: 0,
            modules: vec![],
            kernels: HashMap::new(),
            staging: None,
            capturing: false,
            deferred_frees: vec![],
            pending_error: None,
            cubins_loaded: 0,
            ptx_jitted: 0,
            graphs: vec![],
            stream,
            ctx,
        })
    }

    /// The GPU as the driver describes it.
    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// Modules loaded from a caller's cubin (no JIT).
    pub fn cubins_loaded(&self) -> usize {
        self.cubins_loaded
    }

    /// Modules compiled from PTX by the driver's JIT (no cubin given, or the
    /// cubin was rejected).
    pub fn ptx_jitted(&self) -> usize {
        self.ptx_jitted
    }

    fn bind(&self) -> Result<(), DeviceError> {
        self.ctx.bind_to_thread().map_err(driver_err("making the CUDA context current"))
    }

    /// Whether `bytes` is more than the device has free right now.
    fn exceeds_free(&self, bytes: usize) -> bool {
        result::mem_get_info().is_ok_and(|(free, _)| bytes > free)
    }

    fn not_capturing(&self, what: &str) -> Result<(), DeviceError> {
        if self.capturing {
            Err(DeviceError::Driver {
                what: what.into(),
                detail: "not allowed while a CUDA graph is being captured (end the capture first)".into(),
            })
        } else {
            Ok(())
        }
    }

    /// The allocation holding `[ptr, ptr + bytes)`, as the emulator checks it.
    fn check(&self, ptr: DevPtr, bytes: usize, what: &str) -> Result<(), DeviceError> {
        if bytes == 0 {
            return Ok(());
        }
        let inside = self
            .allocs
            .range(..=ptr)
            .next_back()
            .is_some_and(|(&base, a)| (ptr - base).checked_add(bytes as u64).is_some_and(|end| end <= a.size));
        if inside {
            Ok(())
        } else {
            Err(DeviceError::BadAddress { ptr, bytes, what: what.into() })
        }
    }

    /// Whether `ptr` points into, or one past the end of, an allocation.
    fn valid_ptr(&self, ptr: DevPtr) -> bool {
        self.allocs.range(..=ptr).next_back().is_some_and(|(&base, a)| ptr - base <= a.size)
    }

    /// Loads one image: the cubin when given and accepted, else the PTX
    /// through the JIT with its logs captured.
    fn load_image(&mut self, ptx: &str, cubin: Option<&[u8]>) -> Result<sys::CUmodule, DeviceError> {
        let mut cubin_note = String::new();
        if let Some(image) = cubin {
            if plausible_cubin(image) {
                // The loader reads ELF structures in place: give it 8-aligned bytes.
                let mut aligned = vec![0u64; image.len().div_ceil(8)];
                bytemuck::cast_slice_mut::<u64, u8>(&mut aligned)[..image.len()].copy_from_slice(image);
                // SAFETY: a complete ELF image (headers checked inside it) that outlives the call.
                match unsafe { result::module::load_data(aligned.as_ptr() as *const c_void) } {
                    Ok(m) => {
                        self.cubins_loaded += 1;
                        return Ok(m);
                    }
                    Err(e) => cubin_note = format!(" (the cubin was rejected first: {})", describe(e)),
                }
            } else {
                cubin_note = " (the cubin is not a well-formed ELF image and was skipped)".into();
            }
        }
        let text = CString::new(ptx).map_err(|_| DeviceError::ModuleLoad {
            detail: "the PTX text contains a NUL byte".into(),
            log: String::new(),
        })?;
        let mut error_log = vec![0u8; JIT_LOG_BYTES];
        let mut info_log = vec![0u8; JIT_LOG_BYTES];
        let mut options = [
            sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
            sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
            sys::CUjit_option::CU_JIT_INFO_LOG_BUFFER,
            sys::CUjit_option::CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES,
        ];
        // Size options travel as integers in the pointer slots (the driver's convention).
        let mut values: [*mut c_void; 4] = [
            error_log.as_mut_ptr() as *mut c_void,
            JIT_LOG_BYTES as *mut c_void,
            info_log.as_mut_ptr() as *mut c_void,
            JIT_LOG_BYTES as *mut c_void,
        ];
        let mut module: sys::CUmodule = std::ptr::null_mut();
        // SAFETY: `text` is NUL-terminated; the option arrays have equal
        // length and the log buffers are as large as the sizes given, and all
        // outlive the call.
        let r = unsafe {
            sys::cuModuleLoadDataEx(
                &mut module,
                text.as_ptr() as *const c_void,
                options.len() as u32,
                options.as_mut_ptr(),
                values.as_mut_ptr(),
            )
        }
        .result();
        match r {
            Ok(()) => {
                self.ptx_jitted += 1;
                Ok(module)
            }
            Err(e) => {
                let mut log = log_text(&error_log);
                let info = log_text(&info_log);
                if !info.is_empty() {
                    log = if log.is_empty() { info } else { format!("{log}\n{info}") };
                }
                Err(DeviceError::ModuleLoad {
                    detail: format!("the driver's PTX JIT: {}{cubin_note}", describe(e)),
                    log,
                })
            }
        }
    }

    fn ensure_staging(&mut self) -> Result<(), String> {
        if self.staging.is_none() {
            let make = |ctx: &Arc<CudaContext>| -> Result<Staging, String> {
                let done = ctx.new_event(None).map_err(describe)?;
                // SAFETY: plain pinned allocation, freed in `Drop`.
                let host = unsafe { result::malloc_host(STAGING_CHUNK, 0) }.map_err(describe)? as *mut u8;
                Ok(Staging { host, done })
            };
            let first = make(&self.ctx);
            let pair = match (first, make(&self.ctx)) {
                (Ok(a), Ok(b)) => Ok([a, b]),
                (a, b) => {
                    let mut why = String::new();
                    for s in [a, b] {
                        match s {
                            // SAFETY: allocated just above and not used yet.
                            Ok(s) => unsafe {
                                let _ = result::free_host(s.host as *mut c_void);
                            },
                            Err(e) => why = e,
                        }
                    }
                    Err(why)
                }
            };
            self.staging = Some(pair);
        }
        match &self.staging {
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(e.clone()),
            None => Err("staging buffers were not created".into()),
        }
    }

    fn upload_pageable(&self, dst: DevPtr, bytes: &[u8]) -> Result<(), DeviceError> {
        // SAFETY: `[dst, dst + len)` was checked to be inside an allocation;
        // from pageable memory the driver copies the source out before returning.
        unsafe { result::memcpy_htod_async(dst, bytes, self.stream.cu_stream()) }.map_err(driver_err("an upload"))
    }

    fn free_now(&mut self, ptr: DevPtr) {
        // SAFETY: `ptr` came from this device's allocator and is freed once
        // (it left `allocs` before reaching here). The async free is ordered
        // after the work already queued on the stream that may still use it.
        let r = if self.async_alloc {
            unsafe { result::free_async(ptr, self.stream.cu_stream()) }
        } else {
            unsafe { result::free_sync(ptr) }
        };
        if let Err(e) = r {
            self.pending_error
                .get_or_insert(DeviceError::Driver { what: format!("freeing {ptr:#x}"), detail: describe(e) });
        }
    }

    /// Starts recording this device's stream into a CUDA graph: launches,
    /// memsets and device copies issued until [`CudaDevice::end_capture`]
    /// are recorded, not run. Allocation, uploads, downloads and
    /// synchronisation are errors until then; frees are deferred to it.
    pub fn begin_capture(&mut self) -> Result<(), DeviceError> {
        self.not_capturing("beginning a capture")?;
        self.bind()?;
        // SAFETY: the stream is this device's own and alive.
        unsafe {
            result::stream::begin_capture(
                self.stream.cu_stream(),
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(driver_err("beginning a CUDA graph capture"))?;
        self.capturing = true;
        Ok(())
    }

    /// Ends the capture and instantiates the graph. Pointers and kernel
    /// arguments are frozen at capture time (see [`CapturedGraph`]).
    pub fn end_capture(&mut self) -> Result<CapturedGraph, DeviceError> {
        if !self.capturing {
            return Err(DeviceError::Driver {
                what: "ending a CUDA graph capture".into(),
                detail: "no capture is in progress".into(),
            });
        }
        self.bind()?;
        // SAFETY: the stream is capturing (begun by `begin_capture`).
        let ended = unsafe { result::stream::end_capture(self.stream.cu_stream()) };
        self.capturing = false;
        for p in std::mem::take(&mut self.deferred_frees) {
            self.free_now(p);
        }
        let graph = ended.map_err(driver_err("ending a CUDA graph capture"))?;
        if graph.is_null() {
            return Err(DeviceError::Driver {
                what: "ending a CUDA graph capture".into(),
                detail: "the driver returned no graph".into(),
            });
        }
        let mut nodes = 0usize;
        // SAFETY: `graph` is valid; a null node array asks for the count only.
        let _ = unsafe { sys::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut nodes) };
        // SAFETY: `graph` is valid and owned here.
        match unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) } {
            Ok(exec) => Ok(CapturedGraph { owner: self.id, graph, exec, ctx: self.ctx.clone(), nodes }),
            Err(e) => {
                // SAFETY: not instantiated, so owned by nothing else.
                let _ = unsafe { result::graph::destroy(graph) };
                Err(driver_err("instantiating a CUDA graph")(e))
            }
        }
    }

    /// Runs a captured graph on the stream (asynchronously, like a launch).
    pub fn replay(&mut self, g: &CapturedGraph) -> Result<(), DeviceError> {
        if g.owner != self.id {
            return Err(DeviceError::Driver {
                what: "replaying a CUDA graph".into(),
                detail: "the graph was captured on another device".into(),
            });
        }
        self.not_capturing("replaying a CUDA graph")?;
        self.bind()?;
        // SAFETY: `g.exec` is alive (owned by `g`) and belongs to this context.
        unsafe { result::graph::launch(g.exec, self.stream.cu_stream()) }.map_err(driver_err("replaying a CUDA graph"))
    }

    /// GPU time, in milliseconds, of the work `f` issues on the stream,
    /// measured with two events (waits for that work to finish).
    pub fn elapsed_ms<F: FnOnce(&mut Self) -> Result<(), DeviceError>>(&mut self, f: F) -> Result<f64, DeviceError> {
        self.not_capturing("timing")?;
        self.bind()?;
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.ctx.new_event(timing).map_err(driver_err("creating a timing event"))?;
        let end = self.ctx.new_event(timing).map_err(driver_err("creating a timing event"))?;
        start.record(&self.stream).map_err(driver_err("recording a timing event"))?;
        f(self)?;
        self.bind()?;
        end.record(&self.stream).map_err(driver_err("recording a timing event"))?;
        end.synchronize().map_err(driver_err("running kernels"))?;
        start.elapsed_ms(&end).map(f64::from).map_err(driver_err("reading a timing event"))
    }

    /// Device-to-device copy on the stream (the bandwidth ceiling measurement).
    pub fn copy_d2d(&mut self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<(), DeviceError> {
        self.check(dst, bytes, "a device copy's destination")?;
        self.check(src, bytes, "a device copy's source")?;
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both ranges lie inside allocations of this device.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .map_err(driver_err("a device copy"))
    }
}

impl Device for CudaDevice {
    fn name(&self) -> String {
        self.info.name.clone()
    }

    fn target(&self) -> Target {
        self.target
    }

    fn load_module(&mut self, ptx: &str, cubin: Option<&[u8]>) -> Result<(), DeviceError> {
        let entries = parse_entries(ptx).map_err(|detail| DeviceError::ModuleLoad { detail, log: String::new() })?;
        self.bind()?;
        let module = self.load_image(ptx, cubin)?;
        let mut found = vec![];
        for e in entries.into_iter().filter(|e| !self.kernels.contains_key(&e.name)) {
            let Ok(cname) = CString::new(e.name.clone()) else { continue };
            // SAFETY: `module` was just loaded and is not unloaded while found functions are kept.
            match unsafe { result::module::get_function(module, cname) } {
                Ok(func) => found.push((e, func)),
                Err(err) => {
                    // SAFETY: nothing refers to the module yet.
                    let _ = unsafe { result::module::unload(module) };
                    return Err(DeviceError::ModuleLoad {
                        detail: format!(
                            "kernel {} is declared in the PTX but not in the loaded module: {}",
                            e.name,
                            describe(err)
                        ),
                        log: String::new(),
                    });
                }
            }
        }
        for (e, func) in found {
            // A name declared twice in one module keeps its first declaration.
            self.kernels.entry(e.name).or_insert(Kernel { func, params: e.params });
        }
        self.modules.push(module);
        Ok(())
    }

    fn has_kernel(&self, name: &str) -> bool {
        self.kernels.contains_key(name)
    }

    fn alloc(&mut self, bytes: usize, what: &str) -> Result<DevPtr, DeviceError> {
        self.not_capturing(&format!("allocating {what}"))?;
        self.bind()?;
        let size = bytes.max(1);
        // SAFETY: a fresh allocation; its contents are undefined, as the trait says.
        let r = if self.async_alloc {
            unsafe { result::malloc_async(self.stream.cu_stream(), size) }
        } else {
            unsafe { result::malloc_sync(size) }
        };
        let ptr = match r {
            Ok(p) => p,
            // Some drivers answer an impossible size with INVALID_VALUE rather than
            // OUT_OF_MEMORY: either way, a request beyond the free memory is reported as OOM.
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY || self.exceeds_free(size) => {
                return Err(DeviceError::OutOfMemory {
                    what: what.into(),
                    bytes: bytes as u64,
                    used: self.used,
                    total: self.total,
                })
            }
            Err(e) => return Err(driver_err(format!("allocating {bytes} bytes for {what}"))(e)),
        };
        if ptr % 256 != 0 {
            self.free_now(ptr);
            return Err(DeviceError::Driver {
                what: format!("allocating {what}"),
                detail: format!("the driver returned {ptr:#x}, not 256-byte aligned"),
            });
        }
        self.allocs.insert(ptr, Alloc { size: size as u64, counted: bytes as u64 });
        self.used += bytes as u64;
        self.peak = self.peak.max(self.used);
        Ok(ptr)
    }

    fn free(&mut self, ptr: DevPtr) {
        let Some(a) = self.allocs.remove(&ptr) else { return };
        self.used -= a.counted;
        if self.capturing {
            // A free inside a capture would become a graph node; do it once the capture ends.
            self.deferred_frees.push(ptr);
            return;
        }
        if let Err(e) = self.bind() {
            self.pending_error.get_or_insert(e);
            return;
        }
        self.free_now(ptr);
    }

    fn upload(&mut self, dst: DevPtr, bytes: &[u8]) -> Result<(), DeviceError> {
        self.check(dst, bytes.len(), "an upload")?;
        if bytes.is_empty() {
            return Ok(());
        }
        self.not_capturing("an upload")?;
        self.bind()?;
        if bytes.len() < SMALL_UPLOAD || self.ensure_staging().is_err() {
            return self.upload_pageable(dst, bytes);
        }
        let stream = self.stream.cu_stream();
        let Some(Ok(staging)) = &self.staging else { return self.upload_pageable(dst, bytes) };
        for (i, chunk) in bytes.chunks(STAGING_CHUNK).enumerate() {
            let buf = &staging[i % 2];
            // The copy out of this buffer issued last time must be done before we overwrite it.
            buf.done.synchronize().map_err(driver_err("an upload (waiting for a staging buffer)"))?;
            // SAFETY: `host` is a live pinned allocation of STAGING_CHUNK bytes that no
            // queued copy reads any more (waited above), and `chunk` fits in it.
            let host = unsafe { std::slice::from_raw_parts_mut(buf.host, chunk.len()) };
            // Several threads fill the buffer: a memory-mapped source faults its pages in
            // in parallel, and one core cannot keep up with PCIe.
            host.par_chunks_mut(1 << 20).zip(chunk.par_chunks(1 << 20)).for_each(|(d, s)| d.copy_from_slice(s));
            let off = (i * STAGING_CHUNK) as u64;
            // SAFETY: the destination range was checked; the pinned source stays
            // untouched until `done` (recorded next) has completed.
            unsafe { result::memcpy_htod_async(dst + off, &*host, stream) }.map_err(driver_err("an upload"))?;
            buf.done.record(&self.stream).map_err(driver_err("an upload (recording a staging event)"))?;
        }
        Ok(())
    }

    fn download(&mut self, src: DevPtr, out: &mut [u8]) -> Result<(), DeviceError> {
        self.check(src, out.len(), "a download")?;
        if out.is_empty() {
            return Ok(());
        }
        self.not_capturing("a download")?;
        self.bind()?;
        // Finish the queued work first, so a kernel fault is reported as one
        // and not as a failed copy.
        // SAFETY: the stream is this device's own.
        unsafe { result::stream::synchronize(self.stream.cu_stream()) }.map_err(driver_err("running kernels"))?;
        // SAFETY: the source range was checked; `out` is borrowed for the whole
        // call and the stream is synchronised before returning.
        unsafe { result::memcpy_dtoh_async(out, src, self.stream.cu_stream()) }.map_err(driver_err("a download"))?;
        unsafe { result::stream::synchronize(self.stream.cu_stream()) }.map_err(driver_err("a download"))
    }

    fn memset_zero(&mut self, dst: DevPtr, bytes: usize) -> Result<(), DeviceError> {
        self.check(dst, bytes, "a memset")?;
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the range lies inside an allocation of this device.
        unsafe { result::memset_d8_async(dst, 0, bytes, self.stream.cu_stream()) }.map_err(driver_err("a memset"))
    }

    fn launch(&mut self, kernel: &str, grid: [u32; 3], block: [u32; 3], args: &[KArg]) -> Result<(), DeviceError> {
        let k = self.kernels.get(kernel).ok_or_else(|| DeviceError::UnknownKernel { kernel: kernel.into() })?;
        let fail = |detail: String| DeviceError::Launch {
            kernel: kernel.into(),
            detail: format!("grid {grid:?} block {block:?}: {detail}"),
        };
        let threads: u64 = block.iter().map(|&b| b as u64).product();
        if threads == 0 || threads > 1024 || grid.contains(&0) {
            return Err(fail("need 1..=1024 threads per block and a non-empty grid".into()));
        }
        if args.len() != k.params.len() {
            return Err(fail(format!("the kernel takes {} params, got {} args", k.params.len(), args.len())));
        }
        for ((pname, ty), a) in k.params.iter().zip(args) {
            if let ParamTy::Other(decl) = ty {
                return Err(fail(format!("param `{decl}` has a type qvc cannot pass")));
            }
            if !ty.accepts(a) {
                return Err(fail(format!("param `{pname}` is {ty:?}, got {a:?}")));
            }
            if let KArg::Ptr(p) = *a {
                if !self.valid_ptr(p) {
                    return Err(fail(format!("param `{pname}`: {p:#x} points into no allocation")));
                }
            }
        }
        let func = k.func;
        self.bind()?;
        let mut slots: Vec<ArgSlot> = args.iter().map(ArgSlot::new).collect();
        let mut params: Vec<*mut c_void> = slots.iter_mut().map(|s| s.0.as_mut_ptr() as *mut c_void).collect();
        // SAFETY: `func` belongs to a module this device keeps loaded; `params`
        // has one pointer per declared param (checked above), each to an
        // 8-byte slot at least as wide as the param, alive until the call
        // returns (the driver copies the values at launch).
        unsafe {
            result::launch_kernel(
                func,
                (grid[0], grid[1], grid[2]),
                (block[0], block[1], block[2]),
                0,
                self.stream.cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| fail(describe(e)))
    }

    fn synchronize(&mut self) -> Result<(), DeviceError> {
        self.not_capturing("synchronizing")?;
        if let Some(e) = self.pending_error.take() {
            return Err(e);
        }
        self.bind()?;
        // SAFETY: the stream is this device's own.
        unsafe { result::stream::synchronize(self.stream.cu_stream()) }.map_err(driver_err("running kernels"))
    }

    fn memory(&self) -> MemInfo {
        MemInfo { used: self.used, peak: self.peak, total: self.total }
    }
    fn launch_timed(
        &mut self,
        kernel: &str,
        grid: [u32; 3],
        block: [u32; 3],
        args: &[KArg],
    ) -> Result<f64, DeviceError> {
        self.elapsed_ms(|d| d.launch(kernel, grid, block, args))
    }
    fn capture_begin(&mut self) -> Result<bool, DeviceError> {
        self.begin_capture()?;
        Ok(true)
    }
    fn capture_end(&mut self) -> Result<usize, DeviceError> {
        let g = self.end_capture()?;
        self.graphs.push(Some(g));
        Ok(self.graphs.len() - 1)
    }
    fn replay(&mut self, graph: usize) -> Result<(), DeviceError> {
        // Taken out for the call (replay borrows the device mutably).
        let g = self.graphs.get_mut(graph).and_then(Option::take).ok_or_else(|| DeviceError::Driver {
            what: "replaying a CUDA graph".into(),
            detail: format!("no graph {graph}"),
        })?;
        let r = CudaDevice::replay(self, &g);
        self.graphs[graph] = Some(g);
        r
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // Nothing here can report an error; each step is attempted regardless.
        let _ = self.ctx.bind_to_thread();
        let stream = self.stream.cu_stream();
        // SAFETY (whole block): every handle below was created by this device,
        // is released exactly once, and the stream is drained before host
        // buffers and modules that queued work may still use are released.
        unsafe {
            if self.capturing {
                if let Ok(g) = result::stream::end_capture(stream) {
                    if !g.is_null() {
                        let _ = result::graph::destroy(g);
                    }
                }
                self.capturing = false;
            }
            let _ = result::stream::synchronize(stream);
            let ptrs: Vec<DevPtr> = self.allocs.keys().copied().chain(self.deferred_frees.drain(..)).collect();
            self.allocs.clear();
            for p in ptrs {
                self.free_now(p);
            }
            let _ = result::stream::synchronize(stream);
            if let Some(Ok(staging)) = &self.staging {
                for s in staging {
                    let _ = result::free_host(s.host as *mut c_void);
                }
            }
            self.kernels.clear();
            for m in self.modules.drain(..) {
                let _ = result::module::unload(m);
            }
        }
        // `stream` then `ctx` drop next, destroying the stream and releasing the context.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_and_params_are_read_from_ptx() {
        let ptx = "// .visible .entry commented(\n.version 8.0\n.target sm_80\n\n\
                   .visible .entry axpy(\n\t.param .u64 p_x,\n\t.param .f32 p_a,\n\t.param .u32 p_n\n)\n{\n}\n\
                   .entry bare(.param .s32 p_s, .param .align 8 .b8 p_arr[16])\n{\n}\n\
                   .visible .entry empty()\n{\n}\n";
        let e = parse_entries(ptx).unwrap();
        assert_eq!(e.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["axpy", "bare", "empty"]);
        assert_eq!(
            e[0].params,
            [("p_x".into(), ParamTy::Bits64), ("p_a".into(), ParamTy::F32), ("p_n".into(), ParamTy::U32)]
        );
        assert_eq!(e[1].params[0], ("p_s".into(), ParamTy::S32));
        assert!(matches!(e[1].params[1].1, ParamTy::Other(_)));
        assert!(e[2].params.is_empty());
        assert!(parse_entries(".visible .entry broken\n{\n}\n").is_err());
        assert!(parse_entries(".visible .entry open(\n\t.param .u64 p\n{\n").is_err());
    }

    #[test]
    fn param_types_accept_only_matching_args() {
        assert!(ParamTy::Bits64.accepts(&KArg::Ptr(256)) && ParamTy::Bits64.accepts(&KArg::U64(1)));
        assert!(!ParamTy::Bits64.accepts(&KArg::U32(1)));
        assert!(ParamTy::U32.accepts(&KArg::U32(1)) && !ParamTy::U32.accepts(&KArg::S32(1)));
        assert!(ParamTy::S32.accepts(&KArg::S32(-1)) && !ParamTy::S32.accepts(&KArg::F32(1.0)));
        assert!(ParamTy::F32.accepts(&KArg::F32(1.0)) && !ParamTy::F32.accepts(&KArg::U32(1)));
        assert!(!ParamTy::Other(".b8 x[4]".into()).accepts(&KArg::U32(1)));
    }

    #[test]
    fn arg_slots_hold_native_values_at_the_start() {
        assert_eq!(ArgSlot::new(&KArg::U32(7)).0[..4], 7u32.to_ne_bytes());
        assert_eq!(ArgSlot::new(&KArg::S32(-2)).0[..4], (-2i32).to_ne_bytes());
        assert_eq!(ArgSlot::new(&KArg::F32(1.5)).0[..4], 1.5f32.to_ne_bytes());
        assert_eq!(ArgSlot::new(&KArg::Ptr(0x1234_5678_9abc)).0, 0x1234_5678_9abcu64.to_ne_bytes());
        assert_eq!(std::mem::align_of::<ArgSlot>(), 8);
    }

    #[test]
    fn only_self_contained_elf64_images_pass_as_cubins() {
        let mut elf = vec![0u8; 128];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        // Section headers at 64: 1 entry of 64 bytes, ending exactly at 128.
        elf[0x28..0x30].copy_from_slice(&64u64.to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&1u16.to_le_bytes());
        assert!(plausible_cubin(&elf));
        elf[0x3c..0x3e].copy_from_slice(&2u16.to_le_bytes());
        assert!(!plausible_cubin(&elf), "section table past the end");
        assert!(!plausible_cubin(b"\x7fELF garbage"));
        assert!(!plausible_cubin(&[0u8; 256]));
    }

    #[test]
    fn jit_logs_stop_at_the_nul() {
        assert_eq!(log_text(b"line 3; error\n\0\0junk"), "line 3; error");
        assert_eq!(log_text(b"\0"), "");
    }
}
