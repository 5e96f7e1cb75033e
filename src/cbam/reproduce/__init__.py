"""The paper's tables re-measured side by side, over seeds: `cbam reproduce TABLE`.

    from cbam.reproduce import reproduce
    from cbam.training import load_config
    result = reproduce(["spatial"], load_config("small"), seeds=3, output="runs/reproduce")

Every cell of a table is trained with the same recipe at each seed (the same data order and
initialisation recipe per seed), so the differences to the baseline can be paired by seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cbam._errors import check_positive_int
from cbam._paths import check_output_folder
from cbam.complexity import count_macs, count_parameters
from cbam.data import DataSplits
from cbam.paper import config_label
from cbam.reproduce.grid import GridOutcome, cell_config, check_jobs, read_record, run_grid
from cbam.reproduce.report import CellRuns, Row, summarize, write_report
from cbam.reproduce.stats import Difference, Estimate, paired_difference, t_quantile_975
from cbam.reproduce.tables import DEFAULT_MODELS, TABLE_NAMES, Cell, Table, get_tables
from cbam.training.config import TrainConfig
from cbam.training.runs import RunSummary
from cbam.training.trainer import build_model, build_splits

__all__ = [
    "DEFAULT_MODELS",
    "TABLE_NAMES",
    "Cell",
    "Difference",
    "Estimate",
    "ReproduceResult",
    "Row",
    "Table",
    "get_tables",
    "paired_difference",
    "reproduce",
    "t_quantile_975",
]


@dataclass
class ReproduceResult:
    grid: GridOutcome
    tables: dict[str, list[Row]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    skipped_charts: str | None = None  # why the PNG charts were not drawn


def _complexity(config: TrainConfig, splits: DataSplits) -> tuple[int, int]:
    """(parameters, MACs) at the data's image size, counted on the meta device: building
    every model here also catches a bad model or attention argument before any training."""
    with torch.device("meta"):
        model = build_model(config, splits)
    return count_parameters(model), count_macs(model, splits.image_size, splits.in_chans)


def _setup(config: TrainConfig, splits: DataSplits, seeds: Sequence[int]) -> str:
    size = splits.image_size
    return (
        f"{config.dataset}: {len(splits.train)} training / {len(splits.test)} test images of "
        f"{size}x{size} px; {config.epochs} epoch(s), batch {config.batch_size}, "
        f"{config.optimizer} lr {config.scaled_lr:g} ({config.schedule}), weight decay "
        f"{config.weight_decay:g}; seeds {', '.join(map(str, seeds))}."
    )


def _execution_note(runs: Sequence[RunSummary]) -> str | None:
    """How the throughput was measured: trainings at once and threads each, per run."""
    ways = set()
    for run in runs:
        last = (read_record(run.run_dir).get("trained_with") or [{}])[-1]
        jobs, threads = last.get("jobs", "?"), last.get("torch_threads", "?")
        ways.add(f"{jobs} at a time, {threads} torch thread(s) each")
    if not ways:
        return None
    return f"trained {' or '.join(sorted(ways))}; img/s compare only between runs trained alike"


def reproduce(
    tables: Sequence[str],
    config: TrainConfig,
    seeds: int = 3,
    output: str | Path = "runs/reproduce",
    jobs: int = 1,
    models: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> ReproduceResult:
    """Train every cell of `tables` ("all" for every table) at seeds config.seed ...
    config.seed + seeds - 1 and write each table's report under `output`.

    Runs live in output/runs/ and are shared between tables; finished ones are reused and
    interrupted ones resumed, so the same call continues an interrupted grid. `models` are
    the architectures table's backbones (NAME or NAME(KEY=VALUE, ...)). The reports cover the
    runs that finished, also when the grid was interrupted or a run failed.
    """
    check_positive_int("seeds", seeds)
    check_jobs(jobs)
    chosen = get_tables(tables, models)
    seed_list = [config.seed + i for i in range(seeds)]
    root = check_output_folder(output, "output")
    # Seed-major order: an interrupted grid has whole seeds done, which pair with each other.
    configs = {
        (t.name, i, seed): cell_config(config, cell, seed, root)
        for seed in seed_list
        for t in chosen
        for i, cell in enumerate(t.cells)
    }
    # Loading the data and building every model first stops a bad option before any training.
    splits = build_splits(config)
    sizes = {
        (t.name, i): _complexity(configs[(t.name, i, seed_list[0])], splits)
        for t in chosen
        for i in range(len(t.cells))
    }

    unique = list({c.output: c for c in configs.values()}.values())
    result = ReproduceResult(run_grid(unique, jobs, log))
    finished = {path: RunSummary.read(path) for path in result.grid.finished}
    setup = _setup(config, splits, seed_list)
    for t in chosen:
        cells = []
        for i, cell in enumerate(t.cells):
            runs = {}
            for seed in seed_list:
                run_dir = Path(configs[(t.name, i, seed)].output)
                if run_dir in finished:
                    runs[seed] = finished[run_dir]
            first = configs[(t.name, i, seed_list[0])]
            model = config_label(first.model, first.model_kwargs)
            cells.append(CellRuns(cell, model, runs, *sizes[(t.name, i)]))
        rows = summarize(cells)
        done = [run for row in rows for run in row.runs.values()]
        notes = [n for n in (_execution_note(done),) if n]
        if len(done) < len(t.cells) * seeds:
            notes.append(
                f"incomplete: {len(done)} of {len(t.cells) * seeds} runs finished; run the same "
                f"command again to finish the rest"
            )
        files, skipped = write_report(t, rows, setup, root, notes)
        result.tables[t.name] = rows
        result.files += files
        result.skipped_charts = result.skipped_charts or skipped
    return result
