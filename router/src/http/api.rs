//! OpenAI request bodies, validated into [`Params`]. Fields nobody has
//! defined are ignored (clients send extensions of their own); a known
//! OpenAI or vLLM field this server does not support is a 400 naming it
//! unless it holds its neutral value ([`super::unsupported`]); known
//! fields of the wrong type are a 400.

use myriad_model::Sampling;
use serde::Deserialize;

use super::error::ApiError;
use crate::chat::v4::Ending;
use crate::logits::LogitsParams;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    /// Lists of token ids (one prompt each), as evaluation harnesses send them.
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
    /// vLLM's: with `include_usage`, every chunk carries the usage so far.
    pub continuous_usage_stats: Option<bool>,
}

/// Fields shared by both endpoints.
#[derive(Debug, Deserialize)]
pub struct Common {
    pub model: String,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// 0 or -1 (vLLM's "disabled"): every token.
    pub top_k: Option<i64>,
    /// vLLM's: drop tokens less likely than this fraction of the most likely.
    pub min_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<StringOrList>,
    pub n: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// vLLM's extension: keep generating past end-of-sequence tokens.
    pub ignore_eos: Option<bool>,
    /// `text`, `json_object` or `json_schema`: enforced by constrained
    /// decoding ([`crate::structured`]). It, vLLM's `guided_*` and its
    /// `structured_outputs` are read by [`super::guided`].
    pub response_format: Option<serde_json::Value>,
    pub guided_json: Option<serde_json::Value>,
    pub guided_regex: Option<serde_json::Value>,
    pub guided_choice: Option<serde_json::Value>,
    pub guided_grammar: Option<serde_json::Value>,
    pub structured_outputs: Option<serde_json::Value>,
    /// Chat: `true`/`false`; completions: how many alternatives (0–20).
    pub logprobs: Option<serde_json::Value>,
    /// Chat: alternatives per token (0–20), with `logprobs: true`.
    pub top_logprobs: Option<u32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// vLLM's: above 1 discourages tokens of the prompt and the output.
    pub repetition_penalty: Option<f32>,
    /// Token id (as a string, OpenAI's shape) to a bias in [-100, 100].
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    pub min_tokens: Option<u32>,
    /// More token ids that end the answer (with the model's EOS).
    pub stop_token_ids: Option<Vec<u32>>,
    /// vLLM's: log-probability tokens as `token_id:ID` instead of text.
    pub return_tokens_as_token_ids: Option<bool>,
    /// vLLM's: the only tokens that may be sampled.
    pub allowed_token_ids: Option<Vec<u32>>,
    /// vLLM's: words the output may not contain (see [`Params::bad_words`]).
    pub bad_words: Option<Vec<String>>,
    /// vLLM's: the text keeps the stop string it ends at.
    pub include_stop_str_in_output: Option<bool>,
    /// vLLM's: keep the prompt's last this many tokens (-1: as many as the
    /// context takes).
    pub truncate_prompt_tokens: Option<i64>,
    /// vLLM's: the id the answer carries.
    pub request_id: Option<String>,
    /// vLLM's: `false` spells control tokens out in the text.
    pub skip_special_tokens: Option<bool>,
    /// vLLM's: the answer carries the prompt's and the output's token ids.
    pub return_token_ids: Option<bool>,
    /// vLLM's: KV-cache prefixes are shared only between requests of the
    /// same salt.
    pub cache_salt: Option<String>,
    /// vLLM's: most reasoning tokens of a thinking answer (-1: no limit).
    pub thinking_token_budget: Option<i64>,
    /// Completions: the text starts with the prompt (and with `logprobs`,
    /// so do the log-probabilities: the prompt's tokens are scored).
    pub echo: Option<bool>,
    /// vLLM's: each prompt token's log-probability and this many
    /// alternatives, in the answer's `prompt_logprobs`.
    pub prompt_logprobs: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptInput,
    #[serde(flatten)]
    pub common: Common,
}

