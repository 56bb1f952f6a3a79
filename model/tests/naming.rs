//! The same weights under the other tensor naming (and the other dtypes) load
//! into the same model.

mod common;

use std::collections::HashMap;

use common::{Tensors, read_tiny, tiny, write_model};
use myriad_model::{Logits, Model};
use safetensors::Dtype;

fn logits(dir: &std::path::Path, prompt: &[u32]) -> Vec<f32> {
    let model = Model::load(dir).unwrap();
    model.forward(prompt, &mut model.new_state(), Logits::All).unwrap()
}

const PROMPT: &[u32] = &[5, 17, 42, 300, 7, 99, 8, 250, 4, 4, 61, 200, 13, 3, 501, 77, 16, 18, 19, 20];

/// `transformers`' packed experts (`mlp.experts.gate_up_proj [E, 2I, H]`,
/// `down_proj [E, H, I]`), its attention names, and names without the
/// `model.` prefix give bit-identical logits.
#[test]
fn transformers_naming_and_packed_experts_load_identically() {
    let original = read_tiny();
    let mut renamed = Tensors::new();
    let mut experts: HashMap<(usize, usize), HashMap<String, Vec<u8>>> = HashMap::new();
    let (mut n_experts, mut inter, mut hidden) = (0, 0, 0);
    for (name, (dtype, shape, data)) in &original {
        let parts: Vec<&str> = name.split('.').collect();
        if let ["model", "layers", l, "ffn", "experts", e, w, "weight"] = parts[..] {
            let (l, e): (usize, usize) = (l.parse().unwrap(), e.parse().unwrap());
            experts.entry((l, e)).or_default().insert(w.to_string(), data.clone());
            n_experts = n_experts.max(e + 1);
            if w == "w1" {
                (inter, hidden) = (shape[0], shape[1]);
            }
            continue;
        }
        let name = if name == "model.layers.0.attn.wq_a.weight" {
            "model.layers.0.self_attn.q_a_proj.weight".to_string()
        } else {
            name.strip_prefix("model.").unwrap_or(name).to_string()
        };
        renamed.insert(name, (*dtype, shape.clone(), data.clone()));
    }
    let layers = experts.keys().map(|(l, _)| l + 1).max().unwrap();
    for l in 0..layers {
        let (mut gate_up, mut down) = (Vec::new(), Vec::new());
        for e in 0..n_experts {
            let w = &experts[&(l, e)];
            gate_up.extend_from_slice(&w["w1"]);
            gate_up.extend_from_slice(&w["w3"]);
            down.extend_from_slice(&w["w2"]);
        }
        let p = format!("model.layers.{l}.mlp.experts");
        renamed.insert(format!("{p}.gate_up_proj"), (Dtype::F32, vec![n_experts, 2 * inter, hidden], gate_up));
        renamed.insert(format!("{p}.down_proj"), (Dtype::F32, vec![n_experts, hidden, inter], down));
    }
    let dir = write_model(&renamed);
    assert_eq!(logits(dir.path(), PROMPT), logits(&tiny(), PROMPT));
}

/// F16 storage loads (converted once to f32) and stays close to F32. (BF16 is
/// checked exactly against the reference by the `mixed-bf16` fixture.)
#[test]
fn f16_storage_loads() {
    let converted: Tensors = read_tiny()
        .into_iter()
        .map(|(name, (dtype, shape, data))| {
            if dtype != Dtype::F32 {
                return (name, (dtype, shape, data));
            }
            let floats = data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            (name, (Dtype::F16, shape, floats.flat_map(|v| half::f16::from_f32(v).to_le_bytes()).collect()))
        })
        .collect();
    let dir = write_model(&converted);
    let (ours, full) = (logits(dir.path(), PROMPT), logits(&tiny(), PROMPT));
    let worst = ours.iter().zip(&full).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst > 0.0 && worst < 0.05, "F16 logits differ from F32 by {worst}");
}
