//! The fixture cases both checkpoints (bf16 and GPTQ int4) are held to.

use super::{check, Expected};
use qvc_model::sampling::argmax;
use qvc_model::{Model, PrefillOptions, Session};
use qvc_runtime::Cpu;
use std::path::Path;

/// Prompt `case` of `expected.json`'s `chat`: last logits, hidden states and
/// every greedy step through the KV cache within `tol`, identical tokens.
pub fn chat_case(m: &Model, e: &Expected, dir: &Path, case: &str, tol: f64) {
    let c = &e.json["chat"][case];
    let ids = e.ids(&c["input_ids"]);
    let backend = Cpu;
    let mut s = Session::new(m, &backend);
    // Every picture, photo.jpg included, is decoded and preprocessed from its file.
    s.set_image_dir(dir);
    let has_hidden = c.get("hidden").is_some();
    let all = c.get("all_logits").is_some();
    let out = s.prefill(&ids, &PrefillOptions { all_logits: all, hidden: has_hidden }).unwrap();
    let v = m.config.vocab_size;
    let last = &out.logits[out.logits.len() - v..];
    check(&format!("chat/{case}/last_logits"), last, &e.f32(&format!("chat/{case}/last_logits")), tol);
    if all {
        check(&format!("chat/{case}/all_logits"), &out.logits, &e.f32(&format!("chat/{case}/all_logits")), tol);
    }
    if has_hidden {
        for (ours, theirs) in [
            ("hidden.embeds", "embeds"),
            ("hidden.block_0", "block_0"),
            ("hidden.block_1", "block_1"),
            ("hidden.final_norm", "final_norm"),
        ] {
            check(
                &format!("chat/{case}/hidden/{theirs}"),
                &out.hidden[ours],
                &e.f32(&format!("chat/{case}/hidden/{theirs}")),
                tol,
            );
        }
    }
    // Greedy continuation through the KV cache.
    let want = e.ids(&c["greedy"]["ids"]);
    let step_logits = c["greedy"].get("step_logits").and_then(|n| n.as_str()).map(|n| e.f32(n));
    let mut logits = last.to_vec();
    let mut got = Vec::new();
    for k in 0..want.len() {
        if let Some(sl) = &step_logits {
            check(&format!("chat/{case}/greedy_step_logits[{k}]"), &logits, &sl[k * v..(k + 1) * v], tol);
        }
        let t = argmax(&logits) as u32;
        got.push(t);
        if k + 1 < want.len() {
            logits = s.step(t).unwrap();
        }
    }
    assert_eq!(got, want, "chat/{case}: greedy tokens differ");
}

/// Long-context case `case` (dynamic NTK, logn) within `tol`, identical tokens.
pub fn long_case(m: &Model, e: &Expected, case: &str, tol: f64) {
    let c = &e.json["long"][case];
    let ids = e.ids(&c["input_ids"]);
    let backend = Cpu;
    let mut s = Session::new(m, &backend);
    let out = s.prefill(&ids, &PrefillOptions::default()).unwrap();
    assert_eq!(s.ntk_alpha(), c["ntk_alpha"].as_f64().unwrap(), "long/{case}: NTK alpha");
    check(&format!("long/{case}/last_logits"), &out.logits, &e.f32(&format!("long/{case}/last_logits")), tol);
    let want = e.ids(&c["greedy"]["ids"]);
    let v = m.config.vocab_size;
    let step_logits = c["greedy"].get("step_logits").and_then(|n| n.as_str()).map(|n| e.f32(n));
    let mut logits = out.logits;
    let mut got = Vec::new();
    for k in 0..want.len() {
        if let Some(sl) = &step_logits {
            check(&format!("long/{case}/greedy_step_logits[{k}]"), &logits, &sl[k * v..(k + 1) * v], tol);
        }
        let t = argmax(&logits) as u32;
        got.push(t);
        if k + 1 < want.len() {
            logits = s.step(t).unwrap();
        }
    }
    assert_eq!(got, want, "long/{case}: greedy tokens differ");
}
