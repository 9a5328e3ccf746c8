//! Memory plans of the real programs: the vision tower, a 300-token prefill
//! with an image and a decode step over a 300-token cache, for the tiny
//! fixture checkpoint and for the full-size Qwen-VL-Chat shapes. Every plan
//! must pass `MemoryPlan::check` and sit between its lower bound (peak
//! live bytes) and the no-reuse size; the figures are printed
//! (`cargo test --release --test plan_model -- --nocapture`).
//!
//! The full-size graphs need only tensor shapes, not weights: they are built
//! against a sparse safetensors file whose header lists every tensor of the
//! full model (bf16, 19 GB of holes that take no disk space and are never
//! read).

mod common;
use qvc_ir::passes::{run_pipeline, Dce, Fuse};
use qvc_ir::plan::{kv_cache_bytes, plan_memory, PlanOptions};
use qvc_ir::{DType, Graph};
use qvc_model::graphs::{decoder_graph, vision_graph, DecoderShape, VisionOptions};
use qvc_model::{Config, LoadOptions, Model};
use qvc_runtime::WeightStore;
use std::path::{Path, PathBuf};

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// Plans `g` as built and after fusion (what `qvc compile` plans).
fn plan_both(name: &str, g: &Graph) {
    plan_and_report(name, g);
    let mut f = g.clone();
    run_pipeline(&mut f, &[&Fuse, &Dce]).unwrap_or_else(|e| panic!("{name}: fusion failed: {e}"));
    plan_and_report(&format!("{name} (fused)"), &f);
}

fn plan_and_report(name: &str, g: &Graph) {
    let p = plan_memory(g, &PlanOptions::default());
    p.check(g).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(p.peak_bytes <= p.arena_bytes && p.arena_bytes <= p.naive_bytes, "{name}: {p}");
    // First-fit and greedy-by-size land close to the lower bound on these graphs.
    assert!(p.arena_bytes as f64 <= 1.25 * p.peak_bytes as f64, "{name}: arena far above peak: {p}");
    let no_reuse = plan_memory(g, &PlanOptions { reuse: false, ..PlanOptions::default() });
    no_reuse.check(g).unwrap_or_else(|e| panic!("{name} without reuse: {e}"));
    // Blocks run one after another: reusing their buffers must pay.
    assert!(p.arena_bytes < no_reuse.arena_bytes, "{name}: reuse did not pay: {p}");
    eprintln!(
        "{name:<28} {:>5} nodes  naive {:>9.2} MiB  no-reuse {:>9.2} MiB  peak {:>8.2} MiB  arena {:>8.2} MiB  \
         arena/peak {:.3}  {} in place, {} views, {:?}",
        g.nodes.len(),
        mib(p.naive_bytes),
        mib(no_reuse.arena_bytes),
        mib(p.peak_bytes),
        mib(p.arena_bytes),
        p.arena_bytes as f64 / p.peak_bytes as f64,
        p.in_place,
        p.views,
        p.strategy,
    );
}

/// Plans the three programs: vision at the config's image size, a prefill
/// of 300 tokens (256 of them image rows), a decode step at past 300.
fn plan_programs(label: &str, cfg: &Config, w: &WeightStore, vit_pos: Vec<f32>, pool_pos_k: Vec<f32>) {
    let size = cfg.visual.image_size;
    let vision = vision_graph(cfg, w, vit_pos, pool_pos_k, &VisionOptions::default()).unwrap();
    plan_both(&format!("{label} vision@{size}"), &vision);
    let prefill = DecoderShape { tokens: 300, image_rows: 256, ..Default::default() };
    plan_both(&format!("{label} prefill 300"), &decoder_graph(cfg, w, &prefill).unwrap());
    let decode = DecoderShape { tokens: 1, past: 300, ..Default::default() };
    plan_both(&format!("{label} decode @300"), &decoder_graph(cfg, w, &decode).unwrap());
    for (seq, dtype) in [(2048, DType::BF16), (2048, DType::F32)] {
        let kv = kv_cache_bytes(cfg.layers, cfg.heads, cfg.head_dim, seq, 1, dtype);
        eprintln!("{label} KV cache, --max-seq {seq}, {dtype}: {:.2} MiB", mib(kv));
    }
}

#[test]
fn plans_of_the_fixture_programs() {
    let Some(dir) = common::fixtures() else { return };
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    plan_programs("tiny", &m.config, &m.weights, m.vit_pos_embed().to_vec(), m.pool_pos_embed().to_vec());
}

/// Qwen-VL-Chat's `config.json` values (QWEN-VL.md §1).
fn full_size_config(image_size: usize) -> Config {
    let v = serde_json::json!({
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "kv_channels": 128,
        "intermediate_size": 22016, "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "rotary_pct": 1.0,
        "seq_length": 2048, "use_dynamic_ntk": true, "use_logn_attn": true, "vocab_size": 151936,
        "visual": { "width": 1664, "layers": 48, "heads": 16, "mlp_ratio": 4.9231, "patch_size": 14,
                    "image_size": image_size, "output_dim": 4096, "image_start_id": 151857 }
    });
    Config::from_json(&v, Path::new("qwen-vl-chat/config.json")).unwrap()
}

/// A safetensors file listing every tensor `cfg` implies, as bf16, with no
/// data written: the file is sparse, so it costs no disk and no reads.
fn shape_only_checkpoint(cfg: &Config, path: &PathBuf) -> WeightStore {
    let mut header = serde_json::Map::new();
    let mut at = 0usize;
    for (name, shape) in cfg.expected_tensors() {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(name, serde_json::json!({ "dtype": "BF16", "shape": shape, "data_offsets": [at, at + bytes] }));
        at += bytes;
    }
    let mut text = serde_json::Value::Object(header).to_string().into_bytes();
    // Pad so the data starts 8-aligned and every bf16 tensor is mapped in place.
    text.resize(text.len().div_ceil(8) * 8, b' ');
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend(text);
    std::fs::write(path, &bytes).unwrap();
    std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len((bytes.len() + at) as u64).unwrap();
    let store = WeightStore::open(path).unwrap();
    cfg.validate(&store).unwrap();
    store
}

/// Removes the sparse checkpoint even when an assertion fails.
struct Remove(PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn plans_of_the_full_size_programs() {
    let path = std::env::temp_dir().join(format!("qvc-plan-full-{}.safetensors", std::process::id()));
    let _cleanup = Remove(path.clone());
    for size in [448, 896] {
        let cfg = full_size_config(size);
        let store = shape_only_checkpoint(&cfg, &path);
        let t = cfg.visual.grid() * cfg.visual.grid();
        // The position tables are folded constants: their values do not
        // matter to the plan, only their shapes.
        let (vit_pos, pool_pos_k) = (vec![0f32; t * cfg.visual.width], vec![0f32; t * cfg.visual.output_dim]);
        if size == 448 {
            plan_programs("full", &cfg, &store, vit_pos, pool_pos_k);
        } else {
            let g = vision_graph(&cfg, &store, vit_pos, pool_pos_k, &VisionOptions::default()).unwrap();
            plan_both(&format!("full vision@{size}"), &g);
        }
    }
}
