"""Real ONNX models for worker tests, built with onnx.helper: one whose compute time the caller sets, and
models that take FP16 or UINT8 inputs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WIDTH = 4
LOOP_STATE = 256


def _finish(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def busy_model(scale: float = 2.0) -> bytes:
    """input [N, 4] FP32 -> output = input * scale, after a Loop of max(input[:, 0]) MatMul steps.

    The caller picks the compute time of a whole batch through the first column (about 10-50 us per step
    on one core), which lets tests fill queues and hold a model instance busy with real ONNX work.
    `scale` tells versions apart.
    """
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((LOOP_STATE, LOOP_STATE)) / np.sqrt(LOOP_STATE)).astype(np.float32)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["state_in", "w"], ["mm"]),
            helper.make_node("Tanh", ["mm"], ["state_out"]),
        ],
        "busy_step",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_in", TensorProto.FLOAT, [1, LOOP_STATE]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [1, LOOP_STATE]),
        ],
    )
    nodes = [
        helper.make_node("Slice", ["input", "zero1", "one1", "one1"], ["first_col"]),
        helper.make_node("ReduceMax", ["first_col"], ["steps_f"], keepdims=0),
        helper.make_node("Cast", ["steps_f"], ["steps"], to=TensorProto.INT64),
        helper.make_node("Loop", ["steps", "true", "state0"], ["state"], body=body),
        helper.make_node("ReduceSum", ["state"], ["total"], keepdims=0),
        helper.make_node("Mul", ["total", "zero_f"], ["nothing"]),  # ties the loop's result to the output
        helper.make_node("Mul", ["input", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "nothing"], ["output"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "zero1"),
        numpy_helper.from_array(np.array([1], np.int64), "one1"),
        numpy_helper.from_array(np.array(True), "true"),
        numpy_helper.from_array(np.full((1, LOOP_STATE), 0.5, np.float32), "state0"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero_f"),
        numpy_helper.from_array(np.array(scale, np.float32), "scale"),
        numpy_helper.from_array(w, "w"),
    ]
    graph = helper.make_graph(
        nodes,
        "busy",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", WIDTH])],
        inits,
    )
    return _finish(graph)


def cast_model(dtype: int, width: int = WIDTH) -> bytes:
    """input [N, width] of `dtype` (FLOAT16 or UINT8) -> output = float(input) * 2 as FP32."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["input"], ["as_float"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["as_float", "as_float"], ["output"]),
        ],
        "cast",
        [helper.make_tensor_value_info("input", dtype, ["N", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", width])],
    )
    return _finish(graph)


def bomb_png(side: int = 7_000) -> bytes:
    """A real PNG decompression bomb: side x side grey pixels (49 MP, 147 MB as RGB) in about 47 KiB."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    rows = bytes(side + 1) * 100  # per row: filter byte 0, then zeros
    body = b"".join(comp.compress(rows[: (side + 1) * min(100, side - r)]) for r in range(0, side, 100))
    body += comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
