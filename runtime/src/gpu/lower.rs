//! Lowering: an IR [`Graph`] → a list of kernel launches over one workspace.
//!
//! Invariants the executor relies on:
//! - every computed value lives **contiguous** at its memory-plan slot
//!   ([`plan_memory`] without in-place updates, so no kernel needs to be
//!   alias-safe), as f32, or as bf16 where [`bf16_values`] chose it (its
//!   producer writes bf16 and every reader wants bf16); a view (`Reshape`, a
//!   contiguous `Slice`) is its base's bytes;
//! - a node's steps read only values live at that node, and write only its
//!   own slot and the *scratch* region, which belongs to the current node
//!   (casts to bf16 for the tensor-core kernels, padded GEMM operands,
//!   attention workspaces): scratch is reused by the next node. The one
//!   exception is planned for: attention reading the ViT's q/k/v blocks in
//!   place (`strided_operands`) is planned as a reader of the QKV output;
//! - weights are read through [`WeightKey`] views (dtype and layout the
//!   kernel wants: bf16 `[N, K]`, transposed, K padded to a multiple of 8,
//!   or f32), which the executor uploads once and shares across programs;
//!   a GPTQ int4 weight (a `Param` of [`DType::Q4`]) read by a `Linear` is
//!   uploaded as its four parts ([`Q4Part`]: packed words, zeros, scales,
//!   act-order permutation) and run by the int4 GEMV/GEMM, which dequantize
//!   in registers; its group size is a launch argument the executor reads
//!   from the weight ([`Arg::Q4Group`]). Any other use of an int4 weight
//!   reads it dequantized (bf16 or f32, like any checkpoint tensor);
//! - the KV cache is the device's, bf16 `[slots, heads, max_seq, head_dim]`
//!   per layer and K/V: inputs named `past_k.{l}` / `past_v.{l}` (or
//!   `past_k.{l}.{b}` in a batched step) *are* that cache (never uploaded).
//!   A prompt's rows (outputs `k.{l}` / `v.{l}`) are copied in at row `past`;
//!   a prompt chunk after cached rows (`attention_cached` with several new
//!   rows) copies its rows in first and its flash attention reads the
//!   sequence's slot rows `0..past + t` in place (causal offset `past`);
//!   a decode step's row is appended by a kernel that reads its slot and row
//!   from the device (the per-sequence slots and key counts the executor
//!   uploads before each run), and decode attention reads the same, so every
//!   argument of a decode step is fixed whatever slots and lengths it runs
//!   over and the step can be recorded as a CUDA graph. A batched step's
//!   per-sequence attention nodes become one launch over any set of slots,
//!   in any order (`BatchedAttention`).
//!
//! A node no kernel accepts runs on the host ([`Step::Host`]): the executor
//! downloads its inputs, runs the reference interpreter on that one node
//! and uploads the result. Correct for any graph; [`Lowered::host_nodes`]
//! counts them so `qvc compile` and the benchmarks can show what is left.

use crate::gpu::device::DevPtr;
use qvc_ir::plan::{plan_memory, MemoryPlan, PlanOptions};
use qvc_ir::{Act as IrAct, DType, Graph, Mask, NodeId, Op, Shape};
use qvc_kernels::gpu::attention::{FlashMask, FlashSpec, OutDtype, Strides};
use qvc_kernels::gpu::decode_attention::DecodeAttnSpec;
use qvc_kernels::gpu::gemm::{Act, Epilogue, GemmSpec};
use qvc_kernels::gpu::gemv::GemvSpec;
use qvc_kernels::gpu::generic::{
    contiguous_strides, CopySpec, EltOp, EltwiseSpec, GatherSpec, KvAppendSpec, MatMulSpec, ReduceSpec, RopeSpec,
    ScatterRowsSpec,
};
use qvc_kernels::gpu::norm::{NormKind, NormSpec};
use qvc_kernels::gpu::patch::PatchSpec;
use qvc_kernels::gpu::q4::{Q4GemmSpec, Q4GemvSpec};
use qvc_kernels::gpu::sample::{ArgmaxSpec, TopPSpec};
use qvc_kernels::gpu::softmax::SoftmaxSpec;
use qvc_kernels::KernelSpec;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Buffers start on this many bytes (cp.async and vector loads need 16).
pub const ALIGN: u64 = 256;

fn align(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

/// How a weight is laid out on the device for the kernel that reads it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// As stored (row-major, the checkpoint's shape).
    AsIs,
    /// A rank-2 `[K, N]` weight stored as `[N, K]` (a `MatMul` without
    /// `transpose_b` becomes a Linear).
    Transposed,
    /// A rank-2 `[N, K]` weight with rows zero-padded to `cols` (GEMM needs K % 8 == 0).
    PadCols(usize),
    /// One part of a GPTQ int4 weight, as the int4 kernels read it (the key's
    /// dtype is [`DType::Q4`]).
    Q4(Q4Part),
}

/// The device buffers of one GPTQ int4 weight (`qvc_kernels::gpu::q4`):
/// the checkpoint's v1 storage as it is, plus the act-order permutation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Q4Part {
    /// u32 `[K/8, N]`.
    QWeight,
    /// u32 `[groups, N/8]` (stored zero − 1).
    QZeros,
    /// f16 `[groups, N]`.
    Scales,
    /// u32 `[K]`: stored row `r` multiplies activation column `perm[r]`
    /// (the identity for a weight without act-order).
    Perm,
}

/// One device copy of a weight (or of a constant of the graph).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WeightKey {
    /// The param's name, or `#const.{hash}` for a graph constant.
    pub name: String,
    /// F32 or BF16 (Q4 for the parts of an int4 weight, [`Layout::Q4`]).
    pub dtype: DType,
    pub layout: Layout,
}

/// Where a kernel argument points.
#[derive(Clone, Debug, PartialEq)]
pub enum Buf {
    /// Byte offset in the program's allocation.
    Arena(u64),
    /// A weight view, plus a byte offset.
    Weight(WeightKey, u64),
    /// Layer `layer`'s key (or value) cache of the program's sequence `seq`
    /// (its slot is a run-time input), at row `past` of that sequence when
    /// `at_past` (where a prompt's rows go), else at row 0. Its address
    /// depends on the run's slots (and length): a program that passes one to
    /// a kernel is not captured across slots.
    Kv { layer: usize, v: bool, at_past: bool, seq: usize },
    /// Layer `layer`'s whole key (or value) cache, every slot (slot 0, row
    /// 0): kernels that read the sequences' slots from the device index it.
    KvAll { layer: usize, v: bool },
}

/// A kernel argument.
#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    Buf(Buf),
    U32(u32),
    F32(f32),
    /// A sampling setting of the run ([`Sampling`]).
    Sample(SampleArg),
    /// The group size (u32) of the int4 weight param of this name: the
    /// int4 kernels take it at launch, so lowering needs only the graph.
    Q4Group(String),
}

/// The run-time sampling settings a top-p kernel takes as params.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleArg {
    Temperature,
    TopP,
    TopK,
}

/// How the logits output becomes tokens on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Sampling {
    /// Return the logits.
    #[default]
    Off,
    /// Argmax per row (greedy).
    Greedy,
    /// Temperature, top-k and top-p with one host uniform per row (input
    /// `sample.u`), see `qvc_kernels::gpu::sample`.
    TopP,
}

/// One thing the executor does, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    Launch {
        node: NodeId,
        kernel: String,
        grid: [u32; 3],
        block: [u32; 3],
        args: Vec<Arg>,
    },
    /// Zero `bytes` at an arena offset (padding columns of a GEMM operand).
    Zero {
        at: u64,
        bytes: u64,
    },
    /// Run this node on the host (no device kernel covers it).
    Host {
        node: NodeId,
    },
}

/// Where a graph input is uploaded.
#[derive(Clone, Debug, PartialEq)]
pub struct InputSlot {
    pub name: String,
    pub offset: u64,
    pub dtype: DType,
    pub numel: usize,
}

/// A value the executor reads back or writes: where, which dtype, how many.
#[derive(Clone, Debug, PartialEq)]
pub struct Loc {
    pub buf: Buf,
    pub dtype: DType,
    pub numel: usize,
}

/// Host-side needs of the KV cache, checked against the device's cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub max_seq: usize,
}

