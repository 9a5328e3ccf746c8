//! `qvc selftest`: every GPU kernel family on the chosen device (the PTX
//! emulator or a CUDA GPU) against its CPU reference, on random shapes with
//! ragged edges, one line per family: max error and pass/fail. The families
//! are every spec the runtime's lowering launches: the specialised ones
//! (gemm, gemv, norm, attention, rotary, embed, softmax, patch, sampling) and
//! each kernel of `qvc_kernels::gpu::generic`.
//!
//! Invariants: kernels go through the same [`Device`] interface the executor
//! uses (load PTX, upload, launch in the spec's param order, download);
//! outputs are filled with NaN bytes (0xFF) before each launch, so an element
//! a kernel fails to write shows up as an infinite error or a mismatch; the
//! data is deterministic in the seed. The error of a case is, for kernels
//! with rounding, the relative L2 norm ‖got − want‖ / ‖want‖; for kernels
//! that are exact by contract (copies, gather, scatter, patch, KV append,
//! the generic rope, embed), the fraction of elements whose bits differ;
//! for sampling, the fraction of rows whose token id differs (top-p: differs
//! from every id the f64 definition gives within its stated rounding
//! margin). A family's figure is its worst case.

use anyhow::{anyhow, bail, Result};
use bytemuck::Pod;
use half::bf16;
use qvc_ir::{BinaryOp, DType, Elems, ReduceOp};
use qvc_kernels::gpu::attention::{FlashMask, FlashSpec, OutDtype, Strides};
use qvc_kernels::gpu::decode_attention::DecodeAttnSpec;
use qvc_kernels::gpu::embed::EmbedSpec;
use qvc_kernels::gpu::gemm::{Act, Epilogue, GemmSpec, LinearArgs, OutMut};
use qvc_kernels::gpu::gemv::GemvSpec;
use qvc_kernels::gpu::generic::{
    CopySpec, EltOp, EltwiseSpec, GatherSpec, KvAppendSpec, MatMulSpec, ReduceSpec, RopeSpec, ScatterRowsSpec, MAX_RANK,
};
use qvc_kernels::gpu::norm::{NormKind, NormSpec};
use qvc_kernels::gpu::patch::PatchSpec;
use qvc_kernels::gpu::rotary::{RotaryArgs, RotaryOut, RotarySpec};
use qvc_kernels::gpu::sample::{ArgmaxSpec, TopPParams, TopPSpec};
use qvc_kernels::gpu::softmax::SoftmaxSpec;
use qvc_kernels::testutil::Rng;
use qvc_kernels::KernelSpec;
use qvc_runtime::gpu::{DevPtr, Device, KArg};

/// One family's result.
#[derive(Clone, Debug)]
pub struct FamilyResult {
    pub family: &'static str,
    pub cases: usize,
    /// Worst relative error over the cases (infinite when a launch failed).
    pub max_err: f64,
    pub tol: f64,
    /// The first failure, if any.
    pub error: Option<String>,
}

impl FamilyResult {
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.max_err <= self.tol
    }
}

/// What the cases draw beyond [`Rng`]'s uniform floats.
trait Draw {
    fn bf16s(&mut self, n: usize, scale: f32) -> Vec<bf16>;
    /// In `lo..hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize;
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32;
    fn coin(&mut self) -> bool;
    fn shuffle<T>(&mut self, v: &mut [T]);
}

impl Draw for Rng {
    fn bf16s(&mut self, n: usize, scale: f32) -> Vec<bf16> {
        self.vec(n, scale).into_iter().map(bf16::from_f32).collect()
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo) as u64) as usize
    }
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn coin(&mut self) -> bool {
        self.range(0, 2) == 1
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.range(0, i + 1));
        }
    }
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() || !w.is_finite() {
            return f64::INFINITY;
        }
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    if num == 0.0 {
        0.0
    } else {
        (num / den.max(1e-300)).sqrt()
    }
}

/// The fraction of elements that differ (exact kernels compare bit
/// patterns: `u16`/`u32` views of bf16/f32, raw bytes of a copy).
fn mismatch<T: PartialEq>(got: &[T], want: &[T]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let bad = got.iter().zip(want).filter(|(g, w)| g != w).count();
    if bad == 0 {
        0.0
    } else {
        bad as f64 / got.len() as f64
    }
}

/// [`mismatch`] over elements of `size` bytes.
fn mismatch_bytes(got: &[u8], want: &[u8], size: usize) -> f64 {
    let (g, w): (Vec<&[u8]>, Vec<&[u8]>) = (got.chunks(size).collect(), want.chunks(size).collect());
    mismatch(&g, &w)
}

fn bits_f32(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn bits_bf16(v: &[bf16]) -> Vec<u16> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Device buffers of one case, freed together.
struct Bufs<'d> {
    dev: &'d mut dyn Device,
    ptrs: Vec<DevPtr>,
}

impl<'d> Bufs<'d> {
    fn new(dev: &'d mut dyn Device) -> Self {
        Bufs { dev, ptrs: vec![] }
    }
    fn bytes(&mut self, b: &[u8]) -> Result<DevPtr> {
        let p = self.dev.alloc(b.len().max(4), "a selftest buffer")?;
        self.ptrs.push(p);
        self.dev.upload(p, b)?;
        Ok(p)
    }
    fn f32(&mut self, v: &[f32]) -> Result<DevPtr> {
        self.bytes(bytemuck::cast_slice(v))
    }
    fn bf16(&mut self, v: &[bf16]) -> Result<DevPtr> {
        self.bytes(bytemuck::cast_slice(v))
    }
    fn i32(&mut self, v: &[i32]) -> Result<DevPtr> {
        self.bytes(bytemuck::cast_slice(v))
    }
    /// `bytes` of NaN (0xFF) poison.
    fn out(&mut self, bytes: usize) -> Result<DevPtr> {
        self.bytes(&vec![0xFF; bytes])
    }
    fn launch(&mut self, spec: &dyn KernelSpec, args: &[KArg]) -> Result<()> {
        let name = spec.name();
        if !self.dev.has_kernel(&name) {
            let ptx = qvc_codegen::Module::new(self.dev.target(), vec![spec.build()]).print();
            self.dev.load_module(&ptx, None)?;
        }
        let l = spec.launch();
        self.dev.launch(&name, l.grid, l.block, args)?;
        Ok(())
    }
    fn get_f32(&mut self, p: DevPtr, n: usize) -> Result<Vec<f32>> {
        let mut v = vec![0f32; n];
        self.dev.download(p, bytemuck::cast_slice_mut(&mut v))?;
        Ok(v)
    }
    fn get_bf16(&mut self, p: DevPtr, n: usize) -> Result<Vec<f32>> {
        let mut v = vec![bf16::ZERO; n];
        self.dev.download(p, bytemuck::cast_slice_mut(&mut v))?;
        Ok(v.iter().map(|x| x.to_f32()).collect())
    }
    fn get_i32(&mut self, p: DevPtr, n: usize) -> Result<Vec<i32>> {
        self.get(p, n)
    }
    /// `n` elements of any plain type (bit patterns for exact compares).
    fn get<T: Pod>(&mut self, p: DevPtr, n: usize) -> Result<Vec<T>> {
        let mut v = vec![T::zeroed(); n];
        self.dev.download(p, bytemuck::cast_slice_mut(&mut v))?;
        Ok(v)
    }
}

