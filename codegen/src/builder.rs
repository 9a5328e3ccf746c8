//! The typed PTX builder: the only place instructions are made.
//!
//! Every method allocates its destination register from the type it is
//! given, so a kernel generator reads like the math it computes:
//!
//! ```
//! use qvc_codegen::{KernelBuilder, Sreg, Ty, Space, Addr};
//! let mut b = KernelBuilder::new("axpy");
//! let x = b.ptr_param("x");
//! let tid = b.special(Sreg::TidX);
//! let off = b.mul_wide_u32(tid, 4);
//! let p = b.add(Ty::U64, x, off);
//! let v = b.ld(Space::Global, Ty::F32, Addr::reg(p, 0));
//! let two = b.mul(Ty::F32, v, 2.0f32);
//! b.st(Space::Global, Ty::F32, Addr::reg(p, 0), two);
//! let k = b.finish();
//! assert!(k.instr_count() > 4);
//! ```
//!
//! Invariant: the builder never emits an instruction whose destination class
//! differs from the class of its result type; bit-size operations take any
//! register of the right width. Math that PTX lacks (exp, erf, GELU, SiLU) is
//! built here from `ex2`/`rcp`/`fma` with the accuracy stated on each method.

use crate::ptx::*;

/// Memory state spaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    Global,
    /// Global, read through the non-coherent (read-only) cache: weights and
    /// inputs a kernel never writes.
    GlobalNc,
    Shared,
    Param,
}

impl Space {
    pub fn name(self) -> &'static str {
        match self {
            Space::Global => "global",
            Space::GlobalNc => "global.nc",
            Space::Shared => "shared",
            Space::Param => "param",
        }
    }
}

/// Comparison operators of `setp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    pub fn name(self) -> &'static str {
        match self {
            Cmp::Eq => "eq",
            Cmp::Ne => "ne",
            Cmp::Lt => "lt",
            Cmp::Le => "le",
            Cmp::Gt => "gt",
            Cmp::Ge => "ge",
        }
    }
}

/// A jump target made by [`KernelBuilder::label`] and placed by
/// [`KernelBuilder::place`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label(pub String);

/// Builds one kernel.
pub struct KernelBuilder {
    k: Kernel,
    labels: u32,
}

const LOG2E: f32 = std::f32::consts::LOG2_E;

impl KernelBuilder {
    pub fn new(name: impl Into<String>) -> Self {
        KernelBuilder {
            k: Kernel {
                name: name.into(),
                params: vec![],
                shared: vec![],
                regs: [0; 6],
                max_threads: None,
                body: vec![],
            },
            labels: 0,
        }
    }

    /// Declares the block size the kernel is written for (`.maxntid`).
    pub fn max_threads(&mut self, n: u32) {
        self.k.max_threads = Some(n);
    }

    pub fn finish(self) -> Kernel {
        self.k
    }

    // ---- registers, params, shared memory ------------------------------

    pub fn reg(&mut self, class: RegClass) -> Reg {
        let n = &mut self.k.regs[class.index()];
        let r = Reg { class, id: *n };
        *n += 1;
        r
    }

    fn reg_for(&mut self, ty: Ty) -> Reg {
        self.reg(ty.class())
    }

    /// Declares a parameter and loads it into a register.
    pub fn param(&mut self, name: &str, ty: Ty) -> Reg {
        let pname = format!("p_{name}");
        self.k.params.push(Param { name: pname.clone(), ty });
        self.ld(Space::Param, ty, Addr::sym(pname, 0))
    }

    /// A global pointer parameter, converted to a global address.
    pub fn ptr_param(&mut self, name: &str) -> Reg {
        let p = self.param(name, Ty::U64);
        let d = self.reg(RegClass::B64);
        self.ins("cvta.to.global.u64", vec![d.into(), p.into()]);
        d
    }

    /// Declares a `.shared` array and returns a 32-bit register holding its
    /// shared-window address (use with [`Space::Shared`]).
    pub fn shared(&mut self, name: &str, bytes: u32, align: u32) -> Reg {
        assert!(bytes > 0, "empty shared array {name}");
        self.k.shared.push(Shared { name: name.to_string(), align, bytes });
        let d = self.reg(RegClass::B32);
        self.ins("mov.u32", vec![d.into(), Operand::Sym(name.to_string())]);
        d
    }

