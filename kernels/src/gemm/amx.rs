//! AMX tiles for the `--cpu-math fast` bf16 GEMMs and the exact GEMMs of
//! bf16 weights (Intel Sapphire Rapids and later: AMX-TILE + AMX-BF16).
//!
//! Exact GEMMs ([`gemm`] with [`SPLIT_PARTS`]) split each activation exactly into three
//! bf16 ([`split_bf16_bits`]) and multiply all three by the same B tiles:
//! three times the products of a fast GEMM, every one exact, f32 sums.
//!
//! One `tdpbf16ps` multiplies a 16×32 bf16 tile of A by a 32×16 tile of B
//! into a 16×16 f32 tile of C: 8192 products per instruction, at the
//! numerics of the `vdpbf16ps` path beside it ([`super::gemm_bf16_packed`]):
//! bf16 products summed in f32, inputs that are bf16 subnormals read as
//! zero. On the 2-core Xeon this was written on, 4 independent `tdpbf16ps`
//! per thread ran at 7.0–7.4 TFLOP/s, `vdpbf16ps` chains at 0.23; the GEMMs
//! here reach a fifth to a quarter of the tile peak (the kernel alone, every
//! operand in L1, about 60%: the tile loads, not the products, bound it). The operands are the ones that path already
//! prepares: A rounded to bf16 (nearest even) and B packed as 32-column
//! panels of k pairs, which is exactly the layout a B tile wants (row `q` of
//! a panel holds the pairs `(B[2q, j], B[2q+1, j])` of its 32 columns, so a
//! 16-column tile is every other 64 bytes).
//!
//! Stable Rust has no AMX intrinsics and no `amx-*` target features, so the
//! instructions are written in `asm!`; the compiler never allocates tile
//! registers, so state left in them between blocks is ours. Linux hands a
//! process the 8 KiB of tile state only after `arch_prctl(ARCH_REQ_XCOMP_PERM)`,
//! which [`available`] asks for once; every thread loads the tile
//! configuration before its first tile instruction ([`configure`]).
//!
//! Decode-sized GEMMs (1 to 16 rows of A, k a multiple of 32) run here too
//! ([`gemv`]), with the roles turned around (`Cᵀ = W · Aᵀ`): the weight rows
//! load straight into A tiles, so the weight stream is never repacked, and
//! the tiles' compute makes a batch of 8 cost little more than one. 2-layer
//! slice of Qwen-VL-Chat, 2 threads, two interleaved rounds: batch 8 at
//! 97–98 tok/s, 0.91 of the read floor (the exact dot path 58–63, the
//! `vdpbf16ps` one 55–57); batch 1 at 0.97 of it (exact 1.02).
//!
//! `QVC_AMX=0` turns the path off (the `vdpbf16ps` path runs instead), for
//! comparing the two.

use super::{pack_b_bf16_pairs, round_bf16_bits, tile_epilogue, with_aligned, Epilogue, Partition, NR_AVX512};
use crate::common::{gather, par_for, SyncPtr};
use crate::MatRef;
use qvc_ir::Elems;
use std::arch::asm;
use std::sync::OnceLock;

/// Rows of C one kernel call computes: two 16-row tiles.
pub(crate) const MR_AMX: usize = 32;
/// Elements of k one tile step consumes: a 64-byte tile row of bf16.
const K_STEP: usize = 32;
/// Kernel steps (32 elements of k each) per slice, and the most rows of a
/// task's A block: a task's 32-column B panel of one slice (16 KiB) stays
/// in L1 while the kernel runs it down the task's rows, whose slice of A
/// (at most `640 × 256` bf16, 320 KiB; 960 KiB in the exact split's three
/// parts) stays in L2 beside the staged C blocks for the `NB_AMX` panels of
/// a group. The first blocking (512 deep, all rows: 1 MiB of A at 1024
/// rows, 3 MiB split) left A streaming from L3 at the ViT's shapes.
/// Measured on the 2-core Sapphire Rapids guest (2 threads, best of 5,
/// interleaved rounds), fast: ViT c_proj 1024×8192→1664 1016–1094 →
/// 1352–1362 GFLOP/s, in_proj 1024×1664→4992 1029–1159 → 1188–1320, c_fc
/// 1024×1664→8192 1139–1258 → 1287–1595, prefill c_attn 300×4096→12288
/// 1185–1281 → 1309–1378; exact split: in_proj 479–493 → 613–673, c_proj
/// 436–501 → 523–553, c_fc about 507 → 637–653. 4 or 12 steps, or 320,
/// 480 or 960 rows, were no better overall.
const KC_STEPS: usize = 8;
const MC_AMX: usize = 640;
/// B panels per group: the C blocks of a group (`rows × 128` f32, 320 KiB
/// at 640 rows) stay in L2 across the slices; C itself is written once.
const NB_AMX: usize = 4;
/// How many steps ahead the kernel prefetches A into L1 (A streams from L2;
/// B's panel is reused down the rows and stays in L1).
const PREFETCH_STEPS: usize = 1;

/// Whether this process may run AMX-BF16 tiles: the CPU reports AMX-TILE and
/// AMX-BF16 with a palette of at least 8 tiles of 16 rows × 64 bytes, the OS
/// enabled the tile state (XCR0 bits 17 and 18), Linux granted it to this
/// process, AVX-512 BF16 is there for the rounding and packing around the
/// tiles, and `QVC_AMX` is not `0`/`off`. Asked once per process.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let off = std::env::var("QVC_AMX").is_ok_and(|v| matches!(v.trim(), "0" | "off" | "false"));
        !off && super::bf16_products_native() && cpu_has_amx_bf16() && linux_grants_tile_data()
    })
}

fn cpu_has_amx_bf16() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86-64 CPU.
    let (max_leaf, osxsave) = unsafe {
        let l0 = __cpuid(0);
        (l0.eax, __cpuid(1).ecx & (1 << 27) != 0)
    };
    if max_leaf < 0x1d || !osxsave {
        return false;
    }
    #[allow(unused_unsafe)]
    // SAFETY: as above; leaves up to `max_leaf` exist.
    let (l7, palette) = unsafe { (__cpuid_count(7, 0), __cpuid_count(0x1d, 1)) };
    let (amx_bf16, amx_tile) = (l7.edx & (1 << 22) != 0, l7.edx & (1 << 24) != 0);
    // Palette 1: bytes per row (EBX low), tile names (EBX high), rows (ECX low).
    let fits = palette.ebx & 0xffff >= 64 && palette.ebx >> 16 >= 8 && palette.ecx & 0xffff >= 16;
    // SAFETY: OSXSAVE is set, so XGETBV is enabled.
    let xcr0 = unsafe { xcr0() };
    amx_bf16 && amx_tile && fits && xcr0 & (3 << 17) == 3 << 17
}

#[target_feature(enable = "xsave")]
unsafe fn xcr0() -> u64 {
    std::arch::x86_64::_xgetbv(0)
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: without it the
/// first tile instruction of the process faults. The grant covers the whole
/// process, threads started before it included.
#[cfg(target_os = "linux")]
fn linux_grants_tile_data() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a plain system call; it reads no memory of ours, and the
    // registers the `syscall` instruction clobbers are declared.
    unsafe {
        asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL => ret, in("rdi") ARCH_REQ_XCOMP_PERM,
             in("rsi") XFEATURE_XTILEDATA, lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn linux_grants_tile_data() -> bool {
    false
}

/// The tile configuration every kernel here runs under: palette 1, tiles
/// 0-7 all 16 rows × 64 bytes. tmm0-3 accumulate a 32×32 block of C
/// (row halves × column halves), tmm4-5 hold A's two 16-row halves, tmm6-7
/// B's two 16-column halves.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64; // bytes per row (little-endian u16)
        c[48 + t] = 16; // rows
        t += 1;
    }
    TileConfig(c)
};

