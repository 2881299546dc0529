"""Raw ONNX Runtime on CUDA: what a change of batch size between runs costs, and what avoids it.

The worker's main port on an H200 spent about 600 ms per batch under load, with batch sizes varying
from one batch to the next, against 5 ms for raw batches of 32 of one size. This times, in one session
warmed at every size used:
  same     -- batch 16 again and again
  two      -- 16 and 17 in turn
  varying  -- sizes 12..20 in a shuffled order
for each cuDNN algorithm search, then two ways round it: pad every batch to 32 in one session, and pad
to the next power of two with one session per size. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import statistics
import sys
import time
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from worker.config import WorkerConfig  # noqa: E402
from worker.runtime import provider_list, session_options  # noqa: E402

BUCKETS = (1, 2, 4, 8, 16, 32)


def make(path: str, cpu: bool, search: str) -> ort.InferenceSession:
    providers = ["CPUExecutionProvider"] if cpu else ["CUDAExecutionProvider", "CPUExecutionProvider"]
    config = WorkerConfig(providers=providers, cudnn_conv_algo_search=search)
    return ort.InferenceSession(path, sess_options=session_options(config), providers=provider_list(config))


def x(n: int) -> np.ndarray:
    return np.zeros((n, 3, 224, 224), np.float32)


def timed(session: ort.InferenceSession, sizes: list[int], pad_to: Any = None) -> dict[str, float]:
    name = session.get_inputs()[0].name if not isinstance(session, dict) else None
    times = []
    for n in sizes:
        t = time.perf_counter()
        if isinstance(session, dict):  # one session per bucket
            b = next(b for b in BUCKETS if b >= n)
            s = session[b]
            s.run(None, {s.get_inputs()[0].name: x(b)})
        else:
            session.run(None, {name: x(pad_to or n)})
        times.append(time.perf_counter() - t)
    return {
        "mean_ms": round(1e3 * statistics.mean(times), 2),
        "p50_ms": round(1e3 * statistics.median(times), 2),
        "max_ms": round(1e3 * max(times), 2),
        "runs": len(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(ROOT / "runs/bench-worker/efficientnet-lite0.onnx"))
    parser.add_argument("--out", default="/tmp/shape_change.json")
    parser.add_argument("--runs", type=int, default=24)
    parser.add_argument("--cpu", action="store_true", help="rehearse on the CPU provider")
    args = parser.parse_args()
    rng = random.Random(1)
    varying = [rng.randint(12, 20) for _ in range(args.runs)]
    results: dict[str, Any] = {"onnxruntime": ort.__version__}
    for search in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
        t0 = time.perf_counter()
        s = make(args.model, args.cpu, search)
        for n in range(12, 21):
            s.run(None, {s.get_inputs()[0].name: x(n)})
        warm = time.perf_counter() - t0
        results[search] = {
            "providers": s.get_providers()[:1],
            "load_and_warm_s": round(warm, 1),
            "same": timed(s, [16] * args.runs),
            "two": timed(s, [16, 17] * (args.runs // 2)),
            "varying": timed(s, varying),
        }
        if search == "EXHAUSTIVE":
            s.run(None, {s.get_inputs()[0].name: x(32)})
            results["pad_to_32"] = timed(s, varying, pad_to=32)
        print(search, results[search], flush=True)
    per_bucket = {}
    t0 = time.perf_counter()
    for b in BUCKETS:
        per_bucket[b] = make(args.model, args.cpu, "EXHAUSTIVE")
        per_bucket[b].run(None, {per_bucket[b].get_inputs()[0].name: x(b)})
    results["bucket_sessions_load_s"] = round(time.perf_counter() - t0, 1)
    results["bucket_sessions"] = timed(per_bucket, varying)  # type: ignore[arg-type]
    results["bucket_sessions_1_to_32"] = timed(per_bucket, [rng.randint(1, 32) for _ in range(args.runs)])  # type: ignore[arg-type]
    print(f"\n{'':<34}{'mean ms':>9}{'p50 ms':>9}{'max ms':>9}")
    for search in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
        for case in ("same", "two", "varying"):
            r = results[search][case]
            print(f"{search + ' ' + case:<34}{r['mean_ms']:>9}{r['p50_ms']:>9}{r['max_ms']:>9}")
    for case in ("pad_to_32", "bucket_sessions", "bucket_sessions_1_to_32"):
        r = results[case]
        print(f"{case:<34}{r['mean_ms']:>9}{r['p50_ms']:>9}{r['max_ms']:>9}")
    pathlib.Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
