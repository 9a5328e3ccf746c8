//! The PTX data model and its printer.
//!
//! A kernel is a list of [`Stmt`]s; an instruction is an opcode string with
//! its modifiers (`"fma.rn.f32"`, `"ld.global.nc.v4.b32"`) plus operands. The
//! opcode stays a string on purpose: the printer is then one line per
//! instruction, the emulator's parser reads exactly what was printed, and the
//! typed surface lives in [`crate::builder`], which is where instructions are
//! made. Registers are typed by class (`%p`, `%h`, `%r`, `%rd`, `%f`, `%fd`);
//! bit-size instructions (`.b32`) accept any register of that size, as in PTX.

use std::fmt::{self, Write as _};

/// A PTX instruction type (the `.f32` in `add.f32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ty {
    Pred,
    B8,
    B16,
    B32,
    B64,
    U8,
    U16,
    U32,
    U64,
    S8,
    S16,
    S32,
    S64,
    F16,
    F16x2,
    BF16,
    BF16x2,
    F32,
    F64,
}

impl Ty {
    /// The name as PTX spells it, without the dot.
    pub fn name(self) -> &'static str {
        use Ty::*;
        match self {
            Pred => "pred",
            B8 => "b8",
            B16 => "b16",
            B32 => "b32",
            B64 => "b64",
            U8 => "u8",
            U16 => "u16",
            U32 => "u32",
            U64 => "u64",
            S8 => "s8",
            S16 => "s16",
            S32 => "s32",
            S64 => "s64",
            F16 => "f16",
            F16x2 => "f16x2",
            BF16 => "bf16",
            BF16x2 => "bf16x2",
            F32 => "f32",
            F64 => "f64",
        }
    }

    pub fn parse(s: &str) -> Option<Ty> {
        use Ty::*;
        Some(match s {
            "pred" => Pred,
            "b8" => B8,
            "b16" => B16,
            "b32" => B32,
            "b64" => B64,
            "u8" => U8,
            "u16" => U16,
            "u32" => U32,
            "u64" => U64,
            "s8" => S8,
            "s16" => S16,
            "s32" => S32,
            "s64" => S64,
            "f16" => F16,
            "f16x2" => F16x2,
            "bf16" => BF16,
            "bf16x2" => BF16x2,
            "f32" => F32,
            "f64" => F64,
            _ => return None,
        })
    }

    /// Size in bytes in memory (a predicate counts as 1).
    pub fn bytes(self) -> usize {
        use Ty::*;
        match self {
            Pred | B8 | U8 | S8 => 1,
            B16 | U16 | S16 | F16 | BF16 => 2,
            B32 | U32 | S32 | F32 | F16x2 | BF16x2 => 4,
            B64 | U64 | S64 | F64 => 8,
        }
    }

    /// The register class a value of this type lives in. 8-bit values are
    /// loaded into 32-bit registers (PTX allows the wider destination).
    pub fn class(self) -> RegClass {
        use Ty::*;
        match self {
            Pred => RegClass::Pred,
            B16 | U16 | S16 | F16 | BF16 => RegClass::B16,
            B8 | U8 | S8 | B32 | U32 | S32 | F16x2 | BF16x2 => RegClass::B32,
            B64 | U64 | S64 => RegClass::B64,
            F32 => RegClass::F32,
            F64 => RegClass::F64,
        }
    }
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Register classes, each declared once per kernel as `.reg .T %x<N>;`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RegClass {
    Pred,
    B16,
    B32,
    B64,
    F32,
    F64,
}

impl RegClass {
    pub const ALL: [RegClass; 6] =
        [RegClass::Pred, RegClass::B16, RegClass::B32, RegClass::B64, RegClass::F32, RegClass::F64];

