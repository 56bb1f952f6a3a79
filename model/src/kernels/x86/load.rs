//! How the kernels read each stored format: [`Load`] gives 16 (or 32)
//! weights of one row as f32 vectors, expanded with exactly the values
//! `crate::quant` defines, and prefetches a row's lines.

use std::arch::x86_64::*;

use super::fetch;
use crate::kernels::LANES;
use crate::kernels::formats::{
    Bf16Rows, E4m3Route, F16Rows, F32Rows, Fp4Rows, Fp8Codes, Fp8Rows, Rows, ViaBits, ViaHalf,
};
use crate::quant::{E2M1_TWICE, E8M0, E8M0_HALF, FP4_GROUP, FP8_BLOCK};

/// Loads weights `i..i + 16` of one weight row as f32 vectors. A kernel
/// takes each of its rows once ([`Load::row_at`]: pointers to the row's
/// weights and scales) and steps through them by input index, so the inner
/// loop does no row arithmetic.
///
/// # Safety
/// The caller runs with AVX-512F and BW (`load512`, `load512_pair`) or
/// AVX2+FMA+F16C (`load256`),
/// the row lies inside the matrix, `i` is a multiple of 16 and `i + 16 <= k`.
pub(crate) trait Load: Rows {
    /// Where one weight row's data starts.
    type Row: Copy;
    /// Inputs of one row per 64-byte line of its stored weights.
    const LINE_INPUTS: usize;

    /// Row `c` of the matrix.
    fn row_at(&self, c: usize) -> Self::Row;

    /// Asks the cache for the line holding weight `i` of `row` (and for
    /// the line of its scales, once per line of them). `i` may lie past the
    /// row (`i + m·k` is weight `i` of the row `m` on) and past the matrix:
    /// a prefetch never faults and reads nothing.
    fn prefetch(row: Self::Row, i: usize);

    unsafe fn load512(row: Self::Row, i: usize) -> __m512;
    unsafe fn load256(row: Self::Row, i: usize) -> (__m256, __m256);

    /// Weights `i..i + 32` of `row` as two vectors (`i + 32 <= k`), for
    /// formats that decode 32 at a time more cheaply than twice 16.
    #[inline(always)]
    unsafe fn load512_pair(row: Self::Row, i: usize) -> (__m512, __m512) {
        unsafe { (Self::load512(row, i), Self::load512(row, i + LANES)) }
    }
}

impl Load for F32Rows<'_> {
    type Row = *const f32;
    const LINE_INPUTS: usize = 16;
    #[inline(always)]
    fn row_at(&self, c: usize) -> *const f32 {
        self.w.as_ptr().wrapping_add(c * self.k)
    }
    #[inline(always)]
    fn prefetch(row: *const f32, i: usize) {
        fetch(row.wrapping_add(i).cast());
    }
    #[inline(always)]
    unsafe fn load512(row: *const f32, i: usize) -> __m512 {
        unsafe { _mm512_loadu_ps(row.add(i)) }
    }
    #[inline(always)]
    unsafe fn load256(row: *const f32, i: usize) -> (__m256, __m256) {
        unsafe { (_mm256_loadu_ps(row.add(i)), _mm256_loadu_ps(row.add(i + 8))) }
    }
}

/// BF16 is the top half of an f32: widen, shift left 16.
impl Load for Bf16Rows<'_> {
    type Row = *const u8;
    const LINE_INPUTS: usize = 32;
    #[inline(always)]
    fn row_at(&self, c: usize) -> *const u8 {
        self.bytes.as_ptr().wrapping_add(2 * c * self.k)
    }
    #[inline(always)]
    fn prefetch(row: *const u8, i: usize) {
        fetch(row.wrapping_add(2 * i));
    }
    #[inline(always)]
    unsafe fn load512(row: *const u8, i: usize) -> __m512 {
        unsafe {
            let halves = _mm256_loadu_si256(row.add(2 * i).cast());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(halves)))
        }
    }
    #[inline(always)]
    unsafe fn load256(row: *const u8, i: usize) -> (__m256, __m256) {
        unsafe {
            let p = row.add(2 * i);
            let lo = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
            let hi = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(16).cast()));
            (_mm256_castsi256_ps(_mm256_slli_epi32::<16>(lo)), _mm256_castsi256_ps(_mm256_slli_epi32::<16>(hi)))
        }
    }
}

