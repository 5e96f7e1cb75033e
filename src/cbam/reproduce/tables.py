"""The paper's tables (REFERENCE.md sections 3-4) as lists of cells to train.

A cell is one row of a table: an attention with its arguments, optionally a backbone, and the
paper's ImageNet-1K figures for that row. The ablation tables train the recipe's backbone
(ResNet-20 in the small recipe); the paper's figures are for ResNet-50 on ImageNet, so they
are a column to read beside ours, not a target the numbers should hit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from cbam._errors import unknown_choice
from cbam.models import model_entry
from cbam.paper import PaperResult, config_label, paper_result
from cbam.training.config import TrainConfig

# ResNet-20 and ResNet-56 (0.27M and 0.86M parameters) keep a 3-seed Fashion-MNIST grid
# within hours on 2 CPU cores; the paper's ImageNet backbones (--models resnet18 resnet50 ...)
# are 40-100x more work per image.
DEFAULT_MODELS = ("resnet20", "resnet56")


@dataclass(frozen=True)
class PaperFigures:
    """The paper's ImageNet-1K numbers for one row; None where its table gives none."""

    top1_err: float
    top5_err: float
    params_m: float | None = None
    gflops: float | None = None

    @classmethod
    def of(cls, result: PaperResult | None) -> PaperFigures | None:
        if result is None:
            return None
        return cls(result.top1_err, result.top5_err, result.params_m, result.gflops)


@dataclass(frozen=True)
class Cell:
    """One row: attention None is the baseline the other rows of its model are paired with."""

    label: str
    attention: str | None
    attention_kwargs: dict[str, Any] = field(default_factory=dict)
    paper: PaperFigures | None = None
    model: str | None = None  # None: the recipe's backbone
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def configure(self, base: TrainConfig, seed: int) -> TrainConfig:
        """`base` with this cell's model and attention, at `seed` (the same data order and
        initialisation recipe for every cell)."""
        config = replace(base, seed=seed, attention=self.attention)
        if self.model is not None:
            config = replace(config, model=self.model, model_kwargs=dict(self.model_kwargs))
        kwargs = {**base.attention_kwargs, **self.attention_kwargs} if self.attention else {}
        return replace(config, attention_kwargs=kwargs)


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    cells: tuple[Cell, ...]
    paper_source: str  # what the paper column holds


def _resnet50(attention: str) -> PaperFigures | None:
    return PaperFigures.of(paper_result("resnet50", attention))


_ABLATION_SOURCE = "ImageNet-1K, ResNet-50, top-1 / top-5 error % (REFERENCE.md section 3)"
_BASELINE = Cell("no attention (baseline)", None, paper=_resnet50("none"))
_CHANNEL_ONLY = {"spatial": None}  # CBAM without its spatial gate; avg & max pooling
_CBAM = Cell("channel -> spatial (CBAM)", "cbam", paper=_resnet50("cbam"))

CHANNEL_POOLING = Table(
    "channel-pooling",
    "Channel attention: pooling (channel attention only)",
    (
        _BASELINE,
        Cell("avg", "cbam", {**_CHANNEL_ONLY, "pool_types": ["avg"]}, _resnet50("se")),
        Cell("max", "cbam", {**_CHANNEL_ONLY, "pool_types": ["max"]}, PaperFigures(23.20, 6.83)),
        Cell("avg & max", "cbam", _CHANNEL_ONLY, PaperFigures(22.80, 6.52)),
    ),
    _ABLATION_SOURCE + "; the paper's 'avg' row is SE",
)

