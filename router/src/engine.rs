//! Continuous batching: one engine thread steps every active sequence
//! together. New requests join at the next step; prompts are prefilled in
//! chunks within a per-step token budget so a long prompt does not stall
//! everyone's decode, and that budget is shared fairly between waiting
//! prompts so a long one does not hold back a short one's first token; a
//! finished or abandoned sequence (its receiver dropped: the client went
//! away) leaves the batch at once and its state is freed. Each step makes
//! one `forward_batch` call, hence one expert call per MoE layer for the
//! whole batch. Batching never changes a sequence's bits.

use std::sync::Arc;

use myriad_model::generate::{Rng, sample};
use myriad_model::model::Chunk;
use myriad_model::moe::ExpertExecutor;
use myriad_model::state::block_tokens;
use myriad_model::{Logits, Model, Sampling, SequenceState};
use tokio::sync::mpsc;

use crate::kvcache::{Save, StateCache};
use crate::logits::{LogitsParams, TokenLogprobs, logprobs};
use crate::metrics;

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// What the engine sends back for one request, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The log-probabilities of prompt tokens, in order from the second
    /// (the first has none), before any token; only when the request asked
    /// for them ([`LogitsParams::prompt_logprobs`]), a chunk at a time.
    PromptLogprobs(Vec<TokenLogprobs>),
    /// A token, with its log-probabilities when the request asked for them.
    Token(u32, Option<TokenLogprobs>),
    Done(FinishReason),
    Error(String),
}

/// What may be sampled next (a grammar for structured outputs and forced
/// tool calls). The engine asks for the allowed tokens while the step's
/// forward runs, masks the logits with them, and feeds back the token.
pub trait Constraint: Send {
    /// The tokens allowed next, one bit per id (bit `i % 32` of word
    /// `i / 32`); `None` when any token is.
    fn allowed(&mut self) -> Result<Option<Vec<u32>>, String>;
    fn consume(&mut self, token: u32) -> Result<(), String>;
    /// Nothing may follow: the constrained output is complete.
    fn finished(&self) -> bool;
}

/// Whether `mask` (as [`Constraint::allowed`] gives it) allows `token`; ids
/// past the mask's end are not allowed.
pub fn mask_allows(mask: &[u32], token: usize) -> bool {
    mask.get(token / 32).is_some_and(|w| w >> (token % 32) & 1 == 1)
}

pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// Tokens that end the sequence (the model's end-of-sequence ids).
    pub stop_tokens: Vec<u32>,
    pub events: mpsc::UnboundedSender<Event>,
    /// The request's span (from admission): each step it joins links to it.
    pub span: tracing::Span,
    pub constraint: Option<Box<dyn Constraint>>,
    /// Penalties, bias, minimum length and log-probabilities.
    pub logits: LogitsParams,
    /// Prefixes are shared through the KV-cache only with requests of the
    /// same salt (vLLM's `cache_salt`: tenants that must not learn what
    /// others sent from how fast their prompts run).
    pub cache_salt: Option<Arc<str>>,
}

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Most sequences stepped together.
    pub max_batch: usize,
    /// Most tokens one step runs (decode tokens plus prefill chunks).
    pub step_tokens: usize,
    /// Requests that may wait for a place in the batch.
    pub queue: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { max_batch: 64, step_tokens: 512, queue: 256 }
    }
}

/// The handle the HTTP layer submits through.
#[derive(Clone)]
pub struct Engine {
    requests: mpsc::Sender<Queued>,
    /// Where conversation state is restored from and stored to.
    cache: Option<StateCache>,
}

/// A request on its way to the engine thread, with the state of the prefix
/// of its prompt restored from the KV-cache: only the tokens after it are
/// prefilled.
struct Queued {
    request: Request,
    restored: Option<SequenceState>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full")]
    QueueFull,
    #[error("the engine has stopped")]
    Stopped,
}

