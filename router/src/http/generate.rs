//! The two generation endpoints: the prompt (a chat through its encoder),
//! admission against the context limits, then submission to the engine;
//! [`super::answer`] answers.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use super::answer::{Kind, Run, ShownPrompt};
use super::api::{ChatInput, ChatRequest, Common, CompletionRequest, Params, PromptInput, ToolUse, parse};
use super::error::ApiError;
use super::{AppState, Body, authorized, guided, json_body};
use crate::budget::ThinkingBudget;
use crate::chat::v4::{self, Ending, Prompt};
use crate::chat::{ChatEncoder, Message, Reasoning, content_spans, template_messages};
use crate::engine::{Constraint, Request, SubmitError};
use crate::metrics;
use crate::structured;

pub async fn completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let prepared = (|| {
        authorized(&state, &headers)?;
        let request: CompletionRequest = parse(&json_body(&headers, body)?)?;
        check_model(&state, &request.common.model)?;
        let params = request.common.params(false)?;
        // Each prompt's ids, and its text as the client wrote it (if it did).
        let prompts: Vec<(Vec<u32>, Option<String>)> = match request.prompt {
            PromptInput::Text(t) => vec![(encode(&state, &t)?, Some(t))],
            PromptInput::Texts(v) => {
                v.into_iter().map(|t| Ok((encode(&state, &t)?, Some(t)))).collect::<Result<_, _>>()?
            }
            PromptInput::Tokens(ids) => vec![(ids, None)],
            PromptInput::TokenLists(v) => v.into_iter().map(|ids| (ids, None)).collect(),
        };
        if prompts.is_empty() || prompts.len() > MAX_PROMPTS {
            return Err(ApiError::bad_request(format!("send 1 to {MAX_PROMPTS} prompts"), Some("prompt")));
        }
        let sequences = prompts.len() * params.n;
        if sequences > MAX_SEQUENCES {
            return Err(ApiError::bad_request(
                format!(
                    "{} prompts x n {} is {sequences} sequences; one request runs at most {MAX_SEQUENCES}",
                    prompts.len(),
                    params.n
                ),
                Some("n"),
            ));
        }
        let constraints = constrain(&state, sequences, &request.common, None, false)?;
        let prompts = prompts.into_iter().map(|(ids, text)| (ids, params.echo.then_some(text))).collect();
        Ok(Prepared { prompts, params, constraints })
    })();
    respond(state, prepared, Kind::Completion).await
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let prepared = (|| {
        authorized(&state, &headers)?;
        let request: ChatRequest = parse(&json_body(&headers, body)?)?;
        check_model(&state, &request.common.model)?;
        let params = request.common.params(true)?;
        let ChatPrompt { ids: prompt, thinking, tools } = chat_prompt(&state, &request.input)?;
        let (tools, forced_tools) = request.input.tool_use(tools)?;
        let forced = match tools {
            ToolUse::Forced { parallel } => Some((&forced_tools[..], parallel)),
            _ => None,
        };
        let mut constraints = constrain(&state, params.n, &request.common, forced, thinking)?;
        if let (true, Some(budget)) = (thinking, params.thinking_budget) {
            let think_end = state.think_end.ok_or_else(|| {
                ApiError::bad_request(
                    "this model has no `</think>` token to end thinking with",
                    Some("thinking_token_budget"),
                )
            })?;
            let vocab = state.vocab_size;
            for c in &mut constraints {
                *c = Some(Box::new(ThinkingBudget::new(budget, think_end, vocab, c.take())));
            }
        }
        Ok((Prepared { prompts: vec![(prompt, None)], params, constraints }, Kind::Chat { thinking, tools }))
    })();
    match prepared {
        Ok((prepared, kind)) => respond(state, Ok(prepared), kind).await,
        Err(e) => respond(state, Err(e), Kind::Chat { thinking: false, tools: ToolUse::Off }).await,
    }
}

/// Most prompts one completion request may send.
const MAX_PROMPTS: usize = 64;