    pub fn prefix(self) -> &'static str {
        match self {
            RegClass::Pred => "p",
            RegClass::B16 => "h",
            RegClass::B32 => "r",
            RegClass::B64 => "rd",
            RegClass::F32 => "f",
            RegClass::F64 => "fd",
        }
    }

    /// The type used in the `.reg` declaration.
    pub fn decl_ty(self) -> Ty {
        match self {
            RegClass::Pred => Ty::Pred,
            RegClass::B16 => Ty::B16,
            RegClass::B32 => Ty::B32,
            RegClass::B64 => Ty::B64,
            RegClass::F32 => Ty::F32,
            RegClass::F64 => Ty::F64,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A virtual register: `%r7` is `Reg { class: B32, id: 7 }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Reg {
    pub class: RegClass,
    pub id: u32,
}

impl fmt::Display for Reg {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "%{}{}", self.class.prefix(), self.id)
    }
}

/// Special registers read with `mov.u32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Sreg {
    TidX,
    TidY,
    TidZ,
    NtidX,
    NtidY,
    NtidZ,
    CtaidX,
    CtaidY,
    CtaidZ,
    NctaidX,
    NctaidY,
    NctaidZ,
    LaneId,
    WarpId,
}

impl Sreg {
    pub const ALL: [Sreg; 14] = [
        Sreg::TidX,
        Sreg::TidY,
        Sreg::TidZ,
        Sreg::NtidX,
        Sreg::NtidY,
        Sreg::NtidZ,
        Sreg::CtaidX,
        Sreg::CtaidY,
        Sreg::CtaidZ,
        Sreg::NctaidX,
        Sreg::NctaidY,
        Sreg::NctaidZ,
        Sreg::LaneId,
        Sreg::WarpId,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Sreg::TidX => "%tid.x",
            Sreg::TidY => "%tid.y",
            Sreg::TidZ => "%tid.z",
            Sreg::NtidX => "%ntid.x",
            Sreg::NtidY => "%ntid.y",
            Sreg::NtidZ => "%ntid.z",
            Sreg::CtaidX => "%ctaid.x",
            Sreg::CtaidY => "%ctaid.y",
            Sreg::CtaidZ => "%ctaid.z",
            Sreg::NctaidX => "%nctaid.x",
            Sreg::NctaidY => "%nctaid.y",
            Sreg::NctaidZ => "%nctaid.z",
            Sreg::LaneId => "%laneid",
            Sreg::WarpId => "%warpid",
        }
    }

    pub fn parse(s: &str) -> Option<Sreg> {
        Sreg::ALL.into_iter().find(|r| r.name() == s)
    }
}

/// The base of a memory address: a register or a symbol (a `.shared`
/// array or a `.param`).
#[derive(Clone, Debug, PartialEq)]
pub enum AddrBase {
    Reg(Reg),
    Sym(String),
}

/// `[base+offset]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Addr {
    pub base: AddrBase,
    pub offset: i64,
}

impl Addr {
    pub fn reg(r: Reg, offset: i64) -> Addr {
        Addr { base: AddrBase::Reg(r), offset }
    }
    pub fn sym(s: impl Into<String>, offset: i64) -> Addr {
        Addr { base: AddrBase::Sym(s.into()), offset }
    }
    /// The same address `delta` bytes further.
    pub fn plus(&self, delta: i64) -> Addr {
        Addr { base: self.base.clone(), offset: self.offset + delta }
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_char('[')?;
        match &self.base {
            AddrBase::Reg(r) => write!(f, "{r}")?,
            AddrBase::Sym(s) => f.write_str(s)?,
        }
        match self.offset {
            0 => {}
            o if o > 0 => write!(f, "+{o}")?,
            o => write!(f, "+{o}")?, // PTX spells negative offsets `[%r+-4]`
        }
        f.write_char(']')
    }
}

/// One operand of an instruction.
#[derive(Clone, Debug, PartialEq)]
pub enum Operand {
    Reg(Reg),
    /// An integer immediate, printed in decimal.
    Imm(i64),
    /// An f32 immediate, printed bit-exactly as `0fXXXXXXXX`.
    F32(f32),
    /// A vector or fragment `{%f1, %f2}`.
    Vec(Vec<Reg>),
    Addr(Addr),
    Label(String),
    Special(Sreg),
    /// A bare symbol (the address of a `.shared` array in `mov.u32 %r, smem;`).
    Sym(String),
}

impl From<Reg> for Operand {
    fn from(r: Reg) -> Operand {
        Operand::Reg(r)
    }
}
impl From<&Reg> for Operand {
    fn from(r: &Reg) -> Operand {
        Operand::Reg(*r)
    }
}
impl From<i64> for Operand {
    fn from(v: i64) -> Operand {
        Operand::Imm(v)
    }
}
impl From<i32> for Operand {
    fn from(v: i32) -> Operand {
        Operand::Imm(v as i64)
    }
}
impl From<u32> for Operand {
    fn from(v: u32) -> Operand {
        Operand::Imm(v as i64)
    }
}
impl From<usize> for Operand {
    fn from(v: usize) -> Operand {
        Operand::Imm(v as i64)
    }
}
impl From<f32> for Operand {
    fn from(v: f32) -> Operand {
        Operand::F32(v)
    }
}
impl From<Addr> for Operand {
    fn from(a: Addr) -> Operand {
        Operand::Addr(a)
    }
}
impl From<Sreg> for Operand {
    fn from(s: Sreg) -> Operand {
        Operand::Special(s)
    }
}
impl From<Vec<Reg>> for Operand {
    fn from(v: Vec<Reg>) -> Operand {
        Operand::Vec(v)
    }
}
impl From<&[Reg]> for Operand {
    fn from(v: &[Reg]) -> Operand {
        Operand::Vec(v.to_vec())
    }
}

