//! How the matmul reads each stored weight format. [`Weights`] is the
//! borrowed view callers pass; each format has a reader type (one per format,
//! so the kernels are compiled once per format with its expansion inlined).
//! Every reader gives exactly the f32 values [`crate::quant`] and
//! [`crate::tensor::widen_half`] define.

use std::marker::PhantomData;

use crate::quant::{self, E2M1_TWICE, E4M3, E8M0_HALF, FP4_GROUP, FP8_BLOCK};
use crate::tensor::widen_half;

/// A weight matrix `[n, k]` in its stored format, as the matmul reads it.
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    /// 16-bit floats, little-endian: BF16 when `bf16`, else IEEE F16.
    Half {
        bytes: &'a [u8],
        bf16: bool,
    },
    /// Block-FP8 codes of these rows, the whole matrix's decoded block
    /// scales (each of magnitude below [`quant::FP8_KERNEL_SCALE_LIMIT`]), and the
    /// matrix row of this view's first row (it picks the block row of
    /// scales).
    Fp8 {
        codes: &'a [u8],
        scales: &'a [f32],
        first: usize,
    },
    /// MXFP4 bytes and the E8M0 group scales of these rows.
    Fp4 {
        packed: &'a [u8],
        scales: &'a [u8],
    },
}

impl<'a> Weights<'a> {
    /// Rows `c0..c1` of this `k`-wide matrix, as a matrix of their own.
    pub fn rows(self, k: usize, c0: usize, c1: usize) -> Self {
        match self {
            Weights::F32(w) => Weights::F32(&w[c0 * k..c1 * k]),
            Weights::Half { bytes, bf16 } => Weights::Half { bytes: &bytes[c0 * k * 2..c1 * k * 2], bf16 },
            Weights::Fp8 { codes, scales, first } => {
                Weights::Fp8 { codes: &codes[c0 * k..c1 * k], scales, first: first + c0 }
            }
            Weights::Fp4 { packed, scales } => {
                let groups = k / FP4_GROUP;
                Weights::Fp4 { packed: &packed[c0 * k / 2..c1 * k / 2], scales: &scales[c0 * groups..c1 * groups] }
            }
        }
    }

    /// Whether the view holds exactly an `[n, k]` matrix (with every scale
    /// its rows need, each one the kernels can take).
    pub fn holds(self, n: usize, k: usize) -> bool {
        match self {
            Weights::F32(w) => w.len() == n * k,
            Weights::Half { bytes, .. } => bytes.len() == 2 * n * k,
            Weights::Fp8 { codes, scales, first } => {
                codes.len() == n * k
                    && scales.len() >= (first + n).div_ceil(FP8_BLOCK) * k.div_ceil(FP8_BLOCK)
                    && scales.iter().all(|s| s.abs() < quant::FP8_KERNEL_SCALE_LIMIT)
            }
            Weights::Fp4 { packed, scales } => {
                k.is_multiple_of(FP4_GROUP) && packed.len() == n * k / 2 && scales.len() == n * k / FP4_GROUP
            }
        }
    }

    /// Bytes of one `k`-wide row's weights, scales aside.
    pub fn row_bytes(self, k: usize) -> usize {
        match self {
            Weights::F32(_) => 4 * k,
            Weights::Half { .. } => 2 * k,
            Weights::Fp8 { .. } => k,
            Weights::Fp4 { .. } => k / 2,
        }
    }

    /// Appends every row, as f32, to `out` (exact).
    pub fn expand(self, k: usize, out: &mut Vec<f32>) {
        match self {
            Weights::F32(w) => out.extend_from_slice(w),
            Weights::Half { bytes, bf16 } => out.extend(widen_half(bytes, bf16)),
            Weights::Fp8 { codes, scales, first } => quant::expand_fp8(codes, scales, k, first, out),
            Weights::Fp4 { packed, scales } => quant::expand_fp4(packed, scales, k, 0, out),
        }
    }
}

/// One stored format as the kernels read it: weight `j` of row `c` of a
/// `[n, k]` matrix, or a whole row.
pub(crate) trait Rows: Copy + Send + Sync {
    /// Whether rows are stored as f32 (nothing to expand).
    const F32: bool = false;
    fn value(&self, c: usize, j: usize) -> f32;
    /// Row `c` as f32: borrowed when stored so, else expanded into `scratch`.
    fn row<'s>(&'s self, c: usize, k: usize, scratch: &'s mut Vec<f32>) -> &'s [f32];
}

/// Expands row `c` of `w` through [`Weights::expand`].
fn expanded<'s>(w: Weights<'_>, c: usize, k: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
    scratch.clear();
    w.rows(k, c, c + 1).expand(k, scratch);
    scratch
}

#[derive(Clone, Copy)]
pub(crate) struct F32Rows<'a> {
    pub w: &'a [f32],
    pub k: usize,
}

impl Rows for F32Rows<'_> {
    const F32: bool = true;
    fn value(&self, c: usize, j: usize) -> f32 {
        self.w[c * self.k + j]
    }
    fn row<'s>(&'s self, c: usize, k: usize, _: &'s mut Vec<f32>) -> &'s [f32] {
        &self.w[c * k..(c + 1) * k]
    }
}

/// BF16 (`bf16`) or F16 rows: two separate types so each kernel knows which.
#[derive(Clone, Copy)]
pub(crate) struct Bf16Rows<'a> {
    pub bytes: &'a [u8],
    pub k: usize,
}

#[derive(Clone, Copy)]
pub(crate) struct F16Rows<'a> {
    pub bytes: &'a [u8],
    pub k: usize,
}

