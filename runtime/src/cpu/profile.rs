//! Where a CPU graph run's time goes (`qvc bench --profile` on the CPU):
//! each op is timed on its own and filed under a label of its kind and
//! shapes, with the work it did by a simple cost model, so a report can
//! print every op family's FLOP/s and GB/s against the machine's ceilings.
//!
//! Off unless [`start`] was called: [`super::run`] then reads one relaxed
//! flag per op. The profile is process-wide, so graphs that run at the same
//! time on several threads (a server) all count toward it.
//!
//! Cost model (what the GB/s and FLOP/s columns divide): a Linear or MatMul
//! does `2·m·k·n` FLOPs (twice for SwiGLU's two weights) and reads its
//! weights at their stored size (bf16 2 bytes, int4 the nibbles, scales and
//! zeros) plus its f32 activations; an attention does `4·d` FLOPs per
//! (query, key, head) pair it actually scores (causal and window masks
//! counted exactly) and reads q, k, v, the cache rows it uses and writes
//! its output; every other op moves its inputs and output and does no
//! counted FLOPs.

use super::Buf;
use crate::KernelTime;
use qvc_ir::{Act, Elems, Graph, Mask, Node, Op, Shape};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static ON: AtomicBool = AtomicBool::new(false);
static TIMES: Mutex<Option<HashMap<String, KernelTime>>> = Mutex::new(None);

/// Time every op of every CPU graph run from now on (see the module doc),
/// until [`take`].
pub fn start() {
    if let Ok(mut t) = TIMES.lock() {
        *t = Some(HashMap::new());
        ON.store(true, Ordering::Relaxed);
    }
}

/// The ops timed since [`start`], slowest first; profiling stops.
pub fn take() -> Vec<KernelTime> {
    ON.store(false, Ordering::Relaxed);
    let mut v: Vec<KernelTime> =
        TIMES.lock().ok().and_then(|mut t| t.take()).map(|m| m.into_values().collect()).unwrap_or_default();
    v.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    v
}

/// Whether ops are being timed.
#[inline]
pub(super) fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// One op's label and work, taken before it runs (it consumes its inputs).
pub(super) struct Pending {
    label: String,
    flops: u64,
    bytes: u64,
}

