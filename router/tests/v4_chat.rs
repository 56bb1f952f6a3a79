//! DeepSeek-V4's chat encoding and completion parsing against the golden
//! data of `tests/fixtures/v4-chat`, produced by DeepSeek's reference
//! encoder (see its README): every prompt byte for byte, every parse and
//! every error message.

use myriad_router::chat::Reasoning;
use myriad_router::chat::v4::encode;
use myriad_router::chat::v4_parse::parse;
use serde_json::Value;

fn golden(name: &str) -> Vec<Value> {
    let path = format!("{}/../tests/fixtures/v4-chat/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn mode(case: &Value) -> Reasoning {
    match case["mode"].as_str().unwrap() {
        "chat" => Reasoning::None,
        "thinking" => Reasoning::High,
        "thinking_max" => Reasoning::Max,
        other => panic!("unknown mode {other}"),
    }
}

#[test]
fn every_golden_prompt_is_reproduced() {
    let cases = golden("encode.json");
    assert_eq!(cases.len(), 22);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let messages = case["messages"].as_array().unwrap();
        let tools = case["tools"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let prompt = encode(messages, tools, mode(case)).unwrap_or_else(|e| panic!("{name}: {e}")).text;
        let expected = case["expected_prompt"].as_str().unwrap();
        if prompt != expected {
            let at = prompt.bytes().zip(expected.bytes()).position(|(a, b)| a != b).unwrap_or(prompt.len());
            let from = prompt.floor_char_boundary(at.saturating_sub(60));
            panic!(
                "{name}: prompts differ at byte {at}\n ours: {:?}\n gold: {:?}",
                &prompt[from..prompt.ceil_char_boundary((at + 60).min(prompt.len()))],
                &expected
                    [expected.floor_char_boundary(from)..expected.ceil_char_boundary((at + 60).min(expected.len()))]
            );
        }
    }
}

#[test]
fn every_golden_completion_parses_as_the_reference_does() {
    let cases = golden("parse.json");
    assert_eq!(cases.len(), 13);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let thinking = case["thinking_mode"].as_str() == Some("thinking");
        let result = parse(case["completion_text"].as_str().unwrap(), thinking);
        if case["expected_error"].as_bool().unwrap() {
            let err = result.expect_err(name);
            assert_eq!(err, case["error_message"].as_str().unwrap(), "{name}");
            continue;
        }
        let parsed = result.unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected = &case["expected_message"];
        assert_eq!(parsed.content, expected["content"].as_str().unwrap(), "{name}: content");
        assert_eq!(parsed.reasoning, expected["reasoning_content"].as_str().unwrap(), "{name}: reasoning");
        let calls: Vec<(&str, &str)> = expected["tool_calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["function"]["name"].as_str().unwrap(), c["function"]["arguments"].as_str().unwrap()))
            .collect();
        let ours: Vec<(&str, String)> = parsed.tool_calls.iter().map(|c| (c.name.as_str(), c.arguments())).collect();
        let calls: Vec<(&str, String)> = calls.into_iter().map(|(n, a)| (n, a.to_string())).collect();
        assert_eq!(ours, calls, "{name}: tool calls");
    }
}

/// What the goldens do not cover: bad requests are errors that say what
/// is wrong, not panics or silently odd prompts.
#[test]
fn bad_messages_are_named() {
    let err = |messages: Value| encode(messages.as_array().unwrap(), &[], Reasoning::None).unwrap_err();
    let e = err(serde_json::json!([{"role": "wizard", "content": "hi"}]));
    assert!(e.contains("messages[0]") && e.contains("wizard"), "{e}");
    let e = err(serde_json::json!([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]));
    assert!(e.contains("messages[0]") && e.contains("image_url"), "{e}");
    let e =
        err(serde_json::json!([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"id": "x"}]}]));
    assert!(e.contains("messages[1].tool_calls[0]"), "{e}");
    // User content as text parts is flattened.
    let parts = serde_json::json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]);
    let prompt = encode(parts.as_array().unwrap(), &[], Reasoning::None).unwrap().text;
    assert!(prompt.ends_with("<｜User｜>a\nb<｜Assistant｜></think>"), "{prompt}");
}

