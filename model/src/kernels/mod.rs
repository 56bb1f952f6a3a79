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

use std::marker::PhantomData;

use rayon::prelude::*;

use crate::profile::{self, Part};
use crate::quant;

mod formats;
mod scores;
mod sink;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use formats::Weights;
use formats::{Bf16Rows, F16Rows, F32Rows, Fp4Rows, Fp8Codes, Fp8Rows, Rows, ViaBits, ViaHalf};
pub use scores::{KeyBlocks, Span, mix, relu_weighted, scores};
pub use sink::{EXP_CLAMP, EXP_LN2, EXP_TAYLOR, exp, softmax_with_sink};

#[cfg(not(target_arch = "x86_64"))]
use formats::{E4m3Route as Fp8Source, Rows as Source};
/// What a format's reader, and an E4M3 route, must offer the kernels on
/// this architecture.
#[cfg(target_arch = "x86_64")]
use x86::{E4m3Simd as Fp8Source, Load as Source};

const LANES: usize = 16;
/// Input rows per parallel task (a tile's inputs stay in L2).
const ROWS_PER_TASK: usize = 64;
/// Tasks per compute thread when few input rows split only the weights.
const TASKS_PER_THREAD: usize = 4;
/// From this many input rows in a task on, a stored format's weight rows
/// are expanded to f32 once per task and reused by every input row; below
/// it each weight is expanded in a register right where it is used.
const EXPAND_FROM_ROWS: usize = 8;

/// `y[m][n] = Σ_k x[m][k] · w[n][k]` for `x: [rows, k]`, `w: [n, k]`, into a
/// new `[rows, n]` buffer.
pub fn linear(x: &[f32], rows: usize, w: &[f32], n: usize) -> Vec<f32> {
    if n == 0 {
        return Vec::new();
    }
    linear_with(x, rows, Weights::F32(w), n, w.len() / n)
}

/// [`linear`] over weights in any stored format. Every format gives the bits
/// the same weight values give as f32.
pub fn linear_with(x: &[f32], rows: usize, w: Weights<'_>, n: usize, k: usize) -> Vec<f32> {
    linear_group(&[Projection { x, rows, w, n, k }]).pop().unwrap_or_default()
}

/// One projection of a [`linear_group`]: `x: [rows, k]` through `w: [n, k]`.
#[derive(Clone, Copy)]
pub struct Projection<'a> {
    pub x: &'a [f32],
    pub rows: usize,
    pub w: Weights<'a>,
    pub n: usize,
    pub k: usize,
}

