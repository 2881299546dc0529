"""Issue #21, HTTP/REST: the gateway's HTTP port driven by the stock tritonclient.http client (health,
metadata, readiness, infer with the classification extension in binary and in JSON) and by plain HTTP on the
curl image endpoint, against a real registry and workers."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import ssl
import sys
from typing import Any

import aiohttp

from fovea.cluster import ROOT
from tests.gateway.conftest import GatewayFactory, Stack
from tests.tinymodels import png

PROBE = pathlib.Path(__file__).with_name("triton_http_probe.py")
BLUE, RED, GREEN = png((20, 20, 240)), png((240, 20, 20)), png((20, 240, 20))


async def test_tritonclient_http_against_gateway(
    stack: Stack, gateways: GatewayFactory, tmp_path: pathlib.Path
) -> None:
    gw = await gateways(http_port=0)
    secret = await asyncio.to_thread(stack.key)
    image = tmp_path / "blue.png"
    image.write_bytes(BLUE)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PROBE),
        f"127.0.0.1:{gw.http_port}",
        "colors",
        str(image),
        cwd=ROOT,
        env={**os.environ, "FOVEA_API_KEY": secret},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    out = json.loads(stdout.decode().strip().splitlines()[-1])
    assert out["live"] is True and out["ready"] is True and out["model_ready"] is True
    assert out["server"]["name"] == "fovea-gateway" and "classification" in out["server"]["extensions"]
    meta = out["metadata"]
    assert meta["name"] == "colors" and meta["versions"] == ["1"] and out["metadata_v1"] == meta
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 8, 8]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]
    config = out["config"]  # Triton's JSON model configuration: the batch dimension in max_batch_size
    assert config["name"] == "colors" and config["platform"] == "onnxruntime_onnx" and config["max_batch_size"] > 0
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [3, 8, 8]}]
    assert config["output"][0]["dims"] == [3] and config["output"][0]["label_filename"] == "labels.txt"
    for form in ("binary", "json_output"):  # two encoded images in; the classification extension's k=2 out
        answer = out[form]
        assert answer["shape"] == [2, 2] and answer["model_version"] == "1" and answer["id"] == f"call-{form}"
        best = answer["labels"][0].split(":", 2)
        assert (best[2], best[1]) == ("blue", "2") and float(best[0]) > 0.9, answer
        assert answer["labels"][2].split(":", 2)[2] == "blue"
    score, index, label = out["json"][0].split(":", 2)  # a JSON pixel tensor, answered in JSON
    assert (label, index) == ("blue", "2") and float(score) > 0.9
    assert out["logits"] == [[0.0, 0.0, 10.0]]
    (stats,) = out["statistics"]["model_stats"]  # the workers' statistics, summed, in Triton's JSON
    assert stats["name"] == "colors" and stats["inference_count"] >= 6 and stats["inference_stats"]["success"]["count"]
    assert out["unknown_key"][0] == "401" and "API key" in out["unknown_key"][1]
    assert out["no_key"][0] == "401" and "missing credentials" in out["no_key"][1]
    assert out["unknown_model"][0] == "404" and "no-such-model" in out["unknown_model"][1]


def form(*images: tuple[str, bytes], **fields: str) -> aiohttp.FormData:
    data = aiohttp.FormData()
    for filename, content in images:
        data.add_field("image", content, filename=filename, content_type="image/png")
    for name, value in fields.items():
        data.add_field(name, value)
    return data


async def classify(port: int, secret: str, data: Any, query: str = "", **headers: str) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{port}/v1/models/colors:classify{query}"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=data, headers={"Authorization": f"Bearer {secret}", **headers}) as resp:
            return resp.status, await resp.json()


async def test_image_endpoint_one_and_several_images(stack: Stack, gateways: GatewayFactory) -> None:
    gw = await gateways(http_port=0)
    secret = await asyncio.to_thread(stack.key)
    status, body = await classify(gw.http_port, secret, form(("cat.png", BLUE)))
    assert status == 200, body
    assert body["model"] == "colors" and body["version"] == 1 and len(body["results"]) == 1
    result = body["results"][0]
    assert result["image_id"] == "cat.png" and len(result["labels"]) == 3  # top_k 5 by default: at most 3 here
    assert result["labels"][0]["label"] == "blue" and result["labels"][0]["index"] == 2

    status, body = await classify(
        gw.http_port, secret, form(("a.png", RED), ("b.png", GREEN), ("c.png", BLUE), top_k="1")
    )
    assert status == 200, body
    assert [(r["image_id"], [lb["label"] for lb in r["labels"]]) for r in body["results"]] == [
        ("a.png", ["red"]),
        ("b.png", ["green"]),
        ("c.png", ["blue"]),
    ]
    # top_k and version in the query; one image as the whole body
    status, body = await classify(gw.http_port, secret, GREEN, "?top_k=2&version=1", **{"Content-Type": "image/png"})
    assert status == 200, body
    assert [lb["label"] for lb in body["results"][0]["labels"]][:1] == ["green"] and len(
        body["results"][0]["labels"]
    ) == 2


async def test_health_needs_no_key_and_metadata_does(stack: Stack, gateways: GatewayFactory) -> None:
    gw = await gateways(http_port=0)
    base = f"http://127.0.0.1:{gw.http_port}"
    async with aiohttp.ClientSession() as session:
        for path in ("/v2/health/live", "/v2/health/ready"):
            async with session.get(base + path) as resp:
                assert resp.status == 200, path
        for path in ("/v2", "/v2/models/colors", "/v2/models/colors/ready", "/v2/models/stats"):
            async with session.get(base + path) as resp:
                assert resp.status == 401 and "missing credentials" in (await resp.json())["error"], path
                assert resp.headers["WWW-Authenticate"] == "Bearer"
        secret = await asyncio.to_thread(stack.key)
        async with session.get(base + "/v2/models/stats", headers={"Authorization": f"Bearer {secret}"}) as resp:
            assert resp.status == 200 and {s["name"] for s in (await resp.json())["model_stats"]} >= {"colors"}


async def test_https_and_mutual_tls(stack: Stack, gateways: GatewayFactory, tmp_path: pathlib.Path) -> None:
    """The HTTP port serves TLS with the gRPC port's certificate, and asks for client certificates as it does."""
    from tests.gateway.test_observability import _certs

    f = _certs(tmp_path)
    tls = await gateways(http_port=0, tls_cert_file=str(f["server_cert"]), tls_key_file=str(f["server_key"]))
    mtls = await gateways(
        http_port=0,
        tls_cert_file=str(f["server_cert"]),
        tls_key_file=str(f["server_key"]),
        tls_client_ca_file=str(f["ca"]),
    )
    secret = await asyncio.to_thread(stack.key)
    trusting = ssl.create_default_context(cafile=str(f["ca"]))
    with_cert = ssl.create_default_context(cafile=str(f["ca"]))
    with_cert.load_cert_chain(str(f["client_cert"]), str(f["client_key"]))

    async def classify_over(port: int, context: ssl.SSLContext | None, scheme: str = "https") -> int | str:
        url = f"{scheme}://127.0.0.1:{port}/v1/models/colors:classify"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
                headers = {"Authorization": f"Bearer {secret}"}
                async with session.post(url, data=form(("x.png", BLUE)), headers=headers, ssl=context or True) as resp:
                    body = await resp.json()
                    assert resp.status != 200 or body["results"][0]["labels"][0]["label"] == "blue", body
                    return resp.status
        except aiohttp.ClientError as exc:
            return type(exc).__name__

    assert await classify_over(tls.http_port, trusting) == 200
    assert isinstance(await classify_over(tls.http_port, None, "http"), str)  # plaintext to a TLS port: no answer
    assert await classify_over(mtls.http_port, with_cert) == 200
    assert isinstance(await classify_over(mtls.http_port, trusting), str)  # no client certificate: no answer
