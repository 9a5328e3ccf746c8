//! Fused residual-add + LayerNorm / RMSNorm over rows: the norm family.
//!
//! For every row of the f32 residual stream `x [rows, cols]`:
//! * with `residual`, first `x ← x + r` (`r [rows, cols]` f32, e.g. the
//!   previous block's output), written back to `x` in place: the new residual stream;
//! * then `y = norm(x) · w (+ b)` with `w`, `b` bf16 `[cols]`:
//!   LayerNorm `(x − mean)·rsqrt(var + eps)` (biased variance, two passes over
//!   registers: the second pass sums `d = x − mean` and `d²`, which avoids
//!   the cancellation of `E[x²] − mean²` and corrects the f32 mean's own
//!   rounding by `Σd/n`), or RMSNorm `x·rsqrt(mean(x²) + eps)` in
//!   f32, as Qwen does;
//! * `y` is written as `out` (bf16 for the next GEMM, or f32).
//!
//! GPU kernel: one block per row (or one warp per row, four rows per block,
//! when a row needs at most 32 threads). The row lives in registers: each
//! thread owns `per` chunks of `vec` consecutive elements (`vec` = 4, 2 or 1,
//! the largest dividing `cols`, so every vector access is aligned given
//! 16-byte aligned buffers), chunk `c = thread + i·threads`. Sums are reduced
//! with `shfl.sync.bfly` inside each warp, then across warps through shared
//! memory (one slot per warp, one array per reduction so that no second
//! barrier is needed). Every thread reaches every barrier; chunks past the end
//! of a ragged row are predicated off (loads zero-filled, stores skipped).
//!
//! CPU paths: [`NormSpec::run_cpu`] (rayon over row chunks, reusing
//! [`crate::norm`]'s vectorised rows) and [`NormSpec::run_ref`] (f64). Both
//! write `y` as f32 whatever `out` is: the CPU backend keeps activations in f32,
//! and a bf16 GPU output is that value rounded to nearest even.

use std::fmt;

use qvc_codegen::{Addr, Cmp, Kernel, KernelBuilder, Operand, Reg, Sreg, Ty};
use qvc_ir::{DType, Elems};
use rayon::prelude::*;

use crate::{Cost, KernelSpec, Launch};

/// Which normalisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NormKind {
    /// `(x − mean)/sqrt(var + eps)·w (+ b)`.
    LayerNorm { bias: bool },
    /// `x/sqrt(mean(x²) + eps)·w`.
    RmsNorm,
}

/// One norm kernel: static shapes and options (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormSpec {
    pub kind: NormKind,
    pub rows: usize,
    pub cols: usize,
    pub eps: f32,
    /// Add `r` into `x` (in place) before normalising.
    pub residual: bool,
    /// Storage type of `y` on the GPU: [`DType::BF16`] or [`DType::F32`].
    pub out: DType,
}

/// A spec that cannot be built, or buffers that do not match a spec.
#[derive(Clone, Debug, PartialEq)]
pub enum NormError {
    /// The spec itself is unusable; the string says why.
    Spec(String),
    /// A buffer has the wrong number of elements (or is missing / extra).
    Len { what: &'static str, expected: usize, got: usize },
}

impl fmt::Display for NormError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            NormError::Spec(s) => write!(f, "invalid norm spec: {s}"),
            NormError::Len { what, expected, got } => {
                write!(f, "norm: `{what}` has {got} elements, expected {expected}")
            }
        }
    }
}

impl std::error::Error for NormError {}

/// Most elements one thread holds in registers (so the largest row is
/// 1024 threads × 16 elements).
const MAX_PER_THREAD: usize = 16;
/// Elements per thread the block size aims for.
const TARGET_PER_THREAD: usize = 16;

/// How a row is split over threads (a pure function of `cols`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    /// Elements per vector access.
    vec: usize,
    /// `cols / vec`.
    chunks: usize,
    /// Threads per row (a multiple of 32).
    threads: usize,
    /// Chunks per thread: `ceil(chunks / threads)`.
    per: usize,
    /// Rows per block: 4 when a row is one warp, else 1.
    rows_per_block: usize,
}

impl Geometry {
    fn of(cols: usize) -> Geometry {
        let vec = vec_width(cols);
        let chunks = cols / vec;
        let threads = cols.div_ceil(TARGET_PER_THREAD).next_multiple_of(32).clamp(32, 1024);
        let per = chunks.div_ceil(threads);
        let rows_per_block = if threads == 32 { 4 } else { 1 };
        Geometry { vec, chunks, threads, per, rows_per_block }
    }
}

