"""A ResNet-50-sized ONNX model with random weights, for issue #19's GPU timing (acceptance 4: "a ResNet-50-sized
model, random weights are fine"). Written with onnx.helper and NumPy alone, so a lent GPU machine makes it in
seconds without torchvision or a download, and the 100 MB file need not be carried there.

The layout is ResNet-50 v1.5's with batch norm folded into the convolutions (as an export for inference has it):
a 7x7 stem, 3+4+6+3 bottleneck blocks (1x1, 3x3 with the stride, 1x1; a 1x1 projection on each stage's first
block), global average pooling and a 1000-way classifier: 25.5 million parameters, 4.1 GFLOPs a 224x224 image.
Input "input" FP32 [N, 3, 224, 224], output "output" FP32 [N, 1000]; the batch axis is free.

    python bench/gpu/resnet50_onnx.py /tmp/resnet50.onnx
    python bench/worker/gpu_check.py --model-file /tmp/resnet50.onnx --input-shape 3,224,224 ...
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride of the first block)
EXPANSION = 4


class Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.weights: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True) -> str:
        """A convolution with its batch norm folded in (He-scaled weights keep activations finite)."""
        w, b, out = self.name("w"), self.name("b"), self.name("conv")
        scale = np.sqrt(2.0 / (cin * k * k))
        self.weights.append(
            numpy_helper.from_array((self.rng.standard_normal((cout, cin, k, k)) * scale).astype(np.float32), w)
        )
        self.weights.append(numpy_helper.from_array(np.zeros(cout, np.float32), b))
        pad = k // 2
        self.nodes.append(
            helper.make_node("Conv", [x, w, b], [out], kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)
        )
        return self.relu(out) if relu else out

    def relu(self, x: str) -> str:
        out = self.name("relu")
        self.nodes.append(helper.make_node("Relu", [x], [out]))
        return out

    def bottleneck(self, x: str, cin: int, width: int, stride: int) -> str:
        y = self.conv(x, cin, width, 1)
        y = self.conv(y, width, width, 3, stride)
        y = self.conv(y, width, width * EXPANSION, 1, relu=False)
        shortcut = (
            x
            if cin == width * EXPANSION and stride == 1
            else self.conv(x, cin, width * EXPANSION, 1, stride, relu=False)
        )
        out = self.name("add")
        self.nodes.append(helper.make_node("Add", [y, shortcut], [out]))
        return self.relu(out)


def resnet50(seed: int = 0, classes: int = 1000) -> onnx.ModelProto:
    b = Builder(seed)
    x = b.conv("input", 3, 64, 7, 2)
    pooled = b.name("pool")
    b.nodes.append(helper.make_node("MaxPool", [x], [pooled], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, cin = pooled, 64
    for width, blocks, stride in STAGES:
        for i in range(blocks):
            x = b.bottleneck(x, cin, width, stride if i == 0 else 1)
            cin = width * EXPANSION
    gap, flat = b.name("gap"), b.name("flat")
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], [gap]))
    b.nodes.append(helper.make_node("Flatten", [gap], [flat], axis=1))
    fc_w = (b.rng.standard_normal((cin, classes)) * np.sqrt(1.0 / cin)).astype(np.float32)
    b.weights.append(numpy_helper.from_array(fc_w, "fc_w"))
    b.weights.append(numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b"))
    b.nodes.append(helper.make_node("Gemm", [flat, "fc_w", "fc_b"], ["output"]))
    graph = helper.make_graph(
        b.nodes,
        "resnet50_random",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", classes])],
        b.weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def parameters(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = resnet50(args.seed)
    onnx.checker.check_model(model)
    args.out.write_bytes(model.SerializeToString())
    print(f"wrote {args.out}: {parameters(model) / 1e6:.1f}M parameters, {args.out.stat().st_size / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
