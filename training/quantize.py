"""INT8 and fp16 variants of an exported model, with a size/speed/accuracy report.

INT8 is static QDQ quantization, per channel (U8 activations, S8 weights), calibrated on
training images after `quant_pre_process`. Dynamic quantization is deliberately not offered for
conv nets: it produces ConvInteger, which ran 6-20x *slower* on this CPU and lost accuracy, and
per-tensor scales lost accuracy too (FACTS.md §3).
"""

from __future__ import annotations

import logging
import pathlib
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

logger = logging.getLogger(__name__)


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds preprocessed NCHW float32 calibration images to the calibrator in small batches."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int = 16) -> None:
        self.input_name = input_name
        self.images = images.astype(np.float32, copy=False)
        self.batch_size = batch_size
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.images):
            return None
        batch = self.images[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return {self.input_name: batch}

    def rewind(self) -> None:
        self.position = 0


def quantize_int8(
    fp32_path: str | pathlib.Path, out_path: str | pathlib.Path, calibration: np.ndarray
) -> dict[str, Any]:
    """Write a static QDQ per-channel INT8 copy of fp32_path (metadata kept); return sizes and timing.

    Args:
        calibration: preprocessed NCHW float32 images from the *training* split (a few hundred
            are enough; the test split must not be used, or accuracy figures are optimistic).
    """
    fp32_path, out_path = pathlib.Path(fp32_path), pathlib.Path(out_path)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fovea-quant-") as tmp:
        prepared = pathlib.Path(tmp) / "prepared.onnx"
        logger.info("quant_pre_process %s", fp32_path.name)
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
        input_name = onnx.load(str(prepared), load_external_data=False).graph.input[0].name
        logger.info("calibrating INT8 on %d training images", len(calibration))
        quantize_static(
            str(prepared),
            str(out_path),
            ArrayCalibrationReader(input_name, calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    _copy_metadata(fp32_path, out_path, variant="int8 static QDQ per-channel")
    report: dict[str, Any] = {
        "path": str(out_path),
        "size_bytes": out_path.stat().st_size,
        "fp32_size_bytes": fp32_path.stat().st_size,
        "seconds": round(time.perf_counter() - started, 2),
    }
    logger.info(
        "wrote %s (%.2f MB from %.2f MB)", out_path, report["size_bytes"] / 1e6, report["fp32_size_bytes"] / 1e6
    )
    return report


def convert_fp16(fp32_path: str | pathlib.Path, out_path: str | pathlib.Path) -> dict[str, Any]:
    """Write an fp16 copy for GPUs. Inputs and outputs stay float32, so clients need no change."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    fp32_path, out_path = pathlib.Path(fp32_path), pathlib.Path(out_path)
    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    _sort_nodes(model.graph)
    onnx.save(model, str(out_path))
    _copy_metadata(fp32_path, out_path, variant="fp16 (float32 inputs and outputs)")
    onnx.checker.check_model(str(out_path))
    return {"path": str(out_path), "size_bytes": out_path.stat().st_size}


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Order nodes so each comes after its inputs' producers.

    The converter appends the input casts it adds at the end of the graph, which ONNX Runtime
    tolerates but onnx.checker (rightly) rejects.
    """
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise ValueError("graph has a cycle or an input nobody produces")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


def _copy_metadata(src: pathlib.Path, dst: pathlib.Path, variant: str) -> None:
    """Carry Fovea's metadata over (the quantizer drops it) and record which variant this is."""
    source = onnx.load(str(src), load_external_data=False)
    target = onnx.load(str(dst))
    props = {p.key: p.value for p in source.metadata_props if p.key.startswith("fovea.")}
    props["fovea.variant"] = variant
    kept = [p for p in target.metadata_props if p.key not in props]
    del target.metadata_props[:]
    target.metadata_props.extend(kept)
    for key, value in props.items():
        target.metadata_props.add(key=key, value=value)
    onnx.save(target, str(dst))


def latency_ms(
    onnx_path: str | pathlib.Path, example: np.ndarray, *, threads: int = 2, runs: int = 200, warmup: int = 20
) -> dict[str, float]:
    """Median and p95 latency of one run on `example` (e.g. a batch of 1), ONNX Runtime CPU."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: example.astype(np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - started) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p95_ms": times[int(0.95 * (len(times) - 1))]}


def compare_speed(
    fp32_path: str | pathlib.Path,
    int8_path: str | pathlib.Path,
    example: np.ndarray,
    *,
    threads: int = 2,
    rounds: int = 3,
    runs: int = 200,
) -> dict[str, Any]:
    """Batch latency of both files, interleaved over `rounds` so machine noise hits both alike."""
    fp32, int8 = [], []
    for _ in range(rounds):
        fp32.append(latency_ms(fp32_path, example, threads=threads, runs=runs)["median_ms"])
        int8.append(latency_ms(int8_path, example, threads=threads, runs=runs)["median_ms"])
    f, i = min(fp32), min(int8)  # best of the rounds: the least disturbed measurement of each
    return {
        "batch": int(example.shape[0]),
        "threads": threads,
        "fp32_ms": f,
        "int8_ms": i,
        "speedup": f / i,
        "fp32_rounds_ms": fp32,
        "int8_rounds_ms": int8,
    }


def quantize_pretrained(fp32_path: str | pathlib.Path, n_calibration: int = 64) -> dict[str, Any]:
    """INT8 variant of an ImageNet export, calibrated on scikit-image's sample photos (random crops)."""
    from skimage import data as samples

    from training.export import read_metadata
    from training.preprocess import preprocess

    fp32_path = pathlib.Path(fp32_path)
    pre = read_metadata(fp32_path)["preprocessing"]
    rng = np.random.default_rng(0)
    photos = [
        samples.chelsea(),
        samples.coffee(),
        samples.astronaut(),
        samples.rocket(),
        samples.immunohistochemistry(),
    ]
    batches = []
    for i in range(n_calibration):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = photo[top : top + side, left : left + side]
        batches.append(preprocess(crop[:, ::-1] if rng.random() < 0.5 else crop, pre))
    out = fp32_path.with_name(fp32_path.stem + ".int8.onnx")
    report = quantize_int8(fp32_path, out, np.concatenate(batches))
    report["speed_b1"] = compare_speed(fp32_path, out, batches[0], rounds=2, runs=100)
    return report