/// Largest `cols` a spec may have.
pub const MAX_COLS: usize = 1024 * MAX_PER_THREAD;

impl NormSpec {
    /// Checks that the spec can be built.
    pub fn validate(&self) -> Result<(), NormError> {
        let bad = |s: String| Err(NormError::Spec(s));
        if self.rows == 0 || self.cols == 0 {
            return bad(format!("rows = {} and cols = {} must be positive", self.rows, self.cols));
        }
        if self.cols > MAX_COLS {
            return bad(format!("cols = {} exceeds {MAX_COLS}", self.cols));
        }
        // Element indices are 32-bit (byte offsets are widened to 64 bits).
        if self.rows.checked_mul(self.cols).is_none_or(|n| n > u32::MAX as usize) || self.rows > i32::MAX as usize {
            return bad(format!("rows × cols = {} × {} is too large for 32-bit indexing", self.rows, self.cols));
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad(format!("eps = {} must be finite and non-negative", self.eps));
        }
        if !matches!(self.out, DType::BF16 | DType::F32) {
            return bad(format!("out = {} must be bf16 or f32", self.out));
        }
        Ok(())
    }

    fn has_bias(&self) -> bool {
        matches!(self.kind, NormKind::LayerNorm { bias: true })
    }

    fn check_bufs(&self, x: usize, r: Option<usize>, w: usize, b: Option<usize>, y: usize) -> Result<(), NormError> {
        self.validate()?;
        if self.residual != r.is_some() || self.has_bias() != b.is_some() {
            return Err(NormError::Spec(format!(
                "given r: {}, b: {}; the spec wants r: {}, b: {}",
                r.is_some(),
                b.is_some(),
                self.residual,
                self.has_bias()
            )));
        }
        let n = self.rows * self.cols;
        let optional = [("r", n, r), ("b", self.cols, b)];
        for (what, expected, got) in
            [("x", n, Some(x)), ("y", n, Some(y)), ("w", self.cols, Some(w))].into_iter().chain(optional)
        {
            match got {
                Some(got) if got != expected => return Err(NormError::Len { what, expected, got }),
                _ => {}
            }
        }
        Ok(())
    }

    /// Fast CPU path: `x ← x + r` (if `residual`), `y = norm(x)·w (+ b)` in f32.
    /// `y` is f32 whatever `out` is (see the module docs).
    pub fn run_cpu(
        &self,
        x: &mut [f32],
        r: Option<&[f32]>,
        w: Elems,
        b: Option<Elems>,
        y: &mut [f32],
    ) -> Result<(), NormError> {
        self.check_bufs(x.len(), r.map(|r| r.len()), w.len(), b.map(|b| b.len()), y.len())?;
        let cols = self.cols;
        // Bias-less LayerNorm reuses the biased row kernel with b = 0 (adding 0 is exact).
        let zeros = if matches!(self.kind, NormKind::LayerNorm { bias: false }) { vec![0.0f32; cols] } else { vec![] };
        let bias = b.unwrap_or(Elems::F32(&zeros));
        // Whole rows per task, about 16k elements each: enough work to amortise
        // the fork and the weight widening that `crate::norm` does per call.
        let chunk = (16 * 1024 / cols).max(1) * cols;
        let task = |ci: usize, (xc, yc): (&mut [f32], &mut [f32])| {
            if let Some(r) = r {
                for (xv, rv) in xc.iter_mut().zip(&r[ci * chunk..]) {
                    *xv += rv;
                }
            }
            match self.kind {
                NormKind::LayerNorm { .. } => crate::norm::layer_norm(xc, w, bias, self.eps, cols, yc),
                NormKind::RmsNorm => crate::norm::rms_norm(xc, w, self.eps, cols, yc),
            }
        };
        if x.len() > chunk {
            x.par_chunks_mut(chunk).zip(y.par_chunks_mut(chunk)).enumerate().for_each(|(ci, p)| task(ci, p));
        } else {
            task(0, (x, y));
        }
        Ok(())
    }

