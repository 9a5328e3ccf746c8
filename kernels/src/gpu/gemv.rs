//! Decode GEMV: `out[M,N] = epilogue(A[M,K] · W[N,K]ᵀ)` for `M ≤ 8` tokens.
//!
//! Decode is bound by reading the weights once, so the kernel is built around
//! streaming W: a block is 8 warps, each warp owns one output column `n`
//! (one weight row) and its 32 lanes walk that row in 16-byte
//! `ld.global.nc.v4.b32` loads (8 bf16), two loads in flight per lane per
//! iteration. The `M ≤ 8` activation rows are read with vector loads from
//! global memory through the non-coherent cache: all 8 warps of a block read
//! the same activation chunk, so after the first warp it is served from L1
//! (the rows are far too long to keep whole in registers or shared memory:
//! 8 × 11008 × 4 bytes). Every lane accumulates M (2M for SiluMul) f32 dot
//! products, reduced by a butterfly `shfl.sync`; lane `m` then applies the
//! fused [`Epilogue`] to row `m` (same epilogue code as the GEMM).
//!
//! Ragged K: the chunk width is the largest of 8, 4, 2, 1 elements that
//! divides both K and lda, so every vector load is aligned and inside its row
//! (W's rows start at `n·K·2` bytes, only `2·gcd(K, 8)`-aligned when
//! `K % 8 != 0`); chunks past the row end are predicated off with zeroed
//! registers. A warp whose `n ≥ N` exits before any collective, as a whole.
//!
//! Kernel parameters and operand conventions are those of the GEMM
//! ([`super::gemm`]): `a, w, [w2], [bias], [residual], out`; bias f32 `[N]`;
//! residual f32 with out's row stride, may alias an f32 out. Activations are
//! f32 or bf16, weights bf16.

use qvc_codegen::{Addr, Cmp, Kernel, KernelBuilder, Operand, Reg, Sreg, Ty};
use qvc_ir::DType;

use super::gemm::{Act, EpiGen, Epilogue, LinearArgs, OutMut, Problem, SpecError};
use crate::spec::{Cost, KernelSpec, Launch};

/// Warps (output columns) per block.
const WARPS: u32 = 8;
/// Chunks each lane loads per loop iteration (loads in flight).
const UNROLL: u32 = 2;

/// One decode GEMV kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemvSpec {
    /// Rows of A (tokens): 1..=8.
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Activation dtype: F32 or BF16.
    pub a: DType,
    /// Row stride of A in elements (≥ K).
    pub lda: usize,
    /// Weight dtype: BF16.
    pub w: DType,
    /// F32 or BF16.
    pub out: DType,
    /// Row stride of out and residual (≥ N).
    pub ldc: usize,
    pub epilogue: Epilogue,
}

impl GemvSpec {
    /// A dense spec (`lda = K`, `ldc = N`) with bf16 weights, validated.
    pub fn new(m: usize, n: usize, k: usize, a: DType, out: DType, epilogue: Epilogue) -> Result<GemvSpec, SpecError> {
        let s = GemvSpec { m, n, k, a, lda: k, w: DType::BF16, out, ldc: n, epilogue };
        s.validate()?;
        Ok(s)
    }

    /// The same spec with explicit row strides, validated.
    pub fn with_strides(self, lda: usize, ldc: usize) -> Result<GemvSpec, SpecError> {
        let s = GemvSpec { lda, ldc, ..self };
        s.validate()?;
        Ok(s)
    }

    fn problem(&self) -> Problem {
        Problem {
            m: self.m,
            n: self.n,
            k: self.k,
            lda: self.lda,
            ldc: self.ldc,
            a: self.a,
            w: self.w,
            out: self.out,
            epi: self.epilogue,
        }
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        self.problem().validate_common(&self.name())?;
        let bad = |reason: String| Err(SpecError::Invalid { kernel: self.name(), reason });
        if !(1..=8).contains(&self.m) {
            return bad(format!("M = {} (the GEMV takes 1..=8 rows)", self.m));
        }
        if !matches!(self.a, DType::F32 | DType::BF16) || self.w != DType::BF16 {
            return bad(format!("A {} (f32 or bf16) and W {} (bf16)", self.a, self.w));
        }
        Ok(())
    }

    /// Elements per vector load: the largest power of two ≤ 8 dividing K and lda.
    pub fn chunk(&self) -> usize {
        [8, 4, 2, 1].into_iter().find(|&c| self.k.is_multiple_of(c) && self.lda.is_multiple_of(c)).unwrap_or(1)
    }

