//! A projection's weights in the format the checkpoint stores them: f32,
//! BF16/F16, block-FP8 or MXFP4. Only f32 is held as f32; the others stay
//! in their bytes (memory-mapped) and the matmul expands each block of rows
//! it is about to use ([`kernels::WeightRows`]). Expansion is exact, so a
//! model computes the same bits whatever format holds the same values.

use crate::kernels::WeightRows;
use crate::quant;
use crate::tensor::{MappedBytes, Tensor, widen_half};

#[derive(Debug)]
pub enum Stored {
    F32(Tensor),
    /// 16-bit floats, little-endian: BF16 when `bf16`, else IEEE F16.
    Half {
        bytes: MappedBytes,
        bf16: bool,
    },
    /// Block-FP8 codes `[out, inp]` and the decoded block scales.
    Fp8 {
        codes: MappedBytes,
        scales: Vec<f32>,
    },
    /// MXFP4 bytes `[out, inp/2]` and their E8M0 group scales `[out, inp/32]`,
    /// both as stored (decoded scales would add a quarter to the bytes).
    Fp4 {
        packed: MappedBytes,
        scales: MappedBytes,
    },
}

/// A stored `[out, inp]` weight matrix.
#[derive(Debug)]
pub struct StoredMatrix {
    pub stored: Stored,
    pub out: usize,
    pub inp: usize,
}

impl StoredMatrix {
    /// Bytes it holds: what a worker's memory pays for it.
    pub fn bytes(&self) -> usize {
        match &self.stored {
            Stored::F32(t) => t.data().len() * 4,
            Stored::Half { bytes, .. } => bytes.as_slice().len(),
            Stored::Fp8 { codes, scales } => codes.as_slice().len() + scales.len() * 4,
            Stored::Fp4 { packed, scales } => packed.as_slice().len() + scales.as_slice().len(),
        }
    }

    /// The whole matrix as f32 (for tests and for code that needs it whole).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut scratch = Vec::new();
        self.rows(0, self.out, &mut scratch).to_vec()
    }
}

impl WeightRows for StoredMatrix {
    fn rows<'a>(&'a self, c0: usize, c1: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        let inp = self.inp;
        scratch.clear();
        if !matches!(self.stored, Stored::F32(_)) {
            scratch.reserve((c1 - c0) * inp);
        }
        match &self.stored {
            Stored::F32(t) => return &t.data()[c0 * inp..c1 * inp],
            Stored::Half { bytes, bf16 } => {
                scratch.extend(widen_half(&bytes.as_slice()[c0 * inp * 2..c1 * inp * 2], *bf16))
            }
            Stored::Fp8 { codes, scales } => {
                quant::expand_fp8(&codes.as_slice()[c0 * inp..c1 * inp], scales, inp, c0, scratch)
            }
            Stored::Fp4 { packed, scales } => {
                quant::expand_fp4(&packed.as_slice()[c0 * inp / 2..c1 * inp / 2], scales.as_slice(), inp, c0, scratch)
            }
        }
        scratch
    }
}

/// Rows `offset..` of a matrix, as a matrix of their own (a group of a
/// grouped projection).
pub struct RowsFrom<'w> {
    pub w: &'w StoredMatrix,
    pub offset: usize,
}

impl WeightRows for RowsFrom<'_> {
    fn rows<'a>(&'a self, c0: usize, c1: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        self.w.rows(self.offset + c0, self.offset + c1, scratch)
    }
}
