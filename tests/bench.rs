//! `qvc bench` and `qvc selftest` as a user runs them, on the PTX emulator
//! and the CPU with the tiny synthetic model: every row of the table is
//! printed with a finite number (timings themselves are never asserted),
//! `--json` prints one object with the documented keys, and the refusals say
//! why.

use std::process::{Command, Output};

fn qvc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qvc"))
        .args(args)
        .env_remove("QVC_MODEL")
        .env_remove("QVC_DEVICE")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The value column of the table row whose measure is `what`.
fn value(table: &str, what: &str) -> f64 {
    let line = table
        .lines()
        .find(|l| l.starts_with(what) && l[what.len()..].starts_with("  "))
        .unwrap_or_else(|| panic!("no row {what:?} in\n{table}"));
    let v: f64 = line[what.len()..]
        .split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("row {what:?} has no number: {line}"));
    assert!(v.is_finite() && v > 0.0, "row {what:?}: {v}");
    v
}

#[test]
fn bench_tiny_on_the_emulator_prints_every_row() {
    let o = qvc(&[&tiny_bench("emu")[..], &["--batch", "2", "--profile"]].concat());
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}\n{out}", text(&o.stderr));
    for row in [
        "vision 224 global",
        "vision 224 window:16",
        "time to first token",
        "prefill 8 tokens",
        "decode batch 1",
        "decode batch 2",
        "peak device memory",
    ] {
        value(&out, row);
    }
    assert!(out.contains("n/a on the emulator"), "{out}");
    assert!(out.contains("generated on the host"), "{out}");
    // --profile: one section per phase, families first, launches counted.
    for phase in ["profile: vision 224", "profile: prefill 8 tokens", "profile: decode step, batch 1"] {
        let at = out.find(phase).unwrap_or_else(|| panic!("no {phase:?} in\n{out}"));
        let section = &out[at..];
        assert!(section.contains("gemv") && section.contains("slowest kernels"), "{section}");
    }
}

#[test]
fn bench_tiny_on_the_cpu_has_floors() {
    let o = qvc(&["bench", "--synthetic", "tiny", "--device", "cpu", "--prompt-len", "8", "--decode-tokens", "2"]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}\n{out}", text(&o.stderr));
    value(&out, "ceiling: f32 compute");
    value(&out, "vision 448 global");
    value(&out, "vision 896 window:16");
    value(&out, "decode batch 1");
    // The CPU defaults to batch 1: no batched row.
    assert!(!out.contains("decode batch 8"), "{out}");
    let frac = out.lines().find(|l| l.starts_with("prefill 8 tokens")).unwrap();
    assert!(frac.contains('%'), "{frac}");
}

/// A short bench of the tiny synthetic model on `device`, one picture size.
fn tiny_bench(device: &'static str) -> [&'static str; 11] {
    [
        "bench",
        "--synthetic",
        "tiny",
        "--device",
        device,
        "--prompt-len",
        "8",
        "--decode-tokens",
        "2",
        "--image-sizes",
        "224",
    ]
}

/// `--profile` on the CPU: each phase timed op by op, families first, every
/// line with its share of the measured ceilings; the decode step's Linears
/// and its attention over the cache are there with their shapes.
#[test]
fn bench_profile_on_the_cpu_names_ops_and_ceilings() {
    let o = qvc(&[&tiny_bench("cpu")[..], &["--profile"]].concat());
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}\n{out}", text(&o.stderr));
    for phase in ["profile: vision 224", "profile: prefill 8 tokens", "profile: decode step, batch 1"] {
        let at = out.find(phase).unwrap_or_else(|| panic!("no {phase:?} in\n{out}"));
        let section = &out[at..];
        let section = &section[..section[1..].find("\nprofile:").map_or(section.len(), |e| e + 1)];
        assert!(section.contains("of ceiling") && section.contains("slowest ops:"), "{section}");
        assert!(section.lines().any(|l| l.trim_start().starts_with("linear ")), "{section}");
        assert!(section.lines().any(|l| l.trim_start().starts_with("attention ")), "{section}");
        // Every family line ends with its share of a ceiling, F or B.
        let fam = section.lines().find(|l| l.trim_start().starts_with("linear ")).unwrap();
        assert!(fam.ends_with('F') || fam.ends_with('B'), "{fam}");
    }
    let at = out.find("profile: decode step").unwrap();
    assert!(out[at..].contains("attention causal 1 new + 8 cached"), "{}", &out[at..]);
    assert!(out[at..].contains("linear 1x128->"), "{}", &out[at..]);
}

