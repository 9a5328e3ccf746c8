//! A compiled model runs: `qvc compile` the fixture for the CPU, load the
//! artifact with `Model::load`, and the chat prompts give the same logits
//! (1e-3 relative, the bound; measured far below) and the same
//! greedy tokens as the uncompiled checkpoint, through the shape buckets
//! (padded prompts, padded KV-cache buckets with a run-time length).

mod common;
use common::{fixtures, rel_err, Expected};
use qvc::compile::{compile, CompileOptions, SourceSpec};
use qvc_model::sampling::argmax;
use qvc_model::{LoadOptions, Model, ModelError, PrefillOptions, Session};
use qvc_runtime::Cpu;
use std::path::Path;

fn greedy(m: &Model, dir: &Path, ids: &[u32], steps: usize) -> (Vec<f32>, Vec<u32>, Vec<Vec<f32>>) {
    let backend = Cpu;
    let mut s = Session::new(m, &backend);
    s.set_image_dir(dir);
    let first = s.prefill(ids, &PrefillOptions::default()).unwrap().logits;
    let (mut logits, mut toks, mut all) = (first.clone(), vec![], vec![]);
    for _ in 0..steps {
        let t = argmax(&logits) as u32;
        toks.push(t);
        logits = s.step(t).unwrap();
        all.push(logits.clone());
    }
    (first, toks, all)
}

#[test]
fn compiled_fixture_matches_the_checkpoint() {
    let Some(dir) = fixtures() else { return };
    let out = std::env::temp_dir().join(format!("qvc-compiled-model-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let opt = CompileOptions { max_seq: 512, force: true, ..Default::default() };
    compile(&SourceSpec::Checkpoint(dir.clone()), Some(&out), &opt, &indicatif::ProgressBar::hidden()).unwrap();

    let plain = Model::load(&dir, &LoadOptions::default()).unwrap();
    let compiled = Model::load(&out, &LoadOptions::default()).unwrap();
    assert!(compiled.compiled().is_some() && plain.compiled().is_none());
    let e = Expected::load(&dir);
    for case in ["text", "img1", "ground"] {
        let ids = e.ids(&e.json["chat"][case]["input_ids"]);
        let (a0, at, al) = greedy(&plain, &dir, &ids, 6);
        let (b0, bt, bl) = greedy(&compiled, &dir, &ids, 6);
        let r = rel_err(&b0, &a0);
        assert!(r < 1e-3, "{case}: prefill logits differ by {r:e}");
        assert_eq!(bt, at, "{case}: greedy tokens differ");
        for (k, (x, y)) in bl.iter().zip(&al).enumerate() {
            let r = rel_err(x, y);
            assert!(r < 1e-3, "{case}: step {k} logits differ by {r:e}");
        }
        eprintln!("{case}: {} prompt tokens, prefill logits rel err {r:.1e}, tokens {bt:?}", ids.len());
    }

    // A prompt longer than the largest bucket is a clear error, not a crash.
    let backend = Cpu;
    let mut s = Session::new(&compiled, &backend);
    let long = vec![100u32; 600];
    match s.prefill(&long, &PrefillOptions::default()) {
        Err(ModelError::Compiled(msg)) => assert!(msg.contains("--max-seq"), "{msg}"),
        other => panic!("expected a bucket error, got {:?}", other.map(|o| o.logits.len())),
    }
    // So is asking a compiled model for what it was not compiled with.
    let e = Model::load(&out, &LoadOptions { image_size: Some(896), ..Default::default() }).err().unwrap();
    assert!(e.to_string().contains("--image-size"), "{e}");
    let _ = std::fs::remove_dir_all(&out);
}

/// A default `qvc compile` (no options) runs every prompt that fits
/// `--max-seq`, whatever its number of pictures: one prefill program per
/// token bucket takes the image features at run-time rows (the unused rows
/// `NO_ROW`). The fixture's two-picture prompt matches the reference (1e-4
/// relative, the same greedy tokens), and a three-picture prompt matches the
/// uncompiled checkpoint.
#[test]
fn default_artifact_answers_prompts_with_several_pictures() {
    let Some(dir) = fixtures() else { return };
    let out = std::env::temp_dir().join(format!("qvc-compiled-default-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let opt = CompileOptions { force: true, ..Default::default() };
    compile(&SourceSpec::Checkpoint(dir.clone()), Some(&out), &opt, &indicatif::ProgressBar::hidden()).unwrap();
    let compiled = Model::load(&out, &LoadOptions::default()).unwrap();
    let m = compiled.compiled().unwrap();
    let q = compiled.config.visual.queries();
    for p in m.programs.values().filter(|p| p.kind == "prefill") {
        assert_eq!(p.image_rows, p.tokens / (q + 2) * q, "prefill bucket {} holds every picture that fits", p.tokens);
    }
    assert_eq!(m.programs.values().filter(|p| p.kind == "prefill").count(), qvc::compile::prefill_buckets(2048).len());

    let e = Expected::load(&dir);
    let c = &e.json["chat"]["img2"];
    let ids = e.ids(&c["input_ids"]);
    let want = e.ids(&c["greedy"]["ids"]);
    let (first, toks, _) = greedy(&compiled, &dir, &ids, want.len());
    let r = rel_err(&first, &e.f32("chat/img2/last_logits"));
    eprintln!("img2 (2 pictures, {} tokens) on the default artifact: rel err {r:.2e}, tokens {toks:?}", ids.len());
    assert!(r < 1e-4, "img2: prefill logits differ from the reference by {r:e}");
    assert_eq!(toks, want, "img2: greedy tokens differ from the reference");

    // Three pictures: the artifact agrees with the checkpoint.
    let plain = Model::load(&dir, &LoadOptions::default()).unwrap();
    let pics: Vec<String> = ["photo.jpg", "shapes.png", "icon_rgba.png"].iter().map(|s| s.to_string()).collect();
    let query = qvc_model::chat::format_query(&pics, "What do the three pictures have in common?");
    let ids =
        qvc_model::chat::make_context(&plain.tokenizer, qvc_model::chat::DEFAULT_SYSTEM, &[], &query, 6144).unwrap();
    assert_eq!(plain.tokenizer.image_spans(&ids).unwrap().len(), 3);
    let (a0, at, al) = greedy(&plain, &dir, &ids, 4);
    let (b0, bt, bl) = greedy(&compiled, &dir, &ids, 4);
    let r = rel_err(&b0, &a0);
    eprintln!("3 pictures, {} tokens: compiled vs checkpoint rel err {r:.2e}, tokens {bt:?}", ids.len());
    assert!(r < 1e-4, "3 pictures: prefill logits differ by {r:e}");
    assert_eq!(bt, at, "3 pictures: greedy tokens differ");
    for (k, (x, y)) in bl.iter().zip(&al).enumerate() {
        let r = rel_err(x, y);
        assert!(r < 1e-4, "3 pictures: step {k} logits differ by {r:e}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
