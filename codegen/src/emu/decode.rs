//! Decoding: a parsed [`Kernel`] → a flat list of [`DInstr`] the executor
//! runs without string work.
//!
//! Invariants of the output: every register operand is a slot index below
//! `nslots` (the kernel's registers of all classes laid end to end), every
//! branch target is an instruction index, every `.shared` symbol is a byte
//! offset in the block's shared window and every `.param` symbol an offset
//! in the launch's parameter buffer; immediates are pre-converted to the bit
//! pattern the instruction's type reads. Anything outside the supported set
//! is an `Unsupported` error naming the instruction.

use std::collections::HashMap;

use super::{EmuError, EmuErrorKind};
use crate::ptx::*;

/// A source operand: a register slot or immediate bits.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Src {
    R(u32),
    I(u64),
}

/// Numeric type of an ALU instruction (bit types act as unsigned).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NT {
    U16,
    U32,
    U64,
    S16,
    S32,
    S64,
    F32,
    F64,
    Pred,
}

impl NT {
    fn from_ty(t: Ty) -> Option<NT> {
        Some(match t {
            Ty::B16 | Ty::U16 => NT::U16,
            Ty::B32 | Ty::U32 => NT::U32,
            Ty::B64 | Ty::U64 => NT::U64,
            Ty::S16 => NT::S16,
            Ty::S32 => NT::S32,
            Ty::S64 => NT::S64,
            Ty::F32 => NT::F32,
            Ty::F64 => NT::F64,
            Ty::Pred => NT::Pred,
            _ => return None,
        })
    }
    #[inline]
    pub fn bits(self) -> u32 {
        match self {
            NT::U16 | NT::S16 => 16,
            NT::U32 | NT::S32 | NT::F32 => 32,
            NT::U64 | NT::S64 | NT::F64 => 64,
            NT::Pred => 1,
        }
    }
    #[inline]
    pub fn mask(self) -> u64 {
        mask_bits(self.bits())
    }
    #[inline]
    pub fn signed(self) -> bool {
        matches!(self, NT::S16 | NT::S32 | NT::S64)
    }
    pub fn is_float(self) -> bool {
        matches!(self, NT::F32 | NT::F64)
    }
}

