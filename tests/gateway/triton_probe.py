"""Drives a gateway with the stock Triton client and prints what it saw as JSON.

Run as its own process: tritonclient registers the same `inference.*` protobuf
names as Fovea's generated `inference` package, so the two cannot share one.

    python tests/gateway/triton_probe.py HOST:PORT MODEL IMAGE   (API key in FOVEA_API_KEY)
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import tritonclient.grpc as triton


def main(address: str, model: str, image_path: str) -> None:
    headers = {"authorization": f"Bearer {os.environ['FOVEA_API_KEY']}"}
    client = triton.InferenceServerClient(address)
    out: dict[str, object] = {
        "live": client.is_server_live(headers=headers),
        "ready": client.is_server_ready(headers=headers),
        "model_ready": client.is_model_ready(model, headers=headers),
    }
    meta = client.get_model_metadata(model, headers=headers)
    out["metadata"] = {
        "name": meta.name,
        "versions": list(meta.versions),
        "platform": meta.platform,
        "inputs": [[t.name, t.datatype, list(t.shape)] for t in meta.inputs],
        "outputs": [[t.name, t.datatype, list(t.shape)] for t in meta.outputs],
    }
    config = client.get_model_config(model, headers=headers).config
    out["config"] = {
        "name": config.name,
        "platform": config.platform,
        "max_batch_size": config.max_batch_size,
        "inputs": [[t.name, int(t.data_type), list(t.dims)] for t in config.input],
        "outputs": [[t.name, int(t.data_type), list(t.dims), t.label_filename] for t in config.output],
    }
    server = client.get_server_metadata(headers=headers)
    out["server"] = {"name": server.name, "extensions": list(server.extensions)}
    with open(image_path, "rb") as f:
        data = f.read()
    # Fovea image models take encoded images as a BYTES tensor in place of their pixel tensor
    image = triton.InferInput(meta.inputs[0].name, [1], "BYTES")
    image.set_data_from_numpy(np.array([data], dtype=np.object_))
    wanted = triton.InferRequestedOutput(meta.outputs[0].name, class_count=2)
    result = client.infer(model, [image], outputs=[wanted], headers=headers, client_timeout=30)
    top = result.as_numpy(meta.outputs[0].name)
    out["classification"] = [item.decode() for item in top.reshape(-1)]
    out["model_version"] = result.get_response().model_version
    # Triton's streaming call: three images and one unknown model on one stream
    import queue

    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=headers)
    for i in range(3):
        client.async_stream_infer(model, [image], outputs=[wanted], request_id=f"frame-{i}")
    client.async_stream_infer("no-such-model", [image], request_id="bad")
    streamed = []
    for _ in range(4):
        result, error = answers.get(timeout=30)
        if error is not None:
            streamed.append(["error", str(error)])
        else:
            response = result.get_response()  # type: ignore[attr-defined]
            streamed.append([response.id, result.as_numpy(meta.outputs[0].name).reshape(-1)[0].decode()])  # type: ignore[attr-defined]
    client.stop_stream()
    out["stream"] = streamed
    try:
        client.get_model_metadata(model, headers={"authorization": "Bearer fv_aaaaaaaaaaaa_" + "x" * 43})
        out["unknown_key"] = "accepted"
    except triton.InferenceServerException as exc:
        out["unknown_key"] = exc.status()
    client.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:4])
