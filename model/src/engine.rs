//! Loading a checkpoint and running it: [`Model`] owns the config, the
//! memory-mapped weights, the tokenizer and the folded position tables;
//! [`Session`] runs vision → prefill → decode on a [`Backend`] and keeps the
//! KV cache; [`generate`] is the sampling loop with streaming and stop tokens.
//!
//! Prefill is resumable: [`Session::extend`] runs the rows `cached..end` of a
//! prompt over the cached rows (so a scheduler can interleave a long prompt
//! with decode steps, and keep the rows a new prompt shares with the previous
//! one, [`Session::reusable_prefix`]). Chunk boundaries are the absolute
//! multiples of a chunk size ([`PREFILL_CHUNK`] for [`Session::prefill`]), so
//! every prefill of a prompt runs the same row blocks and computes the same
//! numbers. A compiled artifact prefills whole prompts from an empty cache
//! only ([`Session::can_extend`]).

use crate::config::{Config, ConfigError, GenerationConfig};
use crate::graphs::{
    decoder_graph, image_inputs, logn_scales, rope_tables, vision_graph, DecoderShape, VisionOptions, VitAttention,
    VitAttentionError,
};
use crate::image::{preprocess, ImageError};
use crate::posembed::resize_pos_embed;
use crate::sampling::{sample, Rng, SamplingParams};
use crate::tokenizer::{QwenTokenizer, TokenizerError};
use qvc_ir::{ExecError, InputRef, IrError, WeightSource};
use qvc_runtime::artifact::{Artifact, ArtifactError, Manifest, Program};
use qvc_runtime::{Backend, KvCache, WeightError, WeightStore};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The longest prompt plus answer qvc accepts: the reference's logn table
/// covers positions below 32768.
pub const MAX_CONTEXT: usize = 32767;

/// Prefill chunk boundaries fall on the absolute multiples of this many
/// prompt positions (see [`Session::extend`]): every prefill of a prompt, in
/// `qvc generate` and in the server, with or without reused rows, then runs
/// the same row blocks and computes the same numbers.
pub const PREFILL_CHUNK: usize = 512;

/// The end of the prefill chunk that starts at row `start` of an `n`-token
/// prompt: the next multiple of `chunk` after `start`, or `n`.
pub fn chunk_end(start: usize, n: usize, chunk: usize) -> usize {
    let chunk = chunk.max(1);
    ((start / chunk + 1) * chunk).min(n)
}

/// A prompt the decoder can run: not empty, within [`MAX_CONTEXT`], ids in the vocabulary.
fn check_prompt(cfg: &Config, ids: &[u32]) -> Result<(), ModelError> {
    if ids.is_empty() {
        return Err(ModelError::Prompt("the prompt is empty".into()));
    }
    if ids.len() > MAX_CONTEXT {
        return Err(ModelError::Prompt(format!(
            "the prompt has {} tokens; qvc accepts at most {MAX_CONTEXT}",
            ids.len()
        )));
    }
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= cfg.vocab_size) {
        return Err(ModelError::Prompt(format!("token id {bad} is outside the vocabulary (0..{})", cfg.vocab_size)));
    }
    Ok(())
}

/// The feature rows of the image spans that fall in rows `from..to` of the
/// prompt, and their positions relative to `from` (a span may straddle the
/// boundaries: only its rows inside are taken).
fn image_rows(
    cfg: &Config,
    spans: &[crate::tokenizer::ImageSpan],
    features: &[&[f32]],
    from: usize,
    to: usize,
) -> Result<(Vec<f32>, Vec<i32>), ModelError> {
    let (h, q) = (cfg.hidden_size, cfg.visual.queries());
    let (mut feats, mut rows) = (Vec::new(), Vec::new());
    for (s, f) in spans.iter().zip(features) {
        let n = s.end - s.start - 1;
        if n != q {
            return Err(ModelError::Prompt(format!(
                "the image span at token {} holds {n} tokens between <img> and </img>; the model needs {q}",
                s.start
            )));
        }
        if f.len() != q * h {
            return Err(ModelError::Prompt(format!(
                "the features of the image at token {} hold {} floats; the model needs {q} × {h}",
                s.start,
                f.len()
            )));
        }
        let (a, b) = ((s.start + 1).max(from), s.end.min(to));
        if a < b {
            let j = a - (s.start + 1);
            feats.extend_from_slice(&f[j * h..(j + b - a) * h]);
            rows.extend((a - from..b - from).map(|r| r as i32));
        }
    }
    Ok((feats, rows))
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("running the model failed: {0}")]
    Exec(#[from] ExecError),
    #[error("internal error building the model graph: {0}")]
    Graph(#[from] IrError),
    #[error(
        "{path} not found: a Qwen-VL checkpoint directory holds config.json, qwen.tiktoken and the safetensors weights"
    )]
    NotFound { path: PathBuf },
    #[error("{0}")]
    Prompt(String),
    #[error("the tokenizer has {tok} ids but the model's vocab_size is {vocab}: qwen.tiktoken does not belong to this checkpoint")]
    VocabMismatch { tok: usize, vocab: usize },
    #[error("image size {size} is not a positive multiple of the vision tower's patch size {patch}")]
    ImageSize { size: usize, patch: usize },
    #[error(transparent)]
    VitAttention(#[from] VitAttentionError),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error(transparent)]
    Quant(#[from] crate::quant::QuantError),
    /// A request a compiled model cannot serve (a shape outside its buckets,
    /// an option it was not compiled with).
    #[error("{0}")]
    Compiled(String),
}

/// Where to find the pieces of a checkpoint, and how to build its vision
/// program.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Use this config.json instead of the one in the checkpoint directory.
    pub config: Option<PathBuf>,
    /// Encode pictures at this size instead of `config.visual.image_size`
    /// (a multiple of the patch size, e.g. 896): the position tables are
    /// resized to the new grid and [`Model::config`] reports the new size.
    pub image_size: Option<usize>,
    /// Attention in the ViT blocks for [`Session::encode_image`].
    pub vit_attention: VitAttention,
}

