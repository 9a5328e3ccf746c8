//! Flags, commands and output formatting.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use qvc_model::chat::{format_query, make_context, stop_ids, Turn, DEFAULT_SYSTEM};
use qvc_model::grounding::{box_outputs, draw_groundings, parse_groundings, BoxOut, Grounding};
use qvc_model::image::{load_rgb, save_png};
use qvc_model::sampling::SamplingParams;
use qvc_model::tokenizer::Specials;
use qvc_model::{generate, GenerateOptions, LoadOptions, Model, Phase, PrefillOptions, Session};
use qvc_runtime::Cpu;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "qvc",
    version,
    about = "Run Qwen-VL / Qwen-VL-Chat: describe pictures, answer questions about them, read text, locate things as boxes.",
    long_about = "qvc runs Qwen-VL-Chat checkpoints (the Hugging Face directory: config.json, generation_config.json, \
qwen.tiktoken and the safetensors weights) on the CPU, in f32, with the weights memory-mapped, or compiles them \
once into an artifact (fused programs, memory plans, repacked weights, PTX for NVIDIA GPUs) that runs the same way.\n\n\
Start with `qvc demo` (no download needed: a tiny random-weight model), then\n  \
qvc generate --model ./Qwen-VL-Chat --image cat.jpg --prompt 'What is in the picture?'\n  \
qvc chat --model ./Qwen-VL-Chat --image street.png\n  \
qvc compile ./Qwen-VL-Chat -o chat.qvc && qvc generate chat.qvc --image cat.jpg --prompt 'Describe it.'"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One chat turn: picture(s) and a question in, the answer streamed out.
    #[command(
        after_help = "Examples:\n  qvc generate --model ./Qwen-VL-Chat --image dog.jpg --prompt 'Where is the dog?' --draw-boxes out.png\n  \
qvc generate --model ./Qwen-VL-Chat --image a.png --image b.png --prompt 'What differs?' --temperature 0\n  \
qvc generate --model ./Qwen-VL-Chat --raw-prompt-file prompt.txt --json"
    )]
    Generate(GenerateArgs),
    /// Interactive multi-turn chat (`/image PATH`, `/reset`, `/quit`).
    Chat(ChatArgs),
    /// Write the logits of a prompt to a safetensors file (tensor `logits`, f32 [positions, vocab]).
    Logits(LogitsArgs),
    /// Print the token ids of a text as JSON: {"ids": [...]}.
    Tokenize(TokenizeArgs),
    /// Write a tiny random-weight checkpoint and a picture to a temporary folder and run one turn on it.
    Demo(DemoArgs),
    /// Time the vision tower, time to first token, prefill and decode against the device's measured ceilings.
    #[command(after_help = "Examples:\n  qvc bench chat.qvc --device cuda\n  \
qvc bench --synthetic qwen-vl-chat --device cuda   # full size, random weights, no download\n  \
qvc bench --synthetic tiny --device emu --prompt-len 8 --decode-tokens 2")]
    Bench(BenchArgs),
    /// Load-test a running `qvc serve` (or any OpenAI-compatible server): streamed requests at each concurrency
    /// level; aggregate tokens/s, time to first token p50/p99, inter-token and end-to-end latency.
    BenchServe(crate::bench_serve::BenchServeArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (chat completions with pictures, streaming, many
    /// conversations at once).
    #[command(
        after_help = "`qvc serve --help` shows a curl example, the endpoints and the rules for pictures.",
        after_long_help = crate::serve_cmd::SERVE_EXAMPLES
    )]
    Serve(crate::serve_cmd::ServeArgs),
    /// Print a checkpoint's configuration, tensor count and program sizes, or (given OUT.qvc) a compiled artifact's programs, kernels and memory plans.
    #[command(
        after_help = "Examples:\n  qvc inspect --model ./Qwen-VL-Chat\n  qvc inspect model.qvc            # programs, fused nodes, launches, memory\n  \
qvc inspect model.qvc --verify   # also check the weights checksum (reads the whole file)"
    )]
    Inspect(InspectArgs),
    /// Compile a checkpoint into an artifact directory (OUT.qvc): optimised programs, memory plans, kernels, repacked weights.
    #[command(after_help = "Examples:\n  qvc compile ./Qwen-VL-Chat -o chat.qvc\n  \
qvc compile ./Qwen-VL-Chat -o chat-h100.qvc --target sm_90 --image-size 896 --vit-attention window:16,global-every:8\n  \
qvc compile --synthetic qwen-vl-chat --dry-run --target sm_90   # full-size plan, no checkpoint needed")]
    Compile(CompileArgs),
    /// List the GPUs the NVIDIA driver sees (and the compile target each gets), or say there is none.
    Devices,
    /// List the GPU kernels the full-size model uses, write their PTX, check them with ptxas.
    #[command(
        after_help = "Examples:\n  qvc kernels                          # every kernel: launch, work, H100 time floor\n  \
qvc kernels --filter attn --ptxas     # registers, spills and shared memory from ptxas\n  \
qvc kernels --ptx kernels.ptx --target sm_80"
    )]
    Kernels(KernelsArgs),
    /// Check every GPU kernel family on the device against its CPU reference (random ragged shapes).
    #[command(hide = true)]
    Selftest(SelftestArgs),
}

