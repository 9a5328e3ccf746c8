//! Decode attention (flash-decoding): one query per sequence and head against
//! that sequence's KV cache, `out[b, h] = Σ_j softmax_j(scale · q[b,h]·k[b,h,j]) · v[b,h,j]`
//! over the keys `j < lens[b]`.
//!
//! Layout: `q` bf16 `[batch, heads, hd]`; the caches `k`, `v` bf16
//! `[slots, heads, max_seq, hd]` (every slot of the device cache); `lens` and
//! `slots` u32 `[batch]` on the device: sequence `b` has `lens[b]` keys in
//! cache slot `slots[b]`, so a decode step runs over any set of slots in any
//! order, and a CUDA-graph-captured step never changes kernel params when the
//! lengths or the slots do. Output bf16 or f32 `[batch, heads, hd]`. A length
//! above `max_seq` is clamped to `max_seq` (the cache holds no more keys); a
//! length of 0 gives a zero output. The slots must lie inside the caches (the
//! caller checks them; the kernel cannot).
//!
//! Two kernels:
//! * **partial** (grid `splits × heads × batch`, 128 threads): split `s` of a
//!   sequence of length `len` takes keys `[s·c, min((s+1)·c, len))` with
//!   `c = ⌈len / splits⌉` (computed on the device, so the work stays balanced
//!   as the cache grows). Keys go in tiles of 128, one key per thread: the
//!   score is a dot product of 128-bit K loads with q (pre-scaled by
//!   `scale·log2 e` in shared memory), then an online softmax in base 2 (running
//!   max `m`, per-thread sums rescaled by the block-uniform `2^(m_old − m_new)`)
//!   and `acc += p·V` with `hd/8` threads per V row (128-bit loads) and
//!   `128 / (hd/8)` rows in flight. It writes `(m, l, acc[hd])` to the
//!   workspace, f32 `[batch, heads, splits, hd + 2]`; `m` is in log2 units. An
//!   empty split (possible when `len < splits`) writes `m = −inf, l = 0,
//!   acc = 0`.
//! * **combine** (grid `heads × batch`, one thread per dimension):
//!   `M = max_s m_s`, `w_s = 2^(m_s − M)` (0 for empty splits),
//!   `out = Σ w_s acc_s / Σ w_s l_s` (0 when every split is empty).
//!
//! Invariants: `hd` is a multiple of 8 (one 128-bit load is 8 bf16) and at most
//! 1024; every `bar.sync` is reached by all threads (the tile loop's trip count
//! is block-uniform); no global address outside the arrays is formed for a load.

use half::bf16;
use qvc_codegen::{Addr, Cmp, Kernel, KernelBuilder, Reg, Space, Sreg, Ty};
use qvc_ir::DType;
use rayon::prelude::*;

use super::softmax::BlockReduce;
use crate::common::bf16_bits_to_f32;
use crate::spec::{Cost, KernelSpec, Launch};

pub use super::InvalidSpec;

/// Threads per block of the partial kernel, which is also the key tile.
const THREADS: u32 = 128;
const LOG2E: f32 = std::f32::consts::LOG2_E;

/// Decode attention over a bf16 KV cache (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeAttnSpec {
    /// Sequences (1..=8 in the runtime).
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Keys the cache holds per sequence and head.
    pub max_seq: usize,
    /// Blocks per (sequence, head) that split the keys.
    pub splits: usize,
    pub scale: f32,
    /// Output dtype: F32 or BF16.
    pub out: DType,
}