/// A loaded Qwen-VL checkpoint.
pub struct Model {
    pub config: Config,
    pub generation: GenerationConfig,
    pub weights: WeightStore,
    pub tokenizer: QwenTokenizer,
    pub dir: PathBuf,
    vit_pos: Vec<f32>,
    pool_pos_k: Vec<f32>,
    vit_attention: VitAttention,
    /// Set when loaded from a `qvc compile` artifact: the programs come from
    /// its manifest (shape buckets) instead of being built per step.
    compiled: Option<Manifest>,
}

impl Model {
    /// Load a checkpoint directory, or a bare `.safetensors` file with
    /// `config.json` and `qwen.tiktoken` beside it. Every tensor is checked
    /// for presence and shape before anything runs, and the options before
    /// the weights are opened.
    pub fn load(path: &Path, opt: &LoadOptions) -> Result<Self, ModelError> {
        if !path.exists() {
            return Err(ModelError::NotFound { path: path.into() });
        }
        if path.is_dir() && path.join(qvc_runtime::artifact::MANIFEST).is_file() {
            return Self::load_compiled(path, opt);
        }
        let dir = if path.is_dir() {
            path.to_path_buf()
        } else {
            path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        };
        let cfg_path = opt.config.clone().unwrap_or_else(|| dir.join("config.json"));
        let mut config = Config::from_file(&cfg_path)?;
        if let Some(size) = opt.image_size {
            let patch = config.visual.patch_size;
            if size == 0 || !size.is_multiple_of(patch) {
                return Err(ModelError::ImageSize { size, patch });
            }
            // Everything downstream (grid, preprocessing, graph shapes) reads
            // the size from the config, so overriding it here keeps them in step.
            config.visual.image_size = size;
        }
        opt.vit_attention.validate()?;
        let gen_path = dir.join("generation_config.json");
        let generation =
            if gen_path.exists() { GenerationConfig::from_file(&gen_path)? } else { GenerationConfig::default() };
        let tokenizer = QwenTokenizer::from_file(&dir.join("qwen.tiktoken"))?;
        // The quantization settings before the tensors: "bits 8" is a clearer
        // error than the shape of the first qweight.
        let quant = crate::quant::QuantConfig::from_config_file(&cfg_path)?;
        let weights = WeightStore::open(path)?;
        crate::quant::QuantConfig::check(quant.as_ref(), &weights)?;
        config.validate(&weights)?;
        if tokenizer.n_vocab() > config.vocab_size {
            return Err(ModelError::VocabMismatch { tok: tokenizer.n_vocab(), vocab: config.vocab_size });
        }
        let v = &config.visual;
        let table = |name: &str, c: usize| -> Result<Vec<f32>, ModelError> {
            let w =
                weights.weight(name).ok_or_else(|| WeightError::Missing { name: name.into(), hint: String::new() })?;
            Ok(resize_pos_embed(&w.to_f32_vec(), 16, v.grid(), c))
        };
        let vit_pos = table("transformer.visual.positional_embedding", v.width)?;
        let pool_pos_k = table("transformer.visual.attn_pool.pos_embed", v.output_dim)?;
        Ok(Model {
            config,
            generation,
            weights,
            tokenizer,
            dir,
            vit_pos,
            pool_pos_k,
            vit_attention: opt.vit_attention,
            compiled: None,
        })
    }

    /// Load a `qvc compile` artifact: its config, tokenizer and weights, and
    /// the compiled programs. Options must be the ones it was compiled with.
    fn load_compiled(dir: &Path, opt: &LoadOptions) -> Result<Self, ModelError> {
        let art = Artifact::open(dir)?;
        let o = &art.manifest.options;
        let vit_attention: VitAttention = o.vit_attention.parse()?;
        if opt.image_size.is_some_and(|s| s != o.image_size) {
            return Err(ModelError::Compiled(format!(
                "{} was compiled for {}-pixel images; compile again with `qvc compile --image-size {}`",
                dir.display(),
                o.image_size,
                opt.image_size.unwrap_or_default()
            )));
        }
        if opt.vit_attention != VitAttention::Global && opt.vit_attention != vit_attention {
            return Err(ModelError::Compiled(format!(
                "{} was compiled with --vit-attention {}; compile again with `--vit-attention {}`",
                dir.display(),
                o.vit_attention,
                opt.vit_attention
            )));
        }
        let cfg_path = opt.config.clone().unwrap_or_else(|| dir.join("config.json"));
        let mut config = Config::from_file(&cfg_path)?;
        config.visual.image_size = o.image_size;
        // int4 weights are stored as compiled from the checkpoint: its
        // quantization_config (copied with config.json) still describes them.
        let quant = crate::quant::QuantConfig::from_config_file(&cfg_path)?;
        crate::quant::QuantConfig::check(quant.as_ref(), &art.weights)?;
        let gen_path = dir.join("generation_config.json");
        let generation =
            if gen_path.exists() { GenerationConfig::from_file(&gen_path)? } else { GenerationConfig::default() };
        let tokenizer = QwenTokenizer::from_file(&dir.join("qwen.tiktoken"))?;
        if tokenizer.n_vocab() > config.vocab_size {
            return Err(ModelError::VocabMismatch { tok: tokenizer.n_vocab(), vocab: config.vocab_size });
        }
        let Artifact { manifest, weights, .. } = art;
        Ok(Model {
            config,
            generation,
            weights,
            tokenizer,
            dir: dir.to_path_buf(),
            vit_pos: vec![],
            pool_pos_k: vec![],
            vit_attention,
            compiled: Some(manifest),
        })
    }