#[derive(Args)]
struct SelftestArgs {
    /// `emu` (the PTX emulator), `cuda` or `cuda:N`.
    #[arg(long, default_value = "emu", value_name = "DEVICE")]
    device: String,
    /// Random cases per family.
    #[arg(long, default_value_t = 4, value_name = "N")]
    cases: usize,
    /// Small shapes only (quick on the emulator).
    #[arg(long)]
    small: bool,
    /// Seed of the random shapes and data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args)]
struct KernelsArgs {
    /// Only kernels whose family or name contains this text (e.g. `gemm`, `flash`, `d104`).
    #[arg(long)]
    filter: Option<String>,
    /// GPU architecture the PTX is printed for.
    #[arg(long, default_value = "sm_90", value_parser = ["sm_80", "sm_90"])]
    target: String,
    /// Write the listed kernels as one PTX module to this file.
    #[arg(long, value_name = "FILE")]
    ptx: Option<PathBuf>,
    /// Overwrite the --ptx file if it exists.
    #[arg(long)]
    force: bool,
    /// Assemble with ptxas ($QVC_PTXAS, PATH, or .tools/bin from scripts/install-ptxas.sh) and show its usage.
    #[arg(long)]
    ptxas: bool,
}

#[derive(Args)]
struct InspectArgs {
    /// A compiled artifact directory (OUT.qvc) to describe.
    #[arg(value_name = "OUT.qvc", conflicts_with = "model")]
    artifact: Option<PathBuf>,
    /// Checkpoint directory (or a compiled artifact directory).
    #[arg(long, short = 'm', env = "QVC_MODEL", value_name = "DIR")]
    model: Option<PathBuf>,
    /// Use this config.json instead of the checkpoint's own.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// For an artifact: read the whole weights file and check its checksum.
    #[arg(long)]
    verify: bool,
}

#[derive(Args)]
struct CompileArgs {
    /// Checkpoint directory, or a .safetensors file with config.json and qwen.tiktoken beside it.
    #[arg(value_name = "SRC", required_unless_present = "synthetic", conflicts_with = "synthetic")]
    src: Option<PathBuf>,
    /// The artifact directory to write (e.g. model.qvc). Not replaced unless --force.
    #[arg(short = 'o', long = "out", value_name = "OUT.qvc", required_unless_present = "dry_run")]
    out: Option<PathBuf>,
    /// What the artifact runs on: cpu, sm_80 (A100, Ada) or sm_90 (H100) [default: the first GPU's, else cpu].
    #[arg(long, value_parser = ["cpu", "sm_80", "sm_90"])]
    target: Option<String>,
    /// Stored dtype of the weights in the artifact.
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f16", "f32"])]
    dtype: String,
    /// Picture size the vision program is compiled for (a multiple of the 14-pixel patch, e.g. 448 or 896) [default: the config's].
    #[arg(long, value_name = "N")]
    image_size: Option<usize>,
    /// ViT attention: `global`, `window:W` or `window:W,global-every:N`.
    #[arg(long, default_value = "global", value_name = "MODE")]
    vit_attention: String,
    /// Longest prompt + answer the programs and the KV cache are sized for.
    #[arg(long, default_value_t = 2048, value_name = "N")]
    max_seq: usize,
    /// Sequences decoded together (sizes the KV cache and the decode kernels).
    #[arg(long, default_value_t = 1, value_name = "N")]
    max_batch: usize,
    /// Pictures per prompt the prefill programs are compiled for.
    #[arg(long, default_value_t = 1, value_name = "N")]
    max_images: usize,
    /// Replace an existing artifact at -o.
    #[arg(long)]
    force: bool,
    /// Run the whole pipeline and print the summary without writing anything.
    #[arg(long)]
    dry_run: bool,
    /// Compile a full-size model from its published shapes instead of a checkpoint (with --dry-run): qwen-vl-chat.
    #[arg(long, value_name = "NAME")]
    synthetic: Option<String>,
}

#[derive(Args, Clone)]
pub(crate) struct ModelArgs {
    /// The model: a `qvc compile` artifact (OUT.qvc), a checkpoint directory, or a .safetensors file with config.json
    /// and qwen.tiktoken beside it. The same as --model.
    #[arg(value_name = "MODEL")]
    path: Option<PathBuf>,
    /// Checkpoint directory (config.json, qwen.tiktoken, model.safetensors or shards + index), a .safetensors file
    /// with those beside it, or a `qvc compile` artifact.
    #[arg(long, short = 'm', env = "QVC_MODEL", value_name = "DIR")]
    model: Option<PathBuf>,
    /// Use this config.json instead of the checkpoint's own.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where to run: `cpu`, `cuda` or `cuda:N` (an NVIDIA GPU, compute capability 8.0+), `emu` (the GPU code path
    /// in the PTX emulator: slow, for checking kernels without a GPU), or `auto`: the first GPU when the driver
    /// finds one and the model can run there, else the CPU.
    #[arg(long, default_value = "auto", value_name = "DEVICE", env = "QVC_DEVICE", value_parser = parse_device)]
    pub(crate) device: String,
}

fn parse_device(s: &str) -> Result<String, String> {
    DeviceChoice::parse(s).map(|_| s.to_string()).map_err(|e| e.to_string())
}

/// A progress bar on stderr while weights upload to the device (hidden when
/// stderr is not a terminal; finished when a batch of uploads completes).
fn with_upload_bar(mut b: qvc_runtime::gpu::GpuBackend) -> qvc_runtime::gpu::GpuBackend {
    let bar = std::sync::Mutex::new(None::<indicatif::ProgressBar>);
    b.set_progress(Box::new(move |done, total| {
        let Ok(mut bar) = bar.lock() else { return };
        let pb = bar.get_or_insert_with(|| {
            let pb = indicatif::ProgressBar::new(total);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "uploading weights {bar:30} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} [{elapsed}]",
                )
                .expect("valid template"),
            );
            pb
        });
        pb.set_length(total);
        pb.set_position(done);
        if done >= total {
            pb.finish_and_clear();
            *bar = None;
        }
    }));
    b
}

/// Where a model runs (`--device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
    Emu,
    Auto,
}

impl DeviceChoice {
    pub fn parse(s: &str) -> Result<DeviceChoice> {
        let s = s.trim().to_ascii_lowercase();
        Ok(match s.as_str() {
            "cpu" => DeviceChoice::Cpu,
            "emu" | "emulator" => DeviceChoice::Emu,
            "auto" => DeviceChoice::Auto,
            "cuda" | "gpu" => DeviceChoice::Cuda(0),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => DeviceChoice::Cuda(n),
                _ => bail!("{s:?} is not a device: expected cpu, cuda, cuda:N (e.g. cuda:1), emu or auto"),
            },
        })
    }
}

/// KV-cache rows a GPU backend gets for a checkpoint (an artifact has its own `--max-seq`).
pub const GPU_CHECKPOINT_MAX_SEQ: usize = 2048;

