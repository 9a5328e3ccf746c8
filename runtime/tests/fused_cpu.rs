//! The CPU backend's native fused kernels (Linear with its epilogues, AddNorm,
//! QkvRotary, window attention) against the reference interpreter, which
//! runs each fused node's primitive expansion in f64, and against the
//! unfused subgraph the fusion pass replaced. Random shapes (ragged ones
//! included), bf16 weights read in place as checkpoints store them.

mod common;
use common::*;

use half::bf16;
use proptest::prelude::*;
use qvc_ir::passes::{Fuse, Pass};
use qvc_ir::{Act, DType, Graph, InputRef, Mask, Op};
use qvc_runtime::{Backend, Cpu, Reference};
use std::collections::HashMap;

/// Random data for every input and param of `g`: params as bf16 (norm
/// weights near 1), `logn` positive.
fn data(g: &Graph, seed: u64) -> (W, HashMap<String, Vec<f32>>) {
    let mut w = HashMap::new();
    for (i, (name, ty)) in g.params().iter().enumerate() {
        let mut v = vals(ty.shape.numel(), seed * 17 + i as u64);
        if name.starts_with("norm") {
            v.iter_mut().for_each(|x| *x = 1.0 + 0.2 * *x);
        }
        w.insert(name.to_string(), v.into_iter().map(bf16::from_f32).collect());
    }
    let mut ins = HashMap::new();
    for (i, (name, ty)) in g.inputs().iter().enumerate() {
        let mut v = vals(ty.shape.numel(), seed * 31 + 1000 + i as u64);
        if *name == "logn" {
            v.iter_mut().for_each(|x| *x = 1.0 + 0.5 * x.abs());
        }
        ins.insert(name.to_string(), v);
    }
    (W(w), ins)
}

/// Fuses `g`, checks that exactly the node `want` was made, and compares the
/// CPU backend on the fused graph with the reference on the fused graph (its
/// expansion) and on the unfused one.
fn native_agrees(g: &Graph, want: &Op, seed: u64) {
    let mut f = g.clone();
    assert_eq!(Fuse.run(&mut f).unwrap(), 1, "one fused node expected:\n{f}");
    let made: Vec<&Op> = f.nodes.iter().map(|n| &n.op).filter(|op| op.is_fused()).collect();
    assert_eq!(made, vec![want], "\n{f}");
    run_both(&f, Some(g), seed);
}

