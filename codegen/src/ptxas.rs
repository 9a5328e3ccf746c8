//! The optional `ptxas` check: assemble PTX for a target with NVIDIA's
//! assembler and read back registers, spills and shared memory.
//!
//! `ptxas` is found through `$QVC_PTXAS`, then `$PATH`, then the
//! `.tools/bin/ptxas` that `.ci/run` installs at the workspace root. When none
//! is found the check is skipped (and says so); when one is found, any error
//! or warning is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::ptx::Target;

/// Resource usage of one kernel as `ptxas -v` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelUsage {
    pub name: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub shared_bytes: u32,
    pub stack_bytes: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum PtxasError {
    #[error("could not run ptxas at {path}: {source}")]
    Spawn { path: PathBuf, source: std::io::Error },
    #[error("ptxas rejected the PTX for {target}:\n{log}")]
    Rejected { target: &'static str, log: String },
    #[error("ptxas warned for {target} (warnings are errors here):\n{log}")]
    Warned { target: &'static str, log: String },
    #[error("temporary file: {0}")]
    Io(#[from] std::io::Error),
}

/// Where `ptxas` is, if anywhere.
pub fn find_ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("QVC_PTXAS") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("ptxas");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    // The workspace root is the parent of this crate's manifest directory.
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/ptxas");
    local.is_file().then_some(local)
}

/// For tests: the ptxas to use, or `None` (the caller prints that the check
/// was skipped). With `QVC_REQUIRE_PTXAS=1` (set by `.ci/run`) a missing
/// ptxas panics instead, so CI cannot silently skip the check.
pub fn for_tests() -> Option<PathBuf> {
    let found = find_ptxas();
    if found.is_none() && std::env::var("QVC_REQUIRE_PTXAS").is_ok_and(|v| v == "1") {
        panic!("QVC_REQUIRE_PTXAS=1 but ptxas was not found: run scripts/install-ptxas.sh or set QVC_PTXAS");
    }
    found
}

/// Assembles `ptx` for `target` and returns per-kernel usage. Any warning
/// fails: a warning from ptxas (an unused param is not one; a misaligned
/// vector access or a deprecated form is) means the code is not what we meant.
pub fn assemble(ptxas: &Path, ptx: &str, target: Target) -> Result<Vec<KernelUsage>, PtxasError> {
    let dir = std::env::temp_dir().join(format!("qvc-ptxas-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir)?;
    let src = dir.join("k.ptx");
    std::fs::write(&src, ptx)?;
    let out = Command::new(ptxas)
        .arg("-v")
        .arg(format!("-arch={}", target.name()))
        .arg("-o")
        .arg(dir.join("k.cubin"))
        .arg(&src)
        .output()
        .map_err(|source| PtxasError::Spawn { path: ptxas.to_path_buf(), source })?;
    let _ = std::fs::remove_dir_all(&dir);
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(PtxasError::Rejected { target: target.name(), log });
    }
    if log.lines().any(|l| l.contains("warning")) {
        return Err(PtxasError::Warned { target: target.name(), log });
    }
    Ok(parse_usage(&log))
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Parses `ptxas -v` output:
/// ```text
/// ptxas info    : Compiling entry function 'k' for 'sm_80'
/// ptxas info    : Function properties for k
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 10 registers, 4096 bytes smem, 360 bytes cmem[0]
/// ```
pub fn parse_usage(log: &str) -> Vec<KernelUsage> {
    let mut out: Vec<KernelUsage> = vec![];
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(KernelUsage { name, ..Default::default() });
            continue;
        }
        let Some(k) = out.last_mut() else { continue };
        let words: Vec<&str> = line.split([' ', ',']).filter(|w| !w.is_empty()).collect();
        for (i, w) in words.iter().enumerate() {
            let num = || i.checked_sub(1).and_then(|j| words[j].parse::<u32>().ok()).unwrap_or(0);
            let next = words.get(i + 1).copied().unwrap_or("");
            match (*w, next) {
                ("registers", _) => k.registers = num(),
                ("stack", "frame") => {
                    k.stack_bytes = words.get(i.wrapping_sub(2)).and_then(|s| s.parse().ok()).unwrap_or(0)
                }
                ("spill", "stores") => {
                    k.spill_stores = words.get(i.wrapping_sub(2)).and_then(|s| s.parse().ok()).unwrap_or(0)
                }
                ("spill", "loads") => {
                    k.spill_loads = words.get(i.wrapping_sub(2)).and_then(|s| s.parse().ok()).unwrap_or(0)
                }
                ("smem", _) => k.shared_bytes = words.get(i - 2).and_then(|s| s.parse().ok()).unwrap_or(0),
                _ => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_verbose_output() {
        let log = "ptxas info    : 0 bytes gmem\n\
                   ptxas info    : Compiling entry function 'gemm_a' for 'sm_80'\n\
                   ptxas info    : Function properties for gemm_a\n\
                   \x20   8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n\
                   ptxas info    : Used 128 registers, used 0 barriers, 24576 bytes smem, 368 bytes cmem[0]\n\
                   ptxas info    : Compiling entry function 'norm' for 'sm_80'\n\
                   ptxas info    : Used 20 registers, 380 bytes cmem[0]\n";
        let u = parse_usage(log);
        assert_eq!(u.len(), 2);
        assert_eq!(
            u[0],
            KernelUsage {
                name: "gemm_a".into(),
                registers: 128,
                spill_stores: 12,
                spill_loads: 16,
                shared_bytes: 24576,
                stack_bytes: 8
            }
        );
        assert_eq!(u[1].registers, 20);
        assert_eq!(u[1].shared_bytes, 0);
    }
}
