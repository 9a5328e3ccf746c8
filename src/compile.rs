//! The compiler driver behind `qvc compile`: checkpoint → programs → passes →
//! memory plans → kernel launches → the artifact directory
//! ([`qvc_runtime::artifact`] describes its format).
//!
//! Programs, one graph each: `vision`; `prefill.{T}` for the prompt buckets
//! `T` ([`prefill_buckets`]), each taking as many pictures as `T` tokens can
//! hold (image features are scattered into their token rows from a run-time
//! index; the unused rows of a `[max_image_rows(T), H]` input are
//! `qvc_ir::NO_ROW`), so every prompt that fits `max_seq` runs;
//! `decode.{P}` (and `decode.b{N}.{P}`) for the cache buckets `P`. Each
//! runs `Canonicalize → ConstFold(with weights) → Fuse → Cse → Dce`, is
//! verified, and gets a memory plan. A session runs a step in the smallest
//! bucket that holds it, padded (`qvc_model::engine`).
//!
//! Invariants: nothing is written when any step fails, and an existing output
//! is replaced only with `force` and only if it is an artifact (or empty):
//! the artifact is assembled in a sibling directory and renamed into place.
//! Every `Param` of every compiled graph names a tensor of the weights file
//! with exactly the graph's dtype and shape; large constants (over
//! [`CONST_INLINE_MAX`] elements, or non-finite, which JSON cannot hold) are
//! moved from the graph JSON into the weights file as f32 `const.{k}` params.
//!
//! Weight dtypes: checkpoint tensors are stored in `--dtype`, except int4
//! (GPTQ) weights, which stay int4: a `Param` of [`DType::Q4`] is written as
//! its parts `X.q4_tiled` (the packed words in the CPU kernels' tiled order;
//! `X.qweight` for a matrix whose groups split words), `X.qzeros`,
//! `X.scales`, `X.g_idx` (and `X.q4_perm` for act-order), rows already
//! sorted by group ([`artifact::q4_parts`]), and
//! the weights byte counts are those real bytes. Weights made by
//! folding keep their folded dtype when it is narrower than f32 or when
//! `--dtype` is f32; folded f32 results of arithmetic are kept f32 (rounding
//! them would add an error the uncompiled path does not have). Constants stay f32.

use indicatif::ProgressBar;
use qvc_ir::passes::{run_pipeline, verify, Canonicalize, ConstFold, Cse, Dce, FoldedParam, Fuse, Pass};
use qvc_ir::plan::{kv_cache_bytes, plan_memory, PlanOptions};
use qvc_ir::{DType, Elems, Graph, IrError, Op, Shape, WeightSource};
use qvc_kernels::KernelSpec;
use qvc_model::config::Config;
use qvc_model::graphs::{decoder_graph, max_image_rows, vision_graph, DecoderShape, VisionOptions, VitAttention};
use qvc_model::{LoadOptions, Model, ModelError};
use qvc_runtime::artifact::ArtifactError;
use qvc_runtime::artifact::{
    self, checkpoint_fingerprint, FileRec, Fnv64, Launch, Manifest, MemoryRec, Program, ProgramStats, Q4Part, SlotRec,
    TensorEntry, TensorSig, CPU_FALLBACK,
};
use qvc_runtime::WeightStore;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Constants with more elements than this leave the graph JSON for the weights file.
pub const CONST_INLINE_MAX: usize = 4096;
/// Smallest prompt bucket.
pub const MIN_BUCKET: usize = 16;
/// Streaming multiprocessors assumed when splitting decode attention (an H100 SXM).
const SMS: usize = 132;

/// What the artifact runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Cpu,
    Gpu(qvc_codegen::Target),
}

impl Target {
    pub fn parse(s: &str) -> Option<Target> {
        if s == "cpu" {
            return Some(Target::Cpu);
        }
        qvc_codegen::Target::parse(s).map(Target::Gpu)
    }
    pub fn name(self) -> &'static str {
        match self {
            Target::Cpu => "cpu",
            Target::Gpu(t) => t.name(),
        }
    }
}

/// Where the model comes from.
#[derive(Clone, Debug)]
pub enum SourceSpec {
    /// A checkpoint directory, or a `.safetensors` file with its config beside it.
    Checkpoint(PathBuf),
    /// A full-size model built from its published shapes, without weights
    /// (only with `dry_run`): `qwen-vl-chat`.
    Synthetic(String),
}

