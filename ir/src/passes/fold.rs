//! Constant folding and weight folding.
//!
//! Invariant: after [`ConstFold`] the graph computes the same outputs, and
//! (a) no node other than an `Iota` generator has only constant inputs: every
//! maximal subgraph over `Const`s (and `Iota`s) is evaluated once, with the
//! reference interpreter, and replaced by one `Const`; (b) when the pass
//! carries a [`WeightSource`] ([`ConstFold::with_weights`]), every maximal
//! subgraph over `Param`s and constants made of cheap ops (`Reshape`,
//! `Permute`, `Slice`, `Concat`, unary and binary arithmetic) is evaluated
//! and replaced by a new `Param` named `folded.{k}`, whose data the pass
//! records ([`ConstFold::take_folded`]) so that the compiler can write the
//! repacked weight into the artifact. A folded param has exactly the type of
//! the node it replaces: pure layout over a bf16 param stays bf16 (exact,
//! the values are bf16 to begin with), anything with arithmetic (or a
//! `Concat`, whose result the IR types as f32) is f32. Identical folds (the
//! same ops over the same params and constants) get the same name, also
//! across graphs folded by the same `ConstFold`, so the prefill and decode
//! programs share their repacked weights. Without weights, param-dependent
//! subgraphs are left alone.
//!
//! Size cap: a node is folded only if its result has at most
//! [`FOLD_CAP_ELEMS`] (16M, 64 MiB of f32) elements, or, for weight folds,
//! no more elements than its largest input (layout never grows a weight).
//! A node over the cap stays an op over folded inputs, so folding never
//! materialises a tensor much larger than the graph already holds.
//!
//! What this covers in Qwen-VL: the ViT position table and the adapter's key
//! position table are already bicubic-resized on the host for the compiled
//! resolution (`qvc_model::posembed`) and enter as `Const`s, like the window
//! ids of window attention; folding removes arithmetic on such constants
//! (e.g. scalar chains the expansion or other passes create) and, with
//! weights, turns the layout ops that [`super::Canonicalize`] puts on weights
//! (conv kernel → GEMM matrix, per-head interleaved QKV → contiguous) and the
//! adapter's slices of its packed `in_proj` into repacked weights. Rotary
//! cos/sin tables and the logn table are *not* constants: dynamic NTK picks
//! the rotary base alpha from the prompt length at run time, and logn scales
//! depend on absolute positions, so they stay run-time inputs.

use super::{consumers, copy_node, is_output, rebuild, Pass};
use crate::graph::{Graph, IrError, NodeId, Op, TensorType};
use crate::interp::{run_reference, ExecError, WeightSource};
use crate::tensor::{DType, Elems};
use half::{bf16, f16};
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

/// Largest result (in elements) a fold may materialise; see the module doc.
pub const FOLD_CAP_ELEMS: usize = 1 << 24;

/// The data of a folded weight, in its graph type.
#[derive(Clone, Debug, PartialEq)]
pub enum FoldedData {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

impl FoldedData {
    fn from_f32(dtype: DType, v: &[f32]) -> Self {
        match dtype {
            DType::BF16 => FoldedData::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F16 => FoldedData::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            _ => FoldedData::F32(v.to_vec()),
        }
    }
    pub fn elems(&self) -> Elems<'_> {
        match self {
            FoldedData::F32(v) => Elems::F32(v),
            FoldedData::BF16(v) => Elems::BF16(v),
            FoldedData::F16(v) => Elems::F16(v),
        }
    }
    pub fn dtype(&self) -> DType {
        self.elems().dtype()
    }
}

/// A weight made by weight folding: `Param(name)` of type `ty` now reads `data`.
#[derive(Clone, Debug, PartialEq)]
pub struct FoldedParam {
    pub name: String,
    pub ty: TensorType,
    pub data: FoldedData,
}

/// A [`WeightSource`] that serves folded params and falls back to `base`,
/// so a weight-folded graph runs against the original checkpoint.
pub struct WithFolded<'a> {
    base: &'a dyn WeightSource,
    folded: HashMap<&'a str, &'a FoldedParam>,
}

impl<'a> WithFolded<'a> {
    pub fn new(base: &'a dyn WeightSource, folded: &'a [FoldedParam]) -> Self {
        WithFolded { base, folded: folded.iter().map(|p| (p.name.as_str(), p)).collect() }
    }
}

impl WeightSource for WithFolded<'_> {
    fn weight(&self, name: &str) -> Option<Elems<'_>> {
        match self.folded.get(name) {
            Some(p) => Some(p.data.elems()),
            None => self.base.weight(name),
        }
    }
}