impl Engine {
    /// Starts the engine thread over `model` with routed experts on
    /// `experts`. With `cache`, prompts continue from the longest prefix
    /// stored there, and the states worth keeping (after a prompt, at its
    /// last block boundary, after a finished turn) are stored there.
    pub fn start<E: ExpertExecutor + Send + 'static>(
        model: Arc<Model>,
        experts: E,
        config: EngineConfig,
        cache: Option<StateCache>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let saver = cache.clone();
        std::thread::Builder::new()
            .name("myriad-engine".into())
            .spawn(move || run(&model, &experts, rx, config, saver.as_ref()))
            .unwrap_or_else(|e| panic!("cannot start the engine thread: {e}"));
        Engine { requests: tx, cache }
    }

    /// Queues the choices of one prompt (every request in `choices` has the
    /// same prompt), each continuing from the state of the prompt's longest
    /// prefix in the KV-cache when there is one. Returns the number of
    /// prompt tokens restored. Refuses at once when the queue is full;
    /// choices queued before that stop when their receivers drop.
    pub async fn submit(&self, choices: Vec<Request>) -> Result<usize, SubmitError> {
        let prompt: &[u32] = choices.first().map_or(&[], |c| &c.prompt);
        debug_assert!(choices.iter().all(|c| c.prompt == prompt), "choices of different prompts");
        // Prompt log-probabilities need every prompt token run.
        let whole = choices.iter().any(|c| c.logits.prompt_logprobs.is_some());
        let restored = match (&self.cache, prompt.split_last()) {
            // The last prompt token always runs: its logits give the first token.
            (Some(cache), Some((_, before_last))) if !whole => {
                cache.lookup(before_last, choices[0].cache_salt.as_deref()).await
            }
            _ => None,
        };
        let cached = restored.as_ref().map_or(0, |s| s.position);
        for request in choices {
            let queued = Queued { request, restored: restored.clone() };
            self.requests.try_send(queued).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => SubmitError::Stopped,
            })?;
        }
        metrics::QUEUE_DEPTH.set((self.requests.max_capacity() - self.requests.capacity()) as i64);
        Ok(cached)
    }
}

struct Active {
    request: Request,
    state: SequenceState,
    /// Prompt tokens already run (or restored).
    prefilled: usize,
    /// Tokens sampled so far.
    generated: Vec<u32>,
    /// The token to feed next once the prompt is done.
    next: Option<u32>,
    rng: Rng,
}

fn run(
    model: &Model,
    experts: &impl ExpertExecutor,
    mut requests: mpsc::Receiver<Queued>,
    config: EngineConfig,
    cache: Option<&StateCache>,
) {
    let mut active: Vec<Active> = Vec::new();
    loop {
        if active.is_empty() {
            match requests.blocking_recv() {
                Some(r) => active.push(admit(model, r)),
                None => return,
            }
        }
        while active.len() < config.max_batch {
            match requests.try_recv() {
                Ok(r) => active.push(admit(model, r)),
                Err(_) => break,
            }
        }
        metrics::QUEUE_DEPTH.set((requests.max_capacity() - requests.capacity()) as i64);
        // Abandoned requests leave before any work is spent on them.
        active.retain(|a| !a.request.events.is_closed());
        if active.is_empty() {
            continue;
        }
        step(model, experts, &mut active, config.step_tokens, cache);
    }
}

fn admit(model: &Model, Queued { request, restored }: Queued) -> Active {
    let rng = Rng::new(request.sampling.seed);
    // A restored state must leave at least one prompt token to run: its
    // logits give the first completion token.
    let state = match restored {
        Some(s) if s.position < request.prompt.len() => s,
        _ => model.new_state(),
    };
    metrics::TOKENS.with_label_values(&["prompt_cached"]).inc_by(state.position as u64);
    Active { prefilled: state.position, state, generated: Vec::new(), next: None, rng, request }
}

/// Most prompt tokens of a scored prompt (one whose every position's
/// logits are kept) one step runs: 128 rows of V4's 129k-token vocabulary
/// are 66 MB of floats.
const SCORED_CHUNK: usize = 128;

/// The last block boundary strictly inside `a`'s prompt, before its last
/// token: the state there is stored beside the whole prompt's, so that
/// later prompts sharing the prefix up to it restore it. `None` when the
/// prompt does not pass a boundary before its last token.
fn save_point(model: &Model, a: &Active) -> Option<usize> {
    let block = block_tokens(&model.config).max(1);
    let point = (a.request.prompt.len().saturating_sub(2)) / block * block;
    (point > 0).then_some(point)
}

/// Splits `budget` prompt tokens between prompts wanting `(index, tokens)`,
/// max-min fair: each gets an equal share, and what a short prompt does not
/// need goes to the longer ones. A short prompt arriving beside a long one
/// is thus done in a step or two instead of waiting for the long one.
/// Ties in length go to the earlier index; with fewer tokens than prompts,
/// the shortest go first. Only prompts given at least one token are listed.
fn share(prompts: &[(usize, usize)], budget: usize) -> Vec<(usize, usize)> {
    let mut order: Vec<(usize, usize)> = prompts.to_vec();
    order.sort_by_key(|&(i, want)| (want, i));
    let mut left = budget;
    let mut out = Vec::new();
    for (k, &(i, want)) in order.iter().enumerate() {
        let fair = (left / (order.len() - k)).max(1);
        let n = want.min(fair).min(left);
        if n == 0 {
            break;
        }
        out.push((i, n));
        left -= n;
    }
    out
}