/// What makes a chat prompt (also what `/tokenize` takes). Messages stay
/// JSON: the encoder checks them, naming the message at fault.
#[derive(Debug, Deserialize)]
pub struct ChatInput {
    pub messages: Vec<serde_json::Value>,
    pub tools: Option<Vec<serde_json::Value>>,
    pub tool_choice: Option<serde_json::Value>,
    pub parallel_tool_calls: Option<bool>,
    pub reasoning_effort: Option<String>,
    pub chat_template_kwargs: Option<serde_json::Value>,
    /// vLLM's: `false` ends the prompt with the last message.
    pub add_generation_prompt: Option<bool>,
    /// vLLM's: the model continues the last message, an assistant's.
    pub continue_final_message: Option<bool>,
}

/// Whether and how the answer may call tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolUse {
    /// No tools, or `tool_choice: "none"`: the answer is text.
    Off,
    /// The model decides; DSML tool-call blocks become `tool_calls`
    /// (only the first when `parallel_tool_calls` is false).
    Auto { parallel: bool },
    /// `required` or a named function: the answer is a tool-call block,
    /// enforced by constrained decoding.
    Forced { parallel: bool },
}
impl ChatInput {
    /// How the prompt ends, from vLLM's `add_generation_prompt` and
    /// `continue_final_message` (which cannot both be true).
    pub fn ending(&self) -> Result<Ending, ApiError> {
        match (self.add_generation_prompt, self.continue_final_message.unwrap_or(false)) {
            (Some(true), true) => Err(ApiError::bad_request(
                "continue_final_message needs add_generation_prompt: false (the model continues the last message)",
                Some("continue_final_message"),
            )),
            (_, true) => Ok(Ending::Continue),
            (Some(false), false) => Ok(Ending::AsIs),
            (_, false) => Ok(Ending::Answer),
        }
    }

    /// The declared tools, each checked to be a function with a name.
    pub fn tools(&self) -> Result<&[serde_json::Value], ApiError> {
        let tools = self.tools.as_deref().unwrap_or_default();
        for (i, tool) in tools.iter().enumerate() {
            let bad = |what: &str| ApiError::bad_request(format!("tools[{i}]: {what}"), Some("tools"));
            if tool.get("type").and_then(|t| t.as_str()) != Some("function") {
                return Err(bad("type must be `function`"));
            }
            let function = tool.get("function").filter(|f| f.is_object()).ok_or_else(|| bad("has no `function`"))?;
            if function.get("name").and_then(|n| n.as_str()).is_none_or(str::is_empty) {
                return Err(bad("function has no `name`"));
            }
            if function.get("parameters").is_some_and(|p| !p.is_object() && !p.is_null()) {
                return Err(bad("function.parameters must be a JSON schema object"));
            }
        }
        Ok(tools)
    }

