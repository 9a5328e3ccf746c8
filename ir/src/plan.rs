//! Memory planning: liveness, buffer reuse and in-place updates.
//!
//! [`plan_memory`] gives every computed value of a [`Graph`] a byte range in
//! one arena, so a compiled program allocates once and runs with fixed
//! buffer bindings.
//!
//! Invariant (checked by [`MemoryPlan::check`]): two values whose lifetimes
//! overlap never share a byte, except
//! - a view and the value it views (`Reshape`, or a `Slice` that keeps its
//!   base contiguous): an alias, never written;
//! - an in-place value and the input it overwrites, at the one node where
//!   that input dies.
//!
//! Every slot lies inside the arena; every buffer starts on `align` bytes.
//!
//! Lifetimes: a value lives from the node that defines it to its last
//! reader ([`Graph::last_uses`]); graph outputs live to the end of the
//! program; an unread value lives only at its own node. Leaves (inputs,
//! params, consts) are not in the arena: the caller binds inputs and the
//! weights file holds the rest. A view of a leaf is not in the arena either.
//!
//! Values are grouped into *buffers*: a buffer is opened by a value that
//! needs fresh memory and is joined by views of its members and by in-place
//! values that take it over. A buffer lives from its first member's
//! definition to its last member's last use. `peak_bytes` is the maximum over
//! time of the (aligned) bytes of live buffers: no placement can fit the
//! same buffers in a smaller arena, so it is the lower bound the allocator is
//! measured against.
//!
//! Placement (with `reuse`): three offline heuristics are tried and the
//! smallest arena kept, all deterministic: first-fit and best-fit over the
//! gaps left by buffers whose lifetimes overlap, taking buffers in node
//! order (what an online allocator with a free list would do), and
//! greedy-by-size (largest buffer first, best-fit: TFLite's arena planner).
//! Node-order placement tends to win on chains; size order wins when a few
//! big buffers (attention scores, MLP activations) dominate.

use crate::graph::{Graph, NodeId, Op};
use std::fmt;

/// How to plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    /// Every buffer starts on a multiple of this many bytes (0 counts as 1).
    pub align: u64,
    /// Let elementwise ops write over an input that dies at them.
    pub in_place: bool,
    /// Let buffers with disjoint lifetimes share bytes.
    pub reuse: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions { align: 256, in_place: true, reuse: true }
    }
}

/// Where one value lives in the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Byte offset from the start of the arena.
    pub offset: u64,
    /// Bytes of the value (`numel × dtype size`, not padded).
    pub bytes: u64,
    /// For a view (`Reshape`, contiguous `Slice`): the value it views. For an
    /// in-place value: the input whose bytes it overwrites (its kernel runs
    /// with output and that input bound to the same bytes, see
    /// [`in_place_candidates`]). `None`: the value has its own buffer.
    pub alias_of: Option<NodeId>,
}

/// Which placement heuristic produced the arena (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// No reuse: every buffer after the previous one.
    Sequential,
    FirstFit,
    BestFit,
    GreedyBySize,
}

/// The plan for one program.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    /// Per node: its slot, or `None` for leaves and views of leaves.
    pub values: Vec<Option<Slot>>,
    /// Size of the arena (a multiple of `align`).
    pub arena_bytes: u64,
    /// The maximum over time of the aligned bytes of live buffers: the lower
    /// bound for `arena_bytes` given these in-place and view decisions.
    pub peak_bytes: u64,
    /// What the program would need if every non-leaf value had its own
    /// aligned buffer (no reuse, no in-place, no views).
    pub naive_bytes: u64,
    /// Values that overwrite an input's buffer.
    pub in_place: usize,
    /// Values that are views into another value's buffer.
    pub views: usize,
    /// Distinct buffers placed.
    pub buffers: usize,
    /// The alignment used.
    pub align: u64,
    pub strategy: Strategy,
}