    /// A GPU executor for this model on `dev` (the PTX emulator or a CUDA
    /// device), with a device KV cache for `slots` sequences of `max_seq`
    /// rows. An artifact's own settings win: its `--max-seq` and
    /// `--max-batch` size the cache, and its PTX (with the cubin, when it was
    /// assembled for this device's target) is loaded instead of generating
    /// the kernels again. From a checkpoint the kernels are generated on
    /// first use.
    pub fn gpu_backend(
        &self,
        dev: Box<dyn qvc_runtime::gpu::Device>,
        slots: usize,
        max_seq: usize,
    ) -> Result<qvc_runtime::gpu::GpuBackend, ModelError> {
        let c = &self.config;
        let (mut slots, mut max_seq, mut module) = (slots, max_seq, None);
        if let Some(m) = &self.compiled {
            if m.options.target == "cpu" {
                return Err(ModelError::Compiled(format!(
                    "{} was compiled for the CPU; compile it again with `--target sm_80` or `--target sm_90` to run it on a GPU",
                    self.dir.display()
                )));
            }
            max_seq = m.options.max_seq;
            slots = slots.max(m.options.max_batch);
            let ptx_path = self.dir.join(qvc_runtime::artifact::PTX);
            // PTX runs on its target and newer GPUs (the driver JITs it);
            // sm_90 PTX on an sm_80 GPU cannot, so its kernels are generated
            // again for the device.
            let usable = m.options.target == dev.target().name() || m.options.target == "sm_80";
            if let Some(ptx) = usable.then(|| std::fs::read_to_string(&ptx_path).ok()).flatten() {
                let target = dev.target().name();
                let cubin = (m.options.target == target)
                    .then(|| std::fs::read(self.dir.join(format!("kernels.{target}.cubin"))).ok())
                    .flatten();
                module = Some((ptx, cubin));
            }
        }
        let kv = qvc_runtime::gpu::lower::KvShape { layers: c.layers, heads: c.heads, head_dim: c.head_dim, max_seq };
        Ok(qvc_runtime::gpu::GpuBackend::new(dev, kv, slots, module))
    }

    /// A graph built from a raw checkpoint, compiled in memory: fusion into
    /// the kernels' fused nodes (GEMM epilogues, SwiGLU, QKV split + rotary,
    /// norm + add), then CSE and DCE. Weight repacking (canonicalisation and
    /// weight folding) needs somewhere to keep the repacked weights, so it
    /// happens only in `qvc compile`. Compiled models' graphs are already
    /// optimised and pass through unchanged.
    pub fn optimized(&self, mut g: qvc_ir::Graph) -> Result<qvc_ir::Graph, ModelError> {
        if self.compiled.is_none() {
            use qvc_ir::passes::{run_pipeline, Cse, Dce, Fuse, Pass};
            let passes: [&dyn Pass; 3] = [&Fuse, &Cse, &Dce];
            run_pipeline(&mut g, &passes)?;
        }
        Ok(g)
    }

    /// Sequences one batched decode step may hold on the CPU with every
    /// row bit for bit the sequence decoded alone
    /// ([`qvc_runtime::cpu_decode_group`] over the decoder's Linears and the
    /// lm_head: 16 where bf16 weights decode on AMX tiles, under either
    /// `--cpu-math` in a process that declares batched decode
    /// (`qvc_kernels::gemm::set_batched_decode`), else
    /// [`qvc_runtime::DECODE_BATCH_INVARIANT_MAX`]). A scheduler splits
    /// larger batches into groups of this many.
    pub fn cpu_decode_group(&self) -> usize {
        let mut names = self.weights.names();
        names.extend(self.weights.q4_names());
        qvc_runtime::cpu_decode_group(names.into_iter().filter_map(|n| {
            let (dtype, shape) = self.weights.info(n)?;
            let gemm = n.starts_with("transformer.h.") || n == "lm_head.weight";
            (gemm && shape.rank() == 2).then(|| (dtype, shape.dim(1)))
        }))
    }

    /// The artifact's manifest when this model was loaded from `qvc compile` output.
    pub fn compiled(&self) -> Option<&Manifest> {
        self.compiled.as_ref()
    }

    /// The compiled program of `kind` ("prefill" or "decode") with the
    /// smallest bucket that holds `tokens` new tokens, `past` cached ones and
    /// `image_rows` feature rows (a prefill bucket of T tokens holds as many
    /// as T tokens can: [`crate::graphs::max_image_rows`]).
    fn bucket(&self, kind: &str, tokens: usize, past: usize, image_rows: usize) -> Result<&Program, ModelError> {
        self.bucket_batch(kind, tokens, past, image_rows, 1)
    }

    fn bucket_batch(
        &self,
        kind: &str,
        tokens: usize,
        past: usize,
        image_rows: usize,
        batch: usize,
    ) -> Result<&Program, ModelError> {
        let m = self.compiled.as_ref().ok_or_else(|| ModelError::Compiled("not a compiled model".into()))?;
        m.programs
            .values()
            .filter(|p| {
                p.kind == kind && p.tokens >= tokens && p.past >= past && p.image_rows >= image_rows && p.batch == batch
            })
            .min_by_key(|p| (p.tokens, p.past, p.image_rows))
            .ok_or_else(|| {
                ModelError::Compiled(format!(
                    "{} has no {kind} program for {tokens} new tokens after {past} cached ones with {image_rows} \
                     image feature rows and {batch} sequence(s) (compiled with --max-seq {}, --max-batch {}); \
                     compile again with larger limits",
                    self.dir.display(),
                    m.options.max_seq,
                    m.options.max_batch
                ))
            })
    }

