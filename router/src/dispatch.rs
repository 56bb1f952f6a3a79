//! [`RemoteExperts`]: the model's `ExpertExecutor` over gRPC.
//!
//! For one MoE layer: every (token, expert) pair goes to a live worker
//! hosting that expert; each worker gets one request (split if it would pass
//! the message limit) carrying each of its tokens' hidden state once plus the
//! token's pairs it hosts. Requests go out concurrently when the layer starts
//! and are awaited in `finish`, after the router has computed the shared
//! expert. A worker that fails in a retryable way is marked down and its pairs
//! are re-sent to other replicas; which worker computed a pair never changes
//! its bits (batch-invariant kernels), and the combine order is fixed by the
//! model crate, so the output is the same whatever happened.
//!
//! When no live worker hosts an expert, the layer waits (up to `wait`) for
//! one: a down worker that a background probe puts back (see [`WorkerPool`]),
//! or a newer pool from a new placement. A burst of failures thus costs
//! latency while the cluster recovers, and an error only past that bound.
//!
//! `finish` blocks on the tokio runtime given at construction: call the model
//! from a thread that is not one of that runtime's workers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use myriad_model::ModelError;
use myriad_model::moe::{Contributions, ExpertExecutor, PendingExperts, Route};
use myriad_proto::MAX_MESSAGE_BYTES;
use myriad_proto::error::retryable;
use myriad_proto::expert::{self, ExpertBatch, ExpertId, LayerId};
use myriad_proto::pb::RunExpertsRequest;
use prost::Message;
use tokio::task::JoinHandle;

use crate::metrics;
use crate::pool::WorkerPool;

/// Counters of one [`RemoteExperts`], for reports such as the CLI's summary.
#[derive(Debug, Default)]
pub struct DispatchStats {
    pub calls: AtomicU64,
    pub retries: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Σ tokens over dispatched MoE layers: divides bytes into per-token-per-layer.
    pub token_layers: AtomicU64,
}

struct Inner {
    /// Replaced whole when the router switches placement version; a layer's
    /// dispatch (retries included) keeps the pool it started with.
    pool: RwLock<Arc<WorkerPool>>,
    runtime: tokio::runtime::Handle,
    hidden: usize,
    timeout: Duration,
    /// Longest wait for a live copy of an expert before the layer fails.
    wait: Duration,
    /// Rotates replica choice between calls, spreading load over replicas.
    rotation: AtomicUsize,
    stats: DispatchStats,
}

/// Routed experts on remote workers. Cheap to clone.
#[derive(Clone)]
pub struct RemoteExperts {
    inner: Arc<Inner>,
}

/// One (token, expert) pair: its token row, its slot in the contributions,
/// the expert and the routing weight.
#[derive(Clone, Copy)]
struct Pair {
    row: usize,
    slot: usize,
    expert: usize,
    weight: f32,
}

/// A planned call: pairs for one worker, grouped by token in row order.
struct Call {
    worker: usize,
    pairs: Vec<Pair>,
}

#[derive(Debug)]
enum CallError {
    /// The call failed on the way or on the worker; another replica may serve it.
    Retryable(String),
    /// The request itself was refused; retrying elsewhere would be refused too.
    Fatal(String),
}

pub struct PendingCalls {
    experts: RemoteExperts,
    pool: Arc<WorkerPool>,
    layer: usize,
    x: Vec<f32>,
    slots: usize,
    calls: Vec<(Call, JoinHandle<Result<expert::Contributions, CallError>>)>,
}

impl RemoteExperts {
    /// `hidden` is the model's hidden size; `timeout` bounds each call and
    /// `wait` the wait for a live copy of an expert. Starts the task that
    /// probes workers marked down (it ends when the last clone is dropped).
    pub fn new(
        pool: Arc<WorkerPool>,
        runtime: tokio::runtime::Handle,
        hidden: usize,
        timeout: Duration,
        wait: Duration,
    ) -> Self {
        let inner = Arc::new(Inner {
            pool: RwLock::new(pool),
            runtime: runtime.clone(),
            hidden,
            timeout,
            wait,
            rotation: AtomicUsize::new(0),
            stats: DispatchStats::default(),
        });
        runtime.spawn(probe_down_workers(Arc::downgrade(&inner)));
        RemoteExperts { inner }
    }

