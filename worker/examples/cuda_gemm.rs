//! Expert GEMM throughput on a GPU at V4-Flash's shapes (hidden 4096, expert
//! width 2048): Myriad's batch-invariant kernel in each stored format, and
//! cuBLAS's BF16 GEMM on the same shapes in the same run. Prints TFLOP/s, the
//! share of the GPU's FP32 (CUDA-core) and BF16 (tensor-core) peaks, weight
//! bytes read per second and the share of the memory bandwidth.
//!
//! `cargo run --release -p myriad-worker --features cuda --example cuda_gemm [-- --device N]`

use myriad_worker::cuda::bench::{Bench, Format};

/// `(out, in)` of the gate/up and the down projections.
const SHAPES: [(usize, usize); 2] = [(2048, 4096), (4096, 2048)];
/// Tokens per expert: decode steps, then prefill chunks.
const TOKENS: [usize; 6] = [1, 8, 64, 512, 2048, 8192];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let device = args.iter().position(|a| a == "--device").and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(0);
    if let Err(e) = run(device) {
        eprintln!("cuda_gemm: {e}");
        std::process::exit(2);
    }
}

fn run(device: usize) -> Result<(), Box<dyn std::error::Error>> {
    let bench = Bench::new(device)?;
    let peaks = bench.peaks()?;
    println!(
        "{}: {} SMs at {:.2} GHz; FP32 peak {:.1} TFLOP/s, BF16 dense tensor peak {:.0} TFLOP/s, memory {:.2} TB/s",
        peaks.name, peaks.sms, peaks.clock_ghz, peaks.fp32_tflops, peaks.bf16_tflops, peaks.memory_tbs
    );
    println!(
        "{:>6} {:>11} {:>7} {:>9} {:>8} {:>8} {:>10} {:>8} {:>11}",
        "tokens", "out x in", "format", "TFLOP/s", "%FP32pk", "%BF16pk", "weight GB/s", "%memory", "vs cuBLAS"
    );
    for (n, k) in SHAPES {
        for tokens in TOKENS {
            let flops = 2.0 * (tokens * n * k) as f64;
            let reps = (2e11 / flops).clamp(3.0, 200.0) as usize;
            let cublas = bench.cublas_bf16(n, k, tokens, reps)?;
            let rows = [
                ("cuBLAS", None),
                ("bf16", Some(Format::Bf16)),
                ("fp8", Some(Format::Fp8)),
                ("fp4", Some(Format::Fp4)),
                ("f32", Some(Format::F32)),
            ];
            for (name, format) in rows {
                let (seconds, bytes_per_weight) = match format {
                    None => (cublas, 2.0),
                    Some(f) => (bench.matmul(f, n, k, tokens, reps)?, f.bytes_per_weight()),
                };
                let tflops = flops / seconds / 1e12;
                let gbs = (n * k) as f64 * bytes_per_weight / seconds / 1e9;
                println!(
                    "{tokens:>6} {:>11} {name:>7} {tflops:>9.2} {:>7.1}% {:>7.2}% {gbs:>10.0} {:>7.1}% {:>10.2}x",
                    format!("{n}x{k}"),
                    100.0 * tflops / peaks.fp32_tflops,
                    100.0 * tflops / peaks.bf16_tflops,
                    100.0 * gbs / 1e3 / peaks.memory_tbs,
                    cublas / seconds,
                );
            }
        }
    }
    Ok(())
}