    /// The vision program for this model with the given options (their
    /// attention, not the one the model was loaded with).
    pub fn vision_graph(&self, opt: &VisionOptions) -> Result<qvc_ir::Graph, ModelError> {
        opt.attention.validate()?;
        if let Some(m) = &self.compiled {
            if opt.intermediates || opt.attention != self.vit_attention {
                return Err(ModelError::Compiled(
                    "a compiled model has one vision program (no intermediates, its own attention); \
                     use the checkpoint directory for other variants"
                        .into(),
                ));
            }
            let p = m.programs.values().find(|p| p.kind == "vision");
            return p
                .map(|p| p.graph.clone())
                .ok_or_else(|| ModelError::Compiled("the artifact has no vision program".into()));
        }
        Ok(vision_graph(&self.config, &self.weights, self.vit_pos.clone(), self.pool_pos_k.clone(), opt)?)
    }

    /// The options [`Session::encode_image`] builds the vision program with:
    /// the loaded [`LoadOptions::vit_attention`], no intermediates.
    pub fn vision_options(&self) -> VisionOptions {
        VisionOptions { attention: self.vit_attention, ..Default::default() }
    }

    /// The ViT attention chosen at load time.
    pub fn vit_attention(&self) -> VitAttention {
        self.vit_attention
    }

    /// The resized ViT position table (a folded constant).
    pub fn vit_pos_embed(&self) -> &[f32] {
        &self.vit_pos
    }
    /// The resized adapter key position table (a folded constant).
    pub fn pool_pos_embed(&self) -> &[f32] {
        &self.pool_pos_k
    }
}

/// Wall-clock time spent in each phase.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Timings {
    pub vision_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub decode_tokens: usize,
}

impl Timings {
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.decode_ms > 0.0 {
            self.decode_tokens as f64 / (self.decode_ms / 1000.0)
        } else {
            0.0
        }
    }
}

/// What prefill should return besides the last logits.
#[derive(Clone, Debug, Default)]
pub struct PrefillOptions {
    pub all_logits: bool,
    pub hidden: bool,
}

/// Output of [`Session::prefill`]: logits `[rows, vocab]` (one row unless
/// `all_logits`) and any requested hidden states.
#[derive(Debug)]
pub struct PrefillOutput {
    pub logits: Vec<f32>,
    pub hidden: HashMap<String, Vec<f32>>,
}

/// A long step about to start, for progress displays.
#[derive(Clone, Debug)]
pub enum Phase<'a> {
    /// Encoding picture `index` (0-based) of `total`.
    Vision { index: usize, total: usize, path: &'a str },
    /// Running the prompt through the decoder.
    Prefill { tokens: usize },
    /// Prefill finished; tokens follow.
    Decode,
}

/// Sampling inputs of a device-sampled step (see [`Session::step_token`]).
struct DeviceSample {
    temperature: [f32; 1],
    top_p: [f32; 1],
    top_k: [i32; 1],
    u: [f32; 1],
}

/// A progress callback, see [`Session::on_phase`].
pub type PhaseHook<'m> = Box<dyn FnMut(Phase) + 'm>;

/// One conversation's state on one backend.
pub struct Session<'m> {
    pub model: &'m Model,
    backend: &'m dyn Backend,
    cache: KvCache,
    alpha: f64,
    images: HashMap<String, Vec<f32>>,
    image_dir: Option<PathBuf>,
    on_phase: Option<PhaseHook<'m>>,
    /// This conversation's sequence in a device-resident KV cache.
    kv_slot: usize,
    /// The ids whose rows the cache holds.
    ids: Vec<u32>,
    /// Leading cached rows that came from prefills (not decode steps).
    prefilled: usize,
    pub timings: Timings,
}

impl<'m> Session<'m> {
    pub fn new(model: &'m Model, backend: &'m dyn Backend) -> Self {
        let c = &model.config;
        Session {
            model,
            backend,
            cache: KvCache::new(c.layers, c.heads * c.head_dim),
            alpha: 1.0,
            images: HashMap::new(),
            image_dir: None,
            on_phase: None,
            kv_slot: 0,
            ids: Vec::new(),
            prefilled: 0,
            timings: Timings::default(),
        }
    }

    /// Which sequence of the backend's device KV cache this conversation
    /// uses (sessions decoded together need distinct slots; default 0).
    pub fn set_kv_slot(&mut self, slot: usize) {
        self.kv_slot = slot;
    }

    /// Resolve relative image paths in prompts against `dir` instead of the
    /// current directory.
    pub fn set_image_dir(&mut self, dir: &Path) {
        self.image_dir = Some(dir.to_path_buf());
    }

    /// Call `f` before each long step (a spinner, a log line).
    pub fn on_phase(&mut self, f: impl FnMut(Phase) + 'm) {
        self.on_phase = Some(Box::new(f));
    }

    fn phase(&mut self, p: Phase) {
        if let Some(f) = &mut self.on_phase {
            f(p);
        }
    }

    /// Use `features` (`[256, D]`, e.g. computed from pixels decoded
    /// elsewhere) for the picture a prompt names `path`, instead of reading it.
    pub fn provide_image_features(&mut self, path: &str, features: Vec<f32>) {
        self.images.insert(path.to_string(), features);
    }

    /// Tokens in the KV cache.
    pub fn cached_tokens(&self) -> usize {
        self.cache.len()
    }

    /// The NTK alpha chosen at the last prefill.
    pub fn ntk_alpha(&self) -> f64 {
        self.alpha
    }

    /// Image features `[256, D]` for the picture at `path` (relative paths
    /// resolve against the current directory, as in the reference).
    pub fn encode_image(&mut self, path: &str) -> Result<Vec<f32>, ModelError> {
        if let Some(f) = self.images.get(path) {
            return Ok(f.clone());
        }
        let t0 = Instant::now();
        let size = self.model.config.visual.image_size as u32;
        let full = match &self.image_dir {
            Some(d) => d.join(path),
            None => PathBuf::from(path),
        };
        let px = preprocess(&full, size)?;
        self.timings.vision_ms += t0.elapsed().as_secs_f64() * 1e3;
        let f = self.encode_pixels(&px)?;
        self.images.insert(path.to_string(), f.clone());
        Ok(f)
    }