    /// How the answer may call `tools` (as [`Self::tools`] checked them),
    /// and the tools a forced call may use (all for `required`, the one
    /// named).
    pub fn tool_use(&self, tools: &[serde_json::Value]) -> Result<(ToolUse, Vec<serde_json::Value>), ApiError> {
        let parallel = self.parallel_tool_calls.unwrap_or(true);
        let bad = |what: String| ApiError::bad_request(what, Some("tool_choice"));
        let need_tools = |choice: &str| {
            if tools.is_empty() { Err(bad(format!("tool_choice `{choice}` needs `tools`"))) } else { Ok(()) }
        };
        let choice = self.tool_choice.as_ref().filter(|c| !c.is_null());
        match choice.map(|c| (c.as_str(), c)) {
            None | Some((Some("auto"), _)) if tools.is_empty() => Ok((ToolUse::Off, Vec::new())),
            None | Some((Some("auto"), _)) => Ok((ToolUse::Auto { parallel }, Vec::new())),
            Some((Some("none"), _)) => Ok((ToolUse::Off, Vec::new())),
            Some((Some("required"), _)) => {
                need_tools("required")?;
                Ok((ToolUse::Forced { parallel }, tools.to_vec()))
            }
            Some((Some(other), _)) => Err(bad(format!("tool_choice `{other}` is not one of none, auto, required"))),
            Some((None, named)) => {
                let name = named
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(|n| n.as_str())
                    .filter(|_| named.get("type").and_then(|t| t.as_str()) == Some("function"))
                    .ok_or_else(|| {
                        bad("tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": …}}".into())
                    })?;
                need_tools("function")?;
                let tool = tools
                    .iter()
                    .find(|t| t["function"]["name"].as_str() == Some(name))
                    .ok_or_else(|| bad(format!("tool_choice names `{name}`, which is not in `tools`")))?;
                // A named function is called once.
                Ok((ToolUse::Forced { parallel: false }, vec![tool.clone()]))
            }
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub input: ChatInput,
    #[serde(flatten)]
    pub common: Common,
}

/// Most choices one request may ask for (`n`).
pub const MAX_CHOICES: u32 = 16;
/// Most alternatives per token (`top_logprobs`).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// What the generation needs, checked.
#[derive(Debug, Clone)]
pub struct Params {
    pub max_tokens: Option<usize>,
    pub sampling: Sampling,
    /// Choices; choice `i` samples with seed `sampling.seed + i`, so it is
    /// the same answer a request with that seed and `n = 1` gets.
    pub n: usize,
    pub logits: LogitsParams,
    pub stop_token_ids: Vec<u32>,
    pub tokens_as_ids: bool,
    pub stop: Vec<String>,
    /// The text ends after the stop string, not before it.
    pub include_stop: bool,
    /// Keep only the prompt's last this many tokens (vLLM's
    /// `truncate_prompt_tokens`; `usize::MAX`: as many as the context takes).
    pub truncate_prompt: Option<usize>,
    /// The response's id: `cmpl-`/`chatcmpl-` then this (vLLM's `request_id`).
    pub request_id: Option<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Every streamed chunk carries its choice's usage so far.
    pub continuous_usage: bool,
    pub ignore_eos: bool,
    /// Completions: the answer starts with the prompt.
    pub echo: bool,
    /// The text leaves control tokens out (vLLM's default).
    pub skip_special_tokens: bool,
    /// The answer carries the prompt's and the output's token ids.
    pub return_token_ids: bool,
    /// What KV-cache prefixes the request shares (`None`: unsalted ones).
    pub cache_salt: Option<std::sync::Arc<str>>,
    /// Most reasoning tokens of a thinking chat answer.
    pub thinking_budget: Option<usize>,
    /// vLLM's `prompt_logprobs`: alternatives per prompt token.
    pub prompt_logprobs: Option<usize>,
    /// vLLM's `bad_words`, to tokenize into `logits.bad_words` (as written
    /// and after a space, as they appear inside text).
    pub bad_words: Vec<String>,
}

/// Parses a JSON body into `T`, with OpenAI-shaped 400s; a request that
/// asks for something this server does not do is refused, not half-served.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(invalid_body)?;
    super::unsupported::refuse(&value)?;
    from_value(value)
}

/// An already parsed (and checked) body as `T`.
pub fn from_value<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_json::from_value(value).map_err(invalid_body)
}

fn invalid_body(e: serde_json::Error) -> ApiError {
    ApiError::bad_request(format!("invalid request body: {e}"), None)
}