    /// Naive reference: the residual sum in f32 (it is stored as f32), the
    /// statistics and the output in f64, rounded to f32 once.
    pub fn run_ref(
        &self,
        x: &mut [f32],
        r: Option<&[f32]>,
        w: Elems,
        b: Option<Elems>,
        y: &mut [f32],
    ) -> Result<(), NormError> {
        self.check_bufs(x.len(), r.map(|r| r.len()), w.len(), b.map(|b| b.len()), y.len())?;
        if let Some(r) = r {
            for (xv, rv) in x.iter_mut().zip(r) {
                *xv += rv;
            }
        }
        let n = self.cols as f64;
        for (xr, yr) in x.chunks_exact(self.cols).zip(y.chunks_exact_mut(self.cols)) {
            let xs: Vec<f64> = xr.iter().map(|&v| v as f64).collect();
            let (shift, scale) = match self.kind {
                NormKind::LayerNorm { .. } => {
                    let mean = xs.iter().sum::<f64>() / n;
                    let var = xs.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
                    (mean, 1.0 / (var + self.eps as f64).sqrt())
                }
                NormKind::RmsNorm => {
                    let ms = xs.iter().map(|v| v * v).sum::<f64>() / n;
                    (0.0, 1.0 / (ms + self.eps as f64).sqrt())
                }
            };
            for (j, (o, v)) in yr.iter_mut().zip(&xs).enumerate() {
                let bj = b.map_or(0.0, |b| b.get(j) as f64);
                *o = ((v - shift) * scale * w.get(j) as f64 + bj) as f32;
            }
        }
        Ok(())
    }

    /// The parameters in the order the kernel declares them.
    pub fn param_names(&self) -> Vec<&'static str> {
        let mut p = vec!["x"];
        if self.residual {
            p.push("r");
        }
        p.push("w");
        if self.has_bias() {
            p.push("b");
        }
        p.push("y");
        p
    }
}

/// Elements per vector access for rows of `n` elements: the largest of 4, 2,
/// 1 dividing `n`, so that every vector of every row is aligned (given
/// 16-byte aligned buffers) and no row ends inside a vector.
pub(super) fn vec_width(n: usize) -> usize {
    if n.is_multiple_of(4) {
        4
    } else if n.is_multiple_of(2) {
        2
    } else {
        1
    }
}

/// Zeroed registers of `ty` (f32 gets 0.0).
pub(super) fn zeros(b: &mut KernelBuilder, ty: Ty, n: usize) -> Vec<Reg> {
    (0..n).map(|_| b.mov(ty, if ty == Ty::F32 { Operand::F32(0.0) } else { Operand::Imm(0) })).collect()
}

/// `ld.{space}[.vN].{ty}` into `dst`, under `pred` when given.
pub(super) fn load(b: &mut KernelBuilder, pred: Option<Reg>, space: &str, ty: Ty, dst: &[Reg], addr: Addr) {
    let (op, d): (String, Operand) = match dst.len() {
        1 => (format!("ld.{space}.{ty}"), dst[0].into()),
        n => (format!("ld.{space}.v{n}.{ty}"), dst.to_vec().into()),
    };
    match pred {
        Some(p) => b.ins_if(p, false, &op, vec![d, addr.into()]),
        None => b.ins(&op, vec![d, addr.into()]),
    }
}

/// `st.global[.vN].{ty}` of `src`, under `pred` when given.
pub(super) fn store(b: &mut KernelBuilder, pred: Option<Reg>, ty: Ty, src: &[Reg], addr: Addr) {
    let (op, s): (String, Operand) = match src.len() {
        1 => (format!("st.global.{ty}"), src[0].into()),
        n => (format!("st.global.v{n}.{ty}"), src.to_vec().into()),
    };
    match pred {
        Some(p) => b.ins_if(p, false, &op, vec![addr.into(), s]),
        None => b.ins(&op, vec![addr.into(), s]),
    }
}

/// Widens packed bf16 (`.b32` pairs, or one `.b16` when `vec` = 1) to f32.
pub(super) fn widen_bf16(b: &mut KernelBuilder, packed: &[Reg]) -> Vec<Reg> {
    let mut out = vec![];
    for &p in packed {
        if p.class == qvc_codegen::RegClass::B16 {
            let w = b.cvt(Ty::U32, Ty::U16, p);
            let bits = b.shl(Ty::B32, w, 16);
            let f = b.reg(qvc_codegen::RegClass::F32);
            b.ins("mov.b32", vec![f.into(), bits.into()]);
            out.push(f);
        } else {
            let (lo, hi) = b.bf16x2_to_f32(p);
            out.extend([lo, hi]);
        }
    }
    out
}

