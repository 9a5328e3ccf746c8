//! The fusion pass on the fixture model's programs (`../shared/fixtures/tiny-qwen-vl`):
//! the vision tower (global and window attention), a decoder prefill and a
//! decode step. Checks that the expected fused nodes appear, layer by layer
//! (4 Linears per ViT block; per decoder layer the QKV Linear, q and k
//! QkvRotary, SwiGLU and two residual Linears), and that the fused programs
//! give the same outputs as the unfused ones on the CPU backend (relative
//! error below 1e-5), the window one also against the reference interpreter.

mod common;
use common::{fixtures, rel_err, Expected};
use qvc_ir::passes::{fusion_stats, run_pipeline, Canonicalize, Fuse, FusionStats, Pass};
use qvc_ir::{Graph, InputRef};
use qvc_model::graphs::{decoder_graph, logn_scales, rope_tables, DecoderShape, VisionOptions, VitAttention};
use qvc_model::{LoadOptions, Model};
use qvc_runtime::{Backend, Cpu, Inputs, Reference};
use std::collections::HashMap;

const TOL: f64 = 1e-5;

fn fuse(g: &Graph, what: &str) -> (Graph, FusionStats, FusionStats) {
    let mut f = g.clone();
    let n = Fuse.run(&mut f).unwrap();
    let (before, after) = (fusion_stats(g), fusion_stats(&f));
    eprintln!(
        "{what}: {n} rewrites; nodes {} → {}; fused {} → {}, unfused compute {} → {}\n  {:?}",
        g.nodes.len(),
        f.nodes.len(),
        before.fused,
        after.fused,
        before.unfused_compute,
        after.unfused_compute,
        after.by_kind
    );
    (f, before, after)
}

fn kind(s: &FusionStats, k: &str) -> usize {
    s.by_kind.get(k).copied().unwrap_or(0)
}

/// All Linear nodes, whatever their epilogue.
fn linears(s: &FusionStats) -> usize {
    s.by_kind.iter().filter(|(k, _)| k.starts_with("linear")).map(|(_, n)| n).sum()
}

fn same_outputs(what: &str, got: &HashMap<String, Vec<f32>>, want: &HashMap<String, Vec<f32>>) {
    assert_eq!(got.len(), want.len());
    let mut worst = 0f64;
    for (name, w) in want {
        let r = rel_err(&got[name], w);
        assert!(r < TOL, "{what}/{name}: relative error {r:e}");
        worst = worst.max(r);
    }
    eprintln!("{what}: largest relative error over {} outputs {worst:.2e}", want.len());
}

#[test]
fn vision_tower_fuses_and_matches_unfused() {
    let Some(dir) = fixtures() else { return };
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let px = Expected::load(&dir).f32("pixels/shapes.png");
    let inputs: Inputs = HashMap::from([("pixels".to_string(), InputRef::F32(&px))]);
    let layers = m.config.visual.layers;
    for (name, attention) in
        [("global", VitAttention::Global), ("window", VitAttention::Window { window: 5, global_every: 2 })]
    {
        let opt = VisionOptions { attention, intermediates: true };
        let g = m.vision_graph(&opt).unwrap();
        let (f, before, after) = fuse(&g, &format!("vision ({name})"));
        // Per block: in_proj (+bias), out_proj (+bias+residual), c_fc
        // (+bias+gelu), c_proj (+bias+residual); the adapter: kv_proj, the
        // three in_proj slices (+bias) and out_proj (+bias).
        assert_eq!(kind(&after, "linear+bias+gelu"), layers);
        assert_eq!(kind(&after, "linear+bias+residual"), 2 * layers);
        assert_eq!(kind(&after, "linear+bias"), layers + 4);
        assert_eq!(kind(&after, "linear"), 1);
        assert_eq!(linears(&after), 4 * layers + 5);
        // ln_pre reads patch embedding + position table, which nothing else reads.
        assert_eq!(kind(&after, "add_layer_norm"), 1);
        assert_eq!(kind(&after, "attention.cross"), 1);
        let windowed = (0..layers).filter(|j| (j + 1) % 2 != 0).count();
        assert_eq!(kind(&after, "attention.window"), if name == "window" { windowed } else { 0 });
        assert_eq!(kind(&after, "attention.global"), if name == "window" { layers - windowed } else { layers });
        assert!(after.fused > before.fused && after.unfused_compute < before.unfused_compute);
        let got = Cpu.run(&f, &m.weights, &inputs).unwrap();
        same_outputs(
            &format!("vision {name} fused vs unfused (cpu)"),
            &got,
            &Cpu.run(&g, &m.weights, &inputs).unwrap(),
        );
        if name == "window" {
            // The native window kernel against the primitive definition.
            let want = Reference.run(&g, &m.weights, &inputs).unwrap();
            same_outputs("vision window fused (cpu) vs reference", &got, &want);
        }
    }
}