/// Several independent projections as one parallel region: their tasks are
/// split and run together, so projections too small to keep the threads
/// streaming on their own (an expert's gate and up projections, all of a
/// layer's experts at decode) pay for one start and one join between them
/// instead of one each. Each output has the bits [`linear_with`] gives it
/// alone: how work is split never changes a result (ADR 0001).
pub fn linear_group(projections: &[Projection<'_>]) -> Vec<Vec<f32>> {
    let mut outputs = Vec::with_capacity(projections.len());
    for p in projections {
        profile::flops(Part::Matmul, 2 * p.rows * p.n * p.k);
        // The readers index without bounds checks: the shapes are checked here.
        assert!(p.w.holds(p.n, p.k), "weights do not hold a [{}, {}] matrix", p.n, p.k);
        assert_eq!(p.x.len(), p.rows * p.k, "input length");
        outputs.push(vec![0.0; p.rows * p.n]);
    }
    let tasks = split(projections);
    let work: usize = projections.iter().map(|p| p.rows * p.n * p.k).sum();
    if tasks.len() <= 1 || work < 1 << 15 {
        for (p, y) in projections.iter().zip(&mut outputs) {
            run(p, p.x, p.rows, 0, p.n, y);
        }
        return outputs;
    }
    // A task of one input row fills a slice of its output directly; the
    // others fill blocks of their own, copied into place afterwards.
    let mut slices: Vec<Option<&mut [f32]>> = Vec::with_capacity(tasks.len());
    {
        let mut rest: Vec<&mut [f32]> = outputs.iter_mut().map(|y| &mut y[..]).collect();
        for t in &tasks {
            slices.push(if projections[t.p].rows == 1 {
                let (head, tail) = std::mem::take(&mut rest[t.p]).split_at_mut(t.c1 - t.c0);
                rest[t.p] = tail;
                Some(head)
            } else {
                None
            });
        }
    }
    // Every task is a unit of its own for the threads to take: rayon's
    // default splits a few tasks into runs of several, which one thread
    // takes whole while the other waits.
    let blocks: Vec<Option<Vec<f32>>> = tasks
        .par_iter()
        .with_max_len(1)
        .zip(slices)
        .map(|(t, slice)| {
            let p = &projections[t.p];
            let x = &p.x[t.r0 * p.k..t.r1 * p.k];
            match slice {
                Some(out) => {
                    run(p, x, 1, t.c0, t.c1, out);
                    None
                }
                None => {
                    let mut block = vec![0.0; (t.r1 - t.r0) * (t.c1 - t.c0)];
                    run(p, x, t.r1 - t.r0, t.c0, t.c1, &mut block);
                    Some(block)
                }
            }
        })
        .collect();
    for (t, block) in tasks.iter().zip(blocks) {
        let Some(block) = block else { continue };
        let (n, cols) = (projections[t.p].n, t.c1 - t.c0);
        for (i, r) in (t.r0..t.r1).enumerate() {
            outputs[t.p][r * n + t.c0..r * n + t.c1].copy_from_slice(&block[i * cols..(i + 1) * cols]);
        }
    }
    outputs
}

/// One task of a [`linear_group`]: input rows `r0..r1` of projection `p`
/// against its weight rows `c0..c1`.
struct Task {
    p: usize,
    r0: usize,
    r1: usize,
    c0: usize,
    c1: usize,
}

/// Splits a group's work into tasks. Many input rows: tiles of up to
/// [`ROWS_PER_TASK`] inputs × 64 weight rows, small enough that a tile's
/// inputs and weights stay in cache. A few rows (decode) stream the weights
/// once: the group's weight bytes are split into a few tasks per thread
/// only, as each task costs a hand-off between threads, in whole runs of 4
/// weight rows (the register tile's width): coarser runs split a small
/// projection, such as mHC's 24 rows, unevenly between the threads.
fn split(projections: &[Projection<'_>]) -> Vec<Task> {
    let few = |p: &Projection<'_>| p.rows <= ROWS_PER_TASK / 4;
    let streamed: usize = projections.iter().filter(|p| few(p)).map(|p| p.n * p.w.row_bytes(p.k)).sum();
    let task_bytes = streamed.div_ceil(TASKS_PER_THREAD * rayon::current_num_threads()).max(1);
    let mut tasks = Vec::new();
    for (i, p) in projections.iter().enumerate() {
        if p.rows == 0 || p.n == 0 {
            continue;
        }
        let cols = if few(p) { task_bytes.div_ceil(p.w.row_bytes(p.k).max(1)).next_multiple_of(4) } else { 64 };
        let rows = task_rows(p, cols);
        for r0 in (0..p.rows).step_by(rows) {
            for c0 in (0..p.n).step_by(cols) {
                tasks.push(Task { p: i, r0, r1: (r0 + rows).min(p.rows), c0, c1: (c0 + cols).min(p.n) });
            }
        }
    }
    tasks
}

/// Input rows of one task of `p` that takes `cols` weight rows: one run of
/// [`ROWS_PER_TASK`], or, where the weights are expanded to f32 per task,
/// as many runs as still leave [`TASKS_PER_THREAD`] tasks per thread, since
/// each task expands its weight rows once for all of its runs: with one run
/// per task a 2048-token prefill expanded each dense weight row 32 times,
/// 3.3% of its time.
fn task_rows(p: &Projection<'_>, cols: usize) -> usize {
    if matches!(p.w, Weights::F32(_)) || p.rows < EXPAND_FROM_ROWS {
        return ROWS_PER_TASK;
    }
    let runs = p.rows.div_ceil(ROWS_PER_TASK);
    let wanted = TASKS_PER_THREAD * rayon::current_num_threads();
    let spans = wanted.div_ceil(p.n.div_ceil(cols)).min(runs);
    runs.div_ceil(spans) * ROWS_PER_TASK
}

/// [`task`] with the reader of `p`'s format.
fn run(p: &Projection<'_>, x: &[f32], rows: usize, c0: usize, c1: usize, block: &mut [f32]) {
    if rows == 0 || c0 == c1 {
        return;
    }
    let k = p.k;
    match p.w {
        Weights::F32(w) => task(x, rows, k, F32Rows { w, k }, c0, c1, block),
        Weights::Half { bytes, bf16: true } => task(x, rows, k, Bf16Rows { bytes, k }, c0, c1, block),
        Weights::Half { bytes, bf16: false } => task(x, rows, k, F16Rows { bytes, k }, c0, c1, block),
        Weights::Fp8 { codes, scales, first } => match fp8_route() {
            Fp8Route::Bits => {
                fp8(x, rows, k, Fp8Rows { codes, scales, first, k, route: PhantomData::<ViaBits> }, c0, c1, block)
            }
            Fp8Route::Half => {
                fp8(x, rows, k, Fp8Rows { codes, scales, first, k, route: PhantomData::<ViaHalf> }, c0, c1, block)
            }
        },
        Weights::Fp4 { packed, scales } => task(x, rows, k, Fp4Rows { packed, scales, k }, c0, c1, block),
    }
}

/// One task: `block[r][c - c0] = dot(x[r], w[c])` for weight rows `c0..c1`.
/// Many input rows share one expansion of the weights to f32; few have
/// them expanded in registers.
fn task<W: Source>(x: &[f32], rows: usize, k: usize, w: W, c0: usize, c1: usize, block: &mut [f32]) {
    let _span = profile::span(Part::Matmul);
    if W::F32 || rows < EXPAND_FROM_ROWS {
        return tile(x, rows, k, w, c0, c1, block);
    }
    EXPANDED.with_borrow_mut(|buffer| {
        let cols = c1 - c0;
        buffer.resize(buffer.len().max(EXPAND_COLS.min(cols) * k), 0.0);
        let mut part = Vec::new();
        for from in (c0..c1).step_by(EXPAND_COLS) {
            let to = (from + EXPAND_COLS).min(c1);
            let n = to - from;
            let expanded = &mut buffer[..n * k];
            expand(w, k, from, to, expanded);
            let w = F32Rows { w: expanded, k };
            fill_columns(block, rows, from - c0..to - c0, &mut part, |out| tile_runs(x, rows, k, w, n, out));
        }
    })
}

/// Fills columns `at` of `block: [rows, _]` with `fill`, which writes a
/// `[rows, at.len()]` block: in place when that is all of `block` or one
/// row of it, else through `part`, copied into place.
fn fill_columns(
    block: &mut [f32],
    rows: usize,
    at: std::ops::Range<usize>,
    part: &mut Vec<f32>,
    fill: impl FnOnce(&mut [f32]),
) {
    let (cols, n) = (block.len() / rows.max(1), at.len());
    if n == cols {
        return fill(block);
    }
    if rows == 1 {
        return fill(&mut block[at]);
    }
    part.resize(rows * n, 0.0);
    fill(part);
    for (out, row) in block.chunks_exact_mut(cols).zip(part.chunks_exact(n)) {
        out[at.clone()].copy_from_slice(row);
    }
}

/// Weight rows expanded to f32 at a time: a task's runs of inputs take
/// them while they sit in L2. A task of 8 to 16 input rows (a decode step
/// of that many sequences) takes a share of a whole matrix; expanded at
/// once, stored formats ran 12 rows at a fifth of f32's weights per second
/// (`model/examples/matvec.rs`), and now at about the same.
const EXPAND_COLS: usize = 64;

/// [`tile`] over the `cols` rows of `w`, inputs in runs of [`ROWS_PER_TASK`],
/// so that a run's inputs and the weight rows stay in L2 together.
fn tile_runs(x: &[f32], rows: usize, k: usize, w: F32Rows<'_>, cols: usize, block: &mut [f32]) {
    for r in (0..rows).step_by(ROWS_PER_TASK) {
        let n = ROWS_PER_TASK.min(rows - r);
        tile(&x[r * k..(r + n) * k], n, k, w, 0, cols, &mut block[r * cols..(r + n) * cols]);
    }
}

thread_local! {
    /// [`EXPAND_COLS`] weight rows of this thread's current [`task`],
    /// expanded to f32, kept between tasks: zeroing a fresh buffer per task
    /// was 2% of a 512-token prefill's time on the larger random config.
    static EXPANDED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// How this machine's kernels expand E4M3 codes ([`formats::E4m3Route`]).
#[derive(Clone, Copy)]
enum Fp8Route {
    Half,
    Bits,
}

/// Integer moves on AMD cores with AVX-512 (Zen 4, where it was measured),
/// the F16 conversion elsewhere. Zen 4 multiplies f32 subnormals at full
/// speed and converts F16 slowly: the one-row FP8 kernel ran ~20 GB/s in
/// L2 through integer moves against ~16 through F16. The earlier (Intel)
/// host took a microcode assist for each instruction with a subnormal
/// operand, and random FP8 weights (one code in 16 subnormal) ran 2.4×
/// slower through integer moves (ADR 0008).
fn fp8_route() -> Fp8Route {
    #[cfg(target_arch = "x86_64")]
    {
        static BITS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let amd_avx512 = || {
            let vendor = std::arch::x86_64::__cpuid(0);
            // "AuthenticAMD", in the order CPUID gives it.
            [vendor.ebx, vendor.edx, vendor.ecx] == [0x6874_7541, 0x6974_6E65, 0x444D_4163] && avx512()
        };
        if *BITS.get_or_init(amd_avx512) {
            return Fp8Route::Bits;
        }
    }
    Fp8Route::Half
}

/// [`run`] for block-FP8 weights read through route `R`.
fn fp8<R: Fp8Source>(x: &[f32], rows: usize, k: usize, w: Fp8Rows<'_, R>, c0: usize, c1: usize, block: &mut [f32]) {
    if rows < EXPAND_FROM_ROWS {
        fp8_few_rows(x, rows, k, w, c0, c1, block)
    } else {
        task(x, rows, k, w, c0, c1, block)
    }
}

/// [`task`] for few input rows against block-FP8 weights. Where a block
/// row's scales are powers of two, each one, times the route's `REBIAS`,
/// moves onto the inputs it multiplies, and the kernels read the bare codes
/// ([`Fp8Codes`], at `1 / REBIAS` of their values): `(x·s·REBIAS)·(q /
/// REBIAS)` is the same real number as `x·(q·s)`, so every fused
/// multiply-add, and the result, keeps its bits, and each weight costs no
/// multiply by its scale. That holds while `x·s·REBIAS` and `q·s` are exact
/// in f32, which is checked (a block row where it fails reads its scaled
/// weights as before).
fn fp8_few_rows<R: Fp8Source>(
    x: &[f32],
    rows: usize,
    k: usize,
    w: Fp8Rows<'_, R>,
    c0: usize,
    c1: usize,
    block: &mut [f32],
) {
    let blocks = k.div_ceil(quant::FP8_BLOCK);
    let codes = Fp8Codes { codes: w.codes, k, route: w.route };
    let mut scaled = vec![0.0; rows * k];
    let mut part = Vec::new();
    let mut c = c0;
    while c < c1 {
        let block_row = (w.first + c) / quant::FP8_BLOCK;
        let end = ((block_row + 1) * quant::FP8_BLOCK - w.first).min(c1);
        let scales = &w.scales[block_row * blocks..(block_row + 1) * blocks];
        let exact = scale_inputs(x, k, scales, R::REBIAS, &mut scaled);
        fill_columns(block, rows, c - c0..end - c0, &mut part, |out| {
            if exact { tile(&scaled, rows, k, codes, c, end, out) } else { tile(x, rows, k, w, c, end, out) }
        });
        c = end;
    }
}

/// `out = x · s · rebias`, each input times the scale of its 128-block, when
/// every scale is a normal power of two (so every `q·s` is exact: E4M3
/// values are multiples of `2^-9` with 4 significant bits) and every
/// product is exact; false otherwise. A product by a power of two is exact
/// when it is a normal float (or the input is zero); a subnormal one may
/// have lost bits and counts as inexact.
fn scale_inputs(x: &[f32], k: usize, scales: &[f32], rebias: f32, out: &mut [f32]) -> bool {
    if !scales.iter().all(|&s| s.is_normal() && s.to_bits() & 0x007F_FFFF == 0) {
        return false;
    }
    let mut exact = true;
    for (xr, outr) in x.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        for ((xb, ob), &s) in xr.chunks(quant::FP8_BLOCK).zip(outr.chunks_mut(quant::FP8_BLOCK)).zip(scales) {
            let s = s * rebias;
            for (&v, o) in xb.iter().zip(ob.iter_mut()) {
                *o = v * s;
                exact &= o.is_normal() || v == 0.0;
            }
        }
    }
    exact
}

/// Computes `block[r][c - c0] = dot(x[r], w[c])` with the best instruction
/// set the CPU has; all variants produce identical bits.
fn tile<W: Source>(x: &[f32], rows: usize, k: usize, w: W, c0: usize, c1: usize, block: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512() {
            // SAFETY: the CPU supports AVX-512F and BW (checked just above);
            // `x` is `[rows, k]`, `block` `[rows, c1 - c0]`, `c1` at most
            // `w`'s rows.
            return unsafe { x86::tile_avx512(x, rows, k, w, c0, c1, block) };
        }
        if avx2() {
            // SAFETY: as above, for AVX2, FMA and F16C.
            return unsafe { x86::tile_avx2(x, rows, k, w, c0, c1, block) };
        }
    }
    tile_generic(x, rows, k, w, c0, c1, block)
}

/// Weight rows `c0..c1` of `w` as f32 into `out` (`[c1 - c0, k]`).
fn expand<W: Source>(w: W, k: usize, c0: usize, c1: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512() {
            // SAFETY: AVX-512F and BW checked; `c1` is at most `w`'s rows.
            return unsafe { x86::expand_avx512(w, k, c0, c1, out) };
        }
        if avx2() {
            // SAFETY: as above, for AVX2, FMA and F16C.
            return unsafe { x86::expand_avx2(w, k, c0, c1, out) };
        }
    }
    let mut scratch = Vec::new();
    for (row, c) in out.chunks_exact_mut(k).zip(c0..c1) {
        row.copy_from_slice(w.row(c, k, &mut scratch));
    }
}

/// Whether the matmul's AVX-512 path (AVX-512F and BW) runs here.
#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw")
}

/// Whether the AVX2 path (AVX2, FMA and F16C) runs here.
#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// Portable path: one weight row (expanded when stored otherwise) at a
/// time, one dot product at a time.
fn tile_generic<W: Rows>(x: &[f32], rows: usize, k: usize, w: W, c0: usize, c1: usize, block: &mut [f32]) {
    let cols = c1 - c0;
    let mut scratch = Vec::new();
    for c in c0..c1 {
        let wr = w.row(c, k, &mut scratch);
        for r in 0..rows {
            block[r * cols + c - c0] = dot_generic(&x[r * k..(r + 1) * k], wr);
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
            return unsafe { x86::dot_avx512(a, b) };
        }
        if avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { x86::dot_avx2(a, b) };
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

/// `x · sigmoid(x)`, on [`exp`]: every operation exactly rounded IEEE
/// arithmetic, so a GPU running the same steps gets the same bits.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
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
