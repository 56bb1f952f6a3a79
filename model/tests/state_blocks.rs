//! A state stored as blocks and a tail, then restored, continues exactly like
//! the state that never left: same bits for every prefix length, including
//! lengths that are not multiples of the compression rates or of the block.

use std::path::PathBuf;

use myriad_model::state::{StateCodecError, block_tokens};
use myriad_model::{Logits, Model, SequenceState};

fn model(name: &str) -> Model {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = match name {
        "tiny-v4" => root.join("models/tiny-v4"),
        other => root.join("tests/fixtures").join(other),
    };
    Model::load(&dir).unwrap_or_else(|e| panic!("load {name}: {e}"))
}

/// Deterministic pseudo-random token ids.
fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect()
}

fn encode(model: &Model, state: &SequenceState) -> (Vec<Vec<u8>>, Vec<u8>) {
    let cfg = &model.config;
    ((0..state.full_blocks(cfg)).map(|i| state.encode_block(cfg, i)).collect(), state.encode_tail(cfg))
}

fn restore(model: &Model, blocks: &[Vec<u8>], tail: &[u8]) -> Result<SequenceState, StateCodecError> {
    let refs: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
    SequenceState::from_blocks(&model.config, &refs, tail)
}

fn restore_equals_recompute(name: &str, lengths: &[usize]) {
    let model = model(name);
    let cfg = &model.config;
    let b = block_tokens(cfg);
    let n = *lengths.iter().max().unwrap() + 7;
    let prompt = tokens(n, cfg.vocab_size);
    let mut full = model.new_state();
    let expected = model.forward(&prompt, &mut full, Logits::All).unwrap();
    let vocab = cfg.vocab_size;
    for &p in lengths {
        let mut state = model.new_state();
        model.forward(&prompt[..p], &mut state, Logits::Last).unwrap();
        let (blocks, tail) = encode(&model, &state);
        assert_eq!(blocks.len(), p / b, "{name} at {p}: full blocks");
        let mut restored = restore(&model, &blocks, &tail).unwrap_or_else(|e| panic!("{name} at {p}: {e}"));
        assert_eq!(restored, state, "{name} at {p}: the restored state differs");
        let logits = model.forward(&prompt[p..], &mut restored, Logits::All).unwrap();
        assert_eq!(logits, expected[p * vocab..], "{name}: continuing from {p} changed the logits");
        assert_eq!(restored, full, "{name}: continuing from {p} ended in another state");
    }
}

#[test]
fn tiny_model_all_three_layer_types() {
    // Rates 4 (CSA) and 16 (HCA), window 24, blocks of 256 tokens.
    let lengths = [1, 3, 4, 5, 15, 16, 17, 23, 24, 25, 100, 255, 256, 257, 262, 511, 512, 515, 700];
    restore_equals_recompute("tiny-v4", &lengths);
}

#[test]
fn default_rates_with_long_windows() {
    // Rates 4 and 128, window 40, blocks of 256 tokens.
    restore_equals_recompute("default-rates-sharded", &[2, 127, 128, 129, 255, 256, 257, 384, 390]);
}

#[test]
fn shaped_states_have_the_shape_of_real_ones() {
    let model = model("tiny-v4");
    let prompt = tokens(300, model.config.vocab_size);
    for p in [0, 1, 5, 16, 23, 24, 40, 256, 257, 300] {
        let mut real = model.new_state();
        if p > 0 {
            model.forward(&prompt[..p], &mut real, Logits::Last).unwrap();
        }
        let shaped = myriad_model::state::shaped(&model.config, p);
        assert_eq!(real.size_bytes(), shaped.size_bytes(), "at {p}");
        let (blocks, tail) = encode(&model, &shaped);
        let (real_blocks, real_tail) = encode(&model, &real);
        assert_eq!((blocks.len(), tail.len()), (real_blocks.len(), real_tail.len()), "at {p}");
    }
}

#[test]
fn bytes_that_are_not_this_models_state_are_refused() {
    let model = model("tiny-v4");
    let cfg = &model.config;
    let mut state = model.new_state();
    model.forward(&tokens(300, cfg.vocab_size), &mut state, Logits::Last).unwrap();
    let (blocks, tail) = encode(&model, &state);
    let err = |blocks: &[Vec<u8>], tail: &[u8]| restore(&model, blocks, tail).unwrap_err().to_string();

    assert!(err(&blocks, &tail[..tail.len() - 4]).contains("needs"), "a truncated tail");
    assert!(err(&blocks, &[tail.clone(), vec![0; 4]].concat()).contains("left over"), "a longer tail");
    assert!(err(&[], &tail).contains("needs 1 blocks"), "a missing block");
    assert!(err(&[blocks[0][..100].to_vec()], &tail).contains("bytes"), "a short block");
    assert!(err(&blocks, b"junk").contains("magic"), "not a tail at all");
    let mut moved = tail.clone();
    moved[4..12].copy_from_slice(&301u64.to_le_bytes());
    assert!(err(&blocks, &moved).contains("expected"), "a tail claiming another position");

    // Another model's state (other widths and rates) does not fit this one.
    let other = self::model("default-rates-sharded");
    let mut foreign = other.new_state();
    other.forward(&tokens(300, other.config.vocab_size), &mut foreign, Logits::Last).unwrap();
    let (fb, ft) = encode(&other, &foreign);
    assert!(restore(&model, &fb, &ft).is_err());
}
