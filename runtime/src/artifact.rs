//! The compiled artifact: the directory `qvc compile` writes and the runtime
//! opens.
//!
//! ```text
//! OUT.qvc/
//!   manifest.json          format version, source fingerprint, options,
//!                          programs (IR after the pipeline, memory plan,
//!                          kernel launches), weights checksum, file list
//!   weights.safetensors    every tensor the programs read, 256-byte aligned
//!                          (an int4 weight as its parts, see below)
//!   kernels.ptx            GPU targets: every kernel the programs launch
//!   kernels.sm_XX.cubin    GPU targets, when ptxas was found
//!   config.json, generation_config.json, qwen.tiktoken   copied from the source
//! ```
//!
//! Invariants this module keeps:
//! * every tensor's data in `weights.safetensors` starts at a file offset that
//!   is a multiple of [`ALIGN`] (the header is padded with spaces, and U8
//!   filler tensors `__pad.{k}` cover the gaps, since safetensors requires the
//!   data section to be contiguous and fully covered);
//! * the manifest records the weights file's size and FNV-1a 64 checksum,
//!   computed over the bytes as they were written;
//! * [`Artifact::open`] refuses an artifact whose format version differs from
//!   [`FORMAT_VERSION`], whose listed files are missing, whose weights file
//!   has the wrong size or a corrupt header, or whose programs read a tensor
//!   the weights file lacks; [`Artifact::open_verified`] also re-reads the
//!   whole weights file and checks the checksum. Every error names the file,
//!   what is wrong, and what to do.
//!
//! An int4 Param `X.weight` ([`DType::Q4`]) is stored as the tensors of a
//! GPTQ v1 Linear with act-order already resolved ([`q4_parts`]):
//! `X.qweight` (I32, rows sorted by group; written as `X.q4_tiled`, the same
//! words in [`Q4Words::Tiled`] order, when the groups are whole words, so
//! the CPU kernels stream them from the map), `X.qzeros` (I32), `X.scales`
//! (F16), `X.g_idx` (I32, `r / G`) and, for an act-order weight, `X.q4_perm`
//! (I32: stored row `r` holds input `perm[r]`). [`WeightStore`] serves them
//! as the virtual `X.weight` again, mapped as they are (no re-sort at open).
//!
//! Programs are compiled per shape bucket (prefill token counts and decode
//! past lengths, powers of two up to `max_seq`); running a prompt shorter
//! than its bucket needs padding and masking, which is the executor's job
//! (not written yet): today the buckets are recorded, not yet used.

use crate::gptq;
use crate::weights::{WeightError, WeightStore};
use qvc_ir::{DType, Graph, Op, Q4Ref, Q4Words, Shape, Q4_TILE};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Bumped whenever the layout of the manifest or the weights file changes.
/// 2: one prefill program per token bucket takes any number of pictures (its
/// `image_rows` is a capacity, the unused rows `qvc_ir::NO_ROW`); version 1
/// had one program per picture count and an option `max_images`.
pub const FORMAT_VERSION: u32 = 2;
/// Alignment of every tensor's data in the weights file, in bytes.
pub const ALIGN: usize = 256;
pub const MANIFEST: &str = "manifest.json";
pub const WEIGHTS: &str = "weights.safetensors";
pub const PTX: &str = "kernels.ptx";

/// FNV-1a, 64 bit, fed incrementally (stable across Rust releases, unlike std's hasher).
#[derive(Clone, Copy, Debug)]
pub struct Fnv64(pub u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    pub fn update(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }
    /// The hash as 16 hex digits (JSON numbers above 2^53 are not portable).
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
    pub fn of(bytes: &[u8]) -> String {
        let mut h = Fnv64::default();
        h.update(bytes);
        h.hex()
    }
}

