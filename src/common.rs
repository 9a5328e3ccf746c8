//! What several commands share: the `--model`, prompt and sampling flag
//! groups, loading a model with a progress line, the prefill spinner, prompt
//! ids from the flags, sampling parameters, `--force` checks and the boxes of
//! an answer, and the percentile both benches report. Imports only [`crate::device`] of this crate; the command
//! modules, [`crate::bench`] and [`crate::demo`] import it, never the reverse.

use crate::device::parse_device;
use anyhow::{bail, Context, Result};
use clap::Args;
use qvc_kernels::CpuMath;
use qvc_model::chat::{format_query, make_context, Turn, DEFAULT_SYSTEM};
use qvc_model::grounding::{box_outputs, parse_groundings, BoxOut, Grounding};
use qvc_model::image::load_rgb;
use qvc_model::sampling::{SamplingOverrides, SamplingParams};
use qvc_model::tokenizer::Specials;
use qvc_model::{LoadOptions, Model, Phase, Session};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args, Clone)]
pub(crate) struct ModelArgs {
    /// The model: a `qvc compile` artifact (OUT.qvc), a checkpoint directory, or a .safetensors file with config.json
    /// and qwen.tiktoken beside it. The same as --model.
    #[arg(value_name = "MODEL")]
    pub(crate) path: Option<PathBuf>,
    /// Checkpoint directory (config.json, qwen.tiktoken, model.safetensors or shards + index), a .safetensors file
    /// with those beside it, or a `qvc compile` artifact.
    #[arg(long, short = 'm', env = "QVC_MODEL", value_name = "DIR")]
    pub(crate) model: Option<PathBuf>,
    /// Use this config.json instead of the checkpoint's own.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Where to run: `cpu`, `cuda` or `cuda:N` (an NVIDIA GPU, compute capability 8.0+), `emu` (the GPU code path
    /// in the PTX emulator: slow, for checking kernels without a GPU), or `auto`: the first GPU when the driver
    /// finds one and the model can run there, else the CPU.
    #[arg(long, default_value = "auto", value_name = "DEVICE", env = "QVC_DEVICE", value_parser = parse_device)]
    pub(crate) device: String,
    /// CPU arithmetic: `exact` (f32 products of exactly widened weights: matches the reference to 1e-4; on CPUs with
    /// AMX the GEMMs of bf16 weights run on AMX tiles with each activation split exactly into three bf16, so every
    /// product is still exact and only the f32 sums round: prefill and the ViT's GEMMs about 2× faster;
    /// `QVC_AMX_EXACT=0` keeps them on the FMAs) or `fast`
    /// (activations rounded to bf16 against 16-bit weights where the CPU multiplies bf16 faster than f32, and to
    /// int8 per block against int4 weights where it has VNNI, as llama.cpp does: with AVX512-BF16 on AMD Zen 4/5
    /// prefill and vision about 1.7-1.9× faster, and on CPUs with AMX (Intel Sapphire Rapids and later) the bf16
    /// products run on AMX tiles, prefill and vision about 3× faster than exact and batched decode about 1.6× (batch
    /// 8; batch 1 decode is bound by memory and gains nothing);
    /// logits within about 1e-2 of exact). Kernels without a fast variant on this CPU run exactly, and so do the
    /// bf16 GEMMs and attention where bf16 products would be slower (measured once at start: Intel cores without
    /// usable AMX run vdpbf16ps at half their FMA rate), and so do the decode matmuls where there are no AMX tiles
    /// and vdpbf16ps is slower than the FMAs. `QVC_AMX=0` keeps AMX off.
    #[arg(long, default_value = "exact", value_name = "MODE", env = "QVC_CPU_MATH", value_parser = parse_cpu_math)]
    pub(crate) cpu_math: CpuMath,
}

/// `--cpu-math`: `exact` or `fast`.
pub(crate) fn parse_cpu_math(s: &str) -> Result<CpuMath, String> {
    CpuMath::parse(s).ok_or_else(|| format!("unknown CPU math `{s}`: use `exact` (the default) or `fast`"))
}

