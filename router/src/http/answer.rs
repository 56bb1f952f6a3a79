//! Answering one admitted request from the engine's token events: whole, or
//! as server-sent events ending in `data: [DONE]`. Text is split into
//! reasoning and content, cut at stop strings, and a DSML tool-call block
//! becomes OpenAI `tool_calls` (streamed as each call's name, then its
//! arguments in fragments that concatenate to the whole answer's).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use super::AppState;
use super::api::{Params, ToolUse};
use super::error::ApiError;
use super::text::{Delta, Deltas, Detokenizer};
use crate::chat::v4_parse::{self, ToolCall};
use crate::engine::{Event, FinishReason};
use crate::metrics;

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Kind {
    Completion,
    Chat { thinking: bool, tools: ToolUse },
}

impl Kind {
    pub(super) fn endpoint(self) -> &'static str {
        match self {
            Kind::Completion => "completions",
            Kind::Chat { .. } => "chat_completions",
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// One request being answered.
pub(super) struct Run {
    state: Arc<AppState>,
    kind: Kind,
    pub(super) id: String,
    created: u64,
    prompt_tokens: usize,
    /// Prompt tokens restored from the KV-cache rather than computed.
    pub(super) cached_tokens: usize,
    pub(super) params: Params,
    started: Instant,
}

/// How the text ended and what it called.
struct End {
    reason: Option<FinishReason>,
    stopped: bool,
    calls: Vec<ToolCall>,
}

impl End {
    fn finish_reason(&self) -> &'static str {
        match (self.calls.is_empty(), self.stopped, self.reason) {
            (false, _, _) => "tool_calls",
            (true, true, _) | (true, false, Some(FinishReason::Stop)) => "stop",
            _ => "length",
        }
    }
}

impl Run {
    pub(super) fn new(state: Arc<AppState>, kind: Kind, prompt_tokens: usize, params: Params) -> Self {
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let prefix = if kind == Kind::Completion { "cmpl" } else { "chatcmpl" };
        let id = format!("{prefix}-{created:x}{:06x}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
        Run { state, kind, id, created, prompt_tokens, cached_tokens: 0, params, started: Instant::now() }
    }

    pub(super) fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    fn deltas(&self) -> Deltas {
        let (thinking, calls) = match self.kind {
            Kind::Completion => (false, false),
            Kind::Chat { thinking, tools } => (thinking, tools != ToolUse::Off),
        };
        Deltas::new(thinking, calls, self.params.stop.clone())
    }

    fn usage(&self, completion: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        })
    }

    /// The calls of a tool-call block; `Err` with the block's text (which
    /// is then content) when the model wrote it malformed.
    fn calls(&self, block: &str) -> Result<Vec<ToolCall>, String> {
        match v4_parse::tool_calls(block) {
            Ok(mut calls) => {
                if matches!(self.kind, Kind::Chat { tools: ToolUse::Auto { parallel: false }, .. }) {
                    calls.truncate(1);
                }
                Ok(calls)
            }
            Err(e) => {
                tracing::warn!(error = %e, "the model wrote a malformed tool-call block; it is returned as content");
                Err(block.to_string())
            }
        }
    }

    fn call_id(&self, index: usize) -> String {
        format!("call-{}-{index}", self.id.rsplit('-').next().unwrap_or(""))
    }