impl Load for F16Rows<'_> {
    type Row = *const u8;
    const LINE_INPUTS: usize = 32;
    #[inline(always)]
    fn row_at(&self, c: usize) -> *const u8 {
        self.bytes.as_ptr().wrapping_add(2 * c * self.k)
    }
    #[inline(always)]
    fn prefetch(row: *const u8, i: usize) {
        fetch(row.wrapping_add(2 * i));
    }
    #[inline(always)]
    unsafe fn load512(row: *const u8, i: usize) -> __m512 {
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(row.add(2 * i).cast())) }
    }
    #[inline(always)]
    unsafe fn load256(row: *const u8, i: usize) -> (__m256, __m256) {
        unsafe {
            let p = row.add(2 * i);
            (_mm256_cvtph_ps(_mm_loadu_si128(p.cast())), _mm256_cvtph_ps(_mm_loadu_si128(p.add(16).cast())))
        }
    }
}

/// One [`E4m3Route`]'s SIMD expansion of E4M3 codes (never NaN codes:
/// the load refuses them), at `1 / REBIAS` of their values.
///
/// # Safety
/// As for [`Load`]: the loads read 16 (`load512`, `load256`) or 32
/// (`load512_pair`) codes from `codes`.
pub(crate) trait E4m3Simd: E4m3Route {
    unsafe fn load512(codes: *const u8) -> __m512;
    unsafe fn load256(codes: *const u8) -> (__m256, __m256);
    #[inline(always)]
    unsafe fn load512_pair(codes: *const u8) -> (__m512, __m512) {
        unsafe { (Self::load512(codes), Self::load512(codes.add(LANES))) }
    }
}

/// Sixteen E4M3 codes as the F16 bits of their value times `2^-8`: each
/// code, sign-extended to 16 bits and shifted left by 7, has its exponent
/// and mantissa bits on an F16's (bias 15 against E4M3's 7: the `2^-8`,
/// subnormal codes included, as F16 subnormals), its sign on the F16's, and
/// a copy of the sign on the exponent's top bit, which is cleared. The
/// conversion to f32 is then exact and never gives an f32 subnormal.
#[inline(always)]
unsafe fn e4m3_f16(codes: __m128i) -> __m256i {
    unsafe {
        let words = _mm256_slli_epi16::<7>(_mm256_cvtepi8_epi16(codes));
        _mm256_and_si256(words, _mm256_set1_epi16(!(1 << 14)))
    }
}

impl E4m3Simd for ViaHalf {
    #[inline(always)]
    unsafe fn load512(codes: *const u8) -> __m512 {
        unsafe { _mm512_cvtph_ps(e4m3_f16(_mm_loadu_si128(codes.cast()))) }
    }
    #[inline(always)]
    unsafe fn load256(codes: *const u8) -> (__m256, __m256) {
        unsafe {
            let halves = e4m3_f16(_mm_loadu_si128(codes.cast()));
            (_mm256_cvtph_ps(_mm256_castsi256_si128(halves)), _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(halves)))
        }
    }
    /// [`e4m3_f16`] for 32 codes at once (AVX-512BW).
    #[inline(always)]
    unsafe fn load512_pair(codes: *const u8) -> (__m512, __m512) {
        unsafe {
            let words = _mm512_slli_epi16::<7>(_mm512_cvtepi8_epi16(_mm256_loadu_si256(codes.cast())));
            let halves = _mm512_and_si512(words, _mm512_set1_epi16(!(1 << 14)));
            (_mm512_cvtph_ps(_mm512_castsi512_si256(halves)), _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(halves)))
        }
    }
}

/// The f32 bits [`crate::quant::e4m3_low`] keeps of an E4M3 code
/// sign-extended to 32 bits and shifted left by 20: the code's exponent and
/// mantissa bits land on the f32's and its sign on the f32's sign, and the
/// mask clears the copies of the sign on the top four exponent bits.
const E4M3_LOW_BITS: i32 = 0x87F0_0000_u32 as i32;

