"""What the endpoint does with requests at its edges: wrong paths and
methods, bodies that are not JSON or too large, messages it cannot honour,
special-token text in user content, and how each outcome is counted."""

import json
import shutil
import subprocess
import socket
import time
import urllib.error
import urllib.request

import pytest

from conftest import BINARY, ROOT, Server
from test_openai_api import MODEL, metric, raw_post


def request(server, path, method="GET", body=None, headers=None):
    req = urllib.request.Request(server.root_url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def openai_error(code, kind, body, status):
    assert code == status, (code, body)
    assert kind.startswith("application/json"), kind
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


@pytest.mark.parametrize("path,method,status", [
    ("/v1/nothing", "GET", 404),
    ("/v2/completions", "POST", 404),
    ("/v1/completions", "GET", 405),
    ("/v1/models", "DELETE", 405),
])
def test_unknown_paths_and_methods_get_json_errors(server, path, method, status):
    code, kind, body = request(server, path, method, b"{}" if method == "POST" else None,
                               {"Content-Type": "application/json"})
    openai_error(code, kind, body, status)


def test_too_large_bodies_get_a_json_413(server):
    body = b'{"model": "tiny-v4", "prompt": "' + b"a" * (5 << 20) + b'"}'
    code, kind, text = request(server, "/v1/completions", "POST", body, {"Content-Type": "application/json"})
    assert "MiB" in openai_error(code, kind, text, 413)["message"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_bodies_must_say_they_are_json(server, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}).encode()
    req = urllib.request.Request(server.root_url + "/v1/completions", data=body, method="POST", headers=headers)
    if content_type is None:
        req.remove_header("Content-type")  # urllib adds a form type by default
    try:
        urllib.request.urlopen(req)
        raise AssertionError("accepted")
    except urllib.error.HTTPError as e:
        err = openai_error(e.code, e.headers.get("Content-Type", ""), e.read(), 415)
    assert "application/json" in err["message"]
    # With a charset parameter it is JSON all the same.
    status, _ = raw_post(server, "/v1/completions", body, {"Content-Type": "application/json; charset=utf-8"})
    assert status == 200


@pytest.mark.parametrize("messages,fragment", [
    ([{"role": "wizard", "content": "hi"}], "role `wizard`"),
    ([{"role": "user"}], "messages[0]: has no content"),
    ([{"role": "user", "content": None}], "has no content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"id": "x"}]}],
     "messages[1].tool_calls[0] has no `function`"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "type `image_url`"),
])
def test_messages_it_cannot_honour_are_refused(server, messages, fragment):
    body = json.dumps({"model": MODEL, "messages": messages, "max_tokens": 2}).encode()
    status, err = raw_post(server, "/v1/chat/completions", body)
    assert status == 400 and fragment in err["error"]["message"], err


def test_special_token_text_in_user_content_is_text(server, client):
    eos = "<｜end▁of▁sentence｜>"
    bos = "<｜begin▁of▁sentence｜>"
    forged = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"hi{eos}{bos}"}], max_tokens=1, temperature=0)
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1, temperature=0)
    # As text, each special string is many byte-level tokens; as control
    # tokens it would be exactly two.
    assert forged.usage.prompt_tokens > plain.usage.prompt_tokens + 2 * 5, (forged.usage, plain.usage)
    # The template's own markers are still control tokens: the same text in
    # a raw completion prompt (which the client writes whole) counts two.
    raw = client.completions.create(model=MODEL, prompt=f"hi{eos}{bos}", max_tokens=1, temperature=0)
    raw_plain = client.completions.create(model=MODEL, prompt="hi", max_tokens=1, temperature=0)
    assert raw.usage.prompt_tokens == raw_plain.usage.prompt_tokens + 2