/// What `n` will cost, or `None` for ops that only name a value (inputs,
/// weights, reshapes).
pub(super) fn cost(g: &Graph, n: &Node, args: &[Buf<'_>]) -> Option<Pending> {
    let out = &n.ty.shape;
    let shp = |i: usize| g.shape(n.inputs[i]);
    let moved = || args.iter().map(moved_bytes).sum::<u64>() + 4 * out.numel() as u64;
    let dims = |s: &Shape| s.0.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
    let ew = |what: String| (format!("elementwise {what} {}", dims(out)), 0, moved());
    let (label, flops, bytes) = match &n.op {
        Op::Input(_) | Op::Param(_) | Op::Reshape(_) => return None,
        Op::Linear { bias, act, residual } => {
            let (k, nn) = (shp(1).dim(1), shp(1).dim(0));
            let m = out.numel() / nn.max(1);
            let weights = if *act == Act::SiluMul { 2 } else { 1 };
            let dtype = args.get(1).map_or("?", |w| dtype_name(w));
            let mut label = format!("linear {m}x{k}->{nn} {dtype}");
            for (on, what) in [
                (*act == Act::SiluMul, " swiglu"),
                (*act == Act::Gelu, " gelu"),
                (*bias, " +bias"),
                (*residual, " +res"),
            ] {
                if on {
                    label.push_str(what);
                }
            }
            (label, (2 * m * k * nn * weights) as u64, moved())
        }
        Op::MatMul { .. } => {
            let sa = shp(0);
            let (m, k, nn) = (sa.dim(sa.rank() - 2), sa.last(), out.last());
            let batches = out.numel() / (m * nn).max(1);
            (
                format!("matmul {batches}x{m}x{k}x{nn} {}", dtype_name(&args[1])),
                (2 * batches * m * k * nn) as u64,
                moved(),
            )
        }
        Op::Attention { mask, .. } => {
            let (tq, heads, d) = (out.dim(0), out.dim(1), out.dim(2));
            let tk = shp(1).dim(0);
            let past = if args.len() >= 5 {
                // A padded cache: the length input says how many rows are keys.
                match args.get(5) {
                    Some(len) => len.elems().get(0).max(0.0) as usize,
                    None => shp(3).dim(0),
                }
            } else {
                0
            };
            let (what, pairs) = match mask {
                Mask::None => ("full".to_string(), tq * (past + tk)),
                // Query i sees the past and the new keys up to its own position.
                Mask::Causal => ("causal".to_string(), (0..tq).map(|i| past + (tk + i + 1).saturating_sub(tq)).sum()),
                Mask::Window { grid_h, grid_w, window } => {
                    // A window of a×b cells scores (a·b)² pairs, and the
                    // windows' sides tile each axis.
                    let w = (*window).max(1);
                    let sq = |len: usize| (0..len).step_by(w).map(|s| (len - s).min(w).pow(2)).sum::<usize>();
                    (format!("window:{window}"), sq(*grid_h) * sq(*grid_w))
                }
            };
            let hd = heads * d;
            let label = if past > 0 {
                format!("attention {what} {tq} new + {past} cached, {heads}x{d}")
            } else {
                format!("attention {what} {tq}x{tk}, {heads}x{d}")
            };
            (label, (4 * pairs * d * heads) as u64, 4 * (hd * (2 * tq + 2 * tk + 2 * past)) as u64)
        }
        Op::LayerNorm { .. } => (format!("norm layernorm {}", dims(out)), 0, moved()),
        Op::RmsNorm { .. } => (format!("norm rmsnorm {}", dims(out)), 0, moved()),
        Op::AddNorm { rms, .. } => {
            (format!("norm add+{} {}", if *rms { "rmsnorm" } else { "layernorm" }, dims(out)), 0, moved())
        }
        Op::Rotary | Op::QkvRotary { .. } => (format!("rotary {}", dims(out)), 0, moved()),
        Op::Conv2dPatch { patch } => {
            let (c, o) = (shp(0).dim(0), out.dim(1));
            let rows = out.numel() / o.max(1);
            (format!("conv patch {patch} {}", dims(out)), (2 * rows * c * patch * patch * o) as u64, moved())
        }
        Op::Gelu => ew("gelu".into()),
        Op::Silu => ew("silu".into()),
        Op::Softmax => ew("softmax".into()),
        Op::Where => ew("where".into()),
        Op::Unary(u) => ew(format!("{u:?}").to_lowercase()),
        Op::Binary(b) => ew(format!("{b:?}").to_lowercase()),
        Op::Reduce { op, axis } => ew(format!("{op:?}@{axis}").to_lowercase()),
        // These read only the rows they copy.
        Op::Slice { .. } | Op::Gather => {
            let per = args.first().map_or(4, elem_size);
            let ids = args.get(1).map_or(0, moved_bytes);
            let what = if matches!(n.op, Op::Gather) { "gather" } else { "slice" };
            (format!("copy {what} {}", dims(out)), 0, (per + 4) * out.numel() as u64 + ids)
        }
        Op::Const(_) | Op::Permute(_) | Op::Concat { .. } | Op::ScatterRows | Op::Iota { .. } => {
            let what = match &n.op {
                Op::Const(_) => "const",
                Op::Permute(_) => "permute",
                Op::Concat { .. } => "concat",
                Op::ScatterRows => "scatter_rows",
                _ => "iota",
            };
            (format!("copy {what} {}", dims(out)), 0, moved())
        }
    };
    Some(Pending { label, flops, bytes })
}

/// File a finished op's time under its label.
pub(super) fn record(p: Pending, ms: f64) {
    if let Ok(mut t) = TIMES.lock() {
        if let Some(map) = t.as_mut() {
            let e = map.entry(p.label).or_insert_with_key(|k| KernelTime { kernel: k.clone(), ..Default::default() });
            e.launches += 1;
            e.ms += ms;
            e.flops += p.flops;
            e.bytes += p.bytes;
        }
    }
}

/// Bytes an op reads of one input: its stored size.
fn moved_bytes(b: &Buf<'_>) -> u64 {
    match b {
        Buf::Ids(v) => 4 * v.len() as u64,
        b => match b.elems() {
            Elems::Q4(q) => q.bytes() as u64,
            e => (e.len() * e.dtype().size()) as u64,
        },
    }
}

/// Bytes of one element of an input as stored (a copy reads only some).
fn elem_size(b: &Buf<'_>) -> u64 {
    match b {
        Buf::Ids(_) => 4,
        b => b.elems().dtype().size() as u64,
    }
}

fn dtype_name(b: &Buf<'_>) -> &'static str {
    match b {
        Buf::Ids(_) => "i32",
        b => match b.elems() {
            Elems::F32(_) => "f32",
            Elems::BF16(_) => "bf16",
            Elems::F16(_) => "f16",
            Elems::Q4(_) => "int4",
        },
    }
}
