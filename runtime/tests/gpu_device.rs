//! The [`Device`] contract, one body per behaviour, run on every device:
//! the PTX emulator always, and the first NVIDIA GPU when a driver and a GPU
//! are present (otherwise each CUDA run prints `skipped (no NVIDIA GPU)`).
//! Then CUDA-only checks (graphs, timing, device copies, cubins, JIT logs,
//! out-of-memory) and the no-driver error.
//!
//! A plain `main` (`harness = false`) so the release binary of this test can
//! be carried to a GPU machine and run there with nothing but libcuda; the
//! first argument not starting with `-` filters tests by name. Exit status 1
//! when any test fails.
//!
//! Every comparison is exact: the kernels here compute with one `fma.rn.f32`
//! per element, which the host reproduces with `f32::mul_add`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use qvc_codegen::{Addr, Cmp, Kernel, KernelBuilder, Module, Space, Sreg, Ty};
use qvc_runtime::cuda::{driver_present, gpus};
use qvc_runtime::gpu::cuda::STAGING_CHUNK;
use qvc_runtime::gpu::{CudaDevice, DevPtr, Device, DeviceError, EmuDevice, KArg};

/// What a test body concluded when it did not fail.
enum Outcome {
    Pass,
    /// Could not run here, and why (e.g. no ptxas to build a cubin).
    Skip(String),
}

type Res = Result<Outcome, String>;
type Body = fn(&mut dyn Device) -> Res;
type CudaBody = fn(&mut CudaDevice) -> Res;

/// Runs on the emulator and on CUDA.
const GENERIC: &[(&str, Body)] = &[
    ("round_trip", round_trip),
    ("out_of_bounds_copies", out_of_bounds_copies),
    ("memset_zero", memset_zero),
    ("memory_accounting", memory_accounting),
    ("load_module_twice", load_module_twice),
    ("first_module_wins", first_module_wins),
    ("unknown_kernel", unknown_kernel),
    ("axpy_ragged", axpy_ragged),
    ("two_kernels_one_module", two_kernels_one_module),
    ("bad_launch_args", bad_launch_args),
    ("bad_ptx", bad_ptx),
    ("garbage_cubin_falls_back_to_ptx", garbage_cubin_falls_back_to_ptx),
];

/// Runs on CUDA only.
const CUDA_ONLY: &[(&str, CudaBody)] = &[
    ("graph_capture_replay", graph_capture_replay),
    ("elapsed_and_copy_d2d", elapsed_and_copy_d2d),
    ("out_of_memory", out_of_memory),
    ("jit_log_on_bad_ptx", jit_log_on_bad_ptx),
    ("cubin_is_loaded_without_jit", cubin_is_loaded_without_jit),
];

// ---- helpers -------------------------------------------------------------

trait Ctx<T> {
    fn ctx(self, what: &str) -> Result<T, String>;
}

impl<T> Ctx<T> for Result<T, DeviceError> {
    fn ctx(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

/// xorshift64*: deterministic test data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
    /// Uniform in [-1, 1).
    fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0).collect()
    }
}

fn upload_f32(dev: &mut dyn Device, v: &[f32]) -> Result<DevPtr, String> {
    let p = dev.alloc(v.len() * 4, "test f32 buffer").ctx("alloc")?;
    dev.upload(p, bytemuck::cast_slice(v)).ctx("upload")?;
    Ok(p)
}

fn download_f32(dev: &mut dyn Device, p: DevPtr, n: usize) -> Result<Vec<f32>, String> {
    let mut out = vec![0f32; n];
    dev.download(p, bytemuck::cast_slice_mut(&mut out)).ctx("download")?;
    Ok(out)
}

/// The first index where two f32 slices differ bitwise.
fn first_diff(got: &[f32], want: &[f32]) -> Option<(usize, f32, f32)> {
    got.iter().zip(want).enumerate().find(|(_, (g, w))| g.to_bits() != w.to_bits()).map(|(i, (g, w))| (i, *g, *w))
}

