"""`cbam info`: parameters and MACs of every model beside the paper's figures."""

from __future__ import annotations

import argparse
import csv
import sys

from cbam._errors import unknown_choice
from cbam.complexity import ComplexityRow, complexity_table
from cbam.layers import list_attentions
from cbam.models import list_models

INFO_COLUMNS = (
    "model", "attention", "input", "classes", "params (M)", "paper params (M)",
    "GMACs", "+GMACs vs none", "paper GFLOPs", "paper +GFLOPs",
)  # fmt: skip


def _info_cells(row: ComplexityRow) -> list[str]:
    paper, base = row.paper, row.paper_baseline
    return [
        row.label,
        row.attention,
        f"{row.input_size}x{row.input_size}",
        str(row.num_classes),
        f"{row.params / 1e6:.2f}",
        f"{paper.params_m:.2f}" if paper else "",
        f"{row.macs / 1e9:.3f}",
        f"{row.macs_increment / 1e9:+.4f}",
        f"{paper.gflops:.3f}" if paper else "",
        f"{paper.gflops - base.gflops:+.3f}" if paper and base else "",
    ]


def cmd_info(args: argparse.Namespace) -> int:
    models = args.models or list_models()
    known = list_models()
    for name in models:
        if name not in known:
            raise unknown_choice("model", name, known)
    rows = complexity_table(models, args.attentions)
    if args.format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(INFO_COLUMNS)
        writer.writerows(_info_cells(r) for r in rows)
        return 0
    print("| " + " | ".join(INFO_COLUMNS) + " |")
    print("|" + "|".join("---" for _ in INFO_COLUMNS) + "|")
    for row in rows:
        print("| " + " | ".join(_info_cells(row)) + " |")
    print(
        "\nParams: exact count. GMACs: multiply-accumulates of one image, counted by "
        "torch.utils.flop_counter (convolutions and matmuls only; pooling, BN, activations "
        "and gate multiplies count 0). The paper's absolute GFLOPs follow the authors' own "
        "counter and differ for some baselines; compare the increments."
    )
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    info = commands.add_parser(
        "info", help="params and GMACs of every model, with the paper's figures beside them"
    )
    info.add_argument("--models", nargs="+", metavar="NAME", help="default: every model")
    info.add_argument(
        "--attentions", nargs="+", default=["none", "se", "cbam"],
        choices=["none", *list_attentions()], help="default: none se cbam",
    )  # fmt: skip
    info.add_argument("--format", choices=["markdown", "csv"], default="markdown")
    info.set_defaults(run=cmd_info)
