//! GPTQ int4 Linear kernels: `out = epilogue(A · Wᵀ)` with `W` a packed
//! int4 weight in AutoGPTQ's v1 storage, read as it is (see [`qvc_ir::Q4Ref`]):
//!
//! * `qweight` u32 `[K/8, N]`: word `qweight[r/8 · N + o]` holds stored input
//!   row `r` of output `o` at bits `4·(r % 8)`;
//! * `qzeros` u32 `[groups, N/8]`: the zero of group `g`, output `o` is nibble
//!   `o % 8` of word `g · N/8 + o/8`, **plus one** (v1 stores zero − 1);
//! * `scales` f16 `[groups, N]`;
//! * `perm` u32 `[K]`: act-order resolved at load time — stored row `r`
//!   multiplies activation column `perm[r]` (the identity when the checkpoint
//!   has no act-order). The kernels gather the *activations* through it;
//!   the weight is never gathered.
//!
//! `y[i, o] = Σ_r A[i, perm[r]] · scale[r/G, o] · (q[r, o] − zero[r/G, o])`,
//! every weight dequantized in registers exactly as the CPU reference does
//! (`(q − z)` as an integer, converted, times the f16 scale, in f32).
//!
//! The group size `G` is a **kernel parameter** (u32), not part of the spec,
//! so that lowering needs only the graph's shapes; it must be a positive
//! multiple of 8 (every word's 8 rows then share a group), which the
//! executor checks before launching. `K % 8 == 0` and `N % 8 == 0` are part
//! of the format.
//!
//! Kernel parameters, in order: `a, qweight, qzeros, scales, perm,
//! [qweight2, qzeros2, scales2, perm2 if SiluMul], [bias], [residual], out,
//! group, [group2 if SiluMul]`. Bias, residual and output follow the float
//! GEMM's conventions ([`super::gemm`]): bias f32 `[N]`, residual f32 with
//! out's row stride (may alias an f32 out), out f32 or bf16. Activations
//! are f32 or bf16 with row stride `lda` (any).
//!
//! # Decode GEMV ([`Q4GemvSpec`], M ≤ 8)
//! A block owns `c` = 32, 16 or 8 output columns ([`Q4GemvSpec::cols`]: the
//! widest that gives two blocks per SM); a warp covers them over `32 / c`
//! word rows, so every warp-wide weight load reads whole 32-byte sectors
//! (128 contiguous bytes at `c` = 32). The block walks K in chunks of
//! stored rows (1024 for M ≤ 2, fewer for more rows:
//! [`Q4GemvSpec::chunk`]). Per chunk each of the block's row lanes first
//! issues the loads of its share of the chunk's words with their scales
//! and zeros (1 to 16 per thread, all in flight at once); then
//! the 256 threads gather the M activation rows of the chunk through `perm`
//! into shared memory as f32 while those loads travel; then each thread
//! dequantizes 8 weights per word and accumulates M dot products from
//! broadcast shared reads. The row lanes' partial sums meet in shared
//! memory; thread `t` then finishes row `t / c` of column `t % c` with the
//! fused epilogue, so the M rows' epilogues run in parallel.
//!
//! # Prefill GEMM ([`Q4GemmSpec`])
//! `mma.sync.m16n8k16` bf16 tensor-core tiles, 64×64 per block (4 warps of
//! 32×32), K in 32-row tiles. Each k-tile the threads load the A tile
//! (gathered through `perm`, any activation dtype) and the weight words
//! with their scales and zeros into registers, while the tensor cores work
//! on the previous tile; then they dequantize the words in registers into a
//! bf16 `[n, k]` tile in shared memory (the layout of the float GEMM's W
//! tile, 16-byte chunks XOR-swizzled the same way) and the warps read A and
//! B fragments with `ldmatrix`. The dequantized weight is rounded to bf16
//! once (as the float path's bf16 weights are); accumulation is f32.

use qvc_codegen::{Addr, Cmp, Kernel, KernelBuilder, Reg, RegClass, Space, Sreg, Ty};
use qvc_ir::DType;

use super::gemm::{Act, EpiGen, Epilogue, Problem, SpecError};
use crate::spec::{Cost, KernelSpec, Launch};

/// GEMV: warps per block.
const WARPS: u32 = 8;
/// Streaming multiprocessors of an H100 SXM: the GEMV narrows its blocks
/// until there are about two per SM.
const SMS: usize = 132;
/// GEMM: block tile, k-tile, warps.
const BM: u32 = 64;
const BN: u32 = 64;
const BK: u32 = 32;
const WARPS_M: u32 = 2;
const WARPS_N: u32 = 2;
/// Shared row pitch of a GEMM tile (BK bf16, swizzled, as in [`super::gemm`]).
const ROWB: u32 = 64;

/// Shape, dtypes and epilogue shared by both int4 families.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Shape4 {
    m: usize,
    n: usize,
    k: usize,
    a: DType,
    lda: usize,
    out: DType,
    ldc: usize,
    epilogue: Epilogue,
}

impl Shape4 {
    fn problem(&self) -> Problem {
        Problem {
            m: self.m,
            n: self.n,
            k: self.k,
            lda: self.lda,
            ldc: self.ldc,
            a: self.a,
            w: DType::Q4,
            out: self.out,
            epi: self.epilogue,
        }
    }

