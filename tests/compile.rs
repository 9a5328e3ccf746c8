//! `qvc compile` and the artifact it writes, on the fixture checkpoint: the
//! manifest and weights file are what the format promises (aligned tensors,
//! checksums, graphs that round-trip), the compiled programs run on the CPU
//! backend against the artifact's own weights and agree with the uncompiled
//! programs on the checkpoint, GPU targets get their PTX and launches, and
//! every kind of damage or misuse is a clear error that changes nothing.

mod common;
use common::rel_err;
use qvc::compile::{compile, CompileOptions, CompileReport, SourceSpec, Target};
use qvc_ir::{DType, InputRef};
use qvc_model::graphs::{decoder_graph, logn_scales, rope_tables, DecoderShape, VitAttention};
use qvc_model::{LoadOptions, Model};
use qvc_runtime::artifact::{self, Artifact, ArtifactError, Fnv64, ALIGN, CPU_FALLBACK, FORMAT_VERSION};
use qvc_runtime::{Backend, Cpu};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qvc-compile-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn build(src: &Path, out: &Path, opt: &CompileOptions) -> CompileReport {
    let r = compile(&SourceSpec::Checkpoint(src.into()), Some(out), opt, &indicatif::ProgressBar::hidden()).unwrap();
    eprint!("{r}");
    r
}

fn small() -> CompileOptions {
    CompileOptions { max_seq: 32, ..Default::default() }
}

/// Deterministic pixels in about [-2, 2] (what CLIP normalisation produces).
fn pixels(n: usize) -> Vec<f32> {
    let mut s = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect()
}

fn vision_parity(art: &Artifact, model: &Model) -> f64 {
    let size = model.config.visual.image_size;
    let px = pixels(3 * size * size);
    let inputs = HashMap::from([("pixels".to_string(), InputRef::F32(&px))]);
    let compiled = Cpu.run(art.graph("vision").unwrap(), &art.weights, &inputs).unwrap();
    let g = model.vision_graph(&model.vision_options()).unwrap();
    let plain = Cpu.run(&g, &model.weights, &inputs).unwrap();
    rel_err(&compiled["features"], &plain["features"])
}