/// A graph lowered for a device.
#[derive(Debug)]
pub struct Lowered {
    pub steps: Vec<Step>,
    /// Bytes of the one allocation: plan arena, inputs, lens, scratch.
    pub bytes: u64,
    pub inputs: Vec<InputSlot>,
    /// Outputs to download (the KV outputs are not among them: they are
    /// written into the device cache).
    pub outputs: Vec<(String, Loc)>,
    /// Every kernel the steps launch, by name.
    pub kernels: BTreeMap<String, Box<dyn KernelSpec>>,
    /// Constant data (graph constants, iotas) behind `#const` weight keys.
    pub consts: HashMap<String, Arc<[f32]>>,
    /// For each host step's node: where its inputs are.
    pub host_inputs: HashMap<NodeId, Vec<HostArg>>,
    /// Nodes that run on the host.
    pub host_nodes: usize,
    /// Launches per program run.
    pub launches: usize,
    /// New cache rows each run writes (the program's token count), 0 when
    /// it touches no cache.
    pub kv_rows: usize,
    pub plan: MemoryPlan,
    /// Shape of every param the graph reads (weight layouts need it).
    pub params: HashMap<String, Vec<usize>>,
    /// Sequences the program decodes (1, or the batch of a batched decode step).
    pub seqs: usize,
    /// Arena offset of the u32 key counts (`past + 1` per sequence) that
    /// decode attention and the KV append read; written before every run.
    pub lens_at: u64,
    /// Arena offset of the u32 cache slot of each sequence (read by decode
    /// attention and the KV append); written before every run.
    pub slots_at: u64,
    /// Whether every argument is fixed given the sequences' slots (no host
    /// steps, no host-offset cache pointers): the run can be captured once
    /// (a CUDA graph) and replayed.
    pub capturable: bool,
    /// Whether some kernel argument is a per-sequence cache pointer
    /// ([`Buf::Kv`]), so a recording is only valid for the slots it was
    /// recorded with. Decode steps read their slots from the device instead
    /// (`false`): one recording serves every set of slots.
    pub slot_args: bool,
}

/// A host step's input: a device value, or a weight read on the host.
#[derive(Clone, Debug, PartialEq)]
pub enum HostArg {
    Device(Loc),
    Param(String),
    Const(Arc<[f32]>),
}

#[derive(Debug, thiserror::Error)]
pub enum LowerError {
    #[error("node {node} ({op}): {why}")]
    Unsupported { node: usize, op: String, why: String },
}

/// What the lowering needs to know beyond the graph.
#[derive(Clone, Copy, Debug)]
pub struct LowerOptions {
    /// The device cache (heads, head dim, rows) the program's KV inputs and
    /// outputs map to.
    pub kv: KvShape,
    /// Streaming multiprocessors (sizes the decode-attention split).
    pub sms: usize,
    /// Replace the `logits` output by a `token` output (i32 per row).
    pub sampling: Sampling,
}

/// Which layer a `past_k.{l}` / `k.{l}` name refers to.
fn kv_layer(name: &str, prefix: &str) -> Option<usize> {
    name.strip_prefix(prefix)?.parse().ok()
}

/// FNV-1a of `bytes`, continuing from `h` (start with [`FNV_START`]).
pub(crate) fn fnv_extend(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

pub(crate) const FNV_START: u64 = 0xcbf29ce484222325;

fn fnv(bytes: &[u8]) -> u64 {
    fnv_extend(FNV_START, bytes)
}

/// Strides that broadcast `src` (right-aligned) to `out`: 0 on stretched axes.
fn broadcast_strides(src: &Shape, out: &Shape) -> Vec<usize> {
    let cs = contiguous_strides(&src.0);
    let off = out.rank() - src.rank();
    (0..out.rank()).map(|i| if i < off || src.dim(i - off) == 1 { 0 } else { cs[i - off] }).collect()
}

struct Lower<'g> {
    g: &'g Graph,
    plan: MemoryPlan,
    opt: LowerOptions,
    steps: Vec<Step>,
    kernels: BTreeMap<String, Box<dyn KernelSpec>>,
    consts: HashMap<String, Arc<[f32]>>,
    inputs: HashMap<NodeId, u64>,
    input_slots: Vec<InputSlot>,
    host_inputs: HashMap<NodeId, Vec<HostArg>>,
    host_nodes: usize,
    lens_at: u64,
    slots_at: u64,
    scratch_base: u64,
    scratch_cur: u64,
    scratch_max: u64,
    node: NodeId,
    /// Layers whose new K/V rows a decode attention already wrote.
    kv_written: Vec<(usize, bool)>,
    kv_rows: usize,
    seqs: usize,
    /// Per node: stored as bf16 (see [`bf16_values`]).
    bf16: Vec<bool>,
    /// Batched decode attention by `Concat` node, and the attention nodes it covers.
    batched: HashMap<NodeId, BatchedAttention>,
    absorbed: std::collections::HashSet<NodeId>,
    /// Attention operands read in place (see [`strided_operands`]), and the
    /// slices that therefore need no copy.
    strided: HashMap<(NodeId, usize), (NodeId, usize)>,
    elided_slices: std::collections::HashSet<NodeId>,
}

type R<T> = Result<T, LowerError>;

/// A Linear's optional operands: SwiGLU's second weight, bias, residual.
#[derive(Default)]
struct Extra {
    w2: Option<NodeId>,
    bias: Option<NodeId>,
    res: Option<NodeId>,
}

impl<'g> Lower<'g> {
    fn err(&self, why: impl Into<String>) -> LowerError {
        LowerError::Unsupported { node: self.node.index(), op: self.g.node(self.node).op.name(), why: why.into() }
    }

    fn launch(&mut self, spec: Box<dyn KernelSpec>, args: Vec<Arg>) {
        let l = spec.launch();
        let kernel = spec.name();
        self.kernels.entry(kernel.clone()).or_insert(spec);
        self.steps.push(Step::Launch { node: self.node, kernel, grid: l.grid, block: l.block, args });
    }

    fn scratch(&mut self, bytes: u64) -> u64 {
        let at = self.scratch_base + self.scratch_cur;
        self.scratch_cur += align(bytes.max(1));
        self.scratch_max = self.scratch_max.max(self.scratch_cur);
        at
    }

    /// Follow views (Reshape, contiguous Slice) down to a leaf: the leaf and
    /// the byte offset into it.
    fn leaf_of(&self, mut id: NodeId) -> Option<(NodeId, u64)> {
        let mut off = 0u64;
        loop {
            let n = self.g.node(id);
            match &n.op {
                Op::Input(_) | Op::Param(_) | Op::Const(_) => return Some((id, off)),
                Op::Reshape(_) => id = n.inputs[0],
                Op::Slice { axis, start, .. } => {
                    let s = self.g.shape(n.inputs[0]);
                    if s.0[..*axis].iter().any(|&d| d != 1) {
                        return None;
                    }
                    let inner: usize = s.0[axis + 1..].iter().product();
                    off += (start * inner * 4) as u64;
                    id = n.inputs[0];
                }
                _ => return None,
            }
        }
    }

    fn const_key(&mut self, data: Arc<[f32]>, shape: &Shape) -> WeightKey {
        let h = fnv(bytemuck::cast_slice(&data)) ^ fnv(format!("{shape}").as_bytes());
        let name = format!("#const.{h:016x}");
        self.consts.entry(name.clone()).or_insert(data);
        WeightKey { name, dtype: DType::F32, layout: Layout::AsIs }
    }

    /// The value whose buffer `id` views (itself when it is not a view).
    fn root(&self, mut id: NodeId) -> NodeId {
        while let Some(a) = self.plan.values[id.index()].and_then(|s| s.alias_of) {
            id = a;
        }
        id
    }

    /// The dtype value `id` is stored in: bf16 where [`bf16_values`] chose
    /// it, i32 for integer inputs, else f32.
    fn dt(&self, id: NodeId) -> DType {
        if self.plan.values[id.index()].is_some() {
            if self.bf16[self.root(id).index()] {
                return DType::BF16;
            }
            return DType::F32;
        }
        if self.g.ty(id).dtype == DType::I32 {
            DType::I32
        } else {
            DType::F32
        }
    }

    /// Where value `id` lives (in [`Lower::dt`]), contiguous.
    fn val(&mut self, id: NodeId) -> R<Buf> {
        if let Some(slot) = self.plan.values[id.index()] {
            let root = self.root(id);
            if root != id && self.bf16[root.index()] {
                // The plan placed views with 4-byte elements.
                let r = self.plan.values[root.index()].map_or(0, |s| s.offset);
                return Ok(Buf::Arena(r + (slot.offset - r) / 2));
            }
            return Ok(Buf::Arena(slot.offset));
        }
        let (leaf, off) = self.leaf_of(id).ok_or_else(|| self.err(format!("value {} has no location", id.0)))?;
        match &self.g.node(leaf).op {
            Op::Input(name) => {
                if name.starts_with("past_") {
                    return Err(self.err(format!("reads the KV cache input {name} outside attention")));
                }
                Ok(Buf::Arena(self.inputs[&leaf] + off))
            }
            Op::Param(name) => {
                Ok(Buf::Weight(WeightKey { name: name.clone(), dtype: DType::F32, layout: Layout::AsIs }, off))
            }
            Op::Const(d) => {
                let key = self.const_key(d.clone(), &self.g.ty(leaf).shape.clone());
                Ok(Buf::Weight(key, off))
            }
            _ => unreachable!("leaf_of returns leaves"),
        }
    }