    /// Collects the whole answer.
    pub(super) async fn whole(self, mut rx: mpsc::UnboundedReceiver<Event>) -> Response {
        // Dropped unset when the client goes away before the answer.
        let mut outcome = Outcome::new(self.kind.endpoint());
        let mut text = Detokenizer::new(&self.state.tokenizer);
        let mut deltas = self.deltas();
        let mut answer = Delta::default();
        let mut last = Instant::now();
        let add = |delta: Delta, answer: &mut Delta| {
            answer.reasoning.push_str(&delta.reasoning);
            answer.content.push_str(&delta.content);
            answer.stopped |= delta.stopped;
            answer.calls = answer.calls.take().or(delta.calls);
        };
        let reason = loop {
            match rx.recv().await {
                Some(Event::Token(t)) => {
                    observe_token(&self, text.ids().is_empty(), &mut last);
                    add(deltas.next(text.push(t), false), &mut answer);
                    if answer.stopped {
                        break None;
                    }
                }
                Some(Event::Done(r)) => break Some(r),
                Some(Event::Error(e)) => {
                    outcome.set("server_error");
                    return ApiError::unavailable(e).into_response();
                }
                None => {
                    outcome.set("server_error");
                    return ApiError::unavailable("the engine dropped the request").into_response();
                }
            }
        };
        let tokens = text.ids().len();
        if !answer.stopped {
            add(deltas.next(text.finish(), true), &mut answer);
        }
        let calls = match answer.calls.as_deref().map(|b| self.calls(b)) {
            Some(Ok(calls)) => calls,
            Some(Err(block)) => {
                answer.content.push_str(&block);
                Vec::new()
            }
            None => Vec::new(),
        };
        let end = End { reason, stopped: answer.stopped, calls };
        outcome.set("ok");
        let (object, choice) = match self.kind {
            Kind::Completion => (
                "text_completion",
                json!({"index": 0, "text": answer.content, "finish_reason": end.finish_reason(), "logprobs": null}),
            ),
            Kind::Chat { thinking, .. } => {
                let content = if answer.content.is_empty() && !end.calls.is_empty() {
                    Value::Null
                } else {
                    json!(answer.content)
                };
                let mut message = json!({"role": "assistant", "content": content});
                if thinking {
                    message["reasoning_content"] = json!(answer.reasoning);
                }
                if !end.calls.is_empty() {
                    let calls: Vec<Value> = end
                        .calls
                        .iter()
                        .enumerate()
                        .map(|(i, c)| {
                            json!({"id": self.call_id(i), "type": "function",
                                   "function": {"name": c.name, "arguments": c.arguments()}})
                        })
                        .collect();
                    message["tool_calls"] = json!(calls);
                }
                ("chat.completion", json!({"index": 0, "message": message, "finish_reason": end.finish_reason()}))
            }
        };
        axum::Json(json!({
            "id": self.id, "object": object, "created": self.created, "model": self.state.model_name,
            "choices": [choice], "usage": self.usage(tokens),
        }))
        .into_response()
    }

    /// A chunk: for chat, `delta` holds the delta's fields (role, reasoning,
    /// content, tool calls); for completions, its `content` is the text.
    fn chunk(&self, delta: Map<String, Value>, finish: Option<&str>) -> Value {
        let (object, choice) = match self.kind {
            Kind::Completion => {
                let text = delta.get("content").cloned().unwrap_or(json!(""));
                ("text_completion", json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": null}))
            }
            Kind::Chat { .. } => {
                ("chat.completion.chunk", json!({"index": 0, "delta": delta, "finish_reason": finish}))
            }
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.state.model_name, "choices": [choice]})
    }

    /// The chunks of one text delta (none when it holds no text).
    fn text_chunk(&self, delta: &Delta) -> Option<Value> {
        let mut d = Map::new();
        if !delta.reasoning.is_empty() {
            d.insert("reasoning_content".into(), json!(delta.reasoning));
        }
        if !delta.content.is_empty() {
            d.insert("content".into(), json!(delta.content));
        }
        (!d.is_empty()).then(|| self.chunk(d, None))
    }

    /// Each call as a chunk with its id and name, then one chunk per
    /// fragment of its arguments.
    fn call_chunks(&self, calls: &[ToolCall]) -> Vec<Value> {
        let mut chunks = Vec::new();
        let tool_calls = |v: Value| Map::from_iter([("tool_calls".to_string(), json!([v]))]);
        for (i, call) in calls.iter().enumerate() {
            chunks.push(self.chunk(
                tool_calls(json!({"index": i, "id": self.call_id(i), "type": "function",
                                  "function": {"name": call.name, "arguments": ""}})),
                None,
            ));
            for fragment in call.argument_fragments() {
                chunks.push(self.chunk(tool_calls(json!({"index": i, "function": {"arguments": fragment}})), None));
            }
        }
        chunks
    }

