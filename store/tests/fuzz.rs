//! The cluster's records on arbitrary and mutated bytes: anything in etcd
//! (another version's writes, a hand edit, corruption) is decoded by every
//! node, so no value may panic the decoder, and a placement that decodes is
//! checked without panicking. `PROPTEST_CASES` raises the number of cases.

use myriad_store::schema::{self, Assignment, Current, Leader, NodeRecord, Placement, PlacementVersion, Role};
use proptest::prelude::*;

fn placement(workers: usize, experts: u32) -> Placement {
    Placement {
        version: PlacementVersion(3),
        model_id: "m".into(),
        layers: 2,
        experts,
        assignments: (0..workers)
            .map(|w| Assignment {
                node: format!("w{w}").parse().unwrap(),
                addr: format!("10.0.0.{w}:7100"),
                experts: format!("*:{w}-{}", experts - 1).parse().unwrap(),
            })
            .collect(),
    }
}

fn record() -> NodeRecord {
    NodeRecord {
        id: "w1".parse().unwrap(),
        role: Role::Worker,
        addr: "10.0.0.1:7100".into(),
        model_id: "m".into(),
        capacity_bytes: Some(1 << 30),
        placement_version: Some(PlacementVersion(2)),
        dispatch: None,
        host: Some("node-a".into()),
        zone: None,
        device: Some("cuda:0".into()),
        device_memory_bytes: Some(150_000_000_000),
        load_failure: Some(schema::LoadFailure { version: PlacementVersion(3), error: "out of memory".into() }),
    }
}

/// Every record type the store holds, decoded from `bytes`.
fn decode_all(bytes: &[u8]) {
    let key = "/myriad/t/x";
    let _ = schema::decode::<NodeRecord>(key, bytes);
    let _ = schema::decode::<Current>(key, bytes);
    let _ = schema::decode::<Leader>(key, bytes);
    if let Ok(p) = schema::decode::<Placement>(key, bytes) {
        let _ = p.check();
    }
}

proptest! {
    #[test]
    fn arbitrary_values_never_panic_the_decoders(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        decode_all(&bytes);
    }

    #[test]
    fn mutated_records_are_refused_or_decoded(
        which in 0usize..2,
        flips in prop::collection::vec((any::<usize>(), 1u8..=127), 1..4),
        keep in 0usize..2048,
    ) {
        let mut bytes = if which == 0 { schema::encode(&placement(3, 8)) } else { schema::encode(&record()) };
        for (at, x) in flips {
            let i = at % bytes.len();
            bytes[i] ^= x;
        }
        bytes.truncate(keep);
        decode_all(&bytes);
    }
}
