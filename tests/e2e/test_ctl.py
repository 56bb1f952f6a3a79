"""`myriad ctl` against `myriad up`: found without flags, every command, and
errors that say what was tried and why it failed."""

import json
import re
import subprocess
import threading
import time

from conftest import BINARY, ROOT, Server

MODEL = "tiny-v4"


def ctl(server, *args, env=None):
    """Runs `myriad ctl ARGS` with the server's state file and no address."""
    run_env = {**server.env, **(env or {})}
    return subprocess.run([str(BINARY), "ctl", *args], cwd=ROOT, env=run_env, capture_output=True, text=True,
                          timeout=120)


def ok(server, *args):
    out = ctl(server, *args)
    assert out.returncode == 0, (args, out.stderr)
    return out.stdout


def failure(out):
    """The error line of a failed invocation: never empty, never bare."""
    assert out.returncode != 0, out.stdout
    lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert lines and re.match(r"error: \S.{20,}", lines[-1]), out.stderr
    return lines[-1]


def version(server):
    return json.loads(ok(server, "--json", "status"))["placement_version"]


def test_every_ctl_command_works_on_myriad_up():
    s = Server("--workers", "2", "--admin-listen", "127.0.0.1:0")
    try:
        assert s.admin and s.state_file.exists()
        recorded = json.loads(s.state_file.read_text())
        assert recorded["admin"] == s.admin and recorded["api"] == s.base_url
        status = json.loads(ok(s, "--json", "status"))
        assert status["leader"] == "coordinator-0" and status["placement_version"] >= 1 and not status["problems"]
        ids = {n["id"] for n in status["nodes"]}
        assert {"worker-0", "worker-1", "router-0"} <= ids
        # Workers say where their experts live; other roles have no device.
        devices = {n["id"]: n["device"] for n in status["nodes"]}
        assert devices["worker-0"] == devices["worker-1"] == "cpu" and devices["router-0"] == ""
        table = ok(s, "nodes")
        assert "DEVICE" in table and "worker-1" in table
        assert "worker-0" in ok(s, "placement")
        client = s.client()
        prompt = "The quick brown fox"
        reference = client.completions.create(model=MODEL, prompt=prompt, max_tokens=48, temperature=0,
                                              extra_body={"ignore_eos": True}).choices[0].text
        # The load the coordinator collects shows up in top-experts.
        deadline = time.time() + 30
        while time.time() < deadline:
            top = json.loads(ok(s, "--json", "top-experts", "--limit", "3"))
            if sum(e["tokens"] for e in top["experts"]) > 0:
                break
            time.sleep(0.5)
        assert len(top["experts"]) == 3 and sum(e["tokens"] for e in top["experts"]) > 0, top
        assert "LAYER EXPERT" in ok(s, "top-experts", "--limit", "3")
        # The whole load matrix, which `myriad plan --load` places offline.
        config = json.loads((ROOT / "models" / MODEL / "config.json").read_text())
        load = json.loads(ok(s, "load"))
        assert (load["layers"], load["experts"]) == (config["num_hidden_layers"], config["n_routed_experts"])
        assert len(load["tokens"]) == load["layers"] and sum(map(sum, load["tokens"])) > 0, load
        load_file = s.state_file.parent / "load.json"
        load_file.write_text(json.dumps(load))
        planned = subprocess.run([str(BINARY), "plan", "--config", str(ROOT / "models" / MODEL / "config.json"),
                                  "--workers", "2", "--capacity", "1GiB", "--redundant", "2", "--load",
                                  str(load_file)], capture_output=True, text=True, timeout=120)
        assert planned.returncode == 0 and "load-aware" in planned.stdout, planned.stderr
        assert "balancedness" in ok(s, "rebalance", "--dry-run").lower()
        # A rebalance while a request streams: a new placement version, and
        # the stream's answer is the same as before it.
        before = version(s)
        streamed = []
        def stream():
            chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=48, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
            streamed.append("".join(c.choices[0].text for c in chunks if c.choices))
        t = threading.Thread(target=stream)
        t.start()
        ok(s, "rebalance")
        t.join()
        assert streamed == [reference]
        deadline = time.time() + 60
        while version(s) == before and time.time() < deadline:
            time.sleep(0.2)
        assert version(s) > before
        # Drain an in-process worker, then bring it back.
        ok(s, "drain", "worker-1")
        nodes = {n["id"]: n for n in json.loads(ok(s, "--json", "status"))["nodes"]}
        assert nodes["worker-1"]["cordoned"] and nodes["worker-1"]["load_failure"] is None
        assert next(l for l in ok(s, "nodes").splitlines() if l.startswith("worker-1 ")).endswith(" cordoned")
        placement = json.loads(ok(s, "--json", "placement"))
        assert all(w["node"] != "worker-1" or not w["experts"] for w in placement["workers"]), placement
        assert client.completions.create(model=MODEL, prompt=prompt, max_tokens=48, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text == reference
        ok(s, "uncordon", "worker-1")
        ok(s, "cordon", "worker-0")
        assert {n["id"]: n for n in json.loads(ok(s, "--json", "status"))["nodes"]}["worker-0"]["cordoned"]
        assert ok(s, "uncordon", "worker-0").strip() == "worker-0 uncordoned"
        assert ok(s, "uncordon", "worker-0").strip() == "worker-0 was not cordoned"
        # A cordon of a node id nobody registered (a typo?) is said to be one.
        assert "no worker of that id is registered" in ok(s, "cordon", "worker-9")
        assert json.loads(ok(s, "--json", "cordon", "worker-9"))["changed"] is False
        ok(s, "uncordon", "worker-9")
        assert "memory" in ok(s, "kvcache")
        # Errors name what was tried: the HTTP port, a worker's port, a dead one.
        http_port = s.root_url.removeprefix("http://")
        line = failure(ctl(s, "--coordinator", http_port, "status"))
        assert http_port in line and "not answer as a Myriad coordinator API" in line
        worker = next(n["addr"] for n in status["nodes"] if n["id"] == "worker-0")
        for other in (worker, recorded["kvcache"]):
            assert "not answer as a Myriad coordinator API" in failure(ctl(s, "--coordinator", other, "status"))
        assert "not answer as a Myriad KV-cache API" in failure(ctl(s, "kvcache", "--kvcache", s.admin))
        line = failure(ctl(s, "--coordinator", "127.0.0.1:1", "status"))
        assert "cannot reach the coordinator at 127.0.0.1:1" in line and "refused" in line.lower()
    finally:
        s.stop()
    # Stopped with SIGKILL, the state file stays behind but is recognised
    # as stale: ctl goes to the default address (which another test's
    # server may hold), never to the dead one's.
    assert s.state_file.exists()
    out = ctl(s, "status")
    assert s.admin not in out.stderr + out.stdout
    assert out.returncode == 0 or "127.0.0.1:7200 (the default of `myriad up`" in failure(out)


def test_tokens_and_errors_are_named():
    s = Server("--workers", "1", "--admin-listen", "127.0.0.1:0", "--admin-token", "s3cret")
    try:
        assert "wants a token" in failure(ctl(s, "status"))
        assert "refused the token" in failure(ctl(s, "--token", "nope", "status"))
        assert "placement" in ok(s, "--token", "s3cret", "status")
        assert "leader" in ctl(s, "status", env={"MYRIAD_ADMIN_TOKEN": "s3cret"}).stdout
    finally:
        s.stop()
    # Other failures of the binary: every one says something.
    for args in (["ctl", "--coordinator", "not an address", "status"], ["ctl", "kvcache", "--kvcache", "127.0.0.1:1"],
                 ["generate", "--model", "/nonexistent", "--prompt", "x"], ["up", "--workers", "0"],
                 ["bench", "--url", "http://127.0.0.1:1", "--requests", "1"], ["plan", "--config", "/nonexistent"]):
        out = subprocess.run([str(BINARY), *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={**s.env, "MYRIAD_UP_STATE": str(s.state_file) + ".none"})
        failure(out)


def test_generate_reads_long_prompts_from_a_file(tmp_path):
    """A prompt longer than a command line may be: ids from a file give the
    same output as the same ids given inline."""
    ids = [5, 17, 42, 300, 7, 99, 8, 250]
    path = tmp_path / "ids.txt"
    path.write_text(" ".join(map(str, ids[:4])) + "\n" + ",".join(map(str, ids[4:])) + "\n")
    run = lambda *a: subprocess.run([str(BINARY), "generate", "--max-new-tokens", "8", *a], cwd=ROOT,
                                    capture_output=True, text=True, timeout=120)
    inline, from_file = run("--prompt-ids", ",".join(map(str, ids))), run("--prompt-ids-file", str(path))
    assert inline.returncode == 0 and from_file.stdout == inline.stdout, (inline.stderr, from_file.stderr)
    path.write_text("5,x")
    assert "`x` is not a token id" in failure(run("--prompt-ids-file", str(path)))
    assert "nonexistent" in failure(run("--prompt-ids-file", "/nonexistent"))
