"""Triton's perf_analyzer against a Fovea gateway or worker.

perf_analyzer is the C++ load tool Triton users already know; it speaks the
same gRPC protocol, so it runs against Fovea unchanged. Its own cost per call
is a few microseconds, far below a Python client's, which matters when the
client shares a small machine with the server it measures.

The binary comes in the tritonclient 2.41.0 wheel (later wheels leave it out). It links libcudart.so.12
even without a GPU (PyPI's nvidia-cuda-runtime-cu12 provides it) and
libb64.so.0d (Debian's libb64-0d).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass


class PerfAnalyzerMissing(RuntimeError):
    """The binary or one of its libraries is not installed."""


def binary() -> str:
    beside = pathlib.Path(sys.executable).with_name("perf_analyzer")
    found = str(beside) if os.access(beside, os.X_OK) else shutil.which("perf_analyzer")
    if not found:
        raise PerfAnalyzerMissing("perf_analyzer not found: pip install 'tritonclient[grpc]==2.41.0'")
    return found


def library_env() -> dict[str, str]:
    """The environment with the pip-installed CUDA runtime on the library path."""
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime

        lib = pathlib.Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(lib), env.get("LD_LIBRARY_PATH", "")) if p)
    except ImportError:
        pass  # a system CUDA install may still provide it; ldd below says if not
    return env


def check() -> None:
    """Raise PerfAnalyzerMissing naming whatever library the binary cannot find."""
    out = subprocess.run(["ldd", binary()], capture_output=True, text=True, env=library_env()).stdout
    missing = [line.split()[0] for line in out.splitlines() if "not found" in line]
    if missing:
        raise PerfAnalyzerMissing(
            f"perf_analyzer cannot load {', '.join(missing)}: pip install nvidia-cuda-runtime-cu12 "
            "for libcudart.so.12, apt-get install libb64-0d for libb64.so.0d"
        )


@dataclass
class Result:
    concurrency: int
    infer_per_s: float
    p50_us: float
    p99_us: float
    requests: int
    output: str


def run(
    address: str,
    model: str,
    token: str,
    concurrency: int = 1,
    window_ms: int = 2000,
    batch: int = 1,
    extra: tuple[str, ...] = (),
    timeout_s: float = 300,
) -> Result:
    """One perf_analyzer measurement at one concurrency; raises RuntimeError when it fails."""
    argv = [
        binary(),
        "-i",
        "grpc",
        "-u",
        address,
        "-m",
        model,
        "-b",
        str(batch),
        "-H",
        f"authorization:Bearer {token}",
        "--concurrency-range",
        str(concurrency),
        "--measurement-interval",
        str(window_ms),
        *extra,
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, env=library_env(), timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"perf_analyzer exited {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}")
    return parse(proc.stdout, concurrency)


def parse(text: str, concurrency: int) -> Result:
    def number(pattern: str) -> float:
        m = re.search(pattern, text)
        if m is None:
            raise RuntimeError(f"perf_analyzer output has no {pattern!r}:\n{text[-2000:]}")
        return float(m.group(1))

    return Result(
        concurrency=concurrency,
        infer_per_s=number(r"Throughput: ([\d.]+) infer/sec"),
        p50_us=number(r"p50 latency: ([\d.]+) usec"),
        p99_us=number(r"p99 latency: ([\d.]+) usec"),
        requests=int(number(r"Request count: (\d+)")),
        output=text,
    )


def main() -> None:
    """`python -m loadtest.perf_analyzer ARGS...`: perf_analyzer with its libraries found."""
    check()
    path = binary()
    os.execve(path, [path, *sys.argv[1:]], library_env())


if __name__ == "__main__":
    main()
