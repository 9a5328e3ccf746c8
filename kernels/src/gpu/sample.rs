//! On-device token selection, so that only token ids cross to the host: greedy
//! [`ArgmaxSpec`] and top-k/top-p sampling [`TopPSpec`], one block per logits row.
//!
//! **Argmax** (`logits f32 [rows, cols] → i32 [rows]`): the lowest index among
//! the maxima of the non-NaN values (`-inf` counts as a value); 0 when the
//! whole row is NaN. This is `model::sampling::argmax` (first index on ties)
//! except that NaN never wins: the host loop keeps index 0 when `logits[0]` is
//! NaN, the device ignores it.
//!
//! **Top-p** (`logits f32 [rows, cols]`, `u f32 [rows]` uniform in `[0, 1)`
//! from the host → `i32 [rows]`), with runtime `temperature > 0`,
//! `top_p ∈ (0, 1]`, `top_k` (0 = off). Precisely:
//! 1. NaN logits count as `-inf`; `-0.0` equals `+0.0`. The *order* `O` is
//!    logit descending, then index ascending. Weights are
//!    `w_j = exp((x_j − max x) / temperature)` (so `-inf` has weight 0).
//! 2. `n_k = top_k` if `0 < top_k < cols`, else `cols`; `Z_k` is the weight of
//!    the first `n_k` tokens of `O`.
//! 3. `n_p` is the smallest `n` whose first `n` tokens of `O` weigh at least
//!    `top_p · Z_k`. The kept set `K` is the first `min(n_k, n_p)` tokens of `O`.
//! 4. The sample walks `K` in **index** order, accumulating weight, and returns
//!    the first token at which the running sum exceeds `u · Σ_K w`; if rounding
//!    leaves none, the largest index in `K` with positive weight.
//!
//! Steps 1–3 are the host sampler's (`model::sampling::sample`: top-k, then
//! top-p relative to the top-k mass, ties at the threshold by lowest index).
//! Step 4 differs: the host walks `K` in sorted order. For the same `u` the two
//! may pick different tokens, but each token of `K` is picked with probability
//! `w_j / Σ_K w` in both, so the distributions are equal.
//!
//! The kernel finds the threshold without sorting. Logits map to u32 keys
//! whose order is the logits' order (`key = bits ^ (sign ? 0xffffffff :
//! 0x80000000)`), and MSB-first radix-4 searches over the key bits (two bits
//! per pass, 16 passes) find the key `τ` of the `n_k`-th and of the `n_p`-th
//! token: the largest key whose "count (or weight) of tokens with key ≥ τ"
//! still reaches the target. Tokens with the threshold key all have the same
//! weight, so how many of them are kept (`r`) follows from counts and sums;
//! which ones (the `r` lowest indices) is one more search over the index bits,
//! and so is the walk of step 4 (the largest `J` with
//! `Σ_{kept j < J} w_j ≤ target`). Each search step is one strided pass over
//! the row (three candidates evaluated at once) and one block reduction.
//! Counts and indices travel as f32 (exact below 2^24). Every block sum is
//! computed with the same reduction tree, and rounded addition is monotone, so
//! the sums are monotone in the threshold and the searches are well-defined
//! despite rounding. Passes over the row: `19 + ⌈b/2⌉` with
//! `b = ⌈log2(cols + 1)⌉` (28 for the 151936-token vocabulary), 17 more with
//! top-k, 9 more when the threshold logit is tied and only some of its tokens
//! are kept, 1 more when rounding leaves the walk without a crossing; the row
//! stays in L2 between them. One block per row, 512 threads,
//! no `.maxntid` (see `build`).
//!
//! Invariants: every decision that steers control flow (search steps, the
//! top-k branch) comes from a block reduction whose result is bit-identical in
//! all threads, so every `bar.sync` is reached by the whole block; search
//! loops have compile-time trip counts; loads never leave the row.

use qvc_codegen::{Addr, Cmp, Kernel, KernelBuilder, Reg, RegClass, Space, Sreg, Ty};
use qvc_ir::DType;
use rayon::prelude::*;

use super::softmax::{check_rows, row_loop, row_threads, BlockReduce};
use super::InvalidSpec;
use crate::spec::{Cost, KernelSpec, Launch};

/// The index a thread holds before it has seen a non-NaN value.
const NONE: u32 = u32::MAX;

/// Greedy selection: `out[r] = argmax logits[r]` (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ArgmaxSpec {
    pub rows: usize,
    pub cols: usize,
    /// Threads per block (multiple of 32, ≤ 1024).
    pub threads: u32,
}

/// Whether `(v, i)` beats `(bv, bi)`: larger value, or equal value and lower
/// index. NaN compares false, so it never wins.
fn beats(v: f32, i: usize, bv: f32, bi: usize) -> bool {
    v > bv || (v == bv && i < bi)
}

