"""A table's results as markdown, CSV (per cell and per run) and a bar chart with error bars."""

from __future__ import annotations

import csv
import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbam.reproduce.stats import Difference, Estimate, describe, paired_difference
from cbam.reproduce.tables import Cell, Table
from cbam.training.runs import RunSummary


@dataclass(frozen=True)
class CellRuns:
    """A cell with the runs that finished for it, by seed, and its model's size."""

    cell: Cell
    model: str  # the backbone, as config_label writes it
    runs: dict[int, RunSummary]
    params: int
    macs: int  # one forward pass at the data set's input size


@dataclass(frozen=True)
class Row:
    """A cell's statistics over seeds; the differences are None on a baseline row."""

    cell: Cell
    model: str
    runs: dict[int, RunSummary]
    params: int
    gflops: float
    top1: Estimate
    top5: Estimate
    images_per_s: Estimate
    d_top1: Difference | None
    d_top5: Difference | None
    paper_d_top1: float | None  # the same difference in the paper's table

    @property
    def is_baseline(self) -> bool:
        return self.cell.attention is None


def summarize(cells: Sequence[CellRuns]) -> list[Row]:
    """Mean and spread of each cell, and its difference to the baseline of its model
    (the cell without attention), paired by seed."""
    baselines = {c.model: c for c in cells if c.cell.attention is None}
    rows = []
    for c in cells:
        top1 = {s: r.test_top1_err for s, r in c.runs.items()}
        top5 = {s: r.test_top5_err for s, r in c.runs.items()}
        base = baselines.get(c.model)
        d_top1 = d_top5 = None
        paper_d = None
        if base is not None and base is not c:
            d_top1 = paired_difference(top1, {s: r.test_top1_err for s, r in base.runs.items()})
            d_top5 = paired_difference(top5, {s: r.test_top5_err for s, r in base.runs.items()})
            if c.cell.paper and base.cell.paper:
                paper_d = c.cell.paper.top1_err - base.cell.paper.top1_err
        rows.append(
            Row(
                cell=c.cell,
                model=c.model,
                runs=c.runs,
                params=c.params,
                gflops=c.macs / 1e9,
                top1=describe(list(top1.values())),
                top5=describe(list(top5.values())),
                images_per_s=describe([r.train_images_per_s for r in c.runs.values()]),
                d_top1=d_top1,
                d_top5=d_top5,
                paper_d_top1=paper_d,
            )
        )
    return rows


# ------------------------------------------------------------------------------ markdown


def _mean_std(e: Estimate, digits: int = 2) -> str:
    if e.n == 0:
        return "not run"
    if e.n == 1:
        return f"{e.mean:.{digits}f} (1 seed)"
    return f"{e.mean:.{digits}f} ± {e.std:.{digits}f}"


def _difference(row: Row, d: Difference | None) -> str:
    if row.is_baseline:
        return "baseline"
    if not row.runs:
        return "not run"
    if d is None:
        return "n/a (no seed shared with the baseline)"
    if d.low is None or d.high is None:
        return f"{d.mean:+.2f} (1 seed: no interval)"
    text = f"{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}]"
    return f"**{text}**" if d.excludes_zero else text


def _paper(row: Row) -> tuple[str, str, str]:
    paper = row.cell.paper
    if paper is None:
        return "-", "-", "-"
    errors = f"{paper.top1_err:.2f} / {paper.top5_err:.2f}"
    params = "-" if paper.params_m is None else f"{paper.params_m:.2f}"
    size = f"{params} / " + ("-" if paper.gflops is None else f"{paper.gflops:.3f}")
    if row.is_baseline:
        return errors, "baseline", size
    diff = "-" if row.paper_d_top1 is None else f"{row.paper_d_top1:+.2f}"
    return errors, diff, size