/// The backend `--device` asks for: the CPU, or a GPU executor (CUDA or the
/// emulator) with a device KV cache for `slots` sequences.
pub fn make_backend(model: &Model, device: &str, slots: usize) -> Result<Box<dyn qvc_runtime::Backend>> {
    use qvc_runtime::gpu::{CudaDevice, EmuDevice};
    let choice = DeviceChoice::parse(device)?;
    let gpu_artifact = model.compiled().is_none_or(|m| m.options.target != "cpu");
    let max_seq = model.compiled().map_or(GPU_CHECKPOINT_MAX_SEQ, |m| m.options.max_seq);
    let choice = match choice {
        DeviceChoice::Auto => match qvc_runtime::cuda::gpus() {
            Ok(g) if g.first().and_then(|g| g.target()).is_some() => {
                if model.compiled().is_some() && gpu_artifact {
                    DeviceChoice::Cuda(0)
                } else {
                    // A checkpoint builds its graphs per step; an artifact
                    // compiled for the GPU is what runs fast there.
                    let what = if model.compiled().is_some() {
                        "this artifact was compiled for the CPU"
                    } else {
                        "this is a checkpoint"
                    };
                    eprintln!(
                        "[qvc] running on the CPU although a GPU is present ({what}): `qvc compile MODEL -o model.qvc` \
                         compiles it for the GPU, or pass --device cuda to run it there as is"
                    );
                    DeviceChoice::Cpu
                }
            }
            _ => DeviceChoice::Cpu,
        },
        c => c,
    };
    Ok(match choice {
        DeviceChoice::Cpu | DeviceChoice::Auto => Box::new(Cpu),
        DeviceChoice::Emu => {
            let target = model
                .compiled()
                .and_then(|m| crate::compile::Target::parse(&m.options.target))
                .and_then(|t| match t {
                    crate::compile::Target::Gpu(t) => Some(t),
                    crate::compile::Target::Cpu => None,
                })
                .unwrap_or(qvc_codegen::Target::Sm80);
            eprintln!("[qvc] running on the PTX emulator ({}): slow, for checking the GPU path", target.name());
            Box::new(with_upload_bar(model.gpu_backend(Box::new(EmuDevice::new(target)), slots, max_seq)?))
        }
        DeviceChoice::Cuda(n) => {
            let dev = CudaDevice::open(n)?;
            eprintln!("[qvc] running on GPU {n}: {}", qvc_runtime::gpu::Device::name(&dev));
            Box::new(with_upload_bar(model.gpu_backend(Box::new(dev), slots, max_seq)?))
        }
    })
}

#[derive(Args, Clone)]
struct PromptArgs {
    /// A picture to ask about (PNG, JPEG, WebP, GIF, BMP). Repeat for several: they become "Picture 1:", "Picture 2:", ...
    #[arg(long, short = 'i', value_name = "PATH")]
    image: Vec<PathBuf>,
    /// The question or instruction.
    #[arg(long, short = 'p', value_name = "TEXT")]
    prompt: Option<String>,
    /// The system message.
    #[arg(long, default_value = DEFAULT_SYSTEM, value_name = "TEXT")]
    system: String,
    /// A file holding a complete prompt (ChatML written out); tokenized with every special token allowed. Image paths in it resolve against the current directory.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["prompt", "image", "prompt_tokens"])]
    raw_prompt_file: Option<PathBuf>,
    /// A JSON array of token ids used as the prompt as is (images come from its <img> spans).
    #[arg(long, value_name = "FILE.json", conflicts_with_all = ["prompt", "image"])]
    prompt_tokens: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Most tokens to generate [default: generation_config.json's max_new_tokens, 512].
    #[arg(long, value_name = "N")]
    max_new_tokens: Option<usize>,
    /// Sampling temperature; 0 = greedy [default: 1, or greedy if generation_config.json has do_sample false].
    #[arg(long, short = 't', value_name = "T")]
    temperature: Option<f32>,
    /// Nucleus sampling mass [default: generation_config.json's top_p].
    #[arg(long, value_name = "P")]
    top_p: Option<f32>,
    /// Keep only the K likeliest tokens; 0 = off [default: generation_config.json's top_k].
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// Penalise tokens already seen; 1 = off.
    #[arg(long, value_name = "R")]
    repetition_penalty: Option<f32>,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print one JSON object (prompt_tokens, tokens, text, boxes, timings) instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Draw the answer's boxes and labels on the picture they refer to and save it here (PNG). An existing file is not overwritten unless --force.
    #[arg(long, value_name = "OUT.png")]
    draw_boxes: Option<PathBuf>,
    /// Allow --draw-boxes to overwrite an existing file.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Pictures for the first question.
    #[arg(long, short = 'i', value_name = "PATH")]
    image: Vec<PathBuf>,
    /// The system message.
    #[arg(long, default_value = DEFAULT_SYSTEM)]
    system: String,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// Output safetensors file. Not overwritten unless --force.
    #[arg(long, value_name = "OUT.safetensors")]
    out: PathBuf,
    /// Logits for every prompt position, not just the last.
    #[arg(long)]
    all_positions: bool,
    /// Allow overwriting --out.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text.
    #[arg(long, conflicts_with = "text_file", required_unless_present = "text_file")]
    text: Option<String>,
    /// A file whose bytes are the text, exactly (no newline trimmed).
    #[arg(long, value_name = "FILE")]
    text_file: Option<PathBuf>,
    /// Tokenize as chat content: only <img> <ref> <box> <quad> tags are special, <|im_start|> is plain text.
    #[arg(long)]
    chat: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// Where to write the demo checkpoint [default: a folder in the system temp dir].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The question to ask about the demo picture.
    #[arg(long, default_value = "What is in this picture? Outline the red square.")]
    prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 24)]
    max_new_tokens: usize,
    /// Where to run it: `cpu`, `cuda`/`cuda:N`, or `emu` (the GPU code path on the PTX emulator, seconds here).
    #[arg(long, default_value = "cpu", value_name = "DEVICE", value_parser = parse_device)]
    device: String,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 300)]
    prompt_len: usize,
    /// Decode steps to time.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Also time decoding this many sequences together, each in its own KV slot [default: 8 on a GPU, 1 on the
    /// CPU]; a compiled model on the CPU needs --max-batch of at least this.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    batch: Option<u16>,
    /// Random weights with published shapes instead of a model: qwen-vl-chat (full size, GPU only) or tiny (the
    /// test fixture's shapes, runs anywhere in seconds).
    #[arg(long, value_name = "NAME")]
    synthetic: Option<String>,
    /// Picture sizes the vision tower is timed at (comma-separated) [default: 448,896 with --synthetic, else the
    /// model's].
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    image_sizes: Vec<usize>,
    /// After the table, time every kernel of one vision run, one prefill and one decode step on their own (GPU or
    /// emulator) and print where the time goes, with each kernel's TFLOP/s and GB/s.
    #[arg(long)]
    profile: bool,
}

