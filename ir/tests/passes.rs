//! Before/after tests of the general passes (`Dce`, `Cse`, `ConstFold`,
//! `Canonicalize`, `verify`): node counts, the op sequence, and that the
//! rewritten graph computes the same outputs as the original under the
//! reference interpreter on random inputs and random weights.

use half::bf16;
use qvc_ir::passes::{run_pipeline, verify, Canonicalize, ConstFold, Cse, Dce, FoldedData, Pass, Verify, WithFolded};
use qvc_ir::{run_reference, Act, DType, Elems, Graph, InputRef, IrError, Mask, NodeId, Op, TensorType, WeightSource};
use std::collections::HashMap;

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

/// Random weights for every param of a graph, stored in the param's dtype.
#[derive(Default)]
struct RandWeights {
    f32: HashMap<String, Vec<f32>>,
    bf16: HashMap<String, Vec<bf16>>,
}

impl RandWeights {
    fn for_graph(g: &Graph, seed: u64) -> Self {
        let mut rng = Rng(seed);
        let mut w = RandWeights::default();
        for (name, ty) in g.params() {
            let v = rng.vec(ty.shape.numel());
            match ty.dtype {
                DType::BF16 => {
                    w.bf16.insert(name.to_string(), v.iter().map(|&x| bf16::from_f32(x)).collect());
                }
                _ => {
                    w.f32.insert(name.to_string(), v);
                }
            }
        }
        w
    }
}

impl WeightSource for RandWeights {
    fn weight(&self, name: &str) -> Option<Elems<'_>> {
        self.f32.get(name).map(|v| Elems::F32(v)).or_else(|| self.bf16.get(name).map(|v| Elems::BF16(v)))
    }
}

/// Random f32 inputs for every input of a graph.
fn random_inputs(g: &Graph, seed: u64) -> HashMap<String, Vec<f32>> {
    let mut rng = Rng(seed);
    g.inputs().into_iter().map(|(n, ty)| (n.to_string(), rng.vec(ty.shape.numel()))).collect()
}

fn run(g: &Graph, w: &dyn WeightSource, inputs: &HashMap<String, Vec<f32>>) -> HashMap<String, Vec<f32>> {
    let refs: HashMap<String, InputRef> = inputs.iter().map(|(k, v)| (k.clone(), InputRef::F32(v))).collect();
    run_reference(g, w, &refs).unwrap().into_iter().map(|(k, v)| (k, v.into_f32())).collect()
}

/// Asserts that `after` (reading weights from `w_after`) computes the same
/// outputs as `before` within a relative error of `tol` (0: bit-exact).
fn assert_same(before: &Graph, after: &Graph, w_before: &dyn WeightSource, w_after: &dyn WeightSource, tol: f64) {
    verify(after).unwrap();
    let names = |g: &Graph| -> Vec<String> {
        let mut v: Vec<String> = g.outputs.iter().map(|(n, _)| n.clone()).collect();
        v.sort();
        v
    };
    assert_eq!(names(before), names(after));
    for (name, id) in &before.outputs {
        assert_eq!(before.ty(*id), after.ty(after.output(name).unwrap()), "type of output {name}");
    }
    let inputs = random_inputs(before, 7);
    let (a, b) = (run(before, w_before, &inputs), run(after, w_after, &inputs));
    for (name, want) in &a {
        let got = &b[name];
        assert_eq!(got.len(), want.len());
        let (mut num, mut den) = (0f64, 0f64);
        for (x, y) in got.iter().zip(want) {
            num += (*x as f64 - *y as f64).powi(2);
            den += (*y as f64).powi(2);
        }
        let rel = (num / den.max(1e-30)).sqrt();
        if tol == 0.0 {
            assert!(got.iter().zip(want).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} differs (rel {rel:e})");
        } else {
            assert!(rel <= tol, "{name}: relative error {rel:e} above {tol:e}");
        }
    }
}

fn ops(g: &Graph) -> Vec<String> {
    g.nodes.iter().map(|n| n.op.name()).collect()
}

fn count(g: &Graph, pred: impl Fn(&Op) -> bool) -> usize {
    g.nodes.iter().filter(|n| pred(&n.op)).count()
}

