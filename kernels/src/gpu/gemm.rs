//! Tiled tensor-core GEMM for Linear layers: `out = epilogue(A · Wᵀ)`.
//!
//! * `A` is `[M, K]` row-major bf16 (or f16) with row stride `lda` (elements);
//! * `W` is the Linear weight `[N, K]` row-major (`[out, in]` as in the
//!   checkpoint), same 16-bit dtype as `A` (mma.sync takes one input type);
//!   in `B = Wᵀ` terms it is exactly mma's "col" operand, so B fragments are
//!   loaded from W's rows with a non-transposed `ldmatrix`;
//! * `out` is `[M, N]` row-major f32 or bf16 with row stride `ldc`;
//! * the fused [`Epilogue`] adds a bias (`[N]` **f32**), applies an activation
//!   and adds a residual (`[M, N]` f32 with the *same row stride `ldc`*; it
//!   may alias `out`, which is how the residual stream is updated in place).
//!
//! SwiGLU ([`Act::SiluMul`], Qwen's MLP `w1(y) * silu(w2(y))`) takes its two
//! weights as **two pointer params** `w` (= w1) and `w2` (= w2), both `[N, K]`,
//! so the checkpoint tensors are used as they are: `out = (A·w1ᵀ) ⊙ silu(A·w2ᵀ)`.
//! (SiluMul with a bias is rejected: Qwen's w1/w2 have none.)
//!
//! Kernel parameters, in order: `a, w, [w2 if SiluMul], [bias if bias],
//! [residual if residual], out` — all pointers; shapes are compiled in.
//!
//! # PTX design (see [`Tiles`])
//! A block computes a `BM×BN` tile of `out` with `warps_m×warps_n` warps; each
//! warp owns a `(BM/warps_m)×(BN/warps_n)` sub-tile of m16n8 f32 accumulators.
//! K advances in `BK = 32` slices through an `S`-stage `cp.async` ring in
//! shared memory (16-byte copies; rows past `M`/`N` and k-chunks past `K` are
//! zero-filled by `src_bytes = 0`, so ragged tiles need no branches and every
//! shared byte that `ldmatrix` reads has been written). Shared rows are 64
//! bytes (BK bf16) with the four 16-byte chunks XOR-swizzled: chunk `c` of row
//! `r` is stored at chunk `c ^ ((r >> 1) & 3)`. The 8 row addresses of one
//! `ldmatrix` 8×8 matrix (8 consecutive rows, one logical chunk) then fall in
//! the 16-byte bank groups `c, 4+c, c^1, 4+(c^1), c^2, …` — all 8 distinct,
//! so the load is conflict-free — and the 8 threads of a `cp.async` phase
//! (2 rows × 4 chunks) also hit 8 distinct groups. Unpadded rows let the
//! 128×128 tile keep 3 stages in the 48 KiB of static shared memory
//! (3 × 16 KiB); 64×64 tiles use 4.
//!
//! Invariants (checked by [`GemmSpec::validate`]): `K % 8 == 0` and
//! `lda % 8 == 0` (16-byte `cp.async` chunks stay inside a row and aligned),
//! `lda ≥ K`, `ldc ≥ N`, device pointers 16-byte aligned, and element offsets
//! below 2³¹. Every `bar.sync` is reached by all threads (the k-loop has a
//! uniform trip count); stores are predicated per element on `row < M`,
//! `col < N`.
//!
//! The CPU side ([`GemmSpec::cpu`], shared with the GEMV family) uses
//! [`crate::gemm`] for the product, then the epilogue in f32, rayon-parallel
//! over rows; [`GemmSpec::reference`] is the naive f64 version.

use std::fmt;

use half::bf16;
use qvc_codegen::{Addr, Cmp, Kernel, KernelBuilder, Reg, Space, Sreg, Ty};
use qvc_ir::{DType, Elems};
use rayon::prelude::*;

use crate::act::{gelu_erf, gelu_ref, swiglu};
use crate::gemm::{gemm, MatRef};
use crate::spec::{Cost, KernelSpec, Launch};

/// The activation of a fused epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Act {
    None,
    /// GELU, erf form (ViT-bigG's MLP).
    Gelu,
    /// SwiGLU: `(A·w1ᵀ) * silu(A·w2ᵀ)` — silu on the **second** weight's output.
    SiluMul,
}

/// What happens to each `A·Wᵀ` element before it is stored:
/// `out = act(acc + bias) + residual`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Epilogue {
    /// Add `bias[n]` (f32, `[N]`).
    pub bias: bool,
    pub act: Act,
    /// Add `residual[m*ldc + n]` (f32; may alias `out` when `out` is f32).
    pub residual: bool,
}

impl Epilogue {
    pub const NONE: Epilogue = Epilogue { bias: false, act: Act::None, residual: false };

    pub fn new(bias: bool, act: Act, residual: bool) -> Epilogue {
        Epilogue { bias, act, residual }
    }

    /// The part of a kernel name that encodes the epilogue (`_bias_gelu_res`).
    pub(crate) fn name_suffix(&self) -> String {
        let mut s = String::new();
        if self.bias {
            s.push_str("_bias");
        }
        match self.act {
            Act::None => {}
            Act::Gelu => s.push_str("_gelu"),
            Act::SiluMul => s.push_str("_silumul"),
        }
        if self.residual {
            s.push_str("_res");
        }
        s
    }

