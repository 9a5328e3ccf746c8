//! Canonicalisation: rewrites two model-specific forms into the one layout
//! the kernels are written for.
//!
//! 1. Conv-as-GEMM: `Conv2dPatch{p}(x[C, H, W], w[O, C, p, p])` becomes
//!    im2col (`Reshape → Permute → Reshape` of `x` into patches
//!    `[P, C·p·p]`) and `MatMul{transpose_b}` against `Reshape(w → [O, C·p·p])`
//!    (the op's own expansion, so the result is identical by definition).
//! 2. QKV layout: the ViT's in_proj output is interleaved per head
//!    (`[T, heads, q|k|v]`: `Linear → Reshape[T, heads, 3·hd] → Slice`s of
//!    width `hd` on axis 2), the decoder's is contiguous (`q | k | v`, each
//!    `[T, heads·hd]` head-major). The ViT form is rewritten to the decoder's
//!    by permuting the rows of the weight and bias with a constant
//!    permutation, `w' = Reshape(Permute(Reshape(w, [heads, 3, hd, K]),
//!    [1, 0, 2, 3]), [3W, K])`, and reading q/k/v as
//!    `Reshape(Slice(y, 1, j·W, (j+1)·W), [T, heads, hd])`.
//!
//! Invariant: the graph computes the same outputs (row permutation commutes
//! with the matmul exactly, element for element), and afterwards no
//! `Conv2dPatch` remains and no linear projection feeds a per-head
//! interleaved QKV split. The new layout ops apply to weights only; the
//! pipeline runs weight folding ([`super::ConstFold::with_weights`]) after
//! this pass, which turns them into repacked params, so they cost nothing at
//! run time. A pattern whose intermediate values are also read elsewhere
//! (or are graph outputs) is left alone.

use super::{consumers, copy_node, is_output, rebuild, Pass};
use crate::expand::expand;
use crate::graph::{Act, BinaryOp, Graph, IrError, NodeId, Op};
use std::collections::HashMap;

/// Conv-as-GEMM and interleaved → contiguous QKV (see the module doc).
#[derive(Clone, Copy, Debug, Default)]
pub struct Canonicalize;

/// How the projection in front of an interleaved QKV split is written.
#[derive(Clone, Copy, Debug)]
enum Proj {
    /// `MatMul_t(x, w)` alone.
    MatMul,
    /// `Add(MatMul_t(x, w), b)` (or `Add(b, …)`), the matmul being `mm`; `bias_first` is the operand order.
    MatMulAdd { mm: NodeId, bias_first: bool },
    /// A fused `Linear{bias, act: None, residual: false}`.
    Linear { bias: bool },
}

#[derive(Clone, Debug)]
struct QkvSplit {
    proj: Proj,
    heads: usize,
    hd: usize,
}

/// The projection form of `a` if it is a linear map whose weight rows can be
/// permuted: a rank-2 `x` times a rank-2 `w`ᵀ, plus an optional `[N]` bias.
fn projection(g: &Graph, a: NodeId, users: &[Vec<NodeId>]) -> Option<Proj> {
    let n = g.node(a);
    let plain_mm = |id: NodeId| {
        let m = g.node(id);
        matches!(m.op, Op::MatMul { transpose_b: true })
            && g.shape(m.inputs[0]).rank() == 2
            && g.shape(m.inputs[1]).rank() == 2
    };
    match n.op {
        Op::MatMul { .. } if plain_mm(a) => Some(Proj::MatMul),
        Op::Binary(BinaryOp::Add) => {
            let out = g.shape(a);
            for (k, &mm) in n.inputs.iter().enumerate() {
                let b = n.inputs[1 - k];
                let ok = g.node(mm).op == (Op::MatMul { transpose_b: true })
                    && plain_mm(mm)
                    && g.shape(mm) == out
                    && g.shape(b).0 == [out.last()]
                    && users[mm.index()].len() == 1
                    && !is_output(g, mm);
                if ok {
                    return Some(Proj::MatMulAdd { mm, bias_first: k == 1 });
                }
            }
            None
        }
        Op::Linear { bias, act: Act::None, residual: false } if g.shape(n.inputs[0]).rank() == 2 => {
            Some(Proj::Linear { bias })
        }
        _ => None,
    }
}