/// `qvc compile`'s options.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    pub target: Target,
    /// Stored dtype of the model's weights in the artifact; `None` keeps the
    /// checkpoint's 16-bit type (that of its token embedding; bf16 for an f32
    /// checkpoint), so an f16 GPTQ checkpoint compiles without rounding.
    pub dtype: Option<DType>,
    /// Picture size the vision program is compiled for [default: the config's].
    pub image_size: Option<usize>,
    /// `global` or `window:W[,global-every:N]`.
    pub vit_attention: String,
    pub max_seq: usize,
    pub max_batch: usize,
    /// Replace an existing output artifact.
    pub force: bool,
    /// Run the pipeline and report, write nothing.
    pub dry_run: bool,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            target: Target::Cpu,
            dtype: None,
            image_size: None,
            vit_attention: "global".into(),
            max_seq: 2048,
            max_batch: 1,
            force: false,
            dry_run: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("{path} already exists; pass --force to replace it, or choose another -o")]
    OutExists { path: PathBuf },
    #[error("{path} exists and is not a qvc artifact (no manifest.json); qvc will not replace it even with --force: remove it or choose another -o")]
    OutNotArtifact { path: PathBuf },
    #[error("give an output directory with -o OUT.qvc (or --dry-run to write nothing)")]
    NoOutput,
    #[error("--synthetic {0:?}: the only synthetic model is qwen-vl-chat")]
    UnknownSynthetic(String),
    #[error("--synthetic has no weights to write: add --dry-run")]
    SyntheticNeedsDryRun,
    #[error("--image-size {size}: must be a positive multiple of the patch size {patch}")]
    ImageSize { size: usize, patch: usize },
    #[error("--vit-attention: {0}")]
    VitAttention(String),
    #[error("--{flag} {value}: {why}")]
    Option { flag: &'static str, value: usize, why: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("compiling program {program}: {source}")]
    Graph { program: String, source: IrError },
    #[error("weights: tensor {name:?} is not in the checkpoint nor made by the passes")]
    MissingWeight { name: String },
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// An I/O error not yet tied to a path (only inside `compile`).
    #[error("{0}")]
    UnnamedIo(#[from] std::io::Error),
    #[error("ptxas failed on {ptx}: {log}")]
    Ptxas { ptx: PathBuf, log: String },
}

/// The figures `qvc compile` prints for one program.
#[derive(Clone, Debug)]
pub struct ProgramSummary {
    pub name: String,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub fused: usize,
    pub unfused: usize,
    pub launches: usize,
    pub fallbacks: usize,
    pub naive_bytes: u64,
    pub arena_bytes: u64,
    pub peak_bytes: u64,
}

/// What a compile did.
#[derive(Clone, Debug)]
pub struct CompileReport {
    pub target: Target,
    pub programs: Vec<ProgramSummary>,
    /// Distinct GPU kernels (0 for cpu).
    pub kernels: usize,
    pub weight_tensors: usize,
    pub weight_bytes: u64,
    pub kv_cache_bytes: u64,
    /// Whether a cubin was assembled.
    pub cubin: bool,
    pub seconds: f64,
    /// The artifact written (None for a dry run).
    pub out: Option<PathBuf>,
    /// Remarks about what was skipped (synthetic weights, no ptxas, ...).
    pub notes: Vec<String>,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

impl fmt::Display for CompileReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<22} {:>6} {:>6} {:>6} {:>8} {:>9} {:>11} {:>11} {:>11}",
            "program", "nodes", "after", "fused", "unfused", "launches", "naive MiB", "arena MiB", "peak MiB"
        )?;
        for p in &self.programs {
            let launches = if self.target == Target::Cpu {
                "-".to_string()
            } else {
                match p.fallbacks {
                    0 => format!("{}", p.launches),
                    f => format!("{}+{f}host", p.launches - f),
                }
            };
            writeln!(
                f,
                "{:<22} {:>6} {:>6} {:>6} {:>8} {:>9} {:>11.2} {:>11.2} {:>11.2}",
                p.name,
                p.nodes_before,
                p.nodes_after,
                p.fused,
                p.unfused,
                launches,
                mib(p.naive_bytes),
                mib(p.arena_bytes),
                mib(p.peak_bytes)
            )?;
        }
        if self.target != Target::Cpu {
            writeln!(f, "launches: kernel launches per run (+N host: nodes with no GPU kernel, run on the CPU)")?;
        }
        writeln!(
            f,
            "{} programs for {}; {} kernels generated{}; weights {} tensors, {:.1} MiB; KV cache at --max-seq {:.1} MiB; compiled in {:.2} s",
            self.programs.len(),
            self.target.name(),
            self.kernels,
            if self.cubin { " (cubin assembled)" } else { "" },
            self.weight_tensors,
            mib(self.weight_bytes),
            mib(self.kv_cache_bytes),
            self.seconds
        )?;
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        match &self.out {
            Some(p) => writeln!(f, "wrote {}", p.display()),
            None => writeln!(f, "dry run: nothing written"),
        }
    }
}

/// One program to build.
#[derive(Clone, Debug)]
struct ProgramSpec {
    name: String,
    kind: &'static str,
    tokens: usize,
    past: usize,
    image_rows: usize,
    /// Sequences decoded together (decode programs; 1 otherwise).
    batch: usize,
}

/// The token buckets: powers of two from [`MIN_BUCKET`] below `max_seq`, then `max_seq`.
pub fn buckets(max_seq: usize) -> Vec<usize> {
    let mut v = vec![];
    let mut t = MIN_BUCKET;
    while t < max_seq {
        v.push(t);
        t *= 2;
    }
    v.push(max_seq);
    v
}

