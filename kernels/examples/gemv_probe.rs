use half::bf16;
use qvc_ir::Elems;
use qvc_kernels::*;
fn main() {
    let (m, n, k) = (256, 4096, 4096);
    let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32).collect();
    let w: Vec<bf16> = (0..n * k).map(|i| bf16::from_f32((i % 13) as f32)).collect();
    let mut y = vec![0.0; m * n];
    for _ in 0..10 {
        gemm(MatRef::row_major(Elems::F32(&x), m, k), MatRef::row_major(Elems::BF16(&w), n, k).transposed(), &mut y, false);
    }
}
