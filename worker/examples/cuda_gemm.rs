//! Grouped expert FFN throughput on a GPU at V4-Flash's shapes (hidden 4096,
//! expert width 2048): Myriad's batch-invariant kernels (gate/up with SwiGLU,
//! then down, every expert of the batch in one launch each) in each stored
//! format, and cuBLAS's BF16 GEMMs on the same shapes in the same run.
//! Prints TFLOP/s, the share of the GPU's FP32 (CUDA-core) and BF16
//! (tensor-core) peaks, weight bytes read per second and the share of the
//! memory bandwidth, and the speed relative to cuBLAS.
//!
//! `cargo run --release -p myriad-worker --features cuda --example cuda_gemm [-- --device N]`

use myriad_worker::cuda::batch::Format;
use myriad_worker::cuda::bench::Bench;

const HIDDEN: usize = 4096;
const INTER: usize = 2048;
/// Experts in each grouped call.
const EXPERTS: usize = 8;
/// Tokens per expert: decode steps, then prefill chunks.
const TOKENS: [usize; 8] = [1, 4, 16, 64, 512, 2048, 4096, 8192];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let device = args.iter().position(|a| a == "--device").and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(0);
    if let Err(e) = run(device) {
        eprintln!("cuda_gemm: {e}");
        std::process::exit(2);
    }
}

fn run(device: usize) -> Result<(), Box<dyn std::error::Error>> {
    let bench = Bench::new(device, HIDDEN, INTER)?;
    let peaks = bench.peaks()?;
    println!(
        "{}: {} SMs at {:.2} GHz; FP32 peak {:.1} TFLOP/s, BF16 dense tensor peak {:.0} TFLOP/s, memory {:.2} TB/s",
        peaks.name, peaks.sms, peaks.clock_ghz, peaks.fp32_tflops, peaks.bf16_tflops, peaks.memory_tbs
    );
    println!("{EXPERTS} experts per call, each {HIDDEN} -> {INTER} -> {HIDDEN} (gate, up, down)");
    println!(
        "{:>6} {:>7} {:>9} {:>8} {:>8} {:>11} {:>8} {:>10}",
        "tokens", "format", "TFLOP/s", "%FP32pk", "%BF16pk", "weight GB/s", "%memory", "vs cuBLAS"
    );
    for tokens in TOKENS {
        let flops = 2.0 * 3.0 * (EXPERTS * tokens * HIDDEN * INTER) as f64;
        let reps = (2e11 / flops).clamp(3.0, 200.0) as usize;
        let cublas = bench.cublas_bf16(EXPERTS, tokens, reps)?;
        let rows =
            [("cuBLAS", None), ("bf16", Some(Format::Bf16)), ("fp8", Some(Format::Fp8)), ("fp4", Some(Format::Fp4))];
        for (name, format) in rows {
            let (seconds, bytes_per_weight) = match format {
                None => (cublas, 2.0),
                Some(f) => (bench.experts(f, EXPERTS, tokens, reps)?, f.bytes_per_weight()),
            };
            let tflops = flops / seconds / 1e12;
            let gbs = (3 * EXPERTS * HIDDEN * INTER) as f64 * bytes_per_weight / seconds / 1e9;
            println!(
                "{tokens:>6} {name:>7} {tflops:>9.2} {:>7.1}% {:>7.2}% {gbs:>11.0} {:>7.1}% {:>9.2}x",
                100.0 * tflops / peaks.fp32_tflops,
                100.0 * tflops / peaks.bf16_tflops,
                100.0 * gbs / 1e3 / peaks.memory_tbs,
                cublas / seconds,
            );
        }
    }
    Ok(())
}