impl ArgmaxSpec {
    pub fn new(rows: usize, cols: usize) -> Result<ArgmaxSpec, InvalidSpec> {
        let s = ArgmaxSpec { rows, cols, threads: row_threads(cols) };
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<(), InvalidSpec> {
        check_rows("ArgmaxSpec", self.rows, self.cols, self.threads)
    }

    /// Fast CPU path: rows in parallel, a branch-light scan per row.
    pub fn cpu(&self, x: &[f32], out: &mut [i32]) {
        self.check(x, out);
        out.par_iter_mut().zip(x.par_chunks(self.cols)).for_each(|(o, row)| {
            let (mut bv, mut bi) = (f32::NEG_INFINITY, usize::MAX);
            for (i, &v) in row.iter().enumerate() {
                // Scanning upwards, an equal value only wins before any value was taken.
                if v > bv || (v == bv && bi == usize::MAX) {
                    bv = v;
                    bi = i;
                }
            }
            *o = if bi == usize::MAX { 0 } else { bi as i32 };
        });
    }

    /// Naive reference: the definition, element by element.
    pub fn reference(&self, x: &[f32], out: &mut [i32]) {
        self.check(x, out);
        for (o, row) in out.iter_mut().zip(x.chunks(self.cols)) {
            let (mut bv, mut bi) = (f32::NEG_INFINITY, usize::MAX);
            for (i, &v) in row.iter().enumerate() {
                if beats(v, i, bv, bi) {
                    (bv, bi) = (v, i);
                }
            }
            *o = if bi == usize::MAX { 0 } else { bi as i32 };
        }
    }

    fn check(&self, x: &[f32], out: &[i32]) {
        assert_eq!(x.len(), self.rows * self.cols, "argmax: x must be [rows, cols]");
        assert_eq!(out.len(), self.rows, "argmax: out must be [rows]");
    }

    /// Qwen-VL-Chat: 1 and 8 rows of 151936 logits.
    pub fn model_specs() -> Vec<ArgmaxSpec> {
        [1, 8].into_iter().map(|r| ArgmaxSpec::new(r, 151_936).expect("model shape")).collect()
    }
}

/// `(bv, bi) = (v, i)` where `(v, i)` beats `(bv, bi)`.
fn take_better(b: &mut KernelBuilder, bv: Reg, bi: Reg, v: Reg, i: Reg) {
    let gt = b.setp(Cmp::Gt, Ty::F32, v, bv);
    let eq = b.setp(Cmp::Eq, Ty::F32, v, bv);
    let lo = b.setp(Cmp::Lt, Ty::U32, i, bi);
    let tie = b.and_pred(eq, lo);
    let win = b.or_pred(gt, tie);
    let nv = b.selp(Ty::F32, v, bv, win);
    let ni = b.selp(Ty::U32, i, bi, win);
    b.assign(Ty::F32, bv, nv);
    b.assign(Ty::U32, bi, ni);
}

impl KernelSpec for ArgmaxSpec {
    fn name(&self) -> String {
        format!("argmax_r{}_c{}_t{}", self.rows, self.cols, self.threads)
    }

    fn build(&self) -> Kernel {
        self.validate().expect("ArgmaxSpec");
        let (cols, t) = (self.cols, self.threads);
        let warps = t / 32;
        let mut b = KernelBuilder::new(self.name());
        b.max_threads(t);
        let x = b.ptr_param("x");
        let out = b.ptr_param("out");
        let tid = b.special(Sreg::TidX);
        let row = b.special(Sreg::CtaidX);
        let xrow = b.index_addr(x, row, (cols * 4) as u32);
        let sv = b.shared("best_v", warps * 4, 4);
        let si = b.shared("best_i", warps * 4, 4);
        let bv = b.mov(Ty::F32, f32::NEG_INFINITY);
        let bi = b.mov(Ty::U32, NONE);
        row_loop(&mut b, DType::F32, xrow, tid, cols, t, |b, j, v| take_better(b, bv, bi, v, j));
        b.comment("warp butterfly: all lanes end with the same winner");
        for m in [16, 8, 4, 2, 1] {
            let ov = b.shfl_bfly(bv, m);
            let oi = b.shfl_bfly(bi, m);
            take_better(&mut b, bv, bi, ov, oi);
        }
        let lane = b.and(Ty::B32, tid, 31);
        let warp = b.shr(Ty::U32, tid, 5);
        let lane0 = b.setp(Cmp::Eq, Ty::U32, lane, 0);
        let va = b.mad(Ty::U32, warp, 4, sv);
        let ia = b.mad(Ty::U32, warp, 4, si);
        b.if_then(lane0, false, |b| {
            b.st(Space::Shared, Ty::F32, Addr::reg(va, 0), bv);
            b.st(Space::Shared, Ty::U32, Addr::reg(ia, 0), bi);
        });
        b.bar_sync();
        let t0 = b.setp(Cmp::Eq, Ty::U32, tid, 0);
        b.if_then(t0, false, |b| {
            for w in 1..warps as i64 {
                let v = b.ld(Space::Shared, Ty::F32, Addr::reg(sv, 4 * w));
                let i = b.ld(Space::Shared, Ty::U32, Addr::reg(si, 4 * w));
                take_better(b, bv, bi, v, i);
            }
            let none = b.setp(Cmp::Eq, Ty::U32, bi, NONE);
            let id = b.selp(Ty::U32, 0u32, bi, none);
            let oa = b.index_addr(out, row, 4);
            b.st(Space::Global, Ty::S32, Addr::reg(oa, 0), id);
        });
        b.ret();
        b.finish()
    }

