//! Graph building, shape inference and the reference interpreter on small
//! hand-checked programs.

use qvc_ir::{run_reference_output, DType, Graph, InputRef, IrError, Mask, Op};
use std::collections::HashMap;

fn run1(g: &Graph, inputs: &[(&str, &[f32])], out: &str) -> Vec<f32> {
    let w: HashMap<String, Vec<f32>> = HashMap::new();
    let inputs: HashMap<String, InputRef> = inputs.iter().map(|(n, v)| (n.to_string(), InputRef::F32(v))).collect();
    run_reference_output(g, &w, &inputs, out).unwrap()
}

#[test]
fn shape_inference_rejects_bad_programs() {
    let mut g = Graph::new();
    let a = g.input("a", DType::F32, vec![2, 3]);
    let b = g.input("b", DType::F32, vec![4, 3]);
    assert!(matches!(g.matmul(a, b), Err(IrError::Type { .. })));
    let mt = g.matmul_t(a, b).unwrap();
    assert_eq!(g.shape(mt).0, vec![2, 4]);
    assert!(g.add(a, b).is_err());
    let row = g.input("r", DType::F32, vec![3]);
    let ar = g.add(a, row).unwrap();
    assert_eq!(g.shape(ar).0, vec![2, 3]);
    assert!(g.reshape(a, vec![5]).is_err());
    assert!(g.permute(a, vec![0, 0]).is_err());
    assert!(g.slice(a, 1, 2, 4).is_err());
    let ids = g.input("ids", DType::F32, vec![2]);
    assert!(g.gather(a, ids).is_err(), "gather ids must be i32");
    let err = g.attention(a, b, b, Mask::None, 1.0).unwrap_err();
    assert!(err.to_string().contains("attention"), "{err}");
}

#[test]
fn interpreter_computes_small_programs_exactly() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2, 3]);
    let w = g.input("w", DType::F32, vec![4, 3]);
    let y = g.matmul_t(x, w).unwrap();
    let s = g.softmax(y).unwrap();
    let t = g.permute(x, vec![1, 0]).unwrap();
    let c = g.concat(&[x, x], 1).unwrap();
    let sl = g.slice(c, 1, 2, 4).unwrap();
    g.set_output("y", y);
    g.set_output("s", s);
    g.set_output("t", t);
    g.set_output("sl", sl);
    let xv = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let wv = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
    let ins: &[(&str, &[f32])] = &[("x", &xv), ("w", &wv)];
    assert_eq!(run1(&g, ins, "y"), vec![1.0, 2.0, 3.0, 6.0, 4.0, 5.0, 6.0, 15.0]);
    assert_eq!(run1(&g, ins, "t"), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    assert_eq!(run1(&g, ins, "sl"), vec![3.0, 1.0, 6.0, 4.0]);
    let s = run1(&g, ins, "s");
    assert!((s[..4].iter().sum::<f32>() - 1.0).abs() < 1e-6);
    assert!(s[3] > s[2] && s[2] > s[1]);
}

#[test]
fn causal_attention_expansion_masks_the_future() {
    // One head, d = 1, equal scores: query i averages v over keys 0..=i.
    let mut g = Graph::new();
    let q = g.input("q", DType::F32, vec![3, 1, 1]);
    let k = g.input("k", DType::F32, vec![3, 1, 1]);
    let v = g.input("v", DType::F32, vec![3, 1, 1]);
    let a = g.attention(q, k, v, Mask::Causal, 1.0).unwrap();
    g.set_output("a", a);
    let out = run1(&g, &[("q", &[0.0; 3]), ("k", &[0.0; 3]), ("v", &[0.0, 1.0, 2.0])], "a");
    for (o, w) in out.iter().zip([0.0, 0.5, 1.0]) {
        assert!((o - w).abs() < 1e-6, "{out:?}");
    }
}

#[test]
fn cached_attention_equals_full_causal_attention() {
    let vals = |n: usize, s: f32| (0..n).map(|i| (i as f32 * s).sin()).collect::<Vec<f32>>();
    let (t, h, d) = (5, 2, 4);
    let (q, k, v) = (vals(t * h * d, 0.7), vals(t * h * d, 1.3), vals(t * h * d, 0.4));
    let mut full = Graph::new();
    let qi = full.input("q", DType::F32, vec![t, h, d]);
    let ki = full.input("k", DType::F32, vec![t, h, d]);
    let vi = full.input("v", DType::F32, vec![t, h, d]);
    let a = full.attention(qi, ki, vi, Mask::Causal, 0.5).unwrap();
    full.set_output("a", a);
    let want = run1(&full, &[("q", &q), ("k", &k), ("v", &v)], "a");
    let mut step = Graph::new();
    let qi = step.input("q", DType::F32, vec![1, h, d]);
    let ki = step.input("k", DType::F32, vec![1, h, d]);
    let vi = step.input("v", DType::F32, vec![1, h, d]);
    let pk = step.input("pk", DType::F32, vec![t - 1, h, d]);
    let pv = step.input("pv", DType::F32, vec![t - 1, h, d]);
    let a = step.attention_cached(qi, ki, vi, pk, pv, 0.5).unwrap();
    step.set_output("a", a);
    let last = (t - 1) * h * d;
    let ins: &[(&str, &[f32])] =
        &[("q", &q[last..]), ("k", &k[last..]), ("v", &v[last..]), ("pk", &k[..last]), ("pv", &v[..last])];
    let got = run1(&step, ins, "a");
    for (g, w) in got.iter().zip(&want[last..]) {
        assert!((g - w).abs() < 1e-6);
    }
}

