//! The decoder's fused QKV split + rotary + logn + KV-cache write.
//!
//! Input: the `c_attn` output `qkv [tokens, 3·heads·hd]` (f32 or bf16, bias
//! already added by the GEMM), each row contiguous `q | k | v` of width
//! `heads·hd` (not interleaved per head). Token `t` sits at the absolute
//! position `p = past + t` (`past` is a runtime `u32`, so one kernel serves a
//! prefill, `past = 0`, and every decode step).
//!
//! * q and k are rotated, rotate-half form on all `hd` dims (pairs `i` and
//!   `i + hd/2`): `lo' = lo·cos − hi·sin`, `hi' = hi·cos + lo·sin`, with
//!   `cos = cos[p][i]`, `sin = sin[p][i]` read from f32 tables `[max_seq, hd/2]`
//!   given as inputs. The tables are computed on the host
//!   ([`rope_tables`]) from the dynamic-NTK base that the prefill chose
//!   ([`ntk_base`]); decode steps keep that base, so the tables are built
//!   once per prompt.
//! * With `logn`, q is then multiplied by `logn[p]`, an f32 table `[max_seq]`
//!   input ([`logn_table`]: `ln(p+1)/ln(seq_length)` past `seq_length`, else
//!   1). A table rather than on-device `lg2` keeps the factor bit-identical
//!   to the host's and costs one 4-byte load per thread.
//! * Outputs, all bf16: `q` **head-major** `[heads, tokens, hd]` (element
//!   `(h·tokens + t)·hd + d`: token stride `hd`, head stride `tokens·hd`), and
//!   k and v into the caches `[heads, max_seq, hd]` at row `p` (element
//!   `(h·max_seq + p)·hd + d`). Cache rows other than `past..past+tokens` are
//!   never touched.
//!
//! Invariant: a position `p ≥ max_seq` is never read or written: the GPU
//! kernel skips such tokens (the host must reject `past + tokens > max_seq`,
//! which the CPU paths do with an error).
//!
//! GPU kernel: one thread per `pp` consecutive rotary pairs (`pp` = 4, 2 or 1,
//! the largest dividing `hd/2`, so every access is one aligned vector given
//! 16-byte aligned buffers) of one head of one token; grid `(ceil(heads·hd/2
//! / pp / block), tokens)`. No barriers and no collectives: out-of-range
//! threads branch to the end.
//!
//! CPU paths write f32 (the CPU backend's q and caches are f32); the GPU's
//! bf16 outputs are those values rounded to nearest even. The fast path does
//! not reuse [`crate::rotary`]: that one rotates a contiguous `[t, heads, d]`
//! buffer in place with full-width tables, while this one reads strided
//! slices of the qkv row and writes three differently laid-out outputs, so
//! reusing it would cost a copy of q and k and widened tables per call.

use std::fmt;

use qvc_codegen::{Addr, Cmp, Kernel, KernelBuilder, Sreg, Ty};
use qvc_ir::{DType, Elems};
use rayon::prelude::*;

use super::norm::{load_f32s, store_f32s, vec_width};
use crate::{Cost, KernelSpec, Launch};

/// One fused QKV-split + rotary kernel (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RotarySpec {
    pub tokens: usize,
    pub heads: usize,
    /// Even; 128 in Qwen-VL.
    pub head_dim: usize,
    /// dtype of the `qkv` input: [`DType::F32`] or [`DType::BF16`].
    pub qkv_in: DType,
    /// Multiply q by the logn factor of its position.
    pub logn: bool,
    /// Rows of the KV cache and of the cos/sin/logn tables.
    pub max_seq: usize,
}

/// A spec that cannot be built, or arguments that do not match a spec.
#[derive(Clone, Debug, PartialEq)]
pub enum RotaryError {
    /// The spec itself is unusable; the string says why.
    Spec(String),
    /// A buffer has the wrong number of elements.
    Len { what: &'static str, expected: usize, got: usize },
    /// `past + tokens` exceeds the cache.
    CacheFull { past: usize, tokens: usize, max_seq: usize },
}

impl fmt::Display for RotaryError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            RotaryError::Spec(s) => write!(f, "invalid rotary spec: {s}"),
            RotaryError::Len { what, expected, got } => {
                write!(f, "rotary: `{what}` has {got} elements, expected {expected}")
            }
            RotaryError::CacheFull { past, tokens, max_seq } => {
                write!(f, "rotary: past {past} + tokens {tokens} exceeds the KV cache of {max_seq} positions")
            }
        }
    }
}

