//! The CUDA kernels checked without a GPU: `emulate.cpp` runs the source
//! the backend compiles (F16's one line of PTX swapped for a C++ conversion)
//! on the CPU, each GPU thread an OS thread and each warp shuffle an
//! exchange through a barrier, and its outputs must be the CPU backend's
//! kernels' bits for every stored format, SwiGLU and the weighting. Needs a
//! C++20 compiler (`c++`; scripts/test.sh installs g++).

use std::path::Path;
use std::process::Command;

use myriad_model::kernels::{Weights, linear_with, silu};
use myriad_model::quant;

use super::source;

/// Weight rows, inputs (not a multiple of 16 or 128: a tail and partial
/// FP8 blocks), and inputs of the MXFP4 matrix (a multiple of 32).
const N: usize = 40;
const K: usize = 290;
const K4: usize = 288;
const LIMIT: f32 = 7.0;

struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [-scale, scale], in steps of scale / 10000.
    fn value(&mut self, scale: f32) -> f32 {
        (self.next() % 20001) as f32 / 10000.0 * scale - scale
    }
}

fn put(dir: &Path, name: &str, bytes: impl IntoIterator<Item = u8>) {
    std::fs::write(dir.join(name), bytes.into_iter().collect::<Vec<u8>>()).unwrap();
}

fn floats(v: &[f32]) -> impl Iterator<Item = u8> + '_ {
    v.iter().flat_map(|x| x.to_le_bytes())
}

#[test]
fn the_kernels_compute_the_cpu_bits_under_emulation() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let asm = r#"asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));"#;
    let kernels = source();
    assert!(kernels.contains(asm), "experts.cu converts F16 another way now: update the emulation");
    std::fs::write(dir.join("experts.cu"), kernels.replace(asm, "f = half_to_float(h);")).unwrap();
    std::fs::write(dir.join("emulate.cpp"), include_str!("emulate.cpp")).unwrap();

    let mut random = Random(0x1234_5678_9ABC_DEF1);
    let x: Vec<f32> = (0..13 * K).map(|_| random.value(1.0)).collect();
    let x4: Vec<f32> = (0..13 * K4).map(|_| random.value(1.0)).collect();
    let f32s: Vec<f32> = (0..N * K).map(|_| random.value(0.5)).collect();
    let bf16: Vec<u8> = (0..N * K).flat_map(|_| ((random.value(0.5).to_bits() >> 16) as u16).to_le_bytes()).collect();
    // Exponents up to 15 (no infinity or NaN), subnormals included.
    let f16: Vec<u8> = (0..N * K).flat_map(|_| (random.next() as u16 & 0xBFFF).to_le_bytes()).collect();
    let fp8: Vec<u8> =
        (0..N * K).map(|_| random.next() as u8).map(|c| if c & 0x7F == 0x7F { c & 0xF0 } else { c }).collect();
    // F32 block scales as in the Base layout: products of codes and scales round.
    let fp8_scales: Vec<f32> = (0..N.div_ceil(128) * K.div_ceil(128)).map(|b| 0.00123 * (b + 1) as f32).collect();
    let fp4: Vec<u8> = (0..N * K4 / 2).map(|_| random.next() as u8).collect();
    let fp4_scales: Vec<u8> = (0..N * K4 / 32).map(|_| 115 + (random.next() % 20) as u8).collect();
    for (name, v) in [("x", &x), ("x4", &x4), ("f32", &f32s), ("fp8_scales", &fp8_scales)] {
        put(dir, name, floats(v));
    }
    for (name, v) in [("bf16", &bf16), ("f16", &f16), ("fp8", &fp8), ("fp4", &fp4), ("fp4_scales", &fp4_scales)] {
        put(dir, name, v.iter().copied());
    }
    put(dir, "e4m3", floats(&(0..=255u8).map(quant::e4m3).collect::<Vec<_>>()));
    put(dir, "e2m1", floats(&(0..16u8).map(quant::e2m1).collect::<Vec<_>>()));
    put(dir, "e8m0", floats(&(0..=255u8).map(|c| quant::e8m0(c).unwrap_or(f32::NAN)).collect::<Vec<_>>()));
    for rows in [1, 3, 13] {
        let formats = [
            ("f32", Weights::F32(&f32s)),
            ("bf16", Weights::Half { bytes: &bf16, bf16: true }),
            ("f16", Weights::Half { bytes: &f16, bf16: false }),
            ("fp8", Weights::Fp8 { codes: &fp8, scales: &fp8_scales, first: 0 }),
        ];
        for (name, w) in formats {
            put(dir, &format!("{name}_{rows}"), floats(&linear_with(&x[..rows * K], rows, w, N, K)));
        }
        let w = Weights::Fp4 { packed: &fp4, scales: &fp4_scales };
        put(dir, &format!("fp4_{rows}"), floats(&linear_with(&x4[..rows * K4], rows, w, N, K4)));
    }
    // SwiGLU across the range where exp over- and underflows.
    let gate: Vec<f32> = (0..5000).map(|i| (i as f32 - 2500.0) * 0.037 + random.value(0.01)).collect();
    let up: Vec<f32> = (0..5000).map(|_| random.value(10.0)).collect();
    let act: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| silu(g.min(LIMIT)) * u.clamp(-LIMIT, LIMIT)).collect();
    put(dir, "gate", floats(&gate));
    put(dir, "up", floats(&up));
    put(dir, "swiglu", floats(&act));
    // Three members' rows weighed into slots 2, 0 and 1.
    let (slot, weight) = ([2i32, 0, 1], [0.75f32, 1.25, -0.5]);
    let y: Vec<f32> = (0..3 * N).map(|_| random.value(3.0)).collect();
    let mut weighed = vec![0.0f32; 3 * N];
    for (r, (&s, &w)) in slot.iter().zip(&weight).enumerate() {
        for c in 0..N {
            weighed[s as usize * N + c] = y[r * N + c] * w;
        }
    }
    put(dir, "y", floats(&y));
    put(dir, "weight", floats(&weight));
    put(dir, "slot", slot.iter().flat_map(|s| s.to_le_bytes()));
    put(dir, "weighed", floats(&weighed));

    let binary = dir.join("emulate");
    let compiled = Command::new("c++")
        .args(["-std=c++20", "-O1", "-ffp-contract=off", "-pthread", "-o"])
        .arg(&binary)
        .arg(dir.join("emulate.cpp"))
        .output()
        .expect("run c++ (scripts/test.sh installs g++)");
    assert!(compiled.status.success(), "c++ failed:\n{}", String::from_utf8_lossy(&compiled.stderr));
    let run = Command::new(&binary).arg(dir).args([N, K, K4].map(|v| v.to_string())).output().unwrap();
    let report = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "the emulated kernels differ from the CPU's:\n{report}");
    assert_eq!(report.lines().count(), 3 * 5 + 2, "{report}");
}