/// The `--json` keys every device reports (numbers; `null` only where the
/// device has no ceilings, see [`bench_json`]).
const JSON_TIMINGS: [&str; 9] = [
    "vision_ms",
    "ttft_ms",
    "prefill_ms",
    "prefill_tokens",
    "prefill_tok_s",
    "decode_tok_s",
    "decode_ms_per_token",
    "decode_bytes_per_token",
    "threads",
];

/// `qvc bench ... --json`: stdout is exactly one JSON object (the table went
/// to stderr); its timing keys are finite and positive.
fn bench_json(args: &[&str]) -> (serde_json::Value, String) {
    let o = qvc(args);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "{err}\n{out}");
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}):\n{out}"));
    assert!(v.is_object(), "{out}");
    for k in JSON_TIMINGS {
        let x = v[k].as_f64().unwrap_or_else(|| panic!("{k} missing or not a number in {v}"));
        assert!(x.is_finite() && x > 0.0, "{k}: {x}");
    }
    assert_eq!(v["prefill_tokens"], 8, "{v}");
    assert!(matches!(v["cpu_math"].as_str(), Some("exact" | "fast")), "cpu_math: {v}");
    // The human table is on stderr, not mixed into stdout.
    value(&err, "decode batch 1");
    (v, err)
}

fn number(v: &serde_json::Value, path: &[&str]) -> f64 {
    let x = path.iter().fold(v, |v, k| &v[*k]);
    let x = x.as_f64().unwrap_or_else(|| panic!("{path:?} missing or not a number in {v}"));
    assert!(x.is_finite() && x > 0.0, "{path:?}: {x}");
    x
}

/// Under `--cpu-math fast` the GEMM ceiling is the peak of the instruction
/// the bf16 GEMMs run on here: AMX tiles, else `vdpbf16ps` where it outruns
/// the FMAs, else (no AVX512-BF16, or a slow one: fast runs those GEMMs
/// exactly) the FMA peak.
#[test]
#[cfg(target_arch = "x86_64")]
fn bench_json_names_the_fast_gemm_ceiling() {
    let (v, _) = bench_json(&[&tiny_bench("cpu")[..], &["--json", "--cpu-math", "fast"]].concat());
    let want = if qvc_kernels::gemm::amx::available() {
        "amx_tdpbf16ps"
    } else if qvc_kernels::gemm::bf16_products_pay() {
        "vdpbf16ps"
    } else {
        "fma"
    };
    assert_eq!(v["ceilings"]["gemm_peak_of"], want, "{v}");
    let (peak, fma) = (number(&v, &["ceilings", "gemm_peak_gflops"]), number(&v, &["ceilings", "fma_peak_gflops"]));
    assert_eq!(peak == fma, want == "fma", "{v}");
}

/// An int4 decoder's prefill floor divides by the peak its GEMMs run on:
/// the FMA peak in exact mode, and under `--cpu-math fast` too unless AMX
/// tiles run them (int4 has no `vdpbf16ps` path). So both modes imply the
/// same prefill FLOPs: floor fraction × prefill time × that peak.
#[test]
#[cfg(target_arch = "x86_64")]
fn int4_prefill_floor_divides_by_the_peak_its_gemms_run_on() {
    let implied_flops = |math: &str| {
        let (v, _) = bench_json(&[&tiny_bench("cpu")[..], &["--json", "--int4", "--cpu-math", math]].concat());
        let peak = if v["ceilings"]["gemm_peak_of"] == "amx_tdpbf16ps" {
            number(&v, &["ceilings", "gemm_peak_gflops"])
        } else {
            number(&v, &["ceilings", "fma_peak_gflops"])
        };
        number(&v, &["prefill_floor_fraction"]) * number(&v, &["prefill_ms"]) * peak
    };
    let (exact, fast) = (implied_flops("exact"), implied_flops("fast"));
    assert!((exact - fast).abs() <= 1e-9 * exact, "prefill FLOPs implied: exact {exact}, fast {fast}");
}

