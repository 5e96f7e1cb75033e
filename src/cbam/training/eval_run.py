"""Evaluate saved weights: a run folder (its own config) or a weights file plus options."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbam._device import resolve_device
from cbam.data import DataSplits, split_batches
from cbam.interop import load_checkpoint
from cbam.training.config import ConfigT, TrainConfig, load_config
from cbam.training.evaluate import EvalMetrics, evaluate
from cbam.training.trainer import amp_dtype, build_model, build_splits

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".tar")


@dataclass
class LoadedRun:
    """A trained model ready to use, with the config and data it was trained on."""

    model: nn.Module  # in eval mode, on `device`
    config: TrainConfig
    splits: DataSplits
    device: torch.device


def resolve_source(
    source: str | Path,
    weights: str,
    overrides: dict[str, Any] | None,
    load: Callable[[str | Path, dict[str, Any]], ConfigT],
) -> tuple[ConfigT, Path, Path]:
    """(config, weights file, source path) for a run folder (its config.yaml and
    `weights`.safetensors) or a weights file (the `small` recipe), with `overrides` applied
    through `load` (load_config, or detection's load_detect_config)."""
    path = Path(source)
    overrides = dict(overrides or {})
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise ValueError(f"{path} is not a run folder: it has no config.yaml")
        return load(path / "config.yaml", overrides), path / f"{weights}.safetensors", path
    if path.suffix in WEIGHT_SUFFIXES:
        return load("small", overrides), path, path
    if not path.exists():
        raise ValueError(f"{path} does not exist; pass a run folder or a weights file")
    raise ValueError(
        f"{path} is neither a run folder nor a weights file ({', '.join(WEIGHT_SUFFIXES)})"
    )


def load_run(
    source: str | Path, weights: str = "best", overrides: dict[str, Any] | None = None
) -> LoadedRun:
    """Rebuild a trained model from a run folder or a weights file.

    A run folder brings its config.yaml; `weights` picks best.safetensors or
    last.safetensors. A bare weights file (ours, torchvision's or the CBAM authors' .pth.tar)
    is read with the small recipe's defaults plus `overrides` (model, attention, dataset,
    ...). Overrides also change evaluation-only settings of a run (batch_size, device,
    workers, test_subset, data_dir, amp).
    """
    config, weights_file, path = resolve_source(source, weights, overrides, load_config)
    device = resolve_device(config.device)
    torch.set_flush_denormal(config.flush_denormal)
    splits = build_splits(replace(config, train_subset=None)).to(device, config.channels_last)
    model = build_model(config, splits)
    load_checkpoint(model, weights_file, source="cbam" if path.is_dir() else "auto")
    return LoadedRun(model.to(device).eval(), config, splits, device)


def evaluate_source(
    source: str | Path,
    weights: str = "best",
    overrides: dict[str, Any] | None = None,
) -> tuple[EvalMetrics, list[str], TrainConfig]:
    """(metrics, class names, config) of a run folder or weights file on its test split;
    arguments as for `load_run`."""
    run = load_run(source, weights, overrides)
    config = run.config
    test = run.splits.test
    loader = split_batches(test, range(len(test)), config.batch_size, workers=config.workers)
    metrics = evaluate(
        run.model, loader, run.splits.num_classes, run.device, amp_dtype(config.amp, run.device),
        config.channels_last,
    )  # fmt: skip
    return metrics, run.splits.classes, config