impl Drop for Bufs<'_> {
    fn drop(&mut self) {
        for p in self.ptrs.drain(..) {
            self.dev.free(p);
        }
    }
}

fn spec_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{e}")
}

/// How big the random shapes get: `small` keeps the emulator quick.
#[derive(Clone, Copy)]
struct Size {
    small: bool,
}

impl Size {
    fn pick(self, rng: &mut Rng, small: (usize, usize), big: (usize, usize)) -> usize {
        let (lo, hi) = if self.small { small } else { big };
        rng.range(lo, hi)
    }
}

fn gemm_case(dev: &mut dyn Device, rng: &mut Rng, sz: Size, gemv: bool) -> Result<f64> {
    let m = if gemv { rng.range(1, 9) } else { sz.pick(rng, (1, 70), (1, 700)) };
    let n = sz.pick(rng, (1, 70), (1, 1500));
    let k = 8 * sz.pick(rng, (1, 12), (1, 200));
    let act = [Act::None, Act::Gelu, Act::SiluMul][rng.range(0, 3)];
    let bias = act != Act::SiluMul && rng.range(0, 2) == 1;
    let residual = rng.range(0, 2) == 1;
    let epi = Epilogue::new(bias, act, residual);
    let a = rng.bf16s(m * k, 1.0);
    let w = rng.bf16s(n * k, 0.2);
    let w2 = rng.bf16s(n * k, 0.2);
    let b = rng.vec(n, 0.5);
    let r = rng.vec(m * n, 1.0);
    let args = LinearArgs {
        a: Elems::BF16(&a),
        w: Elems::BF16(&w),
        w2: (act == Act::SiluMul).then_some(Elems::BF16(&w2)),
        bias: bias.then_some(&b[..]),
        residual: residual.then_some(&r[..]),
    };
    let mut want = vec![0f32; m * n];
    let spec: Box<dyn KernelSpec> = if gemv {
        let s = GemvSpec::new(m, n, k, DType::BF16, DType::F32, epi).map_err(spec_err)?;
        s.reference(&args, OutMut::F32(&mut want)).map_err(spec_err)?;
        Box::new(s)
    } else {
        let s = GemmSpec::new(m, n, k, DType::BF16, DType::F32, epi).map_err(spec_err)?;
        s.reference(&args, OutMut::F32(&mut want)).map_err(spec_err)?;
        Box::new(s)
    };
    let mut d = Bufs::new(dev);
    let mut ka = vec![KArg::Ptr(d.bf16(&a)?), KArg::Ptr(d.bf16(&w)?)];
    if act == Act::SiluMul {
        ka.push(KArg::Ptr(d.bf16(&w2)?));
    }
    if bias {
        ka.push(KArg::Ptr(d.f32(&b)?));
    }
    if residual {
        ka.push(KArg::Ptr(d.f32(&r)?));
    }
    let out = d.out(m * n * 4)?;
    ka.push(KArg::Ptr(out));
    d.launch(spec.as_ref(), &ka)?;
    Ok(rel_l2(&d.get_f32(out, m * n)?, &want))
}

fn norm_case(dev: &mut dyn Device, rng: &mut Rng, sz: Size) -> Result<f64> {
    let kind =
        [NormKind::RmsNorm, NormKind::LayerNorm { bias: true }, NormKind::LayerNorm { bias: false }][rng.range(0, 3)];
    let spec = NormSpec {
        kind,
        rows: sz.pick(rng, (1, 9), (1, 300)),
        cols: sz.pick(rng, (1, 300), (1, 5000)),
        eps: 1e-6,
        residual: rng.range(0, 2) == 1,
        out: DType::F32,
    };
    spec.validate().map_err(spec_err)?;
    let n = spec.rows * spec.cols;
    let x0: Vec<f32> = rng.vec(n, 2.0).into_iter().map(|v| v + 0.5).collect();
    let r = rng.vec(n, 1.0);
    let w = rng.bf16s(spec.cols, 1.5);
    let b = rng.bf16s(spec.cols, 0.5);
    let has_bias = matches!(kind, NormKind::LayerNorm { bias: true });
    let (mut x_ref, mut want) = (x0.clone(), vec![0f32; n]);
    spec.run_ref(
        &mut x_ref,
        spec.residual.then_some(&r[..]),
        Elems::BF16(&w),
        has_bias.then_some(Elems::BF16(&b)),
        &mut want,
    )
    .map_err(spec_err)?;
    let mut d = Bufs::new(dev);
    let xp = d.f32(&x0)?;
    let mut ka = vec![KArg::Ptr(xp)];
    if spec.residual {
        ka.push(KArg::Ptr(d.f32(&r)?));
    }
    ka.push(KArg::Ptr(d.bf16(&w)?));
    if has_bias {
        ka.push(KArg::Ptr(d.bf16(&b)?));
    }
    let y = d.out(n * 4)?;
    ka.push(KArg::Ptr(y));
    d.launch(&spec, &ka)?;
    let e = rel_l2(&d.get_f32(y, n)?, &want);
    Ok(e.max(rel_l2(&d.get_f32(xp, n)?, &x_ref)))
}

