//! `qvc generate` (and the `generate` binary): one chat turn, the answer streamed
//! to stdout or printed as one JSON object, boxes listed or drawn.

use crate::common::{attach_progress, boxes_for, load, prompt_ids, refuse_overwrite, sampling_params};
use crate::common::{ModelArgs, PromptArgs, SamplingArgs};
use crate::device::make_backend;
use anyhow::{bail, Result};
use clap::Args;
use qvc_model::chat::stop_ids;
use qvc_model::grounding::{draw_groundings, DrawOptions};
use qvc_model::image::{load_rgb, save_png};
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
    /// Draw the answer's boxes and labels on the picture they refer to and save it here (PNG). An existing file is not overwritten unless --force.
    #[arg(long, value_name = "OUT.png")]
    draw_boxes: Option<PathBuf>,
    /// Allow --draw-boxes to overwrite an existing file.
    #[arg(long)]
    force: bool,
}

pub fn run(a: GenerateArgs) -> Result<()> {
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
        let drawn = draw_groundings(&pic, &items, &DrawOptions::default())?;
        for note in &drawn.notes {
            eprintln!("[qvc] {note}");
        }
        save_png(&drawn.image, out)?;
        eprintln!("[qvc] drew {} region(s) on {img} -> {}", items.len(), out.display());
    }
    Ok(())
}