    /// Fast CPU implementation (the GEMM family's; see [`LinearArgs`]).
    pub fn cpu(&self, args: &LinearArgs, out: OutMut) -> Result<(), SpecError> {
        self.problem().cpu(&self.name(), args, out)
    }

    /// Naive f64 reference.
    pub fn reference(&self, args: &LinearArgs, out: OutMut) -> Result<(), SpecError> {
        self.problem().reference(&self.name(), args, out)
    }
}

impl KernelSpec for GemvSpec {
    fn name(&self) -> String {
        let mut s = format!("gemv_{}_m{}_n{}_k{}", self.a, self.m, self.n, self.k);
        if self.w != DType::BF16 {
            s.push_str(&format!("_w{}", self.w));
        }
        if self.lda != self.k {
            s.push_str(&format!("_lda{}", self.lda));
        }
        if self.ldc != self.n {
            s.push_str(&format!("_ldc{}", self.ldc));
        }
        s.push_str(&self.epilogue.name_suffix());
        s.push_str(&format!("_{}", self.out));
        s
    }

    fn build(&self) -> Kernel {
        if let Err(e) = self.validate() {
            panic!("{e}");
        }
        build_gemv(self)
    }

    fn launch(&self) -> Launch {
        Launch::new([self.n.div_ceil(WARPS as usize) as u32, 1, 1], [WARPS * 32, 1, 1])
    }

    fn cost(&self) -> Cost {
        self.problem().cost()
    }
}

/// `count` b32 registers set to zero, then loaded from `addr` if `p`.
fn load_b32(b: &mut KernelBuilder, p: Reg, count: usize, addr: Addr) -> Vec<Reg> {
    let regs: Vec<Reg> = (0..count).map(|_| b.mov(Ty::B32, 0u32)).collect();
    let (op, dst): (&str, Operand) = match count {
        1 => ("ld.global.nc.b32", regs[0].into()),
        2 => ("ld.global.nc.v2.b32", regs.clone().into()),
        4 => ("ld.global.nc.v4.b32", regs.clone().into()),
        _ => unreachable!("b32 loads of 1, 2 or 4"),
    };
    b.ins_if(p, false, op, vec![dst, addr.into()]);
    regs
}

/// `vw` bf16 values at `addr` (if `p`, else zeros) widened to f32.
fn load_bf16(b: &mut KernelBuilder, p: Reg, vw: usize, addr: Addr) -> Vec<Reg> {
    if vw == 1 {
        let h = b.mov(Ty::B16, 0i32);
        b.ins_if(p, false, "ld.global.nc.b16", vec![h.into(), addr.into()]);
        let wide = b.cvt(Ty::U32, Ty::U16, h);
        let bits = b.shl(Ty::B32, wide, 16);
        let f = b.reg(qvc_codegen::RegClass::F32);
        b.ins("mov.b32", vec![f.into(), bits.into()]);
        return vec![f];
    }
    let words = load_b32(b, p, vw / 2, addr);
    words
        .into_iter()
        .flat_map(|w| {
            let (lo, hi) = b.bf16x2_to_f32(w);
            [lo, hi]
        })
        .collect()
}

/// `vw` f32 values at `addr` (if `p`, else zeros), in v4/v2/scalar loads.
fn load_f32(b: &mut KernelBuilder, p: Reg, vw: usize, addr: Addr) -> Vec<Reg> {
    let mut out = vec![];
    let mut off = 0;
    while out.len() < vw {
        let n = (vw - out.len()).min(4);
        let regs: Vec<Reg> = (0..n).map(|_| b.mov(Ty::F32, 0.0f32)).collect();
        let a = addr.plus(off);
        match n {
            1 => b.ins_if(p, false, "ld.global.nc.f32", vec![regs[0].into(), a.into()]),
            _ => b.ins_if(p, false, &format!("ld.global.nc.v{n}.f32"), vec![regs.clone().into(), a.into()]),
        }
        off += 4 * n as i64;
        out.extend(regs);
    }
    out
}

