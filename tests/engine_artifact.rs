//! The serving engine on a compiled CPU artifact: prompts are prefilled
//! whole (bucketed prefill programs start from an empty cache, so no chunks
//! and no prefix reuse), decode batches are split into the artifact's
//! `--max-batch`, and greedy answers equal `generate` on the same artifact.

mod common;
use common::{fixtures, Expected};
use qvc::compile::{compile, CompileOptions, SourceSpec};
use qvc_model::sampling::SamplingParams;
use qvc_model::{generate, GenerateOptions, LoadOptions, Model, Session};
use qvc_runtime::{Backend, Cpu};
use qvc_serve::{Engine, EngineConfig, Event, GenRequest, ImageInput, ImageKey};
use std::sync::{mpsc, Arc};

fn images(m: &Model, dir: &std::path::Path, prompt: &[u32]) -> Vec<ImageInput> {
    let size = m.config.visual.image_size as u32;
    m.tokenizer
        .image_spans(prompt)
        .unwrap()
        .iter()
        .map(|s| {
            let bytes = std::fs::read(dir.join(&s.path)).unwrap();
            let img = qvc_model::image::decode_rgb(&bytes, &s.path).unwrap();
            let px = qvc_model::image::preprocess_rgb(&img, size, &s.path).unwrap();
            ImageInput {
                key: ImageKey::of(&bytes),
                name: s.path.clone(),
                width: img.width,
                height: img.height,
                pixels: Some(Arc::new(px)),
            }
        })
        .collect()
}

#[test]
fn an_artifact_serves_concurrent_requests() {
    let Some(dir) = fixtures() else { return };
    let e = Expected::load(&dir);
    let out = std::env::temp_dir().join(format!("qvc-engine-artifact-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let opt = CompileOptions { max_seq: 640, max_batch: 2, force: true, ..Default::default() };
    compile(&SourceSpec::Checkpoint(dir.clone()), Some(&out), &opt, &indicatif::ProgressBar::hidden()).unwrap();
    let m = Model::load(&out, &LoadOptions::default()).unwrap();
    let o = out.clone();
    let engine = Engine::start(
        EngineConfig { max_batch: 3, ..Default::default() },
        Box::new(move |_| Ok((Arc::new(Model::load(&o, &LoadOptions::default())?), Box::new(Cpu) as Box<dyn Backend>))),
    );
    while engine.state() == qvc_serve::EngineState::Loading {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(engine.context_len(), Some(640));
    // img2 has two pictures (553 tokens, the 640 bucket holds 512 feature rows).
    let cases = ["img1", "text", "ground", "text", "img2"];
    let mut want = vec![];
    let mut rxs = vec![];
    for case in cases {
        let prompt = e.ids(&e.json["chat"][case]["input_ids"]);
        let cpu = Cpu;
        let mut s = Session::new(&m, &cpu);
        s.set_image_dir(&dir);
        let gopt = GenerateOptions { max_new_tokens: 6, sampling: SamplingParams::greedy(), stop_ids: vec![] };
        want.push(generate(&mut s, &prompt, &gopt, &mut |_| {}).unwrap().text);
        let (tx, rx) = mpsc::channel();
        let req = GenRequest::greedy(prompt.clone(), images(&m, &dir, &prompt), 6, vec![]);
        engine.submit(req, Box::new(move |ev| tx.send(ev).is_ok())).unwrap();
        rxs.push(rx);
    }
    for (i, rx) in rxs.iter().enumerate() {
        let events: Vec<Event> = rx.iter().collect(); // until the engine drops the sink
        assert!(matches!(events[0], Event::Started { cached_tokens: 0, .. }), "{:?}", events[0]);
        match events.last() {
            Some(Event::Done { text, usage, .. }) => {
                assert_eq!(text, &want[i], "request {i} ({})", cases[i]);
                assert_eq!(usage.completion_tokens, 6);
            }
            other => panic!("request {i}: {other:?}"),
        }
    }
    assert!(engine.wait_idle(std::time::Duration::from_secs(30)));
    let _ = std::fs::remove_dir_all(&out);
}