/// `y[i] = a·x[i] + y[i]` for `i < n` (or `y[i] = x[i]` when `copy_only`:
/// a different kernel under the same name and params).
fn axpy_kernel(name: &str, copy_only: bool) -> Kernel {
    let mut b = KernelBuilder::new(name);
    let x = b.ptr_param("x");
    let y = b.ptr_param("y");
    let a = b.param("a", Ty::F32);
    let n = b.param("n", Ty::U32);
    let tid = b.special(Sreg::TidX);
    let cta = b.special(Sreg::CtaidX);
    let ntid = b.special(Sreg::NtidX);
    let i = b.mad(Ty::U32, cta, ntid, tid);
    let outside = b.setp(Cmp::Ge, Ty::U32, i, n);
    let done = b.label("done");
    b.bra_if(outside, false, &done);
    let px = b.index_addr(x, i, 4);
    let py = b.index_addr(y, i, 4);
    let vx = b.ld(Space::GlobalNc, Ty::F32, Addr::reg(px, 0));
    let r = if copy_only {
        // Keep `a` used so the two variants differ only in what they store.
        let zero = b.mul(Ty::F32, a, 0.0f32);
        b.add(Ty::F32, vx, zero)
    } else {
        let vy = b.ld(Space::Global, Ty::F32, Addr::reg(py, 0));
        b.mad(Ty::F32, a, vx, vy)
    };
    b.st(Space::Global, Ty::F32, Addr::reg(py, 0), r);
    b.place(&done);
    b.ret();
    b.finish()
}

/// `out[i] = start + i` (s32) for `i < n`.
fn iota_kernel() -> Kernel {
    let mut b = KernelBuilder::new("iota");
    let out = b.ptr_param("out");
    let n = b.param("n", Ty::U32);
    let start = b.param("start", Ty::S32);
    let tid = b.special(Sreg::TidX);
    let cta = b.special(Sreg::CtaidX);
    let ntid = b.special(Sreg::NtidX);
    let i = b.mad(Ty::U32, cta, ntid, tid);
    let outside = b.setp(Cmp::Ge, Ty::U32, i, n);
    let done = b.label("done");
    b.bra_if(outside, false, &done);
    let v = b.add(Ty::S32, start, i);
    let p = b.index_addr(out, i, 4);
    b.st(Space::Global, Ty::S32, Addr::reg(p, 0), v);
    b.place(&done);
    b.ret();
    b.finish()
}

fn axpy_ptx(dev: &dyn Device) -> String {
    Module::new(dev.target(), vec![axpy_kernel("axpy", false)]).print()
}

const BLOCK: u32 = 128;

fn grid_for(n: usize) -> [u32; 3] {
    [(n as u32).div_ceil(BLOCK).max(1), 1, 1]
}

/// Runs the loaded `axpy` over `n` random elements and checks every one.
fn check_axpy(dev: &mut dyn Device, n: usize, seed: u64) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let (x, y) = (rng.f32s(n), rng.f32s(n));
    let a = 1.75f32;
    let (px, py) = (upload_f32(dev, &x)?, upload_f32(dev, &y)?);
    let args = [KArg::Ptr(px), KArg::Ptr(py), KArg::F32(a), KArg::U32(n as u32)];
    dev.launch("axpy", grid_for(n), [BLOCK, 1, 1], &args).ctx("launch axpy")?;
    dev.synchronize().ctx("synchronize")?;
    let got = download_f32(dev, py, n)?;
    let want: Vec<f32> = x.iter().zip(&y).map(|(&x, &y)| a.mul_add(x, y)).collect();
    dev.free(px);
    dev.free(py);
    match first_diff(&got, &want) {
        None => Ok(()),
        Some((i, g, w)) => Err(format!("axpy n={n}: y[{i}] = {g}, want {w}")),
    }
}

/// PTX with a well-formed header and a body no assembler accepts.
const BAD_PTX: &str = ".version 8.0\n.target sm_80\n.address_size 64\n\n\
    .visible .entry broken(\n\t.param .u64 p_x\n)\n{\n\tthis is not an instruction;\n}\n";

// ---- generic bodies ------------------------------------------------------

