"""Issue #21, HTTP/REST refusals: each refused call gets its HTTP status (the gRPC error table mapped as KServe's
v2 REST binding does) and a JSON error, the gateway keeps serving after each, bodies over the limit and bodies
of unauthenticated callers are refused from their headers (the body never sent here, the answer comes anyway),
and slow clients lose their connection."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from tests.gateway.conftest import GatewayFactory, Stack
from tests.tinymodels import png

BLUE = png((20, 20, 240))
UNKNOWN_KEY = "fv_aaaaaaaaaaaa_" + "x" * 43


async def call(port: int, method: str, path: str, secret: str | None = None, **kwargs: Any) -> tuple[int, Any, Any]:
    headers = kwargs.pop("headers", {})
    if "images" in kwargs:  # a form of its own per call: aiohttp sends a FormData once
        kwargs["data"] = images(*kwargs.pop("images"))
    if secret is not None:
        headers["Authorization"] = f"Bearer {secret}"
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"http://127.0.0.1:{port}{path}", headers=headers, **kwargs) as resp:
            assert resp.content_type == "application/json", (resp.status, await resp.text())
            return resp.status, await resp.json(), resp.headers


def images(*items: bytes) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for i, data in enumerate(items):
        form.add_field("image", data, filename=f"{i}.png", content_type="image/png")
    return form


async def still_serving(port: int, secret: str) -> None:
    status, body, _ = await call(port, "POST", "/v1/models/colors:classify", secret, data=images(BLUE))
    assert status == 200 and body["results"][0]["labels"][0]["label"] == "blue", body


async def test_refusals_get_their_status_and_a_json_error(stack: Stack, gateways: GatewayFactory) -> None:
    gw = await gateways(http_port=0, max_images_per_call=3)
    port = gw.http_port
    secret = await asyncio.to_thread(stack.key)
    ident_only = await asyncio.to_thread(lambda: stack.key(model_patterns=["ident"]))
    limited = await asyncio.to_thread(lambda: stack.key(rate_limit_rps=1, rate_burst=1))
    tensor = {"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.5] * 192}
    infer: dict[str, Any] = {"inputs": [tensor]}
    short = {"json": {"inputs": [{**tensor, "data": [1.0]}]}}
    big_k = {"json": {**infer, "outputs": [{"name": "logits", "parameters": {"classification": 10**6}}]}}
    text_body = {"data": b"x", "headers": {"Content-Type": "text/plain"}}
    nan_data = {"data": json.dumps({"inputs": [{**tensor, "data": [float("nan")] * 192}]}).encode()}
    null_data = {"json": {"inputs": [{**tensor, "data": [None] + [0.5] * 191}]}}

    def bad_form(content_type: str) -> dict[str, Any]:
        return {"data": b"garbage\r\n--c--\r\n", "headers": {"Content-Type": content_type}}

    no_time = {"json": {**infer, "parameters": {"timeout": 1}}}  # Triton's timeout parameter: 1 microsecond
    one, four, junk = {"images": [BLUE]}, {"images": [BLUE] * 4}, {"images": [b"not an image"]}
    classify, infer_path = "/v1/models/colors:classify", "/v2/models/colors/infer"
    cases: list[tuple[str, str, str, str | None, dict[str, Any], int, str]] = [
        ("no key", "POST", classify, None, one, 401, "missing credentials"),
        ("wrong key", "POST", classify, UNKNOWN_KEY, one, 401, "API key"),
        ("malformed key", "GET", "/v2/models/colors", "not-a-key", {}, 401, "malformed API key"),
        ("unknown model", "POST", "/v1/models/no-such-model:classify", secret, one, 404, "no-such-model"),
        (
            "unknown model, infer",
            "POST",
            "/v2/models/no-such-model/infer",
            secret,
            {"json": infer},
            404,
            "no-such-model",
        ),
        ("non-image bytes", "POST", classify, secret, junk, 400, "image"),
        ("too many images", "POST", classify, secret, four, 400, "limit is 3"),
        ("model not allowed", "POST", classify, ident_only, one, 403, "may not use"),
        ("bad version", "GET", "/v2/models/colors/versions/x1", secret, {}, 400, "positive number"),
        ("no such version", "GET", "/v2/models/colors/versions/7", secret, {}, 404, "7"),
        ("not JSON", "POST", infer_path, secret, {"data": b"{nope"}, 400, "not valid JSON"),
        ("NaN is not JSON", "POST", infer_path, secret, nan_data, 400, "NaN is not a JSON number"),
        ("null data", "POST", infer_path, secret, null_data, 400, "holds null"),
        ("JSON nested too deeply", "POST", infer_path, secret, {"data": b"[" * 100_000}, 400, "nested too deeply"),
        ("shape and data disagree", "POST", infer_path, secret, short, 400, "192"),
        ("no inputs", "POST", infer_path, secret, {"json": {"inputs": []}}, 400, "inputs"),
        ("k over the limit", "POST", infer_path, secret, big_k, 400, "classification"),
        ("unknown path", "GET", "/v2/nothing/here", secret, {}, 404, "no route"),
        ("wrong method", "DELETE", "/v2/models/colors", secret, {}, 405, "no route"),
        ("not a form", "POST", classify, secret, text_body, 400, "multipart/form-data"),
        ("no boundary", "POST", classify, secret, bad_form("multipart/form-data"), 400, "multipart body is malformed"),
        ("bad form", "POST", classify, secret, bad_form("multipart/form-data; boundary=b"), 400, "malformed"),
        ("deadline", "POST", infer_path, secret, no_time, 504, "deadline"),
        (
            "bad timeout",
            "POST",
            infer_path,
            secret,
            {"json": {**infer, "parameters": {"timeout": "1s"}}},
            400,
            "timeout",
        ),
    ]
    for name, method, path, key, kwargs, want, text in cases:
        status, body, headers = await call(port, method, path, key, **kwargs)
        assert (status, text in body.get("error", "")) == (want, True), (name, status, body)
        assert headers.get("x-request-id") or status in (404, 405), name
        await still_serving(port, secret)
    # a key over its rate limit: 429 with Retry-After, as gRPC's RESOURCE_EXHAUSTED
    answers = [await call(port, "POST", "/v1/models/colors:classify", limited, data=images(BLUE)) for _ in range(3)]
    refused = [(body, headers) for status, body, headers in answers if status == 429]
    assert refused and "rate limit" in refused[0][0]["error"], answers
    assert int(refused[0][1]["Retry-After"]) >= 1
    await still_serving(port, secret)


async def raw_call(port: int, head: str, body: bytes = b"", timeout_s: float = 10.0) -> bytes:
    """Send a request's head (and maybe part of a body) on a socket of its own; everything the gateway answers
    until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode() + body)
        await writer.drain()
        return await asyncio.wait_for(reader.read(1 << 20), timeout_s) + await asyncio.wait_for(
            reader.read(), timeout_s
        )
    finally:
        writer.close()