    /// Image features `[256, D]` of preprocessed pixels `[3, S, S]` (see
    /// [`crate::image::preprocess_rgb`]), e.g. of a picture decoded from bytes.
    pub fn encode_pixels(&mut self, pixels: &[f32]) -> Result<Vec<f32>, ModelError> {
        let size = self.model.config.visual.image_size;
        if pixels.len() != 3 * size * size {
            return Err(ModelError::Prompt(format!(
                "preprocessed pixels hold {} floats; the vision tower needs 3 × {size} × {size}",
                pixels.len()
            )));
        }
        let t0 = Instant::now();
        let g = self.model.optimized(self.model.vision_graph(&self.model.vision_options())?)?;
        let inputs = HashMap::from([("pixels".to_string(), InputRef::F32(pixels))]);
        let mut out = self.backend.run(&g, &self.model.weights, &inputs)?;
        let f = out.remove("features").expect("vision graph has a features output");
        self.timings.vision_ms += t0.elapsed().as_secs_f64() * 1e3;
        Ok(f)
    }

    /// Run a whole prompt from an empty cache; returns its logits.
    ///
    /// For the last position's logits alone (the generation path) on a
    /// backend that can attend over cached rows ([`Session::can_extend`]),
    /// the prompt runs in chunks whose boundaries are the absolute multiples
    /// of [`PREFILL_CHUNK`] (see [`Session::extend`]), so `qvc generate` and
    /// the server compute identical numbers. A compiled artifact, and
    /// all-position logits or hidden states, take one prefill of the whole
    /// prompt.
    pub fn prefill(&mut self, ids: &[u32], opt: &PrefillOptions) -> Result<PrefillOutput, ModelError> {
        let cfg = &self.model.config;
        check_prompt(cfg, ids)?;
        // Images: features overwrite positions a+1 .. b-1 of each <img>…</img> span.
        let spans = self.model.tokenizer.image_spans(ids)?;
        let mut feats: Vec<Vec<f32>> = Vec::with_capacity(spans.len());
        for (index, s) in spans.iter().enumerate() {
            if !self.images.contains_key(&s.path) {
                self.phase(Phase::Vision { index, total: spans.len(), path: &s.path });
            }
            feats.push(self.encode_image(&s.path)?);
        }
        let refs: Vec<&[f32]> = feats.iter().map(Vec::as_slice).collect();
        self.phase(Phase::Prefill { tokens: ids.len() });
        self.truncate(0);
        if !opt.all_logits && !opt.hidden && self.can_extend() {
            let mut logits = Vec::new();
            while self.cache.len() < ids.len() {
                let end = chunk_end(self.cache.len(), ids.len(), PREFILL_CHUNK);
                logits = self.extend(ids, end, &refs)?;
            }
            self.phase(Phase::Decode);
            return Ok(PrefillOutput { logits, hidden: HashMap::new() });
        }
        let t0 = Instant::now();
        let (feat_rows, rows) = image_rows(cfg, &spans, &refs, 0, ids.len())?;
        self.alpha = cfg.ntk_alpha(ids.len());
        let shape = DecoderShape {
            tokens: ids.len(),
            past: 0,
            image_rows: rows.len(),
            all_logits: opt.all_logits,
            hidden: opt.hidden,
            bucketed: false,
            batch: 1,
        };
        let mut out = self.run_decoder(ids, &shape, &feat_rows, &rows, None)?;
        self.ids.extend_from_slice(ids);
        self.prefilled = ids.len();
        self.timings.prefill_ms += t0.elapsed().as_secs_f64() * 1e3;
        let logits = out.remove("logits").expect("decoder has logits");
        let hidden = out.into_iter().filter(|(k, _)| k.starts_with("hidden.")).collect();
        self.phase(Phase::Decode);
        Ok(PrefillOutput { logits, hidden })
    }

    /// Whether this session can run a prompt's rows after cached ones
    /// ([`Session::extend`] with a non-empty cache): a model built from a
    /// checkpoint, on any backend (the CPU's host cache, or the GPU
    /// executor's device cache, where the new rows are appended to the
    /// sequence's slot and attend to its cached rows in place). A compiled
    /// artifact (prefill programs are compiled for an empty cache) prefills
    /// a whole prompt at once.
    pub fn can_extend(&self) -> bool {
        self.model.compiled.is_none()
    }

    /// The token ids whose keys and values the cache holds, in order.
    pub fn tokens(&self) -> &[u32] {
        &self.ids
    }

    /// How many leading cached rows were computed by prefills
    /// ([`Session::extend`] from an empty or prefill-only cache), as opposed to
    /// decode steps.
    pub fn prefilled_rows(&self) -> usize {
        self.prefilled
    }

    /// Forget every cached token after the first `len`.
    pub fn truncate(&mut self, len: usize) {
        self.cache.truncate(len);
        self.ids.truncate(len);
        self.prefilled = self.prefilled.min(len);
    }

