//! The whole model on two backends: the fast CPU backend and the naive
//! reference interpreter must agree on the vision program, a prefill and
//! decode steps through the KV cache. Runs on the demo checkpoint (random
//! weights, written to a temp dir), so it needs no fixtures.

mod common;
use common::rel_err as rel;
use qvc_model::chat::{format_query, make_context, DEFAULT_SYSTEM};
use qvc_model::{LoadOptions, Model, PrefillOptions, Session};
use qvc_runtime::{Cpu, Reference};

#[test]
fn cpu_backend_agrees_with_reference_interpreter_on_the_model() {
    let dir = std::env::temp_dir().join(format!("qvc-backends-{}", std::process::id()));
    qvc::demo::write_checkpoint(&dir).unwrap();
    let model = Model::load(&dir, &LoadOptions::default()).unwrap();
    let pic = dir.join("demo.png").to_str().unwrap().to_string();
    let query = format_query(&[pic], "Where is the red square?");
    let ids = make_context(&model.tokenizer, DEFAULT_SYSTEM, &[], &query, 6144).unwrap();
    let (cpu, reference) = (Cpu, Reference);
    let mut a = Session::new(&model, &cpu);
    let mut b = Session::new(&model, &reference);
    let opt = PrefillOptions { all_logits: true, hidden: true };
    let (pa, pb) = (a.prefill(&ids, &opt).unwrap(), b.prefill(&ids, &opt).unwrap());
    let r = rel(&pa.logits, &pb.logits);
    eprintln!("prefill logits ({} positions): rel err {r:.2e}", ids.len());
    assert!(r < 1e-5, "prefill logits differ: {r:e}");
    for (name, v) in &pb.hidden {
        let r = rel(&pa.hidden[name], v);
        assert!(r < 1e-5, "{name} differs: {r:e}");
    }
    for t in [5u32, 77, 300] {
        let (la, lb) = (a.step(t).unwrap(), b.step(t).unwrap());
        let r = rel(&la, &lb);
        eprintln!("decode step after {t}: rel err {r:.2e}");
        assert!(r < 1e-5, "decode logits differ: {r:e}");
    }
    assert_eq!(a.cached_tokens(), ids.len() + 3);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A checkpoint stored in f32 or f16 loads and runs like the bf16 one: f32
/// holds every bf16 value exactly, so its logits are identical, bit for
/// bit where the same kernels multiply both. On AMX the exact GEMMs of
/// bf16 weights run on the tiles (A split in three bf16, sums in another
/// order) and f32 weights on the FMAs: the same values to f32 rounding.
#[test]
fn f32_and_f16_checkpoints_run() {
    let dir = std::env::temp_dir().join(format!("qvc-dtypes-{}", std::process::id()));
    qvc::demo::write_checkpoint(&dir).unwrap();
    let ids: Vec<u32> = (0..40).map(|i| 20 + i * 3).collect();
    let logits = |d: &std::path::Path| {
        let m = Model::load(d, &LoadOptions::default()).unwrap();
        let cpu = Cpu;
        let mut s = Session::new(&m, &cpu);
        s.prefill(&ids, &PrefillOptions::default()).unwrap().logits
    };
    let base = logits(&dir);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f32_tol = if qvc_kernels::gemm::exact_on_tiles() { 1e-5 } else { 0.0 };
    for (dtype, tol) in [(safetensors::Dtype::F32, f32_tol), (safetensors::Dtype::F16, 1e-2)] {
        let conv: Vec<(String, Vec<usize>, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(n, t)| {
                let vals = t.data().chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32());
                let data: Vec<u8> = match dtype {
                    safetensors::Dtype::F32 => vals.flat_map(f32::to_le_bytes).collect(),
                    _ => vals.flat_map(|v| half::f16::from_f32(v).to_le_bytes()).collect(),
                };
                (n, t.shape().to_vec(), data)
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = conv
            .iter()
            .map(|(n, s, d)| (n.clone(), safetensors::tensor::TensorView::new(dtype, s.clone(), d).unwrap()))
            .collect();
        safetensors::tensor::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
        let r = rel(&logits(&dir), &base);
        eprintln!("{dtype:?} checkpoint: rel err vs bf16 {r:.2e}");
        assert!(r <= tol, "{dtype:?}: {r:e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Streaming hands out the final text piece by piece, never a broken
/// character, and sampling with a seed is reproducible.
#[test]
fn streamed_text_adds_up_and_seeds_reproduce() {
    use qvc_model::sampling::SamplingParams;
    use qvc_model::{generate, GenerateOptions};
    let dir = std::env::temp_dir().join(format!("qvc-stream-{}", std::process::id()));
    qvc::demo::write_checkpoint(&dir).unwrap();
    let model = Model::load(&dir, &LoadOptions::default()).unwrap();
    let ids = make_context(&model.tokenizer, DEFAULT_SYSTEM, &[], "你好！Tell me a story.", 6144).unwrap();
    let cpu = Cpu;
    let run = |seed| {
        let mut s = Session::new(&model, &cpu);
        let sampling = SamplingParams { temperature: 1.0, top_p: 0.9, top_k: 50, repetition_penalty: 1.1, seed };
        let opt = GenerateOptions { max_new_tokens: 40, sampling, stop_ids: vec![] };
        let mut pieces = Vec::new();
        let g = generate(&mut s, &ids, &opt, &mut |t| pieces.push(t.to_string())).unwrap();
        (g, pieces)
    };
    let (g1, pieces) = run(11);
    assert_eq!(g1.tokens.len(), 40);
    assert_eq!(pieces.concat(), g1.text);
    assert_eq!(g1.text, model.tokenizer.decode(&g1.tokens, false));
    assert_eq!(run(11).0.tokens, g1.tokens);
    assert_ne!(run(12).0.tokens, g1.tokens);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Shapes the fixture does not cover: an adapter with two heads (output_dim
/// 256), a ViT head size that is not a power of two (width 78, 3 heads of
/// 26), an odd MLP width. Both backends must still agree.
#[test]
fn other_shapes_agree_across_backends() {
    let dir = std::env::temp_dir().join(format!("qvc-shapes-{}", std::process::id()));
    qvc::demo::write_checkpoint_with(&dir, |v| {
        v["hidden_size"] = serde_json::json!(256);
        v["num_attention_heads"] = serde_json::json!(8);
        v["intermediate_size"] = serde_json::json!(398);
        v["visual"]["width"] = serde_json::json!(78);
        v["visual"]["heads"] = serde_json::json!(3);
        v["visual"]["layers"] = serde_json::json!(1);
        v["visual"]["output_dim"] = serde_json::json!(256);
    })
    .unwrap();
    let model = Model::load(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(model.config.visual.pool_heads(), 2);
    let pic = dir.join("demo.png").to_str().unwrap().to_string();
    let ids = make_context(&model.tokenizer, DEFAULT_SYSTEM, &[], &format_query(&[pic], "Hi"), 6144).unwrap();
    let (cpu, reference) = (Cpu, Reference);
    let mut a = Session::new(&model, &cpu);
    let mut b = Session::new(&model, &reference);
    let (la, lb) =
        (a.prefill(&ids, &PrefillOptions::default()).unwrap(), b.prefill(&ids, &PrefillOptions::default()).unwrap());
    let r = rel(&la.logits, &lb.logits);
    assert!(r < 1e-5, "prefill: {r:e}");
    let r = rel(&a.step(9).unwrap(), &b.step(9).unwrap());
    assert!(r < 1e-5, "decode: {r:e}");
    let _ = std::fs::remove_dir_all(&dir);
}
