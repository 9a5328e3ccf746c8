//! `qvc quantize` as a user runs it, on the bf16 fixture: the output re-read
//! independently with the safetensors crate and checked against the source
//! (every int4 weight on the nearest point of its group's grid, every other
//! tensor the source rounded to f16), against the layout of the GPTQ fixture
//! `tiny-qwen-vl-int4`, and its refusals.

mod common;
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const LINEARS: [&str; 5] = ["attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"];
const PARTS: [&str; 4] = ["qweight", "qzeros", "scales", "g_idx"];

fn qvc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qvc")).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A fresh path under the temp dir (removed first).
fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qvc-quantize-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Run `qvc quantize`, asserting success.
fn quantize(src: &Path, dst: &Path, extra: &[&str]) {
    let mut args = vec!["quantize", src.to_str().unwrap(), "-o", dst.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = qvc(&args);
    assert!(o.status.success(), "qvc {args:?} failed: {}", text(&o.stderr));
    assert!(text(&o.stdout).contains("round-to-nearest"), "{}", text(&o.stdout));
}

/// Every tensor of a checkpoint directory (single file or index + shards):
/// name → (dtype, shape, bytes).
type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn read_dir_tensors(dir: &Path) -> Tensors {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.is_file() {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
        let mut f: Vec<String> =
            v["weight_map"].as_object().unwrap().values().map(|x| x.as_str().unwrap().to_string()).collect();
        f.sort();
        f.dedup();
        f.iter().map(|n| dir.join(n)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut out = Tensors::new();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str),
            Some("pt"),
            "{}: transformers needs format pt",
            f.display()
        );
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, t) in st.tensors() {
            // Every tensor aligned to its element size in the file.
            let off = t.data().as_ptr() as usize - bytes.as_ptr() as usize;
            assert_eq!(off % (t.dtype().bitsize() / 8), 0, "{name} misaligned in {}", f.display());
            assert!(out.insert(name.clone(), (t.dtype(), t.shape().to_vec(), t.data().to_vec())).is_none(), "{name}");
        }
    }
    out
}

fn f32s(dtype: Dtype, b: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        d => panic!("not a float dtype: {d:?}"),
    }
}