// ---------------------------------------------------------------- verify

#[test]
fn verify_accepts_built_graphs_and_rejects_broken_ones() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2, 3]);
    let w = g.param("w", DType::BF16, vec![4, 3]);
    let y = g.matmul_t(x, w).unwrap();
    let c = g.constant(vec![1.0; 4], vec![4]).unwrap();
    let z = g.add(y, c).unwrap();
    g.set_output("z", z);
    verify(&g).unwrap();
    assert_eq!(Verify.run(&mut g.clone()).unwrap(), 0);

    // A stored type that inference disagrees with.
    let mut bad = g.clone();
    bad.nodes[y.index()].ty.shape.0 = vec![2, 5];
    let e = verify(&bad).unwrap_err();
    assert!(e.to_string().contains("matmul_t"), "{e}");
    // A dtype change is caught too.
    let mut bad = g.clone();
    bad.nodes[z.index()].ty.dtype = DType::BF16;
    assert!(verify(&bad).is_err());
    // An input that does not come before its reader.
    let mut bad = g.clone();
    bad.nodes[y.index()].inputs[1] = z;
    let e = verify(&bad).unwrap_err();
    assert!(e.to_string().contains("does not come before"), "{e}");
    // A constant with the wrong number of values.
    let mut bad = g.clone();
    bad.nodes[c.index()].op = Op::Const(vec![1.0; 3].into());
    assert!(verify(&bad).is_err());
    // Outputs: duplicated names, missing nodes.
    let mut bad = g.clone();
    bad.set_output("z", y);
    assert!(verify(&bad).unwrap_err().to_string().contains("twice"));
    let mut bad = g.clone();
    bad.set_output("q", NodeId(99));
    assert!(verify(&bad).is_err());
}

// ---------------------------------------------------------------- dce

#[test]
fn dce_removes_unread_nodes_and_leaves() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![3, 4]);
    let unused_in = g.input("unused", DType::F32, vec![2]);
    let w = g.param("w", DType::F32, vec![5, 4]);
    let w_dead = g.param("w_dead", DType::F32, vec![5, 4]);
    let y = g.matmul_t(x, w).unwrap();
    let dead = g.matmul_t(x, w_dead).unwrap();
    let _dead2 = g.gelu(dead).unwrap();
    let _dead3 = g.unary(qvc_ir::UnaryOp::Exp, unused_in).unwrap();
    let s = g.softmax(y).unwrap();
    g.set_output("s", s);
    g.set_output("y", y);
    let before = g.clone();
    let removed = Dce.run(&mut g).unwrap();
    assert_eq!(removed, 5);
    assert_eq!(g.nodes.len(), before.nodes.len() - 5);
    assert_eq!(ops(&g), ["input x", "param w", "matmul_t", "softmax"]);
    assert_eq!(g.params().len(), 1);
    assert_eq!(g.inputs().len(), 1);
    let w = RandWeights::for_graph(&before, 1);
    assert_same(&before, &g, &w, &w, 0.0);
    // Nothing left to do: a second run is a no-op.
    assert_eq!(Dce.run(&mut g).unwrap(), 0);
}

// ---------------------------------------------------------------- cse

