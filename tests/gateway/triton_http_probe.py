"""Drives a gateway's HTTP port with the stock Triton client (tritonclient.http) and prints what it saw as JSON.

Run as its own process, like triton_probe.py: the gateway under test runs in the test's event loop, and
tritonclient.http blocks (geventhttpclient).

    python tests/gateway/triton_http_probe.py HOST:PORT MODEL IMAGE   (API key in FOVEA_API_KEY)
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import tritonclient.http as triton


def main(address: str, model: str, image_path: str) -> None:
    # infer() writes Inference-Header-Content-Length into the headers it is given: each call gets a copy
    headers = {"Authorization": f"Bearer {os.environ['FOVEA_API_KEY']}"}
    client = triton.InferenceServerClient(address, network_timeout=30)
    out: dict[str, object] = {
        "live": client.is_server_live(),  # health needs no key
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model, headers=headers),
        "server": client.get_server_metadata(headers=headers),
        "metadata": client.get_model_metadata(model, headers=headers),
        "metadata_v1": client.get_model_metadata(model, model_version="1", headers=headers),
        "config": client.get_model_config(model, headers=headers),
    }
    meta = out["metadata"]
    assert isinstance(meta, dict)
    in_name, out_name = meta["inputs"][0]["name"], meta["outputs"][0]["name"]
    with open(image_path, "rb") as f:
        data = f.read()
    # Fovea image models take encoded images as a BYTES tensor in place of their pixel tensor; BYTES that are
    # not UTF-8 go as binary data (tritonclient's default)
    image = triton.InferInput(in_name, [2], "BYTES")
    image.set_data_from_numpy(np.array([data, data], dtype=np.object_), binary_data=True)
    for form, binary in (("binary", True), ("json_output", False)):
        wanted = triton.InferRequestedOutput(out_name, binary_data=binary, class_count=2)
        result = client.infer(
            model, [image], outputs=[wanted], headers=dict(headers), request_id=f"call-{form}", timeout=30_000_000
        )
        response = result.get_response()
        out[form] = {
            "labels": [text(item) for item in result.as_numpy(out_name).reshape(-1)],
            "shape": list(result.as_numpy(out_name).shape),
            "id": response.get("id"),
            "model_version": response["model_version"],
        }
    # all JSON: a pixel tensor (mean 0, std 1 preprocessing) of pure blue, answered in JSON
    pixels = np.zeros((1, *meta["inputs"][0]["shape"][1:]), np.float32)
    pixels[:, 2] = 1.0
    tensor = triton.InferInput(in_name, list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=False)
    wanted = triton.InferRequestedOutput(out_name, binary_data=False, class_count=1)
    result = client.infer(model, [tensor], outputs=[wanted], headers=dict(headers), model_version="1")
    out["json"] = [text(item) for item in result.as_numpy(out_name).reshape(-1)]
    raw = triton.InferRequestedOutput(out_name, binary_data=True)  # the logits themselves, in binary
    result = client.infer(model, [tensor], outputs=[raw], headers=dict(headers))
    out["logits"] = result.as_numpy(out_name).tolist()
    out["statistics"] = client.get_inference_statistics(model, headers=headers)
    for name, call in (
        ("unknown_key", lambda: client.get_model_metadata(model, headers={"Authorization": "Bearer fv_x_" + "y" * 40})),
        ("no_key", lambda: client.infer(model, [image])),
        ("unknown_model", lambda: client.infer("no-such-model", [image], headers=dict(headers))),
    ):
        try:
            call()
            out[name] = "accepted"
        except triton.InferenceServerException as exc:
            out[name] = [exc.status(), exc.message()]
    client.close()
    print(json.dumps(out))


def text(item: bytes | str) -> str:
    """A BYTES element: tritonclient gives bytes from binary data, str from JSON."""
    return item.decode() if isinstance(item, bytes) else item


if __name__ == "__main__":
    main(*sys.argv[1:4])
