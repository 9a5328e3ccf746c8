//! Parity with the official PyTorch Qwen-VL on `../shared/fixtures/tiny-qwen-vl`:
//! vision features and intermediates, prompt logits, hidden states, greedy
//! continuations through the KV cache, and the long-context (dynamic NTK +
//! logn) cases. Tolerance: relative error ‖Δ‖/‖ref‖ below 1e-4 (DESIGN.md's
//! CPU f32 target; the issue allows 1e-3), identical greedy tokens.

mod common;
use common::parity::{chat_case, long_case};
use common::{check, fixtures, Expected};
use qvc_model::graphs::VisionOptions;
use qvc_model::image::preprocess;
use qvc_model::sampling::argmax;
use qvc_model::{LoadOptions, Model, PrefillOptions, Session};
use qvc_runtime::{Backend, Cpu};
use std::collections::HashMap;
use std::path::Path;

const TOL: f64 = 1e-4;

fn model(dir: &Path, config: Option<&str>) -> Model {
    Model::load(dir, &LoadOptions { config: config.map(|c| dir.join(c)), ..Default::default() })
        .expect("fixture model loads")
}

fn vision(m: &Model, pixels: &[f32], intermediates: bool) -> HashMap<String, Vec<f32>> {
    let g = m.vision_graph(&VisionOptions { intermediates, ..Default::default() }).unwrap();
    let inputs = HashMap::from([("pixels".to_string(), qvc_ir::InputRef::F32(pixels))]);
    Cpu.run(&g, &m.weights, &inputs).unwrap()
}

#[test]
fn position_tables_match_torch_bicubic() {
    let Some(dir) = fixtures() else { return };
    let (m, e) = (model(&dir, None), Expected::load(&dir));
    check("vit/pos_embed_resized", m.vit_pos_embed(), &e.f32("vit/pos_embed_resized"), 1e-6);
    check("resampler/pos_embed_resized", m.pool_pos_embed(), &e.f32("resampler/pos_embed_resized"), 1e-6);
}

#[test]
fn vision_tower_matches_reference() {
    let Some(dir) = fixtures() else { return };
    let (m, e) = (model(&dir, None), Expected::load(&dir));
    let out = vision(&m, &e.f32("pixels/shapes.png"), true);
    for name in ["patch_embed", "ln_pre", "block_0", "block_1", "resampler", "ln_post"] {
        check(&format!("vit/shapes.png/{name}"), &out[name], &e.f32(&format!("vit/shapes.png/{name}")), TOL);
    }
    for img in ["shapes.png", "photo.jpg", "icon_rgba.png", "grey.png"] {
        let out = vision(&m, &e.f32(&format!("pixels/{img}")), false);
        check(&format!("vision/{img}"), &out["features"], &e.f32(&format!("vision/{img}")), TOL);
    }
    // End to end from the PNG files (preprocessing included).
    let px = preprocess(&dir.join("grey.png"), 448).unwrap();
    check("vision/grey.png from file", &vision(&m, &px, false)["features"], &e.f32("vision/grey.png"), TOL);
}

#[test]
fn chat_prompts_match_reference() {
    let Some(dir) = fixtures() else { return };
    let (m, e) = (model(&dir, None), Expected::load(&dir));
    for case in ["text", "img1", "img2", "ground"] {
        chat_case(&m, &e, &dir, case, TOL);
    }
}

/// The two-picture prompt (photo.jpg and shapes.png) from the files against the
/// reference, at the standard tolerance: photo.jpg decodes to Pillow's pixels
/// exactly (libjpeg-turbo's decoder, see model/src/image.rs). With the earlier
/// zune-jpeg decoder (up to 4 levels off) this was 2.9e-3.
#[test]
fn jpeg_prompt_matches_reference() {
    let Some(dir) = fixtures() else { return };
    let (m, e) = (model(&dir, None), Expected::load(&dir));
    let ids = e.ids(&e.json["chat"]["img2"]["input_ids"]);
    let backend = Cpu;
    let mut s = Session::new(&m, &backend);
    s.set_image_dir(&dir);
    let out = s.prefill(&ids, &PrefillOptions::default()).unwrap();
    check("chat/img2/last_logits (photo.jpg decoded here)", &out.logits, &e.f32("chat/img2/last_logits"), TOL);
}

#[test]
fn long_context_ntk_and_logn_match_reference() {
    let Some(dir) = fixtures() else { return };
    let e = Expected::load(&dir);
    let m64 = model(&dir, Some("config_seq64.json"));
    for case in ["s64_cross", "s64_text_1p5x", "s64_text_3x"] {
        long_case(&m64, &e, case, TOL);
    }
    long_case(&model(&dir, None), &e, "long2200", TOL);
}

#[test]
fn long_context_with_image_matches_reference() {
    let Some(dir) = fixtures() else { return };
    let e = Expected::load(&dir);
    let m64 = model(&dir, Some("config_seq64.json"));
    let c = &e.json["long"]["s64_chat_img1"];
    let ids = e.ids(&c["input_ids"]);
    let backend = Cpu;
    let mut s = Session::new(&m64, &backend);
    s.set_image_dir(&dir);
    let out = s.prefill(&ids, &PrefillOptions::default()).unwrap();
    assert_eq!(s.ntk_alpha(), 15.0);
    check("long/s64_chat_img1/last_logits", &out.logits, &e.f32("long/s64_chat_img1/last_logits"), TOL);
    let want = e.ids(&c["greedy"]["ids"]);
    let mut logits = out.logits;
    let mut got = Vec::new();
    for k in 0..want.len() {
        let t = argmax(&logits) as u32;
        got.push(t);
        if k + 1 < want.len() {
            logits = s.step(t).unwrap();
        }
    }
    assert_eq!(got, want);
}