impl std::error::Error for RotaryError {}

/// The inputs of one launch.
#[derive(Clone, Copy, Debug)]
pub struct RotaryArgs<'a> {
    /// `[tokens, 3·heads·hd]`, any float dtype on the CPU.
    pub qkv: Elems<'a>,
    /// `[max_seq, hd/2]` each.
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    /// `[max_seq]`, present iff the spec has `logn`.
    pub logn: Option<&'a [f32]>,
    /// Tokens already in the cache.
    pub past: usize,
}

/// The outputs of one launch (f32 on the CPU).
#[derive(Debug)]
pub struct RotaryOut<'a> {
    /// `[heads, tokens, hd]`.
    pub q: &'a mut [f32],
    /// `[heads, max_seq, hd]` each; only rows `past..past+tokens` are written.
    pub k_cache: &'a mut [f32],
    pub v_cache: &'a mut [f32],
}

/// Threads per block (at most).
const BLOCK: usize = 256;

impl RotarySpec {
    /// Checks that the spec can be built.
    pub fn validate(&self) -> Result<(), RotaryError> {
        let bad = |s: String| Err(RotaryError::Spec(s));
        if self.tokens == 0 || self.heads == 0 || self.head_dim == 0 || self.max_seq == 0 {
            return bad(format!("all sizes must be positive: {self:?}"));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim = {} must be even", self.head_dim));
        }
        if !matches!(self.qkv_in, DType::F32 | DType::BF16) {
            return bad(format!("qkv_in = {} must be f32 or bf16", self.qkv_in));
        }
        let big = [
            self.tokens * 3 * self.heads * self.head_dim,
            self.heads * self.max_seq * self.head_dim,
            self.max_seq * self.head_dim,
        ];
        if big.iter().any(|&n| n > u32::MAX as usize / 4) || self.tokens > 65535 {
            return bad(format!("sizes too large for 32-bit indexing / the grid: {self:?}"));
        }
        Ok(())
    }

    /// Rotary pairs per thread.
    fn pp(&self) -> usize {
        vec_width(self.head_dim / 2)
    }

    /// Threads per token and per block.
    fn threads(&self) -> (usize, usize) {
        let per_token = self.heads * self.head_dim / 2 / self.pp();
        (per_token, per_token.next_multiple_of(32).min(BLOCK))
    }

    fn check(&self, a: &RotaryArgs, o: &RotaryOut) -> Result<(), RotaryError> {
        self.validate()?;
        let (t, h, d, s) = (self.tokens, self.heads, self.head_dim, self.max_seq);
        let len =
            |what, expected, got| if expected == got { Ok(()) } else { Err(RotaryError::Len { what, expected, got }) };
        len("qkv", t * 3 * h * d, a.qkv.len())?;
        len("cos", s * d / 2, a.cos.len())?;
        len("sin", s * d / 2, a.sin.len())?;
        len("logn", if self.logn { s } else { 0 }, a.logn.map_or(0, |l| l.len()))?;
        if self.logn != a.logn.is_some() {
            return Err(RotaryError::Spec(format!("logn table given: {}, spec logn: {}", a.logn.is_some(), self.logn)));
        }
        len("q", h * t * d, o.q.len())?;
        len("k_cache", h * s * d, o.k_cache.len())?;
        len("v_cache", h * s * d, o.v_cache.len())?;
        if a.past + t > s {
            return Err(RotaryError::CacheFull { past: a.past, tokens: t, max_seq: s });
        }
        Ok(())
    }

