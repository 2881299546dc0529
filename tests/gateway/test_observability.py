"""Observability and transport: Prometheus metrics, request ids (response metadata and JSON
logs), grpc.health.v1, server reflection, and optional TLS and mutual TLS."""

from __future__ import annotations

import asyncio
import datetime
import io
import ipaddress
import json
import logging
import pathlib
import urllib.request

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fovea.client import Client
from fovea.log import ContextFilter, JsonFormatter
from fovea.v1 import image_pb2_grpc
from tests.gateway.conftest import GatewayFactory, Stack, auth, classify_request, image_stub, status_of, wait_routable
from tests.tinymodels import png

RED = png((240, 20, 20))


class JsonLines(logging.Handler):
    """Formats records exactly as the services do, and keeps them."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter("gateway"))
        self.addFilter(ContextFilter())
        self.lines: list[dict[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


async def test_metrics_endpoint_and_request_ids(stack: Stack, gateways: GatewayFactory) -> None:
    handler = JsonLines()
    rpc_logger = logging.getLogger("fovea.rpc")  # where the interceptor logs each error, once
    old_level = rpc_logger.level
    rpc_logger.setLevel(logging.INFO)
    rpc_logger.addHandler(handler)
    access = io.StringIO()
    try:
        gw = await gateways(metrics_port=0)
        assert gw.metrics.access_log is not None
        gw.metrics.access_log.stream = access
        secret = await asyncio.to_thread(stack.key)
        channel, stub = image_stub(gw)
        call = stub.Classify(classify_request(RED), metadata=auth(secret, rid="trace-me-42"), timeout=10)
        await call
        assert dict(await call.trailing_metadata())["x-request-id"] == "trace-me-42"
        call = stub.Classify(classify_request(RED), metadata=auth(secret), timeout=10)
        await call
        made = dict(await call.trailing_metadata())["x-request-id"]
        assert len(made) == 32 and made != "trace-me-42"
        bad = stub.Classify(classify_request(b"junk"), metadata=auth(secret, rid="bad-one-7"), timeout=10)
        assert (await status_of(bad))[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(await bad.trailing_metadata())["x-request-id"] == "bad-one-7"
        await asyncio.sleep(0.5)  # the native front's records reach the access log and metrics every 0.2 s
        gw.metrics.access_log.flush()
    finally:
        rpc_logger.removeHandler(handler)
        rpc_logger.setLevel(old_level)
    lines = [json.loads(line) for line in access.getvalue().splitlines()]
    by_rid = {line.get("request_id"): line for line in lines}
    assert by_rid["trace-me-42"]["msg"].startswith("Classify OK") and by_rid["trace-me-42"]["model"] == "colors"
    assert by_rid["trace-me-42"]["code"] == "OK" and by_rid[made]["service"] == "gateway"
    assert by_rid["bad-one-7"]["code"] == "INVALID_ARGUMENT"
    errors = [line for line in handler.lines if line.get("request_id") == "bad-one-7"]
    assert errors and "INVALID_ARGUMENT" in errors[0]["msg"]
    assert secret not in access.getvalue() + json.dumps(handler.lines)  # keys are never logged

    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10).read().decode()
    )
    assert 'fovea_gateway_requests_total{code="OK",method="Classify",model="colors"} 2.0' in text
    assert 'fovea_gateway_requests_total{code="INVALID_ARGUMENT",method="Classify",model=""} 1.0' in text
    assert 'fovea_gateway_request_seconds_bucket{le="+Inf",method="Classify"} 3.0' in text
    assert "fovea_gateway_upstream_retries_total 0.0" in text
    assert 'fovea_gateway_upstream_requests_total{code="OK",worker="worker' in text
    await channel.close()


async def test_health_and_reflection(stack: Stack, gateways: GatewayFactory) -> None:
    gw = await gateways()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}")
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "fovea.v1.ImageService", "inference.GRPCInferenceService"):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask() -> reflection_pb2.ServerReflectionResponse:
        async for resp in refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        ):
            return resp
        raise AssertionError("no reflection answer")

    names = {s.name for s in (await ask()).list_services_response.service}
    assert {"fovea.v1.ImageService", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    await channel.close()


def _certs(tmp: pathlib.Path) -> dict[str, pathlib.Path]:
    """A CA, a server certificate for 127.0.0.1/localhost, and a client certificate, all made here."""
    now = datetime.datetime.now(datetime.UTC)

    def make(
        name: str,
        issuer_key: ec.EllipticCurvePrivateKey | None,
        issuer: x509.Name | None,
        ca: bool,
        san: list[x509.GeneralName],
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer or subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, builder.sign(issuer_key or key, hashes.SHA256())

    ca_key, ca_cert = make("fovea test CA", None, None, True, [])
    files = {}
    leaves: list[tuple[str, list[x509.GeneralName]]] = [
        ("server", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        ("client", [x509.DNSName("client")]),
    ]
    for name, san in leaves:
        key, cert = make(name, ca_key, ca_cert.subject, False, san)
        files[f"{name}_key"] = tmp / f"{name}.key"
        files[f"{name}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        files[f"{name}_cert"] = tmp / f"{name}.pem"
        files[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["ca"] = tmp / "ca.pem"
    files["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return files


async def test_tls_and_mutual_tls(stack: Stack, gateways: GatewayFactory, tmp_path: pathlib.Path) -> None:
    f = _certs(tmp_path)
    secret = await asyncio.to_thread(stack.key)
    req = classify_request(RED)
    tls = await gateways(tls_cert_file=str(f["server_cert"]), tls_key_file=str(f["server_key"]))
    mtls = await gateways(
        tls_cert_file=str(f["server_cert"]), tls_key_file=str(f["server_key"]), tls_client_ca_file=str(f["ca"])
    )
    ca = f["ca"].read_bytes()
    client_pair = dict(private_key=f["client_key"].read_bytes(), certificate_chain=f["client_cert"].read_bytes())

    async def classify(port: int, creds: grpc.ChannelCredentials | None) -> grpc.StatusCode:
        address = f"127.0.0.1:{port}"
        channel = grpc.aio.secure_channel(address, creds) if creds else grpc.aio.insecure_channel(address)
        code, _ = await status_of(
            image_pb2_grpc.ImageServiceStub(channel).Classify(req, metadata=auth(secret), timeout=5)
        )
        await channel.close()
        return code

    assert await classify(tls.port, grpc.ssl_channel_credentials(ca)) == grpc.StatusCode.OK
    assert await classify(tls.port, None) == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port
    assert await classify(tls.port, grpc.ssl_channel_credentials()) == grpc.StatusCode.UNAVAILABLE  # unknown CA
    assert await classify(mtls.port, grpc.ssl_channel_credentials(ca, **client_pair)) == grpc.StatusCode.OK
    assert await classify(mtls.port, grpc.ssl_channel_credentials(ca)) == grpc.StatusCode.UNAVAILABLE  # no client cert

    def python_client() -> str:  # fovea.client with a client certificate (blocking: runs in a thread)
        with Client(
            f"127.0.0.1:{mtls.port}",
            secret,
            timeout_s=10,
            tls_ca_file=str(f["ca"]),
            tls_cert_file=str(f["client_cert"]),
            tls_key_file=str(f["client_key"]),
        ) as c:
            return c.classify([RED], model="colors", top_k=1).results[0].labels[0].label

    assert await asyncio.to_thread(python_client) == "red"


async def test_mutual_tls_covers_the_native_and_the_relayed_path_of_the_one_port(
    stack: Stack, gateways: GatewayFactory, tmp_path: pathlib.Path
) -> None:
    """Raw-tensor ModelInfer and Classify (answered by the front) and ModelMetadata (relayed to the Python server's
    unix socket) through the same mutual-TLS port; without a client certificate, or in plaintext, none gets
    through."""
    import numpy as np

    from inference import grpc_predict_v2_pb2 as pb
    from inference import grpc_predict_v2_pb2_grpc as pb_grpc

    f = _certs(tmp_path)
    secret = await asyncio.to_thread(stack.key)
    mtls = await gateways(
        tls_cert_file=str(f["server_cert"]), tls_key_file=str(f["server_key"]), tls_client_ca_file=str(f["ca"])
    )
    assert mtls.port > 0
    ca = f["ca"].read_bytes()
    client_pair = dict(private_key=f["client_key"].read_bytes(), certificate_chain=f["client_cert"].read_bytes())
    req = pb.ModelInferRequest(model_name="ident")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())

    async def infer(creds: grpc.ChannelCredentials | None) -> grpc.StatusCode:
        address = f"127.0.0.1:{mtls.port}"
        channel = grpc.aio.secure_channel(address, creds) if creds else grpc.aio.insecure_channel(address)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        code, _ = await status_of(stub.ModelInfer(req, metadata=auth(secret), timeout=5))
        if code == grpc.StatusCode.OK:  # images, through the same port
            code, _ = await status_of(
                image_pb2_grpc.ImageServiceStub(channel).Classify(
                    classify_request(RED), metadata=auth(secret), timeout=5
                )
            )
        if code == grpc.StatusCode.OK:  # and the Python path behind it
            code, _ = await status_of(
                stub.ModelMetadata(pb.ModelMetadataRequest(name="ident"), metadata=auth(secret), timeout=5)
            )
        await channel.close()
        return code

    await wait_routable(mtls, "ident")
    for _ in range(2):  # the first call verifies the key through Python, the second runs natively
        assert await infer(grpc.ssl_channel_credentials(ca, **client_pair)) == grpc.StatusCode.OK
    assert mtls.native is not None
    counts = mtls.native.counts()
    assert counts["native"] >= 2 and counts["python"] >= 2, counts  # both ModelMetadata calls were relayed
    assert await infer(grpc.ssl_channel_credentials(ca)) == grpc.StatusCode.UNAVAILABLE  # no client cert
    assert await infer(None) == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port
