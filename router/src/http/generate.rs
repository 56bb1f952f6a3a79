//! The two generation endpoints: tokenize, submit to the engine, then answer
//! whole or as server-sent events ending in `data: [DONE]`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use super::api::{ChatInput, ChatRequest, CompletionRequest, Params, PromptInput, parse};
use super::error::ApiError;
use super::text::{Delta, Deltas, Detokenizer};
use super::{AppState, Body, authorized, json_body};
use crate::chat::{Message, Reasoning, content_spans};
use crate::engine::{Event, FinishReason, Request, SubmitError};
use crate::metrics;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat { thinking: bool },
}

impl Kind {
    fn endpoint(self) -> &'static str {
        match self {
            Kind::Completion => "completions",
            Kind::Chat { .. } => "chat_completions",
        }
    }
}

pub async fn completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let prepared = (|| {
        authorized(&state, &headers)?;
        let request: CompletionRequest = parse(&json_body(&headers, body)?)?;
        check_model(&state, &request.common.model)?;
        let params = request.common.params()?;
        let prompt = match request.prompt {
            PromptInput::Text(t) => encode(&state, &t)?,
            PromptInput::Texts(mut v) if v.len() == 1 => encode(&state, &v.remove(0))?,
            PromptInput::Texts(_) => return Err(ApiError::bad_request("send one prompt per request", Some("prompt"))),
            PromptInput::Tokens(ids) => ids,
        };
        Ok((prompt, params))
    })();
    respond(state, prepared, Kind::Completion).await
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let prepared = (|| {
        authorized(&state, &headers)?;
        let request: ChatRequest = parse(&json_body(&headers, body)?)?;
        check_model(&state, &request.common.model)?;
        let params = request.common.params()?;
        let (prompt, reasoning) = chat_prompt(&state, &request.input)?;
        Ok((prompt, params, reasoning.thinking()))
    })();
    match prepared {
        Ok((prompt, params, thinking)) => respond(state, Ok((prompt, params)), Kind::Chat { thinking }).await,
        Err(e) => respond(state, Err(e), Kind::Chat { thinking: false }).await,
    }
}

/// The token ids of a chat's prompt and its reasoning mode.
pub(super) fn chat_prompt(state: &AppState, input: &ChatInput) -> Result<(Vec<u32>, Reasoning), ApiError> {
    let kwargs = input.chat_template_kwargs.clone().unwrap_or(Value::Null);
    let effort = input.reasoning_effort.as_deref().or_else(|| kwargs.get("reasoning_effort").and_then(Value::as_str));
    let reasoning = match (effort, kwargs.get("thinking").and_then(Value::as_bool)) {
        (Some(e), _) => Reasoning::parse(e).ok_or_else(|| {
            ApiError::bad_request(
                format!("reasoning_effort `{e}` is not one of none, high, max"),
                Some("reasoning_effort"),
            )
        })?,
        (None, Some(true)) => Reasoning::High,
        (None, _) => Reasoning::None,
    };
    if input.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty", Some("messages")));
    }
    let messages: Vec<Message> =
        input.messages.iter().enumerate().map(|(i, m)| m.checked(i)).collect::<Result<_, _>>()?;
    let template = state
        .chat_template
        .as_ref()
        .ok_or_else(|| ApiError::bad_request("this model has no chat template; use /v1/completions", None))?;
    let text =
        template.render(&messages, reasoning, &kwargs).map_err(|e| ApiError::bad_request(e, Some("messages")))?;
    Ok((encode_chat(state, &text, &messages)?, reasoning))
}

pub(super) fn check_model(state: &AppState, model: &str) -> Result<(), ApiError> {
    if model == state.model_name { Ok(()) } else { Err(ApiError::model_not_found(model)) }
}

pub(super) fn encode(state: &AppState, text: &str) -> Result<Vec<u32>, ApiError> {
    state.tokenizer.encode(text).map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e}"), None))
}

/// Encodes a rendered chat prompt with every message's content as text: a
/// special token's string inside a message is not the special token.
fn encode_chat(state: &AppState, text: &str, messages: &[Message]) -> Result<Vec<u32>, ApiError> {
    let spans = content_spans(text, messages);
    for (i, (m, span)) in messages.iter().zip(&spans).enumerate() {
        if span.is_none()
            && let Some(special) = state.tokenizer.special_in(&m.content)
        {
            return Err(ApiError::bad_request(
                format!("messages[{i}] contains the special token text `{special}`, which cannot be sent as text here"),
                Some("messages"),
            ));
        }
    }
    let spans: Vec<_> = spans.into_iter().flatten().collect();
    state
        .tokenizer
        .encode_protected(text, &spans)
        .map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e}"), None))
}

