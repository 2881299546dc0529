"""The worker's preprocessing in NumPy/PIL, for checking exported models on real images.

Mirrors the serving path described in fovea.spec: convert to the colour mode, resize the short
side (bilinear; 0 means straight to the crop size), centre-crop, scale to [0, 1], normalise per
channel, NCHW float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image


def preprocess(image: Image.Image | np.ndarray, pre: dict[str, Any]) -> np.ndarray:
    """One image as a (1, C, H, W) float32 batch, preprocessed as the worker would."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    gray = str(pre.get("color_mode", "RGB")).upper() == "GRAYSCALE"
    image = image.convert("L" if gray else "RGB")
    image = resize_and_crop(image, int(pre.get("resize_short", 0)), int(pre["crop_height"]), int(pre["crop_width"]))
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = x[:, :, None] if x.ndim == 2 else x
    mean = np.asarray(pre["mean"], dtype=np.float32)
    std = np.asarray(pre["std"], dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def resize_and_crop(image: Image.Image, resize_short: int, crop_h: int, crop_w: int) -> Image.Image:
    """Resize the short side to resize_short (bilinear), then centre-crop; 0 resizes straight to the crop."""
    if resize_short == 0:
        return image.resize((crop_w, crop_h), Image.Resampling.BILINEAR)
    width, height = image.size
    scale = resize_short / min(width, height)
    size = (max(resize_short, round(width * scale)), max(resize_short, round(height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - crop_w) // 2, (size[1] - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)
