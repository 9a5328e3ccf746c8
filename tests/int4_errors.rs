//! Broken GPTQ int4 checkpoints get errors that name the tensor or setting,
//! through `Model::load` and through `qvc generate` (no panic), and an
//! act-order (`desc_act`) checkpoint runs with the same logits as the
//! checkpoint it was made from, loaded and compiled.
//!
//! Each checkpoint is built in a temporary directory from
//! `../shared/fixtures/tiny-qwen-vl-int4`: the tokenizer and generation
//! config are symlinked, config.json and model.safetensors are written
//! modified.

mod common;
use common::{fixture, rel_err, Expected};
use qvc::compile::{compile, CompileOptions, SourceSpec};
use qvc_model::{LoadOptions, Model, PrefillOptions, Session};
use qvc_runtime::Cpu;
use safetensors::{tensor::TensorView, Dtype};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Tensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

type Tensors = BTreeMap<String, Tensor>;

fn read_tensors(dir: &Path) -> Tensors {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, Tensor { dtype: v.dtype(), shape: v.shape().to_vec(), data: v.data().to_vec() }))
        .collect()
}

fn read_config(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

/// A checkpoint directory `name` holding `tensors` and `config` (the other
/// files are the fixture's, symlinked; no quantize_config.json, so
/// config.json's quantization_config is the only one).
fn write_checkpoint(src: &Path, name: &str, tensors: &Tensors, config: &Value) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qvc-int4-errors-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["generation_config.json", "qwen.tiktoken"] {
        std::os::unix::fs::symlink(src.join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(config).unwrap()).unwrap();
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, t)| (n.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    dir
}

fn i32s(t: &Tensor) -> Vec<i32> {
    t.data.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn set_i32s(t: &mut Tensor, v: &[i32]) {
    t.data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
}

/// `Model::load` fails with a message holding every one of `want`, and
/// `qvc generate` on the same directory exits with an error saying the same,
/// without a panic.
fn assert_refused(dir: &Path, want: &[&str]) {
    let msg = match Model::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded, expected an error naming {want:?}", dir.display()),
        Err(e) => e.to_string(),
    };
    for w in want {
        assert!(msg.contains(w), "Model::load error does not name {w:?}: {msg}");
    }
    let o = Command::new(env!("CARGO_BIN_EXE_qvc"))
        .args(["generate", "--device", "cpu", "--max-new-tokens", "1", "-p", "hi", "-m"])
        .arg(dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "qvc generate succeeded on {}", dir.display());
    assert_eq!(o.status.code(), Some(1), "qvc generate should exit with an error, not a signal/panic: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for w in want {
        assert!(err.contains(w), "qvc generate's error does not name {w:?}: {err}");
    }
    eprintln!("refused as expected: {msg}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn broken_tensors_are_named() {
    let Some(src) = fixture("tiny-qwen-vl-int4") else { return };
    let config = read_config(&src);

    // qweight with one packed row (8 inputs) too few.
    let mut t = read_tensors(&src);
    let q = t.get_mut("transformer.h.0.mlp.w1.qweight").unwrap();
    assert_eq!(q.shape, [128 / 8, 344]);
    q.shape = vec![15, 344];
    q.data.truncate(15 * 344 * 4);
    let dir = write_checkpoint(&src, "qweight-shape", &t, &config);
    assert_refused(&dir, &["transformer.h.0.mlp.w1.qweight", "shape [15, 344]", "expected [16, 344]"]);

    // g_idx pointing past the last group.
    let mut t = read_tensors(&src);
    let g = t.get_mut("transformer.h.1.attn.c_proj.g_idx").unwrap();
    let mut v = i32s(g);
    v[7] = 99;
    set_i32s(g, &v);
    let dir = write_checkpoint(&src, "g-idx-range", &t, &config);
    assert_refused(&dir, &["transformer.h.1.attn.c_proj.g_idx[7] = 99", "out of range"]);

    // A negative group is out of range too (i32 in the file, not u32).
    let mut t = read_tensors(&src);
    let g = t.get_mut("transformer.h.0.mlp.c_proj.g_idx").unwrap();
    let mut v = i32s(g);
    v[0] = -1;
    set_i32s(g, &v);
    let dir = write_checkpoint(&src, "g-idx-negative", &t, &config);
    assert_refused(&dir, &["transformer.h.0.mlp.c_proj.g_idx[0] = -1", "out of range"]);

    // A Linear without its scales.
    let mut t = read_tensors(&src);
    assert!(t.remove("transformer.h.0.attn.c_attn.scales").is_some());
    let dir = write_checkpoint(&src, "no-scales", &t, &config);
    assert_refused(&dir, &["transformer.h.0.attn.c_attn.scales", "incomplete"]);

    // Scales in f32 are not GPTQ v1.
    let mut t = read_tensors(&src);
    let s = t.get_mut("transformer.h.1.mlp.w2.scales").unwrap();
    let wide: Vec<u8> =
        s.data.chunks_exact(2).flat_map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32().to_le_bytes()).collect();
    (s.dtype, s.data) = (Dtype::F32, wide);
    let dir = write_checkpoint(&src, "scales-f32", &t, &config);
    assert_refused(&dir, &["transformer.h.1.mlp.w2.scales", "expected f16"]);
}

#[test]
fn unsupported_quantization_configs_are_named() {
    let Some(src) = fixture("tiny-qwen-vl-int4") else { return };
    let tensors = read_tensors(&src);
    let cases: [(&str, &str, Value, &[&str]); 4] = [
        ("bits-8", "bits", Value::from(8), &["bits 8", "4-bit"]),
        ("awq", "quant_method", Value::from("awq"), &["quant_method \"awq\"", "not supported"]),
        ("gptq-v2", "checkpoint_format", Value::from("gptq_v2"), &["checkpoint_format \"gptq_v2\"", "not supported"]),
        ("group-128", "group_size", Value::from(128), &["group_size 128", "groups of 64"]),
    ];
    for (name, key, value, want) in cases {
        let mut config = read_config(&src);
        config["quantization_config"][key] = value;
        let dir = write_checkpoint(&src, name, &tensors, &config);
        assert_refused(&dir, want);
    }
}

/// A deterministic shuffle of 0..n (xorshift64, Fisher–Yates).
fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut s = seed;
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        p.swap(i, (s % (i as u64 + 1)) as usize);
    }
    p
}