/// Sizes 0, 1, odd, and ones crossing the staging chunks (three chunks, so
/// both staging buffers are reused), then a sub-range at an odd offset.
fn round_trip(dev: &mut dyn Device) -> Res {
    let sizes = [0, 1, 4099, (3 << 20) + 7, 2 * STAGING_CHUNK + (1 << 20) + 7];
    let mut rng = Rng::new(1);
    for n in sizes {
        let data = rng.bytes(n);
        let p = dev.alloc(n, "round trip").ctx("alloc")?;
        dev.upload(p, &data).ctx("upload")?;
        let mut back = vec![0u8; n];
        dev.download(p, &mut back).ctx("download")?;
        if let Some(i) = back.iter().zip(&data).position(|(a, b)| a != b) {
            return Err(format!("{n} bytes: byte {i} came back as {}, sent {}", back[i], data[i]));
        }
        if n > STAGING_CHUNK {
            // Overwrite an odd range in the middle, crossing a chunk boundary of the source.
            let (off, len) = (13usize, STAGING_CHUNK + 5);
            let patch = rng.bytes(len);
            dev.upload(p + off as u64, &patch).ctx("upload at an offset")?;
            let mut mid = vec![0u8; len + 2];
            dev.download(p + off as u64 - 1, &mut mid).ctx("download at an offset")?;
            ensure(mid[0] == data[off - 1] && mid[len + 1] == data[off + len], || {
                "the bytes around an offset upload changed".into()
            })?;
            ensure(mid[1..=len] == patch[..], || "an offset upload came back different".into())?;
        }
        dev.free(p);
    }
    Ok(Outcome::Pass)
}

fn out_of_bounds_copies(dev: &mut dyn Device) -> Res {
    let p = dev.alloc(100, "bounds").ctx("alloc")?;
    let bad = |r: Result<(), DeviceError>, what: &str| match r {
        Err(DeviceError::BadAddress { .. }) => Ok(()),
        other => Err(format!("{what}: expected BadAddress, got {other:?}")),
    };
    bad(dev.upload(p, &[0; 101]), "upload past the end")?;
    bad(dev.upload(p + 50, &[0; 51]), "upload at an offset past the end")?;
    bad(dev.download(p + 99, &mut [0; 2]), "download past the end")?;
    bad(dev.memset_zero(p + 1, 100), "memset past the end")?;
    dev.upload(p + 99, &[7]).ctx("upload of the last byte")?;
    dev.upload(p + 7, &[]).ctx("empty upload")?;
    dev.free(p);
    bad(dev.upload(p, &[1]), "upload after free")?;
    Ok(Outcome::Pass)
}

fn memset_zero(dev: &mut dyn Device) -> Res {
    let n = 10_000;
    let mut want = Rng::new(2).bytes(n);
    let p = dev.alloc(n, "memset").ctx("alloc")?;
    dev.upload(p, &want).ctx("upload")?;
    dev.memset_zero(p + 1000, 3333).ctx("memset")?;
    dev.memset_zero(p + 5000, 0).ctx("empty memset")?;
    want[1000..4333].fill(0);
    let mut got = vec![1u8; n];
    dev.download(p, &mut got).ctx("download")?;
    dev.free(p);
    match got.iter().zip(&want).position(|(a, b)| a != b) {
        None => Ok(Outcome::Pass),
        Some(i) => Err(format!("byte {i} is {} after the memset, want {}", got[i], want[i])),
    }
}

fn memory_accounting(dev: &mut dyn Device) -> Res {
    let before = dev.memory();
    let p = dev.alloc(1000, "accounting").ctx("alloc")?;
    let q = dev.alloc(24, "accounting").ctx("alloc")?;
    ensure(p % 256 == 0 && q % 256 == 0, || format!("allocations {p:#x}, {q:#x} are not 256-byte aligned"))?;
    let during = dev.memory();
    ensure(during.used == before.used + 1024, || {
        format!("used {} after allocating 1024 more than {}", during.used, before.used)
    })?;
    ensure(during.peak >= during.used, || format!("peak {} below used {}", during.peak, during.used))?;
    ensure(during.total == 0 || during.total >= during.used, || format!("total {} below used", during.total))?;
    dev.free(p);
    dev.free(q);
    dev.free(q); // a second free of the same pointer is ignored
    let after = dev.memory();
    ensure(after.used == before.used, || format!("used {} after freeing, was {}", after.used, before.used))?;
    ensure(after.peak >= during.used, || "peak fell after a free".into())?;
    Ok(Outcome::Pass)
}

fn load_module_twice(dev: &mut dyn Device) -> Res {
    let ptx = axpy_ptx(dev);
    ensure(!dev.has_kernel("axpy"), || "axpy loaded before any module".into())?;
    dev.load_module(&ptx, None).ctx("first load")?;
    dev.load_module(&ptx, None).ctx("second load")?;
    ensure(dev.has_kernel("axpy"), || "axpy not loaded".into())?;
    check_axpy(dev, 300, 3)?;
    Ok(Outcome::Pass)
}

