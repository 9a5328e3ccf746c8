//! Multi-head scaled dot-product attention, f32:
//! `out[i, h] = Σ_j softmax_j(scale · q[i, h] · k[j, h]) · v[j, h]` over the keys
//! `j` that query `i` may see.
//!
//! Layout: `q` is `[tq, heads, d]`, `k`/`v` are `[tk, heads, d]`, each token's
//! `heads·d` values contiguous but tokens `q_stride` / `kv_stride` elements
//! apart, so a KV cache or an interleaved qkv buffer is read in place. `out`
//! is `[tq, heads, d]` contiguous.
//!
//! Masks: [`Mask::Causal`] aligns the queries with the *end* of the keys:
//! query `i` sits at absolute position `tk − tq + i` and sees keys `0..=` that
//! position (decode: `tq = 1` sees everything). A query that sees no key
//! (only possible when `tq > tk`) gets a zero output.
//!
//! [`attention_with_past`] reads a KV cache and the new keys as two
//! segments, so a decode step never copies the cache.
//!
//! Fast path (flash-attention style): every head's keys and values are
//! packed once into GEMM panels, then tasks (head, block of `QB` queries)
//! run in parallel. Each packs its queries once and walks the visible keys
//! in blocks of `KB`: scores `S = Q·Kᵀ` as micro-kernel tiles over the
//! packed panels (`gemm::PanelGemm`), scaled and masked, then an online softmax
//! (running max `m` and sum `l` per query, rescaling the partial output when
//! the max grows) and `O += P·V`. Scratch is kept per thread; nothing is
//! allocated per task or key block. A single
//! query (a decode step) runs the `decode` submodule instead: chunks of keys
//! over groups of heads, each key row read once, merged per head.

mod decode;

use crate::act::exp_f32;
use crate::common::{par_for, worth_parallel, Isa, SyncPtr};
use crate::gemm::{bf16_products_pay, MatRef, PanelGemm};
use crate::math::{cpu_math, CpuMath};
use crate::softmax::{exp_sub_sum, exp_sub_sum16, row_max_lanes};
use half::bf16;
use qvc_ir::Elems;
use std::cell::RefCell;
use std::thread::LocalKey;

/// Queries per task: enough rows for full micro-kernel tiles, and to
/// amortise a task's own packing of key blocks where they are not packed
/// once per call ([`PREPACK_MAX_BYTES`]). Measured on the ViT's 1024×16×104
/// attention, 2 threads, Zen 5, when every task packed its key blocks: 64
/// rows 32 ms a call, 128 rows 28.6, 256 rows 30.
const QB: usize = 128;
/// Keys per block: the `QB×KB` score tile (128 KiB) stays in L2.
const KB: usize = 256;

/// Which keys a query sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mask {
    /// Every key.
    None,
    /// Keys up to the query's absolute position `tk − tq + i`.
    Causal,
}

/// Arguments of [`attention`] (see the module docs for the layout).
#[derive(Clone, Copy, Debug)]
pub struct AttnArgs<'a> {
    pub q: &'a [f32],
    /// Elements between consecutive query tokens (≥ heads·d).
    pub q_stride: usize,
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// Elements between consecutive key/value tokens (≥ heads·d).
    pub kv_stride: usize,
    pub tq: usize,
    pub tk: usize,
    pub heads: usize,
    pub d: usize,
    pub scale: f32,
    pub mask: Mask,
}

impl AttnArgs<'_> {
    /// Number of keys query `i` sees (a prefix `0..n` of the keys).
    #[inline]
    fn visible(&self, i: usize) -> usize {
        match self.mask {
            Mask::None => self.tk,
            // position tk − tq + i, so keys 0..tk − tq + i + 1, clamped to 0..=tk.
            Mask::Causal => (self.tk + i + 1).saturating_sub(self.tq).min(self.tk),
        }
    }

    fn check(&self, out: &[f32]) {
        let hd = self.heads * self.d;
        assert_eq!(out.len(), self.tq * hd, "attention: out must be [tq, heads, d]");
        assert!(self.q_stride >= hd && self.kv_stride >= hd, "attention: token strides must be ≥ heads·d = {hd}");
        if hd == 0 {
            return;
        }
        if self.tq > 0 {
            assert!(self.q.len() >= (self.tq - 1) * self.q_stride + hd, "attention: q is too short");
        }
        if self.tk > 0 {
            let need = (self.tk - 1) * self.kv_stride + hd;
            assert!(self.k.len() >= need && self.v.len() >= need, "attention: k or v is too short");
        }
    }
}

/// Attention on the best code path for this CPU, in the process's
/// [`cpu_math`] mode (see [`attention_with_math`]).
pub fn attention(args: &AttnArgs, out: &mut [f32]) {
    attention_with_math(Isa::detect(), cpu_math(), args, out)
}

/// [`attention`] on a chosen code path, exact (for tests and benchmarks).
pub fn attention_with_isa(isa: Isa, args: &AttnArgs, out: &mut [f32]) {
    attention_with_math(isa, CpuMath::Exact, args, out)
}

