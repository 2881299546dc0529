"""`fovea explain`: occlusion saliency through a real gateway finds the part of the image the model
uses, and writes it as a PNG overlay."""

from __future__ import annotations

import io
import json
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image

from fovea.client import Client, RegistryClient
from fovea.cluster import ROOT, Cluster
from fovea.explain import explain
from fovea.v1 import model_pb2
from tests.tinymodels import corner_model


def _photo() -> bytes:
    """64x64: a red top-left quarter (the only part the model looks at), green elsewhere."""
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:, :] = (20, 160, 20)
    pixels[:32, :32] = (230, 20, 20)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_saliency_finds_the_region_the_model_uses(cluster: Cluster, tmp_path: pathlib.Path) -> None:
    reg = cluster.start_registry()
    rc = RegistryClient(reg.address, cluster.admin_token)
    mv = rc.register(corner_model(), model_pb2.ModelVersion(name="corner"))
    rc.set_alias("corner", "production", [(mv.version, 100)])
    _, secret = rc.create_key("infer")
    cluster.start_worker(reg.address, ["corner"])
    gw = cluster.start_gateway(reg.address)
    photo = _photo()
    with Client(gw.address, secret, timeout_s=30) as client:
        client.classify([photo], model="corner")  # waits out the gateway's first sight of the worker
        sal = explain(client, photo, "corner", grid=8)
    assert (sal.label, sal.version, sal.windows) == ("red", 1, 49)
    corner, rest = sal.heat[:32, :32], sal.heat[40:, 40:]  # windows are two 8 px cells wide
    assert corner.mean() > 0.02 and abs(rest).max() < 1e-4, (corner.mean(), abs(rest).max())

    # the CLI writes the overlay: reddest where the heat is, the photo's own colours where it is not
    image = tmp_path / "corner.png"
    image.write_bytes(photo)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fovea.cli",
            "explain",
            str(image),
            "--model",
            "corner",
            "--address",
            gw.address,
            "--api-key",
            secret,
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["label"] == "red" and report["peak_xy"][0] < 32 and report["peak_xy"][1] < 32
    overlay = np.asarray(Image.open(report["overlay"]))
    assert overlay.shape == (64, 64, 3)
    original = np.asarray(Image.open(io.BytesIO(photo)))
    hot, cold = overlay[8, 8].astype(int), overlay[60, 60].astype(int)
    assert hot[0] > hot[2] + 100  # the hot end of the map is red
    assert cold[2] > original[60, 60, 2] + 30 and cold[1] < original[60, 60, 1] - 30  # the cold end is blue
