//! Execution of a decoded kernel: the per-thread interpreter loop, the
//! block scheduler (barriers, warp collectives) and the ALU semantics.
//!
//! Invariants: registers hold values zero-extended from their register
//! width (so a 32-bit read is a truncation, never a masking bug); a thread's
//! pc points at the next instruction to run, or at the collective it waits
//! at; the step budget is decremented once per thread-instruction, so a
//! launch can never run unbounded.

use half::{bf16, f16};

use super::decode::*;
use super::mem::{describe_nearest, Device};
use super::{Arg, EmuError, EmuErrorKind, LaunchStats};
use crate::builder::Space;
use crate::ptx::{Kernel, Sreg, Stmt, Ty};

/// An error before it is located (kernel, pc, thread are added by the caller).
pub(crate) struct Fault {
    kind: EmuErrorKind,
    detail: String,
}

#[cold]
fn fault(kind: EmuErrorKind, detail: impl Into<String>) -> Fault {
    Fault { kind, detail: detail.into() }
}

/// Why a thread stopped running.
enum Stop {
    Bar(u32),
    Collective,
    Exit,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum TState {
    Ready,
    Bar(u32),
    Coll,
    Exited,
}

/// Launch-wide constants a thread can read through special registers.
#[derive(Clone, Copy)]
struct Env {
    ntid: [u32; 3],
    nctaid: [u32; 3],
    ctaid: [u32; 3],
}

fn tid_of(t: usize, ntid: [u32; 3]) -> [u32; 3] {
    let t = t as u32;
    [t % ntid[0], (t / ntid[0]) % ntid[1], t / (ntid[0] * ntid[1])]
}

/// Memory a thread can touch.
struct Mem<'a> {
    dev: &'a mut Device,
    smem: &'a mut [u8],
    /// Per shared byte: 0 never written, 1 written, 2 the target of a
    /// `cp.async` that its thread has not waited for yet.
    written: &'a mut [u8],
    params: &'a [u8],
    /// Per thread: its `cp.async` copies not yet completed.
    inflight: &'a mut [InFlight],
}

/// One thread's asynchronous copies. The source is read at issue (so a bad
/// address faults at the `cp.async`), the shared destination is written
/// when a `wait_group` completes its group: a read before that is an error,
/// which is how a missing or too-weak `cp.async.wait_group` is caught.
#[derive(Default, Clone)]
struct InFlight {
    /// Groups committed so far by this thread.
    committed: u32,
    copies: Vec<Copy>,
}

#[derive(Clone)]
struct Copy {
    /// The group it belongs to (`committed` at issue: the open group).
    group: u32,
    dst: usize,
    len: u8,
    data: [u8; 16],
}

impl Mem<'_> {
    /// Completes thread `t`'s copies in groups `< upto`.
    fn complete(&mut self, t: usize, upto: u32) {
        let f = &mut self.inflight[t];
        let smem = &mut *self.smem;
        let written = &mut *self.written;
        f.copies.retain(|c| {
            if c.group < upto {
                let n = c.len as usize;
                smem[c.dst..c.dst + n].copy_from_slice(&c.data[..n]);
                written[c.dst..c.dst + n].fill(1);
                false
            } else {
                true
            }
        });
    }
}

fn space_name(s: MSpace) -> Space {
    match s {
        MSpace::Global => Space::Global,
        MSpace::Shared => Space::Shared,
        MSpace::Param => Space::Param,
    }
}

impl Mem<'_> {
    #[cold]
    fn oob(&self, space: MSpace, addr: u64, n: usize) -> Fault {
        let detail = match space {
            MSpace::Global => describe_nearest(self.dev, addr),
            MSpace::Shared => format!("the block has {} bytes of shared memory", self.smem.len()),
            MSpace::Param => format!("the params take {} bytes", self.params.len()),
        };
        fault(EmuErrorKind::OutOfBounds { space: space_name(space), addr, bytes: n }, detail)
    }

    /// Reads `out.len()` bytes.
    #[inline]
    fn read(&self, space: MSpace, addr: u64, out: &mut [u8]) -> Result<(), Fault> {
        let n = out.len();
        match space {
            MSpace::Global => match self.dev.slice(addr, n) {
                Some(s) => out.copy_from_slice(s),
                None => return Err(self.oob(space, addr, n)),
            },
            MSpace::Shared => {
                let a = addr as usize;
                if addr > self.smem.len() as u64 || a + n > self.smem.len() {
                    return Err(self.oob(space, addr, n));
                }
                if let Some(i) = self.written[a..a + n].iter().position(|&w| w != 1) {
                    let at = addr + i as u64;
                    let detail = if self.written[a + i] == 2 {
                        format!(
                            "byte {at:#x} is the target of a cp.async its thread has not waited for \
                             (a missing or too-weak cp.async.wait_group)"
                        )
                    } else {
                        format!("no thread of this block wrote byte {at:#x} before this read")
                    };
                    return Err(fault(EmuErrorKind::UninitShared { addr: at }, detail));
                }
                out.copy_from_slice(&self.smem[a..a + n]);
            }
            MSpace::Param => {
                let a = addr as usize;
                if addr > self.params.len() as u64 || a + n > self.params.len() {
                    return Err(self.oob(space, addr, n));
                }
                out.copy_from_slice(&self.params[a..a + n]);
            }
        }
        Ok(())
    }

    #[inline]
    fn write(&mut self, space: MSpace, addr: u64, bytes: &[u8]) -> Result<(), Fault> {
        let n = bytes.len();
        match space {
            MSpace::Global => match self.dev.slice_mut(addr, n) {
                Some(s) => s.copy_from_slice(bytes),
                None => return Err(self.oob(space, addr, n)),
            },
            MSpace::Shared => {
                let a = addr as usize;
                if addr > self.smem.len() as u64 || a + n > self.smem.len() {
                    return Err(self.oob(space, addr, n));
                }
                self.smem[a..a + n].copy_from_slice(bytes);
                self.written[a..a + n].fill(1);
            }
            MSpace::Param => unreachable!("st.param is rejected at decode"),
        }
        Ok(())
    }
}

