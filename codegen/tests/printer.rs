//! The printer's output assembles with ptxas (where installed) for every
//! instruction form the builder can emit.

use qvc_codegen::*;

/// One kernel that uses every builder method once.
pub fn kitchen_sink() -> Kernel {
    let mut b = KernelBuilder::new("kitchen_sink");
    b.max_threads(32);
    let x = b.ptr_param("x");
    let n = b.param("n", Ty::U32);
    let tid = b.special(Sreg::TidX);
    let smem = b.shared("smem", 2048, 16);
    let p = b.index_addr(x, tid, 4);
    let v = b.ld(Space::GlobalNc, Ty::F32, Addr::reg(p, 0));
    let g = b.gelu(v);
    let s = b.silu(g);
    let r = b.rsqrt(s);
    let l = b.lg2(r);
    let q = b.sqrt(l);
    let red = b.warp_reduce_f32("max", q);
    let h = b.shfl_idx(red, 0u32);
    let lo = b.mov(Ty::F32, 1.5f32);
    let packed = b.pack_half2(Ty::BF16x2, lo, h);
    let (a0, a1) = b.unpack_b32(packed);
    let f0 = b.cvt(Ty::F32, Ty::BF16, a0);
    let f1 = b.cvt(Ty::F32, Ty::BF16, a1);
    let (w0, w1) = b.bf16x2_to_f32(packed);
    let sum = b.add(Ty::F32, f0, f1);
    let sum = b.add(Ty::F32, sum, w0);
    let sum = b.add(Ty::F32, sum, w1);
    let so = b.mul(Ty::U32, tid, 16u32);
    let sa = b.add(Ty::U32, smem, so);
    b.cp_async16(Addr::reg(sa, 0), Addr::reg(p, 0), 16u32);
    b.cp_async_commit();
    b.cp_async_wait(0);
    b.bar_sync();
    let frag = b.ldmatrix(4, false, Addr::reg(sa, 0));
    let fragt = b.ldmatrix(2, true, Addr::reg(sa, 0));
    let acc: Vec<Reg> = (0..4).map(|_| b.mov(Ty::F32, 0.0f32)).collect();
    let acc: [Reg; 4] = acc.try_into().unwrap();
    b.mma_m16n8k16(Ty::BF16, &acc, &frag.clone().try_into().unwrap(), &fragt.try_into().unwrap(), &acc);
    let vs = b.ld_v(Space::Shared, Ty::F32, 4, Addr::reg(sa, 0));
    b.st_v(Space::Shared, Ty::F32, Addr::reg(sa, 0), &vs);
    let t = b.add(Ty::F32, sum, acc[0]);
    let e = b.exp(t);
    let i = b.cvt(Ty::S32, Ty::F32, e);
    let fi = b.cvt(Ty::F32, Ty::S32, i);
    let half = b.cvt(Ty::F16, Ty::F32, fi);
    let back = b.cvt(Ty::F32, Ty::F16, half);
    let inb = b.setp(Cmp::Lt, Ty::U32, tid, n);
    let acc2 = b.mov(Ty::F32, 0.0f32);
    b.for_range(0u32, n, 1, |b, k| {
        let kf = b.cvt(Ty::F32, Ty::U32, k);
        b.fma_into(acc2, kf, back, acc2);
    });
    let w = b.selp(Ty::F32, acc2, back, inb);
    let d = b.div(Ty::U32, tid, 3u32);
    let m = b.rem(Ty::U32, tid, 3u32);
    let dm = b.mad(Ty::U32, d, 3u32, m);
    let c = b.setp(Cmp::Eq, Ty::U32, dm, tid);
    b.if_then(c, false, |b| {
        let _old = b.atom(Space::Global, "add", Ty::F32, Addr::reg(p, 0), w);
    });
    b.ins_if(inb, true, "st.global.f32", vec![Addr::reg(p, 0).into(), w.into()]);
    b.ret();
    b.finish()
}

#[test]
fn prints_declarations_and_instructions() {
    let m = Module::new(Target::Sm80, vec![kitchen_sink()]);
    let text = m.print();
    assert!(text.contains(".target sm_80"));
    assert!(text.contains(".visible .entry kitchen_sink("));
    assert!(text.contains("\t.param .u64 p_x,"));
    assert!(text.contains(".shared .align 16 .b8 smem[2048];"));
    assert!(text.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f"));
    assert!(text.contains("mov.f32 %f"), "{text}");
    assert!(text.contains("0f3FC00000"), "1.5 printed bit-exactly");
}

#[test]
fn every_builder_form_assembles_with_ptxas() {
    let Some(ptxas) = ptxas::for_tests() else {
        eprintln!("SKIPPED: ptxas not found (set QVC_PTXAS or install it, see TOOLCHAIN.md)");
        return;
    };
    for t in Target::ALL {
        let text = Module::new(t, vec![kitchen_sink()]).print();
        let usage = ptxas::assemble(&ptxas, &text, t).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(usage.len(), 1);
        assert!(usage[0].registers > 0);
        assert_eq!(usage[0].shared_bytes, 2048);
    }
}
