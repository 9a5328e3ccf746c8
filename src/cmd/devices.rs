//! `qvc devices`: the CPU threads and the GPUs the NVIDIA driver sees.

use anyhow::Result;

pub fn run() -> Result<()> {
    println!("cpu: {} threads (--device cpu)", rayon::current_num_threads());
    match qvc_runtime::cuda::gpus() {
        Ok(gpus) if gpus.is_empty() => println!("cuda: the NVIDIA driver is present but sees no GPU"),
        Ok(gpus) => {
            for g in gpus {
                let target = g.target().map_or("none (qvc generates sm_80 and sm_90)", |t| t.name());
                println!(
                    "cuda:{}: {}, compute {}.{}, {} SMs, {:.1} GiB; compile target {target} (--device cuda:{})",
                    g.ordinal,
                    g.name,
                    g.compute.0,
                    g.compute.1,
                    g.multiprocessors,
                    g.memory_bytes as f64 / (1u64 << 30) as f64,
                    g.ordinal
                );
            }
        }
        Err(e) => println!("cuda: {e}"),
    }
    Ok(())
}
