//! The model on a real NVIDIA GPU (CUDA through cudarc): the fixture
//! compiled for the GPU's target, run end to end against the reference
//! logits (bf16 tolerance 2e-2 relative) and the CPU backend, and every
//! kernel family against its CPU reference. A custom harness: where no
//! NVIDIA driver or GPU exists, each test prints `skipped (no NVIDIA GPU)`
//! and counts as skipped, never as passed.

mod common;
use common::{fixtures, rel_err, Expected};
use qvc::compile::{compile, CompileOptions, SourceSpec, Target};
use qvc_model::sampling::argmax;
use qvc_model::{LoadOptions, Model, PrefillOptions, Session};
use qvc_runtime::gpu::{CudaDevice, Device};
use qvc_runtime::{Backend, Cpu};
use std::path::Path;
use std::process::ExitCode;

const TOL: f64 = 2e-2;

type Test = fn(&Path) -> Result<String, String>;

fn greedy(m: &Model, b: &dyn Backend, ids: &[u32], steps: usize, forced: Option<&[u32]>) -> Vec<Vec<f32>> {
    let mut s = Session::new(m, b);
    let mut logits = s.prefill(ids, &PrefillOptions::default()).unwrap().logits;
    let mut all = vec![logits.clone()];
    for k in 0..steps {
        let t = forced.map_or_else(|| argmax(&logits) as u32, |f| f[k]);
        logits = s.step(t).unwrap();
        all.push(logits.clone());
    }
    all
}

/// The compiled fixture: text prompt, prefill vs the reference, 4 greedy
/// steps (decode graphs captured and replayed) vs the CPU backend.
fn fixture_text(dir: &Path) -> Result<String, String> {
    let gpu0 = qvc_runtime::cuda::gpus().map_err(|e| e.to_string())?.remove(0);
    let target = gpu0.target().ok_or("GPU older than sm_80")?;
    let out = std::env::temp_dir().join(format!("qvc-gpu-cuda-{}", std::process::id()));
    let opt = CompileOptions { target: Target::Gpu(target), max_seq: 512, force: true, ..Default::default() };
    compile(&SourceSpec::Checkpoint(dir.to_path_buf()), Some(&out), &opt, &indicatif::ProgressBar::hidden())
        .map_err(|e| e.to_string())?;
    let m = Model::load(&out, &LoadOptions::default()).map_err(|e| e.to_string())?;
    let gpu =
        m.gpu_backend(Box::new(CudaDevice::open(0).map_err(|e| e.to_string())?), 1, 0).map_err(|e| e.to_string())?;
    let e = Expected::load(dir);
    let ids = e.ids(&e.json["chat"]["text"]["input_ids"]);
    let g = greedy(&m, &gpu, &ids, 4, None);
    let v = m.config.vocab_size;
    let want = e.f32("chat/text/all_logits");
    let r0 = rel_err(&g[0], &want[want.len() - v..]);
    let toks: Vec<u32> = g[..4].iter().map(|l| argmax(l) as u32).collect();
    let c = greedy(&m, &Cpu, &ids, 4, Some(&toks));
    let worst = g.iter().zip(&c).map(|(a, b)| rel_err(a, b)).fold(0.0, f64::max);
    let _ = std::fs::remove_dir_all(&out);
    let st = gpu.stats();
    if r0 < TOL && worst < TOL {
        Ok(format!("prefill vs reference {r0:.2e}, steps vs cpu ≤ {worst:.2e}, {} replays", st.replays))
    } else {
        Err(format!("prefill vs reference {r0:.2e}, steps vs cpu ≤ {worst:.2e} (tol {TOL:e})"))
    }
}

/// The checkpoint with a 448-pixel image, vs the reference's last logits.
fn fixture_image(dir: &Path) -> Result<String, String> {
    let m = Model::load(dir, &LoadOptions::default()).map_err(|e| e.to_string())?;
    let gpu =
        m.gpu_backend(Box::new(CudaDevice::open(0).map_err(|e| e.to_string())?), 1, 512).map_err(|e| e.to_string())?;
    let e = Expected::load(dir);
    let ids = e.ids(&e.json["chat"]["img1"]["input_ids"]);
    let mut s = Session::new(&m, &gpu);
    s.set_image_dir(dir);
    let l = s.prefill(&ids, &PrefillOptions::default()).map_err(|e| e.to_string())?.logits;
    let r = rel_err(&l, &e.f32("chat/img1/last_logits"));
    if r < TOL {
        Ok(format!("vs reference {r:.2e}"))
    } else {
        Err(format!("vs reference {r:.2e} (tol {TOL:e})"))
    }
}

/// Every kernel family on random (ragged) shapes vs its CPU reference.
fn kernel_families(_: &Path) -> Result<String, String> {
    let mut dev = CudaDevice::open(0).map_err(|e| e.to_string())?;
    let res = qvc::selftest::run(&mut dev as &mut dyn Device, 4, false, 7);
    let bad: Vec<_> = res.iter().filter(|r| r.error.is_some() || r.max_err > r.tol).collect();
    let worst = res.iter().map(|r| r.max_err).fold(0.0, f64::max);
    if bad.is_empty() {
        Ok(format!("{} families, worst rel err {worst:.2e}", res.len()))
    } else {
        Err(format!("{:?}", bad.iter().map(|r| (r.family, r.max_err, r.error.clone())).collect::<Vec<_>>()))
    }
}

fn main() -> ExitCode {
    let tests: [(&str, Test); 3] =
        [("fixture_text", fixture_text), ("fixture_image", fixture_image), ("kernel_families", kernel_families)];
    let gpu = qvc_runtime::cuda::gpus().ok().is_some_and(|g| g.iter().any(|g| g.target().is_some()));
    let dir = fixtures();
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for (name, t) in tests {
        let Some(d) = dir.as_deref().filter(|_| gpu) else {
            println!(
                "test gpu_cuda::{name} ... skipped (no NVIDIA GPU{})",
                if dir.is_none() { " or fixtures" } else { "" }
            );
            skipped += 1;
            continue;
        };
        match std::panic::catch_unwind(|| t(d)) {
            Ok(Ok(msg)) => {
                println!("test gpu_cuda::{name} ... ok ({msg})");
                passed += 1;
            }
            Ok(Err(msg)) => {
                println!("test gpu_cuda::{name} ... FAILED: {msg}");
                failed += 1;
            }
            Err(_) => {
                println!("test gpu_cuda::{name} ... FAILED (panicked)");
                failed += 1;
            }
        }
    }
    let status = if failed == 0 { "ok" } else { "FAILED" };
    let why = if skipped > 0 { " (no NVIDIA GPU)" } else { "" };
    println!("\ntest result: {status}. {passed} passed; {failed} failed; {skipped} skipped{why}");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