    fn validate(&self, name: &str) -> Result<(), SpecError> {
        self.problem().validate_common(name)?;
        let bad = |reason: String| Err(SpecError::Invalid { kernel: name.to_string(), reason });
        if !matches!(self.a, DType::F32 | DType::BF16) {
            return bad(format!("A {} (f32 or bf16)", self.a));
        }
        if !self.k.is_multiple_of(8) || !self.n.is_multiple_of(8) {
            return bad(format!("int4 K {} and N {} must be multiples of 8 (packed words)", self.k, self.n));
        }
        Ok(())
    }

    fn name(&self, family: &str) -> String {
        let mut s = format!("{family}_{}_m{}_n{}_k{}", self.a, self.m, self.n, self.k);
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

    /// Flops of the product and epilogue; bytes of the packed weights (with
    /// groups of 128 for the scales and zeros: the group size is a launch
    /// parameter), the permutation, activations and outputs.
    fn cost(&self) -> Cost {
        let (m, n, k) = (self.m as u64, self.n as u64, self.k as u64);
        let weights = 1 + (self.epilogue.act == Act::SiluMul) as u64;
        let groups = k.div_ceil(128);
        let flops = 2 * m * n * k * weights + m * n * self.epilogue.flops_per_elem();
        let bytes = m * k * self.a.size() as u64
            + weights * (n * k / 2 + groups * n * 2 + groups * n / 2 + 4 * k)
            + self.epilogue.bias as u64 * n * 4
            + self.epilogue.residual as u64 * m * n * 4
            + m * n * self.out.size() as u64;
        Cost { flops, bytes }
    }
}

/// The pointers of one int4 weight.
#[derive(Clone, Copy)]
struct QPtrs {
    qw: Reg,
    qz: Reg,
    sc: Reg,
    perm: Reg,
}

/// Declares the kernel parameters in the documented order.
struct Params {
    a: Reg,
    w: Vec<QPtrs>,
    bias: Option<Reg>,
    res: Option<Reg>,
    out: Reg,
    group: Vec<Reg>,
}

fn params(b: &mut KernelBuilder, epi: &Epilogue) -> Params {
    let silu = epi.act == Act::SiluMul;
    let a = b.ptr_param("a");
    let mut w = vec![];
    for i in 0..1 + silu as usize {
        let sfx = if i == 0 { "" } else { "2" };
        let qw = b.ptr_param(&format!("qweight{sfx}"));
        let qz = b.ptr_param(&format!("qzeros{sfx}"));
        let sc = b.ptr_param(&format!("scales{sfx}"));
        let perm = b.ptr_param(&format!("perm{sfx}"));
        w.push(QPtrs { qw, qz, sc, perm });
    }
    let bias = epi.bias.then(|| b.ptr_param("bias"));
    let res = epi.residual.then(|| b.ptr_param("residual"));
    let out = b.ptr_param("out");
    let group = (0..w.len()).map(|i| b.param(if i == 0 { "group" } else { "group2" }, Ty::U32)).collect();
    Params { a, w, bias, res, out, group }
}

/// A b32 register set to 0, then loaded from `addr` if `p`.
fn ld_u32(b: &mut KernelBuilder, p: Reg, addr: Addr) -> Reg {
    let r = b.mov(Ty::B32, 0u32);
    b.ins_if(p, false, "ld.global.nc.b32", vec![r.into(), addr.into()]);
    r
}

/// One activation element, raw (f32, or the bf16 bits in a b16 register),
/// zero unless `p`.
fn ld_act(b: &mut KernelBuilder, p: Reg, dt: DType, addr: Addr) -> Reg {
    if dt == DType::F32 {
        let r = b.mov(Ty::F32, 0.0f32);
        b.ins_if(p, false, "ld.global.nc.f32", vec![r.into(), addr.into()]);
        r
    } else {
        let r = b.mov(Ty::B16, 0i32);
        b.ins_if(p, false, "ld.global.nc.b16", vec![r.into(), addr.into()]);
        r
    }
}

/// An activation element from [`ld_act`] as f32 (bf16 is the top half of an f32).
fn act_f32(b: &mut KernelBuilder, dt: DType, r: Reg) -> Reg {
    if dt == DType::F32 {
        return r;
    }
    let wide = b.cvt(Ty::U32, Ty::U16, r);
    let bits = b.shl(Ty::B32, wide, 16);
    let f = b.reg(RegClass::F32);
    b.ins("mov.b32", vec![f.into(), bits.into()]);
    f
}

/// Scale (f32) and zero (u32, already + 1) of group `g`, output `o` of an
/// `n`-wide weight, loaded if `p` (else scale 0, so the dequantized weights
/// are 0). `zshift` is `4 · (o % 8)`.
fn scale_zero(b: &mut KernelBuilder, w: &QPtrs, p: Reg, g: Reg, o: Reg, zshift: Reg, n: usize) -> (Reg, Reg) {
    let si = b.mad(Ty::U32, g, n as u32, o);
    let sp = b.index_addr(w.sc, si, 2);
    let h = b.mov(Ty::B16, 0i32);
    b.ins_if(p, false, "ld.global.nc.b16", vec![h.into(), Addr::reg(sp, 0).into()]);
    let s = b.cvt(Ty::F32, Ty::F16, h);
    let o8 = b.shr(Ty::U32, o, 3);
    let zi = b.mad(Ty::U32, g, (n / 8) as u32, o8);
    let zp = b.index_addr(w.qz, zi, 4);
    let zw = ld_u32(b, p, Addr::reg(zp, 0));
    let z = b.shr(Ty::U32, zw, zshift);
    let z = b.and(Ty::B32, z, 15);
    let z = b.add(Ty::U32, z, 1);
    (s, z)
}

/// What [`dequant8`] needs of a group's scale `s` and zero `z`, for nibble
/// position `e` = 0..3 of a half word: `s·16^-e` and `2²³ + z·16^e` (both
/// exact: powers of two, small integers).
#[derive(Clone, Copy)]
struct GroupConsts {
    s: [Reg; 4],
    zf: [Reg; 4],
}

fn group_consts(b: &mut KernelBuilder, s: Reg, z: Reg) -> GroupConsts {
    let zf32 = b.cvt(Ty::F32, Ty::U32, z);
    GroupConsts {
        s: std::array::from_fn(|e| if e == 0 { b.mov(Ty::F32, s) } else { b.mul(Ty::F32, s, 16f32.powi(-(e as i32))) }),
        zf: std::array::from_fn(|e| b.mad(Ty::F32, zf32, 16f32.powi(e as i32), 8_388_608f32)),
    }
}

/// The 8 dequantized weights of word `w`: `scale · (q − z)` in f32, the
/// same bits as converting the integer `q − z` and multiplying, without a
/// conversion (a quarter-rate instruction) or a shift per nibble: nibble `e`
/// of a half word, masked in place and ORed under the exponent of 2²³, is
/// the float `2²³ + q·16^e`; minus `2²³ + z·16^e` that is `(q − z)·16^e`
/// exactly, and times `s·16^-e` it rounds as `(q − z)·s` does.
/// The GEMV's form: a thread's words share their group's constants, so
/// they are made once per group ([`group_consts`]).
fn dequant8(b: &mut KernelBuilder, w: Reg, c: &GroupConsts) -> Vec<Reg> {
    let halves = [w, b.shr(Ty::U32, w, 16)];
    halves
        .into_iter()
        .flat_map(|h| (0..4).map(move |e| (h, e)))
        .map(|(h, e)| {
            let q = b.and(Ty::B32, h, 15u32 << (4 * e));
            let bits = b.or(Ty::B32, q, 0x4B00_0000u32);
            let f = b.reg(RegClass::F32);
            b.ins("mov.b32", vec![f.into(), bits.into()]);
            let d = b.sub(Ty::F32, f, c.zf[e]);
            b.mul(Ty::F32, d, c.s[e])
        })
        .collect()
}

/// The same 8 weights when each word brings its own scale and zero (the
/// prefill GEMM's tiles): converting `q − z` per nibble is cheaper there
/// than making [`group_consts`] per word (H200, 300-token int4 prefill,
/// interleaved: 4256–4261 tok/s this way against 4123–4133).
fn dequant8_word(b: &mut KernelBuilder, w: Reg, s: Reg, z: Reg) -> Vec<Reg> {
    (0..8)
        .map(|e| {
            let q = if e == 0 { w } else { b.shr(Ty::U32, w, 4 * e) };
            let q = b.and(Ty::B32, q, 15);
            let d = b.sub(Ty::S32, q, z);
            let f = b.cvt(Ty::F32, Ty::S32, d);
            b.mul(Ty::F32, f, s)
        })
        .collect()
}

// ---- decode GEMV ---------------------------------------------------------------

/// One int4 decode GEMV kernel (`M ≤ 8`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Q4GemvSpec {
    /// Rows of A (tokens): 1..=8.
    pub m: usize,
    /// Outputs (multiple of 8).
    pub n: usize,
    /// Inputs (multiple of 8).
    pub k: usize,
    /// Activation dtype: F32 or BF16.
    pub a: DType,
    /// Row stride of A (≥ K).
    pub lda: usize,
    /// F32 or BF16.
    pub out: DType,
    /// Row stride of out and residual (≥ N).
    pub ldc: usize,
    pub epilogue: Epilogue,
}

