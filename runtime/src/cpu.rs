//! The CPU backend: runs a [`Graph`] with the fast f32 kernels of
//! `qvc-kernels`, composites natively.
//!
//! Invariants: weights are never copied (a `Param` is a view of the memory
//! map, widened inside the kernels); a value is freed after its last reader,
//! and elementwise ops reuse their input's buffer when they are its last
//! reader; `Reshape` is free. The result must agree with
//! [`qvc_ir::run_reference`] on every graph.

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
    Owned(Arc<Vec<f32>>),
    View(Elems<'a>),
    Ids(Arc<Vec<i32>>),
}

impl<'a> Buf<'a> {
    fn elems(&self) -> Elems<'_> {
        match self {
            Buf::Owned(v) => Elems::F32(v),
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
            Buf::Owned(a) => Arc::try_unwrap(a).unwrap_or_else(|a| (*a).clone()),
            Buf::View(e) => e.to_f32_vec(),
            Buf::Ids(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }
}

const PAR_CHUNK: usize = 1 << 14;

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
        let mut out = vec![0f32; out_shape.numel()];
        if inner > 0 {
            out.par_chunks_mut(inner).zip(offs.par_iter()).for_each(|(dst, &o)| src.read_into(base + o, dst));
        }
        return out;
    }
    strided_offsets(out_shape, strides).iter().map(|&o| src.get(base + o)).collect()
}

/// Run `graph` and return every named output as f32.
pub fn run(
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
        vals[i] = Some(eval(graph, n, args, weights, inputs)?);
    }
    Ok(graph
        .outputs
        .iter()
        .map(|(name, id)| (name.clone(), vals[id.index()].clone().expect("outputs are kept").into_vec()))
        .collect())
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
    let owned = |v: Vec<f32>| Buf::Owned(Arc::new(v));
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
        Op::Const(d) => owned(d.to_vec()),
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
                owned(oa.par_iter().zip(ob.par_iter()).map(|(&i, &j)| f(x.get(i), y.get(j))).collect())
            }
        }
        Op::Where => {
            let (c, x, y) = (a[0].elems(), a[1].elems(), a[2].elems());
            let (oc, ox, oy) =
                (broadcast_offsets(out, shp(0)), broadcast_offsets(out, shp(1)), broadcast_offsets(out, shp(2)));
            owned(
                (0..out.numel())
                    .into_par_iter()
                    .map(|e| if c.get(oc[e]) != 0.0 { x.get(ox[e]) } else { y.get(oy[e]) })
                    .collect(),
            )
        }
        Op::Reduce { op, axis } => {
            let x = a[0].elems();
            let s = shp(0);
            let (outer, len, inner) =
                (s.0[..*axis].iter().product::<usize>(), s.dim(*axis), s.0[axis + 1..].iter().product::<usize>());
            let mut r = vec![0f32; outer * inner];
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
            let batches = sa.numel() / (m * kd).max(1);
            let b_batched = sb.rank() > 2;
            let (x, w) = (a[0].elems(), a[1].elems());
            let mut c = vec![0f32; out.numel()];
            for bt in 0..batches.max(1) {
                if m == 0 || nn == 0 {
                    break;
                }
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
            let mut r = vec![0f32; out.numel()];
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
            let mut r = vec![0f32; out.numel()];
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
            owned((0..shape.numel()).map(|e| ((e / st[*axis]) % shape.dim(*axis)) as f32).collect())
        }
        Op::LayerNorm { eps } => {
            // Norms write a new buffer, so the input is only borrowed.
            let mut y = vec![0f32; out.numel()];
            k::norm::layer_norm(&f32s(&a[0]), a[1].elems(), a[2].elems(), *eps, out.last(), &mut y);
            owned(y)
        }
        Op::RmsNorm { eps } => {
            let mut y = vec![0f32; out.numel()];
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
            let mut o = vec![0f32; out.numel()];
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
            let gemm = |w: Elems<'_>| {
                let mut c = vec![0f32; out.numel()];
                if m > 0 && nn > 0 {
                    k::gemm(
                        k::MatRef::row_major(x, m, kd),
                        k::MatRef::row_major(w, nn, kd).transposed(),
                        &mut c,
                        false,
                    );
                }
                c
            };
            let mut y = gemm(a[1].elems());
            let mut i = 2;
            if *act == Act::SiluMul {
                let gate = gemm(a[2].elems());
                let mut prod = vec![0f32; y.len()];
                k::act::swiglu(&y, &gate, &mut prod);
                y = prod;
                i += 1;
            }
            // The epilogue in the expansion's order: bias, activation, residual.
            if *bias {
                let b = a[i].elems().to_f32_vec();
                if nn > 0 {
                    y.par_chunks_mut(nn).for_each(|row| row.iter_mut().zip(&b).for_each(|(v, bv)| *v += bv));
                }
                i += 1;
            }
            if *act == Act::Gelu {
                k::act::gelu_erf(&mut y);
            }
            if *residual {
                let r = a[i].elems();
                y.par_chunks_mut(PAR_CHUNK).enumerate().for_each(|(ci, c)| {
                    for (e, v) in c.iter_mut().enumerate() {
                        *v += r.get(ci * PAR_CHUNK + e);
                    }
                });
            }
            owned(y)
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
            let mut o = vec![0f32; out.numel()];
            if *rms {
                k::norm::rms_norm(&s, a[0].elems(), *eps, out.last(), &mut o);
            } else {
                k::norm::layer_norm(&s, a[0].elems(), a[1].elems(), *eps, out.last(), &mut o);
            }
            owned(o)
        }
        Op::QkvRotary { offset, heads, logn } => {
            // Copy the column block out of qkv, rotate it in place, scale by logn.
            let (c, d) = (shp(0).dim(1), out.dim(2));
            let hd = heads * d;
            let x = a[0].elems();
            let mut y = vec![0f32; out.numel()];
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
            let mut cols = vec![0f32; gh * gw * cols_per];
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
            let mut y = vec![0f32; out.numel()];
            k::gemm(
                k::MatRef::row_major(Elems::F32(&cols), gh * gw, cols_per),
                k::MatRef::row_major(a[1].elems(), o, cols_per).transposed(),
                &mut y,
                false,
            );
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