impl Common {
    /// The checked parameters; `chat` for the chat endpoint, whose
    /// `logprobs` is a switch (with `top_logprobs`) where completions' is a
    /// count.
    pub fn params(&self, chat: bool) -> Result<Params, ApiError> {
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_CHOICES).contains(&n) {
            return Err(ApiError::bad_request(format!("n must be between 1 and {MAX_CHOICES}"), Some("n")));
        }
        let logits = self.logits(chat)?;
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad_request(
                format!("temperature {temperature} is not in [0, 2]"),
                Some("temperature"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad_request(format!("top_p {top_p} is not in (0, 1]"), Some("top_p")));
        }
        let top_k = match self.top_k {
            None | Some(0 | -1) => None,
            Some(k) if k > 0 => Some(usize::try_from(k).unwrap_or(usize::MAX)),
            Some(k) => {
                return Err(ApiError::bad_request(
                    format!("top_k {k} is not -1, 0 (every token) or above"),
                    Some("top_k"),
                ));
            }
        };
        let min_p = self.min_p.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&min_p) {
            return Err(ApiError::bad_request(format!("min_p {min_p} is not in [0, 1]"), Some("min_p")));
        }
        let options = self.stream_options.as_ref();
        let include_usage = options.and_then(|o| o.include_usage).unwrap_or(false);
        let continuous_usage = options.and_then(|o| o.continuous_usage_stats).unwrap_or(false);
        if continuous_usage && !include_usage {
            return Err(ApiError::bad_request(
                "stream_options.continuous_usage_stats needs include_usage: true",
                Some("stream_options"),
            ));
        }
        let echo = self.echo.unwrap_or(false);
        if chat && echo {
            return Err(ApiError::bad_request(
                "`echo` is not supported for chat completions; remove it or send false",
                Some("echo"),
            ));
        }
        let max_tokens = self.max_completion_tokens.or(self.max_tokens);
        if max_tokens == Some(0) && !echo {
            return Err(ApiError::bad_request("max_tokens must be at least 1 (0 only with echo)", Some("max_tokens")));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StringOrList::One(s)) => vec![s.clone()],
            Some(StringOrList::Many(v)) => v.clone(),
        };
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::bad_request("stop takes up to 4 non-empty strings", Some("stop")));
        }
        Ok(Params {
            max_tokens: max_tokens.map(|m| usize::try_from(m).unwrap_or(usize::MAX)),
            sampling: Sampling { temperature, top_p, top_k, min_p, seed: self.seed.unwrap_or_else(rand_seed) },
            n: n as usize,
            logits,
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            tokens_as_ids: self.return_tokens_as_token_ids.unwrap_or(false),
            stop,
            include_stop: self.include_stop_str_in_output.unwrap_or(false),
            truncate_prompt: self.truncate_prompt()?,
            request_id: self.request_id()?,
            stream: self.stream.unwrap_or(false),
            include_usage,
            continuous_usage,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            echo,
            skip_special_tokens: self.skip_special_tokens.unwrap_or(true),
            return_token_ids: self.return_token_ids.unwrap_or(false),
            thinking_budget: self.thinking_budget(chat)?,
            cache_salt: self.cache_salt()?,
            prompt_logprobs: self.prompt_logprobs()?,
            bad_words: self.bad_words.clone().unwrap_or_default(),
        })
    }
}

impl Common {
    /// `truncate_prompt_tokens`, checked: at least 1, or -1 (as many as fit).
    fn truncate_prompt(&self) -> Result<Option<usize>, ApiError> {
        match self.truncate_prompt_tokens {
            None => Ok(None),
            Some(-1) => Ok(Some(usize::MAX)),
            Some(k) if k >= 1 => Ok(Some(usize::try_from(k).unwrap_or(usize::MAX))),
            Some(k) => Err(ApiError::bad_request(
                format!("truncate_prompt_tokens {k} is not -1 (as many as fit) or at least 1"),
                Some("truncate_prompt_tokens"),
            )),
        }
    }