    /// Flops per output element beyond the product (bias and residual adds
    /// count 1; GELU is counted as 10, SiLU·mul as 6, about the instructions
    /// they take).
    pub(crate) fn flops_per_elem(&self) -> u64 {
        self.bias as u64
            + self.residual as u64
            + match self.act {
                Act::None => 0,
                Act::Gelu => 10,
                Act::SiluMul => 6,
            }
    }
}

/// Why a spec or a call's buffers were rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpecError {
    /// The spec itself is not supported (dtype, alignment, limits).
    Invalid { kernel: String, reason: String },
    /// A buffer is too small for the spec.
    Buffer { kernel: String, what: &'static str, need: usize, got: usize },
    /// A buffer the epilogue needs was not given, or one it does not use was.
    Operand { kernel: String, what: &'static str, expected: bool },
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpecError::Invalid { kernel, reason } => write!(f, "{kernel}: unsupported spec: {reason}"),
            SpecError::Buffer { kernel, what, need, got } => {
                write!(f, "{kernel}: {what} has {got} elements, needs at least {need}")
            }
            SpecError::Operand { kernel, what, expected: true } => write!(f, "{kernel}: {what} is required"),
            SpecError::Operand { kernel, what, expected: false } => {
                write!(f, "{kernel}: {what} was given but the spec does not use it")
            }
        }
    }
}

impl std::error::Error for SpecError {}

/// A mutable output buffer in one of the output dtypes.
pub enum OutMut<'a> {
    F32(&'a mut [f32]),
    BF16(&'a mut [bf16]),
}

impl OutMut<'_> {
    fn len(&self) -> usize {
        match self {
            OutMut::F32(s) => s.len(),
            OutMut::BF16(s) => s.len(),
        }
    }
    fn dtype(&self) -> DType {
        match self {
            OutMut::F32(_) => DType::F32,
            OutMut::BF16(_) => DType::BF16,
        }
    }
}

/// The inputs of a Linear-family call (GEMM and GEMV).
///
/// `residual: None` with a residual epilogue and an f32 `out` means *in
/// place*: `out` already holds the residual (the aliasing the PTX allows).
#[derive(Clone, Copy, Debug)]
pub struct LinearArgs<'a> {
    /// `[M, K]` with row stride `lda`.
    pub a: Elems<'a>,
    /// `[N, K]` (w1 for SiluMul).
    pub w: Elems<'a>,
    /// `[N, K]` w2, SiluMul only.
    pub w2: Option<Elems<'a>>,
    /// `[N]`.
    pub bias: Option<&'a [f32]>,
    /// `[M, N]` with row stride `ldc`.
    pub residual: Option<&'a [f32]>,
}

/// The shape of a Linear-family problem, shared by GEMM and GEMV for their
/// CPU paths and checks.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Problem {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldc: usize,
    pub a: DType,
    pub w: DType,
    pub out: DType,
    pub epi: Epilogue,
}

/// Elements a strided `[rows, cols]` view spans.
fn span(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * ld + cols
    }
}

impl Problem {
    /// Checks every buffer against the shape; returns whether the residual is in place.
    fn check(&self, name: &str, args: &LinearArgs, out: &OutMut) -> Result<bool, SpecError> {
        let buf = |what, need: usize, got: usize| {
            if got < need {
                Err(SpecError::Buffer { kernel: name.to_string(), what, need, got })
            } else {
                Ok(())
            }
        };
        let operand = |what, expected| Err(SpecError::Operand { kernel: name.to_string(), what, expected });
        let dtype = |what: &str, want: DType, got: DType| {
            if want == got {
                Ok(())
            } else {
                Err(SpecError::Invalid {
                    kernel: name.to_string(),
                    reason: format!("{what} is {got}, spec says {want}"),
                })
            }
        };
        dtype("A", self.a, args.a.dtype())?;
        dtype("W", self.w, args.w.dtype())?;
        dtype("out", self.out, out.dtype())?;
        buf("A", span(self.m, self.k, self.lda), args.a.len())?;
        buf("W", self.n * self.k, args.w.len())?;
        buf("out", span(self.m, self.n, self.ldc), out.len())?;
        match (self.epi.act == Act::SiluMul, args.w2) {
            (true, None) => return operand("w2", true),
            (false, Some(_)) => return operand("w2", false),
            (true, Some(w2)) => {
                dtype("W2", self.w, w2.dtype())?;
                buf("W2", self.n * self.k, w2.len())?;
            }
            (false, None) => {}
        }
        match (self.epi.bias, args.bias) {
            (true, None) => return operand("bias", true),
            (false, Some(_)) => return operand("bias", false),
            (true, Some(b)) => buf("bias", self.n, b.len())?,
            (false, None) => {}
        }
        match (self.epi.residual, args.residual) {
            (true, Some(r)) => {
                buf("residual", span(self.m, self.n, self.ldc), r.len())?;
                Ok(false)
            }
            (true, None) if self.out == DType::F32 => Ok(true),
            (true, None) => operand("residual (in place needs an f32 out)", true),
            (false, Some(_)) => operand("residual", false),
            (false, None) => Ok(false),
        }
    }