impl ModelArgs {
    /// Sets the process-wide CPU arithmetic from `--cpu-math` (and says so when it is not the default).
    pub(crate) fn apply_cpu_math(&self) {
        qvc_kernels::set_cpu_math(self.cpu_math);
        if self.cpu_math != CpuMath::Exact {
            eprintln!(
                "[qvc] --cpu-math {}: CPU activations rounded to bf16/int8 where the CPU multiplies those faster",
                self.cpu_math.name()
            );
        }
    }

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

#[derive(Args, Clone)]
pub(crate) struct PromptArgs {
    /// A picture to ask about (PNG, JPEG, WebP, GIF, BMP). Repeat for several: they become "Picture 1:", "Picture 2:", ...
    #[arg(long, short = 'i', value_name = "PATH")]
    pub(crate) image: Vec<PathBuf>,
    /// The question or instruction.
    #[arg(long, short = 'p', value_name = "TEXT")]
    pub(crate) prompt: Option<String>,
    /// The system message.
    #[arg(long, default_value = DEFAULT_SYSTEM, value_name = "TEXT")]
    pub(crate) system: String,
    /// A file holding a complete prompt (ChatML written out); tokenized with every special token allowed. Image paths in it resolve against the current directory.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["prompt", "image", "prompt_tokens"])]
    pub(crate) raw_prompt_file: Option<PathBuf>,
    /// A JSON array of token ids used as the prompt as is (images come from its <img> spans).
    #[arg(long, value_name = "FILE.json", conflicts_with_all = ["prompt", "image"])]
    pub(crate) prompt_tokens: Option<PathBuf>,
}

#[derive(Args, Clone)]
pub(crate) struct SamplingArgs {
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

pub(crate) fn load(m: &ModelArgs) -> Result<Model> {
    let t0 = Instant::now();
    let path = m.path()?;
    m.apply_cpu_math();
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
pub(crate) fn attach_progress(session: &mut Session) {
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

pub(crate) fn path_str(p: &Path) -> Result<String> {
    p.to_str().map(str::to_string).with_context(|| format!("image path {} is not valid UTF-8", p.display()))
}

/// Token ids for the prompt flags, plus the pictures it mentions.
pub(crate) fn prompt_ids(model: &Model, p: &PromptArgs, history: &[Turn]) -> Result<Vec<u32>> {
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

pub(crate) fn sampling_params(model: &Model, s: &SamplingArgs) -> Result<(SamplingParams, usize)> {
    let g = &model.generation;
    let o = SamplingOverrides {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        repetition_penalty: s.repetition_penalty,
    };
    let p = SamplingParams::with_defaults(g, &o, s.seed);
    p.validate().map_err(anyhow::Error::msg)?;
    Ok((p, s.max_new_tokens.unwrap_or(g.max_new_tokens)))
}

pub(crate) fn refuse_overwrite(path: &Path, force: bool, flag: &str) -> Result<()> {
    if path.exists() && !force {
        bail!("{} already exists; pass --force to overwrite it or choose another {flag}", path.display());
    }
    Ok(())
}

/// The boxes of an answer, in pixels of the last picture of the prompt (the
/// reference draws on the latest picture too).
pub(crate) fn boxes_for(
    model: &Model,
    prompt: &[u32],
    text: &str,
) -> Result<(Vec<Grounding>, Vec<BoxOut>, Option<String>)> {
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

/// The nearest-rank `p`-th percentile of `v` (sorted in place), NaN when
/// empty: what `qvc bench-serve` reports as p50/p99 and `qvc bench` as the
/// median of its paired decode steps.
pub(crate) fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&mut v, 50.0), 3.0);
        assert_eq!(percentile(&mut v, 99.0), 5.0);
        assert!(percentile(&mut [], 50.0).is_nan());
    }
}
