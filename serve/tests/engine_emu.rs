//! The scheduler on the GPU code path without a GPU: the fixture checkpoint
//! run by the GPU executor on the PTX emulator (device KV cache, one slot per
//! sequence). Kept small: the emulator is slow. Three greedy requests run
//! together (the middle one finishes first, so the last steps decode slots
//! 0 and 2) and each answer equals the request alone; prompts are prefilled
//! whole (no chunks, no prefix reuse on a device KV cache).

mod common;
use common::*;
use qvc_model::{LoadOptions, Model};
use qvc_runtime::gpu::EmuDevice;
use qvc_runtime::Backend;
use qvc_serve::{Engine, EngineConfig, GenRequest};
use std::sync::Arc;

#[test]
fn concurrent_requests_on_the_emulated_gpu_equal_each_alone() {
    let Some(dir) = fixtures() else { return };
    let exp = expected(&dir);
    let d = dir.clone();
    let engine = Engine::start(
        EngineConfig { max_batch: 3, max_context: Some(256), ..Default::default() },
        Box::new(move |slots| {
            let m = Arc::new(Model::load(&d, &LoadOptions::default())?);
            let gpu = m.gpu_backend(Box::new(EmuDevice::new(qvc_codegen::Target::Sm80)), slots, 256)?;
            Ok((m, Box::new(gpu) as Box<dyn Backend>))
        }),
    );
    wait_ready(&engine);
    assert_eq!(engine.context_len(), Some(256));
    let prompt = ids(&exp["chat"]["text"]["input_ids"]);
    let reqs: Vec<GenRequest> =
        [3usize, 1, 3].iter().map(|&n| GenRequest::greedy(prompt.clone(), vec![], n, vec![])).collect();
    let alone: Vec<Outcome> = reqs.iter().map(|r| run(&engine, r.clone())).collect();
    let rxs: Vec<_> = reqs.iter().map(|r| submit(&engine, r.clone())).collect();
    for (i, (rx, want)) in rxs.iter().zip(&alone).enumerate() {
        let got = collect(rx);
        let ((f1, u1, t1), (f2, u2, t2)) = (got.done(), want.done());
        assert_eq!((f1, u1.completion_tokens, t1), (f2, u2.completion_tokens, t2), "request {i}");
        assert_eq!(got.started(), (prompt.len(), 0), "no prefix reuse on a device KV cache");
    }
    assert!(engine.wait_idle(std::time::Duration::from_secs(60)));
    assert_eq!(engine.metrics().failure, 0);
}
