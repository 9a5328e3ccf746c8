//! GPU row softmax over logits rows (up to the 151936-column vocabulary), f32
//! out: `y_j = exp(x_j − max x) / Σ_k exp(x_k − max x)`, one block per row.
//!
//! The kernel makes three strided passes over its row (max; sum of
//! exponentials; normalise and store), with 128-bit loads when `cols` is a
//! multiple of 4 (see `row_loop`). The row stays in L2 between passes, so
//! DRAM traffic is one read and one write. Every thread of a block ends each
//! block reduction with the bit-identical result (all threads sum the
//! per-warp partials in the same order), which is what keeps the control flow
//! block-uniform. Semantics match [`crate::softmax_rows`]: `-inf` entries give
//! exactly 0, an all-`-inf` row gives NaN.
//!
//! Also home of the pieces the other decode-family kernels
//! ([`super::decode_attention`], [`super::sample`]) share: `BlockReduce` (the
//! block-wide f32 all-reduce) and `row_loop` (the per-thread column walk).

use half::bf16;
use qvc_codegen::{Addr, Cmp, Kernel, KernelBuilder, Reg, Space, Sreg, Ty};
use qvc_ir::DType;

use super::InvalidSpec;
use crate::spec::{Cost, KernelSpec, Launch};

/// Block-wide all-reduce of one f32 per thread (or of up to `width` at once,
/// [`reduce_n`](Self::reduce_n)): a warp butterfly, then lane 0
/// of each warp stores its partial in shared memory, one `bar.sync`, and every
/// thread folds the partials in warp order (so all threads get the same bits).
/// Two halves of the shared array alternate, switched by a runtime register
/// (so this also holds inside runtime loops): a thread can only overwrite half
/// `k` after passing the barrier of the *next* reduction, which every thread
/// reaches only after it has finished reading half `k`. One barrier per
/// reduction.
///
/// Invariant: every thread of the block must call [`reduce`](Self::reduce) the
/// same number of times in the same order (it contains `bar.sync` and
/// `shfl.sync`), and the block has `threads` threads (a multiple of 32).
pub(crate) struct BlockReduce {
    base: Reg,
    slot: Reg,
    /// Byte offset of the half in use next: 0 or `4·warps·width`.
    flip: Reg,
    lane0: Reg,
    warps: u32,
    /// Most values one reduction may carry.
    width: u32,
}

impl BlockReduce {
    /// Shared space for reductions of up to `width` values at once.
    pub(crate) fn new(b: &mut KernelBuilder, name: &str, threads: u32, width: u32) -> BlockReduce {
        assert!(threads > 0 && threads.is_multiple_of(32) && threads <= 1024, "block of {threads} threads");
        assert!(width > 0);
        let warps = threads / 32;
        let tid = b.special(Sreg::TidX);
        let lane = b.and(Ty::B32, tid, 31);
        let lane0 = b.setp(Cmp::Eq, Ty::U32, lane, 0);
        let warp = b.shr(Ty::U32, tid, 5);
        let base = b.shared(name, 2 * width * warps * 4, 4);
        let slot = b.mad(Ty::U32, warp, 4, base);
        let flip = b.mov(Ty::U32, 0u32);
        BlockReduce { base, slot, flip, lane0, warps, width }
    }

    /// `op` ("add", "max" or "min") of `v` over the block; every thread gets
    /// the same bits.
    pub(crate) fn reduce(&mut self, b: &mut KernelBuilder, op: &str, v: Reg) -> Reg {
        self.reduce_n(b, op, &[v])[0]
    }

    /// [`reduce`](Self::reduce) of several values behind one barrier.
    pub(crate) fn reduce_n(&mut self, b: &mut KernelBuilder, op: &str, vs: &[Reg]) -> Vec<Reg> {
        assert!(!vs.is_empty() && vs.len() as u32 <= self.width, "{} values, width {}", vs.len(), self.width);
        let ws: Vec<Reg> = vs.iter().map(|&v| b.warp_reduce_f32(op, v)).collect();
        let slot = b.add(Ty::U32, self.slot, self.flip);
        let base = b.add(Ty::U32, self.base, self.flip);
        b.bin_into("xor", Ty::B32, self.flip, self.flip, 4 * self.warps * self.width);
        let row = 4 * self.warps as i64;
        for (i, w) in ws.into_iter().enumerate() {
            let a = Addr::reg(slot, row * i as i64);
            b.ins_if(self.lane0, false, "st.shared.f32", vec![a.into(), w.into()]);
        }
        b.bar_sync();
        (0..vs.len() as i64)
            .map(|i| {
                let mut acc = b.ld(Space::Shared, Ty::F32, Addr::reg(base, row * i));
                for w in 1..self.warps as i64 {
                    let x = b.ld(Space::Shared, Ty::F32, Addr::reg(base, row * i + 4 * w));
                    acc = b.bin(op, Ty::F32, acc, x);
                }
                acc
            })
            .collect()
    }
}