#[derive(Default)]
struct FoldState {
    folded: Vec<FoldedParam>,
    /// Signature of a folded subgraph → the name it was given.
    by_sig: HashMap<String, String>,
    next: usize,
}

/// Constant folding, and weight folding when it carries weights (see the module doc).
pub struct ConstFold<'w> {
    weights: Option<&'w dyn WeightSource>,
    cap: usize,
    state: Mutex<FoldState>,
}

impl Default for ConstFold<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'w> ConstFold<'w> {
    /// Folds constants only; params are left alone.
    pub fn new() -> Self {
        ConstFold { weights: None, cap: FOLD_CAP_ELEMS, state: Mutex::new(FoldState::default()) }
    }
    /// Also folds cheap subgraphs over params into repacked `folded.{k}` params.
    pub fn with_weights(weights: &'w dyn WeightSource) -> Self {
        ConstFold { weights: Some(weights), ..Self::new() }
    }
    /// Replaces the element cap (default [`FOLD_CAP_ELEMS`]).
    pub fn with_cap(mut self, cap: usize) -> Self {
        self.cap = cap;
        self
    }
    fn state(&self) -> std::sync::MutexGuard<'_, FoldState> {
        // A panic while folding leaves at worst a partly filled list; the
        // data recorded so far is still valid.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// The weights folded so far, in the order they were named (a copy).
    pub fn folded(&self) -> Vec<FoldedParam> {
        self.state().folded.clone()
    }
    /// Moves out the weights folded since the last call. Later folds of the
    /// same subgraphs still reuse the names handed out before.
    pub fn take_folded(&self) -> Vec<FoldedParam> {
        std::mem::take(&mut self.state().folded)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    /// Needs run-time data.
    Other,
    /// Computable from constants alone.
    Const,
    /// Computable from params and constants with cheap ops.
    Weight,
}

fn weight_op(op: &Op) -> bool {
    matches!(op, Op::Reshape(_) | Op::Permute(_) | Op::Slice { .. } | Op::Concat { .. } | Op::Unary(_) | Op::Binary(_))
}

fn bits_hash(v: &[f32]) -> u64 {
    let mut h = DefaultHasher::new();
    v.len().hash(&mut h);
    for x in v {
        x.to_bits().hash(&mut h);
    }
    h.finish()
}

/// A source with no tensors: folding subgraphs only ever read constants.
struct NoWeights;
impl WeightSource for NoWeights {
    fn weight(&self, _: &str) -> Option<Elems<'_>> {
        None
    }
}

/// Evaluates `op` on constant inputs with the reference interpreter.
fn eval(op: &Op, ins: &[(&[f32], &TensorType)]) -> Result<Vec<f32>, IrError> {
    let mut g = Graph::new();
    let mut ids = Vec::with_capacity(ins.len());
    for (v, ty) in ins {
        ids.push(g.constant(v.to_vec(), ty.shape.0.clone())?);
    }
    let y = g.push(op.clone(), &ids)?;
    g.set_output("y", y);
    let mut out = run_reference(&g, &NoWeights, &HashMap::new()).map_err(|e| match e {
        ExecError::Ir(e) => e,
        e => IrError::Type { op: op.name(), detail: format!("constant folding: {e}") },
    })?;
    Ok(out.remove("y").map(|v| v.into_f32()).unwrap_or_default())
}