/// Most sequences (prompts × `n`) one request may run.
const MAX_SEQUENCES: usize = 256;

/// What a generation request asks for, checked.
struct Prepared {
    /// Each prompt (a chat has one), and `Some` when the completion echoes
    /// it: the prompt's text as the client wrote it, if it did.
    prompts: Vec<(Vec<u32>, Option<Option<String>>)>,
    params: Params,
    /// One per choice: `n` for each prompt in turn.
    constraints: Vec<Option<Box<dyn Constraint>>>,
}

/// The grammar each of a request's `n` choices must follow, if any: what
/// `common` asks for ([`guided`]), or a forced call of `tools` (one or,
/// `parallel`, several).
fn constrain(
    state: &AppState,
    n: usize,
    common: &Common,
    forced: Option<(&[Value], bool)>,
    thinking: bool,
) -> Result<Vec<Option<Box<dyn Constraint>>>, ApiError> {
    let bad = |field: &'static str| move |e: String| ApiError::bad_request(format!("{field}: {e}"), Some(field));
    let asked = guided::grammar(common)?;
    let shaped = asked.as_ref().map(|(_, field)| *field).or(forced.map(|_| "tool_choice"));
    if let (Some(field), Some(_)) = (shaped, &common.allowed_token_ids) {
        return Err(ApiError::bad_request(
            format!("allowed_token_ids cannot be combined with {field}: the grammar may need other tokens"),
            Some("allowed_token_ids"),
        ));
    }
    let (grammar, field) = match (asked, forced) {
        (Some((_, field)), Some(_)) => {
            return Err(ApiError::bad_request(
                format!("{field} cannot be combined with a required or named tool_choice"),
                Some(field),
            ));
        }
        (Some(asked), None) => asked,
        (None, Some((tools, parallel))) => (structured::tool_calls(tools, parallel).map_err(bad("tools"))?, "tools"),
        (None, None) => return Ok((0..n).map(|_| None).collect()),
    };
    let grammars = state.grammars.as_ref().ok_or_else(|| {
        ApiError::bad_request(
            format!("{field} needs constrained decoding, which this model's tokenizer does not support"),
            Some(field),
        )
    })?;
    let all = grammars.constraints(grammar, thinking, n).map_err(bad(field))?;
    Ok(all.into_iter().map(Some).collect())
}

/// A chat's prompt: its token ids, whether the answer starts in reasoning,
/// and its tools (checked).
pub(super) fn chat_prompt<'a>(state: &AppState, input: &'a ChatInput) -> Result<ChatPrompt<'a>, ApiError> {
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
    let tools = input.tools()?;
    let ending = input.ending()?;
    let bad = |e: String| ApiError::bad_request(e, Some("messages"));
    let prompt = match &state.chat {
        ChatEncoder::V4 => v4::encode_ending(&input.messages, tools, reasoning, ending).map_err(bad)?,
        ChatEncoder::Template(_) if ending == Ending::Continue => {
            return Err(ApiError::bad_request(
                "continue_final_message needs the V4 chat encoding; this server renders chats with a Jinja template",
                Some("continue_final_message"),
            ));
        }
        ChatEncoder::Template(template) => {
            if !tools.is_empty() {
                return Err(ApiError::bad_request(
                    "tools need the V4 chat encoding; this server renders chats with a Jinja template",
                    Some("tools"),
                ));
            }
            let messages = template_messages(&input.messages).map_err(bad)?;
            let text = template.render(&messages, reasoning, ending == Ending::Answer, &kwargs).map_err(bad)?;
            template_prompt(state, text, &messages)?
        }
    };
    let ids = state
        .tokenizer
        .encode_protected(&prompt.text, &prompt.client)
        .map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e}"), None))?;
    // The answer starts in the reasoning only when the prompt opens it.
    Ok(ChatPrompt { ids, thinking: reasoning.thinking() && ending == Ending::Answer, tools })
}

