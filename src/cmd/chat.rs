//! `qvc chat`: an interactive multi-turn conversation on the serving engine
//! with one KV slot (`/image PATH`, `/draw OUT.png`, `/reset`, `/quit`).

use super::draw::{box_line, check_font, check_output, draw_on_picture};
use crate::common::{boxes_for, load, path_str, prompt_ids, sampling_params, ModelArgs, PromptArgs, SamplingArgs};
use crate::device::make_backend;
use anyhow::{bail, Context, Result};
use clap::Args;
use qvc_model::chat::{format_query, stop_ids, Turn, DEFAULT_SYSTEM};
use qvc_model::grounding::DrawOptions;
use qvc_model::image::load_rgb;
use qvc_model::Model;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct ChatArgs {
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
    /// A TrueType/OpenType font file (.ttf, .otf, .ttc) for the labels `/draw` draws [default: an installed font
    /// that covers the labels' characters].
    #[arg(long, value_name = "FILE")]
    font: Option<PathBuf>,
}

/// What `qvc chat --help` shows after the flags.
pub const CHAT_HELP: &str = "Commands, typed as a message:\n  \
/image PATH            attach a picture to the next message\n  \
/draw OUT.png          draw the last answer's <box>/<quad> regions on the picture they refer to (the latest \
picture of the conversation), as `qvc draw` does; labels use --font or an installed font\n  \
/draw --force OUT.png  the same, replacing an existing OUT.png\n  \
/reset                 forget the conversation and its pictures\n  \
/quit                  leave (so does end of input, Ctrl-D)\n\n\
Example:\n  qvc chat --model ./Qwen-VL-Chat --image street.jpg\n  \
> Find the bus\n  <ref>the bus</ref><box>(120,340),(610,700)</box>\n  > /draw bus.png";

/// The chat commands, as the prompt line and `qvc chat --help` list them.
pub const CHAT_COMMANDS: &str = "/image PATH (attach a picture to the next message), /draw OUT.png (draw the \
last answer's boxes on its picture; /draw --force OUT.png replaces a file), /reset, /quit";

/// `/draw [--force] OUT.png`: draws the regions of the last answer (its prompt ids and text) on
/// the picture they refer to, as `qvc draw` does.
fn draw_last(model: &Model, last: Option<&(Vec<u32>, String)>, args: &str, font: Option<&Path>) -> Result<()> {
    let (force, out) = match args.trim().strip_prefix("--force") {
        Some(rest) if rest.is_empty() || rest.starts_with(char::is_whitespace) => (true, rest.trim()),
        _ => (false, args.trim()),
    };
    if out.is_empty() {
        bail!("/draw needs a file name: /draw OUT.png (or /draw --force OUT.png to replace a file)");
    }
    let out = Path::new(out);
    let Some((ids, text)) = last else { bail!("nothing to draw yet: /draw draws the regions of the last answer") };
    let (items, boxes, image) = boxes_for(model, ids, text)?;
    if items.is_empty() {
        bail!("the last answer has no <box> or <quad>; nothing drawn, {} not written", out.display());
    }
    let Some(picture) = image else { bail!("the conversation has no picture to draw on; attach one with /image PATH") };
    let picture = Path::new(&picture);
    check_output(out, force, "/draw", &[picture])?;
    draw_on_picture(
        picture,
        &items,
        &DrawOptions { font: font.map(Path::to_path_buf), ..Default::default() },
        out,
        force,
    )?;
    for b in &boxes {
        eprintln!("{}", box_line(b));
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

/// Prefill chunk of `qvc chat` (see [`run`]).
const CHAT_PREFILL_CHUNK: usize = 64;

/// `qvc chat` drives the serving engine with one KV slot: each turn's prompt
/// starts with the previous turn's, so only the new tokens are prefilled
/// (on a checkpoint run on the CPU; see `qvc_serve`), and each picture is
/// encoded once.
pub fn run(a: ChatArgs) -> Result<()> {
    use qvc_serve::{Engine, EngineConfig, Event, GenRequest};
    check_font(a.font.as_deref())?;
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
    // The last answer and its prompt, for `/draw`.
    let mut last: Option<(Vec<u32>, String)> = None;
    eprintln!("Type a message. Commands: {CHAT_COMMANDS}.");
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
            last = None;
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
        if let Some(rest) = msg.strip_prefix("/draw") {
            if rest.is_empty() || rest.starts_with(char::is_whitespace) {
                if let Err(e) = draw_last(&model, last.as_ref(), rest, a.font.as_deref()) {
                    eprintln!("error: {e:#}");
                }
                continue;
            }
        }
        if msg.starts_with('/') {
            eprintln!("unknown command {msg:?}: use {CHAT_COMMANDS}");
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
                    known
                        .iter()
                        .rev()
                        .find(|i| i.name == s.path)
                        .cloned()
                        .with_context(|| format!("no picture {}", s.path))
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
                    match boxes_for(&model, &ids, &text) {
                        Ok((_, boxes, _)) => {
                            for b in &boxes {
                                eprintln!("{}", box_line(b));
                            }
                            if !boxes.is_empty() {
                                eprintln!("[qvc] /draw OUT.png draws them");
                            }
                        }
                        Err(e) => eprintln!("error: the answer's boxes: {e:#}"),
                    }
                    eprintln!(
                        "[qvc] {} prompt tokens ({} reused from the previous turn, {} prefilled), {} new",
                        usage.prompt_tokens,
                        cached,
                        usage.prompt_tokens - cached,
                        usage.completion_tokens
                    );
                    let names: Vec<String> = pending.iter().filter_map(|p| p.to_str().map(str::to_string)).collect();
                    last = Some((ids.clone(), text.clone()));
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
