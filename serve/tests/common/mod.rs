//! Helpers of the engine tests: the fixture, pictures as requests carry
//! them, running requests and collecting their events.
#![allow(dead_code)]

use qvc_model::{LoadOptions, Model};
use qvc_runtime::{Backend, Cpu};
use qvc_serve::{Engine, EngineConfig, Event, FinishReason, GenRequest, ImageInput, ImageKey, Usage};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// `../shared/fixtures/tiny-qwen-vl`, or `None` (and a "skipped" line) where
/// it is absent; with `QVC_REQUIRE_FIXTURES=1` a missing fixture fails.
pub fn fixtures() -> Option<PathBuf> {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/tiny-qwen-vl");
    if d.join("expected.safetensors").is_file() {
        return Some(d);
    }
    if std::env::var("QVC_REQUIRE_FIXTURES").as_deref() == Ok("1") {
        panic!("QVC_REQUIRE_FIXTURES=1 but {} is missing", d.display());
    }
    eprintln!("skipped: ../shared/fixtures not found ({})", d.display());
    None
}

pub fn expected(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// A picture of the fixture as a request carries it, named `name` in the prompt.
pub fn image(model: &Model, dir: &Path, file: &str, name: &str) -> ImageInput {
    let bytes = std::fs::read(dir.join(file)).unwrap();
    let img = qvc_model::image::decode_rgb(&bytes, file).unwrap();
    let size = model.config.visual.image_size as u32;
    let px = qvc_model::image::preprocess_rgb(&img, size, file).unwrap();
    ImageInput {
        key: ImageKey::of(&bytes),
        name: name.into(),
        width: img.width,
        height: img.height,
        pixels: Some(Arc::new(px)),
    }
}

/// The pictures of a prompt whose spans name fixture files.
pub fn prompt_images(model: &Model, dir: &Path, prompt: &[u32]) -> Vec<ImageInput> {
    model.tokenizer.image_spans(prompt).unwrap().iter().map(|s| image(model, dir, &s.path, &s.path)).collect()
}

pub fn cpu_engine(dir: &Path, cfg: EngineConfig) -> Engine {
    let dir = dir.to_path_buf();
    let e = Engine::start(
        cfg,
        Box::new(move |_slots| {
            let m = Arc::new(Model::load(&dir, &LoadOptions::default())?);
            Ok((m, Box::new(Cpu) as Box<dyn Backend>))
        }),
    );
    wait_ready(&e);
    e
}

pub fn wait_ready(e: &Engine) {
    for _ in 0..6000 {
        match e.state() {
            qvc_serve::EngineState::Ready => return,
            qvc_serve::EngineState::Failed(why) => panic!("loading failed: {why}"),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    panic!("the engine did not load in 60 s");
}

/// Everything a request sent, in order.
#[derive(Debug, Default)]
pub struct Outcome {
    pub events: Vec<Event>,
}

impl Outcome {
    pub fn text(&self) -> String {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Delta { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }
    pub fn done(&self) -> (FinishReason, Usage, String) {
        match self.events.last() {
            Some(Event::Done { finish, usage, text }) => (*finish, *usage, text.clone()),
            other => panic!("the request did not finish: {other:?} (events {:?})", self.events),
        }
    }
    pub fn started(&self) -> (usize, usize) {
        match self.events.first() {
            Some(Event::Started { prompt_tokens, cached_tokens }) => (*prompt_tokens, *cached_tokens),
            other => panic!("the first event is not Started: {other:?}"),
        }
    }
    /// Every token's log-probability (bit patterns), in order.
    pub fn logprob_bits(&self) -> Vec<(Vec<u8>, u32)> {
        self.events
            .iter()
            .flat_map(|e| match e {
                Event::Delta { logprobs, .. } => {
                    logprobs.iter().map(|l| (l.bytes.clone(), l.logprob.to_bits())).collect()
                }
                _ => vec![],
            })
            .collect()
    }
}

/// Submit `req`; the receiver yields its events.
pub fn submit(e: &Engine, req: GenRequest) -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel();
    e.submit(req, Box::new(move |ev| tx.send(ev).is_ok())).unwrap();
    rx
}

/// All events of a request, until Done or Error.
pub fn collect(rx: &mpsc::Receiver<Event>) -> Outcome {
    let mut o = Outcome::default();
    loop {
        let ev = rx.recv_timeout(Duration::from_secs(300)).expect("no event from the engine in 300 s");
        let end = matches!(ev, Event::Done { .. } | Event::Error(_));
        o.events.push(ev);
        if end {
            return o;
        }
    }
}

pub fn run(e: &Engine, req: GenRequest) -> Outcome {
    collect(&submit(e, req))
}
