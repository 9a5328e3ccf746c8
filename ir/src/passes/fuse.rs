//! Fusion: pattern matching that replaces a primitive subgraph with one of the
//! kernel families' fused nodes ([`Op::Linear`], [`Op::AddNorm`],
//! [`Op::QkvRotary`]); attention already is one composite node.
//!
//! Patterns (`·ᵀ` is `MatMul { transpose_b: true }` against a rank-2 weight):
//! * GEMM + epilogue → `Linear { bias, act, residual }`:
//!   `x·wᵀ` [`+ b` with `b` rank-1 `[N]`] [→ `Gelu`] [→ `+ residual` of the
//!   output's exact shape], and SwiGLU `(y·w1ᵀ) * silu(y·w2ᵀ)` (either
//!   operand order of the `Mul`) as `act: SiluMul` with inputs `(y, w1, w2)`.
//!   Adds match in either operand order (f32 addition commutes exactly).
//! * `LayerNorm`/`RmsNorm` of `a + b` (the second may broadcast) →
//!   `AddNorm`, unless a Linear epilogue can absorb that add (the GEMM
//!   epilogue saves the same pass over memory for free).
//! * `Slice(qkv[T, C], axis 1)` → `Reshape [T, heads, d]` → `Rotary` [→ `Mul`
//!   by `logn[T, 1, 1]`] → `QkvRotary { offset, heads, logn }`.
//!
//! Invariant: the fused graph computes exactly what the original did
//! ([`crate::expand`] of each fused node is the subgraph it replaced, up to
//! the operand order of commutative ops), with the same inputs, params and
//! outputs. A match only swallows intermediates that have exactly one reader
//! (inside the match) and are not graph outputs, so no value anyone else
//! reads disappears; every fused node is type-checked before it is accepted,
//! so a match never turns a valid graph into an invalid one.
//!
//! Matching walks the graph from its last node to its first and roots each
//! match at the latest node of a pattern, so the longest chain wins (a
//! residual add takes its GEMM, bias and GELU with it rather than the GEMM
//! being fused alone first).

use super::{consumers, copy_node, is_output, rebuild, Pass};
use crate::graph::{Act, BinaryOp, Graph, IrError, Mask, NodeId, Op};
use crate::tensor::Shape;
use std::collections::BTreeMap;

/// The fusion pass (see the module docs). Rewrites = fused nodes made.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fuse;

impl Pass for Fuse {
    fn name(&self) -> &'static str {
        "fuse"
    }

    fn run(&self, g: &mut Graph) -> Result<usize, IrError> {
        let matches = find_matches(g);
        if matches.is_empty() {
            return Ok(0);
        }
        let count = matches.iter().filter(|m| matches!(m, Slot::Root(_))).count();
        // Swallowed nodes are read only inside their match, so nothing emitted
        // refers to them; the sentinel would make `push` fail loudly if it did.
        let gone = NodeId(u32::MAX);
        let mut map: Vec<NodeId> = Vec::with_capacity(g.nodes.len());
        let out = rebuild(g, |ng, old, n, ins| {
            let id = match &matches[old.index()] {
                Slot::Keep => copy_node(ng, n, ins)?,
                Slot::Swallowed => gone,
                Slot::Root(m) => {
                    let xs: Vec<NodeId> = m.inputs.iter().map(|x| map[x.index()]).collect();
                    ng.push(m.op.clone(), &xs)?
                }
            };
            map.push(id);
            Ok(id)
        })?;
        *g = out;
        Ok(count)
    }
}

/// Node counts for `qvc compile`'s summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FusionStats {
    /// Nodes that run as one kernel-family kernel: fused nodes and attention.
    pub fused: usize,
    /// Other compute nodes (not leaves, not `Reshape`, which is a free view).
    pub unfused_compute: usize,
    /// Every compute node counted by kind (`linear+bias+gelu`,
    /// `attention.window`, `add`, ...): the values sum to `fused + unfused_compute`.
    pub by_kind: BTreeMap<String, usize>,
}

