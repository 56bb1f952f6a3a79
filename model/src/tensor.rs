//! A read-only f32 tensor: either a view into a memory-mapped checkpoint
//! (zero copy) or an owned buffer (converted from BF16/F16); and
//! [`MappedBytes`], a tensor's bytes as stored.

use std::sync::Arc;

use memmap2::Mmap;

enum Storage {
    Mapped { map: Arc<Mmap>, offset: usize, len: usize },
    Owned(Vec<f32>),
}

pub struct Tensor {
    storage: Storage,
    shape: Vec<usize>,
}

impl Tensor {
    pub fn owned(data: Vec<f32>, shape: Vec<usize>) -> Self {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        Tensor { storage: Storage::Owned(data), shape }
    }

    /// A zero-copy view, or `None` when the bytes are not 4-byte aligned.
    pub fn from_mapped(map: Arc<Mmap>, offset: usize, shape: Vec<usize>) -> Option<Self> {
        let len: usize = shape.iter().product();
        let aligned = (map.as_ptr() as usize + offset).is_multiple_of(std::mem::align_of::<f32>());
        if !aligned || offset + len * 4 > map.len() {
            return None;
        }
        prefault(&map[offset..offset + len * 4]);
        Some(Tensor { storage: Storage::Mapped { map, offset, len }, shape })
    }

    pub fn data(&self) -> &[f32] {
        match &self.storage {
            Storage::Owned(v) => v,
            Storage::Mapped { map, offset, len } => {
                let bytes = &map[*offset..*offset + *len * 4];
                // SAFETY: alignment and bounds were checked in `from_mapped`;
                // every bit pattern is a valid f32; the map lives as long as self.
                unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), *len) }
            }
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Row `i` of a 2-D tensor.
    pub fn row(&self, i: usize) -> &[f32] {
        let cols = self.shape[self.shape.len() - 1];
        &self.data()[i * cols..(i + 1) * cols]
    }
}

/// Little-endian 16-bit floats (BF16 when `bf16`, else IEEE F16) as f32:
/// exact, the one place that widens them.
pub fn widen_half(bytes: &[u8], bf16: bool) -> impl Iterator<Item = f32> + '_ {
    bytes.chunks_exact(2).map(move |b| {
        if bf16 {
            half::bf16::from_le_bytes([b[0], b[1]]).to_f32()
        } else {
            half::f16::from_le_bytes([b[0], b[1]]).to_f32()
        }
    })
}

/// Reads one byte of every page of `bytes`, so the load pays a mapped
/// tensor's page faults once, up front, and not the first forward pass.
fn prefault(bytes: &[u8]) {
    let touched = bytes.iter().step_by(4096).fold(0u8, |sum, &b| sum.wrapping_add(b));
    std::hint::black_box(touched);
}

/// Bytes of one tensor inside a memory-mapped checkpoint, kept as stored
/// (quantized codes, 16-bit floats).
pub struct MappedBytes {
    map: Arc<Mmap>,
    offset: usize,
    len: usize,
}

impl MappedBytes {
    /// `None` when the range is outside the mapping.
    pub fn new(map: Arc<Mmap>, offset: usize, len: usize) -> Option<Self> {
        prefault(map.get(offset..offset.checked_add(len)?)?);
        Some(MappedBytes { map, offset, len })
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.map[self.offset..self.offset + self.len]
    }

    /// Drops these bytes' pages from memory once a copy of them is all that
    /// is used (they are read back from the file if touched again), so they
    /// do not count twice in the process's resident memory.
    pub fn release(self) {
        #[cfg(unix)]
        {
            let page = 4096;
            let (start, end) = (self.offset.next_multiple_of(page), (self.offset + self.len) / page * page);
            if end > start {
                // SAFETY: the mapping is read-only and file-backed: dropping
                // its pages changes no byte a reader can observe (they are
                // faulted in again from the unchanged file), and only whole
                // pages inside this tensor's range are dropped.
                let _ =
                    unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
            }
        }
    }
}

impl std::fmt::Debug for MappedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedBytes({})", self.len)
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor{:?}", self.shape)
    }
}