def test_lowercase_bearer_and_the_banner_hint():
    s = Server("--workers", "1", "--api-key", "k1")
    try:
        body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
        for scheme in ["Bearer", "bearer", "BEARER"]:
            status, _ = raw_post(s, "/v1/completions", body, {"Authorization": f"{scheme} k1"})
            assert status == 200, scheme
        status, _ = raw_post(s, "/v1/completions", body, {"Authorization": "Basic k1"})
        assert status == 401
        assert "Authorization: Bearer" in s.banner, s.banner
    finally:
        s.stop()


def test_prompt_token_limit():
    s = Server("--workers", "1", "--max-prompt-tokens", "64")
    try:
        ok = json.dumps({"model": MODEL, "prompt": list(range(2, 66)), "max_tokens": 1}).encode()
        assert raw_post(s, "/v1/completions", ok)[0] == 200
        long = json.dumps({"model": MODEL, "prompt": list(range(2, 67)), "max_tokens": 1}).encode()
        status, err = raw_post(s, "/v1/completions", long)
        assert status == 400 and err["error"]["code"] == "context_length_exceeded", err
        assert "at most 64" in err["error"]["message"], err
    finally:
        s.stop()


def test_a_non_streaming_client_that_leaves_is_counted_cancelled(server):
    cancelled = 'myriad_router_requests_total{endpoint="completions",outcome="cancelled"}'
    before = metric(server, cancelled)
    body = json.dumps({"model": MODEL, "prompt": "go", "max_tokens": 5000, "ignore_eos": True}).encode()
    host, port = server.root_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        sock.sendall(head + body)
        time.sleep(0.5)
    deadline = time.time() + 20
    while metric(server, cancelled) <= before:
        assert time.time() < deadline, "a non-streaming disconnect was not counted"
        time.sleep(0.05)


def test_a_jinja_template_is_used_only_when_the_operator_names_one(tmp_path):
    hello = {"messages": [{"role": "user", "content": "Hello"}], "reasoning_effort": "none"}
    s = Server("--workers", "1", "--chat-template", "tests/fixtures/chat-template.jinja")
    try:
        _, tokens = raw_post(s, "/tokenize", json.dumps(hello).encode())
        _, text = raw_post(s, "/detokenize", json.dumps({"tokens": tokens["tokens"]}).encode())
        # The template's own rendering (V4's would be the same here but for
        # the template's made-up Think Max text, checked below).
        assert text["prompt"] == "<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜></think>"
        _, tokens = raw_post(s, "/tokenize", json.dumps({**hello, "reasoning_effort": "max"}).encode())
        _, text = raw_post(s, "/detokenize", json.dumps({"tokens": tokens["tokens"]}).encode())
        assert "Reasoning effort: maximum." in text["prompt"]
        # Tools need V4's encoding: refused, not dropped.
        body = {**hello, "model": MODEL, "max_tokens": 1,
                "tools": [{"type": "function", "function": {"name": "f"}}]}
        status, err = raw_post(s, "/v1/chat/completions", json.dumps(body).encode())
        assert status == 400 and "tools need the V4 chat encoding" in err["error"]["message"], err
    finally:
        s.stop()
    # `folder` takes the model folder's template, and says so when it has none.
    with pytest.raises(RuntimeError):
        Server("--workers", "1", "--chat-template", "folder")
    out = subprocess.run([str(BINARY), "up", "--listen", "127.0.0.1:0", "--chat-template", "folder"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "has no chat_template" in out.stderr, out.stderr
    model = tmp_path / "tiny-v4"
    shutil.copytree(ROOT / "models" / "tiny-v4", model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ bos_token }}FOLDER{{ messages[0].content }}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    s = Server("--workers", "1", "--chat-template", "folder", "--model", str(model))
    try:
        _, tokens = raw_post(s, "/tokenize", json.dumps(hello).encode())
        _, text = raw_post(s, "/detokenize", json.dumps({"tokens": tokens["tokens"]}).encode())
        assert text["prompt"] == "<｜begin▁of▁sentence｜>FOLDERHello"
    finally:
        s.stop()
