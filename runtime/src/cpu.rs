//! The CPU backend: runs a [`Graph`] with the fast f32 kernels of
//! `qvc-kernels`, composites natively.
//!
//! Invariants: weights are never copied (a `Param` is a view of the memory
//! map, widened inside the kernels); a value is freed after its last reader,
//! and elementwise ops reuse their input's buffer when they are its last
//! reader; `Reshape` is free. The result must agree with
//! [`qvc_ir::run_reference`] on every graph.
//!
//! Buffers: a freed value's buffer goes back to a process-wide pool (the
//! private `pool` module) instead of the allocator, and new outputs come
//! from it, because a large buffer fresh from `mmap` costs a page fault and
//! a kernel zeroing per page on every op, and a recycled `malloc` one a
//! memset. Pooled buffers hold stale data and are not zeroed: every op here
//! writes each element of the buffer it takes (a GEMM without accumulate, a
//! norm, an attention, a copy), and none relies on zeros. Values handed to
//! the caller leave the pool.

mod profile;

pub use profile::{start as start_profile, take as take_profile};

use crate::pool::{self, Pooled};
use qvc_ir::interp::{bind_input, broadcast_offsets, strided_offsets};
use qvc_ir::{
    Act, BinaryOp, Elems, ExecError, Graph, InputRef, Mask, Node, Op, ReduceOp, Shape, UnaryOp, WeightSource,
};
use qvc_kernels as k;
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;

/// A value during execution.
#[derive(Clone)]
enum Buf<'a> {
    /// Returns its buffer to the pool when the last holder drops it.
    Owned(Arc<Pooled>),
    View(Elems<'a>),
    Ids(Arc<Vec<i32>>),
}

impl<'a> Buf<'a> {
    fn elems(&self) -> Elems<'_> {
        match self {
            Buf::Owned(v) => Elems::F32(&v[..]),
            Buf::View(e) => *e,
            Buf::Ids(_) => panic!("i32 value used as floats (graph types were checked at build time)"),
        }
    }
    fn ids(&self) -> &[i32] {
        match self {
            Buf::Ids(v) => v,
            _ => panic!("float value used as ids (graph types were checked at build time)"),
        }
    }
    /// An owned f32 copy, or the buffer itself when nobody else holds it.
    fn into_vec(self) -> Vec<f32> {
        match self {
            Buf::Owned(a) => Pooled::into_vec(a),
            Buf::View(e) => widened(e),
            Buf::Ids(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }
}

const PAR_CHUNK: usize = 1 << 14;

/// `e` widened to f32 in a pooled buffer.
fn widened(e: Elems<'_>) -> Vec<f32> {
    let mut v = pool::take(e.len());
    e.read_into(0, &mut v);
    v
}

/// A pooled buffer with element `i` set to `f(i)`, in parallel.
fn filled(n: usize, f: impl Fn(usize) -> f32 + Sync) -> Vec<f32> {
    let mut v = pool::take(n);
    v.par_chunks_mut(PAR_CHUNK).enumerate().for_each(|(ci, c)| {
        for (e, x) in c.iter_mut().enumerate() {
            *x = f(ci * PAR_CHUNK + e);
        }
    });
    v
}

/// The f32 elements of a value, borrowed when it already is f32.
fn f32s<'b>(b: &'b Buf<'_>) -> std::borrow::Cow<'b, [f32]> {
    match b.elems() {
        Elems::F32(s) => std::borrow::Cow::Borrowed(s),
        e => std::borrow::Cow::Owned(e.to_f32_vec()),
    }
}

fn map_inplace(x: &mut [f32], f: impl Fn(f32) -> f32 + Sync) {
    x.par_chunks_mut(PAR_CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v = f(*v)));
}

fn unary_fn(op: UnaryOp) -> fn(f32) -> f32 {
    match op {
        UnaryOp::Neg => |x| -x,
        UnaryOp::Exp => f32::exp,
        UnaryOp::Log => f32::ln,
        UnaryOp::Sqrt => f32::sqrt,
        UnaryOp::Rsqrt => |x| 1.0 / x.sqrt(),
        UnaryOp::Recip => |x| 1.0 / x,
        UnaryOp::Erf => k::act::erf_f32,
        UnaryOp::Tanh => f32::tanh,
        UnaryOp::Sigmoid => |x| 1.0 / (1.0 + (-x).exp()),
    }
}

fn binary_fn(op: BinaryOp) -> fn(f32, f32) -> f32 {
    match op {
        BinaryOp::Add => |a, b| a + b,
        BinaryOp::Sub => |a, b| a - b,
        BinaryOp::Mul => |a, b| a * b,
        BinaryOp::Div => |a, b| a / b,
        BinaryOp::Max => f32::max,
        BinaryOp::Ge => |a, b| f32::from(u8::from(a >= b)),
    }
}

