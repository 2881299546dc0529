"""The one-model local cluster both image benchmarks run against: Valkey, a registry, one worker and one gateway,
each a process on loopback, with MODEL registered, promoted and ready."""

from __future__ import annotations

import pathlib
import time
from dataclasses import dataclass

from fovea.client import RegistryClient
from fovea.cluster import Cluster, Service
from fovea.v1 import model_pb2


@dataclass
class ImageCluster:
    cluster: Cluster
    rc: RegistryClient
    gateway: Service
    key: str  # an "infer" API key


def start(tmp: pathlib.Path, model: str, path: pathlib.Path, threads: int, **worker_env: str) -> ImageCluster:
    """The caller stops it (cluster.stop(), rc.close()), also when this raises after the cluster started."""
    cluster = Cluster(tmp)
    try:
        registry = cluster.start_registry(port=0)
        rc = RegistryClient(registry.address, cluster.admin_token, timeout_s=60)
        mv = rc.register(path, model_pb2.ModelVersion(name=model))
        rc.set_alias(model, "production", [(mv.version, 100)])
        key = rc.create_key("infer")[1]
        env = {"FOVEA_WORKER_INTRA_OP_THREADS": str(threads), "FOVEA_WORKER_DECODE_THREADS": str(threads)}
        cluster.start_worker(registry.address, [model], "worker", 0, **(env | worker_env))
        deadline = time.monotonic() + 120
        while not rc.list_workers(model, ready_only=True):
            if time.monotonic() > deadline:
                raise TimeoutError("the worker did not become ready")
            time.sleep(0.2)
        return ImageCluster(cluster, rc, cluster.start_gateway(registry.address, port=0), key)
    except BaseException:
        cluster.stop()
        raise