/// A chat's prompt as it runs.
pub(super) struct ChatPrompt<'a> {
    pub(super) ids: Vec<u32>,
    /// The answer starts with reasoning (up to `</think>`).
    pub(super) thinking: bool,
    /// The request's tools, checked.
    pub(super) tools: &'a [Value],
}

pub(super) fn check_model(state: &AppState, model: &str) -> Result<(), ApiError> {
    if model == state.model_name { Ok(()) } else { Err(ApiError::model_not_found(model)) }
}

pub(super) fn encode(state: &AppState, text: &str) -> Result<Vec<u32>, ApiError> {
    state.tokenizer.encode(text).map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e}"), None))
}

/// A rendered template's prompt with every message's content marked as
/// client text (so an added token's string inside a message is not the
/// token); a content the template changed cannot be marked, so it must
/// hold no such string.
fn template_prompt(state: &AppState, text: String, messages: &[Message]) -> Result<Prompt, ApiError> {
    let spans = content_spans(&text, messages);
    for (i, (m, span)) in messages.iter().zip(&spans).enumerate() {
        if span.is_none()
            && let Some(added) = state.tokenizer.added_in(&m.content)
        {
            return Err(ApiError::bad_request(
                format!("messages[{i}] contains the special token text `{added}`, which cannot be sent as text here"),
                Some("messages"),
            ));
        }
    }
    Ok(Prompt { text, client: spans.into_iter().flatten().collect() })
}

