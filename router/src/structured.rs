//! Constrained decoding with llguidance: `response_format` JSON schemas and
//! forced tool calls become a grammar, and each step the grammar's matcher
//! gives the set of tokens that keep the output inside it.
//!
//! A tool call is forced as V4 writes one: the DSML block its encoder puts
//! in the prompt (`chat::v4`), with each parameter's value constrained by
//! its schema (strings as raw text with `string="true"`, everything else
//! as JSON). In thinking mode the grammar starts after `</think>`: the
//! reasoning is free.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use myriad_model::text::TextTokenizer;
use serde_json::{Map, Value, json};

use crate::chat::v4::DSML;
use crate::engine::Constraint;

/// Compiles grammars over one tokenizer; shared by every request.
pub struct Grammars {
    factory: Arc<ParserFactory>,
    /// The `</think>` token: a thinking answer's grammar starts after it.
    think_end: Option<TokenId>,
    /// What a thinking answer may sample before `</think>`: any token but
    /// an end of sequence (the answer the grammar shapes must follow).
    thinking: Arc<Vec<u32>>,
}

/// The tokenizer as llguidance sees it: each token's bytes in a trie.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<TextTokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| self.tokenizer.encode(text).unwrap_or_default())
    }
}

impl Grammars {
    /// `pieces`: each token's bytes and whether it is a control token, as
    /// [`TextTokenizer::token_bytes`] gives them; `vocab_size`: the model's
    /// (at least the tokenizer's; ids past the tokenizer's are never
    /// allowed); `eos`: the end-of-sequence ids; `think_end`: the
    /// `</think>` token, if there is one.
    pub fn new(
        tokenizer: Arc<TextTokenizer>,
        pieces: &[(Vec<u8>, bool)],
        vocab_size: usize,
        eos: &[u32],
        think_end: Option<TokenId>,
    ) -> Result<Self, String> {
        let mut words: Vec<Vec<u8>> = Vec::with_capacity(vocab_size);
        // Control tokens are marked so no grammar text can match them; ids
        // without a spelling (gaps, the model's ids past the tokenizer's)
        // get a unique marked name, never sampled under a grammar.
        let unnamed = |id: usize| [&[TokTrie::SPECIAL_TOKEN_MARKER][..], format!("<[{id}]>").as_bytes()].concat();
        for (id, (bytes, special)) in pieces.iter().enumerate() {
            words.push(match (special, bytes.is_empty()) {
                (_, true) => unnamed(id),
                (true, false) => [&[TokTrie::SPECIAL_TOKEN_MARKER][..], bytes].concat(),
                (false, false) => bytes.clone(),
            });
        }
        if words.len() > vocab_size {
            return Err(format!("the tokenizer has {} tokens, the model {vocab_size}", words.len()));
        }
        while words.len() < vocab_size {
            words.push(unnamed(words.len()));
        }
        let &first_eos = eos.first().ok_or("the model has no end-of-sequence token")?;
        let mut thinking = vec![u32::MAX; vocab_size.div_ceil(32)];
        if !vocab_size.is_multiple_of(32) {
            thinking[vocab_size / 32] = (1 << (vocab_size % 32)) - 1;
        }
        for &e in eos.iter().filter(|&&e| (e as usize) < vocab_size) {
            thinking[e as usize / 32] &= !(1 << (e % 32));
        }
        let info = TokRxInfo::new(vocab_size as u32, first_eos);
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(eos);
        }
        let env: TokEnv = Arc::new(Vocabulary { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Grammars { factory: Arc::new(factory), think_end, thinking: Arc::new(thinking) })
    }

    /// A constraint for `grammar`; in thinking mode it starts after
    /// `</think>`. Errors (an invalid or unsatisfiable schema) name the
    /// problem.
    pub fn constraint(&self, grammar: TopLevelGrammar, thinking: bool) -> Result<Box<dyn Constraint>, String> {
        Ok(self.constraints(grammar, thinking, 1)?.remove(0))
    }

    /// `count` independent constraints for `grammar` (one per choice of a
    /// request), compiled once.
    pub fn constraints(
        &self,
        grammar: TopLevelGrammar,
        thinking: bool,
        count: usize,
    ) -> Result<Vec<Box<dyn Constraint>>, String> {
        let gate = match (thinking, self.think_end) {
            (false, _) => None,
            (true, Some(t)) => Some((t, self.thinking.clone())),
            (true, None) => return Err("thinking mode needs a `</think>` token to start the grammar after".into()),
        };
        let parser = self.factory.create_parser(grammar).map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        let mut all: Vec<Box<dyn Constraint>> = Vec::with_capacity(count.max(1));
        for _ in 1..count {
            all.push(Box::new(Guided { matcher: matcher.deep_clone(), gate: gate.clone() }));
        }
        all.push(Box::new(Guided { matcher, gate }));
        Ok(all)
    }
}