/// One forward over every active sequence, then sampling and bookkeeping.
fn step(
    model: &Model,
    experts: &impl ExpertExecutor,
    active: &mut Vec<Active>,
    step_tokens: usize,
    cache: Option<&StateCache>,
) {
    // Decode tokens first (one each), then prompt chunks with what is left.
    let mut budget = step_tokens.max(1);
    let mut plan: Vec<(usize, usize)> = Vec::new(); // (index, tokens this step)
    for (i, a) in active.iter().enumerate() {
        if a.next.is_some() && budget > 0 {
            plan.push((i, 1));
            budget -= 1;
        }
    }
    let prompts: Vec<(usize, usize)> = active
        .iter()
        .enumerate()
        .filter(|(_, a)| a.next.is_none())
        .map(|(i, a)| {
            let left = a.request.prompt.len() - a.prefilled;
            // With a KV-cache, the prompt's last token runs in a step of its
            // own: the state before it is the one worth storing, since a
            // request for the same prompt must run that token for its logits.
            // A chunk also stops at the prompt's last block boundary, stored
            // too: what prompts sharing a prefix (a system prompt) restore.
            let want = match (cache.is_some(), save_point(model, a)) {
                (true, Some(point)) if a.prefilled < point => point - a.prefilled,
                (true, _) if left > 1 => left - 1,
                _ => left,
            };
            // A scored prompt's chunks keep every row's logits: bounded, so
            // one step holds at most SCORED_CHUNK rows of the vocabulary.
            let want = if a.request.logits.prompt_logprobs.is_some() { want.min(SCORED_CHUNK) } else { want };
            (i, want)
        })
        .filter(|&(_, want)| want > 0)
        .collect();
    for (i, n) in share(&prompts, budget) {
        plan.push((i, n));
    }
    plan.sort_unstable();
    metrics::BATCH_SIZE.observe(plan.len() as f64);
    let inputs: Vec<Vec<u32>> = plan
        .iter()
        .map(|&(i, n)| {
            let a = &active[i];
            match a.next {
                Some(t) => vec![t],
                None => a.request.prompt[a.prefilled..a.prefilled + n].to_vec(),
            }
        })
        .collect();
    let tokens: usize = inputs.iter().map(Vec::len).sum();
    let span = tracing::debug_span!("step", sequences = plan.len(), tokens);
    for &(i, _) in &plan {
        span.follows_from(&active[i].request.span);
    }
    // `plan` is sorted by index: walk `active` once, lending each planned
    // sequence's state to the batch, and the constraint of each that
    // samples after this step to the mask computation.
    let mut planned = plan.iter().zip(&inputs).peekable();
    let mut chunks = Vec::with_capacity(plan.len());
    let mut constrained = Vec::new();
    for (i, a) in active.iter_mut().enumerate() {
        if let Some(((_, n), tokens)) = planned.next_if(|((j, _), _)| *j == i) {
            let samples = a.next.is_some() || a.prefilled + n == a.request.prompt.len();
            if let (true, Some(c)) = (samples, a.request.constraint.as_mut()) {
                constrained.push((i, c));
            }
            let scored = a.next.is_none() && a.request.logits.prompt_logprobs.is_some();
            chunks.push(Chunk { tokens, state: &mut a.state, want: if scored { Logits::All } else { Logits::Last } });
        }
    }
    // Masks are computed beside the forward, not after it: as tasks of the
    // same pool, so they fill the forward's idle time (waiting on experts,
    // its serial parts) instead of competing with its threads.
    let mut forward = || span.in_scope(|| model.forward_batch(&mut chunks, experts));
    let (result, masks) = if constrained.is_empty() {
        (forward(), Vec::new())
    } else {
        rayon::join(forward, move || {
            use rayon::prelude::*;
            constrained.into_par_iter().map(|(i, c)| (i, c.allowed())).collect::<Vec<_>>()
        })
    };
    let mut masks = masks.into_iter().peekable();
    let logits = match result {
        Ok(l) => l,
        Err(e) => {
            // A failed step leaves these sequences' states half-advanced.
            tracing::error!(error = %e, "engine step failed");
            let failed: Vec<usize> = plan.iter().map(|&(i, _)| i).collect();
            for &i in failed.iter().rev() {
                let a = active.remove(i);
                let _ = a.request.events.send(Event::Error(format!("{e}")));
            }
            return;
        }
    };
    let mut finished = Vec::new();
    let vocab = model.config.vocab_size;
    for (&(i, n), mut logits) in plan.iter().zip(logits) {
        let a = &mut active[i];
        if let (None, Some(k)) = (a.next, a.request.logits.prompt_logprobs) {
            // Row j predicts the prompt token after position prefilled + j;
            // rows are scored in parallel (each passes over the vocabulary).
            use rayon::prelude::*;
            let next = a.request.prompt.get(a.prefilled + 1..).unwrap_or_default();
            let scored: Vec<TokenLogprobs> =
                (logits.par_chunks(vocab).zip(next)).map(|(row, &t)| logprobs(row, t, k)).collect();
            if !scored.is_empty() {
                let _ = a.request.events.send(Event::PromptLogprobs(scored));
            }
            logits.drain(..(n - 1) * vocab);
        }
        if a.next.is_none() {
            a.prefilled += n;
            metrics::TOKENS.with_label_values(&["prompt"]).inc_by(n as u64);
            let stored = a.prefilled + 1 == a.request.prompt.len() || Some(a.prefilled) == save_point(model, a);
            if stored && let Some(cache) = cache {
                let (tokens, salt) = (a.request.prompt[..a.prefilled].to_vec(), a.request.cache_salt.clone());
                cache.save(Save { tokens, state: a.state.clone(), salt });
            }
            if a.prefilled < a.request.prompt.len() {
                continue; // more prompt to run
            }
            if a.request.max_tokens == 0 {
                // Scoring the prompt only (`echo` with `max_tokens` 0).
                let _ = a.request.events.send(Event::Done(FinishReason::Length));
                finished.push(i);
                continue;
            }
        }
        let params = &a.request.logits;
        let raw = params.logprobs.map(|k| (k, logits.clone()));
        if !params.changes_nothing() {
            params.apply(&mut logits, &a.request.prompt, &a.generated, &a.request.stop_tokens);
        }
        let masked = match masks.next_if(|(j, _)| *j == i) {
            Some((_, allowed)) => allowed.and_then(|bits| mask_logits(&mut logits, bits.as_deref())),
            None => Ok(()),
        };
        if let Err(e) = masked {
            // The grammar cannot go on (it never should): end the sequence.
            tracing::warn!(error = %e, "structured output stopped");
            let _ = a.request.events.send(Event::Done(FinishReason::Stop));
            finished.push(i);
            continue;
        }
        let token = sample(&logits, &a.request.sampling, &mut a.rng);
        let token_logprobs = raw.map(|(k, raw)| logprobs(&raw, token, k));
        a.generated.push(token);
        metrics::TOKENS.with_label_values(&["completion"]).inc();
        let mut done = None;
        if a.request.stop_tokens.contains(&token) {
            done = Some(FinishReason::Stop);
        } else {
            let _ = a.request.events.send(Event::Token(token, token_logprobs));
            let complete = match a.request.constraint.as_mut().map(|c| c.consume(token).map(|()| c.finished())) {
                Some(Ok(complete)) => complete,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "structured output stopped");
                    true
                }
                None => false,
            };
            if complete {
                done = Some(FinishReason::Stop);
            } else if a.generated.len() >= a.request.max_tokens {
                done = Some(FinishReason::Length);
            }
        }
        match done {
            Some(reason) => {
                let _ = a.request.events.send(Event::Done(reason));
                finished.push(i);
            }
            None => a.next = Some(token),
        }
    }
    for &i in finished.iter().rev() {
        let a = active.remove(i);
        // The state has consumed the prompt and every sampled token but the
        // last; store it when the turn added to what the prompt stored.
        if let Some(cache) = cache
            && a.generated.len() > 1
        {
            let mut tokens = a.request.prompt;
            tokens.extend(&a.generated[..a.generated.len() - 1]);
            debug_assert_eq!(tokens.len(), a.state.position);
            cache.save(Save { tokens, state: a.state, salt: a.request.cache_salt });
        }
    }
}

