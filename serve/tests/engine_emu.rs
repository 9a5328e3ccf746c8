//! The scheduler on the GPU code path without a GPU: the fixture checkpoint
//! run by the GPU executor on the PTX emulator (device KV cache, one slot per
//! sequence). Kept small: the emulator is slow. Prompts are prefilled in
//! chunks of 8 rows (each chunk after the slot's cached rows, interleaved
//! with the running decode steps), and a request whose prompt a slot still
//! holds reuses that prefix (prefills only the last chunk). Three greedy
//! requests run together (the middle one finishes first, so the last steps
//! decode slots 0 and 2) and each answer equals the request alone, and an
//! answer after prefix reuse equals the fresh one.

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
        EngineConfig { max_batch: 3, max_context: Some(256), prefill_chunk: 8, ..Default::default() },
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
    // One after another: the first prefills 33 rows in 5 chunks; the next
    // ones find its prompt in a slot and prefill only the last chunk.
    let alone: Vec<Outcome> = reqs.iter().map(|r| run(&engine, r.clone())).collect();
    let reuse = (prompt.len() - 1) / 8 * 8;
    let cached: Vec<usize> = alone.iter().map(|o| o.started().1).collect();
    assert_eq!(cached, [0, reuse, reuse], "prefix reuse on the device KV cache");
    let ((f0, u0, t0), (f2, u2, t2)) = (alone[0].done(), alone[2].done());
    assert_eq!((f2, u2.completion_tokens, t2), (f0, u0.completion_tokens, t0), "reused prefix vs fresh");
    assert!(engine.metrics().prefix_hit_tokens >= 2 * reuse as u64);
    let rxs: Vec<_> = reqs.iter().map(|r| submit(&engine, r.clone())).collect();
    let mut cached = vec![];
    for (i, (rx, want)) in rxs.iter().zip(&alone).enumerate() {
        let got = collect(rx);
        let ((f1, u1, t1), (f2, u2, t2)) = (got.done(), want.done());
        assert_eq!((f1, u1.completion_tokens, t1), (f2, u2.completion_tokens, t2), "request {i}");
        assert_eq!(got.started().0, prompt.len());
        cached.push(got.started().1);
    }
    // The slot that holds the prompt serves one of them; the others prefill
    // in empty slots.
    cached.sort_unstable();
    assert_eq!(cached, [0, 0, reuse], "one concurrent request reuses the cached prompt");
    assert!(engine.wait_idle(std::time::Duration::from_secs(60)));
    assert_eq!(engine.metrics().failure, 0);
}
