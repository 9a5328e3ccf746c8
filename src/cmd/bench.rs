//! `qvc bench`: the flags; [`crate::bench`] measures.

use crate::common::{load, ModelArgs};
use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 300)]
    prompt_len: usize,
    /// Decode steps to time.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Also time decoding this many sequences together, each in its own KV slot [default: 8 on a GPU, 1 on the
    /// CPU]; a compiled model on the CPU needs --max-batch of at least this. Above 1, every decode step (batch 1
    /// too) takes the paths `qvc serve` takes: on CPUs with AMX, exact decode runs on the tiles.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    batch: Option<u16>,
    /// Random weights with published shapes instead of a model: qwen-vl-chat (Qwen-VL-Chat's widths; all 48 ViT
    /// and 32 decoder layers are 19 GB, so on the CPU give --vit-layers/--llm-layers) or tiny (the test fixture's
    /// shapes, runs anywhere in seconds).
    #[arg(long, value_name = "NAME")]
    synthetic: Option<String>,
    /// With --synthetic: build only this many ViT layers (qwen-vl-chat has 48), every matrix at its real size, so
    /// the real shapes can be timed on a machine that cannot hold the whole model; per-layer costs scale to the
    /// full depth. E.g. `qvc bench --synthetic qwen-vl-chat --vit-layers 4 --llm-layers 2 --device cpu` (~3.7 GB
    /// of random bf16 weights).
    #[arg(long, value_name = "N")]
    vit_layers: Option<usize>,
    /// With --synthetic: build only this many decoder layers (qwen-vl-chat has 32; ~0.4 GB each at full width,
    /// plus 2.5 GB for the embedding and lm_head whatever the count).
    #[arg(long, value_name = "M")]
    llm_layers: Option<usize>,
    /// With --synthetic: the decoder's Linears (c_attn, c_proj, w1, w2, MLP c_proj) are random GPTQ int4 (group
    /// 128, as Qwen-VL-Chat-Int4 stores them) instead of bf16, so int4 decode is timed against the bytes it
    /// really reads, e.g. `qvc bench --synthetic qwen-vl-chat --vit-layers 0 --llm-layers 8 --int4 --device cpu`.
    #[arg(long)]
    int4: bool,
    /// With --synthetic: lm_head is int4 too (GPTQModel's `lm_head: true`; `qvc quantize --lm-head int4`).
    #[arg(long)]
    int4_lm_head: bool,
    /// Time vision, time to first token and prefill this many times each and keep the best (on a shared, noisy
    /// machine the best of several is the stable figure) [default: 3 on a GPU, 1 on the CPU and the emulator].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=100))]
    repeat: Option<u16>,
    /// Picture sizes the vision tower is timed at (comma-separated) [default: 448,896 with --synthetic, else the
    /// model's].
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    image_sizes: Vec<usize>,
    /// After the table, time one vision run, one prefill and one decode step kernel by kernel (GPU, emulator) or op
    /// by op (CPU: each Linear, attention, norm, … with its shapes and weight type) and print where the time goes:
    /// totals per family, then the slowest, each with its FLOP/s and GB/s (on the CPU also the share of the measured
    /// FMA peak or read bandwidth, whichever binds).
    #[arg(long)]
    profile: bool,
    /// Print one JSON object on stdout; the table (and --profile) then go to stderr. Keys (schema 1; null where
    /// not measured): device (cpu, cuda:N, emu), device_name, threads, cpu_math (exact or fast), model, vit_layers and llm_layers (the
    /// layers built and timed), repeat (vision, ttft and prefill are the best of this many runs), vision_ms (first size and attention),
    /// vision [{size, attention, ms, gflop, floor_fraction}], ttft_ms, ttft_tokens, prefill_ms, prefill_tokens,
    /// prefill_tok_s, prefill_floor_fraction, decode_tok_s, decode_ms_per_token, decode_bytes_per_token (weights +
    /// KV read per step), decode_floor_fraction (achieved bytes/s over the measured read bandwidth; these four at
    /// batch 1), decode_paired_floor_fraction (CPU, steps reading ≥ 256 MiB: one read probe before the first step
    /// and after each; the median over steps of the floor at the mean of the two probes around a step over its
    /// time; batch 1), decode [{batch, tok_s, ms_per_step, bytes_per_step, floor_fraction, paired_floor_fraction,
    /// paired_read_gbs (median of those probes)}], gemm_best_gflops,
    /// gemm_peak_fraction (best GEMM FLOP/s over the measured FMA peak; where the CPU has AMX, exact GEMMs run on the tiles and divide by a third of the tdpbf16ps peak; under --cpu-math fast the bf16 peak: AMX tdpbf16ps where the CPU has AMX, else vdpbf16ps; CPU only), ceilings {fma_peak_gflops
    /// (CPU: an FMA loop on every thread at once), fma_peak_how, gemm_peak_gflops and gemm_peak_of (the ceiling the
    /// GEMM fractions divide by: fma, amx_tdpbf16ps, amx_tdpbf16ps_over_3, vdpbf16ps, or best_gemm on a GPU), read_bandwidth_gbs (CPU:
    /// 256 MiB sum; GPU: 1 GiB copy), read_bandwidth_how, gemm [{shape, m, n, k, gflops}]}.
    #[arg(long)]
    json: bool,
}

pub fn run(a: BenchArgs) -> Result<()> {
    use crate::bench::{BenchError, BenchOptions, Synthetic};
    let opt = BenchOptions {
        device: a.model.device.clone(),
        prompt_len: a.prompt_len,
        decode_tokens: a.decode_tokens,
        batch: a.batch.map(usize::from),
        image_sizes: a.image_sizes.clone(),
        profile: a.profile,
        json: a.json,
        vit_layers: a.vit_layers,
        llm_layers: a.llm_layers,
        repeat: a.repeat.map(usize::from),
        int4: crate::bench::SynthQuant { decoder: a.int4, lm_head: a.int4_lm_head },
    };
    if (a.int4 || a.int4_lm_head) && a.synthetic.is_none() {
        anyhow::bail!(
            "--int4 and --int4-lm-head shape a --synthetic model; a checkpoint is timed as stored (quantize one \
             with `qvc quantize`)"
        );
    }
    // Timing a batch measures what a server does: its decode paths (see `qvc serve`).
    qvc_kernels::gemm::set_batched_decode(a.batch.is_some_and(|b| b > 1));
    let has_model = a.model.path.is_some() || a.model.model.is_some();
    match &a.synthetic {
        Some(_) if has_model => Err(BenchError::ModelAndSynthetic.into()),
        Some(name) => {
            a.model.apply_cpu_math();
            crate::bench::run(None, Some(Synthetic::parse(name)?), &opt)
        }
        None if a.vit_layers.is_some() || a.llm_layers.is_some() => Err(BenchError::LayersWithoutSynthetic.into()),
        None => {
            let model = load(&a.model)?;
            crate::bench::run(Some(&model), None, &opt)
        }
    }
}