/// A grammar's matcher, closed until its gate token (if any) is sampled;
/// meanwhile the gate's mask applies.
struct Guided {
    matcher: Matcher,
    gate: Option<(TokenId, Arc<Vec<u32>>)>,
}

impl Constraint for Guided {
    fn allowed(&mut self) -> Result<Option<Vec<u32>>, String> {
        if let Some((_, before)) = &self.gate {
            return Ok(Some(before.to_vec()));
        }
        let mask: SimpleVob = self.matcher.compute_mask_or_eos().map_err(|e| e.to_string())?;
        Ok(Some(mask.as_slice().to_vec()))
    }

    fn consume(&mut self, token: u32) -> Result<(), String> {
        match &self.gate {
            Some((gate, _)) => {
                if token == *gate {
                    self.gate = None;
                }
                Ok(())
            }
            None => self.matcher.consume_token(token).map_err(|e| e.to_string()),
        }
    }

    fn finished(&self) -> bool {
        self.gate.is_none() && self.matcher.is_stopped()
    }
}

/// JSON as the model's prompts write it (`", "` and `": "`), with no
/// other whitespace: a random or weak model cannot pad it forever.
fn compact(schema: &Value) -> Value {
    let mut schema = match schema {
        Value::Object(o) => o.clone(),
        // `true` (anything) or a schema llguidance will judge.
        other => return other.clone(),
    };
    schema.insert(
        "x-guidance".into(),
        json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
    );
    Value::Object(schema)
}

/// `response_format`: `json_object` (any object) or `json_schema`.
pub fn response_format(format: &Value) -> Result<Option<TopLevelGrammar>, String> {
    match format.get("type").and_then(Value::as_str) {
        None | Some("text") => Ok(None),
        Some("json_object") => Ok(Some(TopLevelGrammar::from_json_schema(compact(&json!({"type": "object"}))))),
        Some("json_schema") => {
            let spec = format.get("json_schema").ok_or("response_format json_schema needs a `json_schema` object")?;
            let schema = spec.get("schema").cloned().unwrap_or(json!({}));
            json_schema(&schema).map(Some)
        }
        Some(other) => Err(format!("response_format type `{other}` is not one of text, json_object, json_schema")),
    }
}

/// Output that is JSON valid against `schema` (an object or a boolean),
/// written compactly.
pub fn json_schema(schema: &Value) -> Result<TopLevelGrammar, String> {
    if !schema.is_object() && !schema.is_boolean() {
        return Err("the schema must be a JSON schema object".into());
    }
    Ok(TopLevelGrammar::from_json_schema(compact(schema)))
}

/// Output that is exactly one of `options`.
pub fn choice(options: &[String]) -> Result<TopLevelGrammar, String> {
    if options.is_empty() || options.iter().any(String::is_empty) {
        return Err("give at least one choice, none of them empty".into());
    }
    let literals: Vec<String> = options.iter().map(|o| Value::String(o.clone()).to_string()).collect();
    Ok(TopLevelGrammar::from_lark(format!("start: {}", literals.join(" | "))))
}

/// A string parameter V4 writes as raw text (`string="true"`, as its
/// prompt asks): the Lark expression for its value, when the schema's
/// constraints are ones raw text can follow (`enum`, `minLength`,
/// `maxLength`). `None` for everything else, written as JSON with the
/// whole schema enforced (a string with a `pattern` or `format` too).
fn raw_text(schema: &Value) -> Option<Result<String, String>> {
    let o = schema.as_object()?;
    if o.get("type").and_then(Value::as_str) != Some("string")
        || o.keys()
            .any(|k| !matches!(k.as_str(), "type" | "enum" | "minLength" | "maxLength" | "description" | "title"))
    {
        return None;
    }
    if let Some(options) = o.get("enum").and_then(Value::as_array) {
        let options: Vec<String> = options.iter().filter_map(Value::as_str).map(|v| json!(v).to_string()).collect();
        return Some(if options.is_empty() {
            Err("a string enum needs string values".to_string())
        } else {
            Ok(format!("({})", options.join(" | ")))
        });
    }
    let min = o.get("minLength").and_then(Value::as_u64).unwrap_or(0);
    // Up to the closing tag, which starts with `<`.
    Some(Ok(match o.get("maxLength").and_then(Value::as_u64) {
        Some(max) if max < min => return Some(Err(format!("minLength {min} exceeds maxLength {max}"))),
        Some(max) => format!("/[^<]{{{min},{max}}}/"),
        None => format!("/[^<]{{{min},}}/"),
    }))
}