#[inline(always)]
fn val(r: &[u64], s: Src) -> u64 {
    match s {
        Src::R(i) => r[i as usize],
        Src::I(v) => v,
    }
}

#[inline(always)]
fn addr_of(r: &[u64], a: DAddr) -> u64 {
    match a.base {
        Some(b) => r[b as usize].wrapping_add(a.off as u64),
        None => a.off as u64,
    }
}

#[inline]
fn check_align(addr: u64, n: usize) -> Result<(), Fault> {
    if addr & (n as u64 - 1) != 0 {
        return Err(fault(EmuErrorKind::Misaligned, format!("address {addr:#x} is not a multiple of {n} bytes")));
    }
    Ok(())
}

#[inline(always)]
fn le(b: &[u8]) -> u64 {
    let mut x = [0u8; 8];
    x[..b.len()].copy_from_slice(b);
    u64::from_le_bytes(x)
}

#[inline(always)]
pub(crate) fn sext(a: u64, bits: u32) -> i64 {
    if bits >= 64 {
        a as i64
    } else {
        let s = 64 - bits;
        ((a << s) as i64) >> s
    }
}

/// Runs one thread until it stops. `budget` counts down thread-instructions.
#[allow(clippy::too_many_arguments)]
fn run_thread(
    code: &[DInstr],
    r: &mut [u64],
    pc: &mut u32,
    m: &mut Mem,
    env: &Env,
    t: usize,
    budget: &mut u64,
) -> Result<Stop, Fault> {
    let mut p = *pc as usize;
    let res = loop {
        if *budget == 0 {
            break Err(fault(
                EmuErrorKind::StepLimit,
                "raise it with Device::set_step_limit if the kernel is meant to run this long",
            ));
        }
        *budget -= 1;
        let ins = &code[p];
        if let Some((g, neg)) = ins.guard {
            if (r[g as usize] != 0) == neg {
                p += 1;
                continue;
            }
        }
        match ins.op {
            Op::Mov { d, a } => r[d as usize] = val(r, a),
            Op::Bin { op, t, ftz, sat, d, a, b } => r[d as usize] = bin(op, t, ftz, sat, val(r, a), val(r, b)),
            Op::Mad { op, t, ftz, sat, d, a, b, c } => {
                r[d as usize] = mad(op, t, ftz, sat, val(r, a), val(r, b), val(r, c))
            }
            Op::Setp { cmp, t, ftz, d, a, b } => r[d as usize] = setp(cmp, t, ftz, val(r, a), val(r, b)) as u64,
            Op::Selp { d, a, b, p: q } => r[d as usize] = if val(r, q) != 0 { val(r, a) } else { val(r, b) },
            Op::Un { op, t, ftz, d, a } => r[d as usize] = un(op, t, ftz, val(r, a)),
            Op::Bra { target } => {
                p = target as usize;
                continue;
            }
            Op::Cvt { to, from, rnd, ftz, sat, dmask, d, a } => {
                r[d as usize] = cvt(to, from, rnd, ftz, sat, dmask, val(r, a))
            }
            Op::MovSreg { d, s } => {
                let tid = tid_of(t, env.ntid);
                r[d as usize] = match s {
                    Sreg::TidX => tid[0],
                    Sreg::TidY => tid[1],
                    Sreg::TidZ => tid[2],
                    Sreg::NtidX => env.ntid[0],
                    Sreg::NtidY => env.ntid[1],
                    Sreg::NtidZ => env.ntid[2],
                    Sreg::CtaidX => env.ctaid[0],
                    Sreg::CtaidY => env.ctaid[1],
                    Sreg::CtaidZ => env.ctaid[2],
                    Sreg::NctaidX => env.nctaid[0],
                    Sreg::NctaidY => env.nctaid[1],
                    Sreg::NctaidZ => env.nctaid[2],
                    Sreg::LaneId => (t % 32) as u32,
                    Sreg::WarpId => (t / 32) as u32,
                } as u64
            }
            Op::Unpack { lo, hi, a, half } => {
                let v = val(r, a);
                r[lo as usize] = v & mask_bits(half);
                r[hi as usize] = (v >> half) & mask_bits(half);
            }
            Op::Pack { d, lo, hi, half } => {
                let m = mask_bits(half);
                r[d as usize] = (val(r, lo) & m) | ((val(r, hi) & m) << half);
            }
            Op::CvtPack { bf16: is_bf, d, hi, lo } => {
                let h = f32::from_bits(val(r, hi) as u32);
                let l = f32::from_bits(val(r, lo) as u32);
                let (hb, lb) = if is_bf {
                    (bf16::from_f32(h).to_bits(), bf16::from_f32(l).to_bits())
                } else {
                    (f16::from_f32(h).to_bits(), f16::from_f32(l).to_bits())
                };
                r[d as usize] = ((hb as u64) << 16) | lb as u64;
            }
            Op::Ld { space, n, width, sext: se, dmask, d, addr } => {
                let a = addr_of(r, addr);
                let w = width as usize;
                let total = w * n as usize;
                if let Err(f) = check_align(a, total) {
                    break Err(f);
                }
                let mut buf = [0u8; 32];
                if let Err(f) = m.read(space, a, &mut buf[..total]) {
                    break Err(f);
                }
                for j in 0..n as usize {
                    let mut v = le(&buf[j * w..(j + 1) * w]);
                    if se {
                        v = sext(v, 8 * w as u32) as u64;
                    }
                    r[d[j] as usize] = v & dmask;
                }
            }
            Op::St { space, n, width, v, addr } => {
                let a = addr_of(r, addr);
                let w = width as usize;
                let total = w * n as usize;
                if let Err(f) = check_align(a, total) {
                    break Err(f);
                }
                let mut buf = [0u8; 32];
                for j in 0..n as usize {
                    buf[j * w..(j + 1) * w].copy_from_slice(&val(r, v[j]).to_le_bytes()[..w]);
                }
                if let Err(f) = m.write(space, a, &buf[..total]) {
                    break Err(f);
                }
            }
            Op::Atom { space, op, t, d, addr, b, c } => {
                let a = addr_of(r, addr);
                let w = (t.bits() / 8) as usize;
                if let Err(f) = check_align(a, w) {
                    break Err(f);
                }
                let mut buf = [0u8; 8];
                if let Err(f) = m.read(space, a, &mut buf[..w]) {
                    break Err(f);
                }
                let old = le(&buf[..w]);
                let new = atom(op, t, old, val(r, b), val(r, c));
                if let Err(f) = m.write(space, a, &new.to_le_bytes()[..w]) {
                    break Err(f);
                }
                if let Some(d) = d {
                    r[d as usize] = old;
                }
            }
            Op::CpAsync { size, dst, src, src_size } => {
                let (da, sa) = (addr_of(r, dst), addr_of(r, src));
                let n = size as usize;
                let ss = val(r, src_size);
                if ss > size as u64 {
                    break Err(fault(EmuErrorKind::Unsupported(format!("cp.async src-size {ss} > {size}")), ""));
                }
                if let Err(f) = check_align(da, n).and_then(|_| check_align(sa, n)) {
                    break Err(f);
                }
                let mut data = [0u8; 16];
                if ss > 0 {
                    if let Err(f) = m.read(MSpace::Global, sa, &mut data[..ss as usize]) {
                        break Err(f);
                    }
                }
                let d = da as usize;
                if da > m.smem.len() as u64 || d + n > m.smem.len() {
                    break Err(m.oob(MSpace::Shared, da, n));
                }
                m.written[d..d + n].fill(2);
                let f = &mut m.inflight[t];
                f.copies.push(Copy { group: f.committed, dst: d, len: n as u8, data });
            }
            Op::CpCommit => m.inflight[t].committed += 1,
            Op::CpWait { n, commit } => {
                if commit {
                    m.inflight[t].committed += 1;
                }
                let upto = m.inflight[t].committed.saturating_sub(n);
                m.complete(t, upto);
            }
            Op::Nop => {}
            Op::Bar { id } => {
                p += 1;
                break Ok(Stop::Bar(id));
            }
            Op::Shfl { .. } | Op::Vote { .. } | Op::Mma { .. } | Op::Ldmatrix { .. } => break Ok(Stop::Collective),
            Op::Exit => break Ok(Stop::Exit),
        }
        p += 1;
    };
    *pc = p as u32;
    res
}

