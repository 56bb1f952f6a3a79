//! Register-blocked tiles with explicit SIMD, for every stored format. Each
//! accumulator holds the 16 canonical lanes of one output element (AVX2: two
//! 8-lane halves); the tail and the final tree run in scalar code shared
//! with the portable path. A quantized or 16-bit weight is expanded to f32
//! in a register right before its fused multiply-add, with exactly the
//! values `crate::quant` defines, so every format keeps the canonical order
//! and the bits of the same weights held as f32.

// Index loops over the accumulator grid read as the register tile they are.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::formats::{Bf16Rows, E4m3Route, F16Rows, F32Rows, Fp4Rows, Fp8Codes, Fp8Rows, Rows, ViaBits, ViaHalf};
use super::{LANES, dot_generic, reduce};
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

/// How far ahead a one-row tile fetches its weights: each tile's rows are
/// a few short streams (a 4-row tile of MXFP4 experts reads 2 KiB) that the
/// hardware prefetchers do not pick up before they end. At least this many
/// bytes ahead, so that enough lines are in flight to cover the memory's
/// latency whatever a format's bytes per weight (a distance counted in
/// rows left 4-bit rows 4 KiB ahead, and decode ~7% slower)...
const AHEAD_BYTES: usize = 16 << 10;
/// ... and at least this many tiles ahead.
const PREFETCH_TILES: usize = 2;

/// How many weight rows ahead a one-row tile of `cols` rows, `k` inputs
/// wide, fetches.
#[inline(always)]
fn rows_ahead<W: Load>(k: usize, cols: usize) -> usize {
    (AHEAD_BYTES * W::LINE_INPUTS / (64 * k.max(1))).max(PREFETCH_TILES * cols)
}

/// Prefetches the cache line at `p` into L2 (and L3), not L1. Decode on
/// the larger random config ran 15–20% faster with this than with fetches
/// into L1, in both the quantized and the f32 paths (paired runs on a Zen 4
/// host, ADR 0008).
#[inline(always)]
fn fetch(p: *const u8) {
    // SAFETY: a prefetch is only a hint: it never faults, whatever `p` is.
    unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
}

/// Walks the `[rows, c1 - c0]` output in `$r × $c` register tiles with
/// `$kernel`, falling back to 1-row and 1-column kernels at the edges. A
/// macro, not a function, so each expansion sits inside its own
/// `#[target_feature]` function and the kernels inline there.
macro_rules! walk_tiles {
    ($kernel:ident, $r:expr, $c:expr, $x:expr, $rows:expr, $k:expr, $w:expr, $c0:expr, $c1:expr, $block:expr) => {{
        let (x, rows, k, w, c0, c1, block) = ($x, $rows, $k, $w, $c0, $c1, $block);
        let mut c = c0;
        while c < c1 {
            let full_cols = c1 - c >= $c;
            let mut r = 0;
            while r < rows {
                let full_rows = rows - r >= $r;
                let at = Tile { r, c, c0, cols: c1 - c0, k };
                // SAFETY: the row and column ranges lie inside the matrices.
                unsafe {
                    match (full_rows, full_cols) {
                        (true, true) => $kernel::<_, { $r }, { $c }>(x, w, at, block),
                        (true, false) => $kernel::<_, { $r }, 1>(x, w, at, block),
                        (false, true) => $kernel::<_, 1, { $c }>(x, w, at, block),
                        (false, false) => $kernel::<_, 1, 1>(x, w, at, block),
                    }
                }
                r += if full_rows { $r } else { 1 };
            }
            c += if full_cols { $c } else { 1 };
        }
    }};
}

/// Where one register tile sits: its first input row `r` and weight row
/// `c`, the block's first weight row `c0` and width `cols`, the depth `k`.
#[derive(Clone, Copy)]
struct Tile {
    r: usize,
    c: usize,
    c0: usize,
    cols: usize,
    k: usize,
}

/// Adds the scalar tail `k % 16` of one dot product to its lanes, reduces.
#[inline(always)]
fn finish(mut lanes: [f32; LANES], x: &[f32], w: &impl Rows, c: usize, full: usize) -> f32 {
    for (l, j) in (full..x.len()).enumerate() {
        lanes[l] = x[j].mul_add(w.value(c, j), lanes[l]);
    }
    reduce(lanes)
}

/// [`dot_generic`] compiled with AVX-512 (LLVM's AVX-512F implies FMA).
#[target_feature(enable = "avx512f")]
pub fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    dot_generic(a, b)
}

/// [`dot_generic`] compiled with AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_generic(a, b)
}