impl E4m3Simd for ViaBits {
    #[inline(always)]
    unsafe fn load512(codes: *const u8) -> __m512 {
        unsafe {
            let words = _mm512_slli_epi32::<20>(_mm512_cvtepi8_epi32(_mm_loadu_si128(codes.cast())));
            _mm512_castsi512_ps(_mm512_and_si512(words, _mm512_set1_epi32(E4M3_LOW_BITS)))
        }
    }
    #[inline(always)]
    unsafe fn load256(codes: *const u8) -> (__m256, __m256) {
        let eight = |at: *const u8| unsafe {
            let words = _mm256_slli_epi32::<20>(_mm256_cvtepi8_epi32(_mm_loadl_epi64(at.cast())));
            _mm256_castsi256_ps(_mm256_and_si256(words, _mm256_set1_epi32(E4M3_LOW_BITS)))
        };
        unsafe { (eight(codes), eight(codes.add(8))) }
    }
}

/// One block-FP8 row: its codes, and the scales of its block row, one per
/// 128 inputs.
#[derive(Clone, Copy)]
pub(crate) struct Fp8Row {
    codes: *const u8,
    scales: *const f32,
}

impl Fp8Row {
    /// The scale of the block holding input `i`, times `rebias` exactly
    /// (the route's [`E4m3Route::REBIAS`]: its codes come at `1 / rebias`
    /// of their value, and `(q / rebias)·(s·rebias)` is the real number
    /// `q·s`, rounded once, as the expanded weight is). Finite: the scales
    /// stay below [`crate::quant::FP8_KERNEL_SCALE_LIMIT`].
    #[inline(always)]
    unsafe fn scale(self, i: usize, rebias: f32) -> f32 {
        unsafe { *self.scales.add(i / FP8_BLOCK) * rebias }
    }
}

/// Block-FP8 weights are their bare codes ([`Fp8Codes`]) times the block's
/// scale.
impl<R: E4m3Simd> Load for Fp8Rows<'_, R> {
    type Row = Fp8Row;
    const LINE_INPUTS: usize = 64;
    #[inline(always)]
    fn row_at(&self, c: usize) -> Fp8Row {
        let block_row = (self.first + c) / FP8_BLOCK * self.k.div_ceil(FP8_BLOCK);
        Fp8Row {
            codes: self.codes.as_ptr().wrapping_add(c * self.k),
            scales: self.scales.as_ptr().wrapping_add(block_row),
        }
    }
    #[inline(always)]
    fn prefetch(row: Fp8Row, i: usize) {
        fetch(row.codes.wrapping_add(i));
    }
    #[inline(always)]
    unsafe fn load512(row: Fp8Row, i: usize) -> __m512 {
        unsafe { _mm512_mul_ps(R::load512(row.codes.add(i)), _mm512_set1_ps(row.scale(i, R::REBIAS))) }
    }
    #[inline(always)]
    unsafe fn load512_pair(row: Fp8Row, i: usize) -> (__m512, __m512) {
        unsafe {
            // Inputs i..i + 32 lie in one 128-block: i is a multiple of 32.
            let scale = _mm512_set1_ps(row.scale(i, R::REBIAS));
            let (first, second) = R::load512_pair(row.codes.add(i));
            (_mm512_mul_ps(first, scale), _mm512_mul_ps(second, scale))
        }
    }
    #[inline(always)]
    unsafe fn load256(row: Fp8Row, i: usize) -> (__m256, __m256) {
        unsafe {
            let scale = _mm256_set1_ps(row.scale(i, R::REBIAS));
            let (lo, hi) = R::load256(row.codes.add(i));
            (_mm256_mul_ps(lo, scale), _mm256_mul_ps(hi, scale))
        }
    }
}

impl<R: E4m3Simd> Load for Fp8Codes<'_, R> {
    type Row = *const u8;
    const LINE_INPUTS: usize = 64;
    #[inline(always)]
    fn row_at(&self, c: usize) -> *const u8 {
        self.codes.as_ptr().wrapping_add(c * self.k)
    }
    #[inline(always)]
    fn prefetch(row: *const u8, i: usize) {
        fetch(row.wrapping_add(i));
    }
    #[inline(always)]
    unsafe fn load512(row: *const u8, i: usize) -> __m512 {
        unsafe { R::load512(row.add(i)) }
    }
    #[inline(always)]
    unsafe fn load512_pair(row: *const u8, i: usize) -> (__m512, __m512) {
        unsafe { R::load512_pair(row.add(i)) }
    }
    #[inline(always)]
    unsafe fn load256(row: *const u8, i: usize) -> (__m256, __m256) {
        unsafe { R::load256(row.add(i)) }
    }
}