SPATIAL = Table(
    "spatial",
    "Spatial attention: channel pooling vs 1x1 conv, k = 3 and 7 (after avg & max channel "
    "attention)",
    (
        _BASELINE,
        Cell(
            "channel attention only (avg & max)", "cbam", _CHANNEL_ONLY, PaperFigures(22.80, 6.52)
        ),
        Cell(
            "1x1 conv, k = 3",
            "cbam",
            {"spatial": "conv1x1", "kernel_size": 3},
            PaperFigures(22.96, 6.64, 28.10),
        ),
        Cell("1x1 conv, k = 7", "cbam", {"spatial": "conv1x1"}, PaperFigures(22.90, 6.47, 28.10)),
        Cell(
            "channel pooling, k = 3", "cbam", {"kernel_size": 3}, PaperFigures(22.68, 6.41, 28.09)
        ),
        replace(_CBAM, label="channel pooling, k = 7 (CBAM)"),
    ),
    _ABLATION_SOURCE + "; the channel-only row is from its pooling table",
)

ARRANGEMENT = Table(
    "arrangement",
    "Arrangement of the channel and spatial attention",
    (
        _BASELINE,
        _CBAM,
        Cell("spatial -> channel", "cbam", {"order": "spatial_channel"}, PaperFigures(22.78, 6.42)),
        Cell(
            "channel + spatial in parallel",
            "cbam",
            {"order": "parallel"},
            PaperFigures(22.95, 6.59),
        ),
    ),
    _ABLATION_SOURCE,
)

ABLATIONS = {t.name: t for t in (CHANNEL_POOLING, SPATIAL, ARRANGEMENT)}
TABLE_NAMES = (*ABLATIONS, "architectures")


def parse_model(spec: str) -> tuple[str, dict[str, Any]]:
    """ "wide_resnet18(widen=1.5)" -> ("wide_resnet18", {"widen": 1.5}); values read as YAML."""
    match = re.fullmatch(r"\s*(\w+)\s*(?:\((.*)\))?\s*", spec)
    if match is None:
        raise ValueError(
            f"cannot read model {spec!r}: write NAME or NAME(KEY=VALUE, ...), e.g. resnet56 or "
            f"'wide_resnet18(widen=1.5)'"
        )
    name, args = match.group(1), match.group(2)
    model_entry(name)  # an unknown name is an error naming the close ones
    kwargs: dict[str, Any] = {}
    for item in filter(None, (a.strip() for a in (args or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"cannot read {item!r} in model {spec!r}: write KEY=VALUE")
        kwargs[key.strip()] = yaml.safe_load(value)
    return name, kwargs


def architectures(models: Sequence[str] = DEFAULT_MODELS) -> Table:
    """Baseline, + SE and + CBAM on each backbone; the paper's figures where it has the
    backbone (resnet18/34/50/101, 'wide_resnet18(widen=1.5)', resnext50_32x4d,
    'mobilenet_v1(width_mult=0.7)')."""
    if not models:
        raise ValueError("the architectures table needs at least one model (--models)")
    cells = []
    for spec in models:
        name, kwargs = parse_model(spec)
        label = config_label(name, kwargs)
        for attention, text in ((None, "baseline"), ("se", "+ SE"), ("cbam", "+ CBAM")):
            paper = PaperFigures.of(paper_result(label, attention))
            cells.append(Cell(text, attention, paper=paper, model=name, model_kwargs=kwargs))
    return Table(
        "architectures",
        "Backbones with and without attention",
        tuple(cells),
        "ImageNet-1K, params (M) / GFLOPs at 224 px / top-1 / top-5 error % (REFERENCE.md "
        "section 4)",
    )


def get_tables(names: Sequence[str], models: Sequence[str] | None = None) -> list[Table]:
    """Tables by name ("all" for every one); `models` are the architectures table's backbones."""
    wanted = [n for name in names for n in (TABLE_NAMES if name == "all" else (name,))]
    tables = []
    for name in dict.fromkeys(wanted):  # each table once, in the order asked
        if name in ABLATIONS:
            tables.append(ABLATIONS[name])
        elif name == "architectures":
            tables.append(architectures(models or DEFAULT_MODELS))
        else:
            raise unknown_choice("table", name, [*TABLE_NAMES, "all"])
    return tables
