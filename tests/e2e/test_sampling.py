"""The sampling and output fields vLLM users send: logprobs, n, penalties,
logit_bias, min_tokens, stop_token_ids, min_p, top_k, allowed_token_ids,
truncate_prompt_tokens, request_id; against `myriad up` on the tiny
model, through the official client."""

import json
import math

from test_openai_api import MODEL, raw_post

PROMPT = [5, 17, 42, 300, 7, 99, 8, 250]
ASK = [{"role": "user", "content": "Tell me a story."}]


def ids_of(choice):
    """The sampled token ids, through `return_tokens_as_token_ids`."""
    return [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]


def greedy(client, **extra):
    body = dict(ignore_eos=True, return_tokens_as_token_ids=True, **extra)
    choice = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0,
                                       extra_body=body).choices[0]
    return ids_of(choice), choice


def test_chat_logprobs_describe_the_returned_tokens(client):
    answer = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=16, temperature=0,
                                            logprobs=True, top_logprobs=3)
    choice = answer.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == answer.usage.completion_tokens
    # The tokens' bytes are the answer's text.
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace") == choice.message.content
    for e in entries:
        top = [t.logprob for t in e.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert math.isclose(e.logprob, top[0], abs_tol=1e-6)
        assert sum(math.exp(t) for t in top) <= 1 + 1e-5 and e.logprob <= 0
    # Streamed, the same entries arrive spread over the chunks.
    stream = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=16, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


def test_completion_logprobs(client):
    choice = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0.8, seed=4,
                                       logprobs=2, extra_body={"ignore_eos": True}).choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 2 and chosen <= max(top.values()) + 1e-6


def test_n_choices_are_seeded_and_reproducible(client):
    kwargs = dict(model=MODEL, messages=ASK, max_tokens=12, temperature=1.0, seed=5, n=3)
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1, texts
    # Choice i is the answer a request with seed 5 + i gets alone.
    for i in range(3):
        alone = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=1.0, seed=5 + i)
        assert alone.choices[0].message.content == texts[i]
    assert first.usage.completion_tokens == sum(
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=1.0, seed=5 + i)
        .usage.completion_tokens for i in range(3))
    # Streamed, each choice reassembles to the same text.
    parts = {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            parts[c.index] = parts.get(c.index, "") + (c.delta.content or "")
    assert [parts[i] for i in range(3)] == texts


def test_logit_bias_penalties_and_stop_tokens(client):
    plain, _ = greedy(client)
    # A strong bias picks the token every time; a ban removes it.
    favourite = 77
    biased, _ = greedy(client, logit_bias={str(favourite): 100})
    assert biased == [favourite] * 12
    banned, _ = greedy(client, logit_bias={str(plain[0]): -100})
    assert banned[0] != plain[0]
    # A strong repetition penalty: no token of the prompt or the output twice.
    fresh, _ = greedy(client, repetition_penalty=50.0)
    assert len(set(fresh)) == len(fresh) and not set(fresh) & set(PROMPT), fresh
    # A token favoured enough to fill the answer: frequency and presence
    # penalties make it step aside once it has been used.
    favoured = {str(favourite): 5}
    assert greedy(client, logit_bias=favoured)[0] == [favourite] * 12
    for penalty in ["frequency_penalty", "presence_penalty"]:
        penalised, _ = greedy(client, logit_bias=favoured, **{penalty: 2.0})
        assert penalised[0] == favourite and penalised.count(favourite) < 6, (penalty, penalised)
    # stop_token_ids end the answer at that token (not shown); min_tokens
    # holds stop tokens back until that many tokens were generated.
    stop_at = plain[5]
    first = plain.index(stop_at)
    body = {"stop_token_ids": [stop_at], "return_tokens_as_token_ids": True}
    stopped = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0,
                                        extra_body=body).choices[0]
    assert ids_of(stopped) == plain[:first] and stopped.finish_reason == "stop"
    held = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0,
                                     extra_body={**body, "min_tokens": first + 2}).choices[0]
    assert len(ids_of(held)) >= first + 2 and stop_at not in ids_of(held)[:first + 2]