fn flash_case(dev: &mut dyn Device, rng: &mut Rng, sz: Size) -> Result<f64> {
    let heads = rng.range(1, 4) as u32;
    let hd = [32u32, 64, 128][rng.range(0, 3)];
    let w = heads * hd;
    let (tq, tk, mask) = match rng.range(0, 3) {
        0 => {
            let t = sz.pick(rng, (1, 40), (1, 600)) as u32;
            (t, sz.pick(rng, (1, 40), (1, 600)) as u32, FlashMask::None)
        }
        1 => {
            let t = sz.pick(rng, (1, 40), (1, 600)) as u32;
            let off = sz.pick(rng, (0, 20), (0, 300)) as u32;
            (t, t + off, FlashMask::Causal { q_offset: off })
        }
        _ => {
            let (gh, gw) = (sz.pick(rng, (1, 7), (1, 40)) as u32, sz.pick(rng, (1, 7), (1, 40)) as u32);
            (gh * gw, gh * gw, FlashMask::Window { grid: (gh, gw), window: rng.range(2, 9) as u32 })
        }
    };
    let s = Strides { token: w, head: hd };
    let spec = FlashSpec {
        tq,
        tk,
        heads,
        head_dim: hd,
        q: s,
        k: s,
        v: s,
        out: OutDtype::F32,
        scale: 1.0 / (hd as f32).sqrt(),
        mask,
    };
    spec.validate().map_err(spec_err)?;
    let q = rng.bf16s((tq * w) as usize, 2.0);
    let k = rng.bf16s((tk * w) as usize, 2.0);
    let v = rng.bf16s((tk * w) as usize, 2.0);
    let n = (tq * w) as usize;
    let mut want = vec![0f32; n];
    spec.reference(Elems::BF16(&q), Elems::BF16(&k), Elems::BF16(&v), &mut want).map_err(spec_err)?;
    let mut d = Bufs::new(dev);
    let ka = [KArg::Ptr(d.bf16(&q)?), KArg::Ptr(d.bf16(&k)?), KArg::Ptr(d.bf16(&v)?)];
    let out = d.out(n * 4)?;
    d.launch(&spec, &[ka[0], ka[1], ka[2], KArg::Ptr(out)])?;
    Ok(rel_l2(&d.get_f32(out, n)?, &want))
}

fn decode_case(dev: &mut dyn Device, rng: &mut Rng, sz: Size) -> Result<f64> {
    let batch = rng.range(1, 5);
    let heads = rng.range(1, 5);
    let hd = [64usize, 128][rng.range(0, 2)];
    let max_seq = sz.pick(rng, (2, 100), (2, 3000));
    let splits = rng.range(1, 5).min(max_seq);
    let spec = DecodeAttnSpec::new(batch, heads, hd, max_seq, splits, 1.0 / (hd as f32).sqrt(), DType::F32)
        .map_err(spec_err)?;
    let lens: Vec<u32> = (0..batch).map(|_| rng.range(1, max_seq + 1) as u32).collect();
    // The sequences sit in distinct cache slots, in any order.
    let cached = batch + rng.range(0, 3);
    let slots = distinct_slots(rng, batch, cached);
    let q = rng.bf16s(batch * heads * hd, 2.0);
    let k = rng.bf16s(cached * heads * max_seq * hd, 2.0);
    let v = rng.bf16s(cached * heads * max_seq * hd, 1.0);
    let n = batch * heads * hd;
    let mut want = vec![0f32; n];
    spec.reference(&q, &k, &v, &lens, &slots, &mut want);
    let mut d = Bufs::new(dev);
    let (qp, kp, vp) = (d.bf16(&q)?, d.bf16(&k)?, d.bf16(&v)?);
    let lp = d.bytes(bytemuck::cast_slice(&lens))?;
    let sp = d.bytes(bytemuck::cast_slice(&slots))?;
    let ws = d.out(spec.workspace_bytes())?;
    let out = d.out(n * 4)?;
    let args = [KArg::Ptr(qp), KArg::Ptr(kp), KArg::Ptr(vp), KArg::Ptr(lp), KArg::Ptr(sp), KArg::Ptr(ws)];
    d.launch(&spec.partial(), &args)?;
    d.launch(&spec.combine(), &[KArg::Ptr(ws), KArg::Ptr(out)])?;
    Ok(rel_l2(&d.get_f32(out, n)?, &want))
}

/// `n` distinct slots out of `0..cached`, in random order.
fn distinct_slots(rng: &mut Rng, n: usize, cached: usize) -> Vec<u32> {
    let mut all: Vec<u32> = (0..cached as u32).collect();
    for i in (1..all.len()).rev() {
        all.swap(i, rng.range(0, i + 1));
    }
    all.truncate(n);
    all
}