thread_local! {
    /// Whether this thread has loaded [`CONFIG`].
    static CONFIGURED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Loads [`CONFIG`] on this thread the first time. Every kernel here runs
/// under the same configuration, so it is loaded once per thread and kept:
/// the attention runs a tile kernel per 32×32 block of scores, where a
/// load and release around each call would cost a fair share of the call.
/// The price is the 8 KiB of tile state that a context switch saves for a
/// thread that has used the tiles.
///
/// SAFETY: [`available`] returned true.
pub(crate) unsafe fn configure() {
    CONFIGURED.with(|c| {
        if !c.get() {
            // SAFETY: AMX is usable (the caller's contract); CONFIG is a valid palette-1 configuration.
            unsafe { asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly)) };
            c.set(true);
        }
    })
}

/// One 32×32 block of C over `steps` × 32 elements of k: `c` (32 rows of
/// 32 floats, `ldc` floats apart) `+=` A's 32 rows × B's 32 columns, or `=`
/// when `!load` (the tiles start from zero instead of from `c`). `a` holds
/// the block's rows in tile order ([`pack_a`]: per step, `parts` blocks of
/// 32 rows × 32 bf16, each contiguous); `b` a 32-column panel of pairs
/// ([`pack_b_bf16_pairs`]), 16 pair rows per step. Each step loads B's two
/// tiles once and multiplies every part of A's by them (`parts` is 1 for
/// rounded activations, [`SPLIT_PARTS`] for the exact split). Every tile is
/// 1 or 2 KiB of consecutive memory, so no load strides across pages or
/// cache sets.
///
/// SAFETY: [`configure`]d on this thread; `a` holds `1024 * parts * steps`
/// bf16, `b` `16 * steps` rows of 32 dwords, `c` 32 rows of 32 floats `ldc`
/// apart.
unsafe fn kernel(steps: usize, parts: usize, a: *const u16, b: *const u32, c: *mut f32, ldc: usize, load: bool) {
    let (c2, ldc) = (c.add(16 * ldc), ldc * 4);
    if load {
        asm!(
            "tileloadd tmm0, [{c} + {ld}]",
            "tileloadd tmm1, [{c} + {ld} + 64]",
            "tileloadd tmm2, [{c2} + {ld}]",
            "tileloadd tmm3, [{c2} + {ld} + 64]",
            c = in(reg) c, c2 = in(reg) c2, ld = in(reg) ldc, options(nostack, readonly),
        );
    } else {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
    }
    // A load into a tile cannot overlap the products still reading it, so
    // each unit's loads go in as soon as the tile they replace has been read
    // for the last time, and the tile unit has products queued while the
    // next operands arrive. A unit is one part of one step: B's tiles are
    // reloaded only where a step begins.
    asm!(
        "tileloadd tmm4, [{a} + {lda}]",
        "tileloadd tmm6, [{b} + {ldb}]",
        "tileloadd tmm7, [{b} + {ldb} + 64]",
        "tileloadd tmm5, [{a} + {lda} + 1024]",
        a = in(reg) a, b = in(reg) b, lda = in(reg) 64usize, ldb = in(reg) NR_AVX512 * 4,
        options(nostack, readonly),
    );
    for u in 1..steps * parts {
        // A prefetch is only a hint (it never faults), so the last units may
        // point past A: `wrapping_add` keeps that address arithmetic defined.
        let next = a.wrapping_add((u + PREFETCH_STEPS) * 1024) as *const i8;
        for line in 0..32 {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(next.wrapping_add(64 * line));
        }
        if u % parts == 0 {
            asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm4, [{a} + {lda}]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tileloadd tmm6, [{b} + {ldb}]",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm7, [{b} + {ldb} + 64]",
                "tileloadd tmm5, [{a} + {lda} + 1024]",
                a = in(reg) a.add(u * 1024),
                b = in(reg) b.add(u / parts * 16 * NR_AVX512),
                lda = in(reg) 64usize,
                ldb = in(reg) NR_AVX512 * 4,
                options(nostack, readonly),
            );
        } else {
            asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm4, [{a} + {lda}]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm5, [{a} + {lda} + 1024]",
                a = in(reg) a.add(u * 1024),
                lda = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
    }
    products();
    asm!(
        "tilestored [{c} + {ld}], tmm0",
        "tilestored [{c} + {ld} + 64], tmm1",
        "tilestored [{c2} + {ld}], tmm2",
        "tilestored [{c2} + {ld} + 64], tmm3",
        c = in(reg) c, c2 = in(reg) c2, ld = in(reg) ldc, options(nostack),
    );
}

/// The four products of one step: C's 2×2 tiles += A's two row halves ×
/// B's two column halves.
///
/// SAFETY: [`configure`]d on this thread, A and B loaded into tmm4-7.
#[inline(always)]
unsafe fn products() {
    asm!(
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        options(nostack, nomem),
    );
}

/// The 16-lane halves of a row of `cols ≤ 32` floats that hold any: (offset, lane mask).
fn halves(cols: usize) -> impl Iterator<Item = (usize, u16)> {
    [(0, cols.min(16)), (16, cols.saturating_sub(16))]
        .into_iter()
        .filter(|&(_, w)| w > 0)
        .map(|(j, w)| (j, if w == 16 { u16::MAX } else { (1u16 << w) - 1 }))
}

/// C's block (the first `rows` × `cols` of it, `ldc` apart) `=` or `+=` the
/// finished 32×32 block `t` (rows 32 floats apart), 16 lanes at a time,
/// masked at the edges.
#[target_feature(enable = "avx512f")]
unsafe fn merge(t: *const f32, c: *mut f32, ldc: usize, rows: usize, cols: usize, overwrite: bool) {
    use std::arch::x86_64::*;
    for r in 0..rows {
        for (j, mask) in halves(cols) {
            let (src, dst) = (t.add(r * 32 + j), c.add(r * ldc + j));
            let mut v = _mm512_load_ps(src);
            if !overwrite {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, dst));
            }
            _mm512_mask_storeu_ps(dst, mask, v);
        }
    }
}

/// `C[rows × cols] (+)= A panel · B panel` for [`super::PanelGemm`]'s AMX
/// mode: `a` one 32-row panel in tile order ([`pack_a`]), `b` one 32-column
/// panel of pairs, `steps` × 32 deep; overwrite C when `overwrite`, else
/// add. A whole 32×32 block is loaded and stored in place; a ragged one goes
/// through a staging block.
///
/// SAFETY: [`available`]; the panels hold `steps` steps; C covers `rows ≤
/// 32` rows of `cols ≤ 32` elements, `ldc` apart, and no other thread
/// touches them.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tile(
    steps: usize,
    a: *const u16,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    overwrite: bool,
) {
    use std::arch::x86_64::*;
    configure();
    if rows == MR_AMX && cols == NR_AVX512 {
        return kernel(steps, 1, a, b, c, ldc, !overwrite);
    }
    let mut t = Block([0f32; 1024]);
    if !overwrite {
        for r in 0..rows {
            for (j, mask) in halves(cols) {
                _mm512_store_ps(t.0.as_mut_ptr().add(r * 32 + j), _mm512_maskz_loadu_ps(mask, c.add(r * ldc + j)));
            }
        }
    }
    kernel(steps, 1, a, b, t.0.as_mut_ptr(), 32, !overwrite);
    merge(t.0.as_ptr(), c, ldc, rows, cols, true);
}

