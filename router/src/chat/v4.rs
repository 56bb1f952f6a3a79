//! DeepSeek-V4's own chat encoding: the prompt its reference encoder
//! (`encoding_dsv4.py`, shipped with the model instead of a Jinja template)
//! builds from an OpenAI-style request, and the parse of a completion back
//! into reasoning, content and tool calls ([`parse`]).
//!
//! The prompt is BOS, an optional Think Max preamble, then each turn: a
//! system prompt as bare text (with the tool schemas appended), a user turn
//! after `<｜User｜>` (consecutive user and `tool` messages merge into one,
//! tool results as `<tool_result>…</tool_result>` blocks ordered as the
//! assistant called them), an assistant turn as `reasoning</think>`,
//! content and a DSML tool-call block, closed by EOS. A user turn that is
//! last or followed by an assistant turn ends with `<｜Assistant｜>` and
//! `<think>` (thinking) or `</think>` (chat). In thinking mode without
//! tools, assistant turns before the last user turn lose their reasoning;
//! with tools every turn keeps it.
//!
//! `tests/fixtures/v4-chat` holds prompts and parses produced by the
//! reference encoder; `router/tests/v4_chat.rs` checks every one.

use std::ops::Range;

use serde_json::{Map, Value};

use super::{Reasoning, content_text as text, pyjson};

pub const BOS: &str = "<｜begin▁of▁sentence｜>";
pub const EOS: &str = "<｜end▁of▁sentence｜>";
pub const USER: &str = "<｜User｜>";
pub const ASSISTANT: &str = "<｜Assistant｜>";
pub const THINK_START: &str = "<think>";
pub const THINK_END: &str = "</think>";
/// The marker inside every tool-call tag: `<｜DSML｜invoke name="…">`.
pub const DSML: &str = "｜DSML｜";

/// What Think Max puts between BOS and the first turn.
const MAX_EFFORT: &str = "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n\
You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, \
rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n\
Explicitly write out your entire deliberation process, documenting every intermediate step, considered \
alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n";

/// The text that introduces the tool schemas (`{D}` stands for [`DSML`]).
const TOOLS_PREAMBLE: &str = "## Tools\n\n\
You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \
\"<{D}tool_calls>\" block like the following:\n\n\
<{D}tool_calls>\n<{D}invoke name=\"$TOOL_NAME\">\n\
<{D}parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</{D}parameter>\n...\n</{D}invoke>\n\
<{D}invoke name=\"$TOOL_NAME2\">\n...\n</{D}invoke>\n</{D}tool_calls>\n\n\
String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, booleans, \
arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n\
If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside \
<think>...</think> BEFORE any tool calls or final response.\n\n\
Otherwise, output directly after </think> with tool calls or final response.\n\n\
### Available Tool Schemas\n\n";

const TOOLS_CLOSING: &str =
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n";

/// One turn after merging `tool` messages into user turns.
#[derive(Debug, Clone)]
enum Turn {
    System {
        content: String,
        tools: Vec<Value>,
    },
    /// Rendered as a user turn (the reference's `developer` role).
    Developer {
        content: String,
        tools: Vec<Value>,
    },
    User {
        blocks: Vec<Block>,
    },
    Assistant {
        content: String,
        reasoning: Option<String>,
        calls: Vec<Call>,
    },
}

#[derive(Debug, Clone)]
enum Block {
    Text(String),
    ToolResult { id: String, content: String },
}

#[derive(Debug, Clone)]
struct Call {
    id: String,
    name: String,
    arguments: Value,
}

impl Turn {
    fn is_user(&self) -> bool {
        matches!(self, Turn::User { .. } | Turn::Developer { .. })
    }
}

/// A prompt: its text and the byte ranges that hold the client's own text
/// (contents, reasoning, tool schemas, names and arguments), which must be
/// tokenized as text: a special token's string there is not the token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prompt {
    pub text: String,
    pub client: Vec<Range<usize>>,
}

