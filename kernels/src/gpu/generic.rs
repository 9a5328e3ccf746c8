//! The generic kernels: glue for every IR op that no specialised family
//! covers (layout changes and casts, elementwise math with broadcasting,
//! `Gather`, `ScatterRows`, small `MatMul`s, `Reduce`, `Rotary`/`QkvRotary`),
//! so that a compiled graph runs entirely on the device.
//!
//! Every kernel is one thread per output element (per source element for
//! [`ScatterRowsSpec`]), blocks of [`BLOCK`] threads on a 1-D grid; threads
//! past the end exit at once. No barriers, no shared memory, no collectives.
//! Shapes and strides are compiled in; the element index is a `u32` and every
//! pointer is `base + mul.wide(offset, size)`, so the invariant each spec's
//! `validate` enforces is: every element count and every element offset
//! (Σ (dim − 1)·stride) is below 2^31, and no dimension is zero.
//!
//! Semantics are those of `qvc_ir::interp` (which evaluates in f64 and
//! rounds to f32 once per primitive); each spec's `run_ref` is a naive CPU
//! reference with exactly that meaning on the device's memory layout:
//! * exact on the device: copies and casts (f32→bf16 rounds to nearest
//!   even; a NaN stays a NaN, its payload may differ), gather, scatter,
//!   `Neg`, `Recip`, `Sqrt`, `Add`, `Sub`, `Mul`, `Div`, `Max`, `Ge`,
//!   `Where`, rotary (the same f32 products and sum, in the same order as the
//!   expanded graph; `mul.rn`/`add.rn` keep ptxas from fusing them);
//! * within a few f32 ulps: `Exp` (ex2 of a two-part log2(e)·x), `Log`
//!   (range reduction and an atanh series), `Rsqrt` (`sqrt.rn` then
//!   `rcp.rn`), `Tanh`, `Sigmoid`, `Silu` (all built on that exp), `Erf`
//!   (series below |x| = 0.5, the builder's A&S 7.1.26 form above: absolute
//!   error < 5e-7); `Gelu` is the builder's erf GELU, the same code as the
//!   fused GEMM epilogues and the CPU kernel (relative error about 1e-6,
//!   up to 1e-5 for very negative inputs, where the reference below, the
//!   interpreter's `½x(1 + erf)`, is the less accurate one). Results that
//!   underflow into subnormals may differ by the subnormal itself;
//! * `Max` (binary and reduction) follows `f64::max`: a NaN operand is
//!   ignored (the other one is returned), so a reduction over all-NaN gives
//!   `-inf`, as in the interpreter (`max(-0, +0)` is `+0` on the device);
//!   `Where` takes `a` when `cond != 0`, which includes a NaN `cond`;
//! * `Reduce` and `MatMul` accumulate in f32, sequentially (k ascending),
//!   where the interpreter uses f64: compare with a tolerance.
//!
//! Aliasing: an [`EltwiseSpec`] output may be the same buffer as an input
//! with the identical (contiguous, non-broadcast) layout, since every
//! element is read and written by one thread (its loads are coherent
//! `ld.global`). Every other kernel's outputs must not overlap its inputs
//! (those are read through the non-coherent cache), and [`ScatterRowsSpec`]
//! with a repeated row index writes each element of that row from one of the
//! duplicates, unspecified which (`run_ref`: the last).
//!
//! Names: each kernel's name encodes its spec; where the spec holds vectors
//! it ends with the 64-bit FNV-1a hash of the spec's `Debug` text.

use std::fmt;

use half::bf16;
use qvc_codegen::{Addr, Cmp, Kernel, KernelBuilder, Label, Operand, Reg, RegClass, Space, Sreg, Ty};
use qvc_ir::interp::erf_f64;
use qvc_ir::{BinaryOp, DType, Elems, ReduceOp, UnaryOp};

use super::catalog::fingerprint;
use crate::spec::{Cost, KernelSpec, Launch};

/// Threads per block of every generic kernel.
pub const BLOCK: u32 = 256;
/// Highest rank of [`CopySpec`] and [`EltwiseSpec`].
pub const MAX_RANK: usize = 6;
/// Element counts and element offsets must stay below this (`u32` index
/// arithmetic with room for the sign bit of an `s32` id compare).
pub const MAX_ELEMS: usize = 1 << 31;

/// A spec that cannot be built, or host buffers that do not fit a spec.
#[derive(Clone, Debug, PartialEq)]
pub enum GenericError {
    /// A dimension (or `k`, `len`, …) is zero: launch nothing instead.
    Empty { spec: &'static str },
    /// Rank outside `1..=MAX_RANK`.
    Rank { spec: &'static str, rank: usize },
    /// A stride list does not have one entry per dimension (or an
    /// elementwise op has the wrong number of stride lists).
    StridesLen { spec: &'static str, what: &'static str, want: usize, got: usize },
    /// A dtype this spec does not support in that position.
    DType { spec: &'static str, what: &'static str, dtype: DType },
    /// An element count or offset reaches [`MAX_ELEMS`].
    TooLarge { spec: &'static str, what: &'static str },
    /// Two indices of a copy would write the same destination element.
    DstOverlap { shape: Vec<usize>, strides: Vec<usize> },
    /// Rotary needs an even head dimension.
    OddHeadDim { head_dim: usize },
    /// A host buffer given to `run_ref` is shorter than the spec needs
    /// (or, for contiguous outputs, not exactly that long).
    Len { what: &'static str, need: usize, got: usize },
}

impl fmt::Display for GenericError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            GenericError::Empty { spec } => write!(f, "{spec}: a dimension is zero"),
            GenericError::Rank { spec, rank } => write!(f, "{spec}: rank {rank} is outside 1..={MAX_RANK}"),
            GenericError::StridesLen { spec, what, want, got } => {
                write!(f, "{spec}: `{what}` has {got} entries, expected {want}")
            }
            GenericError::DType { spec, what, dtype } => write!(f, "{spec}: `{what}` cannot be {dtype}"),
            GenericError::TooLarge { spec, what } => {
                write!(f, "{spec}: `{what}` reaches 2^31 elements (32-bit indexing)")
            }
            GenericError::DstOverlap { shape, strides } => {
                write!(f, "copy: destination strides {strides:?} over {shape:?} write some element twice")
            }
            GenericError::OddHeadDim { head_dim } => write!(f, "rope: head_dim {head_dim} is not even"),
            GenericError::Len { what, need, got } => write!(f, "`{what}` has {got} elements, {need} are needed"),
        }
    }
}

impl std::error::Error for GenericError {}

// ---- shared helpers ----------------------------------------------------------

fn nonzero(spec: &'static str, dims: &[usize]) -> Result<(), GenericError> {
    if dims.contains(&0) {
        return Err(GenericError::Empty { spec });
    }
    Ok(())
}

/// `Π dims`, or `TooLarge` when it reaches [`MAX_ELEMS`].
fn count(spec: &'static str, what: &'static str, dims: &[usize]) -> Result<usize, GenericError> {
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n < MAX_ELEMS)
        .ok_or(GenericError::TooLarge { spec, what })
}

/// The largest element offset `Σ (dim − 1)·stride`, or `TooLarge`.
fn max_offset(
    spec: &'static str,
    what: &'static str,
    shape: &[usize],
    strides: &[usize],
) -> Result<usize, GenericError> {
    shape
        .iter()
        .zip(strides)
        .try_fold(0usize, |a, (&n, &s)| n.saturating_sub(1).checked_mul(s).and_then(|t| a.checked_add(t)))
        .filter(|&m| m < MAX_ELEMS)
        .ok_or(GenericError::TooLarge { spec, what })
}

/// Elements a strided buffer spans: the largest offset plus one
/// (saturating, so it is safe to call on a spec that fails validation).
fn span(shape: &[usize], strides: &[usize]) -> usize {
    shape.iter().zip(strides).fold(1usize, |a, (&n, &s)| a.saturating_add(n.saturating_sub(1).saturating_mul(s)))
}

fn check_rank(spec: &'static str, shape: &[usize]) -> Result<(), GenericError> {
    if shape.is_empty() || shape.len() > MAX_RANK {
        return Err(GenericError::Rank { spec, rank: shape.len() });
    }
    nonzero(spec, shape)
}

fn check_strides(spec: &'static str, what: &'static str, rank: usize, s: &[usize]) -> Result<(), GenericError> {
    if s.len() != rank {
        return Err(GenericError::StridesLen { spec, what, want: rank, got: s.len() });
    }
    Ok(())
}