thread_local! {
    /// The calling thread's A rounded to bf16 in tile order (see [`pack_a`]).
    static A_BF16: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Each thread's dequantized int4 B panel (see [`gemm_q4`]).
    static Q4_PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Each thread's C blocks in progress (see [`gemm`]).
    static C_STAGE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `C = round_bf16(A) · B` (or `+=` when `accumulate`), then `epi` on each
/// finished block: the contract and partition of [`super::gemm_bf16_packed`]
/// on AMX tiles. A is rounded once into tile order ([`pack_a`]). Each task
/// takes its column panels `NB_AMX` at a time and goes through k in slices
/// of `KC_STEPS` kernel steps; in each slice it packs one 32-column B panel
/// at a time and runs the 32×32 tile kernel down its rows, the partial sums
/// kept in tile-ordered staging blocks (L2) until the last slice merges
/// them into C and runs the epilogue. That with `parts` 1; with `parts`
/// [`SPLIT_PARTS`], `C = A · B` to f32 rounding (the exact GEMMs): A split
/// exactly into three bf16 per element ([`split_bf16_bits`]), so every
/// product of a part and a weight is exact and only the f32 sums round, as
/// in the FMA path (in another order). Three times the tile work, on the
/// same blocking.
///
/// SAFETY: [`available`]; `a` and `b` checked (`MatRef::check`), `w` is
/// `b`'s data; C covers `m` rows of `n` elements, `ldc` apart; m, n, k > 0;
/// `parts` is 1 or [`SPLIT_PARTS`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    a: &MatRef,
    b: &MatRef,
    w: &[half::bf16],
    parts: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
    epi: Option<Epilogue>,
) {
    let pack = |q0: usize, kp: usize, j: usize, cols: usize, bp: &mut [u32]| {
        // SAFETY: AVX-512 BW (this function's contract); `b.check` bounds
        // every element read; `bp` holds 32 × kp dwords.
        unsafe { pack_b_bf16_pairs(b, w, q0, kp, j, cols, bp) }
    };
    gemm_with(a, b.cols, parts, &pack, c, ldc, accumulate, parallel, epi)
}

/// `pack_b(q0, kp, j, cols, panel)`: see [`gemm_with`].
type PackB<'p> = dyn Fn(usize, usize, usize, usize, &mut [u32]) + Sync + 'p;

/// `C = round_bf16(A) · B` (`parts` 1) or `C = A · B` through A's exact
/// split (`parts` [`SPLIT_PARTS`]) for a B of `n` columns (and A's k rows)
/// that `pack_b(q0, kp, j, cols, panel)` packs, 32 columns `j..j + cols` of
/// pair rows `q0..q0 + kp` at a time, zero past k and past `cols`:
/// [`gemm`]'s body, shared with the exact split ([`gemm`] with [`SPLIT_PARTS`]) and the
/// int4 weights ([`gemm_q4`]).
///
/// SAFETY: as [`gemm`]; `pack_b` fills the whole panel.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_with(
    a: &MatRef,
    n: usize,
    parts: usize,
    pack_b: &PackB,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
    epi: Option<Epilogue>,
) {
    let (m, k) = (a.rows, a.cols);
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n, "gemm: C too small for {m}x{n} with ldc {ldc}");
    let steps = k.div_ceil(K_STEP);
    let npanels = n.div_ceil(NR_AVX512);
    let part = Partition::new(m, MR_AMX, npanels, parallel, MC_AMX);
    let cp = SyncPtr(c.as_mut_ptr());
    with_aligned(&A_BF16, m.div_ceil(MR_AMX) * steps * parts * 1024, |abuf| {
        pack_a(a, abuf, steps, parts, parallel);
        let abuf: &[u16] = abuf;
        par_for(part.mblocks * part.nsplit, parallel, |t| {
            let (mb, ns) = (t / part.nsplit, t % part.nsplit);
            let (i_lo, i_hi) = (mb * part.mc, (mb * part.mc + part.mc).min(m));
            let (jr_lo, jr_hi) = part.panels(ns);
            let row_blocks = (i_hi - i_lo).div_ceil(MR_AMX);
            let kc_steps = KC_STEPS.min(steps);
            with_aligned(&super::B_PAIRS_BUF, NR_AVX512 * kc_steps * 16, |bp| {
                with_aligned(&C_STAGE, row_blocks * NB_AMX * 1024, |stage| {
                    // SAFETY: `available` (this function's contract).
                    unsafe { configure() };
                    for jg in (jr_lo..jr_hi).step_by(NB_AMX) {
                        let group = jg..(jg + NB_AMX).min(jr_hi);
                        for s0 in (0..steps).step_by(KC_STEPS) {
                            let ks = KC_STEPS.min(steps - s0);
                            for jr in group.clone() {
                                let (j, cols) = (jr * NR_AVX512, NR_AVX512.min(n - jr * NR_AVX512));
                                pack_b(16 * s0, 16 * ks, j, cols, bp);
                                for rb in 0..row_blocks {
                                    let ab = (i_lo / MR_AMX + rb) * steps + s0;
                                    let cs = (rb * NB_AMX + jr - jg) * 1024;
                                    // SAFETY: block `ab` and the next ks - 1 lie in A's
                                    // packed rows; the panel holds 16·ks pair rows; the
                                    // staging block is this thread's.
                                    unsafe {
                                        kernel(
                                            ks,
                                            parts,
                                            abuf.as_ptr().add(ab * parts * 1024),
                                            bp.as_ptr(),
                                            stage.as_mut_ptr().add(cs),
                                            32,
                                            s0 > 0,
                                        )
                                    };
                                }
                            }
                        }
                        // The group's finished blocks into C, then the epilogue
                        // once per row over the whole group (up to 128 columns):
                        // per 32-column block its calls cost more than the
                        // block's products.
                        let (j_lo, j_hi) = (jg * NR_AVX512, (group.end * NR_AVX512).min(n));
                        for rb in 0..row_blocks {
                            let i = i_lo + rb * MR_AMX;
                            let rows = MR_AMX.min(i_hi - i);
                            for jr in group.clone() {
                                let (j, cols) = (jr * NR_AVX512, NR_AVX512.min(n - jr * NR_AVX512));
                                let cs = (rb * NB_AMX + jr - jg) * 1024;
                                // SAFETY: C's block is this task's alone (the partition).
                                unsafe {
                                    merge(
                                        stage.as_ptr().add(cs),
                                        cp.get().add(i * ldc + j),
                                        ldc,
                                        rows,
                                        cols,
                                        !accumulate,
                                    )
                                };
                            }
                            if let Some(f) = epi {
                                // SAFETY: rows i.., columns j_lo..j_hi are this task's.
                                unsafe { tile_epilogue(f, cp, ldc, (i, rows), (j_lo, j_hi - j_lo)) };
                            }
                        }
                    }
                });
            });
        });
    });
}

/// `C = round_bf16(A) · B` for int4 weights under `--cpu-math fast`: `a`
/// the activations already gathered through act-order's permutation (`m ×
/// k`, [`crate::q4`]'s `xg`), `b` the stored-row view of `w` that
/// [`crate::q4::pack_b_q4`] packs (`B(p, j) = W[j, stored row p]`). Each B
/// panel is dequantized exactly to f32 (`(q − z)·s`) by that packer, then
/// rounded to bf16 pairs: the weights lose what bf16 cannot hold of
/// `(q − z)·s` (up to 2⁻⁹ relative), as the activations do.
///
/// SAFETY: [`available`]; `a` is m × k f32 rows; C covers `m` rows of `n =
/// b.cols` elements, `ldc` apart; m, n, k > 0.
pub(crate) unsafe fn gemm_q4(
    a: &MatRef,
    b: &MatRef,
    w: &qvc_ir::Q4Ref,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) {
    let k = a.cols;
    let pack = |q0: usize, kp: usize, j: usize, cols: usize, bp: &mut [u32]| {
        let (p0, kc) = (2 * q0, (2 * kp).min(k - 2 * q0));
        with_aligned(&Q4_PANEL, 2 * kp * NR_AVX512, |f| {
            f[kc * NR_AVX512..].fill(0.0);
            crate::q4::pack_b_q4(crate::Isa::Avx512, w, b, p0, kc, j, cols, NR_AVX512, f);
            // SAFETY: AVX-512 BF16 and BW (the contract); `f` holds 2·kp
            // rows of 32 floats, `bp` kp rows of 32 dwords.
            unsafe { pairs_from_f32(f, kp, bp) };
        })
    };
    gemm_with(a, b.cols, 1, &pack, c, ldc, accumulate, parallel, None)
}

