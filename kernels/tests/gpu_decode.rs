//! Decode-family GPU kernels (decode attention, softmax, argmax, top-p) run
//! on the PTX emulator against the naive references, the fast CPU paths
//! against the same references, and every model shape through ptxas.
//!
//! Shapes are random and ragged (no multiple of any tile), data is random and
//! never all zeros, outputs (and the attention workspace) are poisoned with
//! 0xFF bytes (NaN as f32/bf16, -1 as i32) before each launch, so an element a
//! kernel forgets to write fails the comparison.

use half::bf16;
use proptest::prelude::*;
use qvc_codegen::emu::{run, Arg, Device};
use qvc_codegen::{ptxas, Module, Target};
use qvc_ir::DType;
use qvc_kernels::gpu::decode_attention::DecodeAttnSpec;
use qvc_kernels::gpu::sample::{ArgmaxSpec, TopPParams, TopPSpec};
use qvc_kernels::gpu::softmax::SoftmaxSpec;
use qvc_kernels::KernelSpec;

/// xorshift64*: deterministic test data from a proptest-shrinkable seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        let mut v: Vec<f32> = (0..n).map(|_| self.uniform() * scale).collect();
        if let Some(first) = v.first_mut() {
            // Never all zeros, whatever the seed.
            *first = if *first == 0.0 { 0.5 * scale } else { *first };
        }
        v
    }
    fn bf16s(&mut self, n: usize, scale: f32) -> Vec<bf16> {
        self.vec(n, scale).into_iter().map(bf16::from_f32).collect()
    }
}

/// ‖got − want‖₂ / ‖want‖₂; 0 when both are zero, infinite on any NaN.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        if g.is_nan() || w.is_nan() {
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

// ---- decode attention -------------------------------------------------------

struct AttnCase {
    spec: DecodeAttnSpec,
    q: Vec<bf16>,
    /// Caches of `cached ≥ batch` slots; sequence `b` is in slot `slots[b]`.
    k: Vec<bf16>,
    v: Vec<bf16>,
    lens: Vec<u32>,
    slots: Vec<u32>,
}

/// `n` distinct slots out of `0..cached`, in random order.
fn distinct_slots(rng: &mut Rng, n: usize, cached: usize) -> Vec<u32> {
    let mut all: Vec<u32> = (0..cached as u32).collect();
    for i in (1..all.len()).rev() {
        all.swap(i, rng.below(i + 1));
    }
    all.truncate(n);
    all
}

impl AttnCase {
    /// Random data; the sequences sit in distinct slots, in random order,
    /// among up to two more slots than sequences.
    fn new(spec: DecodeAttnSpec, lens: Vec<u32>, seed: u64) -> AttnCase {
        let mut rng = Rng::new(seed);
        let cached = spec.batch + rng.below(3);
        let slots = distinct_slots(&mut rng, spec.batch, cached);
        Self::with_slots(spec, lens, slots, cached, seed)
    }

    fn with_slots(spec: DecodeAttnSpec, lens: Vec<u32>, slots: Vec<u32>, cached: usize, seed: u64) -> AttnCase {
        let mut rng = Rng::new(seed ^ 0x5107);
        let (bh, d) = (spec.batch * spec.heads, spec.head_dim);
        let q = rng.bf16s(bh * d, 2.0);
        let per_slot = spec.heads * spec.max_seq * d;
        let k = rng.bf16s(cached * per_slot, 2.0);
        let v = rng.bf16s(cached * per_slot, 1.0);
        AttnCase { spec, q, k, v, lens, slots }
    }

    /// Sequence `b` alone: a batch-1 spec, its query, its slot and length.
    fn alone(&self, b: usize) -> AttnCase {
        let (h, d) = (self.spec.heads, self.spec.head_dim);
        AttnCase {
            spec: DecodeAttnSpec { batch: 1, ..self.spec },
            q: self.q[b * h * d..(b + 1) * h * d].to_vec(),
            k: self.k.clone(),
            v: self.v.clone(),
            lens: vec![self.lens[b]],
            slots: vec![self.slots[b]],
        }
    }

