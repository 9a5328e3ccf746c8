//! `qvc quantize`: a bf16, fp16 or f32 Qwen-VL checkpoint in, a GPTQ int4
//! checkpoint out, in the layout of the published Qwen-VL-Chat-Int4
//! (AutoGPTQ checkpoint format v1), by **round-to-nearest** per group. This is
//! not GPTQ's algorithm: GPTQ quantizes the columns one at a time and spreads
//! each column's rounding error over the columns not yet quantized, using
//! second-order statistics of calibration activations; round-to-nearest has no
//! calibration data and no error feedback, so it loses more accuracy.
//!
//! # What is written
//! Each decoder Linear `transformer.h.N.{attn.c_attn, attn.c_proj, mlp.w1,
//! mlp.w2, mlp.c_proj}` (and `lm_head` with [`QuantizeOptions::lm_head`]),
//! HF weight `[out, in]`, becomes
//! - `qweight` I32 `[in/8, out]`: input rows 8r..8r+7 in word r, row 8r+j at
//!   bits 4j..4j+3;
//! - `qzeros` I32 `[ceil(in/G), out/8]`: output columns packed the same way,
//!   stored value = zero − 1 (v1);
//! - `scales` F16 `[ceil(in/G), out]`;
//! - `g_idx` I32 `[in]` = i / G (no act-order);
//! - `bias` F16 `[out]`: the source bias, or zeros where the source Linear has
//!   none (AutoGPTQ's QuantLinear always had one when Qwen-VL-Chat-Int4 was
//!   made); `lm_head` gets one only if the source has one, as in GPTQModel.
//!
//! Every other tensor is stored as F16 (round to nearest even), as in the
//! published checkpoint. `config.json` gains `quantization_config` and
//! `torch_dtype: float16`; `quantize_config.json` holds what AutoGPTQ writes.
//!
//! # The rounding rule
//! Per group of G inputs of one output column, AutoGPTQ's
//! `Quantizer.find_params` (`auto_gptq/quantization/quantizer.py`, maxq = 15)
//! on the weights in f32:
//! - `xmin = min(0, min w)`, `xmax = max(0, max w)`;
//! - symmetric: `xmax = max(|xmin|, xmax)`, `xmin = −xmax`; zero = 8;
//! - asymmetric: zero = round(−xmin / scale);
//! - an all-zero group uses xmin = −1, xmax = 1;
//! - scale = (xmax − xmin) / 15, stored as f16 (round to nearest);
//! - q = clamp(round(w / scale) + zero, 0, 15), round half to even (torch.round).
//!
//! Three deliberate differences, each confined to cases where AutoGPTQ's
//! output would be worse or unrepresentable:
//! 1. symmetric, group without a negative weight: AutoGPTQ keeps xmin = 0, so
//!    the grid −8s..7s with s = xmax/15 stops at 7/15 of the largest weight; we
//!    use xmin = −xmax like every other group;
//! 2. asymmetric, zero rounds to 0 (the group's minimum is within half a step
//!    of 0): format v1 stores zero − 1 in 4 bits and cannot hold −1 (AutoGPTQ
//!    writes a corrupt word); we use zero = 1 and scale = xmax / 14, which still
//!    covers [xmin, xmax];
//! 3. q is rounded against the f16 scale the file stores (AutoGPTQ rounds
//!    against the f32 scale), so every q is the nearest point of the grid a
//!    loader dequantizes with. The two differ only for weights within about
//!    1e-3 of a step of a midpoint.
//!
//! A scale that rounds to 0 in f16 (a group of weights below ~4e-7) is stored
//! as the smallest f16 subnormal; a scale beyond f16's range is an error.
//!
//! # Streaming
//! One source shard at a time, one tensor at a time: the largest thing held is
//! one tensor's source bytes plus its output twice (packed by rows, then
//! transposed): about 1.9 GB for a 151936×4096 bf16 `lm_head` with
//! `--lm-head int4` (1.8 GB peak resident measured on a full-width slice). Each source shard becomes one output
//! shard, so the output has as many shards as the source, with
//! `model.safetensors.index.json` when there is more than one.
//!
//! The safetensors writer here is not `qvc_runtime::artifact::write_weights`:
//! that one aligns every tensor to 256 bytes with `__pad.N` tensors and tags
//! the file `format: qvc`, which suits artifacts, whereas a Hugging Face
//! checkpoint must carry `format: pt` and no tensors the model does not have.
//! Here tensors are laid out so that each is aligned to its element size
//! without padding (I32 groups first, all of whose sizes are multiples of 4).

use half::{bf16, f16};
use indicatif::ProgressBar;
use rayon::prelude::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The decoder Linears a GPTQ Qwen-VL checkpoint quantizes (Qwen-VL-Chat-Int4).
pub const DECODER_LINEARS: [&str; 5] = ["attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"];

