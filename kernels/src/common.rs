//! Plumbing shared by the kernel families: instruction-set selection, dtype
//! widening of weight slices, and the small parallel-for helpers.
//!
//! Invariants: [`Isa::Avx2Fma`] and [`Isa::Avx512`] are only ever *used* after
//! a runtime check that the CPU has their instructions ([`Isa::resolve`]
//! downgrades them otherwise; AVX-512 implies the AVX2 set here, so an
//! `Avx512` kernel may call AVX2 helpers), so the `#[target_feature]`
//! functions elsewhere in the crate are sound to call. Nothing is chosen at
//! build time: the binary targets baseline x86-64 and runs everywhere.
//! Widening bf16 is exact (bf16 is the top half of an f32); f16 goes through
//! `half`, which uses F16C when the CPU has it.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use qvc_ir::Elems;
use rayon::prelude::*;

/// Which code path a kernel runs. Results of the paths agree to rounding
/// (the AVX2 and AVX-512 paths fuse multiply-adds and sum in other orders);
/// all are tested against the references.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Plain Rust loops over fixed-size arrays, vectorised by the compiler for
    /// the build's baseline target (SSE2 on x86_64). Runs everywhere.
    Portable,
    /// x86_64 AVX2 + FMA (+ F16C, which every AVX2 CPU has): explicit
    /// intrinsics in the GEMM kernels and `#[target_feature]` copies of the
    /// other hot loops.
    Avx2Fma,
    /// x86_64 AVX-512 (F, BW, VL) on top of AVX2 + FMA + F16C: 512-bit
    /// GEMM micro-kernel, packing and decode dot products. Kernels without
    /// an AVX-512 version run their AVX2 code on this path.
    Avx512,
}

impl Isa {
    /// Every path, most capable last (tests run each one the CPU has).
    pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2Fma, Isa::Avx512];

    /// The best path this CPU supports.
    pub fn detect() -> Isa {
        if Isa::Avx512.available() {
            Isa::Avx512
        } else if Isa::Avx2Fma.available() {
            Isa::Avx2Fma
        } else {
            Isa::Portable
        }
    }

    /// Whether the path has the AVX2 + FMA + F16C instructions (the AVX2
    /// kernels of families that have no AVX-512 version run on it).
    pub fn has_avx2(self) -> bool {
        matches!(self, Isa::Avx2Fma | Isa::Avx512)
    }

    /// Whether this CPU can run the path.
    pub fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2Fma.available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2Fma | Isa::Avx512 => false,
        }
    }

    /// `self` if the CPU supports it, else the best path below it (AVX-512
    /// falls back to AVX2, which falls back to [`Isa::Portable`]): every entry
    /// point that takes an `Isa` goes through this, which is what makes the
    /// target-feature calls sound.
    pub fn resolve(self) -> Isa {
        if self.available() {
            self
        } else if self == Isa::Avx512 {
            Isa::Avx2Fma.resolve()
        } else {
            Isa::Portable
        }
    }
}

/// bf16 → f32 is a 16-bit shift; written out (instead of `bf16::to_f32`, which
/// branches on NaN) so that the loop vectorises.
#[inline(always)]
pub(crate) fn bf16_bits_to_f32(b: bf16) -> f32 {
    f32::from_bits((b.to_bits() as u32) << 16)
}

