//! The fusion pass: before/after tests on small graphs (each pattern fires,
//! and does not fire when an intermediate has another reader or is an
//! output), and property tests that every fused node agrees with its
//! expansion and with the unfused subgraph it replaced, on random shapes.

use proptest::prelude::*;
use qvc_ir::passes::{fusion_stats, verify, Fuse, Pass};
use qvc_ir::{expand, run_reference, Act, DType, Graph, InputRef, Mask, NodeId, Op};
use std::collections::HashMap;

fn vals(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// ‖a − b‖ / ‖b‖ in f64.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let n: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let d: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (n / d.max(1e-30)).sqrt()
}

/// Random values for every input of `g` (positive ones for `logn*` inputs).
fn random_inputs(g: &Graph, seed: u64) -> HashMap<String, Vec<f32>> {
    g.inputs()
        .iter()
        .enumerate()
        .map(|(i, (name, ty))| {
            let mut v = vals(ty.shape.numel(), seed * 31 + i as u64);
            if name.starts_with("logn") {
                v.iter_mut().for_each(|x| *x = 1.0 + 0.5 * x.abs());
            }
            (name.to_string(), v)
        })
        .collect()
}

fn reference(g: &Graph, inputs: &HashMap<String, Vec<f32>>) -> HashMap<String, Vec<f32>> {
    let w: HashMap<String, Vec<f32>> = HashMap::new();
    let ins: HashMap<String, InputRef> = inputs.iter().map(|(k, v)| (k.clone(), InputRef::F32(v))).collect();
    run_reference(g, &w, &ins).unwrap().into_iter().map(|(k, v)| (k, v.into_f32())).collect()
}

fn fused(g: &Graph) -> (Graph, usize) {
    let mut f = g.clone();
    let n = Fuse.run(&mut f).unwrap();
    // Every node's type is what inference gives it, in topological order.
    verify(&f).unwrap_or_else(|e| panic!("{e}\n{f}"));
    (f, n)
}

/// Nodes of `g` whose op satisfies `p`.
fn count(g: &Graph, p: impl Fn(&Op) -> bool) -> usize {
    g.nodes.iter().filter(|n| p(&n.op)).count()
}

fn compute_nodes(g: &Graph) -> Vec<&Op> {
    g.nodes.iter().map(|n| &n.op).filter(|op| !matches!(op, Op::Input(_) | Op::Param(_) | Op::Const(_))).collect()
}

/// Fused and unfused graphs give the same outputs on the reference interpreter.
fn same_outputs(a: &Graph, b: &Graph, seed: u64) {
    let ins = random_inputs(a, seed);
    let (ra, rb) = (reference(a, &ins), reference(b, &ins));
    assert_eq!(ra.len(), rb.len());
    for (name, want) in &rb {
        let r = rel(&ra[name], want);
        assert!(r < 1e-5, "{name}: relative error {r:e}\n{a}\nvs\n{b}");
    }
}

// ------------------------------------------------------------ the patterns

/// `x·wᵀ [+ b] [→ gelu | swiglu] [+ residual]` on `x [.., m, k]`, in the
/// operand orders a model might write. Returns the graph and the op it
/// should fuse into.
#[allow(clippy::too_many_arguments)]
fn linear_case(
    batch: Option<usize>,
    m: usize,
    k: usize,
    n: usize,
    bias: bool,
    act: Act,
    residual: bool,
    swap: bool,
) -> (Graph, Op) {
    let mut g = Graph::new();
    let mut xs = vec![m, k];
    let mut os = vec![m, n];
    if let Some(b) = batch {
        xs.insert(0, b);
        os.insert(0, b);
    }
    let x = g.input("x", DType::F32, xs);
    let w = g.input("w", DType::F32, vec![n, k]);
    let mut y = g.matmul_t(x, w).unwrap();
    if act == Act::SiluMul {
        let w2 = g.input("w2", DType::F32, vec![n, k]);
        let gate = g.matmul_t(x, w2).unwrap();
        let s = g.silu(gate).unwrap();
        y = if swap { g.mul(s, y) } else { g.mul(y, s) }.unwrap();
    }
    if bias {
        let b = g.input("b", DType::F32, vec![n]);
        y = if swap { g.add(b, y) } else { g.add(y, b) }.unwrap();
    }
    if act == Act::Gelu {
        y = g.gelu(y).unwrap();
    }
    if residual {
        let r = g.input("r", DType::F32, os);
        y = if swap { g.add(y, r) } else { g.add(r, y) }.unwrap();
    }
    g.set_output("y", y);
    (g, Op::Linear { bias, act, residual })
}

