use half::bf16;
use qvc_ir::Elems;
use qvc_kernels::*;
use std::time::Instant;
fn main() {
    let (n, k) = (4096, 4096);
    let x: Vec<f32> = (0..256 * k).map(|i| (i % 7) as f32).collect();
    let w: Vec<bf16> = (0..n * k)
        .map(|i| bf16::from_f32((i % 13) as f32))
        .collect();
    let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
    let mut y = vec![0.0; 256 * n];
    for &m in &[6usize, 16, 64, 256] {
        for (name, b) in [
            (
                "bf16 T",
                MatRef::row_major(Elems::BF16(&w), n, k).transposed(),
            ),
            (
                "f32 T",
                MatRef::row_major(Elems::F32(&wf), n, k).transposed(),
            ),
            ("bf16 N", MatRef::row_major(Elems::BF16(&w), k, n)),
        ] {
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                gemm(
                    MatRef::row_major(Elems::F32(&x[..m * k]), m, k),
                    b,
                    &mut y[..m * n],
                    false,
                );
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "m={m} {name}: {:.2} ms  {:.1} GFLOP/s",
                best * 1e3,
                gemm_flops(m, n, k) as f64 / best / 1e9
            );
        }
    }
}
