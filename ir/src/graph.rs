//! The graph: nodes in topological order, each with one op, its inputs and
//! its output type. Building a node infers (and checks) its type, so a graph
//! that exists is well-typed: backends never re-check shapes.

use crate::tensor::{DType, Shape};
use std::fmt;
use std::sync::Arc;

/// Index of a node in its graph. Inputs always point to earlier nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct NodeId(pub u32);

impl NodeId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// The output type of a node.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Recip,
    Erf,
    Tanh,
    Sigmoid,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    /// `a >= b` as 1.0 or 0.0 (masks are built from `Iota` and `Ge`).
    Ge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ReduceOp {
    Sum,
    Max,
    Mean,
}

/// Which keys a query may see in [`Op::Attention`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Mask {
    /// Every query sees every key (the ViT, the resampler).
    None,
    /// Query `i` of `tq` sits at absolute position `tk - tq + i` and sees keys
    /// `0..=tk - tq + i`. With a KV cache the keys are the cache plus the new
    /// tokens, so the same rule covers prefill and decode.
    Causal,
    /// Window attention over a `grid_h × grid_w` patch grid (tokens in
    /// row-major grid order, `Tq = Tk = grid_h·grid_w`, no KV cache): a query
    /// sees exactly the keys in its own `window × window` square; edge
    /// windows are smaller when the grid is not a multiple of the window.
    Window { grid_h: usize, grid_w: usize, window: usize },
}

impl Mask {
    /// The window (row-major index of the square) that token `t` belongs to.
    pub fn window_of(grid_w: usize, window: usize, t: usize) -> usize {
        let (r, c) = (t / grid_w, t % grid_w);
        (r / window) * grid_w.div_ceil(window) + c / window
    }
}

/// The activation a fused [`Op::Linear`] applies before its residual add.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Act {
    None,
    /// Exact (erf) GELU.
    Gelu,
    /// SwiGLU as Qwen writes it: `(x·w1ᵀ) * silu(x·w2ᵀ)`; the op then has
    /// a second weight input.
    SiluMul,
}

/// The index in [`Op::ScatterRows`]'s `rows` that writes nothing.
pub const NO_ROW: i32 = -1;

