//! Element types, shapes and borrowed host tensors: the vocabulary every crate shares.

use half::{bf16, f16};
use std::fmt;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DType {
    F32,
    BF16,
    F16,
    I32,
    /// A GPTQ int4 weight ([`Q4Ref`]): packed nibbles plus per-group scales
    /// and zeros. Only `Param`s have it, with the logical shape of the float
    /// weight it stands for, so graphs built for bf16 run it unchanged.
    Q4,
}

impl DType {
    /// Bytes per element. For [`DType::Q4`] this is the 16-bit size of the
    /// values it dequantizes to (its real bytes are [`Q4Ref::bytes`]), so
    /// anything that would materialise it plans for a half-precision copy.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 | DType::Q4 => 2,
        }
    }
    /// Floating-point types (those the math ops accept; a Q4 weight reads as floats).
    pub fn is_float(self) -> bool {
        !matches!(self, DType::I32)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::I32 => "i32",
            DType::Q4 => "q4",
        })
    }
}

/// A concrete tensor shape, outermost dimension first (row-major).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
pub struct Shape(pub Vec<usize>);

impl Shape {
    pub fn new(dims: impl Into<Vec<usize>>) -> Self {
        Shape(dims.into())
    }
    pub fn dims(&self) -> &[usize] {
        &self.0
    }
    pub fn rank(&self) -> usize {
        self.0.len()
    }
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }
    /// Size of axis `i`.
    pub fn dim(&self, i: usize) -> usize {
        self.0[i]
    }
    /// The last dimension (1 for a scalar).
    pub fn last(&self) -> usize {
        self.0.last().copied().unwrap_or(1)
    }
    /// Row-major strides in elements.
    pub fn strides(&self) -> Vec<usize> {
        let mut s = vec![1; self.0.len()];
        for i in (0..self.0.len().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * self.0[i + 1];
        }
        s
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        Shape(d.to_vec())
    }
}

/// A GPTQ int4 matrix `W[rows, cols]` (rows = output features, cols = input
/// features: the layout of the float weight it replaces), borrowed in
/// AutoGPTQ's v1 storage, which the kernels read as is:
///
/// - `qweight[r / 8 * ld + o]` holds stored input row `r` of output `o` at
///   bits `4 * (r % 8)`.. (low nibble first);
/// - group `g = r / group` of output `o` has scale `scales[g * ld + o]` and
///   zero `z = nibble o % 8 of qzeros[g * ld / 8 + o / 8] + 1` (v1 stores
///   zero − 1);
/// - `W[o, perm[r]] = scale * (q - z)`: `perm` is act-order resolved once at
///   load (stored rows sorted by group), `None` when row `r` is input `r`.
///
/// A view may start at output `row0` of a matrix `ld` outputs wide (a
/// row-range slice); `rows` is the view's height.
#[derive(Clone, Copy, Debug)]
pub struct Q4Ref<'a> {
    pub rows: usize,
    pub cols: usize,
    pub row0: usize,
    pub ld: usize,
    pub group: usize,
    pub qweight: &'a [u32],
    pub qzeros: &'a [u32],
    pub scales: &'a [half::f16],
    pub perm: Option<&'a [u32]>,
    /// Inverse of `perm` (input `i` is stored row `inv[i]`), for element access.
    pub inv: Option<&'a [u32]>,
}

impl<'a> Q4Ref<'a> {
    /// A whole stored matrix (`rows` outputs × `cols` inputs, no row-range
    /// offset: `row0` 0, `ld` = `rows`), with its act-order permutation and
    /// its inverse when it has one.
    pub fn whole(
        rows: usize,
        cols: usize,
        group: usize,
        qweight: &'a [u32],
        qzeros: &'a [u32],
        scales: &'a [half::f16],
        act_order: Option<(&'a [u32], &'a [u32])>,
    ) -> Self {
        let (perm, inv) = act_order.map_or((None, None), |(p, i)| (Some(p), Some(i)));
        Q4Ref { rows, cols, row0: 0, ld: rows, group, qweight, qzeros, scales, perm, inv }
    }

