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

/// Under `fast`, where bf16 decode runs on AMX tiles, one batched decode
/// step holds 16 sequences (`Model::cpu_decode_group`), and each is still,
/// bit for bit, what it decodes alone; elsewhere the group stays at
/// `DECODE_BATCH_INVARIANT_MAX` and the same holds for it. A demo-built
/// checkpoint at the smallest widths the tiles take (hidden and MLP 1024:
/// the fixture's are too narrow, so its group is 8 on every CPU). A
/// compiled artifact has decode programs up to its `--max-batch` (at most
/// 8), which caps its group.
#[test]
fn fast_decode_group_is_batch_invariant() {
    use qvc_kernels::gemm::fast_decode_on_tiles;
    use qvc_kernels::{Isa, MatRef};
    qvc_kernels::set_cpu_math(qvc_kernels::CpuMath::Fast);
    let dir = std::env::temp_dir().join(format!("qvc-group-{}", std::process::id()));
    qvc::demo::write_checkpoint_with(&dir, |v| {
        v["hidden_size"] = serde_json::json!(1024);
        v["num_attention_heads"] = serde_json::json!(8);
        v["kv_channels"] = serde_json::json!(128);
        v["intermediate_size"] = serde_json::json!(2048);
        v["num_hidden_layers"] = serde_json::json!(1);
        v["visual"]["layers"] = serde_json::json!(1);
        v["visual"]["output_dim"] = serde_json::json!(1024);
    })
    .unwrap();
    // Whether this CPU's Fast decode of 16 rows at this width runs on tiles,
    // asked of the GEMM dispatcher itself.
    let (x, w) = (vec![0f32; 16 * 1024], vec![half::bf16::ZERO; 8 * 1024]);
    let a = MatRef::row_major(qvc_ir::Elems::F32(&x), 16, 1024);
    let b = MatRef::row_major(qvc_ir::Elems::BF16(&w), 8, 1024).transposed();
    let tiles = fast_decode_on_tiles(Isa::detect(), &a, &b);
    let want = if tiles { 16 } else { qvc_runtime::DECODE_BATCH_INVARIANT_MAX };

    let m = Model::load(&dir, &LoadOptions::default()).expect("demo model loads");
    let group = m.cpu_decode_group();
    eprintln!("fast decode group: {group} (AMX tiles: {tiles})");
    assert_eq!(group, want);
    group_is_batch_invariant(&m, group);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `group` sessions with different prompts, decoded alone and then in one
/// `step_batch` per step: the same logits, bit for bit, for 3 steps.
#[allow(clippy::needless_range_loop)] // `step` indexes every sequence's trace
fn group_is_batch_invariant(m: &Model, group: usize) {
    use qvc_model::sampling::argmax;
    let prompts: Vec<Vec<u32>> =
        (0..group).map(|i| (0..3 + i % 5).map(|j| ((i * 37 + j * 11) % 200) as u32).collect()).collect();
    let steps = 3;
    let mut alone = vec![];
    for p in &prompts {
        let mut s = Session::new(m, &Cpu);
        let mut logits = s.prefill(p, &PrefillOptions::default()).unwrap().logits;
        let mut trace = vec![];
        for _ in 0..steps {
            let t = argmax(&logits) as u32;
            logits = s.step(t).unwrap();
            trace.push(logits.iter().map(|v| v.to_bits()).collect::<Vec<u32>>());
        }
        alone.push(trace);
    }
    let mut sessions: Vec<Session> = prompts.iter().map(|_| Session::new(m, &Cpu)).collect();
    let mut next: Vec<u32> = sessions
        .iter_mut()
        .zip(&prompts)
        .map(|(s, p)| argmax(&s.prefill(p, &PrefillOptions::default()).unwrap().logits) as u32)
        .collect();
    for step in 0..steps {
        let mut refs: Vec<&mut Session> = sessions.iter_mut().collect();
        let out = qvc_model::step_batch(&mut refs, &next).unwrap();
        for (i, l) in out.iter().enumerate() {
            let bits: Vec<u32> = l.iter().map(|v| v.to_bits()).collect();
            assert!(bits == alone[i][step], "sequence {i} of {group}, step {step}: batched logits differ from alone");
        }
        next = out.iter().map(|l| argmax(l) as u32).collect();
    }
}