impl Q4GemvSpec {
    /// A dense spec (`lda = K`, `ldc = N`), validated.
    pub fn new(m: usize, n: usize, k: usize, a: DType, out: DType, epilogue: Epilogue) -> Result<Self, SpecError> {
        let s = Q4GemvSpec { m, n, k, a, lda: k, out, ldc: n, epilogue };
        s.validate()?;
        Ok(s)
    }

    /// The same spec with explicit row strides, validated.
    pub fn with_strides(self, lda: usize, ldc: usize) -> Result<Self, SpecError> {
        let s = Q4GemvSpec { lda, ldc, ..self };
        s.validate()?;
        Ok(s)
    }

    fn shape(&self) -> Shape4 {
        Shape4 {
            m: self.m,
            n: self.n,
            k: self.k,
            a: self.a,
            lda: self.lda,
            out: self.out,
            ldc: self.ldc,
            epilogue: self.epilogue,
        }
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        self.shape().validate(&self.name())?;
        if !(1..=8).contains(&self.m) {
            return Err(SpecError::Invalid {
                kernel: self.name(),
                reason: format!("M = {} (the GEMV takes 1..=8 rows)", self.m),
            });
        }
        Ok(())
    }
}

impl Q4GemvSpec {
    /// Stored rows per chunk: 1024 up to four activation rows, 512 for more,
    /// so that the staged activations stay at most 16 KiB per weight (and a
    /// SiLU-mul kernel's shared memory within the static 48 KiB). Decode is
    /// bound by the weight stream and a chunk's loads are all issued before
    /// its activations are gathered: this puts 2 to 16 words in flight per
    /// thread (8 to 32 columns per block).
    pub fn chunk(&self) -> u32 {
        if self.m <= 4 {
            1024
        } else {
            512
        }
    }

