//! Fused multi-query attention (FlashAttention-2 structure) for the ViT, the
//! adapter's cross attention and the decoder's causal prefill:
//! `out[i, h] = Σ_j softmax_j(scale · q[i, h] · k[j, h]) · v[j, h]` over the keys
//! `j` that query `i` sees under the spec's [`FlashMask`].
//!
//! Layout: q, k and v are read in place, element `(token, head, d)` of each at
//! `base + token·token_stride + head·head_stride + d` (strides in elements, per
//! tensor), so the ViT's per-head interleaved `in_proj` output, the decoder's
//! contiguous `c_attn` output and a `[heads, max_seq, hd]` KV cache need no
//! copy. `out` is `[tq, heads, hd]` contiguous, bf16 or f32.
//!
//! Masks:
//! * [`FlashMask::None`]: every key (global ViT layers, cross attention, `tq ≠ tk`).
//! * [`FlashMask::Causal`]: query `i` sits at absolute position `q_offset + i`
//!   and sees keys `0..=q_offset + i` (clamped to `tk`): keys are past + new.
//! * [`FlashMask::Window`]: tokens are the patches of a `gh × gw` grid in
//!   row-major order, cut into `window × window` squares from the top left
//!   (edge windows are smaller when the grid is not a multiple); a query sees
//!   exactly the keys of its own window. `tq = tk = gh·gw`.
//!
//! The PTX kernel: a block of 4 warps handles 64 queries of one head (one
//! window for window masks: the grid is (query tiles per window × windows,
//! heads)); each warp owns 16 query rows, keeps its Q fragments in registers,
//! and walks key tiles of 64 that the block stages in shared memory with
//! `cp.async` (keys of a window gathered by index arithmetic). `S = Q·Kᵀ` and
//! `O += P·V` are `mma.sync.m16n8k16` (bf16 in, f32 accumulate); K fragments
//! come from `ldmatrix`, V fragments from `ldmatrix.trans`; the softmax is
//! online (running max and sum per row, f32, quad reductions with
//! `shfl.bfly`), and the S accumulators are rounded to bf16 and reused in
//! registers as the A operand of `P·V`. The score matrix never leaves
//! registers. Key tiles stream through one K and one V buffer: K of the next
//! tile loads while `P·V` runs, V of the next tile while `S` runs (a 48 KiB
//! static-shared budget has no room for two 64-key tiles of both at head dim
//! 128). Causal blocks stop at their last query's diagonal; the per-element
//! mask runs only on tiles that reach past the block's smallest visible-key
//! limit (diagonal, ragged tail, edge windows). Kernel arguments: the q, k, v
//! and out pointers, in that order (16-byte aligned; out 8-byte). Invariants the generator relies on (checked by
//! [`FlashSpec::validate`]): `head_dim` is a multiple of 8 and ≤ 128 (a row is
//! whole 16-byte chunks; head dims that are not multiples of 16, like the
//! ViT's 104, are zero-padded to the next multiple of 16 in shared memory and
//! in the Q fragments), token and head strides are multiples of 8 elements and
//! the buffers 16-byte aligned (so every `cp.async` source is aligned), and
//! every query sees at least key 0 (true for every mask when `tk ≥ 1`), so the
//! running max is finite after the first tile and no `−∞ − (−∞)` arises.
//!
//! Numerics: P is rounded to bf16 before `P·V` (the dominant error, about
//! 2⁻⁹ relative per weight); the row sums use the unrounded f32 P.
//!
//! CPU paths: [`FlashSpec::run_cpu`] (fast: converts to f32 and reuses
//! [`crate::attention`], windows gathered and run in parallel) and
//! [`FlashSpec::reference`] (naive, f64, materialises the scores).

use qvc_codegen::{Addr, Cmp, Kernel, KernelBuilder, Reg, Space, Sreg, Ty};
use qvc_ir::Elems;
use rayon::prelude::*;

use crate::attention::{attention, AttnArgs, Mask as CpuMask};
use crate::spec::{Cost, KernelSpec, Launch};

/// Queries per block (4 warps × 16 rows).
const QT: u32 = 64;
/// Keys per shared-memory tile.
const KT: u32 = 64;
/// Threads per block.
const THREADS: u32 = 128;

/// Which keys a query sees (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlashMask {
    None,
    Causal { q_offset: u32 },
    Window { grid: (u32, u32), window: u32 },
}

/// How one of q, k, v is addressed: element `(token, head, d)` is at
/// `token·token_stride + head·head_stride + d` from the buffer's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Strides {
    pub token: u32,
    pub head: u32,
}

/// The output element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutDtype {
    Bf16,
    F32,
}

impl OutDtype {
    fn bytes(self) -> u32 {
        match self {
            OutDtype::Bf16 => 2,
            OutDtype::F32 => 4,
        }
    }
}

/// One fused attention kernel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FlashSpec {
    pub tq: u32,
    pub tk: u32,
    pub heads: u32,
    pub head_dim: u32,
    pub q: Strides,
    pub k: Strides,
    pub v: Strides,
    pub out: OutDtype,
    /// Multiplies `q·k` before the softmax (usually `1/√head_dim`).
    pub scale: f32,
    pub mask: FlashMask,
}

