"""Encoded images take the worker's one data plane: the native front queues each image call for the decode
threads (worker/decoding.py), whose tensor then goes through the one validator, queue and batcher with every
other call. The Python server sees none of them (it only traces)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import grpc
import numpy as np
import pytest

import worker.decoding
from fovea.oip import decode_bytes, encode_bytes
from inference import grpc_predict_v2_pb2 as pb
from tests.tinymodels import color_model
from tests.worker.conftest import MD, LocalRegistry, StartWorker, poll, scrape, stub, tensor_request
from tests.worker.test_jpeg_scale import blue_photo


def image_request(photos: list[bytes], raw: bool = True, k: int = 1) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="colors")
    t = req.inputs.add(name="input", datatype="BYTES", shape=[len(photos)])
    if raw:
        req.raw_input_contents.append(encode_bytes(photos))
    else:
        t.contents.bytes_contents.extend(photos)
    req.outputs.add(name="logits").parameters["classification"].int64_param = k
    return req


def labels(resp: pb.ModelInferResponse, n: int) -> list[str]:
    return [x.decode().rsplit(":", 1)[-1] for x in decode_bytes(resp.raw_output_contents[0], n)]


def metric(page: str, prefix: str) -> float:
    return sum(float(ln.split()[-1]) for ln in page.splitlines() if ln.startswith(prefix))


async def test_image_calls_are_answered_without_the_python_server(
    registry: LocalRegistry, start_worker: StartWorker
) -> None:
    await registry.publish("colors", color_model())
    ws = await start_worker(["colors"], metrics_port=0)
    channel, s = stub(ws.port)
    photo = blue_photo(64, 48)
    answers = [
        await s.ModelInfer(image_request([photo], raw=True), metadata=MD, timeout=10),
        await s.ModelInfer(image_request([photo, photo, photo], raw=False), metadata=MD, timeout=10),
    ]
    assert labels(answers[0], 1) == ["blue"] and labels(answers[1], 3) == ["blue"] * 3
    assert [list(o.shape) for o in answers[1].outputs] == [[3, 1]]
    page = await scrape(ws.metrics.port)
    assert metric(page, 'fovea_worker_fast_port_requests_total{code="OK"}') == 2
    assert metric(page, 'fovea_worker_requests_total{code="OK",method="ModelInfer"}') == 0, "Python saw none"
    # decoding is timed per version, as before
    assert metric(page, 'fovea_worker_preprocess_seconds_count{model="colors",version="1"}') == 2
    await channel.close()


async def test_an_image_call_and_a_tensor_call_share_a_batch(
    registry: LocalRegistry, start_worker: StartWorker
) -> None:
    await registry.publish("colors", color_model())
    ws = await start_worker(["colors"], max_queue_delay_us=300_000)
    channel, s = stub(ws.port)
    x = np.zeros((2, 3, 8, 8), np.float32)
    x[:, 2] = 1.0  # blue
    img, raw = await asyncio.gather(
        s.ModelInfer(image_request([blue_photo(32, 32)]), metadata=MD, timeout=10),
        s.ModelInfer(tensor_request("colors", x), metadata=MD, timeout=10),
    )
    assert labels(img, 1) == ["blue"] and raw.outputs[0].shape == [2, 3]
    stats = ws.manager.fast_statistics(ws.manager.loaded[("colors", 1)])
    assert stats.execution_count == 1 and [b.batch_size for b in stats.batch_stats] == [3], stats
    await channel.close()


async def test_images_that_do_not_decode_are_refused_with_the_reason(
    registry: LocalRegistry, start_worker: StartWorker
) -> None:
    await registry.publish("colors", color_model())
    ws = await start_worker(["colors"], max_images_per_request=4)
    channel, s = stub(ws.port)
    cases = [
        (image_request([b"\xff\xd8\xff\xe0 not really a jpeg"]), "corrupt JPEG"),
        (image_request([b"GIF89a..."]), "not an image"),
        (image_request([blue_photo(8, 8)] * 5), "the limit is 4"),
        (image_request([]), "no images"),
    ]
    bad = image_request([blue_photo(8, 8)])
    bad.inputs[0].shape[:] = [2]  # one element framed, two declared
    cases.append((bad, "BYTES"))
    for req, why in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.ModelInfer(req, metadata=MD, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in (err.value.details() or ""), (
            why,
            err.value.details(),
        )
    assert labels(await s.ModelInfer(image_request([blue_photo(8, 8)]), metadata=MD, timeout=10), 1) == ["blue"]
    await channel.close()


async def test_calls_waiting_for_decoding_count_against_the_queue_bound(
    registry: LocalRegistry, start_worker: StartWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: decoding is held until released, so the calls stay on the image queue."""
    release = threading.Event()
    real = worker.decoding.decode

    def held(*args: Any, **kwargs: Any) -> np.ndarray:
        release.wait(20)
        return real(*args, **kwargs)

    monkeypatch.setattr(worker.decoding, "decode", held)
    await registry.publish("colors", color_model())
    ws = await start_worker(["colors"], decode_threads=1, max_queue_len=2)
    channel, s = stub(ws.port)
    photo = blue_photo(16, 16)
    first = [asyncio.ensure_future(s.ModelInfer(image_request([photo]), metadata=MD, timeout=20)) for _ in range(2)]
    lv = ws.manager.loaded[("colors", 1)]
    for _ in range(200):
        if ws.native.depth(lv.slot)[0] == 2:
            break
        await asyncio.sleep(0.02)
    assert ws.native.depth(lv.slot) == (2, 0), "both wait for decoding, and count as queued"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.ModelInfer(image_request([photo]), metadata=MD, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "is full" in (err.value.details() or "")
    release.set()
    assert [labels(r, 1) for r in await asyncio.gather(*first)] == [["blue"], ["blue"]]
    # the batch counts as busy until its loop is back from answering it, which can be after the answers arrive
    await poll(lambda: asyncio.sleep(0, ws.native.depth(lv.slot) == (0, 0)), timeout_s=5)
    await channel.close()