    /// Fast CPU path: [`crate::gemm`] for the product(s), then the epilogue in
    /// f32, parallel over rows.
    pub(crate) fn cpu(&self, name: &str, args: &LinearArgs, mut out: OutMut) -> Result<(), SpecError> {
        let in_place = self.check(name, args, &out)?;
        let (m, n, k) = (self.m, self.n, self.k);
        if m == 0 || n == 0 {
            return Ok(());
        }
        let a = MatRef { data: args.a, rows: m, cols: k, row_stride: self.lda, col_stride: 1, offset: 0 };
        let product = |w: Elems| {
            let mut c = vec![0.0f32; m * n];
            gemm(a, MatRef::row_major(w.slice(0, n * k), n, k).transposed(), &mut c, false);
            c
        };
        let mut acc = product(args.w);
        if let Some(w2) = args.w2 {
            let gate = product(w2);
            let mut g = vec![0.0f32; m * n];
            swiglu(&acc, &gate, &mut g);
            acc = g;
        }
        let epi = self.epi;
        // One row of the epilogue: bias, activation, residual, into `dst`.
        let finish = |row: &mut [f32], res: Option<&[f32]>, dst: &mut dyn FnMut(usize, f32)| {
            if let Some(b) = args.bias {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
            if epi.act == Act::Gelu {
                gelu_erf(row);
            }
            for (j, &v) in row.iter().enumerate() {
                dst(j, v + res.map_or(0.0, |r| r[j]));
            }
        };
        let ldc = self.ldc;
        match &mut out {
            OutMut::F32(o) => {
                o[..span(m, n, ldc)].par_chunks_mut(ldc).zip(acc.par_chunks_mut(n)).enumerate().for_each(
                    |(i, (orow, row))| {
                        if in_place {
                            let res: Vec<f32> = orow[..n].to_vec();
                            finish(row, Some(&res), &mut |j, v| orow[j] = v);
                        } else {
                            let res = args.residual.map(|r| &r[i * ldc..i * ldc + n]);
                            finish(row, res, &mut |j, v| orow[j] = v);
                        }
                    },
                );
            }
            OutMut::BF16(o) => {
                o[..span(m, n, ldc)].par_chunks_mut(ldc).zip(acc.par_chunks_mut(n)).enumerate().for_each(
                    |(i, (orow, row))| {
                        let res = args.residual.map(|r| &r[i * ldc..i * ldc + n]);
                        finish(row, res, &mut |j, v| orow[j] = bf16::from_f32(v));
                    },
                );
            }
        }
        Ok(())
    }

    /// Naive reference: f64 dot products and epilogue, element by element.
    pub(crate) fn reference(&self, name: &str, args: &LinearArgs, mut out: OutMut) -> Result<(), SpecError> {
        let in_place = self.check(name, args, &out)?;
        let (m, n, k) = (self.m, self.n, self.k);
        for i in 0..m {
            for j in 0..n {
                let dot = |w: &Elems| -> f64 {
                    (0..k).map(|p| args.a.get(i * self.lda + p) as f64 * w.get(j * k + p) as f64).sum()
                };
                let mut v = dot(&args.w);
                if let Some(b) = args.bias {
                    v += b[j] as f64;
                }
                v = match self.epi.act {
                    Act::None => v,
                    Act::Gelu => gelu_ref(v),
                    Act::SiluMul => {
                        let g = dot(args.w2.as_ref().expect("checked"));
                        v * g / (1.0 + (-g).exp())
                    }
                };
                let idx = i * self.ldc + j;
                match &mut out {
                    OutMut::F32(o) => {
                        if self.epi.residual {
                            v += if in_place { o[idx] as f64 } else { args.residual.expect("checked")[idx] as f64 };
                        }
                        o[idx] = v as f32;
                    }
                    OutMut::BF16(o) => {
                        if let Some(r) = args.residual {
                            v += r[idx] as f64;
                        }
                        o[idx] = bf16::from_f32(v as f32);
                    }
                }
            }
        }
        Ok(())
    }

    pub(crate) fn cost(&self) -> Cost {
        let (m, n, k) = (self.m as u64, self.n as u64, self.k as u64);
        let weights = 1 + (self.epi.act == Act::SiluMul) as u64;
        let flops = 2 * m * n * k * weights + m * n * self.epi.flops_per_elem();
        let bytes = m * k * self.a.size() as u64
            + weights * n * k * self.w.size() as u64
            + self.epi.bias as u64 * n * 4
            + self.epi.residual as u64 * m * n * 4
            + m * n * self.out.size() as u64;
        Cost { flops, bytes }
    }

    /// Checks shared by both families' `validate`.
    pub(crate) fn validate_common(&self, name: &str) -> Result<(), SpecError> {
        let bad = |reason: String| Err(SpecError::Invalid { kernel: name.to_string(), reason });
        if self.m == 0 || self.n == 0 || self.k == 0 {
            return bad(format!("empty problem {}x{}x{}", self.m, self.n, self.k));
        }
        if !matches!(self.out, DType::F32 | DType::BF16) {
            return bad(format!("out dtype {} (f32 or bf16)", self.out));
        }
        if self.lda < self.k || self.ldc < self.n {
            return bad(format!("strides lda {} < K {} or ldc {} < N {}", self.lda, self.k, self.ldc, self.n));
        }
        if self.epi.act == Act::SiluMul && self.epi.bias {
            return bad("SiluMul with a bias is not supported".into());
        }
        // 32-bit element offsets inside the kernels.
        let limit = 1usize << 31;
        if span(self.m, self.n, self.ldc) >= limit
            || span(self.m, self.k, self.lda) >= limit
            || self.n * self.k >= limit
        {
            return bad("a tensor has 2^31 elements or more".into());
        }
        Ok(())
    }
}

/// Shared-memory row pitch in bytes: 32 bf16, unpadded; bank conflicts are
/// avoided by the XOR swizzle of the 16-byte chunks (see the module doc).
const ROWB: u32 = 64;
/// K elements per pipeline stage.
const BK: u32 = 32;
/// Streaming multiprocessors of an H100 SXM: below about one wave of large
/// tiles the small tiles keep more SMs busy.
const SMS: usize = 132;
/// Static shared memory limit per block.
const SMEM_LIMIT: u32 = 48 * 1024;

/// The block tiling the generator picked for a spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiles {
    pub bm: u32,
    pub bn: u32,
    pub warps_m: u32,
    pub warps_n: u32,
    /// cp.async pipeline depth.
    pub stages: u32,
}

