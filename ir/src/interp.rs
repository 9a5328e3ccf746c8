//! The naive reference interpreter.
//!
//! Written for clarity, not speed: composites are first expanded into
//! primitives ([`crate::expand_all`]), then each primitive is evaluated
//! element by element, with f64 arithmetic inside every reduction and dot
//! product. Backends are tested against it.

use crate::graph::{BinaryOp, Graph, IrError, Node, Op, ReduceOp, UnaryOp};
use crate::tensor::{DType, Elems, Shape};
use rayon::prelude::*;
use std::collections::HashMap;

/// A run-time input, borrowed.
#[derive(Clone, Copy, Debug)]
pub enum InputRef<'a> {
    F32(&'a [f32]),
    I32(&'a [i32]),
}

/// Where `Param` nodes get their data: a checkpoint, a test's random weights.
pub trait WeightSource: Sync {
    /// The stored elements of tensor `name`, or `None` if there is none.
    fn weight(&self, name: &str) -> Option<Elems<'_>>;
}

impl WeightSource for HashMap<String, Vec<f32>> {
    fn weight(&self, name: &str) -> Option<Elems<'_>> {
        self.get(name).map(|v| Elems::F32(v))
    }
}

/// Errors while running a graph.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("input {name:?} was not given")]
    MissingInput { name: String },
    #[error("input {name:?} has {got} elements of type {got_dtype}, the graph expects {want} of type {want_dtype}")]
    BadInput { name: String, got: usize, got_dtype: DType, want: usize, want_dtype: DType },
    #[error("weight {name:?} is missing or has {got} elements where {want} are expected")]
    BadWeight { name: String, got: usize, want: usize },
    #[error("row index {index} out of range 0..{len} in {op}")]
    IndexOutOfRange { op: String, index: i64, len: usize },
    #[error(transparent)]
    Ir(#[from] IrError),
    /// A device backend failed (the message names the device, kernel or buffer).
    #[error("{0}")]
    Device(String),
}

/// A computed tensor.
#[derive(Clone, Debug)]
pub enum Value {
    F32(Vec<f32>),
    I32(Vec<i32>),
}

impl Value {
    /// The values as f32 (ids converted exactly: they are below 2^24).
    pub fn into_f32(self) -> Vec<f32> {
        match self {
            Value::F32(v) => v,
            Value::I32(v) => v.into_iter().map(|x| x as f32).collect(),
        }
    }
    pub fn as_f32(&self) -> &[f32] {
        match self {
            Value::F32(v) => v,
            Value::I32(_) => panic!("value is i32 where f32 was expected (graph types were checked at build time)"),
        }
    }
    fn as_i32(&self) -> &[i32] {
        match self {
            Value::I32(v) => v,
            Value::F32(_) => panic!("value is f32 where i32 was expected (graph types were checked at build time)"),
        }
    }
}

/// Look up input `name` and check it against the graph's type: every
/// backend binds inputs through this, so they report the same errors.
pub fn bind_input<'a>(
    name: &str,
    ty: &crate::graph::TensorType,
    inputs: &HashMap<String, InputRef<'a>>,
) -> Result<InputRef<'a>, ExecError> {
    let want = ty.shape.numel();
    let given = *inputs.get(name).ok_or_else(|| ExecError::MissingInput { name: name.into() })?;
    let (got, got_dtype) = match given {
        InputRef::F32(v) => (v.len(), DType::F32),
        InputRef::I32(v) => (v.len(), DType::I32),
    };
    if got != want || (got_dtype == DType::I32) != (ty.dtype == DType::I32) {
        return Err(ExecError::BadInput { name: name.into(), got, got_dtype, want, want_dtype: ty.dtype });
    }
    Ok(given)
}

/// For each element of `out`, the offset of the element of `inp` that
/// broadcasts onto it.
pub fn broadcast_offsets(out: &Shape, inp: &Shape) -> Vec<usize> {
    let r = out.rank();
    let istr = inp.strides();
    let mut strides = vec![0usize; r];
    for (i, (&d, &st)) in inp.dims().iter().zip(&istr).enumerate() {
        if d != 1 {
            strides[r - inp.rank() + i] = st;
        }
    }
    strided_offsets(out, &strides)
}

/// Offsets `sum(index[i] * strides[i])` for every index of `shape`, row-major.
pub fn strided_offsets(shape: &Shape, strides: &[usize]) -> Vec<usize> {
    let n = shape.numel();
    let mut offs = Vec::with_capacity(n);
    let mut idx = vec![0usize; shape.rank()];
    let mut cur = 0usize;
    for _ in 0..n {
        offs.push(cur);
        for a in (0..shape.rank()).rev() {
            idx[a] += 1;
            cur += strides[a];
            if idx[a] < shape.dim(a) {
                break;
            }
            cur -= strides[a] * idx[a];
            idx[a] = 0;
        }
    }
    offs
}

