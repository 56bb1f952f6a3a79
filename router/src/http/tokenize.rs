//! vLLM's `POST /tokenize` and `POST /detokenize`: the token ids a prompt
//! (a text, or a chat's messages with its reasoning fields, rendered as a
//! chat request would be) becomes, and the text of token ids (control
//! tokens included, so a prompt reads back whole).

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::api::{ChatInput, from_value, parse};
use super::error::ApiError;
use super::generate::{chat_prompt, check_model, encode};
use super::{AppState, Body, authorized, json_body};

#[derive(Debug, Deserialize)]
struct TextInput {
    prompt: String,
}

#[derive(Debug, Deserialize)]
struct DetokenizeRequest {
    tokens: Vec<u32>,
}

pub async fn tokenize(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let answer = (|| {
        authorized(&state, &headers)?;
        let request: Value = parse(&json_body(&headers, body)?)?;
        check_optional_model(&state, &request)?;
        let tokens = if request.get("messages").is_some() {
            chat_prompt(&state, &from_value::<ChatInput>(request)?)?.ids
        } else {
            encode(&state, &from_value::<TextInput>(request)?.prompt)?
        };
        Ok(json!({"count": tokens.len(), "max_model_len": state.max_context, "tokens": tokens}))
    })();
    reply(answer)
}

pub async fn detokenize(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let answer = (|| {
        authorized(&state, &headers)?;
        let request: Value = parse(&json_body(&headers, body)?)?;
        check_optional_model(&state, &request)?;
        let request: DetokenizeRequest = serde_json::from_value(request)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}"), Some("tokens")))?;
        if let Some(bad) = request.tokens.iter().find(|&&t| t as usize >= state.vocab_size) {
            return Err(ApiError::bad_request(
                format!("token id {bad} is outside the vocabulary (size {})", state.vocab_size),
                Some("tokens"),
            ));
        }
        let text = state
            .tokenizer
            .decode_all(&request.tokens)
            .map_err(|e| ApiError::bad_request(format!("cannot detokenize: {e}"), Some("tokens")))?;
        Ok(json!({"prompt": text}))
    })();
    reply(answer)
}

/// `model` is optional here, as in vLLM; when given it must be ours.
fn check_optional_model(state: &AppState, request: &Value) -> Result<(), ApiError> {
    match request.get("model") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(m)) => check_model(state, m),
        Some(_) => Err(ApiError::bad_request("model must be a string", Some("model"))),
    }
}

fn reply(answer: Result<Value, ApiError>) -> Response {
    match answer {
        Ok(body) => axum::Json(body).into_response(),
        Err(e) => e.into_response(),
    }
}