#[test]
fn cse_merges_identical_nodes_and_keeps_the_earliest() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![3, 4]);
    let w = g.param("w", DType::F32, vec![5, 4]);
    let w_again = g.param("w", DType::F32, vec![5, 4]);
    let a = g.matmul_t(x, w).unwrap();
    let b = g.matmul_t(x, w_again).unwrap(); // same as `a` once the params merge
    let h1 = g.scalar(0.5);
    let h2 = g.scalar(0.5);
    let pz = g.scalar(0.0);
    let nz = g.scalar(-0.0); // distinct bits: must not merge with 0.0
    let a1 = g.mul(a, h1).unwrap();
    let b1 = g.mul(b, h2).unwrap(); // same as `a1` transitively
    let sum = g.add(a1, b1).unwrap();
    let p = g.add(sum, pz).unwrap();
    let n = g.add(sum, nz).unwrap();
    let ln_w = g.param("ln.w", DType::F32, vec![5]);
    let ln_b = g.param("ln.b", DType::F32, vec![5]);
    let l1 = g.layer_norm(p, ln_w, ln_b, 1e-5).unwrap();
    let l2 = g.layer_norm(p, ln_w, ln_b, 1e-6).unwrap(); // different eps: distinct
    let l3 = g.layer_norm(p, ln_w, ln_b, 1e-5).unwrap(); // same as l1
    let d = g.sub(n, l1).unwrap();
    let e = g.add(l2, l3).unwrap();
    g.set_output("d", d);
    g.set_output("e", e);
    g.set_output("b1", b1);
    let before = g.clone();
    let merged = Cse.run(&mut g).unwrap();
    // w_again, b, h2, b1, l3 merge.
    assert_eq!(merged, 5);
    assert_eq!(g.nodes.len(), before.nodes.len() - 5);
    assert_eq!(count(&g, |o| matches!(o, Op::MatMul { .. })), 1);
    assert_eq!(count(&g, |o| matches!(o, Op::Const(_))), 3, "0.5 once, 0.0 and -0.0 apart");
    assert_eq!(count(&g, |o| matches!(o, Op::LayerNorm { .. })), 2);
    // The kept node is the earliest one: the add now reads the same node twice.
    let sum_new = g.nodes.iter().find(|n| matches!(n.op, Op::Binary(qvc_ir::BinaryOp::Add))).unwrap();
    assert_eq!(sum_new.inputs[0], sum_new.inputs[1]);
    assert_eq!(g.output("b1").unwrap(), sum_new.inputs[0]);
    let w = RandWeights::for_graph(&before, 2);
    assert_same(&before, &g, &w, &w, 0.0);
    assert_eq!(Cse.run(&mut g).unwrap(), 0);
}

// ---------------------------------------------------------------- const fold

#[test]
fn const_fold_evaluates_constant_subgraphs_once() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2, 4]);
    // A table computed from constants: exp(iota * 0.25 + c).
    let io = g.iota(vec![2, 4], 1).unwrap();
    let q = g.scalar(0.25);
    let c = g.constant(vec![0.1, 0.2, 0.3, 0.4], vec![4]).unwrap();
    let t = g.mul(io, q).unwrap();
    let t = g.add(t, c).unwrap();
    let t = g.unary(qvc_ir::UnaryOp::Exp, t).unwrap();
    let t = g.softmax(t).unwrap(); // a composite over constants folds as well
    let y = g.mul(x, t).unwrap();
    // An iota read by run-time code stays a generator.
    let io2 = g.iota(vec![2, 4], 0).unwrap();
    let z = g.add(y, io2).unwrap();
    g.set_output("z", z);
    g.set_output("table", t);
    let before = g.clone();
    let n = ConstFold::new().run(&mut g).unwrap();
    assert_eq!(n, 4, "mul, add, exp and softmax (the iota is absorbed)");
    assert_eq!(ops(&g), ["input x", "const", "mul", "iota(0)", "add"]);
    assert_eq!(g.shape(g.output("table").unwrap()).0, vec![2, 4]);
    let w = RandWeights::default();
    assert_same(&before, &g, &w, &w, 1e-7);
    // The folded table has the hand-computed values.
    let Op::Const(d) = &g.node(g.output("table").unwrap()).op else { panic!("table is not a constant") };
    let row: Vec<f64> = (0..4).map(|j| (j as f64 * 0.25 + 0.1 * (j + 1) as f64).exp().exp()).collect();
    let s: f64 = row.iter().sum();
    for (j, v) in d[..4].iter().enumerate() {
        assert!((*v as f64 - row[j] / s).abs() < 1e-6, "{v} vs {}", row[j] / s);
    }
    assert_eq!(ConstFold::new().run(&mut g).unwrap(), 0);
}