// ---- ALU semantics ----------------------------------------------------------

#[inline(always)]
fn flush32(x: f32) -> f32 {
    if x.is_subnormal() {
        0.0f32.copysign(x)
    } else {
        x
    }
}

#[inline(always)]
fn sat32(x: f32) -> f32 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(0.0, 1.0)
    }
}

/// PTX min/max: a NaN operand yields the other; -0 < +0.
#[inline]
fn fminmax32(x: f32, y: f32, max: bool) -> f32 {
    if x.is_nan() {
        return y;
    }
    if y.is_nan() {
        return x;
    }
    if x == y {
        let (a, b) = (x.to_bits(), y.to_bits());
        return f32::from_bits(if max { a & b } else { a | b });
    }
    if (x < y) != max {
        x
    } else {
        y
    }
}

#[inline]
fn fminmax64(x: f64, y: f64, max: bool) -> f64 {
    if x.is_nan() {
        return y;
    }
    if y.is_nan() {
        return x;
    }
    if x == y {
        let (a, b) = (x.to_bits(), y.to_bits());
        return f64::from_bits(if max { a & b } else { a | b });
    }
    if (x < y) != max {
        x
    } else {
        y
    }
}

#[inline]
fn bin(op: BinOp, t: NT, ftz: bool, sat: bool, a: u64, b: u64) -> u64 {
    match t {
        NT::F32 => {
            let (mut x, mut y) = (f32::from_bits(a as u32), f32::from_bits(b as u32));
            if ftz {
                x = flush32(x);
                y = flush32(y);
            }
            let mut z = match op {
                BinOp::Add => x + y,
                BinOp::Sub => x - y,
                BinOp::Mul => x * y,
                BinOp::Div => x / y,
                BinOp::Min => fminmax32(x, y, false),
                BinOp::Max => fminmax32(x, y, true),
                _ => unreachable!("decode rejects {op:?} on f32"),
            };
            if ftz {
                z = flush32(z);
            }
            if sat {
                z = sat32(z);
            }
            z.to_bits() as u64
        }
        NT::F64 => {
            let (x, y) = (f64::from_bits(a), f64::from_bits(b));
            let z = match op {
                BinOp::Add => x + y,
                BinOp::Sub => x - y,
                BinOp::Mul => x * y,
                BinOp::Div => x / y,
                BinOp::Min => fminmax64(x, y, false),
                BinOp::Max => fminmax64(x, y, true),
                _ => unreachable!("decode rejects {op:?} on f64"),
            };
            z.to_bits()
        }
        _ => int_bin(op, t, a, b),
    }
}

