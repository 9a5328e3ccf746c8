//! Memory planning: hand-built graphs with known answers, the validator
//! catching broken plans, and random DAGs. Every plan is also *executed*:
//! each node is evaluated by the reference interpreter with its inputs read
//! from, and its output written to, one shared f32 arena laid out by the
//! plan; a value overwritten while still live shows up as a mismatch
//! against the same evaluation without an arena.

use proptest::prelude::*;
use qvc_ir::plan::{kv_cache_bytes, plan_memory, MemoryPlan, PlanOptions, Slot, Strategy};
use qvc_ir::{run_reference, Act, DType, Graph, InputRef, NodeId, Op, UnaryOp, Value};
use std::collections::HashMap;

fn eval_node(g: &Graph, i: usize, args: &[Vec<f32>]) -> Vec<f32> {
    let n = &g.nodes[i];
    let mut m = Graph::new();
    let ids: Vec<NodeId> = n
        .inputs
        .iter()
        .enumerate()
        .map(|(j, x)| m.input(&format!("a{j}"), DType::F32, g.shape(*x).0.clone()))
        .collect();
    let y = m.push(n.op.clone(), &ids).unwrap();
    m.set_output("y", y);
    let names: Vec<String> = (0..args.len()).map(|j| format!("a{j}")).collect();
    let inputs: HashMap<String, InputRef> =
        names.iter().zip(args).map(|(k, v)| (k.clone(), InputRef::F32(v.as_slice()))).collect();
    let w: HashMap<String, Vec<f32>> = HashMap::new();
    match run_reference(&m, &w, &inputs).unwrap().remove("y").unwrap() {
        Value::F32(v) => v,
        Value::I32(_) => unreachable!("test graphs are f32"),
    }
}

fn same(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
}

fn is_view(g: &Graph, i: usize, s: &Slot) -> bool {
    s.alias_of.is_some() && matches!(g.nodes[i].op, Op::Reshape(_) | Op::Slice { .. })
}

/// Run `g` node by node through an arena laid out by `plan`; every input
/// read from the arena must equal the value computed without one. Returns
/// an error naming the first clobbered value.
fn execute(g: &Graph, plan: &MemoryPlan, inputs: &HashMap<String, Vec<f32>>) -> Result<(), String> {
    let mut arena = vec![f32::NAN; (plan.arena_bytes / 4) as usize];
    let mut truth: Vec<Vec<f32>> = Vec::with_capacity(g.nodes.len());
    let read = |arena: &[f32], truth: &[Vec<f32>], x: NodeId| -> Vec<f32> {
        match plan.values[x.index()] {
            Some(s) => {
                assert_eq!(s.offset % 4, 0, "f32 value at an unaligned offset");
                arena[(s.offset / 4) as usize..((s.offset + s.bytes) / 4) as usize].to_vec()
            }
            None => truth[x.index()].clone(),
        }
    };
    for (i, n) in g.nodes.iter().enumerate() {
        let v = match &n.op {
            Op::Input(name) => inputs[name].clone(),
            Op::Const(d) => d.to_vec(),
            Op::Param(_) => unreachable!("test graphs have no params"),
            _ => {
                let mut args = Vec::new();
                for x in &n.inputs {
                    let got = read(&arena, &truth, *x);
                    if !same(&got, &truth[x.index()]) {
                        return Err(format!("%{} read by %{i} was clobbered", x.0));
                    }
                    args.push(got);
                }
                eval_node(g, i, &args)
            }
        };
        if let Some(s) = plan.values[i] {
            // A view is never written: its bytes are its base's.
            if !is_view(g, i, &s) {
                arena[(s.offset / 4) as usize..((s.offset + s.bytes) / 4) as usize].copy_from_slice(&v);
            }
        }
        truth.push(v);
    }
    for (name, id) in &g.outputs {
        if !same(&read(&arena, &truth, *id), &truth[id.index()]) {
            return Err(format!("output {name} (%{}) was clobbered", id.0));
        }
    }
    Ok(())
}