/// `norm(a + b)` with `b` of the same shape or broadcasting (`bshape`).
fn add_norm_case(a_shape: Vec<usize>, b_shape: Vec<usize>, rms: bool) -> (Graph, Op) {
    let mut g = Graph::new();
    let c = *a_shape.last().unwrap();
    let a = g.input("a", DType::F32, a_shape);
    let b = g.input("b", DType::F32, b_shape);
    let w = g.input("w", DType::F32, vec![c]);
    let s = g.add(a, b).unwrap();
    let y = if rms {
        g.rms_norm(s, w, 1e-6).unwrap()
    } else {
        let bb = g.input("bias", DType::F32, vec![c]);
        g.layer_norm(s, w, bb, 1e-5).unwrap()
    };
    g.set_output("y", y);
    (g, Op::AddNorm { rms, eps: if rms { 1e-6 } else { 1e-5 } })
}

/// Slice of `qkv [t, cols]` at `offset` → `[t, heads, d]` → rotary [→ ·logn].
fn qkv_case(t: usize, heads: usize, d: usize, before: usize, after: usize, logn: bool) -> (Graph, Op) {
    let mut g = Graph::new();
    let offset = before;
    let qkv = g.input("qkv", DType::F32, vec![t, before + heads * d + after]);
    let cos = g.input("cos", DType::F32, vec![t, d]);
    let sin = g.input("sin", DType::F32, vec![t, d]);
    let s = g.slice(qkv, 1, offset, offset + heads * d).unwrap();
    let r = g.reshape(s, vec![t, heads, d]).unwrap();
    let mut y = g.rotary(r, cos, sin).unwrap();
    if logn {
        let l = g.input("logn", DType::F32, vec![t, 1, 1]);
        y = g.mul(l, y).unwrap();
    }
    g.set_output("y", y);
    (g, Op::QkvRotary { offset, heads, logn })
}

/// Checks a single-pattern case: exactly one fused node, of the expected op,
/// and nothing else but leaves; same outputs as before.
fn fuses_to_one(g: &Graph, want: &Op, seed: u64) -> Graph {
    let (f, n) = fused(g);
    assert_eq!(n, 1, "one rewrite expected\n{g}\n→\n{f}");
    let ops = compute_nodes(&f);
    assert_eq!(ops, vec![want], "\n{g}\n→\n{f}");
    same_outputs(&f, g, seed);
    f
}

/// The fused node of a one-node graph `f`, evaluated by the reference
/// interpreter, against its explicit expansion written into a graph.
fn node_matches_expansion(f: &Graph, seed: u64) {
    let id = f.output("y").unwrap();
    let node = f.node(id);
    let mut e = Graph::new();
    let mut xs: Vec<NodeId> = vec![];
    for x in &node.inputs {
        let Op::Input(name) = &f.node(*x).op else { panic!("inputs only") };
        let t = f.ty(*x);
        xs.push(e.input(name, t.dtype, t.shape.0.clone()));
    }
    let y = expand(&mut e, &node.op, &xs).unwrap();
    e.set_output("y", y);
    assert!(e.nodes.iter().all(|n| !n.op.is_composite()), "expansion left a composite:\n{e}");
    let ins = random_inputs(f, seed);
    let (a, b) = (reference(f, &ins), reference(&e, &ins));
    let r = rel(&a["y"], &b["y"]);
    assert!(r < 1e-5, "{}: relative error {r:e}", node.op.name());
}

