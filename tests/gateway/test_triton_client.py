"""Acceptance 5: the stock Triton client (tritonclient.grpc) works against the gateway unchanged:
is_server_live, get_model_metadata, and infer with the classification extension; also Triton's
get_model_config, which its perf_analyzer needs (test_perf_analyzer.py), and the streaming call
(start_stream / async_stream_infer)."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import sys

import pytest

from fovea.cluster import ROOT
from tests.gateway.conftest import GatewayFactory, Stack
from tests.tinymodels import png

PROBE = pathlib.Path(__file__).with_name("triton_probe.py")


@pytest.mark.parametrize("path", ["native", "relayed"])
async def test_tritonclient_against_gateway(
    stack: Stack, gateways: GatewayFactory, tmp_path: pathlib.Path, path: str
) -> None:
    """Through the gateway's one port, with a key the front serves itself and with one whose calls it relays to
    the Python server (a rate limit never reached)."""
    gw = await gateways()
    rps = 0.0 if path == "native" else 10_000.0
    secret = await asyncio.to_thread(lambda: stack.key(rate_limit_rps=rps))
    image = tmp_path / "blue.png"
    image.write_bytes(png((20, 20, 240)))
    env = {**os.environ, "FOVEA_API_KEY": secret}
    # the gateway runs in this event loop, so the client must be a non-blocking subprocess
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PROBE),
        f"127.0.0.1:{gw.port}",
        "colors",
        str(image),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    out = json.loads(stdout.decode().strip().splitlines()[-1])
    assert out["live"] is True and out["ready"] is True and out["model_ready"] is True
    meta = out["metadata"]
    assert meta["name"] == "colors" and meta["versions"] == ["1"]
    assert meta["inputs"][0][0] == "input" and meta["outputs"][0][0] == "logits"
    assert "classification" in out["server"]["extensions"]
    # Triton's ModelConfig: the batch dimension moves into max_batch_size; 11 is TYPE_FP32
    cfg = out["config"]
    assert cfg["name"] == "colors" and cfg["platform"] == "onnxruntime_onnx" and cfg["max_batch_size"] > 0
    assert cfg["inputs"] == [["input", 11, meta["inputs"][0][2][1:]]]
    assert cfg["outputs"] == [["logits", 11, meta["outputs"][0][2][1:], "labels.txt"]]
    best, second = out["classification"]
    score, index, label = best.split(":", 2)
    assert (label, int(index)) == ("blue", 2) and float(score) > 0.9
    assert out["model_version"] == "1"
    # ModelStreamInfer: answers in order with their ids; an error answers its own request only
    stream = out["stream"]
    assert [item[0] for item in stream[:3]] == ["frame-0", "frame-1", "frame-2"]
    assert all(item[1].split(":", 2)[2] == "blue" for item in stream[:3])
    assert stream[3][0] == "error" and "NOT_FOUND" in stream[3][1] and "no-such-model" in stream[3][1]
    assert out["unknown_key"] == "StatusCode.UNAUTHENTICATED"
