//! Parsing a DeepSeek-V4 completion (the text after the generation prompt,
//! EOS included) into reasoning, content and tool calls, with the
//! reference parser's rules and error messages: in thinking mode the
//! reasoning must end with `</think>`; content ends at EOS or at a DSML
//! tool-call block, which must be well formed and followed only by EOS; no
//! special token may appear inside reasoning or content.

use super::pyjson;
use super::v4::{BOS, DSML, EOS, THINK_END, THINK_START};

/// A parsed assistant message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub reasoning: String,
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
}

/// One call: the function's name and its arguments, each `"key": value`
/// as JSON text (strings quoted, other values as the model wrote them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    pub fields: Vec<String>,
}

impl ToolCall {
    /// The arguments as the text of one JSON object.
    pub fn arguments(&self) -> String {
        self.argument_fragments().concat()
    }

    /// The arguments in pieces, one per field, as a stream sends them:
    /// `{"a": 1`, `, "b": 2`, `}`.
    pub fn argument_fragments(&self) -> Vec<String> {
        if self.fields.is_empty() {
            return vec!["{}".to_string()];
        }
        let mut pieces: Vec<String> =
            self.fields.iter().enumerate().map(|(i, f)| format!("{}{f}", if i == 0 { "{" } else { ", " })).collect();
        pieces.push("}".to_string());
        pieces
    }
}

/// How a tool-call block opens (after the content) and closes.
pub const CALLS_START: &str = "\n\n<｜DSML｜tool_calls";
pub const CALLS_END: &str = "</｜DSML｜tool_calls>";

/// Parses `text`; `thinking` when the prompt opened a `<think>` block.
pub fn parse(text: &str, thinking: bool) -> Result<Parsed, String> {
    let mut at = 0;
    let mut reasoning = String::new();
    if thinking {
        let (next, before, stop) = read_until(text, at, &[THINK_END, CALLS_START]);
        if stop != Some(THINK_END) {
            return Err("Invalid thinking format: missing </think>".into());
        }
        (at, reasoning) = (next, before.to_string());
    }
    let (next, content, mut stop) = read_until(text, at, &[EOS, CALLS_START]);
    at = next;
    let mut tool_calls = Vec::new();
    if stop == Some(CALLS_START) {
        (at, tool_calls) = parse_calls(text, at)?;
        let (next, rest, end) = read_until(text, at, &[EOS]);
        if !rest.is_empty() {
            return Err("Unexpected content after tool calls".into());
        }
        (at, stop) = (next, end);
    } else if stop != Some(EOS) {
        return Err("Invalid format: missing EOS token".into());
    }
    if at != text.len() || !matches!(stop, Some(EOS) | None) {
        return Err("Unexpected content at end".into());
    }
    for token in [BOS, EOS, THINK_START, THINK_END, DSML] {
        if content.contains(token) || reasoning.contains(token) {
            return Err(format!("Unexpected special token '{token}' in content"));
        }
    }
    Ok(Parsed { reasoning, content: content.to_string(), tool_calls })
}

/// The calls of one tool-call block as the model wrote it, from
/// [`CALLS_START`] through [`CALLS_END`]; the reference parser's error for
/// a malformed one.
pub fn tool_calls(block: &str) -> Result<Vec<ToolCall>, String> {
    let rest = block.strip_prefix(CALLS_START).ok_or("Tool call block must open with <｜DSML｜tool_calls>")?;
    let (at, calls) = parse_calls(rest, 0)?;
    if at != rest.len() {
        return Err("Unexpected content after tool calls".into());
    }
    Ok(calls)
}

/// The DSML block after its opening `\n\n<｜DSML｜tool_calls`, up to and
/// including its closing tag: the position after it and the calls.
fn parse_calls(text: &str, mut at: usize) -> Result<(usize, Vec<ToolCall>), String> {
    let (invoke, invoke_end) = (format!("<{DSML}invoke"), format!("</{DSML}invoke"));
    let (parameter, parameter_end) = (format!("<{DSML}parameter"), format!("/{DSML}parameter"));
    let mut calls = Vec::new();
    while at < text.len() {
        let (next, between, stop) = read_until(text, at, &[&invoke, CALLS_END]);
        at = next;
        if between != ">\n" {
            return Err(format!("Tool call format error: expected '>\\n' but got '{between}'"));
        }
        match stop {
            Some(CALLS_END) => break,
            None => return Err("Missing special token in tool calls".into()),
            Some(_) => {}
        }
        let (next, head, mut stop) = read_until(text, at, &[&parameter, &invoke_end]);
        at = next;
        let name = anchored(head.trim_start(), "name=\"", "\">\n")
            .ok_or_else(|| format!("Tool name format error: '{head}'"))?;
        let mut arguments: Vec<(String, String, bool)> = Vec::new();
        while stop == Some(parameter.as_str()) {
            let (next, body, _) = read_until(text, at, &[&parameter_end]);
            at = next;
            let (key, string, value) =
                parameter_parts(body).ok_or_else(|| format!("Parameter format error: '{body}'"))?;
            if arguments.iter().any(|(k, _, _)| k == key) {
                return Err(format!("Duplicate parameter name: '{key}'"));
            }
            arguments.push((key.to_string(), value.to_string(), string));
            let (next, between, next_stop) = read_until(text, at, &[&parameter, &invoke_end]);
            at = next;
            stop = next_stop;
            if between != ">\n" {
                return Err(format!("Parameter format error: expected '>\\n' but got '{between}'"));
            }
        }
        // Strings are quoted; other values are taken as the JSON they are.
        let fields = arguments
            .iter()
            .map(|(k, v, string)| {
                format!("{}: {}", pyjson::quote(k), if *string { pyjson::quote(v) } else { v.clone() })
            })
            .collect();
        calls.push(ToolCall { name: name.to_string(), fields });
    }
    Ok((at, calls))
}

/// ` name="KEY" string="true|false">VALUE<` (what lies between
/// `<｜DSML｜parameter` and `/｜DSML｜parameter`): the key is the shortest
/// text followed by a `string` attribute.
fn parameter_parts(body: &str) -> Option<(&str, bool, &str)> {
    let rest = body.strip_prefix(" name=\"")?;
    let (key_end, string, attribute) = ["\" string=\"true\">", "\" string=\"false\">"]
        .iter()
        .zip([true, false])
        .filter_map(|(a, s)| rest.find(a).map(|at| (at, s, a.len())))
        .min_by_key(|&(at, _, _)| at)?;
    let value = anchored(&rest[key_end + attribute..], "", "<")?;
    Some((&rest[..key_end], string, value))
}

/// `s` without `prefix` and `suffix`, where the suffix may be followed by
/// one newline (the reference's regular expressions end in `$`).
fn anchored<'a>(s: &'a str, prefix: &str, suffix: &str) -> Option<&'a str> {
    let s = s.strip_prefix(prefix)?;
    s.strip_suffix(suffix).or_else(|| s.strip_suffix('\n')?.strip_suffix(suffix))
}

/// The text from `at` to the earliest of `stops` (the first listed wins a
/// tie), the position after that stop and which one it was; the rest of
/// the text and `None` when none occurs.
fn read_until<'t, 's>(text: &'t str, at: usize, stops: &[&'s str]) -> (usize, &'t str, Option<&'s str>) {
    let found = stops.iter().filter_map(|&s| text[at..].find(s).map(|p| (at + p, s))).min_by_key(|&(p, _)| p);
    match found {
        Some((p, s)) => (p + s.len(), &text[at..p], Some(s)),
        None => (text.len(), &text[at..], None),
    }
}