/// [`attention`] on a chosen code path and arithmetic. [`CpuMath::Fast`]
/// on an AVX-512 path of a CPU where bf16 products outrun the f32 FMAs
/// ([`bf16_products_pay`]: AMX, or a fast `vdpbf16ps`), with more than one query:
/// k and v are rounded to bf16 (nearest even) once, and both products of
/// every block run as `vdpbf16ps` GEMMs (q and the probabilities rounded to
/// bf16 as they are packed, sums in f32), as the Linears do in that mode:
/// about twice the f32 rate on the vision tower's attention. Otherwise, and
/// for a single query (a decode step, bound by reading the cache), exact.
pub fn attention_with_math(isa: Isa, math: CpuMath, args: &AttnArgs, out: &mut [f32]) {
    args.check(out);
    let isa = isa.resolve();
    let no_past = Past { k: &[], v: &[], len: 0 };
    if math == CpuMath::Fast && isa == Isa::Avx512 && args.tq > 1 && bf16_products_pay() {
        let n = args.tk * args.heads * args.d;
        with_buffer(&ROUNDED_KV, 2 * n, |buf| {
            let kv16 = Kv16::new(args, buf.split_at_mut(n));
            run(isa, args, no_past, Some(&kv16), out)
        })
    } else {
        run(isa, args, no_past, None, out)
    }
}

/// Keys and values rounded to bf16 for [`CpuMath::Fast`], `[tk, heads, d]`
/// contiguous, in this thread's [`ROUNDED_KV`].
struct Kv16<'b> {
    k: &'b [bf16],
    v: &'b [bf16],
}

impl<'b> Kv16<'b> {
    /// Built only where [`bf16_products_native`] holds (AVX-512F and BF16),
    /// so the rows round 32 at a time as the GEMMs round their A panels
    /// (`gemm::round_bf16_bits`). Every element of `k` and `v` (`tk` rows
    /// of `heads·d` each) is written.
    fn new(a: &AttnArgs, (k, v): (&'b mut [bf16], &'b mut [bf16])) -> Kv16<'b> {
        let hd = a.heads * a.d;
        let round = |x: &[f32], r: &'b mut [bf16]| -> &'b [bf16] {
            for (t, row) in r.chunks_exact_mut(hd.max(1)).enumerate() {
                let src = &x[t * a.kv_stride..t * a.kv_stride + hd];
                #[cfg(target_arch = "x86_64")]
                // SAFETY: see above; `src` and `row` both hold hd elements.
                unsafe {
                    crate::gemm::round_bf16_bits(src, bytemuck::cast_slice_mut(row))
                };
                #[cfg(not(target_arch = "x86_64"))]
                row.iter_mut().zip(src).for_each(|(y, &v)| *y = bf16::from_f32(v));
            }
            r
        };
        Kv16 { k: round(a.k, k), v: round(a.v, v) }
    }
}

/// Attention over a KV cache without concatenating it: the keys are the
/// `past_k`/`past_v` rows (`[P, heads, d]`, contiguous) followed by the `tk`
/// keys of `args`, and `args.mask` applies to all `P + tk` of them (causal:
/// query `i` sits at absolute position `P + tk − tq + i`).
pub fn attention_with_past(args: &AttnArgs, past_k: &[f32], past_v: &[f32], out: &mut [f32]) {
    args.check(out);
    let hd = args.heads * args.d;
    assert_eq!(past_k.len(), past_v.len(), "attention: past keys and values differ in length");
    let len = past_k.len().checked_div(hd).unwrap_or(0);
    assert_eq!(len * hd, past_k.len(), "attention: the past is not whole [heads, d] rows");
    let full = AttnArgs { tk: len + args.tk, ..*args };
    run(Isa::detect(), &full, Past { k: past_k, v: past_v, len }, None, out)
}

/// KV-cache rows that come before `args.k` (stride heads·d).
#[derive(Clone, Copy)]
struct Past<'a> {
    k: &'a [f32],
    v: &'a [f32],
    len: usize,
}

/// Bytes of packed keys and values one call may hold for all heads at once
/// (a ViT layer's are 15 MB, the adapter's and a 1024-token prefill's 34
/// MB, a 2048-token prefill's 67 MB); the buffer is kept for the next call
/// ([`PREPACKED`]), so this bounds what stays allocated. Past it (longer
/// prompts and caches) each task packs the blocks it reads as it goes.
const PREPACK_MAX_BYTES: usize = 128 << 20;