    /// Fast CPU path: rayon over heads (each head owns its q rows and cache
    /// rows) when the launch is big enough to pay for the fork; f32 input is
    /// read in place, other dtypes are widened one head vector at a time.
    pub fn run_cpu(&self, a: &RotaryArgs, o: &mut RotaryOut) -> Result<(), RotaryError> {
        self.check(a, o)?;
        let (t_n, h_n, d, s) = (self.tokens, self.heads, self.head_dim, self.max_seq);
        let half = d / 2;
        let width = 3 * h_n * d;
        let per_head = |h: usize, qh: &mut [f32], kh: &mut [f32], vh: &mut [f32]| {
            let mut buf = vec![0.0f32; if matches!(a.qkv, Elems::F32(_)) { 0 } else { d }];
            for t in 0..t_n {
                let p = a.past + t;
                let (c, sn) = (&a.cos[p * half..][..half], &a.sin[p * half..][..half]);
                let row = t * width + h * d;
                let logn = a.logn.map_or(1.0, |l| l[p]);
                for (off, out, scale) in
                    [(row, &mut qh[t * d..][..d], logn), (row + h_n * d, &mut kh[p * d..][..d], 1.0)]
                {
                    let src: &[f32] = match a.qkv {
                        Elems::F32(v) => &v[off..off + d],
                        other => {
                            other.read_into(off, &mut buf);
                            &buf
                        }
                    };
                    let (lo, hi) = src.split_at(half);
                    let (out_lo, out_hi) = out.split_at_mut(half);
                    for (((((ol, oh), &x1), &x2), &ci), &si) in
                        out_lo.iter_mut().zip(out_hi.iter_mut()).zip(lo).zip(hi).zip(c).zip(sn)
                    {
                        *ol = (x1 * ci - x2 * si) * scale;
                        *oh = (x2 * ci + x1 * si) * scale;
                    }
                }
                a.qkv.read_into(row + 2 * h_n * d, &mut vh[p * d..][..d]);
            }
        };
        let (qs, ks, vs) = (o.q.chunks_mut(t_n * d), o.k_cache.chunks_mut(s * d), o.v_cache.chunks_mut(s * d));
        // Below ~64k elements the fork/join costs more than the work (decode).
        if 3 * t_n * h_n * d >= 1 << 16 {
            let heads: Vec<_> = qs.zip(ks).zip(vs).enumerate().collect();
            heads.into_par_iter().for_each(|(h, ((qh, kh), vh))| per_head(h, qh, kh, vh));
        } else {
            qs.zip(ks).zip(vs).enumerate().for_each(|(h, ((qh, kh), vh))| per_head(h, qh, kh, vh));
        }
        Ok(())
    }

    /// Naive reference in f64, written as the formula: `rotate_half(x)`,
    /// then `x·cos + rotate_half(x)·sin` with the half tables repeated.
    pub fn run_ref(&self, a: &RotaryArgs, o: &mut RotaryOut) -> Result<(), RotaryError> {
        self.check(a, o)?;
        let (t_n, h_n, d, s) = (self.tokens, self.heads, self.head_dim, self.max_seq);
        let half = d / 2;
        for t in 0..t_n {
            let p = a.past + t;
            for h in 0..h_n {
                let at = |sect: usize, j: usize| a.qkv.get(t * 3 * h_n * d + sect * h_n * d + h * d + j) as f64;
                for sect in 0..2 {
                    let x: Vec<f64> = (0..d).map(|j| at(sect, j)).collect();
                    let rot: Vec<f64> = (0..d).map(|j| if j < half { -x[j + half] } else { x[j - half] }).collect();
                    let scale = if sect == 0 { a.logn.map_or(1.0, |l| l[p] as f64) } else { 1.0 };
                    for j in 0..d {
                        let (c, sn) = (a.cos[p * half + j % half] as f64, a.sin[p * half + j % half] as f64);
                        let v = ((x[j] * c + rot[j] * sn) * scale) as f32;
                        match sect {
                            0 => o.q[(h * t_n + t) * d + j] = v,
                            _ => o.k_cache[(h * s + p) * d + j] = v,
                        }
                    }
                }
                for j in 0..d {
                    o.v_cache[(h * s + p) * d + j] = at(2, j) as f32;
                }
            }
        }
        Ok(())
    }

    /// The parameters in the order the kernel declares them.
    pub fn param_names(&self) -> Vec<&'static str> {
        let mut p = vec!["qkv", "cos", "sin"];
        if self.logn {
            p.push("logn");
        }
        p.extend(["q", "k_cache", "v_cache", "past"]);
        p
    }
}