/// An operation. Leaves first, then primitives, then composites (which
/// [`crate::expand`] rewrites into primitives).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Op {
    /// A run-time input, bound by name.
    Input(String),
    /// A checkpoint tensor, by its name in the checkpoint.
    Param(String),
    /// A constant folded at build time (position tables, scalars).
    Const(Arc<[f32]>),

    Unary(UnaryOp),
    /// Elementwise with numpy broadcasting.
    Binary(BinaryOp),
    /// Reduction over one axis; the axis is kept with size 1.
    Reduce {
        op: ReduceOp,
        axis: usize,
    },
    /// `a[..., m, k] · b[..., k, n]`, or `b[..., n, k]` read transposed when
    /// `transpose_b` (a Linear weight stored `[out, in]`). A rank-2 `b` is
    /// shared by every batch of `a`.
    MatMul {
        transpose_b: bool,
    },
    Reshape(Shape),
    Permute(Vec<usize>),
    Slice {
        axis: usize,
        start: usize,
        end: usize,
    },
    Concat {
        axis: usize,
    },
    /// `table[V, H]`, `ids[T]` (i32) → `[T, H]`.
    Gather,
    /// `dst[T, H]`, `src[R, H]`, `rows[R]` (i32) → `dst` with row `rows[i]`
    /// replaced by `src[i]`. `rows[i] ==` [`NO_ROW`] (-1) writes nothing:
    /// that is how a program compiled for R rows runs with fewer (the unused
    /// tail of `rows` is `NO_ROW`, its `src` rows are ignored). Any other
    /// index outside `0..T` is an error where the backend can report one
    /// (the interpreter, the CPU backend); a GPU kernel skips it. With a
    /// repeated index one of the duplicates wins, unspecified which.
    ScatterRows,
    /// The index along `axis` of every element of `shape`, as f32.
    Iota {
        shape: Shape,
        axis: usize,
    },
    /// `cond != 0 ? a : b`, broadcasting.
    Where,

    /// `(x - mean) / sqrt(var + eps) * w + b` over the last axis.
    LayerNorm {
        eps: f32,
    },
    /// `x / sqrt(mean(x²) + eps) * w` over the last axis.
    RmsNorm {
        eps: f32,
    },
    /// Exact (erf) GELU.
    Gelu,
    /// `x · sigmoid(x)`.
    Silu,
    /// Softmax over the last axis.
    Softmax,
    /// `x[T, H, d]`, `cos[T, d]`, `sin[T, d]`: `x·cos + rotate_half(x)·sin`.
    Rotary,
    /// `q[Tq, H, d]`, `k[Tk, H, d]`, `v[Tk, H, d]` → `[Tq, H, d]`. With five
    /// inputs the last two are a KV cache `past_k[P, H, d]`, `past_v[P, H, d]`
    /// whose rows come before `k` and `v` (the kernel reads them in place;
    /// the expansion concatenates). With six, the cache is a padded bucket:
    /// only its first `past_len` rows (input 6, f32 `[1, 1]`, a run-time
    /// value) are keys, so one compiled program serves every cache length up
    /// to `P`; the new tokens sit at positions `past_len + i` (causal).
    Attention {
        mask: Mask,
        scale: f32,
    },
    /// Non-overlapping patches: `x[C, Hpx, Wpx]`, `w[O, C, p, p]` → `[(Hpx/p)·(Wpx/p), O]`, row-major grid.
    Conv2dPatch {
        patch: usize,
    },

    // ---- fused nodes: made by the fusion pass, one kernel each; every one
    // expands back to the primitives it replaced ----
    /// `act(x·wᵀ (+ b)) (+ residual)`. Inputs: `x[.., K]`, `w[N, K]`, then
    /// `w2[N, K]` when `act` is [`Act::SiluMul`], then `b[N]` when `bias`,
    /// then `residual[.., N]` when `residual`.
    Linear {
        bias: bool,
        act: Act,
        residual: bool,
    },
    /// `norm(a + b)`: a LayerNorm (inputs `a, b, w, bias`) or, when `rms`,
    /// an RMSNorm (inputs `a, b, w`) of a sum nothing else reads.
    AddNorm {
        rms: bool,
        eps: f32,
    },
    /// The decoder's QKV split + rotary + logn: from `qkv[T, C]` take
    /// columns `offset .. offset + heads·d` as `[T, heads, d]`, apply rotary
    /// with `cos, sin [T, d]`, and, when `logn`, scale by `logn[T, 1, 1]`.
    QkvRotary {
        offset: usize,
        heads: usize,
        logn: bool,
    },
}

impl Op {
    pub fn is_composite(&self) -> bool {
        matches!(
            self,
            Op::LayerNorm { .. }
                | Op::RmsNorm { .. }
                | Op::Gelu
                | Op::Silu
                | Op::Softmax
                | Op::Rotary
                | Op::Attention { .. }
                | Op::Conv2dPatch { .. }
                | Op::Linear { .. }
                | Op::AddNorm { .. }
                | Op::QkvRotary { .. }
        )
    }

    /// Whether the fusion pass made this node (see [`Op::Linear`] and below).
    pub fn is_fused(&self) -> bool {
        matches!(self, Op::Linear { .. } | Op::AddNorm { .. } | Op::QkvRotary { .. })
    }
    /// A short name for listings and errors.
    pub fn name(&self) -> String {
        match self {
            Op::Input(n) => format!("input {n}"),
            Op::Param(n) => format!("param {n}"),
            Op::Const(_) => "const".into(),
            Op::Unary(u) => format!("{u:?}").to_lowercase(),
            Op::Binary(b) => format!("{b:?}").to_lowercase(),
            Op::Reduce { op, axis } => format!("reduce_{op:?}({axis})").to_lowercase(),
            Op::MatMul { transpose_b } => {
                if *transpose_b {
                    "matmul_t".into()
                } else {
                    "matmul".into()
                }
            }
            Op::Reshape(s) => format!("reshape{s}"),
            Op::Permute(p) => format!("permute{p:?}"),
            Op::Slice { axis, start, end } => format!("slice({axis}, {start}..{end})"),
            Op::Concat { axis } => format!("concat({axis})"),
            Op::Gather => "gather".into(),
            Op::ScatterRows => "scatter_rows".into(),
            Op::Iota { axis, .. } => format!("iota({axis})"),
            Op::Where => "where".into(),
            Op::LayerNorm { .. } => "layer_norm".into(),
            Op::RmsNorm { .. } => "rms_norm".into(),
            Op::Gelu => "gelu".into(),
            Op::Silu => "silu".into(),
            Op::Softmax => "softmax".into(),
            Op::Rotary => "rotary".into(),
            Op::Attention { mask, .. } => format!("attention({mask:?})").to_lowercase(),
            Op::Conv2dPatch { patch } => format!("conv2d_patch({patch})"),
            Op::Linear { bias, act, residual } => {
                let mut n = "linear".to_string();
                if *bias {
                    n += "+bias";
                }
                match act {
                    Act::None => {}
                    Act::Gelu => n += "+gelu",
                    Act::SiluMul => n += "+silu_mul",
                }
                if *residual {
                    n += "+residual";
                }
                n
            }
            Op::AddNorm { rms, .. } => if *rms { "add_rms_norm" } else { "add_layer_norm" }.into(),
            Op::QkvRotary { offset, heads, logn } => {
                format!("qkv_rotary({offset}, {heads}{})", if *logn { ", logn" } else { "" })
            }
        }
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<NodeId>,
    pub ty: TensorType,
}

/// Errors in building a graph: always a bug in the caller's description of
/// the model, reported with the op and the offending types.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum IrError {
    #[error("{op}: {detail}")]
    Type { op: String, detail: String },
    #[error("unknown output {0:?}")]
    UnknownOutput(String),
}

