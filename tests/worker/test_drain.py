"""SIGTERM under load, against a real worker process: every accepted request is answered, the last heartbeat
says draining, and the process exits within its grace."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest

from fovea.client import RegistryClient
from fovea.cluster import Cluster
from fovea.v1 import model_pb2, registry_pb2
from tests.worker.conftest import busy_input, output_array, stub, tensor_request, typed_request
from tests.worker.slowmodels import busy_model

GRACE_S = 8.0


# "raw": tensors the native front batches itself; "typed": typed contents, which it reads into raw tensors first.
@pytest.mark.parametrize("via", ["raw", "typed"])
async def test_sigterm_under_load_answers_accepted_requests_and_exits_within_grace(cluster: Cluster, via: str) -> None:
    reg = cluster.start_registry()
    rc = RegistryClient(reg.address, cluster.admin_token, timeout_s=30)
    mv = await asyncio.to_thread(rc.register, busy_model(), model_pb2.ModelVersion(name="busy"))
    await asyncio.to_thread(rc.set_alias, "busy", "production", [(mv.version, 100)])
    worker = cluster.start_worker(
        reg.address,
        ["busy"],
        FOVEA_WORKER_PROVIDERS="CPUExecutionProvider",
        FOVEA_WORKER_INTRA_OP_THREADS="1",
        FOVEA_WORKER_MAX_BATCH_SIZE="4",
        FOVEA_WORKER_GRACE_S=str(GRACE_S),
        FOVEA_WORKER_HEARTBEAT_INTERVAL_S="0.3",
        FOVEA_WORKER_LOG_JSON="false",
    )
    md = (("authorization", f"Bearer {cluster.worker_call_token}"),)
    channel, s = stub(int(worker.address.rsplit(":", 1)[1]))
    results: list[tuple[float, float, str]] = []  # (sent, answered, status)
    unserved: list[bool] = []  # per UNAVAILABLE: whether it said the call never ran (fovea-unserved: 1)
    stop = asyncio.Event()

    async def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            sent = time.monotonic()
            req = tensor_request("busy", busy_input(1500, tag=1000 * i + n))
            try:
                resp = await s.ModelInfer(typed_request(req) if via == "typed" else req, metadata=md, timeout=30)
                assert output_array(resp)[0, 1] == 2 * (1000 * i + n)
                results.append((sent, time.monotonic(), "OK"))
            except grpc.aio.AioRpcError as exc:
                results.append((sent, time.monotonic(), exc.code().name))
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    trailing = dict(exc.trailing_metadata() or ())
                    unserved.append(trailing.get("fovea-unserved") == "1")
                    return  # a gateway would go to another worker now

    clients = [asyncio.ensure_future(client(i)) for i in range(12)]
    await asyncio.sleep(1.5)
    assert any(r[2] == "OK" for r in results)
    term = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(worker.proc.wait, GRACE_S + 5)
    exited = time.monotonic()
    stop.set()
    await asyncio.gather(*clients)
    await channel.close()

    assert code == 0
    assert exited - term < GRACE_S + 2  # the grace, plus the interpreter's own exit
    statuses = {r[2] for r in results}
    # Calls that reached the worker before the drain are answered; later ones are refused as UNAVAILABLE
    # (the gateway retries those on another worker). Nothing is cut off, nothing is INTERNAL.
    assert statuses <= {"OK", "UNAVAILABLE"}, [
        (round(s - term, 3), round(a - term, 3), st) for s, a, st in results if st not in ("OK", "UNAVAILABLE")
    ]
    assert all(st == "OK" for sent, _, st in results if sent < term - 0.2)
    assert all(unserved), "a refusal while draining must say the call never ran (fovea-unserved: 1)"
    assert any(st == "OK" and answered > term for _, answered, st in results), "nothing in flight was answered"
    log = worker.log_path.read_text()
    assert "drained" in log
    # The registry's last word from this worker is the draining heartbeat.
    workers = await asyncio.to_thread(rc.list_workers)
    mine = [w for w in workers if w.address == worker.address]
    assert not mine or mine[0].state == registry_pb2.WORKER_STATE_DRAINING
    rc.close()
