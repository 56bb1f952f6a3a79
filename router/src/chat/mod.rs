//! Chat prompts through the model folder's `chat_template` (Jinja, rendered
//! with minijinja), and DeepSeek-V4's reasoning modes.
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

impl ChatTemplate {
    /// Reads `chat_template`, `bos_token` and `eos_token` from
    /// `dir/tokenizer_config.json`; `Ok(None)` when the model ships none.
    pub fn load(dir: &Path) -> Result<Option<Self>, String> {
        let path = dir.join("tokenizer_config.json");
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: not valid JSON: {e}", path.display()))?;
        let Some(source) = config.get("chat_template").and_then(|t| t.as_str()) else { return Ok(None) };
        let token = |key: &str| {
            config.get(key).and_then(|v| v.as_str().or_else(|| v.get("content")?.as_str())).unwrap_or("").to_string()
        };
        let mut env = Environment::new();
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| format!("{}: chat_template: {e}", path.display()))?;
        Ok(Some(ChatTemplate { env, bos: token("bos_token"), eos: token("eos_token") }))
    }

    /// The prompt text for `messages`, ready for the assistant's turn.
    pub fn render(
        &self,
        messages: &[Message],
        reasoning: Reasoning,
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
            "add_generation_prompt": true,
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
