//! Decoding several conversations together (`step_batch`: one program run,
//! every weight read once for all) gives each, bit for bit, the logits it
//! gets alone (the CPU decode is batch-invariant up to
//! `DECODE_BATCH_INVARIANT_MAX` sequences), with caches of different lengths
//! padded to the longest, on the checkpoint and on a compiled artifact
//! (`--max-batch`).

mod common;
use common::{fixtures, Expected};
use qvc::compile::{compile, CompileOptions, SourceSpec};
use qvc_model::sampling::argmax;
use qvc_model::{step_batch, LoadOptions, Model, PrefillOptions, Session};
use qvc_runtime::{Cpu, DECODE_BATCH_INVARIANT_MAX};
use std::path::Path;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn prompts(e: &Expected) -> Vec<Vec<u32>> {
    ["text", "img1", "ground"].iter().map(|c| e.ids(&e.json["chat"][*c]["input_ids"])).collect()
}

/// Greedy tokens and step logits for each prompt alone, then the same
/// sessions decoded as one batch.
#[allow(clippy::needless_range_loop)] // `k` indexes every sequence's trace
fn check(m: &Model, dir: &Path, prompts: &[Vec<u32>], steps: usize) {
    let backend = Cpu;
    let mut alone = vec![];
    for p in prompts {
        let mut s = Session::new(m, &backend);
        s.set_image_dir(dir);
        let mut logits = s.prefill(p, &PrefillOptions::default()).unwrap().logits;
        let mut trace = vec![];
        for _ in 0..steps {
            let t = argmax(&logits) as u32;
            logits = s.step(t).unwrap();
            trace.push((t, logits.clone()));
        }
        alone.push(trace);
    }
    let mut sessions: Vec<Session> = prompts.iter().map(|_| Session::new(m, &backend)).collect();
    let mut last = vec![];
    for (s, p) in sessions.iter_mut().zip(prompts) {
        s.set_image_dir(dir);
        last.push(s.prefill(p, &PrefillOptions::default()).unwrap().logits);
    }
    for k in 0..steps {
        let ids: Vec<u32> = last.iter().map(|l| argmax(l) as u32).collect();
        for (b, &t) in ids.iter().enumerate() {
            assert_eq!(t, alone[b][k].0, "sequence {b}, step {k}: greedy token differs");
        }
        let mut refs: Vec<&mut Session> = sessions.iter_mut().collect();
        last = step_batch(&mut refs, &ids).unwrap();
        for (b, l) in last.iter().enumerate() {
            assert!(bits(l) == bits(&alone[b][k].1), "sequence {b}, step {k}: batched logits differ from alone");
        }
    }
    for (s, p) in sessions.iter().zip(prompts) {
        assert_eq!(s.cached_tokens(), p.len() + steps);
    }
}

#[test]
fn batched_decode_matches_one_at_a_time() {
    let Some(dir) = fixtures() else { return };
    let e = Expected::load(&dir);
    let prompts = prompts(&e);
    let plain = Model::load(&dir, &LoadOptions::default()).unwrap();
    check(&plain, &dir, &prompts, 4);

    let out = std::env::temp_dir().join(format!("qvc-batch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let opt = CompileOptions { max_seq: 512, max_batch: 3, force: true, ..Default::default() };
    compile(&SourceSpec::Checkpoint(dir.clone()), Some(&out), &opt, &indicatif::ProgressBar::hidden()).unwrap();
    let compiled = Model::load(&out, &LoadOptions::default()).unwrap();
    check(&compiled, &dir, &prompts, 4);
    // Two of the three: the b2 programs.
    check(&compiled, &dir, &prompts[..2], 2);
    // More sequences than --max-batch: a clear error.
    let backend = Cpu;
    let mut four: Vec<Session> = (0..4).map(|_| Session::new(&compiled, &backend)).collect();
    for s in four.iter_mut() {
        s.prefill(&prompts[0], &PrefillOptions::default()).unwrap();
    }
    let mut refs: Vec<&mut Session> = four.iter_mut().collect();
    let err = step_batch(&mut refs, &[1, 2, 3, 4]).unwrap_err();
    assert!(err.to_string().contains("--max-batch"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}

/// The largest invariant batch: that many conversations of different lengths
/// (so each cache is padded to the longest), in a scrambled order, each get
/// bit for bit the logits of decoding it alone, step after step.
#[test]
fn a_full_invariant_batch_is_bit_identical_to_one_at_a_time() {
    let Some(dir) = fixtures() else { return };
    let e = Expected::load(&dir);
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let text = e.ids(&e.json["chat"]["text"]["input_ids"]);
    let n = DECODE_BATCH_INVARIANT_MAX;
    assert!(n >= 2, "a batch of {n} is no batch");
    // Prompts of n different lengths (half the text up to all of it), in
    // the batch in a scrambled order.
    let prompts: Vec<Vec<u32>> = (0..n).map(|b| text[..text.len() * (n + b + 1) / (2 * n)].to_vec()).collect();
    let mut order: Vec<usize> = (0..n).rev().collect();
    order.rotate_left(n / 2);
    let steps = 3;
    let feed = |k: usize, b: usize| 300 + 17 * k as u32 + 101 * b as u32;
    let backend = Cpu;
    let mut alone = vec![];
    for p in &prompts {
        let mut s = Session::new(&m, &backend);
        s.prefill(p, &PrefillOptions::default()).unwrap();
        let b = alone.len();
        alone.push((0..steps).map(|k| s.step(feed(k, b)).unwrap()).collect::<Vec<_>>());
    }
    let mut sessions: Vec<Session> = order.iter().map(|_| Session::new(&m, &backend)).collect();
    for (s, &b) in sessions.iter_mut().zip(&order) {
        s.prefill(&prompts[b], &PrefillOptions::default()).unwrap();
    }
    // `k` is the step: it picks each row's input and, per sequence, the logits of that step alone.
    #[allow(clippy::needless_range_loop)]
    for k in 0..steps {
        let ids: Vec<u32> = order.iter().map(|&b| feed(k, b)).collect();
        let mut refs: Vec<&mut Session> = sessions.iter_mut().collect();
        let got = step_batch(&mut refs, &ids).unwrap();
        for (p, (g, &b)) in got.iter().zip(&order).enumerate() {
            assert!(
                bits(g) == bits(&alone[b][k]),
                "step {k}: sequence {b} ({} cached tokens) at position {p} of {n} differs from alone",
                prompts[b].len() + k
            );
        }
    }
}

/// In exact math, where bf16 decode runs on AMX tiles (A split in three),
/// one batched decode step holds 16 sequences and each is still, bit for
/// bit, what it decodes alone; elsewhere the group is
/// `DECODE_BATCH_INVARIANT_MAX` and the same holds for it.
/// (`set_batched_decode`: this process decodes batches, as `qvc serve` does;
/// the other tests here hold either way.)
#[test]
fn exact_decode_group_is_batch_invariant() {
    qvc_kernels::gemm::set_batched_decode(true);
    common::group::decode_group_is_batch_invariant("exact", qvc_kernels::gemm::exact_decode_on_tiles);
}
