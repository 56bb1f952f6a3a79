//! The sequence state decoder on arbitrary and mutated bytes: a router
//! restores states that come from the KV-cache over the network, so no
//! bytes may panic `SequenceState::from_blocks` or make it allocate more
//! than the model and the input allow, and a state it accepts must be one
//! the model can run. `PROPTEST_CASES` raises the number of cases.

use std::path::PathBuf;
use std::sync::LazyLock;

use myriad_model::{Logits, Model, SequenceState};
use proptest::prelude::*;

static MODEL: LazyLock<Model> = LazyLock::new(|| {
    Model::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-v4")).expect("the tiny model")
});

/// A real state after `n` tokens, encoded: its blocks and its tail.
fn encoded(n: usize) -> (Vec<Vec<u8>>, Vec<u8>) {
    let model = &*MODEL;
    let tokens: Vec<u32> = (0..n as u32).map(|i| (i * 37 + 5) % 500 + 2).collect();
    let mut state = model.new_state();
    model.forward(&tokens, &mut state, Logits::Last).unwrap();
    let cfg = &model.config;
    ((0..state.full_blocks(cfg)).map(|i| state.encode_block(cfg, i)).collect(), state.encode_tail(cfg))
}

/// Decodes; a state accepted must take one more token.
fn restore(blocks: &[Vec<u8>], tail: &[u8]) {
    let refs: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
    if let Ok(mut state) = SequenceState::from_blocks(&MODEL.config, &refs, tail) {
        MODEL.forward(&[7], &mut state, Logits::Last).expect("an accepted state runs");
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(
        blocks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..512), 0..3),
        tail in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        restore(&blocks, &tail);
    }

    #[test]
    fn mutated_states_are_refused_or_run(
        n in prop_oneof![Just(3usize), Just(200), Just(300)],
        in_tail in any::<bool>(),
        flips in prop::collection::vec((any::<usize>(), 1u8..=255), 1..4),
        cut in prop::option::of(any::<usize>()),
    ) {
        let (mut blocks, mut tail) = encoded(n);
        let target = match blocks.first_mut() {
            Some(block) if !in_tail => block,
            _ => &mut tail,
        };
        for (at, x) in flips {
            if !target.is_empty() {
                let i = at % target.len();
                target[i] ^= x;
            }
        }
        if let Some(c) = cut {
            let keep = c % (target.len() + 1);
            target.truncate(keep);
        }
        restore(&blocks, &tail);
    }
}