/// Why a spec or its buffers cannot be run.
#[derive(Clone, Debug, PartialEq)]
pub enum FlashError {
    /// The spec itself is unsupported; the string says which field and why.
    Spec(String),
    /// A buffer is shorter than the spec addresses.
    BufferTooShort { which: &'static str, need: usize, len: usize },
}

impl std::fmt::Display for FlashError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            FlashError::Spec(s) => write!(f, "invalid flash-attention spec: {s}"),
            FlashError::BufferTooShort { which, need, len } => {
                write!(f, "flash attention: buffer {which} has {len} elements, the spec reads {need}")
            }
        }
    }
}

impl std::error::Error for FlashError {}

/// Windows of a `gh × gw` grid: (windows down, windows across).
fn window_counts(grid: (u32, u32), window: u32) -> (u32, u32) {
    (grid.0.div_ceil(window), grid.1.div_ceil(window))
}

impl FlashSpec {
    /// A spec with `scale = 1/√head_dim` and bf16 output.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tq: u32,
        tk: u32,
        heads: u32,
        head_dim: u32,
        q: Strides,
        k: Strides,
        v: Strides,
        mask: FlashMask,
    ) -> Self {
        FlashSpec { tq, tk, heads, head_dim, q, k, v, out: OutDtype::Bf16, scale: 1.0 / (head_dim as f32).sqrt(), mask }
    }

    /// Checks the invariants the PTX generator and the CPU paths rely on.
    pub fn validate(&self) -> Result<(), FlashError> {
        let bad = |s: String| Err(FlashError::Spec(s));
        if self.tq == 0 || self.tk == 0 || self.heads == 0 {
            return bad(format!("tq {}, tk {}, heads {} must all be ≥ 1", self.tq, self.tk, self.heads));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(8) || self.head_dim > 128 {
            return bad(format!("head_dim {} must be a multiple of 8 in 8..=128", self.head_dim));
        }
        for (name, s) in [("q", self.q), ("k", self.k), ("v", self.v)] {
            if !s.token.is_multiple_of(8) || !s.head.is_multiple_of(8) {
                return bad(format!("{name} strides {s:?} must be multiples of 8 elements (16-byte rows)"));
            }
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return bad(format!("scale {} must be finite and > 0", self.scale));
        }
        if let FlashMask::Window { grid, window } = self.mask {
            if window == 0 || grid.0 == 0 || grid.1 == 0 {
                return bad(format!("window {window} and grid {grid:?} must be ≥ 1"));
            }
            let t = grid.0 as u64 * grid.1 as u64;
            if t != self.tq as u64 || t != self.tk as u64 {
                return bad(format!("window attention needs tq = tk = gh·gw = {t}, got {} and {}", self.tq, self.tk));
            }
        }
        if self.grid_x() as u64 > i32::MAX as u64 || self.heads > 65535 {
            return bad("grid too large".into());
        }
        Ok(())
    }

    fn grid_x(&self) -> u32 {
        match self.mask {
            FlashMask::Window { grid, window } => {
                let (ny, nx) = window_counts(grid, window);
                (window * window).div_ceil(QT) * ny * nx
            }
            _ => self.tq.div_ceil(QT),
        }
    }

    /// Number of (query, key) pairs attended, per head.
    pub fn visible_pairs(&self) -> u64 {
        let (tq, tk) = (self.tq as u64, self.tk as u64);
        match self.mask {
            FlashMask::None => tq * tk,
            FlashMask::Causal { q_offset } => (0..tq).map(|i| (q_offset as u64 + i + 1).min(tk)).sum(),
            FlashMask::Window { grid, window } => {
                let side = |n: u32| -> Vec<u64> {
                    (0..n.div_ceil(window)).map(|w| window.min(n - w * window) as u64).collect()
                };
                let (hs, ws) = (side(grid.0), side(grid.1));
                hs.iter().flat_map(|&h| ws.iter().map(move |&w| (h * w) * (h * w))).sum()
            }
        }
    }

    /// Number of keys query `i` sees, for the prefix masks; for windows the
    /// keys are not a prefix and this is not used.
    fn prefix_keys(&self, i: usize) -> usize {
        match self.mask {
            FlashMask::Causal { q_offset } => (q_offset as usize + i + 1).min(self.tk as usize),
            _ => self.tk as usize,
        }
    }

    /// Element count each of q, k, v must at least have.
    fn need(&self, s: Strides, tokens: u32) -> usize {
        (tokens as usize - 1) * s.token as usize + (self.heads as usize - 1) * s.head as usize + self.head_dim as usize
    }

    fn check_buffers(&self, q: &Elems, k: &Elems, v: &Elems, out: usize) -> Result<(), FlashError> {
        self.validate()?;
        let checks = [
            ("q", self.need(self.q, self.tq), q.len()),
            ("k", self.need(self.k, self.tk), k.len()),
            ("v", self.need(self.v, self.tk), v.len()),
            ("out", (self.tq * self.heads * self.head_dim) as usize, out),
        ];
        for (which, need, len) in checks {
            if len < need || (which == "out" && len != need) {
                return Err(FlashError::BufferTooShort { which, need, len });
            }
        }
        Ok(())
    }

    /// Tokens `[t, heads, hd]` gathered from a strided tensor into contiguous f32.
    fn gather(&self, src: &Elems, s: Strides, tokens: impl Iterator<Item = usize>) -> Vec<f32> {
        let (heads, hd) = (self.heads as usize, self.head_dim as usize);
        let mut out = Vec::with_capacity(tokens.size_hint().0 * heads * hd);
        for t in tokens {
            for h in 0..heads {
                let base = t * s.token as usize + h * s.head as usize;
                let r = base..base + hd;
                // One dtype dispatch per row so the widening loop vectorises.
                match src {
                    Elems::F32(x) => out.extend_from_slice(&x[r]),
                    Elems::BF16(x) => out.extend(x[r].iter().map(|v| f32::from_bits((v.to_bits() as u32) << 16))),
                    Elems::F16(x) => out.extend(x[r].iter().map(|v| v.to_f32())),
                    Elems::Q4(_) => out.extend(r.map(|i| src.get(i))),
                }
            }
        }
        out
    }

    /// crate::attention's arguments for contiguous `[t, heads, hd]` f32 buffers.
    #[allow(clippy::too_many_arguments)]
    fn cpu_args<'b>(
        &self,
        q: &'b [f32],
        k: &'b [f32],
        v: &'b [f32],
        tq: usize,
        tk: usize,
        mask: CpuMask,
    ) -> AttnArgs<'b> {
        let (heads, d) = (self.heads as usize, self.head_dim as usize);
        AttnArgs { q, q_stride: heads * d, k, v, kv_stride: heads * d, tq, tk, heads, d, scale: self.scale, mask }
    }

    /// The fast CPU implementation (f32 arithmetic): q/k/v in any of the
    /// stored dtypes, out `[tq, heads, hd]` f32.
    pub fn run_cpu(&self, q: Elems, k: Elems, v: Elems, out: &mut [f32]) -> Result<(), FlashError> {
        self.check_buffers(&q, &k, &v, out.len())?;
        let (tq, tk, heads, d) = (self.tq as usize, self.tk as usize, self.heads as usize, self.head_dim as usize);
        let hd = heads * d;
        match self.mask {
            FlashMask::None | FlashMask::Causal { .. } => {
                let qf = self.gather(&q, self.q, 0..tq);
                let kf = self.gather(&k, self.k, 0..tk);
                let vf = self.gather(&v, self.v, 0..tk);
                // Causal: the first `n1` queries see a prefix that ends at their
                // own position, which is crate::attention's causal alignment when
                // the keys are cut to q_offset + n1; the rest see every key.
                let n1 = match self.mask {
                    FlashMask::Causal { q_offset } => tq.min(tk.saturating_sub(q_offset as usize)),
                    _ => 0,
                };
                if n1 > 0 {
                    let keys = self.prefix_keys(n1 - 1);
                    attention(&self.cpu_args(&qf, &kf, &vf, n1, keys, CpuMask::Causal), &mut out[..n1 * hd]);
                }
                if n1 < tq {
                    attention(
                        &self.cpu_args(&qf[n1 * hd..], &kf, &vf, tq - n1, tk, CpuMask::None),
                        &mut out[n1 * hd..],
                    );
                }
            }
            FlashMask::Window { grid, window } => {
                let windows = window_tokens(grid, window);
                let results: Vec<Vec<f32>> = windows
                    .par_iter()
                    .map(|toks| {
                        let n = toks.len();
                        let qf = self.gather(&q, self.q, toks.iter().copied());
                        let kf = self.gather(&k, self.k, toks.iter().copied());
                        let vf = self.gather(&v, self.v, toks.iter().copied());
                        let mut o = vec![0f32; n * hd];
                        attention(&self.cpu_args(&qf, &kf, &vf, n, n, CpuMask::None), &mut o);
                        o
                    })
                    .collect();
                for (toks, o) in windows.iter().zip(&results) {
                    for (r, &t) in toks.iter().enumerate() {
                        out[t * hd..(t + 1) * hd].copy_from_slice(&o[r * hd..(r + 1) * hd]);
                    }
                }
            }
        }
        Ok(())
    }

    /// The naive reference: for each (query, head), the f64 scores of every
    /// visible key, a max-subtracted softmax, and the weighted sum of values.
    pub fn reference(&self, q: Elems, k: Elems, v: Elems, out: &mut [f32]) -> Result<(), FlashError> {
        self.check_buffers(&q, &k, &v, out.len())?;
        let (tq, tk, heads, d) = (self.tq as usize, self.tk as usize, self.heads as usize, self.head_dim as usize);
        let sees = |i: usize, j: usize| -> bool {
            match self.mask {
                FlashMask::None => true,
                FlashMask::Causal { q_offset } => j <= q_offset as usize + i,
                FlashMask::Window { grid, window } => {
                    let (gw, w) = (grid.1 as usize, window as usize);
                    let (qy, qx) = (i / gw, i % gw);
                    let (ky, kx) = (j / gw, j % gw);
                    qy / w == ky / w && qx / w == kx / w
                }
            }
        };
        let at = |e: &Elems, s: Strides, t: usize, h: usize, c: usize| {
            e.get(t * s.token as usize + h * s.head as usize + c) as f64
        };
        for i in 0..tq {
            for h in 0..heads {
                let keys: Vec<usize> = (0..tk).filter(|&j| sees(i, j)).collect();
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        (0..d).map(|c| at(&q, self.q, i, h, c) * at(&k, self.k, j, h, c)).sum::<f64>()
                            * self.scale as f64
                    })
                    .collect();
                let mx = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                let total: f64 = p.iter().sum();
                for c in 0..d {
                    let acc: f64 = keys.iter().zip(&p).map(|(&j, &pj)| pj * at(&v, self.v, j, h, c)).sum();
                    out[(i * heads + h) * d + c] = (acc / total) as f32;
                }
            }
        }
        Ok(())
    }

    /// Generates the PTX kernel (see the module docs for its structure).
    fn generate(&self) -> Kernel {
        self.validate().expect("FlashSpec::build on an invalid spec");
        Gen::new(self).run()
    }
}