/// Files larger than this that are not weights are not copied (a checkpoint's
/// tokenizer and configs are a few MB; anything this big is data, not config).
const COPY_LIMIT: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error("--bits {0} is not supported: qvc quantize writes 4-bit GPTQ checkpoints (--bits 4)")]
    Bits(u32),
    #[error(
        "--group-size {0} is not supported: use -1 (one group over all inputs of a Linear) or a positive multiple \
         of 8 (32, 64 and 128 are usual; 128 is what Qwen-VL-Chat-Int4 uses)"
    )]
    GroupSize(i64),
    #[error("{0} does not exist: give the directory of a bf16, fp16 or f32 Qwen-VL checkpoint")]
    MissingSrc(PathBuf),
    #[error("{0} is a file: give the checkpoint directory (config.json, qwen.tiktoken and the safetensors weights)")]
    SrcNotDir(PathBuf),
    #[error("{path} is not a Qwen-VL checkpoint: {detail}")]
    NotQwenVl { path: PathBuf, detail: String },
    #[error(
        "{path} is already quantized ({why}); qvc quantize takes a bf16, fp16 or f32 checkpoint such as \
         Qwen/Qwen-VL-Chat"
    )]
    AlreadyQuantized { path: PathBuf, why: String },
    #[error("no weights found in {0}: expected model.safetensors, or model.safetensors.index.json with its shards")]
    NoWeights(PathBuf),
    #[error("{path}: {detail}")]
    BadSource { path: PathBuf, detail: String },
    #[error("tensor {name:?} in {path} has dtype {dtype}; qvc quantize reads bf16, f16 and f32 weights")]
    Dtype { name: String, dtype: String, path: PathBuf },
    #[error("tensor {name:?}: {detail}")]
    Tensor { name: String, detail: String },
    #[error("{0} already exists and is not empty; pass --force to overwrite it or choose another -o")]
    DstExists(PathBuf),
    #[error("{0} is a file; -o needs a directory to write the checkpoint into")]
    DstIsFile(PathBuf),
    #[error("-o {dst} is the source checkpoint {src}; write the quantized copy to another directory")]
    DstIsSrc { src: PathBuf, dst: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

type Result<T> = std::result::Result<T, QuantizeError>;

/// What `qvc quantize` was asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantizeOptions {
    pub bits: u32,
    /// Inputs per group, or −1 for one group over all inputs of a Linear.
    pub group_size: i64,
    /// Symmetric (zero = 8) or asymmetric (per-group integer zero).
    pub sym: bool,
    /// Quantize `lm_head` too (recorded as `"lm_head": true`, as GPTQModel does).
    pub lm_head: bool,
    /// Write into a non-empty DST (its old weight files are removed first).
    pub force: bool,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions { bits: 4, group_size: 128, sym: true, lm_head: false, force: false }
    }
}

impl QuantizeOptions {
    /// Refuse unsupported settings before any file is touched.
    pub fn validate(&self) -> Result<()> {
        if self.bits != 4 {
            return Err(QuantizeError::Bits(self.bits));
        }
        if self.group_size != -1 && (self.group_size <= 0 || self.group_size % 8 != 0) {
            return Err(QuantizeError::GroupSize(self.group_size));
        }
        Ok(())
    }

    /// The group size for a Linear with `inputs` inputs.
    fn group(&self, inputs: usize) -> usize {
        if self.group_size == -1 {
            inputs
        } else {
            self.group_size as usize
        }
    }

    /// `quantization_config` in `config.json`, with the keys AutoGPTQ writes
    /// (plus GPTQModel's `lm_head` when it is quantized), in AutoGPTQ's order.
    pub fn quantization_config(&self) -> Vec<(&'static str, Value)> {
        let mut v = vec![
            ("bits", json!(self.bits)),
            ("group_size", json!(self.group_size)),
            ("damp_percent", json!(0.01)),
            ("desc_act", json!(false)),
            ("static_groups", json!(false)),
            ("sym", json!(self.sym)),
            ("true_sequential", json!(true)),
            ("model_name_or_path", Value::Null),
            ("model_file_base_name", json!("model")),
            ("quant_method", json!("gptq")),
            ("checkpoint_format", json!("gptq")),
        ];
        if self.lm_head {
            v.push(("lm_head", json!(true)));
        }
        v
    }
}

// ---------------------------------------------------------------------------
// Round-to-nearest quantization of one group.

/// A group's quantization grid: w ≈ scale · (q − zero), q in 0..=15.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupParams {
    /// The scale as stored (f16).
    pub scale: f16,
    /// The zero point, 1..=15 (stored as zero − 1).
    pub zero: u32,
}

/// AutoGPTQ's `find_params` for one group (see the module docs for the rule
/// and the three differences). `w` must be finite.
pub fn group_params(w: &[f32], sym: bool) -> std::result::Result<GroupParams, String> {
    let (mut xmin, mut xmax) = (0f32, 0f32);
    for &x in w {
        xmin = xmin.min(x);
        xmax = xmax.max(x);
    }
    if sym {
        xmax = xmax.max(-xmin);
        // AutoGPTQ only negates when xmin < 0 (difference 1).
        xmin = -xmax;
    }
    if xmin == 0.0 && xmax == 0.0 {
        xmin = -1.0;
        xmax = 1.0;
    }
    let mut scale = (xmax - xmin) / 15.0;
    let zero = if sym {
        8
    } else {
        let z = (-xmin / scale).round_ties_even() as u32;
        if z == 0 {
            // Difference 2: v1 cannot store zero 0. xmin > −scale/2 here, so
            // the grid −s..14s with s = xmax/14 covers [xmin, xmax].
            scale = xmax / 14.0;
            1
        } else {
            z
        }
    };
    let mut s = f16::from_f32(scale);
    if s.is_infinite() {
        return Err(format!(
            "a group of weights spans {xmin:e}..{xmax:e}, too wide for an f16 scale (at most 65504 × 15)"
        ));
    }
    if s == f16::ZERO {
        // The weights are all below f16's resolution for a scale: the smallest
        // subnormal keeps the grid finite and rounds them to 0.
        s = f16::from_bits(1);
    }
    Ok(GroupParams { scale: s, zero })
}