#[inline]
pub(crate) fn mask_bits(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BinOp {
    Add,
    Sub,
    Mul,
    MulHi,
    MulWide,
    Div,
    Rem,
    Min,
    Max,
    And,
    Or,
    Xor,
    Shl,
    Shr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UnOp {
    Neg,
    Abs,
    Not,
    Cnot,
    Popc,
    Clz,
    Brev,
    Ex2,
    Lg2,
    Rsqrt,
    Rcp,
    Sqrt,
    Tanh,
    Sin,
    Cos,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MadOp {
    Lo,
    Hi,
    Wide,
    Fma,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Lo,
    Ls,
    Hi,
    Hs,
    Equ,
    Neu,
    Ltu,
    Leu,
    Gtu,
    Geu,
    Num,
    Nan,
}

/// Types `cvt` converts between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CT {
    U8,
    U16,
    U32,
    U64,
    S8,
    S16,
    S32,
    S64,
    F16,
    BF16,
    F32,
    F64,
}

impl CT {
    fn from_ty(t: Ty) -> Option<CT> {
        Some(match t {
            Ty::U8 | Ty::B8 => CT::U8,
            Ty::U16 | Ty::B16 => CT::U16,
            Ty::U32 | Ty::B32 => CT::U32,
            Ty::U64 | Ty::B64 => CT::U64,
            Ty::S8 => CT::S8,
            Ty::S16 => CT::S16,
            Ty::S32 => CT::S32,
            Ty::S64 => CT::S64,
            Ty::F16 => CT::F16,
            Ty::BF16 => CT::BF16,
            Ty::F32 => CT::F32,
            Ty::F64 => CT::F64,
            _ => return None,
        })
    }
    pub fn is_float(self) -> bool {
        matches!(self, CT::F16 | CT::BF16 | CT::F32 | CT::F64)
    }
    pub fn bits(self) -> u32 {
        match self {
            CT::U8 | CT::S8 => 8,
            CT::U16 | CT::S16 | CT::F16 | CT::BF16 => 16,
            CT::U32 | CT::S32 | CT::F32 => 32,
            CT::U64 | CT::S64 | CT::F64 => 64,
        }
    }
    pub fn signed(self) -> bool {
        matches!(self, CT::S8 | CT::S16 | CT::S32 | CT::S64)
    }
}

/// Rounding modifier of `cvt`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rnd {
    /// None given (exact conversions).
    None,
    Rn,
    Rz,
    Rm,
    Rp,
    Rni,
    Rzi,
    Rmi,
    Rpi,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MSpace {
    Global,
    Shared,
    Param,
}

/// A decoded address: optional base register plus a byte offset (symbols
/// already folded into the offset).
#[derive(Clone, Copy, Debug)]
pub(crate) struct DAddr {
    pub base: Option<u32>,
    pub off: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AtomOp {
    Add,
    Min,
    Max,
    Exch,
    Cas,
    And,
    Or,
    Xor,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ShflMode {
    Up,
    Down,
    Bfly,
    Idx,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VoteMode {
    Ballot,
    Any,
    All,
    Uni,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Mov {
        d: u32,
        a: Src,
    },
    MovSreg {
        d: u32,
        s: Sreg,
    },
    /// `mov.b32 {lo, hi}, a` (half = 16) or `mov.b64 {lo, hi}, a` (half = 32).
    Unpack {
        lo: u32,
        hi: u32,
        a: Src,
        half: u32,
    },
    Pack {
        d: u32,
        lo: Src,
        hi: Src,
        half: u32,
    },
    Bin {
        op: BinOp,
        t: NT,
        ftz: bool,
        sat: bool,
        d: u32,
        a: Src,
        b: Src,
    },
    Un {
        op: UnOp,
        t: NT,
        ftz: bool,
        d: u32,
        a: Src,
    },
    Mad {
        op: MadOp,
        t: NT,
        ftz: bool,
        sat: bool,
        d: u32,
        a: Src,
        b: Src,
        c: Src,
    },
    Setp {
        cmp: CmpOp,
        t: NT,
        ftz: bool,
        d: u32,
        a: Src,
        b: Src,
    },
    Selp {
        d: u32,
        a: Src,
        b: Src,
        p: Src,
    },
    Cvt {
        to: CT,
        from: CT,
        rnd: Rnd,
        ftz: bool,
        sat: bool,
        dmask: u64,
        d: u32,
        a: Src,
    },
    /// `cvt.rn.{bf16x2,f16x2}.f32 d, hi, lo`.
    CvtPack {
        bf16: bool,
        d: u32,
        hi: Src,
        lo: Src,
    },
    /// `n` elements of `width` bytes; `sext` sign-extends narrow loads into
    /// the destination width `dmask`.
    Ld {
        space: MSpace,
        n: u8,
        width: u8,
        sext: bool,
        dmask: u64,
        d: [u32; 4],
        addr: DAddr,
    },
    St {
        space: MSpace,
        n: u8,
        width: u8,
        v: [Src; 4],
        addr: DAddr,
    },
    Atom {
        space: MSpace,
        op: AtomOp,
        t: NT,
        d: Option<u32>,
        addr: DAddr,
        b: Src,
        c: Src,
    },
    CpAsync {
        size: u32,
        dst: DAddr,
        src: DAddr,
        src_size: Src,
    },
    /// `cp.async.commit_group`: closes the thread's open group of copies.
    CpCommit,
    /// `cp.async.wait_group n` (`wait_all` is a commit then `n = 0`):
    /// completes every committed group but the `n` most recent.
    CpWait {
        n: u32,
        commit: bool,
    },
    Nop,
    Bar {
        id: u32,
    },
    Shfl {
        mode: ShflMode,
        d: u32,
        a: Src,
        b: Src,
        c: Src,
        mask: Src,
    },
    Vote {
        mode: VoteMode,
        d: u32,
        p: Src,
        mask: Src,
    },
    Mma {
        bf16: bool,
        d: [u32; 4],
        a: [u32; 4],
        b: [u32; 2],
        c: [u32; 4],
    },
    Ldmatrix {
        n: u8,
        trans: bool,
        d: [u32; 4],
        addr: DAddr,
    },
    Bra {
        target: u32,
    },
    Exit,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct DInstr {
    /// `(predicate slot, negate)`.
    pub guard: Option<(u32, bool)>,
    pub op: Op,
}

pub(crate) struct Decoded {
    pub code: Vec<DInstr>,
    /// `code[pc]` came from `kernel.body[body_index[pc]]`.
    pub body_index: Vec<usize>,
    pub nslots: usize,
    pub shared_bytes: usize,
    /// Byte offset of each param in the parameter buffer.
    pub param_offsets: Vec<usize>,
    pub param_bytes: usize,
}

struct Ctx<'a> {
    class_base: [u32; 6],
    shared: HashMap<&'a str, u64>,
    params: HashMap<&'a str, usize>,
    labels: HashMap<&'a str, u32>,
}

type R<T> = Result<T, String>;

fn unsup<T>(m: impl Into<String>) -> R<T> {
    Err(m.into())
}

impl Ctx<'_> {
    fn slot(&self, r: Reg) -> u32 {
        self.class_base[r.class.index()] + r.id
    }

    fn reg(&self, o: &Operand) -> R<u32> {
        match o {
            Operand::Reg(r) => Ok(self.slot(*r)),
            _ => unsup(format!("operand `{o}` must be a register")),
        }
    }

    /// A source read as type `t`: immediates converted to `t`'s bits.
    fn src(&self, o: &Operand, t: NT) -> R<Src> {
        Ok(match o {
            Operand::Reg(r) => Src::R(self.slot(*r)),
            Operand::Imm(v) => Src::I(match t {
                NT::F32 => (*v as f32).to_bits() as u64,
                NT::F64 => (*v as f64).to_bits(),
                NT::Pred => (*v != 0) as u64,
                _ => (*v as u64) & t.mask(),
            }),
            Operand::F32(f) => Src::I(match t {
                NT::F64 => (*f as f64).to_bits(),
                NT::F32 | NT::U32 | NT::S32 => f.to_bits() as u64,
                _ => return unsup(format!("f32 immediate `{o}` for a {}-bit operand", t.bits())),
            }),
            Operand::Sym(s) => match self.shared.get(s.as_str()) {
                Some(&off) => Src::I(off),
                None => return unsup(format!("symbol `{s}` is not a .shared array")),
            },
            _ => return unsup(format!("operand `{o}` cannot be a source here")),
        })
    }

    fn addr(&self, o: &Operand, space: MSpace) -> R<DAddr> {
        let Operand::Addr(a) = o else { return unsup(format!("operand `{o}` must be an address")) };
        Ok(match &a.base {
            AddrBase::Reg(r) => {
                if space == MSpace::Param {
                    return unsup("ld.param through a register");
                }
                if space == MSpace::Global && r.class != RegClass::B64 {
                    return unsup(format!("global address in 32-bit register `{r}`"));
                }
                DAddr { base: Some(self.slot(*r)), off: a.offset }
            }
            AddrBase::Sym(s) => {
                let off = match space {
                    MSpace::Shared => self.shared.get(s.as_str()).map(|&o| o as i64),
                    MSpace::Param => self.params.get(s.as_str()).map(|&o| o as i64),
                    MSpace::Global => None,
                };
                match off {
                    Some(o) => DAddr { base: None, off: o + a.offset },
                    None => return unsup(format!("symbol `{s}` is not a {space:?} variable")),
                }
            }
        })
    }

    fn vec_regs<const N: usize>(&self, o: &Operand) -> R<[u32; N]> {
        match o {
            Operand::Vec(rs) if rs.len() == N => {
                let mut out = [0; N];
                for (d, r) in out.iter_mut().zip(rs) {
                    *d = self.slot(*r);
                }
                Ok(out)
            }
            _ => unsup(format!("operand `{o}` must be a vector of {N} registers")),
        }
    }
}

fn reg_mask(r: &Operand) -> u64 {
    match r {
        Operand::Reg(r) => match r.class {
            RegClass::Pred => 1,
            RegClass::B16 => 0xffff,
            RegClass::B32 | RegClass::F32 => 0xffff_ffff,
            RegClass::B64 | RegClass::F64 => u64::MAX,
        },
        _ => u64::MAX,
    }
}

/// Splits an opcode into its parts, dropping modifiers that change nothing
/// in a sequential emulator (cache hints, memory-order and scope
/// qualifiers, `.aligned`, `.uni` on branches).
fn parts(op: &str) -> Vec<&str> {
    op.split('.')
        .filter(|p| {
            !matches!(
                *p,
                "ca" | "cg"
                    | "cs"
                    | "lu"
                    | "cv"
                    | "wb"
                    | "wt"
                    | "relaxed"
                    | "acquire"
                    | "release"
                    | "acq_rel"
                    | "weak"
                    | "volatile"
                    | "cta"
                    | "gpu"
                    | "sys"
                    | "aligned"
            ) && !p.starts_with("L1::")
                && !p.starts_with("L2::")
        })
        .collect()
}

fn ty_of(s: &str) -> R<Ty> {
    Ty::parse(s).ok_or_else(|| format!("unknown type `.{s}`"))
}

fn nt_of(s: &str) -> R<NT> {
    NT::from_ty(ty_of(s)?).ok_or_else(|| format!("type `.{s}` not supported for this instruction"))
}

fn space_of(s: &str) -> R<MSpace> {
    match s {
        "global" => Ok(MSpace::Global),
        "shared" => Ok(MSpace::Shared),
        "param" => Ok(MSpace::Param),
        _ => unsup(format!("state space `.{s}`")),
    }
}

fn nargs(i: &Instr, n: usize) -> R<()> {
    if i.args.len() == n {
        Ok(())
    } else {
        unsup(format!("`{}` takes {n} operands, got {}", i.op, i.args.len()))
    }
}

/// Decodes `k`. `Err` carries the pc and a message for `Unsupported`.
pub(crate) fn decode(k: &Kernel) -> Result<Decoded, EmuError> {
    let mut class_base = [0u32; 6];
    let mut nslots = 0u32;
    for c in RegClass::ALL {
        class_base[c.index()] = nslots;
        nslots += k.regs[c.index()];
    }
    let mut shared = HashMap::new();
    let mut off = 0u64;
    for s in &k.shared {
        let a = s.align.max(1) as u64;
        off = off.div_ceil(a) * a;
        shared.insert(s.name.as_str(), off);
        off += s.bytes as u64;
    }
    let shared_bytes = off as usize;
    let mut params = HashMap::new();
    let mut param_offsets = Vec::new();
    let mut poff = 0usize;
    for p in &k.params {
        let sz = p.ty.bytes();
        poff = poff.div_ceil(sz) * sz;
        params.insert(p.name.as_str(), poff);
        param_offsets.push(poff);
        poff += sz;
    }
    let mut labels = HashMap::new();
    let mut body_index = Vec::new();
    for (bi, s) in k.body.iter().enumerate() {
        match s {
            Stmt::Label(l) => {
                labels.insert(l.as_str(), body_index.len() as u32);
            }
            Stmt::Instr(_) => body_index.push(bi),
            Stmt::Comment(_) => {}
        }
    }
    let cx = Ctx { class_base, shared, params, labels };
    let mut code = Vec::with_capacity(body_index.len());
    for (pc, &bi) in body_index.iter().enumerate() {
        let Stmt::Instr(ins) = &k.body[bi] else { unreachable!() };
        let op = decode_instr(&cx, ins).map_err(|m| {
            let mut e = EmuError::new(&k.name, EmuErrorKind::Unsupported(m), "");
            e.pc = Some(pc);
            e.instr = Some(ins.to_string());
            e
        })?;
        let guard = ins.guard.map(|g| (cx.slot(g.pred), g.negate));
        code.push(DInstr { guard, op });
    }
    Ok(Decoded { code, body_index, nslots: nslots as usize, shared_bytes, param_offsets, param_bytes: poff })
}

fn decode_instr(cx: &Ctx, i: &Instr) -> R<Op> {
    let p = parts(&i.op);
    let a = &i.args;
    match p[0] {
        "mov" => decode_mov(cx, i, &p),
        "cvta" => {
            // Generic addresses are global addresses in this model.
            nargs(i, 2)?;
            match p[1..] {
                ["to", "global", "u64"] | ["global", "u64"] => {
                    Ok(Op::Mov { d: cx.reg(&a[0])?, a: cx.src(&a[1], NT::U64)? })
                }
                _ => unsup(format!("`{}` (only cvta.to.global.u64)", i.op)),
            }
        }
        "add" | "sub" | "mul" | "div" | "rem" | "min" | "max" | "and" | "or" | "xor" | "shl" | "shr" => {
            decode_bin(cx, i, &p)
        }
        "neg" | "abs" | "not" | "cnot" | "popc" | "clz" | "brev" | "ex2" | "lg2" | "rsqrt" | "rcp" | "sqrt"
        | "tanh" | "sin" | "cos" => decode_un(cx, i, &p),
        "mad" | "fma" => {
            nargs(i, 4)?;
            let t = nt_of(p[p.len() - 1])?;
            let mut op = None;
            let (mut ftz, mut sat) = (false, false);
            for m in &p[1..p.len() - 1] {
                match *m {
                    "lo" if !t.is_float() => op = Some(MadOp::Lo),
                    "hi" if !t.is_float() => op = Some(MadOp::Hi),
                    "wide" if !t.is_float() && t.bits() <= 32 => op = Some(MadOp::Wide),
                    "rn" if t.is_float() => op = Some(MadOp::Fma),
                    "ftz" if t == NT::F32 => ftz = true,
                    "sat" if t == NT::F32 => sat = true,
                    _ => return unsup(format!("modifier `.{m}` of `{}`", i.op)),
                }
            }
            let op = op.ok_or_else(|| format!("`{}` needs .lo/.hi/.wide or .rn", i.op))?;
            Ok(Op::Mad {
                op,
                t,
                ftz,
                sat,
                d: cx.reg(&a[0])?,
                a: cx.src(&a[1], t)?,
                b: cx.src(&a[2], t)?,
                c: cx.src(&a[3], if op == MadOp::Wide { wide(t) } else { t })?,
            })
        }
        "setp" => {
            nargs(i, 3)?;
            let t = nt_of(p[p.len() - 1])?;
            if p.len() < 3 || t == NT::Pred {
                return unsup(format!("`{}`", i.op));
            }
            let cmp = match p[1] {
                "eq" => CmpOp::Eq,
                "ne" => CmpOp::Ne,
                "lt" => CmpOp::Lt,
                "le" => CmpOp::Le,
                "gt" => CmpOp::Gt,
                "ge" => CmpOp::Ge,
                "lo" if !t.is_float() => CmpOp::Lo,
                "ls" if !t.is_float() => CmpOp::Ls,
                "hi" if !t.is_float() => CmpOp::Hi,
                "hs" if !t.is_float() => CmpOp::Hs,
                "equ" if t.is_float() => CmpOp::Equ,
                "neu" if t.is_float() => CmpOp::Neu,
                "ltu" if t.is_float() => CmpOp::Ltu,
                "leu" if t.is_float() => CmpOp::Leu,
                "gtu" if t.is_float() => CmpOp::Gtu,
                "geu" if t.is_float() => CmpOp::Geu,
                "num" if t.is_float() => CmpOp::Num,
                "nan" if t.is_float() => CmpOp::Nan,
                c => return unsup(format!("comparison `.{c}` of `{}`", i.op)),
            };
            let mut ftz = false;
            for m in &p[2..p.len() - 1] {
                match *m {
                    "ftz" if t == NT::F32 => ftz = true,
                    _ => return unsup(format!("modifier `.{m}` of `{}` (no boolean-op setp)", i.op)),
                }
            }
            Ok(Op::Setp { cmp, t, ftz, d: cx.reg(&a[0])?, a: cx.src(&a[1], t)?, b: cx.src(&a[2], t)? })
        }
        "selp" => {
            nargs(i, 4)?;
            if p.len() != 2 {
                return unsup(format!("`{}`", i.op));
            }
            let t = nt_of(p[1])?;
            Ok(Op::Selp { d: cx.reg(&a[0])?, a: cx.src(&a[1], t)?, b: cx.src(&a[2], t)?, p: cx.src(&a[3], NT::Pred)? })
        }
        "cvt" => decode_cvt(cx, i, &p),
        "ld" | "st" => decode_ldst(cx, i, &p),
        "atom" | "red" => decode_atom(cx, i, &p),
        "cp" => decode_cp(cx, i, &p),
        "bar" | "barrier" => {
            match p[1..] {
                ["sync"] => {}
                [] if p[0] == "barrier" => {}
                _ => return unsup(format!("`{}` (only bar.sync / barrier.sync)", i.op)),
            }
            match a.as_slice() {
                [Operand::Imm(id)] if (0..16).contains(id) => Ok(Op::Bar { id: *id as u32 }),
                _ => unsup(format!("`{}` needs one immediate barrier id (no thread count)", i.op)),
            }
        }
        "shfl" => {
            let mode = match p[1..] {
                ["sync", "up", "b32"] => ShflMode::Up,
                ["sync", "down", "b32"] => ShflMode::Down,
                ["sync", "bfly", "b32"] => ShflMode::Bfly,
                ["sync", "idx", "b32"] => ShflMode::Idx,
                _ => return unsup(format!("`{}`", i.op)),
            };
            nargs(i, 5)?;
            Ok(Op::Shfl {
                mode,
                d: cx.reg(&a[0])?,
                a: cx.src(&a[1], NT::U32)?,
                b: cx.src(&a[2], NT::U32)?,
                c: cx.src(&a[3], NT::U32)?,
                mask: cx.src(&a[4], NT::U32)?,
            })
        }
        "vote" => {
            let mode = match p[1..] {
                ["sync", "ballot", "b32"] => VoteMode::Ballot,
                ["sync", "any", "pred"] => VoteMode::Any,
                ["sync", "all", "pred"] => VoteMode::All,
                ["sync", "uni", "pred"] => VoteMode::Uni,
                _ => return unsup(format!("`{}`", i.op)),
            };
            nargs(i, 3)?;
            Ok(Op::Vote { mode, d: cx.reg(&a[0])?, p: cx.src(&a[1], NT::Pred)?, mask: cx.src(&a[2], NT::U32)? })
        }
        "mma" => {
            let bf16 = match p[1..] {
                ["sync", "m16n8k16", "row", "col", "f32", "bf16", "bf16", "f32"] => true,
                ["sync", "m16n8k16", "row", "col", "f32", "f16", "f16", "f32"] => false,
                _ => return unsup(format!("`{}` (only m16n8k16.row.col.f32.{{bf16,f16}}.f32)", i.op)),
            };
            nargs(i, 4)?;
            Ok(Op::Mma {
                bf16,
                d: cx.vec_regs(&a[0])?,
                a: cx.vec_regs(&a[1])?,
                b: cx.vec_regs(&a[2])?,
                c: cx.vec_regs(&a[3])?,
            })
        }
        "ldmatrix" => {
            let (n, trans) = match p[1..] {
                ["sync", "m8n8", x, "shared", "b16"] | ["sync", "m8n8", x, "shared"] => (x, false),
                ["sync", "m8n8", x, "trans", "shared", "b16"] | ["sync", "m8n8", x, "trans", "shared"] => (x, true),
                _ => return unsup(format!("`{}`", i.op)),
            };
            let n: u8 = match n {
                "x1" => 1,
                "x2" => 2,
                "x4" => 4,
                _ => return unsup(format!("`{}`", i.op)),
            };
            nargs(i, 2)?;
            let mut d = [0u32; 4];
            match &a[0] {
                Operand::Vec(rs) if rs.len() == n as usize => {
                    for (x, r) in d.iter_mut().zip(rs) {
                        *x = cx.slot(*r);
                    }
                }
                Operand::Reg(r) if n == 1 => d[0] = cx.slot(*r),
                o => return unsup(format!("ldmatrix destination `{o}` must hold {n} registers")),
            }
            Ok(Op::Ldmatrix { n, trans, d, addr: cx.addr(&a[1], MSpace::Shared)? })
        }
        "bra" => {
            if !matches!(p[1..], [] | ["uni"]) {
                return unsup(format!("`{}`", i.op));
            }
            nargs(i, 1)?;
            match &a[0] {
                Operand::Label(l) => match cx.labels.get(l.as_str()) {
                    Some(&t) => Ok(Op::Bra { target: t }),
                    None => unsup(format!("undefined label `{l}`")),
                },
                o => unsup(format!("branch target `{o}`")),
            }
        }
        "ret" | "exit" if p.len() == 1 && a.is_empty() => Ok(Op::Exit),
        // Memory fences order nothing when one thread runs at a time.
        "membar" | "fence" if a.is_empty() => Ok(Op::Nop),
        _ => unsup(format!("opcode `{}`", i.op)),
    }
}

fn wide(t: NT) -> NT {
    match t {
        NT::U16 => NT::U32,
        NT::U32 => NT::U64,
        NT::S16 => NT::S32,
        NT::S32 => NT::S64,
        t => t,
    }
}

fn decode_mov(cx: &Ctx, i: &Instr, p: &[&str]) -> R<Op> {
    nargs(i, 2)?;
    if p.len() != 2 {
        return unsup(format!("`{}`", i.op));
    }
    let t = ty_of(p[1])?;
    let a = &i.args;
    match (&a[0], &a[1]) {
        (Operand::Vec(rs), src) => {
            let half = match (t, rs.len()) {
                (Ty::B32, 2) => 16,
                (Ty::B64, 2) => 32,
                _ => return unsup(format!("`{}` unpack into {} registers", i.op, rs.len())),
            };
            Ok(Op::Unpack { lo: cx.slot(rs[0]), hi: cx.slot(rs[1]), a: cx.src(src, NT::U64)?, half })
        }
        (d, Operand::Vec(rs)) => {
            let half = match (t, rs.len()) {
                (Ty::B32, 2) => 16,
                (Ty::B64, 2) => 32,
                _ => return unsup(format!("`{}` pack of {} registers", i.op, rs.len())),
            };
            Ok(Op::Pack { d: cx.reg(d)?, lo: Src::R(cx.slot(rs[0])), hi: Src::R(cx.slot(rs[1])), half })
        }
        (d, Operand::Special(s)) => Ok(Op::MovSreg { d: cx.reg(d)?, s: *s }),
        (d, src) => {
            let nt = match NT::from_ty(t) {
                Some(n) => n,
                None => return unsup(format!("`{}`", i.op)),
            };
            Ok(Op::Mov { d: cx.reg(d)?, a: cx.src(src, nt)? })
        }
    }
}

fn decode_bin(cx: &Ctx, i: &Instr, p: &[&str]) -> R<Op> {
    nargs(i, 3)?;
    let t = nt_of(p[p.len() - 1])?;
    let base = match p[0] {
        "add" => BinOp::Add,
        "sub" => BinOp::Sub,
        "mul" => BinOp::Mul,
        "div" => BinOp::Div,
        "rem" => BinOp::Rem,
        "min" => BinOp::Min,
        "max" => BinOp::Max,
        "and" => BinOp::And,
        "or" => BinOp::Or,
        "xor" => BinOp::Xor,
        "shl" => BinOp::Shl,
        _ => BinOp::Shr,
    };
    let mut op = base;
    let (mut ftz, mut sat) = (false, false);
    for m in &p[1..p.len() - 1] {
        match (*m, base) {
            ("lo", BinOp::Mul) if !t.is_float() => op = BinOp::Mul,
            ("hi", BinOp::Mul) if !t.is_float() => op = BinOp::MulHi,
            ("wide", BinOp::Mul) if !t.is_float() && t.bits() <= 32 => op = BinOp::MulWide,
            ("rn" | "approx" | "full", BinOp::Div) if t.is_float() => {}
            ("rn", BinOp::Add | BinOp::Sub | BinOp::Mul) if t.is_float() => {}
            ("ftz", _) if t == NT::F32 => ftz = true,
            ("sat", BinOp::Add | BinOp::Sub | BinOp::Mul) if t == NT::F32 => sat = true,
            _ => return unsup(format!("modifier `.{m}` of `{}`", i.op)),
        }
    }
    let bit_only = matches!(base, BinOp::And | BinOp::Or | BinOp::Xor);
    if t == NT::Pred && !bit_only {
        return unsup(format!("`{}` on predicates", i.op));
    }
    if t.is_float() && (bit_only || matches!(base, BinOp::Rem | BinOp::Shl | BinOp::Shr)) {
        return unsup(format!("`{}` on a float type", i.op));
    }
    if base == BinOp::Mul && !t.is_float() && p.len() == 2 {
        return unsup(format!("`{}` needs .lo, .hi or .wide", i.op));
    }
    if base == BinOp::Div && t.is_float() && t == NT::F32 && p.len() == 2 {
        return unsup(format!("`{}` needs .rn, .approx or .full", i.op));
    }
    let a = &i.args;
    let bt = if matches!(base, BinOp::Shl | BinOp::Shr) { NT::U32 } else { t };
    Ok(Op::Bin { op, t, ftz, sat, d: cx.reg(&a[0])?, a: cx.src(&a[1], t)?, b: cx.src(&a[2], bt)? })
}

fn decode_un(cx: &Ctx, i: &Instr, p: &[&str]) -> R<Op> {
    nargs(i, 2)?;
    let t = nt_of(p[p.len() - 1])?;
    let op = match p[0] {
        "neg" => UnOp::Neg,
        "abs" => UnOp::Abs,
        "not" => UnOp::Not,
        "cnot" => UnOp::Cnot,
        "popc" => UnOp::Popc,
        "clz" => UnOp::Clz,
        "brev" => UnOp::Brev,
        "ex2" => UnOp::Ex2,
        "lg2" => UnOp::Lg2,
        "rsqrt" => UnOp::Rsqrt,
        "rcp" => UnOp::Rcp,
        "sqrt" => UnOp::Sqrt,
        "tanh" => UnOp::Tanh,
        "sin" => UnOp::Sin,
        _ => UnOp::Cos,
    };
    let float_op =
        matches!(op, UnOp::Ex2 | UnOp::Lg2 | UnOp::Rsqrt | UnOp::Rcp | UnOp::Sqrt | UnOp::Tanh | UnOp::Sin | UnOp::Cos);
    let int_op = matches!(op, UnOp::Not | UnOp::Cnot | UnOp::Popc | UnOp::Clz | UnOp::Brev);
    if (float_op && !t.is_float()) || (int_op && t.is_float()) || (t == NT::Pred && op != UnOp::Not) {
        return unsup(format!("`{}`", i.op));
    }
    if t == NT::F64 && matches!(op, UnOp::Ex2 | UnOp::Lg2 | UnOp::Tanh | UnOp::Sin | UnOp::Cos) {
        return unsup(format!("`{}` (f64 approx math)", i.op));
    }
    let mut ftz = false;
    for m in &p[1..p.len() - 1] {
        match *m {
            "ftz" if t == NT::F32 => ftz = true,
            "approx" if float_op => {}
            "rn" if matches!(op, UnOp::Rcp | UnOp::Sqrt) => {}
            _ => return unsup(format!("modifier `.{m}` of `{}`", i.op)),
        }
    }
    // rcp/sqrt need a rounding or .approx; ex2 etc. need .approx.
    if float_op && p.len() == 2 {
        return unsup(format!("`{}` needs .approx or .rn", i.op));
    }
    Ok(Op::Un { op, t, ftz, d: cx.reg(&i.args[0])?, a: cx.src(&i.args[1], t)? })
}

fn decode_cvt(cx: &Ctx, i: &Instr, p: &[&str]) -> R<Op> {
    nargs(i, 2).or_else(|_| nargs(i, 3))?;
    let n = p.len();
    if n < 3 {
        return unsup(format!("`{}`", i.op));
    }
    let (to_s, from_s) = (p[n - 2], p[n - 1]);
    let (mut rnd, mut ftz, mut sat) = (Rnd::None, false, false);
    for m in &p[1..n - 2] {
        match *m {
            "rn" => rnd = Rnd::Rn,
            "rz" => rnd = Rnd::Rz,
            "rm" => rnd = Rnd::Rm,
            "rp" => rnd = Rnd::Rp,
            "rni" => rnd = Rnd::Rni,
            "rzi" => rnd = Rnd::Rzi,
            "rmi" => rnd = Rnd::Rmi,
            "rpi" => rnd = Rnd::Rpi,
            "ftz" => ftz = true,
            "sat" => sat = true,
            _ => return unsup(format!("modifier `.{m}` of `{}`", i.op)),
        }
    }
    let a = &i.args;
    if matches!(to_s, "bf16x2" | "f16x2") {
        if from_s != "f32" || rnd != Rnd::Rn || ftz || sat || a.len() != 3 {
            return unsup(format!("`{}` (only cvt.rn.{{bf16x2,f16x2}}.f32 d, hi, lo)", i.op));
        }
        return Ok(Op::CvtPack {
            bf16: to_s == "bf16x2",
            d: cx.reg(&a[0])?,
            hi: cx.src(&a[1], NT::F32)?,
            lo: cx.src(&a[2], NT::F32)?,
        });
    }
    nargs(i, 2)?;
    let to = CT::from_ty(ty_of(to_s)?).ok_or_else(|| format!("cvt to `.{to_s}`"))?;
    let from = CT::from_ty(ty_of(from_s)?).ok_or_else(|| format!("cvt from `.{from_s}`"))?;
    let int_rnd = matches!(rnd, Rnd::Rni | Rnd::Rzi | Rnd::Rmi | Rnd::Rpi);
    let flt_rnd = matches!(rnd, Rnd::Rn | Rnd::Rz | Rnd::Rm | Rnd::Rp);
    let ok = match (to.is_float(), from.is_float()) {
        (false, false) => rnd == Rnd::None,
        // Float to int needs an integer rounding.
        (false, true) => int_rnd,
        // Int to float: round to nearest (or none, which PTX tolerates for exact cases);
        // directed roundings only where the source fits an f64 exactly.
        (true, false) => rnd == Rnd::None || rnd == Rnd::Rn || (flt_rnd && from.bits() <= 32),
        // Float to float: narrowing needs a float rounding; same size may round to an integer.
        (true, true) => {
            let narrowing =
                to.bits() < from.bits() || (to == CT::BF16 && from == CT::F16) || (to == CT::F16 && from == CT::BF16);
            if narrowing {
                flt_rnd
            } else {
                rnd == Rnd::None || (int_rnd && to == from)
            }
        }
    };
    if !ok {
        return unsup(format!("rounding of `{}`", i.op));
    }
    let from_nt = match from {
        CT::U8 | CT::U16 => NT::U16,
        CT::S8 | CT::S16 => NT::S16,
        CT::U32 => NT::U32,
        CT::S32 => NT::S32,
        CT::U64 => NT::U64,
        CT::S64 => NT::S64,
        CT::F16 | CT::BF16 => NT::U16,
        CT::F32 => NT::F32,
        CT::F64 => NT::F64,
    };
    Ok(Op::Cvt { to, from, rnd, ftz, sat, dmask: reg_mask(&a[0]), d: cx.reg(&a[0])?, a: cx.src(&a[1], from_nt)? })
}

fn decode_ldst(cx: &Ctx, i: &Instr, p: &[&str]) -> R<Op> {
    nargs(i, 2)?;
    let is_ld = p[0] == "ld";
    let mut space = None;
    let mut n = 1u8;
    for m in &p[1..p.len() - 1] {
        match *m {
            "global" | "shared" | "param" if space.is_none() => space = Some(space_of(m)?),
            "nc" if is_ld && space == Some(MSpace::Global) => {}
            "v2" if n == 1 => n = 2,
            "v4" if n == 1 => n = 4,
            _ => return unsup(format!("modifier `.{m}` of `{}`", i.op)),
        }
    }
    let space = space.ok_or_else(|| format!("`{}` without a state space (generic addressing)", i.op))?;
    let ty = ty_of(p[p.len() - 1])?;
    if matches!(ty, Ty::Pred) {
        return unsup(format!("`{}`", i.op));
    }
    let width = ty.bytes() as u8;
    let sext = matches!(ty, Ty::S8 | Ty::S16 | Ty::S32);
    let nt = match width {
        1 | 2 => NT::U16,
        4 => {
            if ty == Ty::F32 {
                NT::F32
            } else {
                NT::U32
            }
        }
        _ => {
            if ty == Ty::F64 {
                NT::F64
            } else {
                NT::U64
            }
        }
    };
    let a = &i.args;
    if is_ld {
        let addr = cx.addr(&a[1], space)?;
        let mut d = [0u32; 4];
        let dmask;
        match (&a[0], n) {
            (Operand::Reg(r), 1) => {
                d[0] = cx.slot(*r);
                dmask = reg_mask(&a[0]);
            }
            (Operand::Vec(rs), n) if rs.len() == n as usize && n > 1 => {
                for (x, r) in d.iter_mut().zip(rs) {
                    *x = cx.slot(*r);
                }
                dmask = reg_mask(&Operand::Reg(rs[0]));
            }
            _ => return unsup(format!("destination of `{}`", i.op)),
        }
        if dmask.count_ones() < 8 * width as u32 {
            return unsup(format!("`{}` into a register narrower than .{ty}", i.op));
        }
        Ok(Op::Ld { space, n, width, sext, dmask, d, addr })
    } else {
        if space == MSpace::Param {
            return unsup("st.param");
        }
        let addr = cx.addr(&a[0], space)?;
        let mut v = [Src::I(0); 4];
        match (&a[1], n) {
            (Operand::Vec(rs), n) if rs.len() == n as usize && n > 1 => {
                for (x, r) in v.iter_mut().zip(rs) {
                    *x = Src::R(cx.slot(*r));
                }
            }
            (o, 1) => v[0] = cx.src(o, nt)?,
            _ => return unsup(format!("source of `{}`", i.op)),
        }
        Ok(Op::St { space, n, width, v, addr })
    }
}

fn decode_atom(cx: &Ctx, i: &Instr, p: &[&str]) -> R<Op> {
    let is_red = p[0] == "red";
    let n = p.len();
    if n < 4 {
        return unsup(format!("`{}`", i.op));
    }
    let space = space_of(p[1])?;
    if space == MSpace::Param {
        return unsup(format!("`{}`", i.op));
    }
    let op = match p[2] {
        "add" => AtomOp::Add,
        "min" => AtomOp::Min,
        "max" => AtomOp::Max,
        "exch" if !is_red => AtomOp::Exch,
        "cas" if !is_red => AtomOp::Cas,
        "and" => AtomOp::And,
        "or" => AtomOp::Or,
        "xor" => AtomOp::Xor,
        o => return unsup(format!("atomic operation `.{o}` of `{}`", i.op)),
    };
    if n != 4 {
        return unsup(format!("modifiers of `{}`", i.op));
    }
    let t = nt_of(p[3])?;
    let ok = match op {
        AtomOp::Add => matches!(t, NT::U32 | NT::S32 | NT::U64 | NT::F32 | NT::F64),
        AtomOp::Min | AtomOp::Max => matches!(t, NT::U32 | NT::S32 | NT::U64 | NT::S64),
        _ => matches!(t, NT::U32 | NT::U64) && matches!(p[3], "b32" | "b64" | "u32" | "u64"),
    };
    if !ok {
        return unsup(format!("type of `{}`", i.op));
    }
    let a = &i.args;
    let want = match (is_red, op) {
        (true, _) => 2,
        (false, AtomOp::Cas) => 4,
        _ => 3,
    };
    nargs(i, want)?;
    let (d, rest) = if is_red { (None, &a[..]) } else { (Some(cx.reg(&a[0])?), &a[1..]) };
    let addr = cx.addr(&rest[0], space)?;
    let b = cx.src(&rest[1], t)?;
    let c = if op == AtomOp::Cas { cx.src(&rest[2], t)? } else { Src::I(0) };
    Ok(Op::Atom { space, op, t, d, addr, b, c })
}

fn decode_cp(cx: &Ctx, i: &Instr, p: &[&str]) -> R<Op> {
    // `parts` dropped `.ca`/`.cg`: what is left is the instruction proper.
    match p[1..] {
        ["async", "commit_group"] => {
            nargs(i, 0)?;
            Ok(Op::CpCommit)
        }
        ["async", "wait_all"] => {
            nargs(i, 0)?;
            Ok(Op::CpWait { n: 0, commit: true })
        }
        ["async", "wait_group"] => match i.args.as_slice() {
            [Operand::Imm(n)] if (0..=8).contains(n) => Ok(Op::CpWait { n: *n as u32, commit: false }),
            _ => unsup("cp.async.wait_group takes one immediate"),
        },
        ["async", "shared", "global"] => {
            let a = &i.args;
            if a.len() != 3 && a.len() != 4 {
                return unsup(format!("`{}` takes 3 or 4 operands", i.op));
            }
            let size = match a[2] {
                Operand::Imm(s @ (4 | 8 | 16)) => s as u32,
                _ => return unsup(format!("cp.async size `{}` (4, 8 or 16)", a[2])),
            };
            if size != 16 && i.op.contains(".cg") {
                return unsup("cp.async.cg copies 16 bytes only");
            }
            let src_size = if a.len() == 4 { cx.src(&a[3], NT::U32)? } else { Src::I(size as u64) };
            if let Src::I(s) = src_size {
                if s > size as u64 {
                    return unsup(format!("cp.async src-size {s} > {size}"));
                }
            }
            Ok(Op::CpAsync {
                size,
                dst: cx.addr(&a[0], MSpace::Shared)?,
                src: cx.addr(&a[1], MSpace::Global)?,
                src_size,
            })
        }
        _ => unsup(format!("`{}`", i.op)),
    }
}
