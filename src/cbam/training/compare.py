"""Train the same recipe with different attention and report them side by side."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from cbam.training.config import TrainConfig
from cbam.training.runs import RunSummary, train_or_reuse


@dataclass(frozen=True)
class ComparisonRow(RunSummary):
    attention: str


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
        if not train_or_reuse(replace(config, attention=attention, output=str(run_dir))):
            break
        rows.append(ComparisonRow(**asdict(RunSummary.read(run_dir)), attention=attention))
    return rows
