//! Known OpenAI and vLLM request fields this server does not support yet:
//! a request that sets one to anything but its neutral value is refused
//! with a 400 naming it, never half-served. Fields nobody has defined are
//! ignored (clients send extensions of their own).

use super::error::ApiError;

/// Whether a field's value asks for nothing.
type Neutral = fn(&serde_json::Value) -> bool;

/// Known OpenAI and vLLM request fields this server does not support yet,
/// each with the test for the value that asks for nothing (clients often
/// send defaults such as `"presence_penalty": 0` or `"tools": []`).
const UNSUPPORTED: &[(&str, Neutral)] = {
    use serde_json::Value;
    fn empty(v: &Value) -> bool {
        v.as_array().is_some_and(Vec::is_empty) || v.as_object().is_some_and(|o| o.is_empty())
    }
    fn one(v: &Value) -> bool {
        v.as_f64() == Some(1.0)
    }
    fn no(v: &Value) -> bool {
        v == &Value::Bool(false)
    }
    fn none_or_auto(v: &Value) -> bool {
        matches!(v.as_str(), Some("none" | "auto"))
    }
    fn text_only(v: &Value) -> bool {
        v.as_array().is_some_and(|m| m.iter().all(|x| x.as_str() == Some("text")))
    }
    fn yes(v: &Value) -> bool {
        v == &Value::Bool(true)
    }
    fn zero(v: &Value) -> bool {
        v.as_f64() == Some(0.0)
    }
    fn auto(v: &Value) -> bool {
        matches!(v.as_str(), Some("auto" | "default"))
    }
    fn never(_: &Value) -> bool {
        false
    }
    &[
        ("functions", empty),
        ("function_call", none_or_auto),
        ("best_of", one),
        ("suffix", never),
        ("audio", never),
        ("modalities", text_only),
        ("prediction", never),
        ("web_search_options", never),
        ("guided_decoding_backend", never),
        ("guided_whitespace_pattern", never),
        ("structural_tag", never),
        ("use_beam_search", no),
        ("length_penalty", one),
        ("spaces_between_special_tokens", yes),
        ("add_special_tokens", never),
        ("documents", empty),
        ("chat_template", never),
        ("mm_processor_kwargs", empty),
        ("priority", zero),
        ("kv_transfer_params", never),
        ("vllm_xargs", empty),
        ("logits_processors", never),
        ("store", no),
        ("service_tier", auto),
        ("verbosity", never),
    ]
};

/// A 400 naming the first field of [`UNSUPPORTED`] that `request` sets to
/// anything but null or its neutral value.
pub fn refuse(request: &serde_json::Value) -> Result<(), ApiError> {
    for (field, neutral) in UNSUPPORTED {
        match request.get(*field) {
            Some(v) if !v.is_null() && !neutral(v) => {
                return Err(ApiError::bad_request(
                    format!("`{field}` is not supported by this server yet; remove it or send its default"),
                    Some(field),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn refused(body: serde_json::Value) -> Option<(String, Option<&'static str>)> {
        refuse(&body).err().map(|e| (e.message, e.param))
    }

    #[test]
    fn known_unsupported_fields_are_refused_by_name() {
        for (body, field) in [
            (json!({"function_call": "auto2"}), "function_call"),
            (json!({"functions": [{"name": "f"}]}), "functions"),
            (json!({"audio": {"voice": "x"}}), "audio"),
            (json!({"modalities": ["text", "audio"]}), "modalities"),
            (json!({"best_of": 3}), "best_of"),
            (json!({"min_p": 0.1, "kv_transfer_params": {}}), "kv_transfer_params"),
            (json!({"spaces_between_special_tokens": false}), "spaces_between_special_tokens"),
            (json!({"length_penalty": 0.5}), "length_penalty"),
            (json!({"service_tier": "priority"}), "service_tier"),
        ] {
            let (message, param) = refused(body.clone()).unwrap_or_else(|| panic!("{body} was accepted"));
            assert!(message.contains(&format!("`{field}`")), "{message}");
            assert_eq!(param, Some(field));
        }
    }

    #[test]
    fn neutral_values_and_unknown_fields_pass() {
        let body = json!({
            "model": "m", "functions": [], "function_call": "none", "echo": false, "best_of": 1,
            "modalities": ["text"], "audio": null, "user": "someone", "my_own_extension": 7,
            "skip_special_tokens": true, "priority": 0, "service_tier": "auto", "store": false, "bad_words": []
        });
        assert_eq!(refused(body), None);
    }
}
