//! Sequence states by token prefix, over [`Objects`].
//!
//! A state at position `p` with `k = p / B` full blocks is stored as the
//! blocks `h_1..h_k` of [`key::chain`] (shared with every state that starts
//! with the same tokens) and one snapshot object: the key of its last full
//! block, the `p - k·B` tokens after it, and the model's tail bytes. An
//! in-memory index from boundary key to snapshots answers "the longest
//! stored prefix of these tokens" by walking the request's own chain from
//! its end. A missing or corrupt block makes that snapshot unusable and the
//! walk goes on to a shorter one: the caller recomputes more, never gets a
//! wrong state.

use std::collections::HashMap;
use std::io;
use std::path::Path;

use bytes::Bytes;

use crate::key::{self, Key};
use crate::objects::{Gone, Kind, Objects, Tier};

const SNAPSHOT_MAGIC: &[u8; 4] = b"MYSN";

#[derive(Debug, Clone)]
struct SnapshotMeta {
    key: Key,
    partial: Vec<u32>,
}

/// A state found for a prefix.
#[derive(Debug, Clone)]
pub struct Found {
    pub tokens: usize,
    pub blocks: Vec<Bytes>,
    pub tail: Bytes,
    /// The slowest tier any part came from.
    pub tier: Tier,
}

#[derive(Debug, thiserror::Error)]
pub enum PutError {
    #[error("block {0} was neither sent nor stored")]
    MissingBlock(usize),
    #[error("block {index} is not a full block of {tokens} tokens")]
    NoSuchBlock { index: usize, tokens: usize },
    #[error("block size 0")]
    ZeroBlock,
    #[error("cannot store: {0}")]
    Io(#[from] io::Error),
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Hits {
    pub memory: u64,
    pub disk: u64,
    pub misses: u64,
    pub tokens_served: u64,
}

pub struct Cache {
    objects: Objects,
    /// Boundary key -> snapshots after it.
    index: HashMap<Key, Vec<SnapshotMeta>>,
    pub hits: Hits,
}

/// What a request names: the model, its block size and the tokens.
pub struct Prefix<'a> {
    pub model_id: &'a str,
    pub block: usize,
    pub tokens: &'a [u32],
}

impl Cache {
    pub fn in_memory(memory: usize) -> Self {
        Cache { objects: Objects::in_memory(memory), index: HashMap::new(), hits: Hits::default() }
    }

    /// Reopens (or creates) a disk tier and indexes the snapshots on it.
    pub fn with_disk(memory: usize, dir: &Path, capacity: usize) -> io::Result<Self> {
        let (objects, listed) = Objects::with_disk(memory, dir, capacity)?;
        let mut cache = Cache { objects, index: HashMap::new(), hits: Hits::default() };
        let mut gone = Vec::new();
        for (key, kind) in listed {
            if kind != Kind::Snapshot {
                continue;
            }
            match cache.objects.get(&key, &mut gone).map(|(bytes, _)| parse_snapshot(&bytes)) {
                Some(Some((boundary, partial, _))) => {
                    cache.index.entry(boundary).or_default().push(SnapshotMeta { key, partial });
                }
                Some(None) => tracing::warn!(key = ?key, "ignoring a snapshot in an unknown format"),
                None => {}
            }
        }
        cache.forget(&gone);
        tracing::info!(dir = %dir.display(), snapshots = cache.snapshots(), "reopened the disk tier");
        Ok(cache)
    }

    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    pub fn snapshots(&self) -> usize {
        self.index.values().map(Vec::len).sum()
    }

    fn forget(&mut self, gone: &Gone) {
        for (key, kind) in gone {
            if *kind == Kind::Snapshot {
                for list in self.index.values_mut() {
                    list.retain(|s| s.key != *key);
                }
                self.index.retain(|_, l| !l.is_empty());
            }
        }
    }

    /// Indices (0-based) of the full blocks of `prefix` that are not stored.
    pub fn missing(&self, prefix: &Prefix) -> Vec<usize> {
        let chain = key::chain(prefix.model_id, prefix.block, prefix.tokens);
        (1..chain.len()).filter(|&i| !self.objects.contains(&chain[i])).map(|i| i - 1).collect()
    }

