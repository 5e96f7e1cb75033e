"""Train the same recipe with different attention and report them side by side."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cbam.training.config import TrainConfig
from cbam.training.trainer import train


@dataclass(frozen=True)
class ComparisonRow:
    attention: str
    params: int
    test_top1_err: float
    test_top5_err: float
    best_top1_err: float
    train_images_per_s: float
    minutes: float
    run_dir: Path


def _finished_rows(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def compare_attentions(
    config: TrainConfig, attentions: Sequence[str], output: str | Path
) -> list[ComparisonRow]:
    """One run per attention under output/<attention>, same seed, data order and recipe.

    A run that already finished is read back, and an interrupted one is resumed, so an
    interrupted comparison can be restarted with the same command.
    """
    rows = []
    for attention in attentions:
        run_dir = Path(output) / attention
        done = _finished_rows(run_dir)
        if len(done) < config.epochs:
            resume = run_dir if (run_dir / "last_state.pt").exists() else None
            run_config = replace(config, attention=attention, output=str(run_dir))
            result = train(run_config, resume=resume)
            if result.interrupted:
                break
            done = _finished_rows(run_dir)
        last = done[-1]
        rows.append(
            ComparisonRow(
                attention=attention,
                params=int(last["params"]),
                test_top1_err=float(last["test_top1_err"]),
                test_top5_err=float(last["test_top5_err"]),
                best_top1_err=min(float(r["test_top1_err"]) for r in done),
                train_images_per_s=sum(float(r["train_images_per_s"]) for r in done) / len(done),
                minutes=sum(float(r["epoch_seconds"]) for r in done) / 60,
                run_dir=run_dir,
            )
        )
    return rows
