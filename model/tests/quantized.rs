//! Checkpoints in DeepSeek's release layout load and compute exactly on the
//! weights they encode: the bundled tiny model written with block-FP8
//! attention and shared-expert projections (E8M0 scales), MXFP4 routed
//! experts, an `mtp.0.*` module and two shards gives bit-identical logits to
//! the same weights written dequantized as F32. The quantizer here picks
//! each code by value from the formats' definitions, independently of the
//! loader's indexing of blocks, groups and nibbles.

mod common;

use std::collections::HashMap;

use common::{Tensors, read_tiny, tiny};
use myriad_model::checkpoint::Checkpoint;
use myriad_model::config::ModelConfig;
use myriad_model::stored::Stored;
use myriad_model::weights::load_expert;
use myriad_model::{Logits, Model, quant};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The E8M0 code of the smallest power of two `s` with `amax / s <= top`.
fn scale_code(amax: f32, top: f32) -> u8 {
    let exponent = if amax == 0.0 { 0 } else { (amax / top).log2().ceil() as i32 };
    (exponent + 127).clamp(0, 254) as u8
}

/// The code of `codes` whose value (by `value`) is nearest to `x`.
fn nearest(x: f32, codes: impl Iterator<Item = u8>, value: impl Fn(u8) -> f32) -> u8 {
    codes
        .filter(|&c| value(c).is_finite())
        .min_by(|&a, &b| (value(a) - x).abs().total_cmp(&(value(b) - x).abs()))
        .unwrap()
}

/// Block-FP8 codes, E8M0 scales and the weights they encode, for `w: [out, inp]`.
fn fp8(w: &[f32], out: usize, inp: usize) -> (Vec<u8>, Vec<u8>, Vec<f32>) {
    let (br, bc) = (out.div_ceil(128), inp.div_ceil(128));
    let mut scales = vec![0u8; br * bc];
    for (b, scale) in scales.iter_mut().enumerate() {
        let (r, c) = (b / bc, b % bc);
        let rows = r * 128..((r + 1) * 128).min(out);
        let amax = rows
            .flat_map(|i| w[i * inp + c * 128..i * inp + ((c + 1) * 128).min(inp)].iter())
            .fold(0f32, |m, v| m.max(v.abs()));
        *scale = scale_code(amax, 448.0);
    }
    let mut codes = Vec::with_capacity(out * inp);
    let mut encoded = Vec::with_capacity(out * inp);
    for i in 0..out {
        for j in 0..inp {
            let s = quant::e8m0(scales[(i / 128) * bc + j / 128]).unwrap();
            let code = nearest(w[i * inp + j] / s, 0..=255u8, quant::e4m3);
            codes.push(code);
            encoded.push(quant::e4m3(code) * s);
        }
    }
    (codes, scales, encoded)
}

/// MXFP4 bytes (low nibble = even input), E8M0 scales per 32 inputs, and
/// the weights they encode.
fn fp4(w: &[f32], out: usize, inp: usize) -> (Vec<u8>, Vec<u8>, Vec<f32>) {
    let mut packed = vec![0u8; out * inp / 2];
    let mut scales = Vec::with_capacity(out * inp / 32);
    let mut encoded = vec![0f32; out * inp];
    for i in 0..out {
        for g in 0..inp / 32 {
            let group = &w[i * inp + g * 32..i * inp + (g + 1) * 32];
            let code = scale_code(group.iter().fold(0f32, |m, v| m.max(v.abs())), 6.0);
            scales.push(code);
            let s = quant::e8m0(code).unwrap();
            for (k, &x) in group.iter().enumerate() {
                let j = g * 32 + k;
                let nibble = nearest(x / s, 0..16u8, quant::e2m1);
                packed[(i * inp + j) / 2] |= if j % 2 == 0 { nibble } else { nibble << 4 };
                encoded[i * inp + j] = quant::e2m1(nibble) * s;
            }
        }
    }
    (packed, scales, encoded)
}

fn is_fp8(name: &str) -> bool {
    let projections = ["attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_a", "attn.wo_b", "indexer.wq_b"];
    (projections.iter().any(|p| name.ends_with(&format!("{p}.weight"))) && !name.contains("compressor"))
        || name.contains("shared_experts.")
}

