//! Patch embedding as im2col: pixels `[C, H, W]` f32 → patches `[P, C·p·p]`
//! bf16, so that the ViT's stride-`p` convolution is a GEMM with
//! `conv1.weight [width, C, p, p]` viewed as `[width, C·p·p]`.
//!
//! * Patches are in row-major grid order: patch `i = py·(W/p) + px`, with
//!   `P = (H/p)·(W/p)`; pixels past the last whole patch are ignored, as a
//!   stride-`p` convolution without padding does.
//! * Columns are ordered `(c, ky, kx)` — the weight's own memory order.
//! * Rows have stride `ld ≥ C·p·p`; columns `C·p·p..ld` are written as zeros.
//!   The model uses `ld = 592` for the 588 columns of Qwen-VL, so that the
//!   conv GEMM has `K % 8 == 0` (the compiler zero-pads the weight likewise).
//!
//! PTX: one thread per output element pair (`p` and `ld` even: a pair never
//! straddles two kernel rows, and pairs are 4-byte aligned), or per element
//! otherwise; an 8-byte `ld.global.nc.v2.f32` of two adjacent pixels (`W` even)
//! and one packed `bf16x2` store. Threads past the end are predicated off
//! (the kernel has no barrier).

use half::bf16;
use qvc_codegen::{Addr, Cmp, Kernel, KernelBuilder, Space, Sreg, Ty};
use qvc_ir::DType;
use rayon::prelude::*;

use super::gemm::SpecError;
use crate::spec::{Cost, KernelSpec, Launch};

const THREADS: u32 = 256;

/// One im2col kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PatchSpec {
    pub channels: usize,
    /// `(H, W)` in pixels.
    pub image: (usize, usize),
    pub patch: usize,
    /// BF16.
    pub out: DType,
    /// Row stride of the output in elements (≥ `C·p·p`; padding zeroed).
    pub ld: usize,
}

impl PatchSpec {
    /// Dense rows (`ld = C·p·p`), validated.
    pub fn new(channels: usize, image: (usize, usize), patch: usize) -> Result<PatchSpec, SpecError> {
        let s = PatchSpec { channels, image, patch, out: DType::BF16, ld: channels * patch * patch };
        s.validate()?;
        Ok(s)
    }

    /// The same spec with row stride `ld`, validated.
    pub fn with_ld(self, ld: usize) -> Result<PatchSpec, SpecError> {
        let s = PatchSpec { ld, ..self };
        s.validate()?;
        Ok(s)
    }

    /// Patches along y and x.
    pub fn grid(&self) -> (usize, usize) {
        (self.image.0 / self.patch, self.image.1 / self.patch)
    }
    /// `P`, the number of patches (GEMM M).
    pub fn patches(&self) -> usize {
        let (gy, gx) = self.grid();
        gy * gx
    }
    /// `C·p·p`, the useful columns (GEMM K before padding).
    pub fn cols(&self) -> usize {
        self.channels * self.patch * self.patch
    }
    /// Whether threads handle column pairs.
    fn vec(&self) -> usize {
        if self.patch.is_multiple_of(2) && self.ld.is_multiple_of(2) {
            2
        } else {
            1
        }
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |reason: String| Err(SpecError::Invalid { kernel: self.name(), reason });
        if self.channels == 0 || self.patch == 0 || self.patches() == 0 {
            return bad(format!(
                "no patches: {} channels, image {:?}, patch {}",
                self.channels, self.image, self.patch
            ));
        }
        if self.out != DType::BF16 {
            return bad(format!("out dtype {} (bf16 only)", self.out));
        }
        if self.ld < self.cols() {
            return bad(format!("ld {} < {} columns", self.ld, self.cols()));
        }
        if self.patches() * self.ld >= 1 << 31 || self.channels * self.image.0 * self.image.1 >= 1 << 31 {
            return bad("2^31 elements or more".into());
        }
        Ok(())
    }

    fn check(&self, pixels: usize, out: usize) -> Result<(), SpecError> {
        self.validate()?;
        let need_in = self.channels * self.image.0 * self.image.1;
        let need_out = self.patches() * self.ld;
        for (what, need, got) in [("pixels", need_in, pixels), ("out", need_out, out)] {
            if got < need {
                return Err(SpecError::Buffer { kernel: self.name(), what, need, got });
            }
        }
        Ok(())
    }