/// Copy the elements of a strided view: `offs` are source offsets per output
/// element, computed for runs of `inner` contiguous elements at once.
fn strided_copy(src: Elems<'_>, out_shape: &Shape, strides: &[usize], base: usize) -> Vec<f32> {
    let r = out_shape.rank();
    // Copy whole rows when the innermost axis stays contiguous.
    if r > 0 && strides[r - 1] == 1 {
        let inner = out_shape.last();
        let outer = Shape::new(out_shape.0[..r - 1].to_vec());
        let offs = strided_offsets(&outer, &strides[..r - 1]);
        // Every row of `inner` is copied over.
        let mut out = pool::take(out_shape.numel());
        if inner > 0 {
            out.par_chunks_mut(inner).zip(offs.par_iter()).for_each(|(dst, &o)| src.read_into(base + o, dst));
        }
        return out;
    }
    let offs = strided_offsets(out_shape, strides);
    filled(offs.len(), |e| src.get(base + offs[e]))
}

/// Run `graph` and return every named output as f32.
///
/// The whole graph runs on a worker of rayon's global pool (`rayon::scope`
/// from any other thread hands it one): each kernel's parallel loop then
/// starts on a pool thread, which works on its own share at once. Called
/// from outside the pool, every loop was injected into the pool and the
/// caller slept until woken: two cross-thread wake-ups per kernel, a few
/// hundred per decode step, each an inter-processor interrupt in a VM.
pub fn run(
    graph: &Graph,
    weights: &dyn WeightSource,
    inputs: &HashMap<String, InputRef<'_>>,
) -> Result<HashMap<String, Vec<f32>>, ExecError> {
    rayon::scope(|_| run_here(graph, weights, inputs))
}

/// [`run`] on the calling thread.
fn run_here(
    graph: &Graph,
    weights: &dyn WeightSource,
    inputs: &HashMap<String, InputRef<'_>>,
) -> Result<HashMap<String, Vec<f32>>, ExecError> {
    let mut vals: Vec<Option<Buf>> = vec![None; graph.nodes.len()];
    let last = graph.last_uses();
    for (i, n) in graph.nodes.iter().enumerate() {
        // Take inputs whose last reader is this node, so their buffers can be reused.
        let mut args: Vec<Buf> = Vec::with_capacity(n.inputs.len());
        for (j, inp) in n.inputs.iter().enumerate() {
            let dup = n.inputs[..j].contains(inp);
            if last[inp.index()] == i && !dup && !n.inputs[j + 1..].contains(inp) {
                args.push(vals[inp.index()].take().expect("computed before use"));
            } else {
                args.push(vals[inp.index()].clone().expect("computed before use"));
            }
        }
        if profile::on() {
            if let Some(cost) = profile::cost(graph, n, &args) {
                let t = std::time::Instant::now();
                vals[i] = Some(eval(graph, n, args, weights, inputs)?);
                profile::record(cost, t.elapsed().as_secs_f64() * 1e3);
                continue;
            }
        }
        vals[i] = Some(eval(graph, n, args, weights, inputs)?);
    }
    // An output's last mention takes the value, so that its buffer is handed
    // over rather than copied (when no other output shares it).
    let mut outs = HashMap::with_capacity(graph.outputs.len());
    for (j, (name, id)) in graph.outputs.iter().enumerate() {
        let slot = &mut vals[id.index()];
        let v = if graph.outputs[j + 1..].iter().any(|(_, o)| o == id) { slot.clone() } else { slot.take() };
        outs.insert(name.clone(), v.expect("outputs are kept").into_vec());
    }
    Ok(outs)
}

