//! Resumable, chunked prefill (`Session::extend`): rows `cached..end` run
//! over the cached rows as past, image spans that straddle chunk boundaries
//! get the right feature rows, and the result matches one prefill of the
//! whole prompt; a reused prefix gives bit-identical logits to a fresh
//! session that runs the same chunks.

mod common;
use common::{check, fixtures, Expected};
use qvc_model::{chunk_end, LoadOptions, Model, PrefillOptions, Session, PREFILL_CHUNK};
use qvc_runtime::Cpu;
use std::path::Path;

fn features(s: &mut Session, m: &Model, ids: &[u32]) -> Vec<Vec<f32>> {
    m.tokenizer.image_spans(ids).unwrap().iter().map(|sp| s.encode_image(&sp.path).unwrap()).collect()
}

/// The last logits of `ids` run in chunks of `chunk` from `start` (the cache holding `ids[..start]`).
fn chunked(s: &mut Session, ids: &[u32], feats: &[Vec<f32>], chunk: usize) -> Vec<f32> {
    let refs: Vec<&[f32]> = feats.iter().map(Vec::as_slice).collect();
    let mut logits = vec![];
    while s.cached_tokens() < ids.len() {
        logits = s.extend(ids, chunk_end(s.cached_tokens(), ids.len(), chunk), &refs).unwrap();
    }
    logits
}

fn full_last(m: &Model, dir: &Path, ids: &[u32]) -> Vec<f32> {
    let cpu = Cpu;
    let mut s = Session::new(m, &cpu);
    s.set_image_dir(dir);
    let all = s.prefill(ids, &PrefillOptions { all_logits: true, hidden: false }).unwrap().logits;
    all[all.len() - m.config.vocab_size..].to_vec()
}

#[test]
fn chunked_prefill_matches_one_prefill_and_the_reference() {
    let Some(dir) = fixtures() else { return };
    let e = Expected::load(&dir);
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let cpu = Cpu;
    for case in ["img2", "ground", "text"] {
        let ids = e.ids(&e.json["chat"][case]["input_ids"]);
        let whole = full_last(&m, &dir, &ids);
        let want = e.f32(&format!("chat/{case}/last_logits"));
        // Session::prefill: PREFILL_CHUNK boundaries (img2 has 553 tokens: its
        // second picture straddles row 512).
        let mut s = Session::new(&m, &cpu);
        s.set_image_dir(&dir);
        let got = s.prefill(&ids, &PrefillOptions::default()).unwrap().logits;
        assert_eq!(s.cached_tokens(), ids.len());
        assert_eq!(s.prefilled_rows(), ids.len());
        assert_eq!(s.tokens(), &ids[..]);
        check(&format!("{case}: chunks of {PREFILL_CHUNK} vs one prefill"), &got, &whole, 1e-5);
        check(&format!("{case}: chunks of {PREFILL_CHUNK} vs reference"), &got, &want, 1e-4);
        // Small chunks: every picture straddles boundaries.
        for chunk in [64, 100] {
            let mut s = Session::new(&m, &cpu);
            s.set_image_dir(&dir);
            let f = features(&mut s, &m, &ids);
            let got = chunked(&mut s, &ids, &f, chunk);
            check(&format!("{case}: chunks of {chunk} vs one prefill"), &got, &whole, 1e-5);
            // Decoding after a chunked prefill continues the same sequence.
            let t = qvc_model::sampling::argmax(&got) as u32;
            let after = s.step(t).unwrap();
            let mut ext = ids.clone();
            ext.push(t);
            let mut all = s.tokens().to_vec();
            all.pop();
            assert_eq!(all, ids);
            let want_next = full_last(&m, &dir, &ext);
            check(&format!("{case}: step after chunks of {chunk}"), &after, &want_next, 1e-5);
        }
    }
}

#[test]
fn a_reused_prefix_gives_the_logits_of_a_fresh_session() {
    let Some(dir) = fixtures() else { return };
    let e = Expected::load(&dir);
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let cpu = Cpu;
    let chunk = 64;
    // The ground case's first turn, then the whole conversation.
    let ids = e.ids(&e.json["chat"]["ground"]["input_ids"]);
    let first = qvc_model::chat::make_context(
        &m.tokenizer,
        qvc_model::chat::DEFAULT_SYSTEM,
        &[],
        "Picture 1:<img>grey.png</img>\nFind the circle.",
        6144,
    )
    .unwrap();
    assert_eq!(ids[..first.len() - 3], first[..first.len() - 3]);
    let mut s = Session::new(&m, &cpu);
    s.set_image_dir(&dir);
    let f1 = features(&mut s, &m, &first);
    chunked(&mut s, &first, &f1, chunk);
    s.step(42).unwrap();
    assert_eq!(s.prefilled_rows(), first.len());
    let keep = s.reusable_prefix(&ids, chunk);
    assert!(keep >= 256 && keep.is_multiple_of(chunk) && keep < first.len(), "kept {keep}");
    s.truncate(keep);
    assert_eq!(s.cached_tokens(), keep);
    let f = features(&mut s, &m, &ids);
    let reused = chunked(&mut s, &ids, &f, chunk);
    let mut fresh = Session::new(&m, &cpu);
    fresh.set_image_dir(&dir);
    let want = chunked(&mut fresh, &ids, &f, chunk);
    assert_eq!(reused, want, "logits after a reused prefix differ from a fresh session's");
    // Nothing to reuse for a different conversation, or when nothing would be left to run.
    let text = e.ids(&e.json["chat"]["text"]["input_ids"]);
    assert!(s.reusable_prefix(&text, chunk) < chunk);
    assert_eq!(s.reusable_prefix(&ids[..chunk], chunk), 0);
}

#[test]
fn extend_refuses_what_it_cannot_run() {
    let Some(dir) = fixtures() else { return };
    let e = Expected::load(&dir);
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let cpu = Cpu;
    let ids = e.ids(&e.json["chat"]["text"]["input_ids"]);
    let mut s = Session::new(&m, &cpu);
    s.extend(&ids, 10, &[]).unwrap();
    let err = s.extend(&ids, 10, &[]).unwrap_err().to_string();
    assert!(err.contains("nothing to run"), "{err}");
    let mut other = ids.clone();
    other[3] += 1;
    let err = s.extend(&other, 20, &[]).unwrap_err().to_string();
    assert!(err.contains("does not start with"), "{err}");
    let img = e.ids(&e.json["chat"]["img1"]["input_ids"]);
    let mut s = Session::new(&m, &cpu);
    let err = s.extend(&img, 40, &[]).unwrap_err().to_string();
    assert!(err.contains("1 image span(s) but 0"), "{err}");
    // The GPU executor extends its device cache too (tests/gpu_emu.rs checks
    // the numbers), but not past the cache's rows, and says so.
    let gpu = m.gpu_backend(Box::new(qvc_runtime::gpu::EmuDevice::new(qvc_codegen::Target::Sm80)), 1, 16).unwrap();
    let mut g = Session::new(&m, &gpu);
    assert!(g.can_extend());
    g.extend(&ids, 10, &[]).unwrap();
    let err = g.extend(&ids, 20, &[]).unwrap_err().to_string();
    assert!(err.contains("exceed the device KV cache of 16 rows"), "{err}");
    assert_eq!(g.cached_tokens(), 10, "a refused chunk leaves the cache as it was");
}
