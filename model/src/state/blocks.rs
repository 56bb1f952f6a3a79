//! [`SequenceState`] as a chain of immutable blocks plus a small tail: the
//! form the KV-cache service stores.
//!
//! Compressed entries (CSA, HCA and the indexer's) are append-only and the
//! entry for window `w` depends only on the tokens up to that window, so the
//! entries of tokens `[i·B, (i+1)·B)` are the same bytes in every sequence
//! that starts with those tokens. With `B` a multiple of every compression
//! rate ([`block_tokens`]), block `i` holds exactly those entries, layer by
//! layer, compressor then indexer. Everything else (the sliding window, the
//! compressors' pending projections and overlap series, and the entries of
//! the last, partial block) belongs to one position only and goes in the
//! tail.
//!
//! Both are little-endian f32 with no padding. A block has a fixed size for a
//! model; a tail starts with a header of row counts that [`from_blocks`]
//! checks against the model and the position, so bytes from another model, a
//! truncated transfer or a bug become an error, never a wrong state.

use super::{CompressorState, LayerState, SequenceState};
use crate::config::{LayerType, ModelConfig};

const TAIL_MAGIC: &[u8; 4] = b"MYS1";
/// Smallest block worth its own key: a few hundred tokens keeps per-block
/// overheads (key, checksum, index) well under 1 % of the payload.
const MIN_BLOCK_TOKENS: usize = 256;

/// Bytes that cannot be this model's state at this position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sequence state does not fit the model: {0}")]
pub struct StateCodecError(pub String);

fn bad(why: impl Into<String>) -> StateCodecError {
    StateCodecError(why.into())
}

/// Tokens per block: the smallest multiple of both compression rates that is
/// at least [`MIN_BLOCK_TOKENS`].
pub fn block_tokens(cfg: &ModelConfig) -> usize {
    let (a, b) = (cfg.csa_rate.max(1), cfg.hca_rate.max(1));
    let lcm = a / gcd(a, b) * b;
    MIN_BLOCK_TOKENS.div_ceil(lcm) * lcm
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The compression rate of a layer's compressors (`None` for sliding layers).
fn rate(cfg: &ModelConfig, layer: usize) -> Option<usize> {
    match cfg.layer_types[layer] {
        LayerType::Sliding => None,
        LayerType::Csa => Some(cfg.csa_rate),
        LayerType::Hca => Some(cfg.hca_rate),
    }
}

/// The compressors of one layer, with their rate, in block order.
fn compressors<'a>(cfg: &ModelConfig, layer: usize, state: &'a LayerState) -> Vec<(usize, &'a CompressorState)> {
    let Some(r) = rate(cfg, layer) else { return Vec::new() };
    state.compressor.iter().chain(&state.indexer).map(|c| (r, c)).collect()
}

/// Bytes of one full block of this model.
pub fn block_bytes(cfg: &ModelConfig) -> usize {
    let b = block_tokens(cfg);
    let empty = SequenceState::new(cfg);
    let floats: usize = (0..cfg.num_hidden_layers)
        .flat_map(|l| compressors(cfg, l, &empty.layers[l]).into_iter().map(|(r, c)| b / r * c.dim).collect::<Vec<_>>())
        .sum();
    floats * 4
}

fn put(out: &mut Vec<u8>, floats: &[f32]) {
    out.extend(floats.iter().flat_map(|f| f.to_le_bytes()));
}

