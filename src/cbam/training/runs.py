"""Reuse a finished run, resume an interrupted one: what lets `cbam compare` and `cbam
reproduce` be restarted with the same command after Ctrl-C, a crash or a reboot."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbam.training import checkpoint as ckpt
from cbam.training.config import TrainConfig, load_config
from cbam.training.trainer import AUTO, check_same_config, train

# Settings that change how a run executes but not what it computes: two configs that differ
# only in these are the same experiment (the trainer lets a resumed run change them).
EXECUTION_ONLY = (
    "output", "workers", "log_every", "device", "checkpoint_every", "checkpoint_minutes",
    "dist_timeout_minutes",
)  # fmt: skip


def experiment(config: TrainConfig) -> dict[str, Any]:
    """The config without its execution-only settings: what makes two runs the same."""
    return {k: v for k, v in config.to_dict().items() if k not in EXECUTION_ONLY}


def read_metrics(run_dir: str | Path) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv (one per finished epoch); [] when it has none."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def is_finished(config: TrainConfig) -> bool:
    """Whether `config.output` holds a run with all `config.epochs` epochs logged and
    checkpointed."""
    run_dir = Path(config.output)
    if not (run_dir / "config.yaml").is_file() or len(read_metrics(run_dir)) < config.epochs:
        return False
    done = ckpt.progress(run_dir)
    return done is not None and done[0] >= config.epochs and done[1] == 0


def train_or_reuse(config: TrainConfig) -> bool:
    """Make sure `config` is trained in its `output` folder; True once it has finished.

    A finished run is left as it is, an interrupted one resumes from its last checkpoint, and
    a folder whose run stopped before its first checkpoint is started afresh. A folder holding
    a different experiment is an error. False means this call was interrupted (Ctrl-C or
    SIGTERM) and the run can be resumed by calling again.
    """
    run_dir = Path(config.output)
    if (run_dir / "config.yaml").is_file():
        saved = load_config(run_dir / "config.yaml")
        check_same_config(experiment(config), experiment(saved), run_dir)
        if is_finished(config):
            return True
    return not train(config, resume=AUTO).interrupted


@dataclass(frozen=True)
class RunSummary:
    """A finished run as its metrics.csv reports it."""

    run_dir: Path
    epochs: int
    params: int
    test_top1_err: float  # the last epoch's: picking the best epoch would tune on the test set
    test_top5_err: float
    best_top1_err: float
    train_images_per_s: float  # mean over epochs
    minutes: float  # training time, evaluation excluded

    @classmethod
    def read(cls, run_dir: str | Path) -> RunSummary:
        rows = read_metrics(run_dir)
        if not rows:
            raise ValueError(f"{run_dir} has no finished epoch (no metrics.csv rows)")
        last = rows[-1]
        return cls(
            run_dir=Path(run_dir),
            epochs=len(rows),
            params=int(last["params"]),
            test_top1_err=float(last["test_top1_err"]),
            test_top5_err=float(last["test_top5_err"]),
            best_top1_err=min(float(r["test_top1_err"]) for r in rows),
            train_images_per_s=sum(float(r["train_images_per_s"]) for r in rows) / len(rows),
            minutes=sum(float(r["epoch_seconds"]) for r in rows) / 60,
        )