#[inline]
fn int_bin(op: BinOp, t: NT, a: u64, b: u64) -> u64 {
    let bits = t.bits();
    let m = t.mask();
    let (ua, ub) = (a & m, b & m);
    let signed = t.signed();
    let r = match op {
        BinOp::Add => ua.wrapping_add(ub),
        BinOp::Sub => ua.wrapping_sub(ub),
        BinOp::Mul => ua.wrapping_mul(ub),
        BinOp::MulHi => {
            if signed {
                ((sext(a, bits) as i128 * sext(b, bits) as i128) >> bits) as u64
            } else {
                ((ua as u128 * ub as u128) >> bits) as u64
            }
        }
        BinOp::MulWide => {
            // Only 16- and 32-bit sources: the product fits 64 bits.
            let w = if signed { sext(a, bits).wrapping_mul(sext(b, bits)) as u64 } else { ua.wrapping_mul(ub) };
            return w & mask_bits(2 * bits);
        }
        BinOp::Div => {
            if ub == 0 {
                m
            } else if signed {
                sext(a, bits).wrapping_div(sext(b, bits)) as u64
            } else {
                ua / ub
            }
        }
        BinOp::Rem => {
            if ub == 0 {
                ua
            } else if signed {
                sext(a, bits).wrapping_rem(sext(b, bits)) as u64
            } else {
                ua % ub
            }
        }
        BinOp::Min | BinOp::Max => {
            let less = if signed { sext(a, bits) < sext(b, bits) } else { ua < ub };
            if less == (op == BinOp::Min) {
                ua
            } else {
                ub
            }
        }
        BinOp::And => ua & ub,
        BinOp::Or => ua | ub,
        BinOp::Xor => ua ^ ub,
        BinOp::Shl => {
            // The shift amount is a u32; shifts past the width give 0.
            let s = b & 0xffff_ffff;
            if s >= bits as u64 {
                0
            } else {
                ua << s
            }
        }
        BinOp::Shr => {
            // Shifts past the width give 0, or the sign for signed types.
            let s = (b & 0xffff_ffff).min(bits as u64);
            if s >= bits as u64 && !signed {
                0
            } else if signed {
                let s = s.min(bits as u64 - 1);
                (sext(a, bits) >> s) as u64
            } else {
                ua >> s
            }
        }
    };
    if t == NT::Pred {
        r & 1
    } else {
        r & m
    }
}

#[inline]
fn mad(op: MadOp, t: NT, ftz: bool, sat: bool, a: u64, b: u64, c: u64) -> u64 {
    match op {
        MadOp::Fma => match t {
            NT::F32 => {
                let f = |v: u64| {
                    let x = f32::from_bits(v as u32);
                    if ftz {
                        flush32(x)
                    } else {
                        x
                    }
                };
                let mut z = f(a).mul_add(f(b), f(c));
                if ftz {
                    z = flush32(z);
                }
                if sat {
                    z = sat32(z);
                }
                z.to_bits() as u64
            }
            _ => f64::from_bits(a).mul_add(f64::from_bits(b), f64::from_bits(c)).to_bits(),
        },
        MadOp::Lo => int_bin(BinOp::Add, t, int_bin(BinOp::Mul, t, a, b), c),
        MadOp::Hi => int_bin(BinOp::Add, t, int_bin(BinOp::MulHi, t, a, b), c),
        MadOp::Wide => {
            let w = int_bin(BinOp::MulWide, t, a, b);
            w.wrapping_add(c) & mask_bits(2 * t.bits())
        }
    }
}

#[inline]
fn setp(cmp: CmpOp, t: NT, ftz: bool, a: u64, b: u64) -> bool {
    if t.is_float() {
        let (x, y) = if t == NT::F32 {
            let (mut x, mut y) = (f32::from_bits(a as u32), f32::from_bits(b as u32));
            if ftz {
                x = flush32(x);
                y = flush32(y);
            }
            (x as f64, y as f64)
        } else {
            (f64::from_bits(a), f64::from_bits(b))
        };
        let nan = x.is_nan() || y.is_nan();
        return match cmp {
            CmpOp::Eq => x == y,
            CmpOp::Ne => !nan && x != y,
            CmpOp::Lt => x < y,
            CmpOp::Le => x <= y,
            CmpOp::Gt => x > y,
            CmpOp::Ge => x >= y,
            CmpOp::Equ => nan || x == y,
            CmpOp::Neu => x != y,
            CmpOp::Ltu => nan || x < y,
            CmpOp::Leu => nan || x <= y,
            CmpOp::Gtu => nan || x > y,
            CmpOp::Geu => nan || x >= y,
            CmpOp::Num => !nan,
            CmpOp::Nan => nan,
            _ => unreachable!("decode rejects {cmp:?} on floats"),
        };
    }
    let bits = t.bits();
    let m = t.mask();
    let (ua, ub) = (a & m, b & m);
    let (sa, sb) = (sext(a, bits), sext(b, bits));
    let s = t.signed();
    match cmp {
        CmpOp::Eq => ua == ub,
        CmpOp::Ne => ua != ub,
        CmpOp::Lt => {
            if s {
                sa < sb
            } else {
                ua < ub
            }
        }
        CmpOp::Le => {
            if s {
                sa <= sb
            } else {
                ua <= ub
            }
        }
        CmpOp::Gt => {
            if s {
                sa > sb
            } else {
                ua > ub
            }
        }
        CmpOp::Ge => {
            if s {
                sa >= sb
            } else {
                ua >= ub
            }
        }
        CmpOp::Lo => ua < ub,
        CmpOp::Ls => ua <= ub,
        CmpOp::Hi => ua > ub,
        CmpOp::Hs => ua >= ub,
        _ => unreachable!("decode rejects {cmp:?} on integers"),
    }
}