fn u32s(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `{p}.bias` F16 [out]: the source bias rounded to f16, or zeros where the
/// Linear has none.
fn check_bias(s: &Tensors, d: &Tensors, p: &str, out: usize) {
    let name = format!("{p}.bias");
    let (dt, shape, bias) = d.get(&name).unwrap_or_else(|| panic!("{name} missing"));
    assert_eq!((*dt, shape), (Dtype::F16, &vec![out]), "{name}");
    match s.get(&name) {
        Some((bdt, _, bb)) => {
            let want: Vec<u8> = f32s(*bdt, bb).iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect();
            assert_eq!(bias, &want, "{name}");
        }
        None => assert!(bias.iter().all(|&b| b == 0), "{name} should be zeros"),
    }
}

/// The int4 output of `src` quantized with group `g` (−1: all inputs),
/// symmetric or not, `lm_head` quantized or not, checked tensor by tensor.
fn check_output(src: &Path, dst: &Path, g: i64, sym: bool, lm_head: bool) {
    let s = read_dir_tensors(src);
    let d = read_dir_tensors(dst);
    let layers = json(&src.join("config.json"))["num_hidden_layers"].as_u64().unwrap() as usize;
    let mut prefixes: Vec<String> =
        (0..layers).flat_map(|l| LINEARS.iter().map(move |m| format!("transformer.h.{l}.{m}"))).collect();
    if lm_head {
        prefixes.push("lm_head".into());
    }
    let mut expected_names: Vec<String> = Vec::new();
    let (mut weights, mut on_edge) = (0usize, 0usize);
    for p in &prefixes {
        let (sdt, sshape, sbytes) = &s[&format!("{p}.weight")];
        let (out, inputs) = (sshape[0], sshape[1]);
        let w = f32s(*sdt, sbytes);
        let gs = if g == -1 { inputs } else { g as usize };
        let groups = inputs.div_ceil(gs);
        let get = |part: &str, dt: Dtype, shape: Vec<usize>| -> &Vec<u8> {
            let name = format!("{p}.{part}");
            let (tdt, tshape, b) = d.get(&name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!((*tdt, tshape), (dt, &shape), "{name}: dtype/shape as in the v1 table");
            b
        };
        let qweight = u32s(get("qweight", Dtype::I32, vec![inputs / 8, out]));
        let qzeros = u32s(get("qzeros", Dtype::I32, vec![groups, out / 8]));
        let scales = f32s(Dtype::F16, get("scales", Dtype::F16, vec![groups, out]));
        let g_idx = u32s(get("g_idx", Dtype::I32, vec![inputs]));
        expected_names.extend(PARTS.iter().map(|part| format!("{p}.{part}")));
        assert!(g_idx.iter().enumerate().all(|(i, &k)| k as usize == i / gs), "{p}: g_idx = i / G");
        // lm_head has a bias only where the source has one (GPTQModel); every
        // decoder Linear has one (the published checkpoint's layout).
        if p == "lm_head" && !s.contains_key("lm_head.bias") {
            assert!(!d.contains_key("lm_head.bias"), "no lm_head.bias in the source, none in the output");
        } else {
            check_bias(&s, &d, p, out);
            expected_names.push(format!("{p}.bias"));
        }
        for k in 0..groups {
            for o in 0..out {
                let z = ((qzeros[k * out / 8 + o / 8] >> (4 * (o % 8))) & 15) + 1;
                if sym {
                    assert_eq!(z, 8, "{p}: symmetric zero");
                } else {
                    assert!((1..=15).contains(&z), "{p}: zero {z}");
                }
                let sc = scales[k * out + o] as f64;
                let span = k * gs..((k + 1) * gs).min(inputs);
                let (want_scale, want_zero) = autogptq_params(&w[o * inputs..][span], sym);
                assert_eq!((sc as f32, z), (want_scale, want_zero), "{p}: group {k} of output {o}");
                // The f16 rounding of the scale (at most 2^-11 relative) moves
                // the grid's ends by up to 15·2^-11 steps; inside, the nearest
                // point is within half a step.
                let bound = sc * (0.5 + 15.0 / 2048.0);
                for i in k * gs..((k + 1) * gs).min(inputs) {
                    let q = (qweight[(i / 8) * out + o] >> (4 * (i % 8))) & 15;
                    let x = w[o * inputs + i] as f64;
                    let err = (x - sc * (q as f64 - z as f64)).abs();
                    assert!(err <= bound, "{p}[{o}, {i}]: w {x} q {q} zero {z} scale {sc}: error {err} > {bound}");
                    // q is the nearest of the 16 levels (ties either way).
                    for c in 0..16u32 {
                        let e = (x - sc * (c as f64 - z as f64)).abs();
                        assert!(e >= err - sc * 1e-6, "{p}[{o}, {i}]: level {c} ({e}) is nearer than q {q} ({err})");
                    }
                    weights += 1;
                    on_edge += (q == 0 || q == 15) as usize;
                }
            }
        }
    }
    assert!(on_edge > 0 && weights > on_edge * 10, "{on_edge} of {weights} weights at the grid's ends");
    // Every other source tensor: the same name, F16, the source value rounded
    // to f16 (bit for bit).
    for (name, (dt, shape, b)) in &s {
        let quantized = name.strip_suffix(".weight").is_some_and(|p| prefixes.iter().any(|q| q == p));
        if quantized || prefixes.iter().any(|p| *name == format!("{p}.bias")) {
            continue;
        }
        let (odt, oshape, ob) = d.get(name).unwrap_or_else(|| panic!("{name} missing from the output"));
        assert_eq!((*odt, oshape), (Dtype::F16, shape), "{name}");
        let want: Vec<u8> = f32s(*dt, b).iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect();
        assert!(*ob == want, "{name}: not the source rounded to f16");
        expected_names.push(name.clone());
    }
    expected_names.sort();
    assert_eq!(d.keys().cloned().collect::<Vec<_>>(), expected_names, "exactly these tensors");

    // Config: quantization_config, quantize_config.json with the same content,
    // fp16; everything else as in the source; tokenizer and configs copied.
    let (sc, dc) = (json(&src.join("config.json")), json(&dst.join("config.json")));
    let qc = &dc["quantization_config"];
    let mut want = serde_json::json!({
        "bits": 4, "group_size": g, "damp_percent": 0.01, "desc_act": false, "static_groups": false, "sym": sym,
        "true_sequential": true, "model_name_or_path": null, "model_file_base_name": "model",
        "quant_method": "gptq", "checkpoint_format": "gptq"
    });
    if lm_head {
        want["lm_head"] = Value::Bool(true);
    }
    assert_eq!(qc, &want);
    assert_eq!(&json(&dst.join("quantize_config.json")), qc);
    assert_eq!(dc["torch_dtype"], "float16");
    for (k, v) in sc.as_object().unwrap() {
        if !["torch_dtype", "bf16", "fp16", "fp32"].contains(&k.as_str()) {
            assert_eq!(&dc[k], v, "config.json {k}");
        }
    }
    for f in ["qwen.tiktoken", "tokenizer_config.json", "generation_config.json"] {
        assert_eq!(std::fs::read(src.join(f)).unwrap(), std::fs::read(dst.join(f)).unwrap(), "{f} copied");
    }
}

/// The grid `find_params` of AutoGPTQ's quantizer.py gives a group (maxq 15,
/// f32), with the two departures `qvc quantize` documents: a symmetric range
/// is always ±max|w|, and an asymmetric zero that rounds to 0 (not storable
/// in v1) becomes 1 with scale xmax/14. Returns (scale as stored in f16, zero).
fn autogptq_params(w: &[f32], sym: bool) -> (f32, u32) {
    let mut xmin = w.iter().fold(0f32, |a, &x| a.min(x));
    let mut xmax = w.iter().fold(0f32, |a, &x| a.max(x));
    if sym {
        xmax = xmax.max(-xmin);
        xmin = -xmax;
    }
    if xmin == 0.0 && xmax == 0.0 {
        (xmin, xmax) = (-1.0, 1.0);
    }
    let scale = (xmax - xmin) / 15.0;
    let (scale, zero) = match sym {
        true => (scale, 8),
        false => match (-xmin / scale).round_ties_even() as u32 {
            0 => (xmax / 14.0, 1),
            z => (scale, z),
        },
    };
    (f16::from_f32(scale).to_f32(), zero)
}

fn header(path: &Path) -> BTreeMap<String, (Dtype, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, t)| (n, (t.dtype(), t.shape().to_vec()))).collect()
}