impl KernelSpec for RotarySpec {
    fn name(&self) -> String {
        let logn = if self.logn { "_logn" } else { "" };
        format!(
            "rotary_qkv_t{}_h{}_d{}_{}_s{}{logn}",
            self.tokens, self.heads, self.head_dim, self.qkv_in, self.max_seq
        )
    }

    fn build(&self) -> Kernel {
        if let Err(e) = self.validate() {
            panic!("{e}");
        }
        let (h_n, d, s) = (self.heads, self.head_dim, self.max_seq);
        let (half, pp) = (d / 2, self.pp());
        let (per_token, block) = self.threads();
        let in_size = self.qkv_in.size() as u32;
        let mut b = KernelBuilder::new(self.name());
        b.max_threads(block as u32);

        let qkv = b.ptr_param("qkv");
        let cos = b.ptr_param("cos");
        let sin = b.ptr_param("sin");
        let logn = self.logn.then(|| b.ptr_param("logn"));
        let q_out = b.ptr_param("q");
        let k_cache = b.ptr_param("k_cache");
        let v_cache = b.ptr_param("v_cache");
        let past = b.param("past", Ty::U32);

        let tid = b.special(Sreg::TidX);
        let cx = b.special(Sreg::CtaidX);
        let t = b.special(Sreg::CtaidY);
        let g = b.mad(Ty::U32, cx, block as u32, tid);
        let p = b.add(Ty::U32, past, t);
        let end = b.label("end");
        // Threads past the last pair, and positions past the cache, do nothing.
        let idle = b.setp(Cmp::Ge, Ty::U32, g, per_token as u32);
        b.bra_if(idle, false, &end);
        let full = b.setp(Cmp::Ge, Ty::U32, p, s as u32);
        b.bra_if(full, false, &end);

        let groups = (half / pp) as u32;
        let h = b.div(Ty::U32, g, groups);
        let gi = b.rem(Ty::U32, g, groups);
        let i = b.mul(Ty::U32, gi, pp as u32);
        // Element offsets: of this pair group in the qkv row, in the tables, in the outputs.
        let row = b.mul(Ty::U32, t, (3 * h_n * d) as u32);
        let hd_off = b.mad(Ty::U32, h, d as u32, i);
        let src = b.add(Ty::U32, row, hd_off);
        let tab = b.mad(Ty::U32, p, half as u32, i);
        let ht = b.mad(Ty::U32, h, self.tokens as u32, t);
        let q_el = b.mad(Ty::U32, ht, d as u32, i);
        let hp = b.mad(Ty::U32, h, s as u32, p);
        let kv_el = b.mad(Ty::U32, hp, d as u32, i);

        let ca = b.index_addr(cos, tab, 4);
        let c = load_f32s(&mut b, None, "global.nc", DType::F32, pp, Addr::reg(ca, 0));
        let sa = b.index_addr(sin, tab, 4);
        let sn = load_f32s(&mut b, None, "global.nc", DType::F32, pp, Addr::reg(sa, 0));
        let scale = logn.map(|l| {
            let la = b.index_addr(l, p, 4);
            b.ld(qvc_codegen::Space::GlobalNc, Ty::F32, Addr::reg(la, 0))
        });

        let src_a = b.index_addr(qkv, src, in_size);
        let hi_off = (half as u32 * in_size) as i64;
        for (sect, out, out_el) in [(0, q_out, q_el), (1, k_cache, kv_el)] {
            let base = (sect * h_n * d) as i64 * in_size as i64;
            let lo = load_f32s(&mut b, None, "global.nc", self.qkv_in, pp, Addr::reg(src_a, base));
            let hi = load_f32s(&mut b, None, "global.nc", self.qkv_in, pp, Addr::reg(src_a, base + hi_off));
            let (mut lo2, mut hi2) = (vec![], vec![]);
            for j in 0..pp {
                let a = b.mul(Ty::F32, hi[j], sn[j]);
                let na = b.neg(Ty::F32, a);
                let mut l = b.mad(Ty::F32, lo[j], c[j], na);
                let bb = b.mul(Ty::F32, lo[j], sn[j]);
                let mut r = b.mad(Ty::F32, hi[j], c[j], bb);
                if let (0, Some(sc)) = (sect, scale) {
                    l = b.mul(Ty::F32, l, sc);
                    r = b.mul(Ty::F32, r, sc);
                }
                lo2.push(l);
                hi2.push(r);
            }
            let oa = b.index_addr(out, out_el, 2);
            store_f32s(&mut b, None, DType::BF16, &lo2, Addr::reg(oa, 0));
            store_f32s(&mut b, None, DType::BF16, &hi2, Addr::reg(oa, half as i64 * 2));
        }
        // v: a copy into the cache (exact for bf16 input, rounded for f32).
        let va = b.index_addr(v_cache, kv_el, 2);
        let v_base = (2 * h_n * d) as i64 * in_size as i64;
        for off in [0, half as i64] {
            let v =
                load_f32s(&mut b, None, "global.nc", self.qkv_in, pp, Addr::reg(src_a, v_base + off * in_size as i64));
            store_f32s(&mut b, None, DType::BF16, &v, Addr::reg(va, off * 2));
        }
        b.place(&end);
        b.ret();
        b.finish()
    }

