//! `qvc selftest`: every GPU kernel family on the chosen device (the PTX
//! emulator or a CUDA GPU) against its CPU reference, on random shapes with
//! ragged edges, one line per family: max relative error and pass/fail.
//!
//! Invariants: kernels go through the same [`Device`] interface the executor
//! uses (load PTX, upload, launch in the spec's param order, download);
//! outputs are filled with NaN bytes before each launch, so an element a
//! kernel fails to write shows up as an infinite error; the data is
//! deterministic in the seed. The error is the relative L2 norm
//! ‖got − want‖ / ‖want‖ per case (argmax: the fraction of rows whose index
//! differs), and a family's figure is the worst case.

use anyhow::{anyhow, Result};
use half::bf16;
use qvc_ir::{BinaryOp, DType, Elems};
use qvc_kernels::gpu::attention::{FlashMask, FlashSpec, OutDtype, Strides};
use qvc_kernels::gpu::decode_attention::DecodeAttnSpec;
use qvc_kernels::gpu::embed::EmbedSpec;
use qvc_kernels::gpu::gemm::{Act, Epilogue, GemmSpec, LinearArgs, OutMut};
use qvc_kernels::gpu::gemv::GemvSpec;
use qvc_kernels::gpu::generic::{EltOp, EltwiseSpec};
use qvc_kernels::gpu::norm::{NormKind, NormSpec};
use qvc_kernels::gpu::rotary::{RotaryArgs, RotaryOut, RotarySpec};
use qvc_kernels::gpu::sample::ArgmaxSpec;
use qvc_kernels::gpu::softmax::SoftmaxSpec;
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

/// xorshift64*: deterministic data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-scale, scale).
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| ((self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale).collect()
    }
    fn bf16s(&mut self, n: usize, scale: f32) -> Vec<bf16> {
        self.vec(n, scale).into_iter().map(bf16::from_f32).collect()
    }
    /// In `lo..hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo) as u64) as usize
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
        let mut v = vec![0i32; n];
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
    let q = rng.bf16s(batch * heads * hd, 2.0);
    let k = rng.bf16s(batch * heads * max_seq * hd, 2.0);
    let v = rng.bf16s(batch * heads * max_seq * hd, 1.0);
    let n = batch * heads * hd;
    let mut want = vec![0f32; n];
    spec.reference(&q, &k, &v, &lens, &mut want);
    let mut d = Bufs::new(dev);
    let (qp, kp, vp) = (d.bf16(&q)?, d.bf16(&k)?, d.bf16(&v)?);
    let lp = d.bytes(bytemuck::cast_slice(&lens))?;
    let ws = d.out(spec.workspace_bytes())?;
    let out = d.out(n * 4)?;
    d.launch(&spec.partial(), &[KArg::Ptr(qp), KArg::Ptr(kp), KArg::Ptr(vp), KArg::Ptr(lp), KArg::Ptr(ws)])?;
    d.launch(&spec.combine(), &[KArg::Ptr(ws), KArg::Ptr(out)])?;
    Ok(rel_l2(&d.get_f32(out, n)?, &want))
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

type Case = fn(&mut dyn Device, &mut Rng, Size) -> Result<f64>;

/// Every family with its tolerance (f32 outputs against f64 references;
/// rotary writes bf16, so its tolerance is bf16 rounding).
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