fn run_both(f: &Graph, unfused: Option<&Graph>, seed: u64) {
    let (w, inputs) = data(f, seed);
    let ins: HashMap<String, InputRef> = inputs.iter().map(|(k, v)| (k.clone(), InputRef::F32(v))).collect();
    let got = Cpu.run(f, &w, &ins).unwrap();
    let mut refs = vec![("fused", Reference.run(f, &w, &ins).unwrap())];
    if let Some(u) = unfused {
        refs.push(("unfused", Reference.run(u, &w, &ins).unwrap()));
    }
    for (what, want) in refs {
        for (name, v) in &want {
            let r = rel(&got[name], v);
            assert!(r < 1e-5, "{name} vs the reference on the {what} graph: relative error {r:e}\n{f}");
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn linear_case(
    batch: Option<usize>,
    m: usize,
    k: usize,
    n: usize,
    bias: bool,
    act: Act,
    residual: bool,
) -> (Graph, Op) {
    let mut g = Graph::new();
    let (mut xs, mut os) = (vec![m, k], vec![m, n]);
    if let Some(b) = batch {
        xs.insert(0, b);
        os.insert(0, b);
    }
    let x = g.input("x", DType::F32, xs);
    let w = g.param("w", DType::BF16, vec![n, k]);
    let mut y = g.matmul_t(x, w).unwrap();
    if act == Act::SiluMul {
        let w2 = g.param("w2", DType::BF16, vec![n, k]);
        let gate = g.matmul_t(x, w2).unwrap();
        let s = g.silu(gate).unwrap();
        y = g.mul(y, s).unwrap();
    }
    if bias {
        let b = g.param("b", DType::BF16, vec![n]);
        y = g.add(y, b).unwrap();
    }
    if act == Act::Gelu {
        y = g.gelu(y).unwrap();
    }
    if residual {
        let r = g.input("r", DType::F32, os);
        y = g.add(r, y).unwrap();
    }
    g.set_output("y", y);
    (g, Op::Linear { bias, act, residual })
}

fn add_norm_case(a_shape: Vec<usize>, b_shape: Vec<usize>, rms: bool) -> (Graph, Op) {
    let mut g = Graph::new();
    let c = *a_shape.last().unwrap();
    let a = g.input("a", DType::F32, a_shape);
    // A broadcast second operand from the checkpoint (a position table).
    let b = g.param("pos", DType::BF16, b_shape);
    let w = g.param("norm.w", DType::BF16, vec![c]);
    let s = g.add(a, b).unwrap();
    let y = if rms {
        g.rms_norm(s, w, 1e-6).unwrap()
    } else {
        let bb = g.param("norm.b", DType::BF16, vec![c]);
        g.layer_norm(s, w, bb, 1e-5).unwrap()
    };
    g.set_output("y", y);
    (g, Op::AddNorm { rms, eps: if rms { 1e-6 } else { 1e-5 } })
}

fn qkv_case(t: usize, heads: usize, d: usize, before: usize, after: usize, logn: bool) -> (Graph, Op) {
    let mut g = Graph::new();
    let qkv = g.input("qkv", DType::F32, vec![t, before + heads * d + after]);
    let cos = g.input("cos", DType::F32, vec![t, d]);
    let sin = g.input("sin", DType::F32, vec![t, d]);
    let s = g.slice(qkv, 1, before, before + heads * d).unwrap();
    let r = g.reshape(s, vec![t, heads, d]).unwrap();
    let mut y = g.rotary(r, cos, sin).unwrap();
    if logn {
        let l = g.input("logn", DType::F32, vec![t, 1, 1]);
        y = g.mul(y, l).unwrap();
    }
    g.set_output("y", y);
    (g, Op::QkvRotary { offset: before, heads, logn })
}

fn window_case(gh: usize, gw: usize, win: usize, heads: usize, d: usize) -> Graph {
    let mut g = Graph::new();
    let t = gh * gw;
    let q = g.input("q", DType::F32, vec![t, heads, d]);
    let k = g.input("k", DType::F32, vec![t, heads, d]);
    let v = g.input("v", DType::F32, vec![t, heads, d]);
    let mask = Mask::Window { grid_h: gh, grid_w: gw, window: win };
    let y = g.attention(q, k, v, mask, 1.0 / (d as f32).sqrt()).unwrap();
    g.set_output("y", y);
    g
}

#[test]
fn every_linear_variant_runs_natively() {
    for act in [Act::None, Act::Gelu, Act::SiluMul] {
        for bias in [false, true] {
            for residual in [false, true] {
                let (g, want) = linear_case(Some(2), 7, 19, 13, bias, act, residual);
                native_agrees(&g, &want, 1);
            }
        }
    }
}

#[test]
fn window_attention_on_a_ragged_grid_runs_natively() {
    // 5×7 in windows of 3: 2×3 windows, the edge ones 2 rows or 1 column wide.
    run_both(&window_case(5, 7, 3, 2, 8), None, 2);
    run_both(&window_case(14, 14, 4, 3, 16), None, 3);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn linear_native_matches_reference(
        batch in prop::option::of(1usize..3), m in 1usize..12, k in 1usize..40, n in 1usize..40,
        bias: bool, act in 0usize..3, residual: bool, seed in 0u64..1000,
    ) {
        let act = [Act::None, Act::Gelu, Act::SiluMul][act];
        let (g, want) = linear_case(batch, m, k, n, bias, act, residual);
        native_agrees(&g, &want, seed);
    }

    #[test]
    fn add_norm_native_matches_reference(
        rows in 1usize..8, cols in 1usize..40, rms: bool, bcast in 0u8..4, seed in 0u64..1000,
    ) {
        let (a, b) = match bcast {
            0 => (vec![rows, cols], vec![rows, cols]),
            1 => (vec![rows, cols], vec![cols]),
            2 => (vec![rows, cols], vec![rows, 1]),
            _ => (vec![2, rows, cols], vec![1, cols]),
        };
        let (g, want) = add_norm_case(a, b, rms);
        native_agrees(&g, &want, seed);
    }

    #[test]
    fn qkv_rotary_native_matches_reference(
        t in 1usize..9, heads in 1usize..5, half in 1usize..9, before in 0usize..20, after in 0usize..20,
        logn: bool, seed in 0u64..1000,
    ) {
        let (g, want) = qkv_case(t, heads, 2 * half, before, after, logn);
        native_agrees(&g, &want, seed);
    }

    #[test]
    fn window_attention_native_matches_reference(
        gh in 1usize..9, gw in 1usize..9, win in 1usize..6, heads in 1usize..4, d in 1usize..20, seed in 0u64..1000,
    ) {
        run_both(&window_case(gh, gw, win, heads, d), None, seed);
    }
}