/// Counts fused and unfused compute nodes of `g` (see [`FusionStats`]).
pub fn fusion_stats(g: &Graph) -> FusionStats {
    let mut s = FusionStats::default();
    for n in &g.nodes {
        if matches!(n.op, Op::Input(_) | Op::Param(_) | Op::Const(_) | Op::Reshape(_)) {
            continue;
        }
        if n.op.is_fused() || matches!(n.op, Op::Attention { .. }) {
            s.fused += 1;
        } else {
            s.unfused_compute += 1;
        }
        *s.by_kind.entry(kind(g, &n.op, &n.inputs)).or_default() += 1;
    }
    s
}

/// A stable name for a node's kind: the op name without its shape parameters.
fn kind(g: &Graph, op: &Op, inputs: &[NodeId]) -> String {
    match op {
        Op::Attention { mask, .. } => {
            let what = match mask {
                Mask::Window { .. } => "window",
                Mask::Causal if inputs.len() >= 5 => "decode",
                Mask::Causal => "causal",
                Mask::None if g.shape(inputs[0]).dim(0) != g.shape(inputs[1]).dim(0) => "cross",
                Mask::None => "global",
            };
            format!("attention.{what}")
        }
        Op::QkvRotary { logn, .. } => if *logn { "qkv_rotary+logn" } else { "qkv_rotary" }.into(),
        Op::Reduce { op, .. } => format!("reduce_{op:?}").to_lowercase(),
        Op::Permute(_) => "permute".into(),
        Op::Slice { .. } => "slice".into(),
        Op::Concat { .. } => "concat".into(),
        Op::Iota { .. } => "iota".into(),
        Op::Conv2dPatch { .. } => "conv2d_patch".into(),
        op => op.name(),
    }
}

/// What becomes of each old node.
enum Slot {
    Keep,
    Swallowed,
    Root(Match),
}

/// A fused node replacing the subgraph that ends at its root.
struct Match {
    op: Op,
    /// Inputs of the fused node (old ids, all earlier than the root).
    inputs: Vec<NodeId>,
    /// Intermediates the fused node replaces (old ids, the root excluded).
    swallowed: Vec<NodeId>,
}

/// A Linear in the making: the GEMM core plus the epilogue matched so far.
struct Lin {
    act: Act,
    /// `[x, w]`, or `[x, w1, w2]` for SwiGLU.
    core: Vec<NodeId>,
    bias: Option<NodeId>,
    swallowed: Vec<NodeId>,
}

struct Matcher<'g> {
    g: &'g Graph,
    readers: Vec<usize>,
    output: Vec<bool>,
    claimed: Vec<bool>,
}

fn find_matches(g: &Graph) -> Vec<Slot> {
    let n = g.nodes.len();
    let mut m = Matcher {
        g,
        readers: consumers(g).iter().map(Vec::len).collect(),
        output: (0..n).map(|i| is_output(g, NodeId(i as u32))).collect(),
        claimed: vec![false; n],
    };
    let mut slots: Vec<Slot> = (0..n).map(|_| Slot::Keep).collect();
    let mut any = false;
    for i in (0..n).rev() {
        let root = NodeId(i as u32);
        if m.claimed[i] {
            continue;
        }
        let found = m.linear(root).or_else(|| m.qkv_rotary(root)).or_else(|| m.add_norm(root));
        if let Some(mt) = found.filter(|mt| m.type_checks(root, mt)) {
            m.claimed[i] = true;
            for s in &mt.swallowed {
                m.claimed[s.index()] = true;
                slots[s.index()] = Slot::Swallowed;
            }
            slots[i] = Slot::Root(mt);
            any = true;
        }
    }
    if any {
        slots
    } else {
        vec![]
    }
}

