//! The GPU code path end to end, without a GPU: the fixture compiled for
//! sm_80, run by the GPU executor on the PTX emulator (every kernel launch
//! is the PTX a GPU would run; the KV cache lives in emulated device memory),
//! against the reference's logits (bf16 tolerance, 2e-2 relative: weights
//! and the tensor-core operands are bf16 on the GPU) and against the CPU
//! backend on the same artifact.

mod common;
use common::{fixtures, rel_err, Expected};
use qvc::compile::{compile, CompileOptions, SourceSpec, Target};
use qvc_model::sampling::argmax;
use qvc_model::{LoadOptions, Model, PrefillOptions, Session};
use qvc_runtime::gpu::{EmuDevice, GpuBackend};
use qvc_runtime::{Backend, Cpu};
use std::path::{Path, PathBuf};

/// bf16 weights and tensor-core operands against an f32 reference.
const TOL: f64 = 2e-2;

fn artifact(dir: &Path, name: &str, image_size: Option<usize>) -> PathBuf {
    artifact_with(dir, name, image_size, 1)
}

fn artifact_with(dir: &Path, name: &str, image_size: Option<usize>, max_batch: usize) -> PathBuf {
    let out = std::env::temp_dir().join(format!("qvc-gpu-emu-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let opt = CompileOptions {
        target: Target::Gpu(qvc_codegen::Target::Sm80),
        max_seq: 320,
        max_batch,
        image_size,
        force: true,
        ..Default::default()
    };
    compile(&SourceSpec::Checkpoint(dir.to_path_buf()), Some(&out), &opt, &indicatif::ProgressBar::hidden()).unwrap();
    out
}

fn emu(m: &Model) -> GpuBackend {
    m.gpu_backend(Box::new(EmuDevice::new(qvc_codegen::Target::Sm80)), 1, 0).unwrap()
}

/// Prefill logits, the greedy tokens and each step's logits, feeding `forced`
/// tokens when given (so two backends walk the same path).
fn run(
    m: &Model,
    b: &dyn Backend,
    dir: &Path,
    ids: &[u32],
    steps: usize,
    forced: Option<&[u32]>,
) -> (Vec<f32>, Vec<u32>, Vec<Vec<f32>>) {
    let mut s = Session::new(m, b);
    s.set_image_dir(dir);
    let first = s.prefill(ids, &PrefillOptions::default()).unwrap().logits;
    let (mut logits, mut toks, mut all) = (first.clone(), vec![], vec![]);
    for k in 0..steps {
        let t = forced.map_or_else(|| argmax(&logits) as u32, |f| f[k]);
        toks.push(t);
        logits = s.step(t).unwrap();
        all.push(logits.clone());
    }
    (first, toks, all)
}

#[test]
fn text_chat_on_the_emulated_gpu_matches_the_reference() {
    let Some(dir) = fixtures() else { return };
    let out = artifact(&dir, "text", None);
    let m = Model::load(&out, &LoadOptions::default()).unwrap();
    let e = Expected::load(&dir);
    let ids = e.ids(&e.json["chat"]["text"]["input_ids"]);
    let want = e.f32("chat/text/all_logits");
    let v = m.config.vocab_size;
    let last = &want[want.len() - v..];
    let gpu = emu(&m);
    let (g0, gt, gl) = run(&m, &gpu, &dir, &ids, 3, None);
    let r = rel_err(&g0, last);
    eprintln!("text: {} tokens, emu prefill logits vs reference: rel err {r:.2e}", ids.len());
    assert!(r < TOL, "emulated GPU prefill logits differ from the reference by {r:e}");
    // The CPU backend on the same artifact, fed the same tokens.
    let (c0, _, cl) = run(&m, &Cpu, &dir, &ids, 3, Some(&gt));
    let r = rel_err(&g0, &c0);
    assert!(r < TOL, "emu vs CPU prefill logits: {r:e}");
    for (k, (x, y)) in gl.iter().zip(&cl).enumerate() {
        let r = rel_err(x, y);
        eprintln!("text: decode step {k} emu vs cpu rel err {r:.2e}");
        assert!(r < TOL, "decode step {k}: emu vs CPU logits differ by {r:e}");
    }
    let st = gpu.stats();
    eprintln!("emu: {st:?}");
    assert_eq!(st.host_nodes, 0, "every node of the decoder should run as a kernel");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn image_chat_on_the_emulated_gpu_matches_the_cpu_backend() {
    let Some(dir) = fixtures() else { return };
    // 224 px (256 patches) keeps the emulated ViT quick; the path is the same.
    let out = artifact(&dir, "img", Some(224));
    let m = Model::load(&out, &LoadOptions::default()).unwrap();
    let e = Expected::load(&dir);
    let ids = e.ids(&e.json["chat"]["img1"]["input_ids"]);
    let gpu = emu(&m);
    let (g0, gt, gl) = run(&m, &gpu, &dir, &ids, 2, None);
    let (c0, _, cl) = run(&m, &Cpu, &dir, &ids, 2, Some(&gt));
    let r = rel_err(&g0, &c0);
    eprintln!("img1 at 224 px: {} tokens, emu vs cpu prefill logits rel err {r:.2e}", ids.len());
    assert!(r < TOL, "emu vs CPU prefill logits with an image: {r:e}");
    for (k, (x, y)) in gl.iter().zip(&cl).enumerate() {
        let r = rel_err(x, y);
        assert!(r < TOL, "decode step {k}: emu vs CPU logits differ by {r:e}");
    }
    let st = gpu.stats();
    eprintln!("emu: {st:?}");
    assert_eq!(st.host_nodes, 0, "every node of vision and decoder should run as a kernel");
    let _ = std::fs::remove_dir_all(&out);
}

/// Three conversations of different lengths decoded together on the
/// emulated GPU (one batched program per step: each sequence in its own
/// slot of the device cache, appended at its own row) give each one's CPU
/// logits; the decode steps are captured as a device graph after their
/// first run and replayed, with the same results as running them directly.
#[test]
fn batched_decode_and_graph_replay_on_the_emulated_gpu() {
    let Some(dir) = fixtures() else { return };
    let out = artifact_with(&dir, "batch", None, 3);
    let m = Model::load(&out, &LoadOptions::default()).unwrap();
    let e = Expected::load(&dir);
    let text = e.ids(&e.json["chat"]["text"]["input_ids"]);
    let prompts = [text.clone(), text[..20].to_vec(), text[5..].to_vec()];
    let steps = 3;
    let feed = |k: usize, b: usize| 100 + 37 * k as u32 + 1000 * b as u32;
    // CPU: one conversation at a time.
    let mut want = vec![];
    for (b, p) in prompts.iter().enumerate() {
        let forced: Vec<u32> = (0..steps).map(|k| feed(k, b)).collect();
        want.push(run(&m, &Cpu, &dir, p, steps, Some(&forced)).2);
    }
    let dev = EmuDevice::with_graphs(qvc_codegen::Target::Sm80);
    let gpu = m.gpu_backend(Box::new(dev), 3, 0).unwrap();
    let mut sessions: Vec<Session> = (0..3)
        .map(|b| {
            let mut s = Session::new(&m, &gpu);
            s.set_kv_slot(b);
            s
        })
        .collect();
    for (s, p) in sessions.iter_mut().zip(&prompts) {
        s.prefill(p, &PrefillOptions::default()).unwrap();
    }
    for k in 0..steps {
        let ids: Vec<u32> = (0..3).map(|b| feed(k, b)).collect();
        let mut batch: Vec<&mut Session> = sessions.iter_mut().collect();
        let got = qvc_model::step_batch(&mut batch, &ids).unwrap();
        for (b, (g, w)) in got.iter().zip(&want).enumerate() {
            let r = rel_err(g, &w[k]);
            eprintln!("batched step {k}, sequence {b}: emu vs cpu rel err {r:.2e}");
            assert!(r < TOL, "batched step {k}, sequence {b}: {r:e}");
        }
    }
    let st = gpu.stats();
    eprintln!("emu: {st:?}");
    assert!(st.captures >= 1 && st.replays >= 1, "decode steps should be captured and replayed: {st:?}");
    // Sessions that share a slot are refused, not silently mixed.
    let mut two: Vec<Session> = (0..2).map(|_| Session::new(&m, &gpu)).collect();
    for s in two.iter_mut() {
        s.prefill(&prompts[1], &PrefillOptions::default()).unwrap();
    }
    let mut two: Vec<&mut Session> = two.iter_mut().collect();
    assert!(qvc_model::step_batch(&mut two, &[1, 2]).is_err());
    let _ = std::fs::remove_dir_all(&out);
}

/// A decode step runs over any set of KV slots in any order: three
/// conversations in slots 5, 0 and 3 of a six-slot device cache (not
/// consecutive, not sorted), batched in a different order at every step,
/// get bit for bit the logits each gets decoded alone in its slot on the
/// same emulated GPU (a batched step computes each row as a one-sequence
/// step does, so greedy answers do not depend on what else runs). The slots
/// are device data: the decode step recorded as a graph in one slot order
/// replays correctly for the others.
#[test]
#[allow(clippy::needless_range_loop)] // step k of every conversation
fn batched_decode_over_any_slots_in_any_order_on_the_emulated_gpu() {
    let Some(dir) = fixtures() else { return };
    let out = artifact_with(&dir, "slots", None, 3);
    let m = Model::load(&out, &LoadOptions::default()).unwrap();
    let e = Expected::load(&dir);
    let text = e.ids(&e.json["chat"]["text"]["input_ids"]);
    let prompts = [text[3..].to_vec(), text[..20].to_vec(), text.clone()];
    let slots = [5usize, 0, 3];
    let steps = 4;
    let feed = |k: usize, b: usize| 200 + 31 * k as u32 + 1000 * b as u32;
    let gpu = m.gpu_backend(Box::new(EmuDevice::with_graphs(qvc_codegen::Target::Sm80)), 6, 0).unwrap();
    let start = |b: usize| {
        let mut s = Session::new(&m, &gpu);
        s.set_kv_slot(slots[b]);
        s.prefill(&prompts[b], &PrefillOptions::default()).unwrap();
        s
    };
    // Each conversation alone, in its slot.
    let mut alone = vec![];
    for b in 0..3 {
        let mut s = start(b);
        alone.push((0..steps).map(|k| s.step(feed(k, b)).unwrap()).collect::<Vec<_>>());
    }
    let before = gpu.stats();
    // Together: position p of the batch holds conversation `order[p]`.
    let mut sessions: Vec<Session> = (0..3).map(start).collect();
    let mut order = vec![0usize, 1, 2];
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for k in 0..steps {
        // Slots [5, 0, 3], then [0, 3, 5], [3, 5, 0], [5, 0, 3].
        order.rotate_left(usize::from(k > 0));
        let ids: Vec<u32> = order.iter().map(|&b| feed(k, b)).collect();
        let mut by_conv: Vec<Option<&mut Session>> = sessions.iter_mut().map(Some).collect();
        let mut batch: Vec<&mut Session> = order.iter().map(|&b| by_conv[b].take().unwrap()).collect();
        let got = qvc_model::step_batch(&mut batch, &ids).unwrap();
        for (p, (g, &b)) in got.iter().zip(&order).enumerate() {
            let r = rel_err(g, &alone[b][k]);
            eprintln!("step {k}, position {p}, slot {}: batched vs alone rel err {r:.2e}", slots[b]);
            assert!(
                bits(g) == bits(&alone[b][k]),
                "step {k}: conversation {b} in slot {} at position {p} differs from alone ({r:e})",
                slots[b]
            );
        }
    }
    for (s, p) in sessions.iter().zip(&prompts) {
        assert_eq!(s.cached_tokens(), p.len() + steps);
    }
    let st = gpu.stats();
    eprintln!("emu: {st:?}");
    assert!(st.captures > before.captures, "the batched step is recorded: {st:?}");
    assert!(st.replays >= before.replays + 2, "batched steps in new slot orders replay the recording: {st:?}");
    let _ = std::fs::remove_dir_all(&out);
}

/// Device sampling: `generate` on a GPU backend gets token ids back from
/// the device (argmax, or top-p) instead of logits. Greedy picks exactly
/// the token the host's argmax picks from the same device's logits, and
/// top-p with top_k = 1 is greedy whatever the draw.
#[test]
fn device_sampling_picks_the_host_token() {
    use qvc_model::sampling::SamplingParams;
    use qvc_model::{generate, GenerateOptions};
    let Some(dir) = fixtures() else { return };
    let out = artifact(&dir, "sample", None);
    let m = Model::load(&out, &LoadOptions::default()).unwrap();
    let e = Expected::load(&dir);
    let ids = e.ids(&e.json["chat"]["text"]["input_ids"]);
    let n = 3;
    let gpu = emu(&m);
    // Host argmax over the emulated GPU's logits.
    let (_, host, _) = run(&m, &gpu, &dir, &ids, n, None);
    let gen = |p: SamplingParams, n: usize| {
        let mut s = Session::new(&m, &gpu);
        let opt = GenerateOptions { max_new_tokens: n, sampling: p, stop_ids: vec![] };
        generate(&mut s, &ids, &opt, &mut |_| {}).unwrap().tokens
    };
    let before = gpu.stats().runs;
    let greedy = gen(SamplingParams::greedy(), n);
    assert_eq!(greedy, host[..n], "device argmax vs host argmax");
    // The top-p kernel walks the whole vocabulary 16 times: one emulated
    // step is enough here (kernels/tests/gpu_decode.rs covers its sampling).
    let top1 = gen(SamplingParams { temperature: 0.7, top_p: 0.9, top_k: 1, repetition_penalty: 1.0, seed: 3 }, 2);
    assert_eq!(top1, host[..2], "top-p with top_k 1 must be greedy");
    eprintln!("greedy {greedy:?}; runs {}", gpu.stats().runs - before);
    let _ = std::fs::remove_dir_all(&out);
}

/// A checkpoint (not compiled) runs on the GPU path too: graphs are built
/// and fused per call, weights read in place (the fused `in_proj` sliced
/// into q, k, v, the conv kernel zero-padded for the GEMM). The image chat
/// prompt at the full 448 px against the reference's logits.
#[test]
fn checkpoint_with_an_image_on_the_emulated_gpu_matches_the_reference() {
    let Some(dir) = fixtures() else { return };
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let e = Expected::load(&dir);
    let ids = e.ids(&e.json["chat"]["img1"]["input_ids"]);
    let gpu = m.gpu_backend(Box::new(EmuDevice::new(qvc_codegen::Target::Sm90)), 1, 512).unwrap();
    let (g0, _, _) = run(&m, &gpu, &dir, &ids, 0, None);
    let r = rel_err(&g0, &e.f32("chat/img1/last_logits"));
    eprintln!("img1 at 448 px from the checkpoint: emu vs reference rel err {r:.2e}; {:?}", gpu.stats());
    assert!(r < TOL, "emulated GPU logits differ from the reference by {r:e}");
    assert_eq!(gpu.stats().host_nodes, 0);
}

/// Window attention in the ViT (the high-resolution option) on the GPU
/// path: ragged windows (a 20×20 grid in windows of 8) and global blocks,
/// features against the CPU backend on the same artifact.
#[test]
fn window_attention_vision_on_the_emulated_gpu_matches_the_cpu_backend() {
    let Some(dir) = fixtures() else { return };
    let out = std::env::temp_dir().join(format!("qvc-gpu-emu-window-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let opt = CompileOptions {
        target: Target::Gpu(qvc_codegen::Target::Sm80),
        max_seq: 320,
        image_size: Some(280),
        vit_attention: "window:8,global-every:2".into(),
        force: true,
        ..Default::default()
    };
    compile(&SourceSpec::Checkpoint(dir.clone()), Some(&out), &opt, &indicatif::ProgressBar::hidden()).unwrap();
    let m = Model::load(&out, &LoadOptions::default()).unwrap();
    let gpu = emu(&m);
    let pic = dir.join("shapes.png");
    let pic = pic.to_str().unwrap();
    let g = Session::new(&m, &gpu).encode_image(pic).unwrap();
    let c = Session::new(&m, &Cpu).encode_image(pic).unwrap();
    let r = rel_err(&g, &c);
    eprintln!("vision 280 px, window 8: emu vs cpu features rel err {r:.2e}");
    assert!(r < TOL, "window-attention features differ: {r:e}");
    let _ = std::fs::remove_dir_all(&out);
}

/// An artifact compiled for sm_90 on an sm_80 device: its PTX cannot run
/// there, so the kernels are generated again for the device's target (and
/// the results are the same).
#[test]
fn an_sm90_artifact_on_an_sm80_device_regenerates_its_kernels() {
    let Some(dir) = fixtures() else { return };
    let out = std::env::temp_dir().join(format!("qvc-gpu-emu-sm90-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let opt = CompileOptions {
        target: Target::Gpu(qvc_codegen::Target::Sm90),
        max_seq: 64,
        force: true,
        ..Default::default()
    };
    compile(&SourceSpec::Checkpoint(dir.clone()), Some(&out), &opt, &indicatif::ProgressBar::hidden()).unwrap();
    let m = Model::load(&out, &LoadOptions::default()).unwrap();
    let gpu = m.gpu_backend(Box::new(EmuDevice::new(qvc_codegen::Target::Sm80)), 1, 0).unwrap();
    let ids: Vec<u32> = vec![151644, 872, 198, 9707, 151645, 198];
    let (g, _, _) = run(&m, &gpu, &dir, &ids, 0, None);
    let (c, _, _) = run(&m, &Cpu, &dir, &ids, 0, None);
    let r = rel_err(&g, &c);
    assert!(r < TOL, "emu vs cpu: {r:e}");
    assert!(gpu.stats().kernels_loaded > 0, "{:?}", gpu.stats());
    let _ = std::fs::remove_dir_all(&out);
}

/// A prompt prefilled in chunks on the GPU path (each chunk's new K/V rows
/// appended to the sequence's device cache slot, its queries attending to
/// the slot's cached rows in place): the fixture's picture prompt in chunks
/// of 64 (the picture's 256 rows straddle four boundaries) gives the last
/// logits of one whole prefill (bf16 tolerance) and of the reference, the
/// same greedy tokens, and keeping a chunk-aligned prefix of the cache
/// (truncate + extend, the server's prefix reuse) computes bit for bit what
/// the fresh chunked prefill did. Vision runs on the CPU (the features are
/// an input of `extend`) to keep the emulator's work to the decoder.
#[test]
fn chunked_prefill_and_prefix_reuse_on_the_emulated_gpu() {
    let Some(dir) = fixtures() else { return };
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let e = Expected::load(&dir);
    let ids = e.ids(&e.json["chat"]["img1"]["input_ids"]);
    let spans = m.tokenizer.image_spans(&ids).unwrap();
    let mut cpu = Session::new(&m, &Cpu);
    cpu.set_image_dir(&dir);
    let feats: Vec<Vec<f32>> = spans.iter().map(|s| cpu.encode_image(&s.path).unwrap()).collect();
    let refs: Vec<&[f32]> = feats.iter().map(Vec::as_slice).collect();
    const CHUNK: usize = 64;
    let (a, b) = (spans[0].start, spans[0].end);
    assert!(a < CHUNK && b > 2 * CHUNK && ids.len() > b + 1, "picture span {a}..{b} of {} tokens", ids.len());

    let gpu = m.gpu_backend(Box::new(EmuDevice::new(qvc_codegen::Target::Sm80)), 2, 512).unwrap();
    let mut whole = Session::new(&m, &gpu);
    assert!(whole.can_extend(), "a checkpoint on the GPU executor extends its device cache");
    whole.set_kv_slot(0);
    let w = whole.extend(&ids, ids.len(), &refs).unwrap();
    let mut chunked = Session::new(&m, &gpu);
    chunked.set_kv_slot(1);
    let mut c = vec![];
    let mut ends = vec![];
    while chunked.cached_tokens() < ids.len() {
        let end = qvc_model::chunk_end(chunked.cached_tokens(), ids.len(), CHUNK);
        c = chunked.extend(&ids, end, &refs).unwrap();
        ends.push(end);
    }
    assert_eq!(ends.len(), ids.len().div_ceil(CHUNK));
    let r = rel_err(&c, &w);
    eprintln!("img1: {} tokens in chunks of {CHUNK}: emu chunked vs whole last logits rel err {r:.2e}", ids.len());
    assert!(r < TOL, "chunked prefill logits differ from the whole prefill by {r:e}");
    let r = rel_err(&c, &e.f32("chat/img1/last_logits"));
    assert!(r < TOL, "chunked prefill logits differ from the reference by {r:e}");
    assert_eq!(argmax(&c), argmax(&w));

    // Greedy continuations agree (each session decodes in its own slot).
    let (mut lw, mut lc) = (w.clone(), c.clone());
    for k in 0..3 {
        let (tw, tc) = (argmax(&lw) as u32, argmax(&lc) as u32);
        assert_eq!(tw, tc, "greedy token {k}");
        lw = whole.step(tw).unwrap();
        lc = chunked.step(tc).unwrap();
        let r = rel_err(&lc, &lw);
        assert!(r < TOL, "decode step {k} after a chunked prefill: {r:e}");
    }

    // Prefix reuse: the cache keeps the first two chunks (the decoded rows
    // and the later chunks go), the rest runs again in the same chunks.
    let keep = chunked.reusable_prefix(&ids, CHUNK);
    assert_eq!(keep, (ids.len() - 1) / CHUNK * CHUNK, "every prefilled chunk but the last is reusable");
    chunked.truncate(2 * CHUNK);
    while chunked.cached_tokens() < ids.len() {
        let end = qvc_model::chunk_end(chunked.cached_tokens(), ids.len(), CHUNK);
        let l = chunked.extend(&ids, end, &refs).unwrap();
        if end == ids.len() {
            assert_eq!(l, c, "logits after reusing 2 chunks differ from the fresh chunked prefill");
        }
    }
    let again = chunked.step(argmax(&c) as u32).unwrap();
    let mut fresh = Session::new(&m, &gpu);
    fresh.set_kv_slot(0);
    let mut f = vec![];
    while fresh.cached_tokens() < ids.len() {
        let end = qvc_model::chunk_end(fresh.cached_tokens(), ids.len(), CHUNK);
        f = fresh.extend(&ids, end, &refs).unwrap();
    }
    assert_eq!(f, c, "a fresh chunked prefill in another slot computes the same logits");
    assert_eq!(fresh.step(argmax(&f) as u32).unwrap(), again, "the step after the reused prefix");
    let st = gpu.stats();
    eprintln!("emu: {st:?}");
    assert_eq!(st.host_nodes, 0, "every node of the chunked decoder runs as a kernel");
}

/// Pictures on the GPU path from one prefill program per bucket: an sm_80
/// artifact whose 640-token bucket holds two pictures runs the fixture's
/// two-picture prompt against the reference, and a one-picture prompt padded
/// into the same bucket (its other 256 feature rows `NO_ROW`) against the
/// CPU backend on the same artifact.
#[test]
fn several_pictures_on_the_emulated_gpu_match_the_reference() {
    let Some(dir) = fixtures() else { return };
    let out = std::env::temp_dir().join(format!("qvc-gpu-emu-pictures-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let opt = CompileOptions {
        target: Target::Gpu(qvc_codegen::Target::Sm80),
        max_seq: 640,
        force: true,
        ..Default::default()
    };
    compile(&SourceSpec::Checkpoint(dir.clone()), Some(&out), &opt, &indicatif::ProgressBar::hidden()).unwrap();
    let m = Model::load(&out, &LoadOptions::default()).unwrap();
    let e = Expected::load(&dir);
    let ids = e.ids(&e.json["chat"]["img2"]["input_ids"]);
    let gpu = emu(&m);
    let mut s = Session::new(&m, &gpu);
    s.set_image_dir(&dir);
    let g0 = s.prefill(&ids, &PrefillOptions::default()).unwrap().logits;
    let r = rel_err(&g0, &e.f32("chat/img2/last_logits"));
    eprintln!("img2 (2 pictures, {} tokens): emu vs reference rel err {r:.2e}", ids.len());
    assert!(r < TOL, "two pictures on the emulated GPU: logits differ from the reference by {r:e}");

    // One picture (photo.jpg, already encoded by this session) in the 640 bucket.
    let (mut question, mut one) = (String::new(), vec![]);
    while one.len() <= 2 * 258 {
        question.push_str("Describe every detail of this picture. ");
        let q = qvc_model::chat::format_query(&["photo.jpg".to_string()], &question);
        one = qvc_model::chat::make_context(&m.tokenizer, qvc_model::chat::DEFAULT_SYSTEM, &[], &q, 6144).unwrap();
    }
    assert!(one.len() <= 640, "{} tokens", one.len());
    let g1 = s.prefill(&one, &PrefillOptions::default()).unwrap().logits;
    let mut c = Session::new(&m, &Cpu);
    c.set_image_dir(&dir);
    let c1 = c.prefill(&one, &PrefillOptions::default()).unwrap().logits;
    let r = rel_err(&g1, &c1);
    eprintln!("1 picture in the 2-picture bucket ({} tokens): emu vs cpu rel err {r:.2e}", one.len());
    assert!(r < TOL, "one picture padded into a two-picture program: emu vs CPU logits differ by {r:e}");
    assert_eq!(gpu.stats().host_nodes, 0);
    let _ = std::fs::remove_dir_all(&out);
}
