"""`fovea train`: train a model from the table on a dataset, with checkpoints and a metrics log.

Shaped like torchvision's references/classification/train.py (get_args_parser, main,
train_one_epoch) with timm's YAML --config defaults and saved args.yaml. The whole dataset sits
in memory as uint8 and is augmented batch-wise on the training device: no DataLoader workers
to feed on a 2-core CPU, and a GPU never waits on Python transforms.

Output directory: args.yaml, metrics.jsonl (one JSON object per epoch), last.pt (resumable
checkpoint, rewritten every epoch), eval_torch.json and eval_torch_confusion.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import pathlib
import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from training.augment import augment, default_pad, normalize
from training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from training.datasets import DATASETS, Dataset, load_dataset
from training.evaluate import classification_metrics, predict_torch, write_report
from training.models import MODELS, build_model, parse_model_spec

logger = logging.getLogger(__name__)

DEFAULT_LR = {"adamw": 2e-3, "sgd": 0.1}
DEFAULT_WEIGHT_DECAY = {"adamw": 0.05, "sgd": 5e-4}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fovea train", description="Train an image classifier.")
    p.add_argument("--config", help="YAML file of defaults (keys are flag names, - or _)")
    p.add_argument(
        "--model",
        help=f"architecture from the model table ({', '.join(sorted(MODELS))}), "
        "optionally with options, e.g. vit:dim=96,depth=4",
    )
    p.add_argument("--dataset", choices=DATASETS, help="dataset name")
    p.add_argument("--data-dir", help="archive or folder for cifar10/cifar100/folder (never downloaded)")
    p.add_argument("--image-size", type=int, default=64, help="crop size for folder datasets")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--opt", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--lr", type=float, help="peak learning rate (default 2e-3 adamw, 0.1 sgd)")
    p.add_argument("--weight-decay", type=float, help="default 0.05 adamw, 5e-4 sgd")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (Nesterov)")
    p.add_argument("--sched", choices=("onecycle", "cosine"), default="onecycle")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up for cosine")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--pad", type=int, help="random-crop padding in pixels (default 1/8 of the side)")
    p.add_argument("--no-augment", action="store_true", help="train on the images as they are")
    p.add_argument(
        "--amp",
        choices=("auto", "off", "bf16", "fp16"),
        default="auto",
        help="mixed precision on CUDA; auto = bf16 where supported, else fp16",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-train", type=int, default=0, help="use only the first N training images")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate on the test split every N epochs")
    p.add_argument(
        "--stop-after",
        type=int,
        default=0,
        help="end this run after N epochs (the schedule still spans --epochs; continue with --resume)",
    )
    p.add_argument("--output-dir", default="", help="default runs/<dataset>-<model>")
    p.add_argument("--resume", help="checkpoint (or run directory) to continue; its saved arguments are used")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags override the YAML --config file, which overrides the parser's defaults."""
    parser = get_args_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        with open(pre.config) as f:
            values = yaml.safe_load(f) or {}
        known = {a.dest for a in parser._actions}
        defaults = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = set(defaults) - known
        if unknown:
            parser.error(f"unknown keys in {pre.config}: {sorted(unknown)}")
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if not args.resume and (args.model is None or args.dataset is None):
        parser.error("--model and --dataset are required (or --resume)")
    if args.model is not None and parse_model_spec(args.model)[0] not in MODELS:
        parser.error(f"unknown model {args.model!r}; choose from {', '.join(sorted(MODELS))}")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    """Mixed precision only on CUDA: CPU autocast is slower than fp32 for these small models."""
    if device.type != "cuda" or args.amp == "off":
        return None
    if args.amp == "fp16" or (args.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def seed_everything(seed: int) -> torch.Generator:
    """Seed every RNG; the returned generator drives shuffling and augmentation, and is checkpointed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    lr = args.lr or DEFAULT_LR[args.opt]
    wd = DEFAULT_WEIGHT_DECAY[args.opt] if args.weight_decay is None else args.weight_decay
    # No weight decay on biases, norms, embeddings and tokens (1-D or tiny tensors): decaying them hurts.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1 and p.shape[0] > 1 and p.ndim != 3]
    keep = [p for p in model.parameters() if p.requires_grad and not any(p is d for d in decay)]
    groups = [{"params": decay, "weight_decay": wd}, {"params": keep, "weight_decay": 0.0}]
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=args.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, args: argparse.Namespace, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    total = max(1, args.epochs * steps_per_epoch)
    lr = args.lr or DEFAULT_LR[args.opt]
    if args.sched == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=total, pct_start=0.25, div_factor=25.0, final_div_factor=1e3
        )
    warmup = min(total - 1, int(args.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches; a trailing batch of one is dropped (BatchNorm needs two)."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        if len(index) > 1 or n == 1:
            yield index


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    args: argparse.Namespace,
    data: Dataset,
    norm: tuple[torch.Tensor, torch.Tensor],
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None,
    dtype: torch.dtype | None,
    epoch: int,
) -> dict[str, float]:
    model.train()
    device = images.device
    pad = default_pad(data.image_size) if args.pad is None else args.pad
    seen = 0
    # Running sums stay on the device: reading them every step would stall a GPU on each batch.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    started = time.perf_counter()
    steps = math.ceil(len(images) / args.batch_size)
    bar = tqdm(
        batches(len(images), args.batch_size, generator),
        total=steps,
        desc=f"epoch {epoch + 1}/{args.epochs}",
        unit="batch",
        leave=False,
        dynamic_ncols=True,
    )
    for step, index in enumerate(bar):
        index = index.to(device)
        x = images[index]
        if not args.no_augment:
            x = augment(x, pad=pad, hflip=data.hflip, generator=generator)
        x = normalize(x, *norm)
        y = labels[index]
        autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with autocast:
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        n = len(y)
        seen += n
        loss_sum += loss.detach() * n
        correct += (logits.detach().argmax(1) == y).sum()
        if step % 20 == 0:
            bar.set_postfix(
                loss=f"{float(loss_sum) / seen:.4f}",
                acc=f"{int(correct) / seen:.2%}",
                lr=f"{scheduler.get_last_lr()[0]:.2e}",
                refresh=False,
            )
    loss_total, correct_total = float(loss_sum), int(correct)
    seconds = time.perf_counter() - started
    return {
        "train_loss": loss_total / max(1, seen),
        "train_acc": correct_total / max(1, seen),
        "lr": float(scheduler.get_last_lr()[0]),
        "train_seconds": seconds,
        "images_per_s": seen / max(seconds, 1e-9),
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or resume), then write the final test evaluation. Returns the last metrics row."""
    resume_state = None
    if args.resume:
        resume_path = pathlib.Path(args.resume)
        resume_path = resume_path / "last.pt" if resume_path.is_dir() else resume_path
        resume_state = load_checkpoint(resume_path)
        saved = dict(resume_state["args"])
        saved["resume"] = str(resume_path)
        saved["stop_after"] = getattr(args, "stop_after", 0)
        args = argparse.Namespace(**saved)
        logger.info("resuming %s from epoch %d", resume_path, resume_state["epoch"] + 1)
    out_dir = pathlib.Path(args.output_dir or f"runs/{args.dataset}-{args.model.replace(':', '-').replace(',', '-')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = amp_dtype(args, device)
    generator = seed_everything(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    saved_args = {k: v for k, v in vars(args).items() if k not in ("resume", "stop_after")}
    (out_dir / "args.yaml").write_text(yaml.safe_dump(saved_args, sort_keys=True))

    data = load_dataset(args.dataset, args.data_dir, args.image_size)
    if args.limit_train:
        data.train.images, data.train.labels = (
            data.train.images[: args.limit_train],
            data.train.labels[: args.limit_train],
        )
    preprocessing = data.preprocessing()
    meta = {
        "model": args.model,
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "in_channels": data.channels,
        "image_size": data.image_size,
        "labels": list(data.classes),
        "preprocessing": preprocessing,
    }
    model = build_model(
        args.model, in_channels=data.channels, num_classes=len(data.classes), image_size=data.image_size
    ).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "model %s: %.2fM parameters on %s%s",
        args.model,
        n_params / 1e6,
        device,
        f" with {str(dtype).removeprefix('torch.')} autocast" if dtype else "",
    )
    images = torch.from_numpy(data.train.images).to(device)
    labels = torch.from_numpy(data.train.labels).to(device)
    norm = (torch.tensor(preprocessing["mean"], device=device), torch.tensor(preprocessing["std"], device=device))
    optimizer = build_optimizer(model, args)
    steps_per_epoch = sum(1 for _ in batches(len(images), args.batch_size, torch.Generator()))
    scheduler = build_scheduler(optimizer, args, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    start_epoch = 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        generator.set_state(resume_state["generator"])
        # Dropout draws from the global generator, so it must continue where it stopped too.
        torch.set_rng_state(resume_state["torch_rng"])
        if device.type == "cuda" and resume_state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(resume_state["cuda_rng"], device)
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        start_epoch = resume_state["epoch"] + 1

    row: dict[str, Any] = {}
    stop_after = getattr(args, "stop_after", 0)
    end_epoch = min(args.epochs, start_epoch + stop_after) if stop_after else args.epochs
    for epoch in range(start_epoch, end_epoch):
        row = {
            "epoch": epoch + 1,
            **train_one_epoch(
                model, optimizer, scheduler, images, labels, args, data, norm, generator, scaler, dtype, epoch
            ),
        }
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            started = time.perf_counter()
            logits = predict_torch(model, data.test.images, preprocessing, device=device)
            row["test_acc"] = float(np.mean(logits.argmax(1) == data.test.labels))
            row["eval_seconds"] = time.perf_counter() - started
        logger.info(
            "epoch %d/%d: loss %.4f, train %.2f%%, test %s, %.0f img/s, %.1f s",
            epoch + 1,
            args.epochs,
            row["train_loss"],
            100 * row["train_acc"],
            f"{100 * row['test_acc']:.2f}%" if "test_acc" in row else "-",
            row["images_per_s"],
            row["train_seconds"],
        )
        with open(out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        save_checkpoint(
            out_dir / "last.pt",
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "epoch": epoch,
                "args": saved_args,
                "meta": meta,
            },
        )

    final = model_from_checkpoint(load_checkpoint(out_dir / "last.pt")).to(device)
    metrics = classification_metrics(
        data.test.labels, predict_torch(final, data.test.images, preprocessing, device=device), data.classes
    )
    write_report(metrics, data.classes, out_dir, "eval_torch", {"checkpoint": str(out_dir / "last.pt")})
    return {**row, "test_top1": metrics["top1"], "test_top5": metrics["top5"], "output_dir": str(out_dir)}


def train_main(argv: list[str] | None = None) -> int:
    """Entry point for `fovea train`."""
    from training.cli import configure_logging

    configure_logging()
    result = main(parse_args(argv))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(train_main())