fn eval<'a>(
    g: &Graph,
    n: &Node,
    mut a: Vec<Buf<'a>>,
    weights: &'a dyn WeightSource,
    inputs: &HashMap<String, InputRef<'a>>,
) -> Result<Buf<'a>, ExecError> {
    let out = &n.ty.shape;
    let shp = |i: usize| g.shape(n.inputs[i]);
    let owned = |v: Vec<f32>| Buf::Owned(Pooled::new(v));
    Ok(match &n.op {
        Op::Input(name) => match bind_input(name, &n.ty, inputs)? {
            InputRef::F32(v) => Buf::View(Elems::F32(v)),
            InputRef::I32(v) => Buf::Ids(Arc::new(v.to_vec())),
        },
        Op::Param(name) => match weights.weight(name) {
            Some(w) if w.len() == out.numel() => Buf::View(w),
            w => {
                return Err(ExecError::BadWeight {
                    name: name.clone(),
                    got: w.map_or(0, |w| w.len()),
                    want: out.numel(),
                })
            }
        },
        Op::Const(d) => owned(pool::copy_of(d)),
        Op::Unary(u) => {
            let mut x = a.remove(0).into_vec();
            map_inplace(&mut x, unary_fn(*u));
            owned(x)
        }
        Op::Binary(b) => {
            let f = binary_fn(*b);
            let (sa, sb) = (shp(0), shp(1));
            let rhs = a.remove(1);
            let y = rhs.elems();
            // A row vector: all dims but the last are 1 and the last matches.
            // Fast cases, reusing the left buffer: the right side is the
            // same shape, a row vector (bias, norm weight: repeats every
            // `w`), a scalar, or a column block (logn scale [T, 1, 1]: each
            // value covers `block` consecutive elements).
            let row = sb.numel() == out.last() && sb.last() == out.last();
            let lead = out.rank() - sb.rank();
            let split = (0..=sb.rank()).find(|&i| sb.0[i..].iter().all(|&d| d == 1)).unwrap_or(sb.rank());
            let column = lead == 0 && sb.0[..split] == out.0[..split];
            if sa == out && (sb == out || row || sb.numel() == 1 || column) {
                let w = sb.numel().max(1);
                let block = if column && !row { out.numel() / w } else { 1 };
                let index = move |idx: usize| if block > 1 { idx / block } else { idx % w };
                let mut x = a.remove(0).into_vec();
                x.par_chunks_mut(PAR_CHUNK).enumerate().for_each(|(ci, c)| {
                    for (e, v) in c.iter_mut().enumerate() {
                        *v = f(*v, y.get(index(ci * PAR_CHUNK + e)));
                    }
                });
                owned(x)
            } else {
                let x = a[0].elems();
                let (oa, ob) = (broadcast_offsets(out, sa), broadcast_offsets(out, sb));
                owned(filled(out.numel(), |e| f(x.get(oa[e]), y.get(ob[e]))))
            }
        }
        Op::Where => {
            let (c, x, y) = (a[0].elems(), a[1].elems(), a[2].elems());
            let (oc, ox, oy) =
                (broadcast_offsets(out, shp(0)), broadcast_offsets(out, shp(1)), broadcast_offsets(out, shp(2)));
            owned(filled(out.numel(), |e| if c.get(oc[e]) != 0.0 { x.get(ox[e]) } else { y.get(oy[e]) }))
        }
        Op::Reduce { op, axis } => {
            let x = a[0].elems();
            let s = shp(0);
            let (outer, len, inner) =
                (s.0[..*axis].iter().product::<usize>(), s.dim(*axis), s.0[axis + 1..].iter().product::<usize>());
            // Each element is one reduction, written below.
            let mut r = pool::take(outer * inner);
            r.par_iter_mut().enumerate().for_each(|(oi, d)| {
                let (o, i) = (oi / inner, oi % inner);
                let it = (0..len).map(|kk| x.get((o * len + kk) * inner + i));
                *d = match op {
                    ReduceOp::Sum => it.sum(),
                    ReduceOp::Mean => it.sum::<f32>() / len as f32,
                    ReduceOp::Max => it.fold(f32::NEG_INFINITY, f32::max),
                };
            });
            owned(r)
        }
        Op::MatMul { transpose_b } => {
            let (sa, sb) = (shp(0), shp(1));
            let (m, kd) = (sa.dim(sa.rank() - 2), sa.last());
            let nn = out.last();
            // Counted on the output: with kd = 0 every batch must still be
            // written (the GEMM writes zeros, an empty sum), and the buffer is
            // not zeroed beforehand.
            let batches = out.numel() / (m * nn).max(1);
            let b_batched = sb.rank() > 2;
            let (x, w) = (a[0].elems(), a[1].elems());
            // Every batch's m×nn block is written by a non-accumulating GEMM.
            let mut c = pool::take(out.numel());
            for bt in 0..batches {
                let am = k::MatRef { offset: bt * m * kd, ..k::MatRef::row_major(x, m, kd) };
                let boff = if b_batched { bt * kd * nn } else { 0 };
                let bm = if *transpose_b {
                    k::MatRef { offset: boff, ..k::MatRef::row_major(w, nn, kd) }.transposed()
                } else {
                    k::MatRef { offset: boff, ..k::MatRef::row_major(w, kd, nn) }
                };
                k::gemm(am, bm, &mut c[bt * m * nn..(bt + 1) * m * nn], false);
            }
            owned(c)
        }
        Op::Reshape(_) => a.remove(0),
        Op::Permute(p) => {
            let st = shp(0).strides();
            let pst: Vec<usize> = p.iter().map(|&i| st[i]).collect();
            match &a[0] {
                Buf::Ids(v) => Buf::Ids(Arc::new(strided_offsets(out, &pst).iter().map(|&o| v[o]).collect())),
                b => owned(strided_copy(b.elems(), out, &pst, 0)),
            }
        }
        Op::Slice { axis, start, .. } => {
            let st = shp(0).strides();
            match &a[0] {
                Buf::Ids(v) => {
                    Buf::Ids(Arc::new(strided_offsets(out, &st).iter().map(|&o| v[start * st[*axis] + o]).collect()))
                }
                b => owned(strided_copy(b.elems(), out, &st, start * st[*axis])),
            }
        }
        Op::Concat { axis } => {
            let outer: usize = out.0[..*axis].iter().product();
            // The inputs' column blocks tile each row.
            let mut r = pool::take(out.numel());
            let mut col = 0;
            let row: usize = out.0[*axis..].iter().product();
            for (i, b) in a.iter().enumerate() {
                let chunk: usize = shp(i).0[*axis..].iter().product();
                let e = b.elems();
                for o in 0..outer {
                    e.read_into(o * chunk, &mut r[o * row + col..o * row + col + chunk]);
                }
                col += chunk;
            }
            owned(r)
        }
        Op::Gather => {
            let (t, ids) = (a[0].elems(), a[1].ids());
            let (v, h) = (shp(0).dim(0), shp(0).dim(1));
            if let Some(&bad) = ids.iter().find(|&&id| id < 0 || id as usize >= v) {
                return Err(ExecError::IndexOutOfRange { op: "gather".into(), index: bad as i64, len: v });
            }
            // One row per id.
            let mut r = pool::take(out.numel());
            if h > 0 {
                r.par_chunks_mut(h).zip(ids.par_iter()).for_each(|(dst, &id)| t.read_into(id as usize * h, dst));
            }
            owned(r)
        }
        Op::ScatterRows => {
            let mut d = a.remove(0).into_vec();
            let rows = a[1].ids().to_vec();
            let src = a[0].elems();
            let (t, h) = (out.dim(0), out.dim(1));
            // Checked first, so a bad index changes nothing; NO_ROW writes nothing.
            if let Some(&bad) = rows.iter().find(|&&r| r != qvc_ir::NO_ROW && (r < 0 || r as usize >= t)) {
                return Err(ExecError::IndexOutOfRange { op: "scatter_rows".into(), index: bad as i64, len: t });
            }
            for (i, &r) in rows.iter().enumerate().filter(|(_, &r)| r != qvc_ir::NO_ROW) {
                src.read_into(i * h, &mut d[r as usize * h..(r as usize + 1) * h]);
            }
            owned(d)
        }
        Op::Iota { shape, axis } => {
            let st = shape.strides();
            owned(filled(shape.numel(), |e| ((e / st[*axis]) % shape.dim(*axis)) as f32))
        }
        Op::LayerNorm { eps } => {
            // Norms write every element of a new buffer, so the input is
            // only borrowed.
            let mut y = pool::take(out.numel());
            k::norm::layer_norm(&f32s(&a[0]), a[1].elems(), a[2].elems(), *eps, out.last(), &mut y);
            owned(y)
        }
        Op::RmsNorm { eps } => {
            let mut y = pool::take(out.numel());
            k::norm::rms_norm(&f32s(&a[0]), a[1].elems(), *eps, out.last(), &mut y);
            owned(y)
        }
        Op::Gelu => {
            let mut x = a.remove(0).into_vec();
            k::act::gelu_erf(&mut x);
            owned(x)
        }
        Op::Silu => {
            let mut x = a.remove(0).into_vec();
            k::act::silu(&mut x);
            owned(x)
        }
        Op::Softmax => {
            let mut x = a.remove(0).into_vec();
            k::softmax::softmax_rows(&mut x, out.last());
            owned(x)
        }
        Op::Rotary => {
            let mut x = a.remove(0).into_vec();
            k::rotary::rotary(&mut x, &f32s(&a[0]), &f32s(&a[1]), out.dim(1), out.dim(2));
            owned(x)
        }
        Op::Attention { mask, scale } => {
            let (tq, heads, d) = (out.dim(0), out.dim(1), out.dim(2));
            let (q, kk, v) = (f32s(&a[0]), f32s(&a[1]), f32s(&a[2]));
            // Every (query, head) row is written, also one that sees no key
            // (zeros); the windows tile the grid.
            let mut o = pool::take(out.numel());
            let args = k::attention::AttnArgs {
                q: &q,
                q_stride: heads * d,
                k: &kk,
                v: &v,
                kv_stride: heads * d,
                tq,
                tk: shp(1).dim(0),
                heads,
                d,
                scale: *scale,
                mask: match mask {
                    Mask::None => k::attention::Mask::None,
                    Mask::Causal => k::attention::Mask::Causal,
                    Mask::Window { grid_h, grid_w, window } => {
                        window_attention(&q, &kk, &v, (*grid_h, *grid_w, *window), heads, d, *scale, &mut o);
                        return Ok(owned(o));
                    }
                },
            };
            if a.len() >= 5 {
                // The KV cache (inputs 3 and 4) is read in place, not concatenated.
                let (pk, pv) = (f32s(&a[3]), f32s(&a[4]));
                // A padded cache bucket: only the first past_len rows are keys.
                let rows = match a.get(5) {
                    Some(len) => {
                        let l = f32s(len)[0];
                        let cap = shp(3).dim(0);
                        if !(l >= 0.0 && l <= cap as f32 && l.fract() == 0.0) {
                            return Err(ExecError::IndexOutOfRange {
                                op: "attention past_len".into(),
                                index: l as i64,
                                len: cap + 1,
                            });
                        }
                        l as usize
                    }
                    None => shp(3).dim(0),
                };
                let hd = heads * d;
                k::attention::attention_with_past(&args, &pk[..rows * hd], &pv[..rows * hd], &mut o);
            } else {
                k::attention::attention(&args, &mut o);
            }
            owned(o)
        }
        Op::Linear { bias, act, residual } => {
            let (kd, nn) = (shp(1).dim(1), shp(1).dim(0));
            let m = out.numel() / nn.max(1);
            let x = a[0].elems();
            // The epilogue in the expansion's order: bias, activation, residual,
            // applied by the GEMM to each finished tile (see `k::gemm_then`).
            // Inputs: x, the weight (and the gate's), then the bias, then the residual.
            let bias_at = if *act == Act::SiluMul { 3 } else { 2 };
            let bias_v = bias.then(|| a[bias_at].elems().to_f32_vec());
            let res = residual.then(|| a[bias_at + usize::from(*bias)].elems());
            let gelu = (*act == Act::Gelu).then(k::act::gelu_erf_serial);
            let epi = |r: usize, c0: usize, v: &mut [f32]| {
                if let Some(b) = &bias_v {
                    v.iter_mut().zip(&b[c0..]).for_each(|(x, bv)| *x += bv);
                }
                if let Some(g) = gelu {
                    g(v);
                }
                match res {
                    Some(Elems::F32(rs)) => v.iter_mut().zip(&rs[r * nn + c0..]).for_each(|(x, rv)| *x += rv),
                    Some(rs) => v.iter_mut().enumerate().for_each(|(e, x)| *x += rs.get(r * nn + c0 + e)),
                    None => {}
                }
            };
            let fused = bias_v.is_some() || gelu.is_some() || res.is_some();
            let gemm = |w: Elems<'_>, epi: Option<k::Epilogue>| {
                // Written whole by the non-accumulating GEMM.
                let mut c = pool::take(out.numel());
                if m > 0 && nn > 0 {
                    let (wm, xm) = (k::MatRef::row_major(w, nn, kd).transposed(), k::MatRef::row_major(x, m, kd));
                    k::gemm_then(k::Isa::detect(), k::cpu_math(), xm, wm, &mut c, false, epi);
                }
                c
            };
            if *act == Act::SiluMul {
                let (y, gate) = (gemm(a[1].elems(), None), gemm(a[2].elems(), None));
                let mut prod = pool::take(y.len());
                k::act::swiglu(&y, &gate, &mut prod);
                pool::recycle(y);
                pool::recycle(gate);
                if fused && nn > 0 {
                    prod.par_chunks_mut(nn).enumerate().for_each(|(r, row)| epi(r, 0, row));
                }
                owned(prod)
            } else {
                owned(gemm(a[1].elems(), fused.then_some(&epi as k::Epilogue)))
            }
        }
        Op::AddNorm { rms, eps } => {
            // The sum reuses the first operand's buffer when this is its last reader.
            let (sa, sb) = (shp(0).clone(), shp(1).clone());
            let rhs = a.remove(1);
            let y = rhs.elems();
            let mut s = a.remove(0).into_vec();
            if sb == sa {
                s.par_chunks_mut(PAR_CHUNK).enumerate().for_each(|(ci, c)| {
                    for (e, v) in c.iter_mut().enumerate() {
                        *v += y.get(ci * PAR_CHUNK + e);
                    }
                });
            } else {
                let ob = broadcast_offsets(&sa, &sb);
                s.par_chunks_mut(PAR_CHUNK).zip(ob.par_chunks(PAR_CHUNK)).for_each(|(c, o)| {
                    for (v, &j) in c.iter_mut().zip(o) {
                        *v += y.get(j);
                    }
                });
            }
            let mut o = pool::take(out.numel());
            if *rms {
                k::norm::rms_norm(&s, a[0].elems(), *eps, out.last(), &mut o);
            } else {
                k::norm::layer_norm(&s, a[0].elems(), a[1].elems(), *eps, out.last(), &mut o);
            }
            pool::recycle(s);
            owned(o)
        }
        Op::QkvRotary { offset, heads, logn } => {
            // Copy the column block out of qkv, rotate it in place, scale by logn.
            let (c, d) = (shp(0).dim(1), out.dim(2));
            let hd = heads * d;
            let x = a[0].elems();
            // Each token's row of heads·d is copied out of qkv.
            let mut y = pool::take(out.numel());
            if hd > 0 {
                y.par_chunks_mut(hd).enumerate().for_each(|(ti, row)| x.read_into(ti * c + offset, row));
            }
            k::rotary::rotary(&mut y, &f32s(&a[1]), &f32s(&a[2]), *heads, d);
            if *logn {
                let l = a[3].elems();
                if hd > 0 {
                    y.par_chunks_mut(hd).enumerate().for_each(|(ti, row)| {
                        let s = l.get(ti);
                        row.iter_mut().for_each(|v| *v *= s);
                    });
                }
            }
            owned(y)
        }
        Op::Conv2dPatch { patch } => {
            // im2col then one GEMM against the weight viewed as [O, C·p·p].
            let p = *patch;
            let (c, h, w) = (shp(0).dim(0), shp(0).dim(1), shp(0).dim(2));
            let (gh, gw) = (h / p, w / p);
            let x = a[0].elems();
            let cols_per = c * p * p;
            // Each patch row is filled (c·p rows of p pixels).
            let mut cols = pool::take(gh * gw * cols_per);
            cols.par_chunks_mut(cols_per).enumerate().for_each(|(t, dst)| {
                let (gy, gx) = (t / gw, t % gw);
                for ci in 0..c {
                    for py in 0..p {
                        let src = ci * h * w + (gy * p + py) * w + gx * p;
                        x.read_into(src, &mut dst[(ci * p + py) * p..(ci * p + py + 1) * p]);
                    }
                }
            });
            let o = out.dim(1);
            let mut y = pool::take(out.numel());
            k::gemm(
                k::MatRef::row_major(Elems::F32(&cols), gh * gw, cols_per),
                k::MatRef::row_major(a[1].elems(), o, cols_per).transposed(),
                &mut y,
                false,
            );
            pool::recycle(cols);
            owned(y)
        }
    })
}

