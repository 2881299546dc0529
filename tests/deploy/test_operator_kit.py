"""The operator kit (issue #21): the Grafana dashboard and the Prometheus alert rules validate offline against
schemas written from their formats' documentation, every PromQL expression parses, and every metric they name
exists on live services (a real registry, worker and gateways, driven with good, refused and rate-limited calls).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import math
import pathlib
import shutil
import time
import urllib.request
from collections.abc import Iterator

import grpc
import jsonschema
import numpy as np
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from deploy.grafana import promql, render
from fovea.cert_expiry import CertificateExpiry
from fovea.client import Client
from fovea.redis_server import free_port
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.deploy.manifests import find
from tests.deploy.manifests import render as kustomize
from tests.e2e.live import Live, start_gateway, start_live
from tests.tinymodels import png

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).parent
DASHBOARD = ROOT / "deploy/grafana/fovea.json"
RULES = ROOT / "deploy/prometheus/fovea-rules.yaml"
PROMETHEUS_RULE = ROOT / "deploy/k8s/components/alert-rules/prometheusrule.yaml"
# Grafana's variables as Grafana interpolates them before sending a query to Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "${datasource}": "prometheus", "$model": ".*", "$worker": ".*"}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
# Only on GPU workers: declared (HELP/TYPE) everywhere, with samples only where NVML sees a GPU.
GPU_ONLY = {
    "fovea_worker_gpu_memory_used_bytes",
    "fovea_worker_gpu_memory_total_bytes",
    "fovea_worker_gpu_utilization_ratio",
}


def interpolate(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable left in {expr!r}"
    return expr


def dashboard() -> dict:  # type: ignore[type-arg]
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    return [interpolate(t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]


def alert_rules() -> list[dict]:  # type: ignore[type-arg]
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def used_metrics() -> set[str]:
    names: set[str] = set()
    for expr in [*dashboard_exprs(), *(r["expr"] for r in alert_rules())]:
        names |= promql.metric_names(expr)
    return names


# ---- offline ----------------------------------------------------------------


def test_dashboard_validates_against_the_schema() -> None:
    schema = json.loads((HERE / "grafana-dashboard.schema.json").read_text())
    jsonschema.validate(dashboard(), schema)
    broken = dashboard()
    broken["panels"][1]["gridPos"]["w"] = 25  # wider than Grafana's 24 columns
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    broken = dashboard()
    broken["panels"][1]["targets"][0]["exprr"] = "x"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_dashboard_layout_variables_and_topics() -> None:
    d = dashboard()
    assert d["schemaVersion"] == 41  # Grafana 12's classic model
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"model", "worker"} <= set(variables)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)), p["title"]
    used = used_metrics()
    # The topics of issue #21: requests and errors, latency per hop, batch sizes, queue depth, GPU memory and
    # utilisation, workers per model, key refusals and rate-limit hits.
    for name in [
        "fovea_gateway_requests_total",
        "fovea_gateway_request_seconds_bucket",
        "fovea_worker_request_seconds_bucket",
        "fovea_worker_queue_seconds_bucket",
        "fovea_worker_compute_seconds_bucket",
        "fovea_worker_batch_size_bucket",
        "fovea_worker_model_queue_depth",
        "fovea_worker_gpu_memory_used_bytes",
        "fovea_worker_gpu_utilization_ratio",
        "fovea_gateway_ready_workers",
        "fovea_gateway_key_refusals_total",
        "fovea_gateway_rate_limited_total",
    ]:
        assert name in used, name


def test_rules_validate_and_carry_for_severity_and_annotations() -> None:
    doc = yaml.safe_load(RULES.read_text())
    jsonschema.validate(doc, json.loads((HERE / "prometheus-rules.schema.json").read_text()))
    alerts = {r["alert"]: r for r in alert_rules()}
    assert {
        "FoveaHighErrorRate",
        "FoveaLatencyP99High",
        "FoveaNoReadyWorker",
        "FoveaQueueNearFull",
        "FoveaCertificateExpiresSoon",
        "FoveaApiKeyExpiresSoon",
    } <= set(alerts)
    for name, rule in alerts.items():
        assert promql.seconds(rule["for"]) > 0, name
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    broken = json.loads(json.dumps(doc))
    broken["groups"][0]["rules"][0]["for"] = "5 minutes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.loads((HERE / "prometheus-rules.schema.json").read_text()))


def test_prometheusrule_carries_the_same_groups_and_renders() -> None:
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    jsonschema.validate(rule, json.loads((HERE / "prometheusrule.schema.json").read_text()))
    jsonschema.validate(rule["spec"], json.loads((HERE / "prometheus-rules.schema.json").read_text()))
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_alert_rules_component_renders_into_an_overlay(tmp_path: pathlib.Path) -> None:
    objs = kustomize(tmp_path, "cpu-dev", ("alert-rules",))
    (rule,) = find(objs, "PrometheusRule")
    assert rule["metadata"]["namespace"] == "fovea"
    assert rule["metadata"]["labels"]["app.kubernetes.io/part-of"] == "fovea"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_every_expression_parses() -> None:
    exprs = [*dashboard_exprs(), *(r["expr"] for r in alert_rules())]
    assert len(exprs) > 20
    for expr in exprs:
        promql.parse(expr)
    assert all(name.startswith("fovea_") for name in used_metrics())


@pytest.mark.parametrize(
    "bad",
    [
        "sum by (model (rate(fovea_gateway_requests_total[5m]))",  # unbalanced
        "rate(fovea_gateway_requests_total)",  # rate of an instant vector
        "rates(fovea_gateway_requests_total[5m])",  # no such function
        'fovea_gateway_requests_total{code="OK"',  # unclosed matchers
        'fovea_gateway_requests_total{code=="OK"}',  # == is not a matcher
        "fovea_gateway_requests_total[5 minutes]",  # not a duration
        "histogram_quantile(0.99)",  # too few arguments
        "sum(x) by",  # dangling by
        "x > > 1",
    ],
)
def test_the_parser_refuses_broken_expressions(bad: str) -> None:
    with pytest.raises(promql.PromQLError):
        promql.parse(bad)


def test_the_evaluator_computes_rates_quantiles_and_matching() -> None:
    def s(name: str, v: float, **labels: str) -> promql.Sample:
        return (name, frozenset(labels.items()), v)

    points = []
    for t in range(0, 61, 10):  # a histogram: 10 calls a second, 1/4 under 10 ms, all under 100 ms
        n = 10.0 * t
        points.append(
            (
                float(t),
                [
                    s("h_bucket", n / 4, le="0.01", model="a"),
                    s("h_bucket", n, le="0.1", model="a"),
                    s("h_bucket", n, le="+Inf", model="a"),
                    s("ready", 1.0, model="a"),
                    s("calls_total", n, model="a"),
                    s("calls_total", n, model="b"),
                ],
            )
        )
    data = promql.Scrapes(points)

    def ev(expr: str) -> promql.Vector | float:
        return promql.evaluate(promql.parse(expr), data, 60.0)

    assert ev("sum by (model) (rate(calls_total[1m]))") == {
        frozenset({("model", "a")}): 10.0,
        frozenset({("model", "b")}): 10.0,
    }
    p50 = ev("histogram_quantile(0.5, sum by (le, model) (rate(h_bucket[1m])))")
    assert isinstance(p50, dict)
    # rank 0.5 of 10/s falls in (0.01, 0.1]: 0.01 + 0.09 * (5 - 2.5) / (10 - 2.5)
    assert math.isclose(p50[frozenset({("model", "a")})], 0.01 + 0.09 * 2.5 / 7.5)
    no_worker = ev("(sum by (model) (rate(calls_total[1m])) > 0) unless on (model) (max by (model) (ready) > 0)")
    assert no_worker == {frozenset({("model", "b")}): 10.0}
    assert ev("1 + 2 * 3") == 7.0


def _certificate(folder: pathlib.Path, days: int) -> tuple[str, str, float]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    expires = now + datetime.timedelta(days=days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(expires)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"cert{days}.pem", folder / f"key{days}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path), cert.not_valid_after_utc.timestamp()


def first_family(registry: CollectorRegistry) -> Metric:
    return list(text_string_to_metric_families(generate_latest(registry).decode()))[0]


def test_certificate_expiry_reads_the_files_and_follows_a_rotation(tmp_path: pathlib.Path) -> None:
    cert, _, expires = _certificate(tmp_path, 30)
    registry = CollectorRegistry()
    registry.register(CertificateExpiry("x_certificate_expiry_timestamp_seconds", {"server": cert, "ca": ""}))
    (sample,) = first_family(registry).samples
    assert sample.labels == {"file": "cert30.pem", "role": "server"} and sample.value == pytest.approx(expires)
    newer, _, later = _certificate(tmp_path, 90)
    shutil.copy(newer, cert)  # a rotation replaces the file
    (sample,) = first_family(registry).samples
    assert sample.value == pytest.approx(later)
    pathlib.Path(cert).write_text("not a certificate")  # left out, never a failed scrape
    assert not first_family(registry).samples


# ---- live -------------------------------------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def names_in(text: str) -> tuple[set[str], set[str]]:
    """(names of samples, names of declared families with each sample-name form a family may take)."""
    samples: set[str] = set()
    declared: set[str] = set()
    for family in text_string_to_metric_families(text):
        declared |= {family.name + s for s in ("", "_total", *HISTOGRAM_SUFFIXES)}
        samples |= {s.name for s in family.samples}
    return samples, declared


@pytest.fixture
def live(tmp_path: pathlib.Path, redis_url: str) -> Iterator[tuple[Live, dict[str, int]]]:
    ports = {"worker": free_port(), "gateway": free_port()}
    cluster = start_live(
        tmp_path / "live",
        redis_url,
        worker_env={"FOVEA_WORKER_METRICS_PORT": str(ports["worker"])},
        gateway_env={"FOVEA_GATEWAY_METRICS_PORT": str(ports["gateway"])},
    )
    try:
        yield cluster, ports
    finally:
        cluster.stop()


def test_every_metric_in_the_dashboard_and_rules_exists_on_live_services(
    live: tuple[Live, dict[str, int]], tmp_path: pathlib.Path
) -> None:
    cluster, ports = live
    rc, gateway = cluster.rc, cluster.gateways[0].address
    # A gateway serving TLS to its clients, so that its certificate's expiry is exported.
    cert, key, expires = _certificate(tmp_path, 45)
    ports["gateway-tls"] = free_port()
    start_gateway(
        cluster,
        "gateway-tls",
        FOVEA_GATEWAY_TLS_CERT_FILE=cert,
        FOVEA_GATEWAY_TLS_KEY_FILE=key,
        FOVEA_GATEWAY_METRICS_PORT=str(ports["gateway-tls"]),
    )
    limited = rc.create_key("infer", rate_limit_rps=1, rate_burst=1)[1]
    expiring = rc.create_key("infer", ttl_s=3600)[1]

    def drive() -> None:
        """Good calls, an unknown key, a model the key may not use, a rate-limited burst, raw tensors."""
        with Client(gateway, cluster.keys["infer"], timeout_s=20) as client:
            for color in ((220, 10, 10), (10, 220, 10), (10, 10, 220)):
                assert client.classify([png(color)] * 3, model="colors", top_k=1).results
        with Client(gateway, expiring, timeout_s=20) as client:
            client.classify([png((10, 10, 220))], model="colors", top_k=1)
        refusals = [
            ("fv_" + "0" * 40, "colors", grpc.StatusCode.UNAUTHENTICATED),  # an unknown key
            (cluster.keys["ident-only"], "colors", grpc.StatusCode.PERMISSION_DENIED),  # a model the key may not use
        ]
        for secret, model, code in refusals:
            with Client(gateway, secret, timeout_s=20) as client, pytest.raises(grpc.RpcError) as err:
                client.classify([png((1, 2, 3))], model=model)
            assert err.value.code() == code
        codes = []
        with Client(gateway, limited, timeout_s=20) as client:
            for _ in range(4):
                try:
                    client.classify([png((1, 2, 3))], model="colors")
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        # Raw tensors, answered by the gateway's native front, reach the worker's fast port (its own histogram).
        req = pb.ModelInferRequest(model_name="ident")
        req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
        req.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
        with grpc.insecure_channel(gateway) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(req, metadata=(("authorization", f"Bearer {cluster.keys['infer']}"),), timeout=20)
        time.sleep(0.5)  # the gateway drains its native front's records every 0.2 s

    drive()  # every series exists from here: rates need two scrapes of it
    before = time.time(), [x for port in ports.values() for x in render.scrape(f"http://127.0.0.1:{port}/metrics")]
    drive()

    texts = {name: scrape(port) for name, port in ports.items()}
    # Every panel's queries, evaluated over the scrapes before and after the calls, give the series they should.
    after = time.time(), [x for port in ports.values() for x in render.scrape(f"http://127.0.0.1:{port}/metrics")]
    data = promql.Scrapes([before, after])
    window = math.ceil(after[0] - before[0]) + 1
    drawn = {p["title"]: render.series(p, data, window, after[0]) for p in dashboard()["panels"] if p["type"] != "row"}
    for title, legend in [
        ("Requests by model and code", "colors OK"),
        ("Errors by model and code", "UNAUTHENTICATED"),
        ("Errors by model and code", "RESOURCE_EXHAUSTED"),
        ("Client → gateway (gateway's whole call)", "p99 Classify"),
        ("Gateway → worker (worker's whole call)", "p50 colors"),
        ("Worker queue wait", "p99 colors"),
        ("Worker preprocessing", "p50 colors"),
        ("Worker compute per batch", "p50 colors"),
        ("Batch size", "mean colors"),
        ("Ready workers per model", "colors"),
        ("Key refusals", "unauthenticated"),
        ("Key refusals", "permission_denied"),
        ("Rate-limit hits", "rate limited"),
        ("Time to expiry", "API key in use"),
    ]:
        assert drawn[title].get(legend), (title, legend, sorted(drawn[title]))
    samples: set[str] = set()
    declared: set[str] = set()
    for text in texts.values():
        s, d = names_in(text)
        samples |= s
        declared |= d
    used = used_metrics()
    missing = sorted(n for n in used - GPU_ONLY if n not in samples)
    # A worker with TLS exports its certificate's expiry too: started last, as the gateways dial plaintext.
    if "fovea_worker_certificate_expiry_timestamp_seconds" in missing:
        port = free_port()
        cluster.cluster.start_worker(
            cluster.registry.address,
            ["colors"],
            name="worker-tls",
            FOVEA_WORKER_TLS_CERT_FILE=cert,
            FOVEA_WORKER_TLS_KEY_FILE=key,
            FOVEA_WORKER_METRICS_PORT=str(port),
            FOVEA_WORKER_INTRA_OP_THREADS="1",
            FOVEA_WORKER_DECODE_THREADS="1",
        )
        s, d = names_in(scrape(port))
        samples |= s
        declared |= d
        missing = sorted(n for n in used - GPU_ONLY if n not in samples)
    assert not missing, f"named in the dashboard or rules but not exported: {missing}"
    assert not sorted(n for n in used & GPU_ONLY if n not in declared)

    gw = {
        (f.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(texts["gateway"])
        for s in f.samples
    }
    assert gw[("fovea_gateway_key_refusals", (("reason", "unauthenticated"),))] >= 1
    assert gw[("fovea_gateway_key_refusals", (("reason", "permission_denied"),))] >= 1
    assert gw[("fovea_gateway_rate_limited", ())] >= 1
    assert gw[("fovea_gateway_ready_workers", (("model", "colors"),))] == 1
    assert gw[("fovea_gateway_api_key_soonest_expiry_timestamp_seconds", ())] == pytest.approx(
        time.time() + 3600, abs=120
    )
    (tls,) = [
        s
        for f in text_string_to_metric_families(texts["gateway-tls"])
        if f.name == "fovea_gateway_certificate_expiry_timestamp_seconds"
        for s in f.samples
    ]
    assert tls.labels == {"file": "cert45.pem", "role": "server"} and tls.value == pytest.approx(expires)
    worker = {f.name: f for f in text_string_to_metric_families(texts["worker"])}
    capacity = {s.labels["model"]: s.value for s in worker["fovea_worker_queue_capacity"].samples}
    assert capacity == {"colors": 1024.0, "ident": 1024.0}  # WorkerConfig.max_queue_len
    assert all(s.value == 1 for s in worker["fovea_worker_model_ready"].samples)