#[test]
fn decoder_prefill_and_decode_fuse_and_match_unfused() {
    let Some(dir) = fixtures() else { return };
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let cfg = &m.config;
    let layers = cfg.layers;
    let (t, past) = (23, 7);
    for (what, shape) in [
        ("prefill", DecoderShape { tokens: t, all_logits: true, hidden: false, ..Default::default() }),
        ("decode", DecoderShape { tokens: 1, past, ..Default::default() }),
    ] {
        let g = decoder_graph(cfg, &m.weights, &shape).unwrap();
        let (f, _, after) = fuse(&g, what);
        assert_eq!(kind(&after, "linear+bias"), layers, "c_attn");
        assert_eq!(kind(&after, "linear+silu_mul"), layers, "SwiGLU");
        assert_eq!(kind(&after, "linear+residual"), 2 * layers, "c_proj of attention and MLP");
        assert_eq!(kind(&after, "linear"), 1, "lm_head");
        let logn = usize::from(cfg.use_logn_attn);
        assert_eq!(kind(&after, "qkv_rotary+logn"), layers * logn, "q");
        assert_eq!(kind(&after, "qkv_rotary"), layers * (2 - logn), "k (and q without logn)");
        let att = if shape.past > 0 { "attention.decode" } else { "attention.causal" };
        assert_eq!(kind(&after, att), layers);
        // Inputs: ids, rotary tables for positions past.., logn, a random cache.
        let n = shape.tokens;
        let ids: Vec<i32> = (0..n as i32).map(|i| 100 + 37 * i).collect();
        let (cos, sin) = rope_tables(cfg, 1.0, shape.past, n);
        let ln = logn_scales(cfg, shape.past, n);
        let cache: Vec<Vec<f32>> = (0..2 * layers)
            .map(|i| {
                (0..past * cfg.heads * cfg.head_dim).map(|j| ((j * 7 + i * 13) % 17) as f32 / 17.0 - 0.5).collect()
            })
            .collect();
        let mut inputs: Inputs = HashMap::from([
            ("ids".to_string(), InputRef::I32(&ids)),
            ("rope_cos".to_string(), InputRef::F32(&cos)),
            ("rope_sin".to_string(), InputRef::F32(&sin)),
            ("logn".to_string(), InputRef::F32(&ln)),
        ]);
        if shape.past > 0 {
            for i in 0..layers {
                inputs.insert(format!("past_k.{i}"), InputRef::F32(&cache[2 * i]));
                inputs.insert(format!("past_v.{i}"), InputRef::F32(&cache[2 * i + 1]));
            }
        }
        let got = Cpu.run(&f, &m.weights, &inputs).unwrap();
        let want = Cpu.run(&g, &m.weights, &inputs).unwrap();
        same_outputs(&format!("decoder {what} fused vs unfused (cpu)"), &got, &want);
    }
}

/// In `qvc compile` fusion runs after canonicalisation (conv as GEMM, the
/// ViT's interleaved QKV made contiguous): the same Linears still form, the
/// patch GEMM becomes one more (its position-table add as the residual), and
/// the outputs do not change.
#[test]
fn vision_tower_fuses_after_canonicalisation() {
    let Some(dir) = fixtures() else { return };
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let px = Expected::load(&dir).f32("pixels/shapes.png");
    let inputs: Inputs = HashMap::from([("pixels".to_string(), InputRef::F32(&px))]);
    let layers = m.config.visual.layers;
    let g = m.vision_graph(&VisionOptions::default()).unwrap();
    let mut f = g.clone();
    let stats = run_pipeline(&mut f, &[&Canonicalize, &Fuse]).unwrap();
    let s = fusion_stats(&f);
    eprintln!(
        "vision, canonicalised then fused: {stats:?}\n  fused {}, unfused compute {}\n  {:?}",
        s.fused, s.unfused_compute, s.by_kind
    );
    assert_eq!(kind(&s, "linear+bias+gelu"), layers);
    assert_eq!(kind(&s, "linear+bias+residual"), 2 * layers);
    assert_eq!(kind(&s, "conv2d_patch"), 0);
    assert_eq!(linears(&s), 4 * layers + 6);
    let got = Cpu.run(&f, &m.weights, &inputs).unwrap();
    same_outputs("vision canonicalised+fused vs unfused (cpu)", &got, &Cpu.run(&g, &m.weights, &inputs).unwrap());
}
