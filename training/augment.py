"""Batch augmentation and normalisation on uint8 NHWC tensors, on whatever device holds them.

Working on whole batches keeps a 2-core CPU busy with the model rather than with per-image
Python transforms, and lets a GPU augment its own data without a DataLoader.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Pad each side by `pad` (edge pixels repeated) and crop back at a random offset per image."""
    if pad <= 0:
        return images
    n, h, w, _ = images.shape
    padded = F.pad(images.permute(0, 3, 1, 2).float(), (pad, pad, pad, pad), mode="replicate")
    padded = padded.to(images.dtype).permute(0, 2, 3, 1)  # back to NHWC
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]  # n, h, 1
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]  # n, 1, w
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded[batch, rows, cols]


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror about half of the images left to right."""
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(2), images)


def augment(images: torch.Tensor, *, pad: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with padding, and horizontal flips where they keep the class."""
    images = random_crop(images, pad, generator)
    return random_hflip(images, generator) if hflip else images


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC to float32 NCHW: x/255, then (x - mean) / std per channel, as the worker does."""
    x = images.float().div_(255.0)
    x = (x - mean) / std
    return x.permute(0, 3, 1, 2).contiguous()


def default_pad(image_size: int) -> int:
    """Shift by up to 1/8 of the side: 4 px on CIFAR, 3 on MNIST, 1 on 8x8 digits."""
    return max(1, round(image_size / 8))
