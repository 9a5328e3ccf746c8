//! `qvc bench` and `qvc selftest` as a user runs them, on the PTX emulator
//! and the CPU with the tiny synthetic model: every row of the table is
//! printed with a finite number (timings themselves are never asserted), and
//! the refusals say why.

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
    let args = [
        "bench",
        "--synthetic",
        "tiny",
        "--device",
        "emu",
        "--prompt-len",
        "8",
        "--decode-tokens",
        "2",
        "--batch",
        "2",
        "--image-sizes",
        "224",
        "--profile",
    ];
    let o = qvc(&args);
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

#[test]
fn bench_refuses_what_is_not_a_benchmark() {
    for (args, want) in [
        (vec!["bench", "--synthetic", "qwen-vl-chat", "--device", "emu"], "PTX emulator"),
        (vec!["bench", "--synthetic", "qwen-vl-chat", "--device", "cpu"], "19 GB"),
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