    /// Both kernels on the emulator; the output widened to f32.
    fn emulate(&self) -> Vec<f32> {
        let s = &self.spec;
        let n = s.batch * s.heads * s.head_dim;
        let mut dev = Device::new();
        let q = dev.upload_bf16(&self.q);
        let k = dev.upload_bf16(&self.k);
        let v = dev.upload_bf16(&self.v);
        let lens = dev.upload_u32(&self.lens);
        let slots = dev.upload_u32(&self.slots);
        let ws = dev.alloc_poisoned(s.workspace_bytes());
        let out = dev.alloc_poisoned(n * s.out.size());
        let (p, c) = (s.partial(), s.combine());
        let l = p.launch();
        let args = [Arg::Ptr(q), Arg::Ptr(k), Arg::Ptr(v), Arg::Ptr(lens), Arg::Ptr(slots), Arg::Ptr(ws)];
        run(&p.build(), l.grid, l.block, &args, &mut dev).unwrap_or_else(|e| panic!("partial: {e}"));
        let l = c.launch();
        run(&c.build(), l.grid, l.block, &[Arg::Ptr(ws), Arg::Ptr(out)], &mut dev)
            .unwrap_or_else(|e| panic!("combine: {e}"));
        match s.out {
            DType::BF16 => dev.download_bf16(out, n).into_iter().map(|x| x.to_f32()).collect(),
            _ => dev.download_f32(out, n),
        }
    }

    fn reference(&self) -> Vec<f32> {
        let mut o = vec![f32::NAN; self.q.len()];
        self.spec.reference(&self.q, &self.k, &self.v, &self.lens, &self.slots, &mut o);
        o
    }

    fn cpu(&self) -> Vec<f32> {
        let mut o = vec![f32::NAN; self.q.len()];
        self.spec.cpu(&self.q, &self.k, &self.v, &self.lens, &self.slots, &mut o);
        o
    }

    /// Compares per (sequence, head) row, so a short sequence cannot hide
    /// behind a long one in the norm.
    fn check(&self, got: &[f32], want: &[f32], tol: f64, what: &str) -> Result<(), TestCaseError> {
        let d = self.spec.head_dim;
        for (r, (g, w)) in got.chunks(d).zip(want.chunks(d)).enumerate() {
            let e = rel_l2(g, w);
            prop_assert!(
                e <= tol,
                "{what}: (seq, head) row {r} (lens {:?}, slots {:?}): rel L2 {e} > {tol}",
                self.lens,
                self.slots
            );
        }
        Ok(())
    }
}

// Tolerances (rel L2 per (sequence, head) row against the f64 reference):
// f32 output 1e-5 (f32 dot products of ≤ 128 terms, base-2 online softmax);
// bf16 output 8e-3 (one bf16 rounding, 2^-9 relative, dominates).
const ATTN_F32_TOL: f64 = 1e-5;
const ATTN_BF16_TOL: f64 = 8e-3;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn decode_attention_matches_reference(
        batch in 1usize..=3, heads in 1usize..=4,
        hd in prop::sample::select(vec![16usize, 40, 128]),
        max_seq in 1usize..300, splits in prop::sample::select(vec![1usize, 1, 2, 3, 5, 7]),
        bf16_out: bool, scale in 0.05f32..0.5, seed: u64,
    ) {
        let mut rng = Rng::new(seed ^ 0xdec0de);
        // Lengths anywhere in 0..=max_seq (often below `splits`), one past the
        // cache now and then (clamped), and never all zero.
        let mut lens: Vec<u32> = (0..batch)
            .map(|_| match rng.below(6) {
                0 => rng.below(splits.min(max_seq) + 1) as u32,
                1 => max_seq as u32 + 3,
                _ => rng.below(max_seq + 1) as u32,
            })
            .collect();
        if lens.iter().all(|&l| l == 0) {
            lens[0] = 1;
        }
        let out = if bf16_out { DType::BF16 } else { DType::F32 };
        let spec = DecodeAttnSpec::new(batch, heads, hd, max_seq, splits, scale, out).unwrap();
        let case = AttnCase::new(spec, lens, seed);
        let want = case.reference();
        let tol = if bf16_out { ATTN_BF16_TOL } else { ATTN_F32_TOL };
        case.check(&case.emulate(), &want, tol, "emulated PTX")?;
        case.check(&case.cpu(), &want, ATTN_F32_TOL, "fast CPU")?;
    }
}

