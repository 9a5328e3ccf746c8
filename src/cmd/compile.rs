//! `qvc compile`: the flags and the default target; [`crate::compile`] compiles.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct CompileArgs {
    /// Checkpoint directory, or a .safetensors file with config.json and qwen.tiktoken beside it.
    #[arg(value_name = "SRC", required_unless_present = "synthetic", conflicts_with = "synthetic")]
    src: Option<PathBuf>,
    /// The artifact directory to write (e.g. model.qvc). Not replaced unless --force.
    #[arg(short = 'o', long = "out", value_name = "OUT.qvc", required_unless_present = "dry_run")]
    out: Option<PathBuf>,
    /// What the artifact runs on: cpu, sm_80 (A100, Ada) or sm_90 (H100) [default: the first GPU's, else cpu].
    #[arg(long, value_parser = ["cpu", "sm_80", "sm_90"])]
    target: Option<String>,
    /// Stored dtype of the weights in the artifact. `auto` keeps the checkpoint's 16-bit type (bf16 for
    /// Qwen-VL-Chat, f16 for GPTQ Int4 checkpoints, whose other tensors are f16) and stores f32 checkpoints as
    /// bf16. Int4 weights always stay int4.
    #[arg(long, default_value = "auto", value_parser = ["auto", "bf16", "f16", "f32"])]
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
    /// Deprecated and ignored: every prefill program takes as many pictures as its prompt holds.
    #[arg(long, value_name = "N")]
    max_images: Option<usize>,
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

pub fn run(a: CompileArgs) -> Result<()> {
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
            "f32" => Some(DType::F32),
            "f16" => Some(DType::F16),
            "bf16" => Some(DType::BF16),
            _ => None,
        },
        image_size: a.image_size,
        vit_attention: a.vit_attention.clone(),
        max_seq: a.max_seq,
        max_batch: a.max_batch,
        force: a.force,
        dry_run: a.dry_run,
    };
    if let Some(n) = a.max_images {
        eprintln!(
            "[qvc] --max-images {n} is deprecated and ignored: every prefill program takes any number of pictures \
             that fit --max-seq"
        );
    }
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
