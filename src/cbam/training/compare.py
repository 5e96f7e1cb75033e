"""Train the same recipe with different attention and report them side by side."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from cbam.training.config import TrainConfig
from cbam.training.runs import RunSummary, train_or_reuse
from cbam.training.trainer import check_builds


@dataclass(frozen=True)
class ComparisonRow(RunSummary):
    attention: str


def compare_attentions(
    config: TrainConfig, attentions: Sequence[str], output: str | Path
) -> list[ComparisonRow]:
    """One run per attention under output/<attention>, same seed, data order and recipe.

    A run that already finished is read back, and an interrupted one is resumed, so an
    interrupted comparison can be restarted with the same command. Every run's config is
    checked, and its model built on the meta device, before the first one trains; the
    baseline ("none") runs without attention_kwargs.
    """
    configs = [
        replace(
            config,
            attention=attention,
            attention_kwargs={} if attention == "none" else config.attention_kwargs,
            output=str(Path(output) / attention),
        ).validate()
        for attention in attentions
    ]
    for run_config in configs:  # every run's model builds (on meta: no memory) before any trains
        check_builds(run_config)
    rows = []
    for attention, run_config in zip(attentions, configs, strict=True):
        run_dir = Path(run_config.output)
        if not train_or_reuse(run_config):
            break
        rows.append(ComparisonRow(**asdict(RunSummary.read(run_dir)), attention=attention))
    return rows
