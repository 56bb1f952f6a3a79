//! Immutable objects by key in two tiers: memory first, disk second.
//!
//! Writes go to both (write-through), so the disk tier holds everything the
//! memory tier does and survives a restart; the memory tier is the hot
//! subset. Each tier evicts its least recently used objects when a write
//! would take it over capacity, and the disk never holds less than memory:
//! an object evicted from disk leaves memory too. Every object carries a
//! CRC-32 of its bytes, checked on every read from either tier; a bad object
//! is dropped and reads as missing.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::key::Key;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Block,
    Snapshot,
}

impl Kind {
    fn extension(self) -> &'static str {
        match self {
            Kind::Block => "blk",
            Kind::Snapshot => "snap",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    Memory,
    Disk,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
        }
    }
}

/// What happened to the tiers, for the counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub evictions_memory: u64,
    pub evictions_disk: u64,
    pub corrupt: u64,
}

/// Least-recently-used bookkeeping of one tier.
struct Lru<V> {
    entries: HashMap<Key, (V, u64, usize)>,
    order: BTreeMap<u64, Key>,
    bytes: usize,
    capacity: usize,
}

impl<V> Lru<V> {
    fn new(capacity: usize) -> Self {
        Lru { entries: HashMap::new(), order: BTreeMap::new(), bytes: 0, capacity }
    }

    fn insert(&mut self, key: Key, value: V, size: usize, tick: u64) {
        self.remove(&key);
        self.entries.insert(key, (value, tick, size));
        self.order.insert(tick, key);
        self.bytes += size;
    }

    fn touch(&mut self, key: &Key, tick: u64) -> Option<&V> {
        let (_, t, _) = self.entries.get_mut(key)?;
        self.order.remove(t);
        *t = tick;
        self.order.insert(tick, *key);
        self.entries.get(key).map(|(v, _, _)| v)
    }

    fn remove(&mut self, key: &Key) -> Option<V> {
        let (v, t, size) = self.entries.remove(key)?;
        self.order.remove(&t);
        self.bytes -= size;
        Some(v)
    }

    fn oldest(&self) -> Option<Key> {
        self.order.values().next().copied()
    }
}

struct Memory {
    data: Bytes,
    crc: u32,
    kind: Kind,
}

const MAGIC: &[u8; 4] = b"MYKV";
const HEADER: usize = 16;

pub struct Objects {
    memory: Lru<Memory>,
    disk: Option<(PathBuf, Lru<Kind>)>,
    tick: u64,
    pub counts: Counts,
}

/// An object the tiers dropped for good (evicted from the last tier holding
/// it, or found corrupt).
pub type Gone = Vec<(Key, Kind)>;

impl Objects {
    /// Memory only.
    pub fn in_memory(memory: usize) -> Self {
        Objects { memory: Lru::new(memory), disk: None, tick: 0, counts: Counts::default() }
    }

    /// Memory over a disk directory, reopening what an earlier run left
    /// there. Files that are not whole objects (torn writes) are removed.
    pub fn with_disk(memory: usize, dir: &Path, capacity: usize) -> io::Result<(Self, Vec<(Key, Kind)>)> {
        fs::create_dir_all(dir)?;
        let mut found: Vec<(std::time::SystemTime, Key, Kind, usize)> = Vec::new();
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_stem().and_then(|s| s.to_str()).and_then(Key::from_hex);
            let kind = match path.extension().and_then(|e| e.to_str()) {
                Some("blk") => Some(Kind::Block),
                Some("snap") => Some(Kind::Snapshot),
                _ => None,
            };
            let meta = fs::metadata(&path)?;
            let torn = path.extension().is_some_and(|e| e == "tmp") || meta.len() < HEADER as u64;
            match (name, kind) {
                (Some(_), _) if torn => {
                    tracing::warn!(path = %path.display(), "removing a torn write");
                    let _ = fs::remove_file(&path);
                }
                (Some(key), Some(kind)) => found.push((meta.modified()?, key, kind, meta.len() as usize - HEADER)),
                _ => tracing::warn!(path = %path.display(), "ignoring a file that is not a stored object"),
            }
        }
        found.sort_by_key(|(time, key, _, _)| (*time, *key));
        let mut disk = Lru::new(capacity);
        let mut listed = Vec::new();
        for (tick, (_, key, kind, size)) in found.into_iter().enumerate() {
            disk.insert(key, kind, size, tick as u64);
            listed.push((key, kind));
        }
        let tick = listed.len() as u64;
        let mut objects = Objects {
            memory: Lru::new(memory),
            disk: Some((dir.to_path_buf(), disk)),
            tick,
            counts: Counts::default(),
        };
        // A smaller --disk-capacity than last time: the oldest go first.
        let mut gone = Vec::new();
        objects.evict_disk(&mut gone);
        listed.retain(|o| !gone.contains(o));
        Ok((objects, listed))
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn path(dir: &Path, key: &Key, kind: Kind) -> PathBuf {
        dir.join(format!("{}.{}", key.hex(), kind.extension()))
    }

    pub fn contains(&self, key: &Key) -> bool {
        self.memory.entries.contains_key(key) || self.disk.as_ref().is_some_and(|(_, d)| d.entries.contains_key(key))
    }

