//! Per-sequence decoding state, owned by the sequence and not by the model,
//! so it can be stored, shipped to another router and restored (the KV-cache
//! service stores exactly this type).
//!
//! Per layer it holds what the next forward step needs and nothing else:
//!
//! * `window`: the last `sliding_window - 1` key/value entries (shared-KV, after
//!   RoPE), the only raw-token attention state;
//! * for CSA/HCA layers, a [`CompressorState`] (and for CSA a second one for the
//!   lightning indexer): the projections of tokens that have not yet filled a
//!   window, the previous window's Ca series (CSA overlap), and every
//!   compressed entry emitted so far (append-only).

pub mod blocks;

use serde::{Deserialize, Serialize};

pub use blocks::{StateCodecError, block_bytes, block_tokens, shaped};

use crate::config::{LayerType, ModelConfig};
use crate::kernels::KeyBlocks;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequenceState {
    /// Tokens consumed so far: the position of the next token.
    pub position: usize,
    pub layers: Vec<LayerState>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerState {
    /// Row-major `[n, head_dim]` sliding-window entries, oldest first.
    pub window: Vec<f32>,
    pub compressor: Option<CompressorState>,
    pub indexer: Option<CompressorState>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompressorState {
    /// Entry width.
    pub dim: usize,
    /// Projection width (`2 * dim` with CSA overlap, else `dim`).
    pub width: usize,
    /// `[n < rate, width]` kv projections of tokens not yet in a full window.
    pub pending_kv: Vec<f32>,
    /// Their gate logits (without the position bias).
    pub pending_gate: Vec<f32>,
    /// CSA: the last full window's Ca series `[rate, dim]`: kv and gate logits
    /// with the position bias added. Empty before the first window closes.
    pub overlap_kv: Vec<f32>,
    pub overlap_gate: Vec<f32>,
    /// `[entries, dim]` compressed entries (normed, RoPE applied), append-only.
    pub entries: Vec<f32>,
    /// `entries` laid out for [`crate::kernels::scores`], extended as entries are
    /// appended ([`CompressorState::lay_out`]) so a decode step does not
    /// lay out every entry again. Derived: not stored, not compared.
    #[serde(skip)]
    pub layout: Layout,
}

/// A cache of [`CompressorState::entries`] as [`KeyBlocks`]; equal to any
/// other (it is determined by the entries, which are compared).
#[derive(Clone, Default)]
pub struct Layout(KeyBlocks);

impl PartialEq for Layout {
    fn eq(&self, _: &Layout) -> bool {
        true
    }
}

impl std::fmt::Debug for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Layout({} entries)", self.0.len())
    }
}

impl CompressorState {
    pub fn new(dim: usize, overlap: bool) -> Self {
        CompressorState {
            dim,
            width: if overlap { 2 * dim } else { dim },
            pending_kv: Vec::new(),
            pending_gate: Vec::new(),
            overlap_kv: Vec::new(),
            overlap_gate: Vec::new(),
            entries: Vec::new(),
            layout: Layout::default(),
        }
    }

    /// Lays out the entries appended since the last call (all of them if
    /// the entries were replaced by fewer).
    pub fn lay_out(&mut self) {
        let keys = &mut self.layout.0;
        if keys.dim() != self.dim || keys.len() > self.entries.len() / self.dim {
            *keys = KeyBlocks::new(self.dim);
        }
        keys.extend(&self.entries[keys.len() * self.dim..]);
    }

    /// The entries as [`lay_out`](Self::lay_out) last laid them out.
    pub fn laid_out(&self) -> &KeyBlocks {
        &self.layout.0
    }

    pub fn entry_count(&self) -> usize {
        self.entries.len() / self.dim
    }

    pub fn pending_count(&self) -> usize {
        self.pending_kv.len() / self.width
    }
}

impl SequenceState {
    /// The empty state of a new sequence.
    pub fn new(cfg: &ModelConfig) -> Self {
        let layers = cfg
            .layer_types
            .iter()
            .map(|t| LayerState {
                window: Vec::new(),
                compressor: match t {
                    LayerType::Sliding => None,
                    LayerType::Csa => Some(CompressorState::new(cfg.head_dim, true)),
                    LayerType::Hca => Some(CompressorState::new(cfg.head_dim, false)),
                },
                indexer: (*t == LayerType::Csa).then(|| CompressorState::new(cfg.index_head_dim, true)),
            })
            .collect();
        SequenceState { position: 0, layers }
    }

    /// Bytes of f32 state held (what the KV-cache service will store).
    pub fn size_bytes(&self) -> usize {
        let floats: usize = self
            .layers
            .iter()
            .map(|l| {
                let c = |s: &Option<CompressorState>| {
                    s.as_ref().map_or(0, |s| {
                        s.pending_kv.len()
                            + s.pending_gate.len()
                            + s.overlap_kv.len()
                            + s.overlap_gate.len()
                            + s.entries.len()
                    })
                };
                l.window.len() + c(&l.compressor) + c(&l.indexer)
            })
            .sum();
        floats * 4
    }
}