    fn launch(&self) -> Launch {
        Launch::new([self.rows as u32, 1, 1], [self.threads, 1, 1])
    }

    fn cost(&self) -> Cost {
        let n = (self.rows * self.cols) as u64;
        Cost { flops: n, bytes: 4 * n + 4 * self.rows as u64 }
    }
}

/// Runtime parameters of [`TopPSpec`] (kernel params, not part of the spec).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TopPParams {
    /// > 0 (greedy decoding uses [`ArgmaxSpec`]).
    pub temperature: f32,
    /// In (0, 1]; 1 keeps every token of positive weight.
    pub top_p: f32,
    /// 0 = off.
    pub top_k: u32,
}

impl TopPParams {
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        let bad = |reason: String| Err(InvalidSpec { spec: "TopPParams", reason });
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!("temperature must be positive and finite, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// Top-k/top-p sampling with host-supplied uniforms (see the module docs).
/// Kernel params: `x, u, out` (pointers), `temperature` f32, `top_p` f32, `top_k` u32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TopPSpec {
    pub rows: usize,
    pub cols: usize,
    /// Threads per block (multiple of 32, ≤ 1024).
    pub threads: u32,
}

/// Logit `x` with NaN as `-inf` and `-0` as `+0`: the value ordered and weighed.
fn canon(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x + 0.0
    }
}

/// `O`: logit descending, then index ascending.
fn order(row: &[f32], a: usize, b: usize) -> std::cmp::Ordering {
    canon(row[b]).partial_cmp(&canon(row[a])).expect("canonical logits are not NaN").then(a.cmp(&b))
}