// ------------------------------------------------------------ before / after

#[test]
fn linear_with_bias_gelu_and_residual_fuses_into_one_node() {
    let (g, want) = linear_case(None, 3, 5, 4, true, Act::Gelu, true, false);
    // x, w, matmul, b, add, gelu, r, add
    assert_eq!(g.nodes.len(), 8);
    let f = fuses_to_one(&g, &want, 1);
    assert_eq!(f.nodes.len(), 5, "{f}");
    // Inputs in the documented order: x, w, b, residual.
    let y = f.node(f.output("y").unwrap());
    let names: Vec<String> = y.inputs.iter().map(|i| f.node(*i).op.name()).collect();
    assert_eq!(names, ["input x", "input w", "input b", "input r"]);
}

#[test]
fn swiglu_fuses_in_either_operand_order() {
    for swap in [false, true] {
        let (g, want) = linear_case(None, 2, 6, 3, false, Act::SiluMul, false, swap);
        let f = fuses_to_one(&g, &want, 2);
        let y = f.node(f.output("y").unwrap());
        let names: Vec<String> = y.inputs.iter().map(|i| f.node(*i).op.name()).collect();
        // w is the up projection (the Mul's plain operand), w2 the gated one.
        assert_eq!(names, ["input x", "input w", "input w2"], "swap = {swap}");
    }
}

#[test]
fn swiglu_with_two_different_activations_is_not_swiglu() {
    // Mul(x·w1ᵀ, silu(z·w2ᵀ)) with different left operands: two plain Linears.
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2, 4]);
    let z = g.input("z", DType::F32, vec![2, 4]);
    let w1 = g.input("w1", DType::F32, vec![3, 4]);
    let w2 = g.input("w2", DType::F32, vec![3, 4]);
    let a = g.matmul_t(x, w1).unwrap();
    let b = g.matmul_t(z, w2).unwrap();
    let s = g.silu(b).unwrap();
    let y = g.mul(a, s).unwrap();
    g.set_output("y", y);
    let (f, n) = fused(&g);
    assert_eq!(n, 2);
    assert_eq!(count(&f, |op| *op == Op::Linear { bias: false, act: Act::None, residual: false }), 2);
    assert_eq!(count(&f, |op| matches!(op, Op::Silu)), 1);
    same_outputs(&f, &g, 3);
}

#[test]
fn a_bare_transposed_matmul_becomes_a_linear_and_others_stay() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2, 4]);
    let w = g.input("w", DType::F32, vec![3, 4]);
    let p = g.input("p", DType::F32, vec![4, 3]);
    let b3 = g.input("b3", DType::F32, vec![2, 3, 4]);
    let x3 = g.input("x3", DType::F32, vec![2, 2, 4]);
    let lin = g.matmul_t(x, w).unwrap();
    let plain = g.matmul(x, p).unwrap();
    let batched = g.matmul_t(x3, b3).unwrap();
    g.set_output("lin", lin);
    g.set_output("plain", plain);
    g.set_output("batched", batched);
    let (f, n) = fused(&g);
    assert_eq!(n, 1);
    assert_eq!(f.node(f.output("lin").unwrap()).op, Op::Linear { bias: false, act: Act::None, residual: false });
    assert_eq!(f.node(f.output("plain").unwrap()).op, Op::MatMul { transpose_b: false });
    assert_eq!(f.node(f.output("batched").unwrap()).op, Op::MatMul { transpose_b: true });
    same_outputs(&f, &g, 4);
}

