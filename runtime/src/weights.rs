//! Memory-mapped checkpoint weights.
//!
//! A [`WeightStore`] maps one `.safetensors` file or every shard named by a
//! `model.safetensors.index.json`, validates each file's header (the
//! safetensors crate checks that offsets are in bounds and the file is not
//! truncated), and serves tensors as [`Elems`] borrowed straight from the
//! map: bf16 stays bf16 until a kernel widens it. The one copy it ever makes
//! is for a tensor whose offset is not aligned to its element size, which
//! safetensors writers normally avoid.
//!
//! GPTQ int4 Linears (`X.qweight`, `X.qzeros`, `X.scales`, `X.g_idx`) are
//! served as one virtual weight `X.weight` of [`DType::Q4`] ([`crate::gptq`]).

use crate::gptq::{self, Q4Error, Q4Layout, Q4Parts};
use half::{bf16, f16};
use memmap2::Mmap;
use qvc_ir::{DType, Elems, Q4Words, Shape, WeightSource};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid safetensors file ({detail}); it may be truncated or corrupt: download it again")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{path}: {detail}")]
    Index { path: PathBuf, detail: String },
    #[error(
        "tensor {name:?} has dtype {dtype} in {path}; qvc reads bf16, f16 and f32 weights, and i32 only as the parts of \
         a GPTQ int4 Linear (.qweight, .qzeros, .g_idx)"
    )]
    UnsupportedDtype { name: String, dtype: String, path: PathBuf },
    #[error("tensor {name:?} is missing from the checkpoint{hint}")]
    Missing { name: String, hint: String },
    #[error("tensor {name:?} has shape {got} in the checkpoint, but the config implies {want}: the config.json does not belong to these weights")]
    WrongShape { name: String, got: Shape, want: Shape },
    #[error("no weights found in {dir}: expected model.safetensors, or model.safetensors.index.json with its shards")]
    NoWeights { dir: PathBuf },
    #[error("{0}")]
    Quant(#[from] Q4Error),
}

struct Entry {
    file: usize,
    dtype: DType,
    shape: Shape,
    start: usize,
    end: usize,
}

/// One GPTQ int4 Linear: its checked layout, and copies of any part that
/// was not aligned in its file (the rest is read from the map).
struct Q4Entry {
    layout: Q4Layout,
    /// Stored names of qweight, qzeros, scales.
    parts: [String; 3],
    qweight: Option<Vec<u32>>,
    qzeros: Option<Vec<u32>>,
    scales: Option<Vec<f16>>,
}

/// Tensors of a checkpoint, by name, memory-mapped.
pub struct WeightStore {
    maps: Vec<Mmap>,
    paths: Vec<PathBuf>,
    entries: HashMap<String, Entry>,
    /// Tensors that were not aligned in the file, widened to f32.
    copies: HashMap<String, Vec<f32>>,
    /// Int4 Linears by the virtual name of their weight (`X.weight`).
    q4: HashMap<String, Q4Entry>,
    /// Their biases (`X.bias`), and whether each is all zeros.
    q4_bias_zero: HashMap<String, bool>,
}

fn parse_dtype(d: safetensors::Dtype, name: &str) -> Option<DType> {
    let int_part =
        [gptq::QWEIGHT, gptq::TILED, gptq::QZEROS, gptq::G_IDX, gptq::PERM].iter().any(|s| name.ends_with(s));
    match d {
        safetensors::Dtype::BF16 => Some(DType::BF16),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::I32 if int_part => Some(DType::I32),
        _ => None,
    }
}

impl WeightStore {
    /// Open a checkpoint directory (`model.safetensors`, or the index and its
    /// shards) or a single `.safetensors` file.
    pub fn open(path: &Path) -> Result<Self, WeightError> {
        if path.is_file() {
            if path.extension().and_then(|e| e.to_str()) == Some("json") {
                return Self::open_index(path);
            }
            return Self::open_files(&[path.to_path_buf()]);
        }
        let single = path.join("model.safetensors");
        let index = path.join("model.safetensors.index.json");
        if index.is_file() {
            Self::open_index(&index)
        } else if single.is_file() {
            Self::open_files(&[single])
        } else {
            Err(WeightError::NoWeights { dir: path.to_path_buf() })
        }
    }

