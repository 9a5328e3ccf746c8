//! `qvc inspect`: a checkpoint's configuration and program sizes, or a compiled
//! artifact's programs, kernels and memory plans; for both, the weights'
//! bytes by format and, for GPTQ int4, which Linears are int4, their group
//! size and act-order, and the quantization_config.

use crate::common::{load, ModelArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use qvc_ir::DType;
use qvc_runtime::WeightStore;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct InspectArgs {
    /// A compiled artifact directory (OUT.qvc) to describe.
    #[arg(value_name = "OUT.qvc", conflicts_with = "model")]
    artifact: Option<PathBuf>,
    /// Checkpoint directory (or a compiled artifact directory).
    #[arg(long, short = 'm', env = "QVC_MODEL", value_name = "DIR")]
    model: Option<PathBuf>,
    /// Use this config.json instead of the checkpoint's own.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// For an artifact: read the whole weights file and check its checksum.
    #[arg(long)]
    verify: bool,
}

pub fn run(a: InspectArgs) -> Result<()> {
    let path = a.artifact.clone().or_else(|| a.model.clone().filter(|m| qvc_runtime::artifact::is_artifact(m)));
    if let Some(dir) = path {
        return inspect_artifact(&dir, a.verify);
    }
    let Some(model) = a.model else {
        bail!("give a compiled artifact (qvc inspect OUT.qvc) or a checkpoint (--model DIR)");
    };
    let a = ModelArgs {
        path: None,
        model: Some(model),
        config: a.config,
        device: "cpu".into(),
        cpu_math: Default::default(),
    };
    let model = load(&a)?;
    let c = &model.config;
    println!(
        "decoder: hidden {} × {} layers, {} heads of {}, MLP {}, vocab {}",
        c.hidden_size, c.layers, c.heads, c.head_dim, c.mlp_width, c.vocab_size
    );
    println!("  seq_length {}, dynamic NTK {}, logn {}", c.seq_length, c.use_dynamic_ntk, c.use_logn_attn);
    let v = &c.visual;
    println!(
        "vision: width {} × {} layers, {} heads, MLP {}, {}px / {}px patches, output {}",
        v.width, v.layers, v.heads, v.mlp_width, v.image_size, v.patch_size, v.output_dim
    );
    println!("tensors: {} ({:.3} GB)", model.weights.names().len(), model.weights.total_bytes() as f64 / 1e9);
    let cfg_path = a.config.clone().unwrap_or_else(|| model.dir.join("config.json"));
    print_formats(&model.weights, c.layers, &cfg_path)?;
    let vg = model.vision_graph(&Default::default())?;
    let pg = qvc_model::graphs::decoder_graph(
        c,
        &model.weights,
        &qvc_model::graphs::DecoderShape { tokens: 300, ..Default::default() },
    )?;
    println!("programs: vision {} nodes, prefill(300) {} nodes", vg.nodes.len(), pg.nodes.len());
    Ok(())
}

fn inspect_artifact(dir: &Path, verify: bool) -> Result<()> {
    use qvc_runtime::artifact::{Artifact, CPU_FALLBACK};
    let t0 = Instant::now();
    let art = if verify { Artifact::open_verified(dir)? } else { Artifact::open(dir)? };
    let m = &art.manifest;
    let o = &m.options;
    println!("artifact {} (format {}, qvc {})", dir.display(), m.format_version, m.qvc_version);
    println!(
        "source: {} (config fnv64 {}, checkpoint fingerprint {}, {:.3} GB)",
        m.source.path,
        m.source.config_fnv64,
        m.source.checkpoint_fingerprint,
        m.source.checkpoint_bytes as f64 / 1e9
    );
    println!(
        "options: target {}, dtype {}, image {}px, vit attention {}, max seq {}, max batch {}",
        o.target, o.dtype, o.image_size, o.vit_attention, o.max_seq, o.max_batch
    );
    println!(
        "weights: {} ({} tensors, {:.1} MiB, fnv64 {}{})",
        m.weights.file,
        m.weights.tensors,
        m.weights.bytes as f64 / 1048576.0,
        m.weights.fnv64,
        if verify { ", verified" } else { ", not verified: pass --verify" }
    );
    let cfg_path = dir.join("config.json");
    let layers = qvc_model::config::Config::from_file(&cfg_path)?.layers;
    print_formats(&art.weights, layers, &cfg_path)?;
    println!("KV cache: {:.1} MiB; kernels: {}", m.kv_cache_bytes as f64 / 1048576.0, m.kernels.len());
    for f in &m.files {
        println!("  file {} ({} bytes)", f.name, f.bytes);
    }
    for (name, p) in &m.programs {
        println!(
            "program {name} ({}, tokens {}, past {}, image rows {}): {} nodes ({} before the passes), {} fused, {} unfused",
            p.kind, p.tokens, p.past, p.image_rows, p.stats.nodes_after, p.stats.nodes_before, p.stats.fused, p.stats.unfused
        );
        let sig = |v: &[qvc_runtime::artifact::TensorSig]| {
            v.iter().map(|t| format!("{} {}{}", t.name, t.dtype, t.shape)).collect::<Vec<_>>().join(", ")
        };
        println!("  inputs: {}", sig(&p.inputs));
        println!("  outputs: {}", sig(&p.outputs));
        let fs = qvc_ir::passes::fusion_stats(&p.graph);
        let kinds: Vec<String> = fs
            .by_kind
            .iter()
            .filter(|(k, _)| {
                k.starts_with("linear") || k.starts_with("add_") || k.starts_with("attention") || k.starts_with("qkv")
            })
            .map(|(k, n)| format!("{k} ×{n}"))
            .collect();
        println!("  fused: {}", if kinds.is_empty() { "none".into() } else { kinds.join(", ") });
        if let Some(mem) = &p.memory {
            println!(
                "  memory: peak {:.2} MiB, arena {:.2} MiB, naive {:.2} MiB, {} in place",
                mem.peak_bytes as f64 / 1048576.0,
                mem.arena_bytes as f64 / 1048576.0,
                mem.naive_bytes as f64 / 1048576.0,
                mem.in_place
            );
        }
        let fallback = p.launches.iter().filter(|l| l.family == CPU_FALLBACK).count();
        if !p.launches.is_empty() {
            println!("  launches: {} GPU kernels, {fallback} cpu-fallback", p.launches.len() - fallback);
        }
        for l in p.launches.iter().filter(|l| l.family != CPU_FALLBACK) {
            println!(
                "    %{:<5} {:<18} {:<44} grid {}x{}x{} block {}x{}x{}",
                l.node, l.family, l.kernel, l.grid[0], l.grid[1], l.grid[2], l.block[0], l.block[1], l.block[2]
            );
        }
    }
    eprintln!("[qvc] opened in {:.2} s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// The bytes of `w` by format (`int4` counts every part of a GPTQ Linear),
/// and for int4 weights: how many Linears (of the decoder's `layers` × 5,
/// and `lm_head`), their group sizes, act-order, and the raw
/// quantization_config of the checkpoint whose config.json is `config`.
fn print_formats(w: &WeightStore, layers: usize, config: &Path) -> Result<()> {
    use qvc_runtime::gptq::{G_IDX, PERM, QWEIGHT, QZEROS, SCALES, TILED};
    let q4 = w.q4_names();
    let parts: HashSet<String> = q4
        .iter()
        .flat_map(|n| {
            let prefix = n.strip_suffix(".weight").unwrap_or(n);
            [QWEIGHT, TILED, QZEROS, SCALES, G_IDX, PERM].map(|s| format!("{prefix}{s}"))
        })
        .collect();
    let mut by: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for name in w.names() {
        let Some((dtype, shape)) = w.info(name) else { continue };
        let format = if parts.contains(name) {
            "int4"
        } else {
            match dtype {
                DType::F32 => "f32",
                DType::BF16 => "bf16",
                DType::F16 => "f16",
                DType::I32 => "i32",
                DType::Q4 => "int4",
            }
        };
        let e = by.entry(format).or_default();
        e.0 += 1;
        e.1 += (shape.numel() * dtype.size()) as u64;
    }
    let list: Vec<String> = ["int4", "f16", "bf16", "f32", "i32"]
        .iter()
        .filter_map(|f| by.get(f).map(|(n, b)| format!("{f} {:.2} MiB ({n} tensors)", *b as f64 / 1048576.0)))
        .collect();
    println!("bytes by format: {}", list.join(", "));
    if q4.is_empty() {
        println!("int4: none (no GPTQ Linears)");
    } else {
        let decoder = q4.iter().filter(|n| n.starts_with("transformer.h.")).count();
        let head = q4.contains(&"lm_head.weight");
        let mut groups: BTreeSet<String> = BTreeSet::new();
        let mut act_order = 0;
        for n in &q4 {
            let q = w.q4(n).expect("listed by q4_names");
            groups.insert(if q.group >= q.cols { "-1 (one group per Linear)".into() } else { q.group.to_string() });
            act_order += q.perm.is_some() as usize;
        }
        println!(
            "int4: {} Linears ({decoder} of the decoder's {}, lm_head {}), group size {}, act-order {}",
            q4.len(),
            5 * layers,
            if head { "int4" } else { "not int4" },
            groups.into_iter().collect::<Vec<_>>().join(", "),
            match act_order {
                0 => "no".to_string(),
                n if n == q4.len() => "yes".to_string(),
                n => format!("in {n} of {} Linears", q4.len()),
            }
        );
    }
    match quantization_config(config)? {
        Some((from, v)) => println!("quantization_config ({}): {v}", from.display()),
        None => println!("quantization_config: none"),
    }
    Ok(())
}

/// The raw `quantization_config` of `config` (a config.json), else the
/// `quantize_config.json` beside it, with the file it came from.
fn quantization_config(config: &Path) -> Result<Option<(PathBuf, serde_json::Value)>> {
    let read = |p: &Path| -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", p.display()))
    };
    if let Some(q) = read(config)?.get("quantization_config").filter(|q| !q.is_null()) {
        return Ok(Some((config.to_path_buf(), q.clone())));
    }
    let side = config.parent().unwrap_or(Path::new(".")).join("quantize_config.json");
    if side.is_file() {
        return Ok(Some((side.clone(), read(&side)?)));
    }
    Ok(None)
}