fn type_err(op: &Op, detail: impl Into<String>) -> IrError {
    IrError::Type { op: op.name(), detail: detail.into() }
}

/// A program: nodes in topological order plus named outputs.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub outputs: Vec<(String, NodeId)>,
}

/// Broadcast two shapes numpy-style (right-aligned, 1 stretches).
pub fn broadcast_shapes(a: &Shape, b: &Shape) -> Option<Shape> {
    let r = a.rank().max(b.rank());
    let mut out = vec![0; r];
    for (i, o) in out.iter_mut().enumerate() {
        let da = if i + a.rank() >= r { a.dim(i + a.rank() - r) } else { 1 };
        let db = if i + b.rank() >= r { b.dim(i + b.rank() - r) } else { 1 };
        *o = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(Shape(out))
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }
    pub fn ty(&self, id: NodeId) -> &TensorType {
        &self.nodes[id.index()].ty
    }
    pub fn shape(&self, id: NodeId) -> &Shape {
        &self.nodes[id.index()].ty.shape
    }
    pub fn output(&self, name: &str) -> Result<NodeId, IrError> {
        self.outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
            .ok_or_else(|| IrError::UnknownOutput(name.into()))
    }
    /// Mark `id` as the output `name`.
    pub fn set_output(&mut self, name: &str, id: NodeId) {
        self.outputs.push((name.to_string(), id));
    }
    /// The inputs this graph expects, with their types, in creation order.
    pub fn inputs(&self) -> Vec<(&str, &TensorType)> {
        self.nodes
            .iter()
            .filter_map(|n| match &n.op {
                Op::Input(name) => Some((name.as_str(), &n.ty)),
                _ => None,
            })
            .collect()
    }
    /// The checkpoint tensors this graph reads, with the types it expects.
    pub fn params(&self) -> Vec<(&str, &TensorType)> {
        self.nodes
            .iter()
            .filter_map(|n| match &n.op {
                Op::Param(name) => Some((name.as_str(), &n.ty)),
                _ => None,
            })
            .collect()
    }
    /// For each node, the index of the last node that reads it (or
    /// `usize::MAX` for graph outputs): executors free buffers after it.
    pub fn last_uses(&self) -> Vec<usize> {
        let mut last = vec![0usize; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for inp in &n.inputs {
                last[inp.index()] = i;
            }
        }
        for (_, o) in &self.outputs {
            last[o.index()] = usize::MAX;
        }
        last
    }

    /// Append a node, inferring its type. Inputs must already exist.
    pub fn push(&mut self, op: Op, inputs: &[NodeId]) -> Result<NodeId, IrError> {
        let ty = self.infer(&op, inputs)?;
        self.push_typed(op, inputs, ty)
    }

    fn push_typed(&mut self, op: Op, inputs: &[NodeId], ty: TensorType) -> Result<NodeId, IrError> {
        let id = NodeId(self.nodes.len() as u32);
        self.nodes.push(Node { op, inputs: inputs.to_vec(), ty });
        Ok(id)
    }

    fn infer(&self, op: &Op, inputs: &[NodeId]) -> Result<TensorType, IrError> {
        let arity = match op {
            Op::Input(_) | Op::Param(_) | Op::Const(_) | Op::Iota { .. } => 0,
            Op::Unary(_)
            | Op::Reduce { .. }
            | Op::Reshape(_)
            | Op::Permute(_)
            | Op::Slice { .. }
            | Op::Gelu
            | Op::Silu
            | Op::Softmax => 1,
            Op::Binary(_) | Op::MatMul { .. } | Op::Gather | Op::RmsNorm { .. } | Op::Conv2dPatch { .. } => 2,
            Op::ScatterRows | Op::Where | Op::LayerNorm { .. } | Op::Rotary => 3,
            // q, k, v and optionally a KV cache: past_k, past_v
            Op::Attention { .. } => match inputs.len() {
                n @ (5 | 6) => n,
                _ => 3,
            },
            Op::Concat { .. } => inputs.len().max(1),
            Op::Linear { bias, act, residual } => {
                2 + (*act == Act::SiluMul) as usize + *bias as usize + *residual as usize
            }
            Op::AddNorm { rms, .. } => {
                if *rms {
                    3
                } else {
                    4
                }
            }
            Op::QkvRotary { logn, .. } => 3 + *logn as usize,
        };
        if inputs.len() != arity {
            return Err(type_err(op, format!("expects {arity} inputs, got {}", inputs.len())));
        }
        if let Some(bad) = inputs.iter().find(|i| i.index() >= self.nodes.len()) {
            return Err(type_err(op, format!("input {bad:?} does not exist")));
        }
        let s = |i: usize| self.shape(inputs[i]);
        let f32t = |shape: Shape| TensorType { dtype: DType::F32, shape };
        let need_float = |i: usize| -> Result<(), IrError> {
            if self.ty(inputs[i]).dtype.is_float() {
                Ok(())
            } else {
                Err(type_err(op, format!("input {i} must be floating point")))
            }
        };
        let need_i32 = |i: usize| -> Result<(), IrError> {
            if self.ty(inputs[i]).dtype == DType::I32 {
                Ok(())
            } else {
                Err(type_err(op, format!("input {i} must be i32")))
            }
        };
        Ok(match op {
            Op::Input(_) | Op::Param(_) | Op::Const(_) => {
                return Err(type_err(op, "leaves are created with input/param/constant"))
            }
            Op::Unary(_) | Op::Gelu | Op::Silu | Op::Softmax => {
                need_float(0)?;
                f32t(s(0).clone())
            }
            Op::Binary(_) => {
                need_float(0)?;
                need_float(1)?;
                f32t(
                    broadcast_shapes(s(0), s(1))
                        .ok_or_else(|| type_err(op, format!("cannot broadcast {} with {}", s(0), s(1))))?,
                )
            }
            Op::Where => {
                let ab = broadcast_shapes(s(1), s(2))
                    .ok_or_else(|| type_err(op, format!("cannot broadcast {} with {}", s(1), s(2))))?;
                f32t(
                    broadcast_shapes(s(0), &ab)
                        .ok_or_else(|| type_err(op, format!("cannot broadcast {} with {}", s(0), ab)))?,
                )
            }
            Op::Reduce { axis, .. } => {
                need_float(0)?;
                if *axis >= s(0).rank() {
                    return Err(type_err(op, format!("axis out of range for {}", s(0))));
                }
                let mut d = s(0).0.clone();
                d[*axis] = 1;
                f32t(Shape(d))
            }
            Op::MatMul { transpose_b } => {
                need_float(0)?;
                need_float(1)?;
                let (a, b) = (s(0), s(1));
                if a.rank() < 2 || b.rank() < 2 {
                    return Err(type_err(op, format!("needs rank >= 2, got {a} and {b}")));
                }
                let (m, k) = (a.dim(a.rank() - 2), a.last());
                let (kb, n) =
                    if *transpose_b { (b.last(), b.dim(b.rank() - 2)) } else { (b.dim(b.rank() - 2), b.last()) };
                if k != kb {
                    return Err(type_err(op, format!("inner dimensions differ: {a} · {b}")));
                }
                let batch_a = &a.0[..a.rank() - 2];
                let batch_b = &b.0[..b.rank() - 2];
                if !batch_b.is_empty() && batch_a != batch_b {
                    return Err(type_err(op, format!("batch dimensions differ: {a} · {b}")));
                }
                let mut d = batch_a.to_vec();
                d.extend([m, n]);
                f32t(Shape(d))
            }
            Op::Reshape(to) => {
                if to.numel() != s(0).numel() {
                    return Err(type_err(op, format!("cannot reshape {} to {to}", s(0))));
                }
                TensorType { dtype: self.ty(inputs[0]).dtype, shape: to.clone() }
            }
            Op::Permute(p) => {
                let mut seen = vec![false; p.len()];
                if p.len() != s(0).rank() || p.iter().any(|&i| i >= p.len() || std::mem::replace(&mut seen[i], true)) {
                    return Err(type_err(op, format!("{p:?} is not a permutation of {}", s(0))));
                }
                TensorType { dtype: self.ty(inputs[0]).dtype, shape: Shape(p.iter().map(|&i| s(0).dim(i)).collect()) }
            }
            Op::Slice { axis, start, end } => {
                if *axis >= s(0).rank() || start > end || *end > s(0).dim(*axis) {
                    return Err(type_err(op, format!("out of range for {}", s(0))));
                }
                let mut d = s(0).0.clone();
                d[*axis] = end - start;
                TensorType { dtype: self.ty(inputs[0]).dtype, shape: Shape(d) }
            }
            Op::Concat { axis } => {
                let first = s(0);
                if *axis >= first.rank() {
                    return Err(type_err(op, format!("axis out of range for {first}")));
                }
                let mut d = first.0.clone();
                for i in 1..inputs.len() {
                    let si = s(i);
                    let same =
                        si.rank() == first.rank() && (0..first.rank()).all(|j| j == *axis || si.dim(j) == first.dim(j));
                    if !same {
                        return Err(type_err(op, format!("cannot concatenate {first} and {si}")));
                    }
                    d[*axis] += si.dim(*axis);
                }
                f32t(Shape(d))
            }
            Op::Gather => {
                need_float(0)?;
                need_i32(1)?;
                if s(0).rank() != 2 || s(1).rank() != 1 {
                    return Err(type_err(op, format!("wants table [V, H] and ids [T], got {} and {}", s(0), s(1))));
                }
                f32t(Shape(vec![s(1).dim(0), s(0).dim(1)]))
            }
            Op::ScatterRows => {
                need_i32(2)?;
                let ok = s(0).rank() == 2
                    && s(1).rank() == 2
                    && s(2).rank() == 1
                    && s(0).dim(1) == s(1).dim(1)
                    && s(1).dim(0) == s(2).dim(0);
                if !ok {
                    return Err(type_err(
                        op,
                        format!("wants dst [T, H], src [R, H], rows [R]; got {}, {}, {}", s(0), s(1), s(2)),
                    ));
                }
                f32t(s(0).clone())
            }
            Op::Iota { shape, axis } => {
                if *axis >= shape.rank() {
                    return Err(type_err(op, format!("axis out of range for {shape}")));
                }
                f32t(shape.clone())
            }
            Op::LayerNorm { .. } | Op::RmsNorm { .. } => {
                let c = s(0).last();
                for i in 1..inputs.len() {
                    if s(i).0 != [c] {
                        return Err(type_err(op, format!("weight {} does not match {}", s(i), s(0))));
                    }
                }
                f32t(s(0).clone())
            }
            Op::Rotary => {
                let x = s(0);
                let ok = x.rank() == 3 && x.last() % 2 == 0 && s(1).0 == [x.dim(0), x.dim(2)] && s(2) == s(1);
                if !ok {
                    return Err(type_err(
                        op,
                        format!("wants x [T, H, d] (d even), cos/sin [T, d]; got {x}, {}, {}", s(1), s(2)),
                    ));
                }
                f32t(x.clone())
            }
            Op::Attention { mask, .. } => {
                let (q, k, v) = (s(0), s(1), s(2));
                if let Mask::Window { grid_h, grid_w, window } = mask {
                    let t = grid_h * grid_w;
                    if *window == 0 || inputs.len() != 3 || q.dim(0) != t || k.dim(0) != t {
                        return Err(type_err(
                            op,
                            format!("window attention wants {t} queries and keys, no cache, window > 0; got {q}, {k}"),
                        ));
                    }
                }
                let ok = q.rank() == 3 && k.rank() == 3 && k == v && q.dim(1) == k.dim(1) && q.dim(2) == k.dim(2);
                if !ok {
                    return Err(type_err(op, format!("wants q [Tq, H, d], k = v [Tk, H, d]; got {q}, {k}, {v}")));
                }
                if inputs.len() >= 5 {
                    let (pk, pv) = (s(3), s(4));
                    if pk != pv || pk.rank() != 3 || pk.dim(1) != k.dim(1) || pk.dim(2) != k.dim(2) {
                        return Err(type_err(op, format!("wants past_k = past_v [P, H, d]; got {pk}, {pv}")));
                    }
                }
                if inputs.len() == 6 && (s(5).0 != [1, 1] || *mask != Mask::Causal) {
                    return Err(type_err(
                        op,
                        format!("a padded KV cache wants past_len f32 [1, 1] and a causal mask; got {}", s(5)),
                    ));
                }
                f32t(q.clone())
            }
            Op::Conv2dPatch { patch } => {
                let (x, w) = (s(0), s(1));
                let p = *patch;
                let ok = x.rank() == 3
                    && w.rank() == 4
                    && w.dim(1) == x.dim(0)
                    && w.dim(2) == p
                    && w.dim(3) == p
                    && p > 0
                    && x.dim(1) % p == 0
                    && x.dim(2) % p == 0;
                if !ok {
                    return Err(type_err(
                        op,
                        format!("wants x [C, H, W] (H, W multiples of {p}), w [O, C, {p}, {p}]; got {x}, {w}"),
                    ));
                }
                f32t(Shape(vec![(x.dim(1) / p) * (x.dim(2) / p), w.dim(0)]))
            }
            Op::Linear { bias, act, residual } => {
                let (x, w) = (s(0), s(1));
                if x.rank() < 2 || w.rank() != 2 || x.last() != w.dim(1) {
                    return Err(type_err(op, format!("wants x [.., M, K], w [N, K]; got {x}, {w}")));
                }
                let n = w.dim(0);
                let mut out = x.0.clone();
                *out.last_mut().unwrap() = n;
                let mut i = 2;
                if *act == Act::SiluMul {
                    if s(i) != w {
                        return Err(type_err(op, format!("w2 {} differs from w {w}", s(i))));
                    }
                    i += 1;
                }
                if *bias {
                    if s(i).0 != [n] {
                        return Err(type_err(op, format!("bias {} is not [{n}]", s(i))));
                    }
                    i += 1;
                }
                if *residual && s(i).0 != out {
                    return Err(type_err(op, format!("residual {} is not {}", s(i), Shape(out.clone()))));
                }
                f32t(Shape(out))
            }
            Op::AddNorm { .. } => {
                let c = s(0).last();
                if broadcast_shapes(s(0), s(1)).as_ref() != Some(s(0)) {
                    return Err(type_err(op, format!("{} + {} must keep the shape {}", s(0), s(1), s(0))));
                }
                for i in 2..inputs.len() {
                    if s(i).0 != [c] {
                        return Err(type_err(op, format!("weight {} does not match {}", s(i), s(0))));
                    }
                }
                f32t(s(0).clone())
            }
            Op::QkvRotary { offset, heads, logn } => {
                let (x, cos) = (s(0), s(1));
                let d = cos.last();
                let t = x.dim(0);
                let ok = x.rank() == 2
                    && d % 2 == 0
                    && cos.0 == [t, d]
                    && s(2) == cos
                    && offset + heads * d <= x.dim(1)
                    && (!*logn || s(3).0 == [t, 1, 1]);
                if !ok {
                    return Err(type_err(
                        op,
                        format!("wants qkv [T, C] with columns {offset}+{heads}·d, cos/sin [T, d] (d even), logn [T, 1, 1]; got {x}, {cos}"),
                    ));
                }
                f32t(Shape(vec![t, *heads, d]))
            }
        })
    }
}

impl fmt::Display for Graph {
    /// One line per node: `%7 = matmul_t(%3, %6) : f32[33, 384]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, n) in self.nodes.iter().enumerate() {
            let args: Vec<String> = n.inputs.iter().map(|x| format!("%{}", x.0)).collect();
            writeln!(f, "%{i} = {}({}) : {}{}", n.op.name(), args.join(", "), n.ty.dtype, n.ty.shape)?;
        }
        for (name, id) in &self.outputs {
            writeln!(f, "output {name} = %{}", id.0)?;
        }
        Ok(())
    }
}
