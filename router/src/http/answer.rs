//! Answering one admitted request from the engine's token events, one
//! stream of events per choice (`n`): whole, or as server-sent events
//! ending in `data: [DONE]`. Text is split into
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
use super::choice::Choice;
use super::error::ApiError;
use super::text::Delta;
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

/// The prompt, when the answer shows it: echoed (its text starts a
/// completion; with `logprobs` its tokens start them, the first with
/// none), scored (vLLM's `prompt_logprobs`) or as ids (`return_token_ids`).
pub(super) struct ShownPrompt {
    pub(super) ids: Vec<u32>,
    /// The text a completion echoes.
    pub(super) echo: Option<String>,
}

/// One request being answered.
pub(super) struct Run {
    pub(super) state: Arc<AppState>,
    pub(super) kind: Kind,
    pub(super) id: String,
    created: u64,
    prompt_tokens: usize,
    /// Prompt tokens restored from the KV-cache rather than computed.
    pub(super) cached_tokens: usize,
    pub(super) params: Params,
    /// Each prompt's, when the answer shows it; choice `i` answers prompt
    /// `i / n`.
    prompts: Vec<Option<ShownPrompt>>,
    pub(super) started: Instant,
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
    pub(super) fn new(
        state: Arc<AppState>,
        kind: Kind,
        prompt_tokens: usize,
        params: Params,
        prompts: Vec<Option<ShownPrompt>>,
    ) -> Self {
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let prefix = if kind == Kind::Completion { "cmpl" } else { "chatcmpl" };
        let id = match &params.request_id {
            Some(asked) => format!("{prefix}-{asked}"),
            None => format!("{prefix}-{created:x}{:06x}", NEXT_ID.fetch_add(1, Ordering::Relaxed)),
        };
        Run { state, kind, id, created, prompt_tokens, cached_tokens: 0, params, prompts, started: Instant::now() }
    }