/// Where the artifact came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// The checkpoint path as given to `qvc compile` (or `synthetic:NAME`).
    pub path: String,
    /// FNV-1a 64 of `config.json`'s bytes.
    pub config_fnv64: String,
    /// FNV-1a 64 over each weight file's safetensors header and size. Not a
    /// hash of the data: hashing 19 GB would dominate compile time, and the
    /// header (names, dtypes, shapes, offsets) plus the size already changes
    /// with any re-export; a bit flip inside the data is not detected.
    pub checkpoint_fingerprint: String,
    pub checkpoint_bytes: u64,
}

/// The options the artifact was compiled with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Options {
    /// `cpu`, `sm_80` or `sm_90`.
    pub target: String,
    /// Stored dtype of the model's weights: `bf16`, `f16` or `f32`.
    pub dtype: String,
    pub image_size: usize,
    /// `global` or `window:W[,global-every:N]`.
    pub vit_attention: String,
    pub max_seq: usize,
    pub max_batch: usize,
}

/// A named input or output of a program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSig {
    pub name: String,
    pub dtype: DType,
    pub shape: Shape,
}

/// What the pipeline did to a program.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramStats {
    pub nodes_before: usize,
    pub nodes_after: usize,
    /// Nodes of the fused kinds (`Op::is_fused`).
    pub fused: usize,
    /// Other compute nodes (not leaves, not reshapes).
    pub unfused: usize,
    /// `(pass, rewrites, nodes after)` in pipeline order.
    pub passes: Vec<(String, usize, usize)>,
}

/// One value's place in the activation arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRec {
    pub offset: u64,
    pub bytes: u64,
}

/// The memory plan of a program (from `qvc_ir::plan`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRec {
    /// Most bytes live at once.
    pub peak_bytes: u64,
    /// Every value in its own buffer.
    pub naive_bytes: u64,
    /// The arena the plan needs.
    pub arena_bytes: u64,
    /// Values written over an input's buffer.
    pub in_place: usize,
    /// Per node: arena slot, or `None` for leaves and views.
    pub slots: Vec<Option<SlotRec>>,
}

/// `cpu-fallback`: the node has no GPU kernel yet and runs on the host.
pub const CPU_FALLBACK: &str = "cpu-fallback";

/// One kernel launch of a program (GPU targets).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    /// The node it computes.
    pub node: u32,
    /// The node's op, as `Op::name` prints it.
    pub op: String,
    /// The kernel family, or [`CPU_FALLBACK`].
    pub family: String,
    /// The PTX entry name (empty for a fallback).
    pub kernel: String,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    /// Why the node falls back, when it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

fn one() -> usize {
    1
}

/// One compiled program.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Program {
    /// `vision`, `prefill` or `decode`.
    pub kind: String,
    /// New tokens (prefill bucket; 1 at decode; 0 for vision).
    pub tokens: usize,
    /// Cached tokens (decode bucket).
    pub past: usize,
    /// Image feature rows the program takes (prefill: the most its `tokens`
    /// can hold; a prompt with fewer passes `qvc_ir::NO_ROW` for the rest).
    pub image_rows: usize,
    /// Sequences decoded together (decode programs; 1 otherwise).
    #[serde(default = "one")]
    pub batch: usize,
    pub inputs: Vec<TensorSig>,
    pub outputs: Vec<TensorSig>,
    pub stats: ProgramStats,
    /// Absent when the artifact was compiled without a memory planner.
    pub memory: Option<MemoryRec>,
    /// GPU targets only; empty for `cpu`.
    pub launches: Vec<Launch>,
    /// The IR after the pipeline. Params name tensors of the weights file.
    pub graph: Graph,
}

/// The weights file as written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightsRec {
    pub file: String,
    pub bytes: u64,
    pub fnv64: String,
    pub tensors: usize,
}

/// A file of the artifact besides the manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRec {
    pub name: String,
    pub bytes: u64,
}