/// erf in f64: Taylor series below 2.5, the continued fraction of erfc
/// above; |error| < 1e-13.
pub fn erf_f64(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 2.5 {
        let (mut term, mut sum, x2) = (a, a, a * a);
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -x2 / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        let mut k = a;
        for n in (1..=80).rev() {
            k = a + (n as f64 / 2.0) / k;
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / k
    };
    r.copysign(x)
}

/// One element of [`UnaryOp`] as the interpreter computes it (in f64; the
/// caller rounds). GPU references reuse it so they match by construction.
pub fn unary(op: UnaryOp, x: f64) -> f64 {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Recip => 1.0 / x,
        UnaryOp::Erf => erf_f64(x),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
    }
}

/// One element of [`BinaryOp`] as the interpreter computes it (in f64).
pub fn binary(op: BinaryOp, a: f64, b: f64) -> f64 {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Max => a.max(b),
        BinaryOp::Ge => f64::from(u8::from(a >= b)),
    }
}

/// Evaluate `graph` on `inputs` and return every named output.
pub fn run_reference(
    graph: &Graph,
    weights: &dyn WeightSource,
    inputs: &HashMap<String, InputRef<'_>>,
) -> Result<HashMap<String, Value>, ExecError> {
    let g = crate::expand::expand_all(graph)?;
    let mut vals: Vec<Option<Value>> = vec![None; g.nodes.len()];
    let last = g.last_uses();
    for (i, n) in g.nodes.iter().enumerate() {
        let v = eval(&g, n, &vals, weights, inputs)?;
        vals[i] = Some(v);
        for inp in &n.inputs {
            if last[inp.index()] == i {
                vals[inp.index()] = None;
            }
        }
    }
    Ok(g.outputs
        .iter()
        .map(|(name, id)| (name.clone(), vals[id.index()].clone().expect("outputs are kept alive")))
        .collect())
}

