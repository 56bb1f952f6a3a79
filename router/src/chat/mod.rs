//! Chat prompts: DeepSeek-V4's own encoding ([`v4`], parsed back by
//! [`v4_parse`]) by default, or a Jinja template the operator names
//! (rendered with minijinja); and V4's reasoning modes.
//!
//! Reasoning modes: `none` renders the non-thinking prompt; `high` and `max`
//! open a `<think>` block (`max` also tells the template to ask for the most
//! thorough reasoning). Generated text up to `</think>` is reasoning and is
//! returned as `reasoning_content`; the rest is the answer.

mod pyjson;
pub mod v4;
pub mod v4_parse;

use std::ops::Range;
use std::path::Path;

use minijinja::Environment;
use serde::Serialize;
use serde_json::Value;

pub const THINK_END: &str = "</think>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reasoning {
    None,
    High,
    Max,
}

impl Reasoning {
    pub fn parse(effort: &str) -> Option<Self> {
        match effort {
            "none" => Some(Reasoning::None),
            "high" => Some(Reasoning::High),
            "max" => Some(Reasoning::Max),
            _ => None,
        }
    }

    pub fn thinking(self) -> bool {
        self != Reasoning::None
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

/// How chat requests become prompts.
pub enum ChatEncoder {
    /// DeepSeek-V4's own encoding ([`v4`]): the default, as the released
    /// V4 folders ship no template.
    V4,
    /// A Jinja template the operator chose.
    Template(Box<ChatTemplate>),
}

impl ChatEncoder {
    /// `--chat-template`: none for V4's encoding, `folder` for the
    /// `chat_template` in the model folder's `tokenizer_config.json`, or
    /// the path of a Jinja file.
    pub fn choose(model: &Path, flag: Option<&Path>) -> Result<Self, String> {
        let Some(flag) = flag else { return Ok(ChatEncoder::V4) };
        let config = tokenizer_config(model)?;
        let source = if flag == Path::new("folder") {
            config.get("chat_template").and_then(Value::as_str).map(str::to_string).ok_or_else(|| {
                format!(
                    "--chat-template folder: {} has no chat_template",
                    model.join("tokenizer_config.json").display()
                )
            })?
        } else {
            std::fs::read_to_string(flag).map_err(|e| format!("--chat-template {}: {e}", flag.display()))?
        };
        ChatTemplate::new(source, &config).map(|t| ChatEncoder::Template(Box::new(t)))
    }

    pub fn name(&self) -> &'static str {
        match self {
            ChatEncoder::V4 => "DeepSeek-V4 encoding",
            ChatEncoder::Template(_) => "Jinja chat template",
        }
    }
}

/// `dir/tokenizer_config.json`, or an empty object when there is none.
fn tokenizer_config(dir: &Path) -> Result<Value, String> {
    let path = dir.join("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(Value::Object(Default::default())) };
    serde_json::from_str(&text).map_err(|e| format!("{}: not valid JSON: {e}", path.display()))
}

impl ChatTemplate {
    /// A template from its source, with the BOS and EOS texts of a
    /// `tokenizer_config.json`.
    fn new(source: String, config: &Value) -> Result<Self, String> {
        let token = |key: &str| {
            config.get(key).and_then(|v| v.as_str().or_else(|| v.get("content")?.as_str())).unwrap_or("").to_string()
        };
        let mut env = Environment::new();
        env.add_template_owned("chat", source).map_err(|e| format!("chat template: {e}"))?;
        Ok(ChatTemplate { env, bos: token("bos_token"), eos: token("eos_token") })
    }

    /// The prompt text for `messages`, ready for the assistant's turn
    /// when `generation` (the template's `add_generation_prompt`).
    pub fn render(
        &self,
        messages: &[Message],
        reasoning: Reasoning,
        generation: bool,
        extra: &serde_json::Value,
    ) -> Result<String, String> {
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        let effort = match reasoning {
            Reasoning::None => "none",
            Reasoning::High => "high",
            Reasoning::Max => "max",
        };
        let mut context = serde_json::json!({
            "messages": messages,
            "bos_token": self.bos,
            "eos_token": self.eos,
            "add_generation_prompt": generation,
            "thinking": reasoning.thinking(),
            "reasoning_effort": effort,
        });
        if let (Some(ctx), Some(extra)) = (context.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                ctx.insert(k.clone(), v.clone());
            }
        }
        template.render(minijinja::value::Serde(&context)).map_err(|e| format!("chat template: {e}"))
    }
}

/// A message's content: a string, nothing, or a list of text parts joined
/// by newlines (as vLLM joins them for V4); any other part is refused.
pub fn content_text(content: Option<&Value>, i: usize) -> Result<String, String> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => texts.push(t),
                    (Some("text"), None) => {
                        return Err(format!("messages[{i}].content[{j}] of type text has no `text`"));
                    }
                    (kind, _) => {
                        return Err(format!(
                            "messages[{i}].content[{j}] has type `{}`; this model takes only text",
                            kind.unwrap_or("none")
                        ));
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        Some(_) => Err(format!("messages[{i}].content must be a string or a list of text parts")),
    }
}