/// `bp[q·32 + j]` = the bf16 pair (`f[2q·32 + j]`, `f[(2q+1)·32 + j]`),
/// each rounded to nearest even: a 32-column f32 panel of `2·kp` rows as a
/// B panel of pairs.
///
/// SAFETY: AVX-512 F, BW and BF16; `f` holds `64·kp` floats, `bp` `32·kp`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pairs_from_f32(f: &[f32], kp: usize, bp: &mut [u32]) {
    use std::arch::x86_64::*;
    debug_assert!(f.len() >= 64 * kp && bp.len() >= 32 * kp);
    // Word 2j of the result from word j of row 2q, word 2j + 1 from row 2q + 1.
    let lo = _mm512_set_epi16(
        47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1,
        32, 0,
    );
    let hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    let row = |r: usize| {
        let p = f.as_ptr().add(r * 32);
        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p.add(16)), _mm512_loadu_ps(p)))
    };
    for q in 0..kp {
        let (r0, r1) = (row(2 * q), row(2 * q + 1));
        let out = bp.as_mut_ptr().add(q * 32) as *mut __m512i;
        _mm512_storeu_si512(out, _mm512_permutex2var_epi16(r0, lo, r1));
        _mm512_storeu_si512(out.add(1), _mm512_permutex2var_epi16(r0, hi, r1));
    }
}

/// A 32×32 f32 block on a 64-byte boundary (tile stores, aligned loads).
#[repr(C, align(64))]
struct Block([f32; 1024]);

/// A in tile order, as `parts` bf16 blocks per step: block `(rb, s, t)` at
/// `abuf[((rb * steps + s) * parts + t) * 1024..]` holds rows `32 rb..32 rb
/// + 32` × elements `32 s..32 s + 32`, row by row (the two 16-row tiles of
/// a kernel unit, one after the other); zero past m and past k. With one
/// part, A rounded to bf16 (nearest even); with [`SPLIT_PARTS`], A split
/// exactly into three bf16 ([`split_bf16_bits`]), stored `lo`, `mid`, `hi`.
///
/// SAFETY: AVX-512F and BF16; `abuf` holds `ceil(m / 32) * steps * parts *
/// 1024` elements, `steps * 32 ≥ k`; `parts` is 1 or [`SPLIT_PARTS`].
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn pack_a(a: &MatRef, abuf: &mut [u16], steps: usize, parts: usize, parallel: bool) {
    let (m, k) = (a.rows, a.cols);
    debug_assert!(parts == 1 || parts == SPLIT_PARTS);
    let pack = |rb: usize, block: &mut [u16]| {
        // A row as f32: in place for contiguous f32 rows (the attention's
        // probabilities, the activations), else gathered and widened once.
        let mut widened = Vec::new();
        for r in 0..MR_AMX {
            let i = rb * MR_AMX + r;
            let src: &[f32] = match (&a.data, a.col_stride) {
                _ if i >= m => &[],
                (Elems::F32(d), 1) => &d[a.index(i, 0)..][..k],
                _ => {
                    widened.resize(k, 0.0);
                    gather(&a.data, a.index(i, 0), a.col_stride, &mut widened);
                    &widened
                }
            };
            // Each 32-element step straight into its tile rows, zero past k
            // (and for rows past m).
            for s in 0..steps {
                let (lo, hi) = ((s * K_STEP).min(src.len()), ((s + 1) * K_STEP).min(src.len()));
                let row = |t: usize| (s * parts + t) * 1024 + r * K_STEP;
                if parts == 1 {
                    let dst = &mut block[row(0)..][..K_STEP];
                    // SAFETY: AVX-512F + BF16 (the caller's contract); equal lengths.
                    unsafe { round_bf16_bits(&src[lo..hi], &mut dst[..hi - lo]) };
                    dst[hi - lo..].fill(0);
                } else {
                    // SAFETY: AVX-512F + BW (the caller's contract); at most 32 elements.
                    let parts = unsafe { split_lo_first(&src[lo..hi]) };
                    for (t, part) in parts.iter().enumerate() {
                        block[row(t)..][..K_STEP].copy_from_slice(part);
                    }
                }
            }
        }
    };
    let block = steps * parts * 1024;
    if parallel && m * k >= 1 << 15 {
        use rayon::prelude::*;
        abuf.par_chunks_mut(block).enumerate().for_each(|(rb, b)| pack(rb, b));
    } else {
        abuf.chunks_mut(block).enumerate().for_each(|(rb, b)| pack(rb, b));
    }
}

/// Parts of A's exact split: three bf16 carry an f32's 24-bit significand.
pub(crate) const SPLIT_PARTS: usize = 3;

/// [`split_bf16_bits`] of up to 32 elements in the order both packers
/// store the parts: smallest first (`lo`, `mid`, `hi`), so a step's first
/// sums, `lo + mid` times a weight, are exact, and `hi` rounds once.
///
/// SAFETY: AVX-512F and BW; `src.len() ≤ 32`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn split_lo_first(src: &[f32]) -> [[u16; K_STEP]; SPLIT_PARTS] {
    let mut split = [[0u16; K_STEP]; SPLIT_PARTS];
    // SAFETY: the caller's contract.
    unsafe { split_bf16_bits(src, &mut split) };
    split.reverse();
    split
}

/// `x = hi + mid + lo` exactly, each a bf16, for up to 32 elements of `src`
/// (`out[t][e]`, zero past `src`): `hi` is `x` cut to bf16 (truncated, so
/// never rounded up past the largest finite value), `mid` the rest cut the
/// same way, `lo` what remains, which has at most 8 significant bits and so
/// is a bf16. Each product with a bf16 weight is then exact in f32, and a
/// dot product over the three parts is the f32 dot product up to the order
/// of its f32 sums. A value whose cut is itself (zero, ±∞, a bf16) leaves
/// nothing for the lower parts: an infinity must not become `∞ − ∞`. The
/// tiles read bf16 subnormals as zero, so parts below 2⁻¹²⁶ drop out: `lo`
/// of an |x| under about 2⁻¹¹⁰, `hi` only of an x that is itself an f32
/// subnormal.
///
/// SAFETY: AVX-512F and BW; `src.len() ≤ 32`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn split_bf16_bits(src: &[f32], out: &mut [[u16; K_STEP]; SPLIT_PARTS]) {
    use std::arch::x86_64::*;
    debug_assert!(src.len() <= K_STEP);
    let top = _mm512_set1_epi32(0xffff_0000u32 as i32);
    for h in 0..2 {
        let w = src.len().saturating_sub(16 * h).min(16);
        let mut x = _mm512_maskz_loadu_ps(((1u32 << w) - 1) as __mmask16, src.as_ptr().wrapping_add(16 * h));
        for part in out.iter_mut() {
            let cut = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), top));
            let bits = _mm512_srli_epi32::<16>(_mm512_castps_si512(cut));
            _mm256_storeu_si256(part.as_mut_ptr().add(16 * h) as *mut __m256i, _mm512_cvtepi32_epi16(bits));
            // The rest, where the cut changed anything (NaN ≠ NaN keeps a NaN's rest NaN).
            let changed = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(x, cut);
            x = _mm512_maskz_sub_ps(changed, x, cut);
        }
    }
}

/// Flops of one trip of [`dot_loop`]: 4 `tdpbf16ps` of 16×16×32 products,
/// each product and its add counted as 2.
pub const DOT_LOOP_FLOPS_PER_ITER: u64 = 4 * 16 * 16 * 32 * 2;

