"""The benchmark suite's smoke mode runs end to end, so the full suite never rots: real cluster
processes (embedded Valkey, registry, worker, gateway), all three hops, JSON, markdown and plots."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from fovea.cluster import ROOT


def test_bench_suite_smoke(tmp_path: pathlib.Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOVEA_")}
    out = subprocess.run(
        [sys.executable, "bench/suite/run.py", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    points = {(r["model"], r["hop"], r["concurrency"]) for r in doc["results"]}
    assert points == {
        (m, h, c) for m in ("identity", "cifar-cnn") for h in ("onnxruntime", "worker", "gateway") for c in (1, 8)
    }
    for r in doc["results"]:
        assert r["ok"] > 0 and r["errors"] == {}, r
        assert r["latency_ms"]["p50"] > 0 and r["throughput_rps"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "| identity | gateway |" in table and "added by this hop" in table and doc["machine"]["cores"] >= 1
    for name in doc["plots"]:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
