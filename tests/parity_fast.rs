//! `--cpu-math fast` against the official PyTorch Qwen-VL on
//! `../shared/fixtures/tiny-qwen-vl`: the vision features of every fixture
//! picture and every chat prompt's last logits stay within [`FAST_TOL`]
//! (the README's "within about 1e-2") when activations are rounded to bf16
//! for the bf16 weights and the attention's products (AVX512-BF16 CPUs; on
//! others fast runs exactly and this is the exact parity again).
//!
//! The same for the GPTQ int4 fixture's prompts, whose int4 Linears run
//! the int8-activation GEMV (VNNI) and, on AMX CPUs, the bf16 tiles.
//!
//! Its own test binary because it sets the process-wide mode, which the
//! exact parity tests in other binaries must not see.

mod common;
use common::{check, fixture, fixtures, rel_err, Expected};
use qvc_model::graphs::VisionOptions;
use qvc_model::{LoadOptions, Model, PrefillOptions, Session};
use qvc_runtime::{Backend, Cpu};
use std::collections::HashMap;

/// Relative error allowed under `fast`: each bf16 rounding is up to 2⁻⁸ relative,
/// and the tiny model's two blocks add a few of them up.
const FAST_TOL: f64 = 2e-2;

#[test]
fn fast_mode_stays_near_the_reference() {
    let Some(dir) = fixtures() else { return };
    qvc_kernels::set_cpu_math(qvc_kernels::CpuMath::Fast);
    let m = Model::load(&dir, &LoadOptions::default()).expect("fixture model loads");
    let e = Expected::load(&dir);
    let g = m.vision_graph(&VisionOptions::default()).unwrap();
    let mut worst: f64 = 0.0;
    for img in ["shapes.png", "photo.jpg", "icon_rgba.png", "grey.png"] {
        let px = e.f32(&format!("pixels/{img}"));
        let out =
            Cpu.run(&g, &m.weights, &HashMap::from([("pixels".to_string(), qvc_ir::InputRef::F32(&px))])).unwrap();
        let want = e.f32(&format!("vision/{img}"));
        check(&format!("fast vision/{img}"), &out["features"], &want, FAST_TOL);
        worst = worst.max(rel_err(&out["features"], &want));
    }
    chat_cases_near_reference(&m, &e, &dir, "fast");
    // Fast really rounds where bf16 products pay: not the exact path's 1e-6.
    if qvc_kernels::gemm::bf16_products_pay() {
        assert!(worst > 1e-5, "fast vision matched to {worst:e}: the bf16 paths did not run");
    }
}

#[test]
fn fast_mode_int4_stays_near_the_reference() {
    let Some(dir) = fixture("tiny-qwen-vl-int4") else { return };
    qvc_kernels::set_cpu_math(qvc_kernels::CpuMath::Fast);
    let m = Model::load(&dir, &LoadOptions::default()).expect("int4 fixture model loads");
    let e = Expected::load(&dir);
    chat_cases_near_reference(&m, &e, &dir, "fast int4");
}

/// Every chat prompt of the fixture: its last logits within [`FAST_TOL`].
fn chat_cases_near_reference(m: &Model, e: &Expected, dir: &std::path::Path, label: &str) {
    for case in ["text", "img1", "img2", "ground"] {
        let c = &e.json["chat"][case];
        let mut s = Session::new(m, &Cpu);
        s.set_image_dir(dir);
        let out = s.prefill(&e.ids(&c["input_ids"]), &PrefillOptions::default()).unwrap();
        let v = m.config.vocab_size;
        let want = e.f32(&format!("chat/{case}/last_logits"));
        check(&format!("{label} chat/{case}/last_logits"), &out.logits[out.logits.len() - v..], &want, FAST_TOL);
    }
}

/// Under `fast`, where bf16 decode runs on AMX tiles (in a process that
/// decodes batches, as `qvc serve` does), one batched decode step holds 16
/// sequences (`Model::cpu_decode_group`), and each is still,
/// bit for bit, what it decodes alone; elsewhere the group stays at
/// `DECODE_BATCH_INVARIANT_MAX` and the same holds for it (see
/// `common::group`; `tests/batch_decode.rs` holds exact math to the same).
#[test]
fn fast_decode_group_is_batch_invariant() {
    qvc_kernels::set_cpu_math(qvc_kernels::CpuMath::Fast);
    qvc_kernels::gemm::set_batched_decode(true);
    common::group::decode_group_is_batch_invariant("fast", qvc_kernels::gemm::fast_decode_on_tiles);
}