/// Prompt buckets: powers of two up to 256, then every 128 tokens up to
/// `max_seq`. A prompt runs padded to the next bucket, so the steps bound the
/// wasted work: an image (258 tokens) plus a question lands in 384, not 512.
pub fn prefill_buckets(max_seq: usize) -> Vec<usize> {
    let mut v: Vec<usize> = buckets(max_seq.min(256)).into_iter().filter(|&t| t < max_seq).collect();
    let mut t = 384;
    while t < max_seq {
        v.push(t);
        t += 128;
    }
    v.push(max_seq);
    v.dedup();
    v
}

fn program_specs(cfg: &Config, opt: &CompileOptions) -> Vec<ProgramSpec> {
    let mut v =
        vec![ProgramSpec { name: "vision".into(), kind: "vision", tokens: 0, past: 0, image_rows: 0, batch: 1 }];
    for t in prefill_buckets(opt.max_seq) {
        // As many feature rows as whole image spans (<img> + rows + </img>) fit.
        let image_rows = max_image_rows(cfg, t);
        v.push(ProgramSpec { name: format!("prefill.{t}"), kind: "prefill", tokens: t, past: 0, image_rows, batch: 1 });
    }
    // Decode: one program per cache bucket, and per batch size up to
    // --max-batch (sequences are prefilled one at a time, then decoded together).
    for batch in 1..=opt.max_batch.max(1) {
        for p in buckets(opt.max_seq) {
            let name = if batch == 1 { format!("decode.{p}") } else { format!("decode.b{batch}.{p}") };
            v.push(ProgramSpec { name, kind: "decode", tokens: 1, past: p, image_rows: 0, batch });
        }
    }
    v
}

/// Qwen-VL-Chat's `config.json` values (QWEN-VL.md §1–2).
pub fn qwen_vl_chat_config() -> Config {
    let v = serde_json::json!({
        "hidden_size": 4096, "num_attention_heads": 32, "kv_channels": 128, "num_hidden_layers": 32,
        "intermediate_size": 22016, "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000,
        "rotary_pct": 1.0, "seq_length": 2048, "use_dynamic_ntk": true, "use_logn_attn": true,
        "vocab_size": 151936,
        "visual": {"heads": 16, "image_size": 448, "image_start_id": 151857, "layers": 48,
                   "mlp_ratio": 4.9231, "output_dim": 4096, "patch_size": 14, "width": 1664}
    });
    Config::from_json(&v, Path::new("synthetic:qwen-vl-chat")).expect("the built-in config is valid")
}

/// The model being compiled: its config, weights and folded position tables.
struct Loaded {
    cfg: Config,
    weights: WeightStore,
    vit_pos: Vec<f32>,
    pool_pos: Vec<f32>,
    /// Files to copy into the artifact, and the checkpoint's safetensors files.
    dir: Option<PathBuf>,
    weight_files: Vec<PathBuf>,
}

fn load(src: &SourceSpec, opt: &CompileOptions, attention: VitAttention) -> Result<Loaded, CompileError> {
    match src {
        SourceSpec::Checkpoint(path) => {
            let lo = LoadOptions { config: None, image_size: opt.image_size, vit_attention: attention };
            let model = Model::load(path, &lo).map_err(|e| match e {
                ModelError::ImageSize { size, patch } => CompileError::ImageSize { size, patch },
                e => e.into(),
            })?;
            let weight_files = safetensors_files(path, &model.dir);
            let (vit_pos, pool_pos) = (model.vit_pos_embed().to_vec(), model.pool_pos_embed().to_vec());
            let Model { config, weights, dir, .. } = model;
            Ok(Loaded { cfg: config, weights, vit_pos, pool_pos, dir: Some(dir), weight_files })
        }
        SourceSpec::Synthetic(name) => {
            if name != "qwen-vl-chat" {
                return Err(CompileError::UnknownSynthetic(name.clone()));
            }
            if !opt.dry_run {
                return Err(CompileError::SyntheticNeedsDryRun);
            }
            let mut cfg = qwen_vl_chat_config();
            if let Some(size) = opt.image_size {
                let patch = cfg.visual.patch_size;
                if size == 0 || !size.is_multiple_of(patch) {
                    return Err(CompileError::ImageSize { size, patch });
                }
                cfg.visual.image_size = size;
            }
            let tensors = cfg.expected_tensors().into_iter().map(|(n, s)| (n, DType::BF16, Shape::new(s)));
            let weights = WeightStore::shapes_only(tensors);
            // Shapes only: the tables' values do not change the plan.
            let t = cfg.visual.grid() * cfg.visual.grid();
            let vit_pos = vec![0.0; t * cfg.visual.width];
            let pool_pos = vec![0.0; t * cfg.visual.output_dim];
            Ok(Loaded { cfg, weights, vit_pos, pool_pos, dir: None, weight_files: vec![] })
        }
    }
}

