//! The CUDA kernels checked without a GPU: `emulate.cpp` runs the source
//! the backend compiles (F16's one line of PTX swapped for a C++ conversion)
//! on the CPU, each GPU thread an OS thread and each warp shuffle an
//! exchange through a barrier. Batches are laid out by the backend's own
//! [`Plan`] and must come out as the bits of the CPU backend's
//! `moe::contributions`: every stored format, formats mixed in one batch,
//! experts with more tokens than a block takes, gates where `exp` over- and
//! underflows. Needs a C++20 compiler (`c++`; scripts/test.sh installs g++).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use myriad_model::stored::{Stored, StoredMatrix};
use myriad_model::tensor::{MappedBytes, Tensor};
use myriad_model::weights::{ExpertWeights, Linear};
use myriad_model::{ModelConfig, moe};
use myriad_proto::expert::{ExpertBatch, ExpertId, LayerId};

use super::batch::{At, Format, Kind, Place, Plan, stored, tables};
use super::{MAX_BLOCKS_Y, dims, source};

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

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// `bytes` as a checkpoint holds them: read-only mapped memory.
fn mapped(bytes: &[u8]) -> MappedBytes {
    let mut map = memmap2::MmapMut::map_anon(bytes.len().max(1)).unwrap();
    map[..bytes.len()].copy_from_slice(bytes);
    MappedBytes::new(Arc::new(map.make_read_only().unwrap()), 0, bytes.len()).unwrap()
}

/// A random `[n, k]` matrix in `format`, its f32 values (or block scales)
/// within `scale`.
fn matrix(random: &mut Random, format: Format, n: usize, k: usize, scale: f32) -> Linear {
    let stored = match format {
        Format::F32 => Stored::F32(Tensor::owned((0..n * k).map(|_| random.value(scale)).collect(), vec![n, k])),
        Format::Bf16 => {
            let bytes = (0..n * k).flat_map(|_| ((random.value(scale).to_bits() >> 16) as u16).to_le_bytes());
            Stored::Half { bytes: mapped(&bytes.collect::<Vec<u8>>()), bf16: true }
        }
        // Exponents up to 15 (no infinity or NaN), subnormals included.
        Format::F16 => {
            let bytes = (0..n * k).flat_map(|_| (random.next() as u16 & 0xBFFF).to_le_bytes());
            Stored::Half { bytes: mapped(&bytes.collect::<Vec<u8>>()), bf16: false }
        }
        Format::Fp8 => {
            let codes: Vec<u8> =
                random.bytes(n * k).into_iter().map(|c| if c & 0x7F == 0x7F { c & 0xF0 } else { c }).collect();
            // F32 block scales as in the Base layout: products of codes and scales round.
            let scales = (0..n.div_ceil(128) * k.div_ceil(128)).map(|b| scale * 0.00123 * (b + 1) as f32).collect();
            Stored::Fp8 { codes: mapped(&codes), scales }
        }
        Format::Fp4 => {
            let scales: Vec<u8> = (0..n * k / 32).map(|_| 115 + (random.next() % 20) as u8).collect();
            Stored::Fp4 { packed: random.bytes(n * k / 2), scales: mapped(&scales) }
        }
    };
    Linear { w: StoredMatrix { stored, out: n, inp: k } }
}

/// What the emulated GPU's memory holds: every expert's matrices, at the
/// offsets their [`At`]s name (the harness adds the image's address).
#[derive(Default)]
struct Image(Vec<u8>);

impl Image {
    fn put(&mut self, bytes: &[u8]) -> u64 {
        let at = self.0.len().div_ceil(16) * 16;
        self.0.resize(at, 0);
        self.0.extend_from_slice(bytes);
        at as u64
    }

    fn place(&mut self, w: &Linear) -> At {
        let (format, weights, scales) = stored(w.w.weights());
        let weights = self.put(weights);
        At { format, weights, scales: scales.map_or(0, |s| self.put(s)) }
    }
}

/// `values` into `path`, as the harness reads them (this host's order).
fn write_f32s(path: &Path, values: &[f32]) {
    std::fs::write(path, bytemuck::cast_slice::<f32, u8>(values)).unwrap();
}

/// The harness, compiled once.
fn harness(dir: &Path) -> PathBuf {
    let asm = r#"asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));"#;
    let kernels = source();
    assert!(kernels.contains(asm), "experts.cu converts F16 another way now: update the emulation");
    std::fs::write(dir.join("experts.cu"), kernels.replace(asm, "f = half_to_float(h);")).unwrap();
    std::fs::write(dir.join("emulate.cpp"), include_str!("emulate.cpp")).unwrap();
    let binary = dir.join("emulate");
    let compiled = Command::new("c++")
        .args(["-std=c++20", "-O1", "-ffp-contract=off", "-pthread", "-o"])
        .arg(&binary)
        .arg(dir.join("emulate.cpp"))
        .output()
        .expect("run c++ (scripts/test.sh installs g++)");
    assert!(compiled.status.success(), "c++ failed:\n{}", String::from_utf8_lossy(&compiled.stderr));
    for (name, table) in ["e4m3", "e2m1", "e8m0"].into_iter().zip(tables()) {
        write_f32s(&dir.join(name), &table);
    }
    binary
}