    /// `thinking_token_budget`, checked: -1 (none) or at least 0, on chats.
    fn thinking_budget(&self, chat: bool) -> Result<Option<usize>, ApiError> {
        let bad = |what: String| Err(ApiError::bad_request(what, Some("thinking_token_budget")));
        match self.thinking_token_budget {
            None | Some(-1) => Ok(None),
            Some(_) if !chat => bad("thinking_token_budget applies to chat completions (in thinking mode)".into()),
            Some(b) if b >= 0 => Ok(Some(usize::try_from(b).unwrap_or(usize::MAX))),
            Some(b) => bad(format!("thinking_token_budget {b} is not -1 (no limit) or at least 0")),
        }
    }

    /// `cache_salt`, checked: 1 to 1024 bytes.
    fn cache_salt(&self) -> Result<Option<std::sync::Arc<str>>, ApiError> {
        match self.cache_salt.as_deref() {
            Some(salt) if salt.is_empty() || salt.len() > 1024 => {
                Err(ApiError::bad_request("cache_salt must be 1 to 1024 bytes", Some("cache_salt")))
            }
            salt => Ok(salt.map(std::sync::Arc::from)),
        }
    }

    /// `prompt_logprobs`, checked: 0 to 20 alternatives, and not streamed.
    fn prompt_logprobs(&self) -> Result<Option<usize>, ApiError> {
        let bad = |what: String| Err(ApiError::bad_request(what, Some("prompt_logprobs")));
        match self.prompt_logprobs {
            None => Ok(None),
            Some(_) if self.stream == Some(true) => {
                bad("prompt_logprobs cannot be streamed; send stream: false".into())
            }
            Some(k) if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) => Ok(Some(k as usize)),
            Some(k) => {
                bad(format!("prompt_logprobs {k} is not 0 to {MAX_TOP_LOGPROBS} (-1, every token, is not served)"))
            }
        }
    }

    /// `request_id`, checked: up to 128 visible ASCII characters, as it
    /// goes into the response's id and the logs.
    fn request_id(&self) -> Result<Option<String>, ApiError> {
        match &self.request_id {
            Some(id) if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) => {
                Err(ApiError::bad_request(
                    "request_id must be 1 to 128 visible ASCII characters (no spaces)",
                    Some("request_id"),
                ))
            }
            id => Ok(id.clone()),
        }
    }

    fn logits(&self, chat: bool) -> Result<LogitsParams, ApiError> {
        fn bad<T>(field: &'static str, what: String) -> Result<T, ApiError> {
            Err(ApiError::bad_request(what, Some(field)))
        }
        let top = self.top_logprobs.unwrap_or(0);
        let logprobs = match (&self.logprobs, chat) {
            (None | Some(serde_json::Value::Null), _) if self.top_logprobs.is_some_and(|t| t > 0) => {
                return bad("top_logprobs", "top_logprobs needs logprobs: true".into());
            }
            (None | Some(serde_json::Value::Null), _) => None,
            (Some(serde_json::Value::Bool(on)), true) => on.then_some(top as usize),
            (Some(v), false) if v.as_u64().is_some() => Some(v.as_u64().unwrap_or(0) as usize),
            (Some(_), true) => return bad("logprobs", "logprobs must be true or false".into()),
            (Some(_), false) => return bad("logprobs", "logprobs must be a number of alternatives (0 to 20)".into()),
        };
        if top > MAX_TOP_LOGPROBS || logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS as usize) {
            return bad("top_logprobs", format!("at most {MAX_TOP_LOGPROBS} alternatives per token"));
        }
        let penalty = |v: Option<f32>, field: &'static str| match v.unwrap_or(0.0) {
            p if (-2.0..=2.0).contains(&p) => Ok(p),
            p => bad(field, format!("{field} {p} is not in [-2, 2]")),
        };
        let repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
        if !(repetition_penalty > 0.0 && repetition_penalty.is_finite()) {
            return bad("repetition_penalty", format!("repetition_penalty {repetition_penalty} must be above 0"));
        }
        let mut bias = Vec::new();
        for (token, &b) in self.logit_bias.iter().flatten() {
            let Ok(id) = token.parse::<u32>() else {
                return bad("logit_bias", format!("logit_bias key `{token}` is not a token id"));
            };
            if !(-100.0..=100.0).contains(&b) {
                return bad("logit_bias", format!("logit_bias {b} for token {id} is not in [-100, 100]"));
            }
            bias.push((id, b));
        }
        if self.allowed_token_ids.as_ref().is_some_and(Vec::is_empty) {
            return bad("allowed_token_ids", "allowed_token_ids must name at least one token".into());
        }
        // Echoed with log-probabilities, the prompt's are part of them; the
        // engine scores the prompt with the most alternatives either asks.
        let echoed = if self.echo == Some(true) && !chat { logprobs } else { None };
        let asked = self.prompt_logprobs.and_then(|k| usize::try_from(k).ok());
        let prompt_logprobs = echoed.max(asked);
        Ok(LogitsParams {
            prompt_logprobs,
            allowed: self.allowed_token_ids.clone(),
            // Tokenized once the request is admitted (`Params::bad_words`).
            bad_words: Vec::new(),
            bias,
            presence_penalty: penalty(self.presence_penalty, "presence_penalty")?,
            frequency_penalty: penalty(self.frequency_penalty, "frequency_penalty")?,
            repetition_penalty,
            min_tokens: self.min_tokens.unwrap_or(0) as usize,
            logprobs,
        })
    }
}