#[test]
fn an_intermediate_with_another_reader_is_not_swallowed() {
    // y = x·wᵀ is read by the bias add and by exp: the add cannot take it.
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2, 4]);
    let w = g.input("w", DType::F32, vec![3, 4]);
    let b = g.input("b", DType::F32, vec![3]);
    let y = g.matmul_t(x, w).unwrap();
    let z = g.add(y, b).unwrap();
    let e = g.unary(qvc_ir::UnaryOp::Exp, y).unwrap();
    let s = g.add(z, e).unwrap();
    g.set_output("s", s);
    let (f, n) = fused(&g);
    // The matmul alone becomes a Linear; the bias add survives, and the last
    // add cannot take z (a bias add whose matmul is shared) either.
    assert_eq!(n, 1, "{f}");
    assert_eq!(count(&f, |op| *op == Op::Linear { bias: false, act: Act::None, residual: false }), 1);
    assert_eq!(count(&f, |op| matches!(op, Op::Binary(qvc_ir::BinaryOp::Add))), 2);
    same_outputs(&f, &g, 5);
}

#[test]
fn an_intermediate_that_is_an_output_is_not_swallowed() {
    let (mut g, _) = linear_case(None, 2, 3, 4, true, Act::Gelu, false, false);
    // Mark the pre-activation (the bias add) as an output too.
    let gelu = g.output("y").unwrap();
    let pre = g.node(gelu).inputs[0];
    g.set_output("pre", pre);
    let (f, n) = fused(&g);
    assert_eq!(n, 1);
    assert_eq!(f.node(f.output("pre").unwrap()).op, Op::Linear { bias: true, act: Act::None, residual: false });
    assert_eq!(f.node(f.output("y").unwrap()).op, Op::Gelu);
    same_outputs(&f, &g, 6);
}

#[test]
fn add_norm_fuses_layer_and_rms_norm_with_a_broadcast_operand() {
    let (g, want) = add_norm_case(vec![3, 8], vec![8], false);
    let f = fuses_to_one(&g, &want, 7);
    assert_eq!(f.nodes.len(), 5);
    let (g, want) = add_norm_case(vec![2, 3, 8], vec![3, 1], true);
    fuses_to_one(&g, &want, 8);
    // The broadcast operand written first still ends up second.
    let mut g = Graph::new();
    let a = g.input("a", DType::F32, vec![4, 6]);
    let b = g.input("b", DType::F32, vec![6]);
    let w = g.input("w", DType::F32, vec![6]);
    let s = g.add(b, a).unwrap();
    let y = g.rms_norm(s, w, 1e-6).unwrap();
    g.set_output("y", y);
    let f = fuses_to_one(&g, &Op::AddNorm { rms: true, eps: 1e-6 }, 9);
    assert_eq!(f.node(f.output("y").unwrap()).inputs[0], NodeId(0));
}

#[test]
fn add_norm_does_not_fire_on_a_shared_or_output_sum() {
    for as_output in [false, true] {
        let mut g = Graph::new();
        let a = g.input("a", DType::F32, vec![4, 6]);
        let b = g.input("b", DType::F32, vec![4, 6]);
        let w = g.input("w", DType::F32, vec![6]);
        let s = g.add(a, b).unwrap();
        let y = g.rms_norm(s, w, 1e-6).unwrap();
        g.set_output("y", y);
        if as_output {
            g.set_output("s", s);
        } else {
            let t = g.add(s, y).unwrap();
            g.set_output("t", t);
        }
        let (f, n) = fused(&g);
        assert_eq!(n, 0, "{f}");
        assert_eq!(f.nodes.len(), g.nodes.len());
    }
}

#[test]
fn a_residual_add_before_a_norm_goes_to_the_gemm_epilogue() {
    // norm(x + h·wᵀ): the add is absorbed by the Linear, the norm stays.
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![3, 6]);
    let h = g.input("h", DType::F32, vec![3, 5]);
    let w = g.input("w", DType::F32, vec![6, 5]);
    let nw = g.input("nw", DType::F32, vec![6]);
    let o = g.matmul_t(h, w).unwrap();
    let s = g.add(x, o).unwrap();
    let y = g.rms_norm(s, nw, 1e-6).unwrap();
    g.set_output("y", y);
    let (f, n) = fused(&g);
    assert_eq!(n, 1);
    let ops = compute_nodes(&f);
    assert_eq!(ops, vec![&Op::Linear { bias: false, act: Act::None, residual: true }, &Op::RmsNorm { eps: 1e-6 }]);
    same_outputs(&f, &g, 10);
}