/// Loads `n` (1, 2 or 4) consecutive elements of `dtype` (f32 or bf16) at
/// `addr` as f32 registers, zero where `pred` is false. One vector access:
/// `addr` must be aligned to `n` elements.
pub(super) fn load_f32s(
    b: &mut KernelBuilder,
    pred: Option<Reg>,
    space: &str,
    dtype: DType,
    n: usize,
    addr: Addr,
) -> Vec<Reg> {
    match dtype {
        DType::F32 => {
            let r = zeros(b, Ty::F32, n);
            load(b, pred, space, Ty::F32, &r, addr);
            r
        }
        DType::BF16 => {
            let (ty, regs) = if n == 1 { (Ty::B16, 1) } else { (Ty::B32, n / 2) };
            let r = zeros(b, ty, regs);
            load(b, pred, space, ty, &r, addr);
            widen_bf16(b, &r)
        }
        other => panic!("load_f32s: unsupported dtype {other}"),
    }
}

/// Stores f32 registers `vals` (1, 2 or 4) at `addr` as `dtype` (f32, or bf16
/// rounded to nearest even), under `pred` when given.
pub(super) fn store_f32s(b: &mut KernelBuilder, pred: Option<Reg>, dtype: DType, vals: &[Reg], addr: Addr) {
    match dtype {
        DType::F32 => store(b, pred, Ty::F32, vals, addr),
        DType::BF16 if vals.len() == 1 => {
            let h = b.cvt(Ty::BF16, Ty::F32, vals[0]);
            store(b, pred, Ty::B16, &[h], addr);
        }
        DType::BF16 => {
            let packed: Vec<Reg> = vals.chunks(2).map(|p| b.pack_half2(Ty::BF16x2, p[0], p[1])).collect();
            store(b, pred, Ty::B32, &packed, addr);
        }
        other => panic!("store_f32s: unsupported dtype {other}"),
    }
}

/// Sum of `v` over the threads of a row: the warp butterfly, then (when a row
/// spans several warps) one shared slot per warp, a barrier, and every
/// thread adding the slots in the same order, so all threads agree bit for bit.
fn row_sum(b: &mut KernelBuilder, g: &Geometry, v: Reg, tid: Reg, name: &str) -> Reg {
    let s = b.warp_reduce_f32("add", v);
    if g.rows_per_block > 1 {
        return s;
    }
    let warps = g.threads / 32;
    let red = b.shared(name, (warps * 4) as u32, 4);
    let lane = b.and(Ty::B32, tid, 31);
    let warp = b.shr(Ty::U32, tid, 5);
    let slot = b.mad(Ty::U32, warp, 4, red);
    let first = b.setp(Cmp::Eq, Ty::U32, lane, 0);
    b.ins_if(first, false, "st.shared.f32", vec![Addr::reg(slot, 0).into(), s.into()]);
    b.bar_sync();
    let mut total = b.ld(qvc_codegen::Space::Shared, Ty::F32, Addr::reg(red, 0));
    for w in 1..warps {
        let p = b.ld(qvc_codegen::Space::Shared, Ty::F32, Addr::reg(red, 4 * w as i64));
        total = b.add(Ty::F32, total, p);
    }
    total
}

impl KernelSpec for NormSpec {
    fn name(&self) -> String {
        let kind = match self.kind {
            NormKind::LayerNorm { bias: true } => "layernorm_bias",
            NormKind::LayerNorm { bias: false } => "layernorm",
            NormKind::RmsNorm => "rmsnorm",
        };
        // `{:e}` is the shortest exact spelling; '-' and '.' are not PTX identifier characters.
        let eps = format!("{:e}", self.eps).replace('-', "m").replace('.', "p");
        let res = if self.residual { "_res" } else { "" };
        format!("{kind}_r{}_c{}_e{eps}{res}_{}", self.rows, self.cols, self.out)
    }