fn nibble(words: &[i32], ld: usize, r: usize, o: usize) -> u32 {
    (words[r / 8 * ld + o] as u32 >> (4 * (r % 8))) & 15
}

/// Pack `nib(r, c)` for `rows × cols` into words `[rows / 8, cols]`
/// (`along_rows`) or `[rows, cols / 8]`.
fn pack(rows: usize, cols: usize, along_rows: bool, nib: impl Fn(usize, usize) -> u32) -> Vec<i32> {
    let (wr, wc) = if along_rows { (rows / 8, cols) } else { (rows, cols / 8) };
    let mut w = vec![0u32; wr * wc];
    for r in 0..rows {
        for c in 0..cols {
            let (i, shift) = if along_rows { (r / 8 * wc + c, r % 8) } else { (r * wc + c / 8, c % 8) };
            w[i] |= nib(r, c) << (4 * shift);
        }
    }
    w.into_iter().map(|x| x as i32).collect()
}

/// The fixture with decoder layer `layer`'s MLP features reordered by a
/// random permutation `pi` (new feature j is old feature pi[j]): the output
/// columns of `w1` and `w2` (qweight, scales, qzeros, bias) and the input
/// rows of `c_proj` (qweight), whose `g_idx` becomes the group of each row's
/// original position. The model computes the same function, and `c_proj`
/// is now an act-order Linear (g_idx not i / G, a ragged last group).
/// Returns the tensors and `pi`.
fn act_order_tensors(src: &Path, layer: usize, seed: u64) -> (Tensors, Vec<usize>) {
    let mut t = read_tensors(src);
    let p = format!("transformer.h.{layer}.mlp");
    let width = t[&format!("{p}.c_proj.g_idx")].shape[0];
    let pi = permutation(width, seed);
    for lin in ["w1", "w2"] {
        let qw = &t[&format!("{p}.{lin}.qweight")];
        let (rows8, out) = (qw.shape[0], qw.shape[1]);
        assert_eq!(out, width);
        let v = i32s(qw);
        let new: Vec<i32> =
            (0..rows8).flat_map(|r| pi.iter().map(move |&o| (r, o))).map(|(r, o)| v[r * out + o]).collect();
        set_i32s(t.get_mut(&format!("{p}.{lin}.qweight")).unwrap(), &new);
        let z = &t[&format!("{p}.{lin}.qzeros")];
        let groups = z.shape[0];
        let zv = i32s(z);
        // qzeros [groups, out / 8]: output o of group g at bits 4 (o % 8).
        let new = pack(groups, out, false, |g, j| (zv[g * (out / 8) + pi[j] / 8] as u32 >> (4 * (pi[j] % 8))) & 15);
        set_i32s(t.get_mut(&format!("{p}.{lin}.qzeros")).unwrap(), &new);
        for (part, size) in [("scales", 2usize), ("bias", 2)] {
            let x = t.get_mut(&format!("{p}.{lin}.{part}")).unwrap();
            assert_eq!(x.dtype, Dtype::F16);
            let rows = x.data.len() / (out * size);
            let old = x.data.clone();
            x.data = (0..rows)
                .flat_map(|r| pi.iter().map(move |&o| (r, o)))
                .flat_map(|(r, o)| old[(r * out + o) * size..(r * out + o + 1) * size].to_vec())
                .collect();
        }
    }
    let cq = &t[&format!("{p}.c_proj.qweight")];
    let out = cq.shape[1];
    let v = i32s(cq);
    let new = pack(width, out, true, |j, o| nibble(&v, out, pi[j], o));
    set_i32s(t.get_mut(&format!("{p}.c_proj.qweight")).unwrap(), &new);
    let g = t.get_mut(&format!("{p}.c_proj.g_idx")).unwrap();
    let old = i32s(g);
    assert!(old.iter().enumerate().all(|(i, &x)| x as usize == i / 64), "the fixture is not act-order");
    let new: Vec<i32> = pi.iter().map(|&i| old[i]).collect();
    set_i32s(g, &new);
    (t, pi)
}