    /// Output columns per block: 32 (a warp reads 128 contiguous bytes of a
    /// word row) when that still gives two blocks per SM, else 16 or 8 (a
    /// warp reads 2 or 4 word rows of 64 or 32 bytes: whole 32-byte sectors
    /// either way), so that N = 4096 runs on 512 blocks instead of 128.
    pub fn cols(&self) -> u32 {
        [32u32, 16].into_iter().find(|&c| self.n.div_ceil(c as usize) >= 2 * SMS).unwrap_or(8)
    }

    /// The kernel with `c` (8, 16 or 32) columns per block instead of
    /// [`cols`](Self::cols)' choice (for tests of every width on small
    /// shapes); its name gets a `_c{c}` suffix when the width differs.
    pub fn build_with_cols(&self, c: u32) -> Kernel {
        if let Err(e) = self.validate() {
            panic!("{e}");
        }
        assert!(matches!(c, 8 | 16 | 32), "{c} columns per block (8, 16 or 32)");
        build_gemv(self, c)
    }

    /// The launch for [`build_with_cols`](Self::build_with_cols).
    pub fn launch_with_cols(&self, c: u32) -> Launch {
        Launch::new([self.n.div_ceil(c as usize) as u32, 1, 1], [WARPS * 32, 1, 1])
    }
}

impl KernelSpec for Q4GemvSpec {
    fn name(&self) -> String {
        self.shape().name("q4gemv")
    }
    fn build(&self) -> Kernel {
        if let Err(e) = self.validate() {
            panic!("{e}");
        }
        build_gemv(self, self.cols())
    }
    fn launch(&self) -> Launch {
        self.launch_with_cols(self.cols())
    }
    fn cost(&self) -> Cost {
        self.shape().cost()
    }
}