    pub fn special(&mut self, s: Sreg) -> Reg {
        let d = self.reg(RegClass::B32);
        self.ins("mov.u32", vec![d.into(), s.into()]);
        d
    }

    // ---- raw emission ---------------------------------------------------

    /// Emits any instruction. The typed methods below are all built on it.
    pub fn ins(&mut self, op: &str, args: Vec<Operand>) {
        self.k.body.push(Stmt::Instr(Instr { guard: None, op: op.to_string(), args }));
    }

    /// Emits an instruction under a predicate (`@%p` or `@!%p`).
    pub fn ins_if(&mut self, pred: Reg, negate: bool, op: &str, args: Vec<Operand>) {
        debug_assert_eq!(pred.class, RegClass::Pred);
        self.k.body.push(Stmt::Instr(Instr { guard: Some(Guard { pred, negate }), op: op.to_string(), args }));
    }

    pub fn comment(&mut self, c: impl Into<String>) {
        self.k.body.push(Stmt::Comment(c.into()));
    }

    /// `d = op.ty a, b` with a fresh destination.
    pub fn bin(&mut self, op: &str, ty: Ty, a: impl Into<Operand>, c: impl Into<Operand>) -> Reg {
        let d = self.reg_for(ty);
        self.ins(&format!("{op}.{ty}"), vec![d.into(), a.into(), c.into()]);
        d
    }

    /// `d = op.ty a` with a fresh destination.
    pub fn un(&mut self, op: &str, ty: Ty, a: impl Into<Operand>) -> Reg {
        let d = self.reg_for(ty);
        self.ins(&format!("{op}.{ty}"), vec![d.into(), a.into()]);
        d
    }

    // ---- moves and arithmetic -----------------------------------------

    pub fn mov(&mut self, ty: Ty, a: impl Into<Operand>) -> Reg {
        self.un("mov", ty, a)
    }

    /// Overwrites an existing register (loop counters, accumulators).
    pub fn assign(&mut self, ty: Ty, d: Reg, a: impl Into<Operand>) {
        self.ins(&format!("mov.{ty}"), vec![d.into(), a.into()]);
    }

    pub fn add(&mut self, ty: Ty, a: impl Into<Operand>, c: impl Into<Operand>) -> Reg {
        self.bin("add", ty, a, c)
    }
    pub fn sub(&mut self, ty: Ty, a: impl Into<Operand>, c: impl Into<Operand>) -> Reg {
        self.bin("sub", ty, a, c)
    }
    /// Float multiply, or the low half of an integer multiply.
    pub fn mul(&mut self, ty: Ty, a: impl Into<Operand>, c: impl Into<Operand>) -> Reg {
        if is_float(ty) {
            self.bin("mul", ty, a, c)
        } else {
            self.bin("mul.lo", ty, a, c)
        }
    }
    pub fn min(&mut self, ty: Ty, a: impl Into<Operand>, c: impl Into<Operand>) -> Reg {
        self.bin("min", ty, a, c)
    }
    pub fn max(&mut self, ty: Ty, a: impl Into<Operand>, c: impl Into<Operand>) -> Reg {
        self.bin("max", ty, a, c)
    }
    pub fn and(&mut self, ty: Ty, a: impl Into<Operand>, c: impl Into<Operand>) -> Reg {
        self.bin("and", ty, a, c)
    }
    pub fn or(&mut self, ty: Ty, a: impl Into<Operand>, c: impl Into<Operand>) -> Reg {
        self.bin("or", ty, a, c)
    }
    pub fn xor(&mut self, ty: Ty, a: impl Into<Operand>, c: impl Into<Operand>) -> Reg {
        self.bin("xor", ty, a, c)
    }
    pub fn shl(&mut self, ty: Ty, a: impl Into<Operand>, c: impl Into<Operand>) -> Reg {
        self.bin("shl", ty, a, c)
    }
    pub fn shr(&mut self, ty: Ty, a: impl Into<Operand>, c: impl Into<Operand>) -> Reg {
        self.bin("shr", ty, a, c)
    }
    /// Integer division (unsigned or signed by `ty`); f32 division rounds to nearest.
    pub fn div(&mut self, ty: Ty, a: impl Into<Operand>, c: impl Into<Operand>) -> Reg {
        if ty == Ty::F32 || ty == Ty::F64 {
            self.bin("div.rn", ty, a, c)
        } else {
            self.bin("div", ty, a, c)
        }
    }
    pub fn rem(&mut self, ty: Ty, a: impl Into<Operand>, c: impl Into<Operand>) -> Reg {
        self.bin("rem", ty, a, c)
    }
    pub fn neg(&mut self, ty: Ty, a: impl Into<Operand>) -> Reg {
        self.un("neg", ty, a)
    }
    pub fn abs(&mut self, ty: Ty, a: impl Into<Operand>) -> Reg {
        self.un("abs", ty, a)
    }

