"""Decode encoded images (JPEG, PNG, WebP) safely and turn them into model input.

The pixel limit is checked from the header, before any pixel is decoded, so a
decompression bomb costs nothing.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fovea.errors import InvalidImage

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Preprocess:
    """The fields of fovea.v1.Preprocessing, as plain values."""

    resize_short: int
    crop_height: int
    crop_width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    grayscale: bool
    layout: str = "NCHW"
    """NCHW or NHWC, as the model's input takes it."""
    pixels: bool = False
    """The model takes integer pixels 0-255 (a UINT8 input): no scaling or normalisation."""

    @classmethod
    def from_proto(cls, pre: object, input_spec: object = None) -> Preprocess:
        """From fovea.v1.Preprocessing; input_spec (a TensorSpec) supplies layout and data type."""
        from fovea.v1 import model_pb2

        layout = getattr(input_spec, "layout", "") or "NCHW"
        return cls(
            layout=layout,
            pixels=getattr(input_spec, "datatype", "") == "UINT8",
            resize_short=int(pre.resize_short),  # type: ignore[attr-defined]
            crop_height=int(pre.crop_height),  # type: ignore[attr-defined]
            crop_width=int(pre.crop_width),  # type: ignore[attr-defined]
            mean=tuple(pre.mean) or (0.0,),  # type: ignore[attr-defined]
            std=tuple(pre.std) or (1.0,),  # type: ignore[attr-defined]
            grayscale=pre.color_mode == model_pb2.COLOR_MODE_GRAYSCALE,  # type: ignore[attr-defined]
        )

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone; raises InvalidImage when it is not an image."""
    if data[:3] == JPEG_MAGIC:
        import simplejpeg

        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            return int(w), int(h)
        except ValueError as exc:
            raise InvalidImage(f"corrupt JPEG: {exc}") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Image.DecompressionBombError as exc:
        # Pillow refuses on its own past twice its MAX_IMAGE_PIXELS, before our limit is even asked.
        raise InvalidImage(f"image has too many pixels: {exc}") from None
    except Exception:  # noqa: BLE001 - any failure means the bytes are not an image we read
        raise InvalidImage("not an image: expected JPEG, PNG or WebP bytes") from None


def decode(data: bytes, max_pixels: int, grayscale: bool = False) -> np.ndarray:
    """HxWx3 (or HxW) uint8 pixels; refuses images over max_pixels before decoding them."""
    if not data:
        raise InvalidImage("empty image")
    w, h = image_size(data)
    if w <= 0 or h <= 0:
        raise InvalidImage("image has no pixels")
    if w * h > max_pixels:
        raise InvalidImage(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    try:
        if data[:3] == JPEG_MAGIC:
            import simplejpeg

            return (
                simplejpeg.decode_jpeg(data, colorspace="GRAY" if grayscale else "RGB")[..., 0]
                if grayscale
                else simplejpeg.decode_jpeg(data, colorspace="RGB")
            )
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.format not in ("PNG", "WEBP", "JPEG", "BMP", "GIF"):
                    raise InvalidImage(f"unsupported image format {im.format}; send JPEG, PNG or WebP")
                return np.asarray(im.convert("L" if grayscale else "RGB"))
    except InvalidImage:
        raise
    except Exception as exc:  # noqa: BLE001
        raise InvalidImage(f"corrupt image: {str(exc)[:200]}") from None


def preprocess(pixels: np.ndarray, spec: Preprocess) -> np.ndarray:
    """Resize the short side, centre-crop, then either scale to [0, 1] and normalise (float32) or,
    for models that take integer pixels, keep them as uint8; CHW or HWC as the model takes it."""
    if spec.grayscale and pixels.ndim == 3:
        pixels = np.asarray(Image.fromarray(pixels).convert("L"))
    if not spec.grayscale and pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    h, w = pixels.shape[:2]
    ch, cw = spec.crop_height, spec.crop_width
    if spec.resize_short:
        scale = spec.resize_short / min(h, w)
        nh, nw = max(ch, round(h * scale)), max(cw, round(w * scale))
    else:
        nh, nw = ch, cw
    if (nh, nw) != (h, w):
        pixels = np.asarray(Image.fromarray(pixels).resize((nw, nh), Image.Resampling.BILINEAR))
    top, left = (nh - ch) // 2, (nw - cw) // 2
    pixels = pixels[top : top + ch, left : left + cw]
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    hwc = spec.layout == "NHWC"
    if spec.pixels:
        return np.ascontiguousarray(pixels if hwc else pixels.transpose(2, 0, 1), dtype=np.uint8)
    x = pixels.astype(np.float32)  # HWC until the end
    mean = np.asarray(spec.mean, np.float32).reshape(1, 1, -1)
    std = np.asarray(spec.std, np.float32).reshape(1, 1, -1)
    # (x/255 - mean) / std, folded into one multiply-add.
    x = x * (1.0 / (255.0 * std)) - mean / std
    return np.ascontiguousarray(x if hwc else x.transpose(2, 0, 1), dtype=np.float32)