fn build_gemv(s: &Q4GemvSpec, c: u32) -> Kernel {
    let m = s.m;
    let silu = s.epilogue.act == Act::SiluMul;
    let sets = 1 + silu as usize;
    let asz = s.a.size() as u32;
    let name = if c == s.cols() { s.name() } else { format!("{}_c{c}", s.name()) };
    // Row lanes: a warp covers c columns × (32 / c) word rows; the block
    // has `lanes` of them, each taking `wpt` consecutive words of a chunk.
    let lanes = WARPS * (32 / c);
    let mut b = KernelBuilder::new(name);
    b.max_threads(WARPS * 32);
    let p = params(&mut b, &s.epilogue);
    // Stored rows per chunk and words per thread per chunk (see Q4GemvSpec::chunk).
    let kc = s.chunk();
    let wpt = kc / 8 / lanes;
    // Per weight set: the gathered activations of a chunk, [m][kc] f32.
    let stage_bytes = (m as u32) * kc * 4;
    let stage = b.shared("q4_act", stage_bytes * sets as u32, 16);
    // Per set: partial sums [row lane][m][column].
    let red_bytes = lanes * m as u32 * c * 4;
    let red = b.shared("q4_red", red_bytes * sets as u32, 16);

    let tid = b.special(Sreg::TidX);
    let lane = b.and(Ty::B32, tid, 31);
    let warp = b.shr(Ty::U32, tid, 5);
    let bx = b.special(Sreg::CtaidX);
    let col_in = b.and(Ty::B32, lane, c - 1);
    let sub = b.shr(Ty::U32, lane, c.trailing_zeros());
    let rl = b.mad(Ty::U32, warp, 32 / c, sub);
    let o = b.mad(Ty::U32, bx, c, col_in);
    let col_ok = b.setp(Cmp::Lt, Ty::U32, o, s.n as u32);
    let o7 = b.and(Ty::B32, o, 7);
    let zshift = b.shl(Ty::B32, o7, 2);
    let words = (s.k / 8) as u32;
    let chunks = (s.k as u32).div_ceil(kc);
    let accs: Vec<Vec<Reg>> = (0..sets).map(|_| (0..m).map(|_| b.mov(Ty::F32, 0.0f32)).collect()).collect();
    // This thread's staging slot (rows `tid`, `tid + 256`, … of the chunk)
    // and its first word.
    let my_stage = b.mad(Ty::U32, tid, 4, stage);
    let wl0 = b.mul(Ty::U32, rl, wpt);
    // Shared address of this row lane's first row of a chunk: rl · wpt words · 8 rows · 4 bytes.
    let my_words = b.mad(Ty::U32, rl, wpt * 32, stage);

    // Words per group (the group is a multiple of 8 stored rows).
    let gws: Vec<Reg> = p.group.iter().map(|&grp| b.shr(Ty::U32, grp, 3)).collect();
    b.for_range(0u32, chunks, 1, |b, ch| {
        b.comment("this row lane's words of the chunk: issued first, they do not wait for the activations");
        let j0 = b.mad(Ty::U32, ch, kc / 8, wl0);
        // Word u of the thread is u rows of N words after its first: one
        // address per set, the rest immediate offsets.
        let oks: Vec<Reg> = (0..wpt)
            .map(|u| {
                let j = b.add(Ty::U32, j0, u);
                let j_ok = b.setp(Cmp::Lt, Ty::U32, j, words);
                b.and_pred(j_ok, col_ok)
            })
            .collect();
        let mut loaded = vec![];
        let mut groups = vec![];
        for (w, &gw) in p.w.iter().zip(&gws) {
            let wi = b.mad(Ty::U32, j0, s.n as u32, o);
            let wp = b.index_addr(w.qw, wi, 4);
            loaded.push(
                (0..wpt)
                    .map(|u| ld_u32(b, oks[u as usize], Addr::reg(wp, (u as usize * s.n * 4) as i64)))
                    .collect::<Vec<Reg>>(),
            );
            // The first word's group, its scale and zero; later words load
            // theirs only where a group starts (below).
            let g = b.div(Ty::U32, j0, gw);
            let next = b.mad(Ty::U32, g, gw, gw);
            let (sc, z) = scale_zero(b, w, oks[0], g, o, zshift, s.n);
            groups.push((g, next, sc, z));
        }
        // Everyone finished reading the previous chunk's activations.
        b.bar_sync();
        b.comment("gather the chunk's activations through perm");
        for q in 0..kc / (WARPS * 32) {
            let r = b.mad(Ty::U32, ch, kc, tid);
            let r = b.add(Ty::U32, r, q * WARPS * 32);
            let r_ok = b.setp(Cmp::Lt, Ty::U32, r, s.k as u32);
            for (set, w) in p.w.iter().enumerate() {
                let pp = b.index_addr(w.perm, r, 4);
                let c = ld_u32(b, r_ok, Addr::reg(pp, 0));
                let ap = b.index_addr(p.a, c, asz);
                for i in 0..m {
                    let v = ld_act(b, r_ok, s.a, Addr::reg(ap, (i * s.lda) as i64 * asz as i64));
                    let v = act_f32(b, s.a, v);
                    let off = set as u32 * stage_bytes + (i as u32 * kc + q * WARPS * 32) * 4;
                    b.st(Space::Shared, Ty::F32, Addr::reg(my_stage, off as i64), v);
                }
            }
        }
        b.bar_sync();
        let consts: Vec<GroupConsts> = groups.iter().map(|&(_, _, sc, z)| group_consts(b, sc, z)).collect();
        for u in 0..wpt as usize {
            for (set, (w, &gw)) in p.w.iter().zip(&gws).enumerate() {
                if u > 0 {
                    let (g, next, _, _) = groups[set];
                    let j = b.add(Ty::U32, j0, u as u32);
                    let starts = b.setp(Cmp::Eq, Ty::U32, j, next);
                    let c = consts[set];
                    b.if_then(starts, false, |b| {
                        b.comment("a new group: its scale and zero");
                        b.bin_into("add", Ty::U32, g, g, 1u32);
                        b.bin_into("add", Ty::U32, next, next, gw);
                        let (sc, z) = scale_zero(b, w, oks[u], g, o, zshift, s.n);
                        let fresh = group_consts(b, sc, z);
                        for (d, f) in c.s.iter().zip(fresh.s).chain(c.zf.iter().zip(fresh.zf)) {
                            b.assign(Ty::F32, *d, f);
                        }
                    });
                }
                let wv = dequant8(b, loaded[set][u], &consts[set]);
                // Rows (rl·wpt + u)·8.. of the chunk, for each activation
                // row (one address per row lane of the warp: broadcast reads).
                for (i, &acc) in accs[set].iter().enumerate() {
                    let off = set as u32 * stage_bytes + (i as u32 * kc + u as u32 * 8) * 4;
                    let x0 = b.ld_v(Space::Shared, Ty::F32, 4, Addr::reg(my_words, off as i64));
                    let x1 = b.ld_v(Space::Shared, Ty::F32, 4, Addr::reg(my_words, off as i64 + 16));
                    for (x, &w) in x0.into_iter().chain(x1).zip(&wv) {
                        b.fma_into(acc, x, w, acc);
                    }
                }
            }
        }
    });

    b.comment("the row lanes' partial sums meet; thread t finishes row t / c of column t % c");
    let my_red = b.mad(Ty::U32, rl, m as u32 * c * 4, red);
    let col4 = b.shl(Ty::B32, col_in, 2);
    let my_red = b.add(Ty::U32, my_red, col4);
    for (set, acc) in accs.iter().enumerate() {
        for (i, &a) in acc.iter().enumerate() {
            let off = set as u32 * red_bytes + i as u32 * c * 4;
            b.st(Space::Shared, Ty::F32, Addr::reg(my_red, off as i64), a);
        }
    }
    b.bar_sync();
    // 256 / c ≥ 8 ≥ M rows of threads; rows ≥ M read row M − 1 (written)
    // and store nothing.
    let e_row = b.shr(Ty::U32, tid, c.trailing_zeros());
    let e_col = b.and(Ty::B32, tid, c - 1);
    let row = b.min(Ty::U32, e_row, (m - 1) as u32);
    let rd = b.mad(Ty::U32, row, c * 4, red);
    let e_col4 = b.shl(Ty::B32, e_col, 2);
    let rd = b.add(Ty::U32, rd, e_col4);
    let sums: Vec<Reg> = (0..sets)
        .map(|set| {
            let total = b.mov(Ty::F32, 0.0f32);
            for l in 0..lanes {
                let off = set as u32 * red_bytes + l * m as u32 * c * 4;
                let v = b.ld(Space::Shared, Ty::F32, Addr::reg(rd, off as i64));
                b.bin_into("add", Ty::F32, total, total, v);
            }
            total
        })
        .collect();
    let ep = EpiGen { p: s.shape().problem(), pbias: p.bias, pres: p.res, pout: p.out, pair: false };
    let e_o = b.mad(Ty::U32, bx, c, e_col);
    let cols = ep.cols(&mut b, e_o, 1);
    let gates = silu.then(|| &sums[1..2]);
    ep.store(&mut b, e_row, &cols, &sums[0..1], gates);
    b.ret();
    b.finish()
}