def test_batch_invariance_holds_with_every_field(server, client):
    """A request with penalties, bias and logprobs, alone and beside others:
    the same tokens and the same log-probabilities."""
    import concurrent.futures
    body = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0.9, seed=11, logprobs=3,
                presence_penalty=0.7, frequency_penalty=0.3, extra_body={"repetition_penalty": 1.3,
                "logit_bias": {"9": 3}, "ignore_eos": True})
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 5}},
              "required": ["a", "b"], "additionalProperties": False}
    constrained = dict(model=MODEL, messages=ASK, max_tokens=60, temperature=1.0, seed=3, n=2,
                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    alone = client.completions.create(**body).choices[0]
    structured = [c.message.content for c in client.chat.completions.create(**constrained).choices]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        crowd = [pool.submit(client.completions.create, **body) for _ in range(4)]
        shaped = [pool.submit(client.chat.completions.create, **constrained) for _ in range(2)]
    for c in crowd:
        c = c.result().choices[0]
        assert c.text == alone.text and c.logprobs.token_logprobs == alone.logprobs.token_logprobs
    for s in shaped:
        assert [c.message.content for c in s.result().choices] == structured
    status, err = raw_post(server, "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "x", "stop_token_ids": [10**6]}).encode())
    assert status == 400 and "stop_token_ids" in json.dumps(err)


def test_cached_tokens_over_a_three_turn_thinking_conversation(client):
    """V4 drops earlier reasoning (no tools), so a thinking conversation's
    prompt is not append-only: each turn reuses the state the KV-cache
    stored for the previous prompt up to its generation prompt, and no
    more (the earlier answer's state began with `<think>`, which the new
    prompt replaces by `</think>`)."""
    def converse(effort):
        messages, usage = [], []
        for turn in ["Hello.", "Tell me more.", "Thanks!"]:
            messages.append({"role": "user", "content": turn})
            answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                    reasoning_effort=effort)
            msg = answer.choices[0].message
            usage.append((answer.usage.prompt_tokens, answer.usage.prompt_tokens_details.cached_tokens))
            messages.append({"role": "assistant", "content": msg.content,
                             "reasoning_content": getattr(msg, "reasoning_content", None)})
        return usage

    thinking = converse("high")
    print("thinking (prompt, cached):", thinking)
    # Turn n's prompt shares with turn n-1's everything before that turn's
    # closing `<think>`: the state the cache stored after prefilling it.
    assert thinking[0][1] == 0
    assert thinking[1][1] == thinking[0][0] - 1 and thinking[2][1] == thinking[1][0] - 1
    chat = converse("none")
    print("chat (prompt, cached):", chat)
    # Append-only: the earlier prompt is reused, and the earlier answer too
    # where its text tokenizes back to the ids the model sampled (the random
    # model often samples a character's token where the tokenizer spells the
    # character in bytes, so here it mostly does not).
    assert chat[1][1] >= chat[0][0] - 1 and chat[2][1] >= chat[1][0] - 1


def test_min_p_and_top_k_as_vllm_reads_them(server, client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=12, seed=9, logprobs=0)
    plain, _ = greedy(client)
    # min_p 1 keeps only the most likely token: sampling at any temperature
    # is then greedy; top_k -1 and 0 (vLLM's "every token") change nothing.
    for extra in [{"min_p": 1.0}, {"min_p": 1.0, "top_k": -1}]:
        choice = client.completions.create(temperature=1.5, extra_body=dict(
            ignore_eos=True, return_tokens_as_token_ids=True, **extra), **kwargs).choices[0]
        assert ids_of(choice) == plain, extra
    sampled = [ids_of(client.completions.create(temperature=1.5, extra_body=dict(
        ignore_eos=True, return_tokens_as_token_ids=True, **extra), **kwargs).choices[0])
        for extra in [{}, {"top_k": 0}, {"top_k": -1}, {"min_p": 0.0}]]
    assert sampled[0] != plain and all(s == sampled[0] for s in sampled), sampled
    for extra, fragment in [({"min_p": 1.5}, "min_p"), ({"top_k": -3}, "top_k")]:
        status, err = raw_post(server, "/v1/completions", json.dumps({"model": MODEL, "prompt": "x", **extra}).encode())
        assert status == 400 and fragment in err["error"]["message"], err


def test_allowed_tokens_truncation_and_request_ids(server, client):
    allowed = [11, 77, 200]
    ids, _ = greedy(client, allowed_token_ids=allowed)
    assert set(ids) <= set(allowed), ids
    sampled = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.5, seed=2, logprobs=0,
                                        extra_body={"allowed_token_ids": allowed, "ignore_eos": True,
                                                    "return_tokens_as_token_ids": True}).choices[0]
    assert set(ids_of(sampled)) <= set(allowed) and len(set(ids_of(sampled))) > 1, ids_of(sampled)
    # truncate_prompt_tokens keeps the prompt's end: the answer is the one
    # to those last tokens alone.
    tail, _ = greedy(client, truncate_prompt_tokens=3)
    alone = client.completions.create(model=MODEL, prompt=PROMPT[-3:], max_tokens=12, temperature=0, logprobs=0,
                                      extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    assert tail == ids_of(alone.choices[0]) and alone.usage.prompt_tokens == 3
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"truncate_prompt_tokens": -1})
    assert whole.usage.prompt_tokens == len(PROMPT)
    # A cache_salt changes which stored prefixes are shared, not the answer.
    salted, _ = greedy(client, truncate_prompt_tokens=3, cache_salt="tenant-a")
    assert salted == tail
    # request_id names the answer, streamed too.
    named = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, extra_body={"request_id": "job-42.a"})
    assert named.id == "chatcmpl-job-42.a"
    chunks = list(client.completions.create(model=MODEL, prompt="x", max_tokens=2, stream=True,
                                            extra_body={"request_id": "job-43"}))
    assert chunks and all(c.id == "cmpl-job-43" for c in chunks)
    for extra, fragment in [({"allowed_token_ids": []}, "at least one"),
                            ({"allowed_token_ids": [10**6]}, "outside the vocabulary"),
                            ({"allowed_token_ids": [1], "response_format": {"type": "json_object"}}, "combined"),
                            ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
                            ({"request_id": "two words"}, "request_id"),
                            ({"cache_salt": ""}, "cache_salt")]:
        status, err = raw_post(server, "/v1/completions", json.dumps({"model": MODEL, "prompt": "x", **extra}).encode())
        assert status == 400 and fragment in err["error"]["message"], (extra, err)


