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
///
/// `qweight` holds the words in one of two orders ([`Q4Words`]): as stored
/// (above), or regrouped into [`Q4Words::Tiled`] order at load time so that
/// a decode GEMV streams long contiguous runs. Scales and zeros are always
/// in the stored layout. Read words through [`Q4Ref::word`] /
/// [`Q4Ref::word_run`], never by indexing `qweight` with `ld`.
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
    /// The order of the words in `qweight`.
    pub words: Q4Words,
}

/// Output columns per tile of [`Q4Words::Tiled`].
pub const Q4_TILE: usize = 64;

/// The order of a [`Q4Ref`]'s packed words. Word row `p` holds stored input
/// rows `8p..8p + 8` of one output column.
///
/// Why a second order: in the stored one a word row is the full width of
/// the matrix, so a GEMV task that owns a range of output columns reads,
/// per group of input rows, `group / 8` short runs (8 KiB for 2048 columns)
/// a whole row apart. The hardware prefetchers do not follow that pattern:
/// measured on 2 Zen 5 cores, it reads at about 33 GB/s where one
/// sequential stream reads at about 44 GB/s. [`Q4Words::Tiled`] puts every
/// word a task reads for one group into one contiguous run (128 KiB for
/// 2048 columns and group 128), which reads at about 43 GB/s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Q4Words {
    /// AutoGPTQ v1 as stored: word row `p`, output `o` at `p * ld + o`.
    #[default]
    Gptq,
    /// Group-major tiles: for each group of input rows (`group / 8` word
    /// rows; one group when `group >= cols`), the output columns in tiles of
    /// [`Q4_TILE`], each tile's word rows one after another, [`Q4_TILE`]
    /// words a row: word row `p` of group `g` (first word row `p0`, `rg`
    /// word rows), output `o`, is at
    /// `p0 · ldp + (o / 64) · rg · 64 + (p − p0) · 64 + o % 64`, `ldp` = `ld`
    /// rounded up to a whole tile (the padding words are zero). Needs
    /// `group % 8 == 0` or `group >= cols`, so no word row spans two groups.
    Tiled,
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
        Q4Ref { rows, cols, row0: 0, ld: rows, group, qweight, qzeros, scales, perm, inv, words: Q4Words::Gptq }
    }

    /// Word rows: `cols / 8` rounded up.
    #[inline]
    pub fn word_rows(&self) -> usize {
        self.cols.div_ceil(8)
    }
    /// Word rows per group in [`Q4Words::Tiled`] order (the last group may
    /// have fewer).
    #[inline]
    pub fn tile_group_rows(&self) -> usize {
        if self.group >= self.cols {
            self.word_rows().max(1)
        } else {
            self.group / 8
        }
    }
    /// Whether this matrix's groups allow [`Q4Words::Tiled`] order.
    pub fn can_tile(&self) -> bool {
        self.group >= self.cols || (self.group > 0 && self.group.is_multiple_of(8))
    }
    /// Length `qweight` must have for this view's order and width.
    pub fn qweight_len(&self) -> usize {
        match self.words {
            Q4Words::Gptq => self.word_rows() * self.ld,
            Q4Words::Tiled => self.word_rows() * self.ld.next_multiple_of(Q4_TILE),
        }
    }
    /// Index in `qweight` of word row `p`, absolute output column `o`.
    #[inline(always)]
    pub fn word_index(&self, p: usize, o: usize) -> usize {
        match self.words {
            Q4Words::Gptq => p * self.ld + o,
            Q4Words::Tiled => {
                let wpg = self.tile_group_rows();
                let p0 = p / wpg * wpg;
                let rg = wpg.min(self.word_rows() - p0);
                p0 * self.ld.next_multiple_of(Q4_TILE) + (o / Q4_TILE * rg + p - p0) * Q4_TILE + o % Q4_TILE
            }
        }
    }
    /// The word of word row `p`, absolute output column `o`.
    #[inline(always)]
    pub fn word(&self, p: usize, o: usize) -> u32 {
        self.qweight[self.word_index(p, o)]
    }
    /// Where a block of words starts and how far apart its word rows are:
    /// `Some((i, stride))` when absolute output columns `o..o + width` of
    /// word row `p` and of the following word rows of `p`'s group are at
    /// `qweight[i + d·stride + l]` (word row `p + d`, column `o + l`);
    /// `None` when they are not contiguous (a tiled block across a tile
    /// edge), and the caller copies them with [`Q4Ref::words_into`].
    #[inline(always)]
    pub fn word_run(&self, p: usize, o: usize, width: usize) -> Option<(usize, usize)> {
        match self.words {
            Q4Words::Gptq => Some((p * self.ld + o, self.ld)),
            Q4Words::Tiled => (o % Q4_TILE + width <= Q4_TILE).then(|| (self.word_index(p, o), Q4_TILE)),
        }
    }
    /// Words of word row `p`, absolute output columns `o..o + out.len()`.
    #[inline]
    pub fn words_into(&self, p: usize, o: usize, out: &mut [u32]) {
        match self.word_run(p, o, out.len()) {
            Some((i, _)) => out.copy_from_slice(&self.qweight[i..i + out.len()]),
            None => {
                for (l, v) in out.iter_mut().enumerate() {
                    *v = self.word(p, o + l);
                }
            }
        }
    }
    /// This whole matrix's words in [`Q4Words::Tiled`] order (a view of
    /// rows is tiled over its full width `ld`), or `None` when its groups
    /// do not allow it ([`Q4Ref::can_tile`]).
    pub fn tiled_words(&self) -> Option<Vec<u32>> {
        if !self.can_tile() {
            return None;
        }
        let tiled = Q4Ref { words: Q4Words::Tiled, ..*self };
        let mut out = vec![0u32; tiled.qweight_len()];
        if out.is_empty() {
            return Some(out);
        }
        let group_words = self.tile_group_rows() * self.ld.next_multiple_of(Q4_TILE);
        for (g, dst) in out.chunks_mut(group_words).enumerate() {
            self.tile_group_into(g, dst);
        }
        Some(out)
    }
    /// Group `g`'s part of [`Q4Ref::tiled_words`] (one contiguous range of
    /// it, `dst`: the group's word rows times `ld` rounded up to a tile),
    /// so that callers can fill the groups in parallel. Needs
    /// [`Q4Ref::can_tile`].
    pub fn tile_group_into(&self, g: usize, dst: &mut [u32]) {
        let tiled = Q4Ref { words: Q4Words::Tiled, ..*self };
        let (ldp, p0) = (self.ld.next_multiple_of(Q4_TILE), g * self.tile_group_rows());
        let mut row = vec![0u32; self.ld];
        for p in p0..p0 + dst.len() / ldp {
            self.words_into(p, 0, &mut row);
            for (t, tile) in row.chunks(Q4_TILE).enumerate() {
                let i = tiled.word_index(p, t * Q4_TILE) - p0 * ldp;
                dst[i..i + tile.len()].copy_from_slice(tile);
            }
        }
    }

    /// Number of groups over the input rows (the last may be ragged).
    #[inline]
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
        (self.word(r / 8, o) >> (4 * (r % 8))) & 15
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiled order holds every stored word once, where `word`,
    /// `word_run` and `words_into` say, with ragged tiles and groups; and
    /// groups that split words cannot be tiled.
    #[test]
    fn tiled_words_are_the_stored_words() {
        // (outputs, inputs, group): a ragged last tile (136), a ragged last
        // group (200 / 48), one group over all inputs (group ≥ cols).
        for (out, inp, group) in [(136usize, 200usize, 48usize), (64, 64, 8), (200, 96, 128), (8, 8, 8)] {
            let words = inp / 8;
            let qweight: Vec<u32> = (0..words * out).map(|i| (i as u32).wrapping_mul(2654435761) | 1).collect();
            let groups = inp.div_ceil(group);
            let (qzeros, scales) = (vec![0u32; groups * out / 8], vec![half::f16::ONE; groups * out]);
            let stored = Q4Ref::whole(out, inp, group, &qweight, &qzeros, &scales, None);
            let t = stored.tiled_words().expect("groups of whole words tile");
            let tiled = Q4Ref { qweight: &t, words: Q4Words::Tiled, ..stored };
            assert_eq!(t.len(), tiled.qweight_len());
            assert_eq!(t.len(), words * out.next_multiple_of(Q4_TILE));
            let mut seen = vec![false; t.len()];
            for p in 0..words {
                for o in 0..out {
                    assert_eq!(tiled.word(p, o), qweight[p * out + o], "{out}x{inp}/{group}: word ({p}, {o})");
                    seen[tiled.word_index(p, o)] = true;
                }
            }
            // Everything else is padding, zero.
            assert!(t.iter().zip(&seen).all(|(&v, &s)| s || v == 0));
            // A block inside a tile: word rows `stride` apart to the group's end.
            let wpg = if group >= inp { words } else { group / 8 };
            for (p, o, width) in [(0, 0, 16), (words - 1, out - 8, 8), (wpg.min(words - 1), 16, 48)] {
                let (i, stride) = tiled.word_run(p, o, width).expect("inside one tile");
                let end = (p / wpg + 1) * wpg;
                for d in 0..end.min(words) - p {
                    for l in 0..width.min(out - o) {
                        assert_eq!(t[i + d * stride + l], tiled.word(p + d, o + l));
                    }
                }
            }
            if out > Q4_TILE {
                assert!(tiled.word_run(0, Q4_TILE - 8, 16).is_none(), "a block across a tile edge");
                let mut buf = [0u32; 16];
                tiled.words_into(1, Q4_TILE - 8, &mut buf);
                assert!(buf.iter().enumerate().all(|(l, &v)| v == qweight[out + Q4_TILE - 8 + l]));
            }
        }
        let (q, z, s) = (vec![0u32; 3 * 16], vec![0u32; 4 * 2], vec![half::f16::ONE; 4 * 16]);
        assert!(Q4Ref::whole(16, 24, 12, &q, &z, &s, None).tiled_words().is_none(), "group 12 splits words");
    }
}