/// A later module declaring a loaded name keeps the first definition, while
/// its other kernels become callable.
fn first_module_wins(dev: &mut dyn Device) -> Res {
    dev.load_module(&axpy_ptx(dev), None).ctx("load axpy")?;
    let other = Module::new(dev.target(), vec![axpy_kernel("axpy", true), iota_kernel()]).print();
    dev.load_module(&other, None).ctx("load the second module")?;
    ensure(dev.has_kernel("iota"), || "iota from the second module is not callable".into())?;
    check_axpy(dev, 1000, 4)?; // fails if the copy-only `axpy` replaced the first
    Ok(Outcome::Pass)
}

fn unknown_kernel(dev: &mut dyn Device) -> Res {
    dev.load_module(&axpy_ptx(dev), None).ctx("load")?;
    match dev.launch("no_such_kernel", [1, 1, 1], [32, 1, 1], &[]) {
        Err(DeviceError::UnknownKernel { kernel }) if kernel == "no_such_kernel" => Ok(Outcome::Pass),
        other => Err(format!("expected UnknownKernel, got {other:?}")),
    }
}

fn axpy_ragged(dev: &mut dyn Device) -> Res {
    dev.load_module(&axpy_ptx(dev), None).ctx("load")?;
    for (k, n) in [1, 127, 128, 1000, 70_001].into_iter().enumerate() {
        check_axpy(dev, n, 10 + k as u64)?;
    }
    Ok(Outcome::Pass)
}

/// Two entries in one module, and s32/u32 params.
fn two_kernels_one_module(dev: &mut dyn Device) -> Res {
    let ptx = Module::new(dev.target(), vec![axpy_kernel("axpy", false), iota_kernel()]).print();
    dev.load_module(&ptx, None).ctx("load")?;
    let n = 4097;
    let out = dev.alloc(n * 4, "iota").ctx("alloc")?;
    let args = [KArg::Ptr(out), KArg::U32(n as u32), KArg::S32(-2000)];
    dev.launch("iota", grid_for(n), [BLOCK, 1, 1], &args).ctx("launch iota")?;
    let mut got = vec![0i32; n];
    dev.download(out, bytemuck::cast_slice_mut(&mut got)).ctx("download")?;
    if let Some(i) = (0..n).find(|&i| got[i] != i as i32 - 2000) {
        return Err(format!("iota: out[{i}] = {}, want {}", got[i], i as i32 - 2000));
    }
    dev.free(out);
    check_axpy(dev, 999, 5)?;
    Ok(Outcome::Pass)
}

/// Wrong count, wrong type, a pointer into nothing, an empty block: each a
/// launch error before anything runs.
fn bad_launch_args(dev: &mut dyn Device) -> Res {
    dev.load_module(&axpy_ptx(dev), None).ctx("load")?;
    let p = dev.alloc(64, "bad args").ctx("alloc")?;
    let cases: [(&str, [u32; 3], Vec<KArg>); 4] = [
        ("three args for four params", [BLOCK, 1, 1], vec![KArg::Ptr(p), KArg::Ptr(p), KArg::F32(1.0)]),
        ("a u32 for the f32 param", [BLOCK, 1, 1], vec![KArg::Ptr(p), KArg::Ptr(p), KArg::U32(1), KArg::U32(16)]),
        (
            "a pointer into no allocation",
            [BLOCK, 1, 1],
            vec![KArg::Ptr(p), KArg::Ptr(0x10), KArg::F32(1.0), KArg::U32(16)],
        ),
        ("an empty block", [0, 1, 1], vec![KArg::Ptr(p), KArg::Ptr(p), KArg::F32(1.0), KArg::U32(16)]),
    ];
    for (what, block, args) in cases {
        match dev.launch("axpy", [1, 1, 1], block, &args) {
            Err(DeviceError::Launch { kernel, .. }) if kernel == "axpy" => {}
            other => return Err(format!("{what}: expected a Launch error, got {other:?}")),
        }
    }
    dev.synchronize().ctx("synchronize after refused launches")?;
    dev.free(p);
    Ok(Outcome::Pass)
}

