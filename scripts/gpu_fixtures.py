"""The model fixtures through `myriad generate` with expert workers on a GPU.

For each fixture (F32, BF16, block-FP8 and MXFP4 experts) and each of its
reference cases: the greedy tokens must be the reference's and the prompt's
last logits within 1e-4 of it; every GPU placement (1 worker, 2 workers, 3
workers with 2 replicas) must print byte-identical output; and the script
says whether the GPU output is also byte-identical to CPU workers'. Exits 1
on any failure. Run by scripts/gpu_check.sh.
"""

import json
import subprocess
import sys
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


def main():
    binary = sys.argv[1]
    failures, same_as_cpu, total = [], 0, 0
    for fixture in FIXTURES:
        expected = json.loads((ROOT / "tests" / "fixtures" / fixture / "expected.json").read_text())
        for i, case in enumerate(expected["cases"]):
            name = f"{fixture} case {i}"
            cpu = generate(binary, fixture, case, ["--workers", "2"])
            gpu = [generate(binary, fixture, case, [*p, "--device", "cuda"]) for p in GPU_PLACEMENTS]
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
    for f in failures:
        print("FAILED:", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