fn data(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect()
}

/// Plan, validate, execute, and check the bounds every plan must meet.
fn plan_ok(g: &Graph, opts: &PlanOptions) -> MemoryPlan {
    let p = plan_memory(g, opts);
    p.check(g).unwrap_or_else(|e| panic!("check failed: {e}\n{g}"));
    assert!(p.peak_bytes <= p.arena_bytes, "peak {} > arena {}", p.peak_bytes, p.arena_bytes);
    assert!(p.arena_bytes <= p.naive_bytes, "arena {} > naive {}", p.arena_bytes, p.naive_bytes);
    assert_eq!(p.arena_bytes % opts.align.max(1), 0);
    let inputs: HashMap<String, Vec<f32>> = g
        .inputs()
        .iter()
        .enumerate()
        .map(|(k, (name, ty))| (name.to_string(), data(ty.shape.numel(), k as f32 * 10.0)))
        .collect();
    execute(g, &p, &inputs).unwrap_or_else(|e| panic!("{e}\nplan {p:?}\n{g}"));
    p
}

#[test]
fn elementwise_chain_runs_in_one_buffer() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![8, 16]);
    let a = g.unary(UnaryOp::Tanh, x).unwrap();
    let b = g.unary(UnaryOp::Neg, a).unwrap();
    let c = g.silu(b).unwrap();
    let d = g.softmax(c).unwrap();
    let e = g.unary(UnaryOp::Sigmoid, d).unwrap();
    g.set_output("y", e);
    let p = plan_ok(&g, &PlanOptions::default());
    // The first op cannot overwrite the caller's input; each later one takes over its input.
    assert_eq!(p.values[x.index()], None);
    assert_eq!(p.values[a.index()].unwrap().alias_of, None);
    for (v, from) in [(b, a), (c, b), (d, c), (e, d)] {
        let s = p.values[v.index()].unwrap();
        assert_eq!((s.offset, s.alias_of), (0, Some(from)), "%{}", v.0);
    }
    assert_eq!((p.in_place, p.buffers), (4, 1));
    assert_eq!(p.arena_bytes, 8 * 16 * 4);
    assert_eq!(p.peak_bytes, p.arena_bytes);
    assert_eq!(p.naive_bytes, 5 * 512);
    let no = plan_ok(&g, &PlanOptions { in_place: false, ..PlanOptions::default() });
    assert_eq!((no.in_place, no.buffers, no.arena_bytes), (0, 5, 2 * 512), "without in-place, two buffers alternate");
}

#[test]
fn diamond_keeps_the_shared_value_until_its_last_reader() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![4, 64]);
    let a = g.unary(UnaryOp::Tanh, x).unwrap();
    let b = g.unary(UnaryOp::Neg, a).unwrap(); // a is still read by c: not in place
    let c = g.unary(UnaryOp::Sigmoid, a).unwrap(); // a dies here: in place
    let d = g.add(b, c).unwrap(); // both die here: in place over b
    g.set_output("y", d);
    let p = plan_ok(&g, &PlanOptions::default());
    let s = |v: NodeId| p.values[v.index()].unwrap();
    assert_eq!(s(b).alias_of, None);
    assert_ne!(s(b).offset, s(a).offset);
    assert_eq!((s(c).offset, s(c).alias_of), (s(a).offset, Some(a)));
    assert_eq!((s(d).offset, s(d).alias_of), (s(b).offset, Some(b)));
    assert_eq!((p.buffers, p.arena_bytes, p.peak_bytes), (2, 2048, 2048));
}