    fn build(&self) -> Kernel {
        if let Err(e) = self.validate() {
            panic!("{e}");
        }
        let g = Geometry::of(self.cols);
        let (vec, chunks, threads, per) = (g.vec, g.chunks, g.threads, g.per);
        let mut b = KernelBuilder::new(self.name());
        b.max_threads((threads * g.rows_per_block) as u32);

        let x = b.ptr_param("x");
        let r = self.residual.then(|| b.ptr_param("r"));
        let w = b.ptr_param("w");
        let bias = self.has_bias().then(|| b.ptr_param("b"));
        let y = b.ptr_param("y");

        let tid = b.special(Sreg::TidX);
        let cta = b.special(Sreg::CtaidX);
        let end = b.label("end");
        // `t`: this thread's index within its row; `row`: the row it works on.
        let (t, row) = if g.rows_per_block > 1 {
            let t = b.and(Ty::B32, tid, 31);
            let warp = b.shr(Ty::U32, tid, 5);
            let row = b.mad(Ty::U32, cta, g.rows_per_block as u32, warp);
            // Warp-uniform exit: a warp-per-row kernel has no barrier.
            let past = b.setp(Cmp::Ge, Ty::U32, row, self.rows as u32);
            b.bra_if(past, false, &end);
            (t, row)
        } else {
            (tid, cta)
        };
        let row_el = b.mul(Ty::U32, row, self.cols as u32);
        let x_row = b.index_addr(x, row_el, 4);
        let r_row = r.map(|r| b.index_addr(r, row_el, 4));
        let y_row = b.index_addr(y, row_el, self.out.size() as u32);
        let x_space = if self.residual { "global" } else { "global.nc" };

        // Per chunk: its element index, its validity (None = valid in every thread).
        let mut elem = vec![];
        let mut valid = vec![];
        for i in 0..per {
            let c = b.add(Ty::U32, t, (i * threads) as u32);
            let p = ((i + 1) * threads > chunks).then(|| b.setp(Cmp::Lt, Ty::U32, c, chunks as u32));
            elem.push(b.mul(Ty::U32, c, vec as u32));
            valid.push(p);
        }

        // Loads: x (+ r, written back), packed bf16 w and b issued early so
        // their latency overlaps the reductions.
        let mut xs: Vec<Vec<Reg>> = vec![];
        let (mut ws, mut bs) = (vec![], vec![]);
        let wty = match vec {
            4 | 2 => Ty::B32,
            _ => Ty::B16,
        };
        let wregs = vec.div_ceil(2);
        for i in 0..per {
            let xi = zeros(&mut b, Ty::F32, vec);
            let xa = b.index_addr(x_row, elem[i], 4);
            load(&mut b, valid[i], x_space, Ty::F32, &xi, Addr::reg(xa, 0));
            if let Some(r_row) = r_row {
                let ri = zeros(&mut b, Ty::F32, vec);
                let ra = b.index_addr(r_row, elem[i], 4);
                load(&mut b, valid[i], "global.nc", Ty::F32, &ri, Addr::reg(ra, 0));
                for (xv, rv) in xi.iter().zip(&ri) {
                    b.bin_into("add", Ty::F32, *xv, *xv, *rv);
                }
                store(&mut b, valid[i], Ty::F32, &xi, Addr::reg(xa, 0));
            }
            xs.push(xi);
            for (dst, src) in [(&mut ws, Some(w)), (&mut bs, bias)] {
                let Some(src) = src else { continue };
                let regs = zeros(&mut b, wty, wregs);
                let a = b.index_addr(src, elem[i], 2);
                load(&mut b, valid[i], "global.nc", if vec == 1 { Ty::B16 } else { Ty::B32 }, &regs, Addr::reg(a, 0));
                dst.push(regs);
            }
        }

        let inv_n = 1.0 / self.cols as f32;
        let all: Vec<Reg> = xs.iter().flatten().copied().collect();
        // `d[i]` = the values whose squares are summed and which are scaled.
        let (d, scale) = match self.kind {
            NormKind::LayerNorm { .. } => {
                let mut s = all[0];
                for &v in &all[1..] {
                    s = b.add(Ty::F32, s, v);
                }
                let total = row_sum(&mut b, &g, s, tid, "red_mean");
                let mean = b.mul(Ty::F32, total, inv_n);
                let mut d = vec![];
                let (mut sq, mut lin) = (None, None);
                let acc = |b: &mut KernelBuilder, acc: &mut Option<Reg>, v: Reg| {
                    *acc = Some(match *acc {
                        None => v,
                        Some(a) => b.add(Ty::F32, a, v),
                    });
                };
                for i in 0..per {
                    let di: Vec<Reg> = xs[i].iter().map(|&v| b.sub(Ty::F32, v, mean)).collect();
                    for &dv in &di {
                        // Zero-filled chunks past the row end have d = −mean: keep them out.
                        let dv = match valid[i] {
                            Some(p) => b.selp(Ty::F32, dv, 0.0f32, p),
                            None => dv,
                        };
                        let sqv = b.mul(Ty::F32, dv, dv);
                        acc(&mut b, &mut sq, sqv);
                        acc(&mut b, &mut lin, dv);
                    }
                    d.push(di);
                }
                // The f32 mean is off by up to half an ulp of itself, which
                // shifts every deviation: for a row whose spread is small
                // next to its mean (two close values near 3) that is 1e-5
                // of the output. `x − mean` is exact for such rows
                // (Sterbenz), so the deviations' own mean `drift` is the
                // mean's error: subtract it, and take it out of the variance
                // (the corrected two-pass formula, Σd² − (Σd)²/n).
                let drift_sum = row_sum(&mut b, &g, lin.unwrap(), tid, "red_drift");
                let drift = b.mul(Ty::F32, drift_sum, inv_n);
                let var_sum = row_sum(&mut b, &g, sq.unwrap(), tid, "red_var");
                let drift_sq = b.mul(Ty::F32, drift_sum, drift);
                let var_sum = b.sub(Ty::F32, var_sum, drift_sq);
                let var = b.mul(Ty::F32, var_sum, inv_n);
                let ve = b.add(Ty::F32, var, self.eps);
                for di in d.iter_mut() {
                    for dv in di.iter_mut() {
                        *dv = b.sub(Ty::F32, *dv, drift);
                    }
                }
                (d, b.rsqrt(ve))
            }
            NormKind::RmsNorm => {
                let mut s = b.mul(Ty::F32, all[0], all[0]);
                for &v in &all[1..] {
                    s = b.mad(Ty::F32, v, v, s);
                }
                let total = row_sum(&mut b, &g, s, tid, "red_ms");
                let ms = b.mul(Ty::F32, total, inv_n);
                let me = b.add(Ty::F32, ms, self.eps);
                (xs, b.rsqrt(me))
            }
        };

        for i in 0..per {
            let wf = widen_bf16(&mut b, &ws[i]);
            let bf = if bias.is_some() { Some(widen_bf16(&mut b, &bs[i])) } else { None };
            let mut ys = vec![];
            for (j, &dv) in d[i].iter().enumerate() {
                let n = b.mul(Ty::F32, dv, scale);
                ys.push(match &bf {
                    Some(bf) => b.mad(Ty::F32, n, wf[j], bf[j]),
                    None => b.mul(Ty::F32, n, wf[j]),
                });
            }
            let ya = b.index_addr(y_row, elem[i], self.out.size() as u32);
            store_f32s(&mut b, valid[i], self.out, &ys, Addr::reg(ya, 0));
        }
        b.place(&end);
        b.ret();
        b.finish()
    }

