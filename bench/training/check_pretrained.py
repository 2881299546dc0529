"""Sanity check of the EfficientNet-Lite0 export on scikit-image's sample photos.

Runs the exported ONNX file through ONNX Runtime with the worker's preprocessing (training.preprocess)
and prints the top 5; exits non-zero unless chelsea gets a cat in the top 2 and coffee gets espresso.

    python -m bench.training.check_pretrained [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np
import onnxruntime as ort
from skimage import data

from training.export import read_metadata
from training.preprocess import preprocess, softmax
from training.pretrained import import_efficientnet_lite0

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def top5(session: ort.InferenceSession, image: np.ndarray, meta: dict) -> list[tuple[int, float]]:
    (logits,) = session.run(["logits"], {"input": preprocess(image, meta["preprocessing"])})
    probs = softmax(logits)[0]
    order = np.argsort(-probs)[:5]
    return [(int(i), float(probs[i])) for i in order]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/pretrained/efficientnet-lite0")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = import_efficientnet_lite0(args.out)
    meta = read_metadata(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ok = True
    for name, image, check in (
        ("chelsea", data.chelsea(), lambda top: any(i in CAT_CLASSES for i, _ in top[:2])),
        ("coffee", data.coffee(), lambda top: top[0][0] == ESPRESSO),
        ("astronaut", data.astronaut(), lambda top: True),  # no person class in ImageNet
    ):
        top = top5(session, image, meta)
        passed = check(top)
        ok = ok and passed
        print(f"{name:10s} {'ok  ' if passed else 'FAIL'} " + ", ".join(f"{meta['labels'][i]} {p:.2f}" for i, p in top))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