def head(path: str, secret: str, length: int, *extra: str) -> str:
    lines = [f"POST {path} HTTP/1.1", "Host: gateway", f"Authorization: Bearer {secret}", f"Content-Length: {length}"]
    return "\r\n".join([*lines, *extra, ""]) + "\r\n"


def status_and_error(answer: bytes) -> tuple[int, str, bytes]:
    head_part, _, body = answer.partition(b"\r\n\r\n")
    status = int(head_part.split(b" ", 2)[1])
    return status, json.loads(body)["error"], head_part


async def test_oversize_and_unauthenticated_bodies_refused_from_their_headers(
    stack: Stack, gateways: GatewayFactory
) -> None:
    gw = await gateways(http_port=0, http_max_body_bytes=1 << 20, http_max_json_bytes=1 << 16)
    port = gw.http_port
    secret = await asyncio.to_thread(stack.key)
    form = "Content-Type: multipart/form-data; boundary=b"
    # A gigabyte announced, none of it sent: the answer comes from the headers alone, and the connection
    # closes (the body was never read, so no further request may follow on it).
    for path, extra in (
        ("/v1/models/colors:classify", [form]),
        ("/v1/models/colors:classify", [form, "Expect: 100-continue"]),
        ("/v2/models/colors/infer", ["Content-Type: application/json"]),
        ("/v2/models/colors/infer", ["Inference-Header-Content-Length: 100"]),
    ):
        answer = await raw_call(port, head(path, secret, 1 << 30, *extra))
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]  # no "100 Continue" before it
        status, error, headers = status_and_error(answer)
        assert "limit is" in error and b"Connection: close" in headers, (path, error, headers)
    # a JSON header over its own limit in a body under the body limit
    answer = await raw_call(
        port, head("/v2/models/colors/infer", secret, 1000, f"Inference-Header-Content-Length: {1 << 17}")
    )
    assert status_and_error(answer)[:2] == (413, f"the JSON header is {1 << 17} bytes; the limit is {1 << 16}")
    # an unknown key announcing a large body (under the limit) is refused before it sends any of it
    answer = await raw_call(
        port, head("/v1/models/colors:classify", UNKNOWN_KEY, 1 << 19, form, "Expect: 100-continue")
    )
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    # a chunked body (no Content-Length) past the limit is cut off at the limit while it is read
    chunked = "\r\n".join(["POST /v2/models/colors/infer HTTP/1.1", "Host: gateway", f"Authorization: Bearer {secret}",
                           "Transfer-Encoding: chunked", "Content-Type: application/json", "", ""])  # fmt: skip
    chunk = b"%x\r\n%s\r\n" % (1 << 16, b" " * (1 << 16))
    answer = await raw_call(port, chunked, chunk * 3)
    assert status_and_error(answer)[0] == 413, answer[:300]
    await still_serving(port, secret)