#[test]
fn decode_attention_edge_lengths() {
    // Every split empty (len 0 → zeros), fewer keys than splits, tile
    // boundaries on each side, and one split of three 128-key tiles (the
    // online-softmax rescaling between tiles).
    let cases: [(usize, usize, Vec<u32>); 6] = [
        (3, 260, vec![0, 0]),
        (3, 260, vec![0, 2]),
        (3, 260, vec![127, 129]),
        (3, 260, vec![256, 1]),
        (1, 300, vec![300, 129]),
        (2, 300, vec![300, 257]),
    ];
    for (splits, max_seq, lens) in cases {
        let spec = DecodeAttnSpec::new(2, 2, 40, max_seq, splits, 0.2, DType::F32).unwrap();
        let case = AttnCase::new(spec, lens.clone(), 99);
        let want = case.reference();
        let got = case.emulate();
        case.check(&got, &want, ATTN_F32_TOL, "emulated PTX").unwrap();
        case.check(&case.cpu(), &want, ATTN_F32_TOL, "fast CPU").unwrap();
        if lens.iter().all(|&l| l == 0) {
            assert!(got.iter().all(|&x| x == 0.0), "no keys gives a zero output");
        }
    }
}

/// A batch over slots in any order (`[5, 0, 3]`: not consecutive, not
/// sorted) gives each sequence, bit for bit, what it gets decoded alone in
/// its slot: what lets a scheduler batch whichever slots are active.
#[test]
fn decode_attention_any_slots_in_any_order() {
    let spec = DecodeAttnSpec::new(3, 2, 40, 300, 3, 0.2, DType::BF16).unwrap();
    for (slots, lens) in [(vec![5u32, 0, 3], vec![17u32, 300, 129]), (vec![1, 0, 2], vec![1, 0, 256])] {
        let case = AttnCase::with_slots(spec, lens, slots, 6, 42);
        let got = case.emulate();
        case.check(&got, &case.reference(), ATTN_BF16_TOL, "out-of-order slots").unwrap();
        let n = spec.heads * spec.head_dim;
        for b in 0..spec.batch {
            let one = case.alone(b).emulate();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got[b * n..(b + 1) * n]), bits(&one), "sequence {b} (slot {}) differs", case.slots[b]);
        }
    }
}

// ---- softmax ---------------------------------------------------------------------

/// Logit rows with some `-inf` entries (never a whole row).
fn logits(rng: &mut Rng, rows: usize, cols: usize, scale: f32, masked: usize) -> Vec<f32> {
    let mut x = rng.vec(rows * cols, scale);
    for r in 0..rows {
        for _ in 0..masked.min(cols - 1) {
            let j = rng.below(cols);
            if j != 0 {
                x[r * cols + j] = f32::NEG_INFINITY;
            }
        }
    }
    x
}

/// A block size for a row kernel: the default (one thread per column up to
/// 1024) or a small one, so that threads also loop over several columns.
fn threads_for(cols: usize, small: bool) -> u32 {
    if small {
        64
    } else {
        (cols.div_ceil(32) * 32).clamp(32, 1024) as u32
    }
}

// Tolerance: rel L2 per row ≤ 1e-6 for the PTX (f32 exp via ex2 of a rounded
// argument, one rcp); 4e-6 for the fast CPU path (its polynomial exp is
// accurate to a few ulp).
const SOFTMAX_TOL: f64 = 1e-6;
const SOFTMAX_CPU_TOL: f64 = 4e-6;

