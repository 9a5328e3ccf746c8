//! The CPU decode's batch-invariant group at real widths: a one-layer
//! checkpoint whose Linears all have at least 1024 inputs (hidden 1024, MLP
//! 1024, the real vocabulary) with random bf16 weights. `qvc serve` decodes
//! up to `Model::cpu_decode_invariant_rows` sequences in one step (24 with
//! AVX-512 at these widths, else 8); each of them must get, bit for bit, the
//! logits it gets alone, in the default mode and with `--cpu-math fast`.
//! Its own test binary: it flips the process-wide CPU math mode.

mod common;
use common::fixtures;
use qvc_kernels::{set_cpu_math, CpuMath, Isa};
use qvc_model::sampling::argmax;
use qvc_model::{step_batch, Config, LoadOptions, Model, PrefillOptions, Session};
use qvc_runtime::{Cpu, DECODE_BATCH_INVARIANT_MAX};
use std::path::Path;

/// Writes the wide checkpoint into `dir` (tokenizer and generation config
/// from the fixture).
fn write_wide_checkpoint(fixture: &Path, dir: &Path) {
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap()).unwrap();
    cfg["hidden_size"] = 1024.into();
    cfg["intermediate_size"] = 2048.into();
    cfg["kv_channels"] = 128.into();
    cfg["num_attention_heads"] = 8.into();
    cfg["num_hidden_layers"] = 1.into();
    cfg["visual"]["output_dim"] = 1024.into();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    for f in ["qwen.tiktoken", "generation_config.json"] {
        std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
    }
    let config = Config::from_file(&dir.join("config.json")).unwrap();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = config
        .expected_tensors()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let bytes = (0..n)
                .flat_map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let u = (seed >> 40) as f32 / (1u64 << 24) as f32;
                    half::bf16::from_f32((u - 0.5) * 0.08).to_le_bytes()
                })
                .collect();
            (name, shape, bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `n` text prompts of different lengths, greedy-decoded `steps` tokens
/// alone and then together in one batch: every step's logits equal.
#[allow(clippy::needless_range_loop)] // `k` indexes every sequence's trace
fn check(m: &Model, n: usize, steps: usize) {
    let backend = Cpu;
    let prompts: Vec<Vec<u32>> =
        (0..n).map(|i| (0..3 + i % 5).map(|j| ((i * 7919 + j * 104_729) % 151_000) as u32).collect()).collect();
    let mut alone = vec![];
    for p in &prompts {
        let mut s = Session::new(m, &backend);
        let mut logits = s.prefill(p, &PrefillOptions::default()).unwrap().logits;
        let mut trace = vec![];
        for _ in 0..steps {
            let t = argmax(&logits) as u32;
            logits = s.step(t).unwrap();
            trace.push(bits(&logits));
        }
        alone.push(trace);
    }
    let mut sessions: Vec<Session> = prompts.iter().map(|_| Session::new(m, &backend)).collect();
    let mut last: Vec<Vec<f32>> = sessions
        .iter_mut()
        .zip(&prompts)
        .map(|(s, p)| s.prefill(p, &PrefillOptions::default()).unwrap().logits)
        .collect();
    for k in 0..steps {
        let ids: Vec<u32> = last.iter().map(|l| argmax(l) as u32).collect();
        let mut refs: Vec<&mut Session> = sessions.iter_mut().collect();
        last = step_batch(&mut refs, &ids).unwrap();
        for (b, l) in last.iter().enumerate() {
            assert!(bits(l) == alone[b][k], "{n} sequences, sequence {b}, step {k}: batched logits differ from alone");
        }
    }
}

#[test]
fn the_cpu_decode_group_is_batch_invariant_at_real_widths() {
    let Some(fixture) = fixtures() else { return };
    let dir = std::env::temp_dir().join(format!("qvc-wide-batch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_wide_checkpoint(&fixture, &dir);
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let group = m.cpu_decode_invariant_rows();
    let want = if Isa::detect() == Isa::Avx512 { 24 } else { DECODE_BATCH_INVARIANT_MAX };
    assert_eq!(group, want, "the invariant group at widths ≥ 1024 with bf16 weights");
    for math in [CpuMath::Exact, CpuMath::Fast] {
        set_cpu_math(math);
        check(&m, group, 2);
    }
    set_cpu_math(CpuMath::Exact);
    let _ = std::fs::remove_dir_all(&dir);
}
