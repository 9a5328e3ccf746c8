//! Composite → primitive expansion.
//!
//! Invariant: [`expand_all`] returns a graph with the same inputs, params and
//! outputs (names and types) that contains only leaves and primitives, and
//! computes the same function. The reference interpreter runs expanded
//! graphs, so every native composite kernel is checked against these
//! definitions.

use crate::graph::{Act, BinaryOp, Graph, IrError, Mask, NodeId, Op, ReduceOp, UnaryOp};

/// Write the primitive definition of composite `op` applied to `x` into `g`.
/// Primitive ops are copied as they are.
pub fn expand(g: &mut Graph, op: &Op, x: &[NodeId]) -> Result<NodeId, IrError> {
    match op {
        Op::LayerNorm { eps } => {
            let last = g.shape(x[0]).rank() - 1;
            let mean = g.reduce(ReduceOp::Mean, x[0], last)?;
            let c0 = g.sub(x[0], mean)?;
            // The mean is stored as f32, off by up to half an ulp of itself,
            // and that shifts every deviation: for a row whose spread is
            // small next to its mean (two close values near 3) the shift is
            // a relative error of 1e-5 in the output, more than the backends
            // under test make (they keep the mean in f64). `x − mean` is
            // exact for such rows (Sterbenz), so subtracting the deviations'
            // own mean removes the shift.
            let drift = g.reduce(ReduceOp::Mean, c0, last)?;
            let c = g.sub(c0, drift)?;
            let sq = g.mul(c, c)?;
            let var = g.reduce(ReduceOp::Mean, sq, last)?;
            let e = g.scalar(*eps);
            let ve = g.add(var, e)?;
            let r = g.unary(UnaryOp::Rsqrt, ve)?;
            let n = g.mul(c, r)?;
            let w = g.mul(n, x[1])?;
            g.add(w, x[2])
        }
        Op::RmsNorm { eps } => {
            let last = g.shape(x[0]).rank() - 1;
            let sq = g.mul(x[0], x[0])?;
            let ms = g.reduce(ReduceOp::Mean, sq, last)?;
            let e = g.scalar(*eps);
            let me = g.add(ms, e)?;
            let r = g.unary(UnaryOp::Rsqrt, me)?;
            let n = g.mul(x[0], r)?;
            g.mul(n, x[1])
        }
        Op::Gelu => {
            let inv_sqrt2 = g.scalar(std::f32::consts::FRAC_1_SQRT_2);
            let half = g.scalar(0.5);
            let one = g.scalar(1.0);
            let t = g.mul(x[0], inv_sqrt2)?;
            let e = g.unary(UnaryOp::Erf, t)?;
            let e1 = g.add(e, one)?;
            let h = g.mul(x[0], half)?;
            g.mul(h, e1)
        }
        Op::Silu => {
            let s = g.unary(UnaryOp::Sigmoid, x[0])?;
            g.mul(x[0], s)
        }
        Op::Softmax => {
            let last = g.shape(x[0]).rank() - 1;
            let m = g.reduce(ReduceOp::Max, x[0], last)?;
            let c = g.sub(x[0], m)?;
            let e = g.unary(UnaryOp::Exp, c)?;
            let s = g.reduce(ReduceOp::Sum, e, last)?;
            g.div(e, s)
        }
        Op::Rotary => {
            let (t, d) = (g.shape(x[1]).dim(0), g.shape(x[1]).dim(1));
            let x1 = g.slice(x[0], 2, 0, d / 2)?;
            let x2 = g.slice(x[0], 2, d / 2, d)?;
            let nx2 = g.unary(UnaryOp::Neg, x2)?;
            let rot = g.concat(&[nx2, x1], 2)?;
            let cos = g.reshape(x[1], vec![t, 1, d])?;
            let sin = g.reshape(x[2], vec![t, 1, d])?;
            let a = g.mul(x[0], cos)?;
            let b = g.mul(rot, sin)?;
            g.add(a, b)
        }
        Op::Attention { mask, scale } => {
            let (mut kx, mut vx) = (x[1], x[2]);
            if x.len() >= 5 {
                kx = g.concat(&[x[3], x[1]], 0)?;
                vx = g.concat(&[x[4], x[2]], 0)?;
            }
            let (tq, tk) = (g.shape(x[0]).dim(0), g.shape(kx).dim(0));
            let q = g.permute(x[0], vec![1, 0, 2])?;
            let k = g.permute(kx, vec![1, 0, 2])?;
            let v = g.permute(vx, vec![1, 0, 2])?;
            let s = g.matmul_t(q, k)?;
            let sc = g.scalar(*scale);
            let mut s = g.mul(s, sc)?;
            if let Mask::Window { grid_w, window, .. } = *mask {
                // Same window ⇔ window(i) >= window(j) and window(j) >= window(i);
                // the window index of each token is a folded constant.
                let ids: Vec<f32> = (0..tq).map(|t| Mask::window_of(grid_w, window, t) as f32).collect();
                let wq = g.constant(ids.clone(), vec![tq, 1])?;
                let wk = g.constant(ids, vec![1, tk])?;
                let a = g.binary(BinaryOp::Ge, wq, wk)?;
                let b = g.binary(BinaryOp::Ge, wk, wq)?;
                let same = g.mul(a, b)?;
                let neg = g.scalar(f32::MIN);
                s = g.where_(same, s, neg)?;
            }
            if x.len() == 6 {
                // Padded cache: cache row j is a key when past_len >= j + 1;
                // new key m is visible to query i when i >= m.
                let p = g.shape(x[3]).dim(0);
                let j = g.iota(vec![1, p], 1)?;
                let one = g.scalar(1.0);
                let j1 = g.add(j, one)?;
                let in_cache = g.binary(BinaryOp::Ge, x[5], j1)?;
                let ones = g.constant(vec![1.0; tq], vec![tq, 1])?;
                let in_cache = g.mul(in_cache, ones)?;
                let qi = g.iota(vec![tq, 1], 0)?;
                let m = g.iota(vec![1, tk - p], 1)?;
                let causal = g.binary(BinaryOp::Ge, qi, m)?;
                let visible = g.concat(&[in_cache, causal], 1)?;
                let neg = g.scalar(f32::MIN);
                s = g.where_(visible, s, neg)?;
            } else if *mask == Mask::Causal {
                // key j is visible to query i when (tk - tq + i) >= j
                let qi = g.iota(vec![tq, 1], 0)?;
                let off = g.scalar((tk - tq) as f32);
                let qpos = g.add(qi, off)?;
                let kj = g.iota(vec![1, tk], 1)?;
                let visible = g.binary(BinaryOp::Ge, qpos, kj)?;
                let neg = g.scalar(f32::MIN);
                s = g.where_(visible, s, neg)?;
            }
            let p = expand(g, &Op::Softmax, &[s])?;
            let o = g.matmul(p, v)?;
            g.permute(o, vec![1, 0, 2])
        }
        Op::Conv2dPatch { patch } => {
            let p = *patch;
            let (c, h, w) = {
                let s = g.shape(x[0]);
                (s.dim(0), s.dim(1), s.dim(2))
            };
            let o = g.shape(x[1]).dim(0);
            let r = g.reshape(x[0], vec![c, h / p, p, w / p, p])?;
            let t = g.permute(r, vec![1, 3, 0, 2, 4])?;
            let cols = g.reshape(t, vec![(h / p) * (w / p), c * p * p])?;
            let wf = g.reshape(x[1], vec![o, c * p * p])?;
            g.matmul_t(cols, wf)
        }
        Op::Linear { bias, act, residual } => {
            let mut i = 2;
            let mut y = g.matmul_t(x[0], x[1])?;
            if *act == Act::SiluMul {
                let gate = g.matmul_t(x[0], x[i])?;
                i += 1;
                let s = expand(g, &Op::Silu, &[gate])?;
                y = g.mul(y, s)?;
            }
            if *bias {
                y = g.add(y, x[i])?;
                i += 1;
            }
            if *act == Act::Gelu {
                y = expand(g, &Op::Gelu, &[y])?;
            }
            if *residual {
                y = g.add(x[i], y)?;
            }
            Ok(y)
        }
        Op::AddNorm { rms, eps } => {
            let sum = g.add(x[0], x[1])?;
            if *rms {
                expand(g, &Op::RmsNorm { eps: *eps }, &[sum, x[2]])
            } else {
                expand(g, &Op::LayerNorm { eps: *eps }, &[sum, x[2], x[3]])
            }
        }
        Op::QkvRotary { offset, heads, logn } => {
            let t = g.shape(x[0]).dim(0);
            let d = g.shape(x[1]).last();
            let part = g.slice(x[0], 1, *offset, offset + heads * d)?;
            let part = g.reshape(part, vec![t, *heads, d])?;
            let r = expand(g, &Op::Rotary, &[part, x[1], x[2]])?;
            if *logn {
                g.mul(r, x[3])
            } else {
                Ok(r)
            }
        }
        _ => g.push(op.clone(), x),
    }
}

/// Rewrite every composite in `src` into primitives (see the module invariant).
pub fn expand_all(src: &Graph) -> Result<Graph, IrError> {
    let mut g = Graph::new();
    let mut map: Vec<NodeId> = Vec::with_capacity(src.nodes.len());
    for n in &src.nodes {
        let ins: Vec<NodeId> = n.inputs.iter().map(|i| map[i.index()]).collect();
        let id = match &n.op {
            Op::Input(name) => g.input(name, n.ty.dtype, n.ty.shape.0.clone()),
            Op::Param(name) => g.param(name, n.ty.dtype, n.ty.shape.0.clone()),
            Op::Const(d) => g.constant(d.to_vec(), n.ty.shape.0.clone())?,
            op => expand(&mut g, op, &ins)?,
        };
        map.push(id);
    }
    for (name, id) in &src.outputs {
        g.set_output(name, map[id.index()]);
    }
    Ok(g)
}