#[test]
fn qkv_rotary_fuses_q_with_logn_and_k_without_and_leaves_v() {
    let (t, h, d) = (5, 2, 4);
    let mut g = Graph::new();
    let qkv = g.input("qkv", DType::F32, vec![t, 3 * h * d]);
    let cos = g.input("cos", DType::F32, vec![t, d]);
    let sin = g.input("sin", DType::F32, vec![t, d]);
    let l = g.input("logn", DType::F32, vec![t, 1, 1]);
    let part = |g: &mut Graph, j: usize| {
        let s = g.slice(qkv, 1, j * h * d, (j + 1) * h * d).unwrap();
        g.reshape(s, vec![t, h, d]).unwrap()
    };
    let (q, k, v) = (part(&mut g, 0), part(&mut g, 1), part(&mut g, 2));
    let q = g.rotary(q, cos, sin).unwrap();
    let q = g.mul(q, l).unwrap();
    let k = g.rotary(k, cos, sin).unwrap();
    let a = g.attention(q, k, v, Mask::Causal, 0.5).unwrap();
    g.set_output("k", k);
    g.set_output("a", a);
    let (f, n) = fused(&g);
    assert_eq!(n, 2, "{f}");
    assert_eq!(count(&f, |op| *op == Op::QkvRotary { offset: 0, heads: h, logn: true }), 1);
    // k is an output: the root of a match may be one.
    assert_eq!(f.node(f.output("k").unwrap()).op, Op::QkvRotary { offset: h * d, heads: h, logn: false });
    assert_eq!(count(&f, |op| matches!(op, Op::Slice { .. } | Op::Reshape(_))), 2, "v's slice and reshape stay");
    same_outputs(&f, &g, 11);
    let s = fusion_stats(&f);
    assert_eq!(s.fused, 3);
    assert_eq!(s.unfused_compute, 1, "v's slice");
    assert_eq!(s.by_kind["attention.causal"], 1);
    assert_eq!(s.by_kind["qkv_rotary+logn"], 1);
    assert_eq!(s.by_kind["qkv_rotary"], 1);
    assert_eq!(s.by_kind["slice"], 1);
}

#[test]
fn qkv_rotary_does_not_fire_when_the_slice_or_reshape_is_read_elsewhere() {
    for shared in ["slice", "reshape"] {
        let (mut g, _) = qkv_case(3, 2, 4, 8, 0, false);
        let rot = g.output("y").unwrap();
        let reshape = g.node(rot).inputs[0];
        let slice = g.node(reshape).inputs[0];
        g.set_output("extra", if shared == "slice" { slice } else { reshape });
        let (f, n) = fused(&g);
        assert_eq!(n, 0, "{shared}: {f}");
    }
    // A slice along the token axis is not a QKV split.
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![6, 8]);
    let cos = g.input("cos", DType::F32, vec![3, 4]);
    let sin = g.input("sin", DType::F32, vec![3, 4]);
    let s = g.slice(x, 0, 0, 3).unwrap();
    let r = g.reshape(s, vec![3, 2, 4]).unwrap();
    let y = g.rotary(r, cos, sin).unwrap();
    g.set_output("y", y);
    assert_eq!(fused(&g).1, 0);
}