#[inline]
fn un(op: UnOp, t: NT, ftz: bool, a: u64) -> u64 {
    match t {
        NT::F32 => {
            let mut x = f32::from_bits(a as u32);
            if ftz {
                x = flush32(x);
            }
            let z = match op {
                // Sign-bit operations: exact, NaN payloads kept.
                UnOp::Neg => f32::from_bits(x.to_bits() ^ 0x8000_0000),
                UnOp::Abs => f32::from_bits(x.to_bits() & 0x7fff_ffff),
                UnOp::Ex2 => x.exp2(),
                UnOp::Lg2 => x.log2(),
                UnOp::Rsqrt => (1.0 / (x as f64).sqrt()) as f32,
                UnOp::Rcp => 1.0 / x,
                UnOp::Sqrt => x.sqrt(),
                UnOp::Tanh => x.tanh(),
                UnOp::Sin => x.sin(),
                UnOp::Cos => x.cos(),
                _ => unreachable!("decode rejects {op:?} on f32"),
            };
            (if ftz { flush32(z) } else { z }).to_bits() as u64
        }
        NT::F64 => {
            let x = f64::from_bits(a);
            match op {
                UnOp::Neg => a ^ (1 << 63),
                UnOp::Abs => a & !(1 << 63),
                UnOp::Rsqrt => (1.0 / x.sqrt()).to_bits(),
                UnOp::Rcp => (1.0 / x).to_bits(),
                UnOp::Sqrt => x.sqrt().to_bits(),
                _ => unreachable!("decode rejects {op:?} on f64"),
            }
        }
        NT::Pred => (a & 1) ^ 1,
        _ => {
            let bits = t.bits();
            let m = t.mask();
            let ua = a & m;
            let r = match op {
                UnOp::Neg => ua.wrapping_neg(),
                UnOp::Abs => sext(a, bits).unsigned_abs(),
                UnOp::Not => !ua,
                UnOp::Cnot => (ua == 0) as u64,
                UnOp::Popc => ua.count_ones() as u64,
                UnOp::Clz => (ua.leading_zeros() - (64 - bits)) as u64,
                UnOp::Brev => ua.reverse_bits() >> (64 - bits),
                _ => unreachable!("decode rejects {op:?} on integers"),
            };
            r & m
        }
    }
}

#[inline]
fn atom(op: AtomOp, t: NT, old: u64, b: u64, c: u64) -> u64 {
    match (op, t) {
        (AtomOp::Add, NT::F32) => (f32::from_bits(old as u32) + f32::from_bits(b as u32)).to_bits() as u64,
        (AtomOp::Add, NT::F64) => (f64::from_bits(old) + f64::from_bits(b)).to_bits(),
        (AtomOp::Add, _) => int_bin(BinOp::Add, t, old, b),
        (AtomOp::Min, _) => int_bin(BinOp::Min, t, old, b),
        (AtomOp::Max, _) => int_bin(BinOp::Max, t, old, b),
        (AtomOp::And, _) => old & b,
        (AtomOp::Or, _) => old | b,
        (AtomOp::Xor, _) => old ^ b,
        (AtomOp::Exch, _) => b,
        (AtomOp::Cas, _) => {
            if old == b {
                c
            } else {
                old
            }
        }
    }
}

// ---- conversions ---------------------------------------------------------------

fn next_up(b: u64, w: u32) -> u64 {
    let sign = 1u64 << (w - 1);
    if b == 0 || b == sign {
        1
    } else if b & sign == 0 {
        b + 1
    } else {
        b - 1
    }
}

fn next_down(b: u64, w: u32) -> u64 {
    let sign = 1u64 << (w - 1);
    if b == 0 || b == sign {
        sign | 1
    } else if b & sign == 0 {
        b - 1
    } else {
        b + 1
    }
}

/// `x` rounded to f32 with round-to-odd: rounding that again to a format of
/// at most 22 significant bits is the correctly rounded result (the `half`
/// crate's f64 conversions drop sticky bits, so they are not used).
fn f64_to_f32_odd(x: f64) -> f32 {
    let f = x as f32;
    if f as f64 == x || x.is_nan() {
        return f;
    }
    let mut b = f.to_bits() as u64;
    if (f as f64).abs() > x.abs() {
        b = next_down(b & 0x7fff_ffff, 32) | (b & 0x8000_0000);
    }
    f32::from_bits((b | 1) as u32)
}

/// Encodes `x` in float type `to` with rounding `rnd` (directed roundings
/// adjust the round-to-nearest result by one ulp when it went the wrong way).
fn round_float(to: CT, x: f64, rnd: Rnd) -> u64 {
    let (b, back) = match to {
        CT::F64 => return x.to_bits(),
        CT::F32 => {
            let f = x as f32;
            (f.to_bits() as u64, f as f64)
        }
        CT::F16 => {
            let h = f16::from_f32(f64_to_f32_odd(x));
            (h.to_bits() as u64, h.to_f64())
        }
        _ => {
            let h = bf16::from_f32(f64_to_f32_odd(x));
            (h.to_bits() as u64, h.to_f64())
        }
    };
    if x.is_nan() || back == x {
        return b;
    }
    let w = to.bits();
    match rnd {
        Rnd::Rz if back.abs() > x.abs() => {
            if back > 0.0 {
                next_down(b, w)
            } else {
                next_up(b, w)
            }
        }
        Rnd::Rm if back > x => next_down(b, w),
        Rnd::Rp if back < x => next_up(b, w),
        _ => b,
    }
}

fn int_range(to: CT) -> (i128, i128) {
    let bits = to.bits();
    if to.signed() {
        (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1)
    } else {
        (0, (1i128 << bits) - 1)
    }
}

fn int_to_reg(v: i128, to: CT, dmask: u64) -> u64 {
    let x = (v as u64) & mask_bits(to.bits());
    if to.signed() {
        (sext(x, to.bits()) as u64) & dmask
    } else {
        x & dmask
    }
}