    /// A weight operand as `dtype` in `layout`: a checkpoint tensor, or a
    /// contiguous part of one (a checkpoint's fused `in_proj` sliced into
    /// q, k and v), read in place.
    fn weight(&self, id: NodeId, dtype: DType, layout: Layout) -> R<Buf> {
        let not = || self.err("the weight operand is not a checkpoint tensor (compile the model to fold its layout)");
        let (leaf, off) = self.leaf_of(id).ok_or_else(not)?;
        let Op::Param(name) = &self.g.node(leaf).op else { return Err(not()) };
        if off != 0 && layout != Layout::AsIs {
            return Err(self.err("a relaid-out weight must be a whole checkpoint tensor"));
        }
        // leaf_of counts 4-byte elements.
        let off = off / 4 * dtype.size() as u64;
        Ok(Buf::Weight(WeightKey { name: name.clone(), dtype, layout }, off))
    }

    fn is_param(&self, id: NodeId) -> bool {
        matches!(self.leaf_of(id), Some((l, 0)) if matches!(self.g.node(l).op, Op::Param(_)))
    }

    fn out(&self) -> R<u64> {
        match self.plan.values[self.node.index()] {
            Some(s) if s.alias_of.is_none() => Ok(s.offset),
            _ => Err(self.err("no buffer planned for the output")),
        }
    }

    /// Value `id` as `dtype` with rows of `ld` elements: itself when it is
    /// stored that way, else a copy (and cast) into scratch, padding zeroed.
    fn cast(&mut self, id: NodeId, dtype: DType, ld: usize) -> R<Buf> {
        let shape = self.g.shape(id).0.clone();
        let cols = *shape.last().unwrap_or(&1);
        let rows: usize = shape.iter().product::<usize>() / cols.max(1);
        let (src, from) = (self.val(id)?, self.dt(id));
        if from == dtype && ld == cols {
            return Ok(src);
        }
        let at = self.scratch((rows * ld * dtype.size()) as u64);
        if ld != cols {
            self.steps.push(Step::Zero { at, bytes: (rows * ld * dtype.size()) as u64 });
        }
        let spec = CopySpec {
            shape: vec![rows, cols],
            src_strides: vec![cols, 1],
            dst_strides: vec![ld, 1],
            src: from,
            dst: dtype,
        };
        spec.validate().map_err(|e| self.err(e.to_string()))?;
        self.launch(Box::new(spec), vec![Arg::Buf(src), Arg::Buf(Buf::Arena(at))]);
        Ok(Buf::Arena(at))
    }

    fn host(&mut self) -> R<()> {
        let n = self.g.node(self.node);
        let mut args = vec![];
        for &i in &n.inputs {
            let a = match self.leaf_of(i) {
                Some((l, 0)) if matches!(self.g.node(l).op, Op::Param(_)) => {
                    let Op::Param(name) = &self.g.node(l).op else { unreachable!() };
                    if self.g.ty(i).shape.numel() != self.g.ty(l).shape.numel() {
                        return Err(self.err("host fallback over a slice of a weight"));
                    }
                    HostArg::Param(name.clone())
                }
                Some((l, 0)) if matches!(self.g.node(l).op, Op::Const(_)) => {
                    let Op::Const(d) = &self.g.node(l).op else { unreachable!() };
                    HostArg::Const(d.clone())
                }
                _ => {
                    let t = self.g.ty(i);
                    let dtype = if t.dtype == DType::I32 { DType::I32 } else { DType::F32 };
                    HostArg::Device(Loc { buf: self.val(i)?, dtype, numel: t.shape.numel() })
                }
            };
            args.push(a);
        }
        self.out()?;
        self.host_inputs.insert(self.node, args);
        self.host_nodes += 1;
        self.steps.push(Step::Host { node: self.node });
        Ok(())
    }

    /// The name of the int4 param `id` is, when it is a whole one.
    fn q4_param(&self, id: NodeId) -> Option<String> {
        let (leaf, off) = self.leaf_of(id)?;
        match &self.g.node(leaf).op {
            Op::Param(name)
                if off == 0
                    && self.g.ty(leaf).dtype == DType::Q4
                    && self.g.shape(id).0 == self.g.shape(leaf).0
                    && self.g.shape(id).rank() == 2 =>
            {
                Some(name.clone())
            }
            _ => None,
        }
    }

    /// `x·wᵀ` with `w` (and `w2`) GPTQ int4 params: the int4 GEMV for
    /// decode rows, the int4 tensor-core GEMM otherwise; activations are
    /// read as they are stored (f32 or bf16, any K).
    fn linear_q4(&mut self, x: NodeId, names: &[String], extra: Extra, act: Act, n: usize) -> R<()> {
        let Extra { bias, res, .. } = extra;
        let k = self.g.shape(x).last();
        let m = self.g.shape(x).numel() / k.max(1);
        let epi = Epilogue::new(bias.is_some(), act, res.is_some());
        let (ad, od) = (self.dt(x), self.dt(self.node));
        let spec: Box<dyn KernelSpec> = if m <= 8 {
            Box::new(Q4GemvSpec::new(m, n, k, ad, od, epi).map_err(|e| self.err(format!("{e:?}")))?)
        } else {
            Box::new(Q4GemmSpec::new(m, n, k, ad, od, epi).map_err(|e| self.err(format!("{e:?}")))?)
        };
        let mut args = vec![Arg::Buf(self.val(x)?)];
        for name in names {
            for part in [Q4Part::QWeight, Q4Part::QZeros, Q4Part::Scales, Q4Part::Perm] {
                let key = WeightKey { name: name.clone(), dtype: DType::Q4, layout: Layout::Q4(part) };
                args.push(Arg::Buf(Buf::Weight(key, 0)));
            }
        }
        if let Some(b) = bias {
            args.push(Arg::Buf(self.weight(b, DType::F32, Layout::AsIs)?));
        }
        if let Some(r) = res {
            args.push(Arg::Buf(self.val(r)?));
        }
        args.push(Arg::Buf(Buf::Arena(self.out()?)));
        args.extend(names.iter().map(|n| Arg::Q4Group(n.clone())));
        self.launch(spec, args);
        Ok(())
    }

    /// `x·wᵀ` with the GEMM epilogue; `transposed`: `w` is stored `[K, N]`.
    fn linear(&mut self, x: NodeId, w: NodeId, extra: Extra, act: Act, transposed: bool) -> R<()> {
        if !transposed {
            // Int4 weights (both, for SwiGLU) go to the int4 kernels; an
            // int4 weight next to a float one is read dequantized below.
            let q4: Option<Vec<String>> = std::iter::once(Some(w))
                .chain(std::iter::once(extra.w2))
                .flatten()
                .map(|id| self.q4_param(id))
                .collect();
            let k = self.g.shape(x).last();
            if let Some(names) = q4.filter(|_| k.is_multiple_of(8)) {
                let n = self.g.shape(w).dim(0);
                return self.linear_q4(x, &names, extra, act, n);
            }
        }
        let Extra { w2, bias, res } = extra;
        let k = self.g.shape(x).last();
        let xs = self.g.shape(x).clone();
        let m = xs.numel() / k.max(1);
        let ws = self.g.shape(w);
        let n = if transposed { ws.dim(1) } else { ws.dim(0) };
        let epi = Epilogue::new(bias.is_some(), act, res.is_some());
        let out = self.out()?;
        let layout = |pad: usize| {
            if transposed {
                Layout::Transposed
            } else if pad != k {
                Layout::PadCols(pad)
            } else {
                Layout::AsIs
            }
        };
        // Decode rows (M ≤ 8) stream the weight with any K; the tensor-core
        // GEMM needs K % 8 == 0, so A and W get zero-padded columns.
        let gemv = m <= 8;
        let kp = if gemv { k } else { k.next_multiple_of(8) };
        if transposed && kp != k {
            return Err(self.err(format!("a transposed weight needs K % 8 == 0, K = {k}")));
        }
        let od = self.dt(self.node);
        let (spec, a): (Box<dyn KernelSpec>, Buf) = if gemv {
            let s = GemvSpec::new(m, n, k, self.dt(x), od, epi).map_err(|e| self.err(format!("{e:?}")))?;
            (Box::new(s), self.val(x)?)
        } else {
            let a = self.cast(x, DType::BF16, kp)?;
            let s = GemmSpec::new(m, n, kp, DType::BF16, od, epi).map_err(|e| self.err(format!("{e:?}")))?;
            (Box::new(s), a)
        };
        let mut args = vec![Arg::Buf(a), Arg::Buf(self.weight(w, DType::BF16, layout(kp))?)];
        if let Some(w2) = w2 {
            args.push(Arg::Buf(self.weight(w2, DType::BF16, layout(kp))?));
        }
        if let Some(b) = bias {
            args.push(Arg::Buf(self.weight(b, DType::F32, Layout::AsIs)?));
        }
        if let Some(r) = res {
            args.push(Arg::Buf(self.val(r)?));
        }
        args.push(Arg::Buf(Buf::Arena(out)));
        self.launch(spec, args);
        Ok(())
    }

