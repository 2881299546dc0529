"""Worker test helpers: an in-process registry, in-process workers built with build_server(), and OIP calls."""

from __future__ import annotations

import asyncio
import pathlib
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest

from fovea.client import RegistryClient
from fovea.v1 import model_pb2
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from registry.config import RegistryConfig
from registry.server import build_server as build_registry
from worker.config import WorkerConfig
from worker.server import WorkerServer, build_server

TOKEN = "worker-tests-gateway-call-token"  # what gateways present to workers
MD = (("authorization", f"Bearer {TOKEN}"),)
ADMIN_TOKEN = "worker-tests-admin-token"  # publishes the models
REGISTRY_TOKEN = "worker-tests-worker-registry-token"  # the workers' own, at the registry


@dataclass
class LocalRegistry:
    address: str
    client: RegistryClient

    async def publish(self, name: str, model: bytes, alias: str = "production") -> int:
        """Register a model version (and point the alias at it unless alias is empty); returns the version."""
        mv = await asyncio.to_thread(self.client.register, model, model_pb2.ModelVersion(name=name))
        if alias:
            await asyncio.to_thread(self.client.set_alias, name, alias, [(mv.version, 100)])
        return int(mv.version)

    async def set_alias(self, name: str, targets: list[tuple[int, int]], alias: str = "production") -> None:
        await asyncio.to_thread(self.client.set_alias, name, alias, targets)


@pytest.fixture
async def registry(redis_url: str, tmp_path: pathlib.Path) -> AsyncIterator[LocalRegistry]:
    config = RegistryConfig(
        port=0,
        redis_url=redis_url,
        artifact_dir=tmp_path / "artifacts",
        log_json=False,
        admin_tokens=ADMIN_TOKEN,
        worker_tokens=REGISTRY_TOKEN,
    )
    server = await build_registry(config)
    address = f"127.0.0.1:{server.port}"
    client = RegistryClient(address, ADMIN_TOKEN, timeout_s=20)
    yield LocalRegistry(address, client)
    client.close()
    await server.stop(1.0)


StartWorker = Callable[..., Awaitable[WorkerServer]]


@pytest.fixture
async def start_worker(registry: LocalRegistry) -> AsyncIterator[StartWorker]:
    """Builds in-process workers on the test's loop; all are stopped at the end."""
    started: list[WorkerServer] = []

    async def start(models: list[str], **fields: Any) -> WorkerServer:
        config = WorkerConfig(
            port=0,
            registry_address=registry.address,
            models=models,
            registry_token=REGISTRY_TOKEN,
            accepted_tokens=TOKEN,
            providers=["CPUExecutionProvider"],
            intra_op_threads=1,
            heartbeat_interval_s=0.5,
            log_json=False,
            **fields,
        )
        ws = await build_server(config)
        started.append(ws)
        return ws

    yield start
    for ws in started:
        await ws.stop(2.0)


def stub(port: int) -> tuple[grpc.aio.Channel, pb_grpc.GRPCInferenceServiceStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


def tensor_request(
    model: str, array: np.ndarray, datatype: str = "FP32", version: str = "", name: str = "input"
) -> pb.ModelInferRequest:
    """A ModelInfer with one input sent as raw_input_contents."""
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    req.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
    req.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return req


def typed_request(req: pb.ModelInferRequest) -> pb.ModelInferRequest:
    """The same FP32 call with typed contents (fp32_contents), which the worker's native front reads into raw
    tensors first (check.cc read_contents): the same request in the protocol's other form."""
    out = pb.ModelInferRequest()
    out.CopyFrom(req)
    del out.raw_input_contents[:]
    for t, raw in zip(out.inputs, req.raw_input_contents, strict=True):
        t.contents.fp32_contents.extend(np.frombuffer(raw, np.float32).tolist())
    return out


def colors(n: int) -> np.ndarray:
    """n inputs of the colour model (tests.tinymodels.color_model), red, green, blue in turn."""
    x = np.zeros((n, 3, 8, 8), np.float32)
    for i in range(n):
        x[i, i % 3] = 1.0
    return x


async def scrape(port: int) -> str:
    """A worker's /metrics page."""
    url = f"http://127.0.0.1:{port}/metrics"
    return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())


def output_array(resp: pb.ModelInferResponse, index: int = 0, dtype: Any = np.float32) -> np.ndarray:
    return np.frombuffer(resp.raw_output_contents[index], dtype=dtype).reshape(list(resp.outputs[index].shape))


def busy_input(steps: int, rows: int = 1, tag: float = 0.0) -> np.ndarray:
    """Input of slowmodels.busy_model: first column = loop steps, second column = a tag to check answers by."""
    x = np.zeros((rows, 4), np.float32)
    x[:, 0] = steps
    x[:, 1] = tag + np.arange(rows)
    return x


async def poll(check: Callable[[], Awaitable[bool]], timeout_s: float = 30.0, every_s: float = 0.05) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(every_s)
