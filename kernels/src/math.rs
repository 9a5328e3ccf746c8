//! How exactly the CPU kernels multiply: the process-wide [`CpuMath`] mode.
//!
//! The default, [`CpuMath::Exact`], multiplies every weight with an f32
//! activation in f32 (16-bit weights widened exactly, int4 weights
//! dequantized exactly), so CPU results match the reference to f32 rounding
//! (parity ≤ 1e-4 on the fixtures). [`CpuMath::Fast`] lets kernels round the
//! activations to a narrower type where the CPU multiplies that type much
//! faster, as llama.cpp always does: bf16 activations against bf16 weights
//! (`vdpbf16ps`, AVX512-BF16, or AMX tiles) and int8 activations against
//! int4 weights (`vpdpbusd`, AVX512-VNNI / AVX-VNNI). Accumulation stays
//! f32/i32. A kernel without a fast variant on this CPU simply runs its
//! exact one, and so does one whose fast variant would be slower here
//! (`gemm::bf16_products_pay`, `gemm::bf16_dots_pay`: `vdpbf16ps` at half
//! the FMA rate).
//!
//! A process-wide setting rather than a per-call argument because it is a
//! user's choice for the whole run (`--cpu-math fast`), read by kernels deep
//! below the graph executor; tests that compare modes call the `*_with_*`
//! kernel entry points instead of flipping it.

use std::sync::atomic::{AtomicU8, Ordering};

/// Arithmetic the CPU kernels may use; see the module docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuMath {
    /// f32 products of exactly widened weights and f32 activations.
    #[default]
    Exact,
    /// Activations rounded to bf16 (for 16-bit weights) or int8 per block
    /// (for int4 weights) where the CPU has the instructions for it.
    Fast,
}

impl CpuMath {
    /// The name `--cpu-math` takes.
    pub fn name(self) -> &'static str {
        match self {
            CpuMath::Exact => "exact",
            CpuMath::Fast => "fast",
        }
    }

    /// Parses `exact` or `fast`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "exact" => Some(CpuMath::Exact),
            "fast" => Some(CpuMath::Fast),
            _ => None,
        }
    }
}

static MODE: AtomicU8 = AtomicU8::new(0);

/// Sets the mode for every later kernel call in this process.
pub fn set_cpu_math(mode: CpuMath) {
    MODE.store(mode as u8, Ordering::Relaxed);
}

/// The mode kernels run in now.
pub fn cpu_math() -> CpuMath {
    if MODE.load(Ordering::Relaxed) == CpuMath::Fast as u8 {
        CpuMath::Fast
    } else {
        CpuMath::Exact
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in [CpuMath::Exact, CpuMath::Fast] {
            assert_eq!(CpuMath::parse(m.name()), Some(m));
        }
        assert_eq!(CpuMath::parse("FAST"), Some(CpuMath::Fast));
        assert_eq!(CpuMath::parse("bf16"), None);
    }
}