    fn norm(&mut self, x: Buf, rows: usize, cols: usize, w: NodeId, b: Option<NodeId>, eps: f32) -> R<()> {
        let kind = if b.is_some() { NormKind::LayerNorm { bias: true } } else { NormKind::RmsNorm };
        let spec = NormSpec { kind, rows, cols, eps, residual: false, out: self.dt(self.node) };
        spec.validate().map_err(|e| self.err(e.to_string()))?;
        let mut args = vec![Arg::Buf(x), Arg::Buf(self.weight(w, DType::BF16, Layout::AsIs)?)];
        if let Some(b) = b {
            args.push(Arg::Buf(self.weight(b, DType::BF16, Layout::AsIs)?));
        }
        args.push(Arg::Buf(Buf::Arena(self.out()?)));
        self.launch(Box::new(spec), args);
        Ok(())
    }

    /// The KV-cache input behind attention input `i` (`past_k.{l}`, or
    /// `past_k.{l}.{seq}` in a batched step): layer, K or V, sequence.
    fn kv_input(&self, id: NodeId) -> Option<(usize, bool, usize)> {
        let (leaf, _) = self.leaf_of(id)?;
        let Op::Input(name) = &self.g.node(leaf).op else { return None };
        let (rest, v) = match (name.strip_prefix("past_k."), name.strip_prefix("past_v.")) {
            (Some(r), _) => (r, false),
            (_, Some(r)) => (r, true),
            _ => return None,
        };
        let mut it = rest.split('.');
        let layer = it.next()?.parse().ok()?;
        let seq = it.next().map_or(Some(0), |s| s.parse().ok())?;
        it.next().is_none().then_some((layer, v, seq))
    }

    /// Copy `[t, heads, hd]` rows (stored as `from`) into the bf16 cache of `layer` at row `past`.
    fn kv_write(&mut self, src: Buf, from: DType, t: usize, layer: usize, v: bool, seq: usize) -> R<()> {
        let kv = self.opt.kv;
        if layer >= kv.layers {
            return Err(self.err(format!("layer {layer} is outside the KV cache ({} layers)", kv.layers)));
        }
        let spec = CopySpec {
            shape: vec![t, kv.heads, kv.head_dim],
            src_strides: vec![kv.heads * kv.head_dim, kv.head_dim, 1],
            dst_strides: vec![kv.head_dim, kv.max_seq * kv.head_dim, 1],
            src: from,
            dst: DType::BF16,
        };
        spec.validate().map_err(|e| self.err(e.to_string()))?;
        self.launch(Box::new(spec), vec![Arg::Buf(src), Arg::Buf(Buf::Kv { layer, v, at_past: true, seq })]);
        self.kv_rows = self.kv_rows.max(t);
        self.seqs = self.seqs.max(seq + 1);
        Ok(())
    }

    /// A batched decode step's attention for one layer (see [`BatchedAttention`]).
    fn batched_attention(&mut self) -> R<()> {
        let ba = self.batched[&self.node].clone();
        let kv = self.opt.kv;
        let (b, h, d) = (ba.batch, self.g.shape(ba.q).dim(1), self.g.shape(ba.q).dim(2));
        if ba.layer >= kv.layers || h != kv.heads || d != kv.head_dim {
            return Err(self.err(format!("layer {} with {h}×{d} heads does not fit the device cache {kv:?}", ba.layer)));
        }
        self.seqs = self.seqs.max(b);
        self.kv_rows = self.kv_rows.max(1);
        let out = self.out()?;
        let (lens, slots) = (Buf::Arena(self.lens_at), Buf::Arena(self.slots_at));
        let stride = h * kv.max_seq * d;
        let append = KvAppendSpec { batch: b, heads: h, head_dim: d, max_seq: kv.max_seq, cache_stride: stride };
        append.validate().map_err(|e| self.err(e.to_string()))?;
        let cache = |v| Arg::Buf(Buf::KvAll { layer: ba.layer, v });
        let args = vec![
            Arg::Buf(self.val(ba.k)?),
            Arg::Buf(self.val(ba.v)?),
            Arg::Buf(lens.clone()),
            Arg::Buf(slots.clone()),
            cache(false),
            cache(true),
        ];
        self.launch(Box::new(append), args);
        self.kv_written.extend([(ba.layer, false), (ba.layer, true)]);
        let qb = self.cast(ba.q, DType::BF16, d)?;
        let splits = DecodeAttnSpec::splits_for(b, h, kv.max_seq, self.opt.sms);
        let sp = DecodeAttnSpec::new(b, h, d, kv.max_seq, splits, ba.scale, self.dt(self.node))
            .map_err(|e| self.err(format!("{e:?}")))?;
        let ws = self.scratch((b * h * splits * (d + 2) * 4) as u64);
        let args =
            vec![Arg::Buf(qb), cache(false), cache(true), Arg::Buf(lens), Arg::Buf(slots), Arg::Buf(Buf::Arena(ws))];
        self.launch(Box::new(sp.partial()), args);
        self.launch(Box::new(sp.combine()), vec![Arg::Buf(Buf::Arena(ws)), Arg::Buf(Buf::Arena(out))]);
        Ok(())
    }

