//! CPU kernels. The one that matters is [`linear`]: `y = x · Wᵀ`.
//!
//! **Batch invariance** (docs/adr/0001-batch-invariant-matmul.md): every output
//! element is one dot product summed in a fixed order (16 strided lanes, then a
//! fixed tree), whatever the number of rows in `x`, how rows are tiled or how
//! work is split across threads. A token's result therefore never depends on
//! which other tokens share its batch or its worker, which is what lets the
//! distributed path be bit-identical to the single-process one. Each step is
//! a fused multiply-add: AVX-512 and AVX2+FMA use the hardware instruction,
//! the portable path `f32::mul_add` (exactly fused, in software where the CPU
//! lacks FMA), so all variants give identical bits.

use rayon::prelude::*;

const LANES: usize = 16;
/// Input rows per parallel task (a tile's inputs stay in L2).
const ROWS_PER_TASK: usize = 64;

/// A weight matrix `[n, k]` whose rows the matmul reads as f32: borrowed
/// where they are stored as f32, expanded block by block from a stored
/// format otherwise. Expansion is exact, so every format gives the bits the
/// same weights give as f32.
pub trait WeightRows: Sync {
    /// Weight rows `c0..c1` as f32 (`(c1 - c0) * k` values), expanded into
    /// `scratch` when they are not stored as f32.
    fn rows<'a>(&'a self, c0: usize, c1: usize, scratch: &'a mut Vec<f32>) -> &'a [f32];
}

/// Plain f32 rows of width `k`.
struct F32Rows<'w> {
    w: &'w [f32],
    k: usize,
}

impl WeightRows for F32Rows<'_> {
    fn rows<'a>(&'a self, c0: usize, c1: usize, _: &'a mut Vec<f32>) -> &'a [f32] {
        &self.w[c0 * self.k..c1 * self.k]
    }
}

/// `y[m][n] = Σ_k x[m][k] · w[n][k]` for `x: [rows, k]`, `w: [n, k]`, into a
/// new `[rows, n]` buffer.
pub fn linear(x: &[f32], rows: usize, w: &[f32], n: usize) -> Vec<f32> {
    if n == 0 {
        return Vec::new();
    }
    let k = w.len() / n;
    assert_eq!(w.len(), n * k, "weight length");
    linear_with(x, rows, &F32Rows { w, k }, n, k)
}

/// [`linear`] over weights in any stored format (see [`WeightRows`]).
pub fn linear_with(x: &[f32], rows: usize, w: &impl WeightRows, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0.0; rows * n];
    if rows == 0 || n == 0 {
        return y;
    }
    assert_eq!(x.len(), rows * k, "input length");
    // Work is split into tiles of up to ROWS_PER_TASK inputs x cols_per_task
    // weight rows, small enough that a tile's inputs and weights stay in
    // cache. Each task fills its own block; blocks are then copied into place.
    let cols_per_task = if rows <= ROWS_PER_TASK / 4 { 16 } else { 64 };
    let (row_tiles, col_tiles) = (rows.div_ceil(ROWS_PER_TASK), n.div_ceil(cols_per_task));
    if row_tiles * col_tiles == 1 || rows * n * k < 1 << 15 {
        let mut scratch = Vec::new();
        dispatch(x, rows, k, w.rows(0, n, &mut scratch), &mut y);
        return y;
    }
    let blocks: Vec<(usize, usize, usize, Vec<f32>)> = (0..row_tiles * col_tiles)
        .into_par_iter()
        .map(|t| {
            let (r0, c0) = ((t / col_tiles) * ROWS_PER_TASK, (t % col_tiles) * cols_per_task);
            let (r1, c1) = ((r0 + ROWS_PER_TASK).min(rows), (c0 + cols_per_task).min(n));
            let mut block = vec![0.0; (r1 - r0) * (c1 - c0)];
            let mut scratch = Vec::new();
            dispatch(&x[r0 * k..r1 * k], r1 - r0, k, w.rows(c0, c1, &mut scratch), &mut block);
            (r0, r1, c0, block)
        })
        .collect();
    for (r0, r1, c0, block) in blocks {
        let cols = block.len() / (r1 - r0);
        for (i, r) in (r0..r1).enumerate() {
            y[r * n + c0..r * n + c0 + cols].copy_from_slice(&block[i * cols..(i + 1) * cols]);
        }
    }
    y
}

/// Computes `block[r][c] = dot(x[r], w[c])` with the best instruction set the
/// CPU has; all variants produce identical bits.
fn dispatch(x: &[f32], rows: usize, k: usize, w: &[f32], block: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above); the
            // slice lengths are `rows * k`, `cols * k` and `rows * cols`.
            return unsafe { simd::tile_avx512(x, rows, k, w, block) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above, for AVX2 and FMA.
            return unsafe { simd::tile_avx2(x, rows, k, w, block) };
        }
    }
    tile_generic(x, rows, k, w, block)
}