/// `got` must hold at least `need` elements.
fn at_least(what: &'static str, need: usize, got: usize) -> Result<(), GenericError> {
    if got < need {
        return Err(GenericError::Len { what, need, got });
    }
    Ok(())
}

/// `got` must hold exactly `need` elements (contiguous outputs).
fn exactly(what: &'static str, need: usize, got: usize) -> Result<(), GenericError> {
    if got != need {
        return Err(GenericError::Len { what, need, got });
    }
    Ok(())
}

/// The element offsets, one per stride list, of every index of row-major
/// `shape`, in order: what the references iterate.
fn offsets_of(shape: &[usize], strides: &[&[usize]], mut f: impl FnMut(usize, &[usize])) {
    let n: usize = shape.iter().product();
    let mut offs = vec![0usize; strides.len()];
    for lin in 0..n {
        let mut rem = lin;
        offs.iter_mut().for_each(|o| *o = 0);
        for d in (0..shape.len()).rev() {
            let i = rem % shape[d];
            rem /= shape[d];
            for (o, s) in offs.iter_mut().zip(strides) {
                *o += i * s[d];
            }
        }
        f(lin, &offs);
    }
}

/// Drops size-1 dimensions and merges neighbours that are contiguous in
/// every stride list (outer stride = inner stride · inner size), which keeps
/// the row-major linear index and every offset unchanged: fewer divisions
/// in the index decomposition. May return rank 0 (a single element).
fn coalesce(shape: &[usize], strides: &[&[usize]]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let mut dims: Vec<usize> = vec![];
    let mut st: Vec<Vec<usize>> = vec![vec![]; strides.len()];
    for (d, &n) in shape.iter().enumerate() {
        if n == 1 {
            continue;
        }
        let merge = !dims.is_empty() && strides.iter().zip(&st).all(|(s, t)| t.last() == Some(&(s[d] * n)));
        if merge {
            *dims.last_mut().expect("not empty") *= n;
            for (s, t) in strides.iter().zip(st.iter_mut()) {
                *t.last_mut().expect("not empty") = s[d];
            }
        } else {
            dims.push(n);
            for (s, t) in strides.iter().zip(st.iter_mut()) {
                t.push(s[d]);
            }
        }
    }
    (dims, st)
}

/// FNV-1a of the spec's `Debug` text, as 16 hex digits.
fn spec_hash(spec: &impl fmt::Debug) -> String {
    format!("{:016x}", fingerprint(&format!("{spec:?}")))
}

fn dtype_tag(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::I32 => "i32",
        DType::Q4 => "q4",
    }
}

/// One thread per element on a 1-D grid.
fn grid_for(n: usize) -> Launch {
    Launch::new([n.div_ceil(BLOCK as usize) as u32, 1, 1], [BLOCK, 1, 1])
}

/// A kernel with `.maxntid BLOCK`.
fn new_kernel(name: String) -> KernelBuilder {
    let mut b = KernelBuilder::new(name);
    b.max_threads(BLOCK);
    b
}

/// The global thread index; threads at or past `n` jump to `exit`.
fn thread_index(b: &mut KernelBuilder, n: usize, exit: &Label) -> Reg {
    let tid = b.special(Sreg::TidX);
    let cta = b.special(Sreg::CtaidX);
    let idx = b.mad(Ty::U32, cta, BLOCK, tid);
    let past = b.setp(Cmp::Ge, Ty::U32, idx, n as u32);
    b.bra_if(past, false, exit);
    idx
}

/// `(idx / n, idx % n)` for a compile-time `n`.
fn divmod(b: &mut KernelBuilder, idx: Reg, n: usize) -> (Reg, Reg) {
    let q = b.div(Ty::U32, idx, n as u32);
    let qn = b.mul(Ty::U32, q, n as u32);
    let r = b.sub(Ty::U32, idx, qn);
    (q, r)
}

/// The element offsets (one per stride list; `None` = 0) of linear index
/// `idx` (< Π shape) over row-major `shape`: digits from the innermost
/// dimension out; the outermost needs no division.
fn emit_offsets(b: &mut KernelBuilder, idx: Reg, shape: &[usize], strides: &[Vec<usize>]) -> Vec<Option<Reg>> {
    let mut offs: Vec<Option<Reg>> = vec![None; strides.len()];
    let mut rem = idx;
    for d in (0..shape.len()).rev() {
        let digit = if d == 0 {
            rem
        } else {
            let (q, r) = divmod(b, rem, shape[d]);
            rem = q;
            r
        };
        for (o, s) in offs.iter_mut().zip(strides) {
            let st = s[d];
            if st == 0 {
                continue;
            }
            *o = Some(match *o {
                None if st == 1 => digit,
                None => b.mul(Ty::U32, digit, st as u32),
                Some(acc) => b.mad(Ty::U32, digit, st as u32, acc),
            });
        }
    }
    offs
}

/// `base + off·size` (just `base` for offset 0).
fn elem_addr(b: &mut KernelBuilder, base: Reg, off: Option<Reg>, size: usize) -> Addr {
    match off {
        None => Addr::reg(base, 0),
        Some(o) => Addr::reg(b.index_addr(base, o, size as u32), 0),
    }
}

/// Loads one f32 or bf16 element as f32.
fn load_f32(b: &mut KernelBuilder, space: Space, dtype: DType, addr: Addr) -> Reg {
    match dtype {
        DType::BF16 => {
            let h = b.ld(space, Ty::B16, addr);
            b.cvt(Ty::F32, Ty::BF16, h)
        }
        _ => b.ld(space, Ty::F32, addr),
    }
}

fn f32_of_bits(b: &mut KernelBuilder, bits: Reg) -> Reg {
    let d = b.reg(RegClass::F32);
    b.ins("mov.b32", vec![d.into(), bits.into()]);
    d
}

/// `|mag|` with the sign of `sign`.
fn copysign(b: &mut KernelBuilder, mag: Reg, sign: Reg) -> Reg {
    let m = b.and(Ty::B32, mag, 0x7fff_ffffi64);
    let s = b.and(Ty::B32, sign, 0x8000_0000u32 as i64);
    let r = b.or(Ty::B32, m, s);
    f32_of_bits(b, r)
}

fn mul_rn(b: &mut KernelBuilder, x: impl Into<Operand>, y: impl Into<Operand>) -> Reg {
    b.bin("mul.rn", Ty::F32, x, y)
}
fn add_rn(b: &mut KernelBuilder, x: impl Into<Operand>, y: impl Into<Operand>) -> Reg {
    b.bin("add.rn", Ty::F32, x, y)
}
fn sub_rn(b: &mut KernelBuilder, x: impl Into<Operand>, y: impl Into<Operand>) -> Reg {
    b.bin("sub.rn", Ty::F32, x, y)
}

// ---- accurate f32 math -------------------------------------------------------

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// log2(e) − LOG2E: the second half of a two-part log2(e).
const LOG2E_LO: f32 = (std::f64::consts::LOG2_E - std::f32::consts::LOG2_E as f64) as f32;
const LN2: f32 = std::f32::consts::LN_2;
/// ln 2 in two parts: the high one has 16 significant bits, so `e·LN2_HI`
/// is exact for every exponent `e`.
const LN2_HI: f32 = f32::from_bits(0x3f31_7200); // 0.693145751953125
const LN2_LO: f32 = (std::f64::consts::LN_2 - LN2_HI as f64) as f32;

/// e^x within about 2 ulp: `hi + lo = x·log2(e)` to ~2^-48 relative (the
/// product's rounding error recovered by an fma, plus the low part of
/// log2 e), then `2^hi·(1 + lo·ln 2)`. Where `|hi| ≥ 128` the result is
/// 0/subnormal or inf (or x is ±inf/NaN) and the plain `2^hi` is used.
fn exp_acc(b: &mut KernelBuilder, x: Reg) -> Reg {
    let hi = mul_rn(b, x, LOG2E);
    let nhi = b.neg(Ty::F32, hi);
    let lo = b.mad(Ty::F32, x, LOG2E, nhi);
    let lo = b.mad(Ty::F32, x, LOG2E_LO, lo);
    // Without .ftz: subnormal results are kept, as the interpreter's are.
    let e = b.un("ex2.approx", Ty::F32, hi);
    let c = mul_rn(b, lo, LN2);
    let r = b.mad(Ty::F32, e, c, e);
    let ahi = b.abs(Ty::F32, hi);
    let ok = b.setp(Cmp::Lt, Ty::F32, ahi, 128.0f32);
    b.selp(Ty::F32, r, e, ok)
}

