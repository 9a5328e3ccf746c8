//! `qvc bench`: device ceilings, vision latency, time to first token,
//! prefill and decode throughput, each next to its floor, printed as one table.
//!
//! The programs are driven directly (no tokenizer, no [`qvc_model::Session`]):
//! the vision graph on random pixels and the decoder on arbitrary token ids,
//! so a checkpoint, a compiled artifact and a synthetic model (random weights,
//! `--synthetic qwen-vl-chat|tiny`) are measured the same way.
//!
//! Invariants:
//! - graphs are built and optimised (Canonicalize, weight-aware ConstFold,
//!   Fuse, Cse, Dce, as `qvc compile` does) *before* any timing, and one
//!   [`ConstFold`] serves every graph of a run, so folded weight names are
//!   unique and a GPU backend's weight cache (keyed by name) never mixes them;
//! - on a GPU every measured graph has run once before it is timed (the first
//!   run lowers it, loads its kernels and uploads its weights); the executor's
//!   output downloads synchronise, so wall-clock time around a run is valid;
//! - one backend serves all sequences: it is created with `slots = batch`,
//!   and each sequence uses its own KV slot (device cache) or host cache;
//! - floors are `flops / ceiling FLOP/s` (vision, prefill, TTFT; the ceiling
//!   is the measured f32 FMA peak on the CPU, the best GEMM on a GPU) and
//!   `bytes read per decode step / measured read (CPU) or copy (GPU)
//!   bandwidth` (decode); the fraction printed is floor / measured, so 100%
//!   would be the ceiling. No ceiling is computed from a nominal clock;
//! - `--json` prints exactly one JSON object on stdout (the table and the
//!   profile go to stderr), keys documented on [`crate::cmd::bench`].

mod profile;

use crate::device::DeviceChoice;
use anyhow::{bail, Context, Result};
use half::bf16;
use qvc_ir::passes::{run_pipeline, Canonicalize, ConstFold, Cse, Dce, FoldedParam, Fuse, Pass, WithFolded};
use qvc_ir::{DType, Elems, Graph, InputRef, Shape, WeightSource};
use qvc_model::config::Config;
use qvc_model::graphs::{
    decoder_graph, image_inputs, logn_scales, rope_tables, vision_graph, DecoderShape, VisionOptions, VitAttention,
};
use qvc_model::posembed::resize_pos_embed;
use qvc_model::Model;
use qvc_runtime::artifact::Manifest;
use qvc_runtime::gpu::{CudaDevice, Device, EmuDevice, GpuBackend, KArg};
use qvc_runtime::{Backend, Cpu, KvCache, WeightStore};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// NVIDIA's H100 SXM datasheet figures, printed next to the measured ceilings.
pub const H100_DATASHEET_BF16_TFLOPS: f64 = 989.0;
pub const H100_DATASHEET_TBS: f64 = 3.35;

/// A model with published shapes and random weights (`--synthetic`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Synthetic {
    /// Qwen-VL-Chat's full shapes (9.6 B params, 19 GB of bf16).
    QwenVlChat,
    /// The test fixture's shapes (hidden 128, two layers each side) with a
    /// 4096-token vocabulary instead of 151936: there is no tokenizer to
    /// match, and the emulator then runs the whole bench in seconds.
    Tiny,
}

/// Why `qvc bench` refused to start (the user's flags, not a failure).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("--synthetic {0:?}: the synthetic models are qwen-vl-chat (Qwen-VL-Chat's widths) and tiny (the fixture's shapes)")]
    UnknownSynthetic(String),
    #[error("--synthetic qwen-vl-chat on the {0}: 19 GB of random weights is not a benchmark there; use --device cuda (or --synthetic tiny to check the pipeline)")]
    TooBig(&'static str),
    #[error(
        "--synthetic qwen-vl-chat on the CPU needs --vit-layers N and --llm-layers M: all 48 ViT and 32 decoder \
             layers are 19 GB of random weights; a slice at the real widths times the same shapes, e.g. \
             --vit-layers 4 --llm-layers 2 is ~{example_gb:.1} GB (each ViT layer ~{vit_gb:.2} GB, each decoder layer \
             ~{llm_gb:.2} GB, plus ~{fixed_gb:.1} GB for the embedding, lm_head and working memory)"
    )]
    NeedLayers { example_gb: f64, vit_gb: f64, llm_gb: f64, fixed_gb: f64 },
    #[error(
        "--synthetic {name} with {vit} ViT and {llm} decoder layers needs ~{need_gb:.1} GB but this machine has \
             {avail_gb:.1} GB available (MemAvailable in /proc/meminfo); give fewer layers"
    )]
    TooMuchMemory { name: &'static str, vit: usize, llm: usize, need_gb: f64, avail_gb: f64 },
    #[error("--{flag} {n}: the synthetic {name} has {max} such layers")]
    TooManyLayers { flag: &'static str, n: usize, name: &'static str, max: usize },
    #[error("--vit-layers and --llm-layers shape a --synthetic model; a checkpoint or artifact is timed whole")]
    LayersWithoutSynthetic,
    #[error("give a model (a checkpoint or a compiled artifact) or --synthetic, not both")]
    ModelAndSynthetic,
    #[error("nothing to bench: give a model (a checkpoint directory or OUT.qvc) or --synthetic qwen-vl-chat|tiny")]
    NoModel,
    #[error("--image-sizes applies to --synthetic and to checkpoints; {0} was compiled for {1}-pixel images only")]
    CompiledImageSize(String, usize),
}

impl Synthetic {
    pub fn parse(name: &str) -> Result<Synthetic, BenchError> {
        match name {
            "qwen-vl-chat" => Ok(Synthetic::QwenVlChat),
            "tiny" => Ok(Synthetic::Tiny),
            other => Err(BenchError::UnknownSynthetic(other.into())),
        }
    }

    pub fn config(self) -> Config {
        match self {
            Synthetic::QwenVlChat => crate::compile::qwen_vl_chat_config(),
            Synthetic::Tiny => {
                // ../shared/fixtures/tiny-qwen-vl/config.json's values, but the vocabulary.
                let v = serde_json::json!({
                    "hidden_size": 128, "num_attention_heads": 4, "kv_channels": 32, "num_hidden_layers": 2,
                    "intermediate_size": 688, "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000,
                    "rotary_pct": 1.0, "seq_length": 2048, "use_dynamic_ntk": true, "use_logn_attn": true,
                    "vocab_size": 4096,
                    "visual": {"heads": 4, "image_size": 448, "image_start_id": 4000, "layers": 2,
                               "mlp_ratio": 4.9231, "output_dim": 128, "patch_size": 14, "width": 64}
                });
                Config::from_json(&v, Path::new("synthetic:tiny")).expect("the built-in config is valid")
            }
        }
    }

    /// [`Synthetic::config`] with only `vit` ViT and `llm` decoder layers
    /// (each `None` keeps the model's count); every width stays the model's.
    pub fn config_layers(self, vit: Option<usize>, llm: Option<usize>) -> Result<Config, BenchError> {
        let mut cfg = self.config();
        for (flag, n, have) in [("vit-layers", vit, &mut cfg.visual.layers), ("llm-layers", llm, &mut cfg.layers)] {
            match n {
                Some(n) if n > *have => {
                    return Err(BenchError::TooManyLayers { flag, n, name: self.name(), max: *have });
                }
                Some(n) => *have = n,
                None => {}
            }
        }
        Ok(cfg)
    }

    pub fn name(self) -> &'static str {
        match self {
            Synthetic::QwenVlChat => "qwen-vl-chat",
            Synthetic::Tiny => "tiny",
        }
    }
}

/// Random bf16 weights for every tensor a config's graphs read: N(0, 0.02)
/// (Irwin–Hall of four 16-bit uniforms), norm weights 1 + N(0, 0.02), biases
/// N(0, 0.002), so activations stay finite through every layer. Deterministic
/// in the seed; generated on the host, in parallel. With [`SynthQuant`] the
/// chosen Linears are random GPTQ int4 instead (uniform nibbles, zero 8,
/// groups of [`SYNTH_GROUP`], scales giving the same spread), as
/// Qwen-VL-Chat-Int4 stores them.
pub struct SyntheticWeights {
    tensors: HashMap<String, Vec<bf16>>,
    q4: HashMap<String, SynthQ4>,
}

/// Group size of synthetic int4 weights (Qwen-VL-Chat-Int4's).
pub const SYNTH_GROUP: usize = 128;

/// Which Linears of a synthetic model are int4 (`qvc bench --int4`,
/// `--int4-lm-head`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynthQuant {
    /// The decoder's c_attn, c_proj, w1, w2 and MLP c_proj.
    pub decoder: bool,
    /// lm_head too (GPTQModel's `lm_head: true`).
    pub lm_head: bool,
}

impl SynthQuant {
    /// Whether tensor `name` is int4.
    pub fn is_q4(&self, name: &str) -> bool {
        let linear =
            [".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.w1.weight", ".mlp.w2.weight", ".mlp.c_proj.weight"];
        (self.decoder && name.starts_with("transformer.h.") && linear.iter().any(|l| name.ends_with(l)))
            || (self.lm_head && name == "lm_head.weight")
    }
    /// Bytes of an `[out, inp]` int4 weight: nibbles, f16 scales, packed zeros.
    fn bytes(out: usize, inp: usize) -> u64 {
        let groups = inp.div_ceil(SYNTH_GROUP) as u64;
        (out * inp / 2) as u64 + groups * out as u64 * 2 + groups * out as u64 / 2
    }
}

/// One random int4 Linear `[out, inp]` in GPTQ v1 storage, its words
/// regrouped as the checkpoint loader regroups them for the CPU.
struct SynthQ4 {
    out: usize,
    inp: usize,
    qweight: Vec<u32>,
    words: qvc_ir::Q4Words,
    qzeros: Vec<u32>,
    scales: Vec<half::f16>,
}