fn rotary_case(dev: &mut dyn Device, rng: &mut Rng, sz: Size) -> Result<f64> {
    let max_seq = sz.pick(rng, (2, 40), (2, 2048));
    let spec = RotarySpec {
        tokens: rng.range(1, max_seq.min(if sz.small { 9 } else { 300 }) + 1),
        heads: rng.range(1, 5),
        head_dim: 2 * sz.pick(rng, (1, 65), (1, 65)),
        qkv_in: DType::F32,
        logn: rng.range(0, 2) == 1,
        max_seq,
    };
    spec.validate().map_err(spec_err)?;
    let (t, h, dd, s) = (spec.tokens, spec.heads, spec.head_dim, spec.max_seq);
    let past = rng.range(0, s - t + 1);
    let qkv = rng.vec(t * 3 * h * dd, 2.0);
    let ang = rng.vec(s * dd / 2, 3.0);
    let cos: Vec<f32> = ang.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = ang.iter().map(|a| a.sin()).collect();
    let logn: Vec<f32> = rng.vec(s, 0.5).into_iter().map(|v| 1.5 + v).collect();
    let cache0: Vec<f32> = rng.bf16s(h * s * dd, 1.0).iter().map(|x| x.to_f32()).collect();
    let args = RotaryArgs { qkv: Elems::F32(&qkv), cos: &cos, sin: &sin, logn: spec.logn.then_some(&logn[..]), past };
    let (mut q_ref, mut k_ref, mut v_ref) = (vec![0f32; h * t * dd], cache0.clone(), cache0.clone());
    spec.run_ref(&args, &mut RotaryOut { q: &mut q_ref, k_cache: &mut k_ref, v_cache: &mut v_ref })
        .map_err(spec_err)?;
    let c0: Vec<bf16> = cache0.iter().map(|&x| bf16::from_f32(x)).collect();
    let mut d = Bufs::new(dev);
    let mut ka = vec![KArg::Ptr(d.f32(&qkv)?), KArg::Ptr(d.f32(&cos)?), KArg::Ptr(d.f32(&sin)?)];
    if spec.logn {
        ka.push(KArg::Ptr(d.f32(&logn)?));
    }
    let (qo, ko, vo) = (d.out(h * t * dd * 2)?, d.bf16(&c0)?, d.bf16(&c0)?);
    ka.extend([KArg::Ptr(qo), KArg::Ptr(ko), KArg::Ptr(vo), KArg::U32(past as u32)]);
    d.launch(&spec, &ka)?;
    let e = rel_l2(&d.get_bf16(qo, h * t * dd)?, &q_ref);
    let ek = rel_l2(&d.get_bf16(ko, h * s * dd)?, &k_ref);
    let ev = rel_l2(&d.get_bf16(vo, h * s * dd)?, &v_ref);
    Ok(e.max(ek).max(ev))
}

fn embed_case(dev: &mut dyn Device, rng: &mut Rng, sz: Size) -> Result<f64> {
    let spec = EmbedSpec {
        tokens: sz.pick(rng, (1, 40), (1, 600)),
        hidden: sz.pick(rng, (1, 200), (1, 4200)),
        vocab: sz.pick(rng, (1, 100), (1, 5000)),
        features: DType::F32,
        feature_rows: rng.range(0, 20),
    };
    spec.validate().map_err(spec_err)?;
    let ids: Vec<i32> = (0..spec.tokens).map(|_| rng.range(0, spec.vocab) as i32).collect();
    let src: Vec<i32> = (0..spec.tokens)
        .map(
            |_| if spec.feature_rows > 0 && rng.range(0, 2) == 0 { rng.range(0, spec.feature_rows) as i32 } else { -1 },
        )
        .collect();
    let table = rng.bf16s(spec.vocab * spec.hidden, 1.0);
    let feat = rng.vec((spec.feature_rows * spec.hidden).max(1), 1.0);
    let fe = &feat[..spec.feature_rows * spec.hidden];
    let n = spec.tokens * spec.hidden;
    let mut want = vec![0f32; n];
    spec.run_ref(&ids, &src, Elems::BF16(&table), Elems::F32(fe), &mut want).map_err(spec_err)?;
    let mut d = Bufs::new(dev);
    let ka = [KArg::Ptr(d.i32(&ids)?), KArg::Ptr(d.i32(&src)?), KArg::Ptr(d.bf16(&table)?), KArg::Ptr(d.f32(&feat)?)];
    let x = d.out(n * 4)?;
    d.launch(&spec, &[ka[0], ka[1], ka[2], ka[3], KArg::Ptr(x)])?;
    Ok(rel_l2(&d.get_f32(x, n)?, &want))
}

fn softmax_case(dev: &mut dyn Device, rng: &mut Rng, sz: Size) -> Result<f64> {
    let (rows, cols) = (sz.pick(rng, (1, 9), (1, 64)), sz.pick(rng, (1, 3000), (1, 160_000)));
    let spec = SoftmaxSpec::new(rows, cols).map_err(spec_err)?;
    let x = rng.vec(rows * cols, 8.0);
    let mut want = vec![0f32; rows * cols];
    spec.reference(&x, &mut want);
    let mut d = Bufs::new(dev);
    let xp = d.f32(&x)?;
    let y = d.out(rows * cols * 4)?;
    d.launch(&spec, &[KArg::Ptr(xp), KArg::Ptr(y)])?;
    Ok(rel_l2(&d.get_f32(y, rows * cols)?, &want))
}

fn sample_case(dev: &mut dyn Device, rng: &mut Rng, sz: Size) -> Result<f64> {
    let (rows, cols) = (sz.pick(rng, (1, 9), (1, 16)), sz.pick(rng, (1, 3000), (1, 160_000)));
    let spec = ArgmaxSpec::new(rows, cols).map_err(spec_err)?;
    let x = rng.vec(rows * cols, 8.0);
    let mut want = vec![0i32; rows];
    spec.reference(&x, &mut want);
    let mut d = Bufs::new(dev);
    let xp = d.f32(&x)?;
    let o = d.out(rows * 4)?;
    d.launch(&spec, &[KArg::Ptr(xp), KArg::Ptr(o)])?;
    let got = d.get_i32(o, rows)?;
    Ok(got.iter().zip(&want).filter(|(a, b)| a != b).count() as f64 / rows as f64)
}

fn generic_case(dev: &mut dyn Device, rng: &mut Rng, sz: Size) -> Result<f64> {
    // A broadcast add over a permuted view, and a GELU: strides do all the work.
    let (a, b) = (sz.pick(rng, (1, 40), (1, 700)), sz.pick(rng, (1, 40), (1, 700)));
    let (spec, inputs) = if rng.range(0, 2) == 0 {
        let s =
            EltwiseSpec { shape: vec![a, b], op: EltOp::Binary(BinaryOp::Add), strides: vec![vec![1, a], vec![0, 1]] };
        (s, vec![rng.vec(a * b, 3.0), rng.vec(b, 3.0)])
    } else {
        let s = EltwiseSpec { shape: vec![a, b], op: EltOp::Gelu, strides: vec![vec![b, 1]] };
        (s, vec![rng.vec(a * b, 3.0)])
    };
    spec.validate().map_err(spec_err)?;
    let n = spec.numel();
    let refs: Vec<&[f32]> = inputs.iter().map(|v| &v[..]).collect();
    let mut want = vec![0f32; n];
    spec.run_ref(&refs, &mut want).map_err(spec_err)?;
    let mut d = Bufs::new(dev);
    let mut ka = vec![];
    for v in &inputs {
        ka.push(KArg::Ptr(d.f32(v)?));
    }
    let out = d.out(n * 4)?;
    ka.push(KArg::Ptr(out));
    d.launch(&spec, &ka)?;
    Ok(rel_l2(&d.get_f32(out, n)?, &want))
}