/// `x·w` five times: no op can run in place, but values two steps apart
/// never live at once, so %a, %c, %e share one slot and %b, %d another.
#[test]
fn reuse_lets_three_values_share_one_slot() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![16, 16]);
    let w = g.input("w", DType::F32, vec![16, 16]);
    let mut chain = vec![];
    let mut h = x;
    for _ in 0..5 {
        h = g.matmul(h, w).unwrap();
        chain.push(h);
    }
    g.set_output("y", h);
    let p = plan_ok(&g, &PlanOptions::default());
    let off: Vec<u64> = chain.iter().map(|v| p.values[v.index()].unwrap().offset).collect();
    assert_eq!((off[0], off[2], off[4]), (off[0], off[0], off[0]), "{off:?}");
    assert_eq!(off[1], off[3]);
    assert_ne!(off[0], off[1]);
    assert_eq!((p.in_place, p.buffers, p.arena_bytes, p.peak_bytes), (0, 5, 2048, 2048));
    let seq = plan_ok(&g, &PlanOptions { reuse: false, ..PlanOptions::default() });
    assert_eq!((seq.arena_bytes, seq.strategy), (5 * 1024, Strategy::Sequential));
    assert_eq!(seq.arena_bytes, seq.naive_bytes);
}

#[test]
fn outputs_are_kept_to_the_end() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![16, 16]);
    let w = g.input("w", DType::F32, vec![16, 16]);
    let a = g.matmul(x, w).unwrap();
    let b = g.matmul(a, w).unwrap();
    let t = g.unary(UnaryOp::Tanh, a).unwrap(); // a is an output: never overwritten in place
    let c = g.matmul(b, w).unwrap();
    let d = g.matmul(c, w).unwrap();
    let e = g.add(d, t).unwrap();
    g.set_output("a", a);
    g.set_output("e", e);
    let p = plan_ok(&g, &PlanOptions::default());
    let s = |v: NodeId| p.values[v.index()].unwrap();
    assert_eq!(s(t).alias_of, None);
    let sa = s(a);
    for v in [b, t, c, d, e] {
        let sv = s(v);
        assert!(sv.offset >= sa.offset + sa.bytes || sv.offset + sv.bytes <= sa.offset, "%{} overlaps output a", v.0);
    }
}

#[test]
fn views_alias_their_base_and_block_in_place_writes() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![4, 8]);
    let xr = g.reshape(x, vec![32]).unwrap(); // a view of a leaf: not in the arena
    let a = g.unary(UnaryOp::Tanh, x).unwrap();
    let r = g.reshape(a, vec![8, 4]).unwrap();
    let s = g.slice(a, 0, 1, 3).unwrap(); // rows 1..3: contiguous, a view at +32 bytes
    let cols = g.slice(a, 1, 2, 6).unwrap(); // columns: strided, copied
    let e = g.unary(UnaryOp::Neg, a).unwrap(); // a's last direct reader, but the views live on
    let rs = g.unary(UnaryOp::Sigmoid, r).unwrap();
    let s4 = g.reshape(s, vec![4, 4]).unwrap(); // a view of a view
    let t = g.add(s4, cols).unwrap();
    let e4 = g.reshape(e, vec![8, 4]).unwrap();
    let o = g.concat(&[e4, t], 0).unwrap();
    let xo = g.unary(UnaryOp::Neg, xr).unwrap();
    g.set_output("o", o);
    g.set_output("rs", rs);
    g.set_output("xo", xo);
    let p = plan_ok(&g, &PlanOptions::default());
    let v = |n: NodeId| p.values[n.index()].unwrap();
    assert_eq!(p.values[xr.index()], None);
    assert_eq!(v(r), Slot { offset: v(a).offset, bytes: 128, alias_of: Some(a) });
    assert_eq!(v(s), Slot { offset: v(a).offset + 32, bytes: 64, alias_of: Some(a) });
    assert_eq!(v(s4), Slot { offset: v(a).offset + 32, bytes: 64, alias_of: Some(s) });
    assert_eq!(v(cols).alias_of, None);
    assert_eq!(v(e).alias_of, None, "the views of a are read after e");
    assert_eq!(v(rs).alias_of, None, "s still views a's buffer when rs runs");
    assert_eq!(p.views, 4);
}

