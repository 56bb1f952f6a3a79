//! The disk tier on damaged files: a KV-cache reopens whatever a crash, a
//! full disk or another version left in its directory. Random files, and
//! well-framed objects with random payloads (past the checksum, into the
//! snapshot parser), must never panic the reopening or a lookup over them.
//! `PROPTEST_CASES` raises the number of cases.

use myriad_kvcache::Cache;
use myriad_kvcache::cache::Prefix;
use proptest::prelude::*;

/// An object file as the tier writes it: magic, version, reserved, CRC-32
/// of the payload, payload length, payload.
fn framed(payload: &[u8]) -> Vec<u8> {
    let mut bytes = b"MYKV".to_vec();
    bytes.extend([1, 0, 0, 0]);
    bytes.extend(crc32fast::hash(payload).to_le_bytes());
    bytes.extend((payload.len() as u32).to_le_bytes());
    bytes.extend(payload);
    bytes
}

proptest! {
    #[test]
    fn damaged_files_never_panic_a_reopen_or_a_lookup(
        files in prop::collection::vec(
            (any::<[u8; 32]>(), any::<bool>(), any::<bool>(), prop::collection::vec(any::<u8>(), 0..256)),
            1..6,
        ),
        tokens in prop::collection::vec(0u32..50, 0..40),
    ) {
        let dir = tempfile::tempdir().unwrap();
        for (key, snapshot, frame, payload) in &files {
            let name: String = key.iter().map(|b| format!("{b:02x}")).collect();
            let ext = if *snapshot { "snap" } else { "blk" };
            let mut payload = payload.clone();
            if *snapshot && payload.len() >= 4 {
                // Reach the snapshot parser: its magic, then random fields.
                payload[..4].copy_from_slice(b"MYSN");
            }
            let bytes = if *frame { framed(&payload) } else { payload };
            std::fs::write(dir.path().join(format!("{name}.{ext}")), bytes).unwrap();
        }
        let mut cache = Cache::with_disk(1 << 20, dir.path(), 1 << 20).unwrap();
        let prefix = Prefix { model_id: "m", block: 4, tokens: &tokens };
        let _ = cache.lookup(&prefix);
        let _ = cache.missing(&prefix);
    }
}
