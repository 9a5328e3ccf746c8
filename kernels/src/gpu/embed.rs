//! Embedding gather with image-feature overwrite (QWEN-VL.md §6.1).
//!
//! For each token `t`: `x[t] = features[src[t]]` when `src[t] ≥ 0` (an image
//! feature row: the positions between `<img>` and `</img>` are overwritten by
//! that image's 256 vectors), else `x[t] = table[ids[t]]` (the bf16 `wte`
//! row). `ids`, `src` are i32 `[tokens]`; `table` is bf16 `[vocab, hidden]`;
//! `features` is `[feature_rows, hidden]` (`n_images · 256` rows) in f32 or
//! bf16; `x` is f32 `[tokens, hidden]`, the residual stream.
//!
//! Invalid indices: the host validates them before launching
//! ([`EmbedSpec::validate_indices`]; the CPU paths return that error). The GPU
//! kernel never reads out of bounds whatever the indices: a token whose id is
//! outside `0..vocab` (when it reads the table) or whose `src` is
//! `≥ feature_rows` gets a row of NaN, so a mistake shows up at once instead
//! of as a plausible wrong embedding.
//!
//! GPU kernel: one block per token, threads striding over the row in aligned
//! vectors of `vec` = 4, 2 or 1 elements (the largest dividing `hidden`;
//! buffers 16-byte aligned). The source choice is uniform per block, so the
//! three paths (table, features, NaN) are plain branches; no barriers.

use std::fmt;

use qvc_codegen::{Addr, Cmp, Kernel, KernelBuilder, Operand, Reg, Sreg, Ty};
use qvc_ir::{DType, Elems};
use rayon::prelude::*;

use super::norm::{load_f32s, store_f32s, vec_width};
use crate::{Cost, KernelSpec, Launch};

/// One embedding-gather kernel (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EmbedSpec {
    pub tokens: usize,
    pub hidden: usize,
    /// Rows of the bf16 table.
    pub vocab: usize,
    /// dtype of the image features: [`DType::F32`] or [`DType::BF16`].
    pub features: DType,
    /// Rows of the feature array (`n_images · 256`; 0 when there is no image).
    pub feature_rows: usize,
}

/// A spec that cannot be built, or arguments that do not match a spec.
#[derive(Clone, Debug, PartialEq)]
pub enum EmbedError {
    /// The spec itself is unusable; the string says why.
    Spec(String),
    /// A buffer has the wrong number of elements.
    Len { what: &'static str, expected: usize, got: usize },
    /// A text token's id is outside `0..vocab`.
    Id { token: usize, id: i32, vocab: usize },
    /// An image token's feature row is outside `0..feature_rows`.
    FeatureRow { token: usize, row: i32, feature_rows: usize },
}

impl fmt::Display for EmbedError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            EmbedError::Spec(s) => write!(f, "invalid embed spec: {s}"),
            EmbedError::Len { what, expected, got } => {
                write!(f, "embed: `{what}` has {got} elements, expected {expected}")
            }
            EmbedError::Id { token, id, vocab } => write!(f, "embed: token {token} has id {id}, outside 0..{vocab}"),
            EmbedError::FeatureRow { token, row, feature_rows } => {
                write!(f, "embed: token {token} takes feature row {row}, outside 0..{feature_rows}")
            }
        }
    }
}

impl std::error::Error for EmbedError {}

/// Threads per block (at most).
const BLOCK: usize = 256;

impl EmbedSpec {
    /// Checks that the spec can be built.
    pub fn validate(&self) -> Result<(), EmbedError> {
        let bad = |s: String| Err(EmbedError::Spec(s));
        if self.tokens == 0 || self.hidden == 0 || self.vocab == 0 {
            return bad(format!("tokens, hidden and vocab must be positive: {self:?}"));
        }
        if !matches!(self.features, DType::F32 | DType::BF16) {
            return bad(format!("features = {} must be f32 or bf16", self.features));
        }
        let lim = i32::MAX as usize;
        if [self.vocab * self.hidden, self.feature_rows * self.hidden, self.tokens * self.hidden]
            .iter()
            .any(|&n| n > lim)
            || self.tokens > lim
            || self.hidden > lim / 4
        {
            return bad(format!("sizes too large for 32-bit indexing: {self:?}"));
        }
        Ok(())
    }