/// The messages as a Jinja template takes them: roles system, developer
/// (as system), user and assistant, each with text content. Tool messages
/// need the V4 encoder.
pub fn template_messages(messages: &[Value]) -> Result<Vec<Message>, String> {
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let role = match m.get("role").and_then(Value::as_str) {
            Some(r @ ("system" | "user" | "assistant")) => r,
            Some("developer") => "system",
            Some(r @ ("tool" | "function")) => {
                return Err(format!(
                    "messages[{i}]: role `{r}` needs the V4 chat encoding; this server renders chats with a Jinja template"
                ));
            }
            other => {
                return Err(format!(
                    "messages[{i}]: role `{}` is not one of system, developer, user, assistant",
                    other.unwrap_or("(none)")
                ));
            }
        };
        if m.get("content").is_none_or(Value::is_null) {
            return Err(format!("messages[{i}]: has no content"));
        }
        out.push(Message { role: role.to_string(), content: content_text(m.get("content"), i)? });
    }
    Ok(out)
}

/// Where each message's content appears in `rendered`, searching in
/// message order; `None` for a message whose content the template changed
/// or left out (and for empty contents, which need no protecting).
pub fn content_spans(rendered: &str, messages: &[Message]) -> Vec<Option<Range<usize>>> {
    let mut from = 0;
    messages
        .iter()
        .map(|m| {
            if m.content.is_empty() {
                return None;
            }
            let start = from + rendered[from..].find(&m.content)?;
            from = start + m.content.len();
            Some(start..from)
        })
        .collect()
}

/// Splits generated text into `(reasoning, answer)` when thinking.
pub fn split_reasoning(text: &str, thinking: bool) -> (Option<&str>, &str) {
    if !thinking {
        return (None, text);
    }
    match text.find(THINK_END) {
        Some(i) => (Some(&text[..i]), &text[i + THINK_END.len()..]),
        None => (Some(text), ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_are_found_in_order() {
        let m = |c: &str| Message { role: "user".into(), content: c.into() };
        let rendered = "<s>U:hi A:hi U:bye";
        let spans = content_spans(rendered, &[m("hi"), m("hi"), m(""), m("bye"), m("gone")]);
        assert_eq!(spans, vec![Some(5..7), Some(10..12), None, Some(15..18), None]);
    }

    #[test]
    fn reasoning_splits_at_the_end_of_thinking() {
        assert_eq!(split_reasoning("plan</think>answer", true), (Some("plan"), "answer"));
        assert_eq!(split_reasoning("still thinking", true), (Some("still thinking"), ""));
        assert_eq!(split_reasoning("plain</think>", false), (None, "plain</think>"));
    }
}
