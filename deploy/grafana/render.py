"""Draw deploy/grafana/fovea.json as a PNG from live scrapes, without Grafana or Prometheus.

Scrapes the services' /metrics endpoints every --interval seconds for --duration seconds while driving load,
then evaluates each panel's queries at every scrape with deploy/grafana/promql.py (rates and histogram
quantiles computed here from the scraped samples) and draws the panels with matplotlib in the dashboard's grid.

    # a local cluster (Valkey, registry, two workers, a gateway; the tests' tiny models), load driven here:
    python deploy/grafana/render.py --local --out docs/img/dashboard.png
    # an existing cluster: its metrics endpoints, and a gateway and key to drive load through
    python deploy/grafana/render.py --scrape http://10.0.0.5:9100/metrics http://10.0.0.6:9100/metrics \\
        --gateway 10.0.0.5:8500 --api-key "$FOVEA_API_KEY" --model efficientnet-lite0 --image cat.jpg
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import pathlib
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deploy.grafana import promql  # noqa: E402

DASHBOARD = ROOT / "deploy/grafana/fovea.json"
MAX_DURATION_S = 3600.0
MAX_SCRAPE_BYTES = 32 << 20
BG, PANEL, FG, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3036"
COLORS = ["#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff", "#96d98d", "#fade2a"]


def scrape(url: str, timeout_s: float = 5.0) -> list[promql.Sample]:
    """One scrape, with instance and job labels as Prometheus adds them."""
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        text = resp.read(MAX_SCRAPE_BYTES + 1)
    if len(text) > MAX_SCRAPE_BYTES:
        raise ValueError(f"{url}: over {MAX_SCRAPE_BYTES} bytes")
    instance = urllib.parse.urlsplit(url).netloc
    job = "fovea-gateway" if b"fovea_gateway_" in text else "fovea-worker"
    extra = {("instance", instance), ("job", job)}
    return [(name, labels | extra, v) for name, labels, v in promql.parse_exposition(text.decode())]


def collect(urls: list[str], duration_s: float, interval_s: float, stop: threading.Event) -> promql.Scrapes:
    points: list[tuple[float, list[promql.Sample]]] = []
    end = time.time() + duration_s
    while time.time() < end and not stop.is_set():
        t = time.time()
        samples: list[promql.Sample] = []
        for url in urls:
            try:
                samples += scrape(url)
            except (OSError, ValueError) as exc:
                print(f"scrape of {url} failed: {exc}", file=sys.stderr)
        points.append((t, samples))
        time.sleep(max(0.0, interval_s - (time.time() - t)))
    return promql.Scrapes(points)


# ---- load -----------------------------------------------------------------


class Load:
    """Calls through a gateway from a few threads: image batches of varying size, and now and then a call with
    an unknown key, one a key may not make, and bursts on a rate-limited key (when those keys are given)."""

    def __init__(self, gateway: str, api_key: str, model: str, images: list[bytes], extra_keys: dict[str, str]) -> None:
        self.gateway, self.api_key, self.model, self.images = gateway, api_key, model, images
        self.extra_keys = extra_keys
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.calls = 0

    def start(self, threads: int = 2) -> None:
        for i in range(threads):
            t = threading.Thread(target=self.run, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)

    def run(self, seed: int) -> None:
        import grpc

        from fovea.client import Client

        clients = {name: Client(self.gateway, key, timeout_s=10) for name, key in self.extra_keys.items()}
        main = Client(self.gateway, self.api_key, timeout_s=10)
        i = seed
        try:
            while not self.stop.is_set():
                i += 1
                phase = (time.time() % 30) / 30  # the load swells and ebbs over half a minute
                n = 1 + (i * 7) % (2 + int(6 * phase))
                batch = [self.images[(i + k) % len(self.images)] for k in range(n)]
                calls: list[tuple[Any, str]] = [(main, self.model)]
                if i % 9 == 0 and "unknown" in clients:
                    calls.append((clients["unknown"], self.model))
                if i % 13 == 0 and "other-model" in clients:
                    calls.append((clients["other-model"], self.model))
                if i % 5 == 0 and "limited" in clients:
                    calls += [(clients["limited"], self.model)] * 3
                for client, model in calls:
                    with contextlib.suppress(grpc.RpcError):
                        client.classify(batch, model=model, top_k=1)
                    self.calls += 1
                time.sleep(0.01 + 0.04 * (1 - phase))
        finally:
            main.close()
            for c in clients.values():
                c.close()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


@contextlib.contextmanager
def local_cluster(workdir: pathlib.Path) -> Iterator[tuple[list[str], str, dict[str, str], str, list[bytes]]]:
    """Valkey, a registry, two workers and a gateway on loopback, each with its metrics endpoint, serving the
    tests' tiny colors model; yields (metrics URLs, gateway, keys, model, images)."""
    from fovea.client import RegistryClient
    from fovea.cluster import Cluster
    from fovea.redis_server import free_port
    from fovea.v1 import model_pb2
    from tests.tinymodels import color_model, identity_model, png

    cluster = Cluster(workdir)
    try:
        registry = cluster.start_registry()
        rc = RegistryClient(registry.address, cluster.admin_token, timeout_s=30)
        for name, artifact in (("colors", color_model()), ("ident", identity_model())):
            mv = rc.register(artifact, model_pb2.ModelVersion(name=name))
            rc.set_alias(name, "production", [(mv.version, 100)])
        keys = {
            "main": rc.create_key("infer", ttl_s=30 * 86400, description="render.py")[1],
            "other-model": rc.create_key("infer", model_patterns=["ident"])[1],
            "limited": rc.create_key("infer", rate_limit_rps=2, rate_burst=2)[1],
            "unknown": "fv_" + "0" * 40,
        }
        urls = []
        for i in range(2):
            port = free_port()
            cluster.start_worker(
                registry.address,
                ["colors", "ident"],
                name=f"worker{i}",
                FOVEA_WORKER_METRICS_PORT=str(port),
                FOVEA_WORKER_INTRA_OP_THREADS="1",
                FOVEA_WORKER_DECODE_THREADS="1",
                FOVEA_WORKER_MAX_QUEUE_DELAY_US="2000",
            )
            urls.append(f"http://127.0.0.1:{port}/metrics")
        deadline = time.monotonic() + 60
        while len(rc.list_workers("colors", ready_only=True)) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not become ready")
            time.sleep(0.2)
        port = free_port()
        gateway = cluster.start_gateway(registry.address, FOVEA_GATEWAY_METRICS_PORT=str(port))
        urls.append(f"http://127.0.0.1:{port}/metrics")
        images = [png(c, size=32) for c in ((220, 10, 10), (10, 220, 10), (10, 10, 220), (200, 200, 20))]
        rc.close()
        yield urls, gateway.address, keys, "colors", images
    finally:
        cluster.stop()