/// The AMX analogue of [`crate::peak::bf16_dot_loop`]: `iters` trips of four
/// independent `tdpbf16ps` (into tmm0-3, from tiles loaded once) on the
/// calling thread. `(0, 0.0)` where [`available`] is false.
pub fn dot_loop(iters: usize) -> (u64, f32) {
    if !available() {
        return (0, 0.0);
    }
    let ones = Block([f32::from_bits(0x3f80_3f80); 1024]); // bf16 pairs (1.0, 1.0)
    let mut out = Block([0f32; 1024]);
    // SAFETY: `available`; the loads read 16 rows of 64 bytes from `ones`
    // (4 KiB), the store writes 16 rows of 64 bytes into `out`.
    unsafe {
        configure();
        asm!(
            "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
            "tileloadd tmm4, [{p} + {ld}]", "tileloadd tmm5, [{p} + {ld}]",
            "tileloadd tmm6, [{p} + {ld}]", "tileloadd tmm7, [{p} + {ld}]",
            p = in(reg) ones.0.as_ptr(), ld = in(reg) 64usize, options(nostack, readonly),
        );
        for _ in 0..iters {
            products();
        }
        asm!("tilestored [{p} + {ld}], tmm0", p = in(reg) out.0.as_mut_ptr(), ld = in(reg) 64usize, options(nostack));
    }
    (iters as u64 * DOT_LOOP_FLOPS_PER_ITER, out.0[0])
}

// ------------------------------------------------------------ decode

/// Most rows of A the tile decode path takes: one B tile of 16 columns.
pub(crate) const GEMV_M_MAX: usize = 16;

/// Weight rows per kernel call of [`gemv`]: one 16-row tile. Two tiles
/// (32 rows in flight at once) read 25–28 GB/s at m = 1 where one tile
/// read 29–33 (2 threads, from DRAM): 16 concurrent row streams suit the
/// prefetchers better than 32, and software prefetching did not help.
const GEMV_ROWS: usize = 16;

/// `C = round_bf16(A) · Wᵀ` (or `+=`) for decode-sized A (`m ≤ 16` rows)
/// against a bf16 weight stored `[n, k]` (row `j` at `w[off + j·cs..]`), on
/// AMX tiles with the roles turned around: `Cᵀ = W · Aᵀ`. The weight rows
/// are the A tiles, read where they lie (16 rows × 32 elements, `cs` apart),
/// so nothing is repacked per weight byte; the activations are the B tiles,
/// packed once per call as columns of k pairs (zero past the last). Each C
/// element is its own row's and column's sum over the k steps in order, so
/// a row of A gets the same bits whatever m is (batch-invariant) and
/// wherever the tasks split the weight rows.
///
/// `a16` holds `m · parts` rows of `k` bf16 bit patterns: with `parts` 1, A
/// rounded to bf16; with [`SPLIT_PARTS`], A's exact split, row `3i + t`
/// part `t` (`lo`, `mid`, `hi`) of row `i` ([`split_rows`]). Each part is a
/// column of its own (up to 48 columns: three B and C tiles), and row `i`
/// of C is `(lo + mid) + hi` of its three sums: every product exact, f32
/// sums, the same bits whatever m is. The weight stream is the same, so a
/// decode step reads what it did; the tiles' compute (at most three
/// products per 1 KiB weight tile) stays far below the memory's pace.
///
/// SAFETY: [`available`]; `k` a multiple of 32; `m · parts ≤ 48`; `w`
/// holds every row's `k` elements; C covers `m` rows of `n` elements,
/// `ldc` apart, and no other thread touches them.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemv(
    a16: &[u16],
    m: usize,
    parts: usize,
    k: usize,
    w: &[half::bf16],
    off: usize,
    cs: usize,
    n: usize,
    c: SyncPtr,
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) {
    let cols = m * parts;
    debug_assert!((1..=GEMV_M_MAX).contains(&m) && k.is_multiple_of(K_STEP) && a16.len() >= cols * k);
    debug_assert!(parts == 1 || parts == SPLIT_PARTS);
    // B and C tiles: 16 columns each.
    let tiles = cols.div_ceil(16);
    // Aᵀ as the B tiles of every step: step s, tile t, pair row q, lane l
    // = (row 16t + l of a16 at 2p, at 2p + 1) with p = 16s + q, zero past
    // the last row. In a kept buffer: a fresh 128-352 KiB allocation per
    // call would be fresh pages, faulted in every time.
    with_aligned(&GEMV_BT, k / 2 * 16 * tiles, |bt| {
        // One sequential pass over the buffer, the rows read side by side.
        for (u, pairs) in bt.chunks_exact_mut(16).enumerate() {
            let (s, t, q) = (u / (16 * tiles), u / 16 % tiles, u % 16);
            let p = 16 * s + q;
            for (l, d) in pairs.iter_mut().enumerate() {
                let r = 16 * t + l;
                *d = if r < cols { a16[r * k + 2 * p] as u32 | (a16[r * k + 2 * p + 1] as u32) << 16 } else { 0 };
            }
        }
        let bt: &[u32] = bt;
        let steps = k / K_STEP;
        let groups = n.div_ceil(GEMV_ROWS);
        let per_task = if parallel { groups.div_ceil(4 * rayon::current_num_threads()).max(1) } else { groups };
        par_for(groups.div_ceil(per_task), parallel, |t| {
            // SAFETY: `off` lies in `w` (the caller's contract).
            let base = unsafe { w.as_ptr().add(off) } as *const u16;
            // SAFETY: `available` (the caller's contract).
            unsafe { configure() };
            let mut out = Block([0f32; 1024]);
            for g in t * per_task..((t + 1) * per_task).min(groups) {
                let j = g * GEMV_ROWS;
                let rows = GEMV_ROWS.min(n - j);
                if rows == GEMV_ROWS {
                    // SAFETY: rows j..j + 16 lie in `w` (the caller's contract).
                    unsafe { gemv_kernel(steps, tiles, base.add(j * cs), cs, bt.as_ptr(), out.0.as_mut_ptr()) };
                } else {
                    // The ragged last rows through a zero-padded copy (each row's
                    // sums are its own, so the copy changes no bits).
                    let mut stage = vec![0u16; GEMV_ROWS * k];
                    for r in 0..rows {
                        // SAFETY: row j + r lies in `w`; the stage holds 16 rows of k.
                        unsafe {
                            std::ptr::copy_nonoverlapping(base.add((j + r) * cs), stage.as_mut_ptr().add(r * k), k)
                        };
                    }
                    // SAFETY: the stage holds 16 rows of k elements.
                    unsafe { gemv_kernel(steps, tiles, stage.as_ptr(), k, bt.as_ptr(), out.0.as_mut_ptr()) };
                }
                // Column `col` of weight row r: tile col / 16, lane col % 16.
                let at = |r: usize, col: usize| out.0[col / 16 * 256 + r * 16 + col % 16];
                for r in 0..rows {
                    for i in 0..m {
                        let v =
                            if parts == 1 { at(r, i) } else { (at(r, 3 * i) + at(r, 3 * i + 1)) + at(r, 3 * i + 2) };
                        // SAFETY: element (i, j + r) of C, in this task's rows.
                        unsafe {
                            let dst = c.get().add(i * ldc + j + r);
                            *dst = if accumulate { *dst + v } else { v };
                        }
                    }
                }
            }
        });
    })
}