/// `manifest.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub qvc_version: String,
    pub source: Source,
    pub options: Options,
    /// Bytes of the KV cache at `max_seq` tokens × `max_batch` sequences
    /// (f32 on the CPU, bf16 on GPUs), allocated once by the runtime.
    pub kv_cache_bytes: u64,
    /// Kernels in `kernels.ptx` (GPU targets).
    pub kernels: Vec<String>,
    pub programs: BTreeMap<String, Program>,
    pub weights: WeightsRec,
    pub files: Vec<FileRec>,
}

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{dir} is not a qvc artifact: {detail}; make one with `qvc compile CHECKPOINT -o {dir}`")]
    NotArtifact { dir: PathBuf, detail: String },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid qvc manifest ({detail}); the artifact is damaged: compile it again")]
    Manifest { path: PathBuf, detail: String },
    #[error("{path} has format version {found}, this qvc reads version {expected}: recompile with this qvc (`qvc compile CHECKPOINT -o DIR --force`)")]
    Version { path: PathBuf, found: u64, expected: u32 },
    #[error("{path} is listed in the manifest but missing: the artifact is incomplete; compile it again")]
    MissingFile { path: PathBuf },
    #[error("{path} is {found} bytes, the manifest says {expected}: it is truncated or was replaced; compile the artifact again")]
    Size { path: PathBuf, found: u64, expected: u64 },
    #[error("{path} has checksum fnv64 {found}, the manifest says {expected}: the file is corrupt; compile the artifact again")]
    Checksum { path: PathBuf, found: String, expected: String },
    #[error("{path}: tensor {name:?} starts at byte {offset}, not a multiple of {ALIGN}; the file was not written by qvc compile")]
    Misaligned { path: PathBuf, name: String, offset: u64 },
    #[error(
        "{path}: program {program:?} reads tensor {name:?} {detail}; the artifact is inconsistent: compile it again"
    )]
    BadParam { path: PathBuf, program: String, name: String, detail: String },
    #[error(transparent)]
    Weights(#[from] WeightError),
}

/// A tensor to write: name, stored dtype, shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorEntry {
    /// Bytes of the stored data. An int4 weight's real bytes depend on its
    /// groups: it is written as its [`q4_parts`], which have plain dtypes.
    pub fn bytes(&self) -> usize {
        self.shape.numel() * self.dtype.size()
    }
}

/// Whether `q` is written in tiled order: a whole matrix (not a row range)
/// whose groups are whole words. Tiled words are mapped as they are at open,
/// in the order the CPU's decode GEMV streams; anything else is written as
/// the stored `qweight` and tiled at open.
fn tiles_whole(q: &Q4Ref) -> bool {
    q.row0 == 0 && q.rows == q.ld && q.can_tile()
}

/// One of the tensors an int4 weight is written as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Q4Part {
    QWeight,
    /// The qweight in tiled order (`X.q4_tiled`), instead of `QWeight`.
    Tiled,
    QZeros,
    Scales,
    GIdx,
    Perm,
}

impl Q4Part {
    /// The suffix after the Linear's prefix (`X.qweight`, …).
    pub fn suffix(self) -> &'static str {
        match self {
            Q4Part::QWeight => gptq::QWEIGHT,
            Q4Part::Tiled => gptq::TILED,
            Q4Part::QZeros => gptq::QZEROS,
            Q4Part::Scales => gptq::SCALES,
            Q4Part::GIdx => gptq::G_IDX,
            Q4Part::Perm => gptq::PERM,
        }
    }
}

