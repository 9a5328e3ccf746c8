//! The process-wide `--cpu-math` mode reaches the int4 kernels through
//! `gemm` (as the CPU backend calls it): Fast sends decode-sized m to the
//! int8-activation GEMV and, on AMX CPUs, larger m to the bf16 tiles;
//! Exact (the default) never does either. Its own test binary
//! because it flips the global mode, which tests running in parallel in
//! another binary (kernels/tests/q4.rs) must not see.

use half::f16;
use qvc_ir::{Elems, Q4Ref};
use qvc_kernels::q4::{q4_linear, Q4Path, GEMV_MAX_M};
use qvc_kernels::q4_i8::{q4_gemv_i8, Q4I8Path};
use qvc_kernels::testutil::Rng;
use qvc_kernels::{gemm, set_cpu_math, CpuMath, Isa, MatRef};

/// Whether Fast runs the int4 GEMM sizes on AMX tiles here.
fn amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        Isa::detect() == Isa::Avx512 && qvc_kernels::gemm::amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[test]
fn global_mode_routes_int4_gemm() {
    let mut rng = Rng::new(5);
    let (out, inp, group) = (72usize, 256usize, 64usize);
    let groups = inp / group;
    let qweight: Vec<u32> = (0..inp / 8 * out).map(|_| rng.next_u64() as u32).collect();
    let qzeros: Vec<u32> = (0..groups * out / 8).map(|_| rng.next_u64() as u32).collect();
    let scales: Vec<f16> = (0..groups * out).map(|_| f16::from_f32(0.002 + 0.01 * rng.uniform().abs())).collect();
    let w = Q4Ref::whole(out, inp, group, &qweight, &qzeros, &scales, None);
    let path = Q4Path::for_isa(Isa::detect());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for m in [1, 5, GEMV_MAX_M, GEMV_MAX_M + 1, 33] {
        let x = rng.vec(m * inp, 1.0);
        let via_gemm = |mode: CpuMath| {
            set_cpu_math(mode);
            let mut y = vec![f32::NAN; m * out];
            gemm(
                MatRef::row_major(Elems::F32(&x), m, inp),
                MatRef::row_major(Elems::Q4(w), out, inp).transposed(),
                &mut y,
                false,
            );
            y
        };
        let (fast, exact) = (via_gemm(CpuMath::Fast), via_gemm(CpuMath::Exact));
        let mut want_exact = vec![0f32; m * out];
        q4_linear(path, &x, m, &w, &mut want_exact, false);
        assert_eq!(bits(&exact), bits(&want_exact), "m={m}: Exact mode through gemm is not the exact kernel");
        if m <= GEMV_MAX_M {
            let mut want = vec![0f32; m * out];
            q4_gemv_i8(Q4I8Path::for_q4(path), &x, m, &w, &mut want, false);
            assert_eq!(bits(&fast), bits(&want), "m={m}: Fast mode through gemm is not the int8 GEMV");
            assert_ne!(bits(&fast), bits(&exact), "m={m}: Fast mode gave the exact result");
        } else if amx() {
            // On AMX tiles: activations and dequantized weights rounded to
            // bf16 (each up to 2⁻⁹ relative), products summed in f32.
            let e = qvc_kernels::testutil::rel_l2(&fast, &exact);
            assert!(e > 0.0 && e < 1e-2, "m={m}: Fast mode on AMX is {e} from exact");
        } else {
            assert_eq!(bits(&fast), bits(&exact), "m={m}: Fast mode above GEMV_MAX_M is not exact");
        }
    }
    set_cpu_math(CpuMath::Exact);
}
