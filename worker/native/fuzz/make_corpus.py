"""Writes the seed corpus of fuzz_model_infer.cc: serialized ModelInferRequests, valid and nearly valid, for
the two model specs the target checks against ("colors": FP32 [-1,3,8,8] -> logits [-1,10]; "pair": FP32 a
[-1,4] and INT64 b [-1,-1] -> scores [-1,-1], ids [-1,2]).

    python worker/native/fuzz/make_corpus.py     (from the repository root, in the virtual environment)
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from inference import grpc_predict_v2_pb2 as pb  # noqa: E402

OUT = pathlib.Path(__file__).parent / "corpus" / "fuzz_model_infer"


def request(model: str, *inputs: tuple[str, str, np.ndarray]) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    for name, dtype, array in inputs:
        req.inputs.add(name=name, datatype=dtype, shape=list(array.shape))
        req.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return req


def colors(n: int = 1) -> pb.ModelInferRequest:
    x = np.linspace(-3, 3, n * 3 * 8 * 8, dtype=np.float32).reshape(n, 3, 8, 8)
    return request("colors", ("input", "FP32", x))


def pair(n: int = 2, width: int = 3) -> pb.ModelInferRequest:
    a = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    b = np.arange(n * width, dtype=np.int64).reshape(n, width)
    return request("pair", ("a", "FP32", a), ("b", "INT64", b))


def top(req: pb.ModelInferRequest, output: str, k: int | None = None, **param: object) -> pb.ModelInferRequest:
    out = req.outputs.add(name=output)
    if k is not None:
        out.parameters["classification"].int64_param = k
    for field, value in param.items():
        setattr(out.parameters["classification"], field, value)
    return req


def seeds() -> dict[str, pb.ModelInferRequest]:
    s: dict[str, pb.ModelInferRequest] = {
        "colors_plain": colors(),
        "colors_batch4": colors(4),
        "colors_top1": top(colors(), "logits", 1),
        "colors_top10_batch2": top(colors(2), "logits", 10),
        "colors_k11": top(colors(), "logits", 11),
        "colors_k2pow31": top(colors(), "logits", 2**31),
        "colors_kmax": top(colors(), "logits", 2**63 - 1),
        "colors_k0": top(colors(), "logits", 0),
        "colors_kneg": top(colors(), "logits", -1),
        "colors_kstring": top(colors(), "logits", string_param="3"),
        "colors_kdouble": top(colors(), "logits", double_param=3.0),
        "colors_no_output": top(colors(), "probs", 1),
        "colors_twice": top(top(colors(), "logits"), "logits"),
        "colors_batch5": colors(5),
        "pair_plain": pair(),
        "pair_top2": top(pair(), "scores", 2),
        "pair_top_ids": top(pair(), "ids", 1),
        "pair_both": top(top(pair(), "scores", 1), "ids"),
        "pair_wide": top(pair(8, 20), "scores", 64),
    }
    short = colors()
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    s["colors_short"] = short
    shape = colors()
    shape.inputs[0].shape[:] = [1, 3, 8, 1 << 62]
    s["colors_huge_shape"] = shape
    typed = pb.ModelInferRequest(model_name="colors")
    typed.inputs.add(name="input", datatype="FP32", shape=[1, 3, 8, 8]).contents.fp32_contents.extend([0.5] * 192)
    s["colors_typed"] = typed
    for dtype, field, values in (
        ("INT8", "int_contents", [1, -128, 127, 300]),
        ("UINT16", "uint_contents", [7, 70000]),
    ):
        narrow = pb.ModelInferRequest(model_name="pair")
        narrow.inputs.add(name="a", datatype=dtype, shape=[1, len(values)])
        getattr(narrow.inputs[0].contents, field).extend(values)
        s[f"pair_typed_{dtype.lower()}"] = narrow
    swapped = pair()
    swapped.inputs[0].name, swapped.inputs[1].name = "b", "a"
    s["pair_swapped"] = swapped
    nan = colors()
    nan.raw_input_contents[0] = np.array([np.nan, np.inf, -np.inf, 0.0] * 48, np.float32).tobytes()
    s["colors_nan_top3"] = top(nan, "logits", 3)
    return s


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, req in seeds().items():
        (OUT / name).write_bytes(req.SerializeToString())
    print(f"wrote {len(seeds())} requests to {OUT}")


if __name__ == "__main__":
    main()