/// ln x within a few ulp for finite x > 0: x = m·2^k with m in [√½, √2)
/// (subnormals scaled by 2^24 first), ln m = 2·atanh(s), s = (m−1)/(m+1),
/// |s| < 0.172, series to s^11 (truncation < 6e-11), plus k·ln 2 in two
/// parts. Zero, negative, infinite and NaN inputs take `lg2.approx`, whose
/// special values (−inf, NaN, inf, NaN) are the right ones.
fn log_acc(b: &mut KernelBuilder, x: Reg) -> Reg {
    let small = b.setp(Cmp::Lt, Ty::F32, x, f32::MIN_POSITIVE);
    let scaled = mul_rn(b, x, 16_777_216.0f32);
    let xs = b.selp(Ty::F32, scaled, x, small);
    let bits = b.mov(Ty::B32, xs);
    let t = b.sub(Ty::S32, bits, 0x3f35_04f3i64);
    let k = b.shr(Ty::S32, t, 23);
    let kbits = b.and(Ty::B32, t, 0xff80_0000u32 as i64);
    let mbits = b.sub(Ty::S32, bits, kbits);
    let m = f32_of_bits(b, mbits);
    let f = sub_rn(b, m, 1.0f32);
    let den = add_rn(b, f, 2.0f32);
    let s = b.div(Ty::F32, f, den);
    let s2 = mul_rn(b, s, s);
    let mut p = b.mov(Ty::F32, 1.0f32 / 11.0);
    for c in [1.0f32 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0] {
        p = b.mad(Ty::F32, p, s2, c);
    }
    let p = mul_rn(b, p, s2);
    let two_s = add_rn(b, s, s);
    let ln_m = b.mad(Ty::F32, two_s, p, two_s);
    let adj = b.selp(Ty::S32, 24i64, 0i64, small);
    let k = b.sub(Ty::S32, k, adj);
    let kf = b.cvt(Ty::F32, Ty::S32, k);
    let r = b.mad(Ty::F32, kf, LN2_LO, ln_m);
    let r = b.mad(Ty::F32, kf, LN2_HI, r);
    let pos = b.setp(Cmp::Gt, Ty::F32, x, 0.0f32);
    let fin = b.setp(Cmp::Lt, Ty::F32, x, f32::INFINITY);
    let normal = b.and_pred(pos, fin);
    let l2 = b.un("lg2.approx", Ty::F32, x);
    let special = mul_rn(b, l2, LN2);
    b.selp(Ty::F32, r, special, normal)
}

/// erf: below |x| = 0.5 its Maclaurin series (to x^13, truncation < 2e-9
/// relative), so tiny arguments keep full relative accuracy; above, the
/// builder's A&S 7.1.26 form (absolute error < 5e-7, relative < 1e-6 there).
fn erf_acc(b: &mut KernelBuilder, x: Reg) -> Reg {
    let big = b.erf(x);
    let x2 = mul_rn(b, x, x);
    // erf(x)·√π/2 = x + x³·q(x²), q's coefficients (−1)^n / (n!·(2n+1)).
    let mut q = b.mov(Ty::F32, 1.0f32 / 9360.0);
    for c in [-1.0f32 / 1320.0, 1.0 / 216.0, -1.0 / 42.0, 1.0 / 10.0, -1.0 / 3.0] {
        q = b.mad(Ty::F32, q, x2, c);
    }
    let x3 = mul_rn(b, x, x2);
    let s = b.mad(Ty::F32, x3, q, x);
    let small = mul_rn(b, s, std::f32::consts::FRAC_2_SQRT_PI);
    let ax = b.abs(Ty::F32, x);
    let lt = b.setp(Cmp::Lt, Ty::F32, ax, 0.5f32);
    b.selp(Ty::F32, small, big, lt)
}

/// tanh: below |x| = 0.25 its series (to x^11), above
/// `sign(x)·(1 − e)/(1 + e)` with `e = e^(−2|x|)` (no cancellation there:
/// `e ≤ 0.61`). ±inf give ±1, NaN gives NaN.
fn tanh_acc(b: &mut KernelBuilder, x: Reg) -> Reg {
    let ax = b.abs(Ty::F32, x);
    let m2 = mul_rn(b, ax, -2.0f32);
    let e = exp_acc(b, m2);
    let num = sub_rn(b, 1.0f32, e);
    let den = add_rn(b, 1.0f32, e);
    let mag = b.div(Ty::F32, num, den);
    let big = copysign(b, mag, x);
    let x2 = mul_rn(b, x, x);
    let mut q = b.mov(Ty::F32, -1382.0f32 / 155_925.0);
    for c in [62.0f32 / 2835.0, -17.0 / 315.0, 2.0 / 15.0, -1.0 / 3.0] {
        q = b.mad(Ty::F32, q, x2, c);
    }
    let x3 = mul_rn(b, x, x2);
    let small = b.mad(Ty::F32, x3, q, x);
    let lt = b.setp(Cmp::Lt, Ty::F32, ax, 0.25f32);
    b.selp(Ty::F32, small, big, lt)
}

/// 1 / (1 + e^−x).
fn sigmoid_acc(b: &mut KernelBuilder, x: Reg) -> Reg {
    let nx = b.neg(Ty::F32, x);
    let e = exp_acc(b, nx);
    let d = add_rn(b, e, 1.0f32);
    b.rcp(d)
}

// ---- 1. copy -----------------------------------------------------------------

/// Strided copy with an optional cast: `dst[Σ i·dst_strides] =
/// convert(src[Σ i·src_strides])` for every index `i` of `shape` (strides in
/// elements of each side's dtype). Serves permute, slice, concat pieces,
/// casts and KV-cache writes (the host offsets the pointers). A zero source
/// stride broadcasts; destination strides must not make two indices write
/// one element. Params `src, dst`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CopySpec {
    pub shape: Vec<usize>,
    pub src_strides: Vec<usize>,
    pub dst_strides: Vec<usize>,
    /// F32, BF16 or I32.
    pub src: DType,
    /// F32 or BF16 from a float source; I32 only from I32.
    pub dst: DType,
}

impl CopySpec {
    /// A contiguous source and destination of `shape`.
    pub fn contiguous(shape: Vec<usize>, src: DType, dst: DType) -> CopySpec {
        let s = contiguous_strides(&shape);
        CopySpec { shape, src_strides: s.clone(), dst_strides: s, src, dst }
    }

    pub fn validate(&self) -> Result<(), GenericError> {
        const S: &str = "copy";
        check_rank(S, &self.shape)?;
        check_strides(S, "src_strides", self.shape.len(), &self.src_strides)?;
        check_strides(S, "dst_strides", self.shape.len(), &self.dst_strides)?;
        let ok = matches!(
            (self.src, self.dst),
            (DType::F32 | DType::BF16, DType::F32 | DType::BF16) | (DType::I32, DType::I32)
        );
        if !ok {
            let (what, dtype) = if matches!(self.src, DType::F32 | DType::BF16 | DType::I32) {
                ("dst", self.dst)
            } else {
                ("src", self.src)
            };
            return Err(GenericError::DType { spec: S, what, dtype });
        }
        count(S, "shape", &self.shape)?;
        max_offset(S, "src_strides", &self.shape, &self.src_strides)?;
        max_offset(S, "dst_strides", &self.shape, &self.dst_strides)?;
        // Sufficient for distinct destinations: sorted by stride, each
        // stride passes the extent of all smaller ones.
        let mut dims: Vec<(usize, usize)> =
            self.shape.iter().zip(&self.dst_strides).filter(|(&n, _)| n > 1).map(|(&n, &s)| (s, n)).collect();
        dims.sort();
        let mut extent = 0usize;
        for (s, n) in dims {
            if s == 0 || s <= extent {
                return Err(GenericError::DstOverlap { shape: self.shape.clone(), strides: self.dst_strides.clone() });
            }
            extent += (n - 1) * s;
        }
        Ok(())
    }