/// The token indices of every window, window by window in row-major order of
/// windows, tokens row-major inside each window.
pub fn window_tokens(grid: (u32, u32), window: u32) -> Vec<Vec<usize>> {
    let (gh, gw, w) = (grid.0 as usize, grid.1 as usize, window as usize);
    let mut out = vec![];
    for wy in (0..gh).step_by(w) {
        for wx in (0..gw).step_by(w) {
            let mut toks = vec![];
            for y in wy..(wy + w).min(gh) {
                for x in wx..(wx + w).min(gw) {
                    toks.push(y * gw + x);
                }
            }
            out.push(toks);
        }
    }
    out
}

impl KernelSpec for FlashSpec {
    fn name(&self) -> String {
        let s = |s: Strides| format!("{}_{}", s.token, s.head);
        let mask = match self.mask {
            FlashMask::None => "full".to_string(),
            FlashMask::Causal { q_offset } => format!("causal{q_offset}"),
            FlashMask::Window { grid, window } => format!("win{}x{}w{}", grid.0, grid.1, window),
        };
        let out = match self.out {
            OutDtype::Bf16 => "bf16",
            OutDtype::F32 => "f32",
        };
        format!(
            "flash_attn_{mask}_q{}_k{}_h{}_d{}_qs{}_ks{}_vs{}_{out}_sc{:08x}",
            self.tq,
            self.tk,
            self.heads,
            self.head_dim,
            s(self.q),
            s(self.k),
            s(self.v),
            self.scale.to_bits()
        )
    }