    fn launch(&self) -> Launch {
        let g = Geometry::of(self.cols);
        let blocks = self.rows.div_ceil(g.rows_per_block) as u32;
        Launch::new([blocks, 1, 1], [(g.threads * g.rows_per_block) as u32, 1, 1])
    }

    fn cost(&self) -> Cost {
        let n = (self.rows * self.cols) as u64;
        let cols = self.cols as u64;
        // Per element: LayerNorm sum, subtract, square, two adds (Σd², Σd), the
        // drift subtract, scale, fma with w and b;
        // RMSNorm square-add, scale, multiply by w; the residual add is one more.
        let per_el = match self.kind {
            NormKind::LayerNorm { .. } => 9,
            NormKind::RmsNorm => 4,
        } + self.residual as u64;
        let weights = cols * 2 * (1 + self.has_bias() as u64);
        let residual = if self.residual { n * 4 * 2 } else { 0 }; // read r, write x back
        Cost { flops: per_el * n, bytes: n * 4 + residual + weights + n * self.out.size() as u64 }
    }
}

/// The Qwen-VL-Chat norms: ViT LayerNorms (width 1664, 1024 or 4096 tokens
/// for 448 and 896 pixel images, with and without the fused residual), the
/// adapter's `ln_q` / `ln_kv` / `ln_post` (width 4096), and the decoder's
/// RMSNorms (width 4096; decode, a small batch, and a 300-token prefill).
pub fn model_specs() -> Vec<NormSpec> {
    let mut v = vec![];
    let ln = NormKind::LayerNorm { bias: true };
    for rows in [1024, 4096] {
        for residual in [false, true] {
            v.push(NormSpec { kind: ln, rows, cols: 1664, eps: 1e-6, residual, out: DType::BF16 });
        }
    }
    for rows in [256, 1024] {
        for out in [DType::BF16, DType::F32] {
            v.push(NormSpec { kind: ln, rows, cols: 4096, eps: 1e-6, residual: false, out });
        }
    }
    for rows in [1, 8, 300] {
        for residual in [false, true] {
            v.push(NormSpec { kind: NormKind::RmsNorm, rows, cols: 4096, eps: 1e-6, residual, out: DType::BF16 });
        }
    }
    v
}