fn eval(
    g: &Graph,
    n: &Node,
    vals: &[Option<Value>],
    weights: &dyn WeightSource,
    inputs: &HashMap<String, InputRef<'_>>,
) -> Result<Value, ExecError> {
    let arg = |i: usize| vals[n.inputs[i].index()].as_ref().expect("inputs are computed before use");
    let shp = |i: usize| g.shape(n.inputs[i]);
    let out = &n.ty.shape;
    Ok(match &n.op {
        Op::Input(name) => match bind_input(name, &n.ty, inputs)? {
            InputRef::F32(v) => Value::F32(v.to_vec()),
            InputRef::I32(v) => Value::I32(v.to_vec()),
        },
        Op::Param(name) => {
            let w = weights.weight(name);
            match w {
                Some(w) if w.len() == out.numel() => Value::F32(w.to_f32_vec()),
                _ => {
                    return Err(ExecError::BadWeight {
                        name: name.clone(),
                        got: w.map_or(0, |w| w.len()),
                        want: out.numel(),
                    })
                }
            }
        }
        Op::Const(d) => Value::F32(d.to_vec()),
        Op::Unary(u) => Value::F32(arg(0).as_f32().iter().map(|&x| unary(*u, x as f64) as f32).collect()),
        Op::Binary(b) => {
            let (a, c) = (arg(0).as_f32(), arg(1).as_f32());
            let (oa, oc) = (broadcast_offsets(out, shp(0)), broadcast_offsets(out, shp(1)));
            Value::F32(oa.iter().zip(&oc).map(|(&i, &j)| binary(*b, a[i] as f64, c[j] as f64) as f32).collect())
        }
        Op::Where => {
            let (c, a, b) = (arg(0).as_f32(), arg(1).as_f32(), arg(2).as_f32());
            let (oc, oa, ob) =
                (broadcast_offsets(out, shp(0)), broadcast_offsets(out, shp(1)), broadcast_offsets(out, shp(2)));
            Value::F32((0..out.numel()).map(|e| if c[oc[e]] != 0.0 { a[oa[e]] } else { b[ob[e]] }).collect())
        }
        Op::Reduce { op, axis } => {
            let x = arg(0).as_f32();
            let s = shp(0);
            let (outer, len, inner) =
                (s.0[..*axis].iter().product::<usize>(), s.dim(*axis), s.0[axis + 1..].iter().product::<usize>());
            let mut r = vec![0f32; outer * inner];
            for o in 0..outer {
                for i in 0..inner {
                    let it = (0..len).map(|k| x[(o * len + k) * inner + i] as f64);
                    r[o * inner + i] = match op {
                        ReduceOp::Sum => it.sum::<f64>(),
                        ReduceOp::Mean => it.sum::<f64>() / len as f64,
                        ReduceOp::Max => it.fold(f64::NEG_INFINITY, f64::max),
                    } as f32;
                }
            }
            Value::F32(r)
        }
        Op::MatMul { transpose_b } => {
            let (a, b) = (arg(0).as_f32(), arg(1).as_f32());
            let (sa, sb) = (shp(0), shp(1));
            let (m, k) = (sa.dim(sa.rank() - 2), sa.last());
            let n_ = out.last();
            let b_batched = sb.rank() > 2;
            let mut r = vec![0f32; out.numel()];
            r.par_chunks_mut(n_.max(1)).enumerate().for_each(|(row, dst)| {
                let (bt, i) = (row / m.max(1), row % m.max(1));
                let boff = if b_batched { bt * k * n_ } else { 0 };
                for (j, d) in dst.iter_mut().enumerate() {
                    let mut acc = 0f64;
                    for p in 0..k {
                        let bv = if *transpose_b { b[boff + j * k + p] } else { b[boff + p * n_ + j] };
                        acc += a[(bt * m + i) * k + p] as f64 * bv as f64;
                    }
                    *d = acc as f32;
                }
            });
            Value::F32(r)
        }
        Op::Reshape(_) => arg(0).clone(),
        Op::Permute(p) => {
            let s = shp(0);
            let st = s.strides();
            let pst: Vec<usize> = p.iter().map(|&i| st[i]).collect();
            let offs = strided_offsets(out, &pst);
            match arg(0) {
                Value::F32(x) => Value::F32(offs.iter().map(|&o| x[o]).collect()),
                Value::I32(x) => Value::I32(offs.iter().map(|&o| x[o]).collect()),
            }
        }
        Op::Slice { axis, start, .. } => {
            let st = shp(0).strides();
            let offs = strided_offsets(out, &st);
            let base = start * st[*axis];
            match arg(0) {
                Value::F32(x) => Value::F32(offs.iter().map(|&o| x[base + o]).collect()),
                Value::I32(x) => Value::I32(offs.iter().map(|&o| x[base + o]).collect()),
            }
        }
        Op::Concat { axis } => {
            let outer: usize = out.0[..*axis].iter().product();
            let mut r = Vec::with_capacity(out.numel());
            for o in 0..outer {
                for i in 0..n.inputs.len() {
                    let chunk: usize = shp(i).0[*axis..].iter().product();
                    r.extend_from_slice(&arg(i).as_f32()[o * chunk..(o + 1) * chunk]);
                }
            }
            Value::F32(r)
        }
        Op::Gather => {
            let (t, ids) = (arg(0).as_f32(), arg(1).as_i32());
            let (v, h) = (shp(0).dim(0), shp(0).dim(1));
            let mut r = Vec::with_capacity(out.numel());
            for &id in ids {
                if id < 0 || id as usize >= v {
                    return Err(ExecError::IndexOutOfRange { op: "gather".into(), index: id as i64, len: v });
                }
                r.extend_from_slice(&t[id as usize * h..(id as usize + 1) * h]);
            }
            Value::F32(r)
        }
        Op::ScatterRows => {
            let mut d = arg(0).as_f32().to_vec();
            let (s, rows) = (arg(1).as_f32(), arg(2).as_i32());
            let (t, h) = (out.dim(0), out.dim(1));
            for (i, &r) in rows.iter().enumerate() {
                if r == crate::NO_ROW {
                    continue;
                }
                if r < 0 || r as usize >= t {
                    return Err(ExecError::IndexOutOfRange { op: "scatter_rows".into(), index: r as i64, len: t });
                }
                d[r as usize * h..(r as usize + 1) * h].copy_from_slice(&s[i * h..(i + 1) * h]);
            }
            Value::F32(d)
        }
        Op::Iota { shape, axis } => {
            let st = shape.strides();
            Value::F32((0..shape.numel()).map(|e| ((e / st[*axis]) % shape.dim(*axis)) as f32).collect())
        }
        op => unreachable!("composite {} survived expansion", op.name()),
    })
}

/// Convenience: run and return one f32 output.
pub fn run_reference_output(
    graph: &Graph,
    weights: &dyn WeightSource,
    inputs: &HashMap<String, InputRef<'_>>,
    name: &str,
) -> Result<Vec<f32>, ExecError> {
    let mut outs = run_reference(graph, weights, inputs)?;
    match outs.remove(name) {
        Some(v) => Ok(v.into_f32()),
        None => Err(IrError::UnknownOutput(name.into()).into()),
    }
}