#[test]
fn const_fold_respects_the_size_cap_and_leaves_params_alone() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![8]);
    let a = g.constant((0..8).map(|i| i as f32).collect(), vec![8]).unwrap();
    let two = g.scalar(2.0);
    let big = g.mul(a, two).unwrap(); // 8 elements: over a cap of 4
    let y = g.add(x, big).unwrap();
    let w = g.param("w", DType::F32, vec![2, 4]);
    let wr = g.reshape(w, vec![8]).unwrap();
    let wr = g.mul(wr, two).unwrap();
    let y = g.add(y, wr).unwrap();
    g.set_output("y", y);
    let before = g.clone();
    assert_eq!(ConstFold::new().with_cap(4).run(&mut g).unwrap(), 0);
    assert_eq!(ops(&g), ops(&before));
    // Under the default cap the constant product folds; the params stay.
    assert_eq!(ConstFold::new().run(&mut g).unwrap(), 1);
    Dce.run(&mut g).unwrap();
    assert_eq!(count(&g, |o| matches!(o, Op::Param(_))), 1);
    assert_eq!(count(&g, |o| matches!(o, Op::Reshape(_))), 1);
    let w = RandWeights::for_graph(&before, 3);
    assert_same(&before, &g, &w, &w, 0.0);
}

#[test]
fn weight_folding_repacks_params_and_keeps_bf16_layouts_exact() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![3, 6]);
    let w = g.param("w", DType::BF16, vec![2, 3, 6]);
    // Pure layout over a bf16 param: stays bf16.
    let wp = g.permute(w, vec![1, 0, 2]).unwrap();
    let wp = g.reshape(wp, vec![6, 6]).unwrap();
    let y = g.matmul_t(x, wp).unwrap();
    // Arithmetic with a constant: becomes f32.
    let b = g.param("b", DType::BF16, vec![6]);
    let half = g.scalar(0.5);
    let bh = g.mul(b, half).unwrap();
    let y = g.add(y, bh).unwrap();
    // A param also read directly keeps its original.
    let bs = g.slice(b, 0, 0, 3).unwrap();
    let w2 = g.param("w2", DType::F32, vec![3, 6]);
    let z = g.matmul_t(x, w2).unwrap();
    let z = g.add(z, bs).unwrap();
    let b2 = g.param("b2", DType::F32, vec![3]);
    let z = g.add(z, b2).unwrap();
    g.set_output("y", y);
    g.set_output("z", z);
    let before = g.clone();
    let weights = RandWeights::for_graph(&before, 4);

    let fold = ConstFold::with_weights(&weights);
    let n = fold.run(&mut g).unwrap();
    assert_eq!(n, 4, "permute, reshape, mul, slice");
    Dce.run(&mut g).unwrap();
    let folded = fold.folded();
    assert_eq!(folded.len(), 3);
    let params: Vec<&str> = g.params().iter().map(|(n, _)| *n).collect();
    assert_eq!(params, ["folded.0", "folded.1", "folded.2", "w2", "b2"]);
    assert_eq!(count(&g, |o| matches!(o, Op::Permute(_) | Op::Reshape(_) | Op::Slice { .. })), 0);
    // The layout fold is bf16 and exactly the permuted weight.
    assert_eq!(folded[0].ty, TensorType { dtype: DType::BF16, shape: qvc_ir::Shape(vec![6, 6]) });
    let FoldedData::BF16(d) = &folded[0].data else { panic!("layout fold lost bf16") };
    let src = &weights.bf16["w"];
    for r in 0..6 {
        for c in 0..6 {
            // row r of [3, 2, 6] is (i = r / 2, j = r % 2) → w[j, i, c]
            assert_eq!(d[r * 6 + c], src[(r % 2) * 18 + (r / 2) * 6 + c]);
        }
    }
    assert!(matches!(folded[1].data, FoldedData::F32(_)), "arithmetic folds to f32");
    assert_eq!(folded[2].ty.dtype, DType::BF16, "a slice is layout");
    let both = WithFolded::new(&weights, &folded);
    assert_same(&before, &g, &weights, &both, 0.0);

    // Folding the same subgraph in another graph reuses the name and data.
    let mut g2 = before.clone();
    fold.run(&mut g2).unwrap();
    assert_eq!(fold.folded().len(), 3);
    assert!(g2.params().iter().any(|(n, _)| *n == "folded.0"));
    let taken = fold.take_folded();
    assert_eq!(taken.len(), 3);
    assert!(fold.folded().is_empty());
}