    /// The object's bytes and the tier that had them; `None` when missing or
    /// found corrupt (then it is dropped from every tier and listed in `gone`).
    pub fn get(&mut self, key: &Key, gone: &mut Gone) -> Option<(Bytes, Tier)> {
        let tick = self.next_tick();
        if let Some(m) = self.memory.touch(key, tick) {
            if crc32fast::hash(&m.data) == m.crc {
                let data = m.data.clone();
                if let Some((_, disk)) = self.disk.as_mut() {
                    disk.touch(key, tick);
                }
                return Some((data, Tier::Memory));
            }
            tracing::error!(key = ?key, "an object in memory fails its checksum; dropping it");
            let kind = m.kind;
            self.drop_object(key, kind, gone);
            return None;
        }
        let (dir, disk) = self.disk.as_mut()?;
        let kind = *disk.touch(key, tick)?;
        let path = Self::path(dir, key, kind);
        match read_object(&path) {
            Ok(data) => {
                self.insert_memory(*key, data.clone(), kind, gone);
                Some((data, Tier::Disk))
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "a stored object is unreadable; dropping it");
                self.drop_object(key, kind, gone);
                None
            }
        }
    }

    fn drop_object(&mut self, key: &Key, kind: Kind, gone: &mut Gone) {
        self.counts.corrupt += 1;
        self.memory.remove(key);
        if let Some((dir, disk)) = self.disk.as_mut() {
            disk.remove(key);
            let _ = fs::remove_file(Self::path(dir, key, kind));
        }
        gone.push((*key, kind));
    }

    /// Stores an object (a no-op but for recency when it is already held).
    /// Returns the bytes newly written, or an error when the object is larger
    /// than a tier or the disk refuses it.
    pub fn put(&mut self, key: Key, kind: Kind, data: Bytes, gone: &mut Gone) -> io::Result<usize> {
        let too_big = data.len() > u32::MAX as usize
            || data.len() > self.memory.capacity
            || self.disk.as_ref().is_some_and(|(_, d)| data.len() > d.capacity);
        if too_big {
            return Err(io::Error::other(format!("an object of {} bytes is larger than the cache", data.len())));
        }
        let tick = self.next_tick();
        let mut written = 0;
        if let Some((dir, disk)) = self.disk.as_mut()
            && disk.touch(&key, tick).is_none()
        {
            write_object(&Self::path(dir, &key, kind), &data)?;
            disk.insert(key, kind, data.len(), tick);
            written = data.len();
            self.evict_disk(gone);
        }
        if self.memory.touch(&key, tick).is_none() {
            written = written.max(data.len());
            self.insert_memory(key, data, kind, gone);
        }
        Ok(written)
    }

    fn insert_memory(&mut self, key: Key, data: Bytes, kind: Kind, gone: &mut Gone) {
        let tick = self.next_tick();
        let size = data.len();
        if size > self.memory.capacity {
            return;
        }
        let crc = crc32fast::hash(&data);
        self.memory.insert(key, Memory { data, crc, kind }, size, tick);
        while self.memory.bytes > self.memory.capacity {
            let Some(old) = self.memory.oldest() else { break };
            let m = self.memory.remove(&old).expect("listed in the order");
            self.counts.evictions_memory += 1;
            if self.disk.is_none() {
                gone.push((old, m.kind));
            }
        }
    }

    fn evict_disk(&mut self, gone: &mut Gone) {
        let Some((dir, disk)) = self.disk.as_mut() else { return };
        while disk.bytes > disk.capacity {
            let Some(old) = disk.oldest() else { break };
            let kind = disk.remove(&old).expect("listed in the order");
            let _ = fs::remove_file(Self::path(dir, &old, kind));
            self.memory.remove(&old);
            self.counts.evictions_disk += 1;
            gone.push((old, kind));
        }
    }

    /// (bytes, capacity) of the memory tier and of the disk tier (0, 0 without one).
    pub fn usage(&self) -> [(usize, usize); 2] {
        let disk = self.disk.as_ref().map_or((0, 0), |(_, d)| (d.bytes, d.capacity));
        [(self.memory.bytes, self.memory.capacity), disk]
    }

    /// Objects held (in any tier) of each kind.
    pub fn count(&self, kind: Kind) -> usize {
        match &self.disk {
            Some((_, d)) => d.entries.values().filter(|(k, _, _)| *k == kind).count(),
            None => self.memory.entries.values().filter(|(m, _, _)| m.kind == kind).count(),
        }
    }
}

/// `MYKV`, version, reserved, CRC-32 of the payload, payload length, payload.
fn write_object(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(HEADER + data.len());
    bytes.extend(MAGIC);
    bytes.extend([1, 0, 0, 0]);
    bytes.extend(crc32fast::hash(data).to_le_bytes());
    bytes.extend((data.len() as u32).to_le_bytes());
    bytes.extend(data);
    // A torn write leaves a .tmp file (removed on reopen), never a bad object.
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, &bytes)?;
    fs::rename(&tmp, path)
}

fn read_object(path: &Path) -> io::Result<Bytes> {
    let mut file = fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
    if bytes.len() < HEADER || &bytes[..4] != MAGIC || bytes[4] != 1 {
        return Err(bad("not an object file"));
    }
    let crc = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    if bytes.len() != HEADER + len {
        return Err(bad("truncated"));
    }
    if crc32fast::hash(&bytes[HEADER..]) != crc {
        return Err(bad("checksum mismatch"));
    }
    Ok(Bytes::from(bytes).slice(HEADER..))
}