fn cvt(to: CT, from: CT, rnd: Rnd, ftz: bool, sat: bool, dmask: u64, a: u64) -> u64 {
    let out_float = |z: u64| -> u64 {
        let mut z = z;
        if to == CT::F32 {
            let mut f = f32::from_bits(z as u32);
            if ftz {
                f = flush32(f);
            }
            if sat {
                f = sat32(f);
            }
            z = f.to_bits() as u64;
        } else if sat {
            let f = match to {
                CT::F64 => f64::from_bits(z),
                CT::F16 => f16::from_bits(z as u16).to_f64(),
                _ => bf16::from_bits(z as u16).to_f64(),
            };
            let c = if f.is_nan() { 0.0 } else { f.clamp(0.0, 1.0) };
            z = round_float(to, c, Rnd::Rn);
        }
        z & dmask
    };
    if !from.is_float() {
        let v: i128 = if from.signed() { sext(a, from.bits()) as i128 } else { (a & mask_bits(from.bits())) as i128 };
        if !to.is_float() {
            let v = if sat {
                let (lo, hi) = int_range(to);
                v.clamp(lo, hi)
            } else {
                v
            };
            return int_to_reg(v, to, dmask);
        }
        let z = match to {
            CT::F32 if from.bits() == 64 => (v as f32).to_bits() as u64,
            CT::F64 => (v as f64).to_bits(),
            _ => round_float(to, v as f64, rnd),
        };
        return out_float(z);
    }
    let x = match from {
        CT::F16 => f16::from_bits(a as u16).to_f64(),
        CT::BF16 => bf16::from_bits(a as u16).to_f64(),
        CT::F32 => {
            let f = f32::from_bits(a as u32);
            (if ftz { flush32(f) } else { f }) as f64
        }
        _ => f64::from_bits(a),
    };
    let integral = |x: f64| match rnd {
        Rnd::Rni => x.round_ties_even(),
        Rnd::Rzi => x.trunc(),
        Rnd::Rmi => x.floor(),
        Rnd::Rpi => x.ceil(),
        _ => x,
    };
    if !to.is_float() {
        // Float to integer saturates; NaN gives 0.
        if x.is_nan() {
            return 0;
        }
        let y = integral(x);
        let (lo, hi) = int_range(to);
        let v = if y <= lo as f64 {
            lo
        } else if y >= hi as f64 {
            hi
        } else {
            y as i128
        };
        return int_to_reg(v, to, dmask);
    }
    out_float(round_float(to, integral(x), rnd))
}

// ---- launch and block scheduling ----------------------------------------------

fn arg_ok(ty: Ty, a: &Arg) -> bool {
    matches!(
        (ty, a),
        (Ty::U64 | Ty::B64 | Ty::S64, Arg::Ptr(_) | Arg::U64(_))
            | (Ty::U32 | Ty::B32, Arg::U32(_))
            | (Ty::S32, Arg::S32(_))
            | (Ty::F32, Arg::F32(_))
    )
}

struct Launch<'a> {
    k: &'a Kernel,
    dec: &'a Decoded,
    env: Env,
}

impl Launch<'_> {
    fn locate(&self, f: Fault, pc: Option<u32>, t: Option<usize>) -> EmuError {
        let mut e = EmuError::new(&self.k.name, f.kind, f.detail);
        if let Some(pc) = pc {
            let pc = pc as usize;
            e.pc = Some(pc);
            e.instr = Some(match self.dec.body_index.get(pc) {
                Some(&bi) => match &self.k.body[bi] {
                    Stmt::Instr(i) => i.to_string(),
                    _ => unreachable!(),
                },
                None => "<end of kernel>".to_string(),
            });
        }
        e.ctaid = Some(self.env.ctaid);
        e.tid = t.map(|t| tid_of(t, self.env.ntid));
        e
    }

    fn thread_name(&self, t: usize) -> String {
        let [x, y, z] = tid_of(t, self.env.ntid);
        format!("thread ({x},{y},{z})")
    }
}

pub(crate) fn launch(
    k: &Kernel,
    grid: [u32; 3],
    block: [u32; 3],
    args: &[Arg],
    dev: &mut Device,
) -> Result<LaunchStats, EmuError> {
    let nthreads = block.iter().map(|&b| b as u64).product::<u64>();
    let nblocks = grid.iter().map(|&g| g as u64).product::<u64>();
    if nthreads == 0 || nthreads > 1024 || nblocks == 0 {
        return Err(EmuError::new(
            &k.name,
            EmuErrorKind::BadLaunch,
            format!("grid {grid:?} block {block:?}: need 1..=1024 threads per block and a non-empty grid"),
        ));
    }
    if let Some(m) = k.max_threads {
        if nthreads > m as u64 {
            return Err(EmuError::new(
                &k.name,
                EmuErrorKind::BadLaunch,
                format!("block of {nthreads} threads exceeds .maxntid {m}"),
            ));
        }
    }
    let mut dec = decode(k)?;
    // A sentinel so falling off the end of the body is an exit, with no bounds test per step.
    dec.code.push(DInstr { guard: None, op: Op::Exit });

    if args.len() != k.params.len() {
        return Err(EmuError::new(
            &k.name,
            EmuErrorKind::BadArgs,
            format!("the kernel takes {} params, got {} args", k.params.len(), args.len()),
        ));
    }
    let mut params = vec![0u8; dec.param_bytes];
    for ((p, a), &off) in k.params.iter().zip(args).zip(&dec.param_offsets) {
        if !arg_ok(p.ty, a) {
            return Err(EmuError::new(
                &k.name,
                EmuErrorKind::BadArgs,
                format!("param `{}` is .{}, got {a:?}", p.name, p.ty),
            ));
        }
        if let Arg::Ptr(ptr) = a {
            if !dev.valid_ptr(*ptr) {
                return Err(EmuError::new(
                    &k.name,
                    EmuErrorKind::BadArgs,
                    format!("param `{}`: {ptr:#x} points into no allocation ({})", p.name, describe_nearest(dev, *ptr)),
                ));
            }
        }
        let bytes: [u8; 8] = match *a {
            Arg::Ptr(v) | Arg::U64(v) => v.to_le_bytes(),
            Arg::U32(v) => (v as u64).to_le_bytes(),
            Arg::S32(v) => (v as u32 as u64).to_le_bytes(),
            Arg::F32(v) => (v.to_bits() as u64).to_le_bytes(),
        };
        let n = p.ty.bytes();
        params[off..off + n].copy_from_slice(&bytes[..n]);
    }

    let nt = nthreads as usize;
    let ns = dec.nslots;
    let mut regs = vec![0u64; nt * ns];
    let mut pcs = vec![0u32; nt];
    let mut state = vec![TState::Ready; nt];
    let mut smem = vec![0u8; dec.shared_bytes];
    let mut written = vec![0u8; dec.shared_bytes];
    let mut inflight = vec![InFlight::default(); nt];
    let mut budget = dev.step_limit;
    let mut stats = LaunchStats { blocks: nblocks, threads: nblocks * nthreads, ..Default::default() };

    for bz in 0..grid[2] {
        for by in 0..grid[1] {
            for bx in 0..grid[0] {
                let l = Launch { k, dec: &dec, env: Env { ntid: block, nctaid: grid, ctaid: [bx, by, bz] } };
                regs.fill(0);
                pcs.fill(0);
                state.fill(TState::Ready);
                written.fill(0);
                inflight.fill(InFlight::default());
                let mut mem =
                    Mem { dev, smem: &mut smem, written: &mut written, params: &params, inflight: &mut inflight };
                run_block(&l, &mut regs, &mut pcs, &mut state, &mut mem, &mut budget, &mut stats)?;
            }
        }
    }
    stats.instructions = dev.step_limit - budget;
    Ok(stats)
}