#[test]
fn weight_folding_reports_a_missing_weight() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2, 4]);
    let w = g.param("nope", DType::F32, vec![4, 2]);
    let wt = g.permute(w, vec![1, 0]).unwrap();
    let y = g.matmul_t(x, wt).unwrap();
    g.set_output("y", y);
    let empty = RandWeights::default();
    let e = ConstFold::with_weights(&empty).run(&mut g).unwrap_err();
    assert!(matches!(&e, IrError::Type { op, .. } if op.contains("nope")), "{e}");
}

// ---------------------------------------------------------------- canonicalize

#[test]
fn canonicalize_rewrites_conv_as_gemm() {
    let mut g = Graph::new();
    let px = g.input("pixels", DType::F32, vec![3, 8, 12]);
    let w = g.param("conv", DType::BF16, vec![5, 3, 4, 4]);
    let y = g.conv2d_patch(px, w, 4).unwrap();
    g.set_output("y", y);
    let before = g.clone();
    assert_eq!(Canonicalize.run(&mut g).unwrap(), 1);
    assert_eq!(
        ops(&g),
        [
            "input pixels",
            "param conv",
            "reshape[3, 2, 4, 3, 4]",
            "permute[1, 3, 0, 2, 4]",
            "reshape[6, 48]",
            "reshape[5, 48]",
            "matmul_t"
        ]
    );
    let w = RandWeights::for_graph(&before, 5);
    assert_same(&before, &g, &w, &w, 0.0);
    // Weight folding then turns the kernel reshape into a repacked bf16 param.
    let fold = ConstFold::with_weights(&w);
    assert_eq!(fold.run(&mut g).unwrap(), 1);
    Dce.run(&mut g).unwrap();
    assert_eq!(g.params(), [("folded.0", &TensorType { dtype: DType::BF16, shape: qvc_ir::Shape(vec![5, 48]) })]);
    let folded = fold.folded();
    assert_same(&before, &g, &w, &WithFolded::new(&w, &folded), 0.0);
}

/// A ViT-like attention block with per-head interleaved QKV, written like
/// `qvc_model::graphs::vision_graph`; `fused` writes the projection as a
/// fused `Linear` instead of `MatMul_t + Add`.
fn vit_block(t: usize, heads: usize, hd: usize, fused: bool) -> Graph {
    let width = heads * hd;
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![t, width]);
    let w = g.param("in_proj.weight", DType::F32, vec![3 * width, width]);
    let b = g.param("in_proj.bias", DType::F32, vec![3 * width]);
    let qkv = if fused {
        g.push(Op::Linear { bias: true, act: Act::None, residual: false }, &[x, w, b]).unwrap()
    } else {
        g.linear(x, w, Some(b)).unwrap()
    };
    let qkv = g.reshape(qkv, vec![t, heads, 3 * hd]).unwrap();
    let q = g.slice(qkv, 2, 0, hd).unwrap();
    let k = g.slice(qkv, 2, hd, 2 * hd).unwrap();
    let v = g.slice(qkv, 2, 2 * hd, 3 * hd).unwrap();
    let a = g.attention(q, k, v, Mask::None, 1.0 / (hd as f32).sqrt()).unwrap();
    let a = g.reshape(a, vec![t, width]).unwrap();
    let ow = g.param("out_proj.weight", DType::F32, vec![width, width]);
    let o = g.linear(a, ow, None).unwrap();
    let y = g.add(x, o).unwrap();
    g.set_output("y", y);
    g
}

