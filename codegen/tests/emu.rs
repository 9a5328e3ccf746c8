//! The PTX emulator against CPU references: kernels built with the
//! KernelBuilder, outputs poisoned with NaN (0xFF) before each launch, and
//! every error kind provoked by a deliberately broken kernel.
//!
//! Tolerances: integer, conversion and bit results are exact. f32 sums are
//! compared with a relative tolerance of 1e-5 (summation order differs from
//! the f64 reference); mma results (bf16/f16 inputs, f32 accumulate) with
//! 1e-5 relative to the sum of |products|; builder math with the bound
//! stated on each check.

use half::{bf16, f16};
use proptest::prelude::*;
use qvc_codegen::emu::{run, Arg, Device, EmuErrorKind, LaunchStats, Program};
use qvc_codegen::*;

/// The test kernels must be valid PTX, not just something the emulator
/// accepts: each is assembled once for sm_80 and sm_90 where ptxas exists.
fn assert_assembles(k: &Kernel) {
    assert_assembles_for(k, &Target::ALL);
}

fn assert_assembles_for(k: &Kernel, targets: &[Target]) {
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let Some(ptxas) = ptxas::for_tests() else { return };
    let text = Module::new(Target::Sm80, vec![k.clone()]).print();
    if SEEN.lock().unwrap().contains(&text) {
        return;
    }
    for &t in targets {
        let text = Module::new(t, vec![k.clone()]).print();
        ptxas::assemble(&ptxas, &text, t).unwrap_or_else(|e| panic!("{} for {}: {e}", k.name, t.name()));
    }
    SEEN.lock().unwrap().push(text);
}

fn go(k: &Kernel, grid: u32, block: u32, args: &[Arg], dev: &mut Device) -> LaunchStats {
    assert_assembles(k);
    run(k, [grid, 1, 1], [block, 1, 1], args, dev).unwrap_or_else(|e| panic!("{e}"))
}

/// A launch that must fail; the kernel is still valid PTX.
fn err(k: &Kernel, grid: u32, block: u32, args: &[Arg], dev: &mut Device) -> qvc_codegen::emu::EmuError {
    assert_assembles(k);
    err_unchecked(k, grid, block, args, dev)
}

fn err_unchecked(k: &Kernel, grid: u32, block: u32, args: &[Arg], dev: &mut Device) -> qvc_codegen::emu::EmuError {
    match run(k, [grid, 1, 1], [block, 1, 1], args, dev) {
        Ok(_) => panic!("kernel {} should have failed", k.name),
        Err(e) => e,
    }
}

/// Deterministic xorshift data (never all zeros).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f32(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32(lo, hi)).collect()
    }
}

fn global_index(b: &mut KernelBuilder) -> Reg {
    let tid = b.special(Sreg::TidX);
    let ctaid = b.special(Sreg::CtaidX);
    let ntid = b.special(Sreg::NtidX);
    b.mad(Ty::U32, ctaid, ntid, tid)
}

// ---- kernels -------------------------------------------------------------------

fn vec_add() -> Kernel {
    let mut b = KernelBuilder::new("vec_add");
    let a = b.ptr_param("a");
    let c = b.ptr_param("b");
    let out = b.ptr_param("c");
    let n = b.param("n", Ty::U32);
    let i = global_index(&mut b);
    let inb = b.setp(Cmp::Lt, Ty::U32, i, n);
    b.if_then(inb, false, |b| {
        let pa = b.index_addr(a, i, 4);
        let pb = b.index_addr(c, i, 4);
        let po = b.index_addr(out, i, 4);
        let x = b.ld(Space::GlobalNc, Ty::F32, Addr::reg(pa, 0));
        let y = b.ld(Space::GlobalNc, Ty::F32, Addr::reg(pb, 0));
        let s = b.add(Ty::F32, x, y);
        b.st(Space::Global, Ty::F32, Addr::reg(po, 0), s);
    });
    b.ret();
    b.finish()
}

/// Grid-stride sum, warp shuffles, shared partials, one f32 per block.
fn block_sum() -> Kernel {
    let mut b = KernelBuilder::new("block_sum");
    let x = b.ptr_param("x");
    let out = b.ptr_param("out");
    let n = b.param("n", Ty::U32);
    let tid = b.special(Sreg::TidX);
    let ctaid = b.special(Sreg::CtaidX);
    let ntid = b.special(Sreg::NtidX);
    let nctaid = b.special(Sreg::NctaidX);
    let smem = b.shared("partial", 32 * 4, 4);
    let acc = b.mov(Ty::F32, 0.0f32);
    let i = b.mad(Ty::U32, ctaid, ntid, tid);
    let stride = b.mul(Ty::U32, ntid, nctaid);
    let top = b.label("top");
    let exit = b.label("exit");
    let done = b.setp(Cmp::Ge, Ty::U32, i, n);
    b.bra_if(done, false, &exit);
    b.place(&top);
    let p = b.index_addr(x, i, 4);
    let v = b.ld(Space::Global, Ty::F32, Addr::reg(p, 0));
    b.bin_into("add", Ty::F32, acc, acc, v);
    b.bin_into("add", Ty::U32, i, i, stride);
    let more = b.setp(Cmp::Lt, Ty::U32, i, n);
    b.bra_if(more, false, &top);
    b.place(&exit);
    let r = b.warp_reduce_f32("add", acc);
    let lane = b.and(Ty::B32, tid, 31u32);
    let warp = b.shr(Ty::U32, tid, 5u32);
    let is0 = b.setp(Cmp::Eq, Ty::U32, lane, 0u32);
    let woff = b.shl(Ty::B32, warp, 2u32);
    let sa = b.add(Ty::U32, smem, woff);
    b.ins_if(is0, false, "st.shared.f32", vec![Addr::reg(sa, 0).into(), r.into()]);
    b.bar_sync();
    let w0 = b.setp(Cmp::Eq, Ty::U32, warp, 0u32);
    b.if_then(w0, false, |b| {
        let nw = b.shr(Ty::U32, ntid, 5u32);
        let v = b.mov(Ty::F32, 0.0f32);
        let has = b.setp(Cmp::Lt, Ty::U32, lane, nw);
        let loff = b.shl(Ty::B32, lane, 2u32);
        let la = b.add(Ty::U32, smem, loff);
        b.ins_if(has, false, "ld.shared.f32", vec![v.into(), Addr::reg(la, 0).into()]);
        let s = b.warp_reduce_f32("add", v);
        let po = b.index_addr(out, ctaid, 4);
        b.ins_if(is0, false, "st.global.f32", vec![Addr::reg(po, 0).into(), s.into()]);
    });
    b.ret();
    b.finish()
}

/// One warp: D[16×8] = A[16×K] · W[8×K]ᵀ with fragments loaded straight
/// from global memory (A row-major, W the Linear weight layout).
fn mma_global(ab: Ty, k: u32) -> Kernel {
    let mut b = KernelBuilder::new(format!("mma_global_{ab}"));
    b.max_threads(32);
    let a = b.ptr_param("a");
    let w = b.ptr_param("w");
    let d = b.ptr_param("d");
    let tid = b.special(Sreg::TidX);
    let g = b.shr(Ty::U32, tid, 2u32);
    let t = b.and(Ty::B32, tid, 3u32);
    let t2 = b.shl(Ty::B32, t, 1u32);
    let acc: [Reg; 4] = std::array::from_fn(|_| b.mov(Ty::F32, 0.0f32));
    let row = b.mad(Ty::U32, g, k, t2);
    for kk in (0..k).step_by(16) {
        let idx = b.add(Ty::U32, row, kk);
        let pa = b.index_addr(a, idx, 2);
        let a0 = b.ld(Space::GlobalNc, Ty::B32, Addr::reg(pa, 0));
        let a1 = b.ld(Space::GlobalNc, Ty::B32, Addr::reg(pa, 8 * k as i64 * 2));
        let a2 = b.ld(Space::GlobalNc, Ty::B32, Addr::reg(pa, 16));
        let a3 = b.ld(Space::GlobalNc, Ty::B32, Addr::reg(pa, 8 * k as i64 * 2 + 16));
        let pw = b.index_addr(w, idx, 2);
        let b0 = b.ld(Space::GlobalNc, Ty::B32, Addr::reg(pw, 0));
        let b1 = b.ld(Space::GlobalNc, Ty::B32, Addr::reg(pw, 16));
        b.mma_m16n8k16(ab, &acc, &[a0, a1, a2, a3], &[b0, b1], &acc);
    }
    store_d(&mut b, d, g, t2, &acc);
    b.ret();
    b.finish()
}

/// Stores a 16×8 f32 accumulator fragment to row-major `d`.
fn store_d(b: &mut KernelBuilder, d: Reg, g: Reg, t2: Reg, acc: &[Reg; 4]) {
    let idx = b.mad(Ty::U32, g, 8u32, t2);
    let pd = b.index_addr(d, idx, 4);
    b.st_v(Space::Global, Ty::F32, Addr::reg(pd, 0), &acc[..2]);
    b.st_v(Space::Global, Ty::F32, Addr::reg(pd, 8 * 8 * 4), &acc[2..]);
}

