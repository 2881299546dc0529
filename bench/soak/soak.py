"""Soak (issue 18): mixed load for a while against a local cluster of real processes, watching for slow leaks.

    python bench/soak/soak.py --minutes 10

Starts Valkey, a registry, two workers and a gateway on loopback (tests/e2e/live.py, the tiny colors and
ident models), then runs, all at once: Classify with encoded images, ModelInfer with raw tensors (two
clients), ClassifyStream, and bad calls (no key, a wrong key, a corrupt image, a wrong
dtype, classification k out of range, bytes that are no message). Every --sample-s seconds it records each
service's RSS, threads and open files; each call's latency goes into its minute. At the end it prints a
table, writes JSON (--json) and a plot (--png): resources over time, and p50/p99 per minute per kind of call.
A good call that fails, or a bad call answered outside the error table, is counted as an error."""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import platform
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from fovea.v1 import image_pb2, image_pb2_grpc  # noqa: E402
from inference import grpc_predict_v2_pb2 as pb  # noqa: E402
from inference import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402
from tests.e2e.live import Live, service_stats, start_live  # noqa: E402

S = grpc.StatusCode
# What a bad call may be answered with (the error table of ../shared/STYLE.md section 5, less OK).
BAD_CALL_STATUSES = {
    S.INVALID_ARGUMENT,
    S.UNAUTHENTICATED,
    S.PERMISSION_DENIED,
    S.NOT_FOUND,
    S.RESOURCE_EXHAUSTED,
    S.FAILED_PRECONDITION,
}
COLORS = [(240, 20, 20), (20, 240, 20), (20, 20, 240)]
LABELS = ["red", "green", "blue"]