/// The checkpoint's safetensors files (for the source fingerprint).
fn safetensors_files(path: &Path, dir: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("safetensors"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn check_options(opt: &CompileOptions) -> Result<VitAttention, CompileError> {
    let attention: VitAttention = opt
        .vit_attention
        .parse()
        .map_err(|e: qvc_model::graphs::VitAttentionError| CompileError::VitAttention(e.to_string()))?;
    attention.validate().map_err(|e| CompileError::VitAttention(e.to_string()))?;
    let max = qvc_model::engine::MAX_CONTEXT;
    if opt.max_seq < 2 || opt.max_seq > max {
        return Err(CompileError::Option { flag: "max-seq", value: opt.max_seq, why: format!("must be in 2..={max}") });
    }
    if opt.max_batch == 0 || opt.max_batch > 8 {
        return Err(CompileError::Option {
            flag: "max-batch",
            value: opt.max_batch,
            why: "must be in 1..=8 (the decode kernels' batch)".into(),
        });
    }
    Ok(attention)
}

/// Refuse to clobber: an existing `out` is replaced only with `force`, and
/// only when it is an artifact or an empty directory.
fn check_out(out: &Path, force: bool) -> Result<(), CompileError> {
    if !out.exists() {
        return Ok(());
    }
    if !force {
        return Err(CompileError::OutExists { path: out.into() });
    }
    let empty_dir = out.is_dir() && std::fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false);
    if !artifact::is_artifact(out) && !empty_dir {
        return Err(CompileError::OutNotArtifact { path: out.into() });
    }
    Ok(())
}

/// Where a weights-file tensor's data comes from.
enum Data<'a> {
    Checkpoint(String),
    /// Part `.1` of the checkpoint's int4 weight `.0` (its virtual `X.weight`).
    Q4(String, Q4Part),
    Folded(&'a FoldedParam),
    Const(std::sync::Arc<[f32]>),
}

fn to_bytes(e: Elems<'_>, dtype: DType, out: &mut Vec<u8>) {
    use half::{bf16, f16};
    match (e, dtype) {
        (Elems::F32(s), DType::F32) => out.extend_from_slice(bytemuck::cast_slice(s)),
        (Elems::BF16(s), DType::BF16) => out.extend_from_slice(bytemuck::cast_slice(s)),
        (Elems::F16(s), DType::F16) => out.extend_from_slice(bytemuck::cast_slice(s)),
        (e, DType::BF16) => (0..e.len()).for_each(|i| out.extend(bf16::from_f32(e.get(i)).to_le_bytes())),
        (e, DType::F16) => (0..e.len()).for_each(|i| out.extend(f16::from_f32(e.get(i)).to_le_bytes())),
        (e, _) => (0..e.len()).for_each(|i| out.extend(e.get(i).to_le_bytes())),
    }
}

/// Compile `src` into the artifact `out` (see the module docs). `bar` shows
/// progress (pass `ProgressBar::hidden()` for none).
pub fn compile(
    src: &SourceSpec,
    out: Option<&Path>,
    opt: &CompileOptions,
    bar: &ProgressBar,
) -> Result<CompileReport, CompileError> {
    let t0 = Instant::now();
    let attention = check_options(opt)?;
    if !opt.dry_run {
        check_out(out.ok_or(CompileError::NoOutput)?, opt.force)?;
    }
    bar.set_message("loading the checkpoint");
    let m = load(src, opt, attention)?;
    let cfg = &m.cfg;
    let specs = program_specs(cfg, opt);
    let gpu = matches!(opt.target, Target::Gpu(_));
    bar.set_length(specs.len() as u64 + 2);
    let mut notes = vec![];

    // Weight folding reads the weights; a synthetic model has none, so its
    // layout ops over weights stay in the graph.
    let fold = match src {
        SourceSpec::Checkpoint(_) => ConstFold::with_weights(&m.weights),
        SourceSpec::Synthetic(_) => {
            notes.push("synthetic model: weights not read, weight folding skipped".into());
            ConstFold::new()
        }
    };
    let mut programs: BTreeMap<String, Program> = BTreeMap::new();
    let mut order = vec![];
    for s in &specs {
        bar.set_message(format!("compiling {}", s.name));
        let gerr = |source: IrError| CompileError::Graph { program: s.name.clone(), source };
        let mut g = if s.kind == "vision" {
            let vo = VisionOptions { attention, ..Default::default() };
            vision_graph(cfg, &m.weights, m.vit_pos.clone(), m.pool_pos.clone(), &vo).map_err(gerr)?
        } else {
            // Buckets: the session pads a step into the smallest program that
            // holds it (see `DecoderShape::bucketed` and `Session::run_compiled`).
            let shape = DecoderShape {
                tokens: s.tokens,
                past: s.past,
                image_rows: s.image_rows,
                bucketed: true,
                batch: s.batch,
                ..Default::default()
            };
            decoder_graph(cfg, &m.weights, &shape).map_err(gerr)?
        };
        let before = g.nodes.len();
        let passes: [&dyn Pass; 5] = [&Canonicalize, &fold, &Fuse, &Cse, &Dce];
        let stats = run_pipeline(&mut g, &passes).map_err(gerr)?;
        verify(&g).map_err(gerr)?;
        let fs = qvc_ir::passes::fusion_stats(&g);
        let stats = ProgramStats {
            nodes_before: before,
            nodes_after: g.nodes.len(),
            fused: fs.fused,
            unfused: fs.unfused_compute,
            passes: stats.iter().map(|p| (p.pass.to_string(), p.rewrites, p.nodes_after)).collect(),
        };
        let sig =
            |(n, t): (&str, &qvc_ir::TensorType)| TensorSig { name: n.into(), dtype: t.dtype, shape: t.shape.clone() };
        let inputs = g.inputs().into_iter().map(sig).collect();
        let outputs = g.outputs.iter().map(|(n, id)| sig((n.as_str(), g.ty(*id)))).collect();
        programs.insert(
            s.name.clone(),
            Program {
                kind: s.kind.into(),
                tokens: s.tokens,
                past: s.past,
                image_rows: s.image_rows,
                batch: s.batch,
                inputs,
                outputs,
                stats,
                memory: None,
                launches: vec![],
                graph: g,
            },
        );
        order.push(s.name.clone());
        bar.inc(1);
    }
    let folded = fold.take_folded();
    let folded_by_name: HashMap<&str, &FoldedParam> = folded.iter().map(|f| (f.name.as_str(), f)).collect();

    // Large constants → `const.{k}` params, identical data shared.
    let mut consts: Vec<(String, std::sync::Arc<[f32]>, Shape)> = vec![];
    let mut const_by_key: HashMap<(String, Shape), String> = HashMap::new();
    for p in programs.values_mut() {
        for n in p.graph.nodes.iter_mut() {
            let Op::Const(d) = &n.op else { continue };
            if d.len() <= CONST_INLINE_MAX && d.iter().all(|x| x.is_finite()) {
                continue;
            }
            let bytes: &[u8] = bytemuck::cast_slice(d);
            let key = (Fnv64::of(bytes), n.ty.shape.clone());
            let name = const_by_key.entry(key).or_insert_with(|| {
                let name = format!("const.{}", consts.len());
                consts.push((name.clone(), d.clone(), n.ty.shape.clone()));
                name
            });
            n.op = Op::Param(name.clone());
        }
    }
    let const_data: HashMap<&str, &std::sync::Arc<[f32]>> = consts.iter().map(|(n, d, _)| (n.as_str(), d)).collect();

    // The weights file: every param any program reads, in its artifact dtype.
    let wdtype = opt.dtype.unwrap_or(match m.weights.info("transformer.wte.weight") {
        Some((DType::F16, _)) => DType::F16,
        _ => DType::BF16,
    });
    let stored = |name: &str, graph_dtype: DType| -> DType {
        if graph_dtype == DType::Q4 {
            // Only checkpoint Params are int4, and they stay int4.
            DType::Q4
        } else if const_data.contains_key(name) {
            DType::F32
        } else if folded_by_name.contains_key(name) {
            if graph_dtype == DType::F32 || wdtype == DType::F32 {
                DType::F32
            } else {
                graph_dtype
            }
        } else {
            wdtype
        }
    };
    let mut params: BTreeMap<String, TensorEntry> = BTreeMap::new();
    for p in programs.values_mut() {
        for n in p.graph.nodes.iter_mut() {
            let Op::Param(name) = &n.op else { continue };
            n.ty.dtype = stored(name, n.ty.dtype);
            params.entry(name.clone()).or_insert_with(|| TensorEntry {
                name: name.clone(),
                dtype: n.ty.dtype,
                shape: n.ty.shape.clone(),
            });
        }
    }
    // The weights file's tensors and where each one's data comes from. An
    // int4 Param is written as its GPTQ parts in the store's resolved order
    // (rows sorted by group, `q4_perm` for act-order), which the runtime's
    // WeightStore maps as they are; every other tensor in its stored dtype.
    let mut entries_file: Vec<TensorEntry> = Vec::with_capacity(params.len());
    let mut sources: Vec<Data> = Vec::with_capacity(params.len());
    let mut f16_rounded = 0usize;
    for e in params.into_values() {
        let name = e.name.clone();
        if e.dtype == DType::Q4 {
            let missing = || CompileError::MissingWeight { name: name.clone() };
            let prefix = name.strip_suffix(".weight").ok_or_else(missing)?;
            let q = m.weights.q4(&name).ok_or_else(missing)?;
            for (part, t) in artifact::q4_parts(prefix, &q) {
                entries_file.push(t);
                sources.push(Data::Q4(name.clone(), part));
            }
            continue;
        }
        sources.push(if let Some(d) = const_data.get(name.as_str()) {
            Data::Const((*d).clone())
        } else if let Some(f) = folded_by_name.get(name.as_str()) {
            Data::Folded(f)
        } else {
            if e.dtype == DType::BF16 && m.weights.info(&name).is_some_and(|(d, _)| d == DType::F16) {
                f16_rounded += 1;
            }
            Data::Checkpoint(name)
        });
        entries_file.push(e);
    }
    if f16_rounded > 0 {
        notes.push(format!(
            "{f16_rounded} checkpoint tensors are f16 and were rounded to bf16 (--dtype bf16); --dtype f16 or auto \
             keeps them exact"
        ));
    }
    let entries = entries_file;
    let weight_bytes_est: u64 = entries.iter().map(|e| e.bytes() as u64).sum();

    // Memory plans and kernel launches.
    let kv_dtype = if gpu { DType::BF16 } else { DType::F32 };
    let kv_bytes = kv_cache_bytes(cfg.layers, cfg.heads, cfg.head_dim, opt.max_seq, opt.max_batch, kv_dtype);
    let mut kernels: BTreeMap<String, Box<dyn KernelSpec>> = BTreeMap::new();
    for p in programs.values_mut() {
        let plan = plan_memory(&p.graph, &PlanOptions::default());
        p.memory = Some(MemoryRec {
            peak_bytes: plan.peak_bytes,
            naive_bytes: plan.naive_bytes,
            arena_bytes: plan.arena_bytes,
            in_place: plan.in_place,
            slots: plan.values.iter().map(|s| s.map(|s| SlotRec { offset: s.offset, bytes: s.bytes })).collect(),
        });
        if gpu {
            let (launches, specs) = launches(&p.graph, cfg, opt);
            p.launches = launches;
            for s in specs {
                kernels.entry(s.name()).or_insert(s);
            }
        }
    }
    bar.inc(1);

    let summaries: Vec<ProgramSummary> = order
        .iter()
        .map(|name| {
            let p = &programs[name];
            let mem = p.memory.clone().unwrap_or_default();
            ProgramSummary {
                name: name.clone(),
                nodes_before: p.stats.nodes_before,
                nodes_after: p.stats.nodes_after,
                fused: p.stats.fused,
                unfused: p.stats.unfused,
                launches: p.launches.len(),
                fallbacks: p.launches.iter().filter(|l| l.family == CPU_FALLBACK).count(),
                naive_bytes: mem.naive_bytes,
                arena_bytes: mem.arena_bytes,
                peak_bytes: mem.peak_bytes,
            }
        })
        .collect();
    let mut report = CompileReport {
        target: opt.target,
        programs: summaries,
        kernels: kernels.len(),
        weight_tensors: entries.len(),
        weight_bytes: weight_bytes_est,
        kv_cache_bytes: kv_bytes,
        cubin: false,
        seconds: 0.0,
        out: None,
        notes,
    };
    if opt.dry_run {
        bar.inc(1);
        report.seconds = t0.elapsed().as_secs_f64();
        return Ok(report);
    }
    let out = out.ok_or(CompileError::NoOutput)?;

    // Assemble in a sibling directory, then rename into place.
    bar.set_message("writing weights");
    let tmp = sibling(out, "partial");
    let _ = std::fs::remove_dir_all(&tmp);
    let ioerr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CompileError::Io { path, source }
    };
    std::fs::create_dir_all(&tmp).map_err(ioerr(&tmp))?;
    let result = (|| -> Result<Manifest, CompileError> {
        let wpath = tmp.join(artifact::WEIGHTS);
        let weights_rec = artifact::write_weights::<CompileError>(&wpath, &entries, |i, buf| {
            let e = &entries[i];
            match &sources[i] {
                Data::Const(d) => to_bytes(Elems::F32(d), e.dtype, buf),
                Data::Folded(f) => to_bytes(f.data.elems(), e.dtype, buf),
                Data::Checkpoint(name) => {
                    let w =
                        m.weights.weight(name).ok_or_else(|| CompileError::MissingWeight { name: name.to_string() })?;
                    to_bytes(w, e.dtype, buf)
                }
                Data::Q4(name, part) => {
                    let q = m.weights.q4(name).ok_or_else(|| CompileError::MissingWeight { name: name.to_string() })?;
                    artifact::q4_part_bytes(&q, *part, buf)
                }
            }
            Ok(())
        })
        .map_err(|e| match e {
            CompileError::UnnamedIo(source) => CompileError::Io { path: wpath.clone(), source },
            e => e,
        })?;
        let mut files = vec![];
        let add_file = |name: &str, files: &mut Vec<FileRec>| -> Result<(), CompileError> {
            let p = tmp.join(name);
            let bytes = std::fs::metadata(&p).map_err(ioerr(&p))?.len();
            files.push(FileRec { name: name.into(), bytes });
            Ok(())
        };
        if let Target::Gpu(t) = opt.target {
            bar.set_message("generating PTX");
            let module = qvc_codegen::Module::new(t, kernels.values().map(|k| k.build()).collect());
            let ppath = tmp.join(artifact::PTX);
            std::fs::write(&ppath, module.print()).map_err(ioerr(&ppath))?;
            add_file(artifact::PTX, &mut files)?;
            if let Some(ptxas) = qvc_codegen::ptxas::find_ptxas() {
                let name = format!("kernels.{}.cubin", t.name());
                let o = std::process::Command::new(&ptxas)
                    .arg(format!("-arch={}", t.name()))
                    .arg("-o")
                    .arg(tmp.join(&name))
                    .arg(&ppath)
                    .output()
                    .map_err(ioerr(&ptxas))?;
                if !o.status.success() {
                    let log = String::from_utf8_lossy(&o.stderr).into_owned();
                    return Err(CompileError::Ptxas { ptx: out.join(artifact::PTX), log });
                }
                add_file(&name, &mut files)?;
                report.cubin = true;
            } else {
                report.notes.push("ptxas not found: kernels.ptx written, no cubin".into());
            }
        }
        let dir = m.dir.as_deref().expect("checkpoints have a directory");
        // quantize_config.json: where a GPTQ checkpoint's config.json has no
        // quantization_config, the artifact's settings are read from it.
        for name in ["config.json", "generation_config.json", "qwen.tiktoken", "quantize_config.json"] {
            let from = dir.join(name);
            if from.is_file() {
                std::fs::copy(&from, tmp.join(name)).map_err(ioerr(&from))?;
                add_file(name, &mut files)?;
            }
        }
        let config_bytes = std::fs::read(dir.join("config.json")).map_err(ioerr(&dir.join("config.json")))?;
        let (fingerprint, ck_bytes) = checkpoint_fingerprint(&m.weight_files)?;
        let SourceSpec::Checkpoint(src_path) = src else { unreachable!("synthetic sources are dry runs") };
        let manifest = Manifest {
            format_version: artifact::FORMAT_VERSION,
            qvc_version: env!("CARGO_PKG_VERSION").into(),
            source: artifact::Source {
                path: src_path.display().to_string(),
                config_fnv64: Fnv64::of(&config_bytes),
                checkpoint_fingerprint: fingerprint,
                checkpoint_bytes: ck_bytes,
            },
            options: artifact::Options {
                target: opt.target.name().into(),
                dtype: wdtype.to_string(),
                image_size: cfg.visual.image_size,
                vit_attention: opt.vit_attention.trim().into(),
                max_seq: opt.max_seq,
                max_batch: opt.max_batch,
            },
            kv_cache_bytes: kv_bytes,
            kernels: kernels.keys().cloned().collect(),
            programs: std::mem::take(&mut programs),
            weights: weights_rec,
            files,
        };
        bar.set_message("writing the manifest");
        let mpath = tmp.join(artifact::MANIFEST);
        let text =
            serde_json::to_vec(&manifest).map_err(|e| CompileError::Io { path: mpath.clone(), source: e.into() })?;
        std::fs::write(&mpath, text).map_err(ioerr(&mpath))?;
        Ok(manifest)
    })();
    let manifest = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if out.exists() {
        // check_out allowed it: an artifact or an empty directory, and --force.
        let old = sibling(out, "old");
        std::fs::rename(out, &old).map_err(ioerr(out))?;
        std::fs::rename(&tmp, out).map_err(ioerr(out))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, out).map_err(ioerr(out))?;
    }
    bar.inc(1);
    report.weight_bytes = manifest.weights.bytes;
    report.out = Some(out.to_path_buf());
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