/// Disallowed tokens get `-inf`; an error when nothing is allowed.
fn mask_logits(logits: &mut [f32], allowed: Option<&[u32]>) -> Result<(), String> {
    let Some(bits) = allowed else { return Ok(()) };
    let mut any = false;
    for (id, l) in logits.iter_mut().enumerate() {
        if mask_allows(bits, id) {
            any = true;
        } else {
            *l = f32::NEG_INFINITY;
        }
    }
    if any { Ok(()) } else { Err("the grammar allows no token".into()) }
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn prompt_tokens_are_shared_max_min_fair() {
        // A long prompt beside a short one: the short one is done at once.
        assert_eq!(share(&[(0, 20_000), (1, 40)], 512), vec![(1, 40), (0, 472)]);
        // Equal shares when both want more than half.
        assert_eq!(share(&[(0, 20_000), (1, 900)], 512), vec![(1, 256), (0, 256)]);
        // Leftovers flow to the longer prompts; never more than the budget.
        let s = share(&[(0, 100), (1, 10), (2, 1000), (3, 1000)], 300);
        assert_eq!(s, vec![(1, 10), (0, 96), (2, 97), (3, 97)]);
        assert_eq!(s.iter().map(|p| p.1).sum::<usize>(), 300);
        // Fewer tokens than prompts: the shortest go first.
        assert_eq!(share(&[(0, 50), (1, 5), (2, 7)], 2), vec![(1, 1), (2, 1)]);
        assert_eq!(share(&[(0, 5)], 0), vec![]);
    }
}
