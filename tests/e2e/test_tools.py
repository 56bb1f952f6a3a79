"""Tool calls and structured outputs through the official client, against
`myriad up` on the tiny model (random weights: what it writes is noise, but
constrained decoding must still make it valid)."""

import json

import jsonschema
import openai
import pytest

from test_openai_api import MODEL, raw_post

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
                "unit": {"type": "string", "enum": ["c", "f"]},
                "hourly": {"type": "boolean"},
            },
            "required": ["city", "days"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                       "required": ["zone"]},
    },
}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def schema_of(name):
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


def check_calls(message):
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), schema_of(call.function.name))
    return message.tool_calls


def test_a_named_tool_choice_calls_that_tool_with_valid_arguments(client):
    for seed in range(3):
        answer = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, max_tokens=800, seed=seed, temperature=0.8,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        calls = check_calls(answer.choices[0].message)
        assert [c.function.name for c in calls] == ["get_weather"]
        assert answer.choices[0].finish_reason == "tool_calls"


def test_required_calls_validate_and_may_run_in_parallel(client):
    counts = []
    for seed in range(8):
        answer = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                max_tokens=800, seed=seed, temperature=1.0)
        if answer.choices[0].finish_reason == "length":
            # The random model went on calling until max_tokens: an unclosed
            # block is returned as text, never half-parsed.
            assert answer.choices[0].message.tool_calls is None
            assert answer.choices[0].message.content.startswith("\n\n<｜DSML｜tool_calls>")
            continue
        assert answer.choices[0].finish_reason == "tool_calls"
        counts.append(len(check_calls(answer.choices[0].message)))
        single = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                max_tokens=800, seed=seed, temperature=1.0,
                                                parallel_tool_calls=False)
        assert len(check_calls(single.choices[0].message)) == 1
    # Some seed makes the model call twice or more in one block.
    assert len(counts) >= 6 and max(counts) >= 2, counts


def test_streamed_tool_calls_reassemble_to_the_whole_answer(client):
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=800, temperature=1.0)
    for seed in range(4):
        whole = client.chat.completions.create(seed=seed, **kwargs).choices[0].message
        calls, names_first, finish = {}, True, None
        for chunk in client.chat.completions.create(seed=seed, stream=True, **kwargs):
            if not chunk.choices:
                continue
            finish = chunk.choices[0].finish_reason or finish
            for piece in chunk.choices[0].delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
                if piece.function and piece.function.name:
                    names_first &= call["arguments"] == ""
                    call["id"], call["name"] = piece.id, piece.function.name
                if piece.function and piece.function.arguments:
                    call["arguments"] += piece.function.arguments
        assert names_first and finish == "tool_calls"
        assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
            [(c.function.name, c.function.arguments) for c in whole.tool_calls]


def test_a_full_tool_loop(server, client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=800, seed=1,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = check_calls(first.choices[0].message)[0]
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=8, seed=1)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The model saw its own call and the result, as V4's encoder writes them.
    _, ids = raw_post(server, "/tokenize", json.dumps({"messages": history, "tools": TOOLS}).encode())
    _, text = raw_post(server, "/detokenize", json.dumps({"tokens": ids["tokens"]}).encode())
    assert answer.usage.prompt_tokens == ids["count"]
    assert '<｜DSML｜invoke name="get_weather">' in text["prompt"]
    assert '<tool_result>{"temperature": 21}</tool_result>' in text["prompt"]


def test_json_schema_outputs_validate(client):
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "maxLength": 10},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3},
            "ok": {"type": "boolean"},
        },
        "required": ["answer", "ok", "tags"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}
    for seed in range(20):
        answer = client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, max_tokens=200,
                                                seed=seed, temperature=1.0)
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), schema)
    # Completions take it too.
    text = client.completions.create(model=MODEL, prompt="{", max_tokens=200, seed=3, temperature=1.0,
                                     extra_body={"response_format": fmt}).choices[0].text
    jsonschema.validate(json.loads(text), schema)
    # json_object is any object: keys and values the random model may make
    # long, so only the answers that finish are checked whole.
    finished = 0
    for seed in range(4):
        choice = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=400, seed=seed,
                                                response_format={"type": "json_object"}).choices[0]
        assert choice.message.content.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
            finished += 1
    assert finished, "no json_object answer finished"


