"""The model fixtures through `myriad generate` with expert workers on a GPU,
and concurrent requests through `myriad up` with GPU workers.

For each fixture (F32, BF16, block-FP8 and MXFP4 experts) and each of its
reference cases: the greedy tokens must be the reference's and the prompt's
last logits within 1e-4 of it; every GPU placement (1 worker, 2 workers, 3
workers with 2 replicas) must print byte-identical output; and the script
says whether the GPU output is also byte-identical to CPU workers'. Then 16
greedy completions sent at once to `myriad up --device cuda` (so the workers
see them in batches of every composition) must equal the same requests sent
one at a time. Exits 1 on any failure. Run by scripts/gpu_check.sh; without a
GPU, `--device cpu` runs the same checks on CPU workers.
"""

import json
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ["mixed-f32", "mixed-bf16", "release-base", "release-flash"]
GPU_PLACEMENTS = [["--workers", "1"], ["--workers", "2"], ["--workers", "3", "--replicas", "2"]]


def generate(binary, fixture, case, extra):
    args = [binary, "generate", "--model", str(ROOT / "tests" / "fixtures" / fixture),
            "--prompt-ids", ",".join(map(str, case["prompt"])),
            "--max-new-tokens", str(len(case["generated"])), "--ignore-eos", "--json", *extra]
    run = subprocess.run(args, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{run.stderr}")
    return run.stdout


def completion(base_url, model, prompt):
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0}).encode()
    request = urllib.request.Request(f"{base_url}/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())["choices"][0]["text"]


def concurrent_requests(binary, device):
    """16 prompts through `myriad up` on the bundled model, one at a time and
    then all at once: (solo texts, concurrent texts)."""
    proc = subprocess.Popen([binary, "up", "--listen", "127.0.0.1:0", "--workers", "2", "--device", device],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("Myriad is up: "):
            raise SystemExit(f"myriad up --device {device} did not start: {line!r}")
        base_url, model = line.split()[3], line.split("`")[1]
        prompts = [f"Story number {i}:" for i in range(16)]
        solo = [completion(base_url, model, p) for p in prompts]
        together = [None] * len(prompts)

        def run(i):
            together[i] = completion(base_url, model, prompts[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return solo, together
    finally:
        proc.kill()
        proc.wait()


def main():
    binary = sys.argv[1]
    device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda"
    failures, same_as_cpu, total = [], 0, 0
    for fixture in FIXTURES:
        expected = json.loads((ROOT / "tests" / "fixtures" / fixture / "expected.json").read_text())
        for i, case in enumerate(expected["cases"]):
            name = f"{fixture} case {i}"
            cpu = generate(binary, fixture, case, ["--workers", "2"])
            gpu = [generate(binary, fixture, case, [*p, "--device", device]) for p in GPU_PLACEMENTS]
            if any(out != gpu[0] for out in gpu):
                failures.append(f"{name}: GPU placements print different bytes")
            got = json.loads(gpu[0])
            if got["generated"] != case["generated"]:
                failures.append(f"{name}: greedy tokens {got['generated']} != reference {case['generated']}")
            worst = max(abs(a - b) for a, b in zip(got["prompt_last_logits"], case["prompt_last_logits"]))
            if worst >= 1e-4:
                failures.append(f"{name}: prompt logits differ from the reference by {worst:.2e}")
            total += 1
            same_as_cpu += gpu[0] == cpu
            print(f"{name}: logits within {worst:.1e} of the reference; GPU output "
                  f"{'byte-identical to' if gpu[0] == cpu else 'differs from'} CPU workers'", flush=True)
    print(f"{same_as_cpu} of {total} cases byte-identical between GPU and CPU workers")
    solo, together = concurrent_requests(binary, device)
    differ = [i for i, (a, b) in enumerate(zip(solo, together)) if a != b]
    print(f"myriad up --device {device}: {len(solo) - len(differ)} of {len(solo)} concurrent completions "
          "equal to their solo runs", flush=True)
    if differ:
        failures.append(f"concurrent completions {differ} differ from their solo runs")
    for f in failures:
        print("FAILED:", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