/// The 4-bit value of `w` on the grid of `p`: nearest point, ties to even.
#[inline]
pub fn quantize_value(w: f32, p: GroupParams) -> u32 {
    let q = (w / p.scale.to_f32()).round_ties_even() + p.zero as f32;
    q.clamp(0.0, 15.0) as u32
}

/// A quantized Linear in the v1 layout.
pub struct QuantizedLinear {
    /// `[in/8, out]`.
    pub qweight: Vec<u32>,
    /// `[groups, out/8]`, zero − 1 per nibble.
    pub qzeros: Vec<u32>,
    /// `[groups, out]`.
    pub scales: Vec<f16>,
    pub groups: usize,
}

/// Quantize the HF weight `[out, in]` (given as its raw little-endian bytes in
/// `dtype`) with groups of `g` inputs. `out` and `inputs` must be multiples of
/// 8. Rows are independent, so they run in parallel.
pub fn quantize_linear(
    raw: &[u8],
    dtype: SrcDtype,
    out: usize,
    inputs: usize,
    g: usize,
    sym: bool,
) -> std::result::Result<QuantizedLinear, String> {
    assert!(out.is_multiple_of(8) && inputs.is_multiple_of(8) && g > 0 && raw.len() == out * inputs * dtype.size());
    let groups = inputs.div_ceil(g);
    let words = inputs / 8;
    // Row-major [out, in/8] first (each row's words are contiguous), then
    // transposed to [in/8, out].
    let mut rowq = vec![0u32; out * words];
    let mut zeros = vec![0u8; out * groups];
    let mut scales_t = vec![f16::ZERO; out * groups];
    let row_bytes = inputs * dtype.size();
    rowq.par_chunks_mut(words)
        .zip(zeros.par_chunks_mut(groups))
        .zip(scales_t.par_chunks_mut(groups))
        .zip(raw.par_chunks(row_bytes))
        .enumerate()
        .try_for_each_init(
            || vec![0f32; inputs],
            |row, (o, (((qrow, zrow), srow), bytes))| {
                dtype.to_f32(bytes, row);
                if let Some(i) = row.iter().position(|x| !x.is_finite()) {
                    return Err(format!("weight [{o}, {i}] is {} (not finite)", row[i]));
                }
                qrow.fill(0);
                for k in 0..groups {
                    let span = k * g..((k + 1) * g).min(inputs);
                    let p = group_params(&row[span.clone()], sym)?;
                    zrow[k] = p.zero as u8;
                    srow[k] = p.scale;
                    for i in span {
                        qrow[i / 8] |= quantize_value(row[i], p) << (4 * (i % 8));
                    }
                }
                Ok(())
            },
        )?;
    let mut qweight = vec![0u32; words * out];
    qweight.par_chunks_mut(out).enumerate().for_each(|(r, dst)| {
        for (o, d) in dst.iter_mut().enumerate() {
            *d = rowq[o * words + r];
        }
    });
    drop(rowq);
    let mut qzeros = vec![0u32; groups * out / 8];
    let mut scales = vec![f16::ZERO; groups * out];
    for k in 0..groups {
        for o in 0..out {
            scales[k * out + o] = scales_t[o * groups + k];
            qzeros[k * out / 8 + o / 8] |= (zeros[o * groups + k] as u32 - 1) << (4 * (o % 8));
        }
    }
    Ok(QuantizedLinear { qweight, qzeros, scales, groups })
}

// ---------------------------------------------------------------------------
// Reading the source.

/// Element types a source checkpoint may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SrcDtype {
    BF16,
    F16,
    F32,
}