    /// `a * b + c` (integer: low half).
    pub fn mad(&mut self, ty: Ty, a: impl Into<Operand>, b: impl Into<Operand>, c: impl Into<Operand>) -> Reg {
        let d = self.reg_for(ty);
        let op = if is_float(ty) { format!("fma.rn.{ty}") } else { format!("mad.lo.{ty}") };
        self.ins(&op, vec![d.into(), a.into(), b.into(), c.into()]);
        d
    }

    /// `u64 = u32 * u32` without overflow: the usual byte-offset computation.
    pub fn mul_wide_u32(&mut self, a: impl Into<Operand>, c: impl Into<Operand>) -> Reg {
        let d = self.reg(RegClass::B64);
        self.ins("mul.wide.u32", vec![d.into(), a.into(), c.into()]);
        d
    }

    /// `base + index * scale` as a 64-bit global address.
    pub fn index_addr(&mut self, base: Reg, index: impl Into<Operand>, scale: u32) -> Reg {
        let off = self.mul_wide_u32(index, scale);
        self.add(Ty::U64, base, off)
    }

    /// `fma.rn.f32 d, a, b, c` into an existing accumulator.
    pub fn fma_into(&mut self, d: Reg, a: impl Into<Operand>, b: impl Into<Operand>, c: impl Into<Operand>) {
        self.ins("fma.rn.f32", vec![d.into(), a.into(), b.into(), c.into()]);
    }

    /// `d = op.ty d, a` in place (accumulators).
    pub fn bin_into(&mut self, op: &str, ty: Ty, d: Reg, a: impl Into<Operand>, c: impl Into<Operand>) {
        self.ins(&format!("{op}.{ty}"), vec![d.into(), a.into(), c.into()]);
    }

    // ---- float math ------------------------------------------------------

    /// 2^x, hardware approximation (max rel. error 2^-22).
    pub fn ex2(&mut self, a: impl Into<Operand>) -> Reg {
        self.un("ex2.approx.ftz", Ty::F32, a)
    }
    /// log2(x), hardware approximation.
    pub fn lg2(&mut self, a: impl Into<Operand>) -> Reg {
        self.un("lg2.approx.ftz", Ty::F32, a)
    }
    /// 1/sqrt(x), hardware approximation (max rel. error 2^-22.9).
    pub fn rsqrt(&mut self, a: impl Into<Operand>) -> Reg {
        self.un("rsqrt.approx.ftz", Ty::F32, a)
    }
    /// 1/x rounded to nearest (IEEE).
    pub fn rcp(&mut self, a: impl Into<Operand>) -> Reg {
        self.un("rcp.rn", Ty::F32, a)
    }
    pub fn sqrt(&mut self, a: impl Into<Operand>) -> Reg {
        self.un("sqrt.rn", Ty::F32, a)
    }
    /// e^x = 2^(x·log2 e); relative error about 2e-7 for |x| < 80.
    pub fn exp(&mut self, a: impl Into<Operand>) -> Reg {
        let t = self.mul(Ty::F32, a, LOG2E);
        self.ex2(t)
    }

