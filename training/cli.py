"""Command-line entry points of the training package; each takes an argv list and returns an exit code.

`fovea` dispatches to these (fovea/cli.py): `fovea train` -> train_main, `fovea evaluate` ->
evaluate_main, `fovea model export` -> export_main, `fovea model import-pretrained` ->
import_pretrained_main. They print a JSON summary on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
from typing import Any

logger = logging.getLogger(__name__)

PRETRAINED = ("efficientnet-lite0",)

# Libraries the dynamo exporter drives log every optimisation pass at INFO.
NOISY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch._dynamo", "torch.export", "torch.fx")


def configure_logging(level: int = logging.INFO) -> None:
    """Plain progress lines on stderr; quiet the exporter's internals."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _print(result: dict[str, Any]) -> None:
    print(json.dumps(result, indent=2, default=str))


def import_pretrained_main(argv: list[str]) -> int:
    """`fovea model import-pretrained efficientnet-lite0 --out DIR`: export a pretrained model."""
    parser = argparse.ArgumentParser(prog="fovea model import-pretrained",
                                     description="Export a pretrained model that ships in a pip package.")
    parser.add_argument("name", choices=PRETRAINED)
    parser.add_argument("--out", default="runs/pretrained/efficientnet-lite0", help="output directory")
    parser.add_argument("--force", action="store_true", help="export again even if DIR holds a valid export")
    parser.add_argument("--int8", action="store_true", help="also write an INT8 static-QDQ variant")
    parser.add_argument("--publish", action="store_true", help="register the export with the registry")
    args = parser.parse_args(argv)
    configure_logging()
    from training.pretrained import import_efficientnet_lite0

    path = import_efficientnet_lite0(args.out, force=args.force)
    result: dict[str, Any] = {"onnx": str(path), **json.loads((path.parent / "export.json").read_text())}
    if args.int8:
        from training.quantize import quantize_pretrained

        result["int8"] = quantize_pretrained(path)
    if args.publish:
        parser.error("--publish is not available yet: publishing waits for fovea.client (see training/README)")
    _print(result)
    return 0


def export_main(argv: list[str]) -> int:
    """`fovea model export --checkpoint RUN/last.pt --out model.onnx [--int8] [--fp16]`."""
    parser = argparse.ArgumentParser(prog="fovea model export",
                                     description="Export a training checkpoint to ONNX with Fovea metadata.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    parser.add_argument("--out", help="ONNX path (default <run>/model.onnx)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed |PyTorch - ONNX| difference")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--no-dynamo", action="store_true", help="use the TorchScript exporter")
    parser.add_argument("--model-card", help="markdown file to embed as the model card")
    parser.add_argument("--evaluate", action="store_true", help="evaluate the ONNX file on the test split")
    parser.add_argument("--int8", action="store_true", help="also write model.int8.onnx (static QDQ, per channel)")
    parser.add_argument("--fp16", action="store_true", help="also write model.fp16.onnx (for GPUs)")
    parser.add_argument("--calibration-images", type=int, default=512, help="training images for INT8 calibration")
    args = parser.parse_args(argv)
    configure_logging()
    from training.pipeline import export_run

    card = pathlib.Path(args.model_card).read_text() if args.model_card else None
    result = export_run(args.checkpoint, args.out, atol=args.atol, opset=args.opset, dynamo=not args.no_dynamo,
                        model_card=card, evaluate=args.evaluate, int8=args.int8, fp16=args.fp16,
                        calibration_images=args.calibration_images)
    _print(result)
    return 0


def evaluate_main(argv: list[str]) -> int:
    """`fovea evaluate --checkpoint RUN/last.pt [--onnx model.onnx]`: reports on the test split."""
    parser = argparse.ArgumentParser(prog="fovea evaluate", description="Evaluate a checkpoint and/or ONNX model.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or run directory (gives dataset and labels)")
    parser.add_argument("--onnx", help="also evaluate this ONNX file through ONNX Runtime")
    parser.add_argument("--data-dir", help="override the dataset location saved in the checkpoint")
    parser.add_argument("--out-dir", help="where reports go (default: the run directory)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    configure_logging()
    from training.pipeline import evaluate_run

    _print(evaluate_run(args.checkpoint, args.onnx, data_dir=args.data_dir, out_dir=args.out_dir, device=args.device))
    return 0


def train_main(argv: list[str]) -> int:
    """`fovea train --model NAME --dataset NAME ...` (see training.train.get_args_parser)."""
    from training.train import train_main as run

    return run(argv)


COMMANDS = {
    "train": train_main,
    "evaluate": evaluate_main,
    "export": export_main,
    "import-pretrained": import_pretrained_main,
}


def main(argv: list[str] | None = None) -> int:
    """`python -m training.cli COMMAND ...` for use without the fovea entry point."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m training.cli {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