/// Window attention over a `grid_h × grid_w` grid: each `window × window`
/// square (smaller at ragged edges) is gathered into contiguous q, k, v and
/// runs as one unmasked attention, in parallel over windows; the outputs are
/// scattered back to their tokens' rows.
#[allow(clippy::too_many_arguments)]
fn window_attention(
    q: &[f32],
    kk: &[f32],
    v: &[f32],
    (grid_h, grid_w, window): (usize, usize, usize),
    heads: usize,
    d: usize,
    scale: f32,
    out: &mut [f32],
) {
    let hd = heads * d;
    let windows = k::gpu::attention::window_tokens((grid_h as u32, grid_w as u32), window as u32);
    let gather = |x: &[f32], toks: &[usize]| -> Vec<f32> {
        toks.iter().flat_map(|&t| x[t * hd..(t + 1) * hd].iter().copied()).collect()
    };
    let results: Vec<Vec<f32>> = windows
        .par_iter()
        .map(|toks| {
            let (qw, kw, vw) = (gather(q, toks), gather(kk, toks), gather(v, toks));
            let mut o = vec![0f32; toks.len() * hd];
            let args = k::attention::AttnArgs {
                q: &qw,
                q_stride: hd,
                k: &kw,
                v: &vw,
                kv_stride: hd,
                tq: toks.len(),
                tk: toks.len(),
                heads,
                d,
                scale,
                mask: k::attention::Mask::None,
            };
            k::attention::attention(&args, &mut o);
            o
        })
        .collect();
    for (toks, o) in windows.iter().zip(&results) {
        for (r, &t) in toks.iter().enumerate() {
            out[t * hd..(t + 1) * hd].copy_from_slice(&o[r * hd..(r + 1) * hd]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pool::POOL_HITS;
    use qvc_ir::passes::{Fuse, Pass};
    use qvc_ir::DType;
    use std::cell::Cell;

    /// f32 weights by name.
    struct Ws(HashMap<String, Vec<f32>>);
    impl WeightSource for Ws {
        fn weight(&self, name: &str) -> Option<Elems<'_>> {
            self.0.get(name).map(|v| Elems::F32(v))
        }
    }

    /// Values in [-1, 1) (the kernels' deterministic test RNG).
    fn vals(n: usize, seed: u64) -> Vec<f32> {
        qvc_kernels::testutil::Rng::new(seed).vec(n, 1.0)
    }

    const T: usize = 12;
    const H: usize = 32;
    const HEADS: usize = 4;
    const D: usize = 8;

    /// A decoder-like block and a vision-like tail with an output for every
    /// kind of op whose buffer comes from the pool; most values are at
    /// least `pool::MIN_LEN` long so that they are recycled. Fused (Linear
    /// with every epilogue, AddNorm, QkvRotary) like the models run.
    fn graph() -> Graph {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, vec![T, H]);
        let ids = g.input("ids", DType::I32, vec![T]);
        let table = g.param("table", DType::F32, vec![20, H]);
        let emb = g.gather(table, ids).unwrap();
        let h = g.add(x, emb).unwrap();
        let n1w = g.param("n1.w", DType::F32, vec![H]);
        let n1 = g.rms_norm(h, n1w, 1e-6).unwrap();
        let wqkv = g.param("qkv.w", DType::F32, vec![3 * H, H]);
        let bqkv = g.param("qkv.b", DType::F32, vec![3 * H]);
        let qkv = g.linear(n1, wqkv, Some(bqkv)).unwrap();
        let (cos, sin) = (g.input("cos", DType::F32, vec![T, D]), g.input("sin", DType::F32, vec![T, D]));
        let logn = g.input("logn", DType::F32, vec![T, 1, 1]);
        let part = |g: &mut Graph, i: usize, rotate: bool| {
            let s = g.slice(qkv, 1, i * H, (i + 1) * H).unwrap();
            let r = g.reshape(s, vec![T, HEADS, D]).unwrap();
            if !rotate {
                return r;
            }
            let y = g.rotary(r, cos, sin).unwrap();
            g.mul(y, logn).unwrap()
        };
        let (q, k, v) = (part(&mut g, 0, true), part(&mut g, 1, true), part(&mut g, 2, false));
        let scale = 1.0 / (D as f32).sqrt();
        let att = g.attention(q, k, v, Mask::Causal, scale).unwrap();
        let (pk, pv) = (g.input("pk", DType::F32, vec![16, HEADS, D]), g.input("pv", DType::F32, vec![16, HEADS, D]));
        let plen = g.input("plen", DType::F32, vec![1, 1]);
        let cached = g.attention_padded(q, k, v, pk, pv, plen, scale).unwrap();
        let att2 = g.reshape(att, vec![T, H]).unwrap();
        let wo = g.param("o.w", DType::F32, vec![H, H]);
        let o = g.matmul_t(att2, wo).unwrap();
        let o = g.add(h, o).unwrap();
        let (lw, lb) = (g.param("ln.w", DType::F32, vec![H]), g.param("ln.b", DType::F32, vec![H]));
        let n2 = g.layer_norm(o, lw, lb, 1e-5).unwrap();
        let (wu, wg) = (g.param("up.w", DType::F32, vec![2 * H, H]), g.param("gate.w", DType::F32, vec![2 * H, H]));
        let up = g.matmul_t(n2, wu).unwrap();
        let gate = g.matmul_t(n2, wg).unwrap();
        let gate = g.silu(gate).unwrap();
        let mlp = g.mul(up, gate).unwrap();
        let wd = g.param("down.w", DType::F32, vec![H, 2 * H]);
        let bd = g.param("down.b", DType::F32, vec![H]);
        let down = g.linear(mlp, wd, Some(bd)).unwrap();
        let down = g.gelu(down).unwrap();
        let y = g.add(o, down).unwrap();
        let n3w = g.param("n3.w", DType::F32, vec![H]);
        let n3 = g.rms_norm(y, n3w, 1e-6).unwrap();
        // Layout, broadcasting and reductions.
        let sm = g.softmax(n3).unwrap();
        let ex = g.unary(qvc_ir::UnaryOp::Exp, sm).unwrap();
        let red = g.reduce(ReduceOp::Sum, ex, 0).unwrap();
        let col = g.reduce(ReduceOp::Max, n3, 1).unwrap();
        let bc = g.reshape(col, vec![T, 1]).unwrap();
        let row = g.reshape(red, vec![1, H]).unwrap();
        let outer = g.add(bc, row).unwrap();
        let perm = g.permute(outer, vec![1, 0]).unwrap();
        let iota = g.iota(vec![H, T], 1).unwrap();
        let half = g.scalar(5.5);
        let cond = g.binary(BinaryOp::Ge, iota, half).unwrap();
        let wh = g.where_(cond, perm, iota).unwrap();
        let cat = g.concat(&[n3, y], 1).unwrap();
        let c = g.constant(vals(T * H, 9), vec![T, H]).unwrap();
        let rows = g.input("rows", DType::I32, vec![4]);
        let src = g.slice(n1, 0, 0, 4).unwrap();
        let sc = g.scatter_rows(c, src, rows).unwrap();
        // Batched matmuls, one with an empty inner dimension: every batch
        // must still come out zero.
        let b3 = g.reshape(cat, vec![3, 4, 2 * H]).unwrap();
        let bw = g.input("bw", DType::F32, vec![3, 2 * H, 24]);
        let bmm = g.matmul(b3, bw).unwrap();
        let e0 = g.input("e0", DType::F32, vec![3, 8, 0]);
        let e1 = g.input("e1", DType::F32, vec![0, 40]);
        let empty = g.matmul(e0, e1).unwrap();
        // Vision: patches, window attention.
        let img = g.input("img", DType::F32, vec![3, 16, 16]);
        let pw = g.param("patch.w", DType::F32, vec![H, 3, 4, 4]);
        let patches = g.conv2d_patch(img, pw, 4).unwrap();
        let pos = g.param("pos", DType::F32, vec![16, H]);
        let pp = g.add(patches, pos).unwrap();
        let pre = g.layer_norm(pp, lw, lb, 1e-6).unwrap();
        let pr = g.reshape(pre, vec![16, HEADS, D]).unwrap();
        let win = g.attention(pr, pr, pr, Mask::Window { grid_h: 4, grid_w: 4, window: 3 }, scale).unwrap();
        for (name, id) in [
            ("cached", cached),
            ("y", y),
            ("wh", wh),
            ("sc", sc),
            ("bmm", bmm),
            ("empty", empty),
            ("win", win),
            // The same value twice: one copy, one hand-over.
            ("y_again", y),
        ] {
            g.set_output(name, id);
        }
        Fuse.run(&mut g).unwrap();
        g
    }

    fn data(g: &Graph, seed: u64) -> (Ws, HashMap<String, Vec<f32>>) {
        let fill = |named: Vec<(&str, &qvc_ir::TensorType)>, seed: u64| -> HashMap<String, Vec<f32>> {
            named
                .iter()
                .enumerate()
                .map(|(i, (n, t))| (n.to_string(), vals(t.shape.numel(), seed + i as u64)))
                .collect()
        };
        (Ws(fill(g.params(), seed)), fill(g.inputs(), seed + 100))
    }

    #[test]
    fn recycled_buffers_never_leak_into_results() {
        let g = graph();
        let fused: Vec<String> = g.nodes.iter().filter(|n| n.op.is_fused()).map(|n| n.op.name()).collect();
        for want in
            ["linear+bias", "linear+residual", "linear+silu_mul", "linear+bias+gelu", "qkv_rotary", "add_layer_norm"]
        {
            assert!(fused.iter().any(|f| f.starts_with(want)), "{want} not among the fused ops {fused:?}");
        }
        let ids: Vec<i32> = (0..T as i32).map(|i| (i * 7) % 20).collect();
        let rows = vec![3, qvc_ir::NO_ROW, 0, 11];
        // Dirty the pool with buffers of this graph's sizes, then run on
        // other data: stale values (and, under cfg(test), NaN in every
        // taken buffer) must never reach an output.
        for seed in [1, 2, 3] {
            let (w, mut x) = data(&g, seed);
            x.insert("plen".into(), vec![5.0]);
            let mut ins: HashMap<String, InputRef> = x.iter().map(|(k, v)| (k.clone(), InputRef::F32(v))).collect();
            ins.insert("ids".into(), InputRef::I32(&ids));
            ins.insert("rows".into(), InputRef::I32(&rows));
            let hits = POOL_HITS.with(Cell::get);
            // On this thread (`run` would move it to a pool worker), where
            // POOL_HITS counts this run's takes only.
            let got = run_here(&g, &w, &ins).unwrap();
            if seed > 1 {
                assert!(POOL_HITS.with(Cell::get) > hits, "the run took no recycled buffer");
            }
            let want = qvc_ir::run_reference(&g, &w, &ins).unwrap();
            assert_eq!(got.len(), want.len());
            for (name, v) in want {
                let (a, b) = (&got[&name], v.into_f32());
                assert_eq!(a.len(), b.len(), "{name}");
                let scale = b.iter().map(|q| q.abs()).fold(1.0, f32::max);
                // A NaN (an element nobody wrote) fails too.
                let bad = a.iter().zip(&b).position(|(p, q)| (p - q).abs() > 1e-5 * scale || p.is_nan());
                if let Some(i) = bad {
                    panic!("{name}, run {seed}: element {i} of {} is {}, want {}", b.len(), a[i], b[i]);
                }
            }
            assert!(got["empty"].iter().all(|&v| v == 0.0));
            assert_eq!(got["y"], got["y_again"]);
        }
    }
}