impl Tiles {
    pub fn threads(&self) -> u32 {
        self.warps_m * self.warps_n * 32
    }
    /// m16 tiles per warp.
    fn mt(&self) -> u32 {
        self.bm / self.warps_m / 16
    }
    /// n8 tiles per warp (even: B fragments come two n8 tiles per ldmatrix.x4).
    fn nt(&self) -> u32 {
        self.bn / self.warps_n / 8
    }
}

/// One GEMM kernel: `out[M,N] = epilogue(A[M,K] · W[N,K]ᵀ)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmSpec {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Activation dtype: BF16 or F16.
    pub a: DType,
    /// Row stride of A in elements (≥ K, multiple of 8).
    pub lda: usize,
    /// Weight dtype: must equal `a` (one mma input type).
    pub w: DType,
    /// F32 or BF16.
    pub out: DType,
    /// Row stride of out (and of the residual) in elements (≥ N).
    pub ldc: usize,
    pub epilogue: Epilogue,
}

impl GemmSpec {
    /// A dense spec (`lda = K`, `ldc = N`), weights of A's dtype, validated.
    pub fn new(m: usize, n: usize, k: usize, a: DType, out: DType, epilogue: Epilogue) -> Result<GemmSpec, SpecError> {
        let s = GemmSpec { m, n, k, a, lda: k, w: a, out, ldc: n, epilogue };
        s.validate()?;
        Ok(s)
    }

    /// The same spec with explicit row strides, validated.
    pub fn with_strides(self, lda: usize, ldc: usize) -> Result<GemmSpec, SpecError> {
        let s = GemmSpec { lda, ldc, ..self };
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

    /// Whether the PTX generator supports the spec, and why not.
    pub fn validate(&self) -> Result<(), SpecError> {
        let p = self.problem();
        p.validate_common(&self.name())?;
        let bad = |reason: String| Err(SpecError::Invalid { kernel: self.name(), reason });
        if !matches!(self.a, DType::BF16 | DType::F16) || self.w != self.a {
            return bad(format!("A {} and W {} must be the same 16-bit float type", self.a, self.w));
        }
        if !self.k.is_multiple_of(8) || !self.lda.is_multiple_of(8) {
            return bad(format!("K {} and lda {} must be multiples of 8 (16-byte cp.async chunks)", self.k, self.lda));
        }
        Ok(())
    }

    /// The tiling: 128×128 (8 warps, 3 stages) when there is at least a wave
    /// of such tiles, else 64×64 (4 warps, 4 stages); SiluMul halves BN of the
    /// large tile since it keeps two accumulator sets.
    pub fn tiles(&self) -> Tiles {
        let big = self.m.div_ceil(128) * self.n.div_ceil(128) >= SMS;
        let silu = self.epilogue.act == Act::SiluMul;
        let (bm, bn, warps_m, warps_n) = match (big, silu) {
            (true, false) => (128, 128, 2, 4),
            (true, true) => (128, 64, 4, 2),
            (false, _) => (64, 64, 2, 2),
        };
        let stage = (bm + bn * (1 + silu as u32)) * ROWB;
        let stages = (SMEM_LIMIT / stage).min(4);
        Tiles { bm, bn, warps_m, warps_n, stages }
    }

    /// The kernel with a tiling other than [`tiles`](Self::tiles) picks (for
    /// tests of every tiling on small shapes, and for tuning); its name gets a
    /// `_t{bm}x{bn}` suffix when the tiling differs. Panics on a tiling the
    /// generator cannot build (warp tiles must be 16×16 multiples, the rows of
    /// a tile must split evenly over the threads, stages ≥ 2, smem ≤ 48 KiB).
    pub fn build_with_tiles(&self, tiles: Tiles) -> Kernel {
        if let Err(e) = self.validate() {
            panic!("{e}");
        }
        GemmGen::with_tiles(self, tiles).build()
    }

    /// The launch for [`build_with_tiles`](Self::build_with_tiles).
    pub fn launch_with_tiles(&self, t: Tiles) -> Launch {
        Launch::new(
            [self.n.div_ceil(t.bn as usize) as u32, self.m.div_ceil(t.bm as usize) as u32, 1],
            [t.threads(), 1, 1],
        )
    }

    /// Fast CPU implementation (see [`LinearArgs`] for the in-place residual).
    pub fn cpu(&self, args: &LinearArgs, out: OutMut) -> Result<(), SpecError> {
        self.problem().cpu(&self.name(), args, out)
    }

    /// Naive f64 reference, same contract as [`cpu`](Self::cpu).
    pub fn reference(&self, args: &LinearArgs, out: OutMut) -> Result<(), SpecError> {
        self.problem().reference(&self.name(), args, out)
    }
}

impl KernelSpec for GemmSpec {
    fn name(&self) -> String {
        let mut s = format!("gemm_{}_m{}_n{}_k{}", self.a, self.m, self.n, self.k);
        if self.w != self.a {
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
        GemmGen::with_tiles(self, self.tiles()).build()
    }

    fn launch(&self) -> Launch {
        self.launch_with_tiles(self.tiles())
    }

    fn cost(&self) -> Cost {
        self.problem().cost()
    }
}

/// One operand tile (A, W or W2) as this thread loads it: per 16-byte chunk
/// the shared destination (relative to a stage), the global source of the
/// chunk at k-tile 0, and whether its row exists.
struct TileLoad {
    dst: Vec<Reg>,
    src: Vec<Reg>,
    row_ok: Vec<Reg>,
    /// Where a masked chunk points (a valid address; nothing is read from it).
    fallback: Reg,
}

struct GemmGen<'s> {
    s: &'s GemmSpec,
    t: Tiles,
    silu: bool,
    stage_bytes: u32,
    name: String,
}

impl<'s> GemmGen<'s> {
    fn with_tiles(s: &'s GemmSpec, t: Tiles) -> Self {
        let silu = s.epilogue.act == Act::SiluMul;
        let stage_bytes = (t.bm + t.bn * (1 + silu as u32)) * ROWB;
        let (wm, wn) = (t.bm / t.warps_m.max(1), t.bn / t.warps_n.max(1));
        assert!(
            t.warps_m > 0
                && t.warps_n > 0
                && wm % 16 == 0
                && wn % 16 == 0
                && wm * t.warps_m == t.bm
                && wn * t.warps_n == t.bn,
            "tiling {t:?}: warp tiles must be multiples of 16x16"
        );
        assert!(t.stages >= 2 && t.stages * stage_bytes <= SMEM_LIMIT, "tiling {t:?}: stages / shared memory");
        let name = if t == s.tiles() {
            s.name()
        } else {
            format!("{}_t{}x{}w{}x{}s{}", s.name(), t.bm, t.bn, t.warps_m, t.warps_n, t.stages)
        };
        GemmGen { s, t, silu, stage_bytes, name }
    }