#[test]
fn group_64_is_on_the_grid_and_has_the_gptq_fixture_layout() {
    let Some(src) = common::fixtures() else { return };
    let dst = tmp("g64");
    quantize(&src, &dst, &["--group-size", "64"]);
    check_output(&src, &dst, 64, true, false);
    // The same tensors, dtypes and shapes as the GPTQ fixture (group 64, sym),
    // and its quantization_config's keys with the same values.
    let int4 = src.parent().unwrap().join("tiny-qwen-vl-int4");
    if !int4.join("model.safetensors").is_file() {
        eprintln!("skipped the layout comparison: {} not found", int4.display());
    } else {
        assert_eq!(header(&dst.join("model.safetensors")), header(&int4.join("model.safetensors")));
        let (ours, theirs) = (json(&dst.join("config.json")), json(&int4.join("config.json")));
        for (k, v) in theirs["quantization_config"].as_object().unwrap() {
            assert_eq!(&ours["quantization_config"][k], v, "quantization_config.{k}");
        }
        for (k, v) in json(&int4.join("quantize_config.json")).as_object().unwrap() {
            assert_eq!(&json(&dst.join("quantize_config.json"))[k], v, "quantize_config.json {k}");
        }
        for k in ["torch_dtype", "fp16", "bf16", "fp32"] {
            assert_eq!(ours[k], theirs[k], "config.json {k}");
        }
    }
    let _ = std::fs::remove_dir_all(dst);
}

#[test]
fn one_group_and_asymmetric_with_lm_head() {
    let Some(src) = common::fixtures() else { return };
    let dst = tmp("all");
    quantize(&src, &dst, &["--group-size", "-1"]);
    check_output(&src, &dst, -1, true, false);
    // Default group 128 (mlp.c_proj: 344 inputs, a ragged third group),
    // asymmetric zeros, lm_head quantized too.
    let dst2 = tmp("asym");
    quantize(&src, &dst2, &["--asym", "--lm-head", "int4"]);
    check_output(&src, &dst2, 128, false, true);
    let _ = std::fs::remove_dir_all(dst);
    let _ = std::fs::remove_dir_all(dst2);
}

