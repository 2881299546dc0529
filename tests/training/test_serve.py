"""A trained model published with training.publish serves through the gateway, and its accuracy
there on the held-out split equals the offline ONNX evaluation (issue 6, acceptance 5)."""

from __future__ import annotations

import io
import json
import pathlib

import numpy as np
from PIL import Image

from fovea.client import Client, RegistryClient
from fovea.cluster import Cluster
from training.datasets import make_synthetic
from training.evaluate import predict_onnx
from training.export import read_metadata
from training.publish import prepare_run, publish
from training.train import main, parse_args


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_gateway_accuracy_equals_offline_onnx_evaluation(cluster: Cluster, tmp_path: pathlib.Path) -> None:
    run = tmp_path / "run"
    main(
        parse_args(
            [
                "--model",
                "cnn",
                "--dataset",
                "synthetic",
                "--epochs",
                "1",
                "--batch-size",
                "32",
                "--output-dir",
                str(run),
            ]
        )
    )
    artifacts = prepare_run(run, ["fp32", "int8"])
    offline = json.loads((run / "eval_onnx.json").read_text())

    registry = cluster.start_registry()
    with RegistryClient(registry.address, cluster.admin_token) as rc:
        fp32, int8 = publish(rc, "quadrants", artifacts, tags={"dataset": "synthetic"}, promote="production")
        _, secret = rc.create_key("infer")
    assert (fp32.tags["variant"], int8.tags["variant"]) == ("fp32", "int8")
    assert fp32.metrics["top1"] == offline["top1"] and "speedup_b1" in int8.metrics
    assert list(fp32.labels) == ["top-left", "top-right", "bottom-left", "bottom-right"]
    cluster.start_worker(registry.address, ["quadrants"])
    gateway = cluster.start_gateway(registry.address)

    test = make_synthetic().test  # the same held-out split the run was evaluated on
    served = []
    with Client(gateway.address, secret, timeout_s=30) as client:
        for start in range(0, len(test), 16):
            images = [png(x) for x in test.images[start : start + 16]]
            resp = client.classify(images, model="quadrants", alias="production", top_k=1)
            assert resp.version == fp32.version
            served += [r.labels[0].label for r in resp.results]
    classes = list(fp32.labels)
    gateway_top1 = float(np.mean([classes.index(label) == y for label, y in zip(served, test.labels, strict=False)]))
    assert gateway_top1 == offline["top1"]
    # Stronger than equal accuracy: every image gets the class ONNX Runtime gave it offline.
    pre = read_metadata(run / "model.onnx")["preprocessing"]
    offline_pred = predict_onnx(run / "model.onnx", test.images, pre).argmax(1)
    assert [classes.index(label) for label in served] == offline_pred.tolist()