def test_echo_scores_the_prompt(server, client):
    """`echo` with `logprobs` (how evaluation harnesses score text): each
    prompt token's log-probability is the one the model gives that token
    after the tokens before it, the same bits as sampling it there."""
    scored = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True,
                                       extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True}).choices[0]
    lp = scored.logprobs
    assert ids_of(scored)[:len(PROMPT)] == PROMPT and len(lp.tokens) == len(PROMPT) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for j in range(1, len(PROMPT)):
        # The prompt's first j tokens, forced to continue with token j
        # (bias moves sampling, not the reported log-probability).
        forced = client.completions.create(model=MODEL, prompt=PROMPT[:j], max_tokens=1, temperature=0, logprobs=2,
                                           extra_body={"logit_bias": {str(PROMPT[j]): 100},
                                                       "return_tokens_as_token_ids": True}).choices[0]
        assert ids_of(forced) == [PROMPT[j]]
        assert lp.token_logprobs[j] == forced.logprobs.token_logprobs[0], j
        assert lp.top_logprobs[j] == forced.logprobs.top_logprobs[0], j
    # A long prompt is scored over several chunks (128 tokens each; the
    # forced requests below run 512 a step), each position as the forced
    # request scores it.
    long = [(7 * i + 3) % 400 + 5 for i in range(700)]
    lps = client.completions.create(model=MODEL, prompt=long, max_tokens=0, echo=True, logprobs=0).choices[0]
    assert len(lps.logprobs.token_logprobs) == 700
    for j in [1, 511, 512, 513, 699]:
        forced = client.completions.create(model=MODEL, prompt=long[:j], max_tokens=1, temperature=0, logprobs=0,
                                           extra_body={"logit_bias": {str(long[j]): 100}}).choices[0]
        assert lps.logprobs.token_logprobs[j] == forced.logprobs.token_logprobs[0], j
    # The generated part is what a request without echo gets.
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2,
                                      extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True}).choices[0]
    assert ids_of(scored)[len(PROMPT):] == ids_of(plain)
    assert lp.token_logprobs[len(PROMPT):] == plain.logprobs.token_logprobs
    assert scored.text == client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True).choices[0].text + plain.text
    # A text prompt comes back as sent; max_tokens 0 scores it only, and the
    # prompt as a list of token lists (as lm-eval sends it) is the same.
    text = "The expert-parallel cluster"
    only = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=1).choices[0]
    assert only.text == text and only.finish_reason == "length" and only.logprobs.token_logprobs[0] is None
    ids = raw_post(server, "/tokenize", json.dumps({"prompt": text}).encode())[1]["tokens"]
    nested = client.completions.create(model=MODEL, prompt=[ids], max_tokens=0, echo=True, logprobs=1).choices[0]
    assert nested.logprobs.token_logprobs == only.logprobs.token_logprobs and len(ids) == len(only.logprobs.tokens)
    # Streamed: the prompt and its log-probabilities arrive first.
    chunks = [c.choices[0] for c in client.completions.create(
        model=MODEL, prompt=text, max_tokens=4, echo=True, logprobs=1, temperature=0, stream=True) if c.choices]
    assert chunks[0].text.startswith(text) and chunks[0].logprobs.token_logprobs[0] is None
    streamed = [x for c in chunks if c.logprobs for x in c.logprobs.token_logprobs]
    whole = client.completions.create(model=MODEL, prompt=text, max_tokens=4, echo=True, logprobs=1, temperature=0)
    assert "".join(c.text for c in chunks) == whole.choices[0].text
    assert streamed == whole.choices[0].logprobs.token_logprobs
    # vLLM's prompt_logprobs: the same numbers, by token id, with ranks.
    vllm = raw_post(server, "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 2}).encode())[1]["choices"][0]
    entries = vllm["prompt_logprobs"]
    assert len(entries) == len(PROMPT) and entries[0] is None and vllm["logprobs"] is None
    for j in range(1, len(PROMPT)):
        mine = entries[j][str(PROMPT[j])]
        assert mine["logprob"] == lp.token_logprobs[j] and mine["rank"] >= 1, (j, entries[j])
        # The two most likely, and the prompt's token when it is neither.
        ranked = sorted((e["rank"], -e["logprob"]) for e in entries[j].values())
        assert [r for r, _ in ranked] == sorted({1, 2, mine["rank"]}) and ranked == sorted(ranked, key=lambda e: e[1])
    chat = raw_post(server, "/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": ASK, "max_tokens": 1, "prompt_logprobs": 0}).encode())[1]
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"] and chat["prompt_logprobs"][0] is None
    assert all(len(e) == 1 and next(iter(e.values()))["logprob"] <= 0 for e in chat["prompt_logprobs"][1:])
    for body, fragment in [({"messages": ASK, "echo": True}, "echo"),
                           ({"prompt": "x", "prompt_logprobs": 1, "stream": True}, "streamed"),
                           ({"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs"),
                           ({"prompt": "x", "max_tokens": 0}, "max_tokens")]:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        status, err = raw_post(server, path, json.dumps({"model": MODEL, **body}).encode())
        assert status == 400 and fragment in err["error"]["message"], (body, err)


def test_several_prompts_in_one_completion(server, client):
    """A list of prompts: choices in prompt order, `n` each, every one the
    answer its prompt gets alone; usage sums them."""
    texts = ["The cat", "A quiet dog walks"]
    kwargs = dict(model=MODEL, max_tokens=6, temperature=1.0, seed=3, n=2)
    both = client.completions.create(prompt=texts, **kwargs)
    alone = [client.completions.create(prompt=t, **kwargs) for t in texts]
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [c.text for a in alone for c in a.choices]
    assert both.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert both.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    # Streamed, each choice's chunks carry its index.
    texts_by_index = {}
    for chunk in client.completions.create(prompt=texts, stream=True, **kwargs):
        for c in chunk.choices:
            texts_by_index[c.index] = texts_by_index.get(c.index, "") + c.text
    assert [texts_by_index[i] for i in range(4)] == [c.text for c in both.choices]
    # Token lists, echoed: each choice starts with its own prompt.
    ids = [raw_post(server, "/tokenize", json.dumps({"prompt": t}).encode())[1]["tokens"] for t in texts]
    echoed = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, echo=True, logprobs=0)
    for c, t, i in zip(echoed.choices, texts, ids):
        assert c.text.startswith(t) and len(c.logprobs.tokens) == len(i) + 2
    for prompt, fragment in [(["fine", ""], "prompt[1]: the prompt is empty"),
                             (["x"] * 65, "1 to 64 prompts"),
                             ([[1, 2]] * 20, "sequences")]:
        extra = {"n": 16} if fragment == "sequences" else {}
        status, err = raw_post(server, "/v1/completions", json.dumps({"model": MODEL, "prompt": prompt, **extra}).encode())
        assert status == 400 and fragment in err["error"]["message"], err