/// One warp: A (16×16 bf16, row stride 32 bytes) and B (16×8 bf16, K×N
/// row-major) copied to shared memory with cp.async, zero-filling columns
/// (of A) and rows (of B) at or beyond `kv`; fragments by ldmatrix (.x4 for
/// A, .x2.trans for B); D = A·B.
fn mma_ldmatrix() -> Kernel {
    let mut b = KernelBuilder::new("mma_ldmatrix");
    b.max_threads(32);
    let a = b.ptr_param("a");
    let bm = b.ptr_param("b");
    let d = b.ptr_param("d");
    let kv = b.param("kv", Ty::S32);
    let tid = b.special(Sreg::TidX);
    let sa = b.shared("sa", 16 * 32, 128);
    let sb = b.shared("sb", 16 * 16, 128);
    // A: lane copies row lane>>1, columns 8·(lane&1)..+8.
    let arow = b.shr(Ty::U32, tid, 1u32);
    let ahalf = b.and(Ty::B32, tid, 1u32);
    let aoff0 = b.shl(Ty::B32, arow, 5u32);
    let hoff = b.shl(Ty::B32, ahalf, 4u32);
    let aoff = b.add(Ty::U32, aoff0, hoff);
    let asrc = b.mul_wide_u32(aoff, 1u32);
    let asrc = b.add(Ty::U64, a, asrc);
    let adst = b.add(Ty::U32, sa, aoff);
    let col0 = b.shl(Ty::B32, ahalf, 3u32);
    let left = b.sub(Ty::S32, kv, col0);
    let left = b.max(Ty::S32, left, 0i32);
    let left = b.min(Ty::S32, left, 8i32);
    let abytes = b.shl(Ty::B32, left, 1u32);
    b.cp_async16(Addr::reg(adst, 0), Addr::reg(asrc, 0), abytes);
    // B: lane copies row lane&15 (lanes 16..31 repeat 0..15).
    let brow = b.and(Ty::B32, tid, 15u32);
    let boff = b.shl(Ty::B32, brow, 4u32);
    let bsrc = b.mul_wide_u32(boff, 1u32);
    let bsrc = b.add(Ty::U64, bm, bsrc);
    let bdst = b.add(Ty::U32, sb, boff);
    let inrow = b.setp(Cmp::Lt, Ty::S32, brow, kv);
    let bbytes = b.selp(Ty::U32, 16u32, 0u32, inrow);
    b.cp_async16(Addr::reg(bdst, 0), Addr::reg(bsrc, 0), bbytes);
    b.cp_async_commit();
    b.cp_async_wait(0);
    b.bar_sync();
    // ldmatrix.x4 for A: matrix i = lane>>3 is rows 8·(i&1).., columns 8·(i>>1)..
    let r = b.and(Ty::B32, tid, 7u32);
    let mi = b.shr(Ty::U32, tid, 3u32);
    let mlo = b.and(Ty::B32, mi, 1u32);
    let mhi = b.shr(Ty::U32, mi, 1u32);
    let rr = b.mad(Ty::U32, mlo, 8u32, r);
    let ro = b.shl(Ty::B32, rr, 5u32);
    let co = b.shl(Ty::B32, mhi, 4u32);
    let lo = b.add(Ty::U32, ro, co);
    let la = b.add(Ty::U32, sa, lo);
    let af = b.ldmatrix(4, false, Addr::reg(la, 0));
    let lb = b.add(Ty::U32, sb, boff);
    let bf = b.ldmatrix(2, true, Addr::reg(lb, 0));
    let acc: [Reg; 4] = std::array::from_fn(|_| b.mov(Ty::F32, 0.0f32));
    b.mma_m16n8k16(Ty::BF16, &acc, &af.try_into().unwrap(), &bf.try_into().unwrap(), &acc);
    let g = b.shr(Ty::U32, tid, 2u32);
    let t = b.and(Ty::B32, tid, 3u32);
    let t2 = b.shl(Ty::B32, t, 1u32);
    store_d(&mut b, d, g, t2, &acc);
    b.ret();
    b.finish()
}

fn to_bits16(v: &[f32], ab: Ty) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| if ab == Ty::BF16 { bf16::from_f32(x).to_le_bytes() } else { f16::from_f32(x).to_le_bytes() })
        .collect()
}

fn from_bits16(v: &[f32], ab: Ty) -> Vec<f64> {
    v.iter().map(|&x| if ab == Ty::BF16 { bf16::from_f32(x).to_f64() } else { f16::from_f32(x).to_f64() }).collect()
}

fn check_gemm(got: &[f32], a: &[f64], bkn: impl Fn(usize, usize) -> f64, m: usize, n: usize, k: usize) {
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut mag) = (0.0f64, 0.0f64);
            for kk in 0..k {
                let p = a[i * k + kk] * bkn(kk, j);
                s += p;
                mag += p.abs();
            }
            let g = got[i * n + j] as f64;
            assert!((g - s).abs() <= 1e-5 * mag + 1e-30, "D[{i}][{j}] = {g}, want {s}");
        }
    }
}

// ---- functional tests -----------------------------------------------------------

#[test]
fn vector_add_ragged_tail() {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let n = 1000; // not a multiple of the 128-thread block
    let a = rng.vec(n, -10.0, 10.0);
    let c = rng.vec(n, -10.0, 10.0);
    let mut dev = Device::new();
    let (pa, pb) = (dev.upload_f32(&a), dev.upload_f32(&c));
    let pc = dev.alloc_poisoned(n * 4);
    let k = vec_add();
    let stats =
        go(&k, n.div_ceil(128) as u32, 128, &[Arg::Ptr(pa), Arg::Ptr(pb), Arg::Ptr(pc), Arg::U32(n as u32)], &mut dev);
    let got = dev.download_f32(pc, n);
    for i in 0..n {
        assert_eq!(got[i], a[i] + c[i], "element {i}");
    }
    assert_eq!(stats.blocks, 8);
    assert_eq!(stats.threads, 1024);
    assert!(stats.instructions > 1024 * 10);
}

#[test]
fn block_reduction_with_shuffles_and_shared_memory() {
    let mut rng = Rng(12345);
    let n = 5003;
    let x = rng.vec(n, -1.0, 1.0);
    let mut dev = Device::new();
    let px = dev.upload_f32(&x);
    let blocks = 3;
    let po = dev.alloc_poisoned(blocks * 4);
    let stats = go(&block_sum(), blocks as u32, 256, &[Arg::Ptr(px), Arg::Ptr(po), Arg::U32(n as u32)], &mut dev);
    let got: f64 = dev.download_f32(po, blocks).iter().map(|&v| v as f64).sum();
    let want: f64 = x.iter().map(|&v| v as f64).sum();
    let mag: f64 = x.iter().map(|&v| v.abs() as f64).sum();
    assert!((got - want).abs() <= 1e-5 * mag, "{got} vs {want}");
    assert_eq!(stats.barriers, blocks as u64);
    // 5 shuffles for every warp, 5 more for warp 0.
    assert_eq!(stats.collectives, blocks as u64 * (8 * 5 + 5));
}

#[test]
fn mma_from_global_matches_cpu_matmul() {
    for ab in [Ty::BF16, Ty::F16] {
        let k = 48;
        let mut rng = Rng(777 + k as u64);
        let a = rng.vec(16 * k, -2.0, 2.0);
        let w = rng.vec(8 * k, -2.0, 2.0);
        let mut dev = Device::new();
        let pa = dev.upload(&to_bits16(&a, ab));
        let pw = dev.upload(&to_bits16(&w, ab));
        let pd = dev.alloc_poisoned(16 * 8 * 4);
        go(&mma_global(ab, k as u32), 1, 32, &[Arg::Ptr(pa), Arg::Ptr(pw), Arg::Ptr(pd)], &mut dev);
        let got = dev.download_f32(pd, 128);
        let (a64, w64) = (from_bits16(&a, ab), from_bits16(&w, ab));
        check_gemm(&got, &a64, |kk, j| w64[j * k + kk], 16, 8, k);
    }
}

#[test]
fn mma_with_ldmatrix_and_cp_async_zero_fill() {
    let mut rng = Rng(4242);
    let a = rng.vec(16 * 16, -3.0, 3.0);
    let bm = rng.vec(16 * 8, -3.0, 3.0);
    let mut dev = Device::new();
    let pa = dev.upload(&to_bits16(&a, Ty::BF16));
    let pb = dev.upload(&to_bits16(&bm, Ty::BF16));
    let pd = dev.alloc_poisoned(16 * 8 * 4);
    let k = mma_ldmatrix();
    let (a64, b64) = (from_bits16(&a, Ty::BF16), from_bits16(&bm, Ty::BF16));
    // kv = 16 is the full tile; smaller values exercise src-size 0..16 (odd
    // kv gives byte counts that are not multiples of 4).
    for kv in [16usize, 13, 9, 8, 3, 1, 0] {
        dev.poison(pd, 16 * 8 * 4);
        go(&k, 1, 32, &[Arg::Ptr(pa), Arg::Ptr(pb), Arg::Ptr(pd), Arg::S32(kv as i32)], &mut dev);
        let got = dev.download_f32(pd, 128);
        let a_cut: Vec<f64> = (0..256).map(|i| if i % 16 < kv { a64[i] } else { 0.0 }).collect();
        check_gemm(&got, &a_cut, |kk, j| if kk < kv { b64[kk * 8 + j] } else { 0.0 }, 16, 8, 16);
    }
}

/// The ldmatrix layouts element by element: shared memory holds 0..1024 as
/// u16, every destination register is stored out.
#[test]
fn ldmatrix_layouts() {
    for (n, trans) in [(1usize, false), (2, false), (4, false), (1, true), (2, true), (4, true)] {
        let mut b = KernelBuilder::new("ldm");
        let out = b.ptr_param("out");
        let tid = b.special(Sreg::TidX);
        let s = b.shared("s", 4 * 8 * 16 * 2, 16);
        // Fill: thread t writes u32 words t, t+32, ... (pairs of u16 = 2w, 2w+1).
        for rep in 0..(4 * 8 * 16 * 2 / 4 / 32) {
            let w = b.add(Ty::U32, tid, rep * 32u32);
            let lo = b.shl(Ty::B32, w, 1u32);
            let hi = b.add(Ty::U32, lo, 1u32);
            let hi16 = b.shl(Ty::B32, hi, 16u32);
            let v = b.or(Ty::B32, lo, hi16);
            let wa = b.shl(Ty::B32, w, 2u32);
            let sa = b.add(Ty::U32, s, wa);
            b.st(Space::Shared, Ty::B32, Addr::reg(sa, 0), v);
        }
        b.bar_sync();
        // Lane l points at row l of the 32 rows (rows are 32 bytes apart: half of each row unused).
        let ro = b.shl(Ty::B32, tid, 5u32);
        let la = b.add(Ty::U32, s, ro);
        let regs = b.ldmatrix(n, trans, Addr::reg(la, 0));
        for (i, r) in regs.iter().enumerate() {
            let idx = b.mad(Ty::U32, tid, n as u32, i as u32);
            let p = b.index_addr(out, idx, 4);
            b.st(Space::Global, Ty::B32, Addr::reg(p, 0), *r);
        }
        let k = b.finish();
        let mut dev = Device::new();
        let po = dev.alloc_poisoned(32 * n * 4);
        go(&k, 1, 32, &[Arg::Ptr(po)], &mut dev);
        let got = dev.download_u32(po, 32 * n);
        // Element (row, col) of matrix i: shared row 8i+row, element col: u16 value 16·(8i+row)+col.
        let el = |i: usize, row: usize, col: usize| (16 * (8 * i + row) + col) as u32;
        for lane in 0..32 {
            let (g, t) = (lane / 4, lane % 4);
            for i in 0..n {
                let (lo, hi) =
                    if trans { (el(i, 2 * t, g), el(i, 2 * t + 1, g)) } else { (el(i, g, 2 * t), el(i, g, 2 * t + 1)) };
                assert_eq!(got[lane * n + i], lo | hi << 16, "x{n} trans={trans} lane {lane} reg {i}");
            }
        }
    }
}

