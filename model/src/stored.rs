//! A projection's weights in the format the checkpoint stores them: f32,
//! BF16/F16, block-FP8 or MXFP4. Only f32 is held as f32; the others stay
//! in their bytes (memory-mapped) and the matmul reads them as they are
//! ([`Weights`]), expanding each weight exactly, so a model computes the
//! same bits whatever format holds the same values.

use crate::kernels::Weights;
use crate::tensor::{MappedBytes, Tensor};

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
    /// MXFP4 bytes `[out, inp/2]` in kernel order
    /// ([`crate::quant::fp4_kernel_order`], the same size as stored) and
    /// their E8M0 group scales `[out, inp/32]` as stored (decoded scales
    /// would add a quarter to the bytes).
    Fp4 {
        packed: Vec<u8>,
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
            Stored::Fp4 { packed, scales } => packed.len() + scales.as_slice().len(),
        }
    }

    /// How the matmul reads it.
    pub fn weights(&self) -> Weights<'_> {
        match &self.stored {
            Stored::F32(t) => Weights::F32(t.data()),
            Stored::Half { bytes, bf16 } => Weights::Half { bytes: bytes.as_slice(), bf16: *bf16 },
            Stored::Fp8 { codes, scales } => Weights::Fp8 { codes: codes.as_slice(), scales, first: 0 },
            Stored::Fp4 { packed, scales } => Weights::Fp4 { packed, scales: scales.as_slice() },
        }
    }

    /// The whole matrix as f32 (for tests and for code that needs it whole).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.out * self.inp);
        self.weights().expand(self.inp, &mut out);
        out
    }
}