fn sibling(out: &Path, what: &str) -> PathBuf {
    let name = out.file_name().map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    out.with_file_name(format!(".{name}.{what}-{}", std::process::id()))
}

/// Kernel launches of `g` for a GPU target, exactly as the GPU runtime will
/// run them (the same [`qvc_runtime::gpu::lower::lower`]): one entry per
/// launch, with its node, family (the kernel name's first word) and
/// geometry, and a `cpu-fallback` entry (with the reason) for each node that
/// runs on the host. A program the lowering rejects gets one fallback entry
/// saying why. Also returns the specs used.
pub fn launches(g: &Graph, cfg: &Config, opt: &CompileOptions) -> (Vec<Launch>, Vec<Box<dyn KernelSpec>>) {
    use qvc_runtime::gpu::lower::{lower, KvShape, LowerOptions, Sampling, Step};
    let kv = KvShape { layers: cfg.layers, heads: cfg.heads, head_dim: cfg.head_dim, max_seq: opt.max_seq };
    let low = match lower(g, &LowerOptions { kv, sms: SMS, sampling: Default::default() }) {
        Ok(l) => l,
        Err(e) => {
            let note = Some(format!("the whole program runs on the CPU: {e}"));
            let l = Launch {
                node: 0,
                op: String::new(),
                family: CPU_FALLBACK.into(),
                kernel: String::new(),
                grid: [0; 3],
                block: [0; 3],
                note,
            };
            return (vec![l], vec![]);
        }
    };
    let mut out = vec![];
    for st in &low.steps {
        match st {
            Step::Launch { node, kernel, grid, block, .. } => {
                let family = family_of(kernel).to_string();
                let op = g.node(*node).op.name();
                out.push(Launch {
                    node: node.0,
                    op,
                    family,
                    kernel: kernel.clone(),
                    grid: *grid,
                    block: *block,
                    note: None,
                });
            }
            Step::Host { node } => {
                let op = g.node(*node).op.name();
                let note = Some(format!("no GPU kernel for {op}: runs on the host"));
                out.push(Launch {
                    node: node.0,
                    op,
                    family: CPU_FALLBACK.into(),
                    kernel: String::new(),
                    grid: [0; 3],
                    block: [0; 3],
                    note,
                });
            }
            Step::Zero { .. } => {}
        }
    }
    let mut specs: Vec<Box<dyn KernelSpec>> = low.kernels.into_values().collect();
    // Decode steps may end in device sampling (greedy or top-p): ship those
    // kernels too, so the runtime finds them in the artifact's cubin.
    if g.inputs().iter().any(|(n, _)| n.starts_with("past_")) {
        for sampling in [Sampling::Greedy, Sampling::TopP] {
            if let Ok(l) = lower(g, &LowerOptions { kv, sms: SMS, sampling }) {
                specs.extend(l.kernels.into_values());
            }
        }
    }
    (out, specs)
}

