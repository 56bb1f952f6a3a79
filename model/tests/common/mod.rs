//! Helpers shared by the integration tests: rewrite the bundled tiny model's
//! tensors into a temporary model folder.
// Each test binary uses some of these helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// Tensors by name: dtype, shape, little-endian bytes.
pub type Tensors = HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

pub fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-v4")
}

pub fn read_tiny() -> Tensors {
    let bytes = std::fs::read(tiny().join("model.safetensors")).unwrap();
    let parsed = SafeTensors::deserialize(&bytes).unwrap();
    parsed.tensors().into_iter().map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect()
}

/// A model folder with the tiny model's config and `tensors` as its weights.
pub fn write_model(tensors: &Tensors) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(tiny().join("config.json"), dir.path().join("config.json")).unwrap();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, (dtype, shape, data))| (name.clone(), TensorView::new(*dtype, shape.clone(), data).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    dir
}
