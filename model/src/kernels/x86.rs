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

use super::formats::{Bf16Rows, F16Rows, F32Rows, Fp4Rows, Fp8Rows, Rows};
use super::{LANES, dot_generic, reduce};
use crate::quant::{E2M1_TWICE, FP4_GROUP};

/// Loads weights `i..i + 16` of row `c` as f32 vectors.
///
/// # Safety
/// The caller runs with AVX-512F (`load512`) or AVX2+FMA+F16C (`load256`),
/// `c` is a row of the matrix, `i` a multiple of 16 and `i + 16 <= k`.
pub(crate) trait Load: Rows {
    /// Inputs of one row per 64-byte line of its stored weights.
    const LINE_INPUTS: usize;

    /// Asks the cache for the line holding weight `i` of row `c` (and for
    /// the line of its scales, once per line of them). `c` may lie past
    /// the matrix: a prefetch never faults and reads nothing.
    fn prefetch(&self, c: usize, i: usize);

    unsafe fn load512(&self, c: usize, i: usize) -> __m512;
    unsafe fn load256(&self, c: usize, i: usize) -> (__m256, __m256);

    /// Weights `i..i + 32` of row `c` as two vectors (`i + 32 <= k`), for
    /// formats that decode 32 at a time more cheaply than twice 16.
    #[inline(always)]
    unsafe fn load512_pair(&self, c: usize, i: usize) -> (__m512, __m512) {
        unsafe { (self.load512(c, i), self.load512(c, i + LANES)) }
    }
}

impl Load for F32Rows<'_> {
    const LINE_INPUTS: usize = 16;
    #[inline(always)]
    fn prefetch(&self, c: usize, i: usize) {
        fetch(self.w.as_ptr().wrapping_add(c * self.k + i).cast());
    }
    #[inline(always)]
    unsafe fn load512(&self, c: usize, i: usize) -> __m512 {
        unsafe { _mm512_loadu_ps(self.w.as_ptr().add(c * self.k + i)) }
    }
    #[inline(always)]
    unsafe fn load256(&self, c: usize, i: usize) -> (__m256, __m256) {
        unsafe {
            let p = self.w.as_ptr().add(c * self.k + i);
            (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
        }
    }
}

/// BF16 is the top half of an f32: widen, shift left 16.
impl Load for Bf16Rows<'_> {
    const LINE_INPUTS: usize = 32;
    #[inline(always)]
    fn prefetch(&self, c: usize, i: usize) {
        fetch(self.bytes.as_ptr().wrapping_add(2 * (c * self.k + i)));
    }
    #[inline(always)]
    unsafe fn load512(&self, c: usize, i: usize) -> __m512 {
        unsafe {
            let halves = _mm256_loadu_si256(self.bytes.as_ptr().add(2 * (c * self.k + i)).cast());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(halves)))
        }
    }
    #[inline(always)]
    unsafe fn load256(&self, c: usize, i: usize) -> (__m256, __m256) {
        unsafe {
            let p = self.bytes.as_ptr().add(2 * (c * self.k + i));
            let lo = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
            let hi = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(16).cast()));
            (_mm256_castsi256_ps(_mm256_slli_epi32::<16>(lo)), _mm256_castsi256_ps(_mm256_slli_epi32::<16>(hi)))
        }
    }
}

impl Load for F16Rows<'_> {
    const LINE_INPUTS: usize = 32;
    #[inline(always)]
    fn prefetch(&self, c: usize, i: usize) {
        fetch(self.bytes.as_ptr().wrapping_add(2 * (c * self.k + i)));
    }
    #[inline(always)]
    unsafe fn load512(&self, c: usize, i: usize) -> __m512 {
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(self.bytes.as_ptr().add(2 * (c * self.k + i)).cast())) }
    }
    #[inline(always)]
    unsafe fn load256(&self, c: usize, i: usize) -> (__m256, __m256) {
        unsafe {
            let p = self.bytes.as_ptr().add(2 * (c * self.k + i));
            (_mm256_cvtph_ps(_mm_loadu_si128(p.cast())), _mm256_cvtph_ps(_mm_loadu_si128(p.add(16).cast())))
        }
    }
}

