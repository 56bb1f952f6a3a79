//! The cache on its own: longest-prefix lookup, sharing, tiers, eviction,
//! restarts and corruption. States here are opaque bytes derived from the
//! tokens, so a wrong answer shows as wrong bytes.

use bytes::Bytes;
use myriad_kvcache::cache::{Cache, Prefix, PutError};
use myriad_kvcache::objects::Tier;

const B: usize = 8;
const MODEL: &str = "model-a";

fn prefix(tokens: &[u32]) -> Prefix<'_> {
    Prefix { model_id: MODEL, block: B, tokens }
}

/// Block `i` of a state over `tokens`: bytes that depend on the whole prefix.
fn block(tokens: &[u32], i: usize) -> Bytes {
    let sum: u64 = tokens[..(i + 1) * B].iter().map(|&t| t as u64).sum();
    Bytes::from([sum.to_le_bytes().to_vec(), vec![i as u8; 200]].concat())
}

fn tail(tokens: &[u32]) -> Bytes {
    Bytes::from(tokens.iter().flat_map(|t| t.to_le_bytes()).collect::<Vec<_>>())
}

fn put_all(cache: &mut Cache, tokens: &[u32]) -> usize {
    let blocks = (0..tokens.len() / B).map(|i| (i, block(tokens, i))).collect();
    cache.put(&prefix(tokens), blocks, tail(tokens)).unwrap()
}

/// Asserts that a lookup for `request` restores exactly the state of its
/// first `expect` tokens; returns the tier.
fn expect_hit(cache: &mut Cache, request: &[u32], expect: usize) -> Tier {
    let found = cache.lookup(&prefix(request)).unwrap_or_else(|| panic!("no state for {} tokens", request.len()));
    assert_eq!(found.tokens, expect);
    let stored = &request[..expect];
    assert_eq!(found.tail, tail(stored));
    assert_eq!(found.blocks, (0..expect / B).map(|i| block(stored, i)).collect::<Vec<_>>());
    found.tier
}

fn seq(start: u32, n: usize) -> Vec<u32> {
    (start..start + n as u32).collect()
}

#[test]
fn the_longest_stored_prefix_wins_at_any_length() {
    let mut cache = Cache::in_memory(1 << 20);
    let conversation = seq(100, 45);
    for p in [3, 8, 17, 40] {
        put_all(&mut cache, &conversation[..p]);
    }
    assert!(cache.lookup(&prefix(&conversation[..2])).is_none(), "nothing as short as 2 tokens");
    for (request, expect) in [(3, 3), (7, 3), (8, 8), (16, 8), (17, 17), (39, 17), (40, 40), (45, 40)] {
        expect_hit(&mut cache, &conversation[..request], expect);
    }
    // Another continuation after 20 shared tokens reuses what it shares.
    let mut other = conversation[..20].to_vec();
    other.extend([1, 2, 3]);
    expect_hit(&mut cache, &other, 17);
    // Another model never sees this state.
    assert!(cache.lookup(&Prefix { model_id: "model-b", block: B, tokens: &conversation }).is_none());
}

#[test]
fn conversations_that_share_a_prefix_share_its_blocks() {
    let mut cache = Cache::in_memory(1 << 20);
    let system = seq(7, 32); // four blocks
    let mut first = system.clone();
    first.extend([1, 1, 1]);
    let mut second = system.clone();
    second.extend([2, 2, 2, 2, 2]);
    let written = put_all(&mut cache, &first);
    assert_eq!(cache.missing(&prefix(&second)), Vec::<usize>::new(), "the system prompt's blocks are stored");
    let again = cache.put(&prefix(&second), Vec::new(), tail(&second)).unwrap();
    assert!(again < written / 4, "the second conversation stored only its tail ({again} vs {written} bytes)");
    assert_eq!(cache.objects().count(myriad_kvcache::objects::Kind::Block), 4);
    expect_hit(&mut cache, &first, first.len());
    expect_hit(&mut cache, &second, second.len());
}

#[test]
fn a_put_without_its_blocks_is_refused() {
    let mut cache = Cache::in_memory(1 << 20);
    let tokens = seq(1, 20);
    let err = cache.put(&prefix(&tokens), vec![(0, block(&tokens, 0))], tail(&tokens)).unwrap_err();
    assert!(matches!(err, PutError::MissingBlock(1)), "{err}");
    let err = cache.put(&prefix(&tokens), vec![(2, block(&tokens, 0))], tail(&tokens)).unwrap_err();
    assert!(matches!(err, PutError::NoSuchBlock { index: 2, .. }), "{err}");
    assert!(cache.lookup(&prefix(&tokens)).is_none());
}

