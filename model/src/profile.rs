//! Where a forward pass spends its threads' time, by part of the model, and
//! the floating-point work each part did: what the long-context benchmark
//! (`model/examples/long_context.rs`) prints. Off unless [`enable`]d; when
//! off a span costs one relaxed atomic load.
//!
//! Spans are exclusive: a span opened inside another (the matmuls inside a
//! compressor) pauses the outer one, so the parts add up to the time spent
//! in spans. Spans sit inside the parallel tasks, so time is thread time.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A part of the forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Every projection through [`crate::kernels::linear_with`].
    Matmul,
    /// Scores, softmax and weighted values of the attention heads.
    Attention,
    /// The lightning indexer's scores.
    IndexerScores,
    /// The indexer's choice of the best entries.
    TopK,
    /// Compressors, without their projections.
    Compressor,
    /// Gating, routing and combining of the MoE layers, without the
    /// experts' projections.
    Moe,
    /// mHC's mixing of the residual streams.
    Mhc,
}

impl Part {
    pub const ALL: [Part; 7] =
        [Part::Matmul, Part::Attention, Part::IndexerScores, Part::TopK, Part::Compressor, Part::Moe, Part::Mhc];

    pub fn name(self) -> &'static str {
        match self {
            Part::Matmul => "matmul",
            Part::Attention => "attention",
            Part::IndexerScores => "indexer scores",
            Part::TopK => "top-k",
            Part::Compressor => "compressors",
            Part::Moe => "moe",
            Part::Mhc => "mhc",
        }
    }
}

static ON: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];
static FLOPS: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];

thread_local! {
    /// The open spans of this thread, innermost last, each with the time
    /// it last started counting.
    static OPEN: RefCell<Vec<(Part, Instant)>> = const { RefCell::new(Vec::new()) };
}

/// Turns counting on or off (for the whole process).
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Zeroes every count.
pub fn reset() {
    NANOS.iter().chain(&FLOPS).for_each(|c| c.store(0, Ordering::Relaxed));
}

/// Each part's thread time and floating-point operations since [`reset`].
pub fn totals() -> Vec<(Part, Duration, u64)> {
    Part::ALL
        .iter()
        .map(|&p| {
            let i = p as usize;
            (p, Duration::from_nanos(NANOS[i].load(Ordering::Relaxed)), FLOPS[i].load(Ordering::Relaxed))
        })
        .collect()
}

/// Counts `n` floating-point operations for `part`.
pub fn flops(part: Part, n: usize) {
    if ON.load(Ordering::Relaxed) {
        FLOPS[part as usize].fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Time until the returned guard drops counts for `part` (and not for the
/// span it is opened in).
pub fn span(part: Part) -> Span {
    if !ON.load(Ordering::Relaxed) {
        return Span { open: false };
    }
    let now = Instant::now();
    OPEN.with_borrow_mut(|open| {
        if let Some((outer, since)) = open.last_mut() {
            add(*outer, now - *since);
        }
        open.push((part, now));
    });
    Span { open: true }
}

fn add(part: Part, time: Duration) {
    NANOS[part as usize].fetch_add(time.as_nanos() as u64, Ordering::Relaxed);
}

/// An open span; see [`span`].
#[must_use]
pub struct Span {
    open: bool,
}

impl Drop for Span {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        let now = Instant::now();
        OPEN.with_borrow_mut(|open| {
            if let Some((part, since)) = open.pop() {
                add(part, now - since);
            }
            if let Some((_, since)) = open.last_mut() {
                *since = now;
            }
        });
    }
}