    /// Open the shards named by a `model.safetensors.index.json`.
    pub fn open_index(index: &Path) -> Result<Self, WeightError> {
        let text = std::fs::read_to_string(index).map_err(|source| WeightError::Open { path: index.into(), source })?;
        let bad = |detail: String| WeightError::Index { path: index.into(), detail };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("has no \"weight_map\" object".into()))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards: Vec<PathBuf> = Vec::new();
        for (name, f) in map {
            let f = f.as_str().ok_or_else(|| bad(format!("weight_map entry for {name:?} is not a file name")))?;
            let p = dir.join(f);
            if !shards.contains(&p) {
                shards.push(p);
            }
        }
        let store = Self::open_files(&shards)?;
        for name in map.keys() {
            if !store.entries.contains_key(name) {
                return Err(bad(format!("lists {name:?}, but no shard contains it")));
            }
        }
        Ok(store)
    }

    /// Map the given safetensors files and index their tensors.
    pub fn open_files(files: &[PathBuf]) -> Result<Self, WeightError> {
        let mut s = WeightStore::empty();
        for path in files {
            let file = File::open(path).map_err(|source| WeightError::Open { path: path.clone(), source })?;
            // SAFETY: the map is read-only; a checkpoint modified while it is
            // mapped is outside what any mmap-based loader can defend against.
            let map = unsafe { Mmap::map(&file) }.map_err(|source| WeightError::Open { path: path.clone(), source })?;
            let corrupt = |detail: String| WeightError::Corrupt { path: path.clone(), detail };
            let (header_len, meta) =
                safetensors::SafeTensors::read_metadata(&map).map_err(|e| corrupt(e.to_string()))?;
            let base = 8 + header_len;
            let fi = s.maps.len();
            for (name, info) in meta.tensors() {
                // Alignment padding of compiled artifacts (`runtime::artifact`):
                // U8 filler that keeps the data section contiguous, not a weight.
                if name.starts_with("__pad.") && info.dtype == safetensors::Dtype::U8 {
                    continue;
                }
                let dtype = parse_dtype(info.dtype, &name).ok_or_else(|| WeightError::UnsupportedDtype {
                    name: name.clone(),
                    dtype: format!("{:?}", info.dtype),
                    path: path.clone(),
                })?;
                let (a, b) = info.data_offsets;
                let shape = Shape::new(info.shape.clone());
                if b - a != shape.numel() * dtype.size() || base + b > map.len() {
                    return Err(corrupt(format!("tensor {name:?} has inconsistent offsets")));
                }
                let entry = Entry { file: fi, dtype, shape, start: base + a, end: base + b };
                let aligned = (map.as_ptr() as usize + entry.start).is_multiple_of(dtype.size());
                if !aligned && dtype.is_float() {
                    let e = elems_of(&map[entry.start..entry.end], dtype).to_f32_vec();
                    s.copies.insert(name.clone(), e);
                }
                s.entries.insert(name, entry);
            }
            s.maps.push(map);
            s.paths.push(path.clone());
        }
        s.index_q4()?;
        Ok(s)
    }

    fn empty() -> Self {
        WeightStore {
            maps: vec![],
            paths: vec![],
            entries: HashMap::new(),
            copies: HashMap::new(),
            q4: HashMap::new(),
            q4_bias_zero: HashMap::new(),
        }
    }

    /// The raw bytes of a stored tensor (`None` for a shapes-only entry).
    fn bytes(&self, e: &Entry) -> Option<&[u8]> {
        self.maps.get(e.file).map(|m| &m[e.start..e.end])
    }

    /// Find every GPTQ Linear (`X.qweight`), check it, and serve it as `X.weight`.
    fn index_q4(&mut self) -> Result<(), WeightError> {
        // `X.qweight` (a checkpoint), or `X.q4_tiled` (a `qvc compile`
        // artifact: the same words already in the CPU kernels' order).
        let prefixes: Vec<(String, &str)> = self
            .entries
            .keys()
            .filter_map(|n| {
                let by = |s: &'static str| n.strip_suffix(s).map(|p| (p.to_string(), s));
                by(gptq::QWEIGHT).or_else(|| by(gptq::TILED))
            })
            .collect();
        for (prefix, words_part) in prefixes {
            let part = |suffix: &str| self.entries.get(&format!("{prefix}{suffix}"));
            let u32s = |e: &Entry| -> Cow<'_, [u32]> {
                match self.bytes(e) {
                    Some(b) => cast_or_copy(b),
                    None => Cow::Owned(vec![0; e.shape.numel()]),
                }
            };
            if words_part == gptq::TILED && part(gptq::QWEIGHT).is_some() {
                return Err(Q4Error {
                    prefix: prefix.clone(),
                    detail: format!(
                        "has both {prefix}{} and {prefix}{}; which one is meant?",
                        gptq::QWEIGHT,
                        gptq::TILED
                    ),
                }
                .into());
            }
            let qw = part(words_part).expect("found by its name");
            let words = if words_part == gptq::TILED { Q4Words::Tiled } else { Q4Words::Gptq };
            let parts = Q4Parts {
                qweight: (qw.dtype, qw.shape.clone(), u32s(qw)),
                words,
                qzeros: part(gptq::QZEROS).map(|e| (e.dtype, e.shape.clone(), u32s(e))),
                scales: part(gptq::SCALES).map(|e| {
                    let v: Cow<'_, [f16]> = match self.bytes(e) {
                        Some(b) if e.dtype == DType::F16 => cast_or_copy(b),
                        _ => Cow::Owned(vec![]),
                    };
                    (e.dtype, e.shape.clone(), v)
                }),
                g_idx: part(gptq::G_IDX).map(|e| (e.dtype, e.shape.clone(), u32s(e))),
                perm: part(gptq::PERM).map(|e| (e.dtype, e.shape.clone(), u32s(e))),
            };
            let mut layout = Q4Layout::check(&prefix, &parts)?;
            if let (Some(z), Some(s)) = (&parts.qzeros, &parts.scales) {
                layout.tile(&parts.qweight.2, &z.2, &s.2);
            }
            let owned_u32 = |c: &Cow<'_, [u32]>| matches!(c, Cow::Owned(_)).then(|| c.to_vec());
            let entry = Q4Entry {
                // Tiled words replace the file's: keep no copy of those.
                qweight: owned_u32(&parts.qweight.2).filter(|_| layout.tiled.is_none()),
                qzeros: parts.qzeros.as_ref().and_then(|z| owned_u32(&z.2)),
                scales: parts.scales.as_ref().and_then(|s| matches!(s.2, Cow::Owned(_)).then(|| s.2.to_vec())),
                parts: [words_part, gptq::QZEROS, gptq::SCALES].map(|s| format!("{prefix}{s}")),
                layout,
            };
            let name = format!("{prefix}.weight");
            if self.entries.contains_key(&name) {
                return Err(Q4Error {
                    prefix,
                    detail: format!("the checkpoint has both {name:?} and its int4 parts; which one is meant?"),
                }
                .into());
            }
            self.q4.insert(name, entry);
            let bias = format!("{prefix}.bias");
            let zero = self.weight(&bias).map(|e| (0..e.len()).all(|i| e.get(i) == 0.0));
            if let Some(zero) = zero {
                self.q4_bias_zero.insert(bias, zero);
            }
        }
        Ok(())
    }

    /// The int4 weight `name` (a virtual `X.weight`), if it is one.
    pub fn q4(&self, name: &str) -> Option<qvc_ir::Q4Ref<'_>> {
        let q = self.q4.get(name)?;
        let raw = |i: usize| self.entries.get(&q.parts[i]).and_then(|e| self.bytes(e));
        let qweight: &[u32] = match &q.qweight {
            Some(v) => v,
            None => bytemuck::cast_slice(raw(0)?),
        };
        let qzeros: &[u32] = match &q.qzeros {
            Some(v) => v,
            None => bytemuck::cast_slice(raw(1)?),
        };
        let scales: &[f16] = match &q.scales {
            Some(v) => v,
            None => bytemuck::cast_slice(raw(2)?),
        };
        Some(q.layout.view(qweight, qzeros, scales))
    }

    /// Names of the int4 weights (virtual `X.weight`), sorted.
    pub fn q4_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.q4.keys().map(|s| s.as_str()).collect();
        v.sort();
        v
    }

    /// A store that knows tensor names, dtypes and shapes but holds no data
    /// (`weight` answers `None`): enough to build graphs and plan them, as
    /// `qvc compile --synthetic --dry-run` does for the full-size model.
    pub fn shapes_only(tensors: impl IntoIterator<Item = (String, DType, Shape)>) -> Self {
        let mut s = WeightStore::empty();
        for (name, dtype, shape) in tensors {
            let end = shape.numel() * dtype.size();
            // file index usize::MAX: no map backs it (see `weight`).
            s.entries.insert(name, Entry { file: usize::MAX, dtype, shape, start: 0, end });
        }
        s
    }

    /// Stored dtype and shape of `name` ([`DType::Q4`] and the logical
    /// `[out, in]` for an int4 weight).
    pub fn info(&self, name: &str) -> Option<(DType, Shape)> {
        if let Some(q) = self.q4.get(name) {
            return Some((DType::Q4, Shape::new([q.layout.out, q.layout.inp])));
        }
        self.entries.get(name).map(|e| (e.dtype, e.shape.clone()))
    }

    /// Whether the float tensor `name` exists and has a nonzero element.
    /// (GPTQ stores a bias on every quantized Linear, zeros where the model
    /// has none; a graph adds only those that change the result.)
    pub fn nonzero(&self, name: &str) -> bool {
        if let Some(zero) = self.q4_bias_zero.get(name) {
            return !zero;
        }
        match self.weight(name) {
            Some(Elems::Q4(_)) => true,
            Some(e) => (0..e.len()).any(|i| e.get(i) != 0.0),
            None => false,
        }
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.entries.keys().map(|s| s.as_str()).collect();
        v.sort();
        v
    }

    /// Check that `name` exists with shape `want`; returns its stored dtype.
    pub fn expect(&self, name: &str, want: &[usize]) -> Result<DType, WeightError> {
        let (dtype, shape) = self.info(name).ok_or_else(|| {
            let stem = name.rsplit_once('.').map_or(name, |(a, _)| a);
            let similar: Vec<&str> = self.names().into_iter().filter(|n| n.starts_with(stem)).take(3).collect();
            WeightError::Missing {
                name: name.into(),
                hint: if similar.is_empty() {
                    " (is this a Qwen-VL checkpoint, and are all shards present?)".into()
                } else {
                    format!(" (found {})", similar.join(", "))
                },
            }
        })?;
        if shape.dims() != want {
            return Err(WeightError::WrongShape { name: name.into(), got: shape, want: Shape::new(want) });
        }
        Ok(dtype)
    }

    /// Total bytes of all tensors.
    pub fn total_bytes(&self) -> usize {
        self.entries.values().map(|e| e.end - e.start).sum()
    }
}