fn bad_ptx(dev: &mut dyn Device) -> Res {
    match dev.load_module(BAD_PTX, None) {
        Err(DeviceError::ModuleLoad { .. }) => {}
        other => return Err(format!("expected ModuleLoad, got {other:?}")),
    }
    ensure(!dev.has_kernel("broken"), || "a kernel of a module that failed to load is callable".into())?;
    // The device is still usable.
    dev.load_module(&axpy_ptx(dev), None).ctx("load after a failed load")?;
    check_axpy(dev, 100, 6)?;
    Ok(Outcome::Pass)
}

fn garbage_cubin_falls_back_to_ptx(dev: &mut dyn Device) -> Res {
    let garbage = b"\x7fELF\x02\x01 this is not a cubin, the PTX must be used instead";
    dev.load_module(&axpy_ptx(dev), Some(garbage)).ctx("load with a garbage cubin")?;
    check_axpy(dev, 500, 7)?;
    Ok(Outcome::Pass)
}

// ---- CUDA-only bodies ----------------------------------------------------

/// Two launches captured into a graph do not run at capture; each replay
/// runs both. Allocation during a capture is refused; a free is deferred.
fn graph_capture_replay(dev: &mut CudaDevice) -> Res {
    dev.load_module(&axpy_ptx(dev), None).ctx("load")?;
    let n = 10_000;
    let mut rng = Rng::new(8);
    let (x, y) = (rng.f32s(n), rng.f32s(n));
    let (px, py) = (upload_f32(dev, &x)?, upload_f32(dev, &y)?);
    let spare = dev.alloc(4096, "freed during capture").ctx("alloc")?;
    let used = dev.memory().used;
    let a = 0.5f32;
    let args = [KArg::Ptr(px), KArg::Ptr(py), KArg::F32(a), KArg::U32(n as u32)];
    dev.begin_capture().ctx("begin capture")?;
    ensure(dev.alloc(16, "during capture").is_err(), || "alloc during a capture was allowed".into())?;
    dev.free(spare);
    dev.launch("axpy", grid_for(n), [BLOCK, 1, 1], &args).ctx("captured launch 1")?;
    dev.launch("axpy", grid_for(n), [BLOCK, 1, 1], &args).ctx("captured launch 2")?;
    let g = dev.end_capture().ctx("end capture")?;
    ensure(g.nodes == 2, || format!("the graph has {} nodes, want 2", g.nodes))?;
    ensure(dev.memory().used == used - 4096, || "the free during capture was not accounted".into())?;
    let unchanged = download_f32(dev, py, n)?;
    ensure(first_diff(&unchanged, &y).is_none(), || "captured launches ran at capture time".into())?;
    let mut want = y.clone();
    for _ in 0..3 {
        dev.replay(&g).ctx("replay")?;
        for _ in 0..2 {
            want.iter_mut().zip(&x).for_each(|(w, &x)| *w = a.mul_add(x, *w));
        }
    }
    dev.synchronize().ctx("synchronize")?;
    let got = download_f32(dev, py, n)?;
    if let Some((i, g, w)) = first_diff(&got, &want) {
        return Err(format!("after 3 replays y[{i}] = {g}, want {w}"));
    }
    drop(g);
    dev.synchronize().ctx("synchronize after dropping the graph")?;
    Ok(Outcome::Pass)
}

fn elapsed_and_copy_d2d(dev: &mut CudaDevice) -> Res {
    let n = 256 << 20;
    let data = Rng::new(9).bytes(n);
    let a = dev.alloc(n, "copy source").ctx("alloc")?;
    let b = dev.alloc(n, "copy destination").ctx("alloc")?;
    let t = Instant::now();
    dev.upload(a, &data).ctx("upload")?;
    dev.synchronize().ctx("synchronize")?;
    let up = t.elapsed().as_secs_f64();
    dev.copy_d2d(b, a, n).ctx("warm-up copy")?;
    let ms = dev.elapsed_ms(|d| d.copy_d2d(b, a, n)).ctx("timed copy")?;
    ensure(ms.is_finite() && ms > 0.0, || format!("elapsed {ms} ms"))?;
    let mut back = vec![0u8; n];
    dev.download(b, &mut back).ctx("download")?;
    ensure(back == data, || "the device copy differs from the source".into())?;
    match dev.copy_d2d(b + 1, a, n) {
        Err(DeviceError::BadAddress { .. }) => {}
        other => return Err(format!("copy past the end: expected BadAddress, got {other:?}")),
    }
    println!(
        "    {n} bytes: upload {:.1} GB/s (pinned staging), device copy {ms:.3} ms = {:.0} GB/s (read + write)",
        n as f64 / up / 1e9,
        2.0 * n as f64 / (ms * 1e6)
    );
    dev.free(a);
    dev.free(b);
    Ok(Outcome::Pass)
}