impl fmt::Display for Operand {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Operand::Reg(r) => write!(f, "{r}"),
            Operand::Imm(v) => write!(f, "{v}"),
            Operand::F32(v) => write!(f, "0f{:08X}", v.to_bits()),
            Operand::Vec(rs) => {
                f.write_char('{')?;
                for (i, r) in rs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{r}")?;
                }
                f.write_char('}')
            }
            Operand::Addr(a) => write!(f, "{a}"),
            Operand::Label(l) | Operand::Sym(l) => f.write_str(l),
            Operand::Special(s) => f.write_str(s.name()),
        }
    }
}

/// `@%p1` or `@!%p1` in front of an instruction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Guard {
    pub pred: Reg,
    pub negate: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Instr {
    pub guard: Option<Guard>,
    /// Opcode with modifiers, as printed: `"setp.lt.u32"`.
    pub op: String,
    pub args: Vec<Operand>,
}

impl fmt::Display for Instr {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if let Some(g) = self.guard {
            write!(f, "@{}{} ", if g.negate { "!" } else { "" }, g.pred)?;
        }
        f.write_str(&self.op)?;
        for (i, a) in self.args.iter().enumerate() {
            f.write_str(if i == 0 { " " } else { ", " })?;
            write!(f, "{a}")?;
        }
        f.write_char(';')
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    Instr(Instr),
    Label(String),
    Comment(String),
}

/// A kernel parameter (`.param .u64 p_x`).
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub name: String,
    pub ty: Ty,
}

/// A statically sized `.shared` array.
#[derive(Clone, Debug, PartialEq)]
pub struct Shared {
    pub name: String,
    pub align: u32,
    pub bytes: u32,
}

/// One `.entry`.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub name: String,
    pub params: Vec<Param>,
    pub shared: Vec<Shared>,
    /// Number of registers declared per class (indexed by [`RegClass::index`]).
    pub regs: [u32; 6],
    /// `.maxntid` (threads per block the kernel is written for).
    pub max_threads: Option<u32>,
    pub body: Vec<Stmt>,
}

impl Kernel {
    /// Total static shared memory in bytes.
    pub fn shared_bytes(&self) -> u32 {
        self.shared.iter().map(|s| s.bytes).sum()
    }

    pub fn instr_count(&self) -> usize {
        self.body.iter().filter(|s| matches!(s, Stmt::Instr(_))).count()
    }
}

/// The GPU a module is printed for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Sm80,
    Sm90,
}

impl Target {
    pub const ALL: [Target; 2] = [Target::Sm80, Target::Sm90];

    pub fn name(self) -> &'static str {
        match self {
            Target::Sm80 => "sm_80",
            Target::Sm90 => "sm_90",
        }
    }

    pub fn parse(s: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == s)
    }
}

/// The PTX ISA version printed in `.version`: 8.0 covers every instruction
/// the builder emits on both targets and is accepted by the CUDA 12 and 13
/// drivers' JIT.
pub const PTX_VERSION: &str = "8.0";

/// A PTX module: what one `kernels.ptx` (or one family's module) holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Module {
    pub target: Target,
    pub kernels: Vec<Kernel>,
}

impl Module {
    pub fn new(target: Target, kernels: Vec<Kernel>) -> Module {
        Module { target, kernels }
    }

    /// The PTX text.
    pub fn print(&self) -> String {
        let mut s = String::new();
        writeln!(s, "//\n// Generated by qvc-codegen\n//\n").unwrap();
        writeln!(s, ".version {PTX_VERSION}\n.target {}\n.address_size 64\n", self.target.name()).unwrap();
        for k in &self.kernels {
            print_kernel(&mut s, k);
            s.push('\n');
        }
        s
    }
}

fn print_kernel(s: &mut String, k: &Kernel) {
    writeln!(s, ".visible .entry {}(", k.name).unwrap();
    for (i, p) in k.params.iter().enumerate() {
        let sep = if i + 1 < k.params.len() { "," } else { "" };
        writeln!(s, "\t.param .{} {}{}", p.ty, p.name, sep).unwrap();
    }
    s.push(')');
    if let Some(n) = k.max_threads {
        write!(s, "\n.maxntid {n}, 1, 1").unwrap();
    }
    s.push_str("\n{\n");
    for c in RegClass::ALL {
        let n = k.regs[c.index()];
        if n > 0 {
            writeln!(s, "\t.reg .{} %{}<{}>;", c.decl_ty(), c.prefix(), n).unwrap();
        }
    }
    for sh in &k.shared {
        writeln!(s, "\t.shared .align {} .b8 {}[{}];", sh.align, sh.name, sh.bytes).unwrap();
    }
    s.push('\n');
    for st in &k.body {
        match st {
            Stmt::Instr(i) => writeln!(s, "\t{i}").unwrap(),
            Stmt::Label(l) => writeln!(s, "{l}:").unwrap(),
            Stmt::Comment(c) => writeln!(s, "\t// {c}").unwrap(),
        }
    }
    s.push_str("}\n");
}