/// Logits of the fixture's `chat/text` prompt and `steps` greedy tokens.
fn run_text(m: &Model, e: &Expected, steps: usize) -> (Vec<f32>, Vec<u32>) {
    let ids = e.ids(&e.json["chat"]["text"]["input_ids"]);
    let backend = Cpu;
    let mut s = Session::new(m, &backend);
    let first = s.prefill(&ids, &PrefillOptions::default()).unwrap().logits;
    let (mut logits, mut toks) = (first.clone(), vec![]);
    for _ in 0..steps {
        let t = qvc_model::sampling::argmax(&logits) as u32;
        toks.push(t);
        logits = s.step(t).unwrap();
    }
    (first, toks)
}

#[test]
fn act_order_checkpoint_matches_the_original_loaded_and_compiled() {
    let Some(src) = fixture("tiny-qwen-vl-int4") else { return };
    let e = Expected::load(&src);
    let mut config = read_config(&src);
    config["quantization_config"]["desc_act"] = Value::Bool(true);
    let (t, pi) = act_order_tensors(&src, 0, 0x9e37_79b9_7f4a_7c15);
    let dir = write_checkpoint(&src, "act-order", &t, &config);

    let plain = Model::load(&src, &LoadOptions::default()).unwrap();
    let act = Model::load(&dir, &LoadOptions::default()).expect("an act-order checkpoint loads");
    let name = "transformer.h.0.mlp.c_proj.weight";
    let q = act.weights.q4(name).unwrap();
    assert!(q.perm.is_some(), "{name}: act-order resolved into a permutation");
    assert!(plain.weights.q4(name).unwrap().perm.is_none());
    // The resolved weight is the original with its inputs reordered by pi,
    // element for element.
    let w0 = plain.weights.q4(name).unwrap();
    for o in 0..q.rows {
        for (j, &i) in pi.iter().enumerate() {
            assert_eq!(q.get(o, j).to_bits(), w0.get(o, i).to_bits(), "{name}[{o}, {j}]");
        }
    }

    let (a0, at) = run_text(&plain, &e, 4);
    let (b0, bt) = run_text(&act, &e, 4);
    let r = rel_err(&b0, &a0);
    eprintln!("act-order checkpoint: logits rel err {r:.2e} against the original, tokens {bt:?}");
    assert!(r < 1e-6, "act-order checkpoint: logits differ by {r:e}");
    assert_eq!(bt, at, "act-order checkpoint: greedy tokens differ");

    // Compiled: the artifact stores the sorted rows and the permutation,
    // and computes the same.
    let out = std::env::temp_dir().join(format!("qvc-int4-errors-{}-act-order.qvc", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let opt = CompileOptions { max_seq: 128, force: true, ..Default::default() };
    compile(&SourceSpec::Checkpoint(dir.clone()), Some(&out), &opt, &indicatif::ProgressBar::hidden()).unwrap();
    let bytes = std::fs::read(out.join("weights.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let perm = st.tensor("transformer.h.0.mlp.c_proj.q4_perm").expect("act-order weight stores its permutation");
    assert_eq!((perm.dtype(), perm.shape()), (Dtype::I32, &[q.cols][..]));
    let g = st.tensor("transformer.h.0.mlp.c_proj.g_idx").unwrap();
    let g: Vec<i32> = g.data().chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    assert!(g.iter().enumerate().all(|(r, &x)| x as usize == r / 64), "stored rows sorted by group");
    assert!(st.tensor("transformer.h.0.mlp.w1.q4_perm").is_err(), "no permutation without act-order");
    drop(bytes);
    let compiled = Model::load(&out, &LoadOptions::default()).unwrap();
    let cq = compiled.weights.q4(name).unwrap();
    assert_eq!(cq.perm, q.perm, "the artifact maps the same permutation");
    let (c0, ct) = run_text(&compiled, &e, 4);
    let r = rel_err(&c0, &a0);
    eprintln!("act-order artifact: logits rel err {r:.2e} against the original, tokens {ct:?}");
    assert!(r < 1e-6, "act-order artifact: logits differ by {r:e}");
    assert_eq!(ct, at, "act-order artifact: greedy tokens differ");
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&dir);
}