/// Element types a weight slice may have, with a chunk-widening method so that
/// hot loops can be monomorphised per dtype (and inlined into the
/// target-feature copies).
pub(crate) trait Src: Copy + Send + Sync + 'static {
    /// `src` as f32: `src` itself for f32, else widened into `buf[..src.len()]`.
    fn as_f32<'b>(src: &'b [Self], buf: &'b mut [f32]) -> &'b [f32];

    /// Eight elements from `p`, widened into a vector.
    ///
    /// SAFETY: `p..p+8` must be readable; only call (inlined) from code
    /// compiled with AVX2 and F16C enabled.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Src for f32 {
    #[inline(always)]
    fn as_f32<'b>(src: &'b [f32], _buf: &'b mut [f32]) -> &'b [f32] {
        src
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Src for bf16 {
    #[inline(always)]
    fn as_f32<'b>(src: &'b [bf16], buf: &'b mut [f32]) -> &'b [f32] {
        let out = &mut buf[..src.len()];
        for (o, &s) in out.iter_mut().zip(src) {
            *o = bf16_bits_to_f32(s);
        }
        out
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // Zero-extend the 16-bit patterns to 32 bits and shift them into the
        // high half: exactly `bf16 -> f32`.
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

impl Src for f16 {
    #[inline(always)]
    fn as_f32<'b>(src: &'b [f16], buf: &'b mut [f32]) -> &'b [f32] {
        let out = &mut buf[..src.len()];
        src.convert_to_f32_slice(out);
        out
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// Read `dst.len()` elements `e[start + i * stride]`, widened to f32.
#[inline]
pub(crate) fn gather(e: &Elems, start: usize, stride: usize, dst: &mut [f32]) {
    let n = dst.len();
    if n == 0 {
        return;
    }
    if stride == 1 {
        match e {
            Elems::F32(s) => dst.copy_from_slice(&s[start..start + n]),
            Elems::BF16(s) => {
                bf16::as_f32(&s[start..start + n], dst);
            }
            Elems::F16(s) => s[start..start + n].convert_to_f32_slice(dst),
            Elems::Q4(_) => e.read_into(start, dst),
        }
        return;
    }
    // Bounds-check the last element once; the loop then indexes within range.
    let last = start + (n - 1) * stride;
    match e {
        Elems::F32(s) => {
            assert!(last < s.len());
            for (i, d) in dst.iter_mut().enumerate() {
                *d = s[start + i * stride];
            }
        }
        Elems::BF16(s) => {
            assert!(last < s.len());
            for (i, d) in dst.iter_mut().enumerate() {
                *d = bf16_bits_to_f32(s[start + i * stride]);
            }
        }
        Elems::F16(s) => {
            assert!(last < s.len());
            for (i, d) in dst.iter_mut().enumerate() {
                *d = s[start + i * stride].to_f32();
            }
        }
        Elems::Q4(_) => {
            assert!(last < e.len());
            for (i, d) in dst.iter_mut().enumerate() {
                *d = e.get(start + i * stride);
            }
        }
    }
}

/// A raw output pointer shared by tasks that write provably disjoint parts of
/// one buffer (tiles of C, heads of the attention output).
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub *mut f32);
// SAFETY: only used for disjoint writes from parallel tasks, as argued at
// each use site; the pointee outlives the parallel region (scoped by rayon).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer. A method (not `.0`) so that closures capture the whole
    /// `SyncPtr`, which is `Sync`, rather than the bare pointer field.
    #[inline(always)]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Run `f(0..n)`, on the rayon pool when `parallel`, else in order on this thread.
#[inline]
pub(crate) fn par_for(n: usize, parallel: bool, f: impl Fn(usize) + Sync + Send) {
    if parallel && n > 1 {
        (0..n).into_par_iter().for_each(f);
    } else {
        (0..n).for_each(f);
    }
}

/// `f(chunk_index, chunk)` over `chunk`-sized pieces of `buf`, in parallel when asked.
#[inline]
pub(crate) fn par_chunks(buf: &mut [f32], chunk: usize, parallel: bool, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    let chunk = chunk.max(1);
    if parallel && buf.len() > chunk {
        buf.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        buf.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// Whether a kernel doing about `work` scalar operations is worth spreading
/// over the pool: below ~64k operations, rayon's fork/join costs more than it saves.
#[inline]
pub(crate) fn worth_parallel(work: usize) -> bool {
    work >= 1 << 16 && rayon::current_num_threads() > 1
}