/// A's rows (`m × k` f32) split exactly into three bf16 each
/// ([`split_bf16_bits`]) as [`gemv`]'s `a16` with [`SPLIT_PARTS`]: row `3i
/// + t` is part `t` of row `i`, smallest first (`lo`, `mid`, `hi`).
///
/// SAFETY: AVX-512 F and BW; `rows.len() == m · k`, `out.len() == 3 · m · k`.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn split_rows(rows: &[f32], m: usize, k: usize, out: &mut [u16]) {
    debug_assert!(rows.len() == m * k && out.len() == SPLIT_PARTS * m * k);
    for i in 0..m {
        for p0 in (0..k).step_by(K_STEP) {
            let chunk = &rows[i * k + p0..i * k + (p0 + K_STEP).min(k)];
            // SAFETY: AVX-512 F and BW (the caller's contract); at most 32 elements.
            let parts = unsafe { split_lo_first(chunk) };
            for (t, part) in parts.iter().enumerate() {
                out[(SPLIT_PARTS * i + t) * k + p0..][..chunk.len()].copy_from_slice(&part[..chunk.len()]);
            }
        }
    }
}

thread_local! {
    /// The calling thread's packed activations for [`gemv`].
    static GEMV_BT: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// 16 weight rows (`ws` elements apart from `w`) against `tiles` (1 to 3)
/// B tiles per step at `bt` over `steps` × 32 elements of k, into `out`
/// (tile t's 16 rows × 16 columns at `out + 256 t`). One accumulator tile
/// per B tile (tmm0-2) takes the steps in order. With one tile, even steps
/// load the operands into tmm4/tmm6, odd ones into tmm5/tmm7, so a step's
/// loads need not wait for the product reading the last step's tiles; with
/// two, the odd steps' B tiles go to tmm2/tmm3; with three (B in tmm6,
/// tmm7, tmm3), only the weight tile alternates.
///
/// SAFETY: [`configure`]d on this thread; 16 rows of `32 · steps` elements
/// at `w`; `bt` holds `16 · tiles · steps` rows of 16 dwords; `out` 256 ·
/// `tiles` floats.
#[inline(always)]
unsafe fn gemv_kernel(steps: usize, tiles: usize, w: *const u16, ws: usize, bt: *const u32, out: *mut f32) {
    let stride = ws * 2;
    asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", options(nostack, nomem));
    let mut s = 0;
    while s + 2 <= steps {
        let (b, w) = (bt.add(s * 256 * tiles), w.add(s * K_STEP));
        match tiles {
            1 => asm!(
                "tileloadd tmm6, [{b} + {l64}]",
                "tileloadd tmm4, [{w} + {ld}]",
                "tileloadd tmm7, [{b} + {l64} + 1024]",
                "tileloadd tmm5, [{w} + {ld} + 64]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm0, tmm5, tmm7",
                b = in(reg) b, w = in(reg) w, ld = in(reg) stride, l64 = in(reg) 64usize,
                options(nostack, readonly),
            ),
            2 => asm!(
                "tileloadd tmm4, [{w} + {ld}]",
                "tileloadd tmm6, [{b} + {l64}]",
                "tileloadd tmm7, [{b} + {l64} + 1024]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{w} + {ld} + 64]",
                "tileloadd tmm2, [{b} + {l64} + 2048]",
                "tileloadd tmm3, [{b} + {l64} + 3072]",
                "tdpbf16ps tmm0, tmm5, tmm2",
                "tdpbf16ps tmm1, tmm5, tmm3",
                b = in(reg) b, w = in(reg) w, ld = in(reg) stride, l64 = in(reg) 64usize,
                options(nostack, readonly),
            ),
            _ => asm!(
                "tileloadd tmm4, [{w} + {ld}]",
                "tileloadd tmm6, [{b} + {l64}]",
                "tileloadd tmm7, [{b} + {l64} + 1024]",
                "tileloadd tmm3, [{b} + {l64} + 2048]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm4, tmm3",
                "tileloadd tmm5, [{w} + {ld} + 64]",
                "tileloadd tmm6, [{b} + {l64} + 3072]",
                "tileloadd tmm7, [{b} + {l64} + 4096]",
                "tileloadd tmm3, [{b} + {l64} + 5120]",
                "tdpbf16ps tmm0, tmm5, tmm6",
                "tdpbf16ps tmm1, tmm5, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm3",
                b = in(reg) b, w = in(reg) w, ld = in(reg) stride, l64 = in(reg) 64usize,
                options(nostack, readonly),
            ),
        }
        s += 2;
    }
    if s < steps {
        let (b, w) = (bt.add(s * 256 * tiles), w.add(s * K_STEP));
        match tiles {
            1 => asm!(
                "tileloadd tmm6, [{b} + {l64}]",
                "tileloadd tmm4, [{w} + {ld}]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                b = in(reg) b, w = in(reg) w, ld = in(reg) stride, l64 = in(reg) 64usize,
                options(nostack, readonly),
            ),
            2 => asm!(
                "tileloadd tmm4, [{w} + {ld}]",
                "tileloadd tmm6, [{b} + {l64}]",
                "tileloadd tmm7, [{b} + {l64} + 1024]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                b = in(reg) b, w = in(reg) w, ld = in(reg) stride, l64 = in(reg) 64usize,
                options(nostack, readonly),
            ),
            _ => asm!(
                "tileloadd tmm4, [{w} + {ld}]",
                "tileloadd tmm6, [{b} + {l64}]",
                "tileloadd tmm7, [{b} + {l64} + 1024]",
                "tileloadd tmm3, [{b} + {l64} + 2048]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm4, tmm3",
                b = in(reg) b, w = in(reg) w, ld = in(reg) stride, l64 = in(reg) 64usize,
                options(nostack, readonly),
            ),
        }
    }
    asm!("tilestored [{o} + {l64}], tmm0", o = in(reg) out, l64 = in(reg) 64usize, options(nostack));
    if tiles > 1 {
        asm!("tilestored [{o} + {l64}], tmm1", o = in(reg) out.add(256), l64 = in(reg) 64usize, options(nostack));
    }
    if tiles > 2 {
        asm!("tilestored [{o} + {l64}], tmm2", o = in(reg) out.add(512), l64 = in(reg) 64usize, options(nostack));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{Rng, StoredMat};
    use proptest::prelude::*;
    use qvc_ir::{DType, Elems};

    /// `C (+)= round_bf16(A)·B` then the test epilogue, in f64, and the
    /// error each element may carry: f32 sums of `k` products (the bound of
    /// `tests/gemm_isa.rs`).
    fn reference(a: &MatRef, b: &MatRef, c0: &[f32], acc: bool, epi: bool) -> Vec<(f64, f64)> {
        reference_with(a, b, c0, acc, epi, 1)
    }

    /// [`reference`] for A rounded to bf16 (`parts` 1) or, with
    /// [`SPLIT_PARTS`], A as it is: the exact split's f32 sums run over
    /// three terms per product.
    fn reference_with(a: &MatRef, b: &MatRef, c0: &[f32], acc: bool, epi: bool, parts: usize) -> Vec<(f64, f64)> {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        let ra = |v: f32| if parts == 1 { half::bf16::from_f32(v).to_f32() as f64 } else { v as f64 };
        let r = |v: f32| half::bf16::from_f32(v).to_f32() as f64;
        let mut out = Vec::with_capacity(m * n);
        for i in 0..m {
            for j in 0..n {
                let c_in = if acc { c0[i * n + j] as f64 } else { 0.0 };
                let (mut s, mut mag) = (c_in, c_in.abs());
                for p in 0..k {
                    // B rounds too: a no-op on bf16 weights, the int4 path's
                    // rounding of its dequantized ones.
                    let t = ra(a.get(i, p)) * r(b.get(p, j));
                    s += t;
                    mag += t.abs();
                }
                let bound = (parts * k + 4) as f64 * f32::EPSILON as f64 * mag + f32::MIN_POSITIVE as f64;
                out.push(if epi {
                    // The epilogue's own f32 add rounds once more.
                    let v = 2.0 * s + test_bias(i, j);
                    (v, 2.0 * bound + f32::EPSILON as f64 * v.abs())
                } else {
                    (s, bound)
                });
            }
        }
        out
    }

    fn test_bias(i: usize, j: usize) -> f64 {
        i as f64 - j as f64 / 64.0
    }

    fn double_plus_bias(i: usize, j0: usize, row: &mut [f32]) {
        for (x, v) in row.iter_mut().enumerate() {
            *v = 2.0 * *v + test_bias(i, j0 + x) as f32;
        }
    }

    /// The AMX path and, beside it, the `vdpbf16ps` path it replaces
    /// (which the dispatch no longer reaches on this CPU) against the
    /// reference, on one case; with `exact`, the exact split alone against
    /// the unrounded reference.
    #[allow(clippy::too_many_arguments)]
    fn check(
        exact: bool,
        (m, n, k): (usize, usize, usize),
        (la, lb): (u8, u8),
        da: DType,
        pad: usize,
        acc: bool,
        epi: bool,
        parallel: bool,
        seed: u64,
    ) -> Result<(), TestCaseError> {
        let mut rng = Rng::new(seed);
        let a = StoredMat::new(&mut rng, m, k, la, pad, 2, da);
        let b = StoredMat::new(&mut rng, k, n, lb, pad, 1, DType::BF16);
        let c0 = rng.vec(m * n, 1.0);
        let (av, bv) = (a.view(), b.view());
        let Elems::BF16(w) = bv.data else { unreachable!("B is bf16") };
        let parts = if exact { SPLIT_PARTS } else { 1 };
        let want = reference_with(&av, &bv, &c0, acc, epi, parts);
        let f: Option<Epilogue> = if epi { Some(&double_plus_bias) } else { None };
        let paths: &[&str] = if exact { &["amx exact"] } else { &["amx", "vdpbf16ps"] };
        for path in paths {
            let mut got = c0.clone();
            // SAFETY: `available` (the caller) implies AVX-512 BF16; views
            // from StoredMat are in bounds; C is m×n; m, n, k > 0.
            unsafe {
                if *path == "vdpbf16ps" {
                    super::super::gemm_bf16_packed(&av, &bv, w, &mut got, n, acc, parallel, f);
                } else {
                    gemm(&av, &bv, w, parts, &mut got, n, acc, parallel, f);
                }
            }
            within(&got, &want, n, &format!("{path} {m}x{n}x{k} layouts {la},{lb} A {da} acc {acc} epi {epi}"))?;
        }
        Ok(())
    }

    /// Every element of `got` (rows of `n`) within its reference bound.
    fn within(got: &[f32], want: &[(f64, f64)], n: usize, what: &str) -> Result<(), TestCaseError> {
        for (idx, (&g, &(s, bound))) in got.iter().zip(want).enumerate() {
            let e = (g as f64 - s).abs();
            prop_assert!(e <= bound, "{what}: C[{}, {}] = {g}, want {s} (err {e} > {bound})", idx / n, idx % n);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Ragged m, n and k around the 32-row, 32-column and 32-deep
        /// tile steps, every A layout and dtype, B `[out, in]` or row-major;
        /// A rounded, or split exactly (`exact`).
        #[test]
        fn amx_matches_reference(
            exact: bool, m in 1usize..=100, n in 1usize..=100, k in 1usize..=170,
            la in 0u8..3, lb in 0u8..3, da in 0usize..3, pad in 0usize..3,
            acc: bool, epi: bool, parallel: bool, seed: u64,
        ) {
            if !available() {
                return Ok(());
            }
            let da = crate::testutil::FLOAT_DTYPES[da];
            check(exact, (m, n, k), (la, lb), da, pad, acc, epi, parallel, seed)?;
        }

        /// The three parts add up to every f32 exactly: random bit
        /// patterns (every exponent, NaNs and infinities among them).
        #[test]
        fn split_is_exact(bits in proptest::collection::vec(any::<u32>(), 1..=32)) {
            if !available() {
                return Ok(());
            }
            let x: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
            split_holds(&x)?;
        }
    }

    /// `split_bf16_bits` on `x`: each finite value is the sum of its parts
    /// (those above the tiles' subnormal cut), infinities keep their sign
    /// in `hi` with nothing below, NaNs stay NaN.
    fn split_holds(x: &[f32]) -> Result<(), TestCaseError> {
        let mut out = [[0xdead_u16; K_STEP]; SPLIT_PARTS];
        // SAFETY: `available` (the caller) implies AVX-512 F and BW; ≤ 32 values.
        unsafe { split_bf16_bits(x, &mut out) };
        let part = |t: usize, e: usize| half::bf16::from_bits(out[t][e]).to_f32() as f64;
        for (e, &v) in x.iter().enumerate() {
            let (hi, mid, lo) = (part(0, e), part(1, e), part(2, e));
            if v.is_nan() {
                prop_assert!(hi.is_nan() || mid.is_nan() || lo.is_nan(), "{v:e}: NaN lost ({hi}, {mid}, {lo})");
            } else if v.is_infinite() {
                prop_assert!(hi == v as f64 && mid == 0.0 && lo == 0.0, "{v:e}: ({hi}, {mid}, {lo})");
            } else {
                // The tiles read parts below 2^-126 as zero.
                let kept = |p: f64| if p.abs() < f32::MIN_POSITIVE as f64 { 0.0 } else { p };
                let sum = kept(hi) + kept(mid) + kept(lo);
                let lost = if (v.abs() as f64) < 2f64.powi(-100) { 2f64.powi(-126) } else { 0.0 };
                prop_assert!((sum - v as f64).abs() <= lost, "{v:e} = {hi:e} + {mid:e} + {lo:e}, sum {sum:e}");
            }
        }
        for (t, part) in out.iter().enumerate() {
            prop_assert!(part[x.len()..].iter().all(|&w| w == 0), "part {t} not zero past the values");
        }
        Ok(())
    }

    /// The split's edges: the largest finite values (a rounded `hi` would
    /// overflow), the smallest normal and subnormal ones, zeros, bf16
    /// values (nothing left for `mid`), values with all 24 bits set.
    #[test]
    fn split_edges() {
        if !available() {
            eprintln!("no AMX-BF16 here: skipped");
            return;
        }
        let all = f32::from_bits(0x3fff_ffff);
        let x = [
            f32::MAX,
            -f32::MAX,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            f32::from_bits(1),
            0.0,
            -0.0,
            1.0,
            -0.5,
            all,
            -all,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1.0 + f32::EPSILON,
            3.0e-30,
            f32::from_bits(0x7f80_0001),
        ];
        split_holds(&x).unwrap();
    }

    /// With a single product per element, C is that product correctly
    /// rounded to f32, as the FMA path gives it: the parts go in smallest
    /// first, `lo·w + mid·w` (at most 16 significant bits times 8) is exact,
    /// and adding `hi·w` rounds once. (In the order `hi`, `mid`, `lo` the
    /// sum rounds twice, and C[1, 5] here came out one ulp off.)
    #[test]
    fn exact_single_products_are_correctly_rounded() {
        if !available() {
            eprintln!("no AMX-BF16 here: skipped");
            return;
        }
        let mut rng = Rng::new(5);
        let (m, n) = (40, 48);
        let x: Vec<f32> = rng.vec(m, 3.0).iter().map(|v| v * 1.000_123_4).collect();
        let w: Vec<half::bf16> = rng.vec(n, 2.0).into_iter().map(half::bf16::from_f32).collect();
        let (a, b) = (MatRef::row_major(Elems::F32(&x), m, 1), MatRef::row_major(Elems::BF16(&w), 1, n));
        let mut c = vec![0f32; m * n];
        // SAFETY: `available`; A is m × 1, B 1 × n, C m × n.
        unsafe { gemm(&a, &b, &w, SPLIT_PARTS, &mut c, n, false, false, None) };
        for i in 0..m {
            for j in 0..n {
                let want = (x[i] as f64 * w[j].to_f64()) as f32;
                assert_eq!(c[i * n + j], want, "C[{i}, {j}]: {} · {}", x[i], w[j]);
            }
        }
    }

    /// The decode tiles ([`gemv`]) with A rounded to bf16 (`parts` 1: one B
    /// tile) or split in three ([`SPLIT_PARTS`]: one to three B tiles)
    /// against the reference, and each row of the batch, bit for bit, that
    /// row alone.
    #[allow(clippy::too_many_arguments)]
    fn check_gemv(
        parts: usize,
        m: usize,
        n: usize,
        k: usize,
        acc: bool,
        parallel: bool,
        seed: u64,
    ) -> Result<(), TestCaseError> {
        let mut rng = Rng::new(seed);
        let x = rng.vec(m * k, 1.0);
        let w: Vec<half::bf16> = rng.vec(n * k, 1.0).into_iter().map(half::bf16::from_f32).collect();
        let c0 = rng.vec(m * n, 1.0);
        let run = |rows: &[f32], m: usize, c: &mut [f32], parallel: bool| {
            let mut a16 = vec![0u16; parts * m * k];
            // SAFETY: `available` (the caller: AVX-512 BF16 with it); A is m ×
            // k; the weight holds n rows of k; C is m × n; k is a multiple of
            // 32, parts · m ≤ 48.
            unsafe {
                if parts == 1 {
                    super::super::round_bf16_bits(rows, &mut a16);
                } else {
                    split_rows(rows, m, k, &mut a16);
                }
                gemv(&a16, m, parts, k, &w, 0, k, n, SyncPtr(c.as_mut_ptr()), n, acc, parallel);
            }
        };
        let mut got = c0.clone();
        run(&x, m, &mut got, parallel);
        let (a, b) = (MatRef::row_major(Elems::F32(&x), m, k), MatRef::row_major(Elems::BF16(&w), n, k).transposed());
        within(&got, &reference_with(&a, &b, &c0, acc, false, parts), n, &format!("gemv {parts} part(s) {m}x{n}x{k}"))?;
        for i in 0..m {
            let mut alone = c0[i * n..(i + 1) * n].to_vec();
            run(&x[i * k..(i + 1) * k], 1, &mut alone, !parallel);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            prop_assert!(
                bits(&alone) == bits(&got[i * n..(i + 1) * n]),
                "row {i} of {m}x{n}x{k} differs from the row alone"
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// 1 to 16 rows (rounded: one B tile; split: one, two or three),
        /// ragged weight rows (a zero-padded last group), k an odd or even
        /// number of steps.
        #[test]
        fn amx_gemv_matches_reference_and_rows_alone(
            split: bool, m in 1usize..=16, n in 1usize..=70, steps in 1usize..=12, acc: bool, parallel: bool,
            seed: u64,
        ) {
            if !available() {
                return Ok(());
            }
            check_gemv(if split { SPLIT_PARTS } else { 1 }, m, n, 32 * steps, acc, parallel, seed)?;
        }
    }

    /// One-hot weight rows (row j picks element j of A's rows) copy A
    /// exactly through the split: `(lo + mid) + hi` of an f32 with all 24
    /// significant bits set is that f32, for every row count (one to three
    /// B tiles). A lost part shows here, where the reference bound of the
    /// proptest above is too loose to see it.
    #[test]
    fn exact_gemv_one_hot_weights_copy_a() {
        if !available() {
            eprintln!("no AMX-BF16 here: skipped");
            return;
        }
        let (k, n) = (64, 40);
        let mut w = vec![half::bf16::ZERO; n * k];
        for j in 0..n {
            w[j * k + j] = half::bf16::ONE;
        }
        for m in [1, 5, 6, 11, 16] {
            let x: Vec<f32> =
                (0..m * k).map(|e| f32::from_bits(0x3f80_0000 | (e as u32 * 2_654_435_761) >> 9) - 1.5).collect();
            let mut parts = vec![0u16; SPLIT_PARTS * m * k];
            let mut c = vec![0f32; m * n];
            // SAFETY: `available`; A is m × k, the weight n × k, C m × n.
            unsafe {
                split_rows(&x, m, k, &mut parts);
                gemv(&parts, m, SPLIT_PARTS, k, &w, 0, k, n, SyncPtr(c.as_mut_ptr()), n, false, false);
            }
            for i in 0..m {
                for j in 0..n {
                    assert_eq!(c[i * n + j], x[i * k + j], "m {m}: C[{i}, {j}]");
                }
            }
        }
    }

    /// The int4 path: B dequantized exactly, then rounded to bf16 with A.
    fn check_q4(m: usize, n8: usize, k8: usize, group: usize, acc: bool, seed: u64) -> Result<(), TestCaseError> {
        let (n, k) = (8 * n8, 8 * k8);
        let mut rng = Rng::new(seed);
        let groups = k.div_ceil(group);
        let qweight: Vec<u32> = (0..k / 8 * n).map(|_| rng.next_u64() as u32).collect();
        let qzeros: Vec<u32> = (0..groups * n / 8).map(|_| rng.next_u64() as u32).collect();
        let scales: Vec<half::f16> =
            (0..groups * n).map(|_| half::f16::from_f32(0.002 + 0.01 * rng.uniform().abs())).collect();
        let w = qvc_ir::Q4Ref::whole(n, k, group, &qweight, &qzeros, &scales, None);
        let mut deq = vec![0f32; n * k];
        crate::q4::dequantize(&w, &mut deq);
        let x = rng.vec(m * k, 1.0);
        let c0 = rng.vec(m * n, 1.0);
        let a = MatRef::row_major(Elems::F32(&x), m, k);
        let b = MatRef::row_major(Elems::Q4(w), n, k).transposed();
        let mut got = c0.clone();
        // SAFETY: `available` (the caller); A is m × k f32; C is m × n.
        unsafe { gemm_q4(&a, &b, &w, &mut got, n, acc, true) };
        let deq = MatRef::row_major(Elems::F32(&deq), n, k).transposed();
        within(&got, &reference(&a, &deq, &c0, acc, false), n, &format!("q4 {m}x{n}x{k} g{group} acc {acc}"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Ragged m and k around the tile steps, group sizes 32 to 128 and
        /// one group over all of k, k past one 512-deep slice.
        #[test]
        fn amx_q4_matches_reference(
            m in 1usize..=70, n8 in 1usize..=9, k8 in 1usize..=90, g in 0usize..4, acc: bool, seed: u64,
        ) {
            if !available() {
                return Ok(());
            }
            let group = [32, 64, 128, usize::MAX][g].min(8 * k8);
            check_q4(m, n8, k8, group, acc, seed)?;
        }
    }

    /// Shapes with several tasks, row blocks and long k.
    #[test]
    fn amx_bigger_shapes() {
        if !available() {
            eprintln!("no AMX-BF16 here: skipped");
            return;
        }
        for (s, &(m, n, k)) in [(130, 257, 300), (300, 70, 1100), (33, 1000, 64), (64, 64, 2500)].iter().enumerate() {
            check(false, (m, n, k), (0, 1), DType::F32, 0, s % 2 == 1, s == 2, true, s as u64).unwrap();
            check(true, (m, n, k), (0, 1), DType::F32, 0, s % 2 == 0, s == 1, true, s as u64).unwrap();
        }
    }

    /// The peak loop multiplies tiles of ones: every element of C is
    /// 32 products of 1 per instruction, summed over the iterations.
    #[test]
    fn dot_loop_counts_and_computes() {
        let (flops, v) = dot_loop(10);
        if available() {
            assert_eq!(flops, 10 * DOT_LOOP_FLOPS_PER_ITER);
            assert_eq!(v, 320.0);
        } else {
            assert_eq!((flops, v), (0, 0.0));
        }
    }
}
