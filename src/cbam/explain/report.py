"""The numbers behind the figure: one row per (image, model), and a summary per model."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from cbam.explain.gates import GateStats


@dataclass
class Record:
    """One model on one image: its prediction, the true class's probability, its map's peak."""

    image: str
    page: int
    model: str
    true_class: str  # "" when unknown
    predicted_class: str
    p_true: float | None  # softmax probability of the true class (None when unknown)
    p_predicted: float
    correct: bool | None
    cam_method: str
    cam_layer: str
    cam_target: str  # the class the map explains
    peak_x: int | None  # model-input pixels; None when the map is all zero
    peak_y: int | None
    peak_in_region: bool | None  # None when the image has no box or mask
    region_fraction: float | None  # the region's share of the image: a random peak's hit rate


@dataclass
class ModelSummary:
    """Per model: mean true-class probability, accuracy, and how often the map's peak lands
    in the box/mask, beside `chance_rate`, the rate of a peak placed uniformly at random."""

    model: str
    images: int
    labelled: int
    accuracy: float | None
    mean_p_true: float | None
    region_images: int
    peak_in_region_rate: float | None
    chance_rate: float | None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarise(records: Sequence[Record], models: Sequence[str]) -> list[ModelSummary]:
    """One summary per model name, in the given order."""
    out = []
    for name in models:
        rows = [r for r in records if r.model == name]
        labelled = [r for r in rows if r.p_true is not None]
        regions = [r for r in rows if r.peak_in_region is not None]
        out.append(
            ModelSummary(
                model=name,
                images=len(rows),
                labelled=len(labelled),
                accuracy=_mean([float(bool(r.correct)) for r in labelled]),
                mean_p_true=_mean([float(r.p_true) for r in labelled]),  # type: ignore[arg-type]
                region_images=len(regions),
                peak_in_region_rate=_mean([float(bool(r.peak_in_region)) for r in regions]),
                chance_rate=_mean([float(r.region_fraction) for r in regions]),  # type: ignore[arg-type]
            )
        )
    return out


def _cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def write_rows(path: Path, rows: Sequence[object], cls: type) -> Path:
    """A CSV with one column per dataclass field (empty cells for unknown values)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f.name for f in fields(cls)])
        for row in rows:
            writer.writerow([_cell(v) for v in asdict(row).values()])  # type: ignore[call-overload]
    return path


def write_records(path: Path, records: Sequence[Record]) -> Path:
    return write_rows(path, records, Record)


def write_summary(path: Path, summary: Sequence[ModelSummary]) -> Path:
    return write_rows(path, summary, ModelSummary)


def write_gate_stats(path: Path, stats: Sequence[GateStats]) -> Path:
    return write_rows(path, stats, GateStats)


def format_summary(summary: Sequence[ModelSummary]) -> str:
    """The summary as an aligned text table for the terminal."""

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    header = ("model", "images", "accuracy", "mean P(true)", "peak in region", "chance")
    rows = [
        (s.model, str(s.images), pct(s.accuracy), num(s.mean_p_true),
         "-" if s.peak_in_region_rate is None
         else f"{pct(s.peak_in_region_rate)} of {s.region_images}",
         pct(s.chance_rate))
        for s in summary
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in (header, *rows)
    )