    fn attention(&mut self, mask: Mask, scale: f32) -> R<()> {
        let n = self.g.node(self.node).clone();
        let (q, k) = (self.g.shape(n.inputs[0]).clone(), self.g.shape(n.inputs[1]).clone());
        let (tq, tk, h, d) = (q.dim(0), k.dim(0), q.dim(1), q.dim(2));
        let out = self.out()?;
        if n.inputs.len() == 3 {
            let (mut ptr, mut strides) = (vec![], vec![]);
            let dense = Strides { token: (h * d) as u32, head: d as u32 };
            for (p, &i) in n.inputs[..3].iter().enumerate() {
                if let Some(&(x, start)) = self.strided.get(&(self.node, p)) {
                    // A column block of the bf16 QKV rows, read in place.
                    let Buf::Arena(base) = self.val(x)? else { return Err(self.err("strided operand off the arena")) };
                    ptr.push(Buf::Arena(base + 2 * start as u64));
                    strides.push(Strides { token: self.g.shape(x).dim(1) as u32, head: d as u32 });
                } else {
                    let cols = self.g.shape(i).last();
                    ptr.push(self.cast(i, DType::BF16, cols)?);
                    strides.push(dense);
                }
            }
            let fm = match mask {
                Mask::None => FlashMask::None,
                Mask::Causal => FlashMask::Causal { q_offset: (tk - tq) as u32 },
                Mask::Window { grid_h, grid_w, window } => {
                    FlashMask::Window { grid: (grid_h as u32, grid_w as u32), window: window as u32 }
                }
            };
            let mut sp =
                FlashSpec::new(tq as u32, tk as u32, h as u32, d as u32, strides[0], strides[1], strides[2], fm);
            sp.scale = scale;
            sp.out = if self.dt(self.node) == DType::BF16 { OutDtype::Bf16 } else { OutDtype::F32 };
            sp.validate().map_err(|e| self.err(e.to_string()))?;
            let args = vec![
                Arg::Buf(ptr[0].clone()),
                Arg::Buf(ptr[1].clone()),
                Arg::Buf(ptr[2].clone()),
                Arg::Buf(Buf::Arena(out)),
            ];
            self.launch(Box::new(sp), args);
            return Ok(());
        }
        // Over the device KV cache: new rows go in at `past`, then the
        // queries attend to the cache's rows in place.
        if !matches!(mask, Mask::Causal) {
            return Err(self.err("attention over a KV cache is causal"));
        }
        let (Some((lk, false, sk)), Some((lv, true, sv))) = (self.kv_input(n.inputs[3]), self.kv_input(n.inputs[4]))
        else {
            return Err(self.err("the cache inputs are not past_k.{l} / past_v.{l}"));
        };
        if lk != lv || sk != sv {
            return Err(self.err("key and value caches of different layers or sequences"));
        }
        let kv = self.opt.kv;
        if lk >= kv.layers || h != kv.heads || d != kv.head_dim {
            return Err(self.err(format!("layer {lk} with {h}×{d} heads does not fit the device cache {kv:?}")));
        }
        let seq = sk;
        if tq > 1 {
            return self.cached_prefill(&n, (tq, h, d), lk, seq, scale, out);
        }
        self.seqs = self.seqs.max(seq + 1);
        self.kv_rows = self.kv_rows.max(1);
        let lens = Buf::Arena(self.lens_at + 4 * seq as u64);
        let slots = Buf::Arena(self.slots_at + 4 * seq as u64);
        // The new row goes in at `lens − 1` of slot `slots` (read on the
        // device: see KvAppendSpec).
        let append =
            KvAppendSpec { batch: 1, heads: h, head_dim: d, max_seq: kv.max_seq, cache_stride: h * kv.max_seq * d };
        append.validate().map_err(|e| self.err(e.to_string()))?;
        let cache = |v| Arg::Buf(Buf::KvAll { layer: lk, v });
        let args = vec![
            Arg::Buf(self.val(n.inputs[1])?),
            Arg::Buf(self.val(n.inputs[2])?),
            Arg::Buf(lens.clone()),
            Arg::Buf(slots.clone()),
            cache(false),
            cache(true),
        ];
        self.launch(Box::new(append), args);
        self.kv_written.extend([(lk, false), (lk, true)]);
        let qb = self.cast(n.inputs[0], DType::BF16, d)?;
        let splits = DecodeAttnSpec::splits_for(1, h, kv.max_seq, self.opt.sms);
        let sp = DecodeAttnSpec::new(1, h, d, kv.max_seq, splits, scale, self.dt(self.node))
            .map_err(|e| self.err(format!("{e:?}")))?;
        let ws = self.scratch((h * splits * (d + 2) * 4) as u64);
        let args =
            vec![Arg::Buf(qb), cache(false), cache(true), Arg::Buf(lens), Arg::Buf(slots), Arg::Buf(Buf::Arena(ws))];
        self.launch(Box::new(sp.partial()), args);
        self.launch(Box::new(sp.combine()), vec![Arg::Buf(Buf::Arena(ws)), Arg::Buf(Buf::Arena(out))]);
        Ok(())
    }

    /// A chunk of a prefill after cached rows (`attention_cached` with
    /// `tq > 1` new rows after `past = |past_k|` cached ones, an exact-shape
    /// graph): the new K/V rows are copied into the sequence's cache slot at
    /// rows `past..past + tq`, then the flash kernel runs the `tq` queries
    /// against the slot's rows `0..past + tq` read in place (cache strides:
    /// token `hd`, head `max_seq·hd`) with the causal offset `past`, so
    /// query `i` sees keys `0..=past + i`, exactly the keys the whole
    /// prompt's causal attention gives that row.
    fn cached_prefill(
        &mut self,
        n: &qvc_ir::Node,
        (tq, h, d): (usize, usize, usize),
        layer: usize,
        seq: usize,
        scale: f32,
        out: u64,
    ) -> R<()> {
        if n.inputs.len() != 5 {
            return Err(self.err("a padded KV-cache bucket takes one new row at a time on the GPU"));
        }
        let past = self.g.shape(n.inputs[3]).dim(0);
        let kv = self.opt.kv;
        if past + tq > kv.max_seq {
            return Err(
                self.err(format!("{past} cached + {tq} new rows exceed the device KV cache of {} rows", kv.max_seq))
            );
        }
        for (i, v) in [(1, false), (2, true)] {
            let src = self.val(n.inputs[i])?;
            self.kv_write(src, self.dt(n.inputs[i]), tq, layer, v, seq)?;
        }
        self.kv_written.extend([(layer, false), (layer, true)]);
        let qb = self.cast(n.inputs[0], DType::BF16, d)?;
        let dense = Strides { token: (h * d) as u32, head: d as u32 };
        let cache = Strides { token: d as u32, head: (kv.max_seq * d) as u32 };
        let mask = FlashMask::Causal { q_offset: past as u32 };
        let mut sp = FlashSpec::new(tq as u32, (past + tq) as u32, h as u32, d as u32, dense, cache, cache, mask);
        sp.scale = scale;
        sp.out = if self.dt(self.node) == DType::BF16 { OutDtype::Bf16 } else { OutDtype::F32 };
        sp.validate().map_err(|e| self.err(e.to_string()))?;
        let slot = |v| Arg::Buf(Buf::Kv { layer, v, at_past: false, seq });
        let args = vec![Arg::Buf(qb), slot(false), slot(true), Arg::Buf(Buf::Arena(out))];
        self.launch(Box::new(sp), args);
        Ok(())
    }

