//! `qvc generate` (and the `generate` binary): one chat turn, the answer streamed
//! to stdout or printed as one JSON object, boxes listed or drawn.

use super::draw::{box_line, check_font, check_output, draw_on_picture};
use crate::common::{attach_progress, boxes_for, load, prompt_ids, sampling_params};
use crate::common::{ModelArgs, PromptArgs, SamplingArgs};
use crate::device::make_backend;
use anyhow::{bail, Result};
use clap::Args;
use qvc_model::chat::stop_ids;
use qvc_model::grounding::DrawOptions;
use qvc_model::{generate, GenerateOptions, Session};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print one JSON object (prompt_tokens, tokens, text, boxes, timings) instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Draw the answer's boxes and labels on the picture they refer to (the last one of the prompt) and save it
    /// here (PNG), as `qvc draw` does. An existing file is not overwritten unless --force; the picture itself never.
    #[arg(long, value_name = "OUT.png")]
    draw_boxes: Option<PathBuf>,
    /// Allow --draw-boxes to overwrite an existing file.
    #[arg(long)]
    force: bool,
    /// A TrueType/OpenType font file (.ttf, .otf, .ttc) for the --draw-boxes labels [default: an installed font
    /// that covers the labels' characters].
    #[arg(long, value_name = "FILE", requires = "draw_boxes")]
    font: Option<PathBuf>,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    if let Some(out) = &a.draw_boxes {
        // Before the model loads: a bad output name or font should not cost a generation.
        let pictures: Vec<&Path> = a.prompt.image.iter().map(PathBuf::as_path).collect();
        check_output(out, a.force, "--draw-boxes", &pictures)?;
        check_font(a.font.as_deref())?;
    }
    let model = load(&a.model)?;
    let prompt = prompt_ids(&model, &a.prompt, &[])?;
    if a.draw_boxes.is_some() && model.tokenizer.image_spans(&prompt)?.is_empty() {
        bail!("--draw-boxes: the prompt has no picture to draw on; give one with --image PATH");
    }
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
            eprintln!("{}", box_line(b));
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
        if items.is_empty() {
            // The answer is still good; an undrawn copy of the picture would only mislead.
            eprintln!(
                "[qvc] --draw-boxes: the answer has no <box> or <quad>; nothing drawn, {} not written",
                out.display()
            );
        } else {
            let opts = DrawOptions { font: a.font.clone(), ..Default::default() };
            draw_on_picture(Path::new(&img), &items, &opts, out, a.force)?;
        }
    }
    Ok(())
}