    fn build(&self) -> Kernel {
        self.generate()
    }

    fn launch(&self) -> Launch {
        Launch::new([self.grid_x(), self.heads, 1], [THREADS, 1, 1])
    }

    fn cost(&self) -> Cost {
        let (hd, heads) = (self.head_dim as u64, self.heads as u64);
        let elems = |t: u32| t as u64 * heads * hd;
        Cost {
            flops: 4 * self.visible_pairs() * hd * heads,
            bytes: 2 * (elems(self.tq) + 2 * elems(self.tk)) + self.out.bytes() as u64 * elems(self.tq),
        }
    }
}

/// Per query row (a lane owns rows `g` and `g + 8` of its warp's 16).
struct Row {
    /// The row is a real query (stored at the end).
    valid: Reg,
    /// Its token (clamped to a real one, so loads stay in bounds).
    tok: Reg,
    /// Keys `0..limit` (tile-local key index space) are visible.
    limit: Reg,
}

/// How a block maps key indices to tokens.
enum KeyMap {
    /// Key `j` is token `j`.
    Identity,
    /// Key `j` of the window is token `base + (j / ww)·gw + j % ww`.
    Window { base: Reg, ww: Reg, gw: u32 },
}

/// What staging a K or V tile needs.
struct Stage {
    tid: Reg,
    /// Keys `0..kcount` exist (the rest of a tile is zero-filled).
    kcount: Reg,
    hd: u32,
    rs: u32,
}

/// The generator's state: the spec's constants and the block-wide registers.
struct Gen<'a> {
    s: &'a FlashSpec,
    b: KernelBuilder,
    /// Head dim padded to a multiple of 16.
    hdp: u32,
    /// Shared-memory row stride in bytes (padded by 16 so that ldmatrix rows
    /// of consecutive keys fall in different banks).
    rs: u32,
}

impl<'a> Gen<'a> {
    fn new(s: &'a FlashSpec) -> Self {
        let hdp = s.head_dim.div_ceil(16) * 16;
        Gen { s, b: KernelBuilder::new(s.name()), hdp, rs: hdp * 2 + 16 }
    }

    /// Token of key `j` (must be a valid key index).
    fn key_token(&mut self, map: &KeyMap, j: Reg) -> Reg {
        let b = &mut self.b;
        match *map {
            KeyMap::Identity => j,
            KeyMap::Window { base, ww, gw } => {
                let r = b.div(Ty::U32, j, ww);
                let c = b.rem(Ty::U32, j, ww);
                let t = b.mad(Ty::U32, r, gw, c);
                b.add(Ty::U32, t, base)
            }
        }
    }