/// The tiny model in the release layout, and the same weights as F32.
fn release_and_dequantized() -> (Tensors, Tensors) {
    let tiny = read_tiny();
    let (mut release, mut plain) = (Tensors::new(), Tensors::new());
    for (name, (dtype, shape, data)) in tiny {
        let name = name.strip_prefix("model.").unwrap_or(&name).to_string();
        let routed = name.contains(".ffn.experts.") && name.ends_with(".weight");
        if dtype != Dtype::F32 || shape.len() != 2 || !(routed || is_fp8(&name)) {
            release.insert(name.clone(), (dtype, shape.clone(), data.clone()));
            plain.insert(name, (dtype, shape, data));
            continue;
        }
        let (out, inp) = (shape[0], shape[1]);
        let scale_name = format!("{}.scale", name.strip_suffix(".weight").unwrap());
        let w = floats(&data);
        let (codes, scales, encoded) = if routed { fp4(&w, out, inp) } else { fp8(&w, out, inp) };
        let (code_dtype, code_shape, scale_shape) = if routed {
            (Dtype::I8, vec![out, inp / 2], vec![out, inp / 32])
        } else {
            (Dtype::F8_E4M3, vec![out, inp], vec![out.div_ceil(128), inp.div_ceil(128)])
        };
        release.insert(name.clone(), (code_dtype, code_shape, codes));
        release.insert(scale_name, (Dtype::F8_E8M0, scale_shape, scales));
        plain.insert(name, (Dtype::F32, shape, bytes(&encoded)));
    }
    // A multi-token-prediction module, as the release ships: not used.
    release.insert("mtp.0.enorm.weight".into(), (Dtype::F32, vec![4], bytes(&[1.0; 4])));
    (release, plain)
}

/// A model folder with `tensors` in `shards` shards plus an index, and the
/// tiny config with `extra` fields merged in.
fn write(tensors: &Tensors, shards: usize, extra: serde_json::Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny().join("config.json")).unwrap()).unwrap();
    for (k, v) in extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut map = HashMap::new();
    for (s, chunk) in names.chunks(names.len().div_ceil(shards)).enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", s + 1);
        let views: Vec<(String, TensorView)> = chunk
            .iter()
            .map(|n| {
                let (dtype, shape, data) = &tensors[*n];
                ((*n).clone(), TensorView::new(*dtype, shape.clone(), data).unwrap())
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.path().join(&file)).unwrap();
        map.extend(chunk.iter().map(|n| ((*n).clone(), file.clone())));
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    dir
}

const PROMPT: [u32; 40] = [
    5, 17, 42, 99, 3, 250, 7, 7, 64, 128, 300, 12, 8, 77, 45, 2, 19, 33, 410, 500, 6, 61, 90, 13, 14, 15, 16, 200, 201,
    202, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
];

#[test]
fn the_release_layout_computes_exactly_its_dequantized_weights() {
    let (release, plain) = release_and_dequantized();
    let quantization = serde_json::json!({
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
            "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
        "expert_dtype": "fp4", "num_nextn_predict_layers": 1,
    });
    let quantized_dir = write(&release, 2, quantization);
    let plain_dir = write(&plain, 1, serde_json::json!({}));
    let quantized = Model::load(quantized_dir.path()).expect("load the release layout");
    let reference = Model::load(plain_dir.path()).unwrap();
    let logits = |m: &Model| {
        let mut state = m.new_state();
        m.forward(&PROMPT, &mut state, Logits::All).unwrap()
    };
    let (q, r) = (logits(&quantized), logits(&reference));
    assert!(q.iter().all(|v| v.is_finite()));
    assert!(q.iter().zip(&r).all(|(a, b)| a.to_bits() == b.to_bits()), "logits differ from the dequantized model");
    // The quantization really changed the weights: the logits moved.
    let original = Model::load(&tiny()).unwrap();
    assert_ne!(logits(&original), q);
}