impl TopPSpec {
    pub fn new(rows: usize, cols: usize) -> Result<TopPSpec, InvalidSpec> {
        let s = TopPSpec { rows, cols, threads: 512.min(row_threads(cols)) };
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<(), InvalidSpec> {
        check_rows("TopPSpec", self.rows, self.cols, self.threads)
    }

    fn check(&self, x: &[f32], u: &[f32], out: &[i32], p: &TopPParams) {
        assert_eq!(x.len(), self.rows * self.cols, "top-p: x must be [rows, cols]");
        assert_eq!(u.len(), self.rows, "top-p: u must be [rows]");
        assert_eq!(out.len(), self.rows, "top-p: out must be [rows]");
        if let Err(e) = p.validate() {
            panic!("top-p: {e}");
        }
    }

    /// Bits of the index bisection: `2^bits > cols`, so "past the end" is representable.
    fn index_bits(&self) -> u32 {
        usize::BITS - self.cols.leading_zeros()
    }

    /// The kept set `K` of one row (steps 1–3, in f64), in index order.
    pub fn reference_kept(&self, row: &[f32], p: &TopPParams) -> Vec<usize> {
        assert_eq!(row.len(), self.cols);
        let m = row.iter().map(|&x| canon(x)).fold(f32::NEG_INFINITY, f32::max) as f64;
        let w = |j: usize| ((canon(row[j]) as f64 - m) / p.temperature as f64).exp();
        let mut idx: Vec<usize> = (0..self.cols).collect();
        idx.sort_by(|&a, &b| order(row, a, b));
        let nk = if p.top_k > 0 && (p.top_k as usize) < self.cols { p.top_k as usize } else { self.cols };
        let zk: f64 = idx[..nk].iter().map(|&j| w(j)).sum();
        let target = p.top_p as f64 * zk;
        let mut cum = 0.0;
        let mut n = nk;
        // top_p = 1: in exact arithmetic only the whole positive-weight
        // prefix reaches Z_k, and the zero-weight rest changes no pick, so
        // keep all n_k. (The f64 running sum reaches Z_k early, once the
        // tail is below its rounding: it dropped a token of weight 1e-17·Z
        // that u = 0 picks by the definition.)
        if p.top_p < 1.0 {
            for (i, &j) in idx[..nk].iter().enumerate() {
                cum += w(j);
                if cum >= target {
                    n = i + 1;
                    break;
                }
            }
        }
        let mut kept = idx[..n].to_vec();
        kept.sort_unstable();
        kept
    }

    /// Step 4 in f64 for a kept set in index order.
    pub fn reference_pick(&self, row: &[f32], kept: &[usize], p: &TopPParams, u: f32) -> usize {
        let m = row.iter().map(|&x| canon(x)).fold(f32::NEG_INFINITY, f32::max) as f64;
        let w = |j: usize| ((canon(row[j]) as f64 - m) / p.temperature as f64).exp();
        let mass: f64 = kept.iter().map(|&j| w(j)).sum();
        let target = u as f64 * mass;
        let mut cum = 0.0;
        for &j in kept {
            cum += w(j);
            if cum > target {
                return j;
            }
        }
        *kept.iter().rev().find(|&&j| w(j) > 0.0).unwrap_or(&kept[0])
    }

    /// Naive reference: the definition of the module docs, in f64.
    pub fn reference(&self, x: &[f32], u: &[f32], p: &TopPParams, out: &mut [i32]) {
        self.check(x, u, out, p);
        for (r, row) in x.chunks(self.cols).enumerate() {
            let kept = self.reference_kept(row, p);
            out[r] = self.reference_pick(row, &kept, p, u[r]) as i32;
        }
    }

    /// Fast CPU path, same definition, O(cols) per row: weights in f32 with
    /// f64 sums; one pass builds a histogram (count, mass) over the top 16
    /// bits of the order keys, prefixes of `O` are then found bucket by bucket
    /// (whole buckets at a time, sorting only the bucket where the prefix
    /// ends), and the sample is one pass in index order.
    pub fn cpu(&self, x: &[f32], u: &[f32], p: &TopPParams, out: &mut [i32]) {
        self.check(x, u, out, p);
        out.par_iter_mut()
            .zip(x.par_chunks(self.cols))
            .zip(u.par_iter())
            .for_each(|((o, row), &ur)| *o = top_p_row(row, p, ur) as i32);
    }

    /// Qwen-VL-Chat: 1 and 8 rows of 151936 logits.
    pub fn model_specs() -> Vec<TopPSpec> {
        [1, 8].into_iter().map(|r| TopPSpec::new(r, 151_936).expect("model shape")).collect()
    }
}

/// The order key of a canonical logit: `a < b ⇔ key(a) < key(b)`.
fn key(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// Where a prefix of `O` ends: its last token (key, index) and its totals.
#[derive(Clone, Copy, Debug)]
struct Cut {
    key: u32,
    index: usize,
    count: usize,
    mass: f64,
}

/// A prefix of `O` to find: the first `n` tokens, or the shortest prefix
/// weighing at least `mass`.
#[derive(Clone, Copy)]
enum Limit {
    Count(usize),
    Mass(f64),
}

/// Histogram of one row over the top 16 key bits.
struct Hist<'a> {
    keys: &'a [u32],
    w: &'a [f32],
    row: &'a [f32],
    count: Vec<u32>,
    mass: Vec<f64>,
}

impl Hist<'_> {
    /// The shortest prefix of `O` that reaches `limit`, or `None` if the whole
    /// row does not (rounding of a mass target).
    fn cut(&self, limit: Limit) -> Option<Cut> {
        let (mut count, mut mass) = (0usize, 0.0f64);
        let reached = |c: usize, m: f64| match limit {
            Limit::Count(n) => c >= n,
            Limit::Mass(t) => m >= t,
        };
        for bkt in (0..self.count.len()).rev() {
            let (bc, bm) = (self.count[bkt] as usize, self.mass[bkt]);
            if bc == 0 || !reached(count + bc, mass + bm) {
                count += bc;
                mass += bm;
                continue;
            }
            // The prefix ends inside this bucket: order its tokens.
            let mut toks: Vec<usize> = (0..self.keys.len()).filter(|&j| (self.keys[j] >> 16) as usize == bkt).collect();
            toks.sort_unstable_by(|&a, &b| order(self.row, a, b));
            for j in toks {
                count += 1;
                mass += self.w[j] as f64;
                if reached(count, mass) {
                    return Some(Cut { key: self.keys[j], index: j, count, mass });
                }
            }
        }
        None
    }
}