/// `args.tk` counts the past rows too; keys `j < past.len` come from `past`.
/// With `kv16` (no past then), every block's products are bf16 ones.
fn run(isa: Isa, args: &AttnArgs, past: Past, kv16: Option<&Kv16<'_>>, out: &mut [f32]) {
    let (tq, heads, d) = (args.tq, args.heads, args.d);
    if tq == 0 || heads == 0 || d == 0 {
        return;
    }
    let isa = isa.resolve();
    if tq == 1 {
        return decode::decode(isa, args, past, out);
    }
    let plan = Plan::new(isa, args, past, kv16);
    let qblocks = tq.div_ceil(QB);
    let parallel = worth_parallel(4 * tq * args.tk * heads * d);
    let op = SyncPtr(out.as_mut_ptr());
    let tasks = |shared: Option<Packed>| {
        par_for(heads * qblocks, parallel, |t| {
            let (h, qb) = (t % heads, t / heads);
            let i0 = qb * QB;
            // SAFETY: this task writes only out[i0..i0+rows, h, :], and tasks
            // differ in (h, query block); `check` sized `out`.
            unsafe { plan.attend(shared, h, i0, QB.min(tq - i0), op) };
        })
    };
    // Several query blocks read the same keys and values: pack them once.
    let (k_len, v_len) = plan.packed_lens();
    if qblocks > 1 && 4 * (k_len + v_len) <= PREPACK_MAX_BYTES {
        with_buffer(&PREPACKED, k_len + v_len, |buf| {
            let (k, v) = buf.split_at_mut(k_len);
            plan.prepack(k, v, parallel);
            tasks(Some(Packed { k, v }))
        })
    } else {
        tasks(None)
    }
}

/// Keys and values of every (head, key block), packed once
/// ([`Plan::prepack`]): block `t = h · blocks + b` at `t · k_len` and
/// `t · v_len`.
#[derive(Clone, Copy)]
struct Packed<'p> {
    k: &'p [f32],
    v: &'p [f32],
}

