//! `qvc quantize`: the flags; [`crate::quantize`] does the work.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// The long help: what the command writes, how it rounds, what it costs.
pub const QUANTIZE_ABOUT: &str = "\
Quantize a bf16, fp16 or f32 Qwen-VL checkpoint to 4-bit GPTQ (the AutoGPTQ v1 layout of the published \
Qwen-VL-Chat-Int4), so that its decoder reads about a quarter of the bytes per token.

For every decoder Linear (transformer.h.N.{attn.c_attn, attn.c_proj, mlp.w1, mlp.w2, mlp.c_proj}) it writes \
qweight, qzeros, scales, g_idx and bias; every other tensor (vision tower, embeddings, norms and, by default, \
lm_head) is kept, stored as fp16. config.json gets quantization_config, and quantize_config.json, the tokenizer, \
generation_config.json and the other small files of SRC are written beside the weights. The source is read one \
tensor at a time, so the largest tensor, not the model, sets the memory; DST gets as many shards as SRC.

This is round-to-nearest: each group of --group-size inputs of one output gets a scale (and with --asym a zero) from \
its own minimum and maximum, and every weight goes to the nearest of the 16 levels. It is not GPTQ's algorithm, \
which uses calibration data to push each weight's rounding error onto the weights not yet quantized; \
round-to-nearest needs no data and no GPU, but loses noticeably more accuracy than GPTQ at the same settings \
(higher perplexity), more so with larger groups.";

pub const QUANTIZE_EXAMPLES: &str = "Examples:
  qvc quantize ./Qwen-VL-Chat -o ./Qwen-VL-Chat-rtn4
  qvc quantize ./Qwen-VL-Chat -o ./rtn4-g64 --group-size 64 --asym
  qvc quantize ./Qwen-VL-Chat -o ./rtn4-all --lm-head int4     # lm_head too: much less to read per token on a CPU
  qvc generate ./Qwen-VL-Chat-rtn4 --image cat.jpg --prompt 'What is in the picture?'";

#[derive(Args)]
pub struct QuantizeArgs {
    /// The checkpoint directory to quantize (config.json, qwen.tiktoken, model.safetensors or shards + index).
    #[arg(value_name = "SRC")]
    src: PathBuf,
    /// The directory to write the int4 checkpoint into. Refused if it holds anything, unless --force.
    #[arg(short = 'o', long = "out", value_name = "DST")]
    out: PathBuf,
    /// Bits per weight. Only 4 is supported.
    #[arg(long, default_value_t = 4, value_name = "N")]
    bits: u32,
    /// Inputs per quantization group: -1 (one group over all inputs of a Linear) or a positive multiple of 8.
    /// Smaller groups are more accurate and store more scales.
    #[arg(long, default_value_t = 128, value_name = "G", allow_negative_numbers = true)]
    group_size: i64,
    /// Asymmetric: each group gets an integer zero point from its minimum and maximum, instead of zero = 8 and a
    /// range symmetric about 0.
    #[arg(long)]
    asym: bool,
    /// lm_head's format: f16 (as Qwen-VL-Chat-Int4 keeps it) or int4 (recorded as "lm_head": true in
    /// quantization_config, as GPTQModel does; on a CPU its 1.2 GB in fp16 is a large part of what every token reads).
    #[arg(long, default_value = "f16", value_name = "FORMAT", value_parser = ["f16", "int4"])]
    lm_head: String,
    /// Write into DST even if it is not empty (its old weight files are removed first).
    #[arg(long)]
    force: bool,
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    use crate::quantize::{quantize, QuantizeOptions};
    let opt = QuantizeOptions {
        bits: a.bits,
        group_size: a.group_size,
        sym: !a.asym,
        lm_head: a.lm_head == "int4",
        force: a.force,
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg} [{elapsed}]",
        )
        .expect("valid template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let report = quantize(&a.src, &a.out, &opt, &bar);
    bar.finish_and_clear();
    print!("{}", report?);
    Ok(())
}
