//! `qvc chat`: an interactive multi-turn conversation on the serving engine
//! with one KV slot (`/image PATH`, `/reset`, `/quit`).

use crate::common::{boxes_for, load, path_str, prompt_ids, sampling_params, ModelArgs, PromptArgs, SamplingArgs};
use crate::device::make_backend;
use anyhow::{bail, Context, Result};
use clap::Args;
use qvc_model::chat::{format_query, stop_ids, Turn, DEFAULT_SYSTEM};
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
