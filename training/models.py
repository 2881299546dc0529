"""The model table: every trainable architecture, chosen by name.

All models take an NCHW float batch and return logits, and all export to ONNX with a dynamic
batch axis. The table covers the three families Fovea serves: CNNs (resnet18, cnn), an RNN that
reads image rows as a sequence (rnn), and a Vision Transformer (vit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelInfo:
    """One row of the table: how to build the model and what it is for."""

    build: Callable[..., nn.Module]  # (in_channels, num_classes, image_size, **options) -> module
    family: str
    summary: str


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with a shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    """ResNet-18 for small images: a 3x3 stem without max-pool, so 32x32 inputs keep detail."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        layers: list[nn.Module] = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)]
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


def _conv_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()
    )


class SmallCNN(nn.Module):
    """A fast VGG-style CNN: two conv-conv-pool stages, global pooling and a linear head.

    Global average pooling instead of a flattened dense layer keeps it size-independent (8x8
    digits to 64x64 folders) and small; it reaches MNIST 99.4% in a few CPU minutes.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(in_channels, width),
            _conv_bn(width, width),
            nn.MaxPool2d(2),
            _conv_bn(width, 2 * width),
            _conv_bn(2 * width, 2 * width),
            nn.MaxPool2d(2),
            _conv_bn(2 * width, 4 * width),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * width, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class RowRNN(nn.Module):
    """A bidirectional LSTM (or GRU) that reads the image one row at a time (one row per time step).

    Channels and columns of a row form the step's feature vector. The class comes from the mean
    of the outputs over all rows, which trains faster than the last state alone.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        hidden: int = 128,
        layers: int = 1,
        cell: str = "lstm",
    ) -> None:
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(in_channels * image_size, hidden, num_layers=layers, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(nn.LayerNorm(2 * hidden), nn.Linear(2 * hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 1, 3).reshape(n, h, c * w)  # (batch, time=rows, features)
        out, _ = self.rnn(rows)
        return self.head(out.mean(dim=1))


class ViT(nn.Module):
    """A small Vision Transformer: patch embedding, class token, learned positions, pre-norm encoder."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        patch: int = 0,
        dim: int = 64,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        patch = patch or _default_patch(image_size)
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of patch size {patch}")
        tokens = (image_size // patch) ** 2
        self.embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, mlp_ratio * dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)  # (batch, tokens, dim)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        return self.head(self.norm(self.encoder(t))[:, 0])


def _default_patch(image_size: int) -> int:
    """About 7x7 to 8x8 tokens: enough positions to learn shapes, few enough for a CPU."""
    for patch in (4, 2, 8, 7, 16, 1):
        if image_size % patch == 0 and image_size // patch <= 8:
            return patch
    for patch in (16, 8, 7, 4, 2, 1):
        if image_size % patch == 0:
            return patch
    return 1


MODELS: dict[str, ModelInfo] = {
    "resnet18": ModelInfo(lambda c, k, s: CifarResNet18(c, k), "cnn", "CIFAR-style ResNet-18 (11M params)"),
    "cnn": ModelInfo(lambda c, k, s, **o: SmallCNN(c, k, **o), "cnn", "small fast CNN, 5 conv layers (0.14M params)"),
    "rnn": ModelInfo(lambda c, k, s, **o: RowRNN(c, k, s, **o), "rnn", "bidirectional LSTM (or GRU) over image rows"),
    "vit": ModelInfo(
        lambda c, k, s, **o: ViT(c, k, s, **o), "transformer", "small Vision Transformer, 6 layers, dim 64"
    ),
}


def parse_model_spec(spec: str) -> tuple[str, dict[str, int | float | str]]:
    """'vit:dim=96,depth=4' -> ('vit', {'dim': 96, 'depth': 4}); numbers become int or float."""
    name, _, rest = spec.partition(":")
    options: dict[str, int | float | str] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"model option {item!r} in {spec!r} is not KEY=VALUE")
        for convert in (int, float, str):
            try:
                options[key.strip()] = convert(value.strip())  # type: ignore[operator]
                break
            except ValueError:
                continue
    return name, options


def build_model(spec: str, *, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """A freshly initialised model from the table; `spec` is a name with optional options,
    e.g. "rnn:hidden=128,cell=gru" (the options are the model class's keyword arguments).

    Raises:
        KeyError: unknown model name (the message lists the known ones).
        TypeError: an option the model does not take.
    """
    name, options = parse_model_spec(spec)
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    return MODELS[name].build(in_channels, num_classes, image_size, **options)