async def test_slow_clients_lose_their_connection_and_the_cap_holds(stack: Stack, gateways: GatewayFactory) -> None:
    gw = await gateways(http_port=0, http_idle_timeout_s=1, http_client_timeout_s=1, http_max_concurrent=1)
    port = gw.http_port
    secret = await asyncio.to_thread(stack.key)
    loop = asyncio.get_running_loop()
    # headers that never end: closed once the idle timeout passes
    start = loop.time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    assert loop.time() - start < 10
    # a body that never comes: 408 once the client timeout passes; while it waits, it holds the only slot
    slow = asyncio.create_task(raw_call(port, head("/v2/models/colors/infer", secret, 1000), b"{", timeout_s=10))
    await asyncio.sleep(0.3)
    status, body, _ = await call(port, "GET", "/v2", secret)
    assert status == 503 and "in flight" in body["error"], body
    status, body, _ = await call(port, "GET", "/v2/health/live")  # probes are not counted: never restarted for load
    assert status == 200, body
    answer = await slow
    assert status_and_error(answer)[0] == 408, answer[:300]
    await still_serving(port, secret)


async def test_one_keys_slow_bodies_cannot_take_every_http_slot(stack: Stack, gateways: GatewayFactory) -> None:
    """A key's HTTP requests in flight are capped (http_max_calls_per_key) below the port's cap: without it one
    key's bodies that never come held every slot until the client timeout, and every other caller got 503. Past
    its cap that key gets 429 with Retry-After; another key is served; a finished request frees its slot."""
    gw = await gateways(http_port=0, http_client_timeout_s=2, http_max_concurrent=4, http_max_calls_per_key=2)
    port = gw.http_port
    hog, other = await asyncio.to_thread(stack.key), await asyncio.to_thread(stack.key)
    slow = [
        asyncio.create_task(raw_call(port, head("/v2/models/colors/infer", hog, 1000), b"{", timeout_s=10))
        for _ in range(2)
    ]
    await asyncio.sleep(0.5)
    status, body, headers = await call(port, "GET", "/v2", hog)
    assert status == 429 and "2 HTTP requests in flight" in body["error"], body
    assert "Retry-After" in headers
    await still_serving(port, other)
    for answer in await asyncio.gather(*slow):
        assert status_and_error(answer)[0] == 408, answer[:300]
    await still_serving(port, hog)
