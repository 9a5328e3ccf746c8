//! The `qvc` command line: the clap `Cli` and its subcommands, and the
//! dispatch to the command modules under [`crate::cmd`] (one per subcommand,
//! each with its own flags). Flag groups several commands share live in
//! [`crate::common`], the `--device` handling in [`crate::device`].

use crate::cmd;
use anyhow::Result;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

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
qvc generate --model ./Qwen-VL-Chat --image sign.jpg --prompt '框出图中的文字' --draw-boxes sign-boxes.png --font /usr/share/fonts/truetype/wqy/wqy-microhei.ttc\n  \
qvc generate --model ./Qwen-VL-Chat --image a.png --image b.png --prompt 'What differs?' --temperature 0\n  \
qvc generate --model ./Qwen-VL-Chat --raw-prompt-file prompt.txt --json"
    )]
    Generate(cmd::generate::GenerateArgs),
    /// Interactive multi-turn chat (`/image PATH`, `/draw OUT.png`, `/reset`, `/quit`).
    #[command(after_help = cmd::chat::CHAT_HELP)]
    Chat(cmd::chat::ChatArgs),
    /// Draw a model answer's <ref>/<box>/<quad> regions on its picture (PNG out) and print them in pixels.
    #[command(after_help = cmd::draw::DRAW_EXAMPLES)]
    Draw(cmd::draw::DrawArgs),
    /// Write the logits of a prompt to a safetensors file (tensor `logits`, f32 [positions, vocab]).
    Logits(cmd::logits::LogitsArgs),
    /// Print the token ids of a text as JSON: {"ids": [...]}.
    Tokenize(cmd::tokenize::TokenizeArgs),
    /// Write a tiny random-weight checkpoint and a picture to a temporary folder and run one turn on it.
    Demo(cmd::demo::DemoArgs),
    /// Time the vision tower, time to first token, prefill and decode against the device's measured ceilings.
    #[command(after_help = "Examples:\n  qvc bench chat.qvc --device cuda\n  \
qvc bench --synthetic qwen-vl-chat --device cuda   # full size, random weights, no download\n  \
qvc bench --synthetic qwen-vl-chat --vit-layers 4 --llm-layers 2 --device cpu   # real widths, 6 layers, ~3.8 GB\n  \
qvc bench --synthetic tiny --device emu --prompt-len 8 --decode-tokens 2")]
    Bench(cmd::bench::BenchArgs),
    /// Load-test a running `qvc serve` (or any OpenAI-compatible server): streamed requests at each concurrency
    /// level; aggregate tokens/s, time to first token p50/p99, inter-token and end-to-end latency.
    BenchServe(crate::bench_serve::BenchServeArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (chat completions with pictures, streaming, many
    /// conversations at once).
    #[command(
        after_help = "`qvc serve --help` shows a curl example, the endpoints and the rules for pictures.",
        after_long_help = cmd::serve::SERVE_EXAMPLES
    )]
    Serve(cmd::serve::ServeArgs),
    /// Print a checkpoint's configuration, tensor count and program sizes, or (given OUT.qvc) a compiled artifact's programs, kernels and memory plans.
    #[command(
        after_help = "Examples:\n  qvc inspect --model ./Qwen-VL-Chat\n  qvc inspect model.qvc            # programs, fused nodes, launches, memory\n  \
qvc inspect model.qvc --verify   # also check the weights checksum (reads the whole file)"
    )]
    Inspect(cmd::inspect::InspectArgs),
    /// Compile a checkpoint into an artifact directory (OUT.qvc): optimised programs, memory plans, kernels, repacked weights.
    #[command(after_help = "Examples:\n  qvc compile ./Qwen-VL-Chat -o chat.qvc\n  \
qvc compile ./Qwen-VL-Chat -o chat-h100.qvc --target sm_90 --image-size 896 --vit-attention window:16,global-every:8\n  \
qvc compile --synthetic qwen-vl-chat --dry-run --target sm_90   # full-size plan, no checkpoint needed")]
    Compile(cmd::compile::CompileArgs),
    /// Quantize a bf16/fp16/f32 checkpoint to 4-bit GPTQ (round-to-nearest per group), in the layout of Qwen-VL-Chat-Int4.
    #[command(long_about = cmd::quantize::QUANTIZE_ABOUT, after_help = cmd::quantize::QUANTIZE_EXAMPLES)]
    Quantize(cmd::quantize::QuantizeArgs),
    /// List the GPUs the NVIDIA driver sees (and the compile target each gets), or say there is none.
    Devices,
    /// List the GPU kernels the full-size model uses, write their PTX, check them with ptxas.
    #[command(
        after_help = "Examples:\n  qvc kernels                          # every kernel: launch, work, H100 time floor\n  \
qvc kernels --filter attn --ptxas     # registers, spills and shared memory from ptxas\n  \
qvc kernels --ptx kernels.ptx --target sm_80"
    )]
    Kernels(cmd::kernels::KernelsArgs),
    /// Check every GPU kernel family on the device against its CPU reference (random ragged shapes).
    #[command(hide = true)]
    Selftest(cmd::selftest::SelftestArgs),
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
        Cmd::Generate(a) => cmd::generate::run(a),
        Cmd::Chat(a) => cmd::chat::run(a),
        Cmd::Draw(a) => cmd::draw::run(a),
        Cmd::Logits(a) => cmd::logits::run(a),
        Cmd::Tokenize(a) => cmd::tokenize::run(a),
        Cmd::Demo(a) => cmd::demo::run(a),
        Cmd::Bench(a) => cmd::bench::run(a),
        Cmd::BenchServe(a) => crate::bench_serve::run(a),
        Cmd::Serve(a) => cmd::serve::run(a),
        Cmd::Inspect(a) => cmd::inspect::run(a),
        Cmd::Kernels(a) => cmd::kernels::run(a),
        Cmd::Devices => cmd::devices::run(),
        Cmd::Compile(a) => cmd::compile::run(a),
        Cmd::Quantize(a) => cmd::quantize::run(a),
        Cmd::Selftest(a) => cmd::selftest::run(a),
    }
}
