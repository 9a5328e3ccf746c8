//! `qvc bench --profile`: where one vision run, one prefill and one decode
//! step spend their time, kernel by kernel on a GPU (or the emulator), op by
//! op on the CPU, printed as family totals and then the slowest entries.
//!
//! On the CPU each line also says how close it came to the machine's
//! measured ceilings: its FLOP/s over the FMA peak the bench measured (the
//! AMX or `vdpbf16ps` peak under `--cpu-math fast`) or its bytes/s over the read
//! bandwidth, whichever is larger, marked `F` or `B`. The costs are
//! `qvc_runtime::cpu`'s profile model (weights at their stored size).

use qvc_runtime::KernelTime;
use std::collections::HashMap;
use std::fmt::Write;

/// Where the entries came from, which decides their families.
#[derive(Clone, Copy)]
pub(super) enum Source {
    /// Generated GPU kernels, grouped by [`crate::compile::family_of`].
    Kernels,
    /// CPU ops, labelled "family shapes…" by the runtime.
    Ops {
        /// The ceilings the lines are measured against: FLOP/s and bytes/s.
        ceilings: Option<(f64, f64)>,
    },
}

/// The report for one profiled run: families, then the slowest entries.
pub(super) fn render(title: &str, k: &[KernelTime], source: Source) -> String {
    let mut out = String::new();
    let total: f64 = k.iter().map(|k| k.ms).sum();
    let (calls, what, flops_unit, flops_scale) = match source {
        Source::Kernels => ("launches", "kernels", "TFLOP/s", 1e12),
        Source::Ops { .. } => ("ops", "ops", "GFLOP/s", 1e9),
    };
    let _ = writeln!(out, "\nprofile: {title}: {total:.3} ms in {} {calls}", k.iter().map(|k| k.launches).sum::<u64>());
    let family = |name: &str| -> String {
        match source {
            Source::Kernels => crate::compile::family_of(name).to_string(),
            Source::Ops { .. } => name.split(' ').next().unwrap_or_default().to_string(),
        }
    };
    let mut fam: HashMap<String, KernelTime> = HashMap::new();
    for x in k {
        let f = fam.entry(family(&x.kernel)).or_default();
        f.launches += x.launches;
        f.ms += x.ms;
        f.flops += x.flops;
        f.bytes += x.bytes;
    }
    let mut fam: Vec<_> = fam.into_iter().collect();
    fam.sort_by(|a, b| b.1.ms.total_cmp(&a.1.ms));
    let ceiling_col = matches!(source, Source::Ops { ceilings: Some(_) });
    let _ = write!(
        out,
        "  {:<52} {:>8} {:>10} {:>6} {:>9} {:>9}",
        "family / entry", calls, "ms", "share", flops_unit, "GB/s"
    );
    let _ = writeln!(out, "{}", if ceiling_col { "  of ceiling" } else { "" });
    let line = |name: &str, x: &KernelTime| {
        let s = x.ms.max(1e-9) / 1e3;
        let (fl, by) = (x.flops as f64 / s, x.bytes as f64 / s);
        let mut l = format!(
            "  {:<52} {:>8} {:>10.3} {:>5.1}% {:>9.2} {:>9.1}",
            name,
            x.launches,
            x.ms,
            100.0 * x.ms / total.max(1e-12),
            fl / flops_scale,
            by / 1e9
        );
        if let Source::Ops { ceilings: Some((peak, bw)) } = source {
            let (f, b) = (fl / peak, by / bw);
            let _ = write!(l, "  {:>9.1}% {}", 100.0 * f.max(b), if f >= b { "F" } else { "B" });
        }
        l
    };
    for (f, x) in &fam {
        let _ = writeln!(out, "{}", line(f, x));
    }
    let _ = writeln!(out, "  slowest {what}:");
    for x in k.iter().take(14) {
        let name: String = x.kernel.chars().take(50).collect();
        let _ = writeln!(out, "{}", line(&format!("  {name}"), x));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kt(kernel: &str, ms: f64, flops: u64, bytes: u64) -> KernelTime {
        KernelTime { kernel: kernel.into(), launches: 2, ms, flops, bytes }
    }

    #[test]
    fn cpu_ops_group_by_their_first_word_and_name_the_binding_ceiling() {
        let k = [
            kt("linear 1x4096->12288 bf16", 3.0, 1_000_000, 3_000_000),
            kt("linear 1x4096->4096 bf16", 1.0, 0, 1_000_000),
            kt("norm rmsnorm 1x4096", 1.0, 0, 32_768),
        ];
        // Peak 1 GFLOP/s, 1 GB/s: the slowest line moves 1 GB/s (100% B)
        // and computes 0.33 GFLOP/s.
        let r = render("decode", &k, Source::Ops { ceilings: Some((1e9, 1e9)) });
        assert!(r.contains("5.000 ms in 6 ops"), "{r}");
        let fam = r.lines().find(|l| l.trim_start().starts_with("linear ")).expect("a linear family line");
        assert!(fam.contains("80.0%"), "linear is 4 of 5 ms: {fam}");
        let first = r.lines().find(|l| l.contains("1x4096->12288")).expect("the slowest line");
        assert!(first.trim_end().ends_with("B"), "bytes bind: {first}");
        assert!(r.contains("of ceiling") && r.contains("slowest ops:"), "{r}");
    }

    #[test]
    fn gpu_kernels_keep_the_kernel_families_and_no_ceiling_column() {
        let k = [kt("gemm_bf16_64x64", 2.0, 1 << 40, 0), kt("layernorm_f32", 1.0, 0, 1 << 20)];
        let r = render("vision", &k, Source::Kernels);
        assert!(r.contains("3.000 ms in 4 launches"), "{r}");
        assert!(r.lines().any(|l| l.trim_start().starts_with("gemm ")), "{r}");
        assert!(r.lines().any(|l| l.trim_start().starts_with("norm ")), "{r}");
        assert!(!r.contains("of ceiling") && r.contains("slowest kernels:"), "{r}");
    }
}