    /// Elements the source and destination buffers must hold (from the
    /// pointers the kernel is given).
    pub fn src_len(&self) -> usize {
        span(&self.shape, &self.src_strides)
    }
    pub fn dst_len(&self) -> usize {
        span(&self.shape, &self.dst_strides)
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Reference over raw little-endian bytes (`src` holds `src` dtype
    /// elements, `dst` holds `dst` dtype elements; bytes of `dst` no index
    /// maps to are left alone). f32→bf16 rounds to nearest even.
    pub fn run_ref(&self, src: &[u8], dst: &mut [u8]) -> Result<(), GenericError> {
        self.validate()?;
        let (ss, ds) = (self.src.size(), self.dst.size());
        at_least("src bytes", self.src_len() * ss, src.len())?;
        at_least("dst bytes", self.dst_len() * ds, dst.len())?;
        let (sd, dd) = (self.src, self.dst);
        offsets_of(&self.shape, &[&self.src_strides, &self.dst_strides], |_, o| {
            let from = &src[o[0] * ss..(o[0] + 1) * ss];
            let to = &mut dst[o[1] * ds..(o[1] + 1) * ds];
            match (sd, dd) {
                (DType::F32, DType::BF16) => {
                    let v = f32::from_le_bytes(from.try_into().expect("4 bytes"));
                    to.copy_from_slice(&bf16::from_f32(v).to_le_bytes());
                }
                (DType::BF16, DType::F32) => {
                    let v = bf16::from_le_bytes(from.try_into().expect("2 bytes"));
                    to.copy_from_slice(&v.to_f32().to_le_bytes());
                }
                _ => to.copy_from_slice(from),
            }
        });
        Ok(())
    }

    pub fn param_names(&self) -> Vec<&'static str> {
        vec!["src", "dst"]
    }
}

/// Row-major strides of `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

impl KernelSpec for CopySpec {
    fn name(&self) -> String {
        format!("copy_r{}_{}_{}_{}", self.shape.len(), dtype_tag(self.src), dtype_tag(self.dst), spec_hash(self))
    }

    fn build(&self) -> Kernel {
        self.validate().expect("CopySpec");
        let (dims, st) = coalesce(&self.shape, &[&self.src_strides, &self.dst_strides]);
        let mut b = new_kernel(self.name());
        let src = b.ptr_param("src");
        let dst = b.ptr_param("dst");
        let end = b.label("end");
        let idx = thread_index(&mut b, self.numel(), &end);
        let offs = emit_offsets(&mut b, idx, &dims, &st);
        let sa = elem_addr(&mut b, src, offs[0], self.src.size());
        let da = elem_addr(&mut b, dst, offs[1], self.dst.size());
        match (self.src, self.dst) {
            (DType::F32, DType::BF16) => {
                let v = b.ld(Space::GlobalNc, Ty::F32, sa);
                let h = b.cvt(Ty::BF16, Ty::F32, v);
                b.st(Space::Global, Ty::B16, da, h);
            }
            (DType::BF16, DType::F32) => {
                let v = load_f32(&mut b, Space::GlobalNc, DType::BF16, sa);
                b.st(Space::Global, Ty::F32, da, v);
            }
            (s, _) => {
                // Same dtype: move the bits (NaN payloads included).
                let ty = if s.size() == 2 { Ty::B16 } else { Ty::B32 };
                let v = b.ld(Space::GlobalNc, ty, sa);
                b.st(Space::Global, ty, da, v);
            }
        }
        b.place(&end);
        b.ret();
        b.finish()
    }

    fn launch(&self) -> Launch {
        grid_for(self.numel())
    }

    fn cost(&self) -> Cost {
        let n = self.numel() as u64;
        Cost { flops: 0, bytes: n * (self.src.size() + self.dst.size()) as u64 }
    }
}

// ---- 2. elementwise ----------------------------------------------------------

/// The operation of an [`EltwiseSpec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EltOp {
    Unary(UnaryOp),
    Binary(BinaryOp),
    /// `cond != 0 ? a : b` (inputs cond, a, b).
    Where,
    /// The erf GELU, x·½(1 + erf(x/√2)).
    Gelu,
    /// x·sigmoid(x).
    Silu,
}

impl EltOp {
    /// Number of inputs.
    pub fn arity(self) -> usize {
        match self {
            EltOp::Unary(_) | EltOp::Gelu | EltOp::Silu => 1,
            EltOp::Binary(_) => 2,
            EltOp::Where => 3,
        }
    }

    /// Short lower-case name (`exp`, `add`, `where`, …).
    pub fn tag(self) -> String {
        match self {
            EltOp::Unary(u) => format!("{u:?}").to_lowercase(),
            EltOp::Binary(o) => format!("{o:?}").to_lowercase(),
            EltOp::Where => "where".into(),
            EltOp::Gelu => "gelu".into(),
            EltOp::Silu => "silu".into(),
        }
    }

    /// Floating-point operations per element for [`Cost`] (a transcendental
    /// function counts 1, as in the other families).
    fn flops(self) -> u64 {
        match self {
            EltOp::Unary(UnaryOp::Neg) | EltOp::Binary(_) | EltOp::Where => 1,
            EltOp::Unary(UnaryOp::Rsqrt | UnaryOp::Sigmoid) => 3,
            EltOp::Unary(_) => 1,
            EltOp::Gelu => 5,
            EltOp::Silu => 4,
        }
    }

    /// The interpreter's value of the op on one element (f64 inside each
    /// primitive, rounded to f32 after it; GELU and SiLU as their expansions).
    pub fn eval(self, v: &[f32]) -> f32 {
        match self {
            EltOp::Unary(u) => unary_ref(u, v[0]),
            EltOp::Binary(o) => binary_ref(o, v[0], v[1]),
            EltOp::Where => {
                if v[0] != 0.0 {
                    v[1]
                } else {
                    v[2]
                }
            }
            EltOp::Gelu => {
                let x = v[0];
                let t = x * std::f32::consts::FRAC_1_SQRT_2;
                let e = erf_f64(t as f64) as f32;
                (x * 0.5) * (e + 1.0)
            }
            EltOp::Silu => v[0] * unary_ref(UnaryOp::Sigmoid, v[0]),
        }
    }
}

fn unary_ref(op: UnaryOp, x: f32) -> f32 {
    qvc_ir::interp::unary(op, x as f64) as f32
}

fn binary_ref(op: BinaryOp, a: f32, b: f32) -> f32 {
    qvc_ir::interp::binary(op, a as f64, b as f64) as f32
}

/// Elementwise op over a contiguous f32 output of `shape`: input `k`'s
/// element for output index `i` is at `Σ i_d·strides[k][d]` (a zero stride
/// broadcasts that dimension; any permutation or slice is just strides).
/// Params `in0, [in1], [in2], out`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EltwiseSpec {
    pub shape: Vec<usize>,
    pub op: EltOp,
    /// One stride list per input, each with one entry per dimension.
    pub strides: Vec<Vec<usize>>,
}

impl EltwiseSpec {
    pub fn validate(&self) -> Result<(), GenericError> {
        const S: &str = "eltwise";
        check_rank(S, &self.shape)?;
        let arity = self.op.arity();
        if self.strides.len() != arity {
            return Err(GenericError::StridesLen {
                spec: S,
                what: "strides (one per input)",
                want: arity,
                got: self.strides.len(),
            });
        }
        for s in &self.strides {
            check_strides(S, "strides[k]", self.shape.len(), s)?;
            max_offset(S, "strides[k]", &self.shape, s)?;
        }
        count(S, "shape", &self.shape)?;
        Ok(())
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Elements input `k` must hold.
    pub fn input_len(&self, k: usize) -> usize {
        span(&self.shape, &self.strides[k])
    }

    /// Reference: `out` (contiguous, `numel` elements) from `inputs` (one
    /// per stride list), with [`EltOp::eval`].
    pub fn run_ref(&self, inputs: &[&[f32]], out: &mut [f32]) -> Result<(), GenericError> {
        self.validate()?;
        if inputs.len() != self.strides.len() {
            return Err(GenericError::Len { what: "inputs", need: self.strides.len(), got: inputs.len() });
        }
        for (k, x) in inputs.iter().enumerate() {
            at_least("input", self.input_len(k), x.len())?;
        }
        exactly("out", self.numel(), out.len())?;
        let st: Vec<&[usize]> = self.strides.iter().map(|s| &s[..]).collect();
        let mut v = [0f32; 3];
        offsets_of(&self.shape, &st, |lin, o| {
            for (k, &off) in o.iter().enumerate() {
                v[k] = inputs[k][off];
            }
            out[lin] = self.op.eval(&v[..o.len()]);
        });
        Ok(())
    }

    pub fn param_names(&self) -> Vec<&'static str> {
        let mut p = vec!["in0", "in1", "in2"];
        p.truncate(self.op.arity());
        p.push("out");
        p
    }
}