/// The tensors the int4 weight `q` of the Linear `prefix` (its Param is
/// `{prefix}.weight`) is written as: the GPTQ v1 parts with the rows in
/// `q`'s stored order (sorted by group), so `g_idx` is `r / G`, plus
/// `q4_perm` when `q` has act-order. Their bytes come from [`q4_part_bytes`].
pub fn q4_parts(prefix: &str, q: &Q4Ref) -> Vec<(Q4Part, TensorEntry)> {
    let (out, inp, groups) = (q.rows, q.cols, q.groups());
    let words = if tiles_whole(q) {
        (Q4Part::Tiled, DType::I32, vec![inp / 8, out.next_multiple_of(Q4_TILE)])
    } else {
        (Q4Part::QWeight, DType::I32, vec![inp / 8, out])
    };
    let mut v = vec![
        words,
        (Q4Part::QZeros, DType::I32, vec![groups, out / 8]),
        (Q4Part::Scales, DType::F16, vec![groups, out]),
        (Q4Part::GIdx, DType::I32, vec![inp]),
    ];
    if q.perm.is_some() {
        v.push((Q4Part::Perm, DType::I32, vec![inp]));
    }
    v.into_iter()
        .map(|(p, dtype, shape)| {
            (p, TensorEntry { name: format!("{prefix}{}", p.suffix()), dtype, shape: Shape::new(shape) })
        })
        .collect()
}

/// Append part `part` of the int4 weight `q` to `buf`, little-endian, in
/// the shape [`q4_parts`] gives it. A row-range view is written as a matrix
/// of its own (its output columns gathered, its zeros repacked).
pub fn q4_part_bytes(q: &Q4Ref, part: Q4Part, buf: &mut Vec<u8>) {
    let (o0, out, inp) = (q.row0, q.rows, q.cols);
    match part {
        Q4Part::Tiled => {
            assert!(tiles_whole(q), "q4_part_bytes: only a whole matrix with groups of whole words is written tiled");
            match q.words {
                Q4Words::Tiled => buf.extend_from_slice(bytemuck::cast_slice(&q.qweight[..q.qweight_len()])),
                Q4Words::Gptq => {
                    let t = qvc_kernels::q4::tile_words(q).expect("tiles_whole checked the groups");
                    buf.extend_from_slice(bytemuck::cast_slice(&t));
                }
            }
        }
        Q4Part::QWeight => {
            // In stored order, whatever order the words are in memory.
            let mut row = vec![0u32; out];
            for r8 in 0..inp / 8 {
                q.words_into(r8, o0, &mut row);
                buf.extend_from_slice(bytemuck::cast_slice(&row));
            }
        }
        Q4Part::QZeros => {
            for g in 0..q.groups() {
                for c in 0..out / 8 {
                    // v1 stores zero − 1; `zero` already added the 1.
                    let word = (0..8).fold(0u32, |w, j| w | ((q.zero(g, o0 + 8 * c + j) - 1) & 15) << (4 * j));
                    buf.extend(word.to_le_bytes());
                }
            }
        }
        Q4Part::Scales => {
            for g in 0..q.groups() {
                buf.extend_from_slice(bytemuck::cast_slice(&q.scales[g * q.ld + o0..g * q.ld + o0 + out]));
            }
        }
        Q4Part::GIdx => (0..inp).for_each(|r| buf.extend(((r / q.group) as i32).to_le_bytes())),
        Q4Part::Perm => {
            if let Some(p) = q.perm {
                buf.extend_from_slice(bytemuck::cast_slice(p));
            }
        }
    }
}

fn st_dtype(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::I32 => "I32",
        DType::Q4 => unreachable!("write_weights refuses Q4 entries before naming their dtype"),
    }
}