impl Matcher<'_> {
    fn op(&self, id: NodeId) -> &Op {
        &self.g.node(id).op
    }
    fn ins(&self, id: NodeId) -> &[NodeId] {
        &self.g.node(id).inputs
    }
    fn shape(&self, id: NodeId) -> &Shape {
        self.g.shape(id)
    }
    fn is_add(&self, id: NodeId) -> bool {
        matches!(self.op(id), Op::Binary(BinaryOp::Add))
    }

    /// Whether `id` may disappear into a fused node: its only reader is in
    /// the match, it is not an output, and no other match has taken it.
    fn inner(&self, id: NodeId) -> bool {
        self.readers[id.index()] == 1 && !self.output[id.index()] && !self.claimed[id.index()]
    }

    /// The fused node must have exactly the root's type (so readers of the
    /// root see no change); checked by building it in a scratch graph, which
    /// runs the same inference `push` will.
    fn type_checks(&self, root: NodeId, m: &Match) -> bool {
        let mut s = Graph::new();
        let xs: Vec<NodeId> = m
            .inputs
            .iter()
            .map(|&x| {
                let t = self.g.ty(x);
                s.input("", t.dtype, t.shape.0.clone())
            })
            .collect();
        matches!(s.push(m.op.clone(), &xs), Ok(y) if s.ty(y) == self.g.ty(root))
    }

    /// `x · wᵀ` with a rank-2 weight.
    fn gemm(&self, id: NodeId) -> Option<Lin> {
        match self.op(id) {
            Op::MatMul { transpose_b: true } if self.shape(self.ins(id)[1]).rank() == 2 => {
                Some(Lin { act: Act::None, core: self.ins(id).to_vec(), bias: None, swallowed: vec![] })
            }
            _ => None,
        }
    }

    /// `(y·w1ᵀ) * silu(y·w2ᵀ)`, either operand order.
    fn swiglu(&self, id: NodeId) -> Option<Lin> {
        if !matches!(self.op(id), Op::Binary(BinaryOp::Mul)) {
            return None;
        }
        let (a, b) = (self.ins(id)[0], self.ins(id)[1]);
        [(a, b), (b, a)].into_iter().find_map(|(up, s)| {
            if !matches!(self.op(s), Op::Silu) || !self.inner(s) || !self.inner(up) {
                return None;
            }
            let gate = self.ins(s)[0];
            if !self.inner(gate) {
                return None;
            }
            let (u, v) = (self.gemm(up)?, self.gemm(gate)?);
            if u.core[0] != v.core[0] || self.shape(u.core[1]) != self.shape(v.core[1]) {
                return None;
            }
            Some(Lin {
                act: Act::SiluMul,
                core: vec![u.core[0], u.core[1], v.core[1]],
                bias: None,
                swallowed: vec![up, s, gate],
            })
        })
    }

    /// A GEMM core, optionally plus a rank-1 bias `[N]`.
    fn biased(&self, id: NodeId) -> Option<Lin> {
        let core = |c: NodeId| self.gemm(c).or_else(|| self.swiglu(c));
        if self.is_add(id) {
            let (a, b) = (self.ins(id)[0], self.ins(id)[1]);
            let n = self.shape(id).last();
            let found = [(a, b), (b, a)].into_iter().find_map(|(c, bias)| {
                if self.shape(bias).0 != [n] || !self.inner(c) {
                    return None;
                }
                let mut l = core(c)?;
                l.bias = Some(bias);
                l.swallowed.push(c);
                Some(l)
            });
            if found.is_some() {
                return found;
            }
        }
        core(id)
    }

    /// [`Self::biased`], optionally followed by a GELU.
    fn activated(&self, id: NodeId) -> Option<Lin> {
        if matches!(self.op(id), Op::Gelu) {
            let z = self.ins(id)[0];
            if self.inner(z) {
                if let Some(mut l) = self.biased(z).filter(|l| l.act == Act::None) {
                    l.act = Act::Gelu;
                    l.swallowed.push(z);
                    return Some(l);
                }
            }
            return None;
        }
        self.biased(id)
    }

    /// A Linear rooted at `root`, with a residual add when it ends in one.
    fn linear(&self, root: NodeId) -> Option<Match> {
        let mut residual = None;
        let mut lin = None;
        if self.is_add(root) {
            let (a, b) = (self.ins(root)[0], self.ins(root)[1]);
            let out = self.shape(root);
            lin = [(b, a), (a, b)].into_iter().find_map(|(c, res)| {
                if self.shape(res) != out || self.shape(c) != out || !self.inner(c) {
                    return None;
                }
                let mut l = self.activated(c)?;
                l.swallowed.push(c);
                residual = Some(res);
                Some(l)
            });
        }
        let l = match lin {
            Some(l) => l,
            None => {
                residual = None;
                self.activated(root)?
            }
        };
        let mut inputs = l.core;
        inputs.extend(l.bias);
        inputs.extend(residual);
        Some(Match {
            op: Op::Linear { bias: l.bias.is_some(), act: l.act, residual: residual.is_some() },
            inputs,
            swallowed: l.swallowed,
        })
    }

    /// `norm(a + b)` → `AddNorm`, where no Linear epilogue can take the add.
    fn add_norm(&self, root: NodeId) -> Option<Match> {
        let (rms, eps) = match self.op(root) {
            Op::LayerNorm { eps } => (false, *eps),
            Op::RmsNorm { eps } => (true, *eps),
            _ => return None,
        };
        let s = self.ins(root)[0];
        if !self.is_add(s) || !self.inner(s) || self.linear(s).is_some() {
            return None;
        }
        let (a, b) = (self.ins(s)[0], self.ins(s)[1]);
        let (a, b) = if crate::graph::broadcast_shapes(self.shape(a), self.shape(b)).as_ref() == Some(self.shape(a)) {
            (a, b)
        } else {
            (b, a)
        };
        let mut inputs = vec![a, b];
        inputs.extend_from_slice(&self.ins(root)[1..]);
        Some(Match { op: Op::AddNorm { rms, eps }, inputs, swallowed: vec![s] })
    }

    /// Slice → Reshape → Rotary [→ Mul by logn] → `QkvRotary`.
    fn qkv_rotary(&self, root: NodeId) -> Option<Match> {
        let (rot, logn) = match self.op(root) {
            Op::Rotary => (root, None),
            Op::Binary(BinaryOp::Mul) => {
                let (a, b) = (self.ins(root)[0], self.ins(root)[1]);
                [(a, b), (b, a)]
                    .into_iter()
                    .find(|&(r, l)| matches!(self.op(r), Op::Rotary) && self.inner(r) && self.shape(l).rank() == 3)
                    .map(|(r, l)| (r, Some(l)))?
            }
            _ => return None,
        };
        let (x3, cos, sin) = (self.ins(rot)[0], self.ins(rot)[1], self.ins(rot)[2]);
        if !matches!(self.op(x3), Op::Reshape(_)) || !self.inner(x3) {
            return None;
        }
        let sl = self.ins(x3)[0];
        let Op::Slice { axis: 1, start, end } = *self.op(sl) else { return None };
        if !self.inner(sl) {
            return None;
        }
        let qkv = self.ins(sl)[0];
        let (q, s3) = (self.shape(qkv), self.shape(x3));
        // The reshape must split the sliced columns into heads of d, token by token.
        if q.rank() != 2 || s3.rank() != 3 || s3.dim(0) != q.dim(0) || s3.dim(1) * s3.dim(2) != end - start {
            return None;
        }
        let mut inputs = vec![qkv, cos, sin];
        inputs.extend(logn);
        let mut swallowed = vec![sl, x3];
        if logn.is_some() {
            swallowed.push(rot);
        }
        Some(Match { op: Op::QkvRotary { offset: start, heads: s3.dim(1), logn: logn.is_some() }, inputs, swallowed })
    }
}