fn run_block(
    l: &Launch,
    regs: &mut [u64],
    pcs: &mut [u32],
    state: &mut [TState],
    mem: &mut Mem,
    budget: &mut u64,
    stats: &mut LaunchStats,
) -> Result<(), EmuError> {
    let nt = state.len();
    let ns = l.dec.nslots;
    let code = &l.dec.code;
    loop {
        for t in 0..nt {
            if state[t] != TState::Ready {
                continue;
            }
            let r = &mut regs[t * ns..(t + 1) * ns];
            match run_thread(code, r, &mut pcs[t], mem, &l.env, t, budget) {
                Ok(Stop::Bar(id)) => state[t] = TState::Bar(id),
                Ok(Stop::Collective) => state[t] = TState::Coll,
                Ok(Stop::Exit) => state[t] = TState::Exited,
                Err(f) => return Err(l.locate(f, Some(pcs[t]), Some(t))),
            }
        }
        // Every thread is now at a barrier, a collective, or gone.
        let mut progressed = false;
        for w in 0..nt.div_ceil(32) {
            let (lo, hi) = (w * 32, (w * 32 + 32).min(nt));
            let Some(first) = (lo..hi).find(|&t| state[t] == TState::Coll) else { continue };
            let pc0 = pcs[first];
            let div = |detail: String| l.locate(fault(EmuErrorKind::WarpDivergence, detail), Some(pc0), Some(first));
            if hi - lo < 32 {
                return Err(div(format!(
                    "warp {w} has only {} lanes (block of {nt} threads): collectives need full warps",
                    hi - lo
                )));
            }
            if let Some(t) = (lo..hi).find(|&t| state[t] != TState::Coll || pcs[t] != pc0) {
                let where_ = match state[t] {
                    TState::Coll => format!("waits at a different collective, pc {}", pcs[t]),
                    TState::Bar(_) => format!("waits at a barrier (before pc {})", pcs[t]),
                    TState::Exited => "exited".to_string(),
                    TState::Ready => unreachable!(),
                };
                return Err(div(format!("lane {} ({}) {where_}", t - lo, l.thread_name(t))));
            }
            collective(l, regs, pc0 as usize, lo, mem).map_err(|(f, lane)| l.locate(f, Some(pc0), Some(lo + lane)))?;
            for t in lo..hi {
                pcs[t] += 1;
                state[t] = TState::Ready;
            }
            stats.collectives += 1;
            progressed = true;
        }
        if progressed {
            continue;
        }
        let waiting = (0..nt).find(|&t| matches!(state[t], TState::Bar(_)));
        let exited = (0..nt).find(|&t| state[t] == TState::Exited);
        match (waiting, exited) {
            (None, _) => return Ok(()),
            (Some(w), Some(e)) => {
                return Err(l.locate(
                    fault(
                        EmuErrorKind::BarrierDivergence,
                        format!("{} exited while {} waits at this barrier", l.thread_name(e), l.thread_name(w)),
                    ),
                    Some(pcs[w] - 1),
                    Some(w),
                ));
            }
            (Some(w), None) => {
                let TState::Bar(id) = state[w] else { unreachable!() };
                if let Some(t) = (0..nt).find(|&t| state[t] != TState::Bar(id)) {
                    return Err(l.locate(
                        fault(
                            EmuErrorKind::BarrierDivergence,
                            format!(
                                "{} waits at barrier {id}, {} at another barrier id",
                                l.thread_name(w),
                                l.thread_name(t)
                            ),
                        ),
                        Some(pcs[w] - 1),
                        Some(w),
                    ));
                }
                state.fill(TState::Ready);
                stats.barriers += 1;
            }
        }
    }
}