/// Sixteen E4M3 codes as the F16 bits of their value times `2^-8`: each
/// code, sign-extended to 16 bits and shifted left by 7, has its exponent
/// and mantissa bits on an F16's (bias 15 against E4M3's 7: the `2^-8`,
/// subnormal codes included, as F16 subnormals), its sign on the F16's, and
/// a copy of the sign on the exponent's top bit, which is cleared. The
/// conversion to f32 is then exact, and the kernels take the `2^8` back in
/// the block scale ([`Fp8Rows::kernel_scale`]). NaN codes never get here
/// (refused at load).
#[inline(always)]
unsafe fn e4m3_f16(codes: __m128i) -> __m256i {
    unsafe {
        let words = _mm256_slli_epi16::<7>(_mm256_cvtepi8_epi16(codes));
        _mm256_and_si256(words, _mm256_set1_epi16(!(1 << 14)))
    }
}

impl Load for Fp8Rows<'_> {
    const LINE_INPUTS: usize = 64;
    #[inline(always)]
    fn prefetch(&self, c: usize, i: usize) {
        fetch(self.codes.as_ptr().wrapping_add(c * self.k + i));
    }
    #[inline(always)]
    unsafe fn load512(&self, c: usize, i: usize) -> __m512 {
        unsafe {
            let codes = _mm_loadu_si128(self.codes.as_ptr().add(c * self.k + i).cast());
            _mm512_mul_ps(_mm512_cvtph_ps(e4m3_f16(codes)), _mm512_set1_ps(self.kernel_scale(c, i)))
        }
    }
    #[inline(always)]
    unsafe fn load256(&self, c: usize, i: usize) -> (__m256, __m256) {
        unsafe {
            let codes = _mm_loadu_si128(self.codes.as_ptr().add(c * self.k + i).cast());
            let scale = _mm256_set1_ps(self.kernel_scale(c, i));
            let halves = e4m3_f16(codes);
            let lo = _mm256_cvtph_ps(_mm256_castsi256_si128(halves));
            let hi = _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(halves));
            (_mm256_mul_ps(lo, scale), _mm256_mul_ps(hi, scale))
        }
    }
}

/// The 16 MXFP4 codes of inputs `i..i + 16` (`i` a multiple of 16) of row
/// `c`, in input order, as twice their value in signed bytes. Kernel order
/// ([`crate::quant::fp4_kernel_order`]): the group's 16 bytes hold the
/// first 16 inputs in their low nibbles, the next 16 in the high ones.
#[inline(always)]
unsafe fn e2m1_twice(w: &Fp4Rows<'_>, c: usize, i: usize) -> __m128i {
    unsafe {
        let group = (c * w.k + i / FP4_GROUP * FP4_GROUP) / 2;
        let bytes = _mm_loadu_si128(w.packed.as_ptr().add(group).cast());
        let shifted = if i.is_multiple_of(FP4_GROUP) { bytes } else { _mm_srli_epi16::<4>(bytes) };
        let codes = _mm_and_si128(shifted, _mm_set1_epi8(0x0F));
        _mm_shuffle_epi8(_mm_loadu_si128(E2M1_TWICE.as_ptr().cast()), codes)
    }
}

/// How many tiles ahead a one-row tile fetches its weights: each tile's
/// rows are a few short streams (a 4-row tile of MXFP4 experts reads 2 KiB)
/// that the hardware prefetchers do not pick up before they end.
const PREFETCH_TILES: usize = 2;
/// Prefetches the cache line at `p` into every cache level.
#[inline(always)]
fn fetch(p: *const u8) {
    // SAFETY: a prefetch is only a hint: it never faults, whatever `p` is.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
}

/// Every e2m1 value as an f32 vector, for `vpermps` lookups.
const E2M1_VALUES: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