    /// erf(x) from Abramowitz & Stegun 7.1.26: the formula's error is below
    /// 1.5e-7, and evaluated in f32 the absolute error is below 5e-7 (worst
    /// near 0, where `1 - t·poly·e^(-x²)` cancels; measured 3.8e-7 by the
    /// emulator tests). Built as 1 - t·poly(t)·e^(-x²) with t = 1/(1 + p|x|),
    /// sign restored.
    pub fn erf(&mut self, x: Reg) -> Reg {
        const P: f32 = 0.327_591_1;
        const A: [f32; 5] = [0.254_829_6, -0.284_496_74, 1.421_413_8, -1.453_152_1, 1.061_405_4];
        let ax = self.abs(Ty::F32, x);
        let den = self.mad(Ty::F32, ax, P, 1.0f32);
        let t = self.rcp(den);
        let mut poly = self.mov(Ty::F32, A[4]);
        for &c in A[..4].iter().rev() {
            poly = self.mad(Ty::F32, poly, t, c);
        }
        poly = self.mul(Ty::F32, poly, t);
        let x2 = self.mul(Ty::F32, ax, ax);
        let nx2 = self.neg(Ty::F32, x2);
        let e = self.exp(nx2);
        let pe = self.mul(Ty::F32, poly, e);
        let y = self.sub(Ty::F32, 1.0f32, pe);
        // copysign(y, x): keep the magnitude bits of y and the sign bit of x.
        let mag = self.and(Ty::B32, y, 0x7fff_ffffi64);
        let sign = self.and(Ty::B32, x, 0x8000_0000u32 as i64);
        let r = self.or(Ty::B32, mag, sign);
        let d = self.reg(RegClass::F32);
        self.ins("mov.b32", vec![d.into(), r.into()]);
        d
    }

    /// GELU, erf form: x·½(1 + erf(x/√2)), as ViT-bigG uses; the CPU
    /// kernel's algorithm (`qvc_kernels::act`). `1 + erf(z)` is never formed
    /// by cancellation: below |z| = [`ERF_SPLIT`] it is `1 + z·A(z²)`, above
    /// it `erfc(|z|)` for z < 0 and `2 − erfc(z)` for z > 0, with
    /// `erfc(a) = e^(−a²)·t·H(t)`, `t = 1/(1+a)`. So a very negative input
    /// keeps its small output's relative accuracy (A&S 7.1.26 through
    /// `1 + erf` lost all of it below about −5).
    pub fn gelu(&mut self, x: Reg) -> Reg {
        let z = self.mul(Ty::F32, x, std::f32::consts::FRAC_1_SQRT_2);
        let a = self.abs(Ty::F32, z);
        let z2 = self.mul(Ty::F32, z, z);
        let hs = self.horner(&ERF_SMALL, z2);
        let small = self.mad(Ty::F32, z, hs, 1.0f32);
        let den = self.add(Ty::F32, a, 1.0f32);
        let t = self.rcp(den);
        let hl = self.horner(&ERFC_LARGE, t);
        let na2 = self.mul(Ty::F32, a, a);
        let na2 = self.neg(Ty::F32, na2);
        let e = self.exp(na2);
        let et = self.mul(Ty::F32, e, t);
        let q = self.mul(Ty::F32, et, hl);
        let two_minus_q = self.sub(Ty::F32, 2.0f32, q);
        let neg = self.setp(Cmp::Lt, Ty::F32, z, 0.0f32);
        let large = self.selp(Ty::F32, q, two_minus_q, neg);
        let inside = self.setp(Cmp::Lt, Ty::F32, a, ERF_SPLIT);
        let one_plus_erf = self.selp(Ty::F32, small, large, inside);
        let half = self.mul(Ty::F32, x, 0.5f32);
        self.mul(Ty::F32, half, one_plus_erf)
    }

    /// `c[0]·x^(n−1) + … + c[n−1]` by Horner's rule (highest degree first).
    fn horner(&mut self, c: &[f32], x: Reg) -> Reg {
        let mut s = self.mov(Ty::F32, c[0]);
        for &ci in &c[1..] {
            s = self.mad(Ty::F32, s, x, ci);
        }
        s
    }

    /// SiLU: x / (1 + e^-x).
    pub fn silu(&mut self, x: Reg) -> Reg {
        let n = self.mul(Ty::F32, x, -LOG2E);
        let e = self.ex2(n);
        let den = self.add(Ty::F32, e, 1.0f32);
        let r = self.rcp(den);
        self.mul(Ty::F32, x, r)
    }

    // ---- compare and select ----------------------------------------------

    pub fn setp(&mut self, cmp: Cmp, ty: Ty, a: impl Into<Operand>, c: impl Into<Operand>) -> Reg {
        let d = self.reg(RegClass::Pred);
        // Unsigned compares of signed types and vice versa are the caller's choice of `ty`.
        self.ins(&format!("setp.{}.{ty}", cmp.name()), vec![d.into(), a.into(), c.into()]);
        d
    }