    fn node(&mut self) -> R<()> {
        let n = self.g.node(self.node).clone();
        let shape = n.ty.shape.clone();
        let s = |i: usize| self.g.shape(n.inputs[i]).clone();
        match &n.op {
            Op::Input(_) | Op::Param(_) | Op::Const(_) | Op::Reshape(_) => Ok(()),
            Op::Slice { .. } if self.elided_slices.contains(&self.node) => Ok(()),
            Op::Slice { .. } if self.plan.values[self.node.index()].is_none_or(|s| s.alias_of.is_some()) => Ok(()),
            Op::Slice { axis, start, .. } => {
                let src = s(0);
                let mut st = contiguous_strides(&src.0);
                let base = self.val(n.inputs[0])?;
                let off = (start * st[*axis] * self.dt(n.inputs[0]).size()) as u64;
                let base = match base {
                    Buf::Arena(o) => Buf::Arena(o + off),
                    Buf::Weight(k, o) => Buf::Weight(k, o + off),
                    kv => kv,
                };
                st.truncate(src.rank());
                self.copy(base, shape.0.clone(), st)
            }
            Op::Permute(p) => {
                let src = s(0);
                let cs = contiguous_strides(&src.0);
                let st = p.iter().map(|&a| cs[a]).collect();
                let base = self.val(n.inputs[0])?;
                self.copy(base, shape.0.clone(), st)
            }
            Op::Attention { .. } if self.absorbed.contains(&self.node) => Ok(()),
            Op::Concat { .. } if self.batched.contains_key(&self.node) => self.batched_attention(),
            Op::Concat { axis } => {
                let out = self.out()?;
                let ost = contiguous_strides(&shape.0);
                let mut at = 0usize;
                for &i in &n.inputs {
                    let is = self.g.shape(i).clone();
                    let src = self.val(i)?;
                    let spec = CopySpec {
                        shape: is.0.clone(),
                        src_strides: contiguous_strides(&is.0),
                        dst_strides: ost.clone(),
                        src: DType::F32,
                        dst: DType::F32,
                    };
                    spec.validate().map_err(|e| self.err(e.to_string()))?;
                    let dst = Buf::Arena(out + (at * ost[*axis] * 4) as u64);
                    self.launch(Box::new(spec), vec![Arg::Buf(src), Arg::Buf(dst)]);
                    at += is.dim(*axis);
                }
                Ok(())
            }
            Op::Unary(_) | Op::Binary(_) | Op::Where | Op::Gelu | Op::Silu => {
                let op = match &n.op {
                    Op::Unary(u) => EltOp::Unary(*u),
                    Op::Binary(b) => EltOp::Binary(*b),
                    Op::Where => EltOp::Where,
                    Op::Gelu => EltOp::Gelu,
                    _ => EltOp::Silu,
                };
                let strides = n.inputs.iter().map(|&i| broadcast_strides(self.g.shape(i), &shape)).collect();
                let spec = EltwiseSpec { shape: shape.0.clone(), op, strides };
                spec.validate().map_err(|e| self.err(e.to_string()))?;
                let mut args = vec![];
                for &i in &n.inputs {
                    if self.g.ty(i).dtype == DType::I32 {
                        return Err(self.err("integer operand"));
                    }
                    args.push(Arg::Buf(self.val(i)?));
                }
                args.push(Arg::Buf(Buf::Arena(self.out()?)));
                self.launch(Box::new(spec), args);
                Ok(())
            }
            Op::Reduce { op, axis } => {
                let x = s(0);
                let spec = ReduceSpec {
                    outer: x.0[..*axis].iter().product(),
                    len: x.dim(*axis),
                    inner: x.0[axis + 1..].iter().product(),
                    op: *op,
                };
                spec.validate().map_err(|e| self.err(e.to_string()))?;
                let args = vec![Arg::Buf(self.val(n.inputs[0])?), Arg::Buf(Buf::Arena(self.out()?))];
                self.launch(Box::new(spec), args);
                Ok(())
            }
            Op::Softmax => {
                let x = s(0);
                let spec =
                    SoftmaxSpec::new(x.numel() / x.last().max(1), x.last()).map_err(|e| self.err(format!("{e:?}")))?;
                let args = vec![Arg::Buf(self.val(n.inputs[0])?), Arg::Buf(Buf::Arena(self.out()?))];
                self.launch(Box::new(spec), args);
                Ok(())
            }
            Op::MatMul { transpose_b } => {
                let (a, b) = (s(0), s(1));
                let rows = a.numel() / a.last().max(1);
                let linear_ok = *transpose_b || rows <= 8 || a.last().is_multiple_of(8);
                if b.rank() == 2 && self.is_param(n.inputs[1]) && linear_ok {
                    return self.linear(n.inputs[0], n.inputs[1], Extra::default(), Act::None, !transpose_b);
                }
                let (m, k) = (a.dim(a.rank() - 2), a.last());
                let nn = if *transpose_b { b.dim(b.rank() - 2) } else { b.last() };
                let batch = shape.numel() / (m * nn).max(1);
                let bb = b.numel() / (b.dim(b.rank() - 2) * b.last()).max(1);
                let b_batch = if bb == 1 { 0 } else { k * nn };
                let b_strides = if *transpose_b { [b_batch, 1, k] } else { [b_batch, nn, 1] };
                let bdt = if self.is_param(n.inputs[1]) { self.g.ty(n.inputs[1]).dtype } else { DType::F32 };
                let bdt = if bdt == DType::BF16 { DType::BF16 } else { DType::F32 };
                let spec = MatMulSpec { batch, m, n: nn, k, a_strides: [m * k, k, 1], b_strides, b: bdt };
                spec.validate().map_err(|e| self.err(e.to_string()))?;
                let bbuf = if bdt == DType::BF16 {
                    self.weight(n.inputs[1], DType::BF16, Layout::AsIs)?
                } else {
                    self.val(n.inputs[1])?
                };
                let args = vec![Arg::Buf(self.val(n.inputs[0])?), Arg::Buf(bbuf), Arg::Buf(Buf::Arena(self.out()?))];
                self.launch(Box::new(spec), args);
                Ok(())
            }
            Op::Gather => {
                let (t, ids) = (s(0), s(1));
                let table_dt = if self.is_param(n.inputs[0]) && self.g.ty(n.inputs[0]).dtype == DType::BF16 {
                    DType::BF16
                } else {
                    DType::F32
                };
                let spec = GatherSpec { rows: ids.numel(), cols: t.last(), vocab: t.dim(0), table: table_dt };
                spec.validate().map_err(|e| self.err(e.to_string()))?;
                let table = if table_dt == DType::BF16 {
                    self.weight(n.inputs[0], DType::BF16, Layout::AsIs)?
                } else {
                    self.val(n.inputs[0])?
                };
                let args = vec![Arg::Buf(table), Arg::Buf(self.val(n.inputs[1])?), Arg::Buf(Buf::Arena(self.out()?))];
                self.launch(Box::new(spec), args);
                Ok(())
            }
            Op::ScatterRows => {
                let (dst, src) = (s(0), s(1));
                let out = self.out()?;
                let cols = dst.last();
                let all = contiguous_strides(&dst.0);
                let base = self.val(n.inputs[0])?;
                self.copy_to(base, dst.0.clone(), all, Buf::Arena(out), (DType::F32, DType::F32))?;
                let spec =
                    ScatterRowsSpec { rows: src.numel() / cols.max(1), cols, dst_rows: dst.numel() / cols.max(1) };
                spec.validate().map_err(|e| self.err(e.to_string()))?;
                let args =
                    vec![Arg::Buf(self.val(n.inputs[1])?), Arg::Buf(self.val(n.inputs[2])?), Arg::Buf(Buf::Arena(out))];
                self.launch(Box::new(spec), args);
                Ok(())
            }
            Op::Iota { shape: is, axis } => {
                let cs = contiguous_strides(&is.0);
                let data: Arc<[f32]> = (0..is.numel()).map(|i| ((i / cs[*axis]) % is.dim(*axis)) as f32).collect();
                let key = self.const_key(data, is);
                self.copy_to(Buf::Weight(key, 0), is.0.clone(), cs, Buf::Arena(self.out()?), (DType::F32, DType::F32))
            }
            Op::LayerNorm { eps } | Op::RmsNorm { eps } => {
                let x = s(0);
                let b = matches!(n.op, Op::LayerNorm { .. }).then(|| n.inputs[2]);
                let xb = self.val(n.inputs[0])?;
                self.norm(xb, x.numel() / x.last().max(1), x.last(), n.inputs[1], b, *eps)
            }
            Op::AddNorm { rms, eps } => {
                let x = s(0);
                let spec = EltwiseSpec {
                    shape: x.0.clone(),
                    op: EltOp::Binary(qvc_ir::BinaryOp::Add),
                    strides: vec![broadcast_strides(&x, &x), broadcast_strides(&s(1), &x)],
                };
                spec.validate().map_err(|e| self.err(e.to_string()))?;
                let sum = self.scratch((x.numel() * 4) as u64);
                let args =
                    vec![Arg::Buf(self.val(n.inputs[0])?), Arg::Buf(self.val(n.inputs[1])?), Arg::Buf(Buf::Arena(sum))];
                self.launch(Box::new(spec), args);
                let b = (!rms).then(|| n.inputs[3]);
                self.norm(Buf::Arena(sum), x.numel() / x.last().max(1), x.last(), n.inputs[2], b, *eps)
            }
            Op::Rotary | Op::QkvRotary { .. } => {
                let (offset, heads, d, row, logn) = match n.op {
                    Op::QkvRotary { offset, heads, logn } => (offset, heads, shape.last(), s(0).last(), logn),
                    _ => (0, s(0).dim(1), s(0).dim(2), s(0).dim(1) * s(0).dim(2), false),
                };
                let t = shape.dim(0);
                let bf16_out = self.dt(self.node) == DType::BF16;
                let spec =
                    RopeSpec { tokens: t, heads, head_dim: d, token_stride: row, head_stride: d, logn, bf16_out };
                spec.validate().map_err(|e| self.err(e.to_string()))?;
                let x = match self.val(n.inputs[0])? {
                    Buf::Arena(o) => Buf::Arena(o + offset as u64 * 4),
                    Buf::Weight(k, o) => Buf::Weight(k, o + offset as u64 * 4),
                    kv => kv,
                };
                let mut args = vec![Arg::Buf(x), Arg::Buf(self.val(n.inputs[1])?), Arg::Buf(self.val(n.inputs[2])?)];
                if logn {
                    args.push(Arg::Buf(self.val(n.inputs[3])?));
                }
                args.push(Arg::Buf(Buf::Arena(self.out()?)));
                self.launch(Box::new(spec), args);
                Ok(())
            }
            Op::Linear { bias, act, residual } => {
                let act_k = match act {
                    IrAct::None => Act::None,
                    IrAct::Gelu => Act::Gelu,
                    IrAct::SiluMul => Act::SiluMul,
                };
                let mut i = 2;
                let w2 = (*act == IrAct::SiluMul).then(|| {
                    i += 1;
                    n.inputs[i - 1]
                });
                let b = bias.then(|| {
                    i += 1;
                    n.inputs[i - 1]
                });
                let r = residual.then(|| n.inputs[i]);
                self.linear(n.inputs[0], n.inputs[1], Extra { w2, bias: b, res: r }, act_k, false)
            }
            Op::Attention { mask, scale } => self.attention(*mask, *scale),
            Op::Conv2dPatch { patch } => {
                // im2col into scratch (rows padded to a multiple of 8 with
                // zeros), then the GEMM against the kernel read as
                // `[O, C·p·p]`, zero-padded the same way.
                let (x, w) = (s(0), s(1));
                let spec = PatchSpec::new(x.dim(0), (x.dim(1), x.dim(2)), *patch)
                    .and_then(|p| p.with_ld(p.cols().next_multiple_of(8)))
                    .map_err(|e| self.err(format!("{e:?}")))?;
                let a = self.scratch((spec.patches() * spec.ld * 2) as u64);
                let px = self.val(n.inputs[0])?;
                self.launch(Box::new(spec), vec![Arg::Buf(px), Arg::Buf(Buf::Arena(a))]);
                let g = GemmSpec::new(spec.patches(), w.dim(0), spec.ld, DType::BF16, DType::F32, Epilogue::NONE)
                    .map_err(|e| self.err(format!("{e:?}")))?;
                let wb = self.weight(n.inputs[1], DType::BF16, Layout::PadCols(spec.ld))?;
                self.launch(
                    Box::new(g),
                    vec![Arg::Buf(Buf::Arena(a)), Arg::Buf(wb), Arg::Buf(Buf::Arena(self.out()?))],
                );
                Ok(())
            }
        }
    }