#[test]
fn cpu_artifact_has_the_promised_format_and_matches_the_uncompiled_model() {
    let Some(fx) = common::fixtures() else { return };
    let dir = tmp("cpu");
    let out = dir.join("tiny.qvc");
    let t0 = std::time::Instant::now();
    let report = build(&fx, &out, &small());
    eprintln!("compiled in {:.2} s", t0.elapsed().as_secs_f64());
    let art = Artifact::open_verified(&out).unwrap();
    let m = &art.manifest;

    // Manifest fields.
    assert_eq!(m.format_version, FORMAT_VERSION);
    assert_eq!(m.options.target, "cpu");
    assert_eq!(m.options.dtype, "bf16");
    assert_eq!((m.options.image_size, m.options.max_seq, m.options.max_batch), (448, 32, 1));
    assert_eq!(m.options.vit_attention, "global");
    assert_eq!(m.source.config_fnv64, Fnv64::of(&std::fs::read(fx.join("config.json")).unwrap()));
    let names: Vec<&str> = m.programs.keys().map(String::as_str).collect();
    assert_eq!(names, ["decode.16", "decode.32", "prefill.16", "prefill.32", "vision"]);
    assert!(m.kernels.is_empty() && m.programs.values().all(|p| p.launches.is_empty()));
    for f in ["config.json", "generation_config.json", "qwen.tiktoken"] {
        assert!(m.files.iter().any(|r| r.name == f), "{f} not listed");
        assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(fx.join(f)).unwrap(), "{f} not copied");
    }
    assert!(!out.join(artifact::PTX).exists());

    // The weights file: loads with the safetensors crate, every tensor
    // 256-byte aligned, size and checksum as recorded.
    let bytes = std::fs::read(out.join(artifact::WEIGHTS)).unwrap();
    assert_eq!(m.weights.bytes, bytes.len() as u64);
    assert_eq!(m.weights.fnv64, Fnv64::of(&bytes));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut real = 0;
    for (name, t) in st.tensors() {
        let off = t.data().as_ptr() as usize - bytes.as_ptr() as usize;
        if !name.starts_with("__pad.") {
            assert_eq!(off % ALIGN, 0, "{name} at byte {off}");
            // Checkpoint tensors in --dtype, large constants in f32 (see src/compile.rs).
            if name.starts_with("const.") {
                assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
            } else if !name.starts_with("folded.") {
                assert_eq!(t.dtype(), safetensors::Dtype::BF16, "{name}");
            }
            real += 1;
        }
    }
    assert_eq!(real, m.weights.tensors);
    assert_eq!(art.weights.names().len(), m.weights.tensors);
    assert_eq!(qvc::compile::params_of(m).len(), m.weights.tensors, "exactly the params the programs read");

    // Graphs: as compiled (node counts and outputs), and a second round trip
    // through JSON gives the same text.
    for s in &report.programs {
        let p = &m.programs[&s.name];
        assert_eq!(p.graph.nodes.len(), s.nodes_after, "{}", s.name);
        assert!(s.nodes_after < s.nodes_before, "{}: the passes removed nothing", s.name);
        let outs: Vec<&str> = p.graph.outputs.iter().map(|(n, _)| n.as_str()).collect();
        let sig: Vec<&str> = p.outputs.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(outs, sig);
        let mem = p.memory.as_ref().unwrap();
        assert_eq!(mem.slots.len(), p.graph.nodes.len());
        assert!(mem.arena_bytes <= mem.naive_bytes && mem.peak_bytes <= mem.arena_bytes);
        let a = serde_json::to_string(&p.graph).unwrap();
        let back: qvc_ir::Graph = serde_json::from_str(&a).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), a);
    }
    assert!(m.programs["vision"].stats.fused > 0);

    // The compiled programs, run on the artifact's weights, agree with the
    // uncompiled ones on the checkpoint.
    let model = Model::load(&fx, &LoadOptions::default()).unwrap();
    let r = vision_parity(&art, &model);
    eprintln!("vision features: compiled vs uncompiled rel err {r:.2e}");
    assert!(r <= 1e-4, "vision features differ: {r:e}");
    let cfg = &model.config;
    let t = 16;
    let ids: Vec<i32> = (0..t as i32).map(|i| 100 + 37 * i).collect();
    let (cos, sin) = rope_tables(cfg, cfg.ntk_alpha(t), 0, t);
    let logn = logn_scales(cfg, 0, t);
    // Prefill programs are shape buckets: the logits row comes from `last_index`
    // (here the bucket is full, so it is the last row, as in the plain graph).
    let last = [t as i32 - 1];
    let inputs = HashMap::from([
        ("ids".to_string(), InputRef::I32(&ids)),
        ("rope_cos".to_string(), InputRef::F32(&cos)),
        ("rope_sin".to_string(), InputRef::F32(&sin)),
        ("logn".to_string(), InputRef::F32(&logn)),
        ("last_index".to_string(), InputRef::I32(&last)),
    ]);
    let compiled = Cpu.run(art.graph("prefill.16").unwrap(), &art.weights, &inputs).unwrap();
    let g = decoder_graph(cfg, &model.weights, &DecoderShape { tokens: t, ..Default::default() }).unwrap();
    let plain = Cpu.run(&g, &model.weights, &inputs).unwrap();
    for k in ["logits", "k.0", "v.1"] {
        let r = rel_err(&compiled[k], &plain[k]);
        eprintln!("prefill {k}: compiled vs uncompiled rel err {r:.2e}");
        assert!(r <= 1e-4, "prefill {k} differs: {r:e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn image_size_896_with_window_attention_compiles_and_runs() {
    let Some(fx) = common::fixtures() else { return };
    let dir = tmp("896");
    let out = dir.join("w.qvc");
    let opt = CompileOptions {
        image_size: Some(896),
        vit_attention: "window:16,global-every:2".into(),
        dtype: Some(DType::F32),
        max_seq: 16,
        ..Default::default()
    };
    build(&fx, &out, &opt);
    let art = Artifact::open(&out).unwrap();
    assert_eq!(art.manifest.options.image_size, 896);
    assert_eq!(art.manifest.options.vit_attention, "window:16,global-every:2");
    let vision = &art.manifest.programs["vision"];
    assert_eq!(vision.inputs[0].shape.0, [3, 896, 896]);
    let fs = qvc_ir::passes::fusion_stats(&vision.graph);
    assert_eq!((fs.by_kind.get("attention.window"), fs.by_kind.get("attention.global")), (Some(&1), Some(&1)));
    // f32 weights: the artifact converts the bf16 checkpoint exactly.
    assert!(art.weights.names().iter().all(|n| art.weights.info(n).unwrap().0 == DType::F32));
    let attention: VitAttention = "window:16,global-every:2".parse().unwrap();
    let lo = LoadOptions { image_size: Some(896), vit_attention: attention, ..Default::default() };
    let model = Model::load(&fx, &lo).unwrap();
    let r = vision_parity(&art, &model);
    eprintln!("vision 896 window features: compiled vs uncompiled rel err {r:.2e}");
    assert!(r <= 1e-4, "vision features differ: {r:e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gpu_target_writes_ptx_and_kernel_launches() {
    let Some(fx) = common::fixtures() else { return };
    let dir = tmp("sm90");
    let out = dir.join("g.qvc");
    let report = build(&fx, &out, &CompileOptions { target: Target::parse("sm_90").unwrap(), max_seq: 16, ..small() });
    let art = Artifact::open(&out).unwrap();
    let m = &art.manifest;
    assert_eq!(m.options.target, "sm_90");
    assert_eq!(report.kernels, m.kernels.len());
    let ptx = std::fs::read_to_string(out.join(artifact::PTX)).unwrap();
    assert!(ptx.contains(".target sm_90"));
    for k in &m.kernels {
        assert!(ptx.contains(&format!(".entry {k}")), "{k} missing from kernels.ptx");
    }
    let cubin = out.join("kernels.sm_90.cubin");
    let have_ptxas = qvc_codegen::ptxas::find_ptxas().is_some();
    assert_eq!(cubin.is_file(), have_ptxas, "cubin iff ptxas is present");
    assert_eq!(m.files.iter().any(|f| f.name == "kernels.sm_90.cubin"), have_ptxas);
    let families: std::collections::BTreeSet<&str> =
        m.programs.values().flat_map(|p| p.launches.iter().map(|l| l.family.as_str())).collect();
    for f in ["gemm", "gemv", "norm", "attention", "decode_attention", "generic"] {
        assert!(families.contains(f), "no {f} launch: {families:?}");
    }
    // Every node of the fixture's programs has a device kernel.
    assert!(!families.contains(CPU_FALLBACK), "host fallbacks: {families:?}");
    for p in m.programs.values() {
        for l in &p.launches {
            let node = &p.graph.nodes[l.node as usize];
            assert_eq!(l.op, node.op.name());
            if l.family == CPU_FALLBACK {
                assert!(l.note.is_some() && l.kernel.is_empty());
            } else {
                assert!(m.kernels.contains(&l.kernel) && l.grid.iter().all(|&g| g > 0) && l.block[0] > 0);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn open_err(dir: &Path, verified: bool) -> ArtifactError {
    let r = if verified { Artifact::open_verified(dir) } else { Artifact::open(dir) };
    match r {
        Ok(_) => panic!("{} opened although it is damaged", dir.display()),
        Err(e) => {
            eprintln!("error: {e}");
            e
        }
    }
}

#[test]
fn damaged_artifacts_are_clear_errors() {
    let Some(fx) = common::fixtures() else { return };
    let dir = tmp("damage");
    let out = dir.join("d.qvc");
    build(&fx, &out, &CompileOptions { max_seq: 16, ..Default::default() });
    let man = out.join(artifact::MANIFEST);
    let wts = out.join(artifact::WEIGHTS);
    let good = std::fs::read(&man).unwrap();

    std::fs::rename(&man, dir.join("saved")).unwrap();
    let e = open_err(&out, false);
    assert!(matches!(e, ArtifactError::NotArtifact { .. }) && e.to_string().contains("manifest.json"));
    std::fs::rename(dir.join("saved"), &man).unwrap();

    std::fs::write(&man, &good[..good.len() / 2]).unwrap();
    let e = open_err(&out, false);
    assert!(matches!(e, ArtifactError::Manifest { .. }) && e.to_string().contains("manifest.json"), "{e}");

    let text = String::from_utf8(good.clone()).unwrap();
    let bumped = text.replacen(&format!("\"format_version\":{FORMAT_VERSION}"), "\"format_version\":99", 1);
    assert_ne!(bumped, text);
    std::fs::write(&man, bumped).unwrap();
    match open_err(&out, false) {
        e @ ArtifactError::Version { found: 99, expected: FORMAT_VERSION, .. } => {
            assert!(e.to_string().contains("recompile"), "{e}")
        }
        e => panic!("wrong error {e}"),
    }
    std::fs::write(&man, &good).unwrap();
    Artifact::open_verified(&out).unwrap();

    // A flipped byte in the data: the size and header are intact, so only
    // the checksum notices.
    let mut w = std::fs::read(&wts).unwrap();
    let at = w.len() - 1000;
    w[at] ^= 0x40;
    std::fs::write(&wts, &w).unwrap();
    Artifact::open(&out).unwrap();
    match open_err(&out, true) {
        e @ ArtifactError::Checksum { .. } => assert!(e.to_string().contains("weights.safetensors"), "{e}"),
        e => panic!("wrong error {e}"),
    }
    w[at] ^= 0x40;
    std::fs::write(&wts, &w[..w.len() - 4096]).unwrap();
    match open_err(&out, false) {
        e @ ArtifactError::Size { .. } => assert!(e.to_string().contains("weights.safetensors"), "{e}"),
        e => panic!("wrong error {e}"),
    }
    std::fs::write(&wts, &w).unwrap();
    Artifact::open_verified(&out).unwrap();

    let tok = out.join("qwen.tiktoken");
    std::fs::remove_file(&tok).unwrap();
    match open_err(&out, false) {
        e @ ArtifactError::MissingFile { .. } => assert!(e.to_string().contains("qwen.tiktoken"), "{e}"),
        e => panic!("wrong error {e}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn qvc(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_qvc")).args(args).output().unwrap();
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (o.status.success(), s(&o.stdout), s(&o.stderr))
}

#[test]
fn cli_compile_inspect_and_refusals() {
    let Some(fx) = common::fixtures() else { return };
    let fx = fx.to_str().unwrap();
    let dir = tmp("cli");
    let out = dir.join("c.qvc");
    let o = out.to_str().unwrap();
    let (ok, stdout, err) = qvc(&["compile", fx, "-o", o, "--max-seq", "16"]);
    assert!(ok, "{err}");
    assert!(stdout.contains("vision") && stdout.contains("prefill.16") && stdout.contains("peak MiB"), "{stdout}");
    let (ok, stdout, err) = qvc(&["inspect", o, "--verify"]);
    assert!(ok, "{err}");
    assert!(stdout.contains("verified") && stdout.contains("program decode.16") && stdout.contains("memory: peak"));

    // Never overwrite without --force; never replace a non-artifact at all.
    let (ok, _, err) = qvc(&["compile", fx, "-o", o, "--max-seq", "16"]);
    assert!(!ok && err.contains("already exists") && err.contains("--force"), "{err}");
    let user = dir.join("mine");
    std::fs::create_dir_all(&user).unwrap();
    std::fs::write(user.join("notes.txt"), "keep me").unwrap();
    let u = user.to_str().unwrap();
    let (ok, _, err) = qvc(&["compile", fx, "-o", u]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = qvc(&["compile", fx, "-o", u, "--force"]);
    assert!(!ok && err.contains("not a qvc artifact"), "{err}");
    assert_eq!(std::fs::read_to_string(user.join("notes.txt")).unwrap(), "keep me");
    assert_eq!(std::fs::read_dir(&user).unwrap().count(), 1);
    let (ok, _, err) = qvc(&["compile", fx, "-o", o, "--max-seq", "16", "--force", "--target", "sm_80"]);
    assert!(ok, "{err}");
    assert_eq!(Artifact::open(&out).unwrap().manifest.options.target, "sm_80");

    // Bad options fail before anything is written.
    let fresh = dir.join("never.qvc");
    let f = fresh.to_str().unwrap();
    let (ok, _, err) = qvc(&["compile", fx, "-o", f, "--image-size", "450"]);
    assert!(!ok && err.contains("--image-size 450") && err.contains("multiple of the patch size 14"), "{err}");
    for bad in ["window:0", "windows:8", "window:8,global-every:x"] {
        let (ok, _, err) = qvc(&["compile", fx, "-o", f, "--vit-attention", bad]);
        assert!(!ok && err.contains("--vit-attention"), "{bad}: {err}");
    }
    // A dry run plans everything and writes nothing, even with -o.
    let (ok, stdout, err) = qvc(&["compile", fx, "-o", f, "--dry-run", "--max-seq", "16"]);
    assert!(ok && stdout.contains("dry run: nothing written"), "{err}");
    assert!(!fresh.exists());
    // --max-images is accepted for old scripts, and says it does nothing.
    let (ok, _, err) = qvc(&["compile", fx, "-o", f, "--dry-run", "--max-seq", "16", "--max-images", "3"]);
    assert!(ok && err.contains("--max-images 3 is deprecated and ignored"), "{err}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2, "no partial directories left behind");

    // The full-size model, planned without a checkpoint.
    let (ok, stdout, err) = qvc(&["compile", "--synthetic", "qwen-vl-chat", "--dry-run", "--target", "sm_90"]);
    assert!(ok, "{err}");
    assert!(stdout.contains("prefill.2048") && stdout.contains("dry run: nothing written"), "{stdout}");
    let (ok, _, err) = qvc(&["compile", "--synthetic", "qwen-vl-chat", "-o", f]);
    assert!(!ok && err.contains("--dry-run"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