    /// Issues the `cp.async`s that stage tile `t` of K or V (`sbase` ← the
    /// tensor at `gbase` with strides `st`) and commits them as one group.
    /// Chunk id → (key row, 16-byte column chunk); keys past the count are
    /// zero-filled (source size 0) from a clamped, valid address.
    #[allow(clippy::too_many_arguments)]
    fn issue(&mut self, stage: &Stage, map: &KeyMap, t: Reg, sbase: Reg, gbase: Reg, st: Strides) {
        let ch = stage.hd / 8;
        let nch = KT * ch;
        let b = &mut self.b;
        let kt0 = b.shl(Ty::B32, t, 6);
        let kmax = b.sub(Ty::U32, stage.kcount, 1);
        for it in 0..nch.div_ceil(THREADS) {
            let b = &mut self.b;
            let id = b.add(Ty::U32, stage.tid, it * THREADS);
            let row = b.div(Ty::U32, id, ch);
            let c = b.rem(Ty::U32, id, ch);
            let so1 = b.mul(Ty::U32, row, stage.rs);
            let soff = b.mad(Ty::U32, c, 16, so1);
            let j = b.add(Ty::U32, kt0, row);
            let ok = b.setp(Cmp::Lt, Ty::U32, j, stage.kcount);
            let nbytes = b.selp(Ty::U32, 16, 0, ok);
            let jc = b.min(Ty::U32, j, kmax);
            let tok = self.key_token(map, jc);
            let b = &mut self.b;
            let cb = b.mul_wide_u32(c, 16);
            let sa = b.add(Ty::U32, sbase, soff);
            let ga1 = b.index_addr(gbase, tok, st.token * 2);
            let ga = b.add(Ty::U64, ga1, cb);
            let args = vec![Addr::reg(sa, 0).into(), Addr::reg(ga, 0).into(), 16i64.into(), nbytes.into()];
            if (it + 1) * THREADS > nch {
                let inr = b.setp(Cmp::Lt, Ty::U32, id, nch);
                b.ins_if(inr, false, "cp.async.cg.shared.global", args);
            } else {
                b.ins("cp.async.cg.shared.global", args);
            }
        }
        self.b.cp_async_commit();
    }

    /// [`issue`](Self::issue) unless `skip` (block-uniform), committing an
    /// empty group then so that the group count stays regular.
    #[allow(clippy::too_many_arguments)]
    fn issue_unless(&mut self, stage: &Stage, map: &KeyMap, skip: Reg, t: Reg, sbase: Reg, gbase: Reg, st: Strides) {
        let b = &mut self.b;
        let empty = b.label("empty_group");
        let joined = b.label("issued");
        b.bra_if(skip, false, &empty);
        self.issue(stage, map, t, sbase, gbase, st);
        let b = &mut self.b;
        b.bra(&joined);
        b.place(&empty);
        b.cp_async_commit();
        b.place(&joined);
    }