/// A seed for requests that give none (sampling is then not reproducible,
/// as with OpenAI).
fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn common(fields: serde_json::Value) -> Common {
        let mut body = json!({"model": "m"});
        body.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn sampling_fields_are_checked() {
        let p = common(json!({"n": 3, "logprobs": true, "top_logprobs": 5, "presence_penalty": 0.5,
                              "repetition_penalty": 1.2, "logit_bias": {"7": -100}, "min_tokens": 4,
                              "stop_token_ids": [9]}))
        .params(true)
        .unwrap();
        assert_eq!(
            (p.n, p.logits.logprobs, p.logits.bias.clone(), p.stop_token_ids.clone()),
            (3, Some(5), vec![(7, -100.0)], vec![9])
        );
        assert_eq!(common(json!({"logprobs": 2})).params(false).unwrap().logits.logprobs, Some(2));
        for (fields, chat, param) in [
            (json!({"n": 17}), true, "n"),
            (json!({"n": 0}), true, "n"),
            (json!({"logprobs": 3}), true, "logprobs"),
            (json!({"logprobs": true}), false, "logprobs"),
            (json!({"top_logprobs": 2}), true, "top_logprobs"),
            (json!({"logprobs": true, "top_logprobs": 21}), true, "top_logprobs"),
            (json!({"presence_penalty": 3}), true, "presence_penalty"),
            (json!({"repetition_penalty": 0}), true, "repetition_penalty"),
            (json!({"logit_bias": {"x": 1}}), true, "logit_bias"),
            (json!({"logit_bias": {"1": 101}}), true, "logit_bias"),
            (json!({"min_p": 1.5}), true, "min_p"),
            (json!({"top_k": -2}), true, "top_k"),
            (json!({"truncate_prompt_tokens": 0}), false, "truncate_prompt_tokens"),
            (json!({"request_id": "has a space"}), false, "request_id"),
            (json!({"request_id": ""}), false, "request_id"),
            (json!({"prompt_logprobs": -1}), false, "prompt_logprobs"),
            (json!({"thinking_token_budget": -2}), true, "thinking_token_budget"),
            (json!({"thinking_token_budget": 10}), false, "thinking_token_budget"),
            (json!({"prompt_logprobs": 1, "stream": true}), true, "prompt_logprobs"),
            (json!({"allowed_token_ids": []}), false, "allowed_token_ids"),
        ] {
            let e = common(fields.clone()).params(chat).unwrap_err();
            assert_eq!(e.param, Some(param), "{fields}: {}", e.message);
        }
    }
}
