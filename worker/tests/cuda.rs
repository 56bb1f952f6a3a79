//! The CUDA backend against the CPU backend, on the model fixtures in every
//! stored format. These need an NVIDIA GPU: they are ignored in a plain
//! `cargo test` and run by `scripts/gpu_check.sh` on the device machine.
#![cfg(feature = "cuda")]

use std::path::PathBuf;

use myriad_model::ModelConfig;
use myriad_proto::expert::{ExpertBatch, ExpertId, LayerId};
use myriad_proto::spec::ExpertSpec;
use myriad_worker::{CpuBackend, Device, ExpertBackend};

/// A fixture folder: under `MYRIAD_FIXTURES` where set (scripts/gpu_check.sh
/// runs this binary on another machine than the one that built it), else
/// in this checkout.
fn fixture(name: &str) -> PathBuf {
    let root = std::env::var_os("MYRIAD_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"));
    root.join(name)
}

/// Fixtures whose routed experts are F32, BF16, block-FP8 (F32 scales) and
/// MXFP4.
const FIXTURES: [&str; 4] = ["mixed-f32", "mixed-bf16", "release-base", "release-flash"];

/// `tokens` pseudo-random hidden states of layer `layer`, each routed to
/// `k` distinct experts with pseudo-random weights.
fn batch(config: &ModelConfig, layer: u32, tokens: usize, seed: u64) -> ExpertBatch {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (hidden, experts, k) = (config.hidden_size, config.n_routed_experts, config.num_experts_per_tok);
    let values = (0..tokens * hidden).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
    let routes = (0..tokens)
        .map(|_| {
            let mut chosen: Vec<u32> = Vec::new();
            while chosen.len() < k.min(experts) {
                let e = (next() % experts as u64) as u32;
                if !chosen.contains(&e) {
                    chosen.push(e);
                }
            }
            chosen.into_iter().map(|e| (ExpertId(e), (next() % 1000) as f32 / 500.0)).collect()
        })
        .collect();
    ExpertBatch { layer: LayerId(layer), width: hidden, hidden: values, routes }
}

/// A fixture's config, and all of its experts on GPU 0.
fn on_gpu(name: &str) -> (ModelConfig, std::sync::Arc<dyn ExpertBackend>) {
    let dir = fixture(name);
    let (config, _) = ModelConfig::read(&dir).unwrap();
    (config, Device::Cuda(0).load(&dir, &ExpertSpec::all(), &[]).unwrap())
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Each pair's contribution from the GPU is the CPU backend's, within 1e-4
/// of its magnitude, and the test says whether the bits are the same.
#[test]
#[ignore = "needs an NVIDIA GPU: run by scripts/gpu_check.sh"]
fn cuda_contributions_match_the_cpu_backend() {
    for name in FIXTURES {
        let (config, gpu) = on_gpu(name);
        let cpu = CpuBackend::load(&fixture(name), &ExpertSpec::all()).unwrap();
        assert_eq!(gpu.hosted(), cpu.hosted(), "{name}");
        let (mut pairs, mut identical, mut worst) = (0, 0, 0.0f32);
        for layer in 0..config.num_hidden_layers as u32 {
            for tokens in [1, 3, 64, 300] {
                let b = batch(&config, layer, tokens, u64::from(layer) * 1000 + tokens as u64);
                let (want, got) = (cpu.run(&b).unwrap(), gpu.run(&b).unwrap());
                assert_eq!(got.len(), want.len(), "{name} layer {layer}, {tokens} tokens");
                for (w, g) in want.chunks(config.hidden_size).zip(got.chunks(config.hidden_size)) {
                    let scale = w.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                    let diff = w.iter().zip(g).fold(0.0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
                    worst = worst.max(diff);
                    pairs += 1;
                    identical += usize::from(bits(w) == bits(g));
                }
            }
        }
        println!(
            "{name}: {identical} of {pairs} contributions bit-identical to the CPU's, worst relative difference {worst:e}"
        );
        assert!(worst <= 1e-4, "{name}: worst relative difference {worst:e}");
    }
}

/// A token's contributions are the same bits alone and in a batch of any
/// size, and the same bits again on a second run.
#[test]
#[ignore = "needs an NVIDIA GPU: run by scripts/gpu_check.sh"]
fn cuda_contributions_do_not_depend_on_the_batch() {
    for name in FIXTURES {
        let (config, gpu) = on_gpu(name);
        let hidden = config.hidden_size;
        let big = batch(&config, 1, 257, 7);
        let together = gpu.run(&big).unwrap();
        assert_eq!(bits(&together), bits(&gpu.run(&big).unwrap()), "{name}: a second run differs");
        for t in [0, 1, 100, 256] {
            let alone = ExpertBatch {
                layer: big.layer,
                width: hidden,
                hidden: big.hidden[t * hidden..(t + 1) * hidden].to_vec(),
                routes: vec![big.routes[t].clone()],
            };
            let first: usize = big.routes[..t].iter().map(Vec::len).sum();
            let pairs = big.routes[t].len();
            let out = gpu.run(&alone).unwrap();
            assert_eq!(
                bits(&out),
                bits(&together[first * hidden..(first + pairs) * hidden]),
                "{name}: token {t} alone and in a batch of 257"
            );
        }
    }
}

/// Batches run at once, on queues of their own (one stream each), give the
/// bits they give alone: the queues share nothing a batch writes.
#[test]
#[ignore = "needs an NVIDIA GPU: run by scripts/gpu_check.sh"]
fn concurrent_batches_give_the_bits_they_give_alone() {
    let (config, gpu) = on_gpu("release-flash");
    let batches: Vec<ExpertBatch> = (0..16)
        .map(|i| batch(&config, i % config.num_hidden_layers as u32, 1 + 37 * i as usize, 100 + u64::from(i)))
        .collect();
    let alone: Vec<Vec<u32>> = batches.iter().map(|b| bits(&gpu.run(b).unwrap())).collect();
    for round in 0..4 {
        std::thread::scope(|s| {
            let runs: Vec<_> = batches.iter().map(|b| s.spawn(|| bits(&gpu.run(b).unwrap()))).collect();
            for (i, (run, want)) in runs.into_iter().zip(&alone).enumerate() {
                assert_eq!(&run.join().unwrap(), want, "batch {i}, round {round}: run with 15 others");
            }
        });
    }
}