    /// Checks every token's index against the table or the features: what
    /// the host must do before a GPU launch (the kernel writes NaN rows instead).
    pub fn validate_indices(&self, ids: &[i32], src: &[i32]) -> Result<(), EmbedError> {
        self.validate()?;
        for (what, got) in [("ids", ids.len()), ("src", src.len())] {
            if got != self.tokens {
                return Err(EmbedError::Len { what, expected: self.tokens, got });
            }
        }
        for (token, (&id, &s)) in ids.iter().zip(src).enumerate() {
            if s >= 0 {
                if s as usize >= self.feature_rows {
                    return Err(EmbedError::FeatureRow { token, row: s, feature_rows: self.feature_rows });
                }
            } else if id < 0 || id as usize >= self.vocab {
                return Err(EmbedError::Id { token, id, vocab: self.vocab });
            }
        }
        Ok(())
    }

    fn check(&self, ids: &[i32], src: &[i32], table: &Elems, features: &Elems, x: &[f32]) -> Result<(), EmbedError> {
        self.validate_indices(ids, src)?;
        let h = self.hidden;
        for (what, expected, got) in [
            ("table", self.vocab * h, table.len()),
            ("features", self.feature_rows * h, features.len()),
            ("x", self.tokens * h, x.len()),
        ] {
            if expected != got {
                return Err(EmbedError::Len { what, expected, got });
            }
        }
        Ok(())
    }

    /// Fast CPU path: rayon over tokens, each row widened by [`Elems::read_into`].
    /// `table` and `features` may be any float dtype on the CPU.
    pub fn run_cpu(
        &self,
        ids: &[i32],
        src: &[i32],
        table: Elems,
        features: Elems,
        x: &mut [f32],
    ) -> Result<(), EmbedError> {
        self.check(ids, src, &table, &features, x)?;
        let h = self.hidden;
        x.par_chunks_mut(h).enumerate().for_each(|(t, row)| match src[t] {
            s if s >= 0 => features.read_into(s as usize * h, row),
            _ => table.read_into(ids[t] as usize * h, row),
        });
        Ok(())
    }

    /// Naive reference: element by element.
    pub fn run_ref(
        &self,
        ids: &[i32],
        src: &[i32],
        table: Elems,
        features: Elems,
        x: &mut [f32],
    ) -> Result<(), EmbedError> {
        self.check(ids, src, &table, &features, x)?;
        let h = self.hidden;
        for t in 0..self.tokens {
            for j in 0..h {
                x[t * h + j] = if src[t] >= 0 {
                    features.get(src[t] as usize * h + j)
                } else {
                    table.get(ids[t] as usize * h + j)
                };
            }
        }
        Ok(())
    }

    fn vec(&self) -> usize {
        vec_width(self.hidden)
    }

    fn block(&self) -> usize {
        (self.hidden / self.vec()).next_multiple_of(32).min(BLOCK)
    }

    /// The parameters in the order the kernel declares them.
    pub fn param_names(&self) -> Vec<&'static str> {
        vec!["ids", "src", "table", "features", "x"]
    }
}

impl KernelSpec for EmbedSpec {
    fn name(&self) -> String {
        format!("embed_t{}_h{}_v{}_f{}_{}", self.tokens, self.hidden, self.vocab, self.feature_rows, self.features)
    }