/// The DSML block of one or more calls (`parallel`) of `tools` (OpenAI
/// function tools, already checked to have names), as a Lark grammar.
pub fn tool_calls(tools: &[Value], parallel: bool) -> Result<TopLevelGrammar, String> {
    let lit = |s: &str| Value::String(s.to_string()).to_string();
    let mut rules = Vec::new();
    let mut calls = Vec::new();
    for (t, tool) in tools.iter().enumerate() {
        let function = &tool["function"];
        let name = function["name"].as_str().unwrap_or_default();
        let empty = Map::new();
        let parameters = function.get("parameters").and_then(Value::as_object).unwrap_or(&empty);
        let properties = parameters.get("properties").and_then(Value::as_object).unwrap_or(&empty);
        let required: Vec<&str> = parameters
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if let Some(missing) = required.iter().find(|r| !properties.contains_key(**r)) {
            return Err(format!("tool `{name}`: required parameter `{missing}` has no schema in `properties`"));
        }
        if let Some(bad) = properties.keys().find(|k| k.contains(['"', '<', '>'])) {
            return Err(format!("tool `{name}`: parameter name `{bad}` cannot be written in a tool call"));
        }
        // Definitions a parameter's `$ref` may point at.
        let defs: Map<String, Value> = ["$defs", "definitions"]
            .iter()
            .filter_map(|k| parameters.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect();
        let mut body = String::new();
        for (p, (key, schema)) in properties.iter().enumerate() {
            let rule = format!("param{t}_{p}");
            let (string, value) = match raw_text(schema) {
                Some(value) => (true, value.map_err(|e| format!("tool `{name}`: parameter `{key}`: {e}"))?),
                None => {
                    let mut schema = schema.clone();
                    if let Value::Object(o) = &mut schema {
                        o.extend(defs.clone());
                    }
                    (false, format!("%json {}", compact(&schema)))
                }
            };
            let open = format!("<{DSML}parameter name=\"{key}\" string=\"{string}\">");
            rules.push(format!("{rule}: {} {value} {}", lit(&open), lit(&format!("</{DSML}parameter>\n"))));
            body.push_str(&if required.contains(&key.as_str()) { format!(" {rule}") } else { format!(" {rule}?") });
        }
        // Lexemes are matched greedily, so the newline between two calls
        // belongs to the second one's opening tag: a lone "\n" lexeme
        // would always be taken as the start of the block's closing tag.
        let head = format!("<{DSML}invoke name=\"{name}\">\n");
        // As the encoder writes it: a call without arguments has an empty line.
        let close = lit(&format!("{}</{DSML}invoke>", if body.is_empty() { "\n" } else { "" }));
        rules.push(format!("call{t}: {}{body} {close}", lit(&head)));
        rules.push(format!("next{t}: {}{body} {close}", lit(&format!("\n{head}"))));
        calls.push(t);
    }
    if calls.is_empty() {
        return Err("a forced tool call needs at least one tool".into());
    }
    let alternatives = |rule: &str| calls.iter().map(|t| format!("{rule}{t}")).collect::<Vec<_>>().join(" | ");
    let grammar = format!(
        "start: {} call{} {}\ncall: {}\nnext: {}\n{}\n",
        lit(&format!("\n\n<{DSML}tool_calls>\n")),
        if parallel { " next*" } else { "" },
        lit(&format!("\n</{DSML}tool_calls>")),
        alternatives("call"),
        alternatives("next"),
        rules.join("\n"),
    );
    Ok(TopLevelGrammar::from_lark(grammar))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Reasoning;
    use crate::chat::v4::THINK_END;
    use crate::chat::v4_parse::{CALLS_END, CALLS_START};
    use crate::engine::mask_allows;

    fn tiny() -> (Arc<TextTokenizer>, Grammars) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-v4");
        let tokenizer = Arc::new(TextTokenizer::load(&dir).unwrap());
        let grammars = over(&tokenizer, 512);
        (tokenizer, grammars)
    }

    /// Grammars over `tokenizer` for a model of `vocab_size` tokens.
    fn over(tokenizer: &Arc<TextTokenizer>, vocab_size: usize) -> Grammars {
        let pieces = tokenizer.token_bytes().unwrap();
        let think_end = pieces.iter().position(|(b, _)| b == THINK_END.as_bytes()).map(|id| id as TokenId);
        assert!(think_end.is_some(), "the tiny model has a `</think>` token");
        Grammars::new(tokenizer.clone(), &pieces, vocab_size, &[1], think_end).unwrap()
    }

    fn allows(c: &mut Box<dyn Constraint>, token: u32) -> bool {
        c.allowed().unwrap().is_none_or(|m| mask_allows(&m, token as usize))
    }

    #[test]
    fn every_token_is_spelled_as_the_tokenizer_decodes_it() {
        let (tokenizer, _) = tiny();
        for (id, (bytes, special)) in tokenizer.token_bytes().unwrap().into_iter().enumerate() {
            if let (Ok(text), false) = (String::from_utf8(bytes), special) {
                assert_eq!(text, tokenizer.decode_all(&[id as u32]).unwrap(), "token {id}");
            }
        }
    }

    /// The block V4's encoder writes for two calls (as in the prompt's
    /// history) is one the grammar allows, token by token, and it ends there.
    #[test]
    fn the_grammar_allows_what_the_encoder_writes() {
        let (tokenizer, grammars) = tiny();
        let tools = vec![
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}, "days": {"type": "integer"},
                               "unit": {"type": "string", "enum": ["c", "f"]}},
                "required": ["city"]}}}),
            json!({"type": "function", "function": {"name": "now"}}),
        ];
        let calls = json!([
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 3}"}},
            {"id": "b", "type": "function", "function": {"name": "now", "arguments": "{}"}},
        ]);
        let messages =
            json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": calls}]);
        let prompt = crate::chat::v4::encode(messages.as_array().unwrap(), &[], Reasoning::None).unwrap().text;
        let block = &prompt[prompt.find(CALLS_START).unwrap()..prompt.find(CALLS_END).unwrap() + CALLS_END.len()];
        for (parallel, fits) in [(true, true), (false, false)] {
            let mut c = grammars.constraint(tool_calls(&tools, parallel).unwrap(), false).unwrap();
            let mut all = true;
            for t in tokenizer.encode(block).unwrap() {
                all &= allows(&mut c, t);
                if !all {
                    break;
                }
                c.consume(t).unwrap();
            }
            assert_eq!(all, fits, "parallel {parallel}");
            if fits {
                assert!(c.finished() || allows(&mut c, 1), "the block is complete");
            }
        }
    }

    #[test]
    fn thinking_opens_the_grammar_after_the_end_of_thinking() {
        let (tokenizer, grammars) = tiny();
        let grammar = response_format(&json!({"type": "json_object"})).unwrap().unwrap();
        let mut c = grammars.constraint(grammar, true).unwrap();
        let free = tokenizer.encode("no json here").unwrap();
        for &t in &free {
            // Free, but for the end of sequence: the answer must follow.
            assert!(allows(&mut c, t) && !allows(&mut c, 1) && allows(&mut c, 511));
            c.consume(t).unwrap();
        }
        c.consume(tokenizer.encode(THINK_END).unwrap()[0]).unwrap();
        assert!(!allows(&mut c, free[0]) && allows(&mut c, tokenizer.encode("{").unwrap()[0]));
    }

    #[test]
    fn a_choice_allows_exactly_its_options() {
        let (tokenizer, grammars) = tiny();
        let options = ["positive".to_string(), "negative".to_string()];
        for (text, fits) in [("positive", true), ("negative", true), ("neutral", false), ("positives", false)] {
            let mut c = grammars.constraint(choice(&options).unwrap(), false).unwrap();
            let mut all = true;
            for t in tokenizer.encode(text).unwrap() {
                all &= !c.finished() && allows(&mut c, t);
                if !all {
                    break;
                }
                c.consume(t).unwrap();
            }
            assert_eq!(all && (c.finished() || allows(&mut c, 1)), fits, "{text}");
        }
        assert!(choice(&[]).is_err() && choice(&[String::new()]).is_err());
    }

    #[test]
    fn ids_past_the_tokenizer_are_never_allowed() {
        let (tokenizer, _) = tiny();
        let grammars = over(&tokenizer, 600);
        let grammar = response_format(&json!({"type": "json_object"})).unwrap().unwrap();
        let mask = grammars.constraint(grammar, false).unwrap().allowed().unwrap().unwrap();
        assert!((0..512).any(|t| mask_allows(&mask, t)));
        assert!((512..600).all(|t| !mask_allows(&mask, t)));
    }

    #[test]
    fn bad_schemas_are_errors() {
        let (_, grammars) = tiny();
        let schema = |s: Value| json!({"type": "json_schema", "json_schema": {"name": "x", "schema": s}});
        for bad in [json!({"type": "string", "minLength": 3, "maxLength": 1}), json!({"$ref": "#/nowhere"})] {
            let grammar = response_format(&schema(bad.clone())).unwrap().unwrap();
            assert!(grammars.constraint(grammar, false).is_err(), "{bad}");
        }
        assert!(response_format(&json!({"type": "yaml"})).is_err());
        let tool = |p: Value| vec![json!({"type": "function", "function": {"name": "f", "parameters": p}})];
        let missing = tool(json!({"type": "object", "properties": {}, "required": ["x"]}));
        assert!(tool_calls(&missing, true).unwrap_err().contains("`x`"));
        let quoted = tool(json!({"type": "object", "properties": {"a\"b": {"type": "string"}}}));
        assert!(tool_calls(&quoted, true).is_err());
    }
}