    fn launch(&self) -> Launch {
        let (per_token, block) = self.threads();
        Launch::new([per_token.div_ceil(block) as u32, self.tokens as u32, 1], [block as u32, 1, 1])
    }

    fn cost(&self) -> Cost {
        let n = (self.tokens * self.heads * self.head_dim) as u64;
        let t = self.tokens as u64;
        let in_size = self.qkv_in.size() as u64;
        // Rotary: a multiply and a multiply-add per element of q and k; logn one more per q element.
        let flops = 2 * n * 3 + if self.logn { n } else { 0 };
        let tables = t * (self.head_dim as u64 / 2) * 4 * 2 + if self.logn { t * 4 } else { 0 };
        Cost { flops, bytes: 3 * n * in_size + tables + 3 * n * 2 }
    }
}

/// The dynamic-NTK rotary base for a prompt of `prompt_len` tokens (Qwen's
/// `use_dynamic_ntk`): `alpha = max(2^ceil(log2(n / seq_length) + 1) − 1, 1)`,
/// `base · alpha^(hd / (hd − 2))`. Decode steps keep the prefill's base.
pub fn ntk_base(base: f64, head_dim: usize, prompt_len: usize, seq_length: usize) -> f64 {
    let ctx = (prompt_len as f64 / seq_length as f64).log2() + 1.0;
    let alpha = (2f64.powf(ctx.ceil()) - 1.0).max(1.0);
    base * alpha.powf(head_dim as f64 / (head_dim as f64 - 2.0))
}

/// cos and sin tables `[max_pos, hd/2]` for rotary base `base`, computed as
/// the reference does in f32: `inv_freq[i] = 1 / base^(2i/hd)`, angle
/// `p · inv_freq[i]` rounded to f32, then its cos and sin.
pub fn rope_tables(head_dim: usize, max_pos: usize, base: f64) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half).map(|i| 1.0 / (base.powf((2 * i) as f64 / head_dim as f64) as f32)).collect();
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    for p in 0..max_pos {
        for &f in &inv {
            let a = (p as f32 * f) as f64;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

/// The logn table `[max_pos]`: `ln(p + 1) / ln(seq_length)` where
/// `p + 1 > seq_length`, else 1 (Qwen's `use_logn_attn`).
pub fn logn_table(max_pos: usize, seq_length: usize) -> Vec<f32> {
    (0..max_pos)
        .map(|p| if p + 1 > seq_length { ((p + 1) as f64).ln() / (seq_length as f64).ln() } else { 1.0 } as f32)
        .collect()
}

/// The Qwen-VL-Chat decoder's shapes: 32 heads of 128, logn on, a cache of
/// 8192 positions (the 6144-token window plus generation), for decode (1
/// token), a small batch of 8 and a 300-token prefill, with the GEMM writing
/// `qkv` as f32 or bf16.
pub fn model_specs() -> Vec<RotarySpec> {
    let mut v = vec![];
    for tokens in [1, 8, 300] {
        for qkv_in in [DType::F32, DType::BF16] {
            v.push(RotarySpec { tokens, heads: 32, head_dim: 128, qkv_in, logn: true, max_seq: 8192 });
        }
    }
    v
}
