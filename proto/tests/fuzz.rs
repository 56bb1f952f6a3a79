//! The expert wire format's decoders on arbitrary and mutated bytes: a
//! worker and a router take these from the network, so no input may panic
//! them, and what they accept must be consistent. `PROPTEST_CASES` raises
//! the number of cases (256 by default).

use myriad_proto::expert::{Contributions, ExpertBatch, ExpertId, LayerId};
use myriad_proto::pb;
use proptest::prelude::*;
use prost::Message;

/// `bytes` with each `(position, xor)` applied and cut to `keep` bytes.
fn mutate(mut bytes: Vec<u8>, flips: &[(usize, u8)], keep: usize) -> Vec<u8> {
    for &(at, x) in flips {
        if !bytes.is_empty() {
            let i = at % bytes.len();
            bytes[i] ^= x;
        }
    }
    bytes.truncate(keep);
    bytes
}

fn check_batch(bytes: &[u8]) {
    if let Ok(m) = pb::RunExpertsRequest::decode(bytes)
        && let Ok(b) = ExpertBatch::try_from(m)
    {
        assert_eq!(b.hidden.len(), b.routes.len() * b.width, "accepted a batch whose sizes disagree");
    }
}

fn check_contributions(bytes: &[u8]) {
    if let Ok(m) = pb::RunExpertsResponse::decode(bytes)
        && let Ok(c) = Contributions::try_from(m)
    {
        assert_eq!(c.data.len(), c.pairs * c.width, "accepted contributions whose sizes disagree");
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        check_batch(&bytes);
        check_contributions(&bytes);
    }

    #[test]
    fn mutated_batches_are_refused_or_consistent(
        rows in 1usize..5,
        width in 1usize..9,
        flips in prop::collection::vec((any::<usize>(), 1u8..=255), 0..6),
        keep in 0usize..4096,
    ) {
        let routes = (0..rows).map(|r| vec![(ExpertId(r as u32), 0.5); r % 3]).collect();
        let batch = ExpertBatch { layer: LayerId(1), width, hidden: vec![1.0; rows * width], routes };
        let bytes = pb::RunExpertsRequest::from(batch).encode_to_vec();
        check_batch(&mutate(bytes, &flips, keep));
    }
}