/// Emits `op` on the loaded inputs.
fn emit_elt(b: &mut KernelBuilder, op: EltOp, v: &[Reg]) -> Reg {
    match op {
        EltOp::Unary(u) => {
            let x = v[0];
            match u {
                UnaryOp::Neg => b.neg(Ty::F32, x),
                UnaryOp::Exp => exp_acc(b, x),
                UnaryOp::Log => log_acc(b, x),
                UnaryOp::Sqrt => b.sqrt(x),
                UnaryOp::Rsqrt => {
                    let s = b.sqrt(x);
                    b.rcp(s)
                }
                UnaryOp::Recip => b.rcp(x),
                UnaryOp::Erf => erf_acc(b, x),
                UnaryOp::Tanh => tanh_acc(b, x),
                UnaryOp::Sigmoid => sigmoid_acc(b, x),
            }
        }
        EltOp::Binary(o) => {
            let (x, y) = (v[0], v[1]);
            match o {
                BinaryOp::Add => add_rn(b, x, y),
                BinaryOp::Sub => sub_rn(b, x, y),
                BinaryOp::Mul => mul_rn(b, x, y),
                BinaryOp::Div => b.div(Ty::F32, x, y),
                // max.f32 returns the non-NaN operand, like f64::max.
                BinaryOp::Max => b.max(Ty::F32, x, y),
                BinaryOp::Ge => {
                    let p = b.setp(Cmp::Ge, Ty::F32, x, y);
                    b.selp(Ty::F32, 1.0f32, 0.0f32, p)
                }
            }
        }
        EltOp::Where => {
            // cond != 0 on the bits: ±0 is false, NaN is true (an ordered
            // setp.ne would call NaN false).
            let m = b.and(Ty::B32, v[0], 0x7fff_ffffi64);
            let p = b.setp(Cmp::Ne, Ty::U32, m, 0u32);
            b.selp(Ty::F32, v[1], v[2], p)
        }
        EltOp::Gelu => b.gelu(v[0]),
        EltOp::Silu => {
            let s = sigmoid_acc(b, v[0]);
            mul_rn(b, v[0], s)
        }
    }
}

impl KernelSpec for EltwiseSpec {
    fn name(&self) -> String {
        format!("elt_{}_r{}_{}", self.op.tag(), self.shape.len(), spec_hash(self))
    }

    fn build(&self) -> Kernel {
        self.validate().expect("EltwiseSpec");
        let st: Vec<&[usize]> = self.strides.iter().map(|s| &s[..]).collect();
        // The output is contiguous, so its offset is the linear index itself
        // and needs no stride list here.
        let (dims, st) = coalesce(&self.shape, &st);
        let mut b = new_kernel(self.name());
        let ins: Vec<Reg> = (0..self.op.arity()).map(|k| b.ptr_param(&format!("in{k}"))).collect();
        let out = b.ptr_param("out");
        let end = b.label("end");
        let idx = thread_index(&mut b, self.numel(), &end);
        let offs = emit_offsets(&mut b, idx, &dims, &st);
        let vals: Vec<Reg> = ins
            .iter()
            .zip(&offs)
            .map(|(&p, &o)| {
                let a = elem_addr(&mut b, p, o, 4);
                b.ld(Space::Global, Ty::F32, a)
            })
            .collect();
        let r = emit_elt(&mut b, self.op, &vals);
        let oa = b.index_addr(out, idx, 4);
        b.st(Space::Global, Ty::F32, Addr::reg(oa, 0), r);
        b.place(&end);
        b.ret();
        b.finish()
    }

    fn launch(&self) -> Launch {
        grid_for(self.numel())
    }

    fn cost(&self) -> Cost {
        let n = self.numel() as u64;
        // Each input is read once per distinct element (broadcast dims once).
        let reads: u64 = self
            .strides
            .iter()
            .map(|s| self.shape.iter().zip(s).filter(|(_, &st)| st != 0).map(|(&d, _)| d as u64).product::<u64>())
            .sum();
        Cost { flops: n * self.op.flops(), bytes: 4 * (reads + n) }
    }
}

// ---- 3. gather ---------------------------------------------------------------

/// `out[t, :] = table[ids[t], :]`: table `[vocab, cols]` (f32 or bf16), ids
/// i32 `[rows]`, out f32 `[rows, cols]`. An id outside `0..vocab` gives a
/// row of NaN and reads nothing. Params `table, ids, out`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GatherSpec {
    pub rows: usize,
    pub cols: usize,
    pub vocab: usize,
    pub table: DType,
}

impl GatherSpec {
    pub fn validate(&self) -> Result<(), GenericError> {
        const S: &str = "gather";
        nonzero(S, &[self.rows, self.cols, self.vocab])?;
        if !matches!(self.table, DType::F32 | DType::BF16) {
            return Err(GenericError::DType { spec: S, what: "table", dtype: self.table });
        }
        count(S, "vocab·cols", &[self.vocab, self.cols])?;
        count(S, "rows·cols", &[self.rows, self.cols])?;
        Ok(())
    }

    /// Reference with the device's semantics (a bad id gives a NaN row; the
    /// interpreter would return an error instead).
    pub fn run_ref(&self, table: Elems, ids: &[i32], out: &mut [f32]) -> Result<(), GenericError> {
        self.validate()?;
        if table.dtype() != self.table {
            return Err(GenericError::DType { spec: "gather", what: "table (given)", dtype: table.dtype() });
        }
        let (v, h) = (self.vocab, self.cols);
        exactly("table", v * h, table.len())?;
        exactly("ids", self.rows, ids.len())?;
        exactly("out", self.rows * h, out.len())?;
        for (t, &id) in ids.iter().enumerate() {
            for c in 0..h {
                out[t * h + c] = if id >= 0 && (id as usize) < v { table.get(id as usize * h + c) } else { f32::NAN };
            }
        }
        Ok(())
    }

    pub fn param_names(&self) -> Vec<&'static str> {
        vec!["table", "ids", "out"]
    }
}

impl KernelSpec for GatherSpec {
    fn name(&self) -> String {
        format!("gather_t{}_h{}_v{}_{}", self.rows, self.cols, self.vocab, dtype_tag(self.table))
    }

    fn build(&self) -> Kernel {
        self.validate().expect("GatherSpec");
        let h = self.cols;
        let mut b = new_kernel(self.name());
        let table = b.ptr_param("table");
        let ids = b.ptr_param("ids");
        let out = b.ptr_param("out");
        let end = b.label("end");
        let idx = thread_index(&mut b, self.rows * h, &end);
        let (t, c) = divmod(&mut b, idx, h);
        let ia = b.index_addr(ids, t, 4);
        let id = b.ld(Space::GlobalNc, Ty::S32, Addr::reg(ia, 0));
        // Unsigned: a negative id is ≥ 2^31 > vocab.
        let bad = b.setp(Cmp::Ge, Ty::U32, id, self.vocab as u32);
        let v = b.mov(Ty::F32, Operand::F32(f32::NAN));
        let dtype = self.table;
        b.if_then(bad, true, |b| {
            let off = b.mad(Ty::U32, id, h as u32, c);
            let a = b.index_addr(table, off, dtype.size() as u32);
            let x = load_f32(b, Space::GlobalNc, dtype, Addr::reg(a, 0));
            b.assign(Ty::F32, v, x);
        });
        let oa = b.index_addr(out, idx, 4);
        b.st(Space::Global, Ty::F32, Addr::reg(oa, 0), v);
        b.place(&end);
        b.ret();
        b.finish()
    }

    fn launch(&self) -> Launch {
        grid_for(self.rows * self.cols)
    }

    fn cost(&self) -> Cost {
        let (t, h) = (self.rows as u64, self.cols as u64);
        Cost { flops: 0, bytes: 4 * t + t * h * (self.table.size() as u64 + 4) }
    }
}

// ---- 4. scatter rows -----------------------------------------------------------

/// In place: `out[rows[i], :] = src[i, :]` for `i < rows` (src f32 `[rows,
/// cols]`, row indices i32 `[rows]`, out f32 `[dst_rows, cols]` already
/// holding the destination tensor); an index outside `0..dst_rows` is
/// skipped, which is how `qvc_ir::NO_ROW` (-1, the unused tail of a
/// program's `image_rows`) writes nothing. Params `src, rows, out`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ScatterRowsSpec {
    pub rows: usize,
    pub cols: usize,
    pub dst_rows: usize,
}

impl ScatterRowsSpec {
    pub fn validate(&self) -> Result<(), GenericError> {
        const S: &str = "scatter_rows";
        nonzero(S, &[self.rows, self.cols, self.dst_rows])?;
        count(S, "rows·cols", &[self.rows, self.cols])?;
        count(S, "dst_rows·cols", &[self.dst_rows, self.cols])?;
        Ok(())
    }