def test_skip_special_tokens_false_spells_control_tokens(server, client):
    eos = 1  # the tiny model's end of sequence, kept in the answer by ignore_eos and a bias
    body = dict(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    forced = {"ignore_eos": True, "logit_bias": {str(eos): 100}}
    spelled = raw_post(server, "/detokenize", json.dumps({"model": MODEL, "tokens": [eos] * 3}).encode())[1]["prompt"]
    assert spelled
    assert client.completions.create(extra_body=forced, **body).choices[0].text == ""
    kept = client.completions.create(extra_body={**forced, "skip_special_tokens": False}, **body).choices[0].text
    assert kept == spelled


def test_return_token_ids(server, client):
    """vLLM's return_token_ids: the prompt's ids and the answer's, whole
    and streamed, the ids the text decodes from."""
    extra = {"return_token_ids": True, "ignore_eos": True}
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0,
                                      extra_body={**extra, "return_tokens_as_token_ids": True}).choices[0]
    assert whole.prompt_token_ids == PROMPT and whole.token_ids == ids_of(whole)
    chunks = [c.choices[0] for c in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6,
                                                              temperature=0, stream=True, extra_body=extra)]
    assert chunks[0].prompt_token_ids == PROMPT
    assert [t for c in chunks for t in (c.token_ids or [])] == whole.token_ids
    chat = raw_post(server, "/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": ASK, "max_tokens": 5, "temperature": 0, **extra}).encode())[1]
    tokenized = raw_post(server, "/tokenize", json.dumps({"messages": ASK}).encode())[1]["tokens"]
    assert chat["prompt_token_ids"] == tokenized and len(chat["choices"][0]["token_ids"]) == 5
    streamed = list(client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, temperature=0,
                                                   stream=True, extra_body=extra))
    assert streamed[0].prompt_token_ids == tokenized
    ids = [t for c in streamed for ch in c.choices for t in (getattr(ch, "token_ids", None) or [])]
    assert ids == chat["choices"][0]["token_ids"]


