//! Memory-mapped checkpoint weights.
//!
//! A [`WeightStore`] maps one `.safetensors` file or every shard named by a
//! `model.safetensors.index.json`, validates each file's header (the
//! safetensors crate checks that offsets are in bounds and the file is not
//! truncated), and serves tensors as [`Elems`] borrowed straight from the
//! map: bf16 stays bf16 until a kernel widens it. The one copy it ever makes
//! is for a tensor whose offset is not aligned to its element size, which
//! safetensors writers normally avoid.

use half::{bf16, f16};
use memmap2::Mmap;
use qvc_ir::{DType, Elems, Shape, WeightSource};
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
    #[error("tensor {name:?} has dtype {dtype} in {path}; qvc reads bf16, f16 and f32 weights")]
    UnsupportedDtype { name: String, dtype: String, path: PathBuf },
    #[error("tensor {name:?} is missing from the checkpoint{hint}")]
    Missing { name: String, hint: String },
    #[error("tensor {name:?} has shape {got} in the checkpoint, but the config implies {want}: the config.json does not belong to these weights")]
    WrongShape { name: String, got: Shape, want: Shape },
    #[error("no weights found in {dir}: expected model.safetensors, or model.safetensors.index.json with its shards")]
    NoWeights { dir: PathBuf },
}

struct Entry {
    file: usize,
    dtype: DType,
    shape: Shape,
    start: usize,
    end: usize,
}

/// Tensors of a checkpoint, by name, memory-mapped.
pub struct WeightStore {
    maps: Vec<Mmap>,
    paths: Vec<PathBuf>,
    entries: HashMap<String, Entry>,
    /// Tensors that were not aligned in the file, widened to f32.
    copies: HashMap<String, Vec<f32>>,
}

fn parse_dtype(d: safetensors::Dtype) -> Option<DType> {
    match d {
        safetensors::Dtype::BF16 => Some(DType::BF16),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::F32 => Some(DType::F32),
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
        let mut s = WeightStore { maps: vec![], paths: vec![], entries: HashMap::new(), copies: HashMap::new() };
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
                let dtype = parse_dtype(info.dtype).ok_or_else(|| WeightError::UnsupportedDtype {
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
                if !(map.as_ptr() as usize + entry.start).is_multiple_of(dtype.size()) {
                    let e = elems_of(&map[entry.start..entry.end], dtype).to_f32_vec();
                    s.copies.insert(name.clone(), e);
                }
                s.entries.insert(name, entry);
            }
            s.maps.push(map);
            s.paths.push(path.clone());
        }
        Ok(s)
    }

    /// A store that knows tensor names, dtypes and shapes but holds no data
    /// (`weight` answers `None`): enough to build graphs and plan them, as
    /// `qvc compile --synthetic --dry-run` does for the full-size model.
    pub fn shapes_only(tensors: impl IntoIterator<Item = (String, DType, Shape)>) -> Self {
        let mut s = WeightStore { maps: vec![], paths: vec![], entries: HashMap::new(), copies: HashMap::new() };
        for (name, dtype, shape) in tensors {
            let end = shape.numel() * dtype.size();
            // file index usize::MAX: no map backs it (see `weight`).
            s.entries.insert(name, Entry { file: usize::MAX, dtype, shape, start: 0, end });
        }
        s
    }

    /// Stored dtype and shape of `name`.
    pub fn info(&self, name: &str) -> Option<(DType, &Shape)> {
        self.entries.get(name).map(|e| (e.dtype, &e.shape))
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.entries.keys().map(|s| s.as_str()).collect();
        v.sort();
        v
    }

    /// Check that `name` exists with shape `want`; returns its stored dtype.
    pub fn expect(&self, name: &str, want: &[usize]) -> Result<DType, WeightError> {
        let e = self.entries.get(name).ok_or_else(|| {
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
        if e.shape.dims() != want {
            return Err(WeightError::WrongShape { name: name.into(), got: e.shape.clone(), want: Shape::new(want) });
        }
        Ok(e.dtype)
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
        DType::I32 => unreachable!("integer weights are rejected at open"),
    }
}

impl WeightSource for WeightStore {
    fn weight(&self, name: &str) -> Option<Elems<'_>> {
        if let Some(c) = self.copies.get(name) {
            return Some(Elems::F32(c));
        }
        let e = self.entries.get(name)?;
        let map = self.maps.get(e.file)?;
        Some(elems_of(&map[e.start..e.end], e.dtype))
    }
}