/// Executes the collective at `pc` for the full warp starting at thread
/// `lo`. Errors name the lane (0..32) at fault.
fn collective(l: &Launch, regs: &mut [u64], pc: usize, lo: usize, mem: &mut Mem) -> Result<(), (Fault, usize)> {
    let ns = l.dec.nslots;
    let reg = |regs: &[u64], lane: usize, s: u32| regs[(lo + lane) * ns + s as usize];
    let src = |regs: &[u64], lane: usize, s: Src| match s {
        Src::R(i) => regs[(lo + lane) * ns + i as usize],
        Src::I(v) => v,
    };
    let full_mask = |regs: &[u64], mask: Src| -> Result<(), (Fault, usize)> {
        for lane in 0..32 {
            let m = src(regs, lane, mask) as u32;
            if m != u32::MAX {
                return Err((
                    fault(EmuErrorKind::Unsupported(format!("membermask {m:#x} (only 0xffffffff)")), ""),
                    lane,
                ));
            }
        }
        Ok(())
    };
    match l.dec.code[pc].op {
        Op::Shfl { mode, d, a, b, c, mask } => {
            full_mask(regs, mask)?;
            let mut vals = [0u64; 32];
            for (lane, v) in vals.iter_mut().enumerate() {
                *v = src(regs, lane, a) & 0xffff_ffff;
            }
            for lane in 0..32usize {
                let bv = src(regs, lane, b) as u32 & 0x1f; // PTX uses b[4:0]
                let cv = src(regs, lane, c) as u32;
                let (clamp, seg) = (cv & 0x1f, (cv >> 8) & 0x1f);
                let lane_u = lane as u32;
                let min_lane = lane_u & seg;
                let max_lane = min_lane | (clamp & !seg);
                let (j, ok) = match mode {
                    ShflMode::Up => {
                        let j = lane_u.wrapping_sub(bv) as i64;
                        (j, j >= max_lane as i64)
                    }
                    ShflMode::Down => {
                        let j = lane_u as i64 + bv as i64;
                        (j, j <= max_lane as i64)
                    }
                    ShflMode::Bfly => {
                        let j = (lane_u ^ bv) as i64;
                        (j, j <= max_lane as i64)
                    }
                    ShflMode::Idx => {
                        let j = (min_lane | (bv & !seg)) as i64;
                        (j, j <= max_lane as i64)
                    }
                };
                let j = if ok && (0..32).contains(&j) { j as usize } else { lane };
                regs[(lo + lane) * ns + d as usize] = vals[j];
            }
        }
        Op::Vote { mode, d, p, mask } => {
            full_mask(regs, mask)?;
            let mut ballot = 0u32;
            for lane in 0..32 {
                if src(regs, lane, p) & 1 != 0 {
                    ballot |= 1 << lane;
                }
            }
            let v = match mode {
                VoteMode::Ballot => ballot as u64,
                VoteMode::Any => (ballot != 0) as u64,
                VoteMode::All => (ballot == u32::MAX) as u64,
                VoteMode::Uni => (ballot == 0 || ballot == u32::MAX) as u64,
            };
            for lane in 0..32 {
                regs[(lo + lane) * ns + d as usize] = v;
            }
        }
        Op::Mma { bf16: is_bf, d, a, b, c } => {
            let h = |x: u64| -> f32 {
                let x = x as u16;
                if is_bf {
                    f32::from_bits((x as u32) << 16)
                } else {
                    f16::from_bits(x).to_f32()
                }
            };
            let mut am = [[0f32; 16]; 16];
            let mut bm = [[0f32; 8]; 16];
            let mut cm = [[0f32; 8]; 16];
            for lane in 0..32 {
                let (g, t) = (lane >> 2, lane & 3);
                let ar: [u64; 4] = std::array::from_fn(|i| reg(regs, lane, a[i]));
                for (i, &(row, col)) in
                    [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)].iter().enumerate()
                {
                    am[row][col] = h(ar[i]);
                    am[row][col + 1] = h(ar[i] >> 16);
                }
                for (i, k0) in [2 * t, 2 * t + 8].into_iter().enumerate() {
                    let v = reg(regs, lane, b[i]);
                    bm[k0][g] = h(v);
                    bm[k0 + 1][g] = h(v >> 16);
                }
                for (i, &(row, col)) in
                    [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)].iter().enumerate()
                {
                    cm[row][col] = f32::from_bits(reg(regs, lane, c[i]) as u32);
                }
            }
            for lane in 0..32 {
                let (g, t) = (lane >> 2, lane & 3);
                for (i, &(row, col)) in
                    [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)].iter().enumerate()
                {
                    // Products of 16-bit floats are exact in f32; sum k ascending, then add C.
                    let mut s = 0f32;
                    for (k, bk) in bm.iter().enumerate() {
                        s += am[row][k] * bk[col];
                    }
                    regs[(lo + lane) * ns + d[i] as usize] = (s + cm[row][col]).to_bits() as u64;
                }
            }
        }
        Op::Ldmatrix { n, trans, d, addr } => {
            let n = n as usize;
            let mut rows = [[[0u16; 8]; 8]; 4];
            for (i, mat) in rows.iter_mut().enumerate().take(n) {
                for (row, rv) in mat.iter_mut().enumerate() {
                    let lane = 8 * i + row;
                    let base = match addr.base {
                        Some(s) => reg(regs, lane, s),
                        None => 0,
                    };
                    let a = base.wrapping_add(addr.off as u64);
                    check_align(a, 16).map_err(|f| (f, lane))?;
                    let mut buf = [0u8; 16];
                    mem.read(MSpace::Shared, a, &mut buf).map_err(|f| (f, lane))?;
                    for (e, x) in rv.iter_mut().enumerate() {
                        *x = u16::from_le_bytes([buf[2 * e], buf[2 * e + 1]]);
                    }
                }
            }
            for lane in 0..32 {
                let (g, t) = (lane >> 2, lane & 3);
                for (i, mat) in rows.iter().enumerate().take(n) {
                    let (lo16, hi16) =
                        if trans { (mat[2 * t][g], mat[2 * t + 1][g]) } else { (mat[g][2 * t], mat[g][2 * t + 1]) };
                    regs[(lo + lane) * ns + d[i] as usize] = lo16 as u64 | (hi16 as u64) << 16;
                }
            }
        }
        _ => unreachable!("not a collective"),
    }
    Ok(())
}