    /// Reference: rows applied in order (a repeated index: the last wins),
    /// bad indices skipped.
    pub fn run_ref(&self, src: &[f32], rows: &[i32], out: &mut [f32]) -> Result<(), GenericError> {
        self.validate()?;
        let h = self.cols;
        exactly("src", self.rows * h, src.len())?;
        exactly("rows", self.rows, rows.len())?;
        exactly("out", self.dst_rows * h, out.len())?;
        for (i, &r) in rows.iter().enumerate() {
            if r >= 0 && (r as usize) < self.dst_rows {
                let r = r as usize;
                out[r * h..(r + 1) * h].copy_from_slice(&src[i * h..(i + 1) * h]);
            }
        }
        Ok(())
    }

    pub fn param_names(&self) -> Vec<&'static str> {
        vec!["src", "rows", "out"]
    }
}

impl KernelSpec for ScatterRowsSpec {
    fn name(&self) -> String {
        format!("scatter_rows_r{}_h{}_t{}", self.rows, self.cols, self.dst_rows)
    }

    fn build(&self) -> Kernel {
        self.validate().expect("ScatterRowsSpec");
        let h = self.cols;
        let mut b = new_kernel(self.name());
        let src = b.ptr_param("src");
        let rows = b.ptr_param("rows");
        let out = b.ptr_param("out");
        let end = b.label("end");
        let idx = thread_index(&mut b, self.rows * h, &end);
        let (i, c) = divmod(&mut b, idx, h);
        let ra = b.index_addr(rows, i, 4);
        let r = b.ld(Space::GlobalNc, Ty::S32, Addr::reg(ra, 0));
        let ok = b.setp(Cmp::Lt, Ty::U32, r, self.dst_rows as u32);
        b.if_then(ok, false, |b| {
            let sa = b.index_addr(src, idx, 4);
            let v = b.ld(Space::GlobalNc, Ty::B32, Addr::reg(sa, 0));
            let off = b.mad(Ty::U32, r, h as u32, c);
            let oa = b.index_addr(out, off, 4);
            b.st(Space::Global, Ty::B32, Addr::reg(oa, 0), v);
        });
        b.place(&end);
        b.ret();
        b.finish()
    }

    fn launch(&self) -> Launch {
        grid_for(self.rows * self.cols)
    }

    fn cost(&self) -> Cost {
        let (r, h) = (self.rows as u64, self.cols as u64);
        Cost { flops: 0, bytes: 4 * r + 8 * r * h }
    }
}

// ---- 5. matmul -----------------------------------------------------------------

/// `out[bt, i, j] = Σ_p a[bt, i, p]·b[bt, p, j]`, out f32 contiguous `[batch,
/// m, n]`; a is f32 at `bt·a_strides[0] + i·a_strides[1] + p·a_strides[2]`,
/// b (f32 or bf16) at `bt·b_strides[0] + p·b_strides[1] + j·b_strides[2]`
/// (a transposed b is swapped strides; batch stride 0 shares b). One thread
/// per output, f32 fma over p ascending. Params `a, b, out`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MatMulSpec {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a_strides: [usize; 3],
    pub b_strides: [usize; 3],
    pub b: DType,
}

impl MatMulSpec {
    /// Contiguous row-major a `[batch, m, k]` and b `[batch, k, n]` (or `[n,
    /// k]` when `transpose_b`), b shared across the batch when `shared_b`.
    pub fn contiguous(batch: usize, m: usize, n: usize, k: usize, transpose_b: bool, shared_b: bool, b: DType) -> Self {
        let bb = if shared_b { 0 } else { k * n };
        let b_strides = if transpose_b { [bb, 1, k] } else { [bb, n, 1] };
        MatMulSpec { batch, m, n, k, a_strides: [m * k, k, 1], b_strides, b }
    }

    pub fn validate(&self) -> Result<(), GenericError> {
        const S: &str = "matmul";
        nonzero(S, &[self.batch, self.m, self.n, self.k])?;
        if !matches!(self.b, DType::F32 | DType::BF16) {
            return Err(GenericError::DType { spec: S, what: "b", dtype: self.b });
        }
        count(S, "out", &[self.batch, self.m, self.n])?;
        max_offset(S, "a_strides", &[self.batch, self.m, self.k], &self.a_strides)?;
        max_offset(S, "b_strides", &[self.batch, self.k, self.n], &self.b_strides)?;
        Ok(())
    }

    pub fn a_len(&self) -> usize {
        span(&[self.batch, self.m, self.k], &self.a_strides)
    }
    pub fn b_len(&self) -> usize {
        span(&[self.batch, self.k, self.n], &self.b_strides)
    }

    /// Reference, f64 accumulation as the interpreter.
    pub fn run_ref(&self, a: &[f32], b: Elems, out: &mut [f32]) -> Result<(), GenericError> {
        self.validate()?;
        if b.dtype() != self.b {
            return Err(GenericError::DType { spec: "matmul", what: "b (given)", dtype: b.dtype() });
        }
        at_least("a", self.a_len(), a.len())?;
        at_least("b", self.b_len(), b.len())?;
        exactly("out", self.batch * self.m * self.n, out.len())?;
        let ([a0, a1, a2], [b0, b1, b2]) = (self.a_strides, self.b_strides);
        for bt in 0..self.batch {
            for i in 0..self.m {
                for j in 0..self.n {
                    let acc: f64 = (0..self.k)
                        .map(|p| a[bt * a0 + i * a1 + p * a2] as f64 * b.get(bt * b0 + p * b1 + j * b2) as f64)
                        .sum();
                    out[(bt * self.m + i) * self.n + j] = acc as f32;
                }
            }
        }
        Ok(())
    }

    pub fn param_names(&self) -> Vec<&'static str> {
        vec!["a", "b", "out"]
    }
}

impl KernelSpec for MatMulSpec {
    fn name(&self) -> String {
        format!("matmul_b{}_m{}_n{}_k{}_{}_{}", self.batch, self.m, self.n, self.k, dtype_tag(self.b), spec_hash(self))
    }

    fn build(&self) -> Kernel {
        self.validate().expect("MatMulSpec");
        let ([a0, a1, a2], [b0, b1, b2]) = (self.a_strides, self.b_strides);
        let bsz = self.b.size();
        let mut bd = new_kernel(self.name());
        let b = &mut bd;
        let a_p = b.ptr_param("a");
        let b_p = b.ptr_param("b");
        let out = b.ptr_param("out");
        let end = b.label("end");
        let idx = thread_index(b, self.batch * self.m * self.n, &end);
        let offs = emit_offsets(b, idx, &[self.batch, self.m, self.n], &[vec![a0, a1, 0], vec![b0, 0, b2]]);
        // Walk p with 64-bit pointers: a advances a2 elements, b b1.
        let pa = match offs[0] {
            Some(o) => b.index_addr(a_p, o, 4),
            None => b.mov(Ty::U64, a_p),
        };
        let pb = match offs[1] {
            Some(o) => b.index_addr(b_p, o, bsz as u32),
            None => b.mov(Ty::U64, b_p),
        };
        let acc = b.mov(Ty::F32, 0.0f32);
        let dtype = self.b;
        b.for_range(0u32, self.k as u32, 1, |b, _| {
            let x = b.ld(Space::GlobalNc, Ty::F32, Addr::reg(pa, 0));
            let y = load_f32(b, Space::GlobalNc, dtype, Addr::reg(pb, 0));
            b.fma_into(acc, x, y, acc);
            b.bin_into("add", Ty::U64, pa, pa, (a2 * 4) as i64);
            b.bin_into("add", Ty::U64, pb, pb, (b1 * bsz) as i64);
        });
        let oa = b.index_addr(out, idx, 4);
        b.st(Space::Global, Ty::F32, Addr::reg(oa, 0), acc);
        b.place(&end);
        b.ret();
        bd.finish()
    }

    fn launch(&self) -> Launch {
        grid_for(self.batch * self.m * self.n)
    }

    fn cost(&self) -> Cost {
        let (bt, m, n, k) = (self.batch as u64, self.m as u64, self.n as u64, self.k as u64);
        let b_batches = if self.b_strides[0] == 0 { 1 } else { bt };
        let a_batches = if self.a_strides[0] == 0 { 1 } else { bt };
        let bytes = 4 * a_batches * m * k + self.b.size() as u64 * b_batches * k * n + 4 * bt * m * n;
        Cost { flops: 2 * bt * m * n * k, bytes }
    }
}

// ---- 6. reduce -----------------------------------------------------------------

/// Reduction of a contiguous f32 `[outer, len, inner]` over `len` into
/// `[outer, inner]`: Sum, Max (NaN ignored, all-NaN gives −inf) or Mean
/// (sum / len). One thread per output, f32, sequential. Params `x, out`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReduceSpec {
    pub outer: usize,
    pub len: usize,
    pub inner: usize,
    pub op: ReduceOp,
}

