//! Common-subexpression elimination.
//!
//! Invariant: after [`Cse`] no two nodes have the same op, the same inputs
//! and the same type; of each group of such nodes the earliest is kept and
//! every reader of the others reads it instead. Ops are compared
//! structurally with floats compared by their bits (so `-0.0` and `0.0`, or
//! two NaNs with different payloads, stay distinct and the rewrite is exact),
//! constants by content. Two `Input` (or `Param`) nodes with the same name
//! and type are the same tensor and merge too. Every op is pure, so merging
//! never changes a value.

use super::{copy_node, rebuild, Pass};
use crate::graph::{Graph, IrError, Node, NodeId, Op};
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// Merges structurally identical nodes, keeping the earliest.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cse;

/// A hash of the op consistent with [`same_op`]: constants hash their bits;
/// every other op hashes its `Debug` text, which is equal for equal ops (it
/// may also be equal for a few unequal ones, e.g. NaN payloads, which
/// [`same_op`] then tells apart).
fn op_hash(op: &Op, h: &mut DefaultHasher) {
    match op {
        Op::Const(d) => {
            0u8.hash(h);
            d.len().hash(h);
            for v in d.iter() {
                v.to_bits().hash(h);
            }
        }
        op => {
            1u8.hash(h);
            format!("{op:?}").hash(h);
        }
    }
}

/// Structural equality with floats compared by bits.
pub fn same_op(a: &Op, b: &Op) -> bool {
    let bits = |x: f32, y: f32| x.to_bits() == y.to_bits();
    match (a, b) {
        (Op::Const(x), Op::Const(y)) => x.len() == y.len() && x.iter().zip(y.iter()).all(|(p, q)| bits(*p, *q)),
        (Op::LayerNorm { eps: x }, Op::LayerNorm { eps: y }) | (Op::RmsNorm { eps: x }, Op::RmsNorm { eps: y }) => {
            bits(*x, *y)
        }
        (Op::Attention { mask: m1, scale: s1 }, Op::Attention { mask: m2, scale: s2 }) => m1 == m2 && bits(*s1, *s2),
        (Op::AddNorm { rms: r1, eps: e1 }, Op::AddNorm { rms: r2, eps: e2 }) => r1 == r2 && bits(*e1, *e2),
        // No other op carries a float, so derived equality is exact.
        _ => a == b,
    }
}

fn node_key(n: &Node, ins: &[NodeId]) -> u64 {
    let mut h = DefaultHasher::new();
    op_hash(&n.op, &mut h);
    ins.hash(&mut h);
    n.ty.dtype.hash(&mut h);
    n.ty.shape.hash(&mut h);
    h.finish()
}

impl Pass for Cse {
    fn name(&self) -> &'static str {
        "cse"
    }
    fn run(&self, g: &mut Graph) -> Result<usize, IrError> {
        // Buckets of already-emitted nodes by key; collisions are resolved
        // by the full comparison.
        let mut seen: HashMap<u64, Vec<NodeId>> = HashMap::new();
        let mut merged = 0;
        let out = rebuild(g, |ng, _, n, ins| {
            let key = node_key(n, ins);
            if let Some(ids) = seen.get(&key) {
                for &id in ids {
                    let m = ng.node(id);
                    if m.inputs == ins && m.ty == n.ty && same_op(&m.op, &n.op) {
                        merged += 1;
                        return Ok(id);
                    }
                }
            }
            let id = copy_node(ng, n, ins)?;
            seen.entry(key).or_default().push(id);
            Ok(id)
        })?;
        if merged > 0 {
            *g = out;
        }
        Ok(merged)
    }
}