    /// Per-thread setup of one operand's loads: `rows` rows starting at
    /// global row `row0` of a `[limit, K]` matrix with stride `ld`, placed at
    /// `smem_off` inside each stage.
    #[allow(clippy::too_many_arguments)]
    fn tile_load(
        &self,
        b: &mut KernelBuilder,
        base: Reg,
        ld: usize,
        rows: u32,
        row0: Reg,
        limit: usize,
        smem: Reg,
        smem_off: u32,
        tid: Reg,
    ) -> TileLoad {
        let threads = self.t.threads();
        let per_thread = rows * (BK / 8) / threads;
        assert!(
            per_thread >= 1 && (rows * (BK / 8)).is_multiple_of(threads),
            "tile rows {rows} do not split over {threads}"
        );
        // Chunk q of thread tid: row tid/4 + q·threads/4, 16-byte column tid%4,
        // stored at column (tid%4) ^ ((row >> 1) & 3). threads/4 is a multiple
        // of 8, so the swizzle term is the same for every q: (tid >> 3) & 3.
        let r0 = b.shr(Ty::U32, tid, 2);
        let c = b.and(Ty::B32, tid, 3);
        let cbytes = b.shl(Ty::B32, c, 4);
        let sw = b.shr(Ty::U32, tid, 3);
        let sw = b.and(Ty::B32, sw, 3);
        let cs = b.xor(Ty::B32, c, sw);
        let csbytes = b.shl(Ty::B32, cs, 4);
        let mut tl = TileLoad { dst: vec![], src: vec![], row_ok: vec![], fallback: base };
        for q in 0..per_thread {
            let r = b.add(Ty::U32, r0, q * threads / 4);
            let d = b.mad(Ty::U32, r, ROWB, csbytes);
            let d = b.add(Ty::U32, d, smem);
            tl.dst.push(b.add(Ty::U32, d, smem_off));
            let gr = b.add(Ty::U32, row0, r);
            tl.row_ok.push(b.setp(Cmp::Lt, Ty::U32, gr, limit as u32));
            let gr = b.min(Ty::U32, gr, (limit - 1) as u32);
            let rowp = b.index_addr(base, gr, (ld * 2) as u32);
            let cb = b.cvt(Ty::U64, Ty::U32, cbytes);
            tl.src.push(b.add(Ty::U64, rowp, cb));
        }
        tl
    }

    /// Issues the cp.async copies of k-tile `kt` into the stage at `ws`.
    fn emit_loads(&self, b: &mut KernelBuilder, loads: &[TileLoad], kcol: Reg, kt: Reg, ws: Reg) {
        let gk = b.mad(Ty::U32, kt, BK, kcol);
        let kval = b.setp(Cmp::Lt, Ty::U32, gk, self.s.k as u32);
        let toff = b.mul_wide_u32(kt, BK * 2);
        for tl in loads {
            for q in 0..tl.dst.len() {
                let v = b.and_pred(tl.row_ok[q], kval);
                let on = b.add(Ty::U64, tl.src[q], toff);
                let src = b.selp(Ty::U64, on, tl.fallback, v);
                let bytes = b.selp(Ty::U32, 16u32, 0u32, v);
                let dst = b.add(Ty::U32, ws, tl.dst[q]);
                b.cp_async16(Addr::reg(dst, 0), Addr::reg(src, 0), bytes);
            }
        }
    }