#[test]
fn fused_nodes_overwrite_their_residual_or_sum_inputs() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![4, 8]);
    let w = g.constant(data(64, 1.0), vec![8, 8]).unwrap();
    let nw = g.constant(data(8, 2.0), vec![8]).unwrap();
    let h = g.unary(UnaryOp::Tanh, x).unwrap();
    let y = g.unary(UnaryOp::Sigmoid, x).unwrap();
    let lin = Op::Linear { bias: false, act: Act::None, residual: true };
    let l = g.push(lin.clone(), &[y, w, h]).unwrap(); // over h
    let an = g.push(Op::AddNorm { rms: true, eps: 1e-6 }, &[l, y, nw]).unwrap(); // over l
    let z = g.unary(UnaryOp::Neg, an).unwrap();
    let self_res = g.push(lin, &[z, w, z]).unwrap(); // x·wᵀ + x reads every column of x: not in place
    g.set_output("o", self_res);
    let p = plan_ok(&g, &PlanOptions::default());
    let v = |n: NodeId| p.values[n.index()].unwrap();
    assert_eq!((v(l).offset, v(l).alias_of), (v(h).offset, Some(h)));
    assert_eq!((v(an).offset, v(an).alias_of), (v(l).offset, Some(l)));
    assert_eq!(v(self_res).alias_of, None);
}

#[test]
fn check_rejects_broken_plans() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![16, 16]);
    let a = g.matmul(x, x).unwrap();
    let b = g.matmul(a, x).unwrap();
    let c = g.unary(UnaryOp::Neg, b).unwrap();
    let d = g.matmul(c, a).unwrap();
    g.set_output("d", d);
    let good = plan_ok(&g, &PlanOptions::default());
    let mut bad = good.clone();
    // a is live until d: b (and c, which overwrites b) may not sit on it.
    for v in [b, c] {
        bad.values[v.index()].as_mut().unwrap().offset = good.values[a.index()].unwrap().offset;
    }
    let err = bad.check(&g).unwrap_err();
    assert!(err.contains("share bytes"), "{err}");
    let inputs = HashMap::from([("x".to_string(), data(256, 0.0))]);
    assert!(execute(&g, &bad, &inputs).is_err(), "the overlap is real: executing it clobbers a");
    let mut bad = good.clone();
    bad.values[c.index()].as_mut().unwrap().alias_of = Some(a); // c does not read a
    assert!(bad.check(&g).unwrap_err().contains("in place"));
    let mut bad = good.clone();
    bad.arena_bytes -= 256;
    assert!(bad.check(&g).unwrap_err().contains("past the arena"));
    let mut bad = good.clone();
    bad.values[x.index()] = Some(Slot { offset: 0, bytes: 1024, alias_of: None });
    assert!(bad.check(&g).unwrap_err().contains("leaf"));
    let mut bad = good.clone();
    bad.values[d.index()] = None;
    assert!(bad.check(&g).unwrap_err().contains("no slot"));
    let mut bad = good;
    bad.values[a.index()].as_mut().unwrap().offset += 4;
    bad.arena_bytes += 256;
    assert!(bad.check(&g).unwrap_err().contains("multiple of 256"));
}

#[test]
fn kv_cache_of_the_full_size_decoder() {
    // 32 layers × 32 heads × 128 × 2048 positions, keys and values, bf16: 1 GiB.
    assert_eq!(kv_cache_bytes(32, 32, 128, 2048, 1, DType::BF16), 1 << 30);
    assert_eq!(kv_cache_bytes(32, 32, 128, 2048, 4, DType::F32), 8 << 30);
    assert_eq!(kv_cache_bytes(2, 4, 32, 0, 1, DType::F32), 0);
}

