//! Attention and indexer scores: many queries against many keys, every
//! score with [`super::dot`]'s bits (the canonical order of ADR 0001); and
//! attention's weighted sum of values ([`mix`]).
//!
//! A score is one short dot product (16–512 wide), so scoring key by key
//! spends its time reducing lanes, not multiplying. Here keys are laid out
//! sixteen at a time, dimension-major ([`KeyBlocks`]): one vector holds the
//! same dimension of sixteen keys, so a vector of fused multiply-adds
//! advances one canonical lane of sixteen scores at once, and the lanes'
//! fixed tree is a handful of vector adds with no shuffles. Each loaded key
//! vector serves several queries (the heads of a token share their keys).

use super::{LANES, dot_generic};

/// Keys in blocks of sixteen: block `b` holds keys `16b..16b + 16` as
/// `[d][16]` (dimension `i` of key `16b + j` at `b·16d + 16i + j`); the
/// last block is padded with zero keys.
#[derive(Clone, Default)]
pub struct KeyBlocks {
    data: Vec<f32>,
    d: usize,
    len: usize,
}

impl KeyBlocks {
    /// Keys per block: a [`Span`] starts at a multiple of this.
    pub const BLOCK: usize = LANES;

    /// No keys yet, each `d` wide.
    pub fn new(d: usize) -> Self {
        KeyBlocks { data: Vec::new(), d, len: 0 }
    }

    /// The `d`-wide rows of `rows` as keys.
    pub fn from_rows(rows: &[f32], d: usize) -> Self {
        let mut keys = KeyBlocks::new(d);
        keys.extend(rows);
        keys
    }

    /// Appends the `d`-wide rows of `rows`: key by key up to a block's
    /// start, then 16 keys at a time (each dimension's 16 values written as
    /// one run), then key by key again.
    pub fn extend(&mut self, rows: &[f32]) {
        let d = self.d;
        let mut rest = &rows[..rows.len() / d * d];
        while !self.len.is_multiple_of(LANES) && !rest.is_empty() {
            let (key, tail) = rest.split_at(d);
            self.push(key);
            rest = tail;
        }
        let (blocks, tail) = rest.split_at(rest.len() / (LANES * d) * (LANES * d));
        for block in blocks.chunks_exact(LANES * d) {
            let at = self.data.len();
            self.data.resize(at + LANES * d, 0.0);
            for (i, run) in self.data[at..].chunks_exact_mut(LANES).enumerate() {
                for (l, v) in run.iter_mut().enumerate() {
                    *v = block[l * d + i];
                }
            }
            self.len += LANES;
        }
        for key in tail.chunks_exact(d) {
            self.push(key);
        }
    }

    pub fn push(&mut self, key: &[f32]) {
        let (d, j) = (self.d, self.len % LANES);
        if j == 0 {
            self.data.resize(self.data.len() + LANES * d, 0.0);
        }
        let block = &mut self.data[(self.len / LANES) * LANES * d..];
        for (i, &v) in key[..d].iter().enumerate() {
            block[i * LANES + j] = v;
        }
        self.len += 1;
    }

