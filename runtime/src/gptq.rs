//! GPTQ int4 Linears in a checkpoint (AutoGPTQ checkpoint format v1, the
//! layout of Qwen-VL-Chat-Int4): `X.qweight`, `X.qzeros`, `X.scales`,
//! `X.g_idx` become one virtual weight `X.weight` of [`DType::Q4`] with the
//! logical shape `[out, in]` of the float weight it replaces, so the model's
//! graphs read it like any other weight.
//!
//! Everything is checked here, once, with errors that name the tensor:
//! shapes, dtypes, `g_idx` in range and making groups of one size (the last
//! ragged). Act-order (`desc_act`: `g_idx` is not `i / G`) is resolved here
//! too: the stored rows are re-sorted by group into an owned copy and the
//! permutation kept for the activations, as exllama does, so kernels only
//! ever see consecutive groups. The words are then regrouped once into the
//! CPU kernels' tiled order ([`Q4Layout::tile`], `qvc_ir::Q4Words`). A
//! compiled artifact stores the re-sorted rows already tiled (`X.q4_tiled`)
//! and the permutation (`X.q4_perm`) and maps them as they are.

use qvc_ir::{DType, Q4Ref, Q4Words, Shape};
use std::borrow::Cow;

/// Suffixes of the tensors one quantized Linear `X` is stored as.
pub const QWEIGHT: &str = ".qweight";
pub const QZEROS: &str = ".qzeros";
pub const SCALES: &str = ".scales";
pub const G_IDX: &str = ".g_idx";
/// Written by `qvc compile` for act-order weights: stored row `r` holds input `perm[r]`.
pub const PERM: &str = ".q4_perm";
/// Written by `qvc compile` instead of `X.qweight`: the same words in
/// [`Q4Words::Tiled`] order, I32 `[in / 8, out rounded up to 64]`, so the
/// CPU kernels read them straight from the map (rows in group order).
pub const TILED: &str = ".q4_tiled";

/// What is wrong with one quantized Linear.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("int4 weight {prefix:?}: {detail}")]
pub struct Q4Error {
    pub prefix: String,
    pub detail: String,
}