#[test]
fn conversions_round_trip() {
    let mut rng = Rng(99);
    let mut x: Vec<f32> = rng.vec(200, -1000.0, 1000.0);
    x.extend([
        0.0,
        -0.0,
        0.5,
        1.5,
        2.5,
        -2.5,
        -0.7,
        1e10,
        -1e10,
        f32::NAN,
        1e-40,
        65504.0,
        65520.0,
        70000.0,
        3.4e38,
        f32::INFINITY,
        1.0 + f32::EPSILON,
        bf16::from_f32(3.0).to_f32() + 0.0078125, // a bf16 tie
    ]);
    let n = x.len();
    const OUTS: usize = 12;
    let mut b = KernelBuilder::new("cvts");
    let px = b.ptr_param("x");
    let po = b.ptr_param("out");
    let nn = b.param("n", Ty::U32);
    let i = global_index(&mut b);
    let inb = b.setp(Cmp::Lt, Ty::U32, i, nn);
    b.if_then(inb, false, |b| {
        let p = b.index_addr(px, i, 4);
        let v = b.ld(Space::Global, Ty::F32, Addr::reg(p, 0));
        let hb = b.cvt(Ty::BF16, Ty::F32, v);
        let hb32 = b.cvt(Ty::U32, Ty::U16, hb);
        let fb = b.cvt(Ty::F32, Ty::BF16, hb);
        let hh = b.cvt(Ty::F16, Ty::F32, v);
        let hh32 = b.cvt(Ty::U32, Ty::U16, hh);
        let fh = b.cvt(Ty::F32, Ty::F16, hh);
        let nv = b.neg(Ty::F32, v);
        let packed = b.pack_half2(Ty::BF16x2, v, nv);
        let (lo, hi) = b.unpack_b32(packed);
        let flo = b.cvt(Ty::F32, Ty::BF16, lo);
        let fhi = b.cvt(Ty::F32, Ty::BF16, hi);
        let rzi = b.cvt(Ty::S32, Ty::F32, v);
        let rni = b.reg(RegClass::B32);
        b.ins("cvt.rni.s32.f32", vec![rni.into(), v.into()]);
        let back = b.cvt(Ty::F32, Ty::S32, rzi);
        let rmi = b.reg(RegClass::B32);
        b.ins("cvt.rmi.u32.f32", vec![rmi.into(), v.into()]);
        let rz = b.reg(RegClass::B16);
        b.ins("cvt.rz.bf16.f32", vec![rz.into(), v.into()]);
        let rz32 = b.cvt(Ty::U32, Ty::U16, rz);
        let sat = b.reg(RegClass::F32);
        b.ins("cvt.sat.f32.f32", vec![sat.into(), v.into()]);
        let (w0, _) = b.bf16x2_to_f32(packed);
        let o = b.mul(Ty::U32, i, OUTS as u32);
        let base = b.index_addr(po, o, 4);
        for (j, r) in [hb32, fb, hh32, fh, flo, fhi, rzi, rni, back, rmi, rz32, sat].iter().enumerate() {
            b.st(Space::Global, Ty::B32, Addr::reg(base, 4 * j as i64), *r);
        }
        // w0 must equal flo: the shift-based widening agrees with cvt.
        let same = b.setp(Cmp::Eq, Ty::B32, w0, flo);
        let bad = b.not_pred(same);
        b.ins_if(bad, false, "st.global.b32", vec![Addr::reg(base, 0).into(), Operand::Imm(0xdead)]);
    });
    let k = b.finish();
    let mut dev = Device::new();
    let pxd = dev.upload_f32(&x);
    let pod = dev.alloc_poisoned(n * OUTS * 4);
    go(&k, n.div_ceil(64) as u32, 64, &[Arg::Ptr(pxd), Arg::Ptr(pod), Arg::U32(n as u32)], &mut dev);
    let got = dev.download_u32(pod, n * OUTS);
    let same = |a: f32, b: u32| (a.is_nan() && f32::from_bits(b).is_nan()) || a.to_bits() == b;
    for (e, &v) in x.iter().enumerate() {
        let g = &got[e * OUTS..(e + 1) * OUTS];
        let vb = bf16::from_f32(v);
        let vh = f16::from_f32(v);
        let ctx = format!("x = {v:e}, row {g:x?}");
        if v.is_nan() {
            assert!(bf16::from_bits(g[0] as u16).is_nan(), "{ctx}");
            assert!(f16::from_bits(g[2] as u16).is_nan(), "{ctx}");
        } else {
            assert_eq!(g[0], vb.to_bits() as u32, "bf16 rn: {ctx}");
            assert_eq!(g[2], vh.to_bits() as u32, "f16 rn: {ctx}");
            // Round toward zero is truncation of the low 16 bits.
            assert_eq!(g[10], v.to_bits() >> 16, "bf16 rz: {ctx}");
        }
        assert!(same(vb.to_f32(), g[1]), "bf16 -> f32: {ctx}");
        assert!(same(vh.to_f32(), g[3]), "f16 -> f32: {ctx}");
        assert!(same(vb.to_f32(), g[4]), "packed lo: {ctx}");
        assert!(same(bf16::from_f32(-v).to_f32(), g[5]), "packed hi: {ctx}");
        assert_eq!(g[6] as i32, v as i32, "rzi (saturating, NaN -> 0): {ctx}");
        assert_eq!(g[7] as i32, v.round_ties_even() as i32, "rni: {ctx}");
        assert!(same((v as i32) as f32, g[8]), "s32 -> f32: {ctx}");
        assert_eq!(g[9], v.floor() as u32, "rmi u32: {ctx}");
        let s = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
        assert!(same(s, g[11]), "sat: {ctx}");
    }
}

