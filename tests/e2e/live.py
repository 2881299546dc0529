"""A live local cluster for the machines that try to break Fovea (property fuzzing, fault drills, soak):
Valkey, a registry, workers and gateways as real processes on loopback, with a key of each role, plus
what /proc says about each process (RSS, threads, open files)."""

from __future__ import annotations

import os
import pathlib
import time
from dataclasses import dataclass, field

from fovea.client import RegistryClient
from fovea.cluster import Cluster, Service
from fovea.v1 import model_pb2
from tests.tinymodels import color_model, identity_model

# One intra-op and one decode thread each: the machines this runs on have two cores for everything.
WORKER_ENV = {"FOVEA_WORKER_INTRA_OP_THREADS": "1", "FOVEA_WORKER_DECODE_THREADS": "1"}
MODELS = ("colors", "ident")


@dataclass
class Live:
    cluster: Cluster
    registry: Service
    rc: RegistryClient
    workers: list[Service] = field(default_factory=list)
    gateways: list[Service] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)

    def services(self) -> list[Service]:
        return [self.registry, *self.workers, *self.gateways]

    def stop(self) -> None:
        self.rc.close()
        self.cluster.stop()


def start_live(
    data_dir: pathlib.Path,
    redis_url: str = "",
    workers: int = 1,
    gateways: int = 1,
    registry_env: dict[str, str] | None = None,
    worker_env: dict[str, str] | None = None,
    gateway_env: dict[str, str] | None = None,
) -> Live:
    """Registry (and Valkey unless redis_url is given), the tiny colors and ident models with production
    aliases, workers serving both, gateways (each one port, its native front), and one key per role."""
    cluster = Cluster(data_dir, redis_url=redis_url)
    try:
        registry = cluster.start_registry(port=0, **(registry_env or {}))
        rc = RegistryClient(registry.address, cluster.admin_token, timeout_s=30)
        live = Live(cluster, registry, rc)
        for name, artifact in (("colors", color_model()), ("ident", identity_model())):
            mv = rc.register(artifact, model_pb2.ModelVersion(name=name))
            rc.set_alias(name, "production", [(mv.version, 100)])
        for role in ("infer", "publish", "admin"):
            live.keys[role] = rc.create_key(role)[1]
        live.keys["ident-only"] = rc.create_key("infer", model_patterns=["ident"])[1]
        for i in range(workers):
            live.workers.append(start_worker(live, f"worker{i}", port=0, **(worker_env or {})))
        wait_ready(live, workers)
        for i in range(gateways):
            live.gateways.append(start_gateway(live, f"gateway{i}", port=0, **(gateway_env or {})))
        return live
    except BaseException:
        cluster.stop()
        raise


def tokens(cluster: Cluster) -> dict[str, str]:
    """The cluster's service tokens by the name the fuzzer gives their holder: the operator's, the workers' and
    the gateways' at the registry, and what gateways present to workers ("internal")."""
    return {
        "admin-token": cluster.admin_token,
        "worker-token": cluster.worker_token,
        "gateway-token": cluster.gateway_token,
        "internal": cluster.worker_call_token,
    }


def start_worker(live: Live, name: str, port: int = 0, **env: str) -> Service:
    return live.cluster.start_worker(live.registry.address, list(MODELS), name=name, port=port, **{**WORKER_ENV, **env})


def start_gateway(live: Live, name: str, port: int = 0, **env: str) -> Service:
    """A gateway process; its one port is its address."""
    return live.cluster.start_gateway(live.registry.address, port=port, name=name, **env)


def wait_ready(live: Live, n: int, timeout_s: float = 60.0) -> None:
    """Until n workers have every model ready, as the registry sees them."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(len(live.rc.list_workers(m, ready_only=True)) >= n for m in MODELS):
            return
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} workers became ready")


@dataclass(frozen=True)
class ProcStats:
    pid: int
    alive: bool
    rss_bytes: int
    threads: int
    open_files: int


def proc_stats(pid: int) -> ProcStats:
    """RSS, threads and open file descriptors of a process from /proc; alive=False once it is gone."""
    try:
        fields = dict(
            line.split(":", 1) for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
        )
        open_files = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return ProcStats(pid, False, 0, 0, 0)
    zombie = fields.get("State", "").strip().startswith("Z")
    rss = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    return ProcStats(pid, not zombie, rss, int(fields.get("Threads", "0")), open_files)


def service_stats(services: list[Service]) -> dict[str, ProcStats]:
    return {s.name: proc_stats(s.proc.pid) for s in services}


def restart(live: Live, old: Service) -> Service:
    """Start a stopped or killed service again, on its port, in its place in the cluster."""
    port = int(old.address.rsplit(":", 1)[1])
    if old in live.workers:
        new = start_worker(live, old.name, port=port)
        live.workers[live.workers.index(old)] = new
    elif old in live.gateways:
        i = live.gateways.index(old)
        new = start_gateway(live, old.name, port=port)
        live.gateways[i] = new
    else:
        new = live.cluster.start_registry(port=port)
        live.registry = new
    live.cluster.services.remove(old)
    return new