impl SrcDtype {
    pub fn size(self) -> usize {
        match self {
            SrcDtype::BF16 | SrcDtype::F16 => 2,
            SrcDtype::F32 => 4,
        }
    }
    /// Widen little-endian elements to f32 (exact for all three).
    pub fn to_f32(self, bytes: &[u8], out: &mut [f32]) {
        match self {
            SrcDtype::BF16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            SrcDtype::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            SrcDtype::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
struct SrcTensor {
    name: String,
    dtype: SrcDtype,
    shape: Vec<usize>,
    /// Absolute offset of the data in the file.
    start: u64,
    len: u64,
}

struct SrcShard {
    path: PathBuf,
    tensors: Vec<SrcTensor>,
}

fn is_quantized_name(name: &str) -> bool {
    [".qweight", ".qzeros", ".scales", ".g_idx"].iter().any(|s| name.ends_with(s))
}

/// Parse and check one safetensors header: offsets inside the file, sizes
/// matching dtype × shape.
fn read_shard(path: &Path) -> Result<SrcShard> {
    let rd = |source| QuantizeError::Read { path: path.into(), source };
    let bad = |detail: String| QuantizeError::BadSource { path: path.into(), detail };
    let mut f = File::open(path).map_err(rd)?;
    let file_len = f.metadata().map_err(rd)?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| bad("shorter than a safetensors header: truncated or not safetensors".into()))?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 || 8 + n > file_len {
        return Err(bad(format!("header length {n} does not fit the file ({file_len} bytes): not a safetensors file")));
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact(&mut h).map_err(rd)?;
    let h: BTreeMap<String, Value> = serde_json::from_slice(&h).map_err(|e| bad(format!("bad header JSON: {e}")))?;
    let base = 8 + n;
    let mut tensors = Vec::new();
    for (name, v) in h {
        if name == "__metadata__" {
            continue;
        }
        let dt = v.get("dtype").and_then(Value::as_str).unwrap_or("?");
        let shape: Option<Vec<usize>> = v
            .get("shape")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|x| x.as_u64()).map(|x| x as usize).collect());
        let offs: Option<Vec<u64>> =
            v.get("data_offsets").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_u64).collect());
        let (Some(shape), Some(offs)) = (shape, offs) else {
            return Err(bad(format!("tensor {name:?} has no valid shape or data_offsets")));
        };
        if offs.len() != 2 || offs[1] < offs[0] || base + offs[1] > file_len {
            return Err(bad(format!("tensor {name:?} lies outside the file: truncated or corrupt")));
        }
        let dtype = match dt {
            "BF16" => SrcDtype::BF16,
            "F16" => SrcDtype::F16,
            "F32" => SrcDtype::F32,
            _ if is_quantized_name(&name) || dt == "I32" => {
                return Err(QuantizeError::AlreadyQuantized {
                    path: path.into(),
                    why: format!("tensor {name:?} has dtype {dt}"),
                })
            }
            _ => return Err(QuantizeError::Dtype { name, dtype: dt.into(), path: path.into() }),
        };
        let want = shape.iter().product::<usize>() as u64 * dtype.size() as u64;
        if offs[1] - offs[0] != want {
            return Err(bad(format!(
                "tensor {name:?}: {} bytes for {dt} {shape:?} ({want} expected)",
                offs[1] - offs[0]
            )));
        }
        tensors.push(SrcTensor { name, dtype, shape, start: base + offs[0], len: want });
    }
    Ok(SrcShard { path: path.into(), tensors })
}

/// The source's weight files: the shards an index names (in name order), or
/// model.safetensors.
fn source_files(src: &Path) -> Result<Vec<PathBuf>> {
    let index = src.join("model.safetensors.index.json");
    if index.is_file() {
        let text =
            std::fs::read_to_string(&index).map_err(|source| QuantizeError::Read { path: index.clone(), source })?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| QuantizeError::BadSource { path: index.clone(), detail: format!("not valid JSON: {e}") })?;
        let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| QuantizeError::BadSource {
            path: index.clone(),
            detail: "no \"weight_map\" object".into(),
        })?;
        let files: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        if files.is_empty() {
            return Err(QuantizeError::BadSource { path: index, detail: "the weight_map names no shard".into() });
        }
        for f in &files {
            if f.contains('/') || f.contains("..") {
                return Err(QuantizeError::BadSource {
                    path: index,
                    detail: format!("shard {f:?} is not a file name"),
                });
            }
        }
        return Ok(files.into_iter().map(|f| src.join(f)).collect());
    }
    let single = src.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(QuantizeError::NoWeights(src.into()))
}

/// Read `len` bytes at `start` of `f`.
fn read_at(f: &mut File, path: &Path, start: u64, len: usize, out: &mut Vec<u8>) -> Result<()> {
    let rd = |source| QuantizeError::Read { path: path.into(), source };
    out.clear();
    out.resize(len, 0);
    f.seek(SeekFrom::Start(start)).map_err(rd)?;
    f.read_exact(out).map_err(rd)
}

// ---------------------------------------------------------------------------
// Writing safetensors.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OutDtype {
    I32,
    F16,
}

struct OutEntry {
    name: String,
    dtype: OutDtype,
    shape: Vec<usize>,
}

impl OutEntry {
    fn bytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * if self.dtype == OutDtype::I32 { 4 } else { 2 }
    }
}

/// A safetensors file written front to back: the header (offsets from the
/// known sizes) first, then each tensor's data in header order.
struct StWriter {
    path: PathBuf,
    w: BufWriter<File>,
    entries: Vec<(String, u64)>,
    next: usize,
    /// Bytes written of the current tensor.
    cur: u64,
    total: u64,
}

impl StWriter {
    fn create(path: &Path, entries: &[OutEntry]) -> Result<StWriter> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut pos = 0u64;
        for e in entries {
            let dt = match e.dtype {
                OutDtype::I32 => "I32",
                OutDtype::F16 => "F16",
            };
            let end = pos + e.bytes();
            header.insert(e.name.clone(), json!({"dtype": dt, "shape": e.shape, "data_offsets": [pos, end]}));
            pos = end;
        }
        let mut h = serde_json::to_vec(&Value::Object(header)).expect("a JSON map serialises");
        // Spaces (allowed by the format) so the data section starts 8-aligned.
        h.resize((8 + h.len()).next_multiple_of(8) - 8, b' ');
        let wr = |source| QuantizeError::Write { path: path.into(), source };
        let mut w = BufWriter::with_capacity(1 << 22, File::create(path).map_err(wr)?);
        w.write_all(&(h.len() as u64).to_le_bytes()).map_err(wr)?;
        w.write_all(&h).map_err(wr)?;
        Ok(StWriter {
            path: path.into(),
            w,
            entries: entries.iter().map(|e| (e.name.clone(), e.bytes())).collect(),
            next: 0,
            cur: 0,
            total: pos,
        })
    }

    /// Append bytes of tensor `name`, which must be the next in header order.
    fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let (want_name, want_len) = &self.entries[self.next];
        assert_eq!(want_name, name, "tensors must be written in header order");
        assert!(self.cur + bytes.len() as u64 <= *want_len, "tensor {name} overruns its header size");
        self.w.write_all(bytes).map_err(|source| QuantizeError::Write { path: self.path.clone(), source })?;
        self.cur += bytes.len() as u64;
        if self.cur == *want_len {
            self.next += 1;
            self.cur = 0;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<u64> {
        assert_eq!(self.next, self.entries.len(), "every tensor in the header must be written");
        self.w.flush().map_err(|source| QuantizeError::Write { path: self.path.clone(), source })?;
        Ok(self.total)
    }
}

