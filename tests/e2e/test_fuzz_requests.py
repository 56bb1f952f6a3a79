"""Random and mutated request bodies against the running endpoint: every one
gets a JSON answer (a completion, or an OpenAI-style error with a 4xx
status), never a 5xx or a dropped connection, and the server keeps serving.
Deterministic (seeded); MYRIAD_FUZZ_CASES raises the number of bodies per
endpoint (default 150)."""

import json
import os
import random
import urllib.error
import urllib.request

import pytest

from test_openai_api import MODEL

CASES = int(os.environ.get("MYRIAD_FUZZ_CASES", "150"))

COMPLETION = {"model": MODEL, "prompt": "The cluster", "max_tokens": 2, "temperature": 0,
              "stop": ["\n"], "logprobs": 1, "seed": 3}
CHAT = {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 2, "temperature": 0.5, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}
ODD = [None, True, -1, 0, 1, 2.5, -1e308, 1e308, 2 ** 64, "", "x" * 300, "<｜User｜>", [], [1, "a", None], {},
       {"type": "json_schema"}, [{"role": "tool"}], float("nan")]


def odd(rng):
    value = rng.choice(ODD)
    return json.dumps(value) if isinstance(value, float) and value != value else value


def mutate(body, rng):
    """`body` with a few fields dropped, replaced by odd values (at any depth)
    or added."""
    body = json.loads(json.dumps(body))
    for _ in range(rng.randint(1, 3)):
        target, keys = body, list(body)
        # Sometimes go one level down into a list or object.
        if keys and rng.random() < 0.3:
            inner = body[rng.choice(keys)]
            if isinstance(inner, list) and inner and isinstance(inner[0], dict):
                target = rng.choice(inner)
            elif isinstance(inner, dict) and inner:
                target = inner
        keys = list(target)
        action = rng.random()
        if keys and action < 0.3:
            del target[rng.choice(keys)]
        elif keys and action < 0.85:
            target[rng.choice(keys)] = odd(rng)
        else:
            target[rng.choice(["n", "best_of", "echo", "stream", "response_format", "tool_choice", "zz"])] = odd(rng)
    # A mutated request that is valid must stay short.
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 4:
        body["max_tokens"] = 4
    return body


def raw(rng):
    blob = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
    return rng.choice([blob, b"{" + blob, b'{"model": ' + blob, b"[]", b"null", b'{"prompt": {"a": [[[[[[1]]]]]]}}'])


def post(server, path, data):
    req = urllib.request.Request(server.root_url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.parametrize("path,template", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_random_bodies_get_an_answer_or_a_4xx(server, path, template):
    rng = random.Random(path)
    statuses = {}
    for i in range(CASES):
        data = raw(rng) if i % 3 == 0 else json.dumps(mutate(template, rng)).encode()
        status, body = post(server, path, data)
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (status, data[:300], body[:300])
        if b"data: " not in body[:6]:
            answer = json.loads(body)
            if status >= 400:
                assert answer["error"]["message"], answer
    assert statuses.get(200, 0) > 0 and sum(n for s, n in statuses.items() if s >= 400) > 0, statuses
    with urllib.request.urlopen(server.root_url + "/health") as r:
        assert r.status == 200
