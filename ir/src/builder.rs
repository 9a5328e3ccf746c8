//! Builder methods on [`Graph`], so model descriptions read like the math:
//! `let h = g.linear(x, w, Some(b))?;`. Each one appends a node and returns
//! its id; type errors come back as [`IrError`].

use crate::graph::{BinaryOp, Graph, IrError, Mask, NodeId, Op, ReduceOp, TensorType, UnaryOp};
use crate::tensor::{DType, Shape};

type R = Result<NodeId, IrError>;

impl Graph {
    fn leaf(&mut self, op: Op, dtype: DType, shape: Shape) -> NodeId {
        let id = NodeId(self.nodes.len() as u32);
        self.nodes.push(crate::graph::Node { op, inputs: vec![], ty: TensorType { dtype, shape } });
        id
    }
    /// A run-time input.
    pub fn input(&mut self, name: &str, dtype: DType, shape: impl Into<Vec<usize>>) -> NodeId {
        self.leaf(Op::Input(name.into()), dtype, Shape::new(shape))
    }
    /// A checkpoint tensor of the given stored type.
    pub fn param(&mut self, name: &str, dtype: DType, shape: impl Into<Vec<usize>>) -> NodeId {
        self.leaf(Op::Param(name.into()), dtype, Shape::new(shape))
    }
    /// A constant tensor.
    pub fn constant(&mut self, data: Vec<f32>, shape: impl Into<Vec<usize>>) -> R {
        let shape = Shape::new(shape);
        if data.len() != shape.numel() {
            return Err(IrError::Type {
                op: "const".into(),
                detail: format!("{} values for shape {shape}", data.len()),
            });
        }
        Ok(self.leaf(Op::Const(data.into()), DType::F32, shape))
    }
    /// A scalar constant (shape `[]`, broadcasts against anything).
    pub fn scalar(&mut self, v: f32) -> NodeId {
        self.leaf(Op::Const(vec![v].into()), DType::F32, Shape::new(vec![]))
    }

    pub fn unary(&mut self, op: UnaryOp, x: NodeId) -> R {
        self.push(Op::Unary(op), &[x])
    }
    pub fn binary(&mut self, op: BinaryOp, a: NodeId, b: NodeId) -> R {
        self.push(Op::Binary(op), &[a, b])
    }
    pub fn add(&mut self, a: NodeId, b: NodeId) -> R {
        self.binary(BinaryOp::Add, a, b)
    }
    pub fn sub(&mut self, a: NodeId, b: NodeId) -> R {
        self.binary(BinaryOp::Sub, a, b)
    }
    pub fn mul(&mut self, a: NodeId, b: NodeId) -> R {
        self.binary(BinaryOp::Mul, a, b)
    }
    pub fn div(&mut self, a: NodeId, b: NodeId) -> R {
        self.binary(BinaryOp::Div, a, b)
    }
    pub fn reduce(&mut self, op: ReduceOp, x: NodeId, axis: usize) -> R {
        self.push(Op::Reduce { op, axis }, &[x])
    }
    /// `a · b`.
    pub fn matmul(&mut self, a: NodeId, b: NodeId) -> R {
        self.push(Op::MatMul { transpose_b: false }, &[a, b])
    }
    /// `a · bᵀ`.
    pub fn matmul_t(&mut self, a: NodeId, b: NodeId) -> R {
        self.push(Op::MatMul { transpose_b: true }, &[a, b])
    }
    /// A Linear layer: `x · wᵀ (+ b)` with `w` stored `[out, in]`.
    pub fn linear(&mut self, x: NodeId, w: NodeId, b: Option<NodeId>) -> R {
        let y = self.matmul_t(x, w)?;
        match b {
            Some(b) => self.add(y, b),
            None => Ok(y),
        }
    }
    pub fn reshape(&mut self, x: NodeId, shape: impl Into<Vec<usize>>) -> R {
        self.push(Op::Reshape(Shape::new(shape)), &[x])
    }
    pub fn permute(&mut self, x: NodeId, perm: impl Into<Vec<usize>>) -> R {
        self.push(Op::Permute(perm.into()), &[x])
    }
    pub fn slice(&mut self, x: NodeId, axis: usize, start: usize, end: usize) -> R {
        self.push(Op::Slice { axis, start, end }, &[x])
    }
    pub fn concat(&mut self, xs: &[NodeId], axis: usize) -> R {
        self.push(Op::Concat { axis }, xs)
    }
    pub fn gather(&mut self, table: NodeId, ids: NodeId) -> R {
        self.push(Op::Gather, &[table, ids])
    }
    pub fn scatter_rows(&mut self, dst: NodeId, src: NodeId, rows: NodeId) -> R {
        self.push(Op::ScatterRows, &[dst, src, rows])
    }
    pub fn iota(&mut self, shape: impl Into<Vec<usize>>, axis: usize) -> R {
        self.push(Op::Iota { shape: Shape::new(shape), axis }, &[])
    }
    pub fn where_(&mut self, cond: NodeId, a: NodeId, b: NodeId) -> R {
        self.push(Op::Where, &[cond, a, b])
    }
    pub fn layer_norm(&mut self, x: NodeId, w: NodeId, b: NodeId, eps: f32) -> R {
        self.push(Op::LayerNorm { eps }, &[x, w, b])
    }
    pub fn rms_norm(&mut self, x: NodeId, w: NodeId, eps: f32) -> R {
        self.push(Op::RmsNorm { eps }, &[x, w])
    }
    pub fn gelu(&mut self, x: NodeId) -> R {
        self.push(Op::Gelu, &[x])
    }
    pub fn silu(&mut self, x: NodeId) -> R {
        self.push(Op::Silu, &[x])
    }
    pub fn softmax(&mut self, x: NodeId) -> R {
        self.push(Op::Softmax, &[x])
    }
    pub fn rotary(&mut self, x: NodeId, cos: NodeId, sin: NodeId) -> R {
        self.push(Op::Rotary, &[x, cos, sin])
    }
    pub fn attention(&mut self, q: NodeId, k: NodeId, v: NodeId, mask: Mask, scale: f32) -> R {
        self.push(Op::Attention { mask, scale }, &[q, k, v])
    }
    /// Attention over a KV cache: keys are `past_k` rows, then `k`.
    pub fn attention_cached(
        &mut self,
        q: NodeId,
        k: NodeId,
        v: NodeId,
        past_k: NodeId,
        past_v: NodeId,
        scale: f32,
    ) -> R {
        self.push(Op::Attention { mask: Mask::Causal, scale }, &[q, k, v, past_k, past_v])
    }
    /// Attention over a padded KV-cache bucket `past_k/past_v [P, H, d]` of
    /// which only the first `past_len` rows (f32 `[1, 1]`, a run-time input)
    /// are keys; see [`Op::Attention`].
    #[allow(clippy::too_many_arguments)]
    pub fn attention_padded(
        &mut self,
        q: NodeId,
        k: NodeId,
        v: NodeId,
        past_k: NodeId,
        past_v: NodeId,
        past_len: NodeId,
        scale: f32,
    ) -> R {
        self.push(Op::Attention { mask: Mask::Causal, scale }, &[q, k, v, past_k, past_v, past_len])
    }
    pub fn conv2d_patch(&mut self, x: NodeId, w: NodeId, patch: usize) -> R {
        self.push(Op::Conv2dPatch { patch }, &[x, w])
    }
}