/// Portable path: one dot product at a time.
fn tile_generic(x: &[f32], rows: usize, k: usize, w: &[f32], block: &mut [f32]) {
    let cols = w.len() / k;
    for c in 0..cols {
        let wr = &w[c * k..(c + 1) * k];
        for r in 0..rows {
            block[r * cols + c] = dot_generic(&x[r * k..(r + 1) * k], wr);
        }
    }
}

/// Register-blocked tiles with explicit SIMD. Each accumulator holds the 16
/// canonical lanes of one output element (AVX2: two 8-lane halves); the tail
/// and the final tree run in scalar code shared with the portable path.
#[cfg(target_arch = "x86_64")]
// Index loops over the accumulator grid read as the register tile they are.
#[allow(clippy::needless_range_loop)]
mod simd {
    use std::arch::x86_64::*;

    use super::{LANES, dot_generic, reduce};

    /// Walks the `[rows, cols]` output in `$r × $c` register tiles with
    /// `$kernel`, falling back to 1-row and 1-column kernels at the edges.
    /// A macro, not a function, so each expansion sits inside its own
    /// `#[target_feature]` function and the kernels inline there.
    macro_rules! walk_tiles {
        ($kernel:ident, $r:expr, $c:expr, $x:expr, $rows:expr, $k:expr, $w:expr, $block:expr) => {{
            let (x, rows, k, w, block) = ($x, $rows, $k, $w, $block);
            let cols = w.len() / k;
            let mut c = 0;
            while c < cols {
                let full_cols = cols - c >= $c;
                let mut r = 0;
                while r < rows {
                    let full_rows = rows - r >= $r;
                    // SAFETY: the row and column ranges lie inside the slices.
                    unsafe {
                        match (full_rows, full_cols) {
                            (true, true) => $kernel::<{ $r }, { $c }>(x, r, w, c, k, block, cols),
                            (true, false) => $kernel::<{ $r }, 1>(x, r, w, c, k, block, cols),
                            (false, true) => $kernel::<1, { $c }>(x, r, w, c, k, block, cols),
                            (false, false) => $kernel::<1, 1>(x, r, w, c, k, block, cols),
                        }
                    }
                    r += if full_rows { $r } else { 1 };
                }
                c += if full_cols { $c } else { 1 };
            }
        }};
    }

    /// Adds the scalar tail `k % 16` of one dot product to its lanes, reduces.
    #[inline(always)]
    fn finish(mut lanes: [f32; LANES], x: &[f32], w: &[f32], full: usize) -> f32 {
        for (l, j) in (full..x.len()).enumerate() {
            lanes[l] = x[j].mul_add(w[j], lanes[l]);
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

    /// # Safety
    /// AVX-512F must be available; `x: [rows, k]`, `w: [cols, k]`, `block: [rows, cols]`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_avx512(x: &[f32], rows: usize, k: usize, w: &[f32], block: &mut [f32]) {
        walk_tiles!(kernel512, 4, 4, x, rows, k, w, block)
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn kernel512<const R: usize, const C: usize>(
        x: &[f32],
        r0: usize,
        w: &[f32],
        c0: usize,
        k: usize,
        block: &mut [f32],
        cols: usize,
    ) {
        let full = k / LANES * LANES;
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut wv = [_mm512_setzero_ps(); C];
        let mut i = 0;
        while i < full {
            for c in 0..C {
                // SAFETY: i + 16 <= full <= k, so the load stays in weight row c0 + c.
                wv[c] = unsafe { _mm512_loadu_ps(w.as_ptr().add((c0 + c) * k + i)) };
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
                let (xr, wr) = (&x[(r0 + r) * k..(r0 + r + 1) * k], &w[(c0 + c) * k..(c0 + c + 1) * k]);
                block[(r0 + r) * cols + c0 + c] = finish(lanes, xr, wr, full);
            }
        }
    }

    /// Input rows and weight rows of the AVX2 register tile: 2 × 3 × 2 halves
    /// = 12 of the 16 ymm registers hold accumulators.
    const AVX2_ROWS: usize = 2;
    const AVX2_COLS: usize = 3;

    /// # Safety
    /// AVX2 and FMA must be available; shapes as for [`tile_avx512`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_avx2(x: &[f32], rows: usize, k: usize, w: &[f32], block: &mut [f32]) {
        walk_tiles!(kernel256, AVX2_ROWS, AVX2_COLS, x, rows, k, w, block)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn kernel256<const R: usize, const C: usize>(
        x: &[f32],
        r0: usize,
        w: &[f32],
        c0: usize,
        k: usize,
        block: &mut [f32],
        cols: usize,
    ) {
        let full = k / LANES * LANES;
        let mut lo = [[_mm256_setzero_ps(); C]; R];
        let mut hi = [[_mm256_setzero_ps(); C]; R];
        let mut wl = [_mm256_setzero_ps(); C];
        let mut wh = [_mm256_setzero_ps(); C];
        let mut i = 0;
        while i < full {
            for c in 0..C {
                // SAFETY: i + 16 <= full <= k: both halves stay in weight row c0 + c.
                unsafe {
                    let p = w.as_ptr().add((c0 + c) * k + i);
                    wl[c] = _mm256_loadu_ps(p);
                    wh[c] = _mm256_loadu_ps(p.add(8));
                }
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
                let (xr, wr) = (&x[(r0 + r) * k..(r0 + r + 1) * k], &w[(c0 + c) * k..(c0 + c + 1) * k]);
                block[(r0 + r) * cols + c0 + c] = finish(lanes, xr, wr, full);
            }
        }
    }
}

#[inline(always)]
fn reduce(mut lanes: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            lanes[l] += lanes[l + width];
        }
        width /= 2;
    }
    lanes[0]
}