impl DecodeAttnSpec {
    /// A validated spec.
    pub fn new(
        batch: usize,
        heads: usize,
        head_dim: usize,
        max_seq: usize,
        splits: usize,
        scale: f32,
        out: DType,
    ) -> Result<DecodeAttnSpec, InvalidSpec> {
        let s = DecodeAttnSpec { batch, heads, head_dim, max_seq, splits, scale, out };
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<(), InvalidSpec> {
        let bad = |reason: String| Err(InvalidSpec { spec: "DecodeAttnSpec", reason });
        if self.batch == 0 || self.heads == 0 || self.max_seq == 0 || self.splits == 0 {
            return bad(format!("empty shape {self:?}"));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(8) || self.head_dim > 1024 {
            return bad(format!("head_dim {} must be a positive multiple of 8, at most 1024", self.head_dim));
        }
        if self.splits > 256 {
            return bad(format!("{} splits (at most 256)", self.splits));
        }
        if !self.scale.is_finite() {
            return bad(format!("scale {}", self.scale));
        }
        if !matches!(self.out, DType::F32 | DType::BF16) {
            return bad(format!("output dtype {:?} (F32 or BF16)", self.out));
        }
        // Byte offsets of the caches are 64-bit (`(slot·heads + head)` in u32
        // times the bytes of one head's rows, which must fit u32), but per-row
        // offsets and workspace indices are formed in u32.
        let head_bytes = self.max_seq as u64 * self.head_dim as u64 * 2;
        if head_bytes >= 1 << 32 || (self.batch * self.heads * self.splits * (self.head_dim + 2)) as u64 >= 1 << 30 {
            return bad(format!("{self:?} is too large"));
        }
        Ok(())
    }

    /// Splits so that `batch × heads × splits` covers `2 × sms` blocks (rounded
    /// up to a power of two, capped so that a split keeps at least one tile of
    /// 128 keys of a full cache).
    pub fn splits_for(batch: usize, heads: usize, max_seq: usize, sms: usize) -> usize {
        let want = (2 * sms).div_ceil(batch * heads).next_power_of_two();
        want.min(max_seq.div_ceil(THREADS as usize).max(1))
    }

    /// Qwen-VL-Chat decode: batch 1 and 8, 32 heads × 128, caches of 2048 and
    /// 8192 keys, splits for a 132-SM H100, scale 1/√128, bf16 output.
    pub fn model_specs() -> Vec<DecodeAttnSpec> {
        let mut v = vec![];
        for batch in [1, 8] {
            for max_seq in [2048, 8192] {
                let splits = Self::splits_for(batch, 32, max_seq, 132);
                let scale = 1.0 / (128f32).sqrt();
                v.push(DecodeAttnSpec::new(batch, 32, 128, max_seq, splits, scale, DType::BF16).expect("model shape"));
            }
        }
        v
    }

    /// The partial kernel (launch first).
    pub fn partial(&self) -> DecodeAttnPartial {
        DecodeAttnPartial(*self)
    }

    /// The combine kernel (launch second, same workspace).
    pub fn combine(&self) -> DecodeAttnCombine {
        DecodeAttnCombine(*self)
    }

    /// Elements of the f32 workspace `[batch, heads, splits, hd + 2]`.
    pub fn workspace_elems(&self) -> usize {
        self.batch * self.heads * self.splits * (self.head_dim + 2)
    }

    /// Bytes of the workspace.
    pub fn workspace_bytes(&self) -> usize {
        4 * self.workspace_elems()
    }

    fn tag(&self) -> String {
        format!(
            "b{}_h{}_d{}_s{}_sp{}_sc{:08x}",
            self.batch,
            self.heads,
            self.head_dim,
            self.max_seq,
            self.splits,
            self.scale.to_bits()
        )
    }

    fn check_args(&self, q: &[bf16], k: &[bf16], v: &[bf16], lens: &[u32], slots: &[u32], out: &[f32]) {
        let (bh, d) = (self.batch * self.heads, self.head_dim);
        let per_slot = self.heads * self.max_seq * d;
        assert_eq!(q.len(), bh * d, "decode attention: q must be [batch, heads, hd]");
        assert!(k.len().is_multiple_of(per_slot), "decode attention: k must be [slots, heads, max_seq, hd]");
        assert_eq!(v.len(), k.len(), "decode attention: v must be [slots, heads, max_seq, hd]");
        assert_eq!(lens.len(), self.batch, "decode attention: lens must be [batch]");
        assert_eq!(slots.len(), self.batch, "decode attention: slots must be [batch]");
        let n = k.len() / per_slot;
        assert!(slots.iter().all(|&s| (s as usize) < n), "decode attention: slots {slots:?} outside the {n} cached");
        assert_eq!(out.len(), bh * d, "decode attention: out must be [batch, heads, hd]");
    }

    /// Element offset of row 0 of `(sequence, head) = (bh / heads, bh % heads)`
    /// in the caches.
    fn cache_base(&self, slots: &[u32], bh: usize) -> usize {
        (slots[bh / self.heads] as usize * self.heads + bh % self.heads) * self.max_seq * self.head_dim
    }

    /// Fast CPU path: one rayon task per (sequence, head); scores in f32 with
    /// 8-lane dot products, a max-subtracted softmax, then `Σ p·v` row by row.
    /// Output f32 (the GPU's bf16 output is this rounded).
    pub fn cpu(&self, q: &[bf16], k: &[bf16], v: &[bf16], lens: &[u32], slots: &[u32], out: &mut [f32]) {
        self.check_args(q, k, v, lens, slots, out);
        let d = self.head_dim;
        let (heads, max_seq, scale) = (self.heads, self.max_seq, self.scale);
        out.par_chunks_mut(d).enumerate().for_each(|(bh, o)| {
            let len = (lens[bh / heads] as usize).min(max_seq);
            o.fill(0.0);
            if len == 0 {
                return;
            }
            let qf: Vec<f32> = q[bh * d..(bh + 1) * d].iter().map(|&x| bf16_bits_to_f32(x) * scale).collect();
            let base = self.cache_base(slots, bh);
            let mut row = vec![0f32; d];
            let mut s: Vec<f32> = (0..len)
                .map(|j| {
                    widen(&k[base + j * d..base + (j + 1) * d], &mut row);
                    dot8(&qf, &row)
                })
                .collect();
            let m = crate::softmax::row_max(&s);
            let sum = crate::softmax::exp_sub_sum(&mut s, m);
            for (j, &p) in s.iter().enumerate() {
                widen(&v[base + j * d..base + (j + 1) * d], &mut row);
                for (a, &x) in o.iter_mut().zip(&row) {
                    *a += p * x;
                }
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|a| *a *= inv);
        });
    }

    /// Naive reference in f64 (same signature as [`cpu`](Self::cpu)).
    pub fn reference(&self, q: &[bf16], k: &[bf16], v: &[bf16], lens: &[u32], slots: &[u32], out: &mut [f32]) {
        self.check_args(q, k, v, lens, slots, out);
        let d = self.head_dim;
        for bh in 0..self.batch * self.heads {
            let len = (lens[bh / self.heads] as usize).min(self.max_seq);
            let o = &mut out[bh * d..(bh + 1) * d];
            if len == 0 {
                o.fill(0.0);
                continue;
            }
            let qv = &q[bh * d..(bh + 1) * d];
            let base = self.cache_base(slots, bh);
            let s: Vec<f64> = (0..len)
                .map(|j| {
                    let kr = &k[base + j * d..base + (j + 1) * d];
                    self.scale as f64 * qv.iter().zip(kr).map(|(a, b)| a.to_f64() * b.to_f64()).sum::<f64>()
                })
                .collect();
            let m = s.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let total: f64 = p.iter().sum();
            for (e, oe) in o.iter_mut().enumerate() {
                let acc: f64 = p.iter().enumerate().map(|(j, pj)| pj * v[base + j * d + e].to_f64()).sum();
                *oe = (acc / total) as f32;
            }
        }
    }
}

fn widen(src: &[bf16], dst: &mut [f32]) {
    for (o, &s) in dst.iter_mut().zip(src) {
        *o = bf16_bits_to_f32(s);
    }
}

/// Dot product with 8 independent lanes, so that it vectorises.
#[inline]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Kernel 1 of [`DecodeAttnSpec`]: per-split partial softmax and `P·V`.
/// Params: `q, k, v, lens, slots, ws` (all pointers).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeAttnPartial(pub DecodeAttnSpec);

/// Kernel 2 of [`DecodeAttnSpec`]: log-sum-exp combine of the splits.
/// Params: `ws, out` (pointers).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeAttnCombine(pub DecodeAttnSpec);

/// `acc[i] += p · v[i]` for the 8 bf16 in four packed registers.
fn fma_bf16x8(b: &mut KernelBuilder, acc: &[Reg], p: Reg, packed: &[Reg]) {
    for (i, &w) in packed.iter().enumerate() {
        let (lo, hi) = b.bf16x2_to_f32(w);
        b.fma_into(acc[2 * i], p, lo, acc[2 * i]);
        b.fma_into(acc[2 * i + 1], p, hi, acc[2 * i + 1]);
    }
}

impl KernelSpec for DecodeAttnPartial {
    fn name(&self) -> String {
        format!("decode_attn_partial_{}", self.0.tag())
    }

    fn build(&self) -> Kernel {
        let s = &self.0;
        s.validate().expect("DecodeAttnSpec");
        let (hd, max_seq, splits) = (s.head_dim as u32, s.max_seq as u32, s.splits as u32);
        let vr = hd / 8; // 128-bit vectors per K/V row
        let rg = (THREADS / vr).max(1); // V rows in flight
        let active_threads = vr * rg;
        assert!(vr <= THREADS, "head_dim {hd} > 1024");
        let mut b = KernelBuilder::new(self.name());
        b.max_threads(THREADS);
        let q = b.ptr_param("q");
        let k = b.ptr_param("k");
        let v = b.ptr_param("v");
        let lens = b.ptr_param("lens");
        let slots = b.ptr_param("slots");
        let ws = b.ptr_param("ws");
        let tid = b.special(Sreg::TidX);
        let split = b.special(Sreg::CtaidX);
        let head = b.special(Sreg::CtaidY);
        let seq = b.special(Sreg::CtaidZ);
        let qs = b.shared("qs", hd * 4, 16);
        let ps = b.shared("ps", THREADS * 4, 16);
        let accs = b.shared("accs", rg * hd * 4, 16);
        let mut red = BlockReduce::new(&mut b, "red", THREADS, 1);

        b.comment("this split's key range");
        let la = b.index_addr(lens, seq, 4);
        let len = b.ld(Space::GlobalNc, Ty::U32, Addr::reg(la, 0));
        let len = b.min(Ty::U32, len, max_seq);
        let chunk = b.add(Ty::U32, len, splits - 1);
        let chunk = b.div(Ty::U32, chunk, splits);
        let start = b.mul(Ty::U32, split, chunk);
        let end = b.add(Ty::U32, start, chunk);
        let end = b.min(Ty::U32, end, len);
        let bh = b.mad(Ty::U32, seq, s.heads as u32, head);
        // Byte address of row 0 of this (sequence, head) in the caches: the
        // sequence's cache is the slot the device says.
        let sa = b.index_addr(slots, seq, 4);
        let slot = b.ld(Space::GlobalNc, Ty::U32, Addr::reg(sa, 0));
        let ch = b.mad(Ty::U32, slot, s.heads as u32, head);
        let cache_off = b.mul_wide_u32(ch, max_seq * hd * 2);
        let kbase = b.add(Ty::U64, k, cache_off);
        let vbase = b.add(Ty::U64, v, cache_off);

        b.comment("q * scale * log2(e) into shared memory as f32");
        let qrow = b.index_addr(q, bh, hd * 2);
        let qscale = s.scale * LOG2E;
        b.for_range(tid, hd, THREADS, |b, i| {
            let a = b.index_addr(qrow, i, 2);
            let h = b.ld(Space::GlobalNc, Ty::B16, Addr::reg(a, 0));
            let f = b.cvt(Ty::F32, Ty::BF16, h);
            let f = b.mul(Ty::F32, f, qscale);
            let sa = b.mad(Ty::U32, i, 4, qs);
            b.st(Space::Shared, Ty::F32, Addr::reg(sa, 0), f);
        });
        b.bar_sync();

        // V-phase roles: thread = (row group, vector within the row).
        let vgrp = b.div(Ty::U32, tid, vr);
        let vvec = b.rem(Ty::U32, tid, vr);
        let vactive = b.setp(Cmp::Lt, Ty::U32, tid, active_threads);
        let voff = b.mul(Ty::U32, vvec, 16);
        let voff64 = b.cvt(Ty::U64, Ty::U32, voff);
        let vcol = b.add(Ty::U64, vbase, voff64);
        let pslot = b.mad(Ty::U32, tid, 4, ps);

        let m = b.mov(Ty::F32, f32::NEG_INFINITY);
        let l = b.mov(Ty::F32, 0.0f32);
        let acc: Vec<Reg> = (0..8).map(|_| b.mov(Ty::F32, 0.0f32)).collect();

        b.comment("tiles of 128 keys: one key per thread for the scores");
        b.for_range(start, end, THREADS, |b, tile0| {
            let j = b.add(Ty::U32, tile0, tid);
            let valid = b.setp(Cmp::Lt, Ty::U32, j, end);
            let score = b.mov(Ty::F32, f32::NEG_INFINITY);
            b.if_then(valid, false, |b| {
                let krow = b.index_addr(kbase, j, hd * 2);
                // Two accumulators halve the dependent fma chain.
                let parts = [b.mov(Ty::F32, 0.0f32), b.mov(Ty::F32, 0.0f32)];
                for c in 0..vr {
                    let kv = b.ld_v(Space::GlobalNc, Ty::B32, 4, Addr::reg(krow, 16 * c as i64));
                    let q0 = b.ld_v(Space::Shared, Ty::F32, 4, Addr::reg(qs, 32 * c as i64));
                    let q1 = b.ld_v(Space::Shared, Ty::F32, 4, Addr::reg(qs, 32 * c as i64 + 16));
                    let qv: Vec<Reg> = q0.into_iter().chain(q1).collect();
                    let part = parts[(c % 2) as usize];
                    for (i, &w) in kv.iter().enumerate() {
                        let (lo, hi) = b.bf16x2_to_f32(w);
                        b.fma_into(part, qv[2 * i], lo, part);
                        b.fma_into(part, qv[2 * i + 1], hi, part);
                    }
                }
                let sum = b.add(Ty::F32, parts[0], parts[1]);
                b.assign(Ty::F32, score, sum);
            });
            // Every tile holds at least one valid key, so the max is finite.
            let tmax = red.reduce(b, "max", score);
            let m_new = b.max(Ty::F32, m, tmax);
            let dm = b.sub(Ty::F32, m, m_new);
            let alpha = b.ex2(dm); // 2^(−inf) = 0 on the first tile
            let ds = b.sub(Ty::F32, score, m_new);
            let p = b.ex2(ds); // invalid keys: 2^(−inf) = 0
            b.fma_into(l, l, alpha, p);
            b.st(Space::Shared, Ty::F32, Addr::reg(pslot, 0), p);
            for &a in &acc {
                b.bin_into("mul", Ty::F32, a, a, alpha);
            }
            b.assign(Ty::F32, m, m_new);
            b.bar_sync();
            b.comment("acc += p * V, hd/8 threads per row");
            let left = b.sub(Ty::U32, end, tile0);
            let nvalid = b.min(Ty::U32, left, THREADS);
            b.if_then(vactive, false, |b| {
                b.for_range(vgrp, nvalid, rg, |b, jj| {
                    let pa = b.mad(Ty::U32, jj, 4, ps);
                    let pj = b.ld(Space::Shared, Ty::F32, Addr::reg(pa, 0));
                    let key = b.add(Ty::U32, tile0, jj);
                    let va = b.index_addr(vcol, key, hd * 2);
                    let vv = b.ld_v(Space::GlobalNc, Ty::B32, 4, Addr::reg(va, 0));
                    fma_bf16x8(b, &acc, pj, &vv);
                });
            });
        });

        b.comment("sum l over the block, acc over the row groups");
        let l_total = red.reduce(&mut b, "add", l);
        let arow = b.mad(Ty::U32, vgrp, hd * 4, accs);
        let aslot = b.mad(Ty::U32, vvec, 32, arow);
        b.if_then(vactive, false, |b| {
            b.st_v(Space::Shared, Ty::F32, Addr::reg(aslot, 0), &acc[..4]);
            b.st_v(Space::Shared, Ty::F32, Addr::reg(aslot, 16), &acc[4..]);
        });
        b.bar_sync();
        let widx = b.mad(Ty::U32, bh, splits, split);
        let wrow = b.index_addr(ws, widx, (hd + 2) * 4);
        let t0 = b.setp(Cmp::Eq, Ty::U32, tid, 0);
        b.if_then(t0, false, |b| {
            b.st(Space::Global, Ty::F32, Addr::reg(wrow, 0), m);
            b.st(Space::Global, Ty::F32, Addr::reg(wrow, 4), l_total);
        });
        b.for_range(tid, hd, THREADS, |b, i| {
            let a = b.mad(Ty::U32, i, 4, accs);
            let o = b.mov(Ty::F32, 0.0f32);
            // A runtime loop: unrolled, up to 128 loads made ptxas spill.
            b.for_range(0u32, rg, 1, |b, g| {
                let ga = b.mad(Ty::U32, g, hd * 4, a);
                let x = b.ld(Space::Shared, Ty::F32, Addr::reg(ga, 0));
                b.bin_into("add", Ty::F32, o, o, x);
            });
            let wa = b.index_addr(wrow, i, 4);
            b.st(Space::Global, Ty::F32, Addr::reg(wa, 8), o);
        });
        b.ret();
        b.finish()
    }

    fn launch(&self) -> Launch {
        let s = &self.0;
        Launch::new([s.splits as u32, s.heads as u32, s.batch as u32], [THREADS, 1, 1])
    }

    /// For a full cache (`lens = max_seq`): the work of the longest step.
    fn cost(&self) -> Cost {
        let s = &self.0;
        let bh = (s.batch * s.heads) as u64;
        let (n, d) = (s.max_seq as u64, s.head_dim as u64);
        Cost {
            flops: bh * n * (4 * d + 4),
            bytes: bh * (2 * n * d * 2 + d * 2) + s.batch as u64 * 8 + s.workspace_bytes() as u64,
        }
    }
}

impl KernelSpec for DecodeAttnCombine {
    fn name(&self) -> String {
        let dt = if self.0.out == DType::BF16 { "bf16" } else { "f32" };
        format!("decode_attn_combine_{}_{dt}", self.0.tag())
    }

    fn build(&self) -> Kernel {
        let s = &self.0;
        s.validate().expect("DecodeAttnSpec");
        let (hd, splits) = (s.head_dim as u32, s.splits as u32);
        let stride = ((hd + 2) * 4) as i64;
        let mut b = KernelBuilder::new(self.name());
        let threads = self.launch().block[0];
        b.max_threads(threads);
        let ws = b.ptr_param("ws");
        let out = b.ptr_param("out");
        let d = b.special(Sreg::TidX);
        let head = b.special(Sreg::CtaidX);
        let seq = b.special(Sreg::CtaidY);
        let inside = b.setp(Cmp::Lt, Ty::U32, d, hd);
        // No barriers or collectives here, so idle threads may simply skip.
        b.if_then(inside, false, |b| {
            let bh = b.mad(Ty::U32, seq, s.heads as u32, head);
            let base = b.index_addr(ws, bh, splits * (hd + 2) * 4);
            let col = b.index_addr(base, d, 4);
            let mx = b.mov(Ty::F32, f32::NEG_INFINITY);
            for sp in 0..splits as i64 {
                let ms = b.ld(Space::GlobalNc, Ty::F32, Addr::reg(base, sp * stride));
                b.bin_into("max", Ty::F32, mx, mx, ms);
            }
            let lsum = b.mov(Ty::F32, 0.0f32);
            let o = b.mov(Ty::F32, 0.0f32);
            for sp in 0..splits as i64 {
                let ms = b.ld(Space::GlobalNc, Ty::F32, Addr::reg(base, sp * stride));
                let ls = b.ld(Space::GlobalNc, Ty::F32, Addr::reg(base, sp * stride + 4));
                let a = b.ld(Space::GlobalNc, Ty::F32, Addr::reg(col, sp * stride + 8));
                // An empty split has m = −inf: weight 0 (and no −inf − −inf NaN).
                let empty = b.setp(Cmp::Eq, Ty::F32, ms, f32::NEG_INFINITY);
                let dm = b.sub(Ty::F32, ms, mx);
                let w = b.ex2(dm);
                let w = b.selp(Ty::F32, 0.0f32, w, empty);
                b.fma_into(lsum, w, ls, lsum);
                b.fma_into(o, w, a, o);
            }
            let pos = b.setp(Cmp::Gt, Ty::F32, lsum, 0.0f32);
            let r = b.div(Ty::F32, o, lsum);
            let r = b.selp(Ty::F32, r, 0.0f32, pos);
            let oi = b.mad(Ty::U32, bh, hd, d);
            if s.out == DType::BF16 {
                let h = b.cvt(Ty::BF16, Ty::F32, r);
                let a = b.index_addr(out, oi, 2);
                b.st(Space::Global, Ty::B16, Addr::reg(a, 0), h);
            } else {
                let a = b.index_addr(out, oi, 4);
                b.st(Space::Global, Ty::F32, Addr::reg(a, 0), r);
            }
        });
        b.ret();
        b.finish()
    }

    fn launch(&self) -> Launch {
        let s = &self.0;
        let threads = (s.head_dim as u32).div_ceil(32) * 32;
        Launch::new([s.heads as u32, s.batch as u32, 1], [threads, 1, 1])
    }

    fn cost(&self) -> Cost {
        let s = &self.0;
        let bh = (s.batch * s.heads) as u64;
        let d = s.head_dim as u64;
        Cost {
            flops: bh * s.splits as u64 * (2 * d + 6),
            bytes: s.workspace_bytes() as u64 + bh * d * s.out.size() as u64,
        }
    }
}