    /// This node's value as a (strided) copy of its input 0's buffer `src`.
    fn copy(&mut self, src: Buf, shape: Vec<usize>, src_strides: Vec<usize>) -> R<()> {
        let out = self.out()?;
        let from = self.dt(self.g.node(self.node).inputs[0]);
        let to = self.dt(self.node);
        self.copy_to(src, shape, src_strides, Buf::Arena(out), (from, to))
    }

    fn copy_to(&mut self, src: Buf, shape: Vec<usize>, src_strides: Vec<usize>, dst: Buf, dt: (DType, DType)) -> R<()> {
        let dst_strides = contiguous_strides(&shape);
        let spec = CopySpec { shape, src_strides, dst_strides, src: dt.0, dst: dt.1 };
        spec.validate().map_err(|e| self.err(e.to_string()))?;
        self.launch(Box::new(spec), vec![Arg::Buf(src), Arg::Buf(dst)]);
        Ok(())
    }
}

/// One layer's attention of a batched decode step, done as one launch: the
/// graph attends per sequence (`B` nodes, each over `past_k.{l}.{b}`) and
/// concatenates; on the device the kernels index the layer's whole
/// `[slots, heads, max_seq, hd]` cache by each sequence's slot (device
/// data), so one append and one decode-attention launch serve all `B`,
/// whichever slots they sit in and in whatever order.
#[derive(Clone, Debug, PartialEq)]
struct BatchedAttention {
    /// q, k, v: `[B, heads, hd]`, each sliced per sequence by the graph.
    q: NodeId,
    k: NodeId,
    v: NodeId,
    layer: usize,
    batch: usize,
    scale: f32,
}

/// The batched-attention groups of `g`, by their `Concat` node, and the
/// attention nodes they absorb.
fn batched_attention(
    g: &Graph,
    kv: impl Fn(NodeId) -> Option<(usize, bool, usize)>,
) -> HashMap<NodeId, BatchedAttention> {
    let mut out = HashMap::new();
    for (c, node) in g.nodes.iter().enumerate() {
        if !matches!(node.op, Op::Concat { axis: 0 }) || node.inputs.len() < 2 {
            continue;
        }
        let base = |id: NodeId, b: usize| match &g.node(id).op {
            Op::Slice { axis: 0, start, end } if *start == b && *end == b + 1 => Some(g.node(id).inputs[0]),
            _ => None,
        };
        let mut group: Option<BatchedAttention> = None;
        let ok = node.inputs.iter().enumerate().all(|(b, &a)| {
            let n = g.node(a);
            let Op::Attention { mask: Mask::Causal, scale } = n.op else { return false };
            if n.inputs.len() < 5 || g.shape(n.inputs[0]).dim(0) != 1 {
                return false;
            }
            let (Some((lk, false, sk)), Some((lv, true, sv))) = (kv(n.inputs[3]), kv(n.inputs[4])) else {
                return false;
            };
            let (Some(q), Some(k), Some(v)) = (base(n.inputs[0], b), base(n.inputs[1], b), base(n.inputs[2], b)) else {
                return false;
            };
            let this = BatchedAttention { q, k, v, layer: lk, batch: node.inputs.len(), scale };
            let same = group.as_ref().is_none_or(|g0| *g0 == this);
            group = Some(this);
            lk == lv && sk == b && sv == b && same
        });
        if let (true, Some(grp)) = (ok, group) {
            out.insert(NodeId(c as u32), grp);
        }
    }
    out
}

/// Attention operands the flash kernel can read in place: `(attention,
/// operand) → (X, first column)` where the operand is `Reshape(Slice(X))`,
/// a column block of a bf16 row-major `X [T, C]` (the ViT's fused QKV
/// projection) that nothing else reads. Strides and the block's start must
/// be whole 16-byte chunks.
fn strided_operands(g: &Graph, bf16: &[bool]) -> HashMap<(NodeId, usize), (NodeId, usize)> {
    let mut readers = vec![0usize; g.nodes.len()];
    for n in &g.nodes {
        n.inputs.iter().for_each(|i| readers[i.index()] += 1);
    }
    g.outputs.iter().for_each(|(_, o)| readers[o.index()] += 1);
    let mut out = HashMap::new();
    for (a, node) in g.nodes.iter().enumerate() {
        if !matches!(node.op, Op::Attention { .. }) || node.inputs.len() != 3 {
            continue;
        }
        for (i, &r) in node.inputs.iter().enumerate() {
            let rn = g.node(r);
            let Op::Reshape(_) = rn.op else { continue };
            let sl = rn.inputs[0];
            let Op::Slice { axis: 1, start, end } = g.node(sl).op else { continue };
            let x = g.node(sl).inputs[0];
            let (xs, ts) = (g.shape(x), &rn.ty.shape);
            if xs.rank() != 2 || ts.rank() != 3 || ts.dim(1) * ts.dim(2) != end - start {
                continue;
            }
            let aligned = xs.dim(1).is_multiple_of(8) && ts.dim(2).is_multiple_of(8) && start.is_multiple_of(8);
            if aligned && bf16[x.index()] && readers[r.index()] == 1 && readers[sl.index()] == 1 {
                out.insert((NodeId(a as u32), i), (x, start));
            }
        }
    }
    out
}

/// Which computed values to store as bf16: those whose producer can write
/// bf16 (a GEMM without residual, a norm, attention, rotary, a copy) and whose every
/// reader takes bf16 anyway (a GEMM's activation operand, attention's
/// q/k/v, or a view or copy all of whose readers do). The bf16 rounding then happens
/// once, where the producer writes, instead of in a separate cast before
/// each tensor-core kernel: the same numbers with one pass (and half the
/// bytes) less per operand. Graph outputs stay f32. `decode_concats` are the
/// `Concat` nodes lowered as one batched decode attention
/// ([`BatchedAttention`]): they write like an attention, so a batched decode
/// step stores its attention output exactly as a one-sequence step does (and
/// its rows get the same numbers).
pub fn bf16_values(g: &Graph, plan: &MemoryPlan, decode_concats: &std::collections::HashSet<NodeId>) -> Vec<bool> {
    let n = g.nodes.len();
    let mut readers: Vec<Vec<(usize, usize)>> = vec![vec![]; n];
    for (i, node) in g.nodes.iter().enumerate() {
        for (p, inp) in node.inputs.iter().enumerate() {
            readers[inp.index()].push((i, p));
        }
    }
    let output: Vec<bool> = (0..n).map(|i| g.outputs.iter().any(|(_, o)| o.index() == i)).collect();
    let is_view = |i: usize| plan.values[i].is_some_and(|s| s.alias_of.is_some());
    fn accepts(
        i: usize,
        g: &Graph,
        readers: &[Vec<(usize, usize)>],
        output: &[bool],
        is_view: &dyn Fn(usize) -> bool,
    ) -> bool {
        if output[i] || readers[i].is_empty() {
            return false;
        }
        readers[i].iter().all(|&(c, p)| {
            if is_view(c) {
                return accepts(c, g, readers, output, is_view);
            }
            let node = &g.nodes[c];
            match &node.op {
                Op::Linear { .. } if p == 0 => {
                    let x = g.shape(node.inputs[0]);
                    let (k, m) = (x.last(), x.numel() / x.last().max(1));
                    m <= 8 || k.is_multiple_of(8)
                }
                Op::Attention { .. } => node.inputs.len() == 3 || p == 0,
                // A copy may read bf16 only if it writes bf16 (else the
                // rounding would reach readers that want f32).
                Op::Slice { .. } | Op::Permute(_) => accepts(c, g, readers, output, is_view),
                _ => false,
            }
        })
    }
    (0..n)
        .map(|i| {
            let emits = match &g.nodes[i].op {
                Op::Linear { residual, .. } => !residual,
                Op::LayerNorm { .. } | Op::RmsNorm { .. } | Op::Attention { .. } => true,
                Op::Rotary | Op::QkvRotary { .. } => true,
                Op::Concat { .. } => decode_concats.contains(&NodeId(i as u32)),
                Op::Slice { .. } | Op::Permute(_) => plan.values[i].is_some() && !is_view(i),
                _ => false,
            };
            emits && plan.values[i].is_some() && !is_view(i) && accepts(i, g, &readers, &output, &is_view)
        })
        .collect()
}