impl SynthQ4 {
    fn view(&self) -> qvc_ir::Q4Ref<'_> {
        let group = SYNTH_GROUP.min(self.inp);
        let q = qvc_ir::Q4Ref::whole(self.out, self.inp, group, &self.qweight, &self.qzeros, &self.scales, None);
        qvc_ir::Q4Ref { words: self.words, ..q }
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

impl SyntheticWeights {
    pub fn generate(cfg: &Config, seed: u64, quant: SynthQuant) -> SyntheticWeights {
        const CHUNK: usize = 1 << 16;
        let (quantized, float): (Vec<_>, Vec<_>) =
            cfg.expected_tensors().into_iter().partition(|(name, _)| quant.is_q4(name));
        let q4 = quantized
            .into_iter()
            .map(|(name, shape)| {
                let (out, inp) = (shape[0], shape[1]);
                let groups = inp.div_ceil(SYNTH_GROUP);
                let base = splitmix(seed ^ fnv(&name));
                let mut qweight = qvc_kernels::pages::huge_vec(inp / 8 * out, 0u32);
                qweight.par_chunks_mut(CHUNK).enumerate().for_each(|(c, words)| {
                    let mut s = splitmix(base ^ (c as u64).wrapping_mul(0xA24B_AED4_963E_E407));
                    for w in words {
                        s = splitmix(s);
                        *w = s as u32;
                    }
                });
                // Uniform nibbles around zero 8 have a standard deviation of
                // 4.6 steps: this scale gives the float weights' 0.02.
                let scale = half::f16::from_f32(0.02 / 4.6);
                let mut q = SynthQ4 {
                    out,
                    inp,
                    qweight,
                    words: qvc_ir::Q4Words::Gptq,
                    qzeros: vec![0x7777_7777; groups * out / 8],
                    scales: vec![scale; groups * out],
                };
                // What `WeightStore` does with a checkpoint's int4 weights.
                if let Some(t) = qvc_kernels::q4::tile_words(&q.view()) {
                    (q.qweight, q.words) = (t, qvc_ir::Q4Words::Tiled);
                }
                (name, q)
            })
            .collect();
        let tensors = float
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let last = name.rsplit('.').next().unwrap_or_default();
                let norm = name.split('.').any(|p| p.starts_with("ln")) && last == "weight";
                let (mean, std) = match (norm, last) {
                    (true, _) => (1.0f32, 0.02f32),
                    (false, "bias") => (0.0, 0.002),
                    _ => (0.0, 0.02),
                };
                // sqrt(3): four U(0,1) sum to variance 1/3.
                let scale = std * 3f32.sqrt();
                let base = splitmix(seed ^ fnv(&name));
                let mut v = qvc_kernels::pages::huge_vec(n, bf16::ZERO);
                v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
                    let mut s = splitmix(base ^ (c as u64).wrapping_mul(0xA24B_AED4_963E_E407));
                    for x in out {
                        s = splitmix(s);
                        let u = (s & 0xFFFF) + ((s >> 16) & 0xFFFF) + ((s >> 32) & 0xFFFF) + (s >> 48);
                        let z = u as f32 / 65536.0 - 2.0;
                        *x = bf16::from_f32(mean + scale * z);
                    }
                });
                (name, v)
            })
            .collect();
        SyntheticWeights { tensors, q4 }
    }

    pub fn bytes(&self) -> u64 {
        let q4: u64 = self.q4.values().map(|q| SynthQuant::bytes(q.out, q.inp)).sum();
        self.tensors.values().map(|v| v.len() as u64 * 2).sum::<u64>() + q4
    }

    /// Bytes [`SyntheticWeights::generate`] allocates for `cfg` (bf16, int4 where `quant` says).
    pub fn bytes_for(cfg: &Config, quant: SynthQuant) -> u64 {
        cfg.expected_tensors()
            .iter()
            .map(
                |(n, s)| {
                    if quant.is_q4(n) {
                        SynthQuant::bytes(s[0], s[1])
                    } else {
                        s.iter().product::<usize>() as u64 * 2
                    }
                },
            )
            .sum()
    }

    /// The shapes (bf16, or q4 where `quant` says) the graph builders read.
    pub fn shapes(cfg: &Config, quant: SynthQuant) -> WeightStore {
        WeightStore::shapes_only(cfg.expected_tensors().into_iter().map(|(n, s)| {
            let dtype = if quant.is_q4(&n) { DType::Q4 } else { DType::BF16 };
            (n, dtype, Shape::new(s))
        }))
    }
}

impl WeightSource for SyntheticWeights {
    fn weight(&self, name: &str) -> Option<Elems<'_>> {
        if let Some(q) = self.q4.get(name) {
            return Some(Elems::Q4(q.view()));
        }
        self.tensors.get(name).map(|v| Elems::BF16(v))
    }
}

/// Bytes of weights a decode step of `seqs` sequences reads: every decoder
/// tensor once in its stored format (int4 at its real size), the token
/// embedding only its rows. `elem16`: the 16-bit size a GPU stores float
/// weights in (`None`: as stored).
fn step_weight_bytes(cfg: &Config, w: &dyn WeightSource, elem16: Option<usize>, seqs: usize) -> f64 {
    let h = cfg.hidden_size;
    let mut bytes = 0usize;
    for (name, shape) in cfg.expected_tensors() {
        if name.starts_with("transformer.visual.") {
            continue;
        }
        let numel: usize = shape.iter().product();
        let (numel, per) = match w.weight(&name) {
            Some(Elems::Q4(q)) => (1, q.bytes()),
            Some(e) => (numel, elem16.unwrap_or(e.dtype().size())),
            None => (numel, elem16.unwrap_or(2)),
        };
        bytes += if name == "transformer.wte.weight" { seqs * h * per } else { numel * per };
    }
    bytes as f64
}

/// What `qvc bench` measures.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// `--device`: cpu, cuda, cuda:N, emu or auto.
    pub device: String,
    /// Prompt length of the prefill measurement.
    pub prompt_len: usize,
    /// Decode steps timed (batch 1, and per sequence in the batch).
    pub decode_tokens: usize,
    /// Sequences decoded together [default: 8 on a GPU, 1 elsewhere].
    pub batch: Option<usize>,
    /// Vision sizes for `--synthetic` and checkpoints [default: 448 and 896
    /// for synthetic models, the model's own size otherwise].
    pub image_sizes: Vec<usize>,
    /// Per-kernel profile of one vision run, one prefill and one decode step.
    pub profile: bool,
    /// Print one JSON object on stdout (the table goes to stderr).
    pub json: bool,
    /// `--vit-layers`, `--llm-layers`: a synthetic model's depth (`None`:
    /// the model's own).
    pub vit_layers: Option<usize>,
    pub llm_layers: Option<usize>,
    /// `--repeat`: vision, time to first token and prefill are each the best
    /// of this many runs [default: 3 on a GPU, 1 elsewhere].
    pub repeat: Option<usize>,
    /// `--int4`, `--int4-lm-head`: a synthetic model's int4 Linears.
    pub int4: SynthQuant,
}

/// Memory a CPU bench of `cfg` with random weights needs, in bytes: the
/// weights, the repacked copies weight folding makes (the ViT's per-head
/// interleaved QKV made contiguous, the adapter's in_proj split, the patch
/// kernel), and working memory (activations of an 896-pixel picture, the
/// ceilings' test matrices, the host KV cache, the program's buffers).
pub fn synthetic_cpu_bytes(cfg: &Config, quant: SynthQuant) -> u64 {
    // The peak RSS of `--vit-layers 4 --llm-layers 2` at 448 and 896 pixels
    // was 5.26 GB for 3.79 GB of weights: 1.47 GB of folds and working
    // memory, of which the folds are ~0.12 GB.
    const WORKING: u64 = 3 << 29;
    let v = &cfg.visual;
    let folds =
        v.layers * 3 * v.width * v.width + 3 * v.output_dim * v.output_dim + v.width * 3 * v.patch_size * v.patch_size;
    SyntheticWeights::bytes_for(cfg, quant) + 2 * folds as u64 + WORKING
}

/// `MemAvailable` of `/proc/meminfo` in bytes (`None` where there is none).
fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Refuses a CPU bench of `synthetic` that cannot be a benchmark here: the
/// full-depth qwen-vl-chat (no layer counts given), or more than the memory
/// available (`avail` bytes; `None`: unknown, not checked).
pub fn check_cpu_synthetic(
    synthetic: Synthetic,
    cfg: &Config,
    opt: &BenchOptions,
    avail: Option<u64>,
) -> Result<(), BenchError> {
    let gb = |b: u64| b as f64 / 1e9;
    if synthetic == Synthetic::QwenVlChat && (opt.vit_layers.is_none() || opt.llm_layers.is_none()) {
        let full = synthetic.config();
        let sized = |vit, llm| {
            let mut c = full.clone();
            c.visual.layers = vit;
            c.layers = llm;
            synthetic_cpu_bytes(&c, opt.int4)
        };
        let fixed = sized(0, 0);
        return Err(BenchError::NeedLayers {
            example_gb: gb(sized(4, 2)),
            vit_gb: gb(sized(1, 0) - fixed),
            llm_gb: gb(sized(0, 1) - fixed),
            fixed_gb: gb(fixed),
        });
    }
    let need = synthetic_cpu_bytes(cfg, opt.int4);
    match avail {
        Some(avail) if need > avail => Err(BenchError::TooMuchMemory {
            name: synthetic.name(),
            vit: cfg.visual.layers,
            llm: cfg.layers,
            need_gb: gb(need),
            avail_gb: gb(avail),
        }),
        _ => Ok(()),
    }
}

/// Tokens of the time-to-first-token prompt around the picture: a system
/// prompt and a 20-word question (~30 tokens) plus `<img>` `</img>`.
const TTFT_TEXT_TOKENS: usize = 32;

/// Where the bench runs, resolved from `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Where {
    Cpu,
    Cuda(usize),
    Emu,
}

impl Where {
    fn label(self) -> String {
        match self {
            Where::Cpu => "cpu".into(),
            Where::Cuda(n) => format!("cuda:{n}"),
            Where::Emu => "emu".into(),
        }
    }
}

fn resolve(device: &str, cpu_artifact: bool) -> Result<Where> {
    Ok(match DeviceChoice::parse(device)? {
        DeviceChoice::Cpu => Where::Cpu,
        DeviceChoice::Emu => Where::Emu,
        DeviceChoice::Cuda(n) => Where::Cuda(n),
        // The bench measures the GPU whenever one can run the model.
        DeviceChoice::Auto => match qvc_runtime::cuda::gpus() {
            Ok(g) if !cpu_artifact && g.first().and_then(|g| g.target()).is_some() => Where::Cuda(0),
            _ => Where::Cpu,
        },
    })
}