/// `block[r][c - c0] = dot(x[r], w[c])` for weight rows `c0..c1`.
///
/// # Safety
/// AVX-512F and BW must be available; `x: [rows, k]`, `block: [rows, c1 - c0]`,
/// `c1` at most the rows of `w`.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn tile_avx512<W: Load>(x: &[f32], rows: usize, k: usize, w: W, c0: usize, c1: usize, block: &mut [f32]) {
    if rows == 1 {
        fetch_first_tiles(&w, k, c0, c1, 4);
    }
    walk_tiles!(kernel512, 4, 4, x, rows, k, w, c0, c1, block)
}

/// Prefetches the rows of the first tiles a one-row task reads: every
/// later tile has been fetched by the tiles before it.
#[inline(always)]
fn fetch_first_tiles<W: Load>(w: &W, k: usize, c0: usize, c1: usize, tile_cols: usize) {
    for c in c0..c1.min(c0 + rows_ahead::<W>(k, tile_cols)) {
        let row = w.row_at(c);
        (0..k).step_by(W::LINE_INPUTS).for_each(|i| W::prefetch(row, i));
    }
}

/// A one-row tile streams each weight once: while its rows read inputs
/// `i..i + span` (`i` a multiple of `span`; both powers of two, as are the
/// formats' line widths), fetch the same lines of the rows [`rows_ahead`]
/// on, `distance` inputs further: rows lie `k` inputs apart in every format.
#[inline(always)]
fn fetch_ahead<W: Load, const C: usize>(rows: &[W::Row; C], i: usize, distance: usize, span: usize) {
    let ahead = i + distance;
    if W::LINE_INPUTS >= span {
        if i.is_multiple_of(W::LINE_INPUTS) {
            for &row in rows {
                W::prefetch(row, ahead);
            }
        }
    } else {
        for &row in rows {
            for line in 0..span / W::LINE_INPUTS {
                W::prefetch(row, ahead + line * W::LINE_INPUTS);
            }
        }
    }
}

/// The rows `c..c + C` of `w` (plain loops: a closure inside a
/// `#[target_feature]` function need not be inlined).
#[inline(always)]
fn rows_at<W: Load, const C: usize>(w: &W, c: usize) -> [W::Row; C] {
    let mut rows = [w.row_at(c); C];
    for (n, row) in rows.iter_mut().enumerate().skip(1) {
        *row = w.row_at(c + n);
    }
    rows
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn kernel512<W: Load, const R: usize, const C: usize>(x: &[f32], w: W, at: Tile, block: &mut [f32]) {
    let Tile { r: r0, c: c0, k, .. } = at;
    let full = k / LANES * LANES;
    let rows = rows_at::<W, C>(&w, c0);
    let distance = rows_ahead::<W>(k, C) * k;
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let mut wv = [_mm512_setzero_ps(); C];
    let mut i = 0;
    // Two steps of 16 per pass, each accumulator still taking them in order.
    let mut wv2 = [_mm512_setzero_ps(); C];
    while i + 2 * LANES <= full {
        if R == 1 {
            fetch_ahead::<W, C>(&rows, i, distance, 2 * LANES);
        }
        for c in 0..C {
            // SAFETY: i + 32 <= full <= k, inside weight row c0 + c.
            (wv[c], wv2[c]) = unsafe { W::load512_pair(rows[c], i) };
        }
        for r in 0..R {
            // SAFETY: as above, inside input row r0 + r.
            let (x1, x2) = unsafe {
                let p = x.as_ptr().add((r0 + r) * k + i);
                (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(LANES)))
            };
            for c in 0..C {
                acc[r][c] = _mm512_fmadd_ps(x1, wv[c], acc[r][c]);
                acc[r][c] = _mm512_fmadd_ps(x2, wv2[c], acc[r][c]);
            }
        }
        i += 2 * LANES;
    }
    while i < full {
        for c in 0..C {
            // SAFETY: i + 16 <= full <= k, inside weight row c0 + c.
            wv[c] = unsafe { W::load512(rows[c], i) };
        }
        for r in 0..R {
            // SAFETY: as above, inside input row r0 + r.
            let xv = unsafe { _mm512_loadu_ps(x.as_ptr().add((r0 + r) * k + i)) };
            for c in 0..C {
                acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
            }
        }
        i += LANES;
    }
    for r in 0..R {
        for c in 0..C {
            let mut lanes = [0.0f32; LANES];
            // SAFETY: `lanes` holds exactly 16 floats.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc[r][c]) };
            let xr = &x[(r0 + r) * k..(r0 + r + 1) * k];
            block[(r0 + r) * at.cols + c0 + c - at.c0] = finish(lanes, xr, &w, c0 + c, full);
        }
    }
}