impl Prompt {
    fn markup(&mut self, s: &str) {
        self.text.push_str(s);
    }

    fn client(&mut self, s: &str) {
        if !s.is_empty() {
            let start = self.text.len();
            self.text.push_str(s);
            self.client.push(start..self.text.len());
        }
    }
}

/// How a prompt ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// A last user turn is followed by `<｜Assistant｜>` and the thinking
    /// tag: the model answers it (the default).
    Answer,
    /// As its last message ends (vLLM's `add_generation_prompt: false`).
    AsIs,
    /// Inside its last message, an assistant's without tool calls, left
    /// open: the model goes on writing its content (vLLM's
    /// `continue_final_message`).
    Continue,
}

/// The prompt for an OpenAI-style chat: `messages` (system, developer,
/// user, assistant with `reasoning_content` and `tool_calls`, tool) and the
/// request's `tools`, in `reasoning` mode. Errors name what is wrong.
pub fn encode(messages: &[Value], tools: &[Value], reasoning: Reasoning) -> Result<Prompt, String> {
    encode_ending(messages, tools, reasoning, Ending::Answer)
}

/// [`encode`], ending as `ending` says.
pub fn encode_ending(
    messages: &[Value],
    tools: &[Value],
    reasoning: Reasoning,
    ending: Ending,
) -> Result<Prompt, String> {
    let mut turns = merge(messages)?;
    if ending == Ending::Continue && !matches!(turns.last(), Some(Turn::Assistant { calls, .. }) if calls.is_empty()) {
        return Err("continue_final_message needs the last message to be an assistant's, without tool_calls".into());
    }
    if !tools.is_empty() {
        let functions = tools
            .iter()
            .map(|t| t.get("function").cloned().ok_or_else(|| format!("tool {t} has no `function`")))
            .collect::<Result<Vec<_>, _>>()?;
        match turns.first_mut() {
            Some(Turn::System { tools, .. }) => *tools = functions,
            _ => turns.insert(0, Turn::System { content: String::new(), tools: functions }),
        }
    }
    order_tool_results(&mut turns);
    let thinking = reasoning.thinking();
    let has_tools = turns
        .iter()
        .any(|t| matches!(t, Turn::System { tools, .. } | Turn::Developer { tools, .. } if !tools.is_empty()));
    // Without tools, thinking mode forgets the reasoning of earlier turns.
    let drop_thinking = !has_tools;
    if thinking && drop_thinking {
        turns = drop_earlier_reasoning(turns);
    }
    let last_user = turns.iter().rposition(Turn::is_user);
    let last = turns.len().saturating_sub(1);
    let mut prompt = Prompt::default();
    prompt.markup(BOS);
    for (i, turn) in turns.iter().enumerate() {
        if i == 0 && reasoning == Reasoning::Max {
            prompt.markup(MAX_EFFORT);
        }
        let open = ending == Ending::Continue && i == last;
        render(turn, thinking && (!drop_thinking || Some(i) > last_user), open, &mut prompt);
        let next_is_assistant = turns.get(i + 1).is_none_or(|t| matches!(t, Turn::Assistant { .. }));
        if turn.is_user() && next_is_assistant && !(ending == Ending::AsIs && i == last) {
            prompt.markup(ASSISTANT);
            let open = thinking && (!drop_thinking || Some(i) >= last_user);
            prompt.markup(if open { THINK_START } else { THINK_END });
        }
    }
    Ok(prompt)
}

