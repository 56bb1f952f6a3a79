//! The request fields that ask for constrained output, one per request:
//! OpenAI's `response_format`, vLLM's `guided_json`, `guided_regex`,
//! `guided_choice` and `guided_grammar`, and vLLM's newer
//! `structured_outputs` object, which holds one of the same four (or
//! `json_object`). Each becomes an llguidance grammar ([`structured`]).

use llguidance::api::TopLevelGrammar;
use serde_json::Value;

use super::api::Common;
use super::error::ApiError;
use crate::structured;

/// Reads one field's value: the grammar it asks for, if it asks for one.
type Reader = fn(&Value) -> Result<Option<TopLevelGrammar>, String>;

/// The grammar `c` asks for and the field that asks, if any; a 400 naming
/// the field when its value is not one, or when two fields ask.
pub fn grammar(c: &Common) -> Result<Option<(TopLevelGrammar, &'static str)>, ApiError> {
    let fields: [(&'static str, &Option<Value>, Reader); 6] = [
        ("response_format", &c.response_format, structured::response_format),
        ("guided_json", &c.guided_json, |v| json(v).map(Some)),
        ("guided_regex", &c.guided_regex, |v| regex(v).map(Some)),
        ("guided_choice", &c.guided_choice, |v| choice(v).map(Some)),
        ("guided_grammar", &c.guided_grammar, |v| lark(v).map(Some)),
        ("structured_outputs", &c.structured_outputs, |v| structured_outputs(v).map(Some)),
    ];
    let mut asked = Vec::new();
    for (field, value, read) in fields {
        let Some(value) = value.as_ref().filter(|v| !v.is_null()) else { continue };
        let bad = |e: String| ApiError::bad_request(format!("{field}: {e}"), Some(field));
        if let Some(grammar) = read(value).map_err(bad)? {
            asked.push((grammar, field));
        }
    }
    if let [(_, first), (_, second), ..] = asked[..] {
        return Err(ApiError::bad_request(
            format!("`{first}` and `{second}` both constrain the output; give one"),
            Some(second),
        ));
    }
    Ok(asked.pop())
}

/// A JSON schema: an object or a boolean, or one in a string.
fn json(v: &Value) -> Result<TopLevelGrammar, String> {
    match v {
        Value::String(text) => {
            let schema = serde_json::from_str(text).map_err(|e| format!("the schema is not JSON: {e}"))?;
            structured::json_schema(&schema)
        }
        schema => structured::json_schema(schema),
    }
}

fn regex(v: &Value) -> Result<TopLevelGrammar, String> {
    match v.as_str() {
        Some(rx) if !rx.is_empty() => Ok(TopLevelGrammar::from_regex(rx)),
        _ => Err("give a regular expression as a non-empty string".into()),
    }
}

fn choice(v: &Value) -> Result<TopLevelGrammar, String> {
    let options: Option<Vec<String>> =
        v.as_array().and_then(|a| a.iter().map(|o| o.as_str().map(str::to_string)).collect());
    structured::choice(&options.ok_or("give the choices as a list of strings")?)
}

/// A grammar in Lark syntax, as llguidance reads it.
fn lark(v: &Value) -> Result<TopLevelGrammar, String> {
    match v.as_str() {
        Some(g) if g.contains("::=") => Err(
            "the grammar must be in Lark syntax (`rule: ...`, as llguidance reads it); GBNF rules (`::=`) are not read"
                .into(),
        ),
        Some(g) if !g.trim().is_empty() => Ok(TopLevelGrammar::from_lark(g.to_string())),
        _ => Err("give the grammar as a non-empty string".into()),
    }
}

/// vLLM's `structured_outputs`: one constraint, and options this server
/// either follows already or refuses.
fn structured_outputs(v: &Value) -> Result<TopLevelGrammar, String> {
    let fields = v.as_object().ok_or("must be an object")?;
    let mut asked = Vec::new();
    for (key, value) in fields.iter().filter(|(_, v)| !v.is_null()) {
        let grammar = match key.as_str() {
            "json" => json(value)?,
            "regex" => regex(value)?,
            "choice" => choice(value)?,
            "grammar" => lark(value)?,
            "json_object" => match value.as_bool() {
                Some(true) => structured::json_schema(&serde_json::json!({"type": "object"}))?,
                Some(false) => continue,
                None => return Err("json_object must be true or false".into()),
            },
            // JSON is written without free whitespace, and no other
            // backend is ever fallen back to: both already hold.
            "disable_any_whitespace" | "disable_fallback" if value.is_boolean() => continue,
            "disable_additional_properties" if value == &Value::Bool(false) => continue,
            "disable_additional_properties" | "whitespace_pattern" | "structural_tag" => {
                return Err(format!("`{key}` is not supported by this server yet; remove it or send its default"));
            }
            other => return Err(format!("`{other}` is not a structured_outputs field")),
        };
        asked.push((key.as_str(), grammar));
    }
    match asked.len() {
        0 => Err("give one of json, regex, choice, grammar or json_object".into()),
        1 => Ok(asked.remove(0).1),
        _ => Err(format!("give one of json, regex, choice, grammar or json_object, not {}", asked.len())),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn asked(fields: Value) -> Result<Option<&'static str>, (String, Option<&'static str>)> {
        let mut body = json!({"model": "m"});
        body.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
        let common: Common = serde_json::from_value(body).unwrap();
        grammar(&common).map(|g| g.map(|(_, field)| field)).map_err(|e| (e.message, e.param))
    }

    #[test]
    fn each_field_asks_for_its_grammar() {
        for (fields, field) in [
            (json!({"guided_json": {"type": "object"}}), "guided_json"),
            (json!({"guided_json": "{\"type\": \"integer\"}"}), "guided_json"),
            (json!({"guided_regex": "[a-z]+@example\\.com"}), "guided_regex"),
            (json!({"guided_choice": ["yes", "no"]}), "guided_choice"),
            (json!({"guided_grammar": "start: \"a\" start | \"b\""}), "guided_grammar"),
            (json!({"structured_outputs": {"choice": ["x"], "disable_any_whitespace": true}}), "structured_outputs"),
            (json!({"structured_outputs": {"json_object": true, "regex": null}}), "structured_outputs"),
            (json!({"response_format": {"type": "json_object"}, "guided_json": null}), "response_format"),
        ] {
            assert_eq!(asked(fields.clone()), Ok(Some(field)), "{fields}");
        }
        let neutral = json!({"response_format": {"type": "text"}, "guided_choice": null});
        assert_eq!(asked(neutral), Ok(None));
    }

    #[test]
    fn bad_values_and_two_asks_are_refused_by_name() {
        for (fields, param, says) in [
            (json!({"guided_json": "{not json"}), "guided_json", "not JSON"),
            (json!({"guided_json": 3}), "guided_json", "JSON schema object"),
            (json!({"guided_regex": ""}), "guided_regex", "non-empty"),
            (json!({"guided_choice": []}), "guided_choice", "at least one"),
            (json!({"guided_choice": ["a", 1]}), "guided_choice", "list of strings"),
            (json!({"guided_grammar": "root ::= \"a\""}), "guided_grammar", "Lark"),
            (json!({"structured_outputs": {}}), "structured_outputs", "give one of"),
            (json!({"structured_outputs": {"regex": "a", "choice": ["b"]}}), "structured_outputs", "not 2"),
            (
                json!({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}),
                "structured_outputs",
                "whitespace_pattern",
            ),
            (json!({"structured_outputs": {"choice": ["a"], "typo": 1}}), "structured_outputs", "`typo`"),
            (json!({"guided_choice": ["a"], "guided_regex": "b"}), "guided_choice", "both constrain"),
            (json!({"response_format": {"type": "json_object"}, "guided_json": {}}), "guided_json", "give one"),
        ] {
            let (message, got) = asked(fields.clone()).unwrap_err();
            assert_eq!(got, Some(param), "{fields}: {message}");
            assert!(message.contains(says), "{fields}: {message}");
        }
    }
}