#[test]
fn expansion_leaves_only_primitives_and_keeps_the_interface() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![4, 2, 8]);
    let w = g.param("w", DType::BF16, vec![8]);
    let n = g.rms_norm(x, w, 1e-6).unwrap();
    let cs = g.input("cos", DType::F32, vec![4, 8]);
    let r = g.rotary(n, cs, cs).unwrap();
    let a = g.attention(r, r, r, Mask::Causal, 0.3).unwrap();
    let gl = g.gelu(a).unwrap();
    g.set_output("out", gl);
    let e = qvc_ir::expand_all(&g).unwrap();
    assert!(e.nodes.iter().all(|n| !n.op.is_composite()));
    assert_eq!(e.inputs().len(), g.inputs().len());
    assert_eq!(e.params(), g.params());
    assert_eq!(e.ty(e.output("out").unwrap()), g.ty(g.output("out").unwrap()));
    assert!(e.nodes.iter().any(|n| matches!(n.op, Op::Iota { .. })), "causal mask is built from iota");
    assert!(format!("{g}").contains("attention(causal)"));
}

#[test]
fn reference_reports_missing_inputs_and_bad_ids() {
    let mut g = Graph::new();
    let t = g.input("table", DType::F32, vec![3, 2]);
    let ids = g.input("ids", DType::I32, vec![2]);
    let y = g.gather(t, ids).unwrap();
    g.set_output("y", y);
    let w: HashMap<String, Vec<f32>> = HashMap::new();
    let table = [0.0f32; 6];
    let err =
        qvc_ir::run_reference(&g, &w, &HashMap::from([("table".to_string(), InputRef::F32(&table))])).unwrap_err();
    assert!(err.to_string().contains("\"ids\""), "{err}");
    let bad = [0i32, 3];
    let inputs =
        HashMap::from([("table".to_string(), InputRef::F32(&table)), ("ids".to_string(), InputRef::I32(&bad))]);
    let err = qvc_ir::run_reference(&g, &w, &inputs).unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
}

/// `ScatterRows`: `NO_ROW` (-1) entries write nothing (a program compiled
/// for more rows than a prompt has), real rows land where they say, and any
/// other index outside the destination is an error.
#[test]
fn scatter_rows_skips_no_row_and_refuses_other_bad_indices() {
    let mut g = Graph::new();
    let d = g.input("dst", DType::F32, vec![4, 2]);
    let s = g.input("src", DType::F32, vec![3, 2]);
    let r = g.input("rows", DType::I32, vec![3]);
    let y = g.scatter_rows(d, s, r).unwrap();
    g.set_output("y", y);
    let w: HashMap<String, Vec<f32>> = HashMap::new();
    let dst = [0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0];
    let src = [10.0f32, 11.0, 12.0, 13.0, 14.0, 15.0];
    let run = |rows: &[i32]| {
        let inputs = HashMap::from([
            ("dst".to_string(), InputRef::F32(&dst)),
            ("src".to_string(), InputRef::F32(&src)),
            ("rows".to_string(), InputRef::I32(rows)),
        ]);
        run_reference_output(&g, &w, &inputs, "y")
    };
    assert_eq!(run(&[2, qvc_ir::NO_ROW, 0]).unwrap(), [14.0, 15.0, 2.0, 3.0, 10.0, 11.0, 6.0, 7.0]);
    assert_eq!(run(&[qvc_ir::NO_ROW; 3]).unwrap(), dst);
    for bad in [[1, 4, qvc_ir::NO_ROW], [-2, 0, 1]] {
        let err = run(&bad).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{bad:?}: {err}");
    }
}

#[test]
fn erf_is_accurate() {
    for (x, want) in [
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (2.5, 0.999_593_047_982_555),
        (3.5, 0.999_999_256_901_627_7),
    ] {
        assert!((qvc_ir::interp::erf_f64(x) - want).abs() < 1e-12, "erf({x})");
        assert!((qvc_ir::interp::erf_f64(-x) + want).abs() < 1e-12);
    }
}