fn out_of_memory(dev: &mut CudaDevice) -> Res {
    match dev.alloc(1 << 48, "an impossible buffer") {
        Err(DeviceError::OutOfMemory { total, bytes, .. }) if total > 0 && bytes == 1 << 48 => {}
        other => return Err(format!("expected OutOfMemory with the device total, got {other:?}")),
    }
    let p = dev.alloc(1 << 20, "after OOM").ctx("alloc after an OOM")?;
    dev.free(p);
    dev.synchronize().ctx("synchronize")?;
    Ok(Outcome::Pass)
}

fn jit_log_on_bad_ptx(dev: &mut CudaDevice) -> Res {
    match dev.load_module(BAD_PTX, None) {
        Err(DeviceError::ModuleLoad { log, .. }) if log.contains("error") => Ok(Outcome::Pass),
        other => Err(format!("expected ModuleLoad with the JIT's error log, got {other:?}")),
    }
}

/// With ptxas (`QVC_PTXAS`, `PATH` or `.tools/bin`), a matching cubin is
/// loaded as is and a garbage one falls back to the JIT.
fn cubin_is_loaded_without_jit(dev: &mut CudaDevice) -> Res {
    let Some(ptxas) = qvc_codegen::ptxas::for_tests() else {
        return Ok(Outcome::Skip("no ptxas".into()));
    };
    let ptx = axpy_ptx(dev);
    let cubin = assemble_cubin(&ptxas, &ptx, dev.target().name())?;
    dev.load_module(&ptx, Some(&cubin)).ctx("load with a cubin")?;
    ensure(dev.cubins_loaded() == 1 && dev.ptx_jitted() == 0, || {
        format!("cubins loaded {}, PTX jitted {}", dev.cubins_loaded(), dev.ptx_jitted())
    })?;
    check_axpy(dev, 2000, 12)?;
    dev.load_module(&ptx, Some(b"\x7fELF\x02\x01 garbage")).ctx("load with a garbage cubin")?;
    ensure(dev.ptx_jitted() == 1, || "a garbage cubin did not fall back to the JIT".into())?;
    Ok(Outcome::Pass)
}