// ---- prefill GEMM --------------------------------------------------------------

/// One int4 tensor-core GEMM kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Q4GemmSpec {
    pub m: usize,
    /// Outputs (multiple of 8).
    pub n: usize,
    /// Inputs (multiple of 8).
    pub k: usize,
    /// Activation dtype: F32 or BF16 (rounded to bf16 for the tensor cores).
    pub a: DType,
    /// Row stride of A (≥ K).
    pub lda: usize,
    /// F32 or BF16.
    pub out: DType,
    /// Row stride of out and residual (≥ N).
    pub ldc: usize,
    pub epilogue: Epilogue,
}

impl Q4GemmSpec {
    /// A dense spec (`lda = K`, `ldc = N`), validated.
    pub fn new(m: usize, n: usize, k: usize, a: DType, out: DType, epilogue: Epilogue) -> Result<Self, SpecError> {
        let s = Q4GemmSpec { m, n, k, a, lda: k, out, ldc: n, epilogue };
        s.validate()?;
        Ok(s)
    }

    /// The same spec with explicit row strides, validated.
    pub fn with_strides(self, lda: usize, ldc: usize) -> Result<Self, SpecError> {
        let s = Q4GemmSpec { lda, ldc, ..self };
        s.validate()?;
        Ok(s)
    }

    fn shape(&self) -> Shape4 {
        Shape4 {
            m: self.m,
            n: self.n,
            k: self.k,
            a: self.a,
            lda: self.lda,
            out: self.out,
            ldc: self.ldc,
            epilogue: self.epilogue,
        }
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        self.shape().validate(&self.name())
    }
}

impl KernelSpec for Q4GemmSpec {
    fn name(&self) -> String {
        self.shape().name("q4gemm")
    }
    fn build(&self) -> Kernel {
        if let Err(e) = self.validate() {
            panic!("{e}");
        }
        build_gemm(self)
    }
    fn launch(&self) -> Launch {
        Launch::new(
            [self.n.div_ceil(BN as usize) as u32, self.m.div_ceil(BM as usize) as u32, 1],
            [WARPS_M * WARPS_N * 32, 1, 1],
        )
    }
    fn cost(&self) -> Cost {
        self.shape().cost()
    }
}

/// What one thread holds of one weight set's next k-tile between the global
/// loads and the shared stores.
struct Staged {
    /// A: per chunk (2), 8 raw elements.
    a: Vec<Vec<Reg>>,
    /// B: per word (2): the word, its scale and zero.
    w: Vec<(Reg, Reg, Reg)>,
}

