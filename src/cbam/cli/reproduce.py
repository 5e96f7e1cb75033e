"""`cbam reproduce TABLE`: the paper's ablation and architecture tables, re-measured over
seeds with one recipe, as markdown, CSV and a bar chart."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cbam.cli.train import add_training_options, overrides_from
from cbam.reproduce.tables import DEFAULT_MODELS, TABLE_NAMES

# --quick: a smoke test of the whole pipeline in about a minute, not a measurement.
QUICK = {"train_subset": 512, "test_subset": 1000, "epochs": 1}
QUICK_SEEDS = 2


def cmd_reproduce(args: argparse.Namespace) -> int:
    from cbam.reproduce import reproduce
    from cbam.training import load_config

    overrides = overrides_from(args, skip=("table", "seeds", "models", "jobs", "quick"))
    if args.quick:
        overrides = {**QUICK, **overrides}
    output = overrides.pop("output", "runs/reproduce-quick" if args.quick else "runs/reproduce")
    seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else 3)
    config = load_config(args.config, overrides)
    result = reproduce([args.table], config, seeds, output, args.jobs, args.models)
    for name in result.tables:
        print("\n" + (Path(output) / f"{name}.md").read_text(), end="")
    print(f"\nwritten: {', '.join(map(str, result.files))}")
    if result.skipped_charts:
        print(f"no charts: {result.skipped_charts}", file=sys.stderr)
    for run_dir, why in result.grid.failed.items():
        print(f"failed run {run_dir}: {why}", file=sys.stderr)
    if result.grid.interrupted:
        print("interrupted: run the same command again to resume")
        return 130
    return 1 if result.grid.failed else 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "reproduce",
        help="the paper's ablation / architecture tables over seeds, side by side",
        description="Trains every row of a table of the paper with one recipe at each of N "
        "seeds (seed s: the same data order and initialisation recipe for every row), then "
        "writes OUTPUT/TABLE.md, .csv, _runs.csv and .png: mean ± std of the test errors, the "
        "difference to the baseline paired by seed with a 95%% interval, params, GFLOPs, "
        "img/s, and the paper's ImageNet figures. Runs are kept in OUTPUT/runs/, shared "
        "between tables; the same command resumes an interrupted grid. --seed is the first "
        "seed; --model the ablation tables' backbone.",
    )
    parser.add_argument("table", choices=[*TABLE_NAMES, "all"], help="which table")
    add_training_options(parser)
    parser.add_argument("--seeds", type=int, help="number of seeds (default 3; 2 with --quick)")
    parser.add_argument(
        "--models", nargs="+", metavar="MODEL",
        help=f"backbones of the architectures table, NAME or 'NAME(KEY=VALUE, ...)' (default: "
        f"{' '.join(DEFAULT_MODELS)}; the paper's: resnet18 resnet34 resnet50 ...)",
    )  # fmt: skip
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="trainings at once, each in its own process with cores/jobs threads (default 1)",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help=f"a smoke test: {QUICK['train_subset']} training and {QUICK['test_subset']} test "
        f"images, {QUICK['epochs']} epoch, {QUICK_SEEDS} seeds, output runs/reproduce-quick",
    )  # fmt: skip
    parser.set_defaults(run=cmd_reproduce)