    fn build(&self) -> Kernel {
        if let Err(e) = self.validate() {
            panic!("{e}");
        }
        let (h, vec, block) = (self.hidden, self.vec(), self.block());
        let chunks = (h / vec) as u32;
        let mut b = KernelBuilder::new(self.name());
        b.max_threads(block as u32);

        let ids = b.ptr_param("ids");
        let src = b.ptr_param("src");
        let table = b.ptr_param("table");
        let features = b.ptr_param("features");
        let x = b.ptr_param("x");

        let tid = b.special(Sreg::TidX);
        let t = b.special(Sreg::CtaidX);
        let ia = b.index_addr(ids, t, 4);
        let id = b.ld(qvc_codegen::Space::GlobalNc, Ty::S32, Addr::reg(ia, 0));
        let sa = b.index_addr(src, t, 4);
        let s = b.ld(qvc_codegen::Space::GlobalNc, Ty::S32, Addr::reg(sa, 0));
        let x_row = b.index_addr(x, t, (h * 4) as u32);

        let (from_table, nan, end) = (b.label("table"), b.label("nan"), b.label("end"));
        // Copies row `row` of `base` (element type `dtype`) into x[t].
        let copy = |b: &mut KernelBuilder, base: Reg, row: Reg, dtype: DType| {
            let r_el = b.mul(Ty::U32, row, h as u32);
            let src_row = b.index_addr(base, r_el, dtype.size() as u32);
            b.for_range(tid, chunks, block as u32, |b, c| {
                let e = b.mul(Ty::U32, c, vec as u32);
                let sa = b.index_addr(src_row, e, dtype.size() as u32);
                let v = load_f32s(b, None, "global.nc", dtype, vec, Addr::reg(sa, 0));
                let xa = b.index_addr(x_row, e, 4);
                store_f32s(b, None, DType::F32, &v, Addr::reg(xa, 0));
            });
            b.bra(&end);
        };

        let text = b.setp(Cmp::Lt, Ty::S32, s, 0);
        b.bra_if(text, false, &from_table);
        // Image token (s ≥ 0 here, so the unsigned compare is exact).
        let bad_row = b.setp(Cmp::Ge, Ty::U32, s, self.feature_rows as u32);
        b.bra_if(bad_row, false, &nan);
        copy(&mut b, features, s, self.features);

        b.place(&from_table);
        // Unsigned: a negative id becomes ≥ 2^31 > vocab.
        let bad_id = b.setp(Cmp::Ge, Ty::U32, id, self.vocab as u32);
        b.bra_if(bad_id, false, &nan);
        copy(&mut b, table, id, DType::BF16);

        b.place(&nan);
        let nans: Vec<_> = (0..vec).map(|_| b.mov(Ty::F32, Operand::F32(f32::NAN))).collect();
        b.for_range(tid, chunks, block as u32, |b, c| {
            let e = b.mul(Ty::U32, c, vec as u32);
            let xa = b.index_addr(x_row, e, 4);
            store_f32s(b, None, DType::F32, &nans, Addr::reg(xa, 0));
        });
        b.place(&end);
        b.ret();
        b.finish()
    }

    fn launch(&self) -> Launch {
        Launch::new([self.tokens as u32, 1, 1], [self.block() as u32, 1, 1])
    }

    fn cost(&self) -> Cost {
        let (t, h) = (self.tokens as u64, self.hidden as u64);
        // Assumes each feature row is placed once and every other token is text.
        let img = t.min(self.feature_rows as u64);
        let reads = img * h * self.features.size() as u64 + (t - img) * h * 2 + t * 8;
        Cost { flops: 0, bytes: reads + t * h * 4 }
    }
}

/// The Qwen-VL-Chat decoder's embedding (hidden 4096, vocab 151936): decode
/// (1 token, no image), a batch of 8 tokens, and a 300-token prefill with one
/// image (256 feature rows) in f32 or bf16.
pub fn model_specs() -> Vec<EmbedSpec> {
    let e = |tokens, features, feature_rows| EmbedSpec { tokens, hidden: 4096, vocab: 151936, features, feature_rows };
    vec![e(1, DType::BF16, 0), e(8, DType::BF16, 0), e(300, DType::BF16, 256), e(300, DType::F32, 256)]
}
