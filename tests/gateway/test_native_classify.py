"""Classify answered by the gateway's native front (issue 19, G2a), through the one port: the same answers and the
same refusals, word for word, as the Python server's, which still answers the calls of keys with rate limits
("relayed": a limit never reached here) and whatever the front leaves to it."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from fovea.v1 import image_pb2
from gateway.server import GatewayServer
from tests.gateway.conftest import GatewayFactory, Stack, auth, image_stub, status_of
from tests.gateway.test_quotas import worker_calls
from tests.tinymodels import png

RED, GREEN, BLUE = png((240, 20, 20)), png((20, 220, 20)), png((20, 20, 240))


def jpeg(color: tuple[int, int, int], size: int = 24, progressive: bool = False) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG", quality=95, progressive=progressive)
    return buf.getvalue()


def noise_png(size: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def request(*images: bytes, model: str = "colors", top_k: int = 0, **fields: Any) -> image_pb2.ClassifyRequest:
    return image_pb2.ClassifyRequest(
        model=model,
        top_k=top_k,
        images=[image_pb2.Image(data=d, id=f"img-{i}") for i, d in enumerate(images)],
        **fields,
    )


async def keys(stack: Stack, **limits: Any) -> dict[str, str]:
    """An unlimited key (the front answers its calls) and one with a limit never reached (relayed to Python)."""
    return {
        "native": await asyncio.to_thread(lambda: stack.key(**limits)),
        "relayed": await asyncio.to_thread(lambda: stack.key(rate_limit_rps=10_000.0, **limits)),
    }


def native(gw: GatewayServer) -> int:
    assert gw.native is not None
    return int(gw.native.counts()["native"])


async def test_native_answers_are_the_python_servers(stack: Stack, gateways: GatewayFactory) -> None:
    gw = await gateways()
    secrets = await keys(stack)
    channel, stub = image_stub(gw)
    for secret in secrets.values():  # each key verified once, and the model's version learned
        await stub.Classify(request(RED), metadata=auth(secret), timeout=10)
    calls = [
        request(RED),
        request(RED, GREEN, BLUE, top_k=1),
        request(BLUE, top_k=2),
        request(GREEN, top_k=100),  # past the 3 classes: "at most", 3 labels
        request(jpeg((240, 20, 20)), jpeg((20, 20, 240), progressive=True), top_k=3),
        request(RED, version=1),
    ]
    before = native(gw)
    for i, req in enumerate(calls):
        answers = {}
        for path, secret in secrets.items():
            call = stub.Classify(req, metadata=auth(secret, rid=f"{path}-{i}"), timeout=10)
            answers[path] = await call
            assert ("x-request-id", f"{path}-{i}") in tuple(await call.trailing_metadata())
        assert answers["native"] == answers["relayed"], (i, answers)
        assert [r.image_id for r in answers["native"].results] == [im.id for im in req.images]
        assert answers["native"].model == "colors" and answers["native"].version == 1
    labels = [r.labels[0].label for r in (await stub.Classify(calls[1], metadata=auth(secrets["native"]))).results]
    assert labels == ["red", "green", "blue"]
    assert native(gw) == before + len(calls) + 1  # every call of the unlimited key ran in C++, none of the other's
    await channel.close()


# (case, gateway settings, request, status, words): one table, answered alike on both paths, and no worker sees any
CASES: list[tuple[str, dict[str, Any], Any, grpc.StatusCode, str]] = [
    ("no images", {}, lambda: request(), grpc.StatusCode.INVALID_ARGUMENT, "no images"),
    ("65 images", {}, lambda: request(*[RED] * 65), grpc.StatusCode.INVALID_ARGUMENT, "65 images in one call"),
    ("top_k 101", {}, lambda: request(RED, top_k=101), grpc.StatusCode.INVALID_ARGUMENT, "top_k 101 exceeds"),
    (
        "image bytes",
        {"max_image_bytes": 4096},
        lambda: request(RED, noise_png(64)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "bytes; the limit is 4096",
    ),
    ("not an image", {}, lambda: request(b"hello there"), grpc.StatusCode.INVALID_ARGUMENT, "not an image"),
    (
        "corrupt JPEG",
        {},
        lambda: request(b"\xff\xd8\xff\xe0\x00\x02\xff\xda\x00\x02"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "corrupt JPEG",
    ),
    (
        "PNG pixels",
        {"max_image_pixels": 10_000},
        lambda: request(png((1, 2, 3), size=120)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "120x120 = 14400 pixels; the limit is 10000",
    ),
    (
        "JPEG pixels",
        {"max_image_pixels": 10_000},
        lambda: request(RED, jpeg((1, 2, 3), size=101)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "image 1 is 101x101 = 10201 pixels",
    ),
    ("model name", {}, lambda: request(RED, model="Bad Name"), grpc.StatusCode.INVALID_ARGUMENT, "model name"),
    ("unknown model", {}, lambda: request(RED, model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    ("unknown alias", {}, lambda: request(RED, alias="staging"), grpc.StatusCode.NOT_FOUND, "staging"),
    ("unknown version", {}, lambda: request(RED, version=7), grpc.StatusCode.NOT_FOUND, "7"),
    ("a tensor model", {}, lambda: request(RED, model="ident"), grpc.StatusCode.INVALID_ARGUMENT, "takes tensors"),
]


@pytest.mark.parametrize(("case", "settings", "make", "code", "words"), CASES, ids=[c[0] for c in CASES])
async def test_refusals_are_the_same_on_both_paths(
    stack: Stack, gateways: GatewayFactory, case: str, settings: dict[str, Any], make: Any, code: Any, words: str
) -> None:
    gw = await gateways(**settings)
    secrets = await keys(stack)
    channel, stub = image_stub(gw)
    for secret in secrets.values():
        await stub.Classify(request(RED), metadata=auth(secret), timeout=10)
    before, seen = native(gw), await worker_calls(stack, "colors")
    answers = {
        path: await status_of(stub.Classify(make(), metadata=auth(s), timeout=10)) for path, s in secrets.items()
    }
    assert answers["native"] == answers["relayed"], answers
    assert answers["native"][0] == code and words in answers["native"][1], answers
    assert native(gw) == before, "a refused call ran in C++"
    assert await worker_calls(stack, "colors") == seen, "a refused call reached a worker"
    await channel.close()


async def test_a_model_outside_the_keys_patterns_is_refused_on_both_paths(
    stack: Stack, gateways: GatewayFactory
) -> None:
    gw = await gateways()
    secrets = await keys(stack, model_patterns=["ident"])
    channel, stub = image_stub(gw)
    answers = {
        path: await status_of(stub.Classify(request(RED), metadata=auth(s), timeout=10)) for path, s in secrets.items()
    }
    for path, secret in secrets.items():  # the same words, each naming its own key
        key_id = secret.split("_")[1]
        assert answers[path] == (grpc.StatusCode.PERMISSION_DENIED, f"API key {key_id} may not use model 'colors'")
    assert native(gw) == 0
    await channel.close()


async def test_a_call_larger_than_a_worker_batch_is_split_by_python(stack: Stack, gateways: GatewayFactory) -> None:
    """More images than max_images_per_forward: the front leaves the call to Python, which sends it in chunks."""
    gw = await gateways(max_images_per_forward=2)
    secret = await asyncio.to_thread(stack.key)
    channel, stub = image_stub(gw)
    await stub.Classify(request(RED), metadata=auth(secret), timeout=10)
    before = native(gw)
    resp = await stub.Classify(request(RED, GREEN, BLUE, RED, GREEN, top_k=1), metadata=auth(secret), timeout=10)
    assert [r.labels[0].label for r in resp.results] == ["red", "green", "blue", "red", "green"]
    assert native(gw) == before
    resp = await stub.Classify(request(RED, BLUE, top_k=1), metadata=auth(secret), timeout=10)
    assert [r.labels[0].label for r in resp.results] == ["red", "blue"] and native(gw) == before + 1
    await channel.close()


async def test_native_classify_reaches_the_metrics_and_the_access_log(stack: Stack, gateways: GatewayFactory) -> None:
    gw = await gateways()
    assert gw.metrics.access_log is not None
    access = io.StringIO()
    gw.metrics.access_log.stream = access
    secret = await asyncio.to_thread(stack.key)
    channel, stub = image_stub(gw)
    await stub.Classify(request(RED), metadata=auth(secret), timeout=10)
    before = native(gw)
    for i in range(3):
        await stub.Classify(request(RED, BLUE), metadata=auth(secret, rid=f"classify-{i}"), timeout=10)
    assert native(gw) == before + 3
    await asyncio.sleep(0.5)  # drained every 0.2 s
    gw.metrics.access_log.flush()
    lines = {line.get("request_id"): line for line in map(json.loads, access.getvalue().splitlines())}
    for i in range(3):
        line = lines[f"classify-{i}"]
        assert (line["method"], line["code"], line["model"], line["version"]) == ("Classify", "OK", "colors", "1")
    text = gw.metrics.exposition().decode()
    assert 'fovea_gateway_requests_total{code="OK",method="Classify",model="colors"} 4.0' in text, text
    await channel.close()