    /// How many leading tokens of `prompt` this session can keep in its
    /// cache so that running the rest in `chunk`-aligned pieces with
    /// [`Session::extend`] computes bit for bit what a fresh session would:
    /// the common prefix of `prompt` and the cached prefill rows, floored to
    /// a multiple of `chunk`, leaving at least one token to run, and 0 unless
    /// the NTK alpha of `prompt` equals the cached one (and the backend can
    /// extend at all). `chunk` must be the chunk the cached rows were
    /// prefilled with. The caller must also make sure any picture whose span
    /// lies in the kept prefix is the same picture (the span holds only its name).
    pub fn reusable_prefix(&self, prompt: &[u32], chunk: usize) -> usize {
        if chunk == 0 || !self.can_extend() || self.ids.is_empty() {
            return 0;
        }
        if self.alpha != self.model.config.ntk_alpha(prompt.len()) {
            return 0;
        }
        let common = self.ids[..self.prefilled].iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let n = common.min(prompt.len().saturating_sub(1));
        n / chunk * chunk
    }

    /// Run the rows `cached_tokens()..end` of `prompt` with the cached rows as
    /// past (a chunk of a prefill), returning the logits of row `end - 1`. The
    /// cache must hold exactly `prompt[..cached_tokens()]`. `features` holds the
    /// `[256, D]` features of every image span of `prompt`, in order; the rows
    /// of the spans that fall in this chunk are written over the embeddings
    /// (a span may straddle chunk boundaries). From an empty cache the NTK
    /// alpha is chosen from the whole prompt's length; later chunks require
    /// the same alpha. Without [`Session::can_extend`] only one chunk from an
    /// empty cache to the end of the prompt is accepted.
    pub fn extend(&mut self, prompt: &[u32], end: usize, features: &[&[f32]]) -> Result<Vec<f32>, ModelError> {
        let cfg = &self.model.config;
        let past = self.cache.len();
        check_prompt(cfg, prompt)?;
        if end <= past || end > prompt.len() {
            return Err(ModelError::Prompt(format!(
                "extend to row {end} of a {}-token prompt with {past} cached rows: nothing to run",
                prompt.len()
            )));
        }
        if prompt[..past] != self.ids[..] {
            return Err(ModelError::Prompt(format!(
                "the prompt does not start with the {past} tokens in the KV cache; truncate the cache first"
            )));
        }
        if !self.can_extend() && (past > 0 || end != prompt.len()) {
            return Err(ModelError::Compiled(format!(
                "this {} prefills a whole prompt at once from an empty cache;                  it cannot run rows {past}..{end} of {}",
                if self.model.compiled.is_some() { "compiled model" } else { "backend" },
                prompt.len()
            )));
        }
        let alpha = cfg.ntk_alpha(prompt.len());
        if past > 0 && alpha != self.alpha {
            return Err(ModelError::Prompt(format!(
                "the cached rows were computed with NTK alpha {} but a {}-token prompt needs {alpha};                  truncate the cache to 0 and prefill again",
                self.alpha,
                prompt.len()
            )));
        }
        let spans = self.model.tokenizer.image_spans(prompt)?;
        if spans.len() != features.len() {
            return Err(ModelError::Prompt(format!(
                "the prompt has {} image span(s) but {} feature block(s) were given",
                spans.len(),
                features.len()
            )));
        }
        let t0 = Instant::now();
        let (feat_rows, rows) = image_rows(cfg, &spans, features, past, end)?;
        self.alpha = alpha;
        let shape = DecoderShape { tokens: end - past, past, image_rows: rows.len(), ..Default::default() };
        let mut out = self.run_decoder(&prompt[past..end], &shape, &feat_rows, &rows, None)?;
        if self.prefilled == past {
            self.prefilled = end;
        }
        self.ids.extend_from_slice(&prompt[past..end]);
        self.timings.prefill_ms += t0.elapsed().as_secs_f64() * 1e3;
        Ok(out.remove("logits").expect("decoder has logits"))
    }

    /// Feed one token after a prefill; returns its logits.
    pub fn step(&mut self, id: u32) -> Result<Vec<f32>, ModelError> {
        self.check_step(id)?;
        let t0 = Instant::now();
        let shape = DecoderShape { tokens: 1, past: self.cache.len(), ..Default::default() };
        let mut out = self.run_decoder(&[id], &shape, &[], &[], None)?;
        self.ids.push(id);
        self.timings.decode_ms += t0.elapsed().as_secs_f64() * 1e3;
        self.timings.decode_tokens += 1;
        Ok(out.remove("logits").expect("decoder has logits"))
    }

    /// Feed one token and let the backend pick the next one on its device,
    /// so only the id leaves it (the logits stay there). `u` is the uniform
    /// draw for sampling (ignored when greedy). `None` when the backend
    /// cannot, or when the settings need the whole logits on the host (a
    /// repetition penalty): then call [`Session::step`] and sample there.
    pub fn step_token(&mut self, id: u32, p: &SamplingParams, u: f64) -> Result<Option<u32>, ModelError> {
        if !self.backend.samples_on_device() || p.repetition_penalty != 1.0 {
            return Ok(None);
        }
        self.check_step(id)?;
        let t0 = Instant::now();
        let shape = DecoderShape { tokens: 1, past: self.cache.len(), ..Default::default() };
        let d = DeviceSample {
            temperature: [if p.is_greedy() { 0.0 } else { p.temperature }],
            top_p: [p.top_p],
            top_k: [p.top_k.min(i32::MAX as usize) as i32],
            u: [u as f32],
        };
        let out = self.run_decoder(&[id], &shape, &[], &[], Some(&d))?;
        self.ids.push(id);
        self.timings.decode_ms += t0.elapsed().as_secs_f64() * 1e3;
        self.timings.decode_tokens += 1;
        let tok = out
            .get("token")
            .and_then(|t| t.first())
            .ok_or_else(|| ModelError::Compiled("the backend returned no token for a device-sampled step".into()))?;
        Ok(Some(*tok as u32))
    }