/// Finds interleaved QKV splits, keyed by the `Reshape` node.
fn find_qkv(g: &Graph, users: &[Vec<NodeId>]) -> HashMap<NodeId, QkvSplit> {
    let mut found = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let r = NodeId(i as u32);
        let Op::Reshape(to) = &n.op else { continue };
        let a = n.inputs[0];
        let from = g.shape(a);
        if to.rank() != 3 || from.rank() != 2 || to.dim(0) != from.dim(0) || to.dim(2) % 3 != 0 || to.dim(2) == 0 {
            continue;
        }
        let (heads, hd) = (to.dim(1), to.dim(2) / 3);
        let slices_ok = !users[i].is_empty()
            && users[i].iter().all(
                |s| matches!(g.node(*s).op, Op::Slice { axis: 2, start, end } if start % hd == 0 && end == start + hd),
            );
        if !slices_ok || is_output(g, r) || is_output(g, a) || users[a.index()].len() != 1 {
            continue;
        }
        if let Some(proj) = projection(g, a, users) {
            found.insert(a, QkvSplit { proj, heads, hd });
        }
    }
    found
}

impl Pass for Canonicalize {
    fn name(&self) -> &'static str {
        "canonicalize"
    }
    fn run(&self, g: &mut Graph) -> Result<usize, IrError> {
        let users = consumers(g);
        // Keyed by the projection node (the reshape's input).
        let qkv = find_qkv(g, &users);
        let mut skipped_mm: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
        for m in qkv.values() {
            if let Proj::MatMulAdd { mm, .. } = m.proj {
                skipped_mm.insert(mm, vec![]);
            }
        }
        // Old reshape id → (new contiguous projection, heads, hd).
        let mut rewritten: HashMap<NodeId, (NodeId, usize, usize)> = HashMap::new();
        let mut rewrites = 0;
        let out = rebuild(g, |ng, id, n, ins| {
            if let Some(slot) = skipped_mm.get_mut(&id) {
                // Emitted (with the permuted weight) at its Add; only that Add reads it.
                *slot = ins.to_vec();
                return Ok(NodeId(u32::MAX));
            }
            if let Some(m) = qkv.get(&id) {
                let (heads, hd) = (m.heads, m.hd);
                let (x, w, bias) = match m.proj {
                    Proj::MatMul => (ins[0], ins[1], None),
                    Proj::MatMulAdd { mm, bias_first } => {
                        let mi = &skipped_mm[&mm];
                        (mi[0], mi[1], Some(ins[if bias_first { 0 } else { 1 }]))
                    }
                    Proj::Linear { bias } => (ins[0], ins[1], bias.then(|| ins[2])),
                };
                let (width, k) = (heads * hd, ng.shape(w).dim(1));
                let w4 = ng.reshape(w, vec![heads, 3, hd, k])?;
                let w4 = ng.permute(w4, vec![1, 0, 2, 3])?;
                let w2 = ng.reshape(w4, vec![3 * width, k])?;
                let b2 = match bias {
                    Some(b) => {
                        let b3 = ng.reshape(b, vec![heads, 3, hd])?;
                        let b3 = ng.permute(b3, vec![1, 0, 2])?;
                        Some(ng.reshape(b3, vec![3 * width])?)
                    }
                    None => None,
                };
                let y = match (m.proj, b2) {
                    (Proj::Linear { .. }, Some(b2)) => ng.push(n.op.clone(), &[x, w2, b2])?,
                    (Proj::Linear { .. }, None) => ng.push(n.op.clone(), &[x, w2])?,
                    (Proj::MatMulAdd { bias_first: true, .. }, Some(b2)) => {
                        let mm = ng.matmul_t(x, w2)?;
                        ng.add(b2, mm)?
                    }
                    (_, Some(b2)) => {
                        let mm = ng.matmul_t(x, w2)?;
                        ng.add(mm, b2)?
                    }
                    (_, None) => ng.matmul_t(x, w2)?,
                };
                let reshape = users[id.index()][0];
                rewritten.insert(reshape, (y, heads, hd));
                rewrites += 1;
                return Ok(y);
            }
            if rewritten.contains_key(&id) {
                // Only the slices read the old reshape; they read the new projection below.
                return Ok(NodeId(u32::MAX));
            }
            if let Op::Slice { start, .. } = n.op {
                if let Some(&(y, heads, hd)) = rewritten.get(&n.inputs[0]) {
                    let (width, t, j) = (heads * hd, ng.shape(y).dim(0), start / hd);
                    let s = ng.slice(y, 1, j * width, (j + 1) * width)?;
                    return ng.reshape(s, vec![t, heads, hd]);
                }
            }
            if let Op::Conv2dPatch { .. } = n.op {
                rewrites += 1;
                return expand(ng, &n.op, ins);
            }
            copy_node(ng, n, ins)
        })?;
        if rewrites > 0 {
            *g = out;
        }
        Ok(rewrites)
    }
}