/// Everything after parsing: limits, admission, then the answer.
async fn respond(state: Arc<AppState>, prepared: Result<Prepared, ApiError>, kind: Kind) -> Response {
    let endpoint = kind.endpoint();
    let outcome = |o: &str| metrics::REQUESTS.with_label_values(&[endpoint, o]).inc();
    let admitted = prepared.and_then(|mut p| {
        p.params.logits.bad_words = bad_words(&state, &p.params.bad_words)?;
        check_tokens(&state, &p.params)?;
        let several = p.prompts.len() > 1;
        let prompts = (p.prompts.into_iter().enumerate())
            .map(|(i, (prompt, echo))| match admit(&state, prompt, &p.params) {
                Ok((prompt, max_tokens)) => Ok((prompt, max_tokens, echo)),
                Err(e) if several => Err(ApiError { message: format!("prompt[{i}]: {}", e.message), ..e }),
                Err(e) => Err(e),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((prompts, p.params, p.constraints))
    });
    let (prompts, params, constraints) = match admitted {
        Ok(p) => p,
        Err(e) => {
            outcome(if e.status.is_server_error() { "server_error" } else { "client_error" });
            return e.into_response();
        }
    };
    let shown = prompts
        .iter()
        .map(|(prompt, _, echo)| {
            let echo = echo.clone().map(|text| {
                // A truncated prompt is no longer the text sent: its ids tell.
                let sent = text.filter(|_| params.truncate_prompt.is_none());
                sent.unwrap_or_else(|| state.tokenizer.decode(prompt).unwrap_or_default())
            });
            let shown = echo.is_some() || params.prompt_logprobs.is_some() || params.return_token_ids;
            shown.then(|| ShownPrompt { ids: prompt.clone(), echo })
        })
        .collect();
    let prompt_tokens = prompts.iter().map(|(p, _, _)| p.len()).sum();
    let mut run = Run::new(state, kind, prompt_tokens, params, shown);
    let span = tracing::info_span!("request", request_id = %run.id, endpoint, prompt_tokens);
    let mut stop_tokens = if run.params.ignore_eos { Vec::new() } else { run.state.eos_token_ids.clone() };
    stop_tokens.extend(&run.params.stop_token_ids);
    let mut receivers = Vec::with_capacity(constraints.len());
    let mut constraints = constraints.into_iter();
    for (prompt, max_tokens, _) in &prompts {
        let mut choices = Vec::with_capacity(run.params.n);
        for (i, constraint) in constraints.by_ref().take(run.params.n).enumerate() {
            let (tx, rx) = mpsc::unbounded_channel();
            let mut sampling = run.params.sampling.clone();
            sampling.seed = sampling.seed.wrapping_add(i as u64);
            choices.push(Request {
                prompt: prompt.clone(),
                max_tokens: *max_tokens,
                sampling,
                stop_tokens: stop_tokens.clone(),
                events: tx,
                span: span.clone(),
                constraint,
                logits: run.params.logits.clone(),
                cache_salt: run.params.cache_salt.clone(),
            });
            receivers.push(rx);
        }
        // Choices already queued stop when their receivers drop with an early return.
        match run.state.engine.submit(choices).instrument(span.clone()).await {
            Ok(cached) => run.cached_tokens += cached,
            Err(e) => {
                outcome("server_error");
                return match e {
                    SubmitError::QueueFull => ApiError::overloaded(),
                    SubmitError::Stopped => ApiError::unavailable("the engine has stopped"),
                }
                .into_response();
            }
        }
    }
    if run.params.stream {
        let (events_tx, events_rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
        tokio::spawn(run.stream(receivers, events_tx).instrument(span));
        Sse::new(ReceiverStream::new(events_rx)).into_response()
    } else {
        run.whole(receivers).instrument(span).await
    }
}

/// vLLM's `bad_words` as token sequences: each word as written and after
/// a space (as it appears inside text), each sequence once.
fn bad_words(state: &AppState, words: &[String]) -> Result<Vec<Vec<u32>>, ApiError> {
    let bad = |what: String| ApiError::bad_request(what, Some("bad_words"));
    let mut sequences: Vec<Vec<u32>> = Vec::new();
    for word in words {
        if word.trim().is_empty() {
            return Err(bad("bad_words must be words, not empty or blank strings".into()));
        }
        for text in [word.clone(), format!(" {word}")] {
            let ids = state.tokenizer.encode(&text).map_err(|e| bad(format!("cannot tokenize `{word}`: {e}")))?;
            if !ids.is_empty() && !sequences.contains(&ids) {
                sequences.push(ids);
            }
        }
    }
    Ok(sequences)
}

/// Checks what the request's parameters name against the vocabulary.
fn check_tokens(state: &AppState, params: &Params) -> Result<(), ApiError> {
    let outside = |ids: Vec<u32>| ids.into_iter().find(|&t| t as usize >= state.vocab_size);
    if let Some(bad) = outside(params.logits.bias.iter().map(|b| b.0).collect()) {
        return Err(ApiError::bad_request(
            format!("logit_bias token {bad} is outside the vocabulary"),
            Some("logit_bias"),
        ));
    }
    if let Some(allowed) = &params.logits.allowed {
        if let Some(bad) = outside(allowed.clone()) {
            return Err(ApiError::bad_request(
                format!("allowed token {bad} is outside the vocabulary"),
                Some("allowed_token_ids"),
            ));
        }
        let stops = || state.eos_token_ids.iter().chain(&params.stop_token_ids);
        if params.logits.min_tokens > 0 && allowed.iter().all(|t| stops().any(|s| s == t)) {
            return Err(ApiError::bad_request(
                "every allowed token ends the answer, which min_tokens forbids",
                Some("allowed_token_ids"),
            ));
        }
    }
    if let Some(bad) = outside(params.stop_token_ids.clone()) {
        return Err(ApiError::bad_request(
            format!("stop token {bad} is outside the vocabulary"),
            Some("stop_token_ids"),
        ));
    }
    Ok(())
}

/// Checks one prompt against the context limit (truncated first when
/// asked): the prompt that runs and its `max_tokens` (the default filled in).
fn admit(state: &AppState, mut prompt: Vec<u32>, params: &Params) -> Result<(Vec<u32>, usize), ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty", Some("prompt")));
    }
    if let Some(keep) = params.truncate_prompt {
        // -1: what the context takes with room for one token.
        let keep = keep.min(state.max_prompt).min(state.max_context.saturating_sub(1)).max(1);
        prompt.drain(..prompt.len().saturating_sub(keep));
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
    Ok((prompt, max_tokens))
}
