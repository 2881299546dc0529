"""Occlusion saliency through the public API: which parts of an image a served model relies on.

A window two grid cells wide slides over the image one cell at a time, covering it with the
image's mean colour; the drop in the score of the model's top class, averaged over the windows
that cover a pixel, is that pixel's saliency (occlusion sensitivity). It needs only Classify
calls, so it works for any served model without its weights, which may be encrypted at rest.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image


@dataclass
class Saliency:
    model: str
    version: int
    label: str
    index: int
    score: float
    heat: np.ndarray
    """Per pixel (H x W): how much the top class's score drops when that area is hidden."""
    windows: int
    grid: int


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def windows(height: int, width: int, grid: int) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) of each occluding window: 2x2 cells, stepping one cell."""
    ys = np.linspace(0, height, grid + 1).round().astype(int)
    xs = np.linspace(0, width, grid + 1).round().astype(int)
    return [(int(ys[i]), int(ys[i + 2]), int(xs[j]), int(xs[j + 2])) for i in range(grid - 1) for j in range(grid - 1)]


def score_of(labels: Sequence[Any], index: int) -> float:
    """The score of class `index`; when it fell out of the returned top k, the lowest score returned
    (an upper bound, so the drop is if anything understated)."""
    for label in labels:
        if label.index == index:
            return float(label.score)
    return min((float(label.score) for label in labels), default=0.0)


def explain(
    client: Any,
    image: bytes,
    model: str,
    version: int = 0,
    alias: str = "",
    grid: int = 8,
    per_call: int = 16,
    top_k: int = 100,
) -> Saliency:
    """Occlusion saliency of the model's top class for one encoded image, through a fovea Client."""
    if grid < 2:
        raise ValueError("grid must be at least 2")
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    height, width = pixels.shape[:2]
    base = client.classify([png(pixels)], model=model, top_k=top_k, version=version, alias=alias)
    top = base.results[0].labels[0]
    version = base.version  # every occluded copy goes to the same version, even mid roll-out
    fill = pixels.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)
    boxes = windows(height, width, grid)
    drops = []
    for start in range(0, len(boxes), per_call):
        batch = []
        for top_y, bottom, left, right in boxes[start : start + per_call]:
            hidden = pixels.copy()
            hidden[top_y:bottom, left:right] = fill
            batch.append(png(hidden))
        resp = client.classify(batch, model=model, top_k=top_k, version=version)
        drops += [top.score - score_of(r.labels, top.index) for r in resp.results]
    heat = np.zeros((height, width), np.float64)
    cover = np.zeros((height, width), np.float64)
    for (top_y, bottom, left, right), drop in zip(boxes, drops, strict=False):
        heat[top_y:bottom, left:right] += drop
        cover[top_y:bottom, left:right] += 1
    heat /= np.maximum(cover, 1)
    return Saliency(
        model=base.model,
        version=version,
        label=top.label,
        index=top.index,
        score=top.score,
        heat=heat.astype(np.float32),
        windows=len(boxes),
        grid=grid,
    )


def colormap(values: np.ndarray) -> np.ndarray:
    """0..1 -> RGB uint8 along blue, cyan, yellow, red (a small 'jet' without matplotlib)."""
    stops = np.array([[0, 0, 128], [0, 128, 255], [0, 255, 255], [255, 255, 0], [255, 64, 0], [200, 0, 0]], np.float32)
    pos = np.clip(values, 0, 1) * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = (pos - lo)[..., None]
    return (stops[lo] * (1 - frac) + stops[lo + 1] * frac).round().astype(np.uint8)


def smooth(heat: np.ndarray, grid: int) -> np.ndarray:
    """The per-cell averages of the heat, interpolated back to full size: no blocky window edges."""
    height, width = heat.shape
    ys = np.linspace(0, height, grid + 1).round().astype(int)
    xs = np.linspace(0, width, grid + 1).round().astype(int)
    cells = np.array(
        [[heat[ys[i] : ys[i + 1], xs[j] : xs[j + 1]].mean() for j in range(grid)] for i in range(grid)], np.float32
    )
    return np.asarray(Image.fromarray(cells, mode="F").resize((width, height), Image.Resampling.BILINEAR))


def overlay(image: bytes, saliency: Saliency, alpha: float = 0.5) -> np.ndarray:
    """The image with its saliency blended over it: red where hiding the area hurts the score most."""
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB")).astype(np.float32)
    heat = np.clip(smooth(saliency.heat, saliency.grid), 0, None)
    peak = float(heat.max())
    colours = colormap(heat / peak if peak > 0 else heat).astype(np.float32)
    return (pixels * (1 - alpha) + colours * alpha).round().astype(np.uint8)


def save_overlay(path: str, image: bytes, saliency: Saliency, alpha: float = 0.5) -> None:
    Image.fromarray(overlay(image, saliency, alpha)).save(path, format="PNG")