/// Reads `n` floats from the front of `bytes`.
fn take(bytes: &mut &[u8], n: usize, what: &str) -> Result<Vec<f32>, StateCodecError> {
    let len = n.checked_mul(4).ok_or_else(|| bad(format!("{what}: size overflows")))?;
    if bytes.len() < len {
        return Err(bad(format!("{what}: needs {len} bytes, {} left", bytes.len())));
    }
    let (head, rest) = bytes.split_at(len);
    *bytes = rest;
    Ok(head.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn take_u64(bytes: &mut &[u8], what: &str) -> Result<u64, StateCodecError> {
    if bytes.len() < 8 {
        return Err(bad(format!("{what}: truncated")));
    }
    let (head, rest) = bytes.split_at(8);
    *bytes = rest;
    Ok(u64::from_le_bytes(head.try_into().expect("8 bytes")))
}

impl SequenceState {
    /// Full blocks this state has: `position / B`.
    pub fn full_blocks(&self, cfg: &ModelConfig) -> usize {
        self.position / block_tokens(cfg)
    }

    /// Block `index` (< [`full_blocks`](Self::full_blocks)) as bytes.
    pub fn encode_block(&self, cfg: &ModelConfig, index: usize) -> Vec<u8> {
        let b = block_tokens(cfg);
        assert!(index < self.full_blocks(cfg), "block {index} is not complete at position {}", self.position);
        let mut out = Vec::with_capacity(block_bytes(cfg));
        for (l, layer) in self.layers.iter().enumerate() {
            for (r, c) in compressors(cfg, l, layer) {
                let rows = index * b / r..(index + 1) * b / r;
                put(&mut out, &c.entries[rows.start * c.dim..rows.end * c.dim]);
            }
        }
        out
    }

    /// Everything the blocks do not hold, with a header of row counts.
    pub fn encode_tail(&self, cfg: &ModelConfig) -> Vec<u8> {
        let first_partial = self.full_blocks(cfg) * block_tokens(cfg);
        let mut header = Vec::new();
        let mut data = Vec::new();
        header.extend(TAIL_MAGIC);
        header.extend((self.position as u64).to_le_bytes());
        for (l, layer) in self.layers.iter().enumerate() {
            header.extend((layer.window.len() as u64).to_le_bytes());
            put(&mut data, &layer.window);
            for (r, c) in compressors(cfg, l, layer) {
                let from = first_partial / r * c.dim;
                for part in [&c.pending_kv[..], &c.pending_gate, &c.overlap_kv, &c.overlap_gate, &c.entries[from..]] {
                    header.extend((part.len() as u64).to_le_bytes());
                    put(&mut data, part);
                }
            }
        }
        header.extend(data);
        header
    }

    /// Rebuilds the state from its first blocks and its tail, checking every
    /// size against the model and the position the tail names.
    pub fn from_blocks(cfg: &ModelConfig, blocks: &[&[u8]], tail: &[u8]) -> Result<Self, StateCodecError> {
        let b = block_tokens(cfg);
        let mut state = SequenceState::new(cfg);
        let mut t = tail;
        if t.get(..4) != Some(&TAIL_MAGIC[..]) {
            return Err(bad("the tail does not start with this format's magic"));
        }
        t = &t[4..];
        let position = usize::try_from(take_u64(&mut t, "position")?).map_err(|_| bad("position overflows"))?;
        if position / b != blocks.len() {
            return Err(bad(format!("position {position} needs {} blocks, got {}", position / b, blocks.len())));
        }
        state.position = position;
        let want = block_bytes(cfg);
        if let Some((i, blk)) = blocks.iter().enumerate().find(|(_, blk)| blk.len() != want) {
            return Err(bad(format!("block {i} has {} bytes, this model's blocks have {want}", blk.len())));
        }
        // Header: per layer the window length, then five lengths per compressor.
        let mut lens = Vec::new();
        for (l, layer) in state.layers.iter().enumerate() {
            lens.push(take_u64(&mut t, "window length")?);
            for _ in compressors(cfg, l, layer) {
                for _ in 0..5 {
                    lens.push(take_u64(&mut t, "compressor length")?);
                }
            }
        }
        let mut lens = lens.into_iter().map(|n| n as usize);
        let mut blocks: Vec<&[u8]> = blocks.to_vec();
        let window_rows = position.min(cfg.sliding_window.saturating_sub(1));
        for l in 0..state.layers.len() {
            let layer = &mut state.layers[l];
            let window = take(&mut t, lens.next().unwrap_or(0), "window")?;
            expect(window.len(), window_rows * cfg.head_dim, l, "window")?;
            layer.window = window;
            let r = rate(cfg, l);
            for c in layer.compressor.iter_mut().chain(layer.indexer.iter_mut()) {
                let r = r.expect("only compressed layers have compressors");
                let width = c.width;
                c.pending_kv = take(&mut t, lens.next().unwrap_or(0), "pending kv")?;
                expect(c.pending_kv.len(), position % r * width, l, "pending kv")?;
                c.pending_gate = take(&mut t, lens.next().unwrap_or(0), "pending gate")?;
                expect(c.pending_gate.len(), position % r * width, l, "pending gate")?;
                let overlap_rows = if width > c.dim && position >= r { r } else { 0 };
                c.overlap_kv = take(&mut t, lens.next().unwrap_or(0), "overlap kv")?;
                expect(c.overlap_kv.len(), overlap_rows * c.dim, l, "overlap kv")?;
                c.overlap_gate = take(&mut t, lens.next().unwrap_or(0), "overlap gate")?;
                expect(c.overlap_gate.len(), overlap_rows * c.dim, l, "overlap gate")?;
                let mut entries = Vec::with_capacity(position / r * c.dim);
                for blk in blocks.iter_mut() {
                    entries.extend(take(blk, b / r * c.dim, "block entries")?);
                }
                let partial = take(&mut t, lens.next().unwrap_or(0), "partial entries")?;
                entries.extend(partial);
                expect(entries.len(), position / r * c.dim, l, "compressed entries")?;
                c.entries = entries;
            }
        }
        if !t.is_empty() {
            return Err(bad(format!("{} bytes left over after the tail", t.len())));
        }
        Ok(state)
    }
}

fn expect(got: usize, want: usize, layer: usize, what: &str) -> Result<(), StateCodecError> {
    if got == want { Ok(()) } else { Err(bad(format!("layer {layer} {what}: {got} floats, expected {want}"))) }
}

/// The state a sequence of `position` tokens has, with every value zero: its
/// exact shape without running the model (for size planning and benchmarks).
pub fn shaped(cfg: &ModelConfig, position: usize) -> SequenceState {
    let mut state = SequenceState::new(cfg);
    state.position = position;
    for (l, layer) in state.layers.iter_mut().enumerate() {
        layer.window = vec![0.0; position.min(cfg.sliding_window.saturating_sub(1)) * cfg.head_dim];
        let r = rate(cfg, l);
        for c in layer.compressor.iter_mut().chain(layer.indexer.iter_mut()) {
            let r = r.expect("only compressed layers have compressors");
            c.pending_kv = vec![0.0; position % r * c.width];
            c.pending_gate = c.pending_kv.clone();
            let overlap = if c.width > c.dim && position >= r { r * c.dim } else { 0 };
            c.overlap_kv = vec![0.0; overlap];
            c.overlap_gate = c.overlap_kv.clone();
            c.entries = vec![0.0; position / r * c.dim];
        }
    }
    state
}
