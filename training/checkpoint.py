"""Checkpoints: everything needed to resume training or to export, in one torch file.

Files are read with torch.load(weights_only=True), so a checkpoint can hold only tensors and
plain containers of str/int/float/bool/None — never pickled objects that could run code.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import torch

from training.models import build_model

FORMAT_VERSION = 1


def save_checkpoint(path: str | pathlib.Path, state: dict[str, Any]) -> None:
    """Write atomically (temp file, then rename) so a crash never leaves half a checkpoint."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format_version": FORMAT_VERSION, **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | pathlib.Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with weights_only=True.

    Raises:
        ValueError: not a Fovea checkpoint, or one from a newer format.
    """
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or "model" not in state or "format_version" not in state:
        raise ValueError(f"{path} is not a Fovea training checkpoint")
    if state["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{path} has checkpoint format {state['format_version']}, newer than {FORMAT_VERSION}")
    return state


def model_from_checkpoint(state: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the trained model (eval mode) from a loaded checkpoint."""
    meta = state["meta"]
    model = build_model(
        meta["model"], in_channels=meta["in_channels"], num_classes=len(meta["labels"]), image_size=meta["image_size"]
    )
    model.load_state_dict(state["model"])
    return model.eval()
