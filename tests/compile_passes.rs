//! The general passes (`Canonicalize`, weight folding `ConstFold`, `Cse`,
//! `Dce`) on the fixture checkpoint's real programs: the vision program
//! (global and window attention, with every intermediate as an output) and a
//! decoder prefill. Each rewritten program must compute the same outputs as
//! the uncompiled one on the CPU backend, reading its repacked weights
//! through `WithFolded` over the original checkpoint.

mod common;
use common::{check, fixtures};
use qvc_ir::passes::{run_pipeline, verify, Canonicalize, ConstFold, Cse, Dce, FoldedData, WithFolded};
use qvc_ir::{DType, Graph, InputRef, Op, Shape};
use qvc_model::graphs::{decoder_graph, logn_scales, rope_tables, DecoderShape, VisionOptions, VitAttention};
use qvc_model::{LoadOptions, Model};
use qvc_runtime::{Backend, Cpu};
use std::collections::HashMap;

/// Runs the general pipeline; returns the rewritten graph and its folded weights.
fn compile(m: &Model, g: &Graph) -> (Graph, Vec<qvc_ir::passes::FoldedParam>) {
    let mut out = g.clone();
    let fold = ConstFold::with_weights(&m.weights);
    let stats = run_pipeline(&mut out, &[&Canonicalize, &fold, &Cse, &Dce]).unwrap();
    for s in &stats {
        eprintln!("{:>13}: {:>4} rewrites, {} → {} nodes", s.pass, s.rewrites, s.nodes_before, s.nodes_after);
    }
    verify(&out).unwrap();
    (out, fold.take_folded())
}

fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

fn compare(
    m: &Model,
    before: &Graph,
    after: &Graph,
    folded: &[qvc_ir::passes::FoldedParam],
    inputs: &qvc_runtime::Inputs,
) {
    let want = Cpu.run(before, &m.weights, inputs).unwrap();
    let got = Cpu.run(after, &WithFolded::new(&m.weights, folded), inputs).unwrap();
    assert_eq!(want.len(), got.len());
    let mut names: Vec<&String> = want.keys().collect();
    names.sort();
    for name in names {
        check(name, &got[name], &want[name], 1e-5);
    }
}

#[test]
fn general_passes_keep_the_vision_program() {
    let Some(dir) = fixtures() else { return };
    let window = VitAttention::Window { window: 8, global_every: 2 };
    for (image_size, attention) in [(None, VitAttention::Global), (None, window), (Some(896), VitAttention::Global)] {
        let m = Model::load(&dir, &LoadOptions { image_size, ..Default::default() }).unwrap();
        let v = &m.config.visual;
        let (t, heads, hd) = (v.grid() * v.grid(), v.heads, v.head_dim());
        let px = pseudo_random(3 * v.image_size * v.image_size, 1);
        let inputs = HashMap::from([("pixels".to_string(), InputRef::F32(&px))]);
        let before = m.vision_graph(&VisionOptions { intermediates: true, attention }).unwrap();
        let (after, folded) = compile(&m, &before);
        assert!(!after.nodes.iter().any(|n| matches!(n.op, Op::Conv2dPatch { .. })), "conv left");
        let interleaved = Op::Reshape(Shape(vec![t, heads, 3 * hd]));
        assert!(!after.nodes.iter().any(|n| n.op == interleaved), "interleaved qkv left");
        // Every in_proj weight and bias, the conv kernel and the adapter's
        // six slices of its packed in_proj are repacked; their originals are gone.
        assert_eq!(folded.len(), 2 * v.layers + 1 + 6, "{:?}", folded.iter().map(|f| &f.name).collect::<Vec<_>>());
        let params: Vec<&str> = after.params().iter().map(|(n, _)| *n).collect();
        assert!(!params.iter().any(|n| n.contains("in_proj") || n.contains("conv1")), "{params:?}");
        // No layout op is left on a weight.
        for n in &after.nodes {
            if matches!(n.op, Op::Reshape(_) | Op::Permute(_) | Op::Slice { .. }) {
                assert!(!matches!(after.node(n.inputs[0]).op, Op::Param(_)), "{} on a param", n.op.name());
            }
        }
        // Layout-only repacks of bf16 weights stay bf16.
        let stored = m.weights.info("transformer.visual.conv1.weight").unwrap().0;
        let conv = folded.iter().find(|f| f.ty.shape.0 == [v.width, 3 * v.patch_size * v.patch_size]).unwrap();
        assert_eq!(conv.ty.dtype, stored);
        if stored == DType::BF16 {
            assert!(matches!(conv.data, FoldedData::BF16(_)));
        }
        eprintln!(
            "{} px, {attention}: {} → {} nodes, {} folded weights",
            v.image_size,
            before.nodes.len(),
            after.nodes.len(),
            folded.len()
        );
        compare(&m, &before, &after, &folded, &inputs);
    }
}

#[test]
fn general_passes_keep_the_decoder_prefill() {
    let Some(dir) = fixtures() else { return };
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let cfg = &m.config;
    let tokens = 7;
    let shape = DecoderShape { tokens, all_logits: true, ..Default::default() };
    let before = decoder_graph(cfg, &m.weights, &shape).unwrap();
    let (after, folded) = compile(&m, &before);
    // Nothing in the decoder is a layout op on a weight, and nothing is repeated.
    assert!(folded.is_empty(), "{:?}", folded.iter().map(|f| &f.name).collect::<Vec<_>>());
    assert!(after.nodes.len() <= before.nodes.len());
    let ids: Vec<i32> = (0..tokens as i32).map(|i| 100 + 37 * i).collect();
    let (cos, sin) = rope_tables(cfg, 1.0, 0, tokens);
    let logn = logn_scales(cfg, 0, tokens);
    let inputs = HashMap::from([
        ("ids".to_string(), InputRef::I32(&ids)),
        ("rope_cos".to_string(), InputRef::F32(&cos)),
        ("rope_sin".to_string(), InputRef::F32(&sin)),
        ("logn".to_string(), InputRef::F32(&logn)),
    ]);
    compare(&m, &before, &after, &folded, &inputs);
}