    /// `p ? a : c`.
    pub fn selp(&mut self, ty: Ty, a: impl Into<Operand>, c: impl Into<Operand>, p: Reg) -> Reg {
        let d = self.reg_for(ty);
        self.ins(&format!("selp.{ty}"), vec![d.into(), a.into(), c.into(), p.into()]);
        d
    }

    pub fn and_pred(&mut self, a: Reg, c: Reg) -> Reg {
        self.bin("and", Ty::Pred, a, c)
    }
    pub fn or_pred(&mut self, a: Reg, c: Reg) -> Reg {
        self.bin("or", Ty::Pred, a, c)
    }
    pub fn not_pred(&mut self, a: Reg) -> Reg {
        self.un("not", Ty::Pred, a)
    }

    // ---- conversions -------------------------------------------------------

    /// `cvt` with the rounding PTX requires: round-to-nearest into floats
    /// that lose precision, round-toward-zero from float to integer.
    pub fn cvt(&mut self, to: Ty, from: Ty, a: impl Into<Operand>) -> Reg {
        let d = self.reg_for(to);
        let rnd = match (is_float(to), is_float(from)) {
            (true, true) if to.bytes() < from.bytes() => ".rn",
            (true, false) => ".rn",
            (false, true) => ".rzi",
            _ => "",
        };
        self.ins(&format!("cvt{rnd}.{to}.{from}"), vec![d.into(), a.into()]);
        d
    }

    /// Packs two f32 into bf16x2 (or f16x2): `lo` goes to bits 0..16.
    pub fn pack_half2(&mut self, ty: Ty, lo: Reg, hi: Reg) -> Reg {
        assert!(matches!(ty, Ty::BF16x2 | Ty::F16x2));
        let d = self.reg(RegClass::B32);
        // PTX: cvt.rn.bf16x2.f32 d, a, b puts a in the upper half.
        self.ins(&format!("cvt.rn.{ty}.f32"), vec![d.into(), hi.into(), lo.into()]);
        d
    }

    /// Splits a 32-bit register into its (low, high) 16-bit halves.
    pub fn unpack_b32(&mut self, a: Reg) -> (Reg, Reg) {
        let lo = self.reg(RegClass::B16);
        let hi = self.reg(RegClass::B16);
        self.ins("mov.b32", vec![Operand::Vec(vec![lo, hi]), a.into()]);
        (lo, hi)
    }

    /// Widens a bf16x2 register to two f32: (low, high). bf16 is the top
    /// half of an f32, so this is two bit moves.
    pub fn bf16x2_to_f32(&mut self, a: Reg) -> (Reg, Reg) {
        let lo_bits = self.shl(Ty::B32, a, 16);
        let hi_bits = self.and(Ty::B32, a, 0xffff_0000u32 as i64);
        let lo = self.reg(RegClass::F32);
        let hi = self.reg(RegClass::F32);
        self.ins("mov.b32", vec![lo.into(), lo_bits.into()]);
        self.ins("mov.b32", vec![hi.into(), hi_bits.into()]);
        (lo, hi)
    }

    // ---- memory ---------------------------------------------------------

    pub fn ld(&mut self, space: Space, ty: Ty, addr: Addr) -> Reg {
        let d = self.reg_for(ty);
        self.ins(&format!("ld.{}.{ty}", space.name()), vec![d.into(), addr.into()]);
        d
    }

    /// Vector load of 2 or 4 elements.
    pub fn ld_v(&mut self, space: Space, ty: Ty, n: usize, addr: Addr) -> Vec<Reg> {
        assert!(n == 2 || n == 4);
        let ds: Vec<Reg> = (0..n).map(|_| self.reg_for(ty)).collect();
        self.ins(&format!("ld.{}.v{n}.{ty}", space.name()), vec![ds.clone().into(), addr.into()]);
        ds
    }

    /// Loads into existing registers (predicated loads keep their old value).
    pub fn ld_into(&mut self, space: Space, ty: Ty, dst: &[Reg], addr: Addr) {
        let op = match dst.len() {
            1 => format!("ld.{}.{ty}", space.name()),
            n => format!("ld.{}.v{n}.{ty}", space.name()),
        };
        let d: Operand = if dst.len() == 1 { dst[0].into() } else { dst.to_vec().into() };
        self.ins(&op, vec![d, addr.into()]);
    }