/// The raw tensors of one quantized Linear, as read from the files.
pub struct Q4Parts<'a> {
    /// `X.qweight`, or `X.q4_tiled` when `words` is [`Q4Words::Tiled`].
    pub qweight: (DType, Shape, Cow<'a, [u32]>),
    pub words: Q4Words,
    pub qzeros: Option<(DType, Shape, Cow<'a, [u32]>)>,
    pub scales: Option<(DType, Shape, Cow<'a, [half::f16]>)>,
    pub g_idx: Option<(DType, Shape, Cow<'a, [u32]>)>,
    pub perm: Option<(DType, Shape, Cow<'a, [u32]>)>,
}

/// A validated int4 weight's layout; the store keeps the tensor data.
#[derive(Clone, Debug)]
pub struct Q4Layout {
    /// Output features (rows of the logical weight).
    pub out: usize,
    /// Input features.
    pub inp: usize,
    pub group: usize,
    /// Act-order: stored row `r` holds input `perm[r]`, and its inverse.
    pub perm: Option<(Vec<u32>, Vec<u32>)>,
    /// Act-order from `g_idx`: the stored rows had to be re-sorted, and this
    /// is the new qweight (the file's is not in group order).
    pub resorted: Option<Vec<u32>>,
    /// The order of the file's words (tiled in a `qvc compile` artifact).
    pub file_words: Q4Words,
    /// The qweight in [`Q4Words::Tiled`] order (the CPU GEMV's streaming
    /// order), made once at load by [`Q4Layout::tile`]; it replaces both the
    /// file's words and `resorted`.
    pub tiled: Option<Vec<u32>>,
}

impl Q4Layout {
    /// Check one Linear's parts and resolve its act-order.
    pub fn check(prefix: &str, p: &Q4Parts) -> Result<Q4Layout, Q4Error> {
        let err = |detail: String| Q4Error { prefix: prefix.to_string(), detail };
        let need =
            |what: &str| err(format!("has {prefix}{QWEIGHT} but no {prefix}{what}; the checkpoint is incomplete"));
        let (qd, qs, qw) = &p.qweight;
        let (zd, zs, _) = p.qzeros.as_ref().ok_or_else(|| need(QZEROS))?;
        let (sd, ss, _) = p.scales.as_ref().ok_or_else(|| need(SCALES))?;
        let (gd, gs, g_idx) = p.g_idx.as_ref().ok_or_else(|| need(G_IDX))?;
        for (what, d, want) in [(QWEIGHT, qd, DType::I32), (QZEROS, zd, DType::I32), (G_IDX, gd, DType::I32)] {
            if *d != want {
                return Err(err(format!("{prefix}{what} has dtype {d}, expected {want}")));
            }
        }
        if *sd != DType::F16 {
            return Err(err(format!("{prefix}{SCALES} has dtype {sd}, expected f16 (AutoGPTQ format v1)")));
        }
        if gs.rank() != 1 {
            return Err(err(format!("{prefix}{G_IDX} has shape {gs}, expected [in]")));
        }
        let inp = gs.dim(0);
        if ss.rank() != 2 {
            return Err(err(format!("{prefix}{SCALES} has shape {ss}, expected [groups, out]")));
        }
        let (groups, out) = (ss.dim(0), ss.dim(1));
        if inp == 0 || out == 0 || inp % 8 != 0 || out % 8 != 0 {
            return Err(err(format!(
                "in = {inp} and out = {out} features: both must be positive multiples of 8 to pack 4-bit values"
            )));
        }
        let tiled = p.words == Q4Words::Tiled;
        if tiled && qs.dims() != [inp / 8, out.next_multiple_of(qvc_ir::Q4_TILE)] {
            return Err(err(format!(
                "{prefix}{TILED} has shape {qs}, expected [{}, {}] (in/8 × out rounded up to {}); was the artifact \
                 written by another version of qvc? Compile it again",
                inp / 8,
                out.next_multiple_of(qvc_ir::Q4_TILE),
                qvc_ir::Q4_TILE
            )));
        }
        if !tiled && qs.dims() != [inp / 8, out] {
            return Err(err(format!(
                "{prefix}{QWEIGHT} has shape {qs}, expected [{}, {out}] (in/8 × out for 4-bit values, in = {inp} from \
                 {prefix}{G_IDX}, out = {out} from {prefix}{SCALES}); is this a 4-bit GPTQ v1 checkpoint?",
                inp / 8
            )));
        }
        if zs.dims() != [groups, out / 8] {
            return Err(err(format!("{prefix}{QZEROS} has shape {zs}, expected [{groups}, {}]", out / 8)));
        }
        // Groups: g_idx in range, each group G rows but the last.
        let mut count = vec![0usize; groups];
        for (i, &g) in g_idx.iter().enumerate() {
            let g = g as i32;
            if g < 0 || g as usize >= groups {
                return Err(err(format!(
                    "{prefix}{G_IDX}[{i}] = {g} is out of range: {prefix}{SCALES} has {groups} groups"
                )));
            }
            count[g as usize] += 1;
        }
        let group = count[0];
        let ok = group > 0 && inp.div_ceil(group) == groups;
        if !ok || count.iter().enumerate().any(|(g, &c)| c != group.min(inp - (g * group).min(inp))) {
            return Err(err(format!(
                "{prefix}{G_IDX} makes groups of sizes {:?}; qvc needs every group but the last to have the same \
                 size (as GPTQ writes it)",
                &count[..count.len().min(8)]
            )));
        }
        let in_order = g_idx.iter().enumerate().all(|(r, &g)| g as usize == r / group);
        if tiled && !(in_order && (group >= inp || group.is_multiple_of(8))) {
            return Err(err(format!(
                "{prefix}{TILED} needs {prefix}{G_IDX} in group order and groups of whole words (group {group}); \
                 was the artifact written by another version of qvc? Compile it again"
            )));
        }
        let file_perm = match &p.perm {
            Some((d, s, v)) => {
                if *d != DType::I32 || s.dims() != [inp] {
                    return Err(err(format!("{prefix}{PERM} has dtype {d}, shape {s}, expected i32 [{inp}]")));
                }
                if !in_order {
                    return Err(err(format!("{prefix}{PERM} is given but {prefix}{G_IDX} is not in group order")));
                }
                Some(v.to_vec())
            }
            None => None,
        };
        let (perm, resorted) = if in_order {
            (file_perm, None)
        } else {
            // Sort the stored rows by group (stable: within a group, file order).
            let mut order: Vec<u32> = (0..inp as u32).collect();
            order.sort_by_key(|&r| g_idx[r as usize]);
            let mut q = vec![0u32; qw.len()];
            for (new, &old) in order.iter().enumerate() {
                let old = old as usize;
                for o in 0..out {
                    let nib = (qw[old / 8 * out + o] >> (4 * (old % 8))) & 15;
                    q[new / 8 * out + o] |= nib << (4 * (new % 8));
                }
            }
            (Some(order), Some(q))
        };
        let perm = match perm {
            Some(p) => {
                let mut inv = vec![u32::MAX; inp];
                for (r, &i) in p.iter().enumerate() {
                    if i as usize >= inp || inv[i as usize] != u32::MAX {
                        return Err(err(format!("{prefix}{PERM} is not a permutation of 0..{inp}")));
                    }
                    inv[i as usize] = r as u32;
                }
                Some((p, inv))
            }
            None => None,
        };
        Ok(Q4Layout { out, inp, group, perm, resorted, file_words: p.words, tiled: None })
    }

    /// Regroup the words into [`Q4Words::Tiled`] order when the group size
    /// allows it (`qweight` is the file's, as for [`Q4Layout::view`]): the
    /// CPU's decode GEMV then reads one contiguous run per group and task
    /// instead of short runs a whole row apart. Costs one pass over the
    /// words at load and their size in memory (instead of the map's pages).
    pub fn tile(&mut self, qweight: &[u32], qzeros: &[u32], scales: &[half::f16]) {
        if self.file_words == Q4Words::Tiled {
            return;
        }
        let tiled = qvc_kernels::q4::tile_words(&self.view(qweight, qzeros, scales));
        if tiled.is_some() {
            self.resorted = None;
            self.tiled = tiled;
        }
    }

    /// The weight as kernels read it.
    pub fn view<'a>(&'a self, qweight: &'a [u32], qzeros: &'a [u32], scales: &'a [half::f16]) -> Q4Ref<'a> {
        let q = Q4Ref::whole(
            self.out,
            self.inp,
            self.group,
            self.resorted.as_deref().unwrap_or(qweight),
            qzeros,
            scales,
            self.perm.as_ref().map(|(p, i)| (p.as_slice(), i.as_slice())),
        );
        match &self.tiled {
            Some(t) => Q4Ref { qweight: t, words: Q4Words::Tiled, ..q },
            None => Q4Ref { words: self.file_words, ..q },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parts of a `[out = 72, in = 16]` Linear, group 8, the words as `words`
    /// of shape `qshape`, `g_idx` as given.
    fn parts(words: Q4Words, qshape: [usize; 2], g_idx: Vec<u32>) -> Q4Parts<'static> {
        let (out, inp, groups) = (72usize, 16usize, 2usize);
        let n = qshape[0] * qshape[1];
        Q4Parts {
            qweight: (DType::I32, Shape::new(qshape), Cow::Owned(vec![0x1234_5678; n])),
            words,
            qzeros: Some((DType::I32, Shape::new([groups, out / 8]), Cow::Owned(vec![0; groups * out / 8]))),
            scales: Some((DType::F16, Shape::new([groups, out]), Cow::Owned(vec![half::f16::ONE; groups * out]))),
            g_idx: Some((DType::I32, Shape::new([inp]), Cow::Owned(g_idx))),
            perm: None,
        }
    }

    /// An artifact's tiled words are taken as they are (padded width, no
    /// second tiling); a wrong width or an out-of-order `g_idx` is refused
    /// by name.
    #[test]
    fn tiled_words_from_an_artifact() {
        let in_order: Vec<u32> = (0..16).map(|r| r / 8).collect();
        let mut l = Q4Layout::check("x", &parts(Q4Words::Tiled, [2, 128], in_order.clone())).unwrap();
        let words = vec![0x1234_5678u32; 2 * 128];
        let (z, s) = (vec![0u32; 18], vec![half::f16::ONE; 144]);
        l.tile(&words, &z, &s);
        assert!(l.tiled.is_none(), "already tiled: no copy");
        assert_eq!(l.view(&words, &z, &s).words, Q4Words::Tiled);

        let e = Q4Layout::check("x", &parts(Q4Words::Tiled, [2, 72], in_order)).unwrap_err();
        assert!(e.detail.contains("x.q4_tiled has shape [2, 72], expected [2, 128]"), "{e}");
        let shuffled: Vec<u32> = (0..16).map(|r| (r % 2) as u32).collect();
        let e = Q4Layout::check("x", &parts(Q4Words::Tiled, [2, 128], shuffled)).unwrap_err();
        assert!(e.detail.contains("group order"), "{e}");
    }
}