    fn run(mut self) -> Kernel {
        let s = *self.s;
        let (hd, hdp, rs) = (s.head_dim, self.hdp, self.rs);
        let sl2 = s.scale * std::f32::consts::LOG2_E;
        let b = &mut self.b;
        b.max_threads(THREADS);
        let qp = b.ptr_param("q");
        let kp = b.ptr_param("k");
        let vp = b.ptr_param("v");
        let op = b.ptr_param("out");
        let ks = b.shared("ks", KT * rs, 128);
        let vs = b.shared("vs", KT * rs, 128);
        let tid = b.special(Sreg::TidX);
        let bx = b.special(Sreg::CtaidX);
        let head = b.special(Sreg::CtaidY);
        let lane = b.and(Ty::B32, tid, 31);
        let warp = b.shr(Ty::U32, tid, 5);
        let g = b.shr(Ty::U32, lane, 2);
        let t4 = b.and(Ty::B32, lane, 3);
        let exit = b.label("exit");

        // Block → queries, per-row limits, key count and tile count.
        let row_in_block = b.mad(Ty::U32, warp, 16, g); // + 8 for the second row
        let (rows, kcount, ntiles, map, lo) = match s.mask {
            FlashMask::None | FlashMask::Causal { .. } => {
                let q0 = b.mul(Ty::U32, bx, QT);
                let i0 = b.add(Ty::U32, q0, row_in_block);
                let mut rows = vec![];
                for r in 0..2u32 {
                    let i = b.add(Ty::U32, i0, 8 * r);
                    let valid = b.setp(Cmp::Lt, Ty::U32, i, s.tq);
                    let tok = b.min(Ty::U32, i, s.tq - 1);
                    let limit = match s.mask {
                        FlashMask::Causal { q_offset } => {
                            let p = b.add(Ty::U32, i, q_offset + 1);
                            b.min(Ty::U32, p, s.tk)
                        }
                        _ => b.mov(Ty::U32, s.tk),
                    };
                    rows.push(Row { valid, tok, limit });
                }
                let kcount = b.mov(Ty::U32, s.tk);
                let ntiles = match s.mask {
                    FlashMask::Causal { q_offset } => {
                        // Tiles entirely above the diagonal of the block's last query are skipped.
                        let e = b.add(Ty::U32, q0, QT);
                        let qend = b.min(Ty::U32, e, s.tq);
                        let kend = b.add(Ty::U32, qend, q_offset);
                        let kvis = b.min(Ty::U32, kend, s.tk);
                        let k63 = b.add(Ty::U32, kvis, KT - 1);
                        b.shr(Ty::U32, k63, 6)
                    }
                    _ => b.mov(Ty::U32, s.tk.div_ceil(KT)),
                };
                // The block's smallest row limit: its first row's.
                let lo = match s.mask {
                    FlashMask::Causal { q_offset } => {
                        let p = b.add(Ty::U32, q0, q_offset + 1);
                        b.min(Ty::U32, p, s.tk)
                    }
                    _ => kcount,
                };
                (rows, kcount, ntiles, KeyMap::Identity, lo)
            }
            FlashMask::Window { grid, window: w } => {
                let (gh, gw) = grid;
                let (_, nwx) = window_counts(grid, w);
                let qtpw = (w * w).div_ceil(QT);
                let win = b.div(Ty::U32, bx, qtpw);
                let qt = b.rem(Ty::U32, bx, qtpw);
                let wy = b.div(Ty::U32, win, nwx);
                let wx = b.rem(Ty::U32, win, nwx);
                let y0 = b.mul(Ty::U32, wy, w);
                let x0 = b.mul(Ty::U32, wx, w);
                let hleft = b.sub(Ty::U32, gh, y0);
                let wh = b.min(Ty::U32, hleft, w);
                let wleft = b.sub(Ty::U32, gw, x0);
                let ww = b.min(Ty::U32, wleft, w);
                let wsize = b.mul(Ty::U32, wh, ww);
                let base = b.mad(Ty::U32, y0, gw, x0);
                // Query tiles past this (edge) window's size have nothing to do;
                // the whole block leaves together, before any barrier.
                let q0 = b.mul(Ty::U32, qt, QT);
                let idle = b.setp(Cmp::Ge, Ty::U32, q0, wsize);
                b.bra_if(idle, false, &exit);
                let i0 = b.add(Ty::U32, q0, row_in_block);
                let last = b.sub(Ty::U32, wsize, 1);
                let map = KeyMap::Window { base, ww, gw };
                let mut rows = vec![];
                for r in 0..2u32 {
                    let i = self.b.add(Ty::U32, i0, 8 * r);
                    let valid = self.b.setp(Cmp::Lt, Ty::U32, i, wsize);
                    let ic = self.b.min(Ty::U32, i, last);
                    let tok = self.key_token(&map, ic);
                    rows.push(Row { valid, tok, limit: wsize });
                }
                let b = &mut self.b;
                let k63 = b.add(Ty::U32, wsize, KT - 1);
                let ntiles = b.shr(Ty::U32, k63, 6);
                (rows, wsize, ntiles, map, wsize)
            }
        };
        let b = &mut self.b;

        // Q fragments (A operand, rows g and g+8, 16 columns per k-step),
        // loaded once straight from global; columns ≥ head_dim are zero.
        let qh = b.index_addr(qp, head, s.q.head * 2);
        let t4x4 = b.mul_wide_u32(t4, 4);
        let mut qrow = vec![];
        for row in &rows {
            let a = b.index_addr(qh, row.tok, s.q.token * 2);
            qrow.push(b.add(Ty::U64, a, t4x4));
        }
        let mut qf: Vec<[Reg; 4]> = vec![];
        for kk in 0..hdp / 16 {
            let mut f = [qp; 4];
            for (i, (r, cb)) in [(0, kk * 16), (1, kk * 16), (0, kk * 16 + 8), (1, kk * 16 + 8)].into_iter().enumerate()
            {
                f[i] = if cb < hd {
                    b.ld(Space::GlobalNc, Ty::B32, Addr::reg(qrow[r], cb as i64 * 2))
                } else {
                    b.mov(Ty::B32, 0)
                };
            }
            qf.push(f);
        }

        // Zero the padding columns (head_dim..hdp) of both tiles once: cp.async
        // never writes them and ldmatrix reads them (K's must be finite zeros).
        let pad = (hdp - hd) / 8;
        if pad > 0 {
            let z = b.mov(Ty::B32, 0);
            let n = KT * pad;
            for it in 0..n.div_ceil(THREADS) {
                let id = b.add(Ty::U32, tid, it * THREADS);
                let row = b.div(Ty::U32, id, pad);
                let c = b.rem(Ty::U32, id, pad);
                let o1 = b.mul(Ty::U32, row, rs);
                let o2 = b.mad(Ty::U32, c, 16, o1);
                let off = b.add(Ty::U32, o2, hd * 2);
                let inr = b.setp(Cmp::Lt, Ty::U32, id, n);
                for base in [ks, vs] {
                    let a = b.add(Ty::U32, base, off);
                    b.ins_if(inr, false, "st.shared.v4.b32", vec![Addr::reg(a, 0).into(), vec![z, z, z, z].into()]);
                }
            }
        }

        // Per-lane ldmatrix offsets (see the module docs of the fragment layouts):
        // K (non-transposed): lane L addresses key ((L>>4)&1)*8 + (L&7), column block (L>>3)&1.
        // V (.trans): key ((L>>3)&1)*8 + (L&7), column block (L>>4)&1.
        let l7 = b.and(Ty::B32, lane, 7);
        let l8 = b.and(Ty::B32, lane, 8);
        let l16 = b.and(Ty::B32, lane, 16);
        let l16s = b.shr(Ty::U32, l16, 1); // 8 if bit 4
        let krow = b.add(Ty::U32, l7, l16s);
        let kcol = b.shl(Ty::B32, l8, 1); // 16 bytes if bit 3
        let ko = b.mad(Ty::U32, krow, rs, kcol);
        let kbase = b.add(Ty::U32, ks, ko);
        let vrow = b.add(Ty::U32, l7, l8);
        let vo1 = b.mul(Ty::U32, vrow, rs);
        let vo = b.add(Ty::U32, vo1, l16); // 16 bytes if bit 4
        let vbase = b.add(Ty::U32, vs, vo);

        let kh = b.index_addr(kp, head, s.k.head * 2);
        let vh = b.index_addr(vp, head, s.v.head * 2);

        // Loop-carried state: running max m and lane-partial sum l per row, O accumulators.
        let ninf = f32::NEG_INFINITY;
        let m: Vec<Reg> = (0..2).map(|_| b.mov(Ty::F32, ninf)).collect();
        let l: Vec<Reg> = (0..2).map(|_| b.mov(Ty::F32, 0.0f32)).collect();
        let o: Vec<[Reg; 4]> = (0..hdp / 8).map(|_| [0; 4].map(|_: i32| b.mov(Ty::F32, 0.0f32))).collect::<Vec<_>>();

        // Pipeline (one K and one V buffer, each reloaded as soon as every warp
        // is done with it): K(t+1) streams in during P·V of tile t, V(t+1)
        // during S of tile t+1. Groups are committed in the order K0 V0 K1 V1 …
        // (empty groups past the last tile keep the count regular), so
        // `wait_group 1` always means "all but the newest group": the buffer
        // about to be read has landed.
        let stage = Stage { tid, kcount, hd, rs };
        let zero = b.mov(Ty::U32, 0);
        self.issue(&stage, &map, zero, ks, kh, s.k);
        self.issue(&stage, &map, zero, vs, vh, s.v);
        let b = &mut self.b;
        let t = b.mov(Ty::U32, 0);
        let top = b.label("ktile");
        let done = b.label("ktile_end");
        b.place(&top);
        let fin = b.setp(Cmp::Ge, Ty::U32, t, ntiles);
        b.bra_if(fin, false, &done);
        let kt0 = b.shl(Ty::B32, t, 6);
        let next = b.add(Ty::U32, t, 1);
        let last = b.setp(Cmp::Ge, Ty::U32, next, ntiles);
        b.cp_async_wait(1);
        b.bar_sync();

        // S = Q·Kᵀ for this warp's 16 rows × 64 keys (8 n-tiles of 8 keys).
        let mut sacc: Vec<[Reg; 4]> = (0..KT / 8).map(|_| [0; 4].map(|_: i32| b.mov(Ty::F32, 0.0f32))).collect();
        for (kk, qa) in qf.iter().enumerate() {
            for np in 0..KT / 16 {
                let r = b.ldmatrix(4, false, Addr::reg(kbase, (np * 16 * rs + kk as u32 * 32) as i64));
                for (half, nt) in [(0, 2 * np), (1, 2 * np + 1)] {
                    let acc = sacc[nt as usize];
                    b.mma_m16n8k16(Ty::BF16, &acc, qa, &[r[2 * half], r[2 * half + 1]], &acc);
                }
            }
        }

        // Mask: key kt0 + n*8 + 2*t4 + e is visible to row r iff < limit_r.
        // Only tiles reaching past the block's smallest limit `lo` need it
        // (a block-uniform branch; the scores are overwritten in place so both
        // paths leave them in the same registers).
        let needs_mask = !matches!(s.mask, FlashMask::None) || !s.tk.is_multiple_of(KT);
        if needs_mask {
            let unmasked = b.label("unmasked");
            let end = b.add(Ty::U32, kt0, KT);
            let full = b.setp(Cmp::Le, Ty::U32, end, lo);
            b.bra_if(full, false, &unmasked);
            let t2 = b.shl(Ty::B32, t4, 1);
            let jb = b.add(Ty::U32, kt0, t2);
            for (r, row) in rows.iter().enumerate() {
                let rem = b.sub(Ty::S32, row.limit, jb);
                for (n, acc) in sacc.iter().enumerate() {
                    for e in 0..2 {
                        let vis = b.setp(Cmp::Gt, Ty::S32, rem, (n * 8 + e) as i64);
                        let x = acc[2 * r + e];
                        b.ins("selp.f32", vec![x.into(), x.into(), ninf.into(), vis.into()]);
                    }
                }
            }
            b.place(&unmasked);
        }

        // Online softmax per row: new max over the quad, rescale l and O,
        // p = 2^(s·scale·log2e − m·scale·log2e).
        for r in 0..2 {
            let mut mx = sacc[0][2 * r];
            for (n, acc) in sacc.iter().enumerate() {
                for e in 0..2 {
                    if n + e > 0 {
                        mx = b.max(Ty::F32, mx, acc[2 * r + e]);
                    }
                }
            }
            for sh in [1, 2] {
                let o2 = b.shfl_bfly(mx, sh);
                mx = b.max(Ty::F32, mx, o2);
            }
            let mnew = b.max(Ty::F32, m[r], mx);
            let dm = b.sub(Ty::F32, m[r], mnew);
            let dms = b.mul(Ty::F32, dm, sl2);
            let corr = b.ex2(dms);
            b.assign(Ty::F32, m[r], mnew);
            let nms = b.mul(Ty::F32, mnew, -sl2);
            let mut sum = None;
            for acc in sacc.iter_mut() {
                for e in 0..2 {
                    let x = b.mad(Ty::F32, acc[2 * r + e], sl2, nms);
                    let p = b.ex2(x);
                    acc[2 * r + e] = p;
                    sum = Some(match sum {
                        None => p,
                        Some(s0) => b.add(Ty::F32, s0, p),
                    });
                }
            }
            let sum = sum.expect("KT > 0");
            b.ins("fma.rn.f32", vec![l[r].into(), l[r].into(), corr.into(), sum.into()]);
            for acc in &o {
                for e in 0..2 {
                    b.bin_into("mul", Ty::F32, acc[2 * r + e], acc[2 * r + e], corr);
                }
            }
        }

        // P (bf16) as the A operand: key chunk kc = n-tiles 2kc, 2kc+1.
        let pa: Vec<[Reg; 4]> = (0..KT / 16)
            .map(|kc| {
                let (x, y) = (sacc[2 * kc as usize], sacc[2 * kc as usize + 1]);
                [
                    b.pack_half2(Ty::BF16x2, x[0], x[1]),
                    b.pack_half2(Ty::BF16x2, x[2], x[3]),
                    b.pack_half2(Ty::BF16x2, y[0], y[1]),
                    b.pack_half2(Ty::BF16x2, y[2], y[3]),
                ]
            })
            .collect();

        // Every warp is done reading K(t): refill it with K(t+1).
        b.bar_sync();
        self.issue_unless(&stage, &map, last, next, ks, kh, s.k);
        let b = &mut self.b;
        b.cp_async_wait(1);
        b.bar_sync();
        // O += P·V: V fragments through ldmatrix.trans, two d n-tiles per load.
        for (kc, a) in pa.iter().enumerate() {
            for dp in 0..hdp / 16 {
                let r = b.ldmatrix(4, true, Addr::reg(vbase, (kc as u32 * 16 * rs + dp * 32) as i64));
                for (half, dn) in [(0, 2 * dp), (1, 2 * dp + 1)] {
                    let acc = o[dn as usize];
                    b.mma_m16n8k16(Ty::BF16, &acc, a, &[r[2 * half], r[2 * half + 1]], &acc);
                }
            }
        }
        // Every warp is done reading V(t): refill it with V(t+1).
        b.bar_sync();
        self.issue_unless(&stage, &map, last, next, vs, vh, s.v);
        let b = &mut self.b;
        b.bin_into("add", Ty::U32, t, t, 1);
        b.bra(&top);
        b.place(&done);

        // Epilogue: total row sums over the quad, normalise, store valid rows.
        let esz = s.out.bytes();
        let oh = b.index_addr(op, head, hd * esz);
        let t4o = b.mul_wide_u32(t4, 2 * esz);
        for (r, row) in rows.iter().enumerate() {
            let mut tot = l[r];
            for sh in [1, 2] {
                let o2 = b.shfl_bfly(tot, sh);
                tot = b.add(Ty::F32, tot, o2);
            }
            let inv = b.rcp(tot);
            let a1 = b.index_addr(oh, row.tok, s.heads * hd * esz);
            let orow = b.add(Ty::U64, a1, t4o);
            for (dn, acc) in o.iter().enumerate() {
                let col = dn as u32 * 8;
                if col >= hd {
                    continue;
                }
                let x0 = b.mul(Ty::F32, acc[2 * r], inv);
                let x1 = b.mul(Ty::F32, acc[2 * r + 1], inv);
                let addr = Addr::reg(orow, (col * esz) as i64);
                match s.out {
                    OutDtype::Bf16 => {
                        let pk = b.pack_half2(Ty::BF16x2, x0, x1);
                        b.ins_if(row.valid, false, "st.global.b32", vec![addr.into(), pk.into()]);
                    }
                    OutDtype::F32 => {
                        b.ins_if(row.valid, false, "st.global.v2.f32", vec![addr.into(), vec![x0, x1].into()]);
                    }
                }
            }
        }
        b.place(&exit);
        b.ret();
        self.b.finish()
    }
}