/// The kernel family a generated kernel belongs to, from its entry name.
pub fn family_of(kernel: &str) -> &'static str {
    match kernel.split('_').next().unwrap_or_default() {
        "gemm" => "gemm",
        "gemv" => "gemv",
        "q4gemm" => "gemm_int4",
        "q4gemv" => "gemv_int4",
        "layernorm" | "rmsnorm" => "norm",
        "rope" => "rotary",
        "flash" => "attention",
        "decode" => "decode_attention",
        "softmax" => "softmax",
        "argmax" | "top" => "sample",
        _ => "generic",
    }
}

/// Every param name the compiled programs of `m` read (for tests and `inspect`).
pub fn params_of(m: &Manifest) -> BTreeSet<String> {
    m.programs.values().flat_map(|p| p.graph.params().into_iter().map(|(n, _)| n.to_string())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_length_up_to_max_seq() {
        assert_eq!(buckets(2048), [16, 32, 64, 128, 256, 512, 1024, 2048]);
        assert_eq!(buckets(100), [16, 32, 64, 100]);
        assert_eq!(buckets(16), [16]);
        assert_eq!(buckets(5), [5]);
        assert_eq!(prefill_buckets(1024), [16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024]);
        assert_eq!(prefill_buckets(600), [16, 32, 64, 128, 256, 384, 512, 600]);
        assert_eq!(prefill_buckets(256), [16, 32, 64, 128, 256]);
        assert_eq!(prefill_buckets(100), [16, 32, 64, 100]);
        assert_eq!(prefill_buckets(5), [5]);
    }

    #[test]
    fn one_prefill_program_per_bucket_holds_every_picture_that_fits() {
        let cfg = qwen_vl_chat_config();
        let opt = CompileOptions { max_seq: 600, ..Default::default() };
        let specs = program_specs(&cfg, &opt);
        let prefill: Vec<(String, usize)> =
            specs.iter().filter(|p| p.kind == "prefill").map(|p| (p.name.clone(), p.image_rows)).collect();
        // One image span is 258 tokens, two are 516: 256 rows from 258 tokens, 512 from 516.
        let want: Vec<(String, usize)> =
            [(16, 0), (32, 0), (64, 0), (128, 0), (256, 0), (384, 256), (512, 256), (600, 512)]
                .into_iter()
                .map(|(t, r)| (format!("prefill.{t}"), r))
                .collect();
        assert_eq!(prefill, want);
        let names: Vec<&str> = specs.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names.iter().filter(|n| n.starts_with("decode.")).count(), buckets(600).len());
        assert_eq!(names[0], "vision");
        // The default artifact: 2048 tokens hold 7 pictures.
        assert_eq!(max_image_rows(&cfg, 2048), 7 * 256);
    }

    #[test]
    fn kernels_are_grouped_by_family_int4_apart() {
        for (kernel, family) in [
            ("gemm_bf16_m300_n4096_k4096_res_f32", "gemm"),
            ("gemv_bf16_m1_n151936_k4096_f32", "gemv"),
            ("q4gemm_bf16_m300_n11008_k4096_silumul_bf16", "gemm_int4"),
            ("q4gemv_bf16_m1_n4096_k11008_res_f32", "gemv_int4"),
            ("rmsnorm_r300_c4096_e1em6_bf16", "norm"),
            ("rope_t1_h32_d128_ts12288_hs128", "rotary"),
            ("flash_attn_full_q1024_k1024_h16_d104", "attention"),
            ("decode_attn_partial_b1_h32_d128_s512", "decode_attention"),
            ("kv_append_b1_h32_d128_s512_st2097152", "generic"),
        ] {
            assert_eq!(family_of(kernel), family, "{kernel}");
        }
    }

    #[test]
    fn bad_options_are_rejected_before_any_work() {
        let bad = |o: CompileOptions| check_options(&o).unwrap_err().to_string();
        assert!(bad(CompileOptions { max_seq: 1, ..Default::default() }).contains("--max-seq 1"));
        assert!(bad(CompileOptions { max_batch: 0, ..Default::default() }).contains("--max-batch 0"));
        assert!(
            bad(CompileOptions { vit_attention: "window:0".into(), ..Default::default() }).contains("--vit-attention")
        );
        assert!(check_options(&CompileOptions::default()).is_ok());
    }
}