fn build_gemm(s: &Q4GemmSpec) -> Kernel {
    let silu = s.epilogue.act == Act::SiluMul;
    let sets = 1 + silu as usize;
    let threads = WARPS_M * WARPS_N * 32;
    let (wm, wn) = (BM / WARPS_M, BN / WARPS_N);
    let (mt, nt) = ((wm / 16) as usize, (wn / 8) as usize);
    let asz = s.a.size() as u32;
    let mut b = KernelBuilder::new(s.name());
    b.max_threads(threads);
    let p = params(&mut b, &s.epilogue);
    // Per set: A tile [BM][BK] then B tile [BN][BK], bf16, swizzled rows.
    let set_bytes = (BM + BN) * ROWB;
    let smem = b.shared("smem", set_bytes * sets as u32, 128);

    let tid = b.special(Sreg::TidX);
    let bx = b.special(Sreg::CtaidX);
    let by = b.special(Sreg::CtaidY);
    let block_n = b.mul(Ty::U32, bx, BN);
    let block_m = b.mul(Ty::U32, by, BM);
    let warp = b.shr(Ty::U32, tid, 5);
    let lane = b.and(Ty::B32, tid, 31);
    let warp_m = b.div(Ty::U32, warp, WARPS_N);
    let warp_n = b.rem(Ty::U32, warp, WARPS_N);

    b.comment("A loads: chunk q of this thread is row tid/4 + 32q, k-chunk tid%4");
    let a_c = b.and(Ty::B32, tid, 3);
    let a_r0 = b.shr(Ty::U32, tid, 2);
    let a_rows: Vec<Reg> = (0..2).map(|q| b.add(Ty::U32, a_r0, q * threads / 4)).collect();
    let a_row_ok: Vec<Reg> = a_rows
        .iter()
        .map(|&r| {
            let gr = b.add(Ty::U32, block_m, r);
            b.setp(Cmp::Lt, Ty::U32, gr, s.m as u32)
        })
        .collect();
    // Element offset of each A row (clamped to a real row: loads past M are off anyway).
    let a_rowoff: Vec<Reg> = a_rows
        .iter()
        .map(|&r| {
            let gr = b.add(Ty::U32, block_m, r);
            let gr = b.min(Ty::U32, gr, (s.m - 1) as u32);
            b.mul(Ty::U32, gr, s.lda as u32)
        })
        .collect();
    // Shared destination: row r, stored chunk c ^ ((r >> 1) & 3); the swizzle
    // term is (tid >> 3) & 3 for both rows (they differ by 32).
    let a_sw = b.shr(Ty::U32, tid, 3);
    let a_sw = b.and(Ty::B32, a_sw, 3);
    let a_cs = b.xor(Ty::B32, a_c, a_sw);
    let a_csb = b.shl(Ty::B32, a_cs, 4);
    let a_dst: Vec<Reg> = a_rows
        .iter()
        .map(|&r| {
            let d = b.mad(Ty::U32, r, ROWB, a_csb);
            b.add(Ty::U32, d, smem)
        })
        .collect();

    b.comment("B loads: word q of this thread is column tid%64, word row tid/64 + 2q");
    let b_n = b.and(Ty::B32, tid, BN - 1);
    let b_kw0 = b.shr(Ty::U32, tid, 6);
    let b_o = b.add(Ty::U32, block_n, b_n);
    let b_col_ok = b.setp(Cmp::Lt, Ty::U32, b_o, s.n as u32);
    let b_o = b.min(Ty::U32, b_o, (s.n - 1) as u32);
    let b_o7 = b.and(Ty::B32, b_o, 7);
    let zshift = b.shl(Ty::B32, b_o7, 2);
    let b_sw = b.shr(Ty::U32, b_n, 1);
    let b_sw = b.and(Ty::B32, b_sw, 3);
    let b_kws: Vec<Reg> = (0..2).map(|q| b.add(Ty::U32, b_kw0, 2 * q)).collect();
    let b_dst: Vec<Reg> = b_kws
        .iter()
        .map(|&kw| {
            let cs = b.xor(Ty::B32, kw, b_sw);
            let csb = b.shl(Ty::B32, cs, 4);
            let d = b.mad(Ty::U32, b_n, ROWB, csb);
            let d = b.add(Ty::U32, d, smem);
            b.add(Ty::U32, d, BM * ROWB)
        })
        .collect();

    let words = (s.k / 8) as u32;
    // Global loads of k-tile `kt` (if `on`) into registers.
    let load = |b: &mut KernelBuilder, kt: Reg, on: Reg| -> Vec<Staged> {
        let k0 = b.mul(Ty::U32, kt, BK);
        let kc = b.mad(Ty::U32, a_c, 8, k0);
        let k_ok = b.setp(Cmp::Lt, Ty::U32, kc, s.k as u32);
        let k_ok = b.and_pred(k_ok, on);
        p.w.iter()
            .zip(&p.group)
            .map(|(w, &grp)| {
                // The 8 activation columns of this thread's k-chunk.
                let pp = b.index_addr(w.perm, kc, 4);
                // (kc is a multiple of 8: two aligned 16-byte loads.)
                let cols: Vec<Reg> = (0..2)
                    .flat_map(|h| {
                        let regs: Vec<Reg> = (0..4).map(|_| b.mov(Ty::B32, 0u32)).collect();
                        let dst = regs.clone().into();
                        b.ins_if(k_ok, false, "ld.global.nc.v4.b32", vec![dst, Addr::reg(pp, 16 * h).into()]);
                        regs
                    })
                    .collect();
                let a = (0..2)
                    .map(|q| {
                        let ok = b.and_pred(k_ok, a_row_ok[q]);
                        cols.iter()
                            .map(|&c| {
                                let idx = b.add(Ty::U32, a_rowoff[q], c);
                                let ap = b.index_addr(p.a, idx, asz);
                                ld_act(b, ok, s.a, Addr::reg(ap, 0))
                            })
                            .collect()
                    })
                    .collect();
                let kw0 = b.mul(Ty::U32, kt, BK / 8);
                let ws = b_kws
                    .iter()
                    .map(|&kw| {
                        let j = b.add(Ty::U32, kw0, kw);
                        let j_ok = b.setp(Cmp::Lt, Ty::U32, j, words);
                        let ok = b.and_pred(j_ok, b_col_ok);
                        let ok = b.and_pred(ok, on);
                        let wi = b.mad(Ty::U32, j, s.n as u32, b_o);
                        let wp = b.index_addr(w.qw, wi, 4);
                        let word = ld_u32(b, ok, Addr::reg(wp, 0));
                        let j8 = b.shl(Ty::B32, j, 3);
                        let g = b.div(Ty::U32, j8, grp);
                        let (sc, z) = scale_zero(b, w, ok, g, b_o, zshift, s.n);
                        (word, sc, z)
                    })
                    .collect();
                Staged { a, w: ws }
            })
            .collect()
    };
    // Registers → shared: A as bf16 pairs, B dequantized to bf16 pairs.
    let store = |b: &mut KernelBuilder, st: &[Staged]| {
        for (set, sg) in st.iter().enumerate() {
            let off = (set as u32 * set_bytes) as i64;
            for (q, raw) in sg.a.iter().enumerate() {
                let packed: Vec<Reg> = raw
                    .chunks(2)
                    .map(|pr| {
                        if s.a == DType::BF16 {
                            let d = b.reg(RegClass::B32);
                            b.ins("mov.b32", vec![d.into(), vec![pr[0], pr[1]].into()]);
                            d
                        } else {
                            b.pack_half2(Ty::BF16x2, pr[0], pr[1])
                        }
                    })
                    .collect();
                b.st_v(Space::Shared, Ty::B32, Addr::reg(a_dst[q], off), &packed);
            }
            for (q, &(word, sc, z)) in sg.w.iter().enumerate() {
                let v = dequant8_word(b, word, sc, z);
                let packed: Vec<Reg> = v.chunks(2).map(|pr| b.pack_half2(Ty::BF16x2, pr[0], pr[1])).collect();
                b.st_v(Space::Shared, Ty::B32, Addr::reg(b_dst[q], off), &packed);
            }
        }
    };

    b.comment("ldmatrix lane addresses (as in the float GEMM)");
    let (a_lane, b_lane) = super::gemm::ldmatrix_lanes(&mut b, lane, (warp_m, wm), (warp_n, wn), smem);

    let accs: Vec<Vec<[Reg; 4]>> =
        (0..sets).map(|_| (0..mt * nt).map(|_| std::array::from_fn(|_| b.mov(Ty::F32, 0.0f32))).collect()).collect();

    let ktiles = (s.k as u32).div_ceil(BK);
    b.comment("prologue: k-tile 0 into registers");
    let zero = b.mov(Ty::U32, 0u32);
    let always = b.setp(Cmp::Eq, Ty::U32, zero, 0u32);
    let first = load(&mut b, zero, always);
    // The staged registers are reused by every iteration: the loop body
    // loads into fresh registers and moves them into these at its end.
    let staged = first;
    b.for_range(0u32, ktiles, 1, |b, kt| {
        // Everyone finished the previous tile's mma reads.
        b.bar_sync();
        store(b, &staged);
        b.bar_sync();
        let next = b.add(Ty::U32, kt, 1);
        let more = b.setp(Cmp::Lt, Ty::U32, next, ktiles);
        let fresh = load(b, next, more);
        for ks in 0..(BK / 16) as usize {
            for (set, acc) in accs.iter().enumerate() {
                let off = set as u32 * set_bytes;
                let af: Vec<Vec<Reg>> = (0..mt)
                    .map(|i| b.ldmatrix(4, false, Addr::reg(a_lane[ks], (off + i as u32 * 16 * ROWB) as i64)))
                    .collect();
                let bf: Vec<Vec<Reg>> = (0..nt / 2)
                    .map(|jp| {
                        let o = off + BM * ROWB + jp as u32 * 16 * ROWB;
                        b.ldmatrix(4, false, Addr::reg(b_lane[ks], o as i64))
                    })
                    .collect();
                for i in 0..mt {
                    let a4 = [af[i][0], af[i][1], af[i][2], af[i][3]];
                    for j in 0..nt {
                        let bj = [bf[j / 2][(j % 2) * 2], bf[j / 2][(j % 2) * 2 + 1]];
                        let c = &acc[i * nt + j];
                        b.mma_m16n8k16(Ty::BF16, c, &a4, &bj, c);
                    }
                }
            }
        }
        // The next tile's registers become the staged ones.
        for (st, fr) in staged.iter().zip(&fresh) {
            for (x, y) in st.a.iter().zip(&fr.a) {
                for (&d, &v) in x.iter().zip(y) {
                    let ty = if s.a == DType::F32 { Ty::F32 } else { Ty::B16 };
                    b.assign(ty, d, v);
                }
            }
            for (&(w, sc, z), &(w2, sc2, z2)) in st.w.iter().zip(&fr.w) {
                b.assign(Ty::B32, w, w2);
                b.assign(Ty::F32, sc, sc2);
                b.assign(Ty::B32, z, z2);
            }
        }
    });

    b.comment("epilogue");
    let g = b.shr(Ty::U32, lane, 2);
    let tig = b.and(Ty::B32, lane, 3);
    let row_base = b.mad(Ty::U32, warp_m, wm, g);
    let row_base = b.add(Ty::U32, row_base, block_m);
    let tig2 = b.shl(Ty::B32, tig, 1);
    let col_base = b.mad(Ty::U32, warp_n, wn, tig2);
    let col_base = b.add(Ty::U32, col_base, block_n);
    let ep = EpiGen { p: s.shape().problem(), pbias: p.bias, pres: p.res, pout: p.out, pair: s.ldc.is_multiple_of(2) };
    for j in 0..nt {
        let col = b.add(Ty::U32, col_base, j as u32 * 8);
        let cols = ep.cols(&mut b, col, 2);
        for i in 0..mt {
            for h in 0..2 {
                let row = b.add(Ty::U32, row_base, (i * 16 + h * 8) as u32);
                let vals = &accs[0][i * nt + j][2 * h..2 * h + 2];
                let gates = silu.then(|| &accs[1][i * nt + j][2 * h..2 * h + 2]);
                ep.store(&mut b, row, &cols, vals, gates);
            }
        }
    }
    b.ret();
    b.finish()
}

