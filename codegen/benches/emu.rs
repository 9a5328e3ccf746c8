//! Emulator speed: thread-instructions per second on realistic kernels.
//! Throughput is the launch's `LaunchStats::instructions`, so criterion
//! prints emulated thread-instructions per second (the target is ≥ 2e7 on
//! one core for ALU-heavy code).
//!
//! * `alu_reduce`: 4 blocks × 256 threads, each thread a grid-stride loop of
//!   loads and FMAs with a polynomial, then shuffle + shared-memory block
//!   reduction (ALU-heavy, few collectives).
//! * `mma_loop`: one warp running a K-loop of 32 `mma.sync` m16n8k16 steps
//!   with fragments from global memory (collective-heavy).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use qvc_codegen::emu::{Arg, Device, Program};
use qvc_codegen::*;
use std::hint::black_box;

fn alu_reduce() -> Kernel {
    let mut b = KernelBuilder::new("alu_reduce");
    let x = b.ptr_param("x");
    let out = b.ptr_param("out");
    let n = b.param("n", Ty::U32);
    let tid = b.special(Sreg::TidX);
    let ctaid = b.special(Sreg::CtaidX);
    let ntid = b.special(Sreg::NtidX);
    let nctaid = b.special(Sreg::NctaidX);
    let smem = b.shared("partial", 32 * 4, 4);
    let acc = b.mov(Ty::F32, 0.0f32);
    let start = b.mad(Ty::U32, ctaid, ntid, tid);
    let stride = b.mul(Ty::U32, ntid, nctaid);
    let i = b.mov(Ty::U32, start);
    let top = b.label("top");
    let exit = b.label("exit");
    let done = b.setp(Cmp::Ge, Ty::U32, i, n);
    b.bra_if(done, false, &exit);
    b.place(&top);
    let p = b.index_addr(x, i, 4);
    let v = b.ld(Space::GlobalNc, Ty::F32, Addr::reg(p, 0));
    // A degree-8 polynomial by Horner: ALU work per load, as in fused epilogues.
    let mut h = b.mov(Ty::F32, 0.5f32);
    for c in [0.25f32, -0.125, 0.0625, 1.5, -0.75, 0.375, 2.0, 1.0] {
        h = b.mad(Ty::F32, h, v, c);
    }
    b.bin_into("add", Ty::F32, acc, acc, h);
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

fn mma_loop(k: u32) -> Kernel {
    let mut b = KernelBuilder::new("mma_loop");
    let a = b.ptr_param("a");
    let w = b.ptr_param("w");
    let d = b.ptr_param("d");
    let tid = b.special(Sreg::TidX);
    let g = b.shr(Ty::U32, tid, 2u32);
    let t = b.and(Ty::B32, tid, 3u32);
    let t2 = b.shl(Ty::B32, t, 1u32);
    let acc: [Reg; 4] = std::array::from_fn(|_| b.mov(Ty::F32, 0.0f32));
    let row = b.mad(Ty::U32, g, k, t2);
    b.for_range(0u32, k, 16, |b, kk| {
        let idx = b.add(Ty::U32, row, kk);
        let pa = b.index_addr(a, idx, 2);
        let a0 = b.ld(Space::GlobalNc, Ty::B32, Addr::reg(pa, 0));
        let a1 = b.ld(Space::GlobalNc, Ty::B32, Addr::reg(pa, 8 * k as i64 * 2));
        let a2 = b.ld(Space::GlobalNc, Ty::B32, Addr::reg(pa, 16));
        let a3 = b.ld(Space::GlobalNc, Ty::B32, Addr::reg(pa, 8 * k as i64 * 2 + 16));
        let pw = b.index_addr(w, idx, 2);
        let b0 = b.ld(Space::GlobalNc, Ty::B32, Addr::reg(pw, 0));
        let b1 = b.ld(Space::GlobalNc, Ty::B32, Addr::reg(pw, 16));
        b.mma_m16n8k16(Ty::BF16, &acc, &[a0, a1, a2, a3], &[b0, b1], &acc);
    });
    let idx = b.mad(Ty::U32, g, 8u32, t2);
    let pd = b.index_addr(d, idx, 4);
    b.st_v(Space::Global, Ty::F32, Addr::reg(pd, 0), &acc[..2]);
    b.st_v(Space::Global, Ty::F32, Addr::reg(pd, 8 * 8 * 4), &acc[2..]);
    b.ret();
    b.finish()
}

fn bench_emu(c: &mut Criterion) {
    let mut g = c.benchmark_group("emu");
    g.sample_size(10);

    let k = alu_reduce();
    let prog = Program::parse(&Module::new(Target::Sm80, vec![k]).print()).unwrap();
    let n = 1 << 16;
    let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let mut dev = Device::new();
    let px = dev.upload_f32(&x);
    let po = dev.alloc_poisoned(4 * 4);
    let args = [Arg::Ptr(px), Arg::Ptr(po), Arg::U32(n as u32)];
    let launch = |dev: &mut Device| prog.launch("alu_reduce", [4, 1, 1], [256, 1, 1], &args, dev).unwrap();
    let instrs = launch(&mut dev).instructions;
    g.throughput(Throughput::Elements(instrs));
    g.bench_function("alu_reduce", |b| b.iter(|| black_box(launch(&mut dev))));

    let kk = 512;
    let prog = Program::parse(&Module::new(Target::Sm80, vec![mma_loop(kk)]).print()).unwrap();
    let bits = |n: usize| -> Vec<u8> {
        (0..n).flat_map(|i| bf16::from_f32(((i * 31) % 17) as f32 / 8.0 - 1.0).to_le_bytes()).collect()
    };
    let mut dev = Device::new();
    let pa = dev.upload(&bits(16 * kk as usize));
    let pw = dev.upload(&bits(8 * kk as usize));
    let pd = dev.alloc_poisoned(16 * 8 * 4);
    let args = [Arg::Ptr(pa), Arg::Ptr(pw), Arg::Ptr(pd)];
    let launch = |dev: &mut Device| prog.launch("mma_loop", [1, 1, 1], [32, 1, 1], &args, dev).unwrap();
    let instrs = launch(&mut dev).instructions;
    g.throughput(Throughput::Elements(instrs));
    g.bench_function("mma_loop", |b| b.iter(|| black_box(launch(&mut dev))));
    g.finish();
}

criterion_group!(benches, bench_emu);
criterion_main!(benches);