impl ReduceSpec {
    pub fn validate(&self) -> Result<(), GenericError> {
        const S: &str = "reduce";
        nonzero(S, &[self.outer, self.len, self.inner])?;
        count(S, "x", &[self.outer, self.len, self.inner])?;
        Ok(())
    }

    /// Reference, f64 accumulation as the interpreter.
    pub fn run_ref(&self, x: &[f32], out: &mut [f32]) -> Result<(), GenericError> {
        self.validate()?;
        let (len, inner) = (self.len, self.inner);
        exactly("x", self.outer * len * inner, x.len())?;
        exactly("out", self.outer * inner, out.len())?;
        for o in 0..self.outer {
            for i in 0..inner {
                let it = (0..len).map(|k| x[(o * len + k) * inner + i] as f64);
                out[o * inner + i] = match self.op {
                    ReduceOp::Sum => it.sum::<f64>(),
                    ReduceOp::Mean => it.sum::<f64>() / len as f64,
                    ReduceOp::Max => it.fold(f64::NEG_INFINITY, f64::max),
                } as f32;
            }
        }
        Ok(())
    }

    pub fn param_names(&self) -> Vec<&'static str> {
        vec!["x", "out"]
    }
}

impl KernelSpec for ReduceSpec {
    fn name(&self) -> String {
        let op = format!("{:?}", self.op).to_lowercase();
        format!("reduce_{op}_o{}_l{}_i{}", self.outer, self.len, self.inner)
    }

    fn build(&self) -> Kernel {
        self.validate().expect("ReduceSpec");
        let (len, inner) = (self.len, self.inner);
        let mut b = new_kernel(self.name());
        let x = b.ptr_param("x");
        let out = b.ptr_param("out");
        let end = b.label("end");
        let idx = thread_index(&mut b, self.outer * inner, &end);
        let (o, i) = divmod(&mut b, idx, inner);
        let base = b.mad(Ty::U32, o, (len * inner) as u32, i);
        let p = b.index_addr(x, base, 4);
        let (op, init) = match self.op {
            ReduceOp::Max => ("max", f32::NEG_INFINITY),
            ReduceOp::Sum | ReduceOp::Mean => ("add", 0.0),
        };
        let acc = b.mov(Ty::F32, init);
        b.for_range(0u32, len as u32, 1, |b, _| {
            let v = b.ld(Space::GlobalNc, Ty::F32, Addr::reg(p, 0));
            b.bin_into(op, Ty::F32, acc, acc, v);
            b.bin_into("add", Ty::U64, p, p, (inner * 4) as i64);
        });
        let r = if self.op == ReduceOp::Mean { b.div(Ty::F32, acc, len as f32) } else { acc };
        let oa = b.index_addr(out, idx, 4);
        b.st(Space::Global, Ty::F32, Addr::reg(oa, 0), r);
        b.place(&end);
        b.ret();
        b.finish()
    }

    fn launch(&self) -> Launch {
        grid_for(self.outer * self.inner)
    }

    fn cost(&self) -> Cost {
        let n_out = (self.outer * self.inner) as u64;
        let n_in = n_out * self.len as u64;
        let extra = if self.op == ReduceOp::Mean { n_out } else { 0 };
        Cost { flops: n_in + extra, bytes: 4 * (n_in + n_out) }
    }
}

// ---- 7. rotary -----------------------------------------------------------------

/// The IR's `Rotary`/`QkvRotary` (rotate-half form, as `ir/src/expand.rs`):
/// `out[t, h, i] = x_i·cos[t, i] + r_i·sin[t, i]` with `r_i = −x_{i+d/2}` for
/// `i < d/2` and `x_{i−d/2}` above, times `logn[t]` when `logn`. `x[t, h, i]`
/// is at `t·token_stride + h·head_stride + i` (the host offsets the pointer
/// to the q or k columns of a fused QKV row); `cos`, `sin` f32 `[tokens,
/// head_dim]`; `logn` f32 `[tokens]`; out f32 contiguous `[tokens, heads,
/// head_dim]`. Two roundings of products, one of the sum, one of the logn
/// product: bit-identical to the interpreter. Params `x, cos, sin, [logn], out`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RopeSpec {
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub token_stride: usize,
    pub head_stride: usize,
    pub logn: bool,
    /// Write `out` as bf16 (the f32 result rounded to nearest even: a query
    /// going straight into an attention kernel) instead of f32.
    pub bf16_out: bool,
}

impl RopeSpec {
    pub fn validate(&self) -> Result<(), GenericError> {
        const S: &str = "rope";
        nonzero(S, &[self.tokens, self.heads, self.head_dim])?;
        if !self.head_dim.is_multiple_of(2) {
            return Err(GenericError::OddHeadDim { head_dim: self.head_dim });
        }
        count(S, "out", &[self.tokens, self.heads, self.head_dim])?;
        count(S, "cos", &[self.tokens, self.head_dim])?;
        self.max_x_offset()?;
        Ok(())
    }

    fn max_x_offset(&self) -> Result<usize, GenericError> {
        max_offset(
            "rope",
            "x strides",
            &[self.tokens, self.heads, self.head_dim],
            &[self.token_stride, self.head_stride, 1],
        )
    }

    /// Elements `x` must hold from its (offset) pointer.
    pub fn x_len(&self) -> usize {
        span(&[self.tokens, self.heads, self.head_dim], &[self.token_stride, self.head_stride, 1])
    }

    /// Reference: the expanded graph's f32 operations in the same order.
    pub fn run_ref(
        &self,
        x: &[f32],
        cos: &[f32],
        sin: &[f32],
        logn: Option<&[f32]>,
        out: &mut [f32],
    ) -> Result<(), GenericError> {
        self.validate()?;
        let (t_n, h_n, d) = (self.tokens, self.heads, self.head_dim);
        let half = d / 2;
        at_least("x", self.x_len(), x.len())?;
        exactly("cos", t_n * d, cos.len())?;
        exactly("sin", t_n * d, sin.len())?;
        exactly("out", t_n * h_n * d, out.len())?;
        let logn = match (self.logn, logn) {
            (true, Some(l)) => {
                exactly("logn", t_n, l.len())?;
                Some(l)
            }
            (true, None) => return Err(GenericError::Len { what: "logn", need: t_n, got: 0 }),
            (false, _) => None,
        };
        for t in 0..t_n {
            for h in 0..h_n {
                let row = &x[t * self.token_stride + h * self.head_stride..][..d];
                for i in 0..d {
                    let rot = if i < half { -row[i + half] } else { row[i - half] };
                    let mut r = row[i] * cos[t * d + i] + rot * sin[t * d + i];
                    if let Some(l) = logn {
                        r *= l[t];
                    }
                    out[(t * h_n + h) * d + i] = r;
                }
            }
        }
        Ok(())
    }

    pub fn param_names(&self) -> Vec<&'static str> {
        if self.logn {
            vec!["x", "cos", "sin", "logn", "out"]
        } else {
            vec!["x", "cos", "sin", "out"]
        }
    }
}

impl KernelSpec for RopeSpec {
    fn name(&self) -> String {
        format!(
            "rope_t{}_h{}_d{}_ts{}_hs{}{}{}",
            self.tokens,
            self.heads,
            self.head_dim,
            self.token_stride,
            self.head_stride,
            if self.logn { "_logn" } else { "" },
            if self.bf16_out { "_bf16" } else { "" }
        )
    }