fn elems_of(bytes: &[u8], dtype: DType) -> Elems<'_> {
    match dtype {
        DType::F32 => Elems::F32(bytemuck::cast_slice(bytes)),
        DType::BF16 => Elems::BF16(bytemuck::cast_slice::<u8, bf16>(bytes)),
        DType::F16 => Elems::F16(bytemuck::cast_slice::<u8, f16>(bytes)),
        DType::I32 | DType::Q4 => unreachable!("integer tensors are not served as float elements"),
    }
}

/// `bytes` as `T`s: borrowed when aligned, else copied.
fn cast_or_copy<T: bytemuck::Pod>(bytes: &[u8]) -> Cow<'_, [T]> {
    match bytemuck::try_cast_slice(bytes) {
        Ok(v) => Cow::Borrowed(v),
        Err(_) => Cow::Owned(bytes.chunks_exact(std::mem::size_of::<T>()).map(bytemuck::pod_read_unaligned).collect()),
    }
}

impl WeightSource for WeightStore {
    fn weight(&self, name: &str) -> Option<Elems<'_>> {
        if let Some(c) = self.copies.get(name) {
            return Some(Elems::F32(c));
        }
        if self.q4.contains_key(name) {
            return self.q4(name).map(Elems::Q4);
        }
        let e = self.entries.get(name)?;
        if !e.dtype.is_float() {
            return None;
        }
        let map = self.maps.get(e.file)?;
        Some(elems_of(&map[e.start..e.end], e.dtype))
    }
}
