//! Checkpoint loading on damaged files: a model folder is user input (a
//! download cut short, a wrong file), so no safetensors bytes may panic the
//! loader or make it allocate what the header claims before checking it.
//! `PROPTEST_CASES` raises the number of cases.

use std::path::PathBuf;

use myriad_model::Model;
use proptest::prelude::*;

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-v4")
}

/// A folder with the tiny model's config and `weights` as its one shard.
fn load(weights: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(tiny().join("config.json"), dir.path().join("config.json")).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), weights).unwrap();
    let _ = Model::load(dir.path());
}

/// A safetensors header (length-prefixed JSON) naming one tensor.
fn with_header(name: &str, dtype: &str, shape: &[u64], offsets: (u64, u64), data: &[u8]) -> Vec<u8> {
    let header =
        format!(r#"{{"{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{},{}]}}}}"#, offsets.0, offsets.1);
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(data);
    bytes
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_the_loader(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        load(&bytes);
    }

    #[test]
    fn lying_headers_are_refused(
        name in prop_oneof![Just("embed.weight"), Just("layers.0.attn.wkv.weight"), Just("x")],
        dtype in prop_oneof![Just("F32"), Just("BF16"), Just("F8_E4M3"), Just("I8"), Just("Q9")],
        shape in prop::collection::vec(prop_oneof![0u64..4, Just(u64::MAX), Just(1u64 << 40)], 0..4),
        offsets in (prop_oneof![0u64..64, Just(u64::MAX)], prop_oneof![0u64..64, Just(u64::MAX)]),
        data in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        load(&with_header(name, dtype, &shape, offsets, &data));
    }

    #[test]
    fn a_header_length_past_the_file_is_refused(claimed in any::<u64>(), rest in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut bytes = claimed.to_le_bytes().to_vec();
        bytes.extend(rest);
        load(&bytes);
    }
}
