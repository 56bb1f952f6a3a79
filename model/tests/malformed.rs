//! Broken model folders and bad inputs give errors that name the problem,
//! never a panic.

mod common;

use std::path::Path;

use common::{Tensors, read_tiny, tiny, write_model};
use myriad_model::{ErrorKind, Logits, Model, ModelError};
use safetensors::Dtype;

/// A copy of the tiny model whose tensors went through `edit` first.
fn broken_copy(edit: impl FnOnce(&mut Tensors)) -> tempfile::TempDir {
    let mut tensors = read_tiny();
    edit(&mut tensors);
    write_model(&tensors)
}

fn load_error(dir: &Path) -> ModelError {
    match Model::load(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

fn assert_mentions(err: &ModelError, parts: &[&str]) {
    let text = err.to_string();
    for part in parts {
        assert!(text.contains(part), "error `{text}` should mention `{part}`");
    }
}

#[test]
fn missing_tensor_is_named() {
    let dir = broken_copy(|t| {
        t.remove("model.layers.2.attn.wq_a.weight");
    });
    let err = load_error(dir.path());
    assert_mentions(&err, &["layers.2.attn.wq_a.weight", "missing"]);
    assert_eq!(err.kind(), ErrorKind::BadCheckpoint);
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let dir = broken_copy(|t| {
        let entry = t.get_mut("model.layers.1.attn.wq_b.weight").unwrap();
        entry.1.reverse();
    });
    let err = load_error(dir.path());
    assert_mentions(&err, &["layers.1.attn.wq_b.weight", "[32, 128]", "[128, 32]"]);
}

#[test]
fn unsupported_weight_dtype_is_an_error() {
    let dir = broken_copy(|t| {
        let entry = t.get_mut("model.norm.weight").unwrap();
        entry.0 = Dtype::I32;
    });
    assert_mentions(&load_error(dir.path()), &["norm.weight", "I32"]);
}

#[test]
fn hash_table_pointing_past_the_experts_is_an_error() {
    let dir = broken_copy(|t| {
        let entry = t.get_mut("model.layers.0.ffn.gate.tid2eid").unwrap();
        entry.2[..8].copy_from_slice(&1000i64.to_le_bytes());
    });
    assert_mentions(&load_error(dir.path()), &["tid2eid", "expert id"]);
}

#[test]
fn truncated_file_is_an_error() {
    let dir = broken_copy(|_| {});
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for keep in [0, 7, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        assert_mentions(&load_error(dir.path()), &["model.safetensors", "not a valid safetensors file"]);
    }
}

#[test]
fn missing_weights_and_config_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    assert_mentions(&load_error(dir.path()), &["config.json"]);
    std::fs::copy(tiny().join("config.json"), dir.path().join("config.json")).unwrap();
    assert_mentions(&load_error(dir.path()), &["no model.safetensors"]);
    assert_mentions(&load_error(&dir.path().join("absent")), &["is not a model folder"]);
}

#[test]
fn bad_shard_index_is_an_error() {
    let dir = broken_copy(|_| {});
    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(&index, r#"{"weight_map": {"embed.weight": "../../etc/passwd"}}"#).unwrap();
    assert_mentions(&load_error(dir.path()), &["not a plain file name"]);
    std::fs::write(&index, r#"{"weight_map": {"embed.weight": "model-00009.safetensors"}}"#).unwrap();
    assert_mentions(&load_error(dir.path()), &["model-00009.safetensors"]);
    std::fs::write(&index, "{").unwrap();
    assert_mentions(&load_error(dir.path()), &["not valid JSON"]);
}

#[test]
fn bad_config_is_an_error_naming_the_file() {
    let dir = broken_copy(|_| {});
    let config = dir.path().join("config.json");
    for (text, want) in [
        ("not json", "not a valid config"),
        (r#"{"num_hidden_layers": 5, "layer_types": ["sliding_attention"]}"#, "layer_types has 1 entries"),
    ] {
        std::fs::write(&config, text).unwrap();
        assert_mentions(&load_error(dir.path()), &["config.json", want]);
    }
    // A config that disagrees with the weights: the tensor says which.
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tiny().join("config.json")).unwrap()).unwrap();
    value["hidden_size"] = 96.into();
    std::fs::write(&config, value.to_string()).unwrap();
    assert_mentions(&load_error(dir.path()), &["has shape", "the config implies"]);
}

#[test]
fn bad_inputs_to_forward_are_errors() {
    let model = Model::load(&tiny()).unwrap();
    let mut state = model.new_state();
    let err = model.forward(&[], &mut state, Logits::Last).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let err = model.forward(&[3, 512], &mut state, Logits::Last).unwrap_err();
    assert_mentions(&err, &["token id 512", "vocabulary"]);
    assert_eq!(state.position, 0, "a rejected chunk leaves the state alone");
    let mut foreign = model.new_state();
    foreign.layers.pop();
    assert_mentions(&model.forward(&[3], &mut foreign, Logits::Last).unwrap_err(), &["layers"]);
}
