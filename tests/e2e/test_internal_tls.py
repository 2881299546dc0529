"""TLS on every internal hop: registry, worker and gateway processes with certificates from a throwaway CA,
the registry and workers requiring client certificates (mutual TLS). The cluster classifies; plaintext
callers, and callers without a client certificate, get nowhere."""

from __future__ import annotations

import datetime
import ipaddress
import pathlib

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fovea.client import Client, RegistryClient
from fovea.cluster import Cluster
from fovea.v1 import model_pb2
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.tinymodels import color_model, png


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: pathlib.Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[str, str]:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (path.with_suffix(".key")).write_bytes(key_pem)
    (path.with_suffix(".crt")).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path.with_suffix(".crt")), str(path.with_suffix(".key"))


def make_pki(folder: pathlib.Path, names: list[str]) -> dict[str, tuple[str, str]]:
    """A CA ('ca': its certificate, key) and, for each name, a certificate for 127.0.0.1 and localhost
    it signed, fit to serve and to dial with (no key-usage limits)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("fovea test CA"))
        .issuer_name(_name("fovea test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": _write(folder / "ca", ca_key, ca)}
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        san = x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"fovea-{name}"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(san, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        out[name] = _write(folder / name, key, cert)
    return out


def tls_env(pki: dict[str, tuple[str, str]]) -> dict[str, str]:
    """Every service serves TLS with its own certificate and dials with the CA; the registry and the workers
    require client certificates. (Each service reads only the variables of its own prefix.)"""
    ca = pki["ca"][0]
    env = {}
    for service in ("registry", "worker", "gateway"):
        prefix = f"FOVEA_{service.upper()}_TLS_"
        cert, key = pki[service]
        env.update({f"{prefix}CERT_FILE": cert, f"{prefix}KEY_FILE": key, f"{prefix}CA_FILE": ca})
    env["FOVEA_REGISTRY_TLS_CLIENT_CA_FILE"] = ca
    env["FOVEA_WORKER_TLS_CLIENT_CA_FILE"] = ca
    return env


def infer(address: str, token: str, credentials: grpc.ChannelCredentials | None) -> pb.ModelInferResponse:
    req = pb.ModelInferRequest(model_name="colors")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 3, 8, 8])
    req.raw_input_contents.append(np.zeros((1, 3, 8, 8), np.float32).tobytes())
    if credentials is None:
        channel = grpc.insecure_channel(address)
    else:
        channel = grpc.secure_channel(address, credentials)
    with channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return stub.ModelInfer(req, metadata=(("authorization", f"Bearer {token}"),), timeout=10)


def test_cluster_with_tls_on_every_internal_hop_classifies(cluster: Cluster, tmp_path: pathlib.Path) -> None:
    pki = make_pki(tmp_path / "pki", ["registry", "worker", "gateway", "operator"])
    ca = pki["ca"][0]
    cluster.env.update(tls_env(pki))
    reg = cluster.start_registry()
    op_cert, op_key = pki["operator"]
    rc = RegistryClient(reg.address, cluster.admin_token, tls_ca_file=ca, tls_cert_file=op_cert, tls_key_file=op_key)
    mv = rc.register(color_model(), model_pb2.ModelVersion(name="colors"))
    rc.set_alias("colors", "production", [(mv.version, 100)])
    _, secret = rc.create_key("infer")
    worker = cluster.start_worker(reg.address, ["colors"])
    gw = cluster.start_gateway(reg.address)
    with Client(gw.address, secret, tls_ca_file=ca, timeout_s=10) as client:
        resp = client.classify([png((10, 10, 220))], model="colors", top_k=1)
        assert resp.results[0].labels[0].label == "blue"
    # The gateway reached the worker over TLS, with its client certificate; so can this test.
    ca_pem = pathlib.Path(ca).read_bytes()
    cert, key = (pathlib.Path(p).read_bytes() for p in pki["gateway"])
    mutual = grpc.ssl_channel_credentials(ca_pem, private_key=key, certificate_chain=cert)
    assert infer(worker.address, cluster.worker_call_token, mutual).model_name == "colors"
    # Without TLS, or without a client certificate, neither the worker nor the registry answers.
    for address in (worker.address, reg.address):
        for credentials in (None, grpc.ssl_channel_credentials(ca_pem)):
            with pytest.raises(grpc.RpcError) as err:
                infer(address, cluster.worker_call_token, credentials)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (address, credentials)
    with pytest.raises(grpc.RpcError) as err:
        RegistryClient(reg.address, cluster.admin_token, timeout_s=5).list_models()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # The worker's one port is its native front, serving mutual TLS (above). Under TLS its heartbeats leave
    # fast_address empty: gateways built before the ports merged dial a fast address in plaintext.
    assert [w.fast_address for w in rc.list_workers("colors")] == [""]
    assert "(TLS)" in worker.log_path.read_text()
    rc.close()


def test_plaintext_client_to_a_tls_registry_fails(cluster: Cluster, tmp_path: pathlib.Path) -> None:
    pki = make_pki(tmp_path / "pki", ["registry"])
    cert, key = pki["registry"]
    reg = cluster.start_registry(FOVEA_REGISTRY_TLS_CERT_FILE=cert, FOVEA_REGISTRY_TLS_KEY_FILE=key)
    with pytest.raises(grpc.RpcError) as err:
        RegistryClient(reg.address, cluster.admin_token, timeout_s=5).list_models()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # server TLS only (no client certificates asked): a client that trusts the CA gets through
    with RegistryClient(reg.address, cluster.admin_token, tls_ca_file=pki["ca"][0]) as rc:
        assert rc.list_models() == []