fn patch_case(dev: &mut dyn Device, rng: &mut Rng, sz: Size) -> Result<f64> {
    // Odd and even patch sizes and row strides (the kernel's pair path needs
    // both even, and an even width for its vector load); images with pixels
    // past the last whole patch, which the convolution ignores.
    let (channels, p) =
        if sz.small { (rng.range(1, 4), rng.range(1, 7)) } else { (3, [14, rng.range(1, 17)][rng.range(0, 2)]) };
    let h = p * sz.pick(rng, (1, 5), (1, 65)) + rng.range(0, p);
    let w = p * sz.pick(rng, (1, 5), (1, 65)) + rng.range(0, p);
    let dense = PatchSpec::new(channels, (h, w), p).map_err(spec_err)?;
    // Qwen-VL pads its 588 columns to 592: padding must come back as zeros.
    let spec = dense.with_ld(dense.cols() + rng.range(0, 6)).map_err(spec_err)?;
    let pixels = rng.vec(channels * h * w, 2.0);
    let n = spec.patches() * spec.ld;
    let mut want = vec![bf16::ZERO; n];
    spec.reference(&pixels, &mut want).map_err(spec_err)?;
    let mut d = Bufs::new(dev);
    let xp = d.f32(&pixels)?;
    let out = d.out(n * 2)?;
    d.launch(&spec, &[KArg::Ptr(xp), KArg::Ptr(out)])?;
    Ok(mismatch(&d.get::<u16>(out, n)?, &bits_bf16(&want)))
}

/// Relative margin on `u` and `top_p` within which f32 rounding (weights,
/// sums) may move a top-p choice (as `kernels/tests/gpu_decode.rs`).
const TOP_P_EPS: f64 = 1e-4;

/// Whether `id` is what the f64 definition picks for `row` with `u` and
/// `top_p` moved by at most [`TOP_P_EPS`] (the pick is monotone in `u`, so
/// every kept id between the picks at `u − ε` and `u + ε` qualifies).
fn top_p_accepts(spec: &TopPSpec, row: &[f32], p: &TopPParams, u: f32, id: usize) -> bool {
    [1.0 - TOP_P_EPS, 1.0, 1.0 + TOP_P_EPS].iter().any(|f| {
        let pp = TopPParams { top_p: (p.top_p as f64 * f).min(1.0) as f32, ..*p };
        let kept = spec.reference_kept(row, &pp);
        let lo = spec.reference_pick(row, &kept, &pp, (u as f64 - TOP_P_EPS).max(0.0) as f32);
        let hi = spec.reference_pick(row, &kept, &pp, (u as f64 + TOP_P_EPS).min(0.999_999_9) as f32);
        (lo..=hi).contains(&id) && kept.binary_search(&id).is_ok()
    })
}

fn top_p_case(dev: &mut dyn Device, rng: &mut Rng, sz: Size) -> Result<f64> {
    let (rows, cols) = (sz.pick(rng, (1, 5), (1, 9)), sz.pick(rng, (1, 1500), (1, 160_000)));
    // The runtime's spec (its block size for `cols`).
    let spec = TopPSpec::new(rows, cols).map_err(spec_err)?;
    let p = TopPParams {
        temperature: [0.3, 0.8, 1.0, 1.7][rng.range(0, 4)],
        top_p: [0.05, 0.4, 0.9, 0.97, 1.0][rng.range(0, 5)],
        top_k: [0, 1, 3, 40, cols as u32 + 7][rng.range(0, 5)],
    };
    p.validate().map_err(spec_err)?;
    let scale = [1.0f32, 4.0, 10.0][rng.range(0, 3)];
    let mut x = rng.vec(rows * cols, scale);
    for row in x.chunks_mut(cols) {
        // Exact duplicates (ties at the threshold go to the lowest index),
        // masked tokens, a NaN (weight 0) and a -0.0 (equal to +0.0); column
        // 0 stays finite so that some token has weight.
        for _ in 0..rng.range(0, 6) {
            let v = row[rng.range(0, cols)];
            row[rng.range(0, cols)] = v;
        }
        if cols > 3 {
            for _ in 0..rng.range(0, 4) {
                row[rng.range(1, cols)] = f32::NEG_INFINITY;
            }
            row[rng.range(1, cols)] = f32::NAN;
            row[rng.range(1, cols)] = -0.0;
        }
    }
    // The ends of [0, 1) too: the first kept token, and the last (where
    // rounding may leave the walk without a crossing: the fallback).
    let u: Vec<f32> = (0..rows)
        .map(|_| match rng.range(0, 6) {
            0 => 0.0,
            1 => 1.0 - f32::EPSILON / 2.0,
            _ => rng.unit(),
        })
        .collect();
    let mut want = vec![0i32; rows];
    spec.reference(&x, &u, &p, &mut want);
    let mut d = Bufs::new(dev);
    let (xp, up) = (d.f32(&x)?, d.f32(&u)?);
    let o = d.out(rows * 4)?;
    let args =
        [KArg::Ptr(xp), KArg::Ptr(up), KArg::Ptr(o), KArg::F32(p.temperature), KArg::F32(p.top_p), KArg::U32(p.top_k)];
    d.launch(&spec, &args)?;
    let got = d.get_i32(o, rows)?;
    // Ids compare exactly; only a differing id pays for the margin check.
    let bad = (0..rows)
        .filter(|&r| {
            let id = got[r];
            let in_margin = || {
                (0..cols as i32).contains(&id) && top_p_accepts(&spec, &x[r * cols..][..cols], &p, u[r], id as usize)
            };
            id != want[r] && !in_margin()
        })
        .count();
    Ok(bad as f64 / rows as f64)
}