/// Entry point of both binaries; `forced` is the subcommand the `generate` binary implies.
pub fn main_with(forced: Option<&str>) -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(cmd) = forced {
        args.insert(1, cmd.into());
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Chat(a) => cmd_chat(a),
        Cmd::Logits(a) => cmd_logits(a),
        Cmd::Tokenize(a) => cmd_tokenize(a),
        Cmd::Demo(a) => crate::demo::run(a.dir, &a.prompt, a.max_new_tokens, &a.device),
        Cmd::Bench(a) => cmd_bench(a),
        Cmd::BenchServe(a) => crate::bench_serve::run(a),
        Cmd::Serve(a) => crate::serve_cmd::run(a),
        Cmd::Inspect(a) => cmd_inspect(a),
        Cmd::Kernels(a) => cmd_kernels(a),
        Cmd::Devices => cmd_devices(),
        Cmd::Compile(a) => cmd_compile(a),
        Cmd::Selftest(a) => cmd_selftest(a),
    }
}

impl ModelArgs {
    /// The model path, given as MODEL or --model (or $QVC_MODEL).
    pub(crate) fn path(&self) -> Result<&Path> {
        match (&self.path, &self.model) {
            (Some(p), Some(m)) if p != m => {
                bail!("two models given: {} and --model {}; give one", p.display(), m.display())
            }
            (Some(p), _) | (None, Some(p)) => Ok(p),
            (None, None) => bail!(
                "no model given: pass a checkpoint directory or a compiled OUT.qvc, as `--model DIR` or as the first \
                 argument (or set QVC_MODEL)"
            ),
        }
    }
}

pub(crate) fn load(m: &ModelArgs) -> Result<Model> {
    let t0 = Instant::now();
    let path = m.path()?;
    let model = Model::load(path, &LoadOptions { config: m.config.clone(), ..Default::default() })?;
    let kind = if model.compiled().is_some() { "compiled model" } else { "checkpoint" };
    eprintln!(
        "[qvc] loaded {kind} {} ({:.2} GB of weights, {} decoder layers, {} vision layers) in {:.2} s",
        path.display(),
        model.weights.total_bytes() as f64 / 1e9,
        model.config.layers,
        model.config.visual.layers,
        t0.elapsed().as_secs_f64()
    );
    Ok(model)
}

/// A spinner on stderr while pictures are encoded and the prompt is read
/// (minutes for the full model on a CPU); hidden when stderr is not a terminal.
fn attach_progress(session: &mut Session) {
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut show = move |msg: String| {
        let b = bar.get_or_insert_with(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("valid template"),
            );
            b.enable_steady_tick(std::time::Duration::from_millis(120));
            b
        });
        if msg.is_empty() {
            b.finish_and_clear();
            bar = None;
        } else {
            b.set_message(msg);
        }
    };
    session.on_phase(move |p| match p {
        Phase::Vision { index, total, path } => show(format!("encoding picture {}/{total} ({path})", index + 1)),
        Phase::Prefill { tokens } => show(format!("reading the prompt ({tokens} tokens)")),
        Phase::Decode => show(String::new()),
    });
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str().map(str::to_string).with_context(|| format!("image path {} is not valid UTF-8", p.display()))
}

/// Token ids for the prompt flags, plus the pictures it mentions.
fn prompt_ids(model: &Model, p: &PromptArgs, history: &[Turn]) -> Result<Vec<u32>> {
    let tok = &model.tokenizer;
    if let Some(f) = &p.raw_prompt_file {
        let bytes = std::fs::read(f).with_context(|| format!("cannot read --raw-prompt-file {}", f.display()))?;
        let text = String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8 text", f.display()))?;
        return Ok(tok.encode(&text, Specials::All)?);
    }
    if let Some(f) = &p.prompt_tokens {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("cannot read --prompt-tokens {}", f.display()))?;
        let ids: Vec<u32> = serde_json::from_str(&text).with_context(|| {
            format!("{} must hold a JSON array of non-negative token ids, like [151644, 8948]", f.display())
        })?;
        return Ok(ids);
    }
    let Some(question) = &p.prompt else {
        bail!(
            "nothing to ask: give --prompt TEXT (with --image PATH for pictures), --raw-prompt-file or --prompt-tokens"
        );
    };
    for img in &p.image {
        if !img.exists() {
            bail!("--image {}: no such file", img.display());
        }
    }
    let images: Vec<String> = p.image.iter().map(|i| path_str(i)).collect::<Result<_>>()?;
    let query = format_query(&images, question);
    Ok(make_context(tok, &p.system, history, &query, model.generation.max_window_size)?)
}

fn sampling_params(model: &Model, s: &SamplingArgs) -> Result<(SamplingParams, usize)> {
    let g = &model.generation;
    let default_t = if g.do_sample { g.temperature } else { 0.0 };
    let p = SamplingParams {
        temperature: s.temperature.unwrap_or(default_t),
        top_p: s.top_p.unwrap_or(g.top_p),
        top_k: s.top_k.unwrap_or(g.top_k),
        repetition_penalty: s.repetition_penalty.unwrap_or(g.repetition_penalty),
        seed: s.seed,
    };
    p.validate().map_err(anyhow::Error::msg)?;
    Ok((p, s.max_new_tokens.unwrap_or(g.max_new_tokens)))
}

fn refuse_overwrite(path: &Path, force: bool, flag: &str) -> Result<()> {
    if path.exists() && !force {
        bail!("{} already exists; pass --force to overwrite it or choose another {flag}", path.display());
    }
    Ok(())
}