    pub fn st(&mut self, space: Space, ty: Ty, addr: Addr, v: impl Into<Operand>) {
        self.ins(&format!("st.{}.{ty}", space.name()), vec![addr.into(), v.into()]);
    }

    pub fn st_v(&mut self, space: Space, ty: Ty, addr: Addr, vs: &[Reg]) {
        assert!(vs.len() == 2 || vs.len() == 4);
        self.ins(&format!("st.{}.v{}.{ty}", space.name(), vs.len()), vec![addr.into(), vs.to_vec().into()]);
    }

    /// `atom.space.op.ty d, [addr], v`: returns the old value.
    pub fn atom(&mut self, space: Space, op: &str, ty: Ty, addr: Addr, v: impl Into<Operand>) -> Reg {
        let d = self.reg_for(ty);
        self.ins(&format!("atom.{}.{op}.{ty}", space.name()), vec![d.into(), addr.into(), v.into()]);
        d
    }

    /// `cp.async.cg.shared.global [dst], [src], 16, src_bytes`: copies 16
    /// bytes, zero-filling past `src_bytes` (0..=16), which is how ragged
    /// tile edges are loaded without a branch. `src_bytes` may be a register.
    pub fn cp_async16(&mut self, dst: Addr, src: Addr, src_bytes: impl Into<Operand>) {
        self.ins("cp.async.cg.shared.global", vec![dst.into(), src.into(), Operand::Imm(16), src_bytes.into()]);
    }
    pub fn cp_async_commit(&mut self) {
        self.ins("cp.async.commit_group", vec![]);
    }
    /// Waits until at most `n` committed groups are still in flight.
    pub fn cp_async_wait(&mut self, n: u32) {
        self.ins("cp.async.wait_group", vec![Operand::Imm(n as i64)]);
    }

    // ---- synchronisation and warp collectives --------------------------

    pub fn bar_sync(&mut self) {
        self.ins("bar.sync", vec![Operand::Imm(0)]);
    }

    /// `shfl.sync.bfly.b32` over the full warp: the value of lane `lane ^ mask`.
    pub fn shfl_bfly(&mut self, a: Reg, mask: u32) -> Reg {
        let d = self.reg(a.class);
        self.ins(
            "shfl.sync.bfly.b32",
            vec![d.into(), a.into(), Operand::Imm(mask as i64), Operand::Imm(31), Operand::Imm(0xffff_ffff)],
        );
        d
    }

    /// `shfl.sync.idx.b32` over the full warp: the value of lane `src`.
    pub fn shfl_idx(&mut self, a: Reg, src: impl Into<Operand>) -> Reg {
        let d = self.reg(a.class);
        self.ins(
            "shfl.sync.idx.b32",
            vec![d.into(), a.into(), src.into(), Operand::Imm(31), Operand::Imm(0xffff_ffff)],
        );
        d
    }

    /// Butterfly all-reduce of an f32 over the warp (`op` = "add" or "max").
    pub fn warp_reduce_f32(&mut self, op: &str, mut v: Reg) -> Reg {
        for m in [16, 8, 4, 2, 1] {
            let o = self.shfl_bfly(v, m);
            v = self.bin(op, Ty::F32, v, o);
        }
        v
    }

    /// `mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32`: D = A·B + C with
    /// A 16×16 (4 × b32 of packed pairs), B 16×8 (2 × b32), C/D 16×8 f32 (4).
    /// `ab` is [`Ty::BF16`] or [`Ty::F16`]. D may alias C.
    pub fn mma_m16n8k16(&mut self, ab: Ty, d: &[Reg; 4], a: &[Reg; 4], b: &[Reg; 2], c: &[Reg; 4]) {
        assert!(matches!(ab, Ty::BF16 | Ty::F16));
        self.ins(
            &format!("mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32"),
            vec![d.to_vec().into(), a.to_vec().into(), b.to_vec().into(), c.to_vec().into()],
        );
    }

