"""How close `cbam train` runs to the model's own speed (issue 20).

For each attention (none, cbam) and data path (tensor, per-sample), one `train()` epoch on
`--images` training images, and around it a bare training step of the same model: the
trainer's `build_model` and `build_optimizer`, one fixed batch already on the device,
forward + loss + backward + optimiser step and nothing else (what `cbam bench --parts model`
times). The ratio is the trainer's train img/s (its own figure: the training pass, no
evaluation) over the mean of the bare step's img/s before and after it, so a machine that
slows down during the run hits both sides. End-to-end img/s (train images over the whole
`train()` call: data set build, model build, evaluation of `--test-images`, checkpoints) is
reported beside it. Then evaluation on its own: the seconds to evaluate the whole test split
(10,000 images) through each path, with the model as `cbam eval` runs it.

    python -m cbam.bench.data_pipeline                      # 12,800 images, ~5 min on 2 cores
    python -m cbam.bench.data_pipeline --images 2560 --rounds 1 --json figures.json
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbam._device import resolve_device
from cbam.bench.overhead import BenchConfig, machine_info
from cbam.data import DataSplits, split_batches
from cbam.training import load_config, train
from cbam.training.config import TrainConfig
from cbam.training.evaluate import evaluate
from cbam.training.trainer import amp_dtype, build_model, build_optimizer, build_splits

ATTENTIONS = ("none", "cbam")
DATA_PATHS = ("tensor", "per-sample")


def trainers_setup(
    config: TrainConfig, data_path: str | None = None
) -> tuple[torch.device, DataSplits, nn.Module]:
    """The device, data and model as the trainer makes them (denormals, seed, layout)."""
    torch.set_flush_denormal(config.flush_denormal)
    device = resolve_device(config.device)
    splits = build_splits(config, data_path).to(device, config.channels_last)
    torch.manual_seed(config.seed)
    model = build_model(config, splits).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return device, splits, model


def bare_step_rate(overrides: dict[str, Any], steps: int, warmup: int = 3) -> float:
    """img/s of the trainer's model and optimiser stepping on one fixed, resident batch."""
    config = load_config("small", overrides)
    device, splits, model = trainers_setup(config, "tensor")
    optimizer = build_optimizer(config, model.train())
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    images, labels = splits.train.batch(torch.arange(config.batch_size))  # in its layout
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        criterion(model(images), labels).backward()
        optimizer.step()
    _sync(device)
    return steps * config.batch_size / (time.perf_counter() - start)


def eval_seconds(overrides: dict[str, Any], images: int | None = None) -> tuple[float, int]:
    """(seconds, images) to evaluate the first `images` of the test split (None: all of it)
    through `overrides['data_path']`, data set build excluded."""
    config = load_config("small", {**overrides, "test_subset": images})
    device, splits, model = trainers_setup(config)
    test = splits.test
    batches = split_batches(test, range(len(test)), config.batch_size, workers=config.workers)
    _sync(device)
    start = time.perf_counter()
    metrics = evaluate(model.eval(), batches, splits.num_classes, device,
                       amp_dtype(config.amp, device), config.channels_last)  # fmt: skip
    _sync(device)
    return time.perf_counter() - start, metrics.images


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rates(overrides: dict[str, Any], output: Path) -> tuple[float, float]:
    """(the trainer's train img/s, train images over the whole call's wall time)."""
    start = time.perf_counter()
    result = train(load_config("small", {**overrides, "epochs": 1, "output": str(output)}))
    seconds = time.perf_counter() - start
    with open(result.run_dir / "metrics.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]
    return float(row["train_images_per_s"]), overrides["train_subset"] / seconds


def run(
    images: int, test_images: int, batch_size: int, rounds: int,
    attentions: Sequence[str] = ATTENTIONS, data_paths: Sequence[str] = DATA_PATHS,
    eval_images: int | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    steps = max(5, images // batch_size // 4)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for attention in attentions:
                for data_path in data_paths:
                    overrides = {
                        "attention": attention, "data_path": data_path, "train_subset": images,
                        "test_subset": test_images, "batch_size": batch_size,
                        "base_batch_size": batch_size,
                    }  # fmt: skip
                    before = bare_step_rate(overrides, steps)
                    trainer, end_to_end = train_rates(
                        overrides, Path(tmp) / f"{r}-{attention}-{data_path}"
                    )
                    after = bare_step_rate(overrides, steps)
                    bare = (before + after) / 2
                    seconds, evaluated = eval_seconds(overrides, eval_images)
                    rows.append({
                        "round": r, "attention": attention, "data_path": data_path,
                        "bare_step_img_s": bare, "train_img_s": trainer,
                        "end_to_end_img_s": end_to_end, "ratio": trainer / bare,
                        "end_to_end_ratio": end_to_end / bare, "eval_s": seconds,
                        "eval_images": evaluated,
                    })  # fmt: skip
    return rows


def report(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    lines = [
        f"{settings['images']} Fashion-MNIST training images, {settings['test_images']} test "
        f"images, batch {settings['batch_size']}, ResNet-20 (small recipe), "
        f"{settings['rounds']} round(s); medians over rounds",
        "",
        "| attention | data path | bare step img/s | cbam train img/s | ratio | end-to-end img/s "
        "| end-to-end ratio | eval s (test split) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = dict.fromkeys((row["attention"], row["data_path"]) for row in rows)
    for attention, data_path in keys:
        mine = [
            row for row in rows if (row["attention"], row["data_path"]) == (attention, data_path)
        ]

        def med(key: str, mine: list[dict[str, Any]] = mine) -> float:
            return statistics.median(row[key] for row in mine)

        lines.append(
            f"| {attention} | {data_path} | {med('bare_step_img_s'):.0f} | "
            f"{med('train_img_s'):.0f} | {med('ratio'):.2f} | {med('end_to_end_img_s'):.0f} | "
            f"{med('end_to_end_ratio'):.2f} | {med('eval_s'):.1f} ({mine[0]['eval_images']} "
            f"images) |"
        )
    machine = settings["machine"]
    lines += ["", f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, "
              f"{machine['torch_threads']} torch threads, torch {machine['torch']}"]  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12800, help="training images (12800)")
    parser.add_argument("--test-images", type=int, default=2560, help="test images (2560)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--attention", nargs="+", default=list(ATTENTIONS))
    parser.add_argument("--data-paths", nargs="+", default=list(DATA_PATHS), choices=DATA_PATHS)
    parser.add_argument("--eval-images", type=int, help="test images timed alone (all)")
    parser.add_argument("--json", type=Path, help="also write the rows and settings here")
    args = parser.parse_args(argv)
    rows = run(args.images, args.test_images, args.batch_size, args.rounds, args.attention,
               args.data_paths, args.eval_images)  # fmt: skip
    settings = {
        "images": args.images, "test_images": args.test_images, "batch_size": args.batch_size,
        "rounds": args.rounds, "machine": machine_info(BenchConfig(device="cpu")),
    }  # fmt: skip
    print(report(rows, settings))
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