impl Load for Fp4Rows<'_> {
    const LINE_INPUTS: usize = 128;
    #[inline(always)]
    fn prefetch(&self, c: usize, i: usize) {
        fetch(self.packed.as_ptr().wrapping_add((c * self.k + i) / 2));
        if i.is_multiple_of(64 * FP4_GROUP) {
            fetch(self.scales.as_ptr().wrapping_add((c * self.k + i) / FP4_GROUP));
        }
    }
    #[inline(always)]
    unsafe fn load512(&self, c: usize, i: usize) -> __m512 {
        unsafe {
            let twice = e2m1_twice(self, c, i);
            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(twice)), _mm512_set1_ps(self.half_scale(c, i)))
        }
    }
    #[inline(always)]
    unsafe fn load256(&self, c: usize, i: usize) -> (__m256, __m256) {
        unsafe {
            let twice = e2m1_twice(self, c, i);
            let scale = _mm256_set1_ps(self.half_scale(c, i));
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
    unsafe fn load512_pair(&self, c: usize, i: usize) -> (__m512, __m512) {
        unsafe {
            let at = (c * self.k + i) / 2;
            let scale = _mm512_set1_ps(self.scale(c, i));
            let table = _mm512_mul_ps(_mm512_loadu_ps(E2M1_VALUES.as_ptr()), scale);
            let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(self.packed.as_ptr().add(at).cast()));
            let first = _mm512_permutexvar_ps(bytes, table);
            (first, _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(bytes), table))
        }
    }
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
/// AVX-512F must be available; `x: [rows, k]`, `block: [rows, c1 - c0]`,
/// `c1` at most the rows of `w`.
#[target_feature(enable = "avx512f")]
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
    for c in c0..c1.min(c0 + PREFETCH_TILES * tile_cols) {
        (0..k).step_by(W::LINE_INPUTS).for_each(|i| w.prefetch(c, i));
    }
}

/// A one-row tile streams each weight once: while its `cols` rows from
/// `c0` read inputs `i..i + span`, fetch the same lines of the rows of the
/// tile [`PREFETCH_TILES`] ahead.
#[inline(always)]
fn fetch_ahead<W: Load>(w: &W, c0: usize, cols: usize, i: usize, span: usize) {
    if i % W::LINE_INPUTS < span {
        let ahead = c0 + PREFETCH_TILES * cols;
        for c in ahead..ahead + cols {
            (i..i + span).step_by(W::LINE_INPUTS).for_each(|j| w.prefetch(c, j));
        }
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn kernel512<W: Load, const R: usize, const C: usize>(x: &[f32], w: W, at: Tile, block: &mut [f32]) {
    let Tile { r: r0, c: c0, k, .. } = at;
    let full = k / LANES * LANES;
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let mut wv = [_mm512_setzero_ps(); C];
    let mut i = 0;
    // Two steps of 16 per pass, each accumulator still taking them in order.
    let mut wv2 = [_mm512_setzero_ps(); C];
    while i + 2 * LANES <= full {
        if R == 1 {
            fetch_ahead(&w, c0, C, i, 2 * LANES);
        }
        for c in 0..C {
            // SAFETY: i + 32 <= full <= k, inside weight row c0 + c.
            (wv[c], wv2[c]) = unsafe { w.load512_pair(c0 + c, i) };
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
            wv[c] = unsafe { w.load512(c0 + c, i) };
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
    let mut lo = [[_mm256_setzero_ps(); C]; R];
    let mut hi = [[_mm256_setzero_ps(); C]; R];
    let mut wl = [_mm256_setzero_ps(); C];
    let mut wh = [_mm256_setzero_ps(); C];
    let mut i = 0;
    while i < full {
        if R == 1 {
            fetch_ahead(&w, c0, C, i, LANES);
        }
        for c in 0..C {
            // SAFETY: i + 16 <= full <= k: both halves stay in weight row c0 + c.
            (wl[c], wh[c]) = unsafe { w.load256(c0 + c, i) };
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
/// AVX-512F must be available; `c1` at most the rows of `w`.
#[target_feature(enable = "avx512f")]
pub unsafe fn expand_avx512<W: Load>(w: W, k: usize, c0: usize, c1: usize, out: &mut [f32]) {
    let full = k / LANES * LANES;
    for (row, c) in out.chunks_exact_mut(k).zip(c0..c1) {
        for i in (0..full).step_by(LANES) {
            // SAFETY: i + 16 <= full <= k, inside row c of `w` and of `out`.
            unsafe { _mm512_storeu_ps(row.as_mut_ptr().add(i), w.load512(c, i)) };
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
        for i in (0..full).step_by(LANES) {
            // SAFETY: as above, both halves inside row c.
            unsafe {
                let (lo, hi) = w.load256(c, i);
                _mm256_storeu_ps(row.as_mut_ptr().add(i), lo);
                _mm256_storeu_ps(row.as_mut_ptr().add(i + 8), hi);
            }
        }
        (full..k).for_each(|j| row[j] = w.value(c, j));
    }
}