    /// Whether `id` can be fed as the next token of this conversation.
    fn check_step(&self, id: u32) -> Result<(), ModelError> {
        if self.cache.is_empty() {
            return Err(ModelError::Prompt("decode step without a prefill".into()));
        }
        if self.cache.len() + 1 > MAX_CONTEXT {
            return Err(ModelError::Prompt(format!(
                "the conversation reached {MAX_CONTEXT} tokens, the most qvc accepts"
            )));
        }
        if id as usize >= self.model.config.vocab_size {
            return Err(ModelError::Prompt(format!("token id {id} is outside the vocabulary")));
        }
        Ok(())
    }

    /// Runs one decoder step: a prompt (`past` 0) or one token after the cache.
    /// From a checkpoint the graph is built for the exact shape (and fused);
    /// from an artifact the smallest shape bucket is picked and the step padded
    /// into it (ids at the end, rotary and logn tables for the whole bucket,
    /// the KV cache as a padded bucket with its real length). Either way only
    /// the real rows of the new keys and values join the cache.
    fn run_decoder(
        &mut self,
        ids: &[u32],
        shape: &DecoderShape,
        feats: &[f32],
        rows: &[i32],
        sample: Option<&DeviceSample>,
    ) -> Result<HashMap<String, Vec<f32>>, ModelError> {
        let model = self.model;
        let cfg = &model.config;
        let (n, past) = (ids.len(), shape.past);
        let built;
        let (graph, tb, pb) = if model.compiled.is_some() {
            if shape.all_logits || shape.hidden {
                return Err(ModelError::Compiled(
                    "a compiled model returns the last position's logits only; use the checkpoint directory for \
                     all-position logits or hidden states"
                        .into(),
                ));
            }
            let kind = if past == 0 { "prefill" } else { "decode" };
            let prog = model.bucket(kind, n, past, rows.len())?;
            (&prog.graph, prog.tokens, prog.past)
        } else {
            built = model.optimized(decoder_graph(cfg, &model.weights, shape)?)?;
            (&built, n, past)
        };
        let mut ids_i: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        ids_i.resize(tb, 0);
        let (cos, sin) = rope_tables(cfg, self.alpha, past, tb);
        let logn = logn_scales(cfg, past, tb);
        // Read only by bucketed programs (graphs ignore inputs they do not declare).
        let last = [n as i32 - 1];
        let past_len = [past as f32];
        let names: Vec<(String, String)> =
            (0..cfg.layers).map(|i| (format!("past_k.{i}"), format!("past_v.{i}"))).collect();
        let on_device = self.backend.kv_on_device();
        let slot = [self.kv_slot as i32];
        if !on_device {
            self.cache.reserve_rows(pb);
        }
        let mut inputs: HashMap<String, InputRef> = HashMap::from([
            ("ids".to_string(), InputRef::I32(&ids_i)),
            ("rope_cos".to_string(), InputRef::F32(&cos)),
            ("rope_sin".to_string(), InputRef::F32(&sin)),
            ("logn".to_string(), InputRef::F32(&logn)),
            ("last_index".to_string(), InputRef::I32(&last)),
            ("past_len".to_string(), InputRef::F32(&past_len)),
        ]);
        // A bucketed program holds more feature rows than the step has: the
        // rest are NO_ROW (written nowhere).
        let image = image_inputs(graph, cfg.hidden_size, feats, rows)?;
        if let Some(im) = &image {
            inputs.insert("image_features".into(), InputRef::F32(&im.features));
            inputs.insert("image_rows".into(), InputRef::I32(&im.rows));
        }
        if let Some(d) = sample {
            inputs.insert("sample.temperature".into(), InputRef::F32(&d.temperature));
            inputs.insert("sample.top_p".into(), InputRef::F32(&d.top_p));
            inputs.insert("sample.top_k".into(), InputRef::I32(&d.top_k));
            inputs.insert("sample.u".into(), InputRef::F32(&d.u));
        }
        if on_device {
            inputs.insert("kv_slot".into(), InputRef::I32(&slot));
        } else if pb > 0 {
            for (i, (kn, vn)) in names.iter().enumerate() {
                let (k, v) = self.cache.bucket(i, pb);
                inputs.insert(kn.clone(), InputRef::F32(k));
                inputs.insert(vn.clone(), InputRef::F32(v));
            }
        }
        let mut out = self.backend.run(graph, &model.weights, &inputs)?;
        if on_device {
            self.cache.advance(n);
            return Ok(out);
        }
        let row = cfg.heads * cfg.head_dim;
        for i in 0..cfg.layers {
            let k = out.remove(&format!("k.{i}")).expect("decoder outputs k");
            let v = out.remove(&format!("v.{i}")).expect("decoder outputs v");
            self.cache.append(i, &k[..n * row], &v[..n * row]);
        }
        self.cache.commit(n);
        Ok(out)
    }
}