@dataclass
class Recorder:
    """Latencies by (kind, minute), and errors by kind."""

    started: float = field(default_factory=time.monotonic)
    latencies: dict[tuple[str, int], list[float]] = field(default_factory=lambda: defaultdict(list))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    errors: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, began: float, error: str = "") -> None:
        minute = int((began - self.started) // 60)
        self.latencies[(kind, minute)].append((time.monotonic() - began) * 1000)
        self.calls[kind] += 1
        if error:
            self.errors[kind].append(error)

    def drift(self) -> dict[str, list[dict[str, float]]]:
        out: dict[str, list[dict[str, float]]] = defaultdict(list)
        for (kind, minute), values in sorted(self.latencies.items()):
            ms = np.array(values)
            out[kind].append(
                {
                    "minute": minute,
                    "calls": len(values),
                    "p50_ms": float(np.percentile(ms, 50)),
                    "p99_ms": float(np.percentile(ms, 99)),
                }
            )
        return dict(out)


def noisy_png(color: tuple[int, int, int], size: int = 48, seed: int = 0) -> bytes:
    """A photo-like PNG (about 5 KB: noise does not compress) whose dominant channel is still the colour's."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color) + rng.integers(-15, 16, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def infer_request(seq: int) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="ident", id=str(seq))
    req.inputs.add(name="input", datatype="FP32", shape=[2, 4])
    req.raw_input_contents.append(np.full(8, seq % 1000, np.float32).tobytes())
    return req


def classify_request(seq: int, images: list[bytes]) -> image_pb2.ClassifyRequest:
    n = 1 + seq % 4
    chosen = [(seq + i) % 3 for i in range(n)]
    return image_pb2.ClassifyRequest(
        model="colors", top_k=2, images=[image_pb2.Image(data=images[c], id=LABELS[c]) for c in chosen]
    )


def bad_calls(images: list[bytes]) -> list[tuple[str, Any, str]]:
    """(method, request or raw bytes, credentials: key, none or wrong) for each kind of bad call."""
    corrupt = image_pb2.ClassifyRequest(model="colors", images=[image_pb2.Image(data=images[0][:30])])
    dtype = infer_request(0)
    dtype.inputs[0].datatype = "INT64"
    k = infer_request(0)
    k.outputs.add(name="output").parameters["classification"].int64_param = 2**31
    return [
        ("/fovea.v1.ImageService/Classify", classify_request(0, images), "none"),
        ("/fovea.v1.ImageService/Classify", classify_request(0, images), "wrong"),
        ("/fovea.v1.ImageService/Classify", corrupt, "key"),
        ("/inference.GRPCInferenceService/ModelInfer", dtype, "key"),
        ("/inference.GRPCInferenceService/ModelInfer", k, "key"),
        ("/inference.GRPCInferenceService/ModelInfer", b"\x0a\xff\xff", "key"),
    ]


class Soak:
    def __init__(self, live: Live, minutes: float, sample_s: float) -> None:
        self.live = live
        self.key = live.keys["infer"]
        self.until = time.monotonic() + minutes * 60
        self.sample_s = sample_s
        self.recorder = Recorder()
        self.samples: list[dict[str, Any]] = []
        self.images = [noisy_png(c) for c in COLORS]

    def md(self, who: str = "key") -> tuple[tuple[str, str], ...]:
        if who == "none":
            return ()
        secret = self.key if who == "key" else "fv_aaaaaaaaaaaa_" + "x" * 43
        return (("authorization", f"Bearer {secret}"),)

    def running(self) -> bool:
        return time.monotonic() < self.until

    async def loop(self, kind: str, one: Callable[[int], Awaitable[str]]) -> None:
        seq = 0
        while self.running():
            seq += 1
            began = time.monotonic()
            try:
                error = await one(seq)
            except grpc.aio.AioRpcError as exc:
                error = f"{exc.code().name}: {(exc.details() or '')[:120]}"
            self.recorder.add(kind, began, error)

    async def run(self) -> None:
        gateway = self.live.gateways[0].address
        async with grpc.aio.insecure_channel(gateway) as main_ch:  # the gateway's one port
            images = image_pb2_grpc.ImageServiceStub(main_ch)
            infer_stub = pb_grpc.GRPCInferenceServiceStub(main_ch)

            async def classify(seq: int) -> str:
                req = classify_request(seq, self.images)
                resp = await images.Classify(req, metadata=self.md(), timeout=10)
                got = [r.labels[0].label for r in resp.results]
                return "" if got == [i.id for i in req.images] else f"wrong labels {got}"

            async def infer(stub: pb_grpc.GRPCInferenceServiceStub, seq: int) -> str:
                resp = await stub.ModelInfer(infer_request(seq), metadata=self.md(), timeout=10)
                ok = resp.id == str(seq) and np.all(
                    np.frombuffer(resp.raw_output_contents[0], np.float32) == seq % 1000
                )
                return "" if ok else "wrong answer"

            async def stream(seq: int) -> str:
                reqs = [
                    image_pb2.ClassifyStreamRequest(request=classify_request(seq + i, self.images), sequence=i)
                    for i in range(8)
                ]
                answers = [a async for a in images.ClassifyStream(iter(reqs), metadata=self.md(), timeout=20)]
                bad = [a for a in answers if a.error_code]
                return "" if len(answers) == 8 and not bad else f"{len(answers)} answers, {len(bad)} failed"

            bad_list = bad_calls(self.images)

            async def bad(seq: int) -> str:
                method, req, who = bad_list[seq % len(bad_list)]
                data = req if isinstance(req, bytes) else req.SerializeToString()
                fn = main_ch.unary_unary(method, request_serializer=None, response_deserializer=None)
                try:
                    await fn(data, metadata=self.md(who), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                    return "" if code in BAD_CALL_STATUSES else f"bad call {seq % len(bad_list)} got {code.name}"
                return f"bad call {seq % len(bad_list)} succeeded"

            await asyncio.gather(
                self.sampler(),
                self.loop("classify", classify),
                self.loop("classify", classify),
                self.loop("infer", lambda s: infer(infer_stub, s)),
                self.loop("infer", lambda s: infer(infer_stub, s)),
                self.loop("stream", stream),
                self.loop("bad", bad),
            )

    async def sampler(self) -> None:
        while True:
            stats = service_stats(self.live.services())
            self.samples.append(
                {
                    "t_s": round(time.monotonic() - self.recorder.started, 1),
                    "services": {
                        n: {
                            "alive": s.alive,
                            "rss_mb": s.rss_bytes / 2**20,
                            "threads": s.threads,
                            "open_files": s.open_files,
                        }
                        for n, s in stats.items()
                    },
                }
            )
            if not self.running():
                return
            await asyncio.sleep(min(self.sample_s, max(0.0, self.until - time.monotonic())))


def rss_slope(samples: list[dict[str, Any]], name: str) -> float:
    """RSS growth in MB per minute over the last two thirds of the run (a leak shows here; warm-up does not)."""
    end = samples[-1]["t_s"]
    later = [x for x in samples if x["t_s"] >= end / 3]
    if len(later) < 2:
        return 0.0
    t = np.array([x["t_s"] / 60 for x in later])
    rss = np.array([x["services"][name]["rss_mb"] for x in later])
    return round(float(np.polyfit(t, rss, 1)[0]), 2)


def summarize(soak: Soak, minutes: float) -> dict[str, Any]:
    first, last = soak.samples[0]["services"], soak.samples[-1]["services"]
    services = {
        name: {
            "pid": next(s.proc.pid for s in soak.live.services() if s.name == name),
            "alive_at_end": last[name]["alive"],
            "rss_mb": [round(first[name]["rss_mb"], 1), round(last[name]["rss_mb"], 1)],
            "rss_mb_max": round(max(x["services"][name]["rss_mb"] for x in soak.samples), 1),
            "rss_mb_per_min_after_warmup": rss_slope(soak.samples, name),
            "threads": [first[name]["threads"], last[name]["threads"]],
            "open_files": [first[name]["open_files"], last[name]["open_files"]],
        }
        for name in first
    }
    return {
        "minutes": minutes,
        "machine": f"{platform.machine()}, {platform.system()}, python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cluster": "Valkey, registry, 2 workers, 1 gateway (one port) on loopback; tiny colors and ident models",
        "calls": dict(soak.recorder.calls),
        "errors": {k: {"count": len(v), "first": v[:5]} for k, v in soak.recorder.errors.items()},
        "services": services,
        "latency_per_minute": soak.recorder.drift(),
        "samples": soak.samples,
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"\nsoak, {result['minutes']} minutes: calls {result['calls']}")
    print(f"errors: { {k: v['count'] for k, v in result['errors'].items()} or 'none' }")
    print(
        f"\n{'service':<10} {'alive':>5} {'RSS MB start':>12} {'end':>7} {'max':>7} {'MB/min':>7} "
        f"{'threads':>9} {'open files':>11}"
    )
    for name, s in result["services"].items():
        print(
            f"{name:<10} {str(s['alive_at_end']):>5} {s['rss_mb'][0]:>12.1f} {s['rss_mb'][1]:>7.1f} "
            f"{s['rss_mb_max']:>7.1f} {s['rss_mb_per_min_after_warmup']:>7.2f} "
            f"{s['threads'][0]:>4}->{s['threads'][1]:<4} "
            f"{s['open_files'][0]:>5}->{s['open_files'][1]:<5}"
        )
    print(
        f"\n{'kind':<11} "
        + " ".join(f"{'min ' + str(m['minute']):>16}" for m in next(iter(result["latency_per_minute"].values())))
    )
    for kind, rows in result["latency_per_minute"].items():
        print(f"{kind:<11} " + " ".join(f"{r['p50_ms']:>7.1f}/{r['p99_ms']:<8.1f}" for r in rows))
    print("(p50/p99 ms per minute)")


def plot(result: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    t = [s["t_s"] / 60 for s in result["samples"]]
    for ax, metric, title in (
        (axes[0][0], "rss_mb", "RSS (MB)"),
        (axes[0][1], "threads", "threads"),
        (axes[1][0], "open_files", "open files"),
    ):
        for name in result["services"]:
            ax.plot(t, [s["services"][name][metric] for s in result["samples"]], label=name)
        ax.set_title(title)
        ax.set_xlabel("minutes")
        ax.legend(fontsize=7)
    ax = axes[1][1]
    for kind, rows in result["latency_per_minute"].items():
        minutes = [r["minute"] + 0.5 for r in rows]
        line = ax.plot(minutes, [r["p50_ms"] for r in rows], marker="o", label=f"{kind} p50")[0]
        ax.plot(
            minutes,
            [r["p99_ms"] for r in rows],
            marker="x",
            linestyle="--",
            color=line.get_color(),
            label=f"{kind} p99",
        )
    ax.set_yscale("log")
    ax.set_title("latency per minute (ms)")
    ax.set_xlabel("minutes")
    ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"Fovea soak, {result['minutes']} minutes of mixed load")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between resource samples")
    parser.add_argument("--json", type=pathlib.Path, default=ROOT / "docs/bench/soak.json")
    parser.add_argument("--png", type=pathlib.Path, default=ROOT / "docs/bench/soak.png")
    return parser


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="fovea-soak-") as tmp:
        live = start_live(pathlib.Path(tmp), workers=2, gateways=1)
        try:
            soak = Soak(live, args.minutes, args.sample_s)
            asyncio.run(soak.run())
            result = summarize(soak, args.minutes)
        finally:
            live.stop()
    print_table(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.png)
    print(f"\nwrote {args.json} and {args.png}")
    dead = [n for n, s in result["services"].items() if not s["alive_at_end"]]
    return 1 if dead or result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