/// One dot product in the canonical order every matmul uses, on the best
/// instruction set the CPU has (same bits on all of them).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { simd::dot_avx512(a, b) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { simd::dot_avx2(a, b) };
        }
    }
    dot_generic(a, b)
}

/// The canonical order: lane `l` accumulates `a[i]·b[i]` for `i ≡ l (mod 16)`
/// in increasing `i` with a fused multiply-add, then the lanes are added as a
/// fixed binary tree ([`reduce`]).
#[inline(always)]
fn dot_generic(a: &[f32], b: &[f32]) -> f32 {
    let k = a.len().min(b.len());
    let full = k / LANES * LANES;
    let mut lanes = [0.0f32; LANES];
    for (xc, wc) in a[..full].chunks_exact(LANES).zip(b[..full].chunks_exact(LANES)) {
        for l in 0..LANES {
            lanes[l] = xc[l].mul_add(wc[l], lanes[l]);
        }
    }
    for (l, j) in (full..k).enumerate() {
        lanes[l] = a[j].mul_add(b[j], lanes[l]);
    }
    reduce(lanes)
}

/// `x · rsqrt(mean(x²) + eps)`, then `· weight` when given, over each
/// `width`-wide row of `x`, in place.
pub fn rms_norm(x: &mut [f32], width: usize, weight: Option<&[f32]>, eps: f32) {
    for row in x.chunks_exact_mut(width) {
        let mean = dot(row, row) / width as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        match weight {
            Some(w) => row.iter_mut().zip(w).for_each(|(v, w)| *v = w * (*v * scale)),
            None => row.iter_mut().for_each(|v| *v *= scale),
        }
    }
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `log(1 + eˣ)` with torch's default threshold (linear above 20).
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return;
    }
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    x.iter_mut().for_each(|v| *v /= sum);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn linear_matches_f64_reference() {
        let (rows, k, n) = (7, 37, 29);
        let x = pseudo_random(rows * k, 1);
        let w = pseudo_random(n * k, 2);
        let y = linear(&x, rows, &w, n);
        for r in 0..rows {
            for c in 0..n {
                let exact: f64 = (0..k).map(|i| x[r * k + i] as f64 * w[c * k + i] as f64).sum();
                assert!((y[r * n + c] as f64 - exact).abs() < 1e-5, "({r},{c})");
            }
        }
    }

    /// The property the exactness contract rests on: a row's result is the
    /// same bits whether it is computed alone or inside any batch, tiled or
    /// split across threads.
    #[test]
    fn linear_is_batch_invariant() {
        let (k, n) = (1000, 300);
        let w = pseudo_random(n * k, 3);
        let batch = pseudo_random(13 * k, 4);
        let together = linear(&batch, 13, &w, n);
        for r in 0..13 {
            let alone = linear(&batch[r * k..(r + 1) * k], 1, &w, n);
            assert_eq!(alone, together[r * n..(r + 1) * n], "row {r}");
            let pair = linear(&batch[r * k..(r + 1) * k].repeat(2), 2, &w, n);
            assert_eq!(alone, pair[..n], "row {r} in a pair");
        }
    }

    /// Every instruction-set variant must produce the same bits, on shapes
    /// that hit full tiles, edge tiles and scalar tails.
    #[test]
    fn variants_agree() {
        for (rows, k, cols) in [(5, 203, 9), (8, 64, 8), (1, 16, 1), (3, 7, 2), (9, 1000, 13)] {
            let x = pseudo_random(rows * k, 5);
            let w = pseudo_random(cols * k, 6);
            let mut generic = vec![0.0; rows * cols];
            tile_generic(&x, rows, k, &w, &mut generic);
            let mut best = vec![0.0; rows * cols];
            dispatch(&x, rows, k, &w, &mut best);
            assert_eq!(generic, best, "{rows}x{k}x{cols}");
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                let mut avx2 = vec![0.0; rows * cols];
                // SAFETY: AVX2 and FMA checked; shapes match.
                unsafe { simd::tile_avx2(&x, rows, k, &w, &mut avx2) };
                assert_eq!(generic, avx2, "avx2 {rows}x{k}x{cols}");
                // SAFETY: as above.
                assert_eq!(dot_generic(&x[..k], &w[..k]), unsafe { simd::dot_avx2(&x[..k], &w[..k]) });
            }
            assert_eq!(dot_generic(&x[..k], &w[..k]), dot(&x[..k], &w[..k]), "dot {k}");
        }
    }
}