/// One top-p case against the reference (see `top_p_matches_reference`).
#[allow(clippy::too_many_arguments)]
fn top_p_case(
    rows: usize,
    cols: usize,
    temperature: f32,
    top_p: f32,
    top_k_sel: usize,
    scale: f32,
    dups: usize,
    vec4: bool,
    small: bool,
    u_edge: usize,
    seed: u64,
) -> Result<(), TestCaseError> {
    let cols = if vec4 { cols.next_multiple_of(4) } else { cols };
    let mut rng = Rng::new(seed);
    let masked = rng.below(4);
    let mut x = logits(&mut rng, rows, cols, scale, masked);
    for r in 0..rows {
        let row = &mut x[r * cols..(r + 1) * cols];
        // Exact duplicates (ties at the threshold go to the lowest index),
        // a NaN (weight 0) and a -0.0 (equal to +0.0).
        for _ in 0..dups {
            let v = row[rng.below(cols)];
            row[rng.below(cols)] = v;
        }
        if cols > 3 {
            row[1 + rng.below(cols - 1)] = f32::NAN;
            row[1 + rng.below(cols - 1)] = -0.0;
        }
        row[0] = if row[0].is_finite() { row[0] } else { 0.5 };
    }
    let top_k = [0, 1, 3, 40, cols as u32 + 7][top_k_sel];
    let p = TopPParams { temperature, top_p, top_k };
    let mut u: Vec<f32> = (0..rows).map(|_| rng.unit()).collect();
    // The ends of [0, 1): the first kept token, and the last one (where
    // f32 rounding may leave the walk without a crossing: the fallback).
    match u_edge {
        0 => u[0] = 0.0,
        1 => u[0] = LAST_BELOW_ONE,
        _ => {}
    }
    let spec = TopPSpec { rows, cols, threads: threads_for(cols, small) };
    spec.validate().unwrap();
    let got = emulate_top_p(&spec, &x, &u, &p);
    let mut cpu = vec![-1; rows];
    spec.cpu(&x, &u, &p, &mut cpu);
    let mut want = vec![-1; rows];
    spec.reference(&x, &u, &p, &mut want);
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let ok = top_p_accepts(&spec, row, &p, u[r]);
        prop_assert!(ok.contains(&(want[r] as usize)), "the reference itself is accepted");
        prop_assert!(ok.contains(&(got[r] as usize)), "PTX row {}: id {} not in {:?} (ref {})", r, got[r], ok, want[r]);
        prop_assert!(ok.contains(&(cpu[r] as usize)), "CPU row {}: id {} not in {:?} (ref {})", r, cpu[r], ok, want[r]);
    }
    Ok(())
}

/// Found by the proptest: top_p = 1 and u = 0, where token 0's weight is
/// 1e-17 of the row's: the definition keeps it and picks it, and the f64
/// reference's running sum used to drop it.
#[test]
fn top_p_one_keeps_the_tiny_tail() {
    top_p_case(1, 737, 0.3, 1.0, 0, 10.0, 1, true, false, 0, 3112515728910797701).unwrap();
}

