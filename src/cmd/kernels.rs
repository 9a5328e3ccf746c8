//! `qvc kernels`: the GPU kernels of the full-size model, their PTX, launch
//! shapes, work and H100 time floors, optionally checked with ptxas.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct KernelsArgs {
    /// Only kernels whose family or name contains this text (e.g. `gemm`, `flash`, `d104`).
    #[arg(long)]
    filter: Option<String>,
    /// GPU architecture the PTX is printed for.
    #[arg(long, default_value = "sm_90", value_parser = ["sm_80", "sm_90"])]
    target: String,
    /// Write the listed kernels as one PTX module to this file.
    #[arg(long, value_name = "FILE")]
    ptx: Option<PathBuf>,
    /// Overwrite the --ptx file if it exists.
    #[arg(long)]
    force: bool,
    /// Assemble with ptxas ($QVC_PTXAS, PATH, or .tools/bin from scripts/install-ptxas.sh) and show its usage.
    #[arg(long)]
    ptxas: bool,
}

/// H100 ceilings measured on a lent H100 80GB HBM3 (TOOLCHAIN.md): the best
/// bf16 GEMM and a device-to-device copy. A kernel cannot beat
/// max(flops / FLOP/s, bytes / B/s); the column is that floor, not a timing.
const H100_BF16_FLOPS: f64 = 782e12;
const H100_BYTES_PER_S: f64 = 2985e9;

pub fn run(a: KernelsArgs) -> Result<()> {
    use qvc_codegen::{ptxas, Module, Target};
    let target = Target::parse(&a.target).context("unknown target")?;
    let entries: Vec<_> = qvc_kernels::gpu::catalog::model_kernels()
        .into_iter()
        .filter(|e| {
            a.filter.as_ref().is_none_or(|f| e.family.contains(f.as_str()) || e.spec.name().contains(f.as_str()))
        })
        .collect();
    if entries.is_empty() {
        bail!("no kernel matches --filter {:?}; run `qvc kernels` to see them all", a.filter.unwrap_or_default());
    }
    let kernels: Vec<_> = entries.iter().map(|e| e.spec.build()).collect();
    let module = Module::new(target, kernels.clone());
    let text = module.print();
    if let Some(path) = &a.ptx {
        if path.exists() && !a.force {
            bail!("{} exists; pass --force to overwrite it", path.display());
        }
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!(
            "wrote {} kernels ({} bytes of PTX for {}) to {}",
            kernels.len(),
            text.len(),
            target.name(),
            path.display()
        );
    }
    let usage = if a.ptxas {
        let exe = ptxas::find_ptxas()
            .context("ptxas not found: set QVC_PTXAS, put it on PATH, or run scripts/install-ptxas.sh")?;
        Some(ptxas::assemble(&exe, &text, target)?)
    } else {
        None
    };
    let w = kernels.iter().map(|k| k.name.len()).max().unwrap_or(6);
    println!(
        "{:<16} {:<w$} {:>16} {:>6} {:>9} {:>9} {:>9}{}",
        "family",
        "kernel",
        "grid",
        "block",
        "GFLOP",
        "MB",
        "floor µs",
        if usage.is_some() { "   regs  spill  smem" } else { "" }
    );
    let (mut total_floor, mut total_flops, mut total_bytes) = (0.0, 0u64, 0u64);
    for (e, k) in entries.iter().zip(&kernels) {
        let l = e.spec.launch();
        let c = e.spec.cost();
        let floor = (c.flops as f64 / H100_BF16_FLOPS).max(c.bytes as f64 / H100_BYTES_PER_S) * 1e6;
        total_floor += floor;
        total_flops += c.flops;
        total_bytes += c.bytes;
        let grid = format!("{}x{}x{}", l.grid[0], l.grid[1], l.grid[2]);
        let mut line = format!(
            "{:<16} {:<w$} {:>16} {:>6} {:>9.3} {:>9.2} {:>9.2}",
            e.family,
            k.name,
            grid,
            l.threads_per_block(),
            c.flops as f64 / 1e9,
            c.bytes as f64 / 1e6,
            floor
        );
        if let Some(u) = usage.as_ref().and_then(|u| u.iter().find(|u| u.name == k.name)) {
            line += &format!(" {:>6} {:>6} {:>5}", u.registers, u.spill_stores + u.spill_loads, u.shared_bytes);
        }
        println!("{line}");
    }
    println!(
        "{} kernels for {}: {:.1} GFLOP, {:.1} MB in all; floors use the H100 ceilings measured for TOOLCHAIN.md \
         ({:.0} TFLOP/s bf16, {:.0} GB/s); each kernel's floor counts once, {:.0} µs summed.",
        entries.len(),
        target.name(),
        total_flops as f64 / 1e9,
        total_bytes as f64 / 1e6,
        H100_BF16_FLOPS / 1e12,
        H100_BYTES_PER_S / 1e9,
        total_floor
    );
    Ok(())
}