// ---------------------------------------------------------------------------
// The whole command.

/// What [`quantize`] did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub dst: PathBuf,
    pub shards: Vec<String>,
    pub quantized: usize,
    pub kept_f16: usize,
    pub src_bytes: u64,
    pub dst_bytes: u64,
    pub copied: Vec<String>,
    pub skipped: Vec<String>,
    pub group_size: i64,
    pub sym: bool,
    pub lm_head: bool,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gb = |b: u64| b as f64 / 1e9;
        let group = if self.group_size == -1 {
            "one group per Linear".to_string()
        } else {
            format!("group {}", self.group_size)
        };
        writeln!(
            f,
            "wrote {}: {} Linears as GPTQ int4 ({group}, {}, round-to-nearest{}), {} tensors in f16",
            self.dst.display(),
            self.quantized,
            if self.sym { "symmetric" } else { "asymmetric" },
            if self.lm_head { ", lm_head included" } else { "" },
            self.kept_f16
        )?;
        writeln!(
            f,
            "weights: {:.3} GB -> {:.3} GB in {} file(s): {}",
            gb(self.src_bytes),
            gb(self.dst_bytes),
            self.shards.len(),
            self.shards.join(", ")
        )?;
        writeln!(f, "written: config.json, quantize_config.json; copied: {}", self.copied.join(", "))?;
        if !self.skipped.is_empty() {
            writeln!(f, "not copied: {}", self.skipped.join(", "))?;
        }
        Ok(())
    }
}

/// How one source tensor is written.
enum Plan {
    /// A Linear weight `[out, in]` → qweight, qzeros, g_idx, scales and, when
    /// the source has no bias, a zero bias.
    Quantize { prefix: String, out: usize, inputs: usize, zero_bias: bool },
    /// Stored as F16.
    Keep,
}

/// `prefix.weight` of a Linear this run quantizes.
fn quantized_prefix(name: &str, lm_head: bool) -> Option<&str> {
    let prefix = name.strip_suffix(".weight")?;
    if lm_head && prefix == "lm_head" {
        return Some(prefix);
    }
    let rest = prefix.strip_prefix("transformer.h.")?;
    let (layer, module) = rest.split_once('.')?;
    (layer.parse::<usize>().is_ok() && DECODER_LINEARS.contains(&module)).then_some(prefix)
}

fn is_weight_file(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".index.json"]
        .iter()
        .any(|s| n.ends_with(s))
}