/// Found by the proptest (in CI, 2026-12-03): u = the largest f32 below 1,
/// top_p = 1, logits spread ×10, so the last kept tokens weigh almost
/// nothing; the acceptance window's upper end was clamped below u, and
/// rejected the reference's own pick.
#[test]
fn top_p_u_at_the_last_f32_below_one() {
    top_p_case(1, 2220, 0.8, 1.0, 4, 10.0, 0, false, false, 1, 6869236523010062046).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn softmax_matches_reference(
        rows in 1usize..=4, cols in 1usize..3000,
        scale in prop::sample::select(vec![0.1f32, 3.0, 30.0]),
        masked in 0usize..5, bf16_in: bool, small: bool, vec4: bool, seed: u64,
    ) {
        let cols = if vec4 { cols.next_multiple_of(4) } else { cols };
        let mut rng = Rng::new(seed);
        let mut x = logits(&mut rng, rows, cols, scale, masked);
        let input = if bf16_in { DType::BF16 } else { DType::F32 };
        let spec = SoftmaxSpec { rows, cols, input, threads: threads_for(cols, small) };
        spec.validate().unwrap();
        let mut dev = Device::new();
        let xp = if bf16_in {
            let h: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            x = SoftmaxSpec::widen_bf16(&h);
            dev.upload_bf16(&h)
        } else {
            dev.upload_f32(&x)
        };
        let yp = dev.alloc_poisoned(rows * cols * 4);
        let l = spec.launch();
        run(&spec.build(), l.grid, l.block, &[Arg::Ptr(xp), Arg::Ptr(yp)], &mut dev)
            .unwrap_or_else(|e| panic!("{e}"));
        let got = dev.download_f32(yp, rows * cols);
        let mut want = vec![0f32; rows * cols];
        spec.reference(&x, &mut want);
        let mut cpu = vec![0f32; rows * cols];
        spec.cpu(&x, &mut cpu);
        for r in 0..rows {
            let sl = r * cols..(r + 1) * cols;
            let e = rel_l2(&got[sl.clone()], &want[sl.clone()]);
            prop_assert!(e <= SOFTMAX_TOL, "PTX row {r}: rel L2 {e}");
            let e = rel_l2(&cpu[sl.clone()], &want[sl]);
            prop_assert!(e <= SOFTMAX_CPU_TOL, "CPU row {r}: rel L2 {e}");
        }
    }
}

// ---- argmax ---------------------------------------------------------------------

/// `model::sampling::argmax`, verbatim: the host's greedy choice.
fn host_argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best
}

fn emulate_argmax(spec: &ArgmaxSpec, x: &[f32]) -> Vec<i32> {
    let mut dev = Device::new();
    let xp = dev.upload_f32(x);
    let op = dev.alloc_poisoned(spec.rows * 4);
    let l = spec.launch();
    run(&spec.build(), l.grid, l.block, &[Arg::Ptr(xp), Arg::Ptr(op)], &mut dev).unwrap_or_else(|e| panic!("{e}"));
    dev.download_i32(op, spec.rows)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    // Ids are compared exactly.
    #[test]
    fn argmax_matches_reference(
        rows in 1usize..=4, cols in 1usize..3000, ties in 0usize..4, nans in 0usize..4,
        small: bool, vec4: bool, seed: u64,
    ) {
        let cols = if vec4 { cols.next_multiple_of(4) } else { cols };
        let mut rng = Rng::new(seed);
        let masked = rng.below(3);
        let mut x = logits(&mut rng, rows, cols, 5.0, masked);
        for r in 0..rows {
            let row = &mut x[r * cols..(r + 1) * cols];
            // Copies of the maximum at random places: ties go to the lowest index.
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) + 1.0;
            for _ in 0..ties {
                row[rng.below(cols)] = m;
            }
            for _ in 0..nans {
                row[rng.below(cols)] = f32::NAN;
            }
        }
        let spec = ArgmaxSpec { rows, cols, threads: threads_for(cols, small) };
        spec.validate().unwrap();
        let mut want = vec![-1; rows];
        spec.reference(&x, &mut want);
        let got = emulate_argmax(&spec, &x);
        prop_assert_eq!(&got, &want, "PTX");
        let mut cpu = vec![-1; rows];
        spec.cpu(&x, &mut cpu);
        prop_assert_eq!(&cpu, &want, "CPU");
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            if !row.iter().any(|v| v.is_nan()) {
                prop_assert_eq!(want[r] as usize, host_argmax(row), "host argmax, row {}", r);
            }
        }
    }
}

