//! The GPTQ int4 checkpoint on the GPU code path, without a GPU: the
//! tiny-qwen-vl-int4 fixture run by the GPU executor on the PTX emulator,
//! its int4 Linears by the int4 kernels (`qvc_kernels::gpu::q4`: packed
//! weights, zeros, scales and the act-order permutation uploaded as they are,
//! dequantized in registers), against the reference's logits (2e-2
//! relative, the bound: activations and the tensor-core operands
//! are bf16 on the GPU) and, step by step through the device KV cache,
//! against the CPU backend fed the same tokens.

mod common;
use common::{fixture, rel_err, Expected};
use qvc_model::{LoadOptions, Model, PrefillOptions, Session};
use qvc_runtime::gpu::{EmuDevice, GpuBackend};
use qvc_runtime::{Backend, Cpu};
use std::path::Path;

const TOL: f64 = 2e-2;

/// Prefill logits of `ids`, then one step per forced token: every logits row.
fn run(m: &Model, b: &dyn Backend, dir: &Path, ids: &[u32], forced: &[u32]) -> Vec<Vec<f32>> {
    let mut s = Session::new(m, b);
    s.set_image_dir(dir);
    let mut all = vec![s.prefill(ids, &PrefillOptions::default()).unwrap().logits];
    for &t in forced {
        all.push(s.step(t).unwrap());
    }
    all
}

/// Chat prompt `case` on the emulated GPU: the prompt's last logits against
/// the reference, `steps` decode steps (fed the reference's greedy tokens)
/// against the CPU backend; the int4 GEMM (prefill rows) and GEMV (decode
/// rows and the prefill's narrowed last block) both ran, and no node fell
/// back to the host.
fn chat_case(case: &str, steps: usize) {
    let Some(dir) = fixture("tiny-qwen-vl-int4") else { return };
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let e = Expected::load(&dir);
    let c = &e.json["chat"][case];
    let ids = e.ids(&c["input_ids"]);
    let forced = &e.ids(&c["greedy"]["ids"])[..steps];
    let gpu: GpuBackend =
        m.gpu_backend(Box::new(EmuDevice::new(qvc_codegen::Target::Sm80)), 1, ids.len() + steps + 1).unwrap();
    gpu.start_profile();
    let t0 = std::time::Instant::now();
    let g = run(&m, &gpu, &dir, &ids, forced);
    let secs = t0.elapsed().as_secs_f64();
    let profile = gpu.take_profile();

    let r = rel_err(&g[0], &e.f32(&format!("chat/{case}/last_logits")));
    eprintln!("{case}: {} tokens, emu prefill last logits vs reference: rel err {r:.2e} ({secs:.1} s)", ids.len());
    assert!(r < TOL, "{case}: emulated GPU int4 logits differ from the reference by {r:e}");

    let cpu = run(&m, &Cpu, &dir, &ids, forced);
    for (k, (x, y)) in g.iter().zip(&cpu).enumerate() {
        let r = rel_err(x, y);
        eprintln!("{case}: logits {k} emu vs cpu rel err {r:.2e}");
        assert!(r < TOL, "{case}: logits row {k}: emu vs CPU differ by {r:e}");
    }

    let launches =
        |prefix: &str| -> u64 { profile.iter().filter(|k| k.kernel.starts_with(prefix)).map(|k| k.launches).sum() };
    for k in profile.iter().filter(|k| k.kernel.starts_with("q4")) {
        eprintln!("{case}: {} x{}", k.kernel, k.launches);
    }
    let (gemm, gemv) = (launches("q4gemm_"), launches("q4gemv_"));
    eprintln!("{case}: int4 launches: {gemm} GEMM, {gemv} GEMV; {:?}", gpu.stats());
    // Two layers of five int4 Linears (QKV, attention out, w1, w2, MLP out:
    // GPTQ gives w1 and w2 biases, so SwiGLU stays unfused): the first
    // layer's five and the second's QKV see every prompt row; the rest of
    // the prefill (narrowed to the last row) and every decode step see one.
    assert_eq!(gemm, 6, "{case}: int4 GEMM launches");
    assert_eq!(gemv, 4 + 10 * steps as u64, "{case}: int4 GEMV launches");
    assert_eq!(gpu.stats().host_nodes, 0, "every node should run as a kernel");
}

#[test]
fn int4_text_chat_on_the_emulated_gpu_matches_the_reference() {
    chat_case("text", 3);
}

#[test]
fn int4_image_chat_on_the_emulated_gpu_matches_the_reference() {
    chat_case("img1", 2);
}