#[test]
fn memory_stays_within_capacity_and_evicts_the_least_recently_used() {
    let capacity = 40_000;
    let mut cache = Cache::in_memory(capacity);
    let conversations: Vec<Vec<u32>> = (0..100).map(|c| seq(1000 * c, 30)).collect();
    for (i, c) in conversations.iter().enumerate() {
        put_all(&mut cache, c);
        // Keep conversation 0 hot.
        expect_hit(&mut cache, &conversations[0], 30);
        let [(used, _), _] = cache.objects().usage();
        assert!(used <= capacity, "{used} bytes held after {i} puts");
    }
    assert!(cache.objects().counts.evictions_memory > 0);
    expect_hit(&mut cache, &conversations[99], 30);
    assert!(cache.lookup(&prefix(&conversations[1])).is_none(), "the coldest conversation was evicted");
    assert!(cache.hits.misses >= 1);
}

#[test]
fn the_disk_tier_survives_a_restart_and_takes_what_memory_evicts() {
    let dir = tempfile::tempdir().unwrap();
    let conversations: Vec<Vec<u32>> = (0..50).map(|c| seq(1000 * c, 30)).collect();
    {
        let mut cache = Cache::with_disk(10_000, dir.path(), 1 << 20).unwrap();
        for c in &conversations {
            put_all(&mut cache, c);
        }
        assert!(cache.objects().counts.evictions_memory > 0);
        assert_eq!(expect_hit(&mut cache, &conversations[0], 30), Tier::Disk, "evicted from memory, still on disk");
        assert_eq!(expect_hit(&mut cache, &conversations[0], 30), Tier::Memory, "promoted back");
    }
    let mut cache = Cache::with_disk(10_000, dir.path(), 1 << 20).unwrap();
    assert_eq!(cache.snapshots(), 50);
    for c in &conversations {
        assert_eq!(expect_hit(&mut cache, c, 30), Tier::Disk);
    }
    // A smaller disk on restart keeps only what fits.
    drop(cache);
    let mut small = Cache::with_disk(10_000, dir.path(), 20_000).unwrap();
    assert!(small.objects().usage()[1].0 <= 20_000);
    assert!(small.objects().counts.evictions_disk > 0);
    assert!(small.lookup(&prefix(&conversations[0])).is_none(), "the oldest went first");
}

#[test]
fn a_corrupt_block_on_disk_means_a_shorter_state_never_a_wrong_one() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = seq(5, 40);
    {
        let mut cache = Cache::with_disk(1 << 20, dir.path(), 1 << 20).unwrap();
        put_all(&mut cache, &tokens[..10]);
        put_all(&mut cache, &tokens);
    }
    // Flip one byte in the payload of the last block (the one only the
    // longer state uses).
    let last = myriad_kvcache::key::chain(MODEL, B, &tokens)[5];
    let path = dir.path().join(format!("{}.blk", last.hex()));
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();

    let mut cache = Cache::with_disk(1 << 20, dir.path(), 1 << 20).unwrap();
    expect_hit(&mut cache, &tokens, 10);
    assert_eq!(cache.objects().counts.corrupt, 1);
    assert!(!path.exists(), "the corrupt block was removed");
    // Stored again, it serves again.
    put_all(&mut cache, &tokens);
    expect_hit(&mut cache, &tokens, 40);
}

#[test]
fn torn_writes_and_foreign_files_do_not_break_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = seq(5, 20);
    {
        let mut cache = Cache::with_disk(1 << 20, dir.path(), 1 << 20).unwrap();
        put_all(&mut cache, &tokens);
    }
    let torn = dir.path().join(format!("{}.tmp", "ab".repeat(32)));
    std::fs::write(&torn, b"half").unwrap();
    std::fs::write(dir.path().join("README"), b"not ours").unwrap();
    // A snapshot whose header is cut short.
    let junk = dir.path().join(format!("{}.snap", "cd".repeat(32)));
    std::fs::write(&junk, b"MYKV").unwrap();
    let mut cache = Cache::with_disk(1 << 20, dir.path(), 1 << 20).unwrap();
    expect_hit(&mut cache, &tokens, 20);
    assert!(!torn.exists() && !junk.exists());
    assert!(dir.path().join("README").exists(), "files that are not ours are left alone");
}
