"""`fovea status` as an operator runs it: a subprocess against a live cluster (Valkey, registry, a worker and a
gateway as real processes), with the human table, --json, --watch and refused credentials."""

from __future__ import annotations

import json
import os
import pathlib
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from fovea.status import CLEAR
from tests.e2e.live import Live, start_live

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One cluster for the module, with its own Valkey (the shared one is flushed before each test); no test
    here changes the cluster's state."""
    cluster = start_live(tmp_path_factory.mktemp("status") / "live")
    try:
        yield cluster
    finally:
        cluster.stop()


def env() -> dict[str, str]:
    """This process's environment without FOVEA_* settings, so that only the flags given count."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("FOVEA_")}
    out["PYTHONPATH"] = str(ROOT)
    return out


def status(live: Live, *flags: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "fovea.cli", "status", "--registry", live.registry.address]
    argv += ["--address", live.gateways[0].address, *flags]
    if token is not None:
        argv += ["--token", token]
    return subprocess.run(argv, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)


def test_the_table_names_models_aliases_workers_and_the_gateway(live: Live) -> None:
    out = status(live, token=live.keys["admin"])
    assert out.returncode == 0, out.stderr
    text = out.stdout
    worker_id = live.rc.list_workers()[0].worker_id
    lines = text.splitlines()
    colors = next(line for line in lines if line.startswith("colors "))
    assert "production -> v1" in colors and worker_id in colors
    row = next(line for line in lines if line.startswith(worker_id))
    assert " ready " in row and "CPUExecutionProvider" in row and "colors v1" in row and "ident v1" in row
    assert row.rstrip().endswith("s ago")
    gateway = next(line for line in lines if line.startswith("gateway "))
    assert live.gateways[0].address in gateway and "health serving" in gateway and "fovea-gateway" in gateway
    assert "only the gateway named by --address is checked" in text


def test_json_has_the_same_facts(live: Live) -> None:
    out = status(live, "--json", token=live.keys["admin"])
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    models = {m["name"]: m for m in doc["models"]}
    assert set(models) == {"colors", "ident"}
    assert models["colors"]["aliases"] == [{"name": "production", "targets": [{"version": 1, "weight": 100}]}]
    (worker,) = doc["workers"]
    assert worker["state"] == "ready" and worker["provider"] == "CPUExecutionProvider"
    assert {(m["name"], m["version"], m["ready"]) for m in worker["models"]} == {
        ("colors", 1, True),
        ("ident", 1, True),
    }
    assert 0 <= worker["heartbeat_age_s"] < 30 and worker["queue_depth"] == 0
    assert models["colors"]["ready_workers"] == [worker["worker_id"]]
    assert doc["gateway"]["health"] == "serving" and doc["gateway"]["server"]["name"] == "fovea-gateway"
    assert doc["gateway"]["server"]["ready"] is True and doc["gateway"]["error"] is None


def test_refused_credentials_give_a_clear_error_and_a_non_zero_exit(live: Live) -> None:
    out = status(live, token="fv_" + "0" * 40)
    assert out.returncode != 0 and "UNAUTHENTICATED" in out.stderr and "Traceback" not in out.stderr
    out = status(live, token=live.keys["infer"])  # listing workers takes the admin role
    assert out.returncode != 0 and "PERMISSION_DENIED" in out.stderr and "Traceback" not in out.stderr
    out = status(live)
    assert out.returncode == 2 and "no credentials" in out.stderr
    out = status(live, "--watch", "0", token=live.keys["admin"])
    assert out.returncode == 2 and "--watch takes" in out.stderr


def test_an_unreachable_gateway_is_reported_not_fatal(live: Live) -> None:
    argv = [sys.executable, "-m", "fovea.cli", "status", "--registry", live.registry.address, "--json"]
    argv += ["--address", "127.0.0.1:1", "--timeout-s", "2", "--token", live.keys["admin"]]
    out = subprocess.run(argv, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    gateway = json.loads(out.stdout)["gateway"]
    assert gateway["health"] == "unreachable" and gateway["error"].startswith("UNAVAILABLE")


def test_watch_redraws_until_ctrl_c(live: Live) -> None:
    argv = [sys.executable, "-m", "fovea.cli", "status", "--registry", live.registry.address, "--watch", "0.3"]
    argv += ["--address", live.gateways[0].address, "--token", live.keys["admin"]]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        seen = ""
        deadline = time.monotonic() + 60
        while seen.count(CLEAR) < 3 and time.monotonic() < deadline and proc.poll() is None:
            if sel.select(0.5):
                seen += os.read(proc.stdout.fileno(), 65536).decode()
        sel.close()
        assert seen.count(CLEAR) >= 3, seen
        assert seen.count("colors ") >= 3
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