    /// The longest stored state whose tokens are a prefix of `prefix.tokens`.
    pub fn lookup(&mut self, prefix: &Prefix) -> Option<Found> {
        if prefix.block == 0 {
            return None;
        }
        let chain = key::chain(prefix.model_id, prefix.block, prefix.tokens);
        let mut gone = Vec::new();
        let mut found = None;
        'walk: for k in (0..chain.len()).rev() {
            let after = &prefix.tokens[k * prefix.block..];
            let mut candidates: Vec<SnapshotMeta> = self
                .index
                .get(&chain[k])
                .map_or(Vec::new(), |l| l.iter().filter(|s| after.starts_with(&s.partial)).cloned().collect());
            candidates.sort_by_key(|s| std::cmp::Reverse(s.partial.len()));
            for snap in candidates {
                if k == 0 && snap.partial.is_empty() {
                    continue;
                }
                if let Some(f) = self.load(&chain[1..=k], &snap, k * prefix.block, &mut gone) {
                    found = Some(f);
                    break 'walk;
                }
            }
        }
        self.forget(&gone);
        match &found {
            Some(f) => {
                match f.tier {
                    Tier::Memory => self.hits.memory += 1,
                    Tier::Disk => self.hits.disk += 1,
                }
                self.hits.tokens_served += f.tokens as u64;
            }
            None => self.hits.misses += 1,
        }
        found
    }

    fn load(&mut self, blocks: &[Key], snap: &SnapshotMeta, start: usize, gone: &mut Gone) -> Option<Found> {
        let (bytes, mut tier) = self.objects.get(&snap.key, gone)?;
        let (_, _, tail) = parse_snapshot(&bytes)?;
        let mut data = Vec::with_capacity(blocks.len());
        for key in blocks {
            let (b, t) = self.objects.get(key, gone)?;
            tier = tier.max(t);
            data.push(b);
        }
        Some(Found { tokens: start + snap.partial.len(), blocks: data, tail, tier })
    }

    /// Stores the state after `prefix.tokens`: `blocks` are (index, bytes)
    /// of full blocks the cache may be missing; every other full block must
    /// already be stored. Returns the bytes newly written.
    pub fn put(&mut self, prefix: &Prefix, blocks: Vec<(usize, Bytes)>, tail: Bytes) -> Result<usize, PutError> {
        if prefix.block == 0 {
            return Err(PutError::ZeroBlock);
        }
        let chain = key::chain(prefix.model_id, prefix.block, prefix.tokens);
        let full = chain.len() - 1;
        let mut gone = Vec::new();
        let mut written = 0;
        for (index, data) in blocks {
            if index >= full {
                return Err(PutError::NoSuchBlock { index, tokens: prefix.tokens.len() });
            }
            written += self.objects.put(chain[index + 1], Kind::Block, data, &mut gone)?;
        }
        if let Some(i) = (1..=full).find(|&i| !self.objects.contains(&chain[i])) {
            self.forget(&gone);
            return Err(PutError::MissingBlock(i - 1));
        }
        let boundary = chain[full];
        let partial = prefix.tokens[full * prefix.block..].to_vec();
        let key = key::snapshot(&boundary, &partial);
        let mut bytes = Vec::with_capacity(44 + 4 * partial.len() + tail.len());
        bytes.extend(SNAPSHOT_MAGIC);
        bytes.extend(boundary.0);
        bytes.extend((partial.len() as u32).to_le_bytes());
        bytes.extend(partial.iter().flat_map(|t| t.to_le_bytes()));
        bytes.extend(&tail[..]);
        written += self.objects.put(key, Kind::Snapshot, Bytes::from(bytes), &mut gone)?;
        self.forget(&gone);
        let list = self.index.entry(boundary).or_default();
        if !list.iter().any(|s| s.key == key) {
            list.push(SnapshotMeta { key, partial });
        }
        Ok(written)
    }
}

/// (boundary, partial tokens, tail) of a snapshot object.
fn parse_snapshot(bytes: &Bytes) -> Option<(Key, Vec<u32>, Bytes)> {
    if bytes.len() < 40 || &bytes[..4] != SNAPSHOT_MAGIC {
        return None;
    }
    let boundary = Key(bytes[4..36].try_into().ok()?);
    let n = u32::from_le_bytes(bytes[36..40].try_into().ok()?) as usize;
    let end = 40usize.checked_add(n.checked_mul(4)?)?;
    let partial = bytes.get(40..end)?.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Some((boundary, partial, bytes.slice(end..)))
}