#[test]
fn argmax_nan_and_infinity_rows() {
    let rows: [&[f32]; 5] = [
        &[f32::NAN, f32::NAN, f32::NAN],
        &[f32::NAN, 1.0, 3.0],
        &[f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NAN],
        &[f32::NAN, f32::NEG_INFINITY, f32::NEG_INFINITY],
        &[2.0, f32::INFINITY, f32::INFINITY],
    ];
    let want = [0, 2, 0, 1, 1];
    for (row, want) in rows.iter().zip(want) {
        let spec = ArgmaxSpec { rows: 1, cols: 3, threads: 32 };
        assert_eq!(emulate_argmax(&spec, row), vec![want], "{row:?}");
        let mut cpu = vec![-1];
        spec.cpu(row, &mut cpu);
        assert_eq!(cpu, vec![want], "CPU {row:?}");
    }
}

// ---- top-p ------------------------------------------------------------------------

fn emulate_top_p(spec: &TopPSpec, x: &[f32], u: &[f32], p: &TopPParams) -> Vec<i32> {
    let mut dev = Device::new();
    let xp = dev.upload_f32(x);
    let up = dev.upload_f32(u);
    let op = dev.alloc_poisoned(spec.rows * 4);
    let l = spec.launch();
    let args =
        [Arg::Ptr(xp), Arg::Ptr(up), Arg::Ptr(op), Arg::F32(p.temperature), Arg::F32(p.top_p), Arg::U32(p.top_k)];
    run(&spec.build(), l.grid, l.block, &args, &mut dev).unwrap_or_else(|e| panic!("{e}"));
    dev.download_i32(op, spec.rows)
}

/// Relative margin on `u` and `top_p` within which f32 rounding (weights, sums)
/// may move the choice.
const TOP_P_EPS: f64 = 1e-4;

/// The largest f32 below 1.
const LAST_BELOW_ONE: f32 = 1.0 - f32::EPSILON / 2.0;

/// The ids the f64 definition gives when `u` and `top_p` move by at most
/// `TOP_P_EPS`: for each perturbed kept set, every kept id between the picks
/// at `u − ε` and `u + ε` (the pick is monotone in `u`).
fn top_p_accepts(spec: &TopPSpec, row: &[f32], p: &TopPParams, u: f32) -> Vec<usize> {
    let mut ok = vec![];
    for f in [1.0 - TOP_P_EPS, 1.0, 1.0 + TOP_P_EPS] {
        let pp = TopPParams { top_p: ((p.top_p as f64 * f).min(1.0)) as f32, ..*p };
        let kept = spec.reference_kept(row, &pp);
        let lo = spec.reference_pick(row, &kept, &pp, (u as f64 - TOP_P_EPS).max(0.0) as f32);
        // u stays below 1, but not below u itself: u may be the largest f32
        // under 1 (0.99999994), past the old clamp at 0.9999999, which then
        // shut out the pick at u of a row whose tail weights are tiny.
        let hi = spec.reference_pick(row, &kept, &pp, (u as f64 + TOP_P_EPS).min(f64::from(LAST_BELOW_ONE)) as f32);
        ok.extend(kept.iter().copied().filter(|&j| lo <= j && j <= hi));
    }
    ok.sort_unstable();
    ok.dedup();
    ok
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    // Ids are compared exactly, up to the stated rounding margin (the GPU's id
    // must be one that the f64 definition picks for u and top_p within 1e-4).
    #[test]
    fn top_p_matches_reference(
        rows in 1usize..=3, cols in 1usize..3000,
        temperature in prop::sample::select(vec![0.3f32, 0.8, 1.0, 1.7]),
        top_p in prop::sample::select(vec![0.05f32, 0.4, 0.9, 0.97, 1.0]),
        top_k_sel in 0usize..5, scale in prop::sample::select(vec![1.0f32, 4.0, 10.0]),
        dups in 0usize..6, small: bool, vec4: bool, u_edge in 0usize..4, seed: u64,
    ) {
        top_p_case(rows, cols, temperature, top_p, top_k_sel, scale, dups, vec4, small, u_edge, seed)?;
    }
}