/// Appends one turn; `with_reasoning`: an assistant turn shows its
/// reasoning (and the `</think>` that closes it); `open`: an assistant
/// turn is left unclosed (no EOS), to be continued.
fn render(turn: &Turn, with_reasoning: bool, open: bool, prompt: &mut Prompt) {
    match turn {
        Turn::System { content, tools } => {
            prompt.client(content);
            push_tools(tools, prompt);
        }
        Turn::Developer { content, tools } => {
            prompt.markup(USER);
            prompt.client(content);
            push_tools(tools, prompt);
        }
        Turn::User { blocks } => {
            prompt.markup(USER);
            for (i, block) in blocks.iter().enumerate() {
                if i > 0 {
                    prompt.markup("\n\n");
                }
                match block {
                    Block::Text(text) => prompt.client(text),
                    Block::ToolResult { content, .. } => {
                        prompt.markup("<tool_result>");
                        prompt.client(content);
                        prompt.markup("</tool_result>");
                    }
                }
            }
        }
        Turn::Assistant { content, reasoning, calls } => {
            if with_reasoning {
                prompt.client(reasoning.as_deref().unwrap_or(""));
                prompt.markup(THINK_END);
            }
            prompt.client(content);
            if !calls.is_empty() {
                prompt.markup(&format!("\n\n<{DSML}tool_calls>\n"));
                for (i, call) in calls.iter().enumerate() {
                    if i > 0 {
                        prompt.markup("\n");
                    }
                    invoke(call, prompt);
                }
                prompt.markup(&format!("\n</{DSML}tool_calls>"));
            }
            if !open {
                prompt.markup(EOS);
            }
        }
    }
}

fn push_tools(tools: &[Value], prompt: &mut Prompt) {
    if tools.is_empty() {
        return;
    }
    prompt.markup("\n\n");
    prompt.markup(&TOOLS_PREAMBLE.replace("{D}", DSML));
    for (i, tool) in tools.iter().enumerate() {
        if i > 0 {
            prompt.markup("\n");
        }
        prompt.client(&pyjson::dumps(tool));
    }
    prompt.markup(TOOLS_CLOSING);
}

/// One call as DSML: a parameter per argument, strings as they are (no
/// escaping), other values as JSON.
fn invoke(call: &Call, prompt: &mut Prompt) {
    let arguments = match &call.arguments {
        Value::Object(map) => map.clone(),
        // Not a JSON object: the reference passes the text as one argument.
        other => Map::from_iter([("arguments".to_string(), other.clone())]),
    };
    prompt.markup(&format!("<{DSML}invoke name=\""));
    prompt.client(&call.name);
    prompt.markup("\">\n");
    for (i, (key, value)) in arguments.iter().enumerate() {
        if i > 0 {
            prompt.markup("\n");
        }
        let (string, text) = match value {
            Value::String(s) => ("true", s.clone()),
            other => ("false", pyjson::dumps(other)),
        };
        prompt.markup(&format!("<{DSML}parameter name=\""));
        prompt.client(key);
        prompt.markup(&format!("\" string=\"{string}\">"));
        prompt.client(&text);
        prompt.markup(&format!("</{DSML}parameter>"));
    }
    prompt.markup(&format!("\n</{DSML}invoke>"));
}

/// Turns the request's messages into [`Turn`]s: consecutive user messages
/// and `tool` results merge into one user turn.
fn merge(messages: &[Value]) -> Result<Vec<Turn>, String> {
    let mut turns: Vec<Turn> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        if matches!(role, "user" | "system" | "developer" | "tool") && m.get("content").is_none_or(Value::is_null) {
            return Err(format!("messages[{i}]: has no content"));
        }
        let block = match role {
            "user" => Block::Text(text(m.get("content"), i)?),
            "tool" => Block::ToolResult {
                id: m.get("tool_call_id").and_then(Value::as_str).unwrap_or("").to_string(),
                content: tool_result(m.get("content"), i)?,
            },
            "system" => {
                turns.push(Turn::System { content: text(m.get("content"), i)?, tools: Vec::new() });
                continue;
            }
            "developer" => {
                turns.push(Turn::Developer { content: text(m.get("content"), i)?, tools: Vec::new() });
                continue;
            }
            "assistant" => {
                turns.push(assistant(m, i)?);
                continue;
            }
            other => return Err(format!("messages[{i}]: unknown role `{other}`")),
        };
        match turns.last_mut() {
            Some(Turn::User { blocks }) => blocks.push(block),
            _ => turns.push(Turn::User { blocks: vec![block] }),
        }
    }
    Ok(turns)
}