impl Pass for ConstFold<'_> {
    fn name(&self) -> &'static str {
        "const-fold"
    }
    fn run(&self, g: &mut Graph) -> Result<usize, IrError> {
        let n = g.nodes.len();
        let users = consumers(g);
        let mut class = vec![Class::Other; n];
        for (i, node) in g.nodes.iter().enumerate() {
            let numel = node.ty.shape.numel();
            let ins: Vec<Class> = node.inputs.iter().map(|x| class[x.index()]).collect();
            class[i] = match &node.op {
                Op::Const(_) => Class::Const,
                // A Q4 weight is never folded: that would store it dequantized.
                Op::Param(_) if self.weights.is_some() && node.ty.dtype.is_float() && node.ty.dtype != DType::Q4 => {
                    Class::Weight
                }
                Op::Input(_) | Op::Param(_) => Class::Other,
                Op::Iota { .. } if numel <= self.cap => Class::Const,
                _ if node.ty.dtype == DType::F32 && ins.iter().all(|c| *c == Class::Const) && numel <= self.cap => {
                    Class::Const
                }
                op if self.weights.is_some()
                    && weight_op(op)
                    && node.ty.dtype.is_float()
                    && ins.iter().all(|c| *c != Class::Other)
                    && ins.contains(&Class::Weight)
                    && (numel <= self.cap || node.inputs.iter().any(|x| numel <= g.shape(*x).numel())) =>
                {
                    Class::Weight
                }
                _ => Class::Other,
            };
        }
        // A foldable node is materialised when run-time code (or the caller)
        // reads it; the rest is absorbed into its readers' folds.
        let needed: Vec<bool> = (0..n)
            .map(|i| {
                let id = NodeId(i as u32);
                is_output(g, id) || users[i].is_empty() || users[i].iter().any(|u| class[u.index()] == Class::Other)
            })
            .collect();
        // Foldable readers of each node still to be evaluated (to free values early).
        let mut pending: Vec<usize> =
            users.iter().map(|us| us.iter().filter(|u| class[u.index()] != Class::Other).count()).collect();
        let mut vals: Vec<Option<Arc<[f32]>>> = vec![None; n];
        let mut sigs: Vec<Option<String>> = vec![None; n];
        let mut rewrites = 0;
        let mut st = self.state();
        let out = rebuild(g, |ng, id, node, ins| {
            let i = id.index();
            let c = class[i];
            if c == Class::Other {
                return copy_node(ng, node, ins);
            }
            let leaf = node.inputs.is_empty();
            let absorbed = !needed[i];
            // Leaves and generators that run-time code reads stay as they are
            // (and are evaluated too when a fold also reads them).
            if leaf && !absorbed && pending[i] == 0 {
                return copy_node(ng, node, ins);
            }
            // Evaluate: this node is read by a fold, or is itself folded.
            let value: Arc<[f32]> = match &node.op {
                Op::Const(d) => d.clone(),
                Op::Param(name) => {
                    let w = self.weights.and_then(|w| w.weight(name));
                    match w {
                        Some(w) if w.len() == node.ty.shape.numel() => w.to_f32_vec().into(),
                        _ => {
                            return Err(IrError::Type {
                                op: node.op.name(),
                                detail: format!(
                                    "weight folding: the weight is missing or has {} elements where {} are expected",
                                    w.map_or(0, |w| w.len()),
                                    node.ty.shape.numel()
                                ),
                            })
                        }
                    }
                }
                op => {
                    let args: Vec<(&[f32], &TensorType)> = node
                        .inputs
                        .iter()
                        .map(|x| (vals[x.index()].as_deref().expect("foldable inputs are evaluated first"), g.ty(*x)))
                        .collect();
                    eval(op, &args)?.into()
                }
            };
            let sig = match (&node.op, c) {
                (Op::Param(name), _) => format!("p:{name}:{}{}", node.ty.dtype, node.ty.shape),
                (_, Class::Const) => format!("c{}:{:x}", value.len(), bits_hash(&value)),
                (op, _) => {
                    let args: Vec<&str> =
                        node.inputs.iter().map(|x| sigs[x.index()].as_deref().unwrap_or("?")).collect();
                    format!("{op:?}:{}({})", node.ty.dtype, args.join(","))
                }
            };
            for x in &node.inputs {
                pending[x.index()] -= 1;
                if pending[x.index()] == 0 {
                    vals[x.index()] = None;
                    sigs[x.index()] = None;
                }
            }
            if !leaf {
                rewrites += 1;
            }
            let new_id = if leaf && !absorbed {
                copy_node(ng, node, ins)?
            } else if absorbed {
                // Every reader folds it too, so nobody reads this id.
                NodeId(u32::MAX)
            } else if c == Class::Const {
                ng.constant(value.to_vec(), node.ty.shape.0.clone())?
            } else {
                let name = match st.by_sig.get(&sig) {
                    Some(name) => name.clone(),
                    None => {
                        let name = format!("folded.{}", st.next);
                        st.next += 1;
                        st.by_sig.insert(sig.clone(), name.clone());
                        let data = FoldedData::from_f32(node.ty.dtype, &value);
                        st.folded.push(FoldedParam { name: name.clone(), ty: node.ty.clone(), data });
                        name
                    }
                };
                ng.param(&name, node.ty.dtype, node.ty.shape.0.clone())
            };
            if pending[i] > 0 {
                vals[i] = Some(value);
                sigs[i] = Some(sig);
            }
            Ok(new_id)
        })?;
        if rewrites > 0 {
            *g = out;
        }
        Ok(rewrites)
    }
}