# ---- drawing --------------------------------------------------------------


def interpolate(expr: str, window_s: float) -> str:
    expr = expr.replace("$__rate_interval", f"{int(window_s)}s").replace("${datasource}", "prometheus")
    return expr.replace("$model", ".*").replace("$worker", ".*")


def legend(fmt: str, labels: promql.Labels) -> str:
    d = dict(labels)
    out = fmt
    for k, v in d.items():
        out = out.replace("{{" + k + "}}", v)
    while "{{" in out:  # a label the series does not have renders empty, as in Grafana
        a = out.index("{{")
        b = out.find("}}", a)
        out = out[:a] + out[b + 2 :] if b > 0 else out[:a]
    return " ".join(out.split()) or "value"


def series(
    panel: dict[str, Any], data: promql.Scrapes, window_s: float, start: float | None = None
) -> dict[str, list[tuple[float, float]]]:
    """Each target's series over the scrapes from start (default: once a whole window is scraped), by legend."""
    out: dict[str, list[tuple[float, float]]] = {}
    if start is None:
        start = data.points[0][0] + window_s if data.points else 0
    for target in panel.get("targets", []):
        node = promql.parse(interpolate(target["expr"], window_s))
        for t, _ in data.points:
            if t < start:
                continue
            value = promql.evaluate(node, data, t)
            vec = {frozenset(): value} if isinstance(value, float) else value
            for labels, v in vec.items():
                if math.isfinite(v):
                    out.setdefault(legend(target.get("legendFormat", ""), labels), []).append((t, v))
    return out


def fmt(value: float, unit: str) -> str:
    if unit == "s":
        a = abs(value)
        if a >= 86400:
            return f"{value / 86400:.1f} days"
        if a >= 1:
            return f"{value:.2f} s"
        return f"{value * 1000:.3g} ms"
    if unit == "bytes":
        for suffix, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if abs(value) >= size:
                return f"{value / size:.1f} {suffix}"
        return f"{value:.0f} B"
    if unit == "percentunit":
        return f"{value * 100:.0f}%"
    if unit == "reqps":
        return f"{value:.3g}/s"
    return f"{value:.3g}"