#[test]
fn a_transformer_block_fuses_as_expected_and_fuse_is_idempotent() {
    // Pre-norm decoder block: rms → c_attn (bias) → q/k rotary, v → causal
    // attention → c_proj + residual → rms → SwiGLU → c_proj + residual.
    let (t, h, hd, c, ff) = (4, 2, 4, 8, 6);
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![t, c]);
    let cos = g.input("cos", DType::F32, vec![t, hd]);
    let sin = g.input("sin", DType::F32, vec![t, hd]);
    let p = |g: &mut Graph, n: &str, s: Vec<usize>| g.input(n, DType::F32, s);
    let ln1 = p(&mut g, "ln1", vec![c]);
    let wqkv = p(&mut g, "wqkv", vec![3 * c, c]);
    let bqkv = p(&mut g, "bqkv", vec![3 * c]);
    let wo = p(&mut g, "wo", vec![c, c]);
    let ln2 = p(&mut g, "ln2", vec![c]);
    let w1 = p(&mut g, "w1", vec![ff, c]);
    let w2 = p(&mut g, "w2", vec![ff, c]);
    let wp = p(&mut g, "wp", vec![c, ff]);
    let y = g.rms_norm(x, ln1, 1e-6).unwrap();
    let qkv = g.linear(y, wqkv, Some(bqkv)).unwrap();
    let mut parts = vec![];
    for j in 0..3 {
        let s = g.slice(qkv, 1, j * c, (j + 1) * c).unwrap();
        parts.push(g.reshape(s, vec![t, h, hd]).unwrap());
    }
    let q = g.rotary(parts[0], cos, sin).unwrap();
    let k = g.rotary(parts[1], cos, sin).unwrap();
    let a = g.attention(q, k, parts[2], Mask::Causal, 0.5).unwrap();
    let a = g.reshape(a, vec![t, c]).unwrap();
    let o = g.matmul_t(a, wo).unwrap();
    let x1 = g.add(x, o).unwrap();
    let y2 = g.rms_norm(x1, ln2, 1e-6).unwrap();
    let a1 = g.matmul_t(y2, w1).unwrap();
    let a2 = g.matmul_t(y2, w2).unwrap();
    let s2 = g.silu(a2).unwrap();
    let m = g.mul(a1, s2).unwrap();
    let m = g.matmul_t(m, wp).unwrap();
    let x2 = g.add(x1, m).unwrap();
    g.set_output("x", x2);
    let before = fusion_stats(&g);
    assert_eq!(before.fused, 1, "only the attention");
    let (f, n) = fused(&g);
    assert_eq!(n, 6, "{f}");
    let s = fusion_stats(&f);
    eprintln!("block: {before:?}\n   → {s:?}");
    assert_eq!(s.by_kind["linear+bias"], 1);
    assert_eq!(s.by_kind["linear+residual"], 2);
    assert_eq!(s.by_kind["linear+silu_mul"], 1);
    assert_eq!(s.by_kind["qkv_rotary"], 2);
    assert_eq!(s.by_kind["rms_norm"], 2);
    assert_eq!(s.by_kind["slice"], 1);
    assert_eq!((s.fused, s.unfused_compute), (7, 3));
    same_outputs(&f, &g, 12);
    // Nothing left to fuse: a second run changes nothing.
    let (f2, n2) = fused(&f);
    assert_eq!(n2, 0);
    assert_eq!(f2.nodes.len(), f.nodes.len());
}

// ------------------------------------------------------------ properties

/// Windowed attention straight from its definition, in f64: query `i` sees
/// the keys in its own `window × window` square of the grid.
fn window_attention_direct(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (gh, gw, win): (usize, usize, usize),
    heads: usize,
    d: usize,
    scale: f32,
) -> Vec<f32> {
    let t = gh * gw;
    let mut out = vec![0f32; t * heads * d];
    let cell = |i: usize| ((i / gw) / win, (i % gw) / win);
    for i in 0..t {
        for h in 0..heads {
            let keys: Vec<usize> = (0..t).filter(|&j| cell(j) == cell(i)).collect();
            let at = |x: &[f32], tok: usize, c: usize| x[(tok * heads + h) * d + c] as f64;
            let s: Vec<f64> =
                keys.iter().map(|&j| (0..d).map(|c| at(q, i, c) * at(k, j, c)).sum::<f64>() * scale as f64).collect();
            let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
            let z: f64 = p.iter().sum();
            for c in 0..d {
                let acc: f64 = keys.iter().zip(&p).map(|(&j, pj)| pj * at(v, j, c)).sum();
                out[(i * heads + h) * d + c] = (acc / z) as f32;
            }
        }
    }
    out
}