def markdown(table: Table, rows: Sequence[Row], setup: str, notes: Sequence[str] = ()) -> str:
    """The table with a header saying how it was measured and what each column means."""
    header = (
        "model", "variant", "seeds", "top-1 err %", "top-5 err %", "Δ top-1 (95% CI)",
        "Δ top-5 (95% CI)", "params (M)", "GFLOPs", "train img/s", "paper top-1 / top-5",
        "paper Δ top-1", "paper params (M) / GFLOPs",
    )  # fmt: skip
    lines = [f"## {table.title}", "", setup, ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        paper_errors, paper_diff, paper_size = _paper(row)
        cells = (
            row.model, row.cell.label, str(row.top1.n), _mean_std(row.top1),
            _mean_std(row.top5), _difference(row, row.d_top1), _difference(row, row.d_top5),
            f"{row.params / 1e6:.4f}", f"{row.gflops:.4f}", _mean_std(row.images_per_s, 0),
            paper_errors, paper_diff, paper_size,
        )  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "- Errors: the last epoch's test error, mean ± sample standard deviation over seeds.",
        "- Δ: this row minus the baseline (no attention, same backbone), seed by seed, with a "
        "t-based 95% interval; negative means fewer errors. **Bold**: the interval excludes 0.",
        "- GFLOPs: multiply-accumulates of one forward pass at the data set's image size, "
        "counted as in `cbam info` (convolutions and matrix products).",
        "- train img/s: training throughput, mean over epochs.",
        f"- paper: {table.paper_source}; one run per row, no spread given.",
        *(f"- {note}" for note in notes),
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- CSV


def _number(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.6g}"


def _identity(table: Table, row: Row) -> dict[str, Any]:
    return {
        "table": table.name,
        "model": row.model,
        "variant": row.cell.label,
        "attention": row.cell.attention or "none",
        "attention_kwargs": json.dumps(row.cell.attention_kwargs, sort_keys=True),
    }


def write_csv(table: Table, rows: Sequence[Row], path: Path) -> None:
    """One line per cell: the numbers of the markdown table, unrounded."""
    lines = []
    for row in rows:
        paper = row.cell.paper
        line = {**_identity(table, row), "seeds": row.top1.n}
        for name, e in (("top1_err", row.top1), ("top5_err", row.top5)):
            line |= {f"{name}_mean": _number(e.mean), f"{name}_std": _number(e.std)}
        for name, d in (("d_top1_err", row.d_top1), ("d_top5_err", row.d_top5)):
            line |= {
                f"{name}_mean": _number(d.mean if d else None),
                f"{name}_low": _number(d.low if d else None),
                f"{name}_high": _number(d.high if d else None),
            }
        line |= {
            "params": row.params,
            "gflops": _number(row.gflops),
            "train_images_per_s_mean": _number(row.images_per_s.mean),
            "train_images_per_s_std": _number(row.images_per_s.std),
            "paper_top1_err": _number(paper.top1_err if paper else None),
            "paper_top5_err": _number(paper.top5_err if paper else None),
            "paper_params_m": _number(paper.params_m if paper else None),
            "paper_gflops": _number(paper.gflops if paper else None),
        }
        lines.append(line)
    _write_rows(path, lines)


def write_runs_csv(table: Table, rows: Sequence[Row], path: Path) -> None:
    """One line per run: every seed's own numbers, for other statistics than ours."""
    lines = [
        {
            **_identity(table, row),
            "seed": seed,
            "test_top1_err": run.test_top1_err,
            "test_top5_err": run.test_top5_err,
            "best_top1_err": run.best_top1_err,
            "epochs": run.epochs,
            "params": run.params,
            "train_images_per_s": _number(run.train_images_per_s),
            "minutes": _number(run.minutes),
            "run_dir": str(run.run_dir),
        }
        for row in rows
        for seed, run in sorted(row.runs.items())
    ]
    _write_rows(path, lines)


def _write_rows(path: Path, lines: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        if lines:
            writer = csv.DictWriter(f, fieldnames=list(lines[0]))
            writer.writeheader()
            writer.writerows(lines)


# -------------------------------------------------------------------------------- chart


def plot(table: Table, rows: Sequence[Row], path: Path) -> None:
    """Bars of mean top-1 and top-5 error with sample-std error bars and each seed as a dot.
    The y axis spans the data, not 0-100: the differences of interest are tenths of a point.

    Raises ImportError naming the extra to install when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    except ImportError as error:
        raise ImportError(
            f"the bar chart needs matplotlib ({error}); install it with pip install 'cbam[explain]'"
        ) from None
    several_models = len({row.model for row in rows}) > 1
    labels = [
        textwrap.fill((f"{row.model}: " if several_models else "") + row.cell.label, 24)
        for row in rows
    ]
    fig = Figure(figsize=(max(6.0, 1.1 * len(rows)), 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, sharex=True)
    x = range(len(rows))
    for ax, name in zip(axes, ("top1", "top5"), strict=True):
        estimates = [getattr(row, name) for row in rows]
        spreads = [0.0 if math.isnan(e.std) else e.std for e in estimates]
        ax.bar(
            x,
            [e.mean for e in estimates],
            yerr=spreads,
            color=["0.6" if row.is_baseline else "tab:blue" for row in rows],
            capsize=4,
        )
        seen = []
        for i, row in enumerate(rows):
            errors = [getattr(r, f"test_{name}_err") for r in row.runs.values()]
            ax.plot([i] * len(errors), errors, "o", color="black", markersize=3)
            seen += errors
        seen += [e.mean + s for e, s in zip(estimates, spreads, strict=True) if e.n]
        seen += [e.mean - s for e, s in zip(estimates, spreads, strict=True) if e.n]
        if seen:
            pad = max(0.1, 0.15 * (max(seen) - min(seen)))
            ax.set_ylim(max(0.0, min(seen) - pad), max(seen) + pad)
        ax.set_ylabel(f"test {name.replace('top', 'top-')} error %")
        ax.grid(axis="y", alpha=0.3)
    title = "\n".join(textwrap.wrap(table.title, 60))
    axes[0].set_title(f"{title}\nmean ± sample std over seeds; dots: single seeds; y axis zoomed")
    axes[1].set_xticks(list(x), labels, rotation=30, ha="right", fontsize=8)
    fig.savefig(path, dpi=100)


def write_report(
    table: Table, rows: Sequence[Row], setup: str, output: Path, notes: Sequence[str] = ()
) -> tuple[list[Path], str | None]:
    """TABLE.md, TABLE.csv, TABLE_runs.csv and TABLE.png under `output`: (paths written, why
    the chart was skipped or None)."""
    output.mkdir(parents=True, exist_ok=True)
    paths = [output / f"{table.name}{suffix}" for suffix in (".md", ".csv", "_runs.csv")]
    paths[0].write_text(markdown(table, rows, setup, notes))
    write_csv(table, rows, paths[1])
    write_runs_csv(table, rows, paths[2])
    try:
        plot(table, rows, output / f"{table.name}.png")
    except ImportError as error:
        return paths, str(error)
    return [*paths, output / f"{table.name}.png"], None