/// Input rows and weight rows of the AVX2 register tile: 2 × 3 × 2 halves
/// = 12 of the 16 ymm registers hold accumulators.
const AVX2_ROWS: usize = 2;
const AVX2_COLS: usize = 3;

/// As [`tile_avx512`].
///
/// # Safety
/// AVX2, FMA and F16C must be available; shapes as for [`tile_avx512`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile_avx2<W: Load>(x: &[f32], rows: usize, k: usize, w: W, c0: usize, c1: usize, block: &mut [f32]) {
    if rows == 1 {
        fetch_first_tiles(&w, k, c0, c1, AVX2_COLS);
    }
    walk_tiles!(kernel256, AVX2_ROWS, AVX2_COLS, x, rows, k, w, c0, c1, block)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kernel256<W: Load, const R: usize, const C: usize>(x: &[f32], w: W, at: Tile, block: &mut [f32]) {
    let Tile { r: r0, c: c0, k, .. } = at;
    let full = k / LANES * LANES;
    let rows = rows_at::<W, C>(&w, c0);
    let distance = rows_ahead::<W>(k, C) * k;
    let mut lo = [[_mm256_setzero_ps(); C]; R];
    let mut hi = [[_mm256_setzero_ps(); C]; R];
    let mut wl = [_mm256_setzero_ps(); C];
    let mut wh = [_mm256_setzero_ps(); C];
    let mut i = 0;
    while i < full {
        if R == 1 {
            fetch_ahead::<W, C>(&rows, i, distance, LANES);
        }
        for c in 0..C {
            // SAFETY: i + 16 <= full <= k: both halves stay in weight row c0 + c.
            (wl[c], wh[c]) = unsafe { W::load256(rows[c], i) };
        }
        for r in 0..R {
            // SAFETY: as above, inside input row r0 + r.
            let (xl, xh) = unsafe {
                let p = x.as_ptr().add((r0 + r) * k + i);
                (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
            };
            for c in 0..C {
                lo[r][c] = _mm256_fmadd_ps(xl, wl[c], lo[r][c]);
                hi[r][c] = _mm256_fmadd_ps(xh, wh[c], hi[r][c]);
            }
        }
        i += LANES;
    }
    for r in 0..R {
        for c in 0..C {
            let mut lanes = [0.0f32; LANES];
            // SAFETY: `lanes` holds exactly 16 floats, 8 per store.
            unsafe {
                _mm256_storeu_ps(lanes.as_mut_ptr(), lo[r][c]);
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi[r][c]);
            }
            let xr = &x[(r0 + r) * k..(r0 + r + 1) * k];
            block[(r0 + r) * at.cols + c0 + c - at.c0] = finish(lanes, xr, &w, c0 + c, full);
        }
    }
}

/// Weight rows `c0..c1` of `w` as f32 into `out` (`[c1 - c0, k]`).
///
/// # Safety
/// AVX-512F and BW must be available; `c1` at most the rows of `w`.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn expand_avx512<W: Load>(w: W, k: usize, c0: usize, c1: usize, out: &mut [f32]) {
    let full = k / LANES * LANES;
    for (row, c) in out.chunks_exact_mut(k).zip(c0..c1) {
        let from = w.row_at(c);
        for i in (0..full).step_by(LANES) {
            // SAFETY: i + 16 <= full <= k, inside row c of `w` and of `out`.
            unsafe { _mm512_storeu_ps(row.as_mut_ptr().add(i), W::load512(from, i)) };
        }
        (full..k).for_each(|j| row[j] = w.value(c, j));
    }
}

/// As [`expand_avx512`].
///
/// # Safety
/// AVX2, FMA and F16C must be available; `c1` at most the rows of `w`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn expand_avx2<W: Load>(w: W, k: usize, c0: usize, c1: usize, out: &mut [f32]) {
    let full = k / LANES * LANES;
    for (row, c) in out.chunks_exact_mut(k).zip(c0..c1) {
        let from = w.row_at(c);
        for i in (0..full).step_by(LANES) {
            // SAFETY: as above, both halves inside row c.
            unsafe {
                let (lo, hi) = W::load256(from, i);
                _mm256_storeu_ps(row.as_mut_ptr().add(i), lo);
                _mm256_storeu_ps(row.as_mut_ptr().add(i + 8), hi);
            }
        }
        (full..k).for_each(|j| row[j] = w.value(c, j));
    }
}