/// The boxes of an answer, in pixels of the last picture of the prompt (the
/// reference draws on the latest picture too).
fn boxes_for(model: &Model, prompt: &[u32], text: &str) -> Result<(Vec<Grounding>, Vec<BoxOut>, Option<String>)> {
    let items = parse_groundings(text);
    let spans = model.tokenizer.image_spans(prompt)?;
    let image = spans.last().map(|s| s.path.clone());
    let dims = match &image {
        Some(p) if !items.is_empty() => Some(load_rgb(Path::new(p)).map(|i| (i.width, i.height))?),
        _ => None,
    };
    let picture = image.as_deref().zip(dims).map(|(name, (w, h))| (name, w, h));
    let out = box_outputs(&items, picture);
    Ok((items, out, image))
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    if let Some(out) = &a.draw_boxes {
        refuse_overwrite(out, a.force, "--draw-boxes path")?;
    }
    let model = load(&a.model)?;
    let prompt = prompt_ids(&model, &a.prompt, &[])?;
    let (sampling, max_new) = sampling_params(&model, &a.sampling)?;
    let backend = make_backend(&model, &a.model.device, 1)?;
    let mut session = Session::new(&model, backend.as_ref());
    attach_progress(&mut session);
    let opt = GenerateOptions { max_new_tokens: max_new, sampling, stop_ids: stop_ids(&model.tokenizer) };
    let json = a.json;
    let mut stdout = std::io::stdout();
    let gen = generate(&mut session, &prompt, &opt, &mut |t| {
        if !json {
            let _ = stdout.write_all(t.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    if !json {
        println!();
    }
    let (items, boxes, image) = boxes_for(&model, &prompt, &gen.text)?;
    let t = &session.timings;
    if json {
        let v = serde_json::json!({
            "prompt_tokens": prompt,
            "tokens": gen.tokens,
            "text": gen.text,
            "stop": gen.stop,
            "boxes": boxes,
            "timings": {
                "vision_ms": t.vision_ms,
                "prefill_ms": t.prefill_ms,
                "decode_tokens_per_s": t.decode_tokens_per_s(),
                "decode_tokens": t.decode_tokens,
            },
        });
        println!("{}", serde_json::to_string(&v)?);
    } else {
        for b in &boxes {
            eprintln!(
                "[box] {:?} {:?} (of 1000) -> {} in {}",
                b.label.as_deref().unwrap_or("(no label)"),
                b.box_1000,
                b.box_px.as_ref().map_or("no picture".into(), |p| format!("{p:?} px")),
                b.image.as_deref().unwrap_or("-")
            );
        }
        eprintln!(
            "[qvc] {} prompt tokens, {} new; vision {:.0} ms, prefill {:.0} ms, decode {:.2} tokens/s",
            prompt.len(),
            gen.tokens.len(),
            t.vision_ms,
            t.prefill_ms,
            t.decode_tokens_per_s()
        );
    }
    if let Some(out) = &a.draw_boxes {
        let Some(img) = image else { bail!("--draw-boxes: the prompt has no picture to draw on") };
        let pic = load_rgb(Path::new(&img))?;
        save_png(&draw_groundings(&pic, &items), out)?;
        eprintln!("[qvc] drew {} region(s) on {img} -> {}", items.len(), out.display());
    }
    Ok(())
}

/// A picture for the chat engine: its bytes' key, named by its path in the prompt.
fn chat_image(model: &Model, path: &Path) -> Result<qvc_serve::ImageInput> {
    let name = path_str(path)?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let img = qvc_model::image::decode_rgb(&bytes, &name)?;
    let px = qvc_model::image::preprocess_rgb(&img, model.config.visual.image_size as u32, &name)?;
    Ok(qvc_serve::ImageInput {
        key: qvc_serve::ImageKey::of(&bytes),
        name,
        width: img.width,
        height: img.height,
        pixels: Some(std::sync::Arc::new(px)),
    })
}

/// Prefill chunk of `qvc chat` (see [`cmd_chat`]).
const CHAT_PREFILL_CHUNK: usize = 64;

/// `qvc chat` drives the serving engine with one KV slot: each turn's prompt
/// starts with the previous turn's, so only the new tokens are prefilled
/// (on a checkpoint run on the CPU; see `qvc_serve`), and each picture is
/// encoded once.
fn cmd_chat(a: ChatArgs) -> Result<()> {
    use qvc_serve::{Engine, EngineConfig, Event, GenRequest};
    let model = std::sync::Arc::new(load(&a.model)?);
    let (sampling, max_new) = sampling_params(&model, &a.sampling)?;
    let (m, device) = (model.clone(), a.model.device.clone());
    // Chunks of 64 rows: a turn reuses the previous prompt's rows up to its
    // last multiple of 64 (the default 512 would reuse nothing in a short
    // conversation). Answers may then differ from `qvc generate`'s 512-row
    // chunks in the last bits of the logits.
    let cfg = EngineConfig { max_batch: 1, max_queue: 1, prefill_chunk: CHAT_PREFILL_CHUNK, ..Default::default() };
    let engine = Engine::start(
        cfg,
        Box::new(move |slots| {
            let backend = make_backend(&m, &device, slots)?;
            Ok((m, backend))
        }),
    );
    loop {
        match engine.state() {
            qvc_serve::EngineState::Loading => std::thread::sleep(std::time::Duration::from_millis(20)),
            qvc_serve::EngineState::Failed(why) => bail!("{why}"),
            _ => break,
        }
    }
    let mut history: Vec<Turn> = Vec::new();
    // Every picture of the conversation, by its name in the prompt.
    let mut pictures: Vec<qvc_serve::ImageInput> = Vec::new();
    let mut pending: Vec<PathBuf> = a.image.clone();
    eprintln!("Type a message. Commands: /image PATH (attach a picture to the next message), /reset, /quit.");
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("\n> ");
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let msg = line.trim_end_matches(['\n', '\r']);
        if msg.trim().is_empty() {
            continue;
        }
        if msg == "/quit" || msg == "/exit" {
            break;
        }
        if msg == "/reset" {
            history.clear();
            pending.clear();
            pictures.clear();
            eprintln!("(history cleared)");
            continue;
        }
        if let Some(p) = msg.strip_prefix("/image") {
            let p = PathBuf::from(p.trim());
            match load_rgb(&p) {
                Ok(i) => {
                    eprintln!("(attached {} {}×{})", p.display(), i.width, i.height);
                    pending.push(p);
                }
                Err(e) => eprintln!("error: {e}"),
            }
            continue;
        }
        if msg.starts_with('/') {
            eprintln!("unknown command {msg:?}: use /image PATH, /reset or /quit");
            continue;
        }
        let pa = PromptArgs {
            image: pending.clone(),
            prompt: Some(msg.to_string()),
            system: a.system.clone(),
            raw_prompt_file: None,
            prompt_tokens: None,
        };
        let turn = || -> Result<(Vec<u32>, Vec<qvc_serve::ImageInput>)> {
            let ids = prompt_ids(&model, &pa, &history)?;
            let mut known = pictures.clone();
            for p in &pending {
                known.push(chat_image(&model, p)?);
            }
            let spans = model.tokenizer.image_spans(&ids)?;
            let images = spans
                .iter()
                .map(|s| {
                    known.iter().rev().find(|i| i.name == s.path).cloned().with_context(|| format!("no picture {}", s.path))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((ids, images))
        };
        let (ids, images) = match turn() {
            Ok(x) => x,
            Err(e) => {
                eprintln!("error: {e:#}");
                continue;
            }
        };
        let req = GenRequest {
            sampling: sampling.clone(),
            ..GenRequest::greedy(ids.clone(), images.clone(), max_new, stop_ids(&model.tokenizer))
        };
        let (tx, rx) = std::sync::mpsc::channel();
        if let Err(e) = engine.submit(req, Box::new(move |ev| tx.send(ev).is_ok())) {
            eprintln!("error: {e}");
            continue;
        }
        let mut stdout = std::io::stdout();
        let mut cached = 0;
        for ev in rx {
            match ev {
                Event::Started { cached_tokens, .. } => cached = cached_tokens,
                Event::Delta { text, .. } => {
                    let _ = stdout.write_all(text.as_bytes());
                    let _ = stdout.flush();
                }
                Event::Done { usage, text, .. } => {
                    println!();
                    if let Ok((_, boxes, _)) = boxes_for(&model, &ids, &text) {
                        for b in boxes {
                            eprintln!(
                                "[box] {:?} {:?}",
                                b.label.as_deref().unwrap_or("-"),
                                b.box_px.unwrap_or(b.box_1000)
                            );
                        }
                    }
                    eprintln!(
                        "[qvc] {} prompt tokens ({} reused from the previous turn, {} prefilled), {} new",
                        usage.prompt_tokens,
                        cached,
                        usage.prompt_tokens - cached,
                        usage.completion_tokens
                    );
                    let names: Vec<String> = pending.iter().filter_map(|p| p.to_str().map(str::to_string)).collect();
                    history.push(Turn { query: format_query(&names, msg), response: text });
                    for img in &images {
                        if !pictures.iter().any(|p| p.name == img.name && p.key == img.key) {
                            pictures.push(img.clone());
                        }
                    }
                    pending.clear();
                    break;
                }
                Event::Error(e) => {
                    eprintln!("error: {e}");
                    break;
                }
            }
        }
    }
    engine.shutdown();
    Ok(())
}

fn cmd_logits(a: LogitsArgs) -> Result<()> {
    refuse_overwrite(&a.out, a.force, "--out path")?;
    let model = load(&a.model)?;
    let prompt = prompt_ids(&model, &a.prompt, &[])?;
    let backend = make_backend(&model, &a.model.device, 1)?;
    let mut session = Session::new(&model, backend.as_ref());
    attach_progress(&mut session);
    let out = session.prefill(&prompt, &PrefillOptions { all_logits: a.all_positions, hidden: false })?;
    let v = model.config.vocab_size;
    let rows = out.logits.len() / v;
    let bytes: &[u8] = bytemuck::cast_slice(&out.logits);
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![rows, v], bytes)?;
    safetensors::tensor::serialize_to_file([("logits", view)], None, &a.out)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    eprintln!("[qvc] wrote logits [{rows}, {v}] of {} prompt tokens to {}", prompt.len(), a.out.display());
    Ok(())
}

fn cmd_tokenize(a: TokenizeArgs) -> Result<()> {
    let path = a.model.path()?;
    let dir = if path.is_dir() { path.to_path_buf() } else { path.parent().map(Path::to_path_buf).unwrap_or_default() };
    let tok = qvc_model::tokenizer::QwenTokenizer::from_file(&dir.join("qwen.tiktoken"))?;
    let text = match (&a.text, &a.text_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => {
            let b = std::fs::read(f).with_context(|| format!("cannot read --text-file {}", f.display()))?;
            String::from_utf8(b).with_context(|| format!("{} is not UTF-8 text", f.display()))?
        }
        (None, None) => bail!("give --text or --text-file"),
    };
    let ids = tok.encode(&text, if a.chat { Specials::ImageTags } else { Specials::All })?;
    println!("{}", serde_json::json!({ "ids": ids }));
    Ok(())
}

fn cmd_compile(a: CompileArgs) -> Result<()> {
    use crate::compile::{compile, CompileOptions, SourceSpec, Target};
    use qvc_ir::DType;
    let src = match (&a.src, &a.synthetic) {
        (_, Some(name)) => SourceSpec::Synthetic(name.clone()),
        (Some(p), None) => SourceSpec::Checkpoint(p.clone()),
        (None, None) => bail!("give the checkpoint to compile (SRC) or --synthetic qwen-vl-chat --dry-run"),
    };
    let opt = CompileOptions {
        target: match &a.target {
            Some(t) => Target::parse(t).context("unknown --target")?,
            None => default_target(),
        },
        dtype: match a.dtype.as_str() {
            "f32" => DType::F32,
            "f16" => DType::F16,
            _ => DType::BF16,
        },
        image_size: a.image_size,
        vit_attention: a.vit_attention.clone(),
        max_seq: a.max_seq,
        max_batch: a.max_batch,
        max_images: a.max_images,
        force: a.force,
        dry_run: a.dry_run,
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg} [{elapsed}]")
            .expect("valid template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let report = compile(&src, a.out.as_deref(), &opt, &bar);
    bar.finish_and_clear();
    print!("{}", report?);
    Ok(())
}

fn cmd_inspect(a: InspectArgs) -> Result<()> {
    let path = a.artifact.clone().or_else(|| a.model.clone().filter(|m| qvc_runtime::artifact::is_artifact(m)));
    if let Some(dir) = path {
        return inspect_artifact(&dir, a.verify);
    }
    let Some(model) = a.model else {
        bail!("give a compiled artifact (qvc inspect OUT.qvc) or a checkpoint (--model DIR)");
    };
    let a = ModelArgs { path: None, model: Some(model), config: a.config, device: "cpu".into() };
    let model = load(&a)?;
    let c = &model.config;
    println!(
        "decoder: hidden {} × {} layers, {} heads of {}, MLP {}, vocab {}",
        c.hidden_size, c.layers, c.heads, c.head_dim, c.mlp_width, c.vocab_size
    );
    println!("  seq_length {}, dynamic NTK {}, logn {}", c.seq_length, c.use_dynamic_ntk, c.use_logn_attn);
    let v = &c.visual;
    println!(
        "vision: width {} × {} layers, {} heads, MLP {}, {}px / {}px patches, output {}",
        v.width, v.layers, v.heads, v.mlp_width, v.image_size, v.patch_size, v.output_dim
    );
    println!("tensors: {} ({:.3} GB)", model.weights.names().len(), model.weights.total_bytes() as f64 / 1e9);
    let vg = model.vision_graph(&Default::default())?;
    let pg = qvc_model::graphs::decoder_graph(
        c,
        &model.weights,
        &qvc_model::graphs::DecoderShape { tokens: 300, ..Default::default() },
    )?;
    println!("programs: vision {} nodes, prefill(300) {} nodes", vg.nodes.len(), pg.nodes.len());
    Ok(())
}

fn inspect_artifact(dir: &Path, verify: bool) -> Result<()> {
    use qvc_runtime::artifact::{Artifact, CPU_FALLBACK};
    let t0 = Instant::now();
    let art = if verify { Artifact::open_verified(dir)? } else { Artifact::open(dir)? };
    let m = &art.manifest;
    let o = &m.options;
    println!("artifact {} (format {}, qvc {})", dir.display(), m.format_version, m.qvc_version);
    println!(
        "source: {} (config fnv64 {}, checkpoint fingerprint {}, {:.3} GB)",
        m.source.path,
        m.source.config_fnv64,
        m.source.checkpoint_fingerprint,
        m.source.checkpoint_bytes as f64 / 1e9
    );
    println!(
        "options: target {}, dtype {}, image {}px, vit attention {}, max seq {}, max batch {}, max images {}",
        o.target, o.dtype, o.image_size, o.vit_attention, o.max_seq, o.max_batch, o.max_images
    );
    println!(
        "weights: {} ({} tensors, {:.1} MiB, fnv64 {}{})",
        m.weights.file,
        m.weights.tensors,
        m.weights.bytes as f64 / 1048576.0,
        m.weights.fnv64,
        if verify { ", verified" } else { ", not verified: pass --verify" }
    );
    println!("KV cache: {:.1} MiB; kernels: {}", m.kv_cache_bytes as f64 / 1048576.0, m.kernels.len());
    for f in &m.files {
        println!("  file {} ({} bytes)", f.name, f.bytes);
    }
    for (name, p) in &m.programs {
        println!(
            "program {name} ({}, tokens {}, past {}, image rows {}): {} nodes ({} before the passes), {} fused, {} unfused",
            p.kind, p.tokens, p.past, p.image_rows, p.stats.nodes_after, p.stats.nodes_before, p.stats.fused, p.stats.unfused
        );
        let sig = |v: &[qvc_runtime::artifact::TensorSig]| {
            v.iter().map(|t| format!("{} {}{}", t.name, t.dtype, t.shape)).collect::<Vec<_>>().join(", ")
        };
        println!("  inputs: {}", sig(&p.inputs));
        println!("  outputs: {}", sig(&p.outputs));
        let fs = qvc_ir::passes::fusion_stats(&p.graph);
        let kinds: Vec<String> = fs
            .by_kind
            .iter()
            .filter(|(k, _)| {
                k.starts_with("linear") || k.starts_with("add_") || k.starts_with("attention") || k.starts_with("qkv")
            })
            .map(|(k, n)| format!("{k} ×{n}"))
            .collect();
        println!("  fused: {}", if kinds.is_empty() { "none".into() } else { kinds.join(", ") });
        if let Some(mem) = &p.memory {
            println!(
                "  memory: peak {:.2} MiB, arena {:.2} MiB, naive {:.2} MiB, {} in place",
                mem.peak_bytes as f64 / 1048576.0,
                mem.arena_bytes as f64 / 1048576.0,
                mem.naive_bytes as f64 / 1048576.0,
                mem.in_place
            );
        }
        let fallback = p.launches.iter().filter(|l| l.family == CPU_FALLBACK).count();
        if !p.launches.is_empty() {
            println!("  launches: {} GPU kernels, {fallback} cpu-fallback", p.launches.len() - fallback);
        }
        for l in p.launches.iter().filter(|l| l.family != CPU_FALLBACK) {
            println!(
                "    %{:<5} {:<18} {:<44} grid {}x{}x{} block {}x{}x{}",
                l.node, l.family, l.kernel, l.grid[0], l.grid[1], l.grid[2], l.block[0], l.block[1], l.block[2]
            );
        }
    }
    eprintln!("[qvc] opened in {:.2} s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    use crate::bench::{BenchError, BenchOptions, Synthetic};
    let opt = BenchOptions {
        device: a.model.device.clone(),
        prompt_len: a.prompt_len,
        decode_tokens: a.decode_tokens,
        batch: a.batch.map(usize::from),
        image_sizes: a.image_sizes.clone(),
        profile: a.profile,
    };
    let has_model = a.model.path.is_some() || a.model.model.is_some();
    match &a.synthetic {
        Some(_) if has_model => Err(BenchError::ModelAndSynthetic.into()),
        Some(name) => crate::bench::run(None, Some(Synthetic::parse(name)?), &opt),
        None => {
            let model = load(&a.model)?;
            crate::bench::run(Some(&model), None, &opt)
        }
    }
}

/// H100 ceilings measured on a lent H100 80GB HBM3 (TOOLCHAIN.md): the best
/// bf16 GEMM and a device-to-device copy. A kernel cannot beat
/// max(flops / FLOP/s, bytes / B/s); the column is that floor, not a timing.
const H100_BF16_FLOPS: f64 = 782e12;
const H100_BYTES_PER_S: f64 = 2985e9;

fn cmd_kernels(a: KernelsArgs) -> Result<()> {
    use qvc_codegen::{ptxas, Module, Target};
    let target = Target::parse(&a.target).context("unknown target")?;
    let entries: Vec<_> = qvc_kernels::gpu::catalog::model_kernels()
        .into_iter()
        .filter(|e| {
            a.filter.as_ref().is_none_or(|f| e.family.contains(f.as_str()) || e.spec.name().contains(f.as_str()))
        })
        .collect();
    if entries.is_empty() {
        bail!("no kernel matches --filter {:?}; run `qvc kernels` to see them all", a.filter.unwrap_or_default());
    }
    let kernels: Vec<_> = entries.iter().map(|e| e.spec.build()).collect();
    let module = Module::new(target, kernels.clone());
    let text = module.print();
    if let Some(path) = &a.ptx {
        if path.exists() && !a.force {
            bail!("{} exists; pass --force to overwrite it", path.display());
        }
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!(
            "wrote {} kernels ({} bytes of PTX for {}) to {}",
            kernels.len(),
            text.len(),
            target.name(),
            path.display()
        );
    }
    let usage = if a.ptxas {
        let exe = ptxas::find_ptxas()
            .context("ptxas not found: set QVC_PTXAS, put it on PATH, or run scripts/install-ptxas.sh")?;
        Some(ptxas::assemble(&exe, &text, target)?)
    } else {
        None
    };
    let w = kernels.iter().map(|k| k.name.len()).max().unwrap_or(6);
    println!(
        "{:<16} {:<w$} {:>16} {:>6} {:>9} {:>9} {:>9}{}",
        "family",
        "kernel",
        "grid",
        "block",
        "GFLOP",
        "MB",
        "floor µs",
        if usage.is_some() { "   regs  spill  smem" } else { "" }
    );
    let (mut total_floor, mut total_flops, mut total_bytes) = (0.0, 0u64, 0u64);
    for (e, k) in entries.iter().zip(&kernels) {
        let l = e.spec.launch();
        let c = e.spec.cost();
        let floor = (c.flops as f64 / H100_BF16_FLOPS).max(c.bytes as f64 / H100_BYTES_PER_S) * 1e6;
        total_floor += floor;
        total_flops += c.flops;
        total_bytes += c.bytes;
        let grid = format!("{}x{}x{}", l.grid[0], l.grid[1], l.grid[2]);
        let mut line = format!(
            "{:<16} {:<w$} {:>16} {:>6} {:>9.3} {:>9.2} {:>9.2}",
            e.family,
            k.name,
            grid,
            l.threads_per_block(),
            c.flops as f64 / 1e9,
            c.bytes as f64 / 1e6,
            floor
        );
        if let Some(u) = usage.as_ref().and_then(|u| u.iter().find(|u| u.name == k.name)) {
            line += &format!(" {:>6} {:>6} {:>5}", u.registers, u.spill_stores + u.spill_loads, u.shared_bytes);
        }
        println!("{line}");
    }
    println!(
        "{} kernels for {}: {:.1} GFLOP, {:.1} MB in all; floors use the H100 ceilings measured for TOOLCHAIN.md \
         ({:.0} TFLOP/s bf16, {:.0} GB/s); each kernel's floor counts once, {:.0} µs summed.",
        entries.len(),
        target.name(),
        total_flops as f64 / 1e9,
        total_bytes as f64 / 1e6,
        H100_BF16_FLOPS / 1e12,
        H100_BYTES_PER_S / 1e9,
        total_floor
    );
    Ok(())
}

/// `qvc compile`'s target when none is named: the first GPU's, else the CPU.
fn default_target() -> crate::compile::Target {
    use crate::compile::Target;
    match qvc_runtime::cuda::gpus() {
        Ok(gpus) => match gpus.first().and_then(|g| g.target()) {
            Some(t) => {
                eprintln!(
                    "[qvc] compiling for {} ({}, the first GPU); pass --target to choose",
                    t.name(),
                    gpus[0].name
                );
                Target::Gpu(t)
            }
            None => Target::Cpu,
        },
        Err(_) => Target::Cpu,
    }
}

fn cmd_selftest(a: SelftestArgs) -> Result<()> {
    use qvc_runtime::gpu::{CudaDevice, Device, EmuDevice};
    let mut dev: Box<dyn Device> = match DeviceChoice::parse(&a.device)? {
        DeviceChoice::Emu => Box::new(EmuDevice::new(qvc_codegen::Target::Sm80)),
        DeviceChoice::Cuda(n) => Box::new(CudaDevice::open(n)?),
        DeviceChoice::Cpu | DeviceChoice::Auto => {
            bail!("qvc selftest checks the GPU kernels: give --device emu, cuda or cuda:N")
        }
    };
    let name = dev.name();
    let results = crate::selftest::run(dev.as_mut(), a.cases.max(1), a.small, a.seed);
    if !crate::selftest::print(&name, &results) {
        bail!("some kernel families failed");
    }
    Ok(())
}

fn cmd_devices() -> Result<()> {
    println!("cpu: {} threads (--device cpu)", rayon::current_num_threads());
    match qvc_runtime::cuda::gpus() {
        Ok(gpus) if gpus.is_empty() => println!("cuda: the NVIDIA driver is present but sees no GPU"),
        Ok(gpus) => {
            for g in gpus {
                let target = g.target().map_or("none (qvc generates sm_80 and sm_90)", |t| t.name());
                println!(
                    "cuda:{}: {}, compute {}.{}, {} SMs, {:.1} GiB; compile target {target} (--device cuda:{})",
                    g.ordinal,
                    g.name,
                    g.compute.0,
                    g.compute.1,
                    g.multiprocessors,
                    g.memory_bytes as f64 / (1u64 << 30) as f64,
                    g.ordinal
                );
            }
        }
        Err(e) => println!("cuda: {e}"),
    }
    Ok(())
}