/// Write `tensors` as a safetensors file at `path` with every tensor's data
/// 256-byte aligned in the file. `data(i, out)` appends tensor `i`'s bytes
/// (exactly [`TensorEntry::bytes`]) to `out`; tensors are streamed one at a
/// time, so a 19 GB checkpoint never sits in memory. Returns the record the
/// manifest keeps (size and checksum of what was written).
pub fn write_weights<E: From<std::io::Error>>(
    path: &Path,
    tensors: &[TensorEntry],
    mut data: impl FnMut(usize, &mut Vec<u8>) -> Result<(), E>,
) -> Result<WeightsRec, E> {
    // Layout: each tensor at the next multiple of ALIGN of the data section,
    // gaps covered by U8 `__pad.{k}` tensors.
    let mut header = serde_json::Map::new();
    let mut pos = 0usize;
    let mut pads = 0usize;
    let mut starts = Vec::with_capacity(tensors.len());
    if let Some(t) = tensors.iter().find(|t| t.dtype == DType::Q4) {
        return Err(std::io::Error::other(format!(
            "tensor {:?} is int4: write it as its parts (artifact::q4_parts), not as one tensor",
            t.name
        ))
        .into());
    }
    for t in tensors {
        let start = pos.next_multiple_of(ALIGN);
        if start > pos {
            header.insert(
                format!("__pad.{pads}"),
                serde_json::json!({"dtype": "U8", "shape": [start - pos], "data_offsets": [pos, start]}),
            );
            pads += 1;
        }
        let end = start + t.bytes();
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": st_dtype(t.dtype), "shape": t.shape.0, "data_offsets": [start, end]}),
        );
        starts.push(start);
        pos = end;
    }
    header.insert("__metadata__".into(), serde_json::json!({"format": "qvc", "align": ALIGN.to_string()}));
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).map_err(std::io::Error::other)?;
    // Pad the header with spaces (allowed by the format) so the data section
    // itself starts on an ALIGN boundary.
    let total = (8 + h.len()).next_multiple_of(ALIGN);
    h.resize(total - 8, b' ');
    let file = std::fs::File::create(path)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 22, file);
    let mut sum = Fnv64::default();
    let mut written = 0u64;
    let mut put = |w: &mut std::io::BufWriter<std::fs::File>, b: &[u8]| -> std::io::Result<()> {
        sum.update(b);
        written += b.len() as u64;
        w.write_all(b)
    };
    put(&mut w, &(h.len() as u64).to_le_bytes())?;
    put(&mut w, &h)?;
    let mut pos = 0usize;
    let mut buf = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        put(&mut w, &vec![0u8; starts[i] - pos])?;
        buf.clear();
        data(i, &mut buf)?;
        if buf.len() != t.bytes() {
            return Err(std::io::Error::other(format!(
                "tensor {:?}: {} bytes supplied for {} {}",
                t.name,
                buf.len(),
                t.dtype,
                t.shape
            ))
            .into());
        }
        put(&mut w, &buf)?;
        pos = starts[i] + t.bytes();
    }
    w.flush()?;
    let name = path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    Ok(WeightsRec { file: name, bytes: written, fnv64: sum.hex(), tensors: tensors.len() })
}

/// The checkpoint fingerprint kept in [`Source`]: FNV-1a 64 over each
/// file's size and safetensors header (see [`Source::checkpoint_fingerprint`]),
/// and the total size.
pub fn checkpoint_fingerprint(files: &[PathBuf]) -> Result<(String, u64), ArtifactError> {
    let mut h = Fnv64::default();
    let mut total = 0u64;
    for p in files {
        let io = |source| ArtifactError::Io { path: p.clone(), source };
        let mut f = std::fs::File::open(p).map_err(io)?;
        let size = f.metadata().map_err(io)?.len();
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(io)?;
        let n = u64::from_le_bytes(len);
        if n > size.saturating_sub(8) || n > 100 << 20 {
            return Err(WeightError::Corrupt { path: p.clone(), detail: format!("header length {n}") }.into());
        }
        let mut head = vec![0u8; n as usize];
        f.read_exact(&mut head).map_err(io)?;
        h.update(&size.to_le_bytes());
        h.update(&len);
        h.update(&head);
        total += size;
    }
    Ok((h.hex(), total))
}

/// FNV-1a 64 of a whole file, read in 4 MiB chunks.
pub fn file_fnv64(path: &Path) -> Result<String, ArtifactError> {
    let io = |source| ArtifactError::Io { path: path.into(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Fnv64::default();
    let mut buf = vec![0u8; 1 << 22];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            return Ok(h.hex());
        }
        h.update(&buf[..n]);
    }
}

/// An opened artifact: its manifest (with the programs' graphs) and the
/// memory-mapped weights.
pub struct Artifact {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub weights: WeightStore,
}