    pub fn stats(&self) -> &DispatchStats {
        &self.inner.stats
    }

    /// The workers new dispatches go to.
    pub fn pool(&self) -> Arc<WorkerPool> {
        self.inner.pool.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Switches later dispatches to `pool` (a new placement version).
    pub fn set_pool(&self, pool: Arc<WorkerPool>) {
        *self.inner.pool.write().unwrap_or_else(|p| p.into_inner()) = pool;
    }

    /// [`Self::plan`] with the newest pool; while some expert has no live
    /// copy, waits up to `wait` for a probe or a new placement to give it one.
    fn plan_waiting(
        &self,
        mut pool: Arc<WorkerPool>,
        layer: usize,
        pairs: &[Pair],
        failure: Option<&str>,
    ) -> Result<(Arc<WorkerPool>, Vec<Call>), ModelError> {
        let deadline = Instant::now() + self.inner.wait;
        let mut probed = false;
        loop {
            match self.plan(&pool, layer, pairs, failure) {
                Ok(calls) => return Ok((pool, calls)),
                // Before waiting or failing, ask every down worker at once:
                // one restarted in place may serve again before its next
                // scheduled probe (a rolling restart moves on as soon as
                // the restarted worker is ready).
                Err(_) if !probed => {
                    probed = true;
                    for addr in self.inner.runtime.block_on(pool.probe(true)) {
                        revived(&addr);
                    }
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => {
                    // The engine thread, not a runtime worker: sleeping here
                    // holds up only the batch that needs this expert.
                    std::thread::sleep(WAIT_POLL);
                    pool = self.pool();
                }
            }
        }
    }

    /// Assigns each pair to a live replica and groups them into calls that
    /// respect the message-size limit.
    fn plan(
        &self,
        pool: &WorkerPool,
        layer: usize,
        pairs: &[Pair],
        failure: Option<&str>,
    ) -> Result<Vec<Call>, ModelError> {
        let inner = &self.inner;
        let offset = inner.rotation.fetch_add(1, Ordering::Relaxed);
        let mut by_worker: BTreeMap<usize, Vec<Pair>> = BTreeMap::new();
        for p in pairs {
            let live = pool.live_replicas(layer, p.expert);
            if live.is_empty() {
                let why = failure.map(|f| format!("{f}, and ")).unwrap_or_default();
                return Err(ModelError::Unavailable(format!(
                    "layer {layer}: {why}no live worker hosts expert {}",
                    p.expert
                )));
            }
            by_worker.entry(live[(offset + p.expert) % live.len()]).or_default().push(*p);
        }
        // Bound a call by its request plus response size, in hidden-wide rows.
        let budget = MAX_MESSAGE_BYTES / 2 / (inner.hidden * 4);
        let mut calls = Vec::new();
        for (worker, mut pairs) in by_worker {
            pairs.sort_by_key(|p| (p.row, p.slot));
            calls.extend(split(&pairs, budget).into_iter().map(|pairs| Call { worker, pairs }));
        }
        Ok(calls)
    }

    fn send(
        &self,
        pool: &WorkerPool,
        layer: usize,
        x: &[f32],
        call: &Call,
    ) -> JoinHandle<Result<expert::Contributions, CallError>> {
        let inner = &self.inner;
        let hidden = inner.hidden;
        let mut rows: Vec<usize> = call.pairs.iter().map(|p| p.row).collect();
        rows.dedup();
        let mut routes: Vec<Vec<(ExpertId, f32)>> = vec![Vec::new(); rows.len()];
        let mut t = 0;
        for p in &call.pairs {
            while rows[t] != p.row {
                t += 1;
            }
            routes[t].push((ExpertId(p.expert as u32), p.weight));
        }
        let gathered = rows.iter().flat_map(|&r| x[r * hidden..(r + 1) * hidden].iter().copied()).collect();
        let batch = ExpertBatch { layer: LayerId(layer as u32), width: hidden, hidden: gathered, routes };
        let request: RunExpertsRequest = batch.into();
        let sent = request.encoded_len() as u64;
        inner.stats.bytes_sent.fetch_add(sent, Ordering::Relaxed);
        inner.stats.calls.fetch_add(1, Ordering::Relaxed);
        metrics::DISPATCH_BYTES.with_label_values(&["sent"]).inc_by(sent);
        metrics::DISPATCH_CALLS.inc();
        let mut client = pool.workers[call.worker].client.clone();
        let (timeout, expected_pairs, me) = (inner.timeout, call.pairs.len(), self.clone());
        inner.runtime.spawn(async move {
            let started = std::time::Instant::now();
            let result = tokio::time::timeout(timeout, client.run_experts(request)).await;
            let outcome = if matches!(result, Ok(Ok(_))) { "ok" } else { "failed" };
            metrics::DISPATCH_LATENCY.with_label_values(&[outcome]).observe(started.elapsed().as_secs_f64());
            let response = match result {
                Err(_) => return Err(CallError::Retryable(format!("no answer within {timeout:?}"))),
                Ok(Err(status)) if retryable(status.code()) => {
                    return Err(CallError::Retryable(format!("{:?}: {}", status.code(), status.message())));
                }
                Ok(Err(status)) => return Err(CallError::Fatal(format!("{:?}: {}", status.code(), status.message()))),
                Ok(Ok(response)) => response.into_inner(),
            };
            let received = response.encoded_len() as u64;
            me.inner.stats.bytes_received.fetch_add(received, Ordering::Relaxed);
            metrics::DISPATCH_BYTES.with_label_values(&["received"]).inc_by(received);
            let c = expert::Contributions::try_from(response).map_err(|e| CallError::Retryable(e.to_string()))?;
            if c.pairs != expected_pairs || c.width != hidden {
                return Err(CallError::Retryable(format!(
                    "answered {}x{} contributions for {expected_pairs}x{hidden}",
                    c.pairs, c.width
                )));
            }
            Ok(c)
        })
    }
}

/// How often a layer waiting for a live copy looks again.
const WAIT_POLL: Duration = Duration::from_millis(50);
/// How often the probe task looks for down workers due a probe.
const PROBE_TICK: Duration = Duration::from_millis(100);

/// Probes the current pool's down workers until the [`RemoteExperts`] is gone.
async fn probe_down_workers(inner: std::sync::Weak<Inner>) {
    loop {
        tokio::time::sleep(PROBE_TICK).await;
        let Some(pool) = inner.upgrade().map(|i| i.pool.read().unwrap_or_else(|p| p.into_inner()).clone()) else {
            return;
        };
        for addr in pool.probe(false).await {
            revived(&addr);
        }
    }
}

fn revived(addr: &str) {
    tracing::info!(worker = %addr, "worker answers again with its experts; dispatching to it");
    metrics::WORKER_REVIVALS.inc();
}

/// Splits one worker's pairs (sorted by token row) into calls whose hidden
/// rows plus contribution rows stay within `budget`. A token is never split:
/// one whose own cost passes the budget goes alone.
fn split(pairs: &[Pair], budget: usize) -> Vec<Vec<Pair>> {
    let mut calls = Vec::new();
    let mut current: Vec<Pair> = Vec::new();
    let mut used = 0;
    for token in pairs.chunk_by(|a, b| a.row == b.row) {
        let cost = 1 + token.len();
        if !current.is_empty() && used + cost > budget {
            calls.push(std::mem::take(&mut current));
            used = 0;
        }
        used += cost;
        current.extend_from_slice(token);
    }
    if !current.is_empty() {
        calls.push(current);
    }
    calls
}

impl ExpertExecutor for RemoteExperts {
    type Pending = PendingCalls;

    fn start(&self, layer: usize, x: &[f32], routes: &[Route]) -> Result<PendingCalls, ModelError> {
        let mut pairs = Vec::new();
        for (row, route) in routes.iter().enumerate() {
            for &(expert, weight) in route {
                pairs.push(Pair { row, slot: pairs.len(), expert, weight });
            }
        }
        self.inner.stats.token_layers.fetch_add(routes.len() as u64, Ordering::Relaxed);
        let mut per_expert: BTreeMap<usize, u64> = BTreeMap::new();
        for &(expert, _) in routes.iter().flatten() {
            *per_expert.entry(expert).or_default() += 1;
        }
        let layer_label = layer.to_string();
        for (expert, n) in per_expert {
            metrics::EXPERT_TOKENS.with_label_values(&[&layer_label, &expert.to_string()]).inc_by(n);
        }
        let (pool, calls) = self.plan_waiting(self.pool(), layer, &pairs, None)?;
        let x = x.to_vec();
        let calls = calls
            .into_iter()
            .map(|call| {
                let handle = self.send(&pool, layer, &x, &call);
                (call, handle)
            })
            .collect();
        Ok(PendingCalls { experts: self.clone(), pool, layer, x, slots: pairs.len(), calls })
    }
}

impl PendingExperts for PendingCalls {
    fn finish(self) -> Result<Contributions, ModelError> {
        let PendingCalls { experts, mut pool, layer, x, slots, mut calls } = self;
        let inner = &experts.inner;
        let hidden = inner.hidden;
        let mut out = vec![0.0; slots * hidden];
        loop {
            let (plans, handles): (Vec<Call>, Vec<_>) = calls.into_iter().unzip();
            let results = inner.runtime.block_on(futures::future::join_all(handles));
            let mut failed: Vec<Pair> = Vec::new();
            let mut failure = None;
            for (call, result) in plans.into_iter().zip(results) {
                let addr = &pool.workers[call.worker].addr;
                let result = result.unwrap_or_else(|e| Err(CallError::Retryable(format!("call task failed: {e}"))));
                match result {
                    Ok(c) => {
                        for (i, p) in call.pairs.iter().enumerate() {
                            out[p.slot * hidden..(p.slot + 1) * hidden]
                                .copy_from_slice(&c.data[i * hidden..(i + 1) * hidden]);
                        }
                    }
                    Err(CallError::Retryable(why)) => {
                        tracing::warn!(layer, worker = %addr, error = %why, "expert call failed; trying other replicas");
                        pool.mark_down(call.worker);
                        failure = Some(format!("worker {addr} failed ({why})"));
                        failed.extend(call.pairs);
                    }
                    Err(CallError::Fatal(why)) => {
                        return Err(ModelError::Unavailable(format!(
                            "layer {layer}: worker {addr} refused the call: {why}"
                        )));
                    }
                }
            }
            if failed.is_empty() {
                return Ok(out);
            }
            // Which worker computes a pair never changes its bits, so the
            // retry may use a newer pool than the one this layer started with.
            let (newest, retry) = experts.plan_waiting(pool, layer, &failed, failure.as_deref())?;
            pool = newest;
            inner.stats.retries.fetch_add(retry.len() as u64, Ordering::Relaxed);
            metrics::DISPATCH_RETRIES.inc_by(retry.len() as u64);
            calls = retry
                .into_iter()
                .map(|call| {
                    let handle = experts.send(&pool, layer, &x, &call);
                    (call, handle)
                })
                .collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(tokens: usize, per_token: usize) -> Vec<Pair> {
        (0..tokens * per_token).map(|i| Pair { row: i / per_token, slot: i, expert: i % 7, weight: 1.0 }).collect()
    }

    #[test]
    fn split_respects_the_budget_and_keeps_tokens_whole() {
        let all = pairs(10, 3);
        let calls = split(&all, 9);
        // Each token costs 1 hidden row + 3 contribution rows: two fit in 9.
        assert_eq!(calls.len(), 5);
        for call in &calls {
            let rows: std::collections::BTreeSet<usize> = call.iter().map(|p| p.row).collect();
            assert!(rows.len() + call.len() <= 9);
            assert!(rows.iter().all(|r| call.iter().filter(|p| p.row == *r).count() == 3), "a token was split");
        }
        let slots: Vec<usize> = calls.iter().flatten().map(|p| p.slot).collect();
        assert_eq!(slots, (0..30).collect::<Vec<_>>(), "every pair exactly once, in order");
        // A token costlier than the budget still goes, alone.
        assert_eq!(split(&pairs(2, 6), 4).len(), 2);
        assert_eq!(split(&pairs(3, 2), 1000).len(), 1);
    }
}
