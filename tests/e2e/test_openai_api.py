"""The OpenAI-compatible endpoint of `myriad up`, through the official client."""

import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import openai
import pytest

from conftest import BINARY, ROOT, Server

MODEL = "tiny-v4"
HELLO = [{"role": "user", "content": "Hello there"}]


def generate_cli(prompt, n):
    """The single-process reference run: `myriad generate` greedy output text."""
    out = subprocess.run(
        [str(BINARY), "generate", "--prompt", prompt, "--max-new-tokens", str(n)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    return out.stdout.removesuffix("\n")


def test_models_health_ready_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    with urllib.request.urlopen(server.root_url + "/v1/models") as r:
        assert json.loads(r.read())["data"][0]["max_model_len"] == 32768  # myriad up's default
    for path, body in [("/health", "ok"), ("/ready", "ready")]:
        with urllib.request.urlopen(server.root_url + path) as r:
            assert r.status == 200 and r.read().decode() == body
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=2, temperature=0)
    with urllib.request.urlopen(server.root_url + "/metrics") as r:
        text = r.read().decode()
    for name in ["myriad_router_requests_total", "myriad_router_time_to_first_token_seconds",
                 "myriad_router_tokens_total", "myriad_router_dispatch_calls_total", "myriad_router_batch_size",
                 "myriad_router_expert_tokens_total{expert=", "myriad_router_dispatch_latency_seconds_bucket",
                 "myriad_router_inter_token_latency_seconds", "myriad_router_queue_depth"]:
        assert name in text, name
    # The two in-process workers export a series each, labelled with their node ids.
    samples = dict(l.rsplit(" ", 1) for l in text.splitlines() if l.startswith("myriad_worker_"))
    for worker in ["worker-0", "worker-1"]:
        assert samples[f'myriad_worker_ready{{worker="{worker}"}}'] == "1", samples
        assert float(samples[f'myriad_worker_placement_version{{worker="{worker}"}}']) >= 1, samples
        assert float(samples[f'myriad_worker_expert_bytes{{worker="{worker}"}}']) > 0, samples
    pairs = [float(v) for k, v in samples.items() if k.startswith("myriad_worker_pairs_total{")]
    assert len(pairs) == 2 and sum(pairs) > 0, samples


def test_greedy_completion_equals_myriad_generate(client):
    prompt = "The quick brown fox"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == generate_cli(prompt, 12)
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_equals_non_streaming(client):
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    # vLLM's continuous_usage_stats: every chunk says the usage so far.
    stream = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=10, temperature=0, stream=True, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    counts = []
    for chunk in stream:
        assert chunk.usage and chunk.usage.prompt_tokens == whole.usage.prompt_tokens, chunk
        assert chunk.usage.total_tokens == chunk.usage.prompt_tokens + chunk.usage.completion_tokens
        counts.append(chunk.usage.completion_tokens)
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] == 10, counts
    with pytest.raises(openai.BadRequestError, match="include_usage"):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, stream=True,
                                       stream_options={"continuous_usage_stats": True})


def test_completion_stream_and_seeded_sampling(client):
    chunks = client.completions.create(model=MODEL, prompt="Once", max_tokens=8, temperature=0, stream=True)
    streamed = "".join(c.choices[0].text for c in chunks)
    whole = client.completions.create(model=MODEL, prompt="Once", max_tokens=8, temperature=0)
    assert streamed == whole.choices[0].text
    a, b = (client.completions.create(model=MODEL, prompt="Once", max_tokens=16, temperature=1.0, seed=5)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text


def test_reasoning_modes(client):
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0,
                                           extra_body={"reasoning_effort": "none"})
    assert getattr(plain.choices[0].message, "reasoning_content", None) is None
    for effort in ["high", "max"]:
        r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0,
                                           extra_body={"reasoning_effort": effort})
        msg = r.choices[0].message
        # The random tiny model never closes </think>: all of it is reasoning.
        assert msg.reasoning_content and msg.content == ""
    kw = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0,
                                        extra_body={"chat_template_kwargs": {"thinking": True}})
    high = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0,
                                          extra_body={"reasoning_effort": "high"})
    assert kw.choices[0].message.reasoning_content == high.choices[0].message.reasoning_content
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0, stream=True,
                                            extra_body={"reasoning_effort": "high"})
    streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in stream if c.choices)
    assert streamed == high.choices[0].message.reasoning_content