/// Everything after parsing: limits, admission, then the answer.
async fn respond(state: Arc<AppState>, prepared: Result<(Vec<u32>, Params), ApiError>, kind: Kind) -> Response {
    let endpoint = kind.endpoint();
    let outcome = |o: &str| metrics::REQUESTS.with_label_values(&[endpoint, o]).inc();
    let (prompt, params) = match prepared.and_then(|(prompt, params)| admit(&state, prompt, params)) {
        Ok(p) => p,
        Err(e) => {
            outcome(if e.status.is_server_error() { "server_error" } else { "client_error" });
            return e.into_response();
        }
    };
    let max_tokens = params.max_tokens.unwrap_or(0);
    let mut run = Run::new(state, kind, prompt.len(), params);
    let span = tracing::info_span!("request", request_id = %run.id, endpoint, prompt_tokens = prompt.len());
    // The last prompt token always runs: its logits give the first token.
    let restored = match &run.state.kvcache {
        Some(cache) => cache.lookup(&prompt[..prompt.len() - 1]).instrument(span.clone()).await,
        None => None,
    };
    run.cached_tokens = restored.as_ref().map_or(0, |s| s.position);
    let (tx, rx) = mpsc::unbounded_channel();
    let request = Request {
        prompt: prompt.clone(),
        max_tokens,
        sampling: run.params.sampling.clone(),
        stop_tokens: if run.params.ignore_eos { Vec::new() } else { run.state.eos_token_ids.clone() },
        events: tx,
        span: span.clone(),
        restored,
    };
    if let Err(e) = run.state.engine.submit(request) {
        outcome("server_error");
        return match e {
            SubmitError::QueueFull => ApiError::overloaded(),
            SubmitError::Stopped => ApiError::unavailable("the engine has stopped"),
        }
        .into_response();
    }
    if run.params.stream {
        let (events_tx, events_rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
        tokio::spawn(run.stream(rx, events_tx).instrument(span));
        Sse::new(ReceiverStream::new(events_rx)).into_response()
    } else {
        run.whole(rx).instrument(span).await
    }
}

/// Checks the context limit and fills in the default `max_tokens`.
fn admit(state: &AppState, prompt: Vec<u32>, mut params: Params) -> Result<(Vec<u32>, Params), ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty", Some("prompt")));
    }
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= state.vocab_size) {
        return Err(ApiError::bad_request(format!("token id {bad} is outside the vocabulary"), Some("prompt")));
    }
    if prompt.len() > state.max_prompt {
        return Err(ApiError::context_length(format!(
            "the prompt has {} tokens; this server takes at most {} (--max-prompt-tokens)",
            prompt.len(),
            state.max_prompt
        )));
    }
    let room = state.max_context.saturating_sub(prompt.len());
    if room == 0 {
        return Err(ApiError::context_length(format!(
            "the prompt has {} tokens; this model's context is {}",
            prompt.len(),
            state.max_context
        )));
    }
    let max_tokens = params.max_tokens.unwrap_or(state.default_max_tokens.min(room));
    if max_tokens > room {
        return Err(ApiError::context_length(format!(
            "{} prompt tokens plus max_tokens {max_tokens} exceed this model's context of {} tokens",
            prompt.len(),
            state.max_context
        )));
    }
    params.max_tokens = Some(max_tokens);
    Ok((prompt, params))
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// One request being answered.
struct Run {
    state: Arc<AppState>,
    kind: Kind,
    id: String,
    created: u64,
    prompt_tokens: usize,
    /// Prompt tokens restored from the KV-cache rather than computed.
    cached_tokens: usize,
    params: Params,
    started: Instant,
}