fn window_graph(gh: usize, gw: usize, win: usize, heads: usize, d: usize, scale: f32) -> Graph {
    let mut g = Graph::new();
    let q = g.input("q", DType::F32, vec![gh * gw, heads, d]);
    let k = g.input("k", DType::F32, vec![gh * gw, heads, d]);
    let v = g.input("v", DType::F32, vec![gh * gw, heads, d]);
    let y = g.attention(q, k, v, Mask::Window { grid_h: gh, grid_w: gw, window: win }, scale).unwrap();
    g.set_output("y", y);
    g
}

fn check_window(gh: usize, gw: usize, win: usize, heads: usize, d: usize, seed: u64) {
    let scale = 1.0 / (d as f32).sqrt();
    let g = window_graph(gh, gw, win, heads, d, scale);
    node_matches_expansion(&g, seed);
    let ins = random_inputs(&g, seed);
    let got = reference(&g, &ins).remove("y").unwrap();
    let want = window_attention_direct(&ins["q"], &ins["k"], &ins["v"], (gh, gw, win), heads, d, scale);
    let r = rel(&got, &want);
    assert!(r < 1e-5, "window {gh}x{gw}/{win}: relative error {r:e}");
}

#[test]
fn window_attention_on_a_ragged_grid_matches_its_definition() {
    check_window(5, 7, 3, 2, 4, 13);
    check_window(4, 4, 2, 1, 3, 14);
    check_window(3, 5, 8, 2, 2, 15); // one window bigger than the grid: global attention
}

fn act_of(i: u8) -> Act {
    [Act::None, Act::Gelu, Act::SiluMul][i as usize % 3]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Every Linear variant: the pass makes exactly the expected node, which
    /// agrees with its expansion and with the subgraph it replaced.
    #[test]
    fn linear_variants_agree_with_their_expansion(
        batch in prop::option::of(1usize..3), m in 1usize..7, k in 1usize..20, n in 1usize..20,
        bias: bool, act in 0u8..3, residual: bool, swap: bool, seed in 0u64..1000,
    ) {
        let (g, want) = linear_case(batch, m, k, n, bias, act_of(act), residual, swap);
        let f = fuses_to_one(&g, &want, seed);
        node_matches_expansion(&f, seed);
    }

    #[test]
    fn add_norm_agrees_with_its_expansion(
        rows in 1usize..6, cols in 1usize..20, rms: bool, bcast in 0u8..4, seed in 0u64..1000,
    ) {
        let (a, b) = match bcast {
            0 => (vec![rows, cols], vec![rows, cols]),
            1 => (vec![rows, cols], vec![cols]),
            2 => (vec![rows, cols], vec![rows, 1]),
            _ => (vec![2, rows, cols], vec![1, cols]),
        };
        let (g, want) = add_norm_case(a, b, rms);
        let f = fuses_to_one(&g, &want, seed);
        node_matches_expansion(&f, seed);
    }

    #[test]
    fn qkv_rotary_agrees_with_its_expansion(
        t in 1usize..7, heads in 1usize..4, half in 1usize..5, before in 0usize..9, after in 0usize..9,
        logn: bool, seed in 0u64..1000,
    ) {
        let (g, want) = qkv_case(t, heads, 2 * half, before, after, logn);
        let f = fuses_to_one(&g, &want, seed);
        node_matches_expansion(&f, seed);
    }

    #[test]
    fn window_attention_agrees_with_its_expansion_and_definition(
        gh in 1usize..7, gw in 1usize..8, win in 1usize..5, heads in 1usize..3, d in 1usize..6, seed in 0u64..1000,
    ) {
        check_window(gh, gw, win, heads, d, seed);
    }
}