    /// The prompt choice `index` answers, when the answer shows it.
    pub(super) fn shown(&self, index: usize) -> Option<&ShownPrompt> {
        self.prompts.get(index / self.params.n.max(1))?.as_ref()
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

    /// Call `call` of choice `choice`.
    fn call_id(&self, choice: usize, call: usize) -> String {
        // The id after its `cmpl-`/`chatcmpl-`.
        format!("call-{}-{choice}-{call}", self.id.split_once('-').map_or("", |(_, own)| own))
    }

    /// Collects every choice's whole answer.
    pub(super) async fn whole(self, receivers: Vec<mpsc::UnboundedReceiver<Event>>) -> Response {
        // Dropped unset when the client goes away before the answer.
        let mut outcome = Outcome::new(self.kind.endpoint());
        let answers =
            futures::future::join_all(receivers.into_iter().enumerate().map(|(i, rx)| self.collect(i, rx))).await;
        let mut choices = Vec::with_capacity(answers.len());
        let mut tokens = 0;
        let mut prompt_logprobs = None;
        for answer in answers {
            match answer {
                Ok((choice, n, scored)) => {
                    choices.push(choice);
                    tokens += n;
                    prompt_logprobs = prompt_logprobs.or(scored);
                }
                Err(e) => {
                    outcome.set("server_error");
                    return e.into_response();
                }
            }
        }
        outcome.set("ok");
        let object = if self.kind == Kind::Completion { "text_completion" } else { "chat.completion" };
        let mut body = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.state.model_name,
            "choices": choices, "usage": self.usage(tokens),
        });
        // vLLM's place for them: each choice of a completion, a chat's top.
        if let (Kind::Chat { .. }, Some(scored)) = (self.kind, prompt_logprobs) {
            body["prompt_logprobs"] = scored;
        }
        self.add_chat_prompt_ids(&mut body);
        axum::Json(body).into_response()
    }

    /// One choice's whole answer, its number of tokens and its prompt's
    /// log-probabilities (vLLM's `prompt_logprobs`, when asked for).
    async fn collect(
        &self,
        index: usize,
        mut rx: mpsc::UnboundedReceiver<Event>,
    ) -> Result<(Value, usize, Option<Value>), ApiError> {
        let mut choice = Choice::new(self, index);
        let mut answer = Delta::default();
        let add = |delta: Delta, answer: &mut Delta| {
            answer.reasoning.push_str(&delta.reasoning);
            answer.content.push_str(&delta.content);
            answer.stopped |= delta.stopped;
            answer.calls = answer.calls.take().or(delta.calls);
        };
        let reason = loop {
            match rx.recv().await {
                Some(Event::PromptLogprobs(scored)) => choice.prompt_scored(scored),
                Some(Event::Token(t, logprobs)) => {
                    add(choice.push(t, logprobs), &mut answer);
                    if answer.stopped {
                        break None;
                    }
                }
                Some(Event::Done(r)) => break Some(r),
                Some(Event::Error(e)) => return Err(ApiError::unavailable(e)),
                None => return Err(ApiError::unavailable("the engine dropped the request")),
            }
        };
        let tokens = choice.text.ids().len();
        if !answer.stopped {
            add(choice.tail(), &mut answer);
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
        let logprobs = choice.take_logprobs();
        let prompt_logprobs = choice.prompt_logprobs();
        let mut body = match self.kind {
            Kind::Completion => {
                let mut c = json!({"index": index, "text": answer.content,
                                   "finish_reason": end.finish_reason(), "logprobs": logprobs});
                if let Some(scored) = &prompt_logprobs {
                    c["prompt_logprobs"] = scored.clone();
                }
                c
            }
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
                            json!({"id": self.call_id(index, i), "type": "function",
                                   "function": {"name": c.name, "arguments": c.arguments()}})
                        })
                        .collect();
                    message["tool_calls"] = json!(calls);
                }
                json!({"index": index, "message": message, "finish_reason": end.finish_reason(), "logprobs": logprobs})
            }
        };
        choice.add_token_ids(&mut body);
        Ok((body, tokens, prompt_logprobs))
    }

    /// vLLM's `return_token_ids` puts a chat's prompt ids at the top of its
    /// answer (of its first chunk, streamed).
    fn add_chat_prompt_ids(&self, body: &mut Value) {
        if let (Kind::Chat { .. }, true, Some(prompt)) = (self.kind, self.params.return_token_ids, self.shown(0)) {
            body["prompt_token_ids"] = json!(prompt.ids);
        }
    }

    /// A chunk for choice `index`: for chat, `delta` holds the delta's
    /// fields (role, reasoning, content, tool calls); for completions, its
    /// `content` is the text.
    fn chunk(&self, index: usize, delta: Map<String, Value>, finish: Option<&str>, logprobs: Value) -> Value {
        let choice = match self.kind {
            Kind::Completion => {
                let text = delta.get("content").cloned().unwrap_or(json!(""));
                json!({"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs})
            }
            Kind::Chat { .. } => json!({"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}),
        };
        let object = if self.kind == Kind::Completion { "text_completion" } else { "chat.completion.chunk" };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.state.model_name,
               "choices": [choice]})
    }

    /// The chunks of one delta of choice `index`: its text, then its tool
    /// calls (each call's id and name, then one chunk per fragment of its
    /// arguments). The first carries the log-probabilities not yet sent.
    fn delta_chunks(&self, choice: &mut Choice, delta: Delta, calls: &mut Vec<ToolCall>) -> Vec<Value> {
        let mut delta = delta;
        let mut found = Vec::new();
        if let Some(block) = delta.calls.take() {
            match self.calls(&block) {
                Ok(c) => found = c,
                Err(block) => delta.content.push_str(&block),
            }
        }
        let index = choice.index;
        let mut deltas = Vec::new();
        let mut text = Map::new();
        if !delta.reasoning.is_empty() {
            text.insert("reasoning_content".into(), json!(delta.reasoning));
        }
        if !delta.content.is_empty() {
            text.insert("content".into(), json!(delta.content));
        }
        if !text.is_empty() {
            deltas.push(text);
        }
        let tool_calls = |v: Value| Map::from_iter([("tool_calls".to_string(), json!([v]))]);
        for (i, call) in found.iter().enumerate() {
            deltas.push(tool_calls(json!({"index": i, "id": self.call_id(index, i), "type": "function",
                                          "function": {"name": call.name, "arguments": ""}})));
            for fragment in call.argument_fragments() {
                deltas.push(tool_calls(json!({"index": i, "function": {"arguments": fragment}})));
            }
        }
        calls.extend(found);
        let mut chunks: Vec<Value> = deltas
            .into_iter()
            .enumerate()
            .map(|(k, d)| self.chunk(index, d, None, if k == 0 { choice.take_logprobs() } else { Value::Null }))
            .collect();
        if let Some(first) = chunks.first_mut() {
            choice.add_token_ids(&mut first["choices"][0]);
        }
        chunks
    }

    /// Streams every choice as SSE; stops (and so cancels the sequences) as
    /// soon as the client goes away.
    pub(super) async fn stream(
        self,
        receivers: Vec<mpsc::UnboundedReceiver<Event>>,
        out: mpsc::Sender<Result<SseEvent, Infallible>>,
    ) {
        // Left unset (counted as cancelled) on every early return below: the
        // client went away.
        let mut outcome = Outcome::new(self.kind.endpoint());
        let ended = futures::future::join_all(
            receivers.into_iter().enumerate().map(|(i, rx)| self.stream_choice(i, rx, out.clone())),
        )
        .await;
        let mut tokens = 0;
        for end in ended {
            match end {
                Ok(n) => tokens += n,
                Err(Some(error)) => {
                    outcome.set("server_error");
                    let _ = out.send(Ok(SseEvent::default().data(error.body().to_string()))).await;
                    return;
                }
                Err(None) => return,
            }
        }
        if self.params.include_usage {
            let mut usage = self.chunk(0, Map::new(), None, Value::Null);
            usage["choices"] = json!([]);
            usage["usage"] = self.usage(tokens);
            let _ = out.send(Ok(SseEvent::default().data(usage.to_string()))).await;
        }
        if out.send(Ok(SseEvent::default().data("[DONE]"))).await.is_ok() {
            outcome.set("ok");
        }
    }

    /// Streams choice `index` to its finish chunk: its number of tokens, or
    /// the engine's error (`None`: the client went away).
    async fn stream_choice(
        &self,
        index: usize,
        mut rx: mpsc::UnboundedReceiver<Event>,
        out: mpsc::Sender<Result<SseEvent, Infallible>>,
    ) -> Result<usize, Option<ApiError>> {
        let send = |mut chunks: Vec<Value>, tokens: usize| {
            if self.params.continuous_usage {
                chunks.iter_mut().for_each(|c| c["usage"] = self.usage(tokens));
            }
            let out = out.clone();
            async move {
                for chunk in chunks {
                    if out.send(Ok(SseEvent::default().data(chunk.to_string()))).await.is_err() {
                        return Err(None);
                    }
                }
                Ok(())
            }
        };
        if matches!(self.kind, Kind::Chat { .. }) {
            let role = Map::from_iter([("role".into(), json!("assistant"))]);
            let mut first = self.chunk(index, role, None, Value::Null);
            self.add_chat_prompt_ids(&mut first);
            send(vec![first], 0).await?;
        }
        let mut choice = Choice::new(self, index);
        let mut calls = Vec::new();
        let (reason, mut stopped) = loop {
            match rx.recv().await {
                Some(Event::PromptLogprobs(scored)) => choice.prompt_scored(scored),
                Some(Event::Token(t, logprobs)) => {
                    let delta = choice.push(t, logprobs);
                    let stopped = delta.stopped;
                    let chunks = self.delta_chunks(&mut choice, delta, &mut calls);
                    send(chunks, choice.text.ids().len()).await?;
                    if stopped {
                        break (None, true);
                    }
                }
                Some(Event::Done(r)) => break (Some(r), false),
                Some(Event::Error(e)) => return Err(Some(ApiError::unavailable(e))),
                None => return Err(Some(ApiError::unavailable("the engine dropped the request"))),
            }
        };
        let tokens = choice.text.ids().len();
        if !stopped {
            let tail = choice.tail();
            stopped = tail.stopped;
            let chunks = self.delta_chunks(&mut choice, tail, &mut calls);
            send(chunks, tokens).await?;
        }
        let end = End { reason, stopped, calls };
        let logprobs = choice.take_logprobs();
        let mut last = self.chunk(index, Map::new(), Some(end.finish_reason()), logprobs);
        choice.add_token_ids(&mut last["choices"][0]);
        send(vec![last], tokens).await?;
        Ok(tokens)
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