#[test]
fn top_p_limits_are_greedy_and_ties_take_the_lowest_index() {
    // Logits with a 3-way tie for the top value at 5, 9 and 20; 37 columns
    // take the scalar loads, 36 the vector loads.
    for cols in [37, 36] {
        let mut row: Vec<f32> = (0..cols).map(|i| ((i * 13) % 37) as f32 / 10.0 - 1.0).collect();
        for j in [5, 9, 20] {
            row[j] = 4.0;
        }
        let spec = TopPSpec { rows: 1, cols, threads: 32 };
        for (top_p, top_k, u) in [(1.0, 1, 0.99f32), (1e-6, 0, 0.99), (0.3, 0, 0.0), (1.0, 2, 0.99)] {
            let p = TopPParams { temperature: 0.7, top_p, top_k };
            let got = emulate_top_p(&spec, &row, &[u], &p)[0];
            let mut cpu = vec![-1];
            spec.cpu(&row, &[u], &p, &mut cpu);
            // One kept token: the lowest-index tie; two (top_k = 2): 5 and 9, and
            // u = 0.99 lands on the later one.
            let want = if top_k == 2 { 9 } else { 5 };
            assert_eq!(got, want, "PTX top_p {top_p} top_k {top_k} u {u}");
            assert_eq!(cpu[0], want, "CPU top_p {top_p} top_k {top_k} u {u}");
        }
    }
}

#[test]
fn top_p_threshold_inside_a_tie_group() {
    // Token 0 has logit 2, ten tokens (3, 7, …, 39) tie at 1, the rest are -3;
    // temperature 1, so the weights are 1, e^-1 ≈ 0.368 (×10) and e^-5.
    // top_p 0.5: the target 0.5·Z ≈ 2.437 needs ⌈(2.437 − 1)/0.368⌉ = 4 of the
    // tied tokens, the lowest-index ones: K = {0, 3, 7, 11, 15}. With u = 0.99
    // the index-order walk crosses 0.99·(1 + 4·0.368) ≈ 2.447 at token 15
    // (11 would mean 3 kept ties). top_k 3 keeps {0, 3, 7}: the walk ends at 7.
    for cols in [40, 41] {
        let mut row = vec![-3.0f32; cols];
        row[0] = 2.0;
        for j in (3..40).step_by(4) {
            row[j] = 1.0;
        }
        let spec = TopPSpec { rows: 1, cols, threads: 32 };
        for (top_p, top_k, want) in [(0.5f32, 0u32, 15), (1.0, 3, 7)] {
            let p = TopPParams { temperature: 1.0, top_p, top_k };
            let mut reference = vec![-1];
            spec.reference(&row, &[0.99], &p, &mut reference);
            assert_eq!(reference[0], want, "reference top_p {top_p} top_k {top_k}");
            assert_eq!(emulate_top_p(&spec, &row, &[0.99], &p)[0], want, "PTX top_p {top_p} top_k {top_k} cols {cols}");
            let mut cpu = vec![-1];
            spec.cpu(&row, &[0.99], &p, &mut cpu);
            assert_eq!(cpu[0], want, "CPU top_p {top_p} top_k {top_k} cols {cols}");
        }
    }
}

/// u just below 1 on many rows: the walk must end at the last kept token, and
/// on some rows f32 rounding leaves the sum of the kept weights at or below
/// `u · kept mass`, which takes the kernel's fallback (the last kept token of
/// positive weight).
#[test]
fn top_p_u_just_below_one() {
    let (rows, cols) = (128, 700);
    let mut rng = Rng::new(11);
    let x = rng.vec(rows * cols, 3.0);
    let u = vec![LAST_BELOW_ONE; rows];
    let spec = TopPSpec { rows, cols, threads: 64 };
    let p = TopPParams { temperature: 1.0, top_p: 0.9, top_k: 0 };
    let got = emulate_top_p(&spec, &x, &u, &p);
    let mut cpu = vec![-1; rows];
    spec.cpu(&x, &u, &p, &mut cpu);
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let ok = top_p_accepts(&spec, row, &p, u[r]);
        assert!(ok.contains(&(got[r] as usize)), "PTX row {r}: id {} not in {ok:?}", got[r]);
        assert!(ok.contains(&(cpu[r] as usize)), "CPU row {r}: id {} not in {ok:?}", cpu[r]);
    }
}