/// Decode one token for each of several sessions in one program run, so the
/// weights are read once for all of them (decode is bound by reading the
/// weights: batching multiplies tokens per second). The sessions must share
/// one model and backend; each keeps its own KV cache and NTK alpha, and their
/// caches may hold different lengths. The sessions need not be neighbours in
/// memory (e.g. the active ones among a scheduler's slots); on a backend with
/// a device KV cache they need distinct KV slots. Returns each session's
/// logits, in order.
pub fn step_batch(sessions: &mut [&mut Session<'_>], ids: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
    let n = sessions.len();
    if n == 0 || n != ids.len() {
        return Err(ModelError::Prompt(format!("step_batch got {n} sessions and {} tokens", ids.len())));
    }
    if n == 1 {
        return Ok(vec![sessions[0].step(ids[0])?]);
    }
    let (model, backend) = (sessions[0].model, sessions[0].backend);
    let cfg = &model.config;
    for (s, &id) in sessions.iter().zip(ids) {
        if !std::ptr::eq(s.model, model) {
            return Err(ModelError::Prompt("step_batch needs sessions of one model".into()));
        }
        s.check_step(id)?;
    }
    let t0 = Instant::now();
    let lens: Vec<usize> = sessions.iter().map(|s| s.cache.len()).collect();
    let longest = *lens.iter().max().expect("n > 1");
    let built;
    let (graph, pb) = if model.compiled.is_some() {
        let p = model.bucket_batch("decode", 1, longest, 0, n)?;
        (&p.graph, p.past)
    } else {
        let shape = DecoderShape { tokens: 1, past: longest, bucketed: true, batch: n, ..Default::default() };
        built = model.optimized(decoder_graph(cfg, &model.weights, &shape)?)?;
        (&built, longest)
    };
    let on_device = backend.kv_on_device();
    if on_device {
        let mut slots: Vec<usize> = sessions.iter().map(|s| s.kv_slot).collect();
        slots.sort_unstable();
        slots.dedup();
        if slots.len() != n {
            return Err(ModelError::Prompt(
                "sessions decoded together need distinct KV slots (Session::set_kv_slot)".into(),
            ));
        }
    } else {
        for s in sessions.iter_mut() {
            s.cache.reserve_rows(pb);
        }
    }
    let ids_i: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let (mut cos, mut sin, mut logn) = (vec![], vec![], vec![]);
    for (s, &len) in sessions.iter().zip(&lens) {
        let (c, si) = rope_tables(cfg, s.alpha, len, 1);
        cos.extend(c);
        sin.extend(si);
        logn.extend(logn_scales(cfg, len, 1));
    }
    let past_lens: Vec<[f32; 1]> = lens.iter().map(|&l| [l as f32]).collect();
    let mut inputs: HashMap<String, InputRef> = HashMap::from([
        ("ids".to_string(), InputRef::I32(&ids_i)),
        ("rope_cos".to_string(), InputRef::F32(&cos)),
        ("rope_sin".to_string(), InputRef::F32(&sin)),
        ("logn".to_string(), InputRef::F32(&logn)),
    ]);
    let slots: Vec<[i32; 1]> = sessions.iter().map(|s| [s.kv_slot as i32]).collect();
    for (bi, s) in sessions.iter().enumerate() {
        inputs.insert(format!("past_len.{bi}"), InputRef::F32(&past_lens[bi]));
        if on_device {
            inputs.insert(format!("kv_slot.{bi}"), InputRef::I32(&slots[bi]));
            continue;
        }
        for i in 0..cfg.layers {
            let (k, v) = s.cache.bucket(i, pb);
            inputs.insert(format!("past_k.{i}.{bi}"), InputRef::F32(k));
            inputs.insert(format!("past_v.{i}.{bi}"), InputRef::F32(v));
        }
    }
    let mut out = backend.run(graph, &model.weights, &inputs)?;
    let row = cfg.heads * cfg.head_dim;
    for i in 0..cfg.layers {
        if on_device {
            break;
        }
        let k = out.remove(&format!("k.{i}")).expect("decoder outputs k");
        let v = out.remove(&format!("v.{i}")).expect("decoder outputs v");
        for (bi, s) in sessions.iter_mut().enumerate() {
            s.cache.append(i, &k[bi * row..(bi + 1) * row], &v[bi * row..(bi + 1) * row]);
        }
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    for (s, &id) in sessions.iter_mut().zip(ids) {
        s.ids.push(id);
        if on_device {
            s.cache.advance(1);
        } else {
            s.cache.commit(1);
        }
        s.timings.decode_ms += ms;
        s.timings.decode_tokens += 1;
    }
    let logits = out.remove("logits").expect("decoder has logits");
    let v = cfg.vocab_size;
    Ok((0..n).map(|bi| logits[bi * v..(bi + 1) * v].to_vec()).collect())
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    StopToken,
    MaxTokens,
}

/// The result of [`generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    /// New token ids, without the stop token.
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
}

/// Generation settings.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_ids: Vec<u32>,
}

/// Prefill `prompt`, then sample until a stop token or `max_new_tokens`.
/// `on_text` receives the text as it becomes printable (a token that ends
/// inside a multi-byte character is held back until the character completes).
pub fn generate(
    session: &mut Session,
    prompt: &[u32],
    opt: &GenerateOptions,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation, ModelError> {
    let tok = &session.model.tokenizer;
    let mut logits = session.prefill(prompt, &PrefillOptions::default())?.logits;
    let mut rng = Rng::new(opt.sampling.seed);
    let mut seen: Vec<u32> = prompt.to_vec();
    let mut tokens = Vec::new();
    let mut printed = 0usize;
    let mut stop = StopReason::MaxTokens;
    // After the first token, a backend that samples on its device returns
    // the next id directly (`device_next`); otherwise logits come back.
    let mut device_next: Option<u32> = None;
    for n in 0..opt.max_new_tokens {
        let next = match device_next.take() {
            Some(t) => t,
            None => sample(&logits, &seen, &opt.sampling, &mut rng),
        };
        if opt.stop_ids.contains(&next) {
            stop = StopReason::StopToken;
            break;
        }
        tokens.push(next);
        seen.push(next);
        let text = tok.decode(&tokens, false);
        if !text.ends_with('\u{FFFD}') && text.len() > printed {
            on_text(&text[printed..]);
            printed = text.len();
        }
        if n + 1 < opt.max_new_tokens {
            // The same draw the host sampler would take (greedy takes none).
            let u = if opt.sampling.is_greedy() { 0.0 } else { rng.clone().next_f64() };
            match session.step_token(next, &opt.sampling, u)? {
                Some(t) => {
                    if !opt.sampling.is_greedy() {
                        rng.next_f64();
                    }
                    device_next = Some(t);
                }
                None => logits = session.step(next)?,
            }
        }
    }
    let text = tok.decode(&tokens, false);
    if text.len() > printed {
        on_text(&text[printed..]);
    }
    Ok(Generation { tokens, text, stop })
}
