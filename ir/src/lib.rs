//! # qvc-ir: the graph IR
//!
//! Start here. A model is described once as a [`Graph`]: nodes in topological
//! order, each with an [`Op`], its inputs and one output [`TensorType`].
//! Leaves are inputs, checkpoint parameters and constants; then a dozen
//! primitive ops (elementwise, reductions, `MatMul`, layout, `Gather`,
//! `ScatterRows`, `Iota`/`Where`) and a few composites (`LayerNorm`,
//! `RmsNorm`, `Gelu`, `Silu`, `Softmax`, `Rotary`, `Attention`,
//! `Conv2dPatch`), each of which [`expand`] rewrites into primitives.
//! Graphs are built through the methods in [`builder`], which infer and check
//! every type. [`interp`] is the naive reference interpreter: it expands every
//! composite and evaluates primitives element by element, in f64 where
//! accumulation matters. Backends must agree with it.

pub mod builder;
pub mod expand;
pub mod graph;
pub mod interp;
pub mod passes;
pub mod plan;
pub mod tensor;

pub use expand::{expand, expand_all};
pub use graph::{
    broadcast_shapes, Act, BinaryOp, Graph, IrError, Mask, Node, NodeId, Op, ReduceOp, TensorType, UnaryOp, NO_ROW,
};
pub use interp::{run_reference, run_reference_output, ExecError, InputRef, Value, WeightSource};
pub use tensor::{DType, Elems, Q4Ref, Q4Words, Shape, Q4_TILE};