def test_continue_final_message_and_no_generation_prompt(server, client):
    """vLLM's continue_final_message: the model goes on writing the last
    (assistant) message, so the answer is what a completion of that very
    prompt writes; add_generation_prompt false ends the prompt with the
    last message."""
    partial = [*ASK, {"role": "assistant", "content": "Once upon a time"}]
    body = {"messages": partial, "continue_final_message": True, "add_generation_prompt": False}
    ids = raw_post(server, "/tokenize", json.dumps(body).encode())[1]["tokens"]
    closed = raw_post(server, "/tokenize", json.dumps({"messages": partial}).encode())[1]["tokens"]
    assert closed[:len(ids)] == ids and len(closed) == len(ids) + 1, "the same prompt without the closing EOS"
    chat = client.chat.completions.create(model=MODEL, messages=partial, max_tokens=8, temperature=0,
                                          extra_body={"continue_final_message": True, "ignore_eos": True})
    text = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert chat.choices[0].message.content == text and chat.usage.prompt_tokens == len(ids)
    # In thinking mode too the continuation is content: the reasoning closed.
    thought = client.chat.completions.create(model=MODEL, messages=partial, max_tokens=8, temperature=0,
                                             reasoning_effort="high", extra_body={"continue_final_message": True})
    assert not getattr(thought.choices[0].message, "reasoning_content", None)
    answer = raw_post(server, "/tokenize", json.dumps({"messages": ASK}).encode())[1]["tokens"]
    as_is = raw_post(server, "/tokenize", json.dumps({"messages": ASK, "add_generation_prompt": False}).encode())[1]
    assert answer[:len(as_is["tokens"])] == as_is["tokens"] and len(answer) == len(as_is["tokens"]) + 2
    for extra, fragment in [({"messages": ASK, "continue_final_message": True}, "assistant"),
                            ({"messages": partial, "continue_final_message": True, "add_generation_prompt": True},
                             "add_generation_prompt: false")]:
        status, err = raw_post(server, "/v1/chat/completions", json.dumps({"model": MODEL, **extra}).encode())
        assert status == 400 and fragment in err["error"]["message"], err