def test_bad_schemas_and_choices_are_400(client):
    bad = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "string", "minLength": 5, "maxLength": 2}}}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"a": {"$ref": "#/nowhere"}}, "required": ["a"]}}}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
        ({"tool_choice": "required"}, "needs `tools`"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "sometimes"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "combined"),
    ]
    for extra, fragment in bad:
        with pytest.raises(openai.BadRequestError, match=fragment):
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, extra_body=extra)


def test_vllm_guided_fields_constrain_the_output(client):
    """vLLM's `guided_*` fields and its `structured_outputs` object: each
    answer of the random model still follows what was asked."""
    import re
    labels = ["positive", "negative", "neutral"]
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string", "maxLength": 6}},
              "required": ["n", "s"], "additionalProperties": False}
    asks = [
        ({"guided_choice": labels}, lambda t: t in labels),
        ({"structured_outputs": {"choice": labels, "disable_any_whitespace": True}}, lambda t: t in labels),
        ({"guided_regex": r"[0-9]{3}-[a-z]{2,4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        ({"structured_outputs": {"regex": r"(yes|no), [A-Z]"}}, lambda t: re.fullmatch(r"(yes|no), [A-Z]", t)),
        ({"guided_grammar": 'start: item "+" item "=" item\nitem: "1" | "22" | "x"'},
         lambda t: re.fullmatch(r"(1|22|x)\+(1|22|x)=(1|22|x)", t)),
        ({"guided_json": schema}, lambda t: jsonschema.validate(json.loads(t), schema) is None),
        ({"structured_outputs": {"json": json.dumps(schema)}}, lambda t: jsonschema.validate(json.loads(t), schema) is None),
    ]
    for extra, follows in asks:
        for seed in range(3):
            choice = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, seed=seed,
                                                    temperature=1.0, extra_body=extra).choices[0]
            assert choice.finish_reason == "stop" and follows(choice.message.content), (extra, choice)
        text = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=60, seed=1, temperature=1.0,
                                         extra_body=extra).choices[0]
        assert text.finish_reason == "stop" and follows(text.text), (extra, text)
    # In thinking mode the reasoning is free but cannot end the answer: an
    # answer that stops is one of the labels; one still thinking at
    # max_tokens has none.
    stopped = 0
    for seed in range(4):
        choice = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=400, seed=seed, temperature=1.0,
                                                reasoning_effort="high", extra_body={"guided_choice": labels}).choices[0]
        assert choice.message.reasoning_content, choice
        if choice.finish_reason == "stop":
            assert choice.message.content in labels, choice
            stopped += 1
        else:
            assert choice.finish_reason == "length" and not choice.message.content, choice
    assert stopped, "no thinking answer reached its label"


def test_bad_guided_fields_are_400(client):
    bad = [
        ({"guided_choice": ["a"], "guided_regex": "b"}, "both constrain"),
        ({"response_format": {"type": "json_object"}, "guided_json": {"type": "object"}}, "both constrain"),
        ({"guided_grammar": 'root ::= "a"'}, "Lark syntax"),
        ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_choice": []}, "at least one"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structural_tag"),
        ({"structured_outputs": {"regex": "a", "json_object": True}}, "give one"),
        ({"guided_decoding_backend": "xgrammar"}, "`guided_decoding_backend` is not supported"),
        ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "combined"),
    ]
    for extra, fragment in bad:
        with pytest.raises(openai.BadRequestError, match=fragment):
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, extra_body=extra)
