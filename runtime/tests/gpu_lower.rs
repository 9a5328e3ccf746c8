//! The GPU lowering on graphs the model does not build: every primitive op
//! with a device kernel (broadcasts, permutes, concat, iota, where, reduce,
//! softmax, a batched matmul, gather, scatter), and the host fallback for a
//! node no kernel accepts, all run on the PTX emulator and compared with the
//! reference interpreter.

use half::bf16;
use qvc_codegen::Target;
use qvc_ir::{BinaryOp, DType, Elems, Graph, InputRef, Mask, ReduceOp, UnaryOp, WeightSource};
use qvc_runtime::gpu::lower::KvShape;
use qvc_runtime::gpu::{EmuDevice, GpuBackend};
use qvc_runtime::{Backend, Inputs, Reference};
use std::collections::HashMap;

struct Weights(HashMap<String, Vec<bf16>>);

impl WeightSource for Weights {
    fn weight(&self, name: &str) -> Option<Elems<'_>> {
        self.0.get(name).map(|v| Elems::BF16(v))
    }
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed * 97) % 2000) as f32 / 1000.0 - 1.0).collect()
}

fn backend() -> GpuBackend {
    let kv = KvShape { layers: 0, heads: 1, head_dim: 8, max_seq: 8 };
    GpuBackend::new(Box::new(EmuDevice::new(Target::Sm80)), kv, 1, None)
}

fn compare(g: &Graph, w: &Weights, inputs: &Inputs, tol: f64) -> GpuBackend {
    let gpu = backend();
    let want = Reference.run(g, w, inputs).unwrap();
    let got = gpu.run(g, w, inputs).unwrap();
    for (name, v) in &want {
        let x = &got[name];
        assert_eq!(x.len(), v.len(), "{name}");
        for (i, (a, b)) in x.iter().zip(v).enumerate() {
            let err = (a - b).abs() as f64;
            assert!(err <= tol * (1.0 + b.abs() as f64), "{name}[{i}]: gpu {a} vs reference {b}");
        }
    }
    gpu
}

#[test]
fn primitive_ops_run_as_kernels() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![3, 5, 4]);
    let y = g.input("y", DType::F32, vec![5, 1]);
    let ids = g.input("ids", DType::I32, vec![4]);
    let rows = g.input("rows", DType::I32, vec![2]);
    let table = g.param("table", DType::BF16, vec![6, 4]);
    let b = g.param("b", DType::BF16, vec![4, 7]);
    let s = g.add(x, y).unwrap(); // broadcast [5, 1] over [3, 5, 4]
    let e = g.unary(UnaryOp::Exp, s).unwrap();
    let p = g.permute(e, vec![1, 0, 2]).unwrap(); // [5, 3, 4]
    let sl = g.slice(p, 1, 1, 3).unwrap(); // non-contiguous [5, 2, 4]
    let io = g.iota(vec![5, 2, 4], 2).unwrap();
    let ge = g.binary(BinaryOp::Ge, sl, io).unwrap();
    let wh = g.where_(ge, sl, io).unwrap();
    let c = g.concat(&[wh, sl], 1).unwrap(); // [5, 4, 4]
    let r = g.reduce(ReduceOp::Mean, c, 1).unwrap(); // [5, 1, 4]
    let sm = g.softmax(c).unwrap();
    let mm = g.matmul(sm, b).unwrap(); // [5, 4, 7], rank-2 b shared
    let ga = g.gather(table, ids).unwrap(); // [4, 4]
    let src = g.slice(ga, 0, 0, 2).unwrap();
    let sc = g.scatter_rows(ga, src, rows).unwrap();
    let ln_w = g.param("ln_w", DType::BF16, vec![4]);
    let rn = g.rms_norm(sc, ln_w, 1e-6).unwrap();
    for (name, id) in [("r", r), ("mm", mm), ("sc", sc), ("rn", rn)] {
        g.set_output(name, id);
    }
    let w = Weights(HashMap::from([
        ("table".to_string(), values(24, 1).into_iter().map(bf16::from_f32).collect()),
        ("b".to_string(), values(28, 2).into_iter().map(bf16::from_f32).collect()),
        ("ln_w".to_string(), values(4, 3).into_iter().map(|v| bf16::from_f32(1.0 + v / 4.0)).collect()),
    ]));
    let (xv, yv) = (values(60, 4), values(5, 5));
    let (idv, rv) = (vec![3, 0, 5, 1], vec![2, 0]);
    let inputs: Inputs = HashMap::from([
        ("x".to_string(), InputRef::F32(&xv)),
        ("y".to_string(), InputRef::F32(&yv)),
        ("ids".to_string(), InputRef::I32(&idv)),
        ("rows".to_string(), InputRef::I32(&rv)),
    ]);
    let gpu = compare(&g, &w, &inputs, 1e-5);
    assert_eq!(gpu.stats().host_nodes, 0, "{:?}", gpu.stats());
    // `NO_ROW` in the scatter's index writes nothing, as in the reference.
    let skip = vec![qvc_ir::NO_ROW, 1];
    let inputs: Inputs = HashMap::from([
        ("x".to_string(), InputRef::F32(&xv)),
        ("y".to_string(), InputRef::F32(&yv)),
        ("ids".to_string(), InputRef::I32(&idv)),
        ("rows".to_string(), InputRef::I32(&skip)),
    ]);
    compare(&g, &w, &inputs, 1e-5);
}

/// Head dim 12 is no multiple of 8: the flash kernel refuses it, so the
/// node runs on the host between device kernels, with the same result.
#[test]
fn a_node_no_kernel_takes_runs_on_the_host() {
    let mut g = Graph::new();
    let q = g.input("q", DType::F32, vec![5, 2, 12]);
    let k = g.input("k", DType::F32, vec![7, 2, 12]);
    let v = g.input("v", DType::F32, vec![7, 2, 12]);
    let a = g.attention(q, k, v, Mask::None, 0.3).unwrap();
    let o = g.unary(UnaryOp::Tanh, a).unwrap();
    g.set_output("o", o);
    let (qv, kv, vv) = (values(120, 1), values(168, 2), values(168, 3));
    let inputs: Inputs = HashMap::from([
        ("q".to_string(), InputRef::F32(&qv)),
        ("k".to_string(), InputRef::F32(&kv)),
        ("v".to_string(), InputRef::F32(&vv)),
    ]);
    let gpu = compare(&g, &Weights(HashMap::new()), &inputs, 1e-5);
    let st = gpu.stats();
    assert_eq!(st.host_nodes, 1, "{st:?}");
    assert!(st.launches >= 1, "{st:?}");
}

/// Wrong or missing inputs are errors that name the input.
#[test]
fn bad_inputs_are_named() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![4]);
    let y = g.unary(UnaryOp::Neg, x).unwrap();
    g.set_output("y", y);
    let gpu = backend();
    let w = Weights(HashMap::new());
    let e = gpu.run(&g, &w, &HashMap::new()).unwrap_err().to_string();
    assert!(e.contains("\"x\""), "{e}");
    let short = [1.0f32; 3];
    let e = gpu.run(&g, &w, &HashMap::from([("x".to_string(), InputRef::F32(&short))])).unwrap_err().to_string();
    assert!(e.contains("\"x\"") && e.contains('3'), "{e}");
}