    /// `ldmatrix.sync.aligned.m8n8.x{n}[.trans].shared.b16`: `n` 8×8 tiles of
    /// 16-bit elements; lanes 8i..8i+7 give the row addresses of tile i.
    pub fn ldmatrix(&mut self, n: usize, trans: bool, addr: Addr) -> Vec<Reg> {
        assert!(matches!(n, 1 | 2 | 4));
        let ds: Vec<Reg> = (0..n).map(|_| self.reg(RegClass::B32)).collect();
        let t = if trans { ".trans" } else { "" };
        self.ins(&format!("ldmatrix.sync.aligned.m8n8.x{n}{t}.shared.b16"), vec![ds.clone().into(), addr.into()]);
        ds
    }

    // ---- control flow ------------------------------------------------------

    /// A fresh label (place it with [`place`](Self::place)).
    pub fn label(&mut self, hint: &str) -> Label {
        self.labels += 1;
        Label(format!("$L_{hint}_{}", self.labels))
    }
    pub fn place(&mut self, l: &Label) {
        self.k.body.push(Stmt::Label(l.0.clone()));
    }
    pub fn bra(&mut self, l: &Label) {
        self.ins("bra.uni", vec![Operand::Label(l.0.clone())]);
    }
    /// Branch if `p` (or if not `p` when `negate`).
    pub fn bra_if(&mut self, p: Reg, negate: bool, l: &Label) {
        self.ins_if(p, negate, "bra", vec![Operand::Label(l.0.clone())]);
    }
    pub fn ret(&mut self) {
        self.ins("ret", vec![]);
    }

    /// `for (i = start; i < end; i += step) body(i)` over u32, with a runtime
    /// counter. `end` may be a register or an immediate.
    pub fn for_range(
        &mut self,
        start: impl Into<Operand>,
        end: impl Into<Operand>,
        step: u32,
        body: impl FnOnce(&mut Self, Reg),
    ) {
        let end = end.into();
        let i = self.mov(Ty::U32, start);
        let top = self.label("loop");
        let exit = self.label("loop_end");
        let done = self.setp(Cmp::Ge, Ty::U32, i, end.clone());
        self.bra_if(done, false, &exit);
        self.place(&top);
        body(self, i);
        self.bin_into("add", Ty::U32, i, i, step);
        let more = self.setp(Cmp::Lt, Ty::U32, i, end);
        self.bra_if(more, false, &top);
        self.place(&exit);
    }

    /// `if (p) body` (or `if (!p)` when `negate`).
    pub fn if_then(&mut self, p: Reg, negate: bool, body: impl FnOnce(&mut Self)) {
        let skip = self.label("endif");
        self.bra_if(p, !negate, &skip);
        body(self);
        self.place(&skip);
    }
}

/// Whether `ty` is a float type (for choosing `fma` vs `mad`, rounding modes).
pub fn is_float(ty: Ty) -> bool {
    matches!(ty, Ty::F16 | Ty::F16x2 | Ty::BF16 | Ty::BF16x2 | Ty::F32 | Ty::F64)
}

/// Coefficients (highest degree first) of `erf(x)/x ≈ A(x²)` on `|x| < 0.875`:
/// a Chebyshev fit (mpmath `chebyfit`, degree 7 in x²), fit error 4e-12.
pub const ERF_SMALL: [f32; 8] = [
    -1.068_997_5e-5,
    1.155_924_6e-4,
    -8.517_123_6e-4,
    5.222_876_4e-3,
    -2.686_595_8e-2,
    1.128_379e-1,
    -3.761_263_9e-1,
    std::f32::consts::FRAC_2_SQRT_PI,
];

/// Coefficients (highest degree first) of `H(t) = erfc(x)·exp(x²)/t` with
/// `t = 1/(1+x)`, on `t ∈ [0, 1/1.875]` i.e. `x ∈ [0.875, ∞)`: a Chebyshev fit
/// (mpmath `chebyfit`, degree 11), relative fit error 7e-10. `H` is smooth and
/// tends to `1/√π` as x → ∞, which is why this variable is used.
pub const ERFC_LARGE: [f32; 12] = [
    10.693_609,
    -35.667_027,
    49.637_57,
    -35.260_36,
    11.361_982,
    -0.129_236_7,
    0.073_941_52,
    -0.722_150_9,
    -0.281_290_46,
    0.282_074_3,
    0.564_189_8,
    0.564_189_6,
];

/// Where `erf_f32` switches from the odd polynomial to the erfc form.
pub const ERF_SPLIT: f32 = 0.875;
