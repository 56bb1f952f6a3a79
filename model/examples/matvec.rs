//! Decode-shaped matmul speed per stored weight format: one input row
//! against 256 MiB of weights (far larger than any cache), reported as
//! weight bytes read per second next to this machine's read bandwidth,
//! measured in the same run by summing a buffer of the same size; the
//! kernel's own ceiling: one thread on 512 KiB of weights that stay in its
//! L2 cache (steadier than the streamed figure on a shared machine); and a
//! batched decode step, 12 input rows against the 256 MiB, as billions of
//! weights per second (each format's weights are f32 values to the tile).
//!
//! `cargo run --release -p myriad-model --example matvec [-- --cached-only]`

use std::time::Instant;

use myriad_model::kernels::{Weights, linear_with};
use rayon::prelude::*;

const BYTES: usize = 256 << 20;
const K: usize = 1024;
/// Weight bytes of the in-cache measurement, and how often it repeats.
const CACHED: usize = 512 << 10;
const REPEATS: usize = 20;
/// Input rows of the batched decode step.
const BATCH: usize = 12;

/// Best of `runs` timings of `f`, in seconds.
fn best(runs: usize, mut f: impl FnMut()) -> f64 {
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let mut state = 0x9E37_79B9u32;
    let mut bytes = vec![0u8; BYTES];
    for b in bytes.iter_mut() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        *b = (state >> 8) as u8;
    }
    // Valid codes only: no NaN E4M3 codes, moderate half-float exponents.
    let fp8: Vec<u8> = bytes.iter().map(|&b| if b & 0x7F == 0x7F { b & 0xF0 } else { b }).collect();
    let half: Vec<u8> =
        bytes.iter().enumerate().map(|(i, &b)| if i % 2 == 1 { (b & 0x83) | 0x38 } else { b }).collect();
    let f32s: Vec<f32> = half.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let fp8_scales = vec![0.5f32; (BYTES / K).div_ceil(128) * K.div_ceil(128)];
    let fp4_scales = vec![120u8; BYTES * 2 / 32];
    let x: Vec<f32> = (0..BATCH * K).map(|i| (i as f32 * 0.37).sin()).collect();

    // Only the in-cache figure: quick, for comparing kernel builds.
    let cached_only = std::env::args().any(|a| a == "--cached-only");
    let read = best(if cached_only { 1 } else { 5 }, || {
        let sum: u64 = bytes
            .par_chunks(1 << 20)
            .map(|c| c.chunks_exact(8).fold(0u64, |s, w| s ^ u64::from_le_bytes(w.try_into().unwrap())))
            .reduce(|| 0, |a, b| a ^ b);
        std::hint::black_box(sum);
    });
    let bandwidth = BYTES as f64 / read / 1e9;
    println!(
        "read bandwidth (xor over {} MiB, {} threads): {bandwidth:.1} GB/s",
        BYTES >> 20,
        rayon::current_num_threads()
    );
    println!(
        "{:8} {:>10} {:>12} {:>12} {:>22} {:>26}",
        "format", "ms/matvec", "GB/s read", "% of read", "1 thread, in L2: GB/s", "12 rows: Gweights/s"
    );
    let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a thread pool");
    let formats: [(&str, Weights, usize); 5] = [
        ("f32", Weights::F32(&f32s), BYTES / 4 / K),
        ("bf16", Weights::Half { bytes: &half, bf16: true }, BYTES / 2 / K),
        ("f16", Weights::Half { bytes: &half, bf16: false }, BYTES / 2 / K),
        ("fp8", Weights::Fp8 { codes: &fp8, scales: &fp8_scales, first: 0 }, BYTES / K),
        ("mxfp4", Weights::Fp4 { packed: &bytes, scales: &fp4_scales }, BYTES * 2 / K),
    ];
    for (name, w, n) in formats {
        let secs = best(if cached_only { 1 } else { 5 }, || {
            std::hint::black_box(linear_with(&x[..K], 1, w, n, K));
        });
        let batch_secs = best(if cached_only { 1 } else { 3 }, || {
            std::hint::black_box(linear_with(&x, BATCH, w, n, K));
        });
        let gbs = BYTES as f64 / secs / 1e9;
        // The kernel's own speed: one core on weights that stay in its L2.
        let cached_rows = n * CACHED / BYTES;
        let cached = w.rows(K, 0, cached_rows);
        let cached_secs = one_thread.install(|| {
            best(100, || {
                for _ in 0..REPEATS {
                    std::hint::black_box(linear_with(&x[..K], 1, cached, cached_rows, K));
                }
            })
        });
        let cached_gbs = (CACHED * REPEATS) as f64 / cached_secs / 1e9;
        let batch_rate = (n * K) as f64 / batch_secs / 1e9;
        println!(
            "{name:8} {:>10.2} {gbs:>12.1} {:>11.0}% {cached_gbs:>22.1} {batch_rate:>26.2}",
            secs * 1e3,
            100.0 * gbs / bandwidth
        );
    }
}