/// [`TopPSpec::cpu`] for one row.
fn top_p_row(row: &[f32], p: &TopPParams, u: f32) -> usize {
    let cols = row.len();
    let xs: Vec<f32> = row.iter().map(|&v| canon(v)).collect();
    let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let inv_t = 1.0 / p.temperature;
    let w: Vec<f32> = xs.iter().map(|&v| crate::exp_f32((v - m) * inv_t)).collect();
    let keys: Vec<u32> = xs.iter().map(|&v| key(v)).collect();
    let mut h = Hist { keys: &keys, w: &w, row, count: vec![0; 1 << 16], mass: vec![0.0; 1 << 16] };
    for (&k, &wj) in keys.iter().zip(&w) {
        h.count[(k >> 16) as usize] += 1;
        h.mass[(k >> 16) as usize] += wj as f64;
    }
    let total: f64 = h.mass.iter().sum();
    let all = Cut { key: 0, index: 0, count: cols, mass: total };
    let cut_k = if p.top_k > 0 && (p.top_k as usize) < cols {
        h.cut(Limit::Count(p.top_k as usize)).expect("top_k < cols tokens exist")
    } else {
        all
    };
    let cut = match h.cut(Limit::Mass(p.top_p as f64 * cut_k.mass)) {
        Some(c) if c.count <= cut_k.count => c,
        _ => cut_k,
    };
    // `all` (key 0, index 0) keeps every token: every canonical key is > 0.
    let kept = |j: usize| keys[j] > cut.key || (keys[j] == cut.key && j <= cut.index);
    let target = u as f64 * cut.mass;
    let (mut cum, mut last) = (0.0f64, None);
    for j in (0..cols).filter(|&j| kept(j)) {
        cum += w[j] as f64;
        if cum > target {
            return j;
        }
        if w[j] > 0.0 {
            last = Some(j);
        }
    }
    last.unwrap_or(0)
}

/// Per-row state of the top-p kernel generator.
struct Row {
    tid: Reg,
    xrow: Reg,
    cols: usize,
    threads: u32,
    /// log2(e) / temperature.
    c: Reg,
    /// The row max (canonical logits).
    m: Reg,
}

impl Row {
    /// `f(j, x_j, key_j)` over this thread's columns: the canonical logit and its order key.
    fn each(&self, b: &mut KernelBuilder, mut f: impl FnMut(&mut KernelBuilder, Reg, Reg, Reg)) {
        row_loop(b, DType::F32, self.xrow, self.tid, self.cols, self.threads, |b, j, raw| {
            let x = canon_reg(b, raw);
            let key = key_of(b, x);
            f(b, j, x, key)
        });
    }

    /// `2^((x − m)·c) = exp((x − max)/temperature)`.
    fn weight(&self, b: &mut KernelBuilder, x: Reg) -> Reg {
        let d = b.sub(Ty::F32, x, self.m);
        let e = b.mul(Ty::F32, d, self.c);
        b.ex2(e)
    }

    /// One strided pass: for each of the `n` values `f(j, x_j, key_j)`
    /// returns per element, its sum over the row, block-reduced (one barrier).
    fn sum_pass(
        &self,
        b: &mut KernelBuilder,
        red: &mut BlockReduce,
        n: usize,
        mut f: impl FnMut(&mut KernelBuilder, Reg, Reg, Reg) -> Vec<Reg>,
    ) -> Vec<Reg> {
        let accs: Vec<Reg> = (0..n).map(|_| b.mov(Ty::F32, 0.0f32)).collect();
        self.each(b, |b, j, x, key| {
            let vs = f(b, j, x, key);
            assert_eq!(vs.len(), n);
            for (&a, v) in accs.iter().zip(vs) {
                b.bin_into("add", Ty::F32, a, a, v);
            }
        });
        red.reduce_n(b, "add", &accs)
    }

    /// Radix-4 MSB-first search: the largest `t < 2^bits` (`bits` rounded up
    /// to even) with `ok(t)`, given that `ok(0)` holds and `ok` is monotone
    /// (true up to some `t*`). Each step settles two bits: `ok` gets the three
    /// candidates `t | d << s` (d = 1, 2, 3) and evaluates them in one pass.
    /// A runtime loop with a block-uniform trip count.
    fn bisect(
        &self,
        b: &mut KernelBuilder,
        red: &mut BlockReduce,
        bits: u32,
        mut ok: impl FnMut(&mut KernelBuilder, &mut BlockReduce, &Row, [Reg; 3]) -> [Reg; 3],
    ) -> Reg {
        let bits = bits.next_multiple_of(2);
        let t = b.mov(Ty::U32, 0u32);
        b.for_range(0u32, bits / 2, 1, |b, i| {
            let i2 = b.shl(Ty::B32, i, 1);
            let sh = b.sub(Ty::U32, bits - 2, i2);
            let cands = [1u32, 2, 3].map(|d| {
                let bit = b.shl(Ty::B32, d, sh);
                b.or(Ty::B32, t, bit)
            });
            let good = ok(b, red, self, cands);
            // Monotone: good[2] ⇒ good[1] ⇒ good[0]; take the largest that holds.
            let mut nt = t;
            for (c, g) in cands.into_iter().zip(good) {
                nt = b.selp(Ty::U32, c, nt, g);
            }
            b.assign(Ty::U32, t, nt);
        });
        t
    }
}

