"""A tiny training run end to end: train, resume, export, evaluate in ONNX Runtime, quantize."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
import yaml

from fovea.spec import version_from_onnx
from training.checkpoint import load_checkpoint
from training.cli import train_main
from training.pipeline import export_run
from training.train import main, parse_args

ARGS = ["--model", "cnn", "--dataset", "synthetic", "--epochs", "2", "--batch-size", "32", "--threads", "2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("run")
    assert train_main([*ARGS, "--output-dir", str(out)]) == 0
    return out


def test_run_writes_config_metrics_checkpoint_and_report(run_dir: pathlib.Path) -> None:
    saved = yaml.safe_load((run_dir / "args.yaml").read_text())
    assert (saved["model"], saved["dataset"], saved["epochs"]) == ("cnn", "synthetic", 2)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_loss", "train_acc", "test_acc", "lr", "images_per_s"} <= set(rows[-1])
    report = json.loads((run_dir / "eval_torch.json").read_text())
    assert report["top1"] >= 0.9  # the quadrant task is easy: this catches a broken pipeline
    assert (run_dir / "eval_torch_confusion.png").is_file()
    state = load_checkpoint(run_dir / "last.pt")
    assert state["meta"]["labels"] == ["top-left", "top-right", "bottom-left", "bottom-right"]


def test_checkpoint_refuses_pickled_objects(tmp_path: pathlib.Path) -> None:
    torch.save({"model": {}, "format_version": 1, "evil": pathlib.Path("/")}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_checkpoint(tmp_path / "evil.pt")


def test_resume_continues_to_the_same_weights(run_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    main(parse_args([*ARGS, "--output-dir", str(tmp_path), "--stop-after", "1"]))
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 0
    main(parse_args(["--resume", str(tmp_path)]))
    resumed = load_checkpoint(tmp_path / "last.pt")
    straight = load_checkpoint(run_dir / "last.pt")
    assert resumed["epoch"] == 1
    for name, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, msg=name)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_yaml_config_gives_defaults_and_flags_win(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("model: rnn\ndataset: digits\nlabel-smoothing: 0.2\nepochs: 7\n")
    args = parse_args(["--config", str(config), "--epochs", "3"])
    assert (args.model, args.dataset, args.label_smoothing, args.epochs) == ("rnn", "digits", 0.2, 3)
    config.write_text("modle: rnn\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(config)])


def test_export_evaluate_and_quantize_the_run(run_dir: pathlib.Path) -> None:
    summary = export_run(run_dir, evaluate=True, int8=True, fp16=True, calibration_images=64)
    onnx_path = pathlib.Path(summary["export"]["path"])
    mv = version_from_onnx(onnx_path.read_bytes(), "synthetic-cnn")
    assert list(mv.labels) == ["top-left", "top-right", "bottom-left", "bottom-right"]
    assert (mv.preprocessing.crop_height, mv.preprocessing.resize_short) == (16, 0)
    assert "cnn on synthetic" in mv.model_card
    evaluation = summary["evaluation"]
    assert evaluation["top1_gap_points"] <= 0.1
    assert json.loads((run_dir / "eval_onnx.json").read_text())["top1"] == evaluation["onnx_top1"]
    int8 = summary["int8"]
    assert int8["size_bytes"] < int8["fp32_size_bytes"]
    assert abs(int8["top1_change_points"]) <= 5.0  # 64 test images: one image is 1.6 points
    int8_meta = version_from_onnx(pathlib.Path(int8["path"]).read_bytes(), "synthetic-cnn-int8")
    assert list(int8_meta.labels) == list(mv.labels)
    assert pathlib.Path(summary["fp16"]["path"]).is_file()


@pytest.mark.parametrize("name", ["resnet18", "cnn", "rnn", "vit"])
def test_every_model_exports_with_a_dynamic_batch(name: str, tmp_path: pathlib.Path) -> None:
    from training.export import export_onnx
    from training.models import build_model

    model = build_model(name, in_channels=1, num_classes=3, image_size=8)
    pre = {
        "resize_short": 0,
        "crop_height": 8,
        "crop_width": 8,
        "mean": [0.5],
        "std": [0.5],
        "color_mode": "GRAYSCALE",
        "outputs_probabilities": False,
    }
    report = export_onnx(
        model, torch.zeros(1, 1, 8, 8), tmp_path / f"{name}.onnx", labels=["a", "b", "c"], preprocessing=pre, atol=1e-4
    )
    assert report["max_abs_diff"] <= 1e-4