def test_stop_strings(client):
    full = client.completions.create(model=MODEL, prompt="The", max_tokens=16, temperature=0).choices[0].text
    stop = full[5:7]
    cut = client.completions.create(model=MODEL, prompt="The", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    # vLLM's include_stop_str_in_output keeps it, streamed or not.
    kept = dict(model=MODEL, prompt="The", max_tokens=16, temperature=0, stop=[stop],
                extra_body={"include_stop_str_in_output": True})
    whole = full[: full.index(stop) + len(stop)]
    assert client.completions.create(**kept).choices[0].text == whole
    assert "".join(c.choices[0].text for c in client.completions.create(stream=True, **kept) if c.choices) == whole


def raw_post(server, path, body, headers=None):
    req = urllib.request.Request(server.root_url + path, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body,status,fragment", [
    (b"{not json", 400, "invalid request body"),
    (b'{"model": "tiny-v4", "prompt": "x", "max_tokens": "many"}', 400, "invalid type"),
    (b'{"model": "tiny-v4", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"model": "tiny-v4", "prompt": "x", "max_tokens": 99999999}', 400, "context"),
    (b'{"model": "tiny-v4", "prompt": "x", "temperature": 7}', 400, "temperature"),
    (b'{"model": "tiny-v4", "prompt": "x", "n": 17}', 400, "n must be between 1 and 16"),
    (b'{"model": "tiny-v4", "prompt": [1, 2, 99999]}', 400, "vocabulary"),
    (b'{"model": "gpt-9", "prompt": "x"}', 404, "does not exist"),
    (b'{"model": "tiny-v4", "prompt": "x", "logprobs": true}', 400, "logprobs must be a number"),
    (b'{"model": "tiny-v4", "prompt": "x", "presence_penalty": 2.5}', 400, "presence_penalty 2.5 is not in"),
    (b'{"model": "tiny-v4", "prompt": "x", "logit_bias": {"99999": 1}}', 400, "outside the vocabulary"),
    (b'{"model": "tiny-v4", "prompt": "x", "best_of": 2}', 400, "`best_of` is not supported"),
])
def test_bad_requests_get_openai_errors(server, body, status, fragment):
    code, err = raw_post(server, "/v1/completions", body)
    assert code == status and fragment in err["error"]["message"], err
    assert set(err["error"]) == {"message", "type", "param", "code"}


def test_errors_through_the_client(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="word " * 600_000, max_tokens=4)


def test_unsupported_chat_fields_are_refused_not_ignored(client):
    asks = [
        {"audio": {"voice": "alloy", "format": "wav"}},
        {"modalities": ["text", "audio"]},
        {"prediction": {"type": "content", "content": "x"}},
        {"functions": [{"name": "f"}]},
        {"web_search_options": {}},
        {"kv_transfer_params": {"do_remote_prefill": True}},
        {"length_penalty": 0.5},
        {"spaces_between_special_tokens": False},
        {"use_beam_search": True},
    ]
    for ask in asks:
        field = next(iter(ask))
        with pytest.raises(openai.BadRequestError, match=f"`{field}` is not supported"):
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, extra_body=ask)
    # Defaults that ask for nothing are accepted.
    ok = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, tools=[], presence_penalty=0,
                                        logprobs=False, response_format={"type": "text"}, modalities=["text"],
                                        extra_body={"skip_special_tokens": True, "priority": 0})
    assert ok.choices[0].message.content is not None


def test_tokenize_shows_the_prompt_a_request_sees(server, client):
    code, text = raw_post(server, "/tokenize", json.dumps({"prompt": "Hello there"}).encode())
    assert code == 200 and text["count"] == len(text["tokens"]) and text["max_model_len"] == 32768
    code, back = raw_post(server, "/detokenize", json.dumps({"model": MODEL, "tokens": text["tokens"]}).encode())
    assert code == 200 and back == {"prompt": "Hello there"}
    # A chat's messages: the ids are exactly the prompt a chat request runs on.
    body = {"messages": HELLO, "reasoning_effort": "high"}
    code, chat = raw_post(server, "/tokenize", json.dumps(body).encode())
    assert code == 200, chat
    answer = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0,
                                            reasoning_effort="high")
    assert answer.usage.prompt_tokens == chat["count"]
    same = client.completions.create(model=MODEL, prompt=chat["tokens"], max_tokens=8, temperature=0)
    assert same.choices[0].text == answer.choices[0].message.reasoning_content + (
        "</think>" + answer.choices[0].message.content if answer.choices[0].message.content else "")
    for path, body, status, fragment in [
        ("/detokenize", {"tokens": [1, 10**6]}, 400, "outside the vocabulary"),
        ("/tokenize", {"model": "gpt-9", "prompt": "x"}, 404, "does not exist"),
        ("/tokenize", {"messages": HELLO, "tools": [{"type": "function"}]}, 400, "tools[0]: has no `function`"),
        ("/tokenize", {"nothing": 1}, 400, "prompt"),
    ]:
        code, err = raw_post(server, path, json.dumps(body).encode())
        assert code == status and fragment in err["error"]["message"], (path, body, err)


