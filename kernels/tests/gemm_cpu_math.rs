//! `gemm` follows the process-wide `CpuMath` mode (`set_cpu_math`). Its
//! own test binary with a single test, because it flips the global that
//! every other GEMM call in the process would read: the other tests call
//! the explicit `gemm_with_isa` / `gemm_with_math` entry points instead.

use qvc_ir::{DType, Elems};
use qvc_kernels::gemm::gemm_with_math;
use qvc_kernels::testutil::{Owned, Rng};
use qvc_kernels::{gemm, gemm_with_isa, set_cpu_math, CpuMath, Isa, MatRef};

#[test]
fn gemm_runs_the_mode_set_for_the_process() {
    let (m, n, k) = (37, 70, 300);
    let mut rng = Rng::new(3);
    let a = rng.vec(m * k, 1.0);
    let w = Owned::from_f32(&rng.vec(n * k, 1.0), DType::BF16);
    let (am, bm) = (MatRef::row_major(Elems::F32(&a), m, k), MatRef::row_major(w.elems(), n, k).transposed());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    let run = |f: &dyn Fn(&mut [f32])| {
        let mut c = vec![0f32; m * n];
        f(&mut c);
        bits(&c)
    };
    let exact = run(&|c| gemm_with_isa(Isa::detect(), am, bm, c, false));
    let fast = run(&|c| gemm_with_math(Isa::detect(), CpuMath::Fast, am, bm, c, false));
    // Default: exact.
    assert_eq!(run(&|c| gemm(am, bm, c, false)), exact, "default mode is not the exact path");
    set_cpu_math(CpuMath::Fast);
    let got_fast = run(&|c| gemm(am, bm, c, false));
    set_cpu_math(CpuMath::Exact);
    let got_exact = run(&|c| gemm(am, bm, c, false));
    assert_eq!(got_fast, fast, "gemm under CpuMath::Fast is not gemm_with_math(.., Fast, ..)");
    assert_eq!(got_exact, exact, "gemm after going back to Exact is not the exact path");
    if qvc_kernels::gemm::bf16_products_pay() {
        assert_ne!(fast, exact, "Fast with bf16 weights and m > 8 should round the activations here");
    } else {
        // No AVX512-BF16, or bf16 products slower than the FMAs (no AMX on
        // an Intel core): Fast keeps the exact GEMM.
        assert_eq!(fast, exact, "Fast should run the exact GEMM where bf16 products do not pay");
    }
}
