"""The walking skeleton end to end: real registry, worker and gateway processes on loopback."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest

from fovea.client import Client, RegistryClient
from fovea.cluster import ROOT, Cluster
from fovea.v1 import model_pb2
from tests.tinymodels import color_model, png


def _up(cluster: Cluster) -> tuple[Client, RegistryClient, str]:
    reg = cluster.start_registry()
    rc = RegistryClient(reg.address, cluster.admin_token)
    mv = rc.register(color_model(), model_pb2.ModelVersion(name="colors"))
    rc.set_alias("colors", "production", [(mv.version, 100)])
    _, secret = rc.create_key("infer")
    cluster.start_worker(reg.address, ["colors"])
    gw = cluster.start_gateway(reg.address)
    return Client(gw.address, secret, timeout_s=10), rc, gw.address


def test_classify_through_gateway(cluster: Cluster) -> None:
    client, _, _ = _up(cluster)
    resp = client.classify([png((240, 20, 20)), png((10, 10, 220))], model="colors", top_k=2)
    assert resp.model == "colors" and resp.version == 1
    assert [r.labels[0].label for r in resp.results] == ["red", "blue"]
    assert all(len(r.labels) == 2 for r in resp.results)
    assert resp.results[0].labels[0].score > 0.9


def test_bad_calls_get_clear_status_and_cluster_keeps_serving(cluster: Cluster) -> None:
    client, _, address = _up(cluster)
    image = png((240, 20, 20))

    def status_of(fn: object) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as err:
            fn()  # type: ignore[operator]
        return err.value.code(), err.value.details()

    channel = grpc.insecure_channel(address)
    from fovea.v1 import image_pb2, image_pb2_grpc

    stub = image_pb2_grpc.ImageServiceStub(channel)
    req = image_pb2.ClassifyRequest(model="colors", images=[image_pb2.Image(data=image)])
    code, msg = status_of(lambda: stub.Classify(req, timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "missing credentials" in msg

    wrong = Client(address, "fv_aaaaaaaaaaaa_" + "x" * 43, timeout_s=5)
    code, msg = status_of(lambda: wrong.classify([image], model="colors"))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "unknown API key" in msg

    code, msg = status_of(lambda: client.classify([image], model="no-such-model"))
    assert code == grpc.StatusCode.NOT_FOUND and "no-such-model" in msg

    code, msg = status_of(lambda: client.classify([b"definitely not an image"], model="colors"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not an image" in msg

    code, msg = status_of(lambda: client.classify([png((1, 2, 3))[:40]], model="colors"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT

    assert client.classify([image], model="colors").results[0].labels[0].label == "red"
    channel.close()


def test_worker_refuses_artifact_whose_digest_does_not_match(cluster: Cluster) -> None:
    reg = cluster.start_registry()
    rc = RegistryClient(reg.address, cluster.admin_token)
    mv = rc.register(color_model(), model_pb2.ModelVersion(name="colors"))
    # Fault injection: tamper with the stored file behind the registry's back.
    path = cluster.data_dir / "artifacts" / mv.sha256[:2] / mv.sha256
    path.write_bytes(color_model(bias=1.0))
    worker = cluster.start_worker(reg.address, ["colors"])
    deadline = time.monotonic() + 10
    log = ""
    while time.monotonic() < deadline and "refusing" not in log:
        time.sleep(0.1)
        log = worker.log_path.read_text()
    assert "refusing colors v1" in log and "SHA-256" in log
    workers = rc.list_workers("colors", ready_only=True)
    assert workers == []


@pytest.mark.slow
def test_fovea_up_demo_classifies_sample_photos(tmp_path: object, redis_url: str) -> None:
    """Acceptance: the README's main job on real photos with the real pretrained model."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("FOVEA_")}
    env["REDIS_URL"] = redis_url
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fovea.cli",
            "up",
            "--demo",
            "--data-dir",
            str(tmp_path),
            "--gateway-port",
            "0",
            "--registry-port",
            "0",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    assert lines["gateway"].startswith("127.0.0.1:") and lines["api key"].startswith("fv_")

    def labels(name: str) -> list[str]:
        return [item.rsplit(" (", 1)[0] for item in lines[name].split(" | ")]

    cats = {"tiger cat", "Egyptian cat", "tabby, tabby cat", "Persian cat", "Siamese cat, Siamese"}
    assert cats & set(labels("chelsea")[:2]), lines["chelsea"]
    assert labels("coffee")[0] == "espresso", lines["coffee"]
    from PIL import Image

    with Image.open(lines["saliency"]) as overlay:  # the demo explains its first photo too
        assert (overlay.format, overlay.size) == ("PNG", (451, 300))


def test_classify_larger_than_a_worker_batch_is_split(cluster: Cluster) -> None:
    """40 images pass the gateway's limit (64) but exceed a worker batch (32): the gateway splits them."""
    client, _, _ = _up(cluster)
    colors = [(240, 20, 20), (20, 240, 20), (20, 20, 240)]
    images = [png(colors[i % 3]) for i in range(40)]
    resp = client.classify(images, model="colors", top_k=1, ids=[f"img{i}" for i in range(40)])
    assert [r.image_id for r in resp.results] == [f"img{i}" for i in range(40)]
    assert [r.labels[0].label for r in resp.results] == [("red", "green", "blue")[i % 3] for i in range(40)]