impl Rows for Bf16Rows<'_> {
    fn value(&self, c: usize, j: usize) -> f32 {
        let at = 2 * (c * self.k + j);
        half::bf16::from_le_bytes([self.bytes[at], self.bytes[at + 1]]).to_f32()
    }
    fn row<'s>(&'s self, c: usize, k: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        expanded(Weights::Half { bytes: self.bytes, bf16: true }, c, k, scratch)
    }
}

impl Rows for F16Rows<'_> {
    fn value(&self, c: usize, j: usize) -> f32 {
        let at = 2 * (c * self.k + j);
        half::f16::from_le_bytes([self.bytes[at], self.bytes[at + 1]]).to_f32()
    }
    fn row<'s>(&'s self, c: usize, k: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        expanded(Weights::Half { bytes: self.bytes, bf16: false }, c, k, scratch)
    }
}

/// How the SIMD kernels expand E4M3 codes: two exact routes, each giving
/// every code's value divided by its own power of two, [`Self::REBIAS`],
/// which the kernels take back in the scale (`Fp8Rows`) or the inputs
/// (`Fp8Codes`). Which is faster depends on the core (`super::fp8_route`).
pub(crate) trait E4m3Route: Copy + Send + Sync {
    const REBIAS: f32;
}

/// Through F16: the code's bits moved onto an F16's, then the F16
/// conversion instruction. Values at `2^-8`, never an f32 subnormal.
#[derive(Clone, Copy)]
pub(crate) struct ViaHalf;

/// Integer moves only ([`quant::e4m3_low`]): values at `2^-120`, the
/// subnormal codes as f32 subnormals, which some cores multiply at full
/// speed and others only through a microcode assist.
#[derive(Clone, Copy)]
pub(crate) struct ViaBits;

impl E4m3Route for ViaHalf {
    const REBIAS: f32 = 256.0;
}

impl E4m3Route for ViaBits {
    const REBIAS: f32 = quant::E4M3_REBIAS;
}

#[derive(Clone, Copy)]
pub(crate) struct Fp8Rows<'a, R> {
    pub codes: &'a [u8],
    pub scales: &'a [f32],
    pub first: usize,
    pub k: usize,
    pub route: PhantomData<R>,
}

impl<R> Fp8Rows<'_, R> {
    /// The scale of the block holding weight `j` of row `c`.
    #[inline(always)]
    pub fn scale(&self, c: usize, j: usize) -> f32 {
        let at = (self.first + c) / FP8_BLOCK * self.k.div_ceil(FP8_BLOCK) + j / FP8_BLOCK;
        debug_assert!(at < self.scales.len());
        // SAFETY: `linear_with` checked that the scales cover every row
        // (`Weights::holds`), and `c`, `j` lie inside the matrix.
        unsafe { *self.scales.get_unchecked(at) }
    }
}

impl<R: E4m3Route> Rows for Fp8Rows<'_, R> {
    fn value(&self, c: usize, j: usize) -> f32 {
        E4M3[usize::from(self.codes[c * self.k + j])] * self.scale(c, j)
    }
    fn row<'s>(&'s self, c: usize, k: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        let w = Weights::Fp8 { codes: self.codes, scales: self.scales, first: self.first };
        expanded(w, c, k, scratch)
    }
}

/// Block-FP8 codes without their scales, each read as its E4M3 value
/// divided by the route's [`E4m3Route::REBIAS`]: what a task reads once it
/// has moved each block's scale, times that, onto its inputs.
#[derive(Clone, Copy)]
pub(crate) struct Fp8Codes<'a, R> {
    pub codes: &'a [u8],
    pub k: usize,
    pub route: PhantomData<R>,
}

impl<R: E4m3Route> Rows for Fp8Codes<'_, R> {
    fn value(&self, c: usize, j: usize) -> f32 {
        E4M3[usize::from(self.codes[c * self.k + j])] / R::REBIAS
    }
    fn row<'s>(&'s self, c: usize, k: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        scratch.clear();
        scratch.extend((0..k).map(|j| self.value(c, j)));
        scratch
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Fp4Rows<'a> {
    pub packed: &'a [u8],
    pub scales: &'a [u8],
    pub k: usize,
}

impl Fp4Rows<'_> {
    /// The E8M0 code of the group holding weight `j` of row `c`.
    #[inline(always)]
    fn scale_code(&self, c: usize, j: usize) -> usize {
        let at = c * (self.k / FP4_GROUP) + j / FP4_GROUP;
        debug_assert!(at < self.scales.len());
        // SAFETY: `linear_with` checked that there is one scale per group
        // (`Weights::holds`), and `c`, `j` lie inside the matrix.
        usize::from(unsafe { *self.scales.get_unchecked(at) })
    }

    /// Half the scale of the group holding weight `j` of row `c` (the
    /// kernels read codes as twice their value: [`E2M1_TWICE`]).
    #[inline(always)]
    pub fn half_scale(&self, c: usize, j: usize) -> f32 {
        E8M0_HALF[self.scale_code(c, j)]
    }
}

impl Rows for Fp4Rows<'_> {
    fn value(&self, c: usize, j: usize) -> f32 {
        let (group, at) = (j / FP4_GROUP, j % FP4_GROUP);
        let byte = self.packed[(c * self.k + group * FP4_GROUP) / 2 + at % (FP4_GROUP / 2)];
        let code = if at < FP4_GROUP / 2 { byte & 0x0F } else { byte >> 4 };
        f32::from(E2M1_TWICE[usize::from(code)]) * self.half_scale(c, j)
    }
    fn row<'s>(&'s self, c: usize, k: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        expanded(Weights::Fp4 { packed: self.packed, scales: self.scales }, c, k, scratch)
    }
}