    /// Fast CPU im2col: parallel over patches, one contiguous run of `p`
    /// pixels per `(c, ky)`.
    pub fn cpu(&self, pixels: &[f32], out: &mut [bf16]) -> Result<(), SpecError> {
        self.check(pixels.len(), out.len())?;
        let (p, c) = (self.patch, self.channels);
        let (h, w) = self.image;
        let gx = self.grid().1;
        let cols = self.cols();
        out[..self.patches() * self.ld].par_chunks_mut(self.ld).enumerate().for_each(|(i, row)| {
            let (py, px) = (i / gx, i % gx);
            for ch in 0..c {
                for ky in 0..p {
                    let src = &pixels[(ch * h + py * p + ky) * w + px * p..][..p];
                    let dst = &mut row[(ch * p + ky) * p..][..p];
                    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = bf16::from_f32(s));
                }
            }
            row[cols..].fill(bf16::ZERO);
        });
        Ok(())
    }

    /// Naive reference: walks the image and sends each pixel of a whole patch
    /// to its `(patch, column)`, then zeroes the padding columns.
    pub fn reference(&self, pixels: &[f32], out: &mut [bf16]) -> Result<(), SpecError> {
        self.check(pixels.len(), out.len())?;
        let p = self.patch;
        let (h, w) = self.image;
        let (gy, gx) = self.grid();
        for ch in 0..self.channels {
            for y in 0..gy * p {
                for x in 0..gx * p {
                    let patch = (y / p) * gx + x / p;
                    let col = ch * p * p + (y % p) * p + x % p;
                    out[patch * self.ld + col] = bf16::from_f32(pixels[ch * h * w + y * w + x]);
                }
            }
        }
        for i in 0..self.patches() {
            for col in self.cols()..self.ld {
                out[i * self.ld + col] = bf16::ZERO;
            }
        }
        Ok(())
    }
}

impl KernelSpec for PatchSpec {
    fn name(&self) -> String {
        let mut s = format!("patch_c{}_h{}_w{}_p{}", self.channels, self.image.0, self.image.1, self.patch);
        if self.ld != self.cols() {
            s.push_str(&format!("_ld{}", self.ld));
        }
        s.push_str(&format!("_{}", self.out));
        s
    }

    fn build(&self) -> Kernel {
        if let Err(e) = self.validate() {
            panic!("{e}");
        }
        let vec = self.vec() as u32;
        let (p, ld) = (self.patch as u32, self.ld as u32);
        let (h, w) = (self.image.0 as u32, self.image.1 as u32);
        let gx = self.grid().1 as u32;
        let per_row = ld / vec;
        let total = self.patches() as u32 * per_row;
        let mut b = KernelBuilder::new(self.name());
        b.max_threads(THREADS);
        let pin = b.ptr_param("pixels");
        let pout = b.ptr_param("out");
        let tid = b.special(Sreg::TidX);
        let bx = b.special(Sreg::CtaidX);
        let t = b.mad(Ty::U32, bx, THREADS, tid);
        let live = b.setp(Cmp::Lt, Ty::U32, t, total);
        b.if_then(live, false, |b| {
            let patch = b.div(Ty::U32, t, per_row);
            let r = b.rem(Ty::U32, t, per_row);
            let col = b.mul(Ty::U32, r, vec);
            let dst = b.mad(Ty::U32, patch, ld, col);
            let dptr = b.index_addr(pout, dst, 2);
            let data = b.setp(Cmp::Lt, Ty::U32, col, self.cols() as u32);
            // Padding columns: zeros. (C·p·p is even when p is, so a pair is all data or all padding.)
            let vals: Vec<_> = (0..vec).map(|_| b.mov(Ty::F32, 0.0f32)).collect();
            b.if_then(data, false, |b| {
                let ch = b.div(Ty::U32, col, p * p);
                let rem = b.rem(Ty::U32, col, p * p);
                let ky = b.div(Ty::U32, rem, p);
                let kx = b.rem(Ty::U32, rem, p);
                let py = b.div(Ty::U32, patch, gx);
                let px = b.rem(Ty::U32, patch, gx);
                // src = (ch·H + py·p + ky)·W + px·p + kx
                let y = b.mad(Ty::U32, py, p, ky);
                let y = b.mad(Ty::U32, ch, h, y);
                let x = b.mad(Ty::U32, px, p, kx);
                let src = b.mad(Ty::U32, y, w, x);
                let sptr = b.index_addr(pin, src, 4);
                if vec == 2 && w % 2 == 0 {
                    b.ld_into(Space::GlobalNc, Ty::F32, &vals, Addr::reg(sptr, 0));
                } else {
                    for (e, &v) in vals.iter().enumerate() {
                        b.ld_into(Space::GlobalNc, Ty::F32, &[v], Addr::reg(sptr, 4 * e as i64));
                    }
                }
            });
            if vec == 2 {
                let packed = b.pack_half2(Ty::BF16x2, vals[0], vals[1]);
                b.st(Space::Global, Ty::B32, Addr::reg(dptr, 0), packed);
            } else {
                let hv = b.cvt(Ty::BF16, Ty::F32, vals[0]);
                b.st(Space::Global, Ty::B16, Addr::reg(dptr, 0), hv);
            }
        });
        b.ret();
        b.finish()
    }

    fn launch(&self) -> Launch {
        let total = self.patches() * self.ld / self.vec();
        Launch::new([total.div_ceil(THREADS as usize) as u32, 1, 1], [THREADS, 1, 1])
    }

    fn cost(&self) -> Cost {
        let read = (self.patches() * self.cols() * 4) as u64;
        let written = (self.patches() * self.ld * 2) as u64;
        Cost { flops: 0, bytes: read + written }
    }
}

/// Qwen-VL's conv stem at 448 and 896 pixels, rows padded to 592 columns
/// (see the module doc).
pub fn model_specs() -> Vec<PatchSpec> {
    [448, 896]
        .into_iter()
        .map(|s| PatchSpec::new(3, (s, s), 14).and_then(|p| p.with_ld(592)).expect("model patch spec"))
        .collect()
}