/// Bytes of a KV cache: keys and values for `layers` layers, `heads × head_dim`
/// channels, `max_seq` positions and `batch` sequences.
pub fn kv_cache_bytes(
    layers: usize,
    heads: usize,
    head_dim: usize,
    max_seq: usize,
    batch: usize,
    dtype: crate::DType,
) -> u64 {
    2 * layers as u64 * heads as u64 * head_dim as u64 * max_seq as u64 * batch as u64 * dtype.size() as u64
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

fn value_bytes(g: &Graph, i: usize) -> u64 {
    let t = &g.nodes[i].ty;
    t.shape.numel() as u64 * t.dtype.size() as u64
}

fn is_leaf(op: &Op) -> bool {
    matches!(op, Op::Input(_) | Op::Param(_) | Op::Const(_))
}

/// If node `i` can be a view of its input, the byte offset of its data in
/// the input's data. `Reshape` keeps the bytes; a `Slice` is contiguous when
/// every axis before the sliced one has size 1 (axis 0 in practice).
fn view_offset(g: &Graph, i: usize) -> Option<u64> {
    let n = &g.nodes[i];
    match &n.op {
        Op::Reshape(_) => Some(0),
        Op::Slice { axis, start, .. } => {
            let src = g.shape(n.inputs[0]);
            if src.0[..*axis].iter().all(|&d| d == 1) {
                let inner: usize = src.0[axis + 1..].iter().product();
                Some((start * inner * n.ty.dtype.size()) as u64)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Input positions whose buffer node `i` may overwrite, in order of
/// preference: the contract between the planner and the kernels. Each op
/// listed computes an output element (or a last-axis row, for the norms,
/// softmax and rotary) only from the same element or row of that input, so
/// a kernel bound with its output on that input is correct as long as it
/// reads a row before writing it. `Linear` overwrites only its residual,
/// which the GEMM epilogue reads at the element it writes.
pub fn in_place_candidates(g: &Graph, node: NodeId) -> Vec<usize> {
    let n = &g.nodes[node.index()];
    let same_shape = |p: usize| g.shape(n.inputs[p]) == &n.ty.shape;
    let cands: Vec<usize> = match &n.op {
        Op::Unary(_)
        | Op::Gelu
        | Op::Silu
        | Op::Softmax
        | Op::Rotary
        | Op::LayerNorm { .. }
        | Op::RmsNorm { .. }
        | Op::ScatterRows => vec![0],
        Op::Binary(_) | Op::AddNorm { .. } => vec![0, 1],
        Op::Linear { residual: true, .. } => vec![n.inputs.len() - 1],
        _ => vec![],
    };
    cands.into_iter().filter(|&p| same_shape(p)).collect()
}

/// Whether an in-place node may also read the overwritten value through
/// another input position (`x * x`): only where every input is read at the
/// output element's own index.
fn repeated_input_ok(op: &Op) -> bool {
    matches!(op, Op::Binary(_) | Op::AddNorm { .. })
}

/// Closed lifetime `[def, end]` of every node, in node indices; graph
/// outputs end at `nodes.len()`.
fn lifetimes(g: &Graph) -> Vec<(usize, usize)> {
    let n = g.nodes.len();
    g.last_uses().into_iter().enumerate().map(|(i, l)| (i, if l == usize::MAX { n } else { l.max(i) })).collect()
}

struct Buffer {
    start: usize,
    end: usize,
    /// Aligned size.
    size: u64,
}

/// Plan the arena of `g` (see the module docs).
pub fn plan_memory(g: &Graph, opts: &PlanOptions) -> MemoryPlan {
    let align = opts.align.max(1);
    let n = g.nodes.len();
    let life = lifetimes(g);
    // Per value: its buffer and byte offset inside it.
    let mut place: Vec<Option<(usize, u64)>> = vec![None; n];
    let mut alias: Vec<Option<NodeId>> = vec![None; n];
    let mut buffers: Vec<Buffer> = Vec::new();
    let (mut in_place, mut views) = (0, 0);
    let mut naive = 0u64;
    for i in 0..n {
        let node = &g.nodes[i];
        if is_leaf(&node.op) {
            continue;
        }
        let bytes = value_bytes(g, i);
        naive += align_up(bytes, align);
        if let Some(off) = view_offset(g, i) {
            let src = node.inputs[0];
            if let Some((b, rel)) = place[src.index()] {
                place[i] = Some((b, rel + off));
                alias[i] = Some(src);
                buffers[b].end = buffers[b].end.max(life[i].1);
                views += 1;
            }
            // A view of a leaf stays outside the arena.
            continue;
        }
        if opts.in_place {
            let taken = in_place_candidates(g, NodeId(i as u32)).into_iter().find_map(|p| {
                let x = node.inputs[p];
                let (b, rel) = place[x.index()]?;
                let buf = &buffers[b];
                // The input must cover its whole buffer, and nothing in that
                // buffer may be read after this node.
                let whole = rel == 0 && align_up(value_bytes(g, x.index()), align) == buf.size;
                let others_clear = node.inputs.iter().enumerate().all(|(q, y)| {
                    q == p || place[y.index()].is_none_or(|(by, _)| by != b) || (*y == x && repeated_input_ok(&node.op))
                });
                (whole && value_bytes(g, x.index()) == bytes && buf.end <= i && others_clear).then_some((b, x))
            });
            if let Some((b, x)) = taken {
                place[i] = Some((b, 0));
                alias[i] = Some(x);
                buffers[b].end = buffers[b].end.max(life[i].1);
                in_place += 1;
                continue;
            }
        }
        place[i] = Some((buffers.len(), 0));
        buffers.push(Buffer { start: i, end: life[i].1, size: align_up(bytes, align) });
    }

    let peak = peak_bytes(&buffers, n);
    let (strategy, offsets) = if opts.reuse {
        [Strategy::FirstFit, Strategy::BestFit, Strategy::GreedyBySize]
            .into_iter()
            .map(|s| (s, place_buffers(&buffers, s)))
            .min_by_key(|(_, o)| arena_of(&buffers, o))
            .expect("three strategies")
    } else {
        (Strategy::Sequential, place_buffers(&buffers, Strategy::Sequential))
    };
    let arena = align_up(arena_of(&buffers, &offsets), align);
    let values = (0..n)
        .map(|i| {
            place[i].map(|(b, rel)| Slot { offset: offsets[b] + rel, bytes: value_bytes(g, i), alias_of: alias[i] })
        })
        .collect();
    MemoryPlan {
        values,
        arena_bytes: arena,
        peak_bytes: peak,
        naive_bytes: naive,
        in_place,
        views,
        buffers: buffers.len(),
        align,
        strategy,
    }
}

fn peak_bytes(buffers: &[Buffer], n: usize) -> u64 {
    // Lifetimes end at most at `n`; a buffer stops counting after its end.
    let mut delta = vec![0i128; n + 2];
    for b in buffers {
        delta[b.start] += b.size as i128;
        delta[b.end + 1] -= b.size as i128;
    }
    let (mut live, mut peak) = (0i128, 0i128);
    for d in delta {
        live += d;
        peak = peak.max(live);
    }
    peak as u64
}

fn arena_of(buffers: &[Buffer], offsets: &[u64]) -> u64 {
    buffers.iter().zip(offsets).map(|(b, o)| o + b.size).max().unwrap_or(0)
}

/// Offsets for every buffer under strategy `s`.
fn place_buffers(buffers: &[Buffer], s: Strategy) -> Vec<u64> {
    let mut offsets = vec![0u64; buffers.len()];
    if s == Strategy::Sequential {
        let mut top = 0;
        for (o, b) in offsets.iter_mut().zip(buffers) {
            *o = top;
            top += b.size;
        }
        return offsets;
    }
    let mut order: Vec<usize> = (0..buffers.len()).collect();
    if s == Strategy::GreedyBySize {
        order.sort_by_key(|&k| (std::cmp::Reverse(buffers[k].size), buffers[k].start));
    }
    let best = s != Strategy::FirstFit;
    let mut placed: Vec<usize> = Vec::with_capacity(buffers.len());
    for &k in &order {
        let b = &buffers[k];
        let mut busy: Vec<(u64, u64)> = placed
            .iter()
            .filter(|&&j| buffers[j].start <= b.end && b.start <= buffers[j].end)
            .map(|&j| (offsets[j], offsets[j] + buffers[j].size))
            .collect();
        busy.sort_unstable();
        let mut cursor = 0u64;
        let mut chosen: Option<(u64, u64)> = None; // (gap size, offset)
        for (lo, hi) in busy {
            if lo >= cursor + b.size {
                let gap = lo - cursor;
                if !best {
                    chosen = Some((gap, cursor));
                    break;
                }
                if chosen.is_none_or(|(g, _)| gap < g) {
                    chosen = Some((gap, cursor));
                }
            }
            cursor = cursor.max(hi);
        }
        offsets[k] = chosen.map_or(cursor, |(_, o)| o);
        placed.push(k);
    }
    offsets
}

impl MemoryPlan {
    /// Validate the plan against `g` (see the module invariant). Returns a
    /// description of the first violation.
    pub fn check(&self, g: &Graph) -> Result<(), String> {
        let n = g.nodes.len();
        if self.values.len() != n {
            return Err(format!("plan has {} values for {n} nodes", self.values.len()));
        }
        let align = self.align.max(1);
        let life = lifetimes(g);
        let is_view = |i: usize| self.values[i].is_some_and(|s| s.alias_of.is_some()) && view_offset(g, i).is_some();
        for (i, (node, slot)) in g.nodes.iter().zip(&self.values).enumerate() {
            let what = || format!("%{i} = {}", node.op.name());
            let Some(s) = slot else {
                // Leaves, and views of something outside the arena.
                let outside =
                    is_leaf(&node.op) || (view_offset(g, i).is_some() && self.values[node.inputs[0].index()].is_none());
                if !outside {
                    return Err(format!("{} has no slot", what()));
                }
                continue;
            };
            if is_leaf(&node.op) {
                return Err(format!("leaf {} is in the arena", what()));
            }
            if s.bytes != value_bytes(g, i) {
                return Err(format!("{} has {} bytes, its type needs {}", what(), s.bytes, value_bytes(g, i)));
            }
            if s.offset + s.bytes > self.arena_bytes {
                return Err(format!(
                    "{} ends at {}, past the arena ({})",
                    what(),
                    s.offset + s.bytes,
                    self.arena_bytes
                ));
            }
            match s.alias_of {
                None => {
                    if s.offset % align != 0 {
                        return Err(format!("{} starts at {}, not a multiple of {align}", what(), s.offset));
                    }
                }
                Some(a) if view_offset(g, i).is_some() => {
                    let base =
                        self.values[a.index()].ok_or_else(|| format!("{} views %{} with no slot", what(), a.0))?;
                    let want = base.offset + view_offset(g, i).unwrap_or(0);
                    if node.inputs[0] != a || s.offset != want {
                        return Err(format!("{} claims to view %{} at {}, expected {want}", what(), a.0, s.offset));
                    }
                }
                Some(a) => {
                    let p = node.inputs.iter().position(|x| *x == a);
                    let ok_pos = p.is_some_and(|p| in_place_candidates(g, NodeId(i as u32)).contains(&p));
                    let base = self.values[a.index()];
                    if !ok_pos
                        || life[a.index()].1 != i
                        || base.map(|b| (b.offset, b.bytes)) != Some((s.offset, s.bytes))
                    {
                        return Err(format!("{} cannot overwrite %{} in place", what(), a.0));
                    }
                    if s.offset % align != 0 {
                        return Err(format!("{} starts at {}, not a multiple of {align}", what(), s.offset));
                    }
                }
            }
        }
        // The view family of a value: follow view links to the viewed root.
        let family = |mut i: usize| {
            while is_view(i) {
                i = self.values[i].and_then(|s| s.alias_of).map_or(i, |a| a.index());
            }
            i
        };
        let mut by_offset: Vec<(u64, u64, usize)> =
            self.values.iter().enumerate().filter_map(|(i, s)| s.map(|s| (s.offset, s.bytes, i))).collect();
        by_offset.sort_unstable();
        for (k, &(oa, ba, a)) in by_offset.iter().enumerate() {
            for &(ob, bb, b) in &by_offset[k + 1..] {
                if ob >= oa + ba {
                    break;
                }
                if bb == 0 || ba == 0 {
                    continue;
                }
                let ((da, ea), (db, eb)) = (life[a], life[b]);
                if da > eb || db > ea {
                    continue;
                }
                let overwrites = |x: usize, y: usize| {
                    !is_view(y) && self.values[y].and_then(|s| s.alias_of) == Some(NodeId(x as u32)) && life[x].1 == y
                };
                if family(a) == family(b) || overwrites(a, b) || overwrites(b, a) {
                    continue;
                }
                return Err(format!(
                    "%{a} ({}, live {da}..={ea}) and %{b} ({}, live {db}..={eb}) share bytes {}..{}",
                    g.nodes[a].op.name(),
                    g.nodes[b].op.name(),
                    oa.max(ob),
                    (oa + ba).min(ob + bb)
                ));
            }
        }
        Ok(())
    }
}

impl fmt::Display for MemoryPlan {
    /// `arena 12.0 MiB (peak 11.5 MiB, naive 80.0 MiB), 40 buffers, 12 in place, 9 views, best-fit`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        write!(
            f,
            "arena {:.1} MiB (peak {:.1} MiB, naive {:.1} MiB), {} buffers, {} in place, {} views, {:?}",
            mib(self.arena_bytes),
            mib(self.peak_bytes),
            mib(self.naive_bytes),
            self.buffers,
            self.in_place,
            self.views,
            self.strategy
        )
    }
}