impl Run {
    fn new(state: Arc<AppState>, kind: Kind, prompt_tokens: usize, params: Params) -> Self {
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let prefix = if kind == Kind::Completion { "cmpl" } else { "chatcmpl" };
        let id = format!("{prefix}-{created:x}{:06x}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
        Run { state, kind, id, created, prompt_tokens, cached_tokens: 0, params, started: Instant::now() }
    }

    fn thinking(&self) -> bool {
        matches!(self.kind, Kind::Chat { thinking: true })
    }

    fn usage(&self, completion: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        })
    }

    fn finish_reason(reason: Option<FinishReason>, stopped: bool) -> &'static str {
        match (stopped, reason) {
            (true, _) | (false, Some(FinishReason::Stop)) => "stop",
            _ => "length",
        }
    }

    /// Collects the whole answer.
    async fn whole(self, mut rx: mpsc::UnboundedReceiver<Event>) -> Response {
        // Dropped unset when the client goes away before the answer.
        let mut outcome = Outcome::new(self.kind.endpoint());
        let mut text = Detokenizer::new(&self.state.tokenizer);
        let mut deltas = Deltas::new(self.thinking(), self.params.stop.clone());
        let mut answer = Delta::default();
        let mut last = Instant::now();
        let reason = loop {
            match rx.recv().await {
                Some(Event::Token(t)) => {
                    observe_token(&self, text.ids().is_empty(), &mut last);
                    let delta = deltas.next(text.push(t), false);
                    answer.reasoning.push_str(&delta.reasoning);
                    answer.content.push_str(&delta.content);
                    if delta.stopped {
                        answer.stopped = true;
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
            let tail = deltas.next(text.finish(), true);
            answer.reasoning.push_str(&tail.reasoning);
            answer.content.push_str(&tail.content);
            answer.stopped = tail.stopped;
        }
        let delta = answer;
        let finish = Self::finish_reason(reason, delta.stopped);
        outcome.set("ok");
        let (object, choice) = match self.kind {
            Kind::Completion => (
                "text_completion",
                json!({"index": 0, "text": delta.content, "finish_reason": finish, "logprobs": null}),
            ),
            Kind::Chat { thinking } => {
                let mut message = json!({"role": "assistant", "content": delta.content});
                if thinking {
                    message["reasoning_content"] = json!(delta.reasoning);
                }
                ("chat.completion", json!({"index": 0, "message": message, "finish_reason": finish}))
            }
        };
        axum::Json(json!({
            "id": self.id, "object": object, "created": self.created, "model": self.state.model_name,
            "choices": [choice], "usage": self.usage(tokens),
        }))
        .into_response()
    }

    fn chunk(&self, delta: Option<&Delta>, finish: Option<&str>, role: bool) -> Value {
        let (object, choice) = match self.kind {
            Kind::Completion => {
                let text = delta.map_or("", |d| d.content.as_str());
                ("text_completion", json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": null}))
            }
            Kind::Chat { .. } => {
                let mut d = serde_json::Map::new();
                if role {
                    d.insert("role".into(), json!("assistant"));
                }
                if let Some(delta) = delta {
                    if !delta.reasoning.is_empty() {
                        d.insert("reasoning_content".into(), json!(delta.reasoning));
                    }
                    if !delta.content.is_empty() {
                        d.insert("content".into(), json!(delta.content));
                    }
                }
                ("chat.completion.chunk", json!({"index": 0, "delta": d, "finish_reason": finish}))
            }
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.state.model_name, "choices": [choice]})
    }

    /// Streams the answer as SSE; stops (and so cancels the sequence) as soon
    /// as the client goes away.
    async fn stream(self, mut rx: mpsc::UnboundedReceiver<Event>, out: mpsc::Sender<Result<SseEvent, Infallible>>) {
        // Left unset (counted as cancelled) on every early return below: the
        // client went away.
        let mut outcome = Outcome::new(self.kind.endpoint());
        let send = |v: Value| {
            let out = out.clone();
            async move { out.send(Ok(SseEvent::default().data(v.to_string()))).await.is_ok() }
        };
        if matches!(self.kind, Kind::Chat { .. }) && !send(self.chunk(None, None, true)).await {
            return;
        }
        let mut deltas = Deltas::new(self.thinking(), self.params.stop.clone());
        let mut text = Detokenizer::new(&self.state.tokenizer);
        let mut last = Instant::now();
        let (reason, stopped) = loop {
            match rx.recv().await {
                Some(Event::Token(t)) => {
                    observe_token(&self, text.ids().is_empty(), &mut last);
                    let delta = deltas.next(text.push(t), false);
                    if (!delta.content.is_empty() || !delta.reasoning.is_empty())
                        && !send(self.chunk(Some(&delta), None, false)).await
                    {
                        return;
                    }
                    if delta.stopped {
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
        let tail = deltas.next(text.finish(), true);
        if !stopped && (!tail.content.is_empty() || !tail.reasoning.is_empty()) {
            send(self.chunk(Some(&tail), None, false)).await;
        }
        send(self.chunk(None, Some(Self::finish_reason(reason, stopped || tail.stopped)), false)).await;
        if self.params.include_usage {
            let mut usage = self.chunk(None, None, false);
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
