"""Start OIP test servers as processes and read back their address."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from fovea.cluster import ROOT

StartServer = Callable[..., str]


@pytest.fixture
def oip_server() -> Iterator[StartServer]:
    """start(kind, *flags) -> 'host:port' of a fresh tests.loadtest.servers process."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(kind: str, *flags: str) -> str:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.loadtest.servers", kind, *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE
        )
        procs.append(proc)
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        line = b""
        while not line.endswith(b"\n"):
            assert proc.poll() is None and time.monotonic() < deadline, f"{kind} server did not start"
            if sel.select(0.1):
                line += os.read(proc.stdout.fileno(), 1024)
        sel.close()
        return line.decode().split(": ", 1)[1].strip()

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