#[test]
fn bench_json_on_the_cpu_has_every_key_and_measured_ceilings() {
    let (v, err) = bench_json(&[&tiny_bench("cpu")[..], &["--json"]].concat());
    assert_eq!(v["device"], "cpu", "{v}");
    let fma = number(&v, &["ceilings", "fma_peak_gflops"]);
    let bw = number(&v, &["ceilings", "read_bandwidth_gbs"]);
    assert!(v["ceilings"]["fma_peak_how"].as_str().unwrap().starts_with("measured"), "{v}");
    // Exact mode's GEMMs run on the FMAs, so their ceiling is the FMA peak;
    // where AMX runs them (A split in three bf16), a third of the tile peak.
    #[cfg(target_arch = "x86_64")]
    let tiles = qvc_kernels::gemm::exact_on_tiles();
    #[cfg(not(target_arch = "x86_64"))]
    let tiles = false;
    if tiles {
        assert_eq!(v["ceilings"]["gemm_peak_of"], "amx_tdpbf16ps_over_3", "{v}");
        assert!(value(&err, "ceiling: exact on tiles") > 0.0, "{err}");
    } else {
        assert_eq!(v["ceilings"]["gemm_peak_of"], "fma", "{v}");
        assert_eq!(number(&v, &["ceilings", "gemm_peak_gflops"]), fma, "{v}");
    }
    assert!(v["ceilings"]["read_bandwidth_how"].as_str().unwrap().starts_with("measured"), "{v}");
    // The table prints the same measured ceilings (to stderr).
    assert!((value(&err, "ceiling: f32 compute") / fma - 1.0).abs() < 0.01, "{fma}\n{err}");
    assert!((value(&err, "ceiling: memory read") / bw - 1.0).abs() < 0.01, "{bw}\n{err}");
    let best = number(&v, &["gemm_best_gflops"]);
    let gemms = v["ceilings"]["gemm"].as_array().unwrap();
    assert!(!gemms.is_empty() && gemms.iter().all(|g| g["gflops"].as_f64().unwrap() <= best), "{v}");
    // Fractions are present, finite and positive (`number`); no upper bound:
    // ceilings and workloads are timed at different moments on a shared
    // machine, and tests never assert on speed.
    for k in ["decode_floor_fraction", "gemm_peak_fraction", "prefill_floor_fraction"] {
        number(&v, &[k]);
    }
    let peak = number(&v, &["ceilings", "gemm_peak_gflops"]);
    assert!((number(&v, &["gemm_peak_fraction"]) - best / peak).abs() < 1e-9, "{v}");
    let d = &v["decode"][0];
    assert_eq!(d["batch"], 1, "{v}");
    assert_eq!(d["tok_s"], v["decode_tok_s"], "{v}");
    let dff = number(&v, &["decode_floor_fraction"]);
    let achieved = number(&v, &["decode_bytes_per_token"]) / (number(&v, &["decode_ms_per_token"]) * 1e-3) / 1e9;
    assert!((achieved / bw - dff).abs() < 1e-6 * dff.max(1.0), "{achieved} GB/s of {bw} vs {dff}");
    // The tiny model's weights sit in the caches: no probes beside its
    // steps, so the paired keys are there and null.
    for (o, k) in [(&v, "decode_paired_floor_fraction"), (d, "paired_floor_fraction"), (d, "paired_read_gbs")] {
        assert!(o.get(k).is_some_and(|x| x.is_null()), "{k}: {v}");
    }
    assert_eq!(v["vision"].as_array().unwrap().len(), 2, "224 global and window: {v}");
}

/// `--vit-layers`/`--llm-layers` build and time that many layers (the
/// tiny model has two of each; one is a slice, zero leaves the fixed parts),
/// say so in the table and report them in the JSON.
#[test]
fn bench_synthetic_layers_are_built_and_reported() {
    for (vit, llm) in [("1", "1"), ("0", "2")] {
        let (v, err) = bench_json(
            &[&tiny_bench("cpu")[..], &["--repeat", "2", "--vit-layers", vit, "--llm-layers", llm, "--json"]].concat(),
        );
        assert_eq!(v["vit_layers"].to_string(), vit, "{v}");
        assert_eq!(v["llm_layers"].to_string(), llm, "{v}");
        assert_eq!(v["repeat"], 2, "{v}");
        let note = format!("({vit} of 2 ViT layers, {llm} of 2 decoder layers, full widths)");
        assert!(v["model"].as_str().unwrap().contains(&note), "{v}");
        assert!(err.contains(&note), "{err}");
    }
    // Without the flags: the model's own depth, no slice note.
    let (v, _) = bench_json(&[&tiny_bench("cpu")[..], &["--json"]].concat());
    assert_eq!((v["vit_layers"].as_u64(), v["llm_layers"].as_u64()), (Some(2), Some(2)), "{v}");
    assert_eq!(v["repeat"], 1, "the CPU's default: {v}");
    assert!(!v["model"].as_str().unwrap().contains("full widths"), "{v}");
}