def test_tokenize_reproduces_the_reference_encoders_prompts(server):
    """Every golden prompt of DeepSeek's reference encoder, through the
    tokenizer and back: the prompt a chat request runs on is V4's own."""
    cases = json.loads((ROOT / "tests/fixtures/v4-chat/encode.json").read_text())
    effort = {"chat": "none", "thinking": "high", "thinking_max": "max"}
    for case in cases:
        body = {"messages": case["messages"], "reasoning_effort": effort[case["mode"]]}
        if case["tools"]:
            body["tools"] = case["tools"]
        code, tokens = raw_post(server, "/tokenize", json.dumps(body).encode())
        assert code == 200, (case["name"], tokens)
        code, text = raw_post(server, "/detokenize", json.dumps({"tokens": tokens["tokens"]}).encode())
        assert code == 200 and text["prompt"] == case["expected_prompt"], case["name"]
        # The encoder's markup is one token each; the client's text is text.
        assert tokens["tokens"][0] == 0 and tokens["tokens"].count(0) == 1, case["name"]


def test_oversized_body_is_refused(server):
    # A client that sends its whole body before reading the reply (urllib)
    # gets the 413, not a connection reset.
    req = urllib.request.Request(server.root_url + "/v1/completions", method="POST",
                                 data=b'{"model": "tiny-v4", "prompt": "' + b"a" * (5 << 20) + b'"}',
                                 headers={"Content-Type": "application/json"})
    for _ in range(3):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 413
        assert e.value.headers["Content-Type"] == "application/json"
    # One that waits for `100 Continue` is refused before it sends anything.
    host, port = urllib.parse.urlsplit(server.root_url).netloc.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as c:
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (5 << 20))
        assert c.recv(4096).startswith(b"HTTP/1.1 413")


def test_api_keys():
    s = Server("--workers", "1", "--api-key", "k1,k2")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        assert s.client(api_key="k2").completions.create(model=MODEL, prompt="hi", max_tokens=2).choices
    finally:
        s.stop()


def test_32_concurrent_streams_equal_their_solo_runs(client):
    prompts = [f"Story number {i}:" for i in range(32)]
    solo = [client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0).choices[0].text
            for p in prompts]
    results = [None] * len(prompts)

    def run(i):
        chunks = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=12, temperature=0, stream=True)
        results[i] = "".join(c.choices[0].text for c in chunks)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == solo


def test_a_full_queue_answers_429():
    s = Server("--workers", "1", "--max-batch", "1", "--max-queue", "1")
    codes = []
    lock = threading.Lock()

    def run():
        try:
            s.client().completions.create(model=MODEL, prompt="busy " * 40, max_tokens=200, temperature=0)
            code = 200
        except openai.RateLimitError:
            code = 429
        with lock:
            codes.append(code)

    try:
        threads = [threading.Thread(target=run) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        s.stop()
    assert 429 in codes and 200 in codes, codes


def test_bench_reports_throughput_and_latency(server):
    out = subprocess.run(
        [str(BINARY), "bench", "--url", server.root_url, "--concurrency", "4", "--requests", "8",
         "--prompt-len", "16", "--max-tokens", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    assert "requests: 8 ok, 0 failed" in out, out
    for line in ["throughput:", "time to first token: p50", "inter-token latency: p50"]:
        assert line in out, out


def metric(server, name):
    with urllib.request.urlopen(server.root_url + "/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return 0.0


def test_client_disconnect_cancels_the_sequence(server):
    cancelled = 'myriad_router_requests_total{endpoint="completions",outcome="cancelled"}'
    produced = 'myriad_router_tokens_total{kind="completion"}'
    before = metric(server, cancelled)
    body = json.dumps({"model": MODEL, "prompt": "go", "max_tokens": 30000, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(server.root_url + "/v1/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    r = urllib.request.urlopen(req)
    assert r.readline().startswith(b"data: ")
    r.close()
    deadline = time.time() + 20
    while metric(server, cancelled) <= before:
        assert time.time() < deadline, "the server never noticed the client left"
        time.sleep(0.05)
    # The engine dropped the sequence: no more tokens are produced for it.
    time.sleep(0.3)
    settled = metric(server, produced)
    time.sleep(0.5)
    assert metric(server, produced) == settled


def test_ignore_eos_produces_exactly_max_tokens(client):
    r = client.completions.create(model=MODEL, prompt="go", max_tokens=300, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 300 and r.choices[0].finish_reason == "length"