impl Artifact {
    /// Opens `dir`, checking everything but the weights checksum (see the
    /// module invariants). Cheap: reads the manifest and the weights header.
    pub fn open(dir: &Path) -> Result<Artifact, ArtifactError> {
        Self::open_with(dir, false)
    }

    /// [`open`](Self::open), then reads the whole weights file and checks its checksum.
    pub fn open_verified(dir: &Path) -> Result<Artifact, ArtifactError> {
        Self::open_with(dir, true)
    }

    /// The graph of program `name`.
    pub fn graph(&self, name: &str) -> Option<&Graph> {
        self.manifest.programs.get(name).map(|p| &p.graph)
    }

    fn open_with(dir: &Path, verify: bool) -> Result<Artifact, ArtifactError> {
        if !dir.is_dir() {
            let detail = if dir.exists() { "not a directory" } else { "no such directory" };
            return Err(ArtifactError::NotArtifact { dir: dir.into(), detail: detail.into() });
        }
        let mpath = dir.join(MANIFEST);
        if !mpath.is_file() {
            return Err(ArtifactError::NotArtifact { dir: dir.into(), detail: format!("it has no {MANIFEST}") });
        }
        let manifest = read_manifest(&mpath)?;
        for f in &manifest.files {
            let p = dir.join(&f.name);
            let meta = std::fs::metadata(&p).map_err(|_| ArtifactError::MissingFile { path: p.clone() })?;
            if meta.len() != f.bytes {
                return Err(ArtifactError::Size { path: p, found: meta.len(), expected: f.bytes });
            }
        }
        let wpath = dir.join(&manifest.weights.file);
        let size = std::fs::metadata(&wpath).map_err(|_| ArtifactError::MissingFile { path: wpath.clone() })?.len();
        if size != manifest.weights.bytes {
            return Err(ArtifactError::Size { path: wpath, found: size, expected: manifest.weights.bytes });
        }
        if verify {
            let found = file_fnv64(&wpath)?;
            if found != manifest.weights.fnv64 {
                return Err(ArtifactError::Checksum { path: wpath, found, expected: manifest.weights.fnv64.clone() });
            }
        }
        check_alignment(&wpath)?;
        let weights = WeightStore::open_files(std::slice::from_ref(&wpath))?;
        for (pname, p) in &manifest.programs {
            for n in &p.graph.nodes {
                if let Op::Param(name) = &n.op {
                    let bad = |detail: String| ArtifactError::BadParam {
                        path: wpath.clone(),
                        program: pname.clone(),
                        name: name.clone(),
                        detail,
                    };
                    match weights.info(name) {
                        None => return Err(bad("that it does not hold".into())),
                        Some((d, s)) if d != n.ty.dtype || s != n.ty.shape => {
                            return Err(bad(format!("as {}{}, but it holds {d}{s}", n.ty.dtype, n.ty.shape)))
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(Artifact { dir: dir.into(), manifest, weights })
    }
}

/// Whether `dir` looks like an artifact (has a manifest), for commands that
/// accept either a checkpoint or an artifact.
pub fn is_artifact(dir: &Path) -> bool {
    dir.join(MANIFEST).is_file()
}

/// Reads and parses a manifest, checking the format version before the
/// schema (a newer format may not parse as this one).
pub fn read_manifest(path: &Path) -> Result<Manifest, ArtifactError> {
    let text = std::fs::read_to_string(path).map_err(|source| ArtifactError::Io { path: path.into(), source })?;
    let bad = |detail: String| ArtifactError::Manifest { path: path.into(), detail };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let found =
        v.get("format_version").and_then(serde_json::Value::as_u64).ok_or_else(|| bad("no format_version".into()))?;
    if found != FORMAT_VERSION as u64 {
        return Err(ArtifactError::Version { path: path.into(), found, expected: FORMAT_VERSION });
    }
    serde_json::from_value(v).map_err(|e| bad(e.to_string()))
}

/// Every tensor of a safetensors file starts at a multiple of [`ALIGN`].
fn check_alignment(path: &Path) -> Result<(), ArtifactError> {
    let io = |source| ArtifactError::Io { path: path.into(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    let corrupt = |detail: String| WeightError::Corrupt { path: path.into(), detail };
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| corrupt(e.to_string()))?;
    let n = u64::from_le_bytes(len);
    if n > size - 8 {
        return Err(corrupt(format!("header length {n} exceeds the file")).into());
    }
    let mut head = vec![0u8; n as usize];
    f.read_exact(&mut head).map_err(|e| corrupt(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_slice(&head).map_err(|e| corrupt(e.to_string()))?;
    let obj = v.as_object().ok_or_else(|| corrupt("header is not an object".into()))?;
    for (name, t) in obj {
        if name == "__metadata__" || name.starts_with("__pad.") {
            continue;
        }
        let start = t.get("data_offsets").and_then(|o| o.get(0)).and_then(serde_json::Value::as_u64);
        let start = start.ok_or_else(|| corrupt(format!("tensor {name:?} has no data_offsets")))?;
        let offset = 8 + n + start;
        if !offset.is_multiple_of(ALIGN as u64) {
            return Err(ArtifactError::Misaligned { path: path.into(), name: name.clone(), offset });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("qvc-artifact-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn weights_are_aligned_contiguous_and_load_with_safetensors() {
        let d = tmp("align");
        let p = d.join(WEIGHTS);
        let ts = vec![
            TensorEntry { name: "a".into(), dtype: DType::BF16, shape: Shape::new(vec![3, 5]) },
            TensorEntry { name: "b".into(), dtype: DType::F32, shape: Shape::new(vec![7]) },
            TensorEntry { name: "c".into(), dtype: DType::F16, shape: Shape::new(vec![300]) },
        ];
        let rec = write_weights::<std::io::Error>(&p, &ts, |i, out| {
            out.extend((0..ts[i].bytes()).map(|b| (b * 7 + i) as u8));
            Ok(())
        })
        .unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(rec.bytes, bytes.len() as u64);
        assert_eq!(rec.fnv64, Fnv64::of(&bytes));
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (i, t) in ts.iter().enumerate() {
            let v = st.tensor(&t.name).unwrap();
            let off = v.data().as_ptr() as usize - bytes.as_ptr() as usize;
            assert_eq!(off % ALIGN, 0, "{} at {off}", t.name);
            let want: Vec<u8> = (0..t.bytes()).map(|b| (b * 7 + i) as u8).collect();
            assert_eq!(v.data(), &want[..]);
        }
        // The padding tensors are invisible to the weight store.
        let ws = WeightStore::open_files(std::slice::from_ref(&p)).unwrap();
        assert_eq!(ws.names(), vec!["a", "b", "c"]);
        check_alignment(&p).unwrap();
        let _ = std::fs::remove_dir_all(d);
    }

    /// An act-order int4 weight written as its parts reopens as the same
    /// weight (same permutation, no re-sort), and so does a row-range view
    /// (its columns gathered, its zeros repacked from an odd nibble offset).
    #[test]
    fn int4_parts_round_trip_through_the_weight_store() {
        use half::f16;
        let (out, inp, group) = (24usize, 40usize, 16usize);
        let groups = inp.div_ceil(group);
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let qweight: Vec<u32> = (0..inp / 8 * out).map(|_| next() as u32).collect();
        let qzeros: Vec<u32> = (0..groups * out / 8).map(|_| next() as u32).collect();
        let scales: Vec<f16> = (0..groups * out).map(|_| f16::from_f32((next() % 1000) as f32 / 997.0)).collect();
        let perm: Vec<u32> = {
            let mut p: Vec<u32> = (0..inp as u32).collect();
            for i in (1..inp).rev() {
                p.swap(i, (next() % (i as u64 + 1)) as usize);
            }
            p
        };
        let mut inv = vec![0u32; inp];
        for (r, &i) in perm.iter().enumerate() {
            inv[i as usize] = r as u32;
        }
        let q = Q4Ref::whole(out, inp, group, &qweight, &qzeros, &scales, Some((&perm, &inv)));
        let d = tmp("q4");
        let p = d.join(WEIGHTS);
        // The whole matrix is written tiled, from stored words and from
        // words the loader already tiled; a row range as stored qweight.
        let tiled_words = qvc_kernels::q4::tile_words(&q).unwrap();
        let tiled = Q4Ref { qweight: &tiled_words, words: Q4Words::Tiled, ..q };
        let views = [("full", q), ("rows", q.rows_range(4, 12)), ("from_tiled", tiled)];
        let mut entries = vec![];
        for (prefix, v) in &views {
            entries.extend(q4_parts(prefix, v).into_iter().map(|(part, t)| (part, t, *v)));
        }
        let ts: Vec<TensorEntry> = entries.iter().map(|e| e.1.clone()).collect();
        assert!(ts.iter().any(|t| t.name == "full.q4_perm"));
        for t in ["full.q4_tiled", "rows.qweight", "from_tiled.q4_tiled"] {
            assert!(ts.iter().any(|e| e.name == t), "{t} is written");
        }
        assert!(!ts.iter().any(|e| e.name == "full.qweight"));
        write_weights::<std::io::Error>(&p, &ts, |i, buf| {
            q4_part_bytes(&entries[i].2, entries[i].0, buf);
            Ok(())
        })
        .unwrap();
        let ws = WeightStore::open_files(std::slice::from_ref(&p)).unwrap();
        assert_eq!(ws.q4_names(), vec!["from_tiled.weight", "full.weight", "rows.weight"]);
        for (prefix, v) in &views {
            let name = format!("{prefix}.weight");
            assert_eq!(ws.info(&name), Some((DType::Q4, Shape::new([v.rows, inp]))));
            let back = ws.q4(&name).unwrap();
            assert_eq!(back.perm, Some(&perm[..]), "{name}: the permutation as written");
            assert_eq!(back.group, group);
            // Every matrix is served tiled (mapped as written, or tiled at open).
            assert_eq!(back.words, Q4Words::Tiled, "{name}");
            for o in 0..v.rows {
                for i in 0..inp {
                    assert_eq!(back.get(o, i).to_bits(), v.get(o, i).to_bits(), "{name}[{o}, {i}]");
                }
            }
        }
        // One int4 tensor is never written whole.
        let whole = [TensorEntry { name: "w".into(), dtype: DType::Q4, shape: Shape::new([out, inp]) }];
        let e = write_weights::<std::io::Error>(&d.join("x.safetensors"), &whole, |_, _| Ok(())).unwrap_err();
        assert!(e.to_string().contains("q4_parts"), "{e}");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn wrong_data_length_is_an_error() {
        let d = tmp("len");
        let ts = vec![TensorEntry { name: "a".into(), dtype: DType::F32, shape: Shape::new(vec![4]) }];
        let e = write_weights::<std::io::Error>(&d.join(WEIGHTS), &ts, |_, out| {
            out.extend([0u8; 3]);
            Ok(())
        })
        .unwrap_err();
        assert!(e.to_string().contains("3 bytes supplied"), "{e}");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn manifest_version_is_checked_before_the_schema() {
        let d = tmp("ver");
        let p = d.join(MANIFEST);
        std::fs::write(&p, r#"{"format_version": 99, "something": "new"}"#).unwrap();
        match read_manifest(&p) {
            Err(ArtifactError::Version { found: 99, expected: FORMAT_VERSION, .. }) => {}
            other => panic!("{:?}", other.err()),
        }
        std::fs::write(&p, "{ not json").unwrap();
        let e = read_manifest(&p).unwrap_err();
        assert!(matches!(e, ArtifactError::Manifest { .. }) && e.to_string().contains(MANIFEST), "{e}");
        let _ = std::fs::remove_dir_all(d);
    }
}