#[test]
fn canonicalize_makes_interleaved_qkv_contiguous() {
    for fused in [false, true] {
        let (t, heads, hd) = (5, 3, 4);
        let width = heads * hd;
        let before = vit_block(t, heads, hd, fused);
        let mut g = before.clone();
        assert_eq!(Canonicalize.run(&mut g).unwrap(), 1, "fused: {fused}");
        // No reshape to [T, heads, 3·hd] is left; q/k/v are column blocks of width W.
        assert!(!g.nodes.iter().any(|n| n.op == Op::Reshape(qvc_ir::Shape(vec![t, heads, 3 * hd]))));
        let slices: Vec<&Op> = g.nodes.iter().map(|n| &n.op).filter(|o| matches!(o, Op::Slice { .. })).collect();
        assert_eq!(
            slices,
            [0, 1, 2].map(|j| Op::Slice { axis: 1, start: j * width, end: (j + 1) * width }).iter().collect::<Vec<_>>()
        );
        let w = RandWeights::for_graph(&before, 6);
        assert_same(&before, &g, &w, &w, 0.0);

        // Weight folding repacks w and b: the rows of w' are q | k | v, head-major.
        let fold = ConstFold::with_weights(&w);
        fold.run(&mut g).unwrap();
        Dce.run(&mut g).unwrap();
        let folded = fold.folded();
        assert_eq!(folded.len(), 2);
        assert_eq!(count(&g, |o| matches!(o, Op::Permute(_))), 0, "the weight layout ops are folded");
        let FoldedData::F32(wp) = &folded[0].data else { panic!() };
        let src = &w.f32["in_proj.weight"];
        for (j, h, e) in (0..3).flat_map(|j| (0..heads).flat_map(move |h| (0..hd).map(move |e| (j, h, e)))) {
            let new_row = j * width + h * hd + e;
            let old_row = h * 3 * hd + j * hd + e;
            assert_eq!(wp[new_row * width..][..width], src[old_row * width..][..width]);
        }
        assert_same(&before, &g, &w, &WithFolded::new(&w, &folded), 0.0);
    }
}

#[test]
fn canonicalize_leaves_shared_or_partial_splits_alone() {
    // The interleaved tensor is also an output: rewriting would change it.
    let mut g = vit_block(4, 2, 2, false);
    let r = g.nodes.iter().position(|n| n.op == Op::Reshape(qvc_ir::Shape(vec![4, 2, 6]))).unwrap();
    g.set_output("qkv", NodeId(r as u32));
    assert_eq!(Canonicalize.run(&mut g).unwrap(), 0);
    // A slice that straddles q and k is not a per-head split.
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![4, 4]);
    let w = g.param("w", DType::F32, vec![12, 4]);
    let y = g.matmul_t(x, w).unwrap();
    let y = g.reshape(y, vec![4, 2, 6]).unwrap();
    let s = g.slice(y, 2, 1, 3).unwrap();
    g.set_output("s", s);
    assert_eq!(Canonicalize.run(&mut g).unwrap(), 0);
}

#[test]
fn the_general_pipeline_keeps_a_vit_block_equivalent() {
    let before = vit_block(6, 2, 4, false);
    let w = RandWeights::for_graph(&before, 8);
    let mut g = before.clone();
    // An unused branch for Dce, and a recomputed output for Cse.
    let x = g.output("y").unwrap();
    let dead = g.gelu(x).unwrap();
    let _dead = g.softmax(dead).unwrap();
    let again = g.nodes[x.index()].clone();
    let y2 = g.push(again.op, &again.inputs).unwrap();
    g.set_output("y2", y2);
    let mut before = g.clone();
    before.outputs.retain(|(n, _)| n != "y2");
    before.set_output("y2", x);
    let fold = ConstFold::with_weights(&w);
    let stats = run_pipeline(&mut g, &[&Canonicalize, &Verify, &fold, &Verify, &Cse, &Dce, &Verify]).unwrap();
    let names: Vec<&str> = stats.iter().map(|s| s.pass).collect();
    assert_eq!(names, ["canonicalize", "verify", "const-fold", "verify", "cse", "dce", "verify"]);
    assert_eq!(stats[0].rewrites, 1);
    assert!(stats[2].rewrites >= 6, "{stats:?}");
    assert_eq!(stats[4].rewrites, 1, "the recomputed residual add merges");
    assert_eq!(stats[5].rewrites, 2, "gelu and softmax go");
    assert_eq!(g.output("y").unwrap(), g.output("y2").unwrap());
    let folded = fold.folded();
    assert_same(&before, &g, &w, &WithFolded::new(&w, &folded), 0.0);
}