#[test]
fn routed_experts_hold_exactly_their_stored_bytes() {
    let (release, _) = release_and_dequantized();
    let dir = write(&release, 2, serde_json::json!({"expert_dtype": "fp4"}));
    let (cfg, _) = ModelConfig::read(dir.path()).unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    for expert in 0..cfg.n_routed_experts {
        let held = load_expert(&ckpt, &cfg, 1, expert).unwrap().bytes();
        let stored: usize = ["w1", "w2", "w3"]
            .iter()
            .flat_map(|w| ["weight", "scale"].map(|t| format!("layers.1.ffn.experts.{expert}.{w}.{t}")))
            .map(|name| release[&name].2.len())
            .sum();
        // MXFP4: half a byte per weight plus one scale byte per 32 inputs.
        let weights = 3 * cfg.hidden_size * cfg.moe_intermediate_size;
        assert_eq!(stored, weights / 2 + weights / 32);
        assert_eq!(held, stored, "expert {expert} holds other than its stored bytes");
    }
}

fn one_tensor(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, dtype, shape, data)| (n.to_string(), TensorView::new(*dtype, shape.clone(), data).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    dir
}

#[test]
fn bad_quantized_tensors_are_named() {
    let err = |tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)], out, inp| {
        let dir = one_tensor(tensors);
        Checkpoint::open(dir.path()).unwrap().linear("w.weight", out, inp).unwrap_err().to_string()
    };
    let codes = || ("w.weight", Dtype::F8_E4M3, vec![4, 8], vec![0x38u8; 32]);
    let e = err(&[codes()], 4, 8);
    assert!(e.contains("w.weight") && e.contains("w.scale") && e.contains("missing"), "{e}");
    let e = err(&[codes(), ("w.scale", Dtype::F8_E8M0, vec![2, 1], vec![127; 2])], 4, 8);
    assert!(e.contains("w.scale") && e.contains("[1, 1]"), "{e}");
    let e = err(&[codes(), ("w.scale", Dtype::F8_E8M0, vec![1, 1], vec![255])], 4, 8);
    assert!(e.contains("w.weight") && e.contains("NaN"), "{e}");
    let e = err(&[codes(), ("w.scale", Dtype::I32, vec![1, 1], vec![0; 4])], 4, 8);
    assert!(e.contains("F8_E8M0 or F32"), "{e}");
    // 2^120 and up: out of the block-FP8 range (E8M0 code 247, or F32).
    let e = err(&[codes(), ("w.scale", Dtype::F8_E8M0, vec![1, 1], vec![247])], 4, 8);
    assert!(e.contains("w.scale") && e.contains("below 2^120"), "{e}");
    let e = err(&[codes(), ("w.scale", Dtype::F32, vec![1, 1], (-1e37f32).to_le_bytes().to_vec())], 4, 8);
    assert!(e.contains("w.scale") && e.contains("below 2^120"), "{e}");
    let nan = ("w.weight", Dtype::F8_E4M3, vec![4, 8], [vec![0x7Fu8], vec![0x38; 31]].concat());
    let e = err(&[nan, ("w.scale", Dtype::F8_E8M0, vec![1, 1], vec![127])], 4, 8);
    assert!(e.contains("code 0 is NaN"), "{e}");
    let fp4 = ("w.weight", Dtype::I8, vec![4, 24], vec![0u8; 96]);
    let e = err(&[fp4, ("w.scale", Dtype::F8_E8M0, vec![4, 1], vec![127; 4])], 4, 48);
    assert!(e.contains("w.weight") && e.contains("48 inputs") && e.contains("multiple of 32"), "{e}");
    // Scales of 2^8 and up are past what the kernels take: the matrix is
    // kept as f32, with the same values.
    let dir = one_tensor(&[codes(), ("w.scale", Dtype::F8_E8M0, vec![1, 1], vec![127 + 8])]);
    let w = Checkpoint::open(dir.path()).unwrap().linear("w.weight", 4, 8).unwrap();
    assert!(matches!(w.stored, Stored::F32(_)), "{:?}", w.stored);
    assert!(w.to_f32().iter().all(|&v| v == 256.0));
    // F32 scales (the -Base layout) are read as they are.
    let dir = one_tensor(&[codes(), ("w.scale", Dtype::F32, vec![1, 1], 0.25f32.to_le_bytes().to_vec())]);
    let w = Checkpoint::open(dir.path()).unwrap().linear("w.weight", 4, 8).unwrap();
    assert!(w.to_f32().iter().all(|&v| v == 0.25));
}