    /// Number of groups over the input rows (the last may be ragged).
    pub fn groups(&self) -> usize {
        self.cols.div_ceil(self.group)
    }
    /// Zero point (already + 1) of group `g`, stored output column `o`.
    #[inline(always)]
    pub fn zero(&self, g: usize, o: usize) -> u32 {
        ((self.qzeros[g * self.ld / 8 + o / 8] >> (4 * (o % 8))) & 15) + 1
    }
    /// Nibble of stored input row `r`, stored output column `o`.
    #[inline(always)]
    pub fn q(&self, r: usize, o: usize) -> u32 {
        (self.qweight[r / 8 * self.ld + o] >> (4 * (r % 8))) & 15
    }
    /// Dequantized `W[row, col]` (row within this view, col an input index).
    #[inline]
    pub fn get(&self, row: usize, col: usize) -> f32 {
        let o = self.row0 + row;
        let r = self.inv.map_or(col, |inv| inv[col] as usize);
        let g = r / self.group;
        let s = self.scales[g * self.ld + o].to_f32();
        s * (self.q(r, o) as f32 - self.zero(g, o) as f32)
    }
    /// Rows `a..b` of this view.
    pub fn rows_range(&self, a: usize, b: usize) -> Q4Ref<'a> {
        assert!(a <= b && b <= self.rows, "q4 row range {a}..{b} outside {} rows", self.rows);
        Q4Ref { rows: b - a, row0: self.row0 + a, ..*self }
    }
    /// Bytes this view's rows read: nibbles, f16 scales, packed zeros (and
    /// the act-order index once).
    pub fn bytes(&self) -> usize {
        let g = self.groups();
        self.rows * self.cols / 2 + g * self.rows * 2 + g * self.rows / 2 + self.perm.map_or(0, |p| p.len() * 4)
    }
}

/// Borrowed floating-point elements in their stored type. Kernels read weights
/// through this so that bf16 weights stay in the memory map and are widened to
/// f32 only inside the kernel's packing step.
#[derive(Clone, Copy, Debug)]
pub enum Elems<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
    /// A GPTQ int4 weight, read as its dequantized values (row-major
    /// `[rows, cols]`).
    Q4(Q4Ref<'a>),
}

impl<'a> Elems<'a> {
    pub fn len(&self) -> usize {
        match self {
            Elems::F32(s) => s.len(),
            Elems::BF16(s) => s.len(),
            Elems::F16(s) => s.len(),
            Elems::Q4(q) => q.rows * q.cols,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> DType {
        match self {
            Elems::F32(_) => DType::F32,
            Elems::BF16(_) => DType::BF16,
            Elems::F16(_) => DType::F16,
            Elems::Q4(_) => DType::Q4,
        }
    }
    /// Element `i` widened to f32.
    #[inline(always)]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Elems::F32(s) => s[i],
            Elems::BF16(s) => s[i].to_f32(),
            Elems::F16(s) => s[i].to_f32(),
            Elems::Q4(q) => q.get(i / q.cols, i % q.cols),
        }
    }
    /// Widen `self[start..start + out.len()]` into `out`.
    #[inline]
    pub fn read_into(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            Elems::F32(s) => out.copy_from_slice(&s[start..start + n]),
            Elems::BF16(s) => {
                for (o, v) in out.iter_mut().zip(&s[start..start + n]) {
                    *o = v.to_f32();
                }
            }
            Elems::F16(s) => {
                for (o, v) in out.iter_mut().zip(&s[start..start + n]) {
                    *o = v.to_f32();
                }
            }
            Elems::Q4(q) => {
                for (e, o) in out.iter_mut().enumerate() {
                    let i = start + e;
                    *o = q.get(i / q.cols, i % q.cols);
                }
            }
        }
    }
    /// A sub-range of the elements. A Q4 weight slices whole rows only.
    pub fn slice(&self, start: usize, end: usize) -> Elems<'a> {
        match *self {
            Elems::F32(s) => Elems::F32(&s[start..end]),
            Elems::BF16(s) => Elems::BF16(&s[start..end]),
            Elems::F16(s) => Elems::F16(&s[start..end]),
            Elems::Q4(q) => {
                assert!(
                    start.is_multiple_of(q.cols) && end.is_multiple_of(q.cols),
                    "a q4 weight slices whole rows of {} elements, not {start}..{end}",
                    q.cols
                );
                Elems::Q4(q.rows_range(start / q.cols, end / q.cols))
            }
        }
    }
    /// All elements widened to a new f32 vector.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut v = vec![0.0; self.len()];
        self.read_into(0, &mut v);
        v
    }
}