/// Lower `g` for a device (see the module docs).
pub fn lower(g: &Graph, opt: &LowerOptions) -> Result<Lowered, LowerError> {
    let popt = PlanOptions { align: ALIGN, in_place: false, reuse: true };
    let mut plan = plan_memory(g, &popt);
    // Attention operands read in place keep their base alive until the
    // attention: plan a copy of the graph whose attention reads the base.
    let strided = strided_operands(g, &bf16_values(g, &plan, &Default::default()));
    if !strided.is_empty() {
        let mut wired = g.clone();
        for (&(a, i), &(x, _)) in &strided {
            wired.nodes[a.index()].inputs[i] = x;
        }
        plan = plan_memory(&wired, &popt);
    }
    let mut at = align(plan.arena_bytes);
    let mut inputs = HashMap::new();
    let mut input_slots = vec![];
    for (i, n) in g.nodes.iter().enumerate() {
        let Op::Input(name) = &n.op else { continue };
        if name.starts_with("past_k.") || name.starts_with("past_v.") {
            continue;
        }
        inputs.insert(NodeId(i as u32), at);
        let numel = n.ty.shape.numel();
        input_slots.push(InputSlot { name: name.clone(), offset: at, dtype: n.ty.dtype, numel });
        at += align((numel * n.ty.dtype.size()) as u64);
    }
    let lens_at = at;
    at += ALIGN; // room for 64 sequences' u32 key counts
    let slots_at = at;
    at += ALIGN; // and their u32 cache slots
                 // Sampling: the uniforms in, the chosen tokens out (64 rows at most).
    let (u_at, token_at) = (at, at + ALIGN);
    if opt.sampling != Sampling::Off {
        at += 2 * ALIGN;
    }
    if opt.sampling == Sampling::TopP {
        // Its length (the logits rows) is set where the sampler is lowered.
        input_slots.push(InputSlot { name: "sample.u".into(), offset: u_at, dtype: DType::F32, numel: 0 });
    }
    let mut lw = Lower {
        g,
        plan,
        opt: *opt,
        steps: vec![],
        kernels: BTreeMap::new(),
        consts: HashMap::new(),
        inputs,
        input_slots,
        host_inputs: HashMap::new(),
        host_nodes: 0,
        lens_at,
        slots_at,
        scratch_base: at,
        scratch_cur: 0,
        scratch_max: 0,
        node: NodeId(0),
        kv_written: vec![],
        kv_rows: 0,
        seqs: 1,
        bf16: vec![],
        batched: HashMap::new(),
        absorbed: Default::default(),
        strided: HashMap::new(),
        elided_slices: Default::default(),
    };
    lw.batched = batched_attention(g, |id| lw.kv_input(id));
    lw.bf16 = bf16_values(g, &lw.plan, &lw.batched.keys().copied().collect());
    for &(a, i) in strided.keys() {
        let r = g.node(a).inputs[i];
        lw.elided_slices.insert(g.node(r).inputs[0]);
    }
    lw.strided = strided;
    lw.absorbed = lw.batched.keys().flat_map(|c| g.node(*c).inputs.iter().copied()).collect();
    for i in 0..g.nodes.len() {
        lw.node = NodeId(i as u32);
        lw.scratch_cur = 0;
        // A node no kernel accepts (a shape outside a spec's limits) runs on
        // the host instead; if the host cannot run it either (it reads the
        // device's KV cache), the kernel's reason is the error.
        let mark = lw.steps.len();
        if let Err(e) = lw.node() {
            lw.steps.truncate(mark);
            lw.scratch_cur = 0;
            lw.host().map_err(|_| e)?;
        }
    }
    // New K/V rows of the outputs go into the cache (a decode attention
    // wrote its own already).
    let mut outputs = vec![];
    for (name, id) in &g.outputs {
        let kv = kv_layer(name, "k.").map(|l| (l, false)).or_else(|| kv_layer(name, "v.").map(|l| (l, true)));
        lw.node = *id;
        if let Some((layer, v)) = kv {
            if !lw.kv_written.contains(&(layer, v)) {
                let t = g.shape(*id).dim(0);
                let src = lw.val(*id)?;
                lw.kv_write(src, lw.dt(*id), t, layer, v, 0)?;
            }
            continue;
        }
        let t = g.ty(*id);
        let dtype = if t.dtype == DType::I32 { DType::I32 } else { DType::F32 };
        let x = lw.val(*id)?;
        if name == "logits" && opt.sampling != Sampling::Off {
            let (rows, cols) = (t.shape.numel() / t.shape.last().max(1), t.shape.last());
            if rows > 64 {
                return Err(lw.err("device sampling takes at most 64 rows of logits"));
            }
            let out = Arg::Buf(Buf::Arena(token_at));
            if opt.sampling == Sampling::Greedy {
                let sp = ArgmaxSpec::new(rows, cols).map_err(|e| lw.err(format!("{e:?}")))?;
                lw.launch(Box::new(sp), vec![Arg::Buf(x), out]);
            } else {
                let sp = TopPSpec::new(rows, cols).map_err(|e| lw.err(format!("{e:?}")))?;
                let args = vec![
                    Arg::Buf(x),
                    Arg::Buf(Buf::Arena(u_at)),
                    out,
                    Arg::Sample(SampleArg::Temperature),
                    Arg::Sample(SampleArg::TopP),
                    Arg::Sample(SampleArg::TopK),
                ];
                lw.launch(Box::new(sp), args);
                if let Some(slot) = lw.input_slots.iter_mut().find(|i| i.name == "sample.u") {
                    slot.numel = rows;
                }
            }
            outputs.push(("token".into(), Loc { buf: Buf::Arena(token_at), dtype: DType::I32, numel: rows }));
            continue;
        }
        outputs.push((name.clone(), Loc { buf: x, dtype, numel: t.shape.numel() }));
    }
    // A program without logits takes no uniforms.
    lw.input_slots.retain(|i| !(i.name == "sample.u" && i.numel == 0));
    let bytes = lw.scratch_base + lw.scratch_max;
    let launches = lw.steps.iter().filter(|s| matches!(s, Step::Launch { .. })).count();
    if lw.seqs > 64 {
        return Err(LowerError::Unsupported {
            node: 0,
            op: "program".into(),
            why: format!("{} sequences (at most 64)", lw.seqs),
        });
    }
    let capturable = lw.steps.iter().all(|s| match s {
        Step::Host { .. } => false,
        Step::Launch { args, .. } => !args.iter().any(|a| matches!(a, Arg::Buf(Buf::Kv { at_past: true, .. }))),
        Step::Zero { .. } => true,
    });
    let slot_args = lw.steps.iter().any(|s| match s {
        Step::Launch { args, .. } => args.iter().any(|a| matches!(a, Arg::Buf(Buf::Kv { .. }))),
        _ => false,
    });
    Ok(Lowered {
        steps: lw.steps,
        bytes,
        inputs: lw.input_slots,
        outputs,
        kernels: lw.kernels,
        consts: lw.consts,
        host_inputs: lw.host_inputs,
        host_nodes: lw.host_nodes,
        launches,
        kv_rows: lw.kv_rows,
        plan: lw.plan,
        params: g.params().into_iter().map(|(n, t)| (n.to_string(), t.shape.0.clone())).collect(),
        seqs: lw.seqs,
        lens_at: lw.lens_at,
        slots_at: lw.slots_at,
        capturable,
        slot_args,
    })
}

/// Device pointer of `buf` given the program allocation, a weight lookup and
/// the cache (`kv(layer, v, Some((at_past, seq)))` for one sequence's cache,
/// `kv(layer, v, None)` for the whole layer).
pub fn resolve(
    buf: &Buf,
    arena: DevPtr,
    weight: &dyn Fn(&WeightKey) -> Option<DevPtr>,
    kv: &dyn Fn(usize, bool, Option<(bool, usize)>) -> Option<DevPtr>,
) -> Option<DevPtr> {
    match buf {
        Buf::Arena(o) => Some(arena + o),
        Buf::Weight(k, o) => weight(k).map(|p| p + o),
        Buf::Kv { layer, v, at_past, seq } => kv(*layer, *v, Some((*at_past, *seq))),
        Buf::KvAll { layer, v } => kv(*layer, *v, None),
    }
}