fn assemble_cubin(ptxas: &Path, ptx: &str, arch: &str) -> Result<Vec<u8>, String> {
    let dir = std::env::temp_dir().join(format!("qvc-gpu-device-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (src, out) = (dir.join("k.ptx"), dir.join("k.cubin"));
    std::fs::write(&src, ptx).map_err(|e| e.to_string())?;
    let run = Command::new(ptxas).arg(format!("-arch={arch}")).arg("-o").arg(&out).arg(&src).output();
    let cubin = std::fs::read(&out);
    let _ = std::fs::remove_dir_all(&dir);
    let run = run.map_err(|e| format!("running {}: {e}", ptxas.display()))?;
    ensure(run.status.success(), || format!("ptxas failed: {}", String::from_utf8_lossy(&run.stderr)))?;
    cubin.map_err(|e| format!("reading the cubin: {e}"))
}

// ---- the runner ----------------------------------------------------------

#[derive(Default)]
struct Tally {
    passed: usize,
    failed: Vec<String>,
    no_gpu: usize,
    other_skips: usize,
}

impl Tally {
    fn run(&mut self, name: &str, on: &str, body: impl FnOnce() -> Res) {
        let t = Instant::now();
        let r = catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|p| {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(format!("panicked: {}", msg.unwrap_or_default()))
        });
        let secs = t.elapsed().as_secs_f64();
        match r {
            Ok(Outcome::Pass) => {
                println!("test gpu_device::{name} on {on} ... ok ({secs:.2} s)");
                self.passed += 1;
            }
            Ok(Outcome::Skip(why)) => {
                println!("test gpu_device::{name} on {on} ... skipped ({why})");
                self.other_skips += 1;
            }
            Err(e) => {
                println!("test gpu_device::{name} on {on} ... FAILED\n    {e}");
                self.failed.push(format!("gpu_device::{name} on {on}: {e}"));
            }
        }
    }

    fn skip_no_gpu(&mut self, name: &str) {
        println!("test gpu_device::{name} on cuda ... skipped (no NVIDIA GPU)");
        self.no_gpu += 1;
    }
}

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-')).unwrap_or_default();
    let selected = |name: &str| name.contains(filter.as_str());
    let mut tally = Tally::default();

    for &(name, body) in GENERIC.iter().filter(|(n, _)| selected(n)) {
        tally.run(name, "emu", || body(&mut EmuDevice::new(qvc_codegen::Target::Sm80)));
    }

    let have_gpu = driver_present() && gpus().is_ok_and(|g| !g.is_empty());
    let cuda_tests = GENERIC.iter().map(|&(n, b)| (n, Err(b))).chain(CUDA_ONLY.iter().map(|&(n, b)| (n, Ok(b))));
    for (name, body) in cuda_tests.filter(|(n, _)| selected(n)) {
        if !have_gpu {
            tally.skip_no_gpu(name);
            continue;
        }
        tally.run(name, "cuda", || {
            let mut dev = CudaDevice::open(0).ctx("opening GPU 0")?;
            let r = match body {
                Err(generic) => generic(&mut dev),
                Ok(cuda) => cuda(&mut dev),
            };
            // Anything left running must finish cleanly before the device goes.
            r.and_then(|o| dev.synchronize().ctx("final synchronize").map(|_| o))
        });
    }

    if selected("open_errors") {
        tally.run("open_errors", "cuda", open_errors);
    }
    if selected("ptxas_accepts_the_test_kernels") {
        tally.run("ptxas_accepts_the_test_kernels", "ptxas", ptxas_accepts_the_test_kernels);
    }

    let mut summary = format!(
        "test result: {}. {} passed; {} failed; {} skipped{}",
        if tally.failed.is_empty() { "ok" } else { "FAILED" },
        tally.passed,
        tally.failed.len(),
        tally.no_gpu,
        if tally.no_gpu > 0 { " (no NVIDIA GPU)" } else { "" }
    );
    if tally.other_skips > 0 {
        summary.push_str(&format!("; {} skipped (other reasons, see above)", tally.other_skips));
    }
    if !tally.failed.is_empty() {
        println!("\nfailures:");
        for f in &tally.failed {
            println!("    {f}");
        }
    }
    println!("\n{summary}");
    if !tally.failed.is_empty() {
        std::process::exit(1);
    }
}

/// Without a driver, opening says "no NVIDIA driver found"; with one,
/// opening a GPU past the last names how many there are.
fn open_errors() -> Res {
    if !driver_present() {
        let e = CudaDevice::open(0).err().ok_or("opened a GPU without a driver")?;
        ensure(e.to_string().contains("no NVIDIA driver found"), || format!("unexpected error: {e}"))?;
        return Ok(Outcome::Pass);
    }
    let n = gpus().map_err(|e| e.to_string())?.len();
    let e = CudaDevice::open(n).err().ok_or_else(|| format!("opened GPU {n} of {n}"))?;
    let msg = e.to_string();
    let names_count = msg.contains(&format!("{n} GPU")) || (n == 0 && msg.contains("(0 devices)"));
    ensure(names_count, || format!("the error does not say how many GPUs exist: {msg}"))?;
    Ok(Outcome::Pass)
}

/// The PTX these tests hand to the GPU's JIT assembles cleanly (no
/// warnings) for both targets, and `BAD_PTX` is rejected, so a failure on
/// the GPU machine is the device's, not the test kernels'.
fn ptxas_accepts_the_test_kernels() -> Res {
    let Some(ptxas) = qvc_codegen::ptxas::for_tests() else {
        return Ok(Outcome::Skip("no ptxas".into()));
    };
    for target in qvc_codegen::Target::ALL {
        let kernels = vec![axpy_kernel("axpy", false), axpy_kernel("axpy_copy", true), iota_kernel()];
        let ptx = Module::new(target, kernels).print();
        let usage = qvc_codegen::ptxas::assemble(&ptxas, &ptx, target).map_err(|e| e.to_string())?;
        ensure(usage.len() == 3, || format!("ptxas reported {} kernels for {}", usage.len(), target.name()))?;
        let bad = qvc_codegen::ptxas::assemble(&ptxas, BAD_PTX, target);
        ensure(bad.is_err(), || format!("ptxas accepted BAD_PTX for {}", target.name()))?;
    }
    Ok(Outcome::Pass)
}