/// Measured ceilings of the machine.
struct Ceilings {
    /// FLOP/s the floors divide by: the measured FMA peak on the CPU (the
    /// bf16 peak under `--cpu-math fast`, AMX `tdpbf16ps` or `vdpbf16ps`,
    /// whichever the GEMMs run on; a third of the AMX peak for exact GEMMs
    /// on the tiles),
    /// the best GEMM on a GPU.
    flops: f64,
    /// Which ceiling `flops` is, for `--json` (`ceilings.gemm_peak_of`):
    /// `fma`, `amx_tdpbf16ps`, `amx_tdpbf16ps_over_3` (exact on AMX),
    /// `vdpbf16ps` or, on a GPU, `best_gemm`.
    flops_of: &'static str,
    /// Bytes/s the decode floor divides by.
    bytes_per_s: f64,
    /// Table rows describing them.
    rows: Vec<Row>,
    /// The measured f32 FMA peak (CPU only: a GPU's is not measured).
    fma_flops: Option<f64>,
    /// How the FMA peak and the bandwidth were measured.
    fma_how: String,
    bw_how: String,
    /// The best GEMM FLOP/s and every GEMM timed.
    best_gemm_flops: f64,
    gemms: Vec<GemmResult>,
}

/// One timed GEMM of the ceilings.
struct GemmResult {
    label: String,
    m: usize,
    n: usize,
    k: usize,
    gflops: f64,
}

/// One line of the table.
struct Row {
    what: String,
    value: String,
    unit: &'static str,
    floor: String,
    frac: String,
    note: String,
}

impl Row {
    fn text(what: impl Into<String>, note: impl Into<String>) -> Row {
        Row {
            what: what.into(),
            value: String::new(),
            unit: "",
            floor: String::new(),
            frac: String::new(),
            note: note.into(),
        }
    }
    fn num(what: impl Into<String>, value: f64, unit: &'static str, note: impl Into<String>) -> Row {
        Row { value: fmt_num(value), unit, ..Row::text(what, note) }
    }
    /// A fraction (of a ceiling) in the "of floor" column.
    fn of(mut self, fraction: f64) -> Row {
        self.frac = format!("{:.1}%", 100.0 * fraction);
        self
    }
    /// A timing against its floor (both in ms; `None` without ceilings).
    fn timed(mut self, measured_ms: f64, floor_ms: Option<f64>) -> Row {
        if let Some(f) = floor_ms {
            self.floor = format!("{} ms", fmt_num(f));
            self.frac = format!("{:.1}%", 100.0 * f / measured_ms);
        } else {
            self.floor = "n/a".into();
            self.frac = "n/a".into();
        }
        self
    }
}

fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        format!("{x}")
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