fn assistant(m: &Value, i: usize) -> Result<Turn, String> {
    let reasoning = match m.get("reasoning_content") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(format!("messages[{i}].reasoning_content must be a string")),
    };
    let mut calls = Vec::new();
    for (j, call) in m.get("tool_calls").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let function =
            call.get("function").ok_or_else(|| format!("messages[{i}].tool_calls[{j}] has no `function`"))?;
        let name = function.get("name").and_then(Value::as_str);
        let name = name.ok_or_else(|| format!("messages[{i}].tool_calls[{j}].function has no `name`"))?;
        let arguments = match function.get("arguments") {
            // Arguments are a JSON text; one that does not parse is kept as text.
            Some(Value::String(s)) => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone())),
            Some(other) => other.clone(),
            None => Value::Object(Map::new()),
        };
        let id = call.get("id").and_then(Value::as_str).unwrap_or("").to_string();
        calls.push(Call { id, name: name.to_string(), arguments });
    }
    Ok(Turn::Assistant { content: text(m.get("content"), i)?, reasoning, calls })
}

/// A tool result's content: as [`text`], but parts are joined by blank
/// lines and other kinds of part become a marker, as the reference does.
fn tool_result(content: Option<&Value>, i: usize) -> Result<String, String> {
    match content {
        Some(Value::Array(parts)) => Ok(parts
            .iter()
            .map(|p| match p.get("type").and_then(Value::as_str) {
                Some("text") => p.get("text").and_then(Value::as_str).unwrap_or("").to_string(),
                kind => format!("[Unsupported {}]", kind.unwrap_or("None")),
            })
            .collect::<Vec<_>>()
            .join("\n\n")),
        other => text(other, i),
    }
}

/// Within each user turn, tool results follow the order in which the
/// latest assistant turn called them (results with unknown ids first).
fn order_tool_results(turns: &mut [Turn]) {
    let mut order: Vec<String> = Vec::new();
    for turn in turns.iter_mut() {
        match turn {
            Turn::Assistant { calls, .. } if !calls.is_empty() => {
                order = calls.iter().map(|c| c.id.clone()).collect();
            }
            Turn::User { blocks } if !order.is_empty() => {
                let rank = |id: &str| order.iter().position(|o| !o.is_empty() && o == id).unwrap_or(0);
                let mut results: Vec<Block> =
                    blocks.iter().filter(|b| matches!(b, Block::ToolResult { .. })).cloned().collect();
                if results.len() < 2 {
                    continue;
                }
                results.sort_by_key(|b| match b {
                    Block::ToolResult { id, .. } => rank(id),
                    Block::Text(_) => 0,
                });
                let mut sorted = results.into_iter();
                for b in blocks.iter_mut().filter(|b| matches!(b, Block::ToolResult { .. })) {
                    if let Some(next) = sorted.next() {
                        *b = next;
                    }
                }
            }
            _ => {}
        }
    }
}

/// Thinking mode without tools: assistant turns before the last user turn
/// lose their reasoning, and developer turns before it are left out.
fn drop_earlier_reasoning(turns: Vec<Turn>) -> Vec<Turn> {
    let last_user = turns.iter().rposition(Turn::is_user);
    turns
        .into_iter()
        .enumerate()
        .filter_map(|(i, turn)| {
            if Some(i) >= last_user {
                return Some(turn);
            }
            match turn {
                Turn::Assistant { content, calls, .. } => Some(Turn::Assistant { content, reasoning: None, calls }),
                Turn::Developer { .. } => None,
                other => Some(other),
            }
        })
        .collect()
}
