//! `qvc logits`: the logits of a prompt, written to a safetensors file.

use crate::common::{attach_progress, load, prompt_ids, refuse_overwrite, ModelArgs, PromptArgs};
use crate::device::make_backend;
use anyhow::{Context, Result};
use clap::Args;
use qvc_model::{PrefillOptions, Session};
use std::path::PathBuf;

#[derive(Args)]
pub struct LogitsArgs {
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

pub fn run(a: LogitsArgs) -> Result<()> {
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