    /// Drops every key, keeping the memory.
    pub fn clear(&mut self) {
        self.data.clear();
        self.len = 0;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dim(&self) -> usize {
        self.d
    }

    /// Key `j`, dimension `i`.
    fn at(&self, j: usize, i: usize) -> f32 {
        self.data[(j / LANES) * LANES * self.d + i * LANES + j % LANES]
    }
}

/// Which scores to compute and where they go: keys `first..first + n` of
/// a [`KeyBlocks`] (`first` a multiple of 16), query `r`'s scores at
/// `out[r·stride..][..n]`.
#[derive(Clone, Copy)]
pub struct Span {
    pub first: usize,
    pub n: usize,
    pub stride: usize,
}

/// `out[r·stride + j] = dot(queries[r], key first + j)` for the `d`-wide
/// query rows of `queries`, each with [`super::dot`]'s bits.
pub fn scores(queries: &[f32], keys: &KeyBlocks, span: Span, out: &mut [f32]) {
    let Span { first, n, stride } = span;
    let d = keys.d;
    let q = queries.len() / d.max(1);
    assert!(first.is_multiple_of(LANES) && first + n <= keys.len, "keys {first}..{} of {}", first + n, keys.len);
    assert!(q == 0 || (n <= stride && out.len() >= (q - 1) * stride + n), "output too short");
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(LANES) && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F checked; shapes checked above.
        return unsafe { avx512::scores(queries, keys, span, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::avx2() {
        // SAFETY: AVX2 and FMA checked just above.
        return unsafe { scores_avx2(queries, keys, span, out) };
    }
    scores_generic(queries, keys, span, out);
}

/// [`scores_generic`] with hardware FMA (same bits, far fewer cycles than
/// `mul_add` in software).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn scores_avx2(queries: &[f32], keys: &KeyBlocks, span: Span, out: &mut [f32]) {
    scores_generic(queries, keys, span, out);
}

/// One key at a time through [`dot_generic`] (the portable path, and the
/// reference the fast one must equal bit for bit).
#[inline(always)]
fn scores_generic(queries: &[f32], keys: &KeyBlocks, span: Span, out: &mut [f32]) {
    let d = keys.d;
    let mut key = vec![0.0; d];
    for j in 0..span.n {
        key.iter_mut().enumerate().for_each(|(i, v)| *v = keys.at(span.first + j, i));
        for (r, query) in queries.chunks_exact(d).enumerate() {
            out[r * span.stride + j] = dot_generic(query, &key);
        }
    }
}

/// `out[h] += Σ_j weights[h·stride + j] · values[j]` for each row `h` of
/// `out` and the rows `values[j]` of `values: [n, d]` (attention's weighted
/// sum of values): each element a chain of fused multiply-adds in
/// increasing `j`, continued across calls in the order of their values.
/// Same bits on every instruction set.
pub fn mix(out: &mut [f32], weights: &[f32], stride: usize, values: &[f32]) {
    if values.is_empty() || out.is_empty() {
        return;
    }
    let rows = weights.len().div_ceil(stride);
    let d = out.len() / rows;
    assert!(rows * d == out.len() && values.len().is_multiple_of(d), "output and values are rows of {d}");
    assert!(weights.len() >= (rows - 1) * stride + values.len() / d, "a weight per row and value");
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(LANES) && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F checked; shapes checked above.
        return unsafe { avx512::mix(out, weights, stride, values) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::avx2() {
        // SAFETY: AVX2 and FMA checked just above.
        return unsafe { mix_avx2(out, weights, stride, values) };
    }
    mix_generic(out, weights, stride, values)
}

/// [`mix_generic`] with hardware FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn mix_avx2(out: &mut [f32], weights: &[f32], stride: usize, values: &[f32]) {
    mix_generic(out, weights, stride, values)
}

#[inline(always)]
fn mix_generic(out: &mut [f32], weights: &[f32], stride: usize, values: &[f32]) {
    let d = out.len() / weights.len().div_ceil(stride);
    for (j, v) in values.chunks_exact(d).enumerate() {
        for (h, o) in out.chunks_exact_mut(d).enumerate() {
            let p = weights[h * stride + j];
            for (o, v) in o.iter_mut().zip(v) {
                *o = p.mul_add(*v, *o);
            }
        }
    }
}

/// The lightning indexer's score of each key from its heads' logits
/// `logits: [heads, n]`: `out[j] = Σ_h (max(logit, 0)·scale)·weights[h]`,
/// summed from zero in head order; same bits on every instruction set.
pub fn relu_weighted(logits: &[f32], scale: f32, weights: &[f32], out: &mut [f32]) {
    assert_eq!(logits.len(), weights.len() * out.len(), "a logit per head and key");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { relu_weighted_avx512(logits, scale, weights, out) };
        }
        if super::avx2() {
            // SAFETY: AVX2 and FMA checked just above.
            return unsafe { relu_weighted_avx2(logits, scale, weights, out) };
        }
    }
    relu_weighted_generic(logits, scale, weights, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn relu_weighted_avx512(logits: &[f32], scale: f32, weights: &[f32], out: &mut [f32]) {
    relu_weighted_generic(logits, scale, weights, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn relu_weighted_avx2(logits: &[f32], scale: f32, weights: &[f32], out: &mut [f32]) {
    relu_weighted_generic(logits, scale, weights, out)
}

#[inline(always)]
fn relu_weighted_generic(logits: &[f32], scale: f32, weights: &[f32], out: &mut [f32]) {
    out.fill(0.0);
    if out.is_empty() {
        return;
    }
    for (logits, w) in logits.chunks_exact(out.len()).zip(weights) {
        for (o, l) in out.iter_mut().zip(logits) {
            *o += l.max(0.0) * scale * w;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{KeyBlocks, LANES, Span};

    /// Queries handled together: each key vector loaded serves this many.
    const QUERIES: usize = 4;

    /// [`super::scores`] with AVX-512: for each block of sixteen keys, up
    /// to [`QUERIES`] queries at a time.
    ///
    /// # Safety
    /// AVX-512F must be available; `d` a multiple of 16 and the shapes as
    /// [`super::scores`] checks them.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scores(queries: &[f32], keys: &KeyBlocks, span: Span, out: &mut [f32]) {
        // The common depths get loops of known length, fully unrolled.
        // SAFETY: as for this function.
        unsafe {
            match keys.d / LANES {
                1 => scores_of::<1>(queries, keys, span, out),
                2 => scores_of::<2>(queries, keys, span, out),
                4 => scores_of::<4>(queries, keys, span, out),
                8 => scores_of::<8>(queries, keys, span, out),
                _ => scores_of::<0>(queries, keys, span, out),
            }
        }
    }

    /// [`scores`] for depth `16·M` (`M = 0`: any depth, read from `keys`).
    #[inline(always)]
    unsafe fn scores_of<const M: usize>(queries: &[f32], keys: &KeyBlocks, span: Span, out: &mut [f32]) {
        let Span { first, n, stride } = span;
        let d = if M > 0 { M * LANES } else { keys.d };
        let q = queries.len() / d;
        for (b, j0) in (first / LANES..).zip((0..n).step_by(LANES)) {
            let kt = &keys.data[b * LANES * d..(b + 1) * LANES * d];
            // The last block may hold fewer than sixteen of the wanted keys.
            let mask: __mmask16 = if n - j0 >= LANES { !0 } else { (1 << (n - j0)) - 1 };
            let mut r = 0;
            while r < q {
                let rows = (q - r).min(QUERIES);
                let qs = &queries[r * d..(r + rows) * d];
                // SAFETY: `kt` is `[d][16]`, `qs` `rows` queries of `d`, and
                // `out` holds the masked lanes at `(r + i)·stride + j0`.
                unsafe {
                    let at = out.as_mut_ptr().add(r * stride + j0);
                    match rows {
                        4 => block16::<4, M>(qs, kt, d, at, stride, mask),
                        3 => block16::<3, M>(qs, kt, d, at, stride, mask),
                        2 => block16::<2, M>(qs, kt, d, at, stride, mask),
                        _ => block16::<1, M>(qs, kt, d, at, stride, mask),
                    }
                }
                r += rows;
            }
        }
    }

    /// Output rows kept in registers at once by [`mix`].
    const MIX_ROWS: usize = 8;

    /// [`super::mix`] with AVX-512: sixteen dimensions of up to eight
    /// output rows stay in registers while every value goes by.
    ///
    /// # Safety
    /// AVX-512F must be available; `d` a multiple of 16 and the shapes as
    /// [`super::mix`] checks them.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn mix(out: &mut [f32], weights: &[f32], stride: usize, values: &[f32]) {
        let rows = weights.len().div_ceil(stride);
        let d = out.len() / rows;
        let at = Mixing { out: out.as_mut_ptr(), weights: weights.as_ptr(), stride, values: values.as_ptr(), d };
        let n = values.len() / d;
        for x in (0..d).step_by(LANES) {
            let mut h = 0;
            while h < rows {
                let group = (rows - h).min(MIX_ROWS);
                // SAFETY: rows `h..h + group`, dimensions `x..x + 16` and
                // values `..n` lie inside the slices (checked by the caller).
                unsafe {
                    match group {
                        8.. => mix_rows::<8>(at, h, x, n),
                        4..=7 => mix_rows::<4>(at, h, x, n),
                        2..=3 => mix_rows::<2>(at, h, x, n),
                        _ => mix_rows::<1>(at, h, x, n),
                    }
                }
                h += match group {
                    8.. => 8,
                    4..=7 => 4,
                    2..=3 => 2,
                    _ => 1,
                };
            }
        }
    }

    /// Where [`mix`] reads and writes.
    #[derive(Clone, Copy)]
    struct Mixing {
        out: *mut f32,
        weights: *const f32,
        stride: usize,
        values: *const f32,
        d: usize,
    }

    /// Dimensions `x..x + 16` of output rows `h0..h0 + G` over values `..n`.
    #[inline(always)]
    unsafe fn mix_rows<const G: usize>(at: Mixing, h0: usize, x: usize, n: usize) {
        // SAFETY (whole body): indices as the caller guarantees; AVX-512F
        // is enabled in the caller, which this is inlined into.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); G];
            for (h, a) in acc.iter_mut().enumerate() {
                *a = _mm512_loadu_ps(at.out.add((h0 + h) * at.d + x));
            }
            for j in 0..n {
                let v = _mm512_loadu_ps(at.values.add(j * at.d + x));
                for (h, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*at.weights.add((h0 + h) * at.stride + j)), v, *a);
                }
            }
            for (h, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(at.out.add((h0 + h) * at.d + x), *a);
            }
        }
    }

    /// Sixteen keys `kt: [d][16]` against `Q` queries `qs: [Q][d]`, the
    /// scores of the keys in `mask` stored at `out + r·stride`. Lane
    /// `l` of a score sums `q[i]·k[i]` for `i ≡ l (mod 16)` in increasing
    /// `i` with fused multiply-adds; the lanes are then added as the
    /// canonical tree (`lanes[l] += lanes[l + w]` for w = 8, 4, 2, 1), which
    /// is evaluated depth first so few vectors are live at once.
    #[inline(always)]
    unsafe fn block16<const Q: usize, const M: usize>(
        qs: &[f32],
        kt: &[f32],
        d: usize,
        out: *mut f32,
        stride: usize,
        mask: __mmask16,
    ) {
        // SAFETY (whole body): AVX-512F is enabled in the caller, which
        // this is inlined into; every index is below `d` or `16d`.
        // No closures here: they would not inherit the caller's AVX-512.
        unsafe {
            let b0 = add(pair::<Q, M>(qs, kt, d, 0), pair::<Q, M>(qs, kt, d, 4));
            let b2 = add(pair::<Q, M>(qs, kt, d, 2), pair::<Q, M>(qs, kt, d, 6));
            let c0 = add(b0, b2);
            let b1 = add(pair::<Q, M>(qs, kt, d, 1), pair::<Q, M>(qs, kt, d, 5));
            let b3 = add(pair::<Q, M>(qs, kt, d, 3), pair::<Q, M>(qs, kt, d, 7));
            let c1 = add(b1, b3);
            let total = add(c0, c1);
            for (r, v) in total.into_iter().enumerate() {
                _mm512_mask_storeu_ps(out.add(r * stride), mask, v);
            }
        }
    }

    /// Lanes `l` and `l + 8` added: the tree's first level.
    #[inline(always)]
    unsafe fn pair<const Q: usize, const M: usize>(qs: &[f32], kt: &[f32], d: usize, l: usize) -> [__m512; Q] {
        // SAFETY: as in `block16`.
        unsafe { add(lane::<Q, M>(qs, kt, d, l), lane::<Q, M>(qs, kt, d, l + 8)) }
    }

    /// Canonical lane `l` of sixteen scores for each of `Q` queries.
    #[inline(always)]
    unsafe fn lane<const Q: usize, const M: usize>(qs: &[f32], kt: &[f32], d: usize, l: usize) -> [__m512; Q] {
        // SAFETY: as in `block16`.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); Q];
            let steps = if M > 0 { M } else { d / LANES };
            for b in 0..steps {
                let i = b * LANES + l;
                let k = _mm512_loadu_ps(kt.as_ptr().add(i * LANES));
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*qs.get_unchecked(r * d + i)), k, *a);
                }
            }
            acc
        }
    }

    #[inline(always)]
    unsafe fn add<const Q: usize>(mut a: [__m512; Q], b: [__m512; Q]) -> [__m512; Q] {
        for r in 0..Q {
            // SAFETY: as in `block16`.
            a[r] = unsafe { _mm512_add_ps(a[r], b[r]) };
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dot;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        crate::kernels::tests::pseudo_random(n, seed)
    }

    /// Every score has the bits of the one-pair dot product, on every
    /// variant, for any number of queries, partial key blocks and ranges.
    #[test]
    fn scores_equal_single_dots() {
        for (d, q, n) in [(16, 8, 37), (32, 4, 16), (48, 3, 5), (128, 9, 50), (20, 2, 19), (64, 1, 1)] {
            let queries = values(q * d, d as u32);
            let rows = values(n * d, 99 + n as u32);
            let keys = KeyBlocks::from_rows(&rows, d);
            for first in (0..n).step_by(LANES) {
                let m = n - first;
                let (mut fast, mut portable) = (vec![0.0; q * m], vec![0.0; q * m]);
                let span = Span { first, n: m, stride: m };
                scores(&queries, &keys, span, &mut fast);
                scores_generic(&queries, &keys, span, &mut portable);
                #[cfg(target_arch = "x86_64")]
                if crate::kernels::avx2() {
                    let mut avx2 = vec![0.0; q * m];
                    // SAFETY: AVX2 and FMA checked just above.
                    unsafe { scores_avx2(&queries, &keys, span, &mut avx2) };
                    assert!(avx2.iter().zip(&portable).all(|(a, b)| a.to_bits() == b.to_bits()), "avx2, d {d}");
                }
                for r in 0..q {
                    for j in 0..m {
                        let want = dot(&queries[r * d..(r + 1) * d], &rows[(first + j) * d..(first + j + 1) * d]);
                        let what = format!("d {d}, query {r}, key {}", first + j);
                        assert_eq!(fast[r * m + j].to_bits(), want.to_bits(), "{what}");
                        assert_eq!(portable[r * m + j].to_bits(), want.to_bits(), "portable, {what}");
                    }
                }
            }
        }
    }

    /// Keys appended in pieces, whatever their sizes, lay out as when
    /// pushed one by one.
    #[test]
    fn keys_extended_in_pieces_lay_out_as_pushed() {
        let d = 24;
        let rows = values(70 * d, 5);
        let mut pushed = KeyBlocks::new(d);
        rows.chunks_exact(d).for_each(|key| pushed.push(key));
        for cuts in [&[0usize, 70][..], &[0, 3, 70], &[0, 16, 50, 70], &[0, 5, 37, 38, 70]] {
            let mut pieces = KeyBlocks::new(d);
            cuts.windows(2).for_each(|c| pieces.extend(&rows[c[0] * d..c[1] * d]));
            assert_eq!((pieces.len, &pieces.data), (pushed.len, &pushed.data), "cut at {cuts:?}");
        }
    }

    /// The weighted sum has the same bits on every variant and continues
    /// across calls.
    #[test]
    fn mix_equals_fused_chains_in_value_order() {
        for (rows, d, n) in [(4, 32, 37), (9, 16, 5), (3, 48, 1), (2, 20, 7)] {
            let weights = values(rows * (n + 3), 11);
            let rows_of_values = values(n * d, 12);
            let start = values(rows * d, 13);
            let mut fast = start.clone();
            let split = n / 2;
            mix(&mut fast, &weights, n + 3, &rows_of_values[..split * d]);
            mix(&mut fast, &weights[split..], n + 3, &rows_of_values[split * d..]);
            let mut portable = start.clone();
            mix_generic(&mut portable, &weights, n + 3, &rows_of_values);
            assert!(fast.iter().zip(&portable).all(|(a, b)| a.to_bits() == b.to_bits()), "portable, d {d}");
            #[cfg(target_arch = "x86_64")]
            if crate::kernels::avx2() {
                let mut avx2 = start.clone();
                // SAFETY: AVX2 and FMA checked just above.
                unsafe { mix_avx2(&mut avx2, &weights, n + 3, &rows_of_values) };
                assert!(avx2.iter().zip(&portable).all(|(a, b)| a.to_bits() == b.to_bits()), "avx2, d {d}");
            }
            for h in 0..rows {
                for x in 0..d {
                    let mut want = start[h * d + x];
                    for j in 0..n {
                        want = weights[h * (n + 3) + j].mul_add(rows_of_values[j * d + x], want);
                    }
                    assert_eq!(fast[h * d + x].to_bits(), want.to_bits(), "rows {rows}, d {d}: ({h}, {x})");
                }
            }
        }
    }

    /// The indexer's head sum: the scalar rule's bits on every variant.
    #[test]
    fn relu_weighted_sums_heads_in_order() {
        let (heads, n) = (8, 37);
        let logits = values(heads * n, 21);
        let weights = values(heads, 22);
        let mut fast = vec![1.0; n];
        relu_weighted(&logits, 0.25, &weights, &mut fast);
        for j in 0..n {
            let mut want = 0.0f32;
            for h in 0..heads {
                want += logits[h * n + j].max(0.0) * 0.25 * weights[h];
            }
            assert_eq!(fast[j].to_bits(), want.to_bits(), "key {j}");
        }
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::avx2() {
            let mut avx2 = vec![0.0; n];
            // SAFETY: AVX2 and FMA checked just above.
            unsafe { relu_weighted_avx2(&logits, 0.25, &weights, &mut avx2) };
            assert!(avx2.iter().zip(&fast).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    /// A key's scores do not depend on which other keys share its block or
    /// on how many queries are scored together.
    #[test]
    fn scores_are_batch_invariant() {
        let d = 32;
        let queries = values(7 * d, 3);
        let rows = values(40 * d, 4);
        let all = KeyBlocks::from_rows(&rows, d);
        let mut together = vec![0.0; 7 * 40];
        scores(&queries, &all, Span { first: 0, n: 40, stride: 40 }, &mut together);
        for j in 0..40 {
            let alone = KeyBlocks::from_rows(&rows[j * d..(j + 1) * d], d);
            for r in 0..7 {
                let mut one = [0.0];
                scores(&queries[r * d..(r + 1) * d], &alone, Span { first: 0, n: 1, stride: 1 }, &mut one);
                assert_eq!(one[0].to_bits(), together[r * 40 + j].to_bits(), "query {r}, key {j}");
            }
        }
    }
}
