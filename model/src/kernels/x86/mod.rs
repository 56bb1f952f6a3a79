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

mod load;

pub(crate) use load::{E4m3Simd, Load};

use super::formats::Rows;
use super::{LANES, dot_generic, reduce};

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