    fn build(&self) -> Kernel {
        let s = self.s;
        let t = self.t;
        let (mt, nt) = (t.mt() as usize, t.nt() as usize);
        let ab = if s.a == DType::BF16 { Ty::BF16 } else { Ty::F16 };
        let mut b = KernelBuilder::new(self.name.clone());
        b.max_threads(t.threads());
        let pa = b.ptr_param("a");
        let pw = b.ptr_param("w");
        let pw2 = self.silu.then(|| b.ptr_param("w2"));
        let pbias = s.epilogue.bias.then(|| b.ptr_param("bias"));
        let pres = s.epilogue.residual.then(|| b.ptr_param("residual"));
        let pout = b.ptr_param("out");
        let smem = b.shared("smem", self.stage_bytes * t.stages, 128);

        let tid = b.special(Sreg::TidX);
        let bx = b.special(Sreg::CtaidX);
        let by = b.special(Sreg::CtaidY);
        let block_n = b.mul(Ty::U32, bx, t.bn);
        let block_m = b.mul(Ty::U32, by, t.bm);
        let warp = b.shr(Ty::U32, tid, 5);
        let lane = b.and(Ty::B32, tid, 31);
        let warp_m = b.div(Ty::U32, warp, t.warps_n);
        let warp_n = b.rem(Ty::U32, warp, t.warps_n);
        let (wm, wn) = (t.bm / t.warps_m, t.bn / t.warps_n);

        b.comment("cp.async chunk assignment");
        let c = b.and(Ty::B32, tid, 3);
        let kcol = b.shl(Ty::B32, c, 3);
        let mut loads = vec![self.tile_load(&mut b, pa, s.lda, t.bm, block_m, s.m, smem, 0, tid)];
        loads.push(self.tile_load(&mut b, pw, s.k, t.bn, block_n, s.n, smem, t.bm * ROWB, tid));
        if let Some(pw2) = pw2 {
            loads.push(self.tile_load(&mut b, pw2, s.k, t.bn, block_n, s.n, smem, (t.bm + t.bn) * ROWB, tid));
        }

        b.comment("ldmatrix lane addresses");
        let (a_lane, b_lane) = ldmatrix_lanes(&mut b, lane, (warp_m, wm), (warp_n, wn), smem);

        let zero_acc = |b: &mut KernelBuilder| -> Vec<[Reg; 4]> {
            (0..mt * nt).map(|_| std::array::from_fn(|_| b.mov(Ty::F32, 0.0f32))).collect()
        };
        let acc = zero_acc(&mut b);
        let acc2 = if self.silu { zero_acc(&mut b) } else { vec![] };

        let ktiles = s.k.div_ceil(BK as usize) as u32;
        let stages = t.stages;
        let sb = self.stage_bytes;
        b.comment("pipeline prologue");
        for st in 0..stages - 1 {
            if st < ktiles {
                let kt = b.mov(Ty::U32, st);
                let ws = b.mov(Ty::U32, st * sb);
                self.emit_loads(&mut b, &loads, kcol, kt, ws);
            }
            b.cp_async_commit();
        }
        let rs = b.mov(Ty::U32, 0u32);
        let ws = b.mov(Ty::U32, (stages - 1) * sb);
        b.for_range(0u32, ktiles, 1, |b, kt| {
            b.cp_async_wait(stages - 2);
            b.bar_sync();
            // Refill the stage everyone finished reading in the previous iteration.
            let next = b.add(Ty::U32, kt, stages - 1);
            let more = b.setp(Cmp::Lt, Ty::U32, next, ktiles);
            b.if_then(more, false, |b| self.emit_loads(b, &loads, kcol, next, ws));
            b.cp_async_commit();

            for ks in 0..(BK / 16) as usize {
                let abase = b.add(Ty::U32, rs, a_lane[ks]);
                let bbase = b.add(Ty::U32, rs, b_lane[ks]);
                let af: Vec<Vec<Reg>> =
                    (0..mt).map(|i| b.ldmatrix(4, false, Addr::reg(abase, (i as u32 * 16 * ROWB) as i64))).collect();
                let mut sets: Vec<(u32, &Vec<[Reg; 4]>)> = vec![(t.bm * ROWB, &acc)];
                if self.silu {
                    sets.push(((t.bm + t.bn) * ROWB, &acc2));
                }
                for (off, accs) in sets {
                    let bf: Vec<Vec<Reg>> = (0..nt / 2)
                        .map(|jp| b.ldmatrix(4, false, Addr::reg(bbase, (off + jp as u32 * 16 * ROWB) as i64)))
                        .collect();
                    for i in 0..mt {
                        let a4 = [af[i][0], af[i][1], af[i][2], af[i][3]];
                        for j in 0..nt {
                            let bj = [bf[j / 2][(j % 2) * 2], bf[j / 2][(j % 2) * 2 + 1]];
                            let cij = &accs[i * nt + j];
                            b.mma_m16n8k16(ab, cij, &a4, &bj, cij);
                        }
                    }
                }
            }
            for r in [rs, ws] {
                b.bin_into("add", Ty::U32, r, r, sb);
                let wrap = b.setp(Cmp::Ge, Ty::U32, r, stages * sb);
                b.ins_if(wrap, false, "sub.u32", vec![r.into(), r.into(), (stages * sb).into()]);
            }
        });
        b.cp_async_wait(0);

        b.comment("epilogue");
        let g = b.shr(Ty::U32, lane, 2);
        let tig = b.and(Ty::B32, lane, 3);
        let row_base = b.mad(Ty::U32, warp_m, wm, g);
        let row_base = b.add(Ty::U32, row_base, block_m);
        let tig2 = b.shl(Ty::B32, tig, 1);
        let col_base = b.mad(Ty::U32, warp_n, wn, tig2);
        let col_base = b.add(Ty::U32, col_base, block_n);
        let ep = EpiGen { p: s.problem(), pbias, pres, pout, pair: s.n.is_multiple_of(2) && s.ldc.is_multiple_of(2) };
        for j in 0..nt {
            let col = b.add(Ty::U32, col_base, j as u32 * 8);
            let cols = ep.cols(&mut b, col, 2);
            for i in 0..mt {
                for h in 0..2 {
                    let row = b.add(Ty::U32, row_base, (i * 16 + h * 8) as u32);
                    let vals = &acc[i * nt + j][2 * h..2 * h + 2];
                    let gates = self.silu.then(|| &acc2[i * nt + j][2 * h..2 * h + 2]);
                    ep.store(&mut b, row, &cols, vals, gates);
                }
            }
        }
        b.ret();
        b.finish()
    }
}

/// Columns `col..col+width` of an output run: validity and bias values.
pub(crate) struct Cols {
    col: Reg,
    ok: Vec<Reg>,
    bias: Option<Vec<Reg>>,
}

/// The fused epilogue code shared by the GEMM and GEMV generators.
pub(crate) struct EpiGen {
    pub p: Problem,
    pub pbias: Option<Reg>,
    pub pres: Option<Reg>,
    pub pout: Reg,
    /// Whether a run of 2 columns starting at an even `col` may use one 8-byte
    /// (f32) or 4-byte (bf16) access: N and ldc even, so the pair is both in
    /// range or not, and aligned.
    pub pair: bool,
}

impl EpiGen {
    /// Validity of `col..col+width` (1 or 2) and the bias there (loaded from
    /// clamped columns so that the loads need no predicate).
    pub(crate) fn cols(&self, b: &mut KernelBuilder, col: Reg, width: u32) -> Cols {
        let n = self.p.n as u32;
        let cs: Vec<Reg> = (0..width).map(|e| if e == 0 { col } else { b.add(Ty::U32, col, e) }).collect();
        let ok = cs.iter().map(|&c| b.setp(Cmp::Lt, Ty::U32, c, n)).collect();
        let bias = self.pbias.map(|pb| {
            cs.iter()
                .map(|&c| {
                    let cc = b.min(Ty::U32, c, n - 1);
                    let p = b.index_addr(pb, cc, 4);
                    b.ld(Space::GlobalNc, Ty::F32, Addr::reg(p, 0))
                })
                .collect()
        });
        Cols { col, ok, bias }
    }