/// The default block size of the row kernels: one thread per column up to 1024.
pub(crate) fn row_threads(cols: usize) -> u32 {
    (cols.div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// Checks shared by the one-block-per-row specs.
pub(crate) fn check_rows(spec: &'static str, rows: usize, cols: usize, threads: u32) -> Result<(), InvalidSpec> {
    let bad = |reason: String| Err(InvalidSpec { spec, reason });
    if rows == 0 || cols == 0 {
        return bad(format!("empty logits ({rows} rows × {cols} cols)"));
    }
    if rows > u32::MAX as usize || cols >= 1 << 24 {
        // Counts and indices travel through f32 reductions: exact below 2^24.
        return bad(format!("{rows} rows × {cols} cols is too large (cols must be < 2^24)"));
    }
    if threads == 0 || !threads.is_multiple_of(32) || threads > 1024 {
        return bad(format!("block of {threads} threads (must be a multiple of 32, at most 1024)"));
    }
    Ok(())
}

/// `rows` independent softmaxes of `cols` logits each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SoftmaxSpec {
    pub rows: usize,
    pub cols: usize,
    /// Input dtype: F32 (logits) or BF16. The output is always f32.
    pub input: DType,
    /// Threads per block (a multiple of 32, ≤ 1024); [`SoftmaxSpec::new`]
    /// picks one per column up to 1024.
    pub threads: u32,
}

impl SoftmaxSpec {
    /// An f32-input spec with the default block size, validated.
    pub fn new(rows: usize, cols: usize) -> Result<SoftmaxSpec, InvalidSpec> {
        let s = SoftmaxSpec { rows, cols, input: DType::F32, threads: row_threads(cols) };
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<(), InvalidSpec> {
        check_rows("SoftmaxSpec", self.rows, self.cols, self.threads)?;
        if !matches!(self.input, DType::F32 | DType::BF16) {
            return Err(InvalidSpec { spec: "SoftmaxSpec", reason: format!("input dtype {:?}", self.input) });
        }
        Ok(())
    }

    /// Fast CPU path: `out = softmax(x)` row by row (x is f32, or bf16 widened).
    pub fn cpu(&self, x: &[f32], out: &mut [f32]) {
        assert_eq!(x.len(), self.rows * self.cols, "softmax: x must be [rows, cols]");
        assert_eq!(out.len(), x.len(), "softmax: out must be [rows, cols]");
        out.copy_from_slice(x);
        crate::softmax::softmax_rows(out, self.cols);
    }

    /// Naive reference in f64 (same signature as [`cpu`](Self::cpu)).
    pub fn reference(&self, x: &[f32], out: &mut [f32]) {
        assert_eq!(x.len(), self.rows * self.cols, "softmax: x must be [rows, cols]");
        assert_eq!(out.len(), x.len(), "softmax: out must be [rows, cols]");
        out.copy_from_slice(x);
        crate::softmax::softmax_rows_ref(out, self.cols);
    }

    /// `x` as the f32 values the kernel computes with (bf16 inputs are the
    /// rounded values, widened exactly).
    pub fn widen_bf16(x: &[bf16]) -> Vec<f32> {
        x.iter().map(|v| v.to_f32()).collect()
    }

    /// Qwen-VL-Chat: logits of 1 and 8 sequences over the 151936-token vocabulary.
    pub fn model_specs() -> Vec<SoftmaxSpec> {
        [1, 8].into_iter().map(|rows| SoftmaxSpec::new(rows, 151_936).expect("model shape is valid")).collect()
    }
}

/// Loads element `j` of a row as f32 (`row` is the row's global address).
pub(crate) fn load_elem(b: &mut KernelBuilder, dtype: DType, row: Reg, j: Reg) -> Reg {
    match dtype {
        DType::F32 => {
            let a = b.index_addr(row, j, 4);
            b.ld(Space::GlobalNc, Ty::F32, Addr::reg(a, 0))
        }
        DType::BF16 => {
            let a = b.index_addr(row, j, 2);
            let h = b.ld(Space::GlobalNc, Ty::B16, Addr::reg(a, 0));
            b.cvt(Ty::F32, Ty::BF16, h)
        }
        other => panic!("load_elem: unsupported dtype {other:?}"),
    }
}

/// `f(j, x_j)` for the columns `j` of a row that thread `tid` owns, `x_j`
/// widened to f32. When `cols` is a multiple of 4 every row starts 16-byte
/// (f32) or 8-byte (bf16) aligned, so a thread loads 4 consecutive columns per
/// vector load, and when the row holds more than one such vector per thread,
/// each loop trip issues [`UNROLL`] vector loads (clamped to the row, results
/// of the clamped ones unused) before using any: one block per row must keep
/// many loads in flight to approach the SM's L2 bandwidth. Otherwise columns
/// go one at a time, `threads` apart. Either way each thread visits its
/// columns in increasing order.
pub(crate) fn row_loop(
    b: &mut KernelBuilder,
    dtype: DType,
    row: Reg,
    tid: Reg,
    cols: usize,
    threads: u32,
    mut f: impl FnMut(&mut KernelBuilder, Reg, Reg),
) {
    if !cols.is_multiple_of(4) {
        b.for_range(tid, cols, threads, |b, j| {
            let v = load_elem(b, dtype, row, j);
            f(b, j, v);
        });
        return;
    }
    let n4 = (cols / 4) as u32;
    let unroll = if n4 > threads { UNROLL } else { 1 };
    let load4 = |b: &mut KernelBuilder, i: Reg| -> Vec<Reg> {
        match dtype {
            DType::F32 => {
                let a = b.index_addr(row, i, 16);
                b.ld_v(Space::GlobalNc, Ty::F32, 4, Addr::reg(a, 0))
            }
            DType::BF16 => {
                let a = b.index_addr(row, i, 8);
                let w = b.ld_v(Space::GlobalNc, Ty::B32, 2, Addr::reg(a, 0));
                let (x0, x1) = b.bf16x2_to_f32(w[0]);
                let (x2, x3) = b.bf16x2_to_f32(w[1]);
                vec![x0, x1, x2, x3]
            }
            other => panic!("row_loop: unsupported dtype {other:?}"),
        }
    };
    b.for_range(tid, n4, unroll * threads, |b, i0| {
        // Issue every load of this trip first; i0 itself is always in the row.
        let mut batch = vec![(i0, load4(b, i0))];
        for u in 1..unroll {
            let i = b.add(Ty::U32, i0, u * threads);
            let ic = b.min(Ty::U32, i, n4 - 1);
            batch.push((i, load4(b, ic)));
        }
        for (u, (i, vals)) in batch.into_iter().enumerate() {
            let mut body = |b: &mut KernelBuilder| {
                let j0 = b.shl(Ty::B32, i, 2);
                for (e, v) in vals.iter().enumerate() {
                    let j = if e == 0 { j0 } else { b.add(Ty::U32, j0, e as u32) };
                    f(b, j, *v);
                }
            };
            if u == 0 {
                body(b);
            } else {
                let inside = b.setp(Cmp::Lt, Ty::U32, i, n4);
                b.if_then(inside, false, body);
            }
        }
    });
}

/// Vector loads in flight per thread and loop trip in [`row_loop`].
const UNROLL: u32 = 4;

impl KernelSpec for SoftmaxSpec {
    fn name(&self) -> String {
        let dt = match self.input {
            DType::BF16 => "bf16",
            _ => "f32",
        };
        format!("softmax_r{}_c{}_{dt}_t{}", self.rows, self.cols, self.threads)
    }

    fn build(&self) -> Kernel {
        self.validate().expect("SoftmaxSpec");
        let (cols, t) = (self.cols, self.threads);
        let esz = self.input.size();
        let mut b = KernelBuilder::new(self.name());
        b.max_threads(t);
        let x = b.ptr_param("x");
        let y = b.ptr_param("y");
        let tid = b.special(Sreg::TidX);
        let row = b.special(Sreg::CtaidX);
        let xrow = b.index_addr(x, row, (cols * esz) as u32);
        let yrow = b.index_addr(y, row, (cols * 4) as u32);
        let mut red = BlockReduce::new(&mut b, "red", t, 1);
        let input = self.input;

        b.comment("pass 1: row max");
        let m = b.mov(Ty::F32, f32::NEG_INFINITY);
        row_loop(&mut b, input, xrow, tid, cols, t, |b, _, v| b.bin_into("max", Ty::F32, m, m, v));
        let m = red.reduce(&mut b, "max", m);

        // exp(v − m) = 2^((v − m)·log2 e); v − m ≤ 0, so nothing overflows.
        let exp_shifted = |b: &mut KernelBuilder, v: Reg| {
            let d = b.sub(Ty::F32, v, m);
            let t2 = b.mul(Ty::F32, d, std::f32::consts::LOG2_E);
            b.ex2(t2)
        };

        b.comment("pass 2: sum of exponentials");
        let s = b.mov(Ty::F32, 0.0f32);
        row_loop(&mut b, input, xrow, tid, cols, t, |b, _, v| {
            let e = exp_shifted(b, v);
            b.bin_into("add", Ty::F32, s, s, e);
        });
        let s = red.reduce(&mut b, "add", s);
        let inv = b.rcp(s);

        b.comment("pass 3: normalise");
        row_loop(&mut b, input, xrow, tid, cols, t, |b, j, v| {
            let e = exp_shifted(b, v);
            let o = b.mul(Ty::F32, e, inv);
            let a = b.index_addr(yrow, j, 4);
            b.st(Space::Global, Ty::F32, Addr::reg(a, 0), o);
        });
        b.ret();
        b.finish()
    }

    fn launch(&self) -> Launch {
        Launch::new([self.rows as u32, 1, 1], [self.threads, 1, 1])
    }

    fn cost(&self) -> Cost {
        let n = (self.rows * self.cols) as u64;
        // max, subtract, exp (counted as 1), sum, scale.
        Cost { flops: 5 * n, bytes: n * (self.input.size() as u64 + 4) }
    }
}