/// Strides of a buffer holding `shape` in a random storage order with random
/// padding between dimensions; with `bcast`, about one dimension in four
/// gets stride 0 (a broadcast source).
fn random_strides(rng: &mut Rng, shape: &[usize], bcast: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..shape.len()).collect();
    rng.shuffle(&mut order);
    let mut strides = vec![0; shape.len()];
    let mut cur = 1;
    for d in order {
        if bcast && rng.range(0, 4) == 0 {
            continue;
        }
        strides[d] = cur;
        cur = cur * shape[d] + if rng.range(0, 3) == 0 { rng.range(0, 3) } else { 0 };
    }
    strides
}

/// A shape of `rank` dimensions with at most about `elems` elements.
fn random_shape(rng: &mut Rng, rank: usize, elems: usize) -> Vec<usize> {
    let cap = (elems as f64).powf(1.0 / rank as f64) as usize;
    (0..rank).map(|_| rng.range(1, cap.max(1) + 1)).collect()
}

fn copy_case(dev: &mut dyn Device, rng: &mut Rng, sz: Size) -> Result<f64> {
    let pairs = [
        (DType::F32, DType::F32),
        (DType::F32, DType::BF16),
        (DType::BF16, DType::F32),
        (DType::BF16, DType::BF16),
        (DType::I32, DType::I32),
    ];
    let (src, dst) = pairs[rng.range(0, pairs.len())];
    let rank = rng.range(1, MAX_RANK + 1);
    let shape = random_shape(rng, rank, if sz.small { 1 << 10 } else { 1 << 22 });
    let src_strides = random_strides(rng, &shape, true);
    let dst_strides = random_strides(rng, &shape, false);
    let spec = CopySpec { shape, src_strides, dst_strides, src, dst };
    spec.validate().map_err(spec_err)?;
    let (ss, ds) = (src.size(), dst.size());
    // Offset pointers, as the runtime passes for slices and concat pieces.
    let (src_off, dst_off) = (rng.range(0, 4), rng.range(0, 4));
    // Any bits when the copy moves bits (NaN payloads must survive); finite
    // values when it converts (a converted NaN may change its payload).
    let convert = src != dst;
    let mut bytes = Vec::with_capacity((src_off + spec.src_len()) * ss);
    for _ in 0..src_off + spec.src_len() {
        let mut b = rng.next_u64() as u32;
        if convert && (b >> 23) & 0xff == 0xff {
            b &= !(1 << 30);
        }
        if ss == 2 {
            bytes.extend_from_slice(&((b >> 16) as u16).to_le_bytes());
        } else {
            bytes.extend_from_slice(&b.to_le_bytes());
        }
    }
    // Destination bytes no index maps to (padding) must keep the poison.
    let n_dst = (dst_off + spec.dst_len()) * ds;
    let mut want = vec![0xFFu8; n_dst];
    spec.run_ref(&bytes[src_off * ss..], &mut want[dst_off * ds..]).map_err(spec_err)?;
    let mut d = Bufs::new(dev);
    let sp = d.bytes(&bytes)?;
    let dp = d.out(n_dst)?;
    d.launch(&spec, &[KArg::Ptr(sp + (src_off * ss) as u64), KArg::Ptr(dp + (dst_off * ds) as u64)])?;
    Ok(mismatch_bytes(&d.get::<u8>(dp, n_dst)?, &want, ds))
}

/// Ids outside `0..n`: the kernels must skip them (or write NaN).
fn bad_id(rng: &mut Rng, n: usize) -> i32 {
    [-1, n as i32, n as i32 + 7, i32::MIN, i32::MAX][rng.range(0, 5)]
}

fn gather_case(dev: &mut dyn Device, rng: &mut Rng, sz: Size) -> Result<f64> {
    let spec = GatherSpec {
        rows: sz.pick(rng, (1, 12), (1, 600)),
        cols: sz.pick(rng, (1, 100), (1, 4200)),
        vocab: sz.pick(rng, (1, 50), (1, 5000)),
        table: [DType::F32, DType::BF16][rng.range(0, 2)],
    };
    spec.validate().map_err(spec_err)?;
    // About one id in six is bad: its row must come back NaN (the reference's
    // NaN bits, not the poison's).
    let ids: Vec<i32> = (0..spec.rows)
        .map(|_| if rng.range(0, 6) == 0 { bad_id(rng, spec.vocab) } else { rng.range(0, spec.vocab) as i32 })
        .collect();
    let tab_f = rng.vec(spec.vocab * spec.cols, 3.0);
    let tab_b: Vec<bf16> = tab_f.iter().map(|&x| bf16::from_f32(x)).collect();
    let n = spec.rows * spec.cols;
    let mut want = vec![0f32; n];
    let mut d = Bufs::new(dev);
    let tp = if spec.table == DType::F32 {
        spec.run_ref(Elems::F32(&tab_f), &ids, &mut want).map_err(spec_err)?;
        d.f32(&tab_f)?
    } else {
        spec.run_ref(Elems::BF16(&tab_b), &ids, &mut want).map_err(spec_err)?;
        d.bf16(&tab_b)?
    };
    let ip = d.i32(&ids)?;
    let out = d.out(n * 4)?;
    d.launch(&spec, &[KArg::Ptr(tp), KArg::Ptr(ip), KArg::Ptr(out)])?;
    Ok(mismatch(&d.get::<u32>(out, n)?, &bits_f32(&want)))
}

fn scatter_case(dev: &mut dyn Device, rng: &mut Rng, sz: Size) -> Result<f64> {
    let spec = ScatterRowsSpec {
        rows: sz.pick(rng, (1, 10), (1, 600)),
        cols: sz.pick(rng, (1, 64), (1, 4200)),
        dst_rows: sz.pick(rng, (1, 14), (1, 700)),
    };
    spec.validate().map_err(spec_err)?;
    // Distinct targets (which duplicate wins is unspecified), some bad ones,
    // which must leave the destination alone.
    let mut perm: Vec<usize> = (0..spec.dst_rows).collect();
    rng.shuffle(&mut perm);
    let idx: Vec<i32> = (0..spec.rows)
        .map(|i| if i >= spec.dst_rows || rng.range(0, 5) == 0 { bad_id(rng, spec.dst_rows) } else { perm[i] as i32 })
        .collect();
    let src = rng.vec(spec.rows * spec.cols, 2.0);
    let out0 = rng.vec(spec.dst_rows * spec.cols, 5.0);
    let mut want = out0.clone();
    spec.run_ref(&src, &idx, &mut want).map_err(spec_err)?;
    let mut d = Bufs::new(dev);
    let (sp, ip, op) = (d.f32(&src)?, d.i32(&idx)?, d.f32(&out0)?);
    d.launch(&spec, &[KArg::Ptr(sp), KArg::Ptr(ip), KArg::Ptr(op)])?;
    Ok(mismatch(&d.get::<u32>(op, out0.len())?, &bits_f32(&want)))
}