    fn build(&self) -> Kernel {
        self.validate().expect("RopeSpec");
        let (h_n, d) = (self.heads, self.head_dim);
        let half = d / 2;
        let mut b = new_kernel(self.name());
        let x = b.ptr_param("x");
        let cos = b.ptr_param("cos");
        let sin = b.ptr_param("sin");
        let logn = self.logn.then(|| b.ptr_param("logn"));
        let out = b.ptr_param("out");
        let end = b.label("end");
        let idx = thread_index(&mut b, self.tokens * h_n * d, &end);
        let (th, i) = divmod(&mut b, idx, d);
        let (t, h) = divmod(&mut b, th, h_n);
        let row = b.mul(Ty::U32, t, self.token_stride as u32);
        let row = b.mad(Ty::U32, h, self.head_stride as u32, row);
        let xo = b.add(Ty::U32, row, i);
        let lo = b.setp(Cmp::Lt, Ty::U32, i, half as u32);
        // The partner element: i + d/2 below the middle, i − d/2 above (the
        // unselected one may wrap; it is never used).
        let up = b.add(Ty::U32, xo, half as u32);
        let down = b.sub(Ty::U32, xo, half as u32);
        let po = b.selp(Ty::U32, up, down, lo);
        let xa = b.index_addr(x, xo, 4);
        let xv = b.ld(Space::GlobalNc, Ty::F32, Addr::reg(xa, 0));
        let pa = b.index_addr(x, po, 4);
        let pv = b.ld(Space::GlobalNc, Ty::F32, Addr::reg(pa, 0));
        let npv = b.neg(Ty::F32, pv);
        let rot = b.selp(Ty::F32, npv, pv, lo);
        let ci = b.mad(Ty::U32, t, d as u32, i);
        let ca = b.index_addr(cos, ci, 4);
        let c = b.ld(Space::GlobalNc, Ty::F32, Addr::reg(ca, 0));
        let sa = b.index_addr(sin, ci, 4);
        let s = b.ld(Space::GlobalNc, Ty::F32, Addr::reg(sa, 0));
        let xc = mul_rn(&mut b, xv, c);
        let rs = mul_rn(&mut b, rot, s);
        let mut r = add_rn(&mut b, xc, rs);
        if let Some(l) = logn {
            let la = b.index_addr(l, t, 4);
            let lv = b.ld(Space::GlobalNc, Ty::F32, Addr::reg(la, 0));
            r = mul_rn(&mut b, r, lv);
        }
        if self.bf16_out {
            let hv = b.cvt(Ty::BF16, Ty::F32, r);
            let oa = b.index_addr(out, idx, 2);
            b.st(Space::Global, Ty::B16, Addr::reg(oa, 0), hv);
        } else {
            let oa = b.index_addr(out, idx, 4);
            b.st(Space::Global, Ty::F32, Addr::reg(oa, 0), r);
        }
        b.place(&end);
        b.ret();
        b.finish()
    }

    fn launch(&self) -> Launch {
        grid_for(self.tokens * self.heads * self.head_dim)
    }

    fn cost(&self) -> Cost {
        let (t, n) = (self.tokens as u64, (self.tokens * self.heads * self.head_dim) as u64);
        let td = t * self.head_dim as u64;
        let flops = n * (3 + self.logn as u64);
        let bytes = 4 * (2 * n + 2 * td + if self.logn { t } else { 0 });
        Cost { flops, bytes }
    }
}

// ---- 8. KV-cache append ------------------------------------------------------

/// One decode step's new key and value rows into the bf16 caches of each
/// sequence, at the slot and row the device says: for sequence `b`,
/// `k_cache[slots[b]][h, lens[b] − 1, :] = bf16(k[b, h, :])` and the same for
/// `v`, with `k`, `v` f32 `[batch, heads, head_dim]`, `lens` u32 `[batch]`
/// (the key counts decode attention reads next, so the new row is the last
/// one), `slots` u32 `[batch]` (distinct, inside the caches: the caller
/// checks) and each slot's cache `[heads, max_seq, head_dim]`, slot `s` at
/// `cache + s·cache_stride` elements. A length of 0 or above `max_seq`
/// writes nothing. Keys and values in one launch (threads past the keys'
/// count write values).
///
/// Reading the slot and row from device memory (instead of offsetting the
/// pointer on the host) keeps every kernel argument of a decode step fixed
/// whatever slots it runs over, so the step can be captured once as a CUDA
/// graph and replayed. Params `k, v, lens, slots, k_cache, v_cache`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KvAppendSpec {
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub max_seq: usize,
    /// Elements between two sequences' caches (≥ heads·max_seq·head_dim).
    pub cache_stride: usize,
}

impl KvAppendSpec {
    pub fn validate(&self) -> Result<(), GenericError> {
        const S: &str = "kv_append";
        nonzero(S, &[self.batch, self.heads, self.head_dim, self.max_seq])?;
        let per = count(S, "heads·max_seq·head_dim", &[self.heads, self.max_seq, self.head_dim])?;
        at_least("cache_stride", per, self.cache_stride)?;
        // A slot's byte offset is formed as u32 slot × (2·cache_stride) in 64 bits.
        count(S, "2·cache_stride", &[2, self.cache_stride])?;
        count(S, "2·batch·heads·head_dim", &[2, self.batch, self.heads, self.head_dim])?;
        Ok(())
    }

    /// Reference on host slices (each cache holds every slot in `slots`).
    pub fn run_ref(
        &self,
        k: &[f32],
        v: &[f32],
        lens: &[u32],
        slots: &[u32],
        k_cache: &mut [half::bf16],
        v_cache: &mut [half::bf16],
    ) -> Result<(), GenericError> {
        self.validate()?;
        let (h, d) = (self.heads, self.head_dim);
        let top = slots.iter().max().map_or(0, |&s| s as usize);
        let need = top * self.cache_stride + h * self.max_seq * d;
        exactly("lens", self.batch, lens.len())?;
        exactly("slots", self.batch, slots.len())?;
        for (src, cache) in [(k, k_cache), (v, v_cache)] {
            exactly("k / v", self.batch * h * d, src.len())?;
            at_least("cache", need, cache.len())?;
            for (b, (&len, &slot)) in lens.iter().zip(slots).enumerate() {
                if len == 0 || len as usize > self.max_seq {
                    continue;
                }
                let row = len as usize - 1;
                for hh in 0..h {
                    for i in 0..d {
                        cache[slot as usize * self.cache_stride + (hh * self.max_seq + row) * d + i] =
                            half::bf16::from_f32(src[(b * h + hh) * d + i]);
                    }
                }
            }
        }
        Ok(())
    }

    pub fn param_names(&self) -> Vec<&'static str> {
        vec!["k", "v", "lens", "slots", "k_cache", "v_cache"]
    }
}

impl KernelSpec for KvAppendSpec {
    fn name(&self) -> String {
        format!(
            "kv_append_b{}_h{}_d{}_s{}_st{}",
            self.batch, self.heads, self.head_dim, self.max_seq, self.cache_stride
        )
    }

    fn build(&self) -> Kernel {
        self.validate().expect("KvAppendSpec");
        let (h, d) = (self.heads, self.head_dim);
        let n = self.batch * h * d;
        let mut b = new_kernel(self.name());
        let k = b.ptr_param("k");
        let v = b.ptr_param("v");
        let lens = b.ptr_param("lens");
        let slots = b.ptr_param("slots");
        let kc = b.ptr_param("k_cache");
        let vc = b.ptr_param("v_cache");
        let end = b.label("end");
        let t = thread_index(&mut b, 2 * n, &end);
        // Threads 0..n write keys, n..2n values (`is_v`), same element math.
        let is_v = b.setp(Cmp::Ge, Ty::U32, t, n as u32);
        let minus = b.sub(Ty::U32, t, n as u32);
        let idx = b.selp(Ty::U32, minus, t, is_v);
        let src = b.selp(Ty::U64, v, k, is_v);
        let cache = b.selp(Ty::U64, vc, kc, is_v);
        let (bh, i) = divmod(&mut b, idx, d);
        let (seq, hh) = divmod(&mut b, bh, h);
        let la = b.index_addr(lens, seq, 4);
        let len = b.ld(Space::GlobalNc, Ty::U32, Addr::reg(la, 0));
        // row = len − 1 as unsigned: len 0 wraps to 2^32 − 1 ≥ max_seq.
        let row = b.sub(Ty::U32, len, 1u32);
        let bad = b.setp(Cmp::Ge, Ty::U32, row, self.max_seq as u32);
        b.if_then(bad, true, |b| {
            let sa = b.index_addr(src, idx, 4);
            let x = b.ld(Space::GlobalNc, Ty::F32, Addr::reg(sa, 0));
            let hv = b.cvt(Ty::BF16, Ty::F32, x);
            let r = b.mad(Ty::U32, hh, self.max_seq as u32, row);
            let e = b.mad(Ty::U32, r, d as u32, i);
            let sa = b.index_addr(slots, seq, 4);
            let slot = b.ld(Space::GlobalNc, Ty::U32, Addr::reg(sa, 0));
            let soff = b.mul_wide_u32(slot, 2 * self.cache_stride as u32);
            let sbase = b.add(Ty::U64, cache, soff);
            let ca = b.index_addr(sbase, e, 2);
            b.st(Space::Global, Ty::B16, Addr::reg(ca, 0), hv);
        });
        b.place(&end);
        b.ret();
        b.finish()
    }

    fn launch(&self) -> Launch {
        grid_for(2 * self.batch * self.heads * self.head_dim)
    }

    fn cost(&self) -> Cost {
        let n = (self.batch * self.heads * self.head_dim) as u64;
        Cost { flops: 0, bytes: 8 * self.batch as u64 + 2 * n * 6 }
    }
}