/// The client's text is marked for tokenizing as text: special-token
/// strings inside messages, reasoning, tool results and tool arguments lie
/// in the client ranges, and every special token the encoder writes lies
/// outside them.
#[test]
fn client_text_is_marked_and_markup_is_not() {
    for case in golden("encode.json") {
        let name = case["name"].as_str().unwrap();
        let tools = case["tools"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let prompt = encode(case["messages"].as_array().unwrap(), tools, mode(&case)).unwrap();
        let inside = |at: usize| prompt.client.iter().any(|r| r.contains(&at));
        assert!(prompt.client.windows(2).all(|w| w[0].end <= w[1].start), "{name}: ranges in order");
        // A tool argument with special-token strings (one golden case).
        if let Some(at) = prompt.text.find("</think> <｜User｜> a<b>c ｜") {
            assert!((at..at + 20).all(inside), "{name}: tool argument not marked");
        }
        for message in case["messages"].as_array().unwrap() {
            if let Some(content) = message["content"].as_str().filter(|c| c.contains("<｜") || c.contains("</think>"))
            {
                let at = prompt.text.find(content).unwrap_or_else(|| panic!("{name}: content not in prompt"));
                assert!((at..at + content.len()).all(inside), "{name}: {content:?} is not marked as client text");
            }
        }
    }
}

/// The endpoint parses the tool-call block alone, as it streams past: the
/// calls equal the whole-completion parse's, and the fragments a stream
/// sends concatenate to the arguments.
#[test]
fn the_block_alone_parses_to_the_same_calls() {
    use myriad_router::chat::v4_parse::{CALLS_END, CALLS_START, tool_calls};
    let mut seen = 0;
    for case in golden("parse.json") {
        let text = case["completion_text"].as_str().unwrap();
        let (Some(start), Some(end)) = (text.find(CALLS_START), text.find(CALLS_END)) else { continue };
        let block = &text[start..end + CALLS_END.len()];
        let thinking = case["thinking_mode"].as_str() == Some("thinking");
        match parse(text, thinking) {
            Ok(parsed) => {
                let calls = tool_calls(block).unwrap();
                assert_eq!(calls, parsed.tool_calls);
                for call in &calls {
                    assert_eq!(call.argument_fragments().concat(), call.arguments());
                }
                seen += 1;
            }
            // A block the reference rejects for its own form is rejected alone too.
            Err(e) if e.contains("Tool") || e.contains("Parameter") || e.contains("Duplicate") => {
                assert!(tool_calls(block).is_err(), "{e}")
            }
            Err(_) => {}
        }
    }
    assert!(seen >= 3, "{seen}");
}

/// vLLM's `add_generation_prompt: false` and `continue_final_message` on
/// every golden conversation: the prompt ends as the last message ends, or
/// inside an assistant message left open (its EOS not written).
#[test]
fn prompts_end_as_asked() {
    use myriad_router::chat::v4::{ASSISTANT, EOS, Ending, THINK_END, THINK_START, encode_ending};
    for case in &golden("encode.json") {
        let name = case["name"].as_str().unwrap();
        let mut messages = case["messages"].as_array().unwrap().clone();
        let tools = case["tools"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let answer = encode(&messages, tools, mode(case)).unwrap().text;
        let as_is = encode_ending(&messages, tools, mode(case), Ending::AsIs).unwrap().text;
        // A last user or tool message is a user turn, which the answer opens.
        if matches!(messages.last().unwrap()["role"].as_str(), Some("user" | "tool")) {
            let opened = [format!("{ASSISTANT}{THINK_START}"), format!("{ASSISTANT}{THINK_END}")];
            assert!(opened.iter().any(|o| answer == format!("{as_is}{o}")), "{name}: {as_is:?}");
        } else {
            assert_eq!(as_is, answer, "{name}");
        }
        messages.push(serde_json::json!({"role": "assistant", "content": "The answer starts"}));
        let closed = encode(&messages, tools, mode(case)).unwrap().text;
        let open = encode_ending(&messages, tools, mode(case), Ending::Continue).unwrap().text;
        assert!(open.ends_with("The answer starts"), "{name}: {open:?}");
        assert_eq!(format!("{open}{EOS}"), closed, "{name}");
    }
    let question = [serde_json::json!({"role": "user", "content": "hi"})];
    let refused = encode_ending(&question, &[], Reasoning::None, Ending::Continue).unwrap_err();
    assert!(refused.contains("assistant"), "{refused}");
}