    /// Applies bias, activation (with `gates` for SiluMul) and residual to the
    /// run at `(row, cols)` and stores it, predicated on the bounds.
    pub(crate) fn store(&self, b: &mut KernelBuilder, row: Reg, cols: &Cols, vals: &[Reg], gates: Option<&[Reg]>) {
        let p = &self.p;
        let w = vals.len();
        assert_eq!(w, cols.ok.len());
        let vector = self.pair && w == 2;
        let row_ok = b.setp(Cmp::Lt, Ty::U32, row, p.m as u32);
        let ok: Vec<Reg> = cols.ok.iter().map(|&c| b.and_pred(row_ok, c)).collect();
        let mut v = vals.to_vec();
        for e in 0..w {
            if let Some(bias) = &cols.bias {
                v[e] = b.add(Ty::F32, v[e], bias[e]);
            }
            v[e] = match p.epi.act {
                Act::None => v[e],
                Act::Gelu => b.gelu(v[e]),
                Act::SiluMul => {
                    let g = b.silu(gates.expect("SiluMul needs gate values")[e]);
                    b.mul(Ty::F32, v[e], g)
                }
            };
        }
        let idx = b.mad(Ty::U32, row, p.ldc as u32, cols.col);
        if let Some(pr) = self.pres {
            let ptr = b.index_addr(pr, idx, 4);
            let r: Vec<Reg> = (0..w).map(|_| b.mov(Ty::F32, 0.0f32)).collect();
            if vector {
                b.ins_if(ok[0], false, "ld.global.v2.f32", vec![r.clone().into(), Addr::reg(ptr, 0).into()]);
            } else {
                for e in 0..w {
                    b.ins_if(ok[e], false, "ld.global.f32", vec![r[e].into(), Addr::reg(ptr, 4 * e as i64).into()]);
                }
            }
            for e in 0..w {
                v[e] = b.add(Ty::F32, v[e], r[e]);
            }
        }
        match p.out {
            DType::F32 => {
                let ptr = b.index_addr(self.pout, idx, 4);
                if vector {
                    b.ins_if(ok[0], false, "st.global.v2.f32", vec![Addr::reg(ptr, 0).into(), v.clone().into()]);
                } else {
                    for e in 0..w {
                        let a = Addr::reg(ptr, 4 * e as i64);
                        b.ins_if(ok[e], false, "st.global.f32", vec![a.into(), v[e].into()]);
                    }
                }
            }
            _ => {
                let ptr = b.index_addr(self.pout, idx, 2);
                if vector {
                    let packed = b.pack_half2(Ty::BF16x2, v[0], v[1]);
                    b.ins_if(ok[0], false, "st.global.b32", vec![Addr::reg(ptr, 0).into(), packed.into()]);
                } else {
                    for e in 0..w {
                        let h = b.cvt(Ty::BF16, Ty::F32, v[e]);
                        let a = Addr::reg(ptr, 2 * e as i64);
                        b.ins_if(ok[e], false, "st.global.b16", vec![a.into(), h.into()]);
                    }
                }
            }
        }
    }
}

/// The Qwen-VL-Chat GEMM shapes (activations bf16, weights bf16): the ViT at
/// 448 (1024 tokens) and 896 (4096 tokens), the adapter, and decoder prefill
/// at 300 tokens. The conv stem runs as im2col ([`super::patch`]) + GEMM with
/// K = 588 padded to 592 (the compiler zero-pads `conv1.weight` to `[1664, 592]`).
pub fn model_specs() -> Vec<GemmSpec> {
    use Act::*;
    let e = Epilogue::new;
    let (bf, f32_) = (DType::BF16, DType::F32);
    let mut v = vec![];
    let mut push = |m, n, k, out, epi| v.push(GemmSpec::new(m, n, k, bf, out, epi).expect("model GEMM spec"));
    for tokens in [1024, 4096] {
        let (w, mlp) = (1664, 8192);
        push(tokens, w, 592, f32_, Epilogue::NONE); // conv1 as GEMM
        push(tokens, 3 * w, w, bf, e(true, None, false)); // attn.in_proj
        push(tokens, w, w, f32_, e(true, None, true)); // attn.out_proj
        push(tokens, mlp, w, bf, e(true, Gelu, false)); // mlp.c_fc
        push(tokens, w, mlp, f32_, e(true, None, true)); // mlp.c_proj
        push(tokens, 4096, w, f32_, Epilogue::NONE); // attn_pool.kv_proj
        push(tokens, 4096, 4096, bf, e(true, None, false)); // attn_pool k/v in_proj
    }
    let d = 4096;
    push(256, d, d, bf, e(true, None, false)); // attn_pool q in_proj
    push(256, d, d, f32_, e(true, None, false)); // attn_pool out_proj
    push(256, d, d, f32_, Epilogue::NONE); // proj (x @ proj, repacked to [out, in])
    let (h, f, tokens) = (4096, 11008, 300);
    push(tokens, 3 * h, h, f32_, e(true, None, false)); // attn.c_attn
    push(tokens, h, h, f32_, e(false, None, true)); // attn.c_proj
    push(tokens, f, h, bf, e(false, SiluMul, false)); // mlp.w1 / w2
    push(tokens, h, f, f32_, e(false, None, true)); // mlp.c_proj
    v
}

/// Shared-memory addresses this lane hands `ldmatrix` for each k-step of a
/// `BK`-deep tile, A rows first (tile at `smem`, rows of `ROWB` bytes,
/// 16-byte chunks swizzled by `(lane >> 1) & 3`), then B rows; the warp's
/// fragment rows start at `warp_m · wm` and `warp_n · wn`. Shared by the
/// float GEMM and the int4 GEMM, whose shared tiles have this layout.
pub(crate) fn ldmatrix_lanes(
    b: &mut KernelBuilder,
    lane: Reg,
    (warp_m, wm): (Reg, u32),
    (warp_n, wn): (Reg, u32),
    smem: Reg,
) -> (Vec<Reg>, Vec<Reg>) {
    // Every fragment row this lane addresses is (a multiple of 8) + a
    // lane-dependent part whose bits 1..2 are (lane >> 1) & 3: that is the
    // swizzle term of all its rows. Logical chunk of k-step ks is
    // 2·ks + half, stored at (2·ks + half) ^ sw = (half ^ sw) ^ 2·ks: one
    // lane offset per k-step.
    let sw = b.shr(Ty::U32, lane, 1);
    let sw = b.and(Ty::B32, sw, 3);
    let lane_offsets = |b: &mut KernelBuilder, row: Reg, half: Reg| -> Vec<Reg> {
        let hs = b.xor(Ty::B32, half, sw);
        (0..BK / 16)
            .map(|ks| {
                let chunk = b.xor(Ty::B32, hs, 2 * ks);
                let cb = b.shl(Ty::B32, chunk, 4);
                let o = b.mad(Ty::U32, row, ROWB, cb);
                b.add(Ty::U32, o, smem)
            })
            .collect()
    };
    // A (x4): lane l gives row (l & 15) and k-half (l >> 4) of the 16×16 fragment.
    let l15 = b.and(Ty::B32, lane, 15);
    let arow = b.mad(Ty::U32, warp_m, wm, l15);
    let ahalf = b.shr(Ty::U32, lane, 4);
    let a_lane = lane_offsets(b, arow, ahalf);
    // B (x4 = two n8 tiles): matrix i = l >> 3 is (n-half i >> 1, k-half i & 1).
    let l7 = b.and(Ty::B32, lane, 7);
    let nhalf = b.shr(Ty::U32, lane, 4);
    let nhalf = b.shl(Ty::B32, nhalf, 3);
    let brow = b.add(Ty::U32, l7, nhalf);
    let brow = b.mad(Ty::U32, warp_n, wn, brow);
    let khalf = b.shr(Ty::U32, lane, 3);
    let khalf = b.and(Ty::B32, khalf, 1);
    let b_lane = lane_offsets(b, brow, khalf);
    (a_lane, b_lane)
}