/// A checkpoint `qvc quantize` made from the bf16 fixture, asymmetric zeros,
/// groups of 32 and `lm_head` in int4 too: its zero GPTQ biases leave
/// SwiGLU fused, so the two-weight SiLU·mul int4 kernels run, and so does
/// the int4 `lm_head` (151936 outputs). No reference exists for these
/// weights: the emulated GPU is held to the CPU backend on the same
/// checkpoint, prefill and decode.
#[test]
fn quantized_with_int4_lm_head_on_the_emulated_gpu_matches_the_cpu_backend() {
    let Some(src) = common::fixtures() else { return };
    let dst = std::env::temp_dir().join(format!("qvc-gpu-emu-int4-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    let opt = qvc::quantize::QuantizeOptions { group_size: 32, sym: false, lm_head: true, ..Default::default() };
    qvc::quantize::quantize(&src, &dst, &opt, &indicatif::ProgressBar::hidden()).unwrap();
    let m = Model::load(&dst, &LoadOptions::default()).unwrap();
    assert_eq!(m.weights.info("lm_head.weight").unwrap().0, qvc_ir::DType::Q4);
    let e = Expected::load(&src);
    let ids = e.ids(&e.json["chat"]["text"]["input_ids"]);
    let forced = &e.ids(&e.json["chat"]["text"]["greedy"]["ids"])[..2];
    let gpu: GpuBackend = m.gpu_backend(Box::new(EmuDevice::new(qvc_codegen::Target::Sm80)), 1, ids.len() + 3).unwrap();
    gpu.start_profile();
    let g = run(&m, &gpu, &src, &ids, forced);
    let profile = gpu.take_profile();
    let cpu = run(&m, &Cpu, &src, &ids, forced);
    for (k, (x, y)) in g.iter().zip(&cpu).enumerate() {
        let r = rel_err(x, y);
        eprintln!("quantized (g32, asym, int4 lm_head): logits {k} emu vs cpu rel err {r:.2e}");
        assert!(r < TOL, "logits row {k}: emu vs CPU differ by {r:e}");
    }
    let ran = |f: &dyn Fn(&str) -> bool| profile.iter().filter(|k| f(&k.kernel)).map(|k| k.launches).sum::<u64>();
    let silu = ran(&|k| k.starts_with("q4") && k.contains("_silumul"));
    let lm_head = ran(&|k| k.starts_with("q4gemv_") && k.contains("_n151936_"));
    eprintln!("SiLU-mul int4 launches {silu}, int4 lm_head launches {lm_head}");
    // Prefill: layer 0 over the prompt (GEMM), layer 1 narrowed (GEMV); one
    // per layer per decode step. lm_head: one per run.
    assert_eq!(silu, 2 + 2 * forced.len() as u64);
    assert_eq!(lm_head, 1 + forced.len() as u64);
    assert_eq!(gpu.stats().host_nodes, 0);
    let _ = std::fs::remove_dir_all(&dst);
}

/// The int4 fixture compiled for sm_80 (`qvc compile --target sm_80`): the
/// artifact keeps the int4 Linears as GPTQ parts, and its programs run them
/// with the int4 kernels (shipped in its PTX) on the emulated GPU.
#[test]
fn compiled_int4_artifact_on_the_emulated_gpu_matches_the_reference() {
    use qvc::compile::{compile, CompileOptions, SourceSpec, Target};
    let Some(dir) = fixture("tiny-qwen-vl-int4") else { return };
    let out = std::env::temp_dir().join(format!("qvc-gpu-emu-int4-artifact-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let opt = CompileOptions {
        target: Target::Gpu(qvc_codegen::Target::Sm80),
        max_seq: 64,
        image_size: None,
        force: true,
        ..Default::default()
    };
    compile(&SourceSpec::Checkpoint(dir.clone()), Some(&out), &opt, &indicatif::ProgressBar::hidden()).unwrap();
    let ptx = std::fs::read_to_string(out.join(qvc_runtime::artifact::PTX)).unwrap();
    assert!(ptx.contains(".entry q4gemm_") && ptx.contains(".entry q4gemv_"), "the artifact ships the int4 kernels");
    let m = Model::load(&out, &LoadOptions::default()).unwrap();
    let e = Expected::load(&dir);
    let ids = e.ids(&e.json["chat"]["text"]["input_ids"]);
    let forced = &e.ids(&e.json["chat"]["text"]["greedy"]["ids"])[..2];
    let gpu: GpuBackend = m.gpu_backend(Box::new(EmuDevice::new(qvc_codegen::Target::Sm80)), 1, 0).unwrap();
    gpu.start_profile();
    let g = run(&m, &gpu, &dir, &ids, forced);
    let profile = gpu.take_profile();
    let r = rel_err(&g[0], &e.f32("chat/text/last_logits"));
    eprintln!("artifact: text prefill last logits vs reference: rel err {r:.2e}");
    assert!(r < TOL, "artifact on the emulated GPU: {r:e}");
    let cpu = run(&m, &Cpu, &dir, &ids, forced);
    for (k, (x, y)) in g.iter().zip(&cpu).enumerate().skip(1) {
        let r = rel_err(x, y);
        eprintln!("artifact: decode step {k} emu vs cpu rel err {r:.2e}");
        assert!(r < TOL, "artifact decode step {k}: emu vs CPU differ by {r:e}");
    }
    let q4: u64 = profile.iter().filter(|k| k.kernel.starts_with("q4")).map(|k| k.launches).sum();
    assert_eq!(q4, 10 * (1 + forced.len() as u64), "every int4 Linear of every run on the int4 kernels");
    assert_eq!(gpu.stats().host_nodes, 0);
    let _ = std::fs::remove_dir_all(&out);
}

/// A GPTQ weight with act-order for the executor tests: `[n, k]`, groups of
/// `group`, asymmetric zeros, stored rows in a shuffled input order.
struct ActOrder {
    n: usize,
    k: usize,
    group: usize,
    qweight: Vec<u32>,
    qzeros: Vec<u32>,
    scales: Vec<half::f16>,
    perm: Vec<u32>,
    inv: Vec<u32>,
}

impl ActOrder {
    fn new(n: usize, k: usize, group: usize) -> ActOrder {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let groups = k.div_ceil(group);
        let mut perm: Vec<u32> = (0..k as u32).collect();
        for i in (1..k).rev() {
            perm.swap(i, (next() % (i as u64 + 1)) as usize);
        }
        let mut inv = vec![0u32; k];
        for (r, &c) in perm.iter().enumerate() {
            inv[c as usize] = r as u32;
        }
        ActOrder {
            n,
            k,
            group,
            qweight: (0..k / 8 * n).map(|_| next() as u32).collect(),
            qzeros: (0..groups * n / 8).map(|_| next() as u32).collect(),
            scales: (0..groups * n).map(|_| half::f16::from_f32(0.01 + (next() % 1000) as f32 * 5e-5)).collect(),
            perm,
            inv,
        }
    }
}

impl qvc_ir::WeightSource for ActOrder {
    fn weight(&self, name: &str) -> Option<qvc_ir::Elems<'_>> {
        let act_order = Some((self.perm.as_slice(), self.inv.as_slice()));
        let w = qvc_ir::Q4Ref::whole(self.n, self.k, self.group, &self.qweight, &self.qzeros, &self.scales, act_order);
        (name == "w").then_some(qvc_ir::Elems::Q4(w))
    }
}

/// `x · wᵀ` for an int4 `w` on the executor: the graph's lowering, the
/// upload of the four parts (the act-order permutation included: the
/// fixture has none) and the group size given at launch.
fn act_order_linear(m: usize, w: &ActOrder) -> Result<(Vec<f32>, Vec<f32>), qvc_ir::ExecError> {
    use qvc_runtime::gpu::lower::KvShape;
    let mut g = qvc_ir::Graph::new();
    let x = g.input("x", qvc_ir::DType::F32, vec![m, w.k]);
    let wp = g.param("w", qvc_ir::DType::Q4, vec![w.n, w.k]);
    let y = g.matmul_t(x, wp).unwrap();
    g.set_output("y", y);
    let xv: Vec<f32> = (0..m * w.k).map(|i| ((i * 7919 % 2003) as f32 / 1001.0) - 1.0).collect();
    let inputs = std::collections::HashMap::from([("x".to_string(), qvc_ir::InputRef::F32(&xv))]);
    let kv = KvShape { layers: 0, heads: 1, head_dim: 8, max_seq: 8 };
    let gpu = GpuBackend::new(Box::new(EmuDevice::new(qvc_codegen::Target::Sm80)), kv, 1, None);
    gpu.start_profile();
    let got = gpu.run(&g, w, &inputs)?.remove("y").unwrap();
    let family = if m <= 8 { "q4gemv_" } else { "q4gemm_" };
    assert!(gpu.take_profile().iter().any(|k| k.kernel.starts_with(family)), "{family} ran");
    let want = qvc_runtime::Reference.run(&g, w, &inputs).unwrap().remove("y").unwrap();
    Ok((got, want))
}

#[test]
fn act_order_weights_run_on_the_int4_kernels() {
    // Groups of 64 over K = 200: a ragged last group of 8.
    let w = ActOrder::new(48, 200, 64);
    // The GEMV dequantizes to the reference's f32 values: f32 accumulation only.
    let (got, want) = act_order_linear(3, &w).unwrap();
    let r = rel_err(&got, &want);
    eprintln!("act-order int4 GEMV vs reference: {r:.2e}");
    assert!(r < 1e-5, "GEMV: {r:e}");
    // The GEMM rounds x and the dequantized weights to bf16 (2^-8 relative at most each).
    let (got, want) = act_order_linear(20, &w).unwrap();
    let r = rel_err(&got, &want);
    eprintln!("act-order int4 GEMM vs reference: {r:.2e}");
    assert!(r < 4e-3, "GEMM: {r:e}");
}

#[test]
fn a_group_size_the_kernels_cannot_take_is_refused_by_name() {
    let w = ActOrder { group: 12, ..ActOrder::new(16, 48, 12) };
    let e = act_order_linear(2, &w).unwrap_err().to_string();
    assert!(e.contains("\"w\"") && e.contains("group size 12"), "{e}");
}
