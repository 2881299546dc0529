"""Images to send: read from a folder, or generated as JPEG/PNG at a given size."""

from __future__ import annotations

import io
import pathlib

import numpy as np

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def from_folder(folder: str | pathlib.Path, limit: int = 256) -> list[bytes]:
    """Up to `limit` image files from `folder` (sorted by name, not recursive)."""
    root = pathlib.Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no {'/'.join(sorted(SUFFIXES))} files in {root}")
    return [p.read_bytes() for p in files[:limit]]


def generate(count: int = 16, width: int = 224, height: int = 224, fmt: str = "jpeg", seed: int = 0) -> list[bytes]:
    """`count` distinct photo-like images: smooth colour gradients plus noise, so that JPEG
    sizes and decode times resemble photos rather than flat colour."""
    from PIL import Image

    fmt = fmt.lower()
    if fmt not in ("jpeg", "jpg", "png"):
        raise ValueError("format must be jpeg or png")
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for _ in range(count):
        a, b, c = rng.uniform(0, 2 * np.pi, 3)
        base = np.stack(
            [np.sin(x / width * 3 + a), np.cos(y / height * 4 + b), np.sin((x + y) / (width + height) * 5 + c)], -1
        )
        pixels = (base * 90 + 128 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        if fmt == "png":
            Image.fromarray(pixels).save(buf, format="PNG")
        else:
            Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out