fn build_gemv(s: &GemvSpec) -> Kernel {
    let silu = s.epilogue.act == Act::SiluMul;
    let vw = s.chunk();
    let asz = s.a.size();
    let chunks = (s.k / vw) as u32;
    let iters = chunks.div_ceil(32 * UNROLL);
    let mut b = KernelBuilder::new(s.name());
    b.max_threads(WARPS * 32);
    let pa = b.ptr_param("a");
    let pw = b.ptr_param("w");
    let pw2 = silu.then(|| b.ptr_param("w2"));
    let pbias = s.epilogue.bias.then(|| b.ptr_param("bias"));
    let pres = s.epilogue.residual.then(|| b.ptr_param("residual"));
    let pout = b.ptr_param("out");

    let tid = b.special(Sreg::TidX);
    let lane = b.and(Ty::B32, tid, 31);
    let warp = b.shr(Ty::U32, tid, 5);
    let bx = b.special(Sreg::CtaidX);
    let n = b.mad(Ty::U32, bx, WARPS, warp);
    let done = b.label("done");
    let past = b.setp(Cmp::Ge, Ty::U32, n, s.n as u32);
    // Warp-uniform exit: the kernel has no barrier, and the whole warp leaves.
    b.bra_if(past, false, &done);

    let wrow = b.index_addr(pw, n, (s.k * 2) as u32);
    let w2row = pw2.map(|p| b.index_addr(p, n, (s.k * 2) as u32));
    let acc: Vec<Reg> = (0..s.m).map(|_| b.mov(Ty::F32, 0.0f32)).collect();
    let acc2: Vec<Reg> = if silu { (0..s.m).map(|_| b.mov(Ty::F32, 0.0f32)).collect() } else { vec![] };

    b.for_range(0u32, iters, 1, |b, it| {
        let c0 = b.mad(Ty::U32, it, 32 * UNROLL, lane);
        // Issue every load of the iteration before any arithmetic.
        let mut staged = vec![];
        for u in 0..UNROLL {
            let c = b.add(Ty::U32, c0, u * 32);
            let ok = b.setp(Cmp::Lt, Ty::U32, c, chunks);
            let woff = b.mul_wide_u32(c, (vw * 2) as u32);
            let wp = b.add(Ty::U64, wrow, woff);
            let wv = load_bf16(b, ok, vw, Addr::reg(wp, 0));
            let w2v = w2row.map(|r| {
                let p = b.add(Ty::U64, r, woff);
                load_bf16(b, ok, vw, Addr::reg(p, 0))
            });
            let ap = b.index_addr(pa, c, (vw * asz) as u32);
            let avs: Vec<Vec<Reg>> = (0..s.m)
                .map(|m| {
                    let addr = Addr::reg(ap, (m * s.lda * asz) as i64);
                    if s.a == DType::F32 {
                        load_f32(b, ok, vw, addr)
                    } else {
                        load_bf16(b, ok, vw, addr)
                    }
                })
                .collect();
            staged.push((wv, w2v, avs));
        }
        for (wv, w2v, avs) in staged {
            for (m, av) in avs.iter().enumerate() {
                for e in 0..vw {
                    b.fma_into(acc[m], av[e], wv[e], acc[m]);
                    if let Some(w2v) = &w2v {
                        b.fma_into(acc2[m], av[e], w2v[e], acc2[m]);
                    }
                }
            }
        }
    });

    let sums: Vec<Reg> = acc.iter().map(|&a| b.warp_reduce_f32("add", a)).collect();
    let gates: Vec<Reg> = acc2.iter().map(|&a| b.warp_reduce_f32("add", a)).collect();
    let p = s.problem();
    let ep = EpiGen { p, pbias, pres, pout, pair: false };
    let cols = ep.cols(&mut b, n, 1);
    for m in 0..s.m {
        // Lane m finishes row m: the epilogues of the M rows run in parallel.
        let mine = b.setp(Cmp::Eq, Ty::U32, lane, m as u32);
        b.if_then(mine, false, |b| {
            let row = b.mov(Ty::U32, m as u32);
            let g = silu.then(|| &gates[m..m + 1]);
            ep.store(b, row, &cols, &sums[m..m + 1], g);
        });
    }
    b.place(&done);
    b.ret();
    b.finish()
}

/// The decoder's decode-step shapes (Qwen-VL-Chat, H = 4096, F = 11008,
/// V = 151936) for 1 and 8 tokens, plus the prefill's last-token lm_head
/// (the same kernel as the 1-token one). Activations bf16 (norm / SwiGLU
/// outputs), residual stream f32.
pub fn model_specs() -> Vec<GemvSpec> {
    let (bf, f32_) = (DType::BF16, DType::F32);
    let (h, f, vocab) = (4096, 11008, 151936);
    let e = Epilogue::new;
    let mut v = vec![];
    for m in [1, 8] {
        let mut push = |n, k, out, epi| v.push(GemvSpec::new(m, n, k, bf, out, epi).expect("model GEMV spec"));
        push(3 * h, h, f32_, e(true, Act::None, false)); // attn.c_attn
        push(h, h, f32_, e(false, Act::None, true)); // attn.c_proj
        push(f, h, bf, e(false, Act::SiluMul, false)); // mlp.w1 / w2
        push(h, f, f32_, e(false, Act::None, true)); // mlp.c_proj
        push(vocab, h, f32_, Epilogue::NONE); // lm_head
    }
    v
}