/// The real shapes once on the emulator: the 151936-token vocabulary (vector
/// loads, 18 index bits) and a half-filled 2048-key cache at Qwen-VL-Chat's
/// 32 heads × 128 with the model's splits.
#[test]
fn model_shapes_on_emulator() {
    let cols = 151_936;
    let mut rng = Rng::new(7);
    let mut x = rng.vec(cols, 6.0);
    x[123_457] = 9.0; // a clear favourite, and a tie for it further on
    x[150_001] = 9.0;

    let spec = &ArgmaxSpec::model_specs()[0];
    let mut want = vec![-1];
    spec.reference(&x, &mut want);
    assert_eq!(emulate_argmax(spec, &x), want);
    assert_eq!(want, vec![123_457]);

    let spec = &SoftmaxSpec::model_specs()[0];
    let mut dev = Device::new();
    let (xp, yp) = (dev.upload_f32(&x), dev.alloc_poisoned(cols * 4));
    let l = spec.launch();
    run(&spec.build(), l.grid, l.block, &[Arg::Ptr(xp), Arg::Ptr(yp)], &mut dev).unwrap_or_else(|e| panic!("{e}"));
    let mut want = vec![0f32; cols];
    spec.reference(&x, &mut want);
    let e = rel_l2(&dev.download_f32(yp, cols), &want);
    assert!(e <= SOFTMAX_TOL, "softmax rel L2 {e}");

    let spec = &TopPSpec::model_specs()[0];
    for (top_p, top_k, u) in [(0.9f32, 0u32, 0.37f32), (0.95, 40, 0.81)] {
        let p = TopPParams { temperature: 0.7, top_p, top_k };
        let got = emulate_top_p(spec, &x, &[u], &p)[0] as usize;
        let ok = top_p_accepts(spec, &x, &p, u);
        assert!(ok.contains(&got), "top-p {p:?}: id {got} not in {ok:?}");
    }

    let mut attn = DecodeAttnSpec::model_specs()[0];
    attn.out = DType::F32;
    assert_eq!((attn.batch, attn.heads, attn.head_dim, attn.max_seq), (1, 32, 128, 2048));
    let case = AttnCase::new(attn, vec![1000], 5);
    case.check(&case.emulate(), &case.reference(), ATTN_F32_TOL, "model shape").unwrap();
}

// ---- ptxas ---------------------------------------------------------------------------

/// Every model shape assembles for sm_80 and sm_90 without warnings or spills.
#[test]
fn model_specs_assemble() {
    let Some(ptxas) = ptxas::for_tests() else {
        eprintln!("ptxas not found: skipping the ptxas check");
        return;
    };
    let mut kernels = vec![];
    for s in DecodeAttnSpec::model_specs() {
        kernels.push(s.partial().build());
        kernels.push(s.combine().build());
    }
    kernels.extend(SoftmaxSpec::model_specs().iter().map(|s| s.build()));
    kernels.extend(ArgmaxSpec::model_specs().iter().map(|s| s.build()));
    kernels.extend(TopPSpec::model_specs().iter().map(|s| s.build()));
    for target in Target::ALL {
        for k in &kernels {
            let text = Module::new(target, vec![k.clone()]).print();
            let usage = ptxas::assemble(&ptxas, &text, target).unwrap_or_else(|e| panic!("{}: {e}", k.name));
            let u = &usage[0];
            println!(
                "{} {}: {} registers, spills {}/{} bytes, {} bytes smem",
                target.name(),
                u.name,
                u.registers,
                u.spill_stores,
                u.spill_loads,
                u.shared_bytes
            );
            assert_eq!((u.spill_stores, u.spill_loads), (0, 0), "{} spills on {}", u.name, target.name());
        }
    }
}