fn table(rows: &[Row]) -> String {
    use std::fmt::Write;
    let w = rows.iter().map(|r| r.what.len()).max().unwrap_or(10).max(10);
    let mut out = format!("{:<w$}  {:>12} {:<7} {:>12} {:>8}  note\n", "measure", "value", "unit", "floor", "of floor");
    for r in rows {
        let line = format!("{:<w$}  {:>12} {:<7} {:>12} {:>8}  {}", r.what, r.value, r.unit, r.floor, r.frac, r.note);
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// The CPU's ceilings, measured at the pool's thread count (under 1 s in all):
/// - f32 FMA peak: [`qvc_kernels::peak::fma_loop`] on the path the kernels
///   use ([`qvc_kernels::Isa::detect`]: AVX-512, else AVX2+FMA where the CPU has it, else portable
///   mul/add), run on every rayon thread at once ([`rayon::broadcast`]),
///   wall-clock over all of them, best of 10 runs of ~20 ms after a
///   calibration run;
/// - read bandwidth: a vectorised sum over a 256 MiB buffer (first touched by
///   the pool's threads), best of 12;
/// - the best of qvc's own GEMMs (f32 activations × bf16 weights) at a
///   1024³ reference shape and the model's shapes, best of 3 after a
///   warm-up run, for `gemm_peak_fraction`. The model's shapes keep the rows
///   the model runs them with (the prompt, the picture's patches): the
///   fraction is meant to say how the prefill's and the ViT's GEMMs do, and
///   a cut row count measures something else (64 rows, the cap this
///   replaced, fill the 12-row micro-kernel's last panel a third and
///   amortise each packed weight panel over 5 panels instead of 25, which
///   read 0.78-0.85 where the same GEMMs at 300 rows ran 0.85-0.89). Only
///   beyond [`GEMM_CEILING_FLOP`] per call (a long `--prompt-len`) are rows
///   cut, to a multiple of [`GEMM_CEILING_ROWS`].
fn cpu_ceilings(shapes: &[GemmShape]) -> Ceilings {
    // Best-of counts: the machines sessions share are noisy, and the best of
    // many short runs is the stable estimate of what the hardware can do.
    const FMA_REPS: usize = 10;
    const READ_REPS: usize = 12;
    use qvc_kernels::peak::{bf16_dot_loop, fma_loop};
    use qvc_kernels::Isa;
    let threads = rayon::current_num_threads();
    let isa = Isa::detect();
    let fma_flops = best_loop_rate(FMA_REPS, |iters| fma_loop(isa, iters));
    let isa_name = match isa {
        Isa::Avx512 => "AVX-512F, 24 independent 16-lane FMA chains",
        Isa::Avx2Fma => "AVX2+FMA, 12 independent 8-lane FMA chains",
        Isa::Portable => "portable mul+add, 6 independent 8-lane chains",
    };
    let fma_how =
        format!("measured: {isa_name} per thread, on all {threads} threads at once, best of {FMA_REPS} × 20 ms");

    let bytes_per_s = qvc_kernels::peak::read_bandwidth(&qvc_kernels::peak::read_buffer(), READ_REPS);
    let bw_how = format!("measured: sum over a 256 MiB buffer on {threads} threads, best of {READ_REPS}");

    let mut rows = vec![
        Row::num("ceiling: f32 compute", fma_flops / 1e9, "GFLOP/s", fma_how.clone()),
        Row::num("ceiling: memory read", bytes_per_s / 1e9, "GB/s", bw_how.clone()),
    ];
    // Under `--cpu-math fast` the bf16 GEMMs run on AMX tiles where the CPU has them, else on
    // vdpbf16ps (two products per f32 lane) where that outruns the FMAs, so their ceiling is that
    // instruction's measured rate, not the FMA peak; elsewhere fast runs the exact GEMMs.
    // Exact GEMMs of bf16 weights run on the tiles too where the CPU has AMX, with A split into
    // three bf16 (three tdpbf16ps per f32 × bf16 product), so their ceiling is a third of the
    // tile peak.
    let fast_bf16 = qvc_kernels::cpu_math() == qvc_kernels::CpuMath::Fast && qvc_kernels::gemm::bf16_products_pay();
    let exact_tiles = qvc_kernels::cpu_math() == qvc_kernels::CpuMath::Exact && qvc_kernels::gemm::exact_on_tiles();
    let (gemm_ceiling, gemm_ceiling_name, flops_of) =
        if exact_tiles || (fast_bf16 && qvc_kernels::gemm::amx::available()) {
            let (over, what, name, of) = if exact_tiles {
                (3.0, "exact on tiles", "AMX tdpbf16ps peak / 3", "amx_tdpbf16ps_over_3")
            } else {
                (1.0, "bf16 compute", "AMX tdpbf16ps peak", "amx_tdpbf16ps")
            };
            let dp = best_loop_rate(FMA_REPS, qvc_kernels::gemm::amx::dot_loop) / over;
            let how = if exact_tiles {
                ", over 3 (A split in three bf16; QVC_AMX_EXACT=0 runs the FMAs)"
            } else {
                " (--cpu-math fast)"
            };
            rows.push(Row::num(
                format!("ceiling: {what}"),
                dp / 1e9,
                "GFLOP/s",
                format!(
                    "measured: 4 independent AMX tdpbf16ps (16x16x32) per thread, on all {threads} threads at once, \
                 best of {FMA_REPS} × 20 ms{how}"
                ),
            ));
            (dp, name, of)
        } else if fast_bf16 {
            let dp = best_loop_rate(FMA_REPS, bf16_dot_loop);
            rows.push(Row::num(
                "ceiling: bf16 compute",
                dp / 1e9,
                "GFLOP/s",
                format!(
                    "measured: 24 independent vdpbf16ps chains per thread, on all {threads} threads at once, best of \
                 {FMA_REPS} × 20 ms (--cpu-math fast)"
                ),
            ));
            (dp, "vdpbf16ps peak", "vdpbf16ps")
        } else {
            (fma_flops, "FMA peak", "fma")
        };
    let mut gemms = vec![];
    let mut best_gemm = 0f64;
    for s in shapes {
        let m = ceiling_rows(s);
        let a: Vec<f32> = (0..m * s.k).map(|i| (i * 7919 % 4001) as f32 / 4001.0 - 0.5).collect();
        let w: Vec<bf16> = (0..s.n * s.k).map(|i| bf16::from_f32((i * 104_729 % 3001) as f32 / 3001.0 - 0.5)).collect();
        let mut c = vec![0f32; m * s.n];
        let mut ms = f64::MAX;
        let a_ref = qvc_kernels::MatRef::row_major(Elems::F32(&a), m, s.k);
        let w_ref = qvc_kernels::MatRef::row_major(Elems::BF16(&w), s.n, s.k).transposed();
        // Rows at decode widths run the exact f32 GEMV even under --cpu-math fast.
        let (products, ceiling, ceiling_name) =
            if fast_bf16 && qvc_kernels::gemm::fast_bf16_applies(isa, &a_ref, &w_ref) {
                ("bf16 × bf16 (--cpu-math fast)", gemm_ceiling, gemm_ceiling_name)
            } else if exact_tiles && qvc_kernels::gemm::exact_amx_applies(isa, &a_ref, &w_ref) {
                ("f32 × bf16, A split in three bf16 on AMX", gemm_ceiling, gemm_ceiling_name)
            } else {
                ("f32 × bf16", fma_flops, "FMA peak")
            };
        for rep in 0..4 {
            let t0 = Instant::now();
            qvc_kernels::gemm(a_ref, w_ref, &mut c, false);
            // The first run warms caches and the pool's scratch buffers.
            if rep > 0 {
                ms = ms.min(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        std::hint::black_box(&c);
        let gflops = 2.0 * (m * s.n * s.k) as f64 / (ms * 1e-3) / 1e9;
        best_gemm = best_gemm.max(gflops);
        rows.push(
            Row::num(
                format!("gemm {} {}x{}x{}", s.label, m, s.n, s.k),
                gflops,
                "GFLOP/s",
                format!("{ms:.3} ms, {products} qvc GEMM; of floor = of the {ceiling_name}"),
            )
            .of(gflops / (ceiling / 1e9)),
        );
        gemms.push(GemmResult { label: s.label.clone(), m, n: s.n, k: s.k, gflops });
    }
    Ceilings {
        flops: gemm_ceiling,
        flops_of,
        bytes_per_s,
        rows,
        fma_flops: Some(fma_flops),
        fma_how,
        bw_how,
        best_gemm_flops: best_gemm * 1e9,
        gemms,
    }
}

/// Whether the decoder's Linears are int4 (a GPTQ checkpoint, or `--int4`).
fn decoder_int4(shapes: &WeightStore) -> bool {
    let mut names = shapes.names();
    names.extend(shapes.q4_names());
    names.iter().any(|n| n.starts_with("transformer.h.") && matches!(shapes.info(n), Some((DType::Q4, _))))
}

/// Most flops one ceiling GEMM call may take: a 300-token prefill's
/// c_attn (30 GFLOP) and a 448 picture's ViT GEMMs (up to 28) run whole, in
/// about a second for all shapes on two Zen 5 cores.
const GEMM_CEILING_FLOP: f64 = 32e9;
/// Rows a cut ceiling GEMM is rounded down to a multiple of: whole row
/// panels of every packed micro-kernel (6 rows AVX2/portable, 12 AVX-512).
const GEMM_CEILING_ROWS: usize = 12;

/// Rows a ceiling GEMM of shape `s` runs: `s.m`, or under
/// [`GEMM_CEILING_FLOP`] in whole row panels (at least one).
fn ceiling_rows(s: &GemmShape) -> usize {
    let fit = (GEMM_CEILING_FLOP / (2.0 * (s.n * s.k).max(1) as f64)) as usize;
    if s.m <= fit {
        s.m
    } else {
        (fit / GEMM_CEILING_ROWS * GEMM_CEILING_ROWS).max(GEMM_CEILING_ROWS.min(s.m))
    }
}

/// The best rate (flops/s) of `run_loop` on every rayon thread at once, wall clock, over `reps`
/// runs of ~20 ms each after a calibration run on one thread.
fn best_loop_rate(reps: usize, run_loop: impl Fn(usize) -> (u64, f32) + Sync) -> f64 {
    let probe = 200_000;
    let t0 = Instant::now();
    std::hint::black_box(run_loop(probe));
    let per_trip = t0.elapsed().as_secs_f64().max(1e-9) / probe as f64;
    let iters = ((0.02 / per_trip) as usize).clamp(probe, 1 << 32);
    let mut best = 0f64;
    for _ in 0..reps {
        let t0 = Instant::now();
        let done: Vec<(u64, f32)> = rayon::broadcast(|_| run_loop(iters));
        let s = t0.elapsed().as_secs_f64();
        std::hint::black_box(&done);
        let flops: u64 = done.iter().map(|d| d.0).sum();
        best = best.max(flops as f64 / s);
    }
    best
}

/// A GEMM shape timed for the compute ceiling.
#[derive(Clone, Debug)]
struct GemmShape {
    label: String,
    m: usize,
    n: usize,
    k: usize,
}

/// The square reference shape plus the model's big GEMMs.
fn gemm_shapes(cfg: &Config, prompt_len: usize, square: usize) -> Vec<GemmShape> {
    let (h, f) = (cfg.hidden_size, cfg.mlp_width);
    let v = &cfg.visual;
    let t = v.grid() * v.grid();
    let mut s = vec![GemmShape { label: "square".into(), m: square, n: square, k: square }];
    for (label, m, n, k) in [
        ("prefill qkv", prompt_len, 3 * h, h),
        ("prefill mlp w1", prompt_len, f, h),
        ("prefill mlp c_proj", prompt_len, h, f),
        ("vit qkv", t, 3 * v.width, v.width),
        ("vit mlp c_fc", t, v.mlp_width, v.width),
    ] {
        if k.is_multiple_of(8) && m > 0 && n > 0 {
            s.push(GemmShape { label: label.into(), m, n, k });
        }
    }
    s
}

/// Device copy bandwidth and the best GEMM FLOP/s on CUDA GPU `ordinal`.
/// Runs on its own device handle, freed before the model's backend opens.
fn cuda_ceilings(ordinal: usize, shapes: &[GemmShape]) -> Result<Ceilings> {
    use qvc_kernels::gpu::gemm::{Epilogue, GemmSpec};
    use qvc_kernels::KernelSpec;
    let mut dev = CudaDevice::open(ordinal)?;
    let mut rows = vec![];
    // Copy: 1 GiB each way, best of five; read + write bytes count.
    let n: usize = 1 << 30;
    let a = dev.alloc(n, "the copy benchmark's source")?;
    let b = dev.alloc(n, "the copy benchmark's destination")?;
    dev.memset_zero(a, n)?;
    dev.copy_d2d(b, a, n)?;
    let mut best_ms = f64::MAX;
    for _ in 0..5 {
        best_ms = best_ms.min(dev.elapsed_ms(|d| d.copy_d2d(b, a, n))?);
    }
    dev.free(a);
    dev.free(b);
    let bytes_per_s = 2.0 * n as f64 / (best_ms * 1e-3);
    rows.push(Row::num(
        "ceiling: device copy",
        bytes_per_s / 1e9,
        "GB/s",
        format!("1 GiB d2d, best of 5, read + write; H100 datasheet {:.0} GB/s", H100_DATASHEET_TBS * 1e3),
    ));
    let mut best = 0f64;
    let mut gemms = vec![];
    let mut rng = 0x5eed_u64;
    for s in shapes {
        let spec = GemmSpec::new(s.m, s.n, s.k, DType::BF16, DType::BF16, Epilogue::NONE)
            .map_err(|e| anyhow::anyhow!("GEMM {}x{}x{}: {e}", s.m, s.n, s.k))?;
        let ptx = qvc_codegen::Module::new(dev.target(), vec![spec.build()]).print();
        dev.load_module(&ptx, None)?;
        let l = spec.launch();
        let (ab, wb, ob) = (s.m * s.k * 2, s.n * s.k * 2, s.m * s.n * 2);
        let (pa, pw, po) = (dev.alloc(ab, "GEMM A")?, dev.alloc(wb, "GEMM W")?, dev.alloc(ob, "GEMM out")?);
        // Random operands: zeros would flatter the tensor cores' power draw.
        for (p, bytes) in [(pa, ab), (pw, wb)] {
            let host: Vec<bf16> = (0..bytes / 2)
                .map(|_| {
                    rng = splitmix(rng);
                    bf16::from_f32((rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                })
                .collect();
            dev.upload(p, bytemuck::cast_slice(&host))?;
        }
        let name = spec.name();
        let args = [KArg::Ptr(pa), KArg::Ptr(pw), KArg::Ptr(po)];
        dev.launch(&name, l.grid, l.block, &args)?;
        dev.synchronize()?;
        let flops = 2.0 * (s.m * s.n * s.k) as f64;
        // Repeat small shapes inside one timing so launch gaps do not dominate.
        let reps = ((2e12 / flops).ceil() as usize).clamp(1, 50);
        let mut ms = f64::MAX;
        for _ in 0..3 {
            let t = dev.elapsed_ms(|d| {
                for _ in 0..reps {
                    d.launch(&name, l.grid, l.block, &args)?;
                }
                Ok(())
            })?;
            ms = ms.min(t / reps as f64);
        }
        for p in [pa, pw, po] {
            dev.free(p);
        }
        let tflops = flops / (ms * 1e-3) / 1e12;
        best = best.max(tflops);
        gemms.push(GemmResult { label: s.label.clone(), m: s.m, n: s.n, k: s.k, gflops: tflops * 1e3 });
        rows.push(Row::num(
            format!("gemm {} {}x{}x{}", s.label, s.m, s.n, s.k),
            tflops,
            "TFLOP/s",
            format!("{ms:.3} ms, bf16 qvc GEMM"),
        ));
    }
    rows.push(Row::num(
        "ceiling: best GEMM",
        best,
        "TFLOP/s",
        format!("H100 datasheet dense bf16 {H100_DATASHEET_BF16_TFLOPS:.0} TFLOP/s"),
    ));
    Ok(Ceilings {
        flops: best * 1e12,
        flops_of: "best_gemm",
        bytes_per_s,
        rows,
        fma_flops: None,
        fma_how: "not measured on a GPU (its floors use the best GEMM)".into(),
        bw_how: "measured: 1 GiB device-to-device copy, best of 5, read + write bytes".into(),
        best_gemm_flops: best * 1e12,
        gemms,
    })
}

/// Flops of the vision program: matmuls + attention (q·kᵀ and p·v) + the adapter.
pub fn vision_flops(cfg: &Config, attention: VitAttention) -> f64 {
    let v = &cfg.visual;
    let (g, w, m, d, q) = (v.grid(), v.width, v.mlp_width, v.output_dim, v.queries());
    let t = g * g;
    let mut f = 2.0 * (t * 3 * v.patch_size * v.patch_size * w) as f64;
    for j in 0..v.layers {
        let keys = match attention.mask(j, g) {
            qvc_ir::Mask::Window { window, .. } => (window * window).min(t),
            _ => t,
        };
        f += 2.0 * (t * (3 * w * w + w * w + 2 * w * m)) as f64 + 4.0 * (t * keys * w) as f64;
    }
    // Adapter: kv_proj, k and v projections over the grid, q/out/proj over
    // the 256 queries, cross-attention.
    f += 2.0 * (t * w * d + 2 * t * d * d + 3 * q * d * d) as f64 + 4.0 * (q * t * d) as f64;
    f
}

/// Flops of a decoder step: `tokens` new rows after `past` cached ones (causal),
/// `logit_rows` rows of lm_head. The last block's c_proj and MLP run on the
/// `logit_rows` rows only (the program narrows there, see
/// `qvc_model::graphs::decoder_graph`), so that is the work the floor counts.
pub fn decoder_flops(cfg: &Config, tokens: usize, past: usize, logit_rows: usize) -> f64 {
    let (h, f) = (cfg.hidden_size, cfg.mlp_width);
    let (qkv, rest) = (2.0 * (3 * h * h) as f64, 2.0 * (h * h + 3 * h * f) as f64);
    let keys = (tokens * past) as f64 + (tokens * (tokens + 1)) as f64 / 2.0;
    let attn = 4.0 * keys * h as f64;
    let layers = cfg.layers as f64;
    let narrowed = logit_rows.min(tokens);
    layers * (tokens as f64 * qkv + attn)
        + ((layers - 1.0).max(0.0) * tokens as f64 + narrowed as f64 * layers.min(1.0)) * rest
        + 2.0 * (logit_rows * h * cfg.vocab_size) as f64
}

/// Bytes a decode step reads: the weights ([`step_weight_bytes`]) and the
/// cache of each sequence.
fn decode_bytes(cfg: &Config, weight_bytes: f64, kv_elem: usize, seqs: usize, past: usize) -> f64 {
    weight_bytes + (seqs * 2 * cfg.layers * past * cfg.hidden_size * kv_elem) as f64
}

/// One decode measurement (`batch` sequences together).
struct DecodeResult {
    batch: usize,
    step_ms: f64,
    bytes_per_step: f64,
    floor_fraction: Option<f64>,
    /// Against the bandwidth probed beside every step (CPU, large weights).
    paired: Option<Paired>,
}

/// Decode steps against read probes taken beside them.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Paired {
    /// Median over the steps of (the step's floor at the bandwidth probed
    /// on either side of it) / (its time).
    fraction: f64,
    /// Median of the probes, GB/s.
    read_gbs: f64,
}

/// Weights per step from which decode steps are paired with read probes: the
/// probe's own 256 MiB. Smaller steps are partly served by the caches (and a
/// probe between them would evict what they keep there), so a DRAM floor
/// says little about them.
const PAIRED_MIN_BYTES: usize = 256 << 20;

/// The decode floor measured beside the steps. The ceiling's bandwidth is
/// the best of 12 probes taken before anything else runs; on a shared
/// machine (the VMs these sessions get swing between 14 and 50 GB/s within
/// minutes) the bandwidth a decode gets ten seconds later can be far from
/// it in either direction. Here one probe pass runs before the first step
/// and after every step, so step `i` (`steps[i]` ms, `bytes_at(i)` bytes)
/// is compared with the mean of probes `i` and `i + 1` (bytes/s), the ones
/// just around it. Returns the median (nearest rank, as `qvc bench-serve`'s
/// p50) of those ratios and of the probes, or
/// `None` without a step or with the wrong number of probes.
fn paired_floor_fraction(steps: &[f64], probes: &[f64], bytes_at: impl Fn(usize) -> f64) -> Option<Paired> {
    if steps.is_empty() || probes.len() != steps.len() + 1 {
        return None;
    }
    let mut ratios: Vec<f64> =
        steps.iter().enumerate().map(|(i, &ms)| bytes_at(i) / ((probes[i] + probes[i + 1]) / 2.0) * 1e3 / ms).collect();
    let fraction = crate::common::percentile(&mut ratios, 50.0);
    Some(Paired { fraction, read_gbs: crate::common::percentile(&mut probes.to_vec(), 50.0) / 1e9 })
}

/// What `--json` prints, filled as the bench runs.
#[derive(Default)]
struct Report {
    device: String,
    device_name: String,
    model: String,
    vit_layers: usize,
    llm_layers: usize,
    /// Runs each of vision, TTFT and prefill is the best of.
    repeat: usize,
    vision: Vec<serde_json::Value>,
    ttft_ms: Option<f64>,
    ttft_tokens: usize,
    /// (ms, tokens, floor fraction)
    prefill: Option<(f64, usize, Option<f64>)>,
    decode: Vec<DecodeResult>,
}

impl Report {
    /// The `--json` object; its keys are documented in `qvc bench --help`
    /// ([`crate::cmd::bench`]) and the README. `null` where a value was not
    /// measured (ceilings on the emulator, the FMA peak on a GPU, decode with
    /// `--decode-tokens 0`).
    fn json(&self, c: Option<&Ceilings>, threads: usize) -> serde_json::Value {
        let d1 = self.decode.iter().find(|d| d.batch == 1);
        let gemm_best = c.map(|c| c.best_gemm_flops / 1e9);
        serde_json::json!({
            "schema": 1,
            "device": self.device,
            "device_name": self.device_name,
            "threads": threads,
            "cpu_math": qvc_kernels::cpu_math().name(),
            "model": self.model,
            "vit_layers": self.vit_layers,
            "llm_layers": self.llm_layers,
            "repeat": self.repeat,
            "vision_ms": self.vision.first().map(|v| v["ms"].clone()),
            "vision": self.vision,
            "ttft_ms": self.ttft_ms,
            "ttft_tokens": self.ttft_tokens,
            "prefill_ms": self.prefill.map(|p| p.0),
            "prefill_tokens": self.prefill.map(|p| p.1),
            "prefill_tok_s": self.prefill.map(|p| p.1 as f64 / p.0 * 1e3),
            "prefill_floor_fraction": self.prefill.and_then(|p| p.2),
            "decode_tok_s": d1.map(|d| d.batch as f64 / d.step_ms * 1e3), // the same expression as decode[0].tok_s
            "decode_ms_per_token": d1.map(|d| d.step_ms),
            "decode_bytes_per_token": d1.map(|d| d.bytes_per_step),
            "decode_floor_fraction": d1.and_then(|d| d.floor_fraction),
            "decode_paired_floor_fraction": d1.and_then(|d| d.paired.map(|p| p.fraction)),
            "decode": self.decode.iter().map(|d| serde_json::json!({
                "batch": d.batch,
                "tok_s": d.batch as f64 / d.step_ms * 1e3,
                "ms_per_step": d.step_ms,
                "bytes_per_step": d.bytes_per_step,
                "floor_fraction": d.floor_fraction,
                "paired_floor_fraction": d.paired.map(|p| p.fraction),
                "paired_read_gbs": d.paired.map(|p| p.read_gbs),
            })).collect::<Vec<_>>(),
            "gemm_best_gflops": gemm_best,
            // Of the ceiling the GEMMs run against: the FMA peak, or the AMX / vdpbf16ps peak under --cpu-math fast.
            "gemm_peak_fraction": c.and_then(|c| c.fma_flops.map(|_| c.best_gemm_flops / c.flops)),
            "ceilings": c.map(|c| serde_json::json!({
                "fma_peak_gflops": c.fma_flops.map(|f| f / 1e9),
                "fma_peak_how": c.fma_how,
                "gemm_peak_gflops": c.flops / 1e9,
                "gemm_peak_of": c.flops_of,
                "read_bandwidth_gbs": c.bytes_per_s / 1e9,
                "read_bandwidth_how": c.bw_how,
                "gemm": c.gemms.iter().map(|g| serde_json::json!({
                    "shape": g.label, "m": g.m, "n": g.n, "k": g.k, "gflops": g.gflops,
                })).collect::<Vec<_>>(),
            })),
        })
    }
}

/// The executor the bench runs on.
enum Exec {
    Cpu(Cpu),
    Gpu(Box<GpuBackend>),
}

impl Exec {
    fn backend(&self) -> &dyn Backend {
        match self {
            Exec::Cpu(c) => c,
            Exec::Gpu(g) => g.as_ref(),
        }
    }
}

/// One sequence's decoder state: its KV slot (device) or host cache.
struct Seq {
    slot: usize,
    len: usize,
    alpha: f64,
    host: KvCache,
}

/// Builds, optimises and runs the programs of one model on one backend.
struct Runner<'a> {
    cfg: Config,
    shapes: &'a WeightStore,
    base: &'a dyn WeightSource,
    fold: ConstFold<'a>,
    folded: Vec<FoldedParam>,
    backend: &'a dyn Backend,
    compiled: Option<&'a Manifest>,
    graphs: HashMap<String, Graph>,
}

impl<'a> Runner<'a> {
    fn optimise(&mut self, mut g: Graph) -> Result<Graph> {
        if self.compiled.is_none() {
            let passes: [&dyn Pass; 5] = [&Canonicalize, &self.fold, &Fuse, &Cse, &Dce];
            run_pipeline(&mut g, &passes)?;
            self.folded.extend(self.fold.take_folded());
        }
        Ok(g)
    }

    fn run(&self, key: &str, inputs: &qvc_runtime::Inputs<'_>) -> Result<HashMap<String, Vec<f32>>> {
        let g = &self.graphs[key];
        let w = WithFolded::new(self.base, &self.folded);
        Ok(self.backend.run(g, &w, inputs)?)
    }

    /// The vision program at `size` with `attention`; returns its key.
    fn vision(&mut self, size: usize, attention: VitAttention) -> Result<String> {
        let key = format!("vision.{size}.{attention}");
        if self.graphs.contains_key(&key) {
            return Ok(key);
        }
        let g = match self.compiled {
            Some(m) => m
                .programs
                .values()
                .find(|p| p.kind == "vision")
                .map(|p| p.graph.clone())
                .context("the artifact has no vision program")?,
            None => {
                let mut cfg = self.cfg.clone();
                cfg.visual.image_size = size;
                let v = &cfg.visual;
                let table = |name: &str, c: usize| -> Result<Vec<f32>> {
                    let e = self.base.weight(name).with_context(|| format!("no weight {name}"))?;
                    Ok(resize_pos_embed(&e.to_f32_vec(), 16, v.grid(), c))
                };
                let vit_pos = table("transformer.visual.positional_embedding", v.width)?;
                let pool_pos = table("transformer.visual.attn_pool.pos_embed", v.output_dim)?;
                let opt = VisionOptions { attention, ..Default::default() };
                let g = vision_graph(&cfg, self.shapes, vit_pos, pool_pos, &opt)?;
                self.optimise(g)?
            }
        };
        self.graphs.insert(key.clone(), g);
        Ok(key)
    }

    fn run_vision(&self, key: &str, size: usize) -> Result<Vec<f32>> {
        let px: Vec<f32> = (0..3 * size * size).map(|i| ((i * 7919 % 4001) as f32 / 1000.0) - 2.0).collect();
        let inputs = HashMap::from([("pixels".to_string(), InputRef::F32(&px))]);
        let mut out = self.run(key, &inputs)?;
        out.remove("features").context("the vision program has no features output")
    }

    /// The decoder program for `tokens` new rows after a cache of capacity
    /// `past` (0 = prefill) with `image_rows` feature rows, for `batch` sequences.
    fn decoder(&mut self, tokens: usize, past: usize, image_rows: usize, batch: usize) -> Result<(String, usize)> {
        let key = format!("decoder.{tokens}.{past}.{image_rows}.{batch}");
        if let Some(g) = self.graphs.get(&key) {
            return Ok((key, g.inputs().iter().find(|(n, _)| *n == "ids").map_or(tokens, |(_, t)| t.shape.0[0])));
        }
        let g = match self.compiled {
            Some(m) => {
                let kind = if past == 0 { "prefill" } else { "decode" };
                let p = m
                    .programs
                    .values()
                    .filter(|p| {
                        p.kind == kind
                            && p.tokens >= tokens
                            && p.past >= past
                            && p.image_rows >= image_rows
                            && p.batch == batch
                    })
                    .min_by_key(|p| (p.tokens, p.past, p.image_rows))
                    .with_context(|| {
                        format!(
                            "the artifact has no {kind} program for {tokens} tokens after {past} with {image_rows} image rows \
                             and batch {batch}; compile it with larger --max-seq / --max-batch"
                        )
                    })?;
                p.graph.clone()
            }
            None => {
                let shape = DecoderShape {
                    tokens,
                    past,
                    image_rows,
                    bucketed: past > 0,
                    batch: if batch > 1 { batch } else { 0 },
                    ..Default::default()
                };
                let g = decoder_graph(&self.cfg, self.shapes, &shape)?;
                self.optimise(g)?
            }
        };
        let tb = g.inputs().iter().find(|(n, _)| *n == "ids").map_or(tokens, |(_, t)| t.shape.0[0]);
        self.graphs.insert(key.clone(), g);
        Ok((key, tb))
    }

    /// Prefill `ids` into `seq` (from empty), with picture features at `rows`.
    fn prefill(&mut self, seq: &mut Seq, ids: &[u32], feats: &[f32], rows: &[i32]) -> Result<()> {
        let (key, tb) = self.decoder(ids.len(), 0, rows.len(), 1)?;
        seq.len = 0;
        seq.host.truncate(0);
        seq.alpha = self.cfg.ntk_alpha(ids.len());
        let mut ids_i: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        ids_i.resize(tb, 0);
        let (cos, sin) = rope_tables(&self.cfg, seq.alpha, 0, tb);
        let logn = logn_scales(&self.cfg, 0, tb);
        let (last, past_len, slot) = ([ids.len() as i32 - 1], [0f32], [seq.slot as i32]);
        let mut inputs: qvc_runtime::Inputs = HashMap::from([
            ("ids".to_string(), InputRef::I32(&ids_i)),
            ("rope_cos".to_string(), InputRef::F32(&cos)),
            ("rope_sin".to_string(), InputRef::F32(&sin)),
            ("logn".to_string(), InputRef::F32(&logn)),
            ("last_index".to_string(), InputRef::I32(&last)),
            ("past_len".to_string(), InputRef::F32(&past_len)),
            ("kv_slot".to_string(), InputRef::I32(&slot)),
        ]);
        // A compiled prefill holds more feature rows than the prompt: the rest are NO_ROW.
        let image = image_inputs(&self.graphs[&key], self.cfg.hidden_size, feats, rows)?;
        if let Some(im) = &image {
            inputs.insert("image_features".into(), InputRef::F32(&im.features));
            inputs.insert("image_rows".into(), InputRef::I32(&im.rows));
        }
        let out = self.run(&key, &inputs)?;
        check_logits(&out)?;
        self.keep(seq, &out, ids.len(), 0);
        Ok(())
    }

    /// New K/V rows into host caches (a device cache has them already).
    /// `n` rows of sequence `b` (the rows of the outputs are the sequences of
    /// a batched program).
    fn keep(&self, seq: &mut Seq, out: &HashMap<String, Vec<f32>>, n: usize, b: usize) {
        if !self.backend.kv_on_device() {
            let row = self.cfg.heads * self.cfg.head_dim;
            for i in 0..self.cfg.layers {
                let (Some(k), Some(v)) = (out.get(&format!("k.{i}")), out.get(&format!("v.{i}"))) else {
                    continue;
                };
                let at = b * n * row;
                seq.host.append(i, &k[at..at + n * row], &v[at..at + n * row]);
            }
            seq.host.commit(n);
        }
        seq.len += n;
    }

    /// One decode step for every sequence in `seqs` with a cache capacity
    /// `cap`: one batched program for several (each sequence in its own
    /// device-cache slot, or with its own host cache inputs).
    fn decode(&mut self, seqs: &mut [Seq], cap: usize, step: usize) -> Result<()> {
        if seqs.len() == 1 {
            return self.decode_one(&mut seqs[0], cap, step);
        }
        let b = seqs.len();
        let on_device = self.backend.kv_on_device();
        let (key, _) = self.decoder(1, cap, 0, b)?;
        let ids: Vec<i32> = (0..b).map(|j| token(&self.cfg, step * b + j)).collect();
        let (mut cos, mut sin, mut logn) = (vec![], vec![], vec![]);
        for s in seqs.iter_mut() {
            let (c, si) = rope_tables(&self.cfg, s.alpha, s.len, 1);
            cos.extend(c);
            sin.extend(si);
            logn.extend(logn_scales(&self.cfg, s.len, 1));
            if !on_device {
                s.host.reserve_rows(cap);
            }
        }
        let lens: Vec<[f32; 1]> = seqs.iter().map(|s| [s.len as f32]).collect();
        let slots: Vec<[i32; 1]> = seqs.iter().map(|s| [s.slot as i32]).collect();
        let mut inputs: qvc_runtime::Inputs = HashMap::from([
            ("ids".to_string(), InputRef::I32(&ids)),
            ("rope_cos".to_string(), InputRef::F32(&cos)),
            ("rope_sin".to_string(), InputRef::F32(&sin)),
            ("logn".to_string(), InputRef::F32(&logn)),
        ]);
        for (bi, s) in seqs.iter().enumerate() {
            inputs.insert(format!("past_len.{bi}"), InputRef::F32(&lens[bi]));
            if on_device {
                inputs.insert(format!("kv_slot.{bi}"), InputRef::I32(&slots[bi]));
                continue;
            }
            for i in 0..self.cfg.layers {
                let (k, v) = s.host.bucket(i, cap);
                inputs.insert(format!("past_k.{i}.{bi}"), InputRef::F32(k));
                inputs.insert(format!("past_v.{i}.{bi}"), InputRef::F32(v));
            }
        }
        let out = self.run(&key, &inputs)?;
        check_logits(&out)?;
        drop(inputs);
        for (bi, s) in seqs.iter_mut().enumerate() {
            self.keep(s, &out, 1, bi);
        }
        Ok(())
    }

    fn decode_one(&mut self, s: &mut Seq, cap: usize, step: usize) -> Result<()> {
        let (key, _) = self.decoder(1, cap, 0, 1)?;
        let ids = [token(&self.cfg, step)];
        let (cos, sin) = rope_tables(&self.cfg, s.alpha, s.len, 1);
        let logn = logn_scales(&self.cfg, s.len, 1);
        let (past_len, slot) = ([s.len as f32], [s.slot as i32]);
        s.host.reserve_rows(cap);
        let mut inputs: qvc_runtime::Inputs = HashMap::from([
            ("ids".to_string(), InputRef::I32(&ids)),
            ("rope_cos".to_string(), InputRef::F32(&cos)),
            ("rope_sin".to_string(), InputRef::F32(&sin)),
            ("logn".to_string(), InputRef::F32(&logn)),
            ("past_len".to_string(), InputRef::F32(&past_len)),
            ("kv_slot".to_string(), InputRef::I32(&slot)),
        ]);
        if !self.backend.kv_on_device() {
            for i in 0..self.cfg.layers {
                let (k, v) = s.host.bucket(i, cap);
                inputs.insert(format!("past_k.{i}"), InputRef::F32(k));
                inputs.insert(format!("past_v.{i}"), InputRef::F32(v));
            }
        }
        let out = self.run(&key, &inputs)?;
        check_logits(&out)?;
        drop(inputs);
        self.keep(s, &out, 1, 0);
        Ok(())
    }
}

/// Random weights that overflow show up here rather than as odd timings.
fn check_logits(out: &HashMap<String, Vec<f32>>) -> Result<()> {
    let l = out.get("logits").context("the decoder has no logits output")?;
    if let Some(x) = l.iter().find(|x| !x.is_finite()) {
        bail!("the decoder produced a non-finite logit ({x}): the weights or the kernels are broken");
    }
    Ok(())
}

/// The `i`-th token id of the bench's prompts: spread over the vocabulary.
fn token(cfg: &Config, i: usize) -> i32 {
    (1 + (i * 7919) % (cfg.vocab_size - 1)) as i32
}

/// Wall-clock milliseconds of `f`, best of `reps`.
fn best_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        f()?;
        best = best.min(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(best)
}

/// Smallest power-of-two bucket (at least 16) holding `n` rows.
fn bucket(n: usize) -> usize {
    n.next_power_of_two().max(crate::compile::MIN_BUCKET)
}

/// Runs the bench: on `model` (a checkpoint or an artifact) or on `synthetic`.
pub fn run(model: Option<&Model>, synthetic: Option<Synthetic>, opt: &BenchOptions) -> Result<()> {
    let cpu_artifact = model.and_then(|m| m.compiled()).is_some_and(|m| m.options.target == "cpu");
    let at = resolve(&opt.device, cpu_artifact)?;
    if synthetic == Some(Synthetic::QwenVlChat) && at == Where::Emu {
        return Err(BenchError::TooBig("PTX emulator").into());
    }
    if synthetic.is_none() && (opt.vit_layers.is_some() || opt.llm_layers.is_some()) {
        return Err(BenchError::LayersWithoutSynthetic.into());
    }
    let gpu = at != Where::Cpu;
    let batch = opt.batch.unwrap_or(if gpu { 8 } else { 1 }).max(1);
    let prompt_len = opt.prompt_len.max(1);
    let ttft_len = 256 + TTFT_TEXT_TOKENS;
    // Warm-up steps, then the timed ones, all in one cache bucket.
    let warm = if matches!(at, Where::Cuda(_)) { 2 } else { 0 };
    let need = prompt_len.max(ttft_len) + opt.decode_tokens + warm + 1;
    let cap = bucket(need);

    let synth_cfg = synthetic.map(|s| s.config_layers(opt.vit_layers, opt.llm_layers)).transpose()?;
    if let (Where::Cpu, Some(s), Some(c)) = (at, synthetic, &synth_cfg) {
        check_cpu_synthetic(s, c, opt, mem_available())?;
    }
    let cfg: Config = match (model, &synth_cfg) {
        (Some(m), _) => m.config.clone(),
        (None, Some(c)) => c.clone(),
        (None, None) => return Err(BenchError::NoModel.into()),
    };
    let compiled = model.and_then(|m| m.compiled());
    let sizes: Vec<usize> = match (compiled, synthetic) {
        (Some(m), _) => {
            if opt.image_sizes.iter().any(|&s| s != m.options.image_size) {
                return Err(BenchError::CompiledImageSize(
                    model.map_or(String::new(), |m| m.dir.display().to_string()),
                    m.options.image_size,
                )
                .into());
            }
            vec![m.options.image_size]
        }
        _ if !opt.image_sizes.is_empty() => opt.image_sizes.clone(),
        (None, Some(_)) => vec![448, 896],
        (None, None) => vec![cfg.visual.image_size],
    };
    for &s in &sizes {
        if s == 0 || !s.is_multiple_of(cfg.visual.patch_size) {
            bail!("--image-sizes {s}: not a positive multiple of the {}-pixel patch", cfg.visual.patch_size);
        }
    }
    let attentions: Vec<VitAttention> = match (compiled, model) {
        (Some(_), Some(m)) => vec![m.vit_attention()],
        (None, Some(m)) => vec![m.vit_attention()],
        _ => vec![VitAttention::Global, VitAttention::Window { window: 16, global_every: 0 }],
    };

    let mut rows: Vec<Row> = vec![];
    // Ceilings first, on a device handle of their own.
    let mut ceilings = match at {
        Where::Cpu => Some(cpu_ceilings(&gemm_shapes(&cfg, prompt_len, 1024))),
        Where::Emu => None,
        Where::Cuda(n) => Some(cuda_ceilings(n, &gemm_shapes(&cfg, prompt_len, 8192))?),
    };

    // Weights.
    let t0 = Instant::now();
    let synth_w = synthetic.map(|_| SyntheticWeights::generate(&cfg, 0x9E11, opt.int4));
    let synth_shapes = synthetic.map(|_| SyntheticWeights::shapes(&cfg, opt.int4));
    let (shapes, base): (&WeightStore, &dyn WeightSource) = match (model, &synth_w, &synth_shapes) {
        (Some(m), _, _) => (&m.weights, &m.weights),
        (None, Some(w), Some(s)) => (s, w),
        _ => return Err(BenchError::NoModel.into()),
    };
    let weights_note = match (&synth_w, model) {
        (Some(w), _) => format!(
            "synthetic {}{}: {:.2} GB random {} generated on the host ({} threads) in {:.1} s{}",
            synthetic.map_or("", |s| s.name()),
            match synthetic.map(|s| s.config()) {
                Some(full) if (full.visual.layers, full.layers) != (cfg.visual.layers, cfg.layers) => format!(
                    " ({} of {} ViT layers, {} of {} decoder layers, full widths)",
                    cfg.visual.layers, full.visual.layers, cfg.layers, full.layers
                ),
                _ => String::new(),
            },
            w.bytes() as f64 / 1e9,
            match (opt.int4.decoder, opt.int4.lm_head) {
                (false, false) => "bf16",
                (true, false) => "bf16 with int4 decoder Linears (group 128)",
                (false, true) => "bf16 with an int4 lm_head (group 128)",
                (true, true) => "bf16 with int4 decoder Linears and lm_head (group 128)",
            },
            rayon::current_num_threads(),
            t0.elapsed().as_secs_f64(),
            if gpu { ", uploaded on first use" } else { "" }
        ),
        (None, Some(m)) => format!(
            "{} {}: {:.2} GB of weights",
            if m.compiled().is_some() { "artifact" } else { "checkpoint" },
            m.dir.display(),
            m.weights.total_bytes() as f64 / 1e9
        ),
        (None, None) => String::new(),
    };

    // The executor, once, with a slot per sequence.
    let max_seq = compiled.map_or(cap, |m| m.options.max_seq);
    let exec = match at {
        Where::Cpu => Exec::Cpu(Cpu),
        Where::Emu | Where::Cuda(_) => {
            let target = compiled
                .and_then(|m| qvc_codegen::Target::parse(&m.options.target))
                .unwrap_or(qvc_codegen::Target::Sm80);
            let dev: Box<dyn Device> = match at {
                Where::Cuda(n) => Box::new(CudaDevice::open(n)?),
                _ => Box::new(EmuDevice::new(target)),
            };
            match model {
                Some(m) => Exec::Gpu(Box::new(m.gpu_backend(dev, batch, max_seq)?)),
                None => {
                    let kv = qvc_runtime::gpu::lower::KvShape {
                        layers: cfg.layers,
                        heads: cfg.heads,
                        head_dim: cfg.head_dim,
                        max_seq,
                    };
                    Exec::Gpu(Box::new(GpuBackend::new(dev, kv, batch, None)))
                }
            }
        }
    };
    let device_name = match &exec {
        Exec::Cpu(_) => format!("cpu ({} threads)", rayon::current_num_threads()),
        Exec::Gpu(g) => format!("{} ({})", g.device_info().0, at.label()),
    };
    let reps = opt.repeat.unwrap_or(if matches!(at, Where::Cuda(_)) { 3 } else { 1 }).max(1);
    let mut report = Report {
        repeat: reps,
        device: at.label(),
        device_name: device_name.clone(),
        vit_layers: cfg.visual.layers,
        llm_layers: cfg.layers,
        ..Default::default()
    };
    rows.push(Row::text("device", device_name));
    report.model = weights_note.clone();
    rows.push(Row::text("model", weights_note));
    match &mut ceilings {
        Some(c) => rows.append(&mut c.rows),
        None => rows.push(Row::text("ceilings", "n/a on the emulator")),
    }
    let floor = |flops: f64| ceilings.as_ref().map(|c| flops / c.flops * 1e3);
    let bw_floor = |bytes: f64| ceilings.as_ref().map(|c| bytes / c.bytes_per_s * 1e3);

    let mut r = Runner {
        cfg: cfg.clone(),
        shapes,
        base,
        fold: ConstFold::with_weights(base),
        folded: vec![],
        backend: exec.backend(),
        compiled,
        graphs: HashMap::new(),
    };

    let warm_up = matches!(at, Where::Cuda(_));

    // Vision.
    for &size in &sizes {
        for &att in &attentions {
            let key = r.vision(size, att)?;
            if warm_up {
                r.run_vision(&key, size)?;
            }
            let ms = best_ms(reps, || r.run_vision(&key, size).map(|_| ()))?;
            let mut c = cfg.clone();
            c.visual.image_size = size;
            let fl = vision_flops(&c, att);
            report.vision.push(serde_json::json!({
                "size": size,
                "attention": att.to_string(),
                "ms": ms,
                "gflop": fl / 1e9,
                "floor_fraction": floor(fl).map(|f| f / ms),
            }));
            rows.push(
                Row::num(format!("vision {size} {att}"), ms, "ms", format!("{:.1} GFLOP", fl / 1e9))
                    .timed(ms, floor(fl)),
            );
        }
    }

    // Time to first token: the picture, then a prompt holding its 256 features.
    let size0 = sizes[0];
    let vkey = r.vision(size0, attentions[0])?;
    let q = cfg.visual.queries();
    let ttft_ids: Vec<u32> = (0..ttft_len).map(|i| token(&cfg, i) as u32).collect();
    let img_rows: Vec<i32> = (1..=q as i32).collect();
    let new_seq =
        |slot: usize| Seq { slot, len: 0, alpha: 1.0, host: KvCache::new(cfg.layers, cfg.heads * cfg.head_dim) };
    let mut s0 = new_seq(0);
    if warm_up {
        let f = r.run_vision(&vkey, size0)?;
        r.prefill(&mut s0, &ttft_ids, &f, &img_rows)?;
    } else {
        // Build the prompt's program outside the timing.
        r.decoder(ttft_len, 0, q, 1)?;
    }
    let ttft = best_ms(reps, || {
        let f = r.run_vision(&vkey, size0)?;
        r.prefill(&mut s0, &ttft_ids, &f, &img_rows)
    })?;
    let mut c0 = cfg.clone();
    c0.visual.image_size = size0;
    let fl = vision_flops(&c0, attentions[0]) + decoder_flops(&cfg, ttft_len, 0, 1);
    report.ttft_ms = Some(ttft);
    report.ttft_tokens = ttft_len;
    rows.push(
        Row::num("time to first token", ttft, "ms", format!("1 picture + {ttft_len}-token prompt (vision + prefill)"))
            .timed(ttft, floor(fl)),
    );

    // Prefill.
    let ids: Vec<u32> = (0..prompt_len).map(|i| token(&cfg, 7 * i + 3) as u32).collect();
    r.decoder(prompt_len, 0, 0, 1)?;
    if warm_up {
        r.prefill(&mut s0, &ids, &[], &[])?;
    }
    let pre = best_ms(reps, || r.prefill(&mut s0, &ids, &[], &[]))?;
    let fl = decoder_flops(&cfg, prompt_len, 0, 1);
    // Int4 Linears multiply on bf16 products only under --cpu-math fast on AMX tiles
    // (exact ones never take the tiles: their dequantized weights are not bf16);
    // elsewhere their prefill GEMMs run on FMAs, and the FMA peak bounds them.
    let int4_on_tiles = qvc_kernels::cpu_math() == qvc_kernels::CpuMath::Fast
        && qvc_kernels::q4::fast_prefill_on_tiles(qvc_kernels::Isa::detect());
    let prefill_floor = match ceilings.as_ref() {
        Some(c) if decoder_int4(shapes) && !int4_on_tiles => c.fma_flops.map(|peak| fl / peak * 1e3).or(floor(fl)),
        _ => floor(fl),
    };
    report.prefill = Some((pre, prompt_len, prefill_floor.map(|f| f / pre)));
    rows.push(
        Row::num(
            format!("prefill {prompt_len} tokens"),
            prompt_len as f64 / pre * 1e3,
            "tok/s",
            format!("{pre:.2} ms"),
        )
        .timed(pre, prefill_floor),
    );

    // Decode, batch 1, then `batch` sequences together; both after a prefill
    // of `prompt_len`.
    let kvelem = if gpu { 2 } else { 4 };
    let batches = if batch > 1 { vec![1, batch] } else { vec![1] };
    for b in batches {
        let mut seqs: Vec<Seq> = (0..b).map(new_seq).collect();
        for s in seqs.iter_mut() {
            r.prefill(s, &ids, &[], &[])?;
        }
        r.decoder(1, cap, 0, b)?;
        for w in 0..warm {
            r.decode(&mut seqs, cap, w)?;
        }
        if opt.decode_tokens == 0 {
            continue;
        }
        let past = seqs[0].len;
        let wbytes = step_weight_bytes(&cfg, base, gpu.then_some(2), b);
        // On the CPU, with weights that stream from DRAM, a one-pass read
        // probe before the first step and after every step (see
        // [`paired_floor_fraction`]); the steps alone are timed.
        let probe_buf =
            (!gpu && ceilings.is_some() && wbytes >= PAIRED_MIN_BYTES as f64).then(qvc_kernels::peak::read_buffer);
        let probe = |buf: &[f32]| qvc_kernels::peak::read_bandwidth(buf, 1);
        let mut steps = Vec::with_capacity(opt.decode_tokens);
        let mut probes: Vec<f64> = probe_buf.iter().map(|b| probe(b)).collect();
        for i in 0..opt.decode_tokens {
            let t0 = Instant::now();
            r.decode(&mut seqs, cap, warm + i)?;
            steps.push(t0.elapsed().as_secs_f64() * 1e3);
            if let Some(buf) = &probe_buf {
                probes.push(probe(buf));
            }
        }
        let step_ms = steps.iter().sum::<f64>() / opt.decode_tokens as f64;
        let bytes = decode_bytes(&cfg, wbytes, kvelem, b, past + opt.decode_tokens / 2);
        let paired = probe_buf
            .as_ref()
            .and_then(|_| paired_floor_fraction(&steps, &probes, |i| decode_bytes(&cfg, wbytes, kvelem, b, past + i)));
        report.decode.push(DecodeResult {
            batch: b,
            step_ms,
            bytes_per_step: bytes,
            floor_fraction: bw_floor(bytes).map(|f| f / step_ms),
            paired,
        });
        let paired_note = paired.map_or(String::new(), |p| {
            format!("; {:.2} of the read bandwidth probed beside each step ({:.1} GB/s median)", p.fraction, p.read_gbs)
        });
        rows.push(
            Row::num(
                format!("decode batch {b}"),
                b as f64 / step_ms * 1e3,
                "tok/s",
                format!("{step_ms:.3} ms/step, {:.2} GB read per step (weights + KV){paired_note}", bytes / 1e9),
            )
            .timed(step_ms, bw_floor(bytes)),
        );
    }

    match &exec {
        Exec::Gpu(g) => {
            let (_, mem) = g.device_info();
            let st = g.stats();
            rows.push(Row::num(
                "peak device memory",
                mem.peak as f64 / (1u64 << 30) as f64,
                "GiB",
                format!(
                    "{} programs, {} launches, {} host nodes, {:.2} GB of weights uploaded",
                    st.programs,
                    st.launches,
                    st.host_nodes,
                    st.weight_bytes as f64 / 1e9
                ),
            ));
        }
        Exec::Cpu(_) => rows.push(Row::text("peak device memory", "n/a on the CPU")),
    }
    // With --json the table (and the profile) go to stderr, the object alone to stdout.
    let say = |text: String| if opt.json { eprint!("{text}") } else { print!("{text}") };
    say(table(&rows));
    if opt.json {
        println!("{}", report.json(ceilings.as_ref(), rayon::current_num_threads()));
    }

    if opt.profile {
        // Each run is timed kernel by kernel (GPU) or op by op (CPU) on its own.
        let (what, src) = match (&exec, at) {
            (Exec::Gpu(_), Where::Emu) => ("emulation wall time, not GPU time", profile::Source::Kernels),
            (Exec::Gpu(_), _) => ("each launch timed alone", profile::Source::Kernels),
            (Exec::Cpu(_), _) => (
                "each op timed alone",
                profile::Source::Ops { ceilings: ceilings.as_ref().map(|c| (c.flops, c.bytes_per_s)) },
            ),
        };
        let timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<Vec<qvc_runtime::KernelTime>> {
            match &exec {
                Exec::Gpu(g) => {
                    g.start_profile();
                    f()?;
                    Ok(g.take_profile())
                }
                Exec::Cpu(_) => {
                    qvc_runtime::cpu::start_profile();
                    let r = f();
                    let k = qvc_runtime::cpu::take_profile();
                    r.map(|()| k)
                }
            }
        };
        let k = timed(&mut || r.run_vision(&vkey, size0).map(drop))?;
        say(profile::render(&format!("vision {size0} {} ({what})", attentions[0]), &k, src));
        let mut s = new_seq(0);
        let k = timed(&mut || r.prefill(&mut s, &ids, &[], &[]))?;
        say(profile::render(&format!("prefill {prompt_len} tokens ({what})"), &k, src));
        let k = timed(&mut || r.decode(std::slice::from_mut(&mut s), cap, 0))?;
        say(profile::render(&format!("decode step, batch 1, {} cached ({what})", s.len - 1), &k, src));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_floor_pairs_each_step_with_the_probes_around_it() {
        // Probes in bytes/s; step i sits between probes i and i + 1.
        let (steps, probes) = ([10.0, 20.0, 10.0], [1e9, 1e9, 3e9, 1e9]);
        // 1e7 bytes: floors 10, 5 and 5 ms, ratios 1, 0.25, 0.5.
        let p = paired_floor_fraction(&steps, &probes, |_| 1e7).unwrap();
        assert_eq!(p, Paired { fraction: 0.5, read_gbs: 1.0 });
        // Each step's own bytes: ratios 1, 0.5, 1.5.
        let p = paired_floor_fraction(&steps, &probes, |i| 1e7 * (i + 1) as f64).unwrap();
        assert_eq!(p.fraction, 1.0);
        assert_eq!(paired_floor_fraction(&steps, &probes[..3], |_| 1e7), None);
        assert_eq!(paired_floor_fraction(&[], &[1e9], |_| 1e7), None);
    }

    fn opts(vit: Option<usize>, llm: Option<usize>) -> BenchOptions {
        BenchOptions {
            device: "cpu".into(),
            prompt_len: 8,
            decode_tokens: 2,
            batch: None,
            image_sizes: vec![],
            profile: false,
            json: false,
            vit_layers: vit,
            llm_layers: llm,
            repeat: None,
            int4: SynthQuant::default(),
        }
    }

    /// Ceiling GEMMs keep the model's rows (a 300-token prefill, a 448
    /// picture's 1024 patches); only past the flop budget are they cut,
    /// to whole 12-row panels.
    #[test]
    fn ceiling_gemms_keep_the_models_rows() {
        let shape = |m, n, k| GemmShape { label: "t".into(), m, n, k };
        assert_eq!(ceiling_rows(&shape(300, 12288, 4096)), 300);
        assert_eq!(ceiling_rows(&shape(1024, 8192, 1664)), 1024);
        assert_eq!(ceiling_rows(&shape(5, 64, 64)), 5);
        // 2048 rows of c_attn are 206 GFLOP: cut to 312 rows (32 GFLOP / 100.7 MFLOP per row = 317).
        assert_eq!(ceiling_rows(&shape(2048, 12288, 4096)), 312);
        // A row over the budget alone still runs one panel.
        assert_eq!(ceiling_rows(&shape(100, 1 << 20, 1 << 15)), 12);
    }

    /// The layer flags shape the config (widths unchanged), past the
    /// model's depth they are refused, and the memory check compares the
    /// estimate with what is available.
    #[test]
    fn synthetic_layers_and_the_memory_check() {
        let full = Synthetic::QwenVlChat.config();
        let c = Synthetic::QwenVlChat.config_layers(Some(4), Some(2)).unwrap();
        assert_eq!((c.visual.layers, c.layers), (4, 2));
        assert_eq!((c.hidden_size, c.visual.width, c.vocab_size), (full.hidden_size, full.visual.width, 151936));
        assert!(matches!(
            Synthetic::QwenVlChat.config_layers(Some(49), None),
            Err(BenchError::TooManyLayers { max: 48, .. })
        ));
        // Weights alone: 4 ViT layers of ~77 MB, 2 decoder layers of ~404 MB,
        // 2 × 1.24 GB of embedding and lm_head, the adapter and patch kernel.
        let w = SyntheticWeights::bytes_for(&c, SynthQuant::default()) as f64 / 1e9;
        assert!((3.7..3.9).contains(&w), "{w} GB");
        // Int4 decoder Linears: a nibble plus an f16 scale and a packed zero
        // per 128 weights (4.16 bits) instead of 16 bits.
        let q = SynthQuant { decoder: true, lm_head: false };
        let wq = SyntheticWeights::bytes_for(&c, q) as f64 / 1e9;
        let linears = 2.0 * (4096.0 * 12288.0 + 4096.0 * 4096.0 + 3.0 * 4096.0 * 11008.0) / 1e9;
        assert!((w - wq - linears * (2.0 - (0.5 + 2.5 / 128.0))).abs() < 1e-3, "{w} vs {wq} GB");
        let need = synthetic_cpu_bytes(&c, SynthQuant::default());
        let o = opts(Some(4), Some(2));
        assert!(check_cpu_synthetic(Synthetic::QwenVlChat, &c, &o, Some(need)).is_ok());
        assert!(check_cpu_synthetic(Synthetic::QwenVlChat, &c, &o, None).is_ok());
        let e = check_cpu_synthetic(Synthetic::QwenVlChat, &c, &o, Some(need - 1)).unwrap_err();
        assert!(matches!(e, BenchError::TooMuchMemory { vit: 4, llm: 2, .. }), "{e}");
        assert!(e.to_string().contains("MemAvailable"), "{e}");
        // Without both counts the full depth is refused with an example.
        for o in [opts(None, None), opts(Some(4), None), opts(None, Some(2))] {
            let e = check_cpu_synthetic(Synthetic::QwenVlChat, &full, &o, None).unwrap_err();
            assert!(e.to_string().contains("--vit-layers 4 --llm-layers 2 is ~"), "{e}");
        }
        // The tiny model needs no counts.
        let tiny = Synthetic::Tiny.config();
        assert!(check_cpu_synthetic(Synthetic::Tiny, &tiny, &opts(None, None), None).is_ok());
    }

    /// A prefill's floor counts the last block's c_proj and MLP on the
    /// logits row only; decode (one row) and all-position logits count
    /// every row.
    #[test]
    fn decoder_flops_count_the_narrowed_last_block() {
        let mut c = Synthetic::QwenVlChat.config();
        c.layers = 2;
        let (h, f, v) = (c.hidden_size as f64, c.mlp_width as f64, c.vocab_size as f64);
        let t = 300.0;
        let qkv = 2.0 * 3.0 * h * h;
        let rest = 2.0 * (h * h + 3.0 * h * f);
        let attn = 4.0 * (t * (t + 1.0) / 2.0) * h;
        let want = 2.0 * (t * qkv + attn) + (t + 1.0) * rest + 2.0 * h * v;
        assert!((decoder_flops(&c, 300, 0, 1) / want - 1.0).abs() < 1e-12);
        let all = 2.0 * (t * qkv + attn + t * rest) + 2.0 * t * h * v;
        assert!((decoder_flops(&c, 300, 0, 300) / all - 1.0).abs() < 1e-12);
        c.layers = 0;
        assert_eq!(decoder_flops(&c, 300, 0, 1), 2.0 * h * v);
    }
}
