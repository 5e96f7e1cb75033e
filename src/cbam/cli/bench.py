"""`cbam bench`: what attention costs in time and memory, side by side in one run."""

from __future__ import annotations

import argparse

from cbam.bench.overhead import add_arguments, run_from_args


def cmd_bench(args: argparse.Namespace) -> int:
    return run_from_args(args)


def register(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench",
        help="time and peak memory of plain, SE, reference/fused CBAM and timm's CBAM",
        description="Times each attention module alone (forward + backward, at every stage's "
        "size) and the model's training step and inference, in one process with the variants "
        "interleaved; reports medians, paired ratios to the plain model, and peak memory.",
    )
    add_arguments(bench)
    bench.set_defaults(run=cmd_bench)