/// The attention kernels the Qwen-VL programs use.
pub fn model_specs() -> Vec<FlashSpec> {
    // ViT (width 1664, 16 heads of 104): in_proj output `[tokens, heads, 3·104]`,
    // the q, k, v pointers are the buffer at element offsets 0, 104, 208.
    let vit = Strides { token: 3 * 1664, head: 3 * 104 };
    let vit_spec = |t: u32, mask| FlashSpec::new(t, t, 16, 104, vit, vit, vit, mask);
    // Adapter: 256 learned queries `[256, 4096]`; k and v from one fused
    // `[1024, 2·4096]` projection of the image features (k then v per token).
    let aq = Strides { token: 4096, head: 128 };
    let akv = Strides { token: 2 * 4096, head: 128 };
    // Decoder: q as the rotary kernel writes it (`gpu::rotary`: head-major
    // `[32, t, 128]`), k/v from the KV cache `[32, 8192, 128]` (the rotary
    // kernel's cache) after the new tokens were appended.
    let dq = |t: u32| Strides { token: 128, head: t * 128 };
    let cache = Strides { token: 128, head: 8192 * 128 };
    // A prefill chunk after cached rows as the runtime lowers it
    // (`Session::extend` on a device KV cache): q dense `[t, 32, 128]`, k/v
    // the sequence's slot of a 2048-row cache read in place, causal offset
    // = the cached rows (the server's second 512-row chunk).
    let dense = Strides { token: 4096, head: 128 };
    let slot = Strides { token: 128, head: 2048 * 128 };
    vec![
        vit_spec(1024, FlashMask::None),
        vit_spec(4096, FlashMask::None),
        vit_spec(4096, FlashMask::Window { grid: (64, 64), window: 16 }),
        vit_spec(4096, FlashMask::Window { grid: (64, 64), window: 8 }),
        FlashSpec::new(256, 1024, 32, 128, aq, akv, akv, FlashMask::None),
        FlashSpec::new(300, 300, 32, 128, dq(300), cache, cache, FlashMask::Causal { q_offset: 0 }),
        FlashSpec::new(64, 364, 32, 128, dq(64), cache, cache, FlashMask::Causal { q_offset: 300 }),
        FlashSpec::new(512, 1024, 32, 128, dense, slot, slot, FlashMask::Causal { q_offset: 512 }),
    ]
}