/// Experts `(gate/up format, down format, gate scale)` of one shape, and a
/// batch of `tokens` over them: every token goes to expert 1 (more tokens
/// than one block takes) and to one or two others.
/// `blocks_y`: at most this many blocks along the grid's y (tokens).
fn check(
    dir: &Path,
    binary: &Path,
    name: &str,
    experts: &[(Format, Format, f32)],
    (hidden, inter): (usize, usize),
    blocks_y: u32,
) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mixed-f32");
    let mut config = ModelConfig::read(&fixture).unwrap().0;
    (config.hidden_size, config.moe_intermediate_size) = (hidden, inter);
    let mut random = Random(0x1234_5678_9ABC_DEF1 ^ hidden as u64);
    let weights: Vec<ExpertWeights> = experts
        .iter()
        .map(|&(up, down, scale)| ExpertWeights {
            w1: matrix(&mut random, up, inter, hidden, scale),
            w2: matrix(&mut random, down, hidden, inter, 0.5),
            w3: matrix(&mut random, up, inter, hidden, 0.5),
        })
        .collect();
    let tokens = 13;
    let count = experts.len() as u64;
    let routes: Vec<Vec<(usize, f32)>> = (0..tokens)
        .map(|t| {
            let mut route = vec![(1, random.value(2.0))];
            for e in [(t * 3) as u64 % count, random.next() % count] {
                if !route.iter().any(|r| r.0 == e as usize) {
                    route.push((e as usize, random.value(2.0)));
                }
            }
            route
        })
        .collect();
    let x: Vec<f32> = (0..tokens * hidden).map(|_| random.value(1.0)).collect();
    let want = moe::contributions(|e| weights.get(e), &config, &x, &routes).unwrap();

    let mut image = Image::default();
    let places: HashMap<ExpertId, Place> = weights
        .iter()
        .enumerate()
        .map(|(e, w)| {
            (ExpertId(e as u32), Place { w1: image.place(&w.w1), w2: image.place(&w.w2), w3: image.place(&w.w3) })
        })
        .collect();
    let batch = ExpertBatch {
        layer: LayerId(0),
        width: hidden,
        hidden: x,
        routes: routes.iter().map(|r| r.iter().map(|&(e, w)| (ExpertId(e as u32), w)).collect()).collect(),
    };
    let plan = Plan::new(&batch, |e| places[&e]);
    let mut upload = vec![0u8; plan.bytes];
    plan.write(&mut upload, &batch);
    let mut lines = vec![format!(
        "{hidden} {inter} {} {} {} {} {} {} {}",
        config.swiglu_limit.to_bits(),
        plan.members(),
        plan.slots,
        plan.x_at,
        plan.token_at,
        plan.slot_at,
        plan.weight_at
    )];
    for l in &plan.launches {
        let (kind, n) = if l.kind == Kind::GateUp { ("gate_up", inter) } else { ("down", hidden) };
        let ((gx, gy, gz), (bx, by, _)) = dims(l, n, blocks_y);
        lines.push(format!("{kind} {} {} {gx} {gy} {gz} {bx} {by}", l.format.name(), l.first));
    }
    let case = dir.join(name);
    std::fs::create_dir_all(&case).unwrap();
    std::fs::write(case.join("plan"), lines.join("\n") + "\n").unwrap();
    std::fs::write(case.join("image"), &image.0).unwrap();
    std::fs::write(case.join("upload"), &upload).unwrap();
    write_f32s(&case.join("expected"), &want);
    let run = Command::new(binary).arg(dir).arg(name).output().unwrap();
    let report = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{name}: the emulated kernels differ from the CPU's:\n{report}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(report.contains(&format!("{} of {} bit-identical", want.len(), want.len())), "{name}: {report}");
}

#[test]
fn the_kernels_compute_the_cpu_bits_under_emulation() {
    let dir = tempfile::tempdir().unwrap();
    let binary = harness(dir.path());
    // Widths that leave a tail of lanes (each weight loaded alone), partial
    // FP8 blocks and blocks with rows past the matrix; then widths in
    // multiples of 16 (eight weights a load). Each is one batch holding
    // four formats (so several launches of each kind, two experts in one of
    // them, and a down projection in another format than its gate and up);
    // the F32 expert's gates reach ±100, where exp saturates.
    let mixed = [
        (Format::F32, Format::F32, 20.0),
        (Format::Bf16, Format::Bf16, 0.5),
        (Format::F16, Format::F16, 0.5),
        (Format::Fp8, Format::Fp8, 0.5),
        (Format::Bf16, Format::F32, 0.5),
    ];
    check(dir.path(), &binary, "mixed", &mixed, (1030, 70), MAX_BLOCKS_Y);
    check(dir.path(), &binary, "mixed-aligned", &mixed, (1040, 80), MAX_BLOCKS_Y);
    // MXFP4 needs widths in groups of 32. One block along y: each block
    // takes every run of 4 tokens of its expert, as when a batch has more
    // than the grid's 65535 blocks of them.
    let fp4 = [(Format::Fp4, Format::Fp4, 1.0); 4];
    check(dir.path(), &binary, "fp4", &fp4, (1088, 96), 1);
}
