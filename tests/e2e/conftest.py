"""Starts real `myriad up` processes for the end-to-end tests."""

import itertools
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[2]
_servers = itertools.count()
BINARY = Path(os.environ.get("MYRIAD_BIN", ROOT / "target" / "debug" / "myriad"))


# Where each server records its addresses for `myriad ctl` (its own file,
# so tests never touch the one a developer's own `myriad up` writes).
STATE_DIR = Path(tempfile.mkdtemp(prefix="myriad-e2e-"))


class Server:
    def __init__(self, *args, env=None):
        self.state_file = STATE_DIR / f"up-{next(_servers)}.json"
        self.env = {**os.environ, "MYRIAD_UP_STATE": str(self.state_file), **(env or {})}
        self.proc = subprocess.Popen(
            [str(BINARY), "up", "--listen", "127.0.0.1:0", *args],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("Myriad is up: "):
            self.stop()
            raise RuntimeError(f"myriad up did not start: {line!r}")
        # The rest of the banner: the `Try:` hint, ending with its `-d` line.
        self.banner = line
        while not line.lstrip().startswith("-d ") and line:
            line = self.proc.stdout.readline()
            self.banner += line
        self.base_url = self.banner.split()[3]  # http://127.0.0.1:PORT/v1
        self.root_url = self.base_url.removesuffix("/v1")
        admin = [l for l in self.banner.splitlines() if l.startswith("Admin API: ")]
        self.admin = admin[0].split()[2] if admin else None

    def client(self, api_key="unused", **kwargs):
        return OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, **kwargs)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="session")
def server():
    s = Server("--workers", "2")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server):
    return server.client()