/// NaN → −inf, −0 → +0.
fn canon_reg(b: &mut KernelBuilder, raw: Reg) -> Reg {
    let z = b.add(Ty::F32, raw, 0.0f32);
    let nan = b.reg(RegClass::Pred);
    b.ins("setp.nan.f32", vec![nan.into(), z.into(), z.into()]);
    b.selp(Ty::F32, f32::NEG_INFINITY, z, nan)
}

/// The order-preserving u32 key of a (non-NaN) f32.
fn key_of(b: &mut KernelBuilder, x: Reg) -> Reg {
    let bits = b.reg(RegClass::B32);
    b.ins("mov.b32", vec![bits.into(), x.into()]);
    let sign = b.shr(Ty::S32, bits, 31);
    let mask = b.or(Ty::B32, sign, 0x8000_0000u32 as i64);
    b.xor(Ty::B32, bits, mask)
}

/// The f32 whose key is `key` (inverse of [`key_of`]).
fn from_key(b: &mut KernelBuilder, key: Reg) -> Reg {
    // key ≥ 0x80000000: a positive float with the top bit set; else the complement.
    let pos = b.setp(Cmp::Ge, Ty::U32, key, 0x8000_0000u32);
    let p = b.and(Ty::B32, key, 0x7fff_ffffi64);
    let n = b.xor(Ty::B32, key, 0xffff_ffffu32 as i64);
    let bits = b.selp(Ty::B32, p, n, pos);
    let x = b.reg(RegClass::F32);
    b.ins("mov.b32", vec![x.into(), bits.into()]);
    x
}

/// Loads the pointer param `name` (declared earlier by `ptr_param`) again.
fn reload_ptr(b: &mut KernelBuilder, name: &str) -> Reg {
    let p = b.ld(Space::Param, Ty::U64, Addr::sym(format!("p_{name}"), 0));
    let d = b.reg(RegClass::B64);
    b.ins("cvta.to.global.u64", vec![d.into(), p.into()]);
    d
}

/// `p ? 1 : 0` as f32.
fn one_if(b: &mut KernelBuilder, p: Reg) -> Reg {
    b.selp(Ty::F32, 1.0f32, 0.0f32, p)
}

impl KernelSpec for TopPSpec {
    fn name(&self) -> String {
        format!("top_p_r{}_c{}_t{}", self.rows, self.cols, self.threads)
    }

