//! Grouped expert FFN throughput on a GPU at V4-Flash's shapes (hidden 4096,
//! expert width 2048): Myriad's batch-invariant kernels (gate/up with SwiGLU,
//! then down, every expert of the batch in one launch each) in each stored
//! format, and cuBLAS's BF16 GEMMs on the same shapes in the same run.
//! Prints TFLOP/s, the share of the GPU's FP32 (CUDA-core) and BF16
//! (tensor-core) peaks, weight bytes read per second and the share of the
//! memory bandwidth, and the speed relative to cuBLAS.
//!
//! `cargo run --release -p myriad-worker --features cuda --example cuda_gemm
//! [-- --device N] [--tokens N] [--format NAME]`: `--tokens` runs one of the
//! token counts, `--format` one format and no cuBLAS (a run to profile).

use myriad_worker::cuda::batch::Format;
use myriad_worker::cuda::bench::Bench;

const HIDDEN: usize = 4096;
const INTER: usize = 2048;
/// Experts in each grouped call.
const EXPERTS: usize = 8;
/// Tokens per expert: decode steps, then prefill chunks.
const TOKENS: [usize; 8] = [1, 4, 16, 64, 512, 2048, 4096, 8192];

/// What to run: the GPU, and at most one token count and one format.
struct Args {
    device: usize,
    tokens: Option<usize>,
    format: Option<Format>,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let value =
            |flag: &str| args.iter().position(|a| a == flag).map(|i| args.get(i + 1).cloned().unwrap_or_default());
        let number = |flag: &str| {
            value(flag).map(|v| v.parse::<usize>().map_err(|_| format!("{flag} takes a number, not {v:?}"))).transpose()
        };
        let format = value("--format")
            .map(|v| {
                Format::ALL
                    .into_iter()
                    .find(|f| f.name() == v)
                    .ok_or(format!("--format: no format {v:?} ({})", Format::ALL.map(Format::name).join(", ")))
            })
            .transpose()?;
        Ok(Args { device: number("--device")?.unwrap_or(0), tokens: number("--tokens")?, format })
    }
}

fn main() {
    if let Err(e) = Args::parse().map_err(Into::into).and_then(run) {
        eprintln!("cuda_gemm: {e}");
        std::process::exit(2);
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let bench = Bench::new(args.device, HIDDEN, INTER)?;
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
    let counts: Vec<usize> = args.tokens.map_or(TOKENS.to_vec(), |t| vec![t]);
    for tokens in counts {
        let flops = 2.0 * 3.0 * (EXPERTS * tokens * HIDDEN * INTER) as f64;
        let reps = (2e11 / flops).clamp(3.0, 200.0) as usize;
        // (name, seconds, bytes per weight), cuBLAS first unless one format is asked for.
        let mut rows = Vec::new();
        let cublas = match args.format {
            Some(_) => None,
            None => Some(bench.cublas_bf16(EXPERTS, tokens, reps)?),
        };
        rows.extend(cublas.map(|seconds| ("cuBLAS", seconds, 2.0)));
        for f in args.format.map_or(vec![Format::Bf16, Format::Fp8, Format::Fp4], |f| vec![f]) {
            rows.push((f.name(), bench.experts(f, EXPERTS, tokens, reps)?, f.bytes_per_weight()));
        }
        for (name, seconds, bytes_per_weight) in rows {
            let tflops = flops / seconds / 1e12;
            let gbs = (3 * EXPERTS * HIDDEN * INTER) as f64 * bytes_per_weight / seconds / 1e9;
            println!(
                "{tokens:>6} {name:>7} {tflops:>9.2} {:>7.1}% {:>7.2}% {gbs:>11.0} {:>7.1}% {:>10}",
                100.0 * tflops / peaks.fp32_tflops,
                100.0 * tflops / peaks.bf16_tflops,
                100.0 * gbs / 1e3 / peaks.memory_tbs,
                cublas.map_or("-".into(), |c| format!("{:.2}x", c / seconds)),
            );
        }
    }
    Ok(())
}