fn matmul_case(dev: &mut dyn Device, rng: &mut Rng, sz: Size) -> Result<f64> {
    let spec = MatMulSpec::contiguous(
        sz.pick(rng, (1, 4), (1, 17)),
        sz.pick(rng, (1, 8), (1, 300)),
        sz.pick(rng, (1, 9), (1, 300)),
        sz.pick(rng, (1, 48), (1, 257)),
        rng.coin(),
        rng.coin(),
        [DType::F32, DType::BF16][rng.range(0, 2)],
    );
    spec.validate().map_err(spec_err)?;
    // Positive-leaning data: the f32 sums (k ascending) against the f64
    // reference then differ by rounding only, never by cancellation.
    let a: Vec<f32> = rng.vec(spec.a_len(), 1.0).into_iter().map(|v| v + 0.5).collect();
    let bf: Vec<f32> = rng.vec(spec.b_len(), 1.0).into_iter().map(|v| v + 0.5).collect();
    let bb: Vec<bf16> = bf.iter().map(|&x| bf16::from_f32(x)).collect();
    let n = spec.batch * spec.m * spec.n;
    let mut want = vec![0f32; n];
    let mut d = Bufs::new(dev);
    let ap = d.f32(&a)?;
    let bp = if spec.b == DType::F32 {
        spec.run_ref(&a, Elems::F32(&bf), &mut want).map_err(spec_err)?;
        d.f32(&bf)?
    } else {
        spec.run_ref(&a, Elems::BF16(&bb), &mut want).map_err(spec_err)?;
        d.bf16(&bb)?
    };
    let out = d.out(n * 4)?;
    d.launch(&spec, &[KArg::Ptr(ap), KArg::Ptr(bp), KArg::Ptr(out)])?;
    Ok(rel_l2(&d.get_f32(out, n)?, &want))
}

fn reduce_case(dev: &mut dyn Device, rng: &mut Rng, sz: Size) -> Result<f64> {
    let op = [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Mean][rng.range(0, 3)];
    // Over the last dimension (inner 1, the norms' statistics) or a middle one.
    let spec = if rng.coin() {
        ReduceSpec { outer: sz.pick(rng, (1, 9), (1, 300)), len: sz.pick(rng, (1, 300), (1, 4200)), inner: 1, op }
    } else {
        ReduceSpec {
            outer: sz.pick(rng, (1, 5), (1, 300)),
            len: sz.pick(rng, (1, 40), (1, 200)),
            inner: sz.pick(rng, (1, 9), (1, 200)),
            op,
        }
    };
    spec.validate().map_err(spec_err)?;
    // Positive-leaning (no cancellation in the sums); Max also sees NaNs,
    // which it ignores.
    let mut x: Vec<f32> = rng.vec(spec.outer * spec.len * spec.inner, 2.0).into_iter().map(|v| v + 1.0).collect();
    if op == ReduceOp::Max {
        for v in x.iter_mut() {
            if rng.range(0, 10) == 0 {
                *v = f32::NAN;
            }
        }
    }
    let n = spec.outer * spec.inner;
    let mut want = vec![0f32; n];
    spec.run_ref(&x, &mut want).map_err(spec_err)?;
    let mut d = Bufs::new(dev);
    let xp = d.f32(&x)?;
    let out = d.out(n * 4)?;
    d.launch(&spec, &[KArg::Ptr(xp), KArg::Ptr(out)])?;
    let got = d.get_f32(out, n)?;
    if op == ReduceOp::Max {
        // Max is exact: any differing bit fails the family outright.
        if let Some(i) = (0..n).find(|&i| got[i].to_bits() != want[i].to_bits()) {
            bail!("max: out[{i}] = {:e}, want {:e} (max is exact)", got[i], want[i]);
        }
        return Ok(0.0);
    }
    Ok(rel_l2(&got, &want))
}

fn rope_case(dev: &mut dyn Device, rng: &mut Rng, sz: Size) -> Result<f64> {
    // The q or k columns of a fused QKV row: padded heads, a row wider than
    // the heads, and a pointer offset into it.
    let (heads, d) = (sz.pick(rng, (1, 5), (1, 33)), 2 * sz.pick(rng, (1, 13), (1, 65)));
    let head_stride = d + rng.range(0, 3);
    let row_extra = if sz.small { rng.range(0, 21) } else { 2 * heads * head_stride };
    let spec = RopeSpec {
        tokens: sz.pick(rng, (1, 7), (1, 700)),
        heads,
        head_dim: d,
        token_stride: heads * head_stride + row_extra,
        head_stride,
        logn: rng.coin(),
        bf16_out: rng.coin(),
    };
    spec.validate().map_err(spec_err)?;
    let t = spec.tokens;
    let x_off = rng.range(0, 10);
    let x = rng.vec(x_off + spec.x_len(), 2.0);
    let ang = rng.vec(t * d, 3.0);
    let cos: Vec<f32> = ang.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = ang.iter().map(|a| a.sin()).collect();
    let logn: Vec<f32> = rng.vec(t, 0.5).into_iter().map(|v| 1.2 + v).collect();
    let n = t * heads * d;
    let mut want = vec![0f32; n];
    spec.run_ref(&x[x_off..], &cos, &sin, spec.logn.then_some(&logn[..]), &mut want).map_err(spec_err)?;
    let mut d = Bufs::new(dev);
    let xp = d.f32(&x)?;
    let mut ka = vec![KArg::Ptr(xp + 4 * x_off as u64), KArg::Ptr(d.f32(&cos)?), KArg::Ptr(d.f32(&sin)?)];
    if spec.logn {
        ka.push(KArg::Ptr(d.f32(&logn)?));
    }
    let out = d.out(n * 4)?;
    ka.push(KArg::Ptr(out));
    d.launch(&spec, &ka)?;
    // The same f32 products and sum as the reference: bit-identical (and
    // rounded to nearest even when written as bf16).
    if spec.bf16_out {
        let want: Vec<bf16> = want.iter().map(|&v| bf16::from_f32(v)).collect();
        return Ok(mismatch(&d.get::<u16>(out, n)?, &bits_bf16(&want)));
    }
    Ok(mismatch(&d.get::<u32>(out, n)?, &bits_f32(&want)))
}