    fn build(&self) -> Kernel {
        self.validate().expect("TopPSpec");
        let (cols, t) = (self.cols, self.threads);
        let mut b = KernelBuilder::new(self.name());
        // No `.maxntid`: with it ptxas aims at full occupancy (several blocks
        // per SM, 32 registers at 512 threads) and spills; this kernel runs
        // one block per row, so registers are worth more than occupancy.
        let x = b.ptr_param("x");
        // `u` and `out` are declared here (param order) but loaded again where
        // they are used, so they are not live across the whole kernel.
        let _ = b.ptr_param("u");
        let _ = b.ptr_param("out");
        let temperature = b.param("temperature", Ty::F32);
        let top_p = b.param("top_p", Ty::F32);
        let top_k = b.param("top_k", Ty::U32);
        let tid = b.special(Sreg::TidX);
        let rowi = b.special(Sreg::CtaidX);
        let xrow = b.index_addr(x, rowi, (cols * 4) as u32);
        let mut red = BlockReduce::new(&mut b, "red", t, 3);
        let log2e = b.mov(Ty::F32, std::f32::consts::LOG2_E);
        let c = b.div(Ty::F32, log2e, temperature);
        let m = b.mov(Ty::F32, f32::NEG_INFINITY);
        let mut row = Row { tid, xrow, cols, threads: t, c, m };

        b.comment("max of the canonical logits");
        row.each(&mut b, |b, _, xv, _| b.bin_into("max", Ty::F32, m, m, xv));
        row.m = red.reduce(&mut b, "max", m);
        let row = row;

        b.comment("top-k: defaults for top_k = 0 or >= cols (every token, Z_k = Z)");
        let zall = row.sum_pass(&mut b, &mut red, 1, |b, _, xv, _| vec![row.weight(b, xv)])[0];
        let colsf = cols as f32;
        let tau_k = b.mov(Ty::U32, 0u32);
        let r_k = b.mov(Ty::F32, 0.0f32);
        let w_k = b.mov(Ty::F32, 0.0f32);
        let sgt_k = b.mov(Ty::F32, zall);
        let zk = b.mov(Ty::F32, zall);
        let pos_k = b.mov(Ty::F32, colsf);
        let ceq_k = b.mov(Ty::F32, 0.0f32);
        let on = b.setp(Cmp::Ne, Ty::U32, top_k, 0u32);
        let below = b.setp(Cmp::Lt, Ty::U32, top_k, cols as u32);
        let kact = b.and_pred(on, below);
        b.if_then(kact, false, |b| {
            let kf = b.cvt(Ty::F32, Ty::U32, top_k);
            b.comment("bisection: the largest key with count(key >= tau) >= top_k");
            let tk = row.bisect(b, &mut red, 32, |b, red, row, cands| {
                let cnt = row.sum_pass(b, red, 3, |b, _, _, key| {
                    cands
                        .iter()
                        .map(|&c| {
                            let ge = b.setp(Cmp::Ge, Ty::U32, key, c);
                            one_if(b, ge)
                        })
                        .collect()
                });
                [0, 1, 2].map(|i| b.setp(Cmp::Ge, Ty::F32, cnt[i], kf))
            });
            let st = row.sum_pass(b, &mut red, 3, |b, _, xv, key| {
                let gt = b.setp(Cmp::Gt, Ty::U32, key, tk);
                let eq = b.setp(Cmp::Eq, Ty::U32, key, tk);
                let w = row.weight(b, xv);
                vec![one_if(b, gt), b.selp(Ty::F32, w, 0.0f32, gt), one_if(b, eq)]
            });
            let (cgt, sgt) = (st[0], st[1]);
            b.assign(Ty::F32, ceq_k, st[2]);
            let r = b.sub(Ty::F32, kf, cgt);
            let xt = from_key(b, tk);
            let wt = row.weight(b, xt);
            let z = b.mad(Ty::F32, r, wt, sgt);
            b.assign(Ty::U32, tau_k, tk);
            b.assign(Ty::F32, r_k, r);
            b.assign(Ty::F32, w_k, wt);
            b.assign(Ty::F32, sgt_k, sgt);
            b.assign(Ty::F32, zk, z);
            b.assign(Ty::F32, pos_k, kf);
        });

        b.comment("top-p: the largest key with weight(key >= tau) >= top_p * Z_k");
        let target_p = b.mul(Ty::F32, top_p, zk);
        let tau_p = row.bisect(&mut b, &mut red, 32, |b, red, row, cands| {
            let s = row.sum_pass(b, red, 3, |b, _, xv, key| {
                let w = row.weight(b, xv);
                cands
                    .iter()
                    .map(|&c| {
                        let ge = b.setp(Cmp::Ge, Ty::U32, key, c);
                        b.selp(Ty::F32, w, 0.0f32, ge)
                    })
                    .collect()
            });
            [0, 1, 2].map(|i| b.setp(Cmp::Ge, Ty::F32, s[i], target_p))
        });
        let st = row.sum_pass(&mut b, &mut red, 3, |b, _, xv, key| {
            let gt = b.setp(Cmp::Gt, Ty::U32, key, tau_p);
            let eq = b.setp(Cmp::Eq, Ty::U32, key, tau_p);
            let w = row.weight(b, xv);
            vec![one_if(b, gt), b.selp(Ty::F32, w, 0.0f32, gt), one_if(b, eq)]
        });
        let (cgt_p, sgt_p, ceq_p) = (st[0], st[1], st[2]);
        // r = ⌈(target − S(>τ)) / w_τ⌉ threshold tokens, clamped to [1, count(= τ)].
        let xt = from_key(&mut b, tau_p);
        let w_p = row.weight(&mut b, xt);
        let need = b.sub(Ty::F32, target_p, sgt_p);
        let q = b.div(Ty::F32, need, w_p);
        let qc = b.reg(RegClass::F32);
        b.ins("cvt.rpi.f32.f32", vec![qc.into(), q.into()]);
        let r = b.max(Ty::F32, qc, 1.0f32); // max/min ignore a NaN quotient
        let r_p = b.min(Ty::F32, r, ceq_p);
        let pos = b.add(Ty::F32, cgt_p, r_p);
        // No token at τ only happens when rounding made Σw < target: fall back to top-k.
        let none = b.setp(Cmp::Eq, Ty::F32, ceq_p, 0.0f32);
        let pos_p = b.selp(Ty::F32, f32::INFINITY, pos, none);

        b.comment("the kept set: key > tau, or key = tau among the first r by index");
        let use_p = b.setp(Cmp::Le, Ty::F32, pos_p, pos_k);
        let tau = b.selp(Ty::U32, tau_p, tau_k, use_p);
        let r = b.selp(Ty::F32, r_p, r_k, use_p);
        let w_tau = b.selp(Ty::F32, w_p, w_k, use_p);
        let sgt = b.selp(Ty::F32, sgt_p, sgt_k, use_p);
        let ceq = b.selp(Ty::F32, ceq_p, ceq_k, use_p);
        let kept_mass = b.mad(Ty::F32, r, w_tau, sgt);
        let nbits = self.index_bits();
        b.comment("search over indices for the last kept threshold token, unless all of them are kept");
        let jt = b.mov(Ty::U32, u32::MAX);
        let some_ties = b.setp(Cmp::Lt, Ty::F32, r, ceq);
        b.if_then(some_ties, false, |b| {
            let found = row.bisect(b, &mut red, nbits, |b, red, row, cands| {
                let g = row.sum_pass(b, red, 3, |b, j, _, key| {
                    let eq = b.setp(Cmp::Eq, Ty::U32, key, tau);
                    cands
                        .iter()
                        .map(|&c| {
                            let before = b.setp(Cmp::Lt, Ty::U32, j, c);
                            let both = b.and_pred(eq, before);
                            one_if(b, both)
                        })
                        .collect()
                });
                [0, 1, 2].map(|i| b.setp(Cmp::Lt, Ty::F32, g[i], r))
            });
            b.assign(Ty::U32, jt, found);
        });
        let kept = |b: &mut KernelBuilder, j: Reg, key: Reg| {
            let gt = b.setp(Cmp::Gt, Ty::U32, key, tau);
            let eq = b.setp(Cmp::Eq, Ty::U32, key, tau);
            let early = b.setp(Cmp::Le, Ty::U32, j, jt);
            let tie = b.and_pred(eq, early);
            b.or_pred(gt, tie)
        };

        b.comment("sample: the largest J with sum_{kept j < J} w_j <= u * kept mass");
        let up = reload_ptr(&mut b, "u");
        let ua = b.index_addr(up, rowi, 4);
        let u = b.ld(Space::GlobalNc, Ty::F32, Addr::reg(ua, 0));
        let target = b.mul(Ty::F32, u, kept_mass);
        let pick = row.bisect(&mut b, &mut red, nbits, |b, red, row, cands| {
            let f = row.sum_pass(b, red, 3, |b, j, xv, key| {
                let k = kept(b, j, key);
                let w = row.weight(b, xv);
                let kw = b.selp(Ty::F32, w, 0.0f32, k);
                cands
                    .iter()
                    .map(|&c| {
                        let before = b.setp(Cmp::Lt, Ty::U32, j, c);
                        b.selp(Ty::F32, kw, 0.0f32, before)
                    })
                    .collect()
            });
            [0, 1, 2].map(|i| b.setp(Cmp::Le, Ty::F32, f[i], target))
        });
        b.comment("fallback when rounding left no crossing: the last kept token of positive weight");
        let id = b.mov(Ty::U32, pick);
        let outside = b.setp(Cmp::Ge, Ty::U32, pick, cols as u32);
        b.if_then(outside, false, |b| {
            let last = b.mov(Ty::F32, -1.0f32);
            row.each(b, |b, j, xv, key| {
                let k = kept(b, j, key);
                let w = row.weight(b, xv);
                let pos = b.setp(Cmp::Gt, Ty::F32, w, 0.0f32);
                let both = b.and_pred(k, pos);
                let jf = b.cvt(Ty::F32, Ty::U32, j);
                let cand = b.selp(Ty::F32, jf, -1.0f32, both);
                b.bin_into("max", Ty::F32, last, last, cand);
            });
            let last = red.reduce(b, "max", last);
            let last = b.max(Ty::F32, last, 0.0f32);
            let last = b.cvt(Ty::U32, Ty::F32, last);
            b.assign(Ty::U32, id, last);
        });
        let t0 = b.setp(Cmp::Eq, Ty::U32, tid, 0u32);
        b.if_then(t0, false, |b| {
            let out = reload_ptr(b, "out");
            let oa = b.index_addr(out, rowi, 4);
            b.st(Space::Global, Ty::S32, Addr::reg(oa, 0), id);
        });
        b.ret();
        b.finish()
    }

    fn launch(&self) -> Launch {
        Launch::new([self.rows as u32, 1, 1], [self.threads, 1, 1])
    }

    /// Minimum traffic (logits read once); the kernel re-reads them from L2
    /// once per pass.
    fn cost(&self) -> Cost {
        let n = (self.rows * self.cols) as u64;
        let passes = 19 + self.index_bits().div_ceil(2) as u64;
        Cost { flops: passes * 4 * n, bytes: 4 * n + 8 * self.rows as u64 }
    }
}