def draw(dashboard: dict[str, Any], data: promql.Scrapes, window_s: float, out: pathlib.Path, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit_h = 0.42  # inches per grid row
    fig = plt.figure(figsize=(24 * 0.85, rows * unit_h + 1.2), facecolor=BG)
    height = rows * unit_h + 1.2
    top = 1 - 0.7 / height
    scale = (top - 0.5 / height) / rows
    fig.text(0.01, 1 - 0.3 / height, dashboard["title"], color=FG, fontsize=16, weight="bold", va="center")
    fig.text(0.99, 0.25 / height, caption, color="#8e8e8e", fontsize=9, ha="right", va="center")
    t0 = data.points[0][0] if data.points else 0.0
    for p in panels:
        g = p["gridPos"]
        left, width = g["x"] / 24 + 0.004, g["w"] / 24 - 0.008
        bottom = top - (g["y"] + g["h"]) * scale + 0.004
        h = g["h"] * scale - 0.008
        if p["type"] == "row":
            fig.text(left, bottom + h / 2, p["title"], color=FG, fontsize=12, weight="bold", va="center")
            continue
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        ax = fig.add_axes((left + 0.03, bottom + 0.012, width - 0.034, h * 0.86 - 0.012), facecolor=PANEL)
        fig.text(left + 0.004, bottom + h * 0.93, p["title"], color=FG, fontsize=10, weight="bold", va="center")
        for side in ax.spines.values():
            side.set_color(GRID)
        ax.tick_params(colors="#8e8e8e", labelsize=7)
        lines = series(p, data, window_s)
        if p["type"] == "stat":
            ax.set_xticks([])
            ax.set_yticks([])
            items = [(name, pts[-1][1]) for name, pts in lines.items() if pts]
            if not items:
                ax.text(0.5, 0.5, "No data", color="#8e8e8e", ha="center", va="center", transform=ax.transAxes)
            for i, (name, value) in enumerate(items):
                y = 1 - (i + 0.5) / len(items)
                ax.text(0.05, y, name, color=FG, fontsize=9, va="center", transform=ax.transAxes)
                ax.text(0.95, y, fmt(value, unit), color=COLORS[0], fontsize=15, weight="bold", ha="right", va="center")
            continue
        ax.grid(color=GRID, linewidth=0.5)
        if not lines:
            why = "No data (CPU workers: no GPU here)" if "GPU" in p["title"] else "No data"
            ax.text(0.5, 0.5, why, color="#8e8e8e", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        for i, (name, pts) in enumerate(sorted(lines.items())):
            ax.plot([t - t0 for t, _ in pts], [v for _, v in pts], color=COLORS[i % len(COLORS)], lw=1.3, label=name)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos, u=unit: fmt(v, u)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.0f}s"))
        if lines:
            ax.legend(
                loc="upper left",
                fontsize=6.5,
                ncol=2 if len(lines) > 4 else 1,
                facecolor=PANEL,
                edgecolor=GRID,
                labelcolor=FG,
                framealpha=0.8,
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor=BG)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local", action="store_true", help="start a local cluster and drive load through it")
    p.add_argument("--scrape", nargs="*", default=[], help="metrics URLs of a running cluster's services")
    p.add_argument("--gateway", default="", help="gateway to drive load through (with --scrape)")
    p.add_argument("--api-key", default="")
    p.add_argument("--model", default="")
    p.add_argument("--image", action="append", default=[], help="image file to send (repeatable)")
    p.add_argument("--duration-s", type=float, default=75.0, help="how long to scrape")
    p.add_argument("--interval-s", type=float, default=1.0, help="seconds between scrapes")
    p.add_argument("--window-s", type=float, default=10.0, help="the rate window ($__rate_interval)")
    p.add_argument("--out", default=str(ROOT / "docs/img/dashboard.png"))
    p.add_argument("--scrapes-json", default="", help="also write the scraped samples here (JSON)")
    args = p.parse_args(argv)
    if not 0 < args.duration_s <= MAX_DURATION_S or not 0.1 <= args.interval_s <= 60 or args.window_s < 1:
        p.error(f"--duration-s in (0, {MAX_DURATION_S:g}], --interval-s in [0.1, 60], --window-s >= 1")
    if not args.local and not args.scrape:
        p.error("pass --local, or --scrape URL... of a running cluster")
    dashboard = json.loads(DASHBOARD.read_text())
    stop = threading.Event()
    load: Load | None = None
    with contextlib.ExitStack() as stack:
        if args.local:
            workdir = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fovea-render-")))
            urls, gateway, keys, model, images = stack.enter_context(local_cluster(workdir))
            load = Load(gateway, keys.pop("main"), model, images, keys)
        else:
            urls = args.scrape
            images = [pathlib.Path(f).read_bytes() for f in args.image]
            load = Load(args.gateway, args.api_key, args.model, images, {}) if args.gateway and images else None
        if load is not None:
            load.start()
            stack.callback(load.close)
        started = time.time()
        data = collect(urls, args.duration_s, args.interval_s, stop)
        calls = load.calls if load is not None else 0
    if args.scrapes_json:
        doc = [{"t": t, "samples": [[n, dict(lb), v] for n, lb, v in s]} for t, s in data.points]
        pathlib.Path(args.scrapes_json).write_text(json.dumps(doc))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    caption = (
        f"Real metrics, not a mock-up: {len(data.points)} scrapes of {len(urls)} live services over "
        f"{args.duration_s:.0f} s ({calls} calls driven), {when}; each panel's query evaluated by "
        f"deploy/grafana/render.py (rate window {args.window_s:.0f} s)"
    )
    draw(dashboard, data, args.window_s, pathlib.Path(args.out), caption)
    print(f"wrote {args.out}: {len(data.points)} scrapes, {calls} calls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