/// Check DST and prepare it: created if absent; if it holds anything, only
/// with `force`, and then its old weight files are removed so no stale shard
/// survives.
fn prepare_dst(src: &Path, dst: &Path, force: bool) -> Result<()> {
    let wr = |source| QuantizeError::Write { path: dst.into(), source };
    if dst.is_file() {
        return Err(QuantizeError::DstIsFile(dst.into()));
    }
    if dst.is_dir() {
        let same = match (src.canonicalize(), dst.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same {
            return Err(QuantizeError::DstIsSrc { src: src.into(), dst: dst.into() });
        }
        let names: Vec<PathBuf> =
            std::fs::read_dir(dst).map_err(wr)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        if !names.is_empty() {
            if !force {
                return Err(QuantizeError::DstExists(dst.into()));
            }
            for p in names {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                if p.is_file() && is_weight_file(&name) {
                    std::fs::remove_file(&p).map_err(|source| QuantizeError::Write { path: p.clone(), source })?;
                }
            }
        }
        return Ok(());
    }
    std::fs::create_dir_all(dst).map_err(wr)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let wr = |source| QuantizeError::Write { path: path.into(), source };
    // A copied file may be read-only (fs::copy keeps permissions); replace it
    // rather than open it for writing.
    if path.exists() {
        std::fs::remove_file(path).map_err(wr)?;
    }
    std::fs::write(path, bytes).map_err(wr)
}

/// Quantize the checkpoint in `src` into `dst` (see the module docs).
/// `bar` shows progress in source bytes (pass `ProgressBar::hidden()` for none).
pub fn quantize(src: &Path, dst: &Path, opt: &QuantizeOptions, bar: &ProgressBar) -> Result<Report> {
    opt.validate()?;
    if !src.exists() {
        return Err(QuantizeError::MissingSrc(src.into()));
    }
    if !src.is_dir() {
        return Err(QuantizeError::SrcNotDir(src.into()));
    }
    let not_vl = |detail: String| QuantizeError::NotQwenVl { path: src.into(), detail };
    let cfg_path = src.join("config.json");
    if !cfg_path.is_file() {
        return Err(not_vl("it has no config.json".into()));
    }
    let cfg_text =
        std::fs::read_to_string(&cfg_path).map_err(|source| QuantizeError::Read { path: cfg_path.clone(), source })?;
    let mut cfg_json: Value = serde_json::from_str(&cfg_text).map_err(|e| not_vl(format!("config.json: {e}")))?;
    if cfg_json.get("quantization_config").is_some_and(|q| !q.is_null()) {
        return Err(QuantizeError::AlreadyQuantized {
            path: src.into(),
            why: "config.json has a quantization_config".into(),
        });
    }
    if src.join("quantize_config.json").is_file() {
        return Err(QuantizeError::AlreadyQuantized { path: src.into(), why: "it has a quantize_config.json".into() });
    }
    let cfg = qvc_model::config::Config::from_json(&cfg_json, &cfg_path).map_err(|e| not_vl(e.to_string()))?;

    // Read every header and check the tensors against the config before
    // anything is written.
    let shards = source_files(src)?.iter().map(|p| read_shard(p)).collect::<Result<Vec<_>>>()?;
    let mut by_name: BTreeMap<&str, &SrcTensor> = BTreeMap::new();
    for s in &shards {
        for t in &s.tensors {
            if by_name.insert(&t.name, t).is_some() {
                return Err(QuantizeError::BadSource {
                    path: s.path.clone(),
                    detail: format!("tensor {:?} appears in two shards", t.name),
                });
            }
        }
    }
    for (name, shape) in cfg.expected_tensors() {
        match by_name.get(name.as_str()) {
            None => return Err(not_vl(format!("tensor {name:?} is missing from its weights"))),
            Some(t) if t.shape != shape => {
                return Err(not_vl(format!(
                    "tensor {name:?} has shape {:?} but config.json implies {shape:?}: the config does not belong to \
                     these weights",
                    t.shape
                )))
            }
            Some(_) => {}
        }
    }

    prepare_dst(src, dst, opt.force)?;

    let n = shards.len();
    let out_names: Vec<String> = if n == 1 {
        vec!["model.safetensors".into()]
    } else {
        (1..=n).map(|i| format!("model-{i:05}-of-{n:05}.safetensors")).collect()
    };
    let total_src: u64 = shards.iter().flat_map(|s| &s.tensors).map(|t| t.len).sum();
    bar.set_length(total_src);
    let mut report = Report {
        dst: dst.into(),
        shards: out_names.clone(),
        src_bytes: total_src,
        group_size: opt.group_size,
        sym: opt.sym,
        lm_head: opt.lm_head,
        ..Report::default()
    };
    let mut weight_map = BTreeMap::new();
    let mut buf = Vec::new();
    for (shard, out_name) in shards.iter().zip(&out_names) {
        // Plan the shard: quantized groups first (all I32 sizes and the F16
        // scales/biases that follow them are multiples of 4 bytes, since out
        // is a multiple of 8), then the F16 tensors, each in name order.
        let mut plans = Vec::new();
        for t in &shard.tensors {
            let plan = match quantized_prefix(&t.name, opt.lm_head) {
                Some(prefix) => {
                    let [out, inputs] = t.shape[..] else {
                        return Err(QuantizeError::Tensor {
                            name: t.name.clone(),
                            detail: format!("a Linear weight must be 2-D, this one is {:?}", t.shape),
                        });
                    };
                    if out % 8 != 0 || inputs % 8 != 0 {
                        return Err(QuantizeError::Tensor {
                            name: t.name.clone(),
                            detail: format!(
                                "shape [{out}, {inputs}]: GPTQ packs 8 inputs per word and 8 zeros per word, so both \
                                 must be multiples of 8"
                            ),
                        });
                    }
                    // Decoder Linears always get a bias, as in Qwen-VL-Chat-Int4 (made when
                    // AutoGPTQ's QuantLinear always had one); lm_head follows GPTQModel,
                    // whose QuantLinear has a bias only where the source Linear has one.
                    let zero_bias = prefix != "lm_head" && !by_name.contains_key(format!("{prefix}.bias").as_str());
                    Plan::Quantize { prefix: prefix.into(), out, inputs, zero_bias }
                }
                None => Plan::Keep,
            };
            plans.push((t, plan));
        }
        plans.sort_by_key(|(t, p)| (matches!(p, Plan::Keep), t.name.clone()));
        let mut entries = Vec::new();
        for (t, p) in &plans {
            match p {
                Plan::Quantize { prefix, out, inputs, zero_bias } => {
                    let groups = inputs.div_ceil(opt.group(*inputs));
                    let e =
                        |s: &str, dtype, shape: Vec<usize>| OutEntry { name: format!("{prefix}.{s}"), dtype, shape };
                    entries.push(e("qweight", OutDtype::I32, vec![inputs / 8, *out]));
                    entries.push(e("qzeros", OutDtype::I32, vec![groups, out / 8]));
                    entries.push(e("g_idx", OutDtype::I32, vec![*inputs]));
                    entries.push(e("scales", OutDtype::F16, vec![groups, *out]));
                    if *zero_bias {
                        entries.push(e("bias", OutDtype::F16, vec![*out]));
                    }
                }
                Plan::Keep => {
                    entries.push(OutEntry { name: t.name.clone(), dtype: OutDtype::F16, shape: t.shape.clone() })
                }
            }
        }
        let out_path = dst.join(out_name);
        let mut w = StWriter::create(&out_path, &entries)?;
        let mut f =
            File::open(&shard.path).map_err(|source| QuantizeError::Read { path: shard.path.clone(), source })?;
        for (t, p) in &plans {
            bar.set_message(t.name.clone());
            match p {
                Plan::Quantize { prefix, out, inputs, zero_bias } => {
                    read_at(&mut f, &shard.path, t.start, t.len as usize, &mut buf)?;
                    let g = opt.group(*inputs);
                    let q = quantize_linear(&buf, t.dtype, *out, *inputs, g, opt.sym)
                        .map_err(|detail| QuantizeError::Tensor { name: t.name.clone(), detail })?;
                    let name = |s: &str| format!("{prefix}.{s}");
                    w.write(&name("qweight"), bytemuck::cast_slice(&q.qweight))?;
                    w.write(&name("qzeros"), bytemuck::cast_slice(&q.qzeros))?;
                    let g_idx: Vec<u32> = (0..*inputs).map(|i| (i / g) as u32).collect();
                    w.write(&name("g_idx"), bytemuck::cast_slice(&g_idx))?;
                    w.write(&name("scales"), bytemuck::cast_slice(&q.scales))?;
                    if *zero_bias {
                        w.write(&name("bias"), &vec![0u8; out * 2])?;
                    }
                    report.quantized += 1;
                }
                Plan::Keep => {
                    write_f16(&mut f, shard, t, &mut w, &mut buf)?;
                    report.kept_f16 += 1;
                }
            }
            bar.inc(t.len);
        }
        report.dst_bytes += w.finish()?;
        for e in &entries {
            weight_map.insert(e.name.clone(), out_name.clone());
        }
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": report.dst_bytes}, "weight_map": weight_map});
        let text = serde_json::to_string_pretty(&index).expect("JSON serialises") + "\n";
        write_file(&dst.join("model.safetensors.index.json"), text.as_bytes())?;
    }

    // config.json with quantization_config; quantize_config.json in
    // AutoGPTQ's key order (serde_json here sorts object keys).
    let qc = opt.quantization_config();
    let obj = cfg_json.as_object_mut().ok_or_else(|| not_vl("config.json is not a JSON object".into()))?;
    obj.insert(
        "quantization_config".into(),
        Value::Object(qc.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()),
    );
    obj.insert("torch_dtype".into(), json!("float16"));
    // Qwen's modeling code picks its compute dtype from these flags; the
    // published Int4 checkpoint runs in fp16.
    for (k, v) in [("bf16", false), ("fp16", true), ("fp32", false)] {
        if obj.contains_key(k) {
            obj.insert(k.into(), json!(v));
        }
    }
    let text = serde_json::to_string_pretty(&cfg_json).expect("JSON serialises") + "\n";
    write_file(&dst.join("config.json"), text.as_bytes())?;
    let fields: Vec<String> = qc.iter().map(|(k, v)| format!("  {}: {}", json!(k), v)).collect();
    write_file(&dst.join("quantize_config.json"), format!("{{\n{}\n}}\n", fields.join(",\n")).as_bytes())?;

    // Tokenizer, generation config, modeling code and other small files.
    let mut others: Vec<PathBuf> = std::fs::read_dir(src)
        .map_err(|source| QuantizeError::Read { path: src.into(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    others.sort();
    for p in others {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with('.') || name == "config.json" || is_weight_file(&name) {
            continue;
        }
        let size = p.metadata().map_err(|source| QuantizeError::Read { path: p.clone(), source })?.len();
        if size > COPY_LIMIT {
            report.skipped.push(format!("{name} ({:.0} MB, not a config file)", size as f64 / 1e6));
            continue;
        }
        let bytes = std::fs::read(&p).map_err(|source| QuantizeError::Read { path: p.clone(), source })?;
        write_file(&dst.join(&name), &bytes)?;
        report.copied.push(name);
    }
    Ok(report)
}

/// Write tensor `t` as F16, converting in chunks so that only the output of
/// one tensor (never a second full-size copy) is held.
fn write_f16(f: &mut File, shard: &SrcShard, t: &SrcTensor, w: &mut StWriter, buf: &mut Vec<u8>) -> Result<()> {
    const CHUNK: usize = 1 << 24;
    let elems = t.len as usize / t.dtype.size();
    let mut done = 0usize;
    let mut wide = Vec::new();
    let mut out = Vec::new();
    while done < elems {
        let k = CHUNK.min(elems - done);
        read_at(f, &shard.path, t.start + (done * t.dtype.size()) as u64, k * t.dtype.size(), buf)?;
        if t.dtype == SrcDtype::F16 {
            w.write(&t.name, buf)?;
        } else {
            wide.resize(k, 0f32);
            t.dtype.to_f32(buf, &mut wide);
            out.clear();
            out.reserve(k * 2);
            for (i, &x) in wide.iter().enumerate() {
                let h = f16::from_f32(x);
                if h.is_infinite() && x.is_finite() {
                    return Err(QuantizeError::Tensor {
                        name: t.name.clone(),
                        detail: format!("element {} is {x:e}, beyond f16's range (±65504)", done + i),
                    });
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
            w.write(&t.name, &out)?;
        }
        done += k;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deq(w: f32, p: GroupParams) -> f32 {
        p.scale.to_f32() * (quantize_value(w, p) as f32 - p.zero as f32)
    }

    #[test]
    fn symmetric_grid_is_autogptq_find_params() {
        // max |w| = 1.5 → scale = 3/15 = 0.2, zero 8.
        let w = [-1.5f32, 0.3, 0.29, 1.0];
        let p = group_params(&w, true).unwrap();
        assert_eq!(p, GroupParams { scale: f16::from_f32(0.2), zero: 8 });
        // −1.5/0.2 = −7.5 rounds to even (−8) → q 0; 1.5 would clamp at 15.
        assert_eq!(quantize_value(-1.5, p), 0);
        assert_eq!(quantize_value(1.5, p), 15);
        assert_eq!(quantize_value(0.0, p), 8);
        // 0.3 / 0.2 = 1.5 (in f16 scale, slightly off) → one of the two neighbours.
        assert!([9, 10].contains(&quantize_value(0.3, p)));
    }

    #[test]
    fn symmetric_group_without_negatives_covers_its_maximum() {
        // AutoGPTQ would use scale 1/15 and clamp 1.0 to 7/15 (difference 1).
        let p = group_params(&[0.0, 0.5, 1.0], true).unwrap();
        assert_eq!(p.zero, 8);
        assert!((deq(1.0, p) - 1.0).abs() <= p.scale.to_f32() * 0.51);
    }

    #[test]
    fn all_zero_group_uses_unit_range() {
        let p = group_params(&[0.0; 16], false).unwrap();
        assert_eq!(p.scale, f16::from_f32(2.0 / 15.0));
        // In f32, 1 / (2/15) is 7.4999996, so zero 7 (as torch computes it).
        assert_eq!(p.zero, 7);
        assert_eq!(deq(0.0, p), 0.0);
        let p = group_params(&[0.0; 16], true).unwrap();
        assert_eq!((p.zero, deq(0.0, p)), (8, 0.0));
    }

    #[test]
    fn asymmetric_zero_is_never_zero() {
        // min −0.01, max 1.5: −xmin/scale = 0.1 → 0, not storable in v1.
        let w = [-0.01f32, 0.7, 1.5];
        let p = group_params(&w, false).unwrap();
        assert_eq!(p.zero, 1);
        for x in w {
            assert!((deq(x, p) - x).abs() <= p.scale.to_f32() * 0.5 * (1.0 + 1e-3), "{x}");
        }
        // A regular asymmetric group: min −1, max 2 → scale 0.2, zero 5.
        let p = group_params(&[-1.0, 2.0], false).unwrap();
        assert_eq!((p.scale, p.zero), (f16::from_f32(0.2), 5));
    }

    #[test]
    fn tiny_and_huge_scales() {
        let p = group_params(&[1e-9, -1e-9], true).unwrap();
        assert_eq!(p.scale, f16::from_bits(1));
        assert_eq!(deq(1e-9, p), 0.0);
        assert!(group_params(&[1e6], true).is_err());
    }

    #[test]
    fn packing_matches_the_v1_layout() {
        // 16 outputs × 24 inputs, group 16 (ragged last group of 8).
        let (out, inputs, g) = (16, 24, 16);
        let w: Vec<f32> = (0..out * inputs).map(|k| ((k * 37 % 101) as f32 - 50.0) / 40.0).collect();
        let raw: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        let q = quantize_linear(&raw, SrcDtype::F32, out, inputs, g, false).unwrap();
        assert_eq!((q.groups, q.qweight.len(), q.qzeros.len(), q.scales.len()), (2, 3 * 16, 2 * 2, 2 * 16));
        for o in 0..out {
            for i in 0..inputs {
                let k = i / g;
                let span = k * g..((k + 1) * g).min(inputs);
                let p = group_params(&w[o * inputs..][span], false).unwrap();
                let qv = (q.qweight[(i / 8) * out + o] >> (4 * (i % 8))) & 15;
                let z = ((q.qzeros[k * out / 8 + o / 8] >> (4 * (o % 8))) & 15) + 1;
                assert_eq!((qv, z, q.scales[k * out + o]), (quantize_value(w[o * inputs + i], p), p.zero, p.scale));
            }
        }
    }

    #[test]
    fn non_finite_weights_are_named() {
        let mut raw = vec![0u8; 8 * 8 * 4];
        raw[4 * 13..4 * 14].copy_from_slice(&f32::NAN.to_le_bytes());
        let e = quantize_linear(&raw, SrcDtype::F32, 8, 8, 8, true).err().unwrap();
        assert!(e.contains("[1, 5]") && e.contains("NaN"), "{e}");
    }

    #[test]
    fn options_are_checked() {
        let o = |bits, group_size| QuantizeOptions { bits, group_size, ..QuantizeOptions::default() };
        assert!(matches!(o(8, 128).validate(), Err(QuantizeError::Bits(8))));
        for g in [0, -2, 12, 100] {
            assert!(matches!(o(4, g).validate(), Err(QuantizeError::GroupSize(_))), "{g}");
        }
        for g in [-1, 8, 32, 64, 128, 1024] {
            assert!(o(4, g).validate().is_ok(), "{g}");
        }
        assert_eq!(quantized_prefix("transformer.h.3.mlp.w2.weight", false), Some("transformer.h.3.mlp.w2"));
        assert_eq!(quantized_prefix("transformer.h.3.attn.c_attn.bias", false), None);
        assert_eq!(quantized_prefix("transformer.visual.transformer.resblocks.0.mlp.c_proj.weight", false), None);
        assert_eq!(quantized_prefix("lm_head.weight", false), None);
        assert_eq!(quantized_prefix("lm_head.weight", true), Some("lm_head"));
    }
}