/// Qwen-VL-Chat's int4 decoder shapes (H = 4096, F = 11008, V = 151936):
/// decode GEMVs for 1 and 8 tokens and the prefill GEMMs at 300 tokens,
/// activations bf16, residual stream f32; `lm_head` too (`--lm-head int4`).
pub fn model_specs() -> (Vec<Q4GemvSpec>, Vec<Q4GemmSpec>) {
    let (bf, f32_) = (DType::BF16, DType::F32);
    let (h, f, vocab) = (4096, 11008, 151936);
    let e = Epilogue::new;
    let layers = [
        (3 * h, h, f32_, e(true, Act::None, false)), // attn.c_attn
        (h, h, f32_, e(true, Act::None, true)),      // attn.c_proj (GPTQ bias)
        (f, h, bf, e(false, Act::SiluMul, false)),   // mlp.w1 / w2
        (h, f, f32_, e(true, Act::None, true)),      // mlp.c_proj
        (vocab, h, f32_, Epilogue::NONE),            // lm_head
    ];
    let mut gemv = vec![];
    for m in [1, 8] {
        for &(n, k, out, epi) in &layers {
            gemv.push(Q4GemvSpec::new(m, n, k, bf, out, epi).expect("model int4 GEMV spec"));
        }
    }
    let gemm = layers
        .iter()
        .map(|&(n, k, out, epi)| Q4GemmSpec::new(300, n, k, bf, out, epi).expect("model int4 GEMM spec"))
        .collect();
    (gemv, gemm)
}