    /// Streams the answer as SSE; stops (and so cancels the sequence) as soon
    /// as the client goes away.
    pub(super) async fn stream(
        self,
        mut rx: mpsc::UnboundedReceiver<Event>,
        out: mpsc::Sender<Result<SseEvent, Infallible>>,
    ) {
        // Left unset (counted as cancelled) on every early return below: the
        // client went away.
        let mut outcome = Outcome::new(self.kind.endpoint());
        let send = |v: Value| {
            let out = out.clone();
            async move { out.send(Ok(SseEvent::default().data(v.to_string()))).await.is_ok() }
        };
        if matches!(self.kind, Kind::Chat { .. })
            && !send(self.chunk(Map::from_iter([("role".into(), json!("assistant"))]), None)).await
        {
            return;
        }
        let mut deltas = self.deltas();
        let mut text = Detokenizer::new(&self.state.tokenizer);
        let mut last = Instant::now();
        let mut calls = Vec::new();
        // Sends a delta's text, or its tool calls (a malformed block as text).
        let mut pending = Vec::new();
        let mut take = |delta: Delta, pending: &mut Vec<Value>| {
            let mut delta = delta;
            if let Some(block) = delta.calls.take() {
                match self.calls(&block) {
                    Ok(c) => calls = c,
                    Err(block) => delta.content.push_str(&block),
                }
                pending.extend(self.text_chunk(&delta));
                pending.extend(self.call_chunks(&calls));
            } else {
                pending.extend(self.text_chunk(&delta));
            }
        };
        let (reason, stopped) = loop {
            match rx.recv().await {
                Some(Event::Token(t)) => {
                    observe_token(&self, text.ids().is_empty(), &mut last);
                    let delta = deltas.next(text.push(t), false);
                    let stopped = delta.stopped;
                    take(delta, &mut pending);
                    for chunk in pending.drain(..) {
                        if !send(chunk).await {
                            return;
                        }
                    }
                    if stopped {
                        break (None, true);
                    }
                }
                Some(Event::Done(r)) => break (Some(r), false),
                Some(Event::Error(e)) => {
                    outcome.set("server_error");
                    send(ApiError::unavailable(e).body()).await;
                    return;
                }
                None => {
                    outcome.set("server_error");
                    send(ApiError::unavailable("the engine dropped the request").body()).await;
                    return;
                }
            }
        };
        let tokens = text.ids().len();
        let mut stopped = stopped;
        if !stopped {
            let tail = deltas.next(text.finish(), true);
            stopped = tail.stopped;
            take(tail, &mut pending);
        }
        for chunk in pending.drain(..) {
            send(chunk).await;
        }
        let end = End { reason, stopped, calls };
        send(self.chunk(Map::new(), Some(end.finish_reason()))).await;
        if self.params.include_usage {
            let mut usage = self.chunk(Map::new(), None);
            usage["choices"] = json!([]);
            usage["usage"] = self.usage(tokens);
            send(usage).await;
        }
        if out.send(Ok(SseEvent::default().data("[DONE]"))).await.is_ok() {
            outcome.set("ok");
        }
    }
}

/// Counts a request's outcome exactly once, when dropped: the one set, or
/// `cancelled` when none was (the client went away first; axum drops a
/// non-streaming handler's future when its connection closes).
struct Outcome {
    endpoint: &'static str,
    outcome: Option<&'static str>,
}

impl Outcome {
    fn new(endpoint: &'static str) -> Self {
        Outcome { endpoint, outcome: None }
    }

    fn set(&mut self, outcome: &'static str) {
        self.outcome = Some(outcome);
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        metrics::REQUESTS.with_label_values(&[self.endpoint, self.outcome.unwrap_or("cancelled")]).inc();
    }
}

fn observe_token(run: &Run, first: bool, last: &mut Instant) {
    if first {
        metrics::TIME_TO_FIRST_TOKEN.observe(run.started.elapsed().as_secs_f64());
    } else {
        metrics::INTER_TOKEN_LATENCY.observe(last.elapsed().as_secs_f64());
    }
    *last = Instant::now();
}