#[test]
fn sharded_source_gives_sharded_output() {
    let Some(src) = common::fixtures() else { return };
    // A two-shard copy of the fixture: layer 1, the vision tower and layer 0's
    // c_attn bias (away from its weight) in the second shard.
    let sharded = tmp("sharded-src");
    std::fs::create_dir_all(&sharded).unwrap();
    for f in ["config.json", "qwen.tiktoken", "tokenizer_config.json", "generation_config.json"] {
        std::fs::write(sharded.join(f), std::fs::read(src.join(f)).unwrap()).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (a, b): (Vec<_>, Vec<_>) = st.tensors().into_iter().partition(|(n, _)| {
        !n.starts_with("transformer.h.1.") && !n.contains("visual") && n != "transformer.h.0.attn.c_attn.bias"
    });
    let mut map = serde_json::Map::new();
    for (i, part) in [a, b].into_iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        for (n, _) in &part {
            map.insert(n.clone(), Value::String(file.clone()));
        }
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(part, Some(meta), &sharded.join(&file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(sharded.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let dst = tmp("sharded-dst");
    quantize(&sharded, &dst, &["--group-size", "32"]);
    check_output(&sharded, &dst, 32, true, false);
    let index = json(&dst.join("model.safetensors.index.json"));
    let wm = index["weight_map"].as_object().unwrap();
    assert!(wm["transformer.h.1.mlp.w1.qweight"] == "model-00002-of-00002.safetensors", "{wm:?}");
    assert!(wm["transformer.h.0.mlp.w1.qweight"] == "model-00001-of-00002.safetensors", "{wm:?}");
    let sizes: u64 = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        .iter()
        .map(|f| {
            let b = std::fs::read(dst.join(f)).unwrap();
            let (n, _) = SafeTensors::read_metadata(&b).unwrap();
            (b.len() - 8 - n) as u64
        })
        .sum();
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(sizes));
    assert!(!dst.join("model.safetensors").exists());
    let _ = std::fs::remove_dir_all(sharded);
    let _ = std::fs::remove_dir_all(dst);
}

#[test]
fn refusals_name_the_problem() {
    let Some(src) = common::fixtures() else { return };
    let s = src.to_str().unwrap();
    let err = |args: &[&str]| {
        let o = qvc(args);
        assert!(!o.status.success(), "qvc {args:?} should fail");
        text(&o.stderr)
    };
    let dst = tmp("refuse");
    let d = dst.to_str().unwrap();
    // bits other than 4, group sizes that are not -1 or multiples of 8.
    let e = err(&["quantize", s, "-o", d, "--bits", "8"]);
    assert!(e.contains("--bits 8") && e.contains("--bits 4"), "{e}");
    let e = err(&["quantize", s, "-o", d, "--group-size", "12"]);
    assert!(e.contains("--group-size 12") && e.contains("multiple of 8"), "{e}");
    assert!(!dst.exists(), "nothing written for a refused option");
    // A missing source, a source that is already int4, a non-Qwen-VL config.
    let e = err(&["quantize", "/no/such/ckpt", "-o", d]);
    assert!(e.contains("/no/such/ckpt") && e.contains("does not exist"), "{e}");
    let int4 = src.parent().unwrap().join("tiny-qwen-vl-int4");
    if int4.is_dir() {
        let e = err(&["quantize", int4.to_str().unwrap(), "-o", d]);
        assert!(e.contains("already quantized"), "{e}");
    }
    let notvl = tmp("notvl");
    std::fs::create_dir_all(&notvl).unwrap();
    std::fs::write(notvl.join("config.json"), r#"{"model_type": "llama", "hidden_size": 64}"#).unwrap();
    let e = err(&["quantize", notvl.to_str().unwrap(), "-o", d]);
    assert!(e.contains("not a Qwen-VL checkpoint") && e.contains("visual"), "{e}");
    // Never into a non-empty directory without --force; with --force, stale
    // shards of an earlier checkpoint there are removed.
    std::fs::create_dir_all(&dst).unwrap();
    let stale = dst.join("model-00001-of-00002.safetensors");
    std::fs::write(&stale, b"old").unwrap();
    let e = err(&["quantize", s, "-o", d]);
    assert!(e.contains("--force") && e.contains("not empty"), "{e}");
    assert_eq!(std::fs::read(&stale).unwrap(), b"old", "untouched without --force");
    quantize(&src, &dst, &["--force", "--group-size", "64"]);
    assert!(!stale.exists() && dst.join("model.safetensors").is_file());
    // --force twice: copied read-only files are replaced, not reopened.
    quantize(&src, &dst, &["--force", "--group-size", "64"]);
    // Never over the source itself.
    let e = err(&["quantize", d, "-o", d, "--force"]);
    assert!(e.contains("already quantized") || e.contains("is the source"), "{e}");
    let e = err(&["quantize", s, "-o", s, "--force"]);
    assert!(e.contains("is the source"), "{e}");
    let _ = std::fs::remove_dir_all(dst);
    let _ = std::fs::remove_dir_all(notvl);
}

#[test]
fn help_explains_round_to_nearest() {
    let o = qvc(&["quantize", "--help"]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    for s in ["round-to-nearest", "not GPTQ", "--group-size", "--asym", "--lm-head", "--force", "Examples:"] {
        assert!(out.contains(s), "--help lacks {s:?}:\n{out}");
    }
}

/// The output of `src` quantized into `dst`, dequantized by this test
/// (W = scale · (q − (stored zero + 1))) into an f32 checkpoint at `out`
/// with the source's config: what qvc must compute from the int4 files.
fn write_dequantized(src: &Path, dst: &Path, out: &Path) {
    let d = read_dir_tensors(dst);
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, (dt, shape, b)) in &d {
        if let Some(p) = name.strip_suffix(".qweight") {
            let (out_f, inputs) = (shape[1], shape[0] * 8);
            let qw = u32s(b);
            let qz = u32s(&d[&format!("{p}.qzeros")].2);
            let sc = f32s(Dtype::F16, &d[&format!("{p}.scales")].2);
            let gi = u32s(&d[&format!("{p}.g_idx")].2);
            let mut w = vec![0f32; out_f * inputs];
            for o in 0..out_f {
                for i in 0..inputs {
                    let k = gi[i] as usize;
                    let q = (qw[(i / 8) * out_f + o] >> (4 * (i % 8))) & 15;
                    let z = ((qz[k * out_f / 8 + o / 8] >> (4 * (o % 8))) & 15) + 1;
                    w[o * inputs + i] = sc[k * out_f + o] * (q as f32 - z as f32);
                }
            }
            let bytes = w.iter().flat_map(|x| x.to_le_bytes()).collect();
            tensors.insert(format!("{p}.weight"), (vec![out_f, inputs], bytes));
        } else if [".qzeros", ".scales", ".g_idx"].iter().any(|s| name.ends_with(s)) {
            continue;
        } else {
            // The zero biases the architecture does not have are left out
            // (they add nothing); every other tensor widened from f16.
            let p = name.strip_suffix(".bias").unwrap_or("");
            if d.contains_key(&format!("{p}.qweight")) && b.iter().all(|&x| x == 0) {
                continue;
            }
            let bytes = f32s(*dt, b).iter().flat_map(|x| x.to_le_bytes()).collect();
            tensors.insert(name.clone(), (shape.clone(), bytes));
        }
    }
    std::fs::create_dir_all(out).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, (shape, b))| (n.clone(), safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
    for f in ["config.json", "qwen.tiktoken", "tokenizer_config.json", "generation_config.json"] {
        std::fs::write(out.join(f), std::fs::read(src.join(f)).unwrap()).unwrap();
    }
}

fn last_logits(model: &Path, image: &Path, out: &Path) -> Vec<f32> {
    let args = [
        "logits",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        "What is in the picture?",
        "--out",
        out.to_str().unwrap(),
        "--force",
    ];
    let o = qvc(&args);
    assert!(o.status.success(), "qvc {args:?}: {}", text(&o.stderr));
    let bytes = std::fs::read(out).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    f32s(t.dtype(), t.data())
}

#[test]
fn qvc_runs_the_quantized_checkpoint() {
    let Some(src) = common::fixtures() else { return };
    let image = src.join("shapes.png");
    for (name, flags) in
        [("run-g64", &["--group-size", "64"][..]), ("run-asym-lm", &["--asym", "--lm-head", "int4"][..])]
    {
        let dst = tmp(name);
        quantize(&src, &dst, flags);
        // A greedy turn with a picture runs and prints tokens.
        let args = [
            "generate",
            dst.to_str().unwrap(),
            "--device",
            "cpu",
            "--image",
            image.to_str().unwrap(),
            "--prompt",
            "Describe the picture.",
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
            "--json",
        ];
        let o = qvc(&args);
        assert!(o.status.success(), "qvc {args:?}: {}", text(&o.stderr));
        let v: Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
        assert_eq!(v["tokens"].as_array().map(Vec::len), Some(4), "{v}");
        // qvc reads the int4 files as this test dequantizes them: its logits
        // match those of an f32 checkpoint holding the dequantized weights
        // (1e-3 relative: the issue's int4 parity criterion).
        let deq = tmp(&format!("{name}-deq"));
        write_dequantized(&src, &dst, &deq);
        let got = last_logits(&dst, &image, &dst.join("logits.safetensors"));
        let want = last_logits(&deq, &image, &deq.join("logits.safetensors"));
        common::check(&format!("{name}: int4 vs its dequantized f32 copy"), &got, &want, 1e-3);
        let _ = std::fs::remove_dir_all(dst);
        let _ = std::fs::remove_dir_all(deq);
    }
}