def test_thinking_token_budget_ends_the_reasoning(server, client):
    think_end = raw_post(server, "/tokenize", json.dumps({"prompt": "</think>"}).encode())[1]["tokens"]
    assert len(think_end) == 1
    kwargs = dict(model=MODEL, messages=ASK, max_tokens=40, temperature=0, reasoning_effort="high")
    free = client.chat.completions.create(extra_body={"return_token_ids": True}, **kwargs).choices[0]
    assert think_end[0] not in free.token_ids[:6], "the budget below must cut the reasoning short"
    for budget in [5, 0]:
        cut = client.chat.completions.create(
            extra_body={"return_token_ids": True, "thinking_token_budget": budget, "ignore_eos": True}, **kwargs).choices[0]
        assert cut.token_ids[:budget] == free.token_ids[:budget] and cut.token_ids[budget] == think_end[0]
        # The answer goes on past the reasoning; a budget of 0 has none.
        assert cut.message.content and (budget > 0 or cut.message.reasoning_content == "")
    status, err = raw_post(server, "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "x", "thinking_token_budget": 3}).encode())
    assert status == 400 and "chat" in err["error"]["message"], err


def test_bad_words_are_never_completed(server, client):
    """vLLM's bad_words: the token that would complete a banned word is
    masked, so the greedy answer follows the free one up to that word and
    then turns away from it."""
    plain, _ = greedy(client)
    detok = lambda ids: raw_post(server, "/detokenize", json.dumps({"model": MODEL, "tokens": ids}).encode())[1]["prompt"]
    tokenize = lambda text: raw_post(server, "/tokenize", json.dumps({"prompt": text}).encode())[1]["tokens"]
    # A two-token word of the answer that tokenizes back to those tokens.
    at, word = next((i, detok(plain[i:i + 2])) for i in range(len(plain) - 1)
                    if detok(plain[i:i + 2]).strip() and tokenize(detok(plain[i:i + 2])) == plain[i:i + 2])
    banned, _ = greedy(client, bad_words=[word])
    assert banned[:at + 1] == plain[:at + 1] and banned[at + 1] != plain[at + 1], (at, word, plain, banned)
    assert all(banned[i:i + 2] != plain[at:at + 2] for i in range(len(banned) - 1))
    status, err = raw_post(server, "/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "bad_words": [" "]}).encode())
    assert status == 400 and "bad_words" in err["error"]["message"], err