/// One MXFP4 row: its bytes in kernel order
/// ([`crate::quant::fp4_kernel_order`]: a group's 16 bytes hold its first
/// 16 inputs in their low nibbles, the next 16 in the high ones) and the
/// E8M0 codes of its groups.
#[derive(Clone, Copy)]
pub(crate) struct Fp4Row {
    packed: *const u8,
    scales: *const u8,
}

impl Fp4Row {
    /// The 16 codes of inputs `i..i + 16` (`i` a multiple of 16), in input
    /// order, as twice their value in signed bytes.
    #[inline(always)]
    unsafe fn e2m1_twice(self, i: usize) -> __m128i {
        unsafe {
            let bytes = _mm_loadu_si128(self.packed.add(i / FP4_GROUP * FP4_GROUP / 2).cast());
            let shifted = if i.is_multiple_of(FP4_GROUP) { bytes } else { _mm_srli_epi16::<4>(bytes) };
            let codes = _mm_and_si128(shifted, _mm_set1_epi8(0x0F));
            _mm_shuffle_epi8(_mm_loadu_si128(E2M1_TWICE.as_ptr().cast()), codes)
        }
    }

    /// The E8M0 code of the group holding input `i`.
    #[inline(always)]
    unsafe fn scale_code(self, i: usize) -> usize {
        usize::from(unsafe { *self.scales.add(i / FP4_GROUP) })
    }
}

/// Every e2m1 value as an f32 vector, for `vpermps` lookups.
const E2M1_VALUES: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

impl Load for Fp4Rows<'_> {
    type Row = Fp4Row;
    const LINE_INPUTS: usize = 128;
    #[inline(always)]
    fn row_at(&self, c: usize) -> Fp4Row {
        Fp4Row {
            packed: self.packed.as_ptr().wrapping_add(c * self.k / 2),
            scales: self.scales.as_ptr().wrapping_add(c * (self.k / FP4_GROUP)),
        }
    }
    #[inline(always)]
    fn prefetch(row: Fp4Row, i: usize) {
        fetch(row.packed.wrapping_add(i / 2));
        if i.is_multiple_of(64 * FP4_GROUP) {
            fetch(row.scales.wrapping_add(i / FP4_GROUP));
        }
    }
    #[inline(always)]
    unsafe fn load512(row: Fp4Row, i: usize) -> __m512 {
        unsafe {
            let twice = row.e2m1_twice(i);
            let scale = _mm512_set1_ps(E8M0_HALF[row.scale_code(i)]);
            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(twice)), scale)
        }
    }
    #[inline(always)]
    unsafe fn load256(row: Fp4Row, i: usize) -> (__m256, __m256) {
        unsafe {
            let twice = row.e2m1_twice(i);
            let scale = _mm256_set1_ps(E8M0_HALF[row.scale_code(i)]);
            let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(twice));
            let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(twice)));
            (_mm256_mul_ps(lo, scale), _mm256_mul_ps(hi, scale))
        }
    }
    /// One 32-input group: its 16 bytes widened to 16 lanes, whose low four
    /// bits are the first 16 inputs' codes and, shifted by 4, the next 16's
    /// (`vpermps` reads only the low four bits of an index), looked up in
    /// the group's 16 values times its scale (exact).
    #[inline(always)]
    unsafe fn load512_pair(row: Fp4Row, i: usize) -> (__m512, __m512) {
        unsafe {
            let scale = _mm512_set1_ps(E8M0[row.scale_code(i)]);
            let table = _mm512_mul_ps(_mm512_loadu_ps(E2M1_VALUES.as_ptr()), scale);
            let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(row.packed.add(i / 2).cast()));
            let first = _mm512_permutexvar_ps(bytes, table);
            (first, _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(bytes), table))
        }
    }
}
