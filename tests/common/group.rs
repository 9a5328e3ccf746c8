//! The batched decode group: one `step_batch` of `Model::cpu_decode_group`
//! sequences gives each, bit for bit, what it decodes alone.

use qvc_kernels::{Isa, MatRef};
use qvc_model::sampling::argmax;
use qvc_model::{LoadOptions, Model, PrefillOptions, Session};
use qvc_runtime::Cpu;

/// Under the process's CPU math (`label` names it): a demo-built checkpoint
/// at the smallest widths the AMX tiles take (hidden and MLP 1024: the
/// fixture's are too narrow, so its group is 8 on every CPU) has the decode
/// group that `on_tiles`, the GEMM dispatcher's own predicate for 16 rows
/// at that width, implies (16 on tiles, else `DECODE_BATCH_INVARIANT_MAX`),
/// and a group that size is batch-invariant. A compiled artifact has decode
/// programs up to its `--max-batch` (at most 8), which caps its group.
pub fn decode_group_is_batch_invariant(label: &str, on_tiles: fn(Isa, &MatRef, &MatRef) -> bool) {
    let dir = std::env::temp_dir().join(format!("qvc-group-{label}-{}", std::process::id()));
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
    let (x, w) = (vec![0f32; 16 * 1024], vec![half::bf16::ZERO; 8 * 1024]);
    let a = MatRef::row_major(qvc_ir::Elems::F32(&x), 16, 1024);
    let b = MatRef::row_major(qvc_ir::Elems::BF16(&w), 8, 1024).transposed();
    let tiles = on_tiles(Isa::detect(), &a, &b);
    let want = if tiles { 16 } else { qvc_runtime::DECODE_BATCH_INVARIANT_MAX };

    let m = Model::load(&dir, &LoadOptions::default()).expect("demo model loads");
    let group = m.cpu_decode_group();
    eprintln!("{label} decode group: {group} (AMX tiles: {tiles})");
    assert_eq!(group, want);
    group_is_batch_invariant(&m, group);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `group` sessions with different prompts, decoded alone and then in one
/// `step_batch` per step: the same logits, bit for bit, for 3 steps.
#[allow(clippy::needless_range_loop)] // `step` indexes every sequence's trace
fn group_is_batch_invariant(m: &Model, group: usize) {
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