/// erf by its Maclaurin series in f64 (|x| <= 4: terms stay below 4e6, so
/// the sum keeps ~1e-9 absolute accuracy).
fn erf_ref(x: f64) -> f64 {
    let mut term = x;
    let mut sum = x;
    let x2 = x * x;
    for n in 1..200 {
        term *= -x2 / n as f64;
        let t = term / (2 * n + 1) as f64;
        sum += t;
        if t.abs() < 1e-17 {
            break;
        }
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

#[test]
fn builder_math_matches_f64_references() {
    let n = 2001;
    let xs: Vec<f32> = (0..n).map(|i| -4.0 + 8.0 * i as f32 / (n - 1) as f32).collect();
    let mut b = KernelBuilder::new("math");
    let px = b.ptr_param("x");
    let po = b.ptr_param("out");
    let nn = b.param("n", Ty::U32);
    let i = global_index(&mut b);
    let inb = b.setp(Cmp::Lt, Ty::U32, i, nn);
    b.if_then(inb, false, |b| {
        let p = b.index_addr(px, i, 4);
        let v = b.ld(Space::Global, Ty::F32, Addr::reg(p, 0));
        let e = b.erf(v);
        let g = b.gelu(v);
        let v5 = b.mul(Ty::F32, v, 5.0f32);
        let s = b.silu(v5);
        let x = b.exp(v5);
        let o = b.mul(Ty::U32, i, 4u32);
        let base = b.index_addr(po, o, 4);
        b.st_v(Space::Global, Ty::F32, Addr::reg(base, 0), &[e, g, s, x]);
    });
    let k = b.finish();
    let mut dev = Device::new();
    let pxd = dev.upload_f32(&xs);
    let pod = dev.alloc_poisoned(n * 16);
    go(&k, n.div_ceil(128) as u32, 128, &[Arg::Ptr(pxd), Arg::Ptr(pod), Arg::U32(n as u32)], &mut dev);
    let got = dev.download_f32(pod, n * 4);
    let (mut e_erf, mut e_gelu, mut e_silu, mut e_exp) = (0f64, 0f64, 0f64, 0f64);
    for (j, &x) in xs.iter().enumerate() {
        let x = x as f64;
        let x5 = (x as f32 * 5.0) as f64;
        let r = &got[4 * j..4 * j + 4];
        let erf = erf_ref(x);
        e_erf = e_erf.max((r[0] as f64 - erf).abs());
        let gelu = x * 0.5 * (1.0 + erf_ref(x / std::f64::consts::SQRT_2));
        e_gelu = e_gelu.max((r[1] as f64 - gelu).abs() / x.abs().max(1.0));
        let silu = x5 / (1.0 + (-x5).exp());
        e_silu = e_silu.max((r[2] as f64 - silu).abs() / silu.abs().max(1.0));
        e_exp = e_exp.max((r[3] as f64 - x5.exp()).abs() / x5.exp());
    }
    println!("max errors: erf abs {e_erf:.2e}, gelu rel {e_gelu:.2e}, silu rel {e_silu:.2e}, exp rel {e_exp:.2e}");
    // A&S 7.1.26 is good to 1.5e-7 in exact arithmetic; evaluated in f32,
    // `1 - t·poly·e^(-x²)` near x = 0 cancels and adds a few ulp of 1 (seen: 3.8e-7).
    assert!(e_erf < 5e-7, "erf {e_erf}");
    assert!(e_gelu < 3e-7, "gelu {e_gelu}");
    // ex2 is exact here; the error is the rounding of x·log2(e) (|x| <= 20).
    assert!(e_silu < 2e-6, "silu {e_silu}");
    assert!(e_exp < 2e-6, "exp {e_exp}");
}

#[test]
fn integer_alu_matches_rust() {
    let mut rng = Rng(2024);
    let mut pairs: Vec<(u32, u32)> = (0..120).map(|_| (rng.next() as u32, rng.next() as u32 | 1)).collect();
    pairs.extend([(0, 1), (u32::MAX, 1), (0x8000_0000, u32::MAX), (7, 0), (123, 31), (5, 33)]);
    let n = pairs.len();
    let mut b = KernelBuilder::new("alu");
    let pa = b.ptr_param("a");
    let pb = b.ptr_param("b");
    let po = b.ptr_param("out");
    let nn = b.param("n", Ty::U32);
    let i = global_index(&mut b);
    let inb = b.setp(Cmp::Lt, Ty::U32, i, nn);
    let mut names = Vec::new();
    b.if_then(inb, false, |b| {
        let xa = b.index_addr(pa, i, 4);
        let ya = b.index_addr(pb, i, 4);
        let x = b.ld(Space::Global, Ty::U32, Addr::reg(xa, 0));
        let y = b.ld(Space::Global, Ty::U32, Addr::reg(ya, 0));
        let mut outs = Vec::new();
        for op in [
            "add.u32",
            "sub.u32",
            "mul.lo.u32",
            "mul.hi.u32",
            "mul.hi.s32",
            "div.u32",
            "rem.u32",
            "div.s32",
            "rem.s32",
            "min.s32",
            "max.u32",
            "min.u32",
            "max.s32",
            "and.b32",
            "or.b32",
            "xor.b32",
            "shl.b32",
            "shr.u32",
            "shr.s32",
        ] {
            let d = b.reg(RegClass::B32);
            b.ins(op, vec![d.into(), x.into(), y.into()]);
            outs.push(d);
            names.push(op.to_string());
        }
        for op in ["not.b32", "neg.s32", "abs.s32", "popc.b32", "clz.b32", "brev.b32", "cnot.b32"] {
            let d = b.reg(RegClass::B32);
            b.ins(op, vec![d.into(), x.into()]);
            outs.push(d);
            names.push(op.to_string());
        }
        let w = b.reg(RegClass::B64);
        b.ins("mul.wide.s32", vec![w.into(), x.into(), y.into()]);
        let wl = b.reg(RegClass::B32);
        let wh = b.reg(RegClass::B32);
        b.ins("mov.b64", vec![Operand::Vec(vec![wl, wh]), w.into()]);
        outs.extend([wl, wh]);
        names.extend(["mul.wide.s32 lo".to_string(), "mul.wide.s32 hi".to_string()]);
        let lt = b.setp(Cmp::Lt, Ty::S32, x, y);
        let ltu = b.reg(RegClass::Pred);
        b.ins("setp.lo.u32", vec![ltu.into(), x.into(), y.into()]);
        let both = b.and_pred(lt, ltu);
        let sel = b.selp(Ty::U32, 1u32, 0u32, lt);
        let sel2 = b.selp(Ty::U32, 1u32, 0u32, both);
        let m = b.mad(Ty::U32, x, y, 12345u32);
        outs.extend([sel, sel2, m]);
        names.extend(["lt.s32".to_string(), "lt.s32 && lo.u32".to_string(), "mad.lo".to_string()]);
        let o = b.mul(Ty::U32, i, outs.len() as u32);
        let base = b.index_addr(po, o, 4);
        for (j, r) in outs.iter().enumerate() {
            b.st(Space::Global, Ty::U32, Addr::reg(base, 4 * j as i64), *r);
        }
    });
    let k = b.finish();
    let nouts = names.len();
    let mut dev = Device::new();
    let xa = dev.upload_u32(&pairs.iter().map(|p| p.0).collect::<Vec<_>>());
    let ya = dev.upload_u32(&pairs.iter().map(|p| p.1).collect::<Vec<_>>());
    let out = dev.alloc_poisoned(n * nouts * 4);
    go(&k, n.div_ceil(64) as u32, 64, &[Arg::Ptr(xa), Arg::Ptr(ya), Arg::Ptr(out), Arg::U32(n as u32)], &mut dev);
    let got = dev.download_u32(out, n * nouts);
    for (e, &(x, y)) in pairs.iter().enumerate() {
        let (sx, sy) = (x as i32, y as i32);
        let wide = sx as i64 * sy as i64;
        let want: Vec<u32> = vec![
            x.wrapping_add(y),
            x.wrapping_sub(y),
            x.wrapping_mul(y),
            ((x as u64 * y as u64) >> 32) as u32,
            (wide >> 32) as u32,
            x.checked_div(y).unwrap_or(u32::MAX),
            x.checked_rem(y).unwrap_or(x),
            if y == 0 { u32::MAX } else { sx.wrapping_div(sy) as u32 },
            if y == 0 { x } else { sx.wrapping_rem(sy) as u32 },
            sx.min(sy) as u32,
            x.max(y),
            x.min(y),
            sx.max(sy) as u32,
            x & y,
            x | y,
            x ^ y,
            x.checked_shl(y).unwrap_or(0),
            x.checked_shr(y).unwrap_or(0),
            (sx >> y.min(31)) as u32,
            !x,
            sx.wrapping_neg() as u32,
            sx.unsigned_abs(),
            x.count_ones(),
            x.leading_zeros(),
            x.reverse_bits(),
            (x == 0) as u32,
            wide as u32,
            (wide >> 32) as u32,
            (sx < sy) as u32,
            ((sx < sy) && (x < y)) as u32,
            x.wrapping_mul(y).wrapping_add(12345),
        ];
        assert_eq!(want.len(), nouts);
        for j in 0..nouts {
            assert_eq!(got[e * nouts + j], want[j], "{} of ({x:#x}, {y:#x})", names[j]);
        }
    }
}

#[test]
fn atomics_global_and_shared() {
    let mut b = KernelBuilder::new("atomics");
    let cnt = b.ptr_param("cnt");
    let tid = b.special(Sreg::TidX);
    let ctaid = b.special(Sreg::CtaidX);
    let s = b.shared("s", 4, 4);
    let t0 = b.setp(Cmp::Eq, Ty::U32, tid, 0u32);
    b.ins_if(t0, false, "st.shared.u32", vec![Addr::reg(s, 0).into(), Operand::Imm(0)]);
    b.bar_sync();
    let _ = b.atom(Space::Shared, "add", Ty::U32, Addr::reg(s, 0), 2u32);
    let _ = b.atom(Space::Global, "add", Ty::U32, Addr::reg(cnt, 0), 1u32);
    let _ = b.atom(Space::Global, "add", Ty::F32, Addr::reg(cnt, 4), 0.5f32);
    let sv = b.sub(Ty::S32, tid, 100i32);
    let _ = b.atom(Space::Global, "max", Ty::S32, Addr::reg(cnt, 8), sv);
    let _ = b.atom(Space::Global, "min", Ty::S32, Addr::reg(cnt, 12), sv);
    let g = b.mad(Ty::U32, ctaid, 1000u32, tid);
    let g1 = b.add(Ty::U32, g, 1u32);
    let cas = b.reg(RegClass::B32);
    b.ins("atom.global.cas.b32", vec![cas.into(), Addr::reg(cnt, 16).into(), Operand::Imm(0), g1.into()]);
    let _ = b.atom(Space::Global, "exch", Ty::B32, Addr::reg(cnt, 20), g1);
    b.ins("red.global.add.u32", vec![Addr::reg(cnt, 24).into(), Operand::Imm(3)]);
    b.bar_sync();
    let v = b.ld(Space::Shared, Ty::U32, Addr::reg(s, 0));
    let po = b.index_addr(cnt, ctaid, 4);
    b.ins_if(t0, false, "st.global.u32", vec![Addr::reg(po, 28).into(), v.into()]);
    let k = b.finish();
    let mut dev = Device::new();
    let mut init = vec![0u32; 7 + 4];
    init[2] = i32::MIN as u32;
    init[3] = i32::MAX as u32;
    let p = dev.upload_u32(&init);
    go(&k, 4, 96, &[Arg::Ptr(p)], &mut dev);
    let got = dev.download_u32(p, 11);
    assert_eq!(got[0], 384);
    assert_eq!(f32::from_bits(got[1]), 192.0);
    assert_eq!(got[2] as i32, 95 - 100);
    assert_eq!(got[3] as i32, -100);
    assert_eq!(got[4], 1, "the first thread (block 0, thread 0) wins the cas");
    assert_eq!(got[5], 3 * 1000 + 95 + 1, "the last thread's exchange stays");
    assert_eq!(got[6], 3 * 384);
    assert_eq!(&got[7..], &[192, 192, 192, 192]);
}

#[test]
fn shuffles_and_votes() {
    let mut b = KernelBuilder::new("shfl");
    b.max_threads(64);
    let out = b.ptr_param("out");
    let tid = b.special(Sreg::TidX);
    let lane = b.special(Sreg::LaneId);
    let x = b.mul(Ty::U32, tid, 10u32);
    let mut outs = Vec::new();
    for (mode, bv, c) in [("up", 1i64, 0i64), ("down", 3, 31), ("idx", 37, 31), ("bfly", 6, 31), ("down", 1, 0x181f)] {
        let d = b.reg(RegClass::B32);
        b.ins(
            &format!("shfl.sync.{mode}.b32"),
            vec![d.into(), x.into(), Operand::Imm(bv), Operand::Imm(c), Operand::Imm(0xffff_ffff)],
        );
        outs.push(d);
    }
    let odd = b.and(Ty::B32, lane, 1u32);
    let p = b.setp(Cmp::Eq, Ty::U32, odd, 1u32);
    let ballot = b.reg(RegClass::B32);
    b.ins("vote.sync.ballot.b32", vec![ballot.into(), p.into(), Operand::Imm(0xffff_ffff)]);
    let small = b.setp(Cmp::Lt, Ty::U32, tid, 40u32);
    let any = b.reg(RegClass::Pred);
    b.ins("vote.sync.all.pred", vec![any.into(), small.into(), Operand::Imm(0xffff_ffff)]);
    let anyv = b.selp(Ty::U32, 1u32, 0u32, any);
    outs.extend([ballot, anyv]);
    let o = b.mul(Ty::U32, tid, outs.len() as u32);
    let base = b.index_addr(out, o, 4);
    for (j, r) in outs.iter().enumerate() {
        b.st(Space::Global, Ty::U32, Addr::reg(base, 4 * j as i64), *r);
    }
    let k = b.finish();
    let mut dev = Device::new();
    let po = dev.alloc_poisoned(64 * 7 * 4);
    go(&k, 1, 64, &[Arg::Ptr(po)], &mut dev);
    let got = dev.download_u32(po, 64 * 7);
    for t in 0..64u32 {
        let (l, w) = (t % 32, t / 32 * 32);
        let src = |j: u32| (w + j) * 10;
        let row = &got[t as usize * 7..t as usize * 7 + 7];
        assert_eq!(row[0], if l >= 1 { src(l - 1) } else { src(l) }, "up t={t}");
        assert_eq!(row[1], if l + 3 <= 31 { src(l + 3) } else { src(l) }, "down t={t}");
        assert_eq!(row[2], src(5), "idx 37 reads lane 5 (only b[4:0] counts) t={t}");
        assert_eq!(row[3], src(l ^ 6), "bfly t={t}");
        // c = 0x181f (CUDA's width 8): segments of 8 lanes; down stays inside its segment.
        assert_eq!(row[4], if (l + 1) % 8 != 0 { src(l + 1) } else { src(l) }, "segmented down t={t}");
        assert_eq!(row[5], 0xAAAA_AAAA, "ballot t={t}");
        assert_eq!(row[6], (w == 0) as u32, "vote.all t={t}");
    }
}

#[test]
fn multi_dimensional_grid_and_block() {
    let mut b = KernelBuilder::new("ids");
    let out = b.ptr_param("out");
    let ids: Vec<Reg> = Sreg::ALL.iter().map(|s| b.special(*s)).collect();
    // linear block id and thread id
    let bl = b.mad(Ty::U32, ids[7], ids[9], ids[6]);
    let nb = b.mul(Ty::U32, ids[9], ids[10]);
    let bl = b.mad(Ty::U32, ids[8], nb, bl);
    let tl = b.mad(Ty::U32, ids[1], ids[3], ids[0]);
    let nt = b.mul(Ty::U32, ids[3], ids[4]);
    let tl = b.mad(Ty::U32, ids[2], nt, tl);
    let ntot = b.mul(Ty::U32, nt, ids[5]);
    let g = b.mad(Ty::U32, bl, ntot, tl);
    let o = b.mul(Ty::U32, g, 14u32);
    let base = b.index_addr(out, o, 4);
    for (j, r) in ids.iter().enumerate() {
        b.st(Space::Global, Ty::U32, Addr::reg(base, 4 * j as i64), *r);
    }
    let k = b.finish();
    let (grid, block) = ([2u32, 3, 2], [4u32, 2, 5]);
    let mut dev = Device::new();
    let total = 12 * 40;
    let po = dev.alloc_poisoned(total * 14 * 4);
    let st = run(&k, grid, block, &[Arg::Ptr(po)], &mut dev).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(st.threads, total as u64);
    let got = dev.download_u32(po, total * 14);
    for (bz, by, bx) in (0..2).flat_map(|z| (0..3).flat_map(move |y| (0..2).map(move |x| (z, y, x)))) {
        for (tz, ty, tx) in (0..5).flat_map(|z| (0..2).flat_map(move |y| (0..4).map(move |x| (z, y, x)))) {
            let bl = bx + 2 * (by + 3 * bz);
            let tl = tx + 4 * (ty + 2 * tz);
            let r = &got[(bl * 40 + tl) as usize * 14..][..14];
            assert_eq!(r, &[tx, ty, tz, 4, 2, 5, bx, by, bz, 2, 3, 2, tl % 32, tl / 32]);
        }
    }
}

#[test]
fn parse_of_print_gives_back_the_kernel() {
    for k in [vec_add(), block_sum(), mma_global(Ty::BF16, 32), mma_ldmatrix(), rich_kernel()] {
        let text = Module::new(Target::Sm90, vec![k.clone()]).print();
        let p = Program::parse(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.kernel_names(), vec![k.name.as_str()]);
        assert_eq!(p.target(), "sm_90");
        assert_eq!(p.kernels()[0], k, "round trip of {}", k.name);
    }
    let two = Module::new(Target::Sm80, vec![vec_add(), block_sum()]).print();
    assert_eq!(Program::parse(&two).unwrap().kernel_names(), vec!["vec_add", "block_sum"]);
}

/// Uses every builder method (like the printer's kitchen sink) plus raw
/// forms with negative offsets, comments and guards, for the round trip.
fn rich_kernel() -> Kernel {
    let mut b = KernelBuilder::new("rich");
    b.max_threads(128);
    let x = b.ptr_param("x");
    let n = b.param("n", Ty::U32);
    let f = b.param("scale", Ty::F32);
    let s = b.param("s", Ty::S32);
    let tid = b.special(Sreg::TidX);
    let smem = b.shared("smem", 2048, 16);
    let _smem2 = b.shared("other", 100, 4);
    b.comment("a comment with  two spaces");
    let p = b.index_addr(x, tid, 4);
    let v = b.ld(Space::GlobalNc, Ty::F32, Addr::reg(p, -4));
    let g = b.gelu(v);
    let si = b.silu(g);
    let r = b.rsqrt(si);
    let l = b.lg2(r);
    let q = b.sqrt(l);
    let q = b.mul(Ty::F32, q, f);
    let red = b.warp_reduce_f32("max", q);
    let h = b.shfl_idx(red, 0u32);
    let lo = b.mov(Ty::F32, -1.5f32);
    let packed = b.pack_half2(Ty::F16x2, lo, h);
    let (a0, _a1) = b.unpack_b32(packed);
    let f0 = b.cvt(Ty::F32, Ty::F16, a0);
    let so = b.mul(Ty::U32, tid, 16u32);
    let sa = b.add(Ty::U32, smem, so);
    b.cp_async16(Addr::reg(sa, 0), Addr::reg(p, 0), 16u32);
    b.cp_async_commit();
    b.cp_async_wait(0);
    b.bar_sync();
    let frag = b.ldmatrix(4, false, Addr::reg(sa, 0));
    let fragt = b.ldmatrix(2, true, Addr::reg(sa, 0));
    let acc: [Reg; 4] = std::array::from_fn(|_| b.mov(Ty::F32, 0.0f32));
    b.mma_m16n8k16(Ty::F16, &acc, &frag.try_into().unwrap(), &fragt.try_into().unwrap(), &acc);
    let vs = b.ld_v(Space::Shared, Ty::F32, 4, Addr::sym("smem", 16));
    b.st_v(Space::Shared, Ty::F32, Addr::reg(sa, 0), &vs);
    let t = b.add(Ty::F32, f0, acc[0]);
    let i = b.cvt(Ty::S32, Ty::F32, t);
    let i = b.add(Ty::S32, i, s);
    let inb = b.setp(Cmp::Lt, Ty::U32, tid, n);
    b.for_range(0u32, n, 2, |b, k| {
        let kf = b.cvt(Ty::F32, Ty::U32, k);
        b.fma_into(acc[1], kf, t, acc[1]);
    });
    let w = b.selp(Ty::F32, acc[1], t, inb);
    let _ = b.atom(Space::Global, "add", Ty::F32, Addr::reg(p, 0), w);
    b.ins_if(inb, true, "st.global.s32", vec![Addr::reg(p, 0).into(), i.into()]);
    b.ret();
    b.finish()
}

// ---- error kinds ---------------------------------------------------------------

#[test]
fn out_of_bounds_store_names_kernel_instruction_and_thread() {
    // Writes out[i] for i <= n: one past the end.
    let mut b = KernelBuilder::new("off_by_one");
    let out = b.ptr_param("out");
    let n = b.param("n", Ty::U32);
    let i = global_index(&mut b);
    let inb = b.setp(Cmp::Le, Ty::U32, i, n);
    b.if_then(inb, false, |b| {
        let p = b.index_addr(out, i, 4);
        b.st(Space::Global, Ty::F32, Addr::reg(p, 0), 1.0f32);
    });
    let k = b.finish();
    let mut dev = Device::new();
    let po = dev.alloc_poisoned(100 * 4);
    let e = err(&k, 2, 64, &[Arg::Ptr(po), Arg::U32(100)], &mut dev);
    assert!(matches!(e.kind, EmuErrorKind::OutOfBounds { space: Space::Global, bytes: 4, .. }), "{e}");
    assert_eq!(e.tid, Some([36, 0, 0]));
    assert_eq!(e.ctaid, Some([1, 0, 0]));
    let msg = e.to_string();
    assert!(msg.contains("off_by_one") && msg.contains("st.global.f32") && msg.contains("thread (36,0,0)"), "{msg}");
    assert!(msg.contains("0 bytes past its end"), "{msg}");
}

#[test]
fn early_return_before_a_barrier_is_barrier_divergence() {
    let mut b = KernelBuilder::new("early_ret");
    let tid = b.special(Sreg::TidX);
    let s = b.shared("s", 256, 4);
    let hi = b.setp(Cmp::Ge, Ty::U32, tid, 16u32);
    b.ins_if(hi, false, "ret", vec![]);
    let o = b.shl(Ty::B32, tid, 2u32);
    let a = b.add(Ty::U32, s, o);
    b.st(Space::Shared, Ty::U32, Addr::reg(a, 0), tid);
    b.bar_sync();
    b.ret();
    let k = b.finish();
    let e = err(&k, 1, 64, &[], &mut Device::new());
    assert_eq!(e.kind, EmuErrorKind::BarrierDivergence, "{e}");
    assert!(e.instr.as_deref() == Some("bar.sync 0;"), "{e}");
    assert!(e.detail.contains("thread (16,0,0) exited"), "{e}");
}

#[test]
fn reading_unwritten_shared_memory_fails() {
    let mut b = KernelBuilder::new("uninit");
    let out = b.ptr_param("out");
    let tid = b.special(Sreg::TidX);
    let s = b.shared("s", 128 * 4, 4);
    let o = b.shl(Ty::B32, tid, 2u32);
    let a = b.add(Ty::U32, s, o);
    // Only even threads write; thread 1 reads its neighbour's slot... which is written;
    // thread 0 reads slot 1, which nobody wrote.
    let odd = b.and(Ty::B32, tid, 1u32);
    let even = b.setp(Cmp::Eq, Ty::U32, odd, 0u32);
    b.ins_if(even, false, "st.shared.u32", vec![Addr::reg(a, 0).into(), tid.into()]);
    b.bar_sync();
    let v = b.ld(Space::Shared, Ty::U32, Addr::reg(a, 4));
    let p = b.index_addr(out, tid, 4);
    b.st(Space::Global, Ty::U32, Addr::reg(p, 0), v);
    let k = b.finish();
    let mut dev = Device::new();
    let po = dev.alloc_poisoned(32 * 4);
    let e = err(&k, 1, 32, &[Arg::Ptr(po)], &mut dev);
    assert_eq!(e.kind, EmuErrorKind::UninitShared { addr: 4 }, "{e}");
    assert_eq!(e.tid, Some([0, 0, 0]));
}

#[test]
fn misaligned_vector_load_fails() {
    let mut b = KernelBuilder::new("misaligned");
    let x = b.ptr_param("x");
    let v = b.ld_v(Space::Global, Ty::F32, 4, Addr::reg(x, 4));
    b.st(Space::Global, Ty::F32, Addr::reg(x, 0), v[0]);
    let k = b.finish();
    let mut dev = Device::new();
    let px = dev.upload_f32(&[1.0; 16]);
    let e = err(&k, 1, 32, &[Arg::Ptr(px)], &mut dev);
    assert_eq!(e.kind, EmuErrorKind::Misaligned, "{e}");
    assert!(e.to_string().contains("ld.global.v4.f32"), "{e}");
}

#[test]
fn divergent_shuffle_is_warp_divergence() {
    let mut b = KernelBuilder::new("div_shfl");
    let out = b.ptr_param("out");
    let tid = b.special(Sreg::TidX);
    let v = b.cvt(Ty::F32, Ty::U32, tid);
    let lt = b.setp(Cmp::Lt, Ty::U32, tid, 16u32);
    let r = b.mov(Ty::F32, 0.0f32);
    b.if_then(lt, false, |b| {
        let s = b.shfl_bfly(v, 1);
        b.assign(Ty::F32, r, s);
    });
    let p = b.index_addr(out, tid, 4);
    b.st(Space::Global, Ty::F32, Addr::reg(p, 0), r);
    let k = b.finish();
    let mut dev = Device::new();
    let po = dev.alloc_poisoned(32 * 4);
    let e = err(&k, 1, 32, &[Arg::Ptr(po)], &mut dev);
    assert_eq!(e.kind, EmuErrorKind::WarpDivergence, "{e}");
    assert!(e.to_string().contains("shfl.sync.bfly.b32"), "{e}");
    // A partial warp cannot shuffle either.
    let mut b = KernelBuilder::new("partial_warp");
    let tid = b.special(Sreg::TidX);
    let _ = b.shfl_bfly(tid, 1);
    let e = err(&b.finish(), 1, 48, &[], &mut Device::new());
    assert_eq!(e.kind, EmuErrorKind::WarpDivergence, "{e}");
    assert!(e.detail.contains("only 16 lanes"), "{e}");
}

#[test]
fn bad_args_and_bad_launches_are_refused() {
    let k = vec_add();
    let mut dev = Device::new();
    let p = dev.alloc_zeroed(64);
    let e = err(&k, 1, 32, &[Arg::Ptr(p), Arg::Ptr(p)], &mut dev);
    assert_eq!(e.kind, EmuErrorKind::BadArgs);
    assert!(e.detail.contains("4 params, got 2"), "{e}");
    let e = err(&k, 1, 32, &[Arg::Ptr(p), Arg::Ptr(p), Arg::Ptr(p), Arg::F32(1.0)], &mut dev);
    assert_eq!(e.kind, EmuErrorKind::BadArgs);
    assert!(e.detail.contains("p_n"), "{e}");
    let e = err(&k, 1, 32, &[Arg::Ptr(p), Arg::Ptr(12345), Arg::Ptr(p), Arg::U32(1)], &mut dev);
    assert_eq!(e.kind, EmuErrorKind::BadArgs);
    assert!(e.detail.contains("p_b"), "{e}");
    let e = err(&k, 1, 2048, &[Arg::Ptr(p), Arg::Ptr(p), Arg::Ptr(p), Arg::U32(1)], &mut dev);
    assert_eq!(e.kind, EmuErrorKind::BadLaunch);
    let e = err(&mma_global(Ty::BF16, 16), 1, 64, &[Arg::Ptr(p), Arg::Ptr(p), Arg::Ptr(p)], &mut dev);
    assert_eq!(e.kind, EmuErrorKind::BadLaunch, "{e}");
    let text = Module::new(Target::Sm80, vec![k]).print();
    let e = Program::parse(&text).unwrap().launch("nope", [1; 3], [32, 1, 1], &[], &mut dev).unwrap_err();
    assert_eq!(e.kind, EmuErrorKind::UnknownKernel);
}

#[test]
fn unsupported_instructions_are_named_before_running() {
    for (op, args) in [
        ("frobnicate.b32", 2),
        ("ld.local.f32", 2),
        ("add.f16", 3),
        ("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32", 4),
    ] {
        let mut b = KernelBuilder::new("unsup");
        let x = b.ptr_param("x");
        let r = b.reg(RegClass::B32);
        let mut ops: Vec<Operand> = vec![r.into(), Addr::reg(x, 0).into()];
        ops.truncate(args.min(2));
        while ops.len() < args {
            ops.push(r.into());
        }
        b.ins(op, ops);
        let mut dev = Device::new();
        let p = dev.alloc_zeroed(4);
        let e = err_unchecked(&b.finish(), 1, 32, &[Arg::Ptr(p)], &mut dev);
        assert!(matches!(e.kind, EmuErrorKind::Unsupported(_)), "{e}");
        assert!(e.to_string().contains(op), "{e}");
        assert_eq!(e.pc, Some(2), "decode-time error at the instruction: {e}");
        assert_eq!(e.tid, None, "no thread ran: {e}");
    }
}

#[test]
fn parse_errors_carry_line_numbers() {
    let text = Module::new(Target::Sm80, vec![vec_add()]).print();
    let lines: Vec<&str> = text.lines().collect();
    let target = lines.iter().position(|l| l.contains("add.f32")).unwrap();
    for bad in ["\tadd.f32 %f99, %f1, %f2;", "\tadd.f32 %f1, %f1 %f2", "\tadd.f32 %q1, %f1, %f2;", "\t@%r1 ret;"] {
        let mut ls = lines.clone();
        ls[target] = bad;
        let e = Program::parse(&ls.join("\n")).unwrap_err();
        match &e.kind {
            EmuErrorKind::Parse { line, .. } => assert_eq!(*line, target + 1, "{e}"),
            k => panic!("{bad}: expected a parse error, got {k:?}"),
        }
    }
    let e = Program::parse(".version 8.0\n.target sm_80\n.address_size 64\nbogus\n").unwrap_err();
    assert_eq!(e.kind, EmuErrorKind::Parse { line: 4, msg: "unexpected `bogus`".into() });
    let e = Program::parse(&text.replace("bra $L_endif_1", "bra $nowhere")).unwrap_err();
    assert!(matches!(e.kind, EmuErrorKind::Parse { .. }), "{e}");
}

#[test]
fn infinite_loop_hits_the_step_limit() {
    let mut b = KernelBuilder::new("spin");
    let l = b.label("forever");
    b.place(&l);
    b.bra(&l);
    let mut dev = Device::new();
    dev.set_step_limit(100_000);
    let e = err(&b.finish(), 1, 32, &[], &mut dev);
    assert_eq!(e.kind, EmuErrorKind::StepLimit);
}

// ---- property test ---------------------------------------------------------------

/// One warp per row: `out[r] = Σ_c x[r][c]` over a ragged row length with
/// predicated loads, and `y[i] = a·x[i] + y[i]` elementwise; random shapes
/// and block sizes.
fn rows_and_axpy() -> Kernel {
    let mut b = KernelBuilder::new("rows_axpy");
    let x = b.ptr_param("x");
    let y = b.ptr_param("y");
    let out = b.ptr_param("out");
    let rows = b.param("rows", Ty::U32);
    let cols = b.param("cols", Ty::U32);
    let a = b.param("a", Ty::F32);
    let tid = b.special(Sreg::TidX);
    let lane = b.and(Ty::B32, tid, 31u32);
    let warp = b.shr(Ty::U32, tid, 5u32);
    let ctaid = b.special(Sreg::CtaidX);
    let ntid = b.special(Sreg::NtidX);
    let wpb = b.shr(Ty::U32, ntid, 5u32);
    let row = b.mad(Ty::U32, ctaid, wpb, warp);
    let has_row = b.setp(Cmp::Lt, Ty::U32, row, rows);
    b.if_then(has_row, false, |b| {
        let acc = b.mov(Ty::F32, 0.0f32);
        let rbase = b.mul(Ty::U32, row, cols);
        // Every lane runs the same trip count; loads beyond `cols` are predicated off.
        let trips = b.add(Ty::U32, cols, 31u32);
        let trips = b.shr(Ty::U32, trips, 5u32);
        b.for_range(0u32, trips, 1, |b, it| {
            let c = b.mad(Ty::U32, it, 32u32, lane);
            let ok = b.setp(Cmp::Lt, Ty::U32, c, cols);
            let idx = b.add(Ty::U32, rbase, c);
            let p = b.index_addr(x, idx, 4);
            let v = b.mov(Ty::F32, 0.0f32);
            b.ins_if(ok, false, "ld.global.f32", vec![v.into(), Addr::reg(p, 0).into()]);
            b.bin_into("add", Ty::F32, acc, acc, v);
        });
        let s = b.warp_reduce_f32("add", acc);
        let first = b.setp(Cmp::Eq, Ty::U32, lane, 0u32);
        let po = b.index_addr(out, row, 4);
        b.ins_if(first, false, "st.global.f32", vec![Addr::reg(po, 0).into(), s.into()]);
    });
    let n = b.mul(Ty::U32, rows, cols);
    let i = b.mad(Ty::U32, ctaid, ntid, tid);
    let inb = b.setp(Cmp::Lt, Ty::U32, i, n);
    b.if_then(inb, false, |b| {
        let px = b.index_addr(x, i, 4);
        let py = b.index_addr(y, i, 4);
        let xv = b.ld(Space::GlobalNc, Ty::F32, Addr::reg(px, 0));
        let yv = b.ld(Space::Global, Ty::F32, Addr::reg(py, 0));
        let r = b.mad(Ty::F32, a, xv, yv);
        b.st(Space::Global, Ty::F32, Addr::reg(py, 0), r);
    });
    b.ret();
    b.finish()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn ragged_rows_and_axpy(rows in 1usize..40, cols in 1usize..150, warps in 1u32..5, seed in 1u64..u64::MAX, a in -3.0f32..3.0) {
        let mut rng = Rng(seed);
        let n = rows * cols;
        let x = rng.vec(n, -1.0, 1.0);
        let y = rng.vec(n, -1.0, 1.0);
        let mut dev = Device::new();
        let px = dev.upload_f32(&x);
        let py = dev.upload_f32(&y);
        let po = dev.alloc_poisoned(rows * 4);
        let block = 32 * warps;
        // Enough blocks for both the rows (one per warp) and the elements.
        let grid = (rows.div_ceil(warps as usize)).max(n.div_ceil(block as usize)) as u32;
        let args = [Arg::Ptr(px), Arg::Ptr(py), Arg::Ptr(po), Arg::U32(rows as u32), Arg::U32(cols as u32), Arg::F32(a)];
        go(&rows_and_axpy(), grid, block, &args, &mut dev);
        let sums = dev.download_f32(po, rows);
        for r in 0..rows {
            let want: f64 = x[r * cols..(r + 1) * cols].iter().map(|&v| v as f64).sum();
            let mag: f64 = x[r * cols..(r + 1) * cols].iter().map(|&v| v.abs() as f64).sum();
            prop_assert!((sums[r] as f64 - want).abs() <= 1e-5 * mag + 1e-30, "row {} {} vs {}", r, sums[r], want);
        }
        let got = dev.download_f32(py, n);
        for i in 0..n {
            prop_assert_eq!(got[i], a.mul_add(x[i], y[i]), "element {}", i);
        }
    }
}

// ---- conversions from f64, directed roundings, narrow integers ------------------------

/// The two neighbours `(lo, hi)` of `x` in a 16-bit float format, found by
/// stepping bit patterns (independent of the emulator's rounding code).
/// Infinity stands for 2^(emax+1) so overflow rounds like IEEE.
fn bracket16(x: f64, val: impl Fn(u16) -> f64, inf_bits: u16) -> (u16, u16) {
    let v = |b: u16| {
        if b & 0x7fff == inf_bits {
            2f64.powi(if inf_bits == 0x7c00 { 16 } else { 128 }).copysign(x)
        } else {
            val(b)
        }
    };
    let dec = |i: i32| if i < 0 { 0x8000 | (-i) as u16 } else { i as u16 };
    // Walk the ordered encodings from -inf to +inf (binary search on the monotone map).
    let (mut lo, mut hi) = (-(inf_bits as i32), inf_bits as i32);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if v(dec(mid)) <= x {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    if v(dec(lo)) == x {
        return (dec(lo), dec(lo));
    }
    (dec(lo), dec(hi))
}

fn round16(x: f64, mode: &str, val: impl Fn(u16) -> f64 + Copy, inf_bits: u16) -> u16 {
    let (lo, hi) = bracket16(x, val, inf_bits);
    if lo == hi {
        return lo;
    }
    let v = |b: u16| {
        if b & 0x7fff == inf_bits {
            2f64.powi(if inf_bits == 0x7c00 { 16 } else { 128 }).copysign(x)
        } else {
            val(b)
        }
    };
    match mode {
        "rz" => {
            if x > 0.0 {
                lo
            } else {
                hi
            }
        }
        "rm" => lo,
        "rp" => hi,
        _ => {
            let (dl, dh) = (x - v(lo), v(hi) - x);
            if dl < dh || (dl == dh && lo & 1 == 0) {
                lo
            } else {
                hi
            }
        }
    }
}

fn round32(x: f64, mode: &str) -> u32 {
    let r = x as f32;
    if r as f64 == x {
        return r.to_bits();
    }
    let lo = if (r as f64) < x { r } else { r.next_down() };
    let hi = lo.next_up();
    let pick = match mode {
        "rz" => {
            if x > 0.0 {
                lo
            } else {
                hi
            }
        }
        "rm" => lo,
        "rp" => hi,
        _ => r,
    };
    pick.to_bits()
}

#[test]
fn f64_sources_and_directed_roundings() {
    let mut rng = Rng(31337);
    let mut xs: Vec<f64> = (0..150)
        .map(|_| {
            let m = rng.f32(-1.0, 1.0) as f64 + (rng.next() >> 11) as f64 * 2f64.powi(-80);
            m * 2f64.powi((rng.next() % 40) as i32 - 20)
        })
        .collect();
    xs.extend([
        1.0 + 2f64.powi(-8) + 2f64.powi(-40), // a bf16 tie broken by a bit f32 cannot hold
        1.0 + 2f64.powi(-8),                  // an exact tie: to even
        -(1.0 + 3.0 * 2f64.powi(-8)),
        1.0 + 2f64.powi(-11) + 2f64.powi(-45), // the same for f16
        65520.0,                               // f16 overflow tie: rn gives inf
        65519.0,
        70000.0,
        -1e-6, // f16 subnormal range
        3e-8,
        1e300,
        -123456789.75,
        2.5,
        -2.5,
    ]);
    let n = xs.len();
    const OUTS: usize = 14;
    let mut b = KernelBuilder::new("conv64");
    let px = b.ptr_param("x");
    let po = b.ptr_param("out");
    let nn = b.param("n", Ty::U32);
    let i = global_index(&mut b);
    let inb = b.setp(Cmp::Lt, Ty::U32, i, nn);
    b.if_then(inb, false, |b| {
        let p = b.index_addr(px, i, 8);
        let x = b.ld(Space::Global, Ty::F64, Addr::reg(p, 0));
        let mut outs: Vec<Reg> = Vec::new();
        for op in ["cvt.rn.bf16.f64", "cvt.rn.f16.f64", "cvt.rz.f16.f64", "cvt.rm.bf16.f64", "cvt.rp.bf16.f64"] {
            let h = b.reg(RegClass::B16);
            b.ins(op, vec![h.into(), x.into()]);
            outs.push(b.cvt(Ty::U64, Ty::U16, h));
        }
        for op in ["cvt.rn.f32.f64", "cvt.rz.f32.f64", "cvt.rm.f32.f64", "cvt.rp.f32.f64"] {
            let f = b.reg(RegClass::F32);
            b.ins(op, vec![f.into(), x.into()]);
            let bits = b.reg(RegClass::B32);
            b.ins("mov.b32", vec![bits.into(), f.into()]);
            outs.push(b.cvt(Ty::U64, Ty::U32, bits));
        }
        for op in ["cvt.rzi.s64.f64", "cvt.rni.u64.f64", "cvt.rpi.s64.f64"] {
            let d = b.reg(RegClass::B64);
            b.ins(op, vec![d.into(), x.into()]);
            outs.push(d);
        }
        // f64 -> f32 -> f64, then f64 arithmetic.
        let f = b.cvt(Ty::F32, Ty::F64, x);
        let back = b.cvt(Ty::F64, Ty::F32, f);
        let sq = b.reg(RegClass::F64);
        b.ins("fma.rn.f64", vec![sq.into(), x.into(), x.into(), back.into()]);
        for r in [back, sq] {
            let bits = b.reg(RegClass::B64);
            b.ins("mov.b64", vec![bits.into(), r.into()]);
            outs.push(bits);
        }
        assert_eq!(outs.len(), OUTS);
        let o = b.mul(Ty::U32, i, OUTS as u32);
        let base = b.index_addr(po, o, 8);
        for (j, r) in outs.iter().enumerate() {
            b.st(Space::Global, Ty::U64, Addr::reg(base, 8 * j as i64), *r);
        }
    });
    let k = b.finish();
    let mut dev = Device::new();
    let bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
    let pxd = dev.upload(&bytes);
    let pod = dev.alloc_poisoned(n * OUTS * 8);
    // bf16 from f64 needs sm_90 (the emulator does not check per-target features; ptxas does).
    assert_assembles_for(&k, &[Target::Sm90]);
    let grid = [n.div_ceil(64) as u32, 1, 1];
    run(&k, grid, [64, 1, 1], &[Arg::Ptr(pxd), Arg::Ptr(pod), Arg::U32(n as u32)], &mut dev)
        .unwrap_or_else(|e| panic!("{e}"));
    let raw = dev.download(pod, n * OUTS * 8);
    let got: Vec<u64> = raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    let bfv = |b: u16| bf16::from_bits(b).to_f64();
    let f16v = |b: u16| f16::from_bits(b).to_f64();
    for (e, &x) in xs.iter().enumerate() {
        let g = &got[e * OUTS..(e + 1) * OUTS];
        let ctx = format!("x = {x:e}");
        assert_eq!(g[0] as u16, round16(x, "rn", bfv, 0x7f80), "rn.bf16 {ctx}");
        assert_eq!(g[1] as u16, round16(x, "rn", f16v, 0x7c00), "rn.f16 {ctx}");
        assert_eq!(g[2] as u16, round16(x, "rz", f16v, 0x7c00), "rz.f16 {ctx}");
        assert_eq!(g[3] as u16, round16(x, "rm", bfv, 0x7f80), "rm.bf16 {ctx}");
        assert_eq!(g[4] as u16, round16(x, "rp", bfv, 0x7f80), "rp.bf16 {ctx}");
        for (j, m) in ["rn", "rz", "rm", "rp"].iter().enumerate() {
            assert_eq!(g[5 + j] as u32, round32(x, m), "{m}.f32 {ctx}");
        }
        assert_eq!(g[9] as i64, x.trunc() as i64, "rzi.s64 {ctx}");
        assert_eq!(g[10], x.round_ties_even() as u64, "rni.u64 {ctx}");
        assert_eq!(g[11] as i64, x.ceil() as i64, "rpi.s64 {ctx}");
        let back = x as f32 as f64;
        assert_eq!(g[12], back.to_bits(), "f64->f32->f64 {ctx}");
        assert_eq!(g[13], x.mul_add(x, back).to_bits(), "fma.f64 {ctx}");
    }
}

#[test]
fn narrow_integers_sign_and_zero_extend() {
    let bytes: Vec<u8> = vec![0x80, 0x7f, 0xff, 0x01, 0x00, 0x80, 0x34, 0x12];
    let mut b = KernelBuilder::new("narrow");
    let px = b.ptr_param("x");
    let po = b.ptr_param("out");
    let tid = b.special(Sreg::TidX);
    let p = b.index_addr(px, tid, 1);
    let s8 = b.ld(Space::Global, Ty::S8, Addr::reg(p, 0));
    let u8v = b.ld(Space::Global, Ty::U8, Addr::reg(p, 0));
    let half = b.shr(Ty::U32, tid, 1u32);
    let p2 = b.index_addr(px, half, 2);
    let s16 = b.ld(Space::Global, Ty::S16, Addr::reg(p2, 0));
    let s16w = b.cvt(Ty::S32, Ty::S16, s16);
    let u16v = b.ld(Space::Global, Ty::U16, Addr::reg(p2, 0));
    let u16w = b.cvt(Ty::U32, Ty::U16, u16v);
    let big = b.mul(Ty::S32, s8, 3i32);
    let sat8 = b.reg(RegClass::B32);
    b.ins("cvt.sat.s8.s32", vec![sat8.into(), big.into()]);
    let trunc8 = b.reg(RegClass::B32);
    b.ins("cvt.s8.s32", vec![trunc8.into(), big.into()]);
    let w = b.cvt(Ty::S64, Ty::S32, s8);
    let (wl, wh) = {
        let lo = b.reg(RegClass::B32);
        let hi = b.reg(RegClass::B32);
        b.ins("mov.b64", vec![Operand::Vec(vec![lo, hi]), w.into()]);
        (lo, hi)
    };
    let repacked = b.reg(RegClass::B64);
    b.ins("mov.b64", vec![repacked.into(), Operand::Vec(vec![wl, wh])]);
    let same = b.setp(Cmp::Eq, Ty::U64, repacked, w);
    let samev = b.selp(Ty::U32, 1u32, 0u32, same);
    let outs = [s8, u8v, s16w, u16w, sat8, trunc8, wh, samev];
    let o = b.mul(Ty::U32, tid, outs.len() as u32);
    let base = b.index_addr(po, o, 4);
    for (j, r) in outs.iter().enumerate() {
        b.st(Space::Global, Ty::B32, Addr::reg(base, 4 * j as i64), *r);
    }
    let k = b.finish();
    let mut dev = Device::new();
    let px = dev.upload(&bytes);
    let po = dev.alloc_poisoned(8 * outs.len() * 4);
    go(&k, 1, 8, &[Arg::Ptr(px), Arg::Ptr(po)], &mut dev);
    let got = dev.download_u32(po, 8 * outs.len());
    for (t, &byte) in bytes.iter().enumerate() {
        let g = &got[t * outs.len()..(t + 1) * outs.len()];
        let s = byte as i8 as i32;
        let h = i16::from_le_bytes([bytes[t / 2 * 2], bytes[t / 2 * 2 + 1]]);
        let want = [
            s as u32,
            byte as u32,
            h as i32 as u32,
            h as u16 as u32,
            (s * 3).clamp(-128, 127) as u32,
            (s * 3) as i8 as i32 as u32,
            ((s as i64) >> 32) as u32,
            1,
        ];
        assert_eq!(g, &want, "byte {t} = {byte:#x}");
    }
}

#[test]
fn float_special_cases_and_ftz() {
    let sub = f32::from_bits(0x0000_1000); // a subnormal
    let ins: Vec<(f32, f32)> =
        vec![(sub, 1.0), (-0.0, 0.0), (f32::NAN, 2.0), (3.0, f32::NAN), (-130.0, 0.5), (0.75, -0.25), (4.0, 9.0)];
    let n = ins.len();
    let mut b = KernelBuilder::new("fspecial");
    let pa = b.ptr_param("a");
    let pb = b.ptr_param("b");
    let po = b.ptr_param("out");
    let tid = b.special(Sreg::TidX);
    let inb = b.setp(Cmp::Lt, Ty::U32, tid, n as u32);
    b.if_then(inb, false, |b| {
        let xa = b.index_addr(pa, tid, 4);
        let ya = b.index_addr(pb, tid, 4);
        let x = b.ld(Space::Global, Ty::F32, Addr::reg(xa, 0));
        let y = b.ld(Space::Global, Ty::F32, Addr::reg(ya, 0));
        let mut outs = Vec::new();
        for (op, two) in [
            ("rcp.approx.ftz.f32", false),
            ("rcp.rn.f32", false),
            ("ex2.approx.ftz.f32", false),
            ("ex2.approx.f32", false),
            ("tanh.approx.f32", false),
            ("sqrt.approx.f32", false),
            ("abs.f32", false),
            ("min.f32", true),
            ("max.f32", true),
            ("div.rn.f32", true),
            ("add.ftz.f32", true),
            ("mul.rn.f32", true),
        ] {
            let d = b.reg(RegClass::F32);
            let mut a: Vec<Operand> = vec![d.into(), x.into()];
            if two {
                a.push(y.into());
            }
            b.ins(op, a);
            outs.push(d);
        }
        let nan = b.reg(RegClass::Pred);
        b.ins("setp.nan.f32", vec![nan.into(), x.into(), y.into()]);
        let ne = b.setp(Cmp::Ne, Ty::F32, x, y);
        let neu = b.reg(RegClass::Pred);
        b.ins("setp.neu.f32", vec![neu.into(), x.into(), y.into()]);
        for p in [nan, ne, neu] {
            let v = b.selp(Ty::F32, 1.0f32, 0.0f32, p);
            outs.push(v);
        }
        let o = b.mul(Ty::U32, tid, outs.len() as u32);
        let base = b.index_addr(po, o, 4);
        for (j, r) in outs.iter().enumerate() {
            b.st(Space::Global, Ty::F32, Addr::reg(base, 4 * j as i64), *r);
        }
    });
    let k = b.finish();
    const OUTS: usize = 15;
    let mut dev = Device::new();
    let xa = dev.upload_f32(&ins.iter().map(|p| p.0).collect::<Vec<_>>());
    let ya = dev.upload_f32(&ins.iter().map(|p| p.1).collect::<Vec<_>>());
    let out = dev.alloc_poisoned(n * OUTS * 4);
    go(&k, 1, 32, &[Arg::Ptr(xa), Arg::Ptr(ya), Arg::Ptr(out)], &mut dev);
    let got = dev.download_f32(out, n * OUTS);
    let flush = |v: f32| if v.is_subnormal() { 0.0f32.copysign(v) } else { v };
    let fmin = |x: f32, y: f32| {
        if x.is_nan() {
            y
        } else if y.is_nan() || x < y || (x == y && x.is_sign_negative()) {
            x
        } else {
            y
        }
    };
    let fmax = |x: f32, y: f32| {
        if x.is_nan() {
            y
        } else if y.is_nan() || x > y || (x == y && x.is_sign_positive()) {
            x
        } else {
            y
        }
    };
    for (e, &(x, y)) in ins.iter().enumerate() {
        let want = [
            1.0 / flush(x),
            1.0 / x,
            flush(flush(x).exp2()),
            x.exp2(),
            x.tanh(),
            x.sqrt(),
            x.abs(),
            fmin(x, y),
            fmax(x, y),
            x / y,
            flush(flush(x) + flush(y)),
            x * y,
            (x.is_nan() || y.is_nan()) as u32 as f32,
            (!x.is_nan() && !y.is_nan() && x != y) as u32 as f32,
            (x != y) as u32 as f32,
        ];
        let g = &got[e * OUTS..(e + 1) * OUTS];
        for j in 0..OUTS {
            let ok = (want[j].is_nan() && g[j].is_nan()) || want[j].to_bits() == g[j].to_bits();
            assert!(ok, "output {j} for ({x:e}, {y:e}): got {:e} want {:e}", g[j], want[j]);
        }
    }
}

/// Two groups of `cp.async` copies (one 16-byte chunk per thread each), then
/// `cp.async.wait_group wait`, a barrier, and every thread reads both chunks
/// of its neighbour. With `wait` = 0 both groups have landed; with 1 the
/// second group is still in flight, which on a GPU is a race and here an error.
fn two_group_copy(wait: u32) -> Kernel {
    let mut b = KernelBuilder::new(format!("cp_async_wait{wait}"));
    let src = b.ptr_param("src");
    let out = b.ptr_param("out");
    let tid = b.special(Sreg::TidX);
    let s = b.shared("s", 2 * 32 * 16, 16);
    let so = b.shl(Ty::B32, tid, 4u32);
    let sa = b.add(Ty::U32, s, so);
    let ga = b.index_addr(src, tid, 16);
    b.cp_async16(Addr::reg(sa, 0), Addr::reg(ga, 0), 16u32);
    b.cp_async_commit();
    b.cp_async16(Addr::reg(sa, 512), Addr::reg(ga, 512), 16u32);
    b.cp_async_commit();
    b.cp_async_wait(wait);
    b.bar_sync();
    let nb = b.add(Ty::U32, tid, 1u32);
    let nb = b.and(Ty::B32, nb, 31u32);
    let no = b.shl(Ty::B32, nb, 4u32);
    let na = b.add(Ty::U32, s, no);
    let first = b.ld(Space::Shared, Ty::U32, Addr::reg(na, 0));
    let second = b.ld(Space::Shared, Ty::U32, Addr::reg(na, 512));
    let sum = b.add(Ty::U32, first, second);
    let oa = b.index_addr(out, tid, 4);
    b.st(Space::Global, Ty::U32, Addr::reg(oa, 0), sum);
    b.ret();
    b.finish()
}

#[test]
fn cp_async_lands_only_after_its_wait_group() {
    let words: Vec<u32> = (0..256u32).map(|i| i * 7 + 1).collect();
    let mut dev = Device::new();
    let src = dev.upload_u32(&words);
    let out = dev.alloc_poisoned(32 * 4);
    go(&two_group_copy(0), 1, 32, &[Arg::Ptr(src), Arg::Ptr(out)], &mut dev);
    let got = dev.download_u32(out, 32);
    for (t, &g) in got.iter().enumerate() {
        let n = (t + 1) % 32;
        assert_eq!(g, words[n * 4] + words[128 + n * 4], "thread {t}");
    }
    // wait_group 1 leaves the second group in flight: reading it is caught.
    let e = err(&two_group_copy(1), 1, 32, &[Arg::Ptr(src), Arg::Ptr(out)], &mut dev);
    assert!(matches!(e.kind, EmuErrorKind::UninitShared { addr } if addr >= 512), "{e}");
    assert!(e.to_string().contains("cp.async.wait_group"), "{e}");
}
