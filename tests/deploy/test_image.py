"""The container build, checked without a Docker daemon: the build context
that `.dockerignore` leaves holds everything `deploy/Dockerfile` copies and
everything cargo needs to build the binary, and the runtime stage runs the
binary the build stage makes, as a non-root user, with the model path the
chart's defaults expect.
"""

import fnmatch
import os
import pathlib
import re
import shutil
import subprocess
import tomllib

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def ignore_rules():
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        rules.append((negate, pattern))
    return rules


def matches(pattern, path):
    """Docker's rule: a pattern matches a path or any of its parent folders;
    `**` matches any number of folders."""
    regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
    parts = path.split("/")
    return any(re.fullmatch(regex, "/".join(parts[:end])) for end in range(1, len(parts) + 1))


def excluded(path, rules):
    result = False
    for negate, pattern in rules:
        if matches(pattern, path):
            result = not negate
    return result


def context_files():
    """The files `docker build .` sends from the repository root."""
    rules = ignore_rules()
    files = set()
    for folder, dirs, names in os.walk(ROOT):
        rel = pathlib.Path(folder).relative_to(ROOT).as_posix()
        rel = "" if rel == "." else rel + "/"
        dirs[:] = [d for d in dirs if not excluded(rel + d, rules)]
        files.update(rel + n for n in names if not excluded(rel + n, rules))
    return files


def stages():
    """Each stage of the Dockerfile: (name, base, instructions)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            base, _, name = rest.partition(" AS ")
            out.append({"name": name.strip(), "base": base.strip(), "steps": []})
        elif out:
            out[-1]["steps"].append((word.upper(), rest.strip()))
    return out


def test_docker_ignore_matching_follows_docker_rules():
    assert matches("target", "target/debug/myriad")
    assert matches("**/target", "cli/target/x")
    assert matches("**/*.md", "README.md") and matches("**/*.md", "docs/adr/0001.md")
    assert not matches("tests", "cli/tests/cluster.rs")
    assert not matches("target", "cli/src/target.rs")


def test_the_context_holds_what_cargo_needs_and_little_else():
    files = context_files()
    workspace = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]
    for required in ["Cargo.toml", "Cargo.lock", "rustfmt.toml"]:
        assert required in files
    for member in workspace["members"]:
        manifest = tomllib.loads((ROOT / member / "Cargo.toml").read_text())
        assert f"{member}/Cargo.toml" in files
        tracked = [p.relative_to(ROOT).as_posix() for p in (ROOT / member / "src").rglob("*.rs")]
        assert tracked and all(p in files for p in tracked), member
        if (ROOT / member / "build.rs").exists():
            assert f"{member}/build.rs" in files
        # Declared targets must exist, or cargo refuses the manifest.
        for kind in ("bench", "bin", "test", "example"):
            for target in manifest.get(kind, []):
                path = target.get("path") or {"bench": "benches", "test": "tests", "example": "examples"}.get(kind, "src/bin")
                if "path" not in target:
                    path = f"{path}/{target['name']}.rs" if kind != "bin" or target["name"] != manifest["package"]["name"] else "src/main.rs"
                assert f"{member}/{path}" in files, f"{member}: {kind} {target['name']}"
    # The build scripts' inputs: every .proto file.
    protos = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.proto") if "target" not in p.parts]
    assert protos and all(p in files for p in protos)
    # The bundled model, whole.
    model = [p.relative_to(ROOT).as_posix() for p in (ROOT / "models" / "tiny-v4").iterdir()]
    assert all(p in files for p in model)
    # Nothing the image does not need: builds, history, fixtures, the chart.
    for unwanted in ["target/", ".git/", "tests/fixtures/", "helm/", "docs/"]:
        assert not [f for f in files if f.startswith(unwanted)], unwanted
    size = sum((ROOT / f).stat().st_size for f in files)
    assert size < 64 << 20, f"build context is {size >> 20} MiB"


def test_cargo_accepts_the_context_as_a_workspace(tmp_path):
    """What the build stage sees, copied file by file: cargo reads every
    manifest, the lock file and the declared targets without complaint."""
    cargo = shutil.which("cargo")
    if cargo is None:
        pytest.skip("cargo is not installed")
    for f in context_files():
        dest = tmp_path / f
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest)
    host = re.search(r"host: (\S+)", subprocess.run(["rustc", "-vV"], capture_output=True, text=True).stdout).group(1)
    run = subprocess.run(
        [cargo, "metadata", "--locked", "--offline", "--format-version", "1", "--filter-platform", host],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert '"name":"myriad"' in run.stdout


def test_the_runtime_stage_runs_the_built_binary_unprivileged():
    build, runtime = stages()
    assert build["name"] == "build" and runtime["name"] == "runtime"
    runs = " ".join(rest for word, rest in build["steps"] if word == "RUN")
    assert "cargo build --release --locked -p myriad" in runs
    # FEATURES=cuda builds the GPU workers' binary; its feature must exist.
    assert '--features "${FEATURES}"' in runs
    assert "cuda" in tomllib.loads((ROOT / "cli" / "Cargo.toml").read_text())["features"]
    # The binary that cargo writes for package myriad's [[bin]] is what is copied out.
    cli = tomllib.loads((ROOT / "cli" / "Cargo.toml").read_text())
    assert [b["name"] for b in cli["bin"]] == ["myriad"]
    assert "install -D -m 0755 target/release/myriad /out/myriad" in runs
    copies = [rest for word, rest in runtime["steps"] if word == "COPY"]
    assert "--from=build /out/myriad /usr/local/bin/myriad" in copies
    # The runtime stage has no toolchain: a slim base and no build commands.
    assert runtime["base"] == "${RUNTIME_IMAGE}"
    default_runtime = re.search(r"ARG RUNTIME_IMAGE=(\S+)", DOCKERFILE.read_text()).group(1)
    assert default_runtime.endswith("-slim")
    assert "cargo" not in " ".join(rest for _, rest in runtime["steps"])
    user = [rest for word, rest in runtime["steps"] if word == "USER"]
    assert user == ["10001:10001"]
    entry = [rest for word, rest in runtime["steps"] if word == "ENTRYPOINT"]
    assert entry == ['["/usr/local/bin/myriad"]']
    # Files copied from the context exist in it.
    files = context_files()
    for copy in copies:
        if copy.startswith("--from"):
            continue
        source = copy.split()[0]
        assert [f for f in files if f == source or f.startswith(source + "/")], source


def test_the_chart_defaults_match_the_image():
    values = yaml.safe_load((ROOT / "helm" / "myriad" / "values.yaml").read_text())
    copies = [rest for word, rest in stages()[1]["steps"] if word == "COPY"]
    model = next(c.split()[1] for c in copies if c.startswith("models/"))
    assert values["model"]["path"] == model
    assert values["podSecurityContext"]["runAsUser"] == 10001
    assert values["image"]["repository"] == "myriad"
    chart = yaml.safe_load((ROOT / "helm" / "myriad" / "Chart.yaml").read_text())
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    assert chart["appVersion"] == cargo["workspace"]["package"]["version"]
