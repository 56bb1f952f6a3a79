//! The OpenAI-compatible HTTP API of a router.
//!
//! `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream`),
//! `GET /v1/models`, `POST /tokenize` and `/detokenize` (vLLM's), `GET
//! /health` (alive), `GET /ready` (the data plane can serve), `GET
//! /metrics` (Prometheus; unless a port of its own serves it, so an
//! Ingress in front of the API cannot expose it). Bodies are size-limited and parsed by
//! hand so every malformed input gets a 400 in OpenAI's error shape; API keys
//! are checked when configured.

mod answer;
mod api;
mod choice;
mod error;
mod generate;
mod guided;
mod text;
mod tokenize;
mod unsupported;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use myriad_model::text::TextTokenizer;
use tokio::net::TcpListener;

pub use error::ApiError;

use crate::chat::ChatEncoder;
use crate::engine::Engine;

/// What the HTTP layer serves with.
pub struct AppState {
    pub engine: Engine,
    pub tokenizer: Arc<TextTokenizer>,
    /// Grammars for structured outputs and forced tool calls; `None` when
    /// the tokenizer cannot spell its tokens as bytes (such requests get a
    /// 400).
    pub grammars: Option<crate::structured::Grammars>,
    /// Each token's bytes (as the model writes it), for log-probabilities.
    pub token_bytes: Vec<Vec<u8>>,
    /// The `</think>` token, if the vocabulary has one.
    pub think_end: Option<u32>,
    /// How chat requests become prompts.
    pub chat: ChatEncoder,
    /// The name clients use as `model`.
    pub model_name: String,
    /// Accepted bearer tokens; empty means no authentication.
    pub api_keys: Vec<String>,
    /// Longest prompt plus completion, in tokens.
    pub max_context: usize,
    /// Longest prompt, in tokens (below `max_context`).
    pub max_prompt: usize,
    /// Completion length when a request gives no `max_tokens`.
    pub default_max_tokens: usize,
    /// End-of-sequence ids: generation stops there.
    pub eos_token_ids: Vec<u32>,
    /// The model's vocabulary size: token-id prompts must stay below it.
    pub vocab_size: usize,
    /// Whether the data plane can serve (placement loaded, workers reachable).
    pub ready: Box<dyn Fn() -> bool + Send + Sync>,
    /// Whether `/metrics` is served on the API's port.
    pub metrics_here: bool,
}

impl AppState {
    /// A token's text (lossy where it holds part of a character) and bytes.
    pub fn token_piece(&self, id: u32) -> (String, Vec<u8>) {
        let bytes = self.token_bytes.get(id as usize).cloned().unwrap_or_default();
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    }
}

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 4 << 20;

pub fn router(state: Arc<AppState>) -> Router {
    let metrics_here = state.metrics_here;
    let api = Router::new()
        .route("/v1/completions", post(generate::completions))
        .route("/v1/chat/completions", post(generate::chat_completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready));
    let api = if metrics_here { api.route("/metrics", get(|| async { crate::metrics::render() })) } else { api };
    api.fallback(|| async {
        ApiError::not_found(
            "no such endpoint; see /v1/models, /v1/completions, /v1/chat/completions, /tokenize, /detokenize",
        )
    })
    .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
    .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
    .layer(axum::middleware::from_fn(refuse_declared_oversize))
    .with_state(state)
}

/// Most bytes of a refused body read and dropped before answering (see
/// [`refuse_declared_oversize`]).
const DRAIN_BYTES: u64 = 64 << 20;

/// A body whose `Content-Length` is over [`MAX_BODY_BYTES`] is refused
/// before it is read. A client that waits for `Expect: 100-continue` gets
/// the 413 without sending it. Most others (urllib, requests) send the whole
/// body before reading any reply: if the connection closed under them they
/// would see a reset instead of the 413, so a body of up to
/// [`DRAIN_BYTES`] is read and dropped first.
async fn refuse_declared_oversize(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let length = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let Some(length) = length.filter(|&n| n > MAX_BODY_BYTES as u64) else {
        return next.run(request).await;
    };
    let waits =
        request.headers().get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !waits && length <= DRAIN_BYTES {
        let mut body = request.into_body().into_data_stream();
        while let Some(Ok(_)) = futures::StreamExt::next(&mut body).await {}
    }
    ApiError::too_large(format!("the request body is larger than {} MiB", MAX_BODY_BYTES >> 20)).into_response()
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}

/// A request body as extracted, or why it could not be (too large, cut off).
type Body = Result<Bytes, BytesRejection>;

/// The body of a JSON request: refused unless it says it is JSON, and in
/// OpenAI's error shape when it is too large or could not be read.
fn json_body(headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let kind = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = kind.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        let given = if kind.is_empty() { "none".to_string() } else { format!("`{kind}`") };
        return Err(ApiError::unsupported_media_type(format!(
            "send the body as JSON with `Content-Type: application/json` (the request had {given})"
        )));
    }
    body.map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(format!("the request body is larger than {} MiB", MAX_BODY_BYTES >> 20))
        } else {
            ApiError::bad_request(format!("cannot read the request body: {}", rejection.body_text()), None)
        }
    })
}

/// The token of an `Authorization: Bearer TOKEN` header; the scheme's
/// case does not matter (RFC 9110 §11.1).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim_start())
}

fn authorized(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    if state.api_keys.is_empty() {
        return Ok(());
    }
    let given = bearer(headers).unwrap_or("");
    // Compare every key in full so timing does not reveal a prefix.
    let ok = state.api_keys.iter().fold(false, |found, key| found | constant_time_eq(key.as_bytes(), given.as_bytes()));
    if ok { Ok(()) } else { Err(ApiError::unauthorized()) }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorized(&state, &headers) {
        return e.into_response();
    }
    axum::Json(serde_json::json!({
        "object": "list",
        // `max_model_len` as vLLM reports it: the context a request may fill.
        "data": [{
            "id": state.model_name, "object": "model", "created": 0, "owned_by": "myriad",
            "max_model_len": state.max_context,
        }],
    }))
    .into_response()
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if (state.ready)() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}