#[test]
fn empty_and_leaf_only_graphs() {
    let g = Graph::new();
    let p = plan_ok(&g, &PlanOptions::default());
    assert_eq!((p.arena_bytes, p.peak_bytes, p.naive_bytes), (0, 0, 0));
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![3]);
    g.set_output("x", x);
    let p = plan_ok(&g, &PlanOptions { align: 0, ..PlanOptions::default() });
    assert_eq!((p.arena_bytes, p.values[0]), (0, None));
}

/// One random step of a DAG: an op kind, two operand picks and a parameter.
type Step = (u8, usize, usize, usize);

/// Builds a graph from random steps; steps that do not type-check are skipped.
fn random_graph(steps: &[Step], outs: &[usize]) -> Graph {
    let mut g = Graph::new();
    let mut vals = vec![
        g.input("x", DType::F32, vec![4, 8]),
        g.input("y", DType::F32, vec![4, 8]),
        g.input("r", DType::F32, vec![8]),
    ];
    let unary = [UnaryOp::Neg, UnaryOp::Tanh, UnaryOp::Sigmoid];
    let binary = [qvc_ir::BinaryOp::Add, qvc_ir::BinaryOp::Sub, qvc_ir::BinaryOp::Mul, qvc_ir::BinaryOp::Max];
    for (k, &(kind, i, j, p)) in steps.iter().enumerate() {
        // The first operand leans to recent values, so chains get long.
        let (a, b) = (vals[vals.len() - 1 - (i % 8).min(vals.len() - 1)], vals[j % vals.len()]);
        let (sa, sb) = (g.shape(a).clone(), g.shape(b).clone());
        let last = sa.last();
        let r = match kind % 13 {
            0 => g.unary(unary[p % 3], a),
            1 => g.binary(binary[p % 4], a, b),
            2 => g.matmul_t(a, b),
            3 if sa.rank() == 2 => g.reshape(a, vec![sa.dim(1), sa.dim(0)]),
            3 => g.reshape(a, vec![1, sa.numel()]),
            4 => {
                let n = sa.dim(0);
                let s = p % n;
                g.slice(a, 0, s, s + 1 + (p / n) % (n - s))
            }
            5 => g.slice(a, sa.rank() - 1, 0, 1 + p % last),
            6 => g.softmax(a),
            7 => {
                let w = g.constant(data(last, k as f32), vec![last]).unwrap();
                g.rms_norm(a, w, 1e-5)
            }
            8 => {
                let w = g.constant(data(last, k as f32), vec![last]).unwrap();
                g.push(Op::AddNorm { rms: true, eps: 1e-5 }, &[a, b, w])
            }
            // Linear accepts a rank-1 x, but its expansion (matmul_t) does not.
            9 if sa.rank() >= 2 => {
                let w = g.constant(data(sb.last() * last, k as f32), vec![sb.last(), last]).unwrap();
                g.push(Op::Linear { bias: false, act: Act::None, residual: true }, &[a, w, b])
            }
            10 if sa.numel() + sb.numel() <= 512 => g.concat(&[a, b], 0),
            11 => g.reduce(qvc_ir::ReduceOp::Sum, a, sa.rank() - 1),
            12 => g.gelu(a),
            _ => continue,
        };
        if let Ok(v) = r {
            vals.push(v);
        }
    }
    let n = vals.len();
    g.set_output("last", vals[n - 1]);
    for (k, o) in outs.iter().enumerate() {
        g.set_output(&format!("o{k}"), vals[o % n]);
    }
    g
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn random_dags_get_valid_plans(
        steps in prop::collection::vec((0u8..13, 0usize..64, 0usize..64, 0usize..64), 1..48),
        outs in prop::collection::vec(0usize..64, 0..3),
    ) {
        let g = random_graph(&steps, &outs);
        for opts in [
            PlanOptions::default(),
            PlanOptions { align: 4, ..PlanOptions::default() },
            PlanOptions { in_place: false, ..PlanOptions::default() },
            PlanOptions { reuse: false, ..PlanOptions::default() },
        ] {
            plan_ok(&g, &opts);
        }
    }
}