/// `qvc bench --help` teaches the layer flags with a runnable example.
#[test]
fn bench_help_shows_the_layer_flags() {
    let o = qvc(&["bench", "--help"]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}");
    for want in
        ["--vit-layers <N>", "--llm-layers <M>", "--synthetic qwen-vl-chat --vit-layers 4 --llm-layers 2 --device cpu"]
    {
        assert!(out.contains(want), "{want:?} not in\n{out}");
    }
}

#[test]
fn bench_json_on_the_emulator_has_null_ceilings() {
    let (v, _) = bench_json(&[&tiny_bench("emu")[..], &["--json"]].concat());
    assert_eq!(v["device"], "emu", "{v}");
    for k in ["ceilings", "gemm_peak_fraction", "decode_floor_fraction", "prefill_floor_fraction"] {
        assert!(v.get(k).is_some_and(|x| x.is_null()), "{k} should be present and null on the emulator: {v}");
    }
}

#[test]
fn bench_refuses_what_is_not_a_benchmark() {
    for (args, want) in [
        (vec!["bench", "--synthetic", "qwen-vl-chat", "--device", "emu"], "PTX emulator"),
        (vec!["bench", "--synthetic", "qwen-vl-chat", "--device", "cpu"], "--vit-layers 4 --llm-layers 2 is ~"),
        (vec!["bench", "--synthetic", "qwen-vl-chat", "--device", "cpu", "--vit-layers", "4"], "--llm-layers M"),
        (
            vec!["bench", "--synthetic", "qwen-vl-chat", "--device", "cpu", "--vit-layers", "49", "--llm-layers", "1"],
            "has 48 such layers",
        ),
        (vec!["bench", "--device", "cpu", "--llm-layers", "1"], "shape a --synthetic model"),
        (vec!["bench", "--synthetic", "huge", "--device", "cpu"], "qwen-vl-chat"),
        (vec!["bench", "--device", "cpu"], "no model given"),
        (vec!["bench", "--synthetic", "tiny", "--device", "cpu", "--image-sizes", "100"], "multiple"),
        (vec!["bench", "/nope", "--synthetic", "tiny"], "not both"),
    ] {
        let o = qvc(&args);
        let err = text(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn selftest_passes_every_family_on_the_emulator() {
    let o = qvc(&["selftest", "--device", "emu", "--small", "--cases", "2"]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}\n{out}", text(&o.stderr));
    // Every kernel family the runtime launches, each on its own line; a
    // name must be followed by the column's padding, so that it cannot match
    // a longer name it prefixes.
    let families = [
        "gemm",
        "gemv",
        "norm",
        "flash attention",
        "decode attention",
        "rotary",
        "embed",
        "softmax",
        "sample (argmax)",
        "generic (eltwise)",
        "patch",
        "sample (top-p)",
        "generic (copy)",
        "generic (gather)",
        "generic (scatter)",
        "generic (matmul)",
        "generic (reduce)",
        "generic (rope)",
        "generic (kv append)",
    ];
    for family in families {
        let line = out
            .lines()
            .find(|l| l.strip_prefix(family).is_some_and(|rest| rest.starts_with(' ')))
            .unwrap_or_else(|| panic!("no {family} line:\n{out}"));
        assert!(line.contains(" 2 cases  max rel err"), "{line}");
        assert!(line.ends_with("PASS"), "{line}");
    }
    assert!(out.contains(&format!("selftest: {} families, 0 failed", families.len())), "{out}");
    let o = qvc(&["selftest", "--device", "cpu"]);
    assert!(!o.status.success() && text(&o.stderr).contains("--device emu"), "{}", text(&o.stderr));
}