fn kv_append_case(dev: &mut dyn Device, rng: &mut Rng, sz: Size) -> Result<f64> {
    let (heads, head_dim, max_seq) =
        (sz.pick(rng, (1, 6), (1, 33)), sz.pick(rng, (1, 41), (1, 129)), sz.pick(rng, (1, 10), (1, 1025)));
    let spec = KvAppendSpec {
        batch: sz.pick(rng, (1, 5), (1, 9)),
        heads,
        head_dim,
        max_seq,
        cache_stride: heads * max_seq * head_dim + rng.range(0, 18),
    };
    spec.validate().map_err(spec_err)?;
    // Lengths 0 and past max_seq write nothing; the rest write row len − 1.
    let lens: Vec<u32> = (0..spec.batch)
        .map(|_| match rng.range(0, 4) {
            0 => 0,
            1 => (max_seq + rng.range(1, 4)) as u32,
            _ => rng.range(1, max_seq + 1) as u32,
        })
        .collect();
    let m = spec.batch * heads * head_dim;
    let (k, v) = (rng.vec(m, 3.0), rng.vec(m, 2.0));
    // Distinct slots in any order, among more slots than sequences.
    let cached = spec.batch + rng.range(0, 3);
    let slots = distinct_slots(rng, spec.batch, cached);
    let n = cached * spec.cache_stride;
    let (kc0, vc0) = (rng.bf16s(n, 1.0), rng.bf16s(n, 1.0));
    let (mut kw, mut vw) = (kc0.clone(), vc0.clone());
    spec.run_ref(&k, &v, &lens, &slots, &mut kw, &mut vw).map_err(spec_err)?;
    let mut d = Bufs::new(dev);
    let (kp, vp, lp) = (d.f32(&k)?, d.f32(&v)?, d.bytes(bytemuck::cast_slice(&lens))?);
    let sp = d.bytes(bytemuck::cast_slice(&slots))?;
    let (kcp, vcp) = (d.bf16(&kc0)?, d.bf16(&vc0)?);
    let args = [KArg::Ptr(kp), KArg::Ptr(vp), KArg::Ptr(lp), KArg::Ptr(sp), KArg::Ptr(kcp), KArg::Ptr(vcp)];
    d.launch(&spec, &args)?;
    // Every cache element, bit for bit: nothing but the new rows may change.
    let mut got = d.get::<u16>(kcp, n)?;
    got.extend(d.get::<u16>(vcp, n)?);
    let mut want = bits_bf16(&kw);
    want.extend(bits_bf16(&vw));
    Ok(mismatch(&got, &want))
}

type Case = fn(&mut dyn Device, &mut Rng, Size) -> Result<f64>;

/// Every family with its tolerance (f32 outputs against f64 references;
/// rotary writes bf16, so its tolerance is bf16 rounding; 0 for the kernels
/// that are exact by contract).
fn families() -> Vec<(&'static str, f64, Case)> {
    vec![
        ("gemm", 1e-3, |d, r, s| gemm_case(d, r, s, false)),
        ("gemv", 1e-3, |d, r, s| gemm_case(d, r, s, true)),
        ("norm", 1e-4, norm_case),
        ("flash attention", 2e-3, flash_case),
        ("decode attention", 2e-3, decode_case),
        ("rotary", 8e-3, rotary_case),
        ("embed", 0.0, embed_case),
        ("softmax", 1e-4, softmax_case),
        ("sample (argmax)", 0.0, sample_case),
        ("generic (eltwise)", 1e-4, generic_case),
        // Appended, so that the families above keep their seeds (data).
        ("patch", 0.0, patch_case),
        ("sample (top-p)", 0.0, top_p_case),
        ("generic (copy)", 0.0, copy_case),
        ("generic (gather)", 0.0, gather_case),
        ("generic (scatter)", 0.0, scatter_case),
        ("generic (matmul)", 1e-5, matmul_case),
        ("generic (reduce)", 1e-5, reduce_case),
        ("generic (rope)", 0.0, rope_case),
        ("generic (kv append)", 0.0, kv_append_case),
    ]
}

/// Runs `cases` random cases of every family on `dev`.
pub fn run(dev: &mut dyn Device, cases: usize, small: bool, seed: u64) -> Vec<FamilyResult> {
    let sz = Size { small };
    families()
        .into_iter()
        .enumerate()
        .map(|(i, (family, tol, case))| {
            let mut rng = Rng::new(seed ^ (i as u64 + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93));
            let mut res = FamilyResult { family, cases: 0, max_err: 0.0, tol, error: None };
            for c in 0..cases {
                match case(dev, &mut rng, sz).and_then(|e| dev.synchronize().map(|_| e).map_err(Into::into)) {
                    Ok(e) => {
                        res.max_err = res.max_err.max(e);
                        res.cases += 1;
                    }
                    Err(e) => {
                        res.max_err = f64::INFINITY;
                        res.error = Some(format!("case {c}: {e:#}"));
                        break;
                    }
                }
            }
            res
        })
        .collect()
}

/// One line per family, then a summary line; returns whether all passed.
pub fn print(device: &str, results: &[FamilyResult]) -> bool {
    println!("selftest on {device}");
    for r in results {
        println!(
            "{:<20} {:>3} cases  max rel err {:>10.3e}  (tol {:.0e})  {}{}",
            r.family,
            r.cases,
            r.max_err,
            r.tol,
            if r.passed() { "PASS" } else { "FAIL" },
            r.error.as_ref().map_or(String::new(), |e| format!(": {e}"))
        );
    }
    let failed = results.iter().filter(|r| !r.passed()).count();
    println!("selftest: {} families, {failed} failed", results.len());
    failed == 0
}