thread_local! {
    /// The calling thread's packed keys and values ([`Packed`]), kept
    /// between calls: a fresh allocation of a ViT layer's 15 MB is faulted
    /// in page by page on every call, which cost more than the packing
    /// saved (2 threads, the adapter's 256×1024 attention: 87 → 53-63
    /// GFLOP/s before this buffer was kept).
    static PREPACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Each thread's scratch for its tasks ([`Plan::attend`]), kept for the
    /// same reason.
    static TASK_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The calling thread's keys and values rounded to bf16 ([`Kv16`]),
    /// kept for the same reason.
    static ROUNDED_KV: RefCell<Vec<bf16>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` floats of this thread's `buf` (grown on demand, never
/// shrunk, contents left from earlier calls), or of a fresh vector when
/// the buffer is in use (an attention nested in another on one thread).
fn with_buffer<T: Copy + Default + 'static, R>(
    buf: &'static LocalKey<RefCell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    buf.with(|b| match b.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, T::default());
            }
            f(&mut v[..len])
        }
        Err(_) => f(&mut vec![T::default(); len]),
    })
}

/// One task's scratch, carved from [`TASK_SCRATCH`]: the packed query
/// block, S, the packed probabilities, the unnormalised output O, the
/// running max and sum per query, and (without [`Packed`]) the task's own
/// packed key block.
struct TaskScratch<'s> {
    qp: &'s mut [f32],
    s: &'s mut [f32],
    pp: &'s mut [f32],
    o: &'s mut [f32],
    m: &'s mut [f32],
    l: &'s mut [f32],
    own: &'s mut [f32],
}

/// How one call's products run: the key blocks (`KB` keys, never
/// straddling the cache boundary), the GEMM pieces (f32 panels, or bf16
/// pairs with `kv16`), and the packed size of a block. Both products of a
/// block are tiles over caller-packed panels ([`PanelGemm`]): the query
/// block is packed once per task, each key block's Kᵀ and V once per call
/// (or per task, see [`PREPACK_MAX_BYTES`]), and only the probabilities
/// once per block, where the GEMM calls this replaced packed all four for
/// every (query block, key block): at the ViT's d = 104 packing then cost
/// about as much as the products.
struct Plan<'a, 'k> {
    /// Resolved; the softmax's path.
    isa: Isa,
    a: AttnArgs<'a>,
    past: Past<'a>,
    kv16: Option<&'k Kv16<'k>>,
    g: PanelGemm,
    /// (first key, keys) of every key block.
    blocks: Vec<(usize, usize)>,
    /// Depth of one slice of d in `Q·Kᵀ`: all of d unless it is deeper
    /// than a panel may be.
    dk: usize,
    /// Floats of one packed Kᵀ block: slices of d × key panels, each
    /// `nr · depth(dk)`.
    k_len: usize,
    /// Floats of one packed V block: panels of d, each `nr · depth(KB)`.
    v_len: usize,
}

impl<'a, 'k> Plan<'a, 'k> {
    fn new(isa: Isa, a: &AttnArgs<'a>, past: Past<'a>, kv16: Option<&'k Kv16<'k>>) -> Self {
        let g = PanelGemm::new(isa, kv16.is_some());
        let mut blocks = Vec::new();
        for (lo, hi) in [(0, past.len), (past.len, a.tk)] {
            blocks.extend((lo..hi).step_by(KB).map(|j0| (j0, KB.min(hi - j0))));
        }
        // max_kc is even, so every slice of a bf16 Kᵀ starts on a pair.
        let dk = a.d.min(g.max_kc());
        let k_len = a.d.div_ceil(dk) * KB.div_ceil(g.nr()) * g.nr() * g.depth(dk);
        let v_len = a.d.div_ceil(g.nr()) * g.nr() * g.depth(KB);
        Plan { isa, a: *a, past, kv16, g, blocks, dk, k_len, v_len }
    }

    /// Floats of every head's packed keys, and values ([`Packed`]).
    fn packed_lens(&self) -> (usize, usize) {
        let n = self.a.heads * self.blocks.len();
        (n * self.k_len, n * self.v_len)
    }

    /// Kᵀ (`d × kb`) and V (`kb × d`) of head `h`'s keys `j0..j0 + kb`, in
    /// whichever buffer holds them.
    fn views(&self, h: usize, j0: usize, kb: usize) -> (MatRef<'_>, MatRef<'_>) {
        let (d, hd) = (self.a.d, self.a.heads * self.a.d);
        let (k, v, stride, local) = match self.kv16 {
            Some(kv) => (Elems::BF16(kv.k), Elems::BF16(kv.v), hd, j0),
            None if j0 < self.past.len => (Elems::F32(self.past.k), Elems::F32(self.past.v), hd, j0),
            None => (Elems::F32(self.a.k), Elems::F32(self.a.v), self.a.kv_stride, j0 - self.past.len),
        };
        let offset = local * stride + h * d;
        let kt = MatRef { data: k, rows: d, cols: kb, row_stride: 1, col_stride: stride, offset };
        let v = MatRef { data: v, rows: kb, cols: d, row_stride: stride, col_stride: 1, offset };
        (kt, v)
    }

    /// Head `h`'s keys `j0..j0 + kb` (`kb ≤ KB`, within one block) packed:
    /// Kᵀ's panels into `k` (slice `s`, key panel `jp` at
    /// `(s · ⌈KB/nr⌉ + jp) · nr · depth(dk)`), V's into `v` (panel `dp` of d
    /// at `dp · nr · depth(KB)`).
    fn pack_block(&self, h: usize, j0: usize, kb: usize, k: &mut [f32], v: &mut [f32]) {
        let (kt, vv) = self.views(h, j0, kb);
        let (g, d, dk, nr) = (self.g, self.a.d, self.dk, self.g.nr());
        let kstep = nr * g.depth(dk);
        for (s, p0) in (0..d).step_by(dk).enumerate() {
            for (jp, j) in (0..kb).step_by(nr).enumerate() {
                g.pack_b(&kt, p0, dk.min(d - p0), j, &mut k[(s * KB.div_ceil(nr) + jp) * kstep..]);
            }
        }
        let vstep = nr * g.depth(KB);
        for (dp, j) in (0..d).step_by(nr).enumerate() {
            g.pack_b(&vv, 0, kb, j, &mut v[dp * vstep..]);
        }
    }

    /// Every (head, key block) packed into `k` and `v` ([`packed_lens`](Self::packed_lens)), in parallel.
    fn prepack(&self, k: &mut [f32], v: &mut [f32], parallel: bool) {
        let (nb, k_len, v_len) = (self.blocks.len(), self.k_len, self.v_len);
        let pack = |t: usize, (kc, vc): (&mut [f32], &mut [f32])| {
            let (j0, kb) = self.blocks[t % nb];
            self.pack_block(t / nb, j0, kb, kc, vc)
        };
        if parallel {
            use rayon::prelude::*;
            k.par_chunks_mut(k_len).zip(v.par_chunks_mut(v_len)).enumerate().for_each(|(t, kv)| pack(t, kv));
        } else {
            k.chunks_mut(k_len).zip(v.chunks_mut(v_len)).enumerate().for_each(|(t, kv)| pack(t, kv));
        }
    }

    /// One (head, query block) task: queries `i0..i0 + rows` of head `h`,
    /// over the key blocks they see, with the online softmax between the
    /// two products of each block.
    ///
    /// SAFETY: `out` points at the `[tq, heads, d]` output and no other task
    /// writes rows `i0..i0+rows` of head `h`; `shared` is this plan's.
    unsafe fn attend(&self, shared: Option<Packed>, h: usize, i0: usize, rows: usize, out: SyncPtr) {
        let g = self.g;
        let (d, slices) = (self.a.d, self.a.d.div_ceil(self.dk));
        let q_len = g.a_len(rows, self.dk);
        let own = if shared.is_some() { 0 } else { self.k_len + self.v_len };
        let lens = [slices * q_len, rows * KB, g.a_len(rows, KB), rows * d, rows, rows];
        with_buffer(&TASK_SCRATCH, lens.iter().sum::<usize>() + own, |buf| {
            let (qp, rest) = buf.split_at_mut(lens[0]);
            let (s, rest) = rest.split_at_mut(lens[1]);
            let (pp, rest) = rest.split_at_mut(lens[2]);
            let (o, rest) = rest.split_at_mut(lens[3]);
            let (m, rest) = rest.split_at_mut(lens[4]);
            let (l, own) = rest.split_at_mut(lens[5]);
            let scratch = TaskScratch { qp, s, pp, o, m, l, own };
            self.attend_in(shared, h, i0, rows, out, scratch)
        })
    }

    /// [`attend`](Self::attend) on its scratch.
    ///
    /// SAFETY: as `attend`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn attend_in(&self, shared: Option<Packed>, h: usize, i0: usize, rows: usize, out: SyncPtr, t: TaskScratch) {
        let (a, g) = (&self.a, self.g);
        let (d, hd, mr, nr) = (a.d, a.heads * a.d, g.mr(), g.nr());
        let keys = a.visible(i0 + rows - 1); // the last query sees the most
        let TaskScratch { qp, s, pp, o, m, l, own } = t;
        o.fill(0.0);
        m.fill(f32::NEG_INFINITY);
        l.fill(0.0);
        // The query block, packed once: one A per slice of d.
        let slices = || (0..d).step_by(self.dk).map(|p0| (p0, self.dk.min(d - p0))).enumerate();
        let q_len = g.a_len(rows, self.dk);
        for (s, (p0, kc)) in slices() {
            let offset = i0 * a.q_stride + h * d + p0;
            let q = MatRef { data: Elems::F32(a.q), rows, cols: kc, row_stride: a.q_stride, col_stride: 1, offset };
            g.pack_a(&q, &mut qp[s * q_len..]);
        }
        let (own_k, own_v) = own.split_at_mut(own.len().min(self.k_len));
        let (kstep, vstep, kpanels) = (nr * g.depth(self.dk), nr * g.depth(KB), KB.div_ceil(nr));
        for (b, &(j0, kb)) in self.blocks.iter().enumerate() {
            if j0 >= keys {
                break;
            }
            let kb = kb.min(keys - j0);
            let (kp, vp): (&[f32], &[f32]) = match shared {
                Some(p) => {
                    let t = h * self.blocks.len() + b;
                    (&p.k[t * self.k_len..][..self.k_len], &p.v[t * self.v_len..][..self.v_len])
                }
                None => {
                    self.pack_block(h, j0, kb, own_k, own_v);
                    (own_k, own_v)
                }
            };
            // S = Q · K_blockᵀ, slice by slice of d.
            let s = &mut s[..rows * kb];
            for (jp, j) in (0..kb).step_by(nr).enumerate() {
                for i in (0..rows).step_by(mr) {
                    for (si, (_, kc)) in slices() {
                        let ap = qp[si * q_len + (i / mr) * mr * g.depth(kc)..].as_ptr();
                        let bp = kp[(si * kpanels + jp) * kstep..].as_ptr();
                        let c = s.as_mut_ptr().add(i * kb + j);
                        // SAFETY: the panels were packed by `g` at these
                        // depths; C is S's rows i.., columns j.. (within
                        // rows × kb), this task's own buffer.
                        g.tile(kc, ap, bp, c, kb, mr.min(rows - i), nr.min(kb - j), si == 0);
                    }
                }
            }
            let st = SoftmaxStep { a, i0, j0, kb, d };
            match self.isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` was resolved, so the CPU has AVX2 and FMA.
                Isa::Avx2Fma => st.run_avx2(s, m, l, o),
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` was resolved, so the CPU has AVX-512F (and AVX2, FMA).
                Isa::Avx512 => st.run_avx512(s, m, l, o),
                _ => st.run(s, m, l, o),
            }
            // O += P · V_block.
            let p = MatRef { data: Elems::F32(s), rows, cols: kb, row_stride: kb, col_stride: 1, offset: 0 };
            g.pack_a(&p, pp);
            for (dp, j) in (0..d).step_by(nr).enumerate() {
                for i in (0..rows).step_by(mr) {
                    let ap = pp[(i / mr) * mr * g.depth(kb)..].as_ptr();
                    let c = o.as_mut_ptr().add(i * d + j);
                    // SAFETY: as above; C is O's rows i.., columns j..
                    // (within rows × d).
                    g.tile(kb, ap, vp[dp * vstep..].as_ptr(), c, d, mr.min(rows - i), nr.min(d - j), false);
                }
            }
        }
        for r in 0..rows {
            let inv = if l[r] > 0.0 { 1.0 / l[r] } else { 0.0 };
            let dst = out.get().add((i0 + r) * hd + h * d);
            for (c, &x) in o[r * d..(r + 1) * d].iter().enumerate() {
                *dst.add(c) = x * inv;
            }
        }
    }
}

/// The online-softmax update for one block of scores.
struct SoftmaxStep<'a, 'b> {
    a: &'a AttnArgs<'b>,
    i0: usize,
    j0: usize,
    kb: usize,
    d: usize,
}

impl SoftmaxStep<'_, '_> {
    /// For each query row r of `s` (`rows × kb` raw scores): scale, mask,
    /// fold the block max into `m[r]` (rescaling `l[r]` and the partial output
    /// row `o[r]` by `exp(m_old − m_new)`), and replace the scores by
    /// `p = exp(score − m_new)` (0 where masked), adding them to `l[r]`.
    #[inline(always)]
    fn run(&self, s: &mut [f32], m: &mut [f32], l: &mut [f32], o: &mut [f32]) {
        self.run_lanes::<8>(s, m, l, o)
    }

    /// [`run`](Self::run) with the row max and the exponentials in `L`
    /// lanes (8, or 16 on AVX-512).
    #[inline(always)]
    fn run_lanes<const L: usize>(&self, s: &mut [f32], m: &mut [f32], l: &mut [f32], o: &mut [f32]) {
        let (a, d) = (self.a, self.d);
        for (r, srow) in s.chunks_exact_mut(self.kb).enumerate() {
            let vis = a.visible(self.i0 + r).saturating_sub(self.j0).min(self.kb);
            if vis == 0 {
                // Every key of this block is masked for this query.
                srow.fill(0.0);
                continue;
            }
            let (live, masked) = srow.split_at_mut(vis);
            masked.fill(0.0);
            for x in live.iter_mut() {
                *x *= a.scale;
            }
            let m_new = m[r].max(row_max_lanes::<L>(live));
            // exp(−inf) = 0: the first block simply starts the sums.
            let corr = exp_f32(m[r] - m_new);
            let sum = if L == 16 { exp_sub_sum16(live, m_new) } else { exp_sub_sum(live, m_new) };
            l[r] = l[r] * corr + sum;
            if corr != 1.0 {
                for x in &mut o[r * d..(r + 1) * d] {
                    *x *= corr;
                }
            }
            m[r] = m_new;
        }
    }

    /// SAFETY: the CPU must have AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, s: &mut [f32], m: &mut [f32], l: &mut [f32], o: &mut [f32]) {
        self.run(s, m, l, o)
    }

    /// SAFETY: the CPU must have AVX-512F, AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn run_avx512(&self, s: &mut [f32], m: &mut [f32], l: &mut [f32], o: &mut [f32]) {
        self.run_lanes::<16>(s, m, l, o)
    }
}

/// Reference attention: per (query, head), f64 scores, max-subtracted softmax, f64 sums.
pub fn attention_ref(args: &AttnArgs, out: &mut [f32]) {
    args.check(out);
    let (heads, d) = (args.heads, args.d);
    for i in 0..args.tq {
        let vis = args.visible(i);
        for h in 0..heads {
            let qv = &args.q[i * args.q_stride + h * d..][..d];
            let scores: Vec<f64> = (0..vis)
                .map(|j| {
                    let kv = &args.k[j * args.kv_stride + h * d..][..d];
                    qv.iter().zip(kv).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>() * args.scale as f64
                })
                .collect();
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let total: f64 = p.iter().sum();
            let dst = &mut out[(i * heads + h) * d..][..d];
            for (c, o) in dst.iter_mut().enumerate() {
                let acc: f64 =
                    p.iter().enumerate().map(|(j, &pj)| pj * args.v[j * args.kv_stride + h * d + c] as f64).sum();
                *o = if vis == 0 { 0.0 } else { (acc / total) as f32 };
            }
        }
    }
}

/// Number of (query, key) pairs that are computed (visible).
fn visible_pairs(tq: usize, tk: usize, mask: Mask) -> u64 {
    match mask {
        Mask::None => tq as u64 * tk as u64,
        Mask::Causal => (0..tq as u64).map(|i| (tk as u64 + i + 1).saturating_sub(tq as u64).min(tk as u64)).sum(),
    }
}

/// Flops of attention: `q·k` and `p·v` each 2·d per visible (query, key, head).
pub fn attention_flops(tq: usize, tk: usize, heads: usize, d: usize, mask: Mask) -> u64 {
    4 * visible_pairs(tq, tk, mask) * heads as u64 * d as u64
}

/// Bytes attention must move at least: read q, k, v and write out once (f32).
pub fn attention_min_bytes(tq: usize, tk: usize, heads: usize, d: usize) -> u64 {
    4 * (2 * tq as u64 + 2 * tk as u64) * heads as u64 * d as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::bf16_products_native;
    use crate::testutil::Rng;
    use proptest::prelude::*;

    /// Every element of `got` within `tol` of `want` relative to the scale
    /// the error can have: output `(i, h, c)` is a weighted mean of the
    /// values, so its rounding error is bounded by a multiple of
    /// Σ_j p_ij·|v_jc| / l_i (the reference attention of |v|), not of the
    /// output itself, which values of both signs can cancel to nearly zero
    /// (with d = 1 and hundreds of keys the relative norm of the old check
    /// failed about once in 200 cases, on the block path as on the decode one).
    fn close_to_ref(args: &AttnArgs, got: &[f32], tol: f32, what: &str) -> Result<(), TestCaseError> {
        let mut want = vec![f32::NAN; got.len()];
        attention_ref(args, &mut want);
        let abs_v: Vec<f32> = args.v.iter().map(|x| x.abs()).collect();
        let mut scale = vec![f32::NAN; got.len()];
        attention_ref(&AttnArgs { v: &abs_v, ..*args }, &mut scale);
        for (e, ((g, w), a)) in got.iter().zip(&want).zip(&scale).enumerate() {
            let bound = tol * a + 1e-7;
            prop_assert!((g - w).abs() <= bound, "{what}: element {e} {g} vs {w} (bound {bound})");
        }
        Ok(())
    }

    /// q, k, v storage: separate padded buffers, or one interleaved `[t, 3, heads, d]` qkv buffer.
    ///
    /// With [`CpuMath::Fast`] (AVX512-BF16 CPUs only; elsewhere nothing to
    /// check) q, k and v are first rounded to bf16 as the kernel rounds them,
    /// so the reference on those rounded inputs differs only by the
    /// probabilities' bf16 rounding and f32 sums: each rounded probability is
    /// off by at most 2⁻⁸ of itself (bf16 keeps 8 significant bits), so an
    /// output is off by at most 2⁻⁸ of the scale [`close_to_ref`] measures
    /// against (4e-3: that and f32 sums).
    #[allow(clippy::too_many_arguments)]
    fn run(
        tq: usize,
        tk: usize,
        heads: usize,
        d: usize,
        mask: Mask,
        interleaved: bool,
        pad: usize,
        seed: u64,
        isa: Isa,
        math: CpuMath,
    ) -> Result<(), TestCaseError> {
        let fast = math == CpuMath::Fast;
        if fast && !bf16_products_native() {
            return Ok(());
        }
        let mut rng = Rng::new(seed);
        let scale = 1.0 / (d as f32).sqrt() * (1.0 + rng.uniform());
        let mut vec = |n: usize| -> Vec<f32> {
            let v = rng.vec(n, 2.0);
            if fast {
                v.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect()
            } else {
                v
            }
        };
        let hd = heads * d;
        let (qbuf, kbuf, vbuf, q_stride, kv_stride, koff, voff);
        if interleaved {
            let t = tq.max(tk);
            qbuf = vec(t * 3 * hd);
            kbuf = Vec::new();
            vbuf = Vec::new();
            (q_stride, kv_stride, koff, voff) = (3 * hd, 3 * hd, hd, 2 * hd);
        } else {
            q_stride = hd + pad;
            kv_stride = hd + 2 * pad;
            qbuf = vec(tq * q_stride);
            kbuf = vec(tk * kv_stride);
            vbuf = vec(tk * kv_stride);
            (koff, voff) = (0, 0);
        }
        let (k, v): (&[f32], &[f32]) = if interleaved { (&qbuf[koff..], &qbuf[voff..]) } else { (&kbuf, &vbuf) };
        let args = AttnArgs { q: &qbuf, q_stride, k, v, kv_stride, tq, tk, heads, d, scale, mask };
        let mut got = vec![f32::NAN; tq * hd];
        attention_with_math(isa, math, &args, &mut got);
        let what = format!("{isa:?} {math:?} tq {tq} tk {tk} heads {heads} d {d} {mask:?}");
        close_to_ref(&args, &got, if fast { 4e-3 } else { 2e-5 }, &what)
    }

    /// The cache-reading entry point equals attention over the concatenation.
    fn run_past(past: usize, tk: usize, tq: usize, heads: usize, d: usize, seed: u64) -> Result<(), TestCaseError> {
        let mut rng = Rng::new(seed);
        let hd = heads * d;
        let (k, v) = (rng.vec((past + tk) * hd, 2.0), rng.vec((past + tk) * hd, 2.0));
        let q = rng.vec(tq * hd, 2.0);
        let scale = 1.0 / (d as f32).sqrt();
        let full = AttnArgs {
            q: &q,
            q_stride: hd,
            k: &k,
            v: &v,
            kv_stride: hd,
            tq,
            tk: past + tk,
            heads,
            d,
            scale,
            mask: Mask::Causal,
        };
        let new = AttnArgs { k: &k[past * hd..], v: &v[past * hd..], tk, ..full };
        let mut got = vec![f32::NAN; tq * hd];
        attention_with_past(&new, &k[..past * hd], &v[..past * hd], &mut got);
        close_to_ref(&full, &got, 2e-5, &format!("past {past} tk {tk} tq {tq} heads {heads} d {d}"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn with_past_matches_concatenation(past in 0usize..600, tk in 1usize..5, heads in 1usize..4, d in 1usize..40, seed in any::<u64>()) {
            run_past(past, tk, tk, heads, d, seed)?;
            run_past(past, tk + 3, 1, heads, d, seed)?;
        }

        #[test]
        fn attention_matches_ref(
            tq in 1usize..=70, extra in 0usize..=280, heads in 1usize..=3,
            d in prop::sample::select(vec![1usize, 3, 7, 16, 32, 40]),
            causal: bool, interleaved: bool, pad in 0usize..3, seed: u64, isa in prop::sample::select(Isa::ALL.to_vec()),
        ) {
            let mask = if causal { Mask::Causal } else { Mask::None };
            let isa = if isa.available() { isa } else { Isa::Portable };
            run(tq, tq + extra, heads, d, mask, interleaved, pad, seed, isa, CpuMath::Exact)?;
        }

        /// Decode: one query against a long cache (the `decode` path: ragged
        /// last chunks, head groups, every path this CPU has).
        #[test]
        fn decode_matches_ref(
            tk in 1usize..=700, heads in 1usize..=12, d in prop::sample::select(vec![1usize, 7, 16, 40, 128]),
            causal: bool, seed: u64, isa in prop::sample::select(Isa::ALL.to_vec()),
        ) {
            let isa = if isa.available() { isa } else { Isa::Portable };
            let mask = if causal { Mask::Causal } else { Mask::None };
            run(1, tk, heads, d, mask, false, 1, seed, isa, CpuMath::Exact)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn fast_attention_matches_ref_on_rounded_inputs(
            tq in 2usize..=140, extra in 0usize..=300, heads in 1usize..=3,
            d in prop::sample::select(vec![1usize, 7, 16, 104, 128]), causal: bool, interleaved: bool, seed: u64,
        ) {
            let mask = if causal { Mask::Causal } else { Mask::None };
            run(tq, tq + extra, heads, d, mask, interleaved, 1, seed, Isa::Avx512, CpuMath::Fast)?;
        }
    }

    /// A decode step's output does not depend on how many threads split it
    /// (the head groups change with the pool; the arithmetic must not).
    #[test]
    fn decode_is_the_same_on_every_pool() {
        let (past, heads, d) = (300, 32, 128);
        let mut rng = Rng::new(7);
        let hd = heads * d;
        let (k, v, q) = (rng.vec((past + 1) * hd, 2.0), rng.vec((past + 1) * hd, 2.0), rng.vec(hd, 2.0));
        let args = AttnArgs {
            q: &q,
            q_stride: hd,
            k: &k[past * hd..],
            v: &v[past * hd..],
            kv_stride: hd,
            tq: 1,
            tk: 1,
            heads,
            d,
            scale: 0.09,
            mask: Mask::Causal,
        };
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut out = vec![f32::NAN; hd];
            pool.install(|| attention_with_past(&args, &k[..past * hd], &v[..past * hd], &mut out));
            out
        };
        let one = on(1);
        for threads in [2, 3, 5] {
            assert!(on(threads) == one, "{threads} threads differ from 1");
        }
    }

    #[test]
    fn bigger_blocks() {
        // Several query blocks (a ragged last one) and key blocks, d = 128
        // (the decoder) and 104 (the ViT), on every path this CPU has.
        for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
            run(130, 300, 2, 128, Mask::Causal, false, 0, 1, isa, CpuMath::Exact).unwrap();
            run(100, 100, 2, 104, Mask::None, true, 0, 2, isa, CpuMath::Exact).unwrap();
            run(300, 300, 2, 104, Mask::None, true, 0, 3, isa, CpuMath::Exact).unwrap();
            run(260, 400, 3, 128, Mask::Causal, false, 1, 4, isa, CpuMath::Exact).unwrap();
        }
    }

    /// Heads deeper than one packed slice (256 on the AVX2 and portable
    /// blockings, 1024 on AVX-512, 2048 bf16 pairs' worth under `fast`):
    /// `Q·Kᵀ` sums its slices into S. And a cache read by several query
    /// blocks, whose packed blocks then start at the cache boundary.
    #[test]
    fn deep_heads_and_blocks_over_a_cache() {
        for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
            run(20, 37, 2, 300, Mask::Causal, false, 1, 5, isa, CpuMath::Exact).unwrap();
            run(140, 150, 1, 1100, Mask::None, true, 0, 6, isa, CpuMath::Exact).unwrap();
        }
        run(140, 150, 1, 2100, Mask::Causal, false, 1, 7, Isa::Avx512, CpuMath::Fast).unwrap();
        run_past(300, 130, 130, 2, 40, 8).unwrap();
        run_past(5, 260, 260, 1, 16, 9).unwrap();
    }

    #[test]
    fn more_queries_than_keys() {
        // Causal with tq > tk: the first tq − tk queries see nothing → zeros.
        for isa in [Isa::Portable, Isa::Avx2Fma] {
            run(9, 4, 2, 8, Mask::Causal, false, 0, 3, isa, CpuMath::Exact).unwrap();
        }
        let q = [1.0f32; 3 * 2];
        let kv = [1.0f32; 2];
        let args = AttnArgs {
            q: &q,
            q_stride: 2,
            k: &kv,
            v: &kv,
            kv_stride: 2,
            tq: 3,
            tk: 1,
            heads: 1,
            d: 2,
            scale: 1.0,
            mask: Mask::Causal,
        };
        let mut out = [f32::NAN; 6];
        attention(&args, &mut out);
        assert_eq!(out, [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn empty() {
        let args = AttnArgs {
            q: &[],
            q_stride: 4,
            k: &[],
            v: &[],
            kv_stride: 4,
            tq: 0,
            tk: 0,
            heads: 1,
            d: 4,
            scale: 1.0,
            mask: Mask::None,
        };
        attention(&args, &mut []);
    }

    #[test]
    fn cost_model() {
        assert_eq!(attention_flops(2, 3, 1, 1, Mask::None), 24);
        // Causal, tq = 2, tk = 3: the queries see 2 and 3 keys.
        assert_eq!(attention_flops(2, 3, 1, 1, Mask::Causal), 20);
        assert_eq!(attention_min_bytes(1, 2, 1, 1), 4 * 6);
    }
}
